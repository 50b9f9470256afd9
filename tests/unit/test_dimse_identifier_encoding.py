"""
Query identifiers of text elements are encoded without pydicom's writer,
byte for byte as pydicom would; anything else is left to pydicom.
"""

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from harmony.dicomweb import qido
from harmony.dimse import scu


def pydicom_encoding(ds, implicit):
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def identifiers():
    yield qido.parse_qido(
        "studies",
        {"PatientID": ["X1"], "PatientName": ["Doe*"], "ModalitiesInStudy": ["CT,MR"], "StudyDate": ["20200101-"]},
    ).identifier
    yield qido.parse_qido("instances", {"SOPInstanceUID": ["1.2.3,1.2.44"]}, study_uid="1.2.3",
                          series_uid="1.2.3.4").identifier
    yield qido.parse_qido("studies", {"PatientName": ["Jérôme*"]}).identifier  # UTF-8
    yield qido.parse_qido("series", {"includefield": ["all"]}).identifier  # empty US return keys
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyDescription = "odd"  # padded with a space
    ds.StudyInstanceUID = "1.2.345"  # padded with a NUL
    ds.add_new(0x00081190, "UR", "")
    ds.add_new(0x00324000, "LT", "a comment")
    yield ds


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("index", range(5))
def test_same_bytes_as_pydicom(implicit, index):
    ds = list(identifiers())[index]
    fast = scu._encode_text_dataset(ds, implicit)
    assert fast is not None
    assert fast == pydicom_encoding(ds, implicit)


def test_other_datasets_are_left_to_pydicom():
    with_sequence = Dataset()
    item = Dataset()
    item.SeriesInstanceUID = "1.2"
    with_sequence.ReferencedSeriesSequence = Sequence([item])
    numeric = Dataset()
    numeric.Rows = 512
    other_charset = Dataset()
    other_charset.SpecificCharacterSet = "ISO_IR 144"
    other_charset.PatientName = "x"
    non_ascii_default = Dataset()
    non_ascii_default.PatientName = "Jérôme"
    for ds in (with_sequence, numeric, other_charset, non_ascii_default):
        assert scu._encode_text_dataset(ds, True) is None
    # encode_identifier still encodes them (with pydicom).
    assert scu.encode_identifier(numeric, scu.IMPLICIT_VR_LITTLE_ENDIAN) == pydicom_encoding(numeric, True)


def received(ds, implicit):
    """
    C{ds} as a relay receives it: decoded from the wire, elements raw.
    """
    return scu.decode_identifier(pydicom_encoding(ds, implicit), IMPLICIT if implicit else EXPLICIT)


IMPLICIT = scu.IMPLICIT_VR_LITTLE_ENDIAN
EXPLICIT = "1.2.840.10008.1.2.1"


def relayed_query():
    ds = list(identifiers())[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Rows = 512  # binary: raw bytes copied, never re-encoded
    item = Dataset()
    item.SeriesInstanceUID = "1.2"
    ds.ReferencedSeriesSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("source", [True, False], ids=["from-implicit", "from-explicit"])
@pytest.mark.parametrize("target", [True, False], ids=["to-implicit", "to-explicit"])
def test_received_identifiers_are_sent_on_as_pydicom_would(source, target):
    """
    A received identifier's raw elements are copied (converted between VR
    conventions when the dictionary knows the VR), byte for byte what
    pydicom's writer makes of the same dataset.
    """
    for ds in list(identifiers()) + [relayed_query()]:
        got = received(ds, source)
        fast = scu._encode_text_dataset(got, target)
        has_sequence = "ReferencedSeriesSequence" in ds
        if has_sequence and source != target:
            assert fast is None  # items would keep the other convention: pydicom
        else:
            assert fast is not None
            assert fast == pydicom_encoding(received(ds, source), target)
        assert scu.encode_identifier(got, IMPLICIT if target else EXPLICIT) == pydicom_encoding(
            received(ds, source), target
        )


def test_received_and_changed_elements_mix():
    got = received(list(identifiers())[0], False)
    got.PatientID = "CHANGED"  # converted and re-encoded; the rest copied
    assert scu._encode_text_dataset(got, False) == pydicom_encoding(got, False)


def test_private_raw_elements_change_convention_only_with_pydicom():
    ds = Dataset()
    ds.PatientID = "X"
    ds.add_new(0x00091010, "LO", "private")
    got = received(ds, True)  # implicit: the private element's VR is unknown
    assert scu._encode_text_dataset(got, False) is None
    assert scu._encode_text_dataset(got, True) == pydicom_encoding(received(ds, True), True)
