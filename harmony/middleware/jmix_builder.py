# -*- test-case-name: tests.unit.test_jmix_builder -*-
"""
C{jmix_builder}: JMIX packages built from a PACS on demand.

In a pipeline of a C{jmix} endpoint and a C{dicom_scu} backend, for the
endpoint's query route (C{GET api/jmix?studyInstanceUid=UID}):

  1. the newest stored package of the study answers at once (the PACS is
     not asked);
  2. else, when another request is building that study's package, this one
     waits for it and gets the same package (one build per study at a
     time, L{harmony.jmix.store.PackageStore.build_once}; with several
     worker processes, also when the other request is in another worker:
     this one waits for that worker's build lock, then answers with the
     package it stored, or builds when that build failed);
  3. else this request builds it: the backend retrieves the study (C-GET or
     C-MOVE per its C{dimse_retrieve_mode}) and each instance, as it
     arrives, is added to the package's zip
     (L{harmony.jmix.package.PackageBuilder.add}: its UIDs checked, its
     SHA-256 and CRC-32 computed in one read, its zip entry written), in
     arrival order, while the retrieve goes on; then each is disposed of
     (its memory or spooled copy given back).  Once the retrieve has ended,
     the builder writes the JSON documents and the central directory
     (L{harmony.jmix.package.PackageBuilder.finish}, in the reactor's
     thread pool), the zip is moved from the build's staging area into the
     store and indexed.

Where an instance is added: an instance the retrieve holds in memory, of
at most L{INLINE_MAX} bytes, whose UIDs it read (the usual case: the
C{dicom_scu} backend's memory budget), is added on the reactor thread, in
the turn after the one that received it (so its C-STORE-RSP has gone out
and the PACS sends the next instance meanwhile), L{INLINE_TURN} bytes per
turn at most: hashing and appending it to the zip in the page cache take
about a millisecond per MiB, like the C-STORE SCP's own streamed writes
(rule 1 of the house: "small sequential writes of streamed chunks into the
page cache may stay on the reactor thread when a benchmark shows that is
faster").  Measured with C{bench/jmix.py}'s study (200 x 512 KiB), A/B
against the thread pool for every instance: build medians 0.381 -> 0.358 s
with Harmony on one core (CPU 0.375 -> 0.350 s: no thread hand-over and
GIL exchange per instance), 0.432 -> 0.394 s on two.  Anything else (a spooled file, which must be read; a larger
instance; one whose UIDs must still be read, perhaps by pydicom) is added
in the thread pool, the instances that arrive meanwhile handed over
together (L{BATCH} at most).  Either way one batch is added at a time, in
arrival order.

Streaming: for a C{GET}, the building request's answer (C{200}, chunked,
no C{Content-Length}) starts as soon as the first instance is in the zip,
and the zip goes out as it is written (L{_ZipTail}: what is written is
final, read back from the page cache on the reactor thread in chunks of
512 KiB, as a stored zip is served); the central directory goes out last,
once the package is in the store, so a client that got the whole zip got a
stored package.  A build that fails after the answer started cannot change
its status any more: the connection is aborted (the client sees a
truncated chunked body, never a zip that looks complete), the failure is
logged and the waiters get the error.  A build that fails before (the
study is not on the PACS, the PACS cannot be reached, the first instance
cannot be packaged) is an error answer as usual.  A C{HEAD} waits for the
finished package (its C{Content-Length} is then known).  A client that goes
away does not stop the build: the waiters, and the next requests, get the
package.  Requests waiting for another request's build get the stored
package once it is built.  Memory stays bounded: the instances are files,
the zip goes out through a bounded stream (paused while the client is
slow; the zip is on disk), and at most L{MAX_QUEUED} instances wait to be
added (then the retrieve's stream is not read, which pauses the
retrieve).

A study the PACS does not have is a 404; a PACS that cannot be reached a
502 (504 when too slow); instances that cannot be packaged (not DICOM,
another study, bad or duplicate UIDs) a 502; waiting requests get the same
answer.

Options: C{sender_name} (default C{"Harmony"}), C{sender_id} (default the
C{[proxy] id}), C{sender_contact}, C{classification} (manifest
C{security.classification}).
"""

import os
import weakref
from collections import deque

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.config.schema import Field, Schema, Str
from harmony.dimse import status as dimse_status
from harmony.envelope import DicomRequest, ResponseEnvelope
from harmony.errors import HarmonyError, NotFound, UpstreamUnavailable, as_harmony_error
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.streams import EOF, Stream, StreamCancelled

log = logger("harmony.middleware.jmix_builder")

OPTIONS = Schema(
    {
        "sender_name": Field(Str(nonempty=True), "Harmony", "manifest sender name"),
        "sender_id": Field(Str(), "", "manifest sender id (default: the [proxy] id)"),
        "sender_contact": Field(Str(), "", "manifest sender contact"),
        "classification": Field(Str(), "", "manifest security.classification"),
    }
)


#: What C{start} hands over when a request is the one that builds.
_LEADER = object()

#: Instances waiting to be added at most (then the retrieve's stream is
#: left unread, which pauses the retrieve).
MAX_QUEUED = 64
#: Instances handed to the thread pool in one call at most.
BATCH = 16
#: An instance held in memory up to this size (whose UIDs the retrieve
#: read) is added on the reactor thread...
INLINE_MAX = 1 << 20
#: ... and this many bytes of them at most per reactor turn (at least one
#: instance).
INLINE_TURN = 1 << 20
#: The streamed zip: bytes read back per chunk, and buffered at most
#: before the reading pauses (until the client has taken them).
TAIL_CHUNK = 512 * 1024
TAIL_HIGH_WATER = 1024 * 1024


class _Build:
    """
    What the building request's response hook needs.
    """

    def __init__(self, store, study, skip_hashing, skip_listing):
        self.store = store
        self.study = study
        self.skip_hashing = skip_hashing
        self.skip_listing = skip_listing
        self.requester = ("unknown", "unknown")
        self.done = defer.Deferred()
        #: The finalizer that fails C{done} if the request never reaches
        #: the response hook.
        self.abandoned = None


@implementer(IMiddleware)
class JmixBuilder:
    """
    Serves or builds the package of the study a JMIX query names.
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.options = options
        self._reactor = getattr(context, "reactor", None)
        config = getattr(context, "config", None)
        proxy_id = config.proxy.id if config is not None else "harmony"
        self._sender = (options.sender_name, options.sender_id or proxy_id, options.sender_contact or None)
        # id(DicomRequest) -> _Build of the requests building a package.
        self._builds = {}

    def request(self, envelope):
        if envelope.metadata.get("jmix_action") != "build":
            return None
        return defer.Deferred.fromCoroutine(self._request(envelope))

    async def _request(self, envelope):
        from harmony.endpoints.jmix import store_for, zip_response

        meta = envelope.metadata
        store = store_for(meta["jmix_store"], self._reactor)
        await store.ready
        study = meta["jmix_study_uid"]
        record = await store.newest_for_study(study)
        if record is not None:
            return zip_response(record)
        build = _Build(store, study, meta.get("jmix_skip_hashing") == "true", meta.get("jmix_skip_listing") == "true")
        # Who asked (the manifest's requester): the authenticated user, else
        # the client's address.
        client = envelope.details.client[0] if envelope.details.client else None
        who = meta.get("auth.user") or client or "unknown"
        build.requester = (who, who)
        # Whether this request builds is known when the store calls start
        # (at once, or later: once the study's build lock was taken, perhaps
        # after another worker's build failed) or when the outcome comes
        # without it (another request's build, here or in another worker).
        decided = defer.Deferred()

        def start():
            if not decided.called:
                decided.callback(_LEADER)
            return build.done

        def settled(result):
            if not decided.called:
                if isinstance(result, Failure):
                    decided.errback(result)
                else:
                    decided.callback(result)
            # This request's own build: failures reach the waiters through
            # build.done and its own response.
            return None

        outcome = store.build_once(study, start)
        outcome.addBoth(settled)
        try:
            record = await decided
        except defer.CancelledError:
            outcome.cancel()  # no longer waiting: start will not be called
            raise
        except Exception as e:
            raise as_harmony_error(e)
        if record is not _LEADER:
            # Another request built it (here or in another worker).
            return zip_response(record)
        # This request builds: the backend retrieves the study.
        from pydicom.dataset import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        # Instances may come from memory: each is added, then disposed of.
        request = DicomRequest(
            "get", query_model="study", level="STUDY", identifier=identifier, accept_in_memory=True
        )
        envelope.dicom = request
        envelope.metadata["jmix_building"] = "true"
        key = id(request)
        self._builds[key] = build
        # A request that never reaches the response hook (its client went
        # away, the pipeline was cancelled) must not leave the requests
        # waiting for its build hanging.
        build.abandoned = weakref.finalize(request, self._abandoned, key, build)
        return None

    def _abandoned(self, key, build):
        self._builds.pop(key, None)
        if not build.done.called:
            build.done.errback(UpstreamUnavailable("The package build was abandoned"))

    def response(self, envelope, response):
        if envelope.metadata.get("jmix_building") != "true" or envelope.dicom is None:
            return None
        build = self._builds.pop(id(envelope.dicom), None)
        if build is None:
            return None
        if build.abandoned is not None:
            build.abandoned.detach()  # reached: the build ends however the request does
        if response.dicom is None:
            # The PACS could not be asked: the waiters get the same error.
            error = response.metadata.get("error")
            build.done.errback(UpstreamUnavailable(f"The package could not be built ({error or 'PACS error'})"))
            return None
        # A GET gets the zip as it is written; a HEAD the finished package.
        streaming = getattr(envelope.details, "method", "GET") != "HEAD"
        answer = _Answer(streaming)
        d = defer.Deferred.fromCoroutine(self._build(build, response.dicom, answer))

        def built(record):
            if not build.done.called:
                build.done.callback(record)
            answer.built(record)

        def failed(failure):
            error = _public_error(failure)
            if not build.done.called:
                build.done.errback(error)
            answer.failed(error)

        d.addCallbacks(built, failed).addErrback(
            lambda f: log.failure("Answering a JMIX package build failed", f)
        )
        return answer.deferred

    async def _build(self, build, result, answer):
        from harmony.jmix.package import PackageBuilder, Party

        store = build.store
        reactor, pool = self._reactor, self._reactor.getThreadPool()

        def in_thread(f, *args):
            return threads.deferToThreadPool(reactor, pool, f, *args)

        instances = result.instances
        # Locked while in use: no worker's clean-up removes it.  The zip is
        # written here, then moved into the store when complete.
        area = await in_thread(store.open_work_area, "staging")
        builder = queue = None
        placed = None
        try:
            name, sender_id, contact = self._sender
            builder = await in_thread(lambda: PackageBuilder(
                os.path.join(area.path, "package.zip"), sender=Party(name, sender_id, contact),
                requester=Party(*build.requester), skip_hashing=build.skip_hashing,
                skip_listing=build.skip_listing, classification=self.options.classification or None,
            ))
            answer.builder = builder
            # A failed instance stops the retrieve (the read below ends).
            def add(items, done, stopped, inline):
                if inline:
                    # In the reactor's next turn: this one sends the C-STORE-RSP.
                    return task.deferLater(reactor, 0, _add_all, builder, items, done, stopped)
                return in_thread(
                    _add_all, builder, items, lambda i, committed: reactor.callFromThread(done, i, committed), stopped
                )

            queue = _InstanceQueue(add, answer.written, instances.cancel, inline=_inline)
            while queue.failure is None:
                try:
                    instance = await instances.read()
                except StreamCancelled:
                    if queue.failure is None:
                        raise
                    break
                if instance is EOF:
                    break
                queue.put(instance)
                if len(queue) > MAX_QUEUED:
                    await queue.wait(MAX_QUEUED // 2)
            await queue.wait(0)
            if queue.failure is not None:
                queue.failure.raiseException()
            status, _ = await result.done
            if not queue.added:
                if dimse_status.is_failure(status) and result.failed:
                    raise UpstreamUnavailable("The PACS failed to retrieve the study")
                raise NotFound("The PACS has no such study")
            info = await in_thread(_finish, builder, store)
            placed = info.zip_path
            # The JSON documents may go; the central directory waits for the index.
            answer.written(builder.entries_end)
            await store.add(info)
            record = await store.get(info.id)
            if record is None:
                raise UpstreamUnavailable("The package was built but could not be stored")
            placed = None
            log.info("JMIX package built: {count} instances", count=info.instance_count)
            return record
        except BaseException:
            if queue is not None:
                queue.cancel()
                await queue.wait(0)
            instances.cancel()
            if placed is not None:
                await in_thread(_remove_quietly, placed)
            raise
        finally:
            if builder is not None:
                await in_thread(builder.abort)  # nothing when the zip was moved into the store
            await in_thread(area.remove)


def _finish(builder, store):
    """
    Finish the package and move its zip into the store (in a thread).
    """
    import attr

    from harmony.jmix.package import place

    info = builder.finish()
    target = store.zip_for(info.id)
    place(info.zip_path, target)
    return attr.evolve(info, zip_path=target)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _public_error(failure):
    """
    The error a failed build answers with (and logs, without patient data).
    """
    if failure.check(HarmonyError, defer.CancelledError):
        return failure.value
    if failure.check(ValueError):
        # Bad instances from the PACS; the reasons name no UID.
        log.warn("JMIX package build failed: {reason}", reason=str(failure.value))
        return UpstreamUnavailable("The PACS sent instances that cannot be packaged")
    if failure.check(OSError):
        # Not the exception's text: it may carry a spooled file's path.
        log.error("JMIX package build failed: {error} ({reason})", error=type(failure.value).__name__,
                  reason=failure.value.strerror or "")
    else:
        log.error("JMIX package build failed: {error}", error=type(failure.value).__name__)
    return as_harmony_error(failure)


class _InstanceQueue:
    """
    Adds retrieved instances to the package in arrival order, a batch at a
    time: whatever has arrived while the previous batch was being added.
    Consecutive instances that C{inline(instance)} accepts make a batch of
    at most L{INLINE_TURN} bytes (at least one instance), added on the
    reactor thread; the others a batch of at most L{BATCH} instances, added
    in the thread pool in one call, so the thread does not wait for the
    reactor between two instances.

    C{add(items, done, stopped, inline)} adds C{items}, a list of C{(path
    or bytes, the UIDs the retrieve read or None)}, one after the other (in
    a thread unless C{inline}), calls C{done(i, committed size of the zip)}
    once item C{i} is in (on the reactor thread: the caller arranges it),
    stops early when C{stopped()} is true, and returns a Deferred that fires
    once it has stopped (its failure: the first item that could not be
    added).  Each instance is disposed of as soon as it is in (its memory
    given back to the retrieve), the others of a batch when the batch ends.
    After a failure the instances still queued are only disposed of.

    @ivar added: how many instances were added.
    @ivar failure: the first failure, or C{None}.
    """

    def __init__(self, add, on_added, on_failed, inline=lambda instance: False):
        self._add = add
        self._on_added = on_added
        self._on_failed = on_failed
        self._inline = inline
        self._queue = deque()
        #: The batch being added: its instances, each C{None} once added.
        self._batch = None
        self._in_flight = 0
        self._dispatching = False
        self._waiters = []
        self.added = 0
        self.failure = None

    def __len__(self):
        return len(self._queue) + self._in_flight

    def put(self, instance):
        self._queue.append(instance)
        self._dispatch()

    def cancel(self):
        """
        Add nothing more (what is queued is disposed of; a batch being
        added stops after its current instance).
        """
        if self.failure is None:
            self.failure = Failure(defer.CancelledError())
        self._dispatch()

    def wait(self, most):
        """
        @return: a Deferred firing once at most C{most} instances are queued
            or being added.
        """
        if len(self) <= most:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((most, d))
        return d

    def _stopped(self):
        # Read by the thread between two instances.
        return self.failure is not None

    def _dispatch(self):
        # A loop, not recursion, when a batch ends at once.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue and self._batch is None:
                if self.failure is not None:
                    _dispose(self._queue.popleft())
                    continue
                inline, batch = self._take()
                self._batch, self._in_flight = batch, len(batch)
                items = [(_source(instance), instance.uids) for instance in batch]
                d = defer.maybeDeferred(self._add, items, self._added, self._stopped, inline)
                d.addBoth(self._ended, batch)
        finally:
            self._dispatching = False
        self._wake()

    def _take(self):
        """
        The next batch: C{(inline, instances)}.
        """
        queue = self._queue
        inline = self._inline(queue[0])
        batch = [queue.popleft()]
        if inline:
            size = len(batch[0].data)
            while queue and self._inline(queue[0]) and size + len(queue[0].data) <= INLINE_TURN:
                size += len(queue[0].data)
                batch.append(queue.popleft())
        else:
            while queue and len(batch) < BATCH and not self._inline(queue[0]):
                batch.append(queue.popleft())
        return inline, batch

    def _wake(self):
        waiting, self._waiters = self._waiters, []
        for most, d in waiting:
            if len(self) <= most:
                d.callback(None)
            else:
                self._waiters.append((most, d))

    def _added(self, i, committed):
        instance, self._batch[i] = self._batch[i], None
        self._in_flight -= 1
        _dispose(instance)
        if self.failure is None:
            self.added += 1
            self._on_added(committed)
        self._wake()

    def _ended(self, result, batch):
        self._batch, self._in_flight = None, 0
        for instance in batch:
            if instance is not None:
                _dispose(instance)
        if isinstance(result, Failure) and self.failure is None:
            self.failure = result
            self._on_failed()
        self._dispatch()


def _inline(instance):
    """
    Whether an instance may be added on the reactor thread: held in memory,
    at most L{INLINE_MAX} bytes, its UIDs read by the retrieve (no header
    to parse).
    """
    return (
        instance.path is None
        and instance.uids is not None
        and _source(instance) is not None
        and len(instance.data) <= INLINE_MAX
    )


def _source(instance):
    """
    What L{harmony.jmix.package.PackageBuilder.add} takes for a retrieved
    instance: its file, or its bytes; C{None} when it has neither.
    """
    if instance.path is not None:
        return instance.path
    if isinstance(instance.data, (bytes, bytearray, memoryview)):
        return instance.data
    return None


def _add_all(builder, items, done, stopped):
    """
    Add C{items} to the package (in a thread, or on the reactor thread for
    an inline batch; see L{_InstanceQueue}).
    """
    for i, (source, uids) in enumerate(items):
        if stopped():
            return
        if source is None:
            raise ValueError("a retrieved instance is neither a stored file nor in memory")
        done(i, builder.add(source, uids))


def _dispose(instance):
    if instance.dispose is not None:
        try:
            instance.dispose()
        except Exception as e:
            # Not the exception's text: it may carry the spooled file's path.
            log.error("Disposing of a retrieved instance failed: {error}", error=type(e).__name__)


class _Answer:
    """
    The building request's answer: for a GET, a streaming zip response
    (fired once the first instance is in the zip), else the stored package
    once built; or the build's error, while nothing was sent.

    @ivar deferred: fires with the L{ResponseEnvelope}.
    @ivar builder: the L{harmony.jmix.package.PackageBuilder}, once made.
    """

    def __init__(self, streaming):
        self.streaming = streaming
        self.deferred = defer.Deferred()
        self.builder = None
        self.tail = None

    def written(self, committed):
        """
        The first C{committed} bytes of the zip are final: answer, or send them.
        """
        if self.tail is None:
            if not self.streaming or self.deferred.called:
                return  # a HEAD, or nobody listens any more
            try:
                self.tail = _ZipTail(self.builder.zip_path)
            except OSError:
                log.warn("Cannot stream a JMIX package being built: it is answered once built")
                self.streaming = False
                return
            self.deferred.callback(
                ResponseEnvelope(
                    status=200,
                    headers=[
                        ("Content-Type", "application/zip"),
                        ("Content-Disposition", f'attachment; filename="{self.builder.id}.zip"'),
                    ],
                    body=self.tail.stream,
                )
            )
        self.tail.advance(committed)

    def built(self, record):
        if self.tail is not None:
            self.tail.advance(record.size, final=True)
        elif not self.deferred.called:
            from harmony.endpoints.jmix import zip_response

            self.deferred.callback(zip_response(record))

    def failed(self, error):
        if self.tail is not None:
            self.tail.fail(UpstreamUnavailable("The package build failed"))
        elif not self.deferred.called:
            self.deferred.errback(error)


@implementer(IPushProducer)
class _ZipTail:
    """
    Streams a zip while it is written: L{advance} says how much of it is
    final; that much is read back (from the page cache, on the reactor
    thread, L{TAIL_CHUNK} at a time) into L{stream} while its consumer keeps
    up (the stream pauses this producer above L{TAIL_HIGH_WATER}).  The
    file is opened at once, so it is read even after being moved.

    @ivar stream: the response body.
    """

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.stream = Stream(high_water=TAIL_HIGH_WATER)
        self._sent = 0
        self._limit = 0
        self._final = False
        self._paused = False
        self._pumping = False
        #: Taken as a file by the response writer (sendfile): nothing is
        #: read into the stream; L{wait} says when more is final.
        self._taken = False
        self._waiters = []
        self._failure = None
        self.stream.attach_producer(self)
        self.stream.offer_file(self)

    # -- as a file source (harmony.streams.Stream.take_file) --------------------

    def open(self):
        if self._sent or self._fd is None or self._failure is not None:
            return False
        self._taken = True
        return True

    def fileno(self):
        return self._fd

    def available(self):
        return self._limit, self._final

    def wait(self):
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def close(self):
        self._close()

    def _wake(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(None)

    # -- as the stream's producer ------------------------------------------------

    def advance(self, limit, final=False):
        """
        The first C{limit} bytes are final (with C{final}: the whole zip).
        """
        self._limit = max(self._limit, limit)
        self._final = self._final or final
        if self._taken:
            self._wake()
            return
        self._pump()

    def fail(self, error):
        if self._taken:
            if self._failure is None:
                self._failure = Failure(error)
                self._wake()
            return
        if self._fd is not None:
            self._close()
            self.stream.fail(error)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def stopProducing(self):
        # The client went away; the build goes on.
        self._close()

    def _close(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _pump(self):
        if self._taken:
            return  # the response writer sends from the file itself
        if self._pumping:
            return  # a resume from inside stream.write: the loop below goes on
        self._pumping = True
        try:
            while not self._paused and self._fd is not None and self._sent < self._limit:
                try:
                    data = os.pread(self._fd, min(TAIL_CHUNK, self._limit - self._sent), self._sent)
                except OSError as e:
                    log.error("Reading a JMIX package being built failed: {reason}", reason=e.strerror)
                    data = b""
                if not data:
                    self.fail(UpstreamUnavailable("The package could not be read"))
                    return
                self._sent += len(data)
                self.stream.write(data)
            if self._final and self._fd is not None and self._sent >= self._limit:
                self._close()
                self.stream.finish()
        finally:
            self._pumping = False
