"""
Tests for L{harmony.envelope}.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from harmony.envelope import (
    DicomRequest,
    Headers,
    RequestDetails,
    RequestEnvelope,
    ResponseEnvelope,
    body_length,
    media_type,
)
from harmony.errors import BadRequest, PayloadTooLarge
from harmony.streams import Stream


class HeadersTests(SynchronousTestCase):
    def test_multi_valued_case_insensitive(self):
        h = Headers([("Accept", "a/b"), ("X-Id", "1"), ("accept", "c/d")])
        self.assertEqual(h.get("ACCEPT"), "a/b")
        self.assertEqual(h.get_all("accept"), ["a/b", "c/d"])
        self.assertIn("x-id", h)
        self.assertNotIn("x-other", h)
        self.assertIsNone(h.get("missing"))
        self.assertEqual(h.get("missing", "d"), "d")
        self.assertEqual(len(h), 3)

    def test_names_keep_spelling_and_order(self):
        h = Headers([("X-Custom", "1"), ("Accept", "a"), ("x-custom", "2")])
        self.assertEqual(h.names(), ["X-Custom", "Accept"])
        self.assertEqual(list(h), [("X-Custom", "1"), ("Accept", "a"), ("x-custom", "2")])
        self.assertEqual(h.items(), list(h))

    def test_add_set_setdefault_remove(self):
        h = Headers()
        h.add("Via", "a")
        h.add("via", "b")
        self.assertEqual(h.get_all("VIA"), ["a", "b"])
        h.set("VIA", 3)
        self.assertEqual(h.items(), [("VIA", "3")])
        h.setdefault("via", "ignored")
        h.setdefault("X-New", "n")
        self.assertEqual(h.items(), [("VIA", "3"), ("X-New", "n")])
        h.remove("x-NEW")
        self.assertEqual(h.items(), [("VIA", "3")])

    def test_construct_from_dict_and_headers(self):
        h = Headers({"A": ["1", "2"], "B": "3"})
        self.assertEqual(h.items(), [("A", "1"), ("A", "2"), ("B", "3")])
        copy = Headers(h)
        self.assertEqual(copy, h)
        copy.add("C", "4")
        self.assertNotEqual(copy, h)
        self.assertEqual(len(h), 3)
        c2 = h.copy()
        c2.remove("A")
        self.assertEqual(h.get_all("a"), ["1", "2"])

    def test_as_dict_joins_values(self):
        h = Headers([("Accept", "a"), ("X-One", "1"), ("ACCEPT", "b")])
        self.assertEqual(h.as_dict(), {"accept": "a, b", "x-one": "1"})

    def test_repr_hides_values(self):
        h = Headers([("Authorization", "Bearer s3cr3t"), ("X-Patient", "MRN-42")])
        text = repr(h)
        self.assertIn("Authorization", text)
        self.assertNotIn("s3cr3t", text)
        self.assertNotIn("MRN-42", text)
        details = RequestDetails(method="GET", headers=h)
        self.assertNotIn("s3cr3t", repr(details))

    def test_details_convert_headers(self):
        details = RequestDetails(method="GET", headers=[("A", "1")])
        self.assertIsInstance(details.headers, Headers)
        self.assertEqual(details.headers.get("a"), "1")


def _request(body, content_type=None):
    headers = [("Content-Type", content_type)] if content_type is not None else []
    return RequestEnvelope(details=RequestDetails(method="POST", headers=headers), body=body)


class ParseBodyTests(SynchronousTestCase):
    def test_media_type(self):
        self.assertEqual(media_type("Application/JSON; charset=utf-8"), "application/json")
        self.assertEqual(media_type(""), "")
        self.assertEqual(media_type(None), "")

    def test_valid_json(self):
        env = _request(b'{"a": [1, 2]}', "application/json; charset=utf-8")
        self.assertFalse(env.parsed)
        self.assertIsNone(env.normalized)
        self.assertEqual(self.successResultOf(env.parse_body()), {"a": [1, 2]})
        self.assertEqual(env.normalized, {"a": [1, 2]})
        self.assertTrue(env.parsed)
        self.assertEqual(env.body, b'{"a": [1, 2]}')

    def test_plus_json_and_no_content_type(self):
        for ctype in ("application/fhir+json", "application/vnd.x+json", None):
            env = _request(b"[1]", ctype)
            self.assertEqual(self.successResultOf(env.parse_body()), [1], ctype)

    def test_parse_once(self):
        env = _request(b'{"a": 1}', "application/json")
        self.successResultOf(env.parse_body())
        env.normalized = {"replaced": True}
        self.assertEqual(self.successResultOf(env.parse_body()), {"replaced": True})

    def test_malformed_json(self):
        env = _request(b'{"a": 1,\n  "b": }', "application/json")
        f = self.failureResultOf(env.parse_body(), BadRequest)
        self.assertEqual(f.value.status, 400)
        self.assertIn("line 2", f.value.message)
        self.assertIn("column", f.value.message)
        self.assertTrue(f.value.message.startswith("Malformed JSON body"))

    def test_invalid_utf8_json(self):
        env = _request(b'"\xff\xfe"', "application/json")
        f = self.failureResultOf(env.parse_body(), BadRequest)
        self.assertIn("UTF-8", f.value.message)

    def test_unknown_content_type(self):
        raw = b"\x00\x01<xml/>\xff"
        env = _request(raw, "application/x-unknown")
        self.assertIsNone(self.successResultOf(env.parse_body()))
        self.assertTrue(env.parsed)
        self.assertIs(env.body, raw)

    def test_unknown_type_stream_is_not_read(self):
        s = Stream()
        s.write(b"data")
        env = _request(s, "text/plain")
        self.assertIsNone(self.successResultOf(env.parse_body()))
        self.assertIs(env.body, s)
        self.assertFalse(s.cancelled)

    def test_empty_json_body(self):
        env = _request(b"  \n", "application/json")
        self.assertIsNone(self.successResultOf(env.parse_body()))
        self.assertTrue(env.parsed)

    def test_stream_body_collected(self):
        s = Stream()
        env = _request(s, "application/json")
        d = env.parse_body()
        self.assertNoResult(d)
        s.write(b'{"k":')
        s.write(b' "v"}')
        s.finish()
        self.assertEqual(self.successResultOf(d), {"k": "v"})
        self.assertEqual(env.body, b'{"k": "v"}')

    def test_max_size(self):
        env = _request(b'{"a": "0123456789"}', "application/json")
        f = self.failureResultOf(env.parse_body(max_body_size=10), PayloadTooLarge)
        self.assertEqual(f.value.status, 413)

    def test_max_size_stream(self):
        s = Stream()
        env = _request(s, "application/json")
        d = env.parse_body(max_body_size=4)
        s.write(b"[1,2,3]")
        self.failureResultOf(d, PayloadTooLarge)
        self.assertTrue(s.cancelled)

    def test_response_parse_body(self):
        resp = ResponseEnvelope(headers=[("content-type", "application/json")], body=b'{"ok":true}')
        self.assertEqual(self.successResultOf(resp.parse_body()), {"ok": True})


class ResponseEnvelopeTests(SynchronousTestCase):
    def test_json(self):
        resp = ResponseEnvelope.json(201, {"name": "Zoë", "n": [1]}, headers=[("Location", "/x")])
        self.assertEqual(resp.status, 201)
        self.assertEqual(resp.content_type, "application/json")
        self.assertEqual(resp.headers.get("location"), "/x")
        self.assertEqual(json.loads(resp.body.decode("utf-8")), {"name": "Zoë", "n": [1]})
        self.assertIn("Zoë".encode("utf-8"), resp.body)
        self.assertTrue(resp.parsed)
        self.assertEqual(resp.normalized, {"name": "Zoë", "n": [1]})

    def test_json_replaces_content_type(self):
        resp = ResponseEnvelope.json(
            200, {}, headers=[("Content-Type", "text/plain")], content_type="application/fhir+json"
        )
        self.assertEqual(resp.headers.get_all("content-type"), ["application/fhir+json"])

    def test_body_length(self):
        self.assertEqual(body_length(None), 0)
        self.assertEqual(body_length(b"abc"), 3)
        self.assertEqual(body_length(Stream(length=9)), 9)
        self.assertIsNone(body_length(Stream()))

    def test_dicom_request_validates_operation(self):
        self.assertEqual(DicomRequest("find").operation, "find")
        self.assertRaises(ValueError, DicomRequest, "delete")
