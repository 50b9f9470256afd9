"""
Tests for L{harmony.http.client.PooledAgent}: request serialisation,
response parsing (byte-at-a-time and in one chunk), body delivery,
keep-alive pooling and retries, all in memory over C{MemoryReactorClock}
and C{StringTransport}.
"""

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from harmony.http.client import (
    MAX_HEAD,
    MalformedResponse,
    PooledAgent,
    ResponseHeadTooLarge,
    split_url,
)
from harmony.streams import BytesBodyProducer, Stream, StreamBodyProducer


class BodyCollector(Protocol):
    """
    A body protocol recording the chunks and the end reason.
    """

    def __init__(self):
        self.chunks = []
        self.reason = None
        self.made = False

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.reason = reason

    @property
    def body(self):
        return b"".join(self.chunks)


@implementer(IBodyProducer)
class ManualBodyProducer:
    """
    A streaming body producer that writes only when the test says so.
    """

    def __init__(self, length=UNKNOWN_LENGTH):
        self.length = length
        self.consumer = None
        self.finished = None
        self.stopped = 0

    def startProducing(self, consumer):
        self.consumer = consumer
        self.finished = defer.Deferred()
        return self.finished

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        self.stopped += 1


class RecordingTransport(StringTransport):
    """
    A StringTransport that also keeps every write call.
    """

    aborted = False
    nodelay = False

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled

    def abortConnection(self):
        self.aborted = True
        StringTransport.abortConnection(self)

    def __init__(self):
        StringTransport.__init__(self)
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        StringTransport.write(self, data)


class Connection:
    """
    One connection attempt recorded by the memory reactor.
    """

    def __init__(self, reactor, index):
        self.host, self.port, self.factory, self.timeout, _ = reactor.tcpClients[index]
        self.connector = reactor.connectors[index]
        self.protocol = None
        self.transport = None

    def complete(self):
        self.transport = RecordingTransport()
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return self

    def refuse(self):
        self.factory.clientConnectionFailed(self.connector, Failure(ConnectionRefusedError("refused")))

    def feed(self, data, bytewise=False):
        if bytewise:
            for i in range(len(data)):
                self.protocol.dataReceived(data[i : i + 1])
        else:
            self.protocol.dataReceived(data)

    def lose(self, reason=None):
        self.protocol.connectionLost(Failure(reason or ConnectionDone("closed")))

    def sent(self):
        return self.transport.value()


class AgentTestCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.agent = PooledAgent(self.reactor, idle_timeout=60, max_idle_per_origin=4)

    def connection(self, index=-1):
        return Connection(self.reactor, index)

    def request(self, method=b"GET", uri=b"http://example.test/path", headers=None, body=None):
        """
        Start a request and complete the TCP connection it opened.
        """
        before = len(self.reactor.tcpClients)
        d = self.agent.request(method, uri, headers, body)
        conn = None
        if len(self.reactor.tcpClients) > before:
            conn = self.connection().complete()
        return d, conn

    def respond(self, d, conn, data, bytewise=False):
        conn.feed(data, bytewise)
        response = self.successResultOf(d)
        body = BodyCollector()
        response.deliverBody(body)
        return response, body


OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class SplitUrlTests(SynchronousTestCase):
    def test_defaults(self):
        self.assertEqual(split_url(b"http://h"), (b"http", b"h", 80, b"/"))
        self.assertEqual(split_url(b"https://h?q=1"), (b"https", b"h", 443, b"/?q=1"))
        self.assertEqual(split_url(b"http://h:8080/a/b?c"), (b"http", b"h", 8080, b"/a/b?c"))
        self.assertEqual(split_url(b"http://[::1]:81/x"), (b"http", b"::1", 81, b"/x"))
        self.assertEqual(split_url(b"http://[::1]/x"), (b"http", b"::1", 80, b"/x"))

    def test_unsupported(self):
        self.assertRaises(ValueError, split_url, b"ftp://h/")
        self.assertRaises(ValueError, split_url, b"h/path")


class InterfaceTests(AgentTestCase):
    def test_agent_provides_iagent(self):
        self.assertTrue(verifyObject(IAgent, self.agent))

    def test_response_provides_iresponse(self):
        d, conn = self.request()
        response, body = self.respond(d, conn, OK_5)
        self.assertTrue(verifyObject(IResponse, response))
        self.assertEqual(response.version, (b"HTTP", 1, 1))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.phrase, b"OK")
        self.assertEqual(response.length, 5)
        self.assertIsNone(response.previousResponse)
        response.setPreviousResponse("previous")
        self.assertEqual(response.previousResponse, "previous")

    def test_unsupported_scheme(self):
        self.failureResultOf(self.agent.request(b"GET", b"ftp://example.test/"), ValueError)
        self.failureResultOf(self.agent.request(b"GET", b"example.test/"), ValueError)
        self.assertEqual(self.reactor.tcpClients, [])


class RequestSerialisationTests(AgentTestCase):
    def test_request_line_and_host_default_port(self):
        d, conn = self.request(b"GET", b"http://example.test/a/b?x=1&y")
        self.assertTrue(conn.transport.nodelay)
        self.assertEqual((conn.host, conn.port), ("127.0.0.1", 80))
        self.assertEqual(conn.sent(), b"GET /a/b?x=1&y HTTP/1.1\r\nHost: example.test\r\n\r\n")
        self.assertNoResult(d)

    def test_empty_path_is_slash(self):
        d, conn = self.request(b"GET", b"http://example.test?q=1")
        self.assertTrue(conn.sent().startswith(b"GET /?q=1 HTTP/1.1\r\n"))

    def test_explicit_port_kept(self):
        d, conn = self.request(b"GET", b"http://example.test:8042/p")
        self.assertEqual(conn.port, 8042)
        self.assertIn(b"\r\nHost: example.test:8042\r\n", conn.sent())

    def test_default_port_written_explicitly_is_omitted(self):
        d, conn = self.request(b"GET", b"http://example.test:80/p")
        self.assertIn(b"\r\nHost: example.test\r\n", conn.sent())

    def test_ipv6_literal_bracketed(self):
        d, conn = self.request(b"GET", b"http://[::1]:8080/p")
        self.assertIn(b"\r\nHost: [::1]:8080\r\n", conn.sent())
        d, conn = self.request(b"GET", b"http://[2001:db8::1]/p")
        self.assertIn(b"\r\nHost: [2001:db8::1]\r\n", conn.sent())

    def test_https_default_port(self):
        d = self.agent.request(b"GET", b"https://secure.test/p")
        self.assertEqual(self.reactor.tcpClients[-1][1], 443)
        self.assertNoResult(d)

    def test_twisted_headers(self):
        headers = TwistedHeaders({b"Accept": [b"a/b", b"c/d"], b"X-One": [b"1"]})
        d, conn = self.request(headers=headers)
        sent = conn.sent()
        self.assertIn(b"\r\nAccept: a/b\r\nAccept: c/d\r\n", sent)
        self.assertIn(b"\r\nX-One: 1\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n"))

    def test_list_of_byte_pairs(self):
        d, conn = self.request(headers=[(b"x-b", b"2"), (b"X-A", b"1"), (b"x-b", b"3")])
        self.assertEqual(
            conn.sent(),
            b"GET /path HTTP/1.1\r\nHost: example.test\r\nx-b: 2\r\nX-A: 1\r\nx-b: 3\r\n\r\n",
        )

    def test_explicit_host_header_wins(self):
        d, conn = self.request(headers=[(b"Host", b"public.test"), (b"X-A", b"1")])
        self.assertEqual(conn.sent(), b"GET /path HTTP/1.1\r\nHost: public.test\r\nX-A: 1\r\n\r\n")

    def test_caller_framing_headers_ignored(self):
        d, conn = self.request(
            b"POST",
            headers=[(b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")],
            body=BytesBodyProducer(b"abc"),
        )
        self.assertEqual(
            conn.sent(),
            b"POST /path HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc",
        )

    def test_bytes_body_one_write(self):
        d, conn = self.request(b"PUT", body=BytesBodyProducer(b"payload"))
        self.assertEqual(
            conn.transport.writes,
            [b"PUT /path HTTP/1.1\r\nHost: example.test\r\nContent-Length: 7\r\n\r\npayload"],
        )
        self.assertIsNone(conn.transport.producer)
        self.assertNoResult(d)

    def test_empty_bytes_body(self):
        d, conn = self.request(b"POST", body=BytesBodyProducer(b""))
        self.assertTrue(conn.sent().endswith(b"\r\nContent-Length: 0\r\n\r\n"))

    def test_streamed_body_known_length(self):
        producer = ManualBodyProducer(length=6)
        d, conn = self.request(b"POST", body=producer)
        self.assertTrue(conn.sent().endswith(b"\r\nContent-Length: 6\r\n\r\n"))
        self.assertNotIn(b"Transfer-Encoding", conn.sent())
        self.assertIs(conn.transport.producer, producer)
        conn.transport.clear()
        producer.consumer.write(b"abc")
        producer.consumer.write(b"")
        producer.consumer.write(b"def")
        producer.finished.callback(None)
        self.assertEqual(conn.sent(), b"abcdef")
        self.assertIsNone(conn.transport.producer)

    def test_streamed_body_unknown_length_chunked(self):
        stream = Stream()
        d, conn = self.request(b"POST", body=StreamBodyProducer(stream))
        head = conn.sent()
        self.assertTrue(head.endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n"))
        self.assertNotIn(b"Content-Length", head)
        conn.transport.clear()
        stream.write(b"hello")
        stream.write(b"0123456789abcdef!")
        self.assertEqual(conn.sent(), b"5\r\nhello\r\n11\r\n0123456789abcdef!\r\n")
        conn.transport.clear()
        stream.finish()
        self.assertEqual(conn.sent(), b"0\r\n\r\n")
        self.assertIsNone(conn.transport.producer)

    def test_stream_body_with_length(self):
        stream = Stream.from_bytes(b"xyz")
        d, conn = self.request(b"POST", body=StreamBodyProducer(stream))
        self.assertTrue(conn.sent().endswith(b"\r\nContent-Length: 3\r\n\r\nxyz"))

    def test_body_producer_failure_fails_request(self):
        producer = ManualBodyProducer(length=10)
        d, conn = self.request(b"POST", body=producer)
        producer.finished.errback(RuntimeError("source broke"))
        f = self.failureResultOf(d, RequestTransmissionFailed)
        self.assertTrue(f.value.reasons[0].check(RuntimeError))
        self.assertTrue(conn.transport.aborted)

    def test_crlf_in_header_value_rejected(self):
        for i, headers in enumerate(
            (
                [(b"X-Evil", b"a\r\nInjected: 1")],
                [(b"X-Evil", b"a\nb")],
                [(b"X-Ev\ril", b"a")],
            )
        ):
            d, conn = self.request(uri=b"http://crlf%d.test/" % i, headers=headers)
            self.failureResultOf(d, ValueError)
            self.assertEqual(conn.sent(), b"")
            self.assertFalse(conn.transport.aborted)

    def test_unsafe_request_line_rejected(self):
        for method, uri in (
            (b"GET", b"http://example.test/a b"),
            (b"GET", b"http://example.test/a\r\nX-Injected: 1"),
            (b"GET", b"http://example.test/\x00"),
            (b"GET\r\nX: 1", b"http://example.test/"),
            (b"G T", b"http://example.test/"),
        ):
            self.failureResultOf(self.agent.request(method, uri), ValueError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_duplicate_host_headers_keep_lines_intact(self):
        d, conn = self.request(headers=[(b"Host", b"a.test"), (b"X-A", b"1"), (b"host", b"b.test")])
        self.assertEqual(conn.sent(), b"GET /path HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\nhost: b.test\r\n\r\n")

    def test_crlf_rejected_connection_stays_usable(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        conn.transport.clear()
        d = self.agent.request(b"GET", b"http://example.test/x", [(b"X-Evil", b"a\r\nb: c")])
        self.failureResultOf(d, ValueError)
        self.assertEqual(conn.sent(), b"")
        d = self.agent.request(b"GET", b"http://example.test/y")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(conn.sent().startswith(b"GET /y HTTP/1.1\r\n"))


class ResponseParsingMixin:
    """
    Every parsing test, run with the response fed in one chunk and byte by
    byte (L{bytewise}).
    """

    bytewise = False

    def get(self, data, method=b"GET", uri=b"http://example.test/path"):
        d, conn = self.request(method, uri)
        response, body = self.respond(d, conn, data, self.bytewise)
        return conn, response, body

    def test_content_length_body(self):
        conn, response, body = self.get(OK_5)
        self.assertEqual(response.length, 5)
        self.assertEqual(body.body, b"hello")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(conn.transport.disconnecting)

    def test_zero_content_length(self):
        conn, response, body = self.get(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(response.length, 0)
        self.assertEqual(body.body, b"")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_chunked_body_with_extensions_and_trailers(self):
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
            b"5;name=value\r\nhello\r\n"
            b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
            b"0;last\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n"
        )
        conn, response, body = self.get(data)
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertEqual(body.body, b"helloabcdefghijklmnopqrstuvwxyz")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"1"])

    def test_chunked_bad_size_fails_body(self):
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        conn, response, body = self.get(data)
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(body.reason.value.reasons[0].check(MalformedResponse))
        self.assertTrue(conn.transport.aborted)

    def test_chunked_missing_crlf_fails_body(self):
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n"
        conn, response, body = self.get(data)
        self.assertEqual(body.body, b"he")
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(conn.transport.aborted)

    def test_chunk_size_line_too_long(self):
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 5000
        conn, response, body = self.get(data)
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(conn.transport.aborted)

    def test_bytes_after_chunked_trailer_not_reused(self):
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"
        conn, response, body = self.get(data)
        self.assertEqual(body.body, b"a")
        self.assertTrue(body.reason.check(ResponseDone))
        if self.bytewise:
            # The stray bytes arrive while idle: the connection is aborted.
            self.assertTrue(conn.transport.aborted)
        else:
            self.assertTrue(conn.transport.disconnecting)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_close_delimited_body(self):
        conn, response, body = self.get(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome data")
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(body.reason)
        conn.feed(b" and more", self.bytewise)
        self.assertIsNone(body.reason)
        conn.lose()
        self.assertEqual(body.body, b"some data and more")
        self.assertTrue(body.reason.check(PotentialDataLoss))

    def test_head_has_no_body(self):
        conn, response, body = self.get(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD")
        self.assertEqual(response.length, 0)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])
        self.assertEqual(body.body, b"")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(conn.transport.disconnecting)

    def test_204_and_304_have_no_body(self):
        for status in (b"204 No Content", b"304 Not Modified"):
            conn, response, body = self.get(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n", uri=b"http://h%s.test/" % status[:3]
            )
            self.assertEqual(response.length, 0)
            self.assertEqual(body.body, b"")
            self.assertTrue(body.reason.check(ResponseDone))

    def test_interim_responses_skipped(self):
        data = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
        conn, response, body = self.get(data)
        self.assertEqual(response.code, 201)
        self.assertEqual(response.phrase, b"Created")
        self.assertFalse(response.headers.hasHeader(b"link"))
        self.assertEqual(body.body, b"ok")

    def test_repeated_headers_kept_in_order(self):
        data = (
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Other: x\r\nset-cookie: b=2\r\n"
            b"Set-Cookie: c=3\r\nContent-Length: 0\r\n\r\n"
        )
        conn, response, body = self.get(data)
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2", b"c=3"])
        self.assertEqual(
            response.raw_headers,
            [
                (b"Set-Cookie", b"a=1"),
                (b"X-Other", b"x"),
                (b"set-cookie", b"b=2"),
                (b"Set-Cookie", b"c=3"),
                (b"Content-Length", b"0"),
            ],
        )

    def test_header_values_stripped_and_phrase_optional(self):
        conn, response, body = self.get(b"HTTP/1.1 200\r\nX-A:   spaced  \r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(response.phrase, b"")
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"spaced"])

    def test_identical_content_length_headers_accepted(self):
        conn, response, body = self.get(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(body.body, b"ok")

    def assertHeadFails(self, data, exc_type=MalformedResponse):
        d, conn = self.request()
        conn.feed(data, self.bytewise)
        f = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(f.value.reasons[0].check(exc_type), f.value.reasons)
        self.assertTrue(conn.transport.aborted)
        return conn

    def test_malformed_status_line(self):
        self.assertHeadFails(b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertHeadFails(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n")
        self.assertHeadFails(b"\r\n\r\n")

    def test_conflicting_content_length(self):
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")

    def test_bad_content_length(self):
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")
        # Forms int() accepts but HTTP does not: framing must not be guessed.
        for value in (b"+5", b"1_0", b"5 5", b"\xd9\xa5"):
            self.assertHeadFails(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nhello")

    def test_status_code_must_be_three_digits(self):
        self.assertHeadFails(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertHeadFails(b"HTTP/1.1 +20 OK\r\nContent-Length: 0\r\n\r\n")

    def test_chunk_size_must_be_hex_digits(self):
        for size in (b"0x5", b"+5", b"5_0"):
            data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
            conn, response, body = self.get(data)
            self.assertTrue(body.reason.check(ResponseFailed), size)
            self.assertTrue(conn.transport.aborted)

    def test_transfer_encoding_overrides_content_length(self):
        data = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        conn, response, body = self.get(data)
        self.assertEqual(body.body, b"hello")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_non_chunked_final_coding_reads_until_close(self):
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef"
        conn, response, body = self.get(data)
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(body.reason)
        conn.lose()
        self.assertEqual(body.body, b"abcdef")
        self.assertTrue(body.reason.check(PotentialDataLoss))

    def test_header_without_colon(self):
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 0\r\n\r\n")

    def test_whitespace_before_colon(self):
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n")

    def test_head_too_large(self):
        # A complete head over the limit fails even when it arrives at once.
        huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        self.assertHeadFails(huge, ResponseHeadTooLarge)


class OneChunkParsingTests(ResponseParsingMixin, AgentTestCase):
    bytewise = False

    def test_head_too_large_without_end(self):
        # Only the unbounded case: the head never ends.
        self.assertHeadFails(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 1), ResponseHeadTooLarge)


class BytewiseParsingTests(ResponseParsingMixin, AgentTestCase):
    bytewise = True

    def test_head_too_large(self):
        # Byte at a time, the limit is hit before the head ends: feed just
        # enough to cross it (64k single-byte calls are slow but bounded).
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nX-Big: ")
        conn.feed(b"a" * (MAX_HEAD - 30))
        self.assertNoResult(d)
        conn.feed(b"a" * 40, bytewise=True)
        f = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(f.value.reasons[0].check(ResponseHeadTooLarge))
        self.assertTrue(conn.transport.aborted)


class DeliverBodyTests(AgentTestCase):
    def test_data_before_deliver_body_is_buffered(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(d)
        conn.feed(b"world")
        body = BodyCollector()
        response.deliverBody(body)
        self.assertTrue(body.made)
        self.assertEqual(body.chunks, [b"hello", b"world"])
        self.assertTrue(body.reason.check(ResponseDone))

    def test_data_after_deliver_body_streams(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        response = self.successResultOf(d)
        body = BodyCollector()
        response.deliverBody(body)
        self.assertEqual(body.chunks, [])
        conn.feed(b"hello")
        self.assertEqual(body.chunks, [b"hello"])
        self.assertIsNone(body.reason)
        conn.feed(b"world")
        self.assertEqual(body.body, b"helloworld")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_deliver_body_twice(self):
        d, conn = self.request()
        response, body = self.respond(d, conn, OK_5)
        self.assertRaises(RuntimeError, response.deliverBody, BodyCollector())

    def test_pausing_body_transport_pauses_connection(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(d)
        body = BodyCollector()
        response.deliverBody(body)
        body.transport.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")
        body.transport.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")

    def test_stop_producing_aborts(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(d)
        body = BodyCollector()
        response.deliverBody(body)
        body.transport.loseConnection()
        self.assertTrue(conn.transport.aborted)
        conn.lose(ConnectionLost())
        self.assertTrue(body.reason.check(ResponseFailed))
        # The aborted connection is never pooled.
        self.agent.request(b"GET", b"http://example.test/again")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_connection_lost_mid_body(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
        response = self.successResultOf(d)
        body = BodyCollector()
        response.deliverBody(body)
        conn.lose(ConnectionLost())
        self.assertEqual(body.body, b"hel")
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_body_paused_at_its_end_is_resumed_when_pooled(self):
        """
        A body protocol that pauses on the last chunk (a full stream) must
        not leave the pooled connection paused, and its later calls must
        not touch the connection once it serves another request.
        """
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(d)

        class PauseOnData(BodyCollector):
            def dataReceived(self, data):
                BodyCollector.dataReceived(self, data)
                self.transport.pauseProducing()

        body = PauseOnData()
        response.deliverBody(body)
        body.transport.resumeProducing()
        conn.feed(b"world")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(conn.transport.producerState, "producing")
        d2 = self.agent.request(b"GET", b"http://example.test/second")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        body.transport.pauseProducing()
        body.transport.stopProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertFalse(conn.transport.aborted)
        conn.feed(OK_5)
        self.successResultOf(d2)


class KeepAliveTests(AgentTestCase):
    def test_connection_reused(self):
        d, conn = self.request(uri=b"http://example.test/one")
        self.respond(d, conn, OK_5)
        conn.transport.clear()
        d2 = self.agent.request(b"GET", b"http://example.test/two")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(conn.sent(), b"GET /two HTTP/1.1\r\nHost: example.test\r\n\r\n")
        response, body = self.respond(d2, conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
        self.assertEqual(body.body, b"bye")

    def test_reused_after_chunked_and_no_body_responses(self):
        d, conn = self.request()
        self.respond(d, conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n")
        d = self.agent.request(b"HEAD", b"http://example.test/h")
        self.respond(d, conn, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        d = self.agent.request(b"GET", b"http://example.test/c")
        self.respond(d, conn, b"HTTP/1.1 304 Not Modified\r\n\r\n")
        d = self.agent.request(b"GET", b"http://example.test/d")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        response, body = self.respond(d, conn, OK_5)
        self.assertEqual(body.body, b"hello")

    def test_different_origins_not_shared(self):
        d, conn = self.request(uri=b"http://a.test/")
        self.respond(d, conn, OK_5)
        self.agent.request(b"GET", b"http://b.test/")
        self.agent.request(b"GET", b"http://a.test:81/")
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_not_reused_while_busy(self):
        d1, conn1 = self.request()
        d2, conn2 = self.request()
        self.assertIsNotNone(conn2)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_connection_close_not_reused(self):
        d, conn = self.request()
        self.respond(d, conn, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(conn.transport.disconnecting)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_http10_not_reused(self):
        d, conn = self.request()
        response, body = self.respond(d, conn, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(response.version, (b"HTTP", 1, 0))
        self.assertEqual(body.body, b"ok")
        self.assertTrue(conn.transport.disconnecting)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_http10_keep_alive_reused(self):
        d, conn = self.request()
        self.respond(d, conn, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
        self.assertFalse(conn.transport.disconnecting)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_close_delimited_not_reused(self):
        d, conn = self.request()
        self.respond(d, conn, b"HTTP/1.1 200 OK\r\n\r\nstuff")
        conn.lose()
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_extra_bytes_after_body_not_reused(self):
        d, conn = self.request()
        response, body = self.respond(d, conn, OK_5 + b"junk")
        self.assertEqual(body.body, b"hello")
        self.assertTrue(conn.transport.disconnecting)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_extra_bytes_after_bodiless_response_not_reused(self):
        """
        A server that sends a body with a HEAD, 204 or 304 answer (or bytes
        after Content-Length: 0) must not desynchronise the next request
        on the connection.
        """
        for method, head in (
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ):
            before = len(self.reactor.tcpClients)
            d, conn = self.request(method, uri=b"http://junk.test/" + method)
            self.respond(d, conn, head + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake")
            d2 = self.agent.request(b"GET", b"http://junk.test/next")
            self.assertEqual(len(self.reactor.tcpClients), before + 2, head)
            self.assertNoResult(d2)
            self.agent.closeCachedConnections()

    def test_unsolicited_bytes_while_idle_abort(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        conn.feed(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(conn.transport.aborted)
        # Not reused even before connectionLost arrives.
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        conn.lose(ConnectionLost())

    def test_idle_connection_lost_is_forgotten(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        conn.lose()
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_idle_timeout_on_take(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        # Move time without running the sweeper: the age check on reuse.
        self.reactor.rightNow += 61
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_young_idle_connection_reused(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        self.reactor.advance(59)
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_sweeper_closes_idle_connections(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(30)
        d2, conn2 = self.request(uri=b"http://other.test/")
        self.respond(d2, conn2, OK_5)
        self.reactor.advance(31)
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(conn2.transport.disconnecting)
        # Still one idle connection: the sweeper runs again.
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(60)
        self.assertTrue(conn2.transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_max_idle_per_origin(self):
        self.agent = PooledAgent(self.reactor, max_idle_per_origin=2)
        pending = [self.request(uri=b"http://example.test/%d" % i) for i in range(3)]
        self.assertEqual(len(self.reactor.tcpClients), 3)
        for d, conn in pending:
            self.respond(d, conn, OK_5)
        conns = [conn for _, conn in pending]
        self.assertEqual([c.transport.disconnecting for c in conns], [False, False, True])
        for i in range(2):
            self.agent.request(b"GET", b"http://example.test/again")
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.agent.request(b"GET", b"http://example.test/again")
        self.assertEqual(len(self.reactor.tcpClients), 4)

    def test_close_cached_connections(self):
        busy_d, busy = self.request()
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        self.successResultOf(self.agent.closeCachedConnections())
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(busy.transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_response_before_streamed_body_finished(self):
        producer = ManualBodyProducer(length=4)
        d, conn = self.request(b"POST", body=producer)
        response, body = self.respond(d, conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(body.reason.check(ResponseDone))
        # Not pooled until the body is fully written.
        self.agent.request(b"GET", b"http://example.test/x")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        producer.consumer.write(b"data")
        producer.finished.callback(None)
        conn.transport.clear()
        self.agent.request(b"GET", b"http://example.test/y")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(conn.sent().startswith(b"GET /y "))


class RetryTests(AgentTestCase):
    def pooled(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        conn.transport.clear()
        return conn

    def test_idempotent_retried_once_on_new_connection(self):
        old = self.pooled()
        d = self.agent.request(b"GET", b"http://example.test/again")
        self.assertTrue(old.sent().startswith(b"GET /again "))
        old.lose()
        self.assertEqual(len(self.reactor.tcpClients), 2)
        new = self.connection().complete()
        self.assertEqual(new.sent(), b"GET /again HTTP/1.1\r\nHost: example.test\r\n\r\n")
        response, body = self.respond(d, new, OK_5)
        self.assertEqual(body.body, b"hello")

    def test_bytes_body_retried(self):
        old = self.pooled()
        d = self.agent.request(b"PUT", b"http://example.test/r", None, BytesBodyProducer(b"abc"))
        old.lose()
        new = self.connection().complete()
        self.assertTrue(new.sent().endswith(b"\r\nContent-Length: 3\r\n\r\nabc"))
        self.assertNoResult(d)

    def test_retry_only_once(self):
        old = self.pooled()
        d = self.agent.request(b"GET", b"http://example.test/again")
        old.lose()
        new = self.connection().complete()
        new.lose()
        f = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(f.value.reasons[0].check(ConnectionDone))
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_post_not_retried(self):
        old = self.pooled()
        d = self.agent.request(b"POST", b"http://example.test/p", None, BytesBodyProducer(b"abc"))
        old.lose()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_streamed_put_not_retried(self):
        old = self.pooled()
        d = self.agent.request(b"PUT", b"http://example.test/p", None, ManualBodyProducer())
        old.lose()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_not_retried_after_response_bytes(self):
        old = self.pooled()
        d = self.agent.request(b"GET", b"http://example.test/again")
        old.feed(b"HTTP/1.1 200 O")
        old.lose()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_fresh_connection_not_retried(self):
        d, conn = self.request()
        conn.lose()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.reactor.tcpClients), 1)


class FailureTests(AgentTestCase):
    def test_cancel_before_response_aborts(self):
        d, conn = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(conn.transport.aborted)
        conn.lose(ConnectionLost())
        self.agent.request(b"GET", b"http://example.test/next")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_cancel_on_reused_connection(self):
        d, conn = self.request()
        self.respond(d, conn, OK_5)
        d = self.agent.request(b"GET", b"http://example.test/next")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(conn.transport.aborted)
        conn.lose(ConnectionLost())
        # The cancelled request is not retried.
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_cancel_while_connecting(self):
        d = self.agent.request(b"GET", b"http://example.test/")
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_connection_refused(self):
        d = self.agent.request(b"GET", b"http://example.test/")
        self.connection().refuse()
        self.reactor.advance(1)
        self.failureResultOf(d, ConnectionRefusedError)

    def test_connection_refused_by_an_ip_address_fails_at_once(self):
        """
        An upstream given by IP address is connected to directly: a refusal
        fails the request without the 0.3 s attempt delay of a resolved
        name (a dead target would cost every request that long).
        """
        for host, uri in (("127.0.0.1", b"http://127.0.0.1:8001/"), ("::1", b"http://[::1]:8001/")):
            d = self.agent.request(b"GET", uri)
            self.assertEqual(self.reactor.tcpClients[-1][:2], (host, 8001))
            self.connection().refuse()
            self.failureResultOf(d, ConnectionRefusedError)

    def test_per_request_connect_timeout(self):
        self.agent.request(b"GET", b"http://127.0.0.1:8001/", connect_timeout=2.5)
        self.assertEqual(self.connection().timeout, 2.5)

    def test_connect_timeout_passed(self):
        agent = PooledAgent(self.reactor, connect_timeout=7)
        agent.request(b"GET", b"http://example.test/")
        self.assertEqual(self.connection().timeout, 7)

    def test_connection_lost_before_response(self):
        d, conn = self.request()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-")
        conn.lose(ConnectionLost())
        f = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(f.value.reasons[0].check(ConnectionLost))
