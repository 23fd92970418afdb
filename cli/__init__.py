"""imgpack.cli"""
