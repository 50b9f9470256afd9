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
    Number,
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
    #: Backends only: the L{TargetEntry}s (empty: the options' own address).
    targets = attr.ib(default=())
    #: Backends only: strategy, hash_key, rules, health_check,
    #: outlier_detection, circuit_breaker, retry (L{Options}), and
    #: C{resilient}: whether any of them asks for the targets machinery.
    selection = attr.ib(default=None)


@attr.s(frozen=True)
class TargetEntry:
    """
    One target of a backend: the backend's options with the target's
    address (C{base_url}, or C{aet}/C{host}/C{port}) filled in.

    @ivar address: the address for logs and status (C{url} or
        C{AET@host:port}).
    """

    name = attr.ib()
    weight = attr.ib()
    address = attr.ib()
    options = attr.ib()


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
        "shutdown_grace_secs": Field(
            Number(min=0, max=3600), 20.0,
            "on SIGTERM (and for the previous configuration after SIGHUP): time in-flight requests and "
            "associations get to finish",
        ),
        "workers": Field(
            Int(min=1, max=64), 1,
            "processes serving the HTTP listeners (they share the sockets); DICOM listeners, the management "
            "API and C-MOVE store SCPs stay in the first one",
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


def _check_listener_tls(options, where):
    # The files themselves are read at startup (harmony.tls.check_listeners).
    if options.cert_path and not options.key_path:
        raise where.child("key_path").error("required with cert_path (HTTPS needs the certificate's private key)")
    if options.key_path and not options.cert_path:
        raise where.child("cert_path").error("required with key_path (HTTPS needs a certificate)")
    if options.client_ca_path and not options.cert_path:
        raise where.child("client_ca_path").error(
            "client certificates need HTTPS: set cert_path and key_path on this listener"
        )


HTTP_LISTENER = Schema(
    {
        "bind_address": Field(Str(nonempty=True), "0.0.0.0"),
        "bind_port": Field(Int(min=0, max=65535), 8080, "0 picks a free port"),
        "cert_path": Field(Str(), "", "PEM certificate chain (own certificate first); with key_path: HTTPS"),
        "key_path": Field(Str(), "", "PEM private key of that certificate (not encrypted)"),
        "client_ca_path": Field(Str(), "", "PEM CA bundle: ask clients for a certificate issued by one of these"),
        "require_client_cert": Field(Bool(), True, "with client_ca_path: refuse clients without a valid certificate"),
    },
    check=_check_listener_tls,
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

class Glob(Kind):
    """
    A string, or an array of strings (any of them): a routing rule's value.
    """

    label = "string or array of strings"
    _list = ListOf(Str())

    def validate(self, value, where):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and value:
            return self._list.validate(value, where)
        raise self.expected(value, where)


class GlobMap(Kind):
    """
    A table of name -> L{Glob} (a rule's C{header}, C{query}, C{metadata}).
    """

    label = "table of strings or arrays of strings"

    def validate(self, value, where):
        if not isinstance(value, dict) or not value:
            raise self.expected(value, where)
        return Options({str(k): Glob().validate(v, where.child(k)) for k, v in value.items()})


def _check_hash_key(value):
    from harmony.backends.balancing import check_hash_key

    return check_hash_key(value)


def _check_target(options, where):
    has_url = bool(options.url)
    has_dicom = bool(options.aet or options.host or options.port)
    if has_url and has_dicom:
        raise where.error("a target has either url (HTTP, FHIR, DICOMweb) or aet/host/port (DICOM), not both")
    if not has_url and not has_dicom:
        raise where.error("a target needs url (HTTP, FHIR, DICOMweb) or aet, host and port (DICOM)")
    if has_dicom:
        for key in ("aet", "host", "port"):
            if not options[key]:
                raise where.child(key).error("required key is missing (DICOM targets have aet, host and port)")


TARGET = Schema(
    {
        "url": Field(Str(check=_check_url), "", "base URL (HTTP, FHIR, DICOMweb backends)"),
        "aet": Field(Str(), "", "the peer's AE title (dicom_scu backends)"),
        "host": Field(Str(), ""),
        "port": Field(Int(min=1, max=65535), 0),
        "weight": Field(Int(min=1, max=1000), 1, "share of traffic (weighted, least_connections, hash)"),
    },
    check=_check_target,
)

RULE_MATCH = Schema(
    {
        "header": Field(GlobMap(), None),
        "query": Field(GlobMap(), None),
        "metadata": Field(GlobMap(), None),
        "path": Field(Glob(), None),
        "method": Field(Glob(), None),
        "calling_aet": Field(Glob(), None),
        "called_aet": Field(Glob(), None),
        "operation": Field(Glob(), None),
    }
)

RULE = Schema(
    {
        "match": Field(Table(RULE_MATCH), REQUIRED),
        "targets": Field(ListOf(Str(nonempty=True), unique=True), REQUIRED),
    }
)

HEALTH_CHECK = Schema(
    {
        "path": Field(Str(), "/", "HTTP-like targets: GET <url><path>; DICOM targets answer a C-ECHO"),
        "expected_statuses": Field(ListOf(Int(min=100, max=599)), (200,)),
        "interval_secs": Field(Number(min=0.01, max=3600), 5.0),
        "timeout_secs": Field(Number(min=0.01, max=600), 2.0),
        "healthy_threshold": Field(Int(min=1, max=100), 2, "consecutive successes to become healthy"),
        "unhealthy_threshold": Field(Int(min=1, max=100), 2, "consecutive failures to become unhealthy"),
    }
)

OUTLIER_DETECTION = Schema(
    {
        "consecutive_failures": Field(Int(min=0, max=10000), 5, "0 disables passive ejection"),
        "base_ejection_secs": Field(Number(min=0.01, max=86400), 30.0),
        "max_ejection_secs": Field(Number(min=0.01, max=86400), 300.0),
    }
)

CIRCUIT_BREAKER = Schema(
    {
        "failure_threshold": Field(Int(min=0, max=10000), 5, "consecutive failures that open it; 0 disables"),
        "open_secs": Field(Number(min=0.01, max=86400), 30.0),
        "half_open_requests": Field(Int(min=1, max=1000), 1),
        "success_threshold": Field(Int(min=1, max=1000), 1),
    }
)

RETRY = Schema(
    {
        "max_retries": Field(Int(min=0, max=10), 0, "extra attempts (idempotent requests only)"),
        "base_delay_secs": Field(Number(min=0, max=60), 0.025),
        "max_delay_secs": Field(Number(min=0, max=600), 1.0),
        "budget_ratio": Field(Number(min=0, max=10), 0.2),
        "budget_min_per_sec": Field(Number(min=0, max=100000), 3.0),
        "budget_window_secs": Field(Number(min=1, max=3600), 10.0),
        "retry_non_idempotent": Field(Bool(), False, "also retry POST/PATCH and C-STORE/C-GET/C-MOVE"),
        "retry_on_statuses": Field(ListOf(Int(min=100, max=599)), (502, 503, 504)),
    }
)

BACKEND = SERVICE.extend(
    {
        "targets": Field(ListOf(Str(nonempty=True), unique=True), ()),
        "strategy": Field(
            Str(choices=("round_robin", "weighted", "least_connections", "failover", "hash"), lower=True),
            "round_robin",
        ),
        "hash_key": Field(Str(nonempty=True, check=_check_hash_key), "client_ip"),
        "rules": Field(ListOf(Table(RULE)), ()),
        # Validated by the loader (max_retries may also come from options).
        "health_check": Field(AnyTable(), None),
        "outlier_detection": Field(AnyTable(), None),
        "circuit_breaker": Field(AnyTable(), None),
        "retry": Field(AnyTable(), None),
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

LOG_LEVELS = ("trace", "debug", "info", "warn", "error")

LOGGING = Schema(
    {
        "format": Field(
            Str(choices=("text", "json"), lower=True), "text", "text lines (twistd's) or one JSON object per line"
        ),
        "level": Field(
            Str(choices=LOG_LEVELS, lower=True), None, "alias of [proxy] log_level (when both are set they must agree)"
        ),
        "access_log": Field(
            Bool(), True, "one harmony.access line per HTTP request and per DICOM association, whatever the level"
        ),
        "log_to_file": Field(Bool(), False),
        "log_file_path": Field(Str(nonempty=True), "./tmp/harmony.log"),
    }
)


def resolve_log_level(top, data, where):
    """
    C{[logging] level} and C{[proxy] log_level} are one setting: when both
    are in the file they must agree; the result has the level in both
    (default C{info}).

    @param top: the validated top-level L{Options}.
    @param data: the raw top-level table (was C{log_level} given?).
    @raise ConfigError: they disagree.
    """
    level = top.logging.level
    proxy = data.get("proxy")
    if level is None:
        level = top.proxy.log_level
    elif isinstance(proxy, dict) and "log_level" in proxy and top.proxy.log_level != level:
        raise where.child("logging").child("level").error(
            f'"{level}" disagrees with proxy.log_level = "{top.proxy.log_level}"'
            " (level is an alias of log_level: set one of them)"
        )
    return Options(
        dict(
            top,
            proxy=Options(dict(top.proxy, log_level=level)),
            logging=Options(dict(top.logging, level=level)),
        )
    )

STORAGE = Schema(
    {
        "backend": Field(Str(choices=("filesystem",)), "filesystem"),
        "options": Field(Table(Schema({"path": Field(Str(nonempty=True), "./tmp")})), None),
    }
)

def _check_base_path(value):
    if any(c in value for c in "?#%") or any(s in (".", "..") for s in value.split("/")):
        return f'must be a plain path such as "admin", got "{value}"'
    return None


def _check_env_name(value):
    if value and not all(c.isalnum() or c == "_" for c in value):
        return f'must be the name of an environment variable, got "{value}"'
    return None


MANAGEMENT = Schema(
    {
        "enabled": Field(Bool(), False),
        "base_path": Field(Str(nonempty=True, check=_check_base_path), "admin", "the API's paths: /<base_path>/health, ..."),
        "network": Field(Str(), "", "a [network.<name>.http] listener serving only the management API"),
        "token_env": Field(
            Str(check=_check_env_name), "", "environment variable holding the bearer token (wins over token)"
        ),
        "token": Field(Str(), "", "the bearer token itself; with either: every route but health and ready needs it"),
    }
)

TOP_LEVEL = Schema(
    {
        "proxy": Field(Table(PROXY), REQUIRED),
        "network": Field(MapOf(Table(NETWORK), "network"), Options()),
        "endpoints": Field(MapOf(Table(SERVICE), "endpoints"), Options()),
        "backends": Field(MapOf(Table(BACKEND), "backends"), Options()),
        "targets": Field(MapOf(Table(TARGET), "targets"), Options()),
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
