"""
cors: preflights answered with 204 (403 when not allowed), actual responses
get Access-Control-Allow-Origin and Vary: Origin; the reusable CorsPolicy;
every config error.
"""

import json

import pytest
from _deferreds import result_of
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error, pipeline
from _fakes import FakeBackend, FakeEndpoint, make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.envelope import Headers, ResponseEnvelope
from harmony.errors import Forbidden
from harmony.interfaces import IMiddleware
from harmony.middleware.cors import OPTIONS, CorsMiddleware, CorsPolicy, add_vary, normalize_origin
from harmony.pipeline import PipelineExecutor
from harmony.registry import MiddlewareType, builtin_registry

VIEWER = "https://viewer.example.org"


def options(**values):
    return OPTIONS.validate(values, Where("p.toml", ("middleware", "cors", "options")))


def build(**values):
    return CorsMiddleware("cors", options(**values))


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return str(info.value)


def preflight(origin=VIEWER, method="PUT", headers=None):
    h = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if headers is not None:
        h.append(("Access-Control-Request-Headers", headers))
    return make_request("OPTIONS", "Patient/1", headers=h)


def actual(mw, origin=VIEWER, response_headers=()):
    envelope = make_request("GET", "Patient/1", headers=[("Origin", origin)] if origin else [])
    assert mw.request(envelope) is None
    response = ResponseEnvelope(status=200, headers=response_headers, body=b"{}")
    assert mw.response(envelope, response) is None
    return response.headers


def test_provides_imiddleware():
    assert verifyObject(IMiddleware, build())


# -- Preflight ----------------------------------------------------------------


def test_preflight_is_answered_with_204_and_cors_headers():
    mw = build(allowed_origins=[VIEWER], allowed_methods=["GET", "PUT"], max_age=600)
    response = mw.request(preflight(headers="Content-Type, Authorization"))
    assert isinstance(response, ResponseEnvelope)
    assert response.status == 204
    assert not response.body
    h = response.headers
    assert h.get("Access-Control-Allow-Origin") == VIEWER
    assert h.get("Access-Control-Allow-Methods") == "GET, PUT"
    assert h.get("Access-Control-Allow-Headers") == "content-type, authorization"
    assert h.get("Access-Control-Max-Age") == "600"
    assert "Access-Control-Allow-Credentials" not in h
    assert h.get("Vary") == "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def test_preflight_with_any_origin_answers_star():
    response = build().request(preflight(origin="https://anywhere.example"))
    assert response.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Allow-Headers" not in response.headers
    assert "Access-Control-Max-Age" not in response.headers
    assert response.headers.get("Vary") == "Access-Control-Request-Method, Access-Control-Request-Headers"


def test_preflight_with_credentials_echoes_the_origin():
    mw = build(allowed_origins=[VIEWER], allow_credentials=True)
    h = mw.request(preflight()).headers
    assert h.get("Access-Control-Allow-Origin") == VIEWER
    assert h.get("Access-Control-Allow-Credentials") == "true"


def test_preflight_from_disallowed_origin_is_403():
    mw = build(allowed_origins=[VIEWER])
    with pytest.raises(Forbidden) as info:
        mw.request(preflight(origin="https://evil.example"))
    assert "origin not allowed" in info.value.message


def test_preflight_for_disallowed_method_or_header_is_403():
    mw = build(allowed_methods=["GET"], allowed_headers=["authorization"])
    with pytest.raises(Forbidden, match="method not allowed"):
        mw.request(preflight(method="DELETE"))
    with pytest.raises(Forbidden, match="header not allowed"):
        mw.request(preflight(method="GET", headers="authorization, x-secret"))
    # Safelisted headers need not be listed; names are case-insensitive.
    response = mw.request(preflight(method="GET", headers="Accept, Authorization"))
    assert response.headers.get("Access-Control-Allow-Headers") == "accept, authorization"


def test_preflight_through_the_executor_skips_the_backend_and_keeps_204():
    backend = FakeBackend()
    executor = PipelineExecutor("p", [build(allowed_origins=[VIEWER])], [], [backend])
    response = result_of(executor.execute(FakeEndpoint(), preflight()))
    assert response.status == 204
    assert backend.calls == []
    response = result_of(executor.execute(FakeEndpoint(), preflight(origin="https://evil.example")))
    assert response.status == 403
    assert json.loads(response.body)["error"] == "forbidden"
    assert "Access-Control-Allow-Origin" not in response.headers


def test_options_without_request_method_is_not_a_preflight():
    mw = build(allowed_origins=[VIEWER])
    envelope = make_request("OPTIONS", "x", headers=[("Origin", VIEWER)])
    assert mw.request(envelope) is None
    assert mw.request(make_request("OPTIONS", "x", headers=[("Access-Control-Request-Method", "GET")])) is None


# -- Actual requests ---------------------------------------------------------------


def test_actual_response_gets_allow_origin_and_vary():
    mw = build(allowed_origins=[VIEWER, "http://localhost:3000"], expose_headers=["Location", "ETag"])
    h = actual(mw)
    assert h.get("Access-Control-Allow-Origin") == VIEWER
    assert h.get("Access-Control-Expose-Headers") == "Location, ETag"
    assert h.get("Vary") == "Origin"
    assert actual(mw, origin="http://localhost:3000").get("Access-Control-Allow-Origin") == "http://localhost:3000"


def test_actual_response_for_disallowed_or_missing_origin_has_only_vary():
    mw = build(allowed_origins=[VIEWER])
    for origin in ("https://evil.example", None, "null"):
        h = actual(mw, origin=origin, response_headers=[("Access-Control-Allow-Origin", "*")])
        assert "Access-Control-Allow-Origin" not in h
        assert h.get("Vary") == "Origin"


def test_any_origin_without_credentials_is_star_without_vary():
    h = actual(build(), origin="https://anywhere.example")
    assert h.get("Access-Control-Allow-Origin") == "*"
    assert "Vary" not in h


def test_credentials_on_actual_response():
    h = actual(build(allowed_origins=[VIEWER], allow_credentials=True))
    assert h.get("Access-Control-Allow-Credentials") == "true"
    assert h.get("Access-Control-Allow-Origin") == VIEWER


def test_backend_cors_headers_are_replaced_and_vary_merged():
    mw = build(allowed_origins=[VIEWER])
    h = actual(
        mw,
        response_headers=[
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Accept-Encoding"),
        ],
    )
    assert h.get_all("Access-Control-Allow-Origin") == [VIEWER]
    assert "Access-Control-Allow-Credentials" not in h
    assert h.get("Vary") == "Accept-Encoding, Origin"


def test_origin_comparison_ignores_case_and_default_ports():
    mw = build(allowed_origins=["HTTPS://Viewer.Example.org:443"])
    assert actual(mw, origin=VIEWER).get("Access-Control-Allow-Origin") == VIEWER
    assert "Access-Control-Allow-Origin" not in actual(mw, origin="https://viewer.example.org:8443")
    assert "Access-Control-Allow-Origin" not in actual(mw, origin="http://viewer.example.org")


# -- The reusable core ------------------------------------------------------------------


def test_policy_is_usable_without_envelopes():
    policy = CorsPolicy(allowed_origins=[VIEWER], allowed_methods=["GET"], max_age=60)
    assert CorsPolicy.is_preflight("options", VIEWER, "GET")
    assert not CorsPolicy.is_preflight("GET", VIEWER, "GET")
    assert policy.preflight_headers(VIEWER, "get") == [
        ("Access-Control-Allow-Origin", VIEWER),
        ("Access-Control-Allow-Methods", "GET"),
        ("Access-Control-Max-Age", "60"),
    ]
    assert policy.response_headers(VIEWER) == [("Access-Control-Allow-Origin", VIEWER)]
    assert policy.response_headers("https://other.example") == []
    assert policy.preflight_vary()[0] == "Origin"
    with pytest.raises(ValueError):
        CorsPolicy(allowed_origins=["*"], allow_credentials=True)


def test_add_vary():
    h = Headers([("Vary", "accept-encoding, origin")])
    add_vary(h, "Origin", "Accept")
    assert h.get_all("Vary") == ["accept-encoding, origin, Accept"]
    h = Headers([("Vary", "*")])
    add_vary(h, "Origin")
    assert h.get("Vary") == "*"


def test_normalize_origin():
    assert normalize_origin("HTTP://A.org:80") == "http://a.org"
    assert normalize_origin("http://[::1]:8080") == "http://[::1]:8080"
    assert normalize_origin("capacitor://localhost") == "capacitor://localhost"
    for bad in ("null", "https://a.org/", "https://a.org/path", "a.org", "https://a.org:99999", "https://u@a.org"):
        assert normalize_origin(bad) is None


# -- Configuration errors -------------------------------------------------------------


def test_defaults():
    o = options()
    assert o.allowed_origins == ("*",)
    assert o.allowed_methods == ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    assert o.allowed_headers == ("*",)
    assert o.expose_headers == ()
    assert o.max_age is None
    assert o.allow_credentials is False


def test_credentials_forbid_star_origin():
    assert error(allow_credentials=True) == (
        "p.toml: middleware.cors.options.allowed_origins: '*' cannot be used with allow_credentials = true: "
        "list the allowed origins"
    )
    assert error(allowed_origins=[VIEWER], allow_credentials=True, expose_headers=["*"]).endswith(
        "expose_headers: '*' is not a wildcard for credentialed requests: list the headers"
    )


def test_star_must_be_alone():
    assert error(allowed_origins=["*", VIEWER]).endswith("allowed_origins: '*' allows every origin: list it alone")


def test_origins_must_be_origins():
    for bad in ("https://a.org/", "viewer.example.org", "null", "https://a.org/app"):
        message = error(allowed_origins=[VIEWER, bad])
        assert message.startswith("p.toml: middleware.cors.options.allowed_origins.1: ")
        assert "is not an origin" in message
    assert error(allowed_origins=[""]).endswith("allowed_origins.0: must not be empty")
    assert error(allowed_origins=[]).endswith("allowed_origins: at least one origin (or '*') is required")
    assert error(allowed_origins=VIEWER).endswith(f'allowed_origins: expected array of string, got "{VIEWER}"')


def test_duplicate_origins():
    assert error(allowed_origins=[VIEWER, "https://VIEWER.example.org:443"]).endswith(
        f"allowed_origins.1: 'https://VIEWER.example.org:443' is the same origin as '{VIEWER}'"
    )


def test_bad_methods_and_headers():
    assert error(allowed_methods=[]).endswith("allowed_methods: at least one method is required")
    assert error(allowed_methods=["GET", "GET"]).endswith('allowed_methods.1: "GET" is listed twice')
    assert error(allowed_methods=["G T"]).endswith("allowed_methods.0: 'G T' is not a valid method")
    assert error(allowed_headers=["x y"]).endswith("allowed_headers.0: 'x y' is not a valid header name")
    assert error(expose_headers=["a:b"]).endswith("expose_headers.0: 'a:b' is not a valid header name")


def test_bad_max_age_and_credentials():
    assert error(max_age=-1).endswith("max_age: must be at least 0, got -1")
    assert error(max_age=86401).endswith("max_age: must be at most 86400, got 86401")
    assert error(max_age="600").endswith('max_age: expected integer, got "600"')
    assert error(allow_credentials="yes").endswith('allow_credentials: expected boolean, got "yes"')


def test_unknown_option():
    assert error(origins=["*"]).startswith('p.toml: middleware.cors.options.origins: unknown key "origins"')


# -- Loaded from TOML -----------------------------------------------------------------------


def _registry():
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType("cors", CorsMiddleware, OPTIONS))
    return registry


def test_used_by_type_name_with_defaults(tmp_path):
    config = load(tmp_path, PROXY + NETWORK, {"p.toml": pipeline("p", middleware=["cors"])}, registry=_registry())
    mw = CorsMiddleware("cors", config.middleware["cors"].options)
    assert mw.policy.any_origin


def test_toml_error_names_file_and_key(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["c"])
        + """
[middleware.c]
type = "cors"
[middleware.c.options]
allow_credentials = true
"""
    }
    e = load_error(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert str(e).startswith("pipelines/p.toml: middleware.c.options.allowed_origins: '*' cannot be used")
