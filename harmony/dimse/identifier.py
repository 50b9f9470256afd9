# -*- test-case-name: tests.unit.test_dimse_identifier_decoding -*-
"""
Decoding DIMSE identifiers (C-FIND/C-GET/C-MOVE query keys and C-FIND
matches) into pydicom datasets, fast.

An identifier is a small data set (a few dozen elements) received on
every C-FIND response, so pydicom's general-purpose reader
(C{pydicom.filereader.read_dataset}) is a large share of a query's CPU.
L{raw_elements} is its fast path for the common case — little endian,
every length defined — producing exactly the C{RawDataElement}s pydicom's
C{data_element_generator} would (same tags, VRs, lengths, values, value
offsets and flags; values are converted lazily by pydicom as usual).
Anything else (big endian, an undefined length, a sequence delimiter, a
VR pydicom does not know, truncated data, or a first element whose
encoding is not the declared one, where pydicom switches encodings with a
warning) goes to pydicom's reader unchanged.
"""

import struct

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import ENCODED_VR, read_dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")
_LENGTH_32 = struct.Struct("<L")

#: Encoded VR -> VR: pydicom's (others take pydicom's path).
_VRS = {vr: vr.decode("ascii") for vr in ENCODED_VR if len(vr) == 2}

_CHARSET = BaseTag(0x00080005)
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITATION = 0xFFFEE00D


def raw_elements(data, implicit):
    """
    The raw elements of a little endian data set whose lengths are all
    defined, as pydicom's C{data_element_generator} reads them.

    @param data: C{bytes}.
    @param implicit: whether the transfer syntax is implicit VR.
    @return: tag -> C{RawDataElement}, or C{None} when pydicom must read it.
    """
    end = len(data)
    if end >= 6:
        # pydicom's check of the first element (_is_implicit_vr).
        looks_implicit = not (0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B)
        if looks_implicit != implicit:
            return None
    out = {}
    pos = 0
    vrs = _VRS
    long_vrs = EXPLICIT_VR_LENGTH_32
    new = tuple.__new__
    while pos < end:
        if end - pos < 8:
            return None
        if implicit:
            group, elem, length = _IMPLICIT.unpack_from(data, pos)
            vr = None
            pos += 8
        else:
            group, elem, encoded, length = _EXPLICIT.unpack_from(data, pos)
            vr = vrs.get(encoded)
            if vr is None:
                return None
            pos += 8
            if vr in long_vrs:
                if end - pos < 4:
                    return None
                length = _LENGTH_32.unpack_from(data, pos)[0]
                pos += 4
        tag = group << 16 | elem
        if length == _UNDEFINED or tag == _ITEM_DELIMITATION or end - pos < length:
            return None
        tag = BaseTag(tag)
        value = data[pos : pos + length] if length else empty_value_for_VR(vr, raw=True)
        # RawDataElement(tag, vr, length, value, pos, implicit, True), a
        # third cheaper.
        out[tag] = new(RawDataElement, (tag, vr, length, value, pos, implicit, True, True, False))
        pos += length
    return out


def read_identifier(data, implicit, little_endian=True):
    """
    A pydicom C{Dataset} of an (inflated) identifier, as
    C{pydicom.filereader.read_dataset} would make it.

    @param data: C{bytes}.
    """
    raw = raw_elements(data, implicit) if little_endian else None
    if raw is None:
        return read_dataset(DicomBytesIO(data), implicit, little_endian)
    ds = Dataset(raw, parent_encoding=default_encoding)
    charset = raw.get(_CHARSET)
    encoding = default_encoding if charset is None else _encodings(charset)
    ds.set_original_encoding(implicit, True, encoding)
    return ds


#: Specific Character Set value -> Python encodings (every match of a
#: C-FIND usually carries the same one).
_ENCODINGS = {}


def _encodings(element):
    key = element.value
    encodings = _ENCODINGS.get(key)
    if encodings is None:
        encodings = convert_encodings(convert_raw_data_element(element).value)
        if len(_ENCODINGS) >= 64:
            _ENCODINGS.clear()
        _ENCODINGS[key] = encodings
    # A copy: a dataset's encodings are its own.
    return list(encodings) if isinstance(encodings, list) else encodings
