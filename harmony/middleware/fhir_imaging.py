# -*- test-case-name: tests.unit.test_fhir_imaging -*-
"""
C{fhir_imaging}: a read-only FHIR R4 facade over a DICOM PACS.  FHIR
clients search and read C{ImagingStudy} and C{Patient}; Harmony answers
with C-FINDs through the pipeline's C{dicom_scu} backend.

Pipeline: a C{fhir} endpoint (which classifies each request and leaves
C{fhir_*} metadata), this middleware, and a C{dicom_scu} backend.  The
middleware answers every request of its pipeline itself (its request hook
short-circuits); it asks the backends through
L{harmony.pipeline.PipelineExecutor.call_backends} (given to
L{FhirImaging.bind_pipeline}) as many times as it needs: one study-level
C-FIND per search (more when the search's alternatives need them), and one
series-level C-FIND per study of the page.

Interactions
============
  ======================================  ==========================================================
  C{GET|HEAD metadata}                     the facade's CapabilityStatement (R4, JSON)
  C{GET|HEAD ImagingStudy?...}             search: study-level C-FIND (Study Root)
  C{POST ImagingStudy/_search}             the same, parameters in a form body (and the URL)
  C{GET|HEAD ImagingStudy/<uid>}           read (404 when the PACS has no such study)
  C{GET|HEAD Patient?...}                  search: patient-level C-FIND (Patient Root)
  C{POST Patient/_search}, C{GET Patient/<id>}  as for ImagingStudy
  C{OPTIONS}                               204 with C{Allow}
  ======================================  ==========================================================

Other resource types are 404s (OperationOutcome C{not-found}); other
interactions on ImagingStudy and Patient (create, update, patch, delete,
history, operations, compartments) and on the base are 405s
(C{not-supported}, with C{Allow}).  Only JSON is produced: an C{Accept} (or
C{_format}) that excludes it is a 406.

ImagingStudy search parameters
==============================
  - C{patient}, C{subject}: C{Patient/<id>}, C{<id>} or a URL ending in
    C{Patient/<id>} (C{:Patient} takes the bare id; C{:identifier} the
    PatientID as a token) -> PatientID (the id decoded, below).  Another
    resource type is a 400.
  - C{identifier} (token): C{urn:dicom:uid|<uid>}, C{urn:dicom:uid|urn:oid:<uid>},
    C{urn:oid:<uid>}, or with any other system or none a UID-shaped value
    (C{[0-9]+(.[0-9]+)+}, at most 64 characters) -> StudyInstanceUID; any
    other value -> AccessionNumber.  Commas are ORs: the UIDs go in one
    C-FIND (UID list matching), each accession number in its own.
  - C{_id}: StudyInstanceUIDs.
  - C{started} (date; may be repeated: ANDed): prefixes eq (default), gt,
    ge, lt, le, sa, eb (ne and ap: 400); precisions year, month, day and
    time (minute, second, fraction) with an optional zone.  The C-FIND
    asks a StudyDate range that contains every possible match; each match
    is then tested exactly against StudyDate + StudyTime with FHIR's range
    semantics.  Times compare in the study's local time: a value with a
    zone is moved to the study's zone (C{TimezoneOffsetFromUTC}, else
    option C{timezone}); when neither is known, its clock time is compared
    as written.  Contradictory dates answer an empty Bundle without asking
    the PACS.
  - C{modality} (token; system none or DCM): ModalitiesInStudy (a value
    list); a match is kept when one of its modalities was asked (a match
    without ModalitiesInStudy is kept: the PACS matched it).
  - C{_count} (default option C{default_count}, capped at C{max_count};
    0: the total only, as C{_summary=count}), C{_offset}, C{_sort}
    (C{-started}, the default: newest first, or C{started}; ties by UID;
    studies without a date last), C{_total}, C{_format}, C{_pretty}.
Any other parameter or modifier is a 400 naming it, as is a parameter given
twice (C{started} aside) or an empty value.  Commas in values may be
escaped (C{\\,}).  Values are sent to the PACS literally (the DICOM
wildcards in them become C{?}) and every match is compared exactly, so the
answer does not depend on the PACS's matching (case, wildcards).

Patient search parameters
=========================
C{identifier} (PatientID; its system is ignored, unless option
C{patient_identifier_system} is set: then a given system must be that),
C{_id}, C{name} (any of family, given, middle name, prefix, suffix starts
with the value, case- and accent-insensitively; C{:exact} and
C{:contains}; the C-FIND asks C{*value*} on PatientName, so that given
names match too, and whether that PACS-side match ignores case is the
PACS's choice), C{birthdate} (days, prefixes as C{started}), C{gender}
(male, female, other, unknown -> PatientSex M, F, O, empty), C{_count},
C{_offset}.  Patients are sorted by PatientID.

Matches are collected (at most option C{max_results} raw matches over all
of a search's C-FINDs: one more cancels the C-FIND and answers 400 with
issue code C{too-costly}), filtered, deduplicated (by StudyInstanceUID,
PatientID), sorted, and the page cut; C{total} counts every filtered match.

Patient ids
===========
A PatientID that is a valid FHIR id (C{[A-Za-z0-9-.]{1,64}}) and does not
start with C{pid.} is the Patient's id; any other is C{pid.} and the
lowercase unpadded base32 of its UTF-8 bytes (when that fits in 64
characters; else the Patient has no id and studies refer to it by
identifier).  L{harmony.fhir_imaging.params.patient_id_from_fhir} is the
inverse.

ImagingStudy
============
  - C{id}: StudyInstanceUID; C{identifier}: C{urn:dicom:uid} /
    C{urn:oid:<uid>}, and the AccessionNumber (type v2-0203 ACSN);
    C{status}: available.
  - C{subject}: C{Patient/<id>} (by identifier when the PatientID makes no
    id) with the patient's name as display.
  - C{started}: StudyDate, with StudyTime when the zone is known
    (C{TimezoneOffsetFromUTC}, else option C{timezone}), else the date only
    (FHIR requires a zone with a time).
  - C{modality}: ModalitiesInStudy (else the series' modalities), DCM codings.
  - C{numberOfSeries}, C{numberOfInstances}: NumberOfStudyRelatedSeries /
    Instances, else counted from the series.
  - C{description}: StudyDescription.
  - C{series} (option C{include_series}, default true; one series-level
    C-FIND per study on the page, at most C{series_concurrency} at once per
    search): uid, number, modality (DCM; C{OT} when the PACS has none),
    description, numberOfInstances, bodySite (SNOMED CT after PS3.16 CID
    4031 for the common Body Part Examined terms, else the term as
    display), started; sorted by number, then UID.
  - C{endpoint}: contained Endpoints C{#wado} (WADO-RS,
    C{<dicomweb_url>/studies/<uid>}) and C{#jmix}
    (C{<jmix_url>/api/jmix?studyInstanceUid=<uid>}) when those options are
    set (a path is joined to Harmony's public base URL).
Absent or empty DICOM values leave the FHIR element out.

Patient: id, identifier (system: option C{patient_identifier_system} when
set; IssuerOfPatientID as the assigner's display), name (family, given
with the middle name, prefix, suffix, text), gender, birthDate.

Bundle: searchset, C{total}, links self/first/previous/next/last on
Harmony's public URL of this endpoint with C{_count} and C{_offset} (the
other parameters kept), entries with C{fullUrl} and C{search.mode} match.

Errors: a PACS that cannot be reached is a 502 OperationOutcome (504 when
too slow), a C-FIND that ends with a failure status a 502 naming the DIMSE
status.  Nothing identifying a patient is logged or echoed in errors.
"""

import json
import re
from datetime import datetime, timezone
from urllib.parse import quote, urlencode

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from twisted.internet import defer
from zope.interface import implementer

from harmony.config.schema import Bool, Field, Int, Schema, Str
from harmony.dimse import status as dimse_status
from harmony.endpoints.fhir import FHIR_JSON, operation_outcome
from harmony.envelope import DicomRequest, RequestEnvelope, ResponseEnvelope
from harmony.errors import (
    BadRequest,
    HarmonyError,
    InternalError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from harmony.fhir_imaging import params as fhir_params
from harmony.fhir_imaging.params import (
    UID,
    parse_offset,
    patient_id_from_fhir,
    settle,
    target_range,
    text_value,
)
from harmony.fhir_imaging.resources import (
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    Renderer,
    bundle,
    capability_statement,
    join_url,
)
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.registry import MiddlewareType
from harmony.streams import EOF, Stream

log = logger("harmony.middleware.fhir_imaging")


def _check_url(value):
    if not value:
        return None
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    if value.startswith("/") or re.match(r"https?://[^/]+", value):
        return None
    return "expected an http(s) URL or a path starting with /"


def _check_timezone(value):
    if value and parse_offset(value) is None:
        return 'expected "Z" or an offset such as "+01:00" (at most 14 hours)'
    return None


def _check_system(value):
    if any(c.isspace() for c in value):
        return "must be a URI (no spaces)"
    return None


def _check(options, where):
    if options.default_count > options.max_count:
        raise where.child("default_count").error(
            f"must not be more than max_count ({options.max_count}), got {options.default_count}"
        )


OPTIONS = Schema(
    {
        "default_count": Field(Int(min=0), 20, "entries per page when a search has no _count"),
        "max_count": Field(Int(min=1), 100, "the largest page (a larger _count is capped)"),
        "max_results": Field(Int(min=1), 1000, "C-FIND matches one search may collect (more: 400 too-costly)"),
        "include_series": Field(Bool(), True, "ImagingStudy.series from one series-level C-FIND per study shown"),
        "series_concurrency": Field(Int(min=1), 4, "series-level C-FINDs at once per request"),
        "dicomweb_url": Field(
            Str(check=_check_url), "", "Harmony's DICOMweb root (URL, or path under the public base URL) for "
            "the WADO-RS endpoint of each study; empty: none"
        ),
        "jmix_url": Field(
            Str(check=_check_url), "", "Harmony's JMIX endpoint root (URL or path) for the JMIX endpoint of "
            "each study; empty: none"
        ),
        "timezone": Field(
            Str(check=_check_timezone), "", 'the studies\' time zone when the PACS gives no TimezoneOffsetFromUTC '
            '("Z", "+01:00"); empty: unknown (started has the date only)'
        ),
        "patient_identifier_system": Field(
            Str(check=_check_system), "", "Identifier.system of PatientIDs (empty: none; identifier searches "
            "then ignore the system)"
        ),
    },
    check=_check,
)

#: Resource types the facade serves.
RESOURCE_TYPES = ("ImagingStudy", "Patient")

#: More series than this in one study is a broken answer.
MAX_SERIES_PER_STUDY = 10000

_JSON_TYPES = frozenset({"*/*", "application/*", "application/fhir+json", "application/json", "application/json+fhir"})


class TooCostly(BadRequest):
    """
    A search matching more than C{max_results}: answered 400 with issue
    code C{too-costly}.
    """


def _allowed_methods(path):
    """
    The methods this facade answers on a FHIR URL (relative to the base).
    """
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments.pop()
    if segments == ["metadata"]:
        return ("GET", "HEAD", "OPTIONS")
    if segments and segments[0] in RESOURCE_TYPES:
        if len(segments) == 1:
            return ("GET", "HEAD", "OPTIONS")
        if len(segments) == 2 and segments[1] == "_search":
            return ("POST", "OPTIONS")
        if len(segments) == 2 and not segments[1].startswith(("_", "$")):
            return ("GET", "HEAD", "OPTIONS")
    return ("OPTIONS",)


def check_accept(headers):
    """
    Refuse (406) an C{Accept} that excludes JSON.
    """
    values = headers.get_all("accept")
    if not values:
        return
    for item in ",".join(values).split(","):
        mtype, _, rest = item.partition(";")
        mtype = mtype.strip().lower()
        if not mtype:
            continue
        q = 1.0
        for param in rest.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 1.0
        if q > 0 and mtype in _JSON_TYPES:
            return
    raise NotAcceptable("This FHIR imaging facade answers JSON only (application/fhir+json)")


def _identifier(level, return_keys, matching):
    """
    A C-FIND identifier: Query/Retrieve Level, the matching keys (keyword
    -> value; a tuple is a value list) and empty return keys.
    """
    ds = Dataset()
    non_ascii = False
    for keyword in ("QueryRetrieveLevel",) + tuple(k for k in return_keys if k not in matching) + tuple(matching):
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(tag)
        if keyword == "QueryRetrieveLevel":
            value = level
        elif keyword in matching:
            value = matching[keyword]
            value = list(value) if isinstance(value, tuple) else value
            texts = value if isinstance(value, list) else [value]
            non_ascii = non_ascii or any(not t.isascii() for t in texts)
        else:
            value = None
        # Matching values (ranges, wildcards) are not valid values of their
        # VR: pydicom must not check them.
        ds.add(DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE))
    if non_ascii:
        ds.add(DataElement(0x00080005, "CS", "ISO_IR 192", validation_mode=pydicom_config.IGNORE))
    return ds


def _stream_error(error):
    """
    The typed error for a C-FIND whose matches stream failed.
    """
    from harmony.dimse.scu import DimseTimeout

    if isinstance(error, HarmonyError):
        return error
    if isinstance(error, DimseTimeout):
        return UpstreamTimeout("The PACS did not answer the query in time")
    return UpstreamUnavailable("The PACS aborted the query")


@implementer(IMiddleware)
class FhirImaging:
    """
    The FHIR imaging facade (see the module docstring).
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self.options = options
        self._reactor = getattr(context, "reactor", None)
        self._executor = None
        self._offset = parse_offset(options.timezone) if options.timezone else None

    def bind_pipeline(self, executor):
        """
        Called once with the pipeline's executor: its C{call_backends}
        issues the C-FINDs.
        """
        self._executor = executor

    def request(self, envelope):
        return defer.Deferred.fromCoroutine(self._answer(envelope))

    def response(self, envelope, response):
        # Every request is answered by the request hook.
        return None

    # -- dispatch -------------------------------------------------------------

    async def _answer(self, envelope):
        meta = envelope.metadata
        details = envelope.details
        interaction = meta.get("fhir_interaction")
        if interaction is None:
            raise InternalError("The fhir_imaging middleware needs a fhir endpoint in its pipeline")
        rtype = meta.get("fhir_resource_type")
        if rtype is not None and rtype not in RESOURCE_TYPES:
            raise NotFound(f"Resource type {rtype} is not served here (ImagingStudy and Patient are)")
        allowed = _allowed_methods(details.path)
        if interaction == "options":
            return ResponseEnvelope(status=204, headers=[("Allow", ", ".join(allowed))])
        if interaction == "capabilities":
            check_accept(details.headers)
            return self._json(200, self._capabilities(envelope))
        if rtype is None or interaction not in ("search-type", "read"):
            what = f"on {rtype}" if rtype else "at the base"
            raise MethodNotAllowed(
                allowed, f"This imaging facade supports read and search only, not {interaction} {what}"
            )
        check_accept(details.headers)
        renderer = self._renderer(details)
        try:
            if interaction == "read":
                if rtype == "ImagingStudy":
                    return await self._read_study(envelope, renderer, meta["fhir_id"])
                return await self._read_patient(envelope, renderer, meta["fhir_id"])
            params = await self._search_params(envelope)
            if rtype == "ImagingStudy":
                search = fhir_params.parse_study_search(params, self.options)
                return await self._search_studies(envelope, renderer, search)
            search = fhir_params.parse_patient_search(params, self.options)
            return await self._search_patients(envelope, renderer, search)
        except TooCostly as e:
            return self._json(400, operation_outcome(400, e.message, "too-costly"))

    def _renderer(self, details):
        base = details.base_url
        options = self.options
        return Renderer(
            fhir_base=_fhir_base(details),
            dicomweb_root=join_url(base, options.dicomweb_url) if options.dicomweb_url else None,
            jmix_root=join_url(base, options.jmix_url) if options.jmix_url else None,
            default_offset=self._offset,
            patient_system=options.patient_identifier_system,
        )

    def _json(self, status, value, pretty=False):
        if pretty:
            body = json.dumps(value, ensure_ascii=False, indent=2)
        else:
            body = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        response = ResponseEnvelope(status=status, headers=[("Content-Type", FHIR_JSON)], body=body.encode("utf-8"))
        response.normalized = value
        return response

    def _capabilities(self, envelope):
        now = self._reactor.seconds() if self._reactor is not None else datetime.now(timezone.utc).timestamp()
        date = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return capability_statement(
            _fhir_base(envelope.details), date, f"Harmony FHIR imaging facade over a DICOM PACS ({self.name})"
        )

    async def _search_params(self, envelope):
        """
        The search's parameters: the URL's, and for C{POST _search} the
        form body's after them.
        """
        params = {}
        for name, values in envelope.details.query.items():
            params.setdefault(name, []).extend(values)
        if envelope.details.method == "POST":
            form = await envelope.parse_body()
            if isinstance(form, dict):
                for name, value in form.items():
                    values = value if isinstance(value, list) else [value]
                    if not all(isinstance(v, str) for v in values):
                        raise BadRequest("A FHIR search body holds form fields only")
                    params.setdefault(name, []).extend(values)
        return params

    # -- C-FIND -------------------------------------------------------------------

    async def _find(self, envelope, model, level, identifier):
        """
        One C-FIND through the pipeline's backends.

        @return: the L{DicomResult}.
        """
        executor = self._executor
        if executor is None:
            raise InternalError("The fhir_imaging middleware is not bound to a pipeline")
        request = RequestEnvelope(
            details=envelope.details,
            body=None,
            metadata=dict(envelope.metadata),
            dicom=DicomRequest("find", query_model=model, level=level, identifier=identifier),
            content_limits=envelope.content_limits,
        )
        response = await executor.call_backends(request)
        if "backend" in request.metadata:
            envelope.metadata["backend"] = request.metadata["backend"]
        result = response.dicom
        if result is None:
            if isinstance(response.body, Stream):
                response.body.cancel()
            raise UpstreamUnavailable("The backend gave no C-FIND result (fhir_imaging needs a dicom_scu backend)")
        return result

    async def _read_matches(self, result, on_match):
        """
        Feed every match of C{result} to C{on_match}, then check the final
        status.  C{on_match} may raise to stop (the C-FIND is cancelled).

        @raise UpstreamUnavailable: the C-FIND failed (a failure status,
            an aborted association).
        @raise UpstreamTimeout: the PACS stopped answering.
        """
        matches = result.matches
        if matches is not None:
            while True:
                try:
                    match = await matches.read()
                except defer.CancelledError:
                    raise
                except Exception as e:
                    raise _stream_error(e) from None
                if match is EOF:
                    break
                try:
                    on_match(settle(match))
                except BaseException:
                    matches.cancel()
                    raise
        if result.done is not None:
            status, _ = await result.done
        else:
            status = result.status
        if status is not None and dimse_status.is_failure(status):
            log.warn("The PACS failed a C-FIND: DIMSE status 0x{status:04X}", status=status)
            raise UpstreamUnavailable(f"The PACS failed the query (DIMSE status 0x{status:04X})")

    async def _collect(self, envelope, renderer, search, model, level, return_keys, key):
        """
        The matches of C{search} (every C-FIND it needs) that pass its
        exact tests, deduplicated on C{key}.

        @raise TooCostly: more than C{max_results} matches.
        """
        found = {}
        limit = self.options.max_results
        seen = [0]
        what = "studies" if level == "STUDY" else "patients"

        def on_match(match):
            seen[0] += 1
            if seen[0] > limit:
                raise TooCostly(f"More than {limit} {what} match; narrow the search")
            value = text_value(match, key)
            if not value or value in found:
                return
            if search.accepts(match, {"offset": renderer.offset_of(match)}):
                found[value] = match

        for matching in search.matching_keys():
            result = await self._find(envelope, model, level, _identifier(level, return_keys, matching))
            await self._read_matches(result, on_match)
        return list(found.values())

    async def _series(self, envelope, uid):
        """
        The series-level matches of one study.
        """
        series = {}

        def on_match(match):
            value = text_value(match, "SeriesInstanceUID")
            if value and value not in series:
                if len(series) >= MAX_SERIES_PER_STUDY:
                    raise UpstreamUnavailable(f"The PACS listed more than {MAX_SERIES_PER_STUDY} series in a study")
                series[value] = match

        identifier = _identifier("SERIES", SERIES_KEYS, {"StudyInstanceUID": uid})
        result = await self._find(envelope, "study", "SERIES", identifier)
        await self._read_matches(result, on_match)
        return list(series.values())

    async def _series_of(self, envelope, uids):
        """
        The series of each study (UID -> matches), at most
        C{series_concurrency} C-FINDs at a time.
        """
        if not uids:
            return {}
        semaphore = defer.DeferredSemaphore(self.options.series_concurrency)
        failed = []

        def fail(failure):
            failed.append(failure)
            return failure

        def one(uid):
            if failed:
                # Another study's C-FIND failed: the answer is an error,
                # nothing more is asked.
                return defer.fail(defer.CancelledError())
            return defer.Deferred.fromCoroutine(self._series(envelope, uid)).addErrback(fail)

        tasks = [semaphore.run(one, uid) for uid in uids]
        try:
            results = await defer.gatherResults(tasks, consumeErrors=True)
        except defer.FirstError as e:
            for task in tasks:
                task.cancel()
            # The first failure, not a cancel it caused.
            (failed[0] if failed else e.subFailure).raiseException()
        return dict(zip(uids, results))

    # -- ImagingStudy ---------------------------------------------------------------

    async def _search_studies(self, envelope, renderer, search):
        matches = await self._collect(
            envelope, renderer, search, "study", "STUDY", STUDY_KEYS, "StudyInstanceUID"
        )
        matches = _sorted_studies(matches, search.descending)
        page = matches[search.offset:search.offset + search.count] if search.count else []
        uids = [text_value(m, "StudyInstanceUID") for m in page]
        series = await self._series_of(envelope, uids) if self.options.include_series else {}
        entries = [
            (f"{renderer.fhir_base}/ImagingStudy/{uid}", renderer.imaging_study(m, series.get(uid)))
            for uid, m in zip(uids, page)
        ]
        return self._bundle(renderer, search, len(matches), entries)

    async def _read_study(self, envelope, renderer, uid):
        if len(uid) > 64 or not UID.match(uid):
            raise NotFound("No such ImagingStudy")
        found = []

        def on_match(match):
            if not found and text_value(match, "StudyInstanceUID") == uid:
                found.append(match)

        identifier = _identifier("STUDY", STUDY_KEYS, {"StudyInstanceUID": uid})
        result = await self._find(envelope, "study", "STUDY", identifier)
        await self._read_matches(result, on_match)
        if not found:
            raise NotFound("No such ImagingStudy")
        series = await self._series(envelope, uid) if self.options.include_series else None
        return self._json(200, renderer.imaging_study(found[0], series))

    # -- Patient ----------------------------------------------------------------------

    async def _search_patients(self, envelope, renderer, search):
        matches = await self._collect(envelope, renderer, search, "patient", "PATIENT", PATIENT_KEYS, "PatientID")
        matches.sort(key=lambda m: text_value(m, "PatientID"))
        page = matches[search.offset:search.offset + search.count] if search.count else []
        entries = []
        for match in page:
            resource = renderer.patient(match)
            url = f"{renderer.fhir_base}/Patient/{resource['id']}" if "id" in resource else None
            entries.append((url, resource))
        return self._bundle(renderer, search, len(matches), entries)

    async def _read_patient(self, envelope, renderer, fhir_id):
        patient_id = patient_id_from_fhir(fhir_id)
        if patient_id is None:
            raise NotFound("No such Patient")
        found = []

        def on_match(match):
            if not found and text_value(match, "PatientID") == patient_id:
                found.append(match)

        identifier = _identifier("PATIENT", PATIENT_KEYS, {"PatientID": fhir_params.dicom_literal(patient_id)})
        result = await self._find(envelope, "patient", "PATIENT", identifier)
        await self._read_matches(result, on_match)
        if not found:
            raise NotFound("No such Patient")
        return self._json(200, renderer.patient(found[0]))

    # -- Bundle -----------------------------------------------------------------------

    def _bundle(self, renderer, search, total, entries):
        base = f"{renderer.fhir_base}/{search.resource_type}"
        count, offset = search.count, search.offset

        def url(at):
            pairs = list(search.link_params) + [("_count", str(count)), ("_offset", str(at))]
            return base + "?" + urlencode(pairs, quote_via=quote, safe=":/,")

        links = [("self", url(offset))]
        if count:
            links.append(("first", url(0)))
            if offset > 0:
                links.append(("previous", url(max(0, offset - count))))
            if offset + count < total:
                links.append(("next", url(offset + count)))
            links.append(("last", url((total - 1) // count * count if total else 0)))
        return self._json(200, bundle(total, entries, links), pretty=search.pretty)


def _fhir_base(details):
    """
    The public URL of the FHIR base: the public base URL and the prefix.
    """
    prefix = details.prefix if details.prefix not in ("", "/") else ""
    return details.base_url.rstrip("/") + prefix


def _sorted_studies(matches, descending):
    """
    Studies by started (newest first when C{descending}), ties by UID;
    studies without a date last.
    """
    dated, undated = [], []
    for match in matches:
        uid = text_value(match, "StudyInstanceUID")
        target = target_range(text_value(match, "StudyDate"), text_value(match, "StudyTime"))
        if target is None:
            undated.append((uid, match))
        else:
            dated.append((target[0], uid, match))
    dated.sort(key=lambda item: item[1])
    dated.sort(key=lambda item: item[0], reverse=descending)
    undated.sort(key=lambda item: item[0])
    return [m for _, _, m in dated] + [m for _, m in undated]


#: The C{fhir_imaging} middleware type (registered by
#: L{harmony.registry.builtin_registry}).
MIDDLEWARE_TYPE = MiddlewareType("fhir_imaging", FhirImaging, options=OPTIONS)
