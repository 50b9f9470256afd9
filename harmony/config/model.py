# -*- test-case-name: tests.unit.test_config -*-
"""
The schema of Harmony's own tables, and the frozen entry types.

Service and middleware options are declared by each type (see
L{harmony.registry}); this module covers the tables around them.
"""

import attr

from harmony.config.schema import (
    REQUIRED,
    AnyTable,
    Bool,
    Field,
    Int,
    Kind,
    ListOf,
    MapOf,
    Options,
    Schema,
    Str,
    Table,
)


@attr.s(frozen=True)
class ServiceEntry:
    """
    An endpoint or backend: its name, canonical service type, validated
    options and the file that defined it.
    """

    name = attr.ib()
    service = attr.ib()
    options = attr.ib()
    file = attr.ib()


@attr.s(frozen=True)
class MiddlewareEntry:
    name = attr.ib()
    type = attr.ib()
    options = attr.ib()
    file = attr.ib()


@attr.s(frozen=True)
class PipelineEntry:
    """
    A pipeline with its middleware resolved into the request chain (in
    order) and the response chain (in the order the hooks run).
    """

    name = attr.ib()
    description = attr.ib()
    networks = attr.ib()
    endpoints = attr.ib()
    request_middleware = attr.ib()
    response_middleware = attr.ib()
    backends = attr.ib()
    failover_non_idempotent = attr.ib()
    file = attr.ib()


def _check_url(value):
    if value and not (value.startswith("http://") or value.startswith("https://")):
        return f'expected an http:// or https:// URL, got "{value}"'
    return None


CONTENT_LIMITS = Schema(
    {
        "max_body_size": Field(Int(min=1), 10 * 1024 * 1024, "bytes; larger bodies get 413"),
        "max_csv_rows": Field(Int(min=1), 10000),
        "max_xml_depth": Field(Int(min=1), 100),
        "max_multipart_files": Field(Int(min=1), 10),
        "max_form_fields": Field(Int(min=1), 1000),
    }
)

PROXY = Schema(
    {
        "id": Field(Str(nonempty=True), REQUIRED, "this gateway's identity"),
        "public_base_url": Field(Str(check=_check_url), "", "external base URL for links"),
        "trusted_proxies": Field(
            ListOf(Str(nonempty=True)),
            (),
            "client addresses whose X-Forwarded-* headers are believed",
        ),
        "log_level": Field(
            Str(choices=("trace", "debug", "info", "warn", "error"), lower=True), "info"
        ),
        "pipelines_path": Field(Str(nonempty=True), "pipelines"),
        "transforms_path": Field(Str(nonempty=True), "transforms"),
        "content_limits": Field(Table(CONTENT_LIMITS), CONTENT_LIMITS.validate({}, None)),
    },
    legacy={"store_dir": "use [storage.options] path"},
)


def _no_wireguard(options, where):
    if options.enable_wireguard:
        raise where.child("enable_wireguard").error(
            "WireGuard is not supported by Harmony; set up the tunnel outside Harmony"
            " and bind the listener to its address"
        )


HTTP_LISTENER = Schema(
    {
        "bind_address": Field(Str(nonempty=True), "0.0.0.0"),
        "bind_port": Field(Int(min=0, max=65535), 8080, "0 picks a free port"),
    }
)

NETWORK = Schema(
    {
        "enable_wireguard": Field(Bool(), False),
        "interface": Field(Str(nonempty=True), "wg0"),
        "http": Field(Table(HTTP_LISTENER), None),
    },
    legacy={"dicom": "the DICOM listener is configured on the dicom_scp endpoint"},
    check=_no_wireguard,
)

SERVICE = Schema(
    {
        "service": Field(Str(nonempty=True, lower=True), REQUIRED),
        "options": Field(AnyTable(), {}),
    }
)

MIDDLEWARE = Schema(
    {
        "type": Field(Str(nonempty=True, lower=True), REQUIRED),
        "options": Field(AnyTable(), {}),
    }
)


class MiddlewareList(Kind):
    """
    C{middleware = [...]} or C{[pipelines.X.middleware] left/right}.
    """

    label = "array of middleware names or a table with left/right"
    _names = ListOf(Str(nonempty=True))
    _split = Schema({"left": Field(_names, ()), "right": Field(_names, ())})

    def validate(self, value, where):
        if isinstance(value, list):
            return self._names.validate(value, where)
        if isinstance(value, dict):
            return self._split.validate(value, where)
        raise self.expected(value, where)


PIPELINE = Schema(
    {
        "description": Field(Str(), ""),
        "networks": Field(ListOf(Str(nonempty=True), unique=True), ()),
        "endpoints": Field(ListOf(Str(nonempty=True), unique=True), REQUIRED),
        "middleware": Field(MiddlewareList(), ()),
        "backends": Field(ListOf(Str(nonempty=True), unique=True), REQUIRED),
        "failover_non_idempotent": Field(
            Bool(), False, "also fail over POST/PATCH to the next backend"
        ),
    }
)

LOGGING = Schema(
    {
        "log_to_file": Field(Bool(), False),
        "log_file_path": Field(Str(nonempty=True), "./tmp/harmony.log"),
    }
)

STORAGE = Schema(
    {
        "backend": Field(Str(choices=("filesystem",)), "filesystem"),
        "options": Field(Table(Schema({"path": Field(Str(nonempty=True), "./tmp")})), None),
    }
)

MANAGEMENT = Schema(
    {
        "enabled": Field(Bool(), False),
        "base_path": Field(Str(nonempty=True), "admin"),
        "network": Field(Str(), ""),
    }
)

TOP_LEVEL = Schema(
    {
        "proxy": Field(Table(PROXY), REQUIRED),
        "network": Field(MapOf(Table(NETWORK), "network"), Options()),
        "endpoints": Field(MapOf(Table(SERVICE), "endpoints"), Options()),
        "backends": Field(MapOf(Table(SERVICE), "backends"), Options()),
        "middleware": Field(MapOf(Table(MIDDLEWARE), "middleware"), Options()),
        "pipelines": Field(MapOf(Table(PIPELINE), "pipelines"), Options()),
        "logging": Field(Table(LOGGING), LOGGING.validate({}, None)),
        "storage": Field(Table(STORAGE), STORAGE.validate({}, None)),
        "management": Field(Table(MANAGEMENT), MANAGEMENT.validate({}, None)),
        # Handled before validation (see loader): legacy registries.
        "services": Field(AnyTable(), None),
        "middleware_types": Field(AnyTable(), None),
    }
)
