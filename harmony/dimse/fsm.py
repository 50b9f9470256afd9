# -*- test-case-name: tests.unit.test_dimse_fsm -*-
"""
The DICOM upper layer state machine (PS3.8 9.2), sans-IO.

One L{UpperLayer} per association (per transport connection). The shell
(the Twisted protocol) turns what happens into events and carries out the
effects the machine returns::

    effects = machine.event("Evt10", pdata)      # a P-DATA-TF PDU arrived
    for effect in effects: ...                   # SendPDU, StartARTIM, Indication, ...

Events are the names of PS3.8 Table 9-10 (C{"Evt1"}..C{"Evt19"}); the
transitions come from pynetdicom's copy of that table
(C{pynetdicom.fsm.TRANSITION_TABLE}, a table only: none of pynetdicom's
threaded action functions is used). The actions AE-1..AE-8, DT-1..DT-2,
AR-1..AR-10 and AA-1..AA-8 are implemented here and return effects.

PDUs are opaque to the machine: the shell decodes bytes into the model
objects of L{harmony.dimse.pdu} and passes them in with the event; the
machine hands them back in L{Indication}s and L{SendPDU}s. The only PDUs
the machine makes itself are A-ABORTs (AA-1 without a user PDU, AA-7,
AA-8), through the injected C{abort_factory(source, reason)}; the only
field it reads is the C{source} of a received A-ABORT (AA-3).

Events
======

Local user (a request the machine cannot honour in the current state raises
L{InvalidEvent}; the state is unchanged):

  - Evt1  A-ASSOCIATE request: C{pdu} is the A-ASSOCIATE-RQ to send once
          the transport is connected (requestor only).
  - Evt7  A-ASSOCIATE response (accept): C{pdu} is the A-ASSOCIATE-AC.
  - Evt8  A-ASSOCIATE response (reject): C{pdu} is the A-ASSOCIATE-RJ.
  - Evt9  P-DATA request: C{pdu} is the P-DATA-TF.
  - Evt11 A-RELEASE request: C{pdu} is the A-RELEASE-RQ.
  - Evt14 A-RELEASE response: C{pdu} is the A-RELEASE-RP.
  - Evt15 A-ABORT request: C{pdu} is the A-ABORT (when C{None}, one is made
          with C{abort_factory(0, 0)}: service-user source).

Transport, timer and network (the shell reports them):

  - Evt2  transport connect confirmation (requestor).
  - Evt5  transport connection indication (acceptor).
  - Evt3, Evt4, Evt6, Evt10, Evt12, Evt13, Evt16: the PDU received
          (A-ASSOCIATE-AC, -RJ, -RQ, P-DATA-TF, A-RELEASE-RQ, -RP, A-ABORT).
  - Evt17 transport connection closed.
  - Evt18 ARTIM timer expired.
  - Evt19 unrecognized or invalid PDU: C{pdu} is the A-ABORT reason
          (PS3.8 Table 9-26, e.g. L{REASON_UNRECOGNIZED_PDU}).

In every connected state (Sta2, Sta3, Sta5..Sta13) Table 9-10 has an entry
for every network event, so bad input from the peer always ends in an
A-ABORT (AA-1, AA-7, AA-8) and never in an exception. Events without an
entry are handled as follows:

  - in Sta1 (no association; the transport is closed or closing) PDU
    events, Evt17 and Evt18 are ignored and return no effects: this is
    the normal tail of every action that closes the transport (for
    example C{connectionLost} after AR-3, or bytes that were already
    buffered when AA-2 closed the connection);
  - Evt18 in a state where ARTIM does not run (a timer that fired although
    it was cancelled) is ignored;
  - anything else (a local user request in the wrong state, Evt2 outside
    Sta4, Evt5 outside Sta1, a PDU while the transport is still
    connecting, Evt1 or Evt2 on an acceptor, Evt5 on a requestor) raises
    L{InvalidEvent}.

Effects
=======

  - L{SendPDU}: encode and write the PDU.
  - L{StartARTIM}: (re)start the ARTIM timer: cancel a pending one, then
    schedule Evt18 after the ARTIM timeout on the injected clock.
  - L{StopARTIM}: cancel the ARTIM timer (a no-op if it is not running).
  - L{OpenTransport}: connect to the peer (AE-1); report Evt2 on success,
    Evt17 on failure.
  - L{CloseTransport}: close the connection (after writing what was
    sent before); the later Evt17 is ignored in Sta1.
  - L{Indication}: tell the local user; C{kind} is one of
    L{INDICATION_KINDS}:

      - C{"transport_open"} (AE-5): an incoming connection is open and
        waits for its A-ASSOCIATE-RQ (informational; the PS3.8
        "transport connection response" is implicit in Twisted).
      - C{"associate_request"} (AE-6): C{pdu} is the received
        A-ASSOCIATE-RQ; answer with Evt7 or Evt8.
      - C{"associate_accept"} (AE-3): C{pdu} is the A-ASSOCIATE-AC.
      - C{"associate_reject"} (AE-4): C{pdu} is the A-ASSOCIATE-RJ (the
        transport is being closed).
      - C{"p_data"} (DT-2, AR-6): C{pdu} is the P-DATA-TF.
      - C{"release_request"} (AR-2): C{pdu} is the A-RELEASE-RQ; answer
        with Evt14 (after any last Evt9).
      - C{"release_collision"} (AR-8): C{pdu} is the peer's A-RELEASE-RQ,
        received while our own release request is outstanding. The
        requestor (Sta9) answers at once with Evt14; the acceptor (Sta10)
        waits for C{"release_confirm"} (Sta12), then answers with Evt14.
      - C{"release_confirm"} (AR-3, AR-10): C{pdu} is the A-RELEASE-RP.
      - C{"abort"} (AA-3, A-ABORT from the peer's service-user): C{pdu} is
        the received A-ABORT.
      - C{"provider_abort"} (A-P-ABORT): C{pdu} is the received A-ABORT of
        source service-provider (AA-3), the A-ABORT this machine sent
        (AA-8: its reason says why), or C{None} when the transport closed
        unexpectedly (AA-4).

No Twisted imports, no I/O.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import attr
from pynetdicom.fsm import TRANSITION_TABLE as _PYNETDICOM_TABLE

__all__ = [
    "UpperLayer",
    "InvalidEvent",
    "SendPDU",
    "StartARTIM",
    "StopARTIM",
    "OpenTransport",
    "CloseTransport",
    "Indication",
    "Effect",
    "INDICATION_KINDS",
    "EVENTS",
    "STATES",
    "LOCAL_USER_EVENTS",
    "TRANSITION_TABLE",
    "default_abort_factory",
]

#: A-ABORT source (PS3.8 Table 9-26).
ABORT_SOURCE_SERVICE_USER = 0
ABORT_SOURCE_SERVICE_PROVIDER = 2

#: A-ABORT reason/diagnostic when the source is the service-provider
#: (PS3.8 Table 9-26).
REASON_NOT_SPECIFIED = 0
REASON_UNRECOGNIZED_PDU = 1
REASON_UNEXPECTED_PDU = 2
REASON_UNRECOGNIZED_PDU_PARAMETER = 4
REASON_UNEXPECTED_PDU_PARAMETER = 5
REASON_INVALID_PDU_PARAMETER_VALUE = 6

#: The states of PS3.8 Tables 9-1..9-5.
STATES = {
    "Sta1": "Idle",
    "Sta2": "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)",
    "Sta3": "Awaiting local A-ASSOCIATE response primitive",
    "Sta4": "Awaiting transport connection opening to complete",
    "Sta5": "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU",
    "Sta6": "Association established and ready for data transfer",
    "Sta7": "Awaiting A-RELEASE-RP PDU",
    "Sta8": "Awaiting local A-RELEASE response primitive",
    "Sta9": "Release collision requestor side; awaiting A-RELEASE response",
    "Sta10": "Release collision acceptor side; awaiting A-RELEASE-RP PDU",
    "Sta11": "Release collision requestor side; awaiting A-RELEASE-RP PDU",
    "Sta12": "Release collision acceptor side; awaiting A-RELEASE response primitive",
    "Sta13": "Awaiting transport connection close indication",
}

#: The events of PS3.8 Table 9-10.
EVENTS = {
    "Evt1": "A-ASSOCIATE request (local user)",
    "Evt2": "Transport connect confirmation",
    "Evt3": "A-ASSOCIATE-AC PDU received",
    "Evt4": "A-ASSOCIATE-RJ PDU received",
    "Evt5": "Transport connection indication",
    "Evt6": "A-ASSOCIATE-RQ PDU received",
    "Evt7": "A-ASSOCIATE response primitive (accept)",
    "Evt8": "A-ASSOCIATE response primitive (reject)",
    "Evt9": "P-DATA request primitive",
    "Evt10": "P-DATA-TF PDU received",
    "Evt11": "A-RELEASE request primitive",
    "Evt12": "A-RELEASE-RQ PDU received",
    "Evt13": "A-RELEASE-RP PDU received",
    "Evt14": "A-RELEASE response primitive",
    "Evt15": "A-ABORT request primitive",
    "Evt16": "A-ABORT PDU received",
    "Evt17": "Transport connection closed indication",
    "Evt18": "ARTIM timer expired",
    "Evt19": "Unrecognized or invalid PDU received",
}

#: Events that are requests of the local user.
LOCAL_USER_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})

#: Local user events that must carry the PDU to send.
_PDU_REQUIRED = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14"})

#: Events only one side may see: {event: is_requestor}.
_ROLE_EVENTS = {"Evt1": True, "Evt2": True, "Evt5": False}

#: Events ignored in Sta1 (the association is over, the transport closed or
#: closing): everything the peer, the transport or the timer may still say.
_IGNORED_IN_IDLE = frozenset({"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16", "Evt17", "Evt18", "Evt19"})

#: PS3.8 Table 9-10 as {(event, state): action}, from pynetdicom (copied so
#: that nobody can change it under us).
TRANSITION_TABLE: Dict[Tuple[str, str], str] = dict(_PYNETDICOM_TABLE)

#: The kinds of L{Indication} (see the module docstring).
INDICATION_KINDS = frozenset(
    {
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
)


@attr.s(slots=True, frozen=True)
class SendPDU:
    """
    Encode C{pdu} and write it to the transport.
    """

    pdu = attr.ib()


@attr.s(slots=True, frozen=True)
class StartARTIM:
    """
    Start the ARTIM timer, or restart it if it is running.
    """


@attr.s(slots=True, frozen=True)
class StopARTIM:
    """
    Stop the ARTIM timer (nothing to do if it is not running).
    """


@attr.s(slots=True, frozen=True)
class OpenTransport:
    """
    Requestor: connect to the peer (AE-1); report Evt2 when connected,
    Evt17 when the attempt fails.
    """


@attr.s(slots=True, frozen=True)
class CloseTransport:
    """
    Close the transport connection once what was sent is written.
    """


@attr.s(slots=True, frozen=True)
class Indication:
    """
    A primitive for the local user.

    @ivar kind: one of L{INDICATION_KINDS}.
    @ivar pdu: the PDU it is about (see the module docstring), or C{None}.
    """

    kind = attr.ib(validator=attr.validators.in_(INDICATION_KINDS))
    pdu = attr.ib(default=None)


Effect = Union[SendPDU, StartARTIM, StopARTIM, OpenTransport, CloseTransport, Indication]


class InvalidEvent(Exception):
    """
    An event the machine cannot accept in its current state (a local user
    request that PS3.8 Table 9-10 does not allow there, or a shell fault).
    The state is unchanged.
    """

    def __init__(self, event: str, state: str) -> None:
        Exception.__init__(self, f"{event} ({EVENTS.get(event, '?')}) is not valid in {state}")
        self.event = event
        self.state = state


def default_abort_factory(source: int, reason: int) -> Tuple[str, int, int]:
    """
    The A-ABORT made when no factory is injected: C{("A-ABORT", source,
    reason)}. The shell injects C{harmony.dimse.pdu.Abort} instead.
    """
    return ("A-ABORT", source, reason)


def _abort_source(pdu: Any) -> Optional[int]:
    """
    The source field of a received A-ABORT: its C{source} attribute, or the
    second item of a L{default_abort_factory} tuple.
    """
    source = getattr(pdu, "source", None)
    if source is None and isinstance(pdu, tuple) and len(pdu) == 3 and pdu[0] == "A-ABORT":
        source = pdu[1]
    return source


_Result = Tuple[List[Effect], str]


class UpperLayer:
    """
    The PS3.8 9.2 state machine of one association.

    @ivar state: the current state, C{"Sta1"}..C{"Sta13"}.
    @ivar is_requestor: C{True} for the association-requestor (decides
        AR-8, the release collision path).
    @ivar last_action: the action of the last accepted event (C{"AE-1"}..
        C{"AA-8"}), or C{None} if it was ignored; for logging.
    """

    def __init__(
        self,
        requestor: bool,
        abort_factory: Callable[[int, int], Any] = default_abort_factory,
        check_associate_rq: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        """
        @param requestor: this side requests the association (SCU side).
        @param abort_factory: C{(source, reason) -> A-ABORT PDU}, used
            whenever the machine sends an A-ABORT of its own.
        @param check_associate_rq: the service-provider check of AE-6:
            C{(A-ASSOCIATE-RQ) -> None} when acceptable, or the
            A-ASSOCIATE-RJ PDU to send (e.g. unsupported protocol version).
            C{None}: every A-ASSOCIATE-RQ goes to the user.
        """
        self.is_requestor = bool(requestor)
        self.state = "Sta1"
        self.last_action: Optional[str] = None
        self._abort_factory = abort_factory
        self._check_associate_rq = check_associate_rq
        self._associate_rq: Any = None
        self._actions: Dict[str, Callable[[str, Any], _Result]] = {
            "AE-1": self._ae_1,
            "AE-2": self._ae_2,
            "AE-3": self._ae_3,
            "AE-4": self._ae_4,
            "AE-5": self._ae_5,
            "AE-6": self._ae_6,
            "AE-7": self._ae_7,
            "AE-8": self._ae_8,
            "DT-1": self._dt_1,
            "DT-2": self._dt_2,
            "AR-1": self._ar_1,
            "AR-2": self._ar_2,
            "AR-3": self._ar_3,
            "AR-4": self._ar_4,
            "AR-5": self._ar_5,
            "AR-6": self._ar_6,
            "AR-7": self._ar_7,
            "AR-8": self._ar_8,
            "AR-9": self._ar_9,
            "AR-10": self._ar_10,
            "AA-1": self._aa_1,
            "AA-2": self._aa_2,
            "AA-3": self._aa_3,
            "AA-4": self._aa_4,
            "AA-5": self._aa_5,
            "AA-6": self._aa_6,
            "AA-7": self._aa_7,
            "AA-8": self._aa_8,
        }

    def __repr__(self) -> str:
        role = "requestor" if self.is_requestor else "acceptor"
        return f"<UpperLayer {role} {self.state}>"

    def event(self, name: str, pdu: Any = None) -> List[Effect]:
        """
        Process one event and return the effects, in order.

        @param name: C{"Evt1"}..C{"Evt19"}.
        @param pdu: the PDU received or to send, or for Evt19 the A-ABORT
            reason (see the module docstring).
        @raise InvalidEvent: the event is not valid in this state.
        @raise ValueError: unknown event, or a request without its PDU.
        """
        if name not in EVENTS:
            raise ValueError(f"unknown upper layer event {name!r}")
        if name in _ROLE_EVENTS and _ROLE_EVENTS[name] != self.is_requestor:
            raise InvalidEvent(name, self.state)
        action = TRANSITION_TABLE.get((name, self.state))
        if action is None:
            if (self.state == "Sta1" and name in _IGNORED_IN_IDLE) or name == "Evt18":
                self.last_action = None
                return []
            raise InvalidEvent(name, self.state)
        if name in _PDU_REQUIRED and pdu is None:
            raise ValueError(f"{name} ({EVENTS[name]}) needs the PDU to send")
        effects, next_state = self._actions[action](name, pdu)
        self.state = next_state
        self.last_action = action
        return effects

    # Association establishment (PS3.8 Table 9-6)

    def _ae_1(self, event: str, pdu: Any) -> _Result:
        # Issue TRANSPORT CONNECT request; the A-ASSOCIATE-RQ waits for AE-2.
        self._associate_rq = pdu
        return [OpenTransport()], "Sta4"

    def _ae_2(self, event: str, pdu: Any) -> _Result:
        # Send A-ASSOCIATE-RQ PDU.
        rq, self._associate_rq = self._associate_rq, None
        return [SendPDU(rq)], "Sta5"

    def _ae_3(self, event: str, pdu: Any) -> _Result:
        # Issue A-ASSOCIATE confirmation (accept) primitive.
        return [Indication("associate_accept", pdu)], "Sta6"

    def _ae_4(self, event: str, pdu: Any) -> _Result:
        # Issue A-ASSOCIATE confirmation (reject) primitive, close transport.
        return [Indication("associate_reject", pdu), CloseTransport()], "Sta1"

    def _ae_5(self, event: str, pdu: Any) -> _Result:
        # Issue transport connection response primitive; start ARTIM.
        return [Indication("transport_open"), StartARTIM()], "Sta2"

    def _ae_6(self, event: str, pdu: Any) -> _Result:
        # Stop ARTIM; if acceptable by the service-provider issue
        # A-ASSOCIATE indication (Sta3), else send A-ASSOCIATE-RJ and start
        # ARTIM (Sta13).
        reject = None if self._check_associate_rq is None else self._check_associate_rq(pdu)
        if reject is None:
            return [StopARTIM(), Indication("associate_request", pdu)], "Sta3"
        return [StopARTIM(), SendPDU(reject), StartARTIM()], "Sta13"

    def _ae_7(self, event: str, pdu: Any) -> _Result:
        # Send A-ASSOCIATE-AC PDU.
        return [SendPDU(pdu)], "Sta6"

    def _ae_8(self, event: str, pdu: Any) -> _Result:
        # Send A-ASSOCIATE-RJ PDU and start ARTIM.
        return [SendPDU(pdu), StartARTIM()], "Sta13"

    # Data transfer (PS3.8 Table 9-7)

    def _dt_1(self, event: str, pdu: Any) -> _Result:
        # Send P-DATA-TF PDU.
        return [SendPDU(pdu)], "Sta6"

    def _dt_2(self, event: str, pdu: Any) -> _Result:
        # Send P-DATA indication primitive.
        return [Indication("p_data", pdu)], "Sta6"

    # Association release (PS3.8 Table 9-8)

    def _ar_1(self, event: str, pdu: Any) -> _Result:
        # Send A-RELEASE-RQ PDU.
        return [SendPDU(pdu)], "Sta7"

    def _ar_2(self, event: str, pdu: Any) -> _Result:
        # Issue A-RELEASE indication primitive.
        return [Indication("release_request", pdu)], "Sta8"

    def _ar_3(self, event: str, pdu: Any) -> _Result:
        # Issue A-RELEASE confirmation primitive and close transport.
        return [Indication("release_confirm", pdu), CloseTransport()], "Sta1"

    def _ar_4(self, event: str, pdu: Any) -> _Result:
        # Issue A-RELEASE-RP PDU and start ARTIM.
        return [SendPDU(pdu), StartARTIM()], "Sta13"

    def _ar_5(self, event: str, pdu: Any) -> _Result:
        # Stop ARTIM.
        return [StopARTIM()], "Sta1"

    def _ar_6(self, event: str, pdu: Any) -> _Result:
        # Issue P-DATA indication (while awaiting A-RELEASE-RP).
        return [Indication("p_data", pdu)], "Sta7"

    def _ar_7(self, event: str, pdu: Any) -> _Result:
        # Issue P-DATA-TF PDU (before answering the peer's release).
        return [SendPDU(pdu)], "Sta8"

    def _ar_8(self, event: str, pdu: Any) -> _Result:
        # Issue A-RELEASE indication (release collision): Sta9 if
        # association-requestor, Sta10 if not.
        return [Indication("release_collision", pdu)], ("Sta9" if self.is_requestor else "Sta10")

    def _ar_9(self, event: str, pdu: Any) -> _Result:
        # Send A-RELEASE-RP PDU.
        return [SendPDU(pdu)], "Sta11"

    def _ar_10(self, event: str, pdu: Any) -> _Result:
        # Issue A-RELEASE confirmation primitive.
        return [Indication("release_confirm", pdu)], "Sta12"

    # Association abort (PS3.8 Table 9-9)

    def _aa_1(self, event: str, pdu: Any) -> _Result:
        # Send A-ABORT PDU (service-user source) and (re)start ARTIM. From
        # Evt15 the user's A-ABORT; from an unexpected PDU in Sta2 one of
        # our own, service-user source as the table says.
        if event != "Evt15" or pdu is None:
            pdu = self._abort_factory(ABORT_SOURCE_SERVICE_USER, REASON_NOT_SPECIFIED)
        return [SendPDU(pdu), StartARTIM()], "Sta13"

    def _aa_2(self, event: str, pdu: Any) -> _Result:
        # Stop ARTIM if running; close transport.
        return [StopARTIM(), CloseTransport()], "Sta1"

    def _aa_3(self, event: str, pdu: Any) -> _Result:
        # A-ABORT (service-user initiated) or A-P-ABORT (service-provider
        # initiated) indication; close transport.
        kind = "abort" if _abort_source(pdu) == ABORT_SOURCE_SERVICE_USER else "provider_abort"
        return [Indication(kind, pdu), CloseTransport()], "Sta1"

    def _aa_4(self, event: str, pdu: Any) -> _Result:
        # Issue A-P-ABORT indication (the transport is already closed).
        return [Indication("provider_abort")], "Sta1"

    def _aa_5(self, event: str, pdu: Any) -> _Result:
        # Stop ARTIM.
        return [StopARTIM()], "Sta1"

    def _aa_6(self, event: str, pdu: Any) -> _Result:
        # Ignore PDU.
        return [], "Sta13"

    def _aa_7(self, event: str, pdu: Any) -> _Result:
        # Send A-ABORT PDU (the association no longer exists: no indication,
        # ARTIM keeps running).
        abort = self._abort_factory(ABORT_SOURCE_SERVICE_PROVIDER, self._reason(event, pdu))
        return [SendPDU(abort)], "Sta13"

    def _aa_8(self, event: str, pdu: Any) -> _Result:
        # Send A-ABORT PDU (service-provider source), issue A-P-ABORT
        # indication, start ARTIM.
        abort = self._abort_factory(ABORT_SOURCE_SERVICE_PROVIDER, self._reason(event, pdu))
        return [SendPDU(abort), Indication("provider_abort", abort), StartARTIM()], "Sta13"

    @staticmethod
    def _reason(event: str, pdu: Any) -> int:
        """
        The A-ABORT reason for a provider abort: the shell's reason for
        Evt19 (unspecified if it gave none), unexpected-PDU otherwise.
        """
        if event == "Evt19":
            return REASON_NOT_SPECIFIED if pdu is None else int(pdu)
        return REASON_UNEXPECTED_PDU
