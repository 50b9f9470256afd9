"""
The C{transform} and C{metadata_transform} middleware: spec files loaded
and checked at startup, request (left) and response (right) bodies
rewritten with correct headers, the injected context's exact shape,
C{fail_on_error} both ways, bodies that are not JSON left alone, target
details and metadata set from request details, and the example pipeline
in C{etc/}.
"""

import json
import os
import shutil

import pytest
from _deferreds import failure_of, result_of
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from _fakes import FakeBackend, FakeEndpoint, make_request
from harmony.config import ConfigError, load_config
from harmony.config.schema import Options, Where
from harmony.envelope import ResponseEnvelope
from harmony.errors import BadRequest, InternalError, PayloadTooLarge
from harmony.gateway import build_gateway
from harmony.http.bodies import ContentLimits
from harmony.interfaces import IMiddleware
from harmony.middleware import metadata_transform, transform
from harmony.middleware.metadata_transform import MetadataTransformMiddleware
from harmony.middleware.transform import TransformMiddleware
from harmony.pipeline import PipelineExecutor
from harmony.registry import BuildContext, MiddlewareType, builtin_registry
from harmony.streams import Stream

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc")

RENAME = [
    {"operation": "shift", "spec": {"name": "full_name", "id": "patient_id", "*": "other.&"}},
    {"operation": "default", "spec": {"resourceType": "Patient"}},
]

#: Makes the transform's whole input the output: shows what it saw.
CAPTURE = [{"operation": "shift", "spec": {"@": "body"}}]


class StubConfig:
    """
    The parts of a L{harmony.config.HarmonyConfig} the middleware reads.
    """

    def __init__(self, base_dir, transforms_path="transforms"):
        self.base_dir = str(base_dir)
        self.proxy = Options({"transforms_path": transforms_path})

    def resolve_path(self, path):
        return os.path.normpath(os.path.join(self.base_dir, path))


def write_spec(tmp_path, spec, name="spec.json", directory="transforms"):
    folder = tmp_path / directory
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def context(tmp_path):
    return BuildContext(config=StubConfig(tmp_path))


def options(schema, **values):
    return schema.validate(values, Where("pipelines/t.toml", ("middleware", "t", "options")))


def build(tmp_path, spec=RENAME, **values):
    write_spec(tmp_path, spec)
    values.setdefault("spec_path", "spec.json")
    return TransformMiddleware("t", options(transform.OPTIONS, **values), context(tmp_path))


def build_meta(tmp_path, spec, **values):
    write_spec(tmp_path, spec)
    values.setdefault("spec_path", "spec.json")
    return MetadataTransformMiddleware("m", options(metadata_transform.OPTIONS, **values), context(tmp_path))


def json_request(document, content_type="application/json", method="POST", headers=(), **details):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    all_headers = ([("Content-Type", content_type)] if content_type else []) + list(headers)
    return make_request(method, "Patient", headers=all_headers, body=body, **details)


def json_response(document, status=200, content_type="application/json", headers=()):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    all_headers = ([("Content-Type", content_type)] if content_type else []) + list(headers)
    return ResponseEnvelope(status=status, headers=all_headers, body=body)


def run_request(mw, envelope):
    d = mw.request(envelope)
    return None if d is None else result_of(d)


def run_response(mw, envelope, response):
    d = mw.response(envelope, response)
    return None if d is None else result_of(d)


class Events:
    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    @property
    def text(self):
        return " ".join(formatEvent(e) + repr(e) for e in self.events)


# -- startup: options and spec files -------------------------------------------------------


def test_provides_imiddleware(tmp_path):
    assert verifyObject(IMiddleware, build(tmp_path))
    assert verifyObject(IMiddleware, build_meta(tmp_path, RENAME))


def test_option_defaults(tmp_path):
    mw = build(tmp_path)
    assert (mw.side, mw.fail_on_error, mw.inject_context) == ("both", True, False)
    assert build_meta(tmp_path, RENAME).side == "left"


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "spec_path: required key is missing"),
        ({"spec_path": "x.json", "apply": "sideways"}, 'apply: expected one of left, right, both, got "sideways"'),
        ({"spec_path": "x.json", "fail_on_error": "yes"}, 'fail_on_error: expected boolean, got "yes"'),
        ({"spec_path": "x.json", "spec": "x"}, 'unknown key "spec"'),
    ],
)
def test_option_errors(values, message):
    with pytest.raises(ConfigError) as info:
        options(transform.OPTIONS, **values)
    assert str(info.value).startswith("pipelines/t.toml: middleware.t.options.")
    assert message in str(info.value)


def test_spec_path_relative_to_transforms_path(tmp_path):
    mw = build(tmp_path)
    assert mw.spec_file == str(tmp_path / "transforms" / "spec.json")


def test_spec_path_falls_back_to_the_config_directory(tmp_path):
    write_spec(tmp_path, RENAME, directory="specs")
    opts = options(transform.OPTIONS, spec_path="specs/spec.json")
    mw = TransformMiddleware("t", opts, context(tmp_path))
    assert mw.spec_file == str(tmp_path / "specs" / "spec.json")


def test_absolute_spec_path(tmp_path):
    path = write_spec(tmp_path, RENAME, directory="elsewhere")
    mw = TransformMiddleware("t", options(transform.OPTIONS, spec_path=str(path)), context(tmp_path))
    assert mw.spec_file == str(path)


def test_missing_spec_file_is_a_startup_error(tmp_path):
    opts = options(transform.OPTIONS, spec_path="nope.json")
    with pytest.raises(ConfigError) as info:
        TransformMiddleware("to_fhir", opts, context(tmp_path))
    message = str(info.value)
    assert "middleware 'to_fhir': options.spec_path: JOLT spec file 'nope.json' not found" in message
    assert str(tmp_path / "transforms" / "nope.json") in message


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"operation": "shift", "spec": {"a": "b"}', "not valid JSON: Expecting ',' delimiter at line 1 column"),
        ('{"a": 1, "a": 2}', "not valid JSON: duplicate key 'a'"),
        (
            '[{"operation": "shift", "spec": {"a": {"b": "&7"}}}]',
            "invalid JOLT spec: operation 0 (shift): spec.a.b: '&7' refers 7 level(s) up",
        ),
        ('[{"operation": "modify-overwrite-beta", "spec": {"x": "=nonnull"}}]', "unknown function 'nonnull'"),
    ],
)
def test_bad_spec_file_is_a_startup_error_naming_the_file(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    opts = options(transform.OPTIONS, spec_path="spec.json")
    with pytest.raises(ConfigError) as info:
        TransformMiddleware("t", opts, context(tmp_path))
    assert str(info.value).startswith(f"{path}: middleware 't': options.spec_path: ")
    assert message in str(info.value)


def test_metadata_transform_spec_errors_too(tmp_path):
    write_spec(tmp_path, [{"operation": "sideways"}])
    opts = options(metadata_transform.OPTIONS, spec_path="spec.json")
    with pytest.raises(ConfigError) as info:
        MetadataTransformMiddleware("m", opts, context(tmp_path))
    assert "operation 0: unknown operation 'sideways'" in str(info.value)


# -- left: the request body ------------------------------------------------------------------


def test_left_rewrites_the_request_body_with_headers(tmp_path):
    mw = build(tmp_path, apply="left")
    envelope = json_request(
        {"name": "Jane", "id": 5, "x": 1},
        content_type="application/fhir+json; charset=utf-8; fhirVersion=4.0",
        headers=[("Content-Length", "31"), ("Transfer-Encoding", "chunked"), ("Content-MD5", "x")],
    )
    envelope.rewind_body = lambda: b"old"
    assert run_request(mw, envelope) is None
    expected = {"full_name": "Jane", "patient_id": 5, "other": {"x": 1}, "resourceType": "Patient"}
    assert json.loads(envelope.body) == expected
    assert envelope.body == json.dumps(expected, separators=(",", ":")).encode()
    assert envelope.normalized == expected
    assert envelope.rewind_body is None
    headers = envelope.details.headers
    assert headers.get("Content-Type") == "application/fhir+json; fhirVersion=4.0"
    assert headers.get("Content-Length") == str(len(envelope.body))
    assert headers.get_all("Content-Length") == [str(len(envelope.body))]
    assert "Transfer-Encoding" not in headers and "Content-MD5" not in headers


def test_left_output_is_what_the_backend_receives(tmp_path):
    mw = build(tmp_path, apply="left")
    backend = FakeBackend()
    executor = PipelineExecutor("p", [mw], [mw], [backend])
    envelope = json_request({"name": "Jane"})
    response = result_of(executor.execute(FakeEndpoint(), envelope))
    assert response.status == 200
    assert json.loads(backend.bodies[0]) == {"full_name": "Jane", "resourceType": "Patient"}
    assert backend.calls[0].details.headers.get("Content-Length") == str(len(backend.bodies[0]))


def test_no_content_type_counts_as_json_and_gets_application_json(tmp_path):
    mw = build(tmp_path, apply="left")
    envelope = json_request({"name": "A"}, content_type=None)
    run_request(mw, envelope)
    assert envelope.details.headers.get("Content-Type") == "application/json"
    assert json.loads(envelope.body) == {"full_name": "A", "resourceType": "Patient"}


def test_content_type_option(tmp_path):
    mw = build(tmp_path, apply="left", content_type="application/fhir+json")
    envelope = json_request({"name": "A"})
    run_request(mw, envelope)
    assert envelope.details.headers.get("Content-Type") == "application/fhir+json"


def test_unicode_is_kept_as_utf8(tmp_path):
    mw = build(tmp_path, apply="left")
    envelope = json_request({"name": "Zoë Ñ"})
    run_request(mw, envelope)
    assert "Zoë Ñ".encode() in envelope.body
    assert envelope.details.headers.get("Content-Length") == str(len(envelope.body))


def test_right_side_only_leaves_the_request(tmp_path):
    mw = build(tmp_path, apply="right")
    envelope = json_request({"name": "Jane"})
    assert mw.request(envelope) is None
    assert json.loads(envelope.body) == {"name": "Jane"}


# -- right: the response body ------------------------------------------------------------------


def test_right_rewrites_the_response_body_with_headers(tmp_path):
    mw = build(tmp_path, apply="right")
    envelope = json_request({"name": "request"})
    response = json_response(
        {"name": "Jane", "zz": [1]}, headers=[("Content-Length", "99"), ("ETag", 'W/"3"'), ("Digest", "sha-256=x")]
    )
    assert run_response(mw, envelope, response) is None
    expected = {"full_name": "Jane", "other": {"zz": [1]}, "resourceType": "Patient"}
    assert json.loads(response.body) == expected
    assert response.normalized == expected
    assert response.headers.get("Content-Length") == str(len(response.body))
    assert response.headers.get("Content-Type") == "application/json"
    assert response.headers.get("ETag") == 'W/"3"'
    assert "Digest" not in response.headers
    assert json.loads(envelope.body) == {"name": "request"}


def test_left_side_only_leaves_the_response(tmp_path):
    mw = build(tmp_path, apply="left")
    response = json_response({"name": "Jane"})
    assert mw.response(json_request({}), response) is None
    assert json.loads(response.body) == {"name": "Jane"}


def test_both_sides(tmp_path):
    mw = build(tmp_path, apply="both")
    backend = FakeBackend(result=lambda env: json_response({"name": json.loads(env.body)["full_name"] + "!"}))
    executor = PipelineExecutor("p", [mw], [mw], [backend])
    response = result_of(executor.execute(FakeEndpoint(), json_request({"name": "Jane"})))
    assert json.loads(response.body) == {"full_name": "Jane!", "resourceType": "Patient"}


# -- inject_context ------------------------------------------------------------------------------


def test_inject_context_request_shape(tmp_path):
    mw = build(tmp_path, CAPTURE, apply="left", inject_context=True)
    envelope = json_request(
        {"a": 1},
        headers=[("Authorization", "Bearer secret"), ("Cookie", "s=1"), ("X-Trace", "a"), ("X-Trace", "b")],
        full_path="/fhir/Patient",
        query={"name": ["x", "y"]},
    )
    envelope.metadata.update({"pipeline": "p", "jwt_sub": "u1"})
    envelope.target["base_url"] = "http://upstream"
    run_request(mw, envelope)
    assert json.loads(envelope.body) == {
        "body": {"a": 1},
        "context": {
            "request": {
                "method": "POST",
                "path": "Patient",
                "full_path": "/fhir/Patient",
                "query": {"name": ["x", "y"]},
                "headers": {"content-type": "application/json", "x-trace": "a, b"},
                "metadata": {"pipeline": "p", "jwt_sub": "u1"},
            },
            "target": {"base_url": "http://upstream"},
        },
    }


def test_inject_context_response_shape(tmp_path):
    mw = build(tmp_path, CAPTURE, apply="right", inject_context=True)
    envelope = json_request({"a": 1}, method="GET")
    response = json_response({"b": 2}, status=201, headers=[("Set-Cookie", "s=1"), ("Location", "/x")])
    run_response(mw, envelope, response)
    seen = json.loads(response.body)
    assert seen["body"] == {"b": 2}
    assert seen["context"]["response"] == {
        "status": 201,
        "headers": {"content-type": "application/json", "location": "/x"},
    }
    assert seen["context"]["request"]["method"] == "GET"


def test_inject_context_body_comes_from_the_output_body_member(tmp_path):
    spec = [
        {"operation": "shift", "spec": {"body": {"*": "body.&"}, "context": {"request": {"query": {"id": {"0": "body.id"}}}}}}
    ]
    mw = build(tmp_path, spec, apply="left", inject_context=True)
    envelope = json_request({"a": 1}, query={"id": ["42"]})
    run_request(mw, envelope)
    assert json.loads(envelope.body) == {"a": 1, "id": "42"}


def test_inject_context_builds_a_body_for_a_request_without_one(tmp_path):
    spec = [{"operation": "shift", "spec": {"context": {"request": {"query": {"patient": {"0": "body.PatientID"}}}}}}]
    mw = build(tmp_path, spec, apply="left", inject_context=True)
    envelope = make_request("GET", "studies", body=b"", query={"patient": ["P1"]})
    run_request(mw, envelope)
    assert json.loads(envelope.body) == {"PatientID": "P1"}
    assert envelope.details.headers.get("Content-Type") == "application/json"


def test_inject_context_output_without_body_is_an_error(tmp_path):
    mw = build(tmp_path, [{"operation": "shift", "spec": {"body": "data"}}], apply="left", inject_context=True)
    failure = failure_of(mw.request(json_request({"a": 1})), BadRequest)
    assert failure.value.message == "The request body could not be transformed"


# -- fail_on_error ---------------------------------------------------------------------------------

HUGE_INDEX = [{"operation": "shift", "spec": {"item-*": "list[&(0,1)]"}}]
HUGE_BODY = {"item-99999999": "patient-secret-123"}


def test_fail_on_error_request_malformed_json_is_400(tmp_path):
    mw = build(tmp_path, apply="left")
    failure = failure_of(mw.request(json_request(b'{"name": ')), BadRequest)
    assert failure.value.status == 400
    assert failure.value.message.startswith("Malformed JSON body")


def test_fail_on_error_request_transform_failure_is_400(tmp_path):
    mw = build(tmp_path, HUGE_INDEX, apply="left")
    with Events() as log:
        failure = failure_of(mw.request(json_request(HUGE_BODY)), BadRequest)
    assert (failure.value.status, failure.value.error) == (400, "bad_request")
    assert failure.value.message == "The request body could not be transformed"
    assert "patient-secret-123" not in log.text and "99999999" not in log.text
    assert "could not be transformed" in log.text


def test_fail_on_error_response_failures_are_500(tmp_path):
    mw = build(tmp_path, HUGE_INDEX, apply="right")
    failure = failure_of(mw.response(json_request({}), json_response(HUGE_BODY)), InternalError)
    assert failure.value.status == 500
    assert failure.value.message == "The response body could not be transformed"
    failure = failure_of(mw.response(json_request({}), json_response(b"<not json>")), InternalError)
    assert failure.value.message == "The response body could not be transformed: it is not valid JSON"


def test_errors_render_as_json(tmp_path):
    mw = build(tmp_path, HUGE_INDEX, apply="left")
    backend = FakeBackend()
    response = result_of(PipelineExecutor("p", [mw], [mw], [backend]).execute(FakeEndpoint(), json_request(HUGE_BODY)))
    assert response.status == 400
    assert json.loads(response.body) == {"error": "bad_request", "message": "The request body could not be transformed"}
    assert backend.calls == []


def test_no_fail_on_error_leaves_bodies_unchanged_and_logs_without_them(tmp_path):
    mw = build(tmp_path, HUGE_INDEX, fail_on_error=False)
    with Events() as log:
        envelope = json_request(HUGE_BODY)
        assert run_request(mw, envelope) is None
        assert json.loads(envelope.body) == HUGE_BODY
        response = json_response(HUGE_BODY)
        assert run_response(mw, envelope, response) is None
        assert json.loads(response.body) == HUGE_BODY
        malformed = json_request(b'{"name": "patient-secret-123"')
        assert run_request(mw, malformed) is None
        assert malformed.body == b'{"name": "patient-secret-123"'
        bad_response = json_response(b'{"patient-secret-123"')
        assert run_response(mw, envelope, bad_response) is None
        assert bad_response.body == b'{"patient-secret-123"'
    assert len([e for e in log.events if "left unchanged" in formatEvent(e)]) == 4
    assert "patient-secret-123" not in log.text and "99999999" not in log.text


# -- bodies left alone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, extra",
    [
        ("application/xml", []),
        ("text/csv", []),
        ("image/png", []),
        ("application/dicom", []),
        ("application/json", [("Content-Encoding", "gzip")]),
    ],
)
def test_non_json_bodies_are_untouched(tmp_path, content_type, extra):
    mw = build(tmp_path)
    body = b"<Patient><name>Jane</name></Patient>"
    envelope = make_request("POST", "x", headers=[("Content-Type", content_type)] + extra, body=body)
    assert mw.request(envelope) is None
    assert envelope.body == body and envelope.details.headers.get("Content-Type") == content_type
    response = ResponseEnvelope(status=200, headers=[("Content-Type", content_type)] + extra, body=body)
    assert mw.response(envelope, response) is None
    assert response.body == body


def test_head_204_304_responses_are_untouched(tmp_path):
    mw = build(tmp_path, [{"operation": "default", "spec": {"added": 1}}])
    for method, status in (("HEAD", 200), ("GET", 204), ("GET", 304), ("GET", 101)):
        response = json_response(b"", status=status)
        assert mw.response(make_request(method, "x"), response) is None
        assert response.body == b""


def test_empty_bodies_are_untouched_without_inject_context(tmp_path):
    mw = build(tmp_path)
    envelope = make_request("GET", "x", body=b"")
    assert mw.request(envelope) is None
    assert envelope.body == b""
    assert "Content-Type" not in envelope.details.headers
    response = json_response(b"")
    assert mw.response(envelope, response) is None
    assert response.body == b""


def test_empty_body_with_inject_context(tmp_path):
    spec = [{"operation": "default", "spec": {"body": {"status": "none"}}}]
    mw = build(tmp_path, spec, apply="right", inject_context=True)
    response = json_response(b"", status=200)
    run_response(mw, make_request("GET", "x"), response)
    assert json.loads(response.body) == {"status": "none"}
    mw = build(tmp_path, CAPTURE, apply="right", inject_context=True)
    response = json_response(b"", status=200)
    run_response(mw, make_request("GET", "x"), response)
    assert json.loads(response.body)["body"] is None
    mw = build(tmp_path, [{"operation": "shift", "spec": {"body": "body"}}], apply="left", inject_context=True)
    envelope = make_request("GET", "x", body=b"")
    run_request(mw, envelope)
    assert envelope.body == b"" and "Content-Length" not in envelope.details.headers


def test_streamed_request_body(tmp_path):
    mw = build(tmp_path, apply="left")
    envelope = json_request(b"")
    envelope.body = Stream.from_bytes(json.dumps({"name": "Jane"}).encode())
    run_request(mw, envelope)
    assert json.loads(envelope.body) == {"full_name": "Jane", "resourceType": "Patient"}


@pytest.mark.parametrize("fail_on_error", [True, False])
def test_body_over_the_size_limit_is_413_either_way(tmp_path, fail_on_error):
    mw = build(tmp_path, apply="left", fail_on_error=fail_on_error)
    envelope = json_request(b"")
    envelope.body = Stream.from_bytes(json.dumps({"name": "J" * 100}).encode())
    envelope.content_limits = ContentLimits(max_body_size=20)
    failure_of(mw.request(envelope), PayloadTooLarge)


def test_large_bodies_are_transformed_in_a_thread(tmp_path):
    calls = []

    def run_in_thread(f, *args):
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    write_spec(tmp_path, RENAME)
    mw = TransformMiddleware("t", options(transform.OPTIONS, spec_path="spec.json"), context(tmp_path), run_in_thread)
    small = json_request({"name": "x"})
    run_request(mw, small)
    assert calls == []
    large = json_request({"name": "x" * (transform.INLINE_LIMIT + 1)})
    run_request(mw, large)
    assert calls == [transform.apply_spec]
    assert json.loads(large.body)["full_name"] == "x" * (transform.INLINE_LIMIT + 1)
    response = json_response({"name": "y" * (transform.INLINE_LIMIT + 1)})
    run_response(mw, small, response)
    assert len(calls) == 2


def test_thread_failures_are_handled_like_inline_ones(tmp_path):
    write_spec(tmp_path, HUGE_INDEX)
    mw = TransformMiddleware(
        "t", options(transform.OPTIONS, spec_path="spec.json"), context(tmp_path), defer.maybeDeferred
    )
    body = dict(HUGE_BODY, padding="p" * transform.INLINE_LIMIT)
    failure_of(mw.request(json_request(body)), BadRequest)


def test_json_null_body_is_untouched(tmp_path):
    mw = build(tmp_path, apply="left")
    envelope = json_request(b"null")
    run_request(mw, envelope)
    assert envelope.body == b"null"


def test_nan_output_is_a_transform_failure(tmp_path):
    spec = [{"operation": "modify-overwrite-beta", "spec": {"n": "=toDouble"}}]
    mw = build(tmp_path, spec, apply="left")
    failure_of(mw.request(json_request({"n": "NaN"})), BadRequest)


# -- metadata_transform --------------------------------------------------------------------------


def test_metadata_transform_input_shape(tmp_path):
    mw = build_meta(tmp_path, [{"operation": "shift", "spec": {"@": "metadata.input"}}])
    envelope = make_request(
        "GET",
        "ImagingStudy",
        headers=[("Accept", "application/json"), ("Authorization", "Basic x"), ("Cookie", "c=1")],
        uri="/fhir/ImagingStudy?patient=P1",
        full_path="/fhir/ImagingStudy",
        query={"patient": ["P1"]},
        query_string="patient=P1",
    )
    envelope.metadata["pipeline"] = "p"
    envelope.target["method"] = "POST"
    run_request(mw, envelope)
    assert json.loads(envelope.metadata["input"]) == {
        "method": "GET",
        "path": "ImagingStudy",
        "full_path": "/fhir/ImagingStudy",
        "uri": "/fhir/ImagingStudy?patient=P1",
        "query": {"patient": ["P1"]},
        "query_params": {"patient": ["P1"]},
        "query_string": "patient=P1",
        "headers": {"accept": "application/json"},
        "metadata": {"pipeline": "p"},
        "target": {"method": "POST"},
    }


def test_metadata_transform_sets_target_and_metadata(tmp_path):
    spec = [
        {
            "operation": "shift",
            "spec": {
                "query": {"patient": {"0": "metadata.PatientID"}, "limit": {"0": "target.query_string"}},
                "path": "target.path",
                "#https://pacs.example.org/dicom-web": "target.base_url",
                "#post": "target.method",
                "headers": {"x-priority": "metadata.priority"},
            },
        },
        {"operation": "default", "spec": {"metadata": {"count": 3, "flags": [True, None], "none": None}}},
    ]
    mw = build_meta(tmp_path, spec)
    envelope = make_request("GET", "studies/1.2", headers=[("X-Priority", "high")], query={"patient": ["P1"], "limit": ["limit=5"]})
    envelope.metadata["request_id"] = "r1"
    assert run_request(mw, envelope) is None
    assert envelope.target == {
        "base_url": "https://pacs.example.org/dicom-web",
        "path": "studies/1.2",
        "method": "POST",
        "query_string": "limit=5",
    }
    assert envelope.metadata == {"request_id": "r1", "PatientID": "P1", "priority": "high", "count": "3", "flags": "[true,null]"}


def test_metadata_transform_rust_style_output(tmp_path):
    spec = [
        {"operation": "shift", "spec": {"query_params": {"patient": {"0": "metadata.PatientID"}}}},
        {"operation": "default", "spec": {"base_url": "", "method": "GET", "uri": "/studies?includefield=all"}},
    ]
    mw = build_meta(tmp_path, spec)
    envelope = make_request("POST", "ignored", query={"patient": ["P9"]})
    run_request(mw, envelope)
    assert envelope.target == {"method": "GET", "path": "studies", "query_string": "includefield=all"}
    assert envelope.metadata == {"PatientID": "P9"}


def test_metadata_transform_reserved_metadata_is_kept(tmp_path):
    mw = build_meta(tmp_path, [{"operation": "shift", "spec": {"#evil": ["metadata.pipeline", "metadata.other"]}}])
    envelope = make_request("GET", "x")
    envelope.metadata["pipeline"] = "p"
    run_request(mw, envelope)
    assert envelope.metadata == {"pipeline": "p", "other": "evil"}


@pytest.mark.parametrize(
    "target",
    [
        {"path": "a/../secret"},
        {"path": "a?b=1"},
        {"method": "GET /x"},
        {"base_url": "file:///etc/passwd"},
        {"base_url": "http://h/?q=1"},
        {"query_string": "a=1#frag"},
        {"path": 5},
        {"port": "80"},
    ],
)
def test_metadata_transform_rejects_unsafe_targets(tmp_path, target):
    mw = build_meta(tmp_path, [{"operation": "default", "spec": {"target": target}}])
    envelope = make_request("GET", "x")
    failure = failure_of_call(mw.request, envelope)
    assert isinstance(failure, BadRequest)
    assert failure.message == "The request details could not be transformed"
    assert envelope.target == {}


def failure_of_call(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    raise AssertionError("no error raised")


def test_metadata_transform_no_fail_on_error(tmp_path):
    mw = build_meta(tmp_path, [{"operation": "default", "spec": {"target": {"path": "../x"}, "metadata": {"a": "1"}}}], fail_on_error=False)
    envelope = make_request("GET", "x")
    with Events() as log:
        assert mw.request(envelope) is None
    assert envelope.target == {} and envelope.metadata == {}
    assert "left unchanged" in log.text and "../x" not in log.text


def test_metadata_transform_output_not_an_object(tmp_path):
    mw = build_meta(tmp_path, [{"operation": "shift", "spec": {"method": ""}}])
    assert isinstance(failure_of_call(mw.request, make_request("GET", "x")), BadRequest)


def test_metadata_transform_legacy_metadata_mode(tmp_path):
    spec = [{"operation": "default", "spec": {"dimse_op": "find"}}]
    mw = build_meta(tmp_path, spec, transform_target="metadata")
    envelope = make_request("GET", "x")
    envelope.metadata["a"] = "1"
    run_request(mw, envelope)
    assert envelope.metadata == {"a": "1", "dimse_op": "find"}
    assert envelope.target == {}


def test_metadata_transform_right_side(tmp_path):
    spec = [{"operation": "shift", "spec": {"status": "metadata.upstream_status", "headers": {"etag": "metadata.etag"}}}]
    mw = build_meta(tmp_path, spec, apply="right")
    envelope = make_request("GET", "x")
    assert mw.request(envelope) is None
    response = json_response({}, status=201, headers=[("ETag", '"v1"')])
    assert mw.response(envelope, response) is None
    assert response.metadata == {"upstream_status": "201", "etag": '"v1"'}
    assert envelope.metadata == {}


def test_metadata_transform_left_only_by_default(tmp_path):
    mw = build_meta(tmp_path, [{"operation": "default", "spec": {"metadata": {"x": "y"}}}])
    response = json_response({})
    assert mw.response(make_request("GET", "x"), response) is None
    assert response.metadata == {}


# -- the example pipeline in etc/ ------------------------------------------------------------------


def registry_with_transforms():
    registry = builtin_registry()
    if registry.middleware("transform") is None:
        registry.add_middleware(MiddlewareType("transform", TransformMiddleware, options=transform.OPTIONS))
    if registry.middleware("metadata_transform") is None:
        registry.add_middleware(
            MiddlewareType("metadata_transform", MetadataTransformMiddleware, options=metadata_transform.OPTIONS)
        )
    return registry


def test_example_pipeline(tmp_path):
    from test_example_configs import _enable

    shutil.copy(os.path.join(ETC, "harmony.toml"), tmp_path / "harmony.toml")
    shutil.copytree(os.path.join(ETC, "transforms"), tmp_path / "transforms")
    (tmp_path / "pipelines").mkdir()
    with open(os.path.join(ETC, "pipelines", "transform-example.toml")) as f:
        enabled = _enable(f.read())
    assert "\n# [" not in enabled
    (tmp_path / "pipelines" / "transform-example.toml").write_text(enabled)
    registry = registry_with_transforms()
    config = load_config(str(tmp_path / "harmony.toml"), registry)
    gateway = build_gateway(config, registry, BuildContext(config=config))
    executor = gateway.executors["transform_example"]
    envelope = json_request(
        {"id": "p1", "mrn": "42", "first_name": "Jane", "last_name": "Brown", "gender": "F", "phones": ["555-0100"]}
    )
    response = result_of(executor.execute(FakeEndpoint(), envelope))
    echoed = json.loads(response.body)
    assert json.loads(echoed["body"]) == {
        "active": True,
        "gender": "female",
        "id": "p1",
        "identifier": [{"system": "urn:example:mrn", "value": "42"}],
        "name": [{"family": "BROWN", "given": ["Jane"], "text": "Jane BROWN"}],
        "resourceType": "Patient",
        "telecom": [{"system": "phone", "value": "555-0100"}],
    }
    assert echoed["headers"]["content-length"] == str(len(echoed["body"].encode()))


def test_example_spec_files_compile():
    from harmony.transforms import compile_spec

    folder = os.path.join(ETC, "transforms")
    names = [n for n in os.listdir(folder) if n.endswith(".json")]
    assert names
    for name in names:
        with open(os.path.join(folder, name)) as f:
            compile_spec(json.load(f))
