"""
A fake PACS that aborts in the middle of a C-GET, for the integration tests
(run as a subprocess on 127.0.0.1, stopped with SIGTERM).

    python fake_abort_pacs.py PORT AE_TITLE COMPLETE.dcm PARTIAL.dcm

Built on Harmony's own DICOM stack (DicomServerFactory).  It answers every
C-GET-RQ (study or patient root) with:

  1. one complete C-STORE-RQ sub-operation: the data set of COMPLETE.dcm;
  2. once its C-STORE-RSP has arrived, a pending C-GET-RSP (1 completed,
     1 remaining), then the command of a second C-STORE-RQ (PARTIAL.dcm)
     and only the first P-DATA fragment of its data set (fragments of at
     most 4096 bytes, so a CT_small data set takes several);
  3. after a short pause (the fragment has reached the requestor), an
     A-ABORT.

Every step is printed (the test reads the log when something goes wrong).
"""

import sys

import pydicom
from twisted.internet import reactor

from harmony.dimse import messages
from harmony.dimse.association import AssociationSettings
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
    encode_identifier,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
UNCOMPRESSED = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
FRAGMENT = 4096
ABORT_AFTER = 0.3


def say(*words):
    print("fake-pacs:", *words, flush=True)


def load(path):
    ds = pydicom.dcmread(path)
    del ds.file_meta
    return ds


class AbortingGet:
    """
    One C-GET-RQ: the service object receiving its identifier, then the
    driver of the sub-operations.
    """

    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        self.message_id = command.fields["MessageID"]

    # -- the SCP's service object protocol ------------------------------------

    def fragment(self, data):
        pass  # whatever is asked for, the same two instances come back

    def finish(self):
        say("C-GET-RQ", self.message_id)
        self.store_context = self._storage_context()
        self._send_store(self.service.complete, whole=True)

    def aborted(self, association):
        say("association ended before the C-GET was answered")

    # -- sub-operations ----------------------------------------------------------

    def _storage_context(self):
        for context in self.association.contexts.values():
            if context.abstract_syntax == CT and context.requestor_scp:
                return context
        raise LookupError("the requestor did not take the SCP role for CT Image Storage")

    def _store_command(self, ds, message_id):
        return messages.encode_command(
            {
                "AffectedSOPClassUID": ds.SOPClassUID,
                "CommandField": messages.C_STORE_RQ,
                "MessageID": message_id,
                "Priority": 0,
                "CommandDataSetType": messages.DATASET_PRESENT,
                "AffectedSOPInstanceUID": ds.SOPInstanceUID,
            }
        )

    def _send_store(self, ds, whole):
        user = self.association.user
        message_id = user.next_message_id()
        context = self.store_context
        command = self._store_command(ds, message_id)
        data = encode_identifier(ds, context.transfer_syntax)
        if whole:
            user.expect_response(message_id, self._store_answered)
            self.association.send_message(context.id, command, data)
            say("sent complete C-STORE-RQ", ds.SOPInstanceUID)
            return
        command_pdus = len(list(messages.fragment(context.id, command, None, FRAGMENT)))
        pdus = list(messages.fragment(context.id, command, data, FRAGMENT))
        assert len(pdus) > command_pdus + 1, "the partial data set must take several fragments"
        for chunk in pdus[: command_pdus + 1]:
            self.association._event("Evt9", chunk)
        say("sent C-STORE-RQ", ds.SOPInstanceUID, f"and 1 of {len(pdus) - command_pdus} data set fragments")
        reactor.callLater(ABORT_AFTER, self._abort)

    def _store_answered(self, command):
        status = command.fields.get("Status")
        say(f"C-STORE-RSP status 0x{status:04X}")
        self._send_pending()
        self._send_store(self.service.partial, whole=False)

    def _send_pending(self):
        fields = {
            "AffectedSOPClassUID": self.context.abstract_syntax,
            "CommandField": messages.C_GET_RSP,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET,
            "Status": 0xFF00,
            "NumberOfRemainingSuboperations": 1,
            "NumberOfCompletedSuboperations": 1,
            "NumberOfFailedSuboperations": 0,
            "NumberOfWarningSuboperations": 0,
        }
        self.association.send_message(self.context.id, messages.encode_command(fields))

    def _abort(self):
        say("A-ABORT")
        self.association.abort()


class AbortingGetService:
    def __init__(self, complete, partial):
        self.complete = complete
        self.partial = partial

    def start(self, association, context, command):
        return AbortingGet(self, association, context, command)


def main(argv):
    port, ae_title, complete, partial = int(argv[1]), argv[2], argv[3], argv[4]
    policy = SCPPolicy(
        ae_title,
        {
            messages.VERIFICATION_SOP_CLASS: UNCOMPRESSED,
            STUDY_ROOT_GET: UNCOMPRESSED,
            PATIENT_ROOT_GET: UNCOMPRESSED,
            CT: UNCOMPRESSED,
        },
        requestor_scp_allowed=(CT,),
    )
    factory = DicomServerFactory(
        reactor,
        policy,
        AssociationSettings(idle_timeout=None),
        {messages.C_GET_RQ: AbortingGetService(load(complete), load(partial))},
    )
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    say("listening on", port, "as", ae_title)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
