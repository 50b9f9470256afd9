"""
glibc malloc thresholds set at startup (harmony.allocator).
"""

from twisted.logger import formatEvent, globalLogPublisher

from harmony import allocator


class FakeLibc:
    def __init__(self, answer=1):
        self.calls = []
        self.answer = answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_both_thresholds_are_set():
    libc = FakeLibc()
    assert allocator.tune(libc, environ={}) is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 4 << 20), (allocator.M_TRIM_THRESHOLD, 32 << 20)]
    assert (allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD) == (-3, -1)  # glibc's malloc.h


def test_an_operators_settings_win():
    for environ in (
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    ):
        libc = FakeLibc()
        assert allocator.tune(libc, environ=environ) is False
        assert libc.calls == []


def test_other_tunables_do_not_count():
    libc = FakeLibc()
    assert allocator.tune(libc, environ={"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is True
    assert len(libc.calls) == 2


def test_a_refusal_is_reported():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert allocator.tune(FakeLibc(answer=0), environ={}) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "harmony.allocator"]
    assert texts == ["glibc's malloc thresholds could not be set: more page faults for bulk transfers"]
