"""imgpack.conformance"""
