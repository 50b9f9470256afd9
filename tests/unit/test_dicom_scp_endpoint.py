"""
The dicom_scp endpoint (harmony.endpoints.dicom_scp): options through the
configuration loader, the association policy it builds, error rendering,
and the services it runs (built on a MemoryReactorClock, never started).
"""

import os
import textwrap

import pydicom
import pytest
from pydicom import uid as pydicom_uid
from pydicom.data import get_testdata_file
from pynetdicom.presentation import AllStoragePresentationContexts
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from zope.interface.verify import verifyObject

from harmony import errors
from harmony.config import ConfigError, load_config
from harmony.dimse import messages
from harmony.dimse import status as dimse_status
from harmony.dimse.scu import DicomClient
from harmony.dimse.store import StoreService
from harmony.endpoints import dicom_scp
from harmony.endpoints.dicom_scp import DEFAULT_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, DicomScpEndpoint
from harmony.envelope import ResponseEnvelope
from harmony.interfaces import IEndpoint
from harmony.registry import BuildContext, builtin_registry
from harmony.storage.filesystem import FilesystemStorage

VERIFICATION = messages.VERIFICATION_SOP_CLASS
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

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


def write(tmp_path, options="", extra=""):
    """
    Write a configuration whose endpoint "scp" has C{options} (TOML lines
    under [endpoints.scp.options]); return its path.
    """
    text = BASE + "[endpoints.scp.options]\n" + textwrap.dedent(options) + textwrap.dedent(extra)
    path = tmp_path / "harmony.toml"
    path.write_text(text)
    return str(path)


def load(tmp_path, options='local_aet = "HARMONY"\n', extra=""):
    return load_config(write(tmp_path, options, extra), registry=builtin_registry(), environ={})


def load_error(tmp_path, options, extra=""):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, options, extra)
    return info.value


def endpoint_for(config, name="scp"):
    entry = config.endpoints[name]
    stype = builtin_registry().service(entry.service, "endpoint")
    return stype.make_endpoint(name, entry.options, BuildContext(config=config))


def make(tmp_path, options='local_aet = "HARMONY"\n', extra=""):
    return endpoint_for(load(tmp_path, options, extra))


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def test_dicom_alias_and_defaults(tmp_path):
    config = load(tmp_path)
    entry = config.endpoints["scp"]
    assert entry.service == "dicom_scp"
    options = entry.options
    assert options.local_aet == "HARMONY"
    assert options.bind_addr == "0.0.0.0"
    assert options.port == 11112
    assert options.enable_echo is True
    assert options.enable_store is False
    assert options.storage_dir == ""
    assert options.storage_layout == "{study}/{series}/{sop}.dcm"
    assert options.fsync is False
    assert tuple(options.allowed_calling_aets) == ()
    assert options.require_called_aet is True
    assert options.max_associations == 32
    assert options.max_associations_per_aet == 0
    assert options.max_pdu_length == 131072
    assert options.idle_timeout_secs == 60.0
    assert options.dimse_timeout_secs == 30.0
    assert options.artim_timeout_secs == 30.0
    assert tuple(options.sop_classes) == ()
    assert tuple(options.transfer_syntaxes) == ()
    # A DIMSE endpoint needs no HTTP network.
    assert config.pipelines["dimse"].networks == ()


def test_options_given(tmp_path):
    options = make(
        tmp_path,
        """
        local_aet = "MY_SCP"
        bind_addr = "127.0.0.1"
        port = 4242
        enable_echo = false
        enable_store = true
        storage_dir = "/var/lib/harmony/dicom"
        storage_layout = "{sop}.dcm"
        fsync = true
        allowed_calling_aets = ["A", "B"]
        require_called_aet = false
        max_associations = 3
        max_associations_per_aet = 2
        max_pdu_length = 0
        idle_timeout_secs = 5
        artim_timeout_secs = 2.5
        sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]
        transfer_syntaxes = ["1.2.840.10008.1.2"]
        """,
    ).options
    assert options.local_aet == "MY_SCP"
    assert (options.bind_addr, options.port) == ("127.0.0.1", 4242)
    assert (options.enable_echo, options.enable_store, options.fsync) == (False, True, True)
    assert options.storage_layout == "{sop}.dcm"
    assert tuple(options.allowed_calling_aets) == ("A", "B")
    assert options.max_pdu_length == 0
    assert (options.max_associations, options.max_associations_per_aet) == (3, 2)
    assert options.idle_timeout_secs == 5


@pytest.mark.parametrize(
    "options,key",
    [
        ("", "local_aet"),
        ('local_aet = ""', "local_aet"),
        ('local_aet = "   "', "local_aet"),
        ('local_aet = "WAY_TOO_LONG_AE_TITLE"', "local_aet"),
        ('local_aet = "BACK\\\\SLASH"', "local_aet"),
        ("local_aet = 12", "local_aet"),
        ('local_aet = "A"\nport = 70000', "port"),
        ('local_aet = "A"\nport = -1', "port"),
        ('local_aet = "A"\nport = "abc"', "port"),
        ('local_aet = "A"\nbind_addr = ""', "bind_addr"),
        ('local_aet = "A"\nstorage_layout = "{study}/{series}.dcm"', "storage_layout"),
        ('local_aet = "A"\nstorage_layout = "{patient}/{sop}.dcm"', "storage_layout"),
        ('local_aet = "A"\nstorage_layout = "../{sop}.dcm"', "storage_layout"),
        ('local_aet = "A"\nstorage_layout = "/abs/{sop}.dcm"', "storage_layout"),
        ('local_aet = "A"\nstorage_layout = "{sop:>10}"', "storage_layout"),
        ('local_aet = "A"\nstorage_layout = ""', "storage_layout"),
        ('local_aet = "A"\nallowed_calling_aets = ["OK", "THIS_ONE_IS_TOO_LONG"]', "allowed_calling_aets"),
        ('local_aet = "A"\nmax_associations = 0', "max_associations"),
        ('local_aet = "A"\nmax_associations_per_aet = -1', "max_associations_per_aet"),
        ('local_aet = "A"\nmax_associations_per_aet = "2"', "max_associations_per_aet"),
        ('local_aet = "A"\nmax_pdu_length = -1', "max_pdu_length"),
        ('local_aet = "A"\nidle_timeout_secs = 0', "idle_timeout_secs"),
        ('local_aet = "A"\nsop_classes = ["CT Image Storage"]', "sop_classes"),
        ('local_aet = "A"\ntransfer_syntaxes = ["1.2.840.10008.1.2", "explicit"]', "transfer_syntaxes"),
        ('local_aet = "A"\nenable_store = "yes"', "enable_store"),
        ('local_aet = "A"\nno_such_option = 1', "no_such_option"),
    ],
)
def test_option_errors_name_the_key(tmp_path, options, key):
    error = load_error(tmp_path, options)
    assert error.file == "harmony.toml"
    assert error.keypath[:3] == ("endpoints", "scp", "options")
    assert error.keypath[3] == key, str(error)
    assert str(error).startswith(f"harmony.toml: endpoints.scp.options.{key}")


def test_layout_error_message(tmp_path):
    error = load_error(tmp_path, 'local_aet = "A"\nstorage_layout = "{study}/{series}.dcm"')
    assert "{sop}" in error.message


def test_pipelines_file_error_names_that_file(tmp_path):
    path = tmp_path / "harmony.toml"
    path.write_text('[proxy]\nid = "gw"\n')
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "dicom.toml").write_text(
        '[endpoints.scp]\nservice = "dimse"\n[endpoints.scp.options]\nlocal_aet = "A"\nport = 99999\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), registry=builtin_registry(), environ={})
    assert info.value.file == os.path.join("pipelines", "dicom.toml")
    assert info.value.key == "endpoints.scp.options.port"


# ---------------------------------------------------------------------------
# The endpoint object
# ---------------------------------------------------------------------------


def test_provides_iendpoint(tmp_path):
    endpoint = make(tmp_path)
    assert isinstance(endpoint, DicomScpEndpoint)
    assert verifyObject(IEndpoint, endpoint)
    assert endpoint.name == "scp"
    assert endpoint.service_type == "dicom_scp"
    assert endpoint.http_routes() == []
    assert builtin_registry().service("dicom_scp").endpoint_protocol == "dimse"


def test_listen_addresses(tmp_path):
    assert make(tmp_path).listen_addresses() == [("0.0.0.0", 11112)]
    endpoint = make(tmp_path, 'local_aet = "A"\nbind_addr = "127.0.0.1"\nport = 0\n')
    assert endpoint.listen_addresses() == [("127.0.0.1", 0)]


def test_hooks_pass_through(tmp_path):
    endpoint = make(tmp_path)
    assert endpoint.incoming(object()) is None
    response = ResponseEnvelope(status=200)
    assert endpoint.outgoing(object(), response) is response


# -- policy ---------------------------------------------------------------------


def test_policy_echo_only_by_default(tmp_path):
    policy = make(tmp_path).policy()
    assert policy.ae_title == "HARMONY"
    assert policy.syntaxes == {
        VERIFICATION: [pydicom_uid.ImplicitVRLittleEndian, pydicom_uid.ExplicitVRLittleEndian]
    }
    assert policy.require_called_aet is True
    assert policy.allowed_calling_aets == frozenset()
    assert policy.max_associations == 32
    assert policy.max_associations_per_aet == 0


def test_policy_with_store(tmp_path):
    policy = make(tmp_path, 'local_aet = "HARMONY"\nenable_store = true\n').policy()
    assert VERIFICATION in policy.syntaxes
    storage = {k: v for k, v in policy.syntaxes.items() if k != VERIFICATION}
    assert set(storage) == set(STORAGE_SOP_CLASSES)
    assert set(STORAGE_SOP_CLASSES) == {c.abstract_syntax for c in AllStoragePresentationContexts}
    assert CT in storage and MR in storage
    assert all(list(v) == list(DEFAULT_TRANSFER_SYNTAXES) for v in storage.values())
    for ts in (
        pydicom_uid.ImplicitVRLittleEndian,
        pydicom_uid.ExplicitVRLittleEndian,
        pydicom_uid.DeflatedExplicitVRLittleEndian,
        pydicom_uid.RLELossless,
        pydicom_uid.JPEGBaseline8Bit,
        pydicom_uid.JPEG2000Lossless,
    ):
        assert ts in DEFAULT_TRANSFER_SYNTAXES


def test_policy_store_without_echo(tmp_path):
    policy = make(tmp_path, 'local_aet = "HARMONY"\nenable_store = true\nenable_echo = false\n').policy()
    assert VERIFICATION not in policy.syntaxes
    assert CT in policy.syntaxes


def test_policy_nothing_enabled(tmp_path):
    policy = make(tmp_path, 'local_aet = "HARMONY"\nenable_echo = false\n').policy()
    assert policy.syntaxes == {}


def test_policy_overrides(tmp_path):
    endpoint = make(
        tmp_path,
        f"""
        local_aet = "HARMONY"
        enable_store = true
        sop_classes = ["{CT}", "{MR}"]
        transfer_syntaxes = ["{pydicom_uid.ExplicitVRLittleEndian}"]
        allowed_calling_aets = ["MODALITY"]
        require_called_aet = false
        max_associations = 2
        max_associations_per_aet = 1
        """,
    )
    policy = endpoint.policy()
    assert policy.syntaxes == {
        VERIFICATION: [pydicom_uid.ImplicitVRLittleEndian, pydicom_uid.ExplicitVRLittleEndian],
        CT: [pydicom_uid.ExplicitVRLittleEndian],
        MR: [pydicom_uid.ExplicitVRLittleEndian],
    }
    assert policy.allowed_calling_aets == frozenset({"MODALITY"})
    assert policy.require_called_aet is False
    assert policy.max_associations == 2
    assert policy.max_associations_per_aet == 1


def test_sop_classes_ignored_without_store(tmp_path):
    policy = make(tmp_path, f'local_aet = "HARMONY"\nsop_classes = ["{CT}"]\n').policy()
    assert list(policy.syntaxes) == [VERIFICATION]


# -- render_error ---------------------------------------------------------------


@pytest.mark.parametrize(
    "error,status",
    [
        (errors.Unauthorized(), dimse_status.NOT_AUTHORIZED),
        (errors.Forbidden(), dimse_status.NOT_AUTHORIZED),
        (errors.PayloadTooLarge(), dimse_status.OUT_OF_RESOURCES),
        (errors.UnsupportedMediaType(), dimse_status.SOP_CLASS_NOT_SUPPORTED),
        (errors.BadRequest(), dimse_status.CANNOT_UNDERSTAND),
        (errors.UpstreamUnavailable(), dimse_status.OUT_OF_RESOURCES),
        (errors.UpstreamTimeout(), dimse_status.OUT_OF_RESOURCES),
        (errors.ServiceUnavailable(), dimse_status.OUT_OF_RESOURCES),
        (errors.TooManyRequests(3), dimse_status.OUT_OF_RESOURCES),
        (errors.NotFound(), dimse_status.PROCESSING_FAILURE),
        (errors.MethodNotAllowed(), dimse_status.PROCESSING_FAILURE),
        (errors.InternalError(), dimse_status.PROCESSING_FAILURE),
        (errors.HarmonyError(), dimse_status.PROCESSING_FAILURE),
    ],
)
def test_render_error(tmp_path, error, status):
    response = make(tmp_path).render_error(error)
    assert isinstance(response, ResponseEnvelope)
    assert response.status == error.status
    assert response.dicom.status == status
    assert response.dicom.error_comment == error.message
    assert dimse_status.is_failure(response.dicom.status)


def test_render_error_values():
    # The table itself (PS3.4 / PS3.7 values).
    assert dimse_status.NOT_AUTHORIZED == 0x0124
    assert dimse_status.OUT_OF_RESOURCES == 0xA700
    assert dimse_status.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert dimse_status.CANNOT_UNDERSTAND == 0xC000
    assert dimse_status.PROCESSING_FAILURE == 0x0110


def test_render_error_comment_fits_lo(tmp_path):
    response = make(tmp_path).render_error(errors.BadRequest("x" * 300))
    assert response.dicom.error_comment == "x" * 64


def test_render_error_subclass(tmp_path):
    class TooBusy(errors.ServiceUnavailable):
        pass

    assert make(tmp_path).render_error(TooBusy("busy")).dicom.status == 0xA700


# -- storage_dir ------------------------------------------------------------------


def test_storage_dir_default_under_storage_path(tmp_path):
    endpoint = make(tmp_path, extra='[storage.options]\npath = "data"\n')
    assert endpoint.storage_dir() == os.path.join(str(tmp_path), "data", "dicom")


def test_storage_dir_default_absolute_storage_path(tmp_path):
    root = str(tmp_path / "elsewhere")
    endpoint = make(tmp_path, extra=f'[storage.options]\npath = "{root}"\n')
    assert endpoint.storage_dir() == os.path.join(root, "dicom")


def test_storage_dir_default_without_storage_table(tmp_path):
    # [storage.options] path defaults to ./tmp, relative to the config file.
    assert make(tmp_path).storage_dir() == os.path.join(str(tmp_path), "tmp", "dicom")
    endpoint = make(tmp_path, extra='[storage]\nbackend = "filesystem"\n')
    assert endpoint.storage_dir() == os.path.join(str(tmp_path), "tmp", "dicom")


def test_storage_dir_given(tmp_path):
    endpoint = make(tmp_path, 'local_aet = "A"\nstorage_dir = "received/../incoming"\n')
    assert endpoint.storage_dir() == os.path.join(str(tmp_path), "incoming")
    absolute = str(tmp_path / "abs")
    endpoint = make(tmp_path, f'local_aet = "A"\nstorage_dir = "{absolute}"\n')
    assert endpoint.storage_dir() == absolute


def test_storage_dir_without_config(tmp_path, monkeypatch):
    options = load(tmp_path).endpoints["scp"].options
    monkeypatch.chdir(tmp_path)
    endpoint = DicomScpEndpoint("scp", options)
    assert endpoint.storage_dir() == os.path.join(str(tmp_path), "tmp", "dicom")


# -- services -----------------------------------------------------------------------


class FakeExecutor:
    """
    A pipeline with one backend and no middleware (what StoreService sees).
    """

    request_chain = response_chain = ()

    def __init__(self, response=None, backends=("pacs",)):
        self.response = response or ResponseEnvelope(status=200)
        self.backends = backends
        self.calls = []

    def execute(self, endpoint, envelope):
        self.calls.append((endpoint, envelope))
        return defer.succeed(self.response)


def test_services_with_store(tmp_path):
    endpoint = make(
        tmp_path,
        """
        local_aet = "HARMONY"
        enable_store = true
        port = 4242
        bind_addr = "127.0.0.1"
        max_pdu_length = 16384
        idle_timeout_secs = 7
        artim_timeout_secs = 3
        storage_layout = "{series}/{sop}"
        """,
        extra='[storage.options]\npath = "data"\n',
    )
    reactor = MemoryReactorClock()
    executor = FakeExecutor()
    services = endpoint.services(executor, reactor)
    assert len(services) == 2
    storage, listener = services
    assert isinstance(storage, FilesystemStorage)
    assert storage.root == os.path.join(str(tmp_path), "data", "dicom")
    assert os.path.isdir(storage.root)
    assert not storage.running
    assert isinstance(listener, StreamServerEndpointService)
    assert listener.name == "dicom:scp"
    assert not listener.running
    assert reactor.tcpServers == []  # not listening until started

    factory = listener.factory
    assert factory is endpoint.factory
    assert factory.reactor is reactor
    assert factory.enable_echo is True
    assert factory.policy == endpoint.policy()
    assert factory.settings.max_pdu_length == 16384
    assert factory.settings.idle_timeout == 7
    assert factory.settings.artim_timeout == 3
    service = factory.services[messages.C_STORE_RQ]
    assert isinstance(service, StoreService)
    assert service.storage is storage
    assert service.layout == "{series}/{sop}"
    assert service.fsync is False
    assert service.pipeline == (executor, endpoint)


def test_services_listener_description(tmp_path):
    endpoint = make(tmp_path, 'local_aet = "HARMONY"\nport = 4242\nbind_addr = "127.0.0.1"\n')
    reactor = MemoryReactorClock()
    [listener] = endpoint.services(FakeExecutor(), reactor)
    # The endpoint is a TCP4 server endpoint on the configured address and
    # port (checked without listening).
    assert listener.endpoint._port == 4242
    assert listener.endpoint._interface == "127.0.0.1"
    assert listener.endpoint._reactor is reactor


def test_services_echo_only(tmp_path):
    endpoint = make(tmp_path)
    reactor = MemoryReactorClock()
    services = endpoint.services(FakeExecutor(), reactor)
    assert len(services) == 1
    [listener] = services
    assert isinstance(listener, StreamServerEndpointService)
    assert listener.factory.services == {}
    # The default storage directory is not created when nothing is stored.
    assert not os.path.exists(os.path.join(str(tmp_path), "tmp"))


@pytest.mark.parametrize("backends", [("pacs",), ()])
def test_services_factory_serves(tmp_path, backends):
    """
    The factory built by services() stores a C-STORE through the endpoint's
    pipeline (driven in memory, the listener never started); a pipeline
    without middleware and backends only stores.
    """
    endpoint = make(
        tmp_path,
        """
        local_aet = "HARMONY"
        enable_store = true
        allowed_calling_aets = ["MODALITY"]
        """,
    )
    reactor = MemoryReactorClock()
    executor = FakeExecutor(backends=backends)
    storage, listener = endpoint.services(executor, reactor)
    path = get_testdata_file("CT_small.dcm", download=False)
    ds = pydicom.dcmread(path)

    client = DicomClient(reactor, "MODALITY")
    d = client.associate(
        "127.0.0.1", 11112, "HARMONY", [(VERIFICATION, [pydicom_uid.ImplicitVRLittleEndian]), (CT, [ds.file_meta.TransferSyntaxUID])]
    )
    _, _, client_factory, _, _ = reactor.tcpClients[-1]
    server_protocol = listener.factory.buildProtocol(None)
    client_protocol = client_factory.buildProtocol(None)
    pump = iosim.connect(
        server_protocol,
        iosim.makeFakeServer(server_protocol),
        client_protocol,
        iosim.makeFakeClient(client_protocol),
        greet=True,
    )
    pump.flush()
    box = []
    d.addBoth(box.append)
    association = box[0]
    statuses = []
    association.echo().addCallback(statuses.append)
    association.store_file(path).addCallback(statuses.append)
    pump.flush()
    assert [s.status for s in statuses] == [0x0000, 0x0000]
    stored = os.path.join(storage.root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID + ".dcm")
    assert os.path.isfile(stored)
    assert pydicom.dcmread(stored) == ds
    if backends:
        [(called_endpoint, envelope)] = executor.calls
        assert called_endpoint is endpoint
        assert envelope.dicom.calling_aet == "MODALITY"
    else:
        assert executor.calls == []
    released = []
    association.release().addBoth(released.append)
    pump.flush()
    assert released == [None]


def test_module_exports():
    assert dicom_scp.OPTIONS is builtin_registry().service("dicom", "endpoint").endpoint_options


def test_store_service_routes_moves_with_the_gateways_router(tmp_path):
    from harmony.config.schema import Where
    from harmony.dimse.move import MoveRouter
    from harmony.endpoints.dicom_scp import OPTIONS
    from harmony.registry import BuildContext

    context = BuildContext(move_router=MoveRouter())
    options = OPTIONS.validate(
        {"local_aet": "HARMONY", "enable_store": True, "storage_dir": str(tmp_path / "s")}, Where("t.toml")
    )
    endpoint = DicomScpEndpoint("scp", options, context)
    _, listener = endpoint.services(FakeExecutor(), MemoryReactorClock())
    assert listener.factory.services[messages.C_STORE_RQ].router is context.move_router
