# -*- test-case-name: tests.integration.test_http_sendfile -*-
"""
Response bodies sent straight from a file with sendfile(2): the kernel
moves the bytes from the page cache to the socket, without reading them
into Python and copying them through twisted.web's and Twisted's buffers
(a stored JMIX package, a zip being built).

Only on a plain TCP connection (a TLS connection has to encrypt the bytes
in this process) and only for a body whose L{harmony.streams.Stream} has a
file behind it that nothing has read from yet (L{Stream.take_file}); every
other body goes through the usual path.

How it fits in Twisted: the status line, headers and chunk framing go
through twisted.web as usual; file bytes are sent only once the
connection's own write buffer is empty.  To learn when it is (and when a
socket that was full can take more), the writer marks the transport's
producer (the HTTP channel) as paused and asks the transport to write: the
transport then calls the channel's C{resumeProducing} as soon as its buffer
is on the wire, and the channel calls the request's producer, this writer.
"""

import errno
import os

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.logs import logger
from harmony.streams import StreamCancelled
from harmony.transport import buffered, write_now

log = logger("harmony.http.sendfile")

#: Bytes sent at most per sendfile(2) call, and per reactor turn: a file
#: not in the page cache is read from disk on the reactor thread (as the
#: usual path reads it), so a turn stays short.
SENDFILE_CHUNK = 1024 * 1024
TURN_LIMIT = 4 * 1024 * 1024

#: Errors of a connection the client closed.
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)


def usable(request):
    """
    Whether C{request}'s response can be sent with sendfile(2): a plain
    TCP connection whose producer is the HTTP channel, as twisted.web sets
    it up.
    """
    if not hasattr(os, "sendfile"):
        return False
    channel = request.channel
    transport = getattr(channel, "transport", None)
    return (
        buffered(transport) is not None
        and transport.connected
        and getattr(transport, "producer", None) is channel
        and getattr(transport, "streamingProducer", False)
        and hasattr(transport, "producerPaused")
    )


@implementer(IPushProducer)
class SendfileWriter:
    """
    Sends a response body from a file source (see L{Stream.take_file}) on
    C{request}'s connection; the status and headers are already set.

    L{start} returns a Deferred that fires once the whole body is on its
    way (then finish the request), or fails: L{StreamCancelled} when the
    client went away, the source's error or an C{OSError} otherwise (the
    status line is sent by then: abort the connection).
    """

    def __init__(self, request, source):
        self._request = request
        self._source = source
        self._transport = request.channel.transport
        self._socket = self._transport.fileno()
        self._offset = 0
        self._chunked = False
        self._chunk_left = 0
        self._trailer_due = False
        self._paused = False
        self._stepping = False
        self._waiting = None
        self._ended = False
        self._done = defer.Deferred()

    def start(self):
        request = self._request
        # The client going away ends the body whatever the writer waits for.
        request.notifyFinish().addErrback(lambda _: self._end(Failure(StreamCancelled())))
        request.registerProducer(self, True)
        request.write(b"")  # the status line and headers, through twisted.web
        self._chunked = bool(getattr(request, "chunked", False))
        self._flush()
        return self._done

    # -- IPushProducer (driven by the HTTP channel) ----------------------------

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._step()

    def stopProducing(self):
        self._end(Failure(StreamCancelled()))

    # -- internals ------------------------------------------------------------

    def _flush(self):
        """
        Continue once the transport's buffer is on the wire and the socket
        takes more (the channel then calls L{resumeProducing}).
        """
        transport = self._transport
        if not transport.connected or transport.disconnecting:
            self._end(Failure(StreamCancelled()))
            return
        transport.producerPaused = True
        transport.startWriting()

    def _step(self):
        if self._stepping or self._ended or self._waiting is not None:
            return
        self._stepping = True
        try:
            self._steps()
        except Exception:
            self._end(Failure())
        finally:
            self._stepping = False

    def _steps(self):
        source, transport = self._source, self._transport
        sent_now = 0
        while not self._paused and not self._ended:
            if buffered(transport):
                self._flush()
                return
            limit, complete = source.available()
            if self._offset > limit:
                raise OSError(errno.EIO, "the file source went back")
            if self._offset == limit:
                if complete:
                    if self._trailer_due:
                        transport.write(b"\r\n")
                    self._end(None)
                    return
                self._waiting = source.wait()
                self._waiting.addCallbacks(self._more, self._source_failed)
                return
            if self._chunked and self._chunk_left == 0:
                # One chunk for what is there: its header (after the last
                # chunk's end), straight to the socket when it takes it.
                self._chunk_left = limit - self._offset
                write_now(transport, b"%s%x\r\n" % (b"\r\n" if self._trailer_due else b"", self._chunk_left))
                self._trailer_due = False
                continue
            if sent_now >= TURN_LIMIT:
                # Let the reactor serve the others; go on once writable again.
                self._flush()
                return
            count = min(limit - self._offset, SENDFILE_CHUNK)
            if self._chunked:
                count = min(count, self._chunk_left)
            try:
                sent = os.sendfile(self._socket, source.fileno(), self._offset, count)
            except BlockingIOError:
                self._flush()
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _GONE:
                    self._end(Failure(StreamCancelled()))
                    return
                raise
            if sent == 0:
                raise OSError(errno.EIO, "the file ended before the response")
            self._offset += sent
            sent_now += sent
            self._request.sentLength += sent
            if self._chunked:
                self._chunk_left -= sent
                self._trailer_due = self._chunk_left == 0

    def _more(self, _):
        self._waiting = None
        self._step()

    def _source_failed(self, failure):
        self._waiting = None
        self._end(failure)

    def _end(self, failure):
        if self._ended:
            return
        self._ended = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.addErrback(lambda _: None)
            waiting.cancel()
        try:
            self._source.close()
        except OSError as e:
            log.warn("Closing a response's file failed: {reason}", reason=e.strerror)
        request = self._request
        if request.channel is not None and getattr(request, "producer", None) is self:
            request.unregisterProducer()
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)
