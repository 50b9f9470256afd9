"""
Harmony's DICOM SCP (a real twistd process) against DCMTK's echoscu and
storescu, and Harmony's SCU against DCMTK's storescp and Orthanc, all on
127.0.0.1 with free ports.
"""

import io
import os
import socket
import struct
import urllib.request

import pydicom
import pytest
import pytest_twisted
from peers import build_bind_shim, dcmtk, require
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from harmony.dimse import pdu
from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scu import DicomClient, read_part10_header
from harmonytest import free_port, start_harmony, write_config

AET = "HARMONY"
SOURCES = ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm"]
TRAILING_PADDING = 0xFFFCFFFC

BASE = """
[proxy]
id = "dimse-it"
log_level = "info"
[storage.options]
path = "./store"
"""

PIPELINES = """
[pipelines.dicom_in]
endpoints = ["scp", "strict"]
backends = ["sink"]

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "{aet}"
bind_addr = "127.0.0.1"
port = {port}
enable_store = true
storage_dir = "received"

[endpoints.strict]
service = "dicom_scp"
[endpoints.strict.options]
local_aet = "STRICT"
bind_addr = "127.0.0.1"
port = {strict_port}
allowed_calling_aets = ["FRIEND"]
max_associations = 1
max_pdu_length = 16384

[backends.sink]
service = "echo"
"""


_DCMCONV = {
    ImplicitVRLittleEndian: "+ti",
    ExplicitVRLittleEndian: "+te",
    ExplicitVRBigEndian: "+tb",
    DeflatedExplicitVRLittleEndian: "+td",
}


def _variant(source, directory, transfer_syntax, index=0):
    """
    A copy of a pydicom test file with fresh UIDs, converted by DCMTK's
    dcmconv to C{transfer_syntax} (C{None}: kept as it is); C{None} for a
    compressed source that cannot be converted.
    """
    ds = pydicom.dcmread(get_testdata_file(source, download=False))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / f"{source}.{index}.native.dcm"
    ds.save_as(path, enforce_file_format=True)
    if transfer_syntax is None or transfer_syntax == ds.file_meta.TransferSyntaxUID:
        return path
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    converted = directory / f"{source}.{index}.{transfer_syntax}.dcm"
    result = dcmtk("dcmconv", _DCMCONV[transfer_syntax], path, converted)
    assert result.returncode == 0, result.stdout + result.stderr
    return converted


def _dataset(path):
    ds = pydicom.dcmread(path)
    if TRAILING_PADDING in ds:
        del ds[TRAILING_PADDING]
    return ds


def _stored_path(root, path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scp")
    port, strict_port = free_port(), free_port()
    config = write_config(
        directory,
        BASE,
        {"dicom": PIPELINES.format(aet=AET, port=port, strict_port=strict_port)},
    )
    process = start_harmony(directory, config, port)
    process.wait_for_port(strict_port)

    class Server:
        pass

    server = Server()
    server.port, server.strict_port, server.process = port, strict_port, process
    server.received = directory / "received"
    yield server
    process.stop_cleanly()


def test_echoscu(scp):
    result = dcmtk("echoscu", "-aec", AET, "127.0.0.1", scp.port)
    assert result.returncode == 0, result.stdout + result.stderr


def test_echoscu_wrong_called_ae_is_rejected(scp):
    result = dcmtk("echoscu", "-aec", "NOT_HARMONY", "127.0.0.1", scp.port)
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_calling_ae_not_allowed(scp):
    result = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "STRICT", "127.0.0.1", scp.strict_port)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    ok = dcmtk("echoscu", "-aet", "FRIEND", "-aec", "STRICT", "127.0.0.1", scp.strict_port)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_too_many_associations(scp):
    # Hold the single association STRICT allows with a raw A-ASSOCIATE-RQ.
    rq = pdu.AssociateRQ(
        called_aet="STRICT",
        calling_aet="FRIEND",
        contexts=[pdu.PresentationContextRQ(1, VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])],
        max_pdu_length=16384,
        implementation_class_uid="1.2.3.4",
    )
    with socket.create_connection(("127.0.0.1", scp.strict_port), timeout=10) as held:
        held.sendall(pdu.encode_pdu(rq))
        assert held.recv(1)[0] == pdu.A_ASSOCIATE_AC
        result = dcmtk("echoscu", "-aet", "FRIEND", "-aec", "STRICT", "127.0.0.1", scp.strict_port)
        assert result.returncode != 0
        assert "Local Limit Exceeded" in result.stdout + result.stderr
    # Released by closing: the next association is accepted again.
    for _ in range(50):
        ok = dcmtk("echoscu", "-aet", "FRIEND", "-aec", "STRICT", "127.0.0.1", scp.strict_port)
        if ok.returncode == 0:
            break
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize(
    "transfer_syntax",
    [None, ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
)
def test_storescu_transfer_syntaxes(scp, tmp_path, transfer_syntax):
    files = [p for p in (_variant(s, tmp_path, transfer_syntax) for s in SOURCES) if p is not None]
    assert files
    # Make storescu propose the syntax the files are in, so that it sends
    # them unconverted (native: some are RLE, the rest uncompressed).
    propose = {
        None: "-xr",
        ImplicitVRLittleEndian: "-xi",
        ExplicitVRLittleEndian: "-xe",
        ExplicitVRBigEndian: "-xb",
        DeflatedExplicitVRLittleEndian: "-xd",
    }[transfer_syntax]
    result = dcmtk("storescu", propose, "-aec", AET, "127.0.0.1", scp.port, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in files:
        stored = _stored_path(scp.received, path)
        assert stored.exists(), stored
        header = read_part10_header(stored)
        if transfer_syntax is not None or read_part10_header(path).transfer_syntax == RLELossless:
            # Sent as proposed: stored in the syntax it was sent in.
            assert header.transfer_syntax == read_part10_header(path).transfer_syntax
        original, received = _dataset(path), _dataset(stored)
        assert received == original
        if "PixelData" in original:
            assert received.PixelData == original.PixelData


def test_storescu_many_instances_one_association(scp, tmp_path):
    files = [_variant("CT_small.dcm", tmp_path, None, i) for i in range(300)]
    result = dcmtk("storescu", "-aec", AET, "127.0.0.1", scp.port, *files, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in files:
        assert _stored_path(scp.received, path).exists()


def test_storescu_multi_megabyte_instance(scp, tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = 2048, 2048
    ds.PixelData = os.urandom(2048 * 2048 * 2)
    del ds[TRAILING_PADDING]  # storescu drops it: compare the rest byte for byte
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = dcmtk("storescu", "-aec", AET, "127.0.0.1", scp.port, path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    stored = _stored_path(scp.received, path)
    assert pydicom.dcmread(stored).PixelData == ds.PixelData
    with open(path, "rb") as a, open(stored, "rb") as b:
        a.seek(read_part10_header(path).dataset_offset)
        b.seek(read_part10_header(stored).dataset_offset)
        assert a.read() == b.read()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00",  # a truncated A-ASSOCIATE-RQ header
        b"\x04\x00" + struct.pack(">I", 0x7FFFFFFF) + b"\x00" * 16,  # oversize P-DATA-TF
        b"\x01\x00" + struct.pack(">I", 10) + b"\x00" * 10,  # malformed A-ASSOCIATE-RQ
    ],
)
def test_bad_input_then_still_serving(scp, garbage):
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(35)
        try:
            answer = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    if answer:
        # A-ABORT (or nothing: the connection just closes).
        assert answer[0] in (pdu.A_ABORT, pdu.A_ASSOCIATE_RJ), answer
    result = dcmtk("echoscu", "-aec", AET, "127.0.0.1", scp.port)
    assert result.returncode == 0, result.stdout + result.stderr


def test_log_has_associations_and_no_patient_data(scp):
    out = scp.process.output()
    assert "Association from STORESCU" in out
    assert "CompressedSamples" not in out and "CT1" not in out  # names/IDs of the test files


# -- Harmony's SCU -----------------------------------------------------------


@pytest.fixture(scope="module")
def storescp(tmp_path_factory):
    from harmonytest import Process

    directory = tmp_path_factory.mktemp("storescp")
    port = free_port()
    shim = build_bind_shim(directory)
    process = Process(
        [require("storescp"), "+xa", "-aet", "STORESCP", "-od", str(directory / "in"), "--fork", str(port)],
        directory,
        "storescp",
        env={"TCP_NODELAY": "1", "LD_PRELOAD": str(shim)},
    )
    (directory / "in").mkdir()
    process.wait_for_port(port)
    yield port, directory / "in"
    process.stop()


@pytest_twisted.inlineCallbacks
def test_harmony_scu_stores_to_storescp(storescp, tmp_path):
    from twisted.internet import reactor

    port, received = storescp
    files = [_variant(s, tmp_path, None, 7) for s in SOURCES]
    headers = [read_part10_header(f) for f in files]
    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate(
        "127.0.0.1",
        port,
        "STORESCP",
        [(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])]
        + [(h.sop_class_uid, [h.transfer_syntax]) for h in headers],
    )
    status = yield association.echo()
    assert status.ok
    for path in files:
        status = yield association.store_file(path)
        assert status.ok, status
    yield association.release()
    for path, header in zip(files, headers):
        [stored] = [p for p in received.iterdir() if header.sop_instance_uid in p.name]
        assert _dataset(stored) == _dataset(path)


@pytest_twisted.inlineCallbacks
def test_harmony_scu_against_orthanc(orthanc, tmp_path):
    from twisted.internet import reactor

    files = [_variant(s, tmp_path, None, 9) for s in ("CT_small.dcm", "MR_small.dcm")]
    files.append(_variant("SC_rgb_rle_2frame.dcm", tmp_path, RLELossless, 9))
    headers = [read_part10_header(f) for f in files]
    client = DicomClient(reactor, "HARMONY_SCU")
    association = yield client.associate(
        "127.0.0.1",
        orthanc.dicom_port,
        orthanc.aet,
        [(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])]
        + [(h.sop_class_uid, [h.transfer_syntax]) for h in headers],
    )
    assert (yield association.echo()).ok
    for path in files:
        status = yield association.store_file(path)
        assert status.ok, status
    yield association.release()
    instances = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.get_json("/instances?expand")}
    for path, header in zip(files, headers):
        assert header.sop_instance_uid in instances
        with urllib.request.urlopen(f"{orthanc.url}/instances/{instances[header.sop_instance_uid]}/file") as r:
            stored = pydicom.dcmread(io.BytesIO(r.read()))
        assert stored.PixelData == _dataset(path).PixelData
        assert stored.SOPInstanceUID == header.sop_instance_uid


_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def _storable_test_files(directory):
    """
    Every pydicom test file that is a storage instance (Part 10, a storage
    SOP class, the UIDs a store needs), copied with fresh UIDs (several
    test files share UIDs), grouped by transfer syntax.
    """
    from pynetdicom.presentation import AllStoragePresentationContexts

    storage = {c.abstract_syntax for c in AllStoragePresentationContexts}
    root = os.path.dirname(get_testdata_file("CT_small.dcm", download=False))
    groups = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".dcm"):
            continue
        try:
            header = read_part10_header(os.path.join(root, name))
            ds = pydicom.dcmread(os.path.join(root, name))
        except Exception:
            continue
        if header.sop_class_uid not in storage or header.transfer_syntax not in _STORESCU_PROPOSE:
            continue
        if not all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
            continue
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = directory / name
        try:
            ds.save_as(path, enforce_file_format=True)
        except Exception:
            continue
        groups.setdefault(header.transfer_syntax, []).append(path)
    return groups


def test_every_storable_pydicom_test_file(scp, tmp_path):
    groups = _storable_test_files(tmp_path)
    sent = 0
    for transfer_syntax, files in groups.items():
        for path in files:
            result = dcmtk("storescu", _STORESCU_PROPOSE[transfer_syntax], "-aec", AET, "127.0.0.1", scp.port, path)
            out = result.stdout + result.stderr
            if "No presentation context for" in out or "Invalid stream" in out:
                continue  # storescu cannot read or propose it: not storable by this peer
            assert result.returncode == 0, (path.name, result.stdout + result.stderr)
            sent += 1
            stored = _stored_path(scp.received, path)
            assert stored.exists(), (transfer_syntax, path.name)
            assert read_part10_header(stored).transfer_syntax == transfer_syntax, path.name
            with open(path, "rb") as a, open(stored, "rb") as b:
                a.seek(read_part10_header(path).dataset_offset)
                b.seek(read_part10_header(stored).dataset_offset)
                same_bytes = a.read() == b.read()
            if not same_bytes:
                # storescu drops trailing padding and corrects a few VRs
                # (encapsulated Pixel Data sent as OB): the values are kept.
                original, received = _dataset(path), _dataset(stored)
                assert set(original.keys()) == set(received.keys()), path.name
                for tag in original.keys():
                    assert original[tag].value == received[tag].value, (path.name, tag)
    assert sent >= 40, sent
