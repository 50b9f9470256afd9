"""
Tests for L{harmony.dicomweb.multipart}: the streaming multipart/related
writer and parser.
"""

import email.parser
import email.policy

from _deferreds import drain, failure_of, has_fired, result_of
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from harmony.dicomweb.multipart import (
    MAX_PART_HEADERS,
    Part,
    RelatedParser,
    multipart_stream,
    new_boundary,
    parse_content_type,
    read_parts,
    related_content_type,
)
from harmony.envelope import Headers
from harmony.errors import BadRequest, UnsupportedMediaType
from harmony.streams import EOF, Stream, StreamCancelled

B = "b0undary"

#: Bodies that look like delimiters without being one.
TRICKY = [
    b"",
    b"plain",
    b"line one\r\nline two\r\n",
    b"--" + B.encode() + b"x\r\n",
    b"\r\n--" + B.encode() + b"x and more",
    b"\r\n--" + B.encode() + b"-\r\n",
    b"\r\n--" + B.encode() + b"  trailing\r\n",
    b"\r\n--" + B.encode()[:-1] + b"\r\n",
    b"--\r\n--\r\n\r\n",
    b"\r\n",
    b"ends with cr\r",
    bytes(range(256)) * 3,
]


def _run(coro):
    return defer.Deferred.fromCoroutine(coro)


def _body(parts, boundary=B, preamble=b"", epilogue=b""):
    out = [preamble]
    for i, (headers, data) in enumerate(parts):
        out.append(("" if i == 0 and not preamble else "\r\n").encode() + f"--{boundary}\r\n".encode())
        out.append(b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n" + data)
    out.append(f"\r\n--{boundary}--\r\n".encode() if parts else f"--{boundary}--\r\n".encode())
    out.append(epilogue)
    return b"".join(out)


def _bytewise(data):
    return Stream.from_iterable([data[i : i + 1] for i in range(len(data))])


class _Sink:
    def __init__(self, log, index, headers):
        self.log = log
        self.index = index
        self.headers = headers
        self.chunks = []
        self.closed = False
        self.aborted = 0

    def write(self, data):
        assert not self.closed
        self.chunks.append(data)

    def close(self):
        self.closed = True
        return (self.headers, b"".join(self.chunks))

    def abort(self):
        self.aborted += 1


class _Opener:
    def __init__(self):
        self.sinks = []

    def __call__(self, index, headers):
        sink = _Sink(self, index, headers)
        self.sinks.append(sink)
        return sink


class MediaTypeTests(SynchronousTestCase):
    def test_new_boundary(self):
        a, b = new_boundary(), new_boundary()
        self.assertNotEqual(a, b)
        self.assertGreaterEqual(len(a), 32)
        self.assertTrue(all(c in "0123456789abcdef" for c in a))

    def test_parse_content_type(self):
        self.assertEqual(
            parse_content_type('Multipart/Related; Type="application/dicom"; BOUNDARY=XyZ'),
            ("multipart/related", {"type": "application/dicom", "boundary": "XyZ"}),
        )
        self.assertEqual(
            parse_content_type('multipart/related;type="application/dicom; transfer-syntax=1.2.3";boundary="a;b=c"'),
            ("multipart/related", {"type": "application/dicom; transfer-syntax=1.2.3", "boundary": "a;b=c"}),
        )
        self.assertEqual(parse_content_type('a/b; x="q\\"uote\\\\"'), ("a/b", {"x": 'q"uote\\'}))
        self.assertEqual(parse_content_type("application/dicom"), ("application/dicom", {}))
        self.assertEqual(parse_content_type("a/b;; c = d ;"), ("a/b", {"c": "d"}))
        self.assertEqual(parse_content_type(""), ("", {}))

    def test_parse_content_type_malformed(self):
        for bad in ['a/b; x="unterminated', "a/b; novalue", 'a/b; x="v" junk', "nosubtype", "a/b; =v"]:
            with self.assertRaises(BadRequest, msg=bad):
                parse_content_type(bad)

    def test_related_content_type(self):
        self.assertEqual(
            related_content_type("application/dicom", "XYZ"),
            'multipart/related; type="application/dicom"; boundary=XYZ',
        )
        value = related_content_type("application/dicom", "XYZ", "1.2.840.10008.1.2.1")
        self.assertEqual(
            value, 'multipart/related; type="application/dicom"; boundary=XYZ; transfer-syntax=1.2.840.10008.1.2.1'
        )
        self.assertEqual(
            parse_content_type(value)[1],
            {"type": "application/dicom", "boundary": "XYZ", "transfer-syntax": "1.2.840.10008.1.2.1"},
        )
        self.assertEqual(parse_content_type(related_content_type("a/b", "x y"))[1]["boundary"], "x y")


class WriterTests(SynchronousTestCase):
    def test_exact_output(self):
        done = []
        parts = [
            Part("application/dicom", b"ABC", on_done=lambda: done.append(1)),
            Part(
                "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
                Stream.from_iterable([b"12", b"345"]),
                location="https://h/frames/1",
                headers=[("X-Extra", "yes")],
                on_done=lambda: done.append(2),
            ),
        ]
        out = multipart_stream(Stream.from_iterable(parts), "BB")
        self.assertIsNone(out.length)
        self.assertEqual(
            b"".join(drain(out)),
            b"--BB\r\nContent-Type: application/dicom\r\n\r\nABC"
            b"\r\n--BB\r\nContent-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n"
            b"Content-Location: https://h/frames/1\r\nX-Extra: yes\r\n\r\n12345"
            b"\r\n--BB--\r\n",
        )
        self.assertEqual(done, [1, 2])

    def test_zero_parts(self):
        out = multipart_stream(Stream.from_iterable([]), "BB")
        self.assertEqual(b"".join(drain(out)), b"--BB--\r\n")

    def test_async_generator_source(self):
        gate = defer.Deferred()

        async def parts():
            yield Part("text/plain", b"one")
            await gate
            yield Part("text/plain", b"two")

        out = multipart_stream(parts(), "BB")
        self.assertEqual(result_of(out.read()), b"--BB\r\nContent-Type: text/plain\r\n\r\n")
        self.assertEqual(result_of(out.read()), b"one")
        d = out.read()
        self.assertFalse(has_fired(d))
        gate.callback(None)
        rest = result_of(d) + b"".join(drain(out))
        self.assertEqual(rest, b"\r\n--BB\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--BB--\r\n")

    def test_read_back_by_reader_and_email(self):
        boundary = new_boundary()
        parts = [Part("application/octet-stream", body, location=f"/p/{i}") for i, body in enumerate(TRICKY)]
        parts.append(Part("application/dicom", Stream.from_iterable([b"a\r\n", b"--", boundary.encode(), b"\r"])))
        expected = list(TRICKY) + [b"a\r\n--" + boundary.encode() + b"\r"]
        data = b"".join(drain(multipart_stream(Stream.from_iterable(parts), boundary)))
        ctype = related_content_type("application/octet-stream", boundary)

        opener = _Opener()
        results = result_of(_run(read_parts(_bytewise(data), ctype, opener)))
        self.assertEqual([body for _, body in results], expected)
        self.assertEqual(results[1][0].get("content-location"), "/p/1")

    def test_read_back_by_email(self):
        # The email package also ends a boundary line at a bare CR, and
        # drops a body's last CRLF: bodies here avoid both.
        boundary = new_boundary()
        bodies = [b"plain", b"line one\r\nline two", b"--\r\n--\r\n\r\nx", b"\r\n--" + boundary.encode() + b"x"]
        parts = [Part("application/octet-stream", body, location=f"/p/{i}") for i, body in enumerate(bodies)]
        data = b"".join(drain(multipart_stream(Stream.from_iterable(parts), boundary)))
        ctype = related_content_type("application/octet-stream", boundary)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + data
        )
        self.assertTrue(message.is_multipart())
        self.assertEqual(message.get_content_type(), "multipart/related")
        payloads = message.get_payload()
        self.assertEqual([p.get_payload(decode=True) for p in payloads], bodies)
        self.assertEqual([p["Content-Location"] for p in payloads], ["/p/0", "/p/1", "/p/2", "/p/3"])
        self.assertEqual(payloads[0].get_content_type(), "application/octet-stream")

    def test_backpressure(self):
        pulled = []

        def body(name, chunks):
            def pull():
                if len([p for p in pulled if p == name]) >= chunks:
                    return EOF
                pulled.append(name)
                return b"x" * 100

            return Stream(pull=pull)

        parts = [Part("application/octet-stream", body(n, 50)) for n in range(3)]
        out = multipart_stream(Stream.from_iterable(parts), "BB", high_water=1000)
        # Nothing consumed yet: the writer stopped at the high-water mark.
        self.assertLessEqual(len(pulled), 1000 // 100 + 1)
        self.assertFalse(out.writable)
        before = len(pulled)
        result_of(out.read())
        result_of(out.read())
        self.assertEqual(len(pulled), before)  # still above the low-water mark
        total = b"".join([result_of(out.read()) for _ in range(8)])
        self.assertGreater(len(pulled), before)
        self.assertLessEqual(len(pulled) * 100, len(total) + 2 * 1000 + 200)
        rest = drain(out)
        self.assertEqual(len(pulled), 150)
        self.assertTrue(rest[-1].endswith(b"--BB--\r\n"))

    def test_large_bytes_body_sliced(self):
        body = bytes(range(256)) * 1024  # 256 KiB
        out = multipart_stream(Stream.from_iterable([Part("a/b", body)]), "BB", high_water=64 * 1024)
        chunks = drain(out)
        self.assertTrue(all(len(c) <= 64 * 1024 for c in chunks))
        self.assertIn(body, b"".join(chunks))

    def test_cancel_mid_part(self):
        done = []
        body = Stream()
        body.write(b"partial")
        source = Stream()
        source.write(Part("a/b", body, on_done=lambda: done.append("current")))
        later_body = Stream()
        source.write(Part("a/b", later_body, on_done=lambda: done.append("buffered")))
        out = multipart_stream(source, "BB")
        self.assertEqual(result_of(out.read()), b"--BB\r\nContent-Type: a/b\r\n\r\n")
        self.assertEqual(result_of(out.read()), b"partial")
        pending = out.read()  # waits for the body
        self.assertFalse(has_fired(pending))
        out.cancel()
        failure_of(pending, StreamCancelled)
        self.assertEqual(done, ["current", "buffered"])
        self.assertTrue(body.cancelled)
        self.assertTrue(later_body.cancelled)
        self.assertTrue(source.cancelled)
        body.write(b"more")  # ignored
        self.assertEqual(done, ["current", "buffered"])

    def test_cancel_while_waiting_for_parts(self):
        cancelled = []
        gate = defer.Deferred()

        class Source:
            def __init__(self):
                self.gen = self._gen()

            async def _gen(self):
                try:
                    await gate
                except defer.CancelledError:
                    cancelled.append("generator")
                    raise
                yield Part("a/b", b"never")

            def __aiter__(self):
                return self

            def __anext__(self):
                return self.gen.__anext__()

            def cancel(self):
                cancelled.append("source")

        out = multipart_stream(Source(), "BB")
        d = out.read()
        out.cancel()
        failure_of(d, StreamCancelled)
        self.assertEqual(sorted(cancelled), ["generator", "source"])

    def test_cancel_when_output_full(self):
        done = []
        out = multipart_stream(
            Stream.from_iterable([Part("a/b", b"y" * 5000, on_done=lambda: done.append(1))]), "BB", high_water=1000
        )
        self.assertFalse(out.writable)
        out.cancel()
        self.assertEqual(done, [1])

    def test_on_done_once_even_if_it_raises(self):
        calls = []

        def on_done():
            calls.append(1)
            raise RuntimeError("boom")

        out = multipart_stream(Stream.from_iterable([Part("a/b", b"z", on_done=on_done)]), "BB")
        self.assertTrue(b"".join(drain(out)).endswith(b"--BB--\r\n"))
        out.cancel()
        self.assertEqual(calls, [1])
        self.flushLoggedErrors(RuntimeError)

    def test_body_failure_fails_output(self):
        done = []
        body = Stream()
        body.write(b"some")
        source = Stream()
        source.write(Part("a/b", body, on_done=lambda: done.append("failed part")))
        source.write(Part("a/b", b"next", on_done=lambda: done.append("next part")))
        out = multipart_stream(source, "BB")
        result_of(out.read())
        self.assertEqual(result_of(out.read()), b"some")
        d = out.read()
        body.fail(ValueError("disk error"))
        failure_of(d, ValueError)
        self.assertEqual(done, ["failed part", "next part"])
        self.assertTrue(source.cancelled)

    def test_source_failure_fails_output(self):
        async def parts():
            yield Part("a/b", b"fine")
            raise KeyError("lost")

        out = multipart_stream(parts(), "BB")
        chunks = []
        while True:
            d = out.read()
            box = []
            d.addBoth(box.append)
            if not isinstance(box[0], bytes):
                break
            chunks.append(box[0])
        self.assertTrue(box[0].check(KeyError))
        self.assertEqual(b"".join(chunks), b"--BB\r\nContent-Type: a/b\r\n\r\nfine")

    def test_header_injection_refused(self):
        out = multipart_stream(Stream.from_iterable([Part("a/b", b"", location="/x\r\nEvil: 1")]), "BB")
        failure_of(out.read(), ValueError)


class ReaderTests(SynchronousTestCase):
    def _read(self, data, ctype=f'multipart/related; type="application/dicom"; boundary={B}', **kw):
        opener = _Opener()
        return opener, _run(read_parts(data, ctype, opener, **kw))

    def test_tricky_bodies_byte_at_a_time(self):
        parts = [([("Content-Type", "application/dicom")], body) for body in TRICKY]
        data = _body(parts)
        for source in (data, _bytewise(data), Stream.from_bytes(data)):
            opener, d = self._read(source)
            self.assertEqual([body for _, body in result_of(d)], TRICKY)

    def test_preamble_epilogue_padding_and_headers(self):
        data = (
            b"This is a preamble\r\n--" + B.encode() + b"  \t\r\n"
            b"content-type: application/dicom\r\nX-Folded: one\r\n two\r\n\r\nBODY1"
            b"\r\n--" + B.encode() + b"\r\n\r\nBODY2"  # a part without headers
            b"\r\n--" + B.encode() + b"--  \r\nepilogue --" + B.encode() + b"\r\nignored"
        )
        opener, d = self._read(_bytewise(data))
        (h1, b1), (h2, b2) = result_of(d)
        self.assertEqual((b1, b2), (b"BODY1", b"BODY2"))
        self.assertIsInstance(h1, Headers)
        self.assertEqual(h1.get("Content-Type"), "application/dicom")
        self.assertEqual(h1.get("x-folded"), "one two")
        self.assertEqual(len(h2), 0)
        self.assertEqual([s.index for s in opener.sinks], [0, 1])

    def test_close_delimiter_without_crlf_and_zero_parts(self):
        opener, d = self._read(b"--" + B.encode() + b"\r\n\r\nx\r\n--" + B.encode() + b"--")
        self.assertEqual([b for _, b in result_of(d)], [b"x"])
        opener, d = self._read(b"--" + B.encode() + b"--\r\n")
        self.assertEqual(result_of(d), [])

    def test_sink_backpressure_and_deferred_close(self):
        gates = []

        class SlowSink:
            def __init__(self):
                self.data = []

            def write(self, data):
                self.data.append(data)
                gate = defer.Deferred()
                gates.append(gate)
                return gate

            def close(self):
                return defer.succeed(b"".join(self.data))

            def abort(self):
                pass

        body = Stream()
        d = _run(read_parts(body, f"multipart/related; boundary={B}", lambda i, h: SlowSink()))
        body.write(b"--" + B.encode() + b"\r\n\r\n" + b"a" * 100)
        self.assertEqual(len(gates), 1)
        body.write(b"b" * 100)
        body.write(b"c" * 100 + b"\r\n--" + B.encode() + b"--\r\n")
        body.finish()
        self.assertEqual(len(gates), 1)  # waiting on the sink: no more writes
        while not has_fired(d):
            gates[-1].callback(None)
        self.assertEqual(result_of(d), [b"a" * 100 + b"b" * 100 + b"c" * 100])

    def test_open_part_may_return_deferred(self):
        opener = _Opener()
        data = _body([([], b"one"), ([], b"two")])
        d = _run(read_parts(data, f"multipart/related; boundary={B}", lambda i, h: defer.succeed(opener(i, h))))
        self.assertEqual([b for _, b in result_of(d)], [b"one", b"two"])

    def test_bounded_buffer(self):
        parser = RelatedParser(B)
        parser.feed(b"--" + B.encode() + b"\r\n\r\n")
        emitted = 0
        chunk = (b"\r\n--" + B.encode()[:-1] + b"x") * 500
        for _ in range(50):
            for event in parser.feed(chunk):
                if isinstance(event, bytes):
                    emitted += len(event)
            self.assertLessEqual(len(parser._buffer), len(B) + 4)
        self.assertEqual(emitted + len(parser._buffer), 50 * len(chunk))

    def _malformed(self, data, message, ctype=None, **kw):
        stream = _bytewise(data) if isinstance(data, bytes) else data
        opener, d = self._read(stream, **({"ctype": ctype} if ctype else {}), **kw)
        f = failure_of(d, BadRequest)
        self.assertIn(message, f.value.message)
        for sink in opener.sinks:
            self.assertEqual(sink.aborted, 0 if sink.closed else 1)
        self.assertTrue(stream.cancelled)
        return opener

    def test_no_boundary(self):
        self._malformed(b"--x\r\n", "boundary", ctype="multipart/related; type=application/dicom")

    def test_not_multipart_related(self):
        opener, d = self._read(b"", ctype="application/dicom")
        failure_of(d, UnsupportedMediaType)

    def test_no_opening_delimiter(self):
        self._malformed(b"just some bytes --" + B.encode() + b"x\r\n", "opening boundary")
        self._malformed(b"", "opening boundary")

    def test_headers_too_long(self):
        data = (
            b"--" + B.encode() + b"\r\nX-Long: " + b"a" * MAX_PART_HEADERS + b"\r\n\r\nbody\r\n--" + B.encode() + b"--"
        )
        opener = self._malformed(Stream.from_bytes(data), "16 KiB")
        self.assertEqual(opener.sinks, [])

    def test_headers_without_blank_line(self):
        self._malformed(b"--" + B.encode() + b"\r\nContent-Type: a/b\r\n", "blank line")

    def test_malformed_header_line(self):
        self._malformed(b"--" + B.encode() + b"\r\nno colon here\r\n\r\nx\r\n--" + B.encode() + b"--", "header")

    def test_missing_close_delimiter_aborts_open_sink(self):
        data = _body([([], b"complete")])[: -len(f"\r\n--{B}--\r\n")]
        data = _body([([], b"first")]).replace(f"--{B}--".encode(), f"--{B}".encode()) + b"\r\nsecond part"
        opener = self._malformed(data, "closing boundary")
        self.assertEqual(len(opener.sinks), 2)
        self.assertTrue(opener.sinks[0].closed)
        self.assertEqual(opener.sinks[1].aborted, 1)

    def test_too_many_parts(self):
        opener = self._malformed(_body([([], b"1"), ([], b"2"), ([], b"3")]), "Too many parts", max_parts=2)
        self.assertEqual(len(opener.sinks), 2)

    def test_failing_close_aborts(self):
        class Failing(_Sink):
            def close(self):
                return defer.fail(OSError("cannot keep it"))

        sinks = []

        def opener(index, headers):
            sinks.append(Failing(None, index, headers))
            return sinks[-1]

        d = _run(read_parts(_body([([], b"data")]), f"multipart/related; boundary={B}", opener))
        failure_of(d, OSError)
        self.assertEqual(sinks[0].aborted, 1)

    def test_sink_error_aborts_and_propagates(self):
        class Failing(_Sink):
            def write(self, data):
                raise OSError("disk full")

        sinks = []

        def opener(index, headers):
            sinks.append(Failing(None, index, headers))
            return sinks[-1]

        body = Stream.from_bytes(_body([([], b"data")]))
        f = failure_of(_run(read_parts(body, f"multipart/related; boundary={B}", opener)), OSError)
        self.assertEqual(str(f.value), "disk full")
        self.assertEqual(sinks[0].aborted, 1)
        self.assertTrue(body.cancelled)
