"""
Tests for L{harmony.metrics}: the pipeline's request metrics recorded by
L{harmony.pipeline.PipelineExecutor}, the DICOM SCP's association and
DIMSE operation metrics (an in-memory association, twisted.test.iosim),
the target collector and the exposition.
"""

import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from _fakes import FakeBackend, FakeEndpoint, RecordingMiddleware, make_request
from harmony.dimse import messages
from harmony.dimse.association import AssociationRejected
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, DicomClient
from harmony.envelope import ResponseEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.metrics import (
    MAX_CALLING_AETS,
    OTHER_AET,
    Metrics,
    PipelineMetrics,
    PrometheusPipelineMetrics,
    TargetCollector,
    response_status,
)
from harmony.pipeline import PipelineExecutor
from harmony.streams import Stream


class FakeTime:
    """
    A monotonic clock the test moves.
    """

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


class _PipelineMetricsTests:
    """
    The request metrics, whichever recorder keeps them.
    """

    multiprocess = False

    def setUp(self):
        self.time = FakeTime()
        directory = ""
        if self.multiprocess:
            directory = self.mktemp()
            os.makedirs(directory)
        self.metrics = Metrics(now=self.time, multiprocess_dir=directory)
        self.endpoint = FakeEndpoint("api")

    def test_recorder(self):
        recorder = self.metrics.pipeline("p")
        self.assertIsInstance(recorder, PrometheusPipelineMetrics if self.multiprocess else PipelineMetrics)

    def executor(self, backends, request_chain=(), name="p"):
        return PipelineExecutor(
            name, request_chain, list(reversed(request_chain)), backends, metrics=self.metrics.pipeline(name)
        )

    def test_statuses_counted_by_endpoint_backend_and_status(self):
        """
        Each answered request counts once under its pipeline, endpoint,
        backend and status, also errors rendered by the endpoint.
        """
        answers = iter([ResponseEnvelope(status=200), ResponseEnvelope(status=404), ResponseEnvelope(status=200)])
        executor = self.executor([FakeBackend("up", result=lambda env: next(answers))])
        for _ in range(3):
            self.successResultOf(executor.execute(self.endpoint, make_request()))
        failing = self.executor([FakeBackend("down", result=UpstreamUnavailable)], name="q")
        response = self.successResultOf(failing.execute(self.endpoint, make_request()))
        self.assertEqual(response.status, 502)
        labels = dict(pipeline="p", endpoint="api", backend="up")
        self.assertEqual(sample(self.metrics, "harmony_requests_total", status="200", **labels), 2)
        self.assertEqual(sample(self.metrics, "harmony_requests_total", status="404", **labels), 1)
        self.assertEqual(
            sample(self.metrics, "harmony_requests_total", pipeline="q", endpoint="api", backend="down", status="502"),
            1,
        )
        self.assertEqual(sample(self.metrics, "harmony_request_duration_seconds_count", pipeline="p", endpoint="api"), 3)

    def test_duration_and_in_flight(self):
        """
        The duration runs from execute() to the response; the request is in
        flight in between.
        """
        pending = defer.Deferred()
        executor = self.executor([FakeBackend("up", result=lambda env: pending)])
        d = executor.execute(self.endpoint, make_request())
        self.assertEqual(sample(self.metrics, "harmony_requests_in_flight", pipeline="p"), 1)
        self.time.now += 0.2
        pending.callback(ResponseEnvelope(status=201))
        self.successResultOf(d)
        self.assertEqual(sample(self.metrics, "harmony_requests_in_flight", pipeline="p"), 0)
        self.assertAlmostEqual(
            sample(self.metrics, "harmony_request_duration_seconds_sum", pipeline="p", endpoint="api"), 0.2
        )
        self.assertEqual(
            sample(self.metrics, "harmony_request_duration_seconds_bucket", pipeline="p", endpoint="api", le="0.1"), 0
        )
        self.assertEqual(
            sample(self.metrics, "harmony_request_duration_seconds_bucket", pipeline="p", endpoint="api", le="0.25"), 1
        )

    def test_bucket_edges(self):
        """
        A duration equal to a bucket's bound counts in it (C{le}); one
        above every bound only in C{+Inf}.
        """
        for elapsed in (0.25, 400.0):
            pending = defer.Deferred()
            executor = self.executor([FakeBackend("up", result=lambda env: pending)])
            d = executor.execute(self.endpoint, make_request())
            self.time.now += elapsed
            pending.callback(ResponseEnvelope(status=200))
            self.successResultOf(d)

        def bucket(le):
            return sample(self.metrics, "harmony_request_duration_seconds_bucket", pipeline="p", endpoint="api", le=le)

        self.assertEqual((bucket("0.1"), bucket("0.25"), bucket("300.0"), bucket("+Inf")), (0, 1, 1, 2))
        self.assertEqual(sample(self.metrics, "harmony_request_duration_seconds_sum", pipeline="p", endpoint="api"), 400.25)

    def test_cancelled(self):
        """
        A request cancelled (the client went away) counts as C{cancelled}
        and leaves the in-flight gauge; the cancellation passes on.
        """
        executor = self.executor([FakeBackend("up", result=lambda env: defer.Deferred())])
        d = executor.execute(self.endpoint, make_request())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(
            sample(self.metrics, "harmony_requests_total", pipeline="p", endpoint="api", backend="up", status="cancelled"),
            1,
        )
        self.assertEqual(sample(self.metrics, "harmony_requests_in_flight", pipeline="p"), 0)

    def test_bytes_where_known(self):
        """
        Request and response body sizes are counted from in-memory bodies
        and streams of known length; a stream of unknown length is not.
        """
        bodies = iter([b"x" * 10, Stream(length=1000), Stream()])
        executor = self.executor([FakeBackend("up", result=lambda env: ResponseEnvelope(status=200, body=next(bodies)))])
        self.successResultOf(executor.execute(self.endpoint, make_request(method="POST", body=b"a" * 7)))
        self.successResultOf(executor.execute(self.endpoint, make_request(body=b"")))
        self.successResultOf(executor.execute(self.endpoint, make_request(body=Stream(length=5))))
        self.assertEqual(sample(self.metrics, "harmony_request_bytes_total", pipeline="p"), 12)
        self.assertEqual(sample(self.metrics, "harmony_response_bytes_total", pipeline="p"), 1010)

    def test_backend_after_failover(self):
        """
        After failover the backend label names the backend that answered.
        """
        executor = self.executor([FakeBackend("first", result=UpstreamUnavailable), FakeBackend("second")])
        self.successResultOf(executor.execute(self.endpoint, make_request()))
        self.assertEqual(
            sample(self.metrics, "harmony_requests_total", pipeline="p", endpoint="api", backend="second", status="200"),
            1,
        )
        self.assertIsNone(
            sample(self.metrics, "harmony_requests_total", pipeline="p", endpoint="api", backend="first", status="200")
        )

    def test_short_circuit_has_no_backend(self):
        """
        A response from middleware (no backend asked) has an empty backend
        label.
        """
        log = []
        deny = RecordingMiddleware("deny", log, on_request=lambda env: ResponseEnvelope(status=403))
        backend = FakeBackend("up")
        executor = self.executor([backend], request_chain=[deny])
        self.assertEqual(self.successResultOf(executor.execute(self.endpoint, make_request())).status, 403)
        self.assertEqual(backend.calls, [])
        self.assertEqual(
            sample(self.metrics, "harmony_requests_total", pipeline="p", endpoint="api", backend="", status="403"), 1
        )

    def test_one_recorder_per_pipeline(self):
        """
        Executors of successive configurations share a pipeline's recorder
        (a reload keeps the counts).
        """
        self.assertIs(self.metrics.pipeline("p"), self.metrics.pipeline("p"))

    def test_without_metrics(self):
        """
        An executor without metrics answers the same.
        """
        executor = PipelineExecutor("p", [], [], [FakeBackend("up")])
        response = self.successResultOf(executor.execute(self.endpoint, make_request()))
        self.assertEqual(response.status, 200)


class PipelineMetricsTests(_PipelineMetricsTests, SynchronousTestCase):
    """
    Plain Python recorders exported by L{RequestCollector} (one process).
    """


class PrometheusPipelineMetricsTests(_PipelineMetricsTests, SynchronousTestCase):
    """
    prometheus-client's metric objects (multiprocess mode).
    """

    multiprocess = True

    def test_exposition_reads_the_directory(self):
        """
        In multiprocess mode the exposition aggregates the directory's files
        (none here: prometheus-client was not imported in multiprocess
        mode) plus this process's target metrics.
        """
        self.metrics.watch_targets(lambda: {"api": {"rejected": 1, "targets": []}})
        body, _ = self.metrics.exposition(None)
        self.assertIn(b"harmony_backend_rejected_total", body)


class ResponseStatusTests(SynchronousTestCase):
    def test_command_sets(self):
        """
        The command field and status read from an encoded command set are
        what L{messages.decode_command} reads.
        """
        commands = [
            messages.echo_rsp(7, 0x0000),
            messages.store_rsp(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0xA700, "Out of resources"),
            messages.store_rsp(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0x0000),
            messages.encode_command(
                {
                    "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.1",
                    "CommandField": messages.C_FIND_RSP,
                    "MessageIDBeingRespondedTo": 1,
                    "CommandDataSetType": messages.NO_DATASET,
                    "Status": 0xFF00,
                }
            ),
            messages.encode_command(
                {
                    "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.3",
                    "CommandField": messages.C_MOVE_RSP,
                    "MessageIDBeingRespondedTo": 1,
                    "CommandDataSetType": messages.NO_DATASET,
                    "Status": 0xB000,
                    "ErrorComment": "some failed",
                    "NumberOfFailedSuboperations": 1,
                }
            ),
        ]
        for command in commands:
            fields = messages.decode_command(command)
            self.assertEqual(response_status(command), (fields["CommandField"], fields["Status"]))

    def test_request_has_no_status(self):
        command = messages.encode_command(
            {
                "AffectedSOPClassUID": "1.2.840.10008.1.1",
                "CommandField": messages.C_ECHO_RQ,
                "MessageID": 1,
                "CommandDataSetType": messages.NO_DATASET,
            }
        )
        self.assertEqual(response_status(command), (messages.C_ECHO_RQ, None))

    def test_truncated(self):
        self.assertEqual(response_status(messages.echo_rsp(1)[:48]), (messages.C_ECHO_RSP, None))
        self.assertEqual(response_status(b""), (None, None))


class FakeAssociation:
    def __init__(self):
        self.sent = []
        self.now = []

    def send_message(self, context_id, command, dataset=None, now=False):
        self.sent.append((context_id, command, dataset))
        self.now.append(now)
        return defer.succeed(None)


class DicomMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.metrics = Metrics(multiprocess_dir="")
        self.dicom = self.metrics.dicom("scp")

    def test_final_responses_counted(self):
        """
        Final responses count by operation and status; pending responses
        and requests (C-GET sub-operations) do not; everything is sent.
        """
        association = FakeAssociation()
        self.dicom.observe(association)

        def find_rsp(status):
            return messages.encode_command(
                {
                    "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.1",
                    "CommandField": messages.C_FIND_RSP,
                    "MessageIDBeingRespondedTo": 1,
                    "CommandDataSetType": messages.NO_DATASET,
                    "Status": status,
                }
            )

        store_rq = messages.encode_command(
            {
                "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                "CommandField": messages.C_STORE_RQ,
                "MessageID": 2,
                "Priority": 0,
                "CommandDataSetType": 0x0001,
                "AffectedSOPInstanceUID": "1.2.3",
            }
        )
        sends = [
            find_rsp(0xFF00),
            find_rsp(0xFF00),
            find_rsp(0x0000),
            find_rsp(0xFE00),
            store_rq,
            messages.echo_rsp(1),
            messages.store_rsp(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", 0xA700),
        ]
        for command in sends:
            association.send_message(1, command, b"data")
        self.assertEqual([c for _, c, _ in association.sent], sends)
        self.assertEqual(association.sent[0][2], b"data")
        # The sender's options pass through (a C-STORE-RSP goes "now").
        association.send_message(1, sends[-1], now=True)
        self.assertEqual(association.now, [False] * len(sends) + [True])

        def count(operation, status):
            return sample(self.metrics, "harmony_dimse_operations_total", endpoint="scp", operation=operation, status=status)

        self.assertEqual(count("find", "0000"), 1)
        self.assertEqual(count("find", "FE00"), 1)
        self.assertIsNone(count("find", "FF00"))
        self.assertEqual(count("echo", "0000"), 1)
        self.assertEqual(count("store", "A700"), 2)
        self.assertIsNone(count("store", "0000"))

    def test_calling_aets_bounded(self):
        """
        Calling AE titles beyond L{MAX_CALLING_AETS} count as C{_other};
        known ones keep their own series.
        """
        for i in range(MAX_CALLING_AETS):
            self.dicom.association(f"AE{i}", "accepted")
        self.dicom.association("ONE MORE", "rejected")
        self.dicom.association("AE0 ", "accepted")
        self.assertEqual(
            sample(self.metrics, "harmony_dicom_associations_total", endpoint="scp", calling_aet=OTHER_AET, result="rejected"),
            1,
        )
        self.assertEqual(
            sample(self.metrics, "harmony_dicom_associations_total", endpoint="scp", calling_aet="AE0", result="accepted"),
            2,
        )


ECHO = [(messages.VERIFICATION_SOP_CLASS, [IMPLICIT_VR_LITTLE_ENDIAN])]
STORE = [("1.2.840.10008.5.1.4.1.1.2", [IMPLICIT_VR_LITTLE_ENDIAN])]


class ScpMetricsTests(SynchronousTestCase):
    """
    The SCP factory's hooks, over an in-memory association.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics(multiprocess_dir="")
        syntaxes = {
            messages.VERIFICATION_SOP_CLASS: [IMPLICIT_VR_LITTLE_ENDIAN],
            "1.2.840.10008.5.1.4.1.1.2": [IMPLICIT_VR_LITTLE_ENDIAN],
        }
        self.server = DicomServerFactory(
            self.reactor, SCPPolicy("HARMONY", syntaxes), metrics=self.metrics.dicom("scp")
        )
        self.client = DicomClient(self.reactor, "MODALITY")

    def connect(self, called="HARMONY", syntaxes=ECHO):
        d = self.client.associate("127.0.0.1", 11112, called, syntaxes)
        factory = self.reactor.tcpClients[-1][2]
        server_protocol = self.server.buildProtocol(None)
        client_protocol = factory.buildProtocol(None)
        pump = iosim.connect(
            server_protocol,
            iosim.makeFakeServer(server_protocol),
            client_protocol,
            iosim.makeFakeClient(client_protocol),
            greet=True,
        )
        pump.flush()
        return d, pump

    def test_echo_association(self):
        d, pump = self.connect(syntaxes=ECHO + STORE)
        association = self.successResultOf(d)
        for _ in range(2):
            status = association.echo()
            pump.flush()
            self.assertTrue(self.successResultOf(status).ok)
        association.release()
        pump.flush()
        self.assertEqual(
            sample(self.metrics, "harmony_dicom_associations_total", endpoint="scp", calling_aet="MODALITY", result="accepted"),
            1,
        )
        self.assertEqual(
            sample(self.metrics, "harmony_dimse_operations_total", endpoint="scp", operation="echo", status="0000"), 2
        )

    def test_rejected(self):
        d, pump = self.connect(called="SOMEONE")
        self.failureResultOf(d, AssociationRejected)
        self.assertEqual(
            sample(self.metrics, "harmony_dicom_associations_total", endpoint="scp", calling_aet="MODALITY", result="rejected"),
            1,
        )

    def test_without_metrics(self):
        server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", {}))
        self.assertIsNone(server.metrics)


def target(name, state="available", breaker="closed", health=None, **counts):
    values = dict(in_flight=0, requests=0, failures=0, timeouts=0, retries=0)
    values.update(counts)
    return dict(
        name=name,
        address=f"http://{name}.test",
        weight=1,
        state=state,
        health=health,
        outlier={"ejected": state == "ejected", "ejected_until": None, "ejections": counts.get("ejections", 0),
                 "consecutive_failures": 0},
        breaker={"state": breaker, "opened_at": None, "consecutive_failures": 0, "opens": 0},
        **{k: v for k, v in values.items() if k != "ejections"},
    )


class TargetCollectorTests(SynchronousTestCase):
    def test_scrape_time_status(self):
        """
        Target series come from the status callable at each scrape.
        """
        statuses = {
            "api": {
                "backend": "api",
                "rejected": 4,
                "targets": [
                    target("a", requests=10, failures=2, timeouts=1, retries=3, in_flight=1, ejections=1,
                           health={"healthy": True}),
                    target("b", state="open", breaker="open"),
                ],
            }
        }
        metrics = Metrics(multiprocess_dir="")
        metrics.watch_targets(lambda: statuses)

        def value(name, **labels):
            return sample(metrics, name, **labels)

        self.assertEqual(value("harmony_target_available", backend="api", target="a"), 1)
        self.assertEqual(value("harmony_target_available", backend="api", target="b"), 0)
        self.assertEqual(value("harmony_target_healthy", backend="api", target="a"), 1)
        self.assertIsNone(value("harmony_target_healthy", backend="api", target="b"))
        self.assertEqual(value("harmony_target_breaker_state", backend="api", target="b", state="open"), 1)
        self.assertEqual(value("harmony_target_breaker_state", backend="api", target="b", state="closed"), 0)
        self.assertEqual(value("harmony_target_breaker_state", backend="api", target="a", state="closed"), 1)
        self.assertEqual(value("harmony_target_requests_total", backend="api", target="a"), 10)
        self.assertEqual(value("harmony_target_failures_total", backend="api", target="a"), 2)
        self.assertEqual(value("harmony_target_timeouts_total", backend="api", target="a"), 1)
        self.assertEqual(value("harmony_target_retries_total", backend="api", target="a"), 3)
        self.assertEqual(value("harmony_target_ejections_total", backend="api", target="a"), 1)
        self.assertEqual(value("harmony_target_in_flight", backend="api", target="a"), 1)
        self.assertEqual(value("harmony_backend_rejected_total", backend="api"), 4)
        statuses["api"]["targets"][0]["requests"] = 11
        self.assertEqual(value("harmony_target_requests_total", backend="api", target="a"), 11)

    def test_no_source(self):
        families = TargetCollector().collect()
        self.assertTrue(families)
        self.assertTrue(all(not f.samples for f in families))


class ExpositionTests(SynchronousTestCase):
    def test_text_format(self):
        """
        The exposition parses as the Prometheus text format and holds
        Harmony's metrics only (not the default registry's process
        metrics).
        """
        metrics = Metrics(multiprocess_dir="")
        executor = PipelineExecutor("p", [], [], [FakeBackend("up")], metrics=metrics.pipeline("p"))
        executor.execute(FakeEndpoint("api"), make_request())
        body, content_type = metrics.exposition("text/plain")
        self.assertTrue(content_type.startswith("text/plain"))
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
        self.assertIn("harmony_requests", families)
        self.assertNotIn("process_cpu_seconds", families)
        [sample_] = [s for s in families["harmony_requests"].samples if s.name == "harmony_requests_total"]
        self.assertEqual(sample_.labels, {"pipeline": "p", "endpoint": "api", "backend": "up", "status": "200"})
        self.assertEqual(sample_.value, 1)

    def test_openmetrics(self):
        metrics = Metrics(multiprocess_dir="")
        body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_two_gateways_do_not_mix(self):
        one, two = Metrics(multiprocess_dir=""), Metrics(multiprocess_dir="")
        PipelineExecutor("p", [], [], [FakeBackend("up")], metrics=one.pipeline("p")).execute(
            FakeEndpoint("api"), make_request()
        )
        labels = dict(pipeline="p", endpoint="api", backend="up", status="200")
        self.assertEqual(sample(one, "harmony_requests_total", **labels), 1)
        self.assertIsNone(sample(two, "harmony_requests_total", **labels))


class GatewayWiringTests(SynchronousTestCase):
    def test_build_context_metrics_reach_executors_and_scp(self):
        import os
        import tempfile

        from harmony.config import load_config
        from harmony.gateway import build_gateway
        from harmony.registry import BuildContext, builtin_registry

        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        path = os.path.join(directory, "harmony.toml")
        with open(path, "w") as f:
            f.write(
                """
[proxy]
id = "unit"
[network.main.http]
bind_port = 0
[pipelines.echo]
networks = ["main"]
endpoints = ["echo", "scp"]
backends = ["echo"]
[endpoints.echo]
service = "echo"
options = { path_prefix = "/echo" }
[endpoints.scp]
service = "dicom"
options = { local_aet = "HARMONY", port = 0 }
[backends.echo]
service = "echo"
"""
            )
        registry = builtin_registry()
        config = load_config(path, registry, environ={})
        metrics = Metrics(multiprocess_dir="")
        gateway = build_gateway(config, registry, BuildContext(reactor=Clock(), config=config, metrics=metrics))
        self.assertIs(gateway.executors["echo"].metrics, metrics.pipeline("echo"))
        self.assertEqual(gateway.endpoints["scp"]._metrics.endpoint, "scp")
        bare = build_gateway(config, registry, BuildContext(config=config))
        self.assertIsNone(bare.executors["echo"].metrics)
        self.assertIsNone(bare.endpoints["scp"]._metrics)
