"""imgpack.packager"""
