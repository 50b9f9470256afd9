"""
A gateway built from TOML (an echo pipeline on /echo, an http proxy
pipeline on /api with an in-memory upstream) behind a
L{harmony.http.site.HarmonySite} over C{StringTransport}s: for the request
id and access log tests.
"""

import os
import re
import shutil
import tempfile
import uuid

from test_http_site import BASE_TOML as SITE_BASE_TOML
from test_http_site import PIPELINES_TOML as SITE_PIPELINES_TOML
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from harmony.config import load_config
from harmony.gateway import build_gateway
from harmony.http.site import HarmonySite
from harmony.registry import BuildContext, builtin_registry

HEX32 = re.compile(r"[0-9a-f]{32}\Z")

# The gateway of test_http_site, with a small body limit (413 access lines).
BASE_TOML = SITE_BASE_TOML.replace('id = "unit"\n', 'id = "unit"\n\n[proxy.content_limits]\nmax_body_size = 1000\n')
PIPELINES_TOML = SITE_PIPELINES_TOML


def is_generated(value):
    """
    A generated id: a version 4 UUID as 32 hex digits.
    """
    if not HEX32.match(value):
        return False
    parsed = uuid.UUID(hex=value)
    return parsed.version == 4 and parsed.variant == uuid.RFC_4122


class Upstream(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        # An upstream with ids of its own: not passed on to the client.
        request.setHeader(b"X-Request-ID", b"upstream-own-id")
        return b"upstream"


class Gateway:
    """
    The gateway of L{BASE_TOML} and L{PIPELINES_TOML} behind a
    L{HarmonySite}, with an in-memory upstream.
    """

    def __init__(self, case):
        root = tempfile.mkdtemp(prefix="harmony-rid-")
        case.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, "pipelines"))
        with open(os.path.join(root, "harmony.toml"), "w") as f:
            f.write(BASE_TOML)
        with open(os.path.join(root, "pipelines", "main.toml"), "w") as f:
            f.write(PIPELINES_TOML)
        registry = builtin_registry()
        config = load_config(os.path.join(root, "harmony.toml"), registry, environ={})
        self.clock = Clock()
        self.upstream = Upstream()
        self.agent = RequestTraversalAgent(self.upstream)
        context = BuildContext(reactor=self.clock, agent=self.agent, config=config)
        gateway = build_gateway(config, registry, context)
        self.site = HarmonySite(gateway.apps["default"].resource(), reactor=self.clock)
        self.site.max_body_size = config.proxy.content_limits.max_body_size

    def connect(self, peer=("192.0.2.10", 54321)):
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 8080), peerAddress=IPv4Address("TCP", *peer)
        )
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        return channel, transport

    def request(self, method, target, headers=(), body=b""):
        """
        One request on a new connection: (status, [(name, value)], body).
        """
        channel, transport = self.connect()
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: gw.test"]
        lines += [k + b": " + v for k, v in headers]
        if body:
            lines.append(b"Content-Length: %d" % len(body))
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.agent.flush()
        return parse(transport.value())


def parse(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    return int(lines[0].split()[1]), headers, body


def values(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]
