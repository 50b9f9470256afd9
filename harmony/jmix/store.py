# -*- test-case-name: tests.unit.test_jmix_store -*-
"""
L{PackageStore}: where JMIX packages live and how they are found.

Layout under the root::

    <root>/index.sqlite3        the index (WAL mode; plus its -wal and -shm files)
    <root>/<id>.zip             a package (the zip is the package: it is served as it
                                is, and its manifest is read from it)
    <root>/<id>/                an unpacked package, as earlier versions kept next to
                                the zip: not needed, removed with its package
    <root>/.locks/<h>.lock      one study's build lock (h: the first 32 hex digits of the
                                SHA-256 of its Study Instance UID; no UID in a path)
    <root>/.locks/index.flock   held by a process while it opens the index
    <root>/.staging/<n>/        work areas (L{PackageStore.open_work_area}): a build's
    <root>/.upload/<n>/         zip being written, an upload being checked; each with <n>.lock
                                next to it, locked while the area is in use

An id is a canonical lower-case UUID (8-4-4-4-12 hex digits), checked by
every method that takes one, so no path outside the root can be named.

The index has one row per package: C{packages(id, study_uid, created, size,
payload_hash)}, with an index on C{(study_uid, created)}.  C{created} comes
from the injected clock (C{clock.seconds()}) when the package is added; the
newest package of a study is the one with the greatest C{created} (ties:
the one added last).  C{size} is the size the caller reports (the zip's).

A row is written only after the package's zip is in place (the caller
puts it there, then calls L{PackageStore.add}), and a package is removed
files first, row last.  So, after a crash:

  - a row whose zip is missing is a damaged package: it is not served
    (L{PackageStore.get} returns C{None}) and the row and whatever is left
    of its files are removed when it is looked up or pruned;
  - a zip (or a directory) without a row is an orphan (a build or upload
    interrupted between putting its zip in place and adding it): it is
    never served, and L{PackageStore.prune} removes it once it has not
    changed for C{orphan_grace_secs}, so that a package moved into place
    and not yet added is left alone.  Its age is measured from the newest
    change time (the later of C{st_mtime} and C{st_ctime}: a rename or
    C{utime} updates the change time, so a zip written elsewhere with old
    file times and moved in counts as new) of the zip and of a directory,
    its C{payload/} and C{payload/dicom/}, against the wall clock, since
    these are file system times.  (A zip being written is not in the root:
    builds write theirs in their staging area, uploads in theirs.)

Threading: sqlite connections and all file system work run off the reactor
thread, one job at a time, in the order asked: every job goes through a
serial queue kept on the reactor thread, which hands the next job to the
thread pool only when the previous one has finished.  By default the store
owns a C{ThreadPool} with one thread (made by L{PackageStore.start}, stopped
by L{PackageStore.stop} or at reactor shutdown); a thread pool passed in
(even a shared one with many threads) is used the same way, so jobs are
still serialized, though possibly on different threads: the connection is
opened with C{check_same_thread=False}, which sqlite allows when calls never
overlap, and the queue guarantees that.  Cancelling a returned Deferred
does not stop its job (a job half done by a cancel would leave files and
index out of step); the caller just stops waiting.  One exception: when a
build ends, its build lock is released at once on the reactor thread (an
C{unlink} and a C{close} of an empty file, which never wait), so that it is
released on every path, even after L{PackageStore.stop}.

Retention: L{PackageStore.prune} removes packages older than C{ttl_secs}
(when set), then, while the total size exceeds C{max_bytes} (when set), the
oldest -- but never the last package left, so that a package larger than
the cap can still be served once built.  It runs after every
L{PackageStore.add}.

One build per study: L{PackageStore.build_once} runs a build unless one for
the same study is running, in which case the caller waits for that one and
gets its result or its failure.  In a process, the store of a directory is
shared by its endpoint and middleware and the callers of one study share
one build.  Across processes (C{[proxy] workers}: every worker has its own
store on the same directory) the process that builds holds the study's
build lock (an exclusive C{flock} of C{.locks/<h>.lock}); another process
does not build but waits for that lock, then answers with the study's
newest package -- or, when none appeared (that build failed, or its process
died: the kernel releases a dead process's locks), builds itself.

Several processes: every file lock here is an C{flock}, which belongs to an
open file description (two C{open}s conflict even in one process) and is
released by the kernel when its process dies.  A lock file is removed only
by whoever holds its lock, and a lock is held only once its file is checked
to be still the one at its path, so removing lock files is safe.  The
sqlite index is shared through WAL mode; a write waits for another
process's write (the connection's busy timeout) and every transaction
starts with its write, so it never fails on a stale snapshot.  Nothing of
the index is cached in a process.  Work areas whose lock can be taken
(their process ended) are removed when the store starts and when it
prunes; those in use by any process are left alone.
"""

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections import deque

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from harmony.errors import Conflict

#: A package id: a canonical UUID in lower case.
PACKAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_ZIP_NAME = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.zip\Z")

INDEX_NAME = "index.sqlite3"
DIR_MODE = 0o750
#: Build locks, one file per study being built.
LOCKS_DIR = ".locks"
#: Under LOCKS_DIR: held while a process opens the index (never removed:
#: not a "*.lock" the clean-up of unused build locks looks at).
INDEX_LOCK = "index.flock"
#: Work areas: C{kind} -> directory (L{PackageStore.open_work_area}).
WORK_AREAS = {"staging": ".staging", "upload": ".upload"}
#: How often a process waiting for another process's build tries its lock.
BUILD_POLL_SECS = 0.2
#: How long a write waits for another connection's (another worker's).
BUSY_TIMEOUT_SECS = 30.0
#: Orphans (files without an index row) younger than this are left alone.
DEFAULT_ORPHAN_GRACE_SECS = 3600.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS packages ("
    " id TEXT PRIMARY KEY, study_uid TEXT, created REAL, size INTEGER, payload_hash TEXT)",
    "CREATE INDEX IF NOT EXISTS packages_study_created ON packages (study_uid, created)",
)
_COLUMNS = "id, study_uid, created, size, payload_hash"

log = Logger()


def check_id(package_id):
    """
    @return: C{package_id}, when it is a canonical lower-case UUID.
    @raise ValueError: it is not.
    """
    if not isinstance(package_id, str) or not PACKAGE_ID.match(package_id):
        raise ValueError("a package id is a lower-case UUID")
    return package_id


@dataclasses.dataclass(frozen=True)
class PackageRecord:
    """
    A stored package.

    @ivar id: the package id (a UUID).
    @ivar study_uid: the Study Instance UID it holds (C{None} if unknown).
    @ivar created: when it was added, in the store clock's seconds.
    @ivar size: its size in bytes as given to L{PackageStore.add} (the zip's).
    @ivar payload_hash: C{"sha256:<hex>"}, or C{None}.
    @ivar zip_path: the absolute path of C{<id>.zip}: the package.
    """

    id: str
    study_uid: object
    created: float
    size: int
    payload_hash: object
    zip_path: str


def try_lock(path):
    """
    Take the exclusive C{flock} of the lock file C{path} (created if
    missing) without waiting.

    Lock files may be removed by whoever holds their lock (L{release}):
    after taking the lock of a file that was removed meanwhile (perhaps
    re-created by another process), it tries again with the file now there.

    @return: the open file descriptor holding the lock, or C{None} when
        another open file (of any process, or of this one) holds it.
    @raise OSError: the file cannot be opened (its directory is missing...).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            held, current = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            return fd
        os.close(fd)  # removed by its last holder after we opened it: again


def release(fd, path):
    """
    Remove the lock file C{path} whose lock C{fd} holds (see L{try_lock}),
    then release the lock.  Never raises for a file already gone.
    """
    try:
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


class WorkArea:
    """
    A private directory in the store (L{PackageStore.open_work_area}),
    locked while in use so that no process's clean-up removes it.

    @ivar path: the directory.
    """

    def __init__(self, path, lock_fd):
        self.path = path
        self._lock_fd = lock_fd

    def remove(self):
        """
        Remove the directory and what is in it, then its lock.  Idempotent.
        Blocking: call it in a thread.
        """
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            release(fd, self.path + ".lock")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()


class _Build:
    """
    The callers in this process waiting for one study's package.

    @ivar callers: C{[waiter, build]} of the callers still waiting, in
        the order they came; the build that runs is the first one's.
    @ivar started: a build of this process runs (it holds C{lock}).
    @ivar lock: the descriptor holding the study's build lock, or C{None}.
    @ivar poll: the delayed call of the next try of the lock, or C{None}.
    """

    def __init__(self, study_uid, lock_path):
        self.study_uid = study_uid
        self.lock_path = lock_path
        self.callers = []
        self.started = False
        self.lock = None
        self.poll = None


class _WallClock:
    @staticmethod
    def seconds():
        return time.time()


class _SerialQueue:
    """
    Runs functions in a thread pool one at a time, in the order asked.
    Lives on the reactor thread.
    """

    def __init__(self, reactor, threadpool):
        self._reactor = reactor
        self._threadpool = threadpool
        self._queue = deque()
        self._busy = False

    def run(self, f, *args, **kwargs):
        d = defer.Deferred()
        self._queue.append((d, f, args, kwargs))
        if not self._busy:
            self._next()
        return d

    def _next(self):
        # A loop, not recursion, when the pool runs jobs synchronously.
        while self._queue and not self._busy:
            d, f, args, kwargs = self._queue.popleft()
            self._busy = True
            job = deferToThreadPool(self._reactor, self._threadpool, f, *args, **kwargs)
            job.addBoth(self._finished, d)

    def _finished(self, result, d):
        self._busy = False
        # Fire the caller's Deferred (ignored if it was cancelled), then
        # dispatch what is waiting, including work its callbacks queued.
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
        self._next()


class PackageStore:
    """
    JMIX packages under a directory, indexed by id and by study in sqlite.
    See the module docstring for the layout, threading and retention.

    @param root: the store directory (created by L{start}).
    @param reactor: the reactor results are delivered on (its
        C{callFromThread}); the global one, imported when first needed,
        by default.
    @param threadpool: a C{ThreadPool} (or anything with
        C{callInThreadWithCallback}) to run the store's jobs in, one at a
        time; when C{None}, the store makes its own with one thread.
    @param ttl_secs: packages older than this are removed by L{prune}.
    @param max_bytes: the oldest packages are removed beyond this total.
    @param clock: C{seconds()} for the C{created} times and the TTL; the
        reactor when it has C{seconds}, else the wall clock.
    @param orphan_grace_secs: files without an index row that have not
        changed for this long are removed by L{prune}.
    """

    def __init__(
        self,
        root,
        reactor=None,
        threadpool=None,
        ttl_secs=None,
        max_bytes=None,
        clock=None,
        orphan_grace_secs=DEFAULT_ORPHAN_GRACE_SECS,
    ):
        self.root = os.path.abspath(os.fspath(root))
        self.index_path = os.path.join(self.root, INDEX_NAME)
        self.ttl_secs = ttl_secs
        self.max_bytes = max_bytes
        self.orphan_grace_secs = orphan_grace_secs
        self._reactor = reactor
        self._clock = clock
        self._owns_pool = threadpool is None
        self.threadpool = threadpool
        self._queue = None
        self._conn = None
        self._shutdown_trigger = None
        #: study uid -> the Deferreds of the callers waiting for its build
        self._building = {}

    # -- life cycle -------------------------------------------------------------

    def _get_reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _now(self):
        if self._clock is None:
            reactor = self._get_reactor()
            self._clock = reactor if hasattr(reactor, "seconds") else _WallClock()
        return self._clock.seconds()

    def start(self):
        """
        Start the thread pool (when the store owns it), create the root and
        open (or create) the index, then remove the work areas and lock
        files that crashed processes left (not those in use).

        @return: Deferred firing when the index is open.
        """
        if self._queue is not None:
            raise RuntimeError("the package store is started already")
        reactor = self._get_reactor()
        if self._owns_pool:
            from twisted.python.threadpool import ThreadPool

            # A new pool each time: a stopped ThreadPool cannot be restarted.
            self.threadpool = ThreadPool(minthreads=0, maxthreads=1, name="harmony-jmix-store")
            self.threadpool.start()
            if hasattr(reactor, "addSystemEventTrigger"):
                self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._at_shutdown)
        self._queue = _SerialQueue(reactor, self.threadpool)
        return self._queue.run(self._open)

    def stop(self):
        """
        Close the index after the jobs already asked for, then stop the
        thread pool if the store owns it.  The store may be started again.

        @return: Deferred firing when it is closed.
        """
        if self._queue is None:
            return defer.succeed(None)
        if self._shutdown_trigger is not None:
            self._get_reactor().removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        return self._close()

    def _at_shutdown(self):
        self._shutdown_trigger = None
        return self._close()

    def _close(self):
        queue, self._queue = self._queue, None
        d = queue.run(self._close_index)
        if self._owns_pool:
            pool = self.threadpool

            def stop_pool(result):
                # The close job was the last: the thread is idle, so the
                # join in ThreadPool.stop does not wait.
                pool.stop()
                return result

            d.addBoth(stop_pool)
        return d

    def _run(self, f, *args, **kwargs):
        if self._queue is None:
            return defer.fail(RuntimeError("the package store is not started"))
        return self._queue.run(f, *args, **kwargs)

    # -- paths ------------------------------------------------------------------

    def dir_for(self, package_id):
        """
        @return: where an unpacked copy of a package may be, C{<root>/<id>}
            (earlier versions kept one; a directory of that name is
            removed with the package, or as an orphan).
        @raise ValueError: C{package_id} is not a lower-case UUID.
        """
        return os.path.join(self.root, check_id(package_id))

    def zip_for(self, package_id):
        """
        @return: the zip of a package, C{<root>/<id>.zip}.
        @raise ValueError: C{package_id} is not a lower-case UUID.
        """
        return os.path.join(self.root, check_id(package_id) + ".zip")

    def _record(self, row):
        package_id, study_uid, created, size, payload_hash = row
        return PackageRecord(
            id=package_id,
            study_uid=study_uid,
            created=created,
            size=size,
            payload_hash=payload_hash,
            zip_path=self.zip_for(package_id),
        )

    # -- index ------------------------------------------------------------------

    def add(self, info):
        """
        Index a package whose zip is in place, then prune.

        @param info: has C{id}, C{study_uid}, C{size} and C{payload_hash}
            (a L{harmony.jmix.package.PackageInfo}).
        @return: Deferred[L{PackageRecord}]; fails with C{ValueError} for a
            bad id, C{FileNotFoundError} when the zip is not in place,
            L{Conflict} when the id is indexed already.
        """
        try:
            check_id(info.id)
        except ValueError:
            return defer.fail()
        d = self._run(self._add, info.id, info.study_uid, self._now(), int(info.size or 0), info.payload_hash)
        if self._queue is not None:
            # Queued now, so whatever is asked after add() sees the pruned store.
            self._run(self._prune, self._now()).addErrback(
                lambda f: log.failure("pruning the JMIX package store failed", f)
            )
        return d

    def get(self, package_id):
        """
        @return: Deferred[L{PackageRecord} or C{None}]: C{None} when the id
            is not indexed, or is but its zip is gone (then the row and
            what is left are removed).
        """
        return self._with_id(self._get, package_id)

    def exists(self, package_id):
        """
        @return: Deferred[bool]: the id is indexed, or a directory or zip
            of that name is present (a package being written, an orphan):
            an upload with that id must be refused.
        """
        return self._with_id(self._exists, package_id)

    def remove(self, package_id):
        """
        Remove a package: zip, directory (if any), then row.

        @return: Deferred[bool]: whether there was anything to remove.
        """
        return self._with_id(self._remove, package_id)

    def newest_for_study(self, study_uid):
        """
        @return: Deferred[L{PackageRecord} or C{None}]: the package of the
            study with the latest C{created} (damaged ones skipped).
        """
        return self._run(self._for_study, study_uid, 1).addCallback(lambda records: records[0] if records else None)

    def list_for_study(self, study_uid):
        """
        @return: Deferred[list of L{PackageRecord}], newest first (damaged
            ones left out and removed).
        """
        return self._run(self._for_study, study_uid, None)

    def prune(self):
        """
        Apply retention and clean up after crashes: remove damaged
        packages, packages older than C{ttl_secs}, the oldest while the
        total size exceeds C{max_bytes} (never the last one), orphans
        older than C{orphan_grace_secs}, and the work areas and build lock
        files no process holds.

        @return: Deferred[list of the ids removed], in removal order.
        """
        return self._run(self._prune, self._now())

    def _with_id(self, f, package_id):
        try:
            check_id(package_id)
        except ValueError:
            return defer.fail()
        return self._run(f, package_id)

    # -- one build per study ------------------------------------------------------

    def build_once(self, study_uid, build):
        """
        The study's package, built by C{build} unless a build of the same
        study is running (here or in another process sharing the store
        directory); either way, the outcome of the build that runs.

        In this process, each caller gets its own Deferred: cancelling it
        stops only that caller's wait, never a build that has started.  A
        build's result is shared by the callers that came while it ran; one
        asked for after it ended starts again.

        Before building, this process takes the study's build lock (in the
        store's job queue).  When another process holds it, nothing is built
        here: the lock is tried again every L{BUILD_POLL_SECS} (on the
        reactor's clock) until it is free.  Once this process has the lock,
        the index is looked at: when it holds a package of the study (the
        other process's build, or one added since the caller looked), the
        callers get that L{PackageRecord} and C{build} is never called;
        otherwise the build of the first caller still waiting runs, holding
        the lock until it ends (whatever the end).  When every caller has
        stopped waiting before a build started, nothing is built.  So this
        is for building what the store lacks, and C{build} should answer
        with the L{PackageRecord} it added, as the waiters of other
        processes get one.

        The store must be started (the lock is tried in its job queue).

        @param build: a callable without arguments returning a Deferred
            (or a value, or raising).
        @return: Deferred of the build's result, or of the study's newest
            L{PackageRecord} built by another process.
        """
        group = self._building.get(study_uid)
        first = group is None
        if first:
            group = self._building[study_uid] = _Build(study_uid, self.lock_for(study_uid))
        caller = [None, build]

        def forget(waiter):
            group.callers[:] = [other for other in group.callers if other is not caller]
            if not group.callers and not group.started:
                self._abandon(group)

        caller[0] = defer.Deferred(forget)
        group.callers.append(caller)
        if first:
            self._try_build_lock(group)
        return caller[0]

    def lock_for(self, study_uid):
        """
        @return: the path of a study's build lock file (named by a hash:
            no UID in a path).
        """
        digest = hashlib.sha256(str(study_uid).encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.root, LOCKS_DIR, digest + ".lock")

    def _current(self, group):
        return self._building.get(group.study_uid) is group

    def _try_build_lock(self, group):
        group.poll = None
        d = self._run(self._lock_or_find, group.lock_path, group.study_uid)
        d.addCallback(self._lock_tried, group).addErrback(self._lock_failed, group)

    def _lock_tried(self, outcome, group):
        fd, record = outcome
        if not self._current(group) or not group.callers:
            # Nobody is waiting any more.
            if fd is not None:
                release(fd, group.lock_path)
            return
        if record is not None:
            self._settle(group, record)
        elif fd is None:
            # Another process builds it: try again in a while.
            group.poll = self._get_reactor().callLater(BUILD_POLL_SECS, self._try_build_lock, group)
        else:
            group.lock = fd
            group.started = True
            build = group.callers[0][1]
            defer.maybeDeferred(build).addBoth(self._built, group)

    def _lock_failed(self, failure, group):
        if self._current(group):
            self._settle(group, failure)

    def _abandon(self, group):
        if group.poll is not None and group.poll.active():
            group.poll.cancel()
        group.poll = None
        if self._current(group):
            del self._building[group.study_uid]
        # A try of the lock still in the queue releases it when it ends.

    def _built(self, result, group):
        fd, group.lock = group.lock, None
        if fd is not None:
            release(fd, group.lock_path)
        self._settle(group, result)
        return None

    def _settle(self, group, result):
        if self._current(group):
            del self._building[group.study_uid]
        waiters = [waiter for waiter, _ in group.callers]
        del group.callers[:]
        if isinstance(result, Failure) and not waiters:
            log.failure("a JMIX package build failed with nobody waiting", result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    # -- work areas ---------------------------------------------------------------

    def open_work_area(self, kind):
        """
        A new private directory under the store for C{kind} of work
        (C{"staging"}: a build's zip while it is written; C{"upload"}:
        an upload being checked), locked until L{WorkArea.remove}; the store's clean-up
        (at start and in L{prune}, in any process) leaves it alone while it
        is locked and removes it once its process is gone.  Blocking: call
        it in a thread.

        @return: a L{WorkArea}.
        """
        base = os.path.join(self.root, WORK_AREAS[kind])
        os.makedirs(base, 0o700, exist_ok=True)
        while True:
            path = os.path.join(base, uuid.uuid4().hex)
            fd = try_lock(path + ".lock")
            if fd is not None:
                break
        try:
            os.mkdir(path, 0o700)
        except BaseException:
            release(fd, path + ".lock")
            raise
        return WorkArea(path, fd)

    # -- in the thread ------------------------------------------------------------

    def _open(self):
        os.makedirs(os.path.join(self.root, LOCKS_DIR), DIR_MODE, exist_ok=True)
        conn = sqlite3.connect(self.index_path, check_same_thread=False, timeout=BUSY_TIMEOUT_SECS)
        try:
            # Switching a new index to WAL does not wait for sqlite's busy
            # timeout ("database is locked" at once when another worker
            # opens it at the same time, seen with 8): the processes
            # sharing the store take turns (a file lock, held in this
            # thread until the index is ready).
            with open(os.path.join(self.root, LOCKS_DIR, INDEX_LOCK), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                with conn:
                    for statement in _SCHEMA:
                        conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # What crashed processes left (those still in use are locked).
        self._remove_work_leftovers()

    def _close_index(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _db(self):
        if self._conn is None:
            raise RuntimeError("the package store index is not open")
        return self._conn

    def _add(self, package_id, study_uid, created, size, payload_hash):
        conn = self._db()
        if not os.path.isfile(self.zip_for(package_id)):
            raise FileNotFoundError(f"package {package_id}: its zip is not in the store")
        try:
            with conn:
                conn.execute(
                    f"INSERT INTO packages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                    (package_id, study_uid, created, size, payload_hash),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"Package {package_id} exists already") from None
        return self._record((package_id, study_uid, created, size, payload_hash))

    def _intact(self, record):
        """
        Whether a row's zip is there; if not, the package is removed.
        """
        if os.path.isfile(record.zip_path):
            return True
        log.warn("JMIX package {id} lost its files: removed from the index", id=record.id)
        self._remove(record.id)
        return False

    def _get(self, package_id):
        row = self._db().execute(f"SELECT {_COLUMNS} FROM packages WHERE id = ?", (package_id,)).fetchone()
        if row is None:
            return None
        record = self._record(row)
        return record if self._intact(record) else None

    def _exists(self, package_id):
        row = self._db().execute("SELECT 1 FROM packages WHERE id = ?", (package_id,)).fetchone()
        return row is not None or os.path.lexists(self.dir_for(package_id)) or os.path.lexists(self.zip_for(package_id))

    def _lock_or_find(self, lock_path, study_uid):
        """
        Try a study's build lock; with it, look for a package of the study.

        @return: C{(None, None)}: another process holds the lock;
            C{(None, record)}: the study has a package (the lock is
            released again); C{(fd, None)}: this process holds the lock
            and the study has no package.
        """
        try:
            fd = try_lock(lock_path)
        except FileNotFoundError:  # the locks directory went away
            os.makedirs(os.path.dirname(lock_path), DIR_MODE, exist_ok=True)
            fd = try_lock(lock_path)
        if fd is None:
            return None, None
        try:
            found = self._for_study(study_uid, 1)
        except BaseException:
            release(fd, lock_path)
            raise
        if found:
            release(fd, lock_path)
            return None, found[0]
        return fd, None

    def _remove_work_leftovers(self):
        """
        Remove the work areas and build lock files no process uses (their
        lock can be taken): what crashed processes left.
        """
        for directory in WORK_AREAS.values():
            base = os.path.join(self.root, directory)
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                continue
            for stem in sorted({name[: -len(".lock")] if name.endswith(".lock") else name for name in names}):
                lock_path = os.path.join(base, stem + ".lock")
                try:
                    fd = try_lock(lock_path)
                except OSError as e:
                    log.warn("JMIX store: cannot check a work area ({error})", error=e.strerror)
                    continue
                if fd is None:
                    continue  # in use
                try:
                    path = os.path.join(base, stem)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.lexists(path):
                        os.unlink(path)
                except OSError as e:
                    log.warn("JMIX store: cannot remove a work area ({error})", error=e.strerror)
                finally:
                    release(fd, lock_path)
        locks = os.path.join(self.root, LOCKS_DIR)
        try:
            names = os.listdir(locks)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".lock"):
                lock_path = os.path.join(locks, name)
                try:
                    fd = try_lock(lock_path)
                except OSError:
                    continue
                if fd is not None:
                    release(fd, lock_path)

    def _for_study(self, study_uid, limit):
        found = []
        # Newest first; rowid orders packages added at the same clock time.
        cursor = self._db().execute(
            f"SELECT {_COLUMNS} FROM packages WHERE study_uid = ? ORDER BY created DESC, rowid DESC", (study_uid,)
        )
        records = [self._record(row) for row in cursor.fetchall()]
        for record in records:
            if self._intact(record):
                found.append(record)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def _remove(self, package_id):
        zip_path, directory = self.zip_for(package_id), self.dir_for(package_id)
        existed = False
        try:
            os.unlink(zip_path)
            existed = True
        except FileNotFoundError:
            pass
        if os.path.lexists(directory):
            existed = True
            if os.path.isdir(directory) and not os.path.islink(directory):
                shutil.rmtree(directory)
            else:
                os.unlink(directory)
        conn = self._db()
        with conn:
            existed = conn.execute("DELETE FROM packages WHERE id = ?", (package_id,)).rowcount > 0 or existed
        return existed

    def _prune(self, now):
        conn = self._db()
        rows = conn.execute(f"SELECT {_COLUMNS} FROM packages ORDER BY created ASC, rowid ASC").fetchall()
        removed = []
        kept = []
        for row in rows:
            record = self._record(row)
            if not self._intact(record):
                removed.append(record.id)
            elif self.ttl_secs is not None and record.created < now - self.ttl_secs:
                self._remove(record.id)
                removed.append(record.id)
            else:
                kept.append(record)
        if self.max_bytes is not None:
            total = sum(record.size or 0 for record in kept)
            while total > self.max_bytes and len(kept) > 1:
                record = kept.pop(0)
                self._remove(record.id)
                removed.append(record.id)
                total -= record.size or 0
        indexed = {record.id for record in kept}
        removed += self._remove_orphans(indexed)
        self._remove_work_leftovers()
        if removed:
            log.info("JMIX package store pruned: {count} removed", count=len(removed))
        return removed

    def _remove_orphans(self, indexed):
        candidates = set()
        for name in os.listdir(self.root):
            if PACKAGE_ID.match(name):
                candidates.add(name)
            else:
                match = _ZIP_NAME.match(name)
                if match:
                    candidates.add(match.group(1))
        removed = []
        wall = self._wall_time()
        for package_id in sorted(candidates - indexed):
            newest = self._last_change(package_id)
            if newest is not None and wall - newest < self.orphan_grace_secs:
                continue  # perhaps still being written
            self._remove(package_id)
            removed.append(package_id)
        return removed

    @staticmethod
    def _wall_time():
        return time.time()

    def _last_change(self, package_id):
        directory = self.dir_for(package_id)
        paths = (
            self.zip_for(package_id),
            directory,
            os.path.join(directory, "payload"),
            os.path.join(directory, "payload", "dicom"),
        )
        newest = None
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            changed = max(st.st_mtime, st.st_ctime)
            newest = changed if newest is None else max(newest, changed)
        return newest
