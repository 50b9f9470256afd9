"""
A find with 5000 matches streams through Harmony with bounded memory.

findscu -> twistd Harmony (dicom_scp endpoint, enable_find) -> dicom_scu
backend -> a fake PACS (fake_find_pacs.py: Harmony's own DIMSE stack, the
matches generated lazily).  findscu gets every match, and Harmony's peak
RSS (VmHWM) grows by a bounded amount that does not scale with the number
of matches.  The HTTP rendering (POST /dicom/find), which collects the
matches into one JSON answer by design (up to 10,000), gets all 5000 too.
"""

import json
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
from peers import dcmtk

from harmonytest import HERE, Process, free_port, request, start_harmony, write_config

MiB = 1024 * 1024

#: Harmony's peak RSS may grow by at most this much over the 5000-match find.
MAX_GROWTH = 30 * MiB
#: ... and by at most this much more than over a 500-match find.
MAX_SCALING = 8 * MiB

BASE = """
[proxy]
id = "find-bounded-it"
log_level = "info"
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {http_port}
[storage.options]
path = "./store"
"""

PIPELINES = """
[pipelines.find_proxy]
endpoints = ["scp"]
backends = ["fake_dimse"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true

[backends.fake_dimse]
service = "dicom_scu"
[backends.fake_dimse.options]
aet = "FAKEPACS"
host = "127.0.0.1"
port = {pacs_port}

[pipelines.http_find]
networks = ["default"]
endpoints = ["api"]
backends = ["fake_http"]

[endpoints.api]
service = "http"
options.path_prefix = "/dicom"

[backends.fake_http]
service = "dicom_scu"
[backends.fake_http.options]
aet = "FAKEPACS"
host = "127.0.0.1"
port = {pacs_port}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("find-bounded")
    pacs_port, http_port, scp_port = free_port(), free_port(), free_port()
    pacs = Process([sys.executable, HERE / "fake_find_pacs.py", pacs_port], directory, "fake_pacs")
    try:
        pacs.wait_for_port(pacs_port)
        config = write_config(
            directory,
            BASE.format(http_port=http_port),
            {"find": PIPELINES.format(scp_port=scp_port, pacs_port=pacs_port)},
        )
        harmony = start_harmony(directory, config, http_port)
        harmony.wait_for_port(scp_port)
        yield SimpleNamespace(
            harmony=harmony, pacs=pacs, http_port=http_port, scp_port=scp_port, directory=directory
        )
        harmony.stop_cleanly()
    finally:
        pacs.stop()


def _status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _reset_peak(pid):
    """
    Reset VmHWM to the current RSS (Linux >= 4.0), so that a transient peak
    of the start-up cannot hide the growth measured from here.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not allowed: VmHWM stays the peak since start-up


def _findscu(gateway, count, name):
    """
    A Study Root C-FIND through Harmony asking the fake PACS for C{count}
    matches; every response goes into one XML file (-Xs).

    @return: the StudyInstanceUIDs of the responses, in order.
    """
    out = gateway.directory / f"{name}.xml"
    result = dcmtk(
        "findscu", "-S", "-aet", "FINDSCU", "-aec", "HARMONY",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID=MATCHES{count}",
        "-k", "StudyInstanceUID", "-k", "PatientName", "-k", "StudyDate", "-k", "StudyDescription",
        "-k", "AccessionNumber",
        "-Xs", out, "127.0.0.1", gateway.scp_port,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed" not in result.stdout + result.stderr, result.stdout + result.stderr
    root = ET.parse(out).getroot()
    uids = []
    for dataset in root.iter("data-set"):
        [uid] = [e.text for e in dataset.iter("element") if e.get("name") == "StudyInstanceUID"]
        uids.append(uid)
    return uids


def test_find_with_5000_matches_streams_with_bounded_memory(gateway):
    pid = gateway.harmony.popen.pid
    # Warm up (imports, first association) with a small query.
    assert len(_findscu(gateway, 5, "warmup")) == 5
    _reset_peak(pid)
    baseline = _status(pid, "VmHWM")

    uids_500 = _findscu(gateway, 500, "f500")
    assert len(uids_500) == 500 and len(set(uids_500)) == 500
    growth_500 = _status(pid, "VmHWM") - baseline

    uids = _findscu(gateway, 5000, "f5000")
    assert len(uids) == 5000
    assert set(uids) == {f"1.2.826.0.1.3680043.9.7433.5000.{i}" for i in range(1, 5001)}
    growth_5000 = _status(pid, "VmHWM") - baseline

    report = (
        f"Harmony VmHWM baseline {baseline / MiB:.1f} MiB; growth after 500 matches "
        f"{growth_500 / MiB:.2f} MiB, after 5000 matches {growth_5000 / MiB:.2f} MiB"
    )
    print(report)
    assert growth_5000 < MAX_GROWTH, report
    assert growth_5000 - growth_500 < MAX_SCALING, report
    assert gateway.harmony.popen.poll() is None


def test_http_find_with_5000_matches(gateway):
    body = json.dumps({"operation": "C-FIND", "level": "STUDY", "query": {"PatientID": "MATCHES5000"}})
    response = request(
        gateway.http_port, "POST", "/dicom/find", body.encode(),
        headers=[("Content-Type", "application/json")], timeout=120,
    )
    assert response.status == 200, response
    answer = response.json()
    assert answer["success"] is True and answer["status"] == "0x0000"
    uids = {m["0020000D"]["Value"][0] for m in answer["matches"]}
    assert len(answer["matches"]) == 5000
    assert uids == {f"1.2.826.0.1.3680043.9.7433.5000.{i}" for i in range(1, 5001)}
