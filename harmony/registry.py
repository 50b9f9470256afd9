# -*- test-case-name: tests.unit.test_registry -*-
"""
Service and middleware types by name.

Built-in types are registered by L{default_registry}.  Third parties add
types in two ways:

  - a module in a C{twisted/plugins/} directory exposing an object that
    provides C{twisted.plugin.IPlugin} and L{IServiceType} or
    L{IMiddlewareType} (found with C{twisted.plugin.getPlugins});
  - C{[services.<type>] module = "package.module:Object"} (or
    C{[middleware_types.<type>]}) in the configuration.
"""

import attr
from twisted.python.reflect import namedAny
from zope.interface import implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from harmony.config.errors import ConfigError
from harmony.config.schema import Schema
from harmony.interfaces import IMiddlewareType, IServiceType

#: Service type aliases by role (CONFIG.md): "dicom" names the SCP as an
#: endpoint and the SCU as a backend.
SERVICE_ALIASES = {
    "endpoint": {"dicom": "dicom_scp", "dimse": "dicom_scp"},
    "backend": {"dicom": "dicom_scu", "dimse": "dicom_scu"},
}

MIDDLEWARE_ALIASES = {
    "jwtauth": "jwt_auth",
    "json": "json_extractor",
    "dicomweb": "dicomweb_bridge",
}


@attr.s(frozen=True)
class BuildContext:
    """
    What factories get to build endpoints, backends and middleware.

    @ivar reactor: the reactor (time, TCP); C{None} when only checking a
        configuration.
    @ivar agent: the shared C{IAgent} (connection pool) for outbound HTTP.
    @ivar http_client: a C{treq.client.HTTPClient} over C{agent}.
    @ivar config: the L{harmony.config.HarmonyConfig}.
    @ivar move_router: the L{harmony.dimse.move.MoveRouter} shared by the
        gateway's DICOM endpoints and backends (C-MOVE instances received
        by an SCP reach the move that asked for them).
    @ivar metrics: the gateway's L{harmony.metrics.Metrics}, or C{None}
        (no metrics: nothing is recorded).
    """

    reactor = attr.ib(default=None)
    agent = attr.ib(default=None)
    http_client = attr.ib(default=None)
    config = attr.ib(default=None)
    move_router = attr.ib(factory=lambda: _new_move_router())
    metrics = attr.ib(default=None)


def _new_move_router():
    from harmony.dimse.move import MoveRouter

    return MoveRouter()


def _markable(cls):
    """
    Let C{zope.interface.alsoProvides} / C{directlyProvides} mark instances
    of a frozen attrs class (how a third party declares C{IPlugin} on a
    L{ServiceType} or L{MiddlewareType}); every other attribute stays frozen.
    """
    frozen_setattr = cls.__setattr__

    def __setattr__(self, name, value):
        if name == "__provides__":
            object.__setattr__(self, name, value)
        else:
            frozen_setattr(self, name, value)

    cls.__setattr__ = __setattr__
    return cls


@_markable
@implementer(IServiceType)
@attr.s(frozen=True)
class ServiceType:
    """
    A service type assembled from an endpoint factory and/or a backend
    factory, each with its options schema.

    @ivar endpoint_protocol: C{"http"} for endpoints served on HTTP
        networks, C{"dimse"} for endpoints with their own listener.
    """

    name = attr.ib()
    endpoint_factory = attr.ib(default=None)
    endpoint_options = attr.ib(default=None)
    backend_factory = attr.ib(default=None)
    backend_options = attr.ib(default=None)
    endpoint_protocol = attr.ib(default="http")

    def make_endpoint(self, name, options, context):
        return self.endpoint_factory(name, options, context)

    def make_backend(self, name, options, context):
        return self.backend_factory(name, options, context)


@_markable
@implementer(IMiddlewareType)
@attr.s(frozen=True)
class MiddlewareType:
    name = attr.ib()
    factory = attr.ib()
    options = attr.ib(factory=lambda: Schema({}))

    def make(self, name, options, context):
        return self.factory(name, options, context)


class Registry:
    """
    Type name -> L{IServiceType} / L{IMiddlewareType}.
    """

    def __init__(self):
        self._services = {}
        self._middleware = {}

    def add_service(self, stype):
        verifyObject(IServiceType, stype)
        self._services[stype.name] = stype

    def add_middleware(self, mtype):
        verifyObject(IMiddlewareType, mtype)
        self._middleware[mtype.name] = mtype

    def service(self, name, role=None):
        """
        The service type called C{name} (aliases resolved for C{role}:
        C{"endpoint"} or C{"backend"}), or C{None}.
        """
        name = name.lower()
        if role is not None:
            name = SERVICE_ALIASES[role].get(name, name)
        return self._services.get(name)

    def service_names(self, role=None):
        names = sorted(self._services)
        if role == "endpoint":
            return [n for n in names if self._services[n].endpoint_options is not None]
        if role == "backend":
            return [n for n in names if self._services[n].backend_options is not None]
        return names

    def canonical_middleware(self, name):
        name = name.lower()
        return MIDDLEWARE_ALIASES.get(name, name)

    def middleware(self, name):
        return self._middleware.get(self.canonical_middleware(name))

    def middleware_names(self):
        return sorted(self._middleware)

    def load(self, kind, type_name, spec):
        """
        Load a third-party type named by C{"package.module:Object"} and
        register it as C{type_name}.

        @raise ConfigError: when it cannot be imported or does not provide
            the interface.
        """
        interface = IServiceType if kind == "service" else IMiddlewareType
        dotted = spec.replace(":", ".")
        try:
            obj = namedAny(dotted)
        except Exception as e:
            raise ConfigError(f"cannot import {spec!r}: {type(e).__name__}: {e}")
        try:
            verifyObject(interface, obj)
        except Invalid as e:
            raise ConfigError(f"{spec!r} does not provide {interface.__name__}: {e}")
        if obj.name.lower() != type_name.lower():
            raise ConfigError(f"{spec!r} is type {obj.name!r}, registered as {type_name!r}")
        if kind == "service":
            self.add_service(obj)
        else:
            self.add_middleware(obj)
        return obj

    def load_plugins(self, package=None):
        """
        Register every third-party type found by C{twisted.plugin}.
        """
        from twisted.plugin import getPlugins

        for stype in getPlugins(IServiceType, package):
            self.add_service(stype)
        for mtype in getPlugins(IMiddlewareType, package):
            self.add_middleware(mtype)


def builtin_registry():
    """
    A registry with Harmony's own types only.
    """
    from harmony.backends import dicom_scu
    from harmony.backends import dicomweb as dicomweb_backend
    from harmony.backends import echo as echo_backend
    from harmony.backends import http as http_backend
    from harmony.endpoints import dicom_scp
    from harmony.endpoints import dicomweb as dicomweb_endpoint
    from harmony.endpoints import fhir as fhir_endpoint
    from harmony.endpoints import http as http_endpoint
    from harmony.endpoints import jmix as jmix_endpoint
    from harmony.middleware import (
        basic_auth,
        cors,
        dicomweb_bridge,
        fhir_imaging,
        header,
        jmix_builder,
        json_extractor,
        jwt_auth,
        log_dump,
        metadata_transform,
        passthru,
        path_filter,
        rate_limit,
        transform,
    )

    registry = Registry()
    registry.add_service(
        ServiceType(
            name="http",
            endpoint_factory=http_endpoint.HttpEndpoint,
            endpoint_options=http_endpoint.OPTIONS,
            backend_factory=http_backend.HttpBackend,
            backend_options=http_backend.OPTIONS,
        )
    )
    registry.add_service(
        ServiceType(
            name="echo",
            endpoint_factory=http_endpoint.EchoEndpoint,
            endpoint_options=http_endpoint.OPTIONS,
            backend_factory=echo_backend.EchoBackend,
            backend_options=echo_backend.OPTIONS,
        )
    )
    registry.add_service(
        ServiceType(
            name="dicom_scp",
            endpoint_factory=dicom_scp.DicomScpEndpoint,
            endpoint_options=dicom_scp.OPTIONS,
            endpoint_protocol="dimse",
        )
    )
    registry.add_service(
        ServiceType(
            name="dicom_scu",
            backend_factory=dicom_scu.DicomScuBackend,
            backend_options=dicom_scu.OPTIONS,
        )
    )
    registry.add_service(fhir_endpoint.SERVICE_TYPE)
    registry.add_service(
        ServiceType(
            name="dicomweb",
            endpoint_factory=dicomweb_endpoint.DicomwebEndpoint,
            endpoint_options=dicomweb_endpoint.OPTIONS,
            backend_factory=dicomweb_backend.DicomwebBackend,
            backend_options=dicomweb_backend.OPTIONS,
        )
    )
    registry.add_service(
        ServiceType(name="jmix", endpoint_factory=jmix_endpoint.JmixEndpoint, endpoint_options=jmix_endpoint.OPTIONS)
    )
    registry.add_middleware(MiddlewareType("passthru", passthru.Passthru))
    registry.add_middleware(MiddlewareType("connect", passthru.Passthru))
    registry.add_middleware(jwt_auth.MIDDLEWARE_TYPE)
    registry.add_middleware(basic_auth.MIDDLEWARE_TYPE)
    registry.add_middleware(MiddlewareType("path_filter", path_filter.PathFilter, path_filter.OPTIONS))
    registry.add_middleware(MiddlewareType("header", header.HeaderMiddleware, header.OPTIONS))
    registry.add_middleware(MiddlewareType("cors", cors.CorsMiddleware, cors.OPTIONS))
    registry.add_middleware(rate_limit.MIDDLEWARE_TYPE)
    registry.add_middleware(
        MiddlewareType("dicomweb_bridge", dicomweb_bridge.DicomwebBridge, dicomweb_bridge.OPTIONS)
    )
    registry.add_middleware(fhir_imaging.MIDDLEWARE_TYPE)
    registry.add_middleware(MiddlewareType("log_dump", log_dump.LogDump, log_dump.OPTIONS))
    registry.add_middleware(MiddlewareType("json_extractor", json_extractor.JsonExtractor, json_extractor.OPTIONS))
    registry.add_middleware(MiddlewareType("jmix_builder", jmix_builder.JmixBuilder, jmix_builder.OPTIONS))
    registry.add_middleware(MiddlewareType("transform", transform.TransformMiddleware, transform.OPTIONS))
    registry.add_middleware(
        MiddlewareType(
            "metadata_transform", metadata_transform.MetadataTransformMiddleware, metadata_transform.OPTIONS
        )
    )
    return registry


def default_registry():
    """
    Built-in types plus installed third-party plugins.
    """
    registry = builtin_registry()
    registry.load_plugins()
    return registry
