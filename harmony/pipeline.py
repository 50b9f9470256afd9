# -*- test-case-name: tests.unit.test_pipeline -*-
"""
The pipeline executor: endpoint -> request middleware -> backend(s) ->
response middleware -> endpoint, with typed errors rendered by the endpoint
that matched.
"""

from twisted.internet import defer
from harmony.logs import logger

from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import HarmonyError, InternalError, UpstreamUnavailable
from harmony.streams import Stream

log = logger("harmony.pipeline")

#: Methods that may be sent again to the next backend.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


async def _value(result):
    """
    Await a Deferred-or-value.
    """
    if isinstance(result, defer.Deferred):
        return await result
    return result


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
    """

    def __init__(self, name, request_chain, response_chain, backends, failover_non_idempotent=False):
        self.name = name
        self.request_chain = tuple(request_chain)
        self.response_chain = tuple(response_chain)
        self.backends = tuple(backends)
        self.failover_non_idempotent = failover_non_idempotent

    def execute(self, endpoint, envelope):
        """
        Run C{envelope} through the pipeline for C{endpoint} (the endpoint
        that actually matched).

        @return: Deferred[L{ResponseEnvelope}]; never fails: errors are
            rendered by C{endpoint.render_error}.  Cancelling it cancels
            the backend call.
        """
        envelope.metadata.setdefault("pipeline", self.name)
        envelope.metadata.setdefault("endpoint", endpoint.name)
        return defer.Deferred.fromCoroutine(self._run(endpoint, envelope))

    async def _run(self, endpoint, envelope):
        try:
            return await self._flow(endpoint, envelope)
        except defer.CancelledError:
            raise
        except HarmonyError as e:
            return endpoint.render_error(e)
        except Exception:
            log.failure(
                "Unexpected error in pipeline {pipeline} (endpoint {endpoint})",
                pipeline=self.name,
                endpoint=endpoint.name,
            )
            return endpoint.render_error(InternalError())

    async def _flow(self, endpoint, envelope):
        result = await _value(endpoint.incoming(envelope))
        if isinstance(result, ResponseEnvelope):
            return await _value(endpoint.outgoing(envelope, result))
        if result is not None:
            envelope = result

        entered = set()
        response = None
        for mw in self.request_chain:
            result = await _value(mw.request(envelope))
            if isinstance(result, ResponseEnvelope):
                response = result
                break
            if isinstance(result, RequestEnvelope):
                envelope = result
            elif result is not None:
                raise TypeError(f"middleware {mw.name!r} request hook returned {type(result).__name__}")
            entered.add(id(mw))

        short_circuit = response is not None
        if not short_circuit:
            response = await self._call_backends(envelope)

        for mw in self.response_chain:
            if short_circuit and id(mw) not in entered:
                continue
            result = await _value(mw.response(envelope, response))
            if isinstance(result, ResponseEnvelope):
                response = result
            elif result is not None:
                raise TypeError(f"middleware {mw.name!r} response hook returned {type(result).__name__}")

        return await _value(endpoint.outgoing(envelope, response))

    def _may_fail_over(self, envelope):
        method = envelope.details.method
        if envelope.dicom is not None:
            return envelope.dicom.operation in ("echo", "find")
        return method in IDEMPOTENT_METHODS or self.failover_non_idempotent

    async def _call_backends(self, envelope):
        last = len(self.backends) - 1
        for i, backend in enumerate(self.backends):
            try:
                return await backend.handle(envelope)
            except UpstreamUnavailable:
                if i == last or not self._may_fail_over(envelope):
                    raise
                if isinstance(envelope.body, Stream):
                    if envelope.rewind_body is None:
                        raise
                    envelope.body = envelope.rewind_body()
                log.warn(
                    "Backend {backend} unavailable, failing over to {next}",
                    backend=backend.name,
                    next=self.backends[i + 1].name,
                )
        raise UpstreamUnavailable()
