"""
Tests for the C{fhir} endpoint (L{harmony.endpoints.fhir}): the FHIR URL
grammar, C{_format}, OperationOutcome rendering of every typed error, the
outgoing hook and the service type.
"""

import json

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error
from _fakes import FakeBackend, RecordingMiddleware, make_request
from harmony.config.schema import Where
from harmony.endpoints import fhir
from harmony.endpoints.fhir import OPTIONS, SERVICE_TYPE, FhirEndpoint, classify
from harmony.envelope import ResponseEnvelope
from harmony.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from harmony.http.routing import ALL_METHODS
from harmony.interfaces import IEndpoint, IServiceType
from harmony.pipeline import PipelineExecutor
from harmony.registry import BuildContext, Registry, builtin_registry
from harmony.streams import Stream


def endpoint(prefix="/fhir", reactor=None):
    options = OPTIONS.validate({"path_prefix": prefix}, Where("test.toml", ("endpoints", "fhir", "options")))
    ep = FhirEndpoint("fhir", options, BuildContext(reactor=reactor))
    verifyObject(IEndpoint, ep)
    return ep


def fhir_request(method, path, query=None, headers=(), body=b"", base_url="http://gw.test:8080", prefix="/fhir"):
    query = query or {}
    qs = "&".join(f"{k}={v}" for k, vs in query.items() for v in vs)
    return make_request(
        method,
        path,
        headers=headers,
        body=body,
        query=query,
        query_string=qs,
        base_url=base_url,
        prefix=prefix,
        full_path=prefix + "/" + path,
    )


def outcome(response):
    assert response.headers.get("content-type") == "application/fhir+json; charset=utf-8"
    value = json.loads(response.body)
    assert value["resourceType"] == "OperationOutcome"
    assert len(value["issue"]) == 1
    assert value["issue"][0]["severity"] == "error"
    return value


# -- the URL grammar --------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, query, expected",
    [
        ("GET", "", {"_type": ["Patient"]}, {"fhir_interaction": "search-system"}),
        ("POST", "", {}, {"fhir_interaction": "batch"}),
        ("GET", "metadata", {}, {"fhir_interaction": "capabilities"}),
        ("HEAD", "metadata", {}, {"fhir_interaction": "capabilities"}),
        ("GET", "_history", {}, {"fhir_interaction": "history-system"}),
        ("POST", "_search", {}, {"fhir_interaction": "search-system"}),
        ("POST", "$reindex", {}, {"fhir_interaction": "operation", "fhir_operation": "$reindex"}),
        ("GET", "%24meta", {}, {"fhir_interaction": "operation", "fhir_operation": "$meta"}),
        ("GET", "Patient", {}, {"fhir_interaction": "search-type", "fhir_resource_type": "Patient"}),
        ("GET", "Patient/", {}, {"fhir_interaction": "search-type", "fhir_resource_type": "Patient"}),
        ("POST", "Patient", {}, {"fhir_interaction": "create", "fhir_resource_type": "Patient"}),
        ("POST", "Patient/_search", {}, {"fhir_interaction": "search-type", "fhir_resource_type": "Patient"}),
        (
            "PUT",
            "Patient",
            {"identifier": ["a|b"]},
            {"fhir_interaction": "conditional-update", "fhir_resource_type": "Patient"},
        ),
        (
            "PATCH",
            "Patient",
            {"identifier": ["a|b"]},
            {"fhir_interaction": "conditional-patch", "fhir_resource_type": "Patient"},
        ),
        (
            "DELETE",
            "Observation",
            {"code": ["x"], "_format": ["json"]},
            {"fhir_interaction": "conditional-delete", "fhir_resource_type": "Observation"},
        ),
        ("GET", "Patient/_history", {}, {"fhir_interaction": "history-type", "fhir_resource_type": "Patient"}),
        (
            "POST",
            "Patient/$match",
            {},
            {"fhir_interaction": "operation", "fhir_resource_type": "Patient", "fhir_operation": "$match"},
        ),
        ("GET", "Patient/p-1.2", {}, {"fhir_interaction": "read", "fhir_resource_type": "Patient", "fhir_id": "p-1.2"}),
        ("HEAD", "Patient/1", {}, {"fhir_interaction": "read", "fhir_resource_type": "Patient", "fhir_id": "1"}),
        ("PUT", "Patient/1", {}, {"fhir_interaction": "update", "fhir_resource_type": "Patient", "fhir_id": "1"}),
        ("PATCH", "Patient/1", {}, {"fhir_interaction": "patch", "fhir_resource_type": "Patient", "fhir_id": "1"}),
        ("DELETE", "Patient/1", {}, {"fhir_interaction": "delete", "fhir_resource_type": "Patient", "fhir_id": "1"}),
        (
            "GET",
            "Patient/1/_history",
            {},
            {"fhir_interaction": "history-instance", "fhir_resource_type": "Patient", "fhir_id": "1"},
        ),
        (
            "GET",
            "Patient/1/_history/7",
            {},
            {"fhir_interaction": "vread", "fhir_resource_type": "Patient", "fhir_id": "1", "fhir_version_id": "7"},
        ),
        (
            "GET",
            "Patient/1/$everything",
            {},
            {
                "fhir_interaction": "operation",
                "fhir_resource_type": "Patient",
                "fhir_id": "1",
                "fhir_operation": "$everything",
            },
        ),
        (
            "POST",
            "Patient/1/_history/2/$meta-add",
            {},
            {
                "fhir_interaction": "operation",
                "fhir_resource_type": "Patient",
                "fhir_id": "1",
                "fhir_version_id": "2",
                "fhir_operation": "$meta-add",
            },
        ),
        (
            "GET",
            "Patient/1/Observation",
            {},
            {
                "fhir_interaction": "search-compartment",
                "fhir_resource_type": "Patient",
                "fhir_id": "1",
                "fhir_compartment": "Observation",
            },
        ),
        (
            "GET",
            "Patient/1/*",
            {},
            {
                "fhir_interaction": "search-compartment",
                "fhir_resource_type": "Patient",
                "fhir_id": "1",
                "fhir_compartment": "*",
            },
        ),
        (
            "POST",
            "Patient/1/Observation/_search",
            {},
            {
                "fhir_interaction": "search-compartment",
                "fhir_resource_type": "Patient",
                "fhir_id": "1",
                "fhir_compartment": "Observation",
            },
        ),
        ("OPTIONS", "Patient/1", {}, {"fhir_interaction": "options", "fhir_resource_type": "Patient", "fhir_id": "1"}),
        ("OPTIONS", "", {}, {"fhir_interaction": "options"}),
    ],
)
def test_grammar(method, path, query, expected):
    env = fhir_request(method, path, query)
    assert endpoint().incoming(env) is None
    assert {k: v for k, v in env.metadata.items() if k.startswith("fhir_")} == expected


@pytest.mark.parametrize(
    "path",
    [
        "patient/1",  # type names start upper-case
        "Pat1ent",
        "P",
        "Patient/a_b",
        "Patient/a%20b",
        "Patient/" + "a" * 65,
        "Patient/1/_history/v_1",
        "Patient/1/observation",
        "Patient/$bad op",
        "$",
    ],
)
def test_malformed_segments_are_400(path):
    with pytest.raises(BadRequest):
        endpoint().incoming(fhir_request("GET", path))


def test_id_of_64_characters_is_valid():
    env = fhir_request("GET", "Patient/" + "a" * 64)
    endpoint().incoming(env)
    assert env.metadata["fhir_id"] == "a" * 64


@pytest.mark.parametrize(
    "path",
    [
        "Patient/1/_history/2/x",
        "Patient/1/$op/x",
        "Patient/1/Observation/x",
        "Patient//1",
        "Patient/1/Observation/_search/x",
    ],
)
def test_unknown_shapes_are_404(path):
    with pytest.raises(NotFound):
        endpoint().incoming(fhir_request("GET", path))


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("DELETE", "", ["GET", "HEAD", "OPTIONS", "POST"]),
        ("POST", "metadata", ["GET", "HEAD", "OPTIONS"]),
        ("PUT", "_history", ["GET", "HEAD", "OPTIONS"]),
        ("GET", "_search", ["OPTIONS", "POST"]),
        ("GET", "Patient/_search", ["OPTIONS", "POST"]),
        ("POST", "Patient/1", ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "PUT"]),
        ("DELETE", "Patient/1/_history", ["GET", "HEAD", "OPTIONS"]),
        ("PUT", "Patient/1/_history/2", ["GET", "HEAD", "OPTIONS"]),
        ("DELETE", "Patient/$op", ["GET", "HEAD", "OPTIONS", "POST"]),
        ("POST", "Patient/1/Observation", ["GET", "HEAD", "OPTIONS"]),
    ],
)
def test_wrong_method_is_405_with_allow(method, path, allowed):
    with pytest.raises(MethodNotAllowed) as info:
        endpoint().incoming(fhir_request(method, path))
    assert list(info.value.allowed) == allowed
    response = endpoint().render_error(info.value)
    assert response.status == 405
    assert response.headers.get("allow") == ", ".join(allowed)
    assert outcome(response)["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_conditional_forms_need_search_parameters(method):
    with pytest.raises(BadRequest) as info:
        endpoint().incoming(fhir_request(method, "Patient", {"_format": ["json"]}))
    assert "search parameters" in info.value.message


def test_classify_without_an_envelope():
    request = classify("GET", "Observation/o1/_history/v2", {})
    assert (request.interaction, request.resource_type, request.id, request.version_id) == (
        "vread",
        "Observation",
        "o1",
        "v2",
    )


# -- _format and search bodies -------------------------------------------------------


@pytest.mark.parametrize(
    "value, accept",
    [
        ("json", "application/fhir+json"),
        ("application/json", "application/fhir+json"),
        ("application/fhir json", "application/fhir+json"),  # "+" decoded as a space
        ("application/fhir+json", "application/fhir+json"),
        ("xml", "application/fhir+xml"),
        ("text/xml", "application/fhir+xml"),
        ("application/fhir+xml", "application/fhir+xml"),
        ("ttl", "application/fhir+turtle"),
        ("html", "text/html"),
        ("application/x-custom", "application/x-custom"),
    ],
)
def test_format_becomes_accept(value, accept):
    env = fhir_request("GET", "Patient/1", {"_format": [value]}, headers=[("Accept", "text/plain")])
    endpoint().incoming(env)
    assert env.details.headers.get_all("accept") == [accept]
    assert env.details.query["_format"] == [value]  # forwarded too


def test_unknown_format_is_400():
    with pytest.raises(BadRequest) as info:
        endpoint().incoming(fhir_request("GET", "Patient", {"_format": ["yaml"]}))
    assert "_format" in info.value.message


def test_accept_untouched_without_format():
    env = fhir_request("GET", "Patient/1", headers=[("Accept", "application/fhir+xml")])
    endpoint().incoming(env)
    assert env.details.headers.get_all("accept") == ["application/fhir+xml"]


@pytest.mark.parametrize("path", ["_search", "Patient/_search", "Patient/1/Observation/_search"])
def test_search_body_must_be_a_form(path):
    ep = endpoint()
    ok = fhir_request("POST", path, headers=[("Content-Type", "application/x-www-form-urlencoded")], body=b"name=x")
    ep.incoming(ok)
    ep.incoming(fhir_request("POST", path, body=b""))  # no body: nothing to check
    with pytest.raises(UnsupportedMediaType):
        ep.incoming(fhir_request("POST", path, headers=[("Content-Type", "application/json")], body=b"{}"))
    with pytest.raises(UnsupportedMediaType):
        ep.incoming(fhir_request("POST", path, body=Stream(length=None)))


def test_create_body_is_not_checked_by_the_endpoint():
    # Content types of resources are the FHIR backend's business.
    env = fhir_request("POST", "Binary", headers=[("Content-Type", "image/png")], body=b"\x89PNG")
    assert endpoint().incoming(env) is None


def test_routes_claim_the_whole_prefix():
    [route] = endpoint("/fhir/r4/").http_routes()
    assert route.prefix == "/fhir/r4"
    assert route.match is None
    assert route.methods == ALL_METHODS


# -- OperationOutcome rendering ----------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, code",
    [
        (BadRequest("Malformed JSON body"), 400, "invalid"),
        (Unauthorized(headers=[("WWW-Authenticate", 'Bearer error="invalid_token"')]), 401, "security"),
        (Forbidden(), 403, "security"),
        (NotFound(), 404, "not-found"),
        (MethodNotAllowed(["GET"]), 405, "not-supported"),
        (PayloadTooLarge(), 413, "too-costly"),
        (UnsupportedMediaType(), 415, "not-supported"),
        (InternalError(), 500, "exception"),
        (UpstreamUnavailable(), 502, "transient"),
        (ServiceUnavailable(), 503, "transient"),
        (UpstreamTimeout(), 504, "timeout"),
    ],
)
def test_render_error(error, status, code):
    response = endpoint().render_error(error)
    assert response.status == status
    value = outcome(response)
    issue = value["issue"][0]
    assert issue["code"] == code
    assert issue["details"]["text"] == error.message
    assert issue["diagnostics"] == error.message
    for name, header in error.headers:
        assert response.headers.get(name) == header
    assert response.normalized == value


def test_issue_codes_for_other_statuses():
    assert fhir.issue_code(409) == "conflict"
    assert fhir.issue_code(410) == "deleted"
    assert fhir.issue_code(418) == "processing"
    assert fhir.issue_code(599) == "exception"


class _Recording(RecordingMiddleware):
    pass


def run(ep, env, backend=None, middleware=()):
    executor = PipelineExecutor("p", list(middleware), list(reversed(middleware)), [backend or FakeBackend()])
    results = []
    executor.execute(ep, env).addBoth(results.append)
    [response] = results
    return response


def test_typed_errors_through_the_pipeline_are_operation_outcomes():
    ep = endpoint()
    log = []

    def deny(envelope):
        raise Unauthorized("Token expired", headers=[("WWW-Authenticate", 'Bearer error="invalid_token"')])

    auth = _Recording("auth", log, on_request=deny)
    response = run(ep, fhir_request("GET", "Patient/1"), middleware=[auth])
    assert response.status == 401
    assert outcome(response)["issue"][0]["code"] == "security"
    assert response.headers.get("www-authenticate") == 'Bearer error="invalid_token"'

    response = run(ep, fhir_request("GET", "Patient/1"), backend=FakeBackend(result=UpstreamTimeout()))
    assert response.status == 504
    assert outcome(response)["issue"][0]["code"] == "timeout"

    backend = FakeBackend()
    response = run(ep, fhir_request("GET", "patient/1"), backend=backend)
    assert response.status == 400
    assert outcome(response)["issue"][0]["code"] == "invalid"
    assert backend.calls == []  # refused before the pipeline


# -- outgoing ------------------------------------------------------------------------------


def test_metadata_passes_through():
    upstream = ResponseEnvelope.json(200, {"resourceType": "CapabilityStatement"}, content_type="application/fhir+json")
    response = run(endpoint(), fhir_request("GET", "metadata"), backend=FakeBackend(result=upstream))
    assert response is upstream


@pytest.mark.parametrize("status", [404, 405, 501])
def test_own_capability_statement_when_the_backend_has_none(status):
    clock = Clock()
    clock.advance(86400 * 365)
    upstream = ResponseEnvelope(status=status, body=b"no such thing")
    env = fhir_request("GET", "metadata", base_url="https://gw.example.org", prefix="/fhir/r4")
    response = run(endpoint("/fhir/r4", reactor=clock), env, backend=FakeBackend(result=upstream))
    assert response.status == 200
    assert response.headers.get("content-type") == "application/fhir+json; charset=utf-8"
    statement = json.loads(response.body)
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["kind"] == "instance"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["date"] == "1971-01-01T00:00:00Z"
    assert statement["implementation"]["url"] == "https://gw.example.org/fhir/r4"
    assert statement["software"]["name"] == "Harmony"


def test_other_404s_are_not_replaced():
    upstream = ResponseEnvelope.json(
        404, {"resourceType": "OperationOutcome", "id": "x"}, content_type="application/fhir+json"
    )
    response = run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=upstream))
    assert response is upstream


def test_upstream_error_bodies_pass_untouched():
    html = ResponseEnvelope(status=500, headers=[("Content-Type", "text/html")], body=b"<h1>oops</h1>")
    assert run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=html)) is html
    stream = ResponseEnvelope(status=502, headers=[("Content-Type", "application/json")], body=Stream(length=None))
    assert run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=stream)) is stream
    other_json = ResponseEnvelope.json(400, {"error": 1})  # not Harmony's shape
    assert run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=other_json)) is other_json


def test_empty_error_response_becomes_an_outcome():
    upstream = ResponseEnvelope(status=403, headers=[("X-Request-Id", "r1"), ("Content-Length", "0")], body=b"")
    response = run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=upstream))
    assert response.status == 403
    assert outcome(response)["issue"][0]["code"] == "security"
    assert response.headers.get("x-request-id") == "r1"
    assert response.headers.get("content-length") is None


def test_harmony_json_error_from_a_short_circuit_becomes_an_outcome():
    short = ResponseEnvelope.json(
        401,
        {"error": "unauthorized", "message": "Missing credentials"},
        headers=[("WWW-Authenticate", "Basic realm=x")],
    )
    log = []
    mw = _Recording("basic", log, on_request=lambda env: short)
    backend = FakeBackend()
    response = run(endpoint(), fhir_request("GET", "Patient/1"), backend=backend, middleware=[mw])
    assert backend.calls == []
    assert response.status == 401
    value = outcome(response)
    assert value["issue"][0]["code"] == "security"
    assert value["issue"][0]["details"]["text"] == "Missing credentials"
    assert response.headers.get("www-authenticate") == "Basic realm=x"


def test_missing_content_type_defaults_to_fhir_json():
    upstream = ResponseEnvelope(status=200, body=b'{"resourceType":"Patient"}')
    response = run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=upstream))
    assert response.headers.get("content-type") == "application/fhir+json; charset=utf-8"
    xml = ResponseEnvelope(status=200, headers=[("Content-Type", "application/fhir+xml")], body=b"<Patient/>")
    response = run(endpoint(), fhir_request("GET", "Patient/1"), backend=FakeBackend(result=xml))
    assert response.headers.get_all("content-type") == ["application/fhir+xml"]
    assert response.body == b"<Patient/>"


# -- the service type ------------------------------------------------------------------


def test_service_type():
    verifyObject(IServiceType, SERVICE_TYPE)
    assert SERVICE_TYPE.name == "fhir"
    registry = Registry()
    assert registry.load("service", "fhir", "harmony.endpoints.fhir:SERVICE_TYPE") is SERVICE_TYPE
    assert registry.service("fhir", "endpoint") is SERVICE_TYPE


FHIR_PIPELINE = """
[services.fhir]
module = "harmony.endpoints.fhir:SERVICE_TYPE"

[pipelines.fhir]
networks = ["main"]
endpoints = ["fhir_in"]
backends = ["fhir_out"]

[endpoints.fhir_in]
service = "fhir"
[endpoints.fhir_in.options]
path_prefix = "/fhir"

[backends.fhir_out]
service = "fhir"
[backends.fhir_out.options]
base_url = "http://fhir.internal:8080/fhir/R4"
upstream_base_urls = ["https://fhir.example.org/R4"]
"""


def test_config_with_the_legacy_services_table(tmp_path):
    config = load(tmp_path, PROXY + NETWORK + FHIR_PIPELINE)
    assert config.endpoints["fhir_in"].service == "fhir"
    assert config.endpoints["fhir_in"].options.path_prefix == "/fhir"
    assert config.endpoints["fhir_in"].options.max_body_size is None  # the proxy's limit
    bigger = FHIR_PIPELINE.replace('path_prefix = "/fhir"', 'path_prefix = "/fhir"\nmax_body_size = 104857600')
    config = load(tmp_path, PROXY + NETWORK + bigger)
    assert config.endpoints["fhir_in"].options.max_body_size == 104857600
    backend = config.backends["fhir_out"].options
    assert backend.base_url == "http://fhir.internal:8080/fhir/R4"
    assert backend.upstream_base_urls == ("https://fhir.example.org/R4",)
    assert backend.timeout_secs == 30.0
    assert backend.max_rewrite_size == 32 * 1024 * 1024


def test_config_errors(tmp_path):
    error = load_error(
        tmp_path, PROXY + NETWORK + FHIR_PIPELINE.replace('path_prefix = "/fhir"', 'path_prefx = "/fhir"')
    )
    assert "path_prefx" in str(error)
    error = load_error(tmp_path, PROXY + NETWORK + FHIR_PIPELINE.replace('"https://fhir.example.org/R4"', '"ftp://x"'))
    assert "upstream_base_urls" in str(error)


def test_builtin_registry_without_fhir_still_loads_it_from_config(tmp_path):
    # Until the built-in registry lists "fhir", the legacy table loads it.
    registry = builtin_registry()
    load(tmp_path, PROXY + NETWORK + FHIR_PIPELINE, registry=registry)
    assert registry.service("fhir") is SERVICE_TYPE
