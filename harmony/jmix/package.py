# -*- test-case-name: tests.unit.test_jmix_package -*-
"""
Build a JMIX package from the DICOM Part 10 files of one study, and zip it.

Everything here is pure and synchronous (file I/O and hashing): callers on
the reactor run it in a thread pool (C{deferToThreadPool}).

Layout written by L{build_package} under C{out_root} (issue 7, "build
exactly this")::

    <id>/
      manifest.json        no patient data; security.payload_hash
      audit.json           {"audit": [{"event": "created", "by": {id, name}, "timestamp"}]}
      payload/
        metadata.json      patient + study + series summary
        files.json         [{"file": "dicom/<series>/<sop>.dcm", "hash", "size_bytes"}]
        dicom/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
      schemas/             Harmony's JSON Schemas (audit, files, manifest,
                           metadata .schema.json), so a recipient can validate
    <id>.zip               the same tree, entries "<id>/..."

Choices:

  - B{Input files are moved, not copied.} Every input file's header is read
    first (C{dcmread(stop_before_pixels=True, specific_tags=...)}: pixel
    data is never loaded) and checked: one study, valid UIDs, no duplicate
    SOP Instance UIDs. A problem found there raises C{ValueError} before any
    file is touched. Then the files are moved with C{os.replace} (copy +
    remove across filesystems) to C{payload/dicom/<series>/<sop>.dcm}; the
    names come from UIDs checked by L{harmony.storage.dicom.check_uid}, so
    no path traversal is possible. From that point the caller's spool is
    consumed whether the build succeeds or fails (on failure the partial
    C{<id>/} and zip are removed, moved instances with them; instances not
    yet moved stay where they were).
  - B{Deterministic payload.} Rebuilding the same study (same files) gives
    byte-identical C{payload/} files and so the same payload hash: the
    metadata C{id} is C{uuid5(NAMESPACE_OID, study_uid)}, its C{timestamp}
    is StudyDate/StudyTime (read as UTC; C{1970-01-01T00:00:00Z} when
    StudyDate is absent or malformed, midnight when only StudyTime is),
    patient and study values come from the first instance in (series UID,
    SOP UID) order, series are sorted by UID, and JSON is written with
    sorted keys, two-space indent, UTF-8 and a trailing newline. Only
    C{manifest.json} and C{audit.json} (the package id and "now") differ.
  - B{Payload hash}: every file under C{payload/} sorted by its relative
    path (C{/}-separated; code-point order, which is UTF-8 byte order);
    SHA-256 over, per file, the UTF-8 path, C{"\\n"}, then the file bytes.
    It is computed even with C{skip_hashing} (which only nulls the per-file
    hashes in C{files.json}) so every Harmony package stays verifiable.
    Building reads each instance once for both the per-file and the payload
    hash.
  - C{skip_listing}: C{files.json} lists only C{metadata.json}.
  - B{Zip}: entries sorted by name, all dated 1980-01-01 00:00:00, mode
    0644, JSON deflated, everything else (DICOM) stored; written entry by
    entry in 1 MiB chunks (bounded memory, ZIP64 when needed) to a temporary
    name and renamed into place.
  - Absent DICOM values are C{null} in metadata.json (C{body_part} is
    omitted); C{sex} keeps the DICOM codes C{M}/C{F}/C{O}; C{dob} is
    C{YYYY-MM-DD}; C{identifiers} holds PatientID (with IssuerOfPatientID as
    C{system}) then the Other Patient IDs Sequence.
  - C{manifest.json} omits C{requester} when there is none and
    C{security.classification} when none is given.

Error messages never contain patient data (UIDs and counts only).
"""

import datetime
import errno
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import uuid
import zipfile

import attr
from pydicom import dcmread

from harmony.storage.dicom import check_uid

VERSION = "1.0"

#: Names of Harmony's JSON Schemas (C{<name>.schema.json}), shipped in every package under C{schemas/}.
SCHEMA_NAMES = ("audit", "files", "manifest", "metadata")

#: Fixed timestamp of every zip entry.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

#: metadata.json timestamp when the study has no usable StudyDate.
EPOCH_TIMESTAMP = "1970-01-01T00:00:00Z"

_CHUNK = 1 << 20
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_MANIFEST_MAX_BYTES = 1 << 20

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
]


@attr.s(frozen=True, slots=True)
class Party:
    """
    A sender, requester or receiver of a package.

    @ivar name: display name.
    @ivar id: stable identifier.
    @ivar contact: optional contact (a string such as an e-mail address, or
        a JSON object); omitted from the JSON when C{None}.
    """

    name = attr.ib()
    id = attr.ib()
    contact = attr.ib(default=None)

    def to_dict(self):
        """
        @return: the JSON object (C{name}, C{id}, and C{contact} when set).
        """
        out = {"name": self.name, "id": self.id}
        if self.contact is not None:
            out["contact"] = self.contact
        return out


@attr.s(frozen=True, slots=True)
class PackageInfo:
    """
    What L{build_package} built.

    @ivar id: the package id (a lowercase UUID string).
    @ivar study_uid: the Study Instance UID.
    @ivar directory: the package directory C{<out_root>/<id>}.
    @ivar zip_path: the zip C{<out_root>/<id>.zip}.
    @ivar payload_hash: C{"sha256:<hex>"} (or C{None} for a package without one).
    @ivar size: the zip's size in bytes.
    @ivar instance_count: the number of DICOM instances in the payload.
    @ivar timestamp: the manifest timestamp (C{YYYY-MM-DDTHH:MM:SSZ}).
    """

    id = attr.ib()
    study_uid = attr.ib()
    directory = attr.ib()
    zip_path = attr.ib()
    payload_hash = attr.ib()
    size = attr.ib()
    instance_count = attr.ib()
    timestamp = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class _Instance:
    path = attr.ib()
    series_uid = attr.ib()
    sop_uid = attr.ib()
    dataset = attr.ib()


# -- small helpers --------------------------------------------------------


def dumps(obj):
    """
    @return: the deterministic UTF-8 JSON encoding used for every package
        file (sorted keys, two-space indent, trailing newline).
    """
    return (json.dumps(obj, sort_keys=True, indent=2, separators=(",", ": "), ensure_ascii=False) + "\n").encode(
        "utf-8"
    )


def canonical_id(value):
    """
    @return: C{value} when it is a UUID in canonical form (lowercase,
        hyphenated).
    @raise ValueError: otherwise.
    """
    try:
        canonical = str(uuid.UUID(value))
    except (TypeError, ValueError, AttributeError):
        raise ValueError("package id must be a UUID") from None
    if canonical != value:
        raise ValueError("package id must be a lowercase hyphenated UUID")
    return value


def schema_bytes(name):
    """
    @param name: one of L{SCHEMA_NAMES}.
    @return: the bytes of Harmony's C{<name>.schema.json}.
    """
    if name not in SCHEMA_NAMES:
        raise ValueError("unknown schema %r" % (name,))
    return importlib.resources.files("harmony.jmix").joinpath("schemas", name + ".schema.json").read_bytes()


def format_timestamp(when):
    """
    @param when: a datetime; naive values are taken as UTC.
    @return: C{YYYY-MM-DDTHH:MM:SSZ} in UTC.
    """
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime(_TIMESTAMP_FORMAT)


def tree_files(payload_dir):
    """
    @return: the C{/}-separated paths of every file under C{payload_dir}
        (any directory), relative to it, sorted (payload hash and zip order).
    @raise ValueError: when the tree holds a symlink or a special file.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(payload_dir):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise ValueError("payload contains a symbolic link")
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                raise ValueError("payload contains a special file")
            found.append(os.path.relpath(full, payload_dir).replace(os.sep, "/"))
    found.sort()
    return found


def _feed(path, *hashers):
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return size
            size += len(chunk)
            for h in hashers:
                h.update(chunk)


def payload_hash(payload_dir, on_file=None):
    """
    Compute the payload hash of C{payload_dir} (see the module docstring).

    @param on_file: optional C{callable(relpath, sha256_hex, size)} called
        for each file as it is hashed (one read serves both hashes).
    @return: C{"sha256:<hex>"}.
    """
    total = hashlib.sha256()
    for rel in tree_files(payload_dir):
        total.update(rel.encode("utf-8") + b"\n")
        if on_file is None:
            _feed(os.path.join(payload_dir, *rel.split("/")), total)
        else:
            own = hashlib.sha256()
            size = _feed(os.path.join(payload_dir, *rel.split("/")), total, own)
            on_file(rel, own.hexdigest(), size)
    return "sha256:" + total.hexdigest()


# -- DICOM header -> metadata.json ---------------------------------------


def _text(ds, keyword):
    value = ds.get(keyword)
    if value is None:
        return None
    value = str(value).strip().strip("\x00").strip()
    return value or None


def _read_header(path, index):
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        raise ValueError(
            "input file %d is not a readable DICOM Part 10 file (%s)" % (index, type(e).__name__)
        ) from None
    uids = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = _text(ds, keyword)
        if value is None:
            raise ValueError("input file %d has no %s" % (index, keyword))
        check_uid(value, keyword)
        uids.append(value)
    return uids[0], _Instance(path=path, series_uid=uids[1], sop_uid=uids[2], dataset=ds)


def _study_timestamp(ds):
    date = _text(ds, "StudyDate") or ""
    if not re.fullmatch(r"[0-9]{8}", date):
        return EPOCH_TIMESTAMP
    time = _text(ds, "StudyTime") or ""
    match = re.fullmatch(r"([0-9]{2})([0-9]{2})?([0-9]{2})?(?:\.[0-9]{0,6})?", time)
    hms = [int(part or 0) for part in match.groups()] if match else [0, 0, 0]
    try:
        when = datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:]), *hms)
    except ValueError:
        try:
            when = datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:]))
        except ValueError:
            return EPOCH_TIMESTAMP
    return when.strftime(_TIMESTAMP_FORMAT)


def _patient_name(ds):
    pn = ds.get("PatientName")
    if pn is None or not str(pn).strip():
        return {"family": None, "given": [], "text": None}
    family = pn.family_name.strip() or None
    given = pn.given_name.split() + pn.middle_name.split()
    parts = [pn.name_prefix.strip(), " ".join(given), family or "", pn.name_suffix.strip()]
    text = " ".join(p for p in parts if p) or None
    return {"family": family, "given": given, "text": text}


def _identifiers(ds):
    out = []
    pid = _text(ds, "PatientID")
    if pid is not None:
        entry = {"value": pid}
        issuer = _text(ds, "IssuerOfPatientID")
        if issuer is not None:
            entry["system"] = issuer
        out.append(entry)
    for item in ds.get("OtherPatientIDsSequence") or ():
        value = _text(item, "PatientID")
        if value is None:
            continue
        entry = {"value": value}
        issuer = _text(item, "IssuerOfPatientID")
        if issuer is not None:
            entry["system"] = issuer
        out.append(entry)
    return out


def _patient(ds):
    dob = _text(ds, "PatientBirthDate") or ""
    if re.fullmatch(r"[0-9]{8}", dob):
        dob = "%s-%s-%s" % (dob[:4], dob[4:6], dob[6:])
    else:
        dob = None
    sex = _text(ds, "PatientSex")
    return {
        "id": _text(ds, "PatientID"),
        "name": _patient_name(ds),
        "dob": dob,
        "sex": sex if sex in ("M", "F", "O") else None,
        "identifiers": _identifiers(ds),
    }


def build_metadata(study_uid, instances):
    """
    @param instances: the study's L{_Instance}s sorted by (series, SOP) UID.
    @return: the metadata.json object (deterministic for the same study).
    """
    first = instances[0].dataset
    series = []
    by_series = {}
    for inst in instances:
        by_series.setdefault(inst.series_uid, []).append(inst)
    for series_uid in sorted(by_series):
        members = by_series[series_uid]
        entry = {
            "series_uid": series_uid,
            "modality": _text(members[0].dataset, "Modality"),
            "instance_count": len(members),
        }
        body_part = _text(members[0].dataset, "BodyPartExamined")
        if body_part is not None:
            entry["body_part"] = body_part
        series.append(entry)
    return {
        "version": VERSION,
        "id": str(uuid.uuid5(uuid.NAMESPACE_OID, study_uid)),
        "timestamp": _study_timestamp(first),
        "patient": _patient(first),
        "studies": {
            "study_uid": study_uid,
            "study_description": _text(first, "StudyDescription"),
            "series": series,
        },
    }


# -- building ---------------------------------------------------------------


def _party(value):
    if isinstance(value, Party):
        return value.to_dict()
    return {key: item for key, item in dict(value).items() if item is not None}


def _move(src, dst):
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)
        os.remove(src)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _scan(files):
    study_uid = None
    instances = []
    seen = set()
    for index, path in enumerate(files):
        uid, inst = _read_header(path, index)
        if study_uid is None:
            study_uid = uid
        elif uid != study_uid:
            raise ValueError("input files belong to more than one study")
        if inst.sop_uid in seen:
            raise ValueError("duplicate SOP Instance UID %s" % (inst.sop_uid,))
        seen.add(inst.sop_uid)
        instances.append(inst)
    if not instances:
        raise ValueError("no instances to package")
    instances.sort(key=lambda i: (i.series_uid, i.sop_uid))
    return study_uid, instances


def build_package(
    files,
    out_root,
    package_id=None,
    sender=Party("Harmony", "harmony"),
    requester=None,
    receivers=(),
    skip_hashing=False,
    skip_listing=False,
    classification=None,
    now=None,
    extensions=None,
):
    """
    Build C{<out_root>/<id>/} and C{<out_root>/<id>.zip} from the DICOM
    Part 10 files of one study (see the module docstring).

    @param files: paths of the instances; they are B{moved} into the package.
    @param out_root: the directory that receives the package (created if missing).
    @param package_id: the package id (canonical UUID string); a new
        C{uuid4} when C{None}.
    @param sender: a L{Party} (or a mapping with C{name}, C{id}, C{contact}).
    @param requester: a L{Party}/mapping or C{None} (omitted).
    @param receivers: L{Party}s/mappings (C{manifest.receiver}).
    @param skip_hashing: C{files.json} hashes are C{null} (the payload hash
        is still computed).
    @param skip_listing: C{files.json} lists only C{metadata.json}.
    @param classification: optional C{security.classification}.
    @param now: the creation time (a datetime; naive = UTC); now if C{None}.
    @param extensions: optional JSON object for C{manifest.extensions}
        (must not carry patient data).
    @return: L{PackageInfo}.
    @raise ValueError: bad input (not DICOM, several studies, invalid or
        duplicate UIDs, bad package id); raised before any file is moved.
    @raise FileExistsError: the package directory or zip already exists.
    """
    package_id = canonical_id(package_id) if package_id is not None else str(uuid.uuid4())
    now = now if now is not None else datetime.datetime.now(datetime.timezone.utc)
    timestamp = format_timestamp(now)
    sender_dict = _party(sender)
    manifest = {
        "version": VERSION,
        "id": package_id,
        "timestamp": timestamp,
        "sender": sender_dict,
        "receiver": [_party(r) for r in receivers],
        "security": {},
    }
    if requester is not None:
        manifest["requester"] = _party(requester)
    if classification is not None:
        manifest["security"]["classification"] = classification
    if extensions is not None:
        manifest["extensions"] = dict(extensions)

    study_uid, instances = _scan(list(files))

    os.makedirs(out_root, exist_ok=True)
    directory = os.path.join(out_root, package_id)
    zip_path = os.path.join(out_root, package_id + ".zip")
    if os.path.lexists(zip_path):
        raise FileExistsError(errno.EEXIST, "package zip already exists", zip_path)
    os.mkdir(directory)
    try:
        payload = os.path.join(directory, "payload")
        dicom_dir = os.path.join(payload, "dicom")
        os.makedirs(dicom_dir)
        for inst in instances:
            series_dir = os.path.join(dicom_dir, inst.series_uid)
            os.makedirs(series_dir, exist_ok=True)
            _move(inst.path, os.path.join(series_dir, inst.sop_uid + ".dcm"))

        metadata = dumps(build_metadata(study_uid, instances))
        _write(os.path.join(payload, "metadata.json"), metadata)

        # One pass over the instances feeds both the per-file hashes and
        # the payload hash; "dicom/..." sorts before files.json and
        # metadata.json, which are hashed last.
        total = hashlib.sha256()
        listing = []
        # Hash order is the relative path's order, which is not (series, SOP)
        # order when one UID is a prefix of another ("1.2/" > "1.2.3/").
        for rel in sorted("dicom/%s/%s.dcm" % (inst.series_uid, inst.sop_uid) for inst in instances):
            total.update(rel.encode("utf-8") + b"\n")
            own = hashlib.sha256()
            size = _feed(os.path.join(payload, *rel.split("/")), total, own)
            listing.append(
                {"file": rel, "hash": None if skip_hashing else "sha256:" + own.hexdigest(), "size_bytes": size}
            )
        if skip_listing:
            digest = "sha256:" + hashlib.sha256(metadata).hexdigest()
            listing = [{"file": "metadata.json", "hash": None if skip_hashing else digest, "size_bytes": len(metadata)}]
        listing.sort(key=lambda entry: entry["file"])
        files_json = dumps(listing)
        _write(os.path.join(payload, "files.json"), files_json)
        for rel, data in (("files.json", files_json), ("metadata.json", metadata)):
            total.update(rel.encode("utf-8") + b"\n")
            total.update(data)
        digest = "sha256:" + total.hexdigest()

        manifest["security"]["payload_hash"] = digest
        _write(os.path.join(directory, "manifest.json"), dumps(manifest))
        audit = {
            "audit": [
                {
                    "event": "created",
                    "by": {"id": sender_dict["id"], "name": sender_dict["name"]},
                    "timestamp": timestamp,
                }
            ]
        }
        _write(os.path.join(directory, "audit.json"), dumps(audit))
        os.mkdir(os.path.join(directory, "schemas"))
        for name in SCHEMA_NAMES:
            _write(os.path.join(directory, "schemas", name + ".schema.json"), schema_bytes(name))

        size = zip_package(directory, zip_path)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        for leftover in (zip_path, zip_path + ".part"):
            try:
                os.remove(leftover)
            except OSError:
                pass
        raise
    return PackageInfo(
        id=package_id,
        study_uid=study_uid,
        directory=directory,
        zip_path=zip_path,
        payload_hash=digest,
        size=size,
        instance_count=len(instances),
        timestamp=timestamp,
    )


# -- zip ----------------------------------------------------------------------


def zip_package(directory, zip_path):
    """
    Zip the package C{directory} to C{zip_path} with entries
    C{<basename>/...} sorted by name, fixed times and modes, JSON deflated
    and everything else stored, streaming each file. The zip is written to
    C{zip_path + ".part"} and renamed into place.

    @return: the zip's size in bytes.
    @raise ValueError: when the tree holds a symlink or a special file.
    """
    top = os.path.basename(os.path.normpath(directory))
    rels = tree_files(directory)
    tmp = zip_path + ".part"
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for rel in rels:
                src = os.path.join(directory, *rel.split("/"))
                info = zipfile.ZipInfo(top + "/" + rel, date_time=ZIP_DATE_TIME)
                info.create_system = 3
                info.external_attr = (0o100644 & 0xFFFF) << 16
                info.compress_type = zipfile.ZIP_DEFLATED if rel.endswith(".json") else zipfile.ZIP_STORED
                info.file_size = os.path.getsize(src)
                with open(src, "rb") as f, zf.open(info, "w") as out:
                    shutil.copyfileobj(f, out, _CHUNK)
        os.replace(tmp, zip_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return os.path.getsize(zip_path)


def read_manifest(zip_path_or_dir):
    """
    Read a package's C{manifest.json} from its directory or its zip (the
    entry C{<id>/manifest.json}, read alone).

    @return: the manifest as a dict.
    @raise ValueError: no manifest, an oversized one, or not a JSON object.
    """
    if os.path.isdir(zip_path_or_dir):
        path = os.path.join(zip_path_or_dir, "manifest.json")
        if not os.path.isfile(path) or os.path.getsize(path) > _MANIFEST_MAX_BYTES:
            raise ValueError("package has no usable manifest.json")
        with open(path, "rb") as f:
            data = f.read()
    else:
        try:
            with zipfile.ZipFile(zip_path_or_dir) as zf:
                names = [
                    i for i in zf.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/manifest.json")
                ]
                if len(names) != 1 or names[0].file_size > _MANIFEST_MAX_BYTES:
                    raise ValueError("package has no usable manifest.json")
                with zf.open(names[0]) as f:
                    data = f.read(_MANIFEST_MAX_BYTES + 1)
        except zipfile.BadZipFile:
            raise ValueError("not a zip file") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError:
        raise ValueError("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not a JSON object")
    return manifest
