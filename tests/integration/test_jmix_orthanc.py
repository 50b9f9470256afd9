"""
JMIX through a real C{twistd -n harmony} in front of the session's Orthanc.

One gateway for the module (L{gateway}) with three pipelines sharing the
C{jmix_builder} middleware:

  - C{/jmix}: the jmix endpoint (its own C{store_dir}, a small
    C{max_body_size} for uploads) + dicom_scu to Orthanc's DIMSE port, C-GET;
  - C{/jmix-again}: the same with another store: a second, independent
    build of a study (the payload must come out byte for byte the same);
  - C{/jmix-down}: nobody on the PACS port (502).

The data (L{studies}): generated CT studies with fresh UIDs of a patient of
this module, stored in Orthanc through its REST API; the main one has three
series of five instances.  Packages are checked by recomputation, written
here from the issue's text independently of Harmony's code: files.json
sizes and SHA-256s, the payload hash (files under C{payload/} sorted by
relative path; SHA-256 over, for each, the UTF-8 path, C{\\n}, the bytes),
metadata counts against the data stored, and every DICOM file against
Orthanc's copy (C{GET /instances/{id}/file}).

The building request gets the zip as it is written (chunked, no
Content-Length, the local entries in the order the instances came, the
central directory sorted): what it receives must be, byte for byte, the
zip the store then serves; a HEAD that builds waits for the package.

"Served from the store without the PACS" is proved by deleting the study
from Orthanc after the first build: the second request must still be
answered, with the same package.  Builds are also counted in the gateway's
log (C{jmix_builder}'s "JMIX package built" line): ten concurrent requests
for a new study make exactly one.

DICOM files are compared with Orthanc's from the end of the Part 10 file
meta on (plus its SOP Class/Instance and Transfer Syntax UIDs): the rest of
the meta (Implementation Class UID and Version Name, Source AE Title) is
written by whoever receives the C-GET, as PS3.10 wants, so it cannot equal
what the file Orthanc holds says.
"""

import concurrent.futures
import hashlib
import io
import json
import os
import re
import time
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from peers import generated_ct, orthanc_store
from pydicom.uid import generate_uid

from harmonytest import base_config, free_port, request, start_harmony, write_config

#: The endpoint's upload limit (bytes); the packages of this module are far smaller.
MAX_BODY = 256 * 1024
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
SHA256 = re.compile(r"sha256:[0-9a-f]{64}\Z")

PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_ep"]
middleware = ["jb"]
backends = ["{name}_scu"]

[endpoints.{name}_ep]
service = "jmix"
[endpoints.{name}_ep.options]
path_prefix = "/{prefix}"
store_dir = "{store}"
max_body_size = {max_body}

[backends.{name}_scu]
service = "dicom_scu"
[backends.{name}_scu.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "{local_aet}"
dimse_retrieve_mode = "{mode}"
incoming_store_port = {move_port}
incoming_bind_addr = "127.0.0.1"
storage_dir = "{spool}"
connect_timeout_secs = 2
timeout_secs = 30
"""

MIDDLEWARE = """
[middleware.jb]
type = "jmix_builder"
[middleware.jb.options]
sender_name = "Harmony JMIX IT"
sender_contact = "jmix-it@example.org"
"""

#: Study key -> (series count, instances per series).  "main" is checked
#: in depth; the others each serve one test that needs a study no store
#: has seen yet.
LAYOUT = {
    "main": (3, 5),
    "cached": (1, 2),
    "concurrent": (2, 3),
    "skip_hashing": (1, 2),
    "skip_listing": (1, 2),
    "skip_both": (1, 2),
    "head": (1, 2),
}
MODALITY_BODY_PART = [("CT", "CHEST"), ("CT", "ABDOMEN"), ("CT", "PELVIS")]


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    """
    L{LAYOUT} as generated CT instances (16x16, explicit VR little endian)
    of one patient of this module, stored in Orthanc.

    C{.patient}, C{.patient_name}; C{.studies}: key -> namespace(uid,
    description, series: [namespace(uid, modality, body_part, sops)]);
    C{.files}: SOP Instance UID -> path of the file stored.
    """
    directory = tmp_path_factory.mktemp("jmix-data")
    tag = uuid.uuid4().hex[:8].upper()
    patient, patient_name = f"HJX{tag}", f"JMIX{tag}^ALPHA^B"
    out, files = {}, {}
    seed = 0
    for key, (n_series, n_instances) in LAYOUT.items():
        study = SimpleNamespace(uid=generate_uid(), description=f"JMIX {key}", series=[])
        out[key] = study
        for s in range(n_series):
            modality, body_part = MODALITY_BODY_PART[s]
            series = SimpleNamespace(uid=generate_uid(), modality=modality, body_part=body_part, sops=[])
            study.series.append(series)
            for i in range(n_instances):
                path = directory / f"{key}-{s}-{i}.dcm"
                seed += 100
                sop = generated_ct(path, patient, study.uid, series.uid, i + 1, patient_name=patient_name,
                                   study_date="20240215", seed=seed)
                ds = pydicom.dcmread(path)
                ds.StudyDescription = study.description
                ds.SeriesNumber = s + 1
                ds.SeriesDescription = f"series {s + 1}"
                ds.BodyPartExamined = body_part
                ds.PatientBirthDate = "19800314"
                ds.PatientSex = "F"
                ds.save_as(path, enforce_file_format=True)
                series.sops.append(sop)
                files[sop] = path
    orthanc_store(orthanc, files.values())
    return SimpleNamespace(patient=patient, patient_name=patient_name, studies=out, files=files)


@pytest.fixture(scope="module")
def gateway(orthanc, tmp_path_factory):
    directory = tmp_path_factory.mktemp("jmix-gateway")
    port, dead_port, move_port = free_port(), free_port(), free_port()
    flavours = {
        # name: (prefix, PACS AE, PACS port, local AE, retrieve mode)
        "jx": ("jmix", orthanc.aet, orthanc.dicom_port, "HARMONYJX", "get"),
        "again": ("jmix-again", orthanc.aet, orthanc.dicom_port, "HARMONYJA", "get"),
        "move": ("jmix-move", orthanc.aet, orthanc.dicom_port, "HARMONYJM", "move"),
        "down": ("jmix-down", "NOBODY", dead_port, "HARMONYJD", "get"),
        # Never asked anything: its store is opened at startup all the same.
        "idle": ("jmix-idle", orthanc.aet, orthanc.dicom_port, "HARMONYJI", "get"),
    }
    pipelines = {
        f"jmix-{name}": PIPELINE.format(
            name=name, prefix=prefix, aet=aet, port=pacs_port, local_aet=local_aet, mode=mode,
            move_port=move_port if mode == "move" else free_port(),
            store=directory / f"store-{name}", spool=directory / f"spool-{name}", max_body=MAX_BODY,
        )
        for name, (prefix, aet, pacs_port, local_aet, mode) in flavours.items()
    }
    # C-MOVE builds: Orthanc sends the study to HARMONYJM on move_port.
    orthanc.add_modality("harmony-jmix-move", "HARMONYJM", move_port)
    pipelines["jmix-middleware"] = MIDDLEWARE
    extra = '\n[storage.options]\npath = "./storage"\n'
    config = write_config(directory, base_config(port, proxy_id="jmix-it", extra=extra), pipelines)
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(port=port, process=proc, directory=directory, store=directory / "store-jx",
                          url=f"http://127.0.0.1:{port}")
    proc.stop_cleanly()
    orthanc.remove_modality("harmony-jmix-move")


# -- helpers ----------------------------------------------------------------------------


def get(gateway, path, headers=(), method="GET", timeout=60):
    return request(gateway.port, method, path, headers=headers, timeout=timeout)


def build(gateway, study_uid, prefix="jmix", params=""):
    return get(gateway, f"/{prefix}/api/jmix?studyInstanceUid={study_uid}{params}")


def assert_zip_response(response):
    assert response.status == 200, response
    assert response.header("Content-Type").split(";")[0].strip() == "application/zip", response
    disposition = response.header("Content-Disposition")
    assert disposition and disposition.startswith("attachment"), response
    match = re.search(r'filename="?([0-9a-f-]{36})\.zip"?', disposition)
    assert match, disposition
    return match.group(1)


def assert_json_error(response, status):
    assert response.status == status, response
    assert response.header("Content-Type").split(";")[0].strip() == "application/json", response
    body = response.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    return body


class Package:
    """
    An unzipped package: C{files}: path inside C{<id>/} -> bytes.
    """

    def __init__(self, data):
        self.data = data
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            self.infos = z.infolist()
            self.names = [i.filename for i in self.infos]
            self.files = {i.filename: z.read(i) for i in self.infos if not i.is_dir()}
        roots = {name.split("/", 1)[0] for name in self.names}
        assert len(roots) == 1, roots
        self.id = roots.pop()
        prefix = self.id + "/"
        assert all(name.startswith(prefix) for name in self.names), self.names
        self.files = {name[len(prefix):]: data for name, data in self.files.items()}

    def json(self, name):
        return json.loads(self.files[name])

    @property
    def manifest(self):
        return self.json("manifest.json")

    @property
    def metadata(self):
        return self.json("payload/metadata.json")

    @property
    def listing(self):
        return self.json("payload/files.json")

    def payload(self):
        """
        Path relative to C{payload/} -> bytes.
        """
        return {name[len("payload/"):]: data for name, data in self.files.items() if name.startswith("payload/")}

    def dicom(self):
        return {name: data for name, data in self.payload().items() if name.startswith("dicom/")}


def payload_hash(payload):
    """
    The issue's rule: files under C{payload/} sorted by relative path;
    SHA-256 over, for each, the UTF-8 relative path, C{\\n}, the bytes.
    """
    h = hashlib.sha256()
    for name in sorted(payload):
        h.update(name.encode("utf-8"))
        h.update(b"\n")
        h.update(payload[name])
    return "sha256:" + h.hexdigest()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def orthanc_post(orthanc, path, body):
    import urllib.request

    req = urllib.request.Request(orthanc.url + path, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def orthanc_bytes(orthanc, path):
    import urllib.request

    with urllib.request.urlopen(orthanc.url + path, timeout=30) as r:
        return r.read()


def orthanc_study_id(orthanc, study_uid):
    found = [x["ID"] for x in orthanc_post(orthanc, "/tools/lookup", study_uid.encode()) if x["Type"] == "Study"]
    assert len(found) == 1, found
    return found[0]


def orthanc_files(orthanc, study_uid):
    """
    SOP Instance UID -> the file Orthanc holds, for every instance of the study.
    """
    study = orthanc_study_id(orthanc, study_uid)
    out = {}
    for instance in orthanc.get_json(f"/studies/{study}/instances"):
        sop = instance["MainDicomTags"]["SOPInstanceUID"]
        out[sop] = orthanc_bytes(orthanc, f"/instances/{instance['ID']}/file")
    return out


def orthanc_delete_study(orthanc, study_uid):
    import urllib.request

    study = orthanc_study_id(orthanc, study_uid)
    req = urllib.request.Request(f"{orthanc.url}/studies/{study}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def split_part10(data):
    """
    A Part 10 file's C{(file meta elements: tag -> raw value, data set bytes)}.
    """
    assert data[128:132] == b"DICM", data[:140]
    position, meta = 132, {}
    while position + 8 <= len(data) and int.from_bytes(data[position:position + 2], "little") == 0x0002:
        element = int.from_bytes(data[position + 2:position + 4], "little")
        vr = data[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(data[position + 8:position + 12], "little")
            start = position + 12
        else:
            length = int.from_bytes(data[position + 6:position + 8], "little")
            start = position + 8
        meta[0x00020000 | element] = data[start:start + length]
        position = start + length
    return meta, data[position:]


def repackage(package, new_id=None, extra=(), change=None):
    """
    A zip of C{package} (a L{Package}) under another id, with
    C{change(files)} applied to the files (path inside the package ->
    bytes) and C{extra} raw entries (name, bytes) added.  The manifest's id
    is rewritten; nothing else is recomputed.
    """
    new_id = new_id or str(uuid.uuid4())
    files = dict(package.files)
    manifest = json.loads(files["manifest.json"])
    manifest["id"] = new_id
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    if change is not None:
        change(files)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            z.writestr(f"{new_id}/{name}", files[name])
        for name, data in extra:
            z.writestr(zipfile.ZipInfo(name), data)
    return new_id, out.getvalue()


def builds_logged(gateway):
    """
    How many packages the gateway has built so far (its log's count of
    C{jmix_builder}'s "JMIX package built" lines).
    """
    return gateway.process.output().count("JMIX package built")


def upload(gateway, body, content_type="application/zip", prefix="jmix"):
    return request(gateway.port, "POST", f"/{prefix}/api/jmix", body=body,
                   headers=[("Content-Type", content_type)], timeout=60)


# -- building from the PACS --------------------------------------------------------------


@pytest.fixture(scope="module")
def main_build(gateway, studies, orthanc):
    """
    The first request for the main study (a build), timed, and Orthanc's files of it.
    """
    study = studies.studies["main"]
    started = time.monotonic()
    response = build(gateway, study.uid)
    elapsed = time.monotonic() - started
    package_id = assert_zip_response(response)
    return SimpleNamespace(response=response, id=package_id, package=Package(response.body), elapsed=elapsed,
                           orthanc=orthanc_files(orthanc, study.uid), study=study)


def test_zip_layout(main_build):
    package = main_build.package
    assert package.id == main_build.id and UUID.match(package.id)
    assert package.names == sorted(package.names), "zip entries are not sorted"
    assert len({i.date_time for i in package.infos}) == 1, "zip entry times are not fixed"
    for name in ("manifest.json", "audit.json", "payload/metadata.json", "payload/files.json"):
        assert name in package.files, (name, sorted(package.files))
    assert len(package.dicom()) == 15, sorted(package.dicom())
    assert all("/.." not in "/" + n and not n.startswith("/") for n in package.names), package.names


def local_entry_names(data):
    """
    The names of a zip's local entries in file order (what a streaming
    reader sees), walking the local headers.
    """
    import struct

    names, pos = [], 0
    while data[pos:pos + 4] == b"PK\x03\x04":
        flags, compressed, name_len, extra_len = (struct.unpack_from("<H", data, pos + 6)[0],
                                                  *struct.unpack_from("<L", data, pos + 18),
                                                  *struct.unpack_from("<HH", data, pos + 26))
        assert not flags & 0x08, "a data descriptor"
        names.append(data[pos + 30:pos + 30 + name_len].decode())
        pos += 30 + name_len + extra_len + compressed
    assert data[pos:pos + 4] == b"PK\x01\x02", "no central directory after the local entries"
    return names


def test_build_is_streamed_and_is_the_stored_zip(gateway, main_build):
    """
    The build's answer was streamed (chunked: its length was not known when
    it started), and is the zip the store serves; its local entries, in the
    order written, hold every entry the (sorted) central directory lists.
    """
    response = main_build.response
    assert response.header("Content-Length") is None, response
    assert (response.header("Transfer-Encoding") or "").lower() == "chunked", response
    stored = get(gateway, f"/jmix/api/jmix/{main_build.id}")
    assert stored.status == 200 and stored.body == response.body
    assert int(stored.header("Content-Length")) == len(response.body)
    names = local_entry_names(response.body)
    assert sorted(names) == main_build.package.names
    assert names[:4] == [f"{main_build.id}/schemas/{n}.schema.json" for n in ("audit", "files", "manifest",
                                                                            "metadata")]
    assert names[-4:] == [f"{main_build.id}/{n}" for n in ("payload/metadata.json", "payload/files.json",
                                                           "manifest.json", "audit.json")]
    # The store keeps the zip alone (no unpacked copy), nothing in its work areas.
    assert (gateway.store / f"{main_build.id}.zip").is_file()
    assert not (gateway.store / main_build.id).exists()
    assert not [p for p in _tree(gateway.store) if p.startswith(".staging/")]


def test_head_of_a_build_waits_for_the_package(gateway, studies):
    """
    HEAD on the query route builds (once) and answers with the finished
    package's length; the GET that follows is served from the store.
    """
    study = studies.studies["head"]
    builds = builds_logged(gateway)
    head = get(gateway, f"/jmix/api/jmix?studyInstanceUid={study.uid}", method="HEAD")
    assert head.status == 200 and head.body == b"", head
    package_id = assert_zip_response(head)
    assert builds_logged(gateway) == builds + 1
    response = build(gateway, study.uid)
    assert assert_zip_response(response) == package_id
    assert head.header("Content-Length") == str(len(response.body)) == response.header("Content-Length")
    assert builds_logged(gateway) == builds + 1
    assert len(Package(response.body).dicom()) == 2


def test_package_files_match_the_shipped_schemas(main_build):
    """
    The package ships Harmony's JSON Schemas under C{schemas/}; its
    documents are valid against them.
    """
    from jsonschema import Draft202012Validator

    package = main_build.package
    for document, schema in (("manifest.json", "manifest"), ("audit.json", "audit"),
                             ("payload/metadata.json", "metadata"), ("payload/files.json", "files")):
        name = f"schemas/{schema}.schema.json"
        assert name in package.files, (name, sorted(package.files))
        validator = Draft202012Validator(package.json(name))
        errors = [e.message for e in validator.iter_errors(package.json(document))]
        assert not errors, (document, errors)


def test_manifest(main_build, studies):
    manifest = main_build.package.manifest
    assert manifest["version"] == "1.0"
    assert manifest["id"] == main_build.id
    assert TIMESTAMP.match(manifest["timestamp"]), manifest["timestamp"]
    sender = manifest["sender"]
    assert sender["name"] == "Harmony JMIX IT"
    assert sender["id"] == "jmix-it"
    assert sender["contact"] == "jmix-it@example.org"
    assert isinstance(manifest["receiver"], list), manifest
    assert SHA256.match(manifest["security"]["payload_hash"]), manifest["security"]
    # No PHI in the manifest.
    text = json.dumps(manifest)
    for phi in (studies.patient, studies.patient_name.split("^")[0], "1980", main_build.study.uid):
        assert phi not in text, (phi, manifest)


def test_manifest_has_a_requester(main_build):
    """
    The issue's format has C{requester:{...}} without the C{?} it gives
    optional members (C{classification?}, C{extensions?}).
    """
    manifest = main_build.package.manifest
    assert isinstance(manifest.get("requester"), dict), manifest


def test_audit(main_build):
    audit = main_build.package.json("audit.json")["audit"]
    assert audit and audit[0]["event"] == "created", audit
    assert set(audit[0]["by"]) >= {"id", "name"}, audit[0]
    assert TIMESTAMP.match(audit[0]["timestamp"]), audit[0]


def test_metadata(main_build, studies):
    metadata = main_build.package.metadata
    study = main_build.study
    assert metadata["version"] and metadata["id"] and TIMESTAMP.match(metadata["timestamp"]), metadata
    patient = metadata["patient"]
    assert patient["id"] == studies.patient
    assert patient["name"]["family"] == studies.patient_name.split("^")[0]
    assert patient["name"]["given"][:1] == ["ALPHA"], patient["name"]
    assert patient["dob"] in ("1980-03-14", "19800314"), patient
    assert patient["sex"] == "F", patient
    assert isinstance(patient.get("identifiers"), list), patient
    record = metadata["studies"]
    assert record["study_uid"] == study.uid
    assert record["study_description"] == study.description
    series = {s["series_uid"]: s for s in record["series"]}
    assert set(series) == {s.uid for s in study.series}
    for expected in study.series:
        got = series[expected.uid]
        assert got["modality"] == expected.modality, got
        assert got["instance_count"] == len(expected.sops) == 5, got
        if "body_part" in got:
            assert got["body_part"] == expected.body_part, got


def test_files_listing_and_payload_hash(main_build):
    package = main_build.package
    payload = package.payload()
    listing = package.listing
    listed = {entry["file"]: entry for entry in listing}
    assert len(listed) == len(listing), "files.json repeats a file"
    # Every DICOM file is listed (and only they: the "dicom/<name>").
    assert set(listed) == set(package.dicom()), (sorted(listed), sorted(payload))
    for name, entry in listed.items():
        assert entry["size_bytes"] == len(payload[name]), entry
        assert entry["hash"] == sha256(payload[name]), entry
    assert package.manifest["security"]["payload_hash"] == payload_hash(payload)


def test_dicom_files_are_orthanc_s(main_build, studies):
    """
    Every DICOM file of the package is the instance Orthanc holds: the data
    set byte for byte, the same transfer syntax and SOP Instance UID in the
    file meta.  (The rest of the Part 10 header is written by the
    receiver of the C-GET, not copied from Orthanc.)
    """
    dicom = main_build.package.dicom()
    seen = set()
    for name, data in dicom.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        sop = str(ds.SOPInstanceUID)
        assert sop in main_build.orthanc, (name, sop)
        assert sop not in seen, (name, "duplicate instance")
        seen.add(sop)
        ours_meta, ours = split_part10(data)
        theirs_meta, theirs = split_part10(main_build.orthanc[sop])
        assert ours == theirs, (name, "data set differs from Orthanc's")
        for tag in (0x00020002, 0x00020003, 0x00020010):
            assert ours_meta[tag].rstrip(b"\0 ") == theirs_meta[tag].rstrip(b"\0 "), (name, hex(tag))
    assert seen == set(main_build.orthanc) == {sop for s in main_build.study.series for sop in s.sops}


def test_build_by_c_move_has_the_same_payload(main_build, gateway):
    """
    A dicom_scu backend in move mode builds the same package (Orthanc
    C-MOVEs the study to Harmony's own store SCP).
    """
    response = build(gateway, main_build.study.uid, prefix="jmix-move")
    moved = Package(response.body if response.status == 200 else b"")
    assert assert_zip_response(response) != main_build.id
    assert moved.payload() == main_build.package.payload()
    assert moved.manifest["security"]["payload_hash"] == main_build.package.manifest["security"]["payload_hash"]


def test_rebuild_has_the_same_payload(main_build, gateway):
    """
    Another store builds the same study again: other id and timestamps,
    the same payload bytes and payload hash.
    """
    response = build(gateway, main_build.study.uid, prefix="jmix-again")
    again = Package(response.body if response.status == 200 else b"")
    assert assert_zip_response(response) != main_build.id
    first, second = main_build.package, again
    assert second.payload().keys() == first.payload().keys()
    differing = []
    for name, data in first.payload().items():
        if second.payload()[name] != data:
            differing.append(name)
    assert not differing, f"payload files differ between builds: {differing}"
    assert second.manifest["security"]["payload_hash"] == first.manifest["security"]["payload_hash"]


def test_second_request_is_served_from_the_store(gateway, studies, orthanc):
    """
    Built once, the study is removed from Orthanc: the next request still
    gets the same package (the PACS was not asked; it would say 404 now).
    """
    study = studies.studies["cached"]
    first = build(gateway, study.uid)
    package_id = assert_zip_response(first)
    orthanc_delete_study(orthanc, study.uid)
    builds = builds_logged(gateway)
    second = build(gateway, study.uid)
    assert assert_zip_response(second) == package_id
    assert second.body == first.body
    assert builds_logged(gateway) == builds
    # The same study through another store has to ask the PACS: 404 now.
    assert_json_error(build(gateway, study.uid, prefix="jmix-again"), 404)


def test_package_routes(gateway, main_build):
    base = f"/jmix/api/jmix/{main_build.id}"
    response = get(gateway, base)
    assert assert_zip_response(response) == main_build.id
    assert response.body == main_build.response.body
    assert int(response.header("Content-Length")) == len(response.body)
    response = get(gateway, f"/jmix/api/jmix/{main_build.id.upper()}")
    assert response.status == 200, response
    manifest = get(gateway, base + "/manifest")
    assert manifest.status == 200, manifest
    assert manifest.header("Content-Type").split(";")[0] == "application/json"
    assert manifest.json() == main_build.package.manifest


def test_package_head(gateway, main_build):
    """
    HEAD describes the GET answer: same type, disposition and length.
    """
    head = get(gateway, f"/jmix/api/jmix/{main_build.id}", method="HEAD")
    assert head.status == 200, head
    assert head.body == b""
    assert head.header("Content-Type").startswith("application/zip")
    assert head.header("Content-Disposition") == main_build.response.header("Content-Disposition")
    assert head.header("Content-Length") == str(len(main_build.response.body)), head
    head = get(gateway, f"/jmix/api/jmix/{main_build.id}/manifest", method="HEAD")
    assert head.status == 200 and head.body == b"", head
    missing = get(gateway, f"/jmix/api/jmix/{uuid.uuid4()}", method="HEAD")
    assert (missing.status, missing.body) == (404, b""), missing  # a HEAD answer has no body


def test_json_listing(gateway, main_build):
    response = get(gateway, f"/jmix/api/jmix?studyInstanceUid={main_build.study.uid}",
                   headers=[("Accept", "application/json")])
    assert response.status == 200, response
    assert response.header("Content-Type").split(";")[0] == "application/json"
    packages = {p["id"]: p for p in response.json()["packages"]}
    # (test_upload_round_trip may have added an upload of it.)
    assert main_build.id in packages and len(packages) <= 2, packages
    assert packages[main_build.id]["payload_hash"] == main_build.package.manifest["security"]["payload_hash"]
    assert packages[main_build.id]["size"] == len(main_build.response.body)
    assert packages[main_build.id]["study_uid"] == main_build.study.uid
    # A study without packages: an empty list, nothing built.
    response = get(gateway, f"/jmix/api/jmix?studyInstanceUid={generate_uid()}",
                   headers=[("Accept", "application/json")])
    assert response.status == 200 and response.json()["packages"] == [], response


def test_concurrent_requests_build_once(gateway, studies):
    study = studies.studies["concurrent"]
    builds = builds_logged(gateway)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: build(gateway, study.uid), range(10)))
    assert builds_logged(gateway) == builds + 1
    ids = {assert_zip_response(r) for r in responses}
    assert len(ids) == 1, ids
    assert len({r.body for r in responses}) == 1
    listing = get(gateway, f"/jmix/api/jmix?studyInstanceUid={study.uid}", headers=[("Accept", "application/json")])
    assert [p["id"] for p in listing.json()["packages"]] == list(ids), listing
    assert len(Package(responses[0].body).dicom()) == 6


@pytest.mark.parametrize("key, params", [
    ("skip_hashing", "&skip_hashing=true"),
    ("skip_listing", "&skip_listing=true"),
    ("skip_both", "&skip_hashing=true&skip_listing=true"),
])
def test_skip_options(gateway, studies, key, params):
    study = studies.studies[key]
    response = build(gateway, study.uid, params=params)
    assert_zip_response(response)
    package = Package(response.body)
    payload = package.payload()
    listing = package.listing
    assert len(package.dicom()) == 2, sorted(payload)
    if "skip_listing" in params:
        assert [entry["file"] for entry in listing] == ["metadata.json"], listing
    else:
        assert {entry["file"] for entry in listing} == set(package.dicom()), listing
    for entry in listing:
        assert entry["size_bytes"] == len(payload[entry["file"]]), entry
        if "skip_hashing" in params:
            assert entry["hash"] is None, entry
        else:
            assert entry["hash"] == sha256(payload[entry["file"]]), entry
    # The payload hash is computed whatever is skipped (Harmony's choice).
    assert package.manifest["security"]["payload_hash"] == payload_hash(payload)


# -- errors --------------------------------------------------------------------------


def test_stores_are_opened_at_startup(gateway):
    """
    A jmix endpoint's store (its index, the clean-up of what crashed
    processes left) is opened when Harmony starts, not by the first
    request: the idle endpoint was never asked anything.
    """
    index = gateway.directory / "store-idle" / "index.sqlite3"
    deadline = time.monotonic() + 10
    while not index.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert index.is_file()
    assert (gateway.directory / "store-idle" / ".locks").is_dir()


def test_unknown_package_is_404(gateway):
    missing = str(uuid.uuid4())
    for path in (f"/jmix/api/jmix/{missing}", f"/jmix/api/jmix/{missing}/manifest"):
        assert_json_error(get(gateway, path), 404)


@pytest.mark.parametrize("bad", ["not-a-uuid", "0f8fad5b-d9cb-469f-a165-70867728950", "..%2f..%2fetc"])
def test_bad_package_id_is_400(gateway, bad):
    assert_json_error(get(gateway, f"/jmix/api/jmix/{bad}"), 400)


def test_bad_study_uid_is_400(gateway):
    assert_json_error(get(gateway, "/jmix/api/jmix?studyInstanceUid=1.2.x"), 400)
    assert_json_error(get(gateway, "/jmix/api/jmix"), 400)


def test_study_not_on_the_pacs_is_404(gateway):
    assert_json_error(build(gateway, generate_uid()), 404)


def test_pacs_down_is_502(gateway):
    started = time.monotonic()
    assert_json_error(build(gateway, generate_uid(), prefix="jmix-down"), 502)
    assert time.monotonic() - started < 10


# -- upload --------------------------------------------------------------------------


def test_upload_duplicate_is_409(gateway, main_build):
    assert_json_error(upload(gateway, main_build.response.body), 409)


def test_upload_round_trip(gateway, main_build):
    new_id, body = repackage(main_build.package)
    response = upload(gateway, body)
    assert response.status == 201, response
    assert response.json() == {"id": new_id, "status": "stored"}
    fetched = get(gateway, f"/jmix/api/jmix/{new_id}")
    assert assert_zip_response(fetched) == new_id
    package = Package(fetched.body)
    assert package.payload() == main_build.package.payload()
    assert package.manifest["id"] == new_id
    manifest = get(gateway, f"/jmix/api/jmix/{new_id}/manifest")
    assert manifest.status == 200 and manifest.json()["id"] == new_id, manifest
    # The study now has two packages.
    listing = get(gateway, f"/jmix/api/jmix?studyInstanceUid={main_build.study.uid}",
                  headers=[("Accept", "application/json")])
    assert {p["id"] for p in listing.json()["packages"]} == {main_build.id, new_id}, listing
    # And a second upload of it is a conflict.
    assert_json_error(upload(gateway, body), 409)


def test_upload_tampered_dicom_is_400_naming_the_file(gateway, main_build):
    victim = sorted(main_build.package.dicom())[3]

    def tamper(files):
        data = bytearray(files["payload/" + victim])
        data[-1] ^= 0xFF
        files["payload/" + victim] = bytes(data)

    new_id, body = repackage(main_build.package, change=tamper)
    body_json = assert_json_error(upload(gateway, body), 400)
    assert victim in body_json["message"], body_json
    assert_json_error(get(gateway, f"/jmix/api/jmix/{new_id}"), 404)


def test_upload_payload_hash_mismatch_is_400(gateway, main_build):
    def rehash(files):
        manifest = json.loads(files["manifest.json"])
        manifest["security"]["payload_hash"] = "sha256:" + "0" * 64
        files["manifest.json"] = json.dumps(manifest).encode()

    new_id, body = repackage(main_build.package, change=rehash)
    assert_json_error(upload(gateway, body), 400)
    assert_json_error(get(gateway, f"/jmix/api/jmix/{new_id}"), 404)


def _tree(directory):
    return {str(p.relative_to(directory)) for p in Path(directory).rglob("*")}


@pytest.mark.parametrize("entry", ["../evil.txt", "{id}/../../evil.txt", "{id}/payload/../../../../evil.txt"])
def test_upload_zip_slip_is_400(gateway, main_build, entry):
    before = _tree(gateway.directory)
    new_id = str(uuid.uuid4())
    _, body = repackage(main_build.package, new_id=new_id, extra=[(entry.format(id=new_id), b"pwned")])
    assert_json_error(upload(gateway, body), 400)
    after = _tree(gateway.directory)
    assert not [p for p in after - before if "evil" in p], sorted(after - before)
    for directory in (gateway.directory, gateway.directory.parent, gateway.store.parent):
        assert not (directory / "evil.txt").exists()
    assert not list(Path(gateway.directory.parent).rglob("evil.txt"))
    assert_json_error(get(gateway, f"/jmix/api/jmix/{new_id}"), 404)


def test_upload_not_a_zip_is_415(gateway, main_build):
    assert_json_error(upload(gateway, b'{"id": 1}', content_type="application/json"), 415)


def test_upload_garbage_zip_is_400(gateway):
    assert_json_error(upload(gateway, b"PK\x03\x04 this is not a zip at all"), 400)


def test_upload_too_big_is_413(gateway):
    assert_json_error(upload(gateway, os.urandom(MAX_BODY + 1)), 413)
    # The gateway is still serving.
    assert_json_error(get(gateway, f"/jmix/api/jmix/{uuid.uuid4()}"), 404)


def test_no_upload_leftovers(gateway, main_build):
    """
    After the uploads above (refused or stored), nothing is left in the
    store's temporary areas.
    """
    leftovers = [p for p in _tree(gateway.store) if p.startswith((".upload/", ".staging/"))]
    assert not leftovers, leftovers

