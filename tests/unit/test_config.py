"""
Tests for L{harmony.config}: loading, merging the pipelines directory,
environment substitution, validation errors (message, file and key path),
legacy keys, frozen results, and route conflicts found by
L{harmony.gateway.build_gateway}.
"""

import os
import sys
import textwrap
import uuid

import attr
import pytest

from _configfiles import NETWORK, PROXY, load, load_error, pipeline, write_config
from harmony.backends.echo import OPTIONS as ECHO_OPTIONS
from harmony.backends.echo import EchoBackend
from harmony.config import ConfigError, HarmonyConfig, Options, load_config
from harmony.config.loader import substitute_env
from harmony.config.schema import Field, Int, Schema, Where
from harmony.endpoints.http import HttpEndpoint
from harmony.gateway import build_gateway
from harmony.middleware.passthru import Passthru
from harmony.registry import BuildContext, MiddlewareType, ServiceType, builtin_registry, default_registry

ETC = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "etc", "harmony.toml")

BASIC = PROXY + NETWORK + pipeline("api")


def assert_error(error, file, keypath, message):
    """
    C{error} names C{file} and C{keypath} (dotted) and says C{message}.
    """
    assert error.file == file
    assert error.key == keypath
    assert error.message == message
    expected = ": ".join(p for p in (file, keypath, message) if p)
    assert str(error) == expected


# ConfigError ---------------------------------------------------------------


def test_error_str_names_file_and_key_path():
    error = ConfigError("expected number, got \"abc\"", "pipelines/b.toml",
                        ("backends", "pacs", "options", "timeout_secs"))
    assert str(error) == 'pipelines/b.toml: backends.pacs.options.timeout_secs: expected number, got "abc"'
    assert error.keypath == ("backends", "pacs", "options", "timeout_secs")
    assert error.key == "backends.pacs.options.timeout_secs"
    assert error.args == (str(error),)


def test_error_without_file_or_key_path():
    assert str(ConfigError("boom")) == "boom"
    assert str(ConfigError("boom", "a.toml")) == "a.toml: boom"
    assert str(ConfigError("boom", keypath=("x", 0))) == "x.0: boom"
    assert ConfigError("boom", keypath=("x", 0)).keypath == ("x", "0")


# Loading a valid configuration -------------------------------------------------


def test_minimal_config_defaults(tmp_path):
    config = load(tmp_path, PROXY)
    assert isinstance(config, HarmonyConfig)
    assert config.proxy.id == "test-gw"
    assert config.proxy.log_level == "info"
    assert config.proxy.pipelines_path == "pipelines"
    assert config.proxy.transforms_path == "transforms"
    assert config.proxy.public_base_url == ""
    assert config.proxy.trusted_proxies == ()
    assert config.proxy.content_limits.max_body_size == 10 * 1024 * 1024
    assert dict(config.proxy.content_limits) == {
        "max_body_size": 10485760,
        "max_csv_rows": 10000,
        "max_xml_depth": 100,
        "max_multipart_files": 10,
        "max_form_fields": 1000,
    }
    assert config.logging.log_to_file is False
    assert config.logging.log_file_path == "./tmp/harmony.log"
    assert config.storage.backend == "filesystem"
    assert config.management.enabled is False
    assert config.management.base_path == "admin"
    assert dict(config.networks) == {}
    assert dict(config.pipelines) == {}
    assert config.warnings == ()
    assert config.path == str(tmp_path / "harmony.toml")
    assert config.base_dir == str(tmp_path)
    assert config.files == (str(tmp_path / "harmony.toml"),)


def test_resolve_path_is_relative_to_base_dir(tmp_path):
    config = load(tmp_path, PROXY)
    assert config.resolve_path("tmp/x") == str(tmp_path / "tmp" / "x")
    assert config.resolve_path("../y") == os.path.normpath(str(tmp_path / ".." / "y"))
    assert config.resolve_path("/abs/z") == "/abs/z"


def test_basic_pipeline(tmp_path):
    config = load(tmp_path, BASIC)
    net = config.networks["main"]
    assert net.http.bind_address == "127.0.0.1"
    assert net.http.bind_port == 0
    assert net.enable_wireguard is False
    endpoint = config.endpoints["api_in"]
    assert endpoint.name == "api_in"
    assert endpoint.service == "http"
    assert endpoint.options.path_prefix == "/api"
    assert endpoint.file == "harmony.toml"
    assert config.backends["api_out"].service == "echo"
    p = config.pipelines["api"]
    assert p.name == "api"
    assert p.networks == ("main",)
    assert p.endpoints == ("api_in",)
    assert p.backends == ("api_out",)
    assert p.request_middleware == ()
    assert p.response_middleware == ()
    assert p.failover_non_idempotent is False
    assert p.file == "harmony.toml"
    assert config.warnings == ()


def test_shipped_config(tmp_path):
    config = load_config(ETC, registry=builtin_registry(), environ={})
    assert config.proxy.id == "harmony-default"
    assert list(config.pipelines) == ["echo"]
    assert config.pipelines["echo"].file == os.path.join("pipelines", "echo.toml")
    assert config.endpoints["echo"].options.path_prefix == "/echo"
    assert config.networks["default"].http.bind_port == 8080
    assert config.warnings == ()


def test_default_registry_and_environment(tmp_path, monkeypatch):
    """
    Without a registry and environment, load_config uses the default
    registry (built-ins + plugins) and os.environ.
    """
    monkeypatch.setenv("HARMONY_TEST_ID", "from-env")
    path = write_config(tmp_path, '[proxy]\nid = "${HARMONY_TEST_ID}"\n' + NETWORK + pipeline("api"))
    config = load_config(path)
    assert config.proxy.id == "from-env"
    assert config.endpoints["api_in"].service == "http"


def test_log_level_is_case_insensitive(tmp_path):
    config = load(tmp_path, '[proxy]\nid = "x"\nlog_level = "DEBUG"\n')
    assert config.proxy.log_level == "debug"


def test_service_type_is_case_insensitive(tmp_path):
    config = load(tmp_path, BASIC.replace('service = "http"', 'service = "HTTP"'))
    assert config.endpoints["api_in"].service == "http"


def test_number_option_is_a_float(tmp_path):
    config = load(tmp_path, PROXY + NETWORK + pipeline("api", backend="http://up.example:8042"))
    assert config.backends["api_out"].service == "http"
    assert config.backends["api_out"].options.base_url == "http://up.example:8042"
    assert config.backends["api_out"].options.timeout_secs == 30.0
    config = load(
        tmp_path,
        PROXY + NETWORK + pipeline("api", backend="https://up") + "timeout_secs = 5\n",
    )
    assert config.backends["api_out"].options.timeout_secs == 5.0
    assert isinstance(config.backends["api_out"].options.timeout_secs, float)


# Base file errors ------------------------------------------------------------


def test_base_file_must_be_toml(tmp_path):
    error = load_error(tmp_path, PROXY, name="harmony.conf")
    assert_error(error, "harmony.conf", "", "the configuration file must have a .toml extension")


def test_base_file_missing(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.toml"), registry=builtin_registry(), environ={})
    assert_error(info.value, "absent.toml", "", "file not found")


def test_base_file_unreadable(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "dir.toml"), registry=builtin_registry(), environ={})
    assert info.value.file == "dir.toml"
    assert info.value.message.startswith("cannot read file: ")


def test_invalid_toml_names_file_line_and_column(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "x"\nport = = 1\n')
    assert error.file == "harmony.toml"
    assert error.keypath == ()
    assert error.message.startswith("invalid TOML: ")
    assert "line 3, column 8" in error.message
    assert str(error).startswith("harmony.toml: invalid TOML: ")


def test_invalid_toml_at_end_of_document_names_line_and_column(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "x"\ntrusted_proxies = ["a",')
    assert_error(
        error, "harmony.toml", "",
        "invalid TOML: Invalid value (at end of document, line 3, column 24)",
    )


def test_file_not_utf8(tmp_path):
    path = tmp_path / "harmony.toml"
    path.write_bytes(b'[proxy]\nid = "gw-\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), registry=builtin_registry(), environ={})
    assert_error(info.value, "harmony.toml", "", "invalid TOML: not UTF-8 (at line 2, byte 17)")


def test_proxy_missing(tmp_path):
    error = load_error(tmp_path, '[logging]\nlog_to_file = false\n')
    assert_error(error, "harmony.toml", "proxy", "required table is missing ([proxy] with id)")


def test_empty_file(tmp_path):
    error = load_error(tmp_path, "")
    assert_error(error, "harmony.toml", "proxy", "required table is missing ([proxy] with id)")


def test_proxy_not_a_table(tmp_path):
    error = load_error(tmp_path, 'proxy = "x"\n')
    assert_error(error, "harmony.toml", "proxy", "expected table")


def test_proxy_id_missing(tmp_path):
    error = load_error(tmp_path, '[proxy]\nlog_level = "info"\n')
    assert_error(error, "harmony.toml", "proxy.id", "required key is missing")


@pytest.mark.parametrize("value", ['""', '"   "'])
def test_proxy_id_empty(tmp_path, value):
    error = load_error(tmp_path, f"[proxy]\nid = {value}\n")
    assert_error(error, "harmony.toml", "proxy.id", "must not be empty")


def test_bad_log_level(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "x"\nlog_level = "loud"\n')
    assert_error(
        error,
        "harmony.toml",
        "proxy.log_level",
        'expected one of trace, debug, info, warn, error, got "loud"',
    )


def test_public_base_url_must_be_http(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "x"\npublic_base_url = "gw.example.org"\n')
    assert_error(
        error,
        "harmony.toml",
        "proxy.public_base_url",
        'expected an http:// or https:// URL, got "gw.example.org"',
    )


def test_unknown_top_level_key_with_hint(tmp_path):
    error = load_error(tmp_path, PROXY + '[pipeline.x]\nendpoints = []\n')
    assert_error(error, "harmony.toml", "pipeline", 'unknown key "pipeline" (did you mean "pipelines"?)')


def test_unknown_top_level_key_without_hint(tmp_path):
    error = load_error(tmp_path, PROXY + '[zzzz]\na = 1\n')
    assert_error(error, "harmony.toml", "zzzz", 'unknown key "zzzz"')


@pytest.mark.parametrize(
    "text, keypath, message",
    [
        (
            '[proxy]\nid = "x"\nlog_levle = "info"\n',
            "proxy.log_levle",
            'unknown key "log_levle" (did you mean "log_level"?)',
        ),
        (
            PROXY + '[proxy.content_limits]\nmax_body_sise = 1\n',
            "proxy.content_limits.max_body_sise",
            'unknown key "max_body_sise" (did you mean "max_body_size"?)',
        ),
        (
            PROXY + '[network.main.http]\nbind_prot = 1\n',
            "network.main.http.bind_prot",
            'unknown key "bind_prot" (did you mean "bind_port"?)',
        ),
        (
            PROXY + NETWORK + pipeline("api").replace("endpoints = [", "endpoint = ["),
            "pipelines.api.endpoint",
            'unknown key "endpoint" (did you mean "endpoints"?)',
        ),
        (
            PROXY + '[logging]\nlog_to_fil = true\n',
            "logging.log_to_fil",
            'unknown key "log_to_fil" (did you mean "log_to_file"?)',
        ),
        (
            PROXY + '[middleware.m]\ntyp = "passthru"\n',
            "middleware.m.typ",
            'unknown key "typ" (did you mean "type"?)',
        ),
        (
            PROXY + NETWORK + pipeline("api") + 'path_prefx = "/x"\n',
            "backends.api_out.path_prefx",
            'unknown key "path_prefx"',
        ),
        (
            PROXY + NETWORK + pipeline("api").replace('path_prefix = "/api"', 'path_prefix = "/api"\nprefix = "/x"'),
            "endpoints.api_in.options.prefix",
            'unknown key "prefix" (did you mean "path_prefix"?)',
        ),
        (
            PROXY + NETWORK + pipeline("api", backend="http://u") + "timeout = 3\n",
            "backends.api_out.options.timeout",
            'unknown key "timeout" (did you mean "timeout_secs"?)',
        ),
    ],
)
def test_unknown_key_in_table(tmp_path, text, keypath, message):
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", keypath, message)


@pytest.mark.parametrize(
    "text, keypath, message",
    [
        ('[proxy]\nid = 5\n', "proxy.id", "expected string, got 5"),
        (PROXY + '[proxy.content_limits]\nmax_body_size = "big"\n',
         "proxy.content_limits.max_body_size", 'expected integer, got "big"'),
        (PROXY + '[proxy.content_limits]\nmax_body_size = 1.5\n',
         "proxy.content_limits.max_body_size", "expected integer, got 1.5"),
        (PROXY + '[proxy.content_limits]\nmax_csv_rows = 0\n',
         "proxy.content_limits.max_csv_rows", "must be at least 1, got 0"),
        (PROXY.replace('id = "test-gw"', 'id = "x"\ncontent_limits = 3'),
         "proxy.content_limits", "expected table, got 3"),
        (PROXY.replace('id = "test-gw"', 'id = "x"\ntrusted_proxies = "10.0.0.1"'),
         "proxy.trusted_proxies", 'expected array of string, got "10.0.0.1"'),
        (PROXY.replace('id = "test-gw"', 'id = "x"\ntrusted_proxies = ["10.0.0.1", 2]'),
         "proxy.trusted_proxies.1", "expected string, got 2"),
        (PROXY + '[network.main.http]\nbind_port = true\n',
         "network.main.http.bind_port", "expected integer, got true"),
        (PROXY + '[network.main.http]\nbind_port = "80"\n',
         "network.main.http.bind_port", 'expected integer, got "80"'),
        (PROXY + '[network.main.http]\nbind_port = 70000\n',
         "network.main.http.bind_port", "must be at most 65535, got 70000"),
        (PROXY + '[network.main.http]\nbind_port = -1\n',
         "network.main.http.bind_port", "must be at least 0, got -1"),
        (PROXY + '[network.main]\nhttp = [1]\n',
         "network.main.http", "expected table, got an array"),
        (PROXY + '[network.main]\nenable_wireguard = "yes"\n',
         "network.main.enable_wireguard", 'expected boolean, got "yes"'),
        (PROXY + '[network]\nmain = 1\n', "network.main", "expected table, got 1"),
        (PROXY + '[logging]\nlog_to_file = 1\n', "logging.log_to_file", "expected boolean, got 1"),
        (PROXY + '[storage]\nbackend = "s3"\n', "storage.backend",
         'expected one of filesystem, got "s3"'),
        (PROXY + '[storage]\noptions = "x"\n', "storage.options", 'expected table, got "x"'),
        (PROXY + '[management]\nbase_path = {a = 1}\n', "management.base_path",
         "expected string, got a table"),
        (PROXY + '[endpoints]\ne = 1\n', "endpoints.e", "expected table, got 1"),
        (PROXY + '[endpoints.e]\nservice = 1\n', "endpoints.e.service", "expected string, got 1"),
        (PROXY + '[endpoints.e]\nservice = "http"\noptions = []\n', "endpoints.e.options",
         "expected table, got an array"),
        (PROXY + '[endpoints.e]\noptions = {}\n', "endpoints.e.service", "required key is missing"),
        (PROXY + NETWORK + pipeline("api").replace('"/api"', "7"),
         "endpoints.api_in.options.path_prefix", "expected string, got 7"),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = "main"'),
         "pipelines.api.networks", 'expected array of string, got "main"'),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = [["main"]]'),
         "pipelines.api.networks.0", "expected string, got an array"),
        (PROXY + NETWORK + pipeline("api").replace('endpoints = ["api_in"]', 'endpoints = ["api_in", "api_in"]'),
         "pipelines.api.endpoints.1", '"api_in" is listed twice'),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\nmiddleware = 1'),
         "pipelines.api.middleware", "expected array of middleware names or a table with left/right, got 1"),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\nmiddleware = [""]'),
         "pipelines.api.middleware.0", "must not be empty"),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\nmiddleware = {left = "passthru"}'),
         "pipelines.api.middleware.left", 'expected array of string, got "passthru"'),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\nmiddleware = {lefft = []}'),
         "pipelines.api.middleware.lefft", 'unknown key "lefft" (did you mean "left"?)'),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\nfailover_non_idempotent = "no"'),
         "pipelines.api.failover_non_idempotent", 'expected boolean, got "no"'),
        (PROXY + NETWORK + pipeline("api").replace('networks = ["main"]', 'networks = ["main"]\ndescription = 3'),
         "pipelines.api.description", "expected string, got 3"),
        (PROXY + NETWORK + pipeline("api", backend="http://u") + 'timeout_secs = "abc"\n',
         "backends.api_out.options.timeout_secs", 'expected number, got "abc"'),
        (PROXY + NETWORK + pipeline("api", backend="http://u") + "timeout_secs = true\n",
         "backends.api_out.options.timeout_secs", "expected number, got true"),
        (PROXY + '[middleware.m]\ntype = ["passthru"]\n', "middleware.m.type",
         "expected string, got an array"),
    ],
)
def test_wrong_types(tmp_path, text, keypath, message):
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", keypath, message)


def test_table_defined_twice_is_a_toml_error(tmp_path):
    error = load_error(tmp_path, PROXY + "[proxy]\n")
    assert error.file == "harmony.toml"
    assert error.message.startswith("invalid TOML: ")
    assert error.message == "invalid TOML: Cannot declare ('proxy',) twice (at line 4, column 7)"


def test_top_level_table_not_a_table(tmp_path):
    error = load_error(tmp_path, 'endpoints = 1\n' + PROXY)
    assert_error(error, "harmony.toml", "endpoints", "expected table")


# Pipelines directory ----------------------------------------------------------


def test_pipelines_files_load_in_sorted_order(tmp_path):
    files = {
        "b.toml": pipeline("bravo", "/b"),
        "10-c.toml": pipeline("charlie", "/c"),
        "a.toml": pipeline("alpha", "/a"),
    }
    config = load(tmp_path, PROXY + NETWORK, files)
    pdir = tmp_path / "pipelines"
    assert config.files == (
        str(tmp_path / "harmony.toml"),
        str(pdir / "10-c.toml"),
        str(pdir / "a.toml"),
        str(pdir / "b.toml"),
    )
    assert list(config.pipelines) == ["charlie", "alpha", "bravo"]
    assert config.pipelines["alpha"].file == "pipelines/a.toml"
    assert config.pipelines["charlie"].file == "pipelines/10-c.toml"
    assert config.endpoints["bravo_in"].file == "pipelines/b.toml"
    assert config.backends["bravo_out"].file == "pipelines/b.toml"


def test_pipelines_dir_ignores_other_files(tmp_path):
    files = {"a.toml": pipeline("alpha", "/a"), "README.txt": "not = = toml", "a.toml.bak": "x = ="}
    path = write_config(tmp_path, PROXY + NETWORK, files)
    (tmp_path / "pipelines" / "sub.toml").mkdir()
    (tmp_path / "pipelines" / "sub.toml" / "x.toml").write_text("x = = 1")
    config = load_config(path, registry=builtin_registry(), environ={})
    assert list(config.pipelines) == ["alpha"]
    assert len(config.files) == 2


def test_pipelines_path_is_configurable(tmp_path):
    base = '[proxy]\nid = "x"\npipelines_path = "conf.d"\n' + NETWORK
    config = load(tmp_path, base, {"p.toml": pipeline("alpha")}, pipelines_dir="conf.d")
    assert config.pipelines["alpha"].file == "conf.d/p.toml"
    # A pipelines_path that does not exist is no pipelines.
    config = load(tmp_path, base.replace("conf.d", "nowhere"))
    assert dict(config.pipelines) == {}


def test_base_file_and_pipelines_merge(tmp_path):
    """
    Entries from the base file and pipelines files are merged by name; a
    pipeline may use a backend defined in another file.
    """
    base = PROXY + NETWORK + '[backends.shared]\nservice = "echo"\n'
    files = {
        "a.toml": """
            [pipelines.a]
            networks = ["main"]
            endpoints = ["a_in"]
            backends = ["shared"]
            [endpoints.a_in]
            service = "http"
            options = { path_prefix = "/a" }
        """,
    }
    config = load(tmp_path, base, files)
    assert config.pipelines["a"].backends == ("shared",)
    assert config.backends["shared"].file == "harmony.toml"
    assert config.endpoints["a_in"].file == "pipelines/a.toml"


def test_same_name_in_two_pipelines_files(tmp_path):
    files = {
        "b.toml": '[backends.shared]\nservice = "echo"\n',
        "a.toml": '[backends.shared]\nservice = "echo"\n',
    }
    error = load_error(tmp_path, PROXY, files)
    assert_error(
        error,
        "pipelines/b.toml",
        "backends.shared",
        "backends.shared is defined twice: in pipelines/a.toml and in pipelines/b.toml",
    )


def test_same_name_in_base_and_pipelines_file(tmp_path):
    base = PROXY + '[network.main.http]\nbind_port = 0\n'
    error = load_error(tmp_path, base, {"net.toml": '[network.main.http]\nbind_port = 1\n'})
    assert_error(
        error,
        "pipelines/net.toml",
        "network.main",
        "network.main is defined twice: in harmony.toml and in pipelines/net.toml",
    )


def test_pipelines_file_may_not_define_proxy(tmp_path):
    error = load_error(tmp_path, PROXY, {"a.toml": '[proxy]\nid = "other"\n'})
    assert_error(
        error,
        "pipelines/a.toml",
        "proxy",
        "a pipelines file may only define network, endpoints, backends, pipelines, targets, "
        "middleware, middleware_types, services tables",
    )


def test_pipelines_file_may_not_define_logging(tmp_path):
    error = load_error(tmp_path, PROXY, {"a.toml": "[logging]\nlog_to_file = true\n"})
    assert error.file == "pipelines/a.toml"
    assert error.keypath == ("logging",)


def test_pipelines_file_table_must_be_a_table(tmp_path):
    error = load_error(tmp_path, PROXY, {"a.toml": 'endpoints = "x"\n'})
    assert_error(error, "pipelines/a.toml", "endpoints", "expected table")


def test_bad_pipelines_file_is_an_error(tmp_path):
    """
    One pipelines file that does not parse stops loading (the good ones are
    not used without it).
    """
    files = {"a.toml": pipeline("alpha", "/a"), "b.toml": "[pipelines.bravo]\nnetworks = [\n"}
    error = load_error(tmp_path, PROXY + NETWORK, files)
    assert error.file == "pipelines/b.toml"
    assert error.keypath == ()
    assert error.message.startswith("invalid TOML: ")
    assert "line 3, column 1" in error.message
    assert str(error).startswith("pipelines/b.toml: invalid TOML: ")


def test_invalid_pipelines_file_content_names_that_file(tmp_path):
    files = {
        "a.toml": pipeline("alpha", "/a"),
        "b.toml": pipeline("pacs", "/p", backend="http://pacs") + 'timeout_secs = "abc"\n',
    }
    error = load_error(tmp_path, PROXY + NETWORK, files)
    assert str(error) == 'pipelines/b.toml: backends.pacs_out.options.timeout_secs: expected number, got "abc"'


def test_error_in_pipelines_file_network_names_that_file(tmp_path):
    error = load_error(tmp_path, PROXY, {"n.toml": "[network.x.http]\nbind_port = 1.5\n"})
    assert_error(error, "pipelines/n.toml", "network.x.http.bind_port", "expected integer, got 1.5")


def test_pipeline_reference_error_names_pipelines_file(tmp_path):
    files = {"p.toml": pipeline("alpha").replace('backends = ["alpha_out"]', 'backends = ["alpha_ot"]')}
    error = load_error(tmp_path, PROXY + NETWORK, files)
    assert_error(
        error,
        "pipelines/p.toml",
        "pipelines.alpha.backends.0",
        "unknown backend 'alpha_ot' (did you mean 'alpha_out'?)",
    )


# Environment substitution --------------------------------------------------------


def test_env_substitution(tmp_path):
    base = textwrap.dedent(
        """
        [proxy]
        id = "${GW_ID}"
        public_base_url = "${PUBLIC:-https://gw.example.org}"
        trusted_proxies = ["${PROXY1}", "${PROXY2:-10.0.0.2}", "$$literal", "a$b", "$${NOT_A_VAR}"]
        log_level = "${LEVEL:-warn}"
        """
    )
    config = load(tmp_path, base, environ={"GW_ID": "gw-7", "PROXY1": "10.0.0.1", "LEVEL": ""})
    assert config.proxy.id == "gw-7"
    assert config.proxy.public_base_url == "https://gw.example.org"
    assert config.proxy.trusted_proxies == ("10.0.0.1", "10.0.0.2", "$literal", "a$b", "${NOT_A_VAR}")
    # An empty variable takes the default.
    assert config.proxy.log_level == "warn"


def test_env_set_value_beats_default(tmp_path):
    config = load(tmp_path, '[proxy]\nid = "${ID:-dflt}"\n', environ={"ID": "real"})
    assert config.proxy.id == "real"


def test_env_value_is_not_substituted_again(tmp_path):
    config = load(tmp_path, '[proxy]\nid = "${ID}"\n', environ={"ID": "${OTHER}"})
    assert config.proxy.id == "${OTHER}"


def test_env_empty_without_default_is_empty(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "${ID}"\n', environ={"ID": ""})
    assert_error(error, "harmony.toml", "proxy.id", "must not be empty")


def test_env_unset_without_default(tmp_path):
    base = PROXY + NETWORK + pipeline("api", backend="${UPSTREAM}")
    error = load_error(tmp_path, base)
    assert_error(
        error,
        "harmony.toml",
        "backends.api_out.options.base_url",
        "environment variable UPSTREAM is not set (use ${UPSTREAM:-default})",
    )


def test_env_unset_in_array_names_index(tmp_path):
    error = load_error(tmp_path, '[proxy]\nid = "x"\ntrusted_proxies = ["a", "${NOPE}"]\n')
    assert_error(
        error, "harmony.toml", "proxy.trusted_proxies.1",
        "environment variable NOPE is not set (use ${NOPE:-default})",
    )


def test_env_in_pipelines_file(tmp_path):
    files = {"p.toml": pipeline("api", prefix="${PREFIX:-/default}", backend="${UPSTREAM}")}
    config = load(tmp_path, PROXY + NETWORK, files, environ={"UPSTREAM": "https://up.example"})
    assert config.endpoints["api_in"].options.path_prefix == "/default"
    assert config.backends["api_out"].options.base_url == "https://up.example"
    error = load_error(tmp_path, PROXY + NETWORK, files, environ={})
    assert_error(
        error,
        "pipelines/p.toml",
        "backends.api_out.options.base_url",
        "environment variable UPSTREAM is not set (use ${UPSTREAM:-default})",
    )


def test_env_substitution_leaves_non_strings_alone():
    data = {"a": 1, "b": [True, 2.5, "${X}"], "c": {"d": "$$"}}
    assert substitute_env(data, {"X": "y"}, Where("f.toml")) == {
        "a": 1, "b": [True, 2.5, "y"], "c": {"d": "$"}
    }


def test_env_substitution_error_location():
    with pytest.raises(ConfigError) as info:
        substitute_env({"a": {"b": ["ok", "x${MISSING}y"]}}, {}, Where("f.toml"))
    assert str(info.value) == "f.toml: a.b.1: environment variable MISSING is not set (use ${MISSING:-default})"


def test_env_substitution_replaces_several():
    assert substitute_env("${A}-${B:-b}-${A}", {"A": "a"}, Where("f")) == "a-b-a"


# Legacy keys --------------------------------------------------------------------


def test_legacy_proxy_store_dir(tmp_path):
    config = load(tmp_path, '[proxy]\nid = "x"\nstore_dir = "/var/x"\n')
    assert config.warnings == (
        "harmony.toml: proxy.store_dir: deprecated legacy key, ignored (use [storage.options] path)",
    )
    assert "store_dir" not in config.proxy


def test_legacy_echo_backend_path_prefix(tmp_path):
    files = {"p.toml": pipeline("api") + '[backends.api_out.options]\npath_prefix = "/echo"\n'}
    config = load(tmp_path, PROXY + NETWORK, files)
    assert config.warnings == (
        "pipelines/p.toml: backends.api_out.options.path_prefix: deprecated legacy key, "
        "ignored (the echo backend has no prefix)",
    )
    assert dict(config.backends["api_out"].options) == {"parse_body": False}


def test_path_prefix_is_not_legacy_for_http_backend(tmp_path):
    text = PROXY + NETWORK + pipeline("api", backend="http://u") + 'path_prefix = "/x"\n'
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", "backends.api_out.options.path_prefix", 'unknown key "path_prefix"')


def test_legacy_network_dicom(tmp_path):
    config = load(tmp_path, BASIC + "[network.main.dicom]\nport = 11112\n")
    assert config.warnings == (
        "harmony.toml: network.main.dicom: deprecated legacy key, ignored "
        "(the DICOM listener is configured on the dicom_scp endpoint)",
    )
    assert "dicom" not in config.networks["main"]


def test_legacy_middleware_legacy_table(tmp_path):
    config = load(tmp_path, BASIC + '[middleware_legacy]\nanything = "goes"\n')
    assert config.warnings == ("harmony.toml: middleware_legacy: deprecated legacy table, ignored",)


def test_middleware_legacy_is_not_allowed_in_pipelines_file(tmp_path):
    error = load_error(tmp_path, PROXY, {"a.toml": "[middleware_legacy]\nx = 1\n"})
    assert error.file == "pipelines/a.toml"
    assert error.keypath == ("middleware_legacy",)


def test_legacy_registry_entries_for_builtin_types(tmp_path):
    text = BASIC + '[services.http]\nmodule = ""\n[services.echo]\n[middleware_types.passthru]\nmodule = ""\n'
    config = load(tmp_path, text)
    assert config.warnings == (
        "harmony.toml: services.http: deprecated legacy registry entry, not needed for built-in types",
        "harmony.toml: services.echo: deprecated legacy registry entry, not needed for built-in types",
        "harmony.toml: middleware_types.passthru: deprecated legacy registry entry, not needed for built-in types",
    )


def test_legacy_registry_entry_in_pipelines_file(tmp_path):
    config = load(tmp_path, BASIC, {"s.toml": '[services.http]\nmodule = ""\n'})
    assert config.warnings == (
        "pipelines/s.toml: services.http: deprecated legacy registry entry, not needed for built-in types",
    )


@pytest.mark.parametrize(
    "text, keypath, message",
    [
        ('[services.nosuch]\nmodule = ""\n', "services.nosuch", "unknown built-in service type 'nosuch'"),
        ('[middleware_types.nosuch]\nmodule = ""\n', "middleware_types.nosuch",
         "unknown built-in middleware type 'nosuch'"),
        ('[services.http]\nmodul = ""\n', "services.http.modul", 'unknown key "modul" (did you mean "module"?)'),
        ('[services.http]\nmodule = 1\n', "services.http.module", "expected string"),
        ("[services]\nhttp = 1\n", "services.http", "expected table, got 1"),
        ('[services.x]\nmodule = "harmony_no_such_module_xyz:Obj"\n', "services.x.module",
         "cannot import 'harmony_no_such_module_xyz:Obj': ObjectNotFound: "
         "'harmony_no_such_module_xyz.Obj' does not name an object"),
        ('[services.x]\nmodule = "harmony.registry:Nope"\n', "services.x.module",
         "cannot import 'harmony.registry:Nope': AttributeError: "
         "module 'harmony.registry' has no attribute 'Nope'"),
    ],
)
def test_legacy_registry_errors(tmp_path, text, keypath, message):
    error = load_error(tmp_path, PROXY + text)
    assert_error(error, "harmony.toml", keypath, message)


def test_legacy_registry_module_not_a_type(tmp_path):
    error = load_error(tmp_path, PROXY + '[services.x]\nmodule = "harmony.registry:Registry"\n')
    assert error.file == "harmony.toml"
    assert error.key == "services.x.module"
    assert error.message.startswith("'harmony.registry:Registry' does not provide IServiceType: ")


@pytest.fixture
def extension_module(tmp_path, monkeypatch):
    """
    A third-party module on sys.path providing a service type "custom" and
    a middleware type "custom_mw".

    @return: the module name.
    """
    name = f"harmony_test_ext_{uuid.uuid4().hex}"
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from harmony.backends.echo import OPTIONS as ECHO_OPTIONS, EchoBackend
            from harmony.endpoints.http import OPTIONS as HTTP_OPTIONS, HttpEndpoint
            from harmony.middleware.passthru import Passthru
            from harmony.registry import MiddlewareType, ServiceType

            Custom = ServiceType(
                name="custom",
                endpoint_factory=HttpEndpoint,
                endpoint_options=HTTP_OPTIONS,
                backend_factory=EchoBackend,
                backend_options=ECHO_OPTIONS,
            )
            CustomMiddleware = MiddlewareType("custom_mw", Passthru)
            NotAType = object()
            """
        )
    )
    monkeypatch.syspath_prepend(str(libdir))
    yield name
    sys.modules.pop(name, None)


def test_legacy_registry_loads_third_party_types(tmp_path, extension_module):
    text = (
        PROXY
        + NETWORK
        + pipeline("api", middleware=["cm"]).replace('service = "http"', 'service = "custom"')
        + f'[services.custom]\nmodule = "{extension_module}:Custom"\n'
        + f'[middleware_types.custom_mw]\nmodule = "{extension_module}:CustomMiddleware"\n'
        + '[middleware.cm]\ntype = "custom_mw"\n'
    )
    registry = builtin_registry()
    config = load(tmp_path, text, registry=registry)
    module = sys.modules[extension_module]
    assert registry.service("custom") is module.Custom
    assert registry.middleware("custom_mw") is module.CustomMiddleware
    assert config.endpoints["api_in"].service == "custom"
    assert config.middleware["cm"].type == "custom_mw"
    assert config.pipelines["api"].request_middleware == ("cm",)
    assert config.warnings == ()
    gateway = build_gateway(config, registry, BuildContext(config=config))
    assert isinstance(gateway.endpoints["api_in"], HttpEndpoint)
    assert [r.prefix for r in gateway.route_tables["main"].routes] == ["/api"]


def test_legacy_registry_third_party_wrong_name(tmp_path, extension_module):
    error = load_error(tmp_path, PROXY + f'[services.other]\nmodule = "{extension_module}:Custom"\n')
    assert_error(
        error, "harmony.toml", "services.other.module",
        f"'{extension_module}:Custom' is type 'custom', registered as 'other'",
    )


def test_legacy_registry_third_party_wrong_interface(tmp_path, extension_module):
    error = load_error(
        tmp_path, PROXY + f'[middleware_types.custom]\nmodule = "{extension_module}:Custom"\n'
    )
    assert error.key == "middleware_types.custom.module"
    assert error.message.startswith(f"'{extension_module}:Custom' does not provide IMiddlewareType: ")
    error = load_error(tmp_path, PROXY + f'[services.x]\nmodule = "{extension_module}:NotAType"\n')
    assert error.message.startswith(f"'{extension_module}:NotAType' does not provide IServiceType: ")


def test_wireguard_enabled_is_an_error(tmp_path):
    error = load_error(tmp_path, PROXY + '[network.wg]\nenable_wireguard = true\ninterface = "wg0"\n')
    assert_error(
        error,
        "harmony.toml",
        "network.wg.enable_wireguard",
        "WireGuard is not supported by Harmony; set up the tunnel outside Harmony"
        " and bind the listener to its address",
    )


def test_wireguard_disabled_is_accepted(tmp_path):
    config = load(tmp_path, BASIC + '[network.wg]\nenable_wireguard = false\ninterface = "wg1"\n')
    assert config.networks["wg"].interface == "wg1"
    assert config.networks["wg"].http is None


def test_management_enabled_needs_a_known_network(tmp_path):
    # More [management] checks: tests/unit/test_management.py.
    error = load_error(tmp_path, PROXY + '[management]\nenabled = true\nnetwork = "main"\n')
    assert_error(
        error,
        "harmony.toml",
        "management.network",
        "unknown network 'main' (no networks are defined)",
    )


def test_management_disabled_is_accepted(tmp_path):
    config = load(tmp_path, PROXY + '[management]\nenabled = false\nbase_path = "mgmt"\n')
    assert config.management.base_path == "mgmt"


HTTP_TARGETS = PROXY + NETWORK + """
[pipelines.p]
networks = ["main"]
endpoints = ["in"]
backends = ["api"]

[endpoints.in]
service = "http"
[endpoints.in.options]
path_prefix = "/api"

[backends.api]
service = "http"
targets = ["a", "b"]
strategy = "weighted"
rules = [{ match = { header = { "X-Tenant" = "t1" }, path = "p/*" }, targets = ["b"] }]
[backends.api.options]
timeout_secs = 3
max_retries = 2
[backends.api.health_check]
path = "/health"
interval_secs = 1

[targets.a]
url = "http://127.0.0.1:9001"
weight = 3
[targets.b]
url = "http://127.0.0.1:9002"
"""


def test_targets_give_each_target_the_backend_options_with_its_address(tmp_path):
    config = load(tmp_path, HTTP_TARGETS)
    entry = config.backends.api
    assert [(t.name, t.weight, t.address) for t in entry.targets] == [
        ("a", 3, "http://127.0.0.1:9001"),
        ("b", 1, "http://127.0.0.1:9002"),
    ]
    assert [t.options.base_url for t in entry.targets] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert {t.options.timeout_secs for t in entry.targets} == {3.0}
    selection = entry.selection
    assert selection.strategy == "weighted"
    assert selection.retry.max_retries == 2  # options.max_retries is retry.max_retries
    assert "max_retries" not in entry.targets[0].options
    assert selection.health_check.path == "/health"
    assert selection.health_check.interval_secs == 1.0
    assert selection.health_check.unhealthy_threshold == 2
    assert selection.outlier_detection.consecutive_failures == 5
    assert selection.circuit_breaker.failure_threshold == 5
    assert selection.rules[0].targets == ("b",)
    assert selection.rules[0].match.header == {"X-Tenant": ("t1",)}
    assert selection.rules[0].match.path == ("p/*",)
    assert selection.resilient


def test_a_plain_backend_is_not_resilient(tmp_path):
    config = load(tmp_path, BASIC)
    entry = config.backends.api_out
    assert entry.targets == ()
    assert not entry.selection.resilient


def test_dicom_targets(tmp_path):
    base = PROXY + """
[pipelines.d]
endpoints = ["scp"]
backends = ["pacs"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
port = 0
[backends.pacs]
service = "dicom_scu"
targets = ["p1", "p2"]
strategy = "hash"
hash_key = "calling_aet"
[backends.pacs.health_check]
[targets.p1]
aet = "PACS1"
host = "127.0.0.1"
port = 4242
[targets.p2]
aet = "PACS2"
host = "127.0.0.1"
port = 4243
"""
    entry = load(tmp_path, base).backends.pacs
    assert [(t.options.aet, t.options.port, t.address) for t in entry.targets] == [
        ("PACS1", 4242, "PACS1@127.0.0.1:4242"),
        ("PACS2", 4243, "PACS2@127.0.0.1:4243"),
    ]
    assert entry.selection.strategy == "hash"
    assert entry.selection.hash_key == "calling_aet"


@pytest.mark.parametrize(
    "change, keypath, message",
    [
        (('targets = ["a", "b"]', 'targets = ["a", "c"]'), "backends.api.targets.1",
         "unknown target 'c'"),
        (('timeout_secs = 3', 'timeout_secs = 3\nbase_url = "http://x"'), "backends.api.options.base_url",
         "base_url and targets are exclusive: each [targets.<name>] gives the address"),
        (('targets = ["b"] }]', 'targets = ["z"] }]'), "backends.api.rules.0.targets.0",
         "target 'z' is not one of this backend's targets (a, b)"),
        (('strategy = "weighted"', 'strategy = "random"'), "backends.api.strategy",
         'expected one of round_robin, weighted, least_connections, failover, hash, got "random"'),
        (('url = "http://127.0.0.1:9002"', 'aet = "X"\nhost = "h"\nport = 1'), "backends.api.targets.1",
         "target 'b' has no url (http backends need HTTP targets)"),
        (('url = "http://127.0.0.1:9002"', 'aet = "X"'), "targets.b.host",
         "required key is missing (DICOM targets have aet, host and port)"),
        (('url = "http://127.0.0.1:9002"', ''), "targets.b",
         "a target needs url (HTTP, FHIR, DICOMweb) or aet, host and port (DICOM)"),
        (('interval_secs = 1', 'interval_secs = 0'), "backends.api.health_check.interval_secs",
         "must be at least 0.01, got 0"),
        (('max_retries = 2', 'max_retries = 2\n[backends.api.retry]\nmax_retries = 1'),
         "backends.api.options.max_retries", "max_retries is given twice (options and [retry]); keep one"),
        (('strategy = "weighted"', 'strategy = "hash"\nhash_key = "cookie:x"'), "backends.api.hash_key",
         "must be header:<name>, query:<name>, metadata:<key>, client_ip or calling_aet (got 'cookie:x')"),
    ],
)
def test_target_errors(tmp_path, change, keypath, message):
    old, new = change
    assert old in HTTP_TARGETS
    error = load_error(tmp_path, HTTP_TARGETS.replace(old, new))
    assert error.file == "harmony.toml"
    assert error.key == keypath
    assert error.message == message


def test_targets_of_an_echo_backend_are_an_error(tmp_path):
    base = BASIC.replace('service = "echo"', 'service = "echo"\ntargets = ["t"]') + '[targets.t]\nurl = "http://x"\n'
    error = load_error(tmp_path, base)
    assert_error(error, "harmony.toml", "backends.api_out.targets",
                 "backends of service type 'echo' have no address: they cannot have targets")


def test_unused_target_warns(tmp_path):
    config = load(tmp_path, HTTP_TARGETS + '[targets.spare]\nurl = "http://127.0.0.1:9003"\n')
    assert "harmony.toml: targets.spare: target is not used by any backend" in config.warnings


def test_targets_in_pipelines_file_name_that_file(tmp_path):
    error = load_error(tmp_path, PROXY, {"t.toml": '[targets.t1]\nweight = 1\n'})
    assert error.file == "pipelines/t.toml"
    assert error.key == "targets.t1"


# Service and middleware types -------------------------------------------------------


def test_unknown_endpoint_service_type(tmp_path):
    error = load_error(tmp_path, BASIC.replace('service = "http"', 'service = "htp"'))
    assert_error(error, "harmony.toml", "endpoints.api_in.service",
                 "unknown service type 'htp' (known: dicom_scp, dicomweb, echo, fhir, http, jmix)")


def test_unknown_backend_service_type(tmp_path):
    error = load_error(tmp_path, BASIC.replace('service = "echo"', 'service = "pacs"'))
    assert_error(error, "harmony.toml", "backends.api_out.service",
                 "unknown service type 'pacs' (known: dicom_scu, dicomweb, echo, fhir, http)")


def test_dicom_alias_resolves_to_the_builtin_types(tmp_path):
    """
    "dicom" names dicom_scp as an endpoint and dicom_scu as a backend; the
    options are then validated against that type.
    """
    error = load_error(tmp_path, BASIC.replace('service = "http"', 'service = "dicom"'))
    assert error.key == "endpoints.api_in.options.path_prefix"
    assert error.message.startswith("unknown key \"path_prefix\"")
    error = load_error(tmp_path, BASIC.replace('service = "echo"', 'service = "dicom"'))
    assert error.key == "backends.api_out.options.aet"
    assert error.message == "required key is missing"


def _dicom_registry():
    """
    Built-ins plus stand-in dicom_scp (endpoint only, its own listener) and
    dicom_scu (backend only) types.
    """
    registry = builtin_registry()
    registry.add_service(
        ServiceType(
            name="dicom_scp",
            endpoint_factory=HttpEndpoint,
            endpoint_options=Schema({"port": Field(Int(min=1), 11112)}),
            endpoint_protocol="dimse",
        )
    )
    registry.add_service(
        ServiceType(name="dicom_scu", backend_factory=EchoBackend, backend_options=ECHO_OPTIONS)
    )
    return registry


def test_dicom_alias_by_role(tmp_path):
    text = PROXY + textwrap.dedent(
        """
        [pipelines.dimse]
        endpoints = ["scp"]
        backends = ["pacs"]
        [endpoints.scp]
        service = "dicom"
        options = { port = 4242 }
        [backends.pacs]
        service = "DICOM"
        """
    )
    config = load(tmp_path, text, registry=_dicom_registry())
    assert config.endpoints["scp"].service == "dicom_scp"
    assert config.endpoints["scp"].options.port == 4242
    assert config.backends["pacs"].service == "dicom_scu"
    # A DIMSE endpoint needs no networks.
    assert config.pipelines["dimse"].networks == ()


def test_service_type_used_in_the_wrong_role(tmp_path):
    text = BASIC.replace('service = "http"', 'service = "dicom_scu"')
    error = load_error(tmp_path, text, registry=_dicom_registry())
    assert_error(error, "harmony.toml", "endpoints.api_in.service",
                 "service type 'dicom_scu' cannot be used as an endpoint")
    text = BASIC.replace('service = "echo"', 'service = "dicom_scp"')
    error = load_error(tmp_path, text, registry=_dicom_registry())
    assert_error(error, "harmony.toml", "backends.api_out.service",
                 "service type 'dicom_scp' cannot be used as a backend")


def test_unknown_service_lists_only_types_for_the_role(tmp_path):
    text = BASIC.replace('service = "http"', 'service = "nope"')
    error = load_error(tmp_path, text, registry=_dicom_registry())
    assert error.message == "unknown service type 'nope' (known: dicom_scp, dicomweb, echo, fhir, http, jmix)"
    text = BASIC.replace('service = "echo"', 'service = "nope"')
    error = load_error(tmp_path, text, registry=_dicom_registry())
    assert error.message == "unknown service type 'nope' (known: dicom_scu, dicomweb, echo, fhir, http)"


def _known_middleware():
    return ", ".join(sorted(default_registry().middleware_names()))


def test_unknown_middleware_type(tmp_path):
    error = load_error(tmp_path, BASIC + '[middleware.m]\ntype = "nosuch"\n')
    assert_error(error, "harmony.toml", "middleware.m.type",
                 f"unknown middleware type 'nosuch' (known: {_known_middleware()})")
    assert "passthru" in _known_middleware()


def test_middleware_type_missing(tmp_path):
    error = load_error(tmp_path, BASIC + "[middleware.m]\noptions = {}\n")
    assert_error(error, "harmony.toml", "middleware.m.type", "required key is missing")


def test_middleware_options_are_validated(tmp_path):
    error = load_error(tmp_path, BASIC + '[middleware.m]\ntype = "passthru"\n[middleware.m.options]\nx = 1\n')
    assert_error(error, "harmony.toml", "middleware.m.options.x", 'unknown key "x"')


@pytest.mark.parametrize("alias", ["dicomweb", "dicomweb_bridge", "DicomWeb"])
def test_dicomweb_middleware_aliases(tmp_path, alias):
    text = PROXY + NETWORK + pipeline("api", middleware=["bridge"]) + f'[middleware.bridge]\ntype = "{alias}"\n'
    config = load(tmp_path, text)
    assert config.middleware["bridge"].type == "dicomweb_bridge"


def test_dicomweb_alias_in_pipeline_list(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["passthru", "dicomweb"])
    config = load(tmp_path, text)
    assert config.middleware["dicomweb"].type == "dicomweb_bridge"


@pytest.mark.parametrize(
    "alias, canonical",
    [("jwtauth", "jwt_auth"), ("json", "json_extractor"), ("dicomweb", "dicomweb_bridge"),
     ("JWT_AUTH", "jwt_auth")],
)
def test_middleware_aliases_resolve(tmp_path, alias, canonical):
    registry = builtin_registry()
    registry.add_middleware(MiddlewareType(canonical, Passthru))
    text = (
        PROXY + NETWORK + pipeline("api", middleware=["m", alias])
        + f'[middleware.m]\ntype = "{alias}"\n'
    )
    config = load(tmp_path, text, registry=registry)
    assert config.middleware["m"].type == canonical
    # Used by name in a pipeline without a table: a built-in type with
    # default options.
    assert config.middleware[alias].type == canonical
    assert config.pipelines["api"].request_middleware == ("m", alias)


def test_builtin_middleware_without_table(tmp_path):
    config = load(tmp_path, PROXY + NETWORK + pipeline("api", middleware=["passthru"]))
    assert config.pipelines["api"].request_middleware == ("passthru",)
    assert config.pipelines["api"].response_middleware == ("passthru",)
    entry = config.middleware["passthru"]
    assert entry.name == "passthru"
    assert entry.type == "passthru"
    assert dict(entry.options) == {}
    assert config.warnings == ()


def test_unknown_middleware_in_pipeline(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["passthru", "auth"])
    error = load_error(tmp_path, text)
    assert_error(
        error, "harmony.toml", "pipelines.api.middleware.1",
        "unknown middleware 'auth': no [middleware.auth] table and no built-in type of that name",
    )


def test_unknown_middleware_in_left_right_form(tmp_path):
    text = PROXY + NETWORK + pipeline("api").replace(
        'networks = ["main"]', 'networks = ["main"]\nmiddleware = { left = ["passthru"], right = ["nope"] }'
    )
    error = load_error(tmp_path, text)
    assert error.key == "pipelines.api.middleware.right.0"
    assert error.message.startswith("unknown middleware 'nope'")


def test_connect_is_a_no_op_with_a_warning(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["a", "connect", "b"]) + (
        '[middleware.a]\ntype = "passthru"\n[middleware.b]\ntype = "passthru"\n'
    )
    config = load(tmp_path, text)
    p = config.pipelines["api"]
    assert p.request_middleware == ("a", "b")
    assert p.response_middleware == ("b", "a")
    assert "connect" not in config.middleware
    assert config.warnings == (
        "harmony.toml: pipelines.api.middleware.1: middleware 'connect' is accepted for "
        "compatibility and does nothing",
    )


def test_connect_in_left_right_form(tmp_path):
    text = PROXY + NETWORK + pipeline("api").replace(
        'networks = ["main"]',
        'networks = ["main"]\nmiddleware = { left = ["connect", "passthru"], right = ["CONNECT"] }',
    )
    config = load(tmp_path, text)
    assert config.pipelines["api"].request_middleware == ("passthru",)
    assert config.pipelines["api"].response_middleware == ()
    assert config.warnings == (
        "harmony.toml: pipelines.api.middleware.left.0: middleware 'connect' is accepted for "
        "compatibility and does nothing",
        "harmony.toml: pipelines.api.middleware.right.0: middleware 'connect' is accepted for "
        "compatibility and does nothing",
    )


def test_connect_middleware_table_warns(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["c"]) + '[middleware.c]\ntype = "connect"\n'
    config = load(tmp_path, text)
    assert config.middleware["c"].type == "connect"
    assert config.warnings == (
        "harmony.toml: middleware.c.type: middleware 'connect' is accepted for compatibility "
        "and does nothing",
    )


def test_middleware_list_form_order(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["one", "two", "passthru"]) + (
        '[middleware.one]\ntype = "passthru"\n[middleware.two]\ntype = "passthru"\n'
    )
    p = load(tmp_path, text).pipelines["api"]
    assert p.request_middleware == ("one", "two", "passthru")
    assert p.response_middleware == ("passthru", "two", "one")


def test_middleware_left_right_form_order(tmp_path):
    text = PROXY + NETWORK + pipeline("api") + textwrap.dedent(
        """
        [pipelines.api.middleware]
        left = ["one", "two"]
        right = ["two", "three", "one"]
        [middleware.one]
        type = "passthru"
        [middleware.two]
        type = "passthru"
        [middleware.three]
        type = "passthru"
        """
    )
    p = load(tmp_path, text).pipelines["api"]
    assert p.request_middleware == ("one", "two")
    assert p.response_middleware == ("two", "three", "one")


def test_middleware_left_only(tmp_path):
    text = PROXY + NETWORK + pipeline("api").replace(
        'networks = ["main"]', 'networks = ["main"]\nmiddleware = { left = ["passthru"] }'
    )
    p = load(tmp_path, text).pipelines["api"]
    assert p.request_middleware == ("passthru",)
    assert p.response_middleware == ()


def test_middleware_chain_built_in_gateway(tmp_path):
    text = PROXY + NETWORK + pipeline("api", middleware=["one", "two"]) + (
        '[middleware.one]\ntype = "passthru"\n[middleware.two]\ntype = "passthru"\n'
    )
    config = load(tmp_path, text)
    gateway = build_gateway(config, builtin_registry(), BuildContext(config=config))
    executor = gateway.executors["api"]
    assert [m.name for m in executor.request_chain] == ["one", "two"]
    assert [m.name for m in executor.response_chain] == ["two", "one"]
    # One instance per middleware, shared by both chains.
    assert executor.request_chain[0] is executor.response_chain[1]
    assert all(isinstance(m, Passthru) for m in executor.request_chain)
    assert [b.name for b in executor.backends] == ["api_out"]


# Cross-references -----------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, keypath, message",
    [
        ('endpoints = ["api_in"]', 'endpoints = ["api_inn"]', "pipelines.api.endpoints.0",
         "unknown endpoint 'api_inn' (did you mean 'api_in'?)"),
        ('endpoints = ["api_in"]', 'endpoints = ["zzz"]', "pipelines.api.endpoints.0",
         "unknown endpoint 'zzz'"),
        ('backends = ["api_out"]', 'backends = ["api_ou"]', "pipelines.api.backends.0",
         "unknown backend 'api_ou' (did you mean 'api_out'?)"),
        ('backends = ["api_out"]', 'backends = ["api_out", "qqq"]', "pipelines.api.backends.1",
         "unknown backend 'qqq'"),
        ('networks = ["main"]', 'networks = ["mian"]', "pipelines.api.networks.0",
         "unknown network 'mian' (did you mean 'main'?)"),
        ('endpoints = ["api_in"]', "endpoints = []", "pipelines.api.endpoints",
         "a pipeline needs at least one endpoint"),
        ('backends = ["api_out"]', "backends = []", "pipelines.api.backends",
         "a pipeline with HTTP endpoints needs at least one backend"),
        ('endpoints = ["api_in"]\n', "", "pipelines.api.endpoints", "required key is missing"),
        ('backends = ["api_out"]\n', "", "pipelines.api.backends", "required key is missing"),
        ('networks = ["main"]\n', "", "pipelines.api.networks",
         "endpoint 'api_in' serves HTTP: the pipeline must list the networks it listens on"),
        ('path_prefix = "/api"', 'path_prefix = "api"', "endpoints.api_in.options.path_prefix",
         'must start with "/", got "api"'),
        ('path_prefix = "/api"', 'path_prefix = "/api/../x"', "endpoints.api_in.options.path_prefix",
         'must be a plain path, got "/api/../x"'),
        ('path_prefix = "/api"', 'path_prefix = ""', "endpoints.api_in.options.path_prefix",
         "must not be empty"),
        ('path_prefix = "/api"\n', "", "endpoints.api_in.options.path_prefix", "required key is missing"),
    ],
)
def test_reference_and_value_errors(tmp_path, old, new, keypath, message):
    text = BASIC.replace(old, new, 1)
    assert text != BASIC
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", keypath, message)


def test_no_networks_defined(tmp_path):
    error = load_error(tmp_path, PROXY + pipeline("api"))
    assert_error(error, "harmony.toml", "pipelines.api.networks.0",
                 "unknown network 'main' (no networks are defined)")


def test_no_backends_defined(tmp_path):
    text = PROXY + NETWORK + pipeline("api").split("[backends.")[0]
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", "pipelines.api.backends.0",
                 "unknown backend 'api_out' (no backends are defined)")


def test_endpoint_in_two_pipelines(tmp_path):
    second = "[pipelines.other]\nnetworks = [\"main\"]\nendpoints = [\"api_in\"]\nbackends = [\"api_out\"]\n"
    error = load_error(tmp_path, BASIC, {"other.toml": second})
    assert_error(
        error, "pipelines/other.toml", "pipelines.other.endpoints.0",
        "endpoint 'api_in' already belongs to pipeline 'api'; an endpoint belongs to one pipeline",
    )


def test_backend_shared_by_two_pipelines_is_fine(tmp_path):
    second = textwrap.dedent(
        """
        [pipelines.other]
        networks = ["main"]
        endpoints = ["other_in"]
        backends = ["api_out"]
        [endpoints.other_in]
        service = "echo"
        options = { path_prefix = "/other" }
        """
    )
    config = load(tmp_path, BASIC + second)
    assert config.pipelines["other"].backends == ("api_out",)
    assert config.endpoints["other_in"].service == "echo"


def test_network_without_http_listener(tmp_path):
    text = PROXY + '[network.main]\ninterface = "eth0"\n' + pipeline("api")
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", "pipelines.api.networks.0",
                 "network 'main' has no [network.main.http] listener")


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://pacs", 'expected an http:// or https:// URL, got "ftp://pacs"'),
        ("pacs:8042", 'expected an http:// or https:// URL, got "pacs:8042"'),
        ("http://pacs/?a=1", 'must not contain a query or fragment, got "http://pacs/?a=1"'),
        ("", "must not be empty"),
    ],
)
def test_http_backend_base_url(tmp_path, url, message):
    error = load_error(tmp_path, PROXY + NETWORK + pipeline("api", backend=url))
    assert_error(error, "harmony.toml", "backends.api_out.options.base_url", message)


def test_http_backend_base_url_required(tmp_path):
    text = PROXY + NETWORK + pipeline("api").replace('service = "echo"', 'service = "http"')
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", "backends.api_out.options.base_url", "required key is missing")


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-1", "-1"), ("0.0", "0.0"), ("-0.5", "-0.5")])
def test_http_backend_timeout_must_be_positive(tmp_path, value, shown):
    text = PROXY + NETWORK + pipeline("api", backend="https://up") + f"timeout_secs = {value}\n"
    error = load_error(tmp_path, text)
    assert_error(error, "harmony.toml", "backends.api_out.options.timeout_secs",
                 f"must be at least 0.001, got {shown}")


def test_brief_example_error(tmp_path):
    files = {"b.toml": pipeline("p", backend="http://pacs").replace("p_out", "pacs") + 'timeout_secs = "abc"\n'}
    error = load_error(tmp_path, PROXY + NETWORK, files)
    assert str(error) == 'pipelines/b.toml: backends.pacs.options.timeout_secs: expected number, got "abc"'
    assert error.file == "pipelines/b.toml"
    assert error.keypath == ("backends", "pacs", "options", "timeout_secs")


# Frozen results ------------------------------------------------------------------------


def test_config_is_frozen(tmp_path):
    config = load(tmp_path, BASIC)
    with pytest.raises(AttributeError):
        config.proxy.id = "other"
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        config.proxy = Options({"id": "other"})
    with pytest.raises(AttributeError):
        config.endpoints["api_in"].options.path_prefix = "/x"
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        config.endpoints["api_in"].service = "echo"
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        config.pipelines["api"].backends = ()
    with pytest.raises(TypeError):
        config.endpoints["new"] = config.endpoints["api_in"]
    with pytest.raises(TypeError):
        config.proxy["id"] = "other"
    with pytest.raises(AttributeError):
        config.networks["main"].http.bind_port = 1
    with pytest.raises(AttributeError):
        del config.proxy.id
    assert isinstance(config.pipelines["api"].endpoints, tuple)
    assert isinstance(config.warnings, tuple)
    assert isinstance(config.files, tuple)
    assert config.proxy.id == "test-gw"


def test_options_access():
    options = Options({"path_prefix": "/api", "port": 4})
    assert options.path_prefix == "/api"
    assert options["path_prefix"] == "/api"
    assert options.get("missing", 3) == 3
    assert "port" in options
    assert "nope" not in options
    assert len(options) == 2
    assert sorted(options) == ["path_prefix", "port"]
    assert dict(options) == {"path_prefix": "/api", "port": 4}
    assert options == Options({"port": 4, "path_prefix": "/api"})
    assert hash(options) == hash(Options({"port": 4, "path_prefix": "/api"}))
    assert repr(options) == "Options({'path_prefix': '/api', 'port': 4})"
    with pytest.raises(AttributeError):
        options.missing
    with pytest.raises(KeyError):
        options["missing"]
    with pytest.raises(AttributeError, match="frozen"):
        options.port = 5
    assert options.port == 4


def test_options_copy_their_input():
    source = {"a": 1}
    options = Options(source)
    source["a"] = 2
    assert options.a == 1


# Unused entries ---------------------------------------------------------------------


def test_unused_entries_warn(tmp_path):
    text = BASIC + textwrap.dedent(
        """
        [endpoints.spare]
        service = "http"
        options = { path_prefix = "/spare" }
        [middleware.idle]
        type = "passthru"
        """
    )
    config = load(tmp_path, text, {"b.toml": '[backends.unused]\nservice = "echo"\n'})
    assert config.warnings == (
        "harmony.toml: endpoints.spare: endpoint is not used by any pipeline",
        "pipelines/b.toml: backends.unused: backend is not used by any pipeline",
        "harmony.toml: middleware.idle: middleware is not used by any pipeline",
    )
    assert "spare" in config.endpoints
    assert "unused" in config.backends


# Route conflicts (build_gateway) --------------------------------------------------------------


def _build(config):
    return build_gateway(config, builtin_registry(), BuildContext(config=config))


def test_route_conflict_same_network(tmp_path):
    files = {"a.toml": pipeline("alpha", "/api"), "b.toml": pipeline("bravo", "/api")}
    config = load(tmp_path, PROXY + NETWORK, files)
    with pytest.raises(ConfigError) as info:
        _build(config)
    assert_error(
        info.value,
        "pipelines/b.toml",
        "pipelines.bravo.endpoints.0",
        "route conflict on network 'main': path_prefix '/api' is used by endpoint 'alpha_in' "
        "(pipeline 'alpha') and endpoint 'bravo_in' (pipeline 'bravo')",
    )


def test_route_conflict_trailing_slash_normalised(tmp_path):
    text = PROXY + NETWORK + pipeline("alpha", "/api") + pipeline("bravo", "/api/")
    config = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        _build(config)
    assert info.value.file == "harmony.toml"
    assert info.value.key == "pipelines.bravo.endpoints.0"
    assert "path_prefix '/api' is used by endpoint 'alpha_in' (pipeline 'alpha')" in info.value.message
    assert "(pipeline 'bravo')" in info.value.message


def test_route_conflict_only_on_shared_network(tmp_path):
    """
    Two pipelines listening on several networks conflict on the one they
    share.
    """
    text = (
        PROXY + NETWORK + '[network.other.http]\nbind_port = 0\n[network.third.http]\nbind_port = 0\n'
        + pipeline("alpha", "/api", networks=("main", "third"))
        + pipeline("bravo", "/api", networks=("other", "third"))
    )
    config = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        _build(config)
    assert info.value.message.startswith("route conflict on network 'third': ")


def test_same_prefix_on_different_networks(tmp_path):
    text = (
        PROXY + NETWORK + '[network.other.http]\nbind_port = 0\n'
        + pipeline("alpha", "/api", networks=("main",))
        + pipeline("bravo", "/api/", networks=("other",))
    )
    config = load(tmp_path, text)
    gateway = _build(config)
    assert sorted(gateway.route_tables) == ["main", "other"]
    (main,) = gateway.route_tables["main"].routes
    (other,) = gateway.route_tables["other"].routes
    assert (main.prefix, main.pipeline, main.endpoint.name) == ("/api", "alpha", "alpha_in")
    assert (other.prefix, other.pipeline, other.endpoint.name) == ("/api", "bravo", "bravo_in")
    assert sorted(gateway.apps) == ["main", "other"]


def test_nested_prefixes_do_not_conflict(tmp_path):
    text = PROXY + NETWORK + pipeline("alpha", "/api") + pipeline("bravo", "/api/v2") + pipeline("charlie", "/")
    gateway = _build(load(tmp_path, text))
    assert [r.prefix for r in gateway.route_tables["main"].routes] == ["/api/v2", "/api", "/"]


def test_build_gateway_makes_every_entry(tmp_path):
    text = PROXY + NETWORK + pipeline("alpha", "/a", backend="http://up") + pipeline("bravo", "/b")
    config = load(tmp_path, text)
    gateway = _build(config)
    assert sorted(gateway.endpoints) == ["alpha_in", "bravo_in"]
    assert sorted(gateway.backends) == ["alpha_out", "bravo_out"]
    assert gateway.backends["alpha_out"].service_type == "http"
    assert gateway.backends["bravo_out"].service_type == "echo"
    assert sorted(gateway.executors) == ["alpha", "bravo"]
