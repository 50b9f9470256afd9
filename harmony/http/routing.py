# -*- test-case-name: tests.unit.test_routing -*-
"""
The HTTP route table of one network.

Rules (DESIGN.md): the longest C{path_prefix} wins; fixed routes (an
endpoint that serves only some paths under its prefix) beat a shorter
catch-all; the same prefix twice on a network is a startup error naming
both pipelines; C{"/"} is a valid catch-all.  No route: 404; a route
without that method: 405.
"""

import attr

from harmony.config.errors import ConfigError
from harmony.errors import BadRequest, MethodNotAllowed, NotFound

ALL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def normalize_prefix(prefix):
    """
    C{"api/"} -> C{"/api"}; C{"/"} stays C{"/"}.
    """
    prefix = "/" + prefix.strip("/")
    return prefix


def check_prefix(prefix):
    """
    A schema check for C{path_prefix} values.
    """
    if not prefix.startswith("/"):
        return f'must start with "/", got "{prefix}"'
    if "?" in prefix or "#" in prefix or any(s in (".", "..") for s in prefix.split("/")):
        return f'must be a plain path, got "{prefix}"'
    return None


@attr.s(frozen=True)
class Route:
    """
    An endpoint's claim on a network's URL space.

    @ivar prefix: normalised path prefix.
    @ivar methods: the methods served.
    @ivar match: C{None} for a catch-all under the prefix, or a callable
        C{(method, relative_path) -> bool} for fixed routes (the endpoint
        serves only the paths it recognises; others fall through to a
        shorter catch-all).
    """

    prefix = attr.ib(converter=normalize_prefix)
    endpoint = attr.ib()
    pipeline = attr.ib()
    methods = attr.ib(default=ALL_METHODS, converter=frozenset)
    match = attr.ib(default=None)

    def relative(self, path):
        """
        The path relative to the prefix (no leading slash), or C{None} if
        C{path} is not under the prefix.
        """
        if self.prefix == "/":
            return path.lstrip("/")
        if path == self.prefix:
            return ""
        if path.startswith(self.prefix + "/"):
            return path[len(self.prefix) + 1 :]
        return None


def has_dot_segments(path):
    """
    C{True} when a path contains C{.} or C{..} segments (also
    percent-encoded), which a gateway must not pass on.
    """
    for segment in path.split("/"):
        s = segment.lower().replace("%2e", ".")
        if s in (".", ".."):
            return True
    return False


class RouteTable:
    """
    Routes of one network, resolved longest prefix first.
    """

    def __init__(self, network):
        self.network = network
        self._routes = []

    def add(self, route):
        """
        @raise ConfigError: when another pipeline's endpoint already has
            this prefix with a catch-all route on this network.
        """
        for other in self._routes:
            if other.prefix == route.prefix and (other.match is None or route.match is None):
                raise ConfigError(
                    f"route conflict on network {self.network!r}: path_prefix {route.prefix!r} is used by "
                    f"endpoint {other.endpoint.name!r} (pipeline {other.pipeline!r}) and "
                    f"endpoint {route.endpoint.name!r} (pipeline {route.pipeline!r})",
                    keypath=("network", self.network),
                )
        self._routes.append(route)
        # Longest prefix first; fixed routes before a catch-all of equal length.
        self._routes.sort(key=lambda r: (-len(r.prefix), r.match is None))

    @property
    def routes(self):
        return tuple(self._routes)

    def owner(self, path):
        """
        The route whose prefix covers C{path} (longest first), whatever the
        method: the endpoint that renders errors found before a route is
        chosen (e.g. a FHIR endpoint answers with an OperationOutcome).

        @return: a route or C{None}.
        """
        for route in self._routes:
            if route.relative(path) is not None:
                return route
        return None

    def resolve(self, method, path):
        """
        Find the route for a request.

        @param path: the raw request path (no query).
        @return: C{(route, relative_path)}.
        @raise NotFound: no route.
        @raise MethodNotAllowed: routes exist for the path, not for C{method}.
        @raise BadRequest: the path has dot segments.
        """
        if has_dot_segments(path):
            raise BadRequest("Path must not contain '.' or '..' segments")
        allowed = set()
        for route in self._routes:
            rel = route.relative(path)
            if rel is None:
                continue
            if route.match is not None:
                served = [m for m in route.methods if route.match(m, rel)]
                if method in served:
                    return route, rel
                allowed.update(served)
                continue
            if method in route.methods:
                return route, rel
            allowed.update(route.methods)
            # A catch-all claims the whole subtree: stop looking.
            if route.match is None:
                break
        if allowed:
            raise MethodNotAllowed(sorted(allowed))
        raise NotFound("No route for this path")
