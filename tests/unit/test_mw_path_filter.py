"""
path_filter: allow/deny rules with {param} and {*rest} patterns, methods,
first match wins, the default action, 404/403, and every config error.
"""

import json

import pytest
from _deferreds import result_of
from zope.interface.verify import verifyObject

from _configfiles import NETWORK, PROXY, load, load_error, pipeline
from _fakes import FakeBackend, FakeEndpoint, make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.errors import Forbidden, NotFound
from harmony.interfaces import IMiddleware
from harmony.middleware.path_filter import OPTIONS, PathFilter, compile_pattern
from harmony.pipeline import PipelineExecutor
from harmony.registry import MiddlewareType, builtin_registry


def options(**values):
    return OPTIONS.validate(values, Where("p.toml", ("middleware", "pf", "options")))


def build(**values):
    return PathFilter("pf", options(**values))


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return str(info.value)


def passes(mw, path, method="GET"):
    try:
        assert mw.request(make_request(method, path)) is None
    except (NotFound, Forbidden):
        return False
    return True


def test_provides_imiddleware():
    mw = build(rules=["/Patient"])
    assert verifyObject(IMiddleware, mw)
    assert mw.response(make_request(), None) is None


# -- The Rust Harmony form: a list of allowed patterns ---------------------


def test_string_rules_allow_listed_paths_and_deny_the_rest_with_404():
    mw = build(rules=["/ImagingStudy", "/Patient/{id}"])
    assert passes(mw, "ImagingStudy")
    assert passes(mw, "Patient/123")
    assert not passes(mw, "ImagingStudy/series")
    assert not passes(mw, "Patient")
    assert not passes(mw, "Observation")
    with pytest.raises(NotFound):
        mw.request(make_request("GET", "Observation"))


def test_trailing_slash_and_empty_segments_are_ignored():
    mw = build(rules=["/ImagingStudy", "/Patient/{id}/"])
    assert passes(mw, "ImagingStudy/")
    assert passes(mw, "Patient//7")
    assert passes(mw, "Patient/7/")


def test_root_rule_matches_the_endpoint_root_only():
    mw = build(rules=["/"])
    assert passes(mw, "")
    assert passes(mw, "/")
    assert not passes(mw, "x")


def test_matching_is_case_sensitive():
    mw = build(rules=["/Patient"])
    assert not passes(mw, "patient")


def test_percent_encoded_segments_are_decoded_before_matching():
    mw = build(rules=["/Patient/{id}"])
    assert passes(mw, "Pat%69ent/a%20b")


def test_encoded_slash_or_backslash_in_a_segment_is_always_denied():
    mw = build(rules=[{"deny": "/admin/{*rest}"}], default="allow")
    assert passes(mw, "other")
    assert not passes(mw, "admin%2Fsecret")
    assert not passes(mw, "x%2fy")
    assert not passes(mw, "x%5Cy")


# -- Patterns ---------------------------------------------------------------


def test_param_matches_exactly_one_segment():
    mw = build(rules=["/Patient/{id}/_history/{vid}"])
    assert passes(mw, "Patient/1/_history/2")
    assert not passes(mw, "Patient/1/_history")
    assert not passes(mw, "Patient/1/_history/2/3")


def test_rest_matches_zero_or_more_segments():
    mw = build(rules=["/Observation/{*rest}"])
    assert passes(mw, "Observation")
    assert passes(mw, "Observation/1")
    assert passes(mw, "Observation/1/_history/2")
    assert not passes(mw, "ObservationX")


def test_star_matches_every_path():
    mw = build(rules=[{"deny": "/secret"}, {"allow": "*"}])
    assert passes(mw, "")
    assert passes(mw, "a/b/c")
    assert not passes(mw, "secret")


def test_pattern_captures_params():
    pattern = compile_pattern("/Patient/{id}/{*rest}")
    assert pattern.match(["Patient", "1", "a", "b"]) == {"id": "1", "rest": "a/b"}
    assert pattern.match(["Patient", "1"]) == {"id": "1", "rest": ""}
    assert pattern.match(["Patient"]) is None


# -- Allow/deny tables, methods, first match, default -------------------------


def test_first_matching_rule_wins():
    mw = build(rules=[{"deny": "/Patient/{id}/$everything"}, {"allow": "/Patient/{*rest}"}])
    assert not passes(mw, "Patient/1/$everything")
    assert passes(mw, "Patient/1")
    mw = build(rules=[{"allow": "/Patient/{*rest}"}, {"deny": "/Patient/{id}/$everything"}])
    assert passes(mw, "Patient/1/$everything")


def test_rule_methods_restrict_a_rule_and_get_covers_head():
    mw = build(rules=[{"allow": "/Patient/{id}", "methods": ["get"]}, {"allow": "/Patient", "methods": ["POST"]}])
    assert passes(mw, "Patient/1", "GET")
    assert passes(mw, "Patient/1", "HEAD")
    assert not passes(mw, "Patient/1", "DELETE")
    assert passes(mw, "Patient", "POST")
    assert not passes(mw, "Patient", "GET")


def test_deny_rule_with_methods():
    mw = build(rules=[{"deny": "/{*rest}", "methods": ["DELETE"]}])
    assert passes(mw, "Patient/1", "GET")
    assert not passes(mw, "Patient/1", "DELETE")


def test_default_is_allow_when_every_rule_denies():
    mw = build(rules=[{"deny": "/admin/{*rest}"}])
    assert mw.default_allow
    assert passes(mw, "Patient")
    assert not passes(mw, "admin")


def test_default_is_deny_when_any_rule_allows():
    mw = build(rules=[{"deny": "/Patient/secret"}, {"allow": "/Patient/{id}"}])
    assert not mw.default_allow
    assert not passes(mw, "Observation")


def test_explicit_default():
    assert passes(build(rules=["/a"], default="allow"), "b")
    assert not passes(build(rules=[{"deny": "/a"}], default="deny"), "b")


def test_deny_status_403():
    mw = build(rules=["/a"], deny_status=403)
    with pytest.raises(Forbidden):
        mw.request(make_request("GET", "b"))


# -- Through the executor: the status is kept, the body is JSON ---------------


@pytest.mark.parametrize("status", [404, 403])
def test_denied_request_is_rendered_with_its_status_and_json_body(status):
    backend = FakeBackend()
    executor = PipelineExecutor("p", [build(rules=["/ok"], deny_status=status)], [], [backend])
    response = result_of(executor.execute(FakeEndpoint(), make_request("GET", "nope")))
    assert response.status == status
    assert json.loads(response.body)["error"] == ("not_found" if status == 404 else "forbidden")
    assert backend.calls == []
    response = result_of(executor.execute(FakeEndpoint(), make_request("GET", "ok")))
    assert response.status == 200
    assert len(backend.calls) == 1


# -- Configuration errors -------------------------------------------------------


def test_rules_are_required():
    assert error() == "p.toml: middleware.pf.options.rules: required key is missing"


def test_rules_must_not_be_empty():
    assert error(rules=[]) == "p.toml: middleware.pf.options.rules: at least one rule is required"


def test_rules_must_be_an_array():
    assert "expected array of rules" in error(rules="/a")


def test_rule_must_be_string_or_table():
    assert error(rules=[3]).startswith("p.toml: middleware.pf.options.rules.0: expected a pattern string")


def test_rule_needs_exactly_one_action():
    assert error(rules=[{"methods": ["GET"]}]).endswith("rules.0: a rule needs exactly one of allow or deny")
    assert error(rules=[{"allow": "/a", "deny": "/b"}]).endswith("a rule needs exactly one of allow or deny")


def test_rule_unknown_key_with_hint():
    message = error(rules=[{"allow": "/a", "method": ["GET"]}])
    assert message == 'p.toml: middleware.pf.options.rules.0.method: unknown key "method" (did you mean "methods"?)'


def test_rule_pattern_must_be_a_string():
    assert error(rules=[{"deny": 5}]).endswith("rules.0.deny: expected string, got 5")


@pytest.mark.parametrize(
    "pattern, problem",
    [
        ("Patient", "must start with '/'"),
        ("/a//b", "empty segment"),
        ("/a/{id}/{id}", "uses {id} twice"),
        ("/a/{*rest}/b", "must be the last segment"),
        ("/a/x{id}", "is not a literal or a whole {param}"),
        ("/a/{1x}", "is not a literal or a whole {param}"),
        ("/a/{}", "is not a literal or a whole {param}"),
        ("/a/}", "is not a literal or a whole {param}"),
    ],
)
def test_bad_patterns_are_startup_errors(pattern, problem):
    assert problem in error(rules=["/ok", pattern])
    assert error(rules=["/ok", pattern]).startswith("p.toml: middleware.pf.options.rules.1: ")
    assert error(rules=[{"allow": pattern}]).startswith("p.toml: middleware.pf.options.rules.0.allow: ")


def test_empty_pattern():
    assert error(rules=[""]).endswith("must start with '/' (or be '*')")
    assert error(rules=[{"deny": " "}]).endswith("rules.0.deny: must not be empty")


def test_bad_methods():
    assert error(rules=[{"allow": "/a", "methods": []}]).endswith(
        "rules.0.methods: must not be empty (leave it out to match every method)"
    )
    assert error(rules=[{"allow": "/a", "methods": ["GE T"]}]).endswith("rules.0.methods.0: 'GE T' is not a method")
    assert error(rules=[{"allow": "/a", "methods": "GET"}]).endswith('rules.0.methods: expected array of string, got "GET"')


def test_bad_default_and_status():
    assert error(rules=["/a"], default="block").endswith('default: expected one of allow, deny, got "block"')
    assert error(rules=["/a"], deny_status=500).endswith("deny_status: expected 403 or 404, got 500")
    assert error(rules=["/a"], deny_status="404").endswith('deny_status: expected integer, got "404"')


def test_unknown_option():
    assert error(rules=["/a"], rule=["/b"]) == (
        'p.toml: middleware.pf.options.rule: unknown key "rule" (did you mean "rules"?)'
    )


# -- Loaded from TOML ---------------------------------------------------------------


def _registry():
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType("path_filter", PathFilter, OPTIONS))
    return registry


def test_loaded_from_a_pipeline_file(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["pf"])
        + """
[middleware.pf]
type = "path_filter"
[middleware.pf.options]
rules = ["/ImagingStudy", { deny = "/Patient/{id}/$everything", methods = ["GET"] }, { allow = "/Patient/{*rest}" }]
deny_status = 403
"""
    }
    config = load(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    mw = PathFilter("pf", config.middleware["pf"].options)
    assert passes(mw, "Patient/1")
    assert not passes(mw, "Patient/1/$everything")
    assert not passes(mw, "Observation")


def test_toml_error_names_file_and_key(tmp_path):
    pipelines = {
        "p.toml": pipeline("p", middleware=["pf"])
        + """
[middleware.pf]
type = "path_filter"
[middleware.pf.options]
rules = ["/ok", { allow = "/a/{*rest}/b" }]
"""
    }
    e = load_error(tmp_path, PROXY + NETWORK, pipelines, registry=_registry())
    assert str(e).startswith("pipelines/p.toml: middleware.pf.options.rules.1.allow: pattern '/a/{*rest}/b'")
