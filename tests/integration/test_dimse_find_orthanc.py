"""
Harmony's C-FIND SCU against the session's Orthanc (127.0.0.1): instances of
two new patients (fresh IDs and UIDs) are stored with DCMTK's storescu, then
queried at every level with Study Root and Patient Root; the matches must be
what was stored, and the same as DCMTK findscu gets for the same query.
"""

import uuid

import pydicom
import pytest
import pytest_twisted
from peers import dcmtk, dicom_instance
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from twisted.internet import defer

from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scu import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, DicomClient
from harmony.streams import EOF

PROPOSED = [
    (VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian]),
    (STUDY_ROOT_FIND, [ImplicitVRLittleEndian]),
    (PATIENT_ROOT_FIND, [ImplicitVRLittleEndian]),
]



@pytest.fixture(scope="module")
def stored(orthanc, tmp_path_factory):
    """
    Patient A: study A1 (two CT series: 2 + 1 instances) and study A2 (one
    MR series); patient B: study B1 (one CT instance).  Stored in Orthanc
    by storescu.
    """
    directory = tmp_path_factory.mktemp("find")
    prefix = "HFIND" + uuid.uuid4().hex[:10].upper()
    a, b = prefix + "A", prefix + "B"
    uids = {name: generate_uid() for name in ("A1", "A2", "B1", "A1s1", "A1s2", "A2s1", "B1s1")}
    layout = [
        ("CT_small.dcm", a, "FIND^ALPHA", "A1", "A1s1"),
        ("CT_small.dcm", a, "FIND^ALPHA", "A1", "A1s1"),
        ("CT_small.dcm", a, "FIND^ALPHA", "A1", "A1s2"),
        ("MR_small.dcm", a, "FIND^ALPHA", "A2", "A2s1"),
        ("CT_small.dcm", b, "FIND^BRAVO", "B1", "B1s1"),
    ]
    instances = {}
    paths = []
    for i, (source, pid, name, study, series) in enumerate(layout):
        sop, path = dicom_instance(directory, source, pid, uids[study], uids[series], f"i{i}", patient_name=name)
        instances.setdefault(series, set()).add(sop)
        paths.append(path)
    result = dcmtk("storescu", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *paths)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"prefix": prefix, "A": a, "B": b, "uids": uids, "instances": instances, "directory": directory}


def _query(level, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@defer.inlineCallbacks
def _find(orthanc, identifier, model="study"):
    """
    One C-FIND on a new association: (matches, final status).
    """
    from twisted.internet import reactor

    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate("127.0.0.1", orthanc.dicom_port, orthanc.aet, PROPOSED)
    try:
        find = association.find(identifier, model=model)
        matches = []
        while True:
            match = yield find.matches.read()
            if match is EOF:
                break
            matches.append(match)
        status = yield find.result
    finally:
        yield association.release()
    return matches, status


def _findscu(orthanc, directory, identifier, model="study"):
    """
    The same query with DCMTK's findscu: its responses as Datasets.
    """
    out = directory / f"findscu-{uuid.uuid4().hex}"
    out.mkdir()
    keys = []
    for element in identifier:
        keys += ["-k", f"{element.keyword}={element.value}"]
    result = dcmtk(
        "findscu", "-S" if model == "study" else "-P", "-X", "-od", out,
        "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *keys,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def _values(datasets, *keywords):
    return sorted(tuple(str(ds.get(k, "")) for k in keywords) for ds in datasets)


@pytest_twisted.inlineCallbacks
def test_study_level_by_patient_id(orthanc, stored):
    identifier = _query("STUDY", PatientID=stored["A"], StudyInstanceUID="", PatientName="", StudyDate="")
    matches, status = yield _find(orthanc, identifier)
    assert status.ok, status
    uids = stored["uids"]
    assert {m.StudyInstanceUID for m in matches} == {uids["A1"], uids["A2"]}
    assert len(matches) == 2
    assert {m.PatientID for m in matches} == {stored["A"]}
    assert {str(m.PatientName) for m in matches} == {"FIND^ALPHA"}
    # The same as findscu.
    theirs = _findscu(orthanc, stored["directory"], identifier)
    keys = ("PatientID", "StudyInstanceUID", "PatientName", "StudyDate")
    assert _values(matches, *keys) == _values(theirs, *keys)


@pytest_twisted.inlineCallbacks
def test_patient_level_patient_root(orthanc, stored):
    identifier = _query("PATIENT", PatientID=stored["prefix"] + "*", PatientName="")
    matches, status = yield _find(orthanc, identifier, model="patient")
    assert status.ok, status
    assert _values(matches, "PatientID", "PatientName") == [
        (stored["A"], "FIND^ALPHA"),
        (stored["B"], "FIND^BRAVO"),
    ]
    theirs = _findscu(orthanc, stored["directory"], identifier, model="patient")
    assert _values(matches, "PatientID", "PatientName") == _values(theirs, "PatientID", "PatientName")


@pytest_twisted.inlineCallbacks
def test_study_level_patient_root(orthanc, stored):
    identifier = _query("STUDY", PatientID=stored["B"], StudyInstanceUID="")
    matches, status = yield _find(orthanc, identifier, model="patient")
    assert status.ok, status
    assert [m.StudyInstanceUID for m in matches] == [stored["uids"]["B1"]]


@pytest_twisted.inlineCallbacks
def test_series_level_within_a_study(orthanc, stored):
    uids = stored["uids"]
    identifier = _query("SERIES", StudyInstanceUID=uids["A1"], SeriesInstanceUID="", Modality="")
    matches, status = yield _find(orthanc, identifier)
    assert status.ok, status
    assert {m.SeriesInstanceUID for m in matches} == {uids["A1s1"], uids["A1s2"]}
    assert len(matches) == 2
    assert {m.Modality for m in matches} == {"CT"}
    theirs = _findscu(orthanc, stored["directory"], identifier)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "Modality")
    assert _values(matches, *keys) == _values(theirs, *keys)


@pytest_twisted.inlineCallbacks
def test_image_level_within_a_series(orthanc, stored):
    uids = stored["uids"]
    identifier = _query("IMAGE", StudyInstanceUID=uids["A1"], SeriesInstanceUID=uids["A1s1"], SOPInstanceUID="")
    matches, status = yield _find(orthanc, identifier)
    assert status.ok, status
    assert {m.SOPInstanceUID for m in matches} == stored["instances"]["A1s1"]
    assert len(matches) == 2


@pytest_twisted.inlineCallbacks
def test_query_matching_nothing(orthanc, stored):
    identifier = _query("STUDY", PatientID=stored["prefix"] + "NOBODY", StudyInstanceUID="")
    matches, status = yield _find(orthanc, identifier)
    assert status.ok and status.status == 0x0000, status
    assert matches == []


@pytest_twisted.inlineCallbacks
def test_cancel_mid_find(orthanc, stored):
    """
    C-CANCEL after the first match: the find ends with Orthanc's final
    status (cancel, or success when every response was already on its way)
    and the association stays usable.
    """
    from twisted.internet import reactor

    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate("127.0.0.1", orthanc.dicom_port, orthanc.aet, PROPOSED)
    find = association.find(_query("IMAGE", StudyInstanceUID=stored["uids"]["A1"], SOPInstanceUID=""))
    first = yield find.matches.read()
    assert first.SOPInstanceUID
    find.cancel()
    status = yield find.result
    assert status.status in (0xFE00, 0x0000), status
    assert not status.failed
    echo = yield association.echo()
    assert echo.ok
    yield association.release()
