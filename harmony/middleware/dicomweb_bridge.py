# -*- test-case-name: tests.unit.test_dicomweb_bridge -*-
"""
C{dicomweb_bridge} (alias C{dicomweb}): DICOMweb requests answered by a
DIMSE PACS through a C{dicom_scu} backend.

It sits in a pipeline whose endpoint is a C{dicomweb} endpoint (which
leaves C{dicomweb_*} metadata on each request) and whose backend is a
C{dicom_scu} backend.  Its request hook turns the DICOMweb request into a
DICOM operation (C{envelope.dicom}); its response hook turns the
backend's L{DicomResult} into the DICOMweb answer:

  - QIDO-RS searches -> C-FIND at the level of the route (STUDY, SERIES,
    IMAGE) with the query's matching keys and the return keys PS3.18
    requires (L{harmony.dicomweb.qido}); matches stream out as a DICOM JSON
    array (or C{multipart/related; type="application/dicom+xml"}) with
    C{RetrieveURL} added; C{offset}/C{limit} are applied here and the
    C-FIND is cancelled (C-CANCEL) once C{limit} matches were sent.  No
    match: C{200 []}, as Orthanc answers.
  - WADO-RS retrieves -> C-GET (or C-MOVE, per the backend's
    C{dimse_retrieve_mode}) at the level asked: a study, a series or one
    instance.  Instances stream out as C{multipart/related;
    type="application/dicom"} parts as they arrive (the first part leaves
    before the last instance is retrieved; each spooled instance is removed
    once sent), so memory stays bounded whatever the study size.
    Transfer syntax: as retrieved unless the client names one; between the
    uncompressed syntaxes, and from compressed ones pydicom can decode to
    Explicit VR Little Endian, Harmony converts; otherwise 406 (when the
    first instance cannot be converted; a later one that cannot is left
    out and logged, since the status line has been sent).
  - Metadata -> the instances are retrieved and read one at a time (large
    values are not loaded) into DICOM JSON with C{BulkDataURI}s
    (C{.../instances/{i}/bulkdata/{tag path}}); a study's metadata is kept
    for C{metadata_cache_secs} and also answers the metadata of its series
    and instances.
  - Frames, rendered, thumbnail, bulk data -> the one instance is
    retrieved and answered from (L{harmony.dicomweb.pixels}); a rendered
    study or series is each instance's first frame, one multipart part
    each; a study's or series' thumbnail is its first instance's (the rest
    of the retrieve is cancelled).
  - STOW-RS -> each C{application/dicom} part is spooled to disk, checked
    (a Part 10 file, of the study in the URL when there is one) and sent
    with C-STORE on one association; the answer is the PS3.18 store
    response dataset: 200 all stored, 202 some failed, 409 none stored
    (C{FailedSOPSequence} with the failure reasons).

A PACS that cannot be reached is a 502 (504 when too slow), never a 200
with an error inside.  Options: C{metadata_cache_secs} (default 300; 0
disables the cache), C{metadata_cache_studies} (default 50),
C{max_stow_instances} (default 1000 parts per STOW-RS request).
"""

import json
import os
import time
import uuid
from collections import OrderedDict
from xml.sax.saxutils import escape as xml_escape

import attr
from twisted.internet import defer, threads
from zope.interface import implementer

from harmony.config.schema import Field, Int, Number, Schema
from harmony.dicomweb import accept, dicomjson, multipart, pixels, qido
from harmony.dimse import status as dimse_status
from harmony.envelope import DicomInstance, DicomRequest, ResponseEnvelope
from harmony.errors import (
    BadRequest,
    NotAcceptable,
    NotFound,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.streams import EOF, Stream, StreamCancelled

log = logger("harmony.middleware.dicomweb_bridge")

OPTIONS = Schema(
    {
        "metadata_cache_secs": Field(Number(min=0), 300.0, "how long a study's metadata is reused (0: no cache)"),
        "metadata_cache_studies": Field(Int(min=1), 50, "studies whose metadata is kept at most"),
        "max_stow_instances": Field(Int(min=1), 1000, "parts a STOW-RS request may carry"),
    }
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNCOMPRESSED = accept.UNCOMPRESSED_TRANSFER_SYNTAXES

DICOM_JSON = "application/dicom+json"

#: QIDO answers up to this size are sent whole (with a Content-Length).
SMALL_ANSWER = 256 * 1024

#: Read size of retrieved instances sent on (fewer, larger writes).
FILE_CHUNK = 512 * 1024

#: STOW-RS failure reasons (PS3.18 Table I.2-? / PS3.4 C-STORE statuses).
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
#: The instance is not of the study named in the URL.
STUDY_MISMATCH = 0xC409

_LEVELS = {"study": "STUDY", "series": "SERIES", "instance": "IMAGE", "frames": "IMAGE"}


@attr.s(slots=True)
class BridgedRequest(DicomRequest):
    """
    A L{DicomRequest} made from a DICOMweb request; C{dicomweb} holds what
    the response hook needs to render the answer.
    """

    dicomweb = attr.ib(default=None, repr=False)


def _in_thread(reactor, fn, *args):
    """
    Run C{fn} in the reactor's thread pool (pixel decoding, parsing and
    encoding), or inline when the reactor has none (unit tests' clocks).
    """
    pool = getattr(reactor, "getThreadPool", None)
    if pool is None:
        return defer.maybeDeferred(fn, *args)
    return threads.deferToThreadPool(reactor, pool(), fn, *args)


def _read_dataset(path, defer_size=None):
    from pydicom import dcmread

    return dcmread(path, defer_size=defer_size)


def _urls(details):
    """
    The public DICOMweb root of a request (public base URL + prefix).
    """
    prefix = details.prefix if details.prefix not in ("", "/") else ""
    return details.base_url.rstrip("/") + prefix


def _study_url(root, study, series=None, instance=None):
    url = f"{root}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if instance:
            url += f"/instances/{instance}"
    return url


class _MetadataCache:
    """
    Study UID -> list of C{(series_uid, sop_instance_uid, json)} for a
    while, the most recently used C{size} studies.
    """

    def __init__(self, clock, ttl, size):
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._entries = OrderedDict()

    def _now(self):
        return self._clock.seconds() if self._clock is not None else time.time()

    def get(self, study):
        entry = self._entries.get(study)
        if entry is None:
            return None
        expiry, items = entry
        if expiry <= self._now():
            del self._entries[study]
            return None
        self._entries.move_to_end(study)
        return items

    def put(self, study, items):
        if self._ttl <= 0:
            return
        self._entries[study] = (self._now() + self._ttl, items)
        self._entries.move_to_end(study)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@implementer(IMiddleware)
class DicomwebBridge:
    """
    DICOMweb in, DIMSE out (see the module docstring).
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.options = options
        self._reactor = getattr(context, "reactor", None)
        self._config = getattr(context, "config", None)
        self.cache = _MetadataCache(self._reactor, options.metadata_cache_secs, options.metadata_cache_studies)
        self._spool = None

    # -- request --------------------------------------------------------------

    def request(self, envelope):
        action = envelope.metadata.get("dicomweb_action")
        if action is None or envelope.details.method == "OPTIONS":
            return None
        if action == "store":
            return defer.Deferred.fromCoroutine(self._store_request(envelope))
        handler = getattr(self, "_request_" + action)
        return handler(envelope, envelope.metadata)

    def _request_search(self, envelope, meta):
        details = envelope.details
        choice = accept.negotiate("search", details.headers.get_all("accept"))
        query = qido.parse_qido(
            meta["dicomweb_resource"], details.query, meta.get("dicomweb_study"), meta.get("dicomweb_series")
        )
        state = _Search(self, query, choice, _urls(details))
        envelope.dicom = BridgedRequest("find", query_model="study", level=query.level,
                                        identifier=query.identifier, dicomweb=state)
        return None

    def _retrieve(self, envelope, meta, state, level=None):
        from pydicom.dataset import Dataset

        level = level or meta["dicomweb_level"]
        ds = Dataset()
        ds.QueryRetrieveLevel = _LEVELS[level]
        ds.StudyInstanceUID = meta["dicomweb_study"]
        if level != "study":
            ds.SeriesInstanceUID = meta["dicomweb_series"]
        if level in ("instance", "frames"):
            ds.SOPInstanceUID = meta["dicomweb_instance"]
        envelope.dicom = BridgedRequest("get", query_model="study", level=ds.QueryRetrieveLevel,
                                        identifier=ds, dicomweb=state)
        return None

    def _request_retrieve(self, envelope, meta):
        choice = accept.negotiate("instances", envelope.details.headers.get_all("accept"))
        return self._retrieve(envelope, meta, _Retrieve(self, choice, meta))

    def _request_metadata(self, envelope, meta):
        details = envelope.details
        choice = accept.negotiate("metadata", details.headers.get_all("accept"))
        state = _Metadata(self, choice, meta, _urls(details))
        cached = self.cache.get(meta["dicomweb_study"])
        if cached is not None:
            return state.from_cache(cached)
        return self._retrieve(envelope, meta, state)

    def _request_frames(self, envelope, meta):
        choice = accept.negotiate("frames", envelope.details.headers.get_all("accept"))
        numbers = pixels.parse_frame_list(meta["dicomweb_frames"])
        if not choice.multipart and len(numbers) != 1:
            raise NotAcceptable("Several frames need multipart/related; type=\"application/octet-stream\"")
        return self._retrieve(envelope, meta, _Frames(self, choice, numbers))

    def _request_rendered(self, envelope, meta, kind="rendered"):
        details = envelope.details
        choice = accept.negotiate(kind, details.headers.get_all("accept"))
        params = pixels.parse_render_params(details.query) if kind == "rendered" else {}
        frame = None
        if meta.get("dicomweb_frames"):
            numbers = pixels.parse_frame_list(meta["dicomweb_frames"])
            if len(numbers) != 1:
                raise BadRequest("Render one frame at a time")
            frame = numbers[0]
        state = _Rendered(self, choice, kind, frame, params, meta.get("dicomweb_level"))
        return self._retrieve(envelope, meta, state)

    def _request_thumbnail(self, envelope, meta):
        return self._request_rendered(envelope, meta, "thumbnail")

    def _request_bulkdata(self, envelope, meta):
        if meta.get("dicomweb_instance") is None:
            raise NotFound("Bulk data is addressed under its instance: .../instances/{uid}/bulkdata/{tag path}")
        choice = accept.negotiate("bulkdata", envelope.details.headers.get_all("accept"))
        return self._retrieve(envelope, meta, _Bulkdata(self, choice, meta["dicomweb_bulkdata"]))

    # -- STOW-RS --------------------------------------------------------------

    def spool(self):
        """
        Where STOW-RS parts wait for their C-STORE:
        C{<storage path>/spool/dicomweb-<name>}.
        """
        if self._spool is None:
            from harmony.storage.filesystem import FilesystemStorage

            config = self._config
            base = config.storage.options.path if config is not None and config.storage.options else "./tmp"
            path = os.path.join(base, "spool", "dicomweb-" + self.name)
            root = config.resolve_path(path) if config is not None else os.path.abspath(path)
            # The reactor's own thread pool: stopped with the reactor.
            pool = getattr(self._reactor, "getThreadPool", None)
            self._spool = FilesystemStorage(root, reactor=self._reactor, threadpool=pool() if pool else None)
            self._spool.startService()
        return self._spool

    async def _store_request(self, envelope):
        details = envelope.details
        ctype = details.headers.get("content-type", "")
        mtype, params = multipart.parse_content_type(ctype)
        inner = multipart.parse_content_type(params.get("type") or "application/dicom")[0]
        if mtype != "multipart/related" or inner != "application/dicom":
            raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom"')
        accept.negotiate("search", details.headers.get_all("accept"))  # the answer is DICOM JSON
        state = _Store(self, _urls(details), envelope.metadata.get("dicomweb_study"))
        try:
            await multipart.read_parts(
                envelope.body, ctype, state.open_part, max_parts=self.options.max_stow_instances
            )
        except BaseException:
            state.cleanup()
            raise
        accepted = state.accepted()
        if not accepted:
            state.cleanup()
            return state.answer([])
        envelope.dicom = BridgedRequest("store", instances=Stream.from_iterable(accepted), dicomweb=state)
        return None

    # -- response ---------------------------------------------------------------

    def response(self, envelope, response):
        state = getattr(envelope.dicom, "dicomweb", None)
        if state is None:
            return None
        if response.dicom is None:
            # An error answer (the PACS unreachable...): nothing to render.
            state.abandon()
            return None
        return defer.Deferred.fromCoroutine(state.render(response.dicom))


class _State:
    def __init__(self, bridge):
        self.bridge = bridge

    @property
    def reactor(self):
        return self.bridge._reactor

    def abandon(self):
        pass


async def _first_instance(result, what):
    """
    The first retrieved instance of C{result}, or raise: 404 when the
    PACS had nothing, 502 when it failed.
    """
    instances = result.instances
    first = await instances.read()
    if first is not EOF:
        return first
    status, comment = await result.done
    if dimse_status.is_failure(status) and result.failed:
        raise UpstreamUnavailable("The PACS could not retrieve the instances")
    raise NotFound(f"No such {what}")


async def _each_dataset(state, result, what, defer_size="64 KB"):
    """
    C{(instance, dataset)} for each retrieved instance, read in a thread
    and disposed of once read.
    """
    first = await _first_instance(result, what)
    instance = first
    while instance is not EOF:
        try:
            ds = await _in_thread(state.reactor, _read_dataset, instance.path, defer_size)
        finally:
            if instance.dispose is not None:
                instance.dispose()
        yield instance, ds
        instance = await result.instances.read()
    await result.done


class _Search(_State):
    def __init__(self, bridge, query, choice, root):
        super().__init__(bridge)
        self._required_keys = None
        self.query = query
        self.choice = choice
        self.root = root

    @property
    def _required(self):
        """
        C{(key, vr)} of the return attributes every match carries (empty
        when the PACS left one out), RetrieveURL aside.
        """
        required = self._required_keys
        if required is None:
            from pydicom.datadict import dictionary_VR, tag_for_keyword

            required = []
            for keyword in self.query.return_keywords:
                tag = tag_for_keyword(keyword)
                if tag is None:
                    try:
                        tag = int(keyword, 16)
                    except ValueError:
                        continue
                if tag in (0x00081190, 0x00080052):
                    continue
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    continue
                required.append((f"{tag:08X}", vr if vr in _PLAIN_VRS else "UN"))
            self._required_keys = required
        return required

    def _prepare(self, value):
        """
        A match's DICOM JSON as QIDO answers it: without Query/Retrieve
        Level, with every return attribute (empty when the PACS had none)
        and its RetrieveURL.
        """
        value.pop("00080052", None)
        missing = [(key, vr) for key, vr in self._required if key not in value]
        if missing:
            for key, vr in missing:
                value[key] = {"vr": vr}
            value = dict(sorted(value.items()))  # attributes in tag order
        study = _first(value, "0020000D")
        level = self.query.level
        url = None
        if study:
            if level == "STUDY":
                url = _study_url(self.root, study)
            else:
                series = _first(value, "0020000E")
                if series and level == "SERIES":
                    url = _study_url(self.root, study, series)
                elif series:
                    sop = _first(value, "00080018")
                    url = _study_url(self.root, study, series, sop) if sop else None
        if url is not None:
            value["00081190"] = {"vr": "UR", "Value": [url]}
        return value

    async def render(self, result):
        matches = result.matches
        query = self.query
        skip = query.offset or 0
        # Wait for the first match (or the end) before answering: a PACS
        # failure is then a 502, not a 200 cut short.
        first = await matches.read()
        while first is not EOF and skip:
            skip -= 1
            first = await matches.read()
        if first is EOF:
            status, comment = await result.done
            if dimse_status.is_failure(status):
                raise UpstreamUnavailable("The PACS failed the query")
            return self._empty()
        limit = query.limit
        sent = 0
        head = []
        if self.choice.media_type == DICOM_JSON:
            # Most answers are small: encoded whole, they go out in one
            # write with a Content-Length (and a PACS failure is still a
            # 502); past SMALL_ANSWER bytes the rest streams.
            size = 0
            item = first
            while item is not EOF and size < SMALL_ANSWER:
                data = _json_bytes(self._prepare(dicomjson.dataset_to_json(item)))
                head.append(data)
                size += len(data) + 1
                sent += 1
                if limit is not None and sent >= limit:
                    matches.cancel()  # C-CANCEL: nothing more is wanted
                    item = EOF
                    break
                item = await matches.read()
            if item is EOF:
                if limit is None or sent < limit:
                    status, _ = await result.done
                    if dimse_status.is_failure(status):
                        raise UpstreamUnavailable("The PACS failed the query")
                body = b"[" + b",".join(head) + b"]"
                return ResponseEnvelope(status=200, headers=[("Content-Type", DICOM_JSON)], body=body)
            first = item

        async def items():
            count = sent
            item = first
            while item is not EOF:
                yield item
                count += 1
                if limit is not None and count >= limit:
                    matches.cancel()  # C-CANCEL: nothing more is wanted
                    return
                item = await matches.read()
            status, _ = await result.done
            if dimse_status.is_failure(status):
                raise UpstreamUnavailable("The PACS failed the query part way")

        return _dataset_response(self.choice, items(), cancel=matches.cancel, prepare=self._prepare, head=head)

    def _empty(self):
        if self.choice.media_type == DICOM_JSON:
            return ResponseEnvelope(status=200, headers=[("Content-Type", DICOM_JSON)], body=b"[]")
        boundary = multipart.new_boundary()
        return ResponseEnvelope(
            status=200,
            headers=[("Content-Type", multipart.related_content_type("application/dicom+xml", boundary))],
            body=f"--{boundary}--\r\n".encode("ascii"),
        )


#: VRs a missing return attribute is given as is (ambiguous ones: UN).
_PLAIN_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

#: Stands for the public DICOMweb root in cached metadata (whose URLs
#: must follow each request's host); DEL is in no DICOM text value.
ROOT_MARK = "\x7fROOT\x7f"


def _first(value, key):
    """
    The first value of attribute C{key} of a DICOM JSON object, or C{None}.
    """
    values = value.get(key, {}).get("Value")
    return values[0] if values else None


def _json_bytes(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _dataset_response(choice, datasets, cancel=None, encoded=False, root=None, prepare=None, head=()):
    """
    A 200 answer streaming C{datasets} (an async iterable of pydicom
    datasets, or of DICOM JSON dicts when C{encoded}) as a DICOM JSON array
    or as C{multipart/related} DICOM XML parts.  With C{root}, the
    L{ROOT_MARK}s in the encoded values become C{root}; C{prepare} (a
    C{dict -> dict} callable) finishes each DICOM JSON object; C{head}
    holds objects encoded already (JSON bytes), sent first.
    """
    if prepare is None:
        prepare = _same
    if root is not None:
        json_root = json.dumps(root, ensure_ascii=False)[1:-1].encode("utf-8")
        xml_root = xml_escape(root, {'"': "&quot;"}).encode("utf-8")
        mark = ROOT_MARK.encode("utf-8")

        def rooted(data, value):
            return data.replace(mark, value)
    else:
        json_root = xml_root = None

        def rooted(data, value):
            return data

    if choice.media_type == DICOM_JSON:
        body = Stream()

        async def produce():
            sep = b"["
            if head:
                body.write(b"[" + b",".join(head))
                sep = b","
            try:
                async for ds in datasets:
                    value = ds if encoded else prepare(dicomjson.dataset_to_json(ds))
                    if not body.writable:
                        await body.wait_writable()
                    body.write(sep + rooted(_json_bytes(value), json_root))
                    sep = b","
                body.write(b"[]" if sep == b"[" else b"]")
                body.finish()
            except StreamCancelled:
                return
            except Exception as e:
                if not body.cancelled:
                    body.fail(e)

        if cancel is not None:
            body._on_cancel = cancel
        defer.Deferred.fromCoroutine(produce())
        return ResponseEnvelope(status=200, headers=[("Content-Type", DICOM_JSON)], body=body)
    boundary = multipart.new_boundary()

    async def parts():
        async for ds in datasets:
            data = dicomjson.json_to_xml(ds if encoded else prepare(dicomjson.dataset_to_json(ds)))
            yield multipart.Part("application/dicom+xml", rooted(data, xml_root))

    body = multipart.multipart_stream(_Cancellable(parts(), cancel), boundary)
    return ResponseEnvelope(
        status=200,
        headers=[("Content-Type", multipart.related_content_type("application/dicom+xml", boundary))],
        body=body,
    )


def _same(value):
    return value


class _Cancellable:
    """
    An async iterator with a C{cancel()} (what L{multipart.multipart_stream}
    calls when the client goes away).
    """

    def __init__(self, iterator, cancel=None):
        self._iterator = iterator
        self._cancel = cancel

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._iterator.__anext__()

    def cancel(self):
        if self._cancel is not None:
            self._cancel()


def _convert(path, transfer_syntax):
    """
    The Part 10 bytes of the file at C{path} in C{transfer_syntax} (an
    uncompressed one), or C{None} when pydicom cannot convert it.
    """
    import io

    from pydicom import dcmread

    ds = dcmread(path)
    stored = ds.file_meta.TransferSyntaxUID
    try:
        if stored not in UNCOMPRESSED:
            ds.decompress()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    except Exception:
        return None
    return buf.getvalue()


class _Retrieve(_State):
    def __init__(self, bridge, choice, meta):
        super().__init__(bridge)
        self.choice = choice
        self.what = {"study": "study", "series": "series", "instance": "instance"}[meta["dicomweb_level"]]

    def _needs(self, instance):
        wanted = self.choice.transfer_syntax
        if wanted in (None, "*") or wanted == instance.transfer_syntax:
            return None
        if wanted not in UNCOMPRESSED or wanted == "1.2.840.10008.1.2.1.99":
            raise NotAcceptable(f"Harmony converts to uncompressed transfer syntaxes only, not {wanted}")
        return wanted

    async def _part(self, instance):
        wanted = self._needs(instance)
        ts = instance.transfer_syntax
        if wanted is None:
            body = Stream.from_path(instance.path, length=instance.size, chunk_size=FILE_CHUNK)
        else:
            try:
                data = await _in_thread(self.reactor, _convert, instance.path, wanted)
            except Exception:
                data = None
            if data is None:
                if instance.dispose is not None:
                    instance.dispose()
                raise NotAcceptable(f"An instance cannot be converted to {wanted}")
            if instance.dispose is not None:
                instance.dispose()
            body, ts = data, wanted
            return multipart.Part(f"application/dicom; transfer-syntax={ts}", body)
        return multipart.Part(f"application/dicom; transfer-syntax={ts}", body, on_done=instance.dispose)

    async def render(self, result):
        first = await _first_instance(result, self.what)
        try:
            first_part = await self._part(first)
        except BaseException:
            result.instances.cancel()
            raise
        instances = result.instances

        async def parts():
            yield first_part
            while True:
                instance = await instances.read()
                if instance is EOF:
                    break
                try:
                    part = await self._part(instance)
                except NotAcceptable:
                    log.warn("DICOMweb retrieve: an instance could not be converted and was left out")
                    continue
                yield part
            status, _ = await result.done
            if dimse_status.is_failure(status) and result.failed:
                log.warn("DICOMweb retrieve: the PACS failed {failed} sub-operations", failed=result.failed)

        boundary = multipart.new_boundary()
        body = multipart.multipart_stream(_Cancellable(parts(), instances.cancel), boundary)
        wanted = self.choice.transfer_syntax
        ctype = multipart.related_content_type("application/dicom", boundary, None if wanted in (None, "*") else wanted)
        return ResponseEnvelope(status=200, headers=[("Content-Type", ctype)], body=body)


class _Metadata(_State):
    def __init__(self, bridge, choice, meta, root):
        super().__init__(bridge)
        self.choice = choice
        self.meta = meta
        self.root = root
        self.level = meta["dicomweb_level"]

    @staticmethod
    def _bulk_uri(instance_url):
        return lambda path: f"{instance_url}/bulkdata/{path}"

    def _select(self, items):
        series = self.meta.get("dicomweb_series")
        sop = self.meta.get("dicomweb_instance")
        return [
            value
            for s, i, value in items
            if (self.level == "study" or s == series) and (self.level != "instance" or i == sop)
        ]

    def from_cache(self, items):
        selected = self._select(items)
        if not selected:
            raise NotFound(f"No such {self.level}")
        return self._answer(selected)

    def _answer(self, values):
        async def each():
            for v in values:
                yield v

        return _dataset_response(self.choice, each(), encoded=True, root=self.root)

    async def render(self, result):
        items = []
        async for instance, ds in _each_dataset(self, result, self.level):
            series = str(ds.get("SeriesInstanceUID", ""))
            sop = str(ds.get("SOPInstanceUID", instance.sop_instance_uid))
            # Cached, so built on a mark that each answer replaces.
            url = _study_url(ROOT_MARK, self.meta["dicomweb_study"], series, sop)
            value = await _in_thread(self.reactor, dicomjson.dataset_to_json, ds, self._bulk_uri(url))
            items.append((series, sop, value))
        if self.level == "study":
            self.bridge.cache.put(self.meta["dicomweb_study"], items)
        return self._answer([v for _, _, v in items])


async def _one_dataset(state, result, what):
    """
    The dataset of the first retrieved instance (the rest is cancelled).
    """
    first = await _first_instance(result, what)
    try:
        return await _in_thread(state.reactor, _read_dataset, first.path)
    finally:
        # Only now: cancelling lets the retrieve's spool area go, and the
        # file was still to be read.
        result.instances.cancel()
        if first.dispose is not None:
            first.dispose()


class _Frames(_State):
    def __init__(self, bridge, choice, numbers):
        super().__init__(bridge)
        self.choice = choice
        self.numbers = numbers

    async def render(self, result):
        ds = await _one_dataset(self, result, "instance")
        choice = self.choice
        frames = await _in_thread(self.reactor, pixels.frames, ds, self.numbers, choice.media_type,
                                  choice.transfer_syntax)
        if not choice.multipart:
            data, mtype, _ = frames[0]
            return ResponseEnvelope(status=200, headers=[("Content-Type", mtype)], body=data)
        boundary = multipart.new_boundary()
        mtypes = {m for _, m, _ in frames}
        tss = {t for _, _, t in frames}
        part_type = mtypes.pop() if len(mtypes) == 1 else "application/octet-stream"
        ts = tss.pop() if len(tss) == 1 else None
        parts = [multipart.Part(f"{m}; transfer-syntax={t}", data) for data, m, t in frames]
        return _parts_response(parts, boundary, part_type, ts)


def _parts_response(parts, boundary, part_type, transfer_syntax=None):
    async def each():
        for p in parts:
            yield p

    body = multipart.multipart_stream(each(), boundary)
    ctype = multipart.related_content_type(part_type, boundary, transfer_syntax)
    return ResponseEnvelope(status=200, headers=[("Content-Type", ctype)], body=body)


class _Rendered(_State):
    """
    Rendered images and thumbnails.  A thumbnail of a study or series is
    its first instance's; a rendered study or series is every instance's
    first frame, one C{multipart/related} part each, rendered as the
    instances arrive.
    """

    def __init__(self, bridge, choice, kind, frame, params, level):
        super().__init__(bridge)
        self.choice = choice
        self.kind = kind
        self.frame = frame
        self.params = params
        self.level = level

    def _image(self, ds):
        mtype = self.choice.media_type
        if self.kind == "thumbnail":
            return pixels.thumbnail(ds, mtype)
        return pixels.render(ds, mtype, frame=self.frame or 1, **self.params)

    async def render(self, result):
        mtype = self.choice.media_type
        if self.kind == "thumbnail" or self.level in ("instance", "frames"):
            ds = await _one_dataset(self, result, "resource")
            data = await _in_thread(self.reactor, self._image, ds)
            return ResponseEnvelope(status=200, headers=[("Content-Type", mtype)], body=data)
        first = await _first_instance(result, self.level)
        instances = result.instances

        async def parts():
            instance = first
            while instance is not EOF:
                try:
                    ds = await _in_thread(self.reactor, _read_dataset, instance.path)
                finally:
                    if instance.dispose is not None:
                        instance.dispose()
                if "PixelData" in ds:
                    yield multipart.Part(mtype, await _in_thread(self.reactor, self._image, ds))
                instance = await instances.read()
            await result.done

        boundary = multipart.new_boundary()
        body = multipart.multipart_stream(_Cancellable(parts(), instances.cancel), boundary)
        ctype = multipart.related_content_type(mtype, boundary)
        return ResponseEnvelope(status=200, headers=[("Content-Type", ctype)], body=body)


class _Bulkdata(_State):
    def __init__(self, bridge, choice, path):
        super().__init__(bridge)
        self.choice = choice
        self.path = path

    async def render(self, result):
        ds = await _one_dataset(self, result, "instance")
        element = dicomjson.element_at(ds, self.path)
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        if element.tag == 0x7FE00010 and ts is not None and ts not in UNCOMPRESSED:
            # Encapsulated pixel data: its frames, as stored.
            frames = await _in_thread(self.reactor, pixels.frames, ds,
                                      list(range(1, pixels.number_of_frames(ds) + 1)), "*/*", "*")
            parts = [multipart.Part(f"{m}; transfer-syntax={t}", data) for data, m, t in frames]
            return _parts_response(parts, multipart.new_boundary(), accept.media_type_for_transfer_syntax(ts), ts)
        value = element.value
        if value is None:
            value = b""
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise NotFound("This attribute has no bulk data")
        data = bytes(value)
        if not self.choice.multipart:
            return ResponseEnvelope(status=200, headers=[("Content-Type", "application/octet-stream")], body=data)
        return _parts_response([multipart.Part("application/octet-stream", data)], multipart.new_boundary(),
                               "application/octet-stream")


class _Store(_State):
    """
    A STOW-RS request: its spooled parts and what became of each.
    """

    def __init__(self, bridge, root, study):
        super().__init__(bridge)
        self.root = root
        self.study = study
        self.area = uuid.uuid4().hex
        # One entry per part: (sop_class, sop_instance, failure reason or
        # None, DicomInstance or None, study, series)
        self.entries = []

    def open_part(self, index, headers):
        return _StowSink(self, index, headers)

    def accepted(self):
        return [e[3] for e in self.entries if e[2] is None and e[3] is not None]

    def cleanup(self):
        if not self.entries and self.bridge._spool is None:
            return
        d = self.bridge.spool().delete_tree(self.area)
        d.addErrback(lambda f: log.warn("Removing a STOW-RS spool area failed: {error}", error=f.getErrorMessage()))

    def abandon(self):
        self.cleanup()

    async def render(self, result):
        self.cleanup()
        statuses = result.instance_statuses or []
        return self.answer(statuses)

    def answer(self, statuses):
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        by_uid = {(c, i): (s, comment) for c, i, s, comment in statuses}
        stored, failed = [], []
        studies = set()
        for sop_class, sop_instance, reason, instance, study, series in self.entries:
            if reason is None:
                status, _ = by_uid.get((sop_class, sop_instance), (PROCESSING_FAILURE, None))
                if dimse_status.is_failure(status):
                    reason = status
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or ""
            item.ReferencedSOPInstanceUID = sop_instance or ""
            if reason is None:
                studies.add(study)
                item.RetrieveURL = _study_url(self.root, study, series, sop_instance)
                stored.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        response = Dataset()
        if len(studies) == 1:
            response.RetrieveURL = _study_url(self.root, studies.pop())
        elif self.study:
            response.RetrieveURL = _study_url(self.root, self.study)
        if failed:
            response.FailedSOPSequence = Sequence(failed)
        response.ReferencedSOPSequence = Sequence(stored)
        status = 200 if not failed else (202 if stored else 409)
        return ResponseEnvelope.json(status, dicomjson.dataset_to_json(response), content_type=DICOM_JSON)


class _StowSink:
    """
    One STOW-RS part being spooled; checked once complete.
    """

    def __init__(self, store, index, headers):
        self.store = store
        ptype = headers.get("content-type")
        if ptype:
            mtype, _ = multipart.parse_content_type(ptype)
            if mtype != "application/dicom":
                raise UnsupportedMediaType(f"Part {index + 1} is {mtype}; STOW-RS parts must be application/dicom")
        self.writer = store.bridge.spool().open_writer(f"{store.area}/{index}.dcm")
        self.head = bytearray()

    def write(self, data):
        if len(self.head) < 65536:
            self.head += data[: 65536 - len(self.head)]
        self.writer.write(data)

    def abort(self):
        self.writer.abort()

    def close(self):
        return defer.Deferred.fromCoroutine(self._close())

    async def _close(self):
        from harmony.dimse.scu import read_part10_header
        from harmony.storage.dicom import uids_from_dataset_prefix

        stored = await self.writer.commit()
        entries = self.store.entries
        try:
            header = read_part10_header(bytes(self.head))
            study, series, _ = uids_from_dataset_prefix(
                memoryview(self.head)[header.dataset_offset:], header.transfer_syntax, final=len(self.head) < 65536
            )
        except Exception:
            entries.append((None, None, CANNOT_UNDERSTAND, None, None, None))
            return None
        if not study or not series:
            entries.append((header.sop_class_uid, header.sop_instance_uid, CANNOT_UNDERSTAND, None, None, None))
            return None
        if self.store.study is not None and study != self.store.study:
            entries.append((header.sop_class_uid, header.sop_instance_uid, STUDY_MISMATCH, None, None, None))
            return None
        instance = DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax,
                                 data=None, size=stored.size, path=stored.path)
        entries.append((header.sop_class_uid, header.sop_instance_uid, None, instance, study, series))
        return instance
