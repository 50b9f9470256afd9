# -*- test-case-name: tests.unit.test_dicomweb_multipart -*-
"""
multipart/related (RFC 2387, RFC 2046 section 5.1) for DICOMweb, streamed
both ways.

Writing: L{multipart_stream} turns an async iterable of L{Part}s into a
L{Stream} of bytes::

    --B CRLF Content-Type: ... CRLF [Content-Location: ... CRLF] CRLF <body> CRLF
    ...
    --B-- CRLF

Production follows the consumer: nothing more is written into the output
stream while it is above its high-water mark, and part bodies that are
streams are read one chunk at a time, so at most about C{high_water} bytes
of part bodies are read ahead of the consumer.  Cancelling the output
stream cancels the parts source (its C{cancel()}, when it has one), the
body being written, and calls C{on_done} of every part taken from the
source but not completely written; a failing source or body fails the
output stream (after the same clean-up).

The Content-Type of such a body, per PS3.18 section 8.7.3.5.1 (the
transfer syntax is a parameter of the multipart media type, after the
boundary; Orthanc also places it there), comes from L{related_content_type}::

    multipart/related; type="application/dicom"; boundary=B; transfer-syntax=1.2.840.10008.1.2.1

Reading: L{read_parts} parses a request body (bytes or a L{Stream}) with a
sans-IO framer (L{RelatedParser}) that never holds more than the current
chunk plus a delimiter's length, handing each part's bytes to a sink as
they arrive (the C{multipart} package's parser only knows form-data parts,
which need a Content-Disposition, so the framing is done here).  Part
bodies are byte exact: a CRLF followed by C{--boundary} ends a part only
when the boundary is followed by C{--} (the close delimiter) or by optional
spaces/tabs and a CRLF; anything else is body data.  Preamble and epilogue
are ignored.
"""

import secrets

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.envelope import Headers
from harmony.errors import BadRequest, UnsupportedMediaType
from harmony.streams import EOF, Stream, StreamCancelled

log = Logger()

#: The most bytes the header block of one part may take.
MAX_PART_HEADERS = 16 * 1024

#: The most spaces/tabs accepted between a boundary and its CRLF (RFC 2046 transport padding).
_MAX_PADDING = 256

#: Bytes bodies are written into the output stream in slices of this size.
_SLICE = 64 * 1024

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: RFC 2046 bchars (a boundary may also hold spaces, but not at its end).
_BOUNDARY_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


# -- media types ----------------------------------------------------------------------------


def new_boundary():
    """
    A fresh random boundary (32 hex digits: token characters only).
    """
    return secrets.token_hex(16)


def _malformed(what):
    return BadRequest(f"Malformed media type in {what}")


def scan_media_type(text, pos=0, in_list=False, what="Content-Type"):
    """
    Read one media type (or media range) with its parameters from C{text}
    at C{pos}.

    Parameter names are lower-cased; values are unquoted (a quoted string
    may hold C{;}, C{,}, C{=} and backslash escapes).  With C{in_list}, a
    comma outside quotes ends the media type (Accept lists).

    @return: C{(media_type_lower, params, next_pos)}; C{media_type} is
        C{""} for an empty list element.
    @raise BadRequest: unterminated quoted string, a parameter without
        C{=}, or stray characters.
    """
    n = len(text)
    stops = ";," if in_list else ";"
    i = pos
    while i < n and text[i] not in stops:
        i += 1
    mtype = text[pos:i].strip().lower()
    params = {}
    while i < n and text[i] == ";":
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] in stops:
            continue  # an empty parameter (";;" or a trailing ";")
        start = i
        while i < n and text[i] not in "=" + stops:
            i += 1
        if i >= n or text[i] != "=":
            raise _malformed(what)
        name = text[start:i].strip().lower()
        if not name:
            raise _malformed(what)
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    raise _malformed(what)
                c = text[i]
                if c == "\\" and i + 1 < n:
                    chars.append(text[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                chars.append(c)
                i += 1
            value = "".join(chars)
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] not in stops:
                raise _malformed(what)
        else:
            start = i
            while i < n and text[i] not in stops:
                i += 1
            value = text[start:i].strip()
        params.setdefault(name, value)
    return mtype, params, i


def parse_content_type(value):
    """
    The media type (lower case) and parameters of a Content-Type value.

    >>> parse_content_type('multipart/related; type="application/dicom"; boundary=XYZ')
    ('multipart/related', {'type': 'application/dicom', 'boundary': 'XYZ'})

    @return: C{(media_type, params)}: parameter names lower-cased, values
        unquoted.
    @raise BadRequest: a malformed value.
    """
    mtype, params, _ = scan_media_type(value or "")
    if mtype and "/" not in mtype:
        raise _malformed("Content-Type")
    return mtype, params


def _quote(value):
    if value and all(c in _TOKEN_CHARS for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def related_content_type(part_type, boundary, transfer_syntax=None):
    """
    The Content-Type of a multipart/related body whose parts are
    C{part_type}, per PS3.18 section 8.7.3.5.1::

        multipart/related; type="application/dicom"; boundary=B[; transfer-syntax=UID]
    """
    value = f'multipart/related; type="{part_type}"; boundary={_quote(boundary)}'
    if transfer_syntax:
        value += f"; transfer-syntax={_quote(transfer_syntax)}"
    return value


# -- writing ----------------------------------------------------------------------------------


@attr.s(slots=True)
class Part:
    """
    One part of a multipart body.

    @ivar content_type: the part's Content-Type value.
    @ivar body: C{bytes} or a L{Stream} of bytes.
    @ivar location: the Content-Location header, or C{None}.
    @ivar headers: more C{(name, value)} header pairs.
    @ivar on_done: C{None} or a zero-argument callable, called exactly once
        when the part has been completely written or was abandoned (cancel,
        failure): where spooled files get deleted.
    """

    content_type = attr.ib()
    body = attr.ib()
    location = attr.ib(default=None)
    headers = attr.ib(default=(), converter=tuple)
    on_done = attr.ib(default=None)


def _check_header(name, value):
    if any(c in "\r\n" for c in name + value) or not name or ":" in name:
        raise ValueError("Invalid multipart part header")


def _part_head(part, boundary, first):
    lines = [("" if first else "\r\n") + f"--{boundary}", f"Content-Type: {part.content_type}"]
    _check_header("Content-Type", str(part.content_type))
    if part.location is not None:
        _check_header("Content-Location", str(part.location))
        lines.append(f"Content-Location: {part.location}")
    for name, value in part.headers:
        _check_header(str(name), str(value))
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _done(part):
    """
    Call C{part.on_done} once (later calls do nothing); its errors are
    logged, not raised.
    """
    if part is None:
        return
    callback, part.on_done = part.on_done, None
    if callback is not None:
        try:
            callback()
        except Exception:
            log.failure("multipart part on_done failed")


def multipart_stream(parts, boundary, high_water=256 * 1024):
    """
    A L{Stream} of the multipart/related body of C{parts}.

    @param parts: an async iterable of L{Part} (a L{Stream} of parts or an
        async generator, for example); when it has a C{cancel()}, that is
        called if the output stream is cancelled or fails.
    @param boundary: the boundary (see L{new_boundary}).
    @param high_water: the output stream's buffer bound in bytes.
    @return: a L{Stream} of C{bytes} (length unknown).
    """
    return _MultipartWriter(parts, boundary, high_water).output


@implementer(IPushProducer)
class _MultipartWriter:
    """
    Drives one multipart body; registered as the output stream's producer
    only to hear about cancellation (backpressure uses C{wait_writable}).
    """

    def __init__(self, parts, boundary, high_water):
        self.output = Stream(high_water=high_water)
        self._parts = parts
        self._boundary = boundary
        self._part = None
        self._body = None
        self._pending = None
        self._cancelled = False
        self._source_closed = False
        self._iterator = None if isinstance(parts, Stream) else parts.__aiter__()
        self.output.attach_producer(self)
        d = defer.Deferred.fromCoroutine(self._run())
        d.addErrback(lambda f: log.failure("multipart writer failed", f))

    # IPushProducer: only stopProducing matters.
    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        if self._cancelled:
            return
        self._cancelled = True
        # Whatever the loop waits for fails, and the loop cleans up (_abandon).
        pending = self._pending
        if pending is not None and not pending.called:
            pending.cancel()
        if self._body is not None:
            self._body.cancel()

    # -- the loop --------------------------------------------------------------------------

    async def _wait(self, make):
        """
        Wait for the Deferred C{make()} returns (cancelled if the output
        is); nothing is started once the output was cancelled.
        """
        if self._cancelled:
            raise StreamCancelled()
        d = self._pending = make()
        try:
            return await d
        finally:
            self._pending = None

    async def _next_part(self):
        parts = self._parts
        if isinstance(parts, Stream):
            item = await self._wait(parts.read)
            return None if item is EOF else item

        async def step():
            return await self._iterator.__anext__()

        try:
            return await self._wait(lambda: defer.Deferred.fromCoroutine(step()))
        except StopAsyncIteration:
            return None

    async def _write(self, data):
        await self._wait(self.output.wait_writable)
        self.output.write(data)

    async def _run(self):
        first = True
        try:
            while True:
                part = await self._next_part()
                if part is None:
                    break
                self._part = part
                if self._cancelled:
                    break
                await self._write(_part_head(part, self._boundary, first))
                first = False
                body = part.body
                if isinstance(body, Stream):
                    self._body = body
                    while True:
                        await self._wait(self.output.wait_writable)
                        chunk = await self._wait(body.read)
                        if chunk is EOF:
                            break
                        self.output.write(chunk)
                    self._body = None
                elif body:
                    body = bytes(body)
                    if len(body) <= _SLICE:
                        await self._write(body)
                    else:
                        view = memoryview(body)
                        for start in range(0, len(view), _SLICE):
                            await self._write(bytes(view[start : start + _SLICE]))
                self._part = None
                _done(part)
            if not self._cancelled:
                await self._write(("" if first else "\r\n").encode() + f"--{self._boundary}--\r\n".encode())
                self.output.finish()
        except BaseException:
            failure = Failure()
            self._abandon()
            if not self._cancelled:
                self.output.fail(failure)
            elif not failure.check(defer.CancelledError, StreamCancelled):
                log.failure("multipart source failed after cancel", failure)
            return
        if self._cancelled:
            self._abandon()

    def _abandon(self):
        """
        Clean up after a cancel or a failure: the current part's body and
        on_done, then the source.
        """
        if self._body is not None:
            self._body.cancel()
            self._body = None
        part, self._part = self._part, None
        _done(part)
        self._close_source()

    def _close_source(self):
        """
        Stop the source: parts still buffered in a L{Stream} source are
        taken and released (their bodies cancelled, their C{on_done}
        called) so that no spooled file is left behind; then its
        C{cancel()} is called.
        """
        if self._source_closed:
            return
        self._source_closed = True
        parts = self._parts
        if isinstance(parts, Stream) and not parts.cancelled:
            while True:
                d = parts.read()
                box = []
                d.addBoth(box.append)
                if not box:
                    parts.cancel()  # fails the read just made: box.append consumed the failure
                    break
                item = box[0]
                if isinstance(item, Failure) or item is EOF:
                    break
                if isinstance(getattr(item, "body", None), Stream):
                    item.body.cancel()
                _done(item)
        cancel = getattr(parts, "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception:
                log.failure("multipart source cancel failed")


# -- reading ----------------------------------------------------------------------------------

_PREAMBLE, _HEADERS, _BODY, _EPILOGUE = "preamble", "headers", "body", "epilogue"


class PartStart:
    """
    Parser event: a part begins; C{headers} are its L{Headers}.
    """

    __slots__ = ("headers",)

    def __init__(self, headers):
        self.headers = headers


class PartEnd:
    """
    Parser event: the current part is complete.
    """

    __slots__ = ()


PART_END = PartEnd()


class RelatedParser:
    """
    A sans-IO multipart framer: C{feed(data)} returns a list of events --
    L{PartStart}, C{bytes} (body data of the current part), L{PART_END} --
    and C{close()} checks that the body ended properly.

    @raise BadRequest: from C{feed}/C{close} for malformed bodies.
    """

    def __init__(self, boundary, max_parts=None):
        if not boundary or len(boundary) > 200:
            raise BadRequest("multipart/related body without a valid boundary parameter")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._max_parts = max_parts
        # The body may start with the delimiter itself: pretend a CRLF before it.
        self._buffer = b"\r\n"
        self._state = _PREAMBLE
        self.parts = 0

    def feed(self, data):
        events = []
        if self._state == _EPILOGUE:
            return events
        self._buffer += data
        while True:
            if self._state == _PREAMBLE or self._state == _BODY:
                if not self._scan(events):
                    break
            elif self._state == _HEADERS:
                if not self._headers(events):
                    break
            else:
                self._buffer = b""
                break
        return events

    def close(self):
        if self._state == _PREAMBLE:
            raise BadRequest("multipart/related body without an opening boundary delimiter")
        if self._state == _HEADERS:
            raise BadRequest(f"Part {self.parts} of the multipart body has headers without the ending blank line")
        if self._state == _BODY:
            raise BadRequest("multipart/related body without its closing boundary delimiter")
        return []

    def _scan(self, events):
        """
        Look for a delimiter in the buffer: body data before it goes out as
        events (not in the preamble).  Returns C{True} when the state
        changed (more work may be possible).
        """
        buf = self._buffer
        delim = self._delimiter
        searched = 0
        while True:
            i = buf.find(delim, searched)
            if i < 0:
                cut = max(len(buf) - (len(delim) - 1), 0)
                self._emit(events, buf[:cut])
                self._buffer = buf[cut:]
                return False
            after = i + len(delim)
            verdict = self._delimiter_kind(buf, after)
            if verdict is None:
                # Undecided until more bytes arrive: keep from the delimiter on.
                self._emit(events, buf[:i])
                self._buffer = buf[i:]
                return False
            if verdict is False:
                searched = after  # the boundary followed by something else: plain data
                continue
            self._emit(events, buf[:i])
            if self._state == _BODY:
                events.append(PART_END)
            if verdict == "close":
                self._state = _EPILOGUE
                self._buffer = b""
            else:
                self._state = _HEADERS
                self._buffer = buf[verdict:]
            return True

    @staticmethod
    def _delimiter_kind(buf, after):
        """
        What follows C{--boundary} at C{after}: C{"close"} (C{--}), the
        offset where the next part's headers start (optional spaces/tabs
        and CRLF), C{False} (not a delimiter: body data) or C{None} (not
        enough bytes yet).
        """
        n = len(buf)
        if after >= n:
            return None
        if buf[after] == 0x2D:  # "-"
            if after + 1 >= n:
                return None
            return "close" if buf[after + 1] == 0x2D else False
        j = after
        while j < n and buf[j] in (0x20, 0x09) and j - after <= _MAX_PADDING:
            j += 1
        if j - after > _MAX_PADDING:
            return False
        if j >= n:
            return None
        if buf[j] != 0x0D:
            return False
        if j + 1 >= n:
            return None
        return j + 2 if buf[j + 1] == 0x0A else False

    def _emit(self, events, data):
        if data and self._state == _BODY:
            events.append(bytes(data))

    def _headers(self, events):
        buf = self._buffer
        if buf.startswith(b"\r\n"):
            end, block = 2, b""
        else:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_PART_HEADERS:
                    raise BadRequest(f"Part {self.parts + 1} of the multipart body has headers over 16 KiB")
                return False
            end, block = i + 4, buf[:i]
        if end > MAX_PART_HEADERS + 4:
            raise BadRequest(f"Part {self.parts + 1} of the multipart body has headers over 16 KiB")
        if self._max_parts is not None and self.parts >= self._max_parts:
            raise BadRequest(f"Too many parts in the multipart body (at most {self._max_parts})")
        self.parts += 1
        events.append(PartStart(self._parse_headers(block)))
        self._buffer = buf[end:]
        self._state = _BODY
        return True

    def _parse_headers(self, block):
        pairs = []
        for line in block.split(b"\r\n") if block else ():
            if line[:1] in (b" ", b"\t") and pairs:
                name, value = pairs[-1]
                pairs[-1] = (name, value + b" " + line.strip())
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name.strip() or name != name.strip():
                raise BadRequest(f"Part {self.parts} of the multipart body has a malformed header line")
            pairs.append((name, value.strip()))
        return Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs])


def _maybe_await(value):
    return value if isinstance(value, defer.Deferred) else None


async def read_parts(body, content_type, open_part, max_parts=None):
    """
    Read a multipart/related request body part by part.

    For each part, C{open_part(index, headers)} (index from 0, the part's
    L{Headers}) returns a sink (or a Deferred of one) with C{write(data)}
    (its result may be a Deferred: backpressure, waited for), C{close()}
    (its result, or the Deferred's, is what the part became) and
    C{abort()} (called, once, when reading fails while the sink is open).

    @param body: C{bytes} or a L{Stream} (cancelled when reading fails).
    @param content_type: the body's Content-Type (C{multipart/related} with
        a boundary).
    @param max_parts: C{None} or the most parts accepted.
    @return: the list of the C{close()} results, in part order.
    @raise UnsupportedMediaType: the Content-Type is not multipart/related.
    @raise BadRequest: a malformed body (after aborting the open sink).
    """
    sink = None
    try:
        mtype, params = parse_content_type(content_type)
        if mtype != "multipart/related":
            raise UnsupportedMediaType("Expected a multipart/related body")
        parser = RelatedParser(params.get("boundary"), max_parts)
        results = []
        index = 0

        async def handle(events):
            nonlocal sink, index
            for event in events:
                if isinstance(event, bytes):
                    d = _maybe_await(sink.write(event))
                    if d is not None:
                        await d
                elif event is PART_END:
                    result = sink.close()
                    if isinstance(result, defer.Deferred):
                        result = await result
                    sink = None  # closed: a failing close() leaves it to abort()
                    results.append(result)
                else:
                    opened = open_part(index, event.headers)
                    if isinstance(opened, defer.Deferred):
                        opened = await opened
                    sink = opened
                    index += 1

        if isinstance(body, Stream):
            async for chunk in body:
                await handle(parser.feed(chunk))
        elif body:
            view = memoryview(bytes(body))
            for start in range(0, len(view), _SLICE):
                await handle(parser.feed(bytes(view[start : start + _SLICE])))
        await handle(parser.close())
        return results
    except BaseException:
        if sink is not None:
            try:
                sink.abort()
            except Exception:
                log.failure("multipart part sink abort failed")
        if isinstance(body, Stream):
            body.cancel()
        raise
