# -*- test-case-name: tests.unit.test_dimse_association -*-
"""
The thin Twisted shell of one DICOM association: it moves bytes between the
transport and the sans-IO core (L{pdu} framing, the L{fsm} upper layer,
L{messages} assembly) and runs timers on the injected clock.

The I{user} of an association (the SCP service or the SCU client) gets
plain calls:

  - C{associate_requested(rq)} (acceptor) -> an C{AssociateAC} or
    C{AssociateRJ} and, for an AC, the accepted contexts by ID;
  - C{established(association)} once the association is up;
  - C{command(association, Command)} and C{fragment(association,
    DataFragment)} for received DIMSE messages (data set fragments arrive
    one by one and are never joined here);
  - C{release_requested(association)}, C{released(association)},
    C{aborted(association, source, reason)}.

Users send with L{Association.send_message} (command bytes plus an
optional data set: bytes or an iterable of chunks, sent with backpressure).
"""

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from harmony.dimse import fsm, messages, pdu
from harmony.logs import logger
from harmony.transport import write_now

log = logger("harmony.dimse")

_EVENTS = {
    pdu.A_ASSOCIATE_RQ: "Evt6",
    pdu.A_ASSOCIATE_AC: "Evt3",
    pdu.A_ASSOCIATE_RJ: "Evt4",
    pdu.P_DATA_TF: "Evt10",
    pdu.A_RELEASE_RQ: "Evt12",
    pdu.A_RELEASE_RP: "Evt13",
    pdu.A_ABORT: "Evt16",
}

#: Bytes the transport buffers before a data set sender is paused.
SEND_BUFFER = 1024 * 1024

#: A message sent "now" (L{Association.send_message}): PDUs per system call
#: at most, by bytes and by count.
NOW_BATCH = 512 * 1024
NOW_BATCH_PDUS = 32

#: A-ABORT sources (PS3.8 9.3.8).
SERVICE_USER = 0
SERVICE_PROVIDER = 2


@attr.s(frozen=True)
class AssociationSettings:
    """
    Limits and timers of associations.

    @ivar max_pdu_length: the Maximum Length Received we advertise (the
        largest P-DATA-TF we accept); 0 = unlimited.
    @ivar artim_timeout: seconds for the ARTIM timer (association request,
        release and reject handshakes).
    @ivar idle_timeout: seconds without any PDU before the association is
        aborted (C{None}: never).
    @ivar dimse_timeout: seconds allowed between the fragments of a DIMSE
        message being received (C{None}: the idle timeout).
    """

    max_pdu_length = attr.ib(default=131072)
    artim_timeout = attr.ib(default=30.0)
    idle_timeout = attr.ib(default=60.0)
    dimse_timeout = attr.ib(default=None)


class AssociationAborted(Exception):
    """
    The association was aborted (by either side or by the provider).
    """

    def __init__(self, source=None, reason=None, message="association aborted"):
        self.source = source
        self.reason = reason
        super().__init__(message)


class AssociationRejected(Exception):
    def __init__(self, result, source, reason):
        self.result, self.source, self.reason = result, source, reason
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")


class Association(Protocol):
    """
    One association over one connection.

    @param requestor: C{True} on the SCU side (we sent the A-ASSOCIATE-RQ).
    @param user: the association user (see the module docstring).
    @param clock: an C{IReactorTime}.
    @param settings: L{AssociationSettings}.
    @param request: for a requestor, the C{AssociateRQ} to send.

    @ivar contexts: accepted contexts by ID
        (L{harmony.dimse.negotiation.AcceptedContext}).
    @ivar peer_max_pdu: the peer's Maximum Length Received.
    @ivar rq: the A-ASSOCIATE-RQ (sent or received).
    """

    def __init__(self, requestor, user, clock, settings=None, request=None):
        self.requestor = requestor
        self.user = user
        self.clock = clock
        self.settings = settings or AssociationSettings()
        self.rq = request
        self.upper = fsm.UpperLayer(requestor, abort_factory=pdu.Abort)
        self.framer = pdu.PDUFramer(max_pdu_length=self.settings.max_pdu_length)
        self.assembler = messages.MessageAssembler()
        self.contexts = {}
        self.peer_max_pdu = 0
        self.peer = None
        self.lost_reason = None
        self.established = False
        self.ended = defer.Deferred()
        self._artim = None
        self._idle = None
        self._closed = False
        self._ac = None
        self._reading_paused = False
        self._holds = 0
        #: Cancellable operations (C-FIND, C-GET, C-MOVE) answering on this
        #: association, by message ID (for C-CANCEL-RQ): each has
        #: C{cancel()} and C{aborted(association)}.
        self.operations = {}

    # -- transport events -------------------------------------------------

    def connectionMade(self):
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
        if hasattr(self.transport, "bufferSize"):
            # Room for several P-DATA-TF PDUs before a sender is paused: far
            # fewer pause/resume (and epoll) round trips per data set sent.
            self.transport.bufferSize = SEND_BUFFER
        self.peer = self.transport.getPeer()
        self._touch()
        if self.requestor:
            self._event("Evt1", self.rq)
            self._event("Evt2")
        else:
            self._event("Evt5")

    def dataReceived(self, data):
        try:
            frames = self.framer.feed(data)
            error = None
        except pdu.PDUError as e:
            # The PDUs before the bad one still count.
            frames, error = e.pdus, e
        self._frames(frames)
        if error is not None and not self._closed:
            self._event("Evt19", error.reason)
        if not self._closed:
            # After the PDUs: a message left half-received gets the DIMSE
            # timeout, an idle association the idle timeout.
            self._touch()

    def _frames(self, frames):
        for pdu_type, body in frames:
            if self._closed:
                return
            if pdu_type == pdu.P_DATA_TF:
                # Kept raw: the PDVs are walked without copies (iter_pdvs).
                if self.upper.state == "Sta6":
                    # Data transfer (Evt10 in Sta6 is DT-2: a P-DATA
                    # indication, same state): the machine is skipped on
                    # the hot path, with the same outcome.
                    self.upper.last_action = "DT-2"
                    self._p_data(body)
                else:
                    self._event("Evt10", body)
                continue
            try:
                obj = pdu.decode_pdu(pdu_type, body)
            except pdu.PDUError as e:
                self._event("Evt19", e.reason)
                return
            self._event(_EVENTS[pdu_type], obj)

    def connectionLost(self, reason=None):
        #: Why the connection ended (a TLS handshake failure, for one).
        self.lost_reason = reason
        self._cancel_timers()
        if not self._closed:
            self._closed = True
            self._event("Evt17")
        if not self.ended.called:
            self.ended.callback(None)

    # -- the state machine ------------------------------------------------

    def _event(self, name, obj=None):
        try:
            effects = self.upper.event(name, obj)
        except fsm.InvalidEvent:
            log.warn(
                "Association event {event} not valid in state {state}; aborting",
                event=name,
                state=self.upper.state,
            )
            self.abort(SERVICE_PROVIDER, 0)
            return
        for effect in effects:
            self._apply(effect)

    def _apply(self, effect):
        if isinstance(effect, fsm.SendPDU):
            if self.transport is not None and not self._closed:
                data = effect.pdu
                self.transport.write(data if isinstance(data, (bytes, bytearray)) else pdu.encode_pdu(data))
        elif isinstance(effect, fsm.StartARTIM):
            self._stop_artim()
            self._artim = self.clock.callLater(self.settings.artim_timeout, self._artim_expired)
        elif isinstance(effect, fsm.StopARTIM):
            self._stop_artim()
        elif isinstance(effect, fsm.CloseTransport):
            self._closed = True
            self._cancel_timers()
            if self.transport is not None:
                self.transport.loseConnection()
        elif isinstance(effect, fsm.Indication):
            self._indication(effect.kind, effect.pdu)

    def _indication(self, kind, obj):
        if kind == "associate_request":
            self.rq = obj
            answer, contexts = self.user.associate_requested(self, obj)
            if isinstance(answer, pdu.AssociateAC):
                self.contexts = contexts
                self.peer_max_pdu = obj.max_pdu_length
                self._ac = answer
                self._event("Evt7", answer)
                self.established = True
                self.user.established(self)
            else:
                self._event("Evt8", answer)
        elif kind == "associate_accept":
            self._ac = obj
            self.peer_max_pdu = obj.max_pdu_length
            self.established = True
            self.user.accepted(self, obj)
        elif kind == "associate_reject":
            self.user.rejected(self, obj)
        elif kind == "p_data":
            self._p_data(obj)
        elif kind == "release_request":
            self.user.release_requested(self)
            self._event("Evt14", pdu.ReleaseRP())
        elif kind == "release_collision":
            if self.requestor:
                self._event("Evt14", pdu.ReleaseRP())
        elif kind == "release_confirm":
            self.user.released(self)
            if not self.requestor and self.upper.state == "Sta12":
                self._event("Evt14", pdu.ReleaseRP())
        elif kind in ("abort", "provider_abort"):
            source = getattr(obj, "source", None)
            reason = getattr(obj, "reason", None)
            self.user.aborted(self, source, reason)

    def _p_data(self, body):
        feed = self.assembler.feed
        try:
            for context_id, control, data in pdu.iter_pdvs(body):
                if context_id not in self.contexts:
                    raise messages.MessageError(f"PDV on presentation context {context_id}, which was not accepted")
                for event in feed(context_id, control, data):
                    if isinstance(event, messages.DataFragment):
                        self.user.fragment(self, event)
                    else:
                        self.user.command(self, event)
        except pdu.PDUError as e:
            self._event("Evt19", e.reason)
        except messages.MessageError as e:
            log.warn("DIMSE protocol error from {peer}: {error}; aborting", peer=str(self.peer), error=str(e))
            self.abort(SERVICE_PROVIDER, 0)

    # -- timers -------------------------------------------------------------

    def _artim_expired(self):
        self._artim = None
        self._event("Evt18")

    def _stop_artim(self):
        if self._artim is not None and self._artim.active():
            self._artim.cancel()
        self._artim = None

    def _touch(self):
        if self._reading_paused:
            return
        settings = self.settings
        timeout = settings.idle_timeout
        if settings.dimse_timeout and self.assembler.in_progress:
            timeout = settings.dimse_timeout
        elif self._holds:
            # The peer waits for our answer: not idle.
            if self._idle is not None and self._idle.active():
                self._idle.cancel()
            self._idle = None
            return
        if not timeout:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.clock.callLater(timeout, self._idle_expired)

    def _idle_expired(self):
        self._idle = None
        if not self._closed:
            log.info("Association with {peer} silent for too long: aborting", peer=str(self.peer))
            self.abort(SERVICE_USER, 0)

    def _cancel_timers(self):
        self._stop_artim()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    # -- operations in progress ---------------------------------------------

    def hold(self):
        """
        An operation the peer asked for is in progress here (a C-FIND,
        C-GET or C-MOVE waiting for an upstream): the peer rightly sends
        nothing meanwhile, so the idle timer is off until L{release_hold}
        (the operation's own timeouts bound the wait).
        """
        self._holds += 1
        self._touch()

    def release_hold(self):
        if self._holds:
            self._holds -= 1
        if not self._holds and not self._closed:
            self._touch()

    # -- flow control -------------------------------------------------------

    def pause_reading(self):
        """
        Stop reading from the peer (a consumer is behind); the idle timer is
        suspended meanwhile: the wait is ours, not the peer's.
        """
        if self._reading_paused:
            return
        self._reading_paused = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.transport is not None and not self._closed:
            self.transport.pauseProducing()

    def resume_reading(self):
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self.transport is not None and not self._closed:
            self.transport.resumeProducing()
            self._touch()

    # -- user requests ------------------------------------------------------

    def _send_p_data(self, data, now=False):
        """
        Send one P-DATA-TF PDU (Evt9); in Sta6 (DT-1: send, same state)
        straight to the transport.  With C{now}, C{data} is a list of PDUs,
        sent to the socket at once when nothing waits before them
        (L{harmony.transport.write_now}).
        """
        if self.upper.state == "Sta6" and not self._closed:
            self.upper.last_action = "DT-1"
            if now:
                write_now(self.transport, data)
            else:
                self.transport.write(data)
        elif now:
            for one in data:
                self._event("Evt9", one)
        else:
            self._event("Evt9", data)

    def send_message(self, context_id, command, dataset=None, now=False):
        """
        Send one DIMSE message; a large data set (an iterable of chunks) is
        sent with backpressure from the transport.

        @param now: a message the peer waits for (a C-STORE-RQ or -RSP):
            its PDUs go to the socket at once, several per system call,
            rather than on the reactor's next turn.
        @return: Deferred[None] firing once everything was handed to the
            transport.
        """
        pdus = messages.fragment(context_id, command, dataset, self.peer_max_pdu)
        if dataset is None or isinstance(dataset, (bytes, bytearray, memoryview)):
            if now:
                self._send_p_data(list(pdus), True)
            else:
                for data in pdus:
                    self._send_p_data(data)
            return defer.succeed(None)
        return _PDUSender(self, pdus, now).start()

    def release(self):
        """
        Ask for an orderly release (requestor).

        @return: Deferred[None] firing when the association has ended.
        """
        if not self._closed and self.upper.state == "Sta6":
            self._event("Evt11", pdu.ReleaseRQ())
        # Otherwise it is being released, aborted or gone already.
        return self.ended

    def abort(self, source=SERVICE_USER, reason=0):
        """
        Abort the association (A-ABORT, then close).
        """
        state = self.upper.state
        if self._closed or state == "Sta1":
            return
        if state in ("Sta2", "Sta13"):
            # No association to abort (not yet, or no longer): drop the
            # connection; connectionLost takes the machine to Sta1.
            if self.transport is not None:
                self.transport.abortConnection()
            return
        self._event("Evt15", pdu.Abort(source, reason))


@implementer(IPushProducer)
class _PDUSender:
    """
    Writes the P-DATA-TF PDUs of one message while the transport accepts
    them.
    """

    def __init__(self, association, pdus, now=False):
        self._association = association
        self._pdus = iter(pdus)
        self._now = now
        self._paused = False
        self._done = defer.Deferred()

    def start(self):
        self._association.transport.registerProducer(self, True)
        self._pump()
        return self._done

    def _pump(self):
        association = self._association
        try:
            while not self._paused and not self._done.called:
                if association._closed:
                    raise AssociationAborted(message="association ended while sending")
                if self._now:
                    # Up to NOW_BATCH bytes of PDUs per system call.
                    data, size = [], 0
                    for pdu_bytes in self._pdus:
                        data.append(pdu_bytes)
                        size += len(pdu_bytes)
                        if size >= NOW_BATCH or len(data) >= NOW_BATCH_PDUS:
                            break
                    data = data or None
                else:
                    data = next(self._pdus, None)
                if data is None:
                    association.transport.unregisterProducer()
                    self._done.callback(None)
                    return
                association._send_p_data(data, self._now)
        except Exception as e:
            if association.transport is not None:
                association.transport.unregisterProducer()
            self._done.errback(e)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def stopProducing(self):
        self._paused = True
        if not self._done.called:
            self._done.errback(AssociationAborted(message="connection lost while sending"))
