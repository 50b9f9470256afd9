"""
Real peers for integration tests, on 127.0.0.1 only: Orthanc (with the
DICOMweb plugin) started from a generated JSON configuration, and DCMTK
command-line tools.

Both read C{TCP_NODELAY=1} from the environment (Debian's DCMTK leaves
Nagle's algorithm on otherwise, which makes every DIMSE exchange wait for
delayed ACKs).  Orthanc cannot choose its bind address, so it runs with an
C{LD_PRELOAD} shim (C{bind_loopback.c}) that turns wildcard binds into
loopback binds.

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

    def stop(self):
        if self.process is not None:
            self.process.stop()


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
