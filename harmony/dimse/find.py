# -*- test-case-name: tests.unit.test_dimse_find_scp -*-
"""
The C-FIND SCP service: the query goes through the endpoint's pipeline as
a C{DicomRequest} (operation find); the matches the backend streams back
are sent as pending responses as they arrive, then the final status.
C-CANCEL-RQ cancels the backend's query and answers Cancel (FE00).
"""

from twisted.internet import defer

from harmony.dimse import messages
from harmony.dimse import status as dimse_status
from harmony.dimse.scp import QueryOperation, request_envelope
from harmony.dimse.scu import FIND_MODELS, decode_identifier, encode_identifier, received_encoding
from harmony.envelope import DicomRequest
from harmony.logs import logger
from harmony.streams import EOF, StreamCancelled

log = logger("harmony.dimse.find")

PENDING = 0xFF00
CANCEL = 0xFE00
#: PS3.4 C.4.1.1.4 failure statuses.
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
OUT_OF_RESOURCES = 0xA700

_MODEL_OF = {uid: name for name, uid in FIND_MODELS.items()}


class FindService:
    """
    Answers C-FIND-RQ through a pipeline.

    @param pipeline: C{(executor, endpoint)}.
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline
        executor = pipeline[0]
        #: Without middleware nothing can change the backend's matches
        #: before they are sent: those received from a PACS in the same
        #: transfer syntax go on as received, never re-encoded.
        self.passthrough = not (getattr(executor, "request_chain", ()) or getattr(executor, "response_chain", ()))

    def start(self, association, context, command):
        operation = _FindOperation(self, association, context, command)
        association.operations[operation.message_id] = operation
        if not command.has_dataset:
            operation.answer(IDENTIFIER_DOES_NOT_MATCH, "C-FIND-RQ without an identifier")
            return None
        return operation


class _FindOperation(QueryOperation):
    _query_too_large = "Query identifier too large"

    def __init__(self, service, association, context, command):
        self.service = service
        self.association = association
        self.context = context
        fields = command.fields
        self.message_id = fields.get("MessageID", 0)
        self.priority = fields.get("Priority", 0)
        self.sop_class_uid = fields.get("AffectedSOPClassUID") or context.abstract_syntax
        self._query = bytearray()
        self._matches = None
        self._answered = False
        self._cancelled = False

    # -- the request identifier ---------------------------------------------

    def finish(self):
        if self._query is None or self._answered:
            return
        try:
            identifier = decode_identifier(bytes(self._query), self.context.transfer_syntax)
        except Exception:
            self.answer(UNABLE_TO_PROCESS, "The query identifier cannot be decoded")
            return
        self._query = None
        level = str(identifier.get("QueryRetrieveLevel", "") or "").upper()
        if self.sop_class_uid != self.context.abstract_syntax:
            self.answer(dimse_status.SOP_CLASS_NOT_SUPPORTED, "SOP Class differs from the presentation context's")
            return
        if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
            self.answer(IDENTIFIER_DOES_NOT_MATCH, "QueryRetrieveLevel missing or invalid")
            return
        executor, endpoint = self.service.pipeline
        # The requestor waits for our responses: not idle meanwhile.
        self._hold()
        d = executor.execute(endpoint, self._envelope(identifier, level))
        d.addCallback(self._respond)
        d.addErrback(self._failed)

    def _envelope(self, identifier, level):
        association = self.association
        rq = association.rq
        request = DicomRequest(
            operation="find",
            query_model=_MODEL_OF.get(self.sop_class_uid, "study"),
            level=level,
            identifier=identifier,
            priority=self.priority,
            calling_aet=rq.calling_aet,
            called_aet=rq.called_aet,
            user_identity=rq.user_identity,
        )
        return request_envelope(association, "C-FIND", "find", request, level=level)

    # -- answering --------------------------------------------------------------

    async def _stream(self, result):
        matches = result.matches
        self._matches = matches
        if matches is not None:
            while True:
                try:
                    match = await matches.read()
                except StreamCancelled:
                    return
                if match is EOF:
                    break
                if self._answered:
                    matches.cancel()
                    return
                self._pending(match)
        if result.done is not None:
            status, comment = await result.done
        else:
            status, comment = result.status, result.error_comment
        self.answer(status if status is not None else dimse_status.SUCCESS, comment)

    def _respond(self, response):
        result = response.dicom
        if result is None:
            status = dimse_status.status_for_http(response.status)
            if status == dimse_status.SUCCESS:
                status = UNABLE_TO_PROCESS  # no matches from a backend that cannot query
            self.answer(status, "The pipeline did not answer the query")
            return None
        if self._cancelled:
            if result.matches is not None:
                result.matches.cancel()
            return None
        return defer.Deferred.fromCoroutine(self._stream(result))

    def _failed(self, failure):
        if not failure.check(defer.CancelledError):
            log.warn("A C-FIND failed: {error}", error=failure.getErrorMessage())
        self.answer(OUT_OF_RESOURCES, "The query could not be completed")

    def _pending(self, match):
        association = self.association
        if association._closed:
            return
        transfer_syntax = self.context.transfer_syntax
        data = received_encoding(match, transfer_syntax) if self.service.passthrough else None
        try:
            if data is None:
                data = encode_identifier(match, transfer_syntax)
        except Exception:
            log.warn("A C-FIND match could not be encoded; skipped")
            return
        rsp = messages.encode_command(
            {
                "AffectedSOPClassUID": self.sop_class_uid,
                "CommandField": messages.C_FIND_RSP,
                "MessageIDBeingRespondedTo": self.message_id,
                "CommandDataSetType": messages.DATASET_PRESENT,
                "Status": PENDING,
            }
        )
        association.send_message(self.context.id, rsp, data)

    def answer(self, status, comment=None):
        """
        Send the final response (once).
        """
        if self._answered:
            return
        self._answered = True
        association = self.association
        self._release_hold()
        association.operations.pop(self.message_id, None)
        if association._closed:
            return
        fields = {
            "AffectedSOPClassUID": self.sop_class_uid,
            "CommandField": messages.C_FIND_RSP,
            "MessageIDBeingRespondedTo": self.message_id,
            "CommandDataSetType": messages.NO_DATASET,
            "Status": status,
        }
        if comment and dimse_status.is_failure(status):
            fields["ErrorComment"] = comment[:64]
        association.send_message(self.context.id, messages.encode_command(fields))

    def cancel(self):
        """
        C-CANCEL-RQ from the peer: stop the backend's query, answer Cancel.
        """
        self._cancelled = True
        if self._matches is not None:
            self._matches.cancel()
        self.answer(CANCEL)

    def aborted(self, association):
        self._release_hold()
        self._answered = True
        if self._matches is not None:
            self._matches.cancel()
