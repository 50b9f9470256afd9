# -*- test-case-name: tests.unit.test_jmix_validate -*-
"""
Check JMIX packages received from elsewhere: safe zip extraction and
package validation. Pure and synchronous; callers on the reactor run these
in a thread pool.

L{safe_extract} unpacks an uploaded zip into a directory the caller owns
and refuses, with L{harmony.errors.BadRequest}, anything that could write
outside it or exhaust the disk: entries with absolute paths, C{..} or C{.}
segments, backslashes, drive letters or colons, control characters,
symlinks and other special files, encrypted entries, duplicate names, more
than C{max_files} entries, a declared or an actual (counted while
extracting) uncompressed total over C{max_bytes}, and entries not all under
one top-level C{<id>/} directory. Files are created with C{O_EXCL |
O_NOFOLLOW} below a freshly created C{<dest>/<id>/}, which is removed again
when extraction fails.

L{validate_package} checks an unpacked package against Harmony's JSON
Schemas (Draft 2020-12, L{load_schema}) and its hashes, and returns the
reasons it is invalid (an empty list when it is valid). Reasons name the
package file and the JSON path (C{payload/files.json: $[3].hash: ...}) but
never carry values from the documents, so they hold no patient data; file
names are quoted only when they are made of UID-like characters.
"""

import importlib.resources
import json
import os
import re
import shutil
import stat
import zipfile
import zlib

from jsonschema import Draft202012Validator

from harmony.errors import BadRequest
from harmony.jmix.package import SCHEMA_NAMES, canonical_id, payload_hash, tree_files

_CHUNK = 1 << 20
_MAX_REASONS = 50
_MAX_SCHEMA_ERRORS = 20

REQUIRED_FILES = (
    ("manifest.json", "manifest"),
    ("audit.json", "audit"),
    ("payload/metadata.json", "metadata"),
    ("payload/files.json", "files"),
)

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*\Z")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


# -- schemas ----------------------------------------------------------------


def load_schema(name):
    """
    @param name: C{"manifest"}, C{"metadata"}, C{"files"} or C{"audit"}
        (C{"manifest.schema.json"} is accepted too).
    @return: Harmony's JSON Schema for that file, a fresh dict.
    """
    if name.endswith(".schema.json"):
        name = name[: -len(".schema.json")]
    if name not in SCHEMA_NAMES:
        raise ValueError("unknown schema %r" % (name,))
    resource = importlib.resources.files("harmony.jmix").joinpath("schemas", name + ".schema.json")
    return json.loads(resource.read_text(encoding="utf-8"))


_validators = {}


def _validator(name):
    validator = _validators.get(name)
    if validator is None:
        validator = _validators[name] = Draft202012Validator(load_schema(name))
    return validator


def _describe(error):
    """
    Describe a schema error from the schema side only (never the instance's
    values, which may be patient data).
    """
    kind, expected = error.validator, error.validator_value
    if kind == "required":
        instance = error.instance if isinstance(error.instance, dict) else {}
        missing = [p for p in expected if p not in instance]
        return "missing required property " + ", ".join(repr(p) for p in missing)
    if kind == "type":
        return "expected type %s" % (" or ".join(expected) if isinstance(expected, list) else expected,)
    if kind == "additionalProperties":
        allowed = set(error.schema.get("properties", ()))
        extra = sorted(k for k in error.instance if k not in allowed) if isinstance(error.instance, dict) else []
        named = [repr(k) for k in extra if _SAFE_NAME.match(k) and len(k) <= 64]
        return "unexpected propert%s %s" % ("y" if len(extra) == 1 else "ies", ", ".join(named) or "(unnamed)")
    if kind in ("const", "enum"):
        return "expected %s %s" % ("one of" if kind == "enum" else "the value", json.dumps(expected))
    if kind == "pattern":
        return "does not match the pattern %s" % (expected,)
    if kind in ("oneOf", "anyOf"):
        return "matches none of the allowed forms"
    return "fails %s %s" % (kind, json.dumps(expected))


def schema_reasons(document, name, label):
    """
    @return: the reasons C{document} does not match schema C{name}, each
        prefixed with C{label} and the JSON path.
    """
    errors = sorted(
        _validator(name).iter_errors(document), key=lambda e: (list(map(str, e.absolute_path)), e.validator)
    )
    reasons = ["%s: %s: %s" % (label, e.json_path, _describe(e)) for e in errors[:_MAX_SCHEMA_ERRORS]]
    if len(errors) > _MAX_SCHEMA_ERRORS:
        reasons.append("%s: %d more schema errors" % (label, len(errors) - _MAX_SCHEMA_ERRORS))
    return reasons


# -- extraction ---------------------------------------------------------------


def _entry_parts(info):
    name = info.filename
    if not name or _BAD_CHARS.search(name) or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BadRequest("unsafe path in zip file")
    is_dir = name.endswith("/")
    parts = (name[:-1] if is_dir else name).split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest("unsafe path in zip file")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        raise BadRequest("zip file contains a link or special file")
    if info.flag_bits & 0x1:
        raise BadRequest("zip file contains an encrypted entry")
    return parts, is_dir or info.is_dir()


def safe_extract(zip_path, dest_dir, max_bytes, max_files):
    """
    Extract the package zip C{zip_path} into C{dest_dir} (see the module
    docstring for what is refused).

    @param dest_dir: an existing (preferably empty) directory owned by the
        caller; C{<dest_dir>/<id>} must not exist yet.
    @param max_bytes: the largest total uncompressed size accepted.
    @param max_files: the most entries accepted (directories included).
    @return: the package root C{<dest_dir>/<id>}.
    @raise BadRequest: the zip is not acceptable.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise BadRequest("not a zip file") from None
    with zf:
        infos = zf.infolist()
        if not infos:
            raise BadRequest("empty zip file")
        if len(infos) > max_files:
            raise BadRequest("zip file has more than %d entries" % (max_files,))
        entries = []
        seen = set()
        top = None
        declared = 0
        for info in infos:
            parts, is_dir = _entry_parts(info)
            if top is None:
                top = parts[0]
            if parts[0] != top or (not is_dir and len(parts) < 2):
                raise BadRequest("zip entries must all be under one top-level directory")
            key = "/".join(parts)
            if key in seen:
                raise BadRequest("zip file has duplicate entries")
            seen.add(key)
            declared += info.file_size
            if declared > max_bytes:
                raise BadRequest("zip content is larger than %d bytes" % (max_bytes,))
            entries.append((info, parts, is_dir))

        dest = os.path.realpath(dest_dir)
        root = os.path.join(dest, top)
        os.mkdir(root)
        try:
            _extract(zf, entries, dest, max_bytes)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return root


def _extract(zf, entries, dest, max_bytes):
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for info, parts, is_dir in entries:
        target = os.path.join(dest, *parts)
        parent = target if is_dir else os.path.dirname(target)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError:
            raise BadRequest("zip file has conflicting entries") from None
        if not os.path.realpath(parent).startswith(dest + os.sep):
            raise BadRequest("unsafe path in zip file")
        if is_dir:
            continue
        try:
            fd = os.open(target, flags, 0o644)
        except OSError:
            raise BadRequest("zip file has conflicting entries") from None
        written = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with zf.open(info) as src:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        written += len(chunk)
                        total += len(chunk)
                        if written > info.file_size or total > max_bytes:
                            raise BadRequest("zip content is larger than declared or allowed")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
                raise BadRequest("corrupt zip file") from None
        if written != info.file_size:
            raise BadRequest("corrupt zip file")


# -- validation ---------------------------------------------------------------


def _label(rel):
    return rel if _SAFE_NAME.match(rel) else "a file with an unusual name"


def _regular(path):
    return os.path.isfile(path) and not os.path.islink(path)


def _load_json(root, rel, reasons):
    path = os.path.join(root, *rel.split("/"))
    if not _regular(path):
        reasons.append("%s: missing" % (rel,))
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        reasons.append("%s: not UTF-8" % (rel,))
    except json.JSONDecodeError as e:
        reasons.append("%s: not valid JSON (line %d column %d)" % (rel, e.lineno, e.colno))
    return None


def validate_package(root):
    """
    Validate the unpacked package at C{root} (its directory name is the
    package id).

    Checks: the required files exist and parse; each matches its schema;
    the manifest id equals the directory name and is a canonical UUID; every
    C{files.json} entry exists under C{payload/} with the listed size and
    (when not null) SHA-256; no file under C{payload/} is unlisted unless
    the listing holds C{metadata.json} alone (a C{skip_listing} package);
    the recomputed payload hash equals C{manifest.security.payload_hash}.

    @return: the reasons the package is invalid; empty when it is valid.
    """
    reasons = []
    if not os.path.isdir(root) or os.path.islink(root):
        return ["package root is not a directory"]
    package_id = os.path.basename(os.path.normpath(root))
    docs = {}
    for rel, name in REQUIRED_FILES:
        doc = _load_json(root, rel, reasons)
        if doc is None:
            continue
        problems = schema_reasons(doc, name, rel)
        reasons.extend(problems)
        docs[name] = None if problems else doc

    manifest = docs.get("manifest")
    if manifest is not None:
        try:
            canonical_id(package_id)
            if manifest["id"] != package_id:
                reasons.append("manifest.json: $.id: does not match the package directory name")
        except ValueError:
            reasons.append("package directory name is not a UUID")

    payload = os.path.join(root, "payload")
    listing = docs.get("files")
    if listing is not None and os.path.isdir(payload):
        reasons.extend(_check_payload(payload, listing, manifest))
    if len(reasons) > _MAX_REASONS:
        reasons[_MAX_REASONS:] = ["%d more reasons" % (len(reasons) - _MAX_REASONS,)]
    return reasons


def _check_payload(payload, listing, manifest):
    reasons = []
    listed = {}
    for index, entry in enumerate(listing):
        if entry["file"] in listed:
            reasons.append("payload/files.json: $[%d].file: listed twice" % (index,))
        listed[entry["file"]] = entry
    try:
        present = tree_files(payload)
    except ValueError as e:
        return reasons + ["payload: %s" % (e,)]
    present_set = set(present)
    for rel in sorted(listed):
        if rel not in present_set:
            reasons.append("payload/%s: missing" % (_label(rel),))
    skip_listing = list(listed) == ["metadata.json"]
    if not skip_listing:
        for rel in present:
            if rel not in listed and rel not in ("files.json", "metadata.json"):
                reasons.append("payload/%s: not listed in files.json" % (_label(rel),))

    def on_file(rel, hexdigest, size):
        entry = listed.get(rel)
        if entry is None:
            return
        if entry["size_bytes"] != size:
            reasons.append("payload/%s: size mismatch (listed %d, found %d)" % (_label(rel), entry["size_bytes"], size))
        elif entry["hash"] is not None and entry["hash"] != "sha256:" + hexdigest:
            reasons.append("payload/%s: sha256 mismatch" % (_label(rel),))

    digest = payload_hash(payload, on_file)
    if manifest is not None and manifest["security"]["payload_hash"] != digest:
        reasons.append("manifest.json: $.security.payload_hash: does not match the payload")
    return reasons
