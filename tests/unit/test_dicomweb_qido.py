"""
QIDO-RS query parameters to C-FIND identifiers (harmony.dicomweb.qido):
matching keys by keyword, tag and sequence path, lists, ranges, fuzzy
matching, includefield, limit/offset, each route shape, and the 400s.
"""

from urllib.parse import parse_qs

import pytest
from pydicom.datadict import keyword_for_tag

from harmony.dicomweb.qido import (
    QidoQuery,
    instance_level_keys,
    instance_optional_keys,
    parse_qido,
    series_level_keys,
    series_optional_keys,
    study_level_keys,
    study_optional_keys,
)
from harmony.errors import BadRequest


def q(text):
    return parse_qs(text, keep_blank_values=True)


def matching(ds):
    """
    {keyword: (VR, value)} of the elements with a value (sequences as a
    list of such dicts, one per item), without QueryRetrieveLevel.
    """
    out = {}
    for elem in ds:
        if elem.keyword == "QueryRetrieveLevel":
            continue
        if elem.VR == "SQ":
            if len(elem.value):
                out[elem.keyword] = ("SQ", [matching(item) for item in elem.value])
            continue
        if elem.value in ("", None) or elem.VM == 0:
            continue
        value = elem.value
        if elem.VM > 1:
            value = [str(v) for v in value]
        elif elem.VR in ("PN", "DA", "TM", "DT", "UI", "IS", "DS"):
            value = str(value)
        out[elem.keyword] = (elem.VR, value)
    return out


def empties(ds):
    """The keywords of the empty (return-key) elements."""
    return {
        elem.keyword
        for elem in ds
        if (elem.VR == "SQ" and not len(elem.value)) or (elem.VR != "SQ" and (elem.value in ("", None)
                                                                                 or elem.VM == 0))
    }


STUDY_ALL = set(study_level_keys)
SERIES_ALL = set(series_level_keys)
INSTANCE_ALL = set(instance_level_keys)


@pytest.mark.parametrize(
    "resource, text, study, series, level, expected",
    [
        ("studies", "PatientName=Doe*", None, None, "STUDY", {"PatientName": ("PN", "Doe*")}),
        ("studies", "00100020=123", None, None, "STUDY", {"PatientID": ("LO", "123")}),
        ("studies", "00100020=ABC&PatientSex=F", None, None, "STUDY",
         {"PatientID": ("LO", "ABC"), "PatientSex": ("CS", "F")}),
        ("studies", "ModalitiesInStudy=CT,MR", None, None, "STUDY", {"ModalitiesInStudy": ("CS", ["CT", "MR"])}),
        ("studies", "StudyDate=20200101-20201231", None, None, "STUDY",
         {"StudyDate": ("DA", "20200101-20201231")}),
        ("studies", "StudyDate=-20201231&StudyTime=0800-", None, None, "STUDY",
         {"StudyDate": ("DA", "-20201231"), "StudyTime": ("TM", "0800-")}),
        ("studies", "StudyTime=101010.123456", None, None, "STUDY", {"StudyTime": ("TM", "101010.123456")}),
        ("studies", "StudyInstanceUID=1.2.3,1.2.4", None, None, "STUDY",
         {"StudyInstanceUID": ("UI", ["1.2.3", "1.2.4"])}),
        ("studies", "StudyInstanceUID=0.1.20", None, None, "STUDY", {"StudyInstanceUID": ("UI", "0.1.20")}),
        ("studies", "AccessionNumber=A?1", None, None, "STUDY", {"AccessionNumber": ("SH", "A?1")}),
        ("studies", "PatientName=doe&fuzzymatching=true", None, None, "STUDY", {"PatientName": ("PN", "*doe*")}),
        ("studies", "PatientName=doe,Sm*&ReferringPhysicianName=x&fuzzymatching=true", None, None, "STUDY",
         {"PatientName": ("PN", ["*doe*", "Sm*"]), "ReferringPhysicianName": ("PN", "*x*")}),
        ("studies", "PatientName=doe&fuzzymatching=false", None, None, "STUDY", {"PatientName": ("PN", "doe")}),
        ("studies", "PatientID=&StudyDescription=", None, None, "STUDY", {}),
        ("studies", "ReferencedSeriesSequence.SeriesInstanceUID=1.2.5", None, None, "STUDY",
         {"ReferencedSeriesSequence": ("SQ", [{"SeriesInstanceUID": ("UI", "1.2.5")}])}),
        ("studies", "00081115.0020000e=1.2.5&00081115.00081150=1.2.6", None, None, "STUDY",
         {"ReferencedSeriesSequence": ("SQ", [{"SeriesInstanceUID": ("UI", "1.2.5"),
                                                "ReferencedSOPClassUID": ("UI", "1.2.6")}])}),
        ("studies", "", "1.2.3", None, "STUDY", {"StudyInstanceUID": ("UI", "1.2.3")}),
        ("series", "Modality=CT", None, None, "SERIES", {"Modality": ("CS", "CT")}),
        ("series", "SeriesNumber=4", "1.2.3", None, "SERIES",
         {"StudyInstanceUID": ("UI", "1.2.3"), "SeriesNumber": ("IS", "4")}),
        ("instances", "", None, None, "IMAGE", {}),
        ("instances", "InstanceNumber=1,2&Rows=512", "1.2.3", None, "IMAGE",
         {"StudyInstanceUID": ("UI", "1.2.3"), "InstanceNumber": ("IS", ["1", "2"]), "Rows": ("US", 512)}),
        ("instances", "SOPClassUID=1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.4", "IMAGE",
         {"StudyInstanceUID": ("UI", "1.2.3"), "SeriesInstanceUID": ("UI", "1.2.3.4"),
          "SOPClassUID": ("UI", "1.2.840.10008.5.1.4.1.1.2")}),
        ("instances", "AcquisitionDateTime=20200101120000.5-0500", None, None, "IMAGE",
         {"AcquisitionDateTime": ("DT", "20200101120000.5-0500")}),
        ("instances", "AcquisitionDateTime=2020-202106", None, None, "IMAGE",
         {"AcquisitionDateTime": ("DT", "2020-202106")}),
        ("studies", "limit=10&offset=0&accept=application/dicom%2Bjson&charset=utf-8", None, None, "STUDY", {}),
    ],
)
def test_matching_keys(resource, text, study, series, level, expected):
    query = parse_qido(resource, q(text), study, series)
    assert isinstance(query, QidoQuery)
    assert query.level == level
    assert query.identifier.QueryRetrieveLevel == level
    assert query.identifier["QueryRetrieveLevel"].VR == "CS"
    assert matching(query.identifier) == expected


def test_study_return_keys():
    query = parse_qido("studies", q("PatientName=Doe*&includefield=00081030"))
    assert empties(query.identifier) == (STUDY_ALL - {"PatientName"}) | {"StudyDescription"}
    assert "RetrieveURL" in query.return_keywords
    assert "RetrieveURL" not in query.identifier
    assert "TimezoneOffsetFromUTC" not in query.identifier
    assert set(query.return_keywords) == STUDY_ALL | {"StudyDescription", "RetrieveURL"}
    tags = [query.identifier[k].tag if k in query.identifier else 0x00081190 for k in query.return_keywords]
    assert tags == sorted(tags)
    assert query.identifier["NumberOfStudyRelatedSeries"].VR == "IS"
    assert query.identifier["ModalitiesInStudy"].VR == "CS"


def test_series_return_keys_with_and_without_study():
    within = parse_qido("series", {}, study_uid="1.2.3")
    assert empties(within.identifier) == SERIES_ALL
    assert "PatientName" not in within.identifier
    everywhere = parse_qido("series", {})
    assert empties(everywhere.identifier) == SERIES_ALL | STUDY_ALL
    assert everywhere.identifier.QueryRetrieveLevel == "SERIES"


@pytest.mark.parametrize(
    "study, series, expected",
    [
        ("1.2.3", "1.2.3.4", INSTANCE_ALL),
        ("1.2.3", None, INSTANCE_ALL | SERIES_ALL),
        (None, None, INSTANCE_ALL | SERIES_ALL | STUDY_ALL),
    ],
)
def test_instance_return_keys(study, series, expected):
    query = parse_qido("instances", {}, study, series)
    assert empties(query.identifier) == expected
    assert query.identifier["Rows"].VR == "US"
    assert query.identifier["NumberOfFrames"].VR == "IS"
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "RetrieveURL"} <= set(query.return_keywords)


def test_includefield_all():
    query = parse_qido("studies", q("includefield=all"))
    assert query.include_all
    assert empties(query.identifier) == STUDY_ALL | set(study_optional_keys)
    series = parse_qido("series", q("includefield=all"), "1.2.3")
    assert empties(series.identifier) == SERIES_ALL | set(series_optional_keys)
    instances = parse_qido("instances", q("includefield=all"))
    assert empties(instances.identifier) == (INSTANCE_ALL | SERIES_ALL | STUDY_ALL | set(instance_optional_keys)
                                            | set(series_optional_keys) | set(study_optional_keys))


def test_includefield_tags_lists_and_repeats():
    query = parse_qido(
        "studies",
        q("includefield=00081030,PatientAge&includefield=0008103e&includefield=RetrieveURL"
          "&includefield=TimezoneOffsetFromUTC&includefield=ReferencedSeriesSequence.SeriesInstanceUID,"),
    )
    assert not query.include_all
    ids = query.identifier
    for keyword in ("StudyDescription", "PatientAge", "SeriesDescription", "TimezoneOffsetFromUTC"):
        assert ids[keyword].value in ("", None)
    assert "RetrieveURL" not in ids
    assert ids.ReferencedSeriesSequence[0].SeriesInstanceUID in ("", None)
    assert "ReferencedSeriesSequence" in query.return_keywords
    assert "TimezoneOffsetFromUTC" in query.return_keywords


def test_matching_key_keeps_its_value_over_return_keys():
    query = parse_qido("studies", q("StudyDescription=Head*&includefield=StudyDescription&includefield=all"))
    assert query.identifier.StudyDescription == "Head*"


def test_include_sequence_and_match_inside_it():
    query = parse_qido(
        "studies", q("includefield=ReferencedSeriesSequence&ReferencedSeriesSequence.SeriesInstanceUID=1.2")
    )
    seq = query.identifier.ReferencedSeriesSequence
    assert len(seq) == 1 and seq[0].SeriesInstanceUID == "1.2"


def test_limit_offset_and_defaults():
    query = parse_qido("studies", q("limit=25&offset=50"))
    assert (query.limit, query.offset, query.fuzzy, query.include_all) == (25, 50, False, False)
    query = parse_qido("studies", {})
    assert (query.limit, query.offset) == (None, 0)
    assert parse_qido("studies", q("fuzzymatching=true")).fuzzy


def test_non_ascii_values_set_utf8():
    query = parse_qido("studies", q("PatientName=M%C3%BCller*"))
    assert query.identifier.SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in query.return_keywords
    assert "SpecificCharacterSet" not in parse_qido("studies", q("PatientName=Mu*")).identifier


def test_repr_has_no_identifier():
    query = parse_qido("studies", q("PatientName=Secret"))
    assert "Secret" not in repr(query)


@pytest.mark.parametrize(
    "resource, text, study, series, words",
    [
        ("studies", "Foo=1", None, None, "'Foo'"),
        ("studies", "patientname=x", None, None, "'patientname'"),
        ("studies", "99990010=x", None, None, "'99990010'"),
        ("studies", "0010001=x", None, None, "'0010001'"),
        ("studies", "Limit=1", None, None, "'Limit'"),
        ("studies", "PatientID=1&PatientID=2", None, None, "PatientID"),
        ("studies", "PatientID=1&00100020=2", None, None, "00100020"),
        ("studies", "limit=0", None, None, "limit"),
        ("studies", "limit=-1", None, None, "limit"),
        ("studies", "limit=ten", None, None, "limit"),
        ("studies", "limit=1&limit=2", None, None, "limit"),
        ("studies", "offset=-1", None, None, "offset"),
        ("studies", "offset=1.5", None, None, "offset"),
        ("studies", "fuzzymatching=yes", None, None, "fuzzymatching"),
        ("studies", "fuzzymatching=True", None, None, "fuzzymatching"),
        ("studies", "includefield=Nope", None, None, "'Nope'"),
        ("studies", "includefield=PatientName.PatientID", None, None, "not a sequence"),
        ("studies", "StudyInstanceUID=1.2.*", None, None, "StudyInstanceUID"),
        ("studies", "StudyInstanceUID=1.02.3", None, None, "StudyInstanceUID"),
        ("studies", "StudyInstanceUID=1..3", None, None, "StudyInstanceUID"),
        ("studies", "StudyInstanceUID=1.2.a", None, None, "StudyInstanceUID"),
        ("studies", "StudyInstanceUID=" + "1." * 32 + "1", None, None, "StudyInstanceUID"),
        ("studies", "StudyInstanceUID=1.2,", None, None, "StudyInstanceUID"),
        ("studies", "StudyDate=2020-01-01", None, None, "StudyDate"),
        ("studies", "StudyDate=20201301", None, None, "StudyDate"),
        ("studies", "StudyDate=20200230", None, None, "StudyDate"),
        ("studies", "StudyDate=2020*", None, None, "StudyDate"),
        ("studies", "StudyDate=-", None, None, "StudyDate"),
        ("studies", "StudyDate=20200101-20200202-20200303", None, None, "StudyDate"),
        ("studies", "StudyDate=20200101-20200202,20210101", None, None, "StudyDate"),
        ("studies", "StudyTime=10:00", None, None, "StudyTime"),
        ("studies", "StudyTime=2500", None, None, "StudyTime"),
        ("studies", "StudyTime=10.5", None, None, "StudyTime"),
        ("studies", "StudyTime=101010.1234567", None, None, "StudyTime"),
        ("instances", "AcquisitionDateTime=20201301", None, None, "AcquisitionDateTime"),
        ("instances", "AcquisitionDateTime=2020-01-01T10:00", None, None, "AcquisitionDateTime"),
        ("studies", "NumberOfStudyRelatedSeries=x", None, None, "NumberOfStudyRelatedSeries"),
        ("studies", "NumberOfStudyRelatedSeries=1*", None, None, "wildcards"),
        ("instances", "Rows=5*", None, None, "Rows"),
        ("instances", "Rows=five", None, None, "Rows"),
        ("studies", "PatientAge=45", None, None, "PatientAge"),
        ("studies", "PatientWeight=heavy", None, None, "PatientWeight"),
        ("studies", "ReferencedSeriesSequence=x", None, None, "ReferencedSeriesSequence"),
        ("studies", "RetrieveURL=http://x", None, None, "RetrieveURL"),
        ("studies", "PatientName=a%5Cb", None, None, "backslash"),
        ("studies", "PatientName=a%0Ab", None, None, "control"),
        ("studies", "ModalitiesInStudy=CT,,MR", None, None, "ModalitiesInStudy"),
        ("series", "StudyInstanceUID=1.2.3", "1.2.3", None, "StudyInstanceUID"),
        ("instances", "0020000E=1.2", "1.2.3", "1.2.4", "0020000E"),
        ("series", "", "1.2.x", None, "StudyInstanceUID in the path"),
        ("instances", "", "1.2.3", "01.2", "SeriesInstanceUID in the path"),
    ],
)
def test_bad_queries(resource, text, study, series, words):
    with pytest.raises(BadRequest) as caught:
        parse_qido(resource, q(text), study, series)
    assert words in caught.value.message


def test_errors_do_not_echo_values():
    for text in ("StudyDate=SECRETVALUE", "PatientName=SECRET%5CVALUE", "limit=SECRETVALUE",
                 "StudyInstanceUID=SECRETVALUE", "fuzzymatching=SECRETVALUE"):
        with pytest.raises(BadRequest) as caught:
            parse_qido("studies", q(text))
        assert "SECRET" not in caught.value.message


def test_routing_errors_are_programming_errors():
    with pytest.raises(ValueError):
        parse_qido("patients", {})
    with pytest.raises(ValueError):
        parse_qido("instances", {}, None, "1.2.3")


def test_level_constants_are_dictionary_keywords():
    from pydicom.datadict import tag_for_keyword

    for group in (study_level_keys, series_level_keys, instance_level_keys, study_optional_keys,
                  series_optional_keys, instance_optional_keys):
        assert isinstance(group, tuple)
        for keyword in group:
            assert keyword_for_tag(tag_for_keyword(keyword)) == keyword


def test_identifier_encodes_for_the_pacs():
    from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, decode_identifier, encode_identifier

    query = parse_qido(
        "instances",
        q("PatientName=M%C3%BCller*&Rows=512&ModalitiesInStudy=CT,MR&includefield=all"
          "&ReferencedSeriesSequence.SeriesInstanceUID=1.2.5&StudyDate=20200101-"),
    )
    got = decode_identifier(encode_identifier(query.identifier, IMPLICIT_VR_LITTLE_ENDIAN),
                            IMPLICIT_VR_LITTLE_ENDIAN)
    assert got.QueryRetrieveLevel == "IMAGE"
    assert str(got.PatientName) == "Müller*"
    assert got.Rows == 512
    assert list(got.ModalitiesInStudy) == ["CT", "MR"]
    assert got.StudyDate == "20200101-"
    assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.5"
