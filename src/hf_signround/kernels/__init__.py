"""Compute kernels for packed low-bit linear layers.

``reference`` holds the pure-torch definition that accelerated kernels must match.
"""
