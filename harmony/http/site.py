# -*- test-case-name: tests.unit.test_http_site -*-
"""
One C{twisted.web.server.Site} per network.

Every request gets a request id (L{harmony.http.request_id}) and one
access line (L{harmony.logs.http_access}: method, path without the query,
status, bytes, duration, client, network, pipeline, request id) when it
ends, also when it was refused (413) or the client went away.

The root resource of a network's site is a L{NetworkResource}: Harmony's
own L{RouteTable} picks the endpoint (longest prefix, fixed routes,
conflicts detected at startup) and the endpoint's pipeline answers.

Why not a Klein app here: measured on this machine (CPU per request,
C{bench/http_proxy.py}), Klein's per-request machinery (werkzeug map
binding and matching, request adaptation, Deferred wrapping) costs about
100 microseconds, a third of the whole proxied request, which alone makes
the 3.3k requests/s per process target unreachable; the route table does
the matching that Klein would do.  Endpoints with many parameterised fixed
routes (DICOMweb, JMIX, management) keep using instance-bound Klein apps
behind their prefix.
"""

import json
import tempfile
import time
from io import BytesIO

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource

from harmony import logs
from harmony.errors import HarmonyError, InternalError, PayloadTooLarge
from harmony.http import request_id
from harmony.http.client import TRANSPORT_BUFFER
from harmony.http.headers import json_error_body
from harmony.logs import logger

log = logger("harmony.http")

#: Request bodies up to this size are kept in memory, larger ones are
#: spooled to a temporary file by twisted.web.
MEMORY_BODY_LIMIT = 1024 * 1024


def json_error(request, error):
    """
    Write a typed error's status and headers on a twisted.web request and
    return its JSON body.
    """
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return json.dumps(json_error_body(error)).encode("utf-8")


class NetworkResource(Resource):
    """
    The root resource of one network: every request goes through the route
    table to an endpoint's pipeline.

    @param network: the network name.
    @param routes: its L{harmony.http.routing.RouteTable}.
    @param executors: pipeline name -> L{harmony.pipeline.PipelineExecutor}.
    @param adapter: the L{harmony.http.adapter.HttpAdapter}.
    """

    isLeaf = True

    def __init__(self, network, routes, executors, adapter):
        Resource.__init__(self)
        self.network = network
        self.routes = routes
        self.executors = executors
        self.adapter = adapter
        #: Requests being answered (see L{harmony.tap.GatewayService}).
        self.in_flight = 0

    def render(self, request):
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        route = None
        request_id.for_request(request)
        try:
            route, relative = self.routes.resolve(method, path)
            request.harmony_pipeline = route.pipeline
            envelope = self.adapter.to_envelope(request, route, relative)
        except HarmonyError as e:
            # In the protocol of the endpoint that owns the path, when one
            # does (a FHIR endpoint answers with an OperationOutcome).
            owner = route or self.routes.owner(path)
            if owner is not None:
                try:
                    response = owner.endpoint.render_error(e)
                except Exception:
                    log.failure("Rendering an error for endpoint {endpoint} failed", endpoint=owner.endpoint.name)
                    return json_error(request, e)
                d = defer.maybeDeferred(self.adapter.write_response, request, response)
                d.addErrback(self._failed, request, owner)
                return server.NOT_DONE_YET
            return json_error(request, e)
        except Exception:
            log.failure("Unexpected error on network {network}", network=self.network)
            return json_error(request, InternalError())
        # Until the response is written (or the client went away): what a
        # graceful shutdown waits for.  Asked before the pipeline runs: a
        # request answered at once is finished when execute() returns.
        self.in_flight += 1
        finished = request.notifyFinish()
        finished.addBoth(self._finished)
        d = self.executors[route.pipeline].execute(route.endpoint, envelope)
        d.addCallback(self._write, request)
        d.addErrback(self._failed, request, route)
        # A client that goes away cancels the pipeline (and the backend call).
        finished.addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    def _finished(self, result):
        self.in_flight -= 1
        return result

    def route_for(self, method, uri):
        """
        The route of a request line (bytes), or C{None}: for limits that
        apply before the request is processed.
        """
        try:
            path = uri.split(b"?", 1)[0].decode("latin-1")
            route, _ = self.routes.resolve(method.decode("latin-1"), path)
        except Exception:
            return None
        return route

    def _write(self, response, request):
        return self.adapter.write_response(request, response)

    def resource(self):
        """
        This resource (the Site root), for symmetry with Klein apps.
        """
        return self

    def _failed(self, failure, request, route):
        if failure.check(CancelledError):
            return None
        log.failure(
            "Writing the response of endpoint {endpoint} failed", failure, endpoint=route.endpoint.name
        )
        return None


#: The former name (a Klein app in the first cut of the HTTP side).
NetworkApp = NetworkResource


_date_cache = [0, b""]


def http_date(now=None):
    """
    The C{Date} header value, formatted once per second.
    """
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = datetimeToString(second)
    return _date_cache[1]


class HarmonyRequest(server.Request):
    """
    A request that skips what a gateway does not use: twisted.web's parsing
    of form and multipart bodies into C{request.args} (memory-hungry with
    large uploads; bodies are passed on untouched) and resource traversal
    (the network resource is a leaf).
    """

    _refused = False
    _received = 0
    #: The access line was written.
    _logged = False
    #: The pipeline that answered (set by L{NetworkResource}).
    harmony_pipeline = None

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)
        # Created on the request line: the access line's duration counts
        # from here.
        self._site = site = getattr(self.channel, "site", None)
        self._started = site.reactor.seconds() if site is not None else time.time()

    def access(self, status, length, aborted=False):
        """
        Write this request's access line (once).
        """
        if self._logged:
            return
        self._logged = True
        if not logs.access_enabled():
            return
        site = self._site
        now = site.reactor.seconds() if site is not None else time.time()
        method, path = self.method, self.path
        if path is None:
            # Refused before the request was complete: from the request line.
            channel = self.channel
            method = getattr(channel, "_command", None) or b"-"
            path = (getattr(channel, "_path", None) or b"-").split(b"?", 1)[0]
        logs.http_access(
            method.decode("latin-1"),
            path.decode("latin-1"),
            status,
            length,
            now - self._started,
            getattr(self.client, "host", None),
            getattr(getattr(site, "resource", None), "network", None),
            self.harmony_pipeline,
            getattr(self, "harmony_request_id", None),
            aborted,
        )

    def connectionLost(self, reason):
        if not self.finished and not self._logged and self.path is not None:
            # The client went away (or the response was aborted): 499
            # (nginx's "client closed request") when no status was sent.
            self.access(self.code if self.startedWriting else 499, self.sentLength, aborted=True)
        super().connectionLost(reason)

    # -- body size limit: refused before the body is read ----------------------

    _route = False  # not looked up yet

    def _target(self):
        """
        The route this request goes to (C{None}: none), from the request
        line, before the body is read.
        """
        if self._route is False:
            self._route = None
            resource = getattr(getattr(self.channel, "site", None), "resource", None)
            resolve = getattr(resource, "route_for", None)
            channel = self.channel
            if resolve is not None:
                method = getattr(channel, "_command", b"") or b""
                uri = getattr(channel, "_path", b"") or b""
                self._route = resolve(method, uri)
        return self._route

    def _limit(self):
        """
        The body size limit: the matched endpoint's (C{max_body_size}
        option), else the network's ([proxy.content_limits]).
        """
        site = getattr(self.channel, "site", None)
        route = self._target()
        if route is not None:
            return site.resource.adapter.limits_for(route.endpoint).max_body_size
        return getattr(site, "max_body_size", None)

    def gotLength(self, length):
        if length:  # no body (most GETs): no limit to look up
            limit = self._limit()
            if limit is not None and length > limit:
                self._refuse()
                return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            # A chunked body that outgrows the limit.
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self):
        """
        Answer 413 at once and close: the body is never read or stored.
        """
        self._refused = True
        self.content = BytesIO()  # stays empty: chunks are dropped
        # No "100 Continue" after this answer.
        self.requestHeaders.removeHeader(b"expect")
        content_type, body = b"application/json", None
        route = self._target()
        if route is not None:
            # In the endpoint's own protocol (e.g. a FHIR OperationOutcome).
            try:
                rendered = route.endpoint.render_error(PayloadTooLarge())
                if isinstance(rendered.body, (bytes, bytearray)):
                    body = bytes(rendered.body)
                    content_type = (rendered.headers.get("content-type") or "application/json").encode("latin-1")
            except Exception:
                log.failure("Rendering a 413 for endpoint {endpoint} failed", endpoint=route.endpoint.name)
        if body is None:
            body = json.dumps(json_error_body(PayloadTooLarge())).encode("utf-8")
        rid = request_id.for_request(self).encode("ascii")
        if route is not None:
            self.harmony_pipeline = route.pipeline
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: " + content_type + b"\r\n"
            b"X-Request-ID: " + rid + b"\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self.access(413, len(body))
        transport.loseConnection()

    def process(self):
        if self._refused:
            return
        self.site = self.channel.site
        transport = self.channel.transport
        if getattr(transport, "bufferSize", TRANSPORT_BUFFER) < TRANSPORT_BUFFER:
            # Fewer pauses of a streamed response body (Twisted: 64 KiB).
            transport.bufferSize = TRANSPORT_BUFFER
        self.setHeader(b"Server", b"Harmony")
        self.setHeader(b"Date", http_date())
        self.prepath = []
        self.postpath = []
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())


class HarmonyChannel(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, remembering what does not change on a
    connection: twisted.web asks for the local address (a C{getsockname}
    system call) and whether the transport is TLS (an interface lookup)
    on every request.
    """

    _host = None
    _secure = None

    def getHost(self):
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def isSecure(self):
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure


def _channel(factory):
    # twisted.web's own factory, with HarmonyChannel for HTTPChannel.
    return http._GenericHTTPChannelProtocol(HarmonyChannel())


class HarmonySite(server.Site):
    """
    A Site that keeps small bodies in memory, and writes Harmony's access
    line (L{harmony.logs.http_access}) instead of twisted.web's access log:
    its lines carry the full URI, and query strings can hold patient
    identifiers.
    """

    noisy = False
    displayTracebacks = False
    requestFactory = HarmonyRequest
    protocol = _channel
    #: Request bodies larger than this get 413 before they are read
    #: ([proxy.content_limits] max_body_size; None: no limit here).
    max_body_size = None

    def log(self, request):
        access = getattr(request, "access", None)
        if access is not None:
            access(request.code, request.sentLength)

    def getContentFile(self, length):
        if length is not None and length <= MEMORY_BODY_LIMIT:
            return BytesIO()
        return tempfile.TemporaryFile()


def make_site(resource, reactor=None, max_body_size=None):
    """
    The Site of a network, given its L{NetworkResource}.
    """
    site = HarmonySite(resource, reactor=reactor)
    site.max_body_size = max_body_size
    return site
