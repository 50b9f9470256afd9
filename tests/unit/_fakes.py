"""
Fakes shared by the unit tests.  Every fake declares the interface it
stands in for and is checked with C{verifyObject} in test_interfaces.
"""

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from harmony.endpoints.http import render_json_error
from harmony.envelope import Headers, RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.interfaces import IBackend, IEndpoint, IMiddleware


def make_request(method="GET", path="", headers=(), body=b"", **details):
    """
    A L{RequestEnvelope} for executor and backend tests.
    """
    details.setdefault("full_path", "/" + path)
    return RequestEnvelope(
        details=RequestDetails(method=method, path=path, headers=Headers(headers), **details),
        body=body,
    )


@implementer(IPushProducer)
class FakePushProducer:
    """
    Counts pause/resume/stop calls.
    """

    def __init__(self):
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    @property
    def is_paused(self):
        return self.paused > self.resumed

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        self.stopped += 1


@implementer(IConsumer)
class PausingConsumer:
    """
    An C{IConsumer} that pauses its registered producer after every
    C{pause_every} writes (0: never), like a socket whose send buffer fills.
    """

    def __init__(self, pause_every=0):
        self.pause_every = pause_every
        self.writes = []
        self.producer = None
        self.streaming = None
        self.unregistered = 0

    def registerProducer(self, producer, streaming):
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self):
        self.unregistered += 1
        self.producer = None

    def write(self, data):
        self.writes.append(data)
        if self.pause_every and len(self.writes) % self.pause_every == 0 and self.producer is not None:
            self.producer.pauseProducing()


@implementer(IEndpoint)
class FakeEndpoint:
    """
    An endpoint that records its hooks; C{incoming_result} lets a test
    answer at once.  Errors render as HTTP JSON with an C{X-Rendered-By}
    header naming this endpoint.
    """

    service_type = "fake"
    options = None

    def __init__(self, name="ep", log=None, incoming_result=None):
        self.name = name
        self.log = log if log is not None else []
        self.incoming_result = incoming_result
        self.errors = []

    def listen_addresses(self):
        return []

    def services(self, executor, reactor):
        return []

    def http_routes(self):
        return []

    def incoming(self, envelope):
        self.log.append(("incoming", self.name))
        return self.incoming_result

    def outgoing(self, envelope, response):
        self.log.append(("outgoing", self.name))
        return response

    def render_error(self, error):
        self.errors.append(error)
        response = render_json_error(error)
        response.headers.set("X-Rendered-By", self.name)
        return response


@implementer(IMiddleware)
class RecordingMiddleware:
    """
    Appends C{("request", name)} / C{("response", name)} to a shared log.

    @param on_request: callable(envelope) -> hook result (value, Deferred
        or raises); default returns C{None}.
    @param on_response: callable(envelope, response) -> hook result.
    """

    def __init__(self, name, log, on_request=None, on_response=None):
        self.name = name
        self.log = log
        self._on_request = on_request
        self._on_response = on_response

    def request(self, envelope):
        self.log.append(("request", self.name))
        return self._on_request(envelope) if self._on_request else None

    def response(self, envelope, response):
        self.log.append(("response", self.name))
        return self._on_response(envelope, response) if self._on_response else None


@implementer(IBackend)
class FakeBackend:
    """
    A backend answering with C{result} (a L{ResponseEnvelope}, an
    exception to fail with, or a callable(envelope) returning either or a
    Deferred).  Records the envelopes (and their bodies) it was given.
    """

    service_type = "fake"

    def __init__(self, name="backend", result=None, log=None):
        self.name = name
        self.result = result if result is not None else ResponseEnvelope(status=200, body=b"ok")
        self.log = log if log is not None else []
        self.calls = []
        self.bodies = []
        self.closed = False

    def handle(self, envelope):
        self.log.append(("backend", self.name))
        self.calls.append(envelope)
        self.bodies.append(envelope.body)
        result = self.result
        if callable(result) and not isinstance(result, type):
            result = result(envelope)
        if isinstance(result, defer.Deferred):
            return result
        if isinstance(result, BaseException) or (isinstance(result, type) and issubclass(result, BaseException)):
            return defer.fail(result() if isinstance(result, type) else result)
        return defer.succeed(result)

    def close(self):
        self.closed = True
        return defer.succeed(None)


@implementer(IAgent)
class RecordingAgent:
    """
    An C{IAgent} that records requests and answers each with a Deferred
    the test controls (C{self.deferreds}); C{cancelled} counts cancels.
    """

    def __init__(self):
        self.requests = []
        self.deferreds = []
        self.cancelled = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri, headers, bodyProducer))

        def cancel(d):
            self.cancelled += 1

        d = defer.Deferred(cancel)
        self.deferreds.append(d)
        return d


@implementer(IAgent)
class RefusingAgent:
    """
    An C{IAgent} whose connections are refused.
    """

    def __init__(self):
        self.attempts = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.attempts += 1
        return defer.fail(ConnectionRefusedError("127.0.0.1:1"))


@implementer(IAgent)
class FailingAgent:
    """
    An C{IAgent} failing every request with C{exception}.
    """

    def __init__(self, exception):
        self.exception = exception

    def request(self, method, uri, headers=None, bodyProducer=None):
        return defer.fail(self.exception)


@implementer(IResponse)
class FakeResponse:
    """
    An C{IResponse} with a body delivered at once, for agents that keep
    every header line (Harmony's own client exposes them all).
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, code=200, headers=(), body=b""):
        self.code = code
        self.headers = TwistedHeaders()
        for name, value in headers:
            self.headers.addRawHeader(name, value)
        self.body = body
        self.length = len(body)

    def deliverBody(self, protocol):
        protocol.makeConnection(None)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response):
        self.previousResponse = response


@implementer(IAgent)
class AnsweringAgent:
    """
    An C{IAgent} answering every request with C{response}.
    """

    def __init__(self, response):
        self.response = response

    def request(self, method, uri, headers=None, bodyProducer=None):
        return defer.succeed(self.response)


class FakeThreadPool:
    """
    A synchronous stand-in for C{ThreadPool}: work runs at once
    (C{immediate=True}) or when L{run} is called; C{in_pool} is true while
    a piece of work runs, so that fakes of blocking calls can check where
    they are called from.
    """

    def __init__(self, immediate=True):
        self.immediate = immediate
        self.pending = []
        self.in_pool = False
        self.submitted = 0

    def callInThreadWithCallback(self, onResult, func, *args, **kwargs):
        self.submitted += 1
        self.pending.append((onResult, func, args, kwargs))
        if self.immediate:
            self.run()

    def run(self):
        pending, self.pending = self.pending, []
        for onResult, func, args, kwargs in pending:
            self.in_pool = True
            try:
                result = func(*args, **kwargs)
            except BaseException:
                ok, result = False, Failure()
            else:
                ok = True
            finally:
                self.in_pool = False
            onResult(ok, result)
