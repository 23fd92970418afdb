"""imgpack.store"""
