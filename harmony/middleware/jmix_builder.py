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
     C-MOVE per its C{dimse_retrieve_mode}); each instance, as it arrives,
     is linked (or copied) out of the retrieve's spool into a staging area
     of the store; then the package is built and zipped in a thread
     (L{harmony.jmix.package.build_package}: the study is never held in
     memory), indexed, and its zip is the answer.

A study the PACS does not have is a 404; a PACS that cannot be reached a
502 (504 when too slow); waiting requests get the same answer.

Options: C{sender_name} (default C{"Harmony"}), C{sender_id} (default the
C{[proxy] id}), C{sender_contact}, C{classification} (manifest
C{security.classification}).
"""

import os
import shutil
import weakref

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.config.schema import Field, Schema, Str
from harmony.dimse import status as dimse_status
from harmony.envelope import DicomRequest
from harmony.errors import NotFound, UpstreamUnavailable, as_harmony_error
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.streams import EOF

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
        request = DicomRequest("get", query_model="study", level="STUDY", identifier=identifier)
        envelope.dicom = request
        envelope.metadata["jmix_building"] = "true"
        key = id(request)
        self._builds[key] = build
        # A request that never reaches the response hook (its client went
        # away, the pipeline was cancelled) must not leave the requests
        # waiting for its build hanging.
        weakref.finalize(request, self._abandoned, key, build)
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
        if response.dicom is None:
            # The PACS could not be asked: the waiters get the same error.
            error = response.metadata.get("error")
            build.done.errback(UpstreamUnavailable(f"The package could not be built ({error or 'PACS error'})"))
            return None
        d = defer.Deferred.fromCoroutine(self._build(build, response.dicom))

        def built(record):
            build.done.callback(record)
            from harmony.endpoints.jmix import zip_response

            return zip_response(record)

        def failed(failure):
            build.done.errback(failure)
            return failure

        return d.addCallbacks(built, failed)

    async def _build(self, build, result):
        from harmony.jmix.package import Party, build_package

        store = build.store
        pool = self._reactor.getThreadPool()
        # Locked while in use: no worker's clean-up removes it.
        area = await threads.deferToThreadPool(self._reactor, pool, store.open_work_area, "staging")
        staging = area.path
        files = []
        try:
            while True:
                instance = await result.instances.read()
                if instance is EOF:
                    break
                target = os.path.join(staging, f"{len(files)}.dcm")
                try:
                    await threads.deferToThreadPool(self._reactor, pool, _link_or_copy, instance.path, target)
                finally:
                    if instance.dispose is not None:
                        instance.dispose()
                files.append(target)
            status, _ = await result.done
            if not files:
                if dimse_status.is_failure(status) and result.failed:
                    raise UpstreamUnavailable("The PACS failed to retrieve the study")
                raise NotFound("The PACS has no such study")
            name, sender_id, contact = self._sender
            info = await threads.deferToThreadPool(
                self._reactor, pool, lambda: build_package(
                    files, store.root, sender=Party(name, sender_id, contact), requester=Party(*build.requester),
                    skip_hashing=build.skip_hashing, skip_listing=build.skip_listing,
                    classification=self.options.classification or None,
                ),
            )
            await store.add(info)
            record = await store.get(info.id)
            if record is None:
                raise UpstreamUnavailable("The package was built but could not be stored")
            log.info("JMIX package built: {count} instances", count=info.instance_count)
            return record
        finally:
            await threads.deferToThreadPool(self._reactor, pool, area.remove)


def _link_or_copy(source, target):
    """
    A hard link to C{source} (the spooled instance: no copy), or a copy
    when the store is on another filesystem.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
