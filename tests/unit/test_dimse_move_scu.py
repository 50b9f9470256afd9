"""
C-MOVE as SCU (harmony.dimse.scu: DicomClient.associate_for_move,
ClientAssociation.move, MoveOperation) over an in-memory connection
(twisted.test.iosim) against a small fake C-MOVE SCP built on Harmony's
DicomServerFactory: the test drives its pending C-MOVE-RSPs (with counts)
and its final one; timers on MemoryReactorClock.

The fake SCP (FakeMoveService) is shared with test_dimse_move_router,
where it also sends the C-STORE sub-operations to Harmony's store SCP.
"""

import pytest
from _deferreds import failure_of, has_fired, result_of
from pydicom import Dataset
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from harmony.dimse import messages, scu
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MOVE_MODELS,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    DicomClient,
    DimseTimeout,
    decode_identifier,
    encode_identifier,
)

IMPLICIT, EXPLICIT = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN

SCP_SYNTAXES = {
    messages.VERIFICATION_SOP_CLASS: [IMPLICIT],
    STUDY_ROOT_MOVE: [IMPLICIT, EXPLICIT],
    PATIENT_ROOT_MOVE: [IMPLICIT, EXPLICIT],
}


def query(level="STUDY", **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def flush(*pumps):
    """
    Move bytes over every pump until none moves (several connections).
    """
    while any([pump.pump() for pump in pumps]):
        pass


# -- the fake C-MOVE SCP -------------------------------------------------------------


class FakeMove:
    """
    One C-MOVE-RQ received by the fake SCP.
    """

    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        self.command = command
        self.message_id = command.fields["MessageID"]
        self.destination = command.fields.get("MoveDestination")
        self.chunks = []
        self.identifier = None
        self.ended = False
        self.completed = self.failed = self.warning = 0
        self.remaining = 0

    # the SCP's service object protocol
    def fragment(self, data):
        self.chunks.append(bytes(data))

    def finish(self):
        self.identifier = decode_identifier(b"".join(self.chunks), self.context.transfer_syntax)
        self.service.requests.append(self)
        if self.service.on_request is not None:
            self.service.on_request(self)

    def aborted(self, association):
        self.service.aborted.append(self)

    # driving
    @property
    def originator_aet(self):
        return self.association.rq.calling_aet

    def send_rsp(self, status, counts=True, remaining=True, dataset=None, comment=None):
        fields = {
            "AffectedSOPClassUID": self.context.abstract_syntax,
            "CommandField": messages.C_MOVE_RSP,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET if dataset is None else messages.DATASET_PRESENT,
            "Status": status,
            "ErrorComment": comment,
        }
        if counts:
            if remaining:
                fields["NumberOfRemainingSuboperations"] = self.remaining
            fields["NumberOfCompletedSuboperations"] = self.completed
            fields["NumberOfFailedSuboperations"] = self.failed
            fields["NumberOfWarningSuboperations"] = self.warning
        data = None if dataset is None else encode_identifier(dataset, self.context.transfer_syntax)
        self.association.send_message(self.context.id, messages.encode_command(fields), data)

    def pending(self, **kwargs):
        self.send_rsp(0xFF00, **kwargs)

    def final(self, status=0x0000, **kwargs):
        self.ended = True
        kwargs.setdefault("remaining", False)
        self.send_rsp(status, **kwargs)


class FakeMoveService:
    """
    A C-MOVE SCP for tests: records each C-MOVE-RQ; C{on_request(move)}
    (if set) runs it, else the test drives it.
    """

    def __init__(self, on_request=None):
        self.on_request = on_request
        self.requests = []
        self.cancels = []
        self.aborted = []
        self.store_responses = []

    def start(self, association, context, command):
        return FakeMove(self, association, context, command)


class StoreRspRecorder:
    """
    C-STORE-RSPs Harmony sends on the move association (it should not get
    C-STORE-RQs there).
    """

    def __init__(self, moves):
        self.moves = moves

    def start(self, association, context, command):
        self.moves.store_responses.append(command.fields)
        return None


class FakeCancelService:
    """
    C-CANCEL-RQ: ends the move it names with 0xFE00 (if still running),
    unless C{auto} is off.
    """

    def __init__(self, moves, auto=True):
        self.moves = moves
        self.auto = auto

    def start(self, association, context, command):
        self.moves.cancels.append(command.fields)
        target = command.fields.get("MessageIDBeingRespondedTo")
        for move in self.moves.requests:
            if self.auto and move.message_id == target and not move.ended:
                # Remaining is included in a cancel response (PS3.4 C.4.2.1.4).
                move.final(0xFE00, remaining=True)
        return None


def move_scp_factory(reactor, service, ae_title="MOVESCP", cancel_auto=True):
    return DicomServerFactory(
        reactor,
        SCPPolicy(ae_title, SCP_SYNTAXES),
        AssociationSettings(idle_timeout=None, max_pdu_length=4096),
        {
            messages.C_MOVE_RQ: service,
            messages.C_CANCEL_RQ: FakeCancelService(service, auto=cancel_auto),
            messages.C_STORE_RSP: StoreRspRecorder(service),
        },
    )


def wire(reactor, server_factory):
    """
    Connect the last client connection attempted on C{reactor} to a
    protocol of C{server_factory} in memory.

    @return: C{(server protocol, client protocol, pump)}
    """
    client_factory = reactor.tcpClients[-1][2]
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=True)
    pump.flush()
    return server, client, pump


class Peers:
    """
    Harmony's SCU ("HARMONY") and the fake C-MOVE SCP wired together in
    memory.
    """

    def __init__(self, service=None, dimse_timeout=30, reactor=None, cancel_auto=True):
        self.reactor = reactor or MemoryReactorClock()
        self.service = service or FakeMoveService()
        self.factory = move_scp_factory(self.reactor, self.service, cancel_auto=cancel_auto)
        self.client = DicomClient(
            self.reactor, "HARMONY", AssociationSettings(max_pdu_length=4096), dimse_timeout=dimse_timeout
        )

    def connect(self, models=("study", "patient")):
        d = self.client.associate_for_move(
            "127.0.0.1", 11112, "MOVESCP", models=models,
            extra_syntaxes=[(messages.VERIFICATION_SOP_CLASS, [IMPLICIT])],
        )
        self.server_protocol, self.client_protocol, self.pump = wire(self.reactor, self.factory)
        self.association = result_of(d)
        return self.association

    def move(self, identifier=None, destination="HARMONY", **kwargs):
        return self.association.move(
            identifier if identifier is not None else query(StudyInstanceUID="1.2.3"), destination, **kwargs
        )

    def flush(self):
        self.pump.flush()

    def request(self):
        [request] = self.service.requests
        return request


@pytest.fixture
def peers():
    p = Peers()
    p.connect()
    return p


# -- negotiation and requests -------------------------------------------------------


def test_models():
    assert MOVE_MODELS == {"patient": "1.2.840.10008.5.1.4.1.2.1.2", "study": "1.2.840.10008.5.1.4.1.2.2.2"}


def test_associate_for_move_proposes_the_move_models(peers):
    rq = peers.server_protocol.rq
    proposed = {c.abstract_syntax: c.transfer_syntaxes for c in rq.contexts}
    assert proposed == {
        STUDY_ROOT_MOVE: [EXPLICIT, IMPLICIT],
        PATIENT_ROOT_MOVE: [EXPLICIT, IMPLICIT],
        messages.VERIFICATION_SOP_CLASS: [IMPLICIT],
    }
    assert rq.roles == []
    assert rq.calling_aet == "HARMONY" and rq.called_aet == "MOVESCP"
    with pytest.raises(ValueError):
        peers.client.associate_for_move("127.0.0.1", 11112, "MOVESCP", models=("nonsense",))


def test_plain_associate_with_a_move_context():
    p = Peers()
    d = p.client.associate("127.0.0.1", 11112, "MOVESCP", [(STUDY_ROOT_MOVE, [IMPLICIT])])
    p.server_protocol, p.client_protocol, p.pump = wire(p.reactor, p.factory)
    p.association = result_of(d)
    move = p.move()
    p.flush()
    p.request().final()
    p.flush()
    assert result_of(move.result).ok


def test_move_request_fields(peers):
    identifier = query(StudyInstanceUID="1.2.3.4")
    move = peers.move(identifier, "DEST_AE", priority=1)
    assert isinstance(move, scu.MoveOperation)
    assert move.destination == "DEST_AE"
    peers.flush()
    request = peers.request()
    fields = request.command.fields
    assert fields["CommandField"] == messages.C_MOVE_RQ
    assert fields["AffectedSOPClassUID"] == STUDY_ROOT_MOVE
    assert fields["MoveDestination"] == "DEST_AE"
    assert fields["Priority"] == 1
    assert fields["MessageID"] == move.message_id
    assert fields["CommandDataSetType"] == messages.DATASET_PRESENT
    assert request.context.abstract_syntax == STUDY_ROOT_MOVE
    assert request.identifier == identifier


def test_patient_root(peers):
    move = peers.move(query("PATIENT", PatientID="X"), model="patient")
    peers.flush()
    assert peers.request().context.abstract_syntax == PATIENT_ROOT_MOVE
    peers.request().final()
    peers.flush()
    assert result_of(move.result).ok


def test_bad_arguments(peers):
    with pytest.raises(ValueError):
        peers.move(model="nonsense")
    with pytest.raises(ValueError):
        peers.move(Dataset())
    for destination in ("", "X" * 17, "BACK\\SLASH", "   ", None):
        with pytest.raises(ValueError):
            peers.move(destination=destination)
    for message_id in (0, 65536, -1, "7"):
        with pytest.raises(ValueError):
            peers.move(message_id=message_id)
    assert peers.service.requests == [] and peers.association._operations == {}


def test_move_without_a_move_context():
    p = Peers()
    d = p.client.associate("127.0.0.1", 11112, "MOVESCP", [(messages.VERIFICATION_SOP_CLASS, [IMPLICIT])])
    p.server_protocol, p.client_protocol, p.pump = wire(p.reactor, p.factory)
    p.association = result_of(d)
    with pytest.raises(LookupError):
        p.move()


def test_message_id_chosen_by_the_caller(peers):
    move = peers.move(message_id=4242)
    assert move.message_id == 4242
    peers.flush()
    assert peers.request().command.fields["MessageID"] == 4242
    # In use on this association: refused; the association's own counter
    # skips it.
    with pytest.raises(ValueError):
        peers.move(message_id=4242)
    peers.association._next_id = 4241
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok
    assert peers.association._next_id == 4243
    peers.request().final()
    peers.flush()
    assert result_of(move.result).ok
    # Free again once the move has ended.
    again = peers.move(message_id=4242)
    peers.flush()
    peers.service.requests[-1].final()
    peers.flush()
    assert result_of(again.result).ok


def test_message_ids_from_the_association_counter(peers):
    first = peers.move()
    second = peers.move()
    assert first.message_id != second.message_id
    assert 1 <= first.message_id <= 65535


# -- responses ---------------------------------------------------------------------


def test_success_with_counts(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.remaining = 3
    for i in range(3):
        request.remaining -= 1
        request.completed += 1
        request.pending()
        peers.flush()
        assert not has_fired(move.result)
        assert move.pending["NumberOfCompletedSuboperations"] == i + 1
        assert move.pending["NumberOfRemainingSuboperations"] == 2 - i
    request.final()
    peers.flush()
    status = result_of(move.result)
    assert status.ok and not status.failed and not status.warning and not status.cancelled
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert status.fields["NumberOfFailedSuboperations"] == 0
    assert status.fields["NumberOfWarningSuboperations"] == 0
    assert status.fields.get("NumberOfRemainingSuboperations") is None
    assert peers.association._operations == {}
    # The association is still usable.
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_on_progress_gets_the_counts_of_each_pending_response(peers):
    move = peers.move()
    calls = []
    move.on_progress = calls.append
    peers.flush()
    request = peers.request()
    request.remaining, request.completed = 2, 1
    request.pending()
    request.remaining, request.completed, request.warning = 1, 1, 1
    request.pending()
    request.pending(counts=False)
    peers.flush()
    assert calls == [
        {"remaining": 2, "completed": 1, "failed": 0, "warning": 0},
        {"remaining": 1, "completed": 1, "failed": 0, "warning": 1},
        {"remaining": None, "completed": None, "failed": None, "warning": None},
    ]
    request.final(0xB000)
    peers.flush()
    assert len(calls) == 3  # not called for the final response
    assert result_of(move.result).warning


def test_a_failing_progress_callback_does_not_break_the_move(peers):
    move = peers.move()
    move.on_progress = lambda counts: 1 / 0
    peers.flush()
    request = peers.request()
    request.pending()
    peers.flush()
    request.final()
    peers.flush()
    assert result_of(move.result).ok


def test_counts_missing_from_the_final_response_come_from_the_last_pending(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.remaining, request.completed, request.failed = 1, 2, 1
    request.pending()
    request.remaining, request.completed = 0, 3
    request.pending()
    peers.flush()
    request.final(0xB000, counts=False)
    peers.flush()
    status = result_of(move.result)
    assert status.warning and not status.failed
    assert status.fields["NumberOfCompletedSuboperations"] == 3
    assert status.fields["NumberOfFailedSuboperations"] == 1
    assert status.fields["NumberOfWarningSuboperations"] == 0
    assert status.fields.get("NumberOfRemainingSuboperations") is None


def test_counts_in_the_final_response_win(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.completed = 1
    request.pending()
    request.completed = 5
    request.final()
    peers.flush()
    assert result_of(move.result).fields["NumberOfCompletedSuboperations"] == 5


def test_no_pending_responses(peers):
    move = peers.move()
    peers.flush()
    peers.request().final()
    peers.flush()
    status = result_of(move.result)
    assert status.ok and status.fields["NumberOfCompletedSuboperations"] == 0
    assert move.pending is None


@pytest.mark.parametrize(
    "status, comment",
    [
        (0xA701, "Out of resources: unable to calculate number of matches"),
        (0xA702, "Out of resources: unable to perform sub-operations"),
        (0xA801, "Move destination unknown"),
        (0xA900, None),
        (0xC000, "Unable to process"),
        (0x0122, None),
    ],
)
def test_failure_statuses_are_results(peers, status, comment):
    move = peers.move(destination="NOBODY")
    peers.flush()
    request = peers.request()
    request.final(status, comment=comment, counts=status != 0xA801)
    peers.flush()
    result = result_of(move.result)
    assert result.status == status and result.failed and not result.ok
    assert result.error_comment == comment
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_failure_with_failed_sop_instance_list(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.completed, request.failed = 1, 1
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = "1.2.3.4.5"
    request.final(0xA702, dataset=failed)
    peers.flush()
    status = result_of(move.result)
    assert status.status == 0xA702
    assert status.fields["NumberOfFailedSuboperations"] == 1
    echo = peers.association.echo()
    peers.flush()
    assert result_of(echo).ok


def test_warning_is_not_a_failure(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.completed, request.failed = 2, 1
    request.final(0xB000)
    peers.flush()
    status = result_of(move.result)
    assert status.warning and not status.failed and not status.ok


def test_pending_warning_status_is_pending(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.send_rsp(0xFF01)
    peers.flush()
    assert not has_fired(move.result)
    request.final()
    peers.flush()
    assert result_of(move.result).ok


def test_two_moves_in_flight_on_one_association(peers):
    first = peers.move(query(StudyInstanceUID="1"))
    second = peers.move(query(StudyInstanceUID="2"))
    peers.flush()
    a, b = peers.service.requests
    b.completed = 2
    b.final()
    a.final(0xA801)
    peers.flush()
    assert result_of(first.result).status == 0xA801
    assert result_of(second.result).fields["NumberOfCompletedSuboperations"] == 2


# -- cancel, abort, timeout, bad responses ------------------------------------------------


def test_cancel(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.remaining, request.completed = 4, 1
    request.pending()
    peers.flush()
    move.cancel()
    move.cancel()  # once only
    peers.flush()
    [cancel] = peers.service.cancels
    assert cancel["CommandField"] == messages.C_CANCEL_RQ
    assert cancel["MessageIDBeingRespondedTo"] == move.message_id
    status = result_of(move.result)
    assert status.cancelled and not status.failed
    assert status.fields["NumberOfRemainingSuboperations"] == 4
    assert status.fields["NumberOfCompletedSuboperations"] == 1
    move.cancel()  # ended: nothing sent
    peers.flush()
    assert len(peers.service.cancels) == 1


def test_cancel_answered_with_another_status():
    p = Peers(cancel_auto=False)
    p.connect()
    move = p.move()
    p.flush()
    move.cancel()
    p.flush()
    assert move.cancel_requested and not has_fired(move.result)
    p.request().final(0x0000)
    p.flush()
    assert result_of(move.result).ok


def test_abort_mid_move(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    request.pending()
    peers.flush()
    peers.server_protocol.abort()
    peers.flush()
    failure_of(move.result, AssociationAborted)
    assert move.pending is not None
    assert peers.association._operations == {}
    failure_of(peers.move().result, AssociationAborted)


def test_our_own_abort_fails_the_move(peers):
    move = peers.move()
    peers.flush()
    peers.association.abort()
    failure_of(move.result, AssociationAborted)


def test_connection_lost_mid_move(peers):
    move = peers.move()
    peers.flush()
    peers.client_protocol.transport.loseConnection()
    peers.flush()
    failure_of(move.result, AssociationAborted)


def test_dimse_timeout_between_responses():
    p = Peers(dimse_timeout=5)
    p.connect()
    move = p.move()
    p.flush()
    request = p.request()
    p.reactor.advance(4)
    request.pending()  # restarts the timer
    p.flush()
    p.reactor.advance(4)
    assert not has_fired(move.result)
    p.reactor.advance(2)
    failure = failure_of(move.result, DimseTimeout)
    assert "C-MOVE" in failure.getErrorMessage()
    p.flush()
    assert p.association.association._closed


def test_keep_alive_and_suspended_timeout():
    p = Peers(dimse_timeout=5)
    p.connect()
    move = p.move()
    p.flush()
    p.reactor.advance(4)
    move.keep_alive()
    p.reactor.advance(4)
    assert not has_fired(move.result)
    move.suspend_timeout()
    move.keep_alive()  # no timer while suspended
    p.reactor.advance(60)
    assert not has_fired(move.result)
    move.resume_timeout()
    p.reactor.advance(4)
    assert not has_fired(move.result)
    p.reactor.advance(2)
    failure_of(move.result, DimseTimeout)


def test_no_timer_after_the_end(peers):
    move = peers.move()
    peers.flush()
    peers.request().final()
    peers.flush()
    assert result_of(move.result).ok
    assert [c for c in peers.reactor.getDelayedCalls() if c.func == move._timed_out] == []


def test_response_of_the_wrong_kind_aborts(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    fields = {
        "AffectedSOPClassUID": STUDY_ROOT_MOVE,
        "CommandField": messages.C_GET_RSP,
        "MessageIDBeingRespondedTo": move.message_id,
        "CommandDataSetType": messages.NO_DATASET,
        "Status": 0,
    }
    request.association.send_message(request.context.id, messages.encode_command(fields))
    peers.flush()
    failure_of(move.result, AssociationAborted)


def test_response_without_a_status_aborts(peers):
    move = peers.move()
    peers.flush()
    request = peers.request()
    fields = {
        "AffectedSOPClassUID": STUDY_ROOT_MOVE,
        "CommandField": messages.C_MOVE_RSP,
        "MessageIDBeingRespondedTo": move.message_id,
        "CommandDataSetType": messages.NO_DATASET,
    }
    request.association.send_message(request.context.id, messages.encode_command(fields))
    peers.flush()
    failure_of(move.result, AssociationAborted)


def test_a_store_on_the_move_association_is_refused(peers):
    # C-STORE sub-operations of a C-MOVE travel on other associations: one
    # on the move's own association is refused, the move goes on.
    move = peers.move()
    peers.flush()
    request = peers.request()
    fields = {
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "CommandField": messages.C_STORE_RQ,
        "MessageID": 77,
        "Priority": 0,
        "CommandDataSetType": messages.DATASET_PRESENT,
        "AffectedSOPInstanceUID": "1.2.3.4.5",
        "MoveOriginatorApplicationEntityTitle": "HARMONY",
        "MoveOriginatorMessageID": move.message_id,
    }
    request.association.send_message(request.context.id, messages.encode_command(fields), b"\x08\x00" * 100)
    peers.flush()
    [rsp] = peers.service.store_responses
    assert rsp["Status"] == 0x0124 and rsp["MessageIDBeingRespondedTo"] == 77
    assert not has_fired(move.result)
    request.final()
    peers.flush()
    assert result_of(move.result).ok
