"""
The access log: one C{harmony.access} event per HTTP request (from
L{harmony.http.site}) and per DICOM association (from
L{harmony.dimse.scp}), with what an operator needs and no patient data
(never a query string).
"""

import json

import pytest
from _sitegateway import Gateway, is_generated
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET

from harmony import logs
from harmony.dimse.association import AssociationRejected
from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, DicomClient

SECRET = "PATIENT0123456789"


class _Capture(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def access(self):
        return [e for e in self.events if e.get("log_namespace") == logs.ACCESS]

    def assertNoSecret(self, events):
        for event in events:
            self.assertNotIn(SECRET, logs.format_text(event))
            self.assertNotIn(SECRET, logs.format_json(event))


class HttpAccessTests(_Capture):
    def setUp(self):
        super().setUp()
        self.gateway = Gateway(self)

    def test_one_line_per_request(self):
        channel, transport = self.gateway.connect(peer=("192.0.2.44", 50000))
        # The duration counts from the request line.
        channel.dataReceived(b"GET /echo/Patient?id=" + SECRET.encode() + b" HTTP/1.1\r\nHost: gw\r\n")
        self.gateway.clock.advance(0.25)
        channel.dataReceived(b"X-Request-ID: rid-9\r\n\r\n")
        response = transport.value()
        [event] = self.access()
        body = response.partition(b"\r\n\r\n")[2]
        self.assertEqual(
            {k: event[k] for k in ("access", "method", "path", "status", "bytes", "duration_ms", "client")},
            {
                "access": "http",
                "method": "GET",
                "path": "/echo/Patient",
                "status": 200,
                "bytes": len(body),
                "duration_ms": 250.0,
                "client": "192.0.2.44",
            },
        )
        self.assertEqual((event["network"], event["pipeline"], event["request_id"]), ("default", "echo", "rid-9"))
        self.assertEqual(
            formatEvent(event),
            f"GET /echo/Patient 200 {len(body)}B 250.0ms client=192.0.2.44 network=default pipeline=echo"
            " request_id=rid-9",
        )
        self.assertNoSecret(self.access())

    def test_keep_alive_requests_each_get_a_line(self):
        channel, transport = self.gateway.connect()
        for i in range(3):
            channel.dataReceived(b"GET /echo/%d HTTP/1.1\r\nHost: gw\r\n\r\n" % i)
        self.assertEqual([e["path"] for e in self.access()], ["/echo/0", "/echo/1", "/echo/2"])
        ids = [e["request_id"] for e in self.access()]
        self.assertEqual(len(set(ids)), 3)
        self.assertTrue(all(is_generated(i) for i in ids))

    def test_proxied_request(self):
        self.gateway.request(b"POST", b"/api/Patient?name=" + SECRET.encode(), [(b"X-Request-ID", b"p-1")], b"{}")
        [event] = self.access()
        self.assertEqual(
            (event["method"], event["path"], event["status"], event["bytes"], event["pipeline"], event["request_id"]),
            ("POST", "/api/Patient", 200, len(b"upstream"), "proxy", "p-1"),
        )
        self.assertNoSecret(self.access())

    def test_errors(self):
        self.gateway.request(b"GET", b"/nowhere?q=" + SECRET.encode())
        self.gateway.request(b"PROPFIND", b"/echo/x")
        self.gateway.request(b"HEAD", b"/echo/x")
        lines = [(e["method"], e["path"], e["status"], e["pipeline"]) for e in self.access()]
        self.assertEqual(
            lines,
            [("GET", "/nowhere", 404, "-"), ("PROPFIND", "/echo/x", 405, "-"), ("HEAD", "/echo/x", 200, "echo")],
        )
        self.assertEqual(self.access()[-1]["bytes"], 0)  # HEAD: no body
        self.assertNoSecret(self.access())

    def test_refused_body(self):
        status, _, body = self.gateway.request(
            b"POST", b"/echo/up?x=" + SECRET.encode(), [(b"X-Request-ID", b"big")], b"x" * 1001
        )
        self.assertEqual(status, 413)
        [event] = self.access()
        self.assertEqual(
            (event["method"], event["path"], event["status"], event["bytes"], event["pipeline"], event["request_id"]),
            ("POST", "/echo/up", 413, len(body), "echo", "big"),
        )
        self.assertNoSecret(self.access())

    def test_client_gone(self):
        self.gateway.upstream.render = lambda request: NOT_DONE_YET
        channel, transport = self.gateway.connect()
        channel.dataReceived(b"GET /api/slow HTTP/1.1\r\nHost: gw\r\nX-Request-ID: gone-1\r\n\r\n")
        self.gateway.agent.flush()
        self.gateway.clock.advance(1.5)
        self.assertEqual(self.access(), [])
        channel.connectionLost(Failure(ConnectionLost()))
        [event] = self.access()
        self.assertEqual((event["status"], event["aborted"], event["request_id"]), (499, True, "gone-1"))
        self.assertEqual(event["duration_ms"], 1500.0)
        self.assertTrue(formatEvent(event).endswith("(connection lost)"))

    def test_access_log_off(self):
        logs.set_access(False)
        self.addCleanup(logs.set_access, True)
        self.gateway.request(b"GET", b"/echo/x")
        self.assertEqual(self.access(), [])

    def test_json_line(self):
        self.gateway.request(b"GET", b"/echo/x?secret=" + SECRET.encode(), [(b"X-Request-ID", b"j-1")])
        [event] = self.access()
        data = json.loads(logs.format_json(event))
        self.assertEqual(
            {k: data[k] for k in ("namespace", "level", "access", "path", "status", "request_id", "network")},
            {
                "namespace": "harmony.access",
                "level": "info",
                "access": "http",
                "path": "/echo/x",
                "status": 200,
                "request_id": "j-1",
                "network": "default",
            },
        )


ECHO = [(VERIFICATION_SOP_CLASS, [IMPLICIT_VR_LITTLE_ENDIAN])]
SYNTAXES = {VERIFICATION_SOP_CLASS: [IMPLICIT_VR_LITTLE_ENDIAN]}


class DicomAccessTests(_Capture):
    def setUp(self):
        super().setUp()
        self.reactor = MemoryReactorClock()
        self.server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", SYNTAXES))
        self.client = DicomClient(self.reactor, "MODALITY")

    def connect(self, called="HARMONY"):
        d = self.client.associate("127.0.0.1", 11112, called, ECHO)
        factory = self.reactor.tcpClients[-1][2]
        server_protocol = self.server.buildProtocol(None)
        client_protocol = factory.buildProtocol(None)
        pump = iosim.connect(
            server_protocol,
            iosim.makeFakeServer(server_protocol),
            client_protocol,
            iosim.makeFakeClient(client_protocol),
            greet=True,
        )
        pump.flush()
        return d, pump

    def test_released(self):
        d, pump = self.connect()
        association = self.successResultOf(d)
        for _ in range(2):
            status = association.echo()
            pump.flush()
            self.successResultOf(status)
        self.reactor.advance(2.5)
        association.release()
        pump.flush()
        [event] = self.access()
        self.assertEqual(
            {k: event[k] for k in ("access", "calling_aet", "called_aet", "operations", "result", "duration_ms")},
            {
                "access": "dicom",
                "calling_aet": "MODALITY",
                "called_aet": "HARMONY",
                "operations": {"echo": 2},
                "result": "released",
                "duration_ms": 2500.0,
            },
        )
        self.assertEqual(event["peer"], "?:?")  # iosim's fake addresses have no host or port
        self.assertEqual(
            formatEvent(event),
            "DICOM association MODALITY -> HARMONY from ?:? released after 2500.0ms, operations echo=2",
        )

    def test_rejected(self):
        d, pump = self.connect(called="SOMEONE")
        self.failureResultOf(d, AssociationRejected)
        pump.flush()
        [event] = self.access()
        self.assertEqual((event["called_aet"], event["result"], event["operations"]), ("SOMEONE", "rejected", {}))
        self.assertTrue(formatEvent(event).endswith("rejected after 0.0ms, operations none"))

    def test_aborted(self):
        d, pump = self.connect()
        association = self.successResultOf(d)
        status = association.echo()
        pump.flush()
        self.successResultOf(status)
        association.abort()
        pump.flush()
        [event] = self.access()
        self.assertEqual((event["result"], event["operations"]), ("aborted", {"echo": 1}))


@pytest.mark.parametrize("result", ["released", "aborted", "rejected"])
def test_dicom_line_in_json(result):
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        logs.dicom_access("A", "B", "127.0.0.1:1", 0.01, {"find": 2}, result)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("log_namespace") == logs.ACCESS]
    data = json.loads(logs.format_json(event))
    assert (data["result"], data["operations"], data["duration_ms"]) == (result, {"find": 2}, 10.0)
