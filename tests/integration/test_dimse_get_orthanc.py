"""
Harmony's C-GET SCU against the session's Orthanc (127.0.0.1): a study of
two series (two CT instances, one MR instance; fresh UIDs) is stored with
DCMTK's storescu, then retrieved with C-GET at STUDY and SERIES level into
a temporary FilesystemStorage; every instance must come back with the data
set that was sent (pixel data byte for byte).
"""

import os
import uuid

import pydicom
import pytest
import pytest_twisted
from peers import dcmtk, dicom_instance
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from twisted.internet import defer

from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scu import PATIENT_ROOT_GET, STUDY_ROOT_GET, DicomClient
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import EOF

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STORAGE = [
    (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    (MR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
]



@pytest.fixture(scope="module")
def stored(orthanc, tmp_path_factory):
    """
    One study: series s1 (two CT instances) and s2 (one MR instance),
    stored in Orthanc by storescu.
    """
    directory = tmp_path_factory.mktemp("get")
    patient = "HGET" + uuid.uuid4().hex[:10].upper()
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    layout = [("CT_small.dcm", s1), ("CT_small.dcm", s1), ("MR_small.dcm", s2)]
    originals = {}
    series = {s1: set(), s2: set()}
    for i, (source, series_uid) in enumerate(layout):
        sop, path = dicom_instance(directory, source, patient, study, series_uid, f"i{i}", patient_name='GET^ALPHA')
        originals[sop] = path
        series[series_uid].add(sop)
    result = dcmtk("storescu", "-aec", orthanc.aet, "127.0.0.1", orthanc.dicom_port, *originals.values())
    assert result.returncode == 0, result.stdout + result.stderr
    return {"patient": patient, "study": study, "series": series, "originals": originals, "s1": s1, "s2": s2}


def _query(level, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@defer.inlineCallbacks
def _get(orthanc, root, identifier, model="study", cancel_after=None):
    """
    One C-GET on a new association into a FilesystemStorage at C{root}:
    (instances, final status).
    """
    from twisted.internet import reactor

    storage = FilesystemStorage(str(root), reactor=reactor)
    storage.startService()
    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate_for_get(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, STORAGE, models=("study", "patient"),
        extra_syntaxes=[(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])],
    )
    try:
        get = association.get(identifier, model=model, storage=storage)
        instances = []
        while True:
            instance = yield get.instances.read()
            if instance is EOF:
                break
            instances.append(instance)
            if cancel_after is not None and len(instances) == cancel_after:
                get.cancel()
        status = yield get.result
        echo = yield association.echo()
        assert echo.ok
    finally:
        yield association.release()
        storage.stopService()
    return instances, status


def _check(instances, stored, expected, root):
    """
    The instances are exactly the C{expected} SOP Instance UIDs, each stored
    under the layout with the data set that was sent.
    """
    assert sorted(i.sop_instance_uid for i in instances) == sorted(expected)
    for instance in instances:
        original = pydicom.dcmread(stored["originals"][instance.sop_instance_uid])
        assert instance.path and os.path.isfile(instance.path)
        assert instance.path.startswith(str(root))
        relpath = f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
        assert instance.path == os.path.join(str(root), *relpath.split("/"))
        assert instance.size == os.path.getsize(instance.path)
        received = pydicom.dcmread(instance.path)
        assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert received.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
        assert received.file_meta.TransferSyntaxUID == instance.transfer_syntax
        assert received.PixelData == original.PixelData
        assert received.SOPClassUID == original.SOPClassUID
        for element in original:
            # Orthanc drops the Data Set Trailing Padding of the test files.
            if element.tag == 0xFFFCFFFC:
                continue
            assert received[element.tag].value == element.value, element


@pytest_twisted.inlineCallbacks
def test_get_study(orthanc, stored, tmp_path):
    identifier = _query("STUDY", StudyInstanceUID=stored["study"])
    instances, status = yield _get(orthanc, tmp_path / "store", identifier)
    assert status.ok, status
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert not status.fields.get("NumberOfFailedSuboperations")
    _check(instances, stored, stored["originals"], tmp_path / "store")


@pytest_twisted.inlineCallbacks
def test_get_series(orthanc, stored, tmp_path):
    identifier = _query("SERIES", StudyInstanceUID=stored["study"], SeriesInstanceUID=stored["s1"])
    instances, status = yield _get(orthanc, tmp_path / "store", identifier)
    assert status.ok, status
    assert status.fields["NumberOfCompletedSuboperations"] == 2
    _check(instances, stored, stored["series"][stored["s1"]], tmp_path / "store")
    assert {i.sop_class_uid for i in instances} == {CT}


@pytest_twisted.inlineCallbacks
def test_get_study_patient_root(orthanc, stored, tmp_path):
    identifier = _query("STUDY", PatientID=stored["patient"], StudyInstanceUID=stored["study"])
    instances, status = yield _get(orthanc, tmp_path / "store", identifier, model="patient")
    assert status.ok, status
    _check(instances, stored, stored["originals"], tmp_path / "store")


@pytest_twisted.inlineCallbacks
def test_get_nothing(orthanc, stored, tmp_path):
    identifier = _query("SERIES", StudyInstanceUID=stored["study"], SeriesInstanceUID=generate_uid())
    instances, status = yield _get(orthanc, tmp_path / "store", identifier)
    assert instances == []
    # Orthanc answers "unable to process" when nothing matches a C-GET
    # (success with no sub-operations would be as correct).
    assert status.ok or status.status == 0xC000, status
    assert not status.fields.get("NumberOfCompletedSuboperations")


@pytest_twisted.inlineCallbacks
def test_cancel_mid_get(orthanc, stored, tmp_path):
    """
    C-CANCEL after the first instance: the get ends with Orthanc's final
    status (cancel, or success when every sub-operation was already done);
    the association stays usable (checked with a C-ECHO in _get).
    """
    identifier = _query("STUDY", StudyInstanceUID=stored["study"])
    instances, status = yield _get(orthanc, tmp_path / "store", identifier, cancel_after=1)
    assert status.status in (0xFE00, 0x0000), status
    assert 1 <= len(instances) <= 3
    assert not status.failed


def test_models_are_the_query_retrieve_get_classes():
    assert STUDY_ROOT_GET == "1.2.840.10008.5.1.4.1.2.2.3"
    assert PATIENT_ROOT_GET == "1.2.840.10008.5.1.4.1.2.1.3"


class _FailingStorage(FilesystemStorage):
    """
    A storage whose second commit fails (a full disk, say).
    """

    commits = 0

    def _wrap(self, writer):
        storage = self
        commit = writer.commit

        def failing_commit(relpath=None):
            storage.commits += 1
            if storage.commits == 2:
                writer.abort()
                return defer.fail(OSError(28, "No space left on device"))
            return commit(relpath)

        writer.commit = failing_commit
        return writer

    def open_writer(self, *args, **kwargs):
        return self._wrap(FilesystemStorage.open_writer(self, *args, **kwargs))

    def prepare_writers(self, *args, **kwargs):
        return FilesystemStorage.prepare_writers(self, *args, **kwargs).addCallback(
            lambda writers: [self._wrap(writer) for writer in writers]
        )


@pytest_twisted.inlineCallbacks
def test_get_with_a_sub_operation_failing_here(orthanc, stored, tmp_path):
    """
    A sub-operation Harmony cannot store is answered with a failure
    status; Orthanc goes on, ends with a warning or failure status (its
    final response may carry the Failed SOP Instance UID List), and the
    association stays usable.
    """
    from twisted.internet import reactor

    storage = _FailingStorage(str(tmp_path / "store"), reactor=reactor)
    storage.startService()
    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate_for_get(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet, STORAGE,
        extra_syntaxes=[(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])],
    )
    try:
        get = association.get(_query("STUDY", StudyInstanceUID=stored["study"]), storage=storage)
        instances = []
        while True:
            instance = yield get.instances.read()
            if instance is EOF:
                break
            instances.append(instance)
        status = yield get.result
        assert len(instances) == 2
        assert not status.ok and (status.warning or status.failed), status
        assert status.fields.get("NumberOfFailedSuboperations") == 1, status.fields
        echo = yield association.echo()
        assert echo.ok
    finally:
        yield association.release()
        storage.stopService()
    leftovers = [name for _, _, names in os.walk(tmp_path / "store") for name in names]
    assert sorted(leftovers) == sorted(os.path.basename(i.path) for i in instances)
