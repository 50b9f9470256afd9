# -*- test-case-name: tests.unit.test_interfaces -*-
"""
Every contract between Harmony's parts.

Providers are checked with C{verifyObject} in the tests, fakes included.
"Deferred-or-value" means the method may return a plain value or a
C{Deferred} firing with it.
"""

from zope.interface import Attribute, Interface


class IEndpoint(Interface):
    """
    An inbound protocol entry of a pipeline (HTTP, FHIR, DICOMweb, DIMSE...).
    """

    name = Attribute("The endpoint's name in the configuration.")
    service_type = Attribute("The service type name (C{'http'}, C{'echo'}, ...).")
    options = Attribute("The endpoint's validated, frozen options.")

    def http_routes():
        """
        The HTTP routes this endpoint serves on its pipeline's networks.

        @return: a list of L{harmony.http.routing.Route} (empty for
            endpoints that are not HTTP-based).
        """

    def listen_addresses():
        """
        The addresses this endpoint listens on itself (DICOM SCP endpoints),
        for startup checks and summaries; no side effects.

        @return: a list of C{(bind_address, port)} (empty for endpoints
            served on HTTP networks).
        """

    def services(executor, reactor):
        """
        The services that run this endpoint's own listeners (called once at
        startup, never when only checking a configuration).

        @param executor: the L{harmony.pipeline.PipelineExecutor} of the
            endpoint's pipeline.
        @return: a list of C{IService} providers (empty for HTTP endpoints).
        """

    def incoming(envelope):
        """
        Endpoint hook on the way in, before any middleware.

        @param envelope: a L{harmony.envelope.RequestEnvelope}.
        @return: Deferred-or-value: a L{RequestEnvelope}, or a
            L{ResponseEnvelope} to answer at once.
        """

    def outgoing(envelope, response):
        """
        Endpoint hook on the way out, after the response middleware.

        @return: Deferred-or-value: the L{ResponseEnvelope} to render.
        """

    def render_error(error):
        """
        Render a typed error in this endpoint's protocol.

        @param error: a L{harmony.errors.HarmonyError}.
        @return: a L{ResponseEnvelope} (HTTP: JSON C{{"error", "message"}};
            FHIR: OperationOutcome; DIMSE: status + Error Comment).
        """


class IMiddleware(Interface):
    """
    A request/response hook in a pipeline, built once at startup.

    Optionally it may also have C{bind_pipeline(executor)}: called once
    when its pipeline is built, with the L{harmony.pipeline.PipelineExecutor}
    whose C{call_backends(envelope)} lets the middleware ask the pipeline's
    backends more than once for one request.
    """

    name = Attribute("The middleware instance name.")

    def request(envelope):
        """
        Request hook.

        @return: Deferred-or-value: C{None} (carry on with C{envelope}), a
            L{RequestEnvelope} (carry on with that one), or a
            L{ResponseEnvelope} to short-circuit: later request hooks and
            the backend are skipped; response hooks of the middleware
            entered before run in reverse order, this one's does not.
            Raising a L{harmony.errors.HarmonyError} answers with that error.
        """

    def response(envelope, response):
        """
        Response hook.

        @return: Deferred-or-value: C{None} (keep C{response}) or a
            replacement L{ResponseEnvelope}.
        """


class IBackend(Interface):
    """
    Answers requests: echo, HTTP, FHIR, DICOMweb, DICOM SCU.
    """

    name = Attribute("The backend's name in the configuration.")
    service_type = Attribute("The service type name.")

    def handle(envelope):
        """
        Answer a request.

        @param envelope: a L{harmony.envelope.RequestEnvelope}.
        @return: Deferred[L{harmony.envelope.ResponseEnvelope}]; fails with
            a L{harmony.errors.HarmonyError}:
            L{UpstreamUnavailable} when the upstream could not be reached
            before any response byte (ordered failover tries the next
            backend), L{UpstreamTimeout} on timeout.
        """

    def close():
        """
        Release connections and timers at shutdown.

        @return: Deferred[None]
        """


class IProtocolAdapter(Interface):
    """
    Moves one protocol's traffic in and out of envelopes (HTTP requests,
    DIMSE associations).
    """

    protocol = Attribute("The protocol name (C{'http'}, C{'dimse'}).")

    def to_envelope(raw, route):
        """
        Build a L{RequestEnvelope} from a protocol request.

        @param raw: the protocol's request object.
        @param route: the matched route (endpoint, pipeline, prefix).
        """

    def write_response(raw, response):
        """
        Send a L{ResponseEnvelope} back in the protocol.

        @return: Deferred[None] firing when the whole response is written.
        """


class IServiceType(Interface):
    """
    A service type: makes endpoints and/or backends of one kind.
    Third parties provide this (plus C{twisted.plugin.IPlugin}) in a
    C{twisted/plugins/} module, or name it with C{module = "pkg.mod:Obj"}.
    """

    name = Attribute("The type name used in C{service = ...}.")
    endpoint_options = Attribute(
        "A L{harmony.config.schema.Schema} for endpoint options, or C{None} "
        "if this type cannot be an endpoint."
    )
    backend_options = Attribute(
        "A L{harmony.config.schema.Schema} for backend options, or C{None} "
        "if this type cannot be a backend."
    )

    def make_endpoint(name, options, context):
        """
        @param options: the validated options.
        @param context: a L{harmony.registry.BuildContext}.
        @return: an L{IEndpoint} provider.
        """

    def make_backend(name, options, context):
        """
        @return: an L{IBackend} provider.
        """


class IMiddlewareType(Interface):
    """
    A middleware type: validates options and builds instances.
    """

    name = Attribute("The type name used in C{type = ...}.")
    options = Attribute("A L{harmony.config.schema.Schema} for its options.")

    def make(name, options, context):
        """
        @return: an L{IMiddleware} provider.
        """
