"""
The dicom_scp endpoint's C-GET / C-MOVE options: enable_get, enable_move
and the move_destinations table through the configuration loader, the
association policy they build (Q/R contexts, the SCP role for the storage
SOP classes of a C-GET), and the services registered (built on a
MemoryReactorClock, never started).
"""

import textwrap

import pydicom
import pytest
from _deferreds import result_of
from pydicom import Dataset
from pydicom import uid as pydicom_uid
from pydicom.data import get_testdata_file
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from harmony.config import ConfigError, load_config
from harmony.dimse import messages
from harmony.dimse.retrieve import RetrieveService
from harmony.dimse.scu import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    DicomClient,
)
from harmony.endpoints.dicom_scp import DEFAULT_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, parse_address
from harmony.envelope import DicomInstance, DicomResult, ResponseEnvelope
from harmony.registry import BuildContext, builtin_registry
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import Stream

VERIFICATION = messages.VERIFICATION_SOP_CLASS
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = pydicom_uid.ExplicitVRLittleEndian
IMPLICIT = pydicom_uid.ImplicitVRLittleEndian
QR_SYNTAXES = [EXPLICIT, IMPLICIT]

BASE = """
[proxy]
id = "test-gw"

[pipelines.dimse]
endpoints = ["scp"]
backends = ["out"]

[backends.out]
service = "echo"

[endpoints.scp]
service = "dicom"
"""


def load(tmp_path, options='local_aet = "HARMONY"\n'):
    text = BASE + "[endpoints.scp.options]\n" + textwrap.dedent(options)
    path = tmp_path / "harmony.toml"
    path.write_text(text)
    return load_config(str(path), registry=builtin_registry(), environ={})


def make(tmp_path, options='local_aet = "HARMONY"\n'):
    config = load(tmp_path, options)
    entry = config.endpoints["scp"]
    stype = builtin_registry().service(entry.service, "endpoint")
    return stype.make_endpoint("scp", entry.options, BuildContext(config=config))


def load_error(tmp_path, options):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, options)
    return info.value


# -- options ----------------------------------------------------------------------------


def test_defaults(tmp_path):
    options = load(tmp_path).endpoints["scp"].options
    assert options.enable_get is False
    assert options.enable_move is False
    assert dict(options.move_destinations) == {}


def test_move_destinations(tmp_path):
    options = load(
        tmp_path,
        """
        local_aet = "HARMONY"
        enable_get = true
        enable_move = true
        [endpoints.scp.options.move_destinations]
        PACS = "pacs.example.org:104"
        "VIEWER 2" = "10.0.0.7:11112"
        " PADDED " = "[::1]:4242"
        """,
    ).endpoints["scp"].options
    assert (options.enable_get, options.enable_move) == (True, True)
    assert dict(options.move_destinations) == {
        "PACS": ("pacs.example.org", 104),
        "VIEWER 2": ("10.0.0.7", 11112),
        "PADDED": ("::1", 4242),
    }


@pytest.mark.parametrize(
    "table,key,message",
    [
        ('PACS = "pacs.example.org"', "PACS", "host:port"),
        ('PACS = "pacs.example.org:"', "PACS", "host:port"),
        ('PACS = ":104"', "PACS", "host:port"),
        ('PACS = "pacs:abc"', "PACS", "host:port"),
        ('PACS = "pacs:0"', "PACS", "1..65535"),
        ('PACS = "pacs:70000"', "PACS", "1..65535"),
        ('PACS = ""', "PACS", "empty"),
        ("PACS = 104", "PACS", "expected string"),
        ('WAY_TOO_LONG_AE_TITLE = "pacs:104"', "WAY_TOO_LONG_AE_TITLE", "16 characters"),
        ('"BACK\\\\SLASH" = "pacs:104"', "BACK\\SLASH", "backslash"),
        ('"   " = "pacs:104"', "   ", "spaces"),
        ('"A" = "pacs:104"\n" A" = "other:104"', " A", "twice"),
    ],
)
def test_move_destination_errors_name_the_key(tmp_path, table, key, message):
    options = 'local_aet = "HARMONY"\nenable_move = true\n[endpoints.scp.options.move_destinations]\n'
    error = load_error(tmp_path, options + table + "\n")
    assert error.file == "harmony.toml"
    assert error.keypath == ("endpoints", "scp", "options", "move_destinations", key), str(error)
    assert message in error.message, error.message


def test_move_destinations_must_be_a_table(tmp_path):
    error = load_error(tmp_path, 'local_aet = "HARMONY"\nmove_destinations = ["PACS"]\n')
    assert error.keypath == ("endpoints", "scp", "options", "move_destinations")
    assert "table" in error.message


@pytest.mark.parametrize("key", ["enable_get", "enable_move"])
def test_enable_flags_are_booleans(tmp_path, key):
    error = load_error(tmp_path, f'local_aet = "HARMONY"\n{key} = "yes"\n')
    assert error.keypath == ("endpoints", "scp", "options", key)


def test_parse_address():
    assert parse_address("host:1") == ("host", 1)
    assert parse_address(" [fe80::1]:65535 ") == ("fe80::1", 65535)
    for bad in ("host", "host:", ":1", "host:-1", "host:1.5", "host:65536"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- policy ---------------------------------------------------------------------------------


def test_policy_nothing_retrieves_by_default(tmp_path):
    policy = make(tmp_path).policy()
    for uid in list(GET_MODELS.values()) + list(MOVE_MODELS.values()):
        assert uid not in policy.syntaxes
    assert policy.requestor_scp_allowed == frozenset()


def test_policy_get(tmp_path):
    policy = make(tmp_path, 'local_aet = "HARMONY"\nenable_get = true\n').policy()
    assert policy.syntaxes[STUDY_ROOT_GET] == QR_SYNTAXES
    assert policy.syntaxes[PATIENT_ROOT_GET] == QR_SYNTAXES
    assert STUDY_ROOT_MOVE not in policy.syntaxes
    for uid in FIND_MODELS.values():
        assert uid not in policy.syntaxes
    # The storage contexts of the sub-operations, with the SCP role, even
    # though C-STORE is not enabled.
    assert policy.requestor_scp_allowed == frozenset(STORAGE_SOP_CLASSES)
    for sop_class in STORAGE_SOP_CLASSES:
        assert list(policy.syntaxes[sop_class]) == list(DEFAULT_TRANSFER_SYNTAXES)


def test_policy_get_with_configured_classes_and_syntaxes(tmp_path):
    policy = make(
        tmp_path,
        f"""
        local_aet = "HARMONY"
        enable_get = true
        enable_echo = false
        sop_classes = ["{CT}"]
        transfer_syntaxes = ["{EXPLICIT}"]
        """,
    ).policy()
    assert policy.syntaxes == {STUDY_ROOT_GET: QR_SYNTAXES, PATIENT_ROOT_GET: QR_SYNTAXES, CT: [EXPLICIT]}
    assert policy.requestor_scp_allowed == frozenset({CT})


def test_policy_move(tmp_path):
    policy = make(tmp_path, 'local_aet = "HARMONY"\nenable_move = true\nenable_echo = false\n').policy()
    assert policy.syntaxes == {STUDY_ROOT_MOVE: QR_SYNTAXES, PATIENT_ROOT_MOVE: QR_SYNTAXES}
    assert policy.requestor_scp_allowed == frozenset()


def test_policy_everything(tmp_path):
    policy = make(
        tmp_path,
        'local_aet = "HARMONY"\nenable_get = true\nenable_move = true\nenable_find = true\nenable_store = true\n',
    ).policy()
    for uid in list(FIND_MODELS.values()) + list(GET_MODELS.values()) + list(MOVE_MODELS.values()):
        assert policy.syntaxes[uid] == QR_SYNTAXES
    assert VERIFICATION in policy.syntaxes
    assert CT in policy.syntaxes and MR in policy.syntaxes


# -- services --------------------------------------------------------------------------------


class Executor:
    backends = ("pacs",)
    request_chain = response_chain = ()

    def __init__(self):
        self.requests = []
        self.result = None

    def execute(self, endpoint, envelope):
        self.requests.append((endpoint, envelope))
        return defer.succeed(ResponseEnvelope(status=200, dicom=self.result))


def test_services_register_the_retrieve_services(tmp_path):
    endpoint = make(
        tmp_path,
        """
        local_aet = "HARMONY"
        enable_get = true
        enable_move = true
        dimse_timeout_secs = 12
        [endpoints.scp.options.move_destinations]
        PACS = "pacs.example.org:104"
        """,
    )
    reactor = MemoryReactorClock()
    executor = Executor()
    storage, listener = endpoint.services(executor, reactor)
    services = listener.factory.services
    # Relayed instances given only as a stream are spooled in the endpoint's storage.
    assert services[messages.C_GET_RQ].storage is storage is services[messages.C_MOVE_RQ].storage
    assert storage.root == endpoint.storage_dir()
    assert set(services) == {messages.C_GET_RQ, messages.C_MOVE_RQ}
    get, move = services[messages.C_GET_RQ], services[messages.C_MOVE_RQ]
    assert isinstance(get, RetrieveService) and isinstance(move, RetrieveService)
    assert (get.kind, move.kind) == ("get", "move")
    assert get.pipeline == move.pipeline == (executor, endpoint)
    assert move.destinations == {"PACS": ("pacs.example.org", 104)}
    assert isinstance(move.client, DicomClient)
    assert move.client.local_aet == "HARMONY"
    assert move.client.reactor is reactor
    assert move.client.dimse_timeout == 12


def _connect(reactor, listener, d):
    _, _, client_factory, _, _ = reactor.tcpClients[-1]
    server = listener.factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=True,
                         clock=reactor)
    pump.flush()
    return result_of(d), pump


def test_get_role_accepted_and_store_still_refused(tmp_path):
    """
    With C-GET enabled and C-STORE not: the storage contexts are accepted
    (with the SCP role when asked), but a C-STORE-RQ from the requestor is
    refused as before.
    """
    endpoint = make(tmp_path, 'local_aet = "HARMONY"\nenable_get = true\n')
    reactor = MemoryReactorClock()
    _, listener = endpoint.services(Executor(), reactor)
    client = DicomClient(reactor, "GETSCU")
    association, pump = _connect(
        reactor, listener, client.associate_for_get("127.0.0.1", 11112, "HARMONY", [(CT, [EXPLICIT])])
    )
    contexts = {c.abstract_syntax: c for c in association.contexts.values()}
    assert contexts[CT].requestor_scp and not contexts[CT].requestor_scu
    assert STUDY_ROOT_GET in contexts

    path = get_testdata_file("CT_small.dcm", download=False)
    ts = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    plain, pump = _connect(reactor, listener, client.associate("127.0.0.1", 11112, "HARMONY", [(CT, [ts])]))
    statuses = []
    plain.store_file(path).addCallback(statuses.append)
    pump.flush()
    assert [s.status for s in statuses] == [0x0211]


def test_get_through_the_endpoint(tmp_path):
    endpoint = make(tmp_path, 'local_aet = "HARMONY"\nenable_get = true\n')
    reactor = MemoryReactorClock()
    executor = Executor()
    path = get_testdata_file("CT_small.dcm", download=False)
    original = pydicom.dcmread(path)
    disposed = []
    instances = Stream()
    instances.write(
        DicomInstance(
            original.SOPClassUID,
            original.SOPInstanceUID,
            original.file_meta.TransferSyntaxUID,
            data=None,
            path=path,
            dispose=lambda: disposed.append(True),
        )
    )
    instances.finish()
    executor.result = DicomResult(status=None, instances=instances, done=defer.succeed((0x0000, None)))
    _, listener = endpoint.services(executor, reactor)
    client = DicomClient(reactor, "GETSCU")
    association, pump = _connect(
        reactor,
        listener,
        client.associate_for_get(
            "127.0.0.1", 11112, "HARMONY", [(original.SOPClassUID, [original.file_meta.TransferSyntaxUID])]
        ),
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = original.StudyInstanceUID
    storage = FilesystemStorage(str(tmp_path / "received"), reactor=reactor)
    get = association.get(identifier, storage=storage)
    pump.flush()
    status = result_of(get.result)
    assert status.status == 0x0000
    assert status.fields["NumberOfCompletedSuboperations"] == 1
    received = result_of(get.instances.read())
    assert pydicom.dcmread(received.path).PixelData == original.PixelData
    assert disposed == [True]
    [(called, envelope)] = executor.requests
    assert called is endpoint
    assert envelope.dicom.operation == "get"
