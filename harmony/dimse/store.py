# -*- test-case-name: tests.unit.test_dimse_store -*-
"""
The C-STORE SCP service: received data sets are written straight into a
DICOM Part 10 file as their fragments arrive (file meta built from a
template, the data set never parsed), the file is committed atomically,
and then the instance goes through the endpoint's pipeline.  The
C-STORE-RSP is Success only when the file is written and the pipeline
succeeded; otherwise a PS3.4 failure status with an Error Comment.

With a L{harmony.dimse.move.MoveRouter}, a C-STORE-RQ that is a
sub-operation of a C-MOVE Harmony asked for is handed to that move instead
(stored into its storage, delivered on its instance stream; no pipeline).
"""

from collections import deque

from twisted.internet import defer
from twisted.internet.defer import CancelledError

from harmony.dimse import messages
from harmony.dimse import status as dimse_status
from harmony.dimse.scp import request_envelope
from harmony.dimse.scu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from harmony.envelope import DicomInstance, DicomRequest
from harmony.logs import logger
from harmony.storage.dicom import NeedMoreData, file_meta, layout_path, uids_from_dataset_prefix
from harmony.streams import Stream

log = logger("harmony.dimse.store")

#: Bytes of the beginning of a data set copied, at most, while looking for
#: the Study and Series Instance UIDs that name the file (the fragments
#: themselves go to the file as they arrive).
MAX_PREFIX = 4 * 1024 * 1024

#: Files made ready at most per association ahead of its next instances.
MAX_SPARES = 8


class _Spares:
    """
    The files made ready for an association's next instances.

    @ivar ready: L{harmony.storage.interfaces.IStorageWriter}s, oldest first.
    @ivar pending: the Deferred of a batch being made, or C{None}.
    @ivar batch: how many to hold after each batch (doubled, up to
        L{MAX_SPARES}, each time an instance arrived before its file).
    """

    __slots__ = ("ready", "pending", "batch")

    def __init__(self):
        self.ready = deque()
        self.pending = None
        self.batch = 1


class StoreService:
    """
    Answers C-STORE-RQ.

    @param storage: an L{harmony.storage.interfaces.IStorage}.
    @param layout: the relpath template (C{"{study}/{series}/{sop}.dcm"}).
    @param fsync: make each file durable before answering.
    @param pipeline: C{(executor, endpoint)} the instance is sent through,
        or C{None} to store only.
    @param router: a L{harmony.dimse.move.MoveRouter} (or anything with
        C{route(association, command) -> service or None}): C-STORE-RQs it
        routes are answered by the service it names (the sub-operations of
        a C-MOVE in flight), the others here as before; C{None}: none.
    """

    def __init__(self, storage, layout, fsync=False, pipeline=None, router=None):
        self.storage = storage
        self.layout = layout
        self.fsync = fsync
        self.pipeline = pipeline
        self.router = router
        #: association -> L{_Spares}
        self._spares = {}
        #: The associations whose end removes their spares.
        self._hooked = set()
        self._spares_off = False

    # -- spare writers: the next instances' temporary files are created in
    # -- the thread pool while the peer prepares those instances.

    def take_writer(self, association):
        spares = self._spares.get(association)
        if spares is not None:
            if spares.ready:
                return spares.ready.popleft()
            if spares.pending is not None:
                # The pool is behind the peer: more files per batch from now
                # on.  Those being made serve the next instances.
                spares.batch = min(MAX_SPARES, spares.batch * 2)
        return self.storage.open_writer(fsync=self.fsync)

    def prepare_writer(self, association):
        """
        Have files ready for the next instances on C{association}: a batch
        is made once at most half of L{_Spares.batch} are left (one file
        at first; more while the pool cannot keep up with the peer).
        """
        prepare = getattr(self.storage, "prepare_writers", None)
        if prepare is None or self._spares_off or association._closed:
            return
        if association not in self._hooked:
            # Once per association (not per batch, nor per C-GET on it).
            self._hooked.add(association)
            association.ended.addBoth(self._association_ended, association)
        spares = self._spares.get(association)
        if spares is None:
            spares = self._spares[association] = _Spares()
        elif spares.pending is not None or len(spares.ready) > spares.batch // 2:
            return
        d = spares.pending = prepare(spares.batch - len(spares.ready), fsync=self.fsync)

        def ready(writers):
            if self._spares.get(association) is spares and spares.pending is d:
                spares.pending = None
                spares.ready.extend(writers)
            else:
                self._discard(writers)

        def failed(failure):
            if self._spares.get(association) is spares and spares.pending is d:
                spares.pending = None
            if not failure.check(defer.CancelledError):
                log.warn("Preparing a storage file failed: {error}", error=failure.getErrorMessage())

        d.addCallbacks(ready, failed)

    def _association_ended(self, result, association):
        self._hooked.discard(association)
        self.drop_spare(association)
        return result

    def drop_spare(self, association):
        """
        Remove the spare files prepared for next instances on
        C{association} (no more are expected there).
        """
        spares = self._spares.pop(association, None)
        if spares is not None:
            # Those still being made are removed when ready (see prepare_writer).
            spares.pending = None
            ready, spares.ready = list(spares.ready), deque()
            if ready:
                self._discard(ready)

    def _discard(self, writers):
        """
        Remove unused spare files: in the thread pool when the storage can
        (up to L{MAX_SPARES} unlinks), else here.
        """
        discard = getattr(self.storage, "discard_writers", None)
        if discard is None:
            for writer in writers:
                writer.abort()
            return
        discard(writers).addErrback(
            lambda f: log.warn("Removing spare storage files failed: {error}", error=f.getErrorMessage())
        )

    def drop_spares(self):
        """
        Remove every spare file and prepare no more (this service's work is
        over: the C-MOVE it received instances for has ended).
        """
        self._spares_off = True
        for association in list(self._spares):
            self.drop_spare(association)

    def _new_operation(self, association, context, command):
        # A subclass answers C-STORE sub-operations of a C-GET with its own
        # kind of operation (harmony.dimse.substore).
        return _StoreOperation(self, association, context, command)

    def start(self, association, context, command):
        """
        A C-STORE-RQ: the object its data set fragments go to (C{None} when
        it has none and was answered already).
        """
        router = self.router
        if router is not None:
            service = router.route(association, command)
            if service is not None:
                return service.start(association, context, command)
        return self._start(association, context, command)

    def _start(self, association, context, command):
        operation = self._new_operation(association, context, command)
        if operation.sop_class_uid != context.abstract_syntax:
            operation.fail(
                dimse_status.SOP_CLASS_NOT_SUPPORTED,
                "Affected SOP Class UID differs from the presentation context's",
            )
        if not command.has_dataset:
            operation.fail(dimse_status.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
            operation.finish()
            return None
        return operation


class _StoreOperation:
    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        fields = command.fields
        self.message_id = fields.get("MessageID", 0)
        self.sop_class_uid = fields.get("AffectedSOPClassUID") or context.abstract_syntax
        self.sop_instance_uid = fields.get("AffectedSOPInstanceUID") or ""
        self.transfer_syntax = context.transfer_syntax
        self._prefix = []
        self._prefix_size = 0
        self._writer = None
        self._relpath = None
        #: The data set's (study, series, SOP instance) UIDs once read.
        self._uids = None
        self._failed = None
        self._answered = False

    # -- fragments ----------------------------------------------------------

    def fragment(self, data):
        if self._failed is not None:
            return
        if self._writer is None and not self._open():
            return
        self._write(data)
        if self._relpath is None and self._failed is None:
            # A bounded copy of the beginning, for the tag walk only.
            self._prefix.append(bytes(data))
            self._prefix_size += len(data)
            self._find_uids(final=False)

    def finish(self):
        if self._failed is None and self._writer is None:
            self._open()
        if self._failed is None and self._relpath is None:
            self._find_uids(final=True)
        if self._failed is not None:
            self._respond(*self._failed)
            return
        d = self._writer.commit(self._relpath)
        d.addCallbacks(self._stored, self._store_failed)
        d.addErrback(self._pipeline_failed)

    def aborted(self, association):
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    # -- internals ------------------------------------------------------------

    def fail(self, status, comment):
        if self._failed is None:
            self._failed = (status, comment)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._prefix = []

    def _open(self):
        """
        Start the file: fragments go straight into it as they arrive; its
        name is decided at commit, once the UIDs are known.
        """
        meta = self._meta()
        if meta is None:
            return False
        try:
            self._writer = self.service.take_writer(self.association)
        except OSError as e:
            log.error("Cannot create a stored instance: {error}", error=e.strerror)
            self.fail(dimse_status.OUT_OF_RESOURCES, "Storage unavailable")
            return False
        self._write(meta)
        return self._failed is None

    def _meta(self):
        """
        The file meta of this instance's Part 10 file (C{None}: refused).
        """
        try:
            return file_meta(
                self.sop_class_uid,
                self.sop_instance_uid,
                self.transfer_syntax,
                IMPLEMENTATION_CLASS_UID,
                IMPLEMENTATION_VERSION_NAME,
                source_aet=self._source_aet(),
            )
        except ValueError:
            self.fail(dimse_status.CANNOT_UNDERSTAND, "Invalid SOP Class or Instance UID in the command")
            return None

    def _source_aet(self):
        # The AE that sent the instance: the calling AE of an association
        # we accepted.
        return self.association.rq.calling_aet or None

    def _write(self, data):
        try:
            self._writer.write(data)
        except OSError as e:
            log.error("Cannot write a received instance: {error}", error=e.strerror)
            self.fail(dimse_status.OUT_OF_RESOURCES, "Storage write failed")

    def _find_uids(self, final):
        data = b"".join(self._prefix) if len(self._prefix) > 1 else (self._prefix[0] if self._prefix else b"")
        self._prefix = [data] if data else []
        try:
            study, series, sop = uids_from_dataset_prefix(data, self.transfer_syntax, final=final)
        except NeedMoreData:
            if self._prefix_size > MAX_PREFIX:
                self.fail(
                    dimse_status.CANNOT_UNDERSTAND,
                    "Study/Series Instance UID not in the first 4 MiB of the data set",
                )
            return
        except ValueError:
            self.fail(dimse_status.CANNOT_UNDERSTAND, "The data set cannot be decoded")
            return
        self._prefix = []
        refusal = self._uid_refusal(study, series, sop)
        if refusal is not None:
            self.fail(*refusal)
            return
        self._uids = (study, series, sop)
        try:
            self._relpath = layout_path(self.service.layout, study, series, self.sop_instance_uid)
        except ValueError:
            self.fail(dimse_status.CANNOT_UNDERSTAND, "UIDs unusable as a storage path")

    def _uid_refusal(self, study, series, sop):
        """
        C{None} when the data set's UIDs are usable, else the (status,
        comment) it is refused with.
        """
        if not study or not series:
            return dimse_status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Data set has no Study or Series Instance UID"
        if sop and sop != self.sop_instance_uid:
            return (
                dimse_status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID of the data set differs from the command's",
            )
        return None

    def _stored(self, stored):
        self._writer = None
        pipeline = self.service.pipeline
        if pipeline is None:
            self._respond(dimse_status.SUCCESS, None)
            return None
        executor, endpoint = pipeline
        envelope = self._envelope(stored)
        d = executor.execute(endpoint, envelope)
        d.addCallback(self._pipeline_done)
        return d

    def _store_failed(self, failure):
        log.error("Committing a received instance failed: {error}", error=failure.getErrorMessage())
        self._respond(dimse_status.OUT_OF_RESOURCES, "Storage commit failed")

    def _pipeline_failed(self, failure):
        # The executor renders errors itself; this is a bug or a cancel.
        if not failure.check(CancelledError):
            log.failure("The pipeline of a C-STORE failed", failure)
        self._respond(dimse_status.PROCESSING_FAILURE, "Processing failure")

    def _envelope(self, stored):
        association = self.association
        rq = association.rq
        instance = DicomInstance(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax,
            # Opened only if a consumer reads it.
            data=Stream.from_path(stored.path, stored.size) if stored.path else self.service.storage.read(stored.relpath),
            size=stored.size,
            path=stored.path,
        )
        request = DicomRequest(
            operation="store",
            calling_aet=rq.calling_aet,
            called_aet=rq.called_aet,
            instances=Stream.from_iterable([instance]),
            user_identity=rq.user_identity,
        )
        return request_envelope(association, "C-STORE", "store", request, stored_relpath=stored.relpath)

    def _pipeline_done(self, response):
        result = response.dicom
        if result is not None and result.status is not None:
            status, comment = result.status, result.error_comment
        else:
            status = dimse_status.status_for_http(response.status)
            comment = None if status == dimse_status.SUCCESS else f"Pipeline answered HTTP {response.status}"
        self._respond(status, comment)

    def _respond(self, status, comment):
        if self._answered:
            return
        self._answered = True
        association = self.association
        if association._closed:
            return
        if comment is not None:
            comment = comment[:64]  # Error Comment is LO (PS3.7 C.4.2.1.3)
        rsp = messages.store_rsp(self.message_id, self.sop_class_uid, self.sop_instance_uid, status, comment)
        association.send_message(self.context.id, rsp, now=True)
        self.service.prepare_writer(association)

