# -*- test-case-name: tests.unit.test_dimse_pool -*-
"""
Idle associations kept for reuse: an operation that needs an association
with the same presentation contexts (and user identity) takes one instead
of connecting and negotiating again.  An association is parked only when
it is healthy and has nothing in progress, for at most C{idle_timeout}
seconds (then released), and never more than C{max_idle} per key.

Like HTTP keep-alive: it saves the connect + A-ASSOCIATE round trips (and
the PACS's set-up work) per query, at the cost of holding associations
open a few seconds; PACSs that serve one association at a time should not
be pooled (C{idle_timeout = 0}, the default of the backends).
"""

from twisted.internet import defer

from harmony.logs import logger

log = logger("harmony.dimse.pool")


def pool_key(syntaxes, user_identity=None, extra=None):
    """
    The key of associations negotiated for C{syntaxes} (C{[(abstract
    syntax, [transfer syntax, ...]), ...]}) with C{user_identity}.
    """
    identity = None
    if user_identity is not None:
        identity = (user_identity.type, bytes(user_identity.primary), bytes(user_identity.secondary or b""))
    return (tuple((abstract, tuple(ts)) for abstract, ts in syntaxes), identity, extra)


class AssociationPool:
    """
    @param clock: an C{IReactorTime}.
    @param idle_timeout: seconds an idle association is kept (0: never).
    @param max_idle: idle associations kept per key.
    """

    def __init__(self, clock, idle_timeout, max_idle=4):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle = {}
        self._closed = False

    def take(self, key):
        """
        An idle association for C{key} that is still usable, or C{None}.
        """
        entries = self._idle.get(key)
        while entries:
            association, timer = entries.pop()
            if timer.active():
                timer.cancel()
            if association.reusable:
                return association
            release_quietly(association)
        return None

    def give(self, key, association):
        """
        Done with C{association}: park it for reuse when it is healthy and
        idle (else release it).
        """
        if self._closed or not self.idle_timeout or not association.reusable:
            release_quietly(association)
            return
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self.max_idle:
            release_quietly(association)
            return
        timer = self.clock.callLater(self.idle_timeout, self._expire, key, association)
        entries.append((association, timer))

    def _expire(self, key, association):
        entries = self._idle.get(key, [])
        for i, (parked, _) in enumerate(entries):
            if parked is association:
                del entries[i]
                break
        if not entries:
            self._idle.pop(key, None)
        release_quietly(association)

    @property
    def idle(self):
        """
        How many associations are parked.
        """
        return sum(len(entries) for entries in self._idle.values())

    def close(self):
        """
        Release every parked association; nothing is parked afterwards.

        @return: Deferred[None] once they are released.
        """
        self._closed = True
        ds = []
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            for association, timer in entries:
                if timer.active():
                    timer.cancel()
                ds.append(release_quietly(association))
        return defer.DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)


def release_quietly(association):
    """
    Release an association, ignoring how that ends (it may be gone
    already).

    @return: Deferred[None]
    """
    d = defer.maybeDeferred(association.release)
    d.addErrback(lambda f: None)
    return d
