"""imgpack.architectures"""
