"""
rate_limit: token buckets on a task.Clock (burst, refill, Retry-After,
keys and their fallbacks, the LRU cap), the refusal log, option errors,
and the 429 as every endpoint renders it (HTTP JSON, FHIR
OperationOutcome, DICOMweb, DIMSE A700).
"""

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _deferreds import result_of
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from _fakes import FakeBackend, make_request
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.dimse import status as dimse_status
from harmony.endpoints import dicom_scp, dicomweb, fhir
from harmony.endpoints import http as http_endpoint
from harmony.envelope import DicomRequest, Headers, RequestDetails, RequestEnvelope
from harmony.errors import HarmonyError, TooManyRequests
from harmony.interfaces import IMiddleware, IMiddlewareType
from harmony.middleware import rate_limit
from harmony.middleware.rate_limit import (
    OPTIONS,
    RateLimit,
    SharedTokenBuckets,
    TokenBuckets,
    check_key,
    retry_after_secs,
    table_path,
)
from harmony.pipeline import PipelineExecutor
from harmony.registry import BuildContext
from harmony.workers import SHARED_DIR_ENV


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """
    Harmony as one process unless a test says otherwise.
    """
    monkeypatch.delenv(SHARED_DIR_ENV, raising=False)


def options(**values):
    return OPTIONS.validate(values, Where("p.toml", ("middleware", "limit", "options")))


def build(clock=None, **values):
    values.setdefault("rate", 1.0)
    return RateLimit("limit", options(**values), BuildContext(reactor=clock if clock is not None else Clock()))


def error(**values):
    with pytest.raises(ConfigError) as info:
        options(**values)
    return info.value


def request(ip="10.0.0.1", headers=(), metadata=None, dicom=None):
    envelope = make_request("GET", "Patient/1", headers=headers, client=(ip, 40000))
    envelope.metadata.update(metadata or {})
    envelope.dicom = dicom
    return envelope


def dimse_request(calling="CT1", ip="10.0.0.9"):
    details = RequestDetails(
        method="DIMSE",
        uri="dicom://HARMONY/store",
        path="store",
        full_path="store",
        headers=Headers(),
        client=(ip, 50000),
        scheme="dicom",
    )
    envelope = RequestEnvelope(details=details, dicom=DicomRequest("store", calling_aet=calling, called_aet="HARMONY"))
    envelope.metadata.update({"protocol": "dimse", "calling_aet": calling, "called_aet": "HARMONY"})
    return envelope


def passes(mw, envelope):
    return mw.request(envelope) is None


def refused(mw, envelope):
    with pytest.raises(TooManyRequests) as info:
        mw.request(envelope)
    return info.value


# -- options ------------------------------------------------------------------


def test_defaults():
    o = options(rate=2.5)
    assert (o.key, o.rate, o.burst, o.max_keys) == ("client_ip", 2.5, None, 100000)
    mw = RateLimit("limit", o)
    assert mw.buckets.burst == 3  # one second's worth, rounded up
    assert RateLimit("limit", options(rate=0.2)).buckets.burst == 1
    assert RateLimit("limit", options(rate=10, burst=20)).buckets.burst == 20


@pytest.mark.parametrize(
    "key", ["client_ip", "jwt_subject", "global", "calling_aet", "header:X-Tenant", "metadata:tenant"]
)
def test_keys_accepted(key):
    assert options(rate=1, key=key).key == key
    assert check_key(key) is None


@pytest.mark.parametrize(
    "values,key,text",
    [
        ({}, "rate", "required"),
        ({"rate": 0}, "rate", "greater than 0"),
        ({"rate": -1.5}, "rate", "greater than 0"),
        ({"rate": float("inf")}, "rate", "finite"),
        ({"rate": float("nan")}, "rate", "finite"),
        ({"rate": "fast"}, "rate", "expected number"),
        ({"rate": 1, "burst": 0}, "burst", "at least 1"),
        ({"rate": 1, "burst": 1.5}, "burst", "expected integer"),
        ({"rate": 1, "max_keys": 0}, "max_keys", "at least 1"),
        ({"rate": 1, "key": "ip"}, "key", "expected one of client_ip"),
        ({"rate": 1, "key": "header:"}, "key", "header name"),
        ({"rate": 1, "key": "header:X Tenant"}, "key", "header name"),
        ({"rate": 1, "key": "metadata: "}, "key", "metadata key"),
        ({"rate": 1, "key": ""}, "key", "must not be empty"),
        ({"rate": 1, "window": 5}, "window", "unknown key"),
    ],
)
def test_option_errors_name_the_key(values, key, text):
    e = error(**values)
    assert e.file == "p.toml"
    assert e.keypath == ("middleware", "limit", "options", key)
    assert text in str(e), str(e)


def test_provides_imiddleware():
    mw = build()
    assert verifyObject(IMiddleware, mw)
    assert mw.name == "limit"
    assert mw.response(request(), object()) is None


# -- the error ------------------------------------------------------------------


def test_too_many_requests_error():
    e = TooManyRequests(3)
    assert isinstance(e, HarmonyError)
    assert (e.status, e.error, e.retry_after) == (429, "too_many_requests", 3)
    assert e.headers == (("Retry-After", "3"),)
    assert e.message == "Too many requests: retry after 3 seconds"
    assert TooManyRequests(1).message == "Too many requests: retry after 1 second"
    # Whole seconds, rounded up, at least 1.
    assert TooManyRequests(0.2).retry_after == 1
    assert TooManyRequests(0).retry_after == 1
    assert TooManyRequests(2.01).retry_after == 3
    assert TooManyRequests().headers == (("Retry-After", "1"),)
    assert TooManyRequests(5, message="Slow down").message == "Slow down"
    # Fits a DIMSE Error Comment (LO, 64 characters).
    assert len(TooManyRequests(10**9).message) <= 64


def test_retry_after_secs():
    assert retry_after_secs(0.001) == 1
    assert retry_after_secs(1.0) == 1
    assert retry_after_secs(1.0000000000002) == 1  # float noise is not a second
    assert retry_after_secs(1.2) == 2
    assert retry_after_secs(10 / 3) == 4


# -- the buckets ---------------------------------------------------------------


def test_burst_then_refused():
    clock = Clock()
    mw = build(clock, rate=1.0, burst=3)
    for _ in range(3):
        assert passes(mw, request())
    e = refused(mw, request())
    assert e.retry_after == 1
    assert ("Retry-After", "1") in e.headers
    # Refusals take no token: still refused, not pushed further out.
    assert refused(mw, request()).retry_after == 1


def test_refill():
    clock = Clock()
    mw = build(clock, rate=2.0, burst=2)
    assert passes(mw, request()) and passes(mw, request())
    refused(mw, request())
    clock.advance(0.5)  # one token back
    assert passes(mw, request())
    refused(mw, request())
    clock.advance(10)  # never more than burst
    assert passes(mw, request()) and passes(mw, request())
    refused(mw, request())


def test_retry_after_counts_up_to_the_next_token():
    clock = Clock()
    mw = build(clock, rate=0.25, burst=1)  # a token every 4 s
    assert passes(mw, request())
    assert refused(mw, request()).retry_after == 4
    clock.advance(1)
    assert refused(mw, request()).retry_after == 3
    clock.advance(2.5)
    assert refused(mw, request()).retry_after == 1  # 0.5 s left
    clock.advance(0.5)
    assert passes(mw, request())
    mw = build(clock, rate=0.3, burst=1)
    assert passes(mw, request())
    assert refused(mw, request()).retry_after == 4  # 3.33 s, rounded up


def test_fast_rate_retry_after_is_at_least_one_second():
    clock = Clock()
    mw = build(clock, rate=100.0, burst=1)
    assert passes(mw, request())
    e = refused(mw, request())
    assert e.retry_after == 1
    clock.advance(0.01)
    assert passes(mw, request())


def test_exact_rate_over_time():
    clock = Clock()
    mw = build(clock, rate=10.0, burst=1)
    allowed = 0
    for _ in range(1000):  # 10 s in steps of 10 ms
        try:
            mw.request(request())
            allowed += 1
        except TooManyRequests:
            pass
        clock.advance(0.01)
    assert allowed == 100


def test_clock_going_back_adds_nothing():
    buckets = TokenBuckets(1.0, 1, 10)
    assert buckets.take("k", 100.0) == 0.0
    assert buckets.take("k", 50.0) == pytest.approx(1.0)
    assert buckets.take("k", 100.5) == pytest.approx(0.5)
    assert buckets.take("k", 101.0) == 0.0


def test_token_buckets_arguments():
    for rate, burst, max_keys in ((0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError):
            TokenBuckets(rate, burst, max_keys)
    buckets = TokenBuckets(1.0, 5, 10)
    assert buckets.tokens("new", 0.0) == 5.0
    buckets.take("new", 0.0)
    assert buckets.tokens("new", 0.0) == 4.0
    assert buckets.tokens("new", 0.5) == 4.5


# -- keys ------------------------------------------------------------------------


def test_client_ip_keys_are_separate():
    mw = build(rate=1.0, burst=1)
    assert passes(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.1"))
    assert passes(mw, request("10.0.0.2"))
    refused(mw, request("10.0.0.2"))
    # Another port of the same address is the same client.
    envelope = make_request("GET", "x", client=("10.0.0.1", 1234))
    refused(mw, envelope)


def test_unknown_client_shares_one_bucket():
    mw = build(rate=1.0, burst=1)
    assert passes(mw, make_request("GET", "x"))
    refused(mw, make_request("GET", "x", client=(None, None)))
    assert "ip:unknown" in mw.buckets


def test_global_key():
    mw = build(rate=1.0, burst=2, key="global")
    assert passes(mw, request("10.0.0.1"))
    assert passes(mw, request("10.0.0.2"))
    refused(mw, request("10.0.0.3"))
    refused(mw, dimse_request())
    assert len(mw.buckets) == 1


def test_jwt_subject_key_and_fallback():
    mw = build(rate=1.0, burst=1, key="jwt_subject")
    alice = {"jwt.sub": "alice"}
    bob = {"jwt.sub": "bob"}
    assert passes(mw, request("10.0.0.1", metadata=alice))
    # Same subject from another address: same bucket.
    refused(mw, request("10.0.0.2", metadata=alice))
    assert passes(mw, request("10.0.0.1", metadata=bob))
    # No verified subject: limited under the client address, apart from subjects.
    assert passes(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.1", metadata={"jwt.sub": ""}))
    assert passes(mw, request("10.0.0.2"))
    assert "sub:alice" in mw.buckets and "ip:10.0.0.1" in mw.buckets


def test_header_key_and_fallback():
    mw = build(rate=1.0, burst=1, key="header:X-Tenant")
    assert passes(mw, request("10.0.0.1", headers=[("X-Tenant", "a")]))
    refused(mw, request("10.0.0.2", headers=[("x-tenant", "a")]))  # name case-insensitive
    assert passes(mw, request("10.0.0.2", headers=[("X-Tenant", "b")]))
    # The first value decides.
    refused(mw, request("10.0.0.3", headers=[("X-Tenant", "a"), ("X-Tenant", "c")]))
    # Without the header: the client address.
    assert passes(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.1"))


def test_metadata_key_and_fallback():
    mw = build(rate=1.0, burst=1, key="metadata:tenant")
    assert passes(mw, request("10.0.0.1", metadata={"tenant": "a"}))
    refused(mw, request("10.0.0.2", metadata={"tenant": "a"}))
    assert passes(mw, request("10.0.0.2", metadata={"tenant": "b"}))
    assert passes(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.1"))


def test_calling_aet_key():
    mw = build(rate=1.0, burst=1, key="calling_aet")
    assert passes(mw, dimse_request("CT1", ip="10.0.0.9"))
    # Same AE from another address: same bucket; another AE from the same address: its own.
    refused(mw, dimse_request("CT1", ip="10.0.0.8"))
    assert passes(mw, dimse_request("MR1", ip="10.0.0.9"))
    # HTTP requests: the client address.
    assert passes(mw, request("10.0.0.9"))
    refused(mw, request("10.0.0.9"))
    assert "aet:CT1" in mw.buckets and "ip:10.0.0.9" in mw.buckets


def test_client_ip_of_dimse_requests():
    mw = build(rate=1.0, burst=1)
    assert passes(mw, dimse_request("CT1", ip="10.0.0.9"))
    refused(mw, dimse_request("MR1", ip="10.0.0.9"))


def test_lru_cap():
    clock = Clock()
    mw = build(clock, rate=0.001, burst=1, max_keys=2)
    assert passes(mw, request("10.0.0.1"))
    assert passes(mw, request("10.0.0.2"))
    refused(mw, request("10.0.0.1"))  # .1 is now the most recently used
    assert passes(mw, request("10.0.0.3"))  # drops .2, the least recently used
    assert len(mw.buckets) == 2
    assert "ip:10.0.0.2" not in mw.buckets
    refused(mw, request("10.0.0.1"))
    refused(mw, request("10.0.0.3"))
    # A dropped key starts again with a full bucket.
    assert passes(mw, request("10.0.0.2"))
    assert len(mw.buckets) == 2


# -- clock ---------------------------------------------------------------------


def test_clock_read_at_the_first_request():
    class LateClock(Clock):
        started = False

        def seconds(self):
            assert self.started, "the clock was read while building"
            return super().seconds()

    clock = LateClock()
    mw = build(clock, rate=1.0, burst=1)
    clock.started = True
    assert passes(mw, request())
    refused(mw, request())
    clock.advance(1)
    assert passes(mw, request())


def test_without_reactor_uses_a_monotonic_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(rate_limit.time, "monotonic", lambda: now[0])
    for context in (None, BuildContext()):
        mw = RateLimit("limit", options(rate=1.0, burst=1), context)
        assert passes(mw, request())
        refused(mw, request())
        now[0] += 1
        assert passes(mw, request())


# -- logging -------------------------------------------------------------------


@pytest.fixture
def events():
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def _texts(events):
    return [formatEvent(e) for e in events if e.get("log_namespace") == "harmony.middleware.rate_limit"]


def test_refusals_logged_once_a_minute_per_key(events):
    clock = Clock()
    mw = build(clock, rate=0.001, burst=1)
    for ip in ("10.0.0.1", "10.0.0.2"):
        mw.request(request(ip))
        for _ in range(5):
            refused(mw, request(ip))
    texts = _texts(events)
    assert len(texts) == 2
    assert "client 10.0.0.1" in texts[0] and "client 10.0.0.2" in texts[1]
    assert "limit" in texts[0] and "429" in texts[0]
    clock.advance(59)
    refused(mw, request("10.0.0.1"))
    assert len(_texts(events)) == 2
    clock.advance(1)
    refused(mw, request("10.0.0.1"))
    assert len(_texts(events)) == 3


def test_log_never_names_subjects_or_values(events):
    for key, envelope in (
        ("jwt_subject", request(metadata={"jwt.sub": "patient-PID123"})),
        ("header:X-Patient-ID", request(headers=[("X-Patient-ID", "PID123")])),
        ("metadata:patient", request(metadata={"patient": "PID123"})),
    ):
        mw = build(rate=0.001, burst=1, key=key)
        mw.request(envelope)
        refused(mw, envelope)
    texts = _texts(events)
    assert len(texts) == 3
    assert texts[0].count("JWT subject") == 1
    assert "X-Patient-ID header" in texts[1] and "patient metadata" in texts[2]
    for e in events:
        assert "PID123" not in formatEvent(e) + repr(e)


def test_calling_aet_logged(events):
    mw = build(rate=0.001, burst=1, key="calling_aet")
    mw.request(dimse_request("CT1"))
    refused(mw, dimse_request("CT1"))
    [text] = _texts(events)
    assert "calling AE CT1" in text


# -- rendering by the endpoints ---------------------------------------------------


def run(endpoint, mw, envelope, backend=None):
    backend = backend or FakeBackend()
    executor = PipelineExecutor("p", [mw], [mw], [backend])
    return result_of(executor.execute(endpoint, envelope)), backend


def test_http_endpoint_renders_429_with_retry_after():
    endpoint = http_endpoint.HttpEndpoint(
        "api", http_endpoint.OPTIONS.validate({"path_prefix": "/api"}, Where("t.toml"))
    )
    mw = build(rate=0.5, burst=1)
    response, backend = run(endpoint, mw, request())
    assert response.status == 200
    response, backend = run(endpoint, mw, request(), backend)
    assert response.status == 429
    assert response.headers.get("Retry-After") == "2"
    assert response.content_type.startswith("application/json")
    assert json.loads(response.body) == {
        "error": "too_many_requests",
        "message": "Too many requests: retry after 2 seconds",
    }
    assert len(backend.calls) == 1  # the refused request never reached it
    assert response.metadata["error"] == "too_many_requests"


def test_fhir_endpoint_renders_an_operation_outcome():
    endpoint = fhir.FhirEndpoint(
        "fhir", fhir.OPTIONS.validate({"path_prefix": "/fhir"}, Where("t.toml")), BuildContext(reactor=Clock())
    )
    mw = build(rate=1.0, burst=1)
    envelope = make_request("GET", "Patient/1", client=("10.0.0.1", 1), prefix="/fhir", full_path="/fhir/Patient/1")
    response, _ = run(endpoint, mw, envelope)
    assert response.status == 200
    envelope = make_request("GET", "Patient/1", client=("10.0.0.1", 1), prefix="/fhir", full_path="/fhir/Patient/1")
    response, _ = run(endpoint, mw, envelope)
    assert response.status == 429
    assert response.headers.get("Retry-After") == "1"
    assert response.content_type.startswith("application/fhir+json")
    outcome = json.loads(response.body)
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == "throttled"
    assert issue["diagnostics"] == "Too many requests: retry after 1 second"


def test_dicomweb_endpoint_renders_429_with_retry_after():
    endpoint = dicomweb.DicomwebEndpoint("dw", dicomweb.OPTIONS.validate({"path_prefix": "/dicomweb"}, Where("t.toml")))
    response = endpoint.render_error(TooManyRequests(7))
    assert response.status == 429
    assert response.headers.get("Retry-After") == "7"
    assert json.loads(response.body)["error"] == "too_many_requests"


def test_dimse_requester_gets_out_of_resources():
    endpoint = dicom_scp.DicomScpEndpoint(
        "scp", dicom_scp.OPTIONS.validate({"local_aet": "HARMONY"}, Where("t.toml")), BuildContext()
    )
    mw = build(rate=1.0, burst=1, key="calling_aet")
    response, _ = run(endpoint, mw, dimse_request("CT1"))
    assert response.status == 200
    response, backend = run(endpoint, mw, dimse_request("CT1"))
    assert response.status == 429
    assert response.dicom.status == dimse_status.OUT_OF_RESOURCES == 0xA700
    assert response.dicom.error_comment == "Too many requests: retry after 1 second"
    assert dimse_status.is_failure(response.dicom.status)
    assert backend.calls == []
    assert dimse_status.status_for_error(TooManyRequests(3)) == 0xA700
    assert dimse_status.status_for_http(429) == 0xA700


def test_middleware_type():
    mtype = rate_limit.MIDDLEWARE_TYPE
    assert verifyObject(IMiddlewareType, mtype)
    assert mtype.name == "rate_limit"
    assert mtype.options is OPTIONS
    mw = mtype.make("limit", options(rate=3), BuildContext(reactor=Clock()))
    assert isinstance(mw, RateLimit) and mw.buckets.burst == 3


# -- several worker processes: the shared table --------------------------------


def shared(tmp_path, rate=1.0, burst=3, max_keys=100, name="t.bin"):
    return SharedTokenBuckets(tmp_path / name, rate, burst, max_keys)


def test_shared_tables_on_one_file_share_the_budget(tmp_path):
    a, b = shared(tmp_path), shared(tmp_path)
    assert a.take("ip:1", 100.0) == 0.0
    assert a.take("ip:1", 100.0) == 0.0
    assert b.tokens("ip:1", 100.0) == pytest.approx(1.0)
    assert b.take("ip:1", 100.0) == 0.0
    assert a.take("ip:1", 100.0) == pytest.approx(1.0)  # a second to the next token
    assert b.take("ip:1", 100.0) == pytest.approx(1.0)
    # Other keys have their own buckets.
    assert b.tokens("ip:2", 100.0) == 3.0 and "ip:2" not in a
    assert "ip:1" in a and "ip:1" in b
    assert len(a) == len(b) == 1
    a.close()
    a.close()
    assert b.take("ip:1", 101.0) == 0.0  # the file stays for the others


def test_shared_refill_and_clock(tmp_path):
    t = shared(tmp_path, rate=2.0, burst=2)
    assert t.take("k", 10.0) == 0.0 and t.take("k", 10.0) == 0.0
    assert t.take("k", 10.0) == pytest.approx(0.5)
    assert t.take("k", 10.5) == 0.0  # one token back
    assert t.tokens("k", 100.0) == 2.0  # never more than burst
    # A clock a little behind (another process read it before this one
    # took the lock) adds nothing and moves nothing back.
    assert t.take("k", 100.0) == 0.0
    assert t.tokens("k", 99.5) == pytest.approx(1.0)
    assert t.take("k", 99.5) == 0.0
    assert t.take("k", 99.9) == pytest.approx(0.5)
    assert t.tokens("k", 100.25) == pytest.approx(0.5)
    # A time far ahead of now (a table that outlived a reboot): the
    # bucket's refill starts again from now instead of never.
    assert t.tokens("k", 5.0) == pytest.approx(0.0)
    assert t.take("k", 5.0) == pytest.approx(0.5)
    assert t.take("k", 5.5) == 0.0


def test_shared_table_behaves_as_the_memory_one(tmp_path):
    """
    The same requests, in the same order, on both: the same answers.
    """
    rng = random.Random(7)
    memory = TokenBuckets(3.0, 5, 1000)
    table = shared(tmp_path, rate=3.0, burst=5, max_keys=1000)
    now = 1000.0
    keys = [f"ip:10.0.0.{n}" for n in range(40)]
    for _ in range(5000):
        now += rng.choice((0.0, 0.0, 0.01, 0.1, 0.5))
        key = rng.choice(keys)
        if rng.random() < 0.1:
            assert table.tokens(key, now) == pytest.approx(memory.tokens(key, now))
        assert table.take(key, now) == pytest.approx(memory.take(key, now))


def test_shared_table_size(tmp_path):
    assert SharedTokenBuckets.slots_for(1) == 16
    assert SharedTokenBuckets.slots_for(12) == 16
    assert SharedTokenBuckets.slots_for(13) == 32
    assert SharedTokenBuckets.slots_for(100000) == 1 << 18  # 133334 wanted
    t = shared(tmp_path, max_keys=100000)
    t.open()
    assert t.slots == 1 << 18
    assert os.path.getsize(t.path) == 64 + (1 << 18) * 24


def fixed_hashes(monkeypatch, hashes):
    monkeypatch.setattr(SharedTokenBuckets, "key_hash", staticmethod(lambda key: hashes[key]))


def test_shared_eviction_of_the_least_recently_used_in_the_window(tmp_path, monkeypatch):
    # 32 slots; 17 keys whose hashes all start at slot 3, one at slot 20.
    hashes = {f"k{n}": (n << 5) | 3 for n in range(1, 18)}
    hashes["other"] = (1 << 5) | 20
    fixed_hashes(monkeypatch, hashes)
    t = shared(tmp_path, rate=0.001, burst=1, max_keys=20)
    t.open()
    assert t.slots == 32
    assert t.take("other", 0.0) == 0.0
    for n in range(1, 17):  # fill slots 3..18
        assert t.take(f"k{n}", float(n)) == 0.0
    assert t.take("k1", 20.0) > 0  # k1 refused, but now the most recent
    assert t.take("k17", 21.0) == 0.0  # the window is full: replaces k2
    assert "k2" not in t and "k1" in t and "k17" in t and "other" in t
    assert len(t) == 17
    assert t.take("k1", 22.0) > 0 and t.take("k17", 22.0) > 0 and t.take("other", 22.0) > 0
    # A key dropped starts again with a full bucket (as in memory).
    assert t.take("k2", 23.0) == 0.0
    assert "k3" not in t


def test_shared_keys_with_one_hash_share_a_bucket(tmp_path, monkeypatch):
    fixed_hashes(monkeypatch, {"a": 99, "b": 99})
    t = shared(tmp_path, rate=0.001, burst=1)
    assert t.take("a", 0.0) == 0.0
    assert t.take("b", 0.0) > 0


def test_shared_key_hash():
    h = SharedTokenBuckets.key_hash
    assert h("ip:10.0.0.1") == h("ip:10.0.0.1") != h("ip:10.0.0.2")
    assert 0 < h("") < 1 << 64
    assert h("header:\udcff") != h("header:x")  # any str, even lone surrogates


def test_shared_file_created_by_concurrent_openers(tmp_path):
    path = tmp_path / "t.bin"
    count = 8
    barrier = threading.Barrier(count)
    tables, errors = [], []

    def worker():
        try:
            t = SharedTokenBuckets(path, 0.001, 100, 50)
            barrier.wait()
            t.open()  # each its own open file: flock excludes the others
            assert t.take("global", 0.0) == 0.0
            tables.append(t)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert {t.slots for t in tables} == {SharedTokenBuckets.slots_for(50)}
    assert tables[0].tokens("global", 0.0) == pytest.approx(100 - count)


def test_shared_file_existing_or_foreign(tmp_path):
    first = shared(tmp_path, max_keys=100)
    first.take("k", 0.0)
    # A table that exists keeps its slot count (and its buckets).
    bigger = shared(tmp_path, max_keys=10000)
    bigger.open()
    assert bigger.slots == first.slots == 256
    assert bigger.tokens("k", 0.0) == pytest.approx(2.0)
    # A file that is not a table is made one.
    (tmp_path / "junk.bin").write_bytes(b"not a table" * 100)
    junk = shared(tmp_path, name="junk.bin")
    assert junk.take("k", 0.0) == 0.0
    assert junk.slots == 256 and os.path.getsize(junk.path) == 64 + 256 * 24
    assert junk.tokens("k", 0.0) == pytest.approx(2.0)


def test_shared_should_log_is_per_process(tmp_path):
    a, b = shared(tmp_path, max_keys=2), shared(tmp_path, max_keys=2)
    assert a.should_log("k", 0.0) and not a.should_log("k", 30.0)
    assert b.should_log("k", 30.0)  # another worker logs its own refusals
    assert a.should_log("k", 60.0)
    a.should_log("x", 61.0)
    a.should_log("y", 61.0)  # at most max_keys remembered
    assert a.should_log("k", 62.0)


def test_shared_arguments(tmp_path):
    for rate, burst, max_keys in ((0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError):
            SharedTokenBuckets(tmp_path / "t.bin", rate, burst, max_keys)
    with pytest.raises(OSError):
        SharedTokenBuckets(tmp_path / "missing" / "t.bin", 1, 1, 1).open()


def test_shared_with_a_real_second_process(tmp_path):
    """
    Another process takes tokens with the monotonic clock (one clock for
    every process of the machine): this one sees them gone.
    """
    path = tmp_path / "t.bin"
    code = textwrap.dedent(
        """
        import sys, time
        from harmony.middleware.rate_limit import SharedTokenBuckets
        table = SharedTokenBuckets(sys.argv[1], 1e-6, 10, 100)
        taken = sum(table.take("ip:10.0.0.1", time.monotonic()) == 0.0 for _ in range(int(sys.argv[2])))
        print(taken)
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), "7"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7"
    table = SharedTokenBuckets(path, 1e-6, 10, 100)
    assert table.tokens("ip:10.0.0.1", time.monotonic()) == pytest.approx(3.0, abs=1e-3)
    for _ in range(3):
        assert table.take("ip:10.0.0.1", time.monotonic()) == 0.0
    assert table.take("ip:10.0.0.1", time.monotonic()) > 0
    # And the other way round: the next process finds nothing left.
    out = subprocess.run([sys.executable, "-c", code, str(path), "2"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out.stderr


def test_table_paths(tmp_path):
    assert table_path("/run/h", "limit") == "/run/h/ratelimit-limit.bin"
    assert table_path("/run/h", "limit", "fhir-api") == "/run/h/ratelimit-limit.fhir-api.bin"
    odd = table_path("/run/h", "a.b/c", "p")
    assert odd.startswith("/run/h/ratelimit-h") and odd.endswith(".p.bin") and "/c" not in odd
    assert table_path("/run/h", "a.b", "c") != table_path("/run/h", "a", "b.c")
    assert len(os.path.basename(table_path("/run/h", "x" * 300, "y" * 300))) < 100


# -- several worker processes: the middleware ----------------------------------


def test_middleware_in_one_process_keeps_buckets_in_memory(tmp_path):
    mw = build(rate=1.0)
    assert type(mw.buckets) is TokenBuckets and mw.shared_dir is None
    mw.bind_pipeline(PipelineExecutor("p", [mw], [], [FakeBackend()]))
    assert type(mw.buckets) is TokenBuckets
    assert os.listdir(tmp_path) == []


def test_middleware_with_workers_shares_its_buckets(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    # The same middleware built by two workers.
    first, second = build(rate=0.001, burst=2), build(rate=0.001, burst=2)
    for mw in (first, second):
        assert isinstance(mw.buckets, SharedTokenBuckets) and mw.shared_dir == str(tmp_path)
        mw.bind_pipeline(PipelineExecutor("fhir", [mw], [], [FakeBackend()]))
        assert mw.buckets.path == str(tmp_path / "ratelimit-limit.fhir.bin")
        assert mw._seconds is time.monotonic
    assert passes(first, request())
    assert passes(second, request())
    assert refused(first, request()).retry_after > 1
    refused(second, request())
    assert passes(second, request("10.0.0.2"))  # per key, as in one process
    # The same middleware in another pipeline has its own buckets.
    other = build(rate=0.001, burst=2)
    other.bind_pipeline(PipelineExecutor("dicomweb", [other], [], [FakeBackend()]))
    assert passes(other, request())
    assert sorted(os.listdir(tmp_path)) == ["ratelimit-limit.dicomweb.bin", "ratelimit-limit.fhir.bin"]


def test_middleware_with_workers_refill_and_unbound_table(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    clock = Clock()
    mw = build(rate=1.0, burst=1)
    mw._seconds = clock.seconds  # instead of time.monotonic
    assert passes(mw, request())
    assert refused(mw, request()).retry_after == 1
    clock.advance(1)
    assert passes(mw, request())
    # Never bound to a pipeline: the middleware's own table.
    assert os.listdir(tmp_path) == ["ratelimit-limit.bin"]


def test_middleware_with_workers_needs_a_writable_shared_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "missing"))
    mw = build(rate=1.0)
    with pytest.raises(OSError):
        mw.bind_pipeline(PipelineExecutor("p", [mw], [], [FakeBackend()]))


def test_shared_takes_of_processes_at_once_lose_nothing(tmp_path):
    """
    Four processes take tokens from one bucket at the same time: every
    take is counted once (each holds the file's lock).
    """
    path = tmp_path / "t.bin"
    code = textwrap.dedent(
        """
        import sys, time
        from harmony.middleware.rate_limit import SharedTokenBuckets
        table = SharedTokenBuckets(sys.argv[1], 1e-9, 100000, 100)
        table.open()
        print("ready", flush=True)
        sys.stdin.readline()  # all start together
        print(sum(table.take("global", time.monotonic()) == 0.0 for _ in range(20000)), flush=True)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        taken = [int(proc.communicate(timeout=60)[0]) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert taken == [20000] * 4
    table = SharedTokenBuckets(path, 1e-9, 100000, 100)
    assert table.tokens("global", time.monotonic()) == pytest.approx(20000.0, abs=0.01)
