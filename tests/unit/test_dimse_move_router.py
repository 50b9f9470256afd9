"""
Receiving what a C-MOVE sends back (harmony.dimse.move: MoveRouter,
IncomingMove, MoveStoreListener; StoreService's router): a "PACS" made of
Harmony's own DicomClient sends C-STORE sub-operations (with or without
the Move Originator fields) over in-memory connections (twisted.test.iosim)
to a store SCP; instances are written into real FilesystemStorages in a
temporary directory (fsync off: commits happen on the calling thread).
The end-to-end tests run ClientAssociation.move against the fake C-MOVE
SCP of test_dimse_move_scu, which sends the sub-operations over a second
connection.
"""

import os

import pydicom
import pytest
from _deferreds import drain, failure_of, has_fired, result_of
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_dimse_move_scu import FakeMoveService, flush, move_scp_factory, query, wire
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from harmony.dimse import messages
from harmony.dimse import move as move_module
from harmony.dimse.association import AssociationSettings
from harmony.dimse.move import IncomingMove, MoveRouter, MoveStoreListener
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DicomClient,
    encode_identifier,
    read_part10_header,
)
from harmony.dimse.store import StoreService
from harmony.dimse.substore import MemoryBudget
from harmony.envelope import DicomInstance, ResponseEnvelope
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import EOF

IMPLICIT, EXPLICIT = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = messages.VERIFICATION_SOP_CLASS
PROPOSED = [(CT, [EXPLICIT]), (VERIFICATION, [IMPLICIT])]
STORE_SYNTAXES = {CT: [EXPLICIT, IMPLICIT], VERIFICATION: [IMPLICIT]}
CT_SMALL = get_testdata_file("CT_small.dcm", download=False)


def dataset_bytes(path):
    """
    The data set of a Part 10 file (the bytes after the file meta).
    """
    header = read_part10_header(path)
    with open(path, "rb") as f:
        f.seek(header.dataset_offset)
        return f.read()


def make_instance(study=None, series=None):
    """
    CT_small.dcm with fresh UIDs, as a pydicom Dataset (no file meta).
    """
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    del ds.file_meta
    return ds


def files_under(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(f for f in found if not f.startswith(".tmp" + os.sep))


def temp_files(root):
    tmp = os.path.join(root, ".tmp")
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


class FakeExecutor:
    """
    Stands in for the pipeline of a dicom_scp endpoint: records the
    envelopes, answers 200.
    """

    def __init__(self):
        self.calls = []

    def execute(self, endpoint, envelope):
        self.calls.append(envelope)
        return defer.succeed(ResponseEnvelope(status=200))


class Connection:
    """
    One association from the PACS to Harmony's store SCP.
    """

    def __init__(self, server, client, pump, association):
        self.server = server
        self.client = client
        self.pump = pump
        self.association = association

    def store(self, ds, originator=None, data=None):
        """
        C-STORE C{ds}; C{originator}: C{(AE title, message ID)} for the
        Move Originator fields.

        @return: Deferred[DimseStatus]
        """
        data = data if data is not None else encode_identifier(ds, EXPLICIT)
        return self.association.store(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT, data, move_originator=originator)

    def store_partly(self, ds, originator, pdus=3, message_id=999):
        """
        Send the C-STORE-RQ of C{ds} and only the first C{pdus} P-DATA-TF
        PDUs; the rest is returned, to send with L{send}.
        """
        context = self.association.context_for(CT, EXPLICIT)
        fields = {
            "AffectedSOPClassUID": CT,
            "CommandField": messages.C_STORE_RQ,
            "MessageID": message_id,
            "Priority": 0,
            "CommandDataSetType": messages.DATASET_PRESENT,
            "AffectedSOPInstanceUID": ds.SOPInstanceUID,
            "MoveOriginatorApplicationEntityTitle": originator[0],
            "MoveOriginatorMessageID": originator[1],
        }
        chunks = [bytes(c) for c in messages.fragment(
            context.id, messages.encode_command(fields), encode_identifier(ds, EXPLICIT), 4096)]
        assert len(chunks) > pdus + 1
        self.send(chunks[:pdus])
        return chunks[pdus:]

    def send(self, chunks):
        for chunk in chunks:
            self.client.transport.write(chunk)
        self.pump.flush()


class Harness:
    """
    Harmony's store SCP ("HARMONY") with a MoveRouter, and a PACS that
    connects to it.

    @param listener: use a MoveStoreListener's factory (unrouted C-STOREs
        refused), else a StoreService with a pipeline (FakeExecutor) and
        the router, as a dicom_scp endpoint has.
    """

    def __init__(self, tmp_path, listener=True, reactor=None):
        self.reactor = reactor or MemoryReactorClock()
        self.tmp_path = tmp_path
        self.router = MoveRouter()
        self.root = str(tmp_path / "moves")
        self.storage = FilesystemStorage(self.root, reactor=self.reactor)
        settings = AssociationSettings(idle_timeout=None, max_pdu_length=4096)
        self.executor = FakeExecutor()
        self.pipeline_root = str(tmp_path / "pipeline")
        if listener:
            self.listener = MoveStoreListener(self.reactor, "HARMONY", 11113, router=self.router, settings=settings)
            self.factory = self.listener.factory
        else:
            self.store_service = StoreService(
                FilesystemStorage(self.pipeline_root, reactor=self.reactor), "{study}/{series}/{sop}.dcm",
                pipeline=(self.executor, "endpoint"), router=self.router,
            )
            self.factory = DicomServerFactory(
                self.reactor, SCPPolicy("HARMONY", STORE_SYNTAXES), settings, {messages.C_STORE_RQ: self.store_service}
            )
        self.pacs = DicomClient(self.reactor, "PACS", AssociationSettings(max_pdu_length=4096))

    def connect(self, calling="PACS", called="HARMONY"):
        d = self.pacs.associate("127.0.0.1", 11113, called, PROPOSED, calling_aet=calling)
        server, client, pump = wire(self.reactor, self.factory)
        return Connection(server, client, pump, result_of(d))

    def expect(self, **kwargs):
        kwargs.setdefault("storage", self.storage)
        return self.router.expect("HARMONY", **kwargs)


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


def check_instance(instance, original, root, source="PACS"):
    """
    A delivered instance: its file holds exactly the original data set.
    """
    assert isinstance(instance, DicomInstance)
    assert instance.sop_class_uid == CT
    assert instance.sop_instance_uid == original.SOPInstanceUID
    assert instance.transfer_syntax == EXPLICIT
    relpath = f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
    assert instance.path == os.path.join(root, *relpath.split("/"))
    assert instance.size == os.path.getsize(instance.path)
    stored = pydicom.dcmread(instance.path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == source
    assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    del stored.file_meta
    assert stored == original


# -- message IDs ---------------------------------------------------------------------


def test_message_ids_are_allocated_in_turn_and_unique(harness):
    router = harness.router
    moves = [harness.expect() for _ in range(3)]
    assert [m.message_id for m in moves] == [1, 2, 3]
    assert isinstance(moves[0], IncomingMove)
    # Another destination AE has its own IDs.
    other = router.expect("OTHER_AE", harness.storage)
    assert other.message_id == 1
    assert router.in_flight("HARMONY") == 3 and router.in_flight() == 4
    # An ended move's ID is not reused at once.
    moves[1].finish()
    assert router.in_flight("HARMONY") == 2
    assert harness.expect().message_id == 4


def test_message_ids_wrap_around_never_zero_and_skip_those_in_flight(harness):
    router = harness.router
    first = harness.expect()
    assert first.message_id == 1
    router._last_id["HARMONY"] = 65533
    ids = [harness.expect().message_id for _ in range(4)]
    assert ids == [65534, 65535, 2, 3]  # 1 is in flight
    first.fail(RuntimeError("test"))
    router._last_id["HARMONY"] = 65535
    assert harness.expect().message_id == 1


def test_message_ids_exhausted(harness):
    router = harness.router
    router._moves["HARMONY"] = dict.fromkeys(range(1, 65536))
    with pytest.raises(RuntimeError):
        harness.expect()


def test_expect_checks_ae_titles(harness):
    for aet in ("", "X" * 17, "A\\B"):
        with pytest.raises(ValueError):
            harness.router.expect(aet, harness.storage)
    with pytest.raises(ValueError):
        harness.router.expect("HARMONY", harness.storage, source_aet="")
    assert harness.router.in_flight() == 0


def test_unregistered_when_finished_or_failed(harness):
    a, b = harness.expect(), harness.expect()
    a.finish()
    b.fail(RuntimeError("gone"))
    assert harness.router.in_flight() == 0 and harness.router._moves == {}
    assert result_of(a.instances.read()) is EOF
    failure_of(b.instances.read(), RuntimeError)
    assert not a.active and not b.active
    a.finish()
    a.fail(RuntimeError("late"))  # nothing more
    assert result_of(a.instances.read()) is EOF


# -- routing -----------------------------------------------------------------------------


def test_instance_delivered_byte_identical(harness):
    incoming = harness.expect()
    conn = harness.connect()
    original = pydicom.dcmread(CT_SMALL)
    raw = dataset_bytes(CT_SMALL)
    d = conn.store(original, originator=("HARMONY", incoming.message_id), data=raw)
    conn.pump.flush()
    assert result_of(d).ok
    [instance] = [result_of(incoming.instances.read())]
    assert dataset_bytes(instance.path) == raw
    header = read_part10_header(instance.path)
    assert header.sop_instance_uid == original.SOPInstanceUID and header.transfer_syntax == EXPLICIT
    assert b"".join(bytes(c) for c in drain(instance.data)) == open(instance.path, "rb").read()
    del original.file_meta
    check_instance(instance, original, harness.root)
    assert incoming.received == 1 and incoming.refused == 0
    incoming.finish()
    assert result_of(incoming.instances.read()) is EOF
    assert temp_files(harness.root) == []


def test_instance_delivered_from_memory_with_a_budget(harness):
    budget = MemoryBudget(1024 * 1024)
    incoming = harness.expect(memory=budget)
    conn = harness.connect()
    original = pydicom.dcmread(CT_SMALL)
    raw = dataset_bytes(CT_SMALL)
    d = conn.store(original, originator=("HARMONY", incoming.message_id), data=raw)
    conn.pump.flush()
    assert result_of(d).ok
    instance = result_of(incoming.instances.read())
    assert instance.path is None and budget.held == len(raw)
    header = read_part10_header(instance.data)
    assert instance.data[header.dataset_offset:] == raw
    assert header.sop_instance_uid == original.SOPInstanceUID and header.transfer_syntax == EXPLICIT
    # The file meta a stored copy would have: the PACS as the source.
    meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(instance.data)).file_meta
    assert meta.SourceApplicationEntityTitle == "PACS"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    instance.dispose()
    assert budget.held == 0
    assert incoming.received == 1
    incoming.finish()
    assert result_of(incoming.instances.read()) is EOF
    # Nothing was written.
    assert not any(files for _, _, files in os.walk(harness.root))


def test_routing_by_originator_fields(harness):
    first, second = harness.expect(), harness.expect(storage=FilesystemStorage(str(harness.tmp_path / "second")))
    conn = harness.connect()
    other = harness.connect()
    sent = {first: [], second: []}
    for i in range(4):
        move = (first, second)[i % 2]
        ds = make_instance()
        sent[move].append(ds)
        d = (conn, other)[i // 2].store(ds, originator=("HARMONY", move.message_id))
        flush(conn.pump, other.pump)
        assert result_of(d).ok
    for move in (first, second):
        move.finish()
        instances = drain(move.instances)
        assert [i.sop_instance_uid for i in instances] == [ds.SOPInstanceUID for ds in sent[move]]
        for instance, ds in zip(instances, sent[move]):
            check_instance(instance, ds, move.storage.root)
        assert move.received == 2
    assert len(files_under(harness.root)) == 2


def test_originator_message_id_without_the_ae_title(harness):
    incoming = harness.expect()
    conn = harness.connect()
    ds = make_instance()
    context = conn.association.context_for(CT, EXPLICIT)
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": 5,
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "AffectedSOPInstanceUID": ds.SOPInstanceUID,
        "MoveOriginatorMessageID": incoming.message_id,
    }
    conn.association.association.send_message(context.id, messages.encode_command(fields),
                                              encode_identifier(ds, EXPLICIT))
    conn.pump.flush()
    [instance] = [result_of(incoming.instances.read())]
    check_instance(instance, ds, harness.root)


def refused(d, harness, *moves):
    status = result_of(d)
    assert status.status == 0x0124
    assert status.error_comment == "No C-MOVE in progress for this instance"
    for move in moves:
        assert move.received == 0 and move.refused == 0 and move.active
    assert files_under(harness.root) == []
    assert temp_files(harness.root) == []


def test_no_move_in_flight_is_refused_and_nothing_stored(harness):
    conn = harness.connect()
    d = conn.store(make_instance(), originator=("HARMONY", 1))
    conn.pump.flush()
    refused(d, harness)
    d = conn.store(make_instance())
    conn.pump.flush()
    refused(d, harness)
    # The association goes on.
    echo = conn.association.echo()
    conn.pump.flush()
    assert result_of(echo).ok


def test_unknown_message_id_is_refused(harness):
    incoming = harness.expect()
    conn = harness.connect()
    d = conn.store(make_instance(), originator=("HARMONY", incoming.message_id + 1))
    conn.pump.flush()
    refused(d, harness)
    assert incoming.received == 0 and incoming.refused == 0


def test_another_originator_ae_is_refused(harness):
    incoming = harness.expect()
    conn = harness.connect()
    d = conn.store(make_instance(), originator=("SOMEONE_ELSE", incoming.message_id))
    conn.pump.flush()
    refused(d, harness)


def test_source_aet_must_match(harness):
    incoming = harness.expect(source_aet="PACS")
    stranger = harness.connect(calling="STRANGER")
    d = stranger.store(make_instance(), originator=("HARMONY", incoming.message_id))
    stranger.pump.flush()
    refused(d, harness)
    conn = harness.connect(calling="PACS")
    d = conn.store(make_instance(), originator=("HARMONY", incoming.message_id))
    conn.pump.flush()
    assert result_of(d).ok and incoming.received == 1


def test_fallback_without_originator_fields(harness):
    incoming = harness.expect()
    conn = harness.connect()
    ds = make_instance()
    d = conn.store(ds)
    conn.pump.flush()
    assert result_of(d).ok
    check_instance(result_of(incoming.instances.read()), ds, harness.root)


def test_fallback_by_calling_ae(harness):
    other_root = str(harness.tmp_path / "other")
    from_pacs = harness.expect(source_aet="PACS")
    from_other = harness.expect(source_aet="OTHER", storage=FilesystemStorage(other_root))
    pacs, other = harness.connect(calling="PACS"), harness.connect(calling="OTHER")
    a, b = make_instance(), make_instance()
    d1, d2 = pacs.store(a), other.store(b)
    flush(pacs.pump, other.pump)
    assert result_of(d1).ok and result_of(d2).ok
    check_instance(result_of(from_pacs.instances.read()), a, harness.root)
    check_instance(result_of(from_other.instances.read()), b, other_root, source="OTHER")
    # Nobody expects a third AE.
    third = harness.connect(calling="THIRD")
    d = third.store(make_instance())
    third.pump.flush()
    assert result_of(d).status == 0x0124


def test_ambiguous_fallback_is_refused(harness):
    first, second = harness.expect(), harness.expect()
    conn = harness.connect()
    d = conn.store(make_instance())
    conn.pump.flush()
    refused(d, harness, first, second)
    # One of them named by its source AE: still two candidates for PACS.
    third = harness.expect(source_aet="PACS")
    d = conn.store(make_instance())
    conn.pump.flush()
    refused(d, harness, first, second, third)


def test_routing_is_by_the_called_ae(tmp_path):
    h = Harness(tmp_path, listener=False)
    incoming = h.router.expect("ELSEWHERE", h.storage)
    conn = h.connect()
    d = conn.store(make_instance(), originator=("ELSEWHERE", incoming.message_id))
    conn.pump.flush()
    assert result_of(d).ok
    # Not a move's: the endpoint's pipeline had it.
    assert incoming.received == 0 and len(h.executor.calls) == 1


def test_store_service_with_a_router(tmp_path):
    h = Harness(tmp_path, listener=False)
    conn = h.connect()
    # No move in flight: the pipeline as ever.
    plain = make_instance()
    d = conn.store(plain)
    conn.pump.flush()
    assert result_of(d).ok and len(h.executor.calls) == 1
    assert files_under(h.pipeline_root) == [
        f"{plain.StudyInstanceUID}/{plain.SeriesInstanceUID}/{plain.SOPInstanceUID}.dcm"]
    # A move's sub-operation: to the move, no pipeline.
    incoming = h.expect()
    ds = make_instance()
    d = conn.store(ds, originator=("HARMONY", incoming.message_id))
    conn.pump.flush()
    assert result_of(d).ok and len(h.executor.calls) == 1
    check_instance(result_of(incoming.instances.read()), ds, h.root)
    # Another C-STORE (another originator) still goes through the pipeline.
    d = conn.store(make_instance(), originator=("SOMEONE", 77))
    conn.pump.flush()
    assert result_of(d).ok and len(h.executor.calls) == 2
    assert len(files_under(h.pipeline_root)) == 2 and len(files_under(h.root)) == 1


# -- sub-operations in progress --------------------------------------------------------------


def test_finish_waits_for_sub_operations_being_received(harness):
    incoming = harness.expect()
    conn = harness.connect()
    ds = make_instance()
    rest = conn.store_partly(ds, ("HARMONY", incoming.message_id))
    assert len(temp_files(harness.root)) == 1
    incoming.finish()
    assert harness.router.in_flight() == 0
    first = incoming.instances.read()
    assert not has_fired(first)
    conn.send(rest)
    check_instance(result_of(first), ds, harness.root)
    assert result_of(incoming.instances.read()) is EOF
    assert incoming.received == 1


def test_fail_discards_half_written_files(harness):
    incoming = harness.expect()
    conn = harness.connect()
    done = make_instance()
    d = conn.store(done, originator=("HARMONY", incoming.message_id))
    conn.pump.flush()
    assert result_of(d).ok
    responses = []
    conn.association._pending[999] = (defer.Deferred().addCallback(responses.append), _NoTimer())
    rest = conn.store_partly(make_instance(), ("HARMONY", incoming.message_id), message_id=999)
    assert len(temp_files(harness.root)) == 1
    incoming.fail(RuntimeError("the move failed"))
    assert temp_files(harness.root) == []
    assert harness.router.in_flight() == 0
    # The rest of the data set arrives: discarded, answered with a failure.
    conn.send(rest)
    [status] = responses
    assert status.status == 0x0110 and status.failed
    assert temp_files(harness.root) == []
    assert files_under(harness.root) == [
        f"{done.StudyInstanceUID}/{done.SeriesInstanceUID}/{done.SOPInstanceUID}.dcm"]
    assert result_of(incoming.instances.read()).sop_instance_uid == done.SOPInstanceUID
    failure_of(incoming.instances.read(), RuntimeError)
    assert incoming.received == 1 and incoming.refused == 1


class _NoTimer:
    def active(self):
        return False


def test_association_ending_mid_sub_operation(harness):
    incoming = harness.expect()
    conn = harness.connect()
    conn.store_partly(make_instance(), ("HARMONY", incoming.message_id))
    assert len(temp_files(harness.root)) == 1
    incoming.finish()
    conn.association.abort()
    conn.pump.flush()
    assert temp_files(harness.root) == []
    assert result_of(incoming.instances.read()) is EOF
    assert incoming.refused == 1 and incoming.received == 0


class FailingWriter:
    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(28, "No space left on device")

    def commit(self, relpath=None):
        return self.real.commit(relpath)

    def abort(self):
        self.real.abort()


class FailingStorage:
    def __init__(self, real):
        self.real = real

    def open_writer(self, relpath=None, fsync=False, sha256=False):
        return FailingWriter(self.real.open_writer(relpath, fsync=fsync))


def test_write_failure_answers_out_of_resources(harness):
    incoming = harness.expect(storage=FailingStorage(harness.storage))
    conn = harness.connect()
    d = conn.store(make_instance(), originator=("HARMONY", incoming.message_id))
    conn.pump.flush()
    status = result_of(d)
    assert status.status == 0xA700 and status.failed
    assert incoming.refused == 1 and incoming.received == 0
    incoming.finish()
    assert drain(incoming.instances) == []
    assert files_under(harness.root) == [] and temp_files(harness.root) == []


def test_sop_class_differing_from_the_context_is_refused(harness):
    incoming = harness.expect()
    conn = harness.connect()
    ds = make_instance()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    context = conn.association.context_for(CT, EXPLICIT)
    responses = []
    conn.association._pending[55] = (defer.Deferred().addCallback(responses.append), _NoTimer())
    fields = {
        "AffectedSOPClassUID": ds.SOPClassUID,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": 55,
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "AffectedSOPInstanceUID": ds.SOPInstanceUID,
        "MoveOriginatorApplicationEntityTitle": "HARMONY",
        "MoveOriginatorMessageID": incoming.message_id,
    }
    conn.association.association.send_message(context.id, messages.encode_command(fields),
                                              encode_identifier(ds, EXPLICIT))
    conn.pump.flush()
    assert [r.status for r in responses] == [0x0122]
    assert incoming.refused == 1
    incoming.finish()
    assert drain(incoming.instances) == []


# -- backpressure ------------------------------------------------------------------------------


def watch_reading(conn):
    calls = []
    transport = conn.server.transport
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    return calls


def test_slow_consumer_pauses_reading(harness):
    incoming = harness.expect(high_water=2)
    conn = harness.connect()
    calls = watch_reading(conn)
    for _ in range(2):
        d = conn.store(make_instance(), originator=("HARMONY", incoming.message_id))
        conn.pump.flush()
        assert result_of(d).ok
    assert calls == ["pause"]
    result_of(incoming.instances.read())
    assert calls == ["pause"]
    result_of(incoming.instances.read())
    assert calls == ["pause", "resume"]
    d = conn.store(make_instance(), originator=("HARMONY", incoming.message_id))
    conn.pump.flush()
    incoming.finish()
    assert len(drain(incoming.instances)) == 1
    assert calls == ["pause", "resume"]


def test_pause_reaches_associations_that_join_later_and_ends_with_the_move(harness):
    incoming = harness.expect(high_water=1)
    first, second = harness.connect(), harness.connect()
    calls1, calls2 = watch_reading(first), watch_reading(second)
    first.store(make_instance(), originator=("HARMONY", incoming.message_id))
    first.pump.flush()
    assert calls1 == ["pause"] and calls2 == []
    # The other association was already sending.
    second.store(make_instance(), originator=("HARMONY", incoming.message_id))
    second.pump.flush()
    assert calls2 == ["pause"]
    incoming.fail(RuntimeError("given up"))
    assert calls1 == ["pause", "resume"] and calls2 == ["pause", "resume"]


def test_two_moves_pausing_one_association(harness):
    a, b = harness.expect(high_water=1), harness.expect(high_water=1)
    conn = harness.connect()
    calls = watch_reading(conn)
    conn.store(make_instance(), originator=("HARMONY", a.message_id))
    conn.store(make_instance(), originator=("HARMONY", b.message_id))
    conn.pump.flush()
    assert calls == ["pause"]
    result_of(a.instances.read())
    assert calls == ["pause"]  # b still holds it
    result_of(b.instances.read())
    assert calls == ["pause", "resume"]


# -- MoveStoreListener --------------------------------------------------------------------------


def test_listener_service(tmp_path):
    reactor = MemoryReactorClock()
    router = MoveRouter()
    listener = MoveStoreListener(reactor, "HARMONY", 11113, bind_addr="127.0.0.1", router=router)
    assert result_of(listener.startService()) is None
    assert listener.running
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (11113, "127.0.0.1")
    assert factory is listener.factory
    policy = listener.factory.policy
    assert policy.ae_title == "HARMONY" and policy.require_called_aet
    assert CT in policy.syntaxes and VERIFICATION in policy.syntaxes
    assert "1.2.840.10008.1.2.4.50" in policy.syntaxes[CT]  # JPEG baseline: stored as received
    assert result_of(listener.stopService()) is None
    assert not listener.running
    assert result_of(listener.stopService()) is None
    with pytest.raises(ValueError):
        MoveStoreListener(reactor, "HARMONY", 11113)


def test_listener_default_bind_address():
    reactor = MemoryReactorClock()
    listener = MoveStoreListener(reactor, "HARMONY", 0, router=MoveRouter())
    listener.startService()
    assert reactor.tcpServers[0][3] == "0.0.0.0"


def test_listener_answers_echo_and_rejects_other_called_aes(harness):
    conn = harness.connect()
    echo = conn.association.echo()
    conn.pump.flush()
    assert result_of(echo).ok
    d = harness.pacs.associate("127.0.0.1", 11113, "NOT_HARMONY", PROPOSED)
    wire(harness.reactor, harness.factory)
    failure_of(d)


def test_refusal_without_a_data_set(harness):
    conn = harness.connect()
    context = conn.association.context_for(CT, EXPLICIT)
    responses = []
    conn.association._pending[66] = (defer.Deferred().addCallback(responses.append), _NoTimer())
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": 66,
        "Priority": 0,
        "CommandDataSetType": messages.NO_DATASET,
        "AffectedSOPInstanceUID": "1.2.3",
    }
    conn.association.association.send_message(context.id, messages.encode_command(fields))
    conn.pump.flush()
    assert [r.status for r in responses] == [move_module.NOT_OURS]


# -- end to end: C-MOVE, sub-operations back to Harmony -----------------------------------------------


class EndToEnd:
    """
    Harmony's SCU ("HARMONY") moves from the fake C-MOVE SCP ("MOVESCP"),
    which sends each instance as a C-STORE to Harmony's store SCP over a
    second connection (calling AE "PACS"), then a pending C-MOVE-RSP, then
    the final one.
    """

    def __init__(self, tmp_path, originator=True, listener=True, dimse_timeout=30):
        self.harness = Harness(tmp_path, listener=listener)
        self.reactor = self.harness.reactor
        self.originals = [make_instance() for _ in range(3)]
        self.service = FakeMoveService(on_request=self.run)
        self.originator = originator
        self.scp_factory = move_scp_factory(self.reactor, self.service)
        self.client = DicomClient(self.reactor, "HARMONY", AssociationSettings(max_pdu_length=4096),
                                  dimse_timeout=dimse_timeout)
        d = self.client.associate_for_move("127.0.0.1", 11112, "MOVESCP")
        self.move_server, self.move_client, self.move_pump = wire(self.reactor, self.scp_factory)
        self.association = result_of(d)
        self.store = None
        self.auto = True

    def run(self, move):
        """
        The fake SCP got the C-MOVE-RQ: connect to the destination and send.
        """
        assert move.destination == "HARMONY"
        self.request = move
        move.remaining = len(self.originals)
        self.queue = list(self.originals)
        self.store = self.harness.connect()
        if self.auto:
            self.next()

    def next(self):
        move = self.request
        if not self.queue:
            move.final(0x0000 if not move.failed else 0xB000)
            return
        ds = self.queue.pop(0)
        originator = (move.originator_aet, move.message_id) if self.originator else None
        d = self.store.store(ds, originator=originator)
        d.addCallback(self.stored)

    def stored(self, status):
        move = self.request
        move.remaining -= 1
        if status.ok:
            move.completed += 1
        else:
            move.failed += 1
        if self.queue:
            move.pending()
        if self.auto:
            self.next()

    def flush(self):
        flush(self.move_pump)
        if self.store is not None:  # connected by run(), once
            flush(self.move_pump, self.store.pump)


def start_move(e2e, **kwargs):
    incoming = e2e.harness.expect(**kwargs)
    operation = e2e.association.move(query(StudyInstanceUID="1.2.3"), "HARMONY", message_id=incoming.message_id)
    incoming.follow(operation)
    operation.result.addCallbacks(lambda status: incoming.finish() or status,
                                  lambda failure: incoming.fail(failure.value) or failure)
    return incoming, operation


@pytest.mark.parametrize("listener", [True, False])
def test_end_to_end_move(tmp_path, listener):
    e2e = EndToEnd(tmp_path, listener=listener)
    incoming, operation = start_move(e2e)
    progress = []
    operation.on_progress = progress.append
    e2e.flush()
    status = result_of(operation.result)
    assert status.ok
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert progress[-1] == {"remaining": 1, "completed": 2, "failed": 0, "warning": 0}
    instances = drain(incoming.instances)
    assert [i.sop_instance_uid for i in instances] == [ds.SOPInstanceUID for ds in e2e.originals]
    for instance, ds in zip(instances, e2e.originals):
        check_instance(instance, ds, e2e.harness.root)
    assert incoming.received == 3 and incoming.refused == 0
    assert e2e.harness.router.in_flight() == 0
    assert e2e.harness.executor.calls == []
    assert temp_files(e2e.harness.root) == []


def test_end_to_end_move_without_originator_fields(tmp_path):
    e2e = EndToEnd(tmp_path, originator=False)
    incoming, operation = start_move(e2e, source_aet="PACS")
    e2e.flush()
    assert result_of(operation.result).ok
    assert len(drain(incoming.instances)) == 3


def test_end_to_end_unexpected_move_is_refused(tmp_path):
    # The PACS sends to HARMONY for a move Harmony did not register.
    e2e = EndToEnd(tmp_path)
    operation = e2e.association.move(query(StudyInstanceUID="1.2.3"), "HARMONY")
    e2e.flush()
    status = result_of(operation.result)
    assert status.warning and status.fields["NumberOfFailedSuboperations"] == 3
    assert files_under(e2e.harness.root) == []


def test_end_to_end_cancel_through_the_stream(tmp_path):
    e2e = EndToEnd(tmp_path)
    e2e.auto = False
    incoming, operation = start_move(e2e)
    e2e.flush()
    e2e.next()
    e2e.flush()
    assert result_of(incoming.instances.read()).sop_instance_uid == e2e.originals[0].SOPInstanceUID
    incoming.instances.cancel()
    e2e.flush()
    assert len(e2e.service.cancels) == 1
    assert result_of(operation.result).cancelled
    assert not incoming.active


def test_end_to_end_slow_consumer_suspends_the_move_timer(tmp_path):
    e2e = EndToEnd(tmp_path, dimse_timeout=5)
    e2e.auto = False
    incoming, operation = start_move(e2e, high_water=1)
    e2e.flush()
    e2e.reactor.advance(4)
    e2e.next()  # a sub-operation restarts the move's timer ...
    e2e.flush()
    e2e.reactor.advance(4)
    assert not has_fired(operation.result)
    # ... and its instance, unread, paused reading: no timeout meanwhile.
    e2e.reactor.advance(60)
    assert not has_fired(operation.result)
    result_of(incoming.instances.read())
    e2e.reactor.advance(4)
    assert not has_fired(operation.result)
    e2e.reactor.advance(2)
    failure_of(operation.result, Exception)
    failure_of(incoming.instances.read(), Exception)


def test_listener_port_taken_raises_at_start():
    from twisted.internet.error import CannotListenError

    reactor = MemoryReactorClock()

    def taken(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    reactor.listenTCP = taken
    listener = MoveStoreListener(reactor, "HARMONY", 11113, router=MoveRouter())
    with pytest.raises(CannotListenError):
        listener.startService()
    assert not listener.running
    failure_of(defer.maybeDeferred(listener.startService), CannotListenError)
