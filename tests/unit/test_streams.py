"""
Tests for L{harmony.streams}.
"""

import io
import os
import tempfile

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH

from _fakes import FakePushProducer, PausingConsumer
from harmony.errors import PayloadTooLarge
from harmony.streams import (
    EOF,
    BytesBodyProducer,
    Stream,
    StreamBodyProducer,
    StreamCancelled,
    body_producer,
    collect,
    relay,
)


class _TrackedFile(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.reads = 0

    def read(self, size=-1):
        self.reads += 1
        return super().read(size)


class BufferingTests(SynchronousTestCase):
    def test_high_water_pauses_and_low_water_resumes(self):
        s = Stream(high_water=10, low_water=4)
        producer = FakePushProducer()
        s.attach_producer(producer)
        s.write(b"123456")
        self.assertEqual(producer.paused, 0)
        self.assertTrue(s.writable)
        s.write(b"12345")  # 11 buffered >= 10
        self.assertEqual(producer.paused, 1)
        self.assertFalse(s.writable)
        s.write(b"x")  # already paused: not paused twice
        self.assertEqual(producer.paused, 1)

        self.assertEqual(self.successResultOf(s.read()), b"123456")  # 6 left > 4
        self.assertEqual(producer.resumed, 0)
        self.assertEqual(self.successResultOf(s.read()), b"12345")  # 1 left <= 4
        self.assertEqual(producer.resumed, 1)
        self.assertTrue(s.writable)
        self.assertEqual(self.successResultOf(s.read()), b"x")
        self.assertEqual(producer.resumed, 1)

    def test_default_low_water_is_a_quarter(self):
        self.assertEqual(Stream(high_water=100).low_water, 25)

    def test_attach_to_full_stream_pauses_at_once(self):
        s = Stream(high_water=4)
        s.write(b"abcd")
        producer = FakePushProducer()
        s.attach_producer(producer)
        self.assertTrue(producer.is_paused)

    def test_non_bytes_items_count_one_each(self):
        s = Stream(high_water=3, low_water=1)
        producer = FakePushProducer()
        s.attach_producer(producer)
        s.write({"a": 1})
        s.write({"b": 2})
        self.assertFalse(producer.is_paused)
        s.write({"c": 3})
        self.assertTrue(producer.is_paused)
        self.assertEqual(self.successResultOf(s.read()), {"a": 1})
        self.assertTrue(producer.is_paused)
        self.successResultOf(s.read())
        self.assertFalse(producer.is_paused)

    def test_wait_writable(self):
        s = Stream(high_water=4, low_water=0)
        self.assertIsNone(self.successResultOf(s.wait_writable()))
        s.write(b"abcd")
        d = s.wait_writable()
        self.assertNoResult(d)
        s.write(b"e")
        self.successResultOf(s.read())  # 1 byte left > low water 0
        self.assertNoResult(d)
        self.successResultOf(s.read())
        self.assertIsNone(self.successResultOf(d))


class ReadWriteTests(SynchronousTestCase):
    def test_read_before_write(self):
        s = Stream()
        d = s.read()
        self.assertNoResult(d)
        s.write(b"chunk")
        self.assertEqual(self.successResultOf(d), b"chunk")
        # delivered straight to the reader, nothing buffered
        s.write(b"next")
        self.assertEqual(self.successResultOf(s.read()), b"next")

    def test_concurrent_reads_are_refused(self):
        s = Stream()
        s.read()
        self.assertRaises(RuntimeError, s.read)

    def test_items_then_eof(self):
        s = Stream()
        s.write(b"a")
        s.write(b"b")
        s.finish()
        self.assertEqual(self.successResultOf(s.read()), b"a")
        self.assertEqual(self.successResultOf(s.read()), b"b")
        self.assertIs(self.successResultOf(s.read()), EOF)
        self.assertIs(self.successResultOf(s.read()), EOF)
        self.assertFalse(EOF)

    def test_finish_wakes_pending_reader(self):
        s = Stream()
        d = s.read()
        s.finish()
        self.assertIs(self.successResultOf(d), EOF)

    def test_write_after_finish_is_an_error(self):
        s = Stream()
        s.finish()
        self.assertRaises(RuntimeError, s.write, b"late")

    def test_from_bytes(self):
        s = Stream.from_bytes(b"hello")
        self.assertEqual(s.length, 5)
        self.assertEqual(self.successResultOf(s.read()), b"hello")
        self.assertIs(self.successResultOf(s.read()), EOF)
        empty = Stream.from_bytes(b"")
        self.assertEqual(empty.length, 0)
        self.assertIs(self.successResultOf(empty.read()), EOF)

    def test_fail_after_items(self):
        s = Stream()
        s.write(b"one")
        s.write(b"two")
        s.fail(ValueError("boom"))
        self.assertEqual(self.successResultOf(s.read()), b"one")
        self.assertEqual(self.successResultOf(s.read()), b"two")
        self.failureResultOf(s.read(), ValueError)
        # the failure is sticky
        self.failureResultOf(s.read(), ValueError)

    def test_fail_wakes_pending_reader(self):
        s = Stream()
        d = s.read()
        s.fail(ValueError("boom"))
        self.failureResultOf(d, ValueError)

    def test_finish_and_fail_after_end_are_ignored(self):
        s = Stream()
        s.finish()
        s.fail(ValueError("late"))
        self.assertIs(self.successResultOf(s.read()), EOF)


class CancelTests(SynchronousTestCase):
    def test_cancel_stops_producer_and_fails_waiters(self):
        s = Stream(high_water=2)
        producer = FakePushProducer()
        s.attach_producer(producer)
        s.write(b"abc")
        writable = s.wait_writable()
        self.assertNoResult(writable)
        s.cancel()
        self.assertEqual(producer.stopped, 1)
        self.assertTrue(s.cancelled)
        self.failureResultOf(writable, StreamCancelled)
        # buffered data is dropped; later reads fail
        self.failureResultOf(s.read(), StreamCancelled)
        self.failureResultOf(s.wait_writable(), StreamCancelled)
        # writes after cancel are dropped silently, cancel is idempotent
        s.write(b"late")
        s.cancel()
        self.assertEqual(producer.stopped, 1)

    def test_cancel_errbacks_pending_read(self):
        s = Stream()
        d = s.read()
        s.cancel()
        self.failureResultOf(d, StreamCancelled)

    def test_cancelling_the_read_deferred_cancels_the_stream(self):
        s = Stream()
        producer = FakePushProducer()
        s.attach_producer(producer)
        d = s.read()
        d.cancel()
        self.failureResultOf(d, StreamCancelled)
        self.assertTrue(s.cancelled)
        self.assertEqual(producer.stopped, 1)

    def test_attach_after_cancel_stops_producer(self):
        s = Stream()
        s.cancel()
        producer = FakePushProducer()
        s.attach_producer(producer)
        self.assertEqual(producer.stopped, 1)

    def test_cancel_after_finish_does_not_stop_producer(self):
        s = Stream()
        producer = FakePushProducer()
        s.attach_producer(producer)
        s.write(b"x")
        s.finish()
        s.cancel()
        self.assertEqual(producer.stopped, 0)


class PullTests(SynchronousTestCase):
    def test_from_iterable(self):
        s = Stream.from_iterable([b"a", {"k": 1}, b"c"])
        self.assertEqual(self.successResultOf(s.read()), b"a")
        self.assertEqual(self.successResultOf(s.read()), {"k": 1})
        self.assertEqual(self.successResultOf(s.read()), b"c")
        self.assertIs(self.successResultOf(s.read()), EOF)
        self.assertIs(self.successResultOf(s.read()), EOF)

    def test_pull_is_lazy(self):
        pulled = []

        def gen():
            for i in range(3):
                pulled.append(i)
                yield bytes([i])

        s = Stream.from_iterable(gen())
        self.assertEqual(pulled, [])
        self.successResultOf(s.read())
        self.assertEqual(pulled, [0])

    def test_pull_error_fails_the_stream(self):
        def gen():
            yield b"ok"
            raise OSError("disk")

        s = Stream.from_iterable(gen())
        self.assertEqual(self.successResultOf(s.read()), b"ok")
        self.failureResultOf(s.read(), OSError)
        self.failureResultOf(s.read(), OSError)

    def test_from_file_reads_chunks_and_closes_at_eof(self):
        data = bytes(range(256)) * 10
        f = _TrackedFile(data)
        s = Stream.from_file(f, length=len(data), chunk_size=1000)
        self.assertEqual(s.length, len(data))
        self.assertEqual(f.reads, 0)  # nothing read before the consumer asks
        chunks = []
        while True:
            item = self.successResultOf(s.read())
            if item is EOF:
                break
            chunks.append(item)
        self.assertEqual([len(c) for c in chunks], [1000, 1000, 560])
        self.assertEqual(b"".join(chunks), data)
        self.assertTrue(f.closed)

    def test_from_file_starts_at_current_position(self):
        f = io.BytesIO(b"skipREST")
        f.read(4)
        s = Stream.from_file(f, close=False)
        self.assertEqual(self.successResultOf(collect(s)), b"REST")
        self.assertFalse(f.closed)

    def test_from_file_cancel_closes(self):
        f = io.BytesIO(b"x" * 10)
        s = Stream.from_file(f, chunk_size=2)
        self.successResultOf(s.read())
        s.cancel()
        self.assertTrue(f.closed)

    def test_from_file_without_close_leaves_file_open(self):
        f = io.BytesIO(b"x" * 10)
        s = Stream.from_file(f, close=False)
        s.cancel()
        self.assertFalse(f.closed)


class AsyncIterationTests(SynchronousTestCase):
    def test_async_for(self):
        s = Stream()
        seen = []

        async def consume():
            async for item in s:
                seen.append(item)
            return len(seen)

        d = defer.Deferred.fromCoroutine(consume())
        self.assertNoResult(d)
        s.write(b"a")
        self.assertEqual(seen, [b"a"])
        s.write(b"b")
        s.finish()
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(seen, [b"a", b"b"])

    def test_async_for_sees_failure(self):
        s = Stream()
        seen = []

        async def consume():
            async for item in s:
                seen.append(item)

        d = defer.Deferred.fromCoroutine(consume())
        s.write(b"a")
        s.fail(ValueError("upstream"))
        self.failureResultOf(d, ValueError)
        self.assertEqual(seen, [b"a"])


class PipeTests(SynchronousTestCase):
    def test_pipe_everything(self):
        s = Stream.from_iterable([b"a", b"b", b"c"])
        consumer = PausingConsumer()
        d = s.pipe_to(consumer)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(consumer.writes, [b"a", b"b", b"c"])
        self.assertTrue(consumer.streaming)
        self.assertEqual(consumer.unregistered, 1)

    def test_pausing_consumer_stops_reads(self):
        pulled = []

        def gen():
            for i in range(5):
                pulled.append(i)
                yield b"%d" % i

        s = Stream.from_iterable(gen())
        consumer = PausingConsumer(pause_every=2)
        d = s.pipe_to(consumer)
        self.assertNoResult(d)
        self.assertEqual(consumer.writes, [b"0", b"1"])
        self.assertEqual(pulled, [0, 1])  # no read while paused
        producer = consumer.producer
        producer.resumeProducing()
        self.assertEqual(consumer.writes, [b"0", b"1", b"2", b"3"])
        self.assertEqual(pulled, [0, 1, 2, 3])
        producer.resumeProducing()
        self.successResultOf(d)
        self.assertEqual(consumer.writes, [b"0", b"1", b"2", b"3", b"4"])
        self.assertEqual(consumer.unregistered, 1)

    def test_pipe_backpressure_reaches_the_source(self):
        """
        A paused consumer leaves items in the stream, whose buffer then
        pauses the source producer; resuming drains it and resumes the source.
        """
        s = Stream(high_water=4, low_water=1)
        source = FakePushProducer()
        s.attach_producer(source)
        consumer = PausingConsumer(pause_every=1)
        d = s.pipe_to(consumer)
        s.write(b"ab")
        self.assertEqual(consumer.writes, [b"ab"])  # consumer now paused
        s.write(b"cd")
        s.write(b"ef")
        self.assertTrue(source.is_paused)
        consumer.pause_every = 0
        consumer.producer.resumeProducing()
        self.assertEqual(consumer.writes, [b"ab", b"cd", b"ef"])
        self.assertFalse(source.is_paused)
        self.assertNoResult(d)
        s.finish()
        self.successResultOf(d)

    def test_pipe_async_items(self):
        s = Stream()
        consumer = PausingConsumer()
        d = s.pipe_to(consumer)
        s.write(b"1")
        s.write(b"2")
        self.assertEqual(consumer.writes, [b"1", b"2"])
        self.assertNoResult(d)
        s.finish()
        self.successResultOf(d)

    def test_pipe_failure(self):
        s = Stream()
        consumer = PausingConsumer()
        d = s.pipe_to(consumer)
        s.write(b"1")
        s.fail(ValueError("broken"))
        self.failureResultOf(d, ValueError)
        self.assertEqual(consumer.writes, [b"1"])
        self.assertEqual(consumer.unregistered, 1)

    def test_consumer_stop_cancels_stream(self):
        s = Stream()
        source = FakePushProducer()
        s.attach_producer(source)
        consumer = PausingConsumer()
        d = s.pipe_to(consumer)
        consumer.producer.stopProducing()
        self.failureResultOf(d, StreamCancelled)
        self.assertTrue(s.cancelled)
        self.assertEqual(source.stopped, 1)


class CollectTests(SynchronousTestCase):
    def test_collect_bytes_and_none(self):
        self.assertEqual(self.successResultOf(collect(b"abc")), b"abc")
        self.assertEqual(self.successResultOf(collect(bytearray(b"ab"))), b"ab")
        self.assertEqual(self.successResultOf(collect(None)), b"")
        self.failureResultOf(collect(b"abcd", max_bytes=3), PayloadTooLarge)
        self.assertEqual(self.successResultOf(collect(b"abc", max_bytes=3)), b"abc")

    def test_collect_stream(self):
        s = Stream()
        d = collect(s, max_bytes=10)
        s.write(b"hello ")
        s.write(b"you")
        self.assertNoResult(d)
        s.finish()
        self.assertEqual(self.successResultOf(d), b"hello you")

    def test_collect_stream_too_large(self):
        s = Stream()
        producer = FakePushProducer()
        s.attach_producer(producer)
        d = collect(s, max_bytes=5)
        s.write(b"1234")
        self.assertNoResult(d)
        s.write(b"56")
        f = self.failureResultOf(d, PayloadTooLarge)
        self.assertEqual(f.value.status, 413)
        self.assertTrue(s.cancelled)
        self.assertEqual(producer.stopped, 1)

    def test_collect_known_length_too_large_fails_at_once(self):
        s = Stream(length=100)
        d = collect(s, max_bytes=99)
        self.failureResultOf(d, PayloadTooLarge)
        self.assertTrue(s.cancelled)

    def test_collect_propagates_stream_failure(self):
        s = Stream()
        d = collect(s)
        s.write(b"x")
        s.fail(ValueError("lost"))
        self.failureResultOf(d, ValueError)


class BodyProducerTests(SynchronousTestCase):
    def test_stream_body_producer(self):
        s = Stream(length=6)
        producer = StreamBodyProducer(s)
        self.assertEqual(producer.length, 6)
        consumer = PausingConsumer()
        d = producer.startProducing(consumer)
        s.write(b"abc")
        self.assertEqual(consumer.writes, [b"abc"])
        # it must not register itself on the Agent's consumer
        self.assertIsNone(consumer.producer)
        producer.pauseProducing()
        s.write(b"def")
        self.assertEqual(consumer.writes, [b"abc", b"def"])  # an in-flight read completes
        s.finish()
        self.assertNoResult(d)  # paused: EOF not read yet
        producer.resumeProducing()
        self.assertIsNone(self.successResultOf(d))

    def test_stream_body_producer_lazy_source(self):
        s = Stream.from_iterable([b"a", b"b"])
        producer = StreamBodyProducer(s)
        consumer = PausingConsumer()
        d = producer.startProducing(consumer)
        self.successResultOf(d)
        self.assertEqual(consumer.writes, [b"a", b"b"])

    def test_stream_body_producer_unknown_length(self):
        self.assertIs(StreamBodyProducer(Stream()).length, UNKNOWN_LENGTH)

    def test_stream_body_producer_stop_cancels(self):
        s = Stream()
        producer = StreamBodyProducer(s)
        d = producer.startProducing(PausingConsumer())
        producer.stopProducing()
        self.assertTrue(s.cancelled)
        self.failureResultOf(d, StreamCancelled)

    def test_stream_body_producer_stop_while_paused_ends_the_deferred(self):
        # No read is pending while paused: stopping must still end startProducing.
        s = Stream()
        producer = StreamBodyProducer(s)
        d = producer.startProducing(PausingConsumer())
        s.write(b"x")
        producer.pauseProducing()
        s.write(b"y")
        producer.stopProducing()
        self.assertTrue(s.cancelled)
        self.failureResultOf(d, StreamCancelled)

    def test_bytes_body_producer(self):
        producer = BytesBodyProducer(b"payload")
        self.assertEqual(producer.length, 7)
        consumer = PausingConsumer()
        self.successResultOf(producer.startProducing(consumer))
        self.assertEqual(consumer.writes, [b"payload"])
        empty = PausingConsumer()
        self.successResultOf(BytesBodyProducer(b"").startProducing(empty))
        self.assertEqual(empty.writes, [])

    def test_body_producer_dispatch(self):
        self.assertIsNone(body_producer(None))
        self.assertIsInstance(body_producer(b"x"), BytesBodyProducer)
        self.assertIsInstance(body_producer(bytearray(b"x")), BytesBodyProducer)
        self.assertIsInstance(body_producer(Stream()), StreamBodyProducer)

    def test_relay_head_transform_tail(self):
        source = Stream()
        held = []

        def transform(chunk):
            # Holds the last byte back, as a rewriter keeps a carry-over.
            data = b"".join(held) + chunk.upper()
            held[:] = [data[-1:]]
            return data[:-1]

        out = relay(source, head=[b">"], transform=transform, tail=lambda: b"".join(held) + b"<", length=None)
        source.write(b"ab")
        source.write(b"cd")
        source.finish()
        self.assertEqual(self.successResultOf(collect(out)), b">ABCD<")

    def test_relay_cancel_and_failure(self):
        source = Stream()
        out = relay(source)
        out.cancel()
        self.assertTrue(source.cancelled)
        failing = Stream()
        out = relay(failing)
        d = collect(out)
        failing.fail(ValueError("upstream lost"))
        self.failureResultOf(d, ValueError)


class TakeFileTests(SynchronousTestCase):
    """
    Stream.take_file: a stream over a file hands the file over (for
    sendfile) as long as nothing was read from it.
    """

    def _file(self, data):
        fd, path = tempfile.mkstemp()
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.remove, path)
        return path

    def test_a_file_stream_is_taken_whole(self):
        path = self._file(b"0123456789")
        for length, expected in ((None, 10), (10, 10), (4, 4)):
            stream = Stream.from_path(path, length=length)
            source = stream.take_file()
            self.assertEqual(source.available(), (expected, True))
            self.assertEqual(os.pread(source.fileno(), 100, 0), b"0123456789")
            self.assertIsNone(stream.take_file())  # once
            self.assertEqual(self.successResultOf(source.wait()), None)
            source.close()
            source.close()  # idempotent

    def test_not_once_read_from(self):
        stream = Stream.from_path(self._file(b"abc"))
        self.assertEqual(self.successResultOf(stream.read()), b"abc")
        self.assertIsNone(stream.take_file())

    def test_not_without_a_file(self):
        stream = Stream()
        self.assertIsNone(stream.take_file())
        stream.write(b"x")
        self.assertIsNone(stream.take_file())
        self.assertIsNone(Stream.from_bytes(b"abc").take_file())

    def test_a_missing_file_is_not_taken_and_reads_fail(self):
        stream = Stream.from_path("/nonexistent/harmony-test-file")
        self.assertRaises(OSError, stream.take_file)
        self.failureResultOf(stream.read(), FileNotFoundError)

    def test_a_source_that_declines_leaves_the_stream_readable(self):
        class Declining:
            def open(self):
                return False

        stream = Stream()
        stream.offer_file(Declining())
        self.assertIsNone(stream.take_file())
        stream.write(b"data")
        self.assertEqual(self.successResultOf(stream.read()), b"data")
