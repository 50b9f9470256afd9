# -*- test-case-name: tests.unit.test_mw_cors -*-
"""
C{cors}: Cross-Origin Resource Sharing (Fetch standard, "CORS protocol").

Options::

    [middleware.cors.options]
    allowed_origins = ["https://viewer.example.org"]   # or ["*"] (default)
    allowed_methods = ["GET", "POST"]       # default: GET HEAD POST PUT PATCH DELETE
    allowed_headers = ["authorization", "content-type"]   # default ["*"]: any requested
    expose_headers = ["Location", "ETag"]   # default: none
    max_age = 600                           # seconds a preflight may be cached; default: not sent
    allow_credentials = false               # true forbids "*" origins and expose_headers

Origins are compared exactly (scheme, host and port; case-insensitive,
default ports ignored).  A preflight (C{OPTIONS} with C{Origin} and
C{Access-Control-Request-Method}) is answered here with 204 and the
C{Access-Control-Allow-*} headers; it never reaches the backend.  A
preflight from an origin that is not allowed, or asking for a method or
header that is not allowed, gets 403.  Other requests go on to the
backend; their responses get C{Access-Control-Allow-Origin} (and
C{-Allow-Credentials}, C{-Expose-Headers}) when the origin is allowed, and
C{Vary: Origin} whenever the answer depends on the origin (always, except
with C{"*"} and no credentials, where every origin gets C{*}).
C{Access-Control-*} headers from the backend are replaced: the gateway's
policy is the one clients see.

L{CorsPolicy} is the protocol-neutral core (no envelopes), for endpoints
that answer CORS themselves (DICOMweb).
"""

import re

from zope.interface import implementer

from harmony.config.schema import Bool, Field, Int, ListOf, Schema, Str
from harmony.envelope import ResponseEnvelope
from harmony.errors import Forbidden
from harmony.interfaces import IMiddleware

DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

#: Request headers a browser may send without asking (Fetch "CORS-safelisted").
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language"})

#: Response headers this policy owns.
CORS_RESPONSE_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ORIGIN = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>[^/?#@:\[\]\s]+|\[[0-9a-f:.]+\])(?::(?P<port>\d{1,5}))?$"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin):
    """
    The canonical form of a serialized origin (lower case, default port
    dropped), or C{None} when C{origin} is not one (C{"null"}, a URL with a
    path, ...).
    """
    m = _ORIGIN.match(origin.strip().lower())
    if m is None:
        return None
    scheme, host, port = m.group("scheme", "host", "port")
    if port is not None:
        port = int(port)
        if port > 65535:
            return None
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _check_origin(origin):
    if origin == "*":
        return None
    if normalize_origin(origin) is None:
        return (
            f"{origin!r} is not an origin: write scheme://host[:port] without a path or a trailing slash, or '*'"
        )
    return None


def _check_token(kind, star=False):
    def check(value):
        if star and value == "*":
            return None
        if not _TOKEN.match(value):
            return f"{value!r} is not a valid {kind}"
        return None

    return check


def _check(options, where):
    origins = options.allowed_origins
    if not origins:
        raise where.child("allowed_origins").error("at least one origin (or '*') is required")
    if "*" in origins and len(origins) > 1:
        raise where.child("allowed_origins").error("'*' allows every origin: list it alone")
    if options.allow_credentials:
        if "*" in origins:
            raise where.child("allowed_origins").error(
                "'*' cannot be used with allow_credentials = true: list the allowed origins"
            )
        if "*" in options.expose_headers:
            raise where.child("expose_headers").error(
                "'*' is not a wildcard for credentialed requests: list the headers"
            )
    if not options.allowed_methods:
        raise where.child("allowed_methods").error("at least one method is required")
    seen = {}
    for i, origin in enumerate(origins):
        canonical = normalize_origin(origin) if origin != "*" else "*"
        if canonical in seen:
            raise where.child("allowed_origins").child(i).error(
                f"{origin!r} is the same origin as {seen[canonical]!r}"
            )
        seen[canonical] = origin


OPTIONS = Schema(
    {
        "allowed_origins": Field(
            ListOf(Str(nonempty=True, check=_check_origin)), ("*",), "origins allowed, or ['*']"
        ),
        "allowed_methods": Field(
            ListOf(Str(nonempty=True, check=_check_token("method")), unique=True), DEFAULT_METHODS
        ),
        "allowed_headers": Field(
            ListOf(Str(nonempty=True, check=_check_token("header name", star=True)), unique=True),
            ("*",),
            "request headers allowed; '*' = any requested",
        ),
        "expose_headers": Field(
            ListOf(Str(nonempty=True, check=_check_token("header name", star=True)), unique=True),
            (),
            "response headers scripts may read",
        ),
        "max_age": Field(Int(min=0, max=86400), None, "seconds a preflight result may be cached"),
        "allow_credentials": Field(Bool(), False, "allow cookies / HTTP authentication"),
    },
    check=_check,
)


class CorsRejected(Exception):
    """
    A preflight that must not be allowed; C{reason} is client-safe.
    """

    def __init__(self, reason):
        self.reason = reason
        super().__init__(reason)


def add_vary(headers, *names):
    """
    Add C{names} to a L{harmony.envelope.Headers}' C{Vary}, keeping what
    is there (C{Vary: *} stays as it is).
    """
    present = [v.strip() for value in headers.get_all("Vary") for v in value.split(",") if v.strip()]
    if "*" in present:
        return
    lower = {v.lower() for v in present}
    added = [n for n in names if n.lower() not in lower]
    if added:
        headers.set("Vary", ", ".join(present + added))


class CorsPolicy:
    """
    The CORS decisions, free of envelopes and Twisted: give it the
    request's C{Origin} (and preflight headers), get back the response
    headers as C{(name, value)} pairs.

    @param allowed_origins: serialized origins, or C{("*",)}.
    @param allowed_methods: methods a cross-origin request may use.
    @param allowed_headers: request header names allowed, or C{("*",)}
        for any the client asks for.
    @param expose_headers: response headers scripts may read.
    @param max_age: seconds a preflight may be cached, or C{None}.
    @param allow_credentials: send C{Access-Control-Allow-Credentials}.
    """

    def __init__(
        self,
        allowed_origins=("*",),
        allowed_methods=DEFAULT_METHODS,
        allowed_headers=("*",),
        expose_headers=(),
        max_age=None,
        allow_credentials=False,
    ):
        self.any_origin = "*" in allowed_origins
        if self.any_origin and allow_credentials:
            raise ValueError("'*' origins cannot be used with credentials")
        self.origins = frozenset(normalize_origin(o) for o in allowed_origins if o != "*")
        self.methods = tuple(m.upper() for m in allowed_methods)
        self._method_set = frozenset(self.methods)
        self.any_header = "*" in allowed_headers
        self.headers = frozenset(h.lower() for h in allowed_headers if h != "*")
        self.expose_headers = tuple(expose_headers)
        self.max_age = max_age
        self.allow_credentials = allow_credentials

    @classmethod
    def from_options(cls, options):
        """
        A policy from options validated by L{OPTIONS}.
        """
        return cls(
            allowed_origins=options.allowed_origins,
            allowed_methods=options.allowed_methods,
            allowed_headers=options.allowed_headers,
            expose_headers=options.expose_headers,
            max_age=options.max_age,
            allow_credentials=options.allow_credentials,
        )

    @property
    def varies_by_origin(self):
        """
        C{True} when responses differ by C{Origin} (so caches need
        C{Vary: Origin}).
        """
        return not self.any_origin

    def origin_allowed(self, origin):
        if not origin:
            return False
        if self.any_origin:
            return True
        return normalize_origin(origin) in self.origins

    @staticmethod
    def is_preflight(method, origin, request_method):
        """
        C{True} for a CORS preflight: C{OPTIONS} with C{Origin} and
        C{Access-Control-Request-Method}.
        """
        return method.upper() == "OPTIONS" and bool(origin) and bool(request_method)

    def _allow_origin(self, origin):
        if self.any_origin and not self.allow_credentials:
            return "*"
        return origin

    def preflight_headers(self, origin, request_method, request_headers=""):
        """
        The headers of a successful preflight response.

        @param request_headers: the C{Access-Control-Request-Headers} value.
        @raise CorsRejected: when the origin, the method or a header is not
            allowed.
        """
        if not self.origin_allowed(origin):
            raise CorsRejected("CORS preflight rejected: origin not allowed")
        method = request_method.strip().upper()
        if method not in self._method_set:
            raise CorsRejected("CORS preflight rejected: method not allowed")
        asked = [h.strip().lower() for h in (request_headers or "").split(",") if h.strip()]
        if not self.any_header:
            for h in asked:
                if h not in self.headers and h not in SAFELISTED_HEADERS:
                    raise CorsRejected("CORS preflight rejected: header not allowed")
        out = [("Access-Control-Allow-Origin", self._allow_origin(origin))]
        if self.allow_credentials:
            out.append(("Access-Control-Allow-Credentials", "true"))
        out.append(("Access-Control-Allow-Methods", ", ".join(self.methods)))
        if asked:
            out.append(("Access-Control-Allow-Headers", ", ".join(asked)))
        if self.max_age is not None:
            out.append(("Access-Control-Max-Age", str(self.max_age)))
        return out

    def response_headers(self, origin):
        """
        The CORS headers of an actual (not preflight) response: empty when
        C{origin} is missing or not allowed.
        """
        if not self.origin_allowed(origin):
            return []
        out = [("Access-Control-Allow-Origin", self._allow_origin(origin))]
        if self.allow_credentials:
            out.append(("Access-Control-Allow-Credentials", "true"))
        if self.expose_headers:
            out.append(("Access-Control-Expose-Headers", ", ".join(self.expose_headers)))
        return out

    def apply(self, headers, origin):
        """
        Put the CORS headers of an actual response for C{origin} into a
        L{harmony.envelope.Headers}, replacing any C{Access-Control-*}
        already there, and add C{Vary: Origin} when needed.
        """
        for name in CORS_RESPONSE_HEADERS:
            headers.remove(name)
        for name, value in self.response_headers(origin):
            headers.add(name, value)
        if self.varies_by_origin:
            add_vary(headers, "Origin")

    def preflight_vary(self):
        """
        The C{Vary} names of a preflight response.
        """
        names = ["Access-Control-Request-Method", "Access-Control-Request-Headers"]
        return (["Origin"] if self.varies_by_origin else []) + names


@implementer(IMiddleware)
class CorsMiddleware:
    """
    Answers preflights in the request hook (204, or 403) and adds CORS
    headers to other responses in the response hook.
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.policy = CorsPolicy.from_options(options)

    def request(self, envelope):
        headers = envelope.details.headers
        origin = headers.get("Origin")
        request_method = headers.get("Access-Control-Request-Method")
        if not self.policy.is_preflight(envelope.details.method, origin, request_method):
            return None
        try:
            out = self.policy.preflight_headers(
                origin, request_method, ", ".join(headers.get_all("Access-Control-Request-Headers"))
            )
        except CorsRejected as e:
            raise Forbidden(e.reason)
        response = ResponseEnvelope(status=204, headers=out)
        add_vary(response.headers, *self.policy.preflight_vary())
        return response

    def response(self, envelope, response):
        self.policy.apply(response.headers, envelope.details.headers.get("Origin"))
        return None
