"""
Tests for the C{echo} and C{http} backends.
"""

import base64
import json

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from _fakes import AnsweringAgent, FailingAgent, FakeResponse, RecordingAgent, RefusingAgent, make_request
from harmony.backends.echo import MAX_ECHO_BODY, EchoBackend
from harmony.backends.http import OPTIONS, SMALL_BODY, HttpBackend
from harmony.config.schema import Where
from harmony.envelope import ResponseEnvelope
from harmony.errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.registry import BuildContext
from harmony.streams import BytesBodyProducer, Stream, StreamBodyProducer, collect


class Upstream(Resource):
    """
    A tiny twisted.web upstream recording what it receives.

    @ivar hang: never answer.
    @ivar chunked: answer without Content-Length.
    """

    isLeaf = True

    def __init__(self, status=200, headers=(), body=b"hello"):
        super().__init__()
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.hang = False
        self.chunked = False
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        self.received_body = request.content.read()
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        if self.chunked:
            request.write(self.body)
            request.finish()
            return NOT_DONE_YET
        return self.body


def _options(base_url="http://upstream.test/base", timeout_secs=10.0):
    where = Where("test.toml", ("backends", "up", "options"))
    return OPTIONS.validate({"base_url": base_url, "timeout_secs": timeout_secs}, where)


class _HttpBase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.upstream = Upstream()
        self.agent = RequestTraversalAgent(self.upstream)
        self.backend = self.make_backend(self.agent)

    def make_backend(self, agent, **options):
        backend = HttpBackend("up", _options(**options), BuildContext(reactor=self.clock, agent=agent))
        verifyObject(IBackend, backend)
        return backend

    def handle(self, envelope, backend=None):
        d = (backend or self.backend).handle(envelope)
        self.agent.flush()
        return self.successResultOf(d)

    def seen_headers(self, name):
        return self.upstream.requests[-1].requestHeaders.getRawHeaders(name.encode("ascii"))


class HttpForwardingTests(_HttpBase):
    def test_method_path_query(self):
        env = make_request("PATCH", "Patient/1", query_string="a=1&a=2&b=%20x", body=b"{}")
        resp = self.handle(env)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.body, b"hello")
        req = self.upstream.requests[0]
        self.assertEqual(req.method, b"PATCH")
        self.assertEqual(req.uri, b"/base/Patient/1?a=1&a=2&b=%20x")
        self.assertEqual(self.upstream.received_body, b"{}")
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the timeout timer is gone

    def test_prefix_itself(self):
        self.handle(make_request("GET", ""))
        self.assertEqual(self.upstream.requests[0].uri, b"/base")

    def test_headers_forwarded(self):
        env = make_request(
            "GET",
            "x",
            headers=[("Accept", "application/fhir+json"), ("X-Multi", "1"), ("X-Multi", "2"), ("Authorization", "Bearer t")],
        )
        self.handle(env)
        self.assertEqual(self.seen_headers("accept"), [b"application/fhir+json"])
        self.assertEqual(self.seen_headers("x-multi"), [b"1", b"2"])
        self.assertEqual(self.seen_headers("authorization"), [b"Bearer t"])

    def test_host_not_forwarded_and_forwarding_headers_added(self):
        env = make_request(
            "GET",
            "x",
            headers=[("Host", "gw.example:8080"), ("X-Forwarded-For", "203.0.113.9")],
            client=("10.0.0.5", 40000),
            scheme="https",
        )
        self.handle(env)
        self.assertEqual(self.seen_headers("host"), [b"upstream.test"])
        self.assertEqual(self.seen_headers("x-forwarded-for"), [b"203.0.113.9, 10.0.0.5"])
        self.assertEqual(self.seen_headers("x-forwarded-host"), [b"gw.example:8080"])
        self.assertEqual(self.seen_headers("x-forwarded-proto"), [b"https"])
        self.assertEqual(self.seen_headers("forwarded"), [b'for=10.0.0.5;host="gw.example:8080";proto=https'])

    def test_forwarded_ipv6_and_prior(self):
        env = make_request(
            "GET", "x", headers=[("Forwarded", "for=192.0.2.1")], client=("2001:db8::1", 1)
        )
        self.handle(env)
        self.assertEqual(self.seen_headers("forwarded"), [b'for=192.0.2.1, for="[2001:db8::1]";proto=http'])

    def test_hop_by_hop_not_forwarded(self):
        agent = RecordingAgent()
        backend = self.make_backend(agent)
        env = make_request(
            "GET",
            "x",
            headers=[
                ("Connection", "keep-alive, X-Named"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic c2VjcmV0"),
                ("Proxy-Connection", "keep-alive"),
                ("X-Named", "hop"),
                ("Content-Length", "0"),
                ("Expect", "100-continue"),
                ("Host", "gw"),
                ("X-Kept", "yes"),
            ],
        )
        backend.handle(env)
        [(method, uri, headers, producer)] = agent.requests
        names = {name.lower() for name, _ in headers.getAllRawHeaders()}
        for dropped in (
            b"connection",
            b"keep-alive",
            b"te",
            b"transfer-encoding",
            b"upgrade",
            b"proxy-authorization",
            b"proxy-connection",
            b"x-named",
            b"content-length",
            b"expect",
            b"host",
        ):
            self.assertNotIn(dropped, names)
        self.assertEqual(headers.getRawHeaders(b"x-kept"), [b"yes"])
        self.assertIsNone(producer)  # empty GET: no body at all

    def test_hop_by_hop_not_forwarded_end_to_end(self):
        env = make_request("GET", "x", headers=[("Connection", "X-Named"), ("X-Named", "1"), ("Upgrade", "h2c")])
        self.handle(env)
        self.assertIsNone(self.seen_headers("x-named"))
        self.assertIsNone(self.seen_headers("upgrade"))
        self.assertNotIn(b"X-Named", b"".join(self.seen_headers("connection")))

    def test_response_hop_by_hop_headers(self):
        self.upstream.headers = [(b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c"), (b"X-Up", b"1")]
        resp = self.handle(make_request("GET", "x"))
        self.assertIsNone(resp.headers.get("keep-alive"))
        self.assertIsNone(resp.headers.get("upgrade"))
        self.assertIsNone(resp.headers.get("connection"))
        self.assertEqual(resp.headers.get("x-up"), "1")

    def test_response_connection_named_headers_dropped(self):
        # An agent that keeps every header line (Harmony's pooled client)
        # shows the upstream's Connection header and the headers it names.
        upstream = FakeResponse(
            200,
            [
                (b"Connection", b"close, X-Secret"),
                (b"X-Secret", b"hop"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Transfer-Encoding", b"identity"),
                (b"Content-Length", b"4"),
                (b"X-Kept", b"yes"),
            ],
            b"body",
        )
        verifyObject(IResponse, upstream)
        backend = self.make_backend(AnsweringAgent(upstream))
        resp = self.successResultOf(backend.handle(make_request("GET", "x")))
        self.assertEqual(resp.body, b"body")
        names = {name.lower() for name, _ in resp.headers}
        for dropped in ("connection", "x-secret", "keep-alive", "proxy-authenticate", "transfer-encoding"):
            self.assertNotIn(dropped, names)
        self.assertEqual(resp.headers.get("x-kept"), "yes")
        # the entity length stays (a HEAD answer needs it)
        self.assertEqual(resp.headers.get("content-length"), "4")

    def test_binary_bodies_byte_exact(self):
        payload = bytes(range(256)) * 4 + b"\r\n\x00"
        self.upstream.headers = [(b"Content-Type", b"application/dicom")]
        self.upstream.body = payload[::-1]
        env = make_request("POST", "x", headers=[("Content-Type", "application/octet-stream")], body=payload)
        resp = self.handle(env)
        self.assertEqual(self.upstream.received_body, payload)
        self.assertEqual(self.seen_headers("content-type"), [b"application/octet-stream"])
        self.assertEqual(self.seen_headers("content-length"), [str(len(payload)).encode()])
        self.assertEqual(resp.body, payload[::-1])
        self.assertEqual(resp.headers.get("content-type"), "application/dicom")

    def test_stream_request_body(self):
        data = b"s" * 5000
        env = make_request("PUT", "x", body=Stream.from_bytes(data))
        resp = self.handle(env)
        self.assertEqual(resp.status, 200)
        self.assertEqual(self.upstream.received_body, data)

    def test_body_producers(self):
        agent = RecordingAgent()
        backend = self.make_backend(agent)
        backend.handle(make_request("POST", "x", body=b""))
        backend.handle(make_request("POST", "x", body=Stream(length=3)))
        backend.handle(make_request("DELETE", "x", body=b"del"))
        producers = [r[3] for r in agent.requests]
        self.assertIsInstance(producers[0], BytesBodyProducer)
        self.assertEqual(producers[0].length, 0)
        self.assertIsInstance(producers[1], StreamBodyProducer)
        self.assertEqual(producers[1].length, 3)
        self.assertEqual(producers[2].length, 3)

    def test_upstream_statuses_preserved(self):
        for status, headers in (
            (404, [(b"Content-Type", b"application/fhir+json")]),
            (500, [(b"Retry-After", b"10")]),
            (201, [(b"Location", b"http://upstream.test/base/Patient/2"), (b"ETag", b'W/"1"')]),
        ):
            self.upstream.status = status
            self.upstream.headers = headers
            self.upstream.body = b"status %d" % status
            resp = self.handle(make_request("GET", "x"))
            self.assertEqual(resp.status, status)
            self.assertEqual(resp.body, b"status %d" % status)
            for name, value in headers:
                self.assertEqual(resp.headers.get_all(name.decode()), [value.decode()])

    def test_large_response_streams(self):
        data = bytes(range(251)) * 1200  # ~300 KB, above SMALL_BODY and the stream's high water
        self.assertGreater(len(data), SMALL_BODY)
        self.upstream.body = data
        resp = self.handle(make_request("GET", "big"))
        self.assertIsInstance(resp.body, Stream)
        self.assertEqual(resp.body.length, len(data))
        d = collect(resp.body)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), data)

    def test_small_response_in_memory(self):
        self.upstream.body = b"x" * SMALL_BODY
        resp = self.handle(make_request("GET", "x"))
        self.assertIsInstance(resp.body, bytes)
        self.assertEqual(len(resp.body), SMALL_BODY)

    def test_unknown_length_response_streams(self):
        self.upstream.chunked = True
        self.upstream.body = b"chunked data"
        resp = self.handle(make_request("GET", "x"))
        self.assertIsInstance(resp.body, Stream)
        self.assertIsNone(resp.body.length)
        d = collect(resp.body)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), b"chunked data")

    def test_target_overrides(self):
        agent = RecordingAgent()
        backend = self.make_backend(agent)
        env = make_request("GET", "orig/path", query_string="orig=1")
        env.target = {
            "base_url": "https://other.test:8443/root/",
            "path": "fhir/Patient",
            "method": "put",
            "query_string": "x=%2F",
        }
        backend.handle(env)
        method, uri, _, _ = agent.requests[0]
        self.assertEqual(method, b"PUT")
        self.assertEqual(uri, b"https://other.test:8443/root/fhir/Patient?x=%2F")

    def test_target_partial_overrides(self):
        env = make_request("GET", "orig", query_string="q=1")
        env.target = {"path": ""}
        self.assertEqual(self.backend.url(env), "http://upstream.test/base?q=1")
        env.target = {"query_string": ""}
        self.assertEqual(self.backend.url(env), "http://upstream.test/base/orig")
        self.handle(env)
        self.assertEqual(self.upstream.requests[0].uri, b"/base/orig")


class HttpFailureTests(_HttpBase):
    def test_timeout(self):
        self.upstream.hang = True
        d = self.backend.handle(make_request("GET", "slow"))
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual(f.value.status, 504)

    def test_timeout_with_hanging_agent(self):
        agent = RecordingAgent()
        backend = self.make_backend(agent, timeout_secs=2.5)
        d = backend.handle(make_request("GET", "x"))
        self.clock.advance(2.5)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual(agent.cancelled, 1)

    def test_cancel_before_timeout_is_not_a_timeout(self):
        agent = RecordingAgent()
        backend = self.make_backend(agent)
        d = backend.handle(make_request("GET", "x"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(agent.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_refused(self):
        agent = RefusingAgent()
        verifyObject(IAgent, agent)
        backend = self.make_backend(agent)
        f = self.failureResultOf(backend.handle(make_request("GET", "x")), UpstreamUnavailable)
        self.assertEqual(f.value.status, 502)
        self.assertEqual(agent.attempts, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dns_failure(self):
        backend = self.make_backend(FailingAgent(DNSLookupError("nowhere.test")))
        self.failureResultOf(backend.handle(make_request("GET", "x")), UpstreamUnavailable)

    def test_other_errors_pass_through(self):
        backend = self.make_backend(FailingAgent(ValueError("bad url")))
        self.failureResultOf(backend.handle(make_request("GET", "x")), ValueError)

    def test_close(self):
        self.assertIsNone(self.successResultOf(self.backend.close()))


class EchoBackendTests(SynchronousTestCase):
    def setUp(self):
        self.backend = EchoBackend("echo")
        verifyObject(IBackend, self.backend)

    def echo(self, envelope):
        resp = self.successResultOf(self.backend.handle(envelope))
        self.assertIsInstance(resp, ResponseEnvelope)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.headers.get("content-type"), "application/json")
        return json.loads(resp.body)

    def test_shape(self):
        env = make_request(
            "POST",
            "a/b",
            full_path="/echo/a/b",
            query={"x": ["1", "2"]},
            headers=[("X-A", "1"), ("x-a", "2"), ("Content-Type", "text/plain")],
            body="héllo".encode("utf-8"),
        )
        echo = self.echo(env)
        self.assertEqual(
            echo,
            {
                "method": "POST",
                "path": "a/b",
                "full_path": "/echo/a/b",
                "query": {"x": ["1", "2"]},
                "headers": {"x-a": "1, 2", "content-type": "text/plain"},
                "body": "héllo",
                "body_encoding": "utf-8",
                "body_size": 6,
            },
        )

    def test_binary_body_base64(self):
        data = b"\xff\xd8\xff\x00"
        echo = self.echo(make_request("PUT", body=data))
        self.assertEqual(echo["body_encoding"], "base64")
        self.assertEqual(base64.b64decode(echo["body"]), data)

    def test_stream_body(self):
        s = Stream()
        d = self.backend.handle(make_request("POST", body=s))
        self.assertNoResult(d)
        s.write(b"part1 ")
        s.write(b"part2")
        s.finish()
        self.assertEqual(json.loads(self.successResultOf(d).body)["body"], "part1 part2")

    def test_no_body(self):
        echo = self.echo(make_request("GET", body=None))
        self.assertEqual(echo["body"], "")
        self.assertEqual(echo["body_size"], 0)

    def test_normalized_and_metadata(self):
        env = make_request("POST", headers=[("Content-Type", "application/json")], body=b'{"a":1}')
        self.successResultOf(env.parse_body())
        env.metadata["pipeline"] = "p"
        echo = self.echo(env)
        self.assertEqual(echo["normalized"], {"a": 1})
        self.assertEqual(echo["metadata"], {"pipeline": "p"})

    def test_too_large(self):
        f = self.failureResultOf(self.backend.handle(make_request("POST", body=b"x" * (MAX_ECHO_BODY + 1))), PayloadTooLarge)
        self.assertEqual(f.value.status, 413)

    def test_close(self):
        self.assertIsNone(self.successResultOf(self.backend.close()))
