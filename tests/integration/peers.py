"""
Real peers for integration tests, on 127.0.0.1 only: Orthanc (with the
DICOMweb plugin) started from a generated JSON configuration, DCMTK's
C{dcmqrscp} (a Query/Retrieve SCP: C-FIND, C-GET, C-MOVE) started from a
generated configuration file, and DCMTK command-line tools.

Both read C{TCP_NODELAY=1} from the environment (Debian's DCMTK leaves
Nagle's algorithm on otherwise, which makes every DIMSE exchange wait for
delayed ACKs).  Neither Orthanc nor dcmqrscp can choose its bind address,
so they run with an C{LD_PRELOAD} shim (C{bind_loopback.c}) that turns
wildcard binds into loopback binds.

A missing peer is a failure, not a skip: CI installs them (scripts/setup).
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from harmonytest import HERE, Process, free_port

ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
PEER_ENV = {"TCP_NODELAY": "1"}


def require(tool):
    """
    The path of a peer's executable; fails (never skips) when it is missing.
    """
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    assert path, f"{tool} is not installed: run scripts/setup --test (Debian packages dcmtk, orthanc)"
    return path


def build_bind_shim(directory):
    """
    Compile the loopback bind shim into C{directory}; returns its path.
    """
    out = Path(directory) / "bind_loopback.so"
    if not out.exists():
        cc = require("gcc")
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "bind_loopback.c"), "-ldl"],
            check=True,
            capture_output=True,
        )
    return out


def listening_addresses(pid):
    """
    The local addresses (ip, port) the process C{pid} listens on, read from
    /proc (TCP and TCP6 sockets in LISTEN state owned by the process).
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", 4), ("tcp6", 6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state != "0A" or inode not in inodes:
                    continue
                hexip, hexport = local.split(":")
                port = int(hexport, 16)
                if family == 4:
                    ip = ".".join(str(int(hexip[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = "::1" if hexip == "00000000000000000000000001000000" else hexip
                found.append((ip, port))
    return found


class Orthanc:
    """
    An Orthanc server on free loopback ports with the DICOMweb plugin.

    @ivar http_port, dicom_port: its ports.
    @ivar aet: its AE title (C{ORTHANC}).
    """

    aet = "ORTHANC"

    def __init__(self, directory, modalities=None):
        self.directory = Path(directory)
        self.http_port = free_port()
        self.dicom_port = free_port()
        storage = self.directory / "db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "HarmonyTestOrthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": modalities or {},
            "SynchronousCMove": True,
            "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        self.config_path = self.directory / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout=30):
        binary = require("Orthanc")
        shim = build_bind_shim(self.directory)
        env = dict(PEER_ENV, LD_PRELOAD=str(shim))
        self.process = Process([binary, str(self.config_path)], self.directory, "orthanc", env=env)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.popen.poll() is None, f"Orthanc exited:\n{self.process.output()}"
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"Orthanc did not start:\n{self.process.output()}"
            time.sleep(0.1)
        self.process.wait_for_port(self.dicom_port)
        return self

    def get_json(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def add_modality(self, name, aet, port, host="127.0.0.1"):
        """
        Register a DICOM modality at runtime (C{PUT /modalities/<name>}):
        Orthanc can then C-MOVE to C{aet}.
        """
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        req = urllib.request.Request(
            f"{self.url}/modalities/{name}", data=body, method="PUT", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        assert aet in json.dumps(self.get_json(f"/modalities/{name}/configuration"))

    def remove_modality(self, name):
        """
        Forget a modality registered with L{add_modality} (quietly).
        """
        req = urllib.request.Request(f"{self.url}/modalities/{name}", method="DELETE")
        try:
            with urllib.request.urlopen(req, timeout=10):
                pass
        except OSError:
            pass

    def stop(self):
        if self.process is not None:
            self.process.stop()


class Dcmqrscp:
    """
    DCMTK's C{dcmqrscp} on a free loopback port: one AE (C{DCMQR}, read and
    write: it stores what C{storescu} sends it) with its storage area in
    C{directory}, Patient Root and Study Root C-FIND, C-GET and C-MOVE.

    @param hosts: the C{HostTable}: AE title -> C{(host, port)}.  C-MOVE
        destinations must be listed (the table is read once, at start).
    @ivar port: its port.
    @ivar aet: its AE title.
    @ivar loaded: the files stored into it by L{load}.
    """

    aet = "DCMQR"

    def __init__(self, directory, hosts=None, max_pdu=16384):
        self.directory = Path(directory)
        self.port = free_port()
        self.hosts = dict(hosts or {})
        self.storage = self.directory / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.loaded = []
        host_table = "\n".join(
            f"{_cfg_name(aet)} = ({aet}, {host}, {port})" for aet, (host, port) in sorted(self.hosts.items())
        )
        self.config_path = self.directory / "dcmqrscp.cfg"
        self.config_path.write_text(
            f"""# Generated by tests/integration/peers.py
NetworkTCPPort  = {self.port}
MaxPDUSize      = {max_pdu}
MaxAssociations = 16

HostTable BEGIN
{host_table}
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{self.aet}  {self.storage}  RW  (1000, 1024mb)  ANY
AETable END
"""
        )
        self.process = None

    def start(self):
        binary = require("dcmqrscp")
        shim = build_bind_shim(self.directory)
        env = dict(PEER_ENV, LD_PRELOAD=str(shim))
        # -dhl: no reverse lookups of the peers' addresses (they cost seconds
        # where there is no resolver).
        argv = [binary, "-dhl", "-c", str(self.config_path), str(self.port)]
        self.process = Process(argv, self.directory, "dcmqrscp", env=env)
        self.process.wait_for_port(self.port)
        return self

    def load(self, files):
        """
        Store C{files} (Part 10 files) into it with C{storescu}.
        """
        files = [str(f) for f in files]
        result = dcmtk("storescu", "-aet", "LOADER", "-aec", self.aet, "127.0.0.1", self.port, *files)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert not any(line.startswith(("E:", "F:")) for line in out.splitlines()), out
        self.loaded += files

    def stop(self):
        if self.process is not None:
            self.process.stop()


def _cfg_name(aet):
    """
    A HostTable symbolic name for an AE title (letters, digits, underscore).
    """
    return "".join(c if c.isalnum() else "_" for c in aet) or "HOST"


def dcmtk(tool, *args, timeout=120, cwd=None):
    """
    Run a DCMTK tool with C{TCP_NODELAY=1}; returns the CompletedProcess.
    """
    env = dict(os.environ, **PEER_ENV)
    return subprocess.run(
        [require(tool), *[str(a) for a in args]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dicom_instance(directory, source, patient_id, study, series, name, patient_name="HARMONY^TEST"):
    """
    A copy of one of pydicom's test files as a new instance of the given
    patient, study and series (fresh SOP Instance UID), saved as
    C{<directory>/<name>.dcm}.

    @return: C{(SOP Instance UID, path)}
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(source, download=False))
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = Path(directory) / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID, path


FHIR_SERVER_DIR = HERE.parent / "fhir_server"


class FhirServer:
    """
    The FHIR R4 test server (C{tests/fhir_server/server.mjs}: Medplum's
    FHIR router over its in-memory repository) on a free loopback port.
    Its packages are installed by C{scripts/setup --test} (C{npm ci}).

    Its links (Bundle C{link}, C{fullUrl}, C{Location}) are absolute URLs
    under L{url}; a restart empties the store.

    @ivar port: its port.
    @ivar url: its FHIR base (C{http://127.0.0.1:<port>/fhir/R4}).
    """

    base_path = "/fhir/R4"
    READY = "FHIR server ready on "

    def __init__(self, directory):
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{self.base_path}"
        self.process = None

    def start(self, timeout=30):
        node = shutil.which("node")
        assert node, "node is not installed: run scripts/setup --test (Debian packages nodejs, npm)"
        router = FHIR_SERVER_DIR / "node_modules" / "@medplum" / "fhir-router"
        assert router.is_dir(), f"{router} is missing: run scripts/setup --test (npm ci --prefix tests/fhir_server)"
        argv = [node, FHIR_SERVER_DIR / "server.mjs", self.port, self.base_path]
        self.process = Process(argv, self.directory, "fhir-server")
        deadline = time.monotonic() + timeout
        while self.READY + self.url not in self.process.output():
            assert self.process.popen.poll() is None, f"the FHIR server exited:\n{self.process.output()}"
            assert time.monotonic() < deadline, f"the FHIR server did not start:\n{self.process.output()}"
            time.sleep(0.05)
        self.process.wait_for_port(self.port)
        return self

    def stop(self):
        if self.process is not None:
            self.process.stop()


# -- DICOMweb test data (tests/integration/test_dicomweb_*.py) ----------------------------


def orthanc_store(orthanc, paths):
    """
    Store Part 10 files into Orthanc through its REST API (C{POST
    /instances}, one keep-alive connection): the file is kept as sent,
    transfer syntax included (no DIMSE negotiation in between).

    @return: Orthanc's answers (one dict per file).
    """
    import http.client

    answers = []
    conn = http.client.HTTPConnection("127.0.0.1", orthanc.http_port, timeout=60)
    try:
        for path in paths:
            body = Path(path).read_bytes()
            conn.request("POST", "/instances", body=body, headers={"Content-Type": "application/dicom"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (path, resp.status, data[:300])
            answer = json.loads(data)
            assert answer.get("Status") in ("Success", "AlreadyStored"), (path, answer)
            answers.append(answer)
    finally:
        conn.close()
    return answers


def dicomweb_instance(directory, source, name, **attributes):
    """
    A copy of one of pydicom's test files (its transfer syntax kept) with a
    fresh SOP Instance UID and the given attributes (keywords), saved as
    C{<directory>/<name>.dcm}.

    @return: C{(SOP Instance UID, path)}
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(source, download=False))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = Path(directory) / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID, path


def generated_ct(path, patient_id, study, series, number, rows=16, columns=16, patient_name="DW^GENERATED",
                 study_date="20240101", seed=0):
    """
    A generated CT image (MONOCHROME2, 16 bits, explicit VR little endian,
    C{rows} x C{columns} pixels of pseudo-random values) with a fresh SOP
    Instance UID, saved at C{path}.

    @return: the SOP Instance UID.
    """
    import numpy
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = PydicomDataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    rng = numpy.random.default_rng(seed + number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop


def multipart_boundary(content_type):
    """
    The C{boundary} parameter of a C{multipart/...} content type (quotes
    removed); fails when there is none.
    """
    import email.message

    msg = email.message.Message()
    msg["Content-Type"] = content_type
    boundary = msg.get_param("boundary")
    assert boundary, f"no boundary in {content_type!r}"
    return boundary


def multipart_parts(content_type, body):
    """
    The parts of a C{multipart/related} body (RFC 2046), parsed here
    independently of Harmony's own parser.

    @return: a list of C{(headers, payload)}: headers a dict with lower-cased
        names.
    """
    boundary = multipart_boundary(content_type).encode()
    delimiter = b"--" + boundary
    assert body.startswith(delimiter) or (b"\r\n" + delimiter) in body, "no first delimiter"
    start = 0 if body.startswith(delimiter) else body.index(b"\r\n" + delimiter) + 2
    position = start + len(delimiter)
    parts = []
    while True:
        if body[position : position + 2] == b"--":
            return parts
        assert body[position : position + 2] == b"\r\n", body[position : position + 20]
        end = body.index(b"\r\n" + delimiter, position)
        raw = body[position + 2 : end]
        if raw.startswith(b"\r\n"):  # no part headers
            head, payload = b"", raw[2:]
        else:
            head, _, payload = raw.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n"):
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
        position = end + 2 + len(delimiter)


def multipart_body(parts, boundary="harmony-test-boundary-7d3f"):
    """
    A C{multipart/related} body of C{(content_type, payload)} parts and its
    boundary.
    """
    out = []
    for content_type, payload in parts:
        out.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + payload + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), boundary
