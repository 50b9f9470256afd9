"""
The C{fhir_imaging} middleware (L{harmony.middleware.fhir_imaging}) and its
mapping (L{harmony.fhir_imaging}): FHIR searches and reads become C-FINDs,
C-FIND matches become R4 resources.  No sockets: the PACS is a fake
backend answering C-FINDs from datasets held in memory, requests run
through a real C{fhir} endpoint and L{PipelineExecutor} (and, at the end,
a whole gateway); every resource produced is checked with fhirclient's R4
models in strict mode.
"""

import copy
import json
import re
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from _deferreds import has_fired, result_of
from fhirclient.models.bundle import Bundle
from fhirclient.models.capabilitystatement import CapabilityStatement
from fhirclient.models.imagingstudy import ImagingStudy
from fhirclient.models.operationoutcome import OperationOutcome
from fhirclient.models.patient import Patient
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from harmony.config import load_config
from harmony.config.errors import ConfigError
from harmony.config.schema import Schema, Where
from harmony.dimse.association import AssociationAborted
from harmony.dimse.scu import EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT
from harmony.dimse.scu import DimseTimeout, decode_identifier, encode_identifier
from harmony.endpoints.fhir import OPTIONS as FHIR_OPTIONS
from harmony.endpoints.fhir import FhirEndpoint
from harmony.envelope import DicomResult, Headers, RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from harmony.fhir_imaging import params
from harmony.fhir_imaging.params import (
    DateValue,
    dates_hold,
    dicom_date_range,
    parse_date,
    parse_patient_search,
    parse_study_search,
    patient_fhir_id,
    patient_id_from_fhir,
    target_range,
)
from harmony.fhir_imaging.resources import Renderer, body_site, fhir_datetime, human_name, join_url
from harmony.gateway import build_gateway
from harmony.interfaces import IBackend, IMiddleware
from harmony.middleware import fhir_imaging
from harmony.pipeline import PipelineExecutor
from harmony.registry import BuildContext, ServiceType, builtin_registry
from harmony.streams import Stream

BASE = "http://gw.test"
PREFIX = "/fhir"
FHIR_BASE = BASE + PREFIX
DCM = "http://dicom.nema.org/resources/ontology/DCM"


# -- the fake PACS ------------------------------------------------------------------------


def dataset(**values):
    """
    A dataset of keyword values (C{None}: left out), not validated: the
    PACS's data is what it is.
    """
    ds = Dataset()
    for keyword, value in values.items():
        if value is None:
            continue
        tag, vr = tag_for_keyword(keyword), dictionary_VR(keyword)
        if isinstance(value, bytes):
            # As received, even when pydicom cannot convert it.
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
            continue
        if isinstance(value, tuple):
            value = list(value)
        ds.add(DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE))
    return ds


def study(uid, patient="P1", date="20200101", time="101500", modalities=("CT",), accession=None,
          name="Doe^John", **extra):
    return dataset(StudyInstanceUID=uid, PatientID=patient, PatientName=name, StudyDate=date, StudyTime=time,
                   ModalitiesInStudy=modalities, AccessionNumber=accession, **extra)


def series(uid, number=1, modality="CT", **extra):
    return dataset(SeriesInstanceUID=uid, SeriesNumber=None if number is None else str(number), Modality=modality,
                   **extra)


def patient(patient_id, name="Doe^John", birth="19700101", sex="M", **extra):
    return dataset(PatientID=patient_id, PatientName=name, PatientBirthDate=birth, PatientSex=sex, **extra)


def _wildcard(pattern, text, ignore_case=False):
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.IGNORECASE if ignore_case else 0) is not None


def _values(value):
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def dicom_match(ds, identifier):
    """
    C-FIND matching as a PACS does it (PS3.4 C.2.2.2): UID lists, date
    ranges, wildcards (person names case-insensitively, as Orthanc),
    ModalitiesInStudy value lists.
    """
    for elem in identifier:
        keyword = elem.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.value in (None, "", []):
            continue
        if keyword not in ds:
            return False
        have = ds.get(keyword)
        if elem.VR == "UI":
            if str(have) not in _values(elem.value):
                return False
        elif elem.VR == "DA" and "-" in str(elem.value):
            low, high = str(elem.value).split("-")
            if (low and str(have) < low) or (high and str(have) > high):
                return False
        elif keyword == "ModalitiesInStudy":
            if not set(_values(elem.value)) & set(_values(have)):
                return False
        elif not _wildcard(str(elem.value), str(have), ignore_case=elem.VR == "PN"):
            return False
    return True


def project(ds, identifier):
    """
    A match: the dataset's values of the identifier's keys, encoded and
    decoded as the C{dicom_scu} backend receives it (raw elements).
    """
    out = Dataset()
    for elem in identifier:
        if elem.tag in ds:
            out[elem.tag] = ds.get_item(elem.tag)
    texts = [str(ds[t].value) for t in out.keys() if not isinstance(out.get_item(t), RawDataElement)]
    if any(not t.isascii() for t in texts):
        out.SpecificCharacterSet = "ISO_IR 192"
    with pydicom_config.disable_value_validation():
        data = encode_identifier(out, EXPLICIT)
    return decode_identifier(data, EXPLICIT)


@implementer(IBackend)
class FakePacs:
    """
    A C{dicom_scu}-like backend answering C-FINDs from datasets in memory.

    @ivar requests: the L{DicomRequest}s received.
    @ivar status: the final status of every C-FIND.
    @ivar error: an exception every request fails with.
    @ivar stream_error: an exception the matches stream fails with.
    @ivar hold: levels whose answers wait for the test (L{held}).
    """

    service_type = "fakepacs"

    def __init__(self, studies=(), series_by_study=None, patients=()):
        self.name = "pacs"
        self.studies = list(studies)
        self.series = dict(series_by_study or {})
        for uid, found in self.series.items():
            for ds in found:
                ds.StudyInstanceUID = uid
        self.patients = list(patients)
        self.requests = []
        self.streams = []
        self.status = 0x0000
        self.error = None
        self.stream_error = None
        self.hold = ()
        self.held = []

    def handle(self, envelope):
        request = envelope.dicom
        assert request is not None and request.operation == "find"
        self.requests.append(request)
        if self.error is not None:
            return defer.fail(self.error)
        identifier = request.identifier
        level = identifier.QueryRetrieveLevel
        assert level == request.level
        if level == "STUDY":
            assert request.query_model == "study"
            candidates = self.studies
        elif level == "SERIES":
            assert request.query_model == "study"
            candidates = self.series.get(str(identifier.StudyInstanceUID), [])
        else:
            assert request.query_model == "patient" and level == "PATIENT"
            candidates = self.patients
        stream = Stream()
        self.streams.append(stream)
        for ds in candidates:
            if dicom_match(ds, identifier):
                stream.write(project(ds, identifier))
        if self.stream_error is not None:
            stream.fail(self.stream_error)
        else:
            stream.finish()
        response = ResponseEnvelope(status=200)
        response.dicom = DicomResult(status=None, matches=stream, done=defer.succeed((self.status, None)))
        if level in self.hold:
            d = defer.Deferred()
            self.held.append((request, d, response))
            return d
        return defer.succeed(response)

    def release(self):
        """
        Answer the first held request.
        """
        request, d, response = self.held.pop(0)
        d.callback(response)

    def close(self):
        return defer.succeed(None)

    def finds(self, level):
        return [r.identifier for r in self.requests if r.level == level]


# -- running requests -------------------------------------------------------------------------


class Facade:
    """
    A fhir endpoint, the middleware and a L{FakePacs} in one pipeline.
    """

    def __init__(self, pacs=None, **options):
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.pacs = pacs if pacs is not None else FakePacs()
        context = BuildContext(reactor=self.clock)
        self.options = fhir_imaging.OPTIONS.validate(options, Where("t.toml", ("middleware", "img", "options")))
        self.middleware = fhir_imaging.FhirImaging("img", self.options, context)
        assert verifyObject(IMiddleware, self.middleware)
        endpoint_options = FHIR_OPTIONS.validate({"path_prefix": PREFIX}, Where("t.toml"))
        self.endpoint = FhirEndpoint("fhir", endpoint_options, context)
        self.executor = PipelineExecutor("imaging", [self.middleware], [self.middleware], [self.pacs])
        self.middleware.bind_pipeline(self.executor)

    def start(self, method, path, query=(), headers=(), body=b""):
        """
        The Deferred response to a request.
        """
        qs = urlencode(list(query))
        details = RequestDetails(
            method=method,
            uri=PREFIX + "/" + path + ("?" + qs if qs else ""),
            path=path,
            full_path=PREFIX + "/" + path,
            query=parse_qs(qs, keep_blank_values=True),
            query_string=qs,
            headers=Headers(list(headers)),
            base_url=BASE,
            prefix=PREFIX,
        )
        return self.executor.execute(self.endpoint, RequestEnvelope(details=details, body=body))

    def ask(self, method, path, query=(), headers=(), body=b""):
        """
        C{(status, headers, JSON body or None)} of a request.
        """
        response = result_of(self.start(method, path, query, headers, body))
        return decode(response)

    def get(self, path, query=(), **kwargs):
        return self.ask("GET", path, query, **kwargs)


def decode(response):
    body = response.body
    value = json.loads(body) if body else None
    if value is not None:
        assert response.headers.get("content-type") == "application/fhir+json; charset=utf-8"
        validate(value)
    return response.status, response.headers, value


MODELS = {
    "Bundle": Bundle,
    "ImagingStudy": ImagingStudy,
    "Patient": Patient,
    "CapabilityStatement": CapabilityStatement,
    "OperationOutcome": OperationOutcome,
}


def validate(resource):
    """
    Check a resource (and a Bundle's entries) with fhirclient's R4 models,
    strictly, and that no element is empty (FHIR forbids empty strings,
    arrays and objects).
    """
    MODELS[resource["resourceType"]](resource, strict=True)
    for entry in resource.get("entry", []):
        validate(entry["resource"])
    for contained in resource.get("contained", []):
        assert contained["resourceType"] == "Endpoint"
    _no_empty(resource)


def _no_empty(value):
    if isinstance(value, dict):
        assert value
        for v in value.values():
            _no_empty(v)
    elif isinstance(value, list):
        assert value
        for v in value:
            _no_empty(v)
    elif isinstance(value, str):
        assert value.strip() == value and value


def outcome(body):
    issue = body["issue"][0]
    return issue["code"], issue["diagnostics"]


def entries(body):
    return [e["resource"] for e in body.get("entry", [])]


def ids(body):
    return [e["resource"]["id"] for e in body.get("entry", [])]


def links(body):
    return {link["relation"]: link["url"] for link in body["link"]}


def link_query(url):
    split = urlsplit(url)
    return split.scheme + "://" + split.netloc + split.path, parse_qs(split.query, keep_blank_values=True)


def options(**values):
    return fhir_imaging.OPTIONS.validate(values, Where("t.toml"))


# -- options ------------------------------------------------------------------------------


def test_options_defaults():
    o = options()
    assert (o.default_count, o.max_count, o.max_results, o.include_series, o.series_concurrency) == (
        20, 100, 1000, True, 4
    )
    assert (o.dicomweb_url, o.jmix_url, o.timezone, o.patient_identifier_system) == ("", "", "", "")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"timezone": "CET"}, 'middleware.img.options.timezone: expected "Z" or an offset such as "+01:00"'),
        ({"timezone": "+15:00"}, "middleware.img.options.timezone: expected"),
        ({"dicomweb_url": "dicomweb"}, "middleware.img.options.dicomweb_url: expected an http(s) URL or a path"),
        ({"jmix_url": "/j mix"}, "middleware.img.options.jmix_url: must not contain spaces"),
        ({"patient_identifier_system": "urn:a b"}, "middleware.img.options.patient_identifier_system: must be a URI"),
        ({"default_count": 50, "max_count": 10},
         "middleware.img.options.default_count: must not be more than max_count"),
        ({"series_concurrency": 0}, "middleware.img.options.series_concurrency: must be at least 1"),
        ({"max_results": "many"}, "middleware.img.options.max_results: expected integer"),
        ({"include_series": "yes"}, "middleware.img.options.include_series: expected boolean"),
        ({"page_size": 3}, "middleware.img.options.page_size: unknown key"),
    ],
)
def test_options_errors(values, message):
    with pytest.raises(ConfigError) as info:
        fhir_imaging.OPTIONS.validate(values, Where("t.toml", ("middleware", "img", "options")))
    assert message in str(info.value)


def test_registered():
    registry = builtin_registry()
    mtype = registry.middleware("fhir_imaging")
    assert mtype is fhir_imaging.MIDDLEWARE_TYPE
    mw = mtype.make("img", options(), BuildContext())
    assert verifyObject(IMiddleware, mw)


# -- patient ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patient_id, expected",
    [
        ("P1", "P1"),
        ("abc-DEF.123", "abc-DEF.123"),
        ("A" * 64, "A" * 64),
        ("12 34", "pid.gezcamzu"),
        ("pid.x", None),
        ("Müller/7", None),
        ("x_y", None),
        ("A" * 65, None),
        ("é" * 18, None),
        ("^^", None),
    ],
)
def test_patient_id_round_trip(patient_id, expected):
    fid = patient_fhir_id(patient_id)
    if expected is not None:
        assert fid == expected
    if fid is not None:
        assert params.FHIR_ID.match(fid)
        assert len(fid) <= 64
        assert patient_id_from_fhir(fid) == patient_id
    if not params.FHIR_ID.match(patient_id) or patient_id.startswith("pid."):
        assert fid is None or fid.startswith("pid.")
    else:
        assert fid == patient_id


def test_patient_ids_too_long_for_an_id():
    # 37 UTF-8 bytes encode to 60 characters (+ "pid."): the longest.
    assert patient_fhir_id("_" * 37) is not None and len(patient_fhir_id("_" * 37)) == 64
    assert patient_fhir_id("_" * 38) is None


@pytest.mark.parametrize("fhir_id", ["pid.", "pid.!!", "pid.MFRGG", "pid.mfrgg1", "pid.mfrgg", "pid.gezdgnbv"])
def test_patient_ids_that_no_patient_has(fhir_id):
    # Not base32, upper case, not canonical (decodes to an id used as is).
    assert patient_id_from_fhir(fhir_id) is None


# -- dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, prefix, low, high, offset",
    [
        ("2020", "eq", datetime(2020, 1, 1), datetime(2021, 1, 1), None),
        ("ge2020-02", "ge", datetime(2020, 2, 1), datetime(2020, 3, 1), None),
        ("lt2020-12", "lt", datetime(2020, 12, 1), datetime(2021, 1, 1), None),
        ("2020-02-29", "eq", datetime(2020, 2, 29), datetime(2020, 3, 1), None),
        ("gt2020-01-01T10:15", "gt", datetime(2020, 1, 1, 10, 15), datetime(2020, 1, 1, 10, 16), None),
        ("sa2020-01-01T10:15:30", "sa", datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31), None),
        ("eb2020-01-01T10:15:30.25Z", "eb", datetime(2020, 1, 1, 10, 15, 30, 250000),
         datetime(2020, 1, 1, 10, 15, 30, 260000), timedelta(0)),
        ("le2020-01-01T10:15:30+01:00", "le", datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31),
         timedelta(hours=1)),
        # An unencoded "+" arrives as a space.
        ("2020-01-01T10:15:30 05:30", "eq", datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31),
         timedelta(hours=5, minutes=30)),
        ("2020-01-01T10:15:30-03:00", "eq", datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31),
         timedelta(hours=-3)),
        ("9999", "eq", datetime(9999, 1, 1), None, None),
    ],
)
def test_parse_date(text, prefix, low, high, offset):
    if high is None:
        with pytest.raises(BadRequest):
            parse_date("started", text)
        return
    assert parse_date("started", text) == DateValue(prefix, low, high, offset)


@pytest.mark.parametrize(
    "text, message",
    [
        ("2020-13", "Search parameter started: not a valid date"),
        ("2020-02-30", "Search parameter started: not a valid date"),
        ("2020-01-01T25:00", "Search parameter started: not a valid date"),
        ("20200101", "Search parameter started: expected [prefix]YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm"),
        ("2020-1-1", "Search parameter started: expected"),
        ("2020-01-01T10", "Search parameter started: expected"),
        ("today", "Search parameter started: expected"),
        ("xx2020", "Search parameter started: unknown prefix"),
        ("ne2020", "Search parameter started: prefix ne is not supported"),
        ("ap2020", "Search parameter started: prefix ap is not supported"),
        ("2020-01-01T10:00+15:00", "Search parameter started: not a valid time zone offset"),
    ],
)
def test_parse_date_errors(text, message):
    with pytest.raises(BadRequest) as info:
        parse_date("started", text)
    assert info.value.message.startswith(message)


def test_birthdate_takes_days_only():
    with pytest.raises(BadRequest) as info:
        parse_date("birthdate", "1970-01-01T10:00", times=False)
    assert info.value.message == "Search parameter birthdate: expected a date (YYYY, YYYY-MM, YYYY-MM-DD), not a time"


DAY = (datetime(2020, 1, 1), datetime(2020, 1, 2))
TEN = (datetime(2020, 1, 1, 10, 15, 0), datetime(2020, 1, 1, 10, 15, 1))


@pytest.mark.parametrize(
    "search, target, holds",
    [
        ("2020", DAY, True),
        ("2020-01-01", DAY, True),
        ("2020-01-01T10:15", DAY, False),  # the day is not within the minute
        ("2020-01-01T10:15", TEN, True),
        ("2020-01-01T10:15:00", TEN, True),
        ("2020-01-01T10:14", TEN, False),
        ("gt2020-01-01", DAY, False),
        ("gt2019-12-31", DAY, True),
        ("ge2020-01-01", DAY, True),
        ("ge2020-01-02", DAY, False),
        ("ge2020-01-01T10:15", TEN, True),
        ("gt2020-01-01T10:15", TEN, False),
        ("gt2020-01-01T10:14", TEN, True),
        ("lt2020-01-01", DAY, False),
        ("lt2020-01-01T10:16", TEN, True),
        ("lt2020-01-01T10:15", TEN, False),
        ("le2020-01-01T10:15", TEN, True),
        ("le2019", DAY, False),
        ("sa2019-12-31", DAY, True),
        ("sa2020-01-01T00:00", DAY, False),  # overlaps
        ("eb2020-01-02", DAY, True),
        ("eb2020-01-01T23:59", DAY, False),
        ("eb2020-01-01T10:15:01", TEN, True),
    ],
)
def test_date_prefix_semantics(search, target, holds):
    assert dates_hold([parse_date("started", search)], target) is holds


def test_dates_are_anded_and_a_missing_date_never_matches():
    values = [parse_date("started", "ge2020-01-01"), parse_date("started", "lt2020-02-01")]
    assert dates_hold(values, DAY)
    assert not dates_hold(values, (datetime(2020, 2, 1), datetime(2020, 2, 2)))
    assert not dates_hold(values, None)


def test_time_zones_of_search_values():
    # 10:15 at +01:00 is 09:15 UTC, 11:15 at +02:00.
    value = parse_date("started", "2020-01-01T10:15+01:00")
    at_utc = (datetime(2020, 1, 1, 9, 15, 30), datetime(2020, 1, 1, 9, 15, 31))
    at_plus2 = (datetime(2020, 1, 1, 11, 15, 30), datetime(2020, 1, 1, 11, 15, 31))
    assert dates_hold([value], at_utc, timedelta(0))
    assert not dates_hold([value], at_utc, timedelta(hours=2))
    assert dates_hold([value], at_plus2, timedelta(hours=2))
    # The study's zone unknown: the clock time as written.
    assert dates_hold([value], (datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31)), None)
    # Without a zone in the value: the study's clock time.
    plain = parse_date("started", "2020-01-01T10:15")
    assert dates_hold([plain], (datetime(2020, 1, 1, 10, 15, 30), datetime(2020, 1, 1, 10, 15, 31)), timedelta(0))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], ""),
        (["2020"], "20200101-20201231"),
        (["2020-02"], "20200201-20200229"),
        (["2020-02-03"], "20200203"),
        (["ge2020-02-03"], "20200203-"),
        (["gt2020-02-03"], "20200204-"),
        (["gt2020-02-03T10:00"], "20200203-"),
        (["sa2020"], "20210101-"),
        (["lt2020-02-03"], "-20200202"),
        (["lt2020-02-03T10:00"], "-20200203"),
        (["le2020-02"], "-20200229"),
        (["eb2020"], "-20191231"),
        (["ge2020-01-01", "lt2020-03-01", "le2020-02-10"], "20200101-20200210"),
        (["ge2020-03-01", "le2020-02-10"], None),
        (["gt2020-01-01T10:00+01:00"], "20191230-"),
        (["2020-01-01T10:00Z"], "20191230-20200103"),
    ],
)
def test_dicom_date_range(values, expected):
    assert dicom_date_range([parse_date("started", v) for v in values]) == expected


@pytest.mark.parametrize(
    "da, tm, expected",
    [
        ("20200101", "101500", (datetime(2020, 1, 1, 10, 15), datetime(2020, 1, 1, 10, 15, 1))),
        ("20200101", "1015", (datetime(2020, 1, 1, 10, 15), datetime(2020, 1, 1, 10, 16))),
        ("20200101", "10", (datetime(2020, 1, 1, 10), datetime(2020, 1, 1, 11))),
        ("20200101", "101500.12", (datetime(2020, 1, 1, 10, 15, 0, 120000), datetime(2020, 1, 1, 10, 15, 0, 130000))),
        ("20200101", "10:15:00", (datetime(2020, 1, 1, 10, 15), datetime(2020, 1, 1, 10, 15, 1))),
        ("2020.01.01", None, DAY),
        ("20200101", "bad", DAY),
        ("20201301", "101500", None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_target_range(da, tm, expected):
    assert target_range(da, tm) == expected


@pytest.mark.parametrize(
    "da, tm, offset, expected",
    [
        ("20200101", "101500", timedelta(hours=1), "2020-01-01T10:15:00+01:00"),
        ("20200101", "101500.123", timedelta(hours=-5, minutes=-30), "2020-01-01T10:15:00.123-05:30"),
        ("20200101", "10", timedelta(0), "2020-01-01T10:00:00Z"),
        ("20200101", "101500", None, "2020-01-01"),
        ("20200101", None, timedelta(0), "2020-01-01"),
        ("2020", "101500", timedelta(0), None),
    ],
)
def test_fhir_datetime(da, tm, offset, expected):
    assert fhir_datetime(da, tm, offset) == expected


# -- search parameters ------------------------------------------------------------------------


def study_search(query, **opts):
    return parse_study_search(parse_qs(urlencode(query), keep_blank_values=True), options(**opts))


def patient_search(query, **opts):
    return parse_patient_search(parse_qs(urlencode(query), keep_blank_values=True), options(**opts))


@pytest.mark.parametrize(
    "query, message",
    [
        ([("foo", "1")], "Unknown or unsupported search parameter foo for ImagingStudy (supported: patient, subject"),
        ([("patient.identifier", "1")], "Unknown or unsupported search parameter patient.identifier"),
        ([("_include", "ImagingStudy:subject")], "Unknown or unsupported search parameter _include"),
        ([("name", "x")], "Unknown or unsupported search parameter name for ImagingStudy"),
        ([("identifier:of-type", "x")], "Search parameter identifier does not support the modifier :of-type"),
        ([("patient:missing", "true")], "Search parameter patient does not support the modifier :missing"),
        ([("patient", "P1"), ("patient", "P2")],
         "Search parameter patient is given more than once (use commas for OR)"),
        ([("modality", "")], "Search parameter modality has no value"),
        ([("_count", "x")], "Search parameter _count must be a whole number (0 or more)"),
        ([("_count", "-1")], "Search parameter _count must be a whole number"),
        ([("_offset", "1.5")], "Search parameter _offset must be a whole number"),
        ([("_sort", "date")], "Search parameter _sort: only started and -started are supported"),
        ([("_sort", "-started,_id")], "Search parameter _sort: only started and -started are supported"),
        ([("_summary", "true")], "Search parameter _summary: only count and false are supported"),
        ([("_total", "all")], "Search parameter _total must be none, estimate or accurate"),
        ([("_pretty", "yes")], "Search parameter _pretty must be true or false"),
        ([("started", "ne2020")], "Search parameter started: prefix ne is not supported"),
        ([("identifier", "urn:dicom:uid|ACC1")],
         "Search parameter identifier: a urn:dicom:uid value must be a DICOM UID"),
        ([("identifier", "a|b|c")], "Search parameter identifier: expected [system|]code"),
        ([("identifier", "urn:dicom:uid|")], "Search parameter identifier: a code is needed"),
        ([("modality", "http://loinc.org|CT")], "Search parameter modality: the system must be"),
        ([("modality", "|CT")], "Search parameter modality: the system must be"),
        ([("modality", "ct")], "Search parameter modality: not a DICOM modality code (such as CT or MR)"),
        ([("patient", "Group/1")], "Search parameter patient: only Patient references are supported"),
        ([("subject", "Device/x")], "Search parameter subject: only Patient references are supported"),
        ([("patient", "a b")], "Search parameter patient: not a valid FHIR id"),
        ([("patient", "Patient/")], "Search parameter patient: not a valid FHIR id"),
        ([("_id", "a_b")], "Search parameter _id: not a valid FHIR id"),
        ([("identifier", ",".join(f"ACC{i}" for i in range(33)))],
         "The search needs more than 32 queries to the PACS; use fewer alternatives"),
    ],
)
def test_study_search_errors(query, message):
    with pytest.raises(BadRequest) as info:
        study_search(query).matching_keys()
    assert info.value.message.startswith(message)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "query, message",
    [
        ([("modality", "CT")], "Unknown or unsupported search parameter modality for Patient"),
        ([("gender", "f")], "Search parameter gender: expected male, female, other or unknown"),
        ([("gender", "http://snomed.info/sct|male")], "Search parameter gender: expected"),
        ([("birthdate", "1970-01-01T10:00")], "Search parameter birthdate: expected a date"),
        ([("name", "A"), ("name", "B")], "Search parameter name is given more than once"),
        ([("name:phonetic", "A")], "Search parameter name does not support the modifier :phonetic"),
        ([("name", ",")], "Search parameter name: empty name"),
        ([("_sort", "name")], "Unknown or unsupported search parameter _sort for Patient"),
        ([("_id", "a b")], "Search parameter _id: not a valid FHIR id"),
    ],
)
def test_patient_search_errors(query, message):
    with pytest.raises(BadRequest) as info:
        patient_search(query)
    assert info.value.message.startswith(message)


def test_search_defaults_and_paging_parameters():
    search = study_search([])
    assert (search.count, search.offset, search.descending, search.link_params) == (20, 0, True, [])
    assert search.matching_keys() == [{}]
    search = study_search([("_count", "500"), ("_offset", "40"), ("_sort", "started"), ("_format", "json")])
    assert (search.count, search.offset, search.descending) == (100, 40, False)
    assert search.link_params == [("_sort", "started"), ("_format", "json")]
    assert study_search([("_count", "7")], default_count=5, max_count=10).count == 7
    assert study_search([], default_count=5).count == 5
    assert study_search([("_summary", "count"), ("_count", "5")]).count == 0
    assert study_search([("_count", "0")]).count == 0
    assert study_search([("_pretty", "true")]).pretty


def test_identifier_rules():
    def keys(value):
        return study_search([("identifier", value)]).matching_keys()

    # UIDs, however they are written, go in one C-FIND (a UID list).
    assert keys("urn:dicom:uid|urn:oid:1.2.3,urn:dicom:uid|1.2.4,urn:oid:1.2.5,1.2.6,other|1.2.7") == [
        {"StudyInstanceUID": ("1.2.3", "1.2.4", "1.2.5", "1.2.6", "1.2.7")}
    ]
    # Anything else is an accession number: one C-FIND each.
    assert keys("ACC1,http://hospital/acsn|ACC2,|123") == [
        {"AccessionNumber": "ACC1"}, {"AccessionNumber": "ACC2"}, {"AccessionNumber": "123"}
    ]
    assert keys("1.2.3,ACC1") == [{"StudyInstanceUID": ("1.2.3",)}, {"AccessionNumber": "ACC1"}]
    # Escaped commas and bars are part of the value; wildcards are sent literally.
    assert keys(r"A\,B,C*D?E\|F") == [{"AccessionNumber": "A,B"}, {"AccessionNumber": "C?D?E|F"}]
    # An accession number longer than 16 characters matches nothing.
    assert keys("X" * 17) == []
    assert keys("X" * 17 + ",ACC1") == [{"AccessionNumber": "ACC1"}]
    # A UID longer than 64 characters is an accession number (and too long).
    assert keys("1." + "2" * 64) == []


def test_criteria_are_anded():
    search = study_search([("_id", "1.2.3,1.2.4"), ("identifier", "1.2.4,1.2.5")])
    assert search.matching_keys() == [{"StudyInstanceUID": ("1.2.4",)}]
    assert study_search([("_id", "1.2.3"), ("identifier", "1.2.5")]).matching_keys() == []
    assert study_search([("patient", "P1"), ("subject", "Patient/P2")]).matching_keys() == []
    assert study_search([("patient", "P1"), ("subject", "Patient/P1")]).matching_keys() == [{"PatientID": "P1"}]
    search = study_search([("patient", "P1,P2"), ("identifier", "A1,A2"), ("modality", "CT,MR"),
                           ("started", "ge2020"), ("started", "lt2021")])
    assert search.matching_keys() == [
        {"PatientID": p, "AccessionNumber": a, "ModalitiesInStudy": ("CT", "MR"), "StudyDate": "20200101-20201231"}
        for p in ("P1", "P2") for a in ("A1", "A2")
    ]
    assert study_search([("started", "ge2021"), ("started", "lt2020")]).matching_keys() == []
    # A non-canonical encoded id names no patient.
    assert study_search([("patient", "pid.MFRGG")]).matching_keys() == []


@pytest.mark.parametrize(
    "query, patient_id",
    [
        ([("patient", "P1")], "P1"),
        ([("patient", "Patient/P1")], "P1"),
        ([("patient:Patient", "P1")], "P1"),
        ([("subject", "http://other.example/fhir/Patient/P1")], "P1"),
        ([("subject", "Patient/pid.gezcamzu")], "12 34"),
        ([("patient:identifier", "12 34")], "12 34"),
        ([("subject:identifier", "urn:oid:1.2|P1")], "P1"),
    ],
)
def test_patient_references(query, patient_id):
    assert study_search(query).matching_keys() == [{"PatientID": patient_id}]


def test_patient_identifier_system():
    assert patient_search([("identifier", "other|P1")]).matching_keys() == [{"PatientID": "P1"}]
    system = "urn:oid:1.2.3"
    assert patient_search([("identifier", "other|P1")], patient_identifier_system=system).matching_keys() == []
    assert patient_search([("identifier", "|P1")], patient_identifier_system=system).matching_keys() == []
    assert patient_search([("identifier", f"{system}|P1,P2")], patient_identifier_system=system).matching_keys() == [
        {"PatientID": "P1"}, {"PatientID": "P2"}
    ]
    assert study_search([("patient:identifier", "other|P1")], patient_identifier_system=system).matching_keys() == []


def test_patient_search_keys():
    assert patient_search([("name", "doe,Jo*")]).matching_keys() == [
        {"PatientName": "*doe*"}, {"PatientName": "*Jo?*"}
    ]
    assert patient_search([("name:exact", "Doe^J")]).matching_keys() == [{"PatientName": "*Doe?J*"}]
    assert patient_search([("gender", "female")]).matching_keys() == [{"PatientSex": "F"}]
    # PatientSex cannot be asked empty nor as a list: the post-filter decides.
    assert patient_search([("gender", "unknown")]).matching_keys() == [{}]
    assert patient_search([("gender", "male,other")]).matching_keys() == [{}]
    assert patient_search([("birthdate", "ge1970"), ("birthdate", "lt1971-02")]).matching_keys() == [
        {"PatientBirthDate": "19700101-19710131"}
    ]
    assert patient_search([("_id", "P1,pid.gezcamzu")]).matching_keys() == [
        {"PatientID": "P1"}, {"PatientID": "12 34"}
    ]


# -- resources -------------------------------------------------------------------------------


def test_join_url():
    assert join_url("http://gw.test", "/dicomweb/") == "http://gw.test/dicomweb"
    assert join_url("http://gw.test/", "/a/b") == "http://gw.test/a/b"
    assert join_url("http://gw.test", "https://pacs.example/dicom-web/") == "https://pacs.example/dicom-web"
    assert join_url("http://gw.test", "/") == "http://gw.test"


def test_body_site():
    assert body_site("CHEST") == {"system": "http://snomed.info/sct", "code": "816094009", "display": "Chest"}
    assert body_site("lspine")["code"] == "122496007"
    assert body_site("LEFT PINKY") == {"display": "LEFT PINKY"}


def test_human_name():
    assert human_name("Doe^John^Paul^Dr^Jr") == {
        "text": "Dr John Paul Doe Jr", "family": "Doe", "given": ["John", "Paul"], "prefix": ["Dr"], "suffix": ["Jr"]
    }
    assert human_name("Doe") == {"text": "Doe", "family": "Doe"}
    assert human_name("^John") == {"text": "John", "given": ["John"]}
    assert human_name("") is None
    assert human_name(None) is None
    assert human_name("Yamada^Tarou=山田^太郎") == {"text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]}


def test_imaging_study_mapping_leaves_out_what_is_missing():
    renderer = Renderer(FHIR_BASE)
    match = Dataset()
    match.StudyInstanceUID = "1.2.3"
    match.StudyDate = ""
    match.AccessionNumber = ""
    match.StudyDescription = ""
    match.NumberOfStudyRelatedSeries = None
    match.ModalitiesInStudy = ""
    resource = renderer.imaging_study(match)
    assert resource == {
        "resourceType": "ImagingStudy",
        "id": "1.2.3",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
        "status": "available",
        "subject": {"display": "Unknown patient"},
    }
    validate(resource)


def test_imaging_study_counts_and_modalities_from_series():
    renderer = Renderer(FHIR_BASE, default_offset=timedelta(hours=2))
    match = study("1.2.3", modalities=None, time="0930")
    found = [
        series("1.2.3.2", number=2, modality="MR", NumberOfSeriesRelatedInstances="5", SeriesDate="20200101",
               SeriesTime="093100", SeriesDescription="T1", BodyPartExamined="HEAD"),
        series("1.2.3.1", number=1, modality=None, NumberOfSeriesRelatedInstances="3"),
        series("1.2.3.10", number=None, modality="CT", NumberOfSeriesRelatedInstances="1"),
        series("", number=3),
    ]
    resource = renderer.imaging_study(match, found)
    validate(resource)
    assert resource["started"] == "2020-01-01T09:30:00+02:00"
    assert [s["uid"] for s in resource["series"]] == ["1.2.3.1", "1.2.3.2", "1.2.3.10"]
    assert resource["series"][0]["modality"] == {"system": DCM, "code": "OT"}
    assert resource["series"][1] == {
        "uid": "1.2.3.2",
        "number": 2,
        "modality": {"system": DCM, "code": "MR"},
        "description": "T1",
        "numberOfInstances": 5,
        "bodySite": {"system": "http://snomed.info/sct", "code": "69536005", "display": "Head"},
        "started": "2020-01-01T09:31:00+02:00",
    }
    assert [m["code"] for m in resource["modality"]] == ["OT", "MR", "CT"]
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (3, 9)
    # The PACS's own counts win.
    match.NumberOfStudyRelatedSeries = "4"
    match.NumberOfStudyRelatedInstances = "12"
    resource = renderer.imaging_study(match, found)
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (4, 12)
    # An instance count missing from a series: no sum.
    found.append(series("1.2.3.11", number=9))
    del match.NumberOfStudyRelatedInstances
    assert "numberOfInstances" not in renderer.imaging_study(match, found)


# -- searches through the pipeline ---------------------------------------------------------------


def two_patients():
    """
    P1 has three studies, P2 two; dates, times and modalities vary.
    """
    studies = [
        study("1.2.1", "P1", "20200101", "101500", ("CT",), "ACC1", StudyDescription="CT chest",
              NumberOfStudyRelatedSeries="1", NumberOfStudyRelatedInstances="3"),
        study("1.2.2", "P1", "20210615", "080000", ("MR", "SR"), "ACC2"),
        study("1.2.3", "P1", "20220301", None, ("CT", "PT"), "ACC3"),
        study("1.2.4", "P2", "20210615", "230000", ("US",), "ACC4", name="Roe^Jane"),
        study("1.2.5", "P2", None, None, ("CR",), None, name="Roe^Jane"),
    ]
    series_by_study = {
        "1.2.1": [series("1.2.1.1", 1, "CT", NumberOfSeriesRelatedInstances="3", BodyPartExamined="CHEST")],
        "1.2.2": [series("1.2.2.2", 2, "SR"), series("1.2.2.1", 1, "MR", NumberOfSeriesRelatedInstances="20")],
        "1.2.3": [series("1.2.3.1", 1, "CT"), series("1.2.3.2", 2, "PT")],
        "1.2.4": [series("1.2.4.1", 1, "US")],
        "1.2.5": [series("1.2.5.1", 1, "CR")],
    }
    patients = [
        patient("P1", "Doe^John", "19700101", "M"),
        patient("P2", "Roe^Jane^^Dr", "19800229", "F", IssuerOfPatientID="HOSP"),
        patient("12 34", "Müller^Jürgen", "1990", "O"),
        patient("P4", "Poe^Edgar", None, ""),
    ]
    return FakePacs(studies, series_by_study, patients)


@pytest.fixture
def facade():
    return Facade(two_patients(), dicomweb_url="/dicomweb", jmix_url="https://jmix.example/jmix/")


def test_search_by_patient(facade):
    status, headers, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert status == 200
    assert body["type"] == "searchset" and body["total"] == 3
    # Newest first.
    assert ids(body) == ["1.2.3", "1.2.2", "1.2.1"]
    [query] = facade.pacs.finds("STUDY")
    assert query.PatientID == "P1"
    assert query.QueryRetrieveLevel == "STUDY"
    assert {e.keyword for e in query} >= {
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "TimezoneOffsetFromUTC", "StudyDescription",
    }
    assert "SpecificCharacterSet" not in query
    # One series C-FIND per study on the page.
    assert sorted(str(q.StudyInstanceUID) for q in facade.pacs.finds("SERIES")) == ["1.2.1", "1.2.2", "1.2.3"]
    oldest = entries(body)[2]
    assert oldest == {
        "resourceType": "ImagingStudy",
        "id": "1.2.1",
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "payloadMimeType": ["application/dicom"],
                "address": "http://gw.test/dicomweb/studies/1.2.1",
            },
            {
                "resourceType": "Endpoint",
                "id": "jmix",
                "status": "active",
                "connectionType": {"system": "urn:harmony:endpoint-connection-type", "code": "jmix"},
                "payloadType": [{"text": "JMIX"}],
                "payloadMimeType": ["application/zip"],
                "address": "https://jmix.example/jmix/api/jmix?studyInstanceUid=1.2.1",
            },
        ],
        "identifier": [
            {"system": "urn:dicom:uid", "value": "urn:oid:1.2.1"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
             "value": "ACC1"},
        ],
        "status": "available",
        "modality": [{"system": DCM, "code": "CT"}],
        "subject": {"reference": "Patient/P1", "display": "John Doe"},
        "started": "2020-01-01",
        "endpoint": [{"reference": "#wado"}, {"reference": "#jmix"}],
        "numberOfSeries": 1,
        "numberOfInstances": 3,
        "description": "CT chest",
        "series": [
            {
                "uid": "1.2.1.1",
                "number": 1,
                "modality": {"system": DCM, "code": "CT"},
                "numberOfInstances": 3,
                "bodySite": {"system": "http://snomed.info/sct", "code": "816094009", "display": "Chest"},
            }
        ],
    }
    assert [e["fullUrl"] for e in body["entry"]] == [
        f"{FHIR_BASE}/ImagingStudy/{u}" for u in ("1.2.3", "1.2.2", "1.2.1")
    ]
    assert all(e["search"] == {"mode": "match"} for e in body["entry"])
    assert [s["uid"] for s in entries(body)[1]["series"]] == ["1.2.2.1", "1.2.2.2"]


def test_search_by_subject_and_unknown_patient(facade):
    _, _, body = facade.get("ImagingStudy", [("subject", "http://elsewhere/fhir/Patient/P2")])
    assert ids(body) == ["1.2.4", "1.2.5"]  # undated last
    assert len(facade.pacs.finds("SERIES")) == 2
    _, _, body = facade.get("ImagingStudy", [("patient", "Patient/P9")])
    assert body["total"] == 0 and "entry" not in body
    # Nothing on the page: no series asked.
    assert len(facade.pacs.finds("SERIES")) == 2


def test_search_by_identifier(facade):
    _, _, body = facade.get("ImagingStudy", [("identifier", "urn:oid:1.2.2,1.2.4,urn:dicom:uid|1.2.9")])
    assert ids(body) == ["1.2.4", "1.2.2"]
    [query] = facade.pacs.finds("STUDY")
    assert list(query.StudyInstanceUID) == ["1.2.2", "1.2.4", "1.2.9"]
    facade.pacs.requests.clear()
    _, _, body = facade.get("ImagingStudy", [("identifier", "ACC3,ACC1,1.2.1")])
    assert ids(body) == ["1.2.3", "1.2.1"]  # merged, deduplicated, sorted
    studies = facade.pacs.finds("STUDY")
    assert [(q.get("StudyInstanceUID"), q.get("AccessionNumber")) for q in studies] == [
        ("1.2.1", None), (None, "ACC3"), (None, "ACC1")
    ]


def test_values_are_literal_and_matched_exactly():
    pacs = FakePacs([study("1.2.1", "A*", accession="X?1"), study("1.2.2", "AB", accession="XY1")])
    facade = Facade(pacs)
    _, _, body = facade.get("ImagingStudy", [("patient:identifier", "A*")])
    assert ids(body) == ["1.2.1"]
    assert facade.pacs.finds("STUDY")[0].PatientID == "A?"  # AB matches too: the post-filter drops it
    _, _, body = facade.get("ImagingStudy", [("identifier", "X?1")])
    assert ids(body) == ["1.2.1"]
    _, _, body = facade.get("ImagingStudy", [("identifier", "XY1")])
    assert ids(body) == ["1.2.2"]


def test_search_by_started(facade):
    _, _, body = facade.get("ImagingStudy", [("started", "2021-06-15")])
    assert ids(body) == ["1.2.4", "1.2.2"]
    assert facade.pacs.finds("STUDY")[-1].StudyDate == "20210615"
    _, _, body = facade.get("ImagingStudy", [("started", "gt2021-06-15T08:00")])
    assert ids(body) == ["1.2.3", "1.2.4"]
    assert facade.pacs.finds("STUDY")[-1].StudyDate == "20210615-"
    _, _, body = facade.get("ImagingStudy", [("started", "ge2021"), ("started", "lt2022"), ("_sort", "started")])
    assert ids(body) == ["1.2.2", "1.2.4"]
    _, _, body = facade.get("ImagingStudy", [("started", "le2021-06-15T08:00:00")])
    assert ids(body) == ["1.2.2", "1.2.1"]
    _, _, body = facade.get("ImagingStudy", [("started", "eb2021-06-15")])
    assert ids(body) == ["1.2.1"]
    _, _, body = facade.get("ImagingStudy", [("started", "sa2021")])
    assert ids(body) == ["1.2.3"]


def test_contradictory_dates_do_not_ask_the_pacs(facade):
    status, _, body = facade.get("ImagingStudy", [("started", "ge2022"), ("started", "lt2020")])
    assert status == 200
    assert body["total"] == 0 and "entry" not in body
    assert facade.pacs.requests == []


def test_search_by_modality(facade):
    _, _, body = facade.get("ImagingStudy", [("modality", "CT")])
    assert ids(body) == ["1.2.3", "1.2.1"]
    _, _, body = facade.get("ImagingStudy", [("modality", f"{DCM}|MR,US"), ("patient", "P2")])
    assert ids(body) == ["1.2.4"]
    query = facade.pacs.finds("STUDY")[-1]
    assert list(query.ModalitiesInStudy) == ["MR", "US"] and query.PatientID == "P2"


def test_modality_post_filter():
    # A PACS that ignores ModalitiesInStudy as a matching key: Harmony filters.
    pacs = FakePacs([study("1.2.1", modalities=("CT",)), study("1.2.2", modalities=("MR",)),
                     study("1.2.3", modalities=None)])
    original = dicom_match

    def ignoring(ds, identifier):
        identifier = copy.deepcopy(identifier)
        if "ModalitiesInStudy" in identifier:
            del identifier.ModalitiesInStudy
        return original(ds, identifier)

    facade = Facade(pacs, include_series=False)
    globals()["dicom_match"] = ignoring
    try:
        _, _, body = facade.get("ImagingStudy", [("modality", "MR")])
    finally:
        globals()["dicom_match"] = original
    # 1.2.3 gave no ModalitiesInStudy: the PACS matched it, it stays.
    assert ids(body) == ["1.2.2", "1.2.3"]


def test_paging_reaches_every_study():
    studies = [study(f"1.2.{i}", date=f"202001{i % 28 + 1:02d}", time=None) for i in range(1, 24)]
    facade = Facade(FakePacs(studies), include_series=False)
    seen = []
    status, _, body = facade.get("ImagingStudy", [("patient", "P1"), ("_count", "5")])
    pages = 1
    first_links = links(body)
    assert set(first_links) == {"self", "first", "next", "last"}
    while True:
        assert status == 200 and body["total"] == 23
        seen += ids(body)
        nxt = links(body).get("next")
        if nxt is None:
            break
        base, query = link_query(nxt)
        assert base == f"{FHIR_BASE}/ImagingStudy"
        assert query["patient"] == ["P1"] and query["_count"] == ["5"]
        status, _, body = facade.get("ImagingStudy", [(k, v) for k, vs in query.items() for v in vs])
        pages += 1
    assert pages == 5
    assert sorted(seen) == sorted(s.StudyInstanceUID for s in studies)
    assert len(seen) == len(set(seen))
    last = links(body)
    assert set(last) == {"self", "first", "previous", "last"}
    assert link_query(last["self"])[1]["_offset"] == ["20"]
    assert link_query(last["previous"])[1]["_offset"] == ["15"]
    assert link_query(last["first"])[1]["_offset"] == ["0"]
    assert link_query(last["last"])[1]["_offset"] == ["20"]
    assert link_query(first_links["last"])[1]["_offset"] == ["20"]
    # Each page is one study C-FIND (every match collected, then the page cut).
    assert len(facade.pacs.finds("STUDY")) == 5


def test_links_keep_the_search_and_encode_values(facade):
    _, _, body = facade.get("ImagingStudy", [("started", "ge2020-01-01T00:00:00+01:00"), ("started", "lt2030"),
                                             ("identifier", "a|b c"), ("_offset", "1"), ("_count", "1")])
    self_link = links(body)["self"]
    assert self_link == (
        f"{FHIR_BASE}/ImagingStudy?started=ge2020-01-01T00:00:00%2B01:00&started=lt2030"
        "&identifier=a%7Cb%20c&_count=1&_offset=1"
    )
    assert link_query(links(body)["previous"])[1]["_offset"] == ["0"]


def test_offset_past_the_end_and_count_zero(facade):
    _, _, body = facade.get("ImagingStudy", [("patient", "P1"), ("_offset", "10")])
    assert body["total"] == 3 and "entry" not in body
    assert link_query(links(body)["previous"])[1]["_offset"] == ["0"]
    facade.pacs.requests.clear()
    _, _, body = facade.get("ImagingStudy", [("patient", "P1"), ("_count", "0")])
    assert body["total"] == 3 and "entry" not in body
    assert list(links(body)) == ["self"]
    assert facade.pacs.finds("SERIES") == []
    _, _, body = facade.get("ImagingStudy", [("_summary", "count")])
    assert body["total"] == 5 and "entry" not in body


def test_sorting(facade):
    _, _, body = facade.get("ImagingStudy", [])
    # Newest first; 1.2.2 and 1.2.4 share a day (times differ); undated last.
    assert ids(body) == ["1.2.3", "1.2.4", "1.2.2", "1.2.1", "1.2.5"]
    _, _, body = facade.get("ImagingStudy", [("_sort", "started")])
    assert ids(body) == ["1.2.1", "1.2.2", "1.2.4", "1.2.3", "1.2.5"]
    # Ties: by UID either way.
    pacs = FakePacs([study(uid, time=None) for uid in ("1.2.9", "1.2.10", "1.2.1")])
    tied = Facade(pacs, include_series=False)
    assert ids(tied.get("ImagingStudy", [("_sort", "-started")])[2]) == ["1.2.1", "1.2.10", "1.2.9"]
    assert ids(tied.get("ImagingStudy", [("_sort", "started")])[2]) == ["1.2.1", "1.2.10", "1.2.9"]


def test_page_size_is_capped():
    studies = [study(f"1.2.{i}") for i in range(12)]
    facade = Facade(FakePacs(studies), include_series=False, default_count=3, max_count=5)
    _, _, body = facade.get("ImagingStudy", [])
    assert len(ids(body)) == 3 and body["total"] == 12
    _, _, body = facade.get("ImagingStudy", [("_count", "50")])
    assert len(ids(body)) == 5
    assert link_query(links(body)["self"])[1]["_count"] == ["5"]


def test_too_many_matches():
    studies = [study(f"1.2.{i}") for i in range(6)]
    facade = Facade(FakePacs(studies), max_results=5)
    status, _, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert status == 400
    assert outcome(body) == ("too-costly", "More than 5 studies match; narrow the search")
    # The C-FIND was cancelled (C-CANCEL) and no series were asked.
    assert facade.pacs.streams[0].cancelled
    assert facade.pacs.finds("SERIES") == []
    facade = Facade(FakePacs(studies), max_results=6)
    assert facade.get("ImagingStudy", [("patient", "P1")])[0] == 200
    facade = Facade(two_patients(), max_results=2)
    status, _, body = facade.get("Patient", [])
    assert (status, outcome(body)) == (400, ("too-costly", "More than 2 patients match; narrow the search"))


def test_series_concurrency():
    studies = [study(f"1.2.{i}", date=f"202001{i + 1:02d}") for i in range(9)]
    pacs = FakePacs(studies, {f"1.2.{i}": [series(f"1.2.{i}.1")] for i in range(9)})
    pacs.hold = ("SERIES",)
    facade = Facade(pacs, series_concurrency=3)
    d = facade.start("GET", "ImagingStudy", [("_count", "7")])
    most = 0
    while pacs.held:
        most = max(most, len(pacs.held))
        assert not has_fired(d)
        pacs.release()
    status, _, body = decode(result_of(d))
    assert status == 200 and most == 3
    # Only the studies of the page were asked for their series.
    asked = [str(q.StudyInstanceUID) for q in pacs.finds("SERIES")]
    assert sorted(asked) == sorted(ids(body)) and len(asked) == 7
    assert all(len(e["series"]) == 1 for e in entries(body))


def test_a_failing_series_query_fails_the_search_and_cancels_the_rest():
    studies = [study(f"1.2.{i}", date=f"202001{i + 1:02d}") for i in range(4)]
    pacs = FakePacs(studies, {f"1.2.{i}": [series(f"1.2.{i}.1")] for i in range(4)})
    pacs.hold = ("SERIES",)
    facade = Facade(pacs, series_concurrency=2)
    d = facade.start("GET", "ImagingStudy", [])
    assert len(pacs.held) == 2
    request, held, response = pacs.held.pop(0)
    held.errback(UpstreamUnavailable("The PACS is unreachable"))
    status, _, body = decode(result_of(d))
    assert status == 502 and outcome(body) == ("transient", "The PACS is unreachable")
    # The other series query was cancelled; the remaining ones never started.
    assert len(pacs.finds("SERIES")) == 2


def test_without_series():
    facade = Facade(two_patients(), include_series=False)
    _, _, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert facade.pacs.finds("SERIES") == []
    by_id = {r["id"]: r for r in entries(body)}
    assert "series" not in by_id["1.2.2"] and "numberOfSeries" not in by_id["1.2.2"]
    assert by_id["1.2.1"]["numberOfSeries"] == 1  # the PACS's count


@pytest.mark.parametrize(
    "tz_option, own_offset, expected",
    [
        ("", None, "2020-01-01"),
        ("+01:00", None, "2020-01-01T10:15:00+01:00"),
        ("Z", None, "2020-01-01T10:15:00Z"),
        ("+01:00", "-0500", "2020-01-01T10:15:00-05:00"),
        ("", "+0530", "2020-01-01T10:15:00+05:30"),
        ("", "bad", "2020-01-01"),
    ],
)
def test_started_time_zone(tz_option, own_offset, expected):
    extra = {"TimezoneOffsetFromUTC": own_offset} if own_offset else {}
    facade = Facade(FakePacs([study("1.2.1", time="101500", **extra)]), timezone=tz_option, include_series=False)
    _, _, body = facade.get("ImagingStudy", [])
    assert entries(body)[0]["started"] == expected


def test_started_searches_in_the_study_time_zone():
    # 10:15 local at -05:00 is 15:15 UTC.
    pacs = FakePacs([study("1.2.1", time="101500", TimezoneOffsetFromUTC="-0500")])
    facade = Facade(pacs, include_series=False)
    assert ids(facade.get("ImagingStudy", [("started", "ge2020-01-01T15:00:00Z")])[2]) == ["1.2.1"]
    assert ids(facade.get("ImagingStudy", [("started", "ge2020-01-01T15:30:00Z")])[2]) == []
    # The date range asked is widened for values with a zone.
    assert facade.pacs.finds("STUDY")[-1].StudyDate == "20191230-"
    # The configured zone when the PACS gives none.
    facade = Facade(FakePacs([study("1.2.1", time="101500")]), include_series=False, timezone="+01:00")
    assert ids(facade.get("ImagingStudy", [("started", "lt2020-01-01T09:16:00Z")])[2]) == ["1.2.1"]
    assert ids(facade.get("ImagingStudy", [("started", "lt2020-01-01T09:15:00Z")])[2]) == []


def test_non_ascii_values_set_the_character_set():
    facade = Facade(two_patients())
    _, _, body = facade.get("Patient", [("name", "Jürgen")])
    assert [p["id"] for p in entries(body)] == ["pid.gezcamzu"]
    query = facade.pacs.finds("PATIENT")[0]
    assert query.SpecificCharacterSet == "ISO_IR 192" and query.PatientName == "*Jürgen*"
    facade.get("ImagingStudy", [("patient", "P1")])
    assert "SpecificCharacterSet" not in facade.pacs.finds("STUDY")[0]


def test_post_search(facade):
    body = urlencode([("patient", "P1"), ("modality", "CT")]).encode()
    status, _, found = facade.ask(
        "POST", "ImagingStudy/_search", [("_count", "1")],
        headers=[("Content-Type", "application/x-www-form-urlencoded")], body=body,
    )
    assert status == 200
    assert found["total"] == 2 and ids(found) == ["1.2.3"]
    base, query = link_query(links(found)["next"])
    assert base == f"{FHIR_BASE}/ImagingStudy"
    assert query == {"patient": ["P1"], "modality": ["CT"], "_count": ["1"], "_offset": ["1"]}
    status, _, found = facade.ask(
        "POST", "Patient/_search", headers=[("Content-Type", "application/x-www-form-urlencoded")],
        body=b"identifier=P2",
    )
    assert [p["id"] for p in entries(found)] == ["P2"]
    # A parameter in the URL and again in the body is a repeat.
    status, _, found = facade.ask(
        "POST", "ImagingStudy/_search", [("patient", "P1")],
        headers=[("Content-Type", "application/x-www-form-urlencoded")], body=b"patient=P2",
    )
    assert status == 400 and outcome(found)[1].startswith("Search parameter patient is given more than once")


def test_unknown_parameter_is_a_400(facade):
    status, _, body = facade.get("ImagingStudy", [("patient", "P1"), ("bodysite", "CHEST")])
    assert status == 400
    code, message = outcome(body)
    assert code == "invalid"
    assert message.startswith("Unknown or unsupported search parameter bodysite for ImagingStudy")
    assert facade.pacs.requests == []


# -- reads --------------------------------------------------------------------------------------


def test_read_imaging_study(facade):
    status, _, body = facade.get("ImagingStudy/1.2.2")
    assert status == 200
    assert body["id"] == "1.2.2" and body["resourceType"] == "ImagingStudy"
    assert [s["uid"] for s in body["series"]] == ["1.2.2.1", "1.2.2.2"]
    assert [str(q.StudyInstanceUID) for q in facade.pacs.finds("STUDY")] == ["1.2.2"]
    status, _, body = facade.get("ImagingStudy/1.2.99")
    assert (status, outcome(body)) == (404, ("not-found", "No such ImagingStudy"))
    facade.pacs.requests.clear()
    status, _, body = facade.get("ImagingStudy/not-a-uid")
    assert status == 404 and facade.pacs.requests == []


def test_read_patient(facade):
    status, _, body = facade.get("Patient/P2")
    assert status == 200
    assert body == {
        "resourceType": "Patient",
        "id": "P2",
        "identifier": [{"value": "P2", "assigner": {"display": "HOSP"}}],
        "name": [{"text": "Dr Jane Roe", "family": "Roe", "given": ["Jane"], "prefix": ["Dr"]}],
        "gender": "female",
        "birthDate": "1980-02-29",
    }
    query = facade.pacs.finds("PATIENT")[0]
    assert query.QueryRetrieveLevel == "PATIENT" and query.PatientID == "P2"
    status, _, body = facade.get("Patient/pid.gezcamzu")
    assert status == 200 and body["identifier"] == [{"value": "12 34"}] and body["gender"] == "other"
    assert "birthDate" not in body  # "1990" is not a DICOM date
    assert facade.pacs.finds("PATIENT")[-1].PatientID == "12 34"
    assert facade.get("Patient/P9")[0] == 404
    facade.pacs.requests.clear()
    assert facade.get("Patient/pid.MFRGG")[0] == 404
    assert facade.pacs.requests == []


# -- Patient searches -------------------------------------------------------------------------------


def test_patient_searches(facade):
    def found(query, **kwargs):
        status, _, body = facade.get("Patient", query, **kwargs)
        assert status == 200
        return [p["id"] for p in entries(body)]

    assert found([]) == ["pid.gezcamzu", "P1", "P2", "P4"]  # by PatientID
    assert found([("identifier", "P1")]) == ["P1"]
    assert found([("identifier", "P1,P2")]) == ["P1", "P2"]
    assert found([("_id", "pid.gezcamzu")]) == ["pid.gezcamzu"]
    assert found([("name", "jo")]) == ["P1"]
    assert found([("name", "DOE")]) == ["P1"]
    assert found([("name", "jane")]) == ["P2"]  # a given name
    assert found([("name", "dr")]) == ["P2"]  # a prefix
    assert found([("name", "oe")]) == []  # no part starts with it
    assert found([("name:contains", "oe")]) == ["P1", "P2", "P4"]
    assert found([("name:exact", "Jane")]) == ["P2"]
    assert found([("name:exact", "jane")]) == []
    assert found([("name", "JÜRGEN")]) == ["pid.gezcamzu"]
    # Harmony's own comparison ignores accents; this PACS's matching does not.
    assert found([("name", "jurgen")]) == []
    assert found([("birthdate", "1970")]) == ["P1"]
    assert found([("birthdate", "ge1975")]) == ["P2"]
    assert found([("gender", "female")]) == ["P2"]
    assert found([("gender", "male,other")]) == ["pid.gezcamzu", "P1"]
    assert found([("gender", "unknown")]) == ["P4"]
    _, _, body = facade.get("Patient", [("identifier", "P1")])
    assert body["entry"][0]["fullUrl"] == f"{FHIR_BASE}/Patient/P1"
    assert body["entry"][0]["resource"]["name"] == [{"text": "John Doe", "family": "Doe", "given": ["John"]}]
    assert links(body)["self"] == f"{FHIR_BASE}/Patient?identifier=P1&_count=20&_offset=0"


def test_patient_identifier_system_in_resources():
    facade = Facade(two_patients(), patient_identifier_system="urn:oid:1.2.3")
    _, _, body = facade.get("Patient", [("identifier", "urn:oid:1.2.3|P1")])
    assert entries(body)[0]["identifier"] == [{"system": "urn:oid:1.2.3", "value": "P1"}]
    _, _, body = facade.get("Patient", [("identifier", "urn:oid:9|P1")])
    assert body["total"] == 0


def test_patients_without_a_fhir_id():
    long_id = "x_" * 20
    pacs = FakePacs([study("1.2.1", long_id)], patients=[patient(long_id), patient("")])
    facade = Facade(pacs, include_series=False)
    _, _, body = facade.get("Patient", [])
    # The patient without a PatientID is left out; the long one has no id.
    assert body["total"] == 1
    [entry] = body["entry"]
    assert "fullUrl" not in entry and "id" not in entry["resource"]
    assert entry["resource"]["identifier"] == [{"value": long_id}]
    _, _, body = facade.get("ImagingStudy", [])
    assert entries(body)[0]["subject"] == {"identifier": {"value": long_id}, "display": "John Doe"}


# -- capabilities, other interactions --------------------------------------------------------------


def test_capability_statement(facade):
    status, headers, body = facade.get("metadata")
    assert status == 200
    assert body["resourceType"] == "CapabilityStatement"
    assert (body["status"], body["kind"], body["fhirVersion"]) == ("active", "instance", "4.0.1")
    assert body["date"] == "2023-11-14T22:13:20Z"  # the clock's
    assert body["implementation"]["url"] == FHIR_BASE
    assert "application/fhir+json" in body["format"]
    [rest] = body["rest"]
    assert rest["mode"] == "server"
    resources = {r["type"]: r for r in rest["resource"]}
    assert set(resources) == {"ImagingStudy", "Patient"}
    for resource in resources.values():
        assert [i["code"] for i in resource["interaction"]] == ["read", "search-type"]
    assert [p["name"] for p in resources["ImagingStudy"]["searchParam"]] == [
        "_id", "patient", "subject", "identifier", "started", "modality"
    ]
    assert [p["name"] for p in resources["Patient"]["searchParam"]] == [
        "_id", "identifier", "name", "birthdate", "gender"
    ]
    assert facade.pacs.requests == []
    status, _, _ = facade.ask("HEAD", "metadata")
    assert status == 200


@pytest.mark.parametrize(
    "method, path, status, allow",
    [
        ("POST", "ImagingStudy", 405, "GET, HEAD, OPTIONS"),
        ("PUT", "ImagingStudy/1.2.3", 405, "GET, HEAD, OPTIONS"),
        ("DELETE", "Patient/P1", 405, "GET, HEAD, OPTIONS"),
        ("PATCH", "Patient/P1", 405, "GET, HEAD, OPTIONS"),
        ("GET", "ImagingStudy/_history", 405, "OPTIONS"),
        ("GET", "ImagingStudy/1.2.3/_history", 405, "OPTIONS"),
        ("GET", "ImagingStudy/1.2.3/_history/1", 405, "OPTIONS"),
        ("GET", "Patient/$everything", 405, "OPTIONS"),
        ("GET", "Patient/P1/$everything", 405, "OPTIONS"),
        ("GET", "Patient/P1/ImagingStudy", 405, "OPTIONS"),
        ("GET", "", 405, "OPTIONS"),
        ("POST", "", 405, "OPTIONS"),
        ("GET", "_history", 405, "OPTIONS"),
        ("GET", "Observation", 404, None),
        ("GET", "Observation/1", 404, None),
        ("POST", "Observation", 404, None),
    ],
)
def test_unsupported_interactions(facade, method, path, status, allow):
    query = [("x", "1")] if method == "DELETE" and "/" not in path else ()
    got, headers, body = facade.ask(method, path, query)
    assert got == status
    code, message = outcome(body)
    assert code == ("not-supported" if status == 405 else "not-found")
    assert headers.get("allow") == allow
    assert facade.pacs.requests == []


def test_wrong_methods_are_refused_by_the_endpoint(facade):
    status, headers, body = facade.ask("GET", "ImagingStudy/_search")
    assert status == 405 and headers.get("allow") == "OPTIONS, POST"


def test_options(facade):
    response = result_of(facade.start("OPTIONS", "ImagingStudy"))
    assert response.status == 204 and response.headers.get("allow") == "GET, HEAD, OPTIONS"
    response = result_of(facade.start("OPTIONS", "Patient/_search"))
    assert response.headers.get("allow") == "POST, OPTIONS"
    response = result_of(facade.start("OPTIONS", "metadata"))
    assert response.headers.get("allow") == "GET, HEAD, OPTIONS"


def test_json_only(facade):
    status, _, body = facade.get("ImagingStudy", [("_format", "xml")])
    assert status == 406
    assert outcome(body) == ("not-supported", "This FHIR imaging facade answers JSON only (application/fhir+json)")
    status, _, _ = facade.get("metadata", headers=[("Accept", "application/fhir+xml")])
    assert status == 406
    for accept in ("application/fhir+json", "application/json", "text/html, */*;q=0.8", "application/*"):
        assert facade.get("metadata", headers=[("Accept", accept)])[0] == 200
    assert facade.get("metadata", headers=[("Accept", "application/json;q=0, text/html")])[0] == 406
    assert facade.get("ImagingStudy", [("_format", "json")])[0] == 200


def test_pretty(facade):
    response = result_of(facade.start("GET", "ImagingStudy", [("_pretty", "true"), ("patient", "P1")]))
    assert response.body.startswith(b'{\n  "resourceType": "Bundle"')
    assert "_pretty=true" in links(json.loads(response.body))["self"]


# -- PACS failures ------------------------------------------------------------------------------------


def test_pacs_failure_status_is_a_502(facade):
    facade.pacs.status = 0xC001
    status, _, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert status == 502
    assert outcome(body) == ("transient", "The PACS failed the query (DIMSE status 0xC001)")
    assert facade.get("Patient/P1")[0] == 502
    assert facade.get("ImagingStudy/1.2.1")[0] == 502
    # Warnings and cancels are not failures.
    facade.pacs.status = 0xB000
    assert facade.get("ImagingStudy", [("patient", "P1")])[0] == 200


def test_a_failing_series_status_fails_the_read():
    pacs = two_patients()
    facade = Facade(pacs)
    original = pacs.handle

    def series_fail(envelope):
        pacs.status = 0xA700 if envelope.dicom.level == "SERIES" else 0
        return original(envelope)

    pacs.handle = series_fail
    status, _, body = facade.get("ImagingStudy/1.2.1")
    assert status == 502 and outcome(body)[1] == "The PACS failed the query (DIMSE status 0xA700)"


@pytest.mark.parametrize(
    "error, status, code, message",
    [
        (UpstreamUnavailable("The PACS is unreachable"), 502, "transient", "The PACS is unreachable"),
        (UpstreamTimeout("The PACS did not accept the association in time"), 504, "timeout",
         "The PACS did not accept the association in time"),
    ],
)
def test_backend_errors(facade, error, status, code, message):
    facade.pacs.error = error
    got, _, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert (got, outcome(body)) == (status, (code, message))


@pytest.mark.parametrize(
    "error, status, message",
    [
        (DimseTimeout("no answer"), 504, "The PACS did not answer the query in time"),
        (AssociationAborted("aborted"), 502, "The PACS aborted the query"),
        (UpstreamTimeout("slow"), 504, "slow"),
    ],
)
def test_matches_stream_failures(facade, error, status, message):
    facade.pacs.stream_error = error
    got, _, body = facade.get("ImagingStudy", [("patient", "P1")])
    assert (got, outcome(body)[1]) == (status, message)


def test_a_backend_that_answers_no_dicom_result():
    @implementer(IBackend)
    class Http:
        name = "http"
        service_type = "http"

        def handle(self, envelope):
            return defer.succeed(ResponseEnvelope(status=200, body=Stream.from_bytes(b"x")))

        def close(self):
            return defer.succeed(None)

    facade = Facade(Http())
    status, _, body = facade.get("ImagingStudy", [])
    assert status == 502 and "needs a dicom_scu backend" in outcome(body)[1]


def test_unbound_or_misplaced_middleware():
    mw = fhir_imaging.FhirImaging("img", options(), BuildContext())
    env = RequestEnvelope(details=RequestDetails(method="GET", path="x"))
    with pytest.raises(Exception) as info:
        result_of(mw.request(env))
    assert "needs a fhir endpoint" in str(info.value)
    env.metadata.update({"fhir_interaction": "search-type", "fhir_resource_type": "ImagingStudy"})
    with pytest.raises(Exception) as info:
        result_of(mw.request(env))
    assert "not bound to a pipeline" in str(info.value)
    assert mw.response(env, ResponseEnvelope()) is None


def test_no_patient_data_in_logs(facade):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        facade.pacs.status = 0xC000
        facade.get("ImagingStudy", [("patient", "P1"), ("identifier", "ACC-SECRET")])
        facade.get("Patient", [("name", "Doe")])
        facade.pacs.status = 0
        facade.pacs.stream_error = AssociationAborted("aborted")
        facade.get("Patient/P2")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events
    text = " ".join(formatEvent(e) + repr(e) for e in events)
    assert "0xC000" in text
    for phi in ("P1", "P2", "ACC-SECRET", "Doe"):
        assert phi not in text


# -- through a whole gateway ---------------------------------------------------------------------------


GATEWAY_TOML = """
[proxy]
id = "unit"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 8080

[pipelines.imaging]
networks = ["default"]
endpoints = ["fhir_imaging"]
middleware = ["imaging"]
backends = ["pacs"]

[endpoints.fhir_imaging]
service = "fhir"
[endpoints.fhir_imaging.options]
path_prefix = "/imaging/fhir"

[middleware.imaging]
type = "fhir_imaging"
[middleware.imaging.options]
dicomweb_url = "/dicomweb"
jmix_url = "/jmix"
include_series = false

[backends.pacs]
service = "%s"
[backends.pacs.options]
%s
"""


def _gateway(tmp_path, backend_service, backend_options, registry, reactor):
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML % (backend_service, backend_options))
    config = load_config(str(tmp_path / "harmony.toml"), registry, environ={})
    gateway = build_gateway(config, registry, BuildContext(reactor=reactor, config=config))
    return StubTreq(gateway.apps["default"].resource())


def _fetch(stub, method, url, flush=None):
    d = stub.request(method, url)
    stub.flush()
    if flush is not None:
        flush()
        stub.flush()
    response = result_of(d)
    body = result_of(stub.content(response))
    return response, (json.loads(body) if body else None)


def test_whole_requests_through_a_gateway(tmp_path):
    pacs = two_patients()
    registry = builtin_registry()
    registry.add_service(
        ServiceType(name="fakepacs", backend_factory=lambda name, options, context: pacs,
                    backend_options=Schema({}))
    )
    stub = _gateway(tmp_path, "fakepacs", "", registry, Clock())
    url = "http://gw.test/imaging/fhir/ImagingStudy?patient=P1&_count=2"
    response, body = _fetch(stub, "GET", url)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/fhir+json; charset=utf-8"]
    validate(body)
    assert body["total"] == 3 and ids(body) == ["1.2.3", "1.2.2"]
    assert links(body)["next"] == "http://gw.test/imaging/fhir/ImagingStudy?patient=P1&_count=2&_offset=2"
    wado = entries(body)[0]["contained"][0]
    assert wado["address"] == "http://gw.test/dicomweb/studies/1.2.3"
    assert entries(body)[0]["contained"][1]["address"] == "http://gw.test/jmix/api/jmix?studyInstanceUid=1.2.3"
    head, head_body = _fetch(stub, "HEAD", url)
    assert head.code == 200 and head_body is None
    assert head.headers.getRawHeaders("content-type") == ["application/fhir+json; charset=utf-8"]
    response, body = _fetch(stub, "GET", "http://gw.test/imaging/fhir/ImagingStudy?foo=1")
    assert response.code == 400 and body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["diagnostics"].startswith("Unknown or unsupported search parameter foo")
    response, body = _fetch(stub, "GET", "http://gw.test/imaging/fhir/metadata")
    assert response.code == 200
    validate(body)
    assert body["implementation"]["url"] == "http://gw.test/imaging/fhir"
    for error, status, code in ((UpstreamUnavailable("The PACS is unreachable"), 502, "transient"),
                                (UpstreamTimeout("The PACS did not answer in time"), 504, "timeout")):
        pacs.error = error
        response, body = _fetch(stub, "GET", url)
        assert response.code == status
        validate(body)
        assert outcome(body) == (code, error.message)


def test_pacs_down_through_a_gateway_with_a_dicom_scu_backend(tmp_path):
    reactor = MemoryReactorClock()
    options = 'aet = "PACS"\nhost = "127.0.0.1"\nport = 4242\nconnect_timeout_secs = 5'
    stub = _gateway(tmp_path, "dicom_scu", options, builtin_registry(), reactor)
    url = "http://gw.test/imaging/fhir/ImagingStudy?patient=P1"

    def refuse():
        connector = reactor.connectors[-1]
        reactor.tcpClients[-1][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    response, body = _fetch(stub, "GET", url, refuse)
    assert response.code == 502
    validate(body)
    assert outcome(body) == ("transient", "The PACS is unreachable")

    def connect_then_wait():
        from twisted.internet.testing import StringTransport

        protocol = reactor.tcpClients[-1][2].buildProtocol(None)
        protocol.makeConnection(StringTransport())
        reactor.advance(6)

    response, body = _fetch(stub, "GET", url, connect_then_wait)
    assert response.code == 504
    validate(body)
    assert outcome(body) == ("timeout", "The PACS did not accept the association in time")


def test_name_filter_ignores_case_and_accents():
    search = patient_search([("name", "jurgen")])
    assert search.accepts(patient("x", "Müller^Jürgen"), {})
    assert search.accepts(patient("x", "MÜLLER^JÜRGEN"), {})
    assert not search.accepts(patient("x", "Müller^Hans"), {})
    assert not search.accepts(patient("x", None), {})
    exact = patient_search([("name:exact", "Jürgen")])
    assert exact.accepts(patient("x", "Müller^Jürgen"), {})
    assert not exact.accepts(patient("x", "Müller^Jurgen"), {})
    assert patient_search([("name", "hans")]).accepts(patient("x", "Müller^Karl Hans"), {})


def test_malformed_values_from_the_pacs_are_left_out():
    bad = study("1.2.1", date="2020-01-01", time="25:99", NumberOfStudyRelatedSeries=b"many",
                NumberOfStudyRelatedInstances="-3", TimezoneOffsetFromUTC="+2500")
    facade = Facade(FakePacs([bad], {"1.2.1": [series("1.2.1.1", number=None, SeriesTime="xx")]}), timezone="Z")
    status, _, body = facade.get("ImagingStudy", [])
    assert status == 200
    [resource] = entries(body)
    assert "started" not in resource  # "2020-01-01" is not a DICOM date
    assert resource["numberOfSeries"] == 1  # counted: the PACS's count was not a number
    assert "numberOfInstances" not in resource
    assert resource["series"] == [{"uid": "1.2.1.1", "modality": {"system": DCM, "code": "CT"}}]
