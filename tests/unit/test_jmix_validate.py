"""
Tests for L{harmony.jmix.validate}: Harmony's JSON Schemas, package
validation (schemas, listing, hashes) and safe zip extraction.
"""

import io
import json
import os
import stat
import struct
import uuid
import zipfile
import zlib
from types import SimpleNamespace

import attr
import pytest
from jsonschema import Draft202012Validator
from test_jmix_package import NOW, make_study

from harmony.errors import BadRequest
from harmony.jmix import package
from harmony.jmix.package import build_package
from harmony.jmix.validate import load_schema, safe_extract, validate_package


def unpacked(info, directory):
    """
    A built package (its L{PackageInfo}) with C{directory}: its zip
    unpacked there by C{zipfile} (the package root, named by its id).
    """
    with zipfile.ZipFile(info.zip_path) as zf:
        zf.extractall(directory)
    return SimpleNamespace(**attr.asdict(info), directory=os.path.join(str(directory), info.id))


@pytest.fixture
def built(tmp_path):
    """
    A package built from a generated study, unpacked:
    (L{unpacked}, [(series, sop, spool path)]).
    """
    _, made = make_study(str(tmp_path / "spool"))
    info = build_package([p for _, _, p in made], str(tmp_path / "out"), now=NOW)
    return unpacked(info, tmp_path / "unpacked"), made


def _write_json(path, obj):
    with open(path, "wb") as f:
        f.write(package.dumps(obj))


def _read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def _only_dest(tmp_path):
    """
    An extraction directory inside a parent that is otherwise empty, so
    tests can check that nothing was written next to it.
    """
    parent = tmp_path / "jail"
    dest = parent / "dest"
    dest.mkdir(parents=True)
    return parent, dest


def _all_paths(directory):
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), directory))
    return sorted(out)


def _zip(path, entries):
    """
    Write a zip of C{entries}: (name, data) or (ZipInfo, data).
    """
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return str(path)


# -- schemas ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest", "metadata", "files", "audit"])
def test_schemas_are_valid_draft_2020_12(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert load_schema(name + ".schema.json") == schema


def test_load_schema_unknown():
    with pytest.raises(ValueError):
        load_schema("../package")


def test_load_schema_returns_fresh_copies():
    load_schema("manifest")["required"].append("junk")
    assert "junk" not in load_schema("manifest")["required"]


# -- validate_package ---------------------------------------------------------


def test_valid_package(built):
    info, _ = built
    assert validate_package(info.directory) == []


def test_valid_skip_options(tmp_path):
    for n, options in enumerate(
        [{"skip_hashing": True}, {"skip_listing": True}, {"skip_hashing": True, "skip_listing": True}]
    ):
        _, made = make_study(str(tmp_path / ("spool%d" % n)), series=(("CT_small.dcm", 2, None),))
        info = unpacked(build_package([p for _, _, p in made], str(tmp_path / ("out%d" % n)), **options),
                        tmp_path / ("unpacked%d" % n))
        assert validate_package(info.directory) == []


def test_tampered_dicom_names_file(built):
    info, made = built
    series_uid, sop_uid, _ = made[2]
    rel = "payload/dicom/%s/%s.dcm" % (series_uid, sop_uid)
    path = os.path.join(info.directory, *rel.split("/"))
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    reasons = validate_package(info.directory)
    assert rel + ": sha256 mismatch" in reasons
    assert "manifest.json: $.security.payload_hash: does not match the payload" in reasons
    assert len(reasons) == 2


def test_tampered_without_file_hashes_caught_by_payload_hash(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 2, None),))
    info = unpacked(build_package([p for _, _, p in made], str(tmp_path / "out"), skip_hashing=True),
                    tmp_path / "unpacked")
    path = os.path.join(info.directory, "payload", "dicom", made[0][0], made[0][1] + ".dcm")
    with open(path, "r+b") as f:
        f.seek(300)
        f.write(b"\x00\x01")
    assert validate_package(info.directory) == ["manifest.json: $.security.payload_hash: does not match the payload"]


def test_size_mismatch(built):
    info, made = built
    rel = "payload/dicom/%s/%s.dcm" % (made[0][0], made[0][1])
    with open(os.path.join(info.directory, *rel.split("/")), "ab") as f:
        f.write(b"x")
    reasons = validate_package(info.directory)
    assert any(r.startswith(rel + ": size mismatch") for r in reasons)


def test_manifest_without_version(built):
    info, _ = built
    path = os.path.join(info.directory, "manifest.json")
    manifest = _read_json(path)
    del manifest["version"]
    _write_json(path, manifest)
    assert validate_package(info.directory) == ["manifest.json: $: missing required property 'version'"]


def test_schema_error_paths(built):
    info, _ = built
    path = os.path.join(info.directory, "payload", "files.json")
    listing = _read_json(path)
    listing[1]["hash"] = "md5:abc"
    listing[2]["size_bytes"] = "12"
    _write_json(path, listing)
    reasons = validate_package(info.directory)
    assert "payload/files.json: $[1].hash: matches none of the allowed forms" in reasons
    assert "payload/files.json: $[2].size_bytes: expected type integer" in reasons


def test_reasons_carry_no_patient_data(built):
    info, _ = built
    path = os.path.join(info.directory, "payload", "metadata.json")
    metadata = _read_json(path)
    metadata["patient"]["sex"] = "Doe^John"
    metadata["patient"]["dob"] = 19700203
    metadata["patient"]["name"]["family"] = ["Doe"]
    metadata["patient"]["Doe^John"] = "secret"
    _write_json(path, metadata)
    reasons = validate_package(info.directory)
    assert any(r.startswith("payload/metadata.json: $.patient.sex:") for r in reasons)
    assert any(r.startswith("payload/metadata.json: $.patient.dob:") for r in reasons)
    assert any(r.startswith("payload/metadata.json: $.patient.name.family:") for r in reasons)
    assert any("unexpected property" in r for r in reasons)
    text = "\n".join(reasons)
    assert "Doe" not in text and "John" not in text and "1970" not in text and "secret" not in text


def test_manifest_id_must_match_directory(built, tmp_path):
    info, _ = built
    other = os.path.join(str(tmp_path), str(uuid.uuid4()))
    os.rename(info.directory, other)
    assert validate_package(other) == ["manifest.json: $.id: does not match the package directory name"]
    named = os.path.join(str(tmp_path), "not-a-uuid")
    os.rename(other, named)
    assert validate_package(named) == ["package directory name is not a UUID"]


def test_unlisted_and_missing_files(built):
    info, made = built
    extra = os.path.join(info.directory, "payload", "dicom", made[0][0], "1.2.3.dcm")
    with open(extra, "wb") as f:
        f.write(b"extra")
    gone = "payload/dicom/%s/%s.dcm" % (made[1][0], made[1][1])
    os.remove(os.path.join(info.directory, *gone.split("/")))
    reasons = validate_package(info.directory)
    assert "payload/dicom/%s/1.2.3.dcm: not listed in files.json" % (made[0][0],) in reasons
    assert gone + ": missing" in reasons
    assert "manifest.json: $.security.payload_hash: does not match the payload" in reasons


def test_unusual_names_are_not_quoted(built):
    info, made = built
    extra = os.path.join(info.directory, "payload", "dicom", "Doe John.dcm")
    with open(extra, "wb") as f:
        f.write(b"extra")
    reasons = validate_package(info.directory)
    assert "payload/a file with an unusual name: not listed in files.json" in reasons
    assert "Doe" not in "\n".join(reasons)


def test_skip_listing_allows_unlisted_instances(tmp_path):
    _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 2, None),))
    info = unpacked(build_package([p for _, _, p in made], str(tmp_path / "out"), skip_listing=True),
                    tmp_path / "unpacked")
    with open(os.path.join(info.directory, "payload", "dicom", made[0][0], "9.9.dcm"), "wb") as f:
        f.write(b"more")
    # not an "unlisted" complaint, but the payload hash no longer matches
    assert validate_package(info.directory) == ["manifest.json: $.security.payload_hash: does not match the payload"]


def test_missing_and_broken_required_files(built):
    info, _ = built
    os.remove(os.path.join(info.directory, "audit.json"))
    with open(os.path.join(info.directory, "payload", "metadata.json"), "wb") as f:
        f.write(b'{"version": ')
    reasons = validate_package(info.directory)
    assert "audit.json: missing" in reasons
    assert any(r.startswith("payload/metadata.json: not valid JSON") for r in reasons)


def test_listed_twice(built):
    info, _ = built
    path = os.path.join(info.directory, "payload", "files.json")
    listing = _read_json(path)
    listing.append(listing[0])
    _write_json(path, listing)
    reasons = validate_package(info.directory)
    assert "payload/files.json: $[6].file: listed twice" in reasons


def test_symlink_in_payload(built):
    info, made = built
    os.symlink("/etc/hostname", os.path.join(info.directory, "payload", "dicom", made[0][0], "link.dcm"))
    reasons = validate_package(info.directory)
    assert "payload: payload contains a symbolic link" in reasons


def test_not_a_directory(tmp_path):
    assert validate_package(str(tmp_path / "nothing")) == ["package root is not a directory"]


# -- safe_extract -------------------------------------------------------------


def test_extract_round_trip(built, tmp_path):
    info, _ = built
    parent, dest = _only_dest(tmp_path)
    root = safe_extract(info.zip_path, str(dest), max_bytes=50 << 20, max_files=100)
    assert root == os.path.join(os.path.realpath(str(dest)), info.id)
    assert validate_package(root) == []
    assert os.listdir(str(parent)) == ["dest"]
    with zipfile.ZipFile(info.zip_path) as zf:
        names = zf.namelist()
        for name in names:
            with open(os.path.join(os.path.dirname(root), *name.split("/")), "rb") as f:
                assert f.read() == zf.read(name)
    extracted = [os.path.relpath(os.path.join(d, n), os.path.dirname(root)) for d, _, ns in os.walk(root) for n in ns]
    assert sorted(extracted) == sorted(names)


def test_harmony_zips_with_entries_in_arrival_order_are_accepted(tmp_path):
    """
    Harmony writes a package's local entries in the order the instances
    came and lists them sorted in the central directory: extraction and
    validation take it, whatever the order; tampering with one entry's
    bytes in place (same size, CRC not updated, or updated) is refused.
    """
    _, made = make_study(str(tmp_path / "spool"))
    paths = [p for _, _, p in made]
    for n, order in enumerate((paths, paths[::-1], paths[2:] + paths[:2])):
        info = build_package(order, str(tmp_path / ("out%d" % n)), now=NOW)
        _, dest = _only_dest(tmp_path / ("x%d" % n))
        root = safe_extract(info.zip_path, str(dest), max_bytes=50 << 20, max_files=100)
        assert validate_package(root) == []
    # One byte of an instance flipped inside the zip, in place.
    victim = "%s/payload/dicom/%s/%s.dcm" % (info.id, made[1][0], made[1][1])
    with zipfile.ZipFile(info.zip_path) as zf:
        entry = zf.getinfo(victim)
        start = entry.header_offset + 30 + len(entry.filename.encode())
    with open(info.zip_path, "r+b") as f:
        f.seek(start + entry.file_size - 1)
        byte = f.read(1)
        f.seek(start + entry.file_size - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    _, dest = _only_dest(tmp_path / "flipped")
    with pytest.raises(BadRequest, match="corrupt"):
        safe_extract(info.zip_path, str(dest), max_bytes=50 << 20, max_files=100)
    # The same with its CRC fixed too: extracted, then the hashes refuse it.
    with open(info.zip_path, "rb") as f:
        data = bytearray(f.read())
    body = bytes(data[start:start + entry.file_size])
    crc = struct.pack("<L", zlib.crc32(body))
    data[entry.header_offset + 14:entry.header_offset + 18] = crc
    position = 0
    while True:  # its central directory record
        position = data.index(b"PK\x01\x02", position)
        name_len = struct.unpack_from("<H", data, position + 28)[0]
        if bytes(data[position + 46:position + 46 + name_len]).decode() == victim:
            data[position + 16:position + 20] = crc
            break
        position += 4
    fixed = tmp_path / "fixed.zip"
    fixed.write_bytes(bytes(data))
    _, dest = _only_dest(tmp_path / "fixed")
    root = safe_extract(str(fixed), str(dest), max_bytes=50 << 20, max_files=100)
    assert "payload/dicom/%s/%s.dcm: sha256 mismatch" % (made[1][0], made[1][1]) in validate_package(root)


def test_not_a_zip(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip file at all")
    with pytest.raises(BadRequest, match="not a zip file"):
        safe_extract(str(junk), str(tmp_path), 1 << 20, 10)


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "/abs",
        "/tmp/abs",
        "pkg/../../b",
        "a/../../b",
        "pkg/./x",
        "pkg//x",
        "pkg\\..\\..\\evil",
        "C:/evil",
        "pkg/C:evil",
        "pkg/\x01ctl",
    ],
)
def test_zip_slip_rejected(tmp_path, name):
    parent, dest = _only_dest(tmp_path)
    archive = _zip(tmp_path / "slip.zip", [("pkg/manifest.json", b"{}"), (name, b"pwned")])
    with pytest.raises(BadRequest):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]
    assert not os.path.exists(str(tmp_path / "evil"))


def test_symlink_entry_rejected(tmp_path):
    parent, dest = _only_dest(tmp_path)
    link = zipfile.ZipInfo("pkg/payload/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = _zip(tmp_path / "link.zip", [("pkg/manifest.json", b"{}"), (link, b"../../../../etc/passwd")])
    with pytest.raises(BadRequest):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]


def test_symlink_then_write_through_it_rejected(tmp_path):
    # A classic two-step slip: a symlink directory entry, then a file "through" it.
    parent, dest = _only_dest(tmp_path)
    link = zipfile.ZipInfo("pkg/out")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = _zip(tmp_path / "link2.zip", [(link, str(tmp_path)), ("pkg/out/evil", b"pwned")])
    with pytest.raises(BadRequest):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]
    assert not os.path.exists(str(tmp_path / "evil"))


def test_multiple_top_levels_rejected(tmp_path):
    parent, dest = _only_dest(tmp_path)
    archive = _zip(tmp_path / "two.zip", [("a/manifest.json", b"{}"), ("b/manifest.json", b"{}")])
    with pytest.raises(BadRequest, match="one top-level"):
        safe_extract(archive, str(dest), 1 << 20, 10)
    archive = _zip(tmp_path / "flat.zip", [("manifest.json", b"{}")])
    with pytest.raises(BadRequest, match="one top-level"):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]


def test_too_many_files(tmp_path):
    parent, dest = _only_dest(tmp_path)
    archive = _zip(tmp_path / "many.zip", [("pkg/f%d" % i, b"x") for i in range(11)])
    with pytest.raises(BadRequest, match="more than 10 entries"):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]
    assert safe_extract(archive, str(dest), 1 << 20, 11)


def test_too_big_declared(tmp_path):
    parent, dest = _only_dest(tmp_path)
    # A small zip bomb: 2 MiB of zeros deflates to a few KiB.
    with zipfile.ZipFile(str(tmp_path / "bomb.zip"), "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/zeros", b"\x00" * (2 << 20))
    assert os.path.getsize(str(tmp_path / "bomb.zip")) < 64 << 10
    with pytest.raises(BadRequest, match="larger than"):
        safe_extract(str(tmp_path / "bomb.zip"), str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]


def _lie_about_sizes(data, fake_size):
    """
    Rewrite every central directory and local header's uncompressed size.
    """
    buf = bytearray(data)
    pos = 0
    while True:
        pos = buf.find(b"PK\x01\x02", pos)
        if pos < 0:
            break
        struct.pack_into("<I", buf, pos + 24, fake_size)
        pos += 4
    pos = 0
    while True:
        pos = buf.find(b"PK\x03\x04", pos)
        if pos < 0:
            break
        struct.pack_into("<I", buf, pos + 22, fake_size)
        pos += 4
    return bytes(buf)


def test_actual_bytes_counted_not_just_declared(tmp_path):
    parent, dest = _only_dest(tmp_path)
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/zeros", b"\x00" * (2 << 20))
    liar = tmp_path / "liar.zip"
    liar.write_bytes(_lie_about_sizes(raw.getvalue(), 100))
    with pytest.raises(BadRequest):
        safe_extract(str(liar), str(dest), 1 << 20, 10)
    # the partial extraction was removed
    assert _all_paths(str(parent)) == ["dest"]


def test_total_over_limit_across_entries(tmp_path):
    parent, dest = _only_dest(tmp_path)
    archive = _zip(tmp_path / "sum.zip", [("pkg/a", b"x" * 600), ("pkg/b", b"y" * 600)])
    with pytest.raises(BadRequest):
        safe_extract(archive, str(dest), 1000, 10)
    assert _all_paths(str(parent)) == ["dest"]
    assert safe_extract(archive, str(dest), 1200, 10)


def test_duplicate_entries_rejected(tmp_path):
    parent, dest = _only_dest(tmp_path)
    with pytest.warns(UserWarning):
        archive = _zip(tmp_path / "dup.zip", [("pkg/a", b"1"), ("pkg/a", b"2")])
    with pytest.raises(BadRequest, match="duplicate"):
        safe_extract(archive, str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]


def test_corrupt_entry(tmp_path):
    parent, dest = _only_dest(tmp_path)
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("pkg/a", b"hello world, this is content")
    data = raw.getvalue().replace(b"hello world", b"HELLO WORLD")
    bad = tmp_path / "crc.zip"
    bad.write_bytes(data)
    with pytest.raises(BadRequest, match="corrupt"):
        safe_extract(str(bad), str(dest), 1 << 20, 10)
    assert _all_paths(str(parent)) == ["dest"]


def test_upload_tampered_package_round_trip(built, tmp_path):
    info, made = built
    # Tamper inside the zip: rewrite one DICOM entry with a flipped byte.
    victim = "%s/payload/dicom/%s/%s.dcm" % (info.id, made[4][0], made[4][1])
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(info.zip_path) as src, zipfile.ZipFile(str(tampered), "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == victim:
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(item, data)
    _, dest = _only_dest(tmp_path)
    root = safe_extract(str(tampered), str(dest), 50 << 20, 100)
    reasons = validate_package(root)
    assert "payload/dicom/%s/%s.dcm: sha256 mismatch" % (made[4][0], made[4][1]) in reasons
