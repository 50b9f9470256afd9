# -*- test-case-name: tests.unit.test_http_site -*-
"""
One Klein application and one C{twisted.web.server.Site} per network.

The Klein app has a single catch-all route; Harmony's own L{RouteTable}
picks the endpoint (longest prefix, fixed routes, conflicts detected at
startup) and the endpoint's pipeline answers.
"""

import json

from klein import Klein
from harmony.logs import logger
from twisted.web import server
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from harmony.errors import HarmonyError, InternalError, MethodNotAllowed
from harmony.http.headers import json_error_body
from harmony.http.routing import ALL_METHODS

log = logger("harmony.http")


class _AnyPath(BaseConverter):
    """
    Matches any path, empty and with repeated slashes included.
    """

    regex = ".*"
    part_isolating = False


def _json_error(request, error):
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return json.dumps(json_error_body(error)).encode("utf-8")


class NetworkApp:
    """
    The HTTP application of one network.

    @param network: the network name.
    @param routes: its L{harmony.http.routing.RouteTable}.
    @param executors: pipeline name -> L{harmony.pipeline.PipelineExecutor}.
    @param adapter: the L{harmony.http.adapter.HttpAdapter}.
    """

    app = Klein()
    app.url_map.converters["harmony_path"] = _AnyPath

    def __init__(self, network, routes, executors, adapter):
        self.network = network
        self.routes = routes
        self.executors = executors
        self.adapter = adapter

    @app.route(
        "/<harmony_path:rest>",
        methods=sorted(ALL_METHODS),
        merge_slashes=False,
        strict_slashes=False,
    )
    def dispatch(self, request, rest):
        path = request.path.decode("latin-1")
        method = request.method.decode("ascii")
        try:
            route, relative = self.routes.resolve(method, path)
            envelope = self.adapter.to_envelope(request, route, relative)
        except HarmonyError as e:
            return _json_error(request, e)
        d = self.executors[route.pipeline].execute(route.endpoint, envelope)
        d.addCallback(self._write, request, route)
        return d

    def _write(self, response, request, route):
        d = self.adapter.write_response(request, response)
        d.addErrback(
            lambda f: log.failure(
                "Writing the response of endpoint {endpoint} failed", f, endpoint=route.endpoint.name
            )
        )
        return d

    @app.handle_errors(HTTPException)
    def werkzeug_error(self, request, failure):
        # Methods outside ALL_METHODS reach here as werkzeug's 405.
        if failure.value.code == 405:
            return _json_error(request, MethodNotAllowed(sorted(ALL_METHODS)))
        error = HarmonyError(failure.value.description)
        error.status = failure.value.code
        error.error = "http_error"
        return _json_error(request, error)

    @app.handle_errors(Exception)
    def unexpected_error(self, request, failure):
        log.failure("Unexpected error on network {network}", failure, network=self.network)
        return _json_error(request, InternalError())

    def resource(self):
        return self.app.resource()


class HarmonySite(server.Site):
    """
    A Site that does not write twisted.web's access log: its lines carry
    the full URI, and query strings can hold patient identifiers.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request):
        pass


def make_site(app, reactor=None):
    site = HarmonySite(app.resource(), reactor=reactor)
    return site

