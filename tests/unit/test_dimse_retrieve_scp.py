"""
The C-GET and C-MOVE SCP services (harmony.dimse.retrieve) over in-memory
associations (twisted.test.iosim, timers on a MemoryReactorClock): Harmony's
own SCU is the requestor, a fake pipeline streams instance files written
from pydicom's test data, and for C-MOVE the destination is a second SCP
reached through the reactor's connectTCP.
"""

import copy

import pydicom
import pytest
from _deferreds import failure_of, has_fired, result_of
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from harmony.dimse import messages
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.retrieve import RetrieveService
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    DicomClient,
    decode_identifier,
)
from harmony.envelope import DicomInstance, DicomResult, ResponseEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import Stream

IMPLICIT, EXPLICIT = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
HARMONY_PORT = 11112

SCP_SYNTAXES = {
    STUDY_ROOT_GET: [EXPLICIT, IMPLICIT],
    PATIENT_ROOT_GET: [EXPLICIT, IMPLICIT],
    STUDY_ROOT_MOVE: [EXPLICIT, IMPLICIT],
    PATIENT_ROOT_MOVE: [EXPLICIT, IMPLICIT],
    CT: [EXPLICIT, IMPLICIT],
    MR: [EXPLICIT, IMPLICIT],
}
DEST_SYNTAXES = {CT: [EXPLICIT, IMPLICIT], MR: [EXPLICIT, IMPLICIT]}


def query(level="STUDY", **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = keys.get("StudyInstanceUID", "1.2.3")
    return ds


# -- test data ------------------------------------------------------------------


class Files:
    """
    Part 10 files written from CT_small.dcm with fresh UIDs, and the
    DicomInstances a backend would stream for them.
    """

    def __init__(self, tmp_path):
        self.root = tmp_path / "spool"
        self.root.mkdir(exist_ok=True)
        self.originals = {}
        self.disposed = []
        self.study = generate_uid()

    def dataset(self, sop_class=CT):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
        del ds.file_meta
        ds.SOPClassUID = sop_class
        ds.StudyInstanceUID = self.study
        ds.SOPInstanceUID = generate_uid()
        return ds

    def instance(self, sop_class=CT, ts=EXPLICIT, form="path"):
        ds = self.dataset(sop_class)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ts
        written = copy.deepcopy(ds)
        written.file_meta = meta
        path = self.root / (ds.SOPInstanceUID + ".dcm")
        written.save_as(str(path), enforce_file_format=True)
        self.originals[ds.SOPInstanceUID] = ds
        uid = ds.SOPInstanceUID
        data = path.read_bytes()
        kwargs = {"path": str(path), "data": None}
        if form == "bytes":
            kwargs = {"data": data}
        elif form == "stream":
            kwargs = {"data": Stream.from_bytes(data)}
        return DicomInstance(
            sop_class_uid=sop_class,
            sop_instance_uid=uid,
            transfer_syntax=ts,
            size=len(data),
            dispose=lambda: self.disposed.append(uid),
            **kwargs,
        )


class Executor:
    """
    A pipeline whose backend answers a retrieve with an instance stream the
    test feeds.
    """

    backends = ("pacs",)
    request_chain = response_chain = ()

    def __init__(self, outcome=None):
        self.instances = Stream(high_water=1000)
        self.done = defer.Deferred()
        self.requests = []
        self.outcome = outcome
        self.result = DicomResult(status=None, instances=self.instances, done=self.done)

    def execute(self, endpoint, envelope):
        self.requests.append(envelope)
        if self.outcome is not None:
            return defer.succeed(self.outcome)
        return defer.succeed(ResponseEnvelope(status=200, dicom=self.result))

    def feed(self, instances, status=0x0000, comment=None):
        for instance in instances:
            self.instances.write(instance)
        self.instances.finish()
        self.done.callback((status, comment))


# -- the move destination -----------------------------------------------------


class DestinationStore:
    """
    The move destination's C-STORE SCP: records every C-STORE-RQ and its
    data set, answers C{status(fields)} (success by default).
    """

    def __init__(self):
        self.received = []  # (association, fields, data)
        self.status = lambda fields: 0x0000

    def start(self, association, context, command):
        return _DestinationStoreRQ(self, association, context, command)


class _DestinationStoreRQ:
    def __init__(self, service, association, context, command):
        self.service, self.association, self.context, self.command = service, association, context, command
        self.chunks = []

    def fragment(self, data):
        self.chunks.append(bytes(data))

    def finish(self):
        fields = self.command.fields
        self.service.received.append((self.association, fields, b"".join(self.chunks), self.context.transfer_syntax))
        rsp = messages.store_rsp(
            fields["MessageID"],
            fields["AffectedSOPClassUID"],
            fields["AffectedSOPInstanceUID"],
            self.service.status(fields),
        )
        self.association.send_message(self.context.id, rsp)

    def aborted(self, association):
        pass


# -- the wiring -------------------------------------------------------------------


class Relay:
    """
    Harmony's SCP with the retrieve services, a requestor, and a move
    destination, all connected in memory.
    """

    def __init__(self, tmp_path, executor=None, scp_settings=None, destinations=None):
        self.reactor = MemoryReactorClock()
        self.executor = executor or Executor()
        self.files = Files(tmp_path)
        self.harmony_client = DicomClient(self.reactor, "HARMONY", AssociationSettings(max_pdu_length=4096),
                                          dimse_timeout=20)
        pipeline = (self.executor, "endpoint")
        # Streamed instances are spooled here (fsync off: commits on the
        # calling thread).
        self.spool = FilesystemStorage(str(tmp_path / "relay-spool"), reactor=self.reactor)
        self.get_service = RetrieveService(pipeline, "get", storage=self.spool)
        self.move_service = RetrieveService(
            pipeline, "move", destinations=destinations or {"DEST": ("dest.example", 104)}, client=self.harmony_client,
            storage=self.spool,
        )
        self.factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("HARMONY", SCP_SYNTAXES, requestor_scp_allowed=(CT, MR)),
            scp_settings or AssociationSettings(idle_timeout=None, dimse_timeout=5, max_pdu_length=4096),
            {messages.C_GET_RQ: self.get_service, messages.C_MOVE_RQ: self.move_service},
        )
        self.destination = DestinationStore()
        self.dest_factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("DEST", DEST_SYNTAXES),
            AssociationSettings(idle_timeout=None, max_pdu_length=8192),
            {messages.C_STORE_RQ: self.destination},
        )
        self.dest_up = True
        self.dest_associations = []
        self.pumps = []
        self._wired = 0
        self.client = DicomClient(self.reactor, "GETSCU", AssociationSettings(max_pdu_length=4096), dimse_timeout=30)
        self.storage = FilesystemStorage(str(tmp_path / "received"), reactor=self.reactor)

    def _wire_new(self):
        moved = False
        while self._wired < len(self.reactor.tcpClients):
            host, port, factory, _, _ = self.reactor.tcpClients[self._wired]
            connector = self.reactor.connectors[self._wired]
            self._wired += 1
            moved = True
            if port == HARMONY_PORT:
                server_factory = self.factory
            elif not self.dest_up:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            else:
                server_factory = self.dest_factory
            server = server_factory.buildProtocol(None)
            client = factory.buildProtocol(None)
            pump = iosim.connect(
                server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False,
                clock=self.reactor,
            )
            self.pumps.append(pump)
            if server_factory is self.dest_factory:
                self.dest_associations.append(server)
            else:
                self.server_protocol, self.client_protocol = server, client
        return moved

    def flush(self):
        for _ in range(100000):
            moved = self._wire_new()
            for pump in self.pumps:
                if pump.pump(advanceClock=False):
                    moved = True
            if not moved:
                return
        raise AssertionError("never quiet")

    def connect_for_get(self, storage=((CT, [EXPLICIT, IMPLICIT]),)):
        d = self.client.associate_for_get("127.0.0.1", HARMONY_PORT, "HARMONY", list(storage),
                                          models=("study", "patient"))
        self.flush()
        self.association = result_of(d)
        return self.association

    def connect_for_move(self):
        d = self.client.associate_for_move("127.0.0.1", HARMONY_PORT, "HARMONY", models=("study", "patient"))
        self.flush()
        self.association = result_of(d)
        return self.association

    def get(self, **kwargs):
        operation = self.association.get(query(), storage=self.storage, **kwargs)
        self.progress = []
        operation.on_progress = self.progress.append
        self.flush()
        return operation

    def move(self, destination="DEST", **kwargs):
        operation = self.association.move(query(), destination, **kwargs)
        self.progress = []
        operation.on_progress = self.progress.append
        self.flush()
        return operation


@pytest.fixture
def relay(tmp_path):
    return Relay(tmp_path)


def counts(status):
    fields = status.fields
    return (
        fields.get("NumberOfCompletedSuboperations"),
        fields.get("NumberOfFailedSuboperations"),
        fields.get("NumberOfWarningSuboperations"),
    )


def same_dataset(received, original):
    received = copy.deepcopy(received)
    if hasattr(received, "file_meta"):
        del received.file_meta
    return received == original


# -- C-GET -------------------------------------------------------------------------------


def test_get_relays_every_instance_byte_identical(relay):
    relay.connect_for_get()
    get = relay.get()
    [envelope] = relay.executor.requests
    request = envelope.dicom
    assert (request.operation, request.query_model, request.level) == ("get", "study", "STUDY")
    assert request.identifier.StudyInstanceUID == "1.2.3"
    assert (request.calling_aet, request.called_aet, request.move_destination) == ("GETSCU", "HARMONY", None)
    # Instances may come from memory: each is sent on, then disposed of.
    assert request.accept_in_memory is True
    assert envelope.metadata["protocol"] == "dimse"
    assert envelope.details.method == "C-GET"

    instances = [relay.files.instance(form=form) for form in ("path", "bytes", "stream")]
    relay.executor.feed(instances)
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0x0000, status
    assert counts(status) == (3, 0, 0)
    assert "NumberOfRemainingSuboperations" not in status.fields
    received = []
    for instance in [result_of(get.instances.read()) for _ in range(3)]:
        received.append(instance.sop_instance_uid)
        assert same_dataset(pydicom.dcmread(instance.path), relay.files.originals[instance.sop_instance_uid])
    assert received == [i.sop_instance_uid for i in instances]
    assert sorted(relay.files.disposed) == sorted(received)
    # The streamed one was spooled in the storage, and removed once sent.
    assert _listed(relay.spool) == []
    # One pending response per sub-operation; what remains is estimated
    # from what was already received (no upstream counts here).
    assert [(p["completed"], p["failed"], p["warning"]) for p in relay.progress] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert [p["remaining"] for p in relay.progress] == [1, 1, 0]
    assert relay.server_protocol.operations == {}


def _listed(storage):
    """What a storage holds (synchronous walk; temporary files left out)."""
    import os

    found = []
    for directory, dirs, names in os.walk(storage.root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += names
    return found


def test_get_patient_root_model(relay):
    relay.connect_for_get()
    get = relay.association.get(query(level="PATIENT"), model="patient", storage=relay.storage)
    relay.flush()
    request = relay.executor.requests[0].dicom
    assert (request.query_model, request.level) == ("patient", "PATIENT")
    relay.executor.feed([])
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0x0000
    assert counts(status) == (0, 0, 0)


def test_get_remaining_from_the_upstream_counts(relay):
    relay.connect_for_get()
    get = relay.get()
    result = relay.executor.result
    result.completed, result.failed, result.warning, result.remaining = 2, 0, 0, 3
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    assert relay.progress[-1]["remaining"] == 4
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    assert relay.progress[-1]["remaining"] == 3
    result.completed, result.remaining = 2, 0  # the upstream ended early: never negative
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    assert relay.progress[-1]["remaining"] == 0
    relay.executor.feed([])
    relay.flush()
    assert result_of(get.result).status == 0x0000


def test_get_some_failed(relay):
    # The requestor took the SCP role for CT only: the MR instance fails.
    relay.connect_for_get()
    get = relay.get()
    mr = relay.files.instance(sop_class=MR)
    relay.executor.feed([relay.files.instance(), mr, relay.files.instance()])
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xB000
    assert counts(status) == (2, 1, 0)
    assert len(relay.files.disposed) == 3
    delivered = [result_of(get.instances.read()).sop_instance_uid for _ in range(2)]
    assert mr.sop_instance_uid not in delivered


def test_get_failed_uid_list_in_the_final_response(relay):
    relay.connect_for_get()
    sent = []
    original = relay.server_protocol.send_message

    def spy(context_id, command, dataset=None, **kwargs):
        sent.append((messages.decode_command(command), dataset))
        return original(context_id, command, dataset, **kwargs)

    relay.server_protocol.send_message = spy
    get = relay.get()
    mr = relay.files.instance(sop_class=MR)
    relay.executor.feed([relay.files.instance(), mr])
    relay.flush()
    assert result_of(get.result).status == 0xB000
    fields, data = sent[-1]
    assert fields["CommandField"] == messages.C_GET_RSP and fields["Status"] == 0xB000
    assert fields["CommandDataSetType"] != messages.NO_DATASET
    failed = decode_identifier(data, relay.association.context_for(STUDY_ROOT_GET).transfer_syntax)
    assert failed.FailedSOPInstanceUIDList == mr.sop_instance_uid


def test_get_all_failed(relay):
    relay.connect_for_get()
    get = relay.get()
    relay.executor.feed([relay.files.instance(sop_class=MR), relay.files.instance(sop_class=MR)])
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xA702
    assert counts(status) == (0, 2, 0)
    assert status.error_comment


def test_get_unreadable_instance_fails(relay, tmp_path):
    relay.connect_for_get()
    get = relay.get()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    broken = DicomInstance(
        CT, "1.2.3.4", EXPLICIT, data=None, path=str(bad), dispose=lambda: relay.files.disposed.append(1)
    )
    relay.executor.feed([broken, relay.files.instance()])
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xB000
    assert counts(status) == (1, 1, 0)
    assert len(relay.files.disposed) == 2


def test_get_upstream_failure_with_nothing_sent(relay):
    relay.connect_for_get()
    get = relay.get()
    relay.executor.feed([], status=0xA700, comment="The PACS is busy")
    relay.flush()
    status = result_of(get.result)
    assert (status.status, status.error_comment) == (0xA700, "The PACS is busy")


def test_get_upstream_failure_after_some_were_sent(relay):
    relay.connect_for_get()
    get = relay.get()
    relay.executor.feed([relay.files.instance()], status=0xA700, comment="lost the PACS")
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xB000
    assert counts(status) == (1, 0, 0)


def test_get_upstream_failed_counts_are_failed_sub_operations(relay):
    relay.connect_for_get()
    get = relay.get()
    result = relay.executor.result
    result.completed, result.failed, result.warning, result.remaining = 1, 2, 0, 0
    relay.executor.feed([relay.files.instance()], status=0xB000)
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xB000
    assert counts(status) == (1, 2, 0)


def test_get_instance_stream_fails(relay):
    relay.connect_for_get()
    get = relay.get()
    relay.executor.instances.fail(UpstreamUnavailable())
    relay.flush()
    assert result_of(get.result).status == 0xA700


def test_get_error_rendered_by_the_endpoint(tmp_path):
    error = ResponseEnvelope(status=502, dicom=DicomResult(status=0xA700, error_comment="down"))
    relay = Relay(tmp_path, Executor(outcome=error))
    relay.connect_for_get()
    status = result_of(relay.get().result)
    assert (status.status, status.error_comment) == (0xA700, "down")


def test_get_pipeline_without_dicom_result(tmp_path):
    relay = Relay(tmp_path, Executor(outcome=ResponseEnvelope(status=200)))
    relay.connect_for_get()
    assert result_of(relay.get().result).status == 0xC000
    relay = Relay(tmp_path, Executor(outcome=ResponseEnvelope(status=503)))
    relay.connect_for_get()
    assert result_of(relay.get().result).status == 0xA700


def test_get_pipeline_error(relay):
    relay.executor.execute = lambda endpoint, envelope: defer.fail(UpstreamUnavailable())
    relay.connect_for_get()
    assert result_of(relay.get().result).status == 0xA700


def test_get_bad_level_is_refused(relay):
    relay.connect_for_get()
    get = relay.association.get(query(level="GALAXY"), storage=relay.storage)
    relay.flush()
    assert result_of(get.result).status == 0xA900
    assert relay.executor.requests == []


def test_get_cancel(relay):
    relay.connect_for_get()
    get = relay.get()
    first, second, third = (relay.files.instance() for _ in range(3))
    relay.executor.instances.write(first)
    relay.flush()
    assert relay.progress[-1]["completed"] == 1
    relay.executor.instances.write(second)
    relay.executor.instances.write(third)  # not yet relayed when the cancel comes
    get.cancel()
    relay.flush()
    status = result_of(get.result)
    assert status.status == 0xFE00
    assert relay.executor.instances.cancelled
    assert status.fields["NumberOfCompletedSuboperations"] >= 1
    assert "NumberOfRemainingSuboperations" in status.fields
    # Everything read from the backend was disposed of.
    assert sorted(relay.files.disposed) == sorted(i.sop_instance_uid for i in (first, second, third))
    # The association keeps working.
    relay.executor.__init__()
    again = relay.get()
    relay.executor.feed([relay.files.instance()])
    relay.flush()
    assert result_of(again.result).status == 0x0000


def test_get_cancel_while_the_pipeline_runs(relay):
    pending = defer.Deferred()
    relay.executor.execute = lambda endpoint, envelope: pending
    relay.connect_for_get()
    get = relay.get()
    get.cancel()
    relay.flush()
    assert result_of(get.result).status == 0xFE00
    pending.callback(ResponseEnvelope(status=200, dicom=relay.executor.result))
    assert relay.executor.instances.cancelled


def test_get_sub_operation_timeout_aborts(relay):
    relay.connect_for_get()
    get = relay.get()
    instance = relay.files.instance()
    # The requestor's answers are lost from now on.
    relay.client_protocol.transport.write = lambda data: None
    relay.executor.instances.write(instance)
    relay.flush()
    assert not has_fired(get.result)
    relay.reactor.advance(5)
    relay.flush()
    failure_of(get.result, AssociationAborted)
    assert relay.executor.instances.cancelled
    assert relay.files.disposed == [instance.sop_instance_uid]
    assert relay.server_protocol.upper.state == "Sta1"


def test_get_requestor_abort_cancels_the_backend(relay):
    relay.connect_for_get()
    get = relay.get()
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    relay.association.abort()
    relay.flush()
    failure_of(get.result, AssociationAborted)
    assert relay.executor.instances.cancelled
    assert len(relay.files.disposed) == 1
    assert relay.server_protocol.operations == {}


def test_get_without_identifier(relay):
    relay.connect_for_get()
    context = relay.association.context_for(STUDY_ROOT_GET)
    fields = {
        "AffectedSOPClassUID": STUDY_ROOT_GET,
        "CommandField": messages.C_GET_RQ,
        "MessageID": 7,
        "Priority": 0,
        "CommandDataSetType": messages.NO_DATASET,
    }
    d = relay.association._request(context.id, fields)
    relay.flush()
    assert result_of(d).status == 0xA900


# -- C-MOVE ------------------------------------------------------------------------------


def test_move_relays_to_the_destination(relay):
    relay.connect_for_move()
    move = relay.move()
    [envelope] = relay.executor.requests
    request = envelope.dicom
    assert (request.operation, request.move_destination, request.calling_aet) == ("move", "DEST", "GETSCU")
    assert request.accept_in_memory is True
    assert envelope.metadata["move_destination"] == "DEST"
    instances = [relay.files.instance(), relay.files.instance(form="bytes")]
    relay.executor.feed(instances)
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0x0000, status
    assert counts(status) == (2, 0, 0)
    assert [p["completed"] for p in relay.progress] == [1, 2]
    [server] = relay.dest_associations
    assert (server.rq.calling_aet, server.rq.called_aet) == ("HARMONY", "DEST")
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in server.rq.contexts] == [(CT, [EXPLICIT])]
    assert len(relay.destination.received) == 2
    for (association, fields, data, ts), instance in zip(relay.destination.received, instances):
        assert fields["MoveOriginatorApplicationEntityTitle"].strip() == "GETSCU"
        assert fields["MoveOriginatorMessageID"] == move.message_id
        assert fields["AffectedSOPInstanceUID"] == instance.sop_instance_uid
        assert same_dataset(decode_identifier(data, ts), relay.files.originals[instance.sop_instance_uid])
    assert sorted(relay.files.disposed) == sorted(i.sop_instance_uid for i in instances)
    # Released once done.
    assert server.upper.state == "Sta1"


def test_move_unknown_destination(relay):
    relay.connect_for_move()
    move = relay.move("NOWHERE")
    status = result_of(move.result)
    assert status.status == 0xA801
    assert status.error_comment == "Refused: Move Destination unknown"
    assert relay.executor.requests == []
    assert relay.dest_associations == []


def test_move_new_pairs_open_new_associations(relay):
    relay.connect_for_move()
    move = relay.move()
    instances = [
        relay.files.instance(CT, EXPLICIT),
        relay.files.instance(CT, EXPLICIT),
        relay.files.instance(MR, EXPLICIT),
        relay.files.instance(CT, IMPLICIT, form="stream"),
        relay.files.instance(MR, EXPLICIT),
    ]
    relay.executor.feed(instances)
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0x0000, status
    assert counts(status) == (5, 0, 0)
    proposed = [[(c.abstract_syntax, c.transfer_syntaxes) for c in s.rq.contexts] for s in relay.dest_associations]
    assert proposed == [
        [(CT, [EXPLICIT])],
        [(CT, [EXPLICIT]), (MR, [EXPLICIT])],
        [(CT, [EXPLICIT]), (MR, [EXPLICIT]), (CT, [IMPLICIT])],
    ]
    assert all(s.upper.state == "Sta1" for s in relay.dest_associations)
    assert [ts for _, _, _, ts in relay.destination.received] == [EXPLICIT, EXPLICIT, EXPLICIT, IMPLICIT, EXPLICIT]
    for (_, fields, data, ts) in relay.destination.received:
        uid = fields["AffectedSOPInstanceUID"]
        assert same_dataset(decode_identifier(data, ts), relay.files.originals[uid])
    assert len(relay.files.disposed) == 5


def test_move_destination_down(relay):
    relay.dest_up = False
    relay.connect_for_move()
    move = relay.move()
    result = relay.executor.result
    result.completed, result.failed, result.warning, result.remaining = 0, 0, 0, 3
    first = relay.files.instance()
    relay.executor.instances.write(first)
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0xA702
    assert counts(status) == (0, 3, 0)
    assert status.error_comment
    assert relay.executor.instances.cancelled
    assert first.sop_instance_uid in relay.files.disposed


def test_move_destination_refuses_some(relay):
    relay.connect_for_move()
    move = relay.move()
    instances = [relay.files.instance() for _ in range(3)]
    refused = instances[1].sop_instance_uid
    relay.destination.status = lambda fields: 0xA700 if fields["AffectedSOPInstanceUID"] == refused else 0
    relay.executor.feed(instances)
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0xB000
    assert counts(status) == (2, 1, 0)


def test_move_destination_warnings(relay):
    relay.connect_for_move()
    move = relay.move()
    relay.destination.status = lambda fields: 0xB007
    relay.executor.feed([relay.files.instance()])
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0xB000
    assert counts(status) == (0, 0, 1)


def test_move_cancel(relay):
    relay.connect_for_move()
    move = relay.move()
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    move.cancel()
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0xFE00
    assert status.fields["NumberOfCompletedSuboperations"] == 1
    assert relay.executor.instances.cancelled
    assert all(s.upper.state == "Sta1" for s in relay.dest_associations)


def test_move_requestor_abort_aborts_the_destination(relay):
    relay.connect_for_move()
    move = relay.move()
    relay.executor.instances.write(relay.files.instance())
    relay.flush()
    [server] = relay.dest_associations
    assert server.upper.state == "Sta6"
    relay.association.abort()
    relay.flush()
    failure_of(move.result, AssociationAborted)
    assert relay.executor.instances.cancelled
    assert server.upper.state == "Sta1"


def test_service_arguments():
    with pytest.raises(ValueError):
        RetrieveService((None, None), "find")
    with pytest.raises(ValueError):
        RetrieveService((None, None), "move")


def test_move_keeps_the_requestor_association_alive(tmp_path):
    # A C-MOVE requestor sends nothing while the move runs: the pending
    # responses keep its association from looking idle.
    relay = Relay(tmp_path, scp_settings=AssociationSettings(idle_timeout=10, dimse_timeout=5, max_pdu_length=4096))
    relay.connect_for_move()
    move = relay.move()
    for _ in range(3):
        relay.reactor.advance(6)
        relay.executor.instances.write(relay.files.instance())
        relay.flush()
    relay.executor.feed([])
    relay.flush()
    status = result_of(move.result)
    assert status.status == 0x0000
    assert counts(status) == (3, 0, 0)


# -- the destination's presentation contexts (fakes) ------------------------------------------


class FakeDestinationAssociation:
    """
    Accepts the first transfer syntax proposed for each SOP class, except
    for the classes in C{refuse}.
    """

    def __init__(self, syntaxes, refuse=()):
        self.association = type("A", (), {"ended": defer.Deferred()})()
        self.accepted = {(sop, ts[0]) for sop, ts in syntaxes if sop not in refuse}
        self.stored = []
        self.released = False

    def context_for(self, sop_class_uid, transfer_syntax=None):
        if (sop_class_uid, transfer_syntax) not in self.accepted:
            raise LookupError(sop_class_uid)
        return object()

    def store(self, sop_class_uid, sop_instance_uid, transfer_syntax, dataset, priority=0, move_originator=None):
        from harmony.dimse.scu import DimseStatus

        self.stored.append((sop_class_uid, transfer_syntax, move_originator))
        return defer.succeed(DimseStatus(0x0000))

    def release(self):
        self.released = True
        return defer.succeed(None)

    def abort(self):
        pass


class FakeDestinationClient:
    def __init__(self, refuse=()):
        self.proposed = []
        self.associations = []
        self.refuse = refuse

    def associate(self, host, port, called_aet, syntaxes):
        self.proposed.append(syntaxes)
        association = FakeDestinationAssociation(syntaxes, self.refuse)
        self.associations.append(association)
        return defer.succeed(association)


class FakeSource:
    def __init__(self, sop_class_uid, transfer_syntax=EXPLICIT):
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = generate_uid()
        self.transfer_syntax = transfer_syntax

    def chunks(self):
        return b"data"


def test_destination_proposes_at_most_128_contexts():
    from harmony.dimse.retrieve import _Destination

    client = FakeDestinationClient()
    destination = _Destination(client, "DEST", "dest.example", 104)
    classes = [f"1.2.3.{i}" for i in range(130)]
    for sop_class in classes:
        status, _ = result_of(defer.Deferred.fromCoroutine(destination.store(FakeSource(sop_class), ("A", 1), 0)))
        assert status == 0x0000
    assert len(client.proposed) == 130
    assert max(len(p) for p in client.proposed) == 128
    last = client.proposed[-1]
    assert [sop for sop, _ in last] == classes[2:]
    assert all(a.released for a in client.associations[:-1])


def test_destination_refused_pair_is_not_asked_again():
    from harmony.dimse.retrieve import _Destination

    client = FakeDestinationClient(refuse=(MR,))
    destination = _Destination(client, "DEST", "dest.example", 104)

    def store(sop_class):
        return result_of(defer.Deferred.fromCoroutine(destination.store(FakeSource(sop_class), ("A", 1), 0)))

    assert store(CT)[0] == 0x0000
    assert store(MR)[0] != 0x0000
    assert store(MR)[0] != 0x0000
    assert store(CT)[0] == 0x0000
    assert len(client.proposed) == 2


def test_a_stray_c_store_rsp_is_ignored(relay):
    relay.connect_for_get()
    context = relay.association.context_for(STUDY_ROOT_GET)
    sent = []
    original = relay.server_protocol.send_message
    relay.server_protocol.send_message = lambda *args, **kwargs: sent.append(args) or original(*args, **kwargs)
    rsp = messages.store_rsp(4242, CT, "1.2.3.4", 0x0000)
    relay.association.association.send_message(context.id, rsp)
    relay.flush()
    assert sent == []
    assert relay.server_protocol.upper.state == "Sta6"
    get = relay.get()
    relay.executor.feed([relay.files.instance()])
    relay.flush()
    assert result_of(get.result).status == 0x0000
