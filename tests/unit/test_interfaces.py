"""
Every provider of a L{harmony.interfaces} contract, fakes included, is
checked with C{verifyObject}.
"""

import os
import types

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from _fakes import (
    FailingAgent,
    FakeBackend,
    FakeEndpoint,
    FakePushProducer,
    PausingConsumer,
    RecordingAgent,
    RecordingMiddleware,
    RefusingAgent,
)
from harmony.backends.echo import EchoBackend
from harmony.backends.http import OPTIONS as HTTP_BACKEND_OPTIONS
from harmony.backends.http import HttpBackend
from harmony.config.schema import Where
from harmony.endpoints.http import OPTIONS as HTTP_ENDPOINT_OPTIONS
from harmony.endpoints.http import EchoEndpoint, HttpEndpoint
from harmony.http.adapter import HttpAdapter
from harmony.interfaces import (
    IBackend,
    IEndpoint,
    IMiddleware,
    IMiddlewareType,
    IProtocolAdapter,
    IServiceType,
)
from harmony.middleware.passthru import Passthru
from harmony.registry import BuildContext, MiddlewareType, ServiceType, builtin_registry
from harmony.streams import BytesBodyProducer, Stream, StreamBodyProducer


def _endpoint_options():
    return HTTP_ENDPOINT_OPTIONS.validate({"path_prefix": "/x"}, Where("t.toml", ("endpoints", "x", "options")))


def _backend_options():
    return HTTP_BACKEND_OPTIONS.validate({"base_url": "http://up.test"}, Where("t.toml", ("backends", "u", "options")))


_EXAMPLE_SPEC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc", "transforms",
    "example-patient.json",
)

#: Options that make each built-in middleware type valid (those without
#: required options need none).
MIDDLEWARE_OPTIONS = {
    "path_filter": {"rules": ["/{*rest}"]},
    "transform": {"spec_path": _EXAMPLE_SPEC},
    "metadata_transform": {"spec_path": _EXAMPLE_SPEC},
    "jwt_auth": {"algorithm": "HS256", "secret": "0123456789abcdef0123456789abcdef"},
    "rate_limit": {"rate": 10.0},
    "fhir_imaging": {"dicomweb_url": "/dicomweb", "jmix_url": "https://gw.example/jmix", "timezone": "+01:00"},
    "basic_auth": {"users": {"alice": "$2b$12$C6UzMDM.H6dfI/f/IKcEeO5c2OiFq3S0K6uR0m6bQ3bW2E8aJ8Q9a"}},
}


class ProviderTests(SynchronousTestCase):
    def test_endpoints(self):
        for cls, stype in ((HttpEndpoint, "http"), (EchoEndpoint, "echo")):
            endpoint = cls("e", _endpoint_options(), BuildContext())
            self.assertTrue(verifyObject(IEndpoint, endpoint))
            self.assertEqual(endpoint.service_type, stype)
            [route] = endpoint.http_routes()
            self.assertEqual(route.prefix, "/x")
            self.assertIs(route.endpoint, endpoint)

    def test_backends(self):
        self.assertTrue(verifyObject(IBackend, EchoBackend("echo")))
        backend = HttpBackend("up", _backend_options(), BuildContext(agent=RecordingAgent()))
        self.assertTrue(verifyObject(IBackend, backend))
        self.assertEqual(backend.service_type, "http")

    def test_passthru(self):
        mw = Passthru("p")
        self.assertTrue(verifyObject(IMiddleware, mw))
        self.assertIsNone(mw.request(object()))
        self.assertIsNone(mw.response(object(), object()))

    def test_adapter(self):
        adapter = HttpAdapter(types.SimpleNamespace(public_base_url="", trusted_proxies=()))
        self.assertTrue(verifyObject(IProtocolAdapter, adapter))
        self.assertEqual(adapter.protocol, "http")

    def test_builtin_types(self):
        from harmony.config.schema import Where

        registry = builtin_registry()
        for name in registry.service_names():
            stype = registry.service(name)
            self.assertIsInstance(stype, ServiceType)
            self.assertTrue(verifyObject(IServiceType, stype))
        for name in registry.middleware_names():
            mtype = registry.middleware(name)
            self.assertIsInstance(mtype, MiddlewareType)
            self.assertTrue(verifyObject(IMiddlewareType, mtype))
            options = mtype.options.validate(MIDDLEWARE_OPTIONS.get(name, {}), Where("t.toml"))
            self.assertTrue(verifyObject(IMiddleware, mtype.make("m", options, BuildContext())))
        self.assertEqual(set(registry.service_names()), {"http", "echo", "dicom_scp", "dicom_scu", "dicomweb", "fhir", "jmix"})

    def test_made_by_service_types(self):
        registry = builtin_registry()
        context = BuildContext(agent=RecordingAgent())
        http = registry.service("http")
        self.assertTrue(verifyObject(IEndpoint, http.make_endpoint("e", _endpoint_options(), context)))
        self.assertTrue(verifyObject(IBackend, http.make_backend("b", _backend_options(), context)))
        echo = registry.service("echo")
        self.assertTrue(verifyObject(IEndpoint, echo.make_endpoint("e", _endpoint_options(), context)))
        self.assertTrue(verifyObject(IBackend, echo.make_backend("b", None, context)))

    def test_stream_producers(self):
        self.assertTrue(verifyObject(IBodyProducer, StreamBodyProducer(Stream())))
        self.assertTrue(verifyObject(IBodyProducer, BytesBodyProducer(b"")))


class FakeTests(SynchronousTestCase):
    def test_fakes(self):
        self.assertTrue(verifyObject(IEndpoint, FakeEndpoint()))
        self.assertTrue(verifyObject(IMiddleware, RecordingMiddleware("m", [])))
        self.assertTrue(verifyObject(IBackend, FakeBackend()))
        self.assertTrue(verifyObject(IAgent, RecordingAgent()))
        self.assertTrue(verifyObject(IAgent, RefusingAgent()))
        self.assertTrue(verifyObject(IAgent, FailingAgent(ValueError())))
        self.assertTrue(verifyObject(IPushProducer, FakePushProducer()))
        self.assertTrue(verifyObject(IConsumer, PausingConsumer()))

    def test_verify_object_catches_a_broken_provider(self):
        @implementer(IBackend)
        class Broken:
            name = "broken"
            service_type = "x"

            def handle(self):  # wrong signature, no close()
                pass

        self.assertRaises(Invalid, verifyObject, IBackend, Broken())

    def test_interfaces_have_no_self(self):
        for iface in (IEndpoint, IMiddleware, IBackend, IProtocolAdapter, IServiceType, IMiddlewareType):
            self.assertTrue(iface.isOrExtends(Interface))
            for name in iface.names():
                desc = iface[name]
                positional = getattr(desc, "positional", ())
                self.assertNotIn("self", positional, f"{iface.__name__}.{name}")
