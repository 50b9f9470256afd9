"""
The dicom_scu backend's retrieves (harmony.backends.dicom_retrieve and the
backend's get/move handling) with fake associations, a fake move router
and a real FilesystemStorage on synchronous thread-pool fakes: DIMSE
get/move requests stream spooled instances (disposed of by the consumer),
counts follow the PACS's progress, C-MOVE goes to our own AE with the
router's message ID and a store SCP listening only while moves run, HTTP
/get, /move (to ourselves or a third party) and the seeds' shape.
"""

import os
import shutil

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from harmony.backends.dicom_scu import OPTIONS, DicomScuBackend
from harmony.config.errors import ConfigError
from harmony.config.schema import Where
from harmony.dimse.association import AssociationAborted, AssociationRejected
from harmony.dimse.scu import DimseStatus, DimseTimeout, read_part10_header
from harmony.dimse.substore import MemoryBudget
from harmony.envelope import DicomInstance, DicomRequest, Headers, RequestDetails, RequestEnvelope
from harmony.errors import BadRequest, UpstreamUnavailable
from harmony.registry import BuildContext
from harmony.streams import Stream

CT = get_testdata_file("CT_small.dcm", download=False)
MOVE_STUDY = "1.2.840.10008.5.1.4.1.2.2.2"


class SyncReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SyncPool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:
            from twisted.python.failure import Failure

            on_result(False, Failure())
        else:
            on_result(True, result)

    def start(self):
        pass

    def stop(self):
        pass


class FakeOperation:
    """
    A C-GET or C-MOVE in progress at the fake PACS.
    """

    def __init__(self, instances=None):
        self.instances = instances if instances is not None else Stream(high_water=4)
        self.result = defer.Deferred()
        self.on_progress = None
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeAssociation:
    def __init__(self, operation=None, error=None):
        self.operation = operation or FakeOperation()
        self.error = error
        self.calls = []
        self.released = False

    def get(self, identifier, model, priority=0, storage=None, layout=None, memory=None):
        self.layout = layout
        self.memory = memory
        self.calls.append(("get", identifier, model, priority, storage))
        if self.error is not None:
            raise self.error
        return self.operation

    def move(self, identifier, destination, model, priority=0, message_id=None):
        self.calls.append(("move", identifier, destination, model, priority, message_id))
        if self.error is not None:
            raise self.error
        return self.operation

    def release(self):
        self.released = True
        return defer.succeed(None)


class FakeClient:
    def __init__(self, association=None, error=None):
        self.association = association
        self.error = error
        self.calls = []

    def _answer(self):
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(self.association)

    def associate(self, host, port, called_aet, syntaxes, user_identity=None):
        self.calls.append(("associate", host, port, called_aet, syntaxes, user_identity))
        return self._answer()

    def associate_for_get(self, host, port, called_aet, storage_syntaxes, models=("study",), user_identity=None):
        self.calls.append(("associate_for_get", host, port, called_aet, models, user_identity))
        return self._answer()


class FakeIncoming:
    def __init__(self, message_id):
        self.message_id = message_id
        self.instances = Stream(high_water=4)
        self.finished = False
        self.failed = None
        self.followed = None

    def follow(self, operation):
        self.followed = operation

    def finish(self):
        self.finished = True
        self.instances.finish()

    def fail(self, error):
        self.failed = error
        self.instances.fail(error)


class FakeRouter:
    def __init__(self):
        self.expected = []

    def expect(self, destination_aet, storage, **kwargs):
        self.layout = kwargs.get("layout")
        self.memory = kwargs.get("memory")
        incoming = FakeIncoming(100 + len(self.expected))
        self.expected.append((destination_aet, storage, incoming))
        return incoming


class FakeListener:
    def __init__(self, fail=False):
        self.fail = fail
        self.running = False
        self.starts = 0

    def startService(self):
        self.starts += 1
        if self.fail:
            raise OSError("address in use")
        self.running = True

    def stopService(self):
        self.running = False
        return defer.succeed(None)


class FakeConfig:
    def __init__(self, root, endpoints=None):
        self.storage = type("S", (), {"options": type("O", (), {"path": root})()})()
        self.endpoints = endpoints or {}

    def resolve_path(self, path):
        return os.path.abspath(path)


def options(**extra):
    return OPTIONS.validate(dict({"aet": "PACS", "host": "127.0.0.1", "port": 104}, **extra), Where("t.toml"))


def dicom_envelope(operation, **kwargs):
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    request = DicomRequest(operation, level="STUDY", identifier=identifier, calling_aet="VIEWER", **kwargs)
    return RequestEnvelope(details=RequestDetails(method="C-" + operation.upper()), dicom=request)


def http_envelope(path, body):
    import json

    details = RequestDetails(
        method="POST", uri="/dicom/" + path, path=path, full_path="/dicom/" + path,
        headers=Headers([("content-type", "application/json")]),
    )
    return RequestEnvelope(details=details, body=json.dumps(body).encode())


class RetrieveTestCase(SynchronousTestCase):
    def setUp(self):
        import tempfile

        self.root = tempfile.mkdtemp(prefix="harmony-retrieve-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.router = FakeRouter()
        self.listeners = []

    def backend(self, client, endpoints=None, **extra):
        context = BuildContext(config=FakeConfig(self.root, endpoints), move_router=self.router)
        b = DicomScuBackend("pacs", options(**extra), context)
        b._client = client
        original = b._new_storage

        def new_storage(path, default):
            storage = original(path, default)
            storage._reactor = SyncReactor()
            storage.threadpool = SyncPool()
            return storage

        b._new_storage = new_storage

        def make_listener():
            listener = FakeListener()
            self.listeners.append(listener)
            return listener

        b.retriever._make_listener = make_listener
        self.addCleanup(lambda: self.successResultOf(b.close()))
        return b

    def spool_instance(self, backend, name="a.dcm", layout="{study}/{series}/{sop}.dcm"):
        """
        A file in the backend's spool, as a C-GET would have stored it
        (C{layout}: the one the retrieve was given).
        """
        spool = backend._spool_storage()
        path = os.path.join(spool.root, layout.format(study="1.2.3", series="4.5", sop=name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(CT, path)
        header = read_part10_header(CT)
        return DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, None, path=path)


class DimseGetTests(RetrieveTestCase):
    def test_get_streams_spooled_instances_and_disposes(self):
        association = FakeAssociation()
        client = FakeClient(association)
        b = self.backend(client)
        response = self.successResultOf(b.handle(dicom_envelope("get", query_model="study", priority=1)))
        result = response.dicom
        [(_, identifier, model, priority, storage)] = association.calls
        self.assertEqual((identifier.StudyInstanceUID, model, priority), ("1.2.3", "study", 1))
        self.assertEqual(storage.root, os.path.join(os.path.abspath(self.root), "spool", "pacs"))
        self.assertEqual(client.calls[0][0], "associate_for_get")

        association.operation.on_progress({"remaining": 1, "completed": 1, "failed": None, "warning": None})
        self.assertEqual((result.remaining, result.completed), (1, 1))
        instance = self.spool_instance(b, layout=association.layout)
        association.operation.instances.write(instance)
        got = self.successResultOf(result.instances.read())
        self.assertEqual(got.path, instance.path)
        self.assertTrue(os.path.exists(got.path))
        got.dispose()
        got.dispose()  # once is enough; twice is harmless
        self.assertFalse(os.path.exists(got.path))
        # The directory stays (the next instance may be committed there
        # now) until the retrieve settles.
        self.assertTrue(os.path.isdir(os.path.dirname(got.path)))

        association.operation.instances.finish()
        association.operation.result.callback(
            DimseStatus(0, None, {"NumberOfCompletedSuboperations": 2, "NumberOfFailedSuboperations": 0})
        )
        self.assertEqual(self.successResultOf(result.done), (0, None))
        self.assertEqual((result.completed, result.failed), (2, 0))
        self.assertTrue(association.released)
        self.successResultOf(result.instances.read())  # EOF: settled
        self.assertEqual(os.listdir(storage.root), [".tmp"])

    def test_get_timeout_is_a_failure_status(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        association.operation.instances.fail(DimseTimeout("late"))
        association.operation.result.errback(DimseTimeout("late"))
        self.failureResultOf(result.instances.read(), DimseTimeout)
        status, comment = self.successResultOf(result.done)
        self.assertEqual(status, 0xA700)
        self.assertIn("in time", comment)

    def test_abort_is_a_failure_status(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        association.operation.result.errback(AssociationAborted(2, 0))
        status, comment = self.successResultOf(result.done)
        self.assertEqual(status, 0xA700)
        self.assertIn("aborted", comment)

    def test_cancelling_the_stream_cancels_the_source(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        result.instances.cancel()
        self.assertTrue(association.operation.instances.cancelled)

    def test_instances_arriving_after_cancel_are_disposed(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        reading = result.instances.read()
        result.instances.cancel()
        self.failureResultOf(reading)
        self.assertTrue(association.operation.instances.cancelled)

    def test_unreachable_pacs(self):
        b = self.backend(FakeClient(error=ConnectionRefusedError()))
        self.failureResultOf(b.handle(dicom_envelope("get")), UpstreamUnavailable)

    def test_unknown_model(self):
        b = self.backend(FakeClient(FakeAssociation()))
        self.failureResultOf(b.handle(dicom_envelope("get", query_model="worklist")), BadRequest)


class SpoolAreaTests(RetrieveTestCase):
    """
    Each DIMSE retrieve spools into an area of its own, removed once the
    retrieve has settled, with whatever a cancelled relay never took.
    """

    def start(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        layout = association.layout
        area, rest = layout.split("/", 1)
        self.assertEqual(rest, "{study}/{series}/{sop}.dcm")
        self.assertEqual(len(area), 32)
        return b, association, result, os.path.join(b._spool_storage().root, area)

    def test_area_removed_once_every_instance_is_disposed(self):
        b, association, result, area = self.start()
        op = association.operation
        op.instances.write(self.spool_instance(b, "a", association.layout))
        op.instances.write(self.spool_instance(b, "b", association.layout))
        op.instances.finish()
        op.result.callback(DimseStatus(0))
        first = self.successResultOf(result.instances.read())
        second = self.successResultOf(result.instances.read())
        self.successResultOf(result.instances.read())  # EOF
        first.dispose()
        self.assertTrue(os.path.exists(second.path))  # still being relayed
        self.assertTrue(os.path.isdir(area))
        second.dispose()
        self.assertFalse(os.path.exists(area))
        self.assertTrue(os.path.isdir(b._spool_storage().root))

    def test_cancelled_relay_leaves_nothing(self):
        b, association, result, area = self.start()
        op = association.operation
        op.instances.write(self.spool_instance(b, "a", association.layout))
        taken = self.successResultOf(result.instances.read())
        op.instances.write(self.spool_instance(b, "b", association.layout))
        result.instances.cancel()
        # A sub-operation the PACS finishes after the cancel is stored too.
        self.spool_instance(b, "c", association.layout)
        self.assertTrue(os.path.isdir(area))
        op.result.callback(DimseStatus(0xFE00))
        self.assertFalse(os.path.exists(area))
        taken.dispose()  # harmless afterwards

    def test_failed_retrieve_removes_its_area(self):
        b, association, result, area = self.start()
        op = association.operation
        op.instances.write(self.spool_instance(b, "a", association.layout))
        op.instances.fail(AssociationAborted(2, 0))
        op.result.errback(AssociationAborted(2, 0))
        taken = self.successResultOf(result.instances.read())
        self.failureResultOf(result.instances.read(), AssociationAborted)
        self.assertTrue(os.path.exists(taken.path))
        taken.dispose()
        self.assertFalse(os.path.exists(area))


class MemoryRelayTests(RetrieveTestCase):
    """
    A consumer that takes instances from memory (the DIMSE relay) gets a
    budget of retrieve_memory_mib per retrieve; the others get files only.
    """

    def test_budget_for_a_consumer_taking_memory(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        self.assertIsInstance(association.memory, MemoryBudget)
        self.assertEqual(association.memory.limit, 16 * 1024 * 1024)

    def test_budget_is_configurable(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), retrieve_memory_mib=0.5)
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        self.assertEqual(association.memory.limit, 512 * 1024)

    def test_files_only_for_other_consumers_or_zero(self):
        for accept, mib in ((False, 16), (True, 0)):
            association = FakeAssociation()
            b = self.backend(FakeClient(association), retrieve_memory_mib=mib)
            self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=accept)))
            self.assertIsNone(association.memory)

    def test_each_retrieve_has_its_own_budget(self):
        first, second = FakeAssociation(), FakeAssociation()
        client = FakeClient(first)
        b = self.backend(client)
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        client.association = second
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        self.assertIsNot(first.memory, second.memory)

    def test_retrieves_share_the_backend_total(self):
        first, second = FakeAssociation(), FakeAssociation()
        client = FakeClient(first)
        b = self.backend(client, retrieve_memory_mib=1, retrieve_memory_total_mib=1.5)
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        client.association = second
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        mib = 1024 * 1024
        self.assertIs(first.memory.parent, second.memory.parent)
        self.assertTrue(first.memory.take(mib))
        # The second retrieve has room of its own, not in the total.
        self.assertFalse(second.memory.take(mib))
        self.assertTrue(second.memory.take(mib // 2))
        held = (first.memory.held, second.memory.held, first.memory.parent.held)
        self.assertEqual(held, (mib, mib // 2, mib * 3 // 2))
        first.memory.give(mib)
        self.assertTrue(second.memory.take(mib // 2))
        self.assertEqual(second.memory.parent.held, mib)

    def test_no_total_means_files_only(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), retrieve_memory_total_mib=0)
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        self.assertIsNone(association.memory)

    def test_move_gets_the_budget(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), dimse_retrieve_mode="move")
        self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True)))
        self.assertIsInstance(self.router.memory, MemoryBudget)

    def test_memory_instance_keeps_its_own_dispose_and_settles(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        result = self.successResultOf(b.handle(dicom_envelope("get", accept_in_memory=True))).dicom
        area = os.path.join(b._spool_storage().root, association.layout.split("/", 1)[0])
        given = []
        header = read_part10_header(CT)
        with open(CT, "rb") as f:
            data = f.read()
        op = association.operation
        op.instances.write(DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax,
                                         data, size=len(data), dispose=lambda: given.append(1)))
        spilled = self.spool_instance(b, "b", association.layout)
        spilled.dispose = lambda: given.append(2)
        op.instances.write(spilled)
        op.instances.finish()
        op.result.callback(DimseStatus(0))
        in_memory = self.successResultOf(result.instances.read())
        in_file = self.successResultOf(result.instances.read())
        self.successResultOf(result.instances.read())  # EOF
        self.assertIs(in_memory.data, data)
        in_memory.dispose()
        self.assertEqual(given, [1])
        self.assertTrue(os.path.isdir(area))  # the file is still being relayed
        in_file.dispose()
        # Both the instance's own dispose and the spool's removal ran.
        self.assertEqual(given, [1, 2])
        self.assertFalse(os.path.exists(in_file.path))
        self.assertFalse(os.path.exists(area))


class DimseMoveTests(RetrieveTestCase):
    def test_move_to_ourselves_with_the_routers_message_id(self):
        association = FakeAssociation()
        client = FakeClient(association)
        b = self.backend(client, dimse_retrieve_mode="move", local_aet="HARMONY_MV", incoming_store_port=11999)
        # A C-GET request is retrieved by C-MOVE too: the mode decides.
        result = self.successResultOf(b.handle(dicom_envelope("get"))).dicom
        [(destination, storage, incoming)] = self.router.expected
        self.assertEqual(destination, "HARMONY_MV")
        [(_, identifier, dest, model, priority, message_id)] = association.calls
        self.assertIs(incoming.followed, association.operation)
        self.assertEqual((dest, model, message_id), ("HARMONY_MV", "study", incoming.message_id))
        [(kind, _, _, aet, syntaxes, _)] = client.calls
        self.assertEqual((kind, aet), ("associate", "PACS"))
        self.assertEqual(syntaxes[0][0], MOVE_STUDY)
        [listener] = self.listeners
        self.assertTrue(listener.running)

        association.operation.on_progress({"remaining": 3, "completed": 0, "failed": None, "warning": None})
        self.assertEqual(result.remaining, 3)
        instance = self.spool_instance(b)
        incoming.instances.write(instance)
        got = self.successResultOf(result.instances.read())
        self.assertIsNotNone(got.dispose)

        association.operation.result.callback(DimseStatus(0, None, {"NumberOfCompletedSuboperations": 1}))
        self.assertTrue(incoming.finished)
        self.assertEqual(self.successResultOf(result.instances.read()).__class__.__name__, "_EOF")
        self.assertEqual(self.successResultOf(result.done), (0, None))
        self.assertEqual(result.completed, 1)
        # Transient: not listening once no move is in flight.
        self.assertFalse(listener.running)

    def test_concurrent_moves_share_one_listener(self):
        first, second = FakeAssociation(), FakeAssociation()
        client = FakeClient(first)
        b = self.backend(client, dimse_retrieve_mode="move")
        r1 = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
        client.association = second
        r2 = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
        [listener] = self.listeners
        first.operation.result.callback(DimseStatus(0))
        self.assertTrue(listener.running)
        second.operation.result.callback(DimseStatus(0))
        self.assertFalse(listener.running)
        self.assertEqual(self.successResultOf(r1.done)[0], 0)
        self.assertEqual(self.successResultOf(r2.done)[0], 0)
        ids = [incoming.message_id for _, _, incoming in self.router.expected]
        self.assertEqual(len(set(ids)), 2)

    def test_consecutive_moves_listen_again(self):
        client = FakeClient(FakeAssociation())
        b = self.backend(client, dimse_retrieve_mode="move")
        for round in (1, 2, 3):
            association = client.association = FakeAssociation()
            result = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
            self.assertEqual(len(self.listeners), round)
            self.assertTrue(self.listeners[-1].running)
            association.operation.result.callback(DimseStatus(0))
            self.assertEqual(self.successResultOf(result.done)[0], 0)
            self.assertFalse(self.listeners[-1].running)

    def test_next_listener_waits_for_the_previous_to_stop(self):
        client = FakeClient(FakeAssociation())
        b = self.backend(client, dimse_retrieve_mode="move")
        stopped = defer.Deferred()
        first = client.association
        self.successResultOf(b.handle(dicom_envelope("move")))
        self.listeners[0].stopService = lambda: stopped
        first.operation.result.callback(DimseStatus(0))
        client.association = FakeAssociation()
        d = b.handle(dicom_envelope("move"))
        self.assertNoResult(d)
        self.assertEqual(len(self.listeners), 2)
        self.assertFalse(self.listeners[1].running)
        stopped.callback(None)
        self.successResultOf(d)
        self.assertTrue(self.listeners[1].running)

    def test_persistent_listener_is_a_service_and_stays(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), dimse_retrieve_mode="move", persistent_store_scp=True)
        [service] = b.services(None)
        service.startService()
        self.successResultOf(b.handle(dicom_envelope("move")))
        association.operation.result.callback(DimseStatus(0))
        self.assertTrue(service.running)
        self.assertEqual(service.starts, 1)

    def test_listener_that_cannot_start(self):
        b = self.backend(FakeClient(FakeAssociation()), dimse_retrieve_mode="move")
        b.retriever._make_listener = lambda: FakeListener(fail=True)
        failure = self.failureResultOf(b.handle(dicom_envelope("move")), UpstreamUnavailable)
        self.assertIn("11123", failure.value.message)
        self.assertEqual(self.router.expected, [])

    def test_move_failure_fails_the_incoming_move(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), dimse_retrieve_mode="move")
        result = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
        [(_, _, incoming)] = self.router.expected
        association.operation.result.errback(AssociationAborted(2, 0))
        self.assertIsInstance(incoming.failed, AssociationAborted)
        self.failureResultOf(result.instances.read(), AssociationAborted)
        self.assertEqual(self.successResultOf(result.done)[0], 0xA700)
        self.assertFalse(self.listeners[0].running)

    def test_pacs_failure_status(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), dimse_retrieve_mode="move")
        result = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
        association.operation.result.callback(DimseStatus(0xA801, "Unknown destination"))
        self.assertEqual(self.successResultOf(result.done), (0xA801, "Unknown destination"))

    def test_rejected_association_releases_everything(self):
        b = self.backend(FakeClient(error=AssociationRejected(1, 1, 7)), dimse_retrieve_mode="move")
        self.failureResultOf(b.handle(dicom_envelope("move")), UpstreamUnavailable)
        [(_, _, incoming)] = self.router.expected
        self.assertIsNotNone(incoming.failed)
        self.assertFalse(self.listeners[0].running)

    def test_cancelling_a_move_sends_c_cancel(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), dimse_retrieve_mode="move")
        result = self.successResultOf(b.handle(dicom_envelope("move"))).dicom
        result.instances.cancel()
        self.assertTrue(association.operation.cancelled)


class SharedScpTests(RetrieveTestCase):
    def endpoint(self, **extra):
        from harmony.config.model import ServiceEntry
        from harmony.endpoints.dicom_scp import OPTIONS as SCP_OPTIONS

        values = dict({"local_aet": "HARMONY_SCU", "port": 11123, "enable_store": True}, **extra)
        return {"scp": ServiceEntry("scp", "dicom_scp", SCP_OPTIONS.validate(values, Where("p.toml")), "p.toml")}

    def test_an_scp_on_the_incoming_port_receives(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association), endpoints=self.endpoint(), dimse_retrieve_mode="move")
        self.assertTrue(b.retriever.shared_scp)
        self.assertEqual(b.services(None), [])
        self.successResultOf(b.handle(dicom_envelope("move")))
        self.assertEqual(self.listeners, [])

    def test_scp_on_another_port_does_not(self):
        b = self.backend(FakeClient(FakeAssociation()), endpoints=self.endpoint(port=104))
        self.assertFalse(b.retriever.shared_scp)

    def test_scp_without_store(self):
        with self.assertRaises(ConfigError) as e:
            self.backend(FakeClient(), endpoints=self.endpoint(enable_store=False))
        self.assertIn("enable_store", str(e.exception))

    def test_scp_with_another_aet(self):
        with self.assertRaises(ConfigError) as e:
            self.backend(FakeClient(), endpoints=self.endpoint(local_aet="OTHER"))
        self.assertIn("'OTHER'", str(e.exception))

    def test_scp_with_another_aet_not_checked(self):
        b = self.backend(FakeClient(), endpoints=self.endpoint(local_aet="OTHER", require_called_aet=False))
        self.assertTrue(b.retriever.shared_scp)


class HttpRetrieveTests(RetrieveTestCase):
    def test_get_renders_stored_instances(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        d = b.handle(http_envelope("get", {"operation": "C-GET", "level": "STUDY", "query": {"StudyInstanceUID": "1.2.3"}}))
        [(_, identifier, model, _, storage)] = association.calls
        self.assertEqual(storage.root, os.path.join(os.path.abspath(self.root), "retrieved"))
        self.assertNotIn("PatientName", identifier)  # no return keys for a retrieve
        association.operation.instances.write(self.spool_instance(b))
        association.operation.instances.finish()
        association.operation.result.callback(
            DimseStatus(0, None, {"NumberOfCompletedSuboperations": 1, "NumberOfFailedSuboperations": 0})
        )
        response = self.successResultOf(d)
        body = _json(response)
        self.assertEqual(response.status, 200)
        self.assertEqual(body["operation"], "get")
        self.assertTrue(body["success"])
        self.assertEqual(body["counts"], {"completed": 1, "failed": 0})
        self.assertEqual(body["stored"], 1)

    def test_move_to_ourselves_over_http(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        d = b.handle(http_envelope("move", {"level": "STUDY", "query": {"StudyInstanceUID": "1.2.3"}}))
        [(destination, storage, incoming)] = self.router.expected
        self.assertEqual(destination, "HARMONY_SCU")
        self.assertEqual(storage.root, os.path.join(os.path.abspath(self.root), "retrieved"))
        association.operation.result.callback(DimseStatus(0xC000, "Cannot"))
        response = self.successResultOf(d)
        body = _json(response)
        self.assertEqual(response.status, 502)
        self.assertEqual((body["operation"], body["success"], body["status"]), ("move", False, "0xC000"))
        self.assertEqual(body["error"], "Cannot")

    def test_third_party_move(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        d = b.handle(
            http_envelope("", {"operation": "C-MOVE", "level": "STUDY", "query": {"StudyInstanceUID": "1.2.3"},
                               "destination": "WORKSTATION"})
        )
        [(_, _, destination, model, _, message_id)] = association.calls
        self.assertEqual((destination, message_id), ("WORKSTATION", None))
        self.assertEqual(self.router.expected, [])
        association.operation.result.callback(
            DimseStatus(0, None, {"NumberOfCompletedSuboperations": 5, "NumberOfFailedSuboperations": 0})
        )
        response = self.successResultOf(d)
        body = _json(response)
        self.assertEqual(response.status, 200)
        self.assertEqual(body["destination"], "WORKSTATION")
        self.assertEqual(body["counts"], {"completed": 5, "failed": 0})
        self.assertTrue(association.released)

    def test_third_party_move_failure(self):
        association = FakeAssociation()
        b = self.backend(FakeClient(association))
        d = b.handle(http_envelope("move", {"query": {"StudyInstanceUID": "1"}, "destination": "NOWHERE"}))
        association.operation.result.callback(DimseStatus(0xA801, "Move destination unknown"))
        response = self.successResultOf(d)
        self.assertEqual(response.status, 502)
        self.assertEqual(_json(response)["error"], "Move destination unknown")

    def test_bad_destination(self):
        b = self.backend(FakeClient(FakeAssociation()))
        for destination in (5, "", "X" * 17):
            self.failureResultOf(b.handle(http_envelope("move", {"query": {}, "destination": destination})), BadRequest)

    def test_seed_shape_names_the_operation(self):
        b = self.backend(FakeClient(FakeAssociation()))
        failure = self.failureResultOf(b.handle(http_envelope("", {"operation": "C-STORE"})), BadRequest)
        self.assertIn("C-ECHO, C-FIND, C-GET, C-MOVE", failure.value.message)
        self.failureResultOf(b.handle(http_envelope("", {"query": {}})), BadRequest)

    def test_seed_shape_echo(self):
        association = FakeAssociation()
        association.echo = lambda: defer.succeed(DimseStatus(0))
        b = self.backend(FakeClient(association))
        response = self.successResultOf(b.handle(http_envelope("", {"operation": "c-echo"})))
        self.assertEqual(_json(response)["operation"], "echo")


def _json(response):
    import json

    body = response.body
    return json.loads(body if isinstance(body, (bytes, str)) else b"".join(body))
