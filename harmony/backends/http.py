# -*- test-case-name: tests.unit.test_backends -*-
"""
The C{http} backend: a streaming reverse proxy to C{base_url}.

Method, path (relative to the endpoint prefix), query, headers (minus
hop-by-hop), body, status, response headers and response body pass through
byte-exact.  Requests go through the shared C{IAgent} (one connection pool
for the process) rather than C{treq}'s C{HTTPClient.request}: treq adds a
process-wide cookie jar (a proxy would leak one client's cookies to the
next), follows redirects and gunzips bodies, none of which a proxy may do.
"""

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from harmony.config.schema import REQUIRED, Bool, Field, Number, Schema, Str
from harmony.envelope import Headers, ResponseEnvelope
from harmony.errors import UpstreamTimeout, UpstreamUnavailable
from harmony.http.client import PooledAgent
from harmony.http.headers import end_to_end_raw
from harmony.interfaces import IBackend
from harmony.logs import logger
from harmony.streams import Stream, body_producer
from harmony.timeouts import Deadlines
from harmony.tls import check_pair, client_tls, place, tls_failure_reason, warn_once


def _check_base_url(value):
    if not (value.startswith("http://") or value.startswith("https://")):
        return f'expected an http:// or https:// URL, got "{value}"'
    if "?" in value or "#" in value:
        return f'must not contain a query or fragment, got "{value}"'
    return None


def _check_tls(options, where):
    check_pair(options, where, "tls_cert_path", "tls_key_path")
    if not options.tls_verify:
        if options.tls_ca_path:
            raise where.child("tls_ca_path").error("a CA bundle is for verifying: remove it or set tls_verify = true")
        warn_once(
            where.child("tls_verify"),
            "the upstream's TLS certificate is not verified (anyone on the path can read and change the traffic)",
        )


OPTIONS = Schema(
    {
        "base_url": Field(Str(nonempty=True, check=_check_base_url), REQUIRED, "upstream base URL"),
        "timeout_secs": Field(
            Number(min=0.001, max=3600), 30.0, "time allowed for the upstream's response headers (connect included)"
        ),
        "connect_timeout_secs": Field(Number(min=0.001, max=3600), 10.0, "time allowed to open a connection"),
        # HTTPS upstreams (harmony.tls): read at startup.
        "tls_ca_path": Field(Str(), "", "PEM CA bundle to verify the upstream with (default: the system's)"),
        "tls_verify": Field(Bool(), True, "false: do not verify the upstream's certificate (warned at startup)"),
        "tls_cert_path": Field(Str(), "", "PEM client certificate chain for mutual TLS (with tls_key_path)"),
        "tls_key_path": Field(Str(), "", "PEM private key of tls_cert_path (not encrypted)"),
    },
    check=_check_tls,
)

log = logger("harmony.backends.http")

#: Response bodies up to this size (known from Content-Length) are read
#: whole before answering; larger or unknown-length ones are streamed.
SMALL_BODY = 64 * 1024

_UNAVAILABLE = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionLost,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
)


class _Collect(Protocol):
    """
    Reads a small response body into memory.
    """

    def __init__(self, finished):
        self._chunks = []
        self._finished = finished

    def dataReceived(self, data):
        self._chunks.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(UpstreamUnavailable("Upstream connection lost before the body was complete"))


class _Feed(Protocol):
    """
    Feeds a streamed response body into a L{Stream}, pausing the upstream
    connection when the stream is full.
    """

    def __init__(self, stream):
        self._stream = stream

    def connectionMade(self):
        self._stream.attach_producer(self.transport)

    def dataReceived(self, data):
        self._stream.write(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self._stream.finish()
        else:
            self._stream.fail(UpstreamUnavailable("Upstream connection lost in the middle of the body"))


_FORWARDING = frozenset({b"host", b"expect", b"x-forwarded-for", b"forwarded"})
_FORWARDING_ID = _FORWARDING | {b"x-request-id"}


def forwarded_headers(details, request_id=None):
    """
    The request's end-to-end headers as byte pairs, with C{Host} and
    C{Expect} removed and C{X-Forwarded-For}/C{-Host}/C{-Proto} and
    C{Forwarded} added (appended to what earlier proxies sent).

    @param request_id: the request's id (C{metadata["request_id"]}): sent
        as the one C{X-Request-ID} (the client's, when it sent a valid
        one, is that id: never twice).
    """
    pairs = end_to_end_raw(details.headers.raw(), _FORWARDING_ID if request_id else _FORWARDING)
    if request_id:
        pairs.append((b"X-Request-ID", request_id.encode("ascii")))
    prior_for, prior_fwd, host = [], [], b""
    has_xfh = has_xfp = False
    for k, v in details.headers.raw():
        lk = k.lower()
        if lk == b"x-forwarded-for":
            prior_for.append(v)
        elif lk == b"forwarded":
            prior_fwd.append(v)
        elif lk == b"host" and not host:
            host = v
        elif lk == b"x-forwarded-host":
            has_xfh = True
        elif lk == b"x-forwarded-proto":
            has_xfp = True
    scheme = details.scheme.encode("ascii")
    client = (details.client[0] or "").encode("latin-1") if details.client else b""
    if client:
        pairs.append((b"X-Forwarded-For", b", ".join(prior_for + [client])))
    elif prior_for:
        pairs.append((b"X-Forwarded-For", b", ".join(prior_for)))
    if host and not has_xfh:
        pairs.append((b"X-Forwarded-Host", host))
    if not has_xfp:
        pairs.append((b"X-Forwarded-Proto", scheme))
    node = b'"[' + client + b']"' if b":" in client else client
    element = b";".join(
        p for p in (b"for=" + node if node else b"", b'host="' + host + b'"' if host else b"", b"proto=" + scheme) if p
    )
    pairs.append((b"Forwarded", b", ".join(prior_fwd + [element])))
    return pairs


@implementer(IBackend)
class HttpBackend:
    """
    Proxies requests to C{options.base_url}.

    Target details set by middleware (C{envelope.target}) override parts
    of the request: C{base_url}, C{path} (relative, no leading slash),
    C{method}, C{query_string}.
    """

    service_type = "http"

    def __init__(self, name, options, context):
        self.name = name
        self.options = options
        self._agent = context.agent
        # Harmony's own agent takes headers as byte pairs (no Headers object).
        self._raw_headers = isinstance(context.agent, PooledAgent)
        self._clock = context.reactor
        self._base = options.base_url.rstrip("/")
        self._timeout = options.timeout_secs
        # One timer for all the requests in flight (harmony.timeouts).
        self._deadlines = Deadlines(self._clock, options.timeout_secs) if self._clock is not None else None
        self._connect_timeout = options.connect_timeout_secs
        self._tls = self._tls_policy(name, options, getattr(context, "config", None))

    @staticmethod
    def _tls_policy(name, options, config):
        """
        This backend's C{IPolicyForHTTPS} (its own CA bundle, client
        certificate or no verification), or C{None}: the agent's default
        (the system's trust store, host name checked).

        @raise ConfigError: a TLS file is unusable.
        """
        if options.tls_verify and not options.tls_ca_path and not options.tls_cert_path:
            return None
        return client_tls(
            place(config, "backends", name, "options"),
            ca_path=options.tls_ca_path,
            verify=options.tls_verify,
            cert_path=options.tls_cert_path,
            key_path=options.tls_key_path,
        )

    def url(self, envelope):
        """
        The upstream URL for a request.
        """
        target = envelope.target
        base = (target.get("base_url") or self._base).rstrip("/")
        path = target.get("path", envelope.details.path)
        query = target.get("query_string", envelope.details.query_string)
        url = f"{base}/{path}" if path else (base or "/")
        if query:
            url += "?" + query
        return url

    def handle(self, envelope):
        details = envelope.details
        method = envelope.target.get("method", details.method).upper()
        out_headers = forwarded_headers(details, envelope.metadata.get("request_id"))
        if not self._raw_headers:
            twisted_headers = TwistedHeaders()
            for name, value in out_headers:
                twisted_headers.addRawHeader(name, value)
            out_headers = twisted_headers
        body = envelope.body
        if body is not None and not isinstance(body, Stream) and not body and method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            producer = None
        else:
            producer = body_producer(body)
        url = self.url(envelope).encode("latin-1")

        timed_out = []
        if self._raw_headers:
            d = self._agent.request(method.encode("ascii"), url, out_headers, producer, self._connect_timeout, self._tls)
        else:
            d = self._agent.request(method.encode("ascii"), url, out_headers, producer)

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(self._clock, self._timeout)
        timer = deadlines.add(on_timeout)

        def stop_timer(result):
            deadlines.remove(timer)
            return result

        def failed(reason):
            if timed_out:
                log.warn("Backend {backend}: upstream timed out after {secs}s", backend=self.name, secs=self._timeout)
                raise UpstreamTimeout()
            if reason.check(defer.CancelledError):
                return reason
            if reason.check(*_UNAVAILABLE):
                tls_reason = tls_failure_reason(reason)
                if tls_reason is not None:
                    log.warn("Backend {backend}: upstream TLS failed: {reason}", backend=self.name, reason=tls_reason)
                    raise UpstreamUnavailable()
                log.warn(
                    "Backend {backend}: upstream unavailable ({kind})",
                    backend=self.name,
                    kind=reason.type.__name__,
                )
                raise UpstreamUnavailable()
            return reason

        d.addBoth(stop_timer)
        d.addCallbacks(self._response, failed)
        return d

    def _response(self, response):
        raw = getattr(response, "raw_headers", None)
        if raw is None:
            raw = [(name, value) for name, values in response.headers.getAllRawHeaders() for value in values]
        # Hop-by-hop headers (and those named in Connection) stay on this
        # hop; Content-Length is kept: a HEAD answer's entity length.
        pairs = end_to_end_raw(raw)
        pairs += [(k, v) for k, v in raw if k.lower() == b"content-length"]
        headers = Headers.from_raw(pairs)
        length = response.length
        if length is not UNKNOWN_LENGTH and length <= SMALL_BODY:
            finished = defer.Deferred()
            response.deliverBody(_Collect(finished))
            return finished.addCallback(
                lambda body: ResponseEnvelope(status=response.code, headers=headers, body=body)
            )
        stream = Stream(length=None if length is UNKNOWN_LENGTH else length)
        response.deliverBody(_Feed(stream))
        return ResponseEnvelope(status=response.code, headers=headers, body=stream)

    def health_check(self, check):
        """
        One active health check: C{GET <base_url><check.path>}.

        @param check: the backend's validated C{health_check} table.
        @return: Deferred[C{None}] when healthy, else a short reason
            (C{str}); the caller applies the timeout (cancels it).
        """
        url = (self._base + "/" + check.path.lstrip("/")).encode("latin-1")
        if self._raw_headers:
            d = self._agent.request(b"GET", url, [], None, self._connect_timeout, self._tls)
        else:
            d = self._agent.request(b"GET", url, TwistedHeaders(), None)

        def answered(response):
            finished = defer.Deferred()
            response.deliverBody(_Discard(finished))
            if response.code in check.expected_statuses:
                return finished.addCallback(lambda _: None)
            return finished.addCallback(lambda _: f"status {response.code}")

        def failed(reason):
            if reason.check(defer.CancelledError):
                return reason
            tls_reason = tls_failure_reason(reason)
            return f"TLS: {tls_reason}" if tls_reason is not None else reason.type.__name__

        return d.addCallbacks(answered, failed)

    def close(self):
        return defer.succeed(None)


class _Discard(Protocol):
    """
    Reads a response body and drops it (the connection can be reused).
    """

    def __init__(self, finished):
        self._finished = finished

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        self._finished.callback(None)
