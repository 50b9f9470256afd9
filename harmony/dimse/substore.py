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
"""

from harmony.dimse import status as dimse_status
from harmony.dimse.store import StoreService, _StoreOperation
from harmony.envelope import DicomInstance
from harmony.streams import Stream


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

    def __init__(self, owner, storage, layout, fsync=False, sender="called"):
        if sender not in ("called", "calling"):
            raise ValueError(f"sender must be 'called' or 'calling', not {sender!r}")
        StoreService.__init__(self, storage, layout, fsync=fsync, pipeline=None)
        self.owner = owner
        self.sender_field = f"{sender}_aet"

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

    def _source_aet(self):
        return getattr(self.association.rq, self.service.sender_field) or None

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
