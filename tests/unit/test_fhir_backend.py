"""
Tests for the C{fhir} backend (L{harmony.backends.fhir}): content-type
checks before the upstream, C{Accept}, and the rewriting of upstream URLs
in headers and Bundles (bodies untouched otherwise, streams kept streaming).
"""

import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from _fakes import AnsweringAgent, FakeResponse, RecordingAgent, make_request
from harmony.backends import fhir
from harmony.backends.fhir import OPTIONS, FhirBackend, body_kind, may_hold_links, prepend, wants_fhir_json
from harmony.backends.http import SMALL_BODY, HttpBackend
from harmony.config.schema import Where
from harmony.errors import UnsupportedMediaType, UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.registry import BuildContext
from harmony.streams import Stream, StreamCancelled, collect

UP = "http://upstream.test/fhir/R4"
GW = "http://gw.test:8080/fhir"


class Upstream(Resource):
    """
    A twisted.web FHIR upstream stand-in recording what it receives.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status = 200
        self.headers = [(b"Content-Type", b"application/fhir+json")]
        self.body = b'{"resourceType":"Patient","id":"1"}'
        self.chunked = False
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        self.received_body = request.content.read()
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        if self.chunked:
            request.write(self.body)
            request.finish()
            return NOT_DONE_YET
        return self.body


def options(**kw):
    kw.setdefault("base_url", UP)
    return OPTIONS.validate(kw, Where("test.toml", ("backends", "fhir", "options")))


def fhir_request(method, path, body=b"", headers=(), query_string="", base_url="http://gw.test:8080", prefix="/fhir"):
    return make_request(
        method, path, headers=headers, body=body, query_string=query_string, base_url=base_url, prefix=prefix
    )


def bundle(**extra):
    value = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 3,
        "link": [
            {"relation": "self", "url": f"{UP}/Patient?name=x&_count=2"},
            {"relation": "next", "url": f"{UP}/Patient?name=x&_count=2&_offset=2"},
        ],
        "entry": [
            {"fullUrl": f"{UP}/Patient/1", "resource": {"resourceType": "Patient", "id": "1"}},
            {"fullUrl": f"{UP}/Patient/2", "resource": {"resourceType": "Patient", "id": "2"}},
        ],
    }
    value.update(extra)
    return value


class _Base(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.upstream = Upstream()
        self.agent = RequestTraversalAgent(self.upstream)
        self.backend = self.make_backend()

    def make_backend(self, agent=None, **kw):
        backend = FhirBackend("fhir", options(**kw), BuildContext(reactor=self.clock, agent=agent or self.agent))
        verifyObject(IBackend, backend)
        return backend

    def handle(self, envelope, backend=None):
        d = (backend or self.backend).handle(envelope)
        self.agent.flush()
        return self.successResultOf(d)

    def seen(self, name):
        return self.upstream.requests[-1].requestHeaders.getRawHeaders(name.encode("ascii"))


class ServiceTests(_Base):
    def test_is_an_http_backend(self):
        self.assertIsInstance(self.backend, HttpBackend)
        self.assertEqual(self.backend.service_type, "fhir")

    def test_forwards_like_the_http_backend(self):
        env = fhir_request("GET", "Patient", query_string="name=a&name=b", headers=[("X-Trace", "t1")])
        resp = self.handle(env)
        self.assertEqual(resp.status, 200)
        req = self.upstream.requests[0]
        self.assertEqual(req.uri, b"/fhir/R4/Patient?name=a&name=b")
        self.assertEqual(self.seen("x-trace"), [b"t1"])
        self.assertEqual(self.seen("x-forwarded-proto"), [b"http"])


# -- content types ---------------------------------------------------------------


class ContentTypeTests(_Base):
    def assert_refused(self, env):
        d = self.backend.handle(env)
        self.agent.flush()
        failure = self.failureResultOf(d, UnsupportedMediaType)
        self.assertEqual(failure.value.status, 415)
        self.assertEqual(self.upstream.requests, [])  # the upstream never saw it
        return failure.value

    def assert_forwarded(self, env):
        self.handle(env)
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(
            self.upstream.received_body, env.body if isinstance(env.body, bytes) else self.upstream.received_body
        )
        self.upstream.requests.clear()

    def test_non_fhir_resource_bodies_refused(self):
        for method, path in (("POST", "Patient"), ("PUT", "Patient/1"), ("PUT", "Patient"), ("POST", "")):
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream", "image/png"):
                error = self.assert_refused(fhir_request(method, path, b"name=x", [("Content-Type", ctype)]))
                self.assertIn("FHIR JSON or XML", error.message)
                self.assertIn(ctype, error.message)

    def test_missing_content_type_refused(self):
        error = self.assert_refused(fhir_request("POST", "Patient", b"{}"))
        self.assertIn("no Content-Type", error.message)

    def test_streamed_body_of_unknown_length_is_checked(self):
        self.assert_refused(fhir_request("POST", "Patient", Stream(length=None), [("Content-Type", "text/csv")]))

    def test_fhir_resource_bodies_forwarded(self):
        for ctype in (
            "application/fhir+json",
            "application/fhir+json; charset=utf-8; fhirVersion=4.0",
            "application/json",
            "application/json+fhir",
            "APPLICATION/FHIR+XML",
            "application/xml",
            "text/xml; charset=utf-8",
            "application/xml+fhir",
        ):
            for method, path in (("POST", "Patient"), ("PUT", "Patient/1"), ("POST", "")):
                self.assert_forwarded(
                    fhir_request(method, path, b'{"resourceType":"Patient"}', [("Content-Type", ctype)])
                )

    def test_patch_types(self):
        for ctype in ("application/json-patch+json", "application/xml-patch+xml", "application/fhir+json"):
            self.assert_forwarded(fhir_request("PATCH", "Patient/1", b"[]", [("Content-Type", ctype)]))
            self.assert_forwarded(fhir_request("PATCH", "Patient", b"[]", [("Content-Type", ctype)]))
        error = self.assert_refused(
            fhir_request("PATCH", "Patient/1", b"[]", [("Content-Type", "application/json-patch")])
        )
        self.assertIn("Patch", error.message)

    def test_unchecked_requests(self):
        # Binary takes any content; searches and operations are not resources;
        # an empty create body is the upstream's to refuse.
        self.assert_forwarded(fhir_request("POST", "Binary", b"\x89PNG", [("Content-Type", "image/png")]))
        self.assert_forwarded(fhir_request("PUT", "Binary/b1", b"%PDF", [("Content-Type", "application/pdf")]))
        self.assert_forwarded(
            fhir_request("POST", "Patient/_search", b"name=x", [("Content-Type", "application/x-www-form-urlencoded")])
        )
        self.assert_forwarded(
            fhir_request("POST", "_search", b"_type=Patient", [("Content-Type", "application/x-www-form-urlencoded")])
        )
        self.assert_forwarded(fhir_request("POST", "Patient/$match", b"x", [("Content-Type", "text/plain")]))
        self.assert_forwarded(fhir_request("POST", "$import", b"x", [("Content-Type", "application/fhir+ndjson")]))
        self.assert_forwarded(fhir_request("POST", "Patient", b""))
        self.assert_forwarded(fhir_request("DELETE", "Patient/1", b"x", [("Content-Type", "text/plain")]))

    def test_target_path_and_method_are_what_is_checked(self):
        env = fhir_request("GET", "anything", b"x=1", [("Content-Type", "text/plain")])
        env.target = {"method": "POST", "path": "Observation"}
        self.assert_refused(env)


@pytest.mark.parametrize(
    "method, path, kind",
    [
        ("POST", "", "resource"),
        ("POST", "Patient", "resource"),
        ("POST", "Patient/_search", None),
        ("POST", "_search", None),
        ("POST", "$op", None),
        ("POST", "Patient/1/$op", None),
        ("PUT", "Patient/1", "resource"),
        ("PUT", "Patient", "resource"),
        ("PATCH", "Patient/1", "patch"),
        ("POST", "Binary", None),
        ("GET", "Patient", None),
        ("DELETE", "Patient/1", None),
    ],
)
def test_body_kind(method, path, kind):
    assert body_kind(method, [s for s in path.split("/") if s]) == kind


# -- Accept ------------------------------------------------------------------------------


class AcceptTests(_Base):
    def sent_accept(self, accept):
        headers = [("Accept", a) for a in accept]
        env = fhir_request("GET", "Patient/1", headers=headers)
        self.handle(env)
        self.assertEqual(env.details.headers.get_all("accept"), list(accept))  # the request is not modified
        return [v.decode() for v in self.seen("accept")]

    def test_json_by_default(self):
        for accept in ([], ["*/*"], ["application/json"], ["application/json, */*;q=0.1"], ["application/json+fhir"]):
            self.assertEqual(self.sent_accept(accept), ["application/fhir+json"], accept)

    def test_xml_and_other_specific_types_untouched(self):
        for accept in (
            ["application/fhir+xml"],
            ["application/xml, */*;q=0.1"],
            ["text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"],
            ["image/png"],
            ["application/fhir+json; fhirVersion=4.0"],
            ["application/json", "application/fhir+xml"],
        ):
            self.assertEqual(self.sent_accept(accept), accept)


def test_wants_fhir_json():
    assert wants_fhir_json([])
    assert wants_fhir_json(["*/*"])
    assert not wants_fhir_json(["text/turtle"])


# -- rewriting: headers ----------------------------------------------------------------------


class HeaderTests(_Base):
    def test_location_and_content_location_rewritten(self):
        self.upstream.status = 201
        self.upstream.headers = [
            (b"Content-Type", b"application/fhir+json"),
            (b"Location", f"{UP}/Patient/1/_history/2".encode()),
            (b"Content-Location", f"{UP}/Patient/1/_history/2".encode()),
            (b"ETag", b'W/"2"'),
            (b"Last-Modified", b"Tue, 24 Nov 2026 12:00:00 GMT"),
        ]
        resp = self.handle(fhir_request("POST", "Patient", b"{}", [("Content-Type", "application/fhir+json")]))
        self.assertEqual(resp.status, 201)
        self.assertEqual(resp.headers.get("location"), f"{GW}/Patient/1/_history/2")
        self.assertEqual(resp.headers.get("content-location"), f"{GW}/Patient/1/_history/2")
        self.assertEqual(resp.headers.get("etag"), 'W/"2"')
        self.assertEqual(resp.headers.get("last-modified"), "Tue, 24 Nov 2026 12:00:00 GMT")

    def test_other_locations_untouched(self):
        for location in (
            "Patient/1/_history/2",  # relative: already right for any base
            "http://elsewhere.test/fhir/R4/Patient/1",
            f"{UP}Other/Patient/1",  # not under the base
        ):
            self.upstream.headers = [(b"Location", location.encode())]
            resp = self.handle(fhir_request("GET", "Patient/1"))
            self.assertEqual(resp.headers.get("location"), location)

    def test_public_base_with_root_prefix(self):
        self.upstream.headers = [(b"Location", f"{UP}/Patient/1".encode())]
        resp = self.handle(fhir_request("GET", "Patient/1", base_url="https://gw.example.org/", prefix="/"))
        self.assertEqual(resp.headers.get("location"), "https://gw.example.org/Patient/1")

    def test_no_public_base_no_rewriting(self):
        self.upstream.headers = [(b"Location", f"{UP}/Patient/1".encode())]
        resp = self.handle(fhir_request("GET", "Patient/1", base_url=""))
        self.assertEqual(resp.headers.get("location"), f"{UP}/Patient/1")

    def test_target_base_url_is_the_upstream(self):
        self.upstream.headers = [(b"Location", b"http://other.test/r4/Patient/1")]
        env = fhir_request("GET", "Patient/1")
        env.target = {"base_url": "http://other.test/r4/"}
        agent = AnsweringAgent(FakeResponse(200, [(b"Location", b"http://other.test/r4/Patient/1")]))
        resp = self.successResultOf(self.make_backend(agent).handle(env))
        self.assertEqual(resp.headers.get("location"), f"{GW}/Patient/1")


# -- rewriting: bodies -----------------------------------------------------------------------


class BodyTests(_Base):
    def answer(self, value, ctype=b"application/fhir+json", headers=()):
        self.upstream.body = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.upstream.headers = [(b"Content-Type", ctype), *headers]

    def test_search_bundle_links_and_full_urls(self):
        self.answer(bundle())
        resp = self.handle(fhir_request("GET", "Patient", query_string="name=x&_count=2"))
        value = json.loads(resp.body)
        self.assertEqual(
            [link["url"] for link in value["link"]],
            [f"{GW}/Patient?name=x&_count=2", f"{GW}/Patient?name=x&_count=2&_offset=2"],
        )
        self.assertEqual([e["fullUrl"] for e in value["entry"]], [f"{GW}/Patient/1", f"{GW}/Patient/2"])
        self.assertEqual(value["entry"][0]["resource"], {"resourceType": "Patient", "id": "1"})
        self.assertNotIn(UP.encode(), resp.body)

    def test_content_length_follows_the_new_body(self):
        raw = json.dumps(bundle()).encode()
        agent = AnsweringAgent(
            FakeResponse(200, [(b"Content-Type", b"application/fhir+json"), (b"Content-Length", b"%d" % len(raw))], raw)
        )
        resp = self.successResultOf(self.make_backend(agent).handle(fhir_request("GET", "Patient")))
        self.assertLess(len(resp.body), len(raw))
        self.assertEqual(resp.headers.get_all("content-length"), [str(len(resp.body))])

    def test_only_link_fields_change(self):
        # A reference or identifier that happens to hold the upstream URL is
        # resource content: it stays.
        resource = {
            "resourceType": "Observation",
            "id": "o1",
            "subject": {"reference": f"{UP}/Patient/1"},
            "identifier": [{"system": f"{UP}/ids", "value": "x"}],
        }
        self.answer(bundle(entry=[{"fullUrl": f"{UP}/Observation/o1", "resource": resource}]))
        value = json.loads(self.handle(fhir_request("GET", "Observation")).body)
        self.assertEqual(value["entry"][0]["fullUrl"], f"{GW}/Observation/o1")
        self.assertEqual(value["entry"][0]["resource"], resource)

    def test_numbers_keep_their_precision(self):
        raw = (
            '{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"%s/Observation"}],'
            '"entry":[{"fullUrl":"%s/Observation/1","resource":{"resourceType":"Observation",'
            '"valueQuantity":{"value":72.50,"unit":"é"},"component":[{"valueDecimal":1.0E+3},'
            '{"valueDecimal":-0.000},{"valueInteger":7}]}}]}'
        ) % (UP, UP)
        self.answer(raw.encode())
        body = self.handle(fhir_request("GET", "Observation")).body
        self.assertEqual(
            body.decode(),
            raw.replace(f"{UP}/Observation", f"{GW}/Observation"),
        )

    def test_transaction_response_and_nested_search(self):
        inner = bundle()
        value = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "link": [{"relation": "self", "url": UP}],
            "entry": [
                {
                    "fullUrl": f"{UP}/Patient/9",
                    "response": {"status": "201 Created", "location": f"{UP}/Patient/9/_history/1"},
                    "link": [{"relation": "alternate", "url": f"{UP}/Patient/9"}],
                },
                {"resource": inner, "response": {"status": "200 OK"}},
                {"response": {"status": "200", "location": "Patient/3/_history/1"}},
            ],
        }
        self.answer(value)
        out = json.loads(self.handle(fhir_request("POST", "", b"{}", [("Content-Type", "application/fhir+json")])).body)
        self.assertEqual(out["link"][0]["url"], GW)
        first, second, third = out["entry"]
        self.assertEqual(first["fullUrl"], f"{GW}/Patient/9")
        self.assertEqual(first["response"]["location"], f"{GW}/Patient/9/_history/1")
        self.assertEqual(first["link"][0]["url"], f"{GW}/Patient/9")
        self.assertEqual(second["resource"]["link"][1]["url"], f"{GW}/Patient?name=x&_count=2&_offset=2")
        self.assertEqual(second["resource"]["entry"][0]["fullUrl"], f"{GW}/Patient/1")
        self.assertEqual(third["response"]["location"], "Patient/3/_history/1")

    def test_capability_statement_implementation_url(self):
        self.answer({"resourceType": "CapabilityStatement", "implementation": {"url": UP}, "url": f"{UP}/cs"})
        value = json.loads(self.handle(fhir_request("GET", "metadata")).body)
        self.assertEqual(value["implementation"]["url"], GW)
        self.assertEqual(value["url"], f"{UP}/cs")  # its canonical URL is content

    def test_history_operation_and_compartment_bundles(self):
        for path in (
            "_history",
            "Patient/_history",
            "Patient/1/_history",
            "Patient/1/$everything",
            "Patient/1/Observation",
            "",
        ):
            self.answer(bundle())
            value = json.loads(self.handle(fhir_request("GET", path)).body)
            self.assertEqual(value["entry"][0]["fullUrl"], f"{GW}/Patient/1", path)

    def test_upstream_aliases(self):
        backend = self.make_backend(upstream_base_urls=["https://fhir.example.org/R4/"])
        self.answer(bundle(link=[{"relation": "next", "url": "https://fhir.example.org/R4/Patient?page=2"}]))
        value = json.loads(self.handle(fhir_request("GET", "Patient"), backend).body)
        self.assertEqual(value["link"][0]["url"], f"{GW}/Patient?page=2")
        self.assertEqual(value["entry"][0]["fullUrl"], f"{GW}/Patient/1")

    def test_single_resources_untouched(self):
        # A stored document Bundle, a created resource: their contents are data.
        raw = json.dumps(bundle(type="document"), indent=2).encode()
        for method, path in (
            ("GET", "Bundle/b1"),
            ("GET", "Bundle/b1/_history/2"),
            ("PUT", "Bundle/b1"),
            ("POST", "Bundle"),
        ):
            self.answer(raw)
            body = b"{}" if method in ("PUT", "POST") else b""
            headers = [("Content-Type", "application/fhir+json")] if body else []
            resp = self.handle(fhir_request(method, path, body, headers))
            self.assertEqual(resp.body, raw, path)

    def test_bodies_without_upstream_links_untouched(self):
        raw = b'{ "resourceType" : "Bundle", "type": "searchset", "total": 0 }'
        self.answer(raw)
        self.assertEqual(self.handle(fhir_request("GET", "Patient")).body, raw)
        # Mentions the upstream, but not as a link: the original bytes stay.
        raw = json.dumps({"resourceType": "OperationOutcome", "issue": [{"diagnostics": UP}]}, indent=1).encode()
        self.answer(raw)
        self.assertEqual(self.handle(fhir_request("GET", "Patient")).body, raw)

    def test_xml_and_malformed_json_untouched(self):
        xml = f'<Bundle xmlns="http://hl7.org/fhir"><link><url value="{UP}/Patient"/></link></Bundle>'.encode()
        self.answer(xml, b"application/fhir+xml")
        self.assertEqual(
            self.handle(fhir_request("GET", "Patient", headers=[("Accept", "application/fhir+xml")])).body, xml
        )
        broken = f'{{"resourceType":"Bundle","link":[{{"url":"{UP}"'.encode()
        self.answer(broken)
        self.assertEqual(self.handle(fhir_request("GET", "Patient")).body, broken)

    def test_error_bundles_and_outcomes_pass(self):
        self.upstream.status = 400
        raw = json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "invalid"}]}).encode()
        self.answer(raw)
        resp = self.handle(fhir_request("GET", "Patient", query_string="bad=1"))
        self.assertEqual((resp.status, resp.body), (400, raw))

    def test_head_untouched(self):
        self.answer(bundle(), headers=[(b"Location", f"{UP}/Patient".encode())])
        resp = self.handle(fhir_request("HEAD", "Patient"))
        self.assertEqual(resp.headers.get("location"), f"{GW}/Patient")


# -- rewriting: streamed bodies --------------------------------------------------------------------


def big_bundle(n=600, **extra):
    entries = [
        {"fullUrl": f"{UP}/Patient/{i}", "resource": {"resourceType": "Patient", "id": str(i), "text": "x" * 100}}
        for i in range(n)
    ]
    return bundle(entry=entries, **extra)


class StreamTests(_Base):
    def test_large_bundle_is_collected_and_rewritten(self):
        raw = json.dumps(big_bundle()).encode()
        self.assertGreater(len(raw), SMALL_BODY)
        self.upstream.body = raw
        resp = self.handle(fhir_request("GET", "Patient"))
        self.assertIsInstance(resp.body, bytes)
        value = json.loads(resp.body)
        self.assertEqual(value["entry"][599]["fullUrl"], f"{GW}/Patient/599")
        self.assertNotIn(UP.encode(), resp.body)

    def test_chunked_bundle_is_rewritten(self):
        self.upstream.chunked = True
        self.upstream.body = json.dumps(bundle()).encode()
        resp = self.handle(fhir_request("GET", "Patient"))
        self.assertEqual(json.loads(resp.body)["link"][1]["url"], f"{GW}/Patient?name=x&_count=2&_offset=2")

    def test_over_max_rewrite_size_known_length_streams_untouched(self):
        backend = self.make_backend(max_rewrite_size=SMALL_BODY)
        raw = json.dumps(big_bundle()).encode()
        self.upstream.body = raw
        resp = self.handle(fhir_request("GET", "Patient"), backend)
        self.assertIsInstance(resp.body, Stream)
        d = collect(resp.body)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), raw)

    def test_over_max_rewrite_size_unknown_length_streams_untouched(self):
        backend = self.make_backend(max_rewrite_size=1000)
        raw = json.dumps(big_bundle(50)).encode()
        self.upstream.chunked = True
        self.upstream.body = raw
        resp = self.handle(fhir_request("GET", "Patient"), backend)
        self.assertIsInstance(resp.body, Stream)
        d = collect(resp.body)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), raw)

    def test_large_single_resource_streams(self):
        raw = json.dumps(big_bundle(type="collection")).encode()
        self.upstream.body = raw
        resp = self.handle(fhir_request("GET", "Bundle/big"))
        self.assertIsInstance(resp.body, Stream)
        d = collect(resp.body)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), raw)

    def test_upstream_lost_while_collecting_is_502(self):
        agent = AnsweringAgent(_BrokenResponse(b'{"resourceType":"Bundle","link":[{"url":"' + UP.encode()))
        d = self.make_backend(agent).handle(fhir_request("GET", "Patient"))
        self.failureResultOf(d, UpstreamUnavailable)


@implementer(IResponse)
class _BrokenResponse(FakeResponse):
    """
    A response of unknown length whose connection drops after C{body}.
    """

    def __init__(self, body):
        super().__init__(200, [(b"Content-Type", b"application/fhir+json")], body)
        self.length = UNKNOWN_LENGTH

    def deliverBody(self, protocol):
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ConnectionLost()))


class PrependTests(SynchronousTestCase):
    def test_head_then_rest(self):
        source = Stream()
        source.write(b"c")
        out = prepend([b"a", b"b"], source)
        d = collect(out)
        source.write(b"d")
        source.finish()
        self.assertEqual(self.successResultOf(d), b"abcd")

    def test_cancel_reaches_the_source(self):
        source = Stream()
        out = prepend([b"a"], source)
        out.cancel()
        self.assertTrue(source.cancelled)
        self.failureResultOf(source.read(), StreamCancelled)

    def test_source_error_reaches_the_consumer(self):
        source = Stream()
        out = prepend([b"a"], source)
        d = collect(out)
        source.fail(UpstreamUnavailable())
        self.failureResultOf(d, UpstreamUnavailable)

    def test_backpressure(self):
        source = Stream(high_water=10)
        out = prepend([], source)
        out.high_water, out.low_water = 4, 1
        for _ in range(5):
            source.write(b"xx")
        # The relay stops reading once the output is full.
        self.assertFalse(out.writable)
        self.assertTrue(len(source._buffer) > 0)
        source.finish()
        d = collect(out)
        self.assertEqual(self.successResultOf(d), b"xx" * 5)


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("GET", "", True),
        ("POST", "", True),
        ("GET", "metadata", True),
        ("GET", "Patient", True),
        ("POST", "Patient", False),
        ("PUT", "Patient", False),
        ("POST", "Patient/_search", True),
        ("GET", "Patient/_history", True),
        ("GET", "Patient/1", False),
        ("GET", "Patient/1/_history", True),
        ("GET", "Patient/1/_history/2", False),
        ("GET", "Patient/1/$everything", True),
        ("GET", "Patient/1/Observation", True),
        ("DELETE", "Patient/1", False),
    ],
)
def test_may_hold_links(method, path, expected):
    assert may_hold_links(method, [s for s in path.split("/") if s]) is expected


def test_fhir_json_media():
    assert fhir.fhir_json_media("application/fhir+json; charset=utf-8")
    assert fhir.fhir_json_media("application/json")
    assert not fhir.fhir_json_media("application/fhir+xml")
    assert not fhir.fhir_json_media("")


def test_recording_agent_sees_one_request_per_handle():
    agent = RecordingAgent()
    verifyObject(IAgent, agent)
    backend = FhirBackend("fhir", options(), BuildContext(reactor=Clock(), agent=agent))
    d = backend.handle(fhir_request("GET", "Patient"))
    assert len(agent.requests) == 1
    method, uri, headers, producer = agent.requests[0]
    assert (method, uri) == (b"GET", f"{UP}/Patient".encode())
    assert headers.getRawHeaders(b"accept") == [b"application/fhir+json"]
    assert producer is None
    d.cancel()
    assert isinstance(d, defer.Deferred)
