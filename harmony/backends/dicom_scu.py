# -*- test-case-name: tests.unit.test_dicom_scu_forward -*-
"""
The C{dicom_scu} backend: answers requests with DIMSE operations against a
DICOM peer (a PACS).  C{service = "dicom"} under C{[backends]} means this
type.

  - From a DICOM endpoint (a C{DicomRequest} in the envelope): C-ECHO, and
    C-STORE of every instance received (the SCP answers its peer with the
    status the PACS gave: never success for a failed forward).
  - From HTTP (Rust-Harmony compatible paths): C{POST {prefix}/echo} ->
    C{{"operation": "echo", "success": true, ...}}; C{POST {prefix}/store}
    with an C{application/dicom} body (a Part 10 file) or
    C{multipart/related; type="application/dicom"} (several) -> one
    C-STORE per instance and a JSON result per instance.
"""

import os
import uuid

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.config.schema import REQUIRED, Bool, Field, Int, Number, Schema, Str, from_validator
from harmony.dimse import status as dimse_status
from harmony.dimse.association import AssociationAborted, AssociationRejected, AssociationSettings
from harmony.dimse.messages import VERIFICATION_SOP_CLASS
from harmony.dimse.pdu import validate_ae_title
from harmony.dimse.pool import AssociationPool, pool_key, release_quietly
from harmony.dimse.scu import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    FIND_MODELS,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DicomClient,
    DimseTimeout,
    TLSHandshakeFailed,
    read_part10_header,
)
from harmony.dimse.substore import MemoryBudget
from harmony.envelope import DicomRequest, DicomResult, ResponseEnvelope, media_type
from harmony.errors import BadRequest, NotFound, UnsupportedMediaType, UpstreamTimeout, UpstreamUnavailable
from harmony.interfaces import IBackend
from harmony.logs import logger
from harmony.streams import collect
from harmony.tls import check_pair, client_tls, place, server_options, warn_once

log = logger("harmony.backends.dicom_scu")


_check_aet = from_validator(validate_ae_title)


def _check_tls(options, where):
    check_pair(options, where, "tls_cert_path", "tls_key_path")
    if options.incoming_store_tls and not options.tls_cert_path:
        raise where.child("tls_cert_path").error("required with incoming_store_tls (the store SCP's certificate)")
    if not options.use_tls and (options.tls_ca_path or options.tls_cert_path or options.tls_verify_hostname):
        warn_once(where.child("use_tls"), "tls_* options are set but use_tls = false: the PACS is called without TLS")


OPTIONS = Schema(
    {
        "aet": Field(Str(nonempty=True, check=_check_aet), REQUIRED, "the peer's AE title"),
        "host": Field(Str(nonempty=True), REQUIRED),
        "port": Field(Int(min=1, max=65535), REQUIRED),
        "local_aet": Field(Str(nonempty=True, check=_check_aet), "HARMONY_SCU"),
        "max_pdu_length": Field(Int(min=0, max=0xFFFFFFFF), 131072),
        "timeout_secs": Field(Number(min=0.001), 30.0, "DIMSE response timeout"),
        "connect_timeout_secs": Field(Number(min=0.001), 10.0, "TCP connect + association"),
        "query_model": Field(Str(choices=("study", "patient"), lower=True), "study", "C-FIND information model"),
        "dimse_retrieve_mode": Field(
            Str(choices=("get", "move"), lower=True), "get",
            "how instances are retrieved when the request does not name the operation (DIMSE relays, DICOMweb, JMIX)",
        ),
        "incoming_store_port": Field(
            Int(min=1, max=65535), 11123, "where the PACS sends the instances of a C-MOVE to local_aet"
        ),
        "incoming_bind_addr": Field(Str(nonempty=True), "0.0.0.0", "the address of the C-MOVE store SCP"),
        "persistent_store_scp": Field(Bool(), False, "keep the C-MOVE store SCP listening between moves"),
        "storage_dir": Field(Str(), "", "where retrieved instances are kept (default: <storage path>/retrieved)"),
        "retrieve_memory_mib": Field(
            Number(min=0), 16.0,
            "instances retrieved for a DIMSE C-GET/C-MOVE relay or a JMIX build are held in memory up to this many "
            "MiB per retrieve instead of a spool file (0: always spool)",
        ),
        "retrieve_memory_total_mib": Field(
            Number(min=0), 256.0,
            "at most this many MiB held that way by all the backend's retrieves together (beyond: spool files)",
        ),
        "association_idle_secs": Field(
            Number(min=0), 0.0,
            "keep associations with the PACS open this long between C-ECHO/C-FIND/C-STORE operations for reuse "
            "(0: one association per operation)",
        ),
        "max_idle_associations": Field(
            Int(min=1, max=64), 2,
            "associations kept open at most per kind when association_idle_secs > 0 (each holds one of the PACS's "
            "association slots: Orthanc serves 4 at a time by default)",
        ),
        # DICOM TLS (PS3.15 B.9; harmony.tls): files read at startup.
        "use_tls": Field(Bool(), False, "associate with the PACS over TLS (TLS 1.2+)"),
        "tls_cert_path": Field(Str(), "", "PEM certificate chain presented to the PACS (with tls_key_path)"),
        "tls_key_path": Field(Str(), "", "PEM private key of tls_cert_path (not encrypted)"),
        "tls_ca_path": Field(Str(), "", "PEM CA bundle to verify the PACS with (default: the system's)"),
        "tls_verify_hostname": Field(
            Bool(), False, "also check that the PACS's certificate names host (DICOM peers are often addressed by IP)"
        ),
        "incoming_store_tls": Field(
            Bool(), False,
            "the C-MOVE store SCP listens with TLS too (tls_cert_path/tls_key_path; callers verified against "
            "tls_ca_path when given)",
        ),
    },
    check=_check_tls,
)

_UNCOMPRESSED = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]

def _retrieve_syntaxes():
    from pydicom import uid
    from pynetdicom.presentation import StoragePresentationContexts

    offered = [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.JPEGBaseline8Bit,
        uid.JPEGLosslessSV1,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
    ]
    # 120 storage classes + the GET model: within the 128 contexts allowed.
    return [(c.abstract_syntax, offered) for c in StoragePresentationContexts]


#: What a retrieve over HTTP accepts (stored as received, never transcoded).
RETRIEVE_SYNTAXES = _retrieve_syntaxes()

#: The operation of a seed-shaped request (C{{"operation": "C-FIND", ...}}).
_OPERATION_NAMES = {"C-ECHO": "echo", "C-FIND": "find", "C-GET": "get", "C-MOVE": "move"}

#: Matches an HTTP JSON answer may hold (it is collected in memory).
MAX_JSON_MATCHES = 10000

#: Return keys added to a JSON query per level when it names none.
DEFAULT_RETURN_KEYS = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
        "PatientID", "PatientName", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}


def find_identifier(body, return_keys=True):
    """
    The C-FIND identifier of an HTTP JSON query, in one of the accepted
    shapes: C{{"identifier": <DICOM JSON>}} (optionally inside
    C{{"command": ..., "identifier": ..., "query_metadata": ...}}),
    C{{"operation": "C-FIND", "level": "STUDY", "query": {"PatientID": "*"}}}
    (keywords or tags), or C{{"patient_id": "...", "query_level": "PATIENT"}}.

    @return: C{(dataset, level)}
    @raise BadRequest: for anything else.
    """
    from pydicom.dataset import Dataset

    if not isinstance(body, dict):
        raise BadRequest("Send a JSON object describing the query")
    level = body.get("level") or body.get("query_level")
    if body.get("identifier") is not None:
        if not isinstance(body["identifier"], dict):
            raise BadRequest('"identifier" must be a DICOM JSON object')
        try:
            ds = Dataset.from_json(body["identifier"])
        except Exception:
            raise BadRequest('"identifier" is not valid DICOM JSON')
        named = True
    else:
        query = body.get("query", {})
        if not isinstance(query, dict):
            raise BadRequest('"query" must be an object of keywords or tags')
        query = dict(query)
        if body.get("patient_id") is not None:
            query.setdefault("PatientID", body["patient_id"])
        ds = _keyword_dataset(query)
        named = False
    if level is None:
        level = ds.get("QueryRetrieveLevel")
    level = str(level or "STUDY").upper()
    if level not in DEFAULT_RETURN_KEYS:
        raise BadRequest("The query level must be PATIENT, STUDY, SERIES or IMAGE")
    ds.QueryRetrieveLevel = level
    if not named and return_keys:
        for keyword in DEFAULT_RETURN_KEYS[level]:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return ds, level


def _keyword_dataset(query, where=""):
    """
    A dataset from C{{keyword or tag: value}}: a string or number (C{""}
    or C{None}: a return key; C{"CT\\MR"} or C{["CT", "MR"]}: several
    values, e.g. a UID list or ModalitiesInStudy), or for a sequence an
    object (one item) or a list of objects, matched as PS3.4 C.2.2.2.6
    says.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    for key, value in query.items():
        name = f"{where}{key}"
        if not isinstance(key, str):
            raise BadRequest("Query keys must be DICOM keywords or tags")
        tag = int(key.replace(",", ""), 16) if _is_tag(key) else tag_for_keyword(key)
        if tag is None:
            raise BadRequest(f"Unknown DICOM keyword {name!r} in the query")
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise BadRequest(f"Unknown DICOM tag {name!r} in the query")
        if vr == "SQ":
            if value is None or value == "" or value == []:
                items = []
            elif isinstance(value, dict):
                items = [_keyword_dataset(value, f"{name}.")]
            elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
                items = [_keyword_dataset(v, f"{name}.") for v in value]
            else:
                raise BadRequest(f"Query value for sequence {name!r} must be an object or a list of objects")
            ds.add_new(tag, vr, Sequence(items))
            continue
        if isinstance(value, list):
            if not value or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                raise BadRequest(f"Query values for {name!r} must be strings or numbers")
            text = "\\".join(str(v) for v in value)
        elif value is None:
            text = ""
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
        else:
            raise BadRequest(f"Query value for {name!r} must be a string, a number or a list of them")
        try:
            ds.add_new(tag, vr, text)
        except Exception:
            raise BadRequest(f"Invalid query value for {name!r}")
    return ds


def _is_tag(key):
    digits = key.replace(",", "")
    return len(digits) == 8 and all(c in "0123456789abcdefABCDEF" for c in digits)


class _Instance:
    """
    An instance to send: its header and a data set source.
    """

    def __init__(self, sop_class_uid, sop_instance_uid, transfer_syntax, dataset, path=None):
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.dataset = dataset
        self.path = path


@implementer(IBackend)
class DicomScuBackend:
    """
    DIMSE operations against one peer.
    """

    service_type = "dicom_scu"

    def __init__(self, name, options, context):
        from harmony.backends.dicom_retrieve import Retriever

        self.name = name
        self.options = options
        self._reactor = context.reactor
        self._config = context.config
        self._client = None
        self._storage = None
        self._spool = None
        #: What all this backend's retrieves may hold in memory together.
        self._memory = MemoryBudget(int(options.retrieve_memory_total_mib * 1024 * 1024))
        self._tls, self.incoming_tls = self._tls_settings(name, options, self._config)
        self._pool = AssociationPool(self._reactor, options.association_idle_secs, options.max_idle_associations)
        router = getattr(context, "move_router", None)
        if router is None:
            from harmony.dimse.move import MoveRouter

            router = MoveRouter()
        self.retriever = Retriever(self, router, shared_scp=self._shared_scp())

    def _shared_scp(self):
        """
        Whether a C{dicom_scp} endpoint of this gateway listens on
        C{incoming_store_port} (then it receives the moves' instances).

        @raise ConfigError: that endpoint cannot receive them.
        """
        config = self._config
        port = self.options.incoming_store_port
        for name, entry in (config.endpoints.items() if config is not None else ()):
            if entry.service != "dicom_scp" or entry.options.port != port:
                continue
            problem = None
            if not entry.options.enable_store:
                problem = "it does not have enable_store = true"
            elif entry.options.require_called_aet and entry.options.local_aet != self.options.local_aet:
                problem = (
                    f"its local_aet {entry.options.local_aet!r} differs from this backend's local_aet "
                    f"{self.options.local_aet!r} (the C-MOVE destination)"
                )
            if problem is not None:
                from harmony.config.errors import ConfigError

                raise ConfigError(
                    f"backends.{self.name}.options.incoming_store_port: {port} is the port of dicom_scp "
                    f"endpoint {name!r}, which cannot receive C-MOVE instances: {problem}",
                    getattr(entry, "file", None),
                )
            return True
        return False

    def services(self, reactor):
        """
        With C{persistent_store_scp} (and move retrieves): the store SCP
        that receives C-MOVE instances, listening from startup.
        """
        options = self.options
        if not options.persistent_store_scp or self.retriever.shared_scp:
            return []
        return [self.retriever.persistent_service()]

    @property
    def client(self):
        if self._client is None:
            options = self.options
            self._client = DicomClient(
                self._reactor,
                options.local_aet,
                AssociationSettings(max_pdu_length=options.max_pdu_length),
                connect_timeout=options.connect_timeout_secs,
                dimse_timeout=options.timeout_secs,
                tls=self._tls,
            )
        return self._client

    @staticmethod
    def _tls_settings(name, options, config):
        """
        The client TLS of the associations with the PACS (C{None}: plain
        TCP) and the server TLS of the C-MOVE store SCP (C{None}: plain).

        @raise ConfigError: a TLS file is unusable.
        """
        where = place(config, "backends", name, "options")
        client = None
        if options.use_tls:
            client = client_tls(
                where,
                ca_path=options.tls_ca_path,
                cert_path=options.tls_cert_path,
                key_path=options.tls_key_path,
                verify_hostname=options.tls_verify_hostname,
            )
        server = None
        if options.incoming_store_tls:
            server = server_options(
                where, options.tls_cert_path, options.tls_key_path, options.tls_ca_path,
                names=("tls_cert_path", "tls_key_path", "tls_ca_path"),
            )
        return client, server

    def handle(self, envelope):
        return defer.Deferred.fromCoroutine(self._handle(envelope))

    async def _handle(self, envelope):
        if envelope.dicom is not None:
            return await self._dimse(envelope.dicom)
        operation = envelope.details.path.strip("/").rsplit("/", 1)[-1].lower()
        if operation == "echo":
            return await self._http_echo()
        if operation == "":
            # The seeds' shape: POST {prefix} {"operation": "C-FIND", ...}.
            if envelope.details.method != "POST":
                raise BadRequest('Use POST with a JSON body naming the "operation"')
            body = await envelope.parse_body()
            named = body.get("operation") if isinstance(body, dict) else None
            operation = _OPERATION_NAMES.get(str(named).upper()) if named is not None else None
            if operation is None:
                raise BadRequest('"operation" must be one of C-ECHO, C-FIND, C-GET, C-MOVE')
            if operation == "echo":
                return await self._http_echo()
        if operation in ("store", "find", "get", "move"):
            if envelope.details.method != "POST":
                raise BadRequest(f"Use POST to {operation}")
            if operation == "store":
                return await self._http_store(envelope)
            if operation == "find":
                return await self._http_find(envelope)
            return await self._http_retrieve(envelope, operation)
        raise NotFound("Unknown DICOM operation (this backend answers /echo, /find, /get, /move and /store)")

    # -- DIMSE requests -------------------------------------------------------

    async def _dimse(self, request):
        if request.operation == "echo":
            status = await self._echo(request.user_identity)
            return _dimse_response(status.status, status.error_comment)
        if request.operation == "store":
            instances = []
            async for item in request.instances:
                if item.path is None:
                    raise BadRequest("Instances to forward must be stored files")
                header = read_part10_header(item.path)
                instances.append(_Instance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, None, item.path))
            results = await self._store(instances, request.user_identity)
            failed = [r for r in results if dimse_status.is_failure(r[1].status)]
            if failed:
                _, result = failed[0]
                response = _dimse_response(result.status, result.error_comment or "Forwarding to the PACS failed")
            else:
                response = _dimse_response(dimse_status.SUCCESS, None)
            response.dicom.instance_statuses = [
                (instance.sop_class_uid, instance.sop_instance_uid, status.status, status.error_comment)
                for instance, status in results
            ]
            return response
        if request.operation == "find":
            return await self._find(request)
        if request.operation in ("get", "move"):
            # Retrieved to be relayed (the SCP sends each instance on, then
            # disposes of the spooled copy); how is dimse_retrieve_mode's
            # choice, whatever the requester's operation was.
            spool = self._spool_storage()
            budget = int(self.options.retrieve_memory_mib * 1024 * 1024)
            memory = None
            if request.accept_in_memory and budget > 0 and self._memory.limit > 0:
                memory = MemoryBudget(budget, parent=self._memory)
            # One area per retrieve: what a cancelled relay never took is
            # removed with it once the retrieve has settled.
            area = uuid.uuid4().hex

            def settled():
                d = spool.delete_tree(area)
                d.addErrback(lambda f: log.warn("Removing a spool area failed: {error}", error=f.getErrorMessage()))

            result = await self.retriever.retrieve(
                request, spool, dispose=_disposer(spool), layout=area + "/{study}/{series}/{sop}.dcm",
                on_settled=settled, memory=memory,
            )
            response = ResponseEnvelope(status=200)
            response.dicom = result
            return response
        raise BadRequest(f"The dicom_scu backend does not answer {request.operation} requests")

    async def _find(self, request):
        """
        C-FIND at the PACS; the matches stream back as they arrive (the
        result's C{done} fires with the final status).
        """
        model = request.query_model or "study"
        sop_class = FIND_MODELS.get(model)
        if sop_class is None:
            raise BadRequest(f"Unknown query model {model!r}")
        association = await self._associate([(sop_class, _UNCOMPRESSED)], request.user_identity)
        try:
            operation = association.find(request.identifier, model, request.priority or 0)
        except LookupError:
            await release_quietly(association)
            raise UpstreamUnavailable("The PACS does not accept this query model")
        except ValueError as e:
            await release_quietly(association)
            raise BadRequest(f"Invalid query: {e}")

        done = defer.Deferred()

        def ended(outcome):
            if isinstance(outcome, Failure):
                if outcome.check(DimseTimeout):
                    final = (dimse_status.OUT_OF_RESOURCES, "The PACS did not answer the query in time")
                else:
                    final = (dimse_status.OUT_OF_RESOURCES, "The PACS aborted the query")
            else:
                final = (outcome.status, outcome.error_comment)
            # Released (or kept) in the background; the answer does not
            # wait for it.
            self._done(association)
            done.callback(final)

        operation.result.addBoth(ended)
        response = ResponseEnvelope(status=200)
        response.dicom = DicomResult(status=None, matches=operation.matches, done=done)
        return response

    # -- HTTP requests ----------------------------------------------------------

    async def _http_echo(self):
        options = self.options
        base = {"operation": "echo", "remote_aet": options.aet, "host": options.host, "port": options.port}
        try:
            status = await self._echo()
        except (UpstreamUnavailable, UpstreamTimeout) as e:
            return ResponseEnvelope.json(e.status, dict(base, success=False, error=e.message))
        ok = status.status == dimse_status.SUCCESS
        body = dict(base, success=ok, status=f"0x{status.status:04X}")
        return ResponseEnvelope.json(200 if ok else 502, body)

    async def _http_find(self, envelope):
        """
        C{POST {prefix}/find} (Rust-Harmony and seed shapes) -> C{{"operation":
        "find", "success": ..., "matches": [<DICOM JSON>...]}}.
        """
        body = await envelope.parse_body()
        identifier, level = find_identifier(body)
        model = self.options.query_model
        if isinstance(body, dict) and isinstance(body.get("query_model"), str):
            model = body["query_model"].lower()
            if model not in FIND_MODELS:
                raise BadRequest('"query_model" must be "study" or "patient"')
        request = DicomRequest("find", query_model=model, level=level, identifier=identifier)
        response = await self._find(request)
        result = response.dicom
        matches = []
        async for match in result.matches:
            if len(matches) >= MAX_JSON_MATCHES:
                result.matches.cancel()
                raise UpstreamUnavailable(f"More than {MAX_JSON_MATCHES} matches: narrow the query")
            matches.append(match.to_json_dict())
        status, comment = await result.done
        failed = dimse_status.is_failure(status)
        body = {
            "operation": "find",
            "success": not failed,
            "remote_aet": self.options.aet,
            "status": f"0x{status:04X}",
            "matches": matches,
        }
        if failed:
            body["error"] = comment or "The PACS answered with a failure status"
        return ResponseEnvelope.json(502 if failed else 200, body)

    async def _http_retrieve(self, envelope, operation):
        """
        C{POST {prefix}/get} and C{/move}: retrieve what the JSON query
        names into C{<storage path>/retrieved} (or C{storage_dir}) and
        answer with the counts and where each instance was stored.  A move
        with a C{"destination"} is a third-party move: the PACS sends the
        instances to that AE and only the counts come back.
        """
        body = await envelope.parse_body()
        identifier, level = find_identifier(body, return_keys=False)
        model = self.options.query_model
        if isinstance(body, dict) and isinstance(body.get("query_model"), str):
            model = body["query_model"].lower()
            if model not in ("study", "patient"):
                raise BadRequest('"query_model" must be "study" or "patient"')
        request = DicomRequest(operation, query_model=model, level=level, identifier=identifier)
        options = self.options
        answer = {"operation": operation, "remote_aet": options.aet, "level": level}
        destination = body.get("destination") if isinstance(body, dict) else None
        if operation == "move" and destination is not None:
            if not isinstance(destination, str):
                raise BadRequest('"destination" must be an AE title')
            try:
                validate_ae_title(destination, "destination")
            except ValueError as e:
                raise BadRequest(str(e))
            try:
                status = await self.retriever.move_to(request, destination)
            except DimseTimeout:
                raise UpstreamTimeout("The PACS did not answer the move in time")
            except AssociationAborted:
                raise UpstreamUnavailable("The PACS aborted the move")
            failed = dimse_status.is_failure(status.status)
            answer.update(
                success=not failed, destination=destination, status=f"0x{status.status:04X}",
                counts=_counts(status.fields),
            )
            if failed:
                answer["error"] = status.error_comment or "The PACS answered with a failure status"
            return ResponseEnvelope.json(502 if failed else 200, answer)
        storage = self.retrieve_storage()
        result = await self.retriever.retrieve(request, storage, mode=operation)
        instances = []
        try:
            async for instance in result.instances:
                instances.append(
                    {
                        "sop_class_uid": instance.sop_class_uid,
                        "sop_instance_uid": instance.sop_instance_uid,
                        "transfer_syntax": instance.transfer_syntax,
                        "path": instance.path,
                        "size": instance.size,
                    }
                )
        except Exception:
            # The retrieve failed part way (an abort, a timeout): what was
            # stored is listed, the status below says it failed.
            pass
        status, comment = await result.done
        failed = dimse_status.is_failure(status)
        counts = {
            key: getattr(result, key)
            for key in ("remaining", "completed", "failed", "warning")
            if getattr(result, key) is not None
        }
        answer.update(
            success=not failed,
            status=f"0x{status:04X}",
            counts=counts,
            stored=len(instances),
            storage_root=storage.root,
            instances=instances,
        )
        if failed:
            answer["error"] = comment or "The PACS answered with a failure status"
        return ResponseEnvelope.json(502 if failed and not instances else 200, answer)

    def retrieve_storage(self):
        """
        Where retrieved instances are kept (C{storage_dir}, default
        C{<storage path>/retrieved}).
        """
        if self._storage is None:
            self._storage = self._new_storage(self.options.storage_dir or None, "retrieved")
        return self._storage

    def _spool_storage(self):
        """
        Where instances retrieved only to be relayed wait (removed once
        relayed): C{<storage path>/spool/<backend>}.
        """
        if self._spool is None:
            self._spool = self._new_storage(None, os.path.join("spool", self.name))
        return self._spool

    def _new_storage(self, path, default):
        from harmony.storage.filesystem import FilesystemStorage

        config = self._config
        if path is None:
            base = config.storage.options.path if config is not None and config.storage.options else "./tmp"
            path = os.path.join(base, default)
        root = config.resolve_path(path) if config is not None else os.path.abspath(path)
        storage = FilesystemStorage(root, reactor=self._reactor)
        storage.startService()
        return storage

    async def _http_store(self, envelope):
        # Bounded already: the HTTP side enforces [proxy.content_limits].
        data = await collect(envelope.body)
        ctype = envelope.content_type
        parts = _dicom_parts(ctype, data)
        instances = []
        for i, part in enumerate(parts):
            try:
                header = read_part10_header(part)
            except ValueError:
                raise BadRequest(f"Part {i + 1} is not a DICOM Part 10 file")
            instances.append(
                _Instance(
                    header.sop_class_uid,
                    header.sop_instance_uid,
                    header.transfer_syntax,
                    memoryview(part)[header.dataset_offset :],
                )
            )
        results = await self._store(instances)
        rendered = [
            {
                "sop_class_uid": instance.sop_class_uid,
                "sop_instance_uid": instance.sop_instance_uid,
                "status": f"0x{result.status:04X}",
                "success": not dimse_status.is_failure(result.status),
                **({"error_comment": result.error_comment} if result.error_comment else {}),
            }
            for instance, result in results
        ]
        ok = all(r["success"] for r in rendered)
        body = {"operation": "store", "success": ok, "remote_aet": self.options.aet, "results": rendered}
        return ResponseEnvelope.json(200 if ok else 502, body)

    # -- associations -------------------------------------------------------------

    async def _associate(self, syntaxes, user_identity=None, connect=None):
        """
        An association with the PACS (C{connect}: another way to request
        it, e.g. for C-GET); failures become typed upstream errors.
        """
        options = self.options
        key = None
        if connect is None:
            key = pool_key(syntaxes, user_identity)
            association = self._pool.take(key)
            if association is not None:
                association.pool_key = key
                association.reused = True
                return association

            def connect():
                return self.client.associate(options.host, options.port, options.aet, syntaxes, user_identity=user_identity)

        try:
            association = await connect()
            association.pool_key = key
            association.reused = False
            return association
        except AssociationRejected as e:
            log.warn(
                "Backend {backend}: association rejected by {aet} (source {source}, reason {reason})",
                backend=self.name,
                aet=options.aet,
                source=e.source,
                reason=e.reason,
            )
            raise UpstreamUnavailable(f"The PACS rejected the association (source {e.source}, reason {e.reason})")
        except DimseTimeout:
            raise UpstreamTimeout("The PACS did not accept the association in time")
        except TLSHandshakeFailed as e:
            log.warn(
                "Backend {backend}: TLS with {aet} at {host}:{port} failed: {reason}",
                backend=self.name, aet=options.aet, host=options.host, port=options.port, reason=e.tls_reason,
            )
            raise UpstreamUnavailable("The PACS is unreachable")
        except Exception as e:
            log.warn("Backend {backend}: cannot associate with {aet}: {kind}", backend=self.name, aet=options.aet, kind=type(e).__name__)
            raise UpstreamUnavailable("The PACS is unreachable")

    def _done(self, association):
        """
        Finished with an association: kept for reuse when it may be (see
        C{association_idle_secs}), else released in the background.
        """
        key = getattr(association, "pool_key", None)
        if key is not None:
            self._pool.give(key, association)
        else:
            release_quietly(association)

    async def _echo(self, user_identity=None):
        while True:
            association = await self._associate([(VERIFICATION_SOP_CLASS, _UNCOMPRESSED)], user_identity)
            try:
                status = await association.echo()
            except DimseTimeout:
                raise UpstreamTimeout("The PACS did not answer the C-ECHO in time")
            except AssociationAborted:
                if association.reused:
                    continue  # a kept association the PACS had closed: a new one
                raise UpstreamUnavailable("The PACS aborted the association")
            self._done(association)
            return status

    def health_check(self, check):
        """
        One active health check: a C-ECHO.

        @param check: the backend's validated C{health_check} table.
        @return: Deferred[C{None}] when the PACS answered Success, else a
            short reason (C{str}); the caller applies the timeout.
        """

        async def echo():
            try:
                status = await self._echo()
            except (UpstreamUnavailable, UpstreamTimeout) as e:
                return e.message
            return None if status.status == dimse_status.SUCCESS else f"C-ECHO status 0x{status.status:04X}"

        return defer.Deferred.fromCoroutine(echo())

    async def _store(self, instances, user_identity=None):
        """
        C-STORE each instance on one association (with the inbound peer's
        user identity, when there was one).

        @return: a list of (instance, L{DimseStatus}).
        """
        if not instances:
            return []
        # One context per (SOP class, transfer syntax): the PACS can accept
        # each exactly (instances are sent as they are, never transcoded).
        wanted = {}
        for instance in instances:
            wanted.setdefault((instance.sop_class_uid, instance.transfer_syntax), None)
        syntaxes = [(sop_class, [ts]) for sop_class, ts in wanted]
        while True:
            association = await self._associate(syntaxes, user_identity)
            try:
                return await self._store_on(association, instances)
            except _StaleAssociation:
                continue  # a kept association the PACS had closed: a new one

    async def _store_on(self, association, instances):
        results = []
        try:
            for instance in instances:
                try:
                    context = association.context_for(instance.sop_class_uid, instance.transfer_syntax)
                except LookupError:
                    results.append((instance, _status(dimse_status.SOP_CLASS_NOT_SUPPORTED, "The PACS does not accept this SOP class / transfer syntax")))
                    continue
                if instance.path is not None:
                    status = await association.store_file(instance.path)
                else:
                    status = await association.store(
                        instance.sop_class_uid, instance.sop_instance_uid, context.transfer_syntax, instance.dataset
                    )
                results.append((instance, status))
        except DimseTimeout:
            raise UpstreamTimeout("The PACS did not answer a C-STORE in time")
        except AssociationAborted:
            if association.reused and not results:
                raise _StaleAssociation()
            raise UpstreamUnavailable("The PACS aborted the association")
        self._done(association)
        return results

    def close(self):
        ds = [self.retriever.stop(), self._pool.close()]
        for storage in (self._storage, self._spool):
            if storage is not None:
                ds.append(defer.maybeDeferred(storage.stopService))
        return defer.DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)


class _StaleAssociation(Exception):
    """
    A kept association failed before its first answer (the PACS had
    closed it): the operation is tried once more on a new one.
    """




def _counts(fields):
    from harmony.dimse.scu import SUBOPERATION_COUNTS

    return {
        key: fields.get(keyword)
        for key, keyword in zip(("remaining", "completed", "failed", "warning"), SUBOPERATION_COUNTS)
        if fields.get(keyword) is not None
    }


def _disposer(storage):
    """
    C{instance -> callable} removing a spooled instance's file once its
    consumer is done with it.
    """

    def dispose_of(instance):
        path = instance.path

        def dispose():
            if dispose.done:
                return
            dispose.done = True
            prefix = storage.root + os.sep
            relpath = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, storage.root)
            # Directories stay (the next instance may be committed there
            # right now); the retrieve's whole area goes once it settles.
            try:
                storage.discard(relpath)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("Removing a relayed instance failed: {error}", error=e.strerror)

        dispose.done = False
        return dispose if path else None

    return dispose_of


def _status(code, comment):
    from harmony.dimse.scu import DimseStatus

    return DimseStatus(code, comment)


def _dimse_response(status, comment):
    response = ResponseEnvelope(status=200 if not dimse_status.is_failure(status) else 502)
    response.dicom = DicomResult(status=status, error_comment=comment)
    return response


def _dicom_parts(content_type, data):
    """
    The DICOM files in an HTTP body: one for C{application/dicom}, each part
    of a C{multipart/related} body.
    """
    mtype = media_type(content_type)
    if mtype == "application/dicom":
        return [data]
    if mtype != "multipart/related":
        raise UnsupportedMediaType("Send application/dicom or multipart/related; type=\"application/dicom\"")
    params = _params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise BadRequest("multipart/related without a boundary")
    inner = params.get("type", "application/dicom").lower()
    if inner != "application/dicom":
        raise UnsupportedMediaType("multipart/related parts must be application/dicom")
    delimiter = b"--" + boundary.encode("latin-1")
    parts = []
    chunks = data.split(delimiter)
    if len(chunks) < 3:
        raise BadRequest("Malformed multipart body")
    for chunk in chunks[1:-1]:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, body = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest("Malformed multipart part (no header end)")
        if body.endswith(b"\r\n"):
            body = body[:-2]
        part_type = ""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                part_type = media_type(value.decode("latin-1"))
        if part_type not in ("", "application/dicom"):
            raise UnsupportedMediaType("multipart/related parts must be application/dicom")
        parts.append(body)
    if not chunks[-1].startswith(b"--"):
        raise BadRequest("Malformed multipart body (no closing boundary)")
    return parts


def _params(content_type):
    params = {}
    for item in content_type.split(";")[1:]:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return params

