# -*- test-case-name: tests.unit.test_dicomweb_endpoint -*-
"""
The C{dicomweb} endpoint service: DICOMweb (PS3.18) under C{path_prefix}.

Fixed routes (relative to the prefix; C{{s}}, C{{r}}, C{{i}} are Study,
Series and SOP Instance UIDs, checked as UIDs: a malformed one is a 400):

  =====================================================  =========================  ==========
  path                                                   GET (and HEAD)             POST
  =====================================================  =========================  ==========
  C{studies}                                             QIDO search studies        STOW-RS
  C{studies/{s}}                                         WADO retrieve study        STOW-RS
  C{studies/{s}/metadata|rendered|thumbnail}             study metadata / images
  C{studies/{s}/series}, C{series}                       QIDO search series
  C{studies/{s}/instances}, C{instances}                 QIDO search instances
  C{studies/{s}/series/{r}}                              WADO retrieve series
  C{studies/{s}/series/{r}/metadata|rendered|thumbnail}  series metadata / images
  C{studies/{s}/series/{r}/instances}                    QIDO search instances
  C{.../instances/{i}}                                   WADO retrieve instance
  C{.../instances/{i}/metadata|rendered|thumbnail}       instance metadata / images
  C{.../instances/{i}/frames/{list}}                     frames (C{1,2,3})
  C{.../instances/{i}/frames/{list}/rendered|thumbnail}  rendered frames
  C{.../instances/{i}/bulkdata/{tag path}}               bulk data of an attribute
  C{.../instances/{i}/bulk/{...}}, C{bulkdata/{...}}     bulk data (upstream URI forms)
  =====================================================  =========================  ==========

Any other path under the prefix is not this endpoint's (a shorter
catch-all route may serve it, else 404); a known path with another method
is a 405 with C{Allow}.  C{OPTIONS} on any route is answered here: a CORS
preflight (C{Origin} + C{Access-Control-Request-Method}) with the
C{cors_origins} policy (the L{harmony.middleware.cors.CorsPolicy} of the
C{cors} middleware), a plain C{OPTIONS} with C{Allow}; neither reaches
middleware or backends.  Every other response (errors included) carries
the CORS response headers when the request's C{Origin} is allowed.

What the endpoint learnt is left in C{envelope.metadata} for the
C{dicomweb_bridge} middleware (and any other): C{dicomweb_action}
(C{search}, C{retrieve}, C{metadata}, C{rendered}, C{thumbnail},
C{frames}, C{bulkdata}, C{store}), C{dicomweb_resource} (for searches:
C{studies}, C{series}, C{instances}), C{dicomweb_level} (C{study},
C{series}, C{instance}, C{frames}: the level of the resource addressed;
absent for searches of the whole archive),
C{dicomweb_study}, C{dicomweb_series}, C{dicomweb_instance},
C{dicomweb_frames}, C{dicomweb_bulkdata} (when present).

Errors are JSON C{{"error": ..., "message": ...}} with the error's status
(PS3.18 leaves error bodies to the origin server): 400 bad query or UID,
404 unknown resource, 406 no acceptable representation, 409/202 for
STOW-RS with failures (bodies: the store response dataset), 413 body too
large, 415 not multipart/related DICOM, 502/504 PACS or upstream
unreachable or too slow.

Options: C{path_prefix} (required), C{cors_origins} (default C{["*"]};
C{[]} disables CORS headers), C{max_body_size} (STOW-RS request limit;
default C{[proxy.content_limits] max_body_size}).
"""

import re

from harmony.config.schema import REQUIRED, Field, Int, ListOf, Schema, Str
from harmony.endpoints.http import HttpEndpoint, render_json_error
from harmony.envelope import ResponseEnvelope
from harmony.errors import BadRequest, Forbidden, HarmonyError, NotFound
from harmony.http.routing import Route, check_prefix
from harmony.middleware.cors import CorsPolicy, CorsRejected, _check_origin, add_vary

OPTIONS = Schema(
    {
        "path_prefix": Field(Str(nonempty=True, check=check_prefix), REQUIRED, "URL prefix of the DICOMweb root"),
        "cors_origins": Field(
            ListOf(Str(nonempty=True, check=_check_origin)), ("*",), "origins allowed by CORS ([] = no CORS headers)"
        ),
        "max_body_size": Field(
            Int(min=1), None, "bytes: STOW-RS request body limit (default: [proxy.content_limits])"
        ),
    }
)

#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")

_GET = ("GET", "HEAD", "OPTIONS")
_GET_POST = ("GET", "HEAD", "POST", "OPTIONS")
_IMAGES = ("metadata", "rendered", "thumbnail")

#: Request headers a DICOMweb client sends (CORS preflights).
CORS_METHODS = ("GET", "HEAD", "POST", "OPTIONS")
EXPOSE_HEADERS = ("Content-Location", "Content-Type", "Content-Length", "Warning")


class DicomwebRequest:
    """
    What a DICOMweb path addresses.

    @ivar action: C{search}, C{retrieve}, C{metadata}, C{rendered},
        C{thumbnail}, C{frames}, C{bulkdata} or C{store}.
    @ivar methods: the methods the path serves (OPTIONS included).
    """

    __slots__ = ("action", "methods", "resource", "level", "study", "series", "instance", "frames", "bulkdata")

    def __init__(self, action, methods, resource=None, level=None, study=None, series=None, instance=None,
                 frames=None, bulkdata=None):
        self.action = action
        self.methods = methods
        self.resource = resource
        self.level = level
        self.study = study
        self.series = series
        self.instance = instance
        self.frames = frames
        self.bulkdata = bulkdata

    def metadata(self):
        out = {"dicomweb_action": self.action}
        for key in ("resource", "level", "study", "series", "instance", "frames", "bulkdata"):
            value = getattr(self, key)
            if value is not None:
                out["dicomweb_" + key] = value
        return out


def _uid(segment, what):
    if len(segment) > 64 or not UID.match(segment):
        raise BadRequest(f"The {what} in the path is not a valid DICOM UID")
    return segment


def classify(method, path):
    """
    The L{DicomwebRequest} of a path relative to the prefix (C{method}
    picks between retrieve/search and store), or C{None} when the path is
    not a DICOMweb resource.

    @raise BadRequest: a UID or frame list in the path is malformed.
    """
    segs = path.split("/") if path else []
    if segs and segs[-1] == "" and len(segs) > 1:
        segs = segs[:-1]  # one trailing slash is tolerated
    n = len(segs)
    if n == 0:
        return None
    head = segs[0]
    if head == "bulkdata" and n > 1 and all(segs[1:]):
        return DicomwebRequest("bulkdata", _GET, bulkdata="/".join(segs[1:]))
    if head in ("series", "instances") and n == 1:
        return DicomwebRequest("search", _GET, resource=head)
    if head != "studies":
        return None
    if n == 1:
        if method == "POST":
            return DicomwebRequest("store", _GET_POST, level="study")
        return DicomwebRequest("search", _GET_POST, resource="studies")
    study = _uid(segs[1], "Study Instance UID")
    if n == 2:
        action = "store" if method == "POST" else "retrieve"
        return DicomwebRequest(action, _GET_POST, level="study", study=study)
    if n == 3:
        if segs[2] in _IMAGES:
            return DicomwebRequest(segs[2], _GET, level="study", study=study)
        if segs[2] in ("series", "instances"):
            return DicomwebRequest("search", _GET, resource=segs[2], level="study", study=study)
        return None
    if segs[2] != "series":
        return None
    series = _uid(segs[3], "Series Instance UID")
    if n == 4:
        return DicomwebRequest("retrieve", _GET, level="series", study=study, series=series)
    if n == 5:
        if segs[4] in _IMAGES:
            return DicomwebRequest(segs[4], _GET, level="series", study=study, series=series)
        if segs[4] == "instances":
            return DicomwebRequest("search", _GET, resource="instances", level="series", study=study, series=series)
        return None
    if segs[4] != "instances":
        return None
    instance = _uid(segs[5], "SOP Instance UID")
    uids = dict(study=study, series=series, instance=instance)
    if n == 6:
        return DicomwebRequest("retrieve", _GET, level="instance", **uids)
    if n == 7 and segs[6] in _IMAGES:
        return DicomwebRequest(segs[6], _GET, level="instance", **uids)
    if segs[6] in ("bulkdata", "bulk") and n > 7 and all(segs[7:]):
        return DicomwebRequest("bulkdata", _GET, level="instance", bulkdata="/".join(segs[7:]), **uids)
    if segs[6] == "frames" and n in (8, 9):
        frames = segs[7]
        if not re.fullmatch(r"[0-9]+(,[0-9]+)*", frames) or any(int(f) < 1 for f in frames.split(",")):
            raise BadRequest("The frame list must be frame numbers (from 1) separated by commas")
        if n == 8:
            return DicomwebRequest("frames", _GET, level="frames", frames=frames, **uids)
        if segs[8] in ("rendered", "thumbnail"):
            return DicomwebRequest(segs[8], _GET, level="frames", frames=frames, **uids)
    return None


def _matches(method, path):
    try:
        request = classify(method, path)
    except BadRequest:
        return True  # ours: the endpoint answers 400
    return request is not None and method in request.methods


class DicomwebEndpoint(HttpEndpoint):
    """
    A DICOMweb root under C{options.path_prefix}.
    """

    service_type = "dicomweb"

    def __init__(self, name, options, context=None):
        HttpEndpoint.__init__(self, name, options, context)
        origins = tuple(options.cors_origins)
        self.cors = (
            CorsPolicy(allowed_origins=origins, allowed_methods=CORS_METHODS, expose_headers=EXPOSE_HEADERS)
            if origins
            else None
        )

    def http_routes(self):
        return [Route(self.options.path_prefix, self, None, _GET_POST, match=_matches)]

    def incoming(self, envelope):
        details = envelope.details
        try:
            request = classify(details.method, details.path)
            if request is None:
                raise NotFound("No DICOMweb resource at this path")
        except HarmonyError as e:
            # Rendered here so that outgoing adds the CORS headers.
            return self.render_error(e)
        if details.method == "OPTIONS":
            return self._options(envelope, request)
        envelope.metadata.update(request.metadata())
        return None

    def _options(self, envelope, request):
        headers = envelope.details.headers
        origin = headers.get("origin")
        allow = ", ".join(m for m in request.methods)
        if self.cors is not None and CorsPolicy.is_preflight("OPTIONS", origin, headers.get("access-control-request-method")):
            try:
                pairs = self.cors.preflight_headers(
                    origin, headers.get("access-control-request-method"), headers.get("access-control-request-headers", "")
                )
            except CorsRejected as e:
                response = render_json_error(Forbidden(e.reason))
                add_vary(response.headers, "Origin")
                return response
            response = ResponseEnvelope(status=204, headers=pairs + [("Allow", allow)])
            response.metadata["cors_preflight"] = "1"
            if self.cors.varies_by_origin:
                add_vary(response.headers, "Origin")
            return response
        return ResponseEnvelope(status=204, headers=[("Allow", allow)])

    def outgoing(self, envelope, response):
        if self.cors is not None and "cors_preflight" not in response.metadata:
            origin = envelope.details.headers.get("origin")
            for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                         "Access-Control-Expose-Headers"):
                response.headers.remove(name)
            for name, value in self.cors.response_headers(origin):
                response.headers.set(name, value)
            if self.cors.varies_by_origin:
                add_vary(response.headers, "Origin")
        return response

    def render_error(self, error):
        return render_json_error(error)

