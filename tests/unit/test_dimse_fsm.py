"""
Tests for L{harmony.dimse.fsm}: every row of PS3.8 Table 9-10, the events
without a row, and whole associations driven from both sides.

The expected behaviour is written here from PS3.8 9.2 (Tables 9-6..9-10),
not taken from pynetdicom: pynetdicom's transition table is only checked
against the transcription below and iterated over.
"""

import ast
import inspect

import attr
import pytest
from pynetdicom.fsm import TRANSITION_TABLE as PYNETDICOM_TABLE

from harmony.dimse import fsm
from harmony.dimse.fsm import (
    EVENTS,
    INDICATION_KINDS,
    LOCAL_USER_EVENTS,
    STATES,
    CloseTransport,
    Indication,
    InvalidEvent,
    OpenTransport,
    SendPDU,
    StartARTIM,
    StopARTIM,
    UpperLayer,
)

# PS3.8 Table 9-10, one line per event as in the standard ("Sta6-12" is
# Sta6 to Sta12); blank cells are absent.
PS3_8_TABLE_9_10 = {
    "Evt1": "Sta1:AE-1",
    "Evt2": "Sta4:AE-2",
    "Evt3": "Sta2:AA-1 Sta3:AA-8 Sta5:AE-3 Sta6-12:AA-8 Sta13:AA-6",
    "Evt4": "Sta2:AA-1 Sta3:AA-8 Sta5:AE-4 Sta6-12:AA-8 Sta13:AA-6",
    "Evt5": "Sta1:AE-5",
    "Evt6": "Sta2:AE-6 Sta3:AA-8 Sta5-12:AA-8 Sta13:AA-7",
    "Evt7": "Sta3:AE-7",
    "Evt8": "Sta3:AE-8",
    "Evt9": "Sta6:DT-1 Sta8:AR-7",
    "Evt10": "Sta2:AA-1 Sta3:AA-8 Sta5:AA-8 Sta6:DT-2 Sta7:AR-6 Sta8-12:AA-8 Sta13:AA-6",
    "Evt11": "Sta6:AR-1",
    "Evt12": "Sta2:AA-1 Sta3:AA-8 Sta5:AA-8 Sta6:AR-2 Sta7:AR-8 Sta8-12:AA-8 Sta13:AA-6",
    "Evt13": "Sta2:AA-1 Sta3:AA-8 Sta5:AA-8 Sta6:AA-8 Sta7:AR-3 Sta8:AA-8 Sta9:AA-8 Sta10:AR-10 Sta11:AR-3"
    " Sta12:AA-8 Sta13:AA-6",
    "Evt14": "Sta8:AR-4 Sta9:AR-9 Sta12:AR-4",
    "Evt15": "Sta3:AA-1 Sta4:AA-2 Sta5-12:AA-1",
    "Evt16": "Sta2:AA-2 Sta3:AA-3 Sta5-12:AA-3 Sta13:AA-2",
    "Evt17": "Sta2:AA-5 Sta3-12:AA-4 Sta13:AR-5",
    "Evt18": "Sta2:AA-2 Sta13:AA-2",
    "Evt19": "Sta2:AA-1 Sta3:AA-8 Sta5-12:AA-8 Sta13:AA-7",
}


def _parse_table(rows):
    table = {}
    for event, row in rows.items():
        for cell in row.split():
            states, action = cell.split(":")
            if "-" in states:
                first, last = states[3:].split("-")
                names = ["Sta%d" % i for i in range(int(first), int(last) + 1)]
            else:
                names = [states]
            for state in names:
                assert (event, state) not in table
                table[(event, state)] = action
    return table


TABLE = _parse_table(PS3_8_TABLE_9_10)


@attr.s(frozen=True)
class FakePDU:
    """A decoded PDU as far as the machine cares: opaque."""

    name = attr.ib()
    tag = attr.ib(default="")


@attr.s(frozen=True)
class FakeAbort:
    """Like harmony.dimse.pdu.Abort: the machine reads C{source}."""

    source = attr.ib()
    reason = attr.ib()
    name = "A-ABORT"


# What the local user gives with its requests, and what the shell gives
# with the network events.
RQ = FakePDU("A-ASSOCIATE-RQ", "local")
EVENT_PDU = {
    "Evt1": RQ,
    "Evt3": FakePDU("A-ASSOCIATE-AC", "peer"),
    "Evt4": FakePDU("A-ASSOCIATE-RJ", "peer"),
    "Evt6": FakePDU("A-ASSOCIATE-RQ", "peer"),
    "Evt7": FakePDU("A-ASSOCIATE-AC", "local"),
    "Evt8": FakePDU("A-ASSOCIATE-RJ", "local"),
    "Evt9": FakePDU("P-DATA-TF", "local"),
    "Evt10": FakePDU("P-DATA-TF", "peer"),
    "Evt11": FakePDU("A-RELEASE-RQ", "local"),
    "Evt12": FakePDU("A-RELEASE-RQ", "peer"),
    "Evt13": FakePDU("A-RELEASE-RP", "peer"),
    "Evt14": FakePDU("A-RELEASE-RP", "local"),
    "Evt15": FakeAbort(0, 0),
    "Evt16": FakeAbort(0, 0),  # from the peer's service-user
    "Evt19": 6,  # invalid-PDU-parameter value
}


def _reason(event):
    # A provider abort says why: the shell's reason for an invalid PDU
    # (Evt19), unexpected-PDU for a valid PDU in the wrong state.
    return 6 if event == "Evt19" else 2


def _provider_abort(event):
    return ("A-ABORT", 2, _reason(event))


# PS3.8 Tables 9-6..9-9: per action, (next state, effects) given the
# event, its PDU and the role.
EXPECTED = {
    # Issue TRANSPORT CONNECT request primitive to local transport service.
    "AE-1": lambda e, p, req: ("Sta4", [OpenTransport()]),
    # Send A-ASSOCIATE-RQ-PDU (the one given with Evt1).
    "AE-2": lambda e, p, req: ("Sta5", [SendPDU(RQ)]),
    # Issue A-ASSOCIATE confirmation (accept) primitive.
    "AE-3": lambda e, p, req: ("Sta6", [Indication("associate_accept", p)]),
    # Issue A-ASSOCIATE confirmation (reject) primitive and close transport.
    "AE-4": lambda e, p, req: ("Sta1", [Indication("associate_reject", p), CloseTransport()]),
    # Issue transport connection response primitive; start ARTIM.
    "AE-5": lambda e, p, req: ("Sta2", [Indication("transport_open"), StartARTIM()]),
    # Stop ARTIM; the A-ASSOCIATE-RQ is acceptable: A-ASSOCIATE indication.
    "AE-6": lambda e, p, req: ("Sta3", [StopARTIM(), Indication("associate_request", p)]),
    # Send A-ASSOCIATE-AC PDU.
    "AE-7": lambda e, p, req: ("Sta6", [SendPDU(p)]),
    # Send A-ASSOCIATE-RJ PDU and start ARTIM.
    "AE-8": lambda e, p, req: ("Sta13", [SendPDU(p), StartARTIM()]),
    # Send P-DATA-TF PDU.
    "DT-1": lambda e, p, req: ("Sta6", [SendPDU(p)]),
    # Send P-DATA indication primitive.
    "DT-2": lambda e, p, req: ("Sta6", [Indication("p_data", p)]),
    # Send A-RELEASE-RQ PDU.
    "AR-1": lambda e, p, req: ("Sta7", [SendPDU(p)]),
    # Issue A-RELEASE indication primitive.
    "AR-2": lambda e, p, req: ("Sta8", [Indication("release_request", p)]),
    # Issue A-RELEASE confirmation primitive and close transport.
    "AR-3": lambda e, p, req: ("Sta1", [Indication("release_confirm", p), CloseTransport()]),
    # Issue A-RELEASE-RP PDU and start ARTIM.
    "AR-4": lambda e, p, req: ("Sta13", [SendPDU(p), StartARTIM()]),
    # Stop ARTIM.
    "AR-5": lambda e, p, req: ("Sta1", [StopARTIM()]),
    # Issue P-DATA indication.
    "AR-6": lambda e, p, req: ("Sta7", [Indication("p_data", p)]),
    # Issue P-DATA-TF PDU.
    "AR-7": lambda e, p, req: ("Sta8", [SendPDU(p)]),
    # Issue A-RELEASE indication (release collision): Sta9 if requestor,
    # Sta10 if not.
    "AR-8": lambda e, p, req: ("Sta9" if req else "Sta10", [Indication("release_collision", p)]),
    # Send A-RELEASE-RP PDU.
    "AR-9": lambda e, p, req: ("Sta11", [SendPDU(p)]),
    # Issue A-RELEASE confirmation primitive.
    "AR-10": lambda e, p, req: ("Sta12", [Indication("release_confirm", p)]),
    # Send A-ABORT PDU (service-user source) and (re)start ARTIM: the
    # user's A-ABORT, or one of the machine's for a PDU in Sta2.
    "AA-1": lambda e, p, req: ("Sta13", [SendPDU(p if e == "Evt15" else ("A-ABORT", 0, 0)), StartARTIM()]),
    # Stop ARTIM if running; close transport.
    "AA-2": lambda e, p, req: ("Sta1", [StopARTIM(), CloseTransport()]),
    # A-ABORT from a service-user: A-ABORT indication; close transport.
    "AA-3": lambda e, p, req: ("Sta1", [Indication("abort", p), CloseTransport()]),
    # Issue A-P-ABORT indication.
    "AA-4": lambda e, p, req: ("Sta1", [Indication("provider_abort")]),
    # Stop ARTIM.
    "AA-5": lambda e, p, req: ("Sta1", [StopARTIM()]),
    # Ignore PDU.
    "AA-6": lambda e, p, req: ("Sta13", []),
    # Send A-ABORT PDU.
    "AA-7": lambda e, p, req: ("Sta13", [SendPDU(_provider_abort(e))]),
    # Send A-ABORT PDU (service-provider source), issue A-P-ABORT
    # indication, start ARTIM.
    "AA-8": lambda e, p, req: (
        "Sta13",
        [SendPDU(_provider_abort(e)), Indication("provider_abort", _provider_abort(e)), StartARTIM()],
    ),
}

# Only the requestor sees Evt1/Evt2 and Sta4; only the acceptor sees Evt5.
ROLE_EVENTS = {"Evt1": True, "Evt2": True, "Evt5": False}


def _roles(event, state):
    roles = [True, False]
    if event in ROLE_EVENTS:
        roles = [ROLE_EVENTS[event]]
    if state == "Sta4":
        roles = [r for r in roles if r]
    return roles


def machine_in(state, requestor=True, **kwargs):
    """
    A machine in C{state}; a requestor reaches Sta4 through Evt1 so that
    AE-2 has an A-ASSOCIATE-RQ to send.
    """
    machine = UpperLayer(requestor, **kwargs)
    if state == "Sta4" and requestor:
        assert machine.event("Evt1", RQ) == [OpenTransport()]
    else:
        machine.state = state
    return machine


def _order(key):
    event, state = key
    return int(event[3:]), int(state[3:])


ROWS = [
    (event, state, action, requestor)
    for (event, state), action in sorted(PYNETDICOM_TABLE.items(), key=lambda item: _order(item[0]))
    for requestor in _roles(event, state)
]


def test_pynetdicom_table_is_ps3_8_table_9_10():
    """
    pynetdicom's table, and the one the machine runs, is PS3.8 Table 9-10.
    """
    assert PYNETDICOM_TABLE == TABLE
    assert fsm.TRANSITION_TABLE == TABLE
    assert set(EXPECTED) == set(TABLE.values())
    assert len(TABLE) == 123


@pytest.mark.parametrize(
    "event,state,action,requestor",
    ROWS,
    ids=["%s-%s-%s-%s" % (e, s, a, "rq" if r else "ac") for e, s, a, r in ROWS],
)
def test_transition(event, state, action, requestor):
    """
    Each row of Table 9-10 runs its action: the effects and next state of
    PS3.8 Tables 9-6..9-9.
    """
    machine = machine_in(state, requestor)
    pdu = EVENT_PDU.get(event)
    next_state, effects = EXPECTED[action](event, pdu, requestor)
    assert machine.event(event, pdu) == effects
    assert machine.state == next_state
    assert machine.last_action == action


ALL_EVENTS = ["Evt%d" % i for i in range(1, 20)]
ALL_STATES = ["Sta%d" % i for i in range(1, 14)]
PDU_EVENTS = {"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16", "Evt19"}

MISSING = [
    (event, state, requestor)
    for event in ALL_EVENTS
    for state in ALL_STATES
    for requestor in (True, False)
    if (event, state) not in TABLE
]


def _ignored(event, state, requestor):
    """
    Events without a row that are dropped: whatever the peer, the transport
    or the timer says once the association is over (Sta1), and a stale
    ARTIM expiry anywhere.
    """
    if event in ROLE_EVENTS and ROLE_EVENTS[event] != requestor:
        return False
    if state == "Sta1" and (event in PDU_EVENTS or event in ("Evt17", "Evt18")):
        return True
    return event == "Evt18"


@pytest.mark.parametrize(
    "event,state,requestor",
    MISSING,
    ids=["%s-%s-%s" % (e, s, "rq" if r else "ac") for e, s, r in MISSING],
)
def test_no_transition(event, state, requestor):
    """
    A local user request that Table 9-10 does not allow raises
    L{InvalidEvent}; network events without a row only exist when the
    transport is closed (ignored) or in a shell fault (L{InvalidEvent}).
    The state never changes.
    """
    machine = machine_in(state, requestor)
    pdu = EVENT_PDU.get(event)
    if event in LOCAL_USER_EVENTS:
        assert not _ignored(event, state, requestor)
    if _ignored(event, state, requestor):
        assert machine.event(event, pdu) == []
        assert machine.last_action is None
    else:
        with pytest.raises(InvalidEvent) as caught:
            machine.event(event, pdu)
        assert (caught.value.event, caught.value.state) == (event, state)
    assert machine.state == state


@pytest.mark.parametrize("event,requestor", [("Evt1", False), ("Evt2", False), ("Evt5", True)])
def test_wrong_role(event, requestor):
    """
    Only a requestor connects (Evt1, Evt2); only an acceptor is connected
    to (Evt5).
    """
    machine = machine_in("Sta1" if event != "Evt2" else "Sta4", requestor)
    state = machine.state
    with pytest.raises(InvalidEvent):
        machine.event(event, EVENT_PDU.get(event))
    assert machine.state == state


@pytest.mark.parametrize("event", sorted({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14"}))
def test_request_needs_pdu(event):
    """
    A local request that sends a PDU must carry it.
    """
    state = {"Evt1": "Sta1", "Evt7": "Sta3", "Evt8": "Sta3", "Evt9": "Sta6", "Evt11": "Sta6", "Evt14": "Sta8"}[event]
    machine = machine_in(state)
    with pytest.raises(ValueError):
        machine.event(event)
    assert machine.state == state


def test_unknown_event():
    machine = UpperLayer(True)
    with pytest.raises(ValueError):
        machine.event("Evt20")
    with pytest.raises(ValueError):
        machine.event("A-ASSOCIATE")
    assert machine.state == "Sta1"


def test_initial_state():
    requestor = UpperLayer(requestor=True)
    acceptor = UpperLayer(requestor=False)
    assert (requestor.state, requestor.is_requestor, requestor.last_action) == ("Sta1", True, None)
    assert (acceptor.state, acceptor.is_requestor) == ("Sta1", False)
    assert "requestor Sta1" in repr(requestor)
    assert set(STATES) == set(ALL_STATES)
    assert set(EVENTS) == set(ALL_EVENTS)


def test_effects_are_frozen_values():
    assert SendPDU(1) == SendPDU(1)
    assert Indication("p_data", 1) != Indication("p_data", 2)
    assert StartARTIM() == StartARTIM() != StopARTIM()
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        SendPDU(1).pdu = 2
    with pytest.raises(AttributeError):
        StartARTIM().x = 1


def test_indication_kinds():
    assert INDICATION_KINDS == {
        "transport_open",
        "associate_request",
        "associate_accept",
        "associate_reject",
        "p_data",
        "release_request",
        "release_collision",
        "release_confirm",
        "abort",
        "provider_abort",
    }
    with pytest.raises(ValueError):
        Indication("release")
    assert Indication("abort").pdu is None


def test_sans_io():
    """
    The machine imports neither Twisted nor the PDU model, and does no I/O.
    """
    tree = ast.parse(inspect.getsource(fsm))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    assert modules <= {"typing", "attr", "pynetdicom.fsm"}


# Provider details of the actions.


@pytest.mark.parametrize("state", ["Sta%d" % i for i in range(3, 13) if i != 4])
def test_provider_source_abort_received(state):
    """
    AA-3: an A-ABORT whose source is the peer's service-provider is an
    A-P-ABORT indication.
    """
    machine = machine_in(state)
    abort = FakeAbort(2, 1)
    assert machine.event("Evt16", abort) == [Indication("provider_abort", abort), CloseTransport()]
    assert machine.state == "Sta1"


def test_abort_source_from_default_tuple():
    """
    AA-3 also reads the source of the default factory's tuples.
    """
    machine = machine_in("Sta6")
    assert machine.event("Evt16", ("A-ABORT", 0, 0)) == [Indication("abort", ("A-ABORT", 0, 0)), CloseTransport()]
    machine = machine_in("Sta6")
    assert machine.event("Evt16", ("A-ABORT", 2, 2))[0] == Indication("provider_abort", ("A-ABORT", 2, 2))


def test_user_abort_without_pdu():
    """
    AA-1 on Evt15 without a PDU sends an A-ABORT of service-user source.
    """
    machine = machine_in("Sta6")
    assert machine.event("Evt15") == [SendPDU(("A-ABORT", 0, 0)), StartARTIM()]
    assert machine.state == "Sta13"


def test_abort_factory_injected():
    """
    Every A-ABORT the machine makes comes from the injected factory.
    """
    made = []

    def factory(source, reason):
        made.append((source, reason))
        return FakeAbort(source, reason)

    machine = machine_in("Sta6", abort_factory=factory)
    assert machine.event("Evt19", 1) == [
        SendPDU(FakeAbort(2, 1)),
        Indication("provider_abort", FakeAbort(2, 1)),
        StartARTIM(),
    ]
    assert machine.event("Evt6", EVENT_PDU["Evt6"]) == [SendPDU(FakeAbort(2, 2))]  # AA-7
    machine = machine_in("Sta2", requestor=False, abort_factory=factory)
    assert machine.event("Evt10", EVENT_PDU["Evt10"]) == [SendPDU(FakeAbort(0, 0)), StartARTIM()]  # AA-1
    machine = machine_in("Sta7", abort_factory=factory)
    assert machine.event("Evt15") == [SendPDU(FakeAbort(0, 0)), StartARTIM()]
    assert made == [(2, 1), (2, 2), (0, 0), (0, 0)]


def test_invalid_pdu_without_reason():
    machine = machine_in("Sta6")
    assert machine.event("Evt19")[0] == SendPDU(("A-ABORT", 2, 0))


def test_provider_rejects_associate_rq():
    """
    AE-6: an A-ASSOCIATE-RQ the service-provider does not accept (the
    check returns the A-ASSOCIATE-RJ) is rejected without the user: RJ sent,
    ARTIM started, Sta13.
    """
    checked = []
    rj = FakePDU("A-ASSOCIATE-RJ", "provider")

    def check(rq):
        checked.append(rq)
        return rj if rq.tag == "bad" else None

    machine = UpperLayer(False, check_associate_rq=check)
    machine.event("Evt5")
    bad = FakePDU("A-ASSOCIATE-RQ", "bad")
    assert machine.event("Evt6", bad) == [StopARTIM(), SendPDU(rj), StartARTIM()]
    assert (machine.state, machine.last_action) == ("Sta13", "AE-6")
    assert machine.event("Evt17") == [StopARTIM()]
    assert machine.state == "Sta1"

    machine = UpperLayer(False, check_associate_rq=check)
    machine.event("Evt5")
    good = FakePDU("A-ASSOCIATE-RQ", "good")
    assert machine.event("Evt6", good) == [StopARTIM(), Indication("associate_request", good)]
    assert machine.state == "Sta3"
    assert checked == [bad, good]


# Whole associations.

RECEIVED_AS = {
    "A-ASSOCIATE-RQ": "Evt6",
    "A-ASSOCIATE-AC": "Evt3",
    "A-ASSOCIATE-RJ": "Evt4",
    "P-DATA-TF": "Evt10",
    "A-RELEASE-RQ": "Evt12",
    "A-RELEASE-RP": "Evt13",
    "A-ABORT": "Evt16",
}


def sent(effects):
    """The PDUs the effects send, in order."""
    return [effect.pdu for effect in effects if isinstance(effect, SendPDU)]


def receive(machine, pdu):
    """Deliver a PDU to the peer machine as the shell would."""
    name = pdu[0] if isinstance(pdu, tuple) else pdu.name
    return machine.event(RECEIVED_AS[name], pdu)


def associated_pair():
    """
    A requestor and an acceptor driven through association establishment.
    """
    scu, scp = UpperLayer(True), UpperLayer(False)
    assert scu.event("Evt1", RQ) == [OpenTransport()]
    assert scu.state == "Sta4"
    assert scp.event("Evt5") == [Indication("transport_open"), StartARTIM()]
    assert scp.state == "Sta2"
    [rq] = sent(scu.event("Evt2"))
    assert rq is RQ and scu.state == "Sta5"
    assert receive(scp, rq) == [StopARTIM(), Indication("associate_request", RQ)]
    assert scp.state == "Sta3"
    ac = FakePDU("A-ASSOCIATE-AC")
    [ac_sent] = sent(scp.event("Evt7", ac))
    assert scp.state == "Sta6"
    assert receive(scu, ac_sent) == [Indication("associate_accept", ac)]
    assert scu.state == "Sta6"
    return scu, scp


def test_requestor_associate_data_release():
    scu, scp = associated_pair()
    command = FakePDU("P-DATA-TF", "C-ECHO-RQ")
    [pdata] = sent(scu.event("Evt9", command))
    assert (scu.state, scu.last_action) == ("Sta6", "DT-1")
    assert receive(scp, pdata) == [Indication("p_data", command)]
    response = FakePDU("P-DATA-TF", "C-ECHO-RSP")
    assert receive(scu, sent(scp.event("Evt9", response))[0]) == [Indication("p_data", response)]

    release_rq = FakePDU("A-RELEASE-RQ")
    [rrq] = sent(scu.event("Evt11", release_rq))
    assert scu.state == "Sta7"
    # A late P-DATA from the acceptor still reaches the requestor (AR-6).
    late = FakePDU("P-DATA-TF", "late")
    assert receive(scu, sent(scp.event("Evt9", late))[0]) == [Indication("p_data", late)]
    assert scu.state == "Sta7"

    assert receive(scp, rrq) == [Indication("release_request", release_rq)]
    assert scp.state == "Sta8"
    # The acceptor may still send P-DATA before answering (AR-7).
    last = FakePDU("P-DATA-TF", "last")
    assert sent(scp.event("Evt9", last)) == [last] and scp.state == "Sta8"
    assert receive(scu, last) == [Indication("p_data", last)]
    release_rp = FakePDU("A-RELEASE-RP")
    rp_effects = scp.event("Evt14", release_rp)
    assert rp_effects == [SendPDU(release_rp), StartARTIM()]
    assert scp.state == "Sta13"
    assert receive(scu, release_rp) == [Indication("release_confirm", release_rp), CloseTransport()]
    assert scu.state == "Sta1"

    # Requestor closed: the acceptor stops ARTIM and is idle; the
    # requestor's own connectionLost is ignored.
    assert scp.event("Evt17") == [StopARTIM()]
    assert scp.state == "Sta1"
    assert scu.event("Evt17") == []
    assert scu.state == "Sta1"


def test_acceptor_rejects():
    scu, scp = UpperLayer(True), UpperLayer(False)
    scu.event("Evt1", RQ)
    scp.event("Evt5")
    receive(scp, sent(scu.event("Evt2"))[0])
    rj = FakePDU("A-ASSOCIATE-RJ")
    assert scp.event("Evt8", rj) == [SendPDU(rj), StartARTIM()]
    assert scp.state == "Sta13"
    assert receive(scu, rj) == [Indication("associate_reject", rj), CloseTransport()]
    assert scu.state == "Sta1"
    assert scp.event("Evt17") == [StopARTIM()]
    assert (scp.state, scp.last_action) == ("Sta1", "AR-5")


def test_artim_expires_after_reject():
    """
    The requestor never closes after an A-ASSOCIATE-RJ: ARTIM expires in
    Sta13 and the acceptor closes (AA-2).
    """
    scp = UpperLayer(False)
    scp.event("Evt5")
    scp.event("Evt6", EVENT_PDU["Evt6"])
    scp.event("Evt8", EVENT_PDU["Evt8"])
    assert scp.event("Evt18") == [StopARTIM(), CloseTransport()]
    assert (scp.state, scp.last_action) == ("Sta1", "AA-2")
    assert scp.event("Evt17") == []


def test_artim_expires_after_release():
    scu, scp = associated_pair()
    receive(scp, sent(scu.event("Evt11", EVENT_PDU["Evt11"]))[0])
    scp.event("Evt14", EVENT_PDU["Evt14"])
    assert scp.state == "Sta13"
    # A stray PDU while waiting for the close is ignored (AA-6).
    assert scp.event("Evt10", EVENT_PDU["Evt10"]) == []
    assert scp.event("Evt18") == [StopARTIM(), CloseTransport()]
    assert scp.state == "Sta1"


def test_artim_expires_before_associate_rq():
    """
    A connection that never sends its A-ASSOCIATE-RQ is closed when ARTIM
    expires in Sta2; the user never hears of it beyond transport_open.
    """
    scp = UpperLayer(False)
    assert scp.event("Evt5") == [Indication("transport_open"), StartARTIM()]
    assert scp.event("Evt18") == [StopARTIM(), CloseTransport()]
    assert scp.state == "Sta1"
    assert scp.event("Evt17") == []


def test_connection_closed_before_associate_rq():
    scp = UpperLayer(False)
    scp.event("Evt5")
    assert scp.event("Evt17") == [StopARTIM()]
    assert (scp.state, scp.last_action) == ("Sta1", "AA-5")


def test_release_collision():
    """
    Both users request release at once. PS3.8 9.2 (AR-8..AR-10): the
    requestor answers the peer's A-RELEASE-RQ first (Sta9, Sta11); the
    acceptor waits for that A-RELEASE-RP (Sta10, Sta12), then answers.
    """
    scu, scp = associated_pair()
    scu_rq, scp_rq = FakePDU("A-RELEASE-RQ", "scu"), FakePDU("A-RELEASE-RQ", "scp")
    [to_scp] = sent(scu.event("Evt11", scu_rq))
    [to_scu] = sent(scp.event("Evt11", scp_rq))
    assert scu.state == scp.state == "Sta7"

    # The two A-RELEASE-RQ cross on the wire.
    assert receive(scu, to_scu) == [Indication("release_collision", scp_rq)]
    assert (scu.state, scu.last_action) == ("Sta9", "AR-8")
    assert receive(scp, to_scp) == [Indication("release_collision", scu_rq)]
    assert (scp.state, scp.last_action) == ("Sta10", "AR-8")

    # The acceptor's user may not answer yet.
    with pytest.raises(InvalidEvent):
        scp.event("Evt14", FakePDU("A-RELEASE-RP", "scp"))
    assert scp.state == "Sta10"

    # Requestor answers (AR-9).
    scu_rp = FakePDU("A-RELEASE-RP", "scu")
    assert scu.event("Evt14", scu_rp) == [SendPDU(scu_rp)]
    assert scu.state == "Sta11"
    # Acceptor gets it: release confirmation (AR-10), then answers (AR-4).
    assert receive(scp, scu_rp) == [Indication("release_confirm", scu_rp)]
    assert scp.state == "Sta12"
    scp_rp = FakePDU("A-RELEASE-RP", "scp")
    assert scp.event("Evt14", scp_rp) == [SendPDU(scp_rp), StartARTIM()]
    assert scp.state == "Sta13"
    # Requestor gets it: release confirmation, closes (AR-3).
    assert receive(scu, scp_rp) == [Indication("release_confirm", scp_rp), CloseTransport()]
    assert (scu.state, scu.last_action) == ("Sta1", "AR-3")
    assert scp.event("Evt17") == [StopARTIM()]
    assert scp.state == "Sta1"


def test_release_collision_requestor_side_alone():
    """
    The requestor's path alone, with a peer that answers: Sta7 -> Sta9 ->
    Sta11 -> Sta1.
    """
    scu = machine_in("Sta6", requestor=True)
    path = []
    for event in ("Evt11", "Evt12", "Evt14", "Evt13"):
        scu.event(event, EVENT_PDU[event])
        path.append((scu.last_action, scu.state))
    assert path == [("AR-1", "Sta7"), ("AR-8", "Sta9"), ("AR-9", "Sta11"), ("AR-3", "Sta1")]


def test_release_collision_acceptor_side_alone():
    scp = machine_in("Sta6", requestor=False)
    path = []
    for event in ("Evt11", "Evt12", "Evt13", "Evt14", "Evt17"):
        scp.event(event, EVENT_PDU.get(event))
        path.append((scp.last_action, scp.state))
    assert path == [("AR-1", "Sta7"), ("AR-8", "Sta10"), ("AR-10", "Sta12"), ("AR-4", "Sta13"), ("AR-5", "Sta1")]


@pytest.mark.parametrize("aborting", ["requestor", "acceptor"])
def test_abort_from_either_side(aborting):
    scu, scp = associated_pair()
    local, peer = (scu, scp) if aborting == "requestor" else (scp, scu)
    abort = FakeAbort(0, 0)
    assert local.event("Evt15", abort) == [SendPDU(abort), StartARTIM()]
    assert (local.state, local.last_action) == ("Sta13", "AA-1")
    # The peer tells its user and closes.
    assert receive(peer, abort) == [Indication("abort", abort), CloseTransport()]
    assert (peer.state, peer.last_action) == ("Sta1", "AA-3")
    # The aborting side sees the close: ARTIM stopped, idle.
    assert local.event("Evt17") == [StopARTIM()]
    assert local.state == "Sta1"
    assert peer.event("Evt17") == []


def test_abort_while_connecting():
    """
    A-ABORT request before the transport is up: close it (AA-2), no PDU.
    """
    scu = UpperLayer(True)
    scu.event("Evt1", RQ)
    assert scu.event("Evt15") == [StopARTIM(), CloseTransport()]
    assert scu.state == "Sta1"
    assert scu.event("Evt17") == []


def test_abort_while_awaiting_ac():
    scu = UpperLayer(True)
    scu.event("Evt1", RQ)
    scu.event("Evt2")
    assert scu.event("Evt15") == [SendPDU(("A-ABORT", 0, 0)), StartARTIM()]
    assert scu.state == "Sta13"
    # The acceptor's A-ASSOCIATE-AC arrives after all: ignored (AA-6).
    assert scu.event("Evt3", EVENT_PDU["Evt3"]) == []
    assert scu.event("Evt16", FakeAbort(0, 0)) == [StopARTIM(), CloseTransport()]
    assert scu.state == "Sta1"


def test_invalid_pdu_during_transfer():
    """
    An invalid PDU in the middle of an association: A-ABORT with the
    shell's reason, A-P-ABORT to the user, ARTIM (AA-8); then the peer's
    further invalid PDUs each get an A-ABORT (AA-7) until it closes.
    """
    scu, scp = associated_pair()
    receive(scp, sent(scu.event("Evt9", EVENT_PDU["Evt9"]))[0])
    effects = scp.event("Evt19", 4)  # unrecognized-PDU parameter
    abort = ("A-ABORT", 2, 4)
    assert effects == [SendPDU(abort), Indication("provider_abort", abort), StartARTIM()]
    assert (scp.state, scp.last_action) == ("Sta13", "AA-8")
    assert scp.event("Evt19", 1) == [SendPDU(("A-ABORT", 2, 1))]
    assert scp.last_action == "AA-7"
    assert scp.event("Evt6", EVENT_PDU["Evt6"]) == [SendPDU(("A-ABORT", 2, 2))]
    assert scp.state == "Sta13"
    # The requestor receives the provider abort.
    assert receive(scu, abort) == [Indication("provider_abort", abort), CloseTransport()]
    assert scu.state == "Sta1"
    assert scp.event("Evt17") == [StopARTIM()]
    assert scp.state == "Sta1"


def test_unexpected_pdu_during_transfer():
    """
    A well-formed PDU in the wrong state (A-ASSOCIATE-RQ while associated)
    is an unexpected-PDU provider abort.
    """
    scu, scp = associated_pair()
    assert scu.event("Evt6", EVENT_PDU["Evt6"]) == [
        SendPDU(("A-ABORT", 2, 2)),
        Indication("provider_abort", ("A-ABORT", 2, 2)),
        StartARTIM(),
    ]
    assert scu.state == "Sta13"


def test_unexpected_pdu_before_associate_rq():
    """
    Anything but an A-ASSOCIATE-RQ first: A-ABORT (AA-1), no indication,
    then the close stops ARTIM.
    """
    scp = UpperLayer(False)
    scp.event("Evt5")
    assert scp.event("Evt10", EVENT_PDU["Evt10"]) == [SendPDU(("A-ABORT", 0, 0)), StartARTIM()]
    assert scp.state == "Sta13"
    assert scp.event("Evt17") == [StopARTIM()]


@pytest.mark.parametrize("state", ["Sta3", "Sta5", "Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"])
def test_transport_closed_unexpectedly(state):
    """
    The connection drops with an association (being) established: A-P-ABORT
    indication, idle (AA-4); nothing to send or close.
    """
    machine = machine_in(state, requestor=state in ("Sta5", "Sta9", "Sta11"))
    assert machine.event("Evt17") == [Indication("provider_abort")]
    assert (machine.state, machine.last_action) == ("Sta1", "AA-4")


def test_connect_fails():
    scu = UpperLayer(True)
    scu.event("Evt1", RQ)
    assert scu.event("Evt17") == [Indication("provider_abort")]
    assert scu.state == "Sta1"


def test_requestor_reused_after_release():
    """
    Back in Sta1 the machine can be used for a new association.
    """
    scu, scp = associated_pair()
    rrq = EVENT_PDU["Evt11"]
    receive(scp, sent(scu.event("Evt11", rrq))[0])
    receive(scu, sent(scp.event("Evt14", EVENT_PDU["Evt14"]))[0])
    assert scu.state == "Sta1"
    other = FakePDU("A-ASSOCIATE-RQ", "again")
    assert scu.event("Evt1", other) == [OpenTransport()]
    assert scu.event("Evt2") == [SendPDU(other)]
