# -*- test-case-name: tests.unit.test_dicomweb_accept -*-
"""
Accept negotiation for DICOMweb resources (PS3.18 section 8.7).

L{parse_accept} reads Accept header values into L{MediaRange}s, best
first: sorted by C{q} (stable: equal weights keep the client's order),
C{q=0} ranges dropped, no header meaning C{*/*}.  Parameter values may be
quoted strings holding C{;} and C{,}.  A transfer syntax may come as a
parameter of the multipart range (C{multipart/related;
type="application/dicom"; transfer-syntax=UID}, what PS3.18 and
dicomweb-client write) or inside the quoted type (C{type="application/dicom;
transfer-syntax=UID"}, what some clients write): both are understood.  A
range with an empty subtype (C{image/}, which dicomweb-client lets callers
ask for) is read as C{image/*}.

L{negotiate} picks, for a kind of resource, what to answer: the first range
(by weight) Harmony can produce gives a L{Choice}; none gives
L{NotAcceptable} naming what is available.  Kinds:

  - C{"instances"} (study, series, instance): C{multipart/related;
    type="application/dicom"} with an optional transfer syntax (a UID or
    C{*}); C{*/*}, C{multipart/*}, C{multipart/related} without a type or
    with a wildcard type, and bare C{application/dicom} also give it.
  - C{"metadata"} and C{"search"}: C{application/dicom+json} (also for
    C{application/json}, C{application/*} and C{*/*}), or
    C{multipart/related; type="application/dicom+xml"} (also for bare
    C{application/dicom+xml} and multipart ranges whose type is a wildcard).
  - C{"frames"}: C{multipart/related; type="application/octet-stream"}
    (transfer syntax C{1.2.840.10008.1.2.1} by default, or C{*}: as
    stored), or a compressed image type (C{image/jpeg}, C{image/jls},
    C{image/jp2}, C{image/jpx}, C{image/dicom-rle}; the older
    C{image/x-jls} and C{image/x-dicom-rle} are read as the current names)
    with a transfer syntax of that type (its default when none is given);
    C{*/*}, C{multipart/related} without a type or with C{type="*/*"} give
    C{Choice("*/*", True, "*")}: the frames as stored; bare
    C{application/octet-stream} asks for a single part.  C{image/*} is not
    offered (it would need a conversion choice Harmony does not make).
  - C{"bulkdata"}: C{multipart/related; type="application/octet-stream"}
    (wildcards and C{*/*} too), or bare C{application/octet-stream}.
  - C{"rendered"} and C{"thumbnail"}: C{image/jpeg} (also for C{image/*}
    and C{*/*}), C{image/png} or C{image/gif}, single part.

A range with a transfer syntax Harmony cannot honour for its type is not
acceptable (the next range is tried).
"""

import re

import attr

from harmony.dicomweb.multipart import scan_media_type
from harmony.errors import BadRequest, NotAcceptable

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
OCTET_STREAM = "application/octet-stream"

#: Compressed pixel data media types and their default transfer syntax.
IMAGE_DEFAULT_TRANSFER_SYNTAX = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}

#: Older names some clients (dicomweb-client, Orthanc) still use.
_IMAGE_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}

#: The media type of a frame as stored, by encapsulated transfer syntax
#: (PS3.18 Table 8.7.3-5).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}

#: Uncompressed transfer syntaxes: native pixel data, application/octet-stream.
UNCOMPRESSED_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def media_type_for_transfer_syntax(uid):
    """
    The frame/bulk data media type of a transfer syntax: C{image/jpeg},
    C{image/jls}, C{image/jp2}, C{image/jpx}, C{image/dicom-rle}, else
    C{application/octet-stream} (uncompressed and unknown ones).
    """
    return FRAME_MEDIA_TYPES.get(uid, OCTET_STREAM)


@attr.s(frozen=True, slots=True)
class MediaRange:
    """
    One media range of an Accept header.

    @ivar type: C{"type/subtype"}, lower case (wildcards as sent).
    @ivar params: parameter name (lower case) -> value (unquoted), C{q}
        excluded.
    @ivar q: the weight, 0 < q <= 1.
    """

    type = attr.ib()
    params = attr.ib(factory=dict, hash=False)
    q = attr.ib(default=1.0)

    @property
    def multipart(self):
        """
        C{True} for C{multipart/related} and C{multipart/*}.
        """
        return self.type in ("multipart/related", "multipart/*")

    @property
    def part_type(self):
        """
        The media type of the parts a multipart range asks for (its C{type}
        parameter without parameters, lower case), C{"*/*"} when absent.
        """
        value = self.params.get("type")
        if not value:
            return "*/*"
        return _normalize_type(scan_media_type(value, what="Accept")[0])

    @property
    def transfer_syntax(self):
        """
        The transfer syntax asked for, from the range's parameters or from
        inside its quoted C{type}; C{None} when none.
        """
        ts = self.params.get("transfer-syntax")
        if ts is None and self.params.get("type"):
            ts = scan_media_type(self.params["type"], what="Accept")[1].get("transfer-syntax")
        return ts.strip() if ts else None


def _normalize_type(mtype):
    if mtype.endswith("/"):
        mtype += "*"
    return mtype


def _valid_type(mtype):
    kind, slash, sub = mtype.partition("/")
    if not slash or not _TOKEN_RE.fullmatch(kind) or not _TOKEN_RE.fullmatch(sub):
        return False
    return not (kind == "*" and sub != "*")


def parse_accept(values):
    """
    The media ranges of Accept header values, best first.

    @param values: a list of Accept header values (C{None} or empty: no
        header, which means C{*/*}).
    @return: a list of L{MediaRange}, sorted by q descending (stable), q=0
        dropped.
    @raise BadRequest: a malformed header.
    """
    if isinstance(values, str):
        values = [values]
    values = [v for v in (values or ()) if v is not None]
    if not values or all(not v.strip() for v in values):
        return [MediaRange("*/*", {}, 1.0)]
    ranges = []
    for value in values:
        pos = 0
        while pos < len(value):
            mtype, params, pos = scan_media_type(value, pos, in_list=True, what="Accept")
            pos += 1  # the comma
            if not mtype:
                continue
            mtype = _normalize_type(mtype)
            if not _valid_type(mtype):
                raise BadRequest("Malformed media type in Accept")
            q = 1.0
            if "q" in params:
                text = params.pop("q")
                if not re.fullmatch(r"(0(\.[0-9]{0,3})?|1(\.0{0,3})?)", text.strip()):
                    raise BadRequest("Malformed q value in Accept")
                q = float(text)
            if q > 0:
                ranges.append(MediaRange(mtype, params, q))
    ranges.sort(key=lambda r: -r.q)
    return ranges


@attr.s(frozen=True, slots=True)
class Choice:
    """
    What to answer with.

    @ivar media_type: the body type, or the parts' type when C{multipart}.
    @ivar multipart: C{True} for a multipart/related body.
    @ivar transfer_syntax: C{None} (the default: as stored), C{"*"} (as
        stored, asked for explicitly) or a transfer syntax UID.
    """

    media_type = attr.ib()
    multipart = attr.ib()
    transfer_syntax = attr.ib(default=None)


def _matches(media_range, mtype):
    if media_range == "*/*" or media_range == mtype:
        return True
    return media_range.endswith("/*") and mtype.startswith(media_range[:-1])


def _valid_ts(ts):
    return ts == "*" or (len(ts) <= 64 and _UID_RE.fullmatch(ts) is not None)


def _instances(r, ts):
    if r.multipart:
        if _matches(r.part_type, DICOM):
            return Choice(DICOM, True, ts)
        return None
    if r.type == "*/*":
        return Choice(DICOM, True, ts)
    if r.type == DICOM:
        return Choice(DICOM, True, ts)
    return None


def _metadata(r, ts):
    if r.multipart:
        if _matches(r.part_type, DICOM_XML):
            return Choice(DICOM_XML, True, None)
        return None
    if r.type in (DICOM_JSON, "application/json", "application/*", "*/*"):
        return Choice(DICOM_JSON, False, None)
    if r.type == DICOM_XML:
        return Choice(DICOM_XML, True, None)
    return None


def _octet_stream_ts(ts):
    if ts is None:
        return EXPLICIT_VR_LITTLE_ENDIAN
    if ts == "*" or ts == EXPLICIT_VR_LITTLE_ENDIAN:
        return ts
    return False


def _frames(r, ts):
    if r.multipart:
        part = _IMAGE_ALIASES.get(r.part_type, r.part_type)
        if part == "*/*":
            return Choice("*/*", True, "*") if ts in (None, "*") else None
        if part == OCTET_STREAM:
            chosen = _octet_stream_ts(ts)
            return Choice(OCTET_STREAM, True, chosen) if chosen else None
        if part in IMAGE_DEFAULT_TRANSFER_SYNTAX:
            if ts is None:
                return Choice(part, True, IMAGE_DEFAULT_TRANSFER_SYNTAX[part])
            if FRAME_MEDIA_TYPES.get(ts) == part:
                return Choice(part, True, ts)
        return None
    if r.type == "*/*":
        return Choice("*/*", True, "*")
    if r.type == OCTET_STREAM:
        chosen = _octet_stream_ts(ts)
        return Choice(OCTET_STREAM, False, chosen) if chosen else None
    return None


def _bulkdata(r, ts):
    if ts is not None and ts != "*" and ts not in UNCOMPRESSED_TRANSFER_SYNTAXES:
        return None
    if r.multipart:
        if _matches(r.part_type, OCTET_STREAM):
            return Choice(OCTET_STREAM, True, None)
        return None
    if r.type == "*/*":
        return Choice(OCTET_STREAM, True, None)
    if r.type == OCTET_STREAM:
        return Choice(OCTET_STREAM, False, None)
    return None


def _rendered(r, ts):
    if r.type in ("image/jpeg", "image/png", "image/gif"):
        return Choice(r.type, False, None)
    if r.type in ("*/*", "image/*"):
        return Choice("image/jpeg", False, None)
    return None


_KINDS = {
    "instances": (_instances, 'multipart/related; type="application/dicom"'),
    "metadata": (_metadata, 'application/dicom+json, multipart/related; type="application/dicom+xml"'),
    "search": (_metadata, 'application/dicom+json, multipart/related; type="application/dicom+xml"'),
    "frames": (
        _frames,
        'multipart/related; type="application/octet-stream" (or a type among image/jpeg, image/jls, '
        "image/jp2, image/jpx, image/dicom-rle)",
    ),
    "bulkdata": (_bulkdata, 'multipart/related; type="application/octet-stream", application/octet-stream'),
    "rendered": (_rendered, "image/jpeg, image/png, image/gif"),
    "thumbnail": (_rendered, "image/jpeg, image/png, image/gif"),
}


def negotiate(kind, accept_values):
    """
    What to answer for a resource of C{kind} given the Accept header values.

    @param kind: C{"instances"}, C{"metadata"}, C{"search"}, C{"frames"},
        C{"bulkdata"}, C{"rendered"} or C{"thumbnail"}.
    @param accept_values: the Accept header values (a list; C{None} or
        empty: no header).
    @return: a L{Choice}.
    @raise NotAcceptable: no acceptable range can be produced (the message
        names what is available).
    @raise BadRequest: a malformed Accept header.
    @raise ValueError: an unknown C{kind} (a programming error).
    """
    try:
        rule, available = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown DICOMweb resource kind {kind!r}")
    for media_range in parse_accept(accept_values):
        ts = media_range.transfer_syntax
        if ts is not None and not _valid_ts(ts):
            continue
        choice = rule(media_range, ts)
        if choice is not None:
            return choice
    raise NotAcceptable(f"None of the accepted media types is available; available: {available}")
