# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{sort} (Java JOLT's Sortr): object keys sorted recursively, for
readability.  Keys starting with C{~} come first; otherwise ordinary
string order (UTF-16 code units, as Java).  Arrays keep their order (their
elements are sorted inside).  Takes no spec (a C{spec} given is ignored,
as in Java).
"""

from harmony.transforms.values import utf16_key


def _key(name):
    return (0 if name.startswith("~") else 1, utf16_key(name))


def sort_json(value):
    if isinstance(value, dict):
        return {k: sort_json(value[k]) for k in sorted(value, key=_key)}
    if isinstance(value, list):
        return [sort_json(v) for v in value]
    return value


class Sort:
    def __init__(self, spec=None):
        pass

    def apply(self, data, context=None):
        return sort_json(data)
