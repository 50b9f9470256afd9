# -*- test-case-name: tests.unit.test_jmix_endpoint -*-
"""
The C{jmix} endpoint service: JMIX packages under C{path_prefix}.

  ===============================================  =============================================
  C{GET|HEAD api/jmix/{id}}                         the package as a zip (C{application/zip},
                                                    C{Content-Disposition: attachment})
  C{GET|HEAD api/jmix/{id}/manifest}                its C{manifest.json}
  C{GET|HEAD api/jmix?studyInstanceUid=UID}         the newest package of that study, built from
                                                    the PACS when there is none (the pipeline's
                                                    C{jmix_builder} middleware and C{dicom_scu}
                                                    backend); C{skip_hashing}, C{skip_listing}
                                                    override the endpoint's options for a build
  C{GET api/jmix?studyInstanceUid=UID} with         the packages of that study, newest first
  C{Accept: application/json}                       (from the store; nothing is built)
  C{POST api/jmix}                                  upload a zip: 201 C{{"id", "status": "stored"}},
                                                    400 invalid (with reasons), 409 the id exists,
                                                    415 not a zip, 413 too big
  ===============================================  =============================================

Packages, their zips and the index live in a L{PackageStore} under
C{store_dir} (default C{<[storage.options] path>/jmix}); every id is a
UUID, so no request names a path.  Uploads are written to a temporary
area of the store, extracted there with zip-slip and size checks,
validated (structure, JSON schemas, hashes), and only then is the zip
moved into place (the extracted copy goes with the temporary area: the
store keeps zips only).

A package being built is streamed to the request that builds it as it is
written (L{harmony.middleware.jmix_builder}); every other answer is a
stored zip.

Options: C{path_prefix} (required), C{store_dir}, C{skip_hashing} and
C{skip_listing} (build defaults, false), C{ttl_secs} and
C{max_store_bytes} (retention: packages older, or the oldest beyond the
size, are removed; default: kept), C{max_body_size} (uploads; default
C{[proxy.content_limits]}), C{max_upload_files} (default 100000).
"""

import os
import re

from twisted.application.service import Service
from twisted.internet import defer, threads

from harmony.config.schema import REQUIRED, Bool, Field, Int, Number, Schema, Str
from harmony.endpoints.http import HttpEndpoint, render_json_error
from harmony.envelope import ResponseEnvelope, media_type
from harmony.errors import BadRequest, Conflict, HarmonyError, NotFound, UnsupportedMediaType
from harmony.http.routing import Route, check_prefix
from harmony.logs import logger
from harmony.streams import Stream

log = logger("harmony.endpoints.jmix")

OPTIONS = Schema(
    {
        "path_prefix": Field(Str(nonempty=True, check=check_prefix), REQUIRED, "URL prefix of the JMIX API"),
        "store_dir": Field(Str(), "", "where packages are kept (default: <storage path>/jmix)"),
        "skip_hashing": Field(Bool(), False, "builds: files.json without hashes"),
        "skip_listing": Field(Bool(), False, "builds: files.json lists metadata.json only"),
        "ttl_secs": Field(Number(min=1), None, "packages older than this are removed"),
        "max_store_bytes": Field(Int(min=1), None, "the oldest packages are removed beyond this size"),
        "max_body_size": Field(Int(min=1), None, "bytes: upload limit (default: [proxy.content_limits])"),
        "max_upload_files": Field(Int(min=1), 100000, "entries an uploaded zip may hold"),
    }
)

#: A package id: a UUID, lower case.
PACKAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")

_GET = ("GET", "HEAD", "OPTIONS")

#: One store per directory, shared by the endpoints and jmix_builder
#: middleware of a process.
_STORES = {}


def store_for(root, reactor, ttl_secs=None, max_bytes=None):
    """
    The L{PackageStore} of C{root} (made and started once per process).
    """
    from harmony.jmix.store import PackageStore

    store = _STORES.get(root)
    if store is None:
        store = PackageStore(root, reactor=reactor, ttl_secs=ttl_secs, max_bytes=max_bytes,
                             clock=reactor if hasattr(reactor, "seconds") else None)
        # Starting it removes the work areas crashed processes left behind
        # (those another worker process uses are locked: left alone).
        store.ready = defer.maybeDeferred(store.start)
        _STORES[root] = store
    return store


def classify(method, path, query):
    """
    C{(action, package id)} of a path relative to the prefix, or C{None}.

    @raise BadRequest: a malformed id or study UID.
    """
    segs = path.rstrip("/").split("/") if path else []
    if segs[:2] != ["api", "jmix"]:
        return None
    if len(segs) == 2:
        if method == "POST":
            return "upload", None
        return "query", None
    package_id = segs[2].lower()
    if not PACKAGE_ID.match(package_id):
        raise BadRequest("A package id is a UUID")
    if len(segs) == 3:
        return "package", package_id
    if len(segs) == 4 and segs[3] == "manifest":
        return "manifest", package_id
    return None


def _matches(method, path):
    try:
        found = classify(method, path, {})
    except BadRequest:
        return True
    if found is None:
        return False
    return method in (("POST", "OPTIONS") if found[0] == "upload" else _GET) or (
        found[0] == "query" and method == "POST"
    )


def _flag(values, default, name):
    if not values:
        return default
    value = values[-1].lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false")


def zip_response(record, headers=()):
    """
    The zip of a stored package, streamed from disk.
    """
    body = Stream.from_path(record.zip_path, length=record.size, chunk_size=512 * 1024)
    return ResponseEnvelope(
        status=200,
        headers=[
            ("Content-Type", "application/zip"),
            ("Content-Disposition", f'attachment; filename="{record.id}.zip"'),
            *headers,
        ],
        body=body,
    )


class _StoreOpener(Service):
    """
    Opens a jmix endpoint's package store when Harmony starts (its index,
    and the removal of what crashed processes left) rather than at the
    first request, which then does not wait for it; a store that cannot
    be opened is reported at startup.  Every worker process opens its own.
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def startService(self):
        Service.startService(self)
        endpoint = self.endpoint

        def failed(failure):
            log.error(
                "JMIX endpoint {endpoint}: the package store {root} cannot be opened: {error}",
                endpoint=endpoint.name,
                root=endpoint.store_root,
                error=failure.getErrorMessage(),
            )
            return failure  # the requests that wait for it fail too

        endpoint.store.ready.addErrback(failed)


class JmixEndpoint(HttpEndpoint):
    """
    JMIX packages under C{options.path_prefix}.
    """

    service_type = "jmix"

    def __init__(self, name, options, context=None):
        HttpEndpoint.__init__(self, name, options, context)
        self._reactor = getattr(context, "reactor", None)
        config = getattr(context, "config", None)
        path = options.store_dir or None
        if path is None:
            base = config.storage.options.path if config is not None and config.storage.options else "./tmp"
            path = os.path.join(base, "jmix")
        self.store_root = config.resolve_path(path) if config is not None else os.path.abspath(path)
        self._store = None

    @property
    def store(self):
        if self._store is None:
            options = self.options
            self._store = store_for(self.store_root, self._reactor, options.ttl_secs, options.max_store_bytes)
        return self._store

    def http_routes(self):
        return [Route(self.options.path_prefix, self, None, ("GET", "HEAD", "POST", "OPTIONS"), match=_matches)]

    def services(self, executor, reactor):
        return [_StoreOpener(self)]

    def incoming(self, envelope):
        details = envelope.details
        try:
            found = classify(details.method, details.path, details.query)
        except BadRequest as e:
            return self.render_error(e)
        if found is None:
            return self.render_error(NotFound("No JMIX resource at this path"))
        action, package_id = found
        if details.method == "OPTIONS":
            return ResponseEnvelope(status=204, headers=[("Allow", "GET, HEAD, POST, OPTIONS")])
        if action == "package":
            return self._serve(self._package(package_id))
        if action == "manifest":
            return self._serve(self._manifest(package_id))
        if action == "upload":
            return self._serve(self._upload(envelope))
        return self._query(envelope)

    def _serve(self, coroutine):
        d = defer.Deferred.fromCoroutine(coroutine)

        def failed(failure):
            failure.trap(HarmonyError)
            return self.render_error(failure.value)

        return d.addErrback(failed)

    async def _record(self, package_id):
        store = self.store
        await store.ready
        record = await store.get(package_id)
        if record is None:
            raise NotFound("No such package")
        return record

    async def _package(self, package_id):
        return zip_response(await self._record(package_id))

    async def _manifest(self, package_id):
        record = await self._record(package_id)
        from harmony.jmix.package import read_manifest

        manifest = await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read_manifest,
                                                   record.zip_path)
        return ResponseEnvelope.json(200, manifest)

    def _query(self, envelope):
        details = envelope.details
        studies = details.query.get("studyInstanceUid") or details.query.get("StudyInstanceUID")
        if not studies or not studies[-1]:
            return self.render_error(BadRequest("studyInstanceUid is required"))
        study = studies[-1]
        if len(study) > 64 or not UID.match(study):
            return self.render_error(BadRequest("studyInstanceUid is not a valid DICOM UID"))
        try:
            skip_hashing = _flag(details.query.get("skip_hashing"), self.options.skip_hashing, "skip_hashing")
            skip_listing = _flag(details.query.get("skip_listing"), self.options.skip_listing, "skip_listing")
        except BadRequest as e:
            return self.render_error(e)
        accepts = ",".join(details.headers.get_all("accept"))
        if media_type(accepts.split(",")[0]) == "application/json":
            return self._serve(self._list(study))
        envelope.metadata.update(
            {
                "jmix_action": "build",
                "jmix_study_uid": study,
                "jmix_skip_hashing": "true" if skip_hashing else "false",
                "jmix_skip_listing": "true" if skip_listing else "false",
                "jmix_store": self.store_root,
            }
        )
        # The store is opened before the middleware looks in it.
        store = self.store
        return store.ready.addCallback(lambda _: None)

    async def _list(self, study):
        store = self.store
        await store.ready
        records = await store.list_for_study(study)
        return ResponseEnvelope.json(
            200,
            {
                "packages": [
                    {"id": r.id, "study_uid": r.study_uid, "created": r.created, "size": r.size,
                     "payload_hash": r.payload_hash}
                    for r in records
                ]
            },
        )

    # -- upload -------------------------------------------------------------------

    async def _upload(self, envelope):
        ctype = media_type(envelope.details.headers.get("content-type", ""))
        if ctype not in ("application/zip", "application/x-zip-compressed", "application/octet-stream"):
            raise UnsupportedMediaType("Upload a JMIX package as application/zip")
        store = self.store
        await store.ready
        pool = self._reactor.getThreadPool()
        # Locked while in use: no worker's clean-up removes it.
        area = await threads.deferToThreadPool(self._reactor, pool, store.open_work_area, "upload")
        work = area.path
        try:
            os.makedirs(os.path.join(work, "x"), exist_ok=True)
            zip_path = os.path.join(work, "upload.zip")
            await _write_body(envelope.body, zip_path, self._reactor)
            limit = envelope.content_limits.max_body_size if envelope.content_limits else None
            limit = (limit or 1 << 34) * 20  # uncompressed: at most 20x the upload
            package_id, reasons, root = await threads.deferToThreadPool(
                self._reactor, pool, _check_upload, zip_path, os.path.join(work, "x"), limit,
                self.options.max_upload_files,
            )
            if reasons:
                return render_json_error(BadRequest("Invalid JMIX package: " + "; ".join(reasons[:20])))
            if await store.exists(package_id):
                raise Conflict(f"Package {package_id} exists already")
            info = await threads.deferToThreadPool(self._reactor, pool, _place, root, zip_path, store, package_id)
            await store.add(info)
        finally:
            await threads.deferToThreadPool(self._reactor, pool, area.remove)
        return ResponseEnvelope.json(201, {"id": package_id, "status": "stored"})


#: Upload bytes gathered before one write in the thread pool.
WRITE_BATCH = 4 * 1024 * 1024


async def _write_body(body, path, reactor):
    """
    An upload's body (bytes or a stream) into C{path}: written in the
    reactor's thread pool, a few MiB at a time (an upload can be large).
    """
    pool = reactor.getThreadPool()

    def write(data, mode="ab"):
        with open(path, mode) as f:
            f.write(data)

    await threads.deferToThreadPool(reactor, pool, write, b"", "wb")
    if not isinstance(body, Stream):
        if body:
            await threads.deferToThreadPool(reactor, pool, write, bytes(body))
        return
    batch, size = [], 0
    async for chunk in body:
        batch.append(chunk)
        size += len(chunk)
        if size >= WRITE_BATCH:
            await threads.deferToThreadPool(reactor, pool, write, b"".join(batch))
            batch, size = [], 0
    if batch:
        await threads.deferToThreadPool(reactor, pool, write, b"".join(batch))


def _check_upload(zip_path, dest, max_bytes, max_files):
    """
    Extract and validate (in a thread): C{(package id, reasons, root)}.
    """
    from harmony.jmix.package import read_manifest
    from harmony.jmix.validate import safe_extract, validate_package

    root = safe_extract(zip_path, dest, max_bytes, max_files)
    package_id = os.path.basename(root.rstrip(os.sep)).lower()
    if not PACKAGE_ID.match(package_id):
        return package_id, ["the package directory is not a UUID"], root
    reasons = validate_package(root)
    if not reasons:
        manifest = read_manifest(root)
        if str(manifest.get("id", "")).lower() != package_id:
            reasons = ["manifest id differs from the package directory"]
    return package_id, reasons, root


def _place(root, zip_path, store, package_id):
    """
    Move a validated upload's zip into the store (in a thread); its index
    entry, from the extracted copy at C{root} (which stays in the work area).
    """
    import json

    from harmony.jmix.package import PackageInfo, place

    target = store.zip_for(package_id)
    if os.path.lexists(store.dir_for(package_id)) or os.path.lexists(target):
        raise Conflict(f"Package {package_id} exists already")  # another upload won the race
    try:
        # Never replaces a zip there: when another upload (another thread
        # or worker) moved its zip in since the check, the first one wins.
        place(zip_path, target)
    except FileExistsError:
        raise Conflict(f"Package {package_id} exists already") from None
    with open(os.path.join(root, "payload", "metadata.json"), encoding="utf-8") as f:
        metadata = json.load(f)
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    studies = metadata.get("studies") or {}
    study_uid = studies.get("study_uid") if isinstance(studies, dict) else None
    files = [name for _, _, names in os.walk(os.path.join(root, "payload", "dicom")) for name in names]
    return PackageInfo(
        id=package_id, study_uid=study_uid, zip_path=target,
        payload_hash=(manifest.get("security") or {}).get("payload_hash"), size=os.path.getsize(target),
        instance_count=len(files),
    )
