# -*- test-case-name: tests.unit.test_management -*-
"""
The management API: a small read-only JSON API on a network of its own
(C{[management]} in the configuration).

C{GET} (or C{HEAD}) under C{/<base_path>} (default C{/admin}):

  - C{/health}: liveness, C{{"status": "ok"}} while the process serves;
  - C{/ready}: readiness, 200 C{{"status": "ready", ...}} when every
    listener is up and every backend with targets has at least one
    available target, else 503 C{{"status": "not_ready", "reasons": [...]}}
    (also while shutting down);
  - C{/info}: version, proxy id, pid, start time, uptime (from the
    injected clock), config id (sha256 of the configuration files' bytes,
    in load order: C{cat harmony.toml pipelines/*.toml | sha256sum});
  - C{/pipelines}: each pipeline's networks, endpoints, middleware and
    backends (with targets);
  - C{/routes}: the HTTP routes of every network (network, prefix,
    endpoint, pipeline, methods) and the DICOM listeners;
  - C{/targets}: L{harmony.gateway.Gateway.target_status} (health,
    ejection, breaker, counters of every backend with targets);
  - C{/metrics}: Prometheus text exposition (L{harmony.metrics}), or
    OpenMetrics when the scraper asks for it.

Every answer is JSON (but C{/metrics}) described by a JSON Schema in
C{harmony/management_schemas/}; errors are C{{"error", "message"}} with
404, 405 (C{Allow: GET, HEAD}) or 401.  With a token (C{token_env} or
C{token}), every path but C{/health} and C{/ready} needs
C{Authorization: Bearer <token>}; a missing or wrong token gets 401 with
C{WWW-Authenticate: Bearer}.  Answers never carry patient data: they
describe the configuration and counters only.

L{management_service} is what C{harmony.tap} adds to the root service.
"""

import datetime
import hashlib
import hmac
import importlib.resources
import json
import os
import platform

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from zope.interface import implementer

from harmony import __version__
from harmony.errors import MethodNotAllowed, NotFound, Unauthorized
from harmony.http.headers import json_error_body
from harmony.http.routing import normalize_prefix
from harmony.http.site import make_site
from harmony.logs import logger

log = logger("harmony.management")

#: Paths that never need the token (probes of load balancers, systemd,
#: Kubernetes).
PUBLIC = frozenset({"health", "ready"})

#: Every path under the base path (C{""}: the index).
PATHS = ("health", "ready", "info", "pipelines", "routes", "targets", "metrics")

ALLOWED_METHODS = ("GET", "HEAD")


#: The JSON Schema (C{harmony/management_schemas/<name>.schema.json}) of
#: each answer.
SCHEMAS = ("index", "health", "ready", "info", "pipelines", "routes", "targets", "error")


def load_schema(name):
    """
    The JSON Schema (Draft 2020-12) of an answer: one of L{SCHEMAS}.
    """
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}")
    resource = importlib.resources.files("harmony").joinpath("management_schemas", name + ".schema.json")
    return json.loads(resource.read_text("utf-8"))


def config_id(config):
    """
    The sha256 (hex) of the configuration files' bytes, concatenated in
    load order (the base file, then the pipelines files by name), or
    C{None} when one cannot be read any more.
    """
    digest = hashlib.sha256()
    try:
        for path in config.files:
            with open(path, "rb") as f:
                digest.update(f.read())
    except OSError:
        return None
    return digest.hexdigest()


def _iso(seconds):
    return (
        datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _services(root):
    """
    Every service below C{root} (depth first).
    """
    for s in root:
        yield s
        if isinstance(s, service.MultiService):
            yield from _services(s)


def listener_states(root):
    """
    The listeners below C{root} and whether each is listening.

    @return: a list of C{(name, up)}.
    """
    states = []
    for s in _services(root):
        if not isinstance(s, StreamServerEndpointService):
            continue
        waiting = s._waitingForPort
        up = bool(
            s.running
            and waiting is not None
            and waiting.called
            and getattr(waiting, "result", None) is not None
            and not isinstance(waiting.result, Failure)
        )
        states.append((s.name or repr(s), up))
    return states


class ManagementResource(Resource):
    """
    The management API (see the module docstring).

    @param gateway: the running L{harmony.gateway.Gateway}, or a
        0-argument callable returning the current one (configurations
        are reloaded).
    @param clock: C{IReactorTime} (uptime).
    @param started_at: when the process started (C{clock.seconds()}).
    @param metrics: the gateway's L{harmony.metrics.Metrics} (C{None}:
        C{/metrics} answers 404).
    @param listeners: a 0-argument callable returning L{listener_states}
        (default: none known).
    @param running: a 0-argument callable, C{False} once shutting down.
    """

    isLeaf = True

    def __init__(self, gateway, clock, started_at, metrics=None, listeners=None, running=None, pid=None):
        Resource.__init__(self)
        self._gateway = gateway if callable(gateway) else (lambda: gateway)
        self.clock = clock
        self.started_at = started_at
        self.metrics = metrics
        self.listeners = listeners or (lambda: [])
        self.running = running or (lambda: True)
        self.pid = os.getpid() if pid is None else pid
        self._config_id = (None, None)

    @property
    def gateway(self):
        return self._gateway()

    # -- dispatch -----------------------------------------------------------------

    def render(self, request):
        request.setHeader(b"cache-control", b"no-store")
        management = self.gateway.config.management
        base = normalize_prefix(management.base_path)
        path = request.path.decode("latin-1")
        if base == "/":
            name = path.strip("/")
        elif path == base:
            name = ""
        elif path.startswith(base + "/"):
            name = path[len(base) + 1 :].strip("/")
        else:
            return self._error(request, NotFound())
        if name not in PUBLIC:
            refused = self._refused(request, management.token)
            if refused is not None:
                return self._error(request, refused)
        if name and name not in PATHS:
            return self._error(request, NotFound())
        if request.method.decode("latin-1") not in ALLOWED_METHODS:
            return self._error(request, MethodNotAllowed(ALLOWED_METHODS))
        if name == "metrics":
            return self._metrics(request)
        status, value = getattr(self, "_" + (name or "index"))()
        return self._json(request, status, value)

    def _refused(self, request, token):
        """
        The L{Unauthorized} error for a request without the token, or
        C{None}.
        """
        if not token:
            return None
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
            return None
        challenge = 'Bearer realm="harmony-management"'
        if header:
            challenge += ', error="invalid_token"'
        return Unauthorized("A valid bearer token is required", [("WWW-Authenticate", challenge)])

    def _json(self, request, status, value):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, indent=2).encode("utf-8") + b"\n"

    def _error(self, request, error):
        for name, value in error.headers:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return self._json(request, error.status, json_error_body(error))

    # -- answers ------------------------------------------------------------------

    def _index(self):
        base = normalize_prefix(self.gateway.config.management.base_path).rstrip("/")
        return 200, {"paths": [f"{base}/{p}" for p in PATHS]}

    def _health(self):
        return 200, {"status": "ok"}

    def _ready(self):
        reasons = []
        if not self.running():
            reasons.append("shutting down")
        listeners = [{"name": name, "up": up} for name, up in self.listeners()]
        reasons += [f"listener {entry['name']} is not listening" for entry in listeners if not entry["up"]]
        backends = []
        for name, status in self.gateway.target_status().items():
            targets = len(status["targets"])
            backends.append({"backend": name, "targets": targets, "available": status["available"]})
            if targets and not status["available"]:
                reasons.append(f"backend {name}: no target available")
        ready = not reasons
        value = {
            "status": "ready" if ready else "not_ready",
            "reasons": reasons,
            "listeners": listeners,
            "backends": backends,
        }
        return (200 if ready else 503), value

    def _info(self):
        config = self.gateway.config
        cached_config, cached_id = self._config_id
        if cached_config is not config:
            cached_id = config_id(config)
            self._config_id = (config, cached_id)
        now = self.clock.seconds()
        return 200, {
            "name": "harmony",
            "version": __version__,
            "proxy_id": config.proxy.id,
            "pid": self.pid,
            "python": platform.python_version(),
            "started_at": _iso(self.started_at),
            "uptime_secs": round(max(0.0, now - self.started_at), 3),
            "config_id": cached_id,
            "config_path": config.path,
            "config_files": [os.path.relpath(p, config.base_dir) for p in config.files],
        }

    def _pipelines(self):
        config = self.gateway.config
        out = []
        for name, p in sorted(config.pipelines.items()):
            backends = []
            for b in p.backends:
                entry = config.backends[b]
                backend = {"name": b, "service": entry.service, "targets": []}
                if entry.targets:
                    backend["strategy"] = entry.selection.strategy
                    backend["targets"] = [
                        {"name": t.name, "address": t.address, "weight": t.weight} for t in entry.targets
                    ]
                backends.append(backend)
            out.append(
                {
                    "name": name,
                    "description": p.description,
                    "file": p.file,
                    "networks": list(p.networks),
                    "endpoints": [{"name": e, "service": config.endpoints[e].service} for e in p.endpoints],
                    "middleware": {
                        "request": [{"name": m, "type": config.middleware[m].type} for m in p.request_middleware],
                        "response": [{"name": m, "type": config.middleware[m].type} for m in p.response_middleware],
                    },
                    "backends": backends,
                }
            )
        return 200, {"pipelines": out}

    def _routes(self):
        gateway = self.gateway
        config = gateway.config
        routes = []
        for network, table in sorted(gateway.route_tables.items()):
            for route in table.routes:
                routes.append(
                    {
                        "network": network,
                        "prefix": route.prefix,
                        "endpoint": route.endpoint.name,
                        "service": route.endpoint.service_type,
                        "pipeline": route.pipeline,
                        "methods": sorted(route.methods),
                        "kind": "catch-all" if route.match is None else "fixed",
                    }
                )
        owner = {e: name for name, p in config.pipelines.items() for e in p.endpoints}
        dicom = [
            {"endpoint": ename, "pipeline": owner.get(ename), "address": address, "port": port}
            for ename, endpoint in sorted(gateway.endpoints.items())
            if ename in owner
            for address, port in endpoint.listen_addresses()
        ]
        return 200, {"routes": routes, "dicom": dicom}

    def _targets(self):
        return 200, {"backends": list(self.gateway.target_status().values())}

    def _metrics(self, request):
        if self.metrics is None:
            return self._error(request, NotFound("Metrics are not enabled"))
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self.metrics.exposition(accept)
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return body


class ManagementService(service.MultiService):
    """
    The management API's listener; its readiness check looks at every
    listener of the service tree it belongs to.
    """

    def __init__(self, resource, endpoint, clock, network=None):
        super().__init__()
        self.resource = resource
        resource.listeners = self.listener_states
        resource.running = self._running
        self.network = network
        site = make_site(resource, clock)
        listener = StreamServerEndpointService(_Logged(endpoint, self), site)
        # Fail startup when the address cannot be bound.
        listener._raiseSynchronously = True
        listener.setName("management" if network is None else f"management:{network}")
        listener.setServiceParent(self)
        self.setName("management")

    def _root(self):
        top = self
        while top.parent is not None:
            top = top.parent
        return top

    def _running(self):
        return bool(self._root().running)

    def listener_states(self):
        return listener_states(self._root())


@implementer(IStreamServerEndpoint)
class _Logged:
    """
    Logs the address the management API listens on.
    """

    def __init__(self, endpoint, owner):
        self._endpoint = endpoint
        self._owner = owner

    def listen(self, factory):
        def listening(port):
            host = port.getHost()
            gateway = self._owner.resource.gateway
            log.info(
                "Management API listening on {host}:{port} under /{base} (network {network})",
                host=host.host,
                port=host.port,
                base=gateway.config.management.base_path.strip("/"),
                network=self._owner.network,
            )
            return port

        return self._endpoint.listen(factory).addCallback(listening)


def management_service(gateway, reactor, started_at, metrics=None, endpoint=None):
    """
    The management API service, for the root service of C{twistd harmony}.

    @param gateway: the running L{harmony.gateway.Gateway}, or a
        0-argument callable returning the current one (after a reload).
    @param reactor: the reactor (listening, clock).
    @param started_at: C{reactor.seconds()} when the process started.
    @param metrics: the L{harmony.metrics.Metrics} given to the gateway's
        L{harmony.registry.BuildContext} (target metrics are read from the
        current gateway).
    @param endpoint: the C{IStreamServerEndpoint} to listen on (default:
        the management network's listener, HTTPS with its C{cert_path}
        and C{key_path}: L{harmony.tls.listener_endpoint}).
    @return: an C{IService} (named C{"management"}).
    @raise ConfigError: a TLS file of the listener is unusable.
    """
    from harmony.tls import listener_endpoint

    current = gateway if callable(gateway) else (lambda: gateway)
    config = current().config
    network = config.management.network
    if endpoint is None:
        endpoint = listener_endpoint(reactor, config.networks[network].http, config, network)
    if metrics is not None:
        metrics.watch_targets(lambda: current().target_status())
    resource = ManagementResource(current, reactor, started_at, metrics)
    return ManagementService(resource, endpoint, reactor, network)
