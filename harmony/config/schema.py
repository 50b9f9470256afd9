# -*- test-case-name: tests.unit.test_config -*-
"""
A small declarative schema language for TOML tables.

A L{Schema} maps keys to L{Field}s; validating a table returns frozen
L{Options} (a read-only mapping with attribute access).  Errors are
L{ConfigError}s naming the file and key path; unknown keys are errors with
a "did you mean" hint; legacy keys are accepted with a deprecation warning.
Service and middleware types declare their options with the same language.
"""

import difflib
from collections.abc import Mapping

from harmony.config.errors import ConfigError

REQUIRED = object()


class Options(Mapping):
    """
    Frozen validated options: a read-only mapping with attribute access.
    """

    __slots__ = ("_data",)

    def __init__(self, data=None):
        object.__setattr__(self, "_data", dict(data or {}))

    def __getattr__(self, name):
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("Options are frozen")

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __hash__(self):
        return hash(tuple(sorted(self._data.items(), key=lambda kv: kv[0])))

    def __repr__(self):
        return f"Options({self._data!r})"


class Where:
    """
    Where a value sits: file, key path, and the warnings collector.
    """

    def __init__(self, file, keypath=(), warnings=None, origins=None):
        self.file = file
        self.keypath = tuple(keypath)
        self.warnings = warnings if warnings is not None else []
        self.origins = origins or {}

    def child(self, key, file=None):
        return Where(file or self.file, self.keypath + (key,), self.warnings, self.origins)

    def error(self, message):
        return ConfigError(message, self.file, self.keypath)

    def warn(self, message):
        self.warnings.append(str(ConfigError(message, self.file, self.keypath)))

    @property
    def key(self):
        return ".".join(self.keypath)


def _describe(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


class Kind:
    """
    A value kind: C{validate(value, where)} returns the clean value.
    """

    label = "value"

    def validate(self, value, where):
        raise NotImplementedError

    def expected(self, value, where):
        return where.error(f"expected {self.label}, got {_describe(value)}")


class Str(Kind):
    label = "string"

    def __init__(self, nonempty=False, choices=None, lower=False, check=None):
        self.nonempty = nonempty
        self.choices = tuple(choices) if choices else None
        self.lower = lower
        self.check = check

    def validate(self, value, where):
        if not isinstance(value, str):
            raise self.expected(value, where)
        if self.lower:
            value = value.lower()
        if self.nonempty and not value.strip():
            raise where.error("must not be empty")
        if self.choices is not None and value not in self.choices:
            raise where.error(
                f"expected one of {', '.join(self.choices)}, got {_describe(value)}"
            )
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise where.error(problem)
        return value


def from_validator(validate):
    """
    A C{Str(check=...)} function from a validator that raises C{ValueError}
    (the error's text becomes the configuration error's).
    """

    def check(value):
        try:
            validate(value)
        except ValueError as e:
            return str(e)
        return None

    return check


class Int(Kind):
    label = "integer"

    def __init__(self, min=None, max=None):
        self.min = min
        self.max = max

    def validate(self, value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.expected(value, where)
        if self.min is not None and value < self.min:
            raise where.error(f"must be at least {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise where.error(f"must be at most {self.max}, got {value}")
        return value


class Number(Int):
    label = "number"

    def validate(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.expected(value, where)
        if self.min is not None and value < self.min:
            raise where.error(f"must be at least {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise where.error(f"must be at most {self.max}, got {value}")
        return float(value)


class Bool(Kind):
    label = "boolean"

    def validate(self, value, where):
        if not isinstance(value, bool):
            raise self.expected(value, where)
        return value


class ListOf(Kind):
    def __init__(self, item, unique=False):
        self.item = item
        self.unique = unique
        self.label = f"array of {item.label}"

    def validate(self, value, where):
        if not isinstance(value, list):
            raise self.expected(value, where)
        out = []
        for i, v in enumerate(value):
            clean = self.item.validate(v, where.child(i))
            if self.unique and clean in out:
                raise where.child(i).error(f"{_describe(clean)} is listed twice")
            out.append(clean)
        return tuple(out)


class Table(Kind):
    label = "table"

    def __init__(self, schema):
        self.schema = schema

    def validate(self, value, where):
        if not isinstance(value, dict):
            raise self.expected(value, where)
        return self.schema.validate(value, where)


class AnyTable(Kind):
    """
    A table whose content a later stage validates (service options).
    """

    label = "table"

    def validate(self, value, where):
        if not isinstance(value, dict):
            raise self.expected(value, where)
        return value


class MapOf(Kind):
    """
    A table of named entries (C{[network.<name>]}); each entry's file comes
    from C{where.origins[(table, name)]} when it was merged from a
    pipelines file.
    """

    label = "table"

    def __init__(self, item, table=None):
        self.item = item
        self.table = table

    def validate(self, value, where):
        if not isinstance(value, dict):
            raise self.expected(value, where)
        out = {}
        for name, v in value.items():
            file = where.origins.get((self.table, name)) if self.table else None
            out[name] = self.item.validate(v, where.child(name, file))
        return Options(out)


class Field:
    """
    One key of a schema.

    @param kind: a L{Kind}.
    @param default: the default, or L{REQUIRED}.
    @param doc: one line for the docs.
    """

    def __init__(self, kind, default=REQUIRED, doc=""):
        self.kind = kind
        self.default = default
        self.doc = doc


class Schema:
    """
    Keys -> L{Field}s, plus accepted legacy keys (key -> deprecation hint).
    """

    def __init__(self, fields, legacy=None, check=None):
        self.fields = dict(fields)
        self.legacy = dict(legacy or {})
        self.check = check

    def extend(self, fields, legacy=None):
        """
        A new schema with more fields.
        """
        merged = dict(self.fields)
        merged.update(fields)
        leg = dict(self.legacy)
        leg.update(legacy or {})
        return Schema(merged, leg, self.check)

    def validate(self, data, where):
        if not isinstance(data, dict):
            raise where.error(f"expected table, got {_describe(data)}")
        out = {}
        for key, value in data.items():
            if key in self.fields:
                out[key] = self.fields[key].kind.validate(value, where.child(key))
            elif key in self.legacy:
                where.child(key).warn(f"deprecated legacy key, ignored ({self.legacy[key]})")
            else:
                raise where.child(key).error(unknown_key_message(key, self.fields))
        for key, field in self.fields.items():
            if key not in out:
                if field.default is REQUIRED:
                    raise where.child(key).error("required key is missing")
                out[key] = field.default
        options = Options(out)
        if self.check is not None:
            self.check(options, where)
        return options


def unknown_key_message(key, known):
    message = f"unknown key {_describe(key)}"
    hint = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    if hint:
        message += f" (did you mean {_describe(hint[0])}?)"
    return message
