# -*- test-case-name: tests.unit.test_dicom_scu_retrieve -*-
"""
Retrieving instances from a PACS for the C{dicom_scu} backend, by C-GET or
by C-MOVE to Harmony itself (C{dimse_retrieve_mode}), as one streamed
result: a L{DicomResult} whose C{instances} arrive as the PACS sends them
(each committed to a storage first), whose counts follow the PACS's
pending responses and whose C{done} fires with the final status.

For C-MOVE the PACS sends the instances to our AE title (the backend's
C{local_aet}) at C{incoming_store_port}: either a store SCP this module
runs (for the moves in flight only, or all the time with
C{persistent_store_scp}), or a C{dicom_scp} endpoint of the same gateway
listening on that port.  Each received instance is routed to the move that
asked for it by the Move Originator Message ID of its C-STORE (see
L{harmony.dimse.move.MoveRouter}), never by scanning a directory.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from harmony.dimse import status as dimse_status
from harmony.dimse.association import AssociationAborted, AssociationSettings
from harmony.dimse.pool import release_quietly
from harmony.dimse.scu import GET_MODELS, MOVE_MODELS, DimseTimeout, suboperation_counts
from harmony.envelope import DicomResult
from harmony.errors import BadRequest, UpstreamUnavailable
from harmony.logs import logger
from harmony.storage.dicom import DEFAULT_LAYOUT
from harmony.streams import EOF, Stream, StreamCancelled

log = logger("harmony.backends.dicom_scu")

def update_counts(result, counts):
    """
    Copy sub-operation counts (C{{"remaining": n, "completed": n, ...}},
    see L{harmony.dimse.scu.suboperation_counts}) into a L{DicomResult}
    (those known only).
    """
    for name, value in counts.items():
        if value is not None:
            setattr(result, name, value)


def final_of(outcome, what):
    """
    C{(status, comment)} for how a retrieve operation ended: its final
    L{DimseStatus}, or a failure (timeout, abort) as a failure status.
    """
    if isinstance(outcome, Failure):
        if outcome.check(DimseTimeout):
            return dimse_status.OUT_OF_RESOURCES, f"The PACS did not answer the {what} in time"
        if outcome.check(AssociationAborted):
            return dimse_status.OUT_OF_RESOURCES, f"The PACS aborted the {what}"
        log.failure("A {what} failed", outcome, what=what)
        return dimse_status.PROCESSING_FAILURE, f"The {what} failed"
    return outcome.status, outcome.error_comment


class Retriever:
    """
    Runs C-GETs and C-MOVEs for one backend.

    @param backend: the L{harmony.backends.dicom_scu.DicomScuBackend}
        (options, client and association errors).
    @param router: the gateway's L{harmony.dimse.move.MoveRouter}.
    @param shared_scp: C{True} when a C{dicom_scp} endpoint of the gateway
        listens on C{incoming_store_port} (it routes the moves' instances;
        no listener of our own).
    """

    def __init__(self, backend, router, shared_scp=False):
        self.backend = backend
        self.router = router
        self.shared_scp = shared_scp
        self._listener = None
        self._starting = None
        self._stopping = None
        self._users = 0
        #: The retriever whose store SCP receives this one's moves: itself,
        #: or, for the targets of one backend, the first target's (one
        #: incoming_store_port).
        self.listener_owner = self

    @property
    def options(self):
        return self.backend.options

    # -- one entry point --------------------------------------------------

    def retrieve(self, request, storage, mode=None, dispose=None, layout=DEFAULT_LAYOUT, on_settled=None,
                 memory=None):
        """
        Retrieve what C{request} (a C{DicomRequest}: query model, level,
        identifier, priority, user identity) names.

        @param storage: where the instances are written.
        @param mode: C{"get"} or C{"move"} (default: the backend's
            C{dimse_retrieve_mode}).
        @param dispose: C{instance -> callable} for spooled instances (the
            consumer calls it once done), or C{None} to keep them.
        @param layout: the relpath template of the stored instances.
        @param on_settled: called once the operation has ended and its
            instance stream has been read to its end or cancelled (nothing
            more will be written or delivered: a spool area can go).
        @param memory: a L{harmony.dimse.substore.MemoryBudget}: instances
            that fit are delivered from memory (C{data} bytes, no C{path};
            the consumer must call their C{dispose}), or C{None}.
        @return: Deferred[L{DicomResult}] (streamed: read C{instances}, then
            wait for C{done}); fails with typed upstream errors when the
            PACS cannot be reached.
        """
        mode = mode or self.options.dimse_retrieve_mode
        run = self._get if mode == "get" else self._move
        settle = _Settle(on_settled)
        return defer.Deferred.fromCoroutine(run(request, storage, dispose, layout, settle, memory))

    # -- C-GET --------------------------------------------------------------

    async def _get(self, request, storage, dispose, layout, settle, memory):
        from harmony.backends.dicom_scu import RETRIEVE_SYNTAXES

        options = self.options
        model = request.query_model or "study"
        if model not in GET_MODELS:
            raise BadRequest(f"Unknown query model {model!r}")
        association = await self.backend._associate(
            None,
            connect=lambda: self.backend.client.associate_for_get(
                options.host, options.port, options.aet, RETRIEVE_SYNTAXES, models=(model,),
                user_identity=request.user_identity,
            ),
        )
        try:
            operation = association.get(
                request.identifier, model, request.priority or 0, storage=storage, layout=layout, memory=memory
            )
        except (LookupError, ValueError) as e:
            await release_quietly(association)
            settle.fail()
            raise BadRequest(f"The PACS cannot retrieve this query: {e}")
        result = DicomResult(status=None, done=defer.Deferred())
        operation.on_progress = lambda counts: update_counts(result, counts)
        result.instances = _with_dispose(operation.instances, dispose, settle=settle)

        def ended(outcome):
            if not isinstance(outcome, Failure):
                update_counts(result, suboperation_counts(outcome.fields))
            release_quietly(association)
            settle.operation_ended()
            result.done.callback(final_of(outcome, "retrieve"))

        operation.result.addBoth(ended)
        return result

    # -- C-MOVE to ourselves --------------------------------------------------

    async def _move(self, request, storage, dispose, layout, settle, memory):
        options = self.options
        model = request.query_model or "study"
        if model not in MOVE_MODELS:
            raise BadRequest(f"Unknown query model {model!r}")
        await self.listener_owner._hold_listener()
        incoming = self.router.expect(options.local_aet, storage, layout=layout, source_aet=None, memory=memory)
        try:
            association = await self.backend._associate(
                [(MOVE_MODELS[model], _query_syntaxes())], request.user_identity
            )
        except BaseException as e:
            incoming.fail(e)
            self.listener_owner._drop_listener()
            settle.fail()
            raise
        try:
            operation = association.move(
                request.identifier, options.local_aet, model, request.priority or 0, message_id=incoming.message_id
            )
        except (LookupError, ValueError) as e:
            incoming.fail(e)
            self.listener_owner._drop_listener()
            await release_quietly(association)
            settle.fail()
            raise BadRequest(f"The PACS cannot retrieve this query: {e}")
        # Sub-operations restart the move's DIMSE timer; a slow consumer
        # suspends it; cancelling the instances sends a C-CANCEL.
        incoming.follow(operation)
        result = DicomResult(status=None, done=defer.Deferred())
        operation.on_progress = lambda counts: update_counts(result, counts)
        result.instances = _with_dispose(incoming.instances, dispose, on_cancel=operation.cancel, settle=settle)

        def ended(outcome):
            if isinstance(outcome, Failure):
                incoming.fail(outcome.value)
            else:
                update_counts(result, suboperation_counts(outcome.fields))
                incoming.finish()
            release_quietly(association)
            self.listener_owner._drop_listener()
            settle.operation_ended()
            result.done.callback(final_of(outcome, "retrieve"))

        operation.result.addBoth(ended)
        return result

    async def move_to(self, request, destination):
        """
        A third-party C-MOVE: the PACS sends the instances to
        C{destination} (an AE title it knows); nothing comes back here.

        @return: Deferred[L{DimseStatus}] (its C{fields} carry the counts).
        """
        model = request.query_model or "study"
        if model not in MOVE_MODELS:
            raise BadRequest(f"Unknown query model {model!r}")
        association = await self.backend._associate([(MOVE_MODELS[model], _query_syntaxes())], request.user_identity)
        try:
            operation = association.move(request.identifier, destination, model, request.priority or 0)
        except (LookupError, ValueError) as e:
            await release_quietly(association)
            raise BadRequest(f"The PACS cannot move this query: {e}")
        try:
            return await operation.result
        finally:
            release_quietly(association)

    # -- our store SCP for moves ----------------------------------------------

    async def _hold_listener(self):
        """
        Make sure something listens on C{incoming_store_port} for the move
        about to start (counted until L{_drop_listener}).
        """
        self._users += 1
        if self.shared_scp or self._listener is not None:
            return
        if self._starting is None:
            self._starting = self._start_listener()
        starting = self._starting
        try:
            await _wait(starting)
        except Exception as e:
            self._users -= 1
            log.error(
                "Backend {backend}: cannot listen for C-MOVE instances on port {port}: {error}",
                backend=self.backend.name, port=self.options.incoming_store_port, error=str(e),
            )
            raise UpstreamUnavailable(
                f"Harmony cannot receive C-MOVE instances on port {self.options.incoming_store_port}"
            )
        finally:
            # Started or not: the next move that finds no listener starts
            # one again.
            if self._starting is starting:
                self._starting = None

    def _make_listener(self):
        from harmony.dimse.move import MoveStoreListener

        options = self.options
        return MoveStoreListener(
            self.backend._reactor,
            options.local_aet,
            options.incoming_store_port,
            bind_addr=options.incoming_bind_addr,
            router=self.router,
            storage=self.backend.retrieve_storage(),
            settings=AssociationSettings(
                max_pdu_length=options.max_pdu_length,
                idle_timeout=options.timeout_secs * 2,
                dimse_timeout=options.timeout_secs,
            ),
            tls=getattr(self.backend, "incoming_tls", None),
        )

    def persistent_service(self):
        """
        The store SCP as a service of the application (started with it,
        its port checked at startup): C{persistent_store_scp}.
        """
        self._listener = self._make_listener()
        return self._listener

    def _start_listener(self):
        options = self.options
        listener = self._make_listener()
        # After the previous listener has let the port go.
        stopping, self._stopping = self._stopping, None
        d = defer.Deferred()
        if stopping is not None:
            stopping.addBoth(lambda _: d.callback(None))
        else:
            d.callback(None)
        d.addCallback(lambda _: listener.startService())

        def started(_):
            self._listener = listener
            log.info(
                "Backend {backend}: receiving C-MOVE instances as {aet} on port {port}",
                backend=self.backend.name, aet=options.local_aet, port=options.incoming_store_port,
            )

        d.addCallback(started)
        # Several moves may wait for the same start.
        return _Shared(d)

    def _drop_listener(self):
        self._users -= 1
        if self._users == 0 and not self.options.persistent_store_scp and self._listener is not None:
            listener, self._listener = self._listener, None
            stopping = defer.maybeDeferred(listener.stopService)
            stopping.addErrback(lambda f: log.warn("Stopping the C-MOVE store SCP failed: {error}",
                                                   error=f.getErrorMessage()))
            self._stopping = _Shared(stopping).wait()

    def stop(self):
        if self.options.persistent_store_scp:
            return defer.succeed(None)  # a service of the application
        listener, self._listener = self._listener, None
        if listener is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listener.stopService)


class _Shared:
    """
    One Deferred result several waiters can wait for.
    """

    def __init__(self, d):
        self._result = None
        self._waiters = []
        d.addBoth(self._fire)

    def _fire(self, result):
        self._result = result if isinstance(result, Failure) else (None,)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._deliver(w)
        return None

    def _deliver(self, w):
        if isinstance(self._result, Failure):
            w.errback(self._result)
        else:
            w.callback(None)

    def wait(self):
        w = defer.Deferred()
        if self._result is not None:
            self._deliver(w)
        else:
            self._waiters.append(w)
        return w


async def _wait(shared):
    await shared.wait()


def _query_syntaxes():
    from harmony.dimse.scu import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

    return [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]




def _with_dispose(instances, dispose, on_cancel=None, settle=None):
    """
    The instance stream as given, with C{dispose(instance)} added to
    each instance's C{dispose} when there is one (an instance held in
    memory has its own, giving its bytes back); cancelling it cancels the
    source (and calls C{on_cancel}, e.g. a C-CANCEL for a move).  A
    L{_Settle} is told how the stream ends and which delivered instances
    were disposed of.
    """
    if dispose is None and on_cancel is None and settle is None:
        return instances
    settle = settle or _Settle(None)
    out = Stream(high_water=2)
    out.attach_producer(_SourceControl(instances, on_cancel))

    def disposer(item):
        own = item.dispose
        inner = dispose(item) if dispose is not None else None
        if inner is None:
            return own
        if own is not None:
            inner = _both(own, inner)
        settle.delivered()

        def dispose_once():
            if dispose_once.done:
                return
            dispose_once.done = True
            try:
                d = inner()
            except Exception:
                settle.disposed()
                raise
            # The area goes only once this copy's removal is over.
            if isinstance(d, defer.Deferred):
                d.addBoth(lambda _: settle.disposed())
            else:
                settle.disposed()

        dispose_once.done = False
        return dispose_once

    async def pump():
        cancelled = False
        try:
            while True:
                item = await instances.read()
                if item is EOF:
                    out.finish()
                    return
                item.dispose = disposer(item)
                if out.cancelled:
                    cancelled = True
                    if item.dispose is not None:
                        item.dispose()
                    return
                out.write(item)
                if not out.writable:
                    await out.wait_writable()
        except StreamCancelled:
            cancelled = True
        except Exception:
            out.fail(Failure())
        finally:
            settle.stream_ended(cancelled or out.cancelled)

    defer.ensureDeferred(pump())
    return out


def _both(first, second):
    """
    A dispose calling C{first}, then C{second} (whose result it returns).
    """

    def dispose():
        first()
        return second()

    return dispose


class _Settle:
    """
    Calls C{on_settled} once nothing more will be written or read: the
    operation has ended, and its instance stream was cancelled by the
    consumer, or ended with every instance delivered disposed of (or the
    retrieve could not start).
    """

    def __init__(self, on_settled):
        self._on_settled = on_settled
        self._operation = self._stream = self._cancelled = False
        self._outstanding = 0

    def delivered(self):
        self._outstanding += 1

    def disposed(self):
        self._outstanding -= 1
        self._maybe()

    def operation_ended(self):
        self._operation = True
        self._maybe()

    def stream_ended(self, cancelled):
        self._stream = True
        self._cancelled = cancelled
        self._maybe()

    def fail(self):
        self._operation = self._stream = self._cancelled = True
        self._maybe()

    def _maybe(self):
        if not (self._operation and self._stream):
            return
        if self._outstanding > 0 and not self._cancelled:
            return
        if self._on_settled is not None:
            on_settled, self._on_settled = self._on_settled, None
            on_settled()


class _SourceControl:
    """
    The producer of a wrapped instance stream: stopping it cancels the
    source.
    """

    def __init__(self, source, on_cancel):
        self.source = source
        self.on_cancel = on_cancel

    def pauseProducing(self):
        pass  # the pump waits for room itself

    def resumeProducing(self):
        pass

    def stopProducing(self):
        if self.on_cancel is not None:
            self.on_cancel()
        self.source.cancel()
