# -*- test-case-name: tests.unit.test_dicom_scp_endpoint -*-
"""
The C{dicom_scp} endpoint service: a DICOM listener whose requests go
through the endpoint's pipeline.  C{service = "dicom"} under
C{[endpoints]} means this type.

  - C-ECHO (C{enable_echo}) is answered here;
  - C-STORE (C{enable_store}): received instances are stored, then go
    through the pipeline;
  - C-FIND (C{enable_find}): the query goes through the pipeline, the
    matches come back as pending responses;
  - C-GET (C{enable_get}) and C-MOVE (C{enable_move}), patient and study
    root: the pipeline's backend retrieves the instances, Harmony relays
    them as C-STORE sub-operations (L{harmony.dimse.retrieve}): for C-GET
    on the requestor's association (the SCP role is accepted for every
    storage SOP class it proposes), for C-MOVE to a destination of the
    C{move_destinations} table (AE title -> C{"host:port"}), calling it
    as C{local_aet}.
"""

import os

from pydicom import uid as pydicom_uid
from pynetdicom.presentation import AllStoragePresentationContexts
from twisted.application.internet import StreamServerEndpointService
from zope.interface import implementer

from harmony.config.schema import (
    REQUIRED,
    Bool,
    Field,
    Int,
    ListOf,
    MapOf,
    Number,
    Options,
    Schema,
    Str,
    Table,
    from_validator,
)
from harmony.dimse import messages
from harmony.dimse.association import AssociationSettings
from harmony.dimse.find import FindService
from harmony.dimse.pdu import validate_ae_title
from harmony.dimse.retrieve import RetrieveService
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import FIND_MODELS, GET_MODELS, MOVE_MODELS, DicomClient
from harmony.dimse.status import status_for_error
from harmony.dimse.store import StoreService
from harmony.envelope import DicomResult, ResponseEnvelope
from harmony.interfaces import IEndpoint
from harmony.logs import logger
from harmony.storage.dicom import check_layout, check_uid
from harmony.tls import DICOM_SERVER_TLS, client_tls, place, server_endpoint, server_options

log = logger("harmony.endpoints.dicom_scp")

#: Storage SOP classes pynetdicom knows.
STORAGE_SOP_CLASSES = tuple(c.abstract_syntax for c in AllStoragePresentationContexts)

#: Transfer syntaxes accepted by default: native ones, deflated, and the
#: compressed ones (stored as received, never transcoded).
DEFAULT_TRANSFER_SYNTAXES = (
    pydicom_uid.ExplicitVRLittleEndian,
    pydicom_uid.ImplicitVRLittleEndian,
    pydicom_uid.DeflatedExplicitVRLittleEndian,
    pydicom_uid.ExplicitVRBigEndian,
    pydicom_uid.JPEGBaseline8Bit,
    pydicom_uid.JPEGExtended12Bit,
    pydicom_uid.JPEGLossless,
    pydicom_uid.JPEGLosslessSV1,
    pydicom_uid.JPEGLSLossless,
    pydicom_uid.JPEGLSNearLossless,
    pydicom_uid.JPEG2000Lossless,
    pydicom_uid.JPEG2000,
    pydicom_uid.HTJ2KLossless,
    pydicom_uid.HTJ2KLosslessRPCL,
    pydicom_uid.HTJ2K,
    pydicom_uid.RLELossless,
    pydicom_uid.MPEG2MPML,
    pydicom_uid.MPEG4HP41,
    pydicom_uid.HEVCMP51,
)


_check_aet = from_validator(validate_ae_title)
_check_uid = from_validator(check_uid)
_check_layout = from_validator(check_layout)

#: Transfer syntaxes of the Query/Retrieve model contexts.
_QUERY_SYNTAXES = (pydicom_uid.ExplicitVRLittleEndian, pydicom_uid.ImplicitVRLittleEndian)


def parse_address(value):
    """
    C{"host:port"} (C{"[v6 address]:port"} for IPv6) -> C{(host, port)}.

    @raise ValueError: not of that form, or a port outside 1..65535.
    """
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host.strip() or not port.isdigit():
        raise ValueError(f'expected "host:port", got "{value}"')
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is not in 1..65535")
    return host.strip(), number


class _MoveDestinations(MapOf):
    """
    The C-MOVE destination table: AE title -> C{"host:port"}, validated
    into AE title (surrounding spaces removed) -> C{(host, port)}.
    """

    def __init__(self):
        MapOf.__init__(self, Str(nonempty=True, check=from_validator(parse_address)))

    def validate(self, value, where):
        table = MapOf.validate(self, value, where)
        out = {}
        for aet, address in table.items():
            try:
                validate_ae_title(aet, "move destination AE title")
            except ValueError as e:
                raise where.child(aet).error(str(e)) from None
            if aet.strip() in out:
                raise where.child(aet).error(f'AE title "{aet.strip()}" is listed twice')
            out[aet.strip()] = parse_address(address)
        return Options(out)


OPTIONS = Schema(
    {
        "local_aet": Field(Str(nonempty=True, check=_check_aet), REQUIRED, "our AE title"),
        "bind_addr": Field(Str(nonempty=True), "0.0.0.0"),
        "port": Field(Int(min=0, max=65535), 11112),
        "enable_echo": Field(Bool(), True),
        "enable_store": Field(Bool(), False),
        "enable_find": Field(Bool(), False, "answer C-FIND (patient and study root) through the pipeline"),
        "enable_get": Field(
            Bool(), False, "answer C-GET (patient and study root): instances retrieved through the pipeline"
        ),
        "enable_move": Field(
            Bool(), False, "answer C-MOVE (patient and study root): instances sent to a move destination"
        ),
        "move_destinations": Field(
            _MoveDestinations(), Options(), 'C-MOVE destinations: a table of AE title = "host:port"'
        ),
        "storage_dir": Field(Str(), "", "where received instances are stored (default: <storage path>/dicom)"),
        "storage_layout": Field(Str(nonempty=True, check=_check_layout), "{study}/{series}/{sop}.dcm"),
        "fsync": Field(Bool(), False, "fsync each stored file before answering"),
        "allowed_calling_aets": Field(ListOf(Str(nonempty=True, check=_check_aet)), ()),
        "require_called_aet": Field(Bool(), True),
        "max_associations": Field(Int(min=1, max=10000), 32),
        "max_associations_per_aet": Field(
            Int(min=0, max=10000), 0, "concurrent associations from one calling AE title (0: no limit)"
        ),
        "max_pdu_length": Field(Int(min=0, max=0xFFFFFFFF), 131072, "0 = unlimited"),
        "idle_timeout_secs": Field(Number(min=0.001), 60.0),
        "dimse_timeout_secs": Field(Number(min=0.001), 30.0),
        "artim_timeout_secs": Field(Number(min=0.001), 30.0),
        "sop_classes": Field(ListOf(Str(nonempty=True, check=_check_uid)), ()),
        "transfer_syntaxes": Field(ListOf(Str(nonempty=True, check=_check_uid)), ()),
        "tls": Field(
            Table(DICOM_SERVER_TLS), None, "DICOM TLS on this listener (PS3.15 B.9): cert_path, key_path, ca_path"
        ),
    }
)


@implementer(IEndpoint)
class DicomScpEndpoint:
    """
    A DICOM SCP endpoint.
    """

    service_type = "dicom_scp"

    def __init__(self, name, options, context=None):
        self.name = name
        self.options = options
        self._config = getattr(context, "config", None)
        #: Routes C-MOVE instances a dicom_scu backend asked for (its
        #: incoming_store_port is this endpoint's port) to that move.
        self._move_router = getattr(context, "move_router", None)
        #: Associations and DIMSE statuses (harmony.metrics), or None.
        metrics = getattr(context, "metrics", None)
        self._metrics = None if metrics is None else metrics.dicom(name)
        #: DICOM TLS of the listener (files read now: startup errors).
        self.tls = None
        #: DICOM TLS of the C-MOVE associations with the move destinations.
        self.move_tls = None
        if options.tls is not None:
            tls = options.tls
            where = place(self._config, "endpoints", name, "options", "tls")
            self.tls = server_options(where, tls.cert_path, tls.key_path, tls.ca_path, tls.require_client_cert)
            if tls.move_destinations_tls:
                self.move_tls = client_tls(
                    where, ca_path=tls.ca_path, cert_path=tls.cert_path, key_path=tls.key_path,
                    verify_hostname=False, names=("ca_path", "cert_path", "key_path"),
                )

    def http_routes(self):
        return []

    def listen_addresses(self):
        return [(self.options.bind_addr, self.options.port)]

    def policy(self):
        options = self.options
        syntaxes = list(options.transfer_syntaxes) or list(DEFAULT_TRANSFER_SYNTAXES)
        abstract = {}
        if options.enable_echo:
            abstract[messages.VERIFICATION_SOP_CLASS] = [
                pydicom_uid.ImplicitVRLittleEndian,
                pydicom_uid.ExplicitVRLittleEndian,
            ]
        if options.enable_store:
            for sop_class in options.sop_classes or STORAGE_SOP_CLASSES:
                abstract[sop_class] = syntaxes
        scp_role = ()
        if options.enable_get:
            # The storage contexts of the C-STORE sub-operations, proposed by
            # the requestor with the SCP role (a C-STORE-RQ received on one
            # is still refused unless enable_store).
            scp_role = tuple(options.sop_classes or STORAGE_SOP_CLASSES)
            for sop_class in scp_role:
                abstract[sop_class] = syntaxes
        models = []
        if options.enable_find:
            models += FIND_MODELS.values()
        if options.enable_get:
            models += GET_MODELS.values()
        if options.enable_move:
            models += MOVE_MODELS.values()
        for sop_class in models:
            abstract[sop_class] = list(_QUERY_SYNTAXES)
        return SCPPolicy(
            ae_title=options.local_aet,
            syntaxes=abstract,
            require_called_aet=options.require_called_aet,
            allowed_calling_aets=options.allowed_calling_aets,
            max_associations=options.max_associations,
            max_associations_per_aet=options.max_associations_per_aet,
            requestor_scp_allowed=scp_role,
        )

    def storage_dir(self):
        if self.options.storage_dir:
            path = self.options.storage_dir
        else:
            storage = self._config.storage.options if self._config is not None else None
            path = os.path.join(storage.path if storage else "./tmp", "dicom")
        return self._config.resolve_path(path) if self._config is not None else os.path.abspath(path)

    def services(self, executor, reactor):
        from harmony.storage.filesystem import FilesystemStorage

        options = self.options
        settings = AssociationSettings(
            max_pdu_length=options.max_pdu_length,
            artim_timeout=options.artim_timeout_secs,
            idle_timeout=options.idle_timeout_secs,
            dimse_timeout=options.dimse_timeout_secs,
        )
        services = []
        handlers = {}
        storage = None
        if options.enable_store or options.enable_get or options.enable_move:
            # Received instances (store) and relayed ones a backend gives
            # only as a stream (get/move) are written here.
            storage = FilesystemStorage(self.storage_dir(), reactor=reactor)
            storage.setName(f"storage:{self.name}")
            services.append(storage)
        if options.enable_store:
            # A pipeline with neither middleware nor backends only stores.
            busy = executor.backends or executor.request_chain or executor.response_chain
            handlers[messages.C_STORE_RQ] = StoreService(
                storage,
                options.storage_layout,
                options.fsync,
                pipeline=(executor, self) if busy else None,
                router=self._move_router,
            )
        if options.enable_find:
            handlers[messages.C_FIND_RQ] = FindService((executor, self))
        if options.enable_get:
            handlers[messages.C_GET_RQ] = RetrieveService((executor, self), "get", storage=storage)
        if options.enable_move:
            client = DicomClient(
                reactor,
                local_aet=options.local_aet,
                settings=AssociationSettings(
                    max_pdu_length=options.max_pdu_length,
                    artim_timeout=options.artim_timeout_secs,
                    idle_timeout=options.idle_timeout_secs,
                ),
                connect_timeout=options.artim_timeout_secs,
                dimse_timeout=options.dimse_timeout_secs,
                tls=self.move_tls,
            )
            handlers[messages.C_MOVE_RQ] = RetrieveService(
                (executor, self), "move", destinations=dict(options.move_destinations), client=client,
                storage=storage,
            )
        factory = DicomServerFactory(
            reactor, self.policy(), settings, handlers, enable_echo=options.enable_echo, metrics=self._metrics
        )
        endpoint = server_endpoint(reactor, options.bind_addr, options.port, self.tls, label=f"endpoint {self.name}")
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True
        listener.setName(f"dicom:{self.name}")
        self.factory = factory
        services.append(listener)
        return services

    def incoming(self, envelope):
        return None

    def outgoing(self, envelope, response):
        return response

    def render_error(self, error):
        response = ResponseEnvelope(status=error.status)
        response.dicom = DicomResult(status=status_for_error(error), error_comment=error.message[:64])
        return response
