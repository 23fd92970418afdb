"""imgpack.runtime.common"""
