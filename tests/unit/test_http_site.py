"""
Tests for L{harmony.http.site}: whole requests through the Klein app of a
network, built from a configuration file by L{harmony.gateway.build_gateway},
driven in memory with C{treq.testing.StubTreq}.
"""

import base64
import json
import os
import shutil
import tempfile
import types

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from _fakes import FakeBackend, FakeEndpoint, RecordingMiddleware
from harmony.config import load_config
from harmony.envelope import ResponseEnvelope
from harmony.errors import Forbidden
from harmony.gateway import build_gateway
from harmony.http.adapter import HttpAdapter
from harmony.http.routing import Route, RouteTable
from harmony.http.site import HarmonySite, NetworkApp, make_site
from harmony.pipeline import PipelineExecutor
from harmony.registry import BuildContext, builtin_registry

BASE_TOML = """
[proxy]
id = "unit"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 8080
"""

PIPELINES_TOML = """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo"]
middleware = ["passthru"]
backends = ["echo"]

[endpoints.echo]
service = "echo"
[endpoints.echo.options]
path_prefix = "/echo"

[backends.echo]
service = "echo"

[pipelines.proxy]
networks = ["default"]
endpoints = ["api"]
backends = ["upstream"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[backends.upstream]
service = "http"
[backends.upstream.options]
base_url = "http://upstream.test/base"
timeout_secs = 5
"""


class Upstream(Resource):
    """
    A tiny upstream: answers with the configured status, headers and body
    and records what it received.
    """

    isLeaf = True

    def __init__(self, status=200, headers=(), body=b"upstream body"):
        super().__init__()
        self.status = status
        self.headers = headers
        self.body = body
        self.requests = []

    def render(self, request):
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": request.requestHeaders,
                "body": request.content.read(),
            }
        )
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.body


class _SiteBase(SynchronousTestCase):
    def request(self, stub, method, url, **kwargs):
        d = stub.request(method, url, **kwargs)
        stub.flush()
        response = self.successResultOf(d)
        body_d = stub.content(response)
        stub.flush()
        return response, self.successResultOf(body_d)

    def json_request(self, stub, method, url, **kwargs):
        response, body = self.request(stub, method, url, **kwargs)
        return response, json.loads(body)


class GatewayFromTomlTests(_SiteBase):
    def setUp(self):
        root = tempfile.mkdtemp(prefix="harmony-site-")
        self.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, "pipelines"))
        with open(os.path.join(root, "harmony.toml"), "w") as f:
            f.write(BASE_TOML)
        with open(os.path.join(root, "pipelines", "main.toml"), "w") as f:
            f.write(PIPELINES_TOML)
        registry = builtin_registry()
        config = load_config(os.path.join(root, "harmony.toml"), registry, environ={})
        self.clock = Clock()
        self.upstream = Upstream()
        context = BuildContext(reactor=self.clock, agent=RequestTraversalAgent(self.upstream), config=config)
        self.gateway = build_gateway(config, registry, context)
        self.stub = StubTreq(self.gateway.apps["default"].resource())

    def test_echo_methods(self):
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            response, echo = self.json_request(self.stub, method, "http://gw.test/echo/Patient/1")
            self.assertEqual(response.code, 200, method)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            self.assertEqual(echo["method"], method)
            self.assertEqual(echo["path"], "Patient/1")
            self.assertEqual(echo["full_path"], "/echo/Patient/1")
            self.assertEqual(echo["metadata"]["pipeline"], "echo")
            self.assertEqual(echo["metadata"]["endpoint"], "echo")
            self.assertEqual(echo["metadata"]["protocol"], "http")

    def test_echo_head(self):
        response, body = self.request(self.stub, "HEAD", "http://gw.test/echo/x")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])

    def test_echo_prefix_itself(self):
        _, echo = self.json_request(self.stub, "GET", "http://gw.test/echo")
        self.assertEqual(echo["path"], "")
        self.assertEqual(echo["full_path"], "/echo")

    def test_echo_query_and_headers(self):
        _, echo = self.json_request(
            self.stub,
            "GET",
            "http://gw.test/echo/search?name=a&name=b&empty=&sp=x%20y",
            headers={"X-Multi": ["one", "two"], "X-Single": "s"},
        )
        self.assertEqual(echo["query"], {"name": ["a", "b"], "empty": [""], "sp": ["x y"]})
        self.assertEqual(echo["headers"]["x-multi"], "one, two")
        self.assertEqual(echo["headers"]["x-single"], "s")
        self.assertEqual(echo["headers"]["host"], "gw.test")

    def test_echo_utf8_body(self):
        text = '{"name": "Zoë"}'
        _, echo = self.json_request(
            self.stub,
            "POST",
            "http://gw.test/echo/x",
            data=text.encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(echo["body"], text)
        self.assertEqual(echo["body_encoding"], "utf-8")
        self.assertEqual(echo["body_size"], len(text.encode("utf-8")))
        # passthrough never parses
        self.assertNotIn("normalized", echo)

    def test_echo_binary_body(self):
        data = bytes(range(256))
        _, echo = self.json_request(
            self.stub,
            "PUT",
            "http://gw.test/echo/blob",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.assertEqual(echo["body_encoding"], "base64")
        self.assertEqual(base64.b64decode(echo["body"]), data)
        self.assertEqual(echo["body_size"], 256)

    def test_echo_spooled_body(self):
        # twisted.web spools bodies of 100000 bytes and more to a file:
        # the envelope then carries a Stream.
        data = b"0123456789" * 20000
        _, echo = self.json_request(self.stub, "POST", "http://gw.test/echo/big", data=data)
        self.assertEqual(echo["body_size"], len(data))
        self.assertEqual(echo["body"], data.decode("ascii"))

    def test_echo_too_large_is_413(self):
        data = b"x" * (1024 * 1024 + 1)
        response, body = self.json_request(self.stub, "POST", "http://gw.test/echo/big", data=data)
        self.assertEqual(response.code, 413)
        self.assertEqual(body, {"error": "payload_too_large", "message": "Request body too large"})

    def test_unknown_path_404(self):
        response, body = self.json_request(self.stub, "GET", "http://gw.test/nothing/here")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(body, {"error": "not_found", "message": "No route for this path"})

    def test_root_path_404(self):
        response, body = self.json_request(self.stub, "GET", "http://gw.test/")
        self.assertEqual(response.code, 404)
        self.assertEqual(set(body), {"error", "message"})

    def test_unknown_method_405(self):
        response, body = self.json_request(self.stub, "PROPFIND", "http://gw.test/echo/x")
        self.assertEqual(response.code, 405)
        self.assertEqual(body["error"], "method_not_allowed")
        self.assertEqual(set(body), {"error", "message"})
        allow = response.headers.getRawHeaders("allow")[0].split(", ")
        self.assertEqual(sorted(allow), ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"])

    def test_dot_segments_400(self):
        for url in ("http://gw.test/echo/%2e%2e/api/x", "http://gw.test/echo/a/%2E/b"):
            response, body = self.json_request(self.stub, "GET", url)
            self.assertEqual(response.code, 400, url)
            self.assertEqual(body["error"], "bad_request")
            self.assertEqual(self.upstream.requests, [])

    def test_proxy_pipeline(self):
        self.upstream.status = 201
        self.upstream.headers = [(b"Location", b"http://upstream.test/base/Patient/9"), (b"X-Up", b"1")]
        self.upstream.body = b"\x89PNG\r\n\x1a\n\x00\xff"
        response, body = self.request(
            self.stub, "POST", "http://gw.test/api/Patient?x=1", data=b"\x00\x01", headers={"Content-Type": "image/png"}
        )
        self.assertEqual(response.code, 201)
        self.assertEqual(body, b"\x89PNG\r\n\x1a\n\x00\xff")
        self.assertEqual(response.headers.getRawHeaders("x-up"), ["1"])
        self.assertEqual(response.headers.getRawHeaders("location"), ["http://upstream.test/base/Patient/9"])
        [seen] = self.upstream.requests
        self.assertEqual(seen["method"], b"POST")
        self.assertEqual(seen["uri"], b"/base/Patient?x=1")
        self.assertEqual(seen["body"], b"\x00\x01")

    def test_proxy_drops_hop_by_hop_response_headers(self):
        self.upstream.headers = [
            (b"Proxy-Authenticate", b"Basic"),
            (b"Trailer", b"X-Checksum"),
            (b"X-Kept", b"yes"),
        ]
        response, _ = self.request(self.stub, "GET", "http://gw.test/api/x")
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders("proxy-authenticate"))
        self.assertIsNone(response.headers.getRawHeaders("trailer"))
        self.assertEqual(response.headers.getRawHeaders("x-kept"), ["yes"])

    def test_proxy_upstream_500_passed_through(self):
        self.upstream.status = 500
        response, body = self.request(self.stub, "GET", "http://gw.test/api/fail")
        # an upstream 500 is an answer, passed through as is
        self.assertEqual(response.code, 500)
        self.assertEqual(body, b"upstream body")

    def test_proxy_large_response_streams_through(self):
        data = bytes(range(251)) * 1300  # ~320 KB: streamed by the backend and the adapter
        self.upstream.body = data
        self.upstream.headers = [(b"Content-Type", b"application/dicom")]
        response, body = self.request(self.stub, "GET", "http://gw.test/api/big")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(body), len(data))
        self.assertEqual(body, data)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/dicom"])

    def test_proxy_single_date_and_server(self):
        # twisted.web (upstream and gateway alike) sets Date and Server on
        # every response: the client must see the upstream's, once.
        response, _ = self.request(self.stub, "GET", "http://gw.test/api/x")
        self.assertEqual(len(response.headers.getRawHeaders("date")), 1)
        self.assertEqual(len(response.headers.getRawHeaders("server")), 1)

    def test_proxy_head_keeps_length(self):
        self.upstream.body = b"x" * 1234
        response, body = self.request(self.stub, "HEAD", "http://gw.test/api/thing")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.upstream.requests[0]["method"], b"HEAD")
        self.assertEqual(response.headers.getRawHeaders("content-length"), ["1234"])

    def test_proxy_no_body_status(self):
        self.upstream.status = 304
        self.upstream.headers = [(b"ETag", b'"v1"')]
        self.upstream.body = b""
        response, body = self.request(self.stub, "GET", "http://gw.test/api/cached", headers={"If-None-Match": '"v1"'})
        self.assertEqual(response.code, 304)
        self.assertEqual(body, b"")
        self.assertEqual(response.headers.getRawHeaders("etag"), ['"v1"'])
        self.assertEqual(self.upstream.requests[0]["headers"].getRawHeaders(b"if-none-match"), [b'"v1"'])

    def test_keeps_serving_after_errors(self):
        for url in ("http://gw.test/nope", "http://gw.test/echo/%2e%2e"):
            self.request(self.stub, "GET", url)
        self.request(self.stub, "PROPFIND", "http://gw.test/echo")
        self.request(self.stub, "POST", "http://gw.test/echo/x", data=b"x" * (1024 * 1024 + 10))
        response, echo = self.json_request(self.stub, "GET", "http://gw.test/echo/ok")
        self.assertEqual(response.code, 200)
        self.assertEqual(echo["path"], "ok")


class _OutcomeEndpoint(FakeEndpoint):
    """
    An endpoint that renders errors in its own format (like FHIR).
    """

    def render_error(self, error):
        self.errors.append(error)
        return ResponseEnvelope.json(
            error.status,
            {"resourceType": "OperationOutcome", "issue": [{"code": error.error}]},
            content_type="application/fhir+json",
        )


class HandAssembledTests(_SiteBase):
    def setUp(self):
        self.log = []
        self.fhir = _OutcomeEndpoint("fhir", self.log)
        self.plain = FakeEndpoint("plain", self.log)
        self.calls = 0

        def flaky(env):
            self.calls += 1
            if env.details.path == "forbidden":
                raise Forbidden("not yours")
            if env.details.path == "crash":
                raise RuntimeError("internal detail /srv/secret")
            return None

        self.mw = RecordingMiddleware("guard", self.log, on_request=flaky)
        self.backend = FakeBackend("b", ResponseEnvelope(status=200, headers=[("Content-Type", "text/plain")], body=b"fine"))
        table = RouteTable("default")
        table.add(Route("/fhir", self.fhir, "fhirp"))
        table.add(Route("/", self.plain, "plainp"))
        executors = {
            "fhirp": PipelineExecutor("fhirp", [self.mw], [self.mw], [self.backend]),
            "plainp": PipelineExecutor("plainp", [self.mw], [self.mw], [self.backend]),
        }
        adapter = HttpAdapter(types.SimpleNamespace(public_base_url="", trusted_proxies=()))
        self.app = NetworkApp("default", table, executors, adapter)
        self.stub = StubTreq(self.app.resource())

    def test_errors_rendered_by_matched_endpoint(self):
        response, body = self.json_request(self.stub, "GET", "http://gw.test/fhir/forbidden")
        self.assertEqual(response.code, 403)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/fhir+json"])
        self.assertEqual(body, {"resourceType": "OperationOutcome", "issue": [{"code": "forbidden"}]})
        self.assertEqual(len(self.fhir.errors), 1)
        self.assertEqual(self.plain.errors, [])

        response, body = self.json_request(self.stub, "GET", "http://gw.test/forbidden")
        self.assertEqual(response.code, 403)
        self.assertEqual(body, {"error": "forbidden", "message": "not yours"})
        self.assertEqual(len(self.plain.errors), 1)

    def test_catch_all_root(self):
        response, body = self.request(self.stub, "GET", "http://gw.test/some/where")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"fine")
        self.assertEqual(self.backend.calls[0].details.path, "some/where")
        self.assertEqual(self.backend.calls[0].details.prefix, "/")

    def test_keeps_serving_after_unexpected_error(self):
        response, body = self.json_request(self.stub, "GET", "http://gw.test/crash")
        self.assertEqual(response.code, 500)
        self.assertEqual(body, {"error": "internal_error", "message": "Internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        response, body = self.request(self.stub, "GET", "http://gw.test/fine")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"fine")

    def test_envelope_details(self):
        self.request(
            self.stub,
            "GET",
            "http://gw.test/fhir/Patient?_id=1",
            headers={"Cookie": "session=abc", "X-Forwarded-Host": "evil.test"},
        )
        details = self.backend.calls[0].details
        self.assertEqual(details.method, "GET")
        self.assertEqual(details.uri, "/fhir/Patient?_id=1")
        self.assertEqual(details.path, "Patient")
        self.assertEqual(details.full_path, "/fhir/Patient")
        self.assertEqual(details.query_string, "_id=1")
        self.assertEqual(details.prefix, "/fhir")
        self.assertEqual(details.cookies, {"session": "abc"})
        self.assertEqual(details.scheme, "http")
        # X-Forwarded-Host from an untrusted client is ignored
        self.assertEqual(details.base_url, "http://gw.test")

    def test_in_flight_counts_requests_until_answered(self):
        """
        What a graceful shutdown waits for: requests answered at once
        (here an error rendered before any backend) and later ones.
        """
        self.json_request(self.stub, "GET", "http://gw.test/forbidden")
        self.request(self.stub, "GET", "http://gw.test/fine")
        self.assertEqual(self.app.in_flight, 0)
        pending = defer.Deferred()
        self.backend.result = lambda env: pending
        d = self.stub.request("GET", "http://gw.test/slow")
        self.stub.flush()
        self.assertEqual(self.app.in_flight, 1)
        pending.callback(ResponseEnvelope(status=200, body=b"late"))
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.app.in_flight, 0)

    def test_make_site(self):
        site = make_site(self.app, reactor=Clock())
        self.assertIsInstance(site, HarmonySite)
        self.assertFalse(site.displayTracebacks)
