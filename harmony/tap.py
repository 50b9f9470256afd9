# -*- test-case-name: tests.integration.test_twistd -*-
"""
C{twistd harmony -c PATH}: the composition root.

This is the only module that imports the global reactor; everything below
gets the reactor, the HTTP agent and the configuration injected.
"""

import os
import signal
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver
from twisted.python import components, usage
from zope.interface import implementer

from harmony import __version__, allocator, logs, systemd, workers
from harmony import tls as harmony_tls
from harmony.config import ConfigError, load_config
from harmony.gateway import build_gateway
from harmony.http.site import make_site
from harmony.management import management_service
from harmony.metrics import Metrics
from harmony.registry import BuildContext, default_registry

log = logs.logger("harmony")


class Options(usage.Options):
    """
    Command line of C{twistd harmony}.
    """

    synopsis = "[options]"
    longdesc = "Run the Harmony healthcare protocol gateway."
    optParameters = [
        ["config", "c", None, "Path to the Harmony configuration file (TOML)."],
    ]

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config/-c PATH is required")
        self.registry = default_registry()
        try:
            self.harmony_config = load_config(self["config"], self.registry)
            # Dry build: route conflicts and factory checks fail here, before
            # twistd daemonises.
            build_gateway(self.harmony_config, self.registry, BuildContext(config=self.harmony_config))
            # The HTTPS listeners' certificate, key and CA files.
            harmony_tls.check_listeners(self.harmony_config)
            workers.validate(self.harmony_config)
        except ConfigError as e:
            # One clear line, not twistd's usage text: the command line was fine.
            print(f"harmony: configuration error: {e}", file=sys.stderr)
            raise SystemExit(1)


@implementer(IStreamServerEndpoint)
class _LoggingEndpoint:
    """
    Logs the address a network's listener actually bound (port 0 picks one).
    """

    def __init__(self, endpoint, network, scheme="http"):
        self._endpoint = endpoint
        self._network = network
        self._scheme = scheme
        #: The listening port, once bound (its socket is shared with the
        #: other worker processes).
        self.port = None

    def listen(self, factory):
        def listening(port):
            self.port = port
            host = port.getHost()
            log.info(
                "Network {network} listening on {scheme}://{host}:{port}",
                network=self._network,
                scheme=self._scheme,
                host=host.host,
                port=host.port,
            )
            return port

        return self._endpoint.listen(factory).addCallback(listening)


class GatewayService(service.MultiService):
    """
    The root service: the HTTP listeners of the networks, the services of
    the gateway (DICOM listeners, health checkers, storage), closing
    backends and the HTTP connection pool on shutdown; C{SIGHUP} reloads
    the configuration, C{SIGTERM} drains.

    @param gateway: the running L{harmony.gateway.Gateway}.
    @param pool: the outbound connection pool.
    @param reactor: the reactor (listeners, timers).
    @param rebuild: C{() -> Gateway}: load and build the configuration again
        (raises L{ConfigError}); C{None}: no reload.
    @param adopted: network name -> (fd, family): a worker process other
        than the first serves these inherited listening sockets instead
        of binding (L{harmony.workers}).
    @ivar supervisor: worker 0's L{harmony.workers.WorkerSupervisor} when
        C{[proxy] workers > 1}, else C{None}.
    """

    #: The log observer that replaces twistd's default one (stdout or
    #: --logfile in the configured format; set by makeService).
    log_observer = None

    def setServiceParent(self, parent):
        # twistd hands its Application over before it starts logging: our
        # observer becomes its ILogObserver component (an explicit
        # --logger still wins).
        if self.log_observer is not None and isinstance(parent, components.Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def __init__(self, gateway, pool, reactor=None, rebuild=None, adopted=None, worker_index=0):
        super().__init__()
        self.gateway = gateway
        self.pool = pool
        self.reactor = reactor
        self.rebuild = rebuild
        self.adopted = adopted
        self.worker_index = worker_index
        self.supervisor = None
        self.shared_dir = None
        #: network name -> its L{_LoggingEndpoint} (the bound port)
        self.ports = {}
        #: network name -> ((address, port), listener service, NetworkResource)
        self.networks = {}
        #: network name -> its listener's L{harmony.tls.ServerTLS} (None: HTTP)
        self.listener_tls = {}
        self.runtime = service.MultiService()
        self.runtime.setName("runtime")
        self.runtime.setServiceParent(self)
        self._reloading = None
        self._reload_again = False

    # -- building ---------------------------------------------------------------

    def add_network(self, network, app):
        """
        Listen for C{network}, serving C{app} (a L{NetworkResource}).
        """
        http = self.gateway.config.networks[network].http
        # HTTPS with cert_path/key_path (harmony.tls); the ServerTLS is kept
        # so that a reload can give it renewed files.
        server_tls = harmony_tls.listener_tls(http, self.gateway.config, network)
        self.listener_tls[network] = server_tls
        if self.adopted is not None or self.supervisor is not None:
            if self.adopted is not None:
                endpoint = workers.AdoptedEndpoint(self.reactor, *self.adopted[network])
            else:
                # Worker 0 of several: the others listen on the same port.
                endpoint = workers.ReusePortEndpoint(self.reactor, http.bind_address, http.bind_port)
            if server_tls is not None:
                endpoint = harmony_tls.TLSServerEndpoint(self.reactor, endpoint, server_tls, f"network {network}")
        else:
            endpoint = harmony_tls.listener_endpoint(self.reactor, http, network=network, tls=server_tls)
        site = make_site(app, self.reactor, self.gateway.config.proxy.content_limits.max_body_size)
        logging_endpoint = _LoggingEndpoint(endpoint, network, harmony_tls.listener_scheme(http))
        self.ports[network] = logging_endpoint
        listener = StreamServerEndpointService(logging_endpoint, site)
        # Fail startup (non-zero exit) when the address cannot be bound.
        listener._raiseSynchronously = True
        listener.setName(f"network:{network}")
        listener.setServiceParent(self)
        self.networks[network] = (harmony_tls.listener_settings(http), listener, app)
        return listener

    def add_runtime(self, services):
        for s in services:
            s.setServiceParent(self.runtime)

    # -- lifecycle --------------------------------------------------------------

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            print(
                f"harmony: cannot listen on {e.interface or '0.0.0.0'}:{e.port}: {e.socketError}",
                file=sys.stderr,
            )
            raise SystemExit(1)

    def startService(self):
        config = self.gateway.config
        if self.adopted is not None:
            super().startService()
            log.info("Worker {index} serving (pid {pid})", index=self.worker_index, pid=os.getpid())
            return
        log.info(
            "Harmony {version} starting (proxy id {id}, {pipelines} pipelines)",
            version=__version__,
            id=config.proxy.id,
            pipelines=len(config.pipelines),
        )
        for warning in config.warnings:
            log.warn("Configuration: {warning}", warning=warning)
        super().startService()
        if self.rebuild is not None:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        # Every listener is bound by now (privilegedStartService): the
        # other workers get their sockets.
        if self.supervisor is not None:
            self.supervisor.start_workers(self.listening_addresses())
        systemd.notify(f"READY=1\nSTATUS=Serving {len(config.pipelines)} pipelines")

    def listening_addresses(self):
        """
        The HTTP networks' bound addresses: network -> (address, port).
        """
        out = {}
        for network, endpoint in self.ports.items():
            if network in self.networks and endpoint.port is not None:
                out[network] = (self.gateway.config.networks[network].http.bind_address, endpoint.port.getHost().port)
        return out

    def stopService(self):
        """
        Stop accepting (HTTP and DICOM listeners), let in-flight requests
        and associations finish for up to C{[proxy] shutdown_grace_secs},
        then close the backends and the connection pool.
        """
        systemd.notify("STOPPING=1\nSTATUS=Draining")
        if self.rebuild is not None:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        grace = self.gateway.config.proxy.shutdown_grace_secs
        # The other workers drain at the same time as this one.
        others = defer.succeed(None)
        if self.supervisor is not None:
            others = self.supervisor.stop_workers(grace)
        listeners = [s for s in self if _is_listener(s)] + [s for s in self.runtime if _is_listener(s)]
        d = defer.gatherResults([defer.maybeDeferred(s.stopService) for s in listeners if s.running])
        d.addCallback(lambda _: self._drain(grace))
        d.addCallback(lambda _: others)
        d.addCallback(lambda _: super(GatewayService, self).stopService())
        d.addCallback(lambda _: self.gateway.close())
        d.addCallback(lambda _: self.pool.closeCachedConnections())
        if self.shared_dir is not None:
            d.addBoth(lambda result: (workers.remove_shared_dir(self.shared_dir), result)[1])
        return d

    def _busy(self):
        """
        In-flight HTTP requests and open DICOM associations.
        """
        http = sum(getattr(app, "in_flight", 0) for _, _, app in self.networks.values())
        dicom = sum(len(getattr(getattr(e, "factory", None), "active", ())) for e in self.gateway.endpoints.values())
        return http + dicom

    def _drain(self, grace):
        """
        Fires when nothing is in flight, or after C{grace} seconds.
        """
        deadline = self.reactor.seconds() + grace
        done = defer.Deferred()

        def check():
            busy = self._busy()
            if busy == 0:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.warn("Shutting down with {busy} requests/associations still in flight", busy=busy)
                done.callback(None)
            else:
                self.reactor.callLater(0.05, check)

        busy = self._busy()
        if busy:
            log.info("Draining {busy} in-flight requests/associations (up to {grace}s)", busy=busy, grace=grace)
        check()
        return done

    # -- reload -------------------------------------------------------------------

    def reload(self):
        """
        Load and build the configuration again and switch to it: new
        requests take the new pipelines, in-flight ones finish on the old.
        A configuration that does not load or build is refused (logged) and
        the running one stays.

        @return: Deferred[bool] (whether the new configuration is running).
        """
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        self._reloading = d = defer.Deferred()

        def finished(result):
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                self.reload()
            return result

        d.addBoth(finished)
        defer.Deferred.fromCoroutine(self._reload()).chainDeferred(d)
        return d

    async def _reload(self):
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={systemd.monotonic_usec()}\nSTATUS=Reloading")
        log.info("SIGHUP: reloading the configuration")
        try:
            try:
                new = self.rebuild()
            except ConfigError as e:
                log.error("Reload refused, the running configuration stays: {error}", error=str(e))
                return False
            except Exception:
                log.failure("Reload refused, the running configuration stays")
                return False
            try:
                await self._switch(new)
            except Exception as e:
                log.error("Reload failed, the running configuration stays: {error}", error=str(e))
                await defer.maybeDeferred(new.close)
                return False
            self._replace_workers(new.config)
            log.info(
                "Reloaded: {pipelines} pipelines (proxy id {id})",
                pipelines=len(new.config.pipelines), id=new.config.proxy.id,
            )
            return True
        finally:
            systemd.notify(f"READY=1\nSTATUS=Serving {len(self.gateway.config.pipelines)} pipelines")

    def _replace_workers(self, config):
        """
        After a reload: the other workers are replaced by new ones running
        the new configuration (the old ones finish their requests).
        """
        wanted = config.proxy.workers - 1
        if self.supervisor is None:
            if wanted > 0:
                log.warn(
                    "[proxy] workers = {n} takes effect at the next restart (Harmony started as one process)",
                    n=config.proxy.workers,
                )
            return
        d = self.supervisor.replace(self.listening_addresses(), wanted, config.proxy.shutdown_grace_secs)
        d.addErrback(lambda f: log.warn("Stopping the previous workers failed: {e}", e=f.getErrorMessage()))

    async def _switch(self, new):
        old = self.gateway
        config = new.config
        # Address, port and HTTP/HTTPS: a change binds the listener again.
        wanted = {n: harmony_tls.listener_settings(config.networks[n].http) for n in new.apps}
        # 1. New listeners first: a port that cannot be bound refuses the
        #    whole reload before anything changed.
        started = []
        self.gateway = new
        try:
            for network in sorted(wanted):
                current = self.networks.get(network)
                if current is None or (current[0] != wanted[network] and wanted[network][1] != current[0][1]):
                    previous = current
                    started.append((network, self.add_network(network, new.apps[network]), previous))
                    started[-1][1].startService()
        except Exception:
            self.gateway = old
            for network, listener, previous in started:
                await defer.maybeDeferred(listener.stopService)
                listener.disownServiceParent()
                if previous is None:
                    self.networks.pop(network, None)
                else:
                    self.networks[network] = previous
            raise
        # 2. Networks kept: the same listener, the new routes and pipelines.
        for network in wanted:
            bind, listener, app = self.networks[network]
            if app is not new.apps[network]:
                if bind == wanted[network]:
                    app.routes, app.executors, app.adapter = (
                        new.apps[network].routes, new.apps[network].executors, new.apps[network].adapter,
                    )
                    if self.listener_tls.get(network) is not None:
                        # Renewed certificate files: for the next connections.
                        self.listener_tls[network].update(
                            harmony_tls.listener_tls(config.networks[network].http, config, network)
                        )
                else:
                    # Same port, other address: let the port go, then bind again.
                    await defer.maybeDeferred(listener.stopService)
                    listener.disownServiceParent()
                    self.add_network(network, new.apps[network]).startService()
        for network, listener, previous in started:
            if previous is not None and previous[1] is not listener:
                await defer.maybeDeferred(previous[1].stopService)
                previous[1].disownServiceParent()
        # 3. Networks gone: stop listening (open connections finish).
        for network in sorted(set(self.networks) - set(wanted)):
            _, listener, _ = self.networks.pop(network)
            await defer.maybeDeferred(listener.stopService)
            listener.disownServiceParent()
            log.info("Network {network} no longer has routes: not listening", network=network)
        # 4. DICOM listeners, health checkers, move SCPs: the old ones stop
        #    listening now (their associations finish); storage and the old
        #    backends close once in-flight work had time to end.
        old_runtime = list(self.runtime)
        for s in old_runtime:
            if not _keeps_running(s):
                await defer.maybeDeferred(s.stopService)
            s.disownServiceParent()
        self.add_runtime(new.endpoint_services(self.reactor))
        for s in self.runtime:
            s.startService()
        logs.configure(config.logging)
        grace = max(old.config.proxy.shutdown_grace_secs, config.proxy.shutdown_grace_secs)

        def retire():
            ds = [defer.maybeDeferred(s.stopService) for s in old_runtime if s.running]
            d = defer.gatherResults(ds).addBoth(lambda _: old.close())
            d.addErrback(lambda f: log.warn("Closing the previous configuration failed: {e}", e=f.getErrorMessage()))

        self.reactor.callLater(grace, retire)


def _is_listener(s):
    """
    Services that accept connections (stopped first when draining).
    """
    from harmony.dimse.move import MoveStoreListener

    return isinstance(s, (StreamServerEndpointService, MoveStoreListener))


def _keeps_running(s):
    """
    Old services kept for in-flight work after a reload (storage thread
    pools), stopped after the grace period.
    """
    from harmony.storage.filesystem import FilesystemStorage

    return isinstance(s, FilesystemStorage)


def make_agent(reactor):
    """
    The process-wide outbound HTTP agent (it is its own connection pool)
    and a treq client over it without a shared cookie jar.

    @return: (pool, agent, http_client)
    """
    from http.cookiejar import CookieJar, DefaultCookiePolicy

    from treq.client import HTTPClient

    from harmony.http.client import PooledAgent

    agent = PooledAgent(reactor)
    # A jar that accepts nothing: upstream cookies belong to their client.
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return agent, agent, HTTPClient(agent, cookiejar=jar)


def makeService(options):
    from twisted.internet import reactor

    config = getattr(options, "harmony_config", None) or load_config(options["config"])
    registry = getattr(options, "registry", None) or default_registry()
    logs.configure(config.logging)
    if config.logging.log_to_file:
        logs.add_file(config.resolve_path(config.logging.log_file_path))
    allocator.tune()
    shared_dir = None
    if config.proxy.workers > 1:
        # Before anything is built: rate limits and metrics find it.
        shared_dir = workers.setup_shared_dir()

    pool, agent, client = make_agent(reactor)
    started_at = reactor.seconds()
    metrics = Metrics() if config.management.enabled else None
    context = BuildContext(reactor=reactor, agent=agent, http_client=client, config=config, metrics=metrics)
    gateway = build_gateway(config, registry, context)

    def rebuild():
        new_config = load_config(options["config"], registry)
        # Unusable TLS files refuse the reload (ConfigError) before anything changes.
        harmony_tls.check_listeners(new_config)
        workers.validate(new_config)
        return build_gateway(
            new_config, registry,
            BuildContext(reactor=reactor, agent=agent, http_client=client, config=new_config,
                         move_router=context.move_router, metrics=context.metrics),
        )

    root = GatewayService(gateway, pool, reactor, rebuild)
    if shared_dir is not None:
        # Before the listeners are added: they listen with SO_REUSEPORT.
        root.shared_dir = shared_dir
        root.supervisor = workers.WorkerSupervisor(reactor, options["config"], config.proxy.workers - 1)
        root.supervisor.setServiceParent(root)
    root.log_observer = logs.twistd_observer(getattr(options, "parent", None), reactor)
    for network, app in sorted(gateway.apps.items()):
        root.add_network(network, app)
    root.add_runtime(gateway.endpoint_services(reactor))
    management = {config.management.network} if config.management.enabled else set()
    if management:
        management_service(lambda: root.gateway, reactor, started_at, metrics).setServiceParent(root)
    for network in sorted(set(config.networks) - set(gateway.apps) - management):
        log.warn("Network {network} has no HTTP routes: not listening", network=network)
    return root


def build_worker(reactor, config_path, index, adopted):
    """
    A worker process other than the first: the gateway of the
    configuration serving the inherited HTTP listening sockets
    (C{adopted}), without DICOM listeners or the management API (worker 0
    has them, L{harmony.workers}).

    @return: (root service, log observers)
    """
    registry = default_registry()
    config = load_config(config_path, registry)
    logs.configure(config.logging)
    logs.set_worker(index)
    allocator.tune()
    observers = [logs.twistd_observer(None, reactor)]
    if config.logging.log_to_file:
        logs.add_file(config.resolve_path(config.logging.log_file_path))
    pool, agent, client = make_agent(reactor)
    metrics = Metrics() if config.management.enabled else None
    context = BuildContext(reactor=reactor, agent=agent, http_client=client, config=config, metrics=metrics)
    gateway = build_gateway(config, registry, context)
    root = GatewayService(gateway, pool, reactor, adopted=adopted, worker_index=index)
    for network in sorted(adopted):
        if network in gateway.apps:
            root.add_network(network, gateway.apps[network])
    root.add_runtime(s for s in gateway.endpoint_services(reactor) if not _is_listener(s))
    return root, observers
