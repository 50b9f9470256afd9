# -*- test-case-name: tests.unit.test_mw_json_extractor -*-
"""
C{json_extractor} (alias C{json}): copy values out of a JSON request body
into metadata (and, optionally, target details) for later middleware and
backends.

Options::

    [middleware.ids.options]
    metadata = { patient_ref = "subject.reference", codes = "code.coding[*].code" }
    target = { method = "$.action" }     # optional: path, method, query_string
    on_missing = "skip"                  # or "error": 400 when a value is missing

Values: a string is copied as is, a number or boolean as its JSON text
(C{3}, C{true}), an object or array as compact JSON.  C{null} counts as
missing.  A path that can select several values (it has a wildcard, or a
name meets an array) always gives a JSON array text (C{["a","b"]}).

Path syntax (L{JsonPath}, a JSONPath subset, also used by C{log_dump}):

  - an optional leading C{$} (the document root); C{$} alone is the root;
  - C{name} or C{.name}: a member of an object.  Names are runs of any
    characters except C{. [ ] * ' "}; use C{['a.b']} for other names;
  - C{[n]}: element C{n} of an array (negative counts from the end); a
    dotted all-digits segment (C{Value.0}) is an index on an array and a
    name on an object (DICOM JSON tags such as C{00100010} are names);
  - C{*} or C{[*]}: every member of an object / element of an array;
  - C{['name']} or C{["name"]}: a member with any characters in its name;
  - a name applied to an array applies to each of its elements (so
    C{entry.resource.id} collects the id of every entry).

No filters, slices, recursive descent or functions.  Paths are checked
at startup.

Which body: a JSON body (C{application/json}, C{*+json}, or no
Content-Type) is parsed with the envelope's C{parse_body} (under the
endpoint's content limits; it stays available, byte for byte, for the
backend); a body another middleware already parsed is read through its
parsed view, whatever its type.  Other bodies have no values.  A body
that cannot be parsed is answered with 400 (413 when over the size limit)
whatever C{on_missing} says.

With C{on_missing = "skip"} a missing value leaves its key unset; with
C{"error"} the request is answered with 400 naming the path (and nothing
is written).  Target values come from the client, so C{base_url} cannot
be set from a body, and a C{path} or C{query_string} that could change
the upstream URL's meaning (dot segments, a leading C{/}, C{?}, C{#},
spaces, control characters) or a C{method} that is not a token is a 400.
"""

import json
import re

from zope.interface import implementer

from harmony.config.schema import Field, MapOf, Options, Schema, Str, from_validator
from harmony.envelope import JSON_TYPES, media_type
from harmony.errors import BadRequest
from harmony.interfaces import IMiddleware

#: Metadata keys Harmony itself sets; a body must not overwrite them.
RESERVED_METADATA = frozenset({"pipeline", "endpoint", "protocol", "request_id"})

#: Target detail keys a body may set (never C{base_url}: the client would
#: choose the upstream host).
TARGET_KEYS = ("path", "method", "query_string")


class _Name:
    __slots__ = ("name",)
    multi = False

    def __init__(self, name):
        self.name = name

    def children(self, node, state):
        if isinstance(node, dict):
            if self.name in node:
                yield node, self.name, node[self.name]
        elif isinstance(node, list):
            if self.name.isdigit():
                index = int(self.name)
                if index < len(node):
                    yield node, index, node[index]
                return
            state["multi"] = True
            for item in node:
                yield from self.children(item, state)


class _Index:
    __slots__ = ("index",)
    multi = False

    def __init__(self, index):
        self.index = index

    def children(self, node, state):
        if isinstance(node, list) and -len(node) <= self.index < len(node):
            index = self.index % len(node)
            yield node, index, node[index]


class _Wild:
    __slots__ = ()
    multi = True

    def children(self, node, state):
        if isinstance(node, dict):
            for key, value in node.items():
                yield node, key, value
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield node, index, value


_NAME = re.compile(r"[^.\[\]*'\"]+")
_BRACKET = re.compile(r"\[(?:(\*)|(-?\d+)|'([^']*)'|\"([^\"]*)\")\]")


class JsonPath:
    """
    A compiled path over JSON values (see the module docstring for the
    syntax).

    @ivar text: the path as written.
    @raise ValueError: when the path is malformed.
    """

    def __init__(self, text):
        self.text = text
        self.steps = tuple(_parse(text))

    @property
    def is_root(self):
        return not self.steps

    def locate(self, document):
        """
        Where the path matches.

        @return: C{(matches, multi)}: C{matches} is a list of C{(container,
            key, value)} (C{container} is C{None} for the root itself);
            C{multi} is true when the path could select several values here
            (a wildcard, or a name projected over an array).
        """
        current = [(None, None, document)]
        state = {"multi": False}
        for step in self.steps:
            if step.multi:
                state["multi"] = True
            current = [child for _, _, node in current for child in step.children(node, state)]
            if not current:
                break
        return current, state["multi"]

    def find(self, document):
        """
        The values the path selects (a list).
        """
        return [value for _, _, value in self.locate(document)[0]]

    def __repr__(self):
        return f"JsonPath({self.text!r})"


def _parse(text):
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a JSON path must not be empty")
    if text != text.strip():
        raise ValueError(f"JSON path {text!r} has leading or trailing spaces")
    pos = 0
    if text.startswith("$"):
        pos = 1
        if pos == len(text):
            return
        if text[pos] == ".":
            pos += 1
            if pos == len(text):
                raise ValueError(f"JSON path {text!r} ends with '.'")
        elif text[pos] != "[":
            raise ValueError(f"JSON path {text!r}: expected '.' or '[' after '$'")
    first = True
    while pos < len(text):
        if text[pos] == "[":
            m = _BRACKET.match(text, pos)
            if m is None:
                raise ValueError(f"JSON path {text!r}: malformed bracket at position {pos}")
            star, index, single, double = m.groups()
            if star:
                yield _Wild()
            elif index is not None:
                yield _Index(int(index))
            else:
                name = single if single is not None else double
                if not name:
                    raise ValueError(f"JSON path {text!r}: empty name in brackets")
                yield _Name(name)
            pos = m.end()
        else:
            if not first:
                if text[pos] != ".":
                    raise ValueError(f"JSON path {text!r}: expected '.' or '[' at position {pos}")
                pos += 1
            if pos >= len(text):
                raise ValueError(f"JSON path {text!r} ends with '.'")
            if text[pos] == "*":
                pos += 1
                if pos < len(text) and text[pos] not in ".[":
                    raise ValueError(f"JSON path {text!r}: '*' must be a whole segment")
                yield _Wild()
            else:
                m = _NAME.match(text, pos)
                if m is None:
                    raise ValueError(f"JSON path {text!r}: expected a name at position {pos}")
                yield _Name(m.group(0))
                pos = m.end()
        first = False


def compile_path(text):
    """
    @return: a L{JsonPath}.
    @raise ValueError: when C{text} is malformed.
    """
    return JsonPath(text)


def render(value):
    """
    A JSON value as metadata text (strings unchanged, others as compact
    JSON).
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _check(options, where):
    for key in options.metadata:
        if not key.strip():
            raise where.child("metadata").child(key).error("metadata key must not be empty")
        if key in RESERVED_METADATA:
            raise where.child("metadata").child(key).error(
                f"metadata key {key!r} is set by Harmony and cannot be extracted from a body"
            )
    for key in options.target:
        if key == "base_url":
            raise where.child("target").child(key).error(
                "base_url cannot come from a request body (the client would choose the upstream host)"
            )
        if key not in TARGET_KEYS:
            raise where.child("target").child(key).error(
                f"unknown target detail {key!r} (expected one of {', '.join(TARGET_KEYS)})"
            )


_PATH = Str(nonempty=True, check=from_validator(compile_path))

OPTIONS = Schema(
    {
        "metadata": Field(MapOf(_PATH), Options(), "metadata key -> JSON path"),
        "target": Field(MapOf(_PATH), Options(), "target detail (path, method, query_string) -> JSON path"),
        "on_missing": Field(
            Str(choices=("skip", "error")), "skip", "a missing value: skip the key, or answer 400"
        ),
    },
    check=_check,
)

_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f#]")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _safe_target(key, value):
    """
    The target value, or C{None} when it could change the meaning of the
    upstream URL.
    """
    if key == "method":
        return value.upper() if _TOKEN.match(value) else None
    if _UNSAFE_TARGET.search(value):
        return None
    if key == "path":
        if "?" in value or value.startswith("/"):
            return None
        for segment in value.split("/"):
            if segment.lower().replace("%2e", ".") in (".", ".."):
                return None
    return value


def is_json(content_type):
    """
    C{True} for a JSON media type (or no Content-Type at all).
    """
    mtype = media_type(content_type)
    return not mtype or mtype in JSON_TYPES or mtype.endswith("+json")


@implementer(IMiddleware)
class JsonExtractor:
    """
    Copies values of the request's JSON body into C{metadata} and
    C{target}.  Without rules it does nothing (configurations written for
    the Rust Harmony, where the type had no options).
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.on_missing = options.on_missing
        self.metadata = tuple((key, compile_path(path)) for key, path in options.metadata.items())
        self.target = tuple((key, compile_path(path)) for key, path in options.target.items())

    def request(self, envelope):
        if not self.metadata and not self.target:
            return None
        if envelope.parsed:
            return self._extract(envelope.normalized, envelope)
        if not is_json(envelope.content_type):
            return self._extract(None, envelope)
        return envelope.parse_body().addCallback(self._extract, envelope)

    def _extract(self, document, envelope):
        found = {}
        for kind, rules in (("metadata", self.metadata), ("target", self.target)):
            for key, path in rules:
                value = self._value(document, path)
                if value is None:
                    if self.on_missing == "error":
                        raise BadRequest(f"Required JSON value missing: {path.text}")
                    continue
                if kind == "target":
                    value = _safe_target(key, value)
                    if value is None:
                        raise BadRequest(f"JSON value at {path.text} is not a valid {key}")
                found[(kind, key)] = value
        for (kind, key), value in found.items():
            if kind == "metadata":
                envelope.metadata[key] = value
            else:
                envelope.target[key] = value
        return None

    @staticmethod
    def _value(document, path):
        matches, multi = path.locate(document)
        values = [value for _, _, value in matches if value is not None]
        if not values:
            return None
        if multi:
            return render(values)
        return render(values[0])

    def response(self, envelope, response):
        return None

