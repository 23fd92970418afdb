"""Constants of imgpack spec v1: media types, annotations and limits.

schemas/README.md is the normative text; this module is its machine-readable half.
"""

from __future__ import annotations

SPEC_VERSION = "1"

# Manifest media types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

#: Every manifest type a registry may answer with; used as the Accept list on manifest GET/HEAD.
MANIFEST_ACCEPT = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST]

#: artifactType of an OCI-flavour imgpack model manifest.
ARTIFACT_TYPE = "application/vnd.imgpack.model.v1"

# Config blob media types: ours for the OCI flavour, docker's container config for the ollama flavour.
CONFIG_MEDIA_TYPE = "application/vnd.imgpack.model.config.v1+json"
OLLAMA_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
CONFIG_MEDIA_TYPES = (CONFIG_MEDIA_TYPE, OLLAMA_CONFIG_MEDIA_TYPE)

# Layer media types.
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
#: Older ollama image-gen manifests label JSON config layers this way; readers accept it as JSON.
OLLAMA_LEGACY_JSON_MEDIA_TYPE = "application/vnd.ollama.image.config"
FILE_MEDIA_TYPE = "application/vnd.imgpack.file"
SAFETENSORS_HEADER_MEDIA_TYPE = "application/vnd.imgpack.safetensors.header"

JSON_LAYER_TYPES = (JSON_MEDIA_TYPE, OLLAMA_LEGACY_JSON_MEDIA_TYPE)
FILE_LAYER_TYPES = (JSON_MEDIA_TYPE, OLLAMA_LEGACY_JSON_MEDIA_TYPE, FILE_MEDIA_TYPE)
LAYER_MEDIA_TYPES = (TENSOR_MEDIA_TYPE, *FILE_LAYER_TYPES, SAFETENSORS_HEADER_MEDIA_TYPE)

# Annotations.
TITLE_ANNOTATION = "org.opencontainers.image.title"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CREATED_ANNOTATION = "org.opencontainers.image.created"
#: Layer annotation of a quantized tensor: compact JSON with type, bits, groupSize, mode, packedDtype,
#: packedShape and scaleDtype (see schemas/quantized.py).
QUANTIZATION_ANNOTATION = "io.imgpack.quantization"
#: Index annotation of a model pulled in part (``pull --component``/``--include``); its value says what was taken.
PARTIAL_ANNOTATION = "io.imgpack.partial"
#: Suffix added to a safetensors header layer's title, so generic tools never write a truncated model file.
HEADER_TITLE_SUFFIX = ".header"

# Limits.
#: Largest safetensors JSON header imgpack will parse (the safetensors library uses 100 MB).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: Largest tensor-blob header: one tensor needs under a kilobyte, so anything larger is not a tensor blob.
MAX_TENSOR_BLOB_HEADER = 64 * 1024
#: Largest manifest accepted from a registry or a file (distribution's default limit is 4 MiB).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: On an image index: the digest of the model manifest it carries in index-split form (registry/split.py, spec §2.8).
SPLIT_MANIFEST_ANNOTATION = "io.imgpack.split.manifest"
MAX_NAME_LENGTH = 1024
#: Longest path segment of a name, in UTF-8 bytes: the most ext4, XFS and APFS take as one file name (NTFS: 255
#: UTF-16 units, never more than the UTF-8 bytes).
MAX_SEGMENT_LENGTH = 255
