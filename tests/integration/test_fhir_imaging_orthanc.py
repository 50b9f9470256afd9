"""
The FHIR imaging facade (issue 10) through a real C{twistd -n harmony} in
front of the session's Orthanc: C{fhir} endpoint -> C{fhir_imaging}
middleware -> C{dicom_scu} backend -> Orthanc's DIMSE port.

One gateway for the module (L{gateway}) with five pipelines:

  - C{/fhir}: the facade over Orthanc (C{dicomweb_url} a path, C{jmix_url}
    an absolute URL, C{timezone = "Z"});
  - C{/fhir-small}: the same over Orthanc with C{max_results = 3},
    C{default_count = 2}, C{max_count = 3}, C{include_series = false};
  - C{/fhir-down}: nobody listens on the PACS port (502);
  - C{/fhir-slow}: a PACS that accepts the association and never answers
    the C-FIND (this module run as a script, L{silent_pacs_main}), backend
    C{timeout_secs = 0.5} (504);
  - C{/dicomweb}: the C{dicomweb_bridge} over Orthanc, so that the WADO-RS
    addresses of the ImagingStudy endpoints can be followed.

The data (L{data}): seven generated studies of two patients of this module
(fresh UIDs, a random tag in every identifier and name), several series
each, with various dates, times, modalities, body parts, accession numbers
and descriptions, stored in Orthanc through its REST API.  Every expected
answer is computed here from that data (L{STUDIES}) with the FHIR search
rules written out independently of Harmony's code (L{date_matches}):
never from Harmony's answers.  Searches that could see other tests' data in
the shared Orthanc are restricted to this module's patients or study UIDs.

Every resource is checked against fhirclient's R4 models in strict mode,
and fhirclient itself is the client of one paged search.
"""

import base64
import json
import sys
import urllib.request
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from harmonytest import Process, base_config, free_port, request, start_harmony, write_config

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
WADO_CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
JMIX_CONNECTION = "urn:harmony:endpoint-connection-type"
FHIR_JSON = "application/fhir+json"
SILENT_AET = "SILENTPACS"

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}

#: Patient key -> (PatientID template, PatientName template, birth date, sex,
#: FHIR gender).  "{tag}" is this run's tag.  B's PatientID has
#: underscores: not a valid FHIR id, so its resource id is encoded.
PATIENTS = {
    "A": ("FIA{tag}", "FHIRIMG{tag}^ALPHA^J", "19650302", "F", "female"),
    "B": ("FI_{tag}_B", "FHIRIMG{tag}^BRAVO", "19801231", "M", "male"),
}

#: Study key -> (patient, StudyDate, StudyTime or None, accession (template)
#: or None, StudyDescription or None, series: [(SeriesNumber, Modality,
#: BodyPartExamined or None, SeriesDescription or None, instances)]).
STUDIES = {
    "a1": ("A", "20210315", "102030", "ACC{tag}A1", "Chest CT", [
        (1, "CT", "CHEST", "Axial chest", 3),
        (2, "CT", "ABDOMEN", "Axial abdomen", 2),
    ]),
    "a2": ("A", "20220701", "080000", "ACC{tag}A2", "MR head", [
        (1, "MR", "HEAD", "T1 axial", 2),
    ]),
    "a3": ("A", "20220720", "164500", "ACC{tag}A3", "PET-CT", [
        (3, "OT", "XYZZY", "Key images", 1),
        (1, "CT", "CHEST", "CT for attenuation", 1),
        (2, "PT", None, "PET whole body", 2),
    ]),
    "a4": ("A", "20230105", "091500", "ACC{tag}A4", "US abdomen", [
        (1, "US", "ABDOMEN", None, 1),
    ]),
    "b1": ("B", "20210315", "143000", "ACC{tag}B1", "CT chest", [
        (1, "CT", "CHEST", None, 2),
    ]),
    "b2": ("B", "20221231", "110000", "ACC{tag}B2", "MR and CT of the head", [
        (2, "MR", "HEAD", "FLAIR", 1),
        (1, "CT", "HEAD", "Head CT", 2),
    ]),
    "b3": ("B", "20240229", None, None, None, [
        (1, "DX", "CHEST", "PA", 1),
    ]),
}


# -- the data ----------------------------------------------------------------------------


def fhir_patient_id(patient_id):
    """
    The FHIR id of a PatientID (the design's rule, written here again): the
    PatientID itself when it is a valid FHIR id not starting with C{pid.},
    else C{pid.} + unpadded lower-case base32 of its UTF-8 bytes.
    """
    import re

    if re.fullmatch(r"[A-Za-z0-9\-\.]{1,64}", patient_id) and not patient_id.startswith("pid."):
        return patient_id
    return "pid." + base64.b32encode(patient_id.encode()).decode().rstrip("=").lower()


def _instance(path, patient, study, series, number):
    """
    A small generated instance (8x8 MONOCHROME2, explicit VR little endian)
    of the given patient, study and series namespaces; returns its SOP
    Instance UID.
    """
    import numpy
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[series.modality]
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.PatientID = patient.id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    if study.time:
        ds.StudyTime = study.time
    ds.AccessionNumber = study.accession or ""
    if study.description:
        ds.StudyDescription = study.description
    ds.StudyID = study.key.upper()
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.Modality = series.modality
    if series.description:
        ds.SeriesDescription = series.description
    if series.body_part:
        ds.BodyPartExamined = series.body_part
    ds.SeriesDate = study.date
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = numpy.random.default_rng(number)
    ds.PixelData = rng.integers(0, 4096, size=(8, 8), dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop


@pytest.fixture(scope="module")
def data(orthanc, tmp_path_factory):
    """
    L{PATIENTS} and L{STUDIES} with this run's tag and fresh UIDs, stored
    in Orthanc.  C{.patients}: key -> namespace(id, fhir_id, name, family,
    given, birth_date, sex, gender); C{.studies}: key -> namespace(uid,
    patient, date, time, accession, description, series: [namespace(uid,
    number, modality, body_part, description, instances)]).  Deleted from
    Orthanc at the end of the module.
    """
    from peers import orthanc_store
    from pydicom.uid import generate_uid

    directory = tmp_path_factory.mktemp("fhir-imaging-data")
    tag = uuid.uuid4().hex[:8].upper()
    patients = {}
    for key, (pid, name, birth, sex, gender) in PATIENTS.items():
        pid, name = pid.format(tag=tag), name.format(tag=tag)
        family, *given = name.split("^")
        patients[key] = SimpleNamespace(key=key, id=pid, fhir_id=fhir_patient_id(pid), name=name, family=family,
                                        given=given, birth_date=birth, sex=sex, gender=gender)
    assert patients["A"].fhir_id == patients["A"].id
    assert patients["B"].fhir_id.startswith("pid.")
    studies, files = {}, []
    for key, (pkey, date, time_, accession, description, series_list) in STUDIES.items():
        study = SimpleNamespace(key=key, uid=generate_uid(), patient=patients[pkey], date=date, time=time_,
                                accession=accession.format(tag=tag) if accession else None,
                                description=description, series=[])
        studies[key] = study
        for number, modality, body_part, series_description, count in series_list:
            series = SimpleNamespace(uid=generate_uid(), number=number, modality=modality, body_part=body_part,
                                     description=series_description, instances=count)
            study.series.append(series)
            for i in range(count):
                path = directory / f"{key}-{number}-{i}.dcm"
                _instance(path, study.patient, study, series, i + 1)
                files.append(path)
    answers = orthanc_store(orthanc, files)
    yield SimpleNamespace(tag=tag, patients=patients, studies=studies)
    for parent in sorted({a["ParentStudy"] for a in answers}):
        req = urllib.request.Request(f"{orthanc.url}/studies/{parent}", method="DELETE")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.status


def started_range(study):
    """
    The instant range C{[lo, hi)} (UTC: the gateway runs with C{timezone =
    "Z"}) of a study's C{started}: one second with a time, the whole day
    without.
    """
    day = datetime.strptime(study.date, "%Y%m%d").replace(tzinfo=timezone.utc)
    if study.time is None:
        return day, day + timedelta(days=1)
    t = datetime.strptime(study.date + study.time, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    return t, t + timedelta(seconds=1)


def expected_started(study):
    if study.time is None:
        return f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:]}"
    return started_range(study)[0]


PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def search_range(value):
    """
    The FHIR date search value's prefix and instant range C{[lo, hi)} at
    its own precision (YYYY, YYYY-MM, YYYY-MM-DD, dateTime with seconds
    and a zone).
    """
    prefix = value[:2] if value[:2] in PREFIXES else "eq"
    value = value[2:] if value[:2] in PREFIXES else value
    if len(value) == 4:
        lo = datetime(int(value), 1, 1, tzinfo=timezone.utc)
        return prefix, lo, lo.replace(year=lo.year + 1)
    if len(value) == 7:
        lo = datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=timezone.utc)
        hi = lo.replace(year=lo.year + 1, month=1) if lo.month == 12 else lo.replace(month=lo.month + 1)
        return prefix, lo, hi
    if len(value) == 10:
        lo = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return prefix, lo, lo + timedelta(days=1)
    lo = datetime.fromisoformat(value)
    assert lo.tzinfo is not None and lo.microsecond == 0, value
    return prefix, lo, lo + timedelta(seconds=1)


def date_matches(value, study):
    """
    FHIR R4 date search (3.1.1.4.2 Date): the search value's range [sl, sh)
    against the study's C{started} range [tl, th).
    """
    prefix, sl, sh = search_range(value)
    tl, th = started_range(study)
    contained = sl <= tl and th <= sh
    return {
        "eq": contained,
        "ne": not contained,
        "gt": th > sh,
        "lt": tl < sl,
        "ge": th > sh or contained,
        "le": tl < sl or contained,
        "sa": tl >= sh,
        "eb": th <= sl,
    }[prefix]


def study_modalities(study):
    return {s.modality for s in study.series}


def sort_key(study):
    """
    Newest first (the default C{_sort=-started}).
    """
    return -started_range(study)[0].timestamp()


# -- the gateway ---------------------------------------------------------------------------

FHIR_PIPELINE = """
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_ep"]
middleware = ["{middleware}"]
backends = ["{name}_scu"]

[endpoints.{name}_ep]
service = "fhir"
[endpoints.{name}_ep.options]
path_prefix = "/{prefix}"

[backends.{name}_scu]
service = "dicom_scu"
[backends.{name}_scu.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "HARMONYFI"
connect_timeout_secs = 2
timeout_secs = {timeout}
"""

MIDDLEWARE = """
[middleware.fi]
type = "fhir_imaging"
[middleware.fi.options]
dicomweb_url = "/dicomweb"
jmix_url = "{jmix_url}"
timezone = "Z"

[middleware.fi_small]
type = "fhir_imaging"
[middleware.fi_small.options]
max_results = 3
default_count = 2
max_count = 3
include_series = false
"""

DICOMWEB_PIPELINE = """
[pipelines.fi_dicomweb]
networks = ["default"]
endpoints = ["fi_dicomweb_ep"]
middleware = ["fi_dwb"]
backends = ["fi_dicomweb_scu"]

[endpoints.fi_dicomweb_ep]
service = "dicomweb"
[endpoints.fi_dicomweb_ep.options]
path_prefix = "/dicomweb"

[middleware.fi_dwb]
type = "dicomweb_bridge"

[backends.fi_dicomweb_scu]
service = "dicom_scu"
[backends.fi_dicomweb_scu.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "HARMONYFIDW"
dimse_retrieve_mode = "get"
storage_dir = "{storage}"
connect_timeout_secs = 2
timeout_secs = 30
"""


@pytest.fixture(scope="module")
def silent_pacs(tmp_path_factory):
    """
    L{silent_pacs_main} in a subprocess: accepts associations, never
    answers a C-FIND.
    """
    directory = tmp_path_factory.mktemp("fhir-imaging-silent-pacs")
    port = free_port()
    proc = Process([sys.executable, Path(__file__).resolve(), "silent-pacs", port], directory, "silent-pacs")
    proc.wait_for_port(port)
    yield SimpleNamespace(port=port, process=proc)
    proc.stop()


@pytest.fixture(scope="module")
def gateway(orthanc, silent_pacs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fhir-imaging-gateway")
    port, dead_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    flavours = {
        # name: (prefix, middleware, PACS AE, PACS port, timeout)
        "fi_main": ("fhir", "fi", orthanc.aet, orthanc.dicom_port, 30),
        "fi_small": ("fhir-small", "fi_small", orthanc.aet, orthanc.dicom_port, 30),
        "fi_down": ("fhir-down", "fi", "NOBODY", dead_port, 30),
        "fi_slow": ("fhir-slow", "fi", SILENT_AET, silent_pacs.port, 0.5),
    }
    pipelines = {
        name: FHIR_PIPELINE.format(name=name, prefix=prefix, middleware=mw, aet=aet, port=pacs_port, timeout=timeout)
        for name, (prefix, mw, aet, pacs_port, timeout) in flavours.items()
    }
    pipelines["fi-middleware"] = MIDDLEWARE.format(jmix_url=f"{url}/jmix")
    pipelines["fi-dicomweb"] = DICOMWEB_PIPELINE.format(aet=orthanc.aet, port=orthanc.dicom_port,
                                                        storage=directory / "retrieved")
    extra = '\n[storage.options]\npath = "./store"\n'
    config = write_config(directory, base_config(port, proxy_id="fhir-imaging-it", extra=extra), pipelines)
    proc = start_harmony(directory, config, port)
    yield SimpleNamespace(port=port, url=url, base=f"{url}/fhir", process=proc, directory=directory,
                          dead_port=dead_port)
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def fi(gateway, data):
    return Facade(gateway, data)


class Facade:
    """
    Requests to the gateway's FHIR bases, with their checks.
    """

    def __init__(self, gateway, data):
        self.gateway = gateway
        self.data = data

    @property
    def all_uids(self):
        return [s.uid for s in self.data.studies.values()]

    def get(self, target, method="GET", body=None, headers=()):
        """
        C{target}: a path under the gateway (C{/fhir/...}) or an absolute
        URL on it.
        """
        if target.startswith("http"):
            parts = urlsplit(target)
            assert parts.scheme == "http" and parts.netloc == f"127.0.0.1:{self.gateway.port}", target
            target = parts.path + ("?" + parts.query if parts.query else "")
        return request(self.gateway.port, method, target, body=body, headers=list(headers))

    def fhir(self, target, status=200, **kwargs):
        response = self.get(target, **kwargs)
        assert response.status == status, (target, response)
        content_type = response.header("Content-Type") or ""
        assert content_type.split(";")[0].strip() == FHIR_JSON, (target, content_type)
        return response.json()

    def search(self, params, prefix="fhir", resource="ImagingStudy"):
        """
        One page of a search: C{params} a list of (name, value); returns
        the (validated) Bundle.
        """
        bundle = self.fhir(f"/{prefix}/{resource}?{query(params)}")
        check_bundle(bundle, self.gateway, prefix, resource)
        return bundle

    def search_all(self, params, prefix="fhir", resource="ImagingStudy"):
        """
        Every page of a search, following C{next} links: (entries' resources
        in order, totals of the pages, page sizes).
        """
        bundle = self.search(params, prefix, resource)
        resources, totals, sizes, seen = [], [], [], set()
        while True:
            entries = bundle.get("entry", [])
            resources += [e["resource"] for e in entries]
            totals.append(bundle.get("total"))
            sizes.append(len(entries))
            following = link(bundle, "next")
            if following is None:
                return resources, totals, sizes
            assert following not in seen, ("next link loops", following)
            seen.add(following)
            assert len(seen) < 50, "too many pages"
            bundle = self.fhir(following)
            check_bundle(bundle, self.gateway, prefix, resource)


def query(params):
    """
    A query string of (name, value) pairs; C{,}, C{:}, C{|} and C{/} are
    kept literal (FHIR's OR separator must stay a literal comma).
    """
    return "&".join(f"{quote(k, safe='_:')}={quote(v, safe=',:|/')}" for k, v in params)


def link(bundle, relation):
    urls = [entry["url"] for entry in bundle.get("link", []) if entry.get("relation") == relation]
    assert len(urls) <= 1, (relation, urls)
    return urls[0] if urls else None


# -- validation ----------------------------------------------------------------------------


def no_empty_values(value, where="$"):
    """
    FHIR JSON forbids empty strings, arrays and objects and nulls.
    """
    assert value is not None and value != "" and value != [] and value != {}, f"empty value at {where}"
    if isinstance(value, dict):
        for k, v in value.items():
            no_empty_values(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_empty_values(v, f"{where}[{i}]")
    elif isinstance(value, str):
        assert value == value.strip() or "\n" in value, f"untrimmed string at {where}: {value!r}"


def validate(resource):
    """
    The resource parses with fhirclient's R4 model of its type in strict
    mode (unknown or missing required elements, wrong types and malformed
    primitives raise); returns the model.
    """
    from fhirclient.models.fhirelementfactory import FHIRElementFactory

    no_empty_values(resource)
    model = FHIRElementFactory.instantiate(resource["resourceType"], resource)
    assert type(model).__name__ == resource["resourceType"], type(model)
    assert model.as_json()["resourceType"] == resource["resourceType"]
    return model


def check_bundle(bundle, gateway, prefix, resource):
    """
    A searchset Bundle through the gateway: valid, its links and full URLs
    on the gateway's public base.
    """
    validate(bundle)
    for entry in bundle.get("entry", []):
        validate(entry["resource"])
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", bundle
    assert isinstance(bundle.get("total"), int), bundle
    base = f"{gateway.url}/{prefix}/"
    relations = [entry["relation"] for entry in bundle["link"]]
    assert relations.count("self") == 1, relations
    if dict(parse_qsl(urlsplit(link(bundle, "self")).query)).get("_count") != "0":  # _count=0: the total only
        assert "first" in relations and "last" in relations, relations
    for entry in bundle["link"]:
        assert entry["url"].startswith(f"{base}{resource}?") or entry["url"] == f"{base}{resource}", entry
    for entry in bundle.get("entry", []):
        res = entry["resource"]
        assert res["resourceType"] == resource, entry
        assert entry["fullUrl"] == f"{base}{resource}/{res['id']}", entry
        assert entry["search"]["mode"] == "match", entry


def outcome(response, status, code=None):
    """
    An OperationOutcome error answer: its issue, checked.
    """
    assert response.status == status, response
    assert (response.header("Content-Type") or "").split(";")[0].strip() == FHIR_JSON, response
    body = response.json()
    validate(body)
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["severity"] in ("error", "fatal"), issue
    if code is not None:
        assert issue["code"] == code, issue
    return issue


# -- expected content ----------------------------------------------------------------------


def check_imaging_study(resource, study, gateway):
    """
    An ImagingStudy against the study's DICOM data.
    """
    assert resource["resourceType"] == "ImagingStudy"
    assert resource["id"] == study.uid
    assert resource["status"] == "available"
    identifiers = resource["identifier"]
    uid_ids = [i for i in identifiers if i.get("system") == "urn:dicom:uid"]
    assert [i["value"] for i in uid_ids] == [f"urn:oid:{study.uid}"], identifiers
    acsn = [i for i in identifiers
            if any(c.get("system") == V2_0203 and c.get("code") == "ACSN" for c in i.get("type", {}).get("coding", []))]
    if study.accession:
        assert [i["value"] for i in acsn] == [study.accession], identifiers
    else:
        assert acsn == [], identifiers
    subject = resource["subject"]
    assert subject["reference"] == f"Patient/{study.patient.fhir_id}", subject
    if "display" in subject:
        assert study.patient.family.lower() in subject["display"].lower(), subject
    started = resource["started"]
    expected = expected_started(study)
    if isinstance(expected, str):
        assert started == expected, (study.key, started)
    else:
        assert "T" in started and (started.endswith("Z") or started[-6] in "+-"), (study.key, started)
        assert datetime.fromisoformat(started) == expected, (study.key, started)
    codings = resource["modality"]
    assert all(c["system"] == DCM for c in codings), codings
    assert sorted(c["code"] for c in codings) == sorted(study_modalities(study)), (study.key, codings)
    assert resource["numberOfSeries"] == len(study.series), study.key
    assert resource["numberOfInstances"] == sum(s.instances for s in study.series), study.key
    if study.description:
        assert resource["description"] == study.description
    else:
        assert "description" not in resource, resource
    check_endpoints(resource, study, gateway)


def check_series(resource, study):
    expected = sorted(study.series, key=lambda s: (s.number, s.uid))
    series = resource["series"]
    assert [s["uid"] for s in series] == [s.uid for s in expected], study.key
    for got, want in zip(series, expected):
        assert got["number"] == want.number, got
        assert got["modality"]["system"] == DCM and got["modality"]["code"] == want.modality, got
        assert got["numberOfInstances"] == want.instances, got
        if want.description:
            assert got["description"] == want.description, got
        else:
            assert "description" not in got, got
        if "started" in got:
            assert got["started"].startswith(f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:]}"), got
        site = got.get("bodySite")
        if want.body_part is None:
            assert site is None, got
        elif want.body_part == "XYZZY":  # in no table: display only
            assert set(site) == {"display"} and site["display"].upper() == "XYZZY", got
        else:
            code = body_part_code(want.body_part)
            assert site["system"] == SNOMED and site["code"] == code.value, (want.body_part, got)
            assert site["display"].lower() == code.meaning.lower(), (want.body_part, got)


def body_part_code(term):
    """
    The SNOMED CT code of a Body Part Examined defined term in PS3.16 CID
    4031 (Common Anatomic Regions), from pydicom's copy of the DICOM
    content mapping resource (CHEST -> "Chest" 816094009, ...).
    """
    from pydicom.sr.codedict import codes

    code = getattr(codes.CID4031, term.title())
    assert code.scheme_designator == "SCT", code
    return code


def check_endpoints(resource, study, gateway):
    """
    The contained WADO-RS and JMIX Endpoints, addresses on Harmony.
    """
    contained = {c["id"]: c for c in resource.get("contained", [])}
    references = [e["reference"] for e in resource["endpoint"]]
    assert sorted(references) == ["#jmix", "#wado"], references
    assert set(contained) == {"wado", "jmix"}, contained
    wado, jmix = contained["wado"], contained["jmix"]
    for endpoint in (wado, jmix):
        assert endpoint["resourceType"] == "Endpoint" and endpoint["status"] == "active", endpoint
    assert wado["connectionType"] == {"system": WADO_CONNECTION, "code": "dicom-wado-rs"}, wado
    assert wado["payloadMimeType"] == ["application/dicom"], wado
    assert wado["address"] == f"{gateway.url}/dicomweb/studies/{study.uid}", wado
    assert jmix["connectionType"] == {"system": JMIX_CONNECTION, "code": "jmix"}, jmix
    assert jmix["payloadMimeType"] == ["application/zip"], jmix
    assert jmix["address"] == f"{gateway.url}/jmix/api/jmix?studyInstanceUid={study.uid}", jmix


def ids(resources):
    return [r["id"] for r in resources]


# -- searches: exactly the matching studies --------------------------------------------------

#: name -> search parameters, (name, value template) pairs; the expected
#: studies come from L{expected_for}.  Templates: {A}, {B} PatientIDs, {fA}, {fB} FHIR
#: ids, {base} the FHIR base URL, {<study key>} study UIDs, {acc:<key>}
#: accession numbers, {ALL} every study's urn:oid (comma-separated).
SEARCHES = {
    "patient-bare": [("patient", "{fA}")],
    "patient-reference": [("patient", "Patient/{fA}")],
    "patient-encoded-id": [("patient", "{fB}")],
    "subject-reference": [("subject", "Patient/{fB}")],
    "subject-url": [("subject", "{base}/Patient/{fB}")],
    "patient-unknown": [("patient", "Patient/NOSUCH{tag}")],
    "identifier-urn-oid": [("identifier", "urn:oid:{a2}")],
    "identifier-system-urn": [("identifier", "urn:dicom:uid|urn:oid:{b1}")],
    "identifier-system-bare": [("identifier", "urn:dicom:uid|{b1}")],
    "identifier-bare-uid": [("identifier", "{a3}")],
    "identifier-uid-list": [("identifier", "urn:oid:{a1},urn:oid:{b3}")],
    "identifier-accession": [("identifier", "{acc:a4}")],
    "identifier-accession-system": [("identifier", "http://hospital.example/acsn|{acc:b1}")],
    "identifier-accession-list": [("identifier", "{acc:a1},{acc:b2}")],
    "identifier-and-patient": [("identifier", "urn:oid:{a1},urn:oid:{b1}"), ("patient", "{fB}")],
    "identifier-unknown": [("identifier", "urn:oid:1.2.3.999999.{tag_digits}")],
    "started-year": [("identifier", "{ALL}"), ("started", "2022")],
    "started-month": [("identifier", "{ALL}"), ("started", "2022-07")],
    "started-day": [("identifier", "{ALL}"), ("started", "2021-03-15")],
    "started-eq-day": [("identifier", "{ALL}"), ("started", "eq2022-12-31")],
    "started-eq-day-dateonly": [("identifier", "{ALL}"), ("started", "eq2024-02-29")],
    "started-ge-day": [("identifier", "{ALL}"), ("started", "ge2022-07-02")],
    "started-gt-month": [("identifier", "{ALL}"), ("started", "gt2022-07")],
    "started-lt-year": [("identifier", "{ALL}"), ("started", "lt2022")],
    "started-le-day": [("identifier", "{ALL}"), ("started", "le2022-07-20")],
    "started-sa-day": [("identifier", "{ALL}"), ("started", "sa2022-07-20")],
    "started-eb-day": [("identifier", "{ALL}"), ("started", "eb2021-03-16")],
    "started-ge-datetime": [("identifier", "{ALL}"), ("started", "ge2021-03-15T12:00:00Z")],
    "started-gt-datetime-exact": [("identifier", "{ALL}"), ("started", "gt2022-07-20T16:45:00Z")],
    "started-le-datetime-exact": [("identifier", "{ALL}"), ("started", "le2022-07-20T16:45:00Z")],
    "started-lt-datetime-exact": [("identifier", "{ALL}"), ("started", "lt2022-07-20T16:45:00Z")],
    "started-eq-datetime": [("identifier", "{ALL}"), ("started", "2021-03-15T14:30:00+00:00")],
    "started-range": [("identifier", "{ALL}"), ("started", "ge2022-01-01"), ("started", "lt2023-01-01")],
    "started-range-datetime": [("patient", "{fA}"), ("started", "gt2021-03-15T10:20:30Z"),
                               ("started", "le2022-07-20")],
    "started-empty-range": [("identifier", "{ALL}"), ("started", "ge2023"), ("started", "lt2022")],
    "started-none": [("identifier", "{ALL}"), ("started", "ge2025")],
    "patient-started": [("patient", "{fB}"), ("started", "ge2022")],
    "modality-ct": [("identifier", "{ALL}"), ("modality", "CT")],
    "modality-list": [("identifier", "{ALL}"), ("modality", "MR,PT")],
    "modality-system": [("identifier", "{ALL}"), ("modality", f"{DCM}|US")],
    "modality-system-list": [("identifier", "{ALL}"), ("modality", f"{DCM}|OT,{DCM}|DX")],
    "modality-patient": [("patient", "{fB}"), ("modality", "DX")],
    "modality-none": [("patient", "{fA}"), ("modality", "DX")],
    "patient-modality-started": [("patient", "Patient/{fA}"), ("modality", "CT"), ("started", "ge2022")],
}


def fill(template, data, base):
    names = {
        "A": data.patients["A"].id, "B": data.patients["B"].id,
        "fA": data.patients["A"].fhir_id, "fB": data.patients["B"].fhir_id,
        "base": base, "tag": data.tag, "tag_digits": str(int(data.tag, 16)),
        "ALL": ",".join(f"urn:oid:{s.uid}" for s in data.studies.values()),
    }
    for key, study in data.studies.items():
        names[key] = study.uid
        names[f"acc:{key}"] = study.accession or ""
    out = template
    for key in sorted(names, key=len, reverse=True):
        out = out.replace("{" + key + "}", names[key])
    assert "{" not in out, out
    return out


def expected_for(params, data):
    """
    The studies matching C{params} (filled), computed from the data: the
    search parameters ANDed, values of one parameter ORed.
    """
    matching = []
    for study in data.studies.values():
        ok = True
        for name, value in params:
            if name in ("patient", "subject"):
                fid = value.rsplit("/", 1)[-1]
                ok &= fid == study.patient.fhir_id
            elif name == "identifier":
                values = [v.split("|", 1)[-1] for v in value.split(",")]
                values = [v[len("urn:oid:"):] if v.startswith("urn:oid:") else v for v in values]
                ok &= study.uid in values or (study.accession is not None and study.accession in values)
            elif name == "started":
                ok &= date_matches(value, study)
            elif name == "modality":
                codes = {v.split("|", 1)[-1] for v in value.split(",")}
                ok &= bool(codes & study_modalities(study))
            else:
                raise AssertionError(name)
        if ok:
            matching.append(study)
    return sorted(matching, key=lambda s: (sort_key(s), s.uid))


@pytest.mark.parametrize("name", list(SEARCHES))
def test_search(fi, name):
    """
    The search returns exactly the matching studies (total, one page,
    newest first), each resource right.
    """
    params = [(k, fill(v, fi.data, fi.gateway.base)) for k, v in SEARCHES[name]]
    expected = expected_for(params, fi.data)
    bundle = fi.search(params + [("_count", "100")])
    resources = [e["resource"] for e in bundle.get("entry", [])]
    assert ids(resources) == [s.uid for s in expected], (name, params)
    assert bundle["total"] == len(expected), name
    assert link(bundle, "next") is None
    for resource in resources:
        check_imaging_study(resource, fi.data.studies[_key(fi.data, resource["id"])], fi.gateway)


def test_expected_sets_are_not_trivial(data):
    """
    The date and modality searches above discriminate: neither all nor none
    of the studies match most of them (a broken rule would still pass the
    searches otherwise).
    """
    counts = {}
    for name, templates in SEARCHES.items():
        params = [(k, fill(v, data, "http://x")) for k, v in templates]
        counts[name] = len(expected_for(params, data))
    assert counts["patient-bare"] == counts["patient-reference"] == 4
    assert counts["patient-encoded-id"] == counts["subject-reference"] == counts["subject-url"] == 3
    assert counts["patient-unknown"] == counts["identifier-unknown"] == 0
    assert counts["identifier-uid-list"] == counts["identifier-accession-list"] == 2
    assert counts["identifier-and-patient"] == counts["identifier-accession-system"] == 1
    assert counts["started-year"] == 3 and counts["started-month"] == 2 and counts["started-day"] == 2
    assert counts["started-gt-datetime-exact"] == 3 and counts["started-le-datetime-exact"] == 4
    assert counts["started-lt-datetime-exact"] == 3 and counts["started-eq-datetime"] == 1
    assert counts["started-range"] == 3 and counts["started-range-datetime"] == 2
    assert counts["started-empty-range"] == 0 and counts["started-eq-day-dateonly"] == 1
    assert counts["modality-ct"] == 4 and counts["modality-list"] == 3 and counts["modality-system-list"] == 2
    assert counts["patient-modality-started"] == 1


def _key(data, uid):
    return next(k for k, s in data.studies.items() if s.uid == uid)


def test_study_content_and_series(fi):
    """
    Every study of the module, found by identifier: identifiers, subject,
    started, modalities, counts, description, series (uid, number, modality,
    body site, instance counts, order), endpoints.
    """
    bundle = fi.search([("identifier", fill("{ALL}", fi.data, "")), ("_count", "20")])
    resources = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    assert sorted(resources) == sorted(fi.all_uids)
    for key, study in fi.data.studies.items():
        check_imaging_study(resources[study.uid], study, fi.gateway)
        check_series(resources[study.uid], study)


def test_read_imaging_study(fi):
    """
    C{ImagingStudy/<uid>}: the same resource the search gives; an unknown
    UID is a 404 OperationOutcome.
    """
    found = {e["resource"]["id"]: e["resource"] for e in
             fi.search([("identifier", fill("{ALL}", fi.data, "")), ("_count", "20")])["entry"]}
    for key, study in fi.data.studies.items():
        resource = fi.fhir(f"/fhir/ImagingStudy/{study.uid}")
        validate(resource)
        check_imaging_study(resource, study, fi.gateway)
        check_series(resource, study)
        assert resource == found[study.uid], key
    outcome(fi.get(f"/fhir/ImagingStudy/1.2.3.{int(fi.data.tag, 16)}.404"), 404, "not-found")


def test_endpoint_address_is_served(fi):
    """
    The WADO-RS address of a study is Harmony's DICOMweb: QIDO-RS under it
    lists exactly the study's series.
    """
    study = fi.data.studies["a3"]
    resource = fi.fhir(f"/fhir/ImagingStudy/{study.uid}")
    address = next(c["address"] for c in resource["contained"] if c["id"] == "wado")
    response = fi.get(address + "/series", headers=[("Accept", "application/dicom+json")])
    assert response.status == 200, response
    uids = sorted(m["0020000E"]["Value"][0] for m in response.json())
    assert uids == sorted(s.uid for s in study.series)


def test_post_search_and_head(fi):
    """
    C{POST ImagingStudy/_search} (form body) answers as the GET; HEAD has
    the GET's status and type, no body.
    """
    pa = fi.data.patients["A"]
    get = fi.search([("patient", pa.fhir_id), ("modality", "CT,US")])
    body = query([("patient", pa.fhir_id), ("modality", "CT,US")]).encode()
    response = fi.get("/fhir/ImagingStudy/_search", method="POST", body=body,
                      headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert response.status == 200, response
    post = response.json()
    check_bundle(post, fi.gateway, "fhir", "ImagingStudy")
    assert ids(e["resource"] for e in post["entry"]) == ids(e["resource"] for e in get["entry"])
    assert post["total"] == get["total"] == 3
    head = fi.get(f"/fhir/ImagingStudy?{query([('patient', pa.fhir_id)])}", method="HEAD")
    assert head.status == 200 and head.body == b"", head
    assert head.header("Content-Type").split(";")[0] == FHIR_JSON


# -- paging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
def test_paging_reaches_every_study_once(fi, count):
    """
    Following C{next} through Harmony from a C{_count} page reaches every
    study exactly once, in order (newest first), every page with the right
    total; previous/first/last links are on every page.
    """
    params = [("identifier", fill("{ALL}", fi.data, "")), ("_count", str(count))]
    resources, totals, sizes = fi.search_all(params)
    expected = expected_for(params[:1], fi.data)
    assert ids(resources) == [s.uid for s in expected]
    assert totals == [len(expected)] * len(totals)
    n = len(expected)
    assert sizes == [count] * (n // count) + ([n % count] if n % count else [])
    # the second page's links
    first = fi.search(params)
    second = fi.fhir(link(first, "next"))
    check_bundle(second, fi.gateway, "fhir", "ImagingStudy")
    assert link(first, "previous") is None
    assert link(second, "previous") is not None
    back = fi.fhir(link(second, "previous"))
    assert ids(e["resource"] for e in back["entry"]) == ids(e["resource"] for e in first["entry"])
    last = fi.fhir(link(first, "last"))
    assert ids(e["resource"] for e in last["entry"]) == [s.uid for s in expected][(n - 1) // count * count:]
    self_params = dict(parse_qsl(urlsplit(link(second, "self")).query))
    assert self_params.get("_count") == str(count), self_params
    assert "identifier" in self_params


def test_paging_by_patient_and_sort(fi):
    pa = fi.data.patients["A"]
    resources, totals, _ = fi.search_all([("patient", f"Patient/{pa.fhir_id}"), ("_count", "1")])
    expected = [s.uid for s in expected_for([("patient", pa.fhir_id)], fi.data)]
    assert ids(resources) == expected and totals == [4] * 4
    ascending, _, _ = fi.search_all([("patient", pa.fhir_id), ("_count", "3"), ("_sort", "started")])
    assert ids(ascending) == list(reversed(expected))
    descending, _, _ = fi.search_all([("patient", pa.fhir_id), ("_sort", "-started")])
    assert ids(descending) == expected


def test_offset_and_count_zero(fi):
    params = [("identifier", fill("{ALL}", fi.data, ""))]
    expected = [s.uid for s in expected_for(params, fi.data)]
    bundle = fi.search(params + [("_count", "2"), ("_offset", "5")])
    assert ids(e["resource"] for e in bundle["entry"]) == expected[5:7]
    assert bundle["total"] == 7 and link(bundle, "next") is None and link(bundle, "previous") is not None
    beyond = fi.search(params + [("_offset", "50")])
    assert beyond["total"] == 7 and "entry" not in beyond
    zero = fi.search(params + [("_count", "0")])
    assert zero["total"] == 7 and "entry" not in zero


def test_limits_and_no_series(fi):
    """
    C{/fhir-small}: C{default_count} 2, C{_count} capped at C{max_count} 3,
    more than C{max_results} (3) matches is a 400 C{too-costly}; with
    C{include_series = false} there are no series but the counts stay.
    """
    pa, pb = fi.data.patients["A"], fi.data.patients["B"]
    issue = outcome(fi.get(f"/fhir-small/ImagingStudy?patient={pa.fhir_id}"), 400, "too-costly")
    assert "3" in issue.get("diagnostics", ""), issue
    bundle = fi.search([("patient", pb.fhir_id)], prefix="fhir-small")
    expected = expected_for([("patient", pb.fhir_id)], fi.data)
    assert bundle["total"] == 3 and len(bundle["entry"]) == 2 and link(bundle, "next")
    capped = fi.search([("patient", pb.fhir_id), ("_count", "50")], prefix="fhir-small")
    assert ids(e["resource"] for e in capped["entry"]) == [s.uid for s in expected]
    for entry in capped["entry"]:
        resource = entry["resource"]
        study = fi.data.studies[_key(fi.data, resource["id"])]
        assert "series" not in resource, resource
        assert resource["numberOfSeries"] == len(study.series)
        assert resource["numberOfInstances"] == sum(s.instances for s in study.series)


# -- fhirclient as the client ---------------------------------------------------------------


def test_fhirclient_search(fi):
    """
    fhirclient (R4 models, strict) reads Harmony's CapabilityStatement and
    searches through it, following the paging links itself.
    """
    from fhirclient import client
    from fhirclient.models.imagingstudy import ImagingStudy
    from fhirclient.models.patient import Patient

    smart = client.FHIRClient(settings={"app_id": "harmony-it", "api_base": fi.gateway.base})
    smart.server.session.trust_env = False  # no proxies from the environment: 127.0.0.1 only
    assert smart.prepare() is True  # fetches /metadata and parses it (CapabilityStatement model)
    statement = smart.server.capabilityStatement
    assert statement.fhirVersion == "4.0.1" and statement.kind == "instance"
    types = {r.type: r for r in statement.rest[0].resource}
    for name in ("ImagingStudy", "Patient"):
        codes = {i.code for i in types[name].interaction}
        assert {"read", "search-type"} <= codes, (name, codes)
    pa = fi.data.patients["A"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # perform_resources: the brief's API
        found = ImagingStudy.where(struct={"patient": f"Patient/{pa.fhir_id}", "_count": "1"}).perform_resources(
            smart.server)
        by_modality = ImagingStudy.where(struct={"identifier": fill("{ALL}", fi.data, ""), "modality": "MR"}
                                         ).perform_resources(smart.server)
    expected = expected_for([("patient", pa.fhir_id)], fi.data)
    assert [r.id for r in found] == [s.uid for s in expected]
    assert all(isinstance(r, ImagingStudy) for r in found)
    for resource, study in zip(found, expected):
        assert resource.subject.reference == f"Patient/{pa.fhir_id}"
        assert resource.numberOfInstances == sum(s.instances for s in study.series)
        assert [s.uid for s in resource.series] == [s.uid for s in sorted(study.series, key=lambda s: s.number)]
    assert sorted(r.id for r in by_modality) == sorted(s.uid for s in fi.data.studies.values()
                                                       if "MR" in study_modalities(s))
    patient = Patient.read(pa.fhir_id, smart.server)
    assert patient.birthDate.isostring == "1965-03-02" and patient.gender == "female"


def test_capability_statement(fi):
    statement = fi.fhir("/fhir/metadata")
    validate(statement)
    assert statement["resourceType"] == "CapabilityStatement" and statement["status"] == "active"
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    assert "json" in statement["format"] or "application/fhir+json" in statement["format"]
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    resources = {r["type"]: r for r in rest["resource"]}
    study_params = {p["name"] for p in resources["ImagingStudy"]["searchParam"]}
    assert {"patient", "subject", "identifier", "started", "modality"} <= study_params, study_params
    assert {"identifier"} <= {p["name"] for p in resources["Patient"]["searchParam"]}


# -- Patient ---------------------------------------------------------------------------------


def check_patient(resource, patient):
    assert resource["resourceType"] == "Patient" and resource["id"] == patient.fhir_id
    assert [i["value"] for i in resource["identifier"]] == [patient.id], resource
    name = resource["name"][0]
    assert name["family"] == patient.family, name
    assert name.get("given", []) == patient.given, name
    assert resource["birthDate"] == f"{patient.birth_date[:4]}-{patient.birth_date[4:6]}-{patient.birth_date[6:]}"
    assert resource["gender"] == patient.gender


@pytest.mark.parametrize("key", ["A", "B"])
def test_patient_search_and_read(fi, key):
    patient = fi.data.patients[key]
    bundle = fi.search([("identifier", patient.id)], resource="Patient")
    assert bundle["total"] == 1 and len(bundle["entry"]) == 1, bundle
    check_patient(bundle["entry"][0]["resource"], patient)
    resource = fi.fhir(f"/fhir/Patient/{patient.fhir_id}")
    validate(resource)
    check_patient(resource, patient)
    assert resource == bundle["entry"][0]["resource"]
    by_id = fi.search([("_id", patient.fhir_id)], resource="Patient")
    assert [e["resource"]["id"] for e in by_id["entry"]] == [patient.fhir_id]
    # every study's subject reference resolves to this patient
    studies = fi.search([("patient", patient.fhir_id)])
    for entry in studies["entry"]:
        reference = entry["resource"]["subject"]["reference"]
        assert fi.fhir(f"/fhir/{reference}") == resource


def test_patient_demographic_searches(fi):
    pa, pb = fi.data.patients["A"], fi.data.patients["B"]
    family = pa.family.lower()

    def found(params):
        bundle = fi.search(params, resource="Patient")
        assert bundle["total"] == len(bundle.get("entry", []))
        return sorted(e["resource"]["id"] for e in bundle.get("entry", []))

    assert found([("name", family)]) == sorted([pa.fhir_id, pb.fhir_id])
    assert found([("name", family[:-2])]) == sorted([pa.fhir_id, pb.fhir_id])  # "starts with"
    assert found([("name", family), ("gender", "male")]) == [pb.fhir_id]
    assert found([("name", family), ("birthdate", "1965-03-02")]) == [pa.fhir_id]
    assert found([("name", family), ("birthdate", "1966")]) == []
    assert found([("identifier", f"NOSUCH{fi.data.tag}")]) == []
    outcome(fi.get(f"/fhir/Patient/NOSUCH{fi.data.tag}"), 404, "not-found")


# -- errors ---------------------------------------------------------------------------------


def test_bad_requests(fi):
    """
    Unknown or malformed search parameters are 400 OperationOutcomes that
    name the parameter; unsupported interactions 404/405; and the gateway
    keeps serving.
    """
    pa = fi.data.patients["A"]
    bad = {
        f"patient={pa.fhir_id}&bodysite=CHEST": "bodysite",
        f"patient={pa.fhir_id}&_elements=id": "_elements",
        "started=ne2022": "started",
        "started=ap2022": "started",
        "started=2022-13": "started",
        "modality=http://loinc.org|CT": "modality",
        "patient=Practitioner/x": "patient",
        f"patient={pa.fhir_id}&patient={pa.fhir_id}": "patient",
        "_count=abc": "_count",
        "_count=-1": "_count",
        "_offset=-3": "_offset",
        "_sort=description": "_sort",
    }
    for q, name in bad.items():
        issue = outcome(fi.get(f"/fhir/ImagingStudy?{q}"), 400, "invalid")
        assert name in json.dumps(issue), (q, issue)
    issue = outcome(fi.get(f"/fhir/Patient?identifier={pa.id}&address=x"), 400, "invalid")
    assert "address" in json.dumps(issue)
    outcome(fi.get("/fhir/Observation?patient=x"), 404)
    outcome(fi.get("/fhir/ImagingStudy", method="POST", body=b"{}",
                   headers=[("Content-Type", "application/fhir+json")]), 405)
    outcome(fi.get(f"/fhir/ImagingStudy/{fi.data.studies['a1'].uid}", method="DELETE"), 405)
    # still serving
    bundle = fi.search([("patient", pa.fhir_id)])
    assert bundle["total"] == 4


def test_pacs_down_is_502(fi):
    pa = fi.data.patients["A"]
    for target in (f"/fhir-down/ImagingStudy?patient={pa.fhir_id}", "/fhir-down/ImagingStudy/1.2.3",
                   f"/fhir-down/Patient?identifier={pa.id}"):
        outcome(fi.get(target), 502, "transient")
    assert fi.search([("patient", pa.fhir_id)])["total"] == 4


def test_pacs_silent_is_504(fi, silent_pacs):
    pa = fi.data.patients["A"]
    issue = outcome(fi.get(f"/fhir-slow/ImagingStudy?patient={pa.fhir_id}"), 504, "timeout")
    assert pa.id not in json.dumps(issue)
    assert "C-FIND received" in silent_pacs.process.output()  # the association was made: a DIMSE timeout
    outcome(fi.get(f"/fhir-slow/Patient/{pa.fhir_id}"), 504, "timeout")
    assert fi.search([("patient", pa.fhir_id)])["total"] == 4


def test_no_patient_data_in_log(fi):
    """
    Runs last: the gateway's log never holds the patients' names, birth
    dates or accession numbers, and their IDs only in access lines of
    Patient reads (paths are logged, query strings are not).
    """
    log = fi.gateway.process.output()
    assert log.count("fhir") > 10, "the access log is expected in the output"
    for patient in fi.data.patients.values():
        assert patient.family not in log and patient.family.lower() not in log
        assert patient.birth_date not in log
        for line in log.splitlines():
            if patient.id in line or patient.fhir_id in line:
                assert "/Patient/" in line, line
    for study in fi.data.studies.values():
        if study.accession:
            assert study.accession not in log


# -- the silent PACS (this module as a script) -----------------------------------------------


def silent_pacs_main(port):
    """
    A C-FIND SCP (AE L{SILENT_AET}) on Harmony's DIMSE stack that accepts
    associations and queries and never answers them; prints "C-FIND
    received" for each query.  127.0.0.1 only; stops on SIGTERM.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from twisted.internet import defer, reactor

    from harmony.dimse import messages
    from harmony.dimse.association import AssociationSettings
    from harmony.dimse.find import FindService
    from harmony.dimse.scp import DicomServerFactory, SCPPolicy
    from harmony.dimse.scu import PATIENT_ROOT_FIND, STUDY_ROOT_FIND

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

    class Silent:
        backends = ("silent",)
        request_chain = response_chain = ()

        def execute(self, endpoint, envelope):
            print("silent-pacs: C-FIND received", flush=True)
            return defer.Deferred()  # never fires

    policy = SCPPolicy(
        ae_title=SILENT_AET,
        syntaxes={messages.VERIFICATION_SOP_CLASS: syntaxes, STUDY_ROOT_FIND: syntaxes, PATIENT_ROOT_FIND: syntaxes},
    )
    factory = DicomServerFactory(reactor, policy, AssociationSettings(idle_timeout=None),
                                 {messages.C_FIND_RQ: FindService((Silent(), "silent"))})
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print(f"silent-pacs: listening on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__" and sys.argv[1:2] == ["silent-pacs"]:
    silent_pacs_main(int(sys.argv[2]))
