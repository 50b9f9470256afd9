"""
Tests for L{harmony.backends.health}: every transition of the active
health, outlier detection and circuit breaker state machines, the retry
budget's minimum, ratio and window, and the retry backoff.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from harmony.backends.health import ActiveHealth, CircuitBreaker, OutlierDetector, RetryBudget, backoff_delay


class Changes(list):
    """
    An C{on_change} callable recording its calls.
    """

    def __call__(self, old, new):
        self.append((old, new))


class ActiveHealthTests(SynchronousTestCase):
    def setUp(self):
        self.changes = Changes()
        self.health = ActiveHealth(healthy_threshold=2, unhealthy_threshold=3, on_change=self.changes)

    def record(self, *outcomes):
        for outcome in outcomes:
            self.health.record(outcome)

    def test_starts_healthy(self):
        self.assertTrue(self.health.healthy)
        self.assertEqual(
            self.health.status(),
            {"healthy": True, "consecutive_successes": 0, "consecutive_failures": 0, "checks": 0, "failures": 0},
        )

    def test_unhealthy_after_consecutive_failures(self):
        self.record(False, False, True, False, False)
        self.assertTrue(self.health.healthy)
        self.assertEqual(self.changes, [])
        self.record(False)
        self.assertFalse(self.health.healthy)
        self.assertEqual(self.changes, [("healthy", "unhealthy")])
        self.record(False)
        self.assertEqual(self.changes, [("healthy", "unhealthy")])
        self.assertEqual(
            self.health.status(),
            {"healthy": False, "consecutive_successes": 0, "consecutive_failures": 4, "checks": 7, "failures": 6},
        )

    def test_healthy_again_after_consecutive_successes(self):
        self.record(False, False, False)
        self.record(True, False, True)
        self.assertFalse(self.health.healthy)
        self.assertEqual(self.changes, [("healthy", "unhealthy")])
        self.record(True)
        self.assertTrue(self.health.healthy)
        self.assertEqual(self.changes, [("healthy", "unhealthy"), ("unhealthy", "healthy")])
        self.record(True)
        self.assertEqual(len(self.changes), 2)
        self.assertEqual(
            self.health.status(),
            {"healthy": True, "consecutive_successes": 3, "consecutive_failures": 0, "checks": 8, "failures": 4},
        )

    def test_thresholds_of_one_without_callback(self):
        health = ActiveHealth(1, 1)
        health.record(False)
        self.assertFalse(health.healthy)
        health.record(True)
        self.assertTrue(health.healthy)


class OutlierDetectorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.changes = Changes()
        self.detector = OutlierDetector(
            self.clock, consecutive_failures=3, base_ejection_secs=10.0, max_ejection_secs=35.0, on_change=self.changes
        )

    def failures(self, n=3):
        for _ in range(n):
            self.detector.record(False)

    def eject(self):
        """
        Eject the target; return how long for.
        """
        start = self.clock.seconds()
        self.failures()
        self.assertTrue(self.detector.ejected)
        return self.detector.ejected_until - start

    def test_ejected_after_consecutive_failures(self):
        self.failures(2)
        self.detector.record(True)
        self.failures(2)
        self.assertFalse(self.detector.ejected)
        self.assertEqual(self.changes, [])
        self.assertEqual(
            self.detector.status(),
            {"ejected": False, "ejected_until": None, "ejections": 0, "consecutive_failures": 2},
        )
        self.clock.advance(1)
        self.failures(1)
        self.assertTrue(self.detector.ejected)
        self.assertEqual(self.changes, [("in_service", "ejected")])
        self.assertEqual(
            self.detector.status(),
            {"ejected": True, "ejected_until": 11.0, "ejections": 1, "consecutive_failures": 0},
        )

    def test_ejection_ends_lazily(self):
        self.eject()
        self.clock.advance(9.5)
        self.assertTrue(self.detector.ejected)
        self.clock.advance(0.5)
        self.assertEqual(self.changes, [("in_service", "ejected")])
        self.assertFalse(self.detector.ejected)
        self.assertFalse(self.detector.ejected)
        self.assertEqual(self.changes, [("in_service", "ejected"), ("ejected", "in_service")])
        self.assertEqual(
            self.detector.status(),
            {"ejected": False, "ejected_until": None, "ejections": 1, "consecutive_failures": 0},
        )

    def test_outcomes_while_ejected_ignored(self):
        self.eject()
        self.clock.advance(5)
        self.failures(7)
        self.detector.record(True)
        self.assertEqual(self.detector.status()["ejected_until"], 10.0)
        self.assertEqual(self.detector.ejections, 1)
        self.clock.advance(5)
        self.failures(2)
        self.assertFalse(self.detector.ejected)
        self.assertEqual(self.detector.consecutive_failures, 2)

    def test_record_reports_the_end(self):
        self.eject()
        self.clock.advance(10)
        self.detector.record(False)
        self.assertEqual(self.changes, [("in_service", "ejected"), ("ejected", "in_service")])
        self.assertEqual(self.detector.consecutive_failures, 1)

    def test_relapses_double_up_to_the_cap(self):
        durations = []
        for _ in range(4):
            durations.append(self.eject())
            self.clock.advance(durations[-1] + 34.5)  # back in service for less than max_ejection_secs
            self.assertFalse(self.detector.ejected)
        self.assertEqual(durations, [10.0, 20.0, 35.0, 35.0])
        self.assertEqual(self.detector.ejections, 4)
        self.assertEqual(self.changes, [("in_service", "ejected"), ("ejected", "in_service")] * 4)

    def test_back_to_base_after_max_in_service(self):
        self.assertEqual(self.eject(), 10.0)
        self.clock.advance(10 + 1)
        self.assertEqual(self.eject(), 20.0)
        self.clock.advance(20 + 35)  # in service for max_ejection_secs
        self.assertEqual(self.eject(), 10.0)

    def test_no_overflow_after_many_relapses(self):
        detector = OutlierDetector(self.clock, 1, 1.0, 1e300)
        for _ in range(2000):
            detector.record(False)
            self.clock.advance(detector.ejected_until - self.clock.seconds())
            self.assertFalse(detector.ejected)
        detector.record(False)
        # Capped (the clock is near 2e300 now: compare relatively).
        self.assertAlmostEqual((detector.ejected_until - self.clock.seconds()) / 1e300, 1.0, places=9)

    def test_disabled(self):
        detector = OutlierDetector(self.clock, 0, 10.0, 35.0, on_change=self.changes)
        for _ in range(100):
            detector.record(False)
        self.assertFalse(detector.ejected)
        self.assertEqual(self.changes, [])
        self.assertEqual(detector.status()["ejections"], 0)


class CircuitBreakerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.changes = Changes()
        self.breaker = CircuitBreaker(
            self.clock,
            failure_threshold=3,
            open_secs=30.0,
            half_open_requests=2,
            success_threshold=2,
            on_change=self.changes,
        )

    def open(self):
        for _ in range(3):
            self.assertTrue(self.breaker.try_acquire())
            self.breaker.record(False)
        self.assertEqual(self.breaker.state, CircuitBreaker.OPEN)

    def half_open(self):
        self.open()
        self.clock.advance(30)
        self.assertEqual(self.breaker.state, CircuitBreaker.HALF_OPEN)

    def test_closed(self):
        self.assertEqual(
            (CircuitBreaker.CLOSED, CircuitBreaker.OPEN, CircuitBreaker.HALF_OPEN), ("closed", "open", "half_open")
        )
        for outcome in (False, False, True, False, False):
            self.assertTrue(self.breaker.available())
            self.assertTrue(self.breaker.try_acquire())
            self.breaker.record(outcome)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.changes, [])
        self.assertEqual(
            self.breaker.status(), {"state": "closed", "opened_at": None, "consecutive_failures": 2, "opens": 0}
        )

    def test_closed_to_open(self):
        self.clock.advance(5)
        self.open()
        self.assertEqual(self.changes, [("closed", "open")])
        self.assertFalse(self.breaker.available())
        self.assertFalse(self.breaker.try_acquire())
        self.assertEqual(
            self.breaker.status(), {"state": "open", "opened_at": 5.0, "consecutive_failures": 3, "opens": 1}
        )

    def test_open_to_half_open_lazily(self):
        self.open()
        self.clock.advance(29.9)
        self.assertFalse(self.breaker.try_acquire())
        self.clock.advance(0.1)
        self.assertEqual(self.changes, [("closed", "open")])
        self.assertTrue(self.breaker.available())
        self.assertEqual(self.changes, [("closed", "open"), ("open", "half_open")])
        self.assertEqual(self.breaker.status()["state"], "half_open")
        self.assertEqual(self.breaker.status()["opened_at"], 0.0)

    def test_outcomes_while_open_ignored(self):
        self.assertTrue(self.breaker.try_acquire())  # a request still under way when it opens
        self.open()
        self.clock.advance(20)
        self.breaker.record(False)
        self.clock.advance(10)
        self.assertEqual(self.breaker.state, "half_open")
        self.assertEqual(self.breaker.opens, 1)

    def test_half_open_trials_limited(self):
        self.half_open()
        self.assertTrue(self.breaker.try_acquire())
        self.assertTrue(self.breaker.available())
        self.assertTrue(self.breaker.try_acquire())
        self.assertFalse(self.breaker.available())
        self.assertFalse(self.breaker.try_acquire())
        self.breaker.release()
        self.assertTrue(self.breaker.available())
        self.assertTrue(self.breaker.try_acquire())
        self.assertFalse(self.breaker.try_acquire())
        self.assertEqual(self.breaker.state, "half_open")

    def test_half_open_to_closed(self):
        self.half_open()
        self.assertTrue(self.breaker.try_acquire())
        self.assertTrue(self.breaker.try_acquire())
        self.breaker.record(True)
        self.assertEqual(self.breaker.state, "half_open")
        self.assertTrue(self.breaker.try_acquire())  # the success freed its slot
        self.assertFalse(self.breaker.try_acquire())
        self.breaker.record(True)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.changes, [("closed", "open"), ("open", "half_open"), ("half_open", "closed")])
        self.assertEqual(
            self.breaker.status(), {"state": "closed", "opened_at": None, "consecutive_failures": 0, "opens": 1}
        )
        # Closed again: it takes failure_threshold failures anew to open.
        self.breaker.record(False)
        self.breaker.record(False)
        self.assertEqual(self.breaker.state, "closed")
        self.breaker.record(False)
        self.assertEqual(self.breaker.state, "open")

    def test_half_open_to_open(self):
        self.half_open()
        self.assertTrue(self.breaker.try_acquire())
        self.assertTrue(self.breaker.try_acquire())
        self.breaker.record(True)
        self.clock.advance(2)
        self.breaker.record(False)
        self.assertEqual(self.breaker.state, "open")
        self.assertEqual(self.changes, [("closed", "open"), ("open", "half_open"), ("half_open", "open")])
        self.assertEqual(
            self.breaker.status(), {"state": "open", "opened_at": 32.0, "consecutive_failures": 4, "opens": 2}
        )
        # open_secs afresh from the new opening, with fresh trial slots.
        self.clock.advance(29)
        self.assertFalse(self.breaker.try_acquire())
        self.clock.advance(1)
        self.assertTrue(self.breaker.try_acquire())
        self.assertTrue(self.breaker.try_acquire())
        self.breaker.record(True)
        self.breaker.record(True)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.changes[3:], [("open", "half_open"), ("half_open", "closed")])

    def test_one_success_closes(self):
        breaker = CircuitBreaker(self.clock, 1, 10.0, 1, 1)
        self.assertTrue(breaker.try_acquire())
        breaker.record(False)
        self.assertEqual(breaker.state, "open")
        self.clock.advance(10)
        self.assertTrue(breaker.try_acquire())
        self.assertFalse(breaker.try_acquire())
        breaker.record(True)
        self.assertEqual(breaker.state, "closed")

    def test_release_when_not_half_open(self):
        self.assertTrue(self.breaker.try_acquire())
        self.breaker.release()
        self.assertEqual(self.breaker.state, "closed")
        self.open()
        self.breaker.release()
        self.clock.advance(30)
        self.breaker.release()  # no trial outstanding: the slots do not go below zero
        self.assertTrue(self.breaker.try_acquire())
        self.assertTrue(self.breaker.try_acquire())
        self.assertFalse(self.breaker.try_acquire())

    def test_never_opens_with_threshold_zero(self):
        breaker = CircuitBreaker(self.clock, 0, 30.0, 1, 1, on_change=self.changes)
        for _ in range(100):
            self.assertTrue(breaker.try_acquire())
            breaker.record(False)
        self.assertEqual(breaker.state, "closed")
        self.assertEqual(self.changes, [])
        self.assertEqual(breaker.status()["consecutive_failures"], 100)


class RetryBudgetTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.budget = RetryBudget(self.clock, ratio=0.2, min_per_sec=0.3, window_secs=10.0)

    def spend(self, budget=None):
        """
        How many retries the budget allows now.
        """
        budget = budget or self.budget
        n = 0
        while budget.try_spend():
            n += 1
        return n

    def requests(self, n):
        for _ in range(n):
            self.budget.record_request()

    def test_minimum(self):
        self.assertEqual(self.budget.status(), {"requests": 0, "retries": 0, "allowed": 3, "refused": 0})
        self.assertEqual(self.spend(), 3)
        self.assertFalse(self.budget.try_spend())
        self.assertEqual(self.budget.status(), {"requests": 0, "retries": 3, "allowed": 3, "refused": 2})

    def test_ratio(self):
        self.requests(14)  # 2.8 < 3
        self.assertEqual(self.budget.status()["allowed"], 3)
        self.requests(86)
        self.assertEqual(self.spend(), 20)
        self.assertEqual(self.budget.status(), {"requests": 100, "retries": 20, "allowed": 20, "refused": 1})
        self.requests(5)
        self.assertEqual(self.spend(), 1)

    def test_fractional_allowance(self):
        budget = RetryBudget(self.clock, ratio=0.25, min_per_sec=0.0, window_secs=10.0)
        self.assertEqual(self.spend(budget), 0)
        for _ in range(10):
            budget.record_request()
        self.assertEqual(budget.status()["allowed"], 3)
        self.assertEqual(self.spend(budget), 3)  # 0, 1 and 2 retries are < 2.5

    def test_window_expiry(self):
        self.clock.advance(0.5)
        self.requests(100)
        self.assertEqual(self.spend(), 20)
        self.clock.advance(5)  # t=5.5
        self.requests(50)
        self.assertEqual(self.spend(), 10)
        self.clock.advance(4.4)  # t=9.9: the second 0 is still in the window
        self.assertEqual(self.budget.status(), {"requests": 150, "retries": 30, "allowed": 30, "refused": 2})
        self.clock.advance(0.1)  # t=10: the second 0 is dropped
        self.assertEqual(self.budget.status(), {"requests": 50, "retries": 10, "allowed": 10, "refused": 2})
        self.assertFalse(self.budget.try_spend())
        self.clock.advance(5)  # t=15: the second 5 is dropped
        self.assertEqual(self.budget.status(), {"requests": 0, "retries": 0, "allowed": 3, "refused": 3})
        self.assertEqual(self.spend(), 3)

    def test_idle_gap(self):
        self.requests(100)
        self.clock.advance(1000)
        self.assertEqual(self.budget.status()["requests"], 0)
        self.requests(20)
        self.assertEqual(self.budget.status()["requests"], 20)


class BackoffTests(SynchronousTestCase):
    def test_growth_and_cap(self):
        for r, expected in (
            (0.0, [0.125, 0.25, 0.5, 1.0, 1.5, 1.5]),
            (0.5, [0.1875, 0.375, 0.75, 1.5, 2.25, 2.25]),
            (1.0, [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]),
        ):
            delays = [backoff_delay(attempt, 0.25, 3.0, lambda: r) for attempt in range(1, 7)]
            self.assertEqual(delays, expected)

    def test_within_half_to_full(self):
        calls = []

        def random():
            calls.append(None)
            return 0.999

        delay = backoff_delay(2, 0.025, 1.0, random)
        self.assertEqual(len(calls), 1)
        self.assertTrue(0.025 <= delay < 0.05, delay)

    def test_huge_attempt(self):
        self.assertEqual(backoff_delay(5000, 0.025, 1.0, lambda: 0.0), 0.5)
