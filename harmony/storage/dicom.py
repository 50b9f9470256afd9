# -*- test-case-name: tests.unit.test_storage_dicom -*-
"""
DICOM helpers for storage, kept off pydicom on the per-instance path
(DESIGN.md rule 10):

  - L{uids_from_dataset_prefix}: the Study/Series/SOP Instance UIDs from a
    minimal tag walk over the first bytes of an encoded dataset (the
    dataset is never parsed);
  - L{layout_path}: the relpath of an instance from a layout template such
    as C{"{study}/{series}/{sop}.dcm"};
  - L{file_meta}: the Part 10 preamble, C{DICM} prefix and File Meta
    Information group, built once per (SOP class, transfer syntax, ...)
    by pydicom and patched with C{struct} for each SOP instance
    (byte-identical to pydicom's output).
"""

import functools
import re
import string
import struct
import zlib

from harmony.storage.filesystem import split_relpath

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

#: How much of a deflated dataset is inflated at most to find the UIDs.
MAX_INFLATED = 4 * 1024 * 1024
#: Sequence nesting deeper than this (before the UIDs) is not a dataset.
MAX_DEPTH = 32

_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_TARGETS = frozenset((_SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID))

_VRS = frozenset(
    vr.encode("ascii")
    for vr in (
        "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
_LONG_VRS = frozenset(vr.encode("ascii") for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED_OK_VRS = frozenset((b"SQ", b"UN", b"OB", b"OW"))

# (tag as two uint16, length uint32) and explicit VR short/long headers.
_HEADERS = {
    True: (struct.Struct("<HHI"), struct.Struct("<HH2sH"), struct.Struct("<I")),
    False: (struct.Struct(">HHI"), struct.Struct(">HH2sH"), struct.Struct(">I")),
}
_TAGS = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}


class NeedMoreData(Exception):
    """
    The bytes given end before the walk could pass (0020,000E): call again
    with more of the dataset (or with C{final=True} when there is no more).
    Not a C{ValueError}: the data may well be a dataset.
    """


class _Short(Exception):
    pass


class _Walker:
    """
    Skips elements of an encoded dataset; raises L{_Short} when the bytes
    run out and C{ValueError} when they are not a dataset.
    """

    def __init__(self, buf):
        self.buf = buf
        self.n = len(buf)

    def element(self, pos, little, implicit):
        """
        Read the element header at C{pos}: (tag, vr or None, length,
        value offset).
        """
        buf = self.buf
        tag_len, short, long_len = _HEADERS[little]
        if pos + 8 > self.n:
            raise _Short()
        if implicit:
            group, elem, length = tag_len.unpack_from(buf, pos)
            return (group << 16) | elem, None, length, pos + 8
        group, elem, vr, length = short.unpack_from(buf, pos)
        if vr not in _VRS:
            if group == 0xFFFE:
                group, elem, length = tag_len.unpack_from(buf, pos)
                return (group << 16) | elem, None, length, pos + 8
            raise ValueError("not a DICOM dataset: bad VR in explicit VR data")
        if vr in _LONG_VRS:
            if pos + 12 > self.n:
                raise _Short()
            (length,) = long_len.unpack_from(buf, pos + 8)
            return (group << 16) | elem, vr, length, pos + 12
        return (group << 16) | elem, vr, length, pos + 8

    def skip_sequence(self, pos, little, implicit, depth):
        """
        Skip the items of an undefined-length sequence (or encapsulated
        value) starting at C{pos}; returns the offset after its delimiter.
        """
        if depth > MAX_DEPTH:
            raise ValueError("not a DICOM dataset: sequences nested too deep")
        tag_len = _HEADERS[little][0]
        while True:
            if pos + 8 > self.n:
                raise _Short()
            group, elem, length = tag_len.unpack_from(self.buf, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise ValueError("not a DICOM dataset: expected an item in a sequence")
            if length == _UNDEFINED:
                pos = self.skip_item(pos, little, implicit, depth + 1)
            else:
                pos += length
                if pos > self.n:
                    raise _Short()

    def skip_item(self, pos, little, implicit, depth):
        """
        Skip the elements of an undefined-length item up to and including
        its delimiter.
        """
        while True:
            tag, vr, length, value = self.element(pos, little, implicit)
            if tag == _ITEM_DELIMITER:
                return value
            if tag >> 16 == 0xFFFE:
                raise ValueError("not a DICOM dataset: unexpected item tag in an item")
            pos = self.skip_value(tag, vr, length, value, little, implicit, depth)

    def skip_value(self, tag, vr, length, value, little, implicit, depth):
        if length != _UNDEFINED:
            end = value + length
            if end > self.n:
                raise _Short()
            return end
        if vr is not None and vr not in _UNDEFINED_OK_VRS:
            raise ValueError("not a DICOM dataset: undefined length on a %s element" % (vr.decode(),))
        if vr == b"UN":
            # PS3.5 6.2.2: an undefined-length UN holds implicit VR LE.
            return self.skip_sequence(value, True, True, depth + 1)
        return self.skip_sequence(value, little, implicit, depth + 1)


def _encoding(transfer_syntax):
    """
    (little endian, implicit VR, deflated) for a transfer syntax UID; every
    other (encapsulated) transfer syntax is explicit VR little endian.
    """
    ts = transfer_syntax.rstrip("\x00 ")
    if ts == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True, False
    if ts == EXPLICIT_VR_BIG_ENDIAN:
        return False, False, False
    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return True, False, True
    return True, False, False


def _uid_value(buf, start, end):
    raw = bytes(buf[start:end])
    try:
        value = raw.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        raise ValueError("not a DICOM dataset: non-ASCII UID") from None
    return value or None


def uids_from_dataset_prefix(data, transfer_syntax, final=False):
    """
    Find the Study, Series and SOP Instance UIDs in the beginning of an
    encoded dataset (the bytes after the file meta, or a C-STORE's dataset
    PDVs) with a minimal tag walk that stops as soon as (0020,000E) is
    passed.  Undefined-length sequences and items before the UIDs are
    skipped by their delimiters; defined-length values are skipped by their
    length, never decoded.

    @param data: the first bytes of the dataset (bytes-like).
    @param transfer_syntax: its transfer syntax UID: implicit VR LE,
        explicit VR LE/BE, deflated explicit VR LE (the beginning is
        inflated first), any encapsulated one (explicit VR LE).
    @param final: C{data} is the whole dataset: running out of bytes after
        a complete element means the missing UIDs are absent (C{None}).
    @return: C{(study_uid, series_uid, sop_instance_uid)}, each a str or
        C{None} when the dataset does not have it.
    @raise NeedMoreData: C{data} ends before the answer is known (only
        when not C{final}).
    @raise ValueError: C{data} is not an encoded dataset (or, with
        C{final}, a truncated one).
    """
    little, implicit, deflated = _encoding(transfer_syntax)
    if not deflated:
        try:
            return _walk(data, little, implicit, final)
        except _Short:
            if final:
                raise ValueError("not a DICOM dataset: truncated") from None
            raise NeedMoreData() from None
    # Inflate only as much as the walk needs: 4 KiB, then doubling.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = bytes(data)
    buf = b""
    limit = min(4096, MAX_INFLATED)
    while True:
        try:
            buf += inflater.decompress(pending, limit - len(buf))
        except zlib.error:
            raise ValueError("not a DICOM dataset: bad deflate data") from None
        pending = inflater.unconsumed_tail
        try:
            return _walk(buf, True, False, final and not pending)
        except _Short:
            if pending and limit < MAX_INFLATED:
                limit = min(limit * 2, MAX_INFLATED)
                continue
            if pending:
                raise ValueError("UIDs not within the first %d inflated bytes" % (MAX_INFLATED,)) from None
            if final:
                raise ValueError("not a DICOM dataset: truncated") from None
            raise NeedMoreData() from None


def _walk(buf, little, implicit, final):
    """
    The top-level walk of L{uids_from_dataset_prefix}; raises L{_Short}.
    """
    walker = _Walker(buf)
    n = walker.n
    tag_len, short, long_len = _HEADERS[little]
    tag_struct = _TAGS[little]
    vrs, long_vrs = _VRS, _LONG_VRS
    uids = {}
    pos = 0
    previous = -1
    while True:
        # The common case inline (one unpack per element): rule 10.
        if pos + 8 > n:
            # The tag alone may be enough to stop.
            if pos + 4 > n:
                if pos == n and final and previous >= 0:
                    break
                raise _Short()
            group, elem = tag_struct.unpack_from(buf, pos)
            if ((group << 16) | elem) > _SERIES_INSTANCE_UID and previous >= 0:
                break
            raise _Short()
        if implicit:
            group, elem, length = tag_len.unpack_from(buf, pos)
            vr = None
            value = pos + 8
        else:
            group, elem, vr, length = short.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if tag > _SERIES_INSTANCE_UID:
            if previous < 0:
                # A composite instance has elements before (0020,000E).
                raise ValueError("not a DICOM dataset: no element before (0020,000E)")
            break
        if tag <= previous:
            raise ValueError("not a DICOM dataset: tags out of order")
        if group < 0x0004:
            raise ValueError("not a DICOM dataset: group %04X element" % (group,))
        previous = tag
        if not implicit:
            if vr in long_vrs:
                if pos + 12 > n:
                    raise _Short()
                (length,) = long_len.unpack_from(buf, pos + 8)
                value = pos + 12
            elif vr in vrs:
                value = pos + 8
            else:
                raise ValueError("not a DICOM dataset: bad VR in explicit VR data")
        if length == _UNDEFINED:
            if tag in (_SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID):
                raise ValueError("not a DICOM dataset: undefined-length UID")
            pos = walker.skip_value(tag, vr, length, value, little, implicit, 0)
            continue
        pos = value + length
        if pos > n:
            raise _Short()
        if tag >= _SOP_INSTANCE_UID and tag in _TARGETS:
            uids[tag] = _uid_value(buf, value, pos)
            if tag == _SERIES_INSTANCE_UID:
                break
    return (
        uids.get(_STUDY_INSTANCE_UID),
        uids.get(_SERIES_INSTANCE_UID),
        uids.get(_SOP_INSTANCE_UID),
    )


# -- layout ---------------------------------------------------------------

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")
_LAYOUT_FIELDS = frozenset(("study", "series", "sop"))
_LAYOUT_LITERAL = re.compile(r"[A-Za-z0-9._/-]*\Z")

DEFAULT_LAYOUT = "{study}/{series}/{sop}.dcm"


def check_uid(uid, what="UID"):
    """
    @return: C{uid} when it is a UID (digits and single dots, 1 to 64
        characters).
    @raise ValueError: otherwise.
    """
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise ValueError("invalid %s for a storage path" % (what,))
    return uid


@functools.lru_cache(maxsize=64)
def check_layout(layout):
    """
    Validate a storage layout template (at startup): only C{{study}},
    C{{series}}, C{{sop}} fields (C{{sop}} required), literal text of
    C{[A-Za-z0-9._/-]}, and a relative path without C{.}/C{..}/empty
    components whatever the UIDs.

    @return: C{layout}.
    @raise ValueError: otherwise.
    """
    if not isinstance(layout, str):
        raise ValueError("storage layout must be a string")
    fields = set()
    try:
        parsed = list(string.Formatter().parse(layout))
    except ValueError as e:
        raise ValueError("invalid storage layout: %s" % (e,)) from None
    for literal, field, spec, conversion in parsed:
        if not _LAYOUT_LITERAL.match(literal):
            raise ValueError("invalid character in storage layout")
        if field is None:
            continue
        if field not in _LAYOUT_FIELDS or spec or conversion:
            raise ValueError("storage layout fields are {study}, {series} and {sop} only")
        fields.add(field)
    if "sop" not in fields:
        raise ValueError("storage layout must contain {sop}")
    split_relpath(layout.format(study="1", series="2", sop="3"))
    return layout


def layout_path(layout, study, series, sop):
    """
    The relpath of an instance: C{layout} with its fields replaced by the
    UIDs, e.g. C{"1.2/1.2.3/1.2.3.4.dcm"} for the default layout.

    @raise ValueError: an invalid layout, or a UID that is missing
        (C{None}) or not made of UID characters.
    """
    check_layout(layout)
    path = layout.format(
        study=check_uid(study, "Study Instance UID"),
        series=check_uid(series, "Series Instance UID"),
        sop=check_uid(sop, "SOP Instance UID"),
    )
    split_relpath(path)
    return path


# -- file meta ------------------------------------------------------------

PREAMBLE = b"\x00" * 128 + b"DICM"
_ELEMENT_HEADER = struct.Struct("<HH2sH")
_UL = struct.Struct("<I")


def _clean(value, what):
    if not isinstance(value, str):
        raise ValueError("%s must be a str" % (what,))
    value = value.rstrip("\x00 ")
    if not value:
        raise ValueError("empty %s" % (what,))
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("non-ASCII %s" % (what,)) from None
    return value


@functools.lru_cache(maxsize=256)
def _template(sop_class_uid, transfer_syntax, implementation_class_uid, implementation_version_name, source_aet):
    """
    Encode the file meta once with pydicom (a placeholder SOP instance
    UID) and cut it around (0002,0003).

    @return: (bytes up to the group length value, bytes between the group
        length and (0002,0003), bytes after (0002,0003)).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = "1.2"
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = implementation_class_uid
    if implementation_version_name is not None:
        meta.ImplementationVersionName = implementation_version_name
    if source_aet is not None:
        meta.SourceApplicationEntityTitle = source_aet
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=False)
    encoded = fp.getvalue()

    # Walk the explicit VR LE elements to find (0002,0003).
    pos = 12  # after the group length element
    while pos < len(encoded):
        group, elem, vr, length = _ELEMENT_HEADER.unpack_from(encoded, pos)
        if vr in _LONG_VRS:
            (length,) = _UL.unpack_from(encoded, pos + 8)
            end = pos + 12 + length
        else:
            end = pos + 8 + length
        if (group, elem) == (0x0002, 0x0003):
            return PREAMBLE + encoded[:8], encoded[12:pos], encoded[end:]
        pos = end
    raise AssertionError("pydicom wrote no (0002,0003)")  # pragma: no cover


def file_meta(
    sop_class_uid,
    sop_instance_uid,
    transfer_syntax,
    implementation_class_uid,
    implementation_version_name=None,
    source_aet=None,
):
    """
    The beginning of a DICOM Part 10 file: 128-byte zero preamble,
    C{b"DICM"} and the File Meta Information group (0002) in explicit VR
    little endian, with (0002,0000) group length, (0002,0001) version
    C{00 01}, (0002,0002), (0002,0003), (0002,0010), (0002,0012), and
    (0002,0013) / (0002,0016) when given.  Trailing NUL/space padding of
    the UIDs given is removed.

    Byte-identical to C{pydicom.filewriter.dcmwrite(...,
    enforce_file_format=True)} / C{write_file_meta_info} for the same
    values (when C{implementation_version_name} is C{None}, pydicom would
    add its own name; here the element is left out).  The encoding is
    built by pydicom once per (SOP class, transfer syntax, implementation,
    AE) and patched with C{struct} per instance.

    @raise ValueError: an empty or non-ASCII UID.
    @return: bytes
    """
    head, middle, tail = _template(
        _clean(sop_class_uid, "SOP Class UID"),
        _clean(transfer_syntax, "Transfer Syntax UID"),
        _clean(implementation_class_uid, "Implementation Class UID"),
        implementation_version_name,
        source_aet,
    )
    uid = _clean(sop_instance_uid, "SOP Instance UID").encode("ascii")
    if len(uid) & 1:
        uid += b"\x00"
    element = _ELEMENT_HEADER.pack(0x0002, 0x0003, b"UI", len(uid))
    group_length = len(middle) + len(element) + len(uid) + len(tail)
    return b"".join((head, _UL.pack(group_length), middle, element, uid, tail))


__all__ = [
    "DEFAULT_LAYOUT",
    "NeedMoreData",
    "PREAMBLE",
    "check_layout",
    "check_uid",
    "file_meta",
    "layout_path",
    "uids_from_dataset_prefix",
]
