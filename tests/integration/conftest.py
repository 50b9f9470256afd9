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


# -- DICOMweb (tests/integration/test_dicomweb_*.py) ------------------------------------

#: The session's DICOMweb test data set: study key -> (StudyDate, series
#: key -> [pydicom test file, ...]).  Study "ctmr" has a CT series of two
#: instances and an MR series; "dose" is rtdose.dcm (15 frames, implicit
#: VR LE); "sc" has an RLE series (2 RGB frames) and an uncompressed RGB one.
DICOMWEB_LAYOUT = {
    "ctmr": ("20230105", {"ct": ["CT_small.dcm", "CT_small.dcm"], "mr": ["MR_small.dcm"]}),
    "dose": ("20230210", {"dose": ["rtdose.dcm"]}),
    "sc": ("20230315", {"rle": ["SC_rgb_rle_2frame.dcm"], "rgb": ["SC_rgb_small_odd.dcm"]}),
}


@pytest.fixture(scope="session")
def dicomweb_data(orthanc, tmp_path_factory):
    """
    L{DICOMWEB_LAYOUT} with fresh Study/Series/SOP Instance UIDs, one
    patient of this session's own (C{.patient}, name C{.patient_name}),
    stored into the session's Orthanc through its REST API (each file in
    its original transfer syntax).

    C{.studies}: key -> namespace(uid, date, series: key -> uid);
    C{.files}: SOP Instance UID -> path of the file stored;
    C{.source}: SOP Instance UID -> pydicom test file name;
    C{.sops}: (study key, series key) -> [SOP Instance UIDs].
    """
    import uuid

    from peers import dicomweb_instance, orthanc_store
    from pydicom.uid import generate_uid

    directory = tmp_path_factory.mktemp("dicomweb-data")
    tag = uuid.uuid4().hex[:8].upper()
    patient, patient_name = f"HDW{tag}", f"DW{tag}^ALPHA"
    studies, files, source, sops = {}, {}, {}, {}
    for s, (key, (date, layout)) in enumerate(DICOMWEB_LAYOUT.items()):
        study = SimpleNamespace(uid=generate_uid(), date=date, series={})
        studies[key] = study
        for r, (series_key, sources) in enumerate(layout.items()):
            series = study.series[series_key] = generate_uid()
            sops[key, series_key] = []
            for i, name in enumerate(sources):
                sop, path = dicomweb_instance(
                    directory, name, f"{key}-{series_key}-{i}",
                    PatientID=patient, PatientName=patient_name, StudyInstanceUID=study.uid,
                    SeriesInstanceUID=series, StudyDate=date, StudyTime="101010", StudyID=f"S{s + 1}",
                    AccessionNumber=f"A{tag}{s}", StudyDescription=f"DICOMweb {key}", SeriesNumber=r + 1,
                    InstanceNumber=i + 1, PatientBirthDate="19700101", PatientSex="O",
                )
                files[sop], source[sop] = path, name
                sops[key, series_key].append(sop)
    orthanc_store(orthanc, files.values())
    return SimpleNamespace(patient=patient, patient_name=patient_name, tag=tag, studies=studies, files=files,
                           source=source, sops=sops, directory=directory)


DICOMWEB_BRIDGE_PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_dw"]
middleware = ["dwb"]
backends = ["{name}_scu"]

[endpoints.{name}_dw]
service = "dicomweb"
[endpoints.{name}_dw.options]
path_prefix = "/{name}"
cors_origins = ["{origin}"]

[backends.{name}_scu]
service = "dicom_scu"
[backends.{name}_scu.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "{local_aet}"
dimse_retrieve_mode = "{mode}"
incoming_store_port = {incoming}
incoming_bind_addr = "127.0.0.1"
storage_dir = "{storage}"
connect_timeout_secs = 2
timeout_secs = 30
"""

DICOMWEB_PROXY_PIPELINE = """
[pipelines.proxy]
networks = ["default"]
endpoints = ["proxy_dw"]
backends = ["proxy_upstream"]

[endpoints.proxy_dw]
service = "dicomweb"
[endpoints.proxy_dw.options]
path_prefix = "/proxy"
cors_origins = ["{origin}"]

[backends.proxy_upstream]
service = "dicomweb"
[backends.proxy_upstream.options]
base_url = "{base_url}"
timeout_secs = 30
"""

#: The origin the DICOMweb gateway's endpoints allow (CORS).
DICOMWEB_ORIGIN = "http://viewer.example"


@pytest.fixture(scope="session")
def dicomweb_gateway(orthanc, tmp_path_factory):
    """
    C{twistd -n harmony} with four DICOMweb pipelines (C{cors_origins}:
    L{DICOMWEB_ORIGIN}):

      - C{/bridge}: dicomweb endpoint + C{dicomweb_bridge} + dicom_scu to
        Orthanc's DIMSE port, C-GET (local AE C{HARMONYDW});
      - C{/bridge-move}: the same with C-MOVE (local AE C{HARMONYMV},
        registered in Orthanc as a modality on C{.move_port});
      - C{/proxy}: dicomweb endpoint + dicomweb backend in front of
        Orthanc's C{/dicom-web};
      - C{/down}: as C{/bridge} with nobody on the PACS port (502s).
    """
    directory = tmp_path_factory.mktemp("dicomweb-gateway")
    port, move_port, dead_port = free_port(), free_port(), free_port()
    flavours = {
        # name: (PACS AE, PACS port, local AE, mode, incoming port)
        "bridge": (orthanc.aet, orthanc.dicom_port, "HARMONYDW", "get", free_port()),
        "bridge-move": (orthanc.aet, orthanc.dicom_port, "HARMONYMV", "move", move_port),
        "down": ("NOBODY", dead_port, "HARMONYDN", "get", free_port()),
    }
    pipelines = {
        f"dw-{name}": DICOMWEB_BRIDGE_PIPELINE.format(
            name=name, aet=aet, port=pacs_port, local_aet=local_aet, mode=mode, incoming=incoming,
            storage=directory / f"retrieved-{name}", origin=DICOMWEB_ORIGIN,
        )
        for name, (aet, pacs_port, local_aet, mode, incoming) in flavours.items()
    }
    pipelines["dw-proxy"] = DICOMWEB_PROXY_PIPELINE.format(
        base_url=f"{orthanc.url}/dicom-web", origin=DICOMWEB_ORIGIN
    )
    pipelines["dw-middleware"] = '[middleware.dwb]\ntype = "dicomweb_bridge"\n'
    extra = '\n[storage.options]\npath = "./store"\n'
    config = write_config(directory, base_config(port, proxy_id="dicomweb-it", extra=extra), pipelines)
    orthanc.add_modality("harmony-dicomweb-move", "HARMONYMV", move_port)
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(port=port, process=proc, directory=directory, move_port=move_port, dead_port=dead_port,
                          url=f"http://127.0.0.1:{port}", origin=DICOMWEB_ORIGIN)
    orthanc.remove_modality("harmony-dicomweb-move")
    proc.stop_cleanly()
