# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{cardinality} (Java JOLT's CardinalityTransform): make values single
(C{"ONE"}) or arrays (C{"MANY"}).

  - C{ONE}: an array becomes its first element (C{null} when empty);
    anything else stays.
  - C{MANY}: a non-array value becomes a one-element array, C{null}
    becomes C{[]}; an array stays.

Keys: literals, C{*} and star patterns, and C{"@"} inside an object spec
to change the value at that level itself before walking into it
(C{"photos": {"@": "MANY", "*": {...}}}).  No C{|}, C{&} or escapes.

Differences from Java JOLT (where Java fails with a Java exception):
a value inside an array can be changed (C{"items": {"*": "ONE"}}), an
C{"@"} at the top of the spec changes the whole input, and C{"@": "ONE"}
on a value that is not an array keeps walking into it (Java stops).
"""

from harmony.transforms.errors import SpecError
from harmony.transforms.paths import At, Literal, StarAll, StarRegex, StarSingle


def _element(key, where):
    if "@" in key:
        if key != "@":
            raise SpecError(f"invalid key {key!r}: '@' must be alone", where)
        return At()
    if key == "*":
        return StarAll()
    if "*" in key:
        return StarSingle(key) if key.count("*") == 1 else StarRegex(key)
    return Literal(key)


def _matches(element, key):
    if isinstance(element, Literal):
        return key == element.raw_key
    return element.string_match(key)


def _adjust(relationship, value):
    if relationship == "MANY":
        if isinstance(value, list):
            return value
        return [] if value is None else [value]
    if isinstance(value, list):
        return value[0] if value else None
    return value


class _Leaf:
    def __init__(self, key, rhs, where):
        self.element = _element(key, where)
        if rhs not in ("ONE", "MANY"):
            raise SpecError(f"invalid cardinality {rhs!r}: expected \"ONE\" or \"MANY\"", where)
        self.relationship = rhs

    def apply(self, key, value, container):
        if not _matches(self.element, key):
            return False
        new = _adjust(self.relationship, value)
        if new is not value:
            container[int(key) if isinstance(container, list) else key] = new
        return True


class _Composite:
    def __init__(self, key, spec, where):
        self.element = _element(key, where)
        if isinstance(self.element, At):
            raise SpecError("'@' key can not have children", where)
        self.special = None
        self.literals, self.computed = {}, []
        seen = set()
        for raw, rhs in spec.items():
            child_where = where + (raw,)
            child = _Composite(raw, rhs, child_where) if isinstance(rhs, dict) else _Leaf(raw, rhs, child_where)
            if child.element.canonical in seen:
                raise SpecError(f"duplicate key {child.element.canonical!r}", child_where)
            seen.add(child.element.canonical)
            if isinstance(child.element, At):
                self.special = child
            elif isinstance(child.element, Literal):
                self.literals[child.element.raw_key] = child
            else:
                self.computed.append(child)
        if not seen:
            raise SpecError("an empty object {} is not a valid cardinality spec value", where)
        self.computed.sort(key=lambda c: (-len(c.element.canonical), c.element.canonical))

    def apply(self, key, value, container):
        if not _matches(self.element, key):
            return False
        if self.special is not None:
            value = _adjust(self.special.relationship, value)
            if container is not None:
                container[int(key) if isinstance(container, list) else key] = value
        self.process(value)
        return True

    def process(self, value):
        if isinstance(value, dict):
            for key, child_value in list(value.items()):
                self._apply_key(key, child_value, value)
        elif isinstance(value, list):
            for index, child_value in enumerate(list(value)):
                self._apply_key(str(index), child_value, value)

    def _apply_key(self, key, value, container):
        child = self.literals.get(key)
        if child is not None:
            child.apply(key, value, container)
            return
        for child in self.computed:
            if child.apply(key, value, container):
                return


class Cardinality:
    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise SpecError("a cardinality spec must be an object")
        self.root = _Composite("root", spec, ())

    def apply(self, data, context=None):
        root = self.root
        if root.special is not None:
            data = _adjust(root.special.relationship, data)
        root.process(data)
        return data

