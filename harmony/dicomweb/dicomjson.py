# -*- test-case-name: tests.unit.test_dicomweb_json -*-
"""
DICOM JSON (PS3.18 Annex F) and the Native DICOM Model XML (PS3.19 Annex A)
of pydicom datasets, and the way back from JSON.

L{dataset_to_json} walks the dataset itself instead of calling pydicom's
C{Dataset.to_json_dict}, which reads every deferred value, knows no tag
paths, counts the threshold in base64 characters and writes empty person
name groups.  The rules:

  - keys are the 8 upper-case hex digits of the tag; group length elements
    (gggg,0000) and the file meta group 0002 are left out; private elements
    (and their creators) are kept;
  - an element without a value is C{{"vr": VR}} alone (no C{"Value"});
  - C{IS} and C{DS} values are JSON numbers (C{"1.50"} -> C{1.5}, C{"12"} ->
    C{12}); a value that is not a valid number (C{"abc"}, C{"1,5"}) is kept
    as the JSON string it was, so nothing is lost; C{FL}/C{FD} values that
    are not finite (no JSON number exists for them) become the strings
    C{"NaN"}, C{"Infinity"}, C{"-Infinity"};
  - an empty value inside a multi-valued element is C{null};
  - C{PN} values are objects with the C{"Alphabetic"}, C{"Ideographic"} and
    C{"Phonetic"} groups that are present and not empty;
  - C{AT} values are C{"GGGGEEEE"} strings;
  - C{SQ} items are nested objects (an empty item is C{{}});
  - binary VRs (OB, OD, OF, OL, OV, OW, UN): with C{bulk_uri} the value is
    C{{"BulkDataURI": bulk_uri(path)}} when it is longer than
    C{bulk_threshold} bytes, of undefined length (encapsulated pixel data),
    or pixel data (7FE0,0008/0009/0010) of any length; otherwise it is
    inline (C{"InlineBinary"}, base64).  Without C{bulk_uri} every value is
    inline.  Values are taken as stored (little endian; big-endian files are
    retired and not byte-swapped).

A value left deferred by C{dcmread(path, defer_size=...)} is not read when
it becomes a BulkDataURI: its length comes from the raw element.

Tag paths name an element for L{element_at} and C{bulk_uri}: C{"GGGGEEEE"}
at the top level, C{"GGGGEEEE/<item index from 0>/GGGGEEEE"} inside
sequences (C{"00540016/0/00181074"}).

L{dataset_to_xml} writes the same model as a NativeDicomModel document.
L{json_to_dataset} reads DICOM JSON with pydicom; BulkDataURI elements are
kept with an empty value (the bulk data is not fetched).
"""

import base64
import math
import re
import xml.etree.ElementTree as ET

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from harmony.errors import BadRequest, NotFound

#: VRs whose values are bytes: bulk data candidates.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always bulk data.
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_UNDEFINED_LENGTH = 0xFFFFFFFF

#: What an ambiguous VR becomes when pydicom could not resolve it.
_AMBIGUOUS = {"OB or OW": "OW", "US or SS": "US", "US or OW": "US", "US or SS or OW": "US"}

_IS_RE = re.compile(r"[+-]?[0-9]+")
_DS_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


# -- DICOM JSON ----------------------------------------------------------------------------


def dataset_to_json(ds, bulk_uri=None, bulk_threshold=1024):
    """
    The DICOM JSON object of a dataset (see the module docstring).

    @param ds: a pydicom C{Dataset} (possibly read with C{defer_size}).
    @param bulk_uri: C{None} (every binary value inline), or a callable
        taking a tag path and returning the BulkDataURI for it.
    @param bulk_threshold: binary values longer than this many bytes are
        bulk data when C{bulk_uri} is given.
    @return: a C{dict} ready for C{json.dumps}.
    """
    return _dataset(ds, "", bulk_uri, bulk_threshold)


def _dataset(ds, prefix, bulk_uri, threshold, inherited="latin-1"):
    out = {}
    encoding = _text_encoding(ds, inherited)
    for tag in sorted(ds.keys()):
        tag = int(tag)
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
            continue
        key = f"{tag:08X}"
        out[key] = _element(ds, tag, prefix + key, bulk_uri, threshold, encoding)
    return out


#: Character sets whose text values are decoded here without pydicom
#: (C-FIND matches are mostly text: converting them with pydicom cost
#: more than the rest of a QIDO answer).
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
#: Text VRs whose values are split on backslashes and stripped.
_SPLIT_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UC"})
#: Text VRs holding one value, trailing spaces insignificant.
_SINGLE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
#: VRs whose text is in the dataset's character set (the others are ASCII).
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def _text_encoding(ds, inherited):
    """
    The Python codec of the dataset's text values when it is one decoded
    here (default repertoire, Latin-1, UTF-8), else C{None} (pydicom
    converts); a sequence item without its own Specific Character Set has
    its parent's (C{inherited}).
    """
    try:
        raw = ds.get_item(0x00080005, keep_deferred=True)
    except KeyError:
        raw = None
    if raw is None:
        return inherited
    value = raw.value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    if isinstance(value, (list, MultiValue)):
        return None
    return _CHARSETS.get((value or "").strip(" \x00"))


def _fast_text(vr, data, encoding):
    """
    The DICOM JSON of a raw text element, or C{None} when pydicom should
    convert it.
    """
    try:
        text = bytes(data).decode(encoding if vr in _CHARSET_VRS else "latin-1")
    except UnicodeDecodeError:
        return None
    if vr in _SINGLE_TEXT:
        text = text.rstrip(" \x00")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    if vr == "UI":
        values = [v.strip(" \x00") for v in text.split("\\")]
    else:
        values = [v.strip(" \x00") for v in text.rstrip(" \x00").split("\\")]
    if vr == "PN":
        return _with_value(vr, [_person_name(v) for v in values])
    return _with_value(vr, [v or None for v in values])


def _element(ds, tag, path, bulk_uri, threshold, encoding=None):
    raw = ds.get_item(tag, keep_deferred=True)
    if isinstance(raw, RawDataElement):
        vr = _raw_vr(ds, raw)
        if raw.length == 0:
            if vr is not None and vr in _AMBIGUOUS:
                vr = _resolved_vr(ds, tag)
            return {"vr": vr or "UN"}
        if raw.value is None and vr in BINARY_VRS and bulk_uri is not None:
            # Deferred: decide from the length without reading the value.
            if _is_bulk(tag, raw.length, raw.length == _UNDEFINED_LENGTH, threshold):
                return {"vr": vr, "BulkDataURI": bulk_uri(path)}
        if raw.value is not None and vr in ("IS", "DS"):
            return _numbers(vr, _split_raw_text(raw.value))
        if raw.value is not None and encoding is not None and (vr in _SPLIT_TEXT or vr in _SINGLE_TEXT or vr == "PN"):
            fast = _fast_text(vr, raw.value, encoding)
            if fast is not None:
                return fast
    try:
        elem = ds[tag]
    except Exception:
        if not isinstance(raw, RawDataElement):
            raise
        # pydicom cannot convert it (an ambiguous VR it cannot resolve, a
        # broken value): keep the bytes as they are, as UN.
        return _binary("UN", tag, raw.value or b"", raw.length == _UNDEFINED_LENGTH, path, bulk_uri, threshold)
    vr = str(elem.VR)
    if vr in _AMBIGUOUS:
        vr = _AMBIGUOUS[vr]
    value = elem.value
    if vr == "SQ":
        items = [
            _dataset(item, f"{path}/{i}/", bulk_uri, threshold, encoding) for i, item in enumerate(value or ())
        ]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if vr in BINARY_VRS:
        if isinstance(value, (list, tuple, MultiValue)):  # several byte values: as stored, one after another
            value = b"".join(bytes(v) for v in value)
        return _binary(vr, tag, value, elem.is_undefined_length, path, bulk_uri, threshold)
    values = _values(value)
    if not values:
        return {"vr": vr}
    if vr in ("IS", "DS"):
        return _numbers(vr, ["" if v is None or v == "" else str(v) for v in values])
    if vr == "PN":
        return _with_value(vr, [_person_name(v) for v in values])
    if vr == "AT":
        return _with_value(vr, [None if v is None or v == "" else f"{int(v):08X}" for v in values])
    if vr in _NUMBER_VRS:
        return _with_value(vr, [_number(v) for v in values])
    return _with_value(vr, [None if v is None or v == "" else str(v) for v in values])


def _binary(vr, tag, value, undefined_length, path, bulk_uri, threshold):
    if not value:
        return {"vr": vr}
    if bulk_uri is not None and _is_bulk(tag, len(value), undefined_length, threshold):
        return {"vr": vr, "BulkDataURI": bulk_uri(path)}
    return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}


def _is_bulk(tag, length, undefined_length, threshold):
    return undefined_length or tag in PIXEL_DATA_TAGS or length > threshold


def _raw_vr(ds, raw):
    """
    The VR of a raw element without converting it (C{None} when only the
    conversion can tell: a private element of an implicit VR dataset).
    """
    if raw.VR is not None:
        vr = str(raw.VR)
    else:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if vr == "OB or OW" and raw.tag in PIXEL_DATA_TAGS:
        return _resolved_vr(ds, raw.tag)
    return vr


def _resolved_vr(ds, tag):
    if tag in PIXEL_DATA_TAGS:
        implicit = ds.original_encoding[0] if hasattr(ds, "original_encoding") else None
        if implicit or getattr(ds, "BitsAllocated", 16) > 8:
            return "OW"
        return "OB"
    return _AMBIGUOUS.get(dictionary_VR(tag), "UN")


def _values(value):
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    if isinstance(value, str) and value == "":
        return []
    return [value]


def _with_value(vr, values):
    if all(v is None for v in values):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _split_raw_text(data):
    text = bytes(data).decode("latin-1").rstrip(" \x00")
    return [part.strip(" \x00") for part in text.split("\\")] if text.strip(" \x00") else []


def _numbers(vr, texts):
    """
    IS/DS strings as JSON numbers; invalid ones stay strings, empty ones
    are C{null}.
    """
    if not texts:
        return {"vr": vr}
    pattern = _IS_RE if vr == "IS" else _DS_RE
    out = []
    for text in texts:
        text = text.strip()
        if not text:
            out.append(None)
        elif not pattern.fullmatch(text):
            out.append(text)
        elif _IS_RE.fullmatch(text):
            out.append(int(text))
        else:
            number = float(text)
            out.append(number if math.isfinite(number) else text)
    return _with_value(vr, out)


def _number(value):
    if value is None or value == "":
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    return int(value)


def _person_name(value):
    if value is None or value == "":
        return None
    groups = value.components if isinstance(value, PersonName) else str(value).split("=")
    out = {name: group for name, group in zip(_PN_GROUPS, groups) if group}
    return out or None


# -- tag paths ------------------------------------------------------------------------------


def _parse_path(tag_path):
    """
    C{[tag, index, tag, index, ..., tag]} of a tag path, or L{NotFound}.
    """
    parts = str(tag_path).strip("/").split("/")
    if len(parts) % 2 != 1:
        raise NotFound("No such bulk data")
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if not re.fullmatch(r"[0-9A-Fa-f]{8}", part):
                raise NotFound("No such bulk data")
            out.append(Tag(int(part, 16)))
        else:
            if not part.isdigit() or len(part) > 9:
                raise NotFound("No such bulk data")
            out.append(int(part))
    return out


def element_at(ds, tag_path):
    """
    The element a tag path names (its value is read when it was deferred).

    @raise NotFound: the path is malformed or names no element (the message
        names no value of the dataset).
    """
    steps = _parse_path(tag_path)
    current = ds
    for i in range(0, len(steps) - 1, 2):
        tag, index = steps[i], steps[i + 1]
        if tag not in current:
            raise NotFound("No such bulk data")
        elem = current[tag]
        if elem.VR != "SQ" or index >= len(elem.value or ()):
            raise NotFound("No such bulk data")
        current = elem.value[index]
    if steps[-1] not in current:
        raise NotFound("No such bulk data")
    return current[steps[-1]]


# -- JSON -> Dataset ------------------------------------------------------------------------


def _no_bulk(tag, vr, uri):
    return None


def json_to_dataset(obj):
    """
    A pydicom Dataset from a DICOM JSON object (a C{dict}, or JSON text).
    Elements given by C{"BulkDataURI"} are kept with an empty value: the
    bulk data is not fetched.

    @raise BadRequest: the object is not valid DICOM JSON.
    """
    if not isinstance(obj, (dict, str, bytes, bytearray)):
        raise BadRequest("DICOM JSON dataset must be an object")
    try:
        return Dataset.from_json(obj, bulk_data_uri_handler=_no_bulk)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise BadRequest(f"Malformed DICOM JSON: {type(e).__name__}")


# -- Native DICOM Model XML --------------------------------------------------------------------


def dataset_to_xml(ds, bulk_uri=None, bulk_threshold=1024):
    """
    The Native DICOM Model document (PS3.19 Annex A) of a dataset, with the
    rules of L{dataset_to_json} (same bulk data decisions and paths).

    @return: the UTF-8 document, C{bytes}, with its XML declaration.
    """
    return json_to_xml(dataset_to_json(ds, bulk_uri, bulk_threshold))


def json_to_xml(model):
    """
    The Native DICOM Model document of a DICOM JSON object (as
    L{dataset_to_json} makes them: bulk data stays C{BulkDataURI}s).

    @return: the UTF-8 document, C{bytes}, with its XML declaration.
    """
    root = ET.Element("NativeDicomModel", {"xmlns": NATIVE_DICOM_NS})
    _xml_dataset(root, model)
    body = ET.tostring(root, encoding="unicode")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode("utf-8")


def _xml_dataset(parent, model):
    for key, attribute in model.items():
        tag = int(key, 16)
        attrs = {"tag": key, "vr": attribute["vr"]}
        group, element = tag >> 16, tag & 0xFFFF
        private = group % 2 == 1
        keyword = "" if private else keyword_for_tag(tag)
        if keyword:
            attrs["keyword"] = keyword
        if private and element >= 0x1000:
            creator = model.get(f"{group:04X}{element >> 8:04X}", {}).get("Value")
            if creator and creator[0] is not None:
                attrs["privateCreator"] = _xml_text(creator[0])
        node = ET.SubElement(parent, "DicomAttribute", attrs)
        if "BulkDataURI" in attribute:
            ET.SubElement(node, "BulkData", {"uri": attribute["BulkDataURI"]})
        elif "InlineBinary" in attribute:
            ET.SubElement(node, "InlineBinary").text = attribute["InlineBinary"]
        for n, value in enumerate(attribute.get("Value", ()), 1):
            if attribute["vr"] == "SQ":
                _xml_dataset(ET.SubElement(node, "Item", {"number": str(n)}), value)
            elif attribute["vr"] == "PN":
                _xml_person_name(ET.SubElement(node, "PersonName", {"number": str(n)}), value)
            else:
                ET.SubElement(node, "Value", {"number": str(n)}).text = _xml_text(value)


#: Characters XML 1.0 cannot carry (C0 controls but tab, LF and CR; surrogates; U+FFFE/U+FFFF).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value):
    """
    The text of a value; characters XML cannot carry become U+FFFD.
    """
    if value is None:
        return None
    return _XML_INVALID.sub("\ufffd", str(value))


def _xml_person_name(node, value):
    for group in _PN_GROUPS:
        text = (value or {}).get(group)
        if not text:
            continue
        group_node = ET.SubElement(node, group)
        for name, component in zip(_PN_COMPONENTS, text.split("^")):
            if component:
                ET.SubElement(group_node, name).text = _xml_text(component)
