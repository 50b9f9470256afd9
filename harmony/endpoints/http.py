# -*- test-case-name: tests.unit.test_endpoints -*-
"""
The C{http} and C{echo} endpoint services: every method and every path
under C{path_prefix} goes into the pipeline; errors render as JSON
C{{"error": ..., "message": ...}}.
"""

from zope.interface import implementer

from harmony.config.schema import REQUIRED, Field, Int, Schema, Str
from harmony.envelope import ResponseEnvelope
from harmony.http.headers import json_error_body
from harmony.http.routing import ALL_METHODS, Route, check_prefix
from harmony.interfaces import IEndpoint

OPTIONS = Schema(
    {
        "path_prefix": Field(
            Str(nonempty=True, check=check_prefix), REQUIRED, "URL prefix served by this endpoint"
        ),
        "max_body_size": Field(
            Int(min=1), None, "bytes; overrides [proxy.content_limits] max_body_size for this endpoint"
        ),
    }
)


def render_json_error(error):
    """
    A typed error as Harmony's HTTP JSON error response.
    """
    return ResponseEnvelope.json(error.status, json_error_body(error), headers=error.headers)


@implementer(IEndpoint)
class HttpEndpoint:
    """
    A plain HTTP entry: routes everything under its prefix.
    """

    service_type = "http"

    def __init__(self, name, options, context=None):
        self.name = name
        self.options = options

    def http_routes(self):
        return [Route(self.options.path_prefix, self, None, ALL_METHODS)]

    def listen_addresses(self):
        return []

    def services(self, executor, reactor):
        return []

    def incoming(self, envelope):
        return None

    def outgoing(self, envelope, response):
        return response

    def render_error(self, error):
        return render_json_error(error)


class EchoEndpoint(HttpEndpoint):
    """
    The C{echo} endpoint service: an HTTP entry, kept as its own type for
    configurations written for the Rust Harmony (pair it with the C{echo}
    backend to see what Harmony received).
    """

    service_type = "echo"
