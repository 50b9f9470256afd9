"""
C-ECHO between Harmony's SCU and SCP over an in-memory connection
(twisted.test.iosim), with association policy and timers on task.Clock.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from harmony.dimse import pdu
from harmony.dimse.association import AssociationAborted, AssociationRejected, AssociationSettings
from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, DicomClient, DimseTimeout

ECHO = [(VERIFICATION_SOP_CLASS, [IMPLICIT_VR_LITTLE_ENDIAN])]
SYNTAXES = {VERIFICATION_SOP_CLASS: [IMPLICIT_VR_LITTLE_ENDIAN]}


class EchoTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.policy = SCPPolicy("HARMONY", SYNTAXES)
        self.server = DicomServerFactory(self.reactor, self.policy)
        self.client = DicomClient(self.reactor, "TESTSCU")

    def connect(self, called="HARMONY", syntaxes=ECHO, calling=None, server=None):
        d = self.client.associate("127.0.0.1", 11112, called, syntaxes, calling_aet=calling)
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 11112))
        server_protocol = (server or self.server).buildProtocol(None)
        client_protocol = factory.buildProtocol(None)
        pump = iosim.connect(
            server_protocol,
            iosim.makeFakeServer(server_protocol),
            client_protocol,
            iosim.makeFakeClient(client_protocol),
            greet=True,
        )
        pump.flush()
        return d, pump, server_protocol

    def test_echo_and_release(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        self.assertEqual(len(self.server.active), 1)
        [context] = association.contexts.values()
        self.assertEqual(context.transfer_syntax, IMPLICIT_VR_LITTLE_ENDIAN)
        status = association.echo()
        pump.flush()
        self.assertEqual(self.successResultOf(status).status, 0x0000)
        # Several echoes on one association, message IDs increasing.
        for _ in range(3):
            status = association.echo()
            pump.flush()
            self.assertTrue(self.successResultOf(status).ok)
        released = association.release()
        pump.flush()
        self.successResultOf(released)
        self.assertEqual(self.server.active, set())
        self.assertEqual(server_protocol.upper.state, "Sta1")

    def test_called_ae_rejected(self):
        d, pump, _ = self.connect(called="SOMEONE")
        error = self.failureResultOf(d, AssociationRejected).value
        self.assertEqual((error.result, error.source, error.reason), (1, 1, 7))

    def test_calling_ae_not_allowed(self):
        server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", SYNTAXES, allowed_calling_aets={"GOOD"}))
        d, pump, _ = self.connect(calling="BAD", server=server)
        error = self.failureResultOf(d, AssociationRejected).value
        self.assertEqual((error.result, error.source, error.reason), (1, 1, 3))
        d, pump, _ = self.connect(calling="GOOD", server=server)
        self.successResultOf(d)

    def test_called_ae_not_required(self):
        server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", SYNTAXES, require_called_aet=False))
        d, pump, _ = self.connect(called="ANYTHING", server=server)
        association = self.successResultOf(d)
        status = association.echo()
        pump.flush()
        self.assertTrue(self.successResultOf(status).ok)

    def test_too_many_associations(self):
        server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", SYNTAXES, max_associations=1))
        first, pump1, _ = self.connect(server=server)
        self.successResultOf(first)
        second, pump2, _ = self.connect(server=server)
        error = self.failureResultOf(second, AssociationRejected).value
        self.assertEqual((error.result, error.source, error.reason), (2, 3, 2))

    def test_too_many_associations_from_one_calling_ae(self):
        policy = SCPPolicy("HARMONY", SYNTAXES, max_associations=10, max_associations_per_aet=2)
        server = DicomServerFactory(self.reactor, policy)
        first = self.successResultOf(self.connect(calling="CT1", server=server)[0])
        d, pump2, _ = self.connect(calling="CT1", server=server)
        second = self.successResultOf(d)
        self.assertEqual(server.active_by_aet, {"CT1": 2})
        # A third from CT1: rejected transiently, service-provider (presentation), local limit exceeded.
        third, _, _ = self.connect(calling="CT1", server=server)
        error = self.failureResultOf(third, AssociationRejected).value
        self.assertEqual((error.result, error.source, error.reason), (2, 3, 2))
        # Other AEs are not affected.
        self.successResultOf(self.connect(calling="MR1", server=server)[0])
        self.assertEqual(server.active_by_aet, {"CT1": 2, "MR1": 1})
        # Once one of CT1's associations ends, CT1 may associate again.
        released = second.release()
        pump2.flush()
        self.successResultOf(released)
        self.assertEqual(server.active_by_aet, {"CT1": 1, "MR1": 1})
        self.successResultOf(self.connect(calling="CT1", server=server)[0])
        self.assertEqual(len(server.active), 3)
        self.assertTrue(first.reusable)

    def test_per_ae_count_follows_aborts_and_rejections(self):
        settings = AssociationSettings(idle_timeout=5)
        server = DicomServerFactory(
            self.reactor, SCPPolicy("HARMONY", SYNTAXES, max_associations_per_aet=1), settings
        )
        d, pump, _ = self.connect(calling="CT1", server=server)
        self.successResultOf(d)
        self.failureResultOf(self.connect(calling="CT1", server=server)[0], AssociationRejected)
        self.assertEqual(server.active_by_aet, {"CT1": 1})
        # The idle association is aborted by the server: its slot is freed.
        self.reactor.advance(5)
        pump.flush()
        self.assertEqual((server.active, server.active_by_aet), (set(), {}))
        self.successResultOf(self.connect(calling="CT1", server=server)[0])

    def test_no_per_ae_limit_by_default(self):
        server = DicomServerFactory(self.reactor, SCPPolicy("HARMONY", SYNTAXES, max_associations=3))
        self.assertEqual(server.policy.max_associations_per_aet, 0)
        for _ in range(3):
            self.successResultOf(self.connect(calling="CT1", server=server)[0])
        error = self.failureResultOf(self.connect(calling="CT1", server=server)[0], AssociationRejected).value
        self.assertEqual((error.result, error.source, error.reason), (2, 3, 2))

    def test_unsupported_abstract_syntax_is_not_accepted(self):
        d, pump, _ = self.connect(syntaxes=[("1.2.3.4", [IMPLICIT_VR_LITTLE_ENDIAN])] + ECHO)
        association = self.successResultOf(d)
        self.assertEqual([c.abstract_syntax for c in association.contexts.values()], [VERIFICATION_SOP_CLASS])
        self.assertRaises(LookupError, association.context_for, "1.2.3.4")

    def test_dimse_timeout_aborts(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        # The server stops answering: swallow what the client sends.
        server_protocol.dataReceived = lambda data: None
        status = association.echo()
        pump.flush()
        self.assertNoResult(status)
        self.reactor.advance(self.client.dimse_timeout)
        self.failureResultOf(status, DimseTimeout)
        pump.flush()
        # A-ABORT sent; the connection closes when ARTIM expires at the latest.
        self.assertEqual(association.association.upper.state, "Sta13")
        self.reactor.advance(AssociationSettings().artim_timeout)
        pump.flush()
        self.assertEqual(association.association.upper.state, "Sta1")
        self.failureResultOf(association.echo(), AssociationAborted)

    def test_idle_association_is_aborted_by_the_server(self):
        settings = AssociationSettings(idle_timeout=5)
        server = DicomServerFactory(self.reactor, self.policy, settings)
        d, pump, server_protocol = self.connect(server=server)
        association = self.successResultOf(d)
        self.reactor.advance(5)
        pump.flush()
        status = association.echo()
        self.failureResultOf(status, AssociationAborted)
        self.assertEqual(server.active, set())

    def test_garbage_aborts_the_association(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        status = association.echo()
        # An unknown PDU type arrives at the server instead.
        server_protocol.dataReceived(b"\x09\x00\x00\x00\x00\x00")
        pump.flush()
        self.assertIsInstance(self.failureResultOf(status).value, AssociationAborted)
        self.assertEqual(server_protocol.upper.state, "Sta1")

    def test_abort_pdu_model(self):
        self.assertEqual(pdu.decode_pdu(pdu.A_ABORT, pdu.encode_pdu(pdu.Abort(2, 6))[6:]), pdu.Abort(2, 6))


class ReusableTests(SynchronousTestCase):
    """
    ClientAssociation.reusable: up, healthy and idle (what an association
    pool may keep).
    """

    setUp = EchoTests.setUp
    connect = EchoTests.connect

    def test_reusable_only_when_idle_and_healthy(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        self.assertTrue(association.reusable)
        status = association.echo()
        self.assertFalse(association.reusable)  # waiting for the answer
        pump.flush()
        self.successResultOf(status)
        self.assertTrue(association.reusable)
        released = association.release()
        self.assertFalse(association.reusable)
        pump.flush()
        self.successResultOf(released)
        self.assertFalse(association.reusable)

    def test_not_reusable_once_the_peer_released_or_aborted(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        server_protocol.abort(2, 0)
        pump.flush()
        self.assertFalse(association.reusable)

    def test_release_after_the_peer_aborted_is_quiet(self):
        d, pump, server_protocol = self.connect()
        association = self.successResultOf(d)
        client_protocol = association.association
        # The A-ABORT arrives; the connection is not closed yet.
        client_protocol.dataReceived(bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 0)))
        self.assertEqual(client_protocol.upper.state, "Sta1")
        from harmony.dimse import association as association_module

        warnings = []
        self.patch(association_module.log, "warn", lambda *a, **k: warnings.append((a, k)))
        released = association.release()
        self.assertEqual(client_protocol.upper.state, "Sta1")
        self.assertEqual(warnings, [])  # not an invalid event
        pump.flush()
        self.successResultOf(released)


class DimseTimeoutOnServerTests(SynchronousTestCase):
    def test_unfinished_message_times_out_before_idle(self):
        reactor = MemoryReactorClock()
        settings = AssociationSettings(idle_timeout=60, dimse_timeout=5)
        server = DicomServerFactory(reactor, SCPPolicy("HARMONY", SYNTAXES), settings)
        client = DicomClient(reactor, "TESTSCU")
        d = client.associate("127.0.0.1", 11112, "HARMONY", ECHO)
        factory = reactor.tcpClients[-1][2]
        server_protocol, client_protocol = server.buildProtocol(None), factory.buildProtocol(None)
        pump = iosim.connect(
            server_protocol, iosim.makeFakeServer(server_protocol),
            client_protocol, iosim.makeFakeClient(client_protocol), greet=True,
        )
        pump.flush()
        association = self.successResultOf(d)
        # The first fragment of a command, never followed by its last one.
        [context] = association.contexts.values()
        association.association.transport.write(pdu.encode_p_data_tf([(context.id, 0x01, b"\x00\x00")]))
        pump.flush()
        self.assertEqual(server.active, {server_protocol})
        reactor.advance(5)
        pump.flush()
        self.assertEqual(server.active, set())
        self.failureResultOf(association.echo(), AssociationAborted)
