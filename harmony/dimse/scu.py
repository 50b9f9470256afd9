# -*- test-case-name: tests.unit.test_dimse_scu -*-
"""
The DICOM client (SCU): Deferred-based associations on Harmony's own upper
layer.

    client = DicomClient(reactor, local_aet="HARMONY_SCU")
    assoc = await client.associate("127.0.0.1", 104, "PACS", [(VERIFICATION, [IMPLICIT_LE])])
    status = await assoc.echo()
    await assoc.release()
"""

import struct

import attr
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory

from harmony import __version__
from harmony.dimse import messages, pdu
from harmony.dimse.association import (
    Association,
    AssociationAborted,
    AssociationRejected,
    AssociationSettings,
)
from harmony.dimse.negotiation import NegotiationError, build_contexts, negotiate_as_requestor
from harmony.logs import logger

log = logger("harmony.dimse.scu")

#: Harmony's implementation class UID (under the UUID-derived 2.25 root) and
#: version name, sent in every A-ASSOCIATE.
IMPLEMENTATION_CLASS_UID = "2.25.266364387364405356263414298946427465857"
IMPLEMENTATION_VERSION_NAME = f"HARMONY_{__version__}"[:16]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


class DimseTimeout(Exception):
    """
    The peer did not answer a DIMSE request in time (the association is
    aborted).
    """


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
        # C-ECHO/C-STORE responses carry no data set.
        association.abort(2, 0)

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

    def _response(self, command):
        fields = command.fields
        message_id = fields.get("MessageIDBeingRespondedTo")
        entry = self._pending.pop(message_id, None)
        if entry is None:
            log.warn("Response to unknown message {id}: aborting", id=message_id)
            self.association.abort(2, 0)
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(DimseStatus(fields.get("Status", 0xC000), fields.get("ErrorComment"), fields))

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
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _request(self, context_id, fields, dataset=None):
        if self._error is not None:
            return defer.fail(self._error)
        if self.association._closed:
            return defer.fail(AssociationAborted(message="the association has ended"))
        message_id = fields["MessageID"]
        d = defer.Deferred()
        timer = self._client.reactor.callLater(self._dimse_timeout, self._timed_out, message_id)
        self._pending[message_id] = (d, timer)
        sent = self.association.send_message(context_id, messages.encode_command(fields), dataset)
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
            _file_chunks(path, header.dataset_offset, chunk_size),
            priority=priority,
            move_originator=move_originator,
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


def _file_chunks(path, offset, chunk_size):
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


class DicomClient:
    """
    Opens associations to DICOM peers.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param local_aet: our (calling) AE title.
    @param settings: L{AssociationSettings} (max PDU we accept, timers).
    @param connect_timeout: seconds for TCP connect + association.
    @param dimse_timeout: seconds to wait for each DIMSE response.
    """

    def __init__(self, reactor, local_aet="HARMONY_SCU", settings=None, connect_timeout=10, dimse_timeout=30):
        pdu.validate_ae_title(local_aet, "calling AE title")
        self.reactor = reactor
        self.local_aet = local_aet
        self.settings = settings or AssociationSettings()
        self.connect_timeout = connect_timeout
        self.dimse_timeout = dimse_timeout

    def associate(self, host, port, called_aet, syntaxes, calling_aet=None, roles=(), user_identity=None):
        """
        Open an association.

        @param syntaxes: C{[(abstract_syntax, [transfer_syntax, ...]), ...]}.
        @return: Deferred[L{ClientAssociation}]; fails with
            L{AssociationRejected}, L{AssociationAborted} or a connection
            error.
        """
        contexts = build_contexts([a for a, _ in syntaxes], {a: ts for a, ts in syntaxes})
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
            return association

        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        connecting = endpoint.connect(Factory.forProtocol(build))
        connecting.addErrback(ca._fail)
        timer = self.reactor.callLater(self.connect_timeout, self._associate_timeout, ca, connecting)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return ca._ready.addBoth(done)

    def _associate_timeout(self, ca, connecting):
        if ca._ready.called:
            return
        connecting.cancel()
        if ca.association is not None:
            ca.association.abort(0, 0)
        ca._fail(DimseTimeout(f"association not established within {self.connect_timeout}s"))
