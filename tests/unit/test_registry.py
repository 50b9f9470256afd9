"""
Tests for L{harmony.registry}: built-in types, aliases, interface
conformance of types and of what their factories make, loading third-party
types by name and through C{twisted.plugin}.
"""

import importlib
import sys
import textwrap
import uuid

import attr
import pytest
from zope.interface import alsoProvides, directlyProvides
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from harmony.backends.echo import OPTIONS as ECHO_OPTIONS
from harmony.backends.echo import EchoBackend
from harmony.backends.http import HttpBackend
from harmony.config import ConfigError, Options
from harmony.config.schema import Schema, Where
from harmony.endpoints.http import OPTIONS as HTTP_OPTIONS
from harmony.endpoints.http import EchoEndpoint, HttpEndpoint
from harmony.interfaces import (
    IBackend,
    IEndpoint,
    IMiddleware,
    IMiddlewareType,
    IServiceType,
)
from harmony.middleware.passthru import Passthru
from harmony.registry import (
    MIDDLEWARE_ALIASES,
    SERVICE_ALIASES,
    BuildContext,
    MiddlewareType,
    Registry,
    ServiceType,
    builtin_registry,
    default_registry,
)


def _validated(schema, data):
    return schema.validate(data, Where("test.toml"))


# Built-in types ------------------------------------------------------------------


#: Harmony's own service types (kept in step with builtin_registry).
BUILTIN_SERVICES = ["dicom_scp", "dicom_scu", "dicomweb", "echo", "fhir", "http", "jmix"]

#: Harmony's own middleware types (kept in step with builtin_registry).
BUILTIN_MIDDLEWARE = [
    "basic_auth", "connect", "cors", "dicomweb_bridge", "fhir_imaging", "header", "jmix_builder", "json_extractor",
    "jwt_auth", "log_dump", "metadata_transform", "passthru", "path_filter", "rate_limit", "transform",
]


def test_builtin_names():
    registry = builtin_registry()
    assert registry.service_names() == BUILTIN_SERVICES
    assert registry.service_names("endpoint") == ["dicom_scp", "dicomweb", "echo", "fhir", "http", "jmix"]
    assert registry.service_names("backend") == ["dicom_scu", "dicomweb", "echo", "fhir", "http"]
    assert registry.middleware_names() == BUILTIN_MIDDLEWARE


def test_default_registry_has_builtins():
    registry = default_registry()
    assert {"echo", "http"} <= set(registry.service_names())
    assert {"connect", "passthru"} <= set(registry.middleware_names())


def test_service_lookup():
    registry = builtin_registry()
    http = registry.service("http")
    assert http.name == "http"
    assert registry.service("HTTP") is http
    assert registry.service("http", "endpoint") is http
    assert registry.service("http", "backend") is http
    assert registry.service("nosuch") is None
    assert registry.service("nosuch", "endpoint") is None


def test_middleware_lookup():
    registry = builtin_registry()
    assert registry.middleware("passthru").name == "passthru"
    assert registry.middleware("PassThru").name == "passthru"
    assert registry.middleware("connect").name == "connect"
    assert registry.middleware("jwtauth").name == "jwt_auth"
    assert registry.middleware("dicomweb").name == "dicomweb_bridge"
    assert registry.middleware("DicomWeb_Bridge").name == "dicomweb_bridge"
    assert registry.middleware("nosuch") is None


@pytest.mark.parametrize("name", ["http", "echo"])
def test_builtin_service_types_provide_interface(name):
    stype = builtin_registry().service(name)
    assert isinstance(stype, ServiceType)
    assert verifyObject(IServiceType, stype)
    assert stype.endpoint_protocol == "http"
    assert isinstance(stype.endpoint_options, Schema)
    assert isinstance(stype.backend_options, Schema)


@pytest.mark.parametrize("name", ["passthru", "connect"])
def test_builtin_middleware_types_provide_interface(name):
    mtype = builtin_registry().middleware(name)
    assert isinstance(mtype, MiddlewareType)
    assert verifyObject(IMiddlewareType, mtype)
    assert mtype.name == name
    assert dict(_validated(mtype.options, {})) == {}


@pytest.mark.parametrize("name, cls", [("http", HttpEndpoint), ("echo", EchoEndpoint)])
def test_builtin_endpoints_provide_interface(name, cls):
    stype = builtin_registry().service(name)
    options = _validated(stype.endpoint_options, {"path_prefix": "/api/"})
    endpoint = stype.make_endpoint("in", options, BuildContext())
    assert isinstance(endpoint, cls)
    assert verifyObject(IEndpoint, endpoint)
    assert endpoint.name == "in"
    assert endpoint.service_type == name
    assert endpoint.options is options
    (route,) = endpoint.http_routes()
    assert route.prefix == "/api"
    assert route.endpoint is endpoint
    assert route.match is None


def test_builtin_http_backend_provides_interface():
    stype = builtin_registry().service("http")
    options = _validated(stype.backend_options, {"base_url": "https://up.example/", "timeout_secs": 2})
    backend = stype.make_backend("out", options, BuildContext())
    assert isinstance(backend, HttpBackend)
    assert verifyObject(IBackend, backend)
    assert backend.name == "out"
    assert backend.service_type == "http"


def test_builtin_echo_backend_provides_interface():
    stype = builtin_registry().service("echo")
    options = _validated(stype.backend_options, {})
    backend = stype.make_backend("out", options, BuildContext())
    assert isinstance(backend, EchoBackend)
    assert verifyObject(IBackend, backend)
    assert backend.name == "out"
    assert backend.service_type == "echo"


@pytest.mark.parametrize("name", ["passthru", "connect"])
def test_builtin_middleware_provides_interface(name):
    mtype = builtin_registry().middleware(name)
    middleware = mtype.make("mw", _validated(mtype.options, {}), BuildContext())
    assert isinstance(middleware, Passthru)
    assert verifyObject(IMiddleware, middleware)
    assert middleware.name == "mw"
    assert middleware.request(object()) is None
    assert middleware.response(object(), object()) is None


def test_build_context_defaults_and_frozen():
    context = BuildContext()
    assert (context.reactor, context.agent, context.http_client, context.config) == (None,) * 4
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        context.reactor = object()


def test_types_are_frozen():
    stype = builtin_registry().service("http")
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        stype.name = "other"
    mtype = builtin_registry().middleware("passthru")
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        mtype.name = "other"


def test_middleware_type_default_options():
    mtype = MiddlewareType("x", Passthru)
    assert isinstance(mtype.options, Schema)
    with pytest.raises(ConfigError) as info:
        _validated(mtype.options, {"a": 1})
    assert str(info.value) == 'test.toml: a: unknown key "a"'


# Aliases -------------------------------------------------------------------------------


def test_service_alias_tables():
    assert SERVICE_ALIASES["endpoint"]["dicom"] == "dicom_scp"
    assert SERVICE_ALIASES["backend"]["dicom"] == "dicom_scu"
    assert MIDDLEWARE_ALIASES == {
        "jwtauth": "jwt_auth",
        "json": "json_extractor",
        "dicomweb": "dicomweb_bridge",
    }


def _with_dicom(registry):
    scp = ServiceType("dicom_scp", HttpEndpoint, HTTP_OPTIONS, endpoint_protocol="dimse")
    scu = ServiceType("dicom_scu", backend_factory=EchoBackend, backend_options=ECHO_OPTIONS)
    registry.add_service(scp)
    registry.add_service(scu)
    return scp, scu


def test_service_aliases_by_role():
    registry = builtin_registry()
    scp, scu = _with_dicom(registry)
    assert registry.service("dicom", "endpoint") is scp
    assert registry.service("DICOM", "endpoint") is scp
    assert registry.service("dimse", "endpoint") is scp
    assert registry.service("dicom", "backend") is scu
    assert registry.service("dimse", "backend") is scu
    # Without a role an alias is not a type name.
    assert registry.service("dicom") is None
    assert registry.service("dicom_scp") is scp
    # Aliases are per role: "echo" is not aliased.
    assert registry.service("echo", "endpoint").name == "echo"


def test_service_names_by_role():
    registry = builtin_registry()
    _with_dicom(registry)
    assert registry.service_names() == BUILTIN_SERVICES
    assert registry.service_names("endpoint") == ["dicom_scp", "dicomweb", "echo", "fhir", "http", "jmix"]
    assert registry.service_names("backend") == ["dicom_scu", "dicomweb", "echo", "fhir", "http"]


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("jwtauth", "jwt_auth"),
        ("JWTAuth", "jwt_auth"),
        ("jwt_auth", "jwt_auth"),
        ("json", "json_extractor"),
        ("dicomweb", "dicomweb_bridge"),
        ("Passthru", "passthru"),
        ("unknown_thing", "unknown_thing"),
    ],
)
def test_canonical_middleware(name, canonical):
    assert builtin_registry().canonical_middleware(name) == canonical


def test_middleware_alias_lookup():
    from harmony.registry import Registry

    registry = Registry()
    jwt = MiddlewareType("jwt_auth", Passthru)
    registry.add_middleware(jwt)
    assert registry.middleware("jwtauth") is jwt
    assert registry.middleware("JWTAUTH") is jwt
    assert registry.middleware("jwt_auth") is jwt
    assert registry.middleware_names() == ["jwt_auth"]


# Adding types ----------------------------------------------------------------------------


def test_add_service_verifies_interface():
    registry = Registry()

    class NotAType:
        name = "x"

    with pytest.raises(Invalid):
        registry.add_service(NotAType())
    assert registry.service_names() == []


def test_add_middleware_verifies_interface():
    registry = Registry()
    with pytest.raises(Invalid):
        registry.add_middleware(ServiceType("x"))
    assert registry.middleware_names() == []


def test_empty_registry():
    registry = Registry()
    assert registry.service_names() == []
    assert registry.middleware_names() == []
    assert registry.service("http") is None
    assert registry.middleware("passthru") is None


def test_add_replaces_same_name():
    registry = builtin_registry()
    mine = ServiceType("http", HttpEndpoint, HTTP_OPTIONS)
    registry.add_service(mine)
    assert registry.service("http") is mine
    assert registry.service_names("backend") == ["dicom_scu", "dicomweb", "echo", "fhir"]


# Registry.load -----------------------------------------------------------------------


@pytest.fixture
def module_factory(tmp_path, monkeypatch):
    """
    Write uniquely named modules into a directory on sys.path.

    @return: C{make(source) -> module name}.
    """
    libdir = tmp_path / "lib"
    libdir.mkdir()
    monkeypatch.syspath_prepend(str(libdir))
    names = []

    def make(source):
        name = f"harmony_test_mod_{uuid.uuid4().hex}"
        (libdir / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


TYPES_SOURCE = """
    from harmony.backends.echo import OPTIONS as ECHO_OPTIONS, EchoBackend
    from harmony.middleware.passthru import Passthru
    from harmony.registry import MiddlewareType, ServiceType

    Store = ServiceType(name="store", backend_factory=EchoBackend, backend_options=ECHO_OPTIONS)
    Mark = MiddlewareType("mark", Passthru)

    class Namespace:
        Nested = ServiceType(name="nested", backend_factory=EchoBackend, backend_options=ECHO_OPTIONS)
"""


def test_load_service_type(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    obj = registry.load("service", "store", f"{name}:Store")
    assert obj is sys.modules[name].Store
    assert registry.service("store") is obj
    assert registry.service_names("backend") == ["dicom_scu", "dicomweb", "echo", "fhir", "http", "store"]
    assert registry.service_names("endpoint") == ["dicom_scp", "dicomweb", "echo", "fhir", "http", "jmix"]


def test_load_type_name_is_case_insensitive(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    registry.load("service", "STORE", f"{name}:Store")
    assert registry.service("store").name == "store"


def test_load_nested_attribute_and_dotted_form(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    registry.load("service", "nested", f"{name}:Namespace.Nested")
    assert registry.service("nested").name == "nested"
    registry = builtin_registry()
    registry.load("service", "store", f"{name}.Store")
    assert registry.service("store").name == "store"


def test_load_middleware_type(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    obj = registry.load("middleware", "mark", f"{name}:Mark")
    assert registry.middleware("mark") is obj
    made = obj.make("m", Options(), BuildContext())
    assert verifyObject(IMiddleware, made)


def test_load_module_not_found():
    registry = builtin_registry()
    with pytest.raises(ConfigError) as info:
        registry.load("service", "x", "harmony_absent_module_q:Thing")
    assert info.value.message == (
        "cannot import 'harmony_absent_module_q:Thing': ObjectNotFound: "
        "'harmony_absent_module_q.Thing' does not name an object"
    )
    assert info.value.file is None
    assert info.value.keypath == ()
    assert registry.service_names() == BUILTIN_SERVICES


def test_load_attribute_missing(module_factory):
    name = module_factory(TYPES_SOURCE)
    with pytest.raises(ConfigError) as info:
        builtin_registry().load("service", "x", f"{name}:Missing")
    assert info.value.message == (
        f"cannot import '{name}:Missing': AttributeError: module '{name}' has no attribute 'Missing'"
    )


def test_load_module_that_fails_to_import(module_factory):
    name = module_factory("raise RuntimeError('broken plugin')\n")
    with pytest.raises(ConfigError) as info:
        builtin_registry().load("service", "x", f"{name}:Obj")
    assert info.value.message == f"cannot import '{name}:Obj': RuntimeError: broken plugin"


def test_load_wrong_interface(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    with pytest.raises(ConfigError) as info:
        registry.load("middleware", "store", f"{name}:Store")
    assert info.value.message.startswith(f"'{name}:Store' does not provide IMiddlewareType: ")
    with pytest.raises(ConfigError) as info:
        registry.load("service", "mark", f"{name}:Mark")
    assert info.value.message.startswith(f"'{name}:Mark' does not provide IServiceType: ")
    assert registry.middleware("store") is None
    assert registry.service("mark") is None


def test_load_name_mismatch(module_factory):
    name = module_factory(TYPES_SOURCE)
    registry = builtin_registry()
    with pytest.raises(ConfigError) as info:
        registry.load("service", "pacs", f"{name}:Store")
    assert info.value.message == f"'{name}:Store' is type 'store', registered as 'pacs'"
    assert registry.service("pacs") is None
    assert registry.service("store") is None


# twisted.plugin ------------------------------------------------------------------------


PLUGIN_SOURCE = """
    from twisted.plugin import IPlugin
    from zope.interface import alsoProvides, directlyProvides

    from harmony.backends.echo import OPTIONS as ECHO_OPTIONS, EchoBackend
    from harmony.endpoints.http import OPTIONS as HTTP_OPTIONS, HttpEndpoint
    from harmony.interfaces import IMiddlewareType
    from harmony.middleware.passthru import Passthru
    from harmony.registry import MiddlewareType, ServiceType

    plugged = ServiceType(
        name="plugged",
        endpoint_factory=HttpEndpoint,
        endpoint_options=HTTP_OPTIONS,
        backend_factory=EchoBackend,
        backend_options=ECHO_OPTIONS,
    )
    alsoProvides(plugged, IPlugin)

    plugged_mw = MiddlewareType("plugged_mw", Passthru)
    directlyProvides(plugged_mw, IPlugin, IMiddlewareType)

    # Not a plugin: provides IServiceType but not IPlugin.
    hidden = ServiceType(name="hidden", backend_factory=EchoBackend, backend_options=ECHO_OPTIONS)
"""


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """
    A temporary plugin package (like C{twisted/plugins}) holding one module
    with plugin types.

    @return: the imported package.
    """
    name = f"harmony_test_plugins_{uuid.uuid4().hex}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "harmony_extra.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module(name)
    yield package
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_load_plugins_from_package(plugin_package):
    registry = builtin_registry()
    registry.load_plugins(plugin_package)
    plugged = registry.service("plugged")
    assert plugged is not None
    assert plugged.name == "plugged"
    assert verifyObject(IServiceType, plugged)
    assert registry.service("hidden") is None
    assert registry.service_names() == sorted(BUILTIN_SERVICES + ["plugged"])
    assert registry.middleware("plugged_mw").name == "plugged_mw"
    assert registry.middleware_names() == sorted(BUILTIN_MIDDLEWARE + ["plugged_mw"])
    endpoint = plugged.make_endpoint("e", Options({"path_prefix": "/p"}), BuildContext())
    assert verifyObject(IEndpoint, endpoint)


def test_plugin_types_usable_in_config(plugin_package, tmp_path):
    from _configfiles import NETWORK, PROXY, load, pipeline

    registry = builtin_registry()
    registry.load_plugins(plugin_package)
    text = (
        PROXY
        + NETWORK
        + pipeline("api", middleware=["plugged_mw"]).replace('service = "http"', 'service = "plugged"')
    )
    config = load(tmp_path, text, registry=registry)
    assert config.endpoints["api_in"].service == "plugged"
    assert config.middleware["plugged_mw"].type == "plugged_mw"


def test_load_plugins_empty_package(tmp_path, monkeypatch):
    name = f"harmony_test_noplugins_{uuid.uuid4().hex}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module(name)
    try:
        registry = builtin_registry()
        registry.load_plugins(package)
        assert registry.service_names() == BUILTIN_SERVICES
        assert registry.middleware_names() == BUILTIN_MIDDLEWARE
    finally:
        sys.modules.pop(name, None)


def test_service_type_instances_can_be_marked_as_plugins():
    from twisted.plugin import IPlugin

    stype = ServiceType("x")
    alsoProvides(stype, IPlugin)
    assert IPlugin.providedBy(stype)
    assert IServiceType.providedBy(stype)
    mtype = MiddlewareType("y", Passthru)
    directlyProvides(mtype, IPlugin)
    assert IPlugin.providedBy(mtype)
    assert IMiddlewareType.providedBy(mtype)
    # Only interface declarations may be set: the fields stay frozen.
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        stype.name = "z"
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        mtype.factory = None


def test_service_type_delegates_to_factories():
    calls = []

    def endpoint_factory(name, options, context):
        calls.append(("endpoint", name, options, context))
        return "E"

    def backend_factory(name, options, context):
        calls.append(("backend", name, options, context))
        return "B"

    stype = ServiceType("t", endpoint_factory, Schema({}), backend_factory, Schema({}))
    context = BuildContext()
    options = Options()
    assert stype.make_endpoint("e", options, context) == "E"
    assert stype.make_backend("b", options, context) == "B"
    assert calls == [("endpoint", "e", options, context), ("backend", "b", options, context)]
