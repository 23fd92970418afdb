"""imgpack.server"""
