# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{remove} (Java JOLT's Removr): delete what the spec names.

Spec values are C{""} (remove this key) or an object (walk down).  Keys:
literals, C{*} and star patterns (C{rating_*}, several stars), C{a|b}.
On arrays, a numeric key removes that index and C{*} every element (or
walks into each); indexes are removed from the highest down, so C{"0"}
and C{"3"} remove the original elements 0 and 3.  Keys are taken
literally: no escapes, no C{&}/C{@}/C{$}.
"""

from harmony.transforms.errors import SpecError
from harmony.transforms.paths import Literal, StarAll, StarDouble, StarRegex, StarSingle, split_alternatives
from harmony.transforms.values import parse_java_int


def _element(key):
    if key == "*":
        return StarAll()
    stars = key.count("*")
    if stars == 1:
        return StarSingle(key)
    if stars == 2:
        return StarDouble(key)
    if stars > 2:
        return StarRegex(key)
    return Literal(key)


def _index(element):
    try:
        index = parse_java_int(element.raw_key)
    except ValueError:
        return None
    return index if index >= 0 else None


class _Node:
    def __init__(self, key, spec, where):
        self.element = _element(key)
        self.children = None
        if isinstance(spec, dict):
            self.children = []
            for raw, rhs in spec.items():
                for alternative in split_alternatives(raw):
                    self.children.append(_Node(alternative, rhs, where + (raw,)))
        elif not (isinstance(spec, str) and not spec.strip()):
            raise SpecError(f"invalid remove value {spec!r}: expected \"\" or an object", where)

    # Leaf behaviour: what to remove from a container.

    def keys_to_remove(self, mapping):
        element = self.element
        if isinstance(element, Literal):
            return [element.raw_key] if element.raw_key in mapping else []
        return [key for key in mapping if element.string_match(key)]

    def indexes_to_remove(self, items):
        element = self.element
        if isinstance(element, Literal):
            index = _index(element)
            return [index] if index is not None and index < len(items) else []
        if isinstance(element, StarAll):
            return list(range(len(items)))
        return []

    # Composite behaviour: walk down.

    def walk_map(self, mapping):
        element = self.element
        if isinstance(element, Literal):
            if element.raw_key in mapping:
                _process(self.children, mapping[element.raw_key])
        else:
            for key, value in list(mapping.items()):
                if element.string_match(key):
                    _process(self.children, value)

    def walk_list(self, items):
        element = self.element
        if isinstance(element, Literal):
            index = _index(element)
            if index is not None and index < len(items):
                _process(self.children, items[index])
        elif isinstance(element, StarAll):
            for value in list(items):
                _process(self.children, value)


def _process(children, value):
    if isinstance(value, list):
        doomed = set()
        for child in children:
            if child.children is None:
                doomed.update(child.indexes_to_remove(value))
            else:
                child.walk_list(value)
        for index in sorted(doomed, reverse=True):
            del value[index]
    elif isinstance(value, dict):
        doomed = []
        for child in children:
            if child.children is None:
                doomed.extend(child.keys_to_remove(value))
            else:
                child.walk_map(value)
        for key in doomed:
            value.pop(key, None)


class Remove:
    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise SpecError("a remove spec must be an object")
        self.root = _Node("root", spec, ())

    def apply(self, data, context=None):
        _process(self.root.children, data)
        return data
