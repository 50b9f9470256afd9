"""
C{twistd harmony} as a real process: packaging (plugin discovery), the
shipped default configuration (echo pipeline), startup failures on bad
configurations, and C{harmony check-config}.
"""

import base64
import json
import socket
import subprocess

import pytest

from harmonytest import (
    HARMONY_CLI,
    TWISTD,
    base_config,
    free_port,
    request,
    run_twistd,
    start_harmony,
    write_config,
)

ECHO_PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_ep"]
backends = ["{name}_be"]

[endpoints.{name}_ep]
service = "echo"
[endpoints.{name}_ep.options]
path_prefix = "{prefix}"

[backends.{name}_be]
service = "echo"
"""

HTTP_PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_ep"]
backends = ["{backend}"]

[endpoints.{name}_ep]
service = "http"
[endpoints.{name}_ep.options]
path_prefix = "{prefix}"

[backends.{name}_be]
service = "http"
[backends.{name}_be.options]
base_url = "http://127.0.0.1:9"
timeout_secs = {timeout}
"""


# -- packaging ---------------------------------------------------------------


def test_twistd_help_lists_harmony(tmp_path):
    """
    The plugin is found from any working directory (installed package, not
    the checkout's cwd).
    """
    result = subprocess.run([TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert "harmony" in commands, result.stdout


def test_twistd_harmony_help_shows_config_option(tmp_path):
    result = subprocess.run(
        [TWISTD, "harmony", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_twistd_harmony_without_config_fails(tmp_path):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "harmony"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "--config" in result.stdout + result.stderr


# -- the shipped default configuration (echo) ---------------------------------


def test_startup_log_names_the_listener(echo_gateway):
    # The log line is written once the port is bound (the fixture waited for it).
    assert f"listening on http://127.0.0.1:{echo_gateway.port}" in echo_gateway.process.output()


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_echo_bodyless_methods(echo_gateway, method):
    resp = request(echo_gateway.port, method, "/echo/patients/42?name=Doe&name=Roe&flag=", headers=[("X-Trace", "abc")])
    assert resp.status == 200, resp
    assert resp.header("Content-Type") == "application/json"
    data = resp.json()
    assert data["method"] == method
    assert data["path"] == "patients/42"
    assert data["full_path"] == "/echo/patients/42"
    assert data["query"] == {"name": ["Doe", "Roe"], "flag": [""]}
    assert data["headers"]["x-trace"] == "abc"
    assert data["body"] == ""


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_echo_methods_with_body(echo_gateway, method):
    body = '{"resourceType": "Patient", "name": "Zoë"}'.encode("utf-8")
    resp = request(
        echo_gateway.port,
        method,
        "/echo/fhir/Patient",
        body=body,
        headers=[("Content-Type", "application/fhir+json")],
    )
    assert resp.status == 200, resp
    data = resp.json()
    assert data["method"] == method
    assert data["path"] == "fhir/Patient"
    assert data["full_path"] == "/echo/fhir/Patient"
    assert data["query"] == {}
    assert data["headers"]["content-type"] == "application/fhir+json"
    assert data["body"] == body.decode("utf-8")
    assert data["body_size"] == len(body)


def test_echo_binary_body_is_base64(echo_gateway):
    body = bytes(range(256))
    resp = request(echo_gateway.port, "POST", "/echo/bin", body=body)
    data = resp.json()
    assert data["body_encoding"] == "base64"
    assert base64.b64decode(data["body"]) == body


def test_echo_head_has_no_body(echo_gateway):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", echo_gateway.port, timeout=10)
    try:
        resp = request(echo_gateway.port, "HEAD", "/echo/x", connection=conn)
        assert resp.status == 200
        assert resp.body == b""
        assert resp.header("Content-Type") == "application/json"
        # No stray body bytes: the next request on the connection parses.
        resp = request(echo_gateway.port, "GET", "/echo/y", connection=conn)
        assert resp.json()["path"] == "y"
    finally:
        conn.close()


def test_echo_options(echo_gateway):
    resp = request(echo_gateway.port, "OPTIONS", "/echo/x")
    assert resp.status == 200
    assert resp.json()["method"] == "OPTIONS"


def test_echo_prefix_itself_and_boundary(echo_gateway):
    resp = request(echo_gateway.port, "GET", "/echo")
    assert resp.status == 200
    assert resp.json()["path"] == ""
    # "/echoes" is not under "/echo".
    resp = request(echo_gateway.port, "GET", "/echoes")
    assert resp.status == 404
    assert resp.json()["error"] == "not_found"


def test_echo_unknown_path_and_method(echo_gateway):
    resp = request(echo_gateway.port, "GET", "/nowhere")
    assert resp.status == 404
    assert resp.header("Content-Type") == "application/json"
    assert set(resp.json()) == {"error", "message"}
    resp = request(echo_gateway.port, "PROPFIND", "/echo/x")
    assert resp.status == 405
    assert resp.json()["error"] == "method_not_allowed"
    assert "GET" in resp.header("Allow")
    # Still serving.
    assert request(echo_gateway.port, "GET", "/echo/ok").status == 200


def test_echo_dot_segments_rejected(echo_gateway):
    resp = request(echo_gateway.port, "GET", "/echo/a/../../etc/passwd")
    assert resp.status == 400
    assert resp.json()["error"] == "bad_request"
    resp = request(echo_gateway.port, "GET", "/echo/a/%2e%2e/b")
    assert resp.status == 400
    assert request(echo_gateway.port, "GET", "/echo/ok").status == 200


def test_echo_keep_alive_connection(echo_gateway):
    """
    Several requests on one persistent connection.
    """
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", echo_gateway.port, timeout=10)
    try:
        for i in range(5):
            resp = request(echo_gateway.port, "POST", f"/echo/{i}", body=b"x" * i, connection=conn)
            assert resp.status == 200
            assert resp.json()["path"] == str(i)
            assert resp.json()["body_size"] == i
    finally:
        conn.close()


def test_echo_no_access_log_of_query_strings(echo_gateway):
    """
    Query strings can hold patient identifiers: they must not reach the log.
    """
    marker = "PATIENTID9876543210"
    assert request(echo_gateway.port, "GET", f"/echo/find?patient={marker}").status == 200
    assert request(echo_gateway.port, "GET", "/nowhere?patient=" + marker).status == 404
    assert marker not in echo_gateway.process.output()


def test_environment_substitution(tmp_path):
    port = free_port()
    config = write_config(
        tmp_path,
        base_config(port, proxy_id="${HARMONY_IT_ID:-fallback-id}"),
        {"echo": ECHO_PIPELINE.format(name="e", prefix="${HARMONY_IT_PREFIX}")},
    )
    proc = start_harmony(tmp_path, config, port, env={"HARMONY_IT_PREFIX": "/from-env"})
    try:
        assert request(port, "GET", "/from-env/x").json()["path"] == "x"
        assert request(port, "GET", "/${HARMONY_IT_PREFIX}/x").status == 404
        assert "fallback-id" in proc.output()
    finally:
        proc.stop_cleanly()


def test_log_level_and_log_file_are_applied(tmp_path):
    port = free_port()
    base = base_config(port, extra='[logging]\nlog_to_file = true\nlog_file_path = "logs/harmony.log"\n')
    base = base.replace('log_level = "info"', 'log_level = "warn"')
    config = write_config(
        tmp_path,
        base,
        {
            "echo": ECHO_PIPELINE.format(name="e", prefix="/echo"),
            # An unused backend: a configuration warning at startup.
            "spare": '[backends.spare]\nservice = "echo"\n',
        },
    )
    proc = start_harmony(tmp_path, config, port)
    try:
        assert request(port, "GET", "/echo/x").status == 200
        out = proc.output()
        # warn level: Harmony's info events are filtered, warnings are not.
        assert "listening on" not in out, out
        assert "backend is not used by any pipeline" in out, out
        # The log file sits next to the config file and gets the same events.
        text = (tmp_path / "logs" / "harmony.log").read_text()
        assert "backend is not used by any pipeline" in text
        assert "listening on" not in text
    finally:
        proc.stop_cleanly()


# -- startup failures ---------------------------------------------------------


def _failed(result):
    assert result.returncode != 0, f"twistd should have failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_bad_option_type_names_file_and_key(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {
            "ok": ECHO_PIPELINE.format(name="e", prefix="/echo"),
            "broken": HTTP_PIPELINE.format(name="x", backend="x_be", prefix="/x", timeout='"abc"'),
        },
    )
    result = run_twistd(tmp_path, config)
    out = _failed(result)
    assert "broken.toml" in out, out
    assert "backends.x_be.options.timeout_secs" in out, out
    # One line on stderr, not twistd's usage text.
    assert result.stderr.strip().startswith("harmony: configuration error: "), result.stderr
    assert "--help" not in out and "Usage:" not in out, out


def test_missing_backend_reference_names_file_and_key(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {"p": HTTP_PIPELINE.format(name="x", backend="no_such_backend", prefix="/x", timeout=5)},
    )
    out = _failed(run_twistd(tmp_path, config))
    assert "p.toml" in out, out
    assert "pipelines.x.backends" in out, out
    assert "no_such_backend" in out, out


def test_route_conflict_names_both_pipelines(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {
            "a": ECHO_PIPELINE.format(name="alpha", prefix="/same"),
            "b": ECHO_PIPELINE.format(name="beta", prefix="/same/"),
        },
    )
    out = _failed(run_twistd(tmp_path, config))
    assert "alpha" in out and "beta" in out, out
    assert "conflict" in out.lower(), out


def test_toml_syntax_error_names_file_and_line(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {"bad": '[pipelines.x]\nnetworks = ["default"\nendpoints = ["e"]\n'},
    )
    out = _failed(run_twistd(tmp_path, config))
    assert "bad.toml" in out, out
    assert "line" in out.lower(), out


def test_duplicate_name_across_files_names_both(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {
            "one": ECHO_PIPELINE.format(name="e", prefix="/one"),
            "two": ECHO_PIPELINE.format(name="e", prefix="/two"),
        },
    )
    out = _failed(run_twistd(tmp_path, config))
    assert "one.toml" in out and "two.toml" in out, out


def test_port_in_use_fails_startup(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = write_config(tmp_path, base_config(port), {"e": ECHO_PIPELINE.format(name="e", prefix="/echo")})
        result = run_twistd(tmp_path, config)
    out = _failed(result)
    assert f"harmony: cannot listen on 127.0.0.1:{port}" in out, out
    assert "Traceback" not in out, out


# -- harmony check-config -----------------------------------------------------


def test_check_config_accepts_shipped_config(tmp_path):
    from harmonytest import REPO

    result = subprocess.run(
        [HARMONY_CLI, "check-config", str(REPO / "etc" / "harmony.toml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Configuration OK" in result.stdout
    assert "/echo" in result.stdout


def test_check_config_rejects_bad_config(tmp_path):
    config = write_config(
        tmp_path,
        base_config(free_port()),
        {"broken": HTTP_PIPELINE.format(name="x", backend="x_be", prefix="/x", timeout='"abc"')},
    )
    result = subprocess.run(
        [HARMONY_CLI, "check-config", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result
    assert "backends.x_be.options.timeout_secs" in result.stderr
    assert "broken.toml" in result.stderr


def test_oversized_body_refused_before_it_is_read(echo_gateway):
    # Content-Length over [proxy.content_limits] max_body_size (10 MiB):
    # 413 at once, without sending (or storing) the body.
    with socket.create_connection(("127.0.0.1", echo_gateway.port), timeout=10) as s:
        s.sendall(
            b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer
    assert json.loads(body) == {"error": "payload_too_large", "message": "Request body too large"}
    # Chunked: refused once it outgrows the limit.
    with socket.create_connection(("127.0.0.1", echo_gateway.port), timeout=10) as s:
        s.sendall(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n"
        try:
            for _ in range(12):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert request(echo_gateway.port, "GET", "/echo/still").status == 200
