# -*- test-case-name: tests.unit.test_dimse_scp -*-
"""
The DICOM server (SCP): association policy and the DIMSE services Harmony
answers itself (C-ECHO) or hands to a service object (C-STORE, C-FIND,
C-GET, C-MOVE, ...).

Besides requests, an SCP receives the responses to the requests it sends on
the same association: the C-STORE-RSPs of C-GET sub-operations
(L{harmony.dimse.retrieve}).  A service waiting for one registers it with
the association's user (C{association.user.expect_response}); a C-CANCEL-RQ
goes to the operation it names in C{association.operations}.

Association policy (PS3.8 9.3.4 reasons):

  - called AE title must be ours (when required): rejected permanently,
    source service-user, reason 7 "called AE title not recognized";
  - calling AE title must be allowed (when a list is configured): reason 3
    "calling AE title not recognized";
  - application context must be DICOM's: reason 2;
  - at most C{max_associations} at once, and at most
    C{max_associations_per_aet} from one calling AE title (when not 0):
    rejected transiently, source service-provider (presentation), reason 2
    "local limit exceeded".
"""

import attr
from twisted.internet.protocol import Factory

from harmony.dimse import messages, pdu
from harmony.dimse.association import Association, AssociationSettings
from harmony.dimse.negotiation import AcceptorPolicy, negotiate_as_acceptor
from harmony.dimse.scu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from harmony.envelope import Headers, RequestDetails, RequestEnvelope
from harmony.logs import dicom_access, logger

log = logger("harmony.dimse.scp")

#: A-ASSOCIATE-RJ values (PS3.8 Table 9-21).
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_NO_REASON = 1
RJ_APPLICATION_CONTEXT = 2
RJ_CALLING_AE = 3
RJ_CALLED_AE = 7
RJ_LOCAL_LIMIT = 2

#: DIMSE statuses used here (PS3.7 C).
SUCCESS = 0x0000
UNRECOGNIZED_OPERATION = 0x0211
SOP_CLASS_NOT_SUPPORTED = 0x0122


@attr.s(frozen=True)
class SCPPolicy:
    """
    Who may associate and what is negotiated.

    @ivar ae_title: our AE title.
    @ivar require_called_aet: reject a called AE title other than ours.
    @ivar allowed_calling_aets: calling AE titles allowed (empty: any).
    @ivar max_associations: concurrent associations accepted.
    @ivar max_associations_per_aet: concurrent associations accepted from
        one calling AE title (0: no limit but C{max_associations}).
    @ivar syntaxes: abstract syntax -> accepted transfer syntaxes.
    """

    ae_title = attr.ib()
    syntaxes = attr.ib()
    require_called_aet = attr.ib(default=True)
    allowed_calling_aets = attr.ib(factory=frozenset, converter=frozenset)
    max_associations = attr.ib(default=32)
    requestor_scp_allowed = attr.ib(factory=frozenset, converter=frozenset)
    max_associations_per_aet = attr.ib(default=0)


class DicomServerFactory(Factory):
    """
    Builds one L{Association} (acceptor) per connection.

    @param reactor: the clock for timers.
    @param policy: an L{SCPPolicy}.
    @param settings: L{AssociationSettings}.
    @param services: command field -> service object with
        C{command(session, Command)} and C{fragment(session, DataFragment)}
        (see L{StoreService}); C-ECHO is answered here when
        C{enable_echo}.
    @param metrics: a L{harmony.metrics.DicomMetrics} counting
        associations and final DIMSE responses, or C{None}.
    """

    noisy = False

    def __init__(self, reactor, policy, settings=None, services=None, enable_echo=True, metrics=None):
        self.reactor = reactor
        self.metrics = metrics
        self.policy = policy
        self.settings = settings or AssociationSettings()
        self.services = dict(services or {})
        self.enable_echo = enable_echo
        self.active = set()
        #: calling AE title -> associations of C{active} it opened.
        self.active_by_aet = {}
        self._acceptor = AcceptorPolicy(policy.syntaxes, policy.requestor_scp_allowed)

    def buildProtocol(self, addr):
        association = Association(False, _SCPUser(self), self.reactor, self.settings)
        association.factory = self
        if self.metrics is not None:
            self.metrics.observe(association)
        return association

    def answer(self, association, rq):
        """
        The A-ASSOCIATE-AC or -RJ for a request.

        @return: C{(answer, accepted contexts)}
        """
        policy = self.policy
        reject = None
        limit = ""
        if rq.application_context != pdu.DICOM_APPLICATION_CONTEXT:
            reject = pdu.AssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_APPLICATION_CONTEXT)
        elif policy.require_called_aet and rq.called_aet != policy.ae_title:
            reject = pdu.AssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE)
        elif policy.allowed_calling_aets and rq.calling_aet not in policy.allowed_calling_aets:
            reject = pdu.AssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE)
        elif len(self.active) >= policy.max_associations:
            reject = pdu.AssociateRJ(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT)
            limit = f" (max_associations = {policy.max_associations} reached)"
        elif (
            policy.max_associations_per_aet
            and self.active_by_aet.get(rq.calling_aet, 0) >= policy.max_associations_per_aet
        ):
            reject = pdu.AssociateRJ(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT)
            limit = f" (max_associations_per_aet = {policy.max_associations_per_aet} reached)"
        if reject is not None:
            log.info(
                "Association from {calling} to {called} ({peer}) rejected: source {source}, reason {reason}{limit}",
                calling=rq.calling_aet,
                called=rq.called_aet,
                peer=_peer(association),
                source=reject.source,
                reason=reject.reason,
                limit=limit,
            )
            if self.metrics is not None:
                self.metrics.association(rq.calling_aet, "rejected")
            return reject, None
        contexts, accepted, roles = negotiate_as_acceptor(rq.contexts, self._acceptor, rq.roles)
        ac = pdu.AssociateAC(
            called_aet=rq.called_aet,
            calling_aet=rq.calling_aet,
            contexts=contexts,
            max_pdu_length=self.settings.max_pdu_length,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            roles=roles,
        )
        self.active.add(association)
        self.active_by_aet[rq.calling_aet] = self.active_by_aet.get(rq.calling_aet, 0) + 1
        if self.metrics is not None:
            self.metrics.association(rq.calling_aet, "accepted")
        log.info(
            "Association from {calling} ({peer}) to {called} accepted: {accepted} of {proposed} contexts",
            calling=rq.calling_aet,
            called=rq.called_aet,
            peer=_peer(association),
            accepted=len(accepted),
            proposed=len(rq.contexts),
        )
        return ac, accepted

    def ended(self, association):
        if association not in self.active:
            return
        self.active.discard(association)
        aet = association.rq.calling_aet
        left = self.active_by_aet.get(aet, 0) - 1
        if left > 0:
            self.active_by_aet[aet] = left
        else:
            self.active_by_aet.pop(aet, None)


#: Largest request identifier accepted by a query/retrieve service (it is
#: decoded in memory).
MAX_QUERY = 1024 * 1024


class QueryOperation:
    """
    What C-FIND, C-GET and C-MOVE operations answered through a pipeline
    share: the request identifier collected (bounded by L{MAX_QUERY}) and
    the association's idle timer held while the pipeline works (the
    requestor rightly sends nothing until the final response).

    Subclasses set C{association}, C{_query} (a C{bytearray}) and define
    C{answer(status, comment)}.
    """

    _held = False
    _query_too_large = "Identifier too large"

    def fragment(self, data):
        if self._query is None:
            return
        self._query += data
        if len(self._query) > MAX_QUERY:
            self._query = None
            self.answer(0xA700, self._query_too_large)  # Refused: Out of Resources

    def _hold(self):
        if not self._held:
            self._held = True
            self.association.hold()

    def _release_hold(self):
        if self._held:
            self._held = False
            self.association.release_hold()


def request_envelope(association, method, path, request, **metadata):
    """
    The envelope of a DIMSE request received on an association this
    process accepted: details C{dicom://<called AE>/<path>} from the peer's
    address, the L{harmony.envelope.DicomRequest}, and metadata
    C{protocol}, C{calling_aet}, C{called_aet} plus C{metadata}.
    """
    rq = association.rq
    peer = association.peer
    details = RequestDetails(
        method=method,
        uri=f"dicom://{rq.called_aet}/{path}",
        path=path,
        full_path=path,
        headers=Headers(),
        client=(getattr(peer, "host", None), getattr(peer, "port", None)),
        scheme="dicom",
    )
    envelope = RequestEnvelope(details=details, dicom=request)
    envelope.metadata.update(
        {"protocol": "dimse", "calling_aet": rq.calling_aet, "called_aet": rq.called_aet}, **metadata
    )
    return envelope


def _peer(association):
    peer = association.peer
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


#: Request command field -> operation name in the association's access line.
OPERATION_NAMES = {
    messages.C_ECHO_RQ: "echo",
    messages.C_STORE_RQ: "store",
    messages.C_FIND_RQ: "find",
    messages.C_GET_RQ: "get",
    messages.C_MOVE_RQ: "move",
    messages.C_CANCEL_RQ: "cancel",
}


class _SCPUser:
    """
    The association user of an acceptor: dispatches DIMSE messages.
    """

    def __init__(self, factory):
        self.factory = factory
        self._current = None
        self._started = None
        #: For the access line: operation name -> requests received, and
        #: how the association ended (released, rejected; else aborted).
        self._operations = {}
        self._result = None
        self._responses = {}  # message ID of a request we sent -> handler
        self._next_id = 0

    # -- requests this side sends (C-GET sub-operations) --------------------

    def next_message_id(self):
        """
        The Message ID for a request this SCP sends on the association
        (1..65535, wrapping; none awaiting a response).
        """
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._responses:
                return self._next_id
        raise RuntimeError("every message ID is in use on this association")

    def expect_response(self, message_id, handler):
        """
        Call C{handler(Command)} with the response to the request
        C{message_id} when it arrives (once).
        """
        self._responses[message_id] = handler

    def forget_response(self, message_id):
        self._responses.pop(message_id, None)

    def associate_requested(self, association, rq):
        self._started = association.clock.seconds()
        association.ended.addBoth(self._ended, association)
        answer = self.factory.answer(association, rq)
        if not isinstance(answer[0], pdu.AssociateAC):
            self._result = "rejected"
        return answer

    def _ended(self, result, association):
        self.factory.ended(association)
        if self._started is not None and association.rq is not None:
            # The access line (also of a rejected association).
            dicom_access(
                association.rq.calling_aet,
                association.rq.called_aet,
                _peer(association),
                association.clock.seconds() - self._started,
                self._operations,
                self._result or "aborted",
            )
        current, self._current = self._current, None
        if current is not None:
            current.aborted(association)
        for operation in list(association.operations.values()):
            operation.aborted(association)
        association.operations.clear()
        self._responses.clear()
        return result

    def established(self, association):
        pass

    def command(self, association, command):
        field = command.command_field
        if not field & 0x8000:
            name = OPERATION_NAMES.get(field) or f"0x{field:04X}"
            self._operations[name] = self._operations.get(name, 0) + 1
        context = association.contexts[command.context_id]
        fields = command.fields
        if field == messages.C_CANCEL_RQ and messages.C_CANCEL_RQ not in self.factory.services:
            # No response of its own: the operation it cancels answers (a
            # cancel for an operation already answered is ignored).
            operation = association.operations.get(fields.get("MessageIDBeingRespondedTo"))
            if operation is not None:
                operation.cancel()
            return
        if field & 0x8000 and field not in self.factory.services:
            self._response(association, command)
            return
        if field == messages.C_ECHO_RQ and self.factory.enable_echo:
            rsp = messages.echo_rsp(fields.get("MessageID", 0), SUCCESS)
            association.send_message(command.context_id, rsp)
            return
        service = self.factory.services.get(field)
        if service is None:
            rsp = messages.encode_command(
                {
                    "AffectedSOPClassUID": context.abstract_syntax,
                    "CommandField": field | 0x8000,
                    "MessageIDBeingRespondedTo": fields.get("MessageID", 0),
                    "CommandDataSetType": messages.NO_DATASET,
                    "Status": UNRECOGNIZED_OPERATION,
                }
            )
            if command.has_dataset:
                self._current = _Discard()
            association.send_message(command.context_id, rsp)
            return
        self._current = service.start(association, context, command)

    def _response(self, association, command):
        """
        A response to a request this side sent: to whoever waits for it;
        never answered.
        """
        if command.has_dataset:
            self._current = _Discard()
        handler = self._responses.pop(command.fields.get("MessageIDBeingRespondedTo"), None)
        if handler is None:
            log.warn(
                "Response (command field {field:04X}) from {peer} to no request in progress: ignored",
                field=command.command_field,
                peer=_peer(association),
            )
            return
        handler(command)

    def fragment(self, association, fragment):
        current = self._current
        if current is None:
            association.abort(2, 0)
            return
        current.fragment(fragment.data)
        if fragment.last:
            self._current = None
            current.finish()

    def release_requested(self, association):
        self._result = "released"

    def released(self, association):
        pass

    def aborted(self, association, source, reason):
        log.info(
            "Association from {peer} aborted (source {source}, reason {reason})",
            peer=_peer(association),
            source=source,
            reason=reason,
        )

    def accepted(self, association, ac):
        raise RuntimeError("an acceptor does not receive A-ASSOCIATE-AC")

    def rejected(self, association, rj):
        raise RuntimeError("an acceptor does not receive A-ASSOCIATE-RJ")


class _Discard:
    """
    Swallows the data set of a message that was already answered.
    """

    def fragment(self, data):
        pass

    def finish(self):
        pass

    def aborted(self, association):
        pass
