"""
Tests for L{harmony.timeouts.Deadlines}.
"""

from twisted.internet.task import Clock

from harmony.timeouts import Deadlines


def test_expire_in_order_after_the_timeout():
    clock = Clock()
    deadlines = Deadlines(clock, 10)
    fired = []
    deadlines.add(lambda: fired.append("a"))
    clock.advance(3)
    deadlines.add(lambda: fired.append("b"))
    clock.advance(6.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == ["a"]
    clock.advance(2.9)
    assert fired == ["a"]
    clock.advance(0.1)
    assert fired == ["a", "b"]
    assert len(deadlines) == 0 and clock.getDelayedCalls() == []


def test_removed_never_fire_and_one_timer_serves_all():
    clock = Clock()
    deadlines = Deadlines(clock, 5)
    fired = []
    tokens = [deadlines.add(lambda i=i: fired.append(i)) for i in range(1000)]
    assert len(clock.getDelayedCalls()) == 1
    for token in tokens[:999]:
        deadlines.remove(token)
    deadlines.remove(tokens[0])  # twice: harmless
    clock.advance(5)
    assert fired == [999]
    assert clock.getDelayedCalls() == []


def test_no_timer_left_when_nothing_is_pending():
    clock = Clock()
    deadlines = Deadlines(clock, 5)
    token = deadlines.add(lambda: None)
    deadlines.remove(token)
    assert clock.getDelayedCalls() == []


def test_rescheduled_for_the_oldest_left():
    clock = Clock()
    deadlines = Deadlines(clock, 10)
    fired = []
    first = deadlines.add(lambda: fired.append(1))
    clock.advance(4)
    deadlines.add(lambda: fired.append(2))
    deadlines.remove(first)
    clock.advance(6)  # the first one's deadline: nothing due
    assert fired == []
    [call] = clock.getDelayedCalls()
    assert call.getTime() == 14
    clock.advance(4)
    assert fired == [2]


def test_added_after_all_expired_gets_a_new_timer():
    clock = Clock()
    deadlines = Deadlines(clock, 1)
    fired = []
    deadlines.add(lambda: fired.append(1))
    clock.advance(1)
    deadlines.add(lambda: fired.append(2))
    clock.advance(1)
    assert fired == [1, 2]


def test_an_expiry_may_add_and_remove():
    clock = Clock()
    deadlines = Deadlines(clock, 2)
    fired = []
    later = []

    def first():
        fired.append("first")
        deadlines.remove(later[0])
        deadlines.add(lambda: fired.append("again"))

    deadlines.add(first)
    later.append(deadlines.add(lambda: fired.append("removed")))
    clock.advance(2)
    assert fired == ["first"]
    clock.advance(2)
    assert fired == ["first", "again"]


def test_cancel():
    clock = Clock()
    deadlines = Deadlines(clock, 2)
    fired = []
    deadlines.add(lambda: fired.append(1))
    deadlines.cancel()
    clock.advance(5)
    assert fired == [] and clock.getDelayedCalls() == []
