"""
The request id (L{harmony.http.request_id}): accepted from the client's
C{X-Request-ID} when valid, else generated; echoed in the response, kept
in the envelope's metadata and sent to HTTP backends exactly once.

Whole requests go through a gateway built from TOML, into a
L{harmony.http.site.HarmonySite} over a C{StringTransport}.
"""

import json

from _sitegateway import Gateway, is_generated, values
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from _fakes import make_request
from harmony.backends.http import forwarded_headers
from harmony.http import request_id


class RuleTests(SynchronousTestCase):
    def test_generated_ids(self):
        ids = {request_id.generate() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(is_generated(i) for i in ids))
        # The version and variant bits are set whatever the random bits.
        self.assertTrue(is_generated(request_id.generate(lambda n: (1 << n) - 1)))
        self.assertTrue(is_generated(request_id.generate(lambda n: 0)))
        self.assertEqual(request_id.generate(lambda n: 0), "00000000000040008000000000000000")

    def test_valid_ids_are_kept(self):
        for value in (b"a", b"abc-123", b"A.b_c:d-e", b"0" * 128, b"f47ac10b-58cc-4372-a567-0e02b2c3d479"):
            self.assertEqual(request_id.accept([value]), value.decode("ascii"))
        self.assertEqual(request_id.accept(["from-str"]), "from-str")

    def test_invalid_ids_are_replaced(self):
        for offered in (
            None,
            [],
            [b""],
            [b"0" * 129],
            [b"has space"],
            [b"a,b"],
            [b"semi;colon"],
            [b"slash/es"],
            [b"caf\xc3\xa9"],
            [b"new\nline"],
            [b"one", b"two"],  # two headers: which one? neither
            ["caf\u00e9"],
        ):
            self.assertTrue(is_generated(request_id.accept(offered)), offered)

    def test_for_request_decides_once(self):
        request = DummyRequest([b"x"])
        request.requestHeaders.setRawHeaders(b"X-Request-ID", [b"client-1"])
        self.assertEqual(request_id.for_request(request), "client-1")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-request-id"), [b"client-1"])
        request.requestHeaders.setRawHeaders(b"X-Request-ID", [b"changed"])
        self.assertEqual(request_id.for_request(request), "client-1")
        generated = DummyRequest([b"x"])
        rid = request_id.for_request(generated)
        self.assertTrue(is_generated(rid))
        self.assertEqual(request_id.for_request(generated), rid)


class ForwardedHeadersTests(SynchronousTestCase):
    def test_request_id_sent_once(self):
        details = make_request("GET", "x", headers=[("X-Request-ID", "client-1"), ("Accept", "*/*")]).details
        pairs = forwarded_headers(details, "client-1")
        self.assertEqual([v for k, v in pairs if k.lower() == b"x-request-id"], [b"client-1"])
        # An invalid id from the client was replaced: only ours goes on.
        details = make_request("GET", "x", headers=[("X-Request-ID", "bad id")]).details
        pairs = forwarded_headers(details, "abc")
        self.assertEqual([v for k, v in pairs if k.lower() == b"x-request-id"], [b"abc"])

    def test_without_request_id_headers_pass_as_before(self):
        details = make_request("GET", "x", headers=[("X-Request-ID", "client-1")]).details
        pairs = forwarded_headers(details)
        self.assertEqual([v for k, v in pairs if k.lower() == b"x-request-id"], [b"client-1"])


class ThroughTheSiteTests(SynchronousTestCase):
    def setUp(self):
        self.gateway = Gateway(self)

    def test_client_id_is_echoed_and_kept(self):
        status, headers, body = self.gateway.request(b"GET", b"/echo/x", [(b"X-Request-ID", b"trace-42")])
        self.assertEqual(status, 200)
        self.assertEqual(values(headers, b"x-request-id"), [b"trace-42"])
        self.assertEqual(json.loads(body)["metadata"]["request_id"], "trace-42")

    def test_generated_when_missing_or_invalid(self):
        for headers in ([], [(b"X-Request-ID", b"not valid!")], [(b"X-Request-ID", b"x" * 129)]):
            status, out, body = self.gateway.request(b"GET", b"/echo/x", headers)
            self.assertEqual(status, 200)
            [rid] = values(out, b"x-request-id")
            self.assertTrue(is_generated(rid.decode("ascii")), rid)
            self.assertEqual(json.loads(body)["metadata"]["request_id"], rid.decode("ascii"))

    def test_errors_carry_the_id_too(self):
        for method, target in ((b"GET", b"/nowhere"), (b"PROPFIND", b"/echo/x"), (b"GET", b"/echo/%2e%2e/x")):
            status, headers, _ = self.gateway.request(method, target, [(b"X-Request-ID", b"err-1")])
            self.assertIn(status, (400, 404, 405))
            self.assertEqual(values(headers, b"x-request-id"), [b"err-1"], target)

    def test_refused_body_carries_the_id(self):
        status, headers, _ = self.gateway.request(b"POST", b"/echo/x", [(b"X-Request-ID", b"big-1")], b"x" * 1001)
        self.assertEqual(status, 413)
        self.assertEqual(values(headers, b"x-request-id"), [b"big-1"])

    def test_upstream_gets_exactly_one_id(self):
        cases = (
            ([(b"X-Request-ID", b"trace-7")], b"trace-7"),
            ([(b"X-Request-ID", b"bad id")], None),
            ([], None),
        )
        for sent, expected in cases:
            status, headers, body = self.gateway.request(b"GET", b"/api/x", sent)
            self.assertEqual((status, body), (200, b"upstream"))
            [ours] = values(headers, b"x-request-id")  # not the upstream's own
            seen = self.gateway.upstream.requests[-1].requestHeaders.getRawHeaders(b"x-request-id")
            self.assertEqual(seen, [ours])
            if expected is not None:
                self.assertEqual(ours, expected)
            else:
                self.assertTrue(is_generated(ours.decode("ascii")))
