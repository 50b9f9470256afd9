"""
DICOMweb through Harmony's C{/bridge} (conftest's C{dicomweb_gateway})
with many and large instances:

  - STOW-RS of 100 instances in one request: all C-STOREd;
  - a study of 200 small instances: an instance-level retrieve gives one
    part, the series retrieve all 200;
  - a study of about 100 MB (50 instances of 1024x1024 16-bit pixels,
    random so nothing compresses) retrieved through C{/bridge}, read
    incrementally while the resident memory of the Harmony process is
    sampled from C{/proc/<pid>/status}: Harmony must stream (the first part
    arrives long before the last) and its memory must not grow with the
    study.
"""

import hashlib
import http.client
import io
import threading
import time
import uuid
from types import SimpleNamespace

import pydicom
import pytest
from peers import generated_ct, multipart_body, multipart_boundary, multipart_parts, orthanc_store
from pydicom.uid import generate_uid

from harmonytest import request

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
BIG_SIDE = 1024
BIG_COUNT = 50
PIXEL_BYTES = BIG_SIDE * BIG_SIDE * 2


@pytest.fixture(scope="module")
def many(orthanc, tmp_path_factory):
    """
    A study of 200 small generated CT instances (one series) in Orthanc.
    """
    directory = tmp_path_factory.mktemp("dicomweb-many")
    patient = f"HDWM{uuid.uuid4().hex[:8].upper()}"
    study, series = generate_uid(), generate_uid()
    paths = {}
    for n in range(1, 201):
        path = directory / f"m{n}.dcm"
        paths[generated_ct(path, patient, study, series, n, rows=8, columns=8)] = path
    orthanc_store(orthanc, paths.values())
    return SimpleNamespace(patient=patient, study=study, series=series, paths=paths)


@pytest.fixture(scope="module")
def big(orthanc, tmp_path_factory):
    """
    A study of L{BIG_COUNT} instances of L{PIXEL_BYTES} pixel bytes each
    in Orthanc; C{.digests}: SOP Instance UID -> SHA-256 of the pixel data.
    """
    directory = tmp_path_factory.mktemp("dicomweb-big")
    patient = f"HDWB{uuid.uuid4().hex[:8].upper()}"
    study, series = generate_uid(), generate_uid()
    paths, digests = {}, {}
    for n in range(1, BIG_COUNT + 1):
        path = directory / f"b{n}.dcm"
        sop = generated_ct(path, patient, study, series, n, rows=BIG_SIDE, columns=BIG_SIDE, seed=1000)
        paths[sop] = path
    for sop, path in paths.items():
        digests[sop] = hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()
    orthanc_store(orthanc, paths.values())
    size = sum(p.stat().st_size for p in paths.values())
    for path in paths.values():
        path.unlink()  # the data are in Orthanc; the digests are enough here
    return SimpleNamespace(patient=patient, study=study, series=series, digests=digests, size=size)


def _orthanc_instances(orthanc, study):
    response = request(orthanc.http_port, "GET", f"/dicom-web/studies/{study}/instances",
                       headers=[("Accept", "application/dicom+json")])
    assert response.status == 200, response
    return sorted(m["00080018"]["Value"][0] for m in response.json())


def test_stow_100_instances_in_one_request(dicomweb_gateway, orthanc, tmp_path):
    patient = f"HDWS{uuid.uuid4().hex[:8].upper()}"
    study, series = generate_uid(), generate_uid()
    parts, sops = [], []
    for n in range(1, 101):
        path = tmp_path / f"s{n}.dcm"
        sops.append(generated_ct(path, patient, study, series, n, rows=8, columns=8, seed=50))
        parts.append(("application/dicom", path.read_bytes()))
    body, boundary = multipart_body(parts)
    response = request(dicomweb_gateway.port, "POST", "/bridge/studies", body=body, headers=[
        ("Content-Type", f'{MULTIPART_DICOM}; boundary="{boundary}"'), ("Accept", "application/dicom+json")])
    assert response.status == 200, response
    answer = response.json()
    referenced = answer["00081199"]["Value"]
    assert len(referenced) == 100
    assert sorted(item["00081155"]["Value"][0] for item in referenced) == sorted(sops)
    assert not answer.get("00081198", {}).get("Value")
    assert _orthanc_instances(orthanc, study) == sorted(sops)


def test_one_instance_of_a_200_instance_study(dicomweb_gateway, many):
    """
    An instance-level retrieve is one C-GET at IMAGE level: exactly the
    instance asked for, not its study.
    """
    sop = sorted(many.paths)[117]
    path = f"/bridge/studies/{many.study}/series/{many.series}/instances/{sop}"
    response = request(dicomweb_gateway.port, "GET", path, headers=[("Accept", MULTIPART_DICOM)])
    assert response.status == 200, response
    parts = multipart_parts(response.header("Content-Type"), response.body)
    assert len(parts) == 1
    ds = pydicom.dcmread(io.BytesIO(parts[0][1]))
    assert ds.SOPInstanceUID == sop
    assert ds.PixelData == pydicom.dcmread(many.paths[sop]).PixelData


def test_series_of_200_instances(dicomweb_gateway, many):
    path = f"/bridge/studies/{many.study}/series/{many.series}"
    response = request(dicomweb_gateway.port, "GET", path, headers=[("Accept", MULTIPART_DICOM)])
    assert response.status == 200, response
    parts = multipart_parts(response.header("Content-Type"), response.body)
    got = [pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID for _, payload in parts]
    assert len(got) == 200
    assert sorted(got) == sorted(many.paths)
    # and QIDO sees all of them (no default limit cuts the answer short)
    response = request(dicomweb_gateway.port, "GET", f"/bridge/studies/{many.study}/instances",
                       headers=[("Accept", "application/dicom+json")])
    assert response.status == 200, response
    assert sorted(m["00080018"]["Value"][0] for m in response.json()) == sorted(many.paths)


# -- the ~100 MB study ----------------------------------------------------------------


class MemorySampler(threading.Thread):
    """
    Samples C{VmRSS} and C{VmHWM} (kB) of a process every few milliseconds
    until stopped.
    """

    def __init__(self, pid, interval=0.005):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []
        self._stop_event = threading.Event()

    def read(self):
        values = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    values[name] = int(value.split()[0]) * 1024
        return values

    def run(self):
        while not self._stop_event.is_set():
            self.samples.append(self.read())
            time.sleep(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.samples.append(self.read())


def _stream_parts(response, boundary, on_part, chunk=65536):
    """
    Read a C{multipart/related} response body incrementally (C{chunk}
    bytes at a time), calling C{on_part(headers, payload)} as each part is
    complete; only the part being read is held.

    @return: the number of body bytes read.
    """
    delimiter = b"\r\n--" + boundary.encode()
    buf = bytearray(b"\r\n")  # the first delimiter then looks like the others
    total = 0
    scan = 0
    in_part = False
    headers = {}

    def more():
        nonlocal total
        data = response.read(chunk)
        assert data, "the response ended before its closing delimiter"
        total += len(data)
        buf.extend(data)

    while True:
        index = buf.find(delimiter, scan)
        if index < 0:
            scan = max(0, len(buf) - len(delimiter) + 1)
            more()
            continue
        if in_part:
            on_part(headers, bytes(buf[:index]))
        rest = index + len(delimiter)
        while len(buf) < rest + 2:
            more()
        if buf[rest : rest + 2] == b"--":
            while response.read(chunk):
                pass
            return total
        end = buf.find(b"\r\n\r\n", rest)
        while end < 0:
            more()
            end = buf.find(b"\r\n\r\n", rest)
        headers = {}
        for line in bytes(buf[rest + 2 : end]).split(b"\r\n"):
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        del buf[: end + 4]
        scan = 0
        in_part = True


def test_large_study_is_streamed_in_bounded_memory(dicomweb_gateway, big):
    pid = dicomweb_gateway.process.popen.pid
    sampler = MemorySampler(pid)
    before = sampler.read()
    received = {}
    times = SimpleNamespace(first_part=None)

    def on_part(headers, payload):
        assert headers.get("content-type", "").startswith("application/dicom"), headers
        if times.first_part is None:
            times.first_part = time.monotonic()
        ds = pydicom.dcmread(io.BytesIO(payload))
        assert ds.SOPInstanceUID not in received, "a part came twice"
        assert len(ds.PixelData) == PIXEL_BYTES
        received[ds.SOPInstanceUID] = (hashlib.sha256(ds.PixelData).hexdigest(), len(payload))

    sampler.start()
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", dicomweb_gateway.port, timeout=60)
    try:
        conn.request("GET", f"/bridge/studies/{big.study}", headers={"Accept": MULTIPART_DICOM})
        response = conn.getresponse()
        assert response.status == 200, (response.status, response.read(500))
        first_byte = time.monotonic()
        ctype = response.getheader("Content-Type")
        assert ctype.startswith("multipart/related"), ctype
        body_bytes = _stream_parts(response, multipart_boundary(ctype), on_part)
    finally:
        conn.close()
        end = time.monotonic()
        sampler.stop()
    total = end - start

    peak_rss = max(s["VmRSS"] for s in sampler.samples)
    print(f"study {big.size / 1e6:.1f} MB in {total:.2f} s; headers after {first_byte - start:.3f} s, first part "
          f"after {(times.first_part or end) - start:.3f} s; RSS {before['VmRSS'] / 1e6:.1f} -> peak "
          f"{peak_rss / 1e6:.1f} MB ({len(sampler.samples)} samples), HWM {before['VmHWM'] / 1e6:.1f} -> "
          f"{sampler.samples[-1]['VmHWM'] / 1e6:.1f} MB")

    # every part, each once, the pixel data intact
    assert sorted(received) == sorted(big.digests)
    assert {sop: digest for sop, (digest, _) in received.items()} == big.digests
    payload = sum(size for _, size in received.values())
    assert body_bytes >= payload >= BIG_COUNT * PIXEL_BYTES
    assert payload >= 0.95 * big.size, (payload, big.size)

    # streaming: the first part was complete long before the last one
    assert times.first_part is not None
    assert first_byte - start < 0.5 * total, (first_byte - start, total)
    assert times.first_part - start < 0.35 * total, (times.first_part - start, total)

    # bounded memory: the resident set of the Harmony process did not grow
    # with the study (it never held more than a fraction of it)
    growth = peak_rss - before["VmRSS"]
    hwm_growth = sampler.samples[-1]["VmHWM"] - before["VmHWM"]
    limit = 0.4 * big.size
    assert len(sampler.samples) > 10, "too few memory samples"
    assert growth < limit, f"Harmony's RSS grew by {growth / 1e6:.1f} MB for a {big.size / 1e6:.1f} MB study"
    assert hwm_growth < limit, f"Harmony's peak RSS grew by {hwm_growth / 1e6:.1f} MB"
