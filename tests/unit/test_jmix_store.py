"""
Tests for L{harmony.jmix.store}: the JMIX package store (real files and a
real sqlite index in a temporary directory; no global reactor: a
C{task.Clock} with C{callFromThread} and a synchronous fake thread pool
drive C{deferToThreadPool}, plus one test each with real thread pools).
"""

import fcntl
import os
import queue
import shutil
import sqlite3
import subprocess
import sys
import textwrap
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
from harmony.jmix import store as store_module
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


def place(store, package_id=None, size=100, content=b"zip", legacy=False):
    """
    Put a package's zip in the store (as the builder or an upload does);
    with C{legacy}, also the unpacked directory earlier versions kept next
    to it.  Returns its id.
    """
    package_id = package_id or new_id()
    if legacy:
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


def add(store, study="1.2.3", size=100, package_id=None, legacy=False):
    package_id = place(store, package_id, legacy=legacy)
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
    assert result_of(store.get(new_id())) is None
    # The zip is the package: nothing else is written or needed.
    assert sorted(os.listdir(store.root)) == sorted([package_id + ".zip", ".locks"] + [
        name for name in os.listdir(store.root) if name.startswith("index.sqlite3")
    ])


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


def test_missing_zip_is_not_served_and_row_removed(store, reactor):
    older = add(store)
    reactor.advance(5)
    newer = add(store, legacy=True)
    os.unlink(store.zip_for(newer))
    # The newest intact package is served instead; what is left of the
    # other goes with its row.
    assert result_of(store.newest_for_study("1.2.3")).id == older
    assert result_of(store.get(newer)) is None
    assert not os.path.exists(store.dir_for(newer))
    assert result_of(store.exists(newer)) is False
    assert [r.id for r in result_of(store.list_for_study("1.2.3"))] == [older]


def test_a_legacy_directory_is_not_needed_and_goes_with_its_package(store):
    """
    Earlier versions kept an unpacked copy next to the zip: a package
    whose copy is gone is still served, and one with a copy loses it when
    removed.
    """
    without = add(store, legacy=True)
    shutil.rmtree(store.dir_for(without))
    assert result_of(store.get(without)).zip_path == store.zip_for(without)
    with_copy = add(store, legacy=True)
    assert result_of(store.get(with_copy)) is not None
    assert result_of(store.remove(with_copy)) is True
    assert not os.path.exists(store.dir_for(with_copy)) and not os.path.exists(store.zip_for(with_copy))


def test_exists(store):
    indexed = add(store)
    assert result_of(store.exists(indexed)) is True
    # A directory alone (an earlier version's unpacked copy, or an orphan).
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
    package_id = add(store, legacy=True)
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
    old = add(store, legacy=True)
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
    # A directory without a row (an earlier version's crashed build) and a
    # zip without a row ...
    crashed = new_id()
    os.makedirs(os.path.join(store.dir_for(crashed), "payload", "dicom"))
    lone_zip = new_id()
    open(store.zip_for(lone_zip), "wb").close()
    # ... a work area in use (locked: never touched) and one a crashed
    # process left (unlocked) ...
    in_use = store.open_work_area("staging")
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
    assert os.path.isdir(in_use.path)
    assert not os.path.exists(os.path.join(store.root, ".staging", "x"))
    assert os.path.exists(store.index_path)
    in_use.remove()
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
    A package directory (as earlier versions wrote them) whose top may be
    old while files still arrive in payload/dicom: not an orphan yet.
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


# -- several processes ---------------------------------------------------------
#
# flock locks belong to an open file description: two open()s conflict even
# in one process, so two stores on one directory in this process behave as
# two worker processes do (checked first).  Then real second processes.


STUDY = "1.2.840.99.1"


def test_flock_of_two_opens_conflict_in_one_process(tmp_path):
    path = str(tmp_path / "x.lock")
    first = store_module.try_lock(path)
    assert first is not None
    assert store_module.try_lock(path) is None
    other = os.open(path, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    store_module.release(first, path)
    assert not os.path.exists(path)
    again = store_module.try_lock(path)
    assert again is not None
    store_module.release(again, path)


def test_try_lock_skips_a_lock_file_removed_meanwhile(tmp_path, monkeypatch):
    """
    A lock taken on a file its last holder removed (and another process
    re-created and locked) is not held: try_lock checks the file at the path.
    """
    path = str(tmp_path / "x.lock")
    stale = os.open(path, os.O_RDWR | os.O_CREAT)  # opened, then removed by its holder
    os.unlink(path)
    holder = store_module.try_lock(path)  # a new file at the path, locked
    real_open = os.open
    opened = []

    def open_stale_first(p, flags, mode=0o777):
        if not opened:
            opened.append(p)
            return os.dup(stale)
        return real_open(p, flags, mode)

    monkeypatch.setattr(store_module.os, "open", open_stale_first)
    # The stale file's lock is free, but it is not the file at the path.
    assert store_module.try_lock(path) is None
    store_module.release(holder, path)
    fd = store_module.try_lock(path)
    assert fd is not None
    store_module.release(fd, path)
    os.close(stale)


def two_stores(tmp_path):
    """
    Two stores on one directory, each with its own clock (two workers).
    """
    a = make_store(tmp_path, reactor=FakeReactor())
    b = make_store(tmp_path, reactor=FakeReactor())
    return a, b


def building(store, study=STUDY):
    """
    A build on C{store} that the test ends: C{(waiter, calls, finish)};
    C{finish()} adds a package and answers with its record,
    C{finish(error)} fails.
    """
    calls = []
    done = defer.Deferred()

    def build():
        calls.append(1)
        return done

    waiter = store.build_once(study, build)

    def finish(error=None):
        if error is not None:
            done.errback(error)
            return None
        package_id = place(store)
        record = result_of(store.add(info(package_id, study=study)))
        done.callback(record)
        return record

    return waiter, calls, finish


def test_build_once_across_stores_one_build_same_package(tmp_path):
    a, b = two_stores(tmp_path)
    a_waiter, a_calls, a_finish = building(a)
    assert a_calls == [1]
    lock = a.lock_for(STUDY)
    # Named by a hash: no UID in a path.
    assert os.path.dirname(lock) == os.path.join(a.root, ".locks")
    assert STUDY not in lock and len(os.path.basename(lock)) == 32 + len(".lock")
    assert os.path.exists(lock)
    b_waiter, b_calls, _ = building(b)
    b_joined = b.build_once(STUDY, lambda: pytest.fail("a second build in b"))
    # b waits for a's lock, trying it again and again, and never builds.
    for _ in range(5):
        b._reactor.advance(store_module.BUILD_POLL_SECS)
    assert b_calls == [] and not has_fired(b_waiter) and not has_fired(b_joined)
    assert len(b._reactor.getDelayedCalls()) == 1
    record = a_finish()
    assert result_of(a_waiter) == record
    assert not os.path.exists(lock)  # released and removed
    b._reactor.advance(store_module.BUILD_POLL_SECS)
    got = result_of(b_waiter)
    assert isinstance(got, PackageRecord)
    assert (got.id, got.zip_path, got.study_uid) == (record.id, record.zip_path, STUDY)
    assert result_of(b_joined) == got
    assert b_calls == [] and not b._reactor.getDelayedCalls()
    assert not os.path.exists(lock)


def test_build_once_across_stores_failure_then_the_other_builds(tmp_path):
    a, b = two_stores(tmp_path)
    a_waiter, _, a_finish = building(a)
    b_waiter, b_calls, b_finish = building(b)
    b._reactor.advance(store_module.BUILD_POLL_SECS)
    assert b_calls == []
    a_finish(Conflict("the PACS failed"))
    failure_of(a_waiter, Conflict)
    b._reactor.advance(store_module.BUILD_POLL_SECS)
    # Nothing appeared: b builds, holding the lock now.
    assert b_calls == [1]
    assert store_module.try_lock(b.lock_for(STUDY)) is None
    # Meanwhile a's next caller waits for b's build.
    a_again, a_calls, _ = building(a)
    a._reactor.advance(store_module.BUILD_POLL_SECS)
    assert a_calls == [] and not has_fired(a_again)
    record = b_finish()
    assert result_of(b_waiter) == record
    a._reactor.advance(store_module.BUILD_POLL_SECS)
    assert result_of(a_again).id == record.id
    assert a_calls == []


def test_build_once_answers_a_package_that_is_there(tmp_path):
    """
    With the lock taken, a package of the study already in the index (added
    by another worker since the caller looked) is the answer: no build.
    """
    a, b = two_stores(tmp_path)
    package_id = add(a, study=STUDY)
    got = result_of(b.build_once(STUDY, lambda: pytest.fail("built again")))
    assert got.id == package_id
    assert not os.path.exists(b.lock_for(STUDY))


def test_build_once_lock_released_on_every_end(store):
    lock = store.lock_for(STUDY)
    for end in ("value", "failure", "raise", "cancelled waiter"):
        done = defer.Deferred()

        def build():
            if end == "raise":
                raise ValueError("no")
            return done

        waiter = store.build_once(STUDY, build)
        if end == "raise":
            failure_of(waiter, ValueError)
        else:
            assert store_module.try_lock(lock) is None  # held while it builds
            if end == "cancelled waiter":
                waiter.cancel()
                failure_of(waiter, defer.CancelledError)
                # The build goes on, holding the lock, with nobody waiting.
                assert store_module.try_lock(lock) is None
            if end == "failure":
                done.errback(ValueError("no"))
                failure_of(waiter, ValueError)
            else:
                done.callback("ok")
                if end == "value":
                    assert result_of(waiter) == "ok"
        fd = store_module.try_lock(lock)
        assert fd is not None, end
        store_module.release(fd, lock)
        assert not store._building


def test_cancelling_every_waiter_stops_waiting_for_another_process(tmp_path):
    a, b = two_stores(tmp_path)
    a_waiter, _, a_finish = building(a)
    first = b.build_once(STUDY, lambda: pytest.fail("b built"))
    second = b.build_once(STUDY, lambda: pytest.fail("b built"))
    b._reactor.advance(store_module.BUILD_POLL_SECS)
    first.cancel()
    assert b._reactor.getDelayedCalls()  # the second still waits
    second.cancel()
    failure_of(first, defer.CancelledError)
    failure_of(second, defer.CancelledError)
    assert not b._reactor.getDelayedCalls() and not b._building
    # a's failure does not make b build: nobody there waits any more.
    a_finish(Conflict("failed"))
    failure_of(a_waiter, Conflict)
    b._reactor.advance(10)
    fd = store_module.try_lock(a.lock_for(STUDY))
    assert fd is not None
    store_module.release(fd, a.lock_for(STUDY))


class ManualPool:
    """
    A thread pool whose jobs run when the test says (L{run_next}).
    """

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append((on_result, f, args, kwargs))

    def run_next(self):
        on_result, f, args, kwargs = self.jobs.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            on_result(False, Failure())
        else:
            on_result(True, result)


def test_cancelled_before_the_lock_try_ran_releases_it(tmp_path):
    pool = ManualPool()
    store = PackageStore(tmp_path / "jmix", reactor=FakeReactor(), threadpool=pool)
    started = store.start()
    pool.run_next()
    result_of(started)
    waiter = store.build_once(STUDY, lambda: pytest.fail("built for nobody"))
    assert len(pool.jobs) == 1  # the try of the lock is queued
    waiter.cancel()
    failure_of(waiter, defer.CancelledError)
    pool.run_next()  # takes the lock; nobody waits: released at once
    fd = store_module.try_lock(store.lock_for(STUDY))
    assert fd is not None
    store_module.release(fd, store.lock_for(STUDY))
    # A new caller after that builds normally.
    again = store.build_once(STUDY, lambda: "built")
    pool.run_next()
    assert result_of(again) == "built"


def test_build_once_needs_a_started_store(tmp_path, reactor):
    store = PackageStore(tmp_path / "jmix", reactor=reactor, threadpool=FakeThreadPool())
    failure_of(store.build_once(STUDY, lambda: pytest.fail("built")), RuntimeError)
    assert not store._building


def test_index_written_by_one_store_is_seen_by_the_other(tmp_path):
    a, b = two_stores(tmp_path)
    first = add(a, study=STUDY)
    assert result_of(b.newest_for_study(STUDY)).id == first
    second = add(b, study=STUDY)
    assert [r.id for r in result_of(a.list_for_study(STUDY))] == [second, first]
    assert result_of(a.remove(second)) is True
    assert result_of(b.get(second)) is None


def test_a_write_waits_for_another_writer(store):
    """
    SQLITE_BUSY: an add waits (the busy timeout) while another connection
    (another worker) holds the write lock, then succeeds.
    """
    other = sqlite3.connect(store.index_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO packages (id, study_uid, created, size) VALUES ('x', 'y', 0, 0)")
    timer = threading.Timer(0.3, other.execute, ("COMMIT",))
    timer.start()
    try:
        begun = time.monotonic()
        package_id = add(store, study=STUDY)  # the fake pool runs it here: it waits
        assert time.monotonic() - begun >= 0.25
    finally:
        timer.join()
        other.close()
    assert result_of(store.get(package_id)).id == package_id


def test_work_area_locked_while_in_use(tmp_path):
    a, b = two_stores(tmp_path)
    area = a.open_work_area("upload")
    assert os.path.dirname(area.path) == os.path.join(a.root, ".upload")
    assert os.path.isdir(area.path) and os.path.exists(area.path + ".lock")
    # The other worker's clean-up (start, prune) leaves it alone ...
    result_of(b.prune())
    result_of(b.stop())
    result_of(b.start())
    assert os.path.isdir(area.path)
    # ... until it is done.
    area.remove()
    area.remove()  # idempotent
    assert os.listdir(os.path.join(a.root, ".upload")) == []
    with pytest.raises(KeyError):
        a.open_work_area("elsewhere")


def test_leftover_build_locks_are_removed_held_ones_kept(tmp_path):
    a, b = two_stores(tmp_path)
    leftover = a.lock_for("1.2.3.4")
    open(leftover, "w").close()  # a crashed build's lock file (unlocked)
    waiter, _, finish = building(a)
    result_of(b.prune())
    assert not os.path.exists(leftover)
    assert os.path.exists(a.lock_for(STUDY))
    finish()
    result_of(waiter)


# -- real second processes -----------------------------------------------------

_CHILD_PRELUDE = """
import os, sys
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from harmony.jmix import store as store_module

class Reactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

class Pool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

def say(text):
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()
"""


def child(code, *args):
    """
    A second Python process running C{code} (after L{_CHILD_PRELUDE});
    it reads its arguments from C{sys.argv} and talks over stdin/stdout.
    """
    source = _CHILD_PRELUDE + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", source, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def expect(proc, wanted):
    line = proc.stdout.readline().strip()
    assert line.startswith(wanted), line
    return line[len(wanted):].strip()


def test_another_process_builds_this_one_waits_and_gets_its_package(tmp_path):
    store = make_store(tmp_path)
    proc = child(
        """
        root, study = sys.argv[1], sys.argv[2]
        store = store_module.PackageStore(root, reactor=Reactor(), threadpool=Pool())
        store.start()

        def build():
            say("building")
            sys.stdin.readline()  # the test says when
            package_id = "0b0b0b0b-0000-4000-8000-000000000001"
            with open(store.zip_for(package_id), "wb") as f:
                f.write(b"zip")

            class Info:
                id, study_uid, size, payload_hash = package_id, study, 3, None

            return store.add(Info()).addCallback(lambda _: store.get(package_id))

        out = []
        store.build_once(study, build).addBoth(out.append)
        say("built " + out[0].id)
        """,
        store.root, STUDY,
    )
    try:
        expect(proc, "building")
        waiter = store.build_once(STUDY, lambda: pytest.fail("built in both processes"))
        store._reactor.advance(store_module.BUILD_POLL_SECS)
        assert not has_fired(waiter)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        package_id = expect(proc, "built")
        assert proc.wait(timeout=30) == 0
        store._reactor.advance(store_module.BUILD_POLL_SECS)
        got = result_of(waiter)
        assert got.id == package_id and os.path.isfile(got.zip_path)
    finally:
        proc.kill()
        proc.wait()


def test_a_process_dying_mid_build_lets_this_one_build(tmp_path):
    store = make_store(tmp_path)
    proc = child(
        """
        fd = store_module.try_lock(sys.argv[1])
        say("locked" if fd is not None else "busy")
        sys.stdin.readline()  # killed meanwhile
        """,
        store.lock_for(STUDY),
    )
    try:
        expect(proc, "locked")
        calls = []
        waiter = store.build_once(STUDY, lambda: calls.append(1) or "built here")
        store._reactor.advance(store_module.BUILD_POLL_SECS)
        assert not calls and not has_fired(waiter)
    finally:
        proc.kill()
        proc.wait()
    # The kernel released the dead process's lock; no package appeared.
    store._reactor.advance(store_module.BUILD_POLL_SECS)
    assert result_of(waiter) == "built here"
    assert calls == [1]


def test_work_area_of_a_live_process_is_kept_a_dead_ones_removed(tmp_path):
    store = make_store(tmp_path)
    proc = child(
        """
        area = store_module.PackageStore(sys.argv[1]).open_work_area("staging")
        with open(os.path.join(area.path, "0.dcm"), "wb") as f:
            f.write(b"instance")
        say("area " + area.path)
        sys.stdin.readline()
        """,
        store.root,
    )
    try:
        path = expect(proc, "area")
        result_of(store.prune())
        result_of(store.stop())
        result_of(store.start())
        assert os.path.isfile(os.path.join(path, "0.dcm"))
    finally:
        proc.kill()
        proc.wait()
    result_of(store.prune())
    assert not os.path.exists(path) and os.listdir(os.path.join(store.root, ".staging")) == []


def test_processes_adding_at_once_share_one_index(tmp_path):
    """
    Four processes open a new store directory together and add packages at
    once: the WAL index takes every row (writers wait for each other).
    """
    root = str(tmp_path / "jmix")
    code = """
        import uuid
        root, n = sys.argv[1], int(sys.argv[2])
        store = store_module.PackageStore(root, reactor=Reactor(), threadpool=Pool())
        sys.stdin.readline()  # all start together
        out = []
        store.start().addBoth(out.append)
        assert out[0] is None, out[0]

        class Info:
            study_uid, size, payload_hash = "1.2.3", 3, None

        for _ in range(n):
            Info.id = str(uuid.uuid4())
            with open(store.zip_for(Info.id), "wb") as f:
                f.write(b"zip")
            store.add(Info()).addBoth(out.append)
            assert not isinstance(out[-1], Failure), out[-1]
        say("added")
        """
    procs = [child(code, root, 10) for _ in range(4)]
    try:
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            expect(proc, "added")
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    store = make_store(tmp_path)
    assert len(result_of(store.list_for_study("1.2.3"))) == 40


def test_opening_waits_while_another_process_opens_the_index(tmp_path, reactor):
    """
    Workers starting together on a new directory take turns to open the
    index (switching it to WAL does not wait for sqlite's busy timeout:
    "database is locked" at once, seen with 8 processes): a process
    holding the index lock delays this one's opening until it lets go.
    """
    root = tmp_path / "jmix"
    (root / ".locks").mkdir(parents=True)
    proc = child(
        """
        import fcntl, time
        f = open(sys.argv[1], "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        say("locked")
        time.sleep(0.5)
        """,
        root / ".locks" / store_module.INDEX_LOCK,
    )
    try:
        expect(proc, "locked")
        store = PackageStore(root, reactor=reactor, threadpool=FakeThreadPool())
        started = time.monotonic()
        result_of(store.start())
        assert time.monotonic() - started >= 0.3
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    add(store, study=STUDY)
    assert len(result_of(store.list_for_study(STUDY))) == 1
    conn = sqlite3.connect(store.index_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    # The clean-up of unused build locks leaves it alone.
    result_of(store.prune())
    assert (root / ".locks" / store_module.INDEX_LOCK).exists()
