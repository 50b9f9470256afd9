# -*- test-case-name: tests.unit.test_streams -*-
"""
The one bounded asynchronous stream type of Harmony.

A L{Stream} carries items (body chunks, C-FIND matches, retrieved
instances) from one producer to one consumer with bounded buffering:

  - the producer calls L{Stream.write} / L{Stream.finish} / L{Stream.fail};
    when the buffer goes above its high-water mark the stream pauses the
    attached L{IPushProducer} (a socket, usually) and resumes it when the
    consumer has drained the buffer below the low-water mark;
  - a lazy producer can instead hand the stream a C{pull} function that is
    called whenever the consumer wants an item and the buffer is empty;
  - the consumer calls L{Stream.read} (a Deferred firing with the next item
    or with L{EOF}), iterates with C{async for}, or lets L{Stream.pipe_to}
    write everything into an C{IConsumer} with backpressure both ways;
  - L{Stream.cancel} tells the producer to stop (C{stopProducing}) and
    drops whatever was buffered; errors flow to the consumer as failures.
"""

import os
from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from harmony.errors import PayloadTooLarge


class _EOF:
    def __repr__(self):
        return "EOF"

    def __bool__(self):
        return False


#: Sentinel returned by L{Stream.read} when the stream is finished.
EOF = _EOF()


class StreamCancelled(Exception):
    """
    The consumer cancelled the stream; the producer should stop.
    """


def _sizeof_item(item):
    return len(item) if isinstance(item, (bytes, bytearray, memoryview)) else 1


class Stream:
    """
    A bounded single-producer single-consumer async stream.

    @param high_water: buffered size (bytes for byte chunks, item count for
        other items) above which the producer is paused.
    @param low_water: buffered size under which it is resumed.
    @param length: total size in bytes when known in advance (HTTP
        Content-Length), else C{None}.
    @param pull: optional zero-argument callable returning the next item or
        L{EOF}; used when the buffer is empty (lazy sources such as files).
    """

    def __init__(self, high_water=256 * 1024, low_water=None, length=None, pull=None):
        self.high_water = high_water
        self.low_water = high_water // 4 if low_water is None else low_water
        self.length = length
        self._pull = pull
        self._buffer = deque()
        self._buffered = 0
        self._waiting = None
        self._finished = False
        self._failure = None
        self._cancelled = False
        self._producer = None
        self._producer_paused = False
        self._writable_waiters = []
        #: Something read from this stream (L{take_file} is then too late).
        self._started = False

    # -- producer side ---------------------------------------------------

    @classmethod
    def from_bytes(cls, data):
        """
        A finished stream holding C{data} as a single chunk.
        """
        stream = cls(length=len(data))
        if data:
            stream.write(data)
        stream.finish()
        return stream

    @classmethod
    def from_file(cls, fileobj, length=None, chunk_size=64 * 1024, close=True):
        """
        A lazy stream reading C{fileobj} (from its current position) in
        chunks as the consumer asks.  With C{close}, the file is closed at
        EOF or on cancel.
        """

        def pull():
            chunk = fileobj.read(chunk_size)
            if not chunk:
                if close:
                    fileobj.close()
                return EOF
            return chunk

        stream = cls(length=length, pull=pull)
        if close:
            stream._on_cancel = fileobj.close
        return stream

    @classmethod
    def from_path(cls, path, length=None, chunk_size=64 * 1024):
        """
        A lazy stream over a file that is opened only when the consumer
        first reads (nothing is opened for a consumer that never reads).
        """
        state = {}

        def pull():
            f = state.get("file")
            if f is None:
                f = state["file"] = open(path, "rb")
            chunk = f.read(chunk_size)
            if not chunk:
                f.close()
                return EOF
            return chunk

        def close():
            f = state.get("file")
            if f is not None:
                f.close()

        stream = cls(length=length, pull=pull)
        stream._on_cancel = close
        stream.offer_file(PathSource(path, length))
        return stream

    @classmethod
    def from_iterable(cls, items):
        """
        A lazy stream over an in-memory iterable (used by tests and small
        result sets).
        """
        iterator = iter(items)
        return cls(pull=lambda: next(iterator, EOF))

    _on_cancel = None
    #: The file this stream's bytes come from (a L{PathSource} or alike), if
    #: any: see L{take_file}.
    _file_source = None

    def offer_file(self, source):
        """
        Say that this stream's bytes are also in a file, which a consumer
        may take instead (L{take_file}); C{source} as described there, plus
        C{open()}: C{True} once the consumer may use it (C{False}: read the
        stream as usual).
        """
        self._file_source = source

    def take_file(self):
        """
        The stream's bytes as an open file instead of items, for a consumer
        that can send a file itself (sendfile(2)): a source with
        C{fileno()}, C{available() -> (limit, complete)} (the first
        C{limit} bytes of the file are the stream's; C{complete}: that is
        all), C{wait()} (a Deferred firing when C{available()} changed, or
        failing with the producer's error) and C{close()}.  The stream is
        not to be read afterwards.

        @return: the source, or C{None} when the stream has no file behind
            it or was read from already (then read it as usual).
        @raise OSError: the file cannot be opened (nothing was taken).
        """
        source = self._file_source
        if source is None or self._started or self._buffer or self._cancelled or self._finished:
            return None
        if not source.open():
            return None
        self._file_source = None
        self._started = True
        self._pull = None
        return source

    def attach_producer(self, producer):
        """
        Attach the L{IPushProducer} feeding this stream so that it can be
        paused when the buffer is full and stopped on cancel.
        """
        self._producer = producer
        if self._cancelled:
            producer.stopProducing()
        elif self._buffered >= self.high_water:
            self._pause_producer()

    @property
    def cancelled(self):
        return self._cancelled

    @property
    def writable(self):
        """
        C{True} while the buffer is below its high-water mark.
        """
        return self._buffered < self.high_water

    def wait_writable(self):
        """
        A Deferred that fires when the buffer has room again (at once when
        it already has).  Fails with L{StreamCancelled} if the consumer
        cancels.
        """
        if self._cancelled:
            return defer.fail(StreamCancelled())
        if self.writable:
            return defer.succeed(None)
        d = defer.Deferred()
        self._writable_waiters.append(d)
        return d

    def write(self, item):
        """
        Add an item.  Items written after a cancel are dropped.
        """
        if self._cancelled:
            return
        if self._finished:
            raise RuntimeError("write() after finish()")
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(item)
            return
        self._buffer.append(item)
        self._buffered += _sizeof_item(item)
        if self._buffered >= self.high_water:
            self._pause_producer()

    def finish(self):
        """
        No more items.
        """
        if self._finished or self._cancelled:
            return
        self._finished = True
        if self._waiting is not None and not self._buffer:
            d, self._waiting = self._waiting, None
            d.callback(EOF)

    def fail(self, reason):
        """
        End the stream with an error; the consumer sees it after the items
        already buffered.
        """
        if self._finished or self._cancelled:
            return
        self._failure = reason if isinstance(reason, Failure) else Failure(reason)
        self._finished = True
        if self._waiting is not None and not self._buffer:
            d, self._waiting = self._waiting, None
            d.errback(self._failure)

    # -- consumer side ---------------------------------------------------

    def read(self):
        """
        A Deferred firing with the next item, or L{EOF} at the end, or
        failing with the producer's error.
        """
        if self._waiting is not None:
            raise RuntimeError("concurrent read() on a Stream")
        if self._cancelled:
            return defer.fail(StreamCancelled())
        self._started = True
        if self._buffer:
            item = self._buffer.popleft()
            self._buffered -= _sizeof_item(item)
            self._maybe_resume()
            return defer.succeed(item)
        if self._finished:
            if self._failure is not None:
                return defer.fail(self._failure)
            return defer.succeed(EOF)
        if self._pull is not None:
            try:
                item = self._pull()
            except Exception:
                self.fail(Failure())
                return defer.fail(self._failure)
            if item is EOF:
                self._finished = True
            return defer.succeed(item)
        self._waiting = defer.Deferred(lambda d: self.cancel())
        return self._waiting

    def cancel(self):
        """
        The consumer gives up: stop the producer and drop the buffer.
        """
        if self._cancelled:
            return
        self._cancelled = True
        self._buffer.clear()
        self._buffered = 0
        if self._on_cancel is not None:
            self._on_cancel()
        if self._producer is not None and not self._finished:
            self._producer.stopProducing()
        waiters, self._writable_waiters = self._writable_waiters, []
        for d in waiters:
            d.errback(StreamCancelled())
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            if not d.called:
                d.errback(StreamCancelled())

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.read()
        if item is EOF:
            raise StopAsyncIteration
        return item

    def pipe_to(self, consumer):
        """
        Write every item into C{consumer} (an C{IConsumer} such as a
        twisted.web request or a client transport), honouring its
        backpressure.  Returns a Deferred that fires when the stream ended.
        """
        return _Pipe(self, consumer).start()

    # -- internals --------------------------------------------------------

    def _pause_producer(self):
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _maybe_resume(self):
        if self._buffered > self.low_water:
            return
        if self._producer_paused and self._producer is not None:
            self._producer_paused = False
            self._producer.resumeProducing()
        waiters, self._writable_waiters = self._writable_waiters, []
        for d in waiters:
            d.callback(None)


@implementer(IPushProducer)
class _Pipe:
    """
    Moves a L{Stream} into an C{IConsumer}, registered on it as a streaming
    producer so that a slow consumer pauses the reads.
    """

    def __init__(self, stream, consumer):
        self._stream = stream
        self._consumer = consumer
        self._paused = False
        self._reading = False
        self._done = defer.Deferred()

    def start(self):
        self._consumer.registerProducer(self, True)
        self._pump()
        return self._done

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if not self._reading and not self._done.called:
            self._pump()

    def stopProducing(self):
        self._stream.cancel()
        self._end(Failure(StreamCancelled()))

    def _pump(self):
        while not self._paused and not self._done.called:
            self._reading = True
            d = self._stream.read()
            if not d.called:
                d.addCallbacks(self._got_async, self._end)
                return
            self._reading = False
            result = []
            d.addCallbacks(result.append, lambda f: result.append(f))
            item = result[0]
            if isinstance(item, Failure):
                self._end(item)
                return
            if item is EOF:
                self._end(None)
                return
            self._consumer.write(item)

    def _got_async(self, item):
        self._reading = False
        if self._done.called:
            return
        if item is EOF:
            self._end(None)
            return
        self._consumer.write(item)
        self._pump()

    def _end(self, result):
        if self._done.called:
            return
        self._consumer.unregisterProducer()
        if isinstance(result, Failure):
            self._done.errback(result)
        else:
            self._done.callback(None)


@implementer(IPushProducer)
class _CancelSource:
    """
    Stops the source stream when the relayed stream is cancelled.
    """

    def __init__(self, source):
        self._source = source

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        self._source.cancel()


def relay(source, head=(), transform=None, tail=None, length=None, high_water=None):
    """
    A new L{Stream} of the C{head} chunks, then every chunk of C{source}
    (through C{transform}, which may hold bytes back by returning less),
    then C{tail()}'s bytes; with backpressure (C{source} is read only while
    the new stream has room).  Cancelling it cancels C{source}; an error of
    C{source} reaches its consumer.

    @param length: the new stream's length, when known.
    @param high_water: its high-water mark (default: C{source}'s).
    """
    out = Stream(
        high_water=source.high_water if high_water is None else high_water,
        low_water=source.low_water if high_water is None else None,
        length=length,
    )
    out.attach_producer(_CancelSource(source))
    for chunk in head:
        out.write(chunk)

    async def run():
        try:
            async for chunk in source:
                data = chunk if transform is None else transform(chunk)
                if data:
                    await out.wait_writable()
                    out.write(data)
            rest = tail() if tail is not None else b""
            if rest:
                await out.wait_writable()
                out.write(rest)
        except StreamCancelled:
            return
        except Exception:
            out.fail(Failure())
            return
        out.finish()

    defer.Deferred.fromCoroutine(run())
    return out


@implementer(IBodyProducer)
class StreamBodyProducer:
    """
    An C{IBodyProducer} (for treq/Agent request bodies) reading a L{Stream}.
    """

    def __init__(self, stream):
        self._stream = stream
        self.length = stream.length if stream.length is not None else UNKNOWN_LENGTH
        self._pipe = None

    def startProducing(self, consumer):
        self._pipe = _Pipe(self._stream, _NoRegisterConsumer(consumer))
        return self._pipe.start()

    def pauseProducing(self):
        if self._pipe is not None:
            self._pipe.pauseProducing()

    def resumeProducing(self):
        if self._pipe is not None:
            self._pipe.resumeProducing()

    def stopProducing(self):
        # Ends the startProducing Deferred (with StreamCancelled) as well.
        if self._pipe is not None:
            self._pipe.stopProducing()
        else:
            self._stream.cancel()


class _NoRegisterConsumer:
    """
    Agent's body consumer pauses and resumes the IBodyProducer itself, so
    the pipe must not register with it.
    """

    def __init__(self, consumer):
        self.write = consumer.write

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


@implementer(IBodyProducer)
class BytesBodyProducer:
    """
    A body producer for bytes already in memory: writes synchronously, so
    small request bodies cost no extra reactor turns.
    """

    def __init__(self, data):
        #: The whole body; HTTP clients may write it with the request head.
        self.body_bytes = data
        self.length = len(data)

    def startProducing(self, consumer):
        if self.body_bytes:
            consumer.write(self.body_bytes)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def body_producer(body):
    """
    The C{IBodyProducer} for an envelope body (bytes, L{Stream} or C{None}).
    """
    if body is None:
        return None
    if isinstance(body, Stream):
        return StreamBodyProducer(body)
    return BytesBodyProducer(bytes(body))


def collect(body, max_bytes=None):
    """
    Read a whole body (bytes or L{Stream}) into memory.  Only for bodies
    known to be small or guarded by C{max_bytes}: exceeding it cancels the
    stream and fails with L{PayloadTooLarge}.

    @return: Deferred[bytes]
    """
    if body is None:
        return defer.succeed(b"")
    if not isinstance(body, Stream):
        data = bytes(body)
        if max_bytes is not None and len(data) > max_bytes:
            return defer.fail(PayloadTooLarge())
        return defer.succeed(data)
    if max_bytes is not None and body.length is not None and body.length > max_bytes:
        body.cancel()
        return defer.fail(PayloadTooLarge())

    chunks = []
    size = [0]

    async def run():
        async for chunk in body:
            size[0] += len(chunk)
            if max_bytes is not None and size[0] > max_bytes:
                body.cancel()
                raise PayloadTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    return defer.Deferred.fromCoroutine(run())


class PathSource:
    """
    A whole file as a L{Stream.take_file} source.

    @param length: the bytes to send (the file's size when C{None}).
    """

    def __init__(self, path, length=None):
        self._path = path
        self._length = length
        self._fd = None

    def open(self):
        """
        Open the file.

        @return: C{True}.
        @raise OSError: it cannot be opened.
        """
        self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if self._length is None:
            self._length = os.fstat(self._fd).st_size
        return True

    def fileno(self):
        return self._fd

    def available(self):
        return self._length, True

    def wait(self):
        return defer.succeed(None)

    def close(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
