"""
The dicom_scu backend against a real Orthanc: HTTP -> DICOM (echo, store of
application/dicom and multipart/related bodies) and DICOM -> DICOM
(storescu -> Harmony's SCP -> Orthanc, answered with the PACS's outcome).
"""

import io
import json

import pydicom
import pytest
from peers import dcmtk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from harmonytest import free_port, request, start_harmony, write_config

BASE = """
[proxy]
id = "scu-it"
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {http_port}
[storage.options]
path = "./store"
"""

PIPELINES = """
[pipelines.http_to_pacs]
networks = ["default"]
endpoints = ["api"]
backends = ["pacs"]

[endpoints.api]
service = "http"
options.path_prefix = "/dicom"

[pipelines.http_to_nowhere]
networks = ["default"]
endpoints = ["api_down"]
backends = ["down"]

[endpoints.api_down]
service = "http"
options.path_prefix = "/down"

[pipelines.forward]
endpoints = ["scp"]
backends = ["pacs_forward"]

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_store = true
enable_find = true

[pipelines.forward_down]
endpoints = ["scp_down"]
backends = ["down_forward"]

[endpoints.scp_down]
service = "dicom"
[endpoints.scp_down.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_down_port}
enable_store = true
enable_find = true

[backends.pacs]
service = "dicom"
[backends.pacs.options]
aet = "{orthanc_aet}"
host = "127.0.0.1"
port = {orthanc_port}

[backends.pacs_forward]
service = "dicom_scu"
[backends.pacs_forward.options]
aet = "{orthanc_aet}"
host = "127.0.0.1"
port = {orthanc_port}

[backends.down]
service = "dicom_scu"
[backends.down.options]
aet = "NOBODY"
host = "127.0.0.1"
port = {dead_port}
connect_timeout_secs = 5

[backends.down_forward]
service = "dicom_scu"
[backends.down_forward.options]
aet = "NOBODY"
host = "127.0.0.1"
port = {dead_port}
connect_timeout_secs = 5
"""


@pytest.fixture(scope="module")
def gateway(orthanc, tmp_path_factory):
    directory = tmp_path_factory.mktemp("scu-gateway")
    ports = {"http_port": free_port(), "scp_port": free_port(), "scp_down_port": free_port()}
    config = write_config(
        directory,
        BASE.format(**ports),
        {
            "dicom": PIPELINES.format(
                orthanc_aet=orthanc.aet, orthanc_port=orthanc.dicom_port, dead_port=free_port(), **ports
            )
        },
    )
    process = start_harmony(directory, config, ports["http_port"])
    process.wait_for_port(ports["scp_port"])
    process.wait_for_port(ports["scp_down_port"])
    ports["process"] = process
    yield ports
    process.stop_cleanly()


def _instance(source="CT_small.dcm"):
    ds = pydicom.dcmread(get_testdata_file(source, download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return ds, out.getvalue()


def _orthanc_uids(orthanc):
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get_json("/instances?expand")}


def test_http_echo(gateway, orthanc):
    response = request(gateway["http_port"], "POST", "/dicom/echo", b"")
    assert response.status == 200
    body = response.json()
    assert body["operation"] == "echo" and body["success"] is True
    assert body["remote_aet"] == orthanc.aet and body["port"] == orthanc.dicom_port


def test_http_echo_peer_down(gateway):
    response = request(gateway["http_port"], "POST", "/down/echo", b"")
    assert response.status == 502
    body = response.json()
    assert body["operation"] == "echo" and body["success"] is False and body["error"]
    # Still serving.
    assert request(gateway["http_port"], "POST", "/dicom/echo", b"").status == 200


def test_http_store_application_dicom(gateway, orthanc):
    ds, data = _instance()
    response = request(gateway["http_port"], "POST", "/dicom/store", data, headers=[("Content-Type", "application/dicom")])
    assert response.status == 200, response.body
    body = response.json()
    assert body["success"] is True
    [result] = body["results"]
    assert result == {
        "sop_class_uid": ds.SOPClassUID,
        "sop_instance_uid": ds.SOPInstanceUID,
        "status": "0x0000",
        "success": True,
    }
    assert ds.SOPInstanceUID in _orthanc_uids(orthanc)


def test_http_store_multipart_related(gateway, orthanc):
    instances = [_instance("CT_small.dcm"), _instance("MR_small.dcm")]
    boundary = "harmony-boundary-42"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for _, data in instances
    ) + f"--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = request(gateway["http_port"], "POST", "/dicom/store", body, headers=[("Content-Type", ctype)])
    assert response.status == 200, response.body
    results = response.json()["results"]
    assert [r["sop_instance_uid"] for r in results] == [ds.SOPInstanceUID for ds, _ in instances]
    assert all(r["success"] for r in results)
    assert {ds.SOPInstanceUID for ds, _ in instances} <= _orthanc_uids(orthanc)


@pytest.mark.parametrize(
    "ctype, body, status",
    [
        ("application/dicom", b"not dicom at all" * 20, 400),
        ("application/json", b"{}", 415),
        ('multipart/related; type="application/dicom"', b"--x\r\n\r\n", 400),
    ],
)
def test_http_store_bad_bodies(gateway, ctype, body, status):
    response = request(gateway["http_port"], "POST", "/dicom/store", body, headers=[("Content-Type", ctype)])
    assert response.status == status
    assert set(response.json()) == {"error", "message"}
    assert request(gateway["http_port"], "POST", "/dicom/echo", b"").status == 200


def test_http_unknown_operation(gateway):
    response = request(gateway["http_port"], "POST", "/dicom/nonsense", b"{}")
    assert response.status == 404
    assert response.json()["error"] == "not_found"


def test_storescu_forwarded_to_orthanc(gateway, orthanc, tmp_path):
    ds, data = _instance()
    path = tmp_path / "in.dcm"
    path.write_bytes(data)
    result = dcmtk("storescu", "-v", "-aec", "HARMONY", "127.0.0.1", gateway["scp_port"], path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert ds.SOPInstanceUID in _orthanc_uids(orthanc)


def test_failed_forward_is_never_success(gateway, tmp_path):
    ds, data = _instance()
    path = tmp_path / "in.dcm"
    path.write_bytes(data)
    result = dcmtk("storescu", "-v", "-aec", "HARMONY", "127.0.0.1", gateway["scp_down_port"], path)
    out = result.stdout + result.stderr
    assert "Received Store Response (Success)" not in out, out
    assert "Refused: OutOfResources" in out, out
    # The gateway logs the failure without patient data.
    log = gateway["process"].output()
    assert ds.PatientName and str(ds.PatientName) not in log



def _store_to_orthanc(orthanc, tmp_path, patient_id, studies):
    """
    Store one new instance per study for a new patient, straight to Orthanc.
    """
    uids = []
    for i in range(studies):
        ds, data = _instance()
        path = tmp_path / f"{patient_id}-{i}.dcm"
        ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)
        uids.append(ds.StudyInstanceUID)
    files = sorted(tmp_path.glob(f"{patient_id}-*.dcm"))
    result = dcmtk("storescu", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    return set(uids)


def _findscu(port, called, out_dir, *args):
    out_dir.mkdir()
    result = dcmtk("findscu", "-X", "-od", out_dir, "-aec", called, *args, "127.0.0.1", port)
    answers = [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return result, answers


@pytest.mark.parametrize("root", ["-S", "-P"])
def test_findscu_through_harmony_to_orthanc(gateway, orthanc, tmp_path, root):
    patient = "FIND" + generate_uid()[-10:]
    studies = _store_to_orthanc(orthanc, tmp_path, patient, 3)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient}", "-k", "StudyInstanceUID", "-k", "StudyDate"]
    result, through = _findscu(gateway["scp_port"], "HARMONY", tmp_path / "harmony", root, *keys)
    assert result.returncode == 0, result.stdout + result.stderr
    direct_result, direct = _findscu(orthanc.dicom_port, orthanc.aet, tmp_path / "direct", root, *keys)
    assert direct_result.returncode == 0
    assert {str(ds.StudyInstanceUID) for ds in through} == studies
    assert sorted(ds.StudyInstanceUID for ds in through) == sorted(ds.StudyInstanceUID for ds in direct)
    assert all(ds.PatientID == patient for ds in through)


def test_findscu_no_match_and_series_level(gateway, orthanc, tmp_path):
    result, answers = _findscu(
        gateway["scp_port"], "HARMONY", tmp_path / "none", "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=NOBODY-AT-ALL", "-k", "StudyInstanceUID",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert answers == []
    patient = "SER" + generate_uid()[-10:]
    [study] = _store_to_orthanc(orthanc, tmp_path, patient, 1)
    result, answers = _findscu(
        gateway["scp_port"], "HARMONY", tmp_path / "series", "-S",
        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "Modality",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(answers) == 1 and answers[0].Modality == "CT"


def test_findscu_cancel(gateway, orthanc, tmp_path):
    patient = "CANCEL" + generate_uid()[-10:]
    _store_to_orthanc(orthanc, tmp_path, patient, 4)
    result = dcmtk(
        "findscu", "-v", "--cancel", "1", "-S", "-aec", "HARMONY",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient}", "-k", "StudyInstanceUID",
        "127.0.0.1", gateway["scp_port"],
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Sending Cancel Request" in out, out
    # Cancel or Success: the matches may all be sent before the cancel
    # arrives (PS3.4 C.4.1.2.3 allows both); one final response either way.
    finals = [line for line in out.splitlines() if "Received Final Find Response" in line]
    assert len(finals) == 1 and ("Cancel" in finals[0] or "Success" in finals[0]), out
    # Still answering.
    assert dcmtk("echoscu", "-aec", "HARMONY", "127.0.0.1", gateway["scp_port"]).returncode == 0


def test_find_pacs_down_is_a_failure(gateway, tmp_path):
    result, answers = _findscu(
        gateway["scp_down_port"], "HARMONY", tmp_path / "down", "-v", "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=X",
    )
    out = result.stdout + result.stderr
    assert answers == []
    assert "Refused: OutOfResources" in out or "a700" in out.lower(), out
    assert dcmtk("echoscu", "-aec", "HARMONY", "127.0.0.1", gateway["scp_down_port"]).returncode == 0


def test_http_find_shapes(gateway, orthanc, tmp_path):
    patient = "HTTPF" + generate_uid()[-10:]
    studies = _store_to_orthanc(orthanc, tmp_path, patient, 2)
    shapes = [
        {"identifier": {"00100020": {"vr": "LO", "Value": [patient]}, "0020000D": {"vr": "UI"}, "00080052": {"vr": "CS", "Value": ["STUDY"]}}},
        {"command": "find", "identifier": {"00100020": {"vr": "LO", "Value": [patient]}, "0020000D": {"vr": "UI"}}, "query_metadata": {}},
        {"operation": "C-FIND", "level": "STUDY", "query": {"PatientID": patient}},
        {"operation": "C-FIND", "level": "STUDY", "query": {"00100020": patient, "StudyInstanceUID": None}},
        {"patient_id": patient, "query_level": "STUDY"},
    ]
    for shape in shapes:
        response = request(gateway["http_port"], "POST", "/dicom/find", json.dumps(shape).encode(),
                           headers=[("Content-Type", "application/json")])
        assert response.status == 200, (shape, response.body)
        body = response.json()
        assert body["operation"] == "find" and body["success"] is True and body["status"] == "0x0000"
        found = {m["0020000D"]["Value"][0] for m in body["matches"]}
        assert found == studies, shape
    # Patient level, patient root.
    response = request(gateway["http_port"], "POST", "/dicom/find",
                       json.dumps({"patient_id": patient, "query_level": "PATIENT", "query_model": "patient"}).encode())
    assert response.status == 200, response.body
    [match] = response.json()["matches"]
    assert match["00100020"]["Value"] == [patient]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"query": {"NoSuchKeyword": "x"}}', b'{"level": "GALAXY", "query": {}}',
     b'{"identifier": {"bad": 1}}', b'{"query_model": "nonsense", "patient_id": "x"}'],
)
def test_http_find_bad_queries(gateway, body):
    response = request(gateway["http_port"], "POST", "/dicom/find", body, headers=[("Content-Type", "application/json")])
    assert response.status == 400, response.body
    assert set(response.json()) == {"error", "message"}


def test_http_find_pacs_down(gateway):
    response = request(gateway["http_port"], "POST", "/down/find", b'{"patient_id": "x"}')
    assert response.status == 502
    assert response.json()["error"] == "bad_gateway"


def test_http_get_stores_the_study(gateway, orthanc, tmp_path):
    patient = "HTTPG" + generate_uid()[-10:]
    ds, data = _instance()
    ds.PatientID = patient
    sources = []
    for i, source in enumerate(("CT_small.dcm", "MR_small.dcm")):
        one, _ = _instance(source)
        one.PatientID = patient
        one.StudyInstanceUID = ds.StudyInstanceUID
        path = tmp_path / f"g{i}.dcm"
        one.save_as(path, enforce_file_format=True)
        sources.append((one, path))
    result = dcmtk("storescu", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *[p for _, p in sources])
    assert result.returncode == 0, result.stdout + result.stderr
    query = {"operation": "C-GET", "level": "STUDY", "query": {"StudyInstanceUID": ds.StudyInstanceUID}}
    response = request(gateway["http_port"], "POST", "/dicom/get", json.dumps(query).encode(),
                       headers=[("Content-Type", "application/json")])
    assert response.status == 200, response.body
    body = response.json()
    assert body["operation"] == "get" and body["success"] is True and body["status"] == "0x0000"
    assert body["stored"] == 2 and body["counts"]["completed"] == 2
    by_uid = {i["sop_instance_uid"]: i for i in body["instances"]}
    for original, _ in sources:
        stored = pydicom.dcmread(by_uid[original.SOPInstanceUID]["path"])
        assert stored.PixelData == original.PixelData
        assert stored.PatientID == patient
        assert by_uid[original.SOPInstanceUID]["path"].startswith(body["storage_root"])


def test_http_get_pacs_down(gateway):
    response = request(gateway["http_port"], "POST", "/down/get", b'{"patient_id": "x", "query_level": "PATIENT"}')
    assert response.status == 502
    assert response.json()["error"] == "bad_gateway"
