# -*- test-case-name: tests.unit.test_fhir_imaging -*-
"""
C-FIND matches -> FHIR R4 resources (dicts ready for JSON): C{ImagingStudy}
(with its series and contained C{Endpoint}s), C{Patient}, the searchset
C{Bundle} and the facade's C{CapabilityStatement}.

Absent or empty DICOM values leave the FHIR element out (FHIR forbids
empty strings and arrays); a value that does not parse (a malformed date,
a non-numeric count) is left out too rather than failing the answer.  The
mapping is documented in L{harmony.middleware.fhir_imaging}.
"""

from datetime import timedelta

import attr

import harmony
from harmony.fhir_imaging.params import (
    DCM,
    DICOM_UID_SYSTEM,
    dicom_date,
    dicom_time,
    gender_of,
    multi_values,
    parse_offset,
    patient_fhir_id,
    person_name_text,
    text_value,
)

FHIR_JSON = "application/fhir+json; charset=utf-8"

#: Identifier type codes (ACSN: accession number).
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SNOMED = "http://snomed.info/sct"
ENDPOINT_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: Harmony's own connection type code system (JMIX is not in HL7's).
HARMONY_CONNECTION_TYPE = "urn:harmony:endpoint-connection-type"

#: Body Part Examined (0018,0015) defined terms -> SNOMED CT (code,
#: display), after PS3.16 CID 4031 "Common Anatomic Regions" (the codes
#: of pydicom's PS3.16 tables) and the Annex L correspondence.  Other
#: values become a Coding with a display only.
BODY_PARTS = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ANKLE": ("70258002", "Ankle joint"),
    "ARM": ("40983000", "Upper arm"),
    "BLADDER": ("89837001", "Bladder"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "JAW": ("661005", "Jaw region"),
    "KNEE": ("72696002", "Knee"),
    "LARYNX": ("4596009", "Larynx"),
    "LEG": ("30021000", "Lower leg"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "NECK": ("45048000", "Neck"),
    "ORBIT": ("363654007", "Orbital structure"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PROSTATE": ("41216001", "Prostate"),
    "RIB": ("113197003", "Rib"),
    "SACRUM": ("54735007", "Sacrum"),
    "SCAPULA": ("79601000", "Scapula"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SINUS": ("2095001", "Paranasal sinus"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "THIGH": ("68367000", "Thigh"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TRACHEA": ("44567001", "Trachea"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
}

#: C-FIND return keys by level.
STUDY_KEYS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "PatientID",
    "IssuerOfPatientID", "PatientName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "TimezoneOffsetFromUTC",
)
SERIES_KEYS = (
    "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
    "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime",
)
PATIENT_KEYS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")


def join_url(base_url, url):
    """
    C{url} when it is absolute (C{http(s)://...}), else C{url} as a path
    under C{base_url}; without a trailing slash.
    """
    if url.startswith(("http://", "https://")):
        return url.rstrip("/")
    return base_url.rstrip("/") + "/" + url.strip("/") if url.strip("/") else base_url.rstrip("/")


@attr.s(frozen=True, slots=True)
class Renderer:
    """
    What building resources needs beside the matches.

    @ivar fhir_base: the public URL of this FHIR base (Harmony's public
        base URL and the endpoint's prefix).
    @ivar dicomweb_root: the public DICOMweb root for WADO-RS endpoints, or
        C{None}.
    @ivar jmix_root: the public JMIX root, or C{None}.
    @ivar default_offset: the studies' time zone (a C{timedelta}) when the
        PACS does not say (C{TimezoneOffsetFromUTC}), or C{None}.
    @ivar patient_system: the C{Identifier.system} of PatientIDs (C{""}:
        none).
    """

    fhir_base = attr.ib()
    dicomweb_root = attr.ib(default=None)
    jmix_root = attr.ib(default=None)
    default_offset = attr.ib(default=None)
    patient_system = attr.ib(default="")

    def offset_of(self, match):
        """
        The time zone offset of a study match (its own
        C{TimezoneOffsetFromUTC}, else the configured one), or C{None}.
        """
        own = parse_offset(text_value(match, "TimezoneOffsetFromUTC"))
        return own if own is not None else self.default_offset

    # -- Patient --

    def patient_identifier(self, patient_id, issuer=None):
        identifier = {}
        if self.patient_system:
            identifier["system"] = self.patient_system
        identifier["value"] = patient_id
        if issuer:
            identifier["assigner"] = {"display": issuer}
        return identifier

    def subject(self, match):
        """
        The C{Reference} to a study's patient: C{Patient/<id>}, by
        identifier when the PatientID makes no FHIR id, by name only when
        the PACS gave no PatientID.
        """
        reference = {}
        patient_id = text_value(match, "PatientID")
        if patient_id:
            fid = patient_fhir_id(patient_id)
            if fid is not None:
                reference["reference"] = "Patient/" + fid
            else:
                reference["identifier"] = self.patient_identifier(patient_id)
        display = person_name_text(match.get("PatientName"))
        if display:
            reference["display"] = display
        if not reference:
            reference["display"] = "Unknown patient"
        return reference

    def patient(self, match):
        """
        A C{Patient} from a patient-level match (which has a PatientID).
        """
        patient_id = text_value(match, "PatientID")
        resource = {"resourceType": "Patient"}
        fid = patient_fhir_id(patient_id)
        if fid is not None:
            resource["id"] = fid
        resource["identifier"] = [self.patient_identifier(patient_id, text_value(match, "IssuerOfPatientID"))]
        name = human_name(match.get("PatientName"))
        if name is not None:
            resource["name"] = [name]
        gender = gender_of(match)
        if gender is not None:
            resource["gender"] = gender
        birth = dicom_date(text_value(match, "PatientBirthDate"))
        if birth is not None:
            resource["birthDate"] = birth.isoformat()
        return resource

    # -- ImagingStudy --

    def endpoints(self, uid):
        """
        The contained C{Endpoint}s of a study (WADO-RS, JMIX: those
        configured).
        """
        out = []
        if self.dicomweb_root:
            out.append({
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {"system": ENDPOINT_CONNECTION_TYPE, "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "payloadMimeType": ["application/dicom"],
                "address": f"{self.dicomweb_root}/studies/{uid}",
            })
        if self.jmix_root:
            out.append({
                "resourceType": "Endpoint",
                "id": "jmix",
                "status": "active",
                "connectionType": {"system": HARMONY_CONNECTION_TYPE, "code": "jmix"},
                "payloadType": [{"text": "JMIX"}],
                "payloadMimeType": ["application/zip"],
                "address": f"{self.jmix_root}/api/jmix?studyInstanceUid={uid}",
            })
        return out

    def imaging_study(self, match, series=None):
        """
        An C{ImagingStudy} from a study-level match (which has a
        StudyInstanceUID) and, when fetched, its series-level matches.
        """
        uid = text_value(match, "StudyInstanceUID")
        offset = self.offset_of(match)
        resource = {"resourceType": "ImagingStudy", "id": uid}
        endpoints = self.endpoints(uid)
        if endpoints:
            resource["contained"] = endpoints
        identifiers = [{"system": DICOM_UID_SYSTEM, "value": "urn:oid:" + uid}]
        accession = text_value(match, "AccessionNumber")
        if accession:
            identifiers.append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
        resource["identifier"] = identifiers
        resource["status"] = "available"
        elements = None
        if series is not None:
            elements = sorted(
                (e for e in (series_element(s, offset) for s in series) if e is not None),
                key=lambda e: (e.get("number") is None, e.get("number", 0), e["uid"]),
            )
        modalities = multi_values(match, "ModalitiesInStudy")
        if not modalities and elements:
            modalities = [e["modality"]["code"] for e in elements]
        modalities = list(dict.fromkeys(modalities))
        if modalities:
            resource["modality"] = [{"system": DCM, "code": m} for m in modalities]
        resource["subject"] = self.subject(match)
        started = fhir_datetime(text_value(match, "StudyDate"), text_value(match, "StudyTime"), offset)
        if started:
            resource["started"] = started
        if endpoints:
            resource["endpoint"] = [{"reference": "#" + e["id"]} for e in endpoints]
        number_of_series = unsigned(match, "NumberOfStudyRelatedSeries")
        if number_of_series is None and elements is not None:
            number_of_series = len(elements)
        if number_of_series is not None:
            resource["numberOfSeries"] = number_of_series
        number_of_instances = unsigned(match, "NumberOfStudyRelatedInstances")
        if number_of_instances is None and elements and all("numberOfInstances" in e for e in elements):
            number_of_instances = sum(e["numberOfInstances"] for e in elements)
        if number_of_instances is not None:
            resource["numberOfInstances"] = number_of_instances
        description = text_value(match, "StudyDescription")
        if description:
            resource["description"] = description
        if elements:
            resource["series"] = elements
        return resource


def unsigned(ds, keyword):
    """
    An IS value as a non-negative C{int}, or C{None}.
    """
    text = text_value(ds, keyword)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def fhir_datetime(da, tm, offset):
    """
    A FHIR C{dateTime} from a DICOM date and time: C{YYYY-MM-DD}, with the
    time (C{Thh:mm:ss[.f]}) only when the time zone is known (FHIR requires
    one with a time); C{None} without a valid date.
    """
    day = dicom_date(da)
    if day is None:
        return None
    text = day.isoformat()
    parsed = dicom_time(tm) if tm else None
    if parsed is None or offset is None:
        return text
    start, _, fraction = parsed
    if start >= timedelta(days=1):
        return text
    seconds = int(start.total_seconds())
    hh, mm, ss = seconds // 3600, seconds // 60 % 60, seconds % 60
    text += f"T{hh:02d}:{mm:02d}:{ss:02d}"
    if fraction:
        text += "." + fraction
    return text + format_offset(offset)


def format_offset(offset):
    if not offset:
        return "Z"
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def human_name(pn):
    """
    A FHIR C{HumanName} from a DICOM person name's alphabetic group, or
    C{None} when empty.
    """
    if pn is None:
        return None
    try:
        from pydicom.valuerep import PersonName

        if not isinstance(pn, PersonName):
            pn = PersonName(str(pn))
        family, given, middle = pn.family_name.strip(), pn.given_name.strip(), pn.middle_name.strip()
        prefix, suffix = pn.name_prefix.strip(), pn.name_suffix.strip()
    except Exception:
        return None
    name = {}
    text = person_name_text(pn)
    if text:
        name["text"] = text
    if family:
        name["family"] = family
    given_names = [g for g in (given, middle) if g]
    if given_names:
        name["given"] = given_names
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name or None


def body_site(value):
    """
    The C{Coding} of a Body Part Examined value.
    """
    known = BODY_PARTS.get(value.upper())
    if known is None:
        return {"display": value}
    code, display = known
    return {"system": SNOMED, "code": code, "display": display}


def series_element(ds, offset):
    """
    An C{ImagingStudy.series} element from a series-level match, or C{None}
    without a SeriesInstanceUID.
    """
    uid = text_value(ds, "SeriesInstanceUID")
    if not uid:
        return None
    element = {"uid": uid}
    number = unsigned(ds, "SeriesNumber")
    if number is not None:
        element["number"] = number
    # R4 requires a modality: OT (other) when the PACS has none.
    element["modality"] = {"system": DCM, "code": text_value(ds, "Modality") or "OT"}
    description = text_value(ds, "SeriesDescription")
    if description:
        element["description"] = description
    instances = unsigned(ds, "NumberOfSeriesRelatedInstances")
    if instances is not None:
        element["numberOfInstances"] = instances
    part = text_value(ds, "BodyPartExamined")
    if part:
        element["bodySite"] = body_site(part)
    started = fhir_datetime(text_value(ds, "SeriesDate"), text_value(ds, "SeriesTime"), offset)
    if started:
        element["started"] = started
    return element


def bundle(total, entries, links):
    """
    A searchset C{Bundle}.

    @param entries: C{(full_url or None, resource)} pairs.
    @param links: C{(relation, url)} pairs.
    """
    out = {"resourceType": "Bundle", "type": "searchset", "total": total}
    out["link"] = [{"relation": relation, "url": url} for relation, url in links]
    if entries:
        out["entry"] = [
            dict(({"fullUrl": url} if url else {}), resource=resource, search={"mode": "match"})
            for url, resource in entries
        ]
    return out


#: Search parameters in the CapabilityStatement: (name, type, definition, documentation).
STUDY_SEARCH_PARAMS = (
    ("_id", "token", "http://hl7.org/fhir/SearchParameter/Resource-id", "The StudyInstanceUID"),
    ("patient", "reference", "http://hl7.org/fhir/SearchParameter/clinical-patient",
     "Patient/<id> or <id> (PatientID); :identifier takes the PatientID as a token"),
    ("subject", "reference", "http://hl7.org/fhir/SearchParameter/ImagingStudy-subject",
     "As patient (a full URL ending in Patient/<id> too)"),
    ("identifier", "token", "http://hl7.org/fhir/SearchParameter/clinical-identifier",
     "urn:dicom:uid|<uid>, urn:oid:<uid> or a UID-shaped value: StudyInstanceUID; any other value: AccessionNumber"),
    ("started", "date", "http://hl7.org/fhir/SearchParameter/ImagingStudy-started",
     "StudyDate and StudyTime; prefixes eq, gt, ge, lt, le, sa, eb"),
    ("modality", "token", "http://hl7.org/fhir/SearchParameter/ImagingStudy-modality",
     "A DICOM modality code (system " + DCM + ")"),
)
PATIENT_SEARCH_PARAMS = (
    ("_id", "token", "http://hl7.org/fhir/SearchParameter/Resource-id", "The patient's FHIR id"),
    ("identifier", "token", "http://hl7.org/fhir/SearchParameter/Patient-identifier", "The PatientID"),
    ("name", "string", "http://hl7.org/fhir/SearchParameter/Patient-name",
     "Starts a family, given, middle name, prefix or suffix (case- and accent-insensitive); :exact, :contains"),
    ("birthdate", "date", "http://hl7.org/fhir/SearchParameter/individual-birthdate",
     "PatientBirthDate; prefixes eq, gt, ge, lt, le, sa, eb"),
    ("gender", "token", "http://hl7.org/fhir/SearchParameter/individual-gender",
     "male, female, other or unknown (PatientSex M, F, O, empty)"),
)


def _resource_capabilities(rtype, params, documentation):
    return {
        "type": rtype,
        "documentation": documentation,
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": name, "definition": definition, "type": kind, "documentation": doc}
            for name, kind, definition, doc in params
        ],
    }


def capability_statement(fhir_base, now, description):
    """
    The facade's C{CapabilityStatement}.

    @param now: the statement's date (a FHIR dateTime).
    @param description: the implementation's description.
    """
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "publisher": "Harmony",
        "kind": "instance",
        "software": {"name": "Harmony", "version": harmony.__version__},
        "implementation": {"description": description, "url": fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Read-only imaging facade over a DICOM PACS: searches and reads are answered by C-FIND. "
                    "Result parameters: _count, _offset, _sort (ImagingStudy: started, -started), "
                    "_summary=count, _total, _format (json), _pretty."
                ),
                "resource": [
                    _resource_capabilities(
                        "ImagingStudy", STUDY_SEARCH_PARAMS, "Studies as the PACS knows them (study-level C-FIND)"
                    ),
                    _resource_capabilities(
                        "Patient", PATIENT_SEARCH_PARAMS, "Demographics as the PACS knows them (patient-level C-FIND)"
                    ),
                ],
            }
        ],
    }
