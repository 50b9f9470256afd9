"""
Response bodies sent with sendfile(2) (harmony.http.sendfile) on real
sockets on 127.0.0.1: a file of known length, a file still growing
(chunked, and HTTP/1.0 until close), a client that goes away, a source
that fails and a file shorter than announced; the connection or the
server keeps working afterwards.
"""

import os
import socket
import types

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.web import resource, server

from harmony.envelope import ResponseEnvelope
from harmony.http.adapter import HttpAdapter
from harmony.http.site import make_site
from harmony.streams import Stream


class GrowingFile:
    """A file source (Stream.take_file) whose file the test appends to."""

    def __init__(self, path):
        self.path = path
        open(path, "wb").close()
        self.limit = 0
        self.final = False
        self.failure = None
        self.fd = None
        self.closed = False
        self._waiters = []

    def open(self):
        self.fd = os.open(self.path, os.O_RDONLY)
        return True

    def fileno(self):
        return self.fd

    def available(self):
        return self.limit, self.final

    def wait(self):
        if self.failure is not None:
            return defer.fail(self.failure)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.closed = True

    def grow(self, data, final=False):
        with open(self.path, "ab") as f:
            f.write(data)
        self.limit += len(data)
        self.final = final
        self._wake()

    def fail(self, error):
        self.failure = error
        self._wake()

    def _wake(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self.failure is not None:
                d.errback(self.failure)
            else:
                d.callback(None)


class Files(resource.Resource):
    """Answers GET <name> with the body the test registered under it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = {}
        self.written = {}
        self.adapter = HttpAdapter(types.SimpleNamespace(public_base_url="", trusted_proxies=()))

    def render(self, request):
        name = request.path.decode()
        envelope = ResponseEnvelope(
            status=200, headers=[("Content-Type", "application/octet-stream")], body=self.bodies[name]()
        )
        self.written[name] = self.adapter.write_response(request, envelope)
        return server.NOT_DONE_YET


@pytest.fixture
def served():
    files = Files()
    port = reactor.listenTCP(0, make_site(files), interface="127.0.0.1")
    files.port = port.getHost().port
    yield files
    port.stopListening()


@pytest.fixture
def sendfile_calls(monkeypatch):
    calls = []
    real = os.sendfile

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(os, "sendfile", counting)
    return calls


def _recv(sock, size, data):
    try:
        more = sock.recv(size)
    except ConnectionResetError:  # an aborted connection
        more = b""
    if not more:
        raise EOFError(data)
    return more


def _read_until(sock, marker, data=b""):
    while marker not in data:
        data += _recv(sock, 65536, data)
    return data


def _exactly(sock, count, data):
    while len(data) < count:
        data += _recv(sock, 1 << 20, data)
    return data


def get(port, path, version="HTTP/1.1", sock=None, read_limit=None):
    """
    One GET (blocking; run it in a thread): (status line, headers, body,
    socket, how the body ended).  With C{read_limit}, the socket is closed
    once that many body bytes came.
    """
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port))
        if read_limit is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} {version}\r\nHost: test\r\n\r\n".encode())
    data = _read_until(sock, b"\r\n\r\n")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if read_limit is not None:
        body = _exactly(sock, read_limit, rest)
        sock.close()
        return lines[0], headers, body, None, "closed by the client"
    if "content-length" in headers:
        try:
            body = _exactly(sock, int(headers["content-length"]), rest)
        except EOFError as e:
            return lines[0], headers, e.args[0], sock, "cut"
        return lines[0], headers, body, sock, "length"
    if headers.get("transfer-encoding") == "chunked":
        body, buf = b"", rest
        try:
            while True:
                buf = _read_until(sock, b"\r\n", buf)
                size_line, buf = buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                buf = _exactly(sock, size + 2, buf)
                if buf[size : size + 2] != b"\r\n":
                    raise AssertionError("bad chunk framing")
                body, buf = body + buf[:size], buf[size + 2 :]
                if size == 0:
                    return lines[0], headers, body, sock, "chunked"
        except EOFError:
            return lines[0], headers, body, sock, "cut"
    body = rest
    while True:
        more = sock.recv(1 << 20)
        if not more:
            return lines[0], headers, body, sock, "close"
        body += more


@pytest_twisted.inlineCallbacks
def test_a_file_goes_out_with_sendfile_and_the_connection_stays_usable(served, sendfile_calls, tmp_path):
    data = os.urandom(12 * 1024 * 1024 + 17)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    served.bodies["/file"] = lambda: Stream.from_path(str(path), length=len(data), chunk_size=512 * 1024)
    status, headers, body, sock, how = yield threads.deferToThread(get, served.port, "/file")
    assert status == "HTTP/1.1 200 OK" and how == "length"
    assert headers["content-length"] == str(len(data)) and "transfer-encoding" not in headers
    assert body == data
    assert sendfile_calls and sum(sendfile_calls) >= len(data)
    yield served.written["/file"]
    # The same connection answers the next request.
    status, _, body, sock, how = yield threads.deferToThread(get, served.port, "/file", sock=sock)
    sock.close()
    assert status == "HTTP/1.1 200 OK" and body == data


@pytest_twisted.inlineCallbacks
def test_a_growing_file_goes_out_in_chunks(served, sendfile_calls, tmp_path):
    source = GrowingFile(str(tmp_path / "growing.bin"))
    parts = [os.urandom(300_000), os.urandom(5_000_000), b"", os.urandom(1)]

    def body():
        stream = Stream()
        stream.offer_file(source)
        return stream

    served.bodies["/growing"] = body
    for i, part in enumerate(parts):
        reactor.callLater(0.05 * (i + 1), source.grow, part, i == len(parts) - 1)
    status, headers, got, sock, how = yield threads.deferToThread(get, served.port, "/growing")
    sock.close()
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked" and how == "chunked"
    assert got == b"".join(parts)
    assert sendfile_calls
    yield served.written["/growing"]
    assert source.closed


@pytest_twisted.inlineCallbacks
def test_http_1_0_gets_a_growing_file_until_the_connection_closes(served, tmp_path):
    source = GrowingFile(str(tmp_path / "growing.bin"))
    parts = [os.urandom(1_000_000), os.urandom(2_000_000)]

    def body():
        stream = Stream()
        stream.offer_file(source)
        return stream

    served.bodies["/growing"] = body
    reactor.callLater(0.05, source.grow, parts[0])
    reactor.callLater(0.1, source.grow, parts[1], True)
    status, headers, got, sock, how = yield threads.deferToThread(get, served.port, "/growing", "HTTP/1.0")
    sock.close()
    assert status.endswith("200 OK") and "transfer-encoding" not in headers and how == "close"
    assert got == b"".join(parts)


@pytest_twisted.inlineCallbacks
def test_a_client_going_away_ends_the_body_and_the_server_goes_on(served, tmp_path):
    source = GrowingFile(str(tmp_path / "big.bin"))
    source.grow(os.urandom(32 * 1024 * 1024), final=True)

    def body():
        stream = Stream()
        stream.offer_file(source)
        return stream

    served.bodies["/big"] = body
    status, _, got, _, how = yield threads.deferToThread(get, served.port, "/big", read_limit=65536)
    assert status == "HTTP/1.1 200 OK" and how == "closed by the client"
    yield served.written["/big"]  # ended quietly (nothing to report)
    assert source.closed
    data = os.urandom(1000)
    path = tmp_path / "small.bin"
    path.write_bytes(data)
    served.bodies["/small"] = lambda: Stream.from_path(str(path))
    status, _, got, sock, _ = yield threads.deferToThread(get, served.port, "/small")
    sock.close()
    assert status == "HTTP/1.1 200 OK" and got == data


@pytest_twisted.inlineCallbacks
def test_a_failing_source_aborts_the_connection(served, tmp_path):
    source = GrowingFile(str(tmp_path / "broken.bin"))

    def body():
        stream = Stream()
        stream.offer_file(source)
        return stream

    served.bodies["/broken"] = body
    sent = os.urandom(100_000)
    reactor.callLater(0.05, source.grow, sent)
    reactor.callLater(0.1, source.fail, OSError(5, "the package build failed"))
    status, headers, got, sock, how = yield threads.deferToThread(get, served.port, "/broken")
    sock.close()
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    # No last chunk (an abort may also drop what the client had not read):
    # the client can tell the body is incomplete.
    assert how == "cut" and got == sent[: len(got)]
    yield served.written["/broken"]
    assert source.closed


@pytest_twisted.inlineCallbacks
def test_a_file_shorter_than_announced_aborts_the_connection(served, tmp_path):
    data = os.urandom(200_000)
    path = tmp_path / "short.bin"
    path.write_bytes(data)
    served.bodies["/short"] = lambda: Stream.from_path(str(path), length=len(data) + 1000)
    status, headers, got, sock, how = yield threads.deferToThread(get, served.port, "/short")
    sock.close()
    assert status == "HTTP/1.1 200 OK" and headers["content-length"] == str(len(data) + 1000)
    # Fewer bytes than announced (the abort may also drop some the client
    # had not read yet): the client can tell.
    assert how == "cut" and len(got) <= len(data) and got == data[: len(got)]
    served.bodies["/whole"] = lambda: Stream.from_path(str(path))
    status, _, got, sock, _ = yield threads.deferToThread(get, served.port, "/whole")
    sock.close()
    assert got == data
