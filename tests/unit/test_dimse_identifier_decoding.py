"""
Tests for L{harmony.dimse.identifier}: the fast identifier reader gives
exactly pydicom's C{read_dataset} result (raw elements, encodings, values)
on every data set it takes, and hands the others to pydicom.
"""

import glob
import io
import os
import struct
import warnings

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from harmony.dimse import identifier


def encode(ds, implicit):
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def query():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller^Jürgen=ミュラー^ユルゲン"
    ds.PatientID = "ID\\OTHER"
    ds.StudyDate = "20200101-20201231"
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = "12"
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00280010, "US", 512)
    ds.add_new(0x00181050, "DS", "0.5\\0.25")
    ds.add_new(0x00091011, "UN", b"\x01\x02")
    item = Dataset()
    item.CodeValue = "T-04000"
    item.CodingSchemeDesignator = "SRT"
    ds.ProcedureCodeSequence = Sequence([item])
    return ds


def corpus():
    """
    (name, bytes) of little endian data sets: a query with many VRs and
    the data sets of pydicom's test files that pydicom can write back.
    """
    yield "query", query()
    # pydicom's bundled test files (no download: get_testdata_files would try)
    for path in sorted(glob.glob(os.path.join(DATA_ROOT, "test_files", "*.dcm")))[:40]:
        try:
            ds = dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            continue
        if not ds.is_little_endian:
            continue
        yield path.rsplit("/", 1)[-1], ds


def cases():
    for name, ds in corpus():
        for implicit in (True, False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = encode(ds, implicit)
            except Exception:
                continue
            yield pytest.param(data, implicit, id=f"{name}-{'implicit' if implicit else 'explicit'}")


def element(e):
    # pydicom converts some raw elements at once (empty values, say).
    if isinstance(e, RawDataElement):
        return tuple(e)
    return ("converted", e.tag, e.VR, e.value, e.file_tell if hasattr(e, "file_tell") else None)


def same(fast, slow):
    assert list(fast.keys()) == list(slow.keys())
    for tag in slow.keys():
        assert element(fast.get_item(tag)) == element(slow.get_item(tag)), tag
    assert fast.original_encoding == slow.original_encoding
    assert fast.original_character_set == slow.original_character_set


@pytest.mark.parametrize("data, implicit", list(cases()))
def test_same_as_pydicom(data, implicit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = read_dataset(DicomBytesIO(data), implicit, True)
        fast = identifier.read_identifier(data, implicit)
        same(fast, slow)
        try:
            expected = slow.to_json_dict()
        except Exception as e:
            # (badVR.dcm: an IS value pydicom cannot convert)
            with pytest.raises(type(e)):
                fast.to_json_dict()
        else:
            assert fast.to_json_dict() == expected


def test_query_takes_the_fast_path():
    for implicit in (True, False):
        data = encode(query(), implicit)
        raw = identifier.raw_elements(data, implicit)
        assert raw is not None and len(raw) == len(query())
        ds = identifier.read_identifier(data, implicit)
        assert ds.PatientName == "Müller^Jürgen=ミュラー^ユルゲン"
        assert ds.StudyInstanceUID == ["1.2.3", "1.2.4"]
        assert ds.ProcedureCodeSequence[0].CodeValue == "T-04000"
        assert ds.Rows == 512


def test_empty_data_set():
    assert identifier.raw_elements(b"", True) == {}
    assert len(identifier.read_identifier(b"", False)) == 0


def undefined_length_sequence():
    # (0040,0275) SQ, undefined length, one item of undefined length.
    item = struct.pack("<HHL", 0x0008, 0x0100, 4) + b"T-04"
    data = struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
    data += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    data += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return data


@pytest.mark.parametrize(
    "data, implicit",
    [
        # undefined length: pydicom parses it
        (undefined_length_sequence(), False),
        # truncated value
        (struct.pack("<HHL", 0x0010, 0x0020, 10) + b"abc", True),
        # truncated header
        (struct.pack("<HH", 0x0010, 0x0020), True),
        # explicit data declared implicit (pydicom switches, with a warning)
        (encode(query(), False), True),
        # implicit data declared explicit
        (encode(query(), True), False),
        # a VR pydicom does not know
        (struct.pack("<HH2sH", 0x0010, 0x0020, b"ZZ", 2) + b"ab", False),
    ],
)
def test_left_to_pydicom(data, implicit):
    assert identifier.raw_elements(data, implicit) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            slow = read_dataset(DicomBytesIO(data), implicit, True)
        except Exception as e:
            with pytest.raises(type(e)):
                identifier.read_identifier(data, implicit)
            return
        same(identifier.read_identifier(data, implicit), slow)


def test_big_endian_left_to_pydicom():
    ds = Dataset()
    ds.PatientID = "X"
    ds.add_new(0x00280010, "US", 512)
    fp = DicomBytesIO()
    fp.is_little_endian = False
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    out = identifier.read_identifier(fp.getvalue(), False, little_endian=False)
    assert out.Rows == 512 and out.PatientID == "X"
    assert not out.original_encoding[1]


def test_value_offsets_are_pydicom_s():
    data = encode(query(), False)
    fast = identifier.raw_elements(data, False)
    fp = io.BytesIO(data)
    slow = read_dataset(DicomBytesIO(fp.getvalue()), False, True)
    assert [e.value_tell for e in fast.values()] == [slow.get_item(t).value_tell for t in slow.keys()]
