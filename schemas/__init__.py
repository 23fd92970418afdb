"""imgpack spec v1: the contract between producers and consumers.

JSON Schemas for the manifest, the config blob and the tensor blob header live beside this module; the
normative text is README.md. The modules here (references, digests, names, tensor blobs, manifests, errors)
import nothing else from imgpack, so every other part can import them without cycles.
"""
