# -*- test-case-name: tests.unit.test_dimse_scu -*-
"""
The DICOM client (SCU): Deferred-based associations on Harmony's own upper
layer.

    client = DicomClient(reactor, local_aet="HARMONY_SCU")
    assoc = await client.associate("127.0.0.1", 104, "PACS", [(VERIFICATION, [IMPLICIT_LE])])
    status = await assoc.echo()
    await assoc.release()

C-FIND streams its matches as they arrive:

    find = assoc.find(identifier, model="study")
    async for match in find.matches:     # pydicom Datasets
        ...
    status = await find.result           # the final DimseStatus

C-GET negotiates the SCP role for the storage SOP classes and writes each
C-STORE sub-operation into a storage as it arrives:

    assoc = await client.associate_for_get(host, port, "PACS", [(CT_IMAGE, [EXPLICIT_LE, IMPLICIT_LE])])
    get = assoc.get(identifier, model="study", storage=storage)
    async for instance in get.instances:  # harmony.envelope.DicomInstance
        ...
    status = await get.result            # counts in status.fields

C-MOVE asks the peer to send the instances to a move destination AE on
associations of its own; the operation follows the responses (to receive
the instances here, see L{harmony.dimse.move.MoveRouter}):

    assoc = await client.associate_for_move(host, port, "PACS")
    move = assoc.move(identifier, "HARMONY", model="study")
    move.on_progress = lambda counts: ...   # remaining/completed/failed/warning
    status = await move.result           # counts in status.fields
"""

import struct
import zlib

import attr
from OpenSSL import SSL
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from zope.interface import implementer

from harmony import __version__
from harmony.dimse import messages, pdu
from harmony.dimse import status as dimse_status
from harmony.dimse.association import (
    Association,
    AssociationAborted,
    AssociationRejected,
    AssociationSettings,
)
from harmony.dimse.negotiation import NegotiationError, contexts_for, negotiate_as_requestor
from harmony.logs import logger
from harmony.streams import Stream

log = logger("harmony.dimse.scu")

#: Harmony's implementation class UID (under the UUID-derived 2.25 root) and
#: version name, sent in every A-ASSOCIATE.
IMPLEMENTATION_CLASS_UID = "2.25.266364387364405356263414298946427465857"
IMPLEMENTATION_VERSION_NAME = f"HARMONY_{__version__}"[:16]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: Query/Retrieve information models for C-FIND (PS3.4 C.6).
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
FIND_MODELS = {"patient": PATIENT_ROOT_FIND, "study": STUDY_ROOT_FIND}

#: Query/Retrieve information models for C-GET (PS3.4 C.6).
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
GET_MODELS = {"patient": PATIENT_ROOT_GET, "study": STUDY_ROOT_GET}

#: Query/Retrieve information models for C-MOVE (PS3.4 C.6).
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
MOVE_MODELS = {"patient": PATIENT_ROOT_MOVE, "study": STUDY_ROOT_MOVE}

#: The sub-operation counts of C-GET/C-MOVE responses (PS3.7 9.1.3.1).
SUBOPERATION_COUNTS = (
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)

#: The C-STORE-RSP status for a sub-operation the peer may not ask of us: a
#: C-STORE-RQ on a presentation context where the SCP role was not
#: negotiated (PS3.7 D.3.3.4), or outside any C-GET.  PS3.7 Annex C, Table
#: C-5 (general failure statuses): 0124H "Refused: Not authorized".  (0xA702
#: "Unable to perform sub-operations", PS3.4 C.4.3.1.4, is a C-GET-RSP
#: status, not a C-STORE one.)
SUBOPERATION_REFUSED = dimse_status.NOT_AUTHORIZED

#: C-FIND statuses (PS3.4 C.4.1.1.4, PS3.7 C).
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00

#: The largest identifier accepted in one C-FIND response; a larger one
#: aborts the association (identifiers are a few hundred bytes).
MAX_IDENTIFIER_LENGTH = 16 * 1024 * 1024


class DimseTimeout(Exception):
    """
    The peer did not answer a DIMSE request in time (the association is
    aborted).
    """


class TLSHandshakeFailed(AssociationAborted):
    """
    The TLS handshake with the peer failed (its certificate did not verify,
    ours was refused, no common version or cipher): no association.
    """

    def __init__(self, reason):
        super().__init__(message=f"TLS handshake failed: {reason}")
        self.tls_reason = reason


@attr.s(frozen=True)
class DimseStatus:
    """
    The final status of a DIMSE operation.
    """

    status = attr.ib()
    error_comment = attr.ib(default=None)
    fields = attr.ib(factory=dict, eq=False, repr=False)

    @property
    def ok(self):
        return self.status == 0x0000

    @property
    def failed(self):
        """
        C{True} for a failure status (not success, warning, cancel or
        pending).
        """
        return dimse_status.is_failure(self.status)

    @property
    def warning(self):
        return self.status == 0x0001 or (self.status & 0xF000) == 0xB000

    @property
    def cancelled(self):
        return self.status == CANCEL


class InvalidResponse(Exception):
    """
    The peer sent a response Harmony cannot use (an identifier that is too
    large or does not decode, a status missing); the association was
    aborted.
    """


class _ClientUser:
    """
    The association user of a requestor: matches responses to requests.
    """

    def __init__(self, client_association):
        self._ca = client_association

    def accepted(self, association, ac):
        self._ca._accepted(ac)

    def rejected(self, association, rj):
        self._ca._fail(AssociationRejected(rj.result, rj.source, rj.reason))

    def command(self, association, command):
        self._ca._response(command)

    def fragment(self, association, fragment):
        # Only C-FIND responses carry a data set here; any other is aborted.
        self._ca._fragment(fragment)

    def release_requested(self, association):
        pass

    def released(self, association):
        pass

    def aborted(self, association, source, reason):
        self._ca._fail(AssociationAborted(source, reason))

    def established(self, association):
        pass

    def associate_requested(self, association, rq):
        raise RuntimeError("a requestor does not receive A-ASSOCIATE-RQ")


class ClientAssociation:
    """
    An association this process requested.

    @ivar contexts: the accepted contexts by ID.
    """

    def __init__(self, client, rq, dimse_timeout):
        self._client = client
        self._rq = rq
        self._dimse_timeout = dimse_timeout
        self._ready = defer.Deferred()
        self._pending = {}
        self._operations = {}  # message ID -> FindOperation (several responses)
        self._receiving = None  # who takes the data set fragments now
        self._next_id = 0
        self.association = None
        self.contexts = {}
        self._error = None

    # -- association events -----------------------------------------------

    def _accepted(self, ac):
        try:
            self.contexts = negotiate_as_requestor(self._rq.contexts, ac.contexts, self._rq.roles, ac.roles)
        except NegotiationError as e:
            log.warn("Association answer does not match the request: {error}", error=str(e))
            self.association.abort(2, 6)
            self._fail(AssociationAborted(2, 6, str(e)))
            return
        self.association.contexts = self.contexts
        if not self._ready.called:
            self._ready.callback(self)

    def _fail(self, error):
        if self._error is None:
            self._error = error
        if not self._ready.called:
            self._ready.errback(error)
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(error)
        self._receiving = None
        operations, self._operations = self._operations, {}
        for operation in operations.values():
            operation._failed(error)

    def _ended(self, result):
        # The connection is gone.  After our own A-ABORT (a DIMSE timeout,
        # the idle timer, a protocol error) no indication comes back: what
        # is still pending fails now.
        if self._pending or self._operations:
            self._fail(AssociationAborted(message="the association ended"))
        return result

    def _protocol_error(self, message):
        """
        Abort the association for a peer's protocol error; what is pending
        fails with L{AssociationAborted}.
        """
        log.warn("DIMSE protocol error from the peer: {error}; aborting", error=message)
        self.association.abort(2, 0)
        self._fail(AssociationAborted(2, 0, message))

    def _response(self, command):
        fields = command.fields
        if command.command_field == messages.C_STORE_RQ:
            self._store_request(command)
            return
        message_id = fields.get("MessageIDBeingRespondedTo")
        operation = self._operations.get(message_id)
        if operation is not None:
            operation._response(command)
            return
        entry = self._pending.pop(message_id, None)
        if entry is None:
            log.warn("Response to unknown message {id}: aborting", id=message_id)
            self.association.abort(2, 0)
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(DimseStatus(fields.get("Status", 0xC000), fields.get("ErrorComment"), fields))

    def _fragment(self, fragment):
        receiver = self._receiving
        if receiver is None:
            self._protocol_error("a data set nobody expects")
            return
        if fragment.last:
            self._receiving = None
        receiver.fragment(fragment.data, fragment.last)

    def _store_request(self, command):
        """
        A C-STORE-RQ from the peer: a sub-operation of the C-GET in
        progress, answered by it when we have the SCP role on its context;
        otherwise refused (L{SUBOPERATION_REFUSED}).
        """
        association = self.association
        context = association.contexts.get(command.context_id)
        get = None
        for operation in self._operations.values():
            if isinstance(operation, GetOperation) and operation._final is None:
                get = operation
                break
        if get is not None and context is not None and context.requestor_scp:
            get._store_request(context, command)
            return
        fields = command.fields
        log.warn(
            "C-STORE-RQ from the peer {why}: refused",
            why="outside any C-GET" if get is None else "on a context without the SCP role",
        )
        if command.has_dataset:
            self._receiving = _DISCARD
        if get is not None:
            get.refused += 1
            get._start_timer()
        rsp = messages.store_rsp(
            fields.get("MessageID", 0),
            fields.get("AffectedSOPClassUID") or (context.abstract_syntax if context else ""),
            fields.get("AffectedSOPInstanceUID") or "",
            SUBOPERATION_REFUSED,
            "SCP role not negotiated for this SOP class" if get is not None else "No C-GET in progress",
        )
        association.send_message(command.context_id, rsp)

    # -- requests -----------------------------------------------------------

    def context_for(self, abstract_syntax, transfer_syntax=None):
        """
        The accepted context for an abstract syntax (and transfer syntax).

        @raise LookupError: none was accepted.
        """
        for context in self.contexts.values():
            if context.abstract_syntax == abstract_syntax and context.requestor_scu:
                if transfer_syntax is None or context.transfer_syntax == transfer_syntax:
                    return context
        raise LookupError(
            f"no accepted presentation context for {abstract_syntax}"
            + (f" with {transfer_syntax}" if transfer_syntax else "")
        )

    def _message_id(self):
        """
        The next message ID of this association (1..65535, wrapping), one
        that no request in progress uses (a caller may have picked IDs:
        L{move}).
        """
        operations, pending = self._operations, self._pending
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in operations and self._next_id not in pending:
                return self._next_id
        raise RuntimeError("every message ID is in use on this association")

    def _request(self, context_id, fields, dataset=None):
        if self._error is not None:
            return defer.fail(self._error)
        if self.association._closed:
            return defer.fail(AssociationAborted(message="the association has ended"))
        message_id = fields["MessageID"]
        d = defer.Deferred()
        timer = self._client.reactor.callLater(self._dimse_timeout, self._timed_out, message_id)
        self._pending[message_id] = (d, timer)
        # Waiting for the peer's answer (or sending a large data set) is
        # not idleness: the DIMSE timeout bounds the wait.
        association = self.association
        association.hold()

        def released(result):
            association.release_hold()
            return result

        d.addBoth(released)
        sent = self.association.send_message(context_id, messages.encode_command(fields), dataset, now=True)
        sent.addErrback(lambda f: self._fail(f.value) if self._pending else None)
        return d

    def _timed_out(self, message_id):
        entry = self._pending.pop(message_id, None)
        if entry is not None:
            entry[0].errback(DimseTimeout(f"no response to message {message_id} in {self._dimse_timeout}s"))
            self.association.abort(0, 0)

    def echo(self):
        """
        C-ECHO.

        @return: Deferred[L{DimseStatus}]
        """
        context = self.context_for(messages.VERIFICATION_SOP_CLASS)
        fields = {
            "AffectedSOPClassUID": messages.VERIFICATION_SOP_CLASS,
            "CommandField": messages.C_ECHO_RQ,
            "MessageID": self._message_id(),
            "CommandDataSetType": messages.NO_DATASET,
        }
        return self._request(context.id, fields)

    def store(self, sop_class_uid, sop_instance_uid, transfer_syntax, dataset, priority=0, move_originator=None):
        """
        C-STORE of an encoded data set (bytes, or an iterable of chunks
        streamed with backpressure) in C{transfer_syntax}.

        @param move_originator: C{(aet, message_id)} for C-MOVE sub-operations.
        @return: Deferred[L{DimseStatus}]
        """
        context = self.context_for(sop_class_uid, transfer_syntax)
        fields = {
            "AffectedSOPClassUID": sop_class_uid,
            "CommandField": messages.C_STORE_RQ,
            "MessageID": self._message_id(),
            "Priority": priority,
            "CommandDataSetType": messages.DATASET_PRESENT,
            "AffectedSOPInstanceUID": sop_instance_uid,
        }
        if move_originator is not None:
            fields["MoveOriginatorApplicationEntityTitle"] = move_originator[0]
            fields["MoveOriginatorMessageID"] = move_originator[1]
        return self._request(context.id, fields, dataset)

    def store_file(self, path, priority=0, move_originator=None, chunk_size=256 * 1024):
        """
        C-STORE of a DICOM Part 10 file, its data set streamed from disk in
        chunks (never read whole).

        @return: Deferred[L{DimseStatus}]
        """
        try:
            header = read_part10_header(path)
            context = self.context_for(header.sop_class_uid, header.transfer_syntax)
        except (OSError, ValueError, LookupError) as e:
            return defer.fail(e)
        return self.store(
            header.sop_class_uid,
            header.sop_instance_uid,
            context.transfer_syntax,
            file_chunks(path, header.dataset_offset, chunk_size),
            priority=priority,
            move_originator=move_originator,
        )

    def find(self, identifier, model="study", priority=0, high_water=256):
        """
        C-FIND (PS3.4 C.4.1, PS3.7 9.1.2).

        @param identifier: a pydicom C{Dataset} with QueryRetrieveLevel and
            the keys to match and return; encoded in the transfer syntax of
            the accepted context.
        @param model: C{"study"} (Study Root), C{"patient"} (Patient Root)
            or the SOP class UID of another C-FIND information model.
        @param priority: 0 medium, 1 high, 2 low.
        @param high_water: matches buffered before reading from the peer is
            paused (see L{FindOperation}).
        @raise LookupError: no accepted context for the model.
        @raise ValueError: an unknown model, no QueryRetrieveLevel, or an
            identifier that cannot be encoded.
        @rtype: L{FindOperation}
        """
        sop_class = FIND_MODELS.get(model, model)
        if "." not in sop_class:
            raise ValueError(f"unknown C-FIND model {model!r} (expected one of {sorted(FIND_MODELS)} or a UID)")
        if "QueryRetrieveLevel" not in identifier:
            raise ValueError("a C-FIND identifier needs a QueryRetrieveLevel")
        return self._query(
            sop_class, messages.C_FIND_RQ, identifier, priority,
            lambda context, message_id: FindOperation(self, context, message_id, high_water),
        )

    def get(self, identifier, model="study", priority=0, storage=None, layout="{study}/{series}/{sop}.dcm",
            fsync=False, high_water=256, memory=None):
        """
        C-GET (PS3.4 C.4.3, PS3.7 9.1.3): the peer sends the matching
        instances as C-STORE sub-operations on this association; each is
        written into C{storage} as its fragments arrive and delivered on
        L{GetOperation.instances} once committed.

        The association must have been negotiated with the GET model and
        the SCP role for the storage SOP classes expected (see
        L{DicomClient.associate_for_get}).

        @param identifier: a pydicom C{Dataset} with QueryRetrieveLevel and
            the unique keys of what to retrieve.
        @param model: C{"study"}, C{"patient"} or a C-GET SOP class UID.
        @param storage: an L{harmony.storage.interfaces.IStorage} the
            instances are written to (required).
        @param layout: the relpath template of stored files.
        @param fsync: make each file durable before answering its
            sub-operation.
        @param high_water: instances buffered before reading from the peer
            is paused.
        @param memory: a L{harmony.dimse.substore.MemoryBudget}: instances
            that fit in it are delivered from memory (C{data} the Part 10
            bytes, no C{path}; C{dispose} gives their bytes back), the
            others stored; C{None}: every instance is stored.
        @raise LookupError: no accepted context for the model.
        @raise ValueError: an unknown model, no QueryRetrieveLevel, no
            storage, or an identifier that cannot be encoded.
        @rtype: L{GetOperation}
        """
        sop_class = GET_MODELS.get(model, model)
        if "." not in sop_class:
            raise ValueError(f"unknown C-GET model {model!r} (expected one of {sorted(GET_MODELS)} or a UID)")
        if "QueryRetrieveLevel" not in identifier:
            raise ValueError("a C-GET identifier needs a QueryRetrieveLevel")
        if storage is None:
            raise ValueError("a C-GET needs a storage for the instances it receives")
        return self._query(
            sop_class, messages.C_GET_RQ, identifier, priority,
            lambda context, message_id: GetOperation(
                self, context, message_id, storage, layout, fsync, high_water, memory
            ),
        )

    def move(self, identifier, destination, model="study", priority=0, message_id=None):
        """
        C-MOVE (PS3.4 C.4.2, PS3.7 9.1.4): the peer sends what
        C{identifier} names to the AE C{destination} as C-STORE
        sub-operations on associations of its own.

        @param identifier: a pydicom C{Dataset} with QueryRetrieveLevel and
            the unique keys of what to move.
        @param destination: the Move Destination AE title (one the peer
            knows).
        @param model: C{"study"}, C{"patient"} or a C-MOVE SOP class UID.
        @param priority: 0 medium, 1 high, 2 low.
        @param message_id: the C-MOVE-RQ's Message ID (1..65535), when the
            caller allocates it (L{harmony.dimse.move.MoveRouter} does, so
            that the sub-operations coming back can be routed); C{None}:
            the association's next one.
        @raise LookupError: no accepted context for the model.
        @raise ValueError: an unknown model, an invalid destination, no
            QueryRetrieveLevel, an identifier that cannot be encoded, or a
            message ID out of range or in use on this association.
        @rtype: L{MoveOperation}
        """
        sop_class = MOVE_MODELS.get(model, model)
        if "." not in sop_class:
            raise ValueError(f"unknown C-MOVE model {model!r} (expected one of {sorted(MOVE_MODELS)} or a UID)")
        pdu.validate_ae_title(destination, "move destination")
        if "QueryRetrieveLevel" not in identifier:
            raise ValueError("a C-MOVE identifier needs a QueryRetrieveLevel")
        if message_id is not None:
            if not isinstance(message_id, int) or not 1 <= message_id <= 65535:
                raise ValueError(f"message ID {message_id!r} is not in 1..65535")
            if message_id in self._operations or message_id in self._pending:
                raise ValueError(f"message ID {message_id} is in use on this association")
        return self._query(
            sop_class, messages.C_MOVE_RQ, identifier, priority,
            lambda context, mid: MoveOperation(self, context, mid, destination),
            extra_fields={"MoveDestination": destination}, message_id=message_id,
        )

    def _query(self, sop_class, command_field, identifier, priority, make_operation, extra_fields=None,
               message_id=None):
        """
        Send a C-FIND/C-GET/C-MOVE request and register the operation that
        will take its responses.

        @param make_operation: C{(context, message_id) -> operation}.
        @param extra_fields: more command fields (Move Destination).
        @param message_id: the request's message ID (C{None}: the next).
        """
        context = self.context_for(sop_class)
        data = encode_identifier(identifier, context.transfer_syntax)
        fields = {
            "AffectedSOPClassUID": sop_class,
            "CommandField": command_field,
            "MessageID": message_id if message_id is not None else self._message_id(),
            "Priority": priority,
            "CommandDataSetType": messages.DATASET_PRESENT,
        }
        if extra_fields:
            fields.update(extra_fields)
        operation = make_operation(context, fields["MessageID"])
        if self._error is not None:
            operation._failed(self._error)
        elif self.association._closed:
            operation._failed(AssociationAborted(message="the association has ended"))
        else:
            self._operations[operation.message_id] = operation
            operation._hold()
            operation._start_timer()
            sent = self.association.send_message(context.id, messages.encode_command(fields), data)
            sent.addErrback(lambda f: self._fail(f.value) if not operation._done else None)
        return operation

    @property
    def reusable(self):
        """
        C{True} when the association is up, healthy and has nothing in
        progress: another operation may use it (see
        L{harmony.dimse.pool.AssociationPool}).
        """
        association = self.association
        return (
            self._error is None
            and association is not None
            and association.established
            and not association._closed
            and association.upper.state == "Sta6"
            and not self._pending
            and not self._operations
            and self._receiving is None
        )

    def release(self):
        """
        Orderly release.

        @return: Deferred[None] firing when the connection is closed.
        """
        return self.association.release()

    def abort(self):
        self.association.abort(0, 0)
        # No A-ABORT indication comes back for our own abort: fail what is
        # pending now rather than at its DIMSE timeout.
        self._fail(AssociationAborted(0, 0, "association aborted by this side"))
        return self.association.ended


@implementer(IPushProducer)
class _Backpressure:
    """
    The producer a find's matches stream pauses: reading from the
    association's transport, and the operation's DIMSE timer with it (the
    wait is ours, not the peer's).  A consumer that cancels the stream
    cancels the find (C-CANCEL-RQ).
    """

    def __init__(self, operation):
        self._operation = operation
        self.paused = False

    def _association(self):
        return self._operation._ca.association

    def pauseProducing(self):
        operation = self._operation
        if operation._done or self.paused:
            return
        self.paused = True
        operation._stop_timer()
        association = self._association()
        if association is not None:
            association.pause_reading()

    def resumeProducing(self):
        if not self.paused:
            return
        self.paused = False
        association = self._association()
        if association is not None:
            association.resume_reading()
        if not self._operation._done:
            self._operation._start_timer()

    def stopProducing(self):
        self.resumeProducing()
        self._operation.cancel()


class _Operation:
    """
    A request answered by one or more responses (C-FIND, C-GET, C-MOVE):
    the DIMSE timer between responses, C-CANCEL and the final result.

    @ivar result: Deferred[L{DimseStatus}] (see the subclasses).
    @ivar message_id: the request's message ID.
    @ivar context: the presentation context used.
    @ivar cancel_requested: C{True} once L{cancel} sent a C-CANCEL-RQ.
    """

    #: The DIMSE service, for messages.
    _kind = "DIMSE"
    #: Whether the association's idle timer is held for this operation.
    _held = False

    def __init__(self, client_association, context, message_id):
        self._ca = client_association
        self.context = context
        self.message_id = message_id
        self.result = defer.Deferred()
        self.cancel_requested = False
        self._done = False
        self._timer = None

    # -- the DIMSE timer --------------------------------------------------

    def _timer_suspended(self):
        """
        C{True} while the wait is ours, not the peer's (no timer then).
        """
        return False

    def _start_timer(self):
        """
        Start the DIMSE timer, or restart it when it runs.
        """
        if self._done or self._timer_suspended():
            return
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(self._ca._dimse_timeout)
        else:
            self._timer = self._ca._client.reactor.callLater(self._ca._dimse_timeout, self._timed_out)

    def _stop_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timeout_message(self):
        return f"no {self._kind} response to message {self.message_id} in {self._ca._dimse_timeout}s"

    def _timed_out(self):
        self._timer = None
        if self._done:
            return
        ca = self._ca
        if ca._receiving is self:
            ca._receiving = None
        self._failed(DimseTimeout(self._timeout_message()))
        ca.association.abort(0, 0)
        ca._fail(AssociationAborted(0, 0, "association aborted after a DIMSE timeout"))

    # -- ending ---------------------------------------------------------------

    def _unregister(self):
        operations = self._ca._operations
        if operations.get(self.message_id) is self:
            del operations[self.message_id]

    def _ended(self, error=None):
        """
        The operation has just ended (C{error}: how it failed, or C{None}):
        release what it holds, before its result fires.
        """

    def _hold(self):
        """
        Hold the association's idle timer while the operation runs (its
        DIMSE timer bounds the waits).
        """
        association = self._ca.association
        if association is not None and not self._held:
            self._held = True
            association.hold()

    def _release_hold(self):
        if self._held:
            self._held = False
            self._ca.association.release_hold()

    def _end(self, status):
        if self._done:
            return
        self._done = True
        self._stop_timer()
        self._unregister()
        self._release_hold()
        self._ended()
        self.result.callback(status)

    def _failed(self, error):
        if self._done:
            return
        self._done = True
        self._stop_timer()
        self._unregister()
        self._release_hold()
        self._ended(error)
        self.result.errback(error)

    # -- requests -------------------------------------------------------------

    def cancel(self):
        """
        Send a C-CANCEL-RQ for this operation (once; nothing when it has
        ended).  The operation then ends with the peer's final status
        (0xFE00, or whatever it answers).
        """
        if self._done or self.cancel_requested:
            return
        self.cancel_requested = True
        ca = self._ca
        if ca._error is not None or ca.association is None or ca.association._closed:
            return
        fields = {
            "CommandField": messages.C_CANCEL_RQ,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET,
        }
        sent = ca.association.send_message(self.context.id, messages.encode_command(fields))
        sent.addErrback(lambda f: ca._fail(f.value))


class FindOperation(_Operation):
    """
    One C-FIND in progress.

    @ivar matches: a L{Stream} of pydicom C{Dataset}s, one per pending
        response (0xFF00/0xFF01) in the order received, delivered as each
        arrives (a pending response without an identifier delivers
        nothing).  It finishes when the final response arrives (whatever its
        status: look at L{result}) and fails when the association is
        aborted or the DIMSE timeout expires.  At most C{high_water}
        matches are buffered for a slow consumer: then reading from the
        association is paused (and with it everything else on that
        association) until the consumer catches up.  Cancelling the stream
        cancels the find.
    @ivar result: Deferred[L{DimseStatus}] firing with the final status:
        success 0x0000, cancel 0xFE00, a warning or a failure status (not
        an errback); it fails with L{DimseTimeout}, L{AssociationAborted} or
        L{InvalidResponse}.
    @ivar message_id: the C-FIND-RQ's message ID.
    @ivar context: the presentation context used.
    """

    _kind = "C-FIND"

    def __init__(self, client_association, context, message_id, high_water=256):
        _Operation.__init__(self, client_association, context, message_id)
        self.matches = Stream(high_water=high_water)
        self._backpressure = _Backpressure(self)
        self.matches.attach_producer(self._backpressure)
        self._identifier = None

    def _timer_suspended(self):
        return self._backpressure.paused

    # -- responses ----------------------------------------------------------

    def _response(self, command):
        ca = self._ca
        fields = command.fields
        status = fields.get("Status")
        if fields.get("CommandField") != messages.C_FIND_RSP or status is None:
            ca._protocol_error("a response to a C-FIND that is not a C-FIND-RSP with a status")
            return
        if status in (PENDING, PENDING_WARNING):
            self._start_timer()
            if command.has_dataset:
                self._identifier = bytearray()
                ca._receiving = self
            return
        # The final response.
        if command.has_dataset:
            ca._receiving = _DISCARD
        self._end(DimseStatus(status, fields.get("ErrorComment"), fields))

    def fragment(self, data, last):
        buffer = self._identifier
        buffer += data
        if len(buffer) > MAX_IDENTIFIER_LENGTH:
            self._identifier = None
            self._invalid(f"C-FIND response identifier larger than {MAX_IDENTIFIER_LENGTH} bytes")
            return
        if not last:
            self._start_timer()
            return
        self._identifier = None
        transfer_syntax = self.context.transfer_syntax
        try:
            match = decode_identifier(buffer, transfer_syntax)
        except Exception as e:
            self._invalid(f"C-FIND response identifier does not decode: {e.__class__.__name__}")
            return
        keep_encoding(match, buffer, transfer_syntax)
        if not self._done:
            self.matches.write(match)

    def _invalid(self, message):
        self._failed(InvalidResponse(message))
        self._ca._protocol_error(message)

    # -- ending ---------------------------------------------------------------

    def _ended(self, error=None):
        self._backpressure.resumeProducing()
        if error is None:
            self.matches.finish()
        else:
            self.matches.fail(error)


def suboperation_counts(fields):
    """
    The sub-operation counts of a C-GET/C-MOVE response.

    @param fields: the response's command fields.
    @return: C{{"remaining": ..., "completed": ..., "failed": ...,
        "warning": ...}}, each an C{int} or C{None} when the response does
        not carry it.
    """
    return {name: fields.get(keyword) for name, keyword in zip(_COUNT_NAMES, SUBOPERATION_COUNTS)}


_COUNT_NAMES = ("remaining", "completed", "failed", "warning")


def merge_final_counts(final, pending):
    """
    The fields of a final C-GET/C-MOVE response with the completed, failed
    and warning counts it lacks taken from the last pending response
    (Remaining is not carried over: a final response has none left).

    @param final: the final response's fields.
    @param pending: the last pending response's fields, or C{None}.
    @rtype: C{dict}
    """
    merged = dict(final)
    if pending is not None:
        for key in SUBOPERATION_COUNTS[1:]:
            if merged.get(key) is None and pending.get(key) is not None:
                merged[key] = pending[key]
    return merged


class _Retrieve:
    """
    What C-GET and C-MOVE share (PS3.4 C.4.2/C.4.3, PS3.7 9.1.3/9.1.4):
    pending responses carrying sub-operation counts, and a final one whose
    missing counts come from the last pending.  Mixed into an
    L{_Operation}.

    @ivar pending: the fields of the last pending response, or C{None}.
    @ivar on_progress: C{None} or a callable given L{suboperation_counts}
        of each pending response as it arrives.
    """

    #: The response's command field.
    _response_field = None

    def _init_retrieve(self):
        self.pending = None
        self.on_progress = None
        self._final = None

    def _response(self, command):
        ca = self._ca
        fields = command.fields
        status = fields.get("Status")
        if fields.get("CommandField") != self._response_field or status is None or self._final is not None:
            ca._protocol_error(
                f"a response to a {self._kind} that is not a {self._kind}-RSP with a status, or after its final one"
            )
            return
        if command.has_dataset:
            # Pending responses carry none; a final one may carry the
            # Failed SOP Instance UID List (not kept).
            ca._receiving = _DISCARD
        if status in (PENDING, PENDING_WARNING):
            self.pending = fields
            self._start_timer()
            self._progress(fields)
            return
        self._final = DimseStatus(status, fields.get("ErrorComment"), merge_final_counts(fields, self.pending))
        self._maybe_end()

    def _progress(self, fields):
        callback = self.on_progress
        if callback is None:
            return
        try:
            callback(suboperation_counts(fields))
        except Exception:
            log.failure("The progress callback of a {kind} failed", kind=self._kind)

    def _busy(self):
        """
        C{True} while sub-operations on this association are unfinished.
        """
        return False

    def _maybe_end(self):
        if self._final is not None and not self._busy():
            self._end(self._final)

    def fragment(self, data, last):  # pragma: no cover - responses never carry one we keep
        pass


class MoveOperation(_Retrieve, _Operation):
    """
    One C-MOVE in progress (PS3.4 C.4.2, PS3.7 9.1.4): the peer sends the
    matching instances to the move destination AE on associations of its
    own; this operation only follows the C-MOVE-RSPs (for instances sent
    back to Harmony see L{harmony.dimse.move.MoveRouter}).

    @ivar result: Deferred[L{DimseStatus}] firing with the final status
        (success, warning 0xB000, cancel 0xFE00, or a failure such as
        0xA701/0xA702/0xA801/0xC000 — not an errback); its C{fields} carry
        the sub-operation counts, those missing from the final response
        taken from the last pending one.  It fails with L{DimseTimeout},
        L{AssociationAborted} or L{InvalidResponse}.
    @ivar pending: the fields of the last pending C-MOVE-RSP, or C{None}.
    @ivar on_progress: C{None} or a callable given L{suboperation_counts}
        (keys C{remaining}, C{completed}, C{failed}, C{warning}; C{int} or
        C{None}) of each pending response.
    @ivar destination: the Move Destination AE title.

    The DIMSE timer runs between responses and restarts with each pending
    one (as for C-GET); L{keep_alive} restarts it and L{suspend_timeout}
    stops it while the wait is ours (the receiver of the sub-operations is
    slow: see L{harmony.dimse.move.IncomingMove.follow}).
    """

    _kind = "C-MOVE"
    _response_field = messages.C_MOVE_RSP

    def __init__(self, client_association, context, message_id, destination):
        _Operation.__init__(self, client_association, context, message_id)
        self._init_retrieve()
        self.destination = destination
        self._suspended = False

    def _timer_suspended(self):
        return self._suspended

    def keep_alive(self):
        """
        Restart the DIMSE timer: the peer is working on the move (one of
        its sub-operations arrived elsewhere).
        """
        self._start_timer()

    def suspend_timeout(self):
        """
        Stop the DIMSE timer until L{resume_timeout}: the peer waits for us.
        """
        self._suspended = True
        self._stop_timer()

    def resume_timeout(self):
        if self._suspended:
            self._suspended = False
            self._start_timer()


class GetOperation(_Retrieve, FindOperation):
    """
    One C-GET in progress.

    @ivar instances: a L{Stream} of L{harmony.envelope.DicomInstance}, one
        per C-STORE sub-operation stored (committed in the storage), as
        each completes; C{data} streams the stored Part 10 file.  It
        finishes when the C-GET ends (whatever its status: look at
        L{result}) and fails when the association is aborted or the DIMSE
        timeout expires (instances already delivered stay in the storage).
        At most C{high_water} instances are buffered for a slow consumer:
        then reading from the association is paused.  Cancelling the
        stream cancels the get.
    @ivar result: Deferred[L{DimseStatus}] firing with the final status
        (success, cancel 0xFE00, warning 0xB000, or a failure such as
        0xA701/0xA702/0xC000 — not an errback); its C{fields} carry the
        sub-operation counts (C{NumberOfCompletedSuboperations},
        C{NumberOfFailedSuboperations}, C{NumberOfWarningSuboperations},
        and C{NumberOfRemainingSuboperations} when the peer sent it), those
        missing from the final response taken from the last pending one.
        It fails with L{DimseTimeout}, L{AssociationAborted} or
        L{InvalidResponse}.
    @ivar stored: sub-operations stored and answered Success here.
    @ivar refused: sub-operations answered with a failure here.
    @ivar pending: the fields of the last pending C-GET-RSP, or C{None}.
    @ivar on_progress: C{None} or a callable given L{suboperation_counts}
        of each pending C-GET-RSP.
    """

    _kind = "C-GET"
    _response_field = messages.C_GET_RSP

    def __init__(self, client_association, context, message_id, storage, layout, fsync=False, high_water=256,
                 memory=None):
        from harmony.dimse.substore import SubStoreService

        FindOperation.__init__(self, client_association, context, message_id, high_water)
        self._init_retrieve()
        self.instances = self.matches
        self.storage = storage
        self.stored = 0
        self.refused = 0
        self._subs = []
        self._service = SubStoreService(self, storage, layout, fsync=fsync, sender="called", memory=memory)

    def _timeout_message(self):
        return (f"no C-GET response or sub-operation for message {self.message_id} "
                f"in {self._ca._dimse_timeout}s")

    # -- sub-operations -------------------------------------------------------

    def _busy(self):
        return bool(self._subs)

    def _store_request(self, context, command):
        ca = self._ca
        self._start_timer()
        operation = self._service.start(ca.association, context, command)
        if operation is None:
            return  # no data set: already answered
        self._subs.append(operation)
        ca._receiving = _SubOperationReceiver(self, operation)

    def _sub_stored(self, operation, instance):
        if self._done:
            return
        self.stored += 1
        self.matches.write(instance)

    def _sub_done(self, operation, status):
        if operation in self._subs:
            self._subs.remove(operation)
        if status != dimse_status.SUCCESS:
            self.refused += 1
        if not self._done:
            self._start_timer()
        self._maybe_end()

    def _sub_aborted(self, operation):
        if operation in self._subs:
            self._subs.remove(operation)

    # -- ending ---------------------------------------------------------------

    def _ended(self, error=None):
        if error is not None:
            ca = self._ca
            subs, self._subs = self._subs, []
            for operation in subs:
                if getattr(ca._receiving, "operation", None) is operation:
                    ca._receiving = None
                operation.aborted(ca.association)
        FindOperation._ended(self, error)
        association = self._ca.association
        if association is not None:
            self._service.drop_spare(association)


class _SubOperationReceiver:
    """
    Feeds the data set fragments of one C-STORE sub-operation to its
    storage operation.
    """

    def __init__(self, get, operation):
        self.get = get
        self.operation = operation

    def fragment(self, data, last):
        self.operation.fragment(data)
        if last:
            self.operation.finish()
        elif not self.get._done:
            self.get._start_timer()


class _Discard:
    """
    Takes the data set of a final response, which nobody needs.
    """

    def fragment(self, data, last):
        pass


_DISCARD = _Discard()


def encode_identifier(dataset, transfer_syntax):
    """
    Encode a query identifier with pydicom in C{transfer_syntax} (implicit
    or explicit VR little endian, explicit VR big endian or deflated).

    @raise ValueError: another transfer syntax, or pydicom cannot encode it.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    implicit, little, deflated = _encoding(transfer_syntax)
    data = _encode_text_dataset(dataset, implicit) if little else None
    if data is None:
        fp = DicomBytesIO()
        fp.is_little_endian = little
        fp.is_implicit_VR = implicit
        try:
            write_dataset(fp, dataset)
        except Exception as e:
            raise ValueError(f"cannot encode the identifier: {e}") from e
        data = fp.getvalue()
    if deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


#: VRs whose values L{_encode_text_dataset} writes: text (padded with a
#: space) and UI (padded with a NUL); then the VRs with a 4-byte length in
#: explicit VR.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_UTF8_CHARSETS = frozenset({"ISO_IR 192"})
_LATIN1_CHARSETS = frozenset({"ISO_IR 100"})


def _encode_text_dataset(dataset, implicit):
    """
    A little endian encoding of a dataset of text elements only (what
    query identifiers are), without pydicom's writer (a quarter of a
    millisecond per query); C{None} for anything else (sequences, binary
    or numeric values, raw elements, other character sets), which pydicom
    then encodes.
    """
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.multival import MultiValue

    charset = dataset.get("SpecificCharacterSet", "")
    if isinstance(charset, str) and charset in ("", "ISO_IR 6"):
        codec = "ascii"
    elif charset in _UTF8_CHARSETS:
        codec = "utf-8"
    elif charset in _LATIN1_CHARSETS:
        codec = "latin-1"
    else:
        return None
    out = []
    pack = struct.pack
    for tag in sorted(dataset.keys()):
        elem = dataset.get_item(tag)
        if type(elem) is RawDataElement:
            # Received and never converted (a relayed query): its bytes as
            # they came, when they need no conversion.
            raw = _raw_element(elem, implicit)
            if raw is None:
                return None
            out.append(raw)
            continue
        if type(elem) is not DataElement:
            return None
        vr = elem.VR
        value = elem.value
        if value is None or value == "":
            # A return key: any VR but a sequence is just its header.
            if vr == "SQ":
                return None
            data = b""
        elif vr not in _TEXT_VRS:
            return None
        else:
            values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
            try:
                text = "\\".join("" if v is None else str(v) for v in values)
                data = text.encode(codec)
            except (TypeError, UnicodeEncodeError):
                return None
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        group, element = tag >> 16, tag & 0xFFFF
        if implicit:
            out.append(pack("<HHI", group, element, len(data)))
        elif vr in _LONG_VRS:
            out.append(pack("<HH2s2xI", group, element, vr.encode("ascii"), len(data)))
        else:
            if len(data) > 0xFFFF:
                return None
            out.append(pack("<HH2sH", group, element, vr.encode("ascii"), len(data)))
        out.append(data)
    return b"".join(out)


def _raw_element(elem, implicit):
    """
    The little endian encoding of a raw (unconverted) element in the VR
    convention C{implicit}, or C{None} when pydicom must convert it (big
    endian, an undefined or deferred length, a VR the dictionary cannot
    give, a sequence changing VR convention).
    """
    from pydicom.datadict import dictionary_VR

    value = elem.value
    data = b"" if value is None else value
    if not elem.is_little_endian or elem.length != len(data) or not isinstance(data, bytes):
        return None
    tag = elem.tag
    group, element = tag >> 16, tag & 0xFFFF
    vr = elem.VR
    if elem.is_implicit_VR != implicit:
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                return None
        if vr == "SQ" or len(vr) != 2:
            # Items inside would keep the other convention; "US or SS"...
            return None
    if implicit:
        return struct.pack("<HHI", group, element, len(data)) + data
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", group, element, vr.encode("ascii"), len(data)) + data
    if len(data) > 0xFFFF:
        return None
    return struct.pack("<HH2sH", group, element, vr.encode("ascii"), len(data)) + data


#: Where a received identifier keeps the bytes it was decoded from.
_RECEIVED = "_harmony_received"


def keep_encoding(dataset, data, transfer_syntax):
    """
    Remember the bytes a received identifier was decoded from, so that a
    relay that does not change it can send them on as they are (see
    L{received_encoding}).
    """
    object.__setattr__(dataset, _RECEIVED, (bytes(data), transfer_syntax))


def received_encoding(dataset, transfer_syntax):
    """
    The bytes C{dataset} was received as, when they were in
    C{transfer_syntax} (else C{None}).  Only for relays whose pipeline
    cannot have changed the dataset (no middleware): the bytes are not
    checked against the dataset's content.
    """
    received = getattr(dataset, _RECEIVED, None)
    if received is not None and received[1] == transfer_syntax:
        return received[0]
    return None


def decode_identifier(data, transfer_syntax):
    """
    Decode an identifier (bytes) with pydicom from C{transfer_syntax}.

    @rtype: pydicom C{Dataset}
    """
    from harmony.dimse.identifier import read_identifier

    implicit, little, deflated = _encoding(transfer_syntax)
    data = bytes(data)
    if deflated:
        decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        data = decompressor.decompress(data, MAX_IDENTIFIER_LENGTH + 1)
        if len(data) > MAX_IDENTIFIER_LENGTH:
            raise ValueError("deflated identifier too large")
    return read_identifier(data, implicit, little)


def _encoding(transfer_syntax):
    """
    C{(implicit VR, little endian, deflated)} of a native transfer syntax.
    """
    try:
        return {
            IMPLICIT_VR_LITTLE_ENDIAN: (True, True, False),
            EXPLICIT_VR_LITTLE_ENDIAN: (False, True, False),
            EXPLICIT_VR_BIG_ENDIAN: (False, False, False),
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: (False, True, True),
        }[transfer_syntax]
    except KeyError:
        raise ValueError(f"identifiers cannot be encoded in transfer syntax {transfer_syntax}") from None


@attr.s(frozen=True)
class Part10Header:
    """
    What a C-STORE needs from a Part 10 file's meta information.
    """

    sop_class_uid = attr.ib()
    sop_instance_uid = attr.ib()
    transfer_syntax = attr.ib()
    dataset_offset = attr.ib()


def read_part10_header(source):
    """
    Read a DICOM Part 10 file's meta information: a C{struct} walk over the
    (explicit VR little endian) group 0002 after the preamble; the data set
    is not touched.

    @param source: a path, or the file's first bytes (bytes-like: at least
        the whole file meta group).
    @raise ValueError: not a Part 10 file, or required meta elements are
        missing.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:65536])
    else:
        with open(source, "rb") as f:
            data = f.read(65536)
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    values = {}
    pos = 132
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            if pos + 12 > len(data):
                raise ValueError("truncated file meta information")
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        end = start + length
        if length == 0xFFFFFFFF or end > len(data):
            raise ValueError("malformed file meta information")
        values[element] = data[start:end]
        pos = end
    try:
        uid = lambda element: values[element].rstrip(b"\x00 ").decode("ascii")  # noqa: E731
        return Part10Header(uid(0x0002), uid(0x0003), uid(0x0010), pos)
    except (KeyError, UnicodeDecodeError):
        raise ValueError("incomplete file meta information (SOP class, instance or transfer syntax missing)") from None


def file_chunks(path, offset, chunk_size):
    """
    The bytes of a file from C{offset}, lazily, in chunks.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return
            yield chunk


def _model_syntaxes(known, service, models, transfer_syntaxes):
    """
    A C{(SOP class, [transfer syntax, ...])} per information model named
    (C{"study"}, C{"patient"} or a SOP class UID).

    @raise ValueError: an unknown model name.
    """
    syntaxes = []
    for model in models:
        sop_class = known.get(model, model)
        if "." not in sop_class:
            raise ValueError(f"unknown {service} model {model!r}")
        syntaxes.append((sop_class, list(transfer_syntaxes)))
    return syntaxes


class DicomClient:
    """
    Opens associations to DICOM peers.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param local_aet: our (calling) AE title.
    @param settings: L{AssociationSettings} (max PDU we accept, timers).
    @param connect_timeout: seconds for TCP connect + association (the TLS
        handshake included).
    @param dimse_timeout: seconds to wait for each DIMSE response.
    @param tls: C{None} for plain TCP, or DICOM TLS (PS3.15 B.9): an object
        with C{creatorForNetloc(host, port)} returning an
        C{IOpenSSLClientConnectionCreator} (a L{harmony.tls.ClientTLS}).
    """

    def __init__(self, reactor, local_aet="HARMONY_SCU", settings=None, connect_timeout=10, dimse_timeout=30,
                 tls=None):
        pdu.validate_ae_title(local_aet, "calling AE title")
        self.reactor = reactor
        self.local_aet = local_aet
        self.settings = settings or AssociationSettings()
        self.connect_timeout = connect_timeout
        self.dimse_timeout = dimse_timeout
        self.tls = tls

    def associate(self, host, port, called_aet, syntaxes, calling_aet=None, roles=(), user_identity=None):
        """
        Open an association.

        @param syntaxes: C{[(abstract_syntax, [transfer_syntax, ...]), ...]},
            one presentation context each (the same abstract syntax may
            come several times, e.g. once per transfer syntax).
        @return: Deferred[L{ClientAssociation}]; fails with
            L{AssociationRejected}, L{AssociationAborted} or a connection
            error.
        """
        contexts = contexts_for(syntaxes)
        rq = pdu.AssociateRQ(
            called_aet=called_aet,
            calling_aet=calling_aet or self.local_aet,
            contexts=contexts,
            max_pdu_length=self.settings.max_pdu_length,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            roles=list(roles),
            user_identity=user_identity,
        )
        ca = ClientAssociation(self, rq, self.dimse_timeout)

        def build():
            association = Association(True, _ClientUser(ca), self.reactor, self.settings, rq)
            ca.association = association
            association.ended.addCallback(ca._ended)
            return association

        # The TCP timeout is a backstop: our own timer (below) ends a slow
        # connect as a timeout, not as an unreachable peer.
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout + 1)
        if self.tls is not None:
            endpoint = endpoints.wrapClientTLS(self.tls.creatorForNetloc(host, port), endpoint)
        factory = Factory.forProtocol(build)
        factory.noisy = False  # no "Starting factory" line per association
        connecting = endpoint.connect(factory)
        connecting.addErrback(ca._fail)
        timer = self.reactor.callLater(self.connect_timeout, self._associate_timeout, ca, connecting)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        def tls_failed(failure):
            lost = getattr(ca.association, "lost_reason", None)
            if failure.check(AssociationAborted) and lost is not None and lost.check(SSL.Error):
                from harmony.tls import ssl_error_text

                raise TLSHandshakeFailed(ssl_error_text(lost.value))
            return failure

        ready = ca._ready.addBoth(done)
        if self.tls is not None:
            ready.addErrback(tls_failed)
        return ready

    def associate_for_get(self, host, port, called_aet, storage_syntaxes, models=("study",), calling_aet=None,
                          user_identity=None, query_syntaxes=(EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN),
                          extra_syntaxes=()):
        """
        Open an association for C-GET: a context per GET model and per
        storage SOP class, with an SCP/SCU Role Selection item proposing the
        SCP role (and not the SCU role, as DCMTK's getscu does) for each
        storage SOP class (PS3.4 C.4.3.3, PS3.7 D.3.3.4).

        @param storage_syntaxes: C{[(storage SOP class, [transfer syntax,
            ...]), ...]}: what the caller expects to receive.
        @param models: C{"study"}, C{"patient"} or C-GET SOP class UIDs.
        @param extra_syntaxes: more C{(abstract syntax, [transfer
            syntax, ...])} to propose (e.g. Verification).
        @return: Deferred[L{ClientAssociation}]
        """
        syntaxes = _model_syntaxes(GET_MODELS, "C-GET", models, query_syntaxes)
        syntaxes += [(sop_class, list(ts)) for sop_class, ts in storage_syntaxes]
        syntaxes += [(a, list(ts)) for a, ts in extra_syntaxes]
        roles = [pdu.RoleSelection(sop_class, False, True) for sop_class, _ in storage_syntaxes]
        return self.associate(host, port, called_aet, syntaxes, calling_aet=calling_aet, roles=roles,
                              user_identity=user_identity)

    def associate_for_move(self, host, port, called_aet, models=("study",), calling_aet=None, user_identity=None,
                           query_syntaxes=(EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN), extra_syntaxes=()):
        """
        Open an association for C-MOVE: a context per MOVE model (the
        instances travel on other associations, so no storage contexts).

        @param models: C{"study"}, C{"patient"} or C-MOVE SOP class UIDs.
        @param extra_syntaxes: more C{(abstract syntax, [transfer
            syntax, ...])} to propose (e.g. Verification).
        @return: Deferred[L{ClientAssociation}]
        """
        syntaxes = _model_syntaxes(MOVE_MODELS, "C-MOVE", models, query_syntaxes)
        syntaxes += [(a, list(ts)) for a, ts in extra_syntaxes]
        return self.associate(host, port, called_aet, syntaxes, calling_aet=calling_aet, user_identity=user_identity)

    def _associate_timeout(self, ca, connecting):
        if ca._ready.called:
            return
        # The timeout first: cancelling the connect fails it too (with
        # CancelledError), and the first failure is the one reported.
        ca._fail(DimseTimeout(f"association not established within {self.connect_timeout}s"))
        connecting.cancel()
        if ca.association is not None:
            ca.association.abort(0, 0)
