# -*- test-case-name: tests.unit.test_http_adapter -*-
"""
twisted.web requests in and out of envelopes.

The request id (L{harmony.http.request_id}) goes into
C{envelope.metadata["request_id"]}; the response keeps Harmony's
C{X-Request-ID} (a backend's own is not passed on: one id per request).
"""

from collections.abc import Mapping
from io import BytesIO
from urllib.parse import parse_qs

from twisted.internet import defer
from zope.interface import implementer

from harmony.envelope import Headers, RequestDetails, RequestEnvelope, body_length
from harmony.errors import PayloadTooLarge
from harmony.http import request_id, sendfile
from harmony.http.bodies import ContentLimits
from harmony.http.headers import HOP_BY_HOP
from harmony.interfaces import IProtocolAdapter
from harmony.logs import logger
from harmony.streams import Stream, StreamCancelled

log = logger("harmony.http")

#: Statuses that never carry a body (RFC 9110).
NO_BODY_STATUSES = frozenset({204, 304}) | frozenset(range(100, 200))

#: Singleton headers that twisted.web sets on every response; a backend's
#: value replaces them (never two Date or Server headers).
_DEFAULTED = frozenset({b"server", b"date"})
_SKIP = frozenset(n.encode("ascii") for n in HOP_BY_HOP) | {b"content-length", request_id.HEADER}


def _first_token(value):
    return value.split(",")[0].strip() if value else ""


def _forwarded(value):
    """
    The C{host} and C{proto} of the first element of a C{Forwarded} header.
    """
    out = {}
    for pair in _first_token(value).split(";"):
        if "=" in pair:
            k, v = pair.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return out


def public_base_url(headers, scheme, local_host, client_host, public_url="", trusted=()):
    """
    The externally visible base URL (C{scheme://host[:port]}) for links:
    the configured C{public_base_url}; else C{Forwarded}/C{X-Forwarded-*}
    when the client is a trusted proxy; else the C{Host} header.
    """
    if public_url:
        return public_url.rstrip("/")
    host = headers.get("host") or local_host
    if client_host in trusted:
        fwd = _forwarded(headers.get("forwarded", ""))
        scheme = fwd.get("proto") or _first_token(headers.get("x-forwarded-proto", "")) or scheme
        host = fwd.get("host") or _first_token(headers.get("x-forwarded-host", "")) or host
    return f"{scheme}://{host}"


class _RequestHeaders:
    """
    C{get(name)} straight from a twisted.web request (no header copies).
    """

    __slots__ = ("_request",)

    def __init__(self, request):
        self._request = request

    def get(self, name, default=None):
        value = self._request.getHeader(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")


@implementer(IProtocolAdapter)
class HttpAdapter:
    """
    Builds L{RequestEnvelope}s from C{twisted.web} requests and writes
    L{ResponseEnvelope}s back, streaming bodies both ways.

    @param proxy_options: the frozen C{[proxy]} options (public base URL,
        trusted proxies, content limits).  Every envelope carries the
        C{[proxy.content_limits]} as C{content_limits} (with the endpoint's
        own C{max_body_size} when its options have one) for
        L{RequestEnvelope.parse_body}.
    """

    protocol = "http"

    def __init__(self, proxy_options):
        self._public_url = proxy_options.public_base_url
        self._trusted = frozenset(proxy_options.trusted_proxies)
        self._limits = ContentLimits.from_options(getattr(proxy_options, "content_limits", None))
        self._max_body_size = self._limits.max_body_size
        # id(endpoint) -> (endpoint, its ContentLimits)
        self._endpoint_limits = {}

    def limits_for(self, endpoint):
        """
        The content limits of requests to C{endpoint}: the proxy's, with
        the endpoint's C{options.max_body_size} when it has one.
        """
        entry = self._endpoint_limits.get(id(endpoint))
        if entry is None or entry[0] is not endpoint:
            options = getattr(endpoint, "options", None)
            if isinstance(options, Mapping):
                override = options.get("max_body_size")
            else:
                override = getattr(options, "max_body_size", None)
            limits = self._limits if override is None else self._limits.with_max_body_size(override)
            entry = self._endpoint_limits[id(endpoint)] = (endpoint, limits)
        return entry[1]

    def to_envelope(self, raw, route, relative_path=""):
        request = raw
        uri = request.uri.decode("latin-1")
        path, _, query_string = uri.partition("?")
        headers = Headers.from_raw(
            [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
        )
        client = request.getClientAddress()
        client_host = getattr(client, "host", None)
        scheme = "https" if request.isSecure() else "http"
        host_header = request.getHeader(b"host")
        if self._public_url or host_header:
            local = ""
        else:
            host = request.getHost()
            name = getattr(host, "host", "localhost")
            name = f"[{name}]" if ":" in name else name
            local = f"{name}:{getattr(host, 'port', '')}".rstrip(":")
        cookies = request.received_cookies
        details = RequestDetails(
            method=request.method.decode("latin-1"),
            uri=uri,
            path=relative_path,
            full_path=path,
            query=parse_qs(query_string, keep_blank_values=True) if query_string else {},
            query_string=query_string,
            headers=headers,
            cookies={k.decode("latin-1"): v.decode("latin-1") for k, v in cookies.items()} if cookies else {},
            client=(client_host, getattr(client, "port", None)),
            scheme=scheme,
            base_url=public_base_url(
                _RequestHeaders(request), scheme, local, client_host, self._public_url, self._trusted
            ),
            prefix=route.prefix,
        )
        body = self._body(request)
        length = body_length(body)
        limits = self.limits_for(route.endpoint)
        if limits.max_body_size is not None and length is not None and length > limits.max_body_size:
            raise PayloadTooLarge()
        envelope = RequestEnvelope(details=details, body=body, content_limits=limits)
        if isinstance(envelope.body, Stream):
            envelope.rewind_body = lambda: self._body(request)
        metadata = envelope.metadata
        metadata["protocol"] = "http"
        metadata["request_id"] = request_id.for_request(request)
        return envelope

    @staticmethod
    def _body(request):
        """
        The request body: bytes when twisted.web kept it in memory, else a
        L{Stream} over the temporary file it was spooled to.
        """
        content = request.content
        if content is None:
            return b""
        if isinstance(content, BytesIO):
            return content.getvalue()
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        return Stream.from_file(content, length=length, close=False)

    def write_response(self, raw, response):
        """
        Write status, headers and body; bodies that are streams are piped
        with backpressure.  A failure in the middle of a streamed body
        aborts the connection (the status line is already sent).

        @return: Deferred[None]
        """
        request = raw
        if request.channel is None:
            # The client went away while the pipeline ran.
            if isinstance(response.body, Stream):
                response.body.cancel()
            return defer.succeed(None)
        request.setResponseCode(response.status)
        out = request.responseHeaders
        raw = response.headers.raw()
        typed = False
        for name, value in raw:
            lname = name.lower()
            if lname in _SKIP:
                continue
            if lname == b"content-type":
                typed = True
            if lname in _DEFAULTED and out.hasHeader(lname):
                out.removeHeader(lname)
            out.addRawHeader(name, value)
        if not typed:
            # No text/html default from twisted.web: pass the body on as is.
            request.defaultContentType = None
        body = response.body
        if request.method == b"HEAD":
            # A HEAD answer describes the GET entity: keep its length.
            cl = response.headers.get("content-length")
            if cl is None and body is not None and body_length(body) is not None:
                cl = str(body_length(body))
            if cl is not None:
                out.setRawHeaders(b"content-length", [cl.encode("latin-1")])
            if isinstance(body, Stream):
                body.cancel()
            request.finish()
            return defer.succeed(None)
        if response.status in NO_BODY_STATUSES:
            if isinstance(body, Stream):
                body.cancel()
            request.finish()
            return defer.succeed(None)
        length = body_length(body)
        if length is not None:
            out.setRawHeaders(b"content-length", [str(length).encode("ascii")])
        if not isinstance(body, Stream):
            if body:
                request.write(body)
            request.finish()
            return defer.succeed(None)

        def done(_):
            if request.channel is not None:
                request.finish()

        def failed(reason):
            if request.channel is None or reason.check(StreamCancelled):
                # The client went away: nothing to report.
                return None
            log.error(
                "Response body failed after the status was sent; aborting the connection: {error}",
                error=reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else reason,
            )
            request.channel.transport.abortConnection()

        source = None
        if sendfile.usable(request):
            try:
                source = body.take_file()
            except OSError:
                source = None  # read as usual (and failed there, the same way)
        if source is not None:
            return sendfile.SendfileWriter(request, source).start().addCallbacks(done, failed)
        return body.pipe_to(request).addCallbacks(done, failed)
