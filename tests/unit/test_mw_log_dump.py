"""
log_dump: one structured event per request and per response, header and
metadata redaction, no body unless asked, body field redaction and cap,
streamed bodies, and every config error.
"""

import json

import pytest
from _deferreds import result_of
from twisted.internet import defer
from twisted.logger import Logger, LogLevel, formatEvent
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error, pipeline
from _fakes import FakeBackend, FakeEndpoint, make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.envelope import ResponseEnvelope
from harmony.http.bodies import ContentLimits
from harmony.interfaces import IMiddleware
from harmony.middleware.json_extractor import compile_path
from harmony.middleware.log_dump import OPTIONS, LogDump, redact_json
from harmony.pipeline import PipelineExecutor
from harmony.registry import MiddlewareType, builtin_registry
from harmony.streams import Stream

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Brown", "given": ["Jane"]}],
    "birthDate": "1970-01-01",
    "identifier": [{"system": "urn:mrn", "value": "MRN-42"}],
}
PATIENT_BYTES = json.dumps(PATIENT).encode()


def options(where=None, **values):
    return OPTIONS.validate(values, where or Where("p.toml", ("middleware", "audit", "options")))


def build(**values):
    events = []
    mw = LogDump("audit", options(**values), None, log=Logger(namespace="harmony.dump", observer=events.append))
    return mw, events


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return str(info.value)


def json_request(body=PATIENT_BYTES, headers=(), path="Patient/p1"):
    headers = [("Content-Type", "application/fhir+json")] + list(headers)
    envelope = make_request("POST", path, headers=headers, body=body, full_path="/fhir/" + path)
    envelope.metadata.update({"pipeline": "fhir", "request_id": "r-1"})
    return envelope


def run(mw, envelope, response=None):
    result = mw.request(envelope)
    if isinstance(result, defer.Deferred):
        result = result_of(result)
    assert result is None
    if response is not None:
        result = mw.response(envelope, response)
        if isinstance(result, defer.Deferred):
            result = result_of(result)
        assert result is None


def test_provides_imiddleware():
    mw, _ = build()
    assert verifyObject(IMiddleware, mw)


def test_one_event_per_request_and_response_without_body_by_default():
    mw, events = build()
    response = ResponseEnvelope(
        status=201, headers=[("Content-Type", "application/fhir+json"), ("Location", "/fhir/Patient/p1")],
        body=PATIENT_BYTES,
    )
    run(mw, json_request(headers=[("User-Agent", "curl/8")]), response)
    assert len(events) == 2
    req, resp = events
    assert req["log_namespace"] == "harmony.dump"
    assert req["log_level"] is LogLevel.info
    assert req["side"] == "request"
    assert req["method"] == "POST"
    assert req["path"] == "/fhir/Patient/p1"
    assert req["pipeline"] == "fhir"
    assert req["request_id"] == "r-1"
    assert req["body_size"] == len(PATIENT_BYTES)
    assert req["content_type"] == "application/fhir+json"
    assert req["headers"] == {"content-type": "application/fhir+json", "user-agent": "curl/8"}
    assert "status" not in req
    assert resp["side"] == "response"
    assert resp["status"] == 201
    assert resp["method"] == "POST"
    assert resp["headers"]["location"] == "/fhir/Patient/p1"
    assert resp["body_size"] == len(PATIENT_BYTES)
    for event in events:
        assert "body" not in event
        assert "metadata" not in event
        assert "Brown" not in repr(event)
        assert "MRN-42" not in repr(event)
    assert formatEvent(req) == "log_dump audit: request POST /fhir/Patient/p1"
    assert formatEvent(resp) == "log_dump audit: response 201 to POST /fhir/Patient/p1"


def test_query_string_is_never_logged():
    mw, events = build(include_headers=["*"])
    envelope = make_request("GET", "Patient", full_path="/fhir/Patient?name=Brown", uri="/fhir/Patient?name=Brown")
    run(mw, envelope)
    assert events[0]["path"] == "/fhir/Patient"
    assert "Brown" not in repr(events[0])


def test_sensitive_headers_are_always_redacted():
    mw, events = build(include_headers=["*"])
    envelope = json_request(
        headers=[
            ("Authorization", "Bearer secret-token"),
            ("Proxy-Authorization", "Basic abc"),
            ("Cookie", "session=s1"),
            ("X-Other", "a"),
            ("x-other", "b"),
        ]
    )
    response = ResponseEnvelope(headers=[("Set-Cookie", "session=s2"), ("Set-Cookie", "t=3")])
    run(mw, envelope, response)
    req, resp = events
    assert req["headers"]["authorization"] == "[REDACTED]"
    assert req["headers"]["proxy-authorization"] == "[REDACTED]"
    assert req["headers"]["cookie"] == "[REDACTED]"
    assert req["headers"]["x-other"] == "a, b"
    assert resp["headers"] == {"set-cookie": "[REDACTED]"}
    assert "secret-token" not in repr(events)
    assert "session=" not in repr(events)


def test_configured_headers_are_redacted_and_selection_applies():
    mw, events = build(include_headers=["X-Api-Key", "Authorization", "accept"], redact_headers=["x-api-key"])
    run(mw, json_request(headers=[("X-Api-Key", "k"), ("Authorization", "a"), ("User-Agent", "u"), ("Accept", "*/*")]))
    assert events[0]["headers"] == {"x-api-key": "[REDACTED]", "authorization": "[REDACTED]", "accept": "*/*"}


def test_metadata_only_when_asked_with_redaction():
    mw, events = build(include_metadata=True, redact_metadata=["jwt.sub"])
    envelope = json_request()
    envelope.metadata["jwt.sub"] = "user-1"
    run(mw, envelope, ResponseEnvelope(metadata={"upstream": "a"}))
    assert events[0]["metadata"] == {"pipeline": "fhir", "request_id": "r-1", "jwt.sub": "[REDACTED]"}
    assert events[1]["metadata"]["upstream"] == "a"
    assert events[1]["metadata"]["jwt.sub"] == "[REDACTED]"


@pytest.mark.parametrize("apply, sides", [("left", ["request"]), ("right", ["response"]), ("both", ["request", "response"])])
def test_apply(apply, sides):
    mw, events = build(apply=apply)
    run(mw, json_request(), ResponseEnvelope())
    assert [e["side"] for e in events] == sides


def test_label():
    mw, events = build(label="after_auth")
    run(mw, json_request())
    assert events[0]["label"] == "after_auth"


# -- Bodies ---------------------------------------------------------------------


def test_body_with_field_redaction():
    mw, events = build(include_body=True, redact_body_fields=["name", "identifier.value", "birthDate"])
    run(mw, json_request())
    event = events[0]
    assert event["body_truncated"] is False
    body = json.loads(event["body"])
    assert body["name"] == "[REDACTED]"
    assert body["identifier"] == [{"system": "urn:mrn", "value": "[REDACTED]"}]
    assert body["birthDate"] == "[REDACTED]"
    assert body["id"] == "p1"
    assert "Brown" not in repr(event) and "MRN-42" not in repr(event)


def test_redaction_with_wildcards_and_indexes():
    doc = {"entry": [{"resource": {"name": "a", "id": 1}}, {"resource": {"name": "b", "id": 2}}], "meta": {"x": 1}}
    out = redact_json(doc, [compile_path("entry.*.resource.name"), compile_path("meta.*")])
    assert out == {
        "entry": [{"resource": {"name": "[REDACTED]", "id": 1}}, {"resource": {"name": "[REDACTED]", "id": 2}}],
        "meta": {"x": "[REDACTED]"},
    }
    assert doc["entry"][0]["resource"]["name"] == "a"
    assert redact_json(doc, [compile_path("entry[1].resource")])["entry"][1]["resource"] == "[REDACTED]"
    assert redact_json(doc, [compile_path("$")]) == "[REDACTED]"
    assert redact_json(doc, []) is doc


def test_body_capped_at_max_body_bytes():
    mw, events = build(include_body=True, max_body_bytes=20)
    run(mw, json_request())
    assert events[0]["body_truncated"] is True
    assert len(events[0]["body"].encode()) <= 20


def test_rust_names_max_bytes_and_redact_data_fields():
    mw, events = build(include_body=True, max_bytes=1000, redact_data_fields=["id"])
    run(mw, json_request())
    assert json.loads(events[0]["body"])["id"] == "[REDACTED]"
    assert mw.max_body_bytes == 1000


def test_non_json_empty_and_malformed_bodies_are_omitted():
    mw, events = build(include_body=True)
    run(mw, make_request("POST", "x", headers=[("Content-Type", "application/dicom")], body=b"\x00DICM"))
    run(mw, make_request("POST", "x", headers=[("Content-Type", "application/json")], body=b""))
    run(mw, make_request("POST", "x", headers=[("Content-Type", "application/json")], body=b'{"name": "Bro'))
    assert [(e["body"], e["body_omitted"]) for e in events] == [
        (None, "not JSON"),
        (None, "empty"),
        (None, "malformed JSON"),
    ]
    assert "Bro" not in repr(events)


def test_already_parsed_body_logs_the_normalized_view():
    mw, events = build(include_body=True, redact_body_fields=["secret"])
    envelope = make_request("POST", "x", headers=[("Content-Type", "application/xml")], body=b"<a/>")
    envelope.normalized = {"a": 1, "secret": "s"}
    run(mw, envelope)
    assert json.loads(events[0]["body"]) == {"a": 1, "secret": "[REDACTED]"}


def test_streamed_body_of_known_length_is_read_and_kept_for_the_backend():
    mw, events = build(include_body=True, redact_body_fields=["name"])
    envelope = json_request(body=Stream.from_bytes(PATIENT_BYTES))
    assert envelope.body.length == len(PATIENT_BYTES)
    run(mw, envelope)
    assert envelope.body == PATIENT_BYTES
    assert json.loads(events[0]["body"])["name"] == "[REDACTED]"
    assert events[0]["body_size"] == len(PATIENT_BYTES)


def test_streamed_body_of_unknown_length_is_not_read():
    mw, events = build(include_body=True)
    stream = Stream()
    response = ResponseEnvelope(headers=[("Content-Type", "application/json")], body=stream)
    run(mw, json_request(), response)
    assert response.body is stream
    assert events[1]["body_omitted"] == "streamed body of unknown length"
    assert events[1]["body_size"] is None


def test_streamed_body_over_the_content_limit_is_not_read():
    class Context:
        class config:
            class proxy:
                class content_limits:
                    max_body_size = 10

    events = []
    mw = LogDump("audit", options(include_body=True), Context(), log=Logger(observer=events.append))
    stream = Stream.from_bytes(PATIENT_BYTES)
    envelope = json_request(body=stream)
    run(mw, envelope)
    assert envelope.body is stream
    assert events[0]["body_omitted"] == "too large to read"


def test_streamed_malformed_body_is_kept_and_logged_as_omitted():
    mw, events = build(include_body=True)
    envelope = json_request(body=Stream.from_bytes(b'{"name": "Bro'))
    run(mw, envelope)
    assert envelope.body == b'{"name": "Bro'
    assert not envelope.parsed
    assert events[0]["body_omitted"] == "malformed JSON"


def test_streamed_body_over_the_envelope_limit_is_not_read():
    mw, events = build(include_body=True)
    stream = Stream.from_bytes(PATIENT_BYTES)
    envelope = json_request(body=stream)
    envelope.content_limits = ContentLimits(max_body_size=10)
    run(mw, envelope)
    assert envelope.body is stream
    assert events[0]["body_omitted"] == "too large to read"


def test_a_logging_problem_never_fails_the_request():
    events = []

    def broken_observer(event):
        events.append(event)
        if event.get("side"):
            raise RuntimeError("observer broke")

    mw = LogDump("audit", options(include_body=True), None, log=Logger(observer=broken_observer))
    assert mw.request(json_request()) is None
    d = mw.request(json_request(body=Stream.from_bytes(PATIENT_BYTES)))
    assert result_of(d) is None
    assert len(events) == 2


def test_through_the_executor():
    mw, events = build(include_body=True, redact_body_fields=["name"])
    backend = FakeBackend(result=ResponseEnvelope(status=200, headers=[("Content-Type", "application/json")],
                                                  body=b'{"name": "Jane"}'))
    response = result_of(PipelineExecutor("p", [mw], [mw], [backend]).execute(FakeEndpoint(), json_request()))
    assert response.status == 200
    assert backend.bodies == [PATIENT_BYTES]
    assert [e["side"] for e in events] == ["request", "response"]
    assert json.loads(events[1]["body"]) == {"name": "[REDACTED]"}


# -- Configuration errors ----------------------------------------------------------


def test_defaults():
    o = options()
    assert o.apply == "both"
    assert o.include_body is False
    assert o.include_metadata is False
    assert "authorization" not in o.include_headers


def test_both_names_of_an_option_are_an_error():
    assert error(max_body_bytes=10, max_bytes=20) == (
        "p.toml: middleware.audit.options.max_bytes: max_bytes is the Rust Harmony name of max_body_bytes: "
        "give only one of them"
    )
    assert error(include_body=True, redact_body_fields=["a"], redact_data_fields=["b"]).endswith(
        "redact_data_fields: redact_data_fields is the Rust Harmony name of redact_body_fields: give only one of them"
    )


def test_bad_values():
    assert error(apply="always").endswith('apply: expected one of left, right, both, got "always"')
    assert error(max_body_bytes=0).endswith("max_body_bytes: must be at least 1, got 0")
    assert error(max_bytes="1k").endswith('max_bytes: expected integer, got "1k"')
    assert error(include_body="yes").endswith('include_body: expected boolean, got "yes"')
    assert error(include_metadata=1).endswith("include_metadata: expected boolean, got 1")
    assert error(label=3).endswith("label: expected string, got 3")
    assert error(include_headers="*").endswith('include_headers: expected array of string, got "*"')
    assert error(redact_headers=[""]).endswith("redact_headers.0: must not be empty")
    assert error(redact_headers=["a", "A"]).endswith('redact_headers.1: "a" is listed twice')
    assert error(redact_metadata=[1]).endswith("redact_metadata.0: expected string, got 1")


def test_bad_body_field_paths():
    message = error(include_body=True, redact_body_fields=["ok", "a..b"])
    assert message.startswith("p.toml: middleware.audit.options.redact_body_fields.1: JSON path 'a..b'")
    assert "redact_data_fields.0: JSON path 'x['" in error(include_body=True, redact_data_fields=["x["])


def test_unknown_option_and_legacy_pretty():
    assert error(include_bodies=True).startswith('p.toml: middleware.audit.options.include_bodies: unknown key')
    where = Where("p.toml", ("middleware", "audit", "options"))
    options(where, pretty=True)
    assert where.warnings == [
        "p.toml: middleware.audit.options.pretty: deprecated legacy key, ignored "
        "(events are structured; formatting belongs to the log observer)"
    ]


def test_body_redaction_without_include_body_warns():
    where = Where("p.toml", ("middleware", "audit", "options"))
    options(where, redact_data_fields=["ssn"])
    assert where.warnings == [
        "p.toml: middleware.audit.options: bodies are not logged unless include_body = true; "
        "body field redaction has no effect"
    ]


# -- Loaded from TOML ----------------------------------------------------------------------


def _registry():
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType("log_dump", LogDump, OPTIONS))
    return registry


def test_rust_harmony_config_loads(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["debug_dump"])
        + """
[middleware.debug_dump]
type = "log_dump"
[middleware.debug_dump.options]
apply = "both"
pretty = true
redact_headers = ["authorization", "cookie"]
redact_metadata = ["api_key", "token"]
redact_data_fields = ["ssn", "password", "user.payment_details"]
label = "after_transform"
max_bytes = 32768
"""
    }
    config = load(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert any("pretty" in w for w in config.warnings)
    mw = LogDump("debug_dump", config.middleware["debug_dump"].options)
    assert mw.max_body_bytes == 32768
    assert not mw.include_body


def test_toml_error_names_file_and_key(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["d"])
        + """
[middleware.d]
type = "log_dump"
[middleware.d.options]
apply = "sometimes"
"""
    }
    e = load_error(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert str(e).startswith("pipelines/p.toml: middleware.d.options.apply: expected one of")
