"""
Tests for L{harmony.jmix.store}: the JMIX package store (real files and a
real sqlite index in a temporary directory; no global reactor: a
C{task.Clock} with C{callFromThread} and a synchronous fake thread pool
drive C{deferToThreadPool}, plus one test each with real thread pools).
"""

import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from _deferreds import failure_of, has_fired, result_of
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from _fakes import FakeThreadPool
from harmony.errors import Conflict
from harmony.jmix.store import INDEX_NAME, PackageRecord, PackageStore, check_id

# -- fakes -------------------------------------------------------------------


class FakeReactor(Clock):
    """
    A C{task.Clock} with C{callFromThread} running the call at once (what
    C{deferToThreadPool} needs), and system event triggers recorded.
    """

    def __init__(self):
        super().__init__()
        self.triggers = {}

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        handle = object()
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle):
        del self.triggers[handle]


def new_id():
    return str(uuid.uuid4())


def place(store, package_id=None, size=100, content=b"zip"):
    """
    Put a package's directory and zip in the store (as the builder or an
    upload does); its info for L{PackageStore.add}.
    """
    package_id = package_id or new_id()
    directory = store.dir_for(package_id)
    os.makedirs(os.path.join(directory, "payload", "dicom"))
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        f.write("{}")
    with open(store.zip_for(package_id), "wb") as f:
        f.write(content)
    return package_id


def info(package_id, study="1.2.3", size=100, payload_hash="sha256:00"):
    return SimpleNamespace(id=package_id, study_uid=study, size=size, payload_hash=payload_hash)


def make_store(tmp_path, pool=None, reactor=None, **kwargs):
    reactor = reactor or FakeReactor()
    store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=pool or FakeThreadPool(), **kwargs)
    result_of(store.start())
    return store


def add(store, study="1.2.3", size=100, package_id=None):
    package_id = place(store, package_id)
    result_of(store.add(info(package_id, study=study, size=size)))
    return package_id


def later(store, seconds):
    """
    Make the store's wall clock (that orphans' file times are compared
    with) run C{seconds} ahead: file times cannot be set back, since
    C{utime} updates the change time.
    """
    store._wall_time = lambda: time.time() + seconds


@pytest.fixture
def reactor():
    return FakeReactor()


@pytest.fixture
def store(tmp_path, reactor):
    return make_store(tmp_path, reactor=reactor)


# -- start / index -----------------------------------------------------------


def test_start_creates_root_and_wal_index(tmp_path, store):
    assert os.path.isdir(store.root)
    conn = sqlite3.connect(os.path.join(store.root, INDEX_NAME))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(packages)")]
        assert columns == ["id", "study_uid", "created", "size", "payload_hash"]
        indexes = {row[1]: row for row in conn.execute("PRAGMA index_list(packages)")}
        study_index = [name for name in indexes if "study" in name]
        assert study_index
        cols = [row[2] for row in conn.execute(f"PRAGMA index_info({study_index[0]})")]
        assert cols == ["study_uid", "created"]
    finally:
        conn.close()


def test_all_work_runs_in_the_pool(tmp_path, reactor, monkeypatch):
    pool = FakeThreadPool()
    store = make_store(tmp_path, pool=pool, reactor=reactor)
    calls = []
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        calls.append(pool.in_pool)
        return real_unlink(path, *args, **kwargs)

    package_id = add(store)
    monkeypatch.setattr(os, "unlink", unlink)
    assert result_of(store.remove(package_id)) is True
    assert calls and all(calls)


def test_nothing_runs_on_the_calling_thread(tmp_path, reactor):
    """
    With a pool that has not run anything yet, no call has touched the
    disk: the root is not even created.
    """
    pool = FakeThreadPool(immediate=False)
    store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=pool)
    d = store.start()
    assert not has_fired(d)
    assert not os.path.exists(store.root)
    pool.run()
    assert result_of(d) is None
    assert os.path.isdir(store.root)


def test_jobs_are_serialized_one_at_a_time(tmp_path, reactor):
    pool = FakeThreadPool(immediate=False)
    store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=pool)
    started = store.start()
    first = store.exists(new_id())
    second = store.list_for_study("1.2")
    # One job handed to the pool; the others wait in the store's queue.
    assert pool.submitted == 1
    pool.run()
    assert has_fired(started) and pool.submitted == 2
    pool.run()
    pool.run()
    assert result_of(first) is False
    assert result_of(second) == []
    assert pool.submitted == 3


def test_not_started(tmp_path, reactor):
    store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=FakeThreadPool())
    failure_of(store.get(new_id()), RuntimeError)
    assert result_of(store.stop()) is None


# -- ids and paths -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "../etc",
        "..",
        "",
        "abc",
        "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",  # upper case
        "0f1e2d3c4b5a697887 96a5b4c3d2e1f0",
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/../x",
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n",
        "/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        None,
    ],
)
def test_invalid_ids_rejected(store, bad):
    with pytest.raises(ValueError):
        store.dir_for(bad)
    with pytest.raises(ValueError):
        store.zip_for(bad)
    with pytest.raises(ValueError):
        check_id(bad)
    failure_of(store.get(bad), ValueError)
    failure_of(store.exists(bad), ValueError)
    failure_of(store.remove(bad), ValueError)
    failure_of(store.add(info(bad)), ValueError)


def test_paths(store):
    package_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert store.dir_for(package_id) == os.path.join(store.root, package_id)
    assert store.zip_for(package_id) == os.path.join(store.root, package_id + ".zip")


# -- add / get / newest / list -----------------------------------------------


def test_add_and_get(store, reactor):
    reactor.advance(1000)
    package_id = place(store)
    record = result_of(store.add(info(package_id, study="1.2.3", size=1234, payload_hash="sha256:ab")))
    assert isinstance(record, PackageRecord)
    got = result_of(store.get(package_id))
    assert got == record
    assert got.id == package_id
    assert got.study_uid == "1.2.3"
    assert got.created == 1000
    assert got.size == 1234
    assert got.payload_hash == "sha256:ab"
    assert got.zip_path == store.zip_for(package_id)
    assert got.directory == store.dir_for(package_id)
    assert result_of(store.get(new_id())) is None


def test_add_without_files_fails(store):
    failure_of(store.add(info(new_id())), FileNotFoundError)


def test_add_twice_conflicts(store):
    package_id = add(store)
    failure_of(store.add(info(package_id)), Conflict)


def test_newest_and_list_order_by_created_not_key(store, reactor):
    ids = [
        "ffffffff-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-000000000000",
        "88888888-0000-4000-8000-000000000000",
    ]
    for package_id in ids:
        reactor.advance(10)
        add(store, package_id=package_id)
    other = add(store, study="9.9")
    newest = result_of(store.newest_for_study("1.2.3"))
    assert newest.id == ids[-1]
    records = result_of(store.list_for_study("1.2.3"))
    assert [r.id for r in records] == list(reversed(ids))
    assert [r.created for r in records] == [30, 20, 10]
    assert [r.id for r in result_of(store.list_for_study("9.9"))] == [other]
    assert result_of(store.newest_for_study("4.5.6")) is None
    assert result_of(store.list_for_study("4.5.6")) == []


def test_same_created_time_newest_is_added_last(store):
    first = add(store)
    second = add(store)
    assert result_of(store.newest_for_study("1.2.3")).id == second
    assert [r.id for r in result_of(store.list_for_study("1.2.3"))] == [second, first]


def test_missing_zip_is_not_served_and_row_removed(store):
    package_id = add(store)
    os.unlink(store.zip_for(package_id))
    assert result_of(store.get(package_id)) is None
    assert not os.path.exists(store.dir_for(package_id))
    assert result_of(store.exists(package_id)) is False


def test_missing_directory_is_not_served(store, reactor):
    older = add(store)
    reactor.advance(5)
    newer = add(store)
    shutil.rmtree(store.dir_for(newer))
    # The newest intact package is served instead.
    assert result_of(store.newest_for_study("1.2.3")).id == older
    assert result_of(store.get(newer)) is None
    assert not os.path.exists(store.zip_for(newer))
    assert [r.id for r in result_of(store.list_for_study("1.2.3"))] == [older]


def test_exists(store):
    indexed = add(store)
    assert result_of(store.exists(indexed)) is True
    # A directory alone (an upload or build in progress, or an orphan).
    being_written = new_id()
    os.makedirs(store.dir_for(being_written))
    assert result_of(store.exists(being_written)) is True
    assert result_of(store.get(being_written)) is None
    zip_only = new_id()
    open(store.zip_for(zip_only), "wb").close()
    assert result_of(store.exists(zip_only)) is True
    assert result_of(store.get(zip_only)) is None
    assert result_of(store.exists(new_id())) is False


def test_remove(store):
    package_id = add(store)
    assert result_of(store.remove(package_id)) is True
    assert not os.path.exists(store.zip_for(package_id))
    assert not os.path.exists(store.dir_for(package_id))
    assert result_of(store.get(package_id)) is None
    assert result_of(store.remove(package_id)) is False


def test_persists_across_stop_and_start(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor)
    reactor.advance(42)
    package_id = add(store, size=7)
    assert result_of(store.stop()) is None
    failure_of(store.get(package_id), RuntimeError)
    # The same store started again ...
    result_of(store.start())
    assert result_of(store.get(package_id)).created == 42
    result_of(store.stop())
    # ... and a new one on the same directory.
    again = make_store(tmp_path, reactor=reactor)
    record = result_of(again.get(package_id))
    assert (record.id, record.size, record.created) == (package_id, 7, 42)
    assert result_of(again.newest_for_study("1.2.3")).id == package_id
    result_of(again.stop())


def test_start_twice_refused(store):
    with pytest.raises(RuntimeError):
        store.start()


# -- build_once --------------------------------------------------------------


def test_build_once_concurrent_callers_share_one_build(store):
    builds = []

    def build():
        builds.append(defer.Deferred())
        return builds[-1]

    waiters = [store.build_once("1.2.3", build) for _ in range(3)]
    assert len(builds) == 1
    assert not any(has_fired(w) for w in waiters)
    # Another study builds on its own.
    other = store.build_once("4.5.6", build)
    assert len(builds) == 2
    result = object()
    builds[0].callback(result)
    assert [result_of(w) for w in waiters] == [result] * 3
    assert not has_fired(other)
    # Later: a new build.
    later = store.build_once("1.2.3", build)
    assert len(builds) == 3
    builds[2].callback("second")
    assert result_of(later) == "second"
    builds[1].callback("other")
    assert result_of(other) == "other"


def test_build_once_failure_shared(store):
    build_d = defer.Deferred()
    calls = []

    def build():
        calls.append(1)
        return build_d

    waiters = [store.build_once("1.2.3", build) for _ in range(3)]
    build_d.errback(Conflict("boom"))
    for w in waiters:
        assert failure_of(w, Conflict).value.message == "boom"
    assert calls == [1]
    # A failure is not remembered: the next call builds again.
    store.build_once("1.2.3", lambda: defer.succeed("ok"))
    assert result_of(store.build_once("1.2.3", lambda: defer.succeed("again"))) == "again"


def test_build_once_cancel_one_waiter(store):
    cancelled = []
    build_d = defer.Deferred(lambda d: cancelled.append(True))
    first = store.build_once("1.2.3", lambda: build_d)
    second = store.build_once("1.2.3", lambda: pytest.fail("second build"))
    first.cancel()
    failure_of(first, defer.CancelledError)
    assert not cancelled and not build_d.called
    build_d.callback("done")
    assert result_of(second) == "done"


def test_build_once_all_waiters_cancelled_build_goes_on(store):
    build_d = defer.Deferred()
    only = store.build_once("1.2.3", lambda: build_d)
    only.cancel()
    failure_of(only, defer.CancelledError)
    assert not build_d.called
    # A caller during the build still joins it.
    late = store.build_once("1.2.3", lambda: pytest.fail("second build"))
    build_d.callback("done")
    assert result_of(late) == "done"


def test_build_once_synchronous_build_and_raise(store):
    assert result_of(store.build_once("1.2.3", lambda: "plain value")) == "plain value"

    def broken():
        raise ValueError("no")

    failure_of(store.build_once("1.2.3", broken), ValueError)
    assert result_of(store.build_once("1.2.3", lambda: defer.succeed(3))) == 3


# -- retention and crash clean-up --------------------------------------------


def test_prune_by_ttl(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor, ttl_secs=100)
    old = add(store)
    reactor.advance(60)
    young = add(store)
    assert result_of(store.prune()) == []
    reactor.advance(50)  # old is 110 s old, young 50 s
    assert result_of(store.prune()) == [old]
    assert result_of(store.get(old)) is None
    assert not os.path.exists(store.dir_for(old)) and not os.path.exists(store.zip_for(old))
    assert result_of(store.get(young)) is not None


def test_prune_runs_after_add(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor, ttl_secs=100)
    old = add(store)
    reactor.advance(101)
    add(store)
    assert result_of(store.exists(old)) is False


def test_prune_by_size_removes_oldest(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor, max_bytes=250)
    ids = []
    for _ in range(3):
        reactor.advance(1)
        ids.append(add(store, size=100))
    # 300 > 250 after the third add: the oldest went.
    assert result_of(store.get(ids[0])) is None
    assert [r.id for r in result_of(store.list_for_study("1.2.3"))] == [ids[2], ids[1]]
    reactor.advance(1)
    big = add(store, size=200)
    # 400: the two oldest go (200 <= 250).
    assert [r.id for r in result_of(store.list_for_study("1.2.3"))] == [big]
    assert result_of(store.prune()) == []


def test_size_cap_keeps_the_last_package(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor, max_bytes=10)
    package_id = add(store, size=1000)
    assert result_of(store.get(package_id)) is not None


def test_prune_cleans_old_orphans_and_spares_young_ones(store):
    kept = add(store)
    # A directory without a row (a crashed build) and a zip without its
    # directory or row ...
    crashed = new_id()
    os.makedirs(os.path.join(store.dir_for(crashed), "payload", "dicom"))
    lone_zip = new_id()
    open(store.zip_for(lone_zip), "wb").close()
    # ... other code's work areas, never touched ...
    os.makedirs(os.path.join(store.root, ".staging", "x"))
    # ... and a build under way, changed "just now" on the store's clock.
    later(store, 2 * 3600)
    in_progress = new_id()
    os.makedirs(os.path.join(store.dir_for(in_progress), "payload", "dicom"))
    now = time.time() + 2 * 3600
    os.utime(store.dir_for(in_progress), (now, now))
    assert result_of(store.get(crashed)) is None
    removed = result_of(store.prune())
    assert sorted(removed) == sorted([crashed, lone_zip])
    assert not os.path.exists(store.dir_for(crashed))
    assert not os.path.exists(store.zip_for(lone_zip))
    assert os.path.isdir(store.dir_for(in_progress))
    assert os.path.isdir(os.path.join(store.root, ".staging", "x"))
    assert os.path.exists(store.index_path)
    assert result_of(store.get(kept)) is not None


def test_young_orphans_are_left_alone(store):
    orphan = new_id()
    os.makedirs(store.dir_for(orphan))
    assert result_of(store.prune()) == []
    later(store, 3600 - 60)
    assert result_of(store.prune()) == []
    later(store, 3600 + 60)
    assert result_of(store.prune()) == [orphan]


def test_add_prunes_old_orphans(store):
    crashed = new_id()
    os.makedirs(store.dir_for(crashed))
    later(store, 2 * 3600)
    add(store)
    assert not os.path.exists(store.dir_for(crashed))


def test_orphan_age_is_its_newest_part(store):
    """
    A long build's top directory may be old while files still arrive in
    payload/dicom: not an orphan yet.
    """
    building = new_id()
    dicom = os.path.join(store.dir_for(building), "payload", "dicom")
    os.makedirs(dicom)
    later(store, 2 * 3600)
    now = time.time() + 2 * 3600
    os.utime(dicom, (now, now))
    assert result_of(store.prune()) == []
    assert os.path.isdir(dicom)


def test_package_moved_in_with_old_times_is_not_an_orphan(tmp_path, store):
    """
    An upload unpacked elsewhere with old (fixed) file times, renamed into
    the store and not added yet: its change time is the rename's.
    """
    unpacked = tmp_path / "unpacked"
    os.makedirs(unpacked / "payload" / "dicom")
    old = time.time() - 10 * 3600
    for path in (unpacked / "payload" / "dicom", unpacked / "payload", unpacked):
        os.utime(path, (old, old))
    package_id = new_id()
    os.replace(unpacked, store.dir_for(package_id))
    assert result_of(store.prune()) == []
    assert os.path.isdir(store.dir_for(package_id))


def test_prune_orphan_grace_zero(tmp_path, reactor):
    store = make_store(tmp_path, reactor=reactor, orphan_grace_secs=0)
    orphan = new_id()
    os.makedirs(store.dir_for(orphan))
    assert result_of(store.prune()) == [orphan]


def test_prune_removes_damaged_rows(store):
    package_id = add(store)
    os.unlink(store.zip_for(package_id))
    assert result_of(store.prune()) == [package_id]
    assert not os.path.exists(store.dir_for(package_id))
    conn = sqlite3.connect(store.index_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM packages").fetchone()[0] == 0
    finally:
        conn.close()


# -- real threads ------------------------------------------------------------


class QueueReactor(Clock):
    """
    Hands results from pool threads to the test thread (L{pump}).
    """

    def __init__(self):
        super().__init__()
        self.calls = queue.Queue()
        self.triggers = {}

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def pump_until(self, d, timeout=10):
        deadline = time.monotonic() + timeout
        while not has_fired(d):
            f, args, kwargs = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args, **kwargs)
        return result_of(d)

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        handle = object()
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle):
        del self.triggers[handle]


def test_own_single_thread_pool(tmp_path):
    reactor = QueueReactor()
    store = PackageStore(tmp_path / "jmix", reactor=reactor)
    reactor.pump_until(store.start())
    pool = store.threadpool
    assert pool.max == 1 and pool.started
    # Stopped with the reactor unless stopped first.
    assert [t[:2] for t in reactor.triggers.values()] == [("during", "shutdown")]
    package_id = place(store)
    reactor.pump_until(store.add(info(package_id)))
    assert reactor.pump_until(store.get(package_id)).id == package_id
    reactor.pump_until(store.stop())
    assert not pool.started and not reactor.triggers
    # Started again: a new pool, the same index.
    reactor.pump_until(store.start())
    assert store.threadpool is not pool
    assert reactor.pump_until(store.exists(package_id)) is True
    reactor.pump_until(store.stop())
    assert not store.threadpool.started


def test_shared_pool_jobs_never_overlap(tmp_path, monkeypatch):
    """
    A pool with many threads, passed in: the store's jobs still run one at
    a time (sqlite's connection is shared between threads only serially).
    """
    reactor = QueueReactor()
    pool = ThreadPool(minthreads=4, maxthreads=4)
    pool.start()
    try:
        store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=pool)
        reactor.pump_until(store.start())
        active = []
        overlaps = []
        lock = threading.Lock()
        real_exists = PackageStore._exists

        def exists(self, package_id):
            with lock:
                active.append(1)
                if len(active) > 1:
                    overlaps.append(1)
            time.sleep(0.005)
            try:
                return real_exists(self, package_id)
            finally:
                with lock:
                    active.pop()

        monkeypatch.setattr(PackageStore, "_exists", exists)
        ds = [store.exists(new_id()) for _ in range(20)]
        everything = defer.gatherResults(ds)
        assert reactor.pump_until(everything) == [False] * 20
        assert not overlaps
        reactor.pump_until(store.stop())
        assert pool.started  # not the store's to stop
        assert not reactor.triggers
    finally:
        pool.stop()
