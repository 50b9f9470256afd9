"""
SIGHUP reloads the configuration (a broken one is refused and the running
one stays) without dropping in-flight transfers; SIGTERM lets in-flight
requests finish.  Through a real twistd and the test upstream.
"""

import http.client
import os
import signal
import threading
import time

import pytest
from upstream_server import pseudo_random

from harmonytest import accepts, base_config, free_port, request, start_harmony, write_config

FIVE_MB = 5 * 1024 * 1024


def proxy_pipeline(prefix, upstream_url):
    return f"""
[pipelines.api]
networks = ["default"]
endpoints = ["api_in"]
backends = ["api_out"]
[endpoints.api_in]
service = "http"
[endpoints.api_in.options]
path_prefix = "{prefix}"
[backends.api_out]
service = "http"
[backends.api_out.options]
base_url = "{upstream_url}"
"""


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def gateway(tmp_path, upstream):
    port = free_port()
    base = base_config(port, extra="")
    config = write_config(tmp_path, base.replace('log_level = "info"', 'log_level = "info"\nshutdown_grace_secs = 10'),
                          {"api": proxy_pipeline("/api", upstream.url)})
    proc = start_harmony(tmp_path, config, port)
    yield proc, port, tmp_path
    proc.stop_cleanly()


class SlowReader:
    """
    A GET whose body is read slowly, so that it stays in flight.
    """

    def __init__(self, port, target):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", target)
        self.response = self.conn.getresponse()
        self.first = self.response.read(64 * 1024)

    def rest(self):
        data = self.response.read()
        self.conn.close()
        return self.first + data


def test_sighup_switches_pipelines_without_dropping_an_inflight_transfer(gateway, upstream):
    proc, port, directory = gateway
    slow = SlowReader(port, f"/api/binary/{FIVE_MB}")
    assert slow.response.status == 200
    (directory / "pipelines" / "api.toml").write_text(proxy_pipeline("/v2", upstream.url))
    os.kill(proc.popen.pid, signal.SIGHUP)
    wait_for(lambda: "Reloaded: 1 pipelines" in proc.output(), what="the reload")
    assert request(port, "GET", "/v2/echo-me").status == 200
    assert request(port, "GET", "/api/echo-me").status == 404
    body = slow.rest()
    assert len(body) == FIVE_MB
    assert body == pseudo_random(FIVE_MB)


def test_sighup_with_a_broken_config_keeps_the_running_one(gateway):
    proc, port, directory = gateway
    (directory / "pipelines" / "api.toml").write_text("[pipelines.api\nbroken")
    os.kill(proc.popen.pid, signal.SIGHUP)
    wait_for(lambda: "Reload refused, the running configuration stays" in proc.output(), what="the refusal")
    assert "pipelines/api.toml" in proc.output()
    assert request(port, "GET", "/api/still-here").status == 200
    # A config that loads but cannot be built (unknown backend) is refused too.
    (directory / "pipelines" / "api.toml").write_text(
        proxy_pipeline("/api", "http://127.0.0.1:1").replace('backends = ["api_out"]', 'backends = ["nope"]')
    )
    os.kill(proc.popen.pid, signal.SIGHUP)
    wait_for(lambda: proc.output().count("Reload refused") == 2, what="the second refusal")
    assert request(port, "GET", "/api/still-here").status == 200


def test_sigterm_lets_inflight_requests_finish(tmp_path, upstream):
    port = free_port()
    config = write_config(tmp_path, base_config(port), {"api": proxy_pipeline("/api", upstream.url)})
    proc = start_harmony(tmp_path, config, port)
    results = {}

    # A URI of this test only: the upstream's request log shows when it
    # is in flight there.
    target = f"/api/sleep/1.5?t={time.monotonic_ns()}"

    def slow_request():
        results["response"] = request(port, "GET", target)

    def at_upstream():
        seen = request(upstream.port, "GET", "/_requests").json()
        return ["GET", target[len("/api"):]] in seen

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_for(at_upstream, what="the request to reach the upstream")
    proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: "Draining 1 in-flight" in proc.output(), what="draining")
    assert not accepts(port)  # no new connections while draining
    thread.join(10)
    assert results["response"].status == 200
    assert results["response"].body == b"slept"
    proc.popen.wait(15)
    proc.stop_cleanly()
    assert "Draining 1 in-flight requests/associations" in proc.output()
