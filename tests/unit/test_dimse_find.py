"""
C-FIND as SCU (harmony.dimse.scu: ClientAssociation.find) over an in-memory
connection (twisted.test.iosim) against a minimal fake C-FIND SCP built on
Harmony's DicomServerFactory; timers on MemoryReactorClock.
"""

import pytest
from _deferreds import drain, failure_of, has_fired, result_of
from pydicom import Dataset
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from harmony.dimse import messages, scu
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    DicomClient,
    DimseTimeout,
    InvalidResponse,
    decode_identifier,
    encode_identifier,
)
from harmony.streams import EOF, StreamCancelled

IMPLICIT, EXPLICIT = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN

SCP_SYNTAXES = {
    VERIFICATION_SOP_CLASS: [IMPLICIT],
    STUDY_ROOT_FIND: [IMPLICIT, EXPLICIT],
    PATIENT_ROOT_FIND: [IMPLICIT, EXPLICIT],
}
PROPOSED = [
    (VERIFICATION_SOP_CLASS, [IMPLICIT]),
    (STUDY_ROOT_FIND, [IMPLICIT]),
    (PATIENT_ROOT_FIND, [IMPLICIT]),
]










def query(level="STUDY", **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def default_matches(identifier, count=3):
    """
    C{count} study matches echoing the query's PatientID.
    """
    found = []
    for i in range(count):
        ds = Dataset()
        ds.QueryRetrieveLevel = identifier.QueryRetrieveLevel
        ds.PatientID = identifier.get("PatientID", "")
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1.{i + 1}"
        found.append(ds)
    return found


# -- the fake SCP ------------------------------------------------------------


class FakeFind:
    """
    One C-FIND-RQ received by the fake SCP: collects and decodes the
    identifier, then answers as its service says (or as the test drives it).
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

    # the SCP's service object protocol
    def fragment(self, data):
        self.chunks.append(bytes(data))

    def finish(self):
        self.identifier = decode_identifier(b"".join(self.chunks), self.context.transfer_syntax)
        self.service.requests.append(self)
        self.service.answer(self)

    def aborted(self, association):
        self.service.aborted.append(self)

    # answering
    def _send(self, status, dataset=None, comment=None):
        fields = {
            "AffectedSOPClassUID": self.context.abstract_syntax,
            "CommandField": messages.C_FIND_RSP,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET if dataset is None else messages.DATASET_PRESENT,
            "Status": status,
            "ErrorComment": comment,
        }
        data = None if dataset is None else encode_identifier(dataset, self.context.transfer_syntax)
        self.association.send_message(self.context.id, messages.encode_command(fields), data)

    def pending(self, dataset, status=0xFF00):
        self._send(status, dataset)

    def final(self, status=0x0000, comment=None, dataset=None):
        self.ended = True
        self._send(status, dataset, comment)


class FakeFindService:
    """
    A C-FIND SCP for tests.

    @param matches: C{identifier -> [Dataset]} (the pending responses).
    @param final: the final status (C{None}: the test sends it, e.g. after a
        cancel).
    @param silent: never answer at all.
    """

    def __init__(self, matches=default_matches, final=0x0000, comment=None, silent=False, pending_status=0xFF00):
        self.matches = matches
        self.final = final
        self.comment = comment
        self.silent = silent
        self.pending_status = pending_status
        self.requests = []
        self.cancels = []
        self.aborted = []

    def start(self, association, context, command):
        return FakeFind(self, association, context, command)

    def answer(self, find):
        if self.silent:
            return
        for match in self.matches(find.identifier):
            find.pending(match, self.pending_status)
        if self.final is not None:
            find.final(self.final, self.comment)


class FakeCancelService:
    """
    C-CANCEL-RQ: ends the find it names with 0xFE00 (if still running).
    """

    def __init__(self, finds):
        self.finds = finds

    def start(self, association, context, command):
        self.finds.cancels.append(command.fields)
        target = command.fields.get("MessageIDBeingRespondedTo")
        for find in self.finds.requests:
            if find.message_id == target and not find.ended:
                find.final(0xFE00)
        return None


class Peers:
    """
    Harmony's SCU and the fake C-FIND SCP wired together in memory.
    """

    def __init__(self, service=None, syntaxes=SCP_SYNTAXES, dimse_timeout=30, client_settings=None):
        self.reactor = MemoryReactorClock()
        self.service = service or FakeFindService()
        self.factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("FINDSCP", syntaxes),
            AssociationSettings(idle_timeout=None),
            {messages.C_FIND_RQ: self.service, messages.C_CANCEL_RQ: FakeCancelService(self.service)},
        )
        self.client = DicomClient(self.reactor, "TESTSCU", client_settings, dimse_timeout=dimse_timeout)

    def connect(self, proposed=PROPOSED):
        d = self.client.associate("127.0.0.1", 11112, "FINDSCP", proposed)
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

    def flush(self):
        self.pump.flush()


@pytest.fixture
def peers():
    p = Peers()
    p.connect()
    return p


# -- tests ---------------------------------------------------------------------


def test_find_streams_matches_then_success(peers):
    find = peers.association.find(query(PatientID="PAT1", StudyInstanceUID=""))
    assert isinstance(find, scu.FindOperation)
    peers.flush()
    status = result_of(find.result)
    assert status.ok and status.status == 0x0000 and not status.failed
    matches = drain(find.matches)
    assert [m.StudyInstanceUID for m in matches] == [f"1.2.826.0.1.3680043.10.1.{i}" for i in (1, 2, 3)]
    assert all(m.PatientID == "PAT1" for m in matches)
    [request] = peers.service.requests
    assert request.identifier == query(PatientID="PAT1", StudyInstanceUID="")
    assert request.context.abstract_syntax == STUDY_ROOT_FIND
    fields = request.command.fields
    assert fields["AffectedSOPClassUID"] == STUDY_ROOT_FIND
    assert fields["Priority"] == 0
    assert fields["MessageID"] == find.message_id
    # The association is still usable.
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_each_match_is_delivered_as_it_arrives(peers):
    peers.service.final = None
    peers.service.matches = lambda identifier: []
    find = peers.association.find(query(PatientID="X"))
    peers.flush()
    [request] = peers.service.requests
    waiting = find.matches.read()
    assert not has_fired(waiting)
    for i in range(3):
        ds = Dataset()
        ds.PatientID = f"P{i}"
        request.pending(ds)
        peers.flush()
        assert result_of(waiting).PatientID == f"P{i}"
        assert not has_fired(find.result)
        waiting = find.matches.read()
    request.final()
    peers.flush()
    assert result_of(waiting) is EOF
    assert result_of(find.result).ok


def test_no_matches(peers):
    peers.service.matches = lambda identifier: []
    find = peers.association.find(query(PatientID="NOBODY"))
    peers.flush()
    assert result_of(find.result).ok
    assert drain(find.matches) == []


def test_pending_with_warning_status(peers):
    peers.service.pending_status = 0xFF01
    find = peers.association.find(query())
    peers.flush()
    assert len(drain(find.matches)) == 3
    assert result_of(find.result).ok


def test_failure_status(peers):
    peers.service.matches = lambda identifier: default_matches(identifier, 1)
    peers.service.final = 0xC001
    peers.service.comment = "no such thing"
    find = peers.association.find(query())
    peers.flush()
    status = result_of(find.result)
    assert status.status == 0xC001 and status.failed and not status.ok
    assert status.error_comment == "no such thing"
    # What arrived before the failure is still readable; the stream ends.
    assert len(drain(find.matches)) == 1


@pytest.mark.parametrize("final", [0x0001, 0xB000])
def test_warning_is_not_a_failure(peers, final):
    peers.service.final = final
    find = peers.association.find(query())
    peers.flush()
    status = result_of(find.result)
    assert status.warning and not status.failed and not status.ok
    assert len(drain(find.matches)) == 3


def test_final_response_with_a_data_set_is_tolerated(peers):
    peers.service.final = None
    find = peers.association.find(query())
    peers.flush()
    [request] = peers.service.requests
    request.final(0x0000, dataset=query(PatientID="IGNORED"))
    peers.flush()
    assert result_of(find.result).ok
    assert len(drain(find.matches)) == 3
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_cancel(peers):
    peers.service.final = None  # keeps the find running until cancelled
    find = peers.association.find(query(PatientID="P"))
    peers.flush()
    assert not has_fired(find.result)
    find.cancel()
    find.cancel()  # once only
    peers.flush()
    [cancel] = peers.service.cancels
    assert cancel["CommandField"] == messages.C_CANCEL_RQ
    assert cancel["MessageIDBeingRespondedTo"] == find.message_id
    assert cancel["CommandDataSetType"] == messages.NO_DATASET
    status = result_of(find.result)
    assert status.status == 0xFE00 and status.cancelled and not status.failed
    assert len(drain(find.matches)) == 3
    # Cancelling an ended find sends nothing.
    find.cancel()
    peers.flush()
    assert len(peers.service.cancels) == 1


def test_cancel_the_matches_stream_cancels_the_find(peers):
    peers.service.final = None
    find = peers.association.find(query())
    peers.flush()
    find.matches.cancel()
    peers.flush()
    [cancel] = peers.service.cancels
    assert cancel["MessageIDBeingRespondedTo"] == find.message_id
    assert result_of(find.result).status == 0xFE00
    failure_of(find.matches.read(), StreamCancelled)


def test_matches_after_cancel_are_still_delivered(peers):
    peers.service.final = None
    peers.service.matches = lambda identifier: []
    find = peers.association.find(query())
    peers.flush()
    [request] = peers.service.requests
    find.cancel()
    request.pending(query(PatientID="LATE"))  # crossed the C-CANCEL on the wire
    peers.flush()
    assert [m.PatientID for m in drain(find.matches)] == ["LATE"]
    assert result_of(find.result).cancelled


def test_dimse_timeout(peers):
    peers.service.silent = True
    find = peers.association.find(query())
    peers.flush()
    peers.reactor.advance(peers.client.dimse_timeout - 1)
    assert not has_fired(find.result)
    peers.reactor.advance(1)
    failure_of(find.result, DimseTimeout)
    failure_of(find.matches.read(), DimseTimeout)
    peers.flush()
    # Aborted: the association is unusable.
    failure_of(peers.association.echo(), AssociationAborted)
    assert peers.association.association.upper.state in ("Sta1", "Sta13")


def test_dimse_timeout_restarts_on_each_pending_response(peers):
    peers.service.final = None
    peers.service.matches = lambda identifier: []
    find = peers.association.find(query())
    peers.flush()
    [request] = peers.service.requests
    timeout = peers.client.dimse_timeout
    for i in range(3):
        peers.reactor.advance(timeout - 1)
        request.pending(query(PatientID=str(i)))
        peers.flush()
    assert not has_fired(find.result)
    peers.reactor.advance(timeout - 1)
    request.final()
    peers.flush()
    assert result_of(find.result).ok
    assert [m.PatientID for m in drain(find.matches)] == ["0", "1", "2"]
    # No timer left behind (less than the client's idle timeout).
    peers.reactor.advance(timeout + 1)
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_association_aborted_mid_find(peers):
    peers.service.final = None
    peers.service.matches = lambda identifier: default_matches(identifier, 2)
    find = peers.association.find(query())
    peers.flush()
    peers.server_protocol.abort(0, 0)
    peers.flush()
    failure_of(find.result, AssociationAborted)
    # The matches before the abort, then the failure.
    assert len([result_of(find.matches.read()) for _ in range(2)]) == 2
    failure_of(find.matches.read(), AssociationAborted)


def test_client_abort_mid_find(peers):
    peers.service.final = None
    find = peers.association.find(query())
    peers.flush()
    peers.association.abort()
    peers.flush()
    failure_of(find.result, AssociationAborted)


def test_find_on_an_ended_association_fails(peers):
    released = peers.association.release()
    peers.flush()
    result_of(released)
    find = peers.association.find(query())
    failure_of(find.result, AssociationAborted)
    failure_of(find.matches.read(), AssociationAborted)


def test_patient_root(peers):
    find = peers.association.find(query("PATIENT", PatientID="P*", PatientName=""), model="patient", priority=1)
    peers.flush()
    assert result_of(find.result).ok
    [request] = peers.service.requests
    assert request.context.abstract_syntax == PATIENT_ROOT_FIND
    assert request.command.fields["AffectedSOPClassUID"] == PATIENT_ROOT_FIND
    assert request.command.fields["Priority"] == 1
    assert request.identifier.QueryRetrieveLevel == "PATIENT"


def test_model_given_as_a_uid(peers):
    find = peers.association.find(query(), model=PATIENT_ROOT_FIND)
    peers.flush()
    assert result_of(find.result).ok
    assert peers.service.requests[0].context.abstract_syntax == PATIENT_ROOT_FIND


def test_model_not_accepted_raises_lookup_error():
    peers = Peers(syntaxes={STUDY_ROOT_FIND: [IMPLICIT]})
    association = peers.connect()
    assert [c.abstract_syntax for c in association.contexts.values()] == [STUDY_ROOT_FIND]
    with pytest.raises(LookupError):
        association.find(query("PATIENT"), model="patient")
    find = association.find(query())
    peers.flush()
    assert result_of(find.result).ok


@pytest.mark.parametrize("bad", [{"model": "series"}, {"model": "worklist"}])
def test_unknown_model(peers, bad):
    with pytest.raises(ValueError):
        peers.association.find(query(), **bad)


def test_identifier_without_query_retrieve_level(peers):
    ds = Dataset()
    ds.PatientID = "X"
    with pytest.raises(ValueError):
        peers.association.find(ds)
    assert peers.service.requests == []


def test_explicit_vr_and_character_set():
    peers = Peers()
    association = peers.connect([(STUDY_ROOT_FIND, [EXPLICIT])])
    identifier = query(PatientName="Bürger^Ünal", StudyInstanceUID="")
    identifier.SpecificCharacterSet = "ISO_IR 192"

    def matches(request):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientName = "Bürger^Ünal"
        ds.StudyDescription = "Ähnlichkeit"
        return [ds]

    peers.service.matches = matches
    find = association.find(identifier)
    peers.flush()
    assert result_of(find.result).ok
    [request] = peers.service.requests
    assert request.context.transfer_syntax == EXPLICIT
    assert str(request.identifier.PatientName) == "Bürger^Ünal"
    [match] = drain(find.matches)
    assert str(match.PatientName) == "Bürger^Ünal"
    assert match.StudyDescription == "Ähnlichkeit"


def test_several_finds_on_one_association(peers):
    ids = set()
    for i in range(3):
        find = peers.association.find(query(PatientID=str(i)))
        peers.flush()
        assert result_of(find.result).ok
        assert {m.PatientID for m in drain(find.matches)} == {str(i)}
        ids.add(find.message_id)
    assert len(ids) == 3


def test_backpressure_pauses_the_transport_and_the_timer():
    peers = Peers(client_settings=AssociationSettings(idle_timeout=None))
    association = peers.connect()
    transport = peers.client_protocol.transport
    calls = []
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    peers.service.final = None
    peers.service.matches = lambda identifier: default_matches(identifier, 10)
    find = association.find(query(), high_water=4)
    peers.flush()
    assert calls == ["pause"]
    # The consumer is slow, not the peer: no DIMSE timeout while paused.
    peers.reactor.advance(peers.client.dimse_timeout * 3)
    assert not has_fired(find.result)
    got = [result_of(find.matches.read()) for _ in range(10)]
    assert len(got) == 10
    assert calls == ["pause", "resume"]
    # Resumed: the peer's silence counts again.
    peers.reactor.advance(peers.client.dimse_timeout)
    failure_of(find.result, DimseTimeout)


def test_consumer_stalled_beyond_the_idle_timeout():
    # Reading paused for a slow consumer suspends the association's idle
    # timer and the find's DIMSE timer: the wait is ours, not the peer's.
    peers = Peers(client_settings=AssociationSettings(idle_timeout=60))
    association = peers.connect()
    peers.service.final = None  # the peer never sends its final response
    peers.service.matches = lambda identifier: default_matches(identifier, 10)
    find = association.find(query(), high_water=4)
    peers.flush()
    peers.reactor.advance(120 + AssociationSettings().artim_timeout)
    peers.flush()
    assert not find.result.called
    assert association.association.upper.state == "Sta6"
    assert len([result_of(find.matches.read()) for _ in range(10)]) == 10
    peers.flush()
    # Reading again: now the peer's silence counts.
    peers.reactor.advance(peers.client.dimse_timeout)
    peers.flush()
    failure_of(find.result, DimseTimeout)


def test_backpressure_released_when_the_find_ends():
    peers = Peers()
    association = peers.connect()
    transport = peers.client_protocol.transport
    calls = []
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    peers.service.matches = lambda identifier: default_matches(identifier, 10)
    find = association.find(query(), high_water=4)
    peers.flush()
    # All ten arrived in one read: the final status resumes the transport
    # even though nobody read a match yet (the association stays usable).
    assert result_of(find.result).ok
    assert calls == ["pause", "resume"]
    assert len(drain(find.matches)) == 10
    assert calls == ["pause", "resume"]


def test_identifier_too_large_aborts(peers, monkeypatch):
    monkeypatch.setattr(scu, "MAX_IDENTIFIER_LENGTH", 64)
    peers.service.matches = lambda identifier: [query(PatientComments="x" * 200)]
    find = peers.association.find(query())
    peers.flush()
    failure_of(find.result, InvalidResponse)
    failure_of(find.matches.read(), InvalidResponse)
    failure_of(peers.association.echo(), AssociationAborted)


def test_response_for_a_find_that_is_not_a_find_rsp_aborts(peers):
    peers.service.final = None
    peers.service.matches = lambda identifier: []
    find = peers.association.find(query())
    peers.flush()
    [request] = peers.service.requests
    rsp = messages.echo_rsp(request.message_id, 0)
    request.association.send_message(request.context.id, rsp)
    peers.flush()
    failure_of(find.result, AssociationAborted)


def test_data_set_nobody_expects_aborts(peers):
    server = peers.server_protocol
    server.dataReceived = lambda data: None  # the SCP does not answer by itself
    pending = peers.association.echo()
    peers.flush()
    fields = {
        "AffectedSOPClassUID": VERIFICATION_SOP_CLASS,
        "CommandField": messages.C_ECHO_RSP,
        "MessageIDBeingRespondedTo": peers.association._next_id,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "Status": 0,
    }
    context_id = peers.association.context_for(VERIFICATION_SOP_CLASS).id
    server.send_message(context_id, messages.encode_command(fields), b"\x08\x00\x52\x00\x00\x00\x00\x00")
    peers.flush()
    # Answered (the command), then aborted (the data set nobody expects):
    # what comes next fails at once.
    assert result_of(pending).ok
    assert peers.association.association.upper.state in ("Sta1", "Sta13")
    failure_of(peers.association.echo(), AssociationAborted)


@pytest.mark.parametrize(
    "transfer_syntax",
    [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN],
)
def test_identifier_codec(transfer_syntax):
    ds = query(PatientID="P1", PatientName="Doe^J", StudyDate="20200101-20201231", ModalitiesInStudy=["CT", "MR"])
    ds.StudyInstanceUID = ""
    data = encode_identifier(ds, transfer_syntax)
    assert decode_identifier(data, transfer_syntax) == ds


def test_identifier_codec_rejects_compressed_transfer_syntaxes():
    with pytest.raises(ValueError):
        encode_identifier(query(), "1.2.840.10008.1.2.4.50")


def test_result_is_a_deferred(peers):
    find = peers.association.find(query())
    assert isinstance(find.result, defer.Deferred)
    peers.flush()
    result_of(find.result)
