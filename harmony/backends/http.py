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
from harmony.logs import logger
from twisted.web import _newclient
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from harmony.config.schema import REQUIRED, Field, Number, Schema, Str
from harmony.envelope import Headers, ResponseEnvelope
from harmony.errors import UpstreamTimeout, UpstreamUnavailable
from harmony.http.client import PooledAgent
from harmony.http.headers import end_to_end
from harmony.interfaces import IBackend
from harmony.streams import Stream, body_producer


def _check_base_url(value):
    if not (value.startswith("http://") or value.startswith("https://")):
        return f'expected an http:// or https:// URL, got "{value}"'
    if "?" in value or "#" in value:
        return f'must not contain a query or fragment, got "{value}"'
    return None


OPTIONS = Schema(
    {
        "base_url": Field(Str(nonempty=True, check=_check_base_url), REQUIRED, "upstream base URL"),
        "timeout_secs": Field(
            Number(min=0.001, max=3600), 30.0, "time allowed for the upstream's response headers"
        ),
    }
)

log = logger("harmony.backends.http")

#: Response bodies up to this size (known from Content-Length) are read
#: whole before answering; larger or unknown-length ones are streamed.
SMALL_BODY = 64 * 1024

_UNAVAILABLE = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionLost,
    _newclient.ResponseNeverReceived,
    _newclient.RequestTransmissionFailed,
    _newclient.ResponseFailed,
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


def _forwarding_headers(headers, details):
    """
    Add X-Forwarded-For/-Host/-Proto and Forwarded for the upstream.
    """
    client = details.client[0] if details.client else None
    original_host = details.headers.get("host", "")
    if client:
        prior = headers.get("x-forwarded-for")
        headers.set("X-Forwarded-For", f"{prior}, {client}" if prior else client)
    if original_host:
        headers.setdefault("X-Forwarded-Host", original_host)
    headers.setdefault("X-Forwarded-Proto", details.scheme)
    node = f'"[{client}]"' if client and ":" in client else client
    element = ";".join(
        p
        for p in (
            f"for={node}" if node else "",
            f'host="{original_host}"' if original_host else "",
            f"proto={details.scheme}",
        )
        if p
    )
    prior = headers.get("forwarded")
    headers.set("Forwarded", f"{prior}, {element}" if prior else element)


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
        headers = end_to_end(details.headers, drop=("host", "expect"))
        _forwarding_headers(headers, details)
        if self._raw_headers:
            out_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        else:
            out_headers = TwistedHeaders()
            for name, value in headers:
                out_headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        body = envelope.body
        if body is not None and not isinstance(body, Stream) and not body and method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            producer = None
        else:
            producer = body_producer(body)
        url = self.url(envelope).encode("latin-1")

        timed_out = []
        d = self._agent.request(method.encode("ascii"), url, out_headers, producer)

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        delayed = self._clock.callLater(self._timeout, on_timeout)

        def stop_timer(result):
            if delayed.active():
                delayed.cancel()
            return result

        def failed(reason):
            if timed_out:
                log.warn("Backend {backend}: upstream timed out after {secs}s", backend=self.name, secs=self._timeout)
                raise UpstreamTimeout()
            if reason.check(defer.CancelledError):
                return reason
            if reason.check(*_UNAVAILABLE):
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
        headers = Headers((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
        # Hop-by-hop headers (and those named in Connection) stay on this
        # hop; Content-Length is kept: a HEAD answer's entity length.
        length_values = headers.get_all("content-length")
        headers = end_to_end(headers)
        for value in length_values:
            headers.add("Content-Length", value)
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

    def close(self):
        return defer.succeed(None)
