"""
Tests for L{harmony.dicomweb.dicomjson}: DICOM JSON and Native DICOM Model
XML of pydicom datasets.
"""

import base64
import json
import os
import shutil
import tempfile
from unittest import mock

import defusedxml.ElementTree as DET
import pydicom.filereader
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from twisted.trial.unittest import SynchronousTestCase

from harmony.dicomweb.dicomjson import (
    NATIVE_DICOM_NS,
    dataset_to_json,
    dataset_to_xml,
    element_at,
    json_to_dataset,
)
from harmony.errors import BadRequest, NotFound

NS = {"d": NATIVE_DICOM_NS}


def _testfile(name):
    return get_testdata_file(name, download=False)


def _uri(path):
    return f"https://pacs.example/bulk/{path}"


def _raw(ds, tag, vr, value, implicit=False):
    """
    Put a raw (unconverted) element into C{ds}, as dcmread does.
    """
    tag = Tag(tag)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, True)


def _equal_datasets(test, a, b, skip=()):
    """
    Two datasets hold the same elements with the same values (recursively),
    binary values compared as bytes.
    """
    keys_a = {t for t in a.keys() if t.element != 0 and t.group != 2 and t not in skip}
    keys_b = {t for t in b.keys() if t not in skip}
    test.assertEqual(sorted(keys_a), sorted(keys_b))
    for tag in keys_a:
        ea, eb = a[tag], b[tag]
        if ea.VR == "SQ":
            test.assertEqual(len(ea.value), len(eb.value))
            for ia, ib in zip(ea.value, eb.value):
                _equal_datasets(test, ia, ib)
        elif isinstance(ea.value, bytes):
            test.assertEqual(ea.value, eb.value, f"{tag}")
        elif ea.VR in ("DS", "FL", "FD", "OF", "OD"):
            va = list(ea.value) if ea.VM > 1 else [ea.value]
            vb = list(eb.value) if eb.VM > 1 else [eb.value]
            test.assertEqual(
                [None if v in ("", None) else float(v) for v in va],
                [None if v in ("", None) else float(v) for v in vb],
                f"{tag}",
            )
        else:
            test.assertEqual(str(ea.value), str(eb.value), f"{tag}")


class JsonValueTests(SynchronousTestCase):
    def test_person_name_groups(self):
        ds = Dataset()
        ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
        ds.ReferringPhysicianName = "=Yamada"
        ds.PerformingPhysicianName = ["Doe^John", "", "Roe^Jane"]
        out = dataset_to_json(ds)
        self.assertEqual(
            out["00100010"],
            {
                "vr": "PN",
                "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}],
            },
        )
        self.assertEqual(out["00080090"], {"vr": "PN", "Value": [{"Ideographic": "Yamada"}]})
        self.assertEqual(
            out["00081050"],
            {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}, None, {"Alphabetic": "Roe^Jane"}]},
        )

    def test_ds_and_is_numbers(self):
        ds = Dataset()
        _raw(ds, 0x00280030, "DS", b"1.50\\2 ")  # PixelSpacing
        _raw(ds, 0x00201041, "DS", b"-1.2e3")  # SliceLocation
        _raw(ds, 0x00200013, "IS", b" 12 ")  # InstanceNumber
        _raw(ds, 0x00181150, "IS", b"+7\\\\3 ")  # ExposureTime, with an empty value
        out = dataset_to_json(ds)
        self.assertEqual(out["00280030"], {"vr": "DS", "Value": [1.5, 2]})
        self.assertEqual(out["00201041"], {"vr": "DS", "Value": [-1200.0]})
        self.assertEqual(out["00200013"], {"vr": "IS", "Value": [12]})
        self.assertEqual(out["00181150"], {"vr": "IS", "Value": [7, None, 3]})
        self.assertIsInstance(out["00280030"]["Value"][0], float)

    def test_invalid_numbers_stay_strings(self):
        ds = Dataset()
        _raw(ds, 0x00101020, "DS", b"abc ")
        _raw(ds, 0x00200013, "IS", b"1.5 ")
        _raw(ds, 0x00281050, "DS", b"1,5\\NaN ")
        out = dataset_to_json(ds)
        self.assertEqual(out["00101020"], {"vr": "DS", "Value": ["abc"]})
        self.assertEqual(out["00200013"], {"vr": "IS", "Value": ["1.5"]})
        self.assertEqual(out["00281050"], {"vr": "DS", "Value": ["1,5", "NaN"]})

    def test_converted_ds_is_values(self):
        ds = Dataset()
        ds.PixelSpacing = ["0.5", "0.25"]
        ds.InstanceNumber = 4
        ds.SliceThickness = "1.50"
        out = dataset_to_json(ds)
        self.assertEqual(out["00280030"]["Value"], [0.5, 0.25])
        self.assertEqual(out["00200013"]["Value"], [4])
        self.assertEqual(out["00180050"]["Value"], [1.5])

    def test_binary_numbers(self):
        ds = Dataset()
        ds.Rows = 512
        ds.add_new(0x00181310, "US", [0, 256, 256, 0])
        ds.add_new(0x00189219, "FD", [1.5, float("nan"), float("inf")])
        out = dataset_to_json(ds)
        self.assertEqual(out["00280010"], {"vr": "US", "Value": [512]})
        self.assertEqual(out["00181310"]["Value"], [0, 256, 256, 0])
        self.assertEqual(out["00189219"]["Value"], [1.5, "NaN", "Infinity"])
        json.dumps(out, allow_nan=False)  # valid JSON

    def test_at_values(self):
        ds = Dataset()
        ds.add_new(0x00209165, "AT", [0x00100010, 0x7FE00010])  # DimensionIndexPointer
        ds.add_new(0x00209167, "AT", 0x0020000D)
        out = dataset_to_json(ds)
        self.assertEqual(out["00209165"], {"vr": "AT", "Value": ["00100010", "7FE00010"]})
        self.assertEqual(out["00209167"], {"vr": "AT", "Value": ["0020000D"]})

    def test_empty_values(self):
        ds = Dataset()
        ds.PatientName = ""
        ds.PatientID = ""
        ds.add_new(0x00200013, "IS", None)
        ds.add_new(0x00280030, "DS", None)
        ds.add_new(0x00081140, "SQ", Sequence())
        ds.add_new(0x00431029, "OB", b"")
        ds.add_new(0x00209165, "AT", None)
        _raw(ds, 0x00080050, "SH", b"")
        out = dataset_to_json(ds)
        for key, vr in [
            ("00100010", "PN"),
            ("00100020", "LO"),
            ("00200013", "IS"),
            ("00280030", "DS"),
            ("00081140", "SQ"),
            ("00431029", "OB"),
            ("00209165", "AT"),
            ("00080050", "SH"),
        ]:
            self.assertEqual(out[key], {"vr": vr}, key)

    def test_unconvertible_element_kept_as_un(self):
        ds = Dataset()
        tag = Tag(0x00283006)  # LUT Data, "US or OW": pydicom needs a LUT Descriptor to resolve it
        ds._dict[tag] = RawDataElement(tag, None, 4, b"\x05\x00\x06\x00", 0, True, True)
        _raw(ds, 0x00280106, None, b"\x05\x00", implicit=True)  # "US or SS": resolved as US
        out = dataset_to_json(ds)
        self.assertEqual(out["00283006"], {"vr": "UN", "InlineBinary": "BQAGAA=="})
        self.assertEqual(out["00280106"], {"vr": "US", "Value": [5]})
        self.assertIs(type(out["00280106"]["vr"]), str)

    def test_multivalued_text_with_empty_value(self):
        ds = Dataset()
        ds.ImageType = ["ORIGINAL", "", "AXIAL"]
        self.assertEqual(dataset_to_json(ds)["00080008"]["Value"], ["ORIGINAL", None, "AXIAL"])

    def test_group_length_and_file_meta_left_out_private_kept(self):
        ds = Dataset()
        ds.add_new(0x00080000, "UL", 100)
        ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")
        ds.PatientID = "X"
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "secret sauce")
        out = dataset_to_json(ds)
        self.assertEqual(sorted(out), ["00090010", "00091001", "00100020"])
        self.assertEqual(out["00090010"], {"vr": "LO", "Value": ["ACME 1.0"]})
        self.assertEqual(out["00091001"], {"vr": "LO", "Value": ["secret sauce"]})

    def test_keys_are_upper_case_hex_sorted(self):
        ds = Dataset()
        ds.add_new(0x7FE00010, "OB", b"\x01\x02")
        ds.add_new(0x0020000D, "UI", "1.2.3")
        self.assertEqual(list(dataset_to_json(ds)), ["0020000D", "7FE00010"])

    def test_sequences_recursive_with_paths(self):
        ds = Dataset()
        item0, item1 = Dataset(), Dataset()
        item0.add_new(0x00181074, "DS", "123.5")  # RadionuclideTotalDose
        item0.add_new(0x00431029, "OB", b"\x00" * 2000)
        inner = Dataset()
        inner.add_new(0x00431029, "OB", b"\x01" * 2000)
        item1.add_new(0x00540300, "SQ", Sequence([Dataset(), inner]))
        ds.add_new(0x00540016, "SQ", Sequence([item0, item1]))
        paths = []

        def bulk(path):
            paths.append(path)
            return _uri(path)

        out = dataset_to_json(ds, bulk_uri=bulk)
        seq = out["00540016"]
        self.assertEqual(seq["vr"], "SQ")
        self.assertEqual(seq["Value"][0]["00181074"], {"vr": "DS", "Value": [123.5]})
        self.assertEqual(seq["Value"][0]["00431029"], {"vr": "OB", "BulkDataURI": _uri("00540016/0/00431029")})
        self.assertEqual(seq["Value"][1]["00540300"]["Value"][0], {})
        self.assertEqual(
            seq["Value"][1]["00540300"]["Value"][1]["00431029"]["BulkDataURI"],
            _uri("00540016/1/00540300/1/00431029"),
        )
        self.assertEqual(paths, ["00540016/0/00431029", "00540016/1/00540300/1/00431029"])
        self.assertEqual(element_at(ds, "00540016/1/00540300/1/00431029").value, b"\x01" * 2000)
        self.assertEqual(str(element_at(ds, "00540016/0/00181074").value), "123.5")


class BulkDataTests(SynchronousTestCase):
    def test_small_inline_large_bulk(self):
        ds = Dataset()
        ds.add_new(0x00431028, "OB", b"\x01\x02\x03")
        ds.add_new(0x00431029, "OB", b"\xab" * 1025)
        ds.add_new(0x0043102A, "OB", b"\xcd" * 1024)
        out = dataset_to_json(ds, bulk_uri=_uri)
        self.assertEqual(out["00431028"], {"vr": "OB", "InlineBinary": base64.b64encode(b"\x01\x02\x03").decode()})
        self.assertEqual(out["00431029"], {"vr": "OB", "BulkDataURI": _uri("00431029")})
        self.assertEqual(out["0043102A"]["InlineBinary"], base64.b64encode(b"\xcd" * 1024).decode())
        # The threshold is in bytes of the value.
        out = dataset_to_json(ds, bulk_uri=_uri, bulk_threshold=2)
        self.assertIn("BulkDataURI", out["00431028"])

    def test_without_bulk_uri_everything_inline(self):
        ds = dcmread(_testfile("CT_small.dcm"))
        out = dataset_to_json(ds)
        self.assertEqual(base64.b64decode(out["7FE00010"]["InlineBinary"]), ds.PixelData)
        self.assertEqual(out["7FE00010"]["vr"], "OW")

    def test_pixel_data_always_bulk(self):
        ds = Dataset()
        ds.BitsAllocated = 8
        ds.add_new(0x7FE00010, "OB", b"\x00\x01")
        ds.add_new(0x7FE00008, "OF", b"\x00\x00\x80\x3f")
        out = dataset_to_json(ds, bulk_uri=_uri)
        self.assertEqual(out["7FE00010"], {"vr": "OB", "BulkDataURI": _uri("7FE00010")})
        self.assertEqual(out["7FE00008"], {"vr": "OF", "BulkDataURI": _uri("7FE00008")})

    def test_encapsulated_pixel_data_is_bulk(self):
        ds = dcmread(_testfile("JPEG2000.dcm"))  # read whole: undefined length, not deferred
        self.assertTrue(ds["PixelData"].is_undefined_length)
        out = dataset_to_json(ds, bulk_uri=_uri, bulk_threshold=10**9)
        self.assertEqual(out["7FE00010"], {"vr": "OB", "BulkDataURI": _uri("7FE00010")})

    def _deferred_copy(self, name):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, name)
        shutil.copy(_testfile(name), path)
        return path

    def test_deferred_values_not_read_when_bulk(self):
        for name, vr in [
            ("CT_small.dcm", "OW"),
            ("rtdose.dcm", "OW"),
            ("SC_rgb_rle_2frame.dcm", "OB"),
            ("liver_1frame.dcm", "OB"),
        ]:
            path = self._deferred_copy(name)
            ds = dcmread(path, defer_size=512)
            raw = ds.get_item(0x7FE00010, keep_deferred=True)
            self.assertIsInstance(raw, RawDataElement)
            self.assertIsNone(raw.value)
            os.remove(path)  # a deferred read would now fail
            with mock.patch.object(
                pydicom.filereader, "read_deferred_data_element", side_effect=AssertionError("deferred read")
            ):
                out = dataset_to_json(ds, bulk_uri=_uri)
                xml = dataset_to_xml(ds, bulk_uri=_uri)
            self.assertEqual(out["7FE00010"], {"vr": vr, "BulkDataURI": _uri("7FE00010")}, name)
            self.assertIn(b"BulkData", xml)
            # Still deferred.
            self.assertIsNone(ds.get_item(0x7FE00010, keep_deferred=True).value)

    def test_deferred_small_value_is_read_when_inline(self):
        path = self._deferred_copy("CT_small.dcm")
        ds = dcmread(path, defer_size=512)
        out = dataset_to_json(ds, bulk_uri=_uri, bulk_threshold=4096)
        # (0043,1029) is 2068 bytes: deferred, but under the threshold: inline.
        self.assertEqual(len(base64.b64decode(out["00431029"]["InlineBinary"])), 2068)
        self.assertIn("BulkDataURI", out["7FE00010"])

    def test_element_at_reads_deferred_value(self):
        path = self._deferred_copy("CT_small.dcm")
        ds = dcmread(path, defer_size=512)
        self.assertEqual(len(element_at(ds, "7FE00010").value), 32768)
        self.assertEqual(element_at(ds, "7fe00010").tag, 0x7FE00010)

    def test_element_at_not_found(self):
        ds = dcmread(_testfile("rtplan.dcm"))
        for path in [
            "",
            "7FE00010",
            "zzzz0010",
            "00100010/0/00100010",
            "300A00B0/99/00100010",
            "300A00B0/x/00100010",
            "300A00B0/0",
            "300A00B0/0/300A00FF",
            "0010001",
        ]:
            with self.assertRaises(NotFound, msg=path) as e:
                element_at(ds, path)
            self.assertNotIn(str(ds.PatientName), e.exception.message)
        self.assertEqual(element_at(ds, "300A00B0/0/300A00B2").value, ds.BeamSequence[0].TreatmentMachineName)


class RoundTripTests(SynchronousTestCase):
    def test_testfiles_round_trip(self):
        for name in ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "rtplan.dcm", "waveform_ecg.dcm"]:
            ds = dcmread(_testfile(name))
            obj = json.loads(json.dumps(dataset_to_json(ds)))
            back = json_to_dataset(obj)
            _equal_datasets(self, ds, back)

    def test_bulk_data_uri_elements_kept_empty(self):
        ds = dcmread(_testfile("MR_small.dcm"))
        back = json_to_dataset(dataset_to_json(ds, bulk_uri=_uri))
        self.assertIn(0x7FE00010, back)
        self.assertFalse(back["PixelData"].value)
        _equal_datasets(self, ds, back, skip={Tag(0x7FE00010)})

    def test_json_text_accepted(self):
        back = json_to_dataset('{"00100020": {"vr": "LO", "Value": ["X1"]}}')
        self.assertEqual(back.PatientID, "X1")

    def test_malformed_json(self):
        for bad in [[], 3, {"00100020": {"vr": "LO", "Value": "notalist"}}, {"nothex": {"vr": "LO"}}]:
            with self.assertRaises(BadRequest, msg=repr(bad)):
                json_to_dataset(bad)


class XmlTests(SynchronousTestCase):
    def _parse(self, data):
        self.assertTrue(data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>'))
        root = DET.fromstring(data)
        self.assertEqual(root.tag, f"{{{NATIVE_DICOM_NS}}}NativeDicomModel")
        return root

    def _attr(self, node, tag):
        found = node.findall(f"d:DicomAttribute[@tag='{tag}']", NS)
        self.assertEqual(len(found), 1, tag)
        return found[0]

    def test_values_names_items_bulk(self):
        ds = Dataset()
        ds.PatientName = "Yamada^Tarou^^Dr.^=山田^太郎=やまだ^たろう"
        ds.PatientID = "a<b & c>\"d'"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.add_new(0x00280030, "DS", ["1.50", "2"])
        ds.add_new(0x00209165, "AT", [0x00100010])
        ds.add_new(0x00431028, "OB", b"\x01\x02")
        ds.add_new(0x7FE00010, "OW", b"\x00" * 4096)
        ds.add_new(0x00080050, "SH", "")
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "private value")
        item = Dataset()
        item.add_new(0x00181074, "DS", "10")
        ds.add_new(0x00540016, "SQ", Sequence([item]))
        root = self._parse(dataset_to_xml(ds, bulk_uri=_uri))

        pn = self._attr(root, "00100010")
        self.assertEqual(pn.get("vr"), "PN")
        self.assertEqual(pn.get("keyword"), "PatientName")
        name = pn.find("d:PersonName[@number='1']", NS)
        self.assertEqual(name.find("d:Alphabetic/d:FamilyName", NS).text, "Yamada")
        self.assertEqual(name.find("d:Alphabetic/d:GivenName", NS).text, "Tarou")
        self.assertIsNone(name.find("d:Alphabetic/d:MiddleName", NS))
        self.assertEqual(name.find("d:Alphabetic/d:NamePrefix", NS).text, "Dr.")
        self.assertEqual(name.find("d:Ideographic/d:FamilyName", NS).text, "山田")
        self.assertEqual(name.find("d:Phonetic/d:GivenName", NS).text, "たろう")

        self.assertEqual(self._attr(root, "00100020").find("d:Value", NS).text, "a<b & c>\"d'")
        values = self._attr(root, "00080008").findall("d:Value", NS)
        self.assertEqual([(v.get("number"), v.text) for v in values], [("1", "ORIGINAL"), ("2", "PRIMARY")])
        self.assertEqual([v.text for v in self._attr(root, "00280030").findall("d:Value", NS)], ["1.5", "2"])
        self.assertEqual(self._attr(root, "00209165").find("d:Value", NS).text, "00100010")
        self.assertEqual(self._attr(root, "00431028").find("d:InlineBinary", NS).text, "AQI=")
        pixel = self._attr(root, "7FE00010")
        self.assertEqual(pixel.find("d:BulkData", NS).get("uri"), _uri("7FE00010"))
        self.assertEqual(pixel.get("keyword"), "PixelData")
        empty = self._attr(root, "00080050")
        self.assertEqual(list(empty), [])
        private = self._attr(root, "00091001")
        self.assertEqual(private.get("privateCreator"), "ACME 1.0")
        self.assertIsNone(private.get("keyword"))
        self.assertEqual(private.find("d:Value", NS).text, "private value")
        seq = self._attr(root, "00540016")
        item_node = seq.find("d:Item[@number='1']", NS)
        self.assertEqual(self._attr(item_node, "00181074").find("d:Value", NS).text, "10")

    def test_invalid_xml_characters_replaced(self):
        ds = Dataset()
        ds.PatientComments = "bell\x07here"
        root = self._parse(dataset_to_xml(ds))
        self.assertEqual(self._attr(root, "00104000").find("d:Value", NS).text, "bell\ufffdhere")

    def test_testfiles_parse_back(self):
        for name in ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "rtplan.dcm"]:
            ds = dcmread(_testfile(name))
            root = self._parse(dataset_to_xml(ds, bulk_uri=_uri))
            model = dataset_to_json(ds, bulk_uri=_uri)
            self.assertEqual([a.get("tag") for a in root.findall("d:DicomAttribute", NS)], list(model))
            for key, attribute in model.items():
                node = self._attr(root, key)
                self.assertEqual(node.get("vr"), attribute["vr"])
                if attribute["vr"] in ("SQ", "PN"):
                    continue
                texts = [v.text for v in node.findall("d:Value", NS)]
                expected = [None if v is None else str(v) for v in attribute.get("Value", [])]
                self.assertEqual(texts, expected, key)


# -- text values decoded without pydicom ----------------------------------------------------


def _raw_dataset(ds, implicit=True):
    """
    C{ds} encoded and read back: elements stay raw until accessed (how
    C-FIND matches arrive).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return read_dataset(DicomBytesIO(fp.getvalue()), implicit, True)


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("implicit", [True, False])
def test_raw_text_values_decoded_directly_match_pydicom(charset, implicit):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    name = "Doe^John" if charset is None else "Dö^Jürgen=ドウ^ジョン" if charset == "ISO_IR 192" else "Dö^Jürgen"
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "PID 1"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.StudyInstanceUID = "1.2.345"
    ds.StudyDate = "20200101"
    ds.StudyDescription = "Head " if charset is None else "Tête"
    ds.AccessionNumber = ""
    ds.add_new(0x00081190, "UR", "http://x.example/a b")
    ds.add_new(0x00324000, "LT", "line one\r\nline two  ")
    item = Dataset()
    item.CodeMeaning = "Tête" if charset else "Head"
    ds.ProcedureCodeSequence = Sequence([item])
    fast = dataset_to_json(_raw_dataset(ds, implicit))
    slow_ds = _raw_dataset(ds, implicit)
    for elem in slow_ds.iterall():  # converted by pydicom first: the slow path
        pass
    slow = dataset_to_json(slow_ds)
    assert fast == slow
    assert fast["00100010"]["Value"][0]["Alphabetic"] == name.split("=")[0]
    assert fast["00080061"]["Value"] == ["CT", "MR"]
    assert fast["00080050"] == {"vr": "SH"}
    assert fast["00081032"]["Value"][0]["00080104"]["Value"] == [item.CodeMeaning]
