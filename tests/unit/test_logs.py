"""
harmony.logs: the configured level is applied to Harmony's events, and
log_to_file adds a file with the same filter.
"""

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from harmony import logs


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    previous = logs.level()
    yield seen
    globalLogPublisher.removeObserver(seen.append)
    logs._predicate.setLogLevelForNamespace("", previous)


def _mine(seen):
    return [e["log_format"] for e in seen if e.get("log_namespace") == "harmony.test"]


def test_level_filters_harmony_events(events):
    log = logs.logger("harmony.test")
    logs.set_level("warn")
    log.info("quiet {x}", x=1)
    log.warn("loud {x}", x=2)
    log.error("louder")
    assert _mine(events) == ["loud {x}", "louder"]
    logs.set_level("debug")
    log.debug("details")
    assert _mine(events)[-1] == "details"


def test_trace_is_debug_and_error_is_error(events):
    logs.set_level("trace")
    assert logs.level() is LogLevel.debug
    logs.set_level("error")
    assert logs.level() is LogLevel.error
    log = logs.logger("harmony.test")
    log.warn("dropped")
    assert _mine(events) == []


def test_file_gets_filtered_events(events, tmp_path):
    path = tmp_path / "sub" / "harmony.log"
    observer = logs.add_file(str(path))
    try:
        logs.set_level("info")
        log = logs.logger("harmony.test")
        log.debug("not written")
        log.info("written {n}", n=42)
    finally:
        logs.remove_file(observer)
    text = path.read_text()
    assert "written 42" in text
    assert "not written" not in text
    # Removed: later events do not reach the file.
    logs.logger("harmony.test").info("after removal")
    assert "after removal" not in path.read_text()


def test_file_is_appended(tmp_path):
    path = tmp_path / "harmony.log"
    path.write_text("earlier line\n")
    observer = logs.add_file(str(path))
    logs.logger("harmony.test").warn("new line")
    logs.remove_file(observer)
    text = path.read_text()
    assert text.startswith("earlier line\n")
    assert "new line" in text
