# -*- test-case-name: tests.unit.test_storage -*-
"""
L{FilesystemStorage}: L{IStorage} on a local directory tree.

Layout under the root::

    <root>/<relpath>            stored objects
    <root>/.tmp/.w-<random>     objects being written (renamed into place)
    <root>/.tmp/<name>/         temp areas (L{FilesystemStorage.temp_area})

Keep the root on one filesystem (no mount points inside it): commits are a
C{rename(2)} from C{.tmp/} into place.

Threading (DESIGN.md rule 1): chunk writes go into the page cache on the
calling (reactor) thread; without C{fsync} the commit (close + rename, plus
C{mkdir}s the first time a directory is used) is done there too, which
saves a thread hop per object.  Everything that can take long -- C{fsync}
of the file and of its directories, directory listings, deletes -- runs in
the storage's thread pool through C{deferToThreadPool}.
"""

import errno
import hashlib
import itertools
import os
import re
import shutil
import threading

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.storage.interfaces import IStorage, IStorageWriter, StoredObject
from harmony.streams import EOF, Stream

#: The reserved first component holding temporary files and areas.
TEMP_DIR = ".tmp"
DIR_MODE = 0o750
FILE_MODE = 0o640

_AREA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)

log = Logger()


def split_relpath(relpath, prefix=False):
    """
    Validate a relpath and return its components.

    @param prefix: validate a listing prefix instead: C{""} is allowed and
        the last component may be empty (a trailing C{/}).
    @raise ValueError: not a str, empty, absolute, with a NUL, a backslash,
        an empty / C{.} / C{..} component, or inside the reserved C{.tmp}.
    """
    if not isinstance(relpath, str):
        raise ValueError("storage path must be a str")
    if prefix and relpath == "":
        return []
    if not relpath:
        raise ValueError("empty storage path")
    if "\x00" in relpath or "\\" in relpath:
        raise ValueError("storage path contains NUL or backslash")
    if relpath.startswith("/"):
        raise ValueError("storage path must be relative")
    parts = relpath.split("/")
    checked = parts[:-1] if prefix else parts
    for part in checked:
        if part in ("", ".", ".."):
            raise ValueError("storage path has an empty, '.' or '..' component")
    if prefix and parts[-1] in (".", ".."):
        raise ValueError("storage path has a '.' or '..' component")
    if parts[0] == TEMP_DIR and (len(parts) > 1 or not prefix):
        raise ValueError("storage path is in the reserved %r area" % (TEMP_DIR,))
    return parts


def _makedirs(path, stop):
    """
    Create C{path} and missing parents down from C{stop} (which exists),
    each with L{DIR_MODE} (C{os.makedirs} gives intermediate directories the
    default mode).  Returns the directories created, outermost first.
    """
    missing = []
    while path != stop and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue
        created.append(directory)
    return created


def _fsync_dir(path):
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _abort_all(writers):
    for writer in writers:
        writer.abort()


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.failure("could not remove {path}", path=path)


@implementer(IStorageWriter)
class FileWriter:
    """
    An object being written into a temporary file of a L{FilesystemStorage}.
    Made by L{FilesystemStorage.open_writer}.
    """

    # states
    _OPEN, _COMMITTING, _DONE, _ABORTED = range(4)

    def __init__(self, storage, relpath, path, fsync=False, sha256=False):
        self._storage = storage
        self.relpath = relpath
        self.path = path
        self.size = 0
        self._fsync = fsync
        self._hash = hashlib.sha256() if sha256 else None
        self.temp_path = storage._new_temp_path()
        fd = os.open(self.temp_path, _OPEN_FLAGS, FILE_MODE)
        try:
            self._file = open(fd, "wb", buffering=64 * 1024)
        except BaseException:
            os.close(fd)
            _unlink_quietly(self.temp_path)
            raise
        self._state = self._OPEN
        self._commit_d = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._renamed = False

    def write(self, chunk):
        if self._state != self._OPEN:
            raise RuntimeError("write() on a writer that is not open")
        try:
            self._file.write(chunk)
        except BaseException:
            self.abort()
            raise
        self.size += len(chunk)
        if self._hash is not None:
            self._hash.update(chunk)

    def abort(self):
        if self._state == self._COMMITTING:
            # The commit's canceller does the cleaning.
            self._commit_d.cancel()
            return
        if self._state != self._OPEN:
            return
        self._state = self._ABORTED
        try:
            self._file.close()
        except OSError:
            pass
        _unlink_quietly(self.temp_path)

    def _stored(self):
        digest = self._hash.hexdigest() if self._hash is not None else None
        return StoredObject(path=self.path, relpath=self.relpath, size=self.size, sha256=digest)

    def commit(self, relpath=None):
        if self._state != self._OPEN:
            return defer.fail(RuntimeError("commit() on a writer that is not open"))
        if relpath is not None:
            self.path = self._storage._path(relpath)
            self.relpath = relpath
        elif self.relpath is None:
            raise ValueError("commit() needs a relpath: the writer was opened without one")
        self._state = self._COMMITTING
        try:
            # Flush on this thread: the file object is not shared between threads.
            self._file.flush()
        except BaseException:
            self._state = self._OPEN
            self.abort()
            return defer.fail()
        if not self._fsync:
            try:
                self._file.close()
                self._place()
            except BaseException:
                failure = Failure()
                self._state = self._ABORTED
                _unlink_quietly(self.temp_path)
                return defer.fail(failure)
            self._state = self._DONE
            return defer.succeed(self._stored())

        self._commit_d = outer = defer.Deferred(self._cancel_commit)
        inner = self._storage._in_thread(self._commit_durably)

        def done(result):
            if outer.called:
                # Cancelled meanwhile: the canceller or the thread cleaned up.
                return None
            if isinstance(result, Failure):
                self._state = self._ABORTED
                outer.errback(result)
            else:
                self._state = self._DONE
                outer.callback(self._stored())
            return None

        inner.addBoth(done)
        return outer

    def _place(self):
        """
        Rename the temporary file into place, creating directories when the
        target's is missing.  Returns the directories created.
        """
        created = []
        for _ in range(8):
            try:
                os.replace(self.temp_path, self.path)
                return created
            except FileNotFoundError:
                if not os.path.exists(self.temp_path):
                    raise
            # A concurrent delete may prune a directory we just made (even
            # while we make its children): retry.
            try:
                created += _makedirs(os.path.dirname(self.path), self._storage.root)
            except FileNotFoundError:
                continue
        os.replace(self.temp_path, self.path)
        return created

    def _commit_durably(self):
        """
        In the thread pool: fsync the content, rename, fsync the
        directories whose entries changed.
        """
        try:
            self._storage._fsync_file(self._file.fileno())
            self._file.close()
            with self._lock:
                if self._cancelled:
                    raise defer.CancelledError()
                created = self._place()
                self._renamed = True
        except BaseException:
            try:
                self._file.close()
            except OSError:
                pass
            _unlink_quietly(self.temp_path)
            raise
        directories = {os.path.dirname(self.path)}
        directories.update(os.path.dirname(d) for d in created)
        try:
            for directory in sorted(directories):
                self._storage._fsync_dir(directory)
        except BaseException:
            # Not durable: report the failure with nothing stored.
            _unlink_quietly(self.path)
            raise
        return None

    def _cancel_commit(self, d):
        with self._lock:
            self._cancelled = True
            renamed = self._renamed
        self._state = self._ABORTED
        if renamed:
            # Too late to stop the rename: cancelled means nothing stored.
            _unlink_quietly(self.path)


@implementer(IStorage)
class FilesystemStorage(Service):
    """
    L{IStorage} on a local directory; also the L{IService} that owns the
    thread pool (add it to the application so that the pool is started and
    stopped with it; work asked for before C{startService} waits).

    @param root: the storage root directory (created if missing).
    @param reactor: the reactor Deferreds from the thread pool are fired
        on; the global one (imported when first needed) by default.
    @param threadpool: a C{twisted.python.threadpool.ThreadPool} (or
        anything with C{callInThreadWithCallback}); when C{None}, the
        storage makes its own and starts/stops it as a service.
    """

    name = "storage"

    def __init__(self, root, reactor=None, threadpool=None, max_threads=4):
        self.root = os.path.abspath(os.fspath(root))
        self._reactor = reactor
        if threadpool is None:
            from twisted.python.threadpool import ThreadPool

            threadpool = ThreadPool(minthreads=0, maxthreads=max_threads, name="harmony-storage")
            self._owns_pool = True
        else:
            self._owns_pool = False
        self.threadpool = threadpool
        self._temp_root = os.path.join(self.root, TEMP_DIR)
        self._temp_prefix = os.urandom(6).hex()
        self._temp_counter = itertools.count()
        # The root and any missing parents (a fresh machine), then .tmp.
        _makedirs(self._temp_root, os.path.dirname(os.path.abspath(os.sep)))

    # -- service ----------------------------------------------------------

    def startService(self):
        Service.startService(self)
        if self._owns_pool:
            self.threadpool.start()

    def stopService(self):
        Service.stopService(self)
        if self._owns_pool:
            self.threadpool.stop()

    # -- helpers ----------------------------------------------------------

    def _in_thread(self, f, *args, **kwargs):
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return deferToThreadPool(reactor, self.threadpool, f, *args, **kwargs)

    # The fsync calls (tests replace them to see where they run).
    def _fsync_file(self, fd):
        os.fsync(fd)

    def _fsync_dir(self, path):
        _fsync_dir(path)

    def _new_temp_path(self):
        # A per-process random prefix and a counter (O_EXCL guards clashes).
        return os.path.join(self._temp_root, f".w-{self._temp_prefix}-{next(self._temp_counter)}")

    def _path(self, relpath):
        return os.path.join(self.root, *split_relpath(relpath))

    # -- IStorage ---------------------------------------------------------

    def open_writer(self, relpath=None, fsync=False, sha256=False):
        path = None if relpath is None else self._path(relpath)
        return FileWriter(self, relpath, path, fsync=fsync, sha256=sha256)

    def prepare_writers(self, count, fsync=False, sha256=False):
        """
        C{count} writers without a relpath (given at commit), their
        temporary files created in the thread pool, in one go: file
        creation costs a journal update, which a caller that knows it will
        need writers soon (the C-STORE SCP, between instances) keeps off
        its critical path this way.

        @return: Deferred[list of L{FileWriter}]; when one cannot be
            created, those created already are removed and it fails.
        """
        return self._in_thread(self._new_writers, count, fsync, sha256)

    def discard_writers(self, writers):
        """
        Abort unused writers (remove their temporary files) in the thread
        pool.

        @return: Deferred[None]
        """
        return self._in_thread(_abort_all, list(writers))

    def _new_writers(self, count, fsync, sha256):
        writers = []
        try:
            for _ in range(count):
                writers.append(FileWriter(self, None, None, fsync=fsync, sha256=sha256))
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        return writers

    def write_stream(self, relpath, source, fsync=False, sha256=False):
        path = self._path(relpath)
        if not isinstance(source, Stream):
            data = source
            try:
                writer = FileWriter(self, relpath, path, fsync=fsync, sha256=sha256)
                writer.write(data)
            except BaseException:
                return defer.fail()
            return writer.commit()
        try:
            writer = FileWriter(self, relpath, path, fsync=fsync, sha256=sha256)
        except BaseException:
            source.cancel()
            return defer.fail()
        return _StreamCopy(source, writer).start()

    def read(self, relpath, chunk_size=64 * 1024):
        path = self._path(relpath)
        try:
            f = open(path, "rb")
        except OSError:
            stream = Stream()
            stream.fail(Failure())
            return stream
        try:
            length = os.fstat(f.fileno()).st_size
        except OSError:
            f.close()
            raise
        return Stream.from_file(f, length=length, chunk_size=chunk_size)

    def exists(self, relpath):
        return os.path.isfile(self._path(relpath))

    def list(self, prefix=""):
        parts = split_relpath(prefix, prefix=True)
        return self._in_thread(self._list, prefix, parts)

    def _list(self, prefix, parts):
        # Walk the deepest directory the prefix fully names.
        base_parts = parts[:-1]
        base = os.path.join(self.root, *base_parts)
        found = []
        root_len = len(self.root) + 1
        for dirpath, dirnames, filenames in os.walk(base):
            if dirpath == self.root and TEMP_DIR in dirnames:
                dirnames.remove(TEMP_DIR)
            rel_dir = dirpath[root_len:].replace(os.sep, "/")
            # Prune directories that cannot match.
            if rel_dir:
                rel_dir += "/"
            dirnames[:] = [
                d for d in dirnames if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/")
            ]
            for name in filenames:
                rel = rel_dir + name
                if rel.startswith(prefix):
                    found.append(rel)
        found.sort()
        return found

    def delete(self, relpath, prune=True):
        path = self._path(relpath)
        return self._in_thread(self._delete, path, prune)

    def _delete(self, path, prune=True):
        os.unlink(path)
        if not prune:
            return
        directory = os.path.dirname(path)
        while directory != self.root and directory.startswith(self.root):
            try:
                os.rmdir(directory)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
                    break
                raise
            directory = os.path.dirname(directory)

    def discard(self, relpath):
        """
        Remove a stored object now, on the calling thread, without pruning
        directories: one unlink, a metadata operation like the rename of a
        commit (for copies removed one by one as they are relayed, where a
        thread-pool round trip would cost more than the unlink).

        @raise FileNotFoundError: there is no such object.
        """
        os.unlink(self._path(relpath))

    def delete_tree(self, relpath):
        path = self._path(relpath)
        return self._in_thread(self._delete_tree, path)

    def _delete_tree(self, path):
        shutil.rmtree(path, ignore_errors=True)
        directory = os.path.dirname(path)
        while directory != self.root and directory.startswith(self.root):
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    def temp_area(self, name):
        if not isinstance(name, str) or not _AREA_NAME.match(name):
            raise ValueError("temp area name must match [A-Za-z0-9_-]{1,64}")
        path = os.path.join(self._temp_root, name)
        _makedirs(path, self._temp_root)
        return path


class _StreamCopy:
    """
    Copies a L{Stream} of byte chunks into a L{FileWriter}, then commits.
    The returned Deferred is cancellable at any point: the source is
    cancelled and the temporary file removed.
    """

    def __init__(self, source, writer):
        self._source = source
        self._writer = writer
        self._pending = None
        self._cancelling = False
        self._done = defer.Deferred(self._cancel)

    def start(self):
        self._pump()
        return self._done

    def _pump(self):
        source, writer = self._source, self._writer
        while not self._done.called:
            d = source.read()
            if not d.called:
                self._pending = d
                d.addCallbacks(self._got_chunk, self._failed)
                return
            box = []
            d.addBoth(box.append)
            item = box[0]
            if isinstance(item, Failure):
                self._failed(item)
                return
            if item is EOF:
                self._commit()
                return
            try:
                writer.write(item)
            except BaseException:
                source.cancel()
                self._failed(Failure())
                return

    def _got_chunk(self, item):
        self._pending = None
        if self._done.called:
            return
        if item is EOF:
            self._commit()
            return
        try:
            self._writer.write(item)
        except BaseException:
            self._source.cancel()
            self._failed(Failure())
            return
        self._pump()

    def _commit(self):
        self._pending = d = self._writer.commit()
        d.addCallbacks(self._committed, self._failed)

    def _committed(self, stored):
        self._pending = None
        if not self._done.called:
            self._done.callback(stored)

    def _failed(self, failure):
        self._pending = None
        self._writer.abort()
        if not self._done.called and not self._cancelling:
            self._done.errback(failure)

    def _cancel(self, d):
        # Deferred.cancel then fails self._done with CancelledError.
        self._cancelling = True
        pending, self._pending = self._pending, None
        self._source.cancel()
        if pending is not None and not pending.called:
            pending.addErrback(lambda f: None)
            pending.cancel()
        self._writer.abort()
