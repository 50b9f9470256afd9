"""
Backend targets over HTTP, end to end: a real C{twistd harmony} in front of
four real local upstreams (upstream_server.py, each answering with
C{X-Upstream-Name}), two of which are killed and restarted during the
tests, one of which is slow.

One Harmony process serves every case, one pipeline per path prefix:

  - C{/lb}, C{/lb0}: targets A and B, round robin, active health checks on
    C{/health} every L{INTERVAL} s; C{/lb} retries once, C{/lb0} never (so
    the moment the killed target stops getting traffic shows as the end of
    the client errors);
  - C{/retry}: targets SLOW (answers after L{SLOW_DELAY} s, but its
    C{/health} at once) and FAST, round robin, one retry;
  - C{/failover}: SLOW then FAST, failover, no retry;
  - C{/post}: SLOW then FAST, failover, one retry (never for a POST);
  - C{/eject}: SLOW then FAST, failover, no retry, outlier ejection after
    two consecutive failures;
  - C{/breaker}: the same with the circuit breaker instead.

The A/B tests run in file order as one story (both up, kill A, kill B,
restart A, restart B), but each first brings the upstreams to the state it
starts from, so any one of them also runs alone.
"""

import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from harmonytest import HERE, Restartable, free_port, request, start_harmony, write_config

#: The backends' timeout_secs (per attempt); SLOW answers much later.
TIMEOUT = 1.0
SLOW_DELAY = 5.0
#: Active health checks of /lb and /lb0.
INTERVAL = 0.3
CHECK_TIMEOUT = 0.5
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 1
#: Slack for scheduling, process start-up and the client's own requests.
MARGIN = 1.0
#: A killed target must stop getting traffic within this many seconds.
DETECTION = INTERVAL * UNHEALTHY_THRESHOLD + MARGIN
#: A restarted target must get traffic again within this many seconds of
#: listening (the passive ejection/breaker of /lb last at most 1 s).
RECOVERY = INTERVAL * HEALTHY_THRESHOLD + MARGIN + 1.0
#: A 503 for "every target down" must come at least this fast.
FAST = 0.3

BASE = """
[proxy]
id = "targets-http-it"
log_level = "info"
pipelines_path = "pipelines"

[network.default]
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {port}
"""

TARGETS = """
[targets.up_a]
url = "http://127.0.0.1:{a}"
[targets.up_b]
url = "http://127.0.0.1:{b}"
[targets.up_slow]
url = "http://127.0.0.1:{slow}"
[targets.up_fast]
url = "http://127.0.0.1:{fast}"
"""

PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_in"]
backends = ["{name}"]

[endpoints.{name}_in]
service = "http"
[endpoints.{name}_in.options]
path_prefix = "/{name}"

[backends.{name}]
service = "http"
targets = {targets}
strategy = "{strategy}"
[backends.{name}.options]
timeout_secs = {timeout}
connect_timeout_secs = {timeout}
max_retries = {retries}
"""

HEALTH = f"""
[backends.{{name}}.health_check]
path = "/health"
expected_statuses = [200]
interval_secs = {INTERVAL}
timeout_secs = {CHECK_TIMEOUT}
healthy_threshold = {HEALTHY_THRESHOLD}
unhealthy_threshold = {UNHEALTHY_THRESHOLD}
"""

PASSIVE = """
[backends.{name}.outlier_detection]
consecutive_failures = {failures}
base_ejection_secs = {ejection}
max_ejection_secs = {max_ejection}
[backends.{name}.circuit_breaker]
failure_threshold = {breaker}
open_secs = {open_secs}
"""


def pipeline(name, targets, strategy="round_robin", retries=0, health=True, failures=0, ejection=30.0,
             breaker=0, open_secs=30.0):
    text = PIPELINE.format(
        name=name, targets=json.dumps(targets), strategy=strategy, timeout=TIMEOUT, retries=retries
    )
    if health:
        text += HEALTH.format(name=name)
    text += PASSIVE.format(
        name=name, failures=failures, ejection=ejection, max_ejection=max(ejection, 1.0), breaker=breaker,
        open_secs=open_secs,
    )
    return text


class Upstreams(Restartable):
    """
    The named upstream_server.py processes, each on a port of its own that
    it keeps across restarts.
    """

    label = "upstream"

    def __init__(self, directory, delays):
        super().__init__(directory, delays)
        self.delays = delays
        self.start_all()

    def argv(self, name):
        return [sys.executable, HERE / "upstream_server.py", self.ports[name], name, self.delays[name]]

    def received(self, name):
        """
        The requests (method, uri) the upstream got, asked directly.
        """
        response = request(self.ports[name], "GET", "/_requests", timeout=5)
        assert response.status == 200, response
        return [tuple(r) for r in response.json()]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("targets-http")
    upstreams = Upstreams(directory, {"A": 0, "B": 0, "SLOW": SLOW_DELAY, "FAST": 0})
    port = free_port()
    ports = upstreams.ports
    text = TARGETS.format(a=ports["A"], b=ports["B"], slow=ports["SLOW"], fast=ports["FAST"])
    ab, slow_fast = ["up_a", "up_b"], ["up_slow", "up_fast"]
    passive = {"failures": 3, "ejection": 0.5, "breaker": 5, "open_secs": 0.5}
    text += pipeline("lb", ab, retries=1, **passive)
    text += pipeline("lb0", ab, retries=0, **passive)
    text += pipeline("retry", slow_fast, retries=1)
    text += pipeline("failover", slow_fast, strategy="failover")
    text += pipeline("post", slow_fast, strategy="failover", retries=1)
    text += pipeline("eject", slow_fast, strategy="failover", failures=2, ejection=30.0)
    text += pipeline("breaker", slow_fast, strategy="failover", breaker=2, open_secs=30.0)
    config = write_config(directory, BASE.format(port=port), {"targets": text})
    try:
        process = start_harmony(directory, config, port)
    except BaseException:
        upstreams.stop()
        raise
    yield SimpleNamespace(port=port, process=process, upstreams=upstreams, directory=directory)
    try:
        process.stop_cleanly()
    finally:
        upstreams.stop()


def get(gateway, path, timeout=30, **kwargs):
    """
    One request through Harmony: C{(response, seconds)}.
    """
    t0 = time.monotonic()
    response = request(gateway.port, kwargs.pop("method", "GET"), path, timeout=timeout, **kwargs)
    return response, time.monotonic() - t0


def answered_by(response):
    return response.header("X-Upstream-Name") if response.status == 200 else None


def settle(since, bound):
    """
    Wait until C{bound} seconds after C{since} (C{time.monotonic()}): the
    contract's deadline for every backend to have noticed a change (each
    backend checks its targets on its own).
    """
    time.sleep(max(0.0, since + bound - time.monotonic()))


def wait_until(condition, timeout, message):
    """
    Call C{condition()} until it returns something true (returned), failing
    after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.02)


def names_seen(gateway, prefix, count=12):
    """
    Which upstreams answered C{count} GETs on C{prefix} (all must be 200).
    """
    seen = []
    for i in range(count):
        response, _ = get(gateway, f"{prefix}/echo/seen-{i}")
        assert response.status == 200, response
        seen.append(answered_by(response))
    return seen


def ensure_up(gateway, *names):
    """
    Start the given upstreams (A/B) that are not running and wait until
    C{/lb} sends traffic to each of them.
    """
    for name in names:
        if not gateway.upstreams.alive(name):
            gateway.upstreams.start(name)
    wait_until(
        lambda: set(names) <= {answered_by(get(gateway, f"/lb/echo/up-{i}")[0]) for i in range(6)},
        RECOVERY + 5,
        lambda: f"/lb does not reach {names}:\n{gateway.process.output()[-3000:]}",
    )


def ensure_down(gateway, *names):
    for name in names:
        gateway.upstreams.kill(name)


def consecutive_from(gateway, prefix, name, streak, timeout):
    """
    GET C{prefix} until C{streak} answers in a row are 200 from C{name};
    returns the C{time.monotonic()} the streak started, and every answer
    before it (status, upstream) for the failure message.
    """
    deadline = time.monotonic() + timeout
    history, run, started = [], 0, None
    i = 0
    while run < streak:
        assert time.monotonic() < deadline, f"no {streak} answers in a row from {name} on {prefix}: {history[-40:]}"
        t = time.monotonic()
        response, _ = get(gateway, f"{prefix}/echo/poll-{i}", timeout=10)
        i += 1
        if answered_by(response) == name:
            if run == 0:
                started = t
            run += 1
        else:
            run = 0
            history.append((round(t, 3), response.status, answered_by(response)))
    return started, history


def many(gateway, prefix, count=200, workers=8):
    """
    C{count} GETs on C{prefix} from C{workers} threads: the responses.
    """
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: get(gateway, f"{prefix}/echo/many-{i}?n={i}", timeout=10)[0], range(count)))


def assert_json_error(response, status, error):
    assert response.status == status, response
    assert response.header("Content-Type").startswith("application/json"), response
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == error and body["message"], body


# -- A and B: load balancing, health checks, ejection, recovery ------------------------


def test_both_targets_get_traffic(gateway):
    ensure_up(gateway, "A", "B")
    for prefix in ("/lb", "/lb0"):
        seen = names_seen(gateway, prefix, 20)
        assert set(seen) == {"A", "B"}, seen
        # Round robin: an even share.
        assert abs(seen.count("A") - seen.count("B")) <= 2, seen


def test_killed_target_is_ejected_within_the_interval(gateway):
    ensure_up(gateway, "A", "B")
    gateway.upstreams.kill("A")
    killed = time.monotonic()
    # /lb0 never retries: once A is out, every answer comes from B.
    started, before = consecutive_from(gateway, "/lb0", "B", streak=20, timeout=DETECTION + 5)
    assert started - killed <= DETECTION, (
        f"A still got traffic {started - killed:.2f}s after it was killed (bound {DETECTION:.2f}s): {before}"
    )
    # Once ejected (by /lb too): no client error at all, with and without retries.
    settle(killed, DETECTION)
    for prefix in ("/lb", "/lb0"):
        responses = many(gateway, prefix)
        bad = [r for r in responses if answered_by(r) != "B"]
        assert not bad, bad[:5]


def test_every_target_down_is_503_fast(gateway):
    ensure_down(gateway, "A", "B")
    killed = time.monotonic()
    for prefix in ("/lb", "/lb0"):
        wait_until(
            lambda: get(gateway, f"{prefix}/echo/down")[0].status == 503,
            DETECTION + 5,
            lambda: f"{prefix} never answered 503 with every target down: {get(gateway, prefix + '/echo/x')[0]}",
        )
    assert time.monotonic() - killed <= DETECTION + 1.0
    for prefix in ("/lb", "/lb0"):
        for method in ("GET", "POST"):
            response, seconds = get(gateway, f"{prefix}/echo/down", method=method, body=b"{}" if method == "POST" else None)
            assert_json_error(response, 503, "service_unavailable")
            assert seconds < FAST, f"{method} {prefix}: 503 after {seconds:.3f}s (timeout {TIMEOUT}s)"


def test_restarted_target_gets_traffic_again(gateway):
    if gateway.upstreams.alive("A") or gateway.upstreams.alive("B"):
        ensure_down(gateway, "A", "B")
        wait_until(lambda: get(gateway, "/lb/echo/down")[0].status == 503, DETECTION + 5, "no 503")
    gateway.upstreams.start("A")  # listening once this returns
    listening = time.monotonic()
    started, before = consecutive_from(gateway, "/lb0", "A", streak=10, timeout=RECOVERY + 5)
    assert started - listening <= RECOVERY, (
        f"A got traffic again only {started - listening:.2f}s after it listened (bound {RECOVERY:.2f}s): {before}"
    )
    # B is still down: everything goes to A, without errors.
    settle(listening, RECOVERY)
    responses = many(gateway, "/lb", 100)
    assert all(answered_by(r) == "A" for r in responses), [r for r in responses if answered_by(r) != "A"][:5]
    # And B comes back too: both share the load again.
    gateway.upstreams.start("B")
    listening = time.monotonic()
    wait_until(lambda: "B" in names_seen(gateway, "/lb0", 4), RECOVERY + 5, "B never got traffic again")
    assert time.monotonic() - listening <= RECOVERY
    settle(listening, RECOVERY)
    seen = names_seen(gateway, "/lb", 20)
    assert set(seen) == {"A", "B"}, seen


# -- SLOW and FAST: timeouts, retries, non-idempotent requests ---------------------------


def test_slow_target_is_retried_on_the_other(gateway):
    marker = uuid.uuid4().hex
    timings = []
    for i in range(4):
        response, seconds = get(gateway, f"/retry/echo/{marker}-{i}")
        assert response.status == 200, response
        assert answered_by(response) == "FAST", response
        assert response.json()["path"] == f"/echo/{marker}-{i}"
        # At worst one attempt timed out on SLOW first.
        assert seconds <= TIMEOUT + 0.6, f"request {i}: {seconds:.2f}s"
        timings.append(seconds)
    slow_saw = [uri for _, uri in gateway.upstreams.received("SLOW") if marker in uri]
    fast_saw = [uri for _, uri in gateway.upstreams.received("FAST") if marker in uri]
    # Round robin sent some first attempts to SLOW: they timed out and went to FAST.
    assert slow_saw, "round robin never tried SLOW"
    assert sorted(fast_saw) == [f"/echo/{marker}-{i}" for i in range(4)], fast_saw
    assert max(timings) >= TIMEOUT * 0.9, timings


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_other_idempotent_methods_are_retried(gateway, method):
    marker = uuid.uuid4().hex
    response, seconds = get(gateway, f"/post/echo/{marker}", method=method, body=b"data")
    assert response.status == 200, response
    assert answered_by(response) == "FAST"
    assert response.json()["method"] == method
    assert seconds <= TIMEOUT + 0.6
    assert (method, f"/echo/{marker}") in gateway.upstreams.received("SLOW")


def test_slow_first_target_without_retries_is_504_within_the_timeout(gateway):
    for i in range(2):
        response, seconds = get(gateway, f"/failover/echo/slow-{i}")
        assert_json_error(response, 504, "gateway_timeout")
        assert TIMEOUT * 0.9 <= seconds <= TIMEOUT + 0.5, f"504 after {seconds:.2f}s (timeout {TIMEOUT}s)"


def test_post_is_never_retried(gateway):
    marker = uuid.uuid4().hex
    response, seconds = get(gateway, f"/post/echo/{marker}", method="POST", body=b'{"once": true}',
                            headers=[("Content-Type", "application/json")])
    assert_json_error(response, 504, "gateway_timeout")
    assert seconds <= TIMEOUT + 0.5, seconds
    assert ("POST", f"/echo/{marker}") in gateway.upstreams.received("SLOW")
    assert not [uri for _, uri in gateway.upstreams.received("FAST") if marker in uri]
    # A GET on the same backend is retried on FAST.
    response, _ = get(gateway, f"/post/echo/{marker}-get")
    assert answered_by(response) == "FAST", response


@pytest.mark.parametrize("prefix", ["/eject", "/breaker"])
def test_passive_failures_take_the_slow_target_out(gateway, prefix):
    """
    Two timeouts in a row on SLOW (outlier ejection, or the circuit breaker
    opening): the next requests go straight to FAST, fast.
    """
    for i in range(2):
        response, _ = get(gateway, f"{prefix}/echo/fail-{i}")
        assert response.status == 504, response
    for i in range(5):
        response, seconds = get(gateway, f"{prefix}/echo/after-{i}")
        assert answered_by(response) == "FAST", response
        assert seconds < TIMEOUT / 2, seconds


def test_gateway_log_has_no_traceback(gateway):
    out = gateway.process.output()
    assert "Traceback" not in out and "Unhandled" not in out, out[-5000:]
