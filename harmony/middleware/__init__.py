"""
Middleware types, one module each.
"""
