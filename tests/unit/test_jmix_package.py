"""
Tests for L{harmony.jmix.package}: building JMIX packages from the files of
one generated study, determinism, skip options, the zip and the manifest
reader.
"""

import datetime
import errno
import hashlib
import json
import os
import shutil
import uuid
import zipfile

import pytest
from jsonschema import Draft202012Validator
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from harmony.jmix import package
from harmony.jmix.package import Party, build_package, read_manifest, zip_package
from harmony.jmix.validate import load_schema

NOW = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)


def make_study(
    directory,
    study_date="20230102",
    study_time="134501.25",
    series=(("CT_small.dcm", 3, "CHEST"), ("MR_small.dcm", 2, None), ("CT_small.dcm", 1, "HEAD")),
):
    """
    Write one study made from pydicom's test files, with fresh UIDs, into
    C{directory}.

    @param series: (test file, instance count, BodyPartExamined or None) per series.
    @return: (study UID, [(series UID, SOP UID, path)] in creation order).
    """
    os.makedirs(directory, exist_ok=True)
    study_uid = generate_uid()
    made = []
    for source, count, body_part in series:
        series_uid = generate_uid()
        for n in range(count):
            ds = dcmread(get_testdata_file(source, download=False))
            sop_uid = generate_uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = n + 1
            ds.PatientName = "Doe^John^Quincy^Dr^III"
            ds.PatientID = "PID-42"
            ds.IssuerOfPatientID = "HOSP"
            other = Dataset()
            other.PatientID = "ALT-7"
            ds.OtherPatientIDsSequence = Sequence([other])
            ds.PatientBirthDate = "19700203"
            ds.PatientSex = "M"
            ds.StudyDescription = "Generated study"
            if study_date is None:
                if "StudyDate" in ds:
                    del ds.StudyDate
            else:
                ds.StudyDate = study_date
            if study_time is None:
                if "StudyTime" in ds:
                    del ds.StudyTime
            else:
                ds.StudyTime = study_time
            if body_part is None:
                if "BodyPartExamined" in ds:
                    del ds.BodyPartExamined
            else:
                ds.BodyPartExamined = body_part
            path = os.path.join(directory, "in-%s.dcm" % (sop_uid,))
            ds.save_as(path, enforce_file_format=True)
            made.append((series_uid, sop_uid, path))
    return study_uid, made


def copy_files(paths, directory):
    """
    @return: copies of C{paths} in C{directory} (same base names).
    """
    os.makedirs(directory, exist_ok=True)
    out = []
    for path in paths:
        dst = os.path.join(directory, os.path.basename(path))
        shutil.copyfile(path, dst)
        out.append(dst)
    return out


def reference_payload_hash(payload_dir):
    """
    An independent implementation of the issue's payload hash.
    """
    rels = []
    for dirpath, _, filenames in os.walk(payload_dir):
        for name in filenames:
            rels.append(os.path.relpath(os.path.join(dirpath, name), payload_dir).replace(os.sep, "/"))
    h = hashlib.sha256()
    for rel in sorted(rels, key=lambda r: r.encode("utf-8")):
        h.update(rel.encode("utf-8"))
        h.update(b"\n")
        with open(os.path.join(payload_dir, rel), "rb") as f:
            h.update(f.read())
    return "sha256:" + h.hexdigest()


def sha256_file(path):
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def load(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def tree_bytes(directory):
    """
    @return: {relative path: bytes} of every file under C{directory}.
    """
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, directory)] = f.read()
    return out


@pytest.fixture
def study(tmp_path):
    """
    A generated study in C{tmp_path/spool} plus pristine copies of its files.
    """
    study_uid, made = make_study(str(tmp_path / "spool"))
    originals = {}
    for series_uid, sop_uid, path in made:
        with open(path, "rb") as f:
            originals[(series_uid, sop_uid)] = f.read()
    return study_uid, made, originals


def test_build_layout_and_contents(tmp_path, study):
    study_uid, made, originals = study
    out = str(tmp_path / "out")
    info = build_package(
        [p for _, _, p in made],
        out,
        sender=Party("Harmony A", "harmony-a", contact="ops@example.org"),
        requester=Party("Dr Who", "req-1"),
        receivers=[Party("Clinic", "clinic-1"), {"name": "Other", "id": "o-2"}],
        classification="confidential",
        now=NOW,
    )
    assert uuid.UUID(info.id).version == 4
    assert info.study_uid == study_uid
    assert info.directory == os.path.join(out, info.id)
    assert info.zip_path == os.path.join(out, info.id + ".zip")
    assert info.size == os.path.getsize(info.zip_path)
    assert info.instance_count == 6
    assert info.timestamp == "2024-05-06T07:08:09Z"
    assert sorted(os.listdir(out)) == sorted([info.id, info.id + ".zip"])

    root = info.directory
    expected_dicom = sorted("dicom/%s/%s.dcm" % (s, o) for s, o, _ in made)
    files = sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in _walk(root))
    assert files == sorted(
        ["manifest.json", "audit.json", "payload/metadata.json", "payload/files.json"]
        + ["payload/" + rel for rel in expected_dicom]
        + ["schemas/%s.schema.json" % n for n in ("audit", "files", "manifest", "metadata")]
    )

    # Instances were moved (the spool is consumed) and are byte-identical.
    for series_uid, sop_uid, path in made:
        assert not os.path.exists(path)
        with open(os.path.join(root, "payload", "dicom", series_uid, sop_uid + ".dcm"), "rb") as f:
            assert f.read() == originals[(series_uid, sop_uid)]

    manifest = load(os.path.join(root, "manifest.json"))
    assert manifest == {
        "version": "1.0",
        "id": info.id,
        "timestamp": "2024-05-06T07:08:09Z",
        "sender": {"name": "Harmony A", "id": "harmony-a", "contact": "ops@example.org"},
        "requester": {"name": "Dr Who", "id": "req-1"},
        "receiver": [{"name": "Clinic", "id": "clinic-1"}, {"name": "Other", "id": "o-2"}],
        "security": {"classification": "confidential", "payload_hash": info.payload_hash},
    }
    assert "Doe" not in json.dumps(manifest)
    assert load(os.path.join(root, "audit.json")) == {
        "audit": [
            {"event": "created", "by": {"id": "harmony-a", "name": "Harmony A"}, "timestamp": "2024-05-06T07:08:09Z"}
        ]
    }

    metadata = load(os.path.join(root, "payload", "metadata.json"))
    series_uids = sorted({s for s, _, _ in made})
    by_series = {}
    for s, _, _ in made:
        by_series[s] = by_series.get(s, 0) + 1
    assert metadata["version"] == "1.0"
    assert metadata["id"] == str(uuid.uuid5(uuid.NAMESPACE_OID, study_uid))
    assert metadata["timestamp"] == "2023-01-02T13:45:01Z"
    assert metadata["patient"] == {
        "id": "PID-42",
        "name": {"family": "Doe", "given": ["John", "Quincy"], "text": "Dr John Quincy Doe III"},
        "dob": "1970-02-03",
        "sex": "M",
        "identifiers": [{"value": "PID-42", "system": "HOSP"}, {"value": "ALT-7"}],
    }
    assert metadata["studies"]["study_uid"] == study_uid
    assert metadata["studies"]["study_description"] == "Generated study"
    series = metadata["studies"]["series"]
    assert [s["series_uid"] for s in series] == series_uids
    body_parts = {made[0][0]: "CHEST", made[3][0]: None, made[5][0]: "HEAD"}
    modalities = {made[0][0]: "CT", made[3][0]: "MR", made[5][0]: "CT"}
    for entry in series:
        assert entry["instance_count"] == by_series[entry["series_uid"]]
        assert entry["modality"] == modalities[entry["series_uid"]]
        assert entry.get("body_part") == body_parts[entry["series_uid"]]
        if body_parts[entry["series_uid"]] is None:
            assert "body_part" not in entry

    listing = load(os.path.join(root, "payload", "files.json"))
    assert [e["file"] for e in listing] == expected_dicom
    for entry in listing:
        path = os.path.join(root, "payload", entry["file"])
        assert entry["size_bytes"] == os.path.getsize(path)
        assert entry["hash"] == sha256_file(path)

    assert info.payload_hash == reference_payload_hash(os.path.join(root, "payload"))
    assert package.payload_hash(os.path.join(root, "payload")) == info.payload_hash

    for name in ("manifest", "audit"):
        Draft202012Validator(load_schema(name)).validate(load(os.path.join(root, name + ".json")))
    for name in ("metadata", "files"):
        Draft202012Validator(load_schema(name)).validate(load(os.path.join(root, "payload", name + ".json")))
    for name in ("audit", "files", "manifest", "metadata"):
        with open(os.path.join(root, "schemas", name + ".schema.json"), "rb") as f:
            assert json.loads(f.read()) == load_schema(name)


def _walk(root):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)


def test_json_is_deterministic_text(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    for rel in ("manifest.json", "audit.json", "payload/metadata.json", "payload/files.json"):
        with open(os.path.join(info.directory, rel), "rb") as f:
            data = f.read()
        assert data.endswith(b"}\n") or data.endswith(b"]\n")
        assert data == package.dumps(json.loads(data))


def test_default_sender_and_no_requester(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"))
    manifest = load(os.path.join(info.directory, "manifest.json"))
    assert manifest["sender"] == {"name": "Harmony", "id": "harmony"}
    assert "requester" not in manifest
    assert manifest["receiver"] == []
    assert manifest["security"] == {"payload_hash": info.payload_hash}
    assert "extensions" not in manifest
    stamp = datetime.datetime.strptime(manifest["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 60


def test_rebuild_same_study_identical_payload(tmp_path, study):
    _, made, _ = study
    paths = [p for _, _, p in made]
    first_copy = copy_files(paths, str(tmp_path / "copy1"))
    second_copy = copy_files(reversed(paths), str(tmp_path / "copy2"))
    a = build_package(first_copy, str(tmp_path / "a"), now=NOW)
    b = build_package(second_copy, str(tmp_path / "b"), now=NOW + datetime.timedelta(hours=1), extensions={"note": "x"})
    assert a.id != b.id
    assert a.payload_hash == b.payload_hash
    assert tree_bytes(os.path.join(a.directory, "payload")) == tree_bytes(os.path.join(b.directory, "payload"))
    assert tree_bytes(os.path.join(a.directory, "schemas")) == tree_bytes(os.path.join(b.directory, "schemas"))
    ma = load(os.path.join(a.directory, "manifest.json"))
    mb = load(os.path.join(b.directory, "manifest.json"))
    assert ma["id"] != mb["id"] and ma["timestamp"] != mb["timestamp"]
    assert mb["extensions"] == {"note": "x"}


def test_skip_hashing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_hashing=True, now=NOW)
    listing = load(os.path.join(info.directory, "payload", "files.json"))
    assert len(listing) == 6
    assert all(e["hash"] is None for e in listing)
    assert all(e["size_bytes"] > 0 for e in listing)
    assert info.payload_hash == reference_payload_hash(os.path.join(info.directory, "payload"))
    assert load(os.path.join(info.directory, "manifest.json"))["security"]["payload_hash"] == info.payload_hash


def test_skip_listing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_listing=True, now=NOW)
    payload = os.path.join(info.directory, "payload")
    listing = load(os.path.join(payload, "files.json"))
    meta = os.path.join(payload, "metadata.json")
    assert listing == [{"file": "metadata.json", "hash": sha256_file(meta), "size_bytes": os.path.getsize(meta)}]
    assert info.payload_hash == reference_payload_hash(payload)
    assert len(os.listdir(os.path.join(payload, "dicom"))) == 3


def test_skip_hashing_and_listing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_hashing=True, skip_listing=True)
    payload = os.path.join(info.directory, "payload")
    listing = load(os.path.join(payload, "files.json"))
    assert listing == [
        {"file": "metadata.json", "hash": None, "size_bytes": os.path.getsize(os.path.join(payload, "metadata.json"))}
    ]
    assert info.payload_hash == reference_payload_hash(payload)


def test_zip_entries(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    with zipfile.ZipFile(info.zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(n.startswith(info.id + "/") for n in names)
        expected = sorted(
            info.id + "/" + os.path.relpath(p, info.directory).replace(os.sep, "/") for p in _walk(info.directory)
        )
        assert names == expected
        for i in infos:
            assert i.date_time == (1980, 1, 1, 0, 0, 0)
            assert (i.external_attr >> 16) == 0o100644
            if i.filename.endswith(".json"):
                assert i.compress_type == zipfile.ZIP_DEFLATED
            else:
                assert i.filename.endswith(".dcm")
                assert i.compress_type == zipfile.ZIP_STORED
            with open(os.path.join(info.directory, *i.filename.split("/")[1:]), "rb") as f:
                assert zf.read(i) == f.read()
        assert zf.testzip() is None
    assert not os.path.exists(info.zip_path + ".part")


def test_zip_package_is_deterministic(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    again = str(tmp_path / "again.zip")
    size = zip_package(info.directory, again)
    assert size == os.path.getsize(again)
    with open(again, "rb") as f1, open(info.zip_path, "rb") as f2:
        assert f1.read() == f2.read()


def test_read_manifest(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    from_dir = read_manifest(info.directory)
    from_zip = read_manifest(info.zip_path)
    assert from_dir == from_zip
    assert from_zip["id"] == info.id
    assert from_zip["security"]["payload_hash"] == info.payload_hash
    with pytest.raises(ValueError):
        read_manifest(os.path.join(info.directory, "payload", "files.json"))
    with pytest.raises(ValueError):
        read_manifest(str(tmp_path))


def test_package_id_given(tmp_path, study):
    _, made, _ = study
    pid = str(uuid.uuid4())
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=pid)
    assert info.id == pid
    assert load(os.path.join(info.directory, "manifest.json"))["id"] == pid


@pytest.mark.parametrize("bad", ["not-a-uuid", "../x", str(uuid.uuid4()).upper(), uuid.uuid4().hex])
def test_bad_package_id(tmp_path, study, bad):
    _, made, _ = study
    with pytest.raises(ValueError):
        build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=bad)
    assert all(os.path.exists(p) for _, _, p in made)


def test_existing_package_directory(tmp_path, study):
    _, made, _ = study
    pid = str(uuid.uuid4())
    os.makedirs(str(tmp_path / "out" / pid / "keep"))
    with pytest.raises(FileExistsError):
        build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=pid)
    assert os.path.isdir(str(tmp_path / "out" / pid / "keep"))
    assert all(os.path.exists(p) for _, _, p in made)


def test_two_studies_rejected_before_moving(tmp_path, study):
    _, made, _ = study
    _, other = make_study(str(tmp_path / "other"), series=(("CT_small.dcm", 1, None),))
    paths = [p for _, _, p in made] + [other[0][2]]
    with pytest.raises(ValueError, match="more than one study"):
        build_package(paths, str(tmp_path / "out"))
    assert all(os.path.exists(p) for p in paths)
    assert not os.path.exists(str(tmp_path / "out")) or os.listdir(str(tmp_path / "out")) == []


def test_not_dicom_rejected(tmp_path, study):
    _, made, _ = study
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"Doe^John is not DICOM" * 20)
    paths = [p for _, _, p in made] + [str(junk)]
    with pytest.raises(ValueError) as excinfo:
        build_package(paths, str(tmp_path / "out"))
    assert "Doe" not in str(excinfo.value)
    assert all(os.path.exists(p) for p in paths)


def test_no_files_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_package([], str(tmp_path / "out"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_traversal_uid_rejected(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 1, None),))
    path = made[0][2]
    ds = dcmread(path)
    ds.SeriesInstanceUID = "../../etc"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError):
        build_package([path], str(tmp_path / "out"))
    assert os.path.exists(path)


def test_duplicate_sop_rejected(tmp_path, study):
    _, made, _ = study
    dup = copy_files([made[0][2]], str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="duplicate"):
        build_package([p for _, _, p in made] + dup, str(tmp_path / "out"))


def test_failure_removes_partial_package(tmp_path, study, monkeypatch):
    _, made, _ = study
    out = str(tmp_path / "out")

    def broken(directory, zip_path):
        with open(zip_path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(package, "zip_package", broken)
    with pytest.raises(OSError):
        build_package([p for _, _, p in made], out)
    assert os.listdir(out) == []
    # the spool was consumed
    assert not any(os.path.exists(p) for _, _, p in made)


def test_move_across_filesystems(tmp_path, study, monkeypatch):
    _, made, originals = study
    real_replace = os.replace
    calls = []

    def cross_device(src, dst):
        if str(src).endswith(".dcm"):
            calls.append(src)
            raise OSError(errno.EXDEV, "cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    info = build_package([p for _, _, p in made], str(tmp_path / "out"))
    assert len(calls) == 6
    for series_uid, sop_uid, path in made:
        assert not os.path.exists(path)
        with open(os.path.join(info.directory, "payload", "dicom", series_uid, sop_uid + ".dcm"), "rb") as f:
            assert f.read() == originals[(series_uid, sop_uid)]


def test_prefix_related_uids_hash_in_path_order(tmp_path):
    # "dicom/1.2.3/..." sorts after "dicom/1.2.3.4/..." as a path although
    # "1.2.3" < "1.2.3.4" as a UID; the payload hash follows the path order.
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 4, None),))
    uids = [("1.2.3", "1.2.3.5"), ("1.2.3", "1.2.3.5.1"), ("1.2.3.4", "1.2.3.6"), ("1.2.3.4", "1.2.3.6.1")]
    for (series_uid, sop_uid), (_, _, path) in zip(uids, made):
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.save_as(path, enforce_file_format=True)
    info = build_package([p for _, _, p in made], str(tmp_path / "out"))
    payload = os.path.join(info.directory, "payload")
    assert info.payload_hash == reference_payload_hash(payload)
    listing = load(os.path.join(payload, "files.json"))
    assert [e["file"] for e in listing] == sorted(e["file"] for e in listing)
    series = load(os.path.join(payload, "metadata.json"))["studies"]["series"]
    assert [s["series_uid"] for s in series] == ["1.2.3", "1.2.3.4"]


def test_study_timestamp_fallbacks(tmp_path):
    _, made = make_study(str(tmp_path / "s1"), study_date=None, series=(("CT_small.dcm", 1, None),))
    info = build_package([made[0][2]], str(tmp_path / "o1"))
    assert load(os.path.join(info.directory, "payload", "metadata.json"))["timestamp"] == "1970-01-01T00:00:00Z"
    _, made = make_study(str(tmp_path / "s2"), study_time=None, series=(("CT_small.dcm", 1, None),))
    info = build_package([made[0][2]], str(tmp_path / "o2"))
    assert load(os.path.join(info.directory, "payload", "metadata.json"))["timestamp"] == "2023-01-02T00:00:00Z"
    _, made = make_study(str(tmp_path / "s3"), study_time="0930", series=(("CT_small.dcm", 1, None),))
    info = build_package([made[0][2]], str(tmp_path / "o3"))
    assert load(os.path.join(info.directory, "payload", "metadata.json"))["timestamp"] == "2023-01-02T09:30:00Z"


def test_absent_patient_values_are_null(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 1, None),))
    path = made[0][2]
    ds = dcmread(path)
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDsSequence",
        "PatientBirthDate",
        "PatientSex",
        "StudyDescription",
    ):
        delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    info = build_package([path], str(tmp_path / "out"))
    metadata = load(os.path.join(info.directory, "payload", "metadata.json"))
    assert metadata["patient"] == {
        "id": None,
        "name": {"family": None, "given": [], "text": None},
        "dob": None,
        "sex": None,
        "identifiers": [],
    }
    assert metadata["studies"]["study_description"] is None
    Draft202012Validator(load_schema("metadata")).validate(metadata)


def test_now_in_other_timezone(tmp_path, study):
    _, made, _ = study
    tz = datetime.timezone(datetime.timedelta(hours=10))
    info = build_package(
        [p for _, _, p in made], str(tmp_path / "out"), now=datetime.datetime(2024, 1, 1, 5, 0, tzinfo=tz)
    )
    assert info.timestamp == "2023-12-31T19:00:00Z"


def test_party_to_dict():
    assert Party("A", "a").to_dict() == {"name": "A", "id": "a"}
    assert Party("A", "a", {"email": "x@y"}).to_dict() == {"name": "A", "id": "a", "contact": {"email": "x@y"}}
