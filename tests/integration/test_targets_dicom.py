"""
Backend targets over DIMSE, end to end: a real C{twistd harmony} whose
C{dicom_scu} backends have two targets, two real DCMTK C{storescp}
processes on loopback (AE titles STOREA and STOREB, each with its own
output directory), checked with C-ECHO every L{INTERVAL} s.

Traffic enters Harmony two ways:

  - C{/dicom}: the HTTP routes of a C{dicom_scu} backend (C{POST
    /dicom/echo} answers with the remote AE title that answered, C{POST
    /dicom/store} stores an C{application/dicom} body);
  - a C{dicom_scp} endpoint (C{storescu} -> Harmony -> a target).

The tests run in file order as one story (both up, kill A, kill B,
restart A, restart B), each first bringing the SCPs to the state it starts
from.  A missing DCMTK is a failure, not a skip.
"""

import io
import time
from types import SimpleNamespace

import pydicom
import pytest
from peers import PEER_ENV, build_bind_shim, dcmtk, require
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from harmonytest import Restartable, free_port, request, start_harmony, write_config

AETS = {"A": "STOREA", "B": "STOREB"}
HARMONY_AET = "HARMONY"
#: Active C-ECHO checks.
INTERVAL = 0.3
CHECK_TIMEOUT = 1.0
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 1
TIMEOUT = 2.0
#: Slack for scheduling and the DCMTK tools' start-up.
MARGIN = 1.0
DETECTION = INTERVAL * UNHEALTHY_THRESHOLD + MARGIN
#: The passive ejection and breaker last at most 1 s.
RECOVERY = INTERVAL * HEALTHY_THRESHOLD + MARGIN + 1.0
#: "Every target down" answers must come at least this fast (HTTP); a
#: storescu process (start-up included) at most this much later.
FAST = 0.3
FAST_STORESCU = 1.5

BASE = """
[proxy]
id = "targets-dicom-it"
log_level = "info"
pipelines_path = "pipelines"

[network.default]
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {http_port}

[storage.options]
path = "./store"
"""

PIPELINES = """
[targets.pacs_a]
aet = "{aet_a}"
host = "127.0.0.1"
port = {port_a}
[targets.pacs_b]
aet = "{aet_b}"
host = "127.0.0.1"
port = {port_b}

[pipelines.http_to_pacs]
networks = ["default"]
endpoints = ["api"]
backends = ["pacs_http"]

[endpoints.api]
service = "http"
options.path_prefix = "/dicom"

[pipelines.forward]
endpoints = ["scp"]
backends = ["pacs_forward"]

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "{harmony_aet}"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_store = true
"""

BACKEND = f"""
[backends.{{name}}]
service = "dicom_scu"
targets = ["pacs_a", "pacs_b"]
strategy = "round_robin"
[backends.{{name}}.options]
local_aet = "HARMONY_SCU"
timeout_secs = {TIMEOUT}
connect_timeout_secs = 1
max_retries = 1
[backends.{{name}}.health_check]
interval_secs = {INTERVAL}
timeout_secs = {CHECK_TIMEOUT}
healthy_threshold = {HEALTHY_THRESHOLD}
unhealthy_threshold = {UNHEALTHY_THRESHOLD}
[backends.{{name}}.outlier_detection]
consecutive_failures = 3
base_ejection_secs = 0.5
max_ejection_secs = 1.0
[backends.{{name}}.circuit_breaker]
failure_threshold = 5
open_secs = 0.5
"""


class StoreScps(Restartable):
    """
    The two storescp processes, each keeping its port and output directory
    across restarts.
    """

    label = "storescp"

    def __init__(self, directory):
        super().__init__(directory, AETS)
        self.shim = build_bind_shim(directory)
        self.binary = require("storescp")
        self.out = {}
        for name in AETS:
            self.out[name] = directory / f"in-{name}"
            self.out[name].mkdir()
        self.start_all()

    def argv(self, name):
        return [self.binary, "-aet", AETS[name], "-od", self.out[name], self.ports[name]]

    def env(self, name):
        return dict(PEER_ENV, LD_PRELOAD=str(self.shim))

    def holder(self, sop_instance_uid):
        """
        Which SCPs (names) stored the instance.
        """
        return {name for name, out in self.out.items() if any(sop_instance_uid in p.name for p in out.iterdir())}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("targets-dicom")
    scps = StoreScps(directory)
    http_port, scp_port = free_port(), free_port()
    text = PIPELINES.format(
        aet_a=AETS["A"], aet_b=AETS["B"], port_a=scps.ports["A"], port_b=scps.ports["B"],
        harmony_aet=HARMONY_AET, scp_port=scp_port,
    )
    text += BACKEND.format(name="pacs_http") + BACKEND.format(name="pacs_forward")
    config = write_config(directory, BASE.format(http_port=http_port), {"targets": text})
    try:
        process = start_harmony(directory, config, http_port)
        process.wait_for_port(scp_port)
    except BaseException:
        scps.stop()
        raise
    yield SimpleNamespace(http_port=http_port, scp_port=scp_port, process=process, scps=scps,
                          directory=directory, files=directory / "files")
    try:
        process.stop_cleanly()
    finally:
        scps.stop()


def echo(gateway):
    """
    C{POST /dicom/echo}: C{(response, seconds)}.
    """
    t0 = time.monotonic()
    response = request(gateway.http_port, "POST", "/dicom/echo", b"", timeout=30)
    return response, time.monotonic() - t0


def echoed_by(gateway, response):
    """
    The name (A/B) of the SCP that answered a successful echo, else None.
    """
    if response.status != 200:
        return None
    body = response.json()
    assert body["operation"] == "echo" and body["success"] is True, body
    by_aet = {aet: name for name, aet in AETS.items()}
    assert body["remote_aet"] in by_aet, body
    name = by_aet[body["remote_aet"]]
    assert body["port"] == gateway.scps.ports[name], body
    return name


def instance(gateway, source="CT_small.dcm"):
    """
    A new instance (fresh UIDs): C{(dataset, Part 10 bytes, path)}.
    """
    ds = pydicom.dcmread(get_testdata_file(source, download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    gateway.files.mkdir(exist_ok=True)
    path = gateway.files / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(out.getvalue())
    return ds, out.getvalue(), path


def storescu(gateway):
    """
    storescu -> Harmony's SCP -> a target, one new instance: C{(success,
    SOP Instance UID, output, seconds)}.
    """
    ds, _, path = instance(gateway)
    t0 = time.monotonic()
    result = dcmtk("storescu", "-v", "-aec", HARMONY_AET, "127.0.0.1", gateway.scp_port, path, timeout=60)
    seconds = time.monotonic() - t0
    out = result.stdout + result.stderr
    return "Received Store Response (Success)" in out, ds.SOPInstanceUID, out, seconds


def http_store(gateway):
    """
    C{POST /dicom/store} of one new instance: C{(response, SOP Instance UID)}.
    """
    ds, data, _ = instance(gateway, "MR_small.dcm")
    response = request(gateway.http_port, "POST", "/dicom/store", data,
                       headers=[("Content-Type", "application/dicom")], timeout=30)
    return response, ds.SOPInstanceUID


def settle(since, bound):
    """
    Wait until C{bound} seconds after C{since} (C{time.monotonic()}): the
    contract's deadline for every backend to have noticed a change.  The
    two backends check their targets independently, and the C-STORE one
    is observable only through stores, which are never retried.
    """
    time.sleep(max(0.0, since + bound - time.monotonic()))


def wait_until(condition, timeout, message):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(0.02)


def consecutive_echoes_from(gateway, name, streak, timeout):
    """
    Echo until C{streak} answers in a row come from C{name}: the
    C{time.monotonic()} the streak started and the answers before it.
    """
    deadline = time.monotonic() + timeout
    history, run, started = [], 0, None
    while run < streak:
        assert time.monotonic() < deadline, f"no {streak} echoes in a row from {name}: {history[-20:]}"
        t = time.monotonic()
        response, _ = echo(gateway)
        if echoed_by(gateway, response) == name:
            if run == 0:
                started = t
            run += 1
        else:
            run = 0
            history.append((round(t, 3), response.status, response.body[:200]))
    return started, history


def ensure_up(gateway, *names):
    for name in names:
        if not gateway.scps.alive(name):
            gateway.scps.start(name)
    wait_until(
        lambda: set(names) <= {echoed_by(gateway, echo(gateway)[0]) for _ in range(6)},
        RECOVERY + 5,
        lambda: f"echoes do not reach {names}:\n{gateway.process.output()[-3000:]}",
    )


def ensure_down(gateway, *names):
    for name in names:
        gateway.scps.kill(name)


def assert_stores_land_on(gateway, names, count=4):
    """
    C{count} stores each way (storescu through the SCP endpoint, and the
    HTTP route) succeed, and land on the SCPs C{names} (all of them).
    """
    holders = []
    for _ in range(count):
        ok, sop, out, _ = storescu(gateway)
        assert ok, out
        holders.append(gateway.scps.holder(sop))
        response, sop = http_store(gateway)
        assert response.status == 200, response
        body = response.json()
        assert body["success"] is True and body["remote_aet"] in {AETS[n] for n in names}, body
        holders.append(gateway.scps.holder(sop))
    assert all(len(h) == 1 for h in holders), holders
    assert set().union(*holders) == set(names), holders


# -- the story --------------------------------------------------------------------------


def test_both_scps_get_traffic(gateway):
    ensure_up(gateway, "A", "B")
    seen = [echoed_by(gateway, echo(gateway)[0]) for _ in range(10)]
    assert set(seen) == {"A", "B"}, seen
    assert abs(seen.count("A") - seen.count("B")) <= 2, seen
    assert_stores_land_on(gateway, {"A", "B"})


def test_killed_scp_is_ejected(gateway):
    ensure_up(gateway, "A", "B")
    gateway.scps.kill("A")
    killed = time.monotonic()
    started, before = consecutive_echoes_from(gateway, "B", streak=10, timeout=DETECTION + 5)
    assert started - killed <= DETECTION, (
        f"echoes still failed or reached A {started - killed:.2f}s after it was killed (bound {DETECTION:.2f}s): "
        f"{before}"
    )
    # Once ejected (by both backends), everything succeeds on B: C-ECHO and
    # C-STORE, both ways in.
    settle(killed, DETECTION)
    for _ in range(20):
        response, _ = echo(gateway)
        assert echoed_by(gateway, response) == "B", response
    assert_stores_land_on(gateway, {"B"})


def test_every_scp_down_fails_fast(gateway):
    ensure_down(gateway, "A", "B")
    killed = time.monotonic()
    wait_until(lambda: echo(gateway)[0].status == 503, DETECTION + 5,
               lambda: f"no 503 with every SCP down: {echo(gateway)[0]}")
    assert time.monotonic() - killed <= DETECTION
    settle(killed, DETECTION)
    for _ in range(3):
        response, seconds = echo(gateway)
        assert response.status == 503, response
        body = response.json()
        assert body["error"] == "service_unavailable" and body["message"], body
        assert seconds < FAST, f"503 after {seconds:.3f}s"
        response, sop = http_store(gateway)
        assert response.status == 503, response
        assert response.json()["error"] == "service_unavailable"
    ok, sop, out, seconds = storescu(gateway)
    assert not ok, out
    assert "Refused: OutOfResources" in out, out
    assert seconds < FAST_STORESCU, f"storescu took {seconds:.2f}s:\n{out}"


def test_restarted_scp_gets_traffic_again(gateway):
    if gateway.scps.alive("A") or gateway.scps.alive("B"):
        ensure_down(gateway, "A", "B")
        wait_until(lambda: echo(gateway)[0].status == 503, DETECTION + 5, "no 503")
    gateway.scps.start("A")
    listening = time.monotonic()
    started, before = consecutive_echoes_from(gateway, "A", streak=6, timeout=RECOVERY + 5)
    assert started - listening <= RECOVERY, (
        f"A got traffic again only {started - listening:.2f}s after it listened (bound {RECOVERY:.2f}s): {before}"
    )
    settle(listening, RECOVERY)
    assert_stores_land_on(gateway, {"A"}, count=2)
    gateway.scps.start("B")
    listening = time.monotonic()
    wait_until(lambda: "B" in {echoed_by(gateway, echo(gateway)[0]) for _ in range(4)}, RECOVERY + 5,
               "B never got traffic again")
    assert time.monotonic() - listening <= RECOVERY
    settle(listening, RECOVERY)
    assert_stores_land_on(gateway, {"A", "B"})


def test_gateway_log_has_no_traceback_or_phi(gateway):
    out = gateway.process.output()
    assert "Traceback" not in out and "Unhandled" not in out, out[-5000:]
    assert "CompressedSamples" not in out  # the test files' patient name
