"""
Tests for L{harmony.jmix.package}: building JMIX packages (zips) from the
files of one generated study, incrementally and in one go; determinism
whatever the order the instances come in, skip options, the zip (local
entries in the order written, central directory sorted, every byte final
once written) and the manifest reader.  Contents are checked against
independent recomputations (hashes, payload hash) from the zip as
C{zipfile} reads it.
"""

import datetime
import errno
import hashlib
import json
import os
import random
import shutil
import struct
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
from harmony.jmix.package import PackageBuilder, Party, build_package, read_manifest
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


def reference_payload_hash(payload):
    """
    An independent implementation of the issue's payload hash over
    C{payload}: {path relative to payload/: bytes}.
    """
    h = hashlib.sha256()
    for rel in sorted(payload, key=lambda r: r.encode("utf-8")):
        h.update(rel.encode("utf-8"))
        h.update(b"\n")
        h.update(payload[rel])
    return "sha256:" + h.hexdigest()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Unzipped:
    """
    A package zip as C{zipfile} reads it: C{files} {path inside <id>/: bytes}.
    """

    def __init__(self, zip_path):
        with zipfile.ZipFile(zip_path) as zf:
            assert zf.testzip() is None
            self.infos = zf.infolist()
            self.names = zf.namelist()
            self.files = {i.filename: zf.read(i) for i in self.infos}
        tops = {name.split("/", 1)[0] for name in self.names}
        assert len(tops) == 1, tops
        self.id = tops.pop()
        self.files = {name[len(self.id) + 1:]: data for name, data in self.files.items()}

    def json(self, rel):
        data = self.files[rel]
        assert data == package.dumps(json.loads(data))  # deterministic text
        return json.loads(data)

    def payload(self):
        return {rel[len("payload/"):]: data for rel, data in self.files.items() if rel.startswith("payload/")}


def local_order(zip_path):
    """
    The names of the local entries in file order (walking the local headers).
    """
    data = read_bytes(zip_path)
    names, pos = [], 0
    while data[pos:pos + 4] == b"PK\x03\x04":
        _, _, _, _, _, _, _, _, compressed, _, name_len, extra_len = struct.unpack_from("<4s2B4HL2L2H", data, pos)
        names.append(data[pos + 30:pos + 30 + name_len].decode())
        pos += 30 + name_len + extra_len + compressed
    return names


@pytest.fixture
def study(tmp_path):
    """
    A generated study in C{tmp_path/spool} plus pristine copies of its files.
    """
    study_uid, made = make_study(str(tmp_path / "spool"))
    originals = {(series_uid, sop_uid): read_bytes(path) for series_uid, sop_uid, path in made}
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
    assert info.zip_path == os.path.join(out, info.id + ".zip")
    assert info.size == os.path.getsize(info.zip_path)
    assert info.instance_count == 6
    assert info.timestamp == "2024-05-06T07:08:09Z"
    # The zip is the package: no unpacked copy, nothing temporary left.
    assert os.listdir(out) == [info.id + ".zip"]

    package_zip = Unzipped(info.zip_path)
    assert package_zip.id == info.id
    expected_dicom = sorted("dicom/%s/%s.dcm" % (s, o) for s, o, _ in made)
    assert sorted(package_zip.files) == sorted(
        ["manifest.json", "audit.json", "payload/metadata.json", "payload/files.json"]
        + ["payload/" + rel for rel in expected_dicom]
        + ["schemas/%s.schema.json" % n for n in ("audit", "files", "manifest", "metadata")]
    )

    # The instances are in the package byte for byte; the inputs are untouched.
    for series_uid, sop_uid, path in made:
        assert read_bytes(path) == originals[(series_uid, sop_uid)]
        assert package_zip.files["payload/dicom/%s/%s.dcm" % (series_uid, sop_uid)] == originals[(series_uid, sop_uid)]

    manifest = package_zip.json("manifest.json")
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
    assert package_zip.json("audit.json") == {
        "audit": [
            {"event": "created", "by": {"id": "harmony-a", "name": "Harmony A"}, "timestamp": "2024-05-06T07:08:09Z"}
        ]
    }

    metadata = package_zip.json("payload/metadata.json")
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

    payload = package_zip.payload()
    listing = package_zip.json("payload/files.json")
    assert [e["file"] for e in listing] == expected_dicom
    for entry in listing:
        assert entry["size_bytes"] == len(payload[entry["file"]])
        assert entry["hash"] == sha256(payload[entry["file"]])
    assert info.payload_hash == reference_payload_hash(payload)

    for name in ("manifest", "audit"):
        Draft202012Validator(load_schema(name)).validate(package_zip.json(name + ".json"))
    for name in ("metadata", "files"):
        Draft202012Validator(load_schema(name)).validate(package_zip.json("payload/" + name + ".json"))
    for name in ("audit", "files", "manifest", "metadata"):
        assert json.loads(package_zip.files["schemas/%s.schema.json" % name]) == load_schema(name)


def test_default_sender_and_no_requester(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"))
    manifest = Unzipped(info.zip_path).json("manifest.json")
    assert manifest["sender"] == {"name": "Harmony", "id": "harmony"}
    assert "requester" not in manifest
    assert manifest["receiver"] == []
    assert manifest["security"] == {"payload_hash": info.payload_hash}
    assert "extensions" not in manifest
    stamp = datetime.datetime.strptime(manifest["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 60


def test_rebuild_in_another_order_identical_payload(tmp_path, study):
    """
    The instances of one study arriving in two different orders: the zips
    differ (local entries in arrival order, other id and times) but list
    the same names, sorted, and hold byte-identical payload files with the
    same payload hash.
    """
    _, made, _ = study
    paths = [p for _, _, p in made]
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != paths and shuffled != paths[::-1]
    a = build_package(paths, str(tmp_path / "a"), now=NOW)
    b = build_package(shuffled, str(tmp_path / "b"), now=NOW + datetime.timedelta(hours=1), extensions={"note": "x"})
    c = build_package(paths[::-1], str(tmp_path / "c"), now=NOW)
    assert len({a.id, b.id, c.id}) == 3
    assert a.payload_hash == b.payload_hash == c.payload_hash
    za, zb, zc = Unzipped(a.zip_path), Unzipped(b.zip_path), Unzipped(c.zip_path)
    assert za.payload() == zb.payload() == zc.payload()
    for zipped in (za, zb, zc):
        relative = [name.split("/", 1)[1] for name in zipped.names]
        assert relative == sorted(relative)
    assert [n.split("/", 1)[1] for n in za.names] == [n.split("/", 1)[1] for n in zb.names]
    assert {rel: data for rel, data in za.files.items() if rel.startswith("schemas/")} == {
        rel: data for rel, data in zb.files.items() if rel.startswith("schemas/")
    }
    dicom_order = [[n for n in local_order(z.zip_path) if n.endswith(".dcm")] for z in (a, b, c)]
    assert len({tuple(n.split("/", 1)[1] for n in names) for names in dicom_order}) == 3  # three arrival orders
    ma, mb = za.json("manifest.json"), zb.json("manifest.json")
    assert ma["id"] != mb["id"] and ma["timestamp"] != mb["timestamp"]
    assert mb["extensions"] == {"note": "x"}


def test_skip_hashing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_hashing=True, now=NOW)
    package_zip = Unzipped(info.zip_path)
    listing = package_zip.json("payload/files.json")
    assert len(listing) == 6
    assert all(e["hash"] is None for e in listing)
    assert all(e["size_bytes"] == len(package_zip.payload()[e["file"]]) for e in listing)
    assert info.payload_hash == reference_payload_hash(package_zip.payload())
    assert package_zip.json("manifest.json")["security"]["payload_hash"] == info.payload_hash


def test_skip_listing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_listing=True, now=NOW)
    payload = Unzipped(info.zip_path).payload()
    listing = json.loads(payload["files.json"])
    meta = payload["metadata.json"]
    assert listing == [{"file": "metadata.json", "hash": sha256(meta), "size_bytes": len(meta)}]
    assert info.payload_hash == reference_payload_hash(payload)
    assert sum(rel.startswith("dicom/") for rel in payload) == 6


def test_skip_hashing_and_listing(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), skip_hashing=True, skip_listing=True)
    payload = Unzipped(info.zip_path).payload()
    assert json.loads(payload["files.json"]) == [
        {"file": "metadata.json", "hash": None, "size_bytes": len(payload["metadata.json"])}
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
        assert not any(n.endswith("/") for n in names)  # no directory entries
        for i in infos:
            assert i.date_time == (1980, 1, 1, 0, 0, 0)
            assert (i.external_attr >> 16) == 0o100644
            assert i.create_system == 3
            assert i.flag_bits == 0  # no data descriptor, ASCII names
            if i.filename.endswith(".json"):
                assert i.compress_type == zipfile.ZIP_DEFLATED
            else:
                assert i.filename.endswith(".dcm")
                assert i.compress_type == zipfile.ZIP_STORED
        assert zf.testzip() is None
    assert not os.path.exists(info.zip_path + ".part")


def test_local_entries_in_arrival_order(tmp_path, study):
    """
    Schemas first, then the instances in the order they were added, then
    the JSON documents; the central directory sorted by name.
    """
    _, made, _ = study
    order = [made[i] for i in (4, 0, 5, 2, 1, 3)]
    info = build_package([p for _, _, p in order], str(tmp_path / "out"), now=NOW)
    top = info.id + "/"
    assert local_order(info.zip_path) == (
        [top + "schemas/%s.schema.json" % n for n in ("audit", "files", "manifest", "metadata")]
        + [top + "payload/dicom/%s/%s.dcm" % (s, o) for s, o, _ in order]
        + [top + rel for rel in ("payload/metadata.json", "payload/files.json", "manifest.json", "audit.json")]
    )
    with zipfile.ZipFile(info.zip_path) as zf:
        assert zf.namelist() == sorted(local_order(info.zip_path))


def test_every_byte_is_final_once_committed(tmp_path, study):
    """
    What the builder reports as committed after each step is a prefix of
    the finished zip (nothing is rewritten later), and grows.
    """
    _, made, _ = study
    builder = PackageBuilder(str(tmp_path / "p.zip"), now=NOW)
    prefixes = [read_bytes(builder.zip_path)[: builder.committed]]
    assert builder.committed > 0  # the schemas
    for _, _, path in made:
        committed = builder.add(path)
        assert committed == builder.committed == os.path.getsize(builder.zip_path)
        prefixes.append(read_bytes(builder.zip_path)[:committed])
    info = builder.finish()
    assert builder.entries_end < info.size == builder.committed
    final = read_bytes(info.zip_path)
    assert len(final) == info.size
    sizes = [len(p) for p in prefixes]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for prefix in prefixes:
        assert final.startswith(prefix)
    # The central directory and end records follow the last entry.
    assert final[builder.entries_end:builder.entries_end + 4] == b"PK\x01\x02"
    assert info.instance_count == builder.instance_count == 6


@pytest.mark.parametrize("skip_hashing", [False, True])
def test_instances_given_as_bytes_make_the_same_zip(tmp_path, study, skip_hashing):
    """
    An instance held in memory (its Part 10 bytes) is packaged exactly as
    its file would be: the zips of the same package, from files, from
    bytes and mixed, are identical.
    """
    _, made, _ = study
    package_id = str(uuid.uuid4())
    zips = []
    for n, form in enumerate(("path", "bytes", "mixed")):
        builder = PackageBuilder(str(tmp_path / f"{n}.zip"), package_id=package_id, now=NOW,
                                 skip_hashing=skip_hashing)
        for i, (_, _, path) in enumerate(made):
            if form == "bytes" or (form == "mixed" and i % 2):
                builder.add(bytearray(read_bytes(path)) if i == 1 else read_bytes(path))
            else:
                builder.add(path)
        zips.append(read_bytes(builder.finish().zip_path))
    assert zips[0] == zips[1] == zips[2]


def test_uids_given_by_the_caller_spare_the_tag_walk(tmp_path, study, monkeypatch):
    """
    An instance added with the UIDs its receiver already read (a retrieve
    does) is not walked again, from a file or from bytes, and makes the
    same zip; the UIDs are still checked as the walk's would be.
    """
    _, made, _ = study
    package_id = str(uuid.uuid4())
    walked = build_package([p for _, _, p in made], str(tmp_path / "walked"), package_id=package_id, now=NOW)

    def no_walk(*args):
        raise AssertionError("walked again")

    monkeypatch.setattr(package, "_header_uids", no_walk)
    builder = PackageBuilder(str(tmp_path / "given.zip"), package_id=package_id, now=NOW)
    study_uid = dcmread(made[0][2]).StudyInstanceUID
    for i, (series_uid, sop_uid, path) in enumerate(made):
        builder.add(read_bytes(path) if i % 2 else path, (study_uid, series_uid, sop_uid))
    assert read_bytes(builder.finish().zip_path) == read_bytes(walked.zip_path)

    series_uid, sop_uid, path = made[0]
    for uids, message in [
        (("1.2.3", series_uid, sop_uid), "more than one study"),
        ((study_uid, "../../x", sop_uid), "invalid SeriesInstanceUID"),
        ((study_uid, series_uid, None), "input file 1 has no SOPInstanceUID"),
    ]:
        builder = PackageBuilder(str(tmp_path / f"bad{len(message)}.zip"), now=NOW)
        builder.add(made[1][2], (study_uid, made[1][0], made[1][1]))
        with pytest.raises(ValueError, match=message):
            builder.add(read_bytes(path), uids)
        builder.abort()


def test_bytes_that_are_not_dicom_are_refused(tmp_path, study):
    _, made, _ = study
    for junk in (b"", b"not DICOM at all", read_bytes(made[0][2])[:200]):
        builder = PackageBuilder(str(tmp_path / "p.zip"))
        with pytest.raises(ValueError, match="input file 0"):
            builder.add(junk)
        builder.abort()


def test_builder_failure_then_abort(tmp_path, study):
    _, made, _ = study
    builder = PackageBuilder(str(tmp_path / "p.zip"))
    builder.add(made[0][2])
    with pytest.raises(ValueError, match="duplicate"):
        builder.add(made[0][2])
    with pytest.raises(ValueError):
        builder.add(made[1][2])  # unusable after a failure
    with pytest.raises(ValueError):
        builder.finish()
    builder.abort()
    builder.abort()
    assert os.listdir(tmp_path) == ["spool"]


def test_finish_without_instances(tmp_path):
    builder = PackageBuilder(str(tmp_path / "p.zip"))
    with pytest.raises(ValueError, match="no instances"):
        builder.finish()
    builder.abort()
    assert not os.path.exists(tmp_path / "p.zip")


def test_builder_refuses_an_existing_zip(tmp_path):
    (tmp_path / "p.zip").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        PackageBuilder(str(tmp_path / "p.zip"))
    assert (tmp_path / "p.zip").read_bytes() == b"keep"


def test_instances_larger_than_the_map_window(tmp_path, study, monkeypatch):
    """
    Instances larger than L{package.MAP_WINDOW} are hashed window by window
    and copied into the zip by the kernel (or by hand without
    copy_file_range): the same package.
    """
    _, made, _ = study
    paths = [p for _, _, p in made]
    small = build_package(paths, str(tmp_path / "small"), now=NOW)
    monkeypatch.setattr(package, "MAP_WINDOW", 4096)
    assert all(os.path.getsize(p) > 4096 for p in paths)
    windowed = build_package(paths, str(tmp_path / "windowed"), now=NOW)
    assert windowed.payload_hash == small.payload_hash
    assert Unzipped(windowed.zip_path).payload() == Unzipped(small.zip_path).payload()

    def no_copy_file_range(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device copy")

    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range, raising=False)
    by_hand = build_package(paths, str(tmp_path / "by-hand"), now=NOW)
    assert by_hand.payload_hash == small.payload_hash
    assert Unzipped(by_hand.zip_path).payload() == Unzipped(small.zip_path).payload()


def test_files_that_cannot_be_mapped_are_read(tmp_path, study, monkeypatch):
    _, made, _ = study
    paths = [p for _, _, p in made]
    mapped = build_package(paths, str(tmp_path / "mapped"), now=NOW)

    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, "no mmap here")

    monkeypatch.setattr(package.mmap, "mmap", no_mmap)
    read = build_package(paths, str(tmp_path / "read"), now=NOW)
    assert read.payload_hash == mapped.payload_hash
    assert Unzipped(read.zip_path).payload() == Unzipped(mapped.zip_path).payload()


def test_headers_the_tag_walk_cannot_read_go_to_pydicom(tmp_path, study, monkeypatch):
    _, made, _ = study
    paths = [p for _, _, p in made]
    walked = build_package(paths, str(tmp_path / "walked"), now=NOW)
    calls = []

    def cannot_tell(head, complete):
        calls.append(len(head))
        return None

    monkeypatch.setattr(package, "_header_uids", cannot_tell)
    parsed = build_package(paths, str(tmp_path / "parsed"), now=NOW)
    assert len(calls) == 6
    assert parsed.payload_hash == walked.payload_hash
    assert Unzipped(parsed.zip_path).payload() == Unzipped(walked.zip_path).payload()


def test_read_manifest(tmp_path, study):
    _, made, _ = study
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    from_zip = read_manifest(info.zip_path)
    assert from_zip["id"] == info.id
    assert from_zip["security"]["payload_hash"] == info.payload_hash
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(info.zip_path) as zf:
        zf.extractall(unpacked)
    assert read_manifest(str(unpacked / info.id)) == from_zip
    with pytest.raises(ValueError):
        read_manifest(str(unpacked / info.id / "payload" / "files.json"))
    with pytest.raises(ValueError):
        read_manifest(str(tmp_path))


def test_package_id_given(tmp_path, study):
    _, made, _ = study
    pid = str(uuid.uuid4())
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=pid)
    assert info.id == pid
    assert Unzipped(info.zip_path).json("manifest.json")["id"] == pid


@pytest.mark.parametrize("bad", ["not-a-uuid", "../x", str(uuid.uuid4()).upper(), uuid.uuid4().hex])
def test_bad_package_id(tmp_path, study, bad):
    _, made, _ = study
    with pytest.raises(ValueError):
        build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=bad)
    assert all(os.path.exists(p) for _, _, p in made)


def test_existing_package_zip(tmp_path, study):
    _, made, _ = study
    pid = str(uuid.uuid4())
    os.makedirs(str(tmp_path / "out"))
    (tmp_path / "out" / (pid + ".zip")).write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        build_package([p for _, _, p in made], str(tmp_path / "out"), package_id=pid)
    assert (tmp_path / "out" / (pid + ".zip")).read_bytes() == b"keep"
    assert os.listdir(tmp_path / "out") == [pid + ".zip"]


def _nothing_left(tmp_path, paths):
    assert all(os.path.exists(p) for p in paths)  # inputs are never consumed
    assert not os.path.exists(str(tmp_path / "out")) or os.listdir(str(tmp_path / "out")) == []


def test_two_studies_rejected(tmp_path, study):
    _, made, _ = study
    _, other = make_study(str(tmp_path / "other"), series=(("CT_small.dcm", 1, None),))
    paths = [p for _, _, p in made] + [other[0][2]]
    with pytest.raises(ValueError, match="more than one study"):
        build_package(paths, str(tmp_path / "out"))
    _nothing_left(tmp_path, paths)


def test_not_dicom_rejected(tmp_path, study):
    _, made, _ = study
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"Doe^John is not DICOM" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for bad in (junk, empty):
        paths = [p for _, _, p in made] + [str(bad)]
        with pytest.raises(ValueError) as excinfo:
            build_package(paths, str(tmp_path / "out"))
        assert "input file 6 " in str(excinfo.value)
        assert "Doe" not in str(excinfo.value)
        _nothing_left(tmp_path, paths)


def test_no_files_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_package([], str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_traversal_uid_rejected(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 1, None),))
    path = made[0][2]
    ds = dcmread(path)
    ds.SeriesInstanceUID = "../../etc"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError):
        build_package([path], str(tmp_path / "out"))
    _nothing_left(tmp_path, [path])


def test_missing_uid_rejected(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 1, None),))
    path = made[0][2]
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError, match="input file 0 has no SeriesInstanceUID"):
        build_package([path], str(tmp_path / "out"))


def test_duplicate_sop_rejected(tmp_path, study):
    _, made, _ = study
    dup = copy_files([made[0][2]], str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="input file 6: duplicate") as excinfo:
        build_package([p for _, _, p in made] + dup, str(tmp_path / "out"))
    assert made[0][1] not in str(excinfo.value)  # no UID in messages
    _nothing_left(tmp_path, [p for _, _, p in made])


def test_failure_removes_partial_package(tmp_path, study, monkeypatch):
    _, made, _ = study
    out = str(tmp_path / "out")
    from harmony.jmix import zipwriter

    def broken(self):
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(zipwriter.ZipAppender, "close", broken)
    with pytest.raises(OSError):
        build_package([p for _, _, p in made], out)
    assert os.listdir(out) == []
    assert all(os.path.exists(p) for _, _, p in made)


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
    info = build_package([p for _, _, p in reversed(made)], str(tmp_path / "out"))
    payload = Unzipped(info.zip_path).payload()
    assert info.payload_hash == reference_payload_hash(payload)
    listing = json.loads(payload["files.json"])
    assert [e["file"] for e in listing] == sorted(e["file"] for e in listing)
    series = json.loads(payload["metadata.json"])["studies"]["series"]
    assert [s["series_uid"] for s in series] == ["1.2.3", "1.2.3.4"]


def test_first_instance_of_a_series_whatever_the_order(tmp_path):
    """
    A series' modality and body part, and the patient, come from its first
    instance in SOP Instance UID order, however the instances arrive.
    """
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 3, None),))
    parts = {}
    for n, (series_uid, sop_uid, path) in enumerate(made):
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.%d" % (9 - n)
        ds.BodyPartExamined = "PART%d" % n
        ds.PatientID = "P%d" % n
        ds.save_as(path, enforce_file_format=True)
        parts[ds.SOPInstanceUID] = path
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        info = build_package([made[i][2] for i in order], str(tmp_path / ("out%s" % order)))
        metadata = Unzipped(info.zip_path).json("payload/metadata.json")
        assert metadata["studies"]["series"][0]["body_part"] == "PART2"  # SOP 1.2.7 is the first
        assert metadata["patient"]["id"] == "P2"


def test_study_timestamp_fallbacks(tmp_path):
    def timestamp(directory, **kwargs):
        _, made = make_study(str(tmp_path / directory), series=(("CT_small.dcm", 1, None),), **kwargs)
        info = build_package([made[0][2]], str(tmp_path / ("o-" + directory)))
        return Unzipped(info.zip_path).json("payload/metadata.json")["timestamp"]

    assert timestamp("s1", study_date=None) == "1970-01-01T00:00:00Z"
    assert timestamp("s2", study_time=None) == "2023-01-02T00:00:00Z"
    assert timestamp("s3", study_time="0930") == "2023-01-02T09:30:00Z"


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
    metadata = Unzipped(info.zip_path).json("payload/metadata.json")
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
