# -*- test-case-name: tests.unit.test_mw_log_dump -*-
"""
C{log_dump}: an audit trail of requests and responses as structured
C{twisted.logger} events (namespace C{harmony.dump}, level info).

Options::

    [middleware.audit.options]
    apply = "both"                 # "left" (requests), "right" (responses) or "both"
    label = "after_auth"           # tells several dump points apart
    include_headers = ["content-type", "user-agent"]   # or ["*"]; default below
    redact_headers = ["x-api-key"] # besides Authorization, Proxy-Authorization, Cookie, Set-Cookie
    include_metadata = false
    redact_metadata = ["jwt.sub"]
    include_body = false           # AUDITED DEBUGGING ONLY, see below
    max_body_bytes = 65536
    redact_body_fields = ["patient.name", "entry.*.resource.name"]

Each request gives one event (C{side="request"}) and each response one
(C{side="response"}), with: C{dump_middleware}, C{label}, C{side},
C{method}, C{path} (the request path, without the query string, which is
never logged), C{status} (responses), C{pipeline}, C{request_id},
C{content_type}, C{body_size} (bytes, C{None} when a streamed body's
length is unknown), C{headers} (lower-case name -> value; several values
joined with C{", "}), and when enabled C{metadata}, C{body},
C{body_truncated} / C{body_omitted}.  Header and metadata values that are
redacted read C{"[REDACTED]"}; C{Authorization}, C{Proxy-Authorization},
C{Cookie} and C{Set-Cookie} are always redacted.  Responses rendered from
errors raised by later middleware or a backend do not pass through
response hooks, so they have no response event.

B{Bodies.}  Request and response bodies may contain patient data; they
are not logged unless C{include_body = true}, which is meant for audited,
time-limited debugging on systems whose logs are protected like the data
itself.  When enabled, the body is logged as compact JSON after
C{redact_body_fields} (JSON paths as in C{json_extractor}: dotted names,
C{*}, C{[n]}; a name applied to an array applies to every element)
replaced the selected values by C{"[REDACTED]"}, cut at C{max_body_bytes}
bytes (C{body_truncated = true}).  Only JSON bodies (or bodies another
middleware already parsed) are logged; others give C{body_omitted}.  A
streamed JSON body of known length up to C{[proxy.content_limits]
max_body_size} (or the endpoint's smaller limit) is read into memory to
be logged and passed on as those bytes; one of unknown length is not
read.  Logging never changes the outcome of a request: a body it cannot
read or parse is logged as omitted.

Rust Harmony names accepted: C{max_bytes} (= C{max_body_bytes}),
C{redact_data_fields} (= C{redact_body_fields}); C{pretty} is ignored with
a warning.
"""

import copy
import json

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.config.schema import Bool, Field, Int, ListOf, Schema, Str, from_validator
from harmony.envelope import JSON_TYPES, body_length, media_type
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.middleware.json_extractor import compile_path
from harmony.streams import Stream, collect

REDACTED = "[REDACTED]"

#: Always redacted, whatever the configuration says.
ALWAYS_REDACTED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

#: Headers logged by default.
DEFAULT_HEADERS = (
    "accept",
    "content-type",
    "content-length",
    "content-encoding",
    "user-agent",
    "location",
    "x-request-id",
)

#: Problems of the middleware itself (never the dumped data).
_log = logger("harmony.middleware.log_dump")

DEFAULT_MAX_BODY_BYTES = 65536
DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024

_HEADER_NAME = Str(nonempty=True, lower=True)
_PATH = Str(nonempty=True, check=from_validator(compile_path))


def _check(options, where):
    for new, old in (("max_body_bytes", "max_bytes"), ("redact_body_fields", "redact_data_fields")):
        if options[new] and options[old]:
            raise where.child(old).error(f"{old} is the Rust Harmony name of {new}: give only one of them")
    if (options.redact_body_fields or options.redact_data_fields) and not options.include_body:
        where.warn("bodies are not logged unless include_body = true; body field redaction has no effect")


OPTIONS = Schema(
    {
        "apply": Field(Str(choices=("left", "right", "both")), "both", "log requests, responses, or both"),
        "label": Field(Str(), "", "names this dump point in the events"),
        "include_headers": Field(ListOf(_HEADER_NAME, unique=True), DEFAULT_HEADERS, "headers logged; ['*'] = all"),
        "redact_headers": Field(ListOf(_HEADER_NAME, unique=True), (), "more headers logged as [REDACTED]"),
        "include_metadata": Field(Bool(), False, "log the metadata map"),
        "redact_metadata": Field(ListOf(Str(nonempty=True), unique=True), (), "metadata keys logged as [REDACTED]"),
        "include_body": Field(Bool(), False, "log JSON bodies (may contain patient data: audited debugging only)"),
        "max_body_bytes": Field(Int(min=1), None, f"cap of a logged body (default {DEFAULT_MAX_BODY_BYTES})"),
        "max_bytes": Field(Int(min=1), None, "Rust Harmony name of max_body_bytes"),
        "redact_body_fields": Field(ListOf(_PATH, unique=True), (), "JSON paths logged as [REDACTED]"),
        "redact_data_fields": Field(ListOf(_PATH, unique=True), (), "Rust Harmony name of redact_body_fields"),
    },
    legacy={"pretty": "events are structured; formatting belongs to the log observer"},
    check=_check,
)


def redact_json(document, paths):
    """
    A copy of C{document} with the values selected by C{paths} (L{JsonPath}s)
    replaced by C{"[REDACTED]"}.
    """
    if not paths:
        return document
    document = copy.deepcopy(document)
    for path in paths:
        if path.is_root:
            return REDACTED
        matches, _ = path.locate(document)
        for container, key, _ in matches:
            container[key] = REDACTED
    return document


def _max_body_size(context):
    config = getattr(context, "config", None)
    limits = getattr(getattr(config, "proxy", None), "content_limits", None)
    return getattr(limits, "max_body_size", DEFAULT_MAX_BODY_SIZE)


def _omitted(reason):
    return {"body": None, "body_omitted": reason}


@implementer(IMiddleware)
class LogDump:
    """
    @param log: the C{twisted.logger.Logger} events go to (default: the
        C{harmony.dump} namespace, filtered by the configured level).
    """

    def __init__(self, name, options, context=None, log=None):
        self.name = name
        self.log = log if log is not None else logger("harmony.dump")
        self.on_request = options.apply in ("left", "both")
        self.on_response = options.apply in ("right", "both")
        self.label = options.label
        self.all_headers = "*" in options.include_headers
        self.include_headers = frozenset(options.include_headers)
        self.redact_headers = ALWAYS_REDACTED | frozenset(options.redact_headers)
        self.include_metadata = options.include_metadata
        self.redact_metadata = frozenset(options.redact_metadata)
        self.include_body = options.include_body
        self.max_body_bytes = options.max_body_bytes or options.max_bytes or DEFAULT_MAX_BODY_BYTES
        fields = options.redact_body_fields or options.redact_data_fields
        self.redact_paths = tuple(compile_path(p) for p in fields)
        self._max_read = _max_body_size(context)

    def request(self, envelope):
        if not self.on_request:
            return None
        return self._dump("request", envelope, envelope.details.headers, envelope, None)

    def response(self, envelope, response):
        if not self.on_response:
            return None
        return self._dump("response", envelope, response.headers, response, response.status)

    def _dump(self, side, envelope, headers, message, status):
        """
        Emit the event for C{message} (the request envelope or the
        response); never fails the request.

        @return: C{None}, or a Deferred firing with C{None} once a
            streamed body was read and the event emitted.
        """
        try:
            fields = self._fields(side, envelope, headers, message, status)
            body = self._body(message) if self.include_body else None
            if isinstance(body, defer.Deferred):
                body.addCallback(self._emit, fields)
                body.addErrback(self._failed)
                return body
            self._emit(body, fields)
        except Exception:
            self._failed(Failure())
        return None

    def _failed(self, failure):
        # The failure's text names types and code, not the data.
        try:
            _log.failure("log_dump {dump_middleware} could not log an event", failure, dump_middleware=self.name)
        except Exception:
            pass
        return None

    def _fields(self, side, envelope, headers, message, status):
        details = envelope.details
        fields = {
            "dump_middleware": self.name,
            "label": self.label,
            "side": side,
            "method": details.method,
            "path": (details.full_path or "").split("?", 1)[0],
            "pipeline": envelope.metadata.get("pipeline"),
            "request_id": envelope.metadata.get("request_id"),
            "content_type": message.content_type or None,
            "body_size": body_length(message.body),
            "headers": self._headers(headers),
        }
        if status is not None:
            fields["status"] = status
        if self.include_metadata:
            metadata = dict(envelope.metadata)
            if message is not envelope:
                metadata.update(message.metadata)
            fields["metadata"] = {k: REDACTED if k in self.redact_metadata else v for k, v in metadata.items()}
        return fields

    def _headers(self, headers):
        out = {}
        for name, value in headers.items():
            lname = name.lower()
            if not self.all_headers and lname not in self.include_headers:
                continue
            if lname in self.redact_headers:
                out[lname] = REDACTED
            else:
                out[lname] = out[lname] + ", " + value if lname in out else value
        return out

    def _body(self, message):
        """
        The body fields: a dict, or a Deferred firing with one.
        """
        if message.parsed and message.normalized is not None:
            return self._render(message.normalized)
        mtype = media_type(message.content_type)
        if mtype and mtype not in JSON_TYPES and not mtype.endswith("+json"):
            return _omitted("not JSON")
        body = message.body
        limit = self._read_limit(message)
        if isinstance(body, Stream):
            if body.length is None:
                return _omitted("streamed body of unknown length")
            if body.length > limit:
                return _omitted("too large to read")
            # Read it into memory (its length is known and within the
            # limit) and pass the bytes on in its place; the envelope's
            # parsed view is left alone.
            return collect(body, limit).addCallback(self._collected, message)
        data = bytes(body or b"")
        if len(data) > limit:
            return _omitted("too large to read")
        return self._parse(data)

    def _collected(self, data, message):
        message.body = data
        return self._parse(data)

    def _read_limit(self, message):
        limits = getattr(message, "content_limits", None)
        size = getattr(limits, "max_body_size", None)
        return self._max_read if size is None else min(size, self._max_read)

    def _parse(self, data):
        if not data.strip():
            return _omitted("empty")
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return _omitted("malformed JSON")
        return self._render(value)

    def _render(self, value):
        if value is None:
            return _omitted("empty")
        value = redact_json(value, self.redact_paths)
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
        data = text.encode("utf-8")
        if len(data) <= self.max_body_bytes:
            return {"body": text, "body_truncated": False}
        return {"body": data[: self.max_body_bytes].decode("utf-8", "ignore"), "body_truncated": True}

    def _emit(self, body, fields):
        if body:
            fields.update(body)
        if fields["side"] == "request":
            fmt = "log_dump {dump_middleware}: request {method} {path}"
        else:
            fmt = "log_dump {dump_middleware}: response {status} to {method} {path}"
        self.log.emit(LogLevel.info, fmt, **fields)
        return None
