"""
Tests for L{harmony.pipeline.PipelineExecutor}.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from _fakes import FakeBackend, FakeEndpoint, RecordingMiddleware, make_request
from harmony.envelope import DicomRequest, ResponseEnvelope
from harmony.errors import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from harmony.interfaces import IBackend, IEndpoint, IMiddleware
from harmony.pipeline import PipelineExecutor
from harmony.streams import Stream, collect


def _body(response):
    return json.loads(response.body)


class _Base(SynchronousTestCase):
    def setUp(self):
        self.log = []
        self.endpoint = FakeEndpoint("ep", self.log)
        verifyObject(IEndpoint, self.endpoint)

    def middleware(self, name, **kw):
        mw = RecordingMiddleware(name, self.log, **kw)
        verifyObject(IMiddleware, mw)
        return mw

    def backend(self, name="b", result=None):
        b = FakeBackend(name, result, self.log)
        verifyObject(IBackend, b)
        return b

    def executor(self, request_chain=(), response_chain=None, backends=None, **kw):
        if response_chain is None:
            response_chain = list(reversed(request_chain))
        if backends is None:
            backends = [self.backend()]
        return PipelineExecutor("p", request_chain, response_chain, backends, **kw)

    def run_pipeline(self, executor, envelope=None):
        envelope = envelope if envelope is not None else make_request()
        return self.successResultOf(executor.execute(self.endpoint, envelope))


class OrderTests(_Base):
    def test_hooks_in_order(self):
        a, b, c = self.middleware("a"), self.middleware("b"), self.middleware("c")
        backend = self.backend()
        ex = self.executor([a, b, c], [c, b, a], [backend])
        env = make_request()
        resp = self.run_pipeline(ex, env)
        self.assertEqual(resp.body, b"ok")
        self.assertEqual(
            self.log,
            [
                ("incoming", "ep"),
                ("request", "a"),
                ("request", "b"),
                ("request", "c"),
                ("backend", "b"),
                ("response", "c"),
                ("response", "b"),
                ("response", "a"),
                ("outgoing", "ep"),
            ],
        )
        self.assertEqual(env.metadata["pipeline"], "p")
        self.assertEqual(env.metadata["endpoint"], "ep")

    def test_response_hooks_in_the_given_order(self):
        a, b = self.middleware("a"), self.middleware("b")
        ex = self.executor([a, b], [a, b])
        self.run_pipeline(ex)
        responses = [e for e in self.log if e[0] == "response"]
        self.assertEqual(responses, [("response", "a"), ("response", "b")])

    def test_separate_request_and_response_chains(self):
        left = self.middleware("left")
        right = self.middleware("right")
        ex = self.executor([left], [right])
        self.run_pipeline(ex)
        self.assertIn(("request", "left"), self.log)
        self.assertNotIn(("response", "left"), self.log)
        self.assertIn(("response", "right"), self.log)
        self.assertNotIn(("request", "right"), self.log)


class ShortCircuitTests(_Base):
    def test_short_circuit(self):
        answer = ResponseEnvelope(status=418, body=b"teapot")
        a = self.middleware("a")
        b = self.middleware("b", on_request=lambda env: answer)
        c = self.middleware("c")
        backend = self.backend()
        ex = self.executor([a, b, c], [c, b, a], [backend])
        resp = self.run_pipeline(ex)
        self.assertIs(resp, answer)
        self.assertEqual(backend.calls, [])
        self.assertEqual(
            self.log,
            [
                ("incoming", "ep"),
                ("request", "a"),
                ("request", "b"),
                ("response", "a"),
                ("outgoing", "ep"),
            ],
        )

    def test_short_circuit_reverse_order_of_entered(self):
        a, b = self.middleware("a"), self.middleware("b")
        c = self.middleware("c", on_request=lambda env: ResponseEnvelope(status=204))
        ex = self.executor([a, b, c], [c, b, a])
        resp = self.run_pipeline(ex)
        self.assertEqual(resp.status, 204)
        self.assertEqual(
            [e for e in self.log if e[0] == "response"], [("response", "b"), ("response", "a")]
        )

    def test_first_middleware_short_circuits(self):
        a = self.middleware("a", on_request=lambda env: ResponseEnvelope(status=200, body=b"cached"))
        b = self.middleware("b")
        backend = self.backend()
        ex = self.executor([a, b], [b, a], [backend])
        self.assertEqual(self.run_pipeline(ex).body, b"cached")
        self.assertEqual([e for e in self.log if e[0] in ("response", "backend")], [])

    def test_endpoint_incoming_answers(self):
        self.endpoint.incoming_result = ResponseEnvelope(status=202)
        a = self.middleware("a")
        backend = self.backend()
        ex = self.executor([a], [a], [backend])
        self.assertEqual(self.run_pipeline(ex).status, 202)
        self.assertEqual(self.log, [("incoming", "ep"), ("outgoing", "ep")])

    def test_endpoint_incoming_replaces_envelope(self):
        replacement = make_request(path="replaced")
        self.endpoint.incoming_result = replacement
        backend = self.backend()
        self.run_pipeline(self.executor(backends=[backend]))
        self.assertIs(backend.calls[0], replacement)


class DeferredAndReplacementTests(_Base):
    def test_deferred_request_hook(self):
        gate = defer.Deferred()
        a = self.middleware("a", on_request=lambda env: gate)
        backend = self.backend()
        ex = self.executor([a], [a], [backend])
        d = ex.execute(self.endpoint, make_request())
        self.assertNoResult(d)
        self.assertEqual(backend.calls, [])
        gate.callback(None)
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual(len(backend.calls), 1)

    def test_deferred_response_hook_replacement(self):
        gate = defer.Deferred()
        a = self.middleware("a", on_response=lambda env, resp: gate)
        ex = self.executor([], [a])
        d = ex.execute(self.endpoint, make_request())
        self.assertNoResult(d)
        gate.callback(ResponseEnvelope(status=299, body=b"new"))
        self.assertEqual(self.successResultOf(d).body, b"new")

    def test_replacement_request_envelope(self):
        replacement = make_request(method="PUT", path="other")
        a = self.middleware("a", on_request=lambda env: replacement)
        seen = []
        b = self.middleware("b", on_request=lambda env: seen.append(env))
        backend = self.backend()
        self.run_pipeline(self.executor([a, b], [], [backend]))
        self.assertIs(seen[0], replacement)
        self.assertIs(backend.calls[0], replacement)

    def test_replacement_response_seen_by_later_hooks(self):
        seen = []
        first = self.middleware("first", on_response=lambda env, r: ResponseEnvelope(status=201, body=b"r"))
        second = self.middleware("second", on_response=lambda env, r: seen.append(r))
        resp = self.run_pipeline(self.executor([], [first, second]))
        self.assertEqual(seen[0].status, 201)
        self.assertEqual(resp.status, 201)

    def test_deferred_failing_request_hook(self):
        a = self.middleware("a", on_request=lambda env: defer.fail(Forbidden("no access")))
        resp = self.run_pipeline(self.executor([a], [a]))
        self.assertEqual(resp.status, 403)
        self.assertEqual(_body(resp), {"error": "forbidden", "message": "no access"})


class ErrorTests(_Base):
    def _raise(self, exc):
        def hook(env):
            raise exc

        return hook

    def test_typed_errors_rendered_by_matched_endpoint(self):
        cases = [
            (Unauthorized(headers=[("WWW-Authenticate", 'Bearer realm="h"')]), 401, "unauthorized"),
            (Forbidden(), 403, "forbidden"),
            (UpstreamUnavailable(), 502, "bad_gateway"),
            (UpstreamTimeout(), 504, "gateway_timeout"),
            (PayloadTooLarge(), 413, "payload_too_large"),
        ]
        for exc, status, code in cases:
            other = FakeEndpoint("other")
            matched = FakeEndpoint("matched")
            a = self.middleware("a", on_request=self._raise(exc))
            ex = self.executor([a], [a])
            resp = self.successResultOf(ex.execute(matched, make_request()))
            self.assertEqual(resp.status, status)
            self.assertEqual(_body(resp), {"error": code, "message": exc.message})
            self.assertEqual(resp.headers.get("x-rendered-by"), "matched")
            self.assertEqual(matched.errors, [exc])
            self.assertEqual(other.errors, [])
        self.assertEqual(resp.headers.get("content-type"), "application/json")

    def test_error_headers_kept(self):
        exc = Unauthorized(headers=[("WWW-Authenticate", 'Bearer realm="h"')])
        a = self.middleware("a", on_request=self._raise(exc))
        resp = self.run_pipeline(self.executor([a], [a]))
        self.assertEqual(resp.headers.get("www-authenticate"), 'Bearer realm="h"')

    def test_backend_errors(self):
        for exc, status in ((UpstreamUnavailable, 502), (UpstreamTimeout, 504)):
            backend = self.backend(result=exc)
            resp = self.run_pipeline(self.executor(backends=[backend]))
            self.assertEqual(resp.status, status)

    def test_backend_error_goes_through_response_hooks(self):
        seen = []
        a = self.middleware("a", on_response=lambda env, resp: seen.append((resp.status, resp.metadata["error"])))
        backend = self.backend(result=UpstreamTimeout)
        resp = self.run_pipeline(self.executor([a], [a], [backend]))
        self.assertEqual(resp.status, 504)
        # e.g. CORS headers and audit events for errors too.
        self.assertEqual(seen, [(504, "gateway_timeout")])

    def test_request_hook_error_runs_the_hooks_entered_before(self):
        from harmony.errors import Unauthorized

        a = self.middleware("a")
        b = self.middleware("b", on_request=self._raise(Unauthorized("no token")))
        c = self.middleware("c")
        resp = self.run_pipeline(self.executor([a, b, c]))
        self.assertEqual(resp.status, 401)
        self.assertEqual(
            [entry for entry in self.log if entry[0] in ("request", "response")],
            [("request", "a"), ("request", "b"), ("response", "a")],
        )

    def test_deferred_request_hook_error_runs_the_hooks_entered_before(self):
        from harmony.errors import Forbidden

        a = self.middleware("a")
        b = self.middleware("b", on_request=lambda env: defer.fail(Forbidden()))
        resp = self.run_pipeline(self.executor([a, b]))
        self.assertEqual(resp.status, 403)
        self.assertEqual(
            [entry for entry in self.log if entry[0] in ("request", "response")],
            [("request", "a"), ("request", "b"), ("response", "a")],
        )

    def test_response_hook_may_change_an_error_response(self):
        def add_header(env, resp):
            resp.headers.set("Access-Control-Allow-Origin", "https://app.example")

        a = self.middleware("a", on_response=add_header)
        resp = self.run_pipeline(self.executor([a], [a], [self.backend(result=UpstreamTimeout)]))
        self.assertEqual(resp.headers.get("access-control-allow-origin"), "https://app.example")

    def test_failing_response_hook_is_rendered_and_goes_out_through_the_endpoint(self):
        def raises(env, resp):
            raise NotFound("No such study")

        def fails(env, resp):
            return defer.fail(NotFound("No such study"))

        for hook in (raises, fails):
            del self.log[:]
            inner = self.middleware("inner", on_response=hook)
            outer = self.middleware("outer")
            resp = self.run_pipeline(self.executor([outer, inner]))
            self.assertEqual(resp.status, 404)
            self.assertEqual(resp.headers.get("X-Rendered-By"), "ep")
            self.assertEqual(resp.metadata["error"], "not_found")
            # The endpoint's outgoing hook ran (CORS headers...); the
            # remaining response hooks did not.
            self.assertEqual(self.log[-2:], [("response", "inner"), ("outgoing", "ep")])

    def test_unexpected_exception_is_opaque_500(self):
        a = self.middleware("a", on_request=self._raise(ZeroDivisionError("secret internals /etc/x")))
        resp = self.run_pipeline(self.executor([a], [a]))
        self.assertEqual(resp.status, 500)
        self.assertEqual(_body(resp), {"error": "internal_error", "message": "Internal error"})
        self.assertNotIn(b"secret", resp.body)
        self.assertNotIn(b"ZeroDivision", resp.body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unexpected_backend_exception(self):
        backend = self.backend(result=KeyError("patient-id-123"))
        resp = self.run_pipeline(self.executor(backends=[backend]))
        self.assertEqual(resp.status, 500)
        self.assertNotIn(b"patient", resp.body)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_bad_hook_return_type_is_500(self):
        a = self.middleware("a", on_request=lambda env: "not an envelope")
        resp = self.run_pipeline(self.executor([a], [a]))
        self.assertEqual(resp.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        b = self.middleware("b", on_response=lambda env, r: 42)
        resp = self.run_pipeline(self.executor([], [b]))
        self.assertEqual(resp.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class FailoverTests(_Base):
    def test_get_fails_over_in_order(self):
        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b", UpstreamUnavailable)
        c = self.backend("c", ResponseEnvelope(status=200, body=b"from c"))
        resp = self.run_pipeline(self.executor(backends=[a, b, c]), make_request("GET"))
        self.assertEqual(resp.body, b"from c")
        self.assertEqual([e for e in self.log if e[0] == "backend"], [("backend", "a"), ("backend", "b"), ("backend", "c")])

    def test_first_success_stops(self):
        a = self.backend("a")
        b = self.backend("b")
        self.run_pipeline(self.executor(backends=[a, b]))
        self.assertEqual(len(a.calls), 1)
        self.assertEqual(b.calls, [])

    def test_all_unavailable(self):
        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b", UpstreamUnavailable)
        resp = self.run_pipeline(self.executor(backends=[a, b]))
        self.assertEqual(resp.status, 502)
        self.assertEqual(len(b.calls), 1)

    def test_no_available_target_fails_over(self):
        """
        A backend with targets that has none available (503) gives way to
        the next backend, as an unreachable one does.
        """
        a = self.backend("a", ServiceUnavailable)
        b = self.backend("b", ResponseEnvelope(status=200, body=b"from b"))
        resp = self.run_pipeline(self.executor(backends=[a, b]), make_request("GET"))
        self.assertEqual(resp.body, b"from b")

    def test_timeout_does_not_fail_over(self):
        a = self.backend("a", UpstreamTimeout)
        b = self.backend("b")
        resp = self.run_pipeline(self.executor(backends=[a, b]))
        self.assertEqual(resp.status, 504)
        self.assertEqual(b.calls, [])

    def test_post_does_not_fail_over(self):
        for method in ("POST", "PATCH"):
            a = self.backend("a", UpstreamUnavailable)
            b = self.backend("b")
            resp = self.run_pipeline(self.executor(backends=[a, b]), make_request(method, body=b"x"))
            self.assertEqual(resp.status, 502)
            self.assertEqual(b.calls, [])

    def test_post_fails_over_with_failover_non_idempotent(self):
        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b")
        ex = self.executor(backends=[a, b], failover_non_idempotent=True)
        resp = self.run_pipeline(ex, make_request("POST", body=b"payload"))
        self.assertEqual(resp.status, 200)
        self.assertEqual(b.bodies, [b"payload"])

    def test_stream_body_rewound(self):
        first = Stream.from_bytes(b"streamed")
        env = make_request("PUT", body=first)
        rewinds = []

        def rewind():
            s = Stream.from_bytes(b"streamed")
            rewinds.append(s)
            return s

        env.rewind_body = rewind
        received = []

        def answer(envelope):
            received.append(self.successResultOf(collect(envelope.body)))
            return ResponseEnvelope(status=200)

        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b", answer)
        resp = self.run_pipeline(self.executor(backends=[a, b]), env)
        self.assertEqual(resp.status, 200)
        self.assertIs(a.bodies[0], first)
        self.assertEqual(len(rewinds), 1)
        self.assertIs(b.bodies[0], rewinds[0])
        self.assertEqual(received, [b"streamed"])

    def test_stream_body_without_rewind_does_not_fail_over(self):
        env = make_request("PUT", body=Stream.from_bytes(b"once"))
        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b")
        resp = self.run_pipeline(self.executor(backends=[a, b]), env)
        self.assertEqual(resp.status, 502)
        self.assertEqual(b.calls, [])

    def test_dicom_failover_by_operation(self):
        for operation, expected in (("find", 200), ("echo", 200), ("store", 502), ("move", 502)):
            env = make_request("DIMSE")
            env.dicom = DicomRequest(operation)
            a = self.backend("a", UpstreamUnavailable)
            b = self.backend("b")
            resp = self.run_pipeline(self.executor(backends=[a, b]), env)
            self.assertEqual(resp.status, expected, operation)


class CancellationTests(_Base):
    def test_cancel_propagates_to_backend(self):
        cancelled = []
        pending = defer.Deferred(lambda d: cancelled.append(True))
        backend = self.backend(result=lambda env: pending)
        a = self.middleware("a")
        d = self.executor([a], [a], [backend]).execute(self.endpoint, make_request())
        self.assertNoResult(d)
        d.cancel()
        self.assertEqual(cancelled, [True])
        self.failureResultOf(d, defer.CancelledError)
        # neither a response hook nor an error rendering ran
        self.assertNotIn(("response", "a"), self.log)
        self.assertEqual(self.endpoint.errors, [])


class NoBackendTests(_Base):
    def test_dicom_only_pipeline_without_backends_answers_200(self):
        # A store-only DICOM pipeline: middleware still runs, nothing is forwarded.
        a = self.middleware("a")
        response = self.run_pipeline(self.executor([a], backends=[]))
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.body)
        self.assertEqual(
            self.log,
            [("incoming", "ep"), ("request", "a"), ("response", "a"), ("outgoing", "ep")],
        )


class CallBackendsTests(_Base):
    """
    L{PipelineExecutor.call_backends}: the backends alone, for middleware
    that asks them more than once per request.
    """

    def test_no_middleware_runs(self):
        mw = self.middleware("m")
        b = self.backend("b", ResponseEnvelope(status=200, body=b"answer"))
        executor = self.executor([mw], backends=[b])
        envelope = make_request("GET")
        response = self.successResultOf(executor.call_backends(envelope))
        self.assertEqual(response.body, b"answer")
        self.assertEqual(b.calls, [envelope])
        self.assertEqual([e for e in self.log if e[0] != "backend"], [])

    def test_fails_over_as_the_pipeline_does(self):
        a = self.backend("a", UpstreamUnavailable)
        b = self.backend("b", ResponseEnvelope(status=200, body=b"from b"))
        response = self.successResultOf(self.executor(backends=[a, b]).call_backends(make_request("GET")))
        self.assertEqual(response.body, b"from b")
        self.assertEqual(len(a.calls), 1)

    def test_errors_are_not_rendered(self):
        """
        The caller gets the typed error (it decides how to answer), not an
        endpoint's rendering of it.
        """
        a = self.backend("a", UpstreamTimeout)
        self.failureResultOf(self.executor(backends=[a]).call_backends(make_request("GET")), UpstreamTimeout)
