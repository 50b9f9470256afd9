"""
Tests for L{harmony.storage.dicom}: the UID tag walk, the layout, and the
file meta fast path (byte-identical to pydicom).
"""

import copy
import io
import random
import struct
import warnings
import zlib

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from harmony.storage import dicom as sd
from harmony.storage.dicom import (
    DEFAULT_LAYOUT,
    NeedMoreData,
    check_layout,
    file_meta,
    layout_path,
    uids_from_dataset_prefix,
)

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]

# Files shipped in the pydicom wheel (never download).
WITH_UIDS = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "rtstruct.dcm",
    "waveform_ecg.dcm",
    "test-SR.dcm",
    "reportsi.dcm",
    "liver_1frame.dcm",
    "examples_palette.dcm",
    "examples_overlay.dcm",
    "SC_rgb_small_odd.dcm",
]
# Encapsulated, deflated and big endian files, walked in their own encoding.
AS_STORED = WITH_UIDS + [
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "ExplVR_BigEnd.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
    "image_dfl.dcm",
    "rtdose_rle.dcm",
]


def load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name, download=False), force=True)


def expected_uids(ds):
    return (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"))


def split_part10(raw):
    """
    (file meta bytes incl. preamble, dataset bytes) of a Part 10 file.
    """
    assert raw[128:132] == b"DICM"
    pos = 132
    while pos < len(raw):
        group, elem, vr = struct.unpack_from("<HH2s", raw, pos)
        if group != 2:
            break
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            pos += 8 + length
    return raw[:pos], raw[pos:]


def encode(ds, transfer_syntax, meta_instance=None):
    """
    The Part 10 file pydicom writes for C{ds} in C{transfer_syntax} (with
    a fresh standard file meta and a zero preamble).
    """
    ds = copy.deepcopy(ds)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if meta_instance is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = meta_instance
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def plain_dataset_bytes(raw, transfer_syntax):
    """
    The dataset bytes of a Part 10 file, inflated when deflated.
    """
    body = split_part10(raw)[1]
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    return body


def undefined_everywhere(ds):
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                undefined_everywhere(item)


def with_sequences():
    """
    CT_small with undefined-length sequences (nested, empty, private)
    before and between the UIDs.
    """
    ds = load("CT_small.dcm")
    code = Dataset()
    code.CodeValue = "en"
    code.CodingSchemeDesignator = "RFC5646"
    code.CodeMeaning = "English"
    nested = Dataset()
    nested.CodeValue = "x"
    inner = Dataset()
    inner.LongCodeValue = "deep"
    nested.ConceptNameCodeSequence = Sequence([inner])
    code.ModifierCodeSequence = Sequence([nested, Dataset()])
    ds.LanguageCodeSequence = Sequence([code, Dataset()])  # (0008,0006): before the SOP Instance UID
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([ref, ref])  # (0008,1140)
    ds.OtherPatientIDsSequence = Sequence([])  # (0010,1002): empty
    ds.add_new(0x00090010, "LO", "HARMONY TEST")
    private = Dataset()
    private.add_new(0x00091001, "LO", "private value")
    ds.add_new(0x00091002, "SQ", Sequence([private]))
    undefined_everywhere(ds)
    return ds


def corpus():
    """
    (name, transfer syntax, dataset bytes as sent, expected UIDs).
    """
    cases = []
    for name in AS_STORED:
        ds = load(name)
        ts = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
        with open(get_testdata_file(name, download=False), "rb") as f:
            raw = f.read()
        body = split_part10(raw)[1] if raw[128:132] == b"DICM" else raw
        cases.append((name + "/as-stored", ts, body, expected_uids(ds)))
    for name in WITH_UIDS + ["sequences"]:
        ds = with_sequences() if name == "sequences" else load(name)
        for ts in UNCOMPRESSED:
            cases.append((name + "/" + ts.name, ts, split_part10(encode(ds, ts))[1], expected_uids(ds)))
    return cases


CORPUS = corpus()


# -- uids_from_dataset_prefix ------------------------------------------------


@pytest.mark.parametrize("name,ts,body,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_uids_whole_dataset(name, ts, body, expected):
    assert uids_from_dataset_prefix(body, ts) == expected
    assert uids_from_dataset_prefix(body, ts, final=True) == expected
    assert uids_from_dataset_prefix(memoryview(body), ts) == expected
    assert uids_from_dataset_prefix(bytearray(body), ts) == expected


def test_corpus_has_sequences_before_the_uids():
    ds = with_sequences()
    for ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian):
        body = split_part10(encode(ds, ts))[1]
        little = ts != ExplicitVRBigEndian
        delimiter = struct.pack("<HH" if little else ">HH", 0xFFFE, 0xE0DD)
        item_end = struct.pack("<HH" if little else ">HH", 0xFFFE, 0xE00D)
        sop = body.index(ds.SOPInstanceUID.encode())
        # Undefined-length sequence and item delimiters before the SOP Instance UID.
        assert delimiter in body[:sop] and item_end in body[:sop]


@pytest.mark.parametrize("name", WITH_UIDS[:4] + ["sequences"])
@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_uids_every_prefix(name, ts):
    """
    Every prefix ending before the Series Instance UID's value needs more
    data; every longer one gives the answer, whatever follows.
    """
    ds = with_sequences() if name == "sequences" else load(name)
    body = split_part10(encode(ds, ts))[1]
    expected = expected_uids(ds)
    series = ds.SeriesInstanceUID.encode()
    end = body.index(series) + len(series) + (len(series) & 1)
    for cut in range(end):
        with pytest.raises(NeedMoreData):
            uids_from_dataset_prefix(body[:cut], ts)
    assert uids_from_dataset_prefix(body[:end], ts) == expected
    # The walk stops there: the rest is never looked at.
    assert uids_from_dataset_prefix(body[:end] + b"\xff" * 64, ts) == expected
    assert uids_from_dataset_prefix(body[:end] + b"\x00", ts) == expected
    assert end < len(body)


def test_uids_deflated_prefixes():
    ds = with_sequences()
    body = split_part10(encode(ds, DeflatedExplicitVRLittleEndian))[1]
    expected = expected_uids(ds)
    answers = []
    for cut in range(0, len(body), 7):
        try:
            answers.append(uids_from_dataset_prefix(body[:cut], DeflatedExplicitVRLittleEndian))
        except NeedMoreData:
            assert not answers  # once known, known for every longer prefix
    assert answers and all(a == expected for a in answers)
    # Known well before the end of the deflated data.
    assert len(answers) > 100


def test_uids_stop_at_next_element_after_series_missing():
    """
    Without (0020,000E), the walk stops at the first tag after it.
    """
    ds = load("CT_small.dcm")
    del ds.SeriesInstanceUID
    for ts in UNCOMPRESSED:
        body = split_part10(encode(ds, ts))[1]
        plain = plain_dataset_bytes(encode(ds, ts), ts)
        assert uids_from_dataset_prefix(body, ts) == (ds.StudyInstanceUID, None, ds.SOPInstanceUID)
        if ts != DeflatedExplicitVRLittleEndian:
            # (0020,0010) Study ID comes next: its tag alone is enough.
            start = plain.index(struct.pack("<HH" if ts != ExplicitVRBigEndian else ">HH", 0x0020, 0x0010))
            assert uids_from_dataset_prefix(plain[: start + 4], ts) == (ds.StudyInstanceUID, None, ds.SOPInstanceUID)
            with pytest.raises(NeedMoreData):
                uids_from_dataset_prefix(plain[: start + 3], ts)


def test_uids_missing_at_end_of_dataset():
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3"
    ds.PatientName = "Nobody"
    for ts in UNCOMPRESSED:
        body = split_part10(encode(ds, ts))[1]
        assert uids_from_dataset_prefix(body, ts, final=True) == (None, None, "1.2.3")
        with pytest.raises(NeedMoreData):
            uids_from_dataset_prefix(body, ts)
    # A truncated last element is not a dataset when it is final.
    body = split_part10(encode(ds, ExplicitVRLittleEndian))[1]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(body[:-1], ExplicitVRLittleEndian, final=True)


def test_uids_empty_values_are_none():
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ""
    ds.StudyInstanceUID = "1.2"
    ds.SeriesInstanceUID = ""
    ds.SOPClassUID = CTImageStorage
    for ts in UNCOMPRESSED:
        body = split_part10(encode(ds, ts, meta_instance="9.9"))[1]
        assert uids_from_dataset_prefix(body, ts) == ("1.2", None, None)


def test_uids_datasets_without_them():
    # pydicom test files that are not composite instances.
    body = open(get_testdata_file("empty_charset_LEI.dcm", download=False), "rb").read()
    body = split_part10(body)[1]
    assert uids_from_dataset_prefix(body, ImplicitVRLittleEndian, final=True) == (None, None, None)
    with pytest.raises(NeedMoreData):
        uids_from_dataset_prefix(body, ImplicitVRLittleEndian)
    # Only elements after (0020,000E).
    body = split_part10(open(get_testdata_file("priv_SQ.dcm", download=False), "rb").read())[1]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(body, ImplicitVRLittleEndian)
    # A private group 0001 (not allowed by PS3.5 7.1).
    body = split_part10(open(get_testdata_file("nested_priv_SQ.dcm", download=False), "rb").read())[1]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(body, ImplicitVRLittleEndian)


def _explicit(tag, vr, value):
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _implicit(tag, value, length=None):
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value) if length is None else length) + value


ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def test_uids_undefined_length_un_holds_implicit_le():
    """
    PS3.5 6.2.2: an explicit VR dataset with an undefined-length UN element
    whose items are implicit VR LE (with a nested undefined sequence).
    """
    nested = _implicit(0x00081150, b"1.2\x00") + _implicit(0x00081155, b"1.2.3.4\x00")
    inner_seq = _implicit(0x00081140, ITEM + nested + ITEM_END + SEQ_END, 0xFFFFFFFF)
    un_value = ITEM + _implicit(0x00100010, b"Doe^J ") + inner_seq + ITEM_END + ITEM + ITEM_END + SEQ_END
    body = (
        _explicit(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00")
        + _explicit(0x00080018, b"UI", b"1.2.3.4.5\x00")
        + _explicit(0x00090010, b"LO", b"PRIV")
        + struct.pack("<HH2sHI", 0x0009, 0x1001, b"UN", 0, 0xFFFFFFFF)
        + un_value
        + _explicit(0x0020000D, b"UI", b"1.2.3\x00")
        + _explicit(0x0020000E, b"UI", b"1.2.3.44")
        + _explicit(0x00280010, b"US", b"\x01\x00")
    )
    assert uids_from_dataset_prefix(body, ExplicitVRLittleEndian) == ("1.2.3", "1.2.3.44", "1.2.3.4.5")
    deflated = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    compressed = deflated.compress(body) + deflated.flush()
    assert uids_from_dataset_prefix(compressed, DeflatedExplicitVRLittleEndian) == ("1.2.3", "1.2.3.44", "1.2.3.4.5")


def test_uids_encapsulated_value_before_uids():
    """
    An undefined-length OB (encapsulated fragments) is skipped by its items.
    """
    fragments = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd"
    body = (
        _explicit(0x00080018, b"UI", b"1.2\x00")
        + struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF)
        + fragments
        + SEQ_END
        + _explicit(0x0020000D, b"UI", b"1.3\x00")
        + _explicit(0x0020000E, b"UI", b"1.4\x00")
    )
    assert uids_from_dataset_prefix(body, JPEGBaseline8Bit) == ("1.3", "1.4", "1.2")


def test_uids_depth_limit():
    deep = _implicit(0x00080018, b"1.2\x00")
    for _ in range(sd.MAX_DEPTH + 2):
        deep = _implicit(0x00081140, ITEM + deep + ITEM_END + SEQ_END, 0xFFFFFFFF)
    body = _implicit(0x00080016, b"1.2\x00") + deep[: len(deep)]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(body, ImplicitVRLittleEndian)


GARBAGE = [
    b"",
    b"\x00" * 256,
    b"\xff" * 256,
    b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n" * 4,
    b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\x00" * 100,  # a Part 10 file, not a dataset
    struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 8,  # item tags at top level
    struct.pack("<HHI", 0x0002, 0x0010, 2) + b"1\x00" + b"\x00" * 64,  # file meta group
    _implicit(0x00100010, b"AB") + _implicit(0x00080018, b"1.2\x00") + b"\x00" * 64,  # out of order
    _implicit(0x00080018, b"1.2\x00") + _implicit(0x00081140, b"\x01\x02\x03\x04" * 8, 0xFFFFFFFF),  # no item
]


@pytest.mark.parametrize("ts", UNCOMPRESSED + [JPEG2000Lossless])
@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_uids_garbage(ts, data):
    if ts == DeflatedExplicitVRLittleEndian:
        with pytest.raises(ValueError):
            uids_from_dataset_prefix(data, ts, final=True)
        return
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(data, ts, final=True)


@pytest.mark.parametrize("ts", UNCOMPRESSED)
def test_uids_random_bytes(ts):
    rng = random.Random(1234)
    for size in (1, 7, 16, 100, 1000, 10000):
        for _ in range(30):
            data = bytes(rng.getrandbits(8) for _ in range(size))
            with pytest.raises(ValueError):
                uids_from_dataset_prefix(data, ts, final=True)
            try:
                uids_from_dataset_prefix(data, ts)
            except (ValueError, NeedMoreData):
                pass
            else:  # pragma: no cover
                pytest.fail("random bytes taken for a dataset")


def test_uids_wrong_transfer_syntax():
    ds = load("CT_small.dcm")
    implicit = split_part10(encode(ds, ImplicitVRLittleEndian))[1]
    big = split_part10(encode(ds, ExplicitVRBigEndian))[1]
    little = split_part10(encode(ds, ExplicitVRLittleEndian))[1]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(implicit, ExplicitVRLittleEndian)
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(big, ExplicitVRLittleEndian)
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(little, ExplicitVRBigEndian)
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(little, DeflatedExplicitVRLittleEndian)
    with pytest.raises((ValueError, NeedMoreData)):
        uids_from_dataset_prefix(little, ImplicitVRLittleEndian)


def test_uids_inflate_cap(monkeypatch):
    monkeypatch.setattr(sd, "MAX_INFLATED", 64)
    body = split_part10(encode(load("CT_small.dcm"), DeflatedExplicitVRLittleEndian))[1]
    with pytest.raises(ValueError):
        uids_from_dataset_prefix(body, DeflatedExplicitVRLittleEndian)


def test_uids_transfer_syntax_padding():
    body = split_part10(encode(load("MR_small.dcm"), ImplicitVRLittleEndian))[1]
    ds = load("MR_small.dcm")
    assert uids_from_dataset_prefix(body, ImplicitVRLittleEndian + "\x00") == expected_uids(ds)


# -- layout ------------------------------------------------------------------


def test_layout_default():
    assert DEFAULT_LAYOUT == "{study}/{series}/{sop}.dcm"
    assert layout_path(DEFAULT_LAYOUT, "1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"


@pytest.mark.parametrize(
    "layout,expected",
    [
        ("{sop}.dcm", "3.4.dcm"),
        ("{sop}", "3.4"),
        ("dicom/{study}/{sop}.dcm", "dicom/1.2/3.4.dcm"),
        ("{study}-{series}/{sop}_x.dcm", "1.2-2.3/3.4_x.dcm"),
        ("{study}/{study}/{sop}", "1.2/1.2/3.4"),
    ],
)
def test_layout_good(layout, expected):
    assert check_layout(layout) == layout
    assert layout_path(layout, "1.2", "2.3", "3.4") == expected


@pytest.mark.parametrize(
    "layout",
    [
        "/{study}/{sop}.dcm",
        "../{sop}",
        "{study}/../{sop}",
        "{study}//{sop}",
        "{study}/{series}",
        "{sop!r}",
        "{sop:>10}",
        "{other}/{sop}",
        "{0}/{sop}",
        "{}/{sop}",
        "{sop}/",
        "a\\{sop}",
        "a b/{sop}",
        ".tmp/{sop}",
        "./{sop}",
        "{sop",
        "{sop}}",
        "~/{sop}",
        "{sop}\x00",
        "",
        None,
    ],
)
def test_layout_bad(layout):
    with pytest.raises(ValueError):
        check_layout(layout)
    with pytest.raises(ValueError):
        layout_path(layout, "1.2", "2.3", "3.4")


@pytest.mark.parametrize(
    "uid",
    ["", None, ".", "..", "../x", "1.2/3", "1..2", ".1.2", "1.2.", "1.2\x00", "1.2 ", "1.a", "1" * 65, 12, "١.٢"],
)
def test_layout_bad_uids(uid):
    for args in ((uid, "1.2", "1.3"), ("1.2", uid, "1.3"), ("1.2", "1.3", uid)):
        with pytest.raises(ValueError):
            layout_path(DEFAULT_LAYOUT, *args)


def test_layout_long_uid():
    uid = "1." + "2" * 62
    assert layout_path("{sop}", "1", "1", uid) == uid


# -- file meta -----------------------------------------------------------------


def pydicom_meta(sop_class, sop_instance, ts, impl_uid, version=None, aet=None):
    """
    What pydicom writes: dcmwrite(enforce_file_format=True) when a version
    name is given; otherwise write_file_meta_info of the same elements.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = impl_uid
    if aet is not None:
        meta.SourceApplicationEntityTitle = aet
    if version is not None:
        meta.ImplementationVersionName = version
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_instance
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        return split_part10(out.getvalue())[0]
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=False)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def instance_uids():
    rng = random.Random(42)
    uids = ["1", "12", "1.2", "1.23"]
    for length in range(5, 65):
        uid = "1.2." + rng.choice("123456789") + "".join(rng.choice("0123456789") for _ in range(length - 5))
        uids.append(uid)
    uids += [generate_uid() for _ in range(40)]
    uids += [generate_uid(prefix="1.2.826.0.1.3680043.10.543.") for _ in range(10)]
    return uids


INSTANCE_UIDS = instance_uids()
META_CASES = [
    (CTImageStorage, ExplicitVRLittleEndian, "1.2.826.0.1.3680043.10.543.1", "HARMONY_1", "STORESCU"),
    (MRImageStorage, ImplicitVRLittleEndian, "1.2.826.0.1.3680043.10.543", "HARMONY", None),
    (SecondaryCaptureImageStorage, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID, None, None),
    (CTImageStorage, DeflatedExplicitVRLittleEndian, "1.2.3.4", "X", "AE"),
    (MRImageStorage, ExplicitVRBigEndian, "1.2.3", None, "ODDAET"),
    ("1.2.840.10008.5.1.4.1.1.88.11", RLELossless, "1.2.826.0.1.3680043.10.543.12", "HARMONY 0.1.0", "EVEN_AE1"),
    ("1.2.840.10008.5.1.4.1.1.481.5", JPEG2000Lossless, "1.22", "V", None),
]


@pytest.mark.parametrize("case", META_CASES, ids=range(len(META_CASES)))
def test_file_meta_identical_to_pydicom(case):
    sop_class, ts, impl_uid, version, aet = case
    lengths = set()
    for uid in INSTANCE_UIDS:
        ours = file_meta(sop_class, uid, ts, impl_uid, version, aet)
        assert ours == pydicom_meta(sop_class, uid, ts, impl_uid, version, aet), uid
        lengths.add(len(uid) % 2)
    assert lengths == {0, 1}


def test_file_meta_reads_back():
    meta = file_meta(CTImageStorage, "1.2.3.45", ExplicitVRLittleEndian, "1.2.826.0.1.3680043.10.543", "HARMONY", "AE1")
    read = pydicom.dcmread(io.BytesIO(meta)).file_meta
    assert read.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert read.MediaStorageSOPClassUID == CTImageStorage
    assert read.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.ImplementationVersionName == "HARMONY"
    assert read.SourceApplicationEntityTitle == "AE1"
    assert read.FileMetaInformationGroupLength == len(meta) - 132 - 12


def test_file_meta_cached():
    sd._template.cache_clear()
    for uid in INSTANCE_UIDS:
        file_meta(CTImageStorage, uid, ExplicitVRLittleEndian, "1.2.3", "V")
    info = sd._template.cache_info()
    assert info.misses == 1
    assert info.hits == len(INSTANCE_UIDS) - 1


def test_file_meta_strips_padding():
    padded = file_meta(CTImageStorage + "\x00", "1.2.3\x00", ExplicitVRLittleEndian + "\x00", "1.2 ", "V")
    assert padded == file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "1.2", "V")


@pytest.mark.parametrize("uid", ["", "\x00", " ", "1.2.é", None, b"1.2"])
def test_file_meta_bad_uid(uid):
    with pytest.raises(ValueError):
        file_meta(CTImageStorage, uid, ExplicitVRLittleEndian, "1.2")
    with pytest.raises(ValueError):
        file_meta(uid, "1.2", ExplicitVRLittleEndian, "1.2")


PART10_FILES = WITH_UIDS + ["sequences", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # rtdose.dcm's own UIDs
@pytest.mark.parametrize("name", PART10_FILES)
def test_part10_file_reads_back(name):
    """
    file_meta + the dataset bytes as received = a Part 10 file that pydicom
    reads back with the same dataset; with pydicom's implementation UID and
    version name it is byte-identical to pydicom's own file.
    """
    ds = with_sequences() if name == "sequences" else load(name)
    own = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
    syntaxes = UNCOMPRESSED if not own.is_compressed else [own]
    for ts in syntaxes:
        raw = encode(ds, ts)
        body = split_part10(raw)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = pydicom.dcmread(io.BytesIO(raw))
        version = reference.file_meta.ImplementationVersionName
        ours = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts, PYDICOM_IMPLEMENTATION_UID, version) + body
        assert ours == raw
        mine = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts, "1.2.826.0.1.3680043.10.543", "HARMONY", "SCU") + body
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = pydicom.dcmread(io.BytesIO(mine))
        assert back.file_meta.TransferSyntaxUID == ts
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.ImplementationVersionName == "HARMONY"
        back_elements = [(e.tag, e.VR, e.value) for e in back.iterall() if e.tag != 0x7FE00010]
        ref_elements = [(e.tag, e.VR, e.value) for e in reference.iterall() if e.tag != 0x7FE00010]
        assert back_elements == ref_elements
        if "PixelData" in reference:
            assert back.PixelData == reference.PixelData
        assert back == reference
        assert uids_from_dataset_prefix(body, ts) == expected_uids(ds)
