"""imgpack.registry"""
