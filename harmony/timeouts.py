# -*- test-case-name: tests.unit.test_timeouts -*-
"""
Many timeouts of one length, cheaply.

A C{callLater} per request costs ~10 us on a busy proxy (a C{DelayedCall}
object, a push into the reactor's heap whose entries compare in Python,
and the heap's clean-up of the cancelled ones).  Timeouts that all have
the same length expire in the order they were started, so L{Deadlines}
keeps them in an insertion-ordered dict (O(1) to add and to forget) with
a single C{callLater} for the oldest.
"""


class Deadlines:
    """
    Timeouts of C{timeout} seconds each.

    @param clock: an C{IReactorTime}.
    @param timeout: seconds.
    """

    def __init__(self, clock, timeout):
        self._clock = clock
        self.timeout = timeout
        #: token -> (deadline, callable), oldest first
        self._pending = {}
        self._next = 0
        self._call = None

    def __len__(self):
        return len(self._pending)

    def add(self, expired):
        """
        Call C{expired()} in C{timeout} seconds unless L{remove}d first.

        @return: a token for L{remove}.
        """
        token = self._next
        self._next = token + 1
        self._pending[token] = (self._clock.seconds() + self.timeout, expired)
        if self._call is None:
            self._call = self._clock.callLater(self.timeout, self._expire)
        return token

    def remove(self, token):
        """
        Forget a timeout (expired or not).  The timer stops with the last
        one (none is left behind when nothing is in flight; under load
        there is always one, and no timer is made per request).
        """
        pending = self._pending
        pending.pop(token, None)
        if not pending and self._call is not None:
            self._call.cancel()
            self._call = None

    def _expire(self):
        self._call = None
        pending = self._pending
        while pending:
            now = self._clock.seconds()
            token = next(iter(pending))
            deadline, expired = pending[token]
            if deadline > now:
                self._call = self._clock.callLater(deadline - now, self._expire)
                return
            del pending[token]
            expired()

    def cancel(self):
        """
        Forget every timeout (closing down).
        """
        self._pending.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
