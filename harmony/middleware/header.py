# -*- test-case-name: tests.unit.test_mw_header -*-
"""
C{header}: header rules for requests (before the backend) and responses
(on the way back).

Options::

    [middleware.headers.options.request]
    remove = ["X-Debug"]
    rename = { "X-Old-Name" = "X-New-Name" }
    set = { "X-Client" = "${metadata.client_id}", "X-Env" = "prod" }
    add = { "X-Tag" = ["a", "b"] }            # a string or an array

    [middleware.headers.options.response]
    set = { "Strict-Transport-Security" = "max-age=63072000" }
    remove = ["Server"]

On each side the operations run in this order: C{remove} (every value of
the header), C{rename} (every value moves to the new name, replacing any
header of that name; nothing happens when the header is absent), C{set}
(replaces every value), C{add} (appends a value, keeping existing ones).
Names are case-insensitive; a name may appear only once per side across
the four operations (rename sources and targets included).

Values are literal text with references to metadata::

    ${metadata.KEY}              the metadata value KEY (any characters but
                                 '}' and ':'; e.g. ${metadata.jwt.sub})
    ${metadata.KEY:-fallback}    ... or "fallback" when KEY is not set

On the response side C{metadata} is the request's metadata updated with
the response's.  When a referenced key is missing and has no fallback the
rule is skipped (the header is not set or added).  A value that is not a
valid header value once filled in (control characters such as CR/LF, or
characters outside ISO-8859-1) is skipped with a warning naming the header
(never the value).  Any other C{${...}} is a startup error (C{${VAR}}
environment references are replaced when the file is loaded, before this
middleware sees the value).  A C{$} not followed by an opening brace is
literal.

Hop-by-hop headers (C{Connection}, C{Keep-Alive}, C{Transfer-Encoding},
C{TE}, C{Trailer}, C{Upgrade}, C{Proxy-*}) and C{Content-Length} cannot
be set, added or be a rename target: Harmony never forwards them, so such
a rule is a startup error.
"""

import re

from zope.interface import implementer

from harmony.config.schema import Field, Kind, ListOf, MapOf, Options, Schema, Str, Table, Where
from harmony.http.headers import HOP_BY_HOP
from harmony.interfaces import IMiddleware
from harmony.logs import logger

log = logger("harmony.middleware.header")

#: Names a rule cannot produce: Harmony strips or recomputes them.
FORBIDDEN_TARGETS = HOP_BY_HOP | {"content-length"}

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REF = re.compile(r"\$\{([^{}]*)\}")
_METADATA_REF = re.compile(r"^metadata\.([^{}:]+?)(?::-(.*))?$", re.S)
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def valid_value(text):
    """
    C{True} when C{text} can be sent as a header value.
    """
    if _BAD_VALUE.search(text):
        return False
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


class Template:
    """
    A header value with C{${metadata.KEY}} / C{${metadata.KEY:-fallback}}
    references.

    @raise ValueError: for an unknown reference, an unclosed reference, or
        literal text that is not a valid header value.
    """

    def __init__(self, text):
        self.text = text
        parts = []
        pos = 0
        for m in _REF.finditer(text):
            parts.append(self._literal(text[pos : m.start()]))
            ref = _METADATA_REF.match(m.group(1))
            if ref is None:
                raise ValueError(
                    f"unknown reference ${{{m.group(1)}}} (only ${{metadata.KEY}} and ${{metadata.KEY:-fallback}})"
                )
            key, fallback = ref.groups()
            if fallback is not None:
                self._literal(fallback)
            parts.append((key, fallback))
            pos = m.end()
        parts.append(self._literal(text[pos:]))
        self.parts = tuple(p for p in parts if p != "")
        self.static = all(isinstance(p, str) for p in self.parts)

    @staticmethod
    def _literal(text):
        if "${" in text:
            raise ValueError("unclosed '${' (write ${metadata.KEY})")
        if not valid_value(text):
            raise ValueError("value has control characters or characters outside ISO-8859-1")
        return text

    def render(self, metadata):
        """
        @return: the value, or C{None} when a referenced key is missing
            (without fallback).
        """
        if self.static:
            return "".join(self.parts)
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            key, fallback = part
            value = metadata.get(key)
            if value is None:
                if fallback is None:
                    return None
                value = fallback
            out.append(str(value))
        return "".join(out)


def _check_template(text):
    try:
        Template(text)
    except ValueError as e:
        return str(e)
    return None


def _check_name(name):
    if not _TOKEN.match(name):
        return f"{name!r} is not a valid header name"
    return None


class StrOrList(Kind):
    """
    A string or an array of strings; validates to a tuple.
    """

    label = "string or array of strings"

    def __init__(self, item):
        self.item = item
        self._list = ListOf(item)

    def validate(self, value, where):
        if isinstance(value, str):
            return (self.item.validate(value, where),)
        if isinstance(value, list):
            if not value:
                raise where.error("must not be empty")
            return self._list.validate(value, where)
        raise self.expected(value, where)


_VALUE = Str(check=_check_template)
_NAME = Str(nonempty=True, check=_check_name)


def _check_side(options, where):
    seen = {}

    def claim(name, w):
        problem = _check_name(name)
        if problem:
            raise w.error(problem)
        lname = name.lower()
        if lname in seen:
            raise w.error(f"header {name!r} already has a rule on this side ({seen[lname]})")
        seen[lname] = ".".join(str(k) for k in w.keypath[-2:])

    def target(name, w):
        if name.lower() in FORBIDDEN_TARGETS:
            raise w.error(f"{name!r} is a hop-by-hop header (or Content-Length): Harmony never forwards it")

    for i, name in enumerate(options.remove):
        claim(name, where.child("remove").child(i))
    for source, dest in options.rename.items():
        w = where.child("rename").child(source)
        claim(source, w)
        target(dest, w)
        claim(dest, w)
    for op in ("set", "add"):
        for name in getattr(options, op):
            w = where.child(op).child(name)
            target(name, w)
            claim(name, w)


SIDE = Schema(
    {
        "remove": Field(ListOf(_NAME), (), "header names to remove"),
        "rename": Field(MapOf(_NAME), Options(), "old name -> new name"),
        "set": Field(MapOf(_VALUE), Options(), "name -> value (replaces)"),
        "add": Field(MapOf(StrOrList(_VALUE)), Options(), "name -> value or values (appends)"),
    },
    check=_check_side,
)

_EMPTY_SIDE = SIDE.validate({}, Where(None))

OPTIONS = Schema(
    {
        "request": Field(Table(SIDE), _EMPTY_SIDE, "rules for the request sent to the backend"),
        "response": Field(Table(SIDE), _EMPTY_SIDE, "rules for the response sent to the client"),
    }
)


class HeaderRules:
    """
    One side's compiled rules; L{apply} changes a L{harmony.envelope.Headers}
    in place.
    """

    def __init__(self, options):
        self.remove = tuple(options.remove)
        self.rename = tuple(options.rename.items())
        self.set = tuple((name, Template(value)) for name, value in options.set.items())
        self.add = tuple((name, Template(v)) for name, values in options.add.items() for v in values)

    def __bool__(self):
        return bool(self.remove or self.rename or self.set or self.add)

    def apply(self, headers, metadata, middleware=""):
        for name in self.remove:
            headers.remove(name)
        for source, dest in self.rename:
            values = headers.get_all(source)
            if values:
                headers.remove(source)
                headers.remove(dest)
                for value in values:
                    headers.add(dest, value)
        for name, template in self.set:
            value = self._value(template, metadata, name, middleware)
            if value is not None:
                headers.set(name, value)
        for name, template in self.add:
            value = self._value(template, metadata, name, middleware)
            if value is not None:
                headers.add(name, value)

    @staticmethod
    def _value(template, metadata, name, middleware):
        value = template.render(metadata)
        if value is None or template.static or valid_value(value):
            return value
        log.warn(
            "header {middleware}: the value for {header} is not a valid header value; not sent",
            middleware=middleware,
            header=name,
        )
        return None


@implementer(IMiddleware)
class HeaderMiddleware:
    """
    Applies the C{request} rules in the request hook and the C{response}
    rules in the response hook.
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.request_rules = HeaderRules(options.request)
        self.response_rules = HeaderRules(options.response)

    def request(self, envelope):
        if self.request_rules:
            self.request_rules.apply(envelope.details.headers, envelope.metadata, self.name)
        return None

    def response(self, envelope, response):
        if self.response_rules:
            metadata = envelope.metadata
            if response.metadata:
                metadata = dict(metadata)
                metadata.update(response.metadata)
            self.response_rules.apply(response.headers, metadata, self.name)
        return None
