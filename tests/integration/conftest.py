"""
Fixtures of the integration tests: real processes on 127.0.0.1.

  - C{upstream}: the twisted.web test upstream (tests/integration/upstream_server.py),
    once per session.
  - C{echo_gateway}: C{twistd -n harmony} with a copy of the shipped
    etc/harmony.toml (+ etc/pipelines) on a free port.
  - C{proxy_gateway}: C{twistd -n harmony} with generated http-backend
    pipelines in front of the upstream (plus one whose upstream is down).
  - C{orthanc}: one Orthanc (DIMSE + DICOMweb) per session.
  - C{dcmqrscp}: one DCMTK dcmqrscp (Q/R SCP, AE DCMQR) per session, loaded
    with a few uncompressed instances.

Each Harmony process is stopped with SIGTERM at teardown and must exit 0.
"""

import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harmonytest import (  # noqa: E402
    BACKEND_TIMEOUT,
    HERE,
    REPO,
    Process,
    base_config,
    free_port,
    start_harmony,
    write_config,
)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    directory = tmp_path_factory.mktemp("upstream")
    port = free_port()
    proc = Process([sys.executable, HERE / "upstream_server.py", port], directory, "upstream")
    proc.wait_for_port(port)
    yield SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}", process=proc)
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory):
    """
    The shipped default configuration, copied with a free port.
    """
    directory = tmp_path_factory.mktemp("echo")
    shutil.copytree(REPO / "etc", directory, dirs_exist_ok=True)
    config = directory / "harmony.toml"
    port = free_port()
    text, n = re.subn(r"(?m)^bind_port\s*=\s*\d+", f"bind_port = {port}", config.read_text())
    assert n == 1, "etc/harmony.toml should have exactly one bind_port"
    config.write_text(text)
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(port=port, process=proc, directory=directory)
    proc.stop_cleanly()


def proxy_pipelines(upstream_url, down_url):
    return {
        "10-proxy": f"""
[pipelines.proxy]
description = "http backend in front of the test upstream"
networks = ["default"]
endpoints = ["api"]
middleware = ["passthru"]
backends = ["upstream"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[backends.upstream]
service = "http"
[backends.upstream.options]
base_url = "{upstream_url}"
timeout_secs = {BACKEND_TIMEOUT}
""",
        "20-based": f"""
# An upstream base URL with a path: requests land below it.
[pipelines.based]
networks = ["default"]
endpoints = ["based"]
backends = ["based_upstream"]

[endpoints.based]
service = "http"
[endpoints.based.options]
path_prefix = "/based"

[backends.based_upstream]
service = "http"
[backends.based_upstream.options]
base_url = "{upstream_url}/mount/point/"
timeout_secs = 5
""",
        "30-down": f"""
# Nobody listens on this upstream's port.
[pipelines.down]
networks = ["default"]
endpoints = ["down"]
backends = ["nobody"]

[endpoints.down]
service = "http"
[endpoints.down.options]
path_prefix = "/down"

[backends.nobody]
service = "http"
[backends.nobody.options]
base_url = "{down_url}"
timeout_secs = 5
""",
        "40-echo": """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo"]
backends = ["echo"]

[endpoints.echo]
service = "echo"
[endpoints.echo.options]
path_prefix = "/echo"

[backends.echo]
service = "echo"
""",
    }


@pytest.fixture(scope="module")
def proxy_gateway(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("proxy")
    port = free_port()
    down_port = free_port()
    config = write_config(
        directory,
        base_config(port),
        proxy_pipelines(upstream.url, f"http://127.0.0.1:{down_port}"),
    )
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(port=port, process=proc, directory=directory, upstream=upstream)
    proc.stop_cleanly()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """
    One Orthanc (DIMSE + DICOMweb) for the whole test session, on loopback.
    """
    from peers import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


#: The C-MOVE destinations the session's dcmqrscp knows (its HostTable is
#: read once, at start): AE title -> a loopback port chosen per session.
DCMQRSCP_MOVE_DESTINATIONS = ("HARMONY", "HARMONY_SCU", "STORESCP")


def _dcmqrscp_files(directory):
    """
    The session's dcmqrscp data: pydicom's CT_small.dcm and MR_small.dcm as
    they are (explicit VR little endian, uncompressed), and two generated
    studies with fresh UIDs: patient DCMQR1 (one CT series of two
    instances) and patient DCMQR2 (one MR instance).
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    directory = Path(directory)
    files = []
    for source in ("CT_small.dcm", "MR_small.dcm"):
        path = directory / source
        shutil.copy(get_testdata_file(source, download=False), path)
        files.append(path)
    variants = [
        ("CT_small.dcm", "DCMQR1", "DCMQR^ONE", "20240102", 2),
        ("MR_small.dcm", "DCMQR2", "DCMQR^TWO", "20240103", 1),
    ]
    for source, patient_id, patient_name, date, count in variants:
        ds = pydicom.dcmread(get_testdata_file(source, download=False))
        ds.PatientID, ds.PatientName, ds.StudyDate = patient_id, patient_name, date
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.StudyID = patient_id
        for i in range(count):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            path = directory / f"{patient_id}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


@pytest.fixture(scope="session")
def dcmqrscp(tmp_path_factory):
    """
    One DCMTK dcmqrscp (AE C{DCMQR}) for the whole test session, on
    loopback, loaded with L{_dcmqrscp_files} (C{.loaded}: their paths).  Its
    HostTable lists the C-MOVE destinations L{DCMQRSCP_MOVE_DESTINATIONS}
    on 127.0.0.1 (C{.hosts}: AE title -> (host, port)).
    """
    from peers import Dcmqrscp

    directory = tmp_path_factory.mktemp("dcmqrscp")
    hosts = {aet: ("127.0.0.1", free_port()) for aet in DCMQRSCP_MOVE_DESTINATIONS}
    server = Dcmqrscp(directory, hosts=hosts).start()
    try:
        data = directory / "data"
        data.mkdir()
        server.load(_dcmqrscp_files(data))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory):
    """
    One FHIR R4 server (tests/fhir_server: Medplum's FHIR router over its
    in-memory store) for the whole test session, on loopback; C{.url} is
    its FHIR base.
    """
    from peers import FhirServer

    server = FhirServer(tmp_path_factory.mktemp("fhir-server")).start()
    yield server
    server.stop()
