# -*- test-case-name: tests.unit.test_fhir_endpoint -*-
"""
The C{fhir} endpoint service: the FHIR RESTful API (R4, U{http://hl7.org/fhir/R4/http.html})
under C{path_prefix}.

The endpoint claims its whole prefix (so that malformed FHIR URLs get a
FHIR answer, not a generic one) and checks each request against the FHIR
URL grammar before any middleware runs:

  ======================================  ==============================================
  C{GET|HEAD  metadata}                    capabilities
  C{GET|HEAD  ?params}                     search-system
  C{POST      _search}                     search-system (form body)
  C{POST      }                            batch / transaction (Bundle body)
  C{GET|HEAD  _history}                    history-system
  C{GET|POST  $op}                         operation (system)
  C{GET|HEAD  [type]?params}               search-type
  C{POST      [type]/_search}              search-type (form body)
  C{POST      [type]}                      create (conditional with C{If-None-Exist})
  C{PUT|PATCH|DELETE [type]?params}        conditional update / patch / delete
  C{GET|HEAD  [type]/_history}             history-type
  C{GET|POST  [type]/$op}                  operation (type)
  C{GET|HEAD  [type]/[id]}                 read
  C{PUT       [type]/[id]}                 update
  C{PATCH     [type]/[id]}                 patch (JSON Patch, XML Patch, FHIRPath Patch: passed through)
  C{DELETE    [type]/[id]}                 delete
  C{GET|HEAD  [type]/[id]/_history}        history-instance
  C{GET|HEAD  [type]/[id]/_history/[vid]}  vread
  C{GET|POST  [type]/[id]/$op}             operation (instance; also on a version)
  C{GET|HEAD  [type]/[id]/[type|*]}        search-compartment (C{POST .../_search} too)
  ======================================  ==============================================

Resource and compartment types match C{[A-Z][A-Za-z]+}, ids and version
ids C{[A-Za-z0-9\\-\\.]{1,64}}, operations C{$name}: a malformed segment is a
400, an unknown path shape a 404, a known shape with another method a 405
(with C{Allow}); C{OPTIONS} goes on to the pipeline on any valid path (CORS
preflights for middleware).  C{PUT}/C{PATCH}/C{DELETE} on a type need
search parameters (conditional forms).  C{POST _search} bodies must be
form-encoded (415 otherwise).

C{_format} (C{json}, C{xml}, C{ttl}, C{html} or a media type) becomes the
request's C{Accept}; the parameter itself is forwarded too.  The FHIR
backend asks the upstream for C{application/fhir+json} unless the client
asked for XML (or another specific type), so JSON is the default and XML
passes through untouched.

C{GET metadata} is passed through to the backend (the upstream's own
CapabilityStatement, its links rewritten by the FHIR backend).  When the
backend has none (it answers 404, 405 or 501), the endpoint answers with
Harmony's own minimal CapabilityStatement instead.

Every error is an OperationOutcome (L{render_error}, JSON,
C{application/fhir+json}) with the error's status and headers
(C{WWW-Authenticate}, C{Allow}) and an C{issue[0].code} from
L{ISSUE_CODES}.  Error responses that reach the endpoint with an empty
body, or with Harmony's HTTP JSON error body (a middleware's
short-circuit), become OperationOutcomes too; an upstream's own error
bodies (OperationOutcomes or otherwise) pass through untouched.  (What
is refused before the pipeline runs -- dot segments, a body over the size
limit -- is rendered by the HTTP site as HTTP JSON, not by this endpoint.)

Options: C{path_prefix} (required) and C{max_body_size} (this endpoint's
request body limit; default: C{[proxy.content_limits] max_body_size}).

What the endpoint learnt about the request is left for middleware in
C{envelope.metadata}: C{fhir_interaction} (the names above), and when
present C{fhir_resource_type}, C{fhir_id}, C{fhir_version_id},
C{fhir_compartment}, C{fhir_operation}.
"""

import json
import re
import time
from datetime import datetime, timezone

import harmony
from harmony.backends import fhir as fhir_backend
from harmony.config.schema import REQUIRED, Field, Int, Schema, Str
from harmony.endpoints.http import HttpEndpoint
from harmony.envelope import ResponseEnvelope, body_length, media_type
from harmony.errors import BadRequest, MethodNotAllowed, NotFound, UnsupportedMediaType
from harmony.http.routing import check_prefix
from harmony.registry import ServiceType

OPTIONS = Schema(
    {
        "path_prefix": Field(Str(nonempty=True, check=check_prefix), REQUIRED, "URL prefix of the FHIR base"),
        "max_body_size": Field(
            Int(min=1), None, "bytes: this endpoint's request body limit (default: [proxy.content_limits])"
        ),
    }
)

FHIR_JSON = "application/fhir+json; charset=utf-8"

RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+\Z")
RESOURCE_ID = re.compile(r"[A-Za-z0-9\-\.]{1,64}\Z")
OPERATION = re.compile(r"\$[A-Za-z][A-Za-z0-9_\-\.]*\Z")

#: OperationOutcome C{issue.code} (R4 value set IssueType) by HTTP status.
ISSUE_CODES = {
    400: "invalid",
    401: "security",
    403: "security",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    501: "not-supported",
    502: "transient",
    503: "transient",
    504: "timeout",
}

_REASONS = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    410: "Gone",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable entity",
    429: "Too many requests",
    500: "Internal error",
    501: "Not implemented",
    502: "Upstream unavailable",
    503: "Service unavailable",
    504: "Upstream timed out",
}

#: C{_format} values (FHIR R4 3.1.0.1.7) -> Accept.
FORMATS = {
    "json": "application/fhir+json",
    "application/json": "application/fhir+json",
    "application/fhir+json": "application/fhir+json",
    "application/json+fhir": "application/fhir+json",
    "xml": "application/fhir+xml",
    "text/xml": "application/fhir+xml",
    "application/xml": "application/fhir+xml",
    "application/fhir+xml": "application/fhir+xml",
    "application/xml+fhir": "application/fhir+xml",
    "ttl": "application/fhir+turtle",
    "turtle": "application/fhir+turtle",
    "text/turtle": "application/fhir+turtle",
    "application/fhir+turtle": "application/fhir+turtle",
    "html": "text/html",
    "text/html": "text/html",
}

#: Query parameters that are not search parameters.
_FORMAT_PARAMS = frozenset({"_format", "_pretty", "_summary", "_elements"})

_GET = ("GET", "HEAD")
_OP = ("GET", "HEAD", "POST")


def issue_code(status):
    """
    The OperationOutcome issue code for an HTTP error status.
    """
    if status in ISSUE_CODES:
        return ISSUE_CODES[status]
    return "exception" if status >= 500 else "processing"


def operation_outcome(status, message, code=None):
    """
    An OperationOutcome resource (a dict) for an error.
    """
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": code or issue_code(status),
                "details": {"text": message},
                "diagnostics": message,
            }
        ],
    }


def outcome_response(status, message, headers=()):
    return ResponseEnvelope.json(status, operation_outcome(status, message), headers=headers, content_type=FHIR_JSON)


def render_operation_outcome(error):
    """
    A typed error as a FHIR OperationOutcome response.
    """
    return outcome_response(error.status, error.message, error.headers)


class FhirRequest:
    """
    A request classified by the FHIR URL grammar.

    @ivar interaction: C{read}, C{vread}, C{update}, C{patch}, C{delete},
        C{history-instance}, C{history-type}, C{history-system}, C{create},
        C{search-type}, C{search-system}, C{search-compartment},
        C{capabilities}, C{batch} (batch or transaction), C{operation},
        C{conditional-update}, C{conditional-patch}, C{conditional-delete},
        or C{options}.
    """

    __slots__ = ("interaction", "resource_type", "id", "version_id", "compartment", "operation")

    def __init__(self, interaction, resource_type=None, id=None, version_id=None, compartment=None, operation=None):
        self.interaction = interaction
        self.resource_type = resource_type
        self.id = id
        self.version_id = version_id
        self.compartment = compartment
        self.operation = operation

    def metadata(self):
        out = {"fhir_interaction": self.interaction}
        for key in ("resource_type", "id", "version_id", "compartment", "operation"):
            value = getattr(self, key)
            if value is not None:
                out["fhir_" + key] = value
        return out


def _segments(path):
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash is tolerated
    # Some clients percent-encode "$".
    return [s.replace("%24", "$") for s in segments] if segments != [""] else []


def _type(segment):
    if not RESOURCE_TYPE.match(segment):
        raise BadRequest("Invalid resource type in URL: must match [A-Z][A-Za-z]+")
    return segment


def _id(segment, what="resource id"):
    if not RESOURCE_ID.match(segment):
        raise BadRequest(f"Invalid {what} in URL: must match [A-Za-z0-9-.]{{1,64}}")
    return segment


def _operation(segment):
    if not OPERATION.match(segment):
        raise BadRequest("Invalid operation name in URL")
    return segment


def _pick(method, table):
    """
    The interaction for C{method} in C{table} (method -> interaction), or
    405 with the allowed methods.
    """
    if method == "OPTIONS":
        return "options"
    if method in table:
        return table[method]
    allowed = sorted(set(table) | {"OPTIONS"})
    raise MethodNotAllowed(allowed, f"{method} is not allowed on this FHIR URL")


def _ops(methods=_OP):
    return {m: "operation" for m in methods}


def classify(method, path, query):
    """
    Classify a request by the FHIR URL grammar.

    @param path: the path relative to the FHIR base (no leading slash).
    @param query: decoded query parameters (name -> values).
    @return: a L{FhirRequest}.
    @raise BadRequest: a malformed segment or missing search parameters.
    @raise NotFound: not a FHIR URL.
    @raise MethodNotAllowed: a FHIR URL that does not take C{method}.
    """
    seg = _segments(path)
    n = len(seg)
    searching = any(k not in _FORMAT_PARAMS for k in query)
    if any(s == "" for s in seg):
        raise NotFound("Not a FHIR URL: empty path segment")
    if n == 0:
        table = {"GET": "search-system", "HEAD": "search-system", "POST": "batch"}
        return FhirRequest(_pick(method, table))
    first = seg[0]
    if n == 1:
        if first == "metadata":
            return FhirRequest(_pick(method, {"GET": "capabilities", "HEAD": "capabilities"}))
        if first == "_history":
            return FhirRequest(_pick(method, {"GET": "history-system", "HEAD": "history-system"}))
        if first == "_search":
            return FhirRequest(_pick(method, {"POST": "search-system"}))
        if first.startswith("$"):
            return FhirRequest(_pick(method, _ops()), operation=_operation(first))
        rtype = _type(first)
        table = {
            "GET": "search-type",
            "HEAD": "search-type",
            "POST": "create",
            "PUT": "conditional-update",
            "PATCH": "conditional-patch",
            "DELETE": "conditional-delete",
        }
        interaction = _pick(method, table)
        if interaction.startswith("conditional-") and not searching:
            raise BadRequest(f"{method} on a resource type needs search parameters (conditional {method.lower()})")
        return FhirRequest(interaction, rtype)
    rtype = _type(first)
    second = seg[1]
    if n == 2:
        if second == "_search":
            return FhirRequest(_pick(method, {"POST": "search-type"}), rtype)
        if second == "_history":
            return FhirRequest(_pick(method, {"GET": "history-type", "HEAD": "history-type"}), rtype)
        if second.startswith("$"):
            return FhirRequest(_pick(method, _ops()), rtype, operation=_operation(second))
        rid = _id(second)
        table = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        return FhirRequest(_pick(method, table), rtype, rid)
    rid = _id(second)
    third = seg[2]
    if third == "_history":
        if n == 3:
            return FhirRequest(_pick(method, {"GET": "history-instance", "HEAD": "history-instance"}), rtype, rid)
        vid = _id(seg[3], "version id")
        if n == 4:
            return FhirRequest(_pick(method, {"GET": "vread", "HEAD": "vread"}), rtype, rid, vid)
        if n == 5 and seg[4].startswith("$"):
            return FhirRequest(_pick(method, _ops()), rtype, rid, vid, operation=_operation(seg[4]))
        raise NotFound("Not a FHIR URL")
    if third.startswith("$"):
        if n == 3:
            return FhirRequest(_pick(method, _ops()), rtype, rid, operation=_operation(third))
        raise NotFound("Not a FHIR URL")
    compartment = third if third == "*" else _type(third)
    if n == 3:
        table = {"GET": "search-compartment", "HEAD": "search-compartment"}
        return FhirRequest(_pick(method, table), rtype, rid, compartment=compartment)
    if n == 4 and seg[3] == "_search":
        return FhirRequest(_pick(method, {"POST": "search-compartment"}), rtype, rid, compartment=compartment)
    raise NotFound("Not a FHIR URL")


def accept_for_format(values):
    """
    The C{Accept} value for the C{_format} parameter's values.

    @raise BadRequest: an unknown format token.
    """
    value = values[0].strip().replace(" ", "+")  # "+" decoded as a space
    key = media_type(value)
    if key in FORMATS:
        return FORMATS[key]
    if "/" in key:
        return value
    raise BadRequest("Unsupported _format: expected json, xml, ttl, html or a media type")


class FhirEndpoint(HttpEndpoint):
    """
    A FHIR RESTful API entry under C{options.path_prefix} (routes as the
    C{http} endpoint's; FHIR request checks and OperationOutcome errors).
    """

    service_type = "fhir"

    def __init__(self, name, options, context=None):
        HttpEndpoint.__init__(self, name, options, context)
        self._reactor = getattr(context, "reactor", None)

    def incoming(self, envelope):
        details = envelope.details
        request = classify(details.method, details.path, details.query)
        envelope.metadata.update(request.metadata())
        formats = details.query.get("_format")
        if formats:
            details.headers.set("Accept", accept_for_format(formats))
        if request.interaction.startswith("search") and details.method == "POST":
            mtype = media_type(details.headers.get("content-type", ""))
            if body_length(envelope.body) != 0 and mtype != "application/x-www-form-urlencoded":
                raise UnsupportedMediaType("A FHIR search body must be application/x-www-form-urlencoded")
        return None

    def outgoing(self, envelope, response):
        interaction = envelope.metadata.get("fhir_interaction")
        status = response.status
        if interaction == "capabilities" and status in (404, 405, 501):
            return self.capability_statement(envelope)
        if status >= 400:
            replaced = _error_as_outcome(response)
            if replaced is not None:
                return replaced
        if "content-type" not in response.headers and (isinstance(response.body, bytes) and response.body):
            response.headers.set("Content-Type", FHIR_JSON)
        return response

    def render_error(self, error):
        return render_operation_outcome(error)

    def capability_statement(self, envelope):
        """
        Harmony's own CapabilityStatement, for backends that have none.
        """
        details = envelope.details
        prefix = details.prefix if details.prefix not in ("", "/") else ""
        now = self._reactor.seconds() if self._reactor is not None else time.time()
        statement = {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "publisher": "Harmony",
            "kind": "instance",
            "software": {"name": "Harmony", "version": harmony.__version__},
            "implementation": {
                "description": f"Harmony FHIR gateway (endpoint {self.name})",
                "url": details.base_url.rstrip("/") + prefix,
            },
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json", "application/fhir+xml"],
            "rest": [
                {
                    "mode": "server",
                    "documentation": "Requests are passed through to the configured FHIR backend.",
                    "interaction": [
                        {"code": "transaction"},
                        {"code": "batch"},
                        {"code": "search-system"},
                        {"code": "history-system"},
                    ],
                }
            ],
        }
        return ResponseEnvelope.json(200, statement, content_type=FHIR_JSON)


def _error_as_outcome(response):
    """
    An error response without a body, or with Harmony's HTTP JSON error
    body, as an OperationOutcome; C{None} for anything else (an upstream's
    own error bodies pass through).
    """
    body = response.body
    status = response.status
    headers = [(k, v) for k, v in response.headers if k.lower() not in ("content-type", "content-length")]
    if body is None or (isinstance(body, bytes) and not body):
        return outcome_response(status, _REASONS.get(status, "Error"), headers)
    if not isinstance(body, bytes) or media_type(response.content_type) != "application/json" or len(body) > 65536:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if (
        isinstance(value, dict)
        and isinstance(value.get("message"), str)
        and "error" in value
        and "resourceType" not in value
    ):
        return outcome_response(status, value["message"], headers)
    return None


#: The C{fhir} service type (endpoint and backend), for
#: C{[services.fhir] module = "harmony.endpoints.fhir:SERVICE_TYPE"} until
#: the built-in registry lists it.
SERVICE_TYPE = ServiceType(
    name="fhir",
    endpoint_factory=FhirEndpoint,
    endpoint_options=OPTIONS,
    backend_factory=fhir_backend.FhirBackend,
    backend_options=fhir_backend.OPTIONS,
)
