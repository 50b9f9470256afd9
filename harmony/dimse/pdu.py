# -*- test-case-name: tests.unit.test_dimse_pdu -*-
"""
DICOM upper layer PDUs (PS3.8 9.3): framing, model, encoding and decoding.

Sans-IO: no Twisted, no sockets. L{PDUFramer} cuts a byte stream into
PDUs; L{decode_pdu} turns a PDU into a model object and L{encode_pdu}
turns a model object into the bytes of a whole PDU.

The A-ASSOCIATE-RQ/AC/RJ PDUs (one per association) produce pynetdicom's
bytes: the A-ASSOCIATE-RJ and the User Information sub-items are encoded
with its codec classes (L{pynetdicom.pdu}, L{pynetdicom.pdu_items}); the
fixed fields, the UID items and the presentation context items of an
A-ASSOCIATE-RQ/AC are C{struct}-assembled (byte-identical, tested) and
cached by content, as is a User Information item without a user identity
(one carrying credentials is never kept).  Received ones are first walked
by a structural validator here (every item and sub-item length is
checked, so malformed input ends in a L{PDUError} carrying the PS3.8
A-ABORT reason, never in an C{AssertionError} or C{KeyError} from deep
inside the codec); conformant UIDs are then read directly and every other
known item is decoded by its pynetdicom item class.  Items of
unrecognised types are skipped (PS3.8 9.3.1); unrecognised User
Information sub-items are kept opaque, like the SOP Class (Common)
Extended Negotiation sub-items.

P-DATA-TF, A-RELEASE-RQ/RP and A-ABORT are a few C{struct} operations
(L{encode_p_data_tf} is byte-identical to pynetdicom's C{P_DATA_TF}, which
the tests prove).
"""

import re
import struct

import attr
from pynetdicom import pdu as _pdu
from pynetdicom import pdu_items as _items

# -- PDU types (PS3.8 9.3.1, Table 9-1) ------------------------------------

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# -- A-ABORT (PS3.8 9.3.8, Table 9-26) --------------------------------------

#: Source of an A-ABORT: the service-user (the application) ...
ABORT_SOURCE_SERVICE_USER = 0
#: ... or the service-provider (the upper layer itself, for protocol errors).
ABORT_SOURCE_SERVICE_PROVIDER = 2

#: Reasons, meaningful when the source is the service-provider.
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER = 4
ABORT_REASON_UNEXPECTED_PDU_PARAMETER = 5
ABORT_REASON_INVALID_PDU_PARAMETER_VALUE = 6

#: The application context of DICOM (PS3.7 A.2.1).
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_MAX_UINT32 = 0xFFFFFFFF

_HEADER = struct.Struct(">BxI")  # PDU type, reserved, PDU length
_PDV_HEADER = struct.Struct(">IBB")  # PDV item length, context ID, control header
_P_DATA_ONE = struct.Struct(">BxIIBB")  # a P-DATA-TF with a single PDV
_ITEM_HEADER = struct.Struct(">BxH")  # item type, reserved, item length
_UINT16 = struct.Struct(">H")
_FOUR_BYTES = struct.Struct(">xxBB")  # A-ABORT / A-ASSOCIATE-RJ style fixed fields
_RELEASE = b"\x00\x00\x00\x00"

#: PDU types whose length field is always 4.
_FIXED_LENGTH = frozenset((A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT))


class PDUError(Exception):
    """
    A received PDU is unacceptable: the association must be aborted with
    an A-ABORT whose source is the service-provider (2) and whose reason is
    L{reason} (PS3.8 9.3.8).

    @ivar reason: the A-ABORT reason code (1, 2, 4, 5 or 6; 0 not specified).
    @ivar pdus: for errors raised by L{PDUFramer.feed}, the complete PDUs
        that preceded the bad one in the same call (usually empty).
    """

    def __init__(self, reason, message=""):
        super().__init__(reason, message)
        self.reason = reason
        self.message = message
        self.pdus = []

    def __str__(self):
        return f"A-ABORT reason {self.reason}: {self.message}" if self.message else f"A-ABORT reason {self.reason}"


# -- Framing ----------------------------------------------------------------


class PDUFramer:
    """
    Cuts a byte stream into PDUs.

    At most one incomplete PDU is ever buffered. PDUs that arrive whole in
    a chunk are returned as zero-copy C{memoryview}s of that chunk; a PDU
    that spans chunks is assembled in a C{bytearray} (each byte copied
    once) which is then handed over to the caller (no second copy) and
    replaced by a fresh one. So no buffer is ever re-sliced as it grows,
    and feeding one byte at a time or many PDUs at once gives the same
    PDUs.

    The PDU type and length are checked as soon as the 6-byte header is
    in, before any body byte is buffered: an unknown type raises
    C{PDUError(1)}, a length above the limits C{PDUError(6)} (also an
    A-ASSOCIATE-RJ, A-RELEASE-RQ/RP or A-ABORT whose length is not 4).
    After a L{PDUError} the stream is unusable: every later L{feed} raises
    it again.

    @param max_pdu_length: the largest P-DATA-TF PDU length field
        accepted: the Maximum Length Received we advertise (C{0}: no limit
        other than the 32-bit field).
    @param max_associate_length: the largest length accepted for the
        other PDU types (A-ASSOCIATE-RQ/AC in practice).
    """

    __slots__ = ("_max_p_data", "_max_other", "_partial", "_need", "_type", "_error")

    def __init__(self, max_pdu_length=1 << 20, max_associate_length=1 << 20):
        self._max_p_data = max_pdu_length or _MAX_UINT32
        self._max_other = max_associate_length
        self._partial = bytearray()  # the bytes of the incomplete PDU (header included)
        self._need = 0  # its total size once its header is known, else 0
        self._type = 0
        self._error = None

    @property
    def buffered(self):
        """
        The number of bytes of the incomplete PDU held (for tests and
        diagnostics).
        """
        return len(self._partial)

    def _check(self, pdu_type, length):
        if pdu_type == P_DATA_TF:
            if length > self._max_p_data:
                raise PDUError(
                    ABORT_REASON_INVALID_PDU_PARAMETER_VALUE,
                    f"P-DATA-TF of {length} bytes exceeds the maximum of {self._max_p_data}",
                )
        elif pdu_type < A_ASSOCIATE_RQ or pdu_type > A_ABORT:
            raise PDUError(ABORT_REASON_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
        elif pdu_type in _FIXED_LENGTH:
            if length != 4:
                raise PDUError(
                    ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, f"PDU type {pdu_type} with length {length} instead of 4"
                )
        elif length > self._max_other:
            raise PDUError(
                ABORT_REASON_INVALID_PDU_PARAMETER_VALUE,
                f"PDU type {pdu_type} of {length} bytes exceeds the maximum of {self._max_other}",
            )

    def feed(self, data):
        """
        Add received bytes.

        @param data: the bytes received (C{bytes}; other bytes-like objects
            are copied, since the returned views may refer to C{data}).
        @return: the PDUs completed, a list of C{(pdu_type, body)} where
            C{body} is the PDU's variable field (the bytes after the 6-byte
            header) as a C{memoryview} or C{bytes}.
        @raise PDUError: unknown PDU type or length over the limits.
        """
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)
        out = []
        try:
            offset = 0
            size = len(data)
            partial = self._partial
            if partial:
                need = self._need
                if not need:
                    take = 6 - len(partial)
                    partial += data[:take]
                    offset = take
                    if len(partial) < 6:
                        return out
                    pdu_type, length = _HEADER.unpack_from(partial)
                    self._check(pdu_type, length)
                    need = self._need = 6 + length
                    self._type = pdu_type
                take = need - len(partial)
                if take > 0:
                    if offset == 0 and take >= size:
                        partial += data
                    else:
                        with memoryview(data) as view:
                            partial += view[offset : offset + take]
                    offset += take
                if len(partial) < need:
                    return out
                # Complete: hand the buffer over instead of copying it.
                out.append((self._type, memoryview(partial)[6:]))
                self._partial = bytearray()
                self._need = 0
            if offset >= size:
                return out
            view = memoryview(data)
            unpack = _HEADER.unpack_from
            check = self._check
            while size - offset >= 6:
                pdu_type, length = unpack(data, offset)
                check(pdu_type, length)
                end = offset + 6 + length
                if end > size:
                    break
                out.append((pdu_type, view[offset + 6 : end]))
                offset = end
            if offset < size:
                self._partial = partial = bytearray(view[offset:])
                if len(partial) >= 6:
                    self._type, length = unpack(partial)
                    self._need = 6 + length
            return out
        except PDUError as e:
            e.pdus = out
            self._error = e
            raise


# -- Model --------------------------------------------------------------------


@attr.s(slots=True)
class PresentationContextRQ:
    """
    A proposed presentation context (PS3.8 9.3.2.2).

    @ivar id: the presentation context ID (odd, 1-255).
    @ivar abstract_syntax: the abstract syntax (SOP class) UID.
    @ivar transfer_syntaxes: the proposed transfer syntax UIDs.
    """

    id = attr.ib()
    abstract_syntax = attr.ib()
    transfer_syntaxes = attr.ib(factory=list)


@attr.s(slots=True)
class PresentationContextAC:
    """
    The answer to a proposed presentation context (PS3.8 9.3.3.2).

    @ivar id: the presentation context ID.
    @ivar result: 0 acceptance, 1 user-rejection, 2 no-reason (provider
        rejection), 3 abstract syntax not supported, 4 transfer syntaxes
        not supported.
    @ivar transfer_syntax: the accepted transfer syntax UID. When the
        context is not accepted the value is not significant: C{None} is
        encoded as an empty Transfer Syntax sub-item (the sub-item is
        mandatory), and decodes from an empty or missing one.
    """

    id = attr.ib()
    result = attr.ib()
    transfer_syntax = attr.ib(default=None)


@attr.s(slots=True)
class RoleSelection:
    """
    An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4).
    """

    abstract_syntax = attr.ib()
    scu = attr.ib()
    scp = attr.ib()


@attr.s(slots=True)
class UserIdentityRQ:
    """
    A User Identity negotiation request (PS3.7 D.3.3.7.1).

    @ivar type: 1 username, 2 username and passcode, 3 Kerberos, 4 SAML,
        5 JWT.
    @ivar primary: the username or token (C{bytes}).
    @ivar secondary: the passcode (C{bytes}, empty unless type 2).
    @ivar response_requested: whether a positive response is requested.
    """

    type = attr.ib()
    primary = attr.ib()
    secondary = attr.ib(default=b"")
    response_requested = attr.ib(default=False)


@attr.s(slots=True)
class AssociateRQ:
    """
    An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2).

    AE titles are stripped of their space padding. C{extended_negotiation}
    holds whole encoded User Information sub-items kept opaque (SOP Class
    Extended Negotiation 0x56, SOP Class Common Extended Negotiation 0x57,
    and any unrecognised sub-item type).
    """

    called_aet = attr.ib()
    calling_aet = attr.ib()
    contexts = attr.ib()
    max_pdu_length = attr.ib()
    implementation_class_uid = attr.ib()
    implementation_version_name = attr.ib(default=None)
    application_context = attr.ib(default=DICOM_APPLICATION_CONTEXT)
    roles = attr.ib(factory=list)
    user_identity = attr.ib(default=None)
    async_ops = attr.ib(default=None)
    extended_negotiation = attr.ib(factory=list)
    protocol_version = attr.ib(default=1)


@attr.s(slots=True)
class AssociateAC:
    """
    An A-ASSOCIATE-AC PDU (PS3.8 9.3.3). The AE titles echo the request's
    (they are not tested on receipt).

    @ivar user_identity_response: the server response of a User Identity
        sub-item (C{bytes}), or C{None} when the sub-item is absent.
    """

    called_aet = attr.ib()
    calling_aet = attr.ib()
    contexts = attr.ib()
    max_pdu_length = attr.ib()
    implementation_class_uid = attr.ib()
    implementation_version_name = attr.ib(default=None)
    application_context = attr.ib(default=DICOM_APPLICATION_CONTEXT)
    roles = attr.ib(factory=list)
    user_identity_response = attr.ib(default=None)
    async_ops = attr.ib(default=None)
    extended_negotiation = attr.ib(factory=list)
    protocol_version = attr.ib(default=1)


@attr.s(slots=True)
class AssociateRJ:
    """
    An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): result 1 permanent / 2 transient,
    source 1 service-user / 2 service-provider (ACSE) / 3 service-provider
    (presentation), and the reason/diagnostic for that source.
    """

    result = attr.ib()
    source = attr.ib()
    reason = attr.ib()


@attr.s(slots=True)
class PDataTF:
    """
    A P-DATA-TF PDU (PS3.8 9.3.5): C{items} is a list of C{(context_id,
    message_control_header, fragment)}.
    """

    items = attr.ib(factory=list)


@attr.s(slots=True)
class ReleaseRQ:
    """An A-RELEASE-RQ PDU (PS3.8 9.3.6)."""


@attr.s(slots=True)
class ReleaseRP:
    """An A-RELEASE-RP PDU (PS3.8 9.3.7)."""


@attr.s(slots=True)
class Abort:
    """An A-ABORT PDU (PS3.8 9.3.8)."""

    source = attr.ib()
    reason = attr.ib(default=ABORT_REASON_NOT_SPECIFIED)


# -- P-DATA-TF fast path ----------------------------------------------------


def encode_p_data_tf(items):
    """
    Encode a whole P-DATA-TF PDU.

    @param items: C{(context_id, message_control_header, fragment)} tuples;
        fragments may be C{bytes}, C{bytearray} or C{memoryview}.
    @return: C{bytes}, identical to pynetdicom's C{P_DATA_TF.encode()}.
    """
    if len(items) == 1:
        context_id, control, data = items[0]
        n = len(data)
        return _P_DATA_ONE.pack(P_DATA_TF, n + 6, n + 2, context_id, control) + data
    parts = [b""]
    total = 0
    pack = _PDV_HEADER.pack
    for context_id, control, data in items:
        n = len(data)
        parts.append(pack(n + 2, context_id, control))
        parts.append(data)
        total += n + 6
    parts[0] = _HEADER.pack(P_DATA_TF, total)
    return b"".join(parts)


def p_data_tf_header(context_id, control_header, length):
    """
    The first 12 bytes of a P-DATA-TF PDU carrying one PDV of C{length}
    fragment bytes: write them and then the fragment itself (for example
    with C{transport.writeSequence}) to send a large fragment without
    copying it. C{p_data_tf_header(c, h, len(d)) + d ==
    encode_p_data_tf([(c, h, d)])}.
    """
    return _P_DATA_ONE.pack(P_DATA_TF, length + 6, length + 2, context_id, control_header)


def iter_pdvs(body):
    """
    Parse the PDV items of a P-DATA-TF without copying the fragments.

    The whole body is validated before anything is returned, so a
    malformed PDU is rejected before any of its PDVs is acted on.

    @param body: the PDU's variable field (C{bytes} or C{memoryview}).
    @return: a list of C{(context_id, message_control_header, fragment)}
        with C{fragment} a C{memoryview} of C{body}.
    @raise PDUError: (6) no PDV, a PDV item length below 2 or running past
        the end of the PDU.
    """
    view = body if type(body) is memoryview else memoryview(body)
    size = len(view)
    if size < 6:
        raise PDUError(ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, "P-DATA-TF without a complete PDV item")
    unpack = _PDV_HEADER.unpack_from
    length, context_id, control = unpack(view, 0)
    end = 4 + length
    if end == size and length >= 2:
        return [(context_id, control, view[6:end])]
    out = []
    offset = 0
    while offset < size:
        if size - offset < 6:
            raise PDUError(ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, "truncated PDV item")
        length, context_id, control = unpack(view, offset)
        if length < 2:
            raise PDUError(ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, f"PDV item length {length}")
        end = offset + 4 + length
        if end > size:
            raise PDUError(ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, "PDV item runs past the end of the PDU")
        out.append((context_id, control, view[offset + 6 : end]))
        offset = end
    return out


# -- Decoding -----------------------------------------------------------------


def _invalid(message):
    return PDUError(ABORT_REASON_INVALID_PDU_PARAMETER_VALUE, message)


def _unexpected(message):
    return PDUError(ABORT_REASON_UNEXPECTED_PDU_PARAMETER, message)


def _walk(data, start, end, what):
    """
    Yield C{(item_type, item_start, value_start, value_end)} for the items
    in C{data[start:end]} (4-byte item headers, 16-bit lengths).
    """
    offset = start
    while offset < end:
        if end - offset < 4:
            raise _invalid(f"truncated item header in {what}")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        value_end = offset + 4 + length
        if value_end > end:
            raise _invalid(f"item 0x{item_type:02X} runs past the end of {what}")
        yield item_type, offset, offset + 4, value_end
        offset = value_end


#: Items whose whole value is a UID (64 characters, maybe a NUL pad).
_UID_ITEMS = frozenset((0x10, 0x30, 0x40, 0x52))
#: The UID field of each pynetdicom UID item class.
_UID_FIELDS = {
    _items.ApplicationContextItem: "application_context_name",
    _items.AbstractSyntaxSubItem: "abstract_syntax_name",
    _items.TransferSyntaxSubItem: "transfer_syntax_name",
    _items.ImplementationClassUIDSubItem: "implementation_class_uid",
}


def _pyn(cls, data, start, end):
    """Decode one item with its pynetdicom class."""
    if data[start] in _UID_ITEMS:
        # Checked here so that pynetdicom does not log a traceback for them.
        if end - start > 4 + 65:
            raise _invalid(f"{cls.__name__}: UID longer than 64 characters")
        if not data[start + 4 : end].isascii():
            raise _invalid(f"{cls.__name__}: UID not in ASCII")
    item = cls()
    try:
        item.decode(bytes(data[start:end]))
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, struct.error) as e:
        raise _invalid(f"{cls.__name__}: {e}") from None
    return item


#: A conformant UID (PS3.5 9.1; pydicom's C{UID.is_valid}): what
#: pynetdicom accepts without a word.
_CONFORMANT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")


def _uid_item(cls, data, start, end):
    """
    The UID of a UID item or sub-item (application context, abstract or
    transfer syntax, implementation class): read directly when it is
    conformant (one trailing NUL pad dropped, as pynetdicom does), else by
    pynetdicom's class (its checks, errors and warnings).
    """
    raw = data[start + 4 : end]
    if raw[-1:] == b"\x00":
        raw = raw[:-1]
    if 0 < len(raw) <= 64 and raw.isascii():
        uid = raw.decode("ascii")
        if _CONFORMANT_UID.match(uid):
            return uid
    item = _pyn(cls, data, start, end)
    return _str_uid(getattr(item, _UID_FIELDS[cls]))


def _str_uid(uid):
    return None if uid is None else str(uid)


def _decode_aet(raw):
    return raw.decode("ascii", "replace").strip(" \x00")


# Item types we know (at any level); a known type in the wrong place is an
# unexpected PDU parameter, an unknown one is skipped (PS3.8 9.3.1).
_KNOWN_ITEMS = frozenset((0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59))
_OPAQUE_SUB_ITEMS = frozenset((0x56, 0x57))


def _decode_associate(pdu_type, body):
    requesting = pdu_type == A_ASSOCIATE_RQ
    name = "A-ASSOCIATE-RQ" if requesting else "A-ASSOCIATE-AC"
    data = bytes(body)
    size = len(data)
    if size < 68:
        raise _invalid(f"{name} of {size} bytes")
    (protocol_version,) = _UINT16.unpack_from(data, 0)
    called = _decode_aet(data[4:20])
    calling = _decode_aet(data[20:36])

    context_type = 0x20 if requesting else 0x21
    application_context = None
    contexts = []
    seen_ids = set()
    user_info = None
    for item_type, item_start, start, end in _walk(data, 68, size, name):
        if item_type == 0x10:
            if application_context is not None:
                raise _unexpected("more than one Application Context item")
            application_context = _uid_item(_items.ApplicationContextItem, data, item_start, end)
        elif item_type == context_type:
            context = (_decode_context_rq if requesting else _decode_context_ac)(data, item_start, start, end)
            if context.id in seen_ids:
                raise _invalid(f"presentation context ID {context.id} used twice")
            seen_ids.add(context.id)
            contexts.append(context)
        elif item_type == 0x50:
            if user_info is not None:
                raise _unexpected("more than one User Information item")
            user_info = _decode_user_information(data, start, end, requesting)
        elif item_type in _KNOWN_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} in an {name}")
    if not application_context:
        raise _invalid(f"{name} without an Application Context item")
    if not contexts:
        raise _invalid(f"{name} without a Presentation Context item")
    if user_info is None:
        raise _invalid(f"{name} without a User Information item")
    max_length, class_uid, version_name, roles, identity, async_ops, extended = user_info
    if requesting:
        return AssociateRQ(
            called_aet=called,
            calling_aet=calling,
            contexts=contexts,
            max_pdu_length=max_length,
            implementation_class_uid=class_uid,
            implementation_version_name=version_name,
            application_context=application_context,
            roles=roles,
            user_identity=identity,
            async_ops=async_ops,
            extended_negotiation=extended,
            protocol_version=protocol_version,
        )
    return AssociateAC(
        called_aet=called,
        calling_aet=calling,
        contexts=contexts,
        max_pdu_length=max_length,
        implementation_class_uid=class_uid,
        implementation_version_name=version_name,
        application_context=application_context,
        roles=roles,
        user_identity_response=identity,
        async_ops=async_ops,
        extended_negotiation=extended,
        protocol_version=protocol_version,
    )


def _context_id(data, start, end):
    if end - start < 4:
        raise _invalid("presentation context item shorter than 4 bytes")
    context_id = data[start]
    if not context_id & 1:
        raise _invalid(f"presentation context ID {context_id} is not odd")
    return context_id


def _decode_context_rq(data, item_start, start, end):
    context_id = _context_id(data, start, end)
    abstract = None
    transfer = []
    for item_type, sub_start, _, sub_end in _walk(data, start + 4, end, "a presentation context item"):
        if item_type == 0x30:
            if abstract is not None:
                raise _invalid(f"presentation context {context_id} with two abstract syntaxes")
            abstract = _uid_item(_items.AbstractSyntaxSubItem, data, sub_start, sub_end)
            if not abstract:
                raise _invalid(f"presentation context {context_id} with an empty abstract syntax")
        elif item_type == 0x40:
            uid = _uid_item(_items.TransferSyntaxSubItem, data, sub_start, sub_end)
            if not uid:
                raise _invalid(f"presentation context {context_id} with an empty transfer syntax")
            transfer.append(str(uid))
        elif item_type in _KNOWN_ITEMS:
            raise _unexpected(f"sub-item 0x{item_type:02X} in a presentation context item")
    if abstract is None:
        raise _invalid(f"presentation context {context_id} without an abstract syntax")
    if not transfer:
        raise _invalid(f"presentation context {context_id} without a transfer syntax")
    return PresentationContextRQ(context_id, str(abstract), transfer)


def _decode_context_ac(data, item_start, start, end):
    context_id = _context_id(data, start, end)
    result = data[start + 2]
    if result > 4:
        raise _invalid(f"presentation context {context_id} with result {result}")
    transfer = None
    count = 0
    for item_type, sub_start, sub_value, sub_end in _walk(data, start + 4, end, "a presentation context item"):
        if item_type == 0x40:
            count += 1
            if count > 1:
                raise _invalid(f"presentation context {context_id} answered with two transfer syntaxes")
            if result == 0:
                transfer = _uid_item(_items.TransferSyntaxSubItem, data, sub_start, sub_end)
            elif sub_end > sub_value:
                # Not significant (PS3.8 9.3.3.2): kept when readable, never tested.
                try:
                    transfer = data[sub_value:sub_end].decode("ascii").rstrip("\x00") or None
                except UnicodeDecodeError:
                    transfer = None
        elif item_type in _KNOWN_ITEMS:
            raise _unexpected(f"sub-item 0x{item_type:02X} in a presentation context item")
    if result == 0 and not transfer:
        raise _invalid(f"presentation context {context_id} accepted without a transfer syntax")
    return PresentationContextAC(context_id, result, transfer)


def _decode_user_information(data, start, end, requesting):
    max_length = class_uid = version_name = identity = async_ops = None
    roles = []
    extended = []
    identity_type = 0x58 if requesting else 0x59

    def once(value, what):
        if value is not None:
            raise _unexpected(f"more than one {what} sub-item")

    for item_type, sub_start, value, sub_end in _walk(data, start, end, "the User Information item"):
        length = sub_end - value
        if item_type == 0x51:
            once(max_length, "Maximum Length")
            if length != 4:
                raise _invalid("Maximum Length sub-item length is not 4")
            max_length = _pyn(_items.MaximumLengthSubItem, data, sub_start, sub_end).maximum_length_received
        elif item_type == 0x52:
            once(class_uid, "Implementation Class UID")
            uid = _uid_item(_items.ImplementationClassUIDSubItem, data, sub_start, sub_end)
            if not uid:
                raise _invalid("empty Implementation Class UID")
            class_uid = str(uid)
        elif item_type == 0x55:
            once(version_name, "Implementation Version Name")
            # Read leniently (the value is informative only): pynetdicom's
            # decoder rejects a name padded with NULs or with odd bytes.
            version_name = data[value:sub_end].decode("ascii", "replace").strip(" \x00")
        elif item_type == 0x53:
            once(async_ops, "Asynchronous Operations Window")
            if length != 4:
                raise _invalid("Asynchronous Operations Window sub-item length is not 4")
            item = _pyn(_items.AsynchronousOperationsWindowSubItem, data, sub_start, sub_end)
            async_ops = (item.maximum_number_operations_invoked, item.maximum_number_operations_performed)
        elif item_type == 0x54:
            if length < 5 or _UINT16.unpack_from(data, value)[0] + 4 != length:
                raise _invalid("SCP/SCU Role Selection sub-item lengths disagree")
            if length > 4 + 65:
                raise _invalid("SCP/SCU Role Selection sub-item with a UID longer than 64 characters")
            item = _pyn(_items.SCP_SCU_RoleSelectionSubItem, data, sub_start, sub_end)
            if not item.sop_class_uid:
                raise _invalid("SCP/SCU Role Selection sub-item without a SOP class")
            roles.append(RoleSelection(str(item.sop_class_uid), bool(item.scu_role), bool(item.scp_role)))
        elif item_type == identity_type:
            once(identity, "User Identity")
            if requesting:
                if length < 6:
                    raise _invalid("User Identity sub-item too short")
                (primary_length,) = _UINT16.unpack_from(data, value + 2)
                if length < 6 + primary_length:
                    raise _invalid("User Identity primary field runs past the sub-item")
                (secondary_length,) = _UINT16.unpack_from(data, value + 4 + primary_length)
                if length != 6 + primary_length + secondary_length:
                    raise _invalid("User Identity sub-item lengths disagree")
                # Read here: pynetdicom's decoder takes an empty primary
                # field for "the rest of the item".
                identity = UserIdentityRQ(
                    data[value],
                    data[value + 4 : value + 4 + primary_length],
                    data[value + 6 + primary_length : sub_end],
                    bool(data[value + 1]),
                )
            else:
                if length < 2 or _UINT16.unpack_from(data, value)[0] + 2 != length:
                    raise _invalid("User Identity (AC) sub-item lengths disagree")
                identity = bytes(data[value + 2 : sub_end])
        elif item_type in _OPAQUE_SUB_ITEMS or item_type not in _KNOWN_ITEMS:
            extended.append(bytes(data[sub_start:sub_end]))
        else:
            raise _unexpected(f"sub-item 0x{item_type:02X} in the User Information item")
    if max_length is None:
        raise _invalid("User Information without a Maximum Length sub-item")
    version_name = version_name or None
    if class_uid is None:
        raise _invalid("User Information without an Implementation Class UID sub-item")
    return max_length, class_uid, version_name, roles, identity, async_ops, extended


def _decode_fixed(body, what):
    if len(body) != 4:
        raise _invalid(f"{what} of {len(body)} bytes instead of 4")
    return _FOUR_BYTES.unpack_from(body)


def decode_pdu(pdu_type, body):
    """
    Decode a PDU.

    @param pdu_type: the PDU type (from L{PDUFramer.feed}).
    @param body: its variable field (the bytes after the 6-byte header).
    @return: an L{AssociateRQ}, L{AssociateAC}, L{AssociateRJ},
        L{PDataTF} (fragments are views of C{body}), L{ReleaseRQ},
        L{ReleaseRP} or L{Abort}.
    @raise PDUError: C{1} for an unknown PDU type; C{6} for malformed
        content (bad lengths, missing mandatory items, invalid values);
        C{5} for a known item where it does not belong or repeated where
        only one is allowed.
    """
    if pdu_type == P_DATA_TF:
        return PDataTF(iter_pdvs(body))
    if pdu_type == A_ASSOCIATE_RQ or pdu_type == A_ASSOCIATE_AC:
        return _decode_associate(pdu_type, body)
    if pdu_type == A_ASSOCIATE_RJ:
        if len(body) != 4:
            raise _invalid(f"A-ASSOCIATE-RJ of {len(body)} bytes instead of 4")
        rj = _pdu.A_ASSOCIATE_RJ()
        rj.decode(_HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes(body))
        return AssociateRJ(rj.result, rj.source, rj.reason_diagnostic)
    if pdu_type == A_RELEASE_RQ:
        _decode_fixed(body, "A-RELEASE-RQ")
        return ReleaseRQ()
    if pdu_type == A_RELEASE_RP:
        _decode_fixed(body, "A-RELEASE-RP")
        return ReleaseRP()
    if pdu_type == A_ABORT:
        source, reason = _decode_fixed(body, "A-ABORT")
        return Abort(source, reason)
    raise PDUError(ABORT_REASON_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")


# -- Encoding -----------------------------------------------------------------


class _RawItem:
    """An already encoded item, for pynetdicom's item lists."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def encode(self):
        return self.data

    def __len__(self):
        return len(self.data)


_EMPTY_TRANSFER_SYNTAX = _RawItem(b"\x40\x00\x00\x00")


def validate_ae_title(value, what="AE title"):
    """
    Check an AE title for sending: 1-16 characters of printable ASCII,
    no backslash, not only spaces.

    @raise ValueError: otherwise.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    if not 1 <= len(value) <= 16:
        raise ValueError(f"{what} {value!r} must be 1 to 16 characters")
    if not value.strip(" "):
        raise ValueError(f"{what} must not be only spaces")
    for c in value:
        if not " " <= c <= "~" or c == "\\":
            raise ValueError(f"{what} {value!r} may only contain printable ASCII other than backslash")
    return value


def _uid_for_wire(value, what):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str")
    if len(value) > 64 or not value.isascii():
        raise ValueError(f"{what} {value!r} must be at most 64 ASCII characters")
    return value


def _raw_sub_item(raw):
    data = bytes(raw)
    if len(data) < 4:
        raise ValueError("an extended negotiation item must be a whole encoded sub-item")
    item_type, length = _ITEM_HEADER.unpack_from(data)
    if length != len(data) - 4:
        raise ValueError(f"extended negotiation sub-item 0x{item_type:02X}: length field disagrees with its size")
    if item_type in _KNOWN_ITEMS and item_type not in _OPAQUE_SUB_ITEMS:
        raise ValueError(f"sub-item 0x{item_type:02X} has its own field in the model")
    return _RawItem(data)


def _user_information(obj, identity_item):
    """
    The User Information item: Maximum Length, Implementation Class UID,
    Implementation Version Name, SCP/SCU roles, User Identity,
    Asynchronous Operations Window, then the opaque items (the order
    pynetdicom and DCMTK use).
    """
    if not 0 <= obj.max_pdu_length <= _MAX_UINT32:
        raise ValueError(f"max_pdu_length {obj.max_pdu_length} out of range")
    user_data = []
    item = _items.MaximumLengthSubItem()
    item.maximum_length_received = obj.max_pdu_length
    user_data.append(item)
    item = _items.ImplementationClassUIDSubItem()
    item.implementation_class_uid = _uid_for_wire(obj.implementation_class_uid, "implementation_class_uid")
    user_data.append(item)
    if obj.implementation_version_name is not None:
        validate_ae_title(obj.implementation_version_name, "implementation_version_name")
        item = _items.ImplementationVersionNameSubItem()
        item.implementation_version_name = obj.implementation_version_name
        user_data.append(item)
    for role in obj.roles:
        item = _items.SCP_SCU_RoleSelectionSubItem()
        item.sop_class_uid = _uid_for_wire(role.abstract_syntax, "role selection abstract_syntax")
        item.scu_role = int(bool(role.scu))
        item.scp_role = int(bool(role.scp))
        user_data.append(item)
    if identity_item is not None:
        user_data.append(identity_item)
    if obj.async_ops is not None:
        invoked, performed = obj.async_ops
        if not (0 <= invoked <= 0xFFFF and 0 <= performed <= 0xFFFF):
            raise ValueError(f"async_ops {obj.async_ops!r} out of range")
        item = _items.AsynchronousOperationsWindowSubItem()
        item.maximum_number_operations_invoked = invoked
        item.maximum_number_operations_performed = performed
        user_data.append(item)
    user_data.extend(_raw_sub_item(raw) for raw in obj.extended_negotiation)
    info = _items.UserInformationItem()
    info.user_data = user_data
    if info.item_length > 0xFFFF:
        raise ValueError("User Information item longer than 65535 bytes")
    return info


def _check_context_id(context_id):
    if not (isinstance(context_id, int) and 1 <= context_id <= 255 and context_id & 1):
        raise ValueError(f"presentation context ID {context_id!r} must be odd, 1-255")


#: Encoded presentation context items by content (associations propose
#: the same few lists again and again; pynetdicom's item objects cost
#: about a millisecond per context).
_CONTEXT_ITEMS = {}
_MAX_CACHED_CONTEXT_ITEMS = 8192
_ITEM_HEAD = struct.Struct(">BxH")


def _uid_sub_item(item_type, uid, what):
    data = _uid_for_wire(uid, what).encode("ascii")
    return _ITEM_HEAD.pack(item_type, len(data)) + data


def _cached_item(key, build):
    data = _CONTEXT_ITEMS.get(key)
    if data is None:
        data = build()
        if len(_CONTEXT_ITEMS) < _MAX_CACHED_CONTEXT_ITEMS:
            _CONTEXT_ITEMS[key] = data
    return _RawItem(data)


def _presentation_context_rq(context):
    """
    A Presentation Context item (RQ, PS3.8 9.3.2.2): a C{struct} encoding,
    byte-identical to pynetdicom's C{PresentationContextItemRQ}.
    """

    def build():
        _check_context_id(context.id)
        if not context.transfer_syntaxes:
            raise ValueError(f"presentation context {context.id} proposes no transfer syntax")
        body = [bytes((context.id, 0, 0, 0)), _uid_sub_item(0x30, context.abstract_syntax, "abstract_syntax")]
        body += [_uid_sub_item(0x40, uid, "transfer syntax") for uid in context.transfer_syntaxes]
        body = b"".join(body)
        if len(body) > 0xFFFF:
            raise ValueError(f"presentation context {context.id} longer than 65535 bytes")
        return _ITEM_HEAD.pack(0x20, len(body)) + body

    return _cached_item(("rq", context.id, context.abstract_syntax, tuple(context.transfer_syntaxes)), build)


def _presentation_context_ac(context):
    """
    A Presentation Context item (AC, PS3.8 9.3.3.2), byte-identical to
    pynetdicom's C{PresentationContextItemAC}.
    """

    def build():
        _check_context_id(context.id)
        if context.result not in (0, 1, 2, 3, 4):
            raise ValueError(f"presentation context {context.id}: result {context.result!r} is not 0-4")
        if context.transfer_syntax:
            sub = _uid_sub_item(0x40, context.transfer_syntax, "transfer syntax")
        elif context.result == 0:
            raise ValueError(f"presentation context {context.id} accepted without a transfer syntax")
        else:
            sub = _EMPTY_TRANSFER_SYNTAX.data
        body = bytes((context.id, 0, context.result, 0)) + sub
        return _ITEM_HEAD.pack(0x21, len(body)) + body

    return _cached_item(("ac", context.id, context.result, context.transfer_syntax), build)


#: The fixed part of an A-ASSOCIATE-RQ/AC (PS3.8 9.3.2, 9.3.3): type,
#: length, protocol version, called and calling AE titles, 32 reserved bytes.
_ASSOCIATE_FIXED = struct.Struct(">BxIHxx16s16s32x")
#: Encoded User Information items without a user identity sub-item (the
#: same few again and again; identities, which carry credentials, are
#: never cached).
_USER_INFO_ITEMS = {}


def _encode_associate(pdu_type, obj, context_items, identity_item):
    """
    An A-ASSOCIATE-RQ or -AC, assembled from its items: byte-identical to
    pynetdicom's C{A_ASSOCIATE_RQ}/C{A_ASSOCIATE_AC} (tested), without its
    per-field machinery.
    """
    called = validate_ae_title(obj.called_aet, "called AE title")
    calling = validate_ae_title(obj.calling_aet, "calling AE title")
    application = _cached_item(
        ("application", obj.application_context),
        lambda: _uid_sub_item(0x10, obj.application_context, "application_context"),
    ).data
    if identity_item is None:
        key = (
            obj.max_pdu_length, obj.implementation_class_uid, obj.implementation_version_name,
            tuple((r.abstract_syntax, bool(r.scu), bool(r.scp)) for r in obj.roles),
            None if obj.async_ops is None else tuple(obj.async_ops),
            tuple(bytes(raw) for raw in obj.extended_negotiation),
        )
        user = _USER_INFO_ITEMS.get(key)
        if user is None:
            user = _user_information(obj, None).encode()
            if len(_USER_INFO_ITEMS) < _MAX_CACHED_CONTEXT_ITEMS:
                _USER_INFO_ITEMS[key] = user
    else:
        user = _user_information(obj, identity_item).encode()
    items = b"".join([application, *(item.data for item in context_items), user])
    if not 0 <= obj.protocol_version <= 0xFFFF:
        raise ValueError(f"protocol version {obj.protocol_version!r} out of range")
    fixed = _ASSOCIATE_FIXED.pack(
        pdu_type, 68 + len(items), obj.protocol_version, called.ljust(16).encode("ascii"),
        calling.ljust(16).encode("ascii"),
    )
    return fixed + items


def _encode_associate_rq(obj):
    if not obj.contexts:
        raise ValueError("an A-ASSOCIATE-RQ needs at least one presentation context")
    contexts = [_presentation_context_rq(context) for context in obj.contexts]
    identity = None
    if obj.user_identity is not None:
        ui = obj.user_identity
        primary, secondary = bytes(ui.primary or b""), bytes(ui.secondary or b"")
        if len(primary) > 0xFFFF or len(secondary) > 0xFFFF:
            raise ValueError("user identity fields are limited to 65535 bytes")
        identity = _items.UserIdentitySubItemRQ()
        identity.user_identity_type = ui.type
        identity.positive_response_requested = int(bool(ui.response_requested))
        identity.primary_field = primary
        identity.secondary_field = secondary
    return _encode_associate(A_ASSOCIATE_RQ, obj, contexts, identity)


def _encode_associate_ac(obj):
    contexts = [_presentation_context_ac(context) for context in obj.contexts]
    identity = None
    if obj.user_identity_response is not None:
        response = bytes(obj.user_identity_response)
        if len(response) > 0xFFFF:
            raise ValueError("user identity response limited to 65535 bytes")
        identity = _items.UserIdentitySubItemAC()
        identity.server_response = response
    return _encode_associate(A_ASSOCIATE_AC, obj, contexts, identity)


def _encode_associate_rj(obj):
    for name in ("result", "source", "reason"):
        value = getattr(obj, name)
        if not (isinstance(value, int) and 0 <= value <= 255):
            raise ValueError(f"A-ASSOCIATE-RJ {name} {value!r} is not a byte")
    rj = _pdu.A_ASSOCIATE_RJ()
    rj.result, rj.source, rj.reason_diagnostic = obj.result, obj.source, obj.reason
    return rj.encode()


_RELEASE_RQ_BYTES = _HEADER.pack(A_RELEASE_RQ, 4) + _RELEASE
_RELEASE_RP_BYTES = _HEADER.pack(A_RELEASE_RP, 4) + _RELEASE


def encode_pdu(obj):
    """
    Encode a model object as a whole PDU (6-byte header included).

    @raise ValueError: the object cannot be sent as it is (an invalid AE
        title, no presentation context, a value out of range, ...).
    @raise TypeError: not a PDU model object.
    """
    kind = type(obj)
    if kind is PDataTF:
        return encode_p_data_tf(obj.items)
    if kind is AssociateRQ:
        return _encode_associate_rq(obj)
    if kind is AssociateAC:
        return _encode_associate_ac(obj)
    if kind is AssociateRJ:
        return _encode_associate_rj(obj)
    if kind is ReleaseRQ:
        return _RELEASE_RQ_BYTES
    if kind is ReleaseRP:
        return _RELEASE_RP_BYTES
    if kind is Abort:
        return _HEADER.pack(A_ABORT, 4) + bytes((0, 0, obj.source, obj.reason))
    raise TypeError(f"not a PDU: {kind.__name__}")
