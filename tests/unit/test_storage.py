"""
Tests for L{harmony.storage.filesystem} (no global reactor: a fake reactor
and fake thread pools drive C{deferToThreadPool}).
"""

import hashlib
import os
import queue
import stat

import pytest
from twisted.application.service import IService
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from _fakes import FakeThreadPool
from harmony.storage import FilesystemStorage, IStorage, IStorageWriter, StoredObject
from harmony.storage.filesystem import TEMP_DIR, split_relpath
from harmony.streams import EOF, Stream, StreamCancelled, collect

# -- fakes -------------------------------------------------------------------


class FakeReactor:
    """
    Just enough reactor for C{deferToThreadPool}: C{callFromThread} runs
    the call at once, or queues it (C{queued=True}) until L{pump}.
    """

    def __init__(self, queued=False):
        self.queued = queued
        self.calls = []

    def callFromThread(self, f, *args, **kwargs):
        if self.queued:
            self.calls.append((f, args, kwargs))
        else:
            f(*args, **kwargs)

    def pump(self):
        calls, self.calls = self.calls, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


def result_of(d):
    """
    The result of a fired Deferred (raising its failure).
    """
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d):
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    assert isinstance(box[0], Failure), box[0]
    return box[0]


@pytest.fixture
def pool():
    return FakeThreadPool()


@pytest.fixture
def storage(tmp_path, pool):
    return FilesystemStorage(tmp_path / "store", reactor=FakeReactor(), threadpool=pool)


def temp_files(storage):
    tmp = os.path.join(storage.root, TEMP_DIR)
    return sorted(n for n in os.listdir(tmp) if n.startswith(".w-"))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class RecordingFsync:
    """
    Replaces the storage's fsync calls; records where they ran.
    """

    def __init__(self, storage, pool, fail_file=False):
        self.calls = []
        self.pool = pool
        self.fail_file = fail_file
        storage._fsync_file = self.fsync_file
        storage._fsync_dir = self.fsync_dir

    def fsync_file(self, fd):
        self.calls.append(("file", fd, self.pool.in_pool))
        if self.fail_file:
            raise OSError(5, "EIO")
        os.fsync(fd)

    def fsync_dir(self, path):
        self.calls.append(("dir", path, self.pool.in_pool))


# -- interface ---------------------------------------------------------------


def test_provides_interfaces(storage):
    verifyObject(IStorage, storage)
    verifyObject(IService, storage)
    writer = storage.open_writer("a/b.bin")
    verifyObject(IStorageWriter, writer)
    writer.abort()


# -- writes ------------------------------------------------------------------


def test_write_bytes(storage, pool):
    stored = result_of(storage.write_stream("1.2/3.4/5.6.dcm", b"hello", sha256=True))
    path = os.path.join(storage.root, "1.2", "3.4", "5.6.dcm")
    assert stored == StoredObject(
        path=path, relpath="1.2/3.4/5.6.dcm", size=5, sha256=hashlib.sha256(b"hello").hexdigest()
    )
    assert read_file(path) == b"hello"
    assert storage.exists("1.2/3.4/5.6.dcm")
    assert temp_files(storage) == []
    # No fsync asked: nothing went to the thread pool.
    assert pool.submitted == 0


def test_sha256_optional(storage):
    assert result_of(storage.write_stream("x", b"abc")).sha256 is None


def test_write_empty(storage):
    stored = result_of(storage.write_stream("empty", b""))
    assert stored.size == 0
    assert read_file(stored.path) == b""


def test_directories_mode(storage):
    result_of(storage.write_stream("d1/d2/d3/f", b"x"))
    umask = os.umask(0)
    os.umask(umask)
    for rel in ("d1", "d1/d2", "d1/d2/d3"):
        mode = stat.S_IMODE(os.stat(os.path.join(storage.root, rel)).st_mode)
        assert mode == 0o750 & ~umask


def test_writer_final_path_absent_until_commit(storage):
    writer = storage.open_writer("s/t/u.dcm", sha256=True)
    path = os.path.join(storage.root, "s", "t", "u.dcm")
    chunks = [bytes([i]) * 1000 for i in range(50)]
    for chunk in chunks:
        writer.write(chunk)
        # A concurrent reader of the final path sees nothing at all.
        assert not os.path.exists(path)
        assert not storage.exists("s/t/u.dcm")
    assert writer.size == 50000
    assert temp_files(storage) == [os.path.basename(writer.temp_path)]
    stored = result_of(writer.commit())
    assert read_file(path) == b"".join(chunks)
    assert stored.size == 50000
    assert stored.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert temp_files(storage) == []
    with pytest.raises(RuntimeError):
        writer.write(b"more")
    writer.abort()  # no-op after commit
    assert read_file(path) == b"".join(chunks)


def test_writer_replaces_atomically(storage):
    result_of(storage.write_stream("obj", b"old content"))
    path = os.path.join(storage.root, "obj")
    writer = storage.open_writer("obj")
    writer.write(b"new ")
    assert read_file(path) == b"old content"
    writer.write(b"content!")
    assert read_file(path) == b"old content"
    result_of(writer.commit())
    assert read_file(path) == b"new content!"


def test_writer_abort(storage):
    writer = storage.open_writer("a/b")
    writer.write(b"partial")
    assert len(temp_files(storage)) == 1
    writer.abort()
    writer.abort()
    assert temp_files(storage) == []
    assert not storage.exists("a/b")
    assert not os.path.exists(os.path.join(storage.root, "a"))
    with pytest.raises(RuntimeError):
        writer.write(b"x")
    failure_of(writer.commit()).trap(RuntimeError)


def test_writer_relpath_given_at_commit(storage):
    writer = storage.open_writer(sha256=True)
    assert writer.relpath is None
    writer.write(b"file meta + dataset")
    with pytest.raises(ValueError):
        writer.commit()
    with pytest.raises(ValueError):
        writer.commit("../escape")
    # Still open after a bad relpath.
    writer.write(b"!")
    stored = result_of(writer.commit("1.2/3.4/5.6.dcm"))
    assert stored.relpath == "1.2/3.4/5.6.dcm"
    assert read_file(stored.path) == b"file meta + dataset!"
    assert stored.sha256 == hashlib.sha256(b"file meta + dataset!").hexdigest()
    assert temp_files(storage) == []


def test_writer_commit_relpath_overrides(storage):
    writer = storage.open_writer("first")
    writer.write(b"x")
    result_of(writer.commit("second"))
    assert storage.exists("second") and not storage.exists("first")


def test_two_writers_same_relpath(storage):
    w1 = storage.open_writer("same")
    w2 = storage.open_writer("same")
    w1.write(b"one")
    w2.write(b"two")
    assert w1.temp_path != w2.temp_path
    result_of(w2.commit())
    result_of(w1.commit())
    assert read_file(os.path.join(storage.root, "same")) == b"one"
    assert temp_files(storage) == []


def test_write_stream_from_stream(storage):
    source = Stream()
    d = storage.write_stream("p/q.dcm", source, sha256=True)
    path = os.path.join(storage.root, "p", "q.dcm")
    source.write(b"abc")
    source.write(b"def")
    assert not d.called
    assert not os.path.exists(path)
    assert len(temp_files(storage)) == 1
    source.write(b"ghi")
    source.finish()
    stored = result_of(d)
    assert read_file(path) == b"abcdefghi"
    assert stored.size == 9
    assert stored.sha256 == hashlib.sha256(b"abcdefghi").hexdigest()
    assert temp_files(storage) == []


def test_write_stream_from_lazy_stream(storage):
    chunks = [os.urandom(1000) for _ in range(100)]
    stored = result_of(storage.write_stream("lazy", Stream.from_iterable(chunks)))
    assert read_file(stored.path) == b"".join(chunks)


def test_write_stream_failing_source(storage):
    source = Stream()
    d = storage.write_stream("f/g", source)
    source.write(b"some bytes")
    assert len(temp_files(storage)) == 1
    source.fail(ZeroDivisionError())
    failure_of(d).trap(ZeroDivisionError)
    assert temp_files(storage) == []
    assert not storage.exists("f/g")


def test_write_stream_failing_lazy_source(storage):
    def items():
        yield b"one"
        raise ValueError("boom")

    d = storage.write_stream("f/h", Stream.from_iterable(items()))
    failure_of(d).trap(ValueError)
    assert temp_files(storage) == []
    assert not storage.exists("f/h")


def test_write_stream_cancel(storage):
    source = Stream()
    d = storage.write_stream("c/d", source)
    source.write(b"partial")
    assert len(temp_files(storage)) == 1
    d.cancel()
    failure_of(d).trap(defer.CancelledError)
    assert source.cancelled
    assert temp_files(storage) == []
    assert not storage.exists("c/d")
    # The producer writing after the cancel is ignored.
    source.write(b"late")
    assert temp_files(storage) == []


def test_write_stream_non_bytes_chunk(storage):
    source = Stream()
    d = storage.write_stream("bad", source)
    source.write("not bytes")
    failure_of(d).trap(TypeError)
    assert source.cancelled
    assert temp_files(storage) == []


def test_write_stream_bad_relpath_keeps_source(storage):
    source = Stream()
    with pytest.raises(ValueError):
        storage.write_stream("../x", source)


# -- fsync ---------------------------------------------------------------


def test_fsync_runs_in_thread_pool(tmp_path):
    pool = FakeThreadPool(immediate=False)
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    fsync = RecordingFsync(storage, pool)
    writer = storage.open_writer("1/2/3.dcm", fsync=True)
    writer.write(b"data")
    d = writer.commit()
    # Nothing done on the "reactor" path: not fsynced, not renamed.
    assert not d.called
    assert fsync.calls == []
    assert not storage.exists("1/2/3.dcm")
    assert pool.submitted == 1
    pool.run()
    stored = result_of(d)
    assert read_file(stored.path) == b"data"
    kinds = [(kind, in_pool) for kind, _, in_pool in fsync.calls]
    assert kinds[0] == ("file", True)
    assert all(in_pool for _, in_pool in kinds)
    dirs = sorted(path for kind, path, _ in fsync.calls if kind == "dir")
    root = storage.root
    # The directory of the new entry, and the parents of the directories created.
    assert dirs == sorted([os.path.join(root, "1", "2"), os.path.join(root, "1"), root])
    assert temp_files(storage) == []


def test_fsync_write_stream(tmp_path):
    pool = FakeThreadPool()
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    fsync = RecordingFsync(storage, pool)
    result_of(storage.write_stream("x/y", Stream.from_iterable([b"a", b"b"]), fsync=True))
    assert fsync.calls and all(in_pool for _, _, in_pool in fsync.calls)
    # Existing directory: only it is fsynced.
    fsync.calls.clear()
    result_of(storage.write_stream("x/z", b"c", fsync=True))
    assert [(k, p) for k, p, _ in fsync.calls if k == "dir"] == [("dir", os.path.join(storage.root, "x"))]


def test_fsync_failure_removes_temp(tmp_path):
    pool = FakeThreadPool()
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    RecordingFsync(storage, pool, fail_file=True)
    writer = storage.open_writer("e/f", fsync=True)
    writer.write(b"data")
    failure_of(writer.commit()).trap(OSError)
    assert temp_files(storage) == []
    assert not storage.exists("e/f")


def test_fsync_dir_failure_stores_nothing(tmp_path):
    pool = FakeThreadPool()
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)

    def fail(path):
        raise OSError(5, "EIO")

    storage._fsync_dir = fail
    failure_of(storage.write_stream("e/g", b"x", fsync=True)).trap(OSError)
    assert temp_files(storage) == []
    assert not storage.exists("e/g")


def test_cancel_commit_before_thread_runs(tmp_path):
    pool = FakeThreadPool(immediate=False)
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    RecordingFsync(storage, pool)
    writer = storage.open_writer("g/h", fsync=True)
    writer.write(b"data")
    d = writer.commit()
    d.cancel()
    failure_of(d).trap(defer.CancelledError)
    pool.run()
    assert not storage.exists("g/h")
    assert temp_files(storage) == []


def test_cancel_commit_after_rename(tmp_path):
    """
    The thread renamed the file but the result has not reached the reactor
    yet: cancelling then still means nothing is stored.
    """
    pool = FakeThreadPool(immediate=False)
    reactor = FakeReactor(queued=True)
    storage = FilesystemStorage(tmp_path / "root", reactor=reactor, threadpool=pool)
    RecordingFsync(storage, pool)
    source = Stream.from_iterable([b"data"])
    d = storage.write_stream("g/i", source, fsync=True)
    pool.run()
    assert storage.exists("g/i")
    d.cancel()
    failure_of(d).trap(defer.CancelledError)
    reactor.pump()
    assert not storage.exists("g/i")
    assert temp_files(storage) == []


def test_abort_during_fsync_commit(tmp_path):
    pool = FakeThreadPool(immediate=False)
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    RecordingFsync(storage, pool)
    writer = storage.open_writer("j", fsync=True)
    writer.write(b"x")
    d = writer.commit()
    writer.abort()
    failure_of(d).trap(defer.CancelledError)
    pool.run()
    assert not storage.exists("j")
    assert temp_files(storage) == []


def test_real_thread_pool(tmp_path):
    """
    A real C{ThreadPool} with a reactor stand-in that hands results back to
    the test thread.
    """

    class QueueReactor:
        def __init__(self):
            self.queue = queue.Queue()

        def callFromThread(self, f, *args, **kwargs):
            self.queue.put((f, args, kwargs))

        def pump(self):
            f, args, kwargs = self.queue.get(timeout=10)
            f(*args, **kwargs)

    reactor = QueueReactor()
    storage = FilesystemStorage(tmp_path / "root", reactor=reactor)
    storage.startService()
    try:
        assert storage.threadpool.started
        d = storage.write_stream("r/s", b"durable", fsync=True)
        reactor.pump()
        assert read_file(result_of(d).path) == b"durable"
        d = storage.list("")
        reactor.pump()
        assert result_of(d) == ["r/s"]
    finally:
        storage.stopService()
    assert not storage.threadpool.started


def test_given_threadpool_not_started_by_service(tmp_path):
    pool = ThreadPool()
    storage = FilesystemStorage(tmp_path / "root", reactor=FakeReactor(), threadpool=pool)
    storage.startService()
    assert storage.running
    assert not pool.started
    storage.stopService()


# -- paths ---------------------------------------------------------------------

BAD_RELPATHS = [
    "",
    "/etc/passwd",
    "/",
    "..",
    "../x",
    "a/../b",
    "a/..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\x00b",
    "a\\b",
    TEMP_DIR,
    TEMP_DIR + "/x",
    b"bytes",
    None,
]


@pytest.mark.parametrize("relpath", BAD_RELPATHS)
def test_bad_relpaths(storage, relpath):
    with pytest.raises(ValueError):
        storage.write_stream(relpath, b"x")
    if relpath is not None:  # None: the relpath comes with commit()
        with pytest.raises(ValueError):
            storage.open_writer(relpath)
    writer = storage.open_writer()
    with pytest.raises(ValueError):
        writer.commit(relpath)
    writer.abort()
    with pytest.raises(ValueError):
        storage.read(relpath)
    with pytest.raises(ValueError):
        storage.exists(relpath)
    with pytest.raises(ValueError):
        storage.delete(relpath)
    assert temp_files(storage) == []


@pytest.mark.parametrize("relpath", ["a", "a/b", "1.2.3/4.5/6.dcm", ".hidden/x", "a..b/..c", "x/.tmp/y"])
def test_good_relpaths(storage, relpath):
    assert split_relpath(relpath) == relpath.split("/")
    stored = result_of(storage.write_stream(relpath, b"ok"))
    assert stored.path.startswith(storage.root + os.sep)
    assert storage.exists(relpath)


@pytest.mark.parametrize("prefix", ["/a", "../", "a/../", ".tmp/", "a\x00", "./", "a//"])
def test_bad_list_prefixes(storage, prefix):
    with pytest.raises(ValueError):
        storage.list(prefix)


# -- read ------------------------------------------------------------------------


def test_read_chunks(storage):
    data = os.urandom(10000)
    result_of(storage.write_stream("big", data))
    stream = storage.read("big", chunk_size=4096)
    assert stream.length == 10000
    chunks = []
    while True:
        chunk = result_of(stream.read())
        if chunk is EOF:
            break
        chunks.append(chunk)
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data


def test_read_collect(storage):
    result_of(storage.write_stream("small", b"content"))
    assert result_of(collect(storage.read("small"))) == b"content"


def test_read_cancel_closes(storage):
    result_of(storage.write_stream("c", b"x" * 100000))
    stream = storage.read("c", chunk_size=10)
    assert result_of(stream.read()) == b"x" * 10
    stream.cancel()
    failure_of(stream.read()).trap(StreamCancelled)


def test_read_missing(storage):
    stream = storage.read("nope/x")
    failure_of(stream.read()).trap(FileNotFoundError)


def test_exists(storage):
    assert not storage.exists("a")
    result_of(storage.write_stream("a/b", b""))
    assert storage.exists("a/b")
    assert not storage.exists("a")  # a directory is not an object


# -- list / delete -----------------------------------------------------------------


def _fill(storage, relpaths):
    for relpath in relpaths:
        result_of(storage.write_stream(relpath, relpath.encode()))


def test_list(storage, pool):
    names = ["1.2/3/a.dcm", "1.2/3/b.dcm", "1.2/34/c.dcm", "1.3/d.dcm", "top", "1.2/3/sub/e"]
    _fill(storage, names)
    storage.temp_area("area")
    with open(os.path.join(storage.temp_area("area"), "f"), "wb"):
        pass
    writer = storage.open_writer("pending")  # in .tmp: never listed
    before = pool.submitted
    assert result_of(storage.list()) == sorted(names)
    assert pool.submitted == before + 1  # listing ran in the pool
    assert result_of(storage.list("1.2/3")) == ["1.2/3/a.dcm", "1.2/3/b.dcm", "1.2/3/sub/e", "1.2/34/c.dcm"]
    assert result_of(storage.list("1.2/3/")) == ["1.2/3/a.dcm", "1.2/3/b.dcm", "1.2/3/sub/e"]
    assert result_of(storage.list("1.2/3/a")) == ["1.2/3/a.dcm"]
    assert result_of(storage.list("1.")) == sorted(n for n in names if n.startswith("1."))
    assert result_of(storage.list("t")) == ["top"]
    assert result_of(storage.list("zzz")) == []
    assert result_of(storage.list("zzz/")) == []
    assert result_of(storage.list("top/")) == []
    assert result_of(storage.list(".t")) == []
    writer.abort()


def test_delete(storage, pool):
    _fill(storage, ["a/b/c", "a/d", "e"])
    before = pool.submitted
    assert result_of(storage.delete("a/b/c")) is None
    assert pool.submitted == before + 1
    assert not storage.exists("a/b/c")
    # The emptied directory is pruned, the non-empty parent kept.
    assert not os.path.exists(os.path.join(storage.root, "a", "b"))
    assert os.path.isdir(os.path.join(storage.root, "a"))
    result_of(storage.delete("a/d"))
    assert not os.path.exists(os.path.join(storage.root, "a"))
    result_of(storage.delete("e"))
    assert os.path.isdir(storage.root)
    assert result_of(storage.list()) == []
    failure_of(storage.delete("e")).trap(FileNotFoundError)


def test_delete_without_pruning(storage):
    _fill(storage, ["a/b/c"])
    result_of(storage.delete("a/b/c", prune=False))
    assert not storage.exists("a/b/c")
    assert os.path.isdir(os.path.join(storage.root, "a", "b"))


def test_commit_survives_directories_pruned_while_it_makes_them(storage, monkeypatch):
    from harmony.storage import filesystem

    real = filesystem._makedirs
    calls = []

    def racing(path, stop):
        # A concurrent delete prunes a parent between two mkdirs, twice.
        calls.append(path)
        if len(calls) <= 2:
            raise FileNotFoundError(path)
        return real(path, stop)

    monkeypatch.setattr(filesystem, "_makedirs", racing)
    writer = storage.open_writer()
    writer.write(b"data")
    stored = result_of(writer.commit("x/y/z"))
    assert len(calls) == 3
    with open(stored.path, "rb") as f:
        assert f.read() == b"data"


def test_delete_tree(storage, pool):
    _fill(storage, ["area/x/1", "area/x/2", "area/y/3", "keep/z/4", "p/q/area2/5"])
    before = pool.submitted
    assert result_of(storage.delete_tree("area")) is None
    assert pool.submitted == before + 1
    assert result_of(storage.list()) == ["keep/z/4", "p/q/area2/5"]
    # Missing: nothing to do.
    assert result_of(storage.delete_tree("area")) is None
    # Parents left empty are pruned, the root kept.
    result_of(storage.delete_tree("p/q/area2"))
    assert not os.path.exists(os.path.join(storage.root, "p"))
    assert os.path.isdir(storage.root)
    with pytest.raises(ValueError):
        storage.delete_tree("../outside")


def test_write_after_prune(storage):
    _fill(storage, ["a/b/c"])
    writer = storage.open_writer("a/b/d")
    writer.write(b"x")
    result_of(storage.delete("a/b/c"))  # prunes a/b and a
    result_of(writer.commit())  # recreates them
    assert storage.exists("a/b/d")


# -- temp areas --------------------------------------------------------------------


def test_temp_area(storage):
    path = storage.temp_area("jmix-build")
    assert path == os.path.join(storage.root, TEMP_DIR, "jmix-build")
    assert os.path.isdir(path)
    assert storage.temp_area("jmix-build") == path
    with open(os.path.join(path, "part"), "wb") as f:
        f.write(b"x")
    # Never listed, and on the same filesystem as the store.
    assert result_of(storage.list()) == []
    assert os.stat(path).st_dev == os.stat(storage.root).st_dev


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".w-x", "a b", "x" * 65, None, "é"])
def test_temp_area_bad_names(storage, name):
    with pytest.raises(ValueError):
        storage.temp_area(name)


def test_discard(storage, pool):
    _fill(storage, ["a/b/c"])
    before = pool.submitted
    storage.discard("a/b/c")
    assert pool.submitted == before  # on the calling thread
    assert not storage.exists("a/b/c")
    assert os.path.isdir(os.path.join(storage.root, "a", "b"))
    with pytest.raises(FileNotFoundError):
        storage.discard("a/b/c")
    with pytest.raises(ValueError):
        storage.discard("../x")
