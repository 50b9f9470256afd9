"""
HTTP side: routing, request/envelope adapter, Klein site per network.
"""
