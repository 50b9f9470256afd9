"""
Backend service types, one module each.
"""
