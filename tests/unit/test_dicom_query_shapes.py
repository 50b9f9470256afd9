"""
The HTTP JSON query shapes of the dicom_scu backend (find_identifier):
keywords or tags, several values, PN wildcards, date ranges and sequence
matching carried into the identifier as given (not only the first value),
return keys by level, and clear 400s.
"""

import pytest
from pydicom.dataset import Dataset

from harmony.backends.dicom_scu import find_identifier
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, decode_identifier, encode_identifier
from harmony.errors import BadRequest


def wire(ds):
    """The identifier as the PACS decodes it."""
    return decode_identifier(encode_identifier(ds, IMPLICIT_VR_LITTLE_ENDIAN), IMPLICIT_VR_LITTLE_ENDIAN)


def test_keywords_tags_and_return_keys():
    ds, level = find_identifier({"operation": "C-FIND", "level": "series", "query": {"00100020": "P1"}})
    assert level == "SERIES"
    got = wire(ds)
    assert got.PatientID == "P1"
    assert got.QueryRetrieveLevel == "SERIES"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber"):
        assert keyword in got and got[keyword].value in ("", None)


def test_several_values_as_a_list_or_backslashes():
    for value in (["CT", "MR"], "CT\\MR"):
        ds, _ = find_identifier({"level": "STUDY", "query": {"ModalitiesInStudy": value}})
        assert list(wire(ds).ModalitiesInStudy) == ["CT", "MR"]
    uids = ["1.2.3", "1.2.4", "1.2.5"]
    ds, _ = find_identifier({"level": "STUDY", "query": {"StudyInstanceUID": uids}}, return_keys=False)
    assert list(wire(ds).StudyInstanceUID) == uids


def test_person_names_and_date_ranges_as_given():
    ds, _ = find_identifier({"level": "STUDY", "query": {
        "PatientName": "DOE^J*", "StudyDate": "20240101-20241231", "StudyTime": "-1200",
    }})
    got = wire(ds)
    assert str(got.PatientName) == "DOE^J*"
    assert got.StudyDate == "20240101-20241231"
    assert got.StudyTime == "-1200"


def test_sequence_matching():
    ds, _ = find_identifier({"level": "STUDY", "query": {
        "ProcedureCodeSequence": {"CodeValue": "CTHEAD", "CodingSchemeDesignator": ""},
        "ReferencedStudySequence": [],
    }})
    got = wire(ds)
    [item] = got.ProcedureCodeSequence
    assert item.CodeValue == "CTHEAD" and item.CodingSchemeDesignator == ""
    assert len(got.ReferencedStudySequence) == 0
    ds, _ = find_identifier({"query": {"ProcedureCodeSequence": [{"CodeValue": "A"}, {"CodeValue": "B"}]}})
    assert [i.CodeValue for i in wire(ds).ProcedureCodeSequence] == ["A", "B"]


def test_dicom_json_identifier_passes_as_is():
    source = Dataset()
    source.PatientName = "DOE^JOHN"
    source.ModalitiesInStudy = ["CT", "MR"]
    source.StudyInstanceUID = ""
    ds, level = find_identifier({"identifier": source.to_json_dict(), "level": "STUDY"})
    got = wire(ds)
    assert level == "STUDY"
    assert list(got.ModalitiesInStudy) == ["CT", "MR"]
    assert "PatientID" not in got  # no return keys added to an explicit identifier


def test_patient_id_shape():
    ds, level = find_identifier({"patient_id": "P9", "query_level": "patient"})
    assert (level, wire(ds).PatientID) == ("PATIENT", "P9")
    assert "PatientBirthDate" in ds


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "JSON object"),
        ({"query": []}, '"query" must be an object'),
        ({"query": {"NotAKeyword": "x"}}, "Unknown DICOM keyword 'NotAKeyword'"),
        ({"query": {"PatientID": {"a": 1}}}, "'PatientID' must be a string"),
        ({"query": {"PatientID": True}}, "'PatientID' must be a string"),
        ({"query": {"ModalitiesInStudy": []}}, "'ModalitiesInStudy' must be strings or numbers"),
        ({"query": {"ModalitiesInStudy": ["CT", None]}}, "must be strings or numbers"),
        ({"query": {"ProcedureCodeSequence": "x"}}, "sequence 'ProcedureCodeSequence'"),
        ({"query": {"ProcedureCodeSequence": {"Nope": 1}}}, "'ProcedureCodeSequence.Nope'"),
        ({"level": "FRAME", "query": {}}, "PATIENT, STUDY, SERIES or IMAGE"),
        ({"identifier": "x"}, "DICOM JSON object"),
    ],
)
def test_bad_queries(body, message):
    with pytest.raises(BadRequest) as e:
        find_identifier(body)
    assert message in e.value.message
