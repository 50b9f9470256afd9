# -*- test-case-name: tests.unit.test_dimse_retrieve_scp -*-
"""
The C-GET and C-MOVE SCP services: Harmony as a DICOM relay.

The request goes through the endpoint's pipeline as a C{DicomRequest}
(operation C{get} or C{move}); the backend answers a C{DicomResult} whose
C{instances} stream the Part 10 files it retrieved.  Each instance becomes
one C-STORE sub-operation, one at a time (PS3.4 C.4.2.3, C.4.3.3):

  - C-GET: on the requestor's own association, on a presentation context
    where it took the SCP role for that SOP class and transfer syntax (our
    C-STORE-RSPs come back through L{harmony.dimse.scp}, matched by
    Message ID);
  - C-MOVE: to the Move Destination, looked up in the endpoint's AE table,
    on associations Harmony opens with a L{harmony.dimse.scu.DicomClient}
    (each C-STORE-RQ names the move's originator).

After each sub-operation a pending response (0xFF00) carries the counts;
the final response follows PS3.4 C.4.2.1.4 / C.4.3.1.4: success, 0xB000
(some failed or warned), 0xA702 (all failed), 0xFE00 after a C-CANCEL-RQ,
or the upstream's failure when nothing was sent.  Failed counts include the
sub-operations the upstream reported failed (those instances never reached
Harmony); the final response lists the failed SOP Instance UIDs (0008,0058).

Data sets are streamed from the files, never read whole; each instance's
C{dispose} is called once it has been sent (or given up).
"""

import uuid

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.python.failure import Failure

from harmony.dimse import messages
from harmony.dimse import status as dimse_status
from harmony.dimse.association import AssociationAborted
from harmony.dimse.scp import QueryOperation, request_envelope
from harmony.dimse.scu import (
    GET_MODELS,
    MOVE_MODELS,
    DimseTimeout,
    decode_identifier,
    encode_identifier,
    file_chunks,
    read_part10_header,
)
from harmony.envelope import DicomInstance, DicomRequest
from harmony.errors import HarmonyError
from harmony.logs import logger
from harmony.streams import EOF, Stream, StreamCancelled

log = logger("harmony.dimse.retrieve")

#: At most this many UIDs in the final response's Failed SOP Instance UID List.
MAX_FAILED_UIDS = 1000
#: At most this many presentation contexts are proposed to a destination.
MAX_CONTEXTS = 128
#: Bytes read from a file per data set chunk.
CHUNK_SIZE = 256 * 1024

_KINDS = {
    "get": (messages.C_GET_RSP, "C-GET", GET_MODELS),
    "move": (messages.C_MOVE_RSP, "C-MOVE", MOVE_MODELS),
}

#: The status of a sub-operation that could not be attempted.
_NOT_SENT = dimse_status.PROCESSING_FAILURE


class RetrieveService:
    """
    Answers C-GET-RQ (C{kind="get"}) or C-MOVE-RQ (C{kind="move"}) through
    a pipeline; registered in the SCP's services by command field.

    @param pipeline: C{(executor, endpoint)}.
    @param kind: C{"get"} or C{"move"}.
    @param destinations: for move: C{{AE title: (host, port)}}, the Move
        Destinations known.
    @param client: for move: the L{harmony.dimse.scu.DicomClient} that
        opens the associations to destinations (its local AE title is the
        calling AE).
    @param max_failed_uids: cap of the Failed SOP Instance UID List.
    """

    def __init__(self, pipeline, kind, destinations=None, client=None, max_failed_uids=MAX_FAILED_UIDS,
                 storage=None):
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'get' or 'move', not {kind!r}")
        if kind == "move" and client is None:
            raise ValueError("a C-MOVE service needs a DicomClient for its destinations")
        self.pipeline = pipeline
        self.kind = kind
        self.destinations = {aet.strip(): address for aet, address in (destinations or {}).items()}
        self.client = client
        self.max_failed_uids = max_failed_uids
        #: Where instances a backend gives only as a stream are spooled
        #: before being sent (an L{harmony.storage.interfaces.IStorage}).
        self.storage = storage

    def start(self, association, context, command):
        operation = _RetrieveOperation(self, association, context, command)
        association.operations[operation.message_id] = operation
        if not command.has_dataset:
            operation.answer(
                dimse_status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{operation.name}-RQ without an identifier"
            )
            return None
        return operation


class _Source:
    """
    The data set of one instance: what its file meta says, and its bytes
    from a file (read lazily in chunks) or from memory.
    """

    def __init__(self, header, path=None, data=None, cleanup=None):
        self.sop_class_uid = header.sop_class_uid
        self.sop_instance_uid = header.sop_instance_uid
        self.transfer_syntax = header.transfer_syntax
        self._offset = header.dataset_offset
        self._path = path
        self._data = data
        self._cleanup = cleanup
        self._open = []

    def chunks(self):
        """
        The data set: bytes, or a fresh iterable of chunks read from the file.
        """
        if self._path is None:
            return memoryview(self._data)[self._offset :]
        chunks = file_chunks(self._path, self._offset, CHUNK_SIZE)
        self._open.append(chunks)
        return chunks

    def close(self):
        for chunks in self._open:
            chunks.close()
        self._open = []
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


async def _open_source(instance, storage):
    """
    The L{_Source} of an instance: its file (C{path}), or its Part 10
    bytes (C{data}: bytes, or a L{Stream} spooled into C{storage}).

    @raise ValueError: no data, not a Part 10 file, or a stream and no
        storage to spool it.
    @raise OSError: the file cannot be read or written.
    """
    if instance.path:
        return _Source(read_part10_header(instance.path), path=instance.path)
    data = instance.data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _Source(read_part10_header(data), data=data)
    if isinstance(data, Stream):
        if storage is None:
            data.cancel()
            raise ValueError("a streamed instance and no storage to spool it")
        relpath = f"relay/{uuid.uuid4().hex}.dcm"
        stored = await storage.write_stream(relpath, data)

        def cleanup():
            try:
                storage.discard(relpath)
            except OSError:
                pass

        try:
            return _Source(read_part10_header(stored.path), path=stored.path, cleanup=cleanup)
        except (OSError, ValueError):
            cleanup()
            raise
    raise ValueError("an instance without a file or data")


def _dispose(instance):
    dispose = getattr(instance, "dispose", None)
    if dispose is None:
        return
    try:
        dispose()
    except Exception:
        log.failure("Disposing of a relayed instance failed")


def _outcome(status):
    """
    C{"completed"}, C{"warning"} or C{"failed"} for a C-STORE-RSP status.
    """
    if status == dimse_status.SUCCESS:
        return "completed"
    if status is not None and (status == 0x0001 or (status & 0xF000) == 0xB000):
        return "warning"
    return "failed"


class _DestinationDown(Exception):
    """
    No association could be opened with the move destination.
    """


class _RetrieveOperation(QueryOperation):
    """
    One C-GET or C-MOVE being answered.
    """

    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        self.kind = service.kind
        self._rsp_field, self.name, self._models = _KINDS[self.kind]
        fields = command.fields
        self.message_id = fields.get("MessageID", 0)
        self.priority = fields.get("Priority", 0)
        self.sop_class_uid = fields.get("AffectedSOPClassUID") or context.abstract_syntax
        self.move_destination = (fields.get("MoveDestination") or "").strip()
        self.completed = self.failed = self.warning = 0
        self._failed_uids = []
        self._query = bytearray()
        self._result = None
        self._instances = None
        self._next = None  # the prefetched read of the instance stream
        self._phase = "request"
        self._answered = False
        self._cancelled = False
        self._aborted = False
        self._down = None  # why the move destination is unavailable
        self._comment = None  # why the last sub-operation failed
        self._pending_rsp = None  # C-GET: the C-STORE-RSP awaited
        self._destination = None  # C-MOVE: the _Destination

    # -- the request identifier -------------------------------------------

    def finish(self):
        if self._query is None or self._answered:
            return
        data, self._query = bytes(self._query), None
        if self.sop_class_uid != self.context.abstract_syntax:
            self.answer(dimse_status.SOP_CLASS_NOT_SUPPORTED, "SOP Class differs from the presentation context's")
            return
        if self.kind == "move" and self.move_destination not in self.service.destinations:
            self.answer(dimse_status.MOVE_DESTINATION_UNKNOWN, "Refused: Move Destination unknown")
            return
        try:
            identifier = decode_identifier(data, self.context.transfer_syntax)
        except Exception:
            self.answer(dimse_status.UNABLE_TO_PROCESS, "The identifier cannot be decoded")
            return
        level = str(identifier.get("QueryRetrieveLevel", "") or "").upper()
        if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
            self.answer(dimse_status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "QueryRetrieveLevel missing or invalid")
            return
        executor, endpoint = self.service.pipeline
        self._phase = "pipeline"
        # The requestor sends nothing until our final response (a C-MOVE
        # can take long): not idle meanwhile.
        self._hold()
        d = defer.maybeDeferred(executor.execute, endpoint, self._envelope(identifier, level))
        d.addCallback(self._respond)
        d.addErrback(self._failed)

    def _envelope(self, identifier, level):
        rq = self.association.rq
        model = next((name for name, uid in self._models.items() if uid == self.sop_class_uid), "study")
        request = DicomRequest(
            operation=self.kind,
            query_model=model,
            level=level,
            identifier=identifier,
            move_destination=self.move_destination if self.kind == "move" else None,
            priority=self.priority,
            calling_aet=rq.calling_aet,
            called_aet=rq.called_aet,
            user_identity=rq.user_identity,
            # Each instance is sent on from memory or its file, then disposed of.
            accept_in_memory=True,
        )
        metadata = {"level": level}
        if self.kind == "move":
            metadata["move_destination"] = self.move_destination
        return request_envelope(self.association, self.name, self.kind, request, **metadata)

    # -- the backend's answer -----------------------------------------------

    def _respond(self, response):
        result = response.dicom
        if result is None:
            status = dimse_status.status_for_http(response.status)
            if status == dimse_status.SUCCESS:
                status = dimse_status.UNABLE_TO_PROCESS  # a backend that cannot retrieve
            self.answer(status, "The pipeline did not answer the retrieve")
            return None
        if self._answered:
            if result.instances is not None:
                result.instances.cancel()
            _abandon(result.done)
            return None
        self._result = result
        self._instances = result.instances
        return defer.Deferred.fromCoroutine(self._run(result))

    def _failed(self, failure):
        if not failure.check(defer.CancelledError):
            log.warn("A {kind} failed: {error}", kind=self.name, error=failure.getErrorMessage())
        if self._instances is not None:
            self._instances.cancel()
        if self._destination is not None:
            self._destination.shutdown()
        self.answer(dimse_status.OUT_OF_RESOURCES, "The retrieve could not be completed")

    async def _run(self, result):
        upstream = (result.status, result.error_comment)
        ended = "eof"
        if result.instances is not None:
            self._phase = "relay"
            ended, error = await self._relay(result.instances)
            if ended == "failed":
                upstream = (_status_of(error), "The retrieve could not be completed")
        if ended != "eof" or self._stopping():
            _abandon(result.done)
        if self._destination is not None:
            self._phase = "closing"
            await self._destination.close(abort=self._aborted)
        if self._answered or self._aborted:
            return
        if self._cancelled:
            self._final(dimse_status.CANCEL)
            return
        if ended == "eof" and result.done is not None:
            self._phase = "upstream_end"
            try:
                upstream = await result.done
            except Exception as e:
                upstream = (_status_of(e), "The retrieve could not be completed")
            if self._answered:
                return
        self._final(*self._final_status(*upstream))

    async def _relay(self, instances):
        """
        One sub-operation per instance, in order, until the stream ends or
        the retrieve stops.

        @return: C{("eof", None)}, C{("failed", error)} or C{("stopped",
            None)}.
        """
        try:
            return await self._relay_each(instances)
        except BaseException:
            instances.cancel()
            self._drop_prefetch()
            raise

    async def _relay_each(self, instances):
        self._next = instances.read()
        while True:
            try:
                item = await self._next
            except StreamCancelled:
                self._next = None
                return "stopped", None
            except Exception as e:
                self._next = None
                log.warn("The instances of a {kind} failed: {error}", kind=self.name, error=e.__class__.__name__)
                return "failed", e
            self._next = None
            if item is EOF:
                return "eof", None
            if self._stopping():
                _dispose(item)
                return "stopped", None
            self._next = instances.read()
            try:
                status, comment = await self._suboperation(item)
            finally:
                _dispose(item)
            self._count(status, comment, item)
            if self._down is not None:
                # What will never be sent fails too.
                self.failed += self._remaining()
            if self._stopping():
                instances.cancel()
                self._drop_prefetch()
                return "stopped", None
            self._send_pending()

    def _stopping(self):
        return self._answered or self._cancelled or self._aborted or self._down is not None

    def _drop_prefetch(self):
        d, self._next = self._next, None
        if d is not None:
            d.addCallbacks(lambda item: _dispose(item) if isinstance(item, DicomInstance) else None, lambda f: None)

    def _count(self, status, comment, instance):
        outcome = _outcome(status)
        if outcome == "completed":
            self.completed += 1
        elif outcome == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self._comment = comment or self._comment
            if len(self._failed_uids) < self.service.max_failed_uids and instance.sop_instance_uid:
                self._failed_uids.append(instance.sop_instance_uid)

    # -- sub-operations --------------------------------------------------------

    async def _suboperation(self, instance):
        """
        Send one instance: C{(status, error comment)} of its C-STORE.
        """
        try:
            source = await _open_source(instance, self.service.storage)
        except (OSError, ValueError) as e:
            log.warn("An instance to relay cannot be read: {error}", error=e.__class__.__name__)
            return _NOT_SENT, "An instance could not be read"
        try:
            if self.kind == "get":
                return await self._store_here(source)
            return await self._store_there(source)
        finally:
            source.close()

    async def _store_here(self, source):
        """
        C-GET: a C-STORE-RQ on the requestor's association.
        """
        association = self.association
        context = self._scp_context(source.sop_class_uid, source.transfer_syntax)
        if context is None:
            return _NOT_SENT, "No presentation context for an instance"
        if association._closed:
            self._aborted = True
            return _NOT_SENT, None
        user = association.user
        message_id = user.next_message_id()
        fields = {
            "AffectedSOPClassUID": source.sop_class_uid,
            "CommandField": messages.C_STORE_RQ,
            "MessageID": message_id,
            "Priority": self.priority,
            "CommandDataSetType": messages.DATASET_PRESENT,
            "AffectedSOPInstanceUID": source.sop_instance_uid,
        }
        d = self._pending_rsp = defer.Deferred()
        user.expect_response(message_id, d.callback)
        timer = None
        try:
            await association.send_message(context.id, messages.encode_command(fields), source.chunks(), now=True)
            settings = association.settings
            timeout = settings.dimse_timeout or settings.idle_timeout
            if timeout and not d.called:
                timer = association.clock.callLater(timeout, self._timed_out, d)
            command = await d
        except DimseTimeout:
            log.warn("No C-STORE-RSP to a C-GET sub-operation in time: aborting the association")
            self._aborted = True
            association.abort()
            return _NOT_SENT, "Sub-operation timed out"
        except AssociationAborted:
            self._aborted = True
            return _NOT_SENT, None
        finally:
            self._pending_rsp = None
            user.forget_response(message_id)
            if timer is not None and timer.active():
                timer.cancel()
        rsp = command.fields
        return rsp.get("Status"), rsp.get("ErrorComment")

    def _timed_out(self, d):
        if not d.called:
            d.errback(DimseTimeout("no C-STORE-RSP in time"))

    def _scp_context(self, sop_class_uid, transfer_syntax):
        for context in self.association.contexts.values():
            if (
                context.requestor_scp
                and context.abstract_syntax == sop_class_uid
                and context.transfer_syntax == transfer_syntax
            ):
                return context
        return None

    async def _store_there(self, source):
        """
        C-MOVE: a C-STORE-RQ to the move destination.
        """
        if self._destination is None:
            host, port = self.service.destinations[self.move_destination]
            self._destination = _Destination(self.service.client, self.move_destination, host, port)
        originator = (self.association.rq.calling_aet, self.message_id)
        try:
            return await self._destination.store(source, originator, self.priority)
        except _DestinationDown as e:
            self._down = str(e)
            return _NOT_SENT, str(e)

    # -- responses -----------------------------------------------------------------

    def _remaining(self):
        """
        The best estimate of the sub-operations still to come.
        """
        result = self._result
        if result is not None and result.remaining is not None:
            total = sum(v or 0 for v in (result.completed, result.failed, result.warning, result.remaining))
            return max(total - self.completed - self._failed_total() - self.warning, 0)
        d = self._next
        if d is not None and d.called and isinstance(getattr(d, "result", None), DicomInstance):
            return 1
        return 0

    def _failed_total(self):
        upstream = self._result.failed if self._result is not None else None
        return self.failed + (upstream or 0)

    def _counts(self, remaining):
        fields = {
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": self._failed_total(),
            "NumberOfWarningSuboperations": self.warning,
        }
        if remaining:
            fields["NumberOfRemainingSuboperations"] = self._remaining()
        return fields

    def _send_pending(self):
        association = self.association
        if association._closed or self._answered or self._aborted:
            return
        fields = {
            "AffectedSOPClassUID": self.sop_class_uid,
            "CommandField": self._rsp_field,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET,
            "Status": dimse_status.PENDING,
        }
        fields.update(self._counts(remaining=True))
        association.send_message(self.context.id, messages.encode_command(fields))

    def _final_status(self, upstream_status, upstream_comment):
        """
        The final status and comment (PS3.4 C.4.2.1.4, C.4.3.1.4).
        """
        failed = self._failed_total()
        if upstream_status is None:
            upstream_status = dimse_status.SUCCESS
        upstream_ok = upstream_status == dimse_status.SUCCESS
        upstream_failed = not upstream_ok and _outcome(upstream_status) == "failed"
        sent = self.completed + self.failed + self.warning
        if upstream_failed and sent == 0:
            if upstream_status == dimse_status.CANCEL:  # not asked by our requestor
                return dimse_status.UNABLE_TO_PROCESS, upstream_comment or "The retrieve was cancelled upstream"
            return upstream_status, upstream_comment
        comment = self._down or self._comment or upstream_comment
        if self.completed + self.warning == 0 and failed:
            return dimse_status.UNABLE_TO_PERFORM_SUBOPERATIONS, comment or "Unable to perform sub-operations"
        if failed or self.warning or not upstream_ok:
            return dimse_status.SUBOPERATIONS_COMPLETE_WITH_FAILURES, comment
        return dimse_status.SUCCESS, None

    def _final(self, status, comment=None):
        data = None
        if self._failed_uids and status != dimse_status.SUCCESS:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = list(self._failed_uids)
            try:
                data = encode_identifier(ds, self.context.transfer_syntax)
            except ValueError:
                data = None
        log.info(
            "{kind} from {calling} ended with status {status:04X}: {completed} completed, {failed} failed, "
            "{warning} warning",
            kind=self.name,
            calling=self.association.rq.calling_aet,
            status=status,
            completed=self.completed,
            failed=self._failed_total(),
            warning=self.warning,
        )
        self.answer(status, comment, counts=self._counts(remaining=status == dimse_status.CANCEL), data=data)

    def answer(self, status, comment=None, counts=None, data=None):
        """
        Send the final response (once).
        """
        if self._answered:
            return
        self._answered = True
        association = self.association
        if association.operations.get(self.message_id) is self:
            del association.operations[self.message_id]
        self._release_hold()
        if association._closed or self._aborted:
            return
        fields = {
            "AffectedSOPClassUID": self.sop_class_uid,
            "CommandField": self._rsp_field,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET if data is None else messages.DATASET_PRESENT,
            "Status": status,
        }
        if counts:
            fields.update(counts)
        if comment and (dimse_status.is_failure(status) or _outcome(status) == "warning"):
            fields["ErrorComment"] = comment[:64]
        association.send_message(self.context.id, messages.encode_command(fields), data)

    # -- C-CANCEL and the end of the association ---------------------------------

    def cancel(self):
        """
        C-CANCEL-RQ from the peer: stop the backend's retrieve; answer
        Cancel (0xFE00) with the counts so far once the sub-operation in
        progress has ended.
        """
        if self._answered or self._cancelled:
            return
        self._cancelled = True
        if self._instances is not None:
            self._instances.cancel()
        if self._phase in ("request", "pipeline", "upstream_end"):
            self._final(dimse_status.CANCEL)

    def aborted(self, association):
        """
        The association ended: stop everything, report nothing.
        """
        self._release_hold()
        self._answered = True
        self._aborted = True
        if self._instances is not None:
            self._instances.cancel()
        d = self._pending_rsp
        if d is not None and not d.called:
            d.errback(AssociationAborted(message="the association ended"))
        if self._destination is not None:
            self._destination.shutdown()


def _status_of(error):
    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, HarmonyError):
        return dimse_status.status_for_error(error)
    return dimse_status.OUT_OF_RESOURCES


def _abandon(done):
    """
    Stop waiting for an upstream's end (its errors are not ours to log).
    """
    if done is not None:
        done.addErrback(lambda f: None)


class _Destination:
    """
    The associations of one C-MOVE to its destination, one at a time.

    One presentation context per (SOP class, transfer syntax) of the
    instances seen so far (the acceptor can accept each exactly); when an
    instance needs a pair the association lacks, a new association
    proposing every pair seen (the newest 128) replaces it.  A pair
    proposed and not accepted is not asked for again.
    """

    def __init__(self, client, aet, host, port):
        self.client = client
        self.aet = aet
        self.host = host
        self.port = port
        self.current = None
        self._wanted = {}  # (SOP class, transfer syntax) -> None, oldest first
        self._refused = set()
        self._stopped = False

    def _context(self, sop_class_uid, transfer_syntax):
        current = self.current
        if current is None or current.association is None or current.association.ended.called:
            return None
        try:
            return current.context_for(sop_class_uid, transfer_syntax)
        except LookupError:
            return None

    async def store(self, source, originator, priority):
        """
        @return: C{(status, error comment)}.
        @raise _DestinationDown: no association could be opened.
        """
        pair = (source.sop_class_uid, source.transfer_syntax)
        if self._stopped:
            return _NOT_SENT, None
        if pair in self._refused:
            return _NOT_SENT, "Move destination does not accept an instance"
        for attempt in (1, 2):
            if self._context(*pair) is None:
                await self._associate(*pair)
                if self._context(*pair) is None:
                    self._refused.add(pair)
                    return _NOT_SENT, "Move destination does not accept an instance"
            try:
                status = await self.current.store(
                    source.sop_class_uid,
                    source.sop_instance_uid,
                    source.transfer_syntax,
                    source.chunks(),
                    priority=priority,
                    move_originator=originator,
                )
            except AssociationAborted:
                # The destination dropped the association (maybe while idle):
                # once more on a new one.
                self.current = None
                if attempt == 2 or self._stopped:
                    return _NOT_SENT, "Move destination association failed"
                continue
            except Exception as e:
                log.warn("A C-MOVE sub-operation failed: {error}", error=e.__class__.__name__)
                self.abort()
                return _NOT_SENT, "Move destination association failed"
            return status.status, status.error_comment

    async def _associate(self, sop_class_uid, transfer_syntax):
        wanted = self._wanted
        wanted.pop((sop_class_uid, transfer_syntax), None)
        wanted[(sop_class_uid, transfer_syntax)] = None
        while len(wanted) > MAX_CONTEXTS:
            del wanted[next(iter(wanted))]
        await self.close()
        try:
            self.current = await self.client.associate(
                self.host, self.port, self.aet, [(sop_class, [ts]) for sop_class, ts in wanted]
            )
        except Exception as e:
            log.warn(
                "No association with move destination {aet} ({host}:{port}): {error}",
                aet=self.aet,
                host=self.host,
                port=self.port,
                error=e.__class__.__name__,
            )
            raise _DestinationDown("Move destination unavailable") from None
        if self._stopped:
            self.abort()

    async def close(self, abort=False):
        """
        Release (or abort) the current association.
        """
        current, self.current = self.current, None
        if current is None:
            return
        if abort:
            current.abort()
            return
        try:
            await current.release()
        except Exception:
            pass

    def abort(self):
        """
        Abort the current association (a new one may follow).
        """
        current, self.current = self.current, None
        if current is not None:
            current.abort()

    def shutdown(self):
        """
        The move has ended: abort the association, open no other.
        """
        self._stopped = True
        self.abort()
