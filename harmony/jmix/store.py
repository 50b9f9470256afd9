# -*- test-case-name: tests.unit.test_jmix_store -*-
"""
L{PackageStore}: where JMIX packages live and how they are found.

Layout under the root::

    <root>/index.sqlite3        the index (WAL mode; plus its -wal and -shm files)
    <root>/<id>/                an unpacked package (manifest.json, audit.json, payload/)
    <root>/<id>.zip             the same package as served
    <root>/.<anything>          work areas of other code (staging, uploads): never touched here

An id is a canonical lower-case UUID (8-4-4-4-12 hex digits), checked by
every method that takes one, so no path outside the root can be named.

The index has one row per package: C{packages(id, study_uid, created, size,
payload_hash)}, with an index on C{(study_uid, created)}.  C{created} comes
from the injected clock (C{clock.seconds()}) when the package is added; the
newest package of a study is the one with the greatest C{created} (ties:
the one added last).  C{size} is the size the caller reports (the zip's).

A row is written only after the package's directory and zip are in place
(the caller puts them there, then calls L{PackageStore.add}), and a package
is removed files first, row last.  So, after a crash:

  - a row whose zip or directory is missing is a damaged package: it is not
    served (L{PackageStore.get} returns C{None}) and the row and whatever is
    left of its files are removed when it is looked up or pruned;
  - a directory or zip without a row is an orphan (an interrupted build or
    upload): it is never served, and L{PackageStore.prune} removes it once
    it has not changed for C{orphan_grace_secs}, so that a package still
    being written (or moved into place, not yet added) is left alone.  Its
    age is measured from the newest change time (the later of C{st_mtime}
    and C{st_ctime}: a rename or C{utime} updates the change time, so a
    package unpacked elsewhere with old file times and moved in counts as
    new) of the directory, C{payload/}, C{payload/dicom/} and the zip,
    against the wall clock, since these are file system times.

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
index out of step); the caller just stops waiting.

Retention: L{PackageStore.prune} removes packages older than C{ttl_secs}
(when set), then, while the total size exceeds C{max_bytes} (when set), the
oldest -- but never the last package left, so that a package larger than
the cap can still be served once built.  It runs after every
L{PackageStore.add}.

One build per study: L{PackageStore.build_once} runs a build unless one for
the same study is running, in which case the caller waits for that one and
gets its result or its failure (in this process: the store of a directory
is shared by the endpoint and middleware of a process).
"""

import dataclasses
import os
import re
import shutil
import sqlite3
import time
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
    @ivar zip_path: the absolute path of C{<id>.zip}.
    @ivar directory: the absolute path of the unpacked package.
    """

    id: str
    study_uid: object
    created: float
    size: int
    payload_hash: object
    zip_path: str
    directory: str


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
        open (or create) the index.

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
        @return: the directory of a package, C{<root>/<id>}.
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
            directory=self.dir_for(package_id),
        )

    # -- index ------------------------------------------------------------------

    def add(self, info):
        """
        Index a package whose directory and zip are in place, then prune.

        @param info: has C{id}, C{study_uid}, C{size} and C{payload_hash}
            (a L{harmony.jmix.package.PackageInfo}).
        @return: Deferred[L{PackageRecord}]; fails with C{ValueError} for a
            bad id, C{FileNotFoundError} when the files are not in place,
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
            is not indexed, or is but its zip or directory is gone (then
            the row and what is left are removed).
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
        Remove a package: zip, directory, then row.

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
        total size exceeds C{max_bytes} (never the last one), and orphans
        older than C{orphan_grace_secs}.

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
        Run C{build} unless a build of the same study is running; either
        way, the result (or failure) of the build that runs.

        Each caller gets its own Deferred: cancelling it stops only that
        caller's wait, never the build.  A build's result is shared by
        the callers that came while it ran; one asked for after it ended
        runs a new build.

        @param build: a callable without arguments returning a Deferred
            (or a value, or raising).
        @return: Deferred of the build's result.
        """
        waiters = self._building.get(study_uid)
        starting = waiters is None
        if starting:
            waiters = self._building[study_uid] = []

        def forget(waiter):
            if waiter in waiters:
                waiters.remove(waiter)

        waiter = defer.Deferred(forget)
        # Joined before the build starts: a build may finish synchronously.
        waiters.append(waiter)
        if starting:
            defer.maybeDeferred(build).addBoth(self._built, study_uid, waiters)
        return waiter

    def _built(self, result, study_uid, waiters):
        if self._building.get(study_uid) is waiters:
            del self._building[study_uid]
        if isinstance(result, Failure) and not waiters:
            log.failure("a JMIX package build failed with nobody waiting", result)
        for waiter in list(waiters):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    # -- in the thread ------------------------------------------------------------

    def _open(self):
        os.makedirs(self.root, DIR_MODE, exist_ok=True)
        conn = sqlite3.connect(self.index_path, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

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
        zip_path, directory = self.zip_for(package_id), self.dir_for(package_id)
        for path, isa in ((zip_path, os.path.isfile), (directory, os.path.isdir)):
            if not isa(path):
                raise FileNotFoundError(f"package {package_id}: {os.path.basename(path)} is not in the store")
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
        Whether a row's files are there; if not, the package is removed.
        """
        if os.path.isfile(record.zip_path) and os.path.isdir(record.directory):
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
