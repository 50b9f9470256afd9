# -*- test-case-name: tests.unit.test_envelope -*-
"""
The protocol-neutral envelope that every request and response travels in.

A L{RequestEnvelope} is built by an endpoint's protocol adapter (HTTP, DIMSE),
runs through the pipeline's middleware and is answered by a backend with a
L{ResponseEnvelope}.  Bodies are C{bytes} or a L{harmony.streams.Stream};
nothing may assume a body is in memory.  DICOM operations ride in the
C{dicom} slots as L{DicomRequest} / L{DicomResult}.
"""

import json

import attr

from harmony.http import bodies
from harmony.http.bodies import media_type  # noqa: F401 (part of this module's API)
from harmony.streams import Stream


class Headers:
    """
    An ordered, multi-valued, case-insensitive header list of C{str} pairs.
    Names keep the spelling they arrived with; lookups ignore case.

    Headers received from the network are kept as the raw byte pairs until
    someone reads or changes them as text (L{from_raw}, L{raw}): a request
    proxied untouched never decodes and re-encodes its headers.
    """

    __slots__ = ("_list", "_raw")

    def __init__(self, items=()):
        self._raw = None
        if isinstance(items, Headers):
            if items._list is None:
                self._list = None
                self._raw = list(items._raw)
                return
            items = items._list
        elif isinstance(items, dict):
            items = [
                (k, v) for k, vs in items.items() for v in (vs if isinstance(vs, (list, tuple)) else [vs])
            ]
        self._list = [(str(k), str(v)) for k, v in items]

    @classmethod
    def from_raw(cls, pairs):
        """
        Headers over a list of C{(name, value)} byte pairs (latin-1).
        """
        headers = cls.__new__(cls)
        headers._list = None
        headers._raw = pairs
        return headers

    def raw(self):
        """
        The headers as C{(name, value)} byte pairs (latin-1).
        """
        if self._list is None:
            return self._raw
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._list]

    @property
    def _items(self):
        items = self._list
        if items is None:
            items = self._list = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw]
        self._raw = None
        return items

    @_items.setter
    def _items(self, value):
        self._list = value
        self._raw = None

    def get(self, name, default=None):
        """
        The first value of C{name}, or C{default}.
        """
        lname = name.lower()
        for k, v in self._items:
            if k.lower() == lname:
                return v
        return default

    def get_all(self, name):
        lname = name.lower()
        return [v for k, v in self._items if k.lower() == lname]

    def __contains__(self, name):
        lname = name.lower()
        return any(k.lower() == lname for k, _ in self._items)

    def add(self, name, value):
        self._items.append((name, str(value)))

    def set(self, name, value):
        """
        Replace every value of C{name} by C{value}.
        """
        self.remove(name)
        self._items.append((name, str(value)))

    def setdefault(self, name, value):
        if name not in self:
            self._items.append((name, str(value)))

    def remove(self, name):
        lname = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lname]

    def items(self):
        """
        Every (name, value) pair in arrival order.
        """
        return list(self._items)

    def names(self):
        seen = {}
        for k, _ in self._items:
            seen.setdefault(k.lower(), k)
        return list(seen.values())

    def copy(self):
        return Headers(self)

    def as_dict(self):
        """
        Lower-case name -> values joined with C{", "} (RFC 9110 5.3), for
        display and JSON rendering.
        """
        out = {}
        for k, v in self._items:
            lk = k.lower()
            out[lk] = out[lk] + ", " + v if lk in out else v
        return out

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._raw if self._list is None else self._list)

    def __eq__(self, other):
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    def __repr__(self):
        # Values may be credentials or identifiers: show names only.
        return f"Headers(names={self.names()!r})"


def as_headers(value):
    """
    A L{Headers} from a L{Headers} (kept as is), a list of pairs or a dict.
    """
    return value if isinstance(value, Headers) else Headers(value)


JSON_TYPES = ("application/json", "application/fhir+json", "application/dicom+json")


@attr.s(slots=True)
class RequestDetails:
    """
    Where a request came from and what it asked for.

    @ivar method: upper-case method (C{"GET"}; C{"DIMSE"} for DICOM).
    @ivar uri: the raw request target (path and query as received).
    @ivar path: the path relative to the endpoint's prefix, without a
        leading slash (C{"Patient/123"}; C{""} at the prefix itself).
    @ivar full_path: the whole request path, percent-encoded as received.
    @ivar query: decoded query parameters, name -> list of values.
    @ivar query_string: the raw query string (without C{?}).
    @ivar headers: a L{Headers}.
    @ivar cookies: name -> value.
    @ivar client: (host, port) of the peer.
    @ivar scheme: C{"http"} or C{"https"}.
    @ivar base_url: the public base URL of this gateway for this request.
    @ivar prefix: the endpoint's path prefix that matched.
    """

    method = attr.ib()
    uri = attr.ib(default="")
    path = attr.ib(default="")
    full_path = attr.ib(default="")
    query = attr.ib(factory=dict)
    query_string = attr.ib(default="")
    headers = attr.ib(factory=Headers, converter=as_headers)
    cookies = attr.ib(factory=dict)
    client = attr.ib(default=None)
    scheme = attr.ib(default="http")
    base_url = attr.ib(default="")
    prefix = attr.ib(default="")


@attr.s(slots=True)
class DicomRequest:
    """
    A DIMSE operation carried in an envelope (filled by the DICOM issues).

    @ivar operation: C{echo|find|get|move|store}.
    @ivar query_model: C{"study"} or C{"patient"} root.
    @ivar level: C{PATIENT|STUDY|SERIES|IMAGE}.
    @ivar identifier: a pydicom C{Dataset} (query keys) or C{None}.
    @ivar move_destination: destination AE title for C-MOVE.
    @ivar priority: DIMSE priority (0 medium, 1 high, 2 low).
    @ivar calling_aet: the peer's AE title.
    @ivar called_aet: our AE title as the peer called it.
    @ivar instances: for store: a L{Stream} of L{DicomInstance}.
    @ivar user_identity: the peer's User Identity negotiation item
        (L{harmony.dimse.pdu.UserIdentityRQ}), passed through to a PACS a
        C{dicom_scu} backend associates with; never logged.
    @ivar accept_in_memory: for get/move: the consumer of the result also
        takes instances held in memory (C{DicomInstance.data} the Part 10
        file's bytes, a bytes-like object; no C{path}) and disposes of
        each; otherwise every instance is a file.
    """

    OPERATIONS = ("echo", "find", "get", "move", "store")

    operation = attr.ib(validator=attr.validators.in_(OPERATIONS))
    query_model = attr.ib(default="study")
    level = attr.ib(default=None)
    identifier = attr.ib(default=None)
    move_destination = attr.ib(default=None)
    priority = attr.ib(default=0)
    calling_aet = attr.ib(default=None)
    called_aet = attr.ib(default=None)
    instances = attr.ib(default=None)
    user_identity = attr.ib(default=None, repr=False)
    accept_in_memory = attr.ib(default=False)


@attr.s(slots=True)
class DicomInstance:
    """
    One DICOM instance in flight: its UIDs, transfer syntax and a byte
    source (bytes or L{Stream}) of the Part 10 file.
    """

    sop_class_uid = attr.ib()
    sop_instance_uid = attr.ib()
    transfer_syntax = attr.ib()
    data = attr.ib()
    size = attr.ib(default=None)
    #: Where the Part 10 file is stored, when it is (filesystem path).
    path = attr.ib(default=None)
    #: For a spooled copy (e.g. retrieved from a PACS only to be relayed):
    #: a callable the consumer calls once it has finished with the
    #: instance (sent it on, or given up), removing the copy; C{None} when
    #: the instance is kept.
    dispose = attr.ib(default=None)
    #: (Study, Series, SOP Instance UID) as the receiver read them from the
    #: data set (L{harmony.storage.dicom.uids_from_dataset_prefix}; C{None}
    #: for one the data set lacks), so that a consumer need not walk it
    #: again; C{None} when not read.
    uids = attr.ib(default=None)


@attr.s(slots=True)
class DicomResult:
    """
    The outcome of a DIMSE operation.

    @ivar status: the final DIMSE status (0x0000 success).
    @ivar error_comment: the Error Comment, if any.
    @ivar matches: for find: a L{Stream} of identifier datasets.
    @ivar instances: for get/move: a L{Stream} of L{DicomInstance}.
    @ivar completed/failed/warning/remaining: sub-operation counts.  For
        a streamed retrieve (C{instances} with C{done}) the producer keeps
        them current as the upstream operation reports progress (the
        upstream's own counts; C{None} while unknown), so a relay can
        estimate what remains.
    @ivar done: for results that stream (C{matches}, C{instances}): a
        Deferred firing with C{(status, error_comment)} once the operation
        has ended (read the stream to its end first); C{None} when
        C{status} is final already.
    @ivar instance_statuses: for store: one C{(sop_class_uid,
        sop_instance_uid, status, error_comment)} per instance, in the
        order given (C{status} is that instance's DIMSE status; C{status}
        above is the first failure, or success).
    """

    status = attr.ib(default=0x0000)
    error_comment = attr.ib(default=None)
    matches = attr.ib(default=None)
    instances = attr.ib(default=None)
    completed = attr.ib(default=None)
    failed = attr.ib(default=None)
    warning = attr.ib(default=None)
    remaining = attr.ib(default=None)
    done = attr.ib(default=None)
    instance_statuses = attr.ib(default=None)


_UNPARSED = object()


class _Normalized:
    """
    The parsed view of an envelope's body (shared by requests and responses).
    """

    __slots__ = ()

    @property
    def normalized(self):
        """
        The parsed view of the body, once L{parse_body} has run (else
        C{None}).  Middleware may replace it; a backend that sends a body
        re-serialises a replaced view.
        """
        return None if self._normalized is _UNPARSED else self._normalized

    @normalized.setter
    def normalized(self, value):
        self._normalized = value

    @property
    def parsed(self):
        return self._normalized is not _UNPARSED

    def parse_body(self, max_body_size=None, limits=None):
        """
        Compute the normalized view from the body, once, by Content-Type
        (JSON, XML, CSV, form, multipart, binary: see
        L{harmony.http.bodies}); other media types have no parsed view
        (C{None}) and their body is not read.

        The raw bytes stay untouched for passthrough: a body in memory is
        kept as is; a streamed body is read once through the parser and
        replaced by a fresh stream over the same bytes (or by those bytes).

        @param limits: the L{harmony.http.bodies.ContentLimits} to parse
            under; by default the envelope's C{content_limits} (set by the
            adapter that built it, from C{[proxy.content_limits]} and the
            endpoint's C{max_body_size}), else the configuration defaults.
        @param max_body_size: overrides the size limit of those limits.
        @return: Deferred firing with the normalized view, or failing with
            L{harmony.errors.BadRequest} (malformed body, too deep, too many
            rows/fields/files) or L{harmony.errors.PayloadTooLarge}.
        """
        if limits is None:
            limits = self.content_limits or bodies.DEFAULT_LIMITS
        if max_body_size is not None:
            limits = limits.with_max_body_size(max_body_size)
        return _parse(self, limits)


@attr.s(slots=True)
class RequestEnvelope(_Normalized):
    """
    A request on its way through a pipeline.

    @ivar details: a L{RequestDetails}.
    @ivar body: C{bytes}, a L{Stream}, or C{None}.
    @ivar metadata: str -> str, shared by middleware (C{pipeline},
        C{endpoint}, C{protocol}, C{request_id} are set by Harmony).
    @ivar target: target details set by middleware for the backend:
        C{base_url}, C{path}, C{method}, C{query_string} (each optional).
    @ivar dicom: a L{DicomRequest} or C{None}.
    @ivar rewind_body: C{None}, or a callable returning a fresh copy of a
        streamed body (lets ordered failover resend it).
    @ivar content_limits: the L{harmony.http.bodies.ContentLimits} that
        L{parse_body} applies (C{None}: the configuration defaults); set by
        the protocol adapter.
    """

    details = attr.ib()
    body = attr.ib(default=None)
    metadata = attr.ib(factory=dict)
    target = attr.ib(factory=dict)
    dicom = attr.ib(default=None)
    rewind_body = attr.ib(default=None)
    _normalized = attr.ib(default=_UNPARSED)
    content_limits = attr.ib(default=None, repr=False)

    @property
    def content_type(self):
        return self.details.headers.get("content-type", "")


async def _parse_async(envelope, limits):
    if envelope.parsed:
        return envelope.normalized
    is_request = isinstance(envelope, RequestEnvelope)
    result = await bodies.parse(
        envelope.body,
        envelope.content_type,
        limits,
        rewind=envelope.rewind_body if is_request else None,
        label="Request body" if is_request else "Response body",
    )
    envelope.body = result.body
    if is_request and result.rewind is not None and envelope.rewind_body is None:
        envelope.rewind_body = result.rewind
    envelope.normalized = result.normalized
    return envelope.normalized


def _parse(envelope, limits):
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(_parse_async(envelope, limits))


@attr.s(slots=True)
class ResponseEnvelope(_Normalized):
    """
    A response on its way back.

    @ivar status: HTTP status (DIMSE results also carry one: the endpoint
        decides what it means in its protocol).
    @ivar headers: a L{Headers}.
    @ivar body: C{bytes}, a L{Stream}, or C{None}.
    @ivar metadata: str -> str.
    @ivar dicom: a L{DicomResult} or C{None}.
    @ivar content_limits: the L{harmony.http.bodies.ContentLimits} that
        L{parse_body} applies (C{None}: the configuration defaults); the
        pipeline gives a response the limits of its request.
    """

    status = attr.ib(default=200)
    headers = attr.ib(factory=Headers, converter=as_headers)
    body = attr.ib(default=None)
    metadata = attr.ib(factory=dict)
    dicom = attr.ib(default=None)
    _normalized = attr.ib(default=_UNPARSED)
    content_limits = attr.ib(default=None, repr=False)

    @property
    def content_type(self):
        return self.headers.get("content-type", "")

    @classmethod
    def json(cls, status, value, headers=(), content_type="application/json"):
        """
        A response whose body is C{value} serialised as JSON.
        """
        body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        h = Headers(headers)
        h.set("Content-Type", content_type)
        resp = cls(status=status, headers=h, body=body)
        resp.normalized = value
        return resp


def body_length(body):
    """
    The size in bytes of a body when known without reading it, else C{None}.
    """
    if body is None:
        return 0
    if isinstance(body, Stream):
        return body.length
    return len(body)
