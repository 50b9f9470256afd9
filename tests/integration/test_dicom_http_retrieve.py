"""
HTTP retrieves through a real C{twistd -n harmony} (dicom_scu backends,
harmony/backends/dicom_retrieve.py) against the session's Orthanc, DCMTK's
storescp and a fake PACS that aborts mid-C-GET (fake_abort_pacs.py).

One gateway for the module, one pipeline per backend flavour:

  - C{/dicom}: C-MOVE store SCP started per move (transient), Harmony's AE
    known to Orthanc, C{dimse_retrieve_mode = "move"};
  - C{/persist}: C{persistent_store_scp = true}, AE known to Orthanc;
  - C{/unreg}: C{dimse_retrieve_mode = "move"} with an AE Orthanc does not
    know (a C-MOVE to it cannot work: an explicit /get must be a C-GET);
  - C{/down}: nothing listens on the PACS port (C{connect_timeout_secs = 2}).

A second gateway (C{/abort}) fronts the aborting fake PACS; its test reads
its log.  Each backend keeps its retrieved instances in a C{storage_dir} of
its own.
"""

import json
import os
import signal
import sys
import time
import uuid
from types import SimpleNamespace

import pydicom
import pytest
from peers import dcmtk, dicom_instance, listening_addresses, require
from pydicom.uid import generate_uid

from harmonytest import HERE, Process, accepts, free_port, request, start_harmony, write_config

_TAG = uuid.uuid4().hex[:8].upper()
MOVE_AET = f"HRM{_TAG}"
PERSIST_AET = f"HRP{_TAG}"
UNREG_AET = f"HRU{_TAG}"
STORESCP_AET = f"HRS{_TAG}"
FAKE_AET = "ABORTPACS"
CONNECT_TIMEOUT = 2

BASE = """
[proxy]
id = "retrieve-it"
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {http_port}
[storage.options]
path = "./store"
"""

PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_http"]
backends = ["{name}_scu"]

[endpoints.{name}_http]
service = "http"
options.path_prefix = "/{name}"

[backends.{name}_scu]
service = "dicom_scu"
[backends.{name}_scu.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "{local_aet}"
incoming_store_port = {incoming}
incoming_bind_addr = "127.0.0.1"
persistent_store_scp = {persistent}
dimse_retrieve_mode = "{mode}"
storage_dir = "{storage}"
connect_timeout_secs = {connect_timeout}
timeout_secs = 10
"""


# -- Orthanc's modalities -------------------------------------------------------------




# -- data and peers -----------------------------------------------------------------------



@pytest.fixture(scope="module")
def stored(orthanc, tmp_path_factory):
    """
    One study (s1: CT x2, s2: MR) stored in Orthanc by storescu.
    """
    directory = tmp_path_factory.mktemp("retrieve-data")
    patient = "HRTV" + uuid.uuid4().hex[:10].upper()
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    originals = {}
    for i, (source, series) in enumerate([("CT_small.dcm", s1), ("CT_small.dcm", s1), ("MR_small.dcm", s2)]):
        sop, path = dicom_instance(directory, source, patient, study, series, f"i{i}", patient_name='RETRIEVE^HTTP')
        originals[sop] = path
    result = dcmtk("storescu", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *originals.values())
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(patient=patient, study=study, s1=s1, s2=s2, originals=originals)


@pytest.fixture(scope="module")
def storescp(orthanc, tmp_path_factory):
    directory = tmp_path_factory.mktemp("retrieve-storescp")
    out = directory / "received"
    out.mkdir()
    port = free_port()
    proc = Process([require("storescp"), "-aet", STORESCP_AET, "-od", out, port], directory, "storescp",
                   env={"TCP_NODELAY": "1"})
    proc.wait_for_port(port)
    orthanc.add_modality(f"retrieve-storescp-{_TAG}", STORESCP_AET, port)
    yield SimpleNamespace(port=port, out=out, process=proc)
    orthanc.remove_modality(f"retrieve-storescp-{_TAG}")
    proc.stop()


@pytest.fixture(scope="module")
def fake_pacs(tmp_path_factory):
    """
    fake_abort_pacs.py with two CT instances of one new study: the complete
    one and the one cut off.
    """
    directory = tmp_path_factory.mktemp("abort-pacs")
    study, series = generate_uid(), generate_uid()
    complete_uid, complete = dicom_instance(directory, "CT_small.dcm", "ABORTED", study, series, "complete", patient_name='RETRIEVE^HTTP')
    partial_uid, partial = dicom_instance(directory, "CT_small.dcm", "ABORTED", study, series, "partial", patient_name='RETRIEVE^HTTP')
    port = free_port()
    proc = Process([sys.executable, HERE / "fake_abort_pacs.py", port, FAKE_AET, complete, partial],
                   directory, "fake-pacs")
    proc.wait_for_port(port)
    yield SimpleNamespace(port=port, process=proc, study=study, complete=(complete_uid, complete),
                          partial=(partial_uid, partial))
    proc.stop()


def _listening(gateway, port):
    return ("127.0.0.1", port) in listening_addresses(gateway.process.popen.pid)


@pytest.fixture(scope="module")
def gateway(orthanc, tmp_path_factory):
    directory = tmp_path_factory.mktemp("retrieve-gateway")
    http_port = free_port()
    ports = {name: free_port() for name in ("dicom", "persist", "unreg", "down")}
    dead_port = free_port()
    flavours = {
        # name: (PACS AE, PACS port, local AE, persistent, mode)
        "dicom": (orthanc.aet, orthanc.dicom_port, MOVE_AET, "false", "move"),
        "persist": (orthanc.aet, orthanc.dicom_port, PERSIST_AET, "true", "get"),
        "unreg": (orthanc.aet, orthanc.dicom_port, UNREG_AET, "false", "move"),
        "down": ("NOBODY", dead_port, f"HRD{_TAG}", "false", "move"),
    }
    storages = {name: directory / f"retrieved-{name}" for name in flavours}
    pipelines = "".join(
        PIPELINE.format(
            name=name, aet=aet, port=port, local_aet=local_aet, incoming=ports[name], persistent=persistent,
            mode=mode, storage=storages[name], connect_timeout=CONNECT_TIMEOUT,
        )
        for name, (aet, port, local_aet, persistent, mode) in flavours.items()
    )
    config = write_config(directory, BASE.format(http_port=http_port), {"retrieve": pipelines})
    orthanc.add_modality(f"retrieve-move-{_TAG}", MOVE_AET, ports["dicom"])
    orthanc.add_modality(f"retrieve-persist-{_TAG}", PERSIST_AET, ports["persist"])
    process = start_harmony(directory, config, http_port)
    gw = SimpleNamespace(port=http_port, process=process, directory=directory, incoming=ports, storages=storages,
                         dead_port=dead_port)
    # Right after startup, before any move: the persistent store SCP
    # listens (on loopback only), the transient ones do not.
    deadline = time.monotonic() + 5
    while not _listening(gw, ports["persist"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    gw.at_startup = {name: _listening(gw, port) for name, port in ports.items()}
    gw.addresses_at_startup = listening_addresses(process.popen.pid)
    yield gw
    orthanc.remove_modality(f"retrieve-move-{_TAG}")
    orthanc.remove_modality(f"retrieve-persist-{_TAG}")
    process.stop_cleanly()


@pytest.fixture(scope="module")
def abort_gateway(fake_pacs, tmp_path_factory):
    """
    A gateway of its own in front of the aborting fake PACS: its log is
    checked by the test (an unexpected error there is a failure of that
    test, not of the shared gateway's clean stop).
    """
    directory = tmp_path_factory.mktemp("abort-gateway")
    http_port = free_port()
    pipeline = PIPELINE.format(
        name="abort", aet=FAKE_AET, port=fake_pacs.port, local_aet=f"HRA{_TAG}", incoming=free_port(),
        persistent="false", mode="get", storage=directory / "retrieved-abort", connect_timeout=CONNECT_TIMEOUT,
    )
    config = write_config(directory, BASE.format(http_port=http_port), {"abort": pipeline})
    process = start_harmony(directory, config, http_port, name="harmony-abort")
    yield SimpleNamespace(port=http_port, process=process, storage=directory / "retrieved-abort")
    returncode, killed = process.stop()
    assert not killed and returncode in (0, -signal.SIGTERM), process.output()


# -- helpers ------------------------------------------------------------------------------


def _post(gateway, target, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(gateway.port, "POST", target, data, headers=[("Content-Type", "application/json")])


def _same_dataset(received, original, what):
    """
    Element by element (pixel data byte for byte); the file meta differs.
    """
    assert received.SOPInstanceUID == original.SOPInstanceUID, what
    assert received.PixelData == original.PixelData, what
    for element in original:
        # Orthanc drops the Data Set Trailing Padding of the test files.
        if element.tag == 0xFFFCFFFC:
            continue
        assert element.tag in received, (what, element)
        assert received[element.tag].value == element.value, (what, element)


def _stored_files(root):
    """
    Every file under a storage root but its temporary area, and what the
    temporary area holds.
    """
    files, temp = [], []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            (temp if rel.split(os.sep)[0] == ".tmp" else files).append(rel)
    return sorted(files), sorted(temp)


def _wait_temp_empty(root, timeout=1.0):
    """
    The temporary area of a storage is empty at once or within C{timeout}
    (a spare writer prepared in the thread pool for a next sub-operation
    may outlive its association by a moment: it is aborted when ready).
    """
    deadline = time.monotonic() + timeout
    while True:
        _, temp = _stored_files(root)
        if not temp or time.monotonic() >= deadline:
            return temp
        time.sleep(0.02)


def _check_retrieved(body, stored, root, expected=None, series=None):
    """
    A successful retrieve's answer: every instance of the study (or of
    C{series}) listed once, each file under the backend's storage with the
    data set sent, and no other file there for that study (series).
    """
    expected = set(stored.originals) if expected is None else expected
    assert body["success"] is True and body["status"] == "0x0000", body
    assert body["stored"] == len(expected), body
    assert body["counts"].get("completed") == len(expected), body["counts"]
    assert body["counts"].get("failed", 0) == 0, body["counts"]
    assert os.path.realpath(body["storage_root"]) == os.path.realpath(root)
    listed = [i["sop_instance_uid"] for i in body["instances"]]
    assert sorted(listed) == sorted(expected), body["instances"]
    for item in body["instances"]:
        path = item["path"]
        assert path.startswith(body["storage_root"] + os.sep), path
        assert os.path.isfile(path) and os.path.getsize(path) == item["size"], item
        received = pydicom.dcmread(path)
        original = pydicom.dcmread(stored.originals[item["sop_instance_uid"]])
        assert received.file_meta.TransferSyntaxUID == item["transfer_syntax"]
        assert item["sop_class_uid"] == original.SOPClassUID
        _same_dataset(received, original, path)
    files, _ = _stored_files(root)
    prefix = os.path.join(stored.study, series) if series else stored.study
    study_files = [f for f in files if f.startswith(prefix + os.sep)]
    assert sorted(os.path.join(str(root), f) for f in study_files) == sorted(i["path"] for i in body["instances"])
    assert _wait_temp_empty(root) == [], "temporary files left in the storage"


def _study_query(stored, operation="C-MOVE"):
    return {"operation": operation, "level": "STUDY", "query": {"StudyInstanceUID": stored.study}}


# -- C-MOVE to Harmony ------------------------------------------------------------------------


def test_persistent_store_scp_listens_from_startup(gateway):
    assert gateway.at_startup["persist"], f"persistent store SCP not listening: {gateway.addresses_at_startup}"
    # Transient ones (and the backends' PACS ports) are not.
    for name in ("dicom", "unreg", "down"):
        assert not gateway.at_startup[name], (name, gateway.addresses_at_startup)
    # Loopback only, as configured.
    assert not [a for a in gateway.addresses_at_startup if a[1] == gateway.incoming["persist"] and a[0] != "127.0.0.1"]


@pytest.mark.parametrize("name", ["dicom", "persist"])
def test_move_to_harmony(gateway, stored, name):
    port = gateway.incoming[name]
    persistent = name == "persist"
    assert _listening(gateway, port) is persistent
    assert accepts(port) is persistent
    response = _post(gateway, f"/{name}/move", _study_query(stored))
    assert response.status == 200, response.body
    body = response.json()
    assert body["operation"] == "move" and body["level"] == "STUDY"
    _check_retrieved(body, stored, gateway.storages[name])
    if persistent:
        assert _listening(gateway, port), "the persistent store SCP stopped listening after a move"
    else:
        # Stopped once the move is over (closing the port may take a
        # reactor turn after the answer).
        deadline = time.monotonic() + 2
        while _listening(gateway, port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _listening(gateway, port), "the transient store SCP still listens after the move"
        assert not accepts(port)


def test_move_series_patient_root(gateway, stored):
    body = {
        "level": "SERIES",
        "query_model": "patient",
        "query": {"PatientID": stored.patient, "StudyInstanceUID": stored.study, "SeriesInstanceUID": stored.s1},
    }
    response = _post(gateway, "/dicom/move", body)
    assert response.status == 200, response.body
    s1 = {uid for uid, path in stored.originals.items() if pydicom.dcmread(path).SeriesInstanceUID == stored.s1}
    assert len(s1) == 2
    _check_retrieved(response.json(), stored, gateway.storages["dicom"], expected=s1, series=stored.s1)


def test_third_party_move_seed_shape(gateway, stored, storescp):
    before = set(os.listdir(storescp.out))
    body = dict(_study_query(stored), destination=STORESCP_AET)
    response = _post(gateway, "/dicom", body)
    assert response.status == 200, response.body
    answer = response.json()
    assert answer["operation"] == "move" and answer["success"] is True and answer["status"] == "0x0000", answer
    assert answer["destination"] == STORESCP_AET
    assert answer["counts"].get("completed") == 3 and answer["counts"].get("failed", 0) == 0, answer
    assert "instances" not in answer
    new = sorted(set(os.listdir(storescp.out)) - before)
    received = {}
    for name in new:
        ds = pydicom.dcmread(storescp.out / name)
        received[ds.SOPInstanceUID] = ds
    assert len(new) == 3 and sorted(received) == sorted(stored.originals), storescp.process.output()
    for sop, ds in received.items():
        _same_dataset(ds, pydicom.dcmread(stored.originals[sop]), sop)
    # Nothing came back to the transient store SCP.
    assert not _listening(gateway, gateway.incoming["dicom"])


def test_bad_destination_is_400(gateway, stored):
    body = dict(_study_query(stored), destination="A" * 17)
    response = _post(gateway, "/dicom/move", body)
    assert response.status == 400, response.body
    answer = response.json()
    assert set(answer) == {"error", "message"} and answer["error"] == "bad_request", answer
    for bad in (42, ""):
        response = _post(gateway, "/dicom/move", dict(_study_query(stored), destination=bad))
        assert response.status == 400, (bad, response.body)


# -- C-GET whatever the retrieve mode ---------------------------------------------------------


def test_explicit_get_ignores_dimse_retrieve_mode(gateway, stored):
    """
    POST {prefix}/get is a C-GET with either dimse_retrieve_mode: /unreg
    ("move", an AE Orthanc does not know: a C-MOVE to it fails, see below),
    /dicom ("move") and /persist ("get") all retrieve the study.
    """
    for name in ("unreg", "dicom", "persist"):
        response = _post(gateway, f"/{name}/get", _study_query(stored, "C-GET"))
        assert response.status == 200, (name, response.body)
        body = response.json()
        assert body["operation"] == "get", body
        _check_retrieved(body, stored, gateway.storages[name])
    # The unregistered AE really cannot be moved to: its /get was no move.
    response = _post(gateway, "/unreg/move", _study_query(stored))
    assert response.status == 502, response.body
    body = response.json()
    assert body["success"] is False and body["stored"] == 0 and body["instances"] == [], body
    assert not _listening(gateway, gateway.incoming["unreg"])


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["get", "move"])
def test_pacs_down_is_502(gateway, stored, operation):
    started = time.monotonic()
    response = _post(gateway, f"/down/{operation}", _study_query(stored))
    elapsed = time.monotonic() - started
    assert response.status == 502, response.body
    assert response.json()["error"] == "bad_gateway"
    assert elapsed < 5, f"{elapsed:.1f}s for a PACS that is down (connect_timeout_secs = {CONNECT_TIMEOUT})"
    # A move's store SCP was not left listening.
    deadline = time.monotonic() + 2
    while _listening(gateway, gateway.incoming["down"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _listening(gateway, gateway.incoming["down"])
    files, temp = _stored_files(gateway.storages["down"])
    assert files == [] and temp == []


def test_pacs_abort_mid_get(abort_gateway, fake_pacs):
    """
    The fake PACS sends one complete instance, then half of a second and
    aborts: a failure answer (nothing partial reported as success), only
    the complete instance listed and kept, no half-written file left.
    """
    root = abort_gateway.storage
    body = {"level": "STUDY", "query": {"StudyInstanceUID": fake_pacs.study}}
    response = _post(abort_gateway, "/abort/get", body)
    log = fake_pacs.process.output()
    assert "sent complete C-STORE-RQ" in log and "1 of" in log and "A-ABORT" in log, log
    # On disk: the complete instance, nothing of the other.
    complete_uid, complete_path = fake_pacs.complete
    original = pydicom.dcmread(complete_path)
    kept = os.path.join(str(root), original.StudyInstanceUID, original.SeriesInstanceUID, f"{complete_uid}.dcm")
    assert _wait_temp_empty(root) == [], "a half-written or spare file is left in the storage"
    assert os.listdir(root / ".tmp") == []
    files, _ = _stored_files(root)
    assert [os.path.join(str(root), f) for f in files] == [kept], files
    _same_dataset(pydicom.dcmread(kept), original, kept)
    # The answer: a failure, listing what was kept.  dicom_scu's
    # _http_retrieve answers 502 when nothing was stored, else 200 with
    # success false and the instances.
    gateway_log = abort_gateway.process.output()
    assert response.status == 200, (
        "HARMONY BUG (harmony/backends/dicom_scu.py, _http_retrieve): a PACS abort mid-C-GET must answer "
        "200 with success false and the complete instance listed (502 when none was stored); "
        f"got {response.status}: {response.body!r}; the instance stream's AssociationAborted escaped "
        f"'async for instance in result.instances' (see the gateway log):\n{gateway_log[-3000:]}"
    )
    answer = response.json()
    assert answer["success"] is False and answer["status"] != "0x0000", answer
    assert answer["operation"] == "get" and answer.get("error"), answer
    [item] = answer["instances"]
    assert answer["stored"] == 1 and item["sop_instance_uid"] == complete_uid and item["path"] == kept, answer
    assert "Traceback" not in gateway_log and "Unexpected error" not in gateway_log, gateway_log
    # Still answering.
    assert _post(abort_gateway, "/abort/echo", b"").status == 200
