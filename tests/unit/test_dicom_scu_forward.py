"""
The dicom_scu backend's handling of DICOM requests, with a fake client
(no sockets): forwarding results, user identity pass-through, errors.
"""

import pydicom
from pydicom.data import get_testdata_file
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from harmony.backends.dicom_scu import OPTIONS, DicomScuBackend
from harmony.config.schema import Where
from harmony.dimse.association import AssociationRejected
from harmony.dimse.pdu import UserIdentityRQ
from harmony.dimse.scu import DimseStatus, read_part10_header
from harmony.envelope import DicomInstance, DicomRequest, RequestDetails, RequestEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.registry import BuildContext
from harmony.streams import Stream

CT = get_testdata_file("CT_small.dcm", download=False)


class FakeAssociation:
    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.stored = []
        self.released = False
        header = read_part10_header(CT)
        self.contexts = {1: (header.sop_class_uid, header.transfer_syntax)}

    def context_for(self, sop_class_uid, transfer_syntax=None):
        for abstract, ts in self.contexts.values():
            if abstract == sop_class_uid and (transfer_syntax is None or ts == transfer_syntax):
                return type("C", (), {"transfer_syntax": ts})()
        raise LookupError(sop_class_uid)

    def store_file(self, path):
        self.stored.append(path)
        return defer.succeed(self.statuses.pop(0))

    def echo(self):
        return defer.succeed(DimseStatus(0))

    def release(self):
        self.released = True
        return defer.succeed(None)


class FakeClient:
    def __init__(self, association=None, error=None):
        self.association = association
        self.error = error
        self.calls = []

    def associate(self, host, port, called_aet, syntaxes, user_identity=None):
        self.calls.append((host, port, called_aet, syntaxes, user_identity))
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(self.association)


def backend(client):
    options = OPTIONS.validate({"aet": "PACS", "host": "127.0.0.1", "port": 104}, Where("t.toml"))
    b = DicomScuBackend("pacs", options, BuildContext())
    b._client = client
    return b


def store_envelope(identity=None):
    header = read_part10_header(CT)
    instance = DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, None, path=CT)
    request = DicomRequest(
        "store", calling_aet="MODALITY", called_aet="HARMONY", instances=Stream.from_iterable([instance]),
        user_identity=identity,
    )
    return RequestEnvelope(details=RequestDetails(method="C-STORE"), dicom=request)


class ForwardTests(SynchronousTestCase):
    def test_provides_ibackend(self):
        self.assertTrue(verifyObject(IBackend, backend(FakeClient())))

    def test_forward_success_with_user_identity(self):
        association = FakeAssociation([DimseStatus(0)])
        client = FakeClient(association)
        identity = UserIdentityRQ(2, b"user", b"secret", False)
        response = self.successResultOf(backend(client).handle(store_envelope(identity)))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.dicom.status, 0x0000)
        self.assertEqual(association.stored, [CT])
        self.assertTrue(association.released)
        [(host, port, aet, syntaxes, passed)] = client.calls
        self.assertEqual((host, port, aet), ("127.0.0.1", 104, "PACS"))
        self.assertIs(passed, identity)
        ds = pydicom.dcmread(CT, stop_before_pixels=True)
        self.assertEqual(syntaxes, [(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])

    def test_pacs_failure_status_is_passed_on(self):
        association = FakeAssociation([DimseStatus(0xA700, "Disk full")])
        response = self.successResultOf(backend(FakeClient(association)).handle(store_envelope()))
        self.assertEqual(response.status, 502)
        self.assertEqual((response.dicom.status, response.dicom.error_comment), (0xA700, "Disk full"))

    def test_rejected_association_is_upstream_unavailable(self):
        client = FakeClient(error=AssociationRejected(1, 1, 7))
        failure = self.failureResultOf(backend(client).handle(store_envelope()), UpstreamUnavailable)
        self.assertIn("rejected", failure.value.message)

    def test_unreachable_pacs(self):
        client = FakeClient(error=ConnectionRefusedError())
        self.failureResultOf(backend(client).handle(store_envelope()), UpstreamUnavailable)

    def test_echo_request(self):
        client = FakeClient(FakeAssociation([]))
        envelope = RequestEnvelope(details=RequestDetails(method="C-ECHO"), dicom=DicomRequest("echo"))
        response = self.successResultOf(backend(client).handle(envelope))
        self.assertEqual(response.dicom.status, 0x0000)
