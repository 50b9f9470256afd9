# -*- test-case-name: tests.unit.test_transform_middleware -*-
"""
C{transform}: JOLT transforms of JSON request and/or response bodies.

Options::

    [middleware.to_fhir.options]
    spec_path = "patient_to_fhir.json"  # JOLT chain spec (JSON), see below
    apply = "left"            # "left" (request body), "right" (response
                              # body) or "both"; default "both" (as the
                              # Rust Harmony)
    fail_on_error = true      # false: leave the body as it was, log a warning
    inject_context = false    # true: transform {"body": ..., "context": ...}
    content_type = ""         # Content-Type of a rewritten body; default:
                              # the body's own JSON type, else application/json

C{spec_path} is read when Harmony starts: an absolute path, or a path
relative to C{[proxy].transforms_path} (default C{transforms} next to the
base configuration file), or, when no such file exists there, relative
to the base file's directory.  A missing file, invalid JSON (duplicate
keys included) or an invalid spec stops startup with an error naming the
file, the operation and the key path.  The spec is a JOLT chain (see
L{harmony.transforms.jolt} for what is supported); a single
C{{"operation", "spec"}} object is a chain of one.

Which bodies are transformed: those with a JSON media type
(C{application/json}, C{application/fhir+json}, C{application/dicom+json},
any C{+json}) or no Content-Type, without a C{Content-Encoding} other than
C{identity}.  Other bodies (XML, CSV, forms, images, DICOM, compressed
JSON) pass through untouched, and so do responses to C{HEAD} and C{1xx},
C{204} and C{304} responses.  An empty body (or a JSON C{null}) is left
alone, except with C{inject_context} (a body can be built from the
context): its C{body} is C{null} then, and when the result is C{null}
too the body stays as it was.

With C{inject_context}, the transform's input is::

    {"body": <the parsed body or null>,
     "context": {
       "request": {"method": "POST", "path": "Patient/1",
                   "full_path": "/fhir/Patient/1",
                   "query": {"name": ["value", ...]},
                   "headers": {"content-type": "application/json", ...},
                   "metadata": {"pipeline": "...", ...}},
       "target": {"base_url": ..., "path": ..., ...},   # as set so far
       "response": {"status": 200, "headers": {...}}}}  # right side only

(header names lower-case, repeated headers joined with C{", "};
C{Authorization}, C{Proxy-Authorization}, C{Cookie} and C{Set-Cookie} are
left out), and the new body is the output's C{body} member (an output
without one is an error).  Without it the input is the body itself and
the output is the new body.

A request body rewritten (left) is what backends receive: compact UTF-8
JSON, with C{Content-Type} as above and C{Content-Length} set (and
C{Transfer-Encoding}, C{Content-MD5}, C{Digest}, C{Content-Digest}
removed); C{normalized} is the output.  A response body (right) likewise;
its C{ETag} is kept.

Errors: with C{fail_on_error = true} a request body that is not valid
JSON is a 400 (as for every JSON body), a request transform that fails is
a 400 (C{bad_request}, "The request body could not be transformed"), a
response that is not valid JSON or whose transform fails is a 500
(C{internal_error}, "The response body could not be transformed").  With
C{false} the body goes on unchanged and a warning is logged (without the
body).  A body over the size limit is a 413 either way.

Bodies over 64 KiB are transformed in the reactor's thread pool (a 100 KB
document takes tens of milliseconds), smaller ones inline.
"""

import json
import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from harmony.config.errors import ConfigError
from harmony.config.schema import REQUIRED, Bool, Field, Schema, Str
from harmony.envelope import JSON_TYPES, body_length, media_type
from harmony.errors import BadRequest, InternalError
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.transforms import SpecError, TransformError, compile_spec, transform

log = logger("harmony.middleware.transform")

SIDES = ("left", "right", "both")

OPTIONS = Schema(
    {
        "spec_path": Field(
            Str(nonempty=True), REQUIRED, "JOLT chain spec (JSON file), relative to [proxy].transforms_path"
        ),
        "apply": Field(Str(choices=SIDES, lower=True), "both", "left (request body), right (response body) or both"),
        "fail_on_error": Field(Bool(), True, "answer with an error when a body cannot be transformed"),
        "inject_context": Field(Bool(), False, "transform {body, context} instead of the body"),
        "content_type": Field(Str(), "", "Content-Type of rewritten bodies (default: keep the JSON type)"),
    }
)

#: Headers never shown to a transform.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

#: Headers that describe the old bytes of a rewritten body.
STALE_HEADERS = ("Content-Length", "Transfer-Encoding", "Content-MD5", "Digest", "Content-Digest")

#: Responses that have no body to transform.
NO_BODY_STATUSES = frozenset({204, 304})

DEFAULT_TRANSFORMS_PATH = "transforms"

#: Bodies up to this size are transformed on the reactor thread; larger
#: ones in the reactor's thread pool (measured: a 100 KB document with
#: 70000 values moved by a shift takes about 85 ms).
INLINE_LIMIT = 64 * 1024


# -- spec files ----------------------------------------------------------------------


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def spec_candidates(spec_path, context):
    """
    Where C{spec_path} may be, in order: itself when absolute; else under
    C{[proxy].transforms_path}, then under the configuration directory.
    """
    if os.path.isabs(spec_path):
        return [spec_path]
    config = getattr(context, "config", None)
    if config is None:
        return [os.path.abspath(spec_path)]
    proxy = getattr(config, "proxy", None)
    transforms_path = getattr(proxy, "transforms_path", None) or DEFAULT_TRANSFORMS_PATH
    first = os.path.join(config.resolve_path(transforms_path), spec_path)
    second = config.resolve_path(spec_path)
    return [first] if os.path.normpath(first) == os.path.normpath(second) else [first, second]


def load_spec(name, spec_path, context):
    """
    Read and compile the JOLT spec of middleware C{name}.

    @raise ConfigError: naming the file (and, for a bad spec, the
        operation and key path).
    @return: (the file's path, a L{harmony.transforms.CompiledSpec}).
    """
    candidates = spec_candidates(spec_path, context)
    path = next((p for p in candidates if os.path.isfile(p)), None)
    prefix = f"middleware {name!r}: options.spec_path"
    if path is None:
        tried = " or ".join(candidates)
        raise ConfigError(f"{prefix}: JOLT spec file {spec_path!r} not found (looked for {tried})")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{prefix}: cannot read the JOLT spec: {e.strerror}", path) from None
    try:
        spec = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{prefix}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{prefix}: not valid JSON: the file is not UTF-8", path) from None
    except ValueError as e:
        raise ConfigError(f"{prefix}: not valid JSON: {e}", path) from None
    except RecursionError:
        raise ConfigError(f"{prefix}: not valid JSON: nested too deeply", path) from None
    try:
        return path, compile_spec(spec)
    except SpecError as e:
        raise ConfigError(f"{prefix}: invalid JOLT spec: {e}", path) from None


# -- what transforms see ---------------------------------------------------------------


def visible_headers(headers):
    """
    Lower-case name -> value (repeated headers joined), without
    credentials.
    """
    return {k: v for k, v in headers.as_dict().items() if k not in SECRET_HEADERS}


def request_details(envelope):
    """
    The C{context.request} object of an injected context.
    """
    d = envelope.details
    return {
        "method": d.method,
        "path": d.path,
        "full_path": d.full_path,
        "query": {k: list(v) for k, v in d.query.items()},
        "headers": visible_headers(d.headers),
        "metadata": dict(envelope.metadata),
    }


def injected(body, envelope, response=None):
    """
    The input of a transform with C{inject_context}.
    """
    context = {"request": request_details(envelope), "target": dict(envelope.target)}
    if response is not None:
        context["response"] = {"status": response.status, "headers": visible_headers(response.headers)}
    return {"body": body, "context": context}


def is_json_body(headers):
    """
    Whether a body with these headers is JSON this middleware may rewrite.
    """
    mtype = media_type(headers.get("content-type", ""))
    if not (not mtype or mtype in JSON_TYPES or mtype.endswith("+json")):
        return False
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    return encoding == "identity"


def json_content_type(current):
    """
    The Content-Type of a re-serialised JSON body: the current JSON type
    with its parameters except C{charset} (the new body is UTF-8), or
    C{application/json}.
    """
    if not media_type(current):
        return "application/json"
    parts = [p.strip() for p in current.split(";")]
    params = [p for p in parts[1:] if p and not p.lower().startswith("charset=")]
    return "; ".join([parts[0]] + params)


def serialize(value):
    """
    Compact UTF-8 JSON.

    @raise TransformError: for NaN or infinite numbers.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        raise TransformError("the output holds a number JSON cannot represent (NaN or infinity)") from None


def apply_spec(spec, data, inject_context):
    """
    Run C{spec} on C{data} and serialise the result (pure: may run in a
    thread).

    @raise TransformError: the transform failed, the output of an
        injected context has no C{body}, or it cannot be JSON.
    @return: C{(output, bytes)}, or C{None} when the output and the input
        body are both C{null} (nothing to write).
    """
    output = transform(spec, data)
    if inject_context:
        if not isinstance(output, dict) or "body" not in output:
            raise TransformError("with inject_context the output must be an object with a \"body\" member")
        output = output["body"]
        if output is None and data["body"] is None:
            return None
    return output, serialize(output)


def _thread_runner(reactor):
    if reactor is not None and hasattr(reactor, "getThreadPool"):

        def run(f, *args):
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return run
    return lambda f, *args: maybeDeferred(f, *args)


def _was_empty(body):
    return body is None or (isinstance(body, (bytes, bytearray)) and not body.strip())


@implementer(IMiddleware)
class TransformMiddleware:
    """
    Rewrites JSON bodies with a JOLT chain loaded at startup.
    """

    def __init__(self, name, options, context=None, run_in_thread=None):
        """
        @param run_in_thread: C{f(function, *args) -> Deferred} for the
            transforms of large bodies (default: the reactor's thread
            pool; without a reactor, inline).
        """
        self.name = name
        self.side = options.apply
        self.fail_on_error = options.fail_on_error
        self.inject_context = options.inject_context
        self.content_type = options.content_type
        self.spec_file, self.spec = load_spec(name, options.spec_path, context)
        self._run_in_thread = run_in_thread or _thread_runner(getattr(context, "reactor", None))

    # -- hooks -------------------------------------------------------------------------

    def request(self, envelope):
        if self.side == "right" or not is_json_body(envelope.details.headers):
            return None
        if _was_empty(envelope.body) and not self.inject_context:
            return None
        return Deferred.fromCoroutine(self._request(envelope))

    def response(self, envelope, response):
        if self.side == "left" or envelope.details.method == "HEAD":
            return None
        if response.status < 200 or response.status in NO_BODY_STATUSES:
            return None
        if not is_json_body(response.headers):
            return None
        if _was_empty(response.body) and not self.inject_context:
            return None
        return Deferred.fromCoroutine(self._response(envelope, response))

    # -- work --------------------------------------------------------------------------

    async def _request(self, envelope):
        try:
            body = await envelope.parse_body()
        except BadRequest as e:
            if self.fail_on_error:
                raise
            self._warn("request", e.message)
            return None
        if body is None and not self.inject_context:
            return None
        data = injected(body, envelope) if self.inject_context else body
        result = await self._apply(data, body_length(envelope.body), "request")
        if result is not None:
            output, encoded = result
            envelope.body = encoded
            envelope.rewind_body = None
            envelope.normalized = output
            self._set_headers(envelope.details.headers, encoded)
        return None

    async def _response(self, envelope, response):
        try:
            body = await response.parse_body()
        except BadRequest:
            if self.fail_on_error:
                raise InternalError("The response body could not be transformed: it is not valid JSON") from None
            self._warn("response", "the response body is not valid JSON")
            return None
        if body is None and not self.inject_context:
            return None
        data = injected(body, envelope, response) if self.inject_context else body
        result = await self._apply(data, body_length(response.body), "response")
        if result is not None:
            output, encoded = result
            response.body = encoded
            response.normalized = output
            self._set_headers(response.headers, encoded)
        return None

    async def _apply(self, data, size, side):
        """
        Transform and serialise C{data} (in a thread when the body is
        large).

        @return: C{(output, bytes)}, or C{None} to leave the body as it is.
        """
        try:
            if size is None or size > INLINE_LIMIT:
                result = await self._run_in_thread(apply_spec, self.spec, data, self.inject_context)
            else:
                result = apply_spec(self.spec, data, self.inject_context)
        except TransformError as e:
            self._failed(side, e.message if e.index is None else str(e))
            return None
        return result

    def _failed(self, side, reason):
        if self.fail_on_error:
            log.warn(
                "Transform {middleware}: the {side} body could not be transformed: {reason}",
                middleware=self.name,
                side=side,
                reason=reason,
            )
            if side == "request":
                raise BadRequest("The request body could not be transformed")
            raise InternalError("The response body could not be transformed")
        self._warn(side, reason)

    def _warn(self, side, reason):
        log.warn(
            "Transform {middleware}: {side} body left unchanged: {reason}",
            middleware=self.name,
            side=side,
            reason=reason,
        )

    def _set_headers(self, headers, data):
        content_type = self.content_type or json_content_type(headers.get("content-type", ""))
        for name in STALE_HEADERS:
            headers.remove(name)
        headers.set("Content-Type", content_type)
        headers.set("Content-Length", str(len(data)))

