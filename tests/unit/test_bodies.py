"""
Tests for L{harmony.http.bodies}: every parser (valid, malformed, over each
limit, fed a byte at a time), the driver over bytes and streams (limits
while reading, bytes preserved for passthrough), and how envelopes, the
HTTP adapter, the pipeline and the echo backend use them.
"""

import hashlib
import json
import random
import tracemalloc

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from _fakes import make_request
from harmony.backends.echo import MAX_ECHO_BODY, EchoBackend
from harmony.config.model import CONTENT_LIMITS, PROXY
from harmony.config.schema import Options, Where
from harmony.envelope import RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, PayloadTooLarge
from harmony.http.adapter import HttpAdapter
from harmony.http.bodies import (
    BINARY,
    CSV,
    DEFAULT_LIMITS,
    FORM,
    JSON,
    MULTIPART,
    XML,
    ContentLimits,
    body_format,
    escape_formula,
    make_parser,
    parse,
    parse_bytes,
)
from harmony.http.routing import Route
from harmony.http.site import HarmonySite
from harmony.pipeline import PipelineExecutor
from harmony.streams import Stream, collect


def feed(content_type, data, limits=DEFAULT_LIMITS, step=1):
    """
    Run a parser over C{data} in chunks of C{step} bytes (default: a byte
    at a time).
    """
    parser = make_parser(content_type, limits)
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
    return parser.close()


def both(test, content_type, data, limits=DEFAULT_LIMITS):
    """
    The view of C{data} fed whole and a byte at a time (they must agree).
    """
    whole = parse_bytes(data, content_type, limits)
    test.assertEqual(feed(content_type, data, limits), whole)
    return whole


def rejected(test, content_type, data, limits=DEFAULT_LIMITS, step=None, same=True):
    """
    The L{BadRequest} message for C{data}, fed whole and byte-wise (the
    same message both ways, unless C{same} is false).
    """
    e1 = test.assertRaises(BadRequest, parse_bytes, data, content_type, limits)
    test.assertEqual(e1.status, 400)
    e2 = test.assertRaises(BadRequest, feed, content_type, data, limits, step or 1)
    if same:
        test.assertEqual(e1.message, e2.message)
    else:
        test.assertIn(e1.message.split(":")[0], e2.message)
    return e1.message


def byte_stream(data):
    """
    A stream delivering C{data} a byte at a time.
    """
    return Stream.from_iterable([data[i : i + 1] for i in range(len(data))])


class FormatTests(SynchronousTestCase):
    def test_formats(self):
        table = {
            None: JSON,
            "": JSON,
            "application/json; charset=utf-8": JSON,
            "application/fhir+json": JSON,
            "application/dicom+json": JSON,
            "application/vnd.api+json": JSON,
            "application/xml": XML,
            "text/xml; charset=iso-8859-1": XML,
            "application/soap+xml": XML,
            "application/fhir+xml": XML,
            "text/csv": CSV,
            "application/x-www-form-urlencoded": FORM,
            "multipart/form-data; boundary=x": MULTIPART,
            "image/png": BINARY,
            "image/svg+xml": BINARY,
            "video/mp4": BINARY,
            "audio/wav": BINARY,
            "application/pdf": BINARY,
            "application/octet-stream": BINARY,
            "application/dicom": BINARY,
            "text/plain": None,
            "multipart/related; type=application/dicom": None,
            "application/zip": None,
        }
        for content_type, kind in table.items():
            self.assertEqual(body_format(content_type), kind, content_type)

    def test_limits_from_config(self):
        options = CONTENT_LIMITS.validate({"max_csv_rows": 5}, Where("t.toml"))
        limits = ContentLimits.from_options(options)
        self.assertEqual(limits, ContentLimits(max_csv_rows=5))
        self.assertEqual(ContentLimits.from_options(None), DEFAULT_LIMITS)
        self.assertEqual(ContentLimits.from_options(options, max_body_size=7).max_body_size, 7)
        self.assertEqual(
            dict(CONTENT_LIMITS.validate({}, Where("t.toml"))),
            {k: getattr(DEFAULT_LIMITS, k) for k in dict(CONTENT_LIMITS.validate({}, Where("t.toml")))},
        )


class JsonTests(SynchronousTestCase):
    def test_types(self):
        data = b'{"s": "Zo\xc3\xab", "i": -3, "f": 2.5e3, "t": true, "n": null, "a": [1, {"b": []}], "o": {}}'
        self.assertEqual(
            both(self, "application/json", data),
            {"s": "Zoë", "i": -3, "f": 2500.0, "t": True, "n": None, "a": [1, {"b": []}], "o": {}},
        )
        for scalar, value in ((b"1", 1), (b'"x"', "x"), (b"null", None), (b"[]", [])):
            self.assertEqual(both(self, None, scalar), value)

    def test_fhir_and_dicom_json(self):
        self.assertEqual(both(self, "application/fhir+json", b'{"resourceType":"Patient"}'), {"resourceType": "Patient"})
        self.assertEqual(both(self, "application/dicom+json", b'[{"00100010":{"vr":"PN"}}]'), [{"00100010": {"vr": "PN"}}])

    def test_empty(self):
        self.assertIsNone(both(self, "application/json", b""))
        self.assertIsNone(both(self, "application/json", b" \r\n\t"))

    def test_malformed(self):
        message = rejected(self, "application/json", b'{"a": 1,\n "b": }')
        self.assertEqual(message, "Malformed JSON body: Expecting value at line 2 column 7")
        self.assertIn("not valid UTF-8", rejected(self, "application/json", b'"\xff"'))
        self.assertIn("Malformed JSON body", rejected(self, None, b"plain text"))

    def test_deep_nesting_is_400(self):
        self.assertIn("Malformed JSON body", rejected(self, None, b"[" * 200000, step=65536))


class XmlTests(SynchronousTestCase):
    def test_document(self):
        data = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b"<!-- a comment -->\n"
            b'<Patient id="p1" active="true">\n'
            b"  <name><family>Smith</family><given>Ann</given><given>Marie</given></name>\n"
            b"  <note>  trimmed  </note>\n"
            b'  <empty/><blank>   </blank><attr only="1"/>\n'
            b"  <code>a &amp; b &lt;c&gt; &#233;<![CDATA[ <raw> ]]></code>\n"
            b"  <?pi ignored?>\n"
            b"</Patient>\n"
        )
        self.assertEqual(
            both(self, "application/xml", data),
            {
                "Patient": {
                    "@id": "p1",
                    "@active": "true",
                    "name": {"family": "Smith", "given": ["Ann", "Marie"]},
                    "note": "trimmed",
                    "empty": None,
                    "blank": None,
                    "attr": {"@only": "1"},
                    "code": "a & b <c> é <raw>",
                }
            },
        )

    def test_repeated_children_are_arrays_in_document_order(self):
        data = b"<r><a>1</a><b>x</b><a>2</a><a><c>3</c></a></r>"
        self.assertEqual(both(self, "text/xml", data), {"r": {"a": ["1", "2", {"c": "3"}], "b": "x"}})

    def test_text_next_to_children_and_attributes(self):
        data = b'<p lang="en">Hello <b>bold</b> world</p>'
        self.assertEqual(both(self, "text/xml", data), {"p": {"@lang": "en", "b": "bold", "#text": "Hello  world"}})

    def test_namespaces_kept_as_written(self):
        data = (
            b'<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope" xmlns="urn:hl7-org:v3">'
            b'<soap:Body><ClinicalDocument xsi:type="x" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>'
            b"</soap:Body></soap:Envelope>"
        )
        self.assertEqual(
            both(self, "application/soap+xml", data),
            {
                "soap:Envelope": {
                    "@xmlns:soap": "http://www.w3.org/2003/05/soap-envelope",
                    "@xmlns": "urn:hl7-org:v3",
                    "soap:Body": {
                        "ClinicalDocument": {
                            "@xsi:type": "x",
                            "@xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
                        }
                    },
                }
            },
        )

    def test_declared_encoding(self):
        data = '<?xml version="1.0" encoding="ISO-8859-1"?><n>Zoë</n>'.encode("latin-1")
        self.assertEqual(both(self, "text/xml", data), {"n": "Zoë"})

    def test_empty(self):
        self.assertIsNone(both(self, "application/xml", b""))
        self.assertIsNone(both(self, "application/xml", b"  \n "))

    def test_malformed(self):
        self.assertEqual(
            rejected(self, "application/xml", b"<a>\n<b></a>"),
            "Malformed XML body: mismatched tag at line 2 column 5",
        )
        self.assertIn("Malformed XML body: no element found", rejected(self, "application/xml", b"<a><b>"))
        self.assertIn("Malformed XML body: junk after document element", rejected(self, "text/xml", b"<a/><b/>"))
        self.assertIn("Malformed XML body: not well-formed", rejected(self, "text/xml", b"{not xml}"))
        self.assertIn("Malformed XML body: undefined entity", rejected(self, "text/xml", b"<a>&nope;</a>"))

    def test_depth(self):
        limits = ContentLimits(max_xml_depth=3)
        self.assertEqual(both(self, "text/xml", b"<a><b><c/></b></a>", limits), {"a": {"b": {"c": None}}})
        self.assertEqual(
            rejected(self, "text/xml", b"<a><b><c><d/></c></b></a>", limits), "XML nested deeper than 3 levels"
        )

    def test_depth_default_stops_early(self):
        # 100 levels are fine; the 101st stops the parse while feeding.
        self.assertIsNotNone(parse_bytes(b"<a>" * 100 + b"</a>" * 100, "text/xml"))
        parser = make_parser("text/xml")
        e = self.assertRaises(BadRequest, parser.feed, b"<a>" * 101)
        self.assertEqual(e.message, "XML nested deeper than 100 levels")

    def test_xxe_external_entity(self):
        data = (
            b'<?xml version="1.0"?>\n<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>\n'
            b"<foo>&xxe;</foo>"
        )
        message = rejected(self, "application/xml", data)
        self.assertIn("DTD", message)
        self.assertNotIn("root:", message)

    def test_xxe_parameter_entity(self):
        data = (
            b'<?xml version="1.0"?>\n<!DOCTYPE foo [ <!ENTITY % dtd SYSTEM "http://127.0.0.1:1/evil.dtd"> %dtd; ]>\n'
            b"<foo>x</foo>"
        )
        self.assertIn("DTD", rejected(self, "text/xml", data))

    def test_external_dtd(self):
        data = b'<?xml version="1.0"?>\n<!DOCTYPE foo SYSTEM "http://127.0.0.1:1/foo.dtd">\n<foo>x</foo>'
        self.assertIn("DTD", rejected(self, "text/xml", data))
        data = b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" "http://127.0.0.1:1/x.dtd"><html/>'
        self.assertIn("DTD", rejected(self, "application/xhtml+xml", data))

    def test_billion_laughs(self):
        data = b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
        previous = "lol"
        for i in range(1, 10):
            data += f' <!ENTITY lol{i} "{("&" + previous + ";") * 10}">\n'.encode()
            previous = f"lol{i}"
        data += b"]>\n<lolz>&lol9;</lolz>"
        self.assertIn("DTD", rejected(self, "text/xml", data))

    def test_quadratic_blowup_without_dtd_is_plain_error(self):
        # Entity references need a declaration: without a DTD there is none.
        self.assertIn("undefined entity", rejected(self, "text/xml", b"<a>" + b"&x;" * 1000 + b"</a>", step=4096))


class CsvTests(SynchronousTestCase):
    def test_rows(self):
        data = (
            b"\xef\xbb\xbfid,name,note\r\n"
            b'1,"Smith, J","said ""hi""\r\nand left"\r\n'
            b"\r\n"
            b"2,Zo\xc3\xab,\r\n"
            b"3,short\n"
        )
        self.assertEqual(
            both(self, "text/csv", data),
            [
                {"id": "1", "name": "Smith, J", "note": 'said "hi"\r\nand left'},
                {"id": "2", "name": "Zoë", "note": ""},
                {"id": "3", "name": "short", "note": None},
            ],
        )

    def test_no_final_newline_and_header_only(self):
        self.assertEqual(both(self, "text/csv", b"a,b\n1,2"), [{"a": "1", "b": "2"}])
        self.assertEqual(both(self, "text/csv", b"a,b\r\n"), [])

    def test_chunks_split_records_anywhere(self):
        rows = [[str(i), f'"quoted, {i}\n""x"""', "=cmd" if i % 7 == 0 else "v"] for i in range(200)]
        text = "h1,h2,h3\r\n" + "".join(",".join(r) + "\r\n" for r in rows)
        data = text.encode("utf-8")
        expected = parse_bytes(data, "text/csv")
        self.assertEqual(len(expected), 200)
        self.assertEqual(expected[7], {"h1": "7", "h2": 'quoted, 7\n"x"', "h3": "'=cmd"})
        for step in (1, 2, 3, 7, 64, 1000):
            self.assertEqual(feed("text/csv", data, step=step), expected, step)

    def test_formula_injection_escaped(self):
        data = b'=HEADER,b\n=SUM(A1:A9),+1\n-5,@cmd\n"\tx","\rx"\nsafe,\'q\n'
        self.assertEqual(
            both(self, "text/csv", data),
            [
                {"'=HEADER": "'=SUM(A1:A9)", "b": "'+1"},
                {"'=HEADER": "'-5", "b": "'@cmd"},
                {"'=HEADER": "'\tx", "b": "'\rx"},
                {"'=HEADER": "safe", "b": "'q"},
            ],
        )
        self.assertEqual(escape_formula("=1"), "'=1")
        self.assertEqual(escape_formula("a=1"), "a=1")
        self.assertEqual(escape_formula(""), "")

    def test_rows_limit(self):
        limits = ContentLimits(max_csv_rows=3)
        self.assertEqual(len(both(self, "text/csv", b"a\n1\n2\n3\n", limits)), 3)
        self.assertEqual(rejected(self, "text/csv", b"a\n1\n2\n3\n4\n", limits), "CSV body has more than 3 rows")

    def test_rows_limit_stops_early(self):
        parser = make_parser("text/csv")
        parser.feed(b"a\n" + b"1\n" * 10000)
        e = self.assertRaises(BadRequest, parser.feed, b"2\n")
        self.assertEqual(e.message, "CSV body has more than 10000 rows")

    def test_malformed(self):
        self.assertEqual(
            rejected(self, "text/csv", b'a,b\n1,"open\n2,3\n'),
            "Malformed CSV body: unterminated quoted field in record 2",
        )
        self.assertIn("Malformed CSV body", rejected(self, "text/csv", b'a,b\n"1"x,2\n'))
        self.assertEqual(
            rejected(self, "text/csv", b"a,b\n1,2\n1,2,3\n"), "CSV row 2 has 3 values but the header has 2 columns"
        )
        self.assertEqual(rejected(self, "text/csv", b"a,b,a\n1,2,3\n"), "CSV header repeats the column 'a'")
        self.assertEqual(rejected(self, "text/csv", b"a\n\xff\n"), "CSV body is not valid utf-8")
        e = self.assertRaises(BadRequest, make_parser, "text/csv; charset=nope")
        self.assertEqual(e.message, "CSV body has an unknown charset")

    def test_charset(self):
        self.assertEqual(both(self, "text/csv; charset=ISO-8859-1", "n\nZoë\n".encode("latin-1")), [{"n": "Zoë"}])

    def test_empty(self):
        self.assertIsNone(both(self, "text/csv", b""))
        self.assertIsNone(both(self, "text/csv", b"\r\n\r\n"))


class FormTests(SynchronousTestCase):
    def test_fields(self):
        data = b"name=Zo%C3%AB+M&a[]=1&a[]=2&one[]=x&rep=1&rep=2&empty=&flag&&enc%5B%5D=y"
        self.assertEqual(
            both(self, "application/x-www-form-urlencoded", data),
            {"name": "Zoë M", "a": ["1", "2"], "one": ["x"], "rep": ["1", "2"], "empty": "", "flag": "", "enc": ["y"]},
        )

    def test_empty(self):
        self.assertIsNone(both(self, "application/x-www-form-urlencoded", b""))

    def test_fields_limit(self):
        limits = ContentLimits(max_form_fields=3)
        self.assertEqual(both(self, "application/x-www-form-urlencoded", b"a=1&b=2&c=3", limits), {"a": "1", "b": "2", "c": "3"})
        self.assertEqual(
            rejected(self, "application/x-www-form-urlencoded", b"a=1&b=2&c=3&d=4", limits),
            "Form body has more than 3 fields",
        )

    def test_fields_limit_stops_early(self):
        parser = make_parser("application/x-www-form-urlencoded")
        parser.feed(b"a=1&" * 1000)
        self.assertRaises(BadRequest, parser.feed, b"b=2&")

    def test_malformed(self):
        self.assertEqual(rejected(self, "application/x-www-form-urlencoded", b"a=%FF%FE"), "Form body is not valid UTF-8")


BOUNDARY = "----harmony-7MA4YWxkTrZu0gW"
MULTIPART_TYPE = f'multipart/form-data; boundary="{BOUNDARY}"'


def part(name, value, filename=None, content_type=None, boundary=BOUNDARY):
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
    if filename is not None:
        head += f'; filename="{filename}"'
    head += "\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def multipart(*parts, boundary=BOUNDARY):
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def sha(data):
    return hashlib.sha256(data).hexdigest()


class MultipartTests(SynchronousTestCase):
    def test_fields_and_files(self):
        image = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
        data = multipart(
            part("title", "Zoë's scan".encode()),
            part("scan", image, filename="scan.png", content_type="image/png"),
            part("tags[]", b"a"),
            part("tags[]", b"b"),
            part("note", b"multi\r\nline"),
            part("raw", b"", filename="empty.bin"),
        )
        self.assertEqual(
            both(self, MULTIPART_TYPE, data),
            {
                "fields": {"title": "Zoë's scan", "tags": ["a", "b"], "note": "multi\r\nline"},
                "files": [
                    {"name": "scan", "filename": "scan.png", "content_type": "image/png", "size": len(image), "sha256": sha(image)},
                    {"name": "raw", "filename": "empty.bin", "content_type": None, "size": 0, "sha256": sha(b"")},
                ],
            },
        )

    def test_streamed_byte_at_a_time(self):
        payload = b"\x00DICM\r\n--" + b"\xfe" * 3000
        data = multipart(part("f", payload, filename="a.dcm", content_type="application/dicom"), part("k", b"v"))
        d = parse(byte_stream(data), MULTIPART_TYPE)
        result = self.successResultOf(d)
        self.assertEqual(
            result.normalized,
            {
                "fields": {"k": "v"},
                "files": [{"name": "f", "filename": "a.dcm", "content_type": "application/dicom", "size": len(payload), "sha256": sha(payload)}],
            },
        )
        # The body is passed on byte for byte (spooled; replayable).
        self.assertEqual(self.successResultOf(collect(result.body)), data)
        self.assertEqual(self.successResultOf(collect(result.rewind())), data)

    def test_files_are_not_kept(self):
        chunk = bytes(random.Random(5).randbytes(64 * 1024))
        parser = make_parser(MULTIPART_TYPE)
        parser.feed(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="big"\r\n\r\n'.encode())
        tracemalloc.start()
        try:
            for _ in range(128):  # 8 MiB
                parser.feed(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        parser.feed(f"\r\n--{BOUNDARY}--\r\n".encode())
        view = parser.close()
        self.assertEqual(view["files"][0]["size"], 128 * len(chunk))
        self.assertEqual(view["files"][0]["sha256"], sha(chunk * 128))
        self.assertLess(peak, 1024 * 1024)

    def test_too_many_files(self):
        limits = ContentLimits(max_multipart_files=2)
        files = [part(f"f{i}", b"x", filename=f"{i}.txt") for i in range(3)]
        self.assertEqual(len(both(self, MULTIPART_TYPE, multipart(*files[:2]), limits)["files"]), 2)
        self.assertEqual(rejected(self, MULTIPART_TYPE, multipart(*files), limits), "Multipart body has more than 2 files")

    def test_too_many_files_refused_at_the_part_header(self):
        parser = make_parser(MULTIPART_TYPE, ContentLimits(max_multipart_files=1))
        parser.feed(part("a", b"x", filename="a"))
        e = self.assertRaises(BadRequest, parser.feed, part("b", b"", filename="b")[:-2])
        self.assertEqual(e.message, "Multipart body has more than 1 files")

    def test_too_many_fields(self):
        limits = ContentLimits(max_form_fields=2)
        fields = [part(f"k{i}", b"v") for i in range(3)]
        self.assertEqual(both(self, MULTIPART_TYPE, multipart(*fields[:2]), limits)["fields"], {"k0": "v", "k1": "v"})
        self.assertEqual(rejected(self, MULTIPART_TYPE, multipart(*fields), limits), "Multipart body has more than 2 fields")

    def test_no_parts(self):
        self.assertEqual(both(self, MULTIPART_TYPE, multipart()), {"fields": {}, "files": []})
        self.assertIsNone(both(self, MULTIPART_TYPE, b""))

    def test_malformed_boundaries(self):
        data = multipart(part("k", b"v"))
        e = self.assertRaises(BadRequest, make_parser, "multipart/form-data")
        self.assertEqual(e.message, "multipart/form-data body without a boundary parameter")
        self.assertEqual(
            rejected(self, "multipart/form-data; boundary=other", data),
            "Malformed multipart body: the boundary of its Content-Type was not found",
        )
        self.assertEqual(
            rejected(self, MULTIPART_TYPE, data[:-len(BOUNDARY) - 6]),
            "Malformed multipart body: it ends before its closing boundary",
        )
        self.assertIn("Malformed multipart body", rejected(self, MULTIPART_TYPE, b"junk\r\n--" + BOUNDARY.encode() + b"XX\r\n"))
        self.assertIn(
            "Malformed multipart body", rejected(self, MULTIPART_TYPE, data.replace(b"\r\n\r\n", b"\n\n", 1), same=False)
        )
        no_disposition = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode()
        self.assertIn("Content-Disposition", rejected(self, MULTIPART_TYPE, no_disposition))

    def test_field_not_utf8(self):
        self.assertEqual(
            rejected(self, MULTIPART_TYPE, multipart(part("k", b"\xff"))), "Multipart field 'k' is not valid utf-8"
        )


class BinaryTests(SynchronousTestCase):
    def test_bytes(self):
        data = b"%PDF-1.7\n" + bytes(range(256))
        self.assertEqual(
            both(self, "application/pdf", data), {"content_type": "application/pdf", "size": len(data), "sha256": sha(data)}
        )
        self.assertEqual(both(self, "IMAGE/PNG; x=y", b"\x89PNG")["content_type"], "image/png")

    def test_empty(self):
        self.assertIsNone(both(self, "application/octet-stream", b""))

    def test_stream_spooled_and_replayable(self):
        data = random.Random(1).randbytes(3 * 1024 * 1024 + 5)
        chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
        stream = Stream.from_iterable(chunks)
        result = self.successResultOf(parse(stream, "application/dicom"))
        self.assertEqual(result.normalized, {"content_type": "application/dicom", "size": len(data), "sha256": sha(data)})
        self.assertIsInstance(result.body, Stream)
        self.assertEqual(result.body.length, len(data))
        self.assertEqual(self.successResultOf(collect(result.body)), data)
        self.assertEqual(self.successResultOf(collect(result.rewind())), data)

    def test_stream_with_rewind(self):
        data = b"\x00" * 100
        rewound = Stream.from_bytes(data)
        result = self.successResultOf(parse(byte_stream(data), "video/mp4", rewind=lambda: rewound))
        self.assertIs(result.body, rewound)
        self.assertIsNone(result.rewind)
        self.assertEqual(result.normalized["sha256"], sha(data))


class DriverTests(SynchronousTestCase):
    def test_unknown_type_untouched(self):
        stream = Stream()
        stream.write(b"x")
        result = self.successResultOf(parse(stream, "text/plain"))
        self.assertIsNone(result.normalized)
        self.assertIs(result.body, stream)
        self.assertFalse(stream.cancelled)
        self.assertEqual(stream._buffered, 1)
        raw = b"\x00\xff"
        self.assertIs(self.successResultOf(parse(raw, "application/zip")).body, raw)
        self.assertIsNone(parse_bytes(raw, "application/zip"))

    def test_bytes_kept(self):
        raw = b'{"a": 1}'
        result = self.successResultOf(parse(raw, "application/json"))
        self.assertIs(result.body, raw)
        self.assertEqual(result.normalized, {"a": 1})

    def test_text_stream_becomes_bytes(self):
        for content_type, data in (
            ("application/json", b'{"a": [1]}'),
            ("text/xml", b"<a>1</a>"),
            ("text/csv", b"a\n1\n"),
            ("application/x-www-form-urlencoded", b"a=1"),
        ):
            result = self.successResultOf(parse(byte_stream(data), content_type))
            self.assertEqual(result.body, data, content_type)
            self.assertIsNotNone(result.normalized)

    def test_none_body(self):
        self.assertIsNone(self.successResultOf(parse(None, "application/json")).normalized)

    def test_size_by_length_refused_before_reading(self):
        for content_type in ("application/json", "image/png", MULTIPART_TYPE, "text/csv"):
            stream = Stream(length=11)
            d = parse(stream, content_type, ContentLimits(max_body_size=10))
            f = self.failureResultOf(d, PayloadTooLarge)
            self.assertEqual(f.value.status, 413)
            self.assertEqual(f.value.message, "Request body larger than the limit of 10 bytes")
            self.assertTrue(stream.cancelled)

    def test_size_while_reading(self):
        for content_type in ("application/json", "application/octet-stream", "text/xml", MULTIPART_TYPE):
            stream = Stream()
            d = parse(stream, content_type, ContentLimits(max_body_size=100), label="Response body")
            stream.write(b" " * 60)
            self.assertNoResult(d)
            stream.write(b" " * 41)
            # Refused before the end of the body.
            f = self.failureResultOf(d, PayloadTooLarge)
            self.assertEqual(f.value.message, "Response body larger than the limit of 100 bytes")
            self.assertTrue(stream.cancelled)

    def test_size_of_bytes(self):
        e = self.assertRaises(PayloadTooLarge, parse_bytes, b"12345", "image/png", ContentLimits(max_body_size=4))
        self.assertEqual(e.status, 413)
        self.failureResultOf(parse(b"12345", "text/csv", ContentLimits(max_body_size=4)), PayloadTooLarge)
        # At the limit: fine.
        self.assertEqual(parse_bytes(b"1234", None, ContentLimits(max_body_size=4)), 1234)

    def test_limit_error_while_streaming_cancels(self):
        stream = Stream()
        d = parse(stream, "text/csv", ContentLimits(max_csv_rows=1))
        stream.write(b"a\n1\n")
        self.assertNoResult(d)
        stream.write(b"2\n")
        self.assertEqual(self.failureResultOf(d, BadRequest).value.message, "CSV body has more than 1 rows")
        self.assertTrue(stream.cancelled)

    def test_bad_content_type_is_400_not_500(self):
        self.failureResultOf(parse(b"x", "multipart/form-data"), BadRequest)

    def test_garbage_never_500(self):
        rng = random.Random(42)
        samples = [b"", b"<", b"--", b'"', b"&", b"=", b"\r\n", b"\x00", b"\xff", b"<a>", b"</a>", b"[", b"{", b","]
        for content_type in ("application/json", "text/xml", "text/csv", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "image/png"):
            for _ in range(150):
                data = b"".join(rng.choice(samples) + rng.randbytes(rng.randint(0, 3)) for _ in range(rng.randint(0, 12)))
                try:
                    feed(content_type, data, step=rng.randint(1, 5))
                except BadRequest:
                    pass


def envelope(body, content_type, limits=None):
    headers = [("Content-Type", content_type)] if content_type else []
    return RequestEnvelope(details=RequestDetails(method="POST", headers=headers), body=body, content_limits=limits)


class EnvelopeTests(SynchronousTestCase):
    def test_envelope_limits(self):
        env = envelope(b"a\n1\n2\n", "text/csv", ContentLimits(max_csv_rows=1))
        self.assertEqual(self.failureResultOf(env.parse_body(), BadRequest).value.message, "CSV body has more than 1 rows")
        self.assertFalse(env.parsed)

    def test_default_limits(self):
        env = envelope(b"a\n" + b"1\n" * 10001, "text/csv")
        self.failureResultOf(env.parse_body(), BadRequest)
        env = envelope(b"x" * (DEFAULT_LIMITS.max_body_size + 1), "image/png")
        self.failureResultOf(env.parse_body(), PayloadTooLarge)

    def test_max_body_size_argument_overrides(self):
        env = envelope(b'"0123456789"', None, ContentLimits(max_body_size=5))
        self.assertEqual(self.successResultOf(env.parse_body(max_body_size=100)), "0123456789")
        env = envelope(b'"0123456789"', None)
        self.failureResultOf(env.parse_body(max_body_size=5), PayloadTooLarge)
        env = envelope(b"<a/>", "text/xml")
        self.assertEqual(self.successResultOf(env.parse_body(limits=ContentLimits(max_xml_depth=1))), {"a": None})

    def test_streamed_binary_gets_rewind(self):
        data = b"\x01" * 500
        env = envelope(byte_stream(data), "application/octet-stream")
        self.assertEqual(self.successResultOf(env.parse_body())["size"], 500)
        self.assertEqual(self.successResultOf(collect(env.body)), data)
        self.assertEqual(self.successResultOf(collect(env.rewind_body())), data)

    def test_existing_rewind_used(self):
        data = b"a=1&b=2"
        fresh = Stream.from_bytes(data)
        env = envelope(byte_stream(data), "application/x-www-form-urlencoded")
        env.rewind_body = lambda: fresh
        self.assertEqual(self.successResultOf(env.parse_body()), {"a": "1", "b": "2"})
        self.assertIs(env.body, fresh)

    def test_response(self):
        resp = ResponseEnvelope(headers=[("Content-Type", "text/xml")], body=b"<r><a>1</a><a>2</a></r>")
        self.assertEqual(self.successResultOf(resp.parse_body()), {"r": {"a": ["1", "2"]}})
        resp = ResponseEnvelope(
            headers=[("Content-Type", "text/xml")], body=b"<a><b/></a>", content_limits=ContentLimits(max_xml_depth=1)
        )
        self.failureResultOf(resp.parse_body(), BadRequest)
        stream = Stream()
        resp = ResponseEnvelope(headers=[("Content-Type", "image/png")], body=stream, content_limits=ContentLimits(max_body_size=3))
        d = resp.parse_body()
        stream.write(b"1234")
        self.assertEqual(self.failureResultOf(d, PayloadTooLarge).value.message, "Response body larger than the limit of 3 bytes")


class _Endpoint:
    name = "ep"

    def __init__(self, options=None):
        self.options = options

    def incoming(self, envelope):
        return None

    def outgoing(self, envelope, response):
        return response

    def render_error(self, error):
        return ResponseEnvelope.json(error.status, {"error": error.error, "message": error.message})


def proxy_options(**options):
    options.setdefault("id", "unit")
    return PROXY.validate(options, Where("test.toml"))


class _Capture(Resource):
    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


def twisted_request(body, content_type):
    """
    A real twisted.web request for C{POST /api/x}, parsed from bytes.
    """
    resource = _Capture()
    channel = HarmonySite(resource, reactor=Clock()).buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"POST /api/x HTTP/1.1\r\nHost: gw\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (content_type, len(body), body)
    )
    return resource.requests[0]


class AdapterTests(SynchronousTestCase):
    def to_envelope(self, adapter, endpoint, body=b"a=1", content_type=b"application/x-www-form-urlencoded"):
        request = twisted_request(body, content_type)
        return adapter.to_envelope(request, Route(prefix="/api", endpoint=endpoint, pipeline="p"), "x")

    def test_envelope_carries_proxy_limits(self):
        adapter = HttpAdapter(proxy_options(content_limits={"max_form_fields": 1}))
        env = self.to_envelope(adapter, _Endpoint())
        self.assertEqual(env.content_limits, ContentLimits(max_form_fields=1))
        self.assertEqual(self.successResultOf(env.parse_body()), {"a": "1"})
        env = self.to_envelope(adapter, _Endpoint(), body=b"a=1&b=2")
        self.assertEqual(self.failureResultOf(env.parse_body(), BadRequest).value.message, "Form body has more than 1 fields")

    def test_endpoint_max_body_size(self):
        adapter = HttpAdapter(proxy_options(content_limits={"max_body_size": 100}))
        small = _Endpoint(Options({"max_body_size": 4}))
        self.assertEqual(adapter.limits_for(small).max_body_size, 4)
        self.assertIs(adapter.limits_for(small), adapter.limits_for(small))
        self.assertEqual(adapter.limits_for(_Endpoint(None)).max_body_size, 100)
        self.assertEqual(adapter.limits_for(_Endpoint({"max_body_size": 5})).max_body_size, 5)
        self.assertEqual(adapter.limits_for("an endpoint without options").max_body_size, 100)
        self.assertRaises(PayloadTooLarge, self.to_envelope, adapter, small, b"a=123")
        env = self.to_envelope(adapter, _Endpoint(proxy_options(id="x")), b"a=123")
        self.assertEqual(self.successResultOf(env.parse_body()), {"a": "123"})


class _Backend:
    name = "b"

    def __init__(self, response):
        self.response = response

    def handle(self, envelope):
        return defer.succeed(self.response)


class _ParsingMiddleware:
    name = "parse"

    def request(self, envelope):
        return None

    def response(self, envelope, response):
        return response.parse_body().addCallback(lambda _: None)


class PipelineTests(SynchronousTestCase):
    def test_response_gets_request_limits(self):
        response = ResponseEnvelope(headers=[("Content-Type", "text/csv")], body=b"a\n1\n2\n")
        executor = PipelineExecutor("p", [_ParsingMiddleware()], [_ParsingMiddleware()], [_Backend(response)])
        result = self.successResultOf(executor.execute(_Endpoint(), envelope(b"", None, ContentLimits(max_csv_rows=1))))
        self.assertEqual(result.status, 400)
        self.assertEqual(json.loads(result.body)["message"], "CSV body has more than 1 rows")


class EchoTests(SynchronousTestCase):
    def echo(self, env, **options):
        return json.loads(self.successResultOf(EchoBackend("echo", options).handle(env)).body)

    def test_parse_body_option(self):
        env = make_request("POST", headers=[("Content-Type", "text/csv")], body=b"a,b\n1,=2\n")
        echo = self.echo(env, parse_body=True)
        self.assertEqual(echo["normalized"], [{"a": "1", "b": "'=2"}])
        self.assertEqual(echo["body"], "a,b\n1,=2\n")
        # Without the option nothing is parsed.
        env = make_request("POST", headers=[("Content-Type", "text/csv")], body=b"a\n")
        self.assertNotIn("normalized", self.echo(env))

    def test_parse_body_errors(self):
        env = make_request("POST", headers=[("Content-Type", "text/xml")], body=b"<a>")
        self.failureResultOf(EchoBackend("echo", {"parse_body": True}).handle(env), BadRequest)

    def test_large_body_summarised(self):
        data = b"\x07" * (MAX_ECHO_BODY + 1)
        stream = Stream.from_iterable([data[i : i + 65536] for i in range(0, len(data), 65536)])
        env = make_request("POST", headers=[("Content-Type", "application/octet-stream")], body=stream)
        echo = self.echo(env, parse_body=True)
        self.assertEqual(echo["normalized"]["sha256"], sha(data))
        self.assertEqual((echo["body"], echo["body_encoding"], echo["body_size"]), (None, None, len(data)))
        self.assertIsNone(self.echo(make_request("POST", body=None), parse_body=True)["normalized"])
        self.assertEqual(self.echo(make_request("POST", body=b"\xff" * 3, headers=[("Content-Type", "image/png")]), parse_body=True)["body_encoding"], "base64")

    def test_schema(self):
        from harmony.backends.echo import OPTIONS

        self.assertEqual(OPTIONS.validate({}, Where("t.toml")).parse_body, False)
        self.assertEqual(OPTIONS.validate({"parse_body": True}, Where("t.toml")).parse_body, True)

