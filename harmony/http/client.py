# -*- test-case-name: tests.unit.test_http_client -*-
"""
A lean HTTP/1.1 client agent with keep-alive connection pooling, built for
proxying.

L{PooledAgent} provides C{IAgent}, so everything that takes an agent
(treq's C{HTTPClient}, the C{http} backend, tests with
C{treq.testing.RequestTraversalAgent}) can use it.  Compared with
C{twisted.web.client.Agent} it does per request only what a reverse proxy
needs: the request head and a small body go out in one write, endpoints
are cached per origin (no IDNA work per request), TCP_NODELAY is set, the
response head is parsed in one pass and header objects are built lazily.
Measured in C{bench/http_proxy.py}.

Responses: C{Content-Length}, chunked, and close-delimited bodies; no body
for HEAD, 1xx, 204 and 304.  A request on a reused connection that the
server closed before answering is retried once on a new connection when it
is safe (idempotent method, or a body held in memory).
"""

import re

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from harmony.logs import logger

log = logger("harmony.http.client")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
_NO_BODY = frozenset({204, 304})
_HEX = b"0123456789abcdefABCDEF"
#: Longest response head accepted (status line + headers).
MAX_HEAD = 64 * 1024
#: Bytes that would split or end the request line (CVE-2019-12387 in Agent).
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")


#: The end of every complete body (a Failure is costly to build; body
#: protocols only inspect it).
_DONE = Failure(ResponseDone())


class ResponseHeadTooLarge(Exception):
    pass


class MalformedResponse(Exception):
    pass


def split_url(uri):
    """
    C{b"http://h:1/p?q"} -> (scheme, host, port, target) with the default
    port filled in and C{b"/"} for an empty path.
    """
    scheme, sep, rest = uri.partition(b"://")
    if not sep or scheme not in (b"http", b"https"):
        raise ValueError(f"unsupported URL {uri[:60]!r}")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(x for x in (slash, query, len(rest)) if x >= 0)
    netloc, target = rest[:cut], rest[cut:]
    if not target or target.startswith(b"?"):
        target = b"/" + target
    if netloc.startswith(b"["):
        end = netloc.index(b"]")
        host, portpart = netloc[1:end], netloc[end + 1 :]
    else:
        host, _, portpart = netloc.rpartition(b":") if b":" in netloc else (netloc, b"", b"")
        portpart = b":" + portpart if portpart else b""
    port = int(portpart[1:]) if portpart.startswith(b":") and portpart[1:] else (443 if scheme == b"https" else 80)
    return scheme, host, port, target


@implementer(IPushProducer)
class _BodyTransport:
    """
    The transport a body protocol sees: pausing it pauses the connection.
    Once its response is complete it no longer touches the connection
    (which may be serving another request by then).
    """

    def __init__(self, connection, response):
        self._connection = connection
        self._response = response

    def _live(self):
        return self._connection._response is self._response

    def pauseProducing(self):
        if self._live():
            self._connection.transport.pauseProducing()

    def resumeProducing(self):
        if self._live():
            self._connection.transport.resumeProducing()

    def stopProducing(self):
        if self._live():
            self._connection.abort()

    def loseConnection(self):
        self.stopProducing()


@implementer(IResponse)
class _Response:
    """
    A response whose body is delivered to one protocol.
    """

    previousResponse = None
    request = None

    def __init__(self, connection, version, code, phrase, raw_headers, length):
        self._connection = connection
        self.version = version
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.length = length
        self._headers = None
        self._protocol = None
        self._buffer = []
        self._end = None

    @property
    def headers(self):
        if self._headers is None:
            h = Headers()
            for name, value in self.raw_headers:
                h.addRawHeader(name, value)
            self._headers = h
        return self._headers

    def setPreviousResponse(self, response):
        self.previousResponse = response

    def deliverBody(self, protocol):
        if self._protocol is not None:
            raise RuntimeError("deliverBody called twice")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection, self))
        buffered, self._buffer = self._buffer, None
        for chunk in buffered:
            protocol.dataReceived(chunk)
        if self._end is not None:
            protocol.connectionLost(self._end)

    def _data(self, data):
        if self._protocol is None:
            self._buffer.append(data)
        else:
            self._protocol.dataReceived(data)

    def _finish(self, reason):
        if self._protocol is None:
            self._end = reason
        else:
            self._protocol.connectionLost(reason)


class _Consumer:
    """
    Writes a streamed request body, chunk-encoding it when its length is
    unknown.
    """

    def __init__(self, transport, chunked):
        self._transport = transport
        self._chunked = chunked

    def write(self, data):
        if not data:
            return
        if self._chunked:
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._transport.write(data)

    def registerProducer(self, producer, streaming):
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self._transport.unregisterProducer()


def _request_head(method, target, host, headers):
    """
    The request line and headers (without the final empty line) as a list
    of byte strings.

    @raise ValueError: a header name or value holds CR or LF.
    """
    lines = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    if isinstance(headers, Headers):
        headers = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    explicit_host = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            explicit_host = True
        elif lname == b"content-length" or lname == b"transfer-encoding":
            continue
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            raise ValueError("header names and values must not contain CR or LF")
        lines += [name, b": ", value, b"\r\n"]
    if explicit_host:
        # An explicit Host header wins over the URL's.
        lines[3:6] = [b" HTTP/1.1\r\n"]
    return lines


#: Socket read size and write-buffer threshold of Harmony's HTTP
#: connections (both sides of a proxied request).
TRANSPORT_BUFFER = 512 * 1024


class HTTP11Connection(Protocol):
    """
    One keep-alive connection: one request at a time.
    """

    def __init__(self, agent, key):
        self._agent = agent
        self.key = key
        self._state = "idle"
        self._buf = b""
        self._finished = None
        self._response = None
        self._remaining = 0
        self._method = None
        self._keep_alive = True
        self._got_bytes = False
        self._body_done = None
        self.reused = False
        self.lost = False
        self.idle_since = 0.0

    def connectionMade(self):
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
        # Read up to this much per recv (Twisted's default is 64 KiB): large
        # proxied bodies (DICOM studies) then take fewer reactor turns.
        if getattr(self.transport, "bufferSize", None) is not None:
            self.transport.bufferSize = TRANSPORT_BUFFER

    # -- sending --------------------------------------------------------

    def send(self, method, target, host, headers, producer):
        """
        @return: Deferred[_Response] firing when the response head arrived.
        """
        try:
            lines = _request_head(method, target, host, headers)
        except ValueError:
            # Nothing was written: the connection stays usable.
            self._agent._release(self)
            return defer.fail()
        self._state = "status"
        self._method = method
        self._keep_alive = True
        self._got_bytes = False
        self._finished = defer.Deferred(lambda d: self.abort())
        data = getattr(producer, "body_bytes", None) if producer is not None else None
        self._body_done = None
        if producer is None:
            lines.append(b"\r\n")
            self.transport.write(b"".join(lines))
        elif data is not None:
            lines += [b"Content-Length: ", b"%d" % len(data), b"\r\n\r\n", data]
            self.transport.write(b"".join(lines))
        else:
            chunked = producer.length is UNKNOWN_LENGTH
            if chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
            else:
                lines += [b"Content-Length: ", b"%d" % producer.length, b"\r\n\r\n"]
            self.transport.write(b"".join(lines))
            # The producer is paused by the socket when its buffer is full.
            self.transport.registerProducer(producer, True)
            self._body_done = defer.maybeDeferred(producer.startProducing, _Consumer(self.transport, chunked))
            self._body_done.addCallbacks(self._body_sent, self._body_failed, callbackArgs=(chunked,))
        return self._finished

    def _body_sent(self, _, chunked):
        if not self.lost:
            self.transport.unregisterProducer()
        if chunked and not self.lost:
            self.transport.write(b"0\r\n\r\n")
        self._body_done = None
        if self._state == "idle":
            self._agent._release(self)

    def _body_failed(self, reason):
        self._body_done = None
        if not self.lost:
            self.transport.unregisterProducer()
        self._keep_alive = False
        if self._finished is not None and not self._finished.called:
            d, self._finished = self._finished, None
            d.errback(RequestTransmissionFailed([reason]))
        self.abort()

    # -- receiving ------------------------------------------------------

    def dataReceived(self, data):
        self._got_bytes = True
        if self._state == "body":
            self._body(data)
            return
        if self._state == "idle":
            # Bytes nobody asked for: the connection cannot be trusted.
            self.abort()
            return
        self._buf += data
        self._parse()

    def _parse(self):
        while self._state == "status":
            end = self._buf.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(self._buf) > MAX_HEAD):
                self._fail_head(ResponseHeadTooLarge())
                return
            if end < 0:
                return
            head, self._buf = self._buf[:end], self._buf[end + 4 :]
            try:
                self._head(head)
            except (ValueError, IndexError) as e:
                self._fail_head(MalformedResponse(str(e)))
                return
        if self._state == "body" and self._buf:
            data, self._buf = self._buf, b""
            self._body(data)

    def _head(self, head):
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        version = status[0]
        if not version.startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1.x status line")
        if len(status[1]) != 3 or not status[1].isdigit():
            raise ValueError("bad status code")
        code = int(status[1])
        phrase = status[2] if len(status) > 2 else b""
        if 100 <= code < 200:
            return  # interim response: wait for the final one
        raw = []
        length = None
        encoding = None
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError("malformed header line")
            value = value.strip()
            lname = name.lower()
            if lname == b"content-length":
                # Digits only: lenient parsing (signs, "_", spaces) lets a
                # response be framed differently than the server meant.
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ValueError("invalid or conflicting Content-Length")
                length = int(value)
            elif lname == b"transfer-encoding":
                encoding = value.lower() if encoding is None else encoding + b"," + value.lower()
            elif lname == b"connection":
                connection = value.lower()
            raw.append((name, value))
        minor = version[7:8]
        if b"close" in connection or (minor == b"0" and b"keep-alive" not in connection):
            self._keep_alive = False
        no_body = self._method == b"HEAD" or code in _NO_BODY
        if no_body:
            mode, remaining, ilength = "none", 0, 0
        elif encoding is not None:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length; a
            # final coding other than chunked is read until close.
            if encoding.rsplit(b",", 1)[-1].strip() == b"chunked":
                mode, remaining, ilength = "chunked", 0, UNKNOWN_LENGTH
            else:
                mode, remaining, ilength = "close", 0, UNKNOWN_LENGTH
                self._keep_alive = False
        elif length is not None:
            mode, remaining, ilength = "length", length, length
        else:
            mode, remaining, ilength = "close", 0, UNKNOWN_LENGTH
            self._keep_alive = False
        self._mode = mode
        self._remaining = remaining
        self._chunk_state = "size"
        response = _Response(self, (b"HTTP", 1, int(minor or 1)), code, phrase, raw, ilength)
        self._response = response
        self._state = "body"
        d, self._finished = self._finished, None
        if d is not None:
            d.callback(response)
        if mode == "none" or (mode == "length" and remaining == 0):
            if self._buf:
                # Bytes past a response without body: do not reuse.
                self._keep_alive = False
                self._buf = b""
            self._body_complete()

    def _fail_head(self, exc):
        self._keep_alive = False
        d, self._finished = self._finished, None
        if d is not None:
            d.errback(ResponseNeverReceived([Failure(exc)]))
        self.abort()

    def _body(self, data):
        mode = self._mode
        if mode == "length":
            n = self._remaining
            if len(data) <= n:
                self._remaining = n - len(data)
                self._response._data(data)
                if self._remaining == 0:
                    self._body_complete()
            else:
                self._response._data(data[:n])
                self._remaining = 0
                self._keep_alive = False  # extra bytes: do not reuse
                self._body_complete()
        elif mode == "close":
            self._response._data(data)
        elif mode == "chunked":
            self._chunked(data)
        else:
            self._keep_alive = False
            self.abort()

    def _chunked(self, data):
        buf = self._buf + data
        self._buf = b""
        while buf:
            if self._chunk_state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        return self._body_error(MalformedResponse("chunk size line too long"))
                    self._buf = buf
                    return
                digits = buf[:end].split(b";", 1)[0].rstrip(b" \t")
                if not digits or digits.strip(_HEX) or len(digits) > 16:
                    return self._body_error(MalformedResponse("bad chunk size"))
                size = int(digits, 16)
                buf = buf[end + 2 :]
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._remaining = size
                    self._chunk_state = "data"
            elif self._chunk_state == "data":
                n = self._remaining
                piece, buf = buf[:n], buf[n:]
                self._remaining = n - len(piece)
                self._response._data(piece)
                if self._remaining == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(buf) < 2:
                    self._buf = buf
                    return
                if buf[:2] != b"\r\n":
                    return self._body_error(MalformedResponse("missing CRLF after chunk"))
                buf = buf[2:]
                self._chunk_state = "size"
            else:  # trailer: lines until an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    self._buf = buf
                    return
                line, buf = buf[:end], buf[end + 2 :]
                if not line:
                    if buf:
                        self._keep_alive = False
                    self._body_complete()
                    return

    def _body_error(self, exc):
        self._keep_alive = False
        response, self._response = self._response, None
        self._state = "closed"
        if response is not None:
            response._finish(Failure(ResponseFailed([Failure(exc)], response)))
        self.abort()

    def _body_complete(self):
        response, self._response = self._response, None
        self._state = "idle"
        if self._keep_alive:
            # A body protocol may have paused the connection on its last
            # chunk; it no longer controls it (see _BodyTransport).
            self.transport.resumeProducing()
        if self._keep_alive and self._body_done is None:
            self._agent._release(self)
        elif not self._keep_alive:
            self._state = "closed"
            self.transport.loseConnection()
        if response is not None:
            response._finish(_DONE)

    def abort(self):
        self._keep_alive = False
        # Out of the pool now: connectionLost comes a reactor turn later.
        self._agent._forget(self)
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason=None):
        self.lost = True
        self._agent._forget(self)
        d, self._finished = self._finished, None
        if d is not None and not d.called:
            d.errback(ResponseNeverReceived([reason]))
        response, self._response = self._response, None
        if response is not None:
            if self._mode == "close":
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(ResponseFailed([reason], response)))
        if self._body_done is not None:
            self._body_done.cancel()


class _ConnectionFactory(Factory):
    """
    Connects one L{HTTP11Connection} (quietly: no log line per connection).
    """

    noisy = False

    def __init__(self, connection):
        self._connection = connection

    def buildProtocol(self, addr):
        return self._connection


def _tcp_endpoint(reactor, host, port, timeout):
    """
    The client endpoint for C{host}: an IP address is connected to at once
    (HostnameEndpoint would report a refused connection only after its
    0.3 s attempt delay: a dead upstream would cost every request that
    much before failing over); a name is resolved (happy eyeballs).
    """
    text = host.decode("ascii") if isinstance(host, bytes) else host
    if isIPAddress(text):
        return TCP4ClientEndpoint(reactor, text, port, timeout=timeout)
    if isIPv6Address(text):
        return TCP6ClientEndpoint(reactor, text, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IAgent)
class PooledAgent:
    """
    An C{IAgent} with persistent connections per origin.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param connect_timeout: seconds to establish a TCP (and TLS) connection.
    @param max_idle_per_origin: idle connections kept per origin.
    @param idle_timeout: seconds an idle connection is kept.
    @param tls_policy: the default C{IPolicyForHTTPS} for https URLs
        (a request may bring its own: C{request(..., tls=policy)}).
    """

    def __init__(self, reactor, connect_timeout=10, max_idle_per_origin=64, idle_timeout=60, tls_policy=None):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout
        self._tls = tls_policy or BrowserLikePolicyForHTTPS()
        self._idle = {}
        self._sweeper = None
        self._endpoints = {}

    def request(self, method, uri, headers=None, bodyProducer=None, connect_timeout=None, tls=None):
        """
        C{IAgent.request}.  C{headers} may also be a list of C{(name, value)}
        byte pairs (cheaper than a L{Headers}); C{connect_timeout} overrides
        the agent's for the connection this request may open; C{tls} (an
        C{IPolicyForHTTPS}) overrides the agent's TLS policy for an https
        URL: connections are pooled per origin I{and} policy, so a
        connection opened with one backend's CA or client certificate never
        serves another's requests.
        """
        if _UNSAFE.search(uri) or _UNSAFE.search(method):
            return defer.fail(ValueError("spaces or control characters in the method or URL"))
        try:
            scheme, host, port, target = split_url(uri)
        except ValueError as e:
            return defer.fail(e)
        key = (scheme, host, port) if tls is None or scheme != b"https" else (scheme, host, port, tls)
        default = 443 if scheme == b"https" else 80
        host_header = host if port == default else b"%s:%d" % (host, port)
        if b":" in host:
            host_header = b"[%s]" % host if port == default else b"[%s]:%d" % (host, port)
        headers = headers if headers is not None else ()
        retryable = method in _IDEMPOTENT and (bodyProducer is None or hasattr(bodyProducer, "body_bytes"))
        conn = self._take_idle(key)
        if conn is not None:
            d = conn.send(method, target, host_header, headers, bodyProducer)
            if retryable:
                d.addErrback(self._retry, conn, key, method, target, host_header, headers, bodyProducer, connect_timeout)
            return d
        return self._connect_and_send(key, method, target, host_header, headers, bodyProducer, connect_timeout)

    def _retry(self, reason, conn, key, method, target, host_header, headers, producer, connect_timeout):
        # A reused connection closed by the server before it answered:
        # try once on a fresh connection.
        if reason.check(ResponseNeverReceived) and not conn._got_bytes:
            return self._connect_and_send(key, method, target, host_header, headers, producer, connect_timeout)
        return reason

    def _connect_and_send(self, key, method, target, host_header, headers, producer, connect_timeout=None):
        conn = HTTP11Connection(self, key)
        d = self._endpoint(key, connect_timeout or self._connect_timeout).connect(_ConnectionFactory(conn))
        return d.addCallback(lambda conn: conn.send(method, target, host_header, headers, producer))

    def _endpoint(self, key, timeout):
        endpoint = self._endpoints.get((key, timeout))
        if endpoint is None:
            scheme, host, port = key[:3]
            endpoint = _tcp_endpoint(self._reactor, host, port, timeout)
            if scheme == b"https":
                policy = key[3] if len(key) > 3 else self._tls
                endpoint = wrapClientTLS(policy.creatorForNetloc(host, port), endpoint)
            self._endpoints[(key, timeout)] = endpoint
        return endpoint

    def _take_idle(self, key):
        conns = self._idle.get(key)
        if not conns:
            return None
        now = self._reactor.seconds()
        while conns:
            conn = conns.pop()
            if conn.lost:
                continue
            if now - conn.idle_since > self._idle_timeout:
                conn.transport.loseConnection()
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, conn):
        if conn.lost:
            return
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self._max_idle:
            conn.transport.loseConnection()
            return
        conn.idle_since = self._reactor.seconds()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def _sweep(self):
        """
        Close connections idle for longer than the idle timeout (checked
        every C{idle_timeout} seconds while any connection is idle).
        """
        self._sweeper = None
        now = self._reactor.seconds()
        for conns in self._idle.values():
            for conn in [c for c in conns if now - c.idle_since > self._idle_timeout]:
                conns.remove(conn)
                conn.transport.loseConnection()
        if any(self._idle.values()):
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def _forget(self, conn):
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def closeCachedConnections(self):
        """
        Close idle connections (at shutdown).

        @return: Deferred[None]
        """
        for conns in self._idle.values():
            for conn in list(conns):
                conn.transport.loseConnection()
        self._idle.clear()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        return defer.succeed(None)
