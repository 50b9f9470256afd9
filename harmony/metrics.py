# -*- test-case-name: tests.unit.test_metrics -*-
"""
Prometheus metrics of one gateway (C{GET /<base_path>/metrics} of the
management API, L{harmony.management}).

Everything lives in one C{CollectorRegistry} per L{Metrics} object, never
in prometheus-client's global default registry: two gateways in one
process (tests, a reload) do not mix, and the exposition holds Harmony's
metrics only.

Recorded as traffic happens, in plain Python numbers turned into metrics
at scrape time (cheap: a few additions per request, see
L{PipelineMetrics}):

  - C{harmony_requests_total{pipeline,endpoint,backend,status}}: requests
    answered by a pipeline; C{backend} is the backend that was asked last
    (after failover, the one that answered), empty when none was (a
    middleware answered, or the request failed before); C{status} is the
    response status (DICOM requests carry one too), C{cancelled} when the
    client went away first;
  - C{harmony_request_duration_seconds{pipeline,endpoint}}: from the
    request entering the pipeline to its response being ready (headers;
    a streamed body may still be flowing);
  - C{harmony_requests_in_flight{pipeline}};
  - C{harmony_request_bytes_total{pipeline}},
    C{harmony_response_bytes_total{pipeline}}: body sizes where known
    (Content-Length, in-memory bodies; chunked bodies of unknown length
    are not counted);
  - C{harmony_dicom_associations_total{endpoint,calling_aet,result}}
    (C{accepted}/C{rejected}; at most L{MAX_CALLING_AETS} distinct calling
    AE titles per endpoint, others are counted as C{_other});
  - C{harmony_dimse_operations_total{endpoint,operation,status}}: final
    DIMSE responses sent by a DICOM SCP endpoint (C{echo}, C{store},
    C{find}, C{get}, C{move}; C{status} as four hex digits, e.g. C{0000},
    C{A700}, C{FE00}); pending responses are not counted.

Read at scrape time from L{harmony.gateway.Gateway.target_status} (a
custom collector, L{TargetCollector}): C{harmony_target_available},
C{harmony_target_healthy}, C{harmony_target_breaker_state} (one series
per state, 1 for the current one), C{harmony_target_in_flight},
C{harmony_target_requests_total}, C{harmony_target_failures_total},
C{harmony_target_timeouts_total}, C{harmony_target_retries_total},
C{harmony_target_ejections_total} (labels C{backend}, C{target}) and
C{harmony_backend_rejected_total{backend}} (no target was available).

Several worker processes: when prometheus-client's multiprocess mode is on
(C{PROMETHEUS_MULTIPROC_DIR} set before Harmony starts), the request
metrics are prometheus-client's own counters, histogram and gauge
(L{PrometheusPipelineMetrics}), written to that directory by every process,
and L{Metrics.exposition} sums them (the in-flight gauge over the live
processes); the DICOM counters are prometheus-client's in both modes; the
target metrics are those of the process that answers the scrape.
"""

import os
import struct
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from harmony.dimse import messages
from harmony.envelope import ResponseEnvelope, body_length

#: Request duration buckets, seconds: from a passthrough on a LAN (1 ms) to
#: a C-MOVE of a study or a large STOW (minutes).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Distinct calling AE titles recorded per endpoint; the others (a scan of
#: random AE titles must not grow the exposition without bound) are
#: counted as C{"_other"}.
MAX_CALLING_AETS = 256
OTHER_AET = "_other"

#: DIMSE response command field -> operation label.
OPERATIONS = {
    messages.C_ECHO_RSP: "echo",
    messages.C_STORE_RSP: "store",
    messages.C_FIND_RSP: "find",
    messages.C_GET_RSP: "get",
    messages.C_MOVE_RSP: "move",
}

#: Pending statuses (PS3.7 C.1.2): not the result of an operation.
PENDING = frozenset({0xFF00, 0xFF01})

BREAKER_STATES = ("closed", "open", "half_open")

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


class Metrics:
    """
    The metrics of one gateway.

    @param now: a 0-argument callable returning seconds (a monotonic
        clock; request durations).
    @param multiprocess_dir: prometheus-client's multiprocess directory
        (default: C{$PROMETHEUS_MULTIPROC_DIR}; empty: one process).  It
        must be the directory prometheus-client was imported with.

    @ivar registry: the C{CollectorRegistry} of this gateway.
    """

    def __init__(self, now=time.monotonic, multiprocess_dir=None):
        if multiprocess_dir is None:
            multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.now = now
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry = CollectorRegistry()
        self._pipelines = {}
        if multiprocess_dir:
            # Values must live in prometheus-client's files to be summed
            # over the processes: its metric objects.
            self._store = _PrometheusStore(registry)
        else:
            self._store = None
            registry.register(RequestCollector(self._pipelines))
        self.associations = Counter(
            "harmony_dicom_associations",
            "DICOM associations requested of an SCP endpoint, by calling AE title and result.",
            ["endpoint", "calling_aet", "result"],
            registry=registry,
        )
        self.dimse_operations = Counter(
            "harmony_dimse_operations",
            "DIMSE operations answered by an SCP endpoint, by final status (four hex digits).",
            ["endpoint", "operation", "status"],
            registry=registry,
        )
        self.targets = TargetCollector()
        registry.register(self.targets)

    def pipeline(self, name):
        """
        The recorder of pipeline C{name}'s requests (one per name, shared by
        the executors of successive configurations).

        @rtype: L{PipelineMetrics} (L{PrometheusPipelineMetrics} in
            multiprocess mode)
        """
        recorder = self._pipelines.get(name)
        if recorder is None:
            if self._store is None:
                recorder = PipelineMetrics(name, self.now)
            else:
                recorder = PrometheusPipelineMetrics(self._store, name, self.now)
            self._pipelines[name] = recorder
        return recorder

    def dicom(self, endpoint):
        """
        The recorder of a DICOM SCP endpoint's associations and operations.

        @rtype: L{DicomMetrics}
        """
        return DicomMetrics(self, endpoint)

    def watch_targets(self, status):
        """
        Read target metrics from C{status} at scrape time.

        @param status: a 0-argument callable returning
            L{harmony.gateway.Gateway.target_status}'s mapping (pass one
            that reads the I{current} gateway when configurations are
            reloaded).
        """
        self.targets.status = status

    def exposition(self, accept=None):
        """
        The metrics in the format the scraper asked for (C{Accept}: the
        Prometheus text format, or OpenMetrics).

        @return: C{(body bytes, content type)}.
        """
        encoder, content_type = choose_encoder(accept or "")
        registry = self.registry
        if self.multiprocess_dir:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            registry.register(self.targets)
        return encoder(registry), content_type


class _Histogram:
    """
    Observations per bucket of L{DURATION_BUCKETS} (the last: above them
    all) and their sum.
    """

    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0


class PipelineMetrics:
    """
    Records the requests of one pipeline in plain Python numbers (the
    reactor thread is the only writer); L{RequestCollector} turns them into
    metrics at scrape time.  L{harmony.pipeline.PipelineExecutor} calls
    L{started} and L{finished} around every request: a few additions, two
    dict lookups and a C{bisect} (measured: prometheus-client's locked
    counters and histogram cost about twice as much per request).

    @ivar in_flight: requests of this pipeline not answered yet.
    @ivar requests: C{(endpoint, backend, status)} -> requests answered.
    @ivar durations: endpoint -> L{_Histogram}.
    @ivar request_bytes, response_bytes: body bytes where the size is known.
    """

    def __init__(self, pipeline, now):
        self.pipeline = pipeline
        self._now = now
        self.in_flight = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.requests = {}
        self.durations = {}

    def started(self, envelope):
        """
        A request entered the pipeline.

        @return: the start time, for L{finished}.
        """
        self.in_flight += 1
        size = body_length(envelope.body)
        if size:
            self.request_bytes += size
        return self._now()

    def finished(self, result, endpoint, envelope, started):
        """
        The pipeline answered (a callback and errback of its Deferred):
        count it.  C{result} is passed on unchanged.

        @param endpoint: the endpoint name.
        """
        elapsed = self._now() - started
        self.in_flight -= 1
        if isinstance(result, ResponseEnvelope):
            status = result.status
            size = body_length(result.body)
            if size:
                self.response_bytes += size
        else:
            status = "cancelled"
        key = (endpoint, envelope.metadata.get("backend", ""), status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.durations.get(endpoint)
        if histogram is None:
            histogram = self.durations[endpoint] = _Histogram()
        histogram.counts[bisect_left(DURATION_BUCKETS, elapsed)] += 1
        histogram.sum += elapsed
        return result


#: The C{le} labels of the duration buckets.
_BUCKET_LABELS = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]

_REQUESTS_HELP = "Requests answered by a pipeline, by endpoint, backend and response status."
_DURATION_HELP = "Time from a request entering its pipeline to its response being ready."
_IN_FLIGHT_HELP = "Requests in a pipeline, not answered yet."
_REQUEST_BYTES_HELP = "Request body bytes received by a pipeline (where the size is known)."
_RESPONSE_BYTES_HELP = "Response body bytes answered by a pipeline (where the size is known)."


class RequestCollector:
    """
    The request metrics of L{PipelineMetrics} recorders, at scrape time.

    @param pipelines: pipeline name -> L{PipelineMetrics} (read when
        collected).
    """

    def __init__(self, pipelines):
        self.pipelines = pipelines

    def describe(self):
        return []

    def collect(self):
        requests = CounterMetricFamily(
            "harmony_requests", _REQUESTS_HELP, labels=["pipeline", "endpoint", "backend", "status"]
        )
        duration = HistogramMetricFamily("harmony_request_duration_seconds", _DURATION_HELP, labels=["pipeline", "endpoint"])
        in_flight = GaugeMetricFamily("harmony_requests_in_flight", _IN_FLIGHT_HELP, labels=["pipeline"])
        request_bytes = CounterMetricFamily("harmony_request_bytes", _REQUEST_BYTES_HELP, labels=["pipeline"])
        response_bytes = CounterMetricFamily("harmony_response_bytes", _RESPONSE_BYTES_HELP, labels=["pipeline"])
        for name, recorder in sorted(self.pipelines.items()):
            in_flight.add_metric([name], recorder.in_flight)
            request_bytes.add_metric([name], recorder.request_bytes)
            response_bytes.add_metric([name], recorder.response_bytes)
            for (endpoint, backend, status), n in sorted(recorder.requests.items(), key=lambda kv: str(kv[0])):
                requests.add_metric([name, endpoint, backend, str(status)], n)
            for endpoint, histogram in sorted(recorder.durations.items()):
                buckets, total = [], 0
                for label, n in zip(_BUCKET_LABELS, histogram.counts):
                    total += n
                    buckets.append((label, total))
                duration.add_metric([name, endpoint], buckets, histogram.sum)
        return [requests, duration, in_flight, request_bytes, response_bytes]


class _PrometheusStore:
    """
    The request metrics as prometheus-client objects (multiprocess mode).
    """

    def __init__(self, registry):
        labels = ["pipeline", "endpoint", "backend", "status"]
        self.requests = Counter("harmony_requests", _REQUESTS_HELP, labels, registry=registry)
        self.duration = Histogram(
            "harmony_request_duration_seconds",
            _DURATION_HELP,
            ["pipeline", "endpoint"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "harmony_requests_in_flight", _IN_FLIGHT_HELP, ["pipeline"], registry=registry, multiprocess_mode="livesum"
        )
        self.request_bytes = Counter("harmony_request_bytes", _REQUEST_BYTES_HELP, ["pipeline"], registry=registry)
        self.response_bytes = Counter("harmony_response_bytes", _RESPONSE_BYTES_HELP, ["pipeline"], registry=registry)


class PrometheusPipelineMetrics:
    """
    L{PipelineMetrics} over prometheus-client's metric objects, for its
    multiprocess mode (the values are written to the shared directory as
    they change).  Labelled children are looked up once per label set.
    """

    def __init__(self, store, pipeline, now):
        self.pipeline = pipeline
        self._now = now
        self._requests = store.requests
        self._duration = store.duration
        self._in_flight = store.in_flight.labels(pipeline)
        self._request_bytes = store.request_bytes.labels(pipeline)
        self._response_bytes = store.response_bytes.labels(pipeline)
        #: (endpoint, backend, status) -> requests counter child
        self._counts = {}
        #: endpoint -> histogram child
        self._durations = {}

    def started(self, envelope):
        self._in_flight.inc()
        size = body_length(envelope.body)
        if size:
            self._request_bytes.inc(size)
        return self._now()

    def finished(self, result, endpoint, envelope, started):
        elapsed = self._now() - started
        self._in_flight.dec()
        if isinstance(result, ResponseEnvelope):
            status = result.status
            size = body_length(result.body)
            if size:
                self._response_bytes.inc(size)
        else:
            status = "cancelled"
        backend = envelope.metadata.get("backend", "")
        key = (endpoint, backend, status)
        counter = self._counts.get(key)
        if counter is None:
            counter = self._counts[key] = self._requests.labels(self.pipeline, endpoint, backend, str(status))
        counter.inc()
        histogram = self._durations.get(endpoint)
        if histogram is None:
            histogram = self._durations[endpoint] = self._duration.labels(self.pipeline, endpoint)
        histogram.observe(elapsed)
        return result


class DicomMetrics:
    """
    Records the associations and DIMSE operations of one DICOM SCP
    endpoint (see L{harmony.dimse.scp.DicomServerFactory}).
    """

    def __init__(self, metrics, endpoint):
        self.endpoint = endpoint
        self._associations = metrics.associations
        self._operations = metrics.dimse_operations
        self._aets = set()
        self._children = {}

    def association(self, calling_aet, result):
        """
        An association was C{"accepted"} or C{"rejected"}.
        """
        aet = (calling_aet or "").strip()
        if aet not in self._aets:
            if len(self._aets) >= MAX_CALLING_AETS:
                aet = OTHER_AET
            else:
                self._aets.add(aet)
        self._associations.labels(self.endpoint, aet, result).inc()

    def operation(self, command_field, status):
        """
        A final DIMSE response was sent.
        """
        key = (command_field, status)
        child = self._children.get(key)
        if child is None:
            operation = OPERATIONS.get(command_field, f"{command_field:04X}")
            child = self._children[key] = self._operations.labels(self.endpoint, operation, f"{status:04X}")
        child.inc()

    def observe(self, association):
        """
        Count the final responses sent on C{association} (called once per
        association by the SCP factory): its C{send_message} is wrapped.
        Requests (C-STORE sub-operations of a C-GET) and pending responses
        are not counted.
        """
        send = association.send_message

        def send_message(context_id, command, dataset=None, **options):
            field, status = response_status(command)
            if field is not None and field & 0x8000 and status is not None and status not in PENDING:
                self.operation(field, status)
            return send(context_id, command, dataset, **options)

        association.send_message = send_message


def response_status(command):
    """
    The CommandField and Status of an encoded command set (implicit VR
    little endian, elements in tag order), read with a few C{struct}
    operations.

    @return: C{(command field, status)}; either is C{None} when absent.
    """
    field = status = None
    offset, end = 0, len(command)
    try:
        while offset + 8 <= end:
            _, element, length = _ELEMENT.unpack_from(command, offset)
            offset += 8
            if element == 0x0100:
                field = _US.unpack_from(command, offset)[0]
            elif element == 0x0900:
                status = _US.unpack_from(command, offset)[0]
                break
            elif element > 0x0900:
                break
            offset += length
    except struct.error:
        pass
    return field, status


class TargetCollector:
    """
    Target health, breaker state and counters, read at scrape time from
    C{status()} (see L{Metrics.watch_targets}).
    """

    def __init__(self, status=None):
        self.status = status

    def describe(self):
        # Series depend on the configuration: nothing to check at
        # registration.
        return []

    def collect(self):
        statuses = self.status() if self.status is not None else {}
        labels = ["backend", "target"]
        available = GaugeMetricFamily(
            "harmony_target_available", "Whether a target may get requests now (1) or not (0).", labels=labels
        )
        healthy = GaugeMetricFamily(
            "harmony_target_healthy", "Active health check state of a target (targets with health checks).", labels=labels
        )
        breaker = GaugeMetricFamily(
            "harmony_target_breaker_state",
            "Circuit breaker state of a target: 1 for the current state.",
            labels=labels + ["state"],
        )
        in_flight = GaugeMetricFamily("harmony_target_in_flight", "Requests sent to a target, not answered yet.", labels=labels)
        requests = CounterMetricFamily("harmony_target_requests", "Requests sent to a target.", labels=labels)
        failures = CounterMetricFamily("harmony_target_failures", "Failed requests of a target.", labels=labels)
        timeouts = CounterMetricFamily("harmony_target_timeouts", "Timed-out requests of a target.", labels=labels)
        retries = CounterMetricFamily("harmony_target_retries", "Retries sent to a target.", labels=labels)
        ejections = CounterMetricFamily("harmony_target_ejections", "Outlier ejections of a target.", labels=labels)
        rejected = CounterMetricFamily(
            "harmony_backend_rejected", "Requests refused because no target of a backend was available.", labels=["backend"]
        )
        for name, backend in sorted(statuses.items()):
            rejected.add_metric([name], backend.get("rejected", 0))
            for target in backend.get("targets", ()):
                values = [name, target["name"]]
                available.add_metric(values, 1 if target["state"] == "available" else 0)
                if target.get("health") is not None:
                    healthy.add_metric(values, 1 if target["health"]["healthy"] else 0)
                state = target["breaker"]["state"]
                for s in BREAKER_STATES:
                    breaker.add_metric(values + [s], 1 if s == state else 0)
                in_flight.add_metric(values, target["in_flight"])
                requests.add_metric(values, target["requests"])
                failures.add_metric(values, target["failures"])
                timeouts.add_metric(values, target["timeouts"])
                retries.add_metric(values, target["retries"])
                ejections.add_metric(values, target["outlier"]["ejections"])
        return [available, healthy, breaker, in_flight, requests, failures, timeouts, retries, ejections, rejected]
