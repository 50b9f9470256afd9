# -*- test-case-name: tests.unit.test_fhir_imaging -*-
"""
FHIR search parameters of the imaging facade -> C-FIND identifiers and
exact post-filters.

Each search parameter becomes a L{Criterion}: the C-FIND matching keys it
adds (one dict per alternative: FHIR's comma is an OR, and what one C-FIND
cannot ask becomes several C-FINDs) and an exact test of each match.  The
PACS's matching is only a pre-filter: wildcards, case, date precision and
time zones are settled here, so the answer does not depend on how the PACS
matches.  Values are passed to the PACS literally: the DICOM wildcards
C{*} and C{?} and the value separator C{\\} in a FHIR value are sent as
C{?} (any one character) and the match is then compared exactly.

Every error is a L{BadRequest} naming the parameter (values are not echoed:
they may identify a patient).  The mapping itself is documented in
L{harmony.middleware.fhir_imaging}.
"""

import base64
import binascii
import itertools
import re
import unicodedata
from datetime import date, datetime, timedelta

import attr

from harmony.errors import BadRequest

#: DICOM UIDs as FHIR identifiers name them.
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: The DICOM Controlled Terminology (modality codes).
DCM = "http://dicom.nema.org/resources/ontology/DCM"

#: A UID-shaped value (an identifier that is a StudyInstanceUID).
UID = re.compile(r"[0-9]+(\.[0-9]+)+\Z")
#: A FHIR resource id.
FHIR_ID = re.compile(r"[A-Za-z0-9\-\.]{1,64}\Z")
#: A DICOM modality code (CS).
MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}\Z")
#: Prefix of the FHIR ids of patients whose PatientID is not one.
ENCODED_ID_PREFIX = "pid."

#: Longest values of the DICOM attributes searched (longer ones match nothing).
MAX_LENGTHS = {"PatientID": 64, "AccessionNumber": 16, "StudyInstanceUID": 64}

#: At most this many C-FINDs answer one search (alternatives multiply).
MAX_QUERIES = 32

#: FHIR gender -> DICOM PatientSex.
SEX_FOR_GENDER = {"male": "M", "female": "F", "other": "O", "unknown": ""}

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

_DATE = re.compile(
    r"(?P<prefix>[a-z]{2})?(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?:\.(?P<f>[0-9]{1,9}))?)?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?\Z"
)
_OFFSET = re.compile(r"([+-])([0-9]{2}):?([0-9]{2})\Z")
_EPSILON = timedelta(microseconds=1)


# -- patient ids -------------------------------------------------------------------------


def patient_fhir_id(patient_id):
    """
    The FHIR id of the patient whose DICOM PatientID is C{patient_id}: the
    PatientID itself when it is a valid FHIR id (C{[A-Za-z0-9-.]{1,64}})
    not starting with C{pid.}, else C{pid.} and the lowercase unpadded
    base32 of its UTF-8 bytes; C{None} when that is longer than 64
    characters (such patients are referred to by identifier).
    """
    if FHIR_ID.match(patient_id) and not patient_id.startswith(ENCODED_ID_PREFIX):
        return patient_id
    encoded = ENCODED_ID_PREFIX + base64.b32encode(patient_id.encode("utf-8")).decode("ascii").rstrip("=").lower()
    return encoded if len(encoded) <= 64 else None


def patient_id_from_fhir(fhir_id):
    """
    The DICOM PatientID of a Patient FHIR id (the inverse of
    L{patient_fhir_id}), or C{None} when no patient can have that id (an
    encoded id that does not decode, or that is not the canonical one).
    """
    if not fhir_id.startswith(ENCODED_ID_PREFIX):
        return fhir_id if FHIR_ID.match(fhir_id) else None
    text = fhir_id[len(ENCODED_ID_PREFIX):]
    if not text or text != text.lower():
        return None
    try:
        data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
        patient_id = data.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if not patient_id or patient_fhir_id(patient_id) != fhir_id:
        return None
    return patient_id


# -- dates ---------------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class DateValue:
    """
    One value of a date search parameter: C{prefix} and the range
    C{[low, high)} its precision covers (naive datetimes), in the time zone
    C{offset} (a C{timedelta}) when the value has one.
    """

    prefix = attr.ib()
    low = attr.ib()
    high = attr.ib()
    offset = attr.ib(default=None)


def _add_months(day, months):
    month = day.month - 1 + months
    year = day.year + month // 12
    return day.replace(year=year, month=month % 12 + 1, day=1)


def parse_offset(text):
    """
    A time zone offset (C{Z}, C{+HH:MM}, C{+HHMM}) as a C{timedelta}, or
    C{None} when C{text} is not one (at most 14 hours each way).
    """
    text = (text or "").strip()
    if text == "Z":
        return timedelta(0)
    m = _OFFSET.match(text)
    if m is None:
        return None
    hours, minutes = int(m.group(2)), int(m.group(3))
    if minutes >= 60 or hours * 60 + minutes > 14 * 60:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return -delta if m.group(1) == "-" else delta


def parse_date(name, text, times=True):
    """
    A FHIR date search value (C{[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.f]][tz]]]]}).

    @param times: whether values with a time are allowed (C{date}
        parameters such as C{birthdate} take days only).
    @raise BadRequest: a malformed value or an unsupported prefix.
    """
    # "+" in an unencoded query string arrives as a space.
    text = re.sub(r" ([0-9]{2}:[0-9]{2})\Z", r"+\1", text.strip())
    m = _DATE.match(text)
    precisions = "YYYY, YYYY-MM, YYYY-MM-DD" + (" or YYYY-MM-DDThh:mm[:ss][zone]" if times else "")
    if m is None:
        raise BadRequest(f"Search parameter {name}: expected [prefix]{precisions}")
    prefix = m.group("prefix") or "eq"
    if prefix not in PREFIXES:
        raise BadRequest(f"Search parameter {name}: unknown prefix (use eq, gt, ge, lt, le, sa or eb)")
    if prefix in ("ne", "ap"):
        raise BadRequest(
            f"Search parameter {name}: prefix {prefix} is not supported (use eq, gt, ge, lt, le, sa or eb)"
        )
    if m.group("H") is not None and not times:
        raise BadRequest(f"Search parameter {name}: expected a date ({precisions}), not a time")
    try:
        year = int(m.group("y"))
        if m.group("m") is None:
            low = datetime(year, 1, 1)
            high = _add_months(low, 12)
        elif m.group("d") is None:
            low = datetime(year, int(m.group("m")), 1)
            high = _add_months(low, 1)
        elif m.group("H") is None:
            low = datetime(year, int(m.group("m")), int(m.group("d")))
            high = low + timedelta(days=1)
        else:
            low = datetime(year, int(m.group("m")), int(m.group("d")), int(m.group("H")), int(m.group("M")))
            if m.group("S") is None:
                high = low + timedelta(minutes=1)
            else:
                low = low.replace(second=int(m.group("S")))
                fraction = m.group("f")
                if fraction is None:
                    high = low + timedelta(seconds=1)
                else:
                    digits = fraction[:6]
                    low = low.replace(microsecond=int(digits.ljust(6, "0")))
                    high = low + timedelta(microseconds=10 ** (6 - len(digits)))
    except (ValueError, OverflowError):
        raise BadRequest(f"Search parameter {name}: not a valid date") from None
    offset = None
    if m.group("tz") is not None:
        offset = parse_offset(m.group("tz"))
        if offset is None:
            raise BadRequest(f"Search parameter {name}: not a valid time zone offset")
    return DateValue(prefix, low, high, offset)


def _holds(prefix, pl, ph, tl, th):
    """
    FHIR's prefix semantics (R4 3.1.1.4.1.1) between the search range
    C{[pl, ph)} and the target range C{[tl, th)}.
    """
    contains = pl <= tl and th <= ph
    if prefix == "eq":
        return contains
    if prefix == "gt":
        return th > ph
    if prefix == "lt":
        return tl < pl
    if prefix == "ge":
        return th > ph or contains
    if prefix == "le":
        return tl < pl or contains
    if prefix == "sa":
        return tl >= ph
    return th <= pl  # eb


def dates_hold(values, target, target_offset=None):
    """
    Whether the target range C{(low, high)} (naive, in the target's local
    time) satisfies every value of C{values} (ANDed).  A value with a time
    zone is moved into the target's when the target's is known (else its
    clock time is compared as written); values without one compare as
    written.  No target (C{None}): no value holds.
    """
    if target is None:
        return False
    tl, th = target
    for v in values:
        pl, ph = v.low, v.high
        if v.offset is not None and target_offset is not None:
            shift = target_offset - v.offset
            pl, ph = pl + shift, ph + shift
        if not _holds(v.prefix, pl, ph, tl, th):
            return False
    return True


def _day(moment):
    return moment.date() if moment is not None else None


def dicom_date_range(values):
    """
    The DICOM date range (C{YYYYMMDD-YYYYMMDD}, open-ended C{-YYYYMMDD} or
    C{YYYYMMDD-}, or one date) that contains every date the C{values}
    (ANDed) can match: the C-FIND's pre-filter.  C{""} when unbounded;
    C{None} when no date can match.
    """
    lows, highs = [], []
    for v in values:
        pl, ph, prefix = v.low, v.high, v.prefix
        lo = hi = None
        if prefix in ("eq", "ge"):
            lo = pl
        elif prefix in ("gt", "sa"):
            lo = ph
        if prefix == "eq" or prefix == "le":
            hi = ph - _EPSILON
        elif prefix in ("lt", "eb"):
            hi = pl - _EPSILON
        lo, hi = _day(lo), _day(hi)
        if v.offset is not None:
            # The study's own time zone may differ by up to 26 hours.
            lo = _shift_day(lo, -2)
            hi = _shift_day(hi, 2)
        if lo is not None:
            lows.append(lo)
        if hi is not None:
            highs.append(hi)
    lo = max(lows) if lows else None
    hi = min(highs) if highs else None
    if lo is not None and hi is not None:
        if lo > hi:
            return None
        if lo == hi:
            return lo.strftime("%Y%m%d")
    if lo is None and hi is None:
        return ""
    return (lo.strftime("%Y%m%d") if lo else "") + "-" + (hi.strftime("%Y%m%d") if hi else "")


def _shift_day(day, days):
    if day is None:
        return None
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return None


def dicom_date(text):
    """
    A DICOM DA value (C{YYYYMMDD}; the old C{YYYY.MM.DD} too) as a
    C{date}, or C{None}.
    """
    text = (text or "").strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


_TIME = re.compile(r"([0-9]{2})([0-9]{2})?([0-9]{2})?(?:\.([0-9]{1,6}))?\Z")


def dicom_time(text):
    """
    A DICOM TM value (C{HH[MM[SS[.F{1,6}]]]}; the old C{HH:MM:SS} too) as
    C{(time start, precision, fraction digits)}, or C{None}.
    """
    text = (text or "").strip().replace(":", "")
    m = _TIME.match(text)
    if m is None:
        return None
    hours, minutes, seconds, fraction = m.groups()
    try:
        start = timedelta(hours=int(hours), minutes=int(minutes or 0), seconds=int(seconds or 0))
    except ValueError:
        return None
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    if fraction:
        start += timedelta(microseconds=int(fraction.ljust(6, "0")))
        precision = timedelta(microseconds=10 ** (6 - len(fraction)))
    elif seconds is not None:
        precision = timedelta(seconds=1)
    elif minutes is not None:
        precision = timedelta(minutes=1)
    else:
        precision = timedelta(hours=1)
    return start, precision, fraction or ""


def target_range(da, tm=None):
    """
    The range C{(low, high)} a DICOM date (and time) covers: the day, or
    the time's precision within it; C{None} without a valid date.
    """
    day = dicom_date(da)
    if day is None:
        return None
    low = datetime(day.year, day.month, day.day)
    parsed = dicom_time(tm) if tm else None
    if parsed is None:
        return low, low + timedelta(days=1)
    start, precision, _ = parsed
    return low + start, low + start + precision


# -- tokens and strings ---------------------------------------------------------------------


def _split(text, separator):
    """
    C{text} split at each C{separator} not escaped with a backslash (the
    escapes are kept: see L{_unescape}).
    """
    parts, start, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == separator:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text):
    return re.sub(r"\\(.)", r"\1", text)


def split_values(text):
    """
    The comma-separated alternatives of a search value (FHIR's OR), with
    C{\\,} C{\\|} C{\\$} C{\\\\} escapes kept for L{token}.
    """
    return _split(text, ",")


def token(name, text):
    """
    C{(system, code)} of a token value: C{code} -> C{(None, code)},
    C{|code} -> C{("", code)}, C{system|code}.

    @raise BadRequest: no code, or more than one C{|}.
    """
    parts = _split(text, "|")
    if len(parts) > 2:
        raise BadRequest(f"Search parameter {name}: expected [system|]code")
    if len(parts) == 1:
        system, code = None, _unescape(parts[0])
    else:
        system, code = _unescape(parts[0]), _unescape(parts[1])
    if not code:
        raise BadRequest(f"Search parameter {name}: a code is needed (system| alone is not supported)")
    return system, code


def dicom_literal(value, vr=None):
    """
    C{value} as a DICOM matching value that matches it literally or more
    widely: the wildcards C{*} and C{?} and the separator C{\\} (and in a
    person name, the C{^} and C{=} delimiters) become C{?}.
    """
    specials = "*?\\^=" if vr == "PN" else "*?\\"
    return "".join("?" if c in specials else c for c in value)


def fold(text):
    """
    C{text} for case- and accent-insensitive comparison (FHIR string
    search).
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def settle(ds):
    """
    Convert every element of a received dataset now, without pydicom's
    value validation (its warnings would write the values, patient data,
    to the logs); elements that do not convert are dropped.
    """
    from pydicom import config

    with config.disable_value_validation():
        for tag in list(ds.keys()):
            try:
                ds[tag]
            except Exception:
                del ds[tag]
    return ds


def text_value(ds, keyword):
    """
    The value of C{keyword} in C{ds} as stripped text, or C{None} when
    absent, empty or unreadable.
    """
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join("" if v is None else str(v) for v in value)
    elif isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip().strip("\x00").strip()
    return text or None


def multi_values(ds, keyword):
    """
    The values of a multi-valued attribute as stripped strings (empty
    ones dropped).
    """
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = str(value).split("\\")
    return [str(v).strip() for v in value if str(v).strip()]


# -- criteria ---------------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class Criterion:
    """
    What one search parameter asks.

    @ivar alternatives: C-FIND matching keys, one dict (keyword -> DICOM
        value; a tuple for a value list) per alternative (OR); C{({},)}
        when the parameter adds no key; C{()} when nothing can match.
    @ivar accepts: C{accepts(match dataset, context)} -> bool, the exact
        test (see L{Search.accepts}).
    """

    alternatives = attr.ib()
    accepts = attr.ib()


@attr.s(slots=True)
class Search:
    """
    A parsed search.

    @ivar resource_type: C{"ImagingStudy"} or C{"Patient"}.
    @ivar criteria: L{Criterion}s (ANDed).
    @ivar count: entries per page (0: the total only).
    @ivar offset: entries skipped.
    @ivar descending: C{-started} (ImagingStudy).
    @ivar link_params: C{(name, value)} pairs of the search as received
        (C{_count} and C{_offset} aside), for the Bundle's links.
    @ivar pretty: C{_pretty=true}.
    """

    resource_type = attr.ib()
    criteria = attr.ib(factory=list)
    count = attr.ib(default=20)
    offset = attr.ib(default=0)
    descending = attr.ib(default=True)
    link_params = attr.ib(factory=list)
    pretty = attr.ib(default=False)

    def matching_keys(self):
        """
        The C-FINDs to ask: one dict of matching keys per combination of
        the criteria's alternatives (contradictory combinations left out);
        C{[]} when nothing can match.

        @raise BadRequest: more than L{MAX_QUERIES} C-FINDs would be needed.
        """
        choices = [c.alternatives for c in self.criteria]
        if any(not alternatives for alternatives in choices):
            return []
        total = 1
        for alternatives in choices:
            total *= len(alternatives)
        if total > MAX_QUERIES:
            raise BadRequest(f"The search needs more than {MAX_QUERIES} queries to the PACS; use fewer alternatives")
        queries = []
        for combination in itertools.product(*choices):
            merged = _merge(combination)
            if merged is not None and merged not in queries:
                queries.append(merged)
        return queries

    def accepts(self, match, context):
        """
        Whether the C-FIND match C{match} (a dataset) passes every
        criterion's exact test; C{context} is what the tests may need (the
        match's time zone offset).
        """
        return all(c.accepts(match, context) for c in self.criteria)


def _merge(dicts):
    """
    The union of the matching keys of C{dicts}, or C{None} when two ask
    different values of one attribute (UID lists are intersected).
    """
    merged = {}
    for keys in dicts:
        for keyword, value in keys.items():
            if keyword not in merged:
                merged[keyword] = value
                continue
            current = merged[keyword]
            if current == value:
                continue
            if isinstance(current, tuple) and isinstance(value, tuple):
                both = tuple(v for v in current if v in value)
                if not both:
                    return None
                merged[keyword] = both
                continue
            return None
    return merged


def _fits(keyword, value):
    return len(value) <= MAX_LENGTHS.get(keyword, 64)


def _exact(keyword, wanted):
    wanted = frozenset(wanted)

    def accepts(match, context):
        return text_value(match, keyword) in wanted

    return accepts


def _no_match():
    return Criterion((), lambda match, context: False)


def _values_criterion(keyword, values):
    """
    C{keyword} equal to one of C{values}: one C-FIND per value (DICOM
    cannot list-match other than UIDs).
    """
    usable = [v for v in dict.fromkeys(values) if _fits(keyword, v)]
    if not usable:
        return _no_match()
    return Criterion(tuple({keyword: dicom_literal(v)} for v in usable), _exact(keyword, usable))


def _uids_criterion(uids):
    uids = tuple(dict.fromkeys(u for u in uids if len(u) <= 64 and UID.match(u)))
    if not uids:
        return _no_match()
    return Criterion(({"StudyInstanceUID": uids},), _exact("StudyInstanceUID", uids))


# -- parameters ------------------------------------------------------------------------------


#: Result parameters every search takes (beside the resource's own).
_RESULT_PARAMS = ("_count", "_offset", "_format", "_pretty", "_summary", "_total")

STUDY_PARAMS = ("patient", "subject", "identifier", "started", "modality", "_id", "_sort") + _RESULT_PARAMS
PATIENT_PARAMS = ("identifier", "_id", "name", "birthdate", "gender") + _RESULT_PARAMS

#: Parameters that may be repeated (ANDed).
_REPEATABLE = frozenset({"started", "birthdate"})

#: Modifiers by parameter.
_MODIFIERS = {
    "patient": ("identifier", "Patient"),
    "subject": ("identifier", "Patient"),
    "name": ("exact", "contains"),
}


def _integer(name, text):
    text = text.strip()
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise BadRequest(f"Search parameter {name} must be a whole number (0 or more)")
    return int(text)


def _pairs(params):
    """
    C{(name, [values])} of a parameter dict whose values are strings or
    lists of strings.
    """
    for name, values in params.items():
        if isinstance(values, str):
            values = [values]
        yield name, [str(v) for v in values]


class _Parser:
    def __init__(self, resource_type, options, supported):
        self.search = Search(resource_type)
        self.options = options
        self.supported = supported
        self.count = None
        self.summary_count = False
        self.dates = {}

    def parse(self, params):
        search = self.search
        for name, values in _pairs(params):
            base, _, modifier = name.partition(":")
            if base not in self.supported:
                raise BadRequest(
                    f"Unknown or unsupported search parameter {name} for {search.resource_type} "
                    f"(supported: {', '.join(self.supported)})"
                )
            if modifier and modifier not in _MODIFIERS.get(base, ()):
                raise BadRequest(f"Search parameter {base} does not support the modifier :{modifier}")
            if len(values) > 1 and base not in _REPEATABLE:
                raise BadRequest(f"Search parameter {name} is given more than once (use commas for OR)")
            for value in values:
                if base not in ("_format", "_pretty") and not value.strip():
                    raise BadRequest(f"Search parameter {name} has no value")
                if base not in ("_count", "_offset"):
                    search.link_params.append((name, value))
                self.one(base, modifier, value)
        for base, values in self.dates.items():
            self.date_criterion(base, values)
        options = self.options
        count = options.default_count if self.count is None else self.count
        search.count = 0 if self.summary_count else min(count, options.max_count)
        return search

    def one(self, base, modifier, value):
        search = self.search
        if base == "_count":
            self.count = _integer(base, value)
        elif base == "_offset":
            search.offset = _integer(base, value)
        elif base == "_format":
            pass  # the fhir endpoint turned it into Accept
        elif base == "_pretty":
            if value not in ("true", "false", ""):
                raise BadRequest("Search parameter _pretty must be true or false")
            search.pretty = value == "true"
        elif base == "_summary":
            if value == "count":
                self.summary_count = True
            elif value != "false":
                raise BadRequest("Search parameter _summary: only count and false are supported")
        elif base == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise BadRequest("Search parameter _total must be none, estimate or accurate")
        elif base == "_sort":
            if value == "started":
                search.descending = False
            elif value == "-started":
                search.descending = True
            else:
                raise BadRequest("Search parameter _sort: only started and -started are supported")
        elif base in ("started", "birthdate"):
            self.dates.setdefault(base, []).append(parse_date(base, value, times=base == "started"))
        else:
            handler = getattr(self, "param_" + base.lstrip("_"))
            search.criteria.append(handler(base, modifier, value))

    def date_criterion(self, base, values):
        keyword = "StudyDate" if base == "started" else "PatientBirthDate"
        dicom_range = dicom_date_range(values)
        if dicom_range is None:
            self.search.criteria.append(_no_match())
            return
        alternatives = ({keyword: dicom_range},) if dicom_range else ({},)
        if base == "started":
            def accepts(match, context):
                target = target_range(text_value(match, "StudyDate"), text_value(match, "StudyTime"))
                return dates_hold(values, target, context.get("offset"))
        else:
            def accepts(match, context):
                return dates_hold(values, target_range(text_value(match, "PatientBirthDate")))
        self.search.criteria.append(Criterion(alternatives, accepts))

    # -- identifiers shared by both resources --

    def _patient_ids_from_identifiers(self, name, value):
        """
        PatientIDs of an C{identifier} token list: the system must be
        C{patient_identifier_system} when that is set (else it is ignored).
        """
        wanted = self.options.patient_identifier_system
        ids = []
        for alternative in split_values(value):
            system, code = token(name, alternative)
            if wanted and system is not None and system != wanted:
                continue
            ids.append(code)
        return ids

    def _patient_criterion(self, ids):
        return _values_criterion("PatientID", ids)

    def _references(self, name, value):
        """
        PatientIDs named by a reference search value (C{Patient/<id>},
        C{<id>}, or a URL ending in C{Patient/<id>}).
        """
        ids = []
        for alternative in split_values(value):
            text = _unescape(alternative).strip()
            if "/" in text:
                rtype, fid = text.rsplit("/", 2)[-2:]
                if rtype != "Patient":
                    raise BadRequest(f"Search parameter {name}: only Patient references are supported")
            else:
                fid = text
            if not FHIR_ID.match(fid):
                raise BadRequest(f"Search parameter {name}: not a valid FHIR id")
            patient_id = patient_id_from_fhir(fid)
            if patient_id is not None:
                ids.append(patient_id)
        return ids

    def param_patient(self, name, modifier, value):
        if modifier == "identifier":
            return self._patient_criterion(self._patient_ids_from_identifiers(name, value))
        if modifier == "Patient":
            value = ",".join("Patient/" + v for v in split_values(value))
        return self._patient_criterion(self._references(name, value))

    param_subject = param_patient


class _StudyParser(_Parser):
    def param_identifier(self, name, modifier, value):
        uids, accessions = [], []
        for alternative in split_values(value):
            system, code = token(name, alternative)
            if system == DICOM_UID_SYSTEM:
                uid = code[len("urn:oid:"):] if code.startswith("urn:oid:") else code
                if len(uid) > 64 or not UID.match(uid):
                    raise BadRequest(f"Search parameter {name}: a {DICOM_UID_SYSTEM} value must be a DICOM UID")
                uids.append(uid)
            elif code.startswith("urn:oid:") and UID.match(code[len("urn:oid:"):]):
                uids.append(code[len("urn:oid:"):])
            elif len(code) <= 64 and UID.match(code):
                uids.append(code)
            else:
                accessions.append(code)
        alternatives = []
        if uids:
            alternatives.extend(_uids_criterion(uids).alternatives)
        if accessions:
            alternatives.extend(_values_criterion("AccessionNumber", accessions).alternatives)
        uid_set, accession_set = frozenset(uids), frozenset(accessions)

        def accepts(match, context):
            return (
                text_value(match, "StudyInstanceUID") in uid_set
                or text_value(match, "AccessionNumber") in accession_set
            )

        return Criterion(tuple(alternatives), accepts)

    def param_id(self, name, modifier, value):
        ids = [_unescape(v).strip() for v in split_values(value)]
        for fid in ids:
            if not FHIR_ID.match(fid):
                raise BadRequest(f"Search parameter {name}: not a valid FHIR id")
        return _uids_criterion(ids)

    def param_modality(self, name, modifier, value):
        codes = []
        for alternative in split_values(value):
            system, code = token(name, alternative)
            if system is not None and system != DCM:
                raise BadRequest(f"Search parameter {name}: the system must be {DCM} (or none)")
            if not MODALITY.match(code):
                raise BadRequest(f"Search parameter {name}: not a DICOM modality code (such as CT or MR)")
            codes.append(code)
        codes = tuple(dict.fromkeys(codes))
        wanted = frozenset(codes)

        def accepts(match, context):
            modalities = multi_values(match, "ModalitiesInStudy")
            # No ModalitiesInStudy in the match: the PACS matched it on
            # the key it was asked; trust it.
            return not modalities or bool(wanted.intersection(modalities))

        return Criterion(({"ModalitiesInStudy": codes},), accepts)


class _PatientParser(_Parser):
    def param_identifier(self, name, modifier, value):
        return self._patient_criterion(self._patient_ids_from_identifiers(name, value))

    def param_id(self, name, modifier, value):
        ids = []
        for alternative in split_values(value):
            fid = _unescape(alternative).strip()
            if not FHIR_ID.match(fid):
                raise BadRequest(f"Search parameter {name}: not a valid FHIR id")
            patient_id = patient_id_from_fhir(fid)
            if patient_id is not None:
                ids.append(patient_id)
        return self._patient_criterion(ids)

    def param_name(self, name, modifier, value):
        wanted = [_unescape(v).strip() for v in split_values(value)]
        if not all(wanted):
            raise BadRequest(f"Search parameter {name}: empty name")
        alternatives = tuple({"PatientName": "*" + dicom_literal(w, "PN") + "*"} for w in dict.fromkeys(wanted))
        if modifier == "exact":
            def test(part, w):
                return part == w
        elif modifier == "contains":
            def test(part, w):
                return fold(w) in fold(part)
        else:
            def test(part, w):
                return fold(part).startswith(fold(w))

        def accepts(match, context):
            parts = name_parts(match.get("PatientName"))
            return any(test(part, w) for part in parts for w in wanted)

        return Criterion(alternatives, accepts)

    def param_gender(self, name, modifier, value):
        genders = []
        for alternative in split_values(value):
            system, code = token(name, alternative)
            if code not in SEX_FOR_GENDER or system not in (None, "http://hl7.org/fhir/administrative-gender"):
                raise BadRequest(f"Search parameter {name}: expected male, female, other or unknown")
            genders.append(code)
        genders = frozenset(genders)
        keys = {}
        if len(genders) == 1 and SEX_FOR_GENDER[next(iter(genders))]:
            keys = {"PatientSex": SEX_FOR_GENDER[next(iter(genders))]}

        def accepts(match, context):
            return gender_of(match) in genders

        return Criterion((keys,), accepts)


def name_parts(pn):
    """
    The searchable parts of a DICOM person name (alphabetic group): family,
    given, middle (each word too), prefix, suffix and the text form.
    """
    if pn is None:
        return []
    try:
        from pydicom.valuerep import PersonName

        if not isinstance(pn, PersonName):
            pn = PersonName(str(pn))
        components = [pn.family_name, pn.given_name, pn.middle_name, pn.name_prefix, pn.name_suffix]
    except Exception:
        return []
    parts = []
    for component in components:
        component = component.strip()
        if component:
            parts.append(component)
            words = component.split()
            if len(words) > 1:
                parts.extend(words)
    text = person_name_text(pn)
    if text:
        parts.append(text)
    return parts


def person_name_text(pn):
    """
    A person name for display: prefix, given, middle, family, suffix.
    """
    if pn is None:
        return None
    try:
        from pydicom.valuerep import PersonName

        if not isinstance(pn, PersonName):
            pn = PersonName(str(pn))
        components = [pn.name_prefix, pn.given_name, pn.middle_name, pn.family_name, pn.name_suffix]
    except Exception:
        return None
    text = " ".join(c.strip() for c in components if c and c.strip())
    return text or None


def gender_of(match):
    """
    The FHIR gender of a match's PatientSex: C{None} when the PACS did not
    return it, C{unknown} when empty or unknown.
    """
    if "PatientSex" not in match:
        return None
    sex = text_value(match, "PatientSex")
    return {"M": "male", "F": "female", "O": "other"}.get((sex or "").upper(), "unknown")


def parse_study_search(params, options):
    """
    An ImagingStudy search from its parameters (name -> values).

    @param options: the middleware's options (C{default_count},
        C{max_count}, C{patient_identifier_system}).
    @rtype: L{Search}
    @raise BadRequest: an unknown parameter or modifier, a repeated one, a
        malformed value.
    """
    return _StudyParser("ImagingStudy", options, STUDY_PARAMS).parse(params)


def parse_patient_search(params, options):
    """
    A Patient search from its parameters (name -> values).

    @rtype: L{Search}
    @raise BadRequest: as L{parse_study_search}.
    """
    return _PatientParser("Patient", options, PATIENT_PARAMS).parse(params)
