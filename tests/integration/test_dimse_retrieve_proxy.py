"""
Harmony as a transparent DICOM retrieve proxy, end to end with DCMTK tools:
getscu / movescu -> twistd Harmony (dicom_scp endpoint with enable_find,
enable_get, enable_move) -> dicom_scu backend -> a real PACS.

One Harmony per module with four DIMSE-only pipelines, each a dicom_scp
endpoint on its own free loopback port in front of one backend:

  - C{orthanc_get}: the session's Orthanc, C{dimse_retrieve_mode = "get"};
  - C{orthanc_move}: Orthanc, C{"move"}: Orthanc sends the instances to the
    backend's C{local_aet} (registered in Orthanc at runtime through its
    REST API) on C{incoming_store_port};
  - C{dcmqr_get}, C{dcmqr_move}: the session's dcmqrscp, whose HostTable
    (read at its start) knows C{HARMONY} at a loopback port: the move
    backend's C{local_aet} and C{incoming_store_port}.

Every endpoint's C{move_destinations} table names C{STORESCP}: one DCMTK
storescp per module writing into a temporary directory.

The data: one study of two series (CT_small x2, MR_small; fresh UIDs)
stored in Orthanc and in dcmqrscp with storescu.  What comes through
Harmony is compared with what the PACS gives directly (getscu) and with
the originals, data set element by element (file meta aside: it differs).
"""

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from peers import PEER_ENV, dcmtk, require
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from harmonytest import Process, free_port, twistd_argv, write_config

_TAG = uuid.uuid4().hex[:8].upper()
#: The endpoints' AE title (what getscu/movescu call).
HARMONY_AET = "HARMONY"
#: The move destination of the endpoints' table (the module's storescp).
STORESCP_AET = "STORESCP"
#: The orthanc_move backend's local_aet: registered in Orthanc at runtime.
ORTHANC_MOVE_AET = f"HRPO{_TAG}"
#: The dcmqr_move backend's local_aet: listed in the session dcmqrscp's
#: HostTable (tests/integration/conftest.py, DCMQRSCP_MOVE_DESTINATIONS).
DCMQR_MOVE_AET = "HARMONY"

PATHS = ("orthanc_get", "orthanc_move", "dcmqr_get", "dcmqr_move")

#: Each backend's retrieve_memory_mib: the Orthanc paths relay every instance
#: from memory (the default budget); the dcmqrscp paths have 20 KiB per
#: retrieve, so the CT data sets (~39 KB) outgrow it and go through spool
#: files while the MR one (~10 KB) stays in memory.
RELAY_MEMORY = {"orthanc": 16, "dcmqr": 0.02}

#: The Data Set Trailing Padding of pydicom's test files (Orthanc drops it).
TRAILING_PADDING = 0xFFFCFFFC

BASE = """
[proxy]
id = "retrieve-proxy-it"
log_level = "info"

[storage.options]
path = "./store"
"""

PIPELINE = """
[pipelines.{name}]
description = "getscu/movescu -> Harmony -> {name}"
endpoints = ["{name}_scp"]
backends = ["{name}_pacs"]

[endpoints.{name}_scp]
service = "dicom_scp"
[endpoints.{name}_scp.options]
local_aet = "{harmony_aet}"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true
enable_get = true
enable_move = true
dimse_timeout_secs = 20

[endpoints.{name}_scp.options.move_destinations]
{storescp_aet} = "127.0.0.1:{storescp_port}"

[backends.{name}_pacs]
service = "dicom_scu"
[backends.{name}_pacs.options]
aet = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
local_aet = "{local_aet}"
timeout_secs = 20
connect_timeout_secs = 5
dimse_retrieve_mode = "{mode}"
incoming_store_port = {incoming_port}
incoming_bind_addr = "127.0.0.1"
retrieve_memory_mib = {relay_memory}
"""


# -- Orthanc's modalities ---------------------------------------------------------




# -- data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """
    One study of a new patient: series s1 (two CT instances) and s2 (one MR
    instance), fresh UIDs, written as Part 10 files.
    """
    directory = tmp_path_factory.mktemp("retrieve-proxy-data")
    patient = "HRP" + _TAG
    study_uid, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    layout = [("CT_small.dcm", s1), ("CT_small.dcm", s1), ("MR_small.dcm", s2)]
    originals = {}
    series = {s1: set(), s2: set()}
    for i, (source, series_uid) in enumerate(layout):
        ds = pydicom.dcmread(get_testdata_file(source, download=False))
        ds.PatientID = patient
        ds.PatientName = "RETRIEVE^PROXY"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = directory / f"i{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        originals[ds.SOPInstanceUID] = path
        series[series_uid].add(ds.SOPInstanceUID)
    return {"patient": patient, "study": study_uid, "s1": s1, "s2": s2, "series": series, "originals": originals}


def _storescu(aet, port, files):
    result = dcmtk("storescu", "-aet", "HRPLOADER", "-aec", aet, "127.0.0.1", port, *files)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert not any(line.startswith(("E:", "F:")) for line in out.splitlines()), out


@pytest.fixture(scope="module")
def pacs(orthanc, dcmqrscp, study):
    """
    The study stored in both PACSs (dcmqrscp: with storescu directly, so
    that the fixture's C{loaded} list stays what it loaded itself).
    """
    files = list(study["originals"].values())
    _storescu(orthanc.aet, orthanc.dicom_port, files)
    _storescu(dcmqrscp.aet, dcmqrscp.port, files)
    return {
        "orthanc": {"aet": orthanc.aet, "port": orthanc.dicom_port},
        "dcmqr": {"aet": dcmqrscp.aet, "port": dcmqrscp.port},
    }


# -- peers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storescp(tmp_path_factory):
    """
    DCMTK's storescp (AE STORESCP) on a free port, writing into C{out}:
    the C-MOVE destination of every endpoint.
    """
    directory = tmp_path_factory.mktemp("retrieve-proxy-storescp")
    out = directory / "received"
    out.mkdir()
    port = free_port()
    proc = Process(
        [require("storescp"), "-aet", STORESCP_AET, "-od", out, port], directory, "storescp", env=PEER_ENV
    )
    proc.wait_for_port(port)
    yield {"port": port, "out": out, "process": proc}
    proc.stop()


@pytest.fixture(scope="module")
def gateway(orthanc, dcmqrscp, pacs, storescp, tmp_path_factory):
    """
    twistd Harmony with the four pipelines; C{paths}: name -> what a test
    needs to know about it.
    """
    directory = tmp_path_factory.mktemp("retrieve-proxy-gateway")
    dcmqr_harmony_host, dcmqr_harmony_port = dcmqrscp.hosts[DCMQR_MOVE_AET]
    assert dcmqr_harmony_host == "127.0.0.1"
    backends = {
        "orthanc_get": ("orthanc", "get", "HARMONY_SCU", free_port()),
        "orthanc_move": ("orthanc", "move", ORTHANC_MOVE_AET, free_port()),
        "dcmqr_get": ("dcmqr", "get", "HARMONY_SCU", free_port()),
        "dcmqr_move": ("dcmqr", "move", DCMQR_MOVE_AET, dcmqr_harmony_port),
    }
    paths = {}
    pipelines = {}
    for i, (name, (peer, mode, local_aet, incoming_port)) in enumerate(backends.items()):
        scp_port = free_port()
        paths[name] = {
            "name": name,
            "peer": peer,
            "pacs_aet": pacs[peer]["aet"],
            "pacs_port": pacs[peer]["port"],
            "mode": mode,
            "local_aet": local_aet,
            "incoming_port": incoming_port,
            "scp_port": scp_port,
            "spool": directory / "store" / "spool" / f"{name}_pacs",
        }
        pipelines[f"{i + 1:02d}-{name}"] = PIPELINE.format(
            name=name,
            harmony_aet=HARMONY_AET,
            scp_port=scp_port,
            storescp_aet=STORESCP_AET,
            storescp_port=storescp["port"],
            pacs_aet=pacs[peer]["aet"],
            pacs_port=pacs[peer]["port"],
            local_aet=local_aet,
            mode=mode,
            incoming_port=incoming_port,
            relay_memory=RELAY_MEMORY[peer],
        )
    modality = f"harmony-retrieve-proxy-{_TAG}"
    orthanc.add_modality(modality, ORTHANC_MOVE_AET, paths["orthanc_move"]["incoming_port"])
    config = write_config(directory, BASE, pipelines)
    process = Process(twistd_argv(config), directory, "harmony")
    try:
        for path in paths.values():
            process.wait_for_port(path["scp_port"])
        yield {
            "process": process,
            "directory": directory,
            "paths": paths,
            "storescp": storescp,
            "peers": {"orthanc": orthanc.process, "dcmqr": dcmqrscp.process},
        }
    finally:
        orthanc.remove_modality(modality)
        process.stop_cleanly()


# -- DCMTK tools and their output -------------------------------------------------------


def _keys(level, study, series=None):
    keys = ["-k", f"QueryRetrieveLevel={level}", "-k", f"StudyInstanceUID={study}"]
    if series is not None:
        keys += ["-k", f"SeriesInstanceUID={series}"]
    return keys


def _dimse_messages(output):
    """
    The incoming DIMSE messages a DCMTK tool logged with C{-d}: a list of
    C{{field name: value}} dictionaries, in order.
    """
    messages = []
    current = None
    for line in output.splitlines():
        text = line[3:] if line.startswith(("D: ", "I: ", "W: ", "E: ")) else line
        if "INCOMING DIMSE MESSAGE" in text:
            current = {}
            continue
        if current is not None:
            if "END DIMSE MESSAGE" in text:
                messages.append(current)
                current = None
                continue
            name, sep, value = text.partition(":")
            if sep:
                current[name.strip()] = value.strip()
    return messages


def _final(output, message_type):
    """
    The final response of a C-GET or C-MOVE in a tool's C{-d} output:
    C{(status, completed, failed, warning)} (counts C{None} when absent).
    """
    responses = [m for m in _dimse_messages(output) if m.get("Message Type") == message_type]
    assert responses, f"no {message_type} in the output:\n{_tail(output)}"
    final = responses[-1]
    match = re.match(r"0x([0-9a-fA-F]{4})", final.get("DIMSE Status", ""))
    assert match, f"no status in the final {message_type}: {final}"
    status = int(match.group(1), 16)
    assert status not in (0xFF00, 0xFF01), f"the last {message_type} is a pending one: {final}"

    def count(name):
        value = final.get(f"{name} Suboperations", "")
        return int(value) if value.isdigit() else None

    return status, count("Completed"), count("Failed"), count("Warning")


def _tail(text, n=6000):
    return text if len(text) <= n else "...\n" + text[-n:]


def _harmony_log(gateway):
    return f"\n--- Harmony's log ---\n{_tail(gateway['process'].output())}"


def _context(gateway, path_name, tool, output):
    """
    What an assertion message shows: the tool's output, Harmony's log and
    the last errors the PACS logged (Orthanc: E<date> lines, dcmqrscp: E:).
    """
    path = gateway["paths"][path_name]
    errors = [line for line in gateway["peers"][path["peer"]].output().splitlines() if line.startswith("E")]
    pacs = "\n".join(errors[-10:]) or "(none)"
    return (
        f"{tool} through Harmony ({path_name}):\n{_tail(output)}{_harmony_log(gateway)}"
        f"\n--- the last errors {path['peer']} logged ---\n{pacs}"
    )


def _getscu(port, aet, keys, out):
    """
    getscu (Study Root) into a fresh directory C{out}: C{(result, output,
    {SOP Instance UID: Dataset})}.
    """
    out.mkdir(parents=True)
    result = dcmtk("getscu", "-d", "-S", "-aet", "HRPGETSCU", "-aec", aet, "-od", out, *keys, "127.0.0.1", port)
    output = result.stdout + result.stderr
    return result, output, _read_all(out)


def _read_all(directory):
    datasets = {}
    for path in sorted(Path(directory).iterdir()):
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID not in datasets, f"{ds.SOPInstanceUID} received twice"
        datasets[ds.SOPInstanceUID] = ds
    return datasets


def _movescu(port, destination, keys):
    result = dcmtk(
        "movescu", "-d", "-S", "-aet", "HRPMOVESCU", "-aec", HARMONY_AET, "-aem", destination, *keys, "127.0.0.1", port
    )
    return result, result.stdout + result.stderr


def _echoscu(port, aet):
    result = dcmtk("echoscu", "-aet", "HRPECHOSCU", "-aec", aet, "127.0.0.1", port)
    return result, result.stdout + result.stderr


# -- data set comparison -----------------------------------------------------------------


def _assert_same_dataset(received, expected, what, ignore=()):
    """
    Element by element, pixel data byte for byte (values only: an implicit
    VR transfer may decode ambiguous VRs differently); C{ignore}: tags
    left out on both sides.
    """
    assert received.SOPInstanceUID == expected.SOPInstanceUID, what
    assert received.PixelData == expected.PixelData, f"{what}: PixelData differs"
    theirs = {e.tag for e in received if e.tag not in ignore}
    ours = {e.tag for e in expected if e.tag not in ignore}
    assert theirs == ours, f"{what}: elements differ: missing {sorted(ours - theirs)}, extra {sorted(theirs - ours)}"
    for element in expected:
        if element.tag in ignore:
            continue
        assert received[element.tag].value == element.value, (
            f"{what}: {element.tag} differs: {received[element.tag]!r} != {element!r}"
        )


def _assert_originals(received, study, expected_uids, what):
    """
    The received data sets are exactly C{expected_uids}, each equal to the
    original that was stored (its trailing padding aside: Orthanc drops it).
    """
    assert sorted(received) == sorted(expected_uids), f"{what}: wrong instances"
    for uid, ds in received.items():
        original = pydicom.dcmread(study["originals"][uid])
        _assert_same_dataset(ds, original, f"{what} vs the original {uid}", ignore=(TRAILING_PADDING,))


# -- C-GET through Harmony ------------------------------------------------------------------


def _check_get(gateway, study, tmp_path, path_name, keys, expected_uids):
    path = gateway["paths"][path_name]
    direct_result, direct_output, direct = _getscu(path["pacs_port"], path["pacs_aet"], keys, tmp_path / "direct")
    assert direct_result.returncode == 0, _tail(direct_output)
    assert _final(direct_output, "C-GET RSP")[0] == 0x0000, _tail(direct_output)
    result, output, through = _getscu(path["scp_port"], HARMONY_AET, keys, tmp_path / "through")
    context = _context(gateway, path_name, "getscu", output)
    status, completed, failed, warning = _final(output, "C-GET RSP")
    assert status == 0x0000, f"final C-GET status {status:04X}, expected 0000\n{context}"
    assert result.returncode == 0, context
    assert (completed, failed or 0, warning or 0) == (len(expected_uids), 0, 0), context
    # Exactly what the PACS gives directly, element by element...
    assert sorted(direct) == sorted(expected_uids), f"the PACS itself gave {sorted(direct)}"
    assert sorted(through) == sorted(direct), context
    for uid, ds in through.items():
        _assert_same_dataset(ds, direct[uid], f"{path_name}: {uid} through Harmony vs directly")
    # ... and what was stored.
    _assert_originals(through, study, expected_uids, path_name)


@pytest.mark.parametrize("path_name", PATHS)
def test_get_study(gateway, study, tmp_path, path_name):
    keys = _keys("STUDY", study["study"])
    _check_get(gateway, study, tmp_path, path_name, keys, list(study["originals"]))


@pytest.mark.parametrize("path_name", PATHS)
def test_get_series(gateway, study, tmp_path, path_name):
    keys = _keys("SERIES", study["study"], study["s1"])
    _check_get(gateway, study, tmp_path, path_name, keys, sorted(study["series"][study["s1"]]))


@pytest.mark.parametrize("path_name", PATHS)
def test_get_nothing(gateway, study, tmp_path, path_name):
    """
    A series that does not exist: getscu gets no file, the final status is
    the PACS's answer to the backend's own retrieve (C-GET, or C-MOVE to
    Harmony in move mode) -- success with no sub-operation, a warning or a
    failure, never a pending one -- and Harmony stays up.
    """
    path = gateway["paths"][path_name]
    keys = _keys("SERIES", study["study"], generate_uid())
    # What the PACS answers to the backend's own operation.
    if path["mode"] == "get":
        direct_result, direct_output, direct = _getscu(path["pacs_port"], path["pacs_aet"], keys, tmp_path / "direct")
        assert direct == {}, direct
        expected = _final(direct_output, "C-GET RSP")[0]
    else:
        direct_result = dcmtk(
            "movescu", "-d", "-S", "-aet", "HRPMOVESCU", "-aec", path["pacs_aet"], "-aem", path["local_aet"],
            *keys, "127.0.0.1", path["pacs_port"],
        )
        direct_output = direct_result.stdout + direct_result.stderr
        expected = _final(direct_output, "C-MOVE RSP")[0]
    result, output, through = _getscu(path["scp_port"], HARMONY_AET, keys, tmp_path / "through")
    context = _context(gateway, path_name, "getscu", output)
    assert through == {}, context
    status, completed, failed, warning = _final(output, "C-GET RSP")
    assert not completed, context
    assert status == expected, f"status {status:04X} through Harmony, {expected:04X} from the PACS\n{context}"
    echo, echo_output = _echoscu(path["scp_port"], HARMONY_AET)
    assert echo.returncode == 0, f"C-ECHO after the empty retrieve failed:\n{echo_output}{_harmony_log(gateway)}"
    assert gateway["process"].popen.poll() is None, _harmony_log(gateway)


# -- C-MOVE through Harmony -------------------------------------------------------------------


def _clear(directory):
    for entry in Path(directory).iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@pytest.mark.parametrize("path_name", PATHS)
def test_move_study(gateway, study, path_name):
    path = gateway["paths"][path_name]
    out = gateway["storescp"]["out"]
    _clear(out)
    result, output = _movescu(path["scp_port"], STORESCP_AET, _keys("STUDY", study["study"]))
    context = _context(gateway, path_name, "movescu", output)
    status, completed, failed, warning = _final(output, "C-MOVE RSP")
    assert status == 0x0000, f"final C-MOVE status {status:04X}, expected 0000\n{context}"
    assert result.returncode == 0, context
    assert (completed, failed or 0, warning or 0) == (3, 0, 0), context
    # Every C-STORE-RSP came back before the final response: all on disk.
    received = _read_all(out)
    _assert_originals(received, study, list(study["originals"]), f"{path_name}: storescp")


@pytest.mark.parametrize("path_name", PATHS)
def test_move_series(gateway, study, path_name):
    path = gateway["paths"][path_name]
    out = gateway["storescp"]["out"]
    _clear(out)
    result, output = _movescu(path["scp_port"], STORESCP_AET, _keys("SERIES", study["study"], study["s2"]))
    context = _context(gateway, path_name, "movescu", output)
    status, completed, failed, warning = _final(output, "C-MOVE RSP")
    assert status == 0x0000, f"final C-MOVE status {status:04X}, expected 0000\n{context}"
    assert result.returncode == 0, context
    assert (completed, failed or 0, warning or 0) == (1, 0, 0), context
    received = _read_all(out)
    _assert_originals(received, study, sorted(study["series"][study["s2"]]), f"{path_name}: storescp")


@pytest.mark.parametrize("path_name", PATHS)
def test_move_to_unknown_destination(gateway, study, path_name):
    path = gateway["paths"][path_name]
    out = gateway["storescp"]["out"]
    _clear(out)
    result, output = _movescu(path["scp_port"], "UNKNOWNAE", _keys("STUDY", study["study"]))
    context = _context(gateway, path_name, "movescu", output)
    status, completed, failed, warning = _final(output, "C-MOVE RSP")
    assert status == 0xA801, f"final C-MOVE status {status:04X}, expected A801\n{context}"
    assert not completed, context
    # movescu reports the failure in its exit status.
    assert result.returncode != 0, context
    assert list(out.iterdir()) == []
    echo, echo_output = _echoscu(path["scp_port"], HARMONY_AET)
    assert echo.returncode == 0, echo_output


# -- the spool -------------------------------------------------------------------------------------


def _dcm_files(directory):
    """
    The .dcm files below C{directory} (os.walk: directories Harmony removes
    meanwhile are skipped, not errors).
    """
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(directory)
        for name in names
        if name.endswith(".dcm")
    )


@pytest.mark.parametrize("path_name", PATHS)
def test_spool_is_emptied(gateway, study, tmp_path, path_name):
    """
    After a C-GET and a C-MOVE through Harmony, the backend's spool
    (<[storage.options] path>/spool/<backend>) was used and holds no .dcm
    file; nothing is kept under <path>/retrieved either.
    """
    path = gateway["paths"][path_name]
    result, output, through = _getscu(path["scp_port"], HARMONY_AET, _keys("STUDY", study["study"]), tmp_path / "g")
    status = _final(output, "C-GET RSP")[0]
    assert (status, len(through)) == (0x0000, 3), _context(gateway, path_name, "getscu", output)
    result, output = _movescu(path["scp_port"], STORESCP_AET, _keys("STUDY", study["study"]))
    status = _final(output, "C-MOVE RSP")[0]
    assert status == 0x0000, _context(gateway, path_name, "movescu", output)
    spool = path["spool"]
    assert spool.is_dir(), f"{spool} does not exist: where did the retrieved instances go?{_harmony_log(gateway)}"
    retrieved = gateway["directory"] / "store" / "retrieved"
    deadline = time.monotonic() + 5
    while (_dcm_files(spool) or _dcm_files(retrieved)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dcm_files(spool) == [], f"spooled copies left behind{_harmony_log(gateway)}"
    assert _dcm_files(retrieved) == [], f"retrieved copies left behind{_harmony_log(gateway)}"
