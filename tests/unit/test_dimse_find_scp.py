"""
The C-FIND SCP service over an in-memory association: matches streamed as
pending responses as the backend produces them, final status from the
backend, C-CANCEL, bad queries.
"""

import pydicom
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from harmony.dimse import messages
from harmony.dimse.find import FindService
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, PATIENT_ROOT_FIND, STUDY_ROOT_FIND, DicomClient
from harmony.envelope import DicomResult, ResponseEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.streams import Stream

SYNTAXES = {STUDY_ROOT_FIND: [IMPLICIT_VR_LITTLE_ENDIAN], PATIENT_ROOT_FIND: [IMPLICIT_VR_LITTLE_ENDIAN]}


class Executor:
    """
    A pipeline whose backend answers a find with a stream the test feeds.
    """

    backends = ("pacs",)
    request_chain = response_chain = ()

    def __init__(self, outcome=None):
        self.matches = Stream()
        self.done = defer.Deferred()
        self.requests = []
        self.outcome = outcome

    def execute(self, endpoint, envelope):
        self.requests.append(envelope)
        if self.outcome is not None:
            return defer.succeed(self.outcome)
        result = DicomResult(status=None, matches=self.matches, done=self.done)
        return defer.succeed(ResponseEnvelope(status=200, dicom=result))


def query(level="STUDY", **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientID = keys.get("PatientID", "P1")
    ds.StudyInstanceUID = ""
    return ds


def match(uid):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = uid
    return ds


class FindSCPTests(SynchronousTestCase):
    def connect(self, executor):
        self.reactor = MemoryReactorClock()
        factory = DicomServerFactory(
            self.reactor,
            SCPPolicy("HARMONY", SYNTAXES),
            services={messages.C_FIND_RQ: FindService((executor, "endpoint"))},
        )
        client = DicomClient(self.reactor, "FINDSCU")
        d = client.associate("127.0.0.1", 104, "HARMONY", list(SYNTAXES.items()))
        server = factory.buildProtocol(None)
        client_protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        self.pump = iosim.connect(
            server, iosim.makeFakeServer(server), client_protocol, iosim.makeFakeClient(client_protocol), greet=True
        )
        self.pump.flush()
        return self.successResultOf(d)

    def read_all(self, stream):
        items = []
        while True:
            d = stream.read()
            item = self.successResultOf(d)
            if not isinstance(item, pydicom.Dataset):
                return items
            items.append(item)

    def test_matches_stream_as_they_arrive(self):
        executor = Executor()
        association = self.connect(executor)
        find = association.find(query(), "study")
        self.pump.flush()
        [envelope] = executor.requests
        request = envelope.dicom
        self.assertEqual((request.operation, request.query_model, request.level), ("find", "study", "STUDY"))
        self.assertEqual(request.identifier.PatientID, "P1")
        self.assertEqual(request.calling_aet, "FINDSCU")
        executor.matches.write(match("1.2.3"))
        self.pump.flush()
        first = self.successResultOf(find.matches.read())
        self.assertEqual(first.StudyInstanceUID, "1.2.3")
        self.assertNoResult(find.result)
        executor.matches.write(match("1.2.4"))
        executor.matches.finish()
        executor.done.callback((0x0000, None))
        self.pump.flush()
        self.assertEqual([m.StudyInstanceUID for m in self.read_all(find.matches)], ["1.2.4"])
        self.assertEqual(self.successResultOf(find.result).status, 0x0000)

    def test_cancel_stops_the_backend_and_answers_cancel(self):
        executor = Executor()
        association = self.connect(executor)
        find = association.find(query(), "patient")
        self.pump.flush()
        executor.matches.write(match("1.2.3"))
        self.pump.flush()
        self.successResultOf(find.matches.read())
        find.cancel()
        self.pump.flush()
        self.assertTrue(executor.matches.cancelled)
        self.assertEqual(self.successResultOf(find.result).status, 0xFE00)
        # The association keeps working.
        executor.matches, executor.done = Stream(), defer.Deferred()
        again = association.find(query(), "study")
        self.pump.flush()
        self.assertEqual(len(executor.requests), 2)
        executor.matches.finish()
        executor.done.callback((0x0000, None))
        self.pump.flush()
        self.assertEqual(self.successResultOf(again.result).status, 0x0000)

    def test_backend_failure_status(self):
        executor = Executor()
        association = self.connect(executor)
        find = association.find(query(), "study")
        self.pump.flush()
        executor.matches.finish()
        executor.done.callback((0xA700, "The PACS aborted the query"))
        self.pump.flush()
        status = self.successResultOf(find.result)
        self.assertEqual((status.status, status.error_comment), (0xA700, "The PACS aborted the query"))

    def test_backend_error_rendered_by_endpoint(self):
        error = ResponseEnvelope(status=502, dicom=DicomResult(status=0xA700, error_comment="down"))
        association = self.connect(Executor(outcome=error))
        find = association.find(query(), "study")
        self.pump.flush()
        self.assertEqual(self.successResultOf(find.result).status, 0xA700)

    def test_pipeline_without_dicom_result_is_a_failure(self):
        association = self.connect(Executor(outcome=ResponseEnvelope(status=200)))
        find = association.find(query(), "study")
        self.pump.flush()
        self.assertEqual(self.successResultOf(find.result).status, 0xC000)

    def test_bad_level_is_refused(self):
        executor = Executor()
        association = self.connect(executor)
        find = association.find(query(level="GALAXY"), "study")
        self.pump.flush()
        self.assertEqual(self.successResultOf(find.result).status, 0xA900)
        self.assertEqual(executor.requests, [])

    def test_upstream_unavailable_fails_the_find(self):
        executor = Executor()
        executor.execute = lambda endpoint, envelope: defer.fail(UpstreamUnavailable())
        association = self.connect(executor)
        find = association.find(query(), "study")
        self.pump.flush()
        self.assertEqual(self.successResultOf(find.result).status, 0xA700)


class IdleHoldTests(SynchronousTestCase):
    """
    A requestor waiting for a slow backend is not idle: the SCP's idle
    timer is held while a query is in progress, and runs again after the
    final response.
    """

    def test_idle_timer_held_while_the_backend_works(self):
        from harmony.dimse.association import AssociationSettings

        reactor = MemoryReactorClock()
        executor = Executor()
        factory = DicomServerFactory(
            reactor,
            SCPPolicy("HARMONY", SYNTAXES),
            AssociationSettings(idle_timeout=10, dimse_timeout=5),
            services={messages.C_FIND_RQ: FindService((executor, "endpoint"))},
        )
        client = DicomClient(reactor, "FINDSCU", dimse_timeout=1000)
        d = client.associate("127.0.0.1", 104, "HARMONY", list(SYNTAXES.items()))
        server = factory.buildProtocol(None)
        client_protocol = reactor.tcpClients[-1][2].buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client_protocol, iosim.makeFakeClient(client_protocol), greet=True
        )
        pump.flush()
        association = self.successResultOf(d)
        find = association.find(query(), "study")
        pump.flush()
        reactor.advance(100)
        pump.flush()
        self.assertFalse(server._closed)
        executor.matches.finish()
        executor.done.callback((0x0000, None))
        pump.flush()
        self.assertEqual(self.successResultOf(find.result).status, 0x0000)
        reactor.advance(9)
        self.assertFalse(server._closed)
        reactor.advance(2)
        pump.flush()
        self.assertTrue(server._closed)


class PassthroughTests(SynchronousTestCase):
    """
    Matches received from a PACS go on as received when the pipeline has
    no middleware (nothing can have changed them) and the transfer
    syntaxes agree; otherwise they are encoded from the dataset.
    """

    connect = FindSCPTests.connect
    read_all = FindSCPTests.read_all

    def received(self, uid, sent_as):
        from harmony.dimse.scu import encode_identifier, keep_encoding

        ds = match(uid)
        keep_encoding(ds, encode_identifier(match(sent_as), IMPLICIT_VR_LITTLE_ENDIAN), IMPLICIT_VR_LITTLE_ENDIAN)
        return ds

    def test_sent_as_received_without_middleware(self):
        executor = Executor()
        association = self.connect(executor)
        find = association.find(query(), "study")
        self.pump.flush()
        # The bytes, not the dataset, are what goes on (they are not
        # compared: only a relay that cannot change the dataset uses them).
        executor.matches.write(self.received("1.2.3", sent_as="9.9.9"))
        executor.matches.finish()
        executor.done.callback((0x0000, None))
        self.pump.flush()
        self.assertEqual([m.StudyInstanceUID for m in self.read_all(find.matches)], ["9.9.9"])

    def test_encoded_with_middleware(self):
        executor = Executor()
        executor.request_chain = ("audit",)
        association = self.connect(executor)
        find = association.find(query(), "study")
        self.pump.flush()
        executor.matches.write(self.received("1.2.3", sent_as="9.9.9"))
        executor.matches.finish()
        executor.done.callback((0x0000, None))
        self.pump.flush()
        self.assertEqual([m.StudyInstanceUID for m in self.read_all(find.matches)], ["1.2.3"])

    def test_received_encoding_needs_the_same_transfer_syntax(self):
        from harmony.dimse.scu import EXPLICIT_VR_LITTLE_ENDIAN, received_encoding

        ds = self.received("1.2.3", sent_as="1.2.3")
        self.assertIsNotNone(received_encoding(ds, IMPLICIT_VR_LITTLE_ENDIAN))
        self.assertIsNone(received_encoding(ds, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertIsNone(received_encoding(match("1.2.3"), IMPLICIT_VR_LITTLE_ENDIAN))
