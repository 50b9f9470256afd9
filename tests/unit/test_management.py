"""
Tests for L{harmony.management}: the management API's answers (validated
against their JSON Schemas), authentication, errors and readiness, driven
in memory with C{treq.testing.StubTreq}; its listener service on a
C{MemoryReactorClock}; and the C{[management]} configuration checks.
"""

import hashlib
import json
import os
import shutil
import tempfile

from jsonschema import Draft202012Validator
from treq.testing import StubTreq
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from _fakes import FakeEndpoint, make_request
from harmony.config import ConfigError, load_config
from harmony.gateway import build_gateway, describe
from harmony.management import (
    SCHEMAS,
    ManagementResource,
    listener_states,
    load_schema,
    management_service,
)
from harmony.metrics import Metrics
from harmony.registry import BuildContext, builtin_registry

BASE = """
[proxy]
id = "unit-gw"

[network.main.http]
bind_address = "127.0.0.1"
bind_port = 8080

[network.mgmt.http]
bind_address = "127.0.0.1"
bind_port = 9090

[management]
enabled = true
network = "mgmt"
{management}
"""

PIPELINES = """
[pipelines.echo]
description = "echo back"
networks = ["main"]
endpoints = ["echo"]
middleware = ["passthru"]
backends = ["echo"]

[endpoints.echo]
service = "echo"
[endpoints.echo.options]
path_prefix = "/echo"

[backends.echo]
service = "echo"

[pipelines.api]
networks = ["main"]
endpoints = ["api", "scp"]
backends = ["api"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
port = 11112

[backends.api]
service = "http"
targets = ["a", "b"]
strategy = "failover"
[backends.api.outlier_detection]
consecutive_failures = 1
[backends.api.health_check]
path = "/health"

[targets.a]
url = "http://a.test"
[targets.b]
url = "http://b.test"
weight = 2
"""

VALIDATORS = {name: Draft202012Validator(load_schema(name)) for name in SCHEMAS}


def write_config(directory, management="", pipelines=PIPELINES, base=BASE):
    os.makedirs(os.path.join(directory, "pipelines"), exist_ok=True)
    path = os.path.join(directory, "harmony.toml")
    with open(path, "w") as f:
        f.write(base.format(management=management))
    with open(os.path.join(directory, "pipelines", "main.toml"), "w") as f:
        f.write(pipelines)
    return path


class _Base(SynchronousTestCase):
    management = ""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="harmony-mgmt-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = write_config(self.directory, self.management)
        registry = builtin_registry()
        self.config = load_config(self.path, registry, environ={"ADMIN_TOKEN": "s3cret"})
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics(now=self.clock.seconds, multiprocess_dir="")
        self.gateway = build_gateway(
            self.config, registry, BuildContext(reactor=self.clock, config=self.config, metrics=self.metrics)
        )
        self.metrics.watch_targets(self.gateway.target_status)
        self.listeners = [("network:main", True), ("dicom:scp", True)]
        self.resource = ManagementResource(
            self.gateway, self.clock, self.clock.seconds(), self.metrics, listeners=lambda: self.listeners, pid=4242
        )
        self.stub = StubTreq(self.resource)

    def request(self, method, path, headers=None):
        d = self.stub.request(method, "http://mgmt.test" + path, headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response, self.successResultOf(body)

    def get(self, path, schema=None, status=200, headers=None):
        """
        GET C{path}: the JSON answer, checked against C{schema}.
        """
        response, body = self.request("GET", path, headers)
        self.assertEqual(response.code, status, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        value = json.loads(body)
        if schema is not None:
            errors = [e.message for e in VALIDATORS[schema].iter_errors(value)]
            self.assertEqual(errors, [], value)
        return value


class AnswerTests(_Base):
    def test_health(self):
        self.assertEqual(self.get("/admin/health", "health"), {"status": "ok"})
        # A trailing slash is the same path.
        self.assertEqual(self.get("/admin/health/", "health"), {"status": "ok"})

    def test_index(self):
        value = self.get("/admin", "index")
        self.assertEqual(value["paths"][0], "/admin/health")
        self.assertIn("/admin/metrics", value["paths"])

    def test_ready(self):
        value = self.get("/admin/ready", "ready")
        self.assertEqual(value["status"], "ready")
        self.assertEqual(value["reasons"], [])
        self.assertEqual(value["backends"], [{"backend": "api", "targets": 2, "available": 2}])
        self.assertEqual(value["listeners"], [{"name": "network:main", "up": True}, {"name": "dicom:scp", "up": True}])

    def test_not_ready_without_targets(self):
        """
        503 with a reason when a backend with targets has none available
        (here: both ejected after a failure).
        """
        for t in self.gateway.backends["api"].targets:
            t.record(False)
        value = self.get("/admin/ready", "ready", status=503)
        self.assertEqual(value["status"], "not_ready")
        self.assertEqual(value["reasons"], ["backend api: no target available"])
        # One back: ready again.
        self.clock.advance(31)
        self.assertEqual(self.get("/admin/ready", "ready")["status"], "ready")

    def test_not_ready_listener_down(self):
        self.listeners = [("network:main", True), ("dicom:scp", False)]
        value = self.get("/admin/ready", "ready", status=503)
        self.assertEqual(value["reasons"], ["listener dicom:scp is not listening"])

    def test_not_ready_shutting_down(self):
        self.resource.running = lambda: False
        value = self.get("/admin/ready", "ready", status=503)
        self.assertEqual(value["reasons"], ["shutting down"])

    def test_info(self):
        self.clock.advance(12.5)
        value = self.get("/admin/info", "info")
        self.assertEqual(value["proxy_id"], "unit-gw")
        self.assertEqual(value["pid"], 4242)
        self.assertEqual(value["uptime_secs"], 12.5)
        self.assertEqual(value["started_at"], "2023-11-14T22:13:20.000Z")
        self.assertEqual(value["config_files"], ["harmony.toml", os.path.join("pipelines", "main.toml")])
        data = b""
        for name in value["config_files"]:
            with open(os.path.join(self.directory, name), "rb") as f:
                data += f.read()
        self.assertEqual(value["config_id"], hashlib.sha256(data).hexdigest())
        from harmony import __version__

        self.assertEqual(value["version"], __version__)

    def test_info_config_id_unreadable(self):
        os.remove(os.path.join(self.directory, "pipelines", "main.toml"))
        self.assertIsNone(self.get("/admin/info", "info")["config_id"])

    def test_pipelines(self):
        value = self.get("/admin/pipelines", "pipelines")
        by_name = {p["name"]: p for p in value["pipelines"]}
        self.assertEqual(sorted(by_name), ["api", "echo"])
        api = by_name["api"]
        self.assertEqual(api["networks"], ["main"])
        self.assertEqual(api["endpoints"], [{"name": "api", "service": "http"}, {"name": "scp", "service": "dicom_scp"}])
        self.assertEqual(
            api["backends"],
            [
                {
                    "name": "api",
                    "service": "http",
                    "strategy": "failover",
                    "targets": [
                        {"name": "a", "address": "http://a.test", "weight": 1},
                        {"name": "b", "address": "http://b.test", "weight": 2},
                    ],
                }
            ],
        )
        echo = by_name["echo"]
        self.assertEqual(echo["description"], "echo back")
        self.assertEqual(echo["file"], os.path.join("pipelines", "main.toml"))
        self.assertEqual(echo["middleware"], {"request": [{"name": "passthru", "type": "passthru"}],
                                              "response": [{"name": "passthru", "type": "passthru"}]})
        self.assertEqual(echo["backends"], [{"name": "echo", "service": "echo", "targets": []}])

    def test_routes(self):
        value = self.get("/admin/routes", "routes")
        routes = {r["prefix"]: r for r in value["routes"]}
        self.assertEqual(
            routes["/echo"],
            {
                "network": "main",
                "prefix": "/echo",
                "endpoint": "echo",
                "service": "echo",
                "pipeline": "echo",
                "methods": ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"],
                "kind": "catch-all",
            },
        )
        self.assertEqual(routes["/api"]["pipeline"], "api")
        self.assertEqual(value["dicom"], [{"endpoint": "scp", "pipeline": "api", "address": "0.0.0.0", "port": 11112}])

    def test_targets(self):
        self.gateway.backends["api"].targets[0].record(False)
        value = self.get("/admin/targets", "targets")
        [backend] = value["backends"]
        self.assertEqual(backend["backend"], "api")
        self.assertEqual(backend["available"], 1)
        self.assertEqual([t["state"] for t in backend["targets"]], ["ejected", "available"])
        self.assertEqual(backend["targets"][0]["failures"], 1)
        self.assertEqual(backend["targets"][0]["health"]["healthy"], True)

    def test_metrics(self):
        """
        C{/metrics}: the Prometheus text format, with the traffic seen.
        """
        executor = self.gateway.executors["echo"]
        for _ in range(3):
            executor.execute(FakeEndpoint("echo"), make_request())
        self.gateway.backends["api"].targets[0].record(False)
        response, body = self.request("GET", "/admin/metrics")
        self.assertEqual(response.code, 200)
        [content_type] = response.headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"), content_type)
        text = body.decode("utf-8")
        self.assertIn(
            'harmony_requests_total{backend="echo",endpoint="echo",pipeline="echo",status="200"} 3.0', text
        )
        self.assertIn('harmony_target_available{backend="api",target="a"} 0.0', text)
        self.assertIn('harmony_target_available{backend="api",target="b"} 1.0', text)
        self.assertIn('harmony_target_ejections_total{backend="api",target="a"} 1.0', text)
        self.assertIn('harmony_target_breaker_state{backend="api",state="closed",target="a"} 1.0', text)

    def test_metrics_openmetrics(self):
        response, body = self.request(
            "GET", "/admin/metrics", headers={"Accept": ["application/openmetrics-text; version=1.0.0"]}
        )
        [content_type] = response.headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_metrics_disabled(self):
        self.resource.metrics = None
        value = self.get("/admin/metrics", "error", status=404)
        self.assertEqual(value["error"], "not_found")

    def test_head(self):
        response, body = self.request("HEAD", "/admin/info")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")

    def test_not_found(self):
        self.assertEqual(self.get("/admin/nothing", "error", status=404)["error"], "not_found")
        self.assertEqual(self.get("/elsewhere", "error", status=404)["error"], "not_found")
        self.assertEqual(self.get("/adminx/health", "error", status=404)["error"], "not_found")

    def test_method_not_allowed(self):
        for path in ("/admin/info", "/admin/health"):
            response, body = self.request("POST", path)
            self.assertEqual(response.code, 405)
            self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
            self.assertEqual(json.loads(body)["error"], "method_not_allowed")

    def test_answers_follow_the_current_gateway(self):
        """
        Given a callable, every answer reads the gateway it returns now
        (a reload swaps it).
        """
        current = [self.gateway]
        resource = ManagementResource(lambda: current[0], self.clock, self.clock.seconds())
        stub = StubTreq(resource)
        path = write_config(self.directory, pipelines=PIPELINES.replace('path_prefix = "/echo"', 'path_prefix = "/e2"'))
        registry = builtin_registry()
        config = load_config(path, registry, environ={})
        current[0] = build_gateway(config, registry, BuildContext(reactor=self.clock, config=config))
        d = stub.get("http://mgmt.test/admin/routes")
        stub.flush()
        body = stub.json_content(self.successResultOf(d))
        stub.flush()
        prefixes = {r["prefix"] for r in self.successResultOf(body)["routes"]}
        self.assertIn("/e2", prefixes)


class TokenTests(_Base):
    management = 'token_env = "ADMIN_TOKEN"'

    def test_token_from_environment(self):
        self.assertEqual(self.config.management.token, "s3cret")

    def test_public_paths(self):
        self.get("/admin/health", "health")
        self.get("/admin/ready", "ready")

    def test_missing_token(self):
        for path in ("/admin/info", "/admin/metrics", "/admin/nothing", "/admin"):
            response, body = self.request("GET", path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(
                response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="harmony-management"']
            )
            value = json.loads(body)
            self.assertEqual(value["error"], "unauthorized")
            VALIDATORS["error"].validate(value)

    def test_wrong_token(self):
        for header in ("Bearer nope", "Basic czNjcmV0", "Bearer", "s3cret"):
            response, _ = self.request("GET", "/admin/info", headers={"Authorization": [header]})
            self.assertEqual(response.code, 401, header)
            self.assertEqual(
                response.headers.getRawHeaders("www-authenticate"),
                ['Bearer realm="harmony-management", error="invalid_token"'],
            )

    def test_right_token(self):
        value = self.get("/admin/info", "info", headers={"Authorization": ["Bearer s3cret"]})
        self.assertEqual(value["proxy_id"], "unit-gw")
        response, _ = self.request("GET", "/admin/metrics", headers={"Authorization": ["bearer s3cret"]})
        self.assertEqual(response.code, 200)


class InlineTokenTests(_Base):
    management = 'token = "inline"\nbase_path = "/ops/mgmt/"'

    def test_inline_token_and_base_path(self):
        response, _ = self.request("GET", "/ops/mgmt/info")
        self.assertEqual(response.code, 401)
        self.get("/ops/mgmt/info", "info", headers={"Authorization": ["Bearer inline"]})
        self.get("/ops/mgmt/health", "health")
        self.assertEqual(self.get("/admin/health", "error", status=404)["error"], "not_found")


class RootBasePathTests(_Base):
    management = 'base_path = "/"'

    def test_root(self):
        self.get("/health", "health")
        self.assertEqual(self.get("/", "index")["paths"][0], "/health")


class FakePort:
    def __init__(self):
        self.stopped = False

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 9090)

    def stopListening(self):
        self.stopped = True


class FakeServerEndpoint:
    def __init__(self, result):
        self.result = result

    def listen(self, factory):
        self.factory = factory
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        if self.result is None:
            return defer.Deferred()
        return defer.succeed(self.result)


class ServiceTests(_Base):
    def test_listener_states(self):
        """
        Listening, failed, still waiting and stopped listeners.
        """
        root = service.MultiService()
        inner = service.MultiService()
        inner.setName("runtime")
        inner.setServiceParent(root)
        for name, result, parent in (
            ("network:main", FakePort(), root),
            ("dicom:scp", None, inner),
            ("network:other", OSError("no"), inner),
        ):
            s = StreamServerEndpointService(FakeServerEndpoint(result), None)
            s.setName(name)
            s.setServiceParent(parent)
        stopped = StreamServerEndpointService(FakeServerEndpoint(FakePort()), None)
        stopped.setName("network:stopped")
        stopped.setServiceParent(root)
        root.startService()
        stopped.stopService()
        self.assertEqual(
            sorted(listener_states(root)),
            [("dicom:scp", False), ("network:main", True), ("network:other", False), ("network:stopped", False)],
        )
        self.flushLoggedErrors(OSError)

    def test_management_service(self):
        """
        L{management_service} listens on the management network's address;
        readiness covers the listeners of the whole service tree, and says
        "shutting down" once the root stops.
        """
        reactor = MemoryReactorClock()
        root = service.MultiService()
        network = StreamServerEndpointService(FakeServerEndpoint(FakePort()), None)
        network.setName("network:main")
        network.setServiceParent(root)
        mgmt = management_service(lambda: self.gateway, reactor, 0.0, self.metrics)
        mgmt.setServiceParent(root)
        root.privilegedStartService()
        root.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9090, "127.0.0.1"))
        resource = factory.resource
        self.assertIsInstance(resource, ManagementResource)
        states = resource.listeners()
        self.assertEqual(sorted(states), [("management:mgmt", True), ("network:main", True)])
        stub = StubTreq(resource)

        def ready():
            d = stub.get("http://mgmt.test/admin/ready")
            stub.flush()
            response = self.successResultOf(d)
            body = stub.json_content(response)
            stub.flush()
            return response.code, self.successResultOf(body)

        code, value = ready()
        self.assertEqual((code, value["status"]), (200, "ready"))
        root.stopService()
        code, value = ready()
        self.assertEqual(code, 503)
        self.assertIn("shutting down", value["reasons"])

    def test_management_service_endpoint(self):
        """
        The listener can be given (e.g. TLS from harmony.tls).
        """
        endpoint = FakeServerEndpoint(FakePort())
        mgmt = management_service(self.gateway, MemoryReactorClock(), 0.0, endpoint=endpoint)
        mgmt.startService()
        self.assertIsInstance(endpoint.factory.resource, ManagementResource)
        self.assertIsNone(endpoint.factory.resource.metrics)


class DescribeTests(_Base):
    def test_check_config_names_the_management_network(self):
        text = describe(self.gateway)
        self.assertIn("mgmt: http 127.0.0.1:9090 (management API under /admin)", text)


# -- configuration ------------------------------------------------------------------

PROXY = '[proxy]\nid = "unit"\n'


class ConfigTests(SynchronousTestCase):
    def load(self, text, environ=None, pipelines=None):
        directory = tempfile.mkdtemp(prefix="harmony-mgmt-config-")
        self.addCleanup(shutil.rmtree, directory)
        os.makedirs(os.path.join(directory, "pipelines"))
        path = os.path.join(directory, "harmony.toml")
        with open(path, "w") as f:
            f.write(text)
        if pipelines:
            with open(os.path.join(directory, "pipelines", "p.toml"), "w") as f:
                f.write(pipelines)
        return load_config(path, builtin_registry(), environ=environ or {})

    def error(self, text, **kwargs):
        try:
            self.load(text, **kwargs)
        except ConfigError as e:
            return e
        self.fail("no ConfigError")

    NETWORKS = (
        '[network.main.http]\nbind_address = "0.0.0.0"\nbind_port = 8080\n'
        '[network.mgmt.http]\nbind_address = "127.0.0.1"\nbind_port = 9090\n'
        "[network.nohttp]\n"
    )
    ECHO = (
        '[pipelines.e]\nnetworks = ["main"]\nendpoints = ["e"]\nbackends = ["e"]\n'
        '[endpoints.e]\nservice = "echo"\noptions = { path_prefix = "/e" }\n'
        '[backends.e]\nservice = "echo"\n'
    )

    def test_defaults(self):
        config = self.load(PROXY)
        self.assertEqual(
            dict(config.management),
            {"enabled": False, "base_path": "admin", "network": "", "token_env": "", "token": ""},
        )

    def test_enabled(self):
        config = self.load(PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "mgmt"\n', pipelines=self.ECHO)
        self.assertTrue(config.management.enabled)
        self.assertEqual(config.management.token, "")

    def assertError(self, error, key, message):
        self.assertEqual((error.file, error.key, error.message), ("harmony.toml", key, message))

    def test_network_required(self):
        self.assertError(
            self.error(PROXY + self.NETWORKS + "[management]\nenabled = true\n"),
            "management.network",
            "required with enabled = true: the network the management API listens on",
        )

    def test_unknown_network(self):
        self.assertError(
            self.error(PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "mgmnt"\n'),
            "management.network",
            "unknown network 'mgmnt' (did you mean 'mgmt'?)",
        )

    def test_network_without_http(self):
        self.assertError(
            self.error(PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "nohttp"\n'),
            "management.network",
            "network 'nohttp' has no [network.nohttp.http] listener",
        )

    def test_network_serving_pipelines(self):
        self.assertError(
            self.error(PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "main"\n', pipelines=self.ECHO),
            "management.network",
            "network 'main' also serves pipeline 'e': the management API needs a network of its own",
        )

    def test_address_of_a_pipeline_network(self):
        text = (
            PROXY + '[network.main.http]\nbind_address = "0.0.0.0"\nbind_port = 8080\n'
            '[network.mgmt.http]\nbind_address = "127.0.0.1"\nbind_port = 8080\n'
            '[management]\nenabled = true\nnetwork = "mgmt"\n'
        )
        self.assertError(
            self.error(text, pipelines=self.ECHO),
            "management.network",
            "network 'mgmt' listens on 127.0.0.1:8080, already used by network 'main'",
        )

    def test_address_of_a_dicom_listener(self):
        pipelines = self.ECHO + (
            '[pipelines.d]\nendpoints = ["scp"]\nbackends = []\n'
            '[endpoints.scp]\nservice = "dicom"\noptions = { local_aet = "H", port = 9090 }\n'
        )
        config = self.load(PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "mgmt"\n', pipelines=pipelines)
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config, builtin_registry(), BuildContext(config=config))
        self.assertIn("already used by network 'mgmt'", raised.exception.message)

    def test_token_env_unset(self):
        text = PROXY + self.NETWORKS + '[management]\nenabled = true\nnetwork = "mgmt"\ntoken_env = "HARMONY_ADMIN"\n'
        self.assertError(
            self.error(text, environ={"HARMONY_ADMIN": ""}),
            "management.token_env",
            "environment variable HARMONY_ADMIN is not set or empty (the management API would have no authentication)",
        )

    def test_token_env_wins(self):
        text = (
            PROXY + self.NETWORKS
            + '[management]\nenabled = true\nnetwork = "mgmt"\ntoken_env = "HARMONY_ADMIN"\ntoken = "other"\n'
        )
        self.assertEqual(self.load(text, environ={"HARMONY_ADMIN": "t0k"}).management.token, "t0k")

    def test_token_env_name(self):
        self.assertError(
            self.error(PROXY + '[management]\ntoken_env = "${X}"\n', environ={"X": "A-B"}),
            "management.token_env",
            'must be the name of an environment variable, got "A-B"',
        )

    def test_base_path(self):
        self.assertError(
            self.error(PROXY + '[management]\nbase_path = "admin/../x"\n'),
            "management.base_path",
            'must be a plain path such as "admin", got "admin/../x"',
        )

    def test_unknown_key(self):
        self.assertError(
            self.error(PROXY + '[management]\ntokenenv = "X"\n'),
            "management.tokenenv",
            'unknown key "tokenenv" (did you mean "token_env"?)',
        )
