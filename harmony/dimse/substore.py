# -*- test-case-name: tests.unit.test_dimse_get -*-
"""
The C-STORE sub-operations of a C-GET, answered by Harmony's SCU on the
association it requested (PS3.4 C.4.3.3: the SCP role for the storage SOP
classes was negotiated with SCP/SCU Role Selection).

The data set of each sub-operation is written exactly as the C-STORE SCP
writes it (L{harmony.dimse.store}): straight into a Part 10 file as its
fragments arrive (file meta from a template, never parsed), committed
atomically under the layout path; then the instance is handed to the
C-GET operation and the C-STORE-RSP is sent (Success, or the failure status
of the write).
"""

from harmony.dimse import status as dimse_status
from harmony.dimse.store import StoreService, _StoreOperation
from harmony.envelope import DicomInstance
from harmony.streams import Stream


class GetStoreService(StoreService):
    """
    Answers the C-STORE-RQ sub-operations of one C-GET.

    @param get: the operation told about each sub-operation: it gets
        C{_sub_stored(operation, DicomInstance)} once the file is committed
        and C{_sub_done(operation, status)} once the C-STORE-RSP is sent.
    """

    def __init__(self, get, storage, layout, fsync=False):
        StoreService.__init__(self, storage, layout, fsync=fsync, pipeline=None)
        self.get = get

    def _new_operation(self, association, context, command):
        return _SubStore(self, association, context, command)

    def drop_spare(self, association):
        """
        Abort the spare writer prepared for a next sub-operation (the C-GET
        has ended).
        """
        self._drop_spare(None, association)


class _SubStore(_StoreOperation):
    def _source_aet(self):
        # The instance came from the peer we called.
        return self.association.rq.called_aet or None

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
        self.service.get._sub_stored(self, instance)
        self._respond(dimse_status.SUCCESS, None)

    def _respond(self, status, comment):
        answered = self._answered
        _StoreOperation._respond(self, status, comment)
        if not answered:
            self.service.get._sub_done(self, status)
