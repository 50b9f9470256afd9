# -*- test-case-name: tests.unit.test_transform_middleware -*-
"""
C{metadata_transform}: a JOLT transform of the request details that sets
target details (where the backend sends the request) and/or metadata.

Options::

    [middleware.route.options]
    spec_path = "query_to_target.json"   # as for `transform`
    apply = "left"                 # "left" (default), "right" or "both"
    fail_on_error = true           # false: change nothing, log a warning
    transform_target = "target_details"  # or "metadata" (Rust Harmony's
                                         # legacy mode, see below)

Request side (C{left}), C{transform_target = "target_details"}: the input
is::

    {"method": "GET",
     "path": "Patient/1",              # below the endpoint's path_prefix
     "full_path": "/fhir/Patient/1",
     "uri": "/fhir/Patient/1?x=1",     # the raw request target
     "query": {"x": ["1"]},            # decoded, every value of each name
     "query_params": {"x": ["1"]},     # the same (Rust Harmony's name)
     "query_string": "x=1",
     "headers": {"accept": "application/json", ...},  # lower-case names,
                   # repeated ones joined with ", "; no Authorization,
                   # Proxy-Authorization or Cookie
     "metadata": {"pipeline": "...", ...},
     "target": {...}}                  # target details set so far

and the output may have::

    {"target": {"base_url": "https://pacs.example.org/api",
                "path": "studies/1.2.3",        # relative to base_url
                "method": "POST",
                "query_string": "limit=10"},
     "metadata": {"PatientID": "123", "priority": 2}}

(every member optional).  For configurations written for the Rust
Harmony, C{base_url}, C{method}, C{path}, C{query_string} and C{uri} (a
path with an optional C{?query}) are also read at the top level of the
output; a C{target} member wins over them.  An empty string means "not
set".  Target values must be strings: C{base_url} an C{http(s)://} URL
without query or fragment, C{method} an HTTP token (upper-cased), C{path}
without C{?}, C{#}, control characters or C{.}/C{..} segments (a leading
C{/} is dropped), C{query_string} without C{#} or control characters.
Metadata values are stored as strings: strings as they are, numbers and
booleans as their JSON text, objects and arrays as compact JSON;
C{null} sets nothing.  Harmony's own keys (C{pipeline}, C{endpoint},
C{protocol}, C{request_id}) are never overwritten.

C{transform_target = "metadata"}: the input is the metadata object
alone, and the output's members are stored as metadata (as above).

Response side (C{right}): the input is C{{"status": 200, "headers":
{...}, "metadata": {...response metadata}}} (C{Set-Cookie} left out), or
the response metadata alone with C{transform_target = "metadata"}; only
the output's metadata is used, stored in the response's metadata.

Errors: an output that is not an object, or an invalid target value, is
a 400 on the request side (C{fail_on_error = true}; the values come from
the request) and a 500 on the response side; with C{fail_on_error =
false} nothing is changed and a warning is logged (without values).
"""

import json
import re

from zope.interface import implementer

from harmony.config.schema import REQUIRED, Bool, Field, Schema, Str
from harmony.errors import BadRequest, InternalError
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.middleware.transform import SIDES, load_spec, visible_headers
from harmony.transforms import TransformError, transform

log = logger("harmony.middleware.metadata_transform")

OPTIONS = Schema(
    {
        "spec_path": Field(
            Str(nonempty=True), REQUIRED, "JOLT chain spec (JSON file), relative to [proxy].transforms_path"
        ),
        "apply": Field(Str(choices=SIDES, lower=True), "left", "left (request), right (response) or both"),
        "fail_on_error": Field(Bool(), True, "answer with an error when the transform fails"),
        "transform_target": Field(
            Str(choices=("target_details", "metadata"), lower=True),
            "target_details",
            "what the transform sees and sets",
        ),
    }
)

#: Metadata keys Harmony sets itself.
RESERVED_METADATA = frozenset({"pipeline", "endpoint", "protocol", "request_id"})

TARGET_KEYS = ("base_url", "path", "method", "query_string")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def request_input(envelope):
    """
    The input of a request-side transform (C{target_details} mode).
    """
    d = envelope.details
    query = {k: list(v) for k, v in d.query.items()}
    return {
        "method": d.method,
        "path": d.path,
        "full_path": d.full_path,
        "uri": d.uri,
        "query": query,
        "query_params": {k: list(v) for k, v in query.items()},
        "query_string": d.query_string,
        "headers": visible_headers(d.headers),
        "metadata": dict(envelope.metadata),
        "target": dict(envelope.target),
    }


def metadata_value(value):
    """
    A metadata string for a JSON value (C{None} for C{null}).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _metadata(entries):
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise TransformError("\"metadata\" in the output must be an object")
    out = {}
    for key, value in entries.items():
        try:
            text = metadata_value(value)
        except ValueError:
            raise TransformError("a metadata value is not representable as JSON") from None
        if text is not None and key not in RESERVED_METADATA:
            out[key] = text
    return out


def _check_base_url(value):
    if not (value.startswith("http://") or value.startswith("https://")) or len(value.split("://", 1)[1]) == 0:
        return False
    return not ("?" in value or "#" in value or _CONTROL.search(value))


def _clean_target(key, value):
    if not isinstance(value, str):
        raise TransformError(f"target {key} must be a string")
    if key == "base_url":
        if not _check_base_url(value):
            raise TransformError("target base_url must be an http:// or https:// URL without query or fragment")
        return value
    if key == "method":
        if not _TOKEN.match(value):
            raise TransformError("target method is not a valid HTTP method")
        return value.upper()
    if _CONTROL.search(value) or "#" in value:
        raise TransformError(f"target {key} contains characters that are not allowed")
    if key == "path":
        value = value.lstrip("/")
        if "?" in value:
            raise TransformError("target path must not contain '?' (use query_string)")
        for segment in value.split("/"):
            if segment.lower().replace("%2e", ".") in (".", ".."):
                raise TransformError("target path must not contain '.' or '..' segments")
    return value


def _target(output):
    found = {}
    legacy_uri = output.get("uri")
    if isinstance(legacy_uri, str) and legacy_uri:
        path, sep, query = legacy_uri.partition("?")
        found["path"] = path
        if sep:
            found["query_string"] = query
    for key in TARGET_KEYS:
        if key in output and output[key] not in ("", None):
            found[key] = output[key]
    nested = output.get("target")
    if nested is not None:
        if not isinstance(nested, dict):
            raise TransformError("\"target\" in the output must be an object")
        for key, value in nested.items():
            if key not in TARGET_KEYS:
                raise TransformError(f"unknown target detail {key!r} (known: {', '.join(TARGET_KEYS)})")
            if value not in ("", None):
                found[key] = value
    return {key: _clean_target(key, value) for key, value in found.items()}


@implementer(IMiddleware)
class MetadataTransformMiddleware:
    """
    Sets target details and metadata from a JOLT transform of the request
    details (and response metadata from the response details).
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.side = options.apply
        self.fail_on_error = options.fail_on_error
        self.mode = options.transform_target
        self.spec_file, self.spec = load_spec(name, options.spec_path, context)

    def request(self, envelope):
        if self.side == "right":
            return None
        try:
            if self.mode == "metadata":
                output = transform(self.spec, dict(envelope.metadata))
                target, metadata = {}, _metadata(output)
            else:
                output = transform(self.spec, request_input(envelope))
                if output is None:
                    return None
                if not isinstance(output, dict):
                    raise TransformError("the output must be an object")
                target, metadata = _target(output), _metadata(output.get("metadata"))
        except TransformError as e:
            return self._failed("request", e)
        envelope.target.update(target)
        envelope.metadata.update(metadata)
        return None

    def response(self, envelope, response):
        if self.side == "left":
            return None
        if self.mode == "metadata":
            data = dict(response.metadata)
        else:
            data = {
                "status": response.status,
                "headers": visible_headers(response.headers),
                "metadata": dict(response.metadata),
            }
        try:
            output = transform(self.spec, data)
            if self.mode == "metadata":
                metadata = _metadata(output)
            elif output is None:
                metadata = {}
            elif not isinstance(output, dict):
                raise TransformError("the output must be an object")
            else:
                metadata = _metadata(output.get("metadata"))
        except TransformError as e:
            return self._failed("response", e)
        response.metadata.update(metadata)
        return None

    def _failed(self, side, error):
        reason = str(error) if error.index is not None else error.message
        log.warn(
            "Metadata transform {middleware}: {side} details {outcome}: {reason}",
            middleware=self.name,
            side=side,
            outcome="could not be transformed" if self.fail_on_error else "left unchanged",
            reason=reason,
        )
        if not self.fail_on_error:
            return None
        if side == "request":
            raise BadRequest("The request details could not be transformed")
        raise InternalError("The response details could not be transformed")
