"""
Idle associations kept for reuse (harmony.dimse.pool) and the dicom_scu
backend's use of them (association_idle_secs): only healthy, idle
associations are kept, for a bounded time and number, keyed by contexts
and user identity; a kept association the PACS had closed is replaced.
"""

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from harmony.backends.dicom_scu import OPTIONS, DicomScuBackend
from harmony.config.schema import Where
from harmony.dimse.association import AssociationAborted
from harmony.dimse.pdu import UserIdentityRQ
from harmony.dimse.pool import AssociationPool, pool_key
from harmony.dimse.scu import DimseStatus
from harmony.envelope import DicomRequest, RequestDetails, RequestEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.registry import BuildContext
from harmony.streams import Stream

ECHO = [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]


class FakeAssociation:
    def __init__(self, echo_error=None):
        self.reusable = True
        self.released = 0
        self.echo_error = echo_error
        self.echoes = 0
        self.finds = []

    def release(self):
        self.released += 1
        self.reusable = False
        return defer.succeed(None)

    def echo(self):
        self.echoes += 1
        if self.echo_error is not None:
            self.reusable = False
            return defer.fail(self.echo_error)
        return defer.succeed(DimseStatus(0))

    def find(self, identifier, model, priority=0):
        operation = type("Op", (), {})()
        operation.matches = Stream()
        operation.result = defer.Deferred()
        self.finds.append(operation)
        return operation


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = AssociationPool(self.clock, 5, max_idle=2)

    def test_reuse_within_the_idle_time(self):
        a = FakeAssociation()
        self.pool.give("k", a)
        self.assertEqual(self.pool.idle, 1)
        self.assertIs(self.pool.take("k"), a)
        self.assertIsNone(self.pool.take("k"))
        self.assertIsNone(self.pool.take("other"))
        self.assertEqual(a.released, 0)

    def test_released_after_the_idle_time(self):
        a = FakeAssociation()
        self.pool.give("k", a)
        self.clock.advance(4.9)
        self.assertEqual(a.released, 0)
        self.clock.advance(0.2)
        self.assertEqual(a.released, 1)
        self.assertEqual(self.pool.idle, 0)
        self.assertIsNone(self.pool.take("k"))

    def test_taking_cancels_the_expiry(self):
        a = FakeAssociation()
        self.pool.give("k", a)
        self.assertIs(self.pool.take("k"), a)
        self.clock.advance(10)
        self.assertEqual(a.released, 0)

    def test_unusable_associations_are_released_not_kept(self):
        a = FakeAssociation()
        a.reusable = False
        self.pool.give("k", a)
        self.assertEqual((self.pool.idle, a.released), (0, 1))

    def test_one_that_went_bad_while_kept_is_skipped(self):
        good, bad = FakeAssociation(), FakeAssociation()
        self.pool.give("k", good)
        self.pool.give("k", bad)
        bad.reusable = False  # the PACS released it meanwhile
        self.assertIs(self.pool.take("k"), good)
        self.assertEqual(bad.released, 1)

    def test_at_most_max_idle_per_key(self):
        kept = [FakeAssociation() for _ in range(3)]
        for a in kept:
            self.pool.give("k", a)
        self.assertEqual(self.pool.idle, 2)
        self.assertEqual([a.released for a in kept], [0, 0, 1])

    def test_disabled(self):
        pool = AssociationPool(self.clock, 0)
        a = FakeAssociation()
        pool.give("k", a)
        self.assertEqual((pool.idle, a.released), (0, 1))

    def test_close_releases_everything_and_keeps_nothing_after(self):
        a, b = FakeAssociation(), FakeAssociation()
        self.pool.give("k", a)
        self.pool.give("j", b)
        self.successResultOf(self.pool.close())
        self.assertEqual((a.released, b.released), (1, 1))
        c = FakeAssociation()
        self.pool.give("k", c)
        self.assertEqual((self.pool.idle, c.released), (0, 1))
        self.clock.advance(10)
        self.assertEqual(a.released, 1)

    def test_keys(self):
        alice = UserIdentityRQ(2, b"alice", b"pw", False)
        bob = UserIdentityRQ(2, b"bob", b"pw", False)
        self.assertEqual(pool_key(ECHO), pool_key([("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]))
        self.assertNotEqual(pool_key(ECHO), pool_key(ECHO, alice))
        self.assertNotEqual(pool_key(ECHO, alice), pool_key(ECHO, bob))
        self.assertEqual(pool_key(ECHO, alice), pool_key(ECHO, UserIdentityRQ(2, b"alice", b"pw", False)))
        self.assertNotEqual(pool_key(ECHO), pool_key([("1.2.840.10008.1.1", ["1.2.840.10008.1.2.1"])]))


class FakeClient:
    def __init__(self, associations):
        self.associations = list(associations)
        self.calls = 0

    def associate(self, host, port, called_aet, syntaxes, user_identity=None):
        self.calls += 1
        return defer.succeed(self.associations.pop(0))


def backend(client, clock, idle, **more):
    options = OPTIONS.validate(
        {"aet": "PACS", "host": "127.0.0.1", "port": 104, "association_idle_secs": idle, **more}, Where("t.toml")
    )
    b = DicomScuBackend("pacs", options, BuildContext(reactor=clock))
    b._client = client
    return b


def echo_envelope():
    return RequestEnvelope(details=RequestDetails(method="C-ECHO"), dicom=DicomRequest("echo"))


def find_envelope():
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    return RequestEnvelope(details=RequestDetails(method="C-FIND"), dicom=DicomRequest("find", identifier=identifier))


class BackendPoolTests(SynchronousTestCase):
    def test_idle_associations_are_capped(self):
        # Each parked association holds one of the PACS's association slots.
        self.assertEqual(backend(FakeClient([]), Clock(), 5)._pool.max_idle, 2)
        self.assertEqual(backend(FakeClient([]), Clock(), 5, max_idle_associations=1)._pool.max_idle, 1)

    def test_echo_reuses_the_association(self):
        clock = Clock()
        a = FakeAssociation()
        client = FakeClient([a])
        b = backend(client, clock, 5)
        for _ in range(3):
            self.assertEqual(self.successResultOf(b.handle(echo_envelope())).dicom.status, 0)
        self.assertEqual((client.calls, a.echoes, a.released), (1, 3, 0))
        clock.advance(6)
        self.assertEqual(a.released, 1)

    def test_find_reuses_the_association_once_it_has_ended(self):
        clock = Clock()
        a = FakeAssociation()
        client = FakeClient([a, FakeAssociation()])
        b = backend(client, clock, 5)
        first = self.successResultOf(b.handle(find_envelope())).dicom
        a.reusable = False  # the find is in progress
        second = self.successResultOf(b.handle(find_envelope())).dicom
        self.assertEqual(client.calls, 2)
        a.reusable = True
        a.finds[0].matches.finish()
        a.finds[0].result.callback(DimseStatus(0))
        self.assertEqual(self.successResultOf(first.done), (0, None))
        self.successResultOf(b.handle(find_envelope()))
        self.assertEqual((client.calls, len(a.finds)), (2, 2))
        self.assertNoResult(second.done)

    def test_without_idle_time_every_operation_has_its_own(self):
        clock = Clock()
        a, c = FakeAssociation(), FakeAssociation()
        client = FakeClient([a, c])
        b = backend(client, clock, 0)
        self.successResultOf(b.handle(echo_envelope()))
        self.successResultOf(b.handle(echo_envelope()))
        self.assertEqual((client.calls, a.released, c.released), (2, 1, 1))

    def test_a_kept_association_the_pacs_closed_is_replaced(self):
        clock = Clock()
        stale = FakeAssociation()
        fresh = FakeAssociation()
        client = FakeClient([stale, fresh])
        b = backend(client, clock, 5)
        self.successResultOf(b.handle(echo_envelope()))
        stale.echo_error = AssociationAborted(2, 0)
        self.assertEqual(self.successResultOf(b.handle(echo_envelope())).dicom.status, 0)
        self.assertEqual((client.calls, fresh.echoes), (2, 1))

    def test_a_new_association_that_aborts_is_an_error(self):
        clock = Clock()
        client = FakeClient([FakeAssociation(echo_error=AssociationAborted(2, 0))])
        b = backend(client, clock, 5)
        self.failureResultOf(b.handle(echo_envelope()), UpstreamUnavailable)
        self.assertEqual(client.calls, 1)

    def test_close_releases_kept_associations(self):
        clock = Clock()
        a = FakeAssociation()
        b = backend(FakeClient([a]), clock, 30)
        self.successResultOf(b.handle(echo_envelope()))
        self.successResultOf(b.close())
        self.assertEqual(a.released, 1)
