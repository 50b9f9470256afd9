# -*- test-case-name: tests.unit.test_mw_path_filter -*-
"""
C{path_filter}: allow or deny requests by path (and method) before they
reach a backend.

Options::

    [middleware.fhir_paths.options]
    rules = [
      { deny = "/Patient/{id}/$everything" },
      { allow = "/Patient/{id}", methods = ["GET"] },
      { allow = "/Observation/{*rest}" },
      "/metadata",                       # a plain string is an allow rule
    ]
    default = "deny"        # when no rule matches; see below for the default
    deny_status = 404       # or 403

Rules are tried in order; the first whose pattern (and methods, when
given) matches decides.  When none matches, C{default} decides.  Without
C{default} a filter whose rules are all C{deny} allows the rest, and any
other filter denies it (a list of allowed paths, as in the Rust Harmony,
denies everything else).  A denied request is answered with
C{deny_status} and Harmony's JSON error body; the backend is not called.

Patterns (the path is the request path below the endpoint's
C{path_prefix}, so C{/Patient/1} for C{/fhir/Patient/1} on C{/fhir}):

  - C{/a/b}: literal segments, compared case-sensitively with the
    percent-decoded request segments;
  - C{{name}}: exactly one non-empty segment (a whole segment: C{a{id}}
    is an error);
  - C{{*name}}: the rest of the path, zero or more segments, last only
    (C{/Patient/{*rest}} matches C{/Patient}, C{/Patient/1/_history});
  - C{/}: the endpoint root only; C{*} alone: every path.

Empty segments and a trailing slash are ignored on both sides
(C{/Patient/} is C{/Patient}).  A request whose path has an encoded
slash or backslash inside a segment (C{%2F}, C{%5C}) is denied whatever
the rules say: a backend could read it as two segments.  C{methods}
lists upper-case methods; C{GET} also covers C{HEAD}.  Put C{cors} before
a filter that does not allow C{OPTIONS} preflights.
"""

import re
from urllib.parse import unquote

import attr
from zope.interface import implementer

from harmony.config.schema import Field, Int, Kind, ListOf, Options, Schema, Str, unknown_key_message
from harmony.errors import Forbidden, NotFound
from harmony.interfaces import IMiddleware
from harmony.logs import logger

log = logger("harmony.middleware.path_filter")

_PARAM = re.compile(r"^\{(\*?)([A-Za-z_][A-Za-z0-9_]*)\}$")
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@attr.s(frozen=True, slots=True)
class Pattern:
    """
    A compiled path pattern: C{matchers} is a tuple of C{("lit", text)},
    C{("param", name)} and a final C{("rest", name)}.
    """

    text = attr.ib()
    matchers = attr.ib()

    def match(self, segments):
        """
        @param segments: the decoded, non-empty request path segments.
        @return: C{None}, or the captured parameters (name -> value; the
            rest as a C{/}-joined string).
        """
        params = {}
        for i, (kind, value) in enumerate(self.matchers):
            if kind == "rest":
                if value is not None:
                    params[value] = "/".join(segments[i:])
                return params
            if i >= len(segments):
                return None
            if kind == "lit":
                if segments[i] != value:
                    return None
            else:
                params[value] = segments[i]
        return params if len(segments) == len(self.matchers) else None


def compile_pattern(text):
    """
    @return: a L{Pattern}.
    @raise ValueError: when C{text} is not a valid pattern.
    """
    if text == "*":
        return Pattern(text, (("rest", None),))
    if not text.startswith("/"):
        raise ValueError(f"pattern {text!r} must start with '/' (or be '*')")
    parts = text.split("/")[1:]
    if parts and parts[-1] == "":
        parts.pop()
    matchers = []
    names = set()
    for i, part in enumerate(parts):
        if part == "":
            raise ValueError(f"pattern {text!r} has an empty segment ('//')")
        m = _PARAM.match(part)
        if m is not None:
            star, name = m.groups()
            if name in names:
                raise ValueError(f"pattern {text!r} uses {{{name}}} twice")
            names.add(name)
            if star:
                if i != len(parts) - 1:
                    raise ValueError(f"pattern {text!r}: {{*{name}}} must be the last segment")
                matchers.append(("rest", name))
            else:
                matchers.append(("param", name))
        elif "{" in part or "}" in part:
            raise ValueError(
                f"pattern {text!r}: segment {part!r} is not a literal or a whole {{param}} / {{*rest}} "
                "(names are letters, digits and '_')"
            )
        else:
            matchers.append(("lit", part))
    return Pattern(text, tuple(matchers))


def _methods(values):
    out = set(values)
    if "GET" in out:
        out.add("HEAD")
    return frozenset(out)


_PATTERN = Str(nonempty=True)
_METHODS = ListOf(Str(nonempty=True, check=lambda m: None if _METHOD.match(m) else f"{m!r} is not a method"))


class Rules(Kind):
    """
    The C{rules} array: strings (allow rules, the Rust Harmony form) or
    tables with exactly one of C{allow} / C{deny} and optional C{methods}.
    Validates to a tuple of C{Options(action, pattern, methods)}.
    """

    label = "array of rules"

    def validate(self, value, where):
        if not isinstance(value, list):
            raise self.expected(value, where)
        if not value:
            raise where.error("at least one rule is required")
        return tuple(self._rule(item, where.child(i)) for i, item in enumerate(value))

    def _rule(self, item, where):
        if isinstance(item, str):
            return Options({"action": "allow", "pattern": self._pattern(item, where), "methods": None})
        if not isinstance(item, dict):
            raise where.error(f"expected a pattern string or a table with allow or deny, got {type(item).__name__}")
        for key in item:
            if key not in ("allow", "deny", "methods"):
                raise where.child(key).error(unknown_key_message(key, ("allow", "deny", "methods")))
        actions = [k for k in ("allow", "deny") if k in item]
        if len(actions) != 1:
            raise where.error("a rule needs exactly one of allow or deny")
        action = actions[0]
        pattern = _PATTERN.validate(item[action], where.child(action))
        self._pattern(pattern, where.child(action))
        methods = None
        if "methods" in item:
            methods = _METHODS.validate(item["methods"], where.child("methods"))
            methods = tuple(m.upper() for m in methods)
            if not methods:
                raise where.child("methods").error("must not be empty (leave it out to match every method)")
        return Options({"action": action, "pattern": pattern, "methods": methods})

    @staticmethod
    def _pattern(text, where):
        try:
            compile_pattern(text)
        except ValueError as e:
            raise where.error(str(e))
        return text


def _check(options, where):
    if options.deny_status not in (403, 404):
        raise where.child("deny_status").error(f"expected 403 or 404, got {options.deny_status}")


OPTIONS = Schema(
    {
        "rules": Field(Rules(), doc="ordered allow/deny rules; the first match decides"),
        "default": Field(
            Str(choices=("allow", "deny")), None, "when no rule matches (default: allow if every rule denies, else deny)"
        ),
        "deny_status": Field(Int(), 404, "status of a denied request: 404 or 403"),
    },
    check=_check,
)


@attr.s(frozen=True, slots=True)
class Rule:
    allow = attr.ib()
    pattern = attr.ib()
    methods = attr.ib()

    def matches(self, method, segments):
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.match(segments) is not None


def request_segments(path):
    """
    The decoded, non-empty segments of a relative request path, or
    C{None} when a segment decodes to something holding C{/} or C{\\}.
    """
    segments = []
    for raw in path.split("/"):
        if not raw:
            continue
        segment = unquote(raw) if "%" in raw else raw
        if "/" in segment or "\\" in segment:
            return None
        segments.append(segment)
    return segments


@implementer(IMiddleware)
class PathFilter:
    def __init__(self, name, options, context=None):
        self.name = name
        self.rules = tuple(
            Rule(
                r.action == "allow",
                compile_pattern(r.pattern),
                None if r.methods is None else _methods(r.methods),
            )
            for r in options.rules
        )
        default = options.default
        if default is None:
            default = "allow" if all(not r.allow for r in self.rules) else "deny"
        self.default_allow = default == "allow"
        self.error = NotFound if options.deny_status == 404 else Forbidden

    def allows(self, method, path):
        """
        C{True} when a request for C{path} (relative to the endpoint
        prefix) with C{method} may pass.
        """
        segments = request_segments(path)
        if segments is None:
            return False
        for rule in self.rules:
            if rule.matches(method, segments):
                return rule.allow
        return self.default_allow

    def request(self, envelope):
        details = envelope.details
        if self.allows(details.method.upper(), details.path):
            return None
        # The path may hold identifiers: it is not logged.
        log.debug("path_filter {middleware} denied a {method} request", middleware=self.name, method=details.method)
        raise self.error()

    def response(self, envelope, response):
        return None
