"""
The jmix_builder middleware: a stored package answers at once; else one
request builds it from the backend's retrieve while the others wait for
that build.  The building request's answer streams the zip as it is
written (its central directory once the package is stored); a build that
fails mid-stream ends the body with an error (the HTTP adapter then aborts
the connection).  Fake thread pools, synchronous or stepped by hand; no
sockets.
"""

import gc
import io
import json
import os
import random
import shutil
import types
import zipfile

import pytest
from test_jmix_package import Unzipped, make_study, read_bytes, reference_payload_hash
from test_jmix_store import FakeReactor
from twisted.internet import defer
from twisted.python.failure import Failure

from _fakes import FakeThreadPool
from harmony.config.schema import Where
from harmony.dimse.scu import read_part10_header
from harmony.endpoints import jmix as jmix_endpoint
from harmony.envelope import DicomInstance, DicomResult, RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import NotFound, UpstreamUnavailable
from harmony.jmix.package import PackageBuilder
from harmony.jmix.store import PackageStore
from harmony.middleware import jmix_builder
from harmony.registry import BuildContext
from harmony.streams import EOF, Stream, collect


class Reactor(FakeReactor):
    def __init__(self):
        super().__init__()
        self.pool = FakeThreadPool()

    def getThreadPool(self):
        return self.pool

    def drain(self):
        """
        Run the thread pool's work and the reactor's turns that are due (and
        what they lead to) until none is left.
        """
        while True:
            if self.pool.pending:
                self.pool.run()
            elif any(call.getTime() <= self.seconds() for call in self.getDelayedCalls()):
                self.advance(0)
            else:
                return


@pytest.fixture
def setup(tmp_path):
    reactor = Reactor()
    root = str(tmp_path / "store")
    store = PackageStore(root, reactor=reactor, threadpool=reactor.pool, clock=reactor)
    store.ready = store.start()
    jmix_endpoint._STORES[os.path.abspath(root)] = store
    options = jmix_builder.OPTIONS.validate({"sender_name": "Test Site"}, Where("t.toml"))
    mw = jmix_builder.JmixBuilder("jb", options, BuildContext(reactor=reactor))
    study, made = make_study(str(tmp_path / "source"))
    yield mw, os.path.abspath(root), study, made, tmp_path
    jmix_endpoint._STORES.pop(os.path.abspath(root), None)
    reactor.pool.immediate = True
    store.stop()


def envelope(root, study, method="GET"):
    env = RequestEnvelope(details=RequestDetails(method=method, path="api/jmix", client=("10.0.0.7", 5000)))
    env.metadata.update({"jmix_action": "build", "jmix_study_uid": study, "jmix_store": root,
                         "jmix_skip_hashing": "false", "jmix_skip_listing": "false"})
    return env


def lead(setup):
    """
    The first request for the study, the one that builds, accepted; the
    thread pool's work runs only when drained.  Returns (reactor, leader).
    """
    mw, root, study, _, _ = setup
    reactor = mw._reactor
    reactor.pool.immediate = False
    leader = envelope(root, study)
    d = mw.request(leader)
    reactor.drain()
    fired(d)
    return reactor, leader


def fired(d):
    out = []
    d.addBoth(out.append)
    assert out, "did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def retrieved(tmp_path, made, name="spool"):
    """
    The study as a retrieve delivers it: spooled copies with disposers.
    """
    spool = tmp_path / name
    spool.mkdir(exist_ok=True)
    disposed, items = [], []
    for n, (_, _, path) in enumerate(made):
        copy = spool / f"{n}.dcm"
        shutil.copy(path, copy)
        header = read_part10_header(str(copy))
        items.append(DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, None,
                                   path=str(copy), dispose=lambda copy=copy: (disposed.append(1), os.remove(copy))))
    return items, disposed


def answered(mw, leader, result):
    """
    The leader's answer to C{result}, once the reactor has done what is due.
    """
    d = mw.response(leader, ResponseEnvelope(dicom=result))
    mw._reactor.drain()
    return fired(d)


def stream_answer(mw, leader, done=None):
    """
    The leader's answer to a retrieve whose instances the test writes:
    (the retrieve's instance stream, the answer's Deferred).  C{done}: the
    retrieve's outcome (by default a Deferred that never fires).
    """
    instances = Stream()
    result = DicomResult(status=None, instances=instances, done=done if done is not None else defer.Deferred())
    return instances, mw.response(leader, ResponseEnvelope(dicom=result))


def zip_names(response):
    data = fired(collect(response.body))
    return sorted(zipfile.ZipFile(io.BytesIO(data)).namelist())


class Reader:
    """
    Reads a streamed body as its bytes come: C{data} so far; C{ended}:
    C{False}, C{True} at its end, or the Failure it ended with.
    """

    def __init__(self, body):
        self.body = body
        self.data = bytearray()
        self.ended = False
        self._next()

    def _next(self):
        while not self.ended:
            d = self.body.read()
            if not d.called:
                d.addBoth(self._got)
                return
            out = []
            d.addBoth(out.append)
            if not self._take(out[0]):
                return

    def _got(self, item):
        if self._take(item):
            self._next()

    def _take(self, item):
        if item is EOF:
            self.ended = True
            return False
        if isinstance(item, Failure):
            self.ended = item
            return False
        self.data += item
        return True


def listed(root):
    return sorted(name for name in os.listdir(root) if not name.startswith("index.sqlite3"))


def test_build_once_then_served_from_the_store(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    assert fired(mw.request(leader)) is None
    assert (leader.dicom.operation, leader.dicom.level) == ("get", "STUDY")
    assert leader.dicom.identifier.StudyInstanceUID == study
    follower = envelope(root, study)
    waiting = mw.request(follower)
    assert not waiting.called  # the build is under way: it waits
    items, disposed = retrieved(tmp_path, made)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    answer = fired(mw.response(leader, ResponseEnvelope(dicom=result)))
    assert answer.status == 200
    assert answer.headers.get("content-type") == "application/zip"
    assert answer.body.length is None  # streamed as it was written: no Content-Length
    body = fired(collect(answer.body))
    assert len(disposed) == len(made)
    names = sorted(zipfile.ZipFile(io.BytesIO(body)).namelist())
    package_id = names[0].split("/")[0]
    assert answer.headers.get("content-disposition") == f'attachment; filename="{package_id}.zip"'
    assert sum(n.endswith(".dcm") for n in names) == len(made)
    # What was streamed is the stored package, and nothing else is left.
    with open(os.path.join(root, package_id + ".zip"), "rb") as f:
        assert f.read() == body
    assert listed(root) == sorted([package_id + ".zip", ".locks", ".staging"])
    assert os.listdir(os.path.join(root, ".staging")) == []
    # The follower gets the same package, without a retrieve of its own.
    shared = fired(waiting)
    assert follower.dicom is None
    assert shared.body.length == len(body)
    assert fired(collect(shared.body)) == body
    # Later requests: from the store.
    later = envelope(root, study)
    stored = fired(mw.request(later))
    assert later.dicom is None
    assert stored.headers.get("content-disposition") == f'attachment; filename="{package_id}.zip"'
    record = fired(jmix_endpoint.store_for(root, None).get(package_id))
    with zipfile.ZipFile(record.zip_path) as zf:
        doc = json.loads(zf.read(f"{package_id}/manifest.json"))
    assert doc["sender"]["name"] == "Test Site"
    assert doc["requester"]["id"] == "10.0.0.7"


def test_the_answer_streams_while_the_package_is_built(setup, monkeypatch):
    """
    Step by step: no answer before the first instance is in the zip; then
    every instance's bytes go out as it is added, while the retrieve goes
    on; the JSON documents once the retrieve ended; the central directory
    only once the package is in the store.  What went out is the stored zip.
    """
    mw, root, study, made, tmp_path = setup
    reactor = mw._reactor
    store = jmix_endpoint.store_for(root, None)
    reactor.pool.immediate = False
    leader = envelope(root, study)
    d = mw.request(leader)
    reactor.drain()
    assert fired(d) is None
    items, disposed = retrieved(tmp_path, made)
    instances, done = Stream(), defer.Deferred()
    answer = mw.response(leader, ResponseEnvelope(dicom=DicomResult(status=None, instances=instances, done=done)))
    reactor.drain()
    assert not answer.called  # nothing retrieved yet: the status may still be a 404
    instances.write(items[0])
    reactor.drain()
    response = fired(answer)
    assert response.status == 200 and response.body.length is None
    body = Reader(response.body)
    assert body.data and body.ended is False and len(disposed) == 1
    sizes = [len(body.data)]
    for item in items[1:]:
        instances.write(item)
        reactor.drain()
        assert body.ended is False
        sizes.append(len(body.data))
    assert sizes == sorted(set(sizes)) and len(disposed) == len(made)  # more with every instance
    # The retrieve ends; the package is finished, but not stored yet.
    adding, infos = defer.Deferred(), []
    real_add = store.add
    monkeypatch.setattr(store, "add", lambda info: infos.append(info) or adding)
    instances.finish()
    done.callback((0, None))
    reactor.drain()
    (info,) = infos
    assert body.ended is False
    assert b"PK\x01\x02" not in body.data  # the JSON documents went, the central directory not
    with open(info.zip_path, "rb") as f:
        stored = f.read()
    assert len(stored) > len(body.data) > sizes[-1]
    assert stored.startswith(bytes(body.data))
    # The store takes it: the central directory goes out, the body ends.
    real_add(info).chainDeferred(adding)
    reactor.drain()
    assert body.ended is True
    assert bytes(body.data) == stored
    package = Unzipped(info.zip_path)
    assert sum(rel.startswith("payload/dicom/") for rel in package.files) == len(made)
    assert package.json("manifest.json")["security"]["payload_hash"] == reference_payload_hash(package.payload())


def test_the_answer_can_be_taken_as_the_growing_zip(setup):
    """
    A response writer that sends files itself (sendfile) takes the body
    as the zip being written: it learns how much is final as instances
    are added, and the whole once stored; nothing is read into the stream.
    A build failing afterwards fails the source's wait.
    """
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    items, _ = retrieved(tmp_path, made)
    instances, done = Stream(), defer.Deferred()
    answer = mw.response(leader, ResponseEnvelope(dicom=DicomResult(status=None, instances=instances, done=done)))
    # Taken as the answer arrives (as the HTTP adapter does, before reading).
    taken = []
    answer.addCallback(lambda response: taken.append(response.body.take_file()) or response)
    instances.write(items[0])
    reactor.drain()
    response = fired(answer)
    (source,) = taken
    assert source is not None and response.body.take_file() is None
    limits = [source.available()]
    woken = []
    source.wait().addCallback(woken.append)
    for item in items[1:]:
        instances.write(item)
        reactor.drain()
        limits.append(source.available())
    assert woken == [None]
    assert [complete for _, complete in limits] == [False] * len(limits)
    assert [limit for limit, _ in limits] == sorted(limit for limit, _ in limits) and limits[-1][0] > limits[0][0]
    instances.finish()
    done.callback((0, None))
    reactor.drain()
    limit, complete = source.available()
    assert complete
    (stored,) = [os.path.join(root, name) for name in os.listdir(root) if name.endswith(".zip")]
    with open(stored, "rb") as f:
        whole = f.read()
    assert limit == len(whole)
    assert os.pread(source.fileno(), limit, 0) == whole
    source.close()


def test_a_zip_answer_already_read_from_is_not_taken(setup):
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    items, _ = retrieved(tmp_path, made)
    instances, answer = stream_answer(mw, leader)
    instances.write(items[0])
    reactor.drain()
    body = fired(answer).body
    assert body.take_file() is None  # its first bytes are in the stream already
    assert fired(body.read())[:4] == b"PK\x03\x04"
    instances.cancel()
    reactor.drain()


def test_a_taken_zip_fails_the_wait_when_the_build_fails(setup, tmp_path):
    mw, root, study, made, _ = setup
    reactor, leader = lead(setup)
    _, other = make_study(str(tmp_path / "other"), series=(("CT_small.dcm", 1, None),))
    items, _ = retrieved(tmp_path, made[:1] + other)
    instances, answer = stream_answer(mw, leader)
    taken = []
    answer.addCallback(lambda response: taken.append(response.body.take_file()) or response)
    instances.write(items[0])
    reactor.drain()
    (source,) = taken
    waiting = source.wait()
    instances.write(items[1])  # another study: the build fails
    reactor.drain()
    failures = []
    waiting.addErrback(failures.append)
    source.wait().addErrback(failures.append)
    assert [f.check(UpstreamUnavailable) for f in failures] == [UpstreamUnavailable] * 2
    source.close()


def test_a_build_failing_mid_stream_ends_the_body_with_an_error(setup):
    """
    The third instance belongs to another study: the answer has started,
    so its body fails (the adapter aborts the connection); the waiters get
    a 502; nothing is stored or left behind; every spooled instance is
    disposed of and the retrieve's stream cancelled.
    """
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    waiting = mw.request(envelope(root, study))
    _, other = make_study(str(tmp_path / "other"), series=(("CT_small.dcm", 1, None),))
    items, disposed = retrieved(tmp_path, made[:2] + other + made[2:])
    instances, answer = stream_answer(mw, leader)
    reactor.drain()
    for item in items[:3]:
        instances.write(item)
        reactor.drain()
    body = Reader(fired(answer).body)
    assert len(body.data) > 0
    assert body.ended is not False and body.ended.check(UpstreamUnavailable)
    assert "build failed" in body.ended.getErrorMessage()
    assert instances.cancelled
    with pytest.raises(UpstreamUnavailable):
        fired(waiting)
    assert len(disposed) == 3
    assert listed(root) == sorted([".locks", ".staging"])
    assert os.listdir(os.path.join(root, ".staging")) == []
    # Nothing stuck: the next request builds again.
    again = envelope(root, study)
    d = mw.request(again)
    reactor.drain()
    assert fired(d) is None and again.dicom is not None


def test_a_bad_first_instance_is_an_error_answer(setup):
    """
    Before anything was sent the build's failure is an ordinary error
    answer (502: the PACS sent something that cannot be packaged).
    """
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM" * 100)
    disposed = []
    item = DicomInstance("1.2", "1.2.3", "1.2.840.10008.1.2.1", None, path=str(junk),
                         dispose=lambda: disposed.append(1))
    result = DicomResult(status=None, instances=Stream.from_iterable([item]), done=defer.succeed((0, None)))
    with pytest.raises(UpstreamUnavailable, match="cannot be packaged"):
        fired(mw.response(leader, ResponseEnvelope(dicom=result)))
    assert disposed == [1]
    assert listed(root) == sorted([".locks", ".staging"])


def test_head_gets_the_finished_package(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study, method="HEAD")
    fired(mw.request(leader))
    items, _ = retrieved(tmp_path, made)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    answer = fired(mw.response(leader, ResponseEnvelope(dicom=result)))
    package_id = answer.headers.get("content-disposition").split('"')[1][:-4]
    assert answer.body.length == os.path.getsize(os.path.join(root, package_id + ".zip"))


def test_a_client_gone_mid_stream_does_not_stop_the_build(setup):
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    waiting = mw.request(envelope(root, study))
    items, disposed = retrieved(tmp_path, made)
    instances, answer = stream_answer(mw, leader, defer.succeed((0, None)))
    reactor.drain()
    instances.write(items[0])
    reactor.drain()
    fired(answer).body.cancel()  # the client went away
    for item in items[1:]:
        instances.write(item)
    instances.finish()
    reactor.drain()
    shared = fired(waiting)
    assert len(zipfile.ZipFile(io.BytesIO(fired(collect(shared.body)))).namelist()) == 4 + 4 + 6
    assert len(disposed) == 6


def test_instances_held_in_memory_are_packaged(setup, tmp_path):
    """
    The build asks for instances from memory where the backend can (its
    retrieve budget); those come as Part 10 bytes without a file, and are
    packaged and disposed of like spooled ones: the same payload.
    """
    mw, root, study, made, _ = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    assert leader.dicom.accept_in_memory is True
    items, disposed = retrieved(tmp_path, made)
    for item in items[::2]:
        with open(item.path, "rb") as f:
            data = f.read()
        os.remove(item.path)
        item.path = None
        item.data = data
        item.dispose = lambda: disposed.append(1)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    body = fired(collect(answered(mw, leader, result).body))
    assert len(disposed) == len(made)
    path = tmp_path / "memory.zip"
    path.write_bytes(body)
    package = Unzipped(str(path))
    assert package.json("manifest.json")["security"]["payload_hash"] == reference_payload_hash(package.payload())
    payload_dicom = {name: data for name, data in package.payload().items() if name.startswith("dicom/")}
    assert sorted(payload_dicom.values()) == sorted(read_bytes(p) for _, _, p in made)


def test_the_uids_the_retrieve_read_are_not_read_again(setup, tmp_path, monkeypatch):
    """
    Instances delivered with the UIDs their retrieve read from them (held
    in memory or spooled) are packaged without another tag walk.
    """
    from harmony.jmix import package as package_module

    mw, root, study, made, _ = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    items, disposed = retrieved(tmp_path, made)
    for n, (item, (series_uid, sop_uid, _)) in enumerate(zip(items, made)):
        item.uids = (study, series_uid, sop_uid)
        if n % 2:
            item.data, item.path = read_bytes(item.path), None

    def no_walk(*args):
        raise AssertionError("walked again")

    monkeypatch.setattr(package_module, "_header_uids", no_walk)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    body = fired(collect(answered(mw, leader, result).body))
    path = tmp_path / "given.zip"
    path.write_bytes(body)
    payload_dicom = {n: d for n, d in Unzipped(str(path)).payload().items() if n.startswith("dicom/")}
    assert sorted(payload_dicom.values()) == sorted(read_bytes(p) for _, _, p in made)


def test_builds_in_different_arrival_orders_have_the_same_payload(setup, tmp_path):
    """
    Two builds of the study (two stores), its instances arriving in two
    different orders: same payload bytes and payload hash, names sorted in
    both zips, local entries in each arrival order.
    """
    mw, root, study, made, _ = setup
    other_root = str(tmp_path / "store2")
    reactor = mw._reactor
    store2 = PackageStore(other_root, reactor=reactor, threadpool=reactor.pool, clock=reactor)
    store2.ready = store2.start()
    jmix_endpoint._STORES[other_root] = store2
    try:
        packages = []
        order = list(range(len(made)))
        random.Random(3).shuffle(order)
        for n, (store_root, sequence) in enumerate(((root, made), (other_root, [made[i] for i in order]))):
            leader = envelope(store_root, study)
            fired(mw.request(leader))
            items, _ = retrieved(tmp_path, sequence, name=f"spool{n}")
            result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
            body = fired(collect(fired(mw.response(leader, ResponseEnvelope(dicom=result))).body))
            path = tmp_path / f"build{n}.zip"
            path.write_bytes(body)
            packages.append(Unzipped(str(path)))
        first, second = packages
        assert first.id != second.id
        assert first.payload() == second.payload()
        hashes = {p.json("manifest.json")["security"]["payload_hash"] for p in packages}
        assert hashes == {reference_payload_hash(first.payload())}
        for package in packages:
            relative = [name.split("/", 1)[1] for name in package.names]
            assert relative == sorted(relative)
    finally:
        jmix_endpoint._STORES.pop(other_root, None)
        store2.stop()


def test_the_retrieve_is_not_read_far_ahead_of_the_builder(setup, monkeypatch):
    mw, root, study, made, tmp_path = setup
    monkeypatch.setattr(jmix_builder, "MAX_QUEUED", 2)
    reactor, leader = lead(setup)
    items, disposed = retrieved(tmp_path, made)
    pulled = []

    def pull():
        pulled.append(1)
        return items[len(pulled) - 1] if len(pulled) <= len(items) else EOF

    result = DicomResult(status=None, instances=Stream(pull=pull), done=defer.succeed((0, None)))
    answer = mw.response(leader, ResponseEnvelope(dicom=result))
    reactor.pool.run()  # the staging area
    reactor.pool.run()  # the builder
    assert len(pulled) == 3 and not disposed  # one being added, two waiting: no more read
    reactor.drain()
    assert len(disposed) == len(made)
    assert zip_names(fired(answer))


def test_instances_arriving_during_an_add_go_to_the_thread_together(setup, monkeypatch):
    """
    While the thread adds one instance the next ones queue; they then go to
    the thread in one call (it does not wait for the reactor between two
    instances), and each is disposed of as soon as it is in the zip.
    """
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    items, disposed = retrieved(tmp_path, made)
    seen = []
    add = PackageBuilder.add
    monkeypatch.setattr(PackageBuilder, "add", lambda self, *a: (seen.append(len(disposed)), add(self, *a))[1])
    instances, answer = stream_answer(mw, leader, defer.succeed((0, None)))
    reactor.drain()  # the staging area, the builder
    before = reactor.pool.submitted
    for item in items:
        instances.write(item)
    instances.finish()
    assert reactor.pool.submitted == before + 1  # the first instance
    reactor.pool.run()
    assert reactor.pool.submitted == before + 2  # the five others, together
    reactor.pool.run()
    assert seen == [0, 1, 2, 3, 4, 5]
    reactor.drain()
    assert len(disposed) == len(made)
    assert sum(name.endswith(".dcm") for name in zip_names(fired(answer))) == len(made)


def test_a_bad_instance_ends_its_batch(setup, tmp_path):
    """
    The instances of a batch after one that cannot be packaged are not
    added, only disposed of; the build fails.
    """
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    _, other = make_study(str(tmp_path / "other"), series=(("CT_small.dcm", 1, None),))
    items, disposed = retrieved(tmp_path, made[:2] + other + made[2:])
    instances, answer = stream_answer(mw, leader)
    reactor.drain()
    for item in items:
        instances.write(item)
    reactor.drain()
    body = Reader(fired(answer).body)
    assert body.ended is not False and body.ended.check(UpstreamUnavailable)
    assert len(disposed) == len(items)
    assert instances.cancelled
    assert listed(root) == sorted([".locks", ".staging"])


def test_small_instances_in_memory_are_added_on_the_reactor_thread(setup, monkeypatch):
    """
    Instances held in memory whose UIDs the retrieve read are added on the
    reactor thread, in a later turn than the one that received them (which
    sends their C-STORE-RSP), INLINE_TURN bytes per turn at most; larger
    ones go to the thread pool, in their place in the arrival order.
    """
    mw, root, study, made, tmp_path = setup
    reactor, leader = lead(setup)
    items, disposed = retrieved(tmp_path, made)
    for item, (series_uid, sop_uid, _) in zip(items, made):
        item.uids = (study, series_uid, sop_uid)
        item.data, item.path = read_bytes(item.path), None
    sizes = [len(item.data) for item in items]
    # The series are CT (3 instances), MR (2, smaller), CT (1): the CTs are "large".
    assert max(sizes[3:5]) < min(sizes[:3] + sizes[5:])
    monkeypatch.setattr(jmix_builder, "INLINE_MAX", max(sizes[3:5]))
    monkeypatch.setattr(jmix_builder, "INLINE_TURN", max(sizes[3:5]))
    where = []
    add = PackageBuilder.add
    monkeypatch.setattr(PackageBuilder, "add", lambda self, *a: (where.append(reactor.pool.in_pool), add(self, *a))[1])
    turns = []  # the reactor's later turns, run by hand

    def defer_later(clock, delay, f, *args):
        assert (clock, delay) == (reactor, 0)
        d = defer.Deferred()
        turns.append(lambda: d.callback(f(*args)))
        return d

    monkeypatch.setattr(jmix_builder, "task", types.SimpleNamespace(deferLater=defer_later))
    instances, answer = stream_answer(mw, leader, defer.succeed((0, None)))
    reactor.drain()  # the staging area, the builder
    for item in items:
        instances.write(item)
    instances.finish()
    reactor.pool.run()  # the first CT; the two others go together
    reactor.pool.run()
    assert where == [True] * 3 and len(turns) == 1
    turns.pop(0)()  # the first MR, alone (a turn's worth)
    assert where == [True] * 3 + [False]
    assert len(disposed) == 4 and len(turns) == 1
    turns.pop(0)()
    assert where == [True] * 3 + [False] * 2
    assert not turns
    reactor.drain()
    assert where == [True] * 3 + [False] * 2 + [True]
    assert len(disposed) == len(made)
    assert sum(name.endswith(".dcm") for name in zip_names(fired(answer))) == len(made)


def test_instances_are_added_in_the_reactor_only_when_their_uids_are_known(setup):
    """
    An instance in memory without the UIDs the retrieve read (its header is
    to be walked, or parsed by pydicom) is added in the thread pool.
    """
    mw, root, study, made, tmp_path = setup
    items, _ = retrieved(tmp_path, made[:1])
    item = items[0]
    item.data, item.path = read_bytes(item.path), None
    assert not jmix_builder._inline(item)
    item.uids = (study, made[0][0], made[0][1])
    assert jmix_builder._inline(item)
    item.data = bytes(jmix_builder.INLINE_MAX + 1)
    assert not jmix_builder._inline(item)


def test_a_cancelled_queue_stops_its_batch_after_the_current_instance():
    """
    The queue itself, with a thread pool stand-in that ends each batch when
    told: the first instance goes alone, the three that arrive meanwhile
    together; a cancel mid-batch asks the thread to stop, and what it did
    not add is disposed of when the batch ends.
    """
    disposed, added, batches = [], [], []

    def instance(n):
        return DicomInstance("1.2", "1.2.%d" % n, "1.2.840.10008.1.2.1", b"x%d" % n,
                             dispose=lambda: disposed.append(n))

    def add(items, done, stopped, inline):
        assert not inline
        batches.append((items, done, stopped, defer.Deferred()))
        return batches[-1][3]

    queue = jmix_builder._InstanceQueue(add, added.append, lambda: None)
    for n in range(4):
        queue.put(instance(n))
    items, done, stopped, ended = batches[0]
    assert items == [(b"x0", None)]
    done(0, 100)
    assert (added, disposed, len(queue)) == ([100], [0], 3)
    ended.callback(None)
    items, done, stopped, ended = batches[1]
    assert items == [(b"x1", None), (b"x2", None), (b"x3", None)]
    done(0, 200)
    assert (disposed, len(queue)) == ([0, 1], 2)
    waited = queue.wait(0)
    assert not stopped()
    queue.cancel()
    assert stopped()  # the thread adds no more of this batch
    assert not waited.called
    ended.callback(None)
    assert waited.called
    assert (added, sorted(disposed), len(queue), queue.added) == ([100, 200], [0, 1, 2, 3], 0, 2)
    assert queue.failure.check(defer.CancelledError)
    assert len(batches) == 2


def test_study_missing_on_the_pacs_is_404_for_everyone(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    empty = DicomResult(status=None, instances=Stream.from_iterable([]), done=defer.succeed((0xC000, None)))
    with pytest.raises(NotFound):
        fired(mw.response(leader, ResponseEnvelope(dicom=empty)))
    with pytest.raises(NotFound):
        fired(waiting)
    assert listed(root) == sorted([".locks", ".staging"])


def test_pacs_error_reaches_the_waiters(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    assert mw.response(leader, error) is None  # the leader's own answer is the 502
    with pytest.raises(UpstreamUnavailable):
        fired(waiting)
    # Nothing stuck: the next request builds again.
    again = envelope(root, study)
    assert fired(mw.request(again)) is None
    assert again.dicom is not None


def test_an_abandoned_build_releases_its_waiters(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    del leader  # its pipeline was cancelled: the response hook never runs
    gc.collect()
    with pytest.raises(UpstreamUnavailable):
        fired(waiting)


def test_other_requests_pass(setup):
    mw = setup[0]
    env = RequestEnvelope(details=RequestDetails(method="GET", path="x"))
    assert mw.request(env) is None
    assert mw.response(env, ResponseEnvelope(status=200)) is None
