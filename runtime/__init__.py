"""imgpack.runtime"""
