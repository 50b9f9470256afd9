# -*- test-case-name: tests.unit.test_registry -*-
"""
C{passthru}: a middleware that changes nothing (and C{connect}, accepted
for configurations written for the Rust Harmony).
"""

from zope.interface import implementer

from harmony.interfaces import IMiddleware


@implementer(IMiddleware)
class Passthru:
    def __init__(self, name, options=None, context=None):
        self.name = name

    def request(self, envelope):
        return None

    def response(self, envelope, response):
        return None
