# -*- test-case-name: tests.unit.test_dimse_messages -*-
"""
DIMSE messages on the wire (PS3.7 6.3, 9.3, Annex E; PS3.8 9.3.5, Annex E), sans-IO.

Three jobs, all plain C{struct} work (DESIGN.md rule 10), proven
byte-identical to pynetdicom's C{DIMSEMessage} encoding by the tests:

  - B{Command sets}: L{encode_command} / L{decode_command} (implicit VR
    little endian, group 0000, Command Group Length first and computed),
    plus templated fast paths for the responses an SCP sends per message:
    L{store_rsp} (C-STORE-RSP) and L{echo_rsp} (C-ECHO-RSP).
  - B{Assembly}: L{MessageAssembler} turns received PDVs
    C{(context_id, control_header, data)} into L{Command} events (command
    fragments are small and collected) and L{DataFragment} events (data set
    fragments are passed on one by one as they arrive: never joined, never
    parsed).
  - B{Fragmentation}: L{fragment} turns a command set and an optional data
    set (bytes, or an iterable of chunks that is streamed) into whole
    P-DATA-TF PDUs that honour the peer's maximum PDU length.

Fields are keyed by the pydicom keywords of the command elements
(C{"AffectedSOPClassUID"}, C{"CommandField"}, C{"MessageID"}, ...).
Elements this module does not know are kept as raw bytes under their tag as
eight upper-case hex digits (C{"00001234"}).

No Twisted and no pydicom imports: this is the per-message path.
"""

import struct
from collections import deque

__all__ = [
    "C_STORE_RQ",
    "C_STORE_RSP",
    "C_GET_RQ",
    "C_GET_RSP",
    "C_FIND_RQ",
    "C_FIND_RSP",
    "C_MOVE_RQ",
    "C_MOVE_RSP",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_CANCEL_RQ",
    "NO_DATASET",
    "DATASET_PRESENT",
    "VERIFICATION_SOP_CLASS",
    "MAX_COMMAND_LENGTH",
    "MessageError",
    "CommandError",
    "Command",
    "DataFragment",
    "MessageAssembler",
    "encode_command",
    "decode_command",
    "store_rsp",
    "echo_rsp",
    "fragment",
]

# PS3.7 Annex E, Command Field (0000,0100)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF

# Command Data Set Type (0000,0800): 0x0101 means "no data set"; any other
# value means a data set follows. 0x0001 is what pynetdicom (and most
# implementations) send.
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0001

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# A command set is a handful of short elements (a C-STORE-RQ with 64-char
# UIDs is about 250 bytes). Fragments are collected only up to this many
# bytes, so a peer cannot make us buffer without bound.
MAX_COMMAND_LENGTH = 1 << 20


class MessageError(ValueError):
    """
    A DIMSE protocol error: PDVs in an order or on a context that PS3.7/PS3.8
    do not allow. The association should be aborted.
    """


class CommandError(MessageError):
    """
    A command set that cannot be encoded or decoded: truncated or garbage
    bytes, a required element missing, a value of the wrong size or type.
    """


# ---------------------------------------------------------------------------
# The command group: every element of group 0000 in the PS3.6 data
# dictionary (the tests check this table against pydicom's). Retired elements
# are kept so that old peers' commands still decode to readable values.
# ---------------------------------------------------------------------------

_ELEMENTS = (
    (0x0000, "CommandGroupLength", "UL"),
    (0x0001, "CommandLengthToEnd", "UL"),
    (0x0002, "AffectedSOPClassUID", "UI"),
    (0x0003, "RequestedSOPClassUID", "UI"),
    (0x0010, "CommandRecognitionCode", "SH"),
    (0x0100, "CommandField", "US"),
    (0x0110, "MessageID", "US"),
    (0x0120, "MessageIDBeingRespondedTo", "US"),
    (0x0200, "Initiator", "AE"),
    (0x0300, "Receiver", "AE"),
    (0x0400, "FindLocation", "AE"),
    (0x0600, "MoveDestination", "AE"),
    (0x0700, "Priority", "US"),
    (0x0800, "CommandDataSetType", "US"),
    (0x0850, "NumberOfMatches", "US"),
    (0x0860, "ResponseSequenceNumber", "US"),
    (0x0900, "Status", "US"),
    (0x0901, "OffendingElement", "AT"),
    (0x0902, "ErrorComment", "LO"),
    (0x0903, "ErrorID", "US"),
    (0x1000, "AffectedSOPInstanceUID", "UI"),
    (0x1001, "RequestedSOPInstanceUID", "UI"),
    (0x1002, "EventTypeID", "US"),
    (0x1005, "AttributeIdentifierList", "AT"),
    (0x1008, "ActionTypeID", "US"),
    (0x1020, "NumberOfRemainingSuboperations", "US"),
    (0x1021, "NumberOfCompletedSuboperations", "US"),
    (0x1022, "NumberOfFailedSuboperations", "US"),
    (0x1023, "NumberOfWarningSuboperations", "US"),
    (0x1030, "MoveOriginatorApplicationEntityTitle", "AE"),
    (0x1031, "MoveOriginatorMessageID", "US"),
    (0x4000, "DialogReceiver", "LT"),
    (0x4010, "TerminalType", "LT"),
    (0x5010, "MessageSetID", "SH"),
    (0x5020, "EndMessageID", "SH"),
    (0x5110, "DisplayFormat", "LT"),
    (0x5120, "PagePositionID", "LT"),
    (0x5130, "TextFormatID", "CS"),
    (0x5140, "NormalReverse", "CS"),
    (0x5150, "AddGrayScale", "CS"),
    (0x5160, "Borders", "CS"),
    (0x5170, "Copies", "IS"),
    (0x5180, "CommandMagnificationType", "CS"),
    (0x5190, "Erase", "CS"),
    (0x51A0, "Print", "CS"),
    (0x51B0, "Overlays", "US"),
)

# (element number -> (keyword, VR)); all command elements are in group 0000.
_BY_ELEMENT = {elem: (keyword, vr) for elem, keyword, vr in _ELEMENTS}
_BY_KEYWORD = {keyword: (elem, vr) for elem, keyword, vr in _ELEMENTS}

# Elements whose value must be exactly one number: the message cannot be
# handled (or answered) with anything else.
_SINGLE_VALUED = frozenset(
    ("CommandGroupLength", "CommandField", "MessageID", "MessageIDBeingRespondedTo",
     "Priority", "CommandDataSetType", "Status")
)

_HEADER = struct.Struct("<HHI")  # implicit VR LE element header: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_TEXT_ENCODING = "latin-1"  # pydicom's default character repertoire ("iso8859")


def _hex_key(elem):
    return "0000%04X" % elem


def _parse_key(key):
    """
    Return C{(element, keyword, vr)} for a fields key: a keyword of the
    command group or an eight-hex-digit tag in group 0000 (VR C{None} when
    the element is unknown: raw bytes).
    """
    known = _BY_KEYWORD.get(key)
    if known is not None:
        return known[0], key, known[1]
    if isinstance(key, str) and len(key) == 8:
        try:
            tag = int(key, 16)
        except ValueError:
            tag = None
        if tag is not None:
            if tag >> 16:
                raise CommandError("element %s is not in the command group (0000,xxxx)" % key)
            elem = tag & 0xFFFF
            keyword, vr = _BY_ELEMENT.get(elem, (None, None))
            return elem, keyword, vr
    raise CommandError("unknown command element %r" % (key,))


def _encode_value(key, vr, value):
    """
    Encode one value like pydicom does in implicit VR little endian:
    strings padded to even length (UI with NUL, the others with a space),
    US/UL/AT packed, single values or lists.
    """
    try:
        if vr == "US" or vr == "UL":
            fmt = "H" if vr == "US" else "I"
            if isinstance(value, int):
                return struct.pack("<" + fmt, value)
            values = list(value)
            return struct.pack("<%d%s" % (len(values), fmt), *values)
        if vr == "AT":
            values = [value] if isinstance(value, (int, tuple)) else list(value)
            out = bytearray()
            for tag in values:
                if isinstance(tag, tuple):
                    group, element = tag
                else:
                    group, element = tag >> 16, tag & 0xFFFF
                out += struct.pack("<HH", group, element)
            return bytes(out)
        if vr is None:  # unknown element: raw bytes, as given
            return bytes(memoryview(value))
        if isinstance(value, str):
            raw = value.encode("ascii" if vr == "UI" else _TEXT_ENCODING, "replace")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        else:
            raise TypeError("expected str, got %s" % type(value).__name__)
        if len(raw) & 1:
            raw += b"\x00" if vr == "UI" else b" "
        return raw
    except (struct.error, TypeError, ValueError) as e:
        raise CommandError("cannot encode %s (%s): %s" % (key, vr or "raw", e)) from None


def encode_command(fields):
    """
    Encode a command set: implicit VR little endian, elements in tag order,
    Command Group Length (0000,0000) computed and first.

    Byte-identical to pynetdicom's C{DIMSEMessage.primitive_to_message} +
    C{encode_msg} (pydicom's C{write_dataset} in implicit VR LE).

    @param fields: C{{keyword or "0000xxxx": value}}. Values: C{int} (or a
        list of them) for US/UL; C{str} (or bytes) for UI/AE/LO/SH/...; for AT
        an C{int} tag (C{0xGGGGEEEE}), a C{(group, element)} tuple or a list
        of either; C{bytes} for unknown elements (written as given). C{None}
        values are left out (as pynetdicom does); an empty string is written
        as an empty element. C{CommandGroupLength}, if given, is ignored and
        recomputed.
    @raise CommandError: an unknown keyword, a value that does not fit its
        VR, or no C{CommandField}.
    @rtype: L{bytes}
    """
    elements = []
    for key, value in fields.items():
        if value is None:
            continue
        elem, keyword, vr = _parse_key(key)
        if elem == 0:
            continue
        elements.append((elem, _encode_value(key, vr, value)))
    elements.sort(key=lambda item: item[0])
    seen = set()
    parts = []
    for elem, raw in elements:
        if elem in seen:
            raise CommandError("element (0000,%04X) given twice" % elem)
        seen.add(elem)
        parts.append(_HEADER.pack(0, elem, len(raw)))
        parts.append(raw)
    if 0x0100 not in seen:
        raise CommandError("a command set needs a CommandField")
    body = b"".join(parts)
    return _HEADER.pack(0, 0, 4) + _UL.pack(len(body)) + body


def _decode_numbers(keyword, vr, raw):
    size, fmt = (2, "H") if vr == "US" else (4, "I")
    count, rest = divmod(len(raw), size)
    if rest:
        raise CommandError("%s: %d bytes is not a whole number of %s values" % (keyword, len(raw), vr))
    if count == 1:
        return _US.unpack(raw)[0] if size == 2 else _UL.unpack(raw)[0]
    if keyword in _SINGLE_VALUED:
        raise CommandError("%s: expected one %s value, got %d" % (keyword, vr, count))
    if count == 0:
        return None
    return list(struct.unpack("<%d%s" % (count, fmt), raw))


def decode_command(data):
    """
    Decode a command set (implicit VR little endian, group 0000) with a
    C{struct} walk.

    Values by the VR of each known element: US/UL as C{int} (a list when the
    peer sent several values, C{None} when empty; the elements that must be
    single-valued - CommandField, MessageID, Status, ... - raise instead);
    UI with trailing NUL/space padding removed; AE and CS stripped of spaces
    on both sides; LO/SH/LT/IS of trailing spaces; AT as a list of C{int}
    tags (C{0xGGGGEEEE}). Unknown elements are kept as raw C{bytes} under
    C{"0000xxxx"}. The Command Group Length value is returned as sent and
    not checked.

    @param data: the command set bytes (bytes-like).
    @raise CommandError: a truncated element header, a value running past the
        end, a first element outside group 0000 (elements of other groups
        after group 0000 are ignored), a malformed numeric value, or no
        CommandField.
    @rtype: L{dict}
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    end = len(data)
    offset = 0
    fields = {}
    unpack_header = _HEADER.unpack_from
    unpack_us = _US.unpack_from
    unpack_ul = _UL.unpack_from
    by_element = _BY_ELEMENT
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated element header at offset %d" % offset)
        group, elem, length = unpack_header(data, offset)
        offset += 8
        value_end = offset + length
        if group or value_end > end:
            if group:
                if fields:
                    # DCMTK-based peers (Orthanc among them) append status
                    # details such as the Failed SOP Instance UID List
                    # (0008,0058) to the command set of C-GET/C-MOVE
                    # responses: what follows group 0000 is not part of the
                    # command and is ignored.
                    break
                raise CommandError("element (%04X,%04X) is outside the command group" % (group, elem))
            raise CommandError(
                "element (0000,%04X) of length %d runs past the end of the command set" % (elem, length)
            )
        known = by_element.get(elem)
        if known is None:
            fields[_hex_key(elem)] = data[offset:value_end]
        else:
            keyword, vr = known
            if vr == "US":
                if length == 2:
                    fields[keyword] = unpack_us(data, offset)[0]
                else:
                    fields[keyword] = _decode_numbers(keyword, vr, data[offset:value_end])
            elif vr == "UI":
                fields[keyword] = data[offset:value_end].rstrip(b"\x00 ").decode(_TEXT_ENCODING)
            elif vr == "UL":
                if length == 4:
                    fields[keyword] = unpack_ul(data, offset)[0]
                else:
                    fields[keyword] = _decode_numbers(keyword, vr, data[offset:value_end])
            elif vr == "AE" or vr == "CS":
                fields[keyword] = data[offset:value_end].strip(b" \x00").decode(_TEXT_ENCODING)
            elif vr == "AT":
                if length & 3:
                    raise CommandError("%s: %d bytes is not a whole number of tags" % (keyword, length))
                pairs = struct.unpack_from("<%dH" % (length // 2), data, offset)
                fields[keyword] = [(pairs[i] << 16) | pairs[i + 1] for i in range(0, len(pairs), 2)]
            else:  # LO, SH, LT, IS
                fields[keyword] = data[offset:value_end].rstrip(b" \x00").decode(_TEXT_ENCODING)
        offset = value_end
    if "CommandField" not in fields:
        raise CommandError("the command set has no CommandField")
    return fields


# ---------------------------------------------------------------------------
# Templated responses (the per-message path of an SCP)
# ---------------------------------------------------------------------------


def _ui(value):
    raw = value.encode("ascii")
    if len(raw) & 1:
        raw += b"\x00"
    return raw


def _lo(value):
    raw = value.encode(_TEXT_ENCODING, "replace")
    if len(raw) & 1:
        raw += b" "
    return raw


class _StoreRspTemplate:
    """
    The C-STORE-RSP elements up to Status for one SOP class, as a
    C{struct.Struct} that packs the group length, the message ID and the
    status between constant byte strings.
    """

    __slots__ = ("struct", "head", "middle", "fixed_length")

    def __init__(self, sop_class_uid):
        uid = _ui(sop_class_uid)
        # (0000,0002) UI, (0000,0100) US 0x8001, (0000,0120) header
        self.head = (
            _HEADER.pack(0, 0x0002, len(uid)) + uid
            + _HEADER.pack(0, 0x0100, 2) + _US.pack(C_STORE_RSP)
            + _HEADER.pack(0, 0x0120, 2)
        )
        # (0000,0800) US 0x0101, (0000,0900) header
        self.middle = _HEADER.pack(0, 0x0800, 2) + _US.pack(NO_DATASET) + _HEADER.pack(0, 0x0900, 2)
        # group length header (8) + value (4), head, message id (2), middle, status (2)
        self.struct = struct.Struct("<8sI%dsH%dsH" % (len(self.head), len(self.middle)))
        # the group length counts everything after the group length element
        self.fixed_length = self.struct.size - 12


_GROUP_LENGTH_HEADER = _HEADER.pack(0, 0, 4)
_STORE_RSP_TEMPLATES = {}
_STORE_RSP_TEMPLATES_MAX = 512  # SOP classes are few; a peer cannot grow this without bound


def store_rsp(message_id, sop_class_uid, sop_instance_uid, status, error_comment=None):
    """
    A C-STORE-RSP command set, built from a cached per-SOP-class template
    with one C{struct} pack; byte-identical to L{encode_command} with
    AffectedSOPClassUID, CommandField=0x8001, MessageIDBeingRespondedTo,
    CommandDataSetType=0x0101, Status, ErrorComment (left out when C{None})
    and AffectedSOPInstanceUID.

    @raise CommandError: a message ID or status outside 0..65535, or a UID
        that is not ASCII.
    """
    template = _STORE_RSP_TEMPLATES.get(sop_class_uid)
    try:
        if template is None:
            if len(_STORE_RSP_TEMPLATES) >= _STORE_RSP_TEMPLATES_MAX:
                _STORE_RSP_TEMPLATES.clear()
            template = _STORE_RSP_TEMPLATES[sop_class_uid] = _StoreRspTemplate(sop_class_uid)
        instance = _ui(sop_instance_uid)
        tail = _HEADER.pack(0, 0x1000, len(instance)) + instance
        if error_comment is not None:
            comment = _lo(error_comment)
            tail = _HEADER.pack(0, 0x0902, len(comment)) + comment + tail
        return template.struct.pack(
            _GROUP_LENGTH_HEADER,
            template.fixed_length + len(tail),
            template.head,
            message_id,
            template.middle,
            status,
        ) + tail
    except (struct.error, UnicodeEncodeError, AttributeError) as e:
        raise CommandError("cannot build a C-STORE-RSP: %s" % (e,)) from None


def _echo_rsp_template():
    uid = _ui(VERIFICATION_SOP_CLASS)
    head = (
        _HEADER.pack(0, 0x0002, len(uid)) + uid
        + _HEADER.pack(0, 0x0100, 2) + _US.pack(C_ECHO_RSP)
        + _HEADER.pack(0, 0x0120, 2)
    )
    middle = _HEADER.pack(0, 0x0800, 2) + _US.pack(NO_DATASET) + _HEADER.pack(0, 0x0900, 2)
    group_length = len(head) + 2 + len(middle) + 2
    prefix = _GROUP_LENGTH_HEADER + _UL.pack(group_length) + head
    return struct.Struct("<%dsH%dsH" % (len(prefix), len(middle))), prefix, middle


_ECHO_RSP_STRUCT, _ECHO_RSP_PREFIX, _ECHO_RSP_MIDDLE = _echo_rsp_template()


def echo_rsp(message_id, status=0):
    """
    A C-ECHO-RSP command set (Verification SOP Class, no data set) from a
    template; byte-identical to L{encode_command}.

    @raise CommandError: a message ID or status outside 0..65535.
    """
    try:
        return _ECHO_RSP_STRUCT.pack(_ECHO_RSP_PREFIX, message_id, _ECHO_RSP_MIDDLE, status)
    except struct.error as e:
        raise CommandError("cannot build a C-ECHO-RSP: %s" % (e,)) from None


# ---------------------------------------------------------------------------
# Assembly of received PDVs
# ---------------------------------------------------------------------------


class Command:
    """
    A complete command set arrived (its last fragment).

    @ivar context_id: the presentation context ID it came on.
    @ivar fields: the decoded command set (L{decode_command}).
    @ivar has_dataset: C{True} when CommandDataSetType announces a data set;
        its fragments follow as L{DataFragment}s on the same context.
    """

    __slots__ = ("context_id", "fields", "has_dataset")

    def __init__(self, context_id, fields, has_dataset):
        self.context_id = context_id
        self.fields = fields
        self.has_dataset = has_dataset

    @property
    def command_field(self):
        return self.fields["CommandField"]

    def __eq__(self, other):
        if not isinstance(other, Command):
            return NotImplemented
        return (self.context_id, self.fields, self.has_dataset) == (
            other.context_id, other.fields, other.has_dataset
        )

    def __repr__(self):
        return "Command(context_id=%r, command_field=0x%04X, has_dataset=%r)" % (
            self.context_id, self.fields.get("CommandField", 0), self.has_dataset
        )


class DataFragment:
    """
    One data set fragment, passed on as it arrived.

    @ivar context_id: the presentation context ID.
    @ivar data: the fragment's bytes: the very object given to
        L{MessageAssembler.feed} (a C{memoryview} into the receive buffer
        stays a C{memoryview}: consume it before the buffer is reused).
    @ivar last: C{True} for the last fragment of the data set.
    """

    __slots__ = ("context_id", "data", "last")

    def __init__(self, context_id, data, last):
        self.context_id = context_id
        self.data = data
        self.last = last

    def __eq__(self, other):
        if not isinstance(other, DataFragment):
            return NotImplemented
        return (self.context_id, bytes(self.data), self.last) == (
            other.context_id, bytes(other.data), other.last
        )

    def __repr__(self):
        return "DataFragment(context_id=%r, %d bytes, last=%r)" % (self.context_id, len(self.data), self.last)


class MessageAssembler:
    """
    Turn the PDVs of received P-DATA-TF PDUs into DIMSE message events
    (PS3.8 Annex E, PS3.7 6.3.1).

    Feed every PDV in the order received; each call returns the events it
    completes: a L{Command} once the last command fragment arrived, then one
    L{DataFragment} per data set fragment. Data set fragments are never
    copied or joined: memory stays bounded however large the data set.

    Enforced (anything else raises L{MessageError}; a malformed command set
    raises L{CommandError}, a subclass): a message's command fragments all
    on one context; no data set fragment before a command that announced a
    data set, nor on another context than that command's; no new command
    before the announced data set's last fragment; a command set at most
    L{MAX_COMMAND_LENGTH} bytes; a CommandDataSetType in every command.
    Only bits 0 and 1 of the message control header are looked at (PS3.8
    E.2). After an error the assembler is unusable: abort the association.
    """

    __slots__ = ("_command_context", "_command_parts", "_command_length", "_dataset_context", "_max_command_length")

    def __init__(self, max_command_length=MAX_COMMAND_LENGTH):
        self._command_context = None  # context of a command being collected
        self._command_parts = []
        self._command_length = 0
        self._dataset_context = None  # context whose data set is expected
        self._max_command_length = max_command_length

    @property
    def in_progress(self):
        """C{True} between a message's first fragment and its last."""
        return self._command_context is not None or self._dataset_context is not None

    def feed(self, context_id, control_header, data):
        """
        @param context_id: the PDV's presentation context ID.
        @param control_header: the PDV's message control header byte.
        @param data: the PDV's data (bytes-like).
        @return: a list of L{Command} / L{DataFragment} events (possibly empty).
        """
        if control_header & 1:
            return self._feed_command(context_id, control_header, data)
        dataset_context = self._dataset_context
        if dataset_context is None:
            if self._command_context is not None:
                raise MessageError("data set fragment before the last command fragment")
            raise MessageError("data set fragment without a command announcing a data set")
        if context_id != dataset_context:
            raise MessageError(
                "data set fragment on presentation context %d, its command came on %d"
                % (context_id, dataset_context)
            )
        if control_header & 2:
            self._dataset_context = None
            return [DataFragment(context_id, data, True)]
        return [DataFragment(context_id, data, False)]

    def _feed_command(self, context_id, control_header, data):
        if self._dataset_context is not None:
            raise MessageError("command fragment while the previous message's data set is incomplete")
        if self._command_context is None:
            self._command_context = context_id
        elif context_id != self._command_context:
            raise MessageError(
                "command fragment on presentation context %d while a command on %d is incomplete"
                % (context_id, self._command_context)
            )
        self._command_length += len(data)
        if self._command_length > self._max_command_length:
            raise MessageError("command set longer than %d bytes" % self._max_command_length)
        if not control_header & 2:
            self._command_parts.append(bytes(data))
            return []
        parts = self._command_parts
        if parts:
            parts.append(bytes(data))
            raw = b"".join(parts)
        else:
            raw = data
        self._command_parts = []
        self._command_length = 0
        self._command_context = None
        fields = decode_command(raw)
        data_set_type = fields.get("CommandDataSetType")
        if data_set_type is None:
            raise CommandError("the command set has no CommandDataSetType")
        has_dataset = data_set_type != NO_DATASET
        if has_dataset:
            self._dataset_context = context_id
        return [Command(context_id, fields, has_dataset)]


# ---------------------------------------------------------------------------
# Fragmentation into P-DATA-TF PDUs
# ---------------------------------------------------------------------------

# P-DATA-TF PDU header + one PDV item header:
# PDU type 0x04, reserved, PDU length (BE), item length (BE), context ID, control header
_PDATA_HEADER = struct.Struct(">BBIIBB")
_PDV_OVERHEAD = 6  # item length (4) + context ID (1) + control header (1)

_COMMAND = 0x01
_COMMAND_LAST = 0x03
_DATASET = 0x00
_DATASET_LAST = 0x02


def _pdu(context_id, control_header, data):
    length = len(data)
    return b"".join(
        (_PDATA_HEADER.pack(0x04, 0x00, length + _PDV_OVERHEAD, length + 2, context_id, control_header), data)
    )


def _fragments(context_id, buffer, size, more, last):
    """PDUs for one buffer cut into pieces of C{size} bytes (C{None}: one piece)."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    total = len(view)
    if size is None or total <= size:
        yield _pdu(context_id, last, view)
        return
    offset = 0
    final = total - size
    while offset < final:
        yield _pdu(context_id, more, view[offset:offset + size])
        offset += size
    yield _pdu(context_id, last, view[offset:])


def _byte_view(chunk):
    view = memoryview(chunk)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _stream_fragments(context_id, chunks, size):
    """
    PDUs for an iterable of chunks, re-cut into pieces of exactly C{size}
    bytes (the last piece shorter) without joining the chunks first: a PDU
    is written as soon as it is full and more data is known to follow.
    With C{size=None} (no limit) every non-empty chunk becomes one PDV.
    """
    if size is None:
        previous = None
        for chunk in chunks:
            view = _byte_view(chunk)
            if not len(view):
                continue
            if previous is not None:
                yield _pdu(context_id, _DATASET, previous)
            previous = view
        if previous is not None:
            yield _pdu(context_id, _DATASET_LAST, previous)
        return

    pending = deque()
    pending_length = 0
    for chunk in chunks:
        view = _byte_view(chunk)
        if not len(view):
            continue
        pending.append(view)
        pending_length += len(view)
        # strictly more than one PDV's worth: this PDV is not the last
        while pending_length > size:
            pieces = []
            need = size
            while need:
                head = pending[0]
                if len(head) <= need:
                    pieces.append(head)
                    need -= len(head)
                    pending.popleft()
                else:
                    pieces.append(head[:need])
                    pending[0] = head[need:]
                    need = 0
            pending_length -= size
            yield b"".join(
                [_PDATA_HEADER.pack(0x04, 0x00, size + _PDV_OVERHEAD, size + 2, context_id, _DATASET)] + pieces
            )
    if pending_length:
        yield b"".join(
            [_PDATA_HEADER.pack(0x04, 0x00, pending_length + _PDV_OVERHEAD, pending_length + 2, context_id,
                                _DATASET_LAST)]
            + list(pending)
        )


def fragment(context_id, command, dataset=None, max_pdu_length=16382):
    """
    Whole P-DATA-TF PDUs for one DIMSE message, one PDV per PDU: the command
    set fragments (control header 0x01, the last 0x03), then the data set
    fragments (0x00, the last 0x02).

    Every PDU's variable field (the PDV item: 4-byte item length, context
    ID, control header and data) is at most C{max_pdu_length} bytes, the
    peer's Maximum Length Received (PS3.8 D.1); 0 means no limit. For a
    C{bytes} data set this is exactly what pynetdicom's
    C{DIMSEMessage.encode_msg} sends, and an empty data set is not sent.

    @param dataset: C{None}, a bytes-like object, or an iterable of
        bytes-like chunks (streamed: chunks are re-cut into PDV-sized pieces
        without being joined first; each chunk is referenced until its bytes
        are sent, so do not mutate a chunk after yielding it). With no limit
        (C{max_pdu_length=0}) each non-empty chunk of an iterable becomes one
        PDV.
    @raise ValueError: C{max_pdu_length} between 1 and 6 (no room for a data
        byte) or negative, or C{context_id} outside 1..255.
    @return: an iterator of C{bytes}.
    """
    if max_pdu_length < 0 or 0 < max_pdu_length < 7:
        raise ValueError("max_pdu_length must be 0 (no limit) or at least 7, not %r" % (max_pdu_length,))
    if not 1 <= context_id <= 255:
        raise ValueError("context_id must be 1..255, not %r" % (context_id,))
    size = max_pdu_length - _PDV_OVERHEAD if max_pdu_length else None
    if dataset is None and (size is None or len(command) <= size):
        # a response: one PDU, without the generator machinery
        return iter((_pdu(context_id, _COMMAND_LAST, command),))
    return _fragment(context_id, command, dataset, size)


def _fragment(context_id, command, dataset, size):
    yield from _fragments(context_id, command, size, _COMMAND, _COMMAND_LAST)
    if dataset is None:
        return
    if isinstance(dataset, (bytes, bytearray, memoryview)):
        if len(dataset):
            yield from _fragments(context_id, dataset, size, _DATASET, _DATASET_LAST)
        return
    yield from _stream_fragments(context_id, dataset, size)
