"""
The management API and metrics through a real C{twistd harmony}: requests
with known statuses and sizes through an HTTP pipeline (in front of the
test upstream) and an echo pipeline, DICOM associations from DCMTK
(C{echoscu}, C{storescu}), then C{/admin/metrics} scraped over HTTP must
count exactly that traffic; C{/admin/targets} with a targets backend (one
target up, one down, active health checks); C{/admin/ready} 503 while no
target of a backend is available, 200 once one comes up.  JSON answers
are checked against their schemas (harmony/management_schemas/).
"""

import hashlib
import json
import os
import sys
import time
from collections import defaultdict

import pytest
from jsonschema import Draft202012Validator
from peers import dcmtk, dicom_instance
from prometheus_client.parser import text_string_to_metric_families

from harmony.management import SCHEMAS, load_schema
from harmonytest import HERE, Process, free_port, request, start_harmony, write_config

TOKEN = "it-management-token"
AUTH = [("Authorization", f"Bearer {TOKEN}")]
VALIDATORS = {name: Draft202012Validator(load_schema(name)) for name in SCHEMAS}
#: Active health checks of the targets backends.
INTERVAL = 0.2
SETTLE = 10.0

BASE = """
[proxy]
id = "mgmt-it"
log_level = "info"
pipelines_path = "pipelines"

[network.main.http]
bind_address = "127.0.0.1"
bind_port = {port}

[network.mgmt.http]
bind_address = "127.0.0.1"
bind_port = {mgmt_port}

[management]
enabled = true
network = "mgmt"
token_env = "HARMONY_IT_ADMIN_TOKEN"
"""

PIPELINES = """
[pipelines.proxy]
networks = ["main"]
endpoints = ["api"]
backends = ["upstream"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[backends.upstream]
service = "http"
[backends.upstream.options]
base_url = "{upstream}"

[pipelines.echo]
networks = ["main"]
endpoints = ["echo"]
backends = ["echo"]

[endpoints.echo]
service = "echo"
[endpoints.echo.options]
path_prefix = "/echo"

[backends.echo]
service = "echo"

[pipelines.lb]
networks = ["main"]
endpoints = ["lb"]
backends = ["lb"]

[endpoints.lb]
service = "http"
[endpoints.lb.options]
path_prefix = "/lb"

[backends.lb]
service = "http"
targets = ["lb_up", "lb_down"]
[backends.lb.health_check]
path = "/health"
interval_secs = {interval}
timeout_secs = 1.0
healthy_threshold = 1
unhealthy_threshold = 1

[targets.lb_up]
url = "{upstream}"
[targets.lb_down]
url = "http://127.0.0.1:{down_port}"

[pipelines.dicom]
endpoints = ["scp"]
backends = []

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_store = true
storage_dir = "stored"
"""


def get_json(port, path, schema, status=200, headers=AUTH):
    response = request(port, "GET", path, headers=headers)
    assert response.status == status, response
    assert response.header("Content-Type") == "application/json"
    value = response.json()
    errors = [e.message for e in VALIDATORS[schema].iter_errors(value)]
    assert errors == [], value
    return value


def wait_for(check, timeout=SETTLE, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.05)


def scrape(port):
    response = request(port, "GET", "/admin/metrics", headers=AUTH)
    assert response.status == 200, response
    assert response.header("Content-Type").startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode("utf-8")):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("management")
    port, mgmt_port, scp_port, down_port = free_port(), free_port(), free_port(), free_port()
    config = write_config(
        directory,
        BASE.format(port=port, mgmt_port=mgmt_port),
        {
            "main": PIPELINES.format(
                upstream=upstream.url, down_port=down_port, scp_port=scp_port, interval=INTERVAL
            )
        },
    )
    proc = start_harmony(directory, config, port, env={"HARMONY_IT_ADMIN_TOKEN": TOKEN})
    proc.wait_for_port(mgmt_port)
    yield type(
        "Gateway",
        (),
        dict(port=port, mgmt=mgmt_port, scp_port=scp_port, process=proc, directory=directory, config=config),
    )
    proc.stop_cleanly()


def test_metrics_match_the_traffic(gateway, tmp_path):
    """
    Requests with known statuses and body sizes, DICOM associations and
    operations: the scraped metrics count exactly them.
    """
    before = scrape(gateway.mgmt)
    statuses = [200] * 5 + [404] * 3 + [503] * 2 + [201]
    response_bytes = 0
    for status in statuses:
        response = request(gateway.port, "GET", f"/api/status/{status}")
        assert response.status == status
        response_bytes += len(response.body)
    for _ in range(2):
        body = os.urandom(1000)
        response = request(gateway.port, "POST", "/api/upload", body=body)
        assert response.status == 200 and response.body == body
        response_bytes += len(response.body)
    for _ in range(4):
        assert request(gateway.port, "GET", "/echo/x").status == 200
    # No route: answered by the network, not a pipeline.
    assert request(gateway.port, "GET", "/nowhere").status == 404

    # DICOM: three C-ECHOs on three associations, one rejected association
    # (wrong called AE title), one C-STORE.
    for _ in range(3):
        result = dcmtk("echoscu", "-aet", "MODALITY1", "-aec", "HARMONY", "127.0.0.1", gateway.scp_port)
        assert result.returncode == 0, result.stderr
    result = dcmtk("echoscu", "-aet", "MODALITY2", "-aec", "SOMEONE", "127.0.0.1", gateway.scp_port)
    assert result.returncode != 0
    _, path = dicom_instance(tmp_path, "CT_small.dcm", "P1", "1.2.3.4", "1.2.3.4.1", "ct")
    result = dcmtk("storescu", "-aet", "MODALITY1", "-aec", "HARMONY", "127.0.0.1", gateway.scp_port, path)
    assert result.returncode == 0, result.stderr

    samples = scrape(gateway.mgmt)

    def delta(name, **labels):
        """
        The growth of a series since C{before} (other tests may have sent
        traffic first).
        """
        return (value(samples, name, **labels) or 0) - (value(before, name, **labels) or 0)

    def requests_total(status, pipeline="proxy", endpoint="api", backend="upstream"):
        return delta("harmony_requests_total", pipeline=pipeline, endpoint=endpoint, backend=backend, status=status)

    assert requests_total("200") == 5 + 2
    assert requests_total("404") == 3
    assert requests_total("503") == 2
    assert requests_total("201") == 1
    assert requests_total("200", pipeline="echo", endpoint="echo", backend="echo") == 4
    assert delta("harmony_request_duration_seconds_count", pipeline="proxy", endpoint="api") == 13
    assert delta("harmony_request_duration_seconds_count", pipeline="echo", endpoint="echo") == 4
    duration = delta("harmony_request_duration_seconds_sum", pipeline="proxy", endpoint="api")
    assert 0 < duration < 13 * 5
    assert value(samples, "harmony_requests_in_flight", pipeline="proxy") == 0
    assert delta("harmony_request_bytes_total", pipeline="proxy") == 2000
    assert delta("harmony_response_bytes_total", pipeline="proxy") == response_bytes

    def associations(aet, result):
        return delta("harmony_dicom_associations_total", endpoint="scp", calling_aet=aet, result=result)

    assert associations("MODALITY1", "accepted") == 4
    assert associations("MODALITY2", "rejected") == 1
    assert associations("MODALITY2", "accepted") == 0
    operations = "harmony_dimse_operations_total"
    assert delta(operations, endpoint="scp", operation="echo", status="0000") == 3
    assert delta(operations, endpoint="scp", operation="store", status="0000") == 1


def test_targets(gateway):
    """
    C{/admin/targets} and the target metrics with one target up and one
    down (active health checks).
    """

    def settled():
        value = get_json(gateway.mgmt, "/admin/targets", "targets")
        [backend] = value["backends"]
        states = {t["name"]: t["state"] for t in backend["targets"]}
        return backend if states == {"lb_up": "available", "lb_down": "unhealthy"} else None

    backend = wait_for(settled, what="health checks marking lb_down unhealthy")
    assert backend["backend"] == "lb"
    assert backend["available"] == 1
    down = {t["name"]: t for t in backend["targets"]}["lb_down"]
    assert down["health"]["healthy"] is False and down["health"]["failures"] >= 1
    for _ in range(4):
        assert request(gateway.port, "GET", "/lb/status/200").status == 200
    samples = scrape(gateway.mgmt)
    assert value(samples, "harmony_target_available", backend="lb", target="lb_up") == 1
    assert value(samples, "harmony_target_available", backend="lb", target="lb_down") == 0
    assert value(samples, "harmony_target_healthy", backend="lb", target="lb_down") == 0
    assert value(samples, "harmony_target_breaker_state", backend="lb", target="lb_up", state="closed") == 1
    assert value(samples, "harmony_target_requests_total", backend="lb", target="lb_up") >= 4
    assert value(samples, "harmony_requests_total", pipeline="lb", endpoint="lb", backend="lb", status="200") == 4
    # At least one target available: ready.
    ready = get_json(gateway.mgmt, "/admin/ready", "ready", headers=())
    assert ready["status"] == "ready", ready
    assert {"backend": "lb", "targets": 2, "available": 1} in ready["backends"]
    names = {entry["name"]: entry["up"] for entry in ready["listeners"]}
    assert names == {"network:main": True, "dicom:scp": True, "management:mgmt": True}


def test_info_pipelines_routes(gateway):
    first = get_json(gateway.mgmt, "/admin/info", "info")
    assert first["proxy_id"] == "mgmt-it"
    assert first["pid"] == gateway.process.popen.pid
    data = b"".join((gateway.directory / name).read_bytes() for name in first["config_files"])
    assert first["config_id"] == hashlib.sha256(data).hexdigest()
    assert first["config_files"] == ["harmony.toml", "pipelines/main.toml"]
    time.sleep(0.3)
    second = get_json(gateway.mgmt, "/admin/info", "info")
    assert second["uptime_secs"] >= first["uptime_secs"] + 0.25
    assert second["started_at"] == first["started_at"]

    pipelines = {p["name"]: p for p in get_json(gateway.mgmt, "/admin/pipelines", "pipelines")["pipelines"]}
    assert sorted(pipelines) == ["dicom", "echo", "lb", "proxy"]
    assert [t["name"] for t in pipelines["lb"]["backends"][0]["targets"]] == ["lb_up", "lb_down"]

    routes = get_json(gateway.mgmt, "/admin/routes", "routes")
    assert sorted((r["network"], r["prefix"], r["pipeline"]) for r in routes["routes"]) == [
        ("main", "/api", "proxy"),
        ("main", "/echo", "echo"),
        ("main", "/lb", "lb"),
    ]
    assert routes["dicom"] == [
        {"endpoint": "scp", "pipeline": "dicom", "address": "127.0.0.1", "port": gateway.scp_port}
    ]


def test_auth_and_errors(gateway):
    assert get_json(gateway.mgmt, "/admin/health", "health", headers=()) == {"status": "ok"}
    for path in ("/admin/metrics", "/admin/info", "/admin/targets"):
        response = request(gateway.mgmt, "GET", path)
        assert response.status == 401, path
        assert response.header("WWW-Authenticate") == 'Bearer realm="harmony-management"'
        VALIDATORS["error"].validate(response.json())
    response = request(gateway.mgmt, "GET", "/admin/info", headers=[("Authorization", "Bearer wrong")])
    assert response.status == 401
    response = request(gateway.mgmt, "DELETE", "/admin/info", headers=AUTH)
    assert response.status == 405 and response.header("Allow") == "GET, HEAD"
    get_json(gateway.mgmt, "/admin/unknown", "error", status=404)
    # The management network serves no pipeline, the pipelines' network no
    # management API.
    assert request(gateway.mgmt, "GET", "/api/status/200", headers=AUTH).status == 404
    assert request(gateway.port, "GET", "/admin/health").status == 404


READY_PIPELINES = """
[pipelines.only]
networks = ["main"]
endpoints = ["only"]
backends = ["dead"]

[endpoints.only]
service = "http"
[endpoints.only.options]
path_prefix = "/only"

[backends.dead]
service = "http"
targets = ["t1"]
[backends.dead.health_check]
path = "/health"
interval_secs = {interval}
timeout_secs = 1.0
healthy_threshold = 1
unhealthy_threshold = 1

[targets.t1]
url = "http://127.0.0.1:{target_port}"
"""


def test_ready_follows_target_availability(tmp_path):
    """
    503 while the only target of a backend is down, 200 once it is up.
    """
    port, mgmt_port, target_port = free_port(), free_port(), free_port()
    base = BASE.format(port=port, mgmt_port=mgmt_port).replace('token_env = "HARMONY_IT_ADMIN_TOKEN"\n', "")
    config = write_config(tmp_path, base, {"main": READY_PIPELINES.format(interval=INTERVAL, target_port=target_port)})
    proc = start_harmony(tmp_path, config, port)
    target = None
    try:
        proc.wait_for_port(mgmt_port)

        def ready_status(expected):
            response = request(mgmt_port, "GET", "/admin/ready")
            VALIDATORS["ready"].validate(response.json())
            return response.json() if response.status == expected else None

        value = wait_for(lambda: ready_status(503), what="503 from /admin/ready")
        assert value["status"] == "not_ready"
        assert value["reasons"] == ["backend dead: no target available"]
        assert value["backends"] == [{"backend": "dead", "targets": 1, "available": 0}]
        assert request(port, "GET", "/only/x").status == 503
        # Without a token everything is open.
        samples = scrape(mgmt_port)
        assert value_of(samples, "harmony_target_available", backend="dead", target="t1") == 0

        target = Process([sys.executable, HERE / "upstream_server.py", target_port], tmp_path, "target")
        target.wait_for_port(target_port)
        value = wait_for(lambda: ready_status(200), what="200 from /admin/ready")
        assert value == {
            "status": "ready",
            "reasons": [],
            "listeners": [{"name": "network:main", "up": True}, {"name": "management:mgmt", "up": True}],
            "backends": [{"backend": "dead", "targets": 1, "available": 1}],
        }
    finally:
        if target is not None:
            target.stop_cleanly()
        proc.stop_cleanly()


value_of = value


def test_counts_per_status_are_exact_under_concurrency(gateway):
    """
    Requests in parallel on several connections: nothing lost or counted
    twice.
    """
    from concurrent.futures import ThreadPoolExecutor

    before = scrape(gateway.mgmt)
    wanted = defaultdict(int)
    codes = [200, 202, 404, 500] * 25

    def one(code):
        return request(gateway.port, "GET", f"/api/status/{code}").status

    with ThreadPoolExecutor(8) as pool:
        for code, got in zip(codes, pool.map(one, codes)):
            assert code == got
            wanted[str(code)] += 1
    after = scrape(gateway.mgmt)
    for status, n in wanted.items():
        key = dict(pipeline="proxy", endpoint="api", backend="upstream", status=status)
        assert (value(after, "harmony_requests_total", **key) or 0) - (value(before, "harmony_requests_total", **key) or 0) == n
    assert json.dumps(value(after, "harmony_requests_in_flight", pipeline="proxy")) == "0.0"


def test_reload(tmp_path):
    """
    After SIGHUP the API describes the new configuration (routes, config
    id, token) and the counters keep counting.
    """
    import signal

    port, mgmt_port = free_port(), free_port()
    echo = """
[pipelines.{name}]
networks = ["main"]
endpoints = ["{name}"]
backends = ["{name}"]
[endpoints.{name}]
service = "echo"
options = {{ path_prefix = "/{name}" }}
[backends.{name}]
service = "echo"
"""
    config = write_config(tmp_path, BASE.format(port=port, mgmt_port=mgmt_port), {"one": echo.format(name="one")})
    env = {"HARMONY_IT_ADMIN_TOKEN": TOKEN}
    proc = start_harmony(tmp_path, config, port, env=env)
    try:
        proc.wait_for_port(mgmt_port)
        for _ in range(3):
            assert request(port, "GET", "/one/x").status == 200
        before = get_json(mgmt_port, "/admin/info", "info")
        (tmp_path / "pipelines" / "two.toml").write_text(echo.format(name="two"))
        os.kill(proc.popen.pid, signal.SIGHUP)
        wait_for(lambda: "Reloaded: 2 pipelines" in proc.output(), what="the reload")
        routes = get_json(mgmt_port, "/admin/routes", "routes")
        assert sorted(r["prefix"] for r in routes["routes"]) == ["/one", "/two"]
        after = get_json(mgmt_port, "/admin/info", "info")
        assert after["config_files"] == ["harmony.toml", "pipelines/one.toml", "pipelines/two.toml"]
        assert after["config_id"] != before["config_id"]
        assert after["started_at"] == before["started_at"]
        assert request(port, "GET", "/one/x").status == 200
        assert request(port, "GET", "/two/x").status == 200
        samples = scrape(mgmt_port)
        labels = dict(endpoint="one", backend="one", status="200")
        assert value(samples, "harmony_requests_total", pipeline="one", **labels) == 4
        assert value(samples, "harmony_requests_total", pipeline="two", endpoint="two", backend="two", status="200") == 1
    finally:
        proc.stop_cleanly()
