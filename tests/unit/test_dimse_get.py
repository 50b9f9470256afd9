"""
C-GET as SCU (harmony.dimse.scu: DicomClient.associate_for_get,
ClientAssociation.get, GetOperation) over an in-memory connection
(twisted.test.iosim) against a small fake C-GET SCP built on Harmony's
DicomServerFactory: it answers a C-GET-RQ with C-STORE-RQ sub-operations on
the same association (one at a time, each after the previous C-STORE-RSP),
pending C-GET-RSPs with counts, then the final C-GET-RSP.  Instances are
written into a real FilesystemStorage in a temporary directory (fsync off:
commits happen on the calling thread); timers on MemoryReactorClock.
"""

import os

import pydicom
import pytest
from _deferreds import drain, failure_of, has_fired, result_of
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from harmony.dimse import messages, scu
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
    DicomClient,
    DimseTimeout,
    decode_identifier,
    encode_identifier,
)
from harmony.dimse.substore import MemoryBudget
from harmony.envelope import DicomInstance
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import EOF

IMPLICIT, EXPLICIT = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

SCP_SYNTAXES = {
    messages.VERIFICATION_SOP_CLASS: [IMPLICIT],
    STUDY_ROOT_GET: [IMPLICIT, EXPLICIT],
    PATIENT_ROOT_GET: [IMPLICIT, EXPLICIT],
    CT: [EXPLICIT, IMPLICIT],
    MR: [EXPLICIT, IMPLICIT],
}
STORAGE = [(CT, [EXPLICIT])]










def read_all(stream):
    return b"".join(bytes(c) for c in drain(stream))


def query(level="STUDY", **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def make_instances(count, study=None, series=None):
    """
    C{count} CT instances (CT_small.dcm with fresh UIDs) as pydicom Datasets.
    """
    study = study or generate_uid()
    series = series or generate_uid()
    found = []
    for _ in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        del ds.file_meta
        found.append(ds)
    return found


# -- the fake SCP ------------------------------------------------------------


class FakeGet:
    """
    One C-GET-RQ received by the fake SCP.
    """

    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        self.command = command
        self.message_id = command.fields["MessageID"]
        self.chunks = []
        self.identifier = None
        self.ended = False
        self.queue = []
        self.completed = self.failed = self.warning = 0
        self.responses = []  # the C-STORE-RSP fields received
        self.waiting = None  # the message ID of the sub-operation in flight

    # the SCP's service object protocol
    def fragment(self, data):
        self.chunks.append(bytes(data))

    def finish(self):
        self.identifier = decode_identifier(b"".join(self.chunks), self.context.transfer_syntax)
        self.service.requests.append(self)
        self.queue = list(self.service.instances(self.identifier))
        if self.service.auto:
            self.next()

    def aborted(self, association):
        self.service.aborted.append(self)

    # driving
    def storage_context(self, sop_class, scp_role=True):
        for context in self.association.contexts.values():
            if context.abstract_syntax == sop_class and (context.requestor_scp or not scp_role):
                return context
        raise LookupError(sop_class)

    def send_store(self, ds, context=None, data=None, message_id=None):
        context = context or self.storage_context(ds.SOPClassUID, self.service.require_role)
        message_id = message_id or self.service.next_id()
        fields = {
            "AffectedSOPClassUID": ds.SOPClassUID,
            "CommandField": messages.C_STORE_RQ,
            "MessageID": message_id,
            "Priority": 0,
            "CommandDataSetType": messages.DATASET_PRESENT,
            "AffectedSOPInstanceUID": ds.SOPInstanceUID,
        }
        if data is None:
            data = encode_identifier(ds, context.transfer_syntax)
        self.waiting = message_id
        self.service.by_store[message_id] = self
        self.association.send_message(context.id, messages.encode_command(fields), data)

    def send_rsp(self, status, counts=True, remaining=True, dataset=None, comment=None):
        fields = {
            "AffectedSOPClassUID": self.context.abstract_syntax,
            "CommandField": messages.C_GET_RSP,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET if dataset is None else messages.DATASET_PRESENT,
            "Status": status,
            "ErrorComment": comment,
        }
        if counts:
            if remaining:
                fields["NumberOfRemainingSuboperations"] = len(self.queue)
            fields["NumberOfCompletedSuboperations"] = self.completed
            fields["NumberOfFailedSuboperations"] = self.failed
            fields["NumberOfWarningSuboperations"] = self.warning
        data = None if dataset is None else encode_identifier(dataset, self.context.transfer_syntax)
        self.association.send_message(self.context.id, messages.encode_command(fields), data)

    def next(self):
        if self.ended:
            return
        if self.queue:
            self.send_store(self.queue.pop(0))
            return
        self.final()

    def final(self, status=None, **kwargs):
        self.ended = True
        if status is None:
            status = self.service.final
            if status is None:
                status = 0x0000 if not self.failed else (0xB000 if self.completed else 0xA702)
        kwargs.setdefault("remaining", False)
        self.send_rsp(status, **kwargs)

    def store_answered(self, fields):
        self.responses.append(fields)
        self.waiting = None
        if fields["Status"] == 0x0000:
            self.completed += 1
        else:
            self.failed += 1
        if self.service.auto and not self.ended:
            if self.queue:
                self.send_rsp(0xFF00)
            self.next()


class FakeGetService:
    """
    A C-GET SCP for tests.

    @param instances: C{identifier -> [Dataset]} sent as sub-operations.
    @param final: the final status (C{None}: success, or 0xB000/0xA702
        after failed sub-operations).
    @param auto: run the whole get by itself (else the test drives it).
    """

    def __init__(self, instances=None, final=None, auto=True, require_role=True):
        self.instances = instances or (lambda identifier: make_instances(3))
        self.final = final
        self.auto = auto
        self.require_role = require_role
        self.requests = []
        self.cancels = []
        self.aborted = []
        self.by_store = {}
        self._id = 100

    def next_id(self):
        self._id += 1
        return self._id

    def start(self, association, context, command):
        return FakeGet(self, association, context, command)


class FakeStoreRspService:
    """
    C-STORE-RSP from Harmony's SCU: hand it to the get that sent the
    sub-operation.
    """

    def __init__(self, gets):
        self.gets = gets

    def start(self, association, context, command):
        fields = command.fields
        get = self.gets.by_store.pop(fields["MessageIDBeingRespondedTo"])
        get.store_answered(fields)
        return None


class FakeCancelService:
    """
    C-CANCEL-RQ: ends the get it names with 0xFE00 (if still running).
    """

    def __init__(self, gets):
        self.gets = gets

    def start(self, association, context, command):
        self.gets.cancels.append(command.fields)
        target = command.fields.get("MessageIDBeingRespondedTo")
        for get in self.gets.requests:
            if get.message_id == target and not get.ended:
                # Remaining is included in a cancel response (PS3.4 C.4.3.1.4).
                get.final(0xFE00, remaining=True)
        return None


class Peers:
    """
    Harmony's SCU and the fake C-GET SCP wired together in memory.
    """

    def __init__(self, tmp_path, service=None, scp_allowed=(CT, MR), dimse_timeout=30, client_settings=None,
                 storage=None):
        self.reactor = MemoryReactorClock()
        self.root = str(tmp_path / "store")
        self.storage = storage if storage is not None else FilesystemStorage(self.root, reactor=self.reactor)
        self.service = service or FakeGetService()
        self.factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("GETSCP", SCP_SYNTAXES, requestor_scp_allowed=scp_allowed),
            AssociationSettings(idle_timeout=None, max_pdu_length=4096),
            {
                messages.C_GET_RQ: self.service,
                messages.C_STORE_RSP: FakeStoreRspService(self.service),
                messages.C_CANCEL_RQ: FakeCancelService(self.service),
            },
        )
        self.client = DicomClient(
            self.reactor,
            "TESTSCU",
            client_settings or AssociationSettings(max_pdu_length=4096),
            dimse_timeout=dimse_timeout,
        )

    def _wire(self, d):
        factory = self.reactor.tcpClients[-1][2]
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

    def connect(self, storage=STORAGE, models=("study", "patient")):
        d = self.client.associate_for_get(
            "127.0.0.1", 11112, "GETSCP", storage, models=models,
            extra_syntaxes=[(messages.VERIFICATION_SOP_CLASS, [IMPLICIT])],
        )
        return self._wire(d)

    def connect_plain(self, syntaxes):
        return self._wire(self.client.associate("127.0.0.1", 11112, "GETSCP", syntaxes))

    def get(self, identifier=None, **kwargs):
        kwargs.setdefault("storage", self.storage)
        return self.association.get(identifier if identifier is not None else query(StudyInstanceUID="1.2.3"),
                                    **kwargs)

    def flush(self):
        self.pump.flush()

    def stored_files(self):
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(f for f in found if not f.startswith(".tmp" + os.sep))

    def temp_files(self):
        tmp = os.path.join(self.root, ".tmp")
        return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


@pytest.fixture
def peers(tmp_path):
    p = Peers(tmp_path)
    p.connect()
    return p


def check_instance(instance, original, root):
    """
    A delivered instance: its file holds exactly the original data set.
    """
    assert isinstance(instance, DicomInstance)
    assert instance.sop_class_uid == original.SOPClassUID
    assert instance.sop_instance_uid == original.SOPInstanceUID
    assert instance.transfer_syntax == EXPLICIT
    # As read from the data set while it came in: consumers need not read them again.
    assert instance.uids == (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    relpath = f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
    assert instance.path == os.path.join(root, *relpath.split("/"))
    assert instance.size == os.path.getsize(instance.path)
    data = read_all(instance.data)
    assert len(data) == instance.size
    with open(instance.path, "rb") as f:
        assert f.read() == data
    stored = pydicom.dcmread(instance.path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == EXPLICIT
    assert stored.file_meta.SourceApplicationEntityTitle == "GETSCP"
    assert stored.file_meta.ImplementationClassUID == scu.IMPLEMENTATION_CLASS_UID
    assert stored.PixelData == original.PixelData
    del stored.file_meta
    assert stored == original


# -- negotiation -----------------------------------------------------------------


def test_associate_for_get_proposes_the_scp_role(peers):
    rq = peers.server_protocol.rq
    roles = {r.abstract_syntax: (r.scu, r.scp) for r in rq.roles}
    assert roles == {CT: (False, True)}
    proposed = {c.abstract_syntax: c.transfer_syntaxes for c in rq.contexts}
    assert proposed[STUDY_ROOT_GET] == [EXPLICIT, IMPLICIT]
    assert proposed[PATIENT_ROOT_GET] == [EXPLICIT, IMPLICIT]
    assert proposed[CT] == [EXPLICIT]
    contexts = {c.abstract_syntax: c for c in peers.association.contexts.values()}
    assert contexts[CT].requestor_scp and not contexts[CT].requestor_scu
    assert contexts[STUDY_ROOT_GET].requestor_scu and not contexts[STUDY_ROOT_GET].requestor_scp
    # Verification still works on the same association.
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_unknown_model(peers):
    with pytest.raises(ValueError):
        peers.client.associate_for_get("127.0.0.1", 11112, "GETSCP", STORAGE, models=("nonsense",))
    with pytest.raises(ValueError):
        peers.get(model="nonsense")


def test_get_needs_storage_and_level(peers):
    with pytest.raises(ValueError):
        peers.association.get(query(), storage=None)
    with pytest.raises(ValueError):
        peers.get(Dataset())


def test_get_without_a_get_context(tmp_path):
    p = Peers(tmp_path)
    p.connect_plain([(messages.VERIFICATION_SOP_CLASS, [IMPLICIT])])
    with pytest.raises(LookupError):
        p.get()


# -- retrieving -------------------------------------------------------------------


def test_get_stores_each_instance_then_success(peers):
    originals = make_instances(3)
    peers.service.instances = lambda identifier: list(originals)
    get = peers.get(query(StudyInstanceUID=originals[0].StudyInstanceUID))
    assert isinstance(get, scu.GetOperation)
    peers.flush()
    status = result_of(get.result)
    assert status.ok and not status.failed, status
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert status.fields["NumberOfFailedSuboperations"] == 0
    assert status.fields["NumberOfWarningSuboperations"] == 0
    instances = drain(get.instances)
    assert [i.sop_instance_uid for i in instances] == [o.SOPInstanceUID for o in originals]
    for instance, original in zip(instances, originals):
        check_instance(instance, original, peers.root)
    assert get.stored == 3 and get.refused == 0
    [request] = peers.service.requests
    assert request.identifier == query(StudyInstanceUID=originals[0].StudyInstanceUID)
    assert request.context.abstract_syntax == STUDY_ROOT_GET
    fields = request.command.fields
    assert fields["AffectedSOPClassUID"] == STUDY_ROOT_GET
    assert fields["CommandField"] == messages.C_GET_RQ
    assert fields["MessageID"] == get.message_id
    assert [r["Status"] for r in request.responses] == [0, 0, 0]
    assert [r["AffectedSOPInstanceUID"] for r in request.responses] == [o.SOPInstanceUID for o in originals]
    assert len(peers.stored_files()) == 3
    assert peers.temp_files() == []
    # The association is still usable.
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_patient_root(peers):
    get = peers.get(query("PATIENT", PatientID="X"), model="patient")
    peers.flush()
    assert result_of(get.result).ok
    assert len(drain(get.instances)) == 3
    assert peers.service.requests[0].context.abstract_syntax == PATIENT_ROOT_GET


def test_second_get_on_the_same_association(peers):
    for _ in range(2):
        get = peers.get()
        peers.flush()
        assert result_of(get.result).ok
        assert len(drain(get.instances)) == 3
    assert len(peers.stored_files()) == 6


def test_each_instance_is_delivered_as_it_completes(peers):
    originals = make_instances(3)
    peers.service.auto = False
    peers.service.instances = lambda identifier: list(originals)
    get = peers.get()
    peers.flush()
    [request] = peers.service.requests
    waiting = get.instances.read()
    for i, original in enumerate(originals):
        assert not has_fired(waiting)
        request.next()
        peers.flush()
        assert result_of(waiting).sop_instance_uid == original.SOPInstanceUID
        assert len(request.responses) == i + 1
        request.send_rsp(0xFF00)
        peers.flush()
        assert not has_fired(get.result)
        assert get.pending["NumberOfCompletedSuboperations"] == i + 1
        waiting = get.instances.read()
    request.final()
    peers.flush()
    assert result_of(waiting) is EOF
    assert result_of(get.result).fields["NumberOfCompletedSuboperations"] == 3


def test_no_matches(peers):
    peers.service.instances = lambda identifier: []
    get = peers.get()
    peers.flush()
    status = result_of(get.result)
    assert status.ok and status.fields["NumberOfCompletedSuboperations"] == 0
    assert drain(get.instances) == []


def test_counts_missing_from_the_final_response_come_from_the_last_pending(peers):
    peers.service.auto = False
    get = peers.get()
    peers.flush()
    [request] = peers.service.requests
    for _ in range(3):
        request.next()
        peers.flush()
        request.send_rsp(0xFF00)
        peers.flush()
    request.final(0x0000, counts=False)
    peers.flush()
    status = result_of(get.result)
    assert status.ok
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert status.fields["NumberOfFailedSuboperations"] == 0
    assert "NumberOfRemainingSuboperations" not in status.fields or status.fields[
        "NumberOfRemainingSuboperations"] is None


def test_failure_status_with_failed_sop_instance_list(peers):
    originals = make_instances(2)
    peers.service.auto = False
    peers.service.instances = lambda identifier: list(originals)
    get = peers.get()
    peers.flush()
    [request] = peers.service.requests
    request.next()
    peers.flush()
    request.failed = 1
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = originals[1].SOPInstanceUID
    request.final(0xA702, comment="out of resources", dataset=failed)
    peers.flush()
    status = result_of(get.result)
    assert status.status == 0xA702 and status.failed and not status.ok
    assert status.error_comment == "out of resources"
    assert status.fields["NumberOfCompletedSuboperations"] == 1
    assert status.fields["NumberOfFailedSuboperations"] == 1
    [instance] = drain(get.instances)
    assert instance.sop_instance_uid == originals[0].SOPInstanceUID
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_warning_is_not_a_failure(peers):
    peers.service.final = 0xB000
    get = peers.get()
    peers.flush()
    status = result_of(get.result)
    assert status.warning and not status.failed


# -- sub-operations Harmony refuses -------------------------------------------------


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

    def read(self, relpath):
        return self.real.read(relpath)


def test_write_failure_answers_out_of_resources(tmp_path):
    p = Peers(tmp_path)
    p.storage = FailingStorage(p.storage)
    p.connect()
    get = p.get()
    p.flush()
    status = result_of(get.result)
    # The fake SCP reports what Harmony answered: every sub-operation failed.
    assert status.status == 0xA702 and status.failed
    assert status.fields["NumberOfFailedSuboperations"] == 3
    assert drain(get.instances) == []
    [request] = p.service.requests
    assert [r["Status"] for r in request.responses] == [0xA700] * 3
    assert get.refused == 3 and get.stored == 0
    assert p.stored_files() == []
    assert p.temp_files() == []


def test_store_on_a_context_without_the_scp_role_is_refused(tmp_path):
    p = Peers(tmp_path, service=FakeGetService(require_role=False))
    # Plain associate: the CT context is accepted with the default roles
    # (we are SCU only), no role selection.
    p.connect_plain([(STUDY_ROOT_GET, [IMPLICIT]), (CT, [EXPLICIT])])
    contexts = {c.abstract_syntax: c for c in p.association.contexts.values()}
    assert not contexts[CT].requestor_scp
    get = p.get()
    p.flush()
    status = result_of(get.result)
    [request] = p.service.requests
    assert [r["Status"] for r in request.responses] == [scu.SUBOPERATION_REFUSED] * 3
    assert scu.SUBOPERATION_REFUSED == 0x0124
    assert status.fields["NumberOfFailedSuboperations"] == 3
    assert drain(get.instances) == []
    assert get.refused == 3
    assert p.stored_files() == [] and p.temp_files() == []


def test_store_outside_a_get_is_refused(peers):
    service = peers.service
    service.auto = False
    get = peers.get()
    peers.flush()
    [request] = service.requests
    request.final(0x0000)
    peers.flush()
    assert result_of(get.result).ok
    # A stray sub-operation after the get ended.
    request.ended = False
    request.send_store(make_instances(1)[0])
    peers.flush()
    assert [r["Status"] for r in request.responses] == [0x0124]
    assert peers.stored_files() == []
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_sop_class_differing_from_the_context_is_refused(peers):
    service = peers.service
    service.auto = False
    get = peers.get()
    peers.flush()
    [request] = service.requests
    mr = make_instances(1)[0]
    mr.SOPClassUID = MR
    request.send_store(mr, context=request.storage_context(CT))
    peers.flush()
    assert [r["Status"] for r in request.responses] == [0x0122]
    request.failed = 1
    request.final()
    peers.flush()
    assert result_of(get.result).status == 0xA702
    assert drain(get.instances) == []


# -- cancel, abort, timeout ----------------------------------------------------------


def first_of_a_paced_get(peers):
    """
    A C-GET whose sub-operations the test sends one by one: the first one
    sent and received.  Returns (get, request, the first instance).
    """
    peers.service.auto = False
    get = peers.get()
    peers.flush()
    [request] = peers.service.requests
    request.next()
    peers.flush()
    return get, request, result_of(get.instances.read())


def test_cancel_mid_get(peers):
    get, _, first = first_of_a_paced_get(peers)
    get.cancel()
    get.cancel()  # once only
    peers.flush()
    [cancel] = peers.service.cancels
    assert cancel["MessageIDBeingRespondedTo"] == get.message_id
    assert cancel["CommandField"] == messages.C_CANCEL_RQ
    status = result_of(get.result)
    assert status.cancelled and not status.failed
    assert status.fields["NumberOfRemainingSuboperations"] == 2
    assert status.fields["NumberOfCompletedSuboperations"] == 1
    assert result_of(get.instances.read()) is EOF
    assert os.path.isfile(first.path)
    get.cancel()  # ended: nothing sent
    peers.flush()
    assert len(peers.service.cancels) == 1


def test_cancelling_the_stream_cancels_the_get(peers):
    peers.service.auto = False
    get = peers.get()
    peers.flush()
    get.instances.cancel()
    peers.flush()
    assert len(peers.service.cancels) == 1
    assert result_of(get.result).cancelled


def get_into_memory(tmp_path):
    """
    A C-GET with a 10 MiB memory budget, its fake SCP waiting to be told
    what to send: (peers, budget, get operation, the SCP's request).
    """
    p = Peers(tmp_path, service=FakeGetService(auto=False))
    p.connect()
    budget = MemoryBudget(10 * 1024 * 1024)
    get = p.get(memory=budget)
    p.flush()
    [request] = p.service.requests
    return p, budget, get, request


def send_part_of_a_store(peers, request, pdus_sent=3):
    """
    The fake SCP sends the first PDUs of a C-STORE sub-operation (command
    and part of a new instance's data set), no more.
    """
    ds = make_instances(1)[0]
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": messages.C_STORE_RQ,
        "MessageID": 999,
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "AffectedSOPInstanceUID": ds.SOPInstanceUID,
    }
    context = request.storage_context(CT)
    pdus = list(messages.fragment(context.id, messages.encode_command(fields), encode_identifier(ds, EXPLICIT), 4096))
    assert len(pdus) > pdus_sent
    for chunk in pdus[:pdus_sent]:
        peers.server_protocol.transport.write(bytes(chunk))
    peers.flush()


def test_abort_mid_sub_operation(peers):
    get, request, delivered = first_of_a_paced_get(peers)
    # The second data set arrives half, then the peer aborts.
    send_part_of_a_store(peers, request)
    assert not has_fired(get.result)
    assert len(peers.temp_files()) == 1
    peers.server_protocol.abort()
    peers.flush()
    failure_of(get.result, AssociationAborted)
    failure_of(get.instances.read(), AssociationAborted)
    # The partial file is gone; what was delivered stays.
    assert peers.temp_files() == []
    assert peers.stored_files() == [os.path.relpath(delivered.path, peers.root)]


def test_dimse_timeout(tmp_path):
    p = Peers(tmp_path, service=FakeGetService(auto=False), dimse_timeout=5)
    p.connect()
    get = p.get()
    p.flush()
    [request] = p.service.requests
    p.reactor.advance(4)
    request.next()  # a sub-operation resets the timer
    p.flush()
    p.reactor.advance(4)
    assert not has_fired(get.result)
    p.reactor.advance(2)
    failure_of(get.result, DimseTimeout)
    # What was delivered before is still readable; then the failure.
    assert result_of(get.instances.read()).sop_class_uid == CT
    failure_of(get.instances.read(), DimseTimeout)
    p.flush()
    assert p.association.association._closed


def test_get_on_a_failed_association(peers):
    peers.association.abort()
    peers.flush()
    get = peers.get()
    failure_of(get.result, AssociationAborted)


def test_response_of_the_wrong_kind_aborts(peers):
    peers.service.auto = False
    get = peers.get()
    peers.flush()
    [request] = peers.service.requests
    fields = {
        "AffectedSOPClassUID": STUDY_ROOT_GET,
        "CommandField": messages.C_FIND_RSP,
        "MessageIDBeingRespondedTo": get.message_id,
        "CommandDataSetType": messages.NO_DATASET,
        "Status": 0,
    }
    request.association.send_message(request.context.id, messages.encode_command(fields))
    peers.flush()
    failure_of(get.result, AssociationAborted)


def test_slow_consumer_pauses_reading_and_the_timer(tmp_path):
    p = Peers(tmp_path, service=FakeGetService(auto=False), dimse_timeout=5)
    p.connect()
    transport = p.client_protocol.transport
    calls = []
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    get = p.get(high_water=2)
    p.flush()
    [request] = p.service.requests
    for _ in range(2):
        request.next()
        p.flush()
    assert calls == ["pause"]
    # The consumer is slow, not the peer: no DIMSE timeout while paused.
    p.reactor.advance(60)
    assert not has_fired(get.result)
    assert len([result_of(get.instances.read()) for _ in range(2)]) == 2
    assert calls == ["pause", "resume"]
    request.next()
    p.flush()
    request.final()
    p.flush()
    assert len(drain(get.instances)) == 1
    assert result_of(get.result).fields["NumberOfCompletedSuboperations"] == 3


def test_backpressure_released_when_the_get_ends(tmp_path):
    p = Peers(tmp_path, service=FakeGetService(instances=lambda identifier: make_instances(4)))
    p.connect()
    transport = p.client_protocol.transport
    calls = []
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    get = p.get(high_water=2)
    p.flush()
    assert result_of(get.result).ok
    assert calls == ["pause", "resume"]
    assert len(drain(get.instances)) == 4


@defer.inlineCallbacks
def _consume(get):
    found = []
    while True:
        item = yield get.instances.read()
        if item is EOF:
            break
        found.append(item)
    status = yield get.result
    return found, status


def test_async_consumer(peers):
    d = _consume(peers.get())
    peers.flush()
    found, status = result_of(d)
    assert len(found) == 3 and status.ok


# -- instances held in memory (a relay's MemoryBudget) ----------------------------


def dataset_size(ds):
    return len(encode_identifier(ds, EXPLICIT))


def test_memory_budget_delivers_the_part10_bytes_a_file_would_hold(tmp_path):
    originals = make_instances(3)
    budget = MemoryBudget(10 * 1024 * 1024)
    held = Peers(tmp_path / "held", service=FakeGetService(instances=lambda identifier: list(originals)))
    held.connect()
    get = held.get(memory=budget)
    held.flush()
    assert result_of(get.result).ok
    in_memory = drain(get.instances)
    # The same instances stored, for comparison.
    files = Peers(tmp_path / "files", service=FakeGetService(instances=lambda identifier: list(originals)))
    files.connect()
    stored = files.get()
    files.flush()
    on_disk = drain(stored.instances)
    assert len(in_memory) == 3
    for instance, stored_instance, original in zip(in_memory, on_disk, originals):
        assert instance.path is None
        assert isinstance(instance.data, (bytes, bytearray))
        with open(stored_instance.path, "rb") as f:
            assert instance.data == f.read()
        assert instance.size == len(instance.data)
        assert (instance.sop_class_uid, instance.sop_instance_uid, instance.transfer_syntax) == (
            original.SOPClassUID, original.SOPInstanceUID, EXPLICIT)
        assert instance.uids == stored_instance.uids == (
            original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    # Nothing was written, and the data sets are held until disposed of.
    assert held.stored_files() == [] and held.temp_files() == []
    assert budget.held == sum(dataset_size(o) for o in originals)
    assert [r["Status"] for r in held.service.requests[0].responses] == [0, 0, 0]
    for instance in in_memory:
        instance.dispose()
        instance.dispose()  # once is enough
    assert budget.held == 0


@pytest.mark.parametrize("room", ["half a data set", "less than a fragment"])
def test_data_set_outgrowing_the_budget_goes_to_a_file(tmp_path, room):
    originals = make_instances(2)
    p = Peers(tmp_path, service=FakeGetService(instances=lambda identifier: list(originals)))
    p.connect()
    budget = MemoryBudget(dataset_size(originals[0]) // 2 if room == "half a data set" else 100)
    get = p.get(memory=budget)
    p.flush()
    assert result_of(get.result).ok
    instances = drain(get.instances)
    for instance, original in zip(instances, originals):
        check_instance(instance, original, p.root)
    assert len(p.stored_files()) == 2 and p.temp_files() == []
    assert budget.held == 0


def test_budget_is_shared_by_the_instances_not_yet_disposed(tmp_path):
    originals = make_instances(3)
    p = Peers(tmp_path, service=FakeGetService(instances=lambda identifier: list(originals)))
    p.connect()
    size = dataset_size(originals[0])
    budget = MemoryBudget(size + size // 2)
    get = p.get(memory=budget)
    p.flush()
    first, second, third = drain(get.instances)
    # The first fills the budget; the others, arriving before it was
    # disposed of, went to files.
    assert first.path is None and budget.held == size
    check_instance(second, originals[1], p.root)
    check_instance(third, originals[2], p.root)
    first.dispose()
    assert budget.held == 0
    # Room again: the next get's first instance is held.
    another = make_instances(1)
    p.service.instances = lambda identifier: list(another)
    again = p.get(memory=budget)
    p.flush()
    [instance] = drain(again.instances)
    # (UIDs are generated: data set sizes differ by a few bytes.)
    assert instance.path is None and budget.held == dataset_size(another[0])


def test_data_set_of_another_instance_is_refused_from_memory(tmp_path):
    p, budget, get, request = get_into_memory(tmp_path)
    ds, other = make_instances(2)
    request.send_store(ds, data=encode_identifier(other, EXPLICIT))
    p.flush()
    assert [(r["Status"], r["ErrorComment"]) for r in request.responses] == [
        (0xA900, "SOP Instance UID of the data set differs from the command's")]
    request.failed = 1
    request.final()
    p.flush()
    assert result_of(get.result).status == 0xA702
    assert drain(get.instances) == []
    assert budget.held == 0 and p.stored_files() == [] and p.temp_files() == []


def test_undecodable_data_set_is_refused_from_memory(tmp_path):
    p, budget, get, request = get_into_memory(tmp_path)
    request.send_store(make_instances(1)[0], data=b"\x08\x00\x16\x00UI\xff\xff")
    p.flush()
    assert [r["Status"] for r in request.responses] == [0xC000]
    request.failed = 1
    request.final()
    p.flush()
    assert result_of(get.result).status == 0xA702
    assert budget.held == 0


def test_abort_mid_data_set_in_memory_gives_the_budget_back(tmp_path):
    p, budget, get, request = get_into_memory(tmp_path)
    send_part_of_a_store(p, request)
    assert budget.held > 0
    p.server_protocol.abort()
    p.flush()
    failure_of(get.result, AssociationAborted)
    assert budget.held == 0
    assert p.stored_files() == [] and p.temp_files() == []


def test_memory_budget_arguments():
    with pytest.raises(ValueError):
        MemoryBudget(-1)
    budget = MemoryBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.held == 6
    budget.give(6)
    assert budget.held == 0 and budget.take(10)


def test_memory_budget_with_a_shared_total():
    total = MemoryBudget(10)
    a, b = MemoryBudget(8, parent=total), MemoryBudget(8, parent=total)
    assert a.take(6) and not b.take(5) and b.take(4)
    assert (a.held, b.held, total.held) == (6, 4, 10)
    a.give(100)  # never more than it holds
    assert (a.held, total.held) == (0, 4)
    assert not b.take(5) and b.take(4) and total.held == 8
