"""
Tests for L{harmony.http.routing}.
"""

from twisted.trial.unittest import SynchronousTestCase

from _fakes import FakeEndpoint
from harmony.config.errors import ConfigError
from harmony.errors import BadRequest, MethodNotAllowed, NotFound
from harmony.http.routing import (
    ALL_METHODS,
    Route,
    RouteTable,
    check_prefix,
    has_dot_segments,
    normalize_prefix,
)


def route(prefix, name, pipeline=None, methods=ALL_METHODS, match=None):
    return Route(prefix, FakeEndpoint(name), pipeline or f"pipe-{name}", methods, match)


def table(*routes):
    t = RouteTable("default")
    for r in routes:
        t.add(r)
    return t


class PrefixTests(SynchronousTestCase):
    def test_normalize(self):
        self.assertEqual(normalize_prefix("api/"), "/api")
        self.assertEqual(normalize_prefix("/a/b/"), "/a/b")
        self.assertEqual(normalize_prefix("/"), "/")
        self.assertEqual(route("fhir/", "x").prefix, "/fhir")

    def test_check_prefix(self):
        self.assertIsNone(check_prefix("/api"))
        self.assertIsNone(check_prefix("/"))
        self.assertIn("must start", check_prefix("api"))
        self.assertIn("plain path", check_prefix("/api?x"))
        self.assertIn("plain path", check_prefix("/a/../b"))

    def test_relative(self):
        r = route("/api", "x")
        self.assertEqual(r.relative("/api"), "")
        self.assertEqual(r.relative("/api/"), "")
        self.assertEqual(r.relative("/api/a/b"), "a/b")
        self.assertIsNone(r.relative("/apix"))
        self.assertIsNone(r.relative("/other"))
        root = route("/", "root")
        self.assertEqual(root.relative("/"), "")
        self.assertEqual(root.relative("/a/b"), "a/b")


class ResolveTests(SynchronousTestCase):
    def setUp(self):
        self.root = route("/", "root")
        self.api = route("/api", "api")
        self.v2 = route("/api/v2", "v2")
        # added in an order that is not the resolution order
        self.table = table(self.api, self.root, self.v2)

    def test_longest_prefix_wins(self):
        self.assertEqual(self.table.resolve("GET", "/api/v2/Patient/1"), (self.v2, "Patient/1"))
        self.assertEqual(self.table.resolve("GET", "/api/v2"), (self.v2, ""))
        self.assertEqual(self.table.resolve("GET", "/api/v1/x"), (self.api, "v1/x"))
        # a prefix matches whole segments only
        self.assertEqual(self.table.resolve("GET", "/api/v2x"), (self.api, "v2x"))
        self.assertEqual(self.table.resolve("GET", "/apiary"), (self.root, "apiary"))

    def test_catch_all(self):
        self.assertEqual(self.table.resolve("DELETE", "/anything/else"), (self.root, "anything/else"))
        self.assertEqual(self.table.resolve("GET", "/"), (self.root, ""))

    def test_routes_sorted(self):
        self.assertEqual([r.prefix for r in self.table.routes], ["/api/v2", "/api", "/"])

    def test_no_route_is_404(self):
        t = table(route("/api", "api"))
        self.assertRaises(NotFound, t.resolve, "GET", "/other")
        self.assertRaises(NotFound, t.resolve, "GET", "/")
        e = self.assertRaises(NotFound, RouteTable("empty").resolve, "GET", "/x")
        self.assertEqual(e.status, 404)

    def test_method_not_allowed_with_allow(self):
        t = table(route("/ro", "ro", methods={"GET", "HEAD"}), route("/", "root", methods={"POST"}))
        e = self.assertRaises(MethodNotAllowed, t.resolve, "DELETE", "/ro/x")
        self.assertEqual(e.status, 405)
        self.assertEqual(e.allowed, ("GET", "HEAD"))
        self.assertEqual(dict(e.headers), {"Allow": "GET, HEAD"})
        # the catch-all below serves POST, but /ro claims its whole subtree
        self.assertRaises(MethodNotAllowed, t.resolve, "POST", "/ro/x")
        self.assertEqual(t.resolve("POST", "/elsewhere")[0].endpoint.name, "root")

    def test_dot_segments_are_400(self):
        for path in ("/api/../etc/passwd", "/api/./x", "/api/%2e%2e/x", "/api/%2E%2e", "/api/%2e/x", "/.."):
            e = self.assertRaises(BadRequest, self.table.resolve, "GET", path)
            self.assertEqual(e.status, 400, path)

    def test_dots_inside_segments_are_fine(self):
        self.assertFalse(has_dot_segments("/api/file.tar.gz"))
        self.assertFalse(has_dot_segments("/api/..hidden"))
        self.assertFalse(has_dot_segments("/api/%2e%2e%2e"))
        self.assertEqual(self.table.resolve("GET", "/api/v1/..x"), (self.api, "v1/..x"))


class ConflictTests(SynchronousTestCase):
    def test_same_prefix_conflict_names_both_pipelines(self):
        t = table(route("/fhir", "fhir-a", pipeline="first-pipeline"))
        e = self.assertRaises(ConfigError, t.add, route("/fhir/", "fhir-b", pipeline="second-pipeline"))
        text = str(e)
        self.assertIn("first-pipeline", text)
        self.assertIn("second-pipeline", text)
        self.assertIn("fhir-a", text)
        self.assertIn("fhir-b", text)
        self.assertIn("/fhir", text)
        self.assertEqual(len(t.routes), 1)

    def test_root_conflict(self):
        t = table(route("/", "a"))
        self.assertRaises(ConfigError, t.add, route("/", "b"))

    def test_fixed_route_next_to_catch_all_conflicts(self):
        t = table(route("/dw", "catchall"))
        self.assertRaises(ConfigError, t.add, route("/dw", "fixed", match=lambda m, p: True))

    def test_two_fixed_routes_may_share_a_prefix(self):
        t = table(
            route("/dw", "studies", match=lambda m, p: p.startswith("studies")),
            route("/dw", "jmix", match=lambda m, p: p.startswith("jmix")),
        )
        self.assertEqual(t.resolve("GET", "/dw/jmix/1")[0].endpoint.name, "jmix")
        self.assertEqual(t.resolve("GET", "/dw/studies/1")[0].endpoint.name, "studies")


class FixedRouteTests(SynchronousTestCase):
    def setUp(self):
        def dicomweb(method, rel):
            if rel.startswith("studies"):
                return method in ("GET", "POST")
            return rel == "status" and method == "GET"

        self.fixed = route("/dicomweb", "dw", methods={"GET", "POST", "DELETE"}, match=dicomweb)
        self.root = route("/", "root")

    def test_fixed_beats_shorter_catch_all(self):
        t = table(self.root, self.fixed)
        self.assertEqual(t.resolve("GET", "/dicomweb/studies/1.2.3"), (self.fixed, "studies/1.2.3"))
        self.assertEqual(t.resolve("POST", "/dicomweb/studies"), (self.fixed, "studies"))

    def test_unmatched_falls_through(self):
        t = table(self.root, self.fixed)
        self.assertEqual(t.resolve("GET", "/dicomweb/other"), (self.root, "dicomweb/other"))
        # a method the fixed route does not serve on that path falls through too
        self.assertEqual(t.resolve("POST", "/dicomweb/status"), (self.root, "dicomweb/status"))

    def test_fixed_alone(self):
        t = table(self.fixed)
        self.assertRaises(NotFound, t.resolve, "GET", "/dicomweb/other")
        e = self.assertRaises(MethodNotAllowed, t.resolve, "PUT", "/dicomweb/studies")
        self.assertEqual(e.allowed, ("GET", "POST"))
        e = self.assertRaises(MethodNotAllowed, t.resolve, "DELETE", "/dicomweb/status")
        self.assertEqual(e.allowed, ("GET",))


class OwnerTests(SynchronousTestCase):
    """
    RouteTable.owner: the endpoint whose prefix covers a path, whatever the
    method or the path's dot segments (it renders errors found before a
    route is chosen).
    """

    def test_longest_prefix_owns(self):
        t = table(route("/", "root"), route("/fhir", "fhir", methods=("GET",)), route("/fhir/admin", "admin"))
        self.assertEqual(t.owner("/fhir/Patient/../x").endpoint.name, "fhir")
        self.assertEqual(t.owner("/fhir/admin/y").endpoint.name, "admin")
        self.assertEqual(t.owner("/other").endpoint.name, "root")

    def test_no_owner(self):
        t = table(route("/fhir", "fhir"))
        self.assertIsNone(t.owner("/fhirx"))
        self.assertIsNone(t.owner("/"))
