"""
A small twisted.web upstream for Harmony's integration tests.

Run as a subprocess: C{python upstream_server.py PORT [NAME [DELAY]]}.
Listens on 127.0.0.1 only.  With a C{NAME}, every response carries
C{X-Upstream-Name: NAME} (which of several upstreams answered); with a
C{DELAY} (seconds, default 0), every route but C{/health} and
C{/_requests} answers that much later (a slow upstream).  Routes (the
first path segment picks one):

  /status/<code>     answer <code> with X-Upstream-Status and a text body
  /binary/<n>        <n> deterministic pseudo-random bytes as image/png
  /upload            answer with the request body as-is, plus X-Sha256/X-Length
  /sleep/<secs>      answer 200 after <secs> seconds
  /cookie            set a cookie (Set-Cookie) and answer 200
  /stream/<n>        <n> deterministic bytes, chunked (no Content-Length)
  /truncate          promise 1 MB (Content-Length), send 1000 bytes, drop the connection
  /redirect          302 to /elsewhere (must not be followed by a proxy)
  /gzip              a gzip-encoded body with Content-Encoding: gzip
  /nocontent         204 with no body
  /health            200 "ok" at once (never delayed)
  /_requests         the requests received so far (never delayed), as JSON:
                     a list of [method, uri], oldest first (the last
                     10000; /health and /_requests themselves left out)
  anything else      echo the request as JSON
"""

import base64
import collections
import gzip
import hashlib
import json
import random
import sys

from twisted.internet import reactor
from twisted.web import resource, server


def pseudo_random(n, seed=1):
    """
    Deterministic bytes (the tests compute the same ones).
    """
    return random.Random(seed).randbytes(n)


#: Routes that answer at once, whatever the delay, and are not recorded.
UNDELAYED = ("health", "_requests")


class Upstream(resource.Resource):
    isLeaf = True

    def __init__(self, name=None, delay=0.0):
        super().__init__()
        self.name = name
        self.delay = delay
        self.received = collections.deque(maxlen=10000)

    def render(self, request):
        segments = request.path.decode("latin-1").split("/")[1:]
        route = segments[0] if segments else ""
        arg = segments[1] if len(segments) > 1 else ""
        if self.name is not None:
            request.setHeader(b"x-upstream-name", self.name.encode("latin-1"))
        handler = getattr(self, f"route_{route}", None)
        if handler is None:
            handler = self.route_echo
        if route in UNDELAYED:
            return handler(request, arg)
        self.received.append([request.method.decode("ascii"), request.uri.decode("latin-1")])
        if self.delay <= 0:
            return handler(request, arg)
        return self._later(request, handler, arg)

    def _later(self, request, handler, arg):
        """
        Run C{handler} after L{delay} seconds (unless the client is gone).
        """
        gone = []

        def answer():
            if gone:
                return
            result = handler(request, arg)
            if result is not server.NOT_DONE_YET:
                request.write(result)
                request.finish()

        call = reactor.callLater(self.delay, answer)

        def lost(_):
            gone.append(True)
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(lost)
        return server.NOT_DONE_YET

    def route_health(self, request, arg):
        request.setHeader(b"content-type", b"text/plain")
        return b"ok"

    def route__requests(self, request, arg):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(list(self.received)).encode("utf-8")

    def route_echo(self, request, arg=None):
        body = request.content.read()
        path, _, query = request.uri.decode("latin-1").partition("?")
        data = {
            "method": request.method.decode("ascii"),
            "uri": request.uri.decode("latin-1"),
            "path": path,
            "query": query,
            "headers": [
                [name.decode("latin-1").lower(), value.decode("latin-1")]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body_b64": base64.b64encode(body).decode("ascii"),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-upstream", b"echo")
        return json.dumps(data).encode("utf-8")

    def route_status(self, request, arg):
        code = int(arg)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-upstream-status", arg.encode("ascii"))
        request.responseHeaders.addRawHeader(b"x-multi", b"one")
        request.responseHeaders.addRawHeader(b"x-multi", b"two")
        if code == 201:
            request.setHeader(b"location", b"/things/42")
        return f"upstream says {code}".encode("ascii")

    def route_binary(self, request, arg):
        request.setHeader(b"content-type", b"image/png")
        return pseudo_random(int(arg))

    def route_upload(self, request, arg):
        body = request.content.read()
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"x-sha256", hashlib.sha256(body).hexdigest().encode("ascii"))
        request.setHeader(b"x-length", str(len(body)).encode("ascii"))
        return body

    def route_sleep(self, request, arg):
        def answer():
            if not finished:
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"slept")
                request.finish()

        finished = []
        call = reactor.callLater(float(arg), answer)

        def gone(_):
            finished.append(True)
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    def route_cookie(self, request, arg):
        request.responseHeaders.addRawHeader(b"set-cookie", b"session=s3cr3t; Path=/; HttpOnly")
        request.responseHeaders.addRawHeader(b"set-cookie", b"theme=dark; Path=/")
        request.setHeader(b"content-type", b"text/plain")
        return b"cookie set"

    def route_stream(self, request, arg):
        data = pseudo_random(int(arg), seed=2)
        request.setHeader(b"content-type", b"application/octet-stream")
        chunk = 64 * 1024
        offsets = iter(range(0, len(data), chunk))

        def more():
            for offset in offsets:
                request.write(data[offset : offset + chunk])
                # Yield to the reactor between chunks so the body really
                # goes out in pieces.
                reactor.callLater(0, more)
                return
            request.finish()

        more()
        return server.NOT_DONE_YET

    def route_truncate(self, request, arg):
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"1048576")
        request.write(b"x" * 1000)
        reactor.callLater(0.05, request.channel.transport.abortConnection)
        return server.NOT_DONE_YET

    def route_redirect(self, request, arg):
        request.setResponseCode(302)
        request.setHeader(b"location", b"/elsewhere")
        return b"moved"

    def route_gzip(self, request, arg):
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(b"hello compressed world\n" * 100, mtime=0)

    def route_nocontent(self, request, arg):
        request.setResponseCode(204)
        request.setHeader(b"x-upstream", b"nocontent")
        return b""


class QuietSite(server.Site):
    def log(self, request):
        pass


def main(port, name=None, delay=0.0):
    reactor.listenTCP(port, QuietSite(Upstream(name, delay)), interface="127.0.0.1")
    print(f"upstream {name or ''} listening on 127.0.0.1:{port} (delay {delay:g} s)", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None,
        float(sys.argv[3]) if len(sys.argv) > 3 else 0.0,
    )
