# -*- test-case-name: tests.unit.test_storage -*-
"""
The storage contract (to be merged into L{harmony.interfaces} by the lead).

Relative paths ("relpaths") are C{/}-separated, relative to the storage
root; an absolute path, a C{..} or empty component, a NUL byte, a
backslash or the reserved first component C{.tmp} raises C{ValueError}
synchronously (before any work is done), from every method.
"""

import attr
from zope.interface import Attribute, Interface


@attr.s(frozen=True, slots=True)
class StoredObject:
    """
    What a completed write produced.

    @ivar path: the absolute filesystem path (C{None} for non-filesystem
        backends).
    @ivar relpath: the relpath it was stored under.
    @ivar size: its size in bytes.
    @ivar sha256: the hex SHA-256 of the content when it was asked for,
        else C{None}.
    """

    path = attr.ib()
    relpath = attr.ib()
    size = attr.ib()
    sha256 = attr.ib(default=None)


class IStorageWriter(Interface):
    """
    An object being written: chunks go into a private temporary file which
    becomes visible under its relpath only on L{commit}.
    """

    relpath = Attribute("The relpath the object will be stored under (C{None} until known).")
    size = Attribute("Bytes written so far.")

    def write(chunk):
        """
        Append C{chunk} (bytes-like).  Synchronous: a small sequential write
        into the page cache (allowed on the reactor thread).

        @raise RuntimeError: after L{commit} or L{abort}.
        """

    def commit(relpath=None):
        """
        Finish, storing under C{relpath} when given (it overrides the one
        given to C{open_writer}; an invalid one raises C{ValueError} and
        leaves the writer open), or else under the one given to
        C{open_writer} (C{ValueError} if there was none): fsync in the storage's thread pool when the writer was
        opened with C{fsync=True}, then atomically rename into place
        (replacing an existing object).  Cancelling the returned Deferred
        removes the temporary file, and the stored object too if the rename
        had already happened.  On failure the temporary file is removed.

        @return: Deferred[L{StoredObject}]
        """

    def abort():
        """
        Give up: close and remove the temporary file.  Idempotent; a no-op
        after a successful commit.

        @return: None
        """


class IStorage(Interface):
    """
    The only code that writes files: atomic write-from-stream (temp +
    rename), read, list, delete, temp areas, optional fsync.
    """

    def write_stream(relpath, source, fsync=False, sha256=False):
        """
        Store C{source} atomically under C{relpath}: a reader of the final
        path sees either nothing (or the previous object) or the complete
        new one, never a partial file.

        @param source: C{bytes} or a L{harmony.streams.Stream} of byte
            chunks (read as it produces; memory stays bounded).
        @param fsync: make the content and the rename durable before the
            Deferred fires (the fsyncs run in the thread pool).
        @param sha256: compute the SHA-256 of the content.
        @return: Deferred[L{StoredObject}].  A failing source, or
            cancelling the Deferred (which cancels the source stream),
            leaves no temporary file behind.
        """

    def open_writer(relpath=None, fsync=False, sha256=False):
        """
        Start writing an object chunk by chunk (the C-STORE SCP writes PDV
        fragments straight into it as they arrive).  C{relpath} may be
        left out and given to C{commit} instead: the SCP can start writing
        before the tag walk has found the Study/Series UIDs.

        @return: an L{IStorageWriter}.
        """

    def read(relpath, chunk_size=65536):
        """
        Read a stored object lazily.

        @return: a L{harmony.streams.Stream} of byte chunks (with C{length}
            set); it fails with C{FileNotFoundError} on the first read when
            there is no such object.
        """

    def exists(relpath):
        """
        @return: C{bool} (synchronous: one C{stat}).
        """

    def list(prefix=""):
        """
        Every stored relpath starting with C{prefix} (a plain string prefix,
        as in object stores: C{"1.2/3"} matches C{"1.2/3/x.dcm"} and
        C{"1.2/34/y.dcm"}), sorted; temporary files and areas excluded.

        @return: Deferred[list of str]
        """

    def delete(relpath, prune=True):
        """
        Remove a stored object (and, with C{prune}, the directories it
        leaves empty).

        @return: Deferred[None]; fails with C{FileNotFoundError} when there
            is no such object.
        """

    def discard(relpath):
        """
        Remove a stored object at once, on the calling thread, leaving its
        directories (a single unlink).

        @raise FileNotFoundError: there is no such object.
        """

    def delete_tree(relpath):
        """
        Remove a directory and everything under it (nothing to do when it
        does not exist), e.g. the spool area of a finished retrieve.

        @return: Deferred[None]
        """

    def temp_area(name):
        """
        A private temporary directory under the storage root (created when
        needed), on the same filesystem so that files made there can be
        renamed into place.  C{name} is one path component of
        C{[A-Za-z0-9_-]}.

        @return: its absolute path (str).
        """
