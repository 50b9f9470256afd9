# -*- test-case-name: tests.unit.test_dimse_move_router -*-
"""
Receiving what a C-MOVE sends back to Harmony.

A C-MOVE-RQ (L{harmony.dimse.scu.ClientAssociation.move}) with Harmony's
own AE title as Move Destination makes the PACS open associations to one of
Harmony's store SCPs and send the instances as C-STORE sub-operations
(PS3.4 C.4.2.3).  The L{MoveRouter} is the process-wide registry of such
moves in flight: it allocates each move's Message ID and tells a store SCP
which move a C-STORE-RQ belongs to, so that every instance lands in that
move's storage and on its instance stream:

    incoming = router.expect("HARMONY", storage)
    move = assoc.move(identifier, "HARMONY", message_id=incoming.message_id)
    incoming.follow(move)          # optional: DIMSE timer in step, cancel
    move.result.addBoth(lambda r: incoming.fail(r.value) if isinstance(r, Failure) else incoming.finish())
    async for instance in incoming.instances: ...

Routing rule, for a C-STORE-RQ on an association whose called AE (the AE
the PACS called: us) is a move's destination AE:

  - it carries a Move Originator Message ID (0000,1031): it belongs to the
    move with that ID, provided its Move Originator AE Title (0000,1030),
    when present, is that destination AE too (we asked for it);
  - it carries none (some PACS omit the fields): it belongs to the one
    move for that destination expecting instances from the calling AE
    (C{source_aet} equal, or C{None}); none or several: no route.

A move's C{source_aet}, when given, must also match for the first rule.
Message IDs are per association in DICOM: the router, not an association,
allocates the IDs of moves, so that moves sent on different associations
never share one.

L{MoveStoreListener} is a store-only SCP for these instances: a C-STORE
that belongs to no move is refused (0x0124, data set discarded).  A
C{dicom_scp} endpoint can route them as well (L{StoreService} with the
router); its other C-STOREs go through its pipeline as usual.
"""

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from harmony.dimse import messages
from harmony.dimse import status as dimse_status
from harmony.dimse.pdu import validate_ae_title
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.store import StoreService
from harmony.dimse.substore import SubStoreService
from harmony.logs import logger
from harmony.storage.dicom import DEFAULT_LAYOUT
from harmony.streams import Stream

log = logger("harmony.dimse.move")

#: The answer to a C-STORE-RQ that belongs to no C-MOVE in flight (PS3.7
#: Annex C, Table C-5: 0124H "Refused: Not authorized").
NOT_OURS = dimse_status.NOT_AUTHORIZED
NOT_OURS_COMMENT = "No C-MOVE in progress for this instance"

#: The answer to a sub-operation of a move abandoned while it was being
#: received (L{IncomingMove.fail}).
ABANDONED = dimse_status.PROCESSING_FAILURE
ABANDONED_COMMENT = "The C-MOVE was abandoned by its requestor"

_MAX_MESSAGE_ID = 65535


class MoveRouter:
    """
    The in-flight C-MOVEs whose C-STORE sub-operations come back to
    Harmony's store SCPs (one router per process, shared by every store
    SCP and every retrieving backend).
    """

    def __init__(self):
        self._moves = {}  # destination AE -> {message ID: IncomingMove}
        self._last_id = {}  # destination AE -> the last message ID allocated
        self._paused = {}  # association -> the IncomingMoves keeping its reading paused

    def expect(self, destination_aet, storage, layout=DEFAULT_LAYOUT, fsync=False, source_aet=None, high_water=256,
               memory=None):
        """
        Register a move about to be sent: allocate its Message ID and get
        ready to receive its instances.

        @param destination_aet: the Move Destination AE title the C-MOVE-RQ
            names (the AE the PACS will call: one of Harmony's store SCPs).
        @param storage: an L{harmony.storage.interfaces.IStorage} the
            instances are written to.
        @param layout: the relpath template of stored files.
        @param fsync: make each file durable before answering its C-STORE.
        @param source_aet: the AE title the PACS calls from, when known:
            C-STOREs from another calling AE are not routed to this move.
        @param high_water: instances buffered for a slow consumer before
            reading from the associations delivering them is paused.
        @param memory: a L{harmony.dimse.substore.MemoryBudget} for
            instances delivered from memory (see
            L{harmony.dimse.scu.ClientAssociation.get}), or C{None}.
        @raise ValueError: an invalid AE title.
        @raise RuntimeError: 65535 moves to this destination are in flight.
        @rtype: L{IncomingMove}
        """
        validate_ae_title(destination_aet, "move destination")
        if source_aet is not None:
            validate_ae_title(source_aet, "source AE title")
        moves = self._moves.get(destination_aet)
        if moves is None:
            moves = self._moves[destination_aet] = {}
        message_id = self._allocate(destination_aet, moves)
        incoming = IncomingMove(
            self, destination_aet, message_id, storage, layout, fsync, source_aet, high_water, memory
        )
        moves[message_id] = incoming
        return incoming

    def _allocate(self, destination_aet, moves):
        if len(moves) >= _MAX_MESSAGE_ID:
            raise RuntimeError(f"{_MAX_MESSAGE_ID} C-MOVEs to {destination_aet} are in flight already")
        message_id = self._last_id.get(destination_aet, 0)
        while True:
            message_id = message_id % _MAX_MESSAGE_ID + 1
            if message_id not in moves:
                self._last_id[destination_aet] = message_id
                return message_id

    def in_flight(self, destination_aet=None):
        """
        The number of moves registered (to C{destination_aet}, or to any).
        """
        if destination_aet is not None:
            return len(self._moves.get(destination_aet, ()))
        return sum(len(moves) for moves in self._moves.values())

    def route(self, association, command):
        """
        The store service of the move a C-STORE-RQ belongs to, or C{None}
        (see the module docstring for the rule).

        @param association: the (acceptor) association it arrived on.
        @param command: its L{harmony.dimse.messages.Command}.
        """
        rq = association.rq
        moves = self._moves.get(rq.called_aet)
        if not moves:
            return None
        fields = command.fields
        message_id = fields.get("MoveOriginatorMessageID")
        if message_id is not None:
            originator = fields.get("MoveOriginatorApplicationEntityTitle")
            if originator and originator != rq.called_aet:
                return None
            incoming = moves.get(message_id)
            if incoming is None or (incoming.source_aet is not None and incoming.source_aet != rq.calling_aet):
                return None
            return incoming.service
        found = None
        calling = rq.calling_aet
        for incoming in moves.values():
            if incoming.source_aet is None or incoming.source_aet == calling:
                if found is not None:
                    return None  # ambiguous
                found = incoming
        return found.service if found is not None else None

    def _remove(self, incoming):
        moves = self._moves.get(incoming.destination_aet)
        if moves is not None and moves.get(incoming.message_id) is incoming:
            del moves[incoming.message_id]
            if not moves:
                del self._moves[incoming.destination_aet]

    # -- reading paused on behalf of several moves ----------------------------

    def _pause_reading(self, association, holder):
        holders = self._paused.get(association)
        if holders is None:
            holders = self._paused[association] = set()
            association.pause_reading()
        holders.add(holder)

    def _resume_reading(self, association, holder):
        holders = self._paused.get(association)
        if holders is None or holder not in holders:
            return
        holders.discard(holder)
        if not holders:
            del self._paused[association]
            association.resume_reading()


class IncomingMove:
    """
    One C-MOVE in flight whose instances come back to Harmony (made by
    L{MoveRouter.expect}).

    @ivar message_id: the Message ID to send the C-MOVE-RQ with.
    @ivar destination_aet: the Move Destination AE title.
    @ivar source_aet: the calling AE expected, or C{None}.
    @ivar instances: a L{Stream} of L{harmony.envelope.DicomInstance}, one
        per sub-operation stored, each committed to the storage (C{path}
        set) before it is delivered and before its C-STORE-RSP (Success)
        is sent.  It finishes after L{finish} once no sub-operation is
        still being received or written, and fails on L{fail}.  Above
        C{high_water} instances, reading from the associations delivering
        them is paused.  Cancelling it cancels the followed operation (see
        L{follow}); instances still arriving are stored, not delivered.
    @ivar received: sub-operations stored.
    @ivar refused: sub-operations not stored (answered with a failure
        status, or cut off by the end of their association).
    @ivar service: the store service answering its sub-operations.
    """

    def __init__(self, router, destination_aet, message_id, storage, layout, fsync, source_aet, high_water,
                 memory=None):
        self.router = router
        self.destination_aet = destination_aet
        self.message_id = message_id
        self.source_aet = source_aet
        self.storage = storage
        self.instances = Stream(high_water=high_water)
        self.service = _MoveSubStoreService(self, storage, layout, fsync=fsync, sender="calling", memory=memory)
        self.received = 0
        self.refused = 0
        self._subs = []
        self._associations = set()
        self._operation = None
        self._paused = False
        self._finishing = False
        self._ended = False
        self.instances.attach_producer(_Backpressure(self))

    @property
    def active(self):
        """
        C{True} until the move is over (its stream finished or failed).
        """
        return not self._ended

    def follow(self, operation):
        """
        Keep a C-MOVE operation (L{harmony.dimse.scu.MoveOperation}) in
        step with the instances: each sub-operation received restarts its
        DIMSE timer, the timer is suspended while reading is paused for a
        slow consumer (the PACS waits for us then), and cancelling
        L{instances} cancels the move (C-CANCEL-RQ).  Ending this object
        stays the caller's job (L{finish} after the final response,
        L{fail} when the operation fails).
        """
        self._operation = operation
        if self._paused:
            operation.suspend_timeout()

    def finish(self):
        """
        The C-MOVE's final response has arrived: no more sub-operations
        are routed here, and the stream finishes once those being received
        or written are done.
        """
        if self._ended or self._finishing:
            return
        self._finishing = True
        self.router._remove(self)
        self._maybe_end()

    def fail(self, error):
        """
        Give up: sub-operations being received or written are discarded
        (nothing of them stays in the storage) and answered with a failure
        status (L{ABANDONED}); the stream fails with C{error} after the
        instances already delivered.
        """
        if self._ended:
            return
        self._ended = True
        self.router._remove(self)
        subs, self._subs = self._subs, []
        for operation in subs:
            operation.cancel(ABANDONED, ABANDONED_COMMENT)
        self._release()
        self.instances.fail(error)

    # -- sub-operations (told by SubStoreService) ---------------------------

    def _sub_started(self, operation, association):
        self._subs.append(operation)
        if association not in self._associations:
            self._associations.add(association)
            if self._paused:
                self.router._pause_reading(association, self)
        self._keep_alive()

    def _sub_stored(self, operation, instance):
        self.received += 1
        if not self._ended:
            self.instances.write(instance)

    def _sub_done(self, operation, status):
        if status != dimse_status.SUCCESS:
            self.refused += 1
        self._sub_ended(operation)

    def _sub_aborted(self, operation):
        self.refused += 1
        self._sub_ended(operation)

    def _sub_ended(self, operation):
        if operation in self._subs:
            self._subs.remove(operation)
        self._keep_alive()
        self._maybe_end()

    def _keep_alive(self):
        operation = self._operation
        if operation is not None and not self._ended and not self._paused:
            operation.keep_alive()

    # -- ending ---------------------------------------------------------------

    def _maybe_end(self):
        if self._finishing and not self._subs and not self._ended:
            self._ended = True
            self._release()
            self.instances.finish()

    def _release(self):
        if self._paused:
            self._resume()
        self._operation = None
        self._associations.clear()
        self.service.drop_spares()

    # -- backpressure ---------------------------------------------------------

    def _pause(self):
        if self._paused or self._ended:
            return
        self._paused = True
        for association in self._associations:
            self.router._pause_reading(association, self)
        if self._operation is not None:
            self._operation.suspend_timeout()

    def _resume(self):
        if not self._paused:
            return
        self._paused = False
        for association in list(self._associations):
            self.router._resume_reading(association, self)
        if self._operation is not None:
            self._operation.resume_timeout()

    def _cancelled(self):
        self._resume()
        if self._operation is not None:
            self._operation.cancel()


@implementer(IPushProducer)
class _Backpressure:
    """
    The producer an incoming move's instance stream pauses: reading from
    the associations delivering its sub-operations.
    """

    def __init__(self, incoming):
        self._incoming = incoming

    def pauseProducing(self):
        self._incoming._pause()

    def resumeProducing(self):
        self._incoming._resume()

    def stopProducing(self):
        self._incoming._cancelled()


class _MoveSubStoreService(SubStoreService):
    """
    The store service of one incoming move: the move learns about each
    sub-operation it will be told the end of.
    """

    def start(self, association, context, command):
        operation = SubStoreService.start(self, association, context, command)
        if operation is not None and not operation._answered:
            self.owner._sub_started(operation, association)
        return operation


class RoutedStoreService(StoreService):
    """
    The C-STORE service of L{MoveStoreListener}: a C-STORE-RQ the router
    routes goes to its move; any other is refused with L{NOT_OURS} (its
    data set read and discarded, nothing stored).
    """

    def __init__(self, router, storage=None, layout=DEFAULT_LAYOUT, fsync=False):
        StoreService.__init__(self, storage, layout, fsync=fsync, pipeline=None, router=router)

    def _start(self, association, context, command):
        log.warn(
            "C-STORE-RQ from {calling} to {called} belongs to no C-MOVE in progress: refused",
            calling=association.rq.calling_aet,
            called=association.rq.called_aet,
        )
        refusal = _Refusal(association, context, command)
        if not command.has_dataset:
            refusal.finish()
            return None
        return refusal


class _Refusal:
    """
    A C-STORE-RQ refused: its data set fragments are dropped, then it is
    answered.
    """

    def __init__(self, association, context, command):
        self.association = association
        self.context = context
        self.fields = command.fields

    def fragment(self, data):
        pass

    def finish(self):
        association = self.association
        if association._closed:
            return
        fields = self.fields
        rsp = messages.store_rsp(
            fields.get("MessageID", 0),
            fields.get("AffectedSOPClassUID") or self.context.abstract_syntax,
            fields.get("AffectedSOPInstanceUID") or "",
            NOT_OURS,
            NOT_OURS_COMMENT,
        )
        association.send_message(self.context.id, rsp)

    def aborted(self, association):
        pass


class MoveStoreListener(Service):
    """
    A store-only DICOM SCP receiving the instances of C-MOVEs Harmony asked
    for (C-STORE of every storage SOP class in the common transfer
    syntaxes, and C-ECHO); each C-STORE is routed to its move by
    C{router}, any other is refused (L{NOT_OURS}).

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param ae_title: our AE title (the move destination); associations
        calling another are rejected.
    @param port: the TCP port (0: any free one, see L{port}).
    @param bind_addr: the interface address to listen on.
    @param router: the L{MoveRouter}.
    @param storage: the storage of the listener's own store service; it
        writes nothing there itself (each instance goes to its move's
        storage), so it may be C{None}.
    @param layout: that service's relpath template.
    @param settings: L{harmony.dimse.association.AssociationSettings}.
    @param max_associations: concurrent associations accepted.
    @param calling_aets: calling AE titles allowed (empty: any).
    @param tls: C{None} for plain TCP, or DICOM TLS: an
        C{IOpenSSLServerConnectionCreator} (L{harmony.tls.server_options}).

    @ivar factory: the L{DicomServerFactory}.
    @ivar port: the listening port's C{IListeningPort} once started.
    """

    def __init__(self, reactor, ae_title, port, bind_addr="0.0.0.0", router=None, storage=None,
                 layout=DEFAULT_LAYOUT, settings=None, max_associations=32, calling_aets=(), tls=None):
        from harmony.endpoints.dicom_scp import DEFAULT_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES

        if router is None:
            raise ValueError("a MoveStoreListener needs the MoveRouter")
        validate_ae_title(ae_title, "AE title")
        self.reactor = reactor
        self.ae_title = ae_title
        self.port_number = port
        self.bind_addr = bind_addr
        self.router = router
        self.tls = tls
        syntaxes = {messages.VERIFICATION_SOP_CLASS: ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]}
        for sop_class in STORAGE_SOP_CLASSES:
            syntaxes[sop_class] = list(DEFAULT_TRANSFER_SYNTAXES)
        policy = SCPPolicy(
            ae_title=ae_title,
            syntaxes=syntaxes,
            require_called_aet=True,
            allowed_calling_aets=calling_aets,
            max_associations=max_associations,
        )
        self.store_service = RoutedStoreService(router, storage, layout)
        self.factory = DicomServerFactory(reactor, policy, settings, {messages.C_STORE_RQ: self.store_service})
        self.port = None
        self.setName(f"move-store-scp:{ae_title}")

    def startService(self):
        """
        Start listening.

        @return: Deferred firing once listening, or failing when listening
            fails later; a failure known at once (the port is taken: TCP
            listens synchronously) is raised, as
            C{StreamServerEndpointService} does, so that an application
            starting this service fails at startup (wrap the call in
            C{maybeDeferred} for a Deferred either way).
        """
        Service.startService(self)
        if self.tls is None:
            description = f"tcp:port={self.port_number}:interface={endpoints.quoteStringArgument(self.bind_addr)}"
            endpoint = endpoints.serverFromString(self.reactor, description)
        else:
            from harmony.tls import server_endpoint

            endpoint = server_endpoint(
                self.reactor, self.bind_addr, self.port_number, self.tls, label=f"C-MOVE store SCP {self.ae_title}"
            )
        d = endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            return None

        def failed(failure):
            Service.stopService(self)
            if synchronous:
                early.append(failure)
                return None
            return failure

        early = []
        synchronous = True
        d.addCallbacks(listening, failed)
        synchronous = False
        if early:
            early[0].raiseException()
        return d

    def stopService(self):
        """
        Stop listening; associations in progress go on until they end.

        @return: Deferred firing once the port is closed.
        """
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
