"""
Tests for L{harmony.jmix.zipwriter}: the append-only zip writer of JMIX
packages, read back by C{zipfile} (central directory), by walking the
local headers as a streaming reader does, and by Info-ZIP's C{unzip -t}
when it is installed; ZIP64 with the limits lowered.
"""

import os
import struct
import subprocess
import zipfile
import zlib

import pytest

from harmony.jmix import zipwriter
from harmony.jmix.zipwriter import ZipAppender


def add_path(writer, name, path, in_memory=False):
    with open(path, "rb") as f:
        data = f.read()
        return writer.add_file(name, f.fileno(), len(data), zlib.crc32(data), data if in_memory else None)


def local_entries(path):
    """
    What a streaming reader sees: (name, method, crc, data) per local
    header, front to back, with the sizes the local headers give (ZIP64
    extra fields included).
    """
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while data[pos:pos + 4] == b"PK\x03\x04":
        (_, _, _, flags, method, _, _, crc, compressed, size, name_len,
         extra_len) = struct.unpack_from("<4s2B4HL2L2H", data, pos)
        assert flags & 0x08 == 0  # never a data descriptor
        name = data[pos + 30:pos + 30 + name_len].decode()
        extra = data[pos + 30 + name_len:pos + 30 + name_len + extra_len]
        if size == 0xFFFFFFFF:
            tag, length, size, compressed = struct.unpack_from("<HHQQ", extra)
            assert (tag, length) == (1, 16)
        start = pos + 30 + name_len + extra_len
        body = data[start:start + compressed]
        out.append((name, method, crc, zlib.decompress(body, -15) if method == 8 else body))
        pos = start + compressed
    assert data[pos:pos + 4] == b"PK\x01\x02"  # then the central directory
    return out


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, size in (("b.dcm", 70000), ("a.dcm", 3), ("c.dcm", 0)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        paths[name] = str(path)
    return paths


def build(tmp_path, files):
    writer = ZipAppender(str(tmp_path / "out.zip"))
    writer.add_bytes("top/z.json", b'{"z": 1}\n' * 50)
    offsets = {}
    for name in ("b.dcm", "a.dcm", "c.dcm"):
        offsets[name] = add_path(writer, "top/payload/" + name, files[name], in_memory=name == "a.dcm")
    writer.add_bytes("top/m.json", b"{}\n", deflate=False)
    size = writer.close()
    return writer, offsets, size


def test_entries_in_order_written_directory_sorted(tmp_path, files):
    writer, offsets, size = build(tmp_path, files)
    path = str(tmp_path / "out.zip")
    assert size == os.path.getsize(path) == writer.offset
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == sorted(["top/z.json", "top/payload/b.dcm", "top/payload/a.dcm",
                                        "top/payload/c.dcm", "top/m.json"])
        for name in ("a.dcm", "b.dcm", "c.dcm"):
            with open(files[name], "rb") as f:
                assert zf.read("top/payload/" + name) == f.read()
        assert zf.read("top/z.json") == b'{"z": 1}\n' * 50
        infos = {i.filename: i for i in zf.infolist()}
        assert infos["top/z.json"].compress_type == zipfile.ZIP_DEFLATED
        assert infos["top/m.json"].compress_type == zipfile.ZIP_STORED
        assert infos["top/payload/b.dcm"].compress_type == zipfile.ZIP_STORED
        for info in infos.values():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
            assert info.create_system == 3
    assert [e[0] for e in local_entries(path)] == ["top/z.json", "top/payload/b.dcm", "top/payload/a.dcm",
                                                   "top/payload/c.dcm", "top/m.json"]
    for name, method, crc, data in local_entries(path):
        assert zlib.crc32(data) == crc, name
    # The offsets returned are where each file's bytes are.
    with open(path, "rb") as f:
        whole = f.read()
    for name, offset in offsets.items():
        with open(files[name], "rb") as f:
            expected = f.read()
        assert whole[offset:offset + len(expected)] == expected
    assert [(name, offset) for name, offset, _ in writer.entries() if name.endswith(".dcm")] == [
        ("top/payload/" + n, offsets[n]) for n in ("b.dcm", "a.dcm", "c.dcm")
    ]


def test_info_zip_reads_it(tmp_path, files):
    build(tmp_path, files)
    result = subprocess.run(["unzip", "-t", str(tmp_path / "out.zip")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout


def test_zip64_when_over_the_limits(tmp_path, files, monkeypatch):
    """
    With the limits lowered, sizes, offsets and the entry count overflow:
    ZIP64 extra fields and end records, read back by zipfile and by the
    local headers.
    """
    monkeypatch.setattr(zipwriter, "ZIP64_LIMIT", 1000)
    monkeypatch.setattr(zipwriter, "ZIP_FILECOUNT_LIMIT", 3)
    writer, _, size = build(tmp_path, files)
    path = str(tmp_path / "out.zip")
    with open(path, "rb") as f:
        data = f.read()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        for name in ("a.dcm", "b.dcm", "c.dcm"):
            with open(files[name], "rb") as f:
                assert zf.read("top/payload/" + name) == f.read()
        big = zf.getinfo("top/payload/b.dcm")
        assert big.file_size == 70000 and big.extract_version == 45
    for name, method, crc, body in local_entries(path):
        assert zlib.crc32(body) == crc, name
    # Info-ZIP (installed by scripts/setup --test) reads ZIP64 too.
    result = subprocess.run(["unzip", "-t", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_duplicate_names_and_writes_after_close_refused(tmp_path):
    writer = ZipAppender(str(tmp_path / "x.zip"))
    writer.add_bytes("t/a.json", b"{}")
    with pytest.raises(ValueError):
        writer.add_bytes("t/a.json", b"{}")
    writer.close()
    assert writer.close() == writer.offset
    with pytest.raises(ValueError):
        writer.add_bytes("t/b.json", b"{}")
    with zipfile.ZipFile(str(tmp_path / "x.zip")) as zf:
        assert zf.namelist() == ["t/a.json"]


def test_a_file_shorter_than_announced(tmp_path):
    path = tmp_path / "short.dcm"
    path.write_bytes(b"12345")
    writer = ZipAppender(str(tmp_path / "x.zip"))
    with open(path, "rb") as f:
        with pytest.raises(ValueError):
            writer.add_file("t/short.dcm", f.fileno(), 10, 0)
        with pytest.raises(ValueError):
            writer.add_file("t/other.dcm", f.fileno(), 10, 0, b"12345")
    writer.abort()
    assert not os.path.exists(tmp_path / "x.zip")
    writer.abort()


def test_existing_file_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        ZipAppender(str(tmp_path / "x.zip"))
    assert (tmp_path / "x.zip").read_bytes() == b"keep"


def test_utf8_names_are_flagged(tmp_path):
    writer = ZipAppender(str(tmp_path / "x.zip"))
    writer.add_bytes("t/é.json", b"{}")
    writer.close()
    with zipfile.ZipFile(str(tmp_path / "x.zip")) as zf:
        info = zf.infolist()[0]
        assert info.filename == "t/é.json" and info.flag_bits & 0x800
