# -*- test-case-name: tests.unit.test_health -*-
"""
The health of a backend's targets: state machines fed with the outcome of
each check or request, on an injected clock (anything with C{seconds()}).

 - L{ActiveHealth}: healthy / unhealthy from consecutive active checks;
 - L{OutlierDetector}: ejects a target after consecutive failed requests,
   for exponentially longer each time it relapses;
 - L{CircuitBreaker}: closed / open / half open;
 - L{RetryBudget}: how many retries the recent traffic allows;
 - L{backoff_delay}: the pause before a retry.

Nothing here logs: each state machine takes an optional C{on_change(old,
new)} callable, called at every state transition, for the caller to log.
"""

import collections
import math


class ActiveHealth:
    """
    Health from active checks.  A target starts healthy; it becomes
    unhealthy after C{unhealthy_threshold} consecutive failed checks and
    healthy again after C{healthy_threshold} consecutive successful ones.
    C{on_change} gets C{("healthy", "unhealthy")} or C{("unhealthy",
    "healthy")}.
    """

    def __init__(self, healthy_threshold, unhealthy_threshold, on_change=None):
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.on_change = on_change
        self.healthy = True
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.checks = 0
        self.failures = 0

    def record(self, success):
        """
        Record the outcome of one check.
        """
        self.checks += 1
        if success:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if not self.healthy and self.consecutive_successes >= self.healthy_threshold:
                self.healthy = True
                if self.on_change is not None:
                    self.on_change("unhealthy", "healthy")
        else:
            self.failures += 1
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if self.healthy and self.consecutive_failures >= self.unhealthy_threshold:
                self.healthy = False
                if self.on_change is not None:
                    self.on_change("healthy", "unhealthy")

    def status(self):
        return {
            "healthy": self.healthy,
            "consecutive_successes": self.consecutive_successes,
            "consecutive_failures": self.consecutive_failures,
            "checks": self.checks,
            "failures": self.failures,
        }


class OutlierDetector:
    """
    Passive health: C{consecutive_failures} failed requests in a row (0
    disables) eject the target for C{min(max_ejection_secs,
    base_ejection_secs * 2 ** (n - 1))}, where C{n} counts the ejections in
    a row: it grows when the target is ejected again less than
    C{max_ejection_secs} after its last ejection ended, and is back to 1
    otherwise.

    Outcomes recorded while ejected (requests that started before) are
    ignored: they neither extend the ejection nor count towards the next.
    C{on_change} gets C{("in_service", "ejected")} when a target is
    ejected and C{("ejected", "in_service")} when the ejection is seen to
    have ended (lazily, when L{ejected} is read).
    """

    IN_SERVICE, EJECTED = "in_service", "ejected"

    def __init__(self, clock, consecutive_failures, base_ejection_secs, max_ejection_secs, on_change=None):
        self.clock = clock
        self.threshold = consecutive_failures
        self.base_ejection_secs = base_ejection_secs
        self.max_ejection_secs = max_ejection_secs
        self.on_change = on_change
        self.consecutive_failures = 0
        self.ejections = 0
        #: When the current ejection ends (clock seconds), or C{None}.
        self.ejected_until = None
        self._last_end = None
        self._in_row = 0

    @property
    def ejected(self):
        """
        Whether the target is ejected now.
        """
        until = self.ejected_until
        if until is None:
            return False
        if self.clock.seconds() < until:
            return True
        self.ejected_until = None
        if self.on_change is not None:
            self.on_change(self.EJECTED, self.IN_SERVICE)
        return False

    def record(self, success):
        """
        Record the outcome of one request to the target.
        """
        if self.ejected:
            return
        if success:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.threshold and self.consecutive_failures >= self.threshold:
            self._eject()

    def _eject(self):
        now = self.clock.seconds()
        if self._last_end is not None and now - self._last_end < self.max_ejection_secs:
            # Stop doubling once the cap is reached (no float overflow).
            if self.base_ejection_secs * 2 ** (self._in_row - 1) < self.max_ejection_secs:
                self._in_row += 1
        else:
            self._in_row = 1
        duration = min(self.max_ejection_secs, self.base_ejection_secs * 2 ** (self._in_row - 1))
        self.ejected_until = self._last_end = now + duration
        self.consecutive_failures = 0
        self.ejections += 1
        if self.on_change is not None:
            self.on_change(self.IN_SERVICE, self.EJECTED)

    def status(self):
        ejected = self.ejected
        return {
            "ejected": ejected,
            "ejected_until": self.ejected_until,
            "ejections": self.ejections,
            "consecutive_failures": self.consecutive_failures,
        }


class CircuitBreaker:
    """
    A circuit breaker per target.

    CLOSED: requests go through; C{failure_threshold} consecutive failures
    (0: never) open it.  OPEN: requests are refused; after C{open_secs} it
    is HALF_OPEN (seen lazily, when L{state} is read).  HALF_OPEN: up to
    C{half_open_requests} trial requests at a time go through; a failure
    opens it again (for C{open_secs} afresh), C{success_threshold}
    successes close it.

    Every request let through by L{try_acquire} ends with L{record} (it
    had an outcome) or L{release} (it was cancelled).  Outcomes that arrive
    while OPEN (requests that started before it opened) are ignored.
    C{on_change} gets every transition as C{(old_state, new_state)}.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, clock, failure_threshold, open_secs, half_open_requests, success_threshold, on_change=None):
        self.clock = clock
        self.failure_threshold = failure_threshold
        self.open_secs = open_secs
        self.half_open_requests = half_open_requests
        self.success_threshold = success_threshold
        self.on_change = on_change
        self._state = self.CLOSED
        self.opened_at = None
        self.consecutive_failures = 0
        self.opens = 0
        self._trials = 0
        self._successes = 0

    def _set(self, state):
        old, self._state = self._state, state
        if self.on_change is not None:
            self.on_change(old, state)

    def _open(self):
        self.opened_at = self.clock.seconds()
        self.opens += 1
        self._set(self.OPEN)

    @property
    def state(self):
        """
        C{CLOSED}, C{OPEN} or C{HALF_OPEN}, now.
        """
        if self._state == self.OPEN and self.clock.seconds() >= self.opened_at + self.open_secs:
            self._trials = 0
            self._successes = 0
            self._set(self.HALF_OPEN)
        return self._state

    def available(self):
        """
        Whether a request could go to this target now (L{try_acquire}
        without reserving a trial).
        """
        state = self.state
        if state == self.CLOSED:
            return True
        return state == self.HALF_OPEN and self._trials < self.half_open_requests

    def try_acquire(self):
        """
        Whether a request may go to this target now; when HALF_OPEN, a
        C{True} answer reserves one of the trial slots.
        """
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.HALF_OPEN and self._trials < self.half_open_requests:
            self._trials += 1
            return True
        return False

    def release(self):
        """
        A request acquired earlier ended without an outcome: free its slot.
        """
        if self.state == self.HALF_OPEN and self._trials:
            self._trials -= 1

    def record(self, success):
        """
        The outcome of a request acquired earlier (frees its slot).
        """
        state = self.state
        if state == self.CLOSED:
            if success:
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
                if self.failure_threshold and self.consecutive_failures >= self.failure_threshold:
                    self._open()
        elif state == self.HALF_OPEN:
            if self._trials:
                self._trials -= 1
            if not success:
                self.consecutive_failures += 1
                self._open()
            else:
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self.consecutive_failures = 0
                    self.opened_at = None
                    self._set(self.CLOSED)

    def status(self):
        return {
            "state": self.state,
            "opened_at": self.opened_at,
            "consecutive_failures": self.consecutive_failures,
            "opens": self.opens,
        }


class RetryBudget:
    """
    Retries allowed by the recent traffic: within the last C{window_secs}
    (per-second buckets: the current second and the ones before it), the
    retries may number less than C{max(min_per_sec * window_secs, ratio *
    requests)}.
    """

    def __init__(self, clock, ratio, min_per_sec, window_secs):
        self.clock = clock
        self.ratio = ratio
        self.min_retries = min_per_sec * window_secs
        self.window_secs = window_secs
        self.refused = 0
        self._buckets = collections.deque()  # [second, requests, retries], oldest first
        self._requests = 0
        self._retries = 0

    def _bucket(self):
        """
        The current second's bucket, after dropping those out of the window.
        """
        now = int(self.clock.seconds())
        buckets = self._buckets
        while buckets and now - buckets[0][0] >= self.window_secs:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not buckets or buckets[-1][0] != now:
            buckets.append([now, 0, 0])
        return buckets[-1]

    def _limit(self):
        return max(self.min_retries, self.ratio * self._requests)

    def record_request(self):
        """
        Count a first attempt.
        """
        self._bucket()[1] += 1
        self._requests += 1

    def try_spend(self):
        """
        Whether a retry may happen now; if so it is counted.
        """
        bucket = self._bucket()
        if self._retries < self._limit():
            bucket[2] += 1
            self._retries += 1
            return True
        self.refused += 1
        return False

    def status(self):
        """
        C{requests} and C{retries} in the window, C{allowed}: how many
        retries the window allows in all, C{refused}: retries refused ever.
        """
        self._bucket()
        return {
            "requests": self._requests,
            "retries": self._retries,
            "allowed": math.ceil(self._limit()),
            "refused": self.refused,
        }


def backoff_delay(attempt, base, cap, random):
    """
    The pause before retry number C{attempt}: exponential backoff with
    "equal jitter", within C{[d / 2, d]} for C{d = min(cap, base * 2 **
    (attempt - 1))}.

    @param attempt: the retry's number, from 1.
    @param base: the delay of the first retry, in seconds.
    @param cap: the largest delay.
    @param random: a callable returning a float in C{[0, 1)}.
    @return: seconds.
    """
    d = min(cap, base * 2 ** min(attempt - 1, 64))
    return d / 2 + random() * d / 2
