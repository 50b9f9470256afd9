# -*- test-case-name: tests.unit.test_fhir_backend -*-
"""
The C{fhir} backend: the C{http} reverse proxy (L{HttpBackend}, same pooled
agent, timeouts and header hygiene) with what a FHIR server behind a
gateway needs:

  - create, update, patch and batch/transaction bodies must have a FHIR
    content type (JSON or XML; JSON Patch / XML Patch for PATCH; anything
    for C{Binary}): otherwise L{UnsupportedMediaType} (415) before the
    upstream is contacted;
  - C{Accept: application/fhir+json} is sent when the client asked for
    nothing more specific than JSON (no C{Accept}, C{*/*}, C{application/json});
    an XML (or any other specific) C{Accept} goes through untouched;
  - C{Location}, C{ETag}, C{Last-Modified}, C{Content-Location} are kept,
    and absolute URLs of the upstream (C{base_url}, plus
    C{upstream_base_urls}) in C{Location} and C{Content-Location}, and in
    Bundle C{link[].url}, C{entry[].fullUrl}, C{entry[].link[].url},
    C{entry[].response.location} (nested Bundles too) and a
    CapabilityStatement's C{implementation.url}, are rewritten to
    Harmony's public base for the endpoint (C{[proxy] public_base_url},
    else the trusted C{Forwarded} headers, else C{Host}; plus the endpoint
    prefix), so paging links lead back through Harmony.

Bodies are parsed only when they can hold such links (JSON responses to
searches, history, batch/transaction, operations and C{metadata}) and
mention the upstream at all; everything else (single resources, XML,
binaries) streams through untouched.  Re-serialised JSON keeps decimals
exactly as the upstream wrote them (FHIR decimals carry precision).
"""

import json
import re
import secrets

import attr
from twisted.internet import defer

from harmony.backends.http import OPTIONS as HTTP_OPTIONS
from harmony.backends.http import HttpBackend, _check_base_url
from harmony.config.schema import Field, Int, ListOf, Str
from harmony.envelope import body_length, media_type
from harmony.errors import UnsupportedMediaType
from harmony.logs import logger
from harmony.streams import Stream, relay

log = logger("harmony.backends.fhir")

OPTIONS = HTTP_OPTIONS.extend(
    {
        "upstream_base_urls": Field(
            ListOf(Str(nonempty=True, check=_check_base_url)),
            (),
            "other base URLs the upstream uses for itself in links (rewritten like base_url)",
        ),
        "max_rewrite_size": Field(
            Int(min=0),
            32 * 1024 * 1024,
            "bytes: larger response bodies stream through without link rewriting",
        ),
    }
)

#: FHIR JSON media types (R4 3.1.0.1.7; C{application/json+fhir} is the DSTU2 name).
FHIR_JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
#: FHIR XML media types.
FHIR_XML_TYPES = frozenset({"application/fhir+xml", "application/xml", "text/xml", "application/xml+fhir"})
FHIR_TYPES = FHIR_JSON_TYPES | FHIR_XML_TYPES
#: PATCH bodies: JSON Patch, XML Patch, or FHIRPath Patch (a Parameters resource).
PATCH_TYPES = FHIR_TYPES | {"application/json-patch+json", "application/xml-patch+xml"}

FHIR_JSON = "application/fhir+json"

#: Accept media ranges for which Harmony asks the upstream for FHIR JSON.
_JSONISH_ACCEPT = frozenset(
    {"", "*/*", "application/*", "application/json", "application/fhir+json", "application/json+fhir"}
)

_NO_BODY = frozenset({204, 304})


def fhir_json_media(content_type):
    """
    C{True} for a JSON response media type (FHIR or plain JSON).
    """
    mtype = media_type(content_type)
    return mtype in FHIR_JSON_TYPES or mtype.endswith("+json")


def _segments(path):
    return [s.replace("%24", "$") for s in path.split("?", 1)[0].split("/") if s]


def body_kind(method, segments):
    """
    What a request body must be: C{"resource"} (create, update, batch or
    transaction: FHIR JSON/XML), C{"patch"} (PATCH types), or C{None} (no
    check: searches, operations, C{Binary}, bodiless methods).
    """
    if segments and segments[0] == "Binary":
        return None
    if method == "POST":
        if not segments:
            return "resource"
        if len(segments) == 1 and segments[0][0] not in "$_":
            return "resource"
        return None
    if method == "PUT" and len(segments) in (1, 2):
        return "resource"
    if method == "PATCH" and len(segments) in (1, 2):
        return "patch"
    return None


def may_hold_links(method, segments):
    """
    C{True} when a response can carry server links to rewrite: searches
    (system, type, compartment), history, batch/transaction, operations
    and the CapabilityStatement.  Single-resource interactions (read,
    vread, create, update, patch, delete) answer with a resource whose
    contents Harmony leaves alone (a stored document Bundle stays as
    stored).
    """
    if not segments:
        return method in ("GET", "HEAD", "POST")
    last = segments[-1]
    if last in ("_search", "_history", "metadata") or last.startswith("$"):
        return True
    if len(segments) == 1:
        return method in ("GET", "HEAD")
    if len(segments) == 3 and segments[1] != "_history":
        # [type]/[id]/[compartment type]: a compartment search.
        return method in ("GET", "HEAD")
    return False


def wants_fhir_json(accept_values):
    """
    C{True} when the client's C{Accept} asks for nothing more specific
    than JSON: Harmony then asks the upstream for C{application/fhir+json}.
    """
    if not accept_values:
        return True
    ranges = [media_type(r) for v in accept_values for r in v.split(",")]
    if ranges and ranges[0] == FHIR_JSON:
        # Already FHIR JSON (maybe with fhirVersion): keep the client's.
        return False
    return all(r in _JSONISH_ACCEPT for r in ranges)


class _LinkRewriter:
    """
    Rewrites absolute URLs that start with one of the upstream bases.
    """

    def __init__(self, upstream_bases, public_base):
        # Longest first: a base that extends another wins.
        self.upstream = sorted({u.rstrip("/") for u in upstream_bases if u}, key=len, reverse=True)
        self.public = public_base.rstrip("/")
        self.markers = [u.encode("utf-8") for u in self.upstream]

    @property
    def active(self):
        return bool(self.public and self.upstream and self.public not in self.upstream)

    def url(self, value):
        if not isinstance(value, str):
            return value
        for up in self.upstream:
            if value == up or value.startswith(up + "/") or value.startswith(up + "?"):
                return self.public + value[len(up) :]
        return value

    def mentions_upstream(self, data):
        return any(m in data for m in self.markers)

    def resource(self, res):
        """
        Rewrite the server links of a parsed resource in place.

        @return: C{True} if anything changed.
        """
        if not isinstance(res, dict):
            return False
        changed = False
        rtype = res.get("resourceType")
        if rtype == "Bundle":
            changed |= self._links(res.get("link"))
            entries = res.get("entry")
            for entry in entries if isinstance(entries, list) else ():
                if not isinstance(entry, dict):
                    continue
                changed |= self._set(entry, "fullUrl")
                changed |= self._links(entry.get("link"))
                response = entry.get("response")
                if isinstance(response, dict):
                    changed |= self._set(response, "location")
                inner = entry.get("resource")
                if isinstance(inner, dict) and inner.get("resourceType") == "Bundle" and entry.get("response"):
                    # A search answered inside a batch-response: its links too.
                    changed |= self.resource(inner)
        elif rtype == "CapabilityStatement":
            impl = res.get("implementation")
            if isinstance(impl, dict):
                changed |= self._set(impl, "url")
        return changed

    def _set(self, obj, key):
        old = obj.get(key)
        new = self.url(old)
        if new is not old and new != old:
            obj[key] = new
            return True
        return False

    def _links(self, links):
        changed = False
        for link in links if isinstance(links, list) else ():
            if isinstance(link, dict):
                changed |= self._set(link, "url")
        return changed

    def body(self, data):
        """
        The rewritten JSON body, or C{None} when nothing changes (not JSON,
        not a Bundle/CapabilityStatement, no upstream links).
        """
        if not self.mentions_upstream(data):
            return None
        token = secrets.token_hex(6)
        marker = f"\x00{token}:"
        try:
            value = json.loads(data, parse_float=lambda s: marker + s + "\x00")
        except (ValueError, UnicodeDecodeError):
            return None
        if not self.resource(value):
            return None
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        # Decimals go back exactly as the upstream wrote them.
        text = re.sub(r'"\\u0000' + token + r':([^"\\]*)\\u0000"', r"\1", text)
        return text.encode("utf-8")


def prepend(head, source):
    """
    A L{Stream} of the C{head} chunks already read, then the rest of
    C{source}, with backpressure; cancelling it cancels C{source}.
    """
    return relay(source, head=head, length=source.length)


class FhirBackend(HttpBackend):
    """
    Proxies FHIR REST requests to C{options.base_url}.
    """

    service_type = "fhir"

    def __init__(self, name, options, context):
        super().__init__(name, options, context)
        self._aliases = tuple(u.rstrip("/") for u in options.upstream_base_urls)
        self._max_rewrite = options.max_rewrite_size

    def handle(self, envelope):
        details = envelope.details
        method = envelope.target.get("method", details.method).upper()
        segments = _segments(envelope.target.get("path", details.path))
        kind = body_kind(method, segments)
        if kind is not None and body_length(envelope.body) != 0:
            allowed = PATCH_TYPES if kind == "patch" else FHIR_TYPES
            mtype = media_type(details.headers.get("content-type", ""))
            if mtype not in allowed:
                what = "JSON Patch, XML Patch or FHIR" if kind == "patch" else "FHIR JSON or XML"
                got = f"Content-Type {mtype}" if mtype else "no Content-Type"
                return defer.fail(UnsupportedMediaType(f"The body must be {what}, got {got}"))
        if wants_fhir_json(details.headers.get_all("accept")):
            headers = details.headers.copy()
            headers.set("Accept", FHIR_JSON)
            envelope = attr.evolve(envelope, details=attr.evolve(details, headers=headers))
        d = super().handle(envelope)
        return d.addCallback(self._rewrite, envelope, may_hold_links(method, segments))

    # -- responses --------------------------------------------------------

    def rewriter(self, envelope):
        """
        The L{_LinkRewriter} from the upstream's bases to Harmony's public
        base for this request.
        """
        details = envelope.details
        prefix = details.prefix if details.prefix not in ("", "/") else ""
        public = details.base_url.rstrip("/") + prefix if details.base_url else ""
        upstream = (envelope.target.get("base_url") or self._base).rstrip("/")
        return _LinkRewriter((upstream,) + self._aliases, public)

    def _rewrite(self, response, envelope, links):
        rewriter = self.rewriter(envelope)
        if not rewriter.active:
            return response
        for name in ("Location", "Content-Location"):
            value = response.headers.get(name)
            if value is not None:
                new = rewriter.url(value)
                if new != value:
                    response.headers.set(name, new)
        if (
            not links
            or response.status in _NO_BODY
            or envelope.details.method == "HEAD"
            or not fhir_json_media(response.content_type)
        ):
            return response
        body = response.body
        if isinstance(body, Stream):
            if body.length is not None and body.length > self._max_rewrite:
                return response
            return defer.Deferred.fromCoroutine(self._rewrite_stream(response, rewriter))
        if body:
            self._replace_body(response, rewriter, body)
        return response

    def _replace_body(self, response, rewriter, data):
        new = rewriter.body(data)
        response.body = data if new is None else new
        if new is not None and "content-length" in response.headers:
            response.headers.set("Content-Length", str(len(new)))

    async def _rewrite_stream(self, response, rewriter):
        source = response.body
        chunks, size = [], 0
        async for chunk in source:
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_rewrite:
                log.info(
                    "Backend {backend}: response body over max_rewrite_size, links not rewritten",
                    backend=self.name,
                )
                response.body = prepend(chunks, source)
                return response
        self._replace_body(response, rewriter, b"".join(chunks))
        return response
