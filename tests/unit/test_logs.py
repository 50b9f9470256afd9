"""
harmony.logs: the configured level is applied to Harmony's events, and
log_to_file adds a file with the same filter; the text and JSON formats,
twistd's replacement observer, the access events and the [logging] table.
"""

import io
import json
import re
import sys

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from _configfiles import PROXY, load, load_error
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


# -- formats -----------------------------------------------------------------

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def _event(log_format, **fields):
    """
    One event as a Harmony logger emits it (captured, not published).
    """
    seen = []
    Logger(namespace="harmony.test", observer=seen.append).info(log_format, **fields)
    return seen[0]


def test_iso_utc():
    assert logs.iso_utc(0.5) == "1970-01-01T00:00:00.500Z"
    assert logs.iso_utc(1714564800.1239) == "2024-05-01T12:00:00.123Z"
    assert logs.iso_utc(1714564801.0) == "2024-05-01T12:00:01.000Z"  # cache moves on
    assert ISO_UTC.match(logs.iso_utc(None))


def test_json_line_has_the_common_fields():
    line = logs.format_json(_event("Backend {backend} is {state}", backend="pacs", state="up"))
    assert line.endswith("\n") and line.count("\n") == 1
    data = json.loads(line)
    assert ISO_UTC.match(data["timestamp"])
    assert data["level"] == "info"
    assert data["namespace"] == "harmony.test"
    assert data["message"] == "Backend pacs is up"
    assert data["backend"] == "pacs" and data["state"] == "up"


def test_json_keeps_only_safe_plain_fields():
    class Dataset:
        def __str__(self):
            return "PatientName=Doe^John"

    event = _event(
        "Stored {count} instances",
        count=3,
        body=b"secret body",
        dataset=Dataset(),
        patient_id="PAT123",
        query="PatientID=PAT123",
        peer=Dataset(),  # a safe key, but not a plain value
    )
    data = json.loads(logs.format_json(event))
    assert data["count"] == 3
    for key in ("body", "dataset", "patient_id", "query", "peer", "log_format", "log_logger", "log_source"):
        assert key not in data, key
    text = json.dumps(data)
    assert "PAT123" not in text and "Doe" not in text and "secret" not in text


def test_json_escapes_and_stays_one_line():
    event = _event('Odd {reason}', reason='a "quoted"\nsecond line\ttab \x1b[31m é ☃')
    line = logs.format_json(event)
    assert line.count("\n") == 1
    assert "\x1b" not in line
    assert json.loads(line)["reason"] == 'a "quoted"\nsecond line\ttab \x1b[31m é ☃'
    assert line.isascii()


def test_json_failure_has_type_and_traceback():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    seen = []
    Logger(namespace="harmony.test", observer=seen.append).failure("Handling {endpoint} failed", failure, endpoint="api")
    data = json.loads(logs.format_json(seen[0]))
    assert data["level"] == "critical"
    assert data["message"] == "Handling api failed"
    assert data["error_type"] == "ZeroDivisionError"
    assert "Traceback" in data["traceback"] and "ZeroDivisionError" in data["traceback"]


def test_json_of_twisted_and_stdio_events():
    # Events not from Harmony's loggers: legacy, print() redirected by twistd.
    data = json.loads(logs.format_json({"log_format": "{log_io}", "log_io": "printed", "log_namespace": "stdout"}))
    assert data["message"] == "printed"
    assert data["level"] == "info" and data["namespace"] == "stdout"


def test_text_line_is_twistds_classic_format():
    event = _event("Network {network} listening", network="main")
    line = logs.format_text(event)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[harmony\.test#info\] Network main listening\n\Z", line)


def test_set_format_and_formatter():
    try:
        logs.set_format("json")
        assert logs.formatter() is logs.format_json
        with pytest.raises(ValueError):
            logs.set_format("xml")
    finally:
        logs.set_format("text")
    assert logs.formatter() is logs.format_text


def test_json_file(tmp_path, events):
    path = tmp_path / "harmony.log"
    logs.set_format("json")
    observer = logs.add_file(str(path))
    try:
        logs.set_level("info")
        logs.logger("harmony.test").info("to the file {n}", n=1)
        logs.logger("harmony.test").debug("filtered")
        # A reload that changes the format applies to the open file.
        logs.set_format("text")
        logs.logger("harmony.test").info("as text")
    finally:
        logs.set_format("text")
        logs.remove_file(observer)
    first, second = path.read_text().splitlines()
    assert json.loads(first)["message"] == "to the file 1"
    assert second.endswith("[harmony.test#info] as text")


# -- twistd's observer ---------------------------------------------------------


def test_twistd_observer_destinations(tmp_path, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    logs.set_format("json")
    try:
        assert logs.twistd_observer({"syslog": True, "nodaemon": True}) is None
        for options in (None, {"nodaemon": True, "logfile": None}, {"nodaemon": True, "logfile": "-"}):
            observer = logs.twistd_observer(options)
            observer(_event("to stdout {n}", n=1))
        path = tmp_path / "twistd-harmony.log"
        observer = logs.twistd_observer({"nodaemon": False, "logfile": str(path)})
        observer(_event("to the file"))
    finally:
        logs.set_format("text")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["to stdout 1"] * 3
    assert json.loads(path.read_text())["message"] == "to the file"


# -- access events ---------------------------------------------------------------


def _access(seen):
    return [e for e in seen if e.get("log_namespace") == logs.ACCESS]


def test_access_events_ignore_the_level(events):
    logs.set_level("error")
    logs.http_access("GET", "/api/x", 200, 5, 0.0123456, "192.0.2.1", "main", "api", "rid-1")
    [event] = _access(events)
    assert event["log_level"].name == "info"
    text = "GET /api/x 200 5B 12.345ms client=192.0.2.1 network=main pipeline=api request_id=rid-1"
    assert formatEvent(event) == text
    assert logs.format_text(event).endswith("[harmony.access#info] " + text + "\n")
    data = json.loads(logs.format_json(event))
    assert data["message"] == text
    assert {k: data[k] for k in ("access", "method", "path", "status", "bytes", "duration_ms", "client")} == {
        "access": "http",
        "method": "GET",
        "path": "/api/x",
        "status": 200,
        "bytes": 5,
        "duration_ms": 12.345,
        "client": "192.0.2.1",
    }
    assert (data["network"], data["pipeline"], data["request_id"], data["aborted"]) == ("main", "api", "rid-1", False)


def test_access_can_be_turned_off(events):
    logs.set_access(False)
    try:
        logs.http_access("GET", "/x", 200, 0, 0.0, None, None, None, None)
        logs.dicom_access("A", "B", "h:1", 0.0, {}, "released")
    finally:
        logs.set_access(True)
    assert _access(events) == []
    assert logs.access_enabled()


def test_access_unknowns_and_odd_paths(events):
    logs.http_access("GET", "/a\x1bb", 499, 0, 0.5, None, None, None, None, aborted=True)
    [event] = _access(events)
    assert formatEvent(event) == (
        "GET /a\\x1bb 499 0B 500.0ms client=- network=- pipeline=- request_id=- (connection lost)"
    )
    assert event["aborted"] is True


def test_dicom_access_event(events):
    logs.dicom_access("MODALITY", "HARMONY", "192.0.2.7:4000", 1.25, {"store": 3, "echo": 1}, "released")
    [event] = _access(events)
    text = "DICOM association MODALITY -> HARMONY from 192.0.2.7:4000 released after 1250.0ms, operations echo=1, store=3"
    assert formatEvent(event) == text
    data = json.loads(logs.format_json(event))
    assert data["message"] == text
    assert data["operations"] == {"store": 3, "echo": 1}
    assert (data["access"], data["calling_aet"], data["called_aet"], data["peer"], data["result"]) == (
        "dicom", "MODALITY", "HARMONY", "192.0.2.7:4000", "released"
    )
    assert "operations_text" not in data


# -- [logging] configuration ------------------------------------------------------


def test_logging_defaults(tmp_path):
    config = load(tmp_path, PROXY)
    assert config.logging.format == "text"
    assert config.logging.access_log is True
    assert config.logging.level == config.proxy.log_level == "info"


def test_logging_level_is_an_alias(tmp_path):
    config = load(tmp_path, PROXY + '\n[logging]\nformat = "JSON"\nlevel = "debug"\naccess_log = false\n')
    assert config.logging.format == "json"
    assert config.logging.level == config.proxy.log_level == "debug"
    config = load(tmp_path, PROXY + 'log_level = "warn"\n')
    assert config.logging.level == config.proxy.log_level == "warn"
    config = load(tmp_path, PROXY + 'log_level = "error"\n[logging]\nlevel = "error"\n')
    assert config.logging.level == "error"


def test_logging_levels_that_disagree(tmp_path):
    error = load_error(tmp_path, PROXY + 'log_level = "info"\n[logging]\nlevel = "debug"\n')
    assert error.file == "harmony.toml"
    assert error.key == "logging.level"
    assert 'disagrees with proxy.log_level = "info"' in str(error)


def test_logging_bad_values(tmp_path):
    error = load_error(tmp_path, PROXY + '[logging]\nformat = "xml"\n')
    assert error.key == "logging.format"
    error = load_error(tmp_path, PROXY + '[logging]\nlevel = "loud"\n')
    assert error.key == "logging.level"


def test_configure(tmp_path, events):
    config = load(tmp_path, PROXY + '[logging]\nformat = "json"\nlevel = "warn"\naccess_log = false\n')
    try:
        logs.configure(config.logging)
        assert logs.level() is LogLevel.warn
        assert logs.formatter() is logs.format_json
        assert not logs.access_enabled()
    finally:
        logs.set_format("text")
        logs.set_access(True)


def test_http_access_json_fast_path_matches_the_general_one(events):
    logs.http_access("PUT", '/a"b\u00e9\\c', 201, 7, 0.0042, "2001:db8::1", "main", "api", "r:1", aborted=True)
    [event] = _access(events)
    fast = logs.format_json(event)
    general = logs.format_json(dict(event, access="other"))
    assert fast.endswith("\n") and fast.count("\n") == 1 and fast.isascii()
    assert list(json.loads(fast).items()) == list(dict(json.loads(general), access="http").items())
    # Not what http_access makes (a status that is not a number): the general path.
    odd = logs.format_json(dict(event, status="bad"))
    assert json.loads(odd)["status"] == "bad"


# -- batched writes ------------------------------------------------------------


class _Clock(Clock):
    running = True


def test_batching_observer_writes_once_per_reactor_iteration():
    out = io.StringIO()
    clock = _Clock()
    observer = logs.stream_observer(out, "json", clock=clock)
    for n in range(3):
        observer(_event("line {n}", n=n))
    assert out.getvalue() == ""
    clock.advance(0)
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["line 0", "line 1", "line 2"]
    assert clock.getDelayedCalls() == []


def test_batching_observer_writes_warnings_and_shutdown_lines_at_once():
    out = io.StringIO()
    clock = _Clock()
    observer = logs.stream_observer(out, "text", clock=clock)
    observer(_event("first"))
    seen = []
    Logger(namespace="harmony.test", observer=seen.append).warn("trouble")
    observer(seen[0])
    # The warning and what waited before it, in order; no timer left.
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["first", "trouble"]
    assert clock.getDelayedCalls() == []
    clock.running = False
    observer(_event("Server Shut Down."))
    assert out.getvalue().endswith("Server Shut Down.\n")


def test_batching_observer_limit():
    out = io.StringIO()
    clock = _Clock()
    observer = logs.stream_observer(out, "text", clock=clock)
    observer.limit = 200
    for n in range(5):
        observer(_event("x" * 60))
    assert 200 <= len(out.getvalue()) < 5 * 100
    observer.flush()
    assert out.getvalue().count("\n") == 5


def test_worker_processes_mark_their_json_lines(events):
    logs.set_worker(2)
    try:
        logs.http_access("GET", "/a", 200, 1, 0.001, "127.0.0.1", "main", "api", "r1")
        [event] = _access(events)
        fast = json.loads(logs.format_json(event))
        general = json.loads(logs.format_json(dict(event, access="other")))
        assert fast["worker"] == 2 and general["worker"] == 2
        assert list(fast.items()) == list(dict(general, access="http").items())
        assert json.loads(logs.format_json(_event("x")))["worker"] == 2
    finally:
        logs.set_worker(None)
    assert "worker" not in json.loads(logs.format_json(_event("x")))
    assert "worker" not in json.loads(logs.format_json(event))
