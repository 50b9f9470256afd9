# -*- test-case-name: tests.unit.test_jolt -*-
"""
C{default} (Java JOLT's Defaultr): add values where the input has none.

The spec mirrors the output: a key whose value is not an object is a
default for that key, written (a copy) when the key is missing or
C{null}; a key whose value is an object walks down, creating the object
(or, for C{"key[]"}, the array) when missing.  Keys: literals, C{*}
(every key already there, including ones defaulted by literal keys at the
same level), C{a|b} (those of the alternatives already there).  Literal
keys apply first, then C{|} keys (fewer alternatives first), then C{*}.
Under a C{"key[]"} entry the keys are array indexes (C{"2"}, C{"0|1"},
C{"*"}) and the array is padded with C{null}s to the highest literal
index.  A container of the wrong kind (an array where the spec has an
object) is left alone.  An input array at the top is defaulted with the
spec's keys as indexes (an error when they are not numbers); a C{null}
input is an empty object.
"""

from harmony.transforms.errors import SpecError, TransformError
from harmony.transforms.values import copy_json, parse_java_int, utf16_key

LITERAL, OR, STAR = 0, 1, 2


class _Key:
    def __init__(self, raw, spec, parent_is_array, where):
        self.where = where
        self.is_array = raw.endswith("[]")
        key = raw.replace("[]", "") if self.is_array else raw
        self.raw_key = key
        if "*" in key:
            if key != "*":
                raise SpecError(f"invalid key {raw!r}: '*' keys can only be '*'", where)
            self.op, self.keys = STAR, []
        elif "|" in key:
            self.op = OR
            self.keys = key.split("|")
            while len(self.keys) > 1 and self.keys[-1] == "":
                self.keys.pop()
        else:
            self.op, self.keys = LITERAL, [key]
        self.parent_is_array = parent_is_array
        if parent_is_array and self.op != STAR:
            try:
                self.indexes = [parse_java_int(k) for k in self.keys]
            except ValueError:
                raise SpecError(
                    f"keys under an array ('[]') entry must be array indexes, got {raw!r}", where
                ) from None
            if any(i < 0 for i in self.indexes):
                raise SpecError(f"array index {raw!r} can not be negative", where)
        self.children = None
        self.value = None
        self.max_index = -1
        if isinstance(spec, dict):
            self.children = _parse(spec, self.is_array, where)
            if self.is_array:
                for child in self.children:
                    if child.op == LITERAL:
                        self.max_index = max(self.max_index, child.indexes[0])
        else:
            self.value = spec

    def sort_key(self):
        if self.op == OR:
            return (1, len(self.keys), utf16_key(self.raw_key))
        return (0 if self.op == LITERAL else 2,)

    def new_container(self):
        return [] if self.is_array else {}

    def apply_children(self, container):
        if self.is_array and isinstance(container, list):
            if len(container) <= self.max_index:
                container.extend([None] * (self.max_index + 1 - len(container)))
        for child in self.children:
            child.apply(container)

    def apply(self, container):
        if self.parent_is_array:
            if not isinstance(container, list):
                return
            if self.op == LITERAL:
                targets = self.indexes
            elif self.op == STAR:
                targets = range(len(container))
            else:
                targets = [i for i in self.indexes if i < len(container)]
        else:
            if not isinstance(container, dict):
                return
            if self.op == LITERAL:
                targets = self.keys
            elif self.op == STAR:
                targets = list(container)
            else:
                targets = [k for k in self.keys if k in container]
        for target in targets:
            self._apply_to(container, target)

    def _apply_to(self, container, key):
        current = container[key] if not isinstance(container, dict) else container.get(key)
        if self.children is None:
            if current is None:
                container[key] = copy_json(self.value)
        else:
            if current is None:
                current = self.new_container()
                container[key] = current
            self.apply_children(current)


def _parse(spec, parent_is_array, where):
    keys = [_Key(raw, rhs, parent_is_array, where + (raw,)) for raw, rhs in spec.items()]
    keys.sort(key=_Key.sort_key)
    return keys


class Default:
    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise SpecError("a default spec must be an object")
        self.map_root = _Key("root", spec, False, ())
        try:
            self.array_root = _Key("root[]", spec, False, ())
        except SpecError:
            # Non-numeric top-level keys: fine unless the input is an array.
            self.array_root = None

    def apply(self, data, context=None):
        if data is None:
            data = {}
        if isinstance(data, list):
            if self.array_root is None:
                raise TransformError("this default spec can not handle an input that is an array at the top")
            self.array_root.apply_children(data)
        else:
            self.map_root.apply_children(data)
        return data
