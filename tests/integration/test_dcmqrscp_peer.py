"""
DCMTK's dcmqrscp as a second PACS (the session's C{dcmqrscp} fixture): it
answers findscu with the studies it was loaded with, and Harmony's find
proxy (findscu -> twistd Harmony dicom_scp -> dicom_scu backend ->
dcmqrscp) gives the same matches as findscu -> dcmqrscp directly.
"""

import uuid

import pydicom
import pytest
from peers import dcmtk

from harmonytest import Process, free_port, twistd_argv, write_config

BASE = """
[proxy]
id = "dcmqrscp-it"
[storage.options]
path = "./store"
"""

PIPELINES = """
[pipelines.find_proxy]
endpoints = ["scp"]
backends = ["qr"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true

[backends.qr]
service = "dicom_scu"
[backends.qr.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
"""


@pytest.fixture(scope="module")
def gateway(dcmqrscp, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dcmqrscp-gateway")
    scp_port = free_port()
    config = write_config(
        directory,
        BASE,
        {"find": PIPELINES.format(scp_port=scp_port, aet=dcmqrscp.aet, port=dcmqrscp.port)},
    )
    # No HTTP routes: the DICOM port is the only one it listens on.
    process = Process(twistd_argv(config), directory, "harmony")
    process.wait_for_port(scp_port)
    yield {"scp_port": scp_port, "process": process}
    process.stop_cleanly()


@pytest.fixture(scope="module")
def loaded(dcmqrscp):
    """
    The headers of the instances the fixture loaded.
    """
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in dcmqrscp.loaded]


def _findscu(port, called, directory, model, keys):
    """
    findscu with C{-k} C{keys}; the responses as Datasets.
    """
    out = directory / f"findscu-{uuid.uuid4().hex}"
    out.mkdir()
    args = []
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", model, "-aet", "FINDSCU", "-aec", called, "-X", "-od", out, *args, "127.0.0.1", port)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not any(line.startswith(("E:", "F:")) for line in output.splitlines()), output
    return [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def _values(datasets, keywords):
    return sorted(tuple(str(ds.get(k, "")) for k in keywords) for ds in datasets)


def test_findscu_lists_the_loaded_studies(dcmqrscp, loaded, tmp_path):
    answers = _findscu(
        dcmqrscp.port, dcmqrscp.aet, tmp_path, "-S",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate"],
    )
    studies = {str(ds.StudyInstanceUID) for ds in loaded}
    assert len(studies) == 4
    # Later tests may store more studies into the session's dcmqrscp.
    assert studies <= {str(ds.StudyInstanceUID) for ds in answers}
    [one] = _findscu(
        dcmqrscp.port, dcmqrscp.aet, tmp_path, "-S",
        ["QueryRetrieveLevel=STUDY", "PatientID=DCMQR1", "StudyInstanceUID", "PatientName", "StudyDate"],
    )
    [expected] = {ds.StudyInstanceUID for ds in loaded if ds.PatientID == "DCMQR1"}
    assert (one.StudyInstanceUID, str(one.PatientName), one.StudyDate) == (expected, "DCMQR^ONE", "20240102")


def _queries():
    """
    (id, model, keys, compared keywords); C{{study}} and C{{series}} stand
    for patient DCMQR1's study and series.
    """
    study = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyID"]
    return [
        ("study-all", "-S", ["QueryRetrieveLevel=STUDY"] + study, study),
        ("study-by-patient", "-S", ["QueryRetrieveLevel=STUDY", "PatientID=DCMQR*"] + study[:1] + study[2:], study),
        (
            "series",
            "-S",
            ["QueryRetrieveLevel=SERIES", "StudyInstanceUID={study}", "SeriesInstanceUID", "Modality", "SeriesNumber"],
            ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber"],
        ),
        (
            "image",
            "-S",
            [
                "QueryRetrieveLevel=IMAGE", "StudyInstanceUID={study}", "SeriesInstanceUID={series}",
                "SOPInstanceUID", "InstanceNumber",
            ],
            ["SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"],
        ),
        (
            "patient-root",
            "-P",
            ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName"],
            ["PatientID", "PatientName"],
        ),
        (
            "patient-root-study",
            "-P",
            ["QueryRetrieveLevel=STUDY", "PatientID=DCMQR2", "StudyInstanceUID", "StudyDate"],
            ["PatientID", "StudyInstanceUID", "StudyDate"],
        ),
    ]


@pytest.mark.parametrize("name, model, keys, compared", _queries(), ids=[q[0] for q in _queries()])
def test_harmony_find_proxy_matches_dcmqrscp(dcmqrscp, gateway, loaded, tmp_path, name, model, keys, compared):
    [one] = [ds for ds in loaded if ds.PatientID == "DCMQR1"][:1]
    keys = [k.format(study=one.StudyInstanceUID, series=one.SeriesInstanceUID) for k in keys]
    direct = _findscu(dcmqrscp.port, dcmqrscp.aet, tmp_path, model, keys)
    through = _findscu(gateway["scp_port"], "HARMONY", tmp_path, model, keys)
    assert direct, f"dcmqrscp found nothing for {keys}"
    assert _values(through, compared) == _values(direct, compared)
    if name == "image":
        assert len(through) == 2
