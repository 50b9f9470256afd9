"""
json_extractor: the JSON path subset, values copied into metadata and
target details, missing values skipped or answered with 400, and every
config error.
"""

import json

import pytest
from _deferreds import failure_of, result_of
from twisted.internet import defer
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error, pipeline
from _fakes import FakeBackend, FakeEndpoint, make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.errors import BadRequest, PayloadTooLarge
from harmony.http.bodies import ContentLimits
from harmony.interfaces import IMiddleware
from harmony.middleware.json_extractor import OPTIONS, JsonExtractor, JsonPath, render
from harmony.pipeline import PipelineExecutor
from harmony.registry import MiddlewareType, builtin_registry
from harmony.streams import Stream

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "subject": {"reference": "Patient/p1"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}, {"code": "9"}]},
    "valueQuantity": {"value": 7.5, "unit": "mmol/L"},
    "issued": None,
    "flags": [True, False],
    "a.b": {"c": 1},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Brown^Jane"}]},
    "entry": [{"resource": {"id": "e1"}}, {"resource": {"id": "e2"}}, {"other": 1}],
}
BODY = json.dumps(OBSERVATION).encode()


def options(**values):
    return OPTIONS.validate(values, Where("p.toml", ("middleware", "json", "options")))


def build(context=None, **values):
    return JsonExtractor("json", options(**values), context)


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return str(info.value)


def request(body=BODY, content_type="application/fhir+json"):
    headers = [("Content-Type", content_type)] if content_type else []
    return make_request("POST", "Observation", headers=headers, body=body)


def run(mw, envelope):
    result = mw.request(envelope)
    if isinstance(result, defer.Deferred):
        result = result_of(result)
    assert result is None
    return envelope


def find(path, doc=OBSERVATION):
    return JsonPath(path).find(doc)


# -- Paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, values",
    [
        ("status", ["final"]),
        ("$.status", ["final"]),
        ("subject.reference", ["Patient/p1"]),
        ("$['subject'][\"reference\"]", ["Patient/p1"]),
        ("code.coding[0].code", ["1234-5"]),
        ("code.coding[-1].code", ["9"]),
        ("code.coding[5].code", []),
        ("code.coding.0.code", ["1234-5"]),
        ("code.coding[*].code", ["1234-5", "9"]),
        ("code.coding.code", ["1234-5", "9"]),
        ("code.coding.*.system", ["http://loinc.org"]),
        ("valueQuantity.*", [7.5, "mmol/L"]),
        ("['a.b'].c", [1]),
        ("00100010.Value.0.Alphabetic", ["Brown^Jane"]),
        ("entry.resource.id", ["e1", "e2"]),
        ("missing.deeper", []),
        ("status.deeper", []),
        ("flags[1]", [False]),
        ("$", [OBSERVATION]),
    ],
)
def test_path_find(path, values):
    assert find(path) == values


def test_index_on_an_object_and_name_on_a_scalar_select_nothing():
    assert find("subject[0]") == []
    assert find("status[0]") == []
    assert find("[0]", [1, 2]) == [1]


@pytest.mark.parametrize(
    "path", ["", " a", "a ", "a..b", "a.", "$.", "$x", "a[", "a[x]", "a[1.5]", "a*", "*a", "a]b", "a['']", "a[0]b"]
)
def test_malformed_paths(path):
    with pytest.raises(ValueError):
        JsonPath(path)


def test_render():
    assert render("x") == "x"
    assert render(True) == "true"
    assert render(7.5) == "7.5"
    assert render({"a": [1, "\u00e9"]}) == '{"a":[1,"\u00e9"]}'


# -- Extraction ------------------------------------------------------------------


def test_provides_imiddleware_and_does_nothing_without_rules():
    mw = build()
    assert verifyObject(IMiddleware, mw)
    envelope = request()
    assert mw.request(envelope) is None
    assert not envelope.parsed
    assert mw.response(envelope, None) is None


def test_values_copied_into_metadata():
    mw = build(
        metadata={
            "patient_ref": "subject.reference",
            "value": "valueQuantity.value",
            "final": "flags[0]",
            "quantity": "valueQuantity",
            "codes": "code.coding[*].code",
            "first_code": "code.coding[0].code",
            "ids": "entry.resource.id",
        }
    )
    envelope = run(mw, request())
    assert envelope.metadata == {
        "patient_ref": "Patient/p1",
        "value": "7.5",
        "final": "true",
        "quantity": '{"value":7.5,"unit":"mmol/L"}',
        "codes": '["1234-5","9"]',
        "first_code": "1234-5",
        "ids": '["e1","e2"]',
    }
    # The body is untouched for the backend.
    assert envelope.body == BODY


def test_multi_value_paths_give_an_array_even_with_one_match():
    mw = build(metadata={"codes": "code.coding[*].code"})
    body = json.dumps({"code": {"coding": [{"code": "only"}]}}).encode()
    assert run(mw, request(body)).metadata == {"codes": '["only"]'}


def test_missing_and_null_values_are_skipped_by_default():
    mw = build(metadata={"a": "nope", "b": "issued", "c": "status"})
    assert run(mw, request()).metadata == {"c": "final"}


@pytest.mark.parametrize("path", ["nope", "issued", "code.coding[*].nothing"])
def test_missing_value_is_400_with_on_missing_error(path):
    mw = build(metadata={"ok": "status", "x": path}, on_missing="error")
    envelope = request()
    f = failure_of(mw.request(envelope), BadRequest)
    assert f.value.message == f"Required JSON value missing: {path}"
    assert envelope.metadata == {}


def test_non_json_and_empty_bodies_have_no_values():
    mw = build(metadata={"s": "status"})
    envelope = run(mw, request(b"<status>final</status>", "application/xml"))
    assert envelope.metadata == {}
    assert not envelope.parsed
    assert run(mw, request(b"")).metadata == {}
    strict = build(metadata={"s": "status"}, on_missing="error")
    assert failure_of(strict.request(request(b"")), BadRequest).value.message == "Required JSON value missing: status"
    failure_of(defer.maybeDeferred(strict.request, request(b"<status>final</status>", "text/xml")), BadRequest)


@pytest.mark.parametrize("on_missing", ["skip", "error"])
def test_malformed_json_is_400_whatever_on_missing_says(on_missing):
    mw = build(metadata={"s": "status"}, on_missing=on_missing)
    envelope = request(b'{"status": "fin')
    assert failure_of(mw.request(envelope), BadRequest).value.message.startswith("Malformed")
    assert envelope.metadata == {}


def test_body_without_content_type_is_json():
    assert run(build(metadata={"s": "status"}), request(content_type=None)).metadata == {"s": "final"}


def test_streamed_body_is_parsed_under_the_envelope_limits_and_kept():
    mw = build(metadata={"s": "status"})
    envelope = run(mw, request(Stream.from_bytes(BODY)))
    assert envelope.metadata == {"s": "final"}
    body = envelope.body
    data = body if isinstance(body, bytes) else b"".join(result_of(defer.Deferred.fromCoroutine(_read(body))))
    assert data == BODY
    envelope = request(Stream.from_bytes(BODY))
    envelope.content_limits = ContentLimits(max_body_size=20)
    failure_of(mw.request(envelope), PayloadTooLarge)


async def _read(stream):
    return [chunk async for chunk in stream]


def test_already_parsed_view_is_used_whatever_the_type():
    mw = build(metadata={"s": "status"})
    envelope = request()
    envelope.normalized = {"status": "amended"}
    assert run(mw, envelope).metadata == {"s": "amended"}
    envelope = request(b"<x/>", "application/xml")
    envelope.normalized = {"status": "from-xml"}
    assert run(mw, envelope).metadata == {"s": "from-xml"}


def test_target_details():
    mw = build(target={"path": "next.path", "method": "next.method", "query_string": "next.query"})
    body = json.dumps({"next": {"path": "Patient/p1/_history", "method": "get", "query": "_count=5"}}).encode()
    assert run(mw, request(body)).target == {"path": "Patient/p1/_history", "method": "GET", "query_string": "_count=5"}


@pytest.mark.parametrize(
    "key, value",
    [
        ("path", "../admin"),
        ("path", "a/%2e%2e/b"),
        ("path", "/abs"),
        ("path", "a?x=1"),
        ("path", "a#f"),
        ("path", "a b"),
        ("path", "a\r\nb"),
        ("query_string", "a=1#frag"),
        ("query_string", "a=\n"),
        ("method", "GET /x"),
        ("method", ""),
    ],
)
def test_unsafe_target_values_are_400(key, value):
    mw = build(metadata={"m": "m"}, target={key: "v"})
    envelope = request(json.dumps({"v": value, "m": "x"}).encode())
    f = failure_of(mw.request(envelope), BadRequest)
    assert f.value.message == f"JSON value at v is not a valid {key}"
    assert envelope.target == {}
    assert envelope.metadata == {}


def test_through_the_executor():
    backend = FakeBackend()
    executor = PipelineExecutor("p", [build(metadata={"ref": "subject.reference"}, on_missing="error")], [], [backend])
    response = result_of(executor.execute(FakeEndpoint(), request()))
    assert response.status == 200
    assert backend.calls[0].metadata["ref"] == "Patient/p1"
    assert backend.bodies == [BODY]
    response = result_of(executor.execute(FakeEndpoint(), request(b"{}")))
    assert response.status == 400
    assert json.loads(response.body) == {"error": "bad_request", "message": "Required JSON value missing: subject.reference"}


# -- Configuration errors -----------------------------------------------------------------


def test_defaults():
    o = options()
    assert dict(o.metadata) == {}
    assert dict(o.target) == {}
    assert o.on_missing == "skip"


def test_bad_paths():
    assert error(metadata={"a": "x..y"}).startswith("p.toml: middleware.json.options.metadata.a: JSON path 'x..y'")
    assert error(target={"path": "["}).startswith("p.toml: middleware.json.options.target.path: JSON path '['")
    assert error(metadata={"a": ""}).endswith("metadata.a: must not be empty")
    assert error(metadata={"a": 1}).endswith("metadata.a: expected string, got 1")
    assert error(metadata=["a"]).endswith("metadata: expected table, got an array")


def test_reserved_and_empty_metadata_keys():
    for key in ("pipeline", "endpoint", "protocol", "request_id"):
        assert error(metadata={key: "a"}).endswith(
            f"metadata.{key}: metadata key {key!r} is set by Harmony and cannot be extracted from a body"
        )
    assert error(metadata={" ": "a"}).endswith("metadata. : metadata key must not be empty")


def test_bad_target_keys():
    assert error(target={"base_url": "a"}).endswith(
        "target.base_url: base_url cannot come from a request body (the client would choose the upstream host)"
    )
    assert error(target={"uri": "a"}).endswith(
        "target.uri: unknown target detail 'uri' (expected one of path, method, query_string)"
    )


def test_bad_on_missing_and_unknown_option():
    assert error(on_missing="fail").endswith('on_missing: expected one of skip, error, got "fail"')
    assert error(extract={}).startswith('p.toml: middleware.json.options.extract: unknown key "extract"')


# -- Loaded from TOML ---------------------------------------------------------------------------


def _registry():
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType("json_extractor", JsonExtractor, OPTIONS))
    return registry


def test_rust_harmony_forms_load(tmp_path):
    """
    The Rust Harmony's json_extractor had no options: used by type name,
    through the "json" alias, or with an empty table.
    """
    pipelines = {
        "p.toml": pipeline("p", middleware=["json_extractor", "json", "ids"])
        + """
[middleware.json_extractor]
type = "json_extractor"

[middleware.ids]
type = "json"
[middleware.ids.options]
metadata = { patient = "$.subject.reference", "dicom.name" = "00100010.Value[0].Alphabetic" }
on_missing = "error"
"""
    }
    config = load(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert config.middleware["ids"].type == "json_extractor"
    mw = JsonExtractor("ids", config.middleware["ids"].options)
    assert run(mw, request()).metadata == {"patient": "Patient/p1", "dicom.name": "Brown^Jane"}


def test_toml_error_names_file_and_key(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["x"])
        + """
[middleware.x]
type = "json_extractor"
[middleware.x.options]
target = { base_url = "upstream" }
"""
    }
    e = load_error(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert str(e).startswith("pipelines/p.toml: middleware.x.options.target.base_url: base_url cannot come")
