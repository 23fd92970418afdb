"""imgpack.runtime.zimage"""
