# -*- test-case-name: tests.unit.test_gateway -*-
"""
Build the running gateway from a validated configuration: endpoints,
backends, middleware (once per pipeline), executors, and the HTTP route
table and application of every network.

Building has no side effects (no sockets, no timers), so
C{harmony check-config} runs the same code as startup.
"""

import attr
from twisted.internet import defer

from harmony.backends.targets import TargetedBackend, build_backend
from harmony.config.errors import ConfigError
from harmony.http.adapter import HttpAdapter
from harmony.http.routing import RouteTable
from harmony.http.site import NetworkResource
from harmony.pipeline import PipelineExecutor


@attr.s
class Gateway:
    """
    @ivar endpoints: name -> L{IEndpoint}.
    @ivar backends: name -> L{IBackend}.
    @ivar executors: pipeline name -> L{PipelineExecutor}.
    @ivar route_tables: network name -> L{RouteTable}.
    @ivar apps: network name -> L{NetworkResource} (networks with HTTP routes).
    """

    config = attr.ib()
    endpoints = attr.ib()
    backends = attr.ib()
    executors = attr.ib()
    route_tables = attr.ib()
    apps = attr.ib()

    def endpoint_services(self, reactor):
        """
        The services of endpoints that listen themselves (DICOM SCPs), each
        bound to its pipeline's executor, and of backends that listen too
        (a C{dicom_scu} backend's persistent C-MOVE store SCP).  Called
        once, at startup.
        """
        services = []
        for pname, pipeline in self.config.pipelines.items():
            for ename in pipeline.endpoints:
                services += self.endpoints[ename].services(self.executors[pname], reactor)
        for name in sorted(self.backends):
            backend_services = getattr(self.backends[name], "services", None)
            if backend_services is not None:
                services += backend_services(reactor)
        return services

    def target_status(self):
        """
        The selection state of every backend with targets, health checks,
        retries or a circuit breaker (see L{TargetedBackend.status}).

        @return: backend name -> status dict.
        """
        return {
            name: backend.status()
            for name, backend in sorted(self.backends.items())
            if isinstance(backend, TargetedBackend)
        }

    def close(self):
        """
        Close every backend.

        @return: Deferred[None]
        """
        ds = [defer.maybeDeferred(b.close) for b in self.backends.values()]
        return defer.DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)


def build_gateway(config, registry, context):
    """
    @param config: a L{harmony.config.HarmonyConfig}.
    @param registry: the L{harmony.registry.Registry} it was validated with.
    @param context: a L{harmony.registry.BuildContext}.
    @raise ConfigError: route conflicts, or a factory's own checks.
    """
    endpoints = {
        name: registry.service(entry.service).make_endpoint(name, entry.options, context)
        for name, entry in config.endpoints.items()
    }
    backends = {
        name: build_backend(registry.service(entry.service), name, entry, context)
        for name, entry in config.backends.items()
    }
    executors = {}
    tables = {}
    metrics = getattr(context, "metrics", None)
    for pname, pipeline in config.pipelines.items():
        instances = {}
        for mname in dict.fromkeys(pipeline.request_middleware + pipeline.response_middleware):
            entry = config.middleware[mname]
            instances[mname] = registry.middleware(entry.type).make(mname, entry.options, context)
        executors[pname] = PipelineExecutor(
            pname,
            [instances[m] for m in pipeline.request_middleware],
            [instances[m] for m in pipeline.response_middleware],
            [backends[b] for b in pipeline.backends],
            pipeline.failover_non_idempotent,
            metrics=None if metrics is None else metrics.pipeline(pname),
        )
        for mw in instances.values():
            # Middleware that asks the backends itself (more than once per
            # request) gets the executor: PipelineExecutor.call_backends.
            bind = getattr(mw, "bind_pipeline", None)
            if bind is not None:
                bind(executors[pname])
        for i, ename in enumerate(pipeline.endpoints):
            for route in endpoints[ename].http_routes():
                route = attr.evolve(route, pipeline=pname)
                for network in pipeline.networks:
                    table = tables.setdefault(network, RouteTable(network))
                    try:
                        table.add(route)
                    except ConfigError as e:
                        raise ConfigError(e.message, pipeline.file, ("pipelines", pname, "endpoints", i))
    _check_addresses(config, endpoints, tables)
    adapter = HttpAdapter(config.proxy)
    apps = {net: NetworkResource(net, table, executors, adapter) for net, table in tables.items()}
    return Gateway(config, endpoints, backends, executors, tables, apps)


def _check_addresses(config, endpoints, tables):
    """
    Two listeners on the same address and port are a startup error (port 0
    picks a free port and never conflicts).
    """
    seen = {}
    management = config.management.network if config.management.enabled else None
    for name, net in config.networks.items():
        if net.http is not None and (name in tables or name == management) and net.http.bind_port:
            seen[(net.http.bind_address, net.http.bind_port)] = f"network {name!r}"
    for pname, pipeline in config.pipelines.items():
        for ename in pipeline.endpoints:
            for address, port in endpoints[ename].listen_addresses():
                if not port:
                    continue
                wildcard = [(a, port) for a in (address, "0.0.0.0", "::") if (a, port) in seen]
                if address in ("0.0.0.0", "::"):
                    wildcard += [k for k in seen if k[1] == port]
                if wildcard:
                    raise ConfigError(
                        f"endpoint {ename!r} listens on {address}:{port}, already used by {seen[wildcard[0]]}",
                        config.endpoints[ename].file,
                        ("endpoints", ename, "options", "port"),
                    )
                seen[(address, port)] = f"endpoint {ename!r}"


def describe(gateway):
    """
    A human summary of networks, pipelines and routes (for check-config).
    """
    config = gateway.config
    lines = [f"Harmony configuration {config.path} (proxy id {config.proxy.id!r})", "", "Networks:"]
    for name, net in sorted(config.networks.items()):
        if net.http is None:
            lines.append(f"  {name}: no HTTP listener")
        else:
            served = "serving" if name in gateway.apps else "no routes, not listening"
            if config.management.enabled and name == config.management.network:
                served = f"management API under /{config.management.base_path.strip('/')}"
            lines.append(f"  {name}: http {net.http.bind_address}:{net.http.bind_port} ({served})")
    lines += ["", "Pipelines:"]
    for name, p in sorted(config.pipelines.items()):
        lines.append(f"  {name} ({p.file})" + (f": {p.description}" if p.description else ""))
        lines.append(f"    networks:   {', '.join(p.networks) or '-'}")
        lines.append(
            "    endpoints:  "
            + ", ".join(f"{e} ({config.endpoints[e].service})" for e in p.endpoints)
        )
        lines.append(f"    middleware: request {list(p.request_middleware)}, response {list(p.response_middleware)}")
        lines.append(
            "    backends:   " + ", ".join(f"{b} ({config.backends[b].service})" for b in p.backends)
        )
        for b in p.backends:
            entry = config.backends[b]
            if entry.targets:
                lines.append(
                    f"      {b}: {entry.selection.strategy} over "
                    + ", ".join(f"{t.name} ({t.address}, weight {t.weight})" for t in entry.targets)
                    + (", health checks" if entry.selection.health_check is not None else "")
                    + (f", {entry.selection.retry.max_retries} retries" if entry.selection.retry.max_retries else "")
                )
    dimse = [
        (ename, address, port)
        for ename, endpoint in sorted(gateway.endpoints.items())
        for address, port in endpoint.listen_addresses()
    ]
    if dimse:
        lines += ["", "DICOM listeners:"]
        lines += [f"  endpoint {e}: {a}:{p}" for e, a, p in dimse]
    lines += ["", "Routes:"]
    for net, table in sorted(gateway.route_tables.items()):
        for route in table.routes:
            kind = "catch-all" if route.match is None else "fixed routes"
            lines.append(
                f"  {net} {route.prefix} -> endpoint {route.endpoint.name} "
                f"(pipeline {route.pipeline}, {kind}; {' '.join(sorted(route.methods))})"
            )
    if config.warnings:
        lines += ["", "Warnings:"] + [f"  {w}" for w in config.warnings]
    return "\n".join(lines)
