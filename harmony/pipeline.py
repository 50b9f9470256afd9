# -*- test-case-name: tests.unit.test_pipeline -*-
"""
The pipeline executor: endpoint -> request middleware -> backend(s) ->
response middleware -> endpoint, with typed errors rendered by the endpoint
that matched.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import HarmonyError, InternalError, ServiceUnavailable, UpstreamUnavailable
from harmony.logs import logger
from harmony.streams import Stream

log = logger("harmony.pipeline")

#: Methods that may be sent again to the next backend (RFC 9110 idempotent methods).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
#: DIMSE operations that may be sent again.
IDEMPOTENT_OPERATIONS = frozenset({"echo", "find"})


_START = object()


def _same(value):
    return value


def _then(value, fn, *args):
    """
    C{fn(value, *args)} now, or when C{value} (a Deferred) fires.
    """
    if isinstance(value, defer.Deferred):
        return value.addCallback(fn, *args)
    return fn(value, *args)


class PipelineExecutor:
    """
    Runs requests through one pipeline.

    @param name: the pipeline name.
    @param request_chain: L{IMiddleware}s whose request hooks run, in order.
    @param response_chain: L{IMiddleware}s whose response hooks run, in
        the order given (the list form of the config passes the request
        chain reversed).
    @param backends: L{IBackend}s; more than one = ordered failover.
    @param failover_non_idempotent: also fail over POST/PATCH.
    @param metrics: a L{harmony.metrics.PipelineMetrics} recording every
        request, or C{None}.
    """

    def __init__(self, name, request_chain, response_chain, backends, failover_non_idempotent=False, metrics=None):
        self.name = name
        self.request_chain = tuple(request_chain)
        self.response_chain = tuple(response_chain)
        self.backends = tuple(backends)
        self.failover_non_idempotent = failover_non_idempotent
        self.metrics = metrics

    def execute(self, endpoint, envelope):
        """
        Run C{envelope} through the pipeline for C{endpoint} (the endpoint
        that actually matched).

        @return: Deferred[L{ResponseEnvelope}]; never fails: errors are
            rendered by C{endpoint.render_error}.  Cancelling it cancels
            the backend call.
        """
        metrics = self.metrics
        if metrics is None:
            return self._execute(endpoint, envelope)
        started = metrics.started(envelope)
        return self._execute(endpoint, envelope).addBoth(metrics.finished, endpoint.name, envelope, started)

    def _execute(self, endpoint, envelope):
        envelope.metadata.setdefault("pipeline", self.name)
        envelope.metadata.setdefault("endpoint", endpoint.name)
        # Written as callbacks, not a coroutine: when every hook answers
        # synchronously the only Deferred is the backend's, which keeps the
        # per-request cost low (see bench/http_proxy.py).
        try:
            result = _then(endpoint.incoming(envelope), self._after_incoming, endpoint, envelope)
        except Exception:
            return defer.succeed(self._render(Failure(), endpoint))
        if isinstance(result, defer.Deferred):
            return result.addErrback(self._render, endpoint)
        return defer.succeed(result)

    def _render(self, failure, endpoint):
        if failure.check(defer.CancelledError):
            return failure
        if failure.check(HarmonyError):
            return endpoint.render_error(failure.value)
        log.failure(
            "Unexpected error in pipeline {pipeline} (endpoint {endpoint})",
            failure,
            pipeline=self.name,
            endpoint=endpoint.name,
        )
        return endpoint.render_error(InternalError())

    def _after_incoming(self, result, endpoint, envelope):
        if isinstance(result, ResponseEnvelope):
            return _then(endpoint.outgoing(envelope, result), _same)
        if result is not None:
            envelope = result
        return self._request_hooks(_START, 0, endpoint, envelope, [])

    def _request_hooks(self, result, i, endpoint, envelope, entered):
        """
        Run request hooks from index C{i}; C{result} is what hook C{i - 1}
        returned.
        """
        chain = self.request_chain
        while True:
            if result is not _START:
                mw = chain[i - 1]
                if isinstance(result, ResponseEnvelope):
                    return self._response_hooks(result, 0, endpoint, envelope, entered, True)
                if isinstance(result, RequestEnvelope):
                    envelope = result
                elif result is not None:
                    raise TypeError(f"middleware {mw.name!r} request hook returned {type(result).__name__}")
                entered.append(mw)
            if i == len(chain):
                break
            try:
                result = chain[i].request(envelope)
            except Exception:
                return self._error_response(Failure(), endpoint, envelope, entered)
            i += 1
            if isinstance(result, defer.Deferred):
                return result.addCallbacks(
                    self._request_hooks,
                    self._error_response,
                    callbackArgs=(i, endpoint, envelope, entered),
                    errbackArgs=(endpoint, envelope, entered),
                )
        return self._call_backends(envelope, 0).addCallbacks(
            self._response_hooks,
            self._error_response,
            callbackArgs=(0, endpoint, envelope, entered, False),
            errbackArgs=(endpoint, envelope, entered),
        )

    def _error_response(self, failure, endpoint, envelope, entered):
        """
        A request hook or the backend failed: the endpoint renders the
        error, and the response hooks of the middleware entered so far run
        on it (CORS headers, audit logs, header rules see errors too; the
        response's C{metadata["error"]} names the error for hooks that
        should leave it alone).
        """
        if failure.check(defer.CancelledError):
            return failure
        response = self._render(failure, endpoint)
        response.metadata.setdefault(
            "error", failure.value.error if failure.check(HarmonyError) else InternalError.error
        )
        return self._response_hooks(response, 0, endpoint, envelope, entered, True)

    def _response_hooks(self, response, i, endpoint, envelope, entered, short_circuit, result=_START):
        """
        Run response hooks from index C{i}.  After a short-circuit only the
        middleware whose request hook ran (C{entered}) take part.
        """
        chain = self.response_chain
        while True:
            if result is not _START:
                if isinstance(result, ResponseEnvelope):
                    response = result
                elif result is not None:
                    mw = chain[i - 1]
                    raise TypeError(f"middleware {mw.name!r} response hook returned {type(result).__name__}")
            if response.content_limits is None:
                # A response body parses under the limits of its request.
                response.content_limits = envelope.content_limits
            while i < len(chain) and short_circuit and chain[i] not in entered:
                i += 1
            if i == len(chain):
                break
            try:
                result = chain[i].response(envelope, response)
            except Exception:
                return self._response_hook_failed(Failure(), endpoint, envelope)
            i += 1
            if isinstance(result, defer.Deferred):
                return result.addCallbacks(
                    lambda r, i=i, response=response: self._response_hooks(
                        response, i, endpoint, envelope, entered, short_circuit, r
                    ),
                    self._response_hook_failed,
                    errbackArgs=(endpoint, envelope),
                )
        return _then(endpoint.outgoing(envelope, response), _same)

    def _response_hook_failed(self, failure, endpoint, envelope):
        """
        A response hook failed (e.g. a bridge found, rendering a result,
        that there was nothing to answer with): the endpoint renders the
        error and its outgoing hook runs (CORS headers); the remaining
        response hooks do not.
        """
        if failure.check(defer.CancelledError):
            return failure
        response = self._render(failure, endpoint)
        response.metadata.setdefault(
            "error", failure.value.error if failure.check(HarmonyError) else InternalError.error
        )
        return _then(endpoint.outgoing(envelope, response), _same)

    def call_backends(self, envelope):
        """
        Send C{envelope} to this pipeline's backends (ordered failover as
        for the pipeline's own requests), without running any middleware:
        for middleware that needs more than one backend answer to build
        its response (e.g. C{fhir_imaging}'s series-level C-FINDs), given
        to it through its optional C{bind_pipeline(executor)}.

        @return: Deferred[L{ResponseEnvelope}]
        """
        return self._call_backends(envelope, 0)

    def _may_fail_over(self, envelope):
        method = envelope.details.method
        if envelope.dicom is not None:
            return envelope.dicom.operation in IDEMPOTENT_OPERATIONS
        return method in IDEMPOTENT_METHODS or self.failover_non_idempotent

    def _call_backends(self, envelope, i):
        """
        Ask backend C{i}; on L{UpstreamUnavailable} fail over to the next
        one when the request may be sent again.

        @return: Deferred[ResponseEnvelope]
        """
        if not self.backends:
            # A DICOM-only pipeline without backends: the endpoint did the
            # work (a store-only SCP); nothing to forward.
            return defer.succeed(ResponseEnvelope(status=200))
        backend = self.backends[i]
        # The backend asked last (metrics: harmony_requests_total's label).
        envelope.metadata["backend"] = backend.name
        try:
            d = backend.handle(envelope)
        except Exception:
            d = defer.fail()
        if i + 1 < len(self.backends):
            d.addErrback(self._fail_over, envelope, i)
        return d

    def _fail_over(self, failure, envelope, i):
        # Unreachable, or (a backend with targets) none of its targets available.
        failure.trap(UpstreamUnavailable, ServiceUnavailable)
        if not self._may_fail_over(envelope):
            return failure
        if isinstance(envelope.body, Stream):
            if envelope.rewind_body is None:
                return failure
            envelope.body = envelope.rewind_body()
        log.warn(
            "Backend {backend} unavailable, failing over to {next}",
            backend=self.backends[i].name,
            next=self.backends[i + 1].name,
        )
        return self._call_backends(envelope, i + 1)

