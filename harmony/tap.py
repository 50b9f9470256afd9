# -*- test-case-name: tests.integration.test_twistd -*-
"""
C{twistd harmony -c PATH}: the composition root.

This is the only module that imports the global reactor; everything below
gets the reactor, the HTTP agent and the configuration injected.
"""

import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage
from zope.interface import implementer

from harmony import __version__, logs, systemd
from harmony.config import ConfigError, load_config
from harmony.gateway import build_gateway
from harmony.http.site import make_site
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
        except ConfigError as e:
            # One clear line, not twistd's usage text: the command line was fine.
            print(f"harmony: configuration error: {e}", file=sys.stderr)
            raise SystemExit(1)


def listen_description(address, port):
    """
    The endpoint string for a TCP listener (IPv6 addresses quoted).
    """
    return f"tcp:port={port}:interface={endpoints.quoteStringArgument(address)}"


@implementer(IStreamServerEndpoint)
class _LoggingEndpoint:
    """
    Logs the address a network's listener actually bound (port 0 picks one).
    """

    def __init__(self, endpoint, network):
        self._endpoint = endpoint
        self._network = network

    def listen(self, factory):
        def listening(port):
            host = port.getHost()
            log.info(
                "Network {network} listening on http://{host}:{port}",
                network=self._network,
                host=host.host,
                port=host.port,
            )
            return port

        return self._endpoint.listen(factory).addCallback(listening)


class GatewayService(service.MultiService):
    """
    The root service: the listeners, plus closing backends and the HTTP
    connection pool on shutdown.
    """

    def __init__(self, gateway, pool):
        super().__init__()
        self.gateway = gateway
        self.pool = pool

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
        log.info(
            "Harmony {version} starting (proxy id {id}, {pipelines} pipelines)",
            version=__version__,
            id=config.proxy.id,
            pipelines=len(config.pipelines),
        )
        for warning in config.warnings:
            log.warn("Configuration: {warning}", warning=warning)
        super().startService()
        # Every listener is bound by now (privilegedStartService).
        systemd.notify(f"READY=1\nSTATUS=Serving {len(config.pipelines)} pipelines")

    def stopService(self):
        systemd.notify("STOPPING=1\nSTATUS=Stopping")
        d = super().stopService()
        d.addCallback(lambda _: self.gateway.close())
        d.addCallback(lambda _: self.pool.closeCachedConnections())
        return d


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
    logs.set_level(config.proxy.log_level)
    if config.logging.log_to_file:
        logs.add_file(config.resolve_path(config.logging.log_file_path))

    pool, agent, client = make_agent(reactor)
    context = BuildContext(reactor=reactor, agent=agent, http_client=client, config=config)
    gateway = build_gateway(config, registry, context)
    root = GatewayService(gateway, pool)
    for network, app in sorted(gateway.apps.items()):
        http = config.networks[network].http
        endpoint = endpoints.serverFromString(reactor, listen_description(http.bind_address, http.bind_port))
        listener = StreamServerEndpointService(_LoggingEndpoint(endpoint, network), make_site(app, reactor, config.proxy.content_limits.max_body_size))
        # Fail startup (non-zero exit) when the address cannot be bound.
        listener._raiseSynchronously = True
        listener.setName(f"network:{network}")
        listener.setServiceParent(root)
    for endpoint_service in gateway.endpoint_services(reactor):
        endpoint_service.setServiceParent(root)
    for network in sorted(set(config.networks) - set(gateway.apps)):
        log.warn("Network {network} has no HTTP routes: not listening", network=network)
    return root
