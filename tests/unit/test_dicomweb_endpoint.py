"""
The dicomweb endpoint: its fixed routes, what it tells middleware, CORS and
its errors.
"""

import json

import pytest

from harmony.config.schema import Where
from harmony.endpoints import dicomweb
from harmony.envelope import RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, MethodNotAllowed, NotFound, UpstreamUnavailable
from harmony.http.routing import RouteTable

S, R, I = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def endpoint(**options):
    options.setdefault("path_prefix", "/dicomweb")
    return dicomweb.DicomwebEndpoint("dw", dicomweb.OPTIONS.validate(options, Where("t.toml")))


def envelope(method, path, headers=(), query=None):
    details = RequestDetails(method=method, path=path, headers=headers, query=query or {}, prefix="/dicomweb",
                             base_url="http://gw.example:8080")
    return RequestEnvelope(details=details)


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("GET", "studies", {"dicomweb_action": "search", "dicomweb_resource": "studies"}),
        ("POST", "studies", {"dicomweb_action": "store", "dicomweb_level": "study"}),
        ("POST", f"studies/{S}", {"dicomweb_action": "store", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", "series", {"dicomweb_action": "search", "dicomweb_resource": "series"}),
        ("GET", "instances", {"dicomweb_action": "search", "dicomweb_resource": "instances"}),
        ("GET", f"studies/{S}", {"dicomweb_action": "retrieve", "dicomweb_level": "study", "dicomweb_study": S}),
        ("HEAD", f"studies/{S}", {"dicomweb_action": "retrieve", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", f"studies/{S}/", {"dicomweb_action": "retrieve", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", f"studies/{S}/metadata", {"dicomweb_action": "metadata", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", f"studies/{S}/thumbnail",
         {"dicomweb_action": "thumbnail", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", f"studies/{S}/series",
         {"dicomweb_action": "search", "dicomweb_resource": "series", "dicomweb_level": "study", "dicomweb_study": S}),
        ("GET", f"studies/{S}/instances",
         {"dicomweb_action": "search", "dicomweb_resource": "instances", "dicomweb_level": "study",
          "dicomweb_study": S}),
        ("GET", f"studies/{S}/series/{R}",
         {"dicomweb_action": "retrieve", "dicomweb_level": "series", "dicomweb_study": S, "dicomweb_series": R}),
        ("GET", f"studies/{S}/series/{R}/rendered",
         {"dicomweb_action": "rendered", "dicomweb_level": "series", "dicomweb_study": S, "dicomweb_series": R}),
        ("GET", f"studies/{S}/series/{R}/instances",
         {"dicomweb_action": "search", "dicomweb_resource": "instances", "dicomweb_level": "series",
          "dicomweb_study": S, "dicomweb_series": R}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}",
         {"dicomweb_action": "retrieve", "dicomweb_level": "instance", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}/metadata",
         {"dicomweb_action": "metadata", "dicomweb_level": "instance", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}/frames/1,3",
         {"dicomweb_action": "frames", "dicomweb_level": "frames", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I, "dicomweb_frames": "1,3"}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}/frames/2/rendered",
         {"dicomweb_action": "rendered", "dicomweb_level": "frames", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I, "dicomweb_frames": "2"}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}/bulkdata/00540016/0/00181074",
         {"dicomweb_action": "bulkdata", "dicomweb_level": "instance", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I, "dicomweb_bulkdata": "00540016/0/00181074"}),
        ("GET", f"studies/{S}/series/{R}/instances/{I}/bulk/7fe00010",
         {"dicomweb_action": "bulkdata", "dicomweb_level": "instance", "dicomweb_study": S, "dicomweb_series": R,
          "dicomweb_instance": I, "dicomweb_bulkdata": "7fe00010"}),
        ("GET", "bulkdata/abc/def", {"dicomweb_action": "bulkdata", "dicomweb_bulkdata": "abc/def"}),
    ],
)
def test_routes_tell_middleware_what_was_asked(method, path, expected):
    env = envelope(method, path)
    assert endpoint().incoming(env) is None
    assert {k: v for k, v in env.metadata.items() if k.startswith("dicomweb_")} == expected


@pytest.mark.parametrize(
    "path", ["", "other", "studies/1.2/other", f"studies/{S}/series/{R}/instances/{I}/frames",
             f"studies/{S}/series/{R}/instances/{I}/frames/1/other", "bulkdata", "series/x"]
)
def test_other_paths_are_not_ours(path):
    assert dicomweb.classify("GET", path) is None
    assert not dicomweb._matches("GET", path)


@pytest.mark.parametrize(
    "path, what",
    [("studies/1.02", "Study"), ("studies/abc/series", "Study"), (f"studies/{S}/series/1..2", "Series"),
     (f"studies/{S}/series/{R}/instances/x", "SOP Instance"), ("studies/" + "1" * 65, "Study")],
)
def test_malformed_uids_are_400(path, what):
    with pytest.raises(BadRequest) as e:
        dicomweb.classify("GET", path)
    assert what in e.value.message
    # The route is the endpoint's (it answers the 400 with CORS headers).
    assert dicomweb._matches("GET", path)
    response = endpoint().incoming(envelope("GET", path))
    assert response.status == 400
    assert what in json.loads(response.body)["message"]


@pytest.mark.parametrize("frames", ["0", "1,,2", "a", "1,0"])
def test_malformed_frame_lists_are_400(frames):
    with pytest.raises(BadRequest):
        dicomweb.classify("GET", f"studies/{S}/series/{R}/instances/{I}/frames/{frames}")


def test_route_table_methods():
    ep = endpoint()
    table = RouteTable("default")
    for route in ep.http_routes():
        table.add(route)
    assert table.resolve("POST", "/dicomweb/studies")[1] == "studies"
    assert table.resolve("OPTIONS", f"/dicomweb/studies/{S}/metadata")[1] == f"studies/{S}/metadata"
    e = pytest.raises(MethodNotAllowed, table.resolve, "POST", f"/dicomweb/studies/{S}/metadata").value
    assert e.allowed == ("GET", "HEAD", "OPTIONS")
    e = pytest.raises(MethodNotAllowed, table.resolve, "DELETE", "/dicomweb/studies").value
    assert "POST" in e.allowed
    with pytest.raises(NotFound):
        table.resolve("GET", "/dicomweb/nothing/here")


def test_plain_options_lists_methods():
    response = endpoint().incoming(envelope("OPTIONS", "studies"))
    assert response.status == 204
    assert response.headers.get("Allow") == "GET, HEAD, POST, OPTIONS"


def test_preflight_is_answered_with_cors_policy():
    ep = endpoint(cors_origins=["https://viewer.example"])
    env = envelope(
        "OPTIONS", f"studies/{S}",
        headers=[("Origin", "https://viewer.example"), ("Access-Control-Request-Method", "GET"),
                 ("Access-Control-Request-Headers", "accept, authorization")],
    )
    response = ep.incoming(env)
    assert response.status == 204
    assert response.headers.get("Access-Control-Allow-Origin") == "https://viewer.example"
    assert "GET" in response.headers.get("Access-Control-Allow-Methods")
    assert response.headers.get("Access-Control-Allow-Headers") == "accept, authorization"
    assert "Origin" in response.headers.get("Vary")
    # The endpoint's outgoing hook leaves a preflight's headers alone.
    assert ep.outgoing(env, response).headers.get("Access-Control-Allow-Origin") == "https://viewer.example"


def test_preflight_from_other_origin_is_403():
    ep = endpoint(cors_origins=["https://viewer.example"])
    env = envelope("OPTIONS", "studies", headers=[("Origin", "https://evil.example"),
                                                   ("Access-Control-Request-Method", "GET")])
    response = ep.incoming(env)
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


def test_responses_and_errors_get_cors_headers():
    ep = endpoint()
    env = envelope("GET", "studies", headers=[("Origin", "https://any.example")])
    ok = ep.outgoing(env, ResponseEnvelope(status=200, headers=[("Access-Control-Allow-Origin", "upstream")]))
    assert ok.headers.get_all("Access-Control-Allow-Origin") == ["*"]
    assert "Content-Location" in ok.headers.get("Access-Control-Expose-Headers")
    error = ep.outgoing(env, ep.render_error(UpstreamUnavailable("The PACS is unreachable")))
    assert error.status == 502
    assert error.headers.get("Access-Control-Allow-Origin") == "*"
    assert json.loads(error.body) == {"error": "bad_gateway", "message": "The PACS is unreachable"}


def test_cors_can_be_disabled():
    ep = endpoint(cors_origins=[])
    env = envelope("GET", "studies", headers=[("Origin", "https://any.example")])
    assert "Access-Control-Allow-Origin" not in ep.outgoing(env, ResponseEnvelope(status=200)).headers
    preflight = envelope("OPTIONS", "studies", headers=[("Origin", "https://any.example"),
                                                         ("Access-Control-Request-Method", "GET")])
    response = ep.incoming(preflight)
    assert response.status == 204
    assert "Access-Control-Allow-Origin" not in response.headers


def test_options_are_validated():
    from harmony.config.errors import ConfigError

    with pytest.raises(ConfigError):
        dicomweb.OPTIONS.validate({"path_prefix": "dicomweb"}, Where("t.toml"))
    with pytest.raises(ConfigError):
        dicomweb.OPTIONS.validate({"path_prefix": "/dw", "cors_origins": ["not an origin"]}, Where("t.toml"))
