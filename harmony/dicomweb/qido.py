# -*- test-case-name: tests.unit.test_dicomweb_qido -*-
"""
QIDO-RS query parameters (PS3.18 section 8.3.4 and 10.6) to a C-FIND identifier.

L{parse_qido} takes the resource of a search route and its query string
(as C{urllib.parse.parse_qs(..., keep_blank_values=True)} gives it) and
returns a L{QidoQuery}: the query/retrieve level, the C-FIND identifier
(a pydicom C{Dataset} of matching keys with values and return keys with
empty values), C{limit}/C{offset}, and the ordered keywords the results
should carry.

Routes and levels::

    resource     study_uid  series_uid  level   route
    "studies"    -          -           STUDY   /studies
    "series"     -          -           SERIES  /series
    "series"     S          -           SERIES  /studies/{S}/series
    "instances"  -          -           IMAGE   /instances
    "instances"  S          -           IMAGE   /studies/{S}/instances
    "instances"  S          R           IMAGE   /studies/{S}/series/{R}/instances

The UIDs of the route become matching keys (a query parameter naming the
same attribute again is a 400).  C{"studies"} with a C{study_uid} is taken
as a search restricted to that study.

Query parameters (names are case-sensitive, as PS3.18 spells them):

  - an attribute, by keyword (C{PatientName}) or by tag as 8 hex digits
    (C{00100020}, either case), or a sequence path of those joined by dots
    (C{ReferencedSeriesSequence.SeriesInstanceUID}, C{00081115.0020000E}):
    the sequence gets one item holding the nested key (PS3.4 C.2.2.2.6);
    several paths into the same sequence share that item;
  - C{limit} (an integer >= 1), C{offset} (an integer >= 0);
  - C{fuzzymatching} (C{true} or C{false});
  - C{includefield}: repeated and/or comma-separated attributes (or
    sequence paths), or C{all}; empty items (a trailing comma) are ignored;
  - C{accept} and C{charset} (PS3.18 8.3.3.1) are accepted and ignored here:
    the endpoint's content negotiation reads them.

Anything else, and any parameter given twice (also the same attribute by
keyword and by tag), is a L{BadRequest} naming the parameter and the rule
broken, never the value (values can be patient data).

Values:

  - empty: universal matching (the attribute is only a return key);
  - C{a,b}: multiple-value matching, sent as C{a\\b} (a UID list for UI);
    not for the single-valued text VRs LT, ST, UT and UR, whose value is
    taken whole; an empty item or a backslash in a value is a 400;
  - C{*} and C{?} wildcards only for the string VRs AE, CS, LO, LT, PN,
    SH, ST, UC, UR and UT (PS3.4 C.2.2.2.4);
  - DA (C{YYYYMMDD}), TM (C{HH[MM[SS[.F{1,6}]]]}) and DT (PS3.5 6.2) single
    values or ranges (C{a-b}, C{-b}, C{a-}; a range cannot be one of
    several values); DICOM formats only, no ISO dashes or colons;
  - UI: digits and dots, at most 64 characters, no empty component and no
    leading zero in a component other than C{0};
  - numbers (IS, DS, US, UL, SS, SL, UV, SV, FL, FD) and AS are validated
    for their format; binary and sequence VRs (OB, OW, SQ, AT, UN, ...)
    cannot be matched with a value;
  - control characters are refused.

Fuzzy matching: C-FIND has no fuzzy matching, so C{fuzzymatching=true} is
approximated: every PN value without a wildcard, C{v}, is sent as C{*v*}
(a "contains" match; Orthanc also compares PN case-insensitively).  The
flag is kept in L{QidoQuery.fuzzy}.

Return keys: the matching keys, the attributes PS3.18 Table 10.6.3-3
requires for the level (L{study_level_keys}, L{series_level_keys},
L{instance_level_keys}, plus those of the levels above when the route does
not name them; the UIDs of the levels above are always returned), and the
C{includefield} attributes.  C{includefield=all} adds Harmony's documented
"all" list for the level (L{study_optional_keys},
L{series_optional_keys}, L{instance_optional_keys}, plus those of the
levels above when the route does not name them): C-FIND has no "all
attributes" return key, so the list is the commonly supported optional
keys of the Study Root information model (PS3.4 C.6.2.1).

RetrieveURL (0008,1190) is never sent to the PACS: it is in
L{QidoQuery.return_keywords} (the bridge adds it to each result) and
cannot be a matching key.  TimezoneOffsetFromUTC is not one of the
default return keys (PACS often do not support it); it is sent when a
client names it.  Non-ASCII values make the identifier carry Specific
Character Set C{ISO_IR 192} (UTF-8).

No level restriction is applied to the keys (a study attribute in a
series search with a study in the route is passed on); the PACS decides.
"""

import datetime
import re

import attr
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from harmony.errors import BadRequest

# -- attribute lists ----------------------------------------------------------

#: Study attributes PS3.18 Table 10.6.3-3 requires (RetrieveURL and
#: TimezoneOffsetFromUTC are not sent to the PACS; see the module docstring).
study_level_keys = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)

#: Series attributes PS3.18 Table 10.6.3-4 requires.
series_level_keys = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)

#: Instance attributes PS3.18 Table 10.6.3-5 requires.
instance_level_keys = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

#: What C{includefield=all} adds at the study level.
study_optional_keys = (
    "StudyDescription",
    "SOPClassesInStudy",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdditionalPatientHistory",
    "PatientComments",
)

#: What C{includefield=all} adds at the series level.
series_optional_keys = (
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "ProtocolName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
)

#: What C{includefield=all} adds at the instance level.
instance_optional_keys = (
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
)

LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

RESERVED = frozenset(("limit", "offset", "fuzzymatching", "includefield"))
IGNORED = frozenset(("accept", "charset"))

_RETRIEVE_URL = 0x00081190
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E

_WILDCARD_VRS = frozenset(("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"))
_SINGLE_VALUED_VRS = frozenset(("LT", "ST", "UT", "UR"))
_INTEGER_VRS = frozenset(("US", "UL", "SS", "SL", "UV", "SV"))
_FLOAT_VRS = frozenset(("FL", "FD"))
_UNMATCHABLE_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN", "AT"))
_MAX_VALUE = 1024

_TAG = re.compile(r"[0-9A-Fa-f]{8}\Z")
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_IS = re.compile(r"[+-]?[0-9]+\Z")
_DS = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_AS = re.compile(r"[0-9]{3}[DWMY]\Z")
_TM = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.[0-9]{1,6})?)?)?\Z")
_DT = re.compile(
    r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.[0-9]{1,6})?)?)?)?)?)?"
    r"(?:[+-]([0-9]{2})([0-9]{2}))?\Z"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@attr.s(frozen=True)
class QidoQuery:
    """
    A parsed QIDO-RS search.

    @ivar level: C{"STUDY"}, C{"SERIES"} or C{"IMAGE"}.
    @ivar identifier: the C-FIND identifier (QueryRetrieveLevel, matching
        keys with values, return keys empty).
    @ivar limit: the maximum number of results, or C{None}.
    @ivar offset: how many results to skip.
    @ivar fuzzy: whether C{fuzzymatching=true} was asked.
    @ivar include_all: whether C{includefield=all} was asked.
    @ivar return_keywords: the top-level keywords the results should carry,
        in tag order (including C{RetrieveURL}).
    """

    level = attr.ib()
    identifier = attr.ib(repr=False, eq=False)
    limit = attr.ib(default=None)
    offset = attr.ib(default=0)
    fuzzy = attr.ib(default=False)
    include_all = attr.ib(default=False)
    return_keywords = attr.ib(default=(), converter=tuple)


def parse_qido(resource, query, study_uid=None, series_uid=None):
    """
    The L{QidoQuery} of a QIDO-RS search.

    @param resource: C{"studies"}, C{"series"} or C{"instances"}.
    @param query: the query string as C{{name: [value, ...]}}.
    @param study_uid: the Study Instance UID of the route, or C{None}.
    @param series_uid: the Series Instance UID of the route, or C{None}.
    @rtype: L{QidoQuery}
    @raise BadRequest: for a parameter PS3.18 does not allow, a value of
        the wrong form, a UID of the route that is not a UID.
    @raise ValueError: for a resource that is not one of the three, or a
        series UID without a study UID (a routing error, not a client's).
    """
    if resource not in LEVELS:
        raise ValueError(f"unknown QIDO-RS resource {resource!r}")
    if series_uid is not None and (study_uid is None or resource != "instances"):
        raise ValueError("a series UID needs a study UID and the instances resource")
    level = LEVELS[resource]

    limit = offset = None
    fuzzy = None
    includes = []
    include_all = False
    matches = []
    seen = {}
    for name, values in query.items():
        if name in IGNORED:
            continue
        if name == "includefield":
            for value in values:
                for item in value.split(","):
                    if item == "all":
                        include_all = True
                    elif item:
                        includes.append(_path(item, "includefield"))
            continue
        if len(values) != 1:
            raise BadRequest(f"Query parameter {_name(name)} is given more than once")
        value = values[0]
        if name == "limit":
            limit = _integer(name, value, 1)
        elif name == "offset":
            offset = _integer(name, value, 0)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadRequest("Query parameter fuzzymatching must be true or false")
            fuzzy = value == "true"
        else:
            path = _path(name, "query parameter")
            key = tuple(tag for tag, _ in path)
            if key in seen:
                raise BadRequest(f"Query parameter {_name(name)} names the same attribute as {_name(seen[key])}")
            seen[key] = name
            if key == (_RETRIEVE_URL,):
                raise BadRequest("RetrieveURL cannot be a matching key")
            matches.append((name, path, value))

    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for uid, tag, keyword in ((study_uid, _STUDY_UID, "StudyInstanceUID"), (series_uid, _SERIES_UID,
                                                                           "SeriesInstanceUID")):
        if uid is None:
            continue
        if (tag,) in seen:
            raise BadRequest(f"Query parameter {_name(seen[(tag,)])} repeats the {keyword} of the path")
        if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
            raise BadRequest(f"The {keyword} in the path is not a valid UID")
        identifier.add_new(tag, "UI", uid)

    non_ascii = False
    for name, path, value in matches:
        vr = path[-1][1]
        matched = _value(name, vr, value, bool(fuzzy))
        non_ascii = non_ascii or (isinstance(matched, str) and not matched.isascii())
        _put(identifier, path, matched)

    keywords = list(_level_keys(level, study_uid, series_uid, include_all))
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        _put(identifier, ((tag, _vr(tag)),), None)
    for path in includes:
        if path[0][0] != _RETRIEVE_URL:
            _put(identifier, path, None)
    if non_ascii:
        identifier.SpecificCharacterSet = "ISO_IR 192"

    tags = {elem.tag for elem in identifier if elem.tag not in (0x00080005, 0x00080052)}
    tags.add(_RETRIEVE_URL)
    return_keywords = tuple(keyword_for_tag(tag) or f"{tag:08X}" for tag in sorted(tags))
    return QidoQuery(
        level=level,
        identifier=identifier,
        limit=limit,
        offset=offset or 0,
        fuzzy=bool(fuzzy),
        include_all=include_all,
        return_keywords=return_keywords,
    )


def _level_keys(level, study_uid, series_uid, include_all):
    """
    The default return keywords of a level, with the levels above that the
    route does not name.
    """
    groups = []
    if level == "STUDY" or study_uid is None:
        groups.append((study_level_keys, study_optional_keys))
    if level == "SERIES" or (level == "IMAGE" and series_uid is None):
        groups.append((series_level_keys, series_optional_keys))
    if level == "IMAGE":
        groups.append((instance_level_keys, instance_optional_keys))
    keys = ["StudyInstanceUID"]
    if level == "IMAGE":
        keys.append("SeriesInstanceUID")
    for required, optional in groups:
        keys.extend(required)
        if include_all:
            keys.extend(optional)
    return dict.fromkeys(keys)


def _name(name):
    """
    A parameter name as error messages show it (quoted, at most 64
    characters, no control characters).
    """
    name = _CONTROL.sub("?", name)
    if len(name) > 64:
        name = name[:61] + "..."
    return repr(name)


def _vr(tag):
    """
    The dictionary VR of a tag (the first of an ambiguous C{"US or SS"}).
    """
    return dictionary_VR(tag).split(" or ")[0]


def _tag(component):
    """
    The tag of a keyword or 8-hex-digit tag, or C{None}.
    """
    if _TAG.match(component):
        tag = int(component, 16)
    else:
        tag = tag_for_keyword(component)
        if tag is None:
            return None
    try:
        _vr(tag)
    except KeyError:
        return None
    return tag


def _path(name, what):
    """
    The C{((tag, vr), ...)} of an attribute or a dotted sequence path.

    @raise BadRequest: for an unknown attribute, or a path through an
        attribute that is not a sequence.
    """
    path = []
    components = name.split(".")
    for i, component in enumerate(components):
        tag = _tag(component)
        if tag is None:
            if len(components) == 1 and what == "query parameter":
                raise BadRequest(f"Unknown query parameter {_name(name)}: not a DICOM keyword or tag, nor a QIDO-RS "
                                 "parameter")
            raise BadRequest(f"Unknown DICOM keyword or tag in {what} {_name(name)}")
        vr = _vr(tag)
        if i < len(components) - 1 and vr != "SQ":
            raise BadRequest(f"In {what} {_name(name)}, {keyword_for_tag(tag) or component} is not a sequence")
        path.append((tag, vr))
    return tuple(path)


def _put(identifier, path, value):
    """
    Put C{value} (C{None}: an empty return key) at C{path} in the
    identifier; sequences along the path get (or keep) one item.  An
    existing element keeps its value when C{value} is C{None}.
    """
    ds = identifier
    for tag, vr in path[:-1]:
        elem = ds.get(tag)
        if elem is None or elem.VR != "SQ":
            ds.add_new(tag, "SQ", Sequence([Dataset()]))
            elem = ds[tag]
        elif not elem.value:
            elem.value = Sequence([Dataset()])
        ds = elem.value[0]
    tag, vr = path[-1]
    if value is None:
        if tag not in ds:
            # An empty return key has nothing to validate (and pydicom's
            # validation was most of the cost of a query).
            ds.add(DataElement(tag, vr, empty_value_for_VR(vr), validation_mode=config.IGNORE))
    else:
        ds.add_new(tag, vr, value)


def _integer(name, value, minimum):
    """
    @raise BadRequest: when C{value} is not a decimal integer >= C{minimum}.
    """
    if not _DIGITS.match(value) or int(value) < minimum:
        raise BadRequest(f"Query parameter {name} must be an integer >= {minimum}")
    return int(value)


def _value(name, vr, value, fuzzy):
    """
    The identifier value of a matching parameter: C{None} (universal
    matching), a string (several values joined by backslashes) or, for
    binary numbers, an int/float or a list of them.

    @raise BadRequest: when the value does not fit the VR's matching rules.
    """
    label = _name(name)
    if value == "":
        return None
    if len(value) > _MAX_VALUE:
        raise BadRequest(f"Query parameter {label} is too long")
    if _CONTROL.search(value):
        raise BadRequest(f"Query parameter {label} contains control characters")
    if vr in _UNMATCHABLE_VRS:
        raise BadRequest(f"Query parameter {label} cannot be matched with a value (VR {vr}); leave it empty")
    if vr in _SINGLE_VALUED_VRS:
        return value
    items = value.split(",")
    if any(item == "" for item in items):
        raise BadRequest(f"Query parameter {label} has an empty item in its list of values")
    if any("\\" in item for item in items):
        raise BadRequest(f"Query parameter {label} contains a backslash")
    if vr in ("DA", "TM", "DT"):
        bounds = [_check_temporal(label, vr, item) for item in items]
        if len(items) > 1 and any(len(pair) > 1 for pair in bounds):
            raise BadRequest(f"Query parameter {label}: a range cannot be one of several values")
        return "\\".join(items)
    if vr == "UI":
        for item in items:
            if len(item) > 64 or not _UID.match(item):
                raise BadRequest(f"Query parameter {label} must be a UID or a comma-separated list of UIDs")
        return "\\".join(items)
    if vr in _WILDCARD_VRS:
        if fuzzy and vr == "PN":
            items = [item if ("*" in item or "?" in item) else f"*{item}*" for item in items]
        return "\\".join(items)
    if any("*" in item or "?" in item for item in items):
        raise BadRequest(f"Query parameter {label} does not allow wildcards (VR {vr})")
    if vr == "IS":
        if not all(_IS.match(item) for item in items):
            raise BadRequest(f"Query parameter {label} must be an integer (VR IS)")
        return "\\".join(items)
    if vr == "DS":
        if not all(_DS.match(item) and len(item) <= 16 for item in items):
            raise BadRequest(f"Query parameter {label} must be a decimal number (VR DS)")
        return "\\".join(items)
    if vr == "AS":
        if not all(_AS.match(item) for item in items):
            raise BadRequest(f"Query parameter {label} must be an age like 045Y (VR AS)")
        return "\\".join(items)
    if vr in _INTEGER_VRS:
        if not all(_IS.match(item) for item in items):
            raise BadRequest(f"Query parameter {label} must be an integer (VR {vr})")
        numbers = [int(item) for item in items]
        return numbers[0] if len(numbers) == 1 else numbers
    if vr in _FLOAT_VRS:
        try:
            numbers = [float(item) for item in items]
        except ValueError:
            numbers = None
        if numbers is None or not all(_DS.match(item) for item in items):
            raise BadRequest(f"Query parameter {label} must be a number (VR {vr})")
        return numbers[0] if len(numbers) == 1 else numbers
    raise BadRequest(f"Query parameter {label} cannot be matched with a value (VR {vr}); leave it empty")


def _check_temporal(label, vr, item):
    """
    @return: the bounds of C{item}: C{[value]} or C{[begin, end]} (either
        possibly empty).
    @raise BadRequest: unless C{item} is a DA, TM or DT value or range.
    """
    if vr == "DT":
        bounds = _split_dt_range(item)
    elif "-" in item:
        bounds = item.split("-")
        if len(bounds) != 2 or bounds == ["", ""]:
            bounds = None
    else:
        bounds = [item]
    valid = {"DA": _valid_da, "TM": _valid_tm, "DT": _valid_dt}[vr]
    if bounds is None or not all(bound == "" or valid(bound) for bound in bounds):
        form = {
            "DA": "a date YYYYMMDD",
            "TM": "a time HH[MM[SS[.FFFFFF]]]",
            "DT": "a date-time YYYY[MM[DD[HH[MM[SS[.FFFFFF]]]]]][&ZZXX]",
        }[vr]
        raise BadRequest(f"Query parameter {label} must be {form} or a range of those (a-b, -b, a-)")
    return bounds


def _split_dt_range(item):
    """
    A DT value or range split into its bounds, or C{None}.  A DT may hold
    a C{-ZZXX} offset: a whole value that is a valid DT is one value,
    otherwise the first dash that leaves two valid (or empty) bounds is
    the range's.
    """
    if _valid_dt(item):
        return [item]
    for i, char in enumerate(item):
        if char != "-":
            continue
        left, right = item[:i], item[i + 1:]
        if (left == "" or _valid_dt(left)) and (right == "" or _valid_dt(right)) and (left or right):
            return [left, right]
    return None


def _valid_da(text):
    if len(text) != 8 or not _DIGITS.match(text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _valid_tm(text):
    match = _TM.match(text)
    if not match:
        return False
    hours, minutes, seconds = match.groups()
    return int(hours) < 24 and (minutes is None or int(minutes) < 60) and (seconds is None or int(seconds) <= 60)


def _valid_dt(text):
    match = _DT.match(text)
    if not match:
        return False
    year, month, day, hours, minutes, seconds, zone_hours, zone_minutes = match.groups()
    if month is not None and not 1 <= int(month) <= 12:
        return False
    if day is not None:
        try:
            datetime.date(int(year), int(month), int(day))
        except ValueError:
            return False
    if hours is not None and int(hours) >= 24:
        return False
    if minutes is not None and int(minutes) >= 60:
        return False
    if seconds is not None and int(seconds) > 60:
        return False
    if zone_hours is not None and (int(zone_hours) > 14 or int(zone_minutes) >= 60):
        return False
    return True
