"""
header: remove/rename/set/add rules on requests and responses, values with
${metadata.KEY} references, hop-by-hop protection, and every config error.
"""

import pytest
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error, pipeline
from _fakes import make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.envelope import Headers, ResponseEnvelope
from harmony.interfaces import IMiddleware
from harmony.middleware import header as header_module
from harmony.middleware.header import OPTIONS, HeaderMiddleware, Template
from harmony.registry import MiddlewareType, builtin_registry


def options(**values):
    return OPTIONS.validate(values, Where("p.toml", ("middleware", "h", "options")))


def build(**values):
    return HeaderMiddleware("h", options(**values))


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return str(info.value)


def request_headers(mw, headers, metadata=None):
    envelope = make_request("GET", "x", headers=headers)
    envelope.metadata.update(metadata or {})
    assert mw.request(envelope) is None
    return envelope.details.headers.items()


def test_provides_imiddleware_and_does_nothing_without_rules():
    mw = build()
    assert verifyObject(IMiddleware, mw)
    assert request_headers(mw, [("A", "1")]) == [("A", "1")]
    response = ResponseEnvelope(headers=[("B", "2")])
    assert mw.response(make_request(), response) is None
    assert response.headers.items() == [("B", "2")]


# -- Operations --------------------------------------------------------------


def test_remove_every_value_case_insensitively():
    mw = build(request={"remove": ["x-debug"]})
    assert request_headers(mw, [("X-Debug", "1"), ("A", "b"), ("x-DEBUG", "2")]) == [("A", "b")]


def test_rename_moves_every_value_and_replaces_the_target():
    mw = build(request={"rename": {"X-Old": "X-New"}})
    out = request_headers(mw, [("X-Old", "1"), ("X-New", "stale"), ("X-Old", "2")])
    assert out == [("X-New", "1"), ("X-New", "2")]
    assert request_headers(mw, [("X-New", "kept")]) == [("X-New", "kept")]


def test_set_replaces_and_add_appends():
    mw = build(request={"set": {"X-Env": "prod"}, "add": {"X-Tag": ["a", "b"], "Via": "harmony"}})
    out = request_headers(mw, [("x-env", "dev"), ("x-env", "test"), ("X-Tag", "0")])
    assert out == [("X-Tag", "0"), ("X-Env", "prod"), ("X-Tag", "a"), ("X-Tag", "b"), ("Via", "harmony")]


def test_operations_run_remove_rename_set_add():
    mw = build(request={"add": {"X-C": "c"}, "set": {"X-B": "b"}, "rename": {"X-A": "X-A2"}, "remove": ["X-R"]})
    out = request_headers(mw, [("X-R", "r"), ("X-A", "a")])
    assert out == [("X-A2", "a"), ("X-B", "b"), ("X-C", "c")]


def test_response_rules_apply_to_the_response_only():
    mw = build(response={"set": {"Strict-Transport-Security": "max-age=1"}, "remove": ["Server"]})
    envelope = make_request("GET", "x", headers=[("Server", "client-sent")])
    mw.request(envelope)
    assert envelope.details.headers.get("Server") == "client-sent"
    response = ResponseEnvelope(headers=[("Server", "upstream/1.0"), ("Content-Type", "text/plain")])
    assert mw.response(envelope, response) is None
    assert response.headers.items() == [("Content-Type", "text/plain"), ("Strict-Transport-Security", "max-age=1")]


# -- Metadata references ------------------------------------------------------


def test_set_from_metadata():
    mw = build(request={"set": {"X-Client": "id=${metadata.client_id}; sub=${metadata.jwt.sub}"}})
    out = request_headers(mw, [], {"client_id": "c1", "jwt.sub": "u-9"})
    assert out == [("X-Client", "id=c1; sub=u-9")]


def test_missing_metadata_skips_the_rule_unless_there_is_a_fallback():
    mw = build(request={"set": {"X-A": "${metadata.a}"}, "add": {"X-B": ["${metadata.b:-none}", "${metadata.c}"]}})
    out = request_headers(mw, [("X-A", "original")], {})
    assert out == [("X-A", "original"), ("X-B", "none")]
    out = request_headers(mw, [], {"a": "1", "b": "2", "c": "3"})
    assert out == [("X-A", "1"), ("X-B", "2"), ("X-B", "3")]


def test_empty_fallback_and_literal_dollar():
    mw = build(request={"set": {"X-A": "$5 ${metadata.a:-}!", "X-B": "{a}$"}})
    assert request_headers(mw, []) == [("X-A", "$5 !"), ("X-B", "{a}$")]


def test_response_metadata_overrides_request_metadata():
    mw = build(response={"set": {"X-Where": "${metadata.where}", "X-Req": "${metadata.req}"}})
    envelope = make_request()
    envelope.metadata.update({"where": "request", "req": "r"})
    response = ResponseEnvelope(metadata={"where": "response"})
    mw.response(envelope, response)
    assert response.headers.get("X-Where") == "response"
    assert response.headers.get("X-Req") == "r"
    assert envelope.metadata == {"where": "request", "req": "r"}


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "nul\x00", "\u4e2d\u6587"])
def test_metadata_value_that_is_not_a_valid_header_value_is_skipped_and_not_logged(value, monkeypatch):
    events = []
    monkeypatch.setattr(header_module, "log", Logger(namespace="test", observer=events.append))
    mw = build(request={"set": {"X-A": "v=${metadata.a}"}})
    assert request_headers(mw, [("X-A", "old")], {"a": value}) == [("X-A", "old")]
    assert len(events) == 1
    assert events[0]["header"] == "X-A"
    assert value not in repr(events[0])


def test_latin1_and_tab_values_are_accepted():
    mw = build(request={"set": {"X-A": "caf\u00e9\t${metadata.a}"}})
    assert request_headers(mw, [], {"a": "\u00fc"}) == [("X-A", "caf\u00e9\t\u00fc")]


def test_template_parts():
    t = Template("a${metadata.x}b${metadata.y:-z}")
    assert t.parts == ("a", ("x", None), "b", ("y", "z"))
    assert not t.static
    assert t.render({"x": 1}) == "a1bz"
    assert Template("plain").static


# -- Configuration errors ---------------------------------------------------------


def test_unknown_side_and_unknown_operation():
    assert error(requests={}) == 'p.toml: middleware.h.options.requests: unknown key "requests" (did you mean "request"?)'
    assert error(request={"delete": ["a"]}) == 'p.toml: middleware.h.options.request.delete: unknown key "delete"'
    assert error(request=[]).endswith("request: expected table, got an array")


@pytest.mark.parametrize("op", ["set", "add"])
@pytest.mark.parametrize("name", ["Connection", "keep-alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
                                  "Proxy-Authorization", "Proxy-Authenticate", "Content-Length"])
def test_hop_by_hop_headers_cannot_be_added(op, name):
    message = error(response={op: {name: "x"}})
    assert message.startswith(f"p.toml: middleware.h.options.response.{op}.{name}: ")
    assert "hop-by-hop" in message


def test_hop_by_hop_header_cannot_be_a_rename_target_but_can_be_removed():
    assert "hop-by-hop" in error(request={"rename": {"X-A": "Connection"}})
    mw = build(request={"remove": ["Connection"]})
    assert request_headers(mw, [("Connection", "close")]) == []


def test_bad_header_names():
    assert error(request={"set": {"X A": "v"}}).endswith("request.set.X A: 'X A' is not a valid header name")
    assert error(request={"remove": ["X:A"]}).endswith("request.remove.0: 'X:A' is not a valid header name")
    assert error(request={"remove": [""]}).endswith("request.remove.0: must not be empty")
    assert error(request={"rename": {"X-A": "B C"}}).endswith("request.rename.X-A: 'B C' is not a valid header name")
    assert error(request={"rename": {"X(": "B"}}).endswith("request.rename.X(: 'X(' is not a valid header name")


def test_a_name_has_one_rule_per_side():
    assert error(request={"set": {"X-A": "1"}, "add": {"x-a": "2"}}).endswith(
        "request.add.x-a: header 'x-a' already has a rule on this side (set.X-A)"
    )
    assert "already has a rule" in error(request={"remove": ["X-A"], "set": {"X-A": "1"}})
    assert "already has a rule" in error(request={"rename": {"X-A": "X-B"}, "set": {"X-B": "1"}})
    assert "already has a rule" in error(request={"set": {"X-A": "1", "x-a": "2"}})
    assert "already has a rule" in error(request={"remove": ["X-A", "x-a"]})
    # The same name on both sides is fine.
    build(request={"set": {"X-A": "1"}}, response={"set": {"X-A": "2"}})


@pytest.mark.parametrize(
    "value, problem",
    [
        ("${env.HOME}", "unknown reference ${env.HOME}"),
        ("${HOME}", "unknown reference ${HOME}"),
        ("${metadata.}", "unknown reference ${metadata.}"),
        ("${metadata.a:b}", "unknown reference ${metadata.a:b}"),
        ("${metadata.a", "unclosed '${'"),
        ("a\r\nb", "control characters"),
        ("\u4e2d", "outside ISO-8859-1"),
        ("${metadata.a:-\r}", "control characters"),
    ],
)
def test_bad_values(value, problem):
    message = error(request={"set": {"X-A": value}})
    assert message.startswith("p.toml: middleware.h.options.request.set.X-A: ")
    assert problem in message
    assert problem in error(response={"add": {"X-A": ["ok", value]}})


def test_bad_value_types():
    assert error(request={"set": {"X-A": 1}}).endswith("request.set.X-A: expected string, got 1")
    assert error(request={"add": {"X-A": []}}).endswith("request.add.X-A: must not be empty")
    assert error(request={"add": {"X-A": True}}).endswith("expected string or array of strings, got true")
    assert error(request={"add": {"X-A": ["a", 2]}}).endswith("request.add.X-A.1: expected string, got 2")
    assert error(request={"remove": "X-A"}).endswith('request.remove: expected array of string, got "X-A"')
    assert error(request={"set": ["X-A"]}).endswith("request.set: expected table, got an array")


# -- Loaded from TOML: ${metadata.KEY} survives environment substitution -------------


def _registry():
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType("header", HeaderMiddleware, OPTIONS))
    return registry


def test_loaded_from_toml_with_metadata_and_environment_references(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["h"])
        + """
[middleware.h]
type = "header"
[middleware.h.options.request]
set = { "X-Client" = "${metadata.client_id:-anon}", "X-Env" = "${DEPLOY_ENV:-dev}" }
[middleware.h.options.response]
remove = ["Server"]
"""
    }
    config = load(tmp_path, PROXY + NETWORK, pipelines, environ={"DEPLOY_ENV": "prod"}, registry=_registry())
    mw = HeaderMiddleware("h", config.middleware["h"].options)
    assert request_headers(mw, [], {"client_id": "c7"}) == [("X-Client", "c7"), ("X-Env", "prod")]
    response = ResponseEnvelope(headers=Headers([("Server", "x")]))
    mw.response(make_request(), response)
    assert len(response.headers) == 0


def test_toml_error_names_file_and_key(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["h"])
        + """
[middleware.h]
type = "header"
[middleware.h.options.response]
set = { "Transfer-Encoding" = "chunked" }
"""
    }
    e = load_error(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert str(e).startswith("pipelines/p.toml: middleware.h.options.response.set.Transfer-Encoding: ")
