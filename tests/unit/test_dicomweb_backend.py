"""
Tests for the C{dicomweb} backend (L{harmony.backends.dicomweb}): requests
forwarded untouched, the upstream's URLs in headers and in DICOM JSON/XML
bodies rewritten to Harmony's while the body streams, everything else
byte-exact.
"""

import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from _fakes import AnsweringAgent, FakePushProducer, FakeResponse, make_request
from harmony.backends.dicomweb import OPTIONS, DicomwebBackend, UrlRewriter, rewritable, upstream_bases
from harmony.backends.http import SMALL_BODY, HttpBackend
from harmony.config import ConfigError
from harmony.config.schema import Where
from harmony.errors import UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.registry import BuildContext
from harmony.streams import Stream, StreamCancelled, collect

UP = "http://up.test:8042/dicom-web"
GW = "http://gw.test:8080/dicomweb"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"
DICOM_JSON = b"application/dicom+json"
XML_MULTIPART = b'multipart/related; type="application/dicom+xml"; boundary=b0'
DICOM_MULTIPART = b'multipart/related; type="application/dicom"; boundary=b0'


class Upstream(Resource):
    """
    A twisted.web DICOMweb upstream stand-in recording what it receives.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status = 200
        self.headers = [(b"Content-Type", DICOM_JSON)]
        self.body = b"[]"
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


@implementer(IResponse)
class PushedResponse(FakeResponse):
    """
    A response of unknown length whose body the test pushes chunk by chunk
    through C{push} / C{end}; C{transport} records pause/resume/stop.
    """

    def __init__(self, code=200, headers=(), length=UNKNOWN_LENGTH):
        super().__init__(code, headers, b"")
        self.length = length
        self.transport = FakePushProducer()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def push(self, *chunks):
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def end(self, reason=None):
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


def sized_answer(body, ctype=DICOM_JSON):
    """
    An agent answering C{body} with a C{Content-Length} header.
    """
    return AnsweringAgent(FakeResponse(200, [(b"Content-Type", ctype), (b"Content-Length", b"%d" % len(body))], body))


def options(**kw):
    kw.setdefault("base_url", UP)
    return OPTIONS.validate(kw, Where("test.toml", ("backends", "pacs", "options")))


def dw_request(
    method="GET",
    path="studies",
    body=b"",
    headers=(("Host", "gw.test:8080"),),
    query_string="",
    base_url="http://gw.test:8080",
    prefix="/dicomweb",
    scheme="http",
):
    return make_request(
        method,
        path,
        headers=headers,
        body=body,
        query_string=query_string,
        base_url=base_url,
        prefix=prefix,
        scheme=scheme,
        client=("10.0.0.7", 50000),
    )


def qido(base=UP, n=2):
    return [
        {
            "0020000D": {"vr": "UI", "Value": [f"{STUDY}.{i}"]},
            "00081190": {"vr": "UR", "Value": [f"{base}/studies/{STUDY}.{i}"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]},
        }
        for i in range(n)
    ]


def metadata(base=UP):
    instance = f"{base}/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
    return [
        {
            "00080018": {"vr": "UI", "Value": [SOP]},
            "7FE00010": {"vr": "OW", "BulkDataURI": f"{instance}/bulk/7FE00010"},
            "00282000": {"vr": "OB", "BulkDataURI": f"{instance}/bulk/00282000?offset=0"},
            "00081190": {"vr": "UR", "Value": [instance]},
        }
    ]


def xml_multipart(base=UP):
    part = (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n'
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00081190" vr="UR" keyword="RetrieveURL">'
        f'<Value number="1">{base}/studies/{STUDY}</Value></DicomAttribute>'
        '<DicomAttribute tag="7FE00010" vr="OW" keyword="PixelData">'
        f'<BulkData uri="{base}/studies/{STUDY}/series/{SERIES}/instances/{SOP}/bulk/7FE00010"/>'
        "</DicomAttribute></NativeDicomModel>"
    )
    return b"--b0\r\nContent-Type: application/dicom+xml\r\n\r\n" + part.encode() + b"\r\n--b0--\r\n"


class _Base(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.upstream = Upstream()
        self.agent = RequestTraversalAgent(self.upstream)
        self.backend = self.make_backend()

    def make_backend(self, agent=None, **kw):
        backend = DicomwebBackend("pacs", options(**kw), BuildContext(reactor=self.clock, agent=agent or self.agent))
        verifyObject(IBackend, backend)
        return backend

    def handle(self, envelope, backend=None):
        d = (backend or self.backend).handle(envelope)
        self.agent.flush()
        return self.successResultOf(d)

    def answer(self, body, ctype=DICOM_JSON, headers=(), status=200):
        self.upstream.status = status
        self.upstream.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.upstream.headers = [(b"Content-Type", ctype), *headers]

    def body_of(self, resp):
        if isinstance(resp.body, Stream):
            d = collect(resp.body)
            self.agent.flush()
            return self.successResultOf(d)
        return resp.body

    def pushed(self, ctype=DICOM_JSON, env=None, backend=None, **kw):
        """
        Handle a request answered by a L{PushedResponse}: (response envelope, upstream response).
        """
        upstream = PushedResponse(200, [(b"Content-Type", ctype)], **kw)
        backend = backend or self.make_backend(AnsweringAgent(upstream))
        resp = self.successResultOf(backend.handle(env or dw_request()))
        return resp, upstream


# -- service and requests ---------------------------------------------------------------


class ServiceTests(_Base):
    def test_is_an_http_backend(self):
        self.assertIsInstance(self.backend, HttpBackend)
        self.assertEqual(self.backend.service_type, "dicomweb")

    def test_options(self):
        self.assertEqual(options().upstream_base_urls, ())
        self.assertEqual(
            options(upstream_base_urls=["https://pacs.example.org/dw"]).upstream_base_urls[0],
            "https://pacs.example.org/dw",
        )
        with pytest.raises(ConfigError):
            options(max_rewrite_size=10)
        with pytest.raises(ConfigError):
            options(upstream_base_urls=["ftp://x"])

    def test_requests_pass_through(self):
        env = dw_request(
            "POST",
            f"studies/{STUDY}",
            b"--b0\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b0--\r\n",
            headers=[
                ("Host", "gw.test:8080"),
                ("Accept", "application/dicom+xml"),
                ("Content-Type", DICOM_MULTIPART.decode()),
            ],
        )
        self.handle(env)
        req = self.upstream.requests[0]
        self.assertEqual(req.uri, f"/dicom-web/studies/{STUDY}".encode())
        self.assertEqual(req.requestHeaders.getRawHeaders(b"accept"), [b"application/dicom+xml"])
        self.assertEqual(req.requestHeaders.getRawHeaders(b"content-type"), [DICOM_MULTIPART])
        self.assertEqual(self.upstream.received_body, env.body)
        self.assertEqual(req.requestHeaders.getRawHeaders(b"x-forwarded-host"), [b"gw.test:8080"])

    def test_upstream_is_asked_for_identity_encoding(self):
        # A gzipped answer could not be rewritten (dicomweb-client, as any
        # requests-based client, sends "Accept-Encoding: gzip, deflate").
        self.handle(dw_request(headers=[("Host", "gw.test:8080"), ("Accept-Encoding", "gzip, deflate")]))
        self.assertEqual(self.upstream.requests[0].requestHeaders.getRawHeaders(b"accept-encoding"), [b"identity"])

    def test_encoded_wildcards_are_sent_decoded(self):
        # Orthanc 1.10 matches "%2A" literally; structure stays encoded.
        self.handle(dw_request(query_string="PatientName=DOE%2A&ModalitiesInStudy=CT%2CMR&x=%26%3D%2B%25&y=%C3%A9"))
        self.assertEqual(
            self.upstream.requests[0].uri,
            b"/dicom-web/studies?PatientName=DOE*&ModalitiesInStudy=CT,MR&x=%26%3D%2B%25&y=%C3%A9",
        )

    def test_query_passes_through(self):
        self.handle(dw_request(query_string="PatientID=1&includefield=all&limit=10"))
        self.assertEqual(self.upstream.requests[0].uri, b"/dicom-web/studies?PatientID=1&includefield=all&limit=10")

    def test_error_statuses_and_bodies_pass_through(self):
        for status, body in ((404, b'{"error":"Unknown resource"}'), (406, b"Not acceptable"), (400, b"")):
            self.answer(body, b"application/json" if body.startswith(b"{") else b"text/plain", status=status)
            resp = self.handle(dw_request(path=f"studies/{STUDY}/metadata"))
            self.assertEqual((resp.status, self.body_of(resp)), (status, body))


# -- headers ------------------------------------------------------------------------------------


class HeaderTests(_Base):
    def test_location_and_content_location(self):
        self.answer(
            b"",
            headers=[
                (b"Location", f"{UP}/studies/{STUDY}".encode()),
                (b"Content-Location", f"{UP}?x=1".encode()),
            ],
        )
        resp = self.handle(dw_request("POST", "studies", b"x", [("Host", "gw.test:8080"), ("Content-Type", "a/b")]))
        self.assertEqual(resp.headers.get("location"), f"{GW}/studies/{STUDY}")
        self.assertEqual(resp.headers.get("content-location"), f"{GW}?x=1")

    def test_content_location_on_binary_response(self):
        self.answer(b"\x00\x01", b"application/octet-stream", headers=[(b"Content-Location", UP.encode())])
        resp = self.handle(dw_request(path=f"studies/{STUDY}/series/{SERIES}/instances/{SOP}/frames/1"))
        self.assertEqual(resp.headers.get("content-location"), GW)
        self.assertEqual(resp.body, b"\x00\x01")

    def test_other_locations_untouched(self):
        for location in (f"studies/{STUDY}", "http://elsewhere.test/dicom-web/studies", f"{UP}x/studies"):
            self.answer(b"", headers=[(b"Content-Location", location.encode())])
            resp = self.handle(dw_request())
            self.assertEqual(resp.headers.get("content-location"), location)

    def test_no_public_base_no_rewriting(self):
        self.answer(qido(), headers=[(b"Content-Location", UP.encode())])
        resp = self.handle(dw_request(base_url=""))
        self.assertEqual(resp.headers.get("content-location"), UP)
        self.assertEqual(json.loads(resp.body), qido())


# -- bodies --------------------------------------------------------------------------------------


class BodyTests(_Base):
    def test_qido_retrieve_urls(self):
        self.answer(qido())
        resp = self.handle(dw_request(query_string="PatientID=1"))
        self.assertEqual(json.loads(resp.body), qido(GW))
        self.assertNotIn(b"up.test", resp.body)

    def test_metadata_bulk_data_uris(self):
        self.answer(metadata(), b"application/dicom+json; charset=utf-8")
        resp = self.handle(dw_request(path=f"studies/{STUDY}/metadata"))
        self.assertEqual(json.loads(resp.body), metadata(GW))

    def test_plain_json(self):
        self.answer(qido(), b"application/json")
        self.assertEqual(json.loads(self.handle(dw_request()).body), qido(GW))

    def test_escaped_slashes(self):
        raw = json.dumps(qido()).replace("/", "\\/").encode()
        self.assertIn(b"http:\\/\\/up.test:8042\\/dicom-web\\/studies", raw)
        self.answer(raw)
        body = self.handle(dw_request()).body
        self.assertIn(b"http:\\/\\/gw.test:8080\\/dicomweb\\/studies", body)
        self.assertEqual(json.loads(body), qido(GW))

    def test_xml_multipart(self):
        self.answer(xml_multipart(), XML_MULTIPART)
        accept = 'multipart/related; type="application/dicom+xml"'
        resp = self.handle(dw_request(headers=[("Host", "gw.test:8080"), ("Accept", accept)]))
        self.assertEqual(resp.body, xml_multipart(GW))
        # The namespace URI (not the upstream) is untouched.
        self.assertIn(b'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"', resp.body)

    def test_dicom_xml(self):
        body = xml_multipart().split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--b0", 1)[0]
        self.answer(body, b"application/dicom+xml")
        self.assertEqual(self.handle(dw_request()).body, body.replace(UP.encode(), GW.encode()))

    def test_instances_pass_byte_exact(self):
        # Instance bytes that happen to hold the upstream URL in a string context stay as they are.
        part = b'DICM\x02\x00"' + UP.encode() + b'/studies/x"\x00>' + UP.encode() + b"<"
        body = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b0--\r\n"
        for ctype in (DICOM_MULTIPART, b"application/dicom", b"application/octet-stream", b"image/jpeg", b"text/plain"):
            agent = AnsweringAgent(
                FakeResponse(200, [(b"Content-Type", ctype), (b"Content-Length", b"%d" % len(body))], body)
            )
            resp = self.successResultOf(self.make_backend(agent).handle(dw_request(path=f"studies/{STUDY}")))
            self.assertEqual(resp.body, body, ctype)
            self.assertEqual(resp.headers.get("content-length"), str(len(body)))

    def test_only_string_starts_are_rewritten(self):
        raw = json.dumps(
            [
                {"00081190": {"vr": "UR", "Value": [UP]}},  # the bare base, followed by a quote
                {"00104000": {"vr": "LT", "Value": [f"see {UP}/studies"]}},  # not at the start of a string
                {"00081190": {"vr": "UR", "Value": [f"{UP}x/studies"]}},  # another base
                {"00081190": {"vr": "UR", "Value": [f"{UP}?x=1"]}},
            ]
        ).encode()
        self.answer(raw)
        value = json.loads(self.handle(dw_request()).body)
        self.assertEqual(value[0]["00081190"]["Value"], [GW])
        self.assertEqual(value[1]["00104000"]["Value"], [f"see {UP}/studies"])
        self.assertEqual(value[2]["00081190"]["Value"], [f"{UP}x/studies"])
        self.assertEqual(value[3]["00081190"]["Value"], [f"{GW}?x=1"])

    def test_content_length_of_small_bodies(self):
        raw = json.dumps(qido()).encode()
        resp = self.successResultOf(self.make_backend(sized_answer(raw)).handle(dw_request()))
        self.assertEqual(resp.headers.get_all("content-length"), [str(len(resp.body))])
        self.assertNotEqual(len(resp.body), len(raw))
        # Nothing to rewrite: the original length stays.
        raw = json.dumps(qido("http://other.test")).encode()
        resp = self.successResultOf(self.make_backend(sized_answer(raw)).handle(dw_request()))
        self.assertEqual((resp.body, resp.headers.get_all("content-length")), (raw, [str(len(raw))]))

    def test_head_drops_the_length_of_rewritten_types(self):
        self.answer(b"", headers=[(b"Content-Location", UP.encode())])
        resp = self.handle(dw_request("HEAD"))
        self.assertEqual(resp.headers.get("content-location"), GW)
        self.assertNotIn("content-length", resp.headers)

    def test_upstream_aliases(self):
        backend = self.make_backend(upstream_base_urls=["https://pacs.example.org/wado/rs/"])
        self.answer(qido("https://pacs.example.org/wado/rs"))
        self.assertEqual(json.loads(self.handle(dw_request(), backend).body), qido(GW))

    def test_upstream_base_without_path(self):
        backend = self.make_backend(base_url="http://up.test:8042/")
        self.answer(qido("http://up.test:8042"))
        self.assertEqual(json.loads(self.handle(dw_request(), backend).body), qido(GW))
        self.assertEqual(self.upstream.requests[-1].uri, b"/studies")


class PublicBaseTests(_Base):
    def test_prefix(self):
        self.answer(qido())
        body = self.handle(dw_request(prefix="/dicomweb/")).body
        self.assertEqual(json.loads(body), qido(GW))

    def test_root_prefix(self):
        self.answer(qido())
        body = self.handle(dw_request(prefix="/")).body
        self.assertEqual(json.loads(body), qido("http://gw.test:8080"))

    def test_public_base_url_configured(self):
        # base_url comes from [proxy] public_base_url; the client's Host differs.
        public = "https://gw.example.org/dicomweb"
        for base in (UP, "https://gw.test:8080/dicom-web", 'http://"gw.test:8080"/dicom-web'):
            self.answer(qido(base))
            resp = self.handle(dw_request(base_url="https://gw.example.org"))
            self.assertEqual(json.loads(resp.body), qido(public), base)

    def test_urls_built_from_forwarded_headers(self):
        # Orthanc 1.7 builds {proto}://{host of the first Forwarded element, quotes kept}{root}.
        for base in (
            'http://"gw.test:8080"/dicom-web',
            "http://gw.test:8080/dicom-web",
            "https://gw.test:8080/dicom-web",
            "https://up.test:8042/dicom-web",
        ):
            self.answer(qido(base))
            self.assertEqual(json.loads(self.handle(dw_request()).body), qido(GW), base)
            self.answer(xml_multipart(base), XML_MULTIPART)
            self.assertEqual(self.handle(dw_request()).body, xml_multipart(GW), base)

    def test_first_forwarded_element_of_earlier_proxies(self):
        headers = [("Host", "gw.test:8080"), ("Forwarded", 'for=1.1.1.1;host="lb.example.org";proto=https')]
        self.answer(qido('https://"lb.example.org"/dicom-web'))
        body = self.handle(dw_request(headers=headers, base_url="https://lb.example.org")).body
        self.assertEqual(json.loads(body), qido("https://lb.example.org/dicomweb"))

    def test_public_base_equal_to_a_target(self):
        # Harmony's prefix is the upstream's root on the same host: the URLs are already right.
        self.answer(qido("http://gw.test:8080/dicom-web"))
        body = self.handle(dw_request(prefix="/dicom-web")).body
        self.assertEqual(json.loads(body), qido("http://gw.test:8080/dicom-web"))


# -- streaming ----------------------------------------------------------------------------------


class StreamTests(_Base):
    def test_large_body_streams_rewritten_without_length(self):
        raw = json.dumps(qido(n=2000)).encode()
        self.assertGreater(len(raw), SMALL_BODY)
        self.answer(raw)
        resp = self.handle(dw_request())
        self.assertIsInstance(resp.body, Stream)
        self.assertIsNone(resp.body.length)
        self.assertNotIn("content-length", resp.headers)
        self.assertEqual(json.loads(self.body_of(resp)), qido(GW, n=2000))
        # A known upstream length is dropped too: the rewritten length differs.
        agent = AnsweringAgent(
            FakeResponse(200, [(b"Content-Type", DICOM_JSON), (b"Content-Length", b"%d" % len(raw))], raw)
        )
        resp = self.successResultOf(self.make_backend(agent).handle(dw_request()))
        self.assertIsInstance(resp.body, Stream)
        self.assertIsNone(resp.body.length)
        self.assertNotIn("content-length", resp.headers)
        self.assertEqual(json.loads(self.body_of(resp)), qido(GW, n=2000))

    def test_large_instance_streams_untouched_with_length(self):
        raw = b"\x00" * (SMALL_BODY + 10) + b'"' + UP.encode() + b'/"'
        agent = AnsweringAgent(
            FakeResponse(200, [(b"Content-Type", DICOM_MULTIPART), (b"Content-Length", b"%d" % len(raw))], raw)
        )
        resp = self.successResultOf(self.make_backend(agent).handle(dw_request(path=f"studies/{STUDY}")))
        self.assertIsInstance(resp.body, Stream)
        self.assertEqual(resp.body.length, len(raw))
        self.assertEqual(resp.headers.get("content-length"), str(len(raw)))
        self.assertEqual(self.body_of(resp), raw)

    def test_chunked_body(self):
        self.upstream.chunked = True
        self.answer(qido())
        self.assertEqual(json.loads(self.body_of(self.handle(dw_request()))), qido(GW))

    def test_needle_split_across_two_chunks(self):
        raw = json.dumps(qido()).encode()
        at = raw.index(b"up.test") + 3
        resp, upstream = self.pushed()
        d = collect(resp.body)
        upstream.push(raw[:at], raw[at:])
        upstream.end()
        self.assertEqual(json.loads(self.successResultOf(d)), qido(GW))

    def test_one_byte_at_a_time(self):
        for raw, ctype, expected in (
            (json.dumps(metadata()).encode(), DICOM_JSON, json.dumps(metadata(GW)).encode()),
            (
                json.dumps(qido()).replace("/", "\\/").encode(),
                DICOM_JSON,
                json.dumps(qido(GW)).replace("/", "\\/").encode(),
            ),
            (xml_multipart(), XML_MULTIPART, xml_multipart(GW)),
        ):
            resp, upstream = self.pushed(ctype)
            d = collect(resp.body)
            upstream.push(*(raw[i : i + 1] for i in range(len(raw))))
            upstream.end()
            self.assertEqual(self.successResultOf(d), expected)

    def test_every_split_point(self):
        raw = json.dumps(qido(n=1)).encode()
        expected = json.dumps(qido(GW, n=1)).encode()
        for at in range(1, len(raw)):
            resp, upstream = self.pushed()
            d = collect(resp.body)
            upstream.push(raw[:at], raw[at:])
            upstream.end()
            self.assertEqual(self.successResultOf(d), expected, at)

    def test_pushed_instances_byte_exact(self):
        raw = b'--b0\r\n\r\n"' + UP.encode() + b'/x"\r\n--b0--\r\n'
        resp, upstream = self.pushed(DICOM_MULTIPART)
        d = collect(resp.body)
        upstream.push(raw[:5], raw[5:])
        upstream.end()
        self.assertEqual(self.successResultOf(d), raw)

    def test_cancel_reaches_the_upstream(self):
        resp, upstream = self.pushed()
        upstream.push(b'[{"00081190":{"vr":"UR","Value":["' + UP.encode())
        resp.body.cancel()
        self.assertEqual(upstream.transport.stopped, 1)

    def test_cancel_while_waiting_for_room(self):
        resp, upstream = self.pushed()
        resp.body.high_water, resp.body.low_water = 10, 1
        upstream.push(b"x" * 1000, b"y" * 1000)
        resp.body.cancel()
        self.assertEqual(upstream.transport.stopped, 1)
        self.failureResultOf(resp.body.read(), StreamCancelled)

    def test_backpressure(self):
        resp, upstream = self.pushed()
        chunk = b'[{"00081190":{"vr":"UR","Value":["' + UP.encode() + b'/studies/1"]}}]' + b" " * 65000
        for _ in range(12):
            upstream.push(chunk)
        # Nobody reads: the rewritten stream fills, then the upstream connection is paused.
        self.assertFalse(resp.body.writable)
        self.assertTrue(upstream.transport.is_paused)
        d = collect(resp.body)
        self.assertFalse(upstream.transport.is_paused)
        upstream.end()
        expected = chunk.replace(UP.encode(), GW.encode()) * 12
        self.assertEqual(self.successResultOf(d), expected)

    def test_upstream_lost_mid_body(self):
        resp, upstream = self.pushed()
        d = collect(resp.body)
        upstream.push(b'[{"00081190":')
        upstream.end(Failure(ConnectionError()))
        self.failureResultOf(d, UpstreamUnavailable)


# -- the rewriter ------------------------------------------------------------------------------


class RewriterTests(SynchronousTestCase):
    def test_inactive(self):
        self.assertFalse(UrlRewriter([UP], "").active)
        self.assertFalse(UrlRewriter([], GW).active)
        self.assertFalse(UrlRewriter([GW + "/"], GW).active)

    def test_feed_holds_back_only_a_bounded_tail(self):
        rewriter = UrlRewriter([UP], GW)
        out = rewriter.feed(b"x" * 10000)
        self.assertGreater(len(out), 10000 - 100)
        self.assertLess(len(rewriter._carry), 100)
        self.assertEqual(out + rewriter.flush(), b"x" * 10000)

    def test_longest_base_wins(self):
        rewriter = UrlRewriter([UP, UP + "/wado"], GW)
        self.assertEqual(rewriter.rewrite_bytes(b'"' + UP.encode() + b'/wado/x"'), b'"' + GW.encode() + b'/x"')
        self.assertEqual(rewriter.url(UP + "/wado?x"), GW + "?x")

    def test_single_quotes_and_xml_escapes(self):
        rewriter = UrlRewriter(['http://"gw.test:8080"/dicom-web'], GW)
        data = b"<a href='http://&quot;gw.test:8080&quot;/dicom-web/x'/>"
        self.assertEqual(rewriter.rewrite_bytes(data), b"<a href='" + GW.encode() + b"/x'/>")

    def test_end_of_body_is_no_url_end(self):
        rewriter = UrlRewriter([UP], GW)
        data = b'"' + UP.encode()
        self.assertEqual(rewriter.feed(data) + rewriter.flush(), data)


def test_upstream_bases():
    sent = [
        (b"Host", b"gw.test:8080"),
        (b"X-Forwarded-Host", b"xf.test"),
        (b"Forwarded", b'for=1.1.1.1;host="lb.test";proto=https, for=2.2.2.2;host="gw.test:8080"'),
    ]
    bases = upstream_bases(UP + "/", ["https://alias.test/x/"], sent)
    for expected in (
        UP,
        "https://alias.test/x",
        "http://gw.test:8080/dicom-web",
        "https://up.test:8042/dicom-web",
        "https://xf.test/dicom-web",
        'https://"lb.test"/dicom-web',
        "https://lb.test/dicom-web",
    ):
        assert expected in bases
    assert not any('"gw.test:8080"' in b for b in bases)  # only the first Forwarded element counts


@pytest.mark.parametrize(
    "ctype, expected",
    [
        ("application/dicom+json", True),
        ("application/dicom+json; charset=utf-8", True),
        ("application/json", True),
        ("application/dicom+xml", True),
        ('multipart/related; type="application/dicom+xml"; boundary=x', True),
        ("multipart/related; boundary=x; type=application/dicom+xml", True),
        ('multipart/related; type="application/dicom"; boundary=x', False),
        ('multipart/related; type="application/octet-stream"; boundary=x', False),
        ("application/dicom", False),
        ("image/jpeg", False),
        ("", False),
    ],
)
def test_rewritable(ctype, expected):
    assert rewritable(ctype) is expected
