"""
Structured logs through a real C{twistd -n harmony}: with C{[logging]
format = "json"} every line on stdout (and in the log file) is a JSON
object; one access line per HTTP request carries the client's
C{X-Request-ID}, which also reaches the upstream; a DICOM association
(DCMTK's echoscu) gets its own access line.  Query strings never reach
the log.
"""

import json
import time
import uuid

import pytest
from peers import dcmtk

from harmonytest import base_config, free_port, request, run_twistd, start_harmony, write_config

SECRET = "PATIENTID5551234"
AET = "HARMONYLOG"

PIPELINES = """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo_ep"]
backends = ["echo_be"]

[endpoints.echo_ep]
service = "echo"
[endpoints.echo_ep.options]
path_prefix = "/echo"

[backends.echo_be]
service = "echo"

[pipelines.api]
networks = ["default"]
endpoints = ["api_ep"]
backends = ["api_be"]

[endpoints.api_ep]
service = "http"
[endpoints.api_ep.options]
path_prefix = "/api"

[backends.api_be]
service = "http"
[backends.api_be.options]
base_url = "{upstream}"
timeout_secs = 10

[pipelines.dicom]
endpoints = ["scp"]
backends = ["sink"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "{aet}"
bind_addr = "127.0.0.1"
port = {dicom_port}

[backends.sink]
service = "echo"
"""

LOGGING = """
[logging]
format = "json"
level = "info"
log_to_file = true
log_file_path = "logs/harmony.log"
"""


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("logs")
    port, dicom_port = free_port(), free_port()
    config = write_config(
        directory,
        base_config(port, extra=LOGGING),
        {"main": PIPELINES.format(upstream=upstream.url, aet=AET, dicom_port=dicom_port)},
    )
    process = start_harmony(directory, config, port)
    process.wait_for_port(dicom_port)

    class Gateway:
        pass

    gw = Gateway()
    gw.port, gw.dicom_port, gw.process, gw.directory = port, dicom_port, process, directory
    yield gw
    process.stop_cleanly()


def json_lines(text):
    """
    Every non-empty line of C{text}, parsed (fails on a line that is not JSON).
    """
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def access_lines(gw, **match):
    return [
        e
        for e in json_lines(gw.process.output())
        if e.get("namespace") == "harmony.access" and all(e.get(k) == v for k, v in match.items())
    ]


def test_stdout_is_json_lines(gateway):
    assert request(gateway.port, "GET", "/echo/warmup").status == 200
    events = json_lines(gateway.process.output())
    assert events, "no output"
    for event in events:
        assert {"timestamp", "level", "namespace", "message"} <= set(event), event
        assert event["timestamp"].endswith("Z")
    messages = [e["message"] for e in events]
    # twistd's own lines and Harmony's are both JSON.
    assert any("starting up" in m for m in messages), messages
    assert any(f"listening on http://127.0.0.1:{gateway.port}" in m for m in messages), messages


def test_one_access_line_per_request_with_the_client_id(gateway):
    sent = []
    for i in range(3):
        rid = f"it-echo-{uuid.uuid4().hex[:8]}-{i}"
        resp = request(gateway.port, "GET", f"/echo/Patient/{i}?patient={SECRET}", headers=[("X-Request-ID", rid)])
        assert resp.status == 200
        assert resp.header("X-Request-ID") == rid
        sent.append((rid, f"/echo/Patient/{i}"))
    for rid, path in sent:
        [line] = wait_for(lambda: access_lines(gateway, request_id=rid))
        assert (line["access"], line["method"], line["path"], line["status"]) == ("http", "GET", path, 200)
        assert (line["network"], line["pipeline"], line["client"]) == ("default", "echo", "127.0.0.1")
        assert line["bytes"] > 0 and line["duration_ms"] >= 0
        assert line["level"] == "info"
    assert request(gateway.port, "GET", f"/nowhere?patient={SECRET}", headers=[("X-Request-ID", "it-404")]).status == 404
    [line] = wait_for(lambda: access_lines(gateway, request_id="it-404"))
    assert (line["status"], line["path"], line["pipeline"]) == (404, "/nowhere", "-")
    assert SECRET not in gateway.process.output()


def test_request_id_reaches_the_upstream(gateway):
    rid = "it-upstream-" + uuid.uuid4().hex
    resp = request(gateway.port, "GET", f"/api/echo/x?patient={SECRET}", headers=[("X-Request-ID", rid)])
    assert resp.status == 200
    assert resp.header("X-Request-ID") == rid
    seen = [v for k, v in resp.json()["headers"] if k == "x-request-id"]
    assert seen == [rid]
    [line] = wait_for(lambda: access_lines(gateway, request_id=rid))
    assert (line["pipeline"], line["path"], line["status"]) == ("api", "/api/echo/x", 200)
    # No id (or an invalid one) from the client: a generated one, the same
    # for the client, the upstream and the log.
    for headers in ([], [("X-Request-ID", "not valid")]):
        resp = request(gateway.port, "POST", "/api/echo/y", body=b"{}", headers=headers)
        rid = resp.header("X-Request-ID")
        assert rid and len(rid) == 32 and uuid.UUID(hex=rid).version == 4
        assert [v for k, v in resp.json()["headers"] if k == "x-request-id"] == [rid]
        assert wait_for(lambda: access_lines(gateway, request_id=rid, method="POST"))
    assert SECRET not in gateway.process.output()


def test_dicom_association_line(gateway):
    result = dcmtk("echoscu", "-aet", "LOGSCU", "-aec", AET, "127.0.0.1", gateway.dicom_port)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = wait_for(lambda: access_lines(gateway, access="dicom", calling_aet="LOGSCU", result="released"))
    assert line["called_aet"] == AET
    assert line["operations"] == {"echo": 1}
    assert line["peer"].startswith("127.0.0.1:")
    assert line["duration_ms"] >= 0
    assert "DICOM association LOGSCU -> HARMONYLOG" in line["message"]
    # A rejected association (wrong called AE title) gets its line too.
    result = dcmtk("echoscu", "-aet", "LOGSCU2", "-aec", "SOMEONE", "127.0.0.1", gateway.dicom_port)
    assert result.returncode != 0
    [line] = wait_for(lambda: access_lines(gateway, access="dicom", calling_aet="LOGSCU2"))
    assert (line["result"], line["operations"]) == ("rejected", {})


def test_log_file_is_json_too(gateway):
    rid = "it-file-" + uuid.uuid4().hex[:8]
    assert request(gateway.port, "GET", "/echo/file", headers=[("X-Request-ID", rid)]).status == 200
    path = gateway.directory / "logs" / "harmony.log"

    def in_file():
        return [e for e in json_lines(path.read_text()) if e.get("request_id") == rid]

    [line] = wait_for(in_file)
    assert line["namespace"] == "harmony.access" and line["path"] == "/echo/file"


def test_text_access_line(echo_gateway):
    """
    The default (text) format: twistd's classic lines, the access line
    included.
    """
    resp = request(echo_gateway.port, "GET", f"/echo/text?patient={SECRET}", headers=[("X-Request-ID", "it-text-1")])
    assert resp.status == 200
    assert resp.header("X-Request-ID") == "it-text-1"

    def found():
        return [
            line
            for line in echo_gateway.process.output().splitlines()
            if "[harmony.access#info]" in line and "request_id=it-text-1" in line
        ]

    [line] = wait_for(found)
    assert " GET /echo/text 200 " in line
    assert "client=127.0.0.1 network=default pipeline=" in line
    assert SECRET not in echo_gateway.process.output()


def test_levels_that_disagree_fail_startup(tmp_path):
    port = free_port()
    base = base_config(port, extra='[logging]\nlevel = "debug"\n')  # [proxy] log_level = "info"
    config = write_config(tmp_path, base, {"main": PIPELINES.split("[pipelines.api]")[0]})
    result = run_twistd(tmp_path, config)
    assert result.returncode != 0
    assert "logging.level" in result.stderr and "disagrees with proxy.log_level" in result.stderr, result.stderr
