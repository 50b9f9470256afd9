# -*- test-case-name: tests.unit.test_targets -*-
"""
A backend with several targets: selection, health, retries.

A backend configured with C{targets} (or with health checks, retries, a
circuit breaker or outlier detection) is a L{TargetedBackend}: one inner
backend of its service type per target (the backend's options with the
target's address), and around them

  - routing rules (L{harmony.backends.balancing}) that narrow the
    candidates, then the strategy that picks one;
  - active health checks (L{HealthChecker}: HTTP C{GET}, DICOM C-ECHO),
    passive outlier ejection and a circuit breaker per target
    (L{harmony.backends.health}); a target that is unhealthy, ejected or
    open gets no traffic; with none left the request fails at once with
    503 (DIMSE: Refused: Out of Resources) instead of waiting;
  - retries of idempotent requests (GET/HEAD/PUT/DELETE/OPTIONS, C-ECHO,
    C-FIND) on another target, after an exponential back-off with jitter,
    within a retry budget so that retries cannot multiply an outage.

A failure is an L{UpstreamUnavailable} or L{UpstreamTimeout} from the
target (the inner backend applies C{timeout_secs} and
C{connect_timeout_secs} to each attempt), or an HTTP answer whose status is
in C{retry.retry_on_statuses}; anything else the target answered is a
success.  Every state change is logged; L{TargetedBackend.status} is the
one status object (health, ejections, breaker, counters) the management API
and metrics read.
"""

import random

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.backends import balancing
from harmony.backends.health import ActiveHealth, CircuitBreaker, OutlierDetector, RetryBudget, backoff_delay
from harmony.errors import ServiceUnavailable, UpstreamTimeout, UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.logs import logger
from harmony.pipeline import IDEMPOTENT_METHODS, IDEMPOTENT_OPERATIONS
from harmony.streams import Stream

log = logger("harmony.backends.targets")


_FAILURES = (UpstreamUnavailable, UpstreamTimeout)

#: At most one "no target available" warning per backend in this time.
REJECTION_LOG_SECS = 10.0


class Target:
    """
    One target of a backend: its inner backend, state machines and
    counters.

    @ivar name: the C{[targets.<name>]} name.
    @ivar index: its place in the backend's C{targets} list.
    @ivar in_flight: requests sent and not answered yet.
    """

    def __init__(self, owner, index, entry, backend, selection, clock):
        self.name = entry.name
        self.index = index
        self.weight = entry.weight
        self.address = entry.address
        self.backend = backend
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.timeouts = 0
        self.retries = 0
        health = selection.health_check
        self.health = None
        if health is not None:
            self.health = ActiveHealth(
                health.healthy_threshold, health.unhealthy_threshold, on_change=self._changed("health", owner)
            )
        outlier = selection.outlier_detection
        self.outlier = OutlierDetector(
            clock,
            outlier.consecutive_failures,
            outlier.base_ejection_secs,
            outlier.max_ejection_secs,
            on_change=self._changed("ejection", owner),
        )
        breaker = selection.circuit_breaker
        self.breaker = CircuitBreaker(
            clock,
            breaker.failure_threshold,
            breaker.open_secs,
            breaker.half_open_requests,
            breaker.success_threshold,
            on_change=self._changed("circuit breaker", owner),
        )

    def _changed(self, what, owner):
        def changed(old, new):
            emit = log.info if new in ("healthy", "in_service", "closed", "half_open") else log.warn
            emit(
                "Backend {backend} target {target} ({address}): {what} {old} -> {new}",
                backend=owner, target=self.name, address=self.address, what=what, old=old, new=new,
            )

        return changed

    def available(self):
        """
        Whether the target may get a request now: healthy (or not checked),
        not ejected, breaker not open.
        """
        if self.health is not None and not self.health.healthy:
            return False
        return not self.outlier.ejected and self.breaker.available()

    def state(self):
        """
        One word for the target's state (C{"available"}, C{"unhealthy"},
        C{"ejected"} or C{"open"}).
        """
        if self.health is not None and not self.health.healthy:
            return "unhealthy"
        if self.outlier.ejected:
            return "ejected"
        if not self.breaker.available():
            return "open"
        return "available"

    def record(self, success, timeout=False):
        if not success:
            self.failures += 1
            if timeout:
                self.timeouts += 1
        self.outlier.record(success)
        self.breaker.record(success)

    def status(self):
        return {
            "name": self.name,
            "address": self.address,
            "weight": self.weight,
            "state": self.state(),
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "retries": self.retries,
            "health": None if self.health is None else self.health.status(),
            "outlier": self.outlier.status(),
            "breaker": self.breaker.status(),
        }


@implementer(IBackend)
class TargetedBackend:
    """
    A backend over several targets (see the module docstring).

    @param name: the backend's name.
    @param service_type: its service type name.
    @param entries: the L{harmony.config.model.TargetEntry}s.
    @param backends: one inner L{IBackend} per entry, in the same order.
    @param selection: the validated selection tables (strategy, hash_key,
        rules, health_check, outlier_detection, circuit_breaker, retry).
    @param clock: C{IReactorTime} (C{None} while only checking a config:
        nothing runs then).
    @param random: a 0-argument callable returning floats in [0, 1)
        (back-off jitter).
    """

    def __init__(self, name, service_type, entries, backends, selection, clock, random=random.random):
        self.name = name
        self.service_type = service_type
        self.options = backends[0].options if hasattr(backends[0], "options") else None
        self.selection = selection
        self._clock = clock
        self._random = random
        self.targets = [Target(name, i, e, b, selection, clock) for i, (e, b) in enumerate(zip(entries, backends))]
        self._by_name = {t.name: t for t in self.targets}
        self._strategy = balancing.make_strategy(selection.strategy)
        self._hash_key = selection.hash_key if selection.strategy == "hash" else None
        self._rules = [
            balancing.compile_rule({k: v for k, v in r.match.items() if v is not None}, r.targets)
            for r in selection.rules
        ]
        retry = selection.retry
        self._retry = retry
        self._budget = RetryBudget(clock, retry.budget_ratio, retry.budget_min_per_sec, retry.budget_window_secs)
        self._retry_statuses = frozenset(retry.retry_on_statuses)
        self.rejected = 0
        self.budget_exhausted = 0
        self._last_rejection_log = -REJECTION_LOG_SECS

    # -- requests -------------------------------------------------------------

    def handle(self, envelope):
        candidates = self.targets
        if self._rules:
            names = balancing.rule_targets(self._rules, envelope)
            if names is not None:
                candidates = [self._by_name[n] for n in names]
        key = balancing.request_key(self._hash_key, envelope) if self._hash_key else None
        self._budget.record_request()
        return self._attempt(envelope, candidates, key, 0, set())

    def _may_retry(self, envelope):
        if self._retry.retry_non_idempotent:
            return True
        if envelope.dicom is not None:
            return envelope.dicom.operation in IDEMPOTENT_OPERATIONS
        return envelope.details.method in IDEMPOTENT_METHODS

    def _pick(self, candidates, key, tried):
        """
        The target for the next attempt: among the available candidates,
        those not tried yet for this request (all of them when every one
        was tried); C{None} when none is available.
        """
        available = [t for t in candidates if t.available()]
        fresh = [t for t in available if t.name not in tried] if tried else available
        pool = fresh or available
        while pool:
            target = self._strategy.pick(pool, key)
            if target.breaker.try_acquire():
                return target
            # Half open and its trial slots taken: not this one.
            pool = [t for t in pool if t is not target]
        return None

    def _attempt(self, envelope, candidates, key, attempt, tried):
        target = self._pick(candidates, key, tried)
        if target is None:
            self.rejected += 1
            states = ", ".join(f"{t.name}: {t.state()}" for t in candidates)
            now = self._clock.seconds()
            if now - self._last_rejection_log >= REJECTION_LOG_SECS:
                # Once in a while, not for every request of an outage.
                self._last_rejection_log = now
                log.warn("Backend {backend}: no target available ({states})", backend=self.name, states=states)
            return defer.fail(ServiceUnavailable(f"No target of backend {self.name!r} is available ({states})"))
        tried.add(target.name)
        target.in_flight += 1
        target.requests += 1
        if attempt:
            target.retries += 1
        try:
            d = defer.maybeDeferred(target.backend.handle, envelope)
        except Exception:
            d = defer.fail()
        return d.addBoth(self._answered, envelope, candidates, key, attempt, tried, target)

    def _answered(self, result, envelope, candidates, key, attempt, tried, target):
        target.in_flight -= 1
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                target.breaker.release()
                return result
            if not result.check(*_FAILURES):
                # The target answered (an error of the request itself).
                target.record(True)
                return result
            target.record(False, timeout=bool(result.check(UpstreamTimeout)))
        elif result.dicom is None and result.status in self._retry_statuses:
            target.record(False)
        else:
            target.record(True)
            return result
        if not self._retry_allowed(envelope, attempt):
            return result
        if not isinstance(result, Failure):
            _discard(result)
        delay = backoff_delay(attempt + 1, self._retry.base_delay_secs, self._retry.max_delay_secs, self._random)
        log.debug(
            "Backend {backend}: retry {n} of {max} in {delay:.3f}s (target {target} failed)",
            backend=self.name, n=attempt + 1, max=self._retry.max_retries, delay=delay, target=target.name,
        )
        return task.deferLater(self._clock, delay, self._attempt, envelope, candidates, key, attempt + 1, tried)

    def _retry_allowed(self, envelope, attempt):
        if attempt >= self._retry.max_retries or not self._may_retry(envelope):
            return False
        if isinstance(envelope.body, Stream):
            if envelope.rewind_body is None:
                return False
            envelope.body = envelope.rewind_body()
        if not self._budget.try_spend():
            self.budget_exhausted += 1
            if self.budget_exhausted == 1 or self.budget_exhausted % 1000 == 0:
                log.warn(
                    "Backend {backend}: retry budget exhausted, not retrying ({n} times so far)",
                    backend=self.name, n=self.budget_exhausted,
                )
            return False
        return True

    # -- lifecycle -------------------------------------------------------------

    def services(self, reactor):
        """
        The active health checker (when configured), and the inner
        backends' own services (the first target's C-MOVE store SCP: the
        targets share it).
        """
        services = []
        if self.selection.health_check is not None:
            services.append(HealthChecker(self, reactor))
        inner = getattr(self.targets[0].backend, "services", None)
        if inner is not None:
            services += inner(reactor)
        return services

    def close(self):
        ds = [defer.maybeDeferred(t.backend.close) for t in self.targets]
        return defer.DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def status(self):
        """
        The backend's selection state: strategy, retry budget, counters and
        each target's health, ejection and breaker state.
        """
        return {
            "backend": self.name,
            "service": self.service_type,
            "strategy": self.selection.strategy,
            "available": sum(1 for t in self.targets if t.available()),
            "rejected": self.rejected,
            "retry_budget": dict(self._budget.status(), exhausted=self.budget_exhausted),
            "targets": [t.status() for t in self.targets],
        }


def _discard(response):
    """
    Drop a response that is retried (its body is not read further).
    """
    if isinstance(response.body, Stream):
        response.body.cancel()


class HealthChecker(Service):
    """
    Active health checks of a L{TargetedBackend}'s targets: each target is
    checked every C{interval_secs} (the first check at start, spread over
    the first interval), each check limited to C{timeout_secs}.

    Inner backends provide C{health_check(check) -> Deferred[None or
    reason]}: C{GET <url><path>} for HTTP-like targets, a C-ECHO for DICOM.
    """

    def __init__(self, backend, clock):
        self.backend = backend
        self.check = backend.selection.health_check
        self._clock = clock
        self._calls = {}
        self._running = {}

    def startService(self):
        super().startService()
        n = len(self.backend.targets)
        for i, target in enumerate(self.backend.targets):
            # Spread the checks over the interval (the first one at once).
            self._schedule(target, 0 if i == 0 else self.check.interval_secs * i / n / 2)

    def stopService(self):
        super().stopService()
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        for d in list(self._running.values()):
            d.cancel()
        self._running.clear()

    def _schedule(self, target, delay):
        self._calls[target.name] = self._clock.callLater(delay, self._run, target)

    def _run(self, target):
        check = self.check
        try:
            d = target.backend.health_check(check)
        except Exception:
            d = defer.fail()
        self._running[target.name] = d
        timed_out = []

        def on_timeout():
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(check.timeout_secs, on_timeout)

        def done(result):
            if timer.active():
                timer.cancel()
            self._running.pop(target.name, None)
            if isinstance(result, Failure):
                if result.check(defer.CancelledError) and not timed_out:
                    return None  # stopping
                reason = "timed out" if timed_out else result.type.__name__
            else:
                reason = result
            if reason is not None:
                log.debug(
                    "Backend {backend} target {target}: health check failed ({reason})",
                    backend=self.backend.name, target=target.name, reason=reason,
                )
            target.health.record(reason is None)
            if self.running:
                self._schedule(target, check.interval_secs)
            return None

        d.addBoth(done)


def build_backend(service_type, name, entry, context):
    """
    The backend of a configuration entry: a plain backend, or a
    L{TargetedBackend} when the entry has targets or asks for health
    checks, retries, outlier detection or a circuit breaker.

    @param service_type: the entry's L{harmony.registry.ServiceType}.
    @param entry: a L{harmony.config.model.ServiceEntry}.
    @param context: the L{harmony.registry.BuildContext}.
    @raise ConfigError: health checks on a backend type that has none.
    """
    selection = entry.selection
    if selection is None or not selection.resilient:
        return service_type.make_backend(name, entry.options, context)
    from harmony.config.model import TargetEntry

    entries = entry.targets
    if not entries:
        options = entry.options
        if "base_url" in options:
            address = options.base_url
        elif "aet" in options and "host" in options:
            address = f"{options.aet}@{options.host}:{options.port}"
        else:
            address = service_type.name
        entries = (TargetEntry(name=name, weight=1, address=address, options=options),)
    backends = [
        service_type.make_backend(name if e.name == name else f"{name}/{e.name}", e.options, context) for e in entries
    ]
    if selection.health_check is not None and not hasattr(backends[0], "health_check"):
        from harmony.config.errors import ConfigError

        raise ConfigError(
            f"backends.{name}.health_check: {service_type.name} backends have no active health check",
            entry.file,
        )
    first = getattr(backends[0], "retriever", None)
    for backend in backends[1:]:
        if first is not None and getattr(backend, "retriever", None) is not None:
            # One incoming_store_port: the first target's store SCP
            # receives every target's C-MOVE instances.
            backend.retriever.listener_owner = first
    return TargetedBackend(name, service_type.name, entries, backends, selection, context.reactor)
