"""
Tests for L{harmony.backends.targets}: selection over targets, retries with
back-off and budget, passive ejection, circuit breaker, active health
checks and the status object, with fake inner backends and a
L{task.Clock}.
"""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from _fakes import FakeBackend, make_request
from harmony.backends.targets import HealthChecker, TargetedBackend, build_backend
from harmony.config import model
from harmony.config.errors import ConfigError
from harmony.config.schema import Options, Where
from harmony.envelope import DicomRequest, ResponseEnvelope
from harmony.errors import BadRequest, ServiceUnavailable, UpstreamTimeout, UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.registry import BuildContext, builtin_registry
from harmony.streams import Stream


def selection(strategy="round_robin", hash_key="client_ip", rules=(), health=None, outlier=None, breaker=None,
              retry=None):
    """
    Validated selection tables, as the loader makes them.
    """
    where = Where("test.toml")
    return Options(
        {
            "strategy": strategy,
            "hash_key": hash_key,
            "rules": tuple(model.RULE.validate(r, where) for r in rules),
            "health_check": None if health is None else model.HEALTH_CHECK.validate(health, where),
            "outlier_detection": model.OUTLIER_DETECTION.validate(outlier or {}, where),
            "circuit_breaker": model.CIRCUIT_BREAKER.validate(breaker or {}, where),
            "retry": model.RETRY.validate(retry or {}, where),
            "resilient": True,
        }
    )


class Upstream(FakeBackend):
    """
    A target's inner backend: answers with C{result} and health checks
    with C{health} (None: healthy; a str: the reason; a Deferred).
    """

    def __init__(self, name, result=None):
        super().__init__(name, result)
        self.health = None
        self.checks = 0

    def health_check(self, check):
        self.checks += 1
        health = self.health
        if isinstance(health, defer.Deferred):
            return health
        return defer.succeed(health)


def targeted(names=("a", "b"), weights=None, clock=None, random=lambda: 0.5, **kw):
    clock = clock or task.Clock()
    entries = [
        model.TargetEntry(name=n, weight=(weights or {}).get(n, 1), address=f"http://{n}.test", options=None)
        for n in names
    ]
    upstreams = [Upstream(n) for n in names]
    backend = TargetedBackend("api", "http", entries, upstreams, selection(**kw), clock, random=random)
    return backend, {u.name: u for u in upstreams}, clock


def served_by(backend, n=1, make=lambda: make_request()):
    """
    Which inner backend answered each of C{n} requests.
    """
    out = []
    for _ in range(n):
        before = {t.name: len(t.backend.calls) for t in backend.targets}
        backend.handle(make())
        out.extend(t.name for t in backend.targets if len(t.backend.calls) > before[t.name])
    return out


class SelectionTests(SynchronousTestCase):
    def test_provides_ibackend(self):
        backend, _, _ = targeted()
        verifyObject(IBackend, backend)

    def test_round_robin_over_available_targets(self):
        backend, _, _ = targeted(("a", "b", "c"))
        self.assertEqual(served_by(backend, 6), ["a", "b", "c", "a", "b", "c"])

    def test_weighted(self):
        backend, _, _ = targeted(weights={"a": 3, "b": 1}, strategy="weighted")
        picks = served_by(backend, 8)
        self.assertEqual(picks.count("a"), 6)
        self.assertEqual(picks.count("b"), 2)

    def test_failover_uses_the_first_until_it_fails(self):
        backend, up, clock = targeted(strategy="failover", outlier={"consecutive_failures": 1})
        self.assertEqual(served_by(backend, 3), ["a", "a", "a"])
        up["a"].result = UpstreamUnavailable()
        self.failureResultOf(backend.handle(make_request("POST")), UpstreamUnavailable)
        self.assertEqual(served_by(backend, 2), ["b", "b"])

    def test_hash_is_sticky_per_key(self):
        backend, _, _ = targeted(("a", "b", "c"), strategy="hash", hash_key="header:X-Patient")
        for key in ("p1", "p2", "p3", "p4"):
            picks = served_by(backend, 5, lambda: make_request(headers=[("X-Patient", key)]))
            self.assertEqual(len(set(picks)), 1, picks)

    def test_rules_choose_the_candidates(self):
        backend, _, _ = targeted(
            ("a", "b", "c"), rules=[{"match": {"header": {"X-Tenant": "t1"}}, "targets": ["c"]}]
        )
        self.assertEqual(served_by(backend, 3, lambda: make_request(headers=[("X-Tenant", "t1")])), ["c"] * 3)
        self.assertEqual(set(served_by(backend, 6)), {"a", "b", "c"})

    def test_rule_targets_all_down_is_503_even_if_others_are_up(self):
        backend, up, _ = targeted(
            ("a", "b"), rules=[{"match": {"path": "only-a/*"}, "targets": ["a"]}],
            outlier={"consecutive_failures": 1},
        )
        up["a"].result = UpstreamUnavailable()
        self.failureResultOf(backend.handle(make_request(path="only-a/x")), UpstreamUnavailable)
        failure = self.failureResultOf(backend.handle(make_request(path="only-a/x")), ServiceUnavailable)
        self.assertEqual(failure.value.message, "No target of backend 'api' is available (a: ejected)")

    def test_least_connections_avoids_the_busy_target(self):
        backend, up, _ = targeted(strategy="least_connections")
        pending = defer.Deferred()
        up["a"].result = lambda env: pending
        up["b"].result = lambda env: pending
        first = served_by(backend, 1)[0]
        other = "b" if first == "a" else "a"
        self.assertEqual(served_by(backend, 1), [other])
        self.assertEqual(backend.status()["targets"][0]["in_flight"], 1)


class RetryTests(SynchronousTestCase):
    def test_idempotent_request_is_retried_on_another_target_after_backoff(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0.1})
        up["a"].result = UpstreamUnavailable()
        d = backend.handle(make_request("GET"))
        self.assertNoResult(d)
        self.assertEqual((len(up["a"].calls), len(up["b"].calls)), (1, 0))
        clock.advance(0.049)  # equal jitter: between 0.05 and 0.1 s (random() = 0.5 -> 0.075)
        self.assertNoResult(d)
        clock.advance(0.03)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(len(up["b"].calls), 1)
        status = backend.status()
        self.assertEqual([t["retries"] for t in status["targets"]], [0, 1])
        self.assertEqual([t["failures"] for t in status["targets"]], [1, 0])

    def test_post_is_not_retried(self):
        backend, up, clock = targeted(retry={"max_retries": 2})
        up["a"].result = UpstreamUnavailable()
        self.failureResultOf(backend.handle(make_request("POST", body=b"x")), UpstreamUnavailable)
        self.assertEqual(len(up["b"].calls), 0)

    def test_post_is_retried_when_configured(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "retry_non_idempotent": True, "base_delay_secs": 0})
        up["a"].result = UpstreamTimeout()
        d = backend.handle(make_request("POST", body=b"x"))
        clock.advance(0)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(up["b"].bodies, [b"x"])
        self.assertEqual(backend.status()["targets"][0]["timeouts"], 1)

    def test_dicom_find_is_retried_store_is_not(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0})
        up["a"].result = UpstreamUnavailable()
        find = make_request("DIMSE")
        find.dicom = DicomRequest(operation="find")
        d = backend.handle(find)
        clock.advance(0)
        self.successResultOf(d)
        store = make_request("DIMSE")
        store.dicom = DicomRequest(operation="store")
        # Round robin: a, then b for the retry; the store goes to a.
        self.failureResultOf(backend.handle(store), UpstreamUnavailable)

    def test_retry_on_status_discards_the_answer(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0})
        body = Stream()
        up["a"].result = ResponseEnvelope(status=503, body=body)
        d = backend.handle(make_request())
        clock.advance(0)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertTrue(body.cancelled)

    def test_last_failing_answer_is_returned_when_retries_are_spent(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0})
        up["a"].result = ResponseEnvelope(status=503, body=b"a down")
        up["b"].result = ResponseEnvelope(status=502, body=b"b down")
        d = backend.handle(make_request())
        clock.advance(0)
        response = self.successResultOf(d)
        self.assertEqual((response.status, response.body), (502, b"b down"))

    def test_streamed_body_is_rewound_for_the_retry(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0})
        up["a"].result = UpstreamUnavailable()
        envelope = make_request("PUT", body=Stream.from_bytes(b"one"))
        rewound = Stream.from_bytes(b"two")
        envelope.rewind_body = lambda: rewound
        d = backend.handle(envelope)
        clock.advance(0)
        self.successResultOf(d)
        self.assertIs(up["b"].bodies[0], rewound)

    def test_streamed_body_without_rewind_is_not_retried(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 0})
        up["a"].result = UpstreamUnavailable()
        self.failureResultOf(backend.handle(make_request("PUT", body=Stream.from_bytes(b"x"))), UpstreamUnavailable)
        self.assertEqual(up["b"].calls, [])

    def test_request_errors_are_neither_failures_nor_retried(self):
        backend, up, clock = targeted(retry={"max_retries": 1}, outlier={"consecutive_failures": 1})
        up["a"].result = BadRequest("no")
        self.failureResultOf(backend.handle(make_request()), BadRequest)
        self.assertEqual(up["b"].calls, [])
        self.assertEqual(backend.status()["targets"][0]["state"], "available")

    def test_budget_limits_retries(self):
        backend, up, clock = targeted(
            retry={"max_retries": 1, "base_delay_secs": 0, "budget_ratio": 0, "budget_min_per_sec": 0.2,
                   "budget_window_secs": 10},
            outlier={"consecutive_failures": 0}, breaker={"failure_threshold": 0},
        )
        up["a"].result = up["b"].result = UpstreamUnavailable()
        outcomes = []
        for _ in range(4):
            d = backend.handle(make_request())
            clock.advance(0)
            self.failureResultOf(d, UpstreamUnavailable)
            outcomes.append(len(up["a"].calls) + len(up["b"].calls))
        # 0.2/s over 10 s: two retries, then none.
        self.assertEqual(outcomes, [2, 4, 5, 6])
        self.assertEqual(backend.status()["retry_budget"]["exhausted"], 2)

    def test_cancel_stops_the_attempt_and_frees_the_target(self):
        backend, up, clock = targeted(breaker={"failure_threshold": 1, "open_secs": 1})
        cancelled = []
        up["a"].result = lambda env: defer.Deferred(lambda d: cancelled.append(True))
        d = backend.handle(make_request())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(cancelled, [True])
        self.assertEqual(backend.status()["targets"][0]["in_flight"], 0)

    def test_cancel_during_backoff(self):
        backend, up, clock = targeted(retry={"max_retries": 1, "base_delay_secs": 1})
        up["a"].result = UpstreamUnavailable()
        d = backend.handle(make_request())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        clock.advance(5)
        self.assertEqual(up["b"].calls, [])


class PassiveHealthTests(SynchronousTestCase):
    def test_consecutive_failures_eject_then_the_target_returns(self):
        backend, up, clock = targeted(outlier={"consecutive_failures": 2, "base_ejection_secs": 10})
        up["a"].result = UpstreamUnavailable()
        for _ in range(4):  # a, b, a, b
            backend.handle(make_request()).addErrback(lambda f: None)
        self.assertEqual(backend.status()["targets"][0]["state"], "ejected")
        self.assertEqual(served_by(backend, 3), ["b", "b", "b"])
        up["a"].result = ResponseEnvelope(status=200)
        clock.advance(10)
        self.assertIn("a", served_by(backend, 2))

    def test_all_ejected_is_503_at_once(self):
        backend, up, clock = targeted(outlier={"consecutive_failures": 1})
        up["a"].result = up["b"].result = UpstreamUnavailable()
        for _ in range(2):
            self.failureResultOf(backend.handle(make_request()), UpstreamUnavailable)
        failure = self.failureResultOf(backend.handle(make_request()), ServiceUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(backend.status()["rejected"], 1)
        self.assertEqual(backend.status()["available"], 0)

    def test_breaker_opens_then_lets_one_trial_through(self):
        backend, up, clock = targeted(
            ("a",), outlier={"consecutive_failures": 0},
            breaker={"failure_threshold": 2, "open_secs": 5, "half_open_requests": 1, "success_threshold": 1},
        )
        up["a"].result = UpstreamUnavailable()
        for _ in range(2):
            self.failureResultOf(backend.handle(make_request()), UpstreamUnavailable)
        self.assertEqual(backend.status()["targets"][0]["breaker"]["state"], "open")
        self.failureResultOf(backend.handle(make_request()), ServiceUnavailable)
        clock.advance(5)
        trial = defer.Deferred()
        up["a"].result = lambda env: trial
        d1 = backend.handle(make_request())
        # One trial at a time while half open.
        self.failureResultOf(backend.handle(make_request()), ServiceUnavailable)
        trial.callback(ResponseEnvelope(status=200))
        self.successResultOf(d1)
        self.assertEqual(backend.status()["targets"][0]["breaker"]["state"], "closed")


class HealthCheckerTests(SynchronousTestCase):
    def test_unhealthy_targets_get_no_traffic_until_they_recover(self):
        backend, up, clock = targeted(
            health={"interval_secs": 1, "timeout_secs": 0.5, "healthy_threshold": 2, "unhealthy_threshold": 1}
        )
        checker = HealthChecker(backend, clock)
        up["a"].health = "status 500"
        checker.startService()
        clock.advance(0)
        self.assertEqual(backend.status()["targets"][0]["state"], "unhealthy")
        clock.advance(0.5)  # b's first check (spread over the interval)
        self.assertEqual(served_by(backend, 2), ["b", "b"])
        up["a"].health = None
        clock.advance(1)
        self.assertEqual(backend.status()["targets"][0]["state"], "unhealthy")  # healthy_threshold 2
        clock.advance(1)
        self.assertEqual(backend.status()["targets"][0]["state"], "available")
        self.assertIn("a", served_by(backend, 2))
        checker.stopService()
        checks = up["a"].checks
        clock.advance(10)
        self.assertEqual(up["a"].checks, checks)

    def test_a_check_that_does_not_answer_times_out(self):
        backend, up, clock = targeted(
            ("a",), health={"interval_secs": 1, "timeout_secs": 0.5, "unhealthy_threshold": 1}
        )
        cancelled = []
        up["a"].health = defer.Deferred(lambda d: cancelled.append(True))
        checker = HealthChecker(backend, clock)
        checker.startService()
        clock.advance(0)
        clock.advance(0.499)
        self.assertEqual(cancelled, [])
        clock.advance(0.001)
        self.assertEqual(cancelled, [True])
        self.assertEqual(backend.status()["targets"][0]["state"], "unhealthy")
        self.assertEqual(backend.status()["targets"][0]["health"]["failures"], 1)
        checker.stopService()

    def test_stop_cancels_a_running_check(self):
        backend, up, clock = targeted(("a",), health={"interval_secs": 1})
        cancelled = []
        up["a"].health = defer.Deferred(lambda d: cancelled.append(True))
        checker = HealthChecker(backend, clock)
        checker.startService()
        clock.advance(0)
        checker.stopService()
        self.assertEqual(cancelled, [True])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(backend.status()["targets"][0]["health"]["healthy"])

    def test_services_include_the_checker(self):
        backend, _, clock = targeted(health={})
        self.assertEqual([type(s) for s in backend.services(clock)], [HealthChecker])
        plain, _, _ = targeted()
        self.assertEqual(plain.services(clock), [])


class StatusTests(SynchronousTestCase):
    def test_status_object(self):
        backend, up, clock = targeted(health={})
        served_by(backend, 3)
        status = backend.status()
        self.assertEqual(
            {k: status[k] for k in ("backend", "service", "strategy", "available", "rejected")},
            {"backend": "api", "service": "http", "strategy": "round_robin", "available": 2, "rejected": 0},
        )
        a = status["targets"][0]
        self.assertEqual(
            {k: a[k] for k in ("name", "address", "weight", "state", "in_flight", "requests", "failures")},
            {"name": "a", "address": "http://a.test", "weight": 1, "state": "available", "in_flight": 0,
             "requests": 2, "failures": 0},
        )
        self.assertEqual(a["breaker"]["state"], "closed")
        self.assertFalse(a["outlier"]["ejected"])
        self.assertTrue(a["health"]["healthy"])
        self.assertEqual(status["retry_budget"]["exhausted"], 0)


class BuildTests(SynchronousTestCase):
    def entry(self, service, options, targets=(), **kw):
        registry = builtin_registry()
        stype = registry.service(service)
        where = Where("test.toml")
        entries = tuple(
            model.TargetEntry(
                name=name, weight=1, address=str(extra),
                options=stype.backend_options.validate(dict(options, **extra), where),
            )
            for name, extra in targets
        )
        validated = entries[0].options if entries else stype.backend_options.validate(dict(options), where)
        sel = selection(**kw)
        if not targets and not kw:
            sel = Options(dict(sel, resilient=False))
        entry = model.ServiceEntry(name="api", service=service, options=validated, file="test.toml",
                                   targets=entries, selection=sel)
        return stype, entry

    def test_plain_backend_stays_plain(self):
        stype, entry = self.entry("http", {"base_url": "http://x.test"})
        backend = build_backend(stype, "api", entry, BuildContext(reactor=task.Clock()))
        self.assertNotIsInstance(backend, TargetedBackend)

    def test_targets_get_one_inner_backend_each(self):
        stype, entry = self.entry(
            "http", {}, (("a", {"base_url": "http://a.test"}), ("b", {"base_url": "http://b.test"}))
        )
        backend = build_backend(stype, "api", entry, BuildContext(reactor=task.Clock()))
        self.assertIsInstance(backend, TargetedBackend)
        self.assertEqual([t.backend.name for t in backend.targets], ["api/a", "api/b"])
        self.assertEqual([t.backend.url(make_request(path="x")) for t in backend.targets],
                         ["http://a.test/x", "http://b.test/x"])

    def test_retries_alone_wrap_the_single_address(self):
        stype, entry = self.entry("http", {"base_url": "http://x.test"}, retry={"max_retries": 1})
        backend = build_backend(stype, "api", entry, BuildContext(reactor=task.Clock()))
        self.assertEqual([(t.name, t.address) for t in backend.targets], [("api", "http://x.test")])
        self.assertEqual(backend.targets[0].backend.name, "api")

    def test_health_checks_need_a_backend_that_can_check(self):
        stype, entry = self.entry("echo", {}, health={})
        with self.assertRaises(ConfigError) as e:
            build_backend(stype, "api", entry, BuildContext(reactor=task.Clock()))
        self.assertEqual(str(e.exception), "test.toml: backends.api.health_check: echo backends have no active health check")

    def test_dicom_targets_share_one_move_store_scp(self):
        stype, entry = self.entry(
            "dicom_scu", {"incoming_store_port": 11999},
            (("p1", {"aet": "P1", "host": "127.0.0.1", "port": 104}),
             ("p2", {"aet": "P2", "host": "127.0.0.1", "port": 105})),
        )
        backend = build_backend(stype, "pacs", entry, BuildContext(reactor=task.Clock()))
        first, second = (t.backend.retriever for t in backend.targets)
        self.assertIs(first.listener_owner, first)
        self.assertIs(second.listener_owner, first)
