"""
Tests for L{harmony.http.adapter.HttpAdapter} (and the header hygiene of
L{harmony.http.headers}): real C{twisted.web} requests built by
L{harmony.http.site.HarmonySite} from raw bytes over a C{StringTransport},
turned into envelopes, and responses written back and parsed off the wire.
"""

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel, DummyRequest
from zope.interface import classImplements
from zope.interface.verify import verifyObject

from harmony.config.model import PROXY
from harmony.config.schema import Where
from harmony.envelope import Headers, ResponseEnvelope
from harmony.errors import PayloadTooLarge
from harmony.http.adapter import HttpAdapter, public_base_url
from harmony.http.headers import end_to_end, end_to_end_raw, json_error_body
from harmony.http.routing import Route
from harmony.http.site import MEMORY_BODY_LIMIT, HarmonySite
from harmony.interfaces import IProtocolAdapter
from harmony.streams import Stream, collect

PEER = ("192.0.2.10", 54321)
PROXY_IP = "10.9.9.9"


def proxy_options(**options):
    options.setdefault("id", "unit")
    return PROXY.validate(options, Where("test.toml"))


class Capture(Resource):
    """
    A leaf resource that keeps every request open for the test.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


class TLSTransport(StringTransport):
    """
    What twisted.web sees of a TLS connection.
    """

    negotiatedProtocol = b"http/1.1"

    def setTcpNoDelay(self, enabled):
        pass


classImplements(TLSTransport, ISSLTransport)


class Connection:
    """
    One HTTP connection into a L{HarmonySite}.
    """

    def __init__(self, peer=PEER, host=("10.0.0.1", 8080), secure=False):
        self.resource = Capture()
        self.site = HarmonySite(self.resource, reactor=Clock())
        peer_address = (IPv6Address if ":" in peer[0] else IPv4Address)("TCP", *peer)
        host_address = (IPv6Address if ":" in host[0] else IPv4Address)("TCP", *host)
        factory = TLSTransport if secure else StringTransport
        self.transport = factory(hostAddress=host_address, peerAddress=peer_address)
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data):
        self.channel.dataReceived(data)
        return self.resource.requests[-1] if self.resource.requests else None

    def lose(self):
        # What a TCP transport does when the peer goes away.
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionLost("client went away")))

    def response(self):
        return parse_response(self.transport.value())


def parse_response(data):
    """
    (status line, [(name, value)], body) of one response; chunked bodies
    are decoded.
    """
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    names = {k.lower(): v for k, v in headers}
    if names.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        rest = body
    return lines[0], headers, rest


def values(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]


ROUTE = Route(prefix="/api", endpoint="endpoint", pipeline="pipeline")


def http_request(method=b"GET", target=b"/api/x", headers=(), body=b"", version=b"HTTP/1.1"):
    lines = [method + b" " + target + b" " + version]
    if version == b"HTTP/1.1" and not any(k.lower() == b"host" for k, _ in headers):
        lines.append(b"Host: gw.example:8080")
    lines += [k + b": " + v for k, v in headers]
    if body and not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class AdapterTestCase(SynchronousTestCase):
    def setUp(self):
        self.adapter = HttpAdapter(proxy_options(trusted_proxies=[PROXY_IP]))

    def envelope(self, data=None, adapter=None, relative="x", **conn):
        connection = Connection(**conn)
        request = connection.send(data if data is not None else http_request())
        self.assertIsNotNone(request, "the site did not render the request")
        envelope = (adapter or self.adapter).to_envelope(request, ROUTE, relative)
        return envelope, request, connection


class ToEnvelopeTests(AdapterTestCase):
    def test_provides_interface(self):
        self.assertTrue(verifyObject(IProtocolAdapter, self.adapter))
        self.assertEqual(self.adapter.protocol, "http")

    def test_request_details(self):
        data = http_request(
            b"PATCH",
            b"/api/Patient/1%2F2?a=1&a=2&empty=&plus=x+y%20z&flag",
            headers=[
                (b"X-Multi", b"one"),
                (b"Accept", b"application/json"),
                (b"x-multi", b"two"),
                (b"Cookie", b"session=abc; theme=dark"),
            ],
        )
        envelope, request, _ = self.envelope(data, relative="Patient/1%2F2")
        d = envelope.details
        self.assertEqual(d.method, "PATCH")
        self.assertEqual(d.uri, "/api/Patient/1%2F2?a=1&a=2&empty=&plus=x+y%20z&flag")
        self.assertEqual(d.path, "Patient/1%2F2")
        self.assertEqual(d.full_path, "/api/Patient/1%2F2")
        self.assertEqual(d.query_string, "a=1&a=2&empty=&plus=x+y%20z&flag")
        self.assertEqual(d.query, {"a": ["1", "2"], "empty": [""], "plus": ["x y z"], "flag": [""]})
        self.assertEqual(d.headers.get_all("x-multi"), ["one", "two"])
        self.assertEqual(d.headers.get("ACCEPT"), "application/json")
        self.assertEqual(d.cookies, {"session": "abc", "theme": "dark"})
        self.assertEqual(d.client, PEER)
        self.assertEqual(d.scheme, "http")
        self.assertEqual(d.base_url, "http://gw.example:8080")
        self.assertEqual(d.prefix, "/api")
        self.assertEqual(envelope.metadata["protocol"], "http")

    def test_no_query(self):
        envelope, _, _ = self.envelope(http_request(target=b"/api"), relative="")
        self.assertEqual(envelope.details.query, {})
        self.assertEqual(envelope.details.query_string, "")
        self.assertEqual(envelope.details.cookies, {})
        self.assertEqual(envelope.details.path, "")
        self.assertEqual(envelope.details.full_path, "/api")

    def test_header_names_keep_their_spelling(self):
        envelope, _, _ = self.envelope(http_request(headers=[(b"X-Custom-ID", b"7")]))
        self.assertIn(("X-Custom-Id", "7"), envelope.details.headers.items())

    def test_latin1_header_value(self):
        envelope, _, _ = self.envelope(http_request(headers=[(b"X-Name", b"Ren\xe9")]))
        self.assertEqual(envelope.details.headers.get("x-name"), "Ren\u00e9")

    def test_https_scheme(self):
        envelope, _, _ = self.envelope(secure=True)
        self.assertEqual(envelope.details.scheme, "https")
        self.assertEqual(envelope.details.base_url, "https://gw.example:8080")

    def test_ipv6_client(self):
        envelope, _, _ = self.envelope(peer=("::1", 40000), host=("::1", 8080))
        self.assertEqual(envelope.details.client, ("::1", 40000))

    def test_base_url_from_host_header(self):
        envelope, _, _ = self.envelope(http_request(headers=[(b"Host", b"api.example")]))
        self.assertEqual(envelope.details.base_url, "http://api.example")

    def test_base_url_without_host_header_is_local_address(self):
        data = http_request(version=b"HTTP/1.0")
        envelope, _, _ = self.envelope(data)
        self.assertEqual(envelope.details.base_url, "http://10.0.0.1:8080")
        envelope, _, _ = self.envelope(data, host=("::1", 8443), peer=("::1", 5000))
        self.assertEqual(envelope.details.base_url, "http://[::1]:8443")

    def test_public_base_url_wins(self):
        adapter = HttpAdapter(proxy_options(public_base_url="https://public.example/gw/", trusted_proxies=[PROXY_IP]))
        data = http_request(
            headers=[(b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", b"fwd.example"), (b"Forwarded", b"host=f")]
        )
        envelope, _, _ = self.envelope(data, adapter=adapter, peer=(PROXY_IP, 1))
        self.assertEqual(envelope.details.base_url, "https://public.example/gw")

    def test_x_forwarded_from_trusted_proxy(self):
        data = http_request(
            headers=[(b"X-Forwarded-Proto", b"https, http"), (b"X-Forwarded-Host", b"ext.example, inner.example")]
        )
        envelope, _, _ = self.envelope(data, peer=(PROXY_IP, 1234))
        self.assertEqual(envelope.details.base_url, "https://ext.example")
        # The scheme of this hop is unchanged.
        self.assertEqual(envelope.details.scheme, "http")

    def test_forwarded_from_trusted_proxy_beats_x_forwarded(self):
        data = http_request(
            headers=[
                (b"Forwarded", b'for=192.0.2.60;proto=https;host="fwd.example:8443", for=10.1.1.1;host=other'),
                (b"X-Forwarded-Proto", b"http"),
                (b"X-Forwarded-Host", b"xfh.example"),
            ]
        )
        envelope, _, _ = self.envelope(data, peer=(PROXY_IP, 1234))
        self.assertEqual(envelope.details.base_url, "https://fwd.example:8443")

    def test_forwarded_partial_falls_back_to_x_forwarded(self):
        data = http_request(headers=[(b"Forwarded", b"for=1.2.3.4;proto=https"), (b"X-Forwarded-Host", b"xfh.example")])
        envelope, _, _ = self.envelope(data, peer=(PROXY_IP, 1234))
        self.assertEqual(envelope.details.base_url, "https://xfh.example")

    def test_forwarded_ignored_from_untrusted_client(self):
        data = http_request(
            headers=[
                (b"Forwarded", b"proto=https;host=evil.example"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"evil.example"),
            ]
        )
        envelope, _, _ = self.envelope(data)
        self.assertEqual(envelope.details.base_url, "http://gw.example:8080")

    def test_public_base_url_function(self):
        headers = {"host": "h.example", "x-forwarded-host": "x.example"}
        self.assertEqual(public_base_url(headers, "http", "local", "1.1.1.1"), "http://h.example")
        self.assertEqual(public_base_url(headers, "http", "local", "1.1.1.1", trusted={"1.1.1.1"}), "http://x.example")
        self.assertEqual(public_base_url({}, "https", "10.0.0.1:443", "1.1.1.1"), "https://10.0.0.1:443")
        self.assertEqual(public_base_url(headers, "http", "", None, "https://p.example/"), "https://p.example")

    def test_dummy_request(self):
        request = DummyRequest([b"a", b"b"])
        request.uri = b"/api/a/b?x=1"
        request.method = b"DELETE"
        request.requestHeaders.addRawHeader(b"host", b"dummy.example")
        request.isSecure = lambda: False
        request.received_cookies = {b"c": b"1"}
        request.content = None
        envelope = self.adapter.to_envelope(request, ROUTE, "a/b")
        self.assertEqual(envelope.details.method, "DELETE")
        self.assertEqual(envelope.details.query, {"x": ["1"]})
        self.assertEqual(envelope.details.base_url, "http://dummy.example")
        self.assertEqual(envelope.details.cookies, {"c": "1"})
        self.assertEqual(envelope.body, b"")


class RequestBodyTests(AdapterTestCase):
    def test_no_body(self):
        envelope, _, _ = self.envelope()
        self.assertEqual(envelope.body, b"")
        self.assertIsNone(envelope.rewind_body)

    def test_small_body_in_memory(self):
        envelope, _, _ = self.envelope(http_request(b"POST", body=b'{"a": 1}'))
        self.assertEqual(envelope.body, b'{"a": 1}')
        self.assertIsNone(envelope.rewind_body)

    def test_large_body_spooled(self):
        body = bytes(range(256)) * (MEMORY_BODY_LIMIT // 256 + 10)
        envelope, request, _ = self.envelope(http_request(b"PUT", body=body))
        self.assertIsInstance(envelope.body, Stream)
        self.assertEqual(envelope.body.length, len(body))
        self.assertEqual(self.successResultOf(collect(envelope.body)), body)
        # The spool file stays open for a rewind.
        self.assertFalse(request.content.closed)
        again = envelope.rewind_body()
        self.assertIsInstance(again, Stream)
        self.assertIsNot(again, envelope.body)
        self.assertEqual(again.length, len(body))
        self.assertEqual(self.successResultOf(collect(again)), body)

    def test_chunked_body_spooled(self):
        data = http_request(
            b"POST",
            headers=[(b"Transfer-Encoding", b"chunked")],
            body=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        envelope, _, _ = self.envelope(data)
        self.assertIsInstance(envelope.body, Stream)
        self.assertEqual(envelope.body.length, 11)
        self.assertEqual(self.successResultOf(collect(envelope.body)), b"hello world")

    def test_max_body_size(self):
        adapter = HttpAdapter(proxy_options(content_limits={"max_body_size": 10}))
        envelope, _, _ = self.envelope(http_request(b"POST", body=b"0123456789"), adapter=adapter)
        self.assertEqual(envelope.body, b"0123456789")
        connection = Connection()
        request = connection.send(http_request(b"POST", body=b"0123456789X"))
        self.assertRaises(PayloadTooLarge, adapter.to_envelope, request, ROUTE, "x")

    def test_max_body_size_spooled(self):
        adapter = HttpAdapter(proxy_options(content_limits={"max_body_size": MEMORY_BODY_LIMIT}))
        connection = Connection()
        request = connection.send(http_request(b"POST", body=b"x" * (MEMORY_BODY_LIMIT + 1)))
        self.assertRaises(PayloadTooLarge, adapter.to_envelope, request, ROUTE, "x")

    def test_default_max_body_size(self):
        self.assertEqual(self.adapter._max_body_size, 10 * 1024 * 1024)


class WriteResponseTests(AdapterTestCase):
    def write(self, response, data=None, **conn):
        envelope, request, connection = self.envelope(data, **conn)
        connection.transport.clear()
        d = self.adapter.write_response(request, response)
        return d, request, connection

    def test_status_headers_and_body(self):
        response = ResponseEnvelope(
            status=201,
            headers=[
                ("Content-Type", "application/json"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Location", "/api/x/1"),
            ],
            body=b'{"id": 1}',
        )
        d, request, connection = self.write(response)
        self.assertIsNone(self.successResultOf(d))
        status, headers, body = connection.response()
        self.assertEqual(status, b"HTTP/1.1 201 Created")
        self.assertEqual(values(headers, b"content-type"), [b"application/json"])
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(values(headers, b"location"), [b"/api/x/1"])
        self.assertEqual(values(headers, b"content-length"), [b"9"])
        self.assertEqual(body, b'{"id": 1}')
        self.assertTrue(request.finished)

    def test_hop_by_hop_and_content_length_dropped(self):
        response = ResponseEnvelope(
            status=200,
            headers=[
                ("Content-Length", "999"),
                ("Connection", "close"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "X-T"),
                ("TE", "trailers"),
                ("X-Kept", "yes"),
            ],
            body=b"abc",
        )
        d, request, connection = self.write(response)
        status, headers, body = connection.response()
        names = {k.lower() for k, _ in headers}
        for name in (b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"trailer", b"te"):
            self.assertNotIn(name, names)
        self.assertEqual(values(headers, b"connection"), [])
        self.assertEqual(values(headers, b"content-length"), [b"3"])
        self.assertEqual(values(headers, b"x-kept"), [b"yes"])
        self.assertEqual(body, b"abc")
        # The client connection stays open (keep-alive is this hop's choice).
        self.assertFalse(connection.transport.disconnecting)

    def test_date_and_server_replace_twisted_defaults(self):
        response = ResponseEnvelope(
            status=200,
            headers=[("Server", "Upstream/1.0"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")],
            body=b"",
        )
        d, request, connection = self.write(response)
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"server"), [b"Upstream/1.0"])
        self.assertEqual(values(headers, b"date"), [b"Mon, 01 Jan 2024 00:00:00 GMT"])

    def test_no_content_type_invented(self):
        # A gateway passes a body without Content-Type on as it came (no
        # twisted.web text/html default), like twisted's WSGI bridge.
        d, request, connection = self.write(ResponseEnvelope(status=200, body=b"<b>x</b>"))
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-type"), [])
        self.assertEqual(body, b"<b>x</b>")
        stream = Stream.from_iterable([b"data"])
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        self.assertEqual(values(connection.response()[1], b"content-type"), [])

    def test_content_type_kept_once(self):
        response = ResponseEnvelope(status=200, headers=[("content-type", "image/png")], body=b"png")
        d, request, connection = self.write(response)
        self.assertEqual(values(connection.response()[1], b"content-type"), [b"image/png"])

    def test_harmony_defaults_kept(self):
        d, request, connection = self.write(ResponseEnvelope(status=200, body=b"x"))
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"server"), [b"Harmony"])
        self.assertEqual(len(values(headers, b"date")), 1)

    def test_empty_and_none_body(self):
        for body in (b"", None):
            d, request, connection = self.write(ResponseEnvelope(status=200, body=body))
            status, headers, out = connection.response()
            self.assertEqual(values(headers, b"content-length"), [b"0"])
            self.assertEqual(out, b"")
            self.assertTrue(request.finished)

    def test_head_keeps_entity_content_length(self):
        response = ResponseEnvelope(status=200, headers=[("Content-Length", "1234")], body=b"")
        d, request, connection = self.write(response, http_request(b"HEAD"))
        status, headers, body = connection.response()
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"content-length"), [b"1234"])
        self.assertEqual(body, b"")
        self.assertTrue(request.finished)

    def test_head_with_bytes_body(self):
        response = ResponseEnvelope(status=200, body=b"hello")
        d, request, connection = self.write(response, http_request(b"HEAD"))
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-length"), [b"5"])
        self.assertEqual(body, b"")

    def test_head_with_stream_body_cancels_it(self):
        stream = Stream(length=42)
        stream.write(b"never sent")
        response = ResponseEnvelope(status=200, headers=[("Content-Length", "42")], body=stream)
        d, request, connection = self.write(response, http_request(b"HEAD"))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(stream.cancelled)
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-length"), [b"42"])
        self.assertEqual(body, b"")

    def test_head_with_stream_of_known_length(self):
        # A file served as a stream (a JMIX zip): HEAD tells its length.
        stream = Stream(length=35363)
        response = ResponseEnvelope(status=200, body=stream)
        d, request, connection = self.write(response, http_request(b"HEAD"))
        self.assertTrue(stream.cancelled)
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-length"), [b"35363"])
        self.assertEqual(body, b"")

    def test_no_body_statuses(self):
        for status in (204, 304):
            stream = Stream()
            for body in (b"must not be sent", stream):
                d, request, connection = self.write(ResponseEnvelope(status=status, body=body))
                self.assertIsNone(self.successResultOf(d))
                line, headers, out = connection.response()
                self.assertTrue(line.startswith(b"HTTP/1.1 %d " % status))
                self.assertEqual(out, b"")
                self.assertEqual(values(headers, b"transfer-encoding"), [])
                self.assertTrue(request.finished)
            self.assertTrue(stream.cancelled)

    def test_streamed_body_with_length(self):
        stream = Stream(length=11)
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        self.assertNoResult(d)
        stream.write(b"hello ")
        self.assertNoResult(d)
        stream.write(b"world")
        stream.finish()
        self.assertIsNone(self.successResultOf(d))
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-length"), [b"11"])
        self.assertEqual(body, b"hello world")
        self.assertTrue(request.finished)

    def test_streamed_body_unknown_length_chunked(self):
        stream = Stream.from_iterable([b"one", b"two", b"three"])
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        self.assertIsNone(self.successResultOf(d))
        status, headers, body = connection.response()
        self.assertEqual(values(headers, b"content-length"), [])
        self.assertEqual(values(headers, b"transfer-encoding"), [b"chunked"])
        self.assertEqual(body, b"onetwothree")

    def test_streamed_body_backpressure(self):
        stream = Stream(length=9)
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        # The client socket is full: the pipe stops reading the stream (the
        # read already waiting is delivered).
        connection.transport.producer.pauseProducing()
        stream.write(b"abc")
        stream.write(b"def")
        # (The body after the head: a random request id in the head may
        # hold "def".)
        self.assertEqual(connection.transport.value().split(b"\r\n\r\n", 1)[1], b"abc")
        connection.transport.producer.resumeProducing()
        self.assertEqual(connection.transport.value().split(b"\r\n\r\n", 1)[1], b"abcdef")
        stream.write(b"ghi")
        stream.finish()
        self.successResultOf(d)
        self.assertEqual(connection.response()[2], b"abcdefghi")

    def test_streamed_body_failure_aborts_connection(self):
        stream = Stream(length=100)
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        stream.write(b"partial")
        stream.fail(RuntimeError("upstream broke"))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(connection.transport.disconnected)
        self.assertFalse(request.finished)
        self.flushLoggedErrors(RuntimeError)

    def test_client_gone_writes_nothing(self):
        envelope, request, connection = self.envelope()
        connection.lose()
        self.assertIsNone(request.channel)
        connection.transport.clear()
        stream = Stream()
        d = self.adapter.write_response(request, ResponseEnvelope(status=200, body=stream))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(stream.cancelled)
        self.assertEqual(connection.transport.value(), b"")
        d = self.adapter.write_response(request, ResponseEnvelope(status=200, body=b"bytes"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(connection.transport.value(), b"")

    def test_client_gone_mid_stream_cancels_it(self):
        stream = Stream(length=100)
        d, request, connection = self.write(ResponseEnvelope(status=200, body=stream))
        stream.write(b"partial")
        connection.lose()
        self.assertTrue(stream.cancelled)
        self.successResultOf(d)

    def test_dummy_channel_request(self):
        # The adapter also writes through twisted's own test channel.
        request = DummyRequest([b""])
        request.channel = DummyChannel()
        self.adapter.write_response(request, ResponseEnvelope(status=202, headers=[("X-A", "1")], body=b"ok"))
        self.assertEqual(request.responseCode, 202)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-a"), [b"1"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"2"])
        self.assertEqual(request.written, [b"ok"])
        self.assertEqual(request.finished, 1)


class HeaderHygieneTests(SynchronousTestCase):
    def test_end_to_end_raw(self):
        pairs = [
            (b"Connection", b"close, X-Private"),
            (b"X-Private", b"secret"),
            (b"Keep-Alive", b"timeout=1"),
            (b"Content-Length", b"3"),
            (b"Content-Type", b"text/plain"),
            (b"Host", b"h"),
        ]
        self.assertEqual(end_to_end_raw(pairs, frozenset({b"host"})), [(b"Content-Type", b"text/plain")])

    def test_end_to_end(self):
        headers = Headers([("TE", "trailers"), ("Accept", "a"), ("X-Drop", "1"), ("accept", "b")])
        out = end_to_end(headers, drop=("x-DROP",))
        self.assertEqual(out.items(), [("Accept", "a"), ("accept", "b")])
        # The input is untouched.
        self.assertEqual(len(headers), 4)

    def test_json_error_body(self):
        self.assertEqual(
            json_error_body(PayloadTooLarge()),
            {"error": "payload_too_large", "message": "Request body too large"},
        )
