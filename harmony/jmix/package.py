# -*- test-case-name: tests.unit.test_jmix_package -*-
"""
Build a JMIX package from the DICOM Part 10 files of one study, as a zip
written once, front to back.

Everything here is synchronous (file I/O and hashing): callers on the
reactor run it in a thread pool (C{deferToThreadPool}), one call at a time
per builder; except L{PackageBuilder.add} of a small instance given as
bytes with its UIDs (hashing it and appending it to the zip in the page
cache, about a millisecond per MiB), which the JMIX builder does on the
reactor thread (L{harmony.middleware.jmix_builder}).

A package (issue 7, "build exactly this") is the zip C{<id>.zip} whose
entries are, under C{<id>/}::

    manifest.json          no patient data; security.payload_hash
    audit.json             {"audit": [{"event": "created", "by": {id, name}, "timestamp"}]}
    payload/
      metadata.json        patient + study + series summary
      files.json           [{"file": "dicom/<series>/<sop>.dcm", "hash", "size_bytes"}]
      dicom/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    schemas/               Harmony's JSON Schemas (audit, files, manifest,
                           metadata .schema.json), so a recipient can validate

No unpacked copy is written: the zip is the package.

L{PackageBuilder} builds it incrementally, as the instances arrive (from a
retrieve, say):

  - L{PackageBuilder.add} takes one instance file: it reads it once, and
    from that one read takes the UIDs (a minimal tag walk over the
    beginning of the data set, L{harmony.storage.dicom}; pydicom only for
    files the walk cannot read), computes the file's SHA-256 and the zip's
    CRC-32, and appends the stored zip entry
    C{payload/dicom/<series>/<sop>.dcm} to the zip.  Checks, for every
    instance before it is written: one study, valid UIDs (which name the
    entry: no path traversal), no duplicate SOP Instance UID; a problem
    raises C{ValueError} (the caller then aborts the package).  The input
    file is read, never moved or changed.
  - L{PackageBuilder.finish} reads the header of the first instance of each
    series back from the zip (pydicom, C{stop_before_pixels}: pixel data is
    never loaded) for C{metadata.json}, computes the payload hash in one
    pass over the instances in path order (read back from the zip, which is
    in the page cache), and appends C{metadata.json}, C{files.json},
    C{manifest.json}, C{audit.json}, then the central directory.

Choices:

  - B{Deterministic payload.} Rebuilding the same study (same files, in any
    order) gives byte-identical C{payload/} files and so the same payload
    hash: the metadata C{id} is C{uuid5(NAMESPACE_OID, study_uid)}, its
    C{timestamp} is StudyDate/StudyTime (read as UTC;
    C{1970-01-01T00:00:00Z} when StudyDate is absent or malformed, midnight
    when only StudyTime is), patient and study values come from the first
    instance in (series UID, SOP UID) order, series are sorted by UID, the
    listing by path, and JSON is written with sorted keys, two-space
    indent, UTF-8 and a trailing newline.  Only C{manifest.json} and
    C{audit.json} (the package id and "now") differ.
  - B{Payload hash}: every file under C{payload/} sorted by its relative
    path (C{/}-separated; code-point order, which is UTF-8 byte order);
    SHA-256 over, per file, the UTF-8 path, C{"\\n"}, then the file bytes.
    It is computed even with C{skip_hashing} (which only nulls the per-file
    hashes in C{files.json}, and saves their computation) so every Harmony
    package stays verifiable.
  - C{skip_listing}: C{files.json} lists only C{metadata.json}.
  - B{Zip} (L{harmony.jmix.zipwriter}): the local entries are in the order
    written (the schemas first, the instances as they came, the JSON
    documents last) and final as soon as written (no data descriptors,
    nothing patched afterwards: L{PackageBuilder.committed} bytes can be
    sent while the rest is written); the central directory lists the
    entries sorted by name.  Every entry is dated 1980-01-01 00:00:00 with
    mode 0644; JSON is deflated, everything else (DICOM) stored.  ZIP64
    when needed.
  - B{Memory and copies}: files are read through read-only mappings of the
    page cache (L{MAP_WINDOW} at most at a time, unmapped at once), so the
    hashes and the CRC read the bytes where they are and the zip entry is
    written from there; an instance larger than the window is hashed
    window by window, then copied into the zip by the kernel.  An instance
    given as bytes (held in memory by the retrieve) is written from them.
  - Absent DICOM values are C{null} in metadata.json (C{body_part} is
    omitted); C{sex} keeps the DICOM codes C{M}/C{F}/C{O}; C{dob} is
    C{YYYY-MM-DD}; C{identifiers} holds PatientID (with IssuerOfPatientID as
    C{system}) then the Other Patient IDs Sequence.
  - C{manifest.json} omits C{requester} when there is none and
    C{security.classification} when none is given.

Error messages never contain patient data (no UIDs: input files are named
by their index, in the order they were given).
"""

import contextlib
import datetime
import errno
import hashlib
import importlib.resources
import io
import json
import mmap
import os
import re
import uuid
import zipfile

import attr
from pydicom import dcmread

from harmony.jmix.zipwriter import ZipAppender, crc32
from harmony.storage.dicom import NeedMoreData, check_uid, uids_from_dataset_prefix

VERSION = "1.0"

#: Names of Harmony's JSON Schemas (C{<name>.schema.json}), shipped in every package under C{schemas/}.
SCHEMA_NAMES = ("audit", "files", "manifest", "metadata")

#: Fixed timestamp of every zip entry.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

#: metadata.json timestamp when the study has no usable StudyDate.
EPOCH_TIMESTAMP = "1970-01-01T00:00:00Z"

#: Files are read through read-only mappings of at most this many bytes:
#: instances up to this size are read once.
MAP_WINDOW = 4 << 20

_CHUNK = 1 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
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
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


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
    What a build built.

    @ivar id: the package id (a lowercase UUID string).
    @ivar study_uid: the Study Instance UID.
    @ivar zip_path: the package's zip.
    @ivar payload_hash: C{"sha256:<hex>"} (or C{None} for a package without one).
    @ivar size: the zip's size in bytes.
    @ivar instance_count: the number of DICOM instances in the payload.
    @ivar timestamp: the manifest timestamp (C{YYYY-MM-DDTHH:MM:SSZ}).
    """

    id = attr.ib()
    study_uid = attr.ib()
    zip_path = attr.ib()
    payload_hash = attr.ib()
    size = attr.ib()
    instance_count = attr.ib()
    timestamp = attr.ib(default=None)


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
        (any directory), relative to it, sorted (payload hash order).
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
    Compute the payload hash of an unpacked C{payload_dir} (see the module
    docstring).

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


def build_metadata(study_uid, series):
    """
    @param series: C{(series UID, instance count, header dataset of its
        first instance in SOP Instance UID order)} per series of the study.
    @return: the metadata.json object (deterministic for the same study):
        series sorted by UID; patient and study values from the first
        instance of the first series.
    """
    series = sorted(series, key=lambda s: s[0])
    first = series[0][2]
    entries = []
    for series_uid, count, ds in series:
        entry = {"series_uid": series_uid, "modality": _text(ds, "Modality"), "instance_count": count}
        body_part = _text(ds, "BodyPartExamined")
        if body_part is not None:
            entry["body_part"] = body_part
        entries.append(entry)
    return {
        "version": VERSION,
        "id": str(uuid.uuid5(uuid.NAMESPACE_OID, study_uid)),
        "timestamp": _study_timestamp(first),
        "patient": _patient(first),
        "studies": {
            "study_uid": study_uid,
            "study_description": _text(first, "StudyDescription"),
            "series": entries,
        },
    }


# -- reading instances ---------------------------------------------------------


@contextlib.contextmanager
def _mapped(fd, offset, size):
    """
    The C{size} bytes of the open file C{fd} at C{offset}, as a memoryview
    valid inside the C{with}: a read-only mapping of the page cache (no
    copy; unmapped afterwards, so the process's resident size grows by at
    most C{size}), or the bytes read when the file cannot be mapped.

    @raise ValueError: the file ends before.
    """
    if size == 0:
        yield memoryview(b"")
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, offset + size - start, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ,
                            offset=start)
    except (OSError, ValueError):
        mapping = None
    if mapping is None:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError("a file ended before its announced size")
        yield memoryview(data)
        return
    if os.fstat(fd).st_size < offset + size:
        mapping.close()
        raise ValueError("a file ended before its announced size")
    view = memoryview(mapping)[offset - start:]
    try:
        yield view
    finally:
        view.release()
        try:
            mapping.close()
        except BufferError:  # a view of it is still referenced: unmapped when collected
            pass


def _header_uids(head, complete):
    """
    The (study, series, SOP instance) UIDs of a Part 10 file from its first
    bytes (C{complete}: the whole file), by a tag walk; C{None} when the
    walk cannot tell (then pydicom reads the file).
    """
    from harmony.dimse.scu import read_part10_header

    try:
        meta = read_part10_header(head)
        return uids_from_dataset_prefix(head[meta.dataset_offset:], meta.transfer_syntax, final=complete)
    except (ValueError, NeedMoreData):
        return None


def _pydicom_header(source, index):
    try:
        return dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        raise ValueError(
            "input file %d is not a readable DICOM Part 10 file (%s)" % (index, type(e).__name__)
        ) from None


def _checked_uids(values, index):
    out = []
    for keyword, value in zip(_UID_KEYWORDS, values):
        value = None if value is None else str(value).strip().strip("\x00").strip() or None
        if value is None:
            raise ValueError("input file %d has no %s" % (index, keyword))
        check_uid(value, keyword)
        out.append(value)
    return out


class _Window(io.RawIOBase):
    """
    C{size} bytes of an open file from C{start}, as a file of their own.
    """

    #: No file name (pydicom looks for one).
    name = ""

    def __init__(self, fd, start, size):
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        n = max(0, min(len(b), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self):
        return self._pos


# -- building ---------------------------------------------------------------


def _party(value):
    if isinstance(value, Party):
        return value.to_dict()
    return {key: item for key, item in dict(value).items() if item is not None}


class _Series:
    __slots__ = ("count", "first_sop", "first_rel")

    def __init__(self, sop, rel):
        self.count = 0
        self.first_sop = sop
        self.first_rel = rel


class _Entry:
    """
    Where an instance goes in the package: C{rel} under payload/, the zip
    entry C{name}; its series and SOP Instance UIDs.
    """

    __slots__ = ("rel", "name", "series_uid", "sop_uid")

    def __init__(self, rel, name, series_uid, sop_uid):
        self.rel = rel
        self.name = name
        self.series_uid = series_uid
        self.sop_uid = sop_uid


class PackageBuilder:
    """
    Builds one package into a new zip at C{zip_path} (see the module
    docstring): L{add} each instance, then L{finish}; or L{abort}.  Not
    thread-safe: call one method at a time (from any thread).

    @param zip_path: where the zip is written (created: it must not exist).
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

    @ivar id: the package id.
    @ivar entries_end: after L{finish}, the offset where the central
        directory starts (the end of the last entry).
    @raise ValueError: a bad package id.
    @raise FileExistsError: C{zip_path} exists.
    """

    def __init__(
        self,
        zip_path,
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
        self.id = canonical_id(package_id) if package_id is not None else str(uuid.uuid4())
        now = now if now is not None else datetime.datetime.now(datetime.timezone.utc)
        self.timestamp = format_timestamp(now)
        self.skip_hashing = skip_hashing
        self.skip_listing = skip_listing
        self._sender = _party(sender)
        manifest = {
            "version": VERSION,
            "id": self.id,
            "timestamp": self.timestamp,
            "sender": self._sender,
            "receiver": [_party(r) for r in receivers],
            "security": {},
        }
        if requester is not None:
            manifest["requester"] = _party(requester)
        if classification is not None:
            manifest["security"]["classification"] = classification
        if extensions is not None:
            manifest["extensions"] = dict(extensions)
        self._manifest = manifest
        self._top = self.id + "/"
        self._study_uid = None
        #: relative path under payload/ -> (input index, data offset in the zip, size, sha256 hex or None)
        self._instances = {}
        self._sops = set()
        self._series = {}
        self._broken = False
        self.entries_end = None
        self._zip = ZipAppender(zip_path)
        try:
            for name in SCHEMA_NAMES:
                self._zip.add_bytes(self._top + "schemas/%s.schema.json" % (name,), schema_bytes(name))
        except BaseException:
            self._zip.abort()
            raise

    @property
    def zip_path(self):
        return self._zip.path

    @property
    def committed(self):
        """
        How many bytes at the start of the zip are written and final.
        """
        return self._zip.offset

    @property
    def instance_count(self):
        return len(self._instances)

    def _check_usable(self):
        if self._broken:
            raise ValueError("the package build failed already")
        if self._zip.closed:
            raise ValueError("the package is finished")

    def add(self, source, uids=None):
        """
        Add one instance: a DICOM Part 10 file (a path; read, not changed)
        or its bytes (bytes-like).  C{uids}: its (study, series, SOP
        instance) UIDs when the caller read them from this very data set
        with L{harmony.storage.dicom.uids_from_dataset_prefix} (a retrieve
        does, as it receives an instance): the tag walk is not done twice.
        They are checked as the walk's would be.

        @return: L{committed} after it.
        @raise ValueError: not DICOM, another study, an invalid or
            duplicate UID; the builder is then unusable (L{abort} it).
        """
        self._check_usable()
        index = len(self._instances)
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                self._add_bytes(memoryview(source), index, uids)
            else:
                self._add(source, index, uids)
        except BaseException:
            self._broken = True
            raise
        return self._zip.offset

    def _add_bytes(self, data, index, uids):
        size = len(data)
        if uids is None and size:
            uids = _header_uids(data[:MAP_WINDOW], MAP_WINDOW >= size)
        entry = self._entry(uids, lambda: io.BytesIO(data), index)
        own = None if self.skip_hashing else hashlib.sha256(data)
        offset = self._zip.add_file(entry.name, None, size, crc32(data), data)
        self._record(entry, index, offset, size, own)

    def _add(self, path, index, uids):
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            first = min(size, MAP_WINDOW)
            own = None if self.skip_hashing else hashlib.sha256()
            with _mapped(fd, 0, first) as head:
                if uids is None and first:
                    uids = _header_uids(head, first == size)
                entry = self._entry(uids, lambda: path, index)
                if own is not None:
                    own.update(head)
                crc = crc32(head)
                if first == size:
                    # The usual case: the whole file at once.
                    offset = self._zip.add_file(entry.name, fd, size, crc, head)
            if first < size:
                # Larger than the map window: hashed window by window now, then
                # copied into the zip from the file.
                position = first
                while position < size:
                    with _mapped(fd, position, min(MAP_WINDOW, size - position)) as chunk:
                        if own is not None:
                            own.update(chunk)
                        crc = crc32(chunk, crc)
                        position += len(chunk)
                offset = self._zip.add_file(entry.name, fd, size, crc)
        self._record(entry, index, offset, size, own)

    def _entry(self, uids, source, index):
        """
        Check an instance's UIDs (C{uids} from the header walk, or
        C{None}: read by pydicom from C{source()}) against the package:
        its L{_Entry}.
        """
        if uids is None:
            ds = _pydicom_header(source(), index)
            uids = [ds.get(keyword) for keyword in _UID_KEYWORDS]
        study_uid, series_uid, sop_uid = _checked_uids(uids, index)
        if self._study_uid is None:
            self._study_uid = study_uid
        elif study_uid != self._study_uid:
            raise ValueError("input files belong to more than one study")
        if sop_uid in self._sops:
            raise ValueError("input file %d: duplicate SOP Instance UID" % (index,))
        rel = "dicom/%s/%s.dcm" % (series_uid, sop_uid)
        return _Entry(rel, self._top + "payload/" + rel, series_uid, sop_uid)

    def _record(self, entry, index, offset, size, own):
        rel, series_uid, sop_uid = entry.rel, entry.series_uid, entry.sop_uid
        self._sops.add(sop_uid)
        self._instances[rel] = (index, offset, size, None if own is None else own.hexdigest())
        series = self._series.get(series_uid)
        if series is None:
            series = self._series[series_uid] = _Series(sop_uid, rel)
        elif sop_uid < series.first_sop:
            series.first_sop, series.first_rel = sop_uid, rel
        series.count += 1

    def finish(self):
        """
        Write C{metadata.json}, C{files.json}, C{manifest.json},
        C{audit.json} and the central directory; close the zip.

        @return: L{PackageInfo}.
        @raise ValueError: no instances, or an instance whose header
            pydicom cannot read.
        """
        self._check_usable()
        if not self._instances:
            raise ValueError("no instances to package")
        try:
            return self._finish()
        except BaseException:
            self._broken = True
            raise

    def _finish(self):
        total = hashlib.sha256()
        listing = []
        with open(self._zip.path, "rb", buffering=0) as f:
            fd = f.fileno()
            series = []
            for series_uid, entry in self._series.items():
                index, offset, size, _ = self._instances[entry.first_rel]
                window = io.BufferedReader(_Window(fd, offset, size), 64 * 1024)
                series.append((series_uid, entry.count, _pydicom_header(window, index)))
            metadata = dumps(build_metadata(self._study_uid, series))
            # The payload hash: one pass over the instances in path order
            # ("dicom/..." sorts before files.json and metadata.json, which
            # are hashed last), read back from the zip.  Path order is not
            # (series, SOP) order when one UID is a prefix of another
            # ("1.2/" > "1.2.3/").
            for rel in sorted(self._instances):
                _, offset, size, digest = self._instances[rel]
                total.update(rel.encode("utf-8") + b"\n")
                end = offset + size
                while offset < end:
                    with _mapped(fd, offset, min(MAP_WINDOW, end - offset)) as chunk:
                        total.update(chunk)
                        offset += len(chunk)
                listing.append({"file": rel, "hash": None if digest is None else "sha256:" + digest,
                                "size_bytes": size})
        if self.skip_listing:
            digest = None if self.skip_hashing else "sha256:" + hashlib.sha256(metadata).hexdigest()
            listing = [{"file": "metadata.json", "hash": digest, "size_bytes": len(metadata)}]
        files_json = dumps(listing)
        for rel, data in (("files.json", files_json), ("metadata.json", metadata)):
            total.update(rel.encode("utf-8") + b"\n")
            total.update(data)
        digest = "sha256:" + total.hexdigest()
        self._manifest["security"]["payload_hash"] = digest
        audit = {
            "audit": [
                {
                    "event": "created",
                    "by": {"id": self._sender["id"], "name": self._sender["name"]},
                    "timestamp": self.timestamp,
                }
            ]
        }
        for rel, data in (
            ("payload/metadata.json", metadata),
            ("payload/files.json", files_json),
            ("manifest.json", dumps(self._manifest)),
            ("audit.json", dumps(audit)),
        ):
            self._zip.add_bytes(self._top + rel, data)
        self.entries_end = self._zip.offset
        size = self._zip.close()
        return PackageInfo(
            id=self.id,
            study_uid=self._study_uid,
            zip_path=self._zip.path,
            payload_hash=digest,
            size=size,
            instance_count=len(self._instances),
            timestamp=self.timestamp,
        )

    def abort(self):
        """
        Give the package up: close and remove its zip.  Idempotent.
        """
        self._broken = True
        self._zip.abort()


def place(source, target):
    """
    Give a finished zip its final name C{target} without ever replacing a
    file there (a hard link, then the source name goes; a rename when the
    file system has no hard links).

    @raise FileExistsError: C{target} exists.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "package zip already exists") from None
        os.rename(source, target)
        return
    os.remove(source)


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
    Build C{<out_root>/<id>.zip} from the DICOM Part 10 files of one study
    in one go (a L{PackageBuilder}; the zip is written as
    C{<id>.zip.part} and renamed when complete).

    @param files: paths of the instances (read, not changed).
    @param out_root: the directory that receives the zip (created if missing).
    @return: L{PackageInfo}.
    @raise ValueError: bad input (not DICOM, several studies, invalid or
        duplicate UIDs, no files, bad package id): nothing is left behind.
    @raise FileExistsError: the package zip already exists.
    """
    package_id = canonical_id(package_id) if package_id is not None else str(uuid.uuid4())
    os.makedirs(out_root, exist_ok=True)
    zip_path = os.path.join(out_root, package_id + ".zip")
    if os.path.lexists(zip_path):
        raise FileExistsError(errno.EEXIST, "package zip already exists", zip_path)
    builder = PackageBuilder(
        zip_path + ".part", package_id, sender=sender, requester=requester, receivers=receivers,
        skip_hashing=skip_hashing, skip_listing=skip_listing, classification=classification, now=now,
        extensions=extensions,
    )
    try:
        for path in files:
            builder.add(path)
        info = builder.finish()
        place(info.zip_path, zip_path)
    except BaseException:
        builder.abort()
        raise
    return attr.evolve(info, zip_path=zip_path)


def read_manifest(zip_path_or_dir):
    """
    Read a package's C{manifest.json} from its zip (the entry
    C{<id>/manifest.json}, read alone) or an unpacked package directory.

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
