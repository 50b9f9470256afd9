"""
Endpoint service types, one module each.
"""
