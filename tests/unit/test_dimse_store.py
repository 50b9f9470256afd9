"""
C-STORE between Harmony's SCU and SCP over an in-memory connection
(twisted.test.iosim), with a real FilesystemStorage in a temporary
directory (fsync off: commits happen on the calling thread), and the
instance sent through a fake pipeline executor.
"""

import os
import re

import pydicom
import pytest
from _deferreds import drain, failure_of, result_of
from pydicom.data import get_testdata_file
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from _fakes import FakeThreadPool
from harmony.dimse import messages, pdu
from harmony.dimse import status as dimse_status
from harmony.dimse import store as store_module
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    DicomClient,
    read_part10_header,
)
from harmony.dimse.store import MAX_SPARES, StoreService
from harmony.envelope import DicomInstance, DicomResult, ResponseEnvelope
from harmony.errors import UpstreamTimeout
from harmony.storage.dicom import DEFAULT_LAYOUT
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import Stream

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
VERIFICATION = messages.VERIFICATION_SOP_CLASS
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RTDOSE = "1.2.840.10008.5.1.4.1.1.481.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND

ALL_TS = [EXPLICIT, IMPLICIT, DEFLATED, RLE]
SCP_SYNTAXES = {
    VERIFICATION: [IMPLICIT, EXPLICIT],
    CT: ALL_TS,
    MR: ALL_TS,
    RTDOSE: ALL_TS,
    SC: ALL_TS,
    FIND: [IMPLICIT, EXPLICIT],
}

FILES = {
    "CT_small.dcm": (CT, EXPLICIT),
    "MR_small.dcm": (MR, EXPLICIT),
    "rtdose.dcm": (RTDOSE, IMPLICIT),
    "SC_rgb_rle_2frame.dcm": (SC, RLE),
}

#: What the SCU proposes: each storage class with the transfer syntax of its
#: test file (one context per abstract syntax), plus verification and FIND.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

PROPOSED = [(VERIFICATION, [IMPLICIT])] + [(c, [ts]) for c, ts in FILES.values()] + [(FIND, [IMPLICIT])]


def data_file(name):
    return get_testdata_file(name, download=False)








def dataset_bytes(path):
    """
    The data set of a Part 10 file (the bytes after the file meta).
    """
    header = read_part10_header(path)
    with open(path, "rb") as f:
        f.seek(header.dataset_offset)
        return f.read()


def encode_dataset(ds, transfer_syntax):
    """
    The encoded data set (no file meta) of C{ds} in C{transfer_syntax}.
    """
    from pydicom.filewriter import write_dataset

    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == IMPLICIT
    write_dataset(fp, ds)
    return fp.getvalue()


def uneven_chunks(data, sizes=(1, 7, 4000, 13, 65536, 3, 100000)):
    """
    C{data} cut into chunks of varying sizes (cycling through C{sizes}).
    """
    offset, i = 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        yield data[offset : offset + size]
        offset += size
        i += 1


class FakeExecutor:
    """
    Stands in for a PipelineExecutor: records what it is given and answers
    with C{response} (a ResponseEnvelope, a Deferred, an exception, or a
    callable taking the envelope).
    """

    def __init__(self, response=None):
        self.response = ResponseEnvelope(status=200) if response is None else response
        self.calls = []

    def execute(self, endpoint, envelope):
        self.calls.append((endpoint, envelope))
        response = self.response
        if callable(response) and not isinstance(response, ResponseEnvelope):
            response = response(envelope)
        if isinstance(response, defer.Deferred):
            return response
        if isinstance(response, BaseException):
            return defer.fail(response)
        return defer.succeed(response)


class Peers:
    """
    Harmony's SCU and SCP wired together in memory.
    """

    def __init__(
        self,
        tmp_path,
        pipeline=None,
        scp_settings=None,
        scu_settings=None,
        storage=None,
        layout=DEFAULT_LAYOUT,
    ):
        self.reactor = MemoryReactorClock()
        self.root = str(tmp_path / "store")
        self.storage = storage if storage is not None else FilesystemStorage(self.root, reactor=self.reactor)
        self.executor = pipeline
        self.endpoint = object()
        self.service = StoreService(
            self.storage, layout, fsync=False, pipeline=None if pipeline is None else (pipeline, self.endpoint)
        )
        self.factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("HARMONY", SCP_SYNTAXES),
            scp_settings,
            {messages.C_STORE_RQ: self.service},
        )
        self.client = DicomClient(self.reactor, "TESTSCU", settings=scu_settings)

    def connect(self, syntaxes=PROPOSED):
        d = self.client.associate("127.0.0.1", 11112, "HARMONY", syntaxes)
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        self.server_protocol = self.factory.buildProtocol(None)
        self.client_protocol = factory.buildProtocol(None)
        self.pump = iosim.connect(
            self.server_protocol,
            iosim.makeFakeServer(self.server_protocol),
            self.client_protocol,
            iosim.makeFakeClient(self.client_protocol),
            greet=True,
        )
        self.pump.flush()
        self.association = result_of(d)
        return self.association

    def run(self, d):
        self.pump.flush()
        return result_of(d)

    def stored_files(self):
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(f for f in found if not f.startswith(".tmp" + os.sep))

    def temp_files(self):
        tmp = os.path.join(self.root, ".tmp")
        return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


def relpath_for(ds):
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def check_stored(peers, original_path, sop_instance_uid=None, transfer_syntax=None, dataset=None):
    """
    The instance is stored under the layout path with Harmony's file meta
    and exactly the data set that was sent.
    """
    original = pydicom.dcmread(original_path)
    sop = sop_instance_uid or original.SOPInstanceUID
    relpath = f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{sop}.dcm"
    path = os.path.join(peers.root, *relpath.split("/"))
    assert os.path.isfile(path), peers.stored_files()
    stored = pydicom.dcmread(path)
    meta = stored.file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == "TESTSCU"
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == sop
    assert meta.TransferSyntaxUID == (transfer_syntax or original.file_meta.TransferSyntaxUID)
    expected = dataset if dataset is not None else dataset_bytes(original_path)
    # Byte for byte: the data set was never parsed nor re-encoded (trailing
    # padding included: Harmony's SCU sends the file's data set as it is).
    assert dataset_bytes(path) == expected
    if transfer_syntax is None or transfer_syntax == original.file_meta.TransferSyntaxUID:
        assert stored == original
    assert peers.temp_files() == []
    return path, relpath


# ---------------------------------------------------------------------------
# Storing: store_file, store(bytes), store(iterable)
# ---------------------------------------------------------------------------

SIZES = [
    # (SCP max PDU: the SCU's fragment size, SCU max PDU: the SCP's responses)
    (4096, 4096),
    (16384, 16384),
    (0, 0),
    (131072, 128),
    (1000, 0),
]


@pytest.mark.parametrize("scp_pdu,scu_pdu", SIZES)
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"])
def test_store_file(tmp_path, name, scp_pdu, scu_pdu):
    peers = Peers(
        tmp_path,
        scp_settings=AssociationSettings(max_pdu_length=scp_pdu),
        scu_settings=AssociationSettings(max_pdu_length=scu_pdu),
    )
    association = peers.connect()
    assert association.association.peer_max_pdu == scp_pdu
    status = peers.run(association.store_file(data_file(name), chunk_size=5000))
    assert status.status == 0x0000, status
    assert status.error_comment is None
    assert status.fields["AffectedSOPInstanceUID"] == pydicom.dcmread(data_file(name)).SOPInstanceUID
    check_stored(peers, data_file(name))
    peers.run(association.release())
    assert peers.factory.active == set()


@pytest.mark.parametrize("chunk_size", [1, 17, 4096, 1 << 20])
def test_store_file_chunk_sizes(tmp_path, chunk_size):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=8192))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm"), chunk_size=chunk_size))
    assert status.ok
    check_stored(peers, data_file("CT_small.dcm"))


@pytest.mark.parametrize("scp_pdu", [4096, 16384, 0])
@pytest.mark.parametrize("name", list(FILES))
def test_store_bytes(tmp_path, name, scp_pdu):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=scp_pdu))
    association = peers.connect()
    path = data_file(name)
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path)
    sop_class, ts = FILES[name]
    status = peers.run(association.store(sop_class, ds.SOPInstanceUID, ts, data))
    assert status.status == 0x0000
    check_stored(peers, path, sop_instance_uid=ds.SOPInstanceUID)


@pytest.mark.parametrize("scp_pdu", [4096, 16384, 0])
@pytest.mark.parametrize("sizes", [(1, 7, 4000, 13, 65536, 3, 100000), (333,), (10**7,)])
@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb_rle_2frame.dcm", "rtdose.dcm"])
def test_store_iterable(tmp_path, name, sizes, scp_pdu):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=scp_pdu))
    association = peers.connect()
    path = data_file(name)
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path)
    sop_class, ts = FILES[name]
    chunks = uneven_chunks(data, sizes)
    status = peers.run(association.store(sop_class, ds.SOPInstanceUID, ts, chunks))
    assert status.ok, status
    check_stored(peers, path, sop_instance_uid=ds.SOPInstanceUID)


def test_store_file_meta_instance_uid_differs_from_dataset(tmp_path):
    # rtdose.dcm's Media Storage SOP Instance UID differs from its SOP
    # Instance UID: store_file sends the file meta's, the data set says
    # otherwise, and the SCP refuses it.
    peers = Peers(tmp_path)
    association = peers.connect()
    path = data_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    status = peers.run(association.store_file(path))
    assert status.status == 0xA900
    assert "SOP Instance UID" in status.error_comment
    assert peers.stored_files() == []
    assert peers.temp_files() == []


def test_several_instances_on_one_association(tmp_path):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=4096))
    association = peers.connect()
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"]
    for name in names:
        assert peers.run(association.store_file(data_file(name))).ok
    # Storing the same instance again replaces the file.
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok
    assert peers.run(association.echo()).ok
    expected = sorted(os.path.join(*relpath_for(pydicom.dcmread(data_file(n))).split("/")) for n in names)
    assert peers.stored_files() == expected
    for name in names:
        check_stored(peers, data_file(name))


class _SyncReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@pytest.mark.parametrize("fsync", [False, True])
def test_next_file_is_prepared_in_the_thread_pool(tmp_path, fsync):
    """
    After each answer the next instance's file is created in the thread
    pool (one spare per association, removed at its end); with fsync the
    pool also makes each file durable.
    """
    storage = FilesystemStorage(str(tmp_path / "store"), reactor=_SyncReactor())
    storage.threadpool = pool = FakeThreadPool()
    storage._fsync_file = storage._fsync_dir = lambda *args: None
    peers = Peers(tmp_path, storage=storage)
    peers.service.fsync = fsync
    association = peers.connect()
    names = ["CT_small.dcm", "MR_small.dcm"]
    for name in names:
        assert peers.run(association.store_file(data_file(name))).ok
    assert pool.submitted == (2 if fsync else 1) * len(names)
    assert len(peers.temp_files()) == 1  # the spare
    assert peers.run(association.release()) is None
    for name in names:
        check_stored(peers, data_file(name))


def _batches(pool):
    """The file counts asked of the pool's pending work (prepare_writers calls)."""
    return [args[0] for _, _, args, _ in pool.pending]


def test_spare_files_made_late_serve_the_next_instances(tmp_path):
    """
    An instance that arrives before its spare file is ready gets a file of
    its own at once; the file being made is kept for a next instance (not
    created and removed for nothing), and from then on files are made
    several at a time; the unused ones go at the association's end.
    """
    storage = FilesystemStorage(str(tmp_path / "store"), reactor=_SyncReactor())
    storage.threadpool = pool = FakeThreadPool(immediate=False)
    peers = Peers(tmp_path, storage=storage)
    association = peers.connect()
    names = ["CT_small.dcm", "MR_small.dcm", "CT_small.dcm"]
    # The first: no spare yet; then one is asked for (count 1).
    assert peers.run(association.store_file(data_file(names[0]))).ok
    assert _batches(pool) == [1]
    # The second arrives before the pool ran: a file of its own; the
    # batch grows; nothing more is asked for while one is being made.
    assert peers.run(association.store_file(data_file(names[1]))).ok
    assert _batches(pool) == [1]
    pool.run()
    assert len(peers.temp_files()) == 1  # the late spare, kept
    # The third takes it; then two are asked for in one call.
    assert peers.run(association.store_file(data_file(names[2]))).ok
    assert peers.temp_files() == []
    assert _batches(pool) == [2] and pool.submitted == 2
    pool.run()
    assert len(peers.temp_files()) == 2
    assert peers.run(association.release()) is None
    # The unused ones are removed in the pool, not on the reactor thread.
    assert len(peers.temp_files()) == 2 and pool.pending
    pool.run()
    assert peers.temp_files() == []
    for name in names:
        check_stored(peers, data_file(name))


def test_spares_never_exceed_the_maximum(tmp_path):
    """
    However far the pool falls behind, at most MAX_SPARES files are made
    ready per association, and a batch made after the association ended
    is removed when ready.
    """
    storage = FilesystemStorage(str(tmp_path / "store"), reactor=_SyncReactor())
    storage.threadpool = pool = FakeThreadPool(immediate=False)
    peers = Peers(tmp_path, storage=storage)
    association = peers.connect()
    ready = []
    for _ in range(8):
        # The pool runs only every fourth instance: it lags, batches grow.
        for _ in range(4):
            assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok
        pool.run()
        ready.append(len(peers.temp_files()))
    assert max(ready) == MAX_SPARES  # grown to the cap, never past it
    assert pool.submitted < 32  # fewer pool calls than instances
    for _ in range(MAX_SPARES // 2):  # refilled once half are used
        assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok
    assert _batches(pool) == [MAX_SPARES // 2]  # a batch still being made
    assert peers.run(association.release()) is None
    while pool.pending:  # the batch, then its removal, as the ready ones'
        pool.run()
    assert peers.temp_files() == []


class _FakeWriter:
    def __init__(self):
        self.aborted = False

    def abort(self):
        self.aborted = True


class _Ended:
    """An association's C{ended}, counting who watches it."""

    def __init__(self):
        self.watchers = []

    def addBoth(self, f, *args):
        self.watchers.append((f, args))

    def fire(self):
        for f, args in self.watchers:
            f(None, *args)


class _FakeAssociation:
    _closed = False

    def __init__(self):
        self.ended = _Ended()


def test_an_association_end_is_watched_once_whatever_the_batches():
    """
    Spares dropped and prepared again on one association (a C-GET after
    another) add no more callbacks to its end; its end removes the spares
    still there, and one made after it is removed once ready.
    """
    made = []

    class Storage:
        def prepare_writers(self, count, fsync=False):
            made.append(defer.Deferred())
            return made[-1]

    service = StoreService(Storage(), DEFAULT_LAYOUT)
    association = _FakeAssociation()
    service.prepare_writer(association)
    made[-1].callback([_FakeWriter()])
    service.drop_spare(association)
    service.prepare_writer(association)
    first = _FakeWriter()
    made[-1].callback([first])
    service.prepare_writer(association)  # one is ready: nothing asked for
    assert len(made) == 2
    assert len(association.ended.watchers) == 1
    taken = service.take_writer(association)
    assert taken is first
    service.prepare_writer(association)
    assert len(made) == 3
    association.ended.fire()
    late = _FakeWriter()
    made[-1].callback([late])
    assert late.aborted and not first.aborted


def test_prepare_writers_removes_the_created_files_when_one_fails(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "store"), reactor=_SyncReactor())
    storage.threadpool = FakeThreadPool()
    made = []
    real = storage._new_temp_path

    def new_temp_path():
        if len(made) == 2:
            raise OSError(28, "No space left on device")
        made.append(real())
        return made[-1]

    storage._new_temp_path = new_temp_path
    failure = failure_of(storage.prepare_writers(3))
    assert failure.check(OSError)
    assert made and not any(os.path.exists(path) for path in made)
    storage._new_temp_path = real
    writers = result_of(storage.prepare_writers(3))
    assert len(writers) == 3 and all(os.path.exists(w.temp_path) for w in writers)
    for writer in writers:
        writer.abort()
    assert not os.listdir(os.path.join(storage.root, ".tmp"))


def test_other_transfer_syntax(tmp_path):
    # CT_small re-encoded in implicit VR little endian: the file meta
    # records the context's transfer syntax.
    peers = Peers(tmp_path)
    association = peers.connect(syntaxes=[(CT, [IMPLICIT])])
    original = pydicom.dcmread(data_file("CT_small.dcm"))
    data = encode_dataset(original, IMPLICIT)
    status = peers.run(association.store(CT, original.SOPInstanceUID, IMPLICIT, data))
    assert status.ok
    path, _ = check_stored(peers, data_file("CT_small.dcm"), transfer_syntax=IMPLICIT, dataset=data)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == IMPLICIT
    for elem in original:
        assert stored[elem.tag].value == elem.value


def test_deflated_transfer_syntax(tmp_path):
    original = pydicom.dcmread(data_file("CT_small.dcm"))
    original.file_meta.TransferSyntaxUID = DEFLATED
    deflated = tmp_path / "deflated.dcm"
    original.save_as(str(deflated), enforce_file_format=True)
    peers = Peers(tmp_path)
    association = peers.connect(syntaxes=[(CT, [DEFLATED])])
    status = peers.run(association.store_file(str(deflated)))
    assert status.ok, status
    path, _ = check_stored(peers, str(deflated))
    assert pydicom.dcmread(path).PatientName == original.PatientName


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def test_pipeline_gets_the_stored_instance(tmp_path):
    executor = FakeExecutor()
    peers = Peers(tmp_path, pipeline=executor)
    association = peers.connect()
    path = data_file("CT_small.dcm")
    status = peers.run(association.store_file(path))
    assert status.status == 0x0000
    stored_path, relpath = check_stored(peers, path)

    [(endpoint, envelope)] = executor.calls
    assert endpoint is peers.endpoint
    request = envelope.dicom
    assert request.operation == "store"
    assert request.calling_aet == "TESTSCU"
    assert request.called_aet == "HARMONY"
    [instance] = drain(request.instances)
    assert isinstance(instance, DicomInstance)
    assert instance.sop_class_uid == CT
    assert instance.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    assert instance.transfer_syntax == EXPLICIT
    assert instance.path == stored_path
    with open(stored_path, "rb") as f:
        content = f.read()
    assert instance.size == len(content)
    assert isinstance(instance.data, Stream)
    assert b"".join(drain(instance.data)) == content
    assert envelope.details.method == "C-STORE"
    assert envelope.details.scheme == "dicom"
    assert envelope.metadata["protocol"] == "dimse"
    assert envelope.metadata["calling_aet"] == "TESTSCU"
    assert envelope.metadata["called_aet"] == "HARMONY"
    assert envelope.metadata["stored_relpath"] == relpath


@pytest.mark.parametrize(
    "http,expected",
    [
        (200, 0x0000),
        (201, 0x0000),
        (204, 0x0000),
        (502, 0xA700),
        (503, 0xA700),
        (504, 0xA700),
        (401, 0x0124),
        (403, 0x0124),
        (400, 0xC000),
        (404, 0xC000),
        (409, 0xC000),
        (422, 0xC000),
        (413, 0xA700),
        (429, 0xA700),
        (415, 0x0122),
        (500, 0x0110),
    ],
)
def test_pipeline_http_status(tmp_path, http, expected):
    peers = Peers(tmp_path, pipeline=FakeExecutor(ResponseEnvelope(status=http)))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("MR_small.dcm")))
    assert status.status == expected
    if expected == 0x0000:
        assert status.error_comment is None
    else:
        assert status.error_comment == f"Pipeline answered HTTP {http}"
    # The file is kept whatever the pipeline said.
    check_stored(peers, data_file("MR_small.dcm"))


@pytest.mark.parametrize(
    "result,expected",
    [
        (DicomResult(status=0x0000), (0x0000, None)),
        (DicomResult(status=0xA700, error_comment="PACS full"), (0xA700, "PACS full")),
        (DicomResult(status=0xB000, error_comment="Coerced"), (0xB000, "Coerced")),
        (DicomResult(status=0xC123, error_comment=None), (0xC123, None)),
    ],
)
def test_pipeline_dicom_result(tmp_path, result, expected):
    # The DicomResult wins over the HTTP status.
    peers = Peers(tmp_path, pipeline=FakeExecutor(ResponseEnvelope(status=502, dicom=result)))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert (status.status, status.error_comment) == expected


def test_pipeline_dicom_result_without_status_uses_http(tmp_path):
    peers = Peers(tmp_path, pipeline=FakeExecutor(ResponseEnvelope(status=503, dicom=DicomResult(status=None))))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert status.status == 0xA700


def test_pipeline_long_error_comment_is_cut(tmp_path):
    # Error Comment is LO: at most 64 characters.
    result = DicomResult(status=0xA700, error_comment="x" * 200)
    peers = Peers(tmp_path, pipeline=FakeExecutor(ResponseEnvelope(dicom=result)))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert status.status == 0xA700
    assert status.error_comment == "x" * 64


@pytest.mark.parametrize(
    "outcome",
    [
        RuntimeError("backend exploded"),
        UpstreamTimeout(),
        defer.CancelledError(),
    ],
)
def test_failing_pipeline_never_answers_success(tmp_path, outcome):
    peers = Peers(tmp_path, pipeline=FakeExecutor(outcome))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert dimse_status.is_failure(status.status)
    assert status.status != 0x0000
    assert status.error_comment
    # The association is still usable.
    assert peers.run(association.echo()).ok


def test_pipeline_raising_synchronously_never_answers_success(tmp_path):
    def explode(envelope):
        raise RuntimeError("synchronous failure")

    peers = Peers(tmp_path, pipeline=FakeExecutor(explode))
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert dimse_status.is_failure(status.status)


def test_response_waits_for_the_pipeline(tmp_path):
    pending = defer.Deferred()
    peers = Peers(tmp_path, pipeline=FakeExecutor(pending))
    association = peers.connect()
    d = association.store_file(data_file("CT_small.dcm"))
    peers.pump.flush()
    assert not d.called
    # The file is already committed while the pipeline runs.
    check_stored(peers, data_file("CT_small.dcm"))
    pending.callback(ResponseEnvelope(status=200))
    assert peers.run(d).status == 0x0000


def test_pipeline_finishing_after_abort_sends_nothing(tmp_path):
    pending = defer.Deferred()
    peers = Peers(tmp_path, pipeline=FakeExecutor(pending))
    association = peers.connect()
    d = association.store_file(data_file("CT_small.dcm"))
    peers.pump.flush()
    association.abort()
    peers.pump.flush()
    # Our own abort fails the pending request at once (not at its DIMSE
    # timeout), and leaves no timer behind.
    failure_of(d, AssociationAborted)
    assert peers.server_protocol.upper.state == "Sta1"
    assert [c for c in peers.reactor.getDelayedCalls() if c.active()] == []
    # The pipeline answers late: nothing is sent on the closed association.
    pending.callback(ResponseEnvelope(status=200))
    assert peers.server_protocol.transport.stream == []
    peers.pump.flush()
    # The file was committed before the pipeline ran.
    check_stored(peers, data_file("CT_small.dcm"))


# ---------------------------------------------------------------------------
# Refused data sets
# ---------------------------------------------------------------------------


def assert_nothing_stored(peers):
    assert peers.stored_files() == []
    assert peers.temp_files() == []


def test_dataset_without_study_and_series(tmp_path):
    executor = FakeExecutor()
    peers = Peers(tmp_path, pipeline=executor)
    association = peers.connect()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        ds = pydicom.dcmread(data_file("CT_small.dcm"))
        delattr(ds, keyword)
        data = encode_dataset(ds, EXPLICIT)
        status = peers.run(association.store(CT, ds.SOPInstanceUID, EXPLICIT, data))
        assert status.status == 0xA900
        assert status.error_comment == "Data set has no Study or Series Instance UID"
        assert_nothing_stored(peers)
    assert executor.calls == []


def test_dataset_without_sop_instance_uid_uses_the_command(tmp_path):
    # (0008,0018) missing from the data set: the command's UID names the file.
    peers = Peers(tmp_path)
    association = peers.connect()
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    data = encode_dataset(ds, EXPLICIT)
    status = peers.run(association.store(CT, sop, EXPLICIT, data))
    assert status.ok
    assert peers.stored_files() == [os.path.join(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop + ".dcm")]


def test_sop_instance_uid_mismatch(tmp_path):
    executor = FakeExecutor()
    peers = Peers(tmp_path, pipeline=executor, scp_settings=AssociationSettings(max_pdu_length=4096))
    association = peers.connect()
    data = dataset_bytes(data_file("CT_small.dcm"))
    status = peers.run(association.store(CT, "1.2.3.4.5.6", EXPLICIT, uneven_chunks(data)))
    assert status.status == 0xA900
    assert status.error_comment == "SOP Instance UID of the data set differs from the command's"
    assert status.fields["AffectedSOPInstanceUID"] == "1.2.3.4.5.6"
    assert_nothing_stored(peers)
    assert executor.calls == []
    # The next store on the association works.
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 1000,
        b"\x08\x00\x05\x00ZZ\x04\x00abcd" * 10,
        # an undefined length on a VR that cannot have one
        b"\x08\x00\x05\x00CS\xff\xff" + b"\x00" * 64,
    ],
)
def test_garbage_dataset(tmp_path, garbage):
    peers = Peers(tmp_path, pipeline=FakeExecutor())
    association = peers.connect()
    status = peers.run(association.store(CT, "1.2.3.4", EXPLICIT, garbage))
    assert status.status == 0xC000
    assert status.error_comment == "The data set cannot be decoded"
    assert_nothing_stored(peers)
    assert peers.executor.calls == []
    assert peers.run(association.echo()).ok


def test_truncated_dataset(tmp_path):
    # The data set ends in the middle of an element before the UIDs.
    peers = Peers(tmp_path)
    association = peers.connect()
    data = dataset_bytes(data_file("CT_small.dcm"))[:50]
    status = peers.run(association.store(CT, "1.2.3.4", EXPLICIT, data))
    assert status.status == 0xC000
    assert_nothing_stored(peers)


def test_bad_deflate_data(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect(syntaxes=[(CT, [DEFLATED])])
    status = peers.run(association.store(CT, "1.2.3.4", DEFLATED, b"\xff" * 100))
    assert status.status == 0xC000
    assert_nothing_stored(peers)


def test_uids_unusable_as_a_path(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.StudyInstanceUID = "1.2.x.y"
    data = encode_dataset(ds, EXPLICIT)
    status = peers.run(association.store(CT, ds.SOPInstanceUID, EXPLICIT, data))
    assert status.status == 0xC000
    assert status.error_comment == "UIDs unusable as a storage path"
    assert_nothing_stored(peers)


def test_uids_not_found_in_the_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_PREFIX", 100)
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=64))
    association = peers.connect()
    data = dataset_bytes(data_file("CT_small.dcm"))
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert status.status == 0xC000
    assert status.error_comment == "Study/Series Instance UID not in the first 4 MiB of the data set"
    assert len(status.error_comment) <= 64
    assert_nothing_stored(peers)
    assert len(data) > 100


def test_no_dataset(tmp_path):
    peers = Peers(tmp_path, pipeline=FakeExecutor())
    association = peers.connect()
    context = association.context_for(CT)
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": association._message_id(),
        "Priority": 0,
        "CommandDataSetType": messages.NO_DATASET,
        "AffectedSOPInstanceUID": "1.2.3.4",
    }
    status = peers.run(association._request(context.id, fields))
    assert status.status == 0xC000
    assert status.error_comment == "C-STORE-RQ without a data set"
    assert status.fields["CommandField"] == messages.C_STORE_RSP
    assert status.fields["MessageIDBeingRespondedTo"] == fields["MessageID"]
    assert_nothing_stored(peers)
    assert peers.executor.calls == []
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok


def test_command_without_sop_instance_uid(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    context = association.context_for(CT)
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": association._message_id(),
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
    }
    data = dataset_bytes(data_file("CT_small.dcm"))
    status = peers.run(association._request(context.id, fields, data))
    assert status.status == 0xC000
    assert_nothing_stored(peers)


def test_sop_class_differs_from_the_context(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    context = association.context_for(CT)
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    fields = {
        "AffectedSOPClassUID": MR,  # sent on the CT context
        "CommandField": messages.C_STORE_RQ,
        "MessageID": association._message_id(),
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "AffectedSOPInstanceUID": ds.SOPInstanceUID,
    }
    status = peers.run(association._request(context.id, fields, dataset_bytes(data_file("CT_small.dcm"))))
    assert status.status == 0x0122
    assert_nothing_stored(peers)
    # The association keeps working.
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).status == 0x0000


def test_error_comments_fit_lo():
    # Every comment the SCP writes itself is a valid LO (<= 64 characters).
    import inspect

    source = inspect.getsource(store_module)
    for comment in re.findall(r'dimse_status\.[A-Z_]+,\s*\n?\s*"([^"]+)"', source):
        assert len(comment) <= 64, comment


# ---------------------------------------------------------------------------
# Storage failures
# ---------------------------------------------------------------------------


class FaultyStorage:
    """
    A FilesystemStorage with injected faults.
    """

    def __init__(self, storage, open_error=False, write_error_after=None, commit_error=False):
        self._storage = storage
        self.open_error = open_error
        self.write_error_after = write_error_after
        self.commit_error = commit_error
        self.writers = []

    def open_writer(self, relpath=None, fsync=False, sha256=False):
        if self.open_error:
            raise OSError(28, "No space left on device")
        writer = FaultyWriter(self, self._storage.open_writer(relpath, fsync, sha256))
        self.writers.append(writer)
        return writer

    def read(self, relpath, chunk_size=65536):
        return self._storage.read(relpath, chunk_size)


class FaultyWriter:
    def __init__(self, storage, writer):
        self._storage = storage
        self._writer = writer
        self.writes = 0

    def write(self, data):
        self.writes += 1
        after = self._storage.write_error_after
        if after is not None and self.writes > after:
            raise OSError(5, "Input/output error")
        self._writer.write(data)

    def commit(self, relpath=None):
        if self._storage.commit_error:
            self._writer.abort()
            return defer.fail(OSError(28, "No space left on device"))
        return self._writer.commit(relpath)

    def abort(self):
        self._writer.abort()


@pytest.mark.parametrize(
    "faults,comment",
    [
        ({"open_error": True}, "Storage unavailable"),
        ({"write_error_after": 0}, "Storage write failed"),  # the file meta
        ({"write_error_after": 1}, "Storage write failed"),  # the first fragment
        ({"write_error_after": 3}, "Storage write failed"),  # a later fragment
        ({"commit_error": True}, "Storage commit failed"),
    ],
)
def test_storage_errors(tmp_path, faults, comment):
    real = FilesystemStorage(str(tmp_path / "store"), reactor=MemoryReactorClock())
    storage = FaultyStorage(real, **faults)
    executor = FakeExecutor()
    peers = Peers(
        tmp_path, pipeline=executor, storage=storage, scp_settings=AssociationSettings(max_pdu_length=4096)
    )
    association = peers.connect()
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert status.status == 0xA700
    assert status.error_comment == comment
    assert_nothing_stored(peers)
    assert executor.calls == []
    # The association goes on.
    assert peers.run(association.echo()).ok


def test_storage_root_removed(tmp_path):
    # The storage's temporary directory vanished: open_writer fails with a
    # real OSError.
    peers = Peers(tmp_path)
    association = peers.connect()
    os.rmdir(os.path.join(peers.root, ".tmp"))
    status = peers.run(association.store_file(data_file("CT_small.dcm")))
    assert status.status == 0xA700
    assert peers.stored_files() == []


# ---------------------------------------------------------------------------
# Aborts and protocol errors
# ---------------------------------------------------------------------------


def send_partial(peers, association, path, count):
    """
    Send the command and the first C{count} data set PDUs of a C-STORE of
    C{path}, raw (as the SCU would), and deliver them.
    """
    header = read_part10_header(path)
    context = association.context_for(header.sop_class_uid, header.transfer_syntax)
    command = messages.encode_command(
        {
            "AffectedSOPClassUID": header.sop_class_uid,
            "CommandField": messages.C_STORE_RQ,
            "MessageID": 1,
            "Priority": 0,
            "CommandDataSetType": messages.DATASET_PRESENT,
            "AffectedSOPInstanceUID": header.sop_instance_uid,
        }
    )
    pdus = list(messages.fragment(context.id, command, dataset_bytes(path), 1024))
    transport = peers.client_protocol.transport
    for data in pdus[: 1 + count]:
        transport.write(data)
    peers.pump.flush()
    return pdus


def test_abort_mid_dataset_removes_the_temp_file(tmp_path):
    executor = FakeExecutor()
    peers = Peers(tmp_path, pipeline=executor, scp_settings=AssociationSettings(max_pdu_length=1024))
    association = peers.connect()
    send_partial(peers, association, data_file("CT_small.dcm"), 3)
    # The data set is being written into a temporary file.
    assert len(peers.temp_files()) == 1
    association.abort()
    peers.pump.flush()
    assert peers.server_protocol.upper.state == "Sta1"
    assert_nothing_stored(peers)
    assert executor.calls == []
    assert peers.factory.active == set()


def test_connection_lost_mid_dataset_removes_the_temp_file(tmp_path):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=1024))
    association = peers.connect()
    send_partial(peers, association, data_file("MR_small.dcm"), 2)
    assert len(peers.temp_files()) == 1
    peers.client_protocol.transport.loseConnection()
    peers.pump.flush()
    assert_nothing_stored(peers)
    assert peers.factory.active == set()


def test_server_still_serves_after_an_abort(tmp_path):
    peers = Peers(tmp_path, scp_settings=AssociationSettings(max_pdu_length=1024))
    first = peers.connect()
    send_partial(peers, first, data_file("CT_small.dcm"), 1)
    first.abort()
    peers.pump.flush()
    second = peers.connect()
    assert peers.run(second.store_file(data_file("CT_small.dcm"))).ok
    check_stored(peers, data_file("CT_small.dcm"))


def test_unsupported_command_is_answered(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    context = association.context_for(FIND)
    fields = {
        "AffectedSOPClassUID": FIND,
        "CommandField": messages.C_FIND_RQ,
        "MessageID": association._message_id(),
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
    }
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "*"
    identifier.StudyInstanceUID = ""
    data = encode_dataset(identifier, IMPLICIT)
    status = peers.run(association._request(context.id, fields, uneven_chunks(data * 50, (10, 3000))))
    assert status.status == 0x0211
    assert status.fields["CommandField"] == messages.C_FIND_RSP
    assert status.fields["MessageIDBeingRespondedTo"] == fields["MessageID"]
    assert status.fields["AffectedSOPClassUID"] == FIND
    # The association keeps working.
    assert peers.run(association.echo()).ok
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok
    # A command without a data set too.
    fields = dict(fields, MessageID=association._message_id(), CommandDataSetType=messages.NO_DATASET)
    assert peers.run(association._request(context.id, fields)).status == 0x0211
    assert peers.run(association.echo()).ok
    peers.run(association.release())


def test_abort_while_discarding_an_unsupported_commands_dataset(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    context = association.context_for(FIND)
    command = messages.encode_command(
        {
            "AffectedSOPClassUID": FIND,
            "CommandField": messages.C_FIND_RQ,
            "MessageID": 1,
            "Priority": 0,
            "CommandDataSetType": messages.DATASET_PRESENT,
        }
    )
    pdus = list(messages.fragment(context.id, command, b"\x00" * 5000, 1024))
    for data in pdus[:3]:
        peers.client_protocol.transport.write(data)
    peers.pump.flush()
    association.abort()
    peers.pump.flush()
    assert peers.server_protocol.upper.state == "Sta1"
    assert peers.factory.active == set()
    assert_nothing_stored(peers)


def test_echo_disabled_is_an_unsupported_command(tmp_path):
    peers = Peers(tmp_path)
    peers.factory.enable_echo = False
    association = peers.connect()
    status = peers.run(association.echo())
    assert status.status == 0x0211
    assert status.fields["CommandField"] == messages.C_ECHO_RSP
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok


def test_pdv_on_a_context_not_accepted_aborts(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect(syntaxes=[(CT, [EXPLICIT]), ("1.2.3.4.5", [IMPLICIT])])
    assert sorted(association.contexts) == [1]
    command = messages.encode_command(
        {
            "AffectedSOPClassUID": VERIFICATION,
            "CommandField": messages.C_ECHO_RQ,
            "MessageID": 7,
            "CommandDataSetType": messages.NO_DATASET,
        }
    )
    # Context 3 was rejected, 5 never proposed.
    for data in messages.fragment(3, command):
        peers.client_protocol.transport.write(data)
    peers.pump.flush()
    assert peers.server_protocol.upper.state == "Sta1"
    assert association.association.upper.state == "Sta1"
    assert isinstance(association._error, AssociationAborted)
    assert association._error.source == 2
    failure_of(association.store_file(data_file("CT_small.dcm")), AssociationAborted)
    assert peers.factory.active == set()


def test_dataset_fragment_without_command_aborts(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    context = association.context_for(CT)
    peers.client_protocol.transport.write(messages._pdu(context.id, 0x02, b"\x00" * 16))
    peers.pump.flush()
    assert peers.server_protocol.upper.state == "Sta1"
    assert isinstance(association._error, AssociationAborted)
    assert_nothing_stored(peers)


def test_abort_pdu_reason_sent_by_the_scp(tmp_path):
    # What the SCP sends on a DIMSE protocol error: A-ABORT from the
    # service provider.
    peers = Peers(tmp_path)
    peers.connect()
    seen = []
    original = peers.client_protocol.dataReceived

    def spy(data):
        seen.append(bytes(data))
        return original(data)

    peers.client_protocol.dataReceived = spy
    peers.client_protocol.transport.write(messages._pdu(99, 0x03, b"\x00" * 8))
    peers.pump.flush()
    received = b"".join(seen)
    assert received[:1] == bytes([pdu.A_ABORT])
    assert pdu.decode_pdu(pdu.A_ABORT, received[6:10]).source == 2


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------


def test_store_without_pipeline_answers_after_commit(tmp_path):
    peers = Peers(tmp_path)
    association = peers.connect()
    assert peers.run(association.store_file(data_file("SC_rgb_rle_2frame.dcm"))).ok
    check_stored(peers, data_file("SC_rgb_rle_2frame.dcm"))


def test_custom_layout(tmp_path):
    peers = Peers(tmp_path, layout="by-sop/{sop}")
    association = peers.connect()
    assert peers.run(association.store_file(data_file("CT_small.dcm"))).ok
    sop = pydicom.dcmread(data_file("CT_small.dcm")).SOPInstanceUID
    assert peers.stored_files() == [os.path.join("by-sop", sop)]


def test_status_helpers():
    assert dimse_status.status_for_http(299) == 0x0000
    assert dimse_status.status_for_http(507) == 0xA700
    assert dimse_status.status_for_http(302) == 0x0110
    for ok in (0x0000, 0x0001, 0xB000, 0xB007, 0xFE00, 0xFF00, 0xFF01):
        assert not dimse_status.is_failure(ok)
    for bad in (0xA700, 0xA900, 0xC000, 0x0110, 0x0122, 0x0124, 0x0211):
        assert dimse_status.is_failure(bad)
