# -*- test-case-name: tests.unit.test_dimse_get,tests.unit.test_dimse_move_router -*-
"""
C-STORE sub-operations answered for an operation in progress: those of a
C-GET, on the association Harmony's SCU requested (PS3.4 C.4.3.3: the SCP
role for the storage SOP classes was negotiated with SCP/SCU Role
Selection), and those of a C-MOVE Harmony asked for, arriving at one of its
store SCPs (L{harmony.dimse.move}).

The data set of each sub-operation is written exactly as the C-STORE SCP
writes it (L{harmony.dimse.store}): straight into a Part 10 file as its
fragments arrive (file meta from a template, never parsed), committed
atomically under the layout path; then the instance is handed to the
operation and the C-STORE-RSP is sent (Success, or the failure status of
the write: never Success for an instance not stored).

With a L{MemoryBudget} (instances retrieved only to be relayed, by a
consumer that takes them from memory), a data set is collected in memory
instead while the budget has room for it, and handed over as the bytes of
its Part 10 file (C{DicomInstance.data}, no C{path}); the budget is given
back when the consumer disposes of it.  A data set that outgrows the
budget goes on into a file as above, its fragments so far written first.
"""

from harmony.dimse import status as dimse_status
from harmony.dimse.store import StoreService, _StoreOperation
from harmony.envelope import DicomInstance
from harmony.storage.dicom import uids_from_dataset_prefix
from harmony.streams import Stream


class MemoryBudget:
    """
    The bytes of relayed instances one retrieve may hold in memory at a
    time (received, not yet disposed of by the consumer).

    @param parent: a budget shared with other retrieves (all of a
        backend's), drawn on too: a reservation needs room in both.
    """

    def __init__(self, limit, parent=None):
        if limit < 0:
            raise ValueError("a memory budget cannot be negative")
        self.limit = limit
        self.parent = parent
        self.held = 0

    def take(self, n):
        """
        Reserve C{n} bytes: C{False} (nothing reserved) when they do not fit.
        """
        if self.held + n > self.limit:
            return False
        if self.parent is not None and not self.parent.take(n):
            return False
        self.held += n
        return True

    def give(self, n):
        """
        Return C{n} reserved bytes.
        """
        n = min(n, self.held)
        self.held -= n
        if self.parent is not None:
            self.parent.give(n)


class SubStoreService(StoreService):
    """
    Answers the C-STORE-RQ sub-operations of one operation.

    @param owner: the operation told about each sub-operation:
        C{_sub_stored(operation, DicomInstance)} once the file is
        committed, C{_sub_done(operation, status)} once the C-STORE-RSP is
        sent (or would have been, on an association that has ended), and
        C{_sub_aborted(operation)} when it ends unanswered (its association
        ended before its data set had arrived, nothing stored).
    @param sender: which AE of the association sent the instances (the
        file meta's Source AE Title): C{"called"} (we requested the
        association: C-GET) or C{"calling"} (the peer requested it: C-MOVE
        sub-operations at our store SCP).
    """

    def __init__(self, owner, storage, layout, fsync=False, sender="called", memory=None):
        if sender not in ("called", "calling"):
            raise ValueError(f"sender must be 'called' or 'calling', not {sender!r}")
        StoreService.__init__(self, storage, layout, fsync=fsync, pipeline=None)
        self.owner = owner
        self.sender_field = f"{sender}_aet"
        #: A L{MemoryBudget} when instances may be held in memory.
        self.memory = memory

    def prepare_writer(self, association):
        if self.memory is None:
            StoreService.prepare_writer(self, association)
        # Otherwise a file is opened only for a data set that outgrows the
        # budget.

    def start(self, association, context, command):
        # Never routed further: this service is a routing target.
        return self._start(association, context, command)

    def _new_operation(self, association, context, command):
        return _SubStore(self, association, context, command)


#: The C-GET flavour's earlier name.
GetStoreService = SubStoreService


class _SubStore(_StoreOperation):
    def __init__(self, service, association, context, command):
        _StoreOperation.__init__(self, service, association, context, command)
        self._gone = False
        #: Collected in memory while the budget allows (else into a file).
        self._in_memory = service.memory is not None
        #: The Part 10 file so far, in pieces: the file meta, then the data
        #: set's fragments as received (joined once, when complete: growing
        #: one buffer moved it on every reallocation).
        self._held = None
        #: The data set's bytes held (the budget reserved).
        self._held_size = 0
        self._meta_size = 0

    def _source_aet(self):
        return getattr(self.association.rq, self.service.sender_field) or None

    # -- in memory --------------------------------------------------------------

    def fragment(self, data):
        if not self._in_memory or self._failed is not None:
            _StoreOperation.fragment(self, data)
            return
        if self._held is None and not self._start_held():
            return
        if self.service.memory.take(len(data)):
            # A view of the received bytes (never changed once received),
            # which keeps the read it came in alive until the data set is
            # complete: at most one read (1 MiB) beyond the budget.
            self._held.append(data)
            self._held_size += len(data)
            return
        self._spill()
        _StoreOperation.fragment(self, data)

    def _start_held(self):
        meta = self._meta()
        if meta is None:
            return False
        self._held = [meta]
        self._held_size = 0
        self._meta_size = len(meta)
        return True

    def _release(self):
        """
        Stop holding the data set in memory; its budget is given back.
        """
        held, self._held = self._held, None
        self._in_memory = False
        if held is not None:
            self.service.memory.give(self._held_size)
        return held

    def _spill(self):
        """
        The data set outgrew the budget: into a file, its bytes so far
        first.
        """
        held = self._release()
        for data in held[1:]:
            _StoreOperation.fragment(self, data)

    def finish(self):
        if not self._in_memory or self._failed is not None:
            self._release()
            _StoreOperation.finish(self)
            return
        if self._held is None and not self._start_held():
            self._respond(*self._failed)
            return
        size = self._held_size
        held, self._held = b"".join(self._held), None  # the reservation now belongs to the instance
        memory = self.service.memory
        failure = self._check(memoryview(held)[self._meta_size :])
        if failure is not None:
            memory.give(size)
            self.fail(*failure)
            self._respond(*failure)
            return

        def dispose():
            if not dispose.done:
                dispose.done = True
                memory.give(size)

        dispose.done = False
        instance = DicomInstance(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax,
            data=held,
            size=len(held),
            dispose=dispose,
            uids=self._uids,
        )
        self.service.owner._sub_stored(self, instance)
        self._respond(dimse_status.SUCCESS, None)

    def _check(self, data):
        """
        The UIDs of a data set held in memory, checked as the file's are:
        C{None}, or the (status, comment) it is refused with.
        """
        try:
            study, series, sop = uids_from_dataset_prefix(data, self.transfer_syntax, final=True)
        except ValueError:
            return dimse_status.CANNOT_UNDERSTAND, "The data set cannot be decoded"
        self._uids = (study, series, sop)
        return self._uid_refusal(study, series, sop)

    def fail(self, status, comment):
        self._release()
        _StoreOperation.fail(self, status, comment)

    # -- in a file ----------------------------------------------------------------

    def _stored(self, stored):
        self._writer = None
        instance = DicomInstance(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax,
            # Opened only if a consumer reads it.
            data=(
                Stream.from_path(stored.path, stored.size) if stored.path else self.service.storage.read(stored.relpath)
            ),
            size=stored.size,
            path=stored.path,
            uids=self._uids,
        )
        self.service.owner._sub_stored(self, instance)
        self._respond(dimse_status.SUCCESS, None)

    def _store_failed(self, failure):
        if self._failed is not None:
            # Cancelled by its owner while committing: answered as it said.
            self._respond(*self._failed)
            return
        _StoreOperation._store_failed(self, failure)

    def _respond(self, status, comment):
        answered = self._answered
        _StoreOperation._respond(self, status, comment)
        if not answered and not self._gone:
            self.service.owner._sub_done(self, status)

    def aborted(self, association):
        self._release()
        _StoreOperation.aborted(self, association)
        if not self._answered and not self._gone:
            self._gone = True
            self.service.owner._sub_aborted(self)

    def cancel(self, status, comment):
        """
        The owner gives up on this sub-operation: its file is discarded
        (a commit under way is cancelled) and it is answered with
        C{status} and C{comment}, at once when its data set has arrived,
        otherwise when it has.
        """
        if self._answered:
            return
        self.fail(status, comment)
