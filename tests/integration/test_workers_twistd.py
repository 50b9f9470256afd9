"""
C{[proxy] workers = 2} with a real twistd: both processes serve the HTTP
listener (the kernel spreads connections over their sockets), the metrics
scraped from worker 0 count every process's requests, a worker that dies
is started again, SIGHUP replaces the workers with ones running the new
configuration, SIGTERM stops them all and removes the shared directory,
and configurations several processes cannot run are refused at startup.
"""

import http.client
import os
import signal
import time

import pytest

from harmonytest import (
    alive,
    base_config,
    children,
    connection_owners,
    free_port,
    request,
    run_twistd,
    start_harmony,
    write_config,
)


def echo_pipeline(prefix):
    return f"""
[pipelines.echo]
networks = ["default"]
endpoints = ["echo_in"]
backends = ["echo_out"]
[endpoints.echo_in]
service = "http"
[endpoints.echo_in.options]
path_prefix = "{prefix}"
[backends.echo_out]
service = "echo"
"""


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def gateway(tmp_path):
    port, mport = free_port(), free_port()
    extra = f"""
[management]
enabled = true
network = "mgmt"
[network.mgmt.http]
bind_address = "127.0.0.1"
bind_port = {mport}
"""
    base = base_config(port, extra=extra).replace(
        'log_level = "info"', 'log_level = "info"\nworkers = 2\nshutdown_grace_secs = 5'
    )
    config = write_config(tmp_path, base, {"echo": echo_pipeline("/v1")})
    # The workers' shared directory goes under the test's directory.
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = start_harmony(tmp_path, config, port, env={"RUNTIME_DIRECTORY": str(runtime)})
    wait_for(lambda: "Worker 1 serving" in proc.output(), what="worker 1")
    yield proc, port, mport, tmp_path
    if proc.popen.poll() is None:
        proc.stop_cleanly()


def open_connections(port, n):
    conns = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conns.append(conn)
        assert request(port, "GET", "/v1/x", connection=conn).status == 200
    return conns


def test_both_processes_serve_and_metrics_count_them_all(gateway):
    proc, port, mport, _ = gateway
    primary = proc.popen.pid
    [worker] = children(primary)
    conns = open_connections(port, 24)
    try:
        client_ports = {c.sock.getsockname()[1] for c in conns}
        owners = connection_owners([primary, worker], port)
        assert set(owners) == client_ports
        # Both processes hold some of the 24 connections.
        assert set(owners.values()) == {primary, worker}
    finally:
        for c in conns:
            c.close()
    scrape = request(mport, "GET", "/admin/metrics")
    assert scrape.status == 200
    assert metric(scrape.body.decode(), "harmony_requests_total", pipeline="echo", status="200") == 24


def test_a_dead_worker_is_started_again(gateway):
    proc, port, _, _ = gateway
    primary = proc.popen.pid
    [worker] = children(primary)
    os.kill(worker, signal.SIGKILL)
    replacement = wait_for(lambda: [p for p in children(primary) if p != worker and alive(p)], what="a new worker")
    assert len(replacement) == 1
    # Served throughout, and by the new worker too.
    for _ in range(10):
        assert request(port, "GET", "/v1/x").status == 200
    wait_for(lambda: proc.output().count("Worker 1 serving") == 2, what="the new worker serving")
    conns = open_connections(port, 24)
    try:
        assert set(connection_owners([primary] + replacement, port).values()) == {primary, replacement[0]}
    finally:
        for c in conns:
            c.close()
    assert "Worker 1 (pid %d) exited unexpectedly" % worker in proc.output()


def test_sighup_replaces_the_workers(gateway):
    proc, port, _, directory = gateway
    primary = proc.popen.pid
    [old] = children(primary)
    (directory / "pipelines" / "echo.toml").write_text(echo_pipeline("/v2"))
    proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "Reloaded: 1 pipelines" in proc.output(), what="the reload")
    wait_for(lambda: not alive(old), what="the old worker to stop")
    [new] = wait_for(lambda: [p for p in children(primary) if alive(p)], what="the new worker")
    assert new != old
    wait_for(lambda: proc.output().count("Worker 1 serving") == 2, what="the new worker serving")
    # Every process runs the new configuration.
    conns = []
    try:
        for _ in range(24):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns.append(conn)
            assert request(port, "GET", "/v2/x", connection=conn).status == 200
            assert request(port, "GET", "/v1/x", connection=conn).status == 404
        assert set(connection_owners([primary, new], port).values()) == {primary, new}
    finally:
        for c in conns:
            c.close()


def test_sigterm_stops_every_worker_and_removes_the_shared_directory(gateway):
    proc, port, _, directory = gateway
    primary = proc.popen.pid
    [worker] = children(primary)
    shared = [d for d in (directory / "run").iterdir()]
    assert len(shared) == 1 and shared[0].name.startswith("harmony-workers-")
    assert (shared[0] / "metrics").is_dir()
    proc.stop_cleanly()
    assert not alive(worker)
    assert list((directory / "run").iterdir()) == []


def test_move_retrieves_in_http_pipelines_refused_with_workers(tmp_path):
    port = free_port()
    base = base_config(port).replace('log_level = "info"', 'log_level = "info"\nworkers = 2')
    pipeline = """
[pipelines.retrieve]
networks = ["default"]
endpoints = ["retrieve_in"]
backends = ["pacs"]
[endpoints.retrieve_in]
service = "http"
[endpoints.retrieve_in.options]
path_prefix = "/dicom"
[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "PACS"
host = "127.0.0.1"
port = 11112
dimse_retrieve_mode = "move"
"""
    config = write_config(tmp_path, base, {"retrieve": pipeline})
    result = run_twistd(tmp_path, config)
    assert result.returncode == 1
    assert "harmony: configuration error" in result.stderr
    assert "pipelines.retrieve.backends[0]" in result.stderr or "pipelines.retrieve.backends" in result.stderr
    assert 'use dimse_retrieve_mode = "get" or workers = 1' in result.stderr


RATE_LIMITED = """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo_in"]
backends = ["echo_out"]
middleware = ["limit"]
[endpoints.echo_in]
service = "http"
[endpoints.echo_in.options]
path_prefix = "/v1"
[backends.echo_out]
service = "echo"
[middleware.limit]
type = "rate_limit"
[middleware.limit.options]
key = "global"
rate = 0.001
burst = 10
"""


def test_rate_limit_budget_is_shared_by_the_workers(tmp_path):
    port = free_port()
    base = base_config(port).replace('log_level = "info"', 'log_level = "info"\nworkers = 2\nshutdown_grace_secs = 5')
    config = write_config(tmp_path, base, {"echo": RATE_LIMITED})
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = start_harmony(tmp_path, config, port, env={"RUNTIME_DIRECTORY": str(runtime)})
    conns = []
    try:
        wait_for(lambda: "Worker 1 serving" in proc.output(), what="worker 1")
        primary = proc.popen.pid
        [worker] = children(primary)
        statuses = []
        for _ in range(24):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns.append(conn)
            statuses.append(request(port, "GET", "/v1/x", connection=conn).status)
        # Both processes answered, and together they let the burst through once.
        assert set(connection_owners([primary, worker], port).values()) == {primary, worker}
        assert statuses.count(200) == 10 and statuses.count(429) == 14
        [shared] = list(runtime.iterdir())
        assert [p.name for p in shared.iterdir() if p.name.startswith("ratelimit-")] == ["ratelimit-limit.echo.bin"]
    finally:
        for conn in conns:
            conn.close()
        proc.stop_cleanly()
