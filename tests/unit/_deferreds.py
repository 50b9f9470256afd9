"""
Helpers for tests that drive Deferreds and Streams synchronously (no
reactor): the result of a Deferred that has fired, its failure, and the
items of a finished Stream.
"""

from twisted.python.failure import Failure

from harmony.streams import EOF


def result_of(d):
    """
    The result of a Deferred that has fired (failures are raised).
    """
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d, *kinds):
    """
    The Failure of a Deferred that has failed (with one of C{kinds}).
    """
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    if kinds:
        assert box[0].check(*kinds), box[0]
    return box[0]


def has_fired(d):
    box = []
    d.addBoth(lambda r: box.append(r) or r)
    return bool(box)


def drain(stream):
    """
    The items of a Stream up to its end (which must have come).
    """
    items = []
    while True:
        item = result_of(stream.read())
        if item is EOF:
            return items
        items.append(item)
