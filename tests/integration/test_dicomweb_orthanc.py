"""
DICOMweb through a real C{twistd -n harmony}, differential against the
session's Orthanc and its own DICOMweb plugin (C{/dicom-web}).

Three ways to the same data (conftest's C{dicomweb_data}: one patient of
this session, three studies; C{dicomweb_gateway}):

  - C{bridge}: Harmony's dicomweb endpoint + C{dicomweb_bridge} + dicom_scu
    (C-FIND, C-GET, C-STORE to Orthanc's DIMSE port);
  - C{proxy}: Harmony's dicomweb endpoint + dicomweb backend in front of
    Orthanc's C{/dicom-web} (URL rewriting);
  - C{orthanc}: Orthanc's C{/dicom-web} directly.

QIDO-RS answers must have the same matches (sets of UIDs, and the expected
ones: ground truth from the data stored) and the same values for the
attributes both have; WADO-RS answers the same instances, data sets equal to
the files stored (compared element by element with pydicom: the Part 10
file meta differs); URLs in answers from Harmony point at Harmony.  Where
Orthanc is known to differ (or to be wrong), a comment says why.
"""

import io
import json
import uuid

import numpy
import pydicom
import pytest
from peers import dicomweb_instance, multipart_body, multipart_parts
from PIL import Image
from pydicom.uid import generate_uid

from harmonytest import request

TARGETS = ("bridge", "proxy", "orthanc")
HARMONY = ("bridge", "proxy")
LEVEL_KEY = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}
RETRIEVE_URL = "00081190"
PIXEL_DATA = "7FE00010"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
MULTIPART_OCTETS = 'multipart/related; type="application/octet-stream"'


@pytest.fixture(scope="module")
def dw(dicomweb_gateway, orthanc, dicomweb_data):
    return DicomwebTargets(dicomweb_gateway, orthanc, dicomweb_data)


class DicomwebTargets:
    """
    GET/POST/OPTIONS to one of L{TARGETS} (plus C{bridge-move} and C{down}).
    """

    def __init__(self, gateway, orthanc, data):
        self.gateway = gateway
        self.orthanc = orthanc
        self.data = data

    def address(self, target):
        if target == "orthanc":
            return self.orthanc.http_port, "/dicom-web"
        return self.gateway.port, f"/{target}"

    def root(self, target):
        port, prefix = self.address(target)
        return f"http://127.0.0.1:{port}{prefix}"

    def request(self, target, method, path, headers=(), body=None, timeout=60):
        port, prefix = self.address(target)
        return request(port, method, f"{prefix}/{path}", body=body, headers=headers, timeout=timeout)

    def get(self, target, path, accept=None, headers=()):
        headers = list(headers)
        if accept is not None:
            headers.append(("Accept", accept))
        return self.request(target, "GET", path, headers=headers)

    def json(self, target, path, accept="application/dicom+json"):
        response = self.get(target, path, accept)
        assert response.status == 200, (target, path, response)
        assert response.header("Content-Type").split(";")[0].strip() == "application/dicom+json", response
        return response.json()

    # paths of the data set
    def study(self, key):
        return self.data.studies[key].uid

    def series(self, key, series):
        return self.data.studies[key].series[series]

    def sop(self, key, series, index=0):
        return self.data.sops[key, series][index]

    def instance_path(self, key, series, index=0):
        return f"studies/{self.study(key)}/series/{self.series(key, series)}/instances/{self.sop(key, series, index)}"

    def original(self, sop):
        return pydicom.dcmread(self.data.files[sop])


# -- QIDO-RS ----------------------------------------------------------------------------


def _value(match, tag):
    values = match.get(tag, {}).get("Value") or [None]
    return values[0]


def _uids(matches, resource):
    return [_value(m, LEVEL_KEY[resource]) for m in matches]


def _normalise(values):
    """
    DICOM JSON values in a comparable form: PN objects keep their
    Alphabetic group only, numbers written as strings become numbers
    (PS3.18 F.2.3: IS and DS values are JSON numbers; some servers send
    strings).
    """
    out = []
    for value in values:
        if isinstance(value, dict):
            value = value.get("Alphabetic")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out.append(value)
    return out


def _compare_matches(reference, other, label, rewritten_root=None, reference_root=None):
    """
    For each attribute both matches have: the same VR and the same values.
    C{RetrieveURL}s are compared relative to each answer's DICOMweb root.
    """
    for tag, element in reference.items():
        if tag not in other:
            continue
        theirs, ours = element.get("Value"), other[tag].get("Value")
        assert element.get("vr") == other[tag].get("vr"), (label, tag, element, other[tag])
        if tag == RETRIEVE_URL:
            assert ours and theirs, (label, tag, element, other[tag])
            assert theirs[0].startswith(reference_root + "/"), (label, theirs)
            assert ours[0].startswith(rewritten_root + "/"), (label, "RetrieveURL not under Harmony's prefix", ours)
            assert ours[0][len(rewritten_root):] == theirs[0][len(reference_root):], (label, ours, theirs)
            continue
        if theirs is None or ours is None:
            # An empty attribute on one side, absent value on the other.
            assert not theirs and not ours, (label, tag, element, other[tag])
            continue
        assert _normalise(theirs) == _normalise(ours), (label, tag, element, other[tag])


#: name -> (path template, the level's UIDs expected (keys of the data set),
#: exact: the answer holds these and no others (else: at least these)).
QUERIES = {
    "patient-studies": ("studies?PatientID={P}", "studies", ["ctmr", "dose", "sc"], True),
    "name-wildcard": ("studies?PatientName={NAMEPREFIX}*", "studies", ["ctmr", "dose", "sc"], True),
    "tag-form": ("studies?00100020={P}", "studies", ["ctmr", "dose", "sc"], True),
    "date-range": ("studies?PatientID={P}&StudyDate=20230101-20230228", "studies", ["ctmr", "dose"], True),
    "date-open-range": ("studies?PatientID={P}&StudyDate=20230301-", "studies", ["sc"], True),
    "modalities-ct-mr": ("studies?PatientID={P}&ModalitiesInStudy=CT,MR", "studies", ["ctmr"], True),
    "modalities-list": ("studies?PatientID={P}&ModalitiesInStudy=MR,RTDOSE", "studies", ["ctmr", "dose"], True),
    "study-uid-list": ("studies?StudyInstanceUID={ctmr},{dose}", "studies", ["ctmr", "dose"], True),
    "includefield-all": ("studies?PatientID={P}&includefield=all", "studies", ["ctmr", "dose", "sc"], True),
    "includefield-tag": ("studies?PatientID={P}&includefield=00081030", "studies", ["ctmr", "dose", "sc"], True),
    "series-of-study": ("studies/{ctmr}/series", "series", ["ctmr/ct", "ctmr/mr"], True),
    "series-of-study-modality": ("studies/{sc}/series?Modality=OT", "series", ["sc/rle", "sc/rgb"], True),
    "series-modality-mr": ("series?Modality=MR", "series", ["ctmr/mr"], False),
    "series-of-patient": ("series?PatientID={P}", "series", ["ctmr/ct", "ctmr/mr", "dose/dose", "sc/rle", "sc/rgb"],
                          True),
    "instances-of-series": ("studies/{ctmr}/series/{ctmr/ct}/instances", "instances", ["ctmr/ct/0", "ctmr/ct/1"],
                            True),
    "instances-of-study": ("studies/{ctmr}/instances", "instances", ["ctmr/ct/0", "ctmr/ct/1", "ctmr/mr/0"], True),
    "instance-by-uid": ("instances?SOPInstanceUID={ctmr/mr/0}", "instances", ["ctmr/mr/0"], True),
    "instances-of-study-by-number": ("studies/{ctmr}/instances?InstanceNumber=2", "instances", ["ctmr/ct/1"], True),
    "no-match": ("studies?PatientID={P}NOSUCH", "studies", [], True),
}


def _names(data):
    names = {"P": data.patient, "NAMEPREFIX": data.patient_name[:6]}
    for key, study in data.studies.items():
        names[key] = study.uid
        for series_key, uid in study.series.items():
            names[f"{key}/{series_key}"] = uid
            for i, sop in enumerate(data.sops[key, series_key]):
                names[f"{key}/{series_key}/{i}"] = sop
    return names


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_qido(dw, name):
    template, resource, expected, exact = QUERIES[name]
    names = _names(dw.data)
    path = template
    for key in sorted(names, key=len, reverse=True):
        path = path.replace("{" + key + "}", names[key])
    expected = {names[key] for key in expected}
    answers = {target: dw.json(target, path) for target in TARGETS}
    sets = {}
    for target, matches in answers.items():
        uids = _uids(matches, resource)
        assert len(uids) == len(set(uids)), (target, "duplicate matches", uids)
        sets[target] = set(uids)
        if exact:
            assert sets[target] == expected, (target, path)
        else:
            assert expected <= sets[target], (target, path)
    assert sets["bridge"] == sets["orthanc"], path
    assert sets["proxy"] == sets["orthanc"], path
    reference = {_value(m, LEVEL_KEY[resource]): m for m in answers["orthanc"]}
    for target in HARMONY:
        for match in answers[target]:
            uid = _value(match, LEVEL_KEY[resource])
            _compare_matches(reference[uid], match, (target, path, uid), dw.root(target), dw.root("orthanc"))
            assert _value(match, RETRIEVE_URL).startswith(dw.root(target) + "/studies/"), match
    if name == "includefield-tag":
        for target in TARGETS:
            for match in answers[target]:
                assert _value(match, "00081030").startswith("DICOMweb "), (target, match)
    if name.startswith("patient") or name == "includefield-all":
        for target in TARGETS:
            for match in answers[target]:
                key = next(k for k, s in dw.data.studies.items() if s.uid == _value(match, "0020000D"))
                assert _value(match, "00100020") == dw.data.patient, (target, match)
                assert _value(match, "00080020") == dw.data.studies[key].date, (target, match)
                count = sum(len(v) for (k, _), v in dw.data.sops.items() if k == key)
                assert float(_value(match, "00201208")) == count, (target, match)


@pytest.mark.parametrize("query", ["studies?PatientID={P}", "series?PatientID={P}", "instances?SOPInstanceUID={I}"])
def test_qido_bridge_has_orthanc_attributes(dw, query):
    """
    The bridge's matches carry the attributes Orthanc's plugin returns
    (the PS3.18 Table 6.7.1-2 return keys; study attributes too for series
    and instances searched outside a study) with the same values.  (Under
    C{studies/{s}/series} the bridge leaves the study attributes out, as
    PS3.18 6.7.1.2.2 allows; Orthanc repeats them.)
    """
    path = query.format(P=dw.data.patient, I=dw.sop("ctmr", "mr"))
    resource = path.split("?")[0]
    orthanc = {_value(m, LEVEL_KEY[resource]): m for m in dw.json("orthanc", path)}
    bridge = dw.json("bridge", path)
    assert bridge and sorted(orthanc) == sorted(_value(m, LEVEL_KEY[resource]) for m in bridge)
    for match in bridge:
        reference = orthanc[_value(match, LEVEL_KEY[resource])]
        # TimezoneOffsetFromUTC (0008,0201): Orthanc's plugin copies it from
        # an instance; it is not a return key of PS3.18.
        missing = set(reference) - set(match) - {"00080201"}
        assert not missing, f"the bridge's match lacks {sorted(missing)}"
        _compare_matches(reference, match, ("bridge", path), dw.root("bridge"), dw.root("orthanc"))


def test_qido_limit_offset(dw):
    """
    C{limit}/C{offset} page through the matches: each page has the size
    asked for and the pages together are all the matches, with none twice.
    (The order of the matches is each server's own, so pages are not
    compared between servers.)
    """
    everything = {dw.study(k) for k in dw.data.studies}
    for target in TARGETS:
        pages = []
        for offset in range(0, 4):
            matches = dw.json(target, f"studies?PatientID={dw.data.patient}&limit=1&offset={offset}")
            pages.append(_uids(matches, "studies"))
        assert [len(p) for p in pages] == [1, 1, 1, 0], (target, pages)
        assert {p[0] for p in pages[:3]} == everything, (target, pages)
        two = dw.json(target, f"studies?PatientID={dw.data.patient}&limit=2")
        assert len(two) == 2, target


# -- WADO-RS: instances -----------------------------------------------------------------


def _assert_same_dataset(got, original, label):
    """
    Every element of C{original} (file meta and trailing padding aside) is
    in C{got} with the same value; pixel data are compared decoded when the
    transfer syntaxes differ.
    """
    same_syntax = got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    for element in original:
        if element.tag == 0xFFFCFFFC:  # Orthanc drops the Data Set Trailing Padding
            continue
        assert element.tag in got, (label, "missing", element)
        if element.tag == 0x7FE00010 and not same_syntax:
            assert numpy.array_equal(got.pixel_array, original.pixel_array), (label, "pixels differ")
            continue
        assert got[element.tag].value == element.value, (label, element, got[element.tag])


def _instances(response, label):
    assert response.status == 200, (label, response)
    ctype = response.header("Content-Type")
    assert ctype.startswith("multipart/related"), (label, ctype)
    assert 'type="application/dicom"' in ctype.replace("'", '"') or "type=application/dicom" in ctype, (label, ctype)
    out = {}
    for headers, payload in multipart_parts(ctype, response.body):
        assert headers.get("content-type", "").startswith("application/dicom"), (label, headers)
        ds = pydicom.dcmread(io.BytesIO(payload))
        assert ds.SOPInstanceUID not in out, (label, "twice", ds.SOPInstanceUID)
        out[ds.SOPInstanceUID] = ds
    return out


RETRIEVES = {
    "study-ctmr": lambda dw: (f"studies/{dw.study('ctmr')}", dw.data.sops["ctmr", "ct"] + dw.data.sops["ctmr", "mr"]),
    "study-dose": lambda dw: (f"studies/{dw.study('dose')}", dw.data.sops["dose", "dose"]),
    "study-sc": lambda dw: (f"studies/{dw.study('sc')}", dw.data.sops["sc", "rle"] + dw.data.sops["sc", "rgb"]),
    "series-ct": lambda dw: (f"studies/{dw.study('ctmr')}/series/{dw.series('ctmr', 'ct')}",
                             dw.data.sops["ctmr", "ct"]),
    "instance-mr": lambda dw: (dw.instance_path("ctmr", "mr"), dw.data.sops["ctmr", "mr"]),
    "instance-rle": lambda dw: (dw.instance_path("sc", "rle"), dw.data.sops["sc", "rle"]),
}


@pytest.mark.parametrize("name", sorted(RETRIEVES))
def test_wado_retrieve(dw, name):
    path, expected = RETRIEVES[name](dw)
    got = {target: _instances(dw.get(target, path, MULTIPART_DICOM), (target, path)) for target in TARGETS}
    for target, instances in got.items():
        assert sorted(instances) == sorted(expected), target
        for sop, ds in instances.items():
            _assert_same_dataset(ds, dw.original(sop), (target, name, sop))
    for target in HARMONY:
        for sop, ds in got[target].items():
            _assert_same_dataset(ds, got["orthanc"][sop], (target, "vs orthanc", sop))


def test_wado_retrieve_explicit_transfer_syntax(dw):
    """
    C{transfer-syntax=1.2.840.10008.1.2.1} asked for: the implicit VR
    rtdose instance comes back as explicit VR little endian, the same data.
    """
    accept = MULTIPART_DICOM + "; transfer-syntax=1.2.840.10008.1.2.1"
    sop = dw.sop("dose", "dose")
    for target in TARGETS:
        instances = _instances(dw.get(target, dw.instance_path("dose", "dose"), accept), target)
        assert list(instances) == [sop], target
        ds = instances[sop]
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", target
        _assert_same_dataset(ds, dw.original(sop), target)


def test_bridge_move_retrieves_the_same(dw):
    """
    C{/bridge-move} (C-MOVE to Harmony's store SCP) gives the same data sets
    as C{/bridge} (C-GET).
    """
    path = f"studies/{dw.study('ctmr')}"
    moved = _instances(dw.get("bridge-move", path, MULTIPART_DICOM), "bridge-move")
    got = _instances(dw.get("bridge", path, MULTIPART_DICOM), "bridge")
    assert sorted(moved) == sorted(got) == sorted(dw.data.sops["ctmr", "ct"] + dw.data.sops["ctmr", "mr"])
    for sop in got:
        _assert_same_dataset(moved[sop], got[sop], ("move vs get", sop))
        _assert_same_dataset(moved[sop], dw.original(sop), ("move vs original", sop))


# -- WADO-RS: metadata ----------------------------------------------------------------


def _metadata_paths(dw):
    return {
        "study": (f"studies/{dw.study('ctmr')}/metadata", dw.data.sops["ctmr", "ct"] + dw.data.sops["ctmr", "mr"]),
        "series": (f"studies/{dw.study('sc')}/series/{dw.series('sc', 'rle')}/metadata", dw.data.sops["sc", "rle"]),
        "instance": (dw.instance_path("dose", "dose") + "/metadata", dw.data.sops["dose", "dose"]),
    }


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_metadata(dw, level):
    path, expected = _metadata_paths(dw)[level]
    answers = {target: dw.json(target, path) for target in TARGETS}
    by_sop = {}
    for target, items in answers.items():
        by_sop[target] = {_value(item, "00080018"): item for item in items}
        assert sorted(by_sop[target]) == sorted(expected), target
    for target in HARMONY:
        for sop, item in by_sop[target].items():
            reference = by_sop["orthanc"][sop]
            original = dw.original(sop)
            # PixelData: Orthanc 1.7 leaves it out of the metadata of
            # RLE-compressed instances (and calls 8-bit pixel data OW); the
            # bridge must always give a BulkDataURI.  Other bulk data are
            # compared by presence only (the URIs differ by design).
            for tag, element in reference.items():
                if tag not in item:
                    # Data Set Trailing Padding (CT_small.dcm has some):
                    # Orthanc offers it as bulk data; it means nothing
                    # (PS3.5 7.2), leaving it out is right.
                    if tag in (PIXEL_DATA, "FFFCFFFC"):
                        continue
                    raise AssertionError((target, sop, "missing", tag, element))
                if "BulkDataURI" in element or "BulkDataURI" in item[tag]:
                    continue
                assert element.get("vr") == item[tag].get("vr"), (target, sop, tag, element, item[tag])
                if "InlineBinary" in element:
                    assert element == item[tag], (target, sop, tag)
                    continue
                theirs, ours = element.get("Value"), item[tag].get("Value")
                if theirs is None or ours is None:
                    assert not theirs and not ours, (target, sop, tag, element, item[tag])
                    continue
                if element.get("vr") == "SQ":
                    assert len(theirs) == len(ours), (target, sop, tag)
                    continue
                assert _normalise(theirs) == _normalise(ours), (target, sop, tag, element, item[tag])
            # /proxy can only give what Orthanc gives (no PixelData for RLE).
            if "PixelData" in original and (target == "bridge" or PIXEL_DATA in reference):
                pixel = item.get(PIXEL_DATA)
                assert pixel and "BulkDataURI" in pixel, (target, sop, pixel)
                uri = pixel["BulkDataURI"]
                assert uri.startswith(dw.root(target) + "/"), (target, "BulkDataURI not under Harmony", uri)
                assert f":{dw.orthanc.http_port}" not in uri, (target, uri)
            text = json.dumps(item)
            assert f"127.0.0.1:{dw.orthanc.http_port}" not in text, (target, "Orthanc's address leaked", sop)


@pytest.mark.parametrize("target", HARMONY)
def test_bulkdata_uri_gives_pixel_data(dw, target):
    """
    The PixelData C{BulkDataURI} of an instance's metadata, fetched as it
    is, gives the pixel data bytes (CT: uncompressed, 32768 bytes).
    """
    sop = dw.sop("ctmr", "ct")
    (item,) = dw.json(target, dw.instance_path("ctmr", "ct") + "/metadata")
    uri = item[PIXEL_DATA]["BulkDataURI"]
    prefix = f"http://127.0.0.1:{dw.gateway.port}"
    assert uri.startswith(prefix + f"/{target}/")
    response = request(dw.gateway.port, "GET", uri[len(prefix):], headers=[("Accept", MULTIPART_OCTETS)])
    assert response.status == 200, response
    parts = multipart_parts(response.header("Content-Type"), response.body)
    assert len(parts) == 1, parts
    headers, payload = parts[0]
    assert headers["content-type"].startswith("application/octet-stream"), headers
    assert payload == dw.original(sop).PixelData
    assert len(payload) == 32768


# -- WADO-RS: frames, rendered, thumbnail -------------------------------------------------


def _frames(dw, target, path, accept=MULTIPART_OCTETS):
    response = dw.get(target, path, accept)
    assert response.status == 200, (target, path, response)
    ctype = response.header("Content-Type")
    assert ctype.startswith("multipart/related"), (target, ctype)
    parts = multipart_parts(ctype, response.body)
    for headers, _ in parts:
        assert headers.get("content-type", "").startswith("application/octet-stream"), (target, headers)
    return [payload for _, payload in parts]


def test_frames_ct(dw):
    path = dw.instance_path("ctmr", "ct") + "/frames/1"
    original = dw.original(dw.sop("ctmr", "ct")).PixelData
    got = {target: _frames(dw, target, path) for target in TARGETS}
    for target, frames in got.items():
        assert [len(f) for f in frames] == [32768], target
        assert frames[0] == original, target


def test_frames_rtdose(dw):
    """
    rtdose.dcm: 15 frames of 10x10 32-bit values (400 bytes each); frames
    1, 2 and 15 in that order.
    """
    path = dw.instance_path("dose", "dose") + "/frames/1,2,15"
    original = dw.original(dw.sop("dose", "dose")).PixelData
    expected = [original[(n - 1) * 400 : n * 400] for n in (1, 2, 15)]
    assert len(set(expected)) == 3
    for target in TARGETS:
        assert _frames(dw, target, path) == expected, target


def test_frames_rle_uncompressed(dw):
    """
    An RLE frame asked for as application/octet-stream comes back decoded:
    100x100 RGB, 30000 bytes, the same as Orthanc's and pydicom's.
    """
    original = dw.original(dw.sop("sc", "rle"))
    decoded = original.pixel_array  # (frames, rows, columns, samples), interleaved
    for n in (1, 2):
        path = dw.instance_path("sc", "rle") + f"/frames/{n}"
        got = {target: _frames(dw, target, path) for target in TARGETS}
        for target, frames in got.items():
            assert [len(f) for f in frames] == [30000], (target, n)
        assert got["bridge"] == got["orthanc"], n
        assert got["proxy"] == got["orthanc"], n
        assert got["bridge"][0] == decoded[n - 1].tobytes(), n


def test_frames_default_accept_bridge(dw):
    """
    The bridge answers a frames request with no Accept, and with
    C{multipart/related; type="*/*"} (what dicomweb-client sends by
    default; Orthanc 1.7 answers that with 400).
    """
    path = dw.instance_path("ctmr", "ct") + "/frames/1"
    original = dw.original(dw.sop("ctmr", "ct")).PixelData
    for accept in (None, 'multipart/related; type="*/*"', "*/*"):
        response = dw.get("bridge", path, accept)
        assert response.status == 200, (accept, response)
        parts = multipart_parts(response.header("Content-Type"), response.body)
        assert [p for _, p in parts] == [original], accept


def _image(response, label, fmt):
    assert response.status == 200, (label, response)
    ctype = response.header("Content-Type")
    assert ctype.split(";")[0].strip() == f"image/{fmt}", (label, ctype)
    image = Image.open(io.BytesIO(response.body))
    image.load()
    assert image.format == {"jpeg": "JPEG", "png": "PNG"}[fmt], (label, image.format)
    return image


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_rendered(dw, fmt):
    for key, series, size in (("ctmr", "ct", (128, 128)), ("sc", "rle", (100, 100))):
        for target in TARGETS:
            response = dw.get(target, dw.instance_path(key, series) + "/rendered", f"image/{fmt}")
            image = _image(response, (target, key), fmt)
            assert image.size == size, (target, key, image.size)
            # not a blank image
            assert image.convert("L").getextrema()[0] != image.convert("L").getextrema()[1], (target, key)


def test_rendered_frame(dw):
    """
    Frame 2 of the RLE RGB instance as PNG: 8-bit RGB needs no windowing,
    so the image is the decoded frame, pixel for pixel.  (Orthanc 1.7
    cannot render the 32-bit rtdose frames: 400, so they are not used.)
    """
    path = dw.instance_path("sc", "rle") + "/frames/2/rendered"
    frames = dw.original(dw.sop("sc", "rle")).pixel_array
    for target in TARGETS:
        image = _image(dw.get(target, path, "image/png"), target, "png")
        assert image.size == (100, 100), target
        pixels = numpy.asarray(image.convert("RGB"))
        assert numpy.array_equal(pixels, frames[1]), target
        assert not numpy.array_equal(pixels, frames[0]), target


def test_thumbnail_bridge(dw):
    """
    Thumbnails (Orthanc 1.7's plugin has none: 404, so /proxy and Orthanc
    are not compared) of an instance, a series and a study.
    """
    paths = [
        dw.instance_path("ctmr", "ct") + "/thumbnail",
        f"studies/{dw.study('ctmr')}/series/{dw.series('ctmr', 'mr')}/thumbnail",
        f"studies/{dw.study('sc')}/thumbnail",
    ]
    for path in paths:
        image = _image(dw.get("bridge", path, "image/jpeg"), path, "jpeg")
        assert 0 < image.size[0] <= 128 and 0 < image.size[1] <= 128, (path, image.size)


# -- STOW-RS -----------------------------------------------------------------------


def _new_instances(directory, patient, count_ct=2):
    study, series = generate_uid(), generate_uid()
    paths = {}
    for i in range(count_ct):
        sop, path = dicomweb_instance(directory, "CT_small.dcm", f"stow-ct-{uuid.uuid4().hex[:6]}",
                                      PatientID=patient, StudyInstanceUID=study, SeriesInstanceUID=series,
                                      InstanceNumber=i + 1)
        paths[sop] = path
    sop, path = dicomweb_instance(directory, "MR_small.dcm", f"stow-mr-{uuid.uuid4().hex[:6]}", PatientID=patient,
                                  StudyInstanceUID=study, SeriesInstanceUID=generate_uid())
    paths[sop] = path
    return study, paths


def _stow(dw, target, parts, path="studies"):
    body, boundary = multipart_body(parts)
    return dw.request(target, "POST", path, body=body, headers=[
        ("Content-Type", f'{MULTIPART_DICOM}; boundary="{boundary}"'),
        ("Accept", "application/dicom+json"),
    ])


def _sequence(answer, tag):
    return answer.get(tag, {}).get("Value") or []


def test_stow_bridge(dw, tmp_path):
    patient = f"HDWSTOW{uuid.uuid4().hex[:6].upper()}"
    study, paths = _new_instances(tmp_path, patient)
    response = _stow(dw, "bridge", [("application/dicom", p.read_bytes()) for p in paths.values()])
    assert response.status == 200, response
    answer = response.json()
    referenced = _sequence(answer, "00081199")
    assert sorted(_value(item, "00081155") for item in referenced) == sorted(paths)
    assert not _sequence(answer, "00081198")
    for item in referenced:
        assert _value(item, RETRIEVE_URL).startswith(dw.root("bridge") + "/studies/" + study), item
    found = dw.json("orthanc", f"studies/{study}/instances")
    assert sorted(_uids(found, "instances")) == sorted(paths)
    # and the same data came through
    for sop, ds in _instances(dw.get("orthanc", f"studies/{study}", MULTIPART_DICOM), "orthanc").items():
        _assert_same_dataset(ds, pydicom.dcmread(paths[sop]), sop)


def test_stow_proxy(dw, tmp_path):
    patient = f"HDWSTOWP{uuid.uuid4().hex[:6].upper()}"
    study, paths = _new_instances(tmp_path, patient, count_ct=1)
    response = _stow(dw, "proxy", [("application/dicom", p.read_bytes()) for p in paths.values()])
    assert response.status == 200, response
    answer = response.json()
    assert sorted(_value(i, "00081155") for i in _sequence(answer, "00081199")) == sorted(paths)
    assert f":{dw.orthanc.http_port}" not in response.body.decode(), "Orthanc's address leaked"
    assert sorted(_uids(dw.json("orthanc", f"studies/{study}/instances"), "instances")) == sorted(paths)


def test_stow_with_one_bad_part(dw, tmp_path):
    """
    One part is not DICOM: 202, the good instances stored (referenced),
    one C{FailedSOPSequence} item.
    """
    patient = f"HDWSTOWB{uuid.uuid4().hex[:6].upper()}"
    study, paths = _new_instances(tmp_path, patient, count_ct=1)
    parts = [("application/dicom", p.read_bytes()) for p in paths.values()]
    parts.insert(1, ("application/dicom", b"this is not a DICOM file" * 10))
    response = _stow(dw, "bridge", parts)
    assert response.status == 202, response
    answer = response.json()
    assert sorted(_value(i, "00081155") for i in _sequence(answer, "00081199")) == sorted(paths)
    failed = _sequence(answer, "00081198")
    assert len(failed) == 1, answer
    assert _value(failed[0], "00081197") is not None, failed  # FailureReason
    assert sorted(_uids(dw.json("orthanc", f"studies/{study}/instances"), "instances")) == sorted(paths)


def test_stow_all_bad(dw):
    parts = [("application/dicom", b"not DICOM at all"), ("application/dicom", b"\0" * 200)]
    response = _stow(dw, "bridge", parts)
    assert response.status == 409, response
    answer = response.json()
    assert len(_sequence(answer, "00081198")) == 2, answer
    assert not _sequence(answer, "00081199")


def test_stow_into_another_study_is_refused(dw, tmp_path):
    """
    STOW-RS to C{studies/{uid}} of an instance of another study: that
    instance fails (409: the only one), and Orthanc does not get it.
    """
    patient = f"HDWSTOWW{uuid.uuid4().hex[:6].upper()}"
    study, paths = _new_instances(tmp_path, patient, count_ct=1)
    sop, path = next(iter(paths.items()))
    response = _stow(dw, "bridge", [("application/dicom", path.read_bytes())], path=f"studies/{generate_uid()}")
    assert response.status == 409, response
    assert len(_sequence(response.json(), "00081198")) == 1
    assert dw.json("orthanc", f"instances?SOPInstanceUID={sop}") == []


# -- errors and CORS -----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_unknown_study_is_404(dw, target):
    unknown = generate_uid()
    for path, accept in ((f"studies/{unknown}", MULTIPART_DICOM), (f"studies/{unknown}/metadata", None)):
        response = dw.get(target, path, accept)
        assert response.status == 404, (target, path, response)


def test_unproducible_transfer_syntax_is_406(dw):
    """
    JPEG baseline (1.2.840.10008.1.2.4.50) for an uncompressed 16-bit CT:
    Harmony does not encode JPEG; 406.
    """
    accept = MULTIPART_DICOM + "; transfer-syntax=1.2.840.10008.1.2.4.50"
    response = dw.get("bridge", dw.instance_path("ctmr", "ct"), accept)
    assert response.status == 406, response
    assert response.json()["message"], response


def test_unknown_media_type_is_406(dw):
    response = dw.get("bridge", f"studies?PatientID={dw.data.patient}", "image/gif")
    assert response.status == 406, response


@pytest.mark.parametrize("query", ["StudyDate=notadate", "NoSuchAttribute=1", "limit=many", "0010002=x"])
def test_bad_query_is_400(dw, query):
    """
    (Orthanc's plugin answers C{StudyDate=notadate} with C{200 []} and
    ignores unknown attributes: /bridge only.)
    """
    response = dw.get("bridge", f"studies?PatientID={dw.data.patient}&{query}", "application/dicom+json")
    assert response.status == 400, (query, response)
    assert response.header("Content-Type").startswith("application/json"), response
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"], body


def test_bad_uid_in_path_is_400(dw):
    response = dw.get("bridge", "studies/1.2.abc/series", "application/dicom+json")
    assert response.status == 400, response
    assert response.json()["message"]


@pytest.mark.parametrize("path", ["studies?PatientID=X", "studies/1.2.3", "studies/1.2.3/metadata"])
def test_pacs_down_is_502(dw, path):
    response = dw.get("down", path)
    assert response.status == 502, response
    assert response.json()["message"]


@pytest.mark.parametrize("target", HARMONY)
def test_cors_preflight(dw, target):
    response = dw.request(target, "OPTIONS", "studies", headers=[
        ("Origin", dw.gateway.origin),
        ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "accept"),
    ])
    assert response.status == 204, response
    assert response.header("Access-Control-Allow-Origin") in (dw.gateway.origin, "*"), response
    methods = (response.header("Access-Control-Allow-Methods") or "").upper()
    assert "GET" in methods, response
    assert not response.body


@pytest.mark.parametrize("target", HARMONY)
def test_cors_headers_on_responses(dw, target):
    origin = [("Origin", dw.gateway.origin)]
    ok = dw.get(target, f"studies?PatientID={dw.data.patient}", "application/dicom+json", origin)
    assert ok.status == 200
    assert ok.header("Access-Control-Allow-Origin") in (dw.gateway.origin, "*"), ok
    other = dw.get(target, f"studies?PatientID={dw.data.patient}", "application/dicom+json",
                   [("Origin", "http://evil.example")])
    assert other.header("Access-Control-Allow-Origin") is None, other
    plain = dw.get(target, f"studies?PatientID={dw.data.patient}", "application/dicom+json")
    assert plain.header("Access-Control-Allow-Origin") is None, plain


#: Error answers, each with the status expected.
CORS_ERRORS = {
    "unknown-study-404": ("bridge", lambda dw: f"studies/{generate_uid()}", MULTIPART_DICOM, 404),
    "unknown-metadata-404": ("bridge", lambda dw: f"studies/{generate_uid()}/metadata", None, 404),
    "transfer-syntax-406": ("bridge", lambda dw: dw.instance_path("ctmr", "ct"),
                            MULTIPART_DICOM + "; transfer-syntax=1.2.840.10008.1.2.4.50", 406),
    "bad-query-400": ("bridge", lambda dw: "studies?StudyDate=notadate", "application/dicom+json", 400),
    "bad-uid-400": ("bridge", lambda dw: "studies/1.2.abc", MULTIPART_DICOM, 400),
    "pacs-down-502": ("down", lambda dw: f"studies/{generate_uid()}", MULTIPART_DICOM, 502),
    "proxy-404": ("proxy", lambda dw: f"studies/{generate_uid()}", MULTIPART_DICOM, 404),
}


@pytest.mark.parametrize("name", sorted(CORS_ERRORS))
def test_cors_headers_on_errors(dw, name):
    """
    Error answers carry the CORS headers too (else a browser client cannot
    even read the status).
    """
    target, path, accept, status = CORS_ERRORS[name]
    response = dw.get(target, path(dw), accept, [("Origin", dw.gateway.origin)])
    assert response.status == status, response
    assert response.header("Access-Control-Allow-Origin") in (dw.gateway.origin, "*"), response


def test_cors_preflight_from_another_origin(dw):
    response = dw.request("bridge", "OPTIONS", "studies", headers=[
        ("Origin", "http://evil.example"), ("Access-Control-Request-Method", "GET")])
    assert response.header("Access-Control-Allow-Origin") is None, response


@pytest.mark.parametrize("what", ["search", "metadata"])
def test_proxy_rewrites_compressed_answers(dw, what):
    """
    A client that accepts gzip (requests, hence dicomweb-client, always
    does): Orthanc compresses its DICOM JSON; the URLs in it must still be
    Harmony's once decoded (the proxy rewrites after decoding, or asks the
    upstream for an identity encoding).
    """
    import gzip
    import zlib

    path = {"search": f"studies?PatientID={dw.data.patient}",
            "metadata": dw.instance_path("ctmr", "ct") + "/metadata"}[what]
    response = dw.get("proxy", path, "application/dicom+json", [("Accept-Encoding", "gzip, deflate")])
    assert response.status == 200, response
    encoding = (response.header("Content-Encoding") or "identity").lower()
    body = {"gzip": gzip.decompress, "deflate": zlib.decompress, "identity": bytes}[encoding](response.body)
    text = body.decode("utf-8")
    assert f"127.0.0.1:{dw.orthanc.http_port}" not in text, "Orthanc's URLs were not rewritten"
    assert "/dicom-web/" not in text, "Orthanc's URLs were not rewritten"
    assert f'"{dw.root("proxy")}/studies/' in text.replace('\\/', '/')


def test_qido_xml_bridge(dw):
    """
    QIDO-RS as C{multipart/related; type="application/dicom+xml"} (PS3.19
    Native DICOM Model, one part per match): the same matches and values as
    the DICOM JSON answer.  (Orthanc 1.7 answers JSON whatever is asked.)
    """
    import xml.etree.ElementTree as ElementTree

    path = f"studies?PatientID={dw.data.patient}"
    response = dw.get("bridge", path, 'multipart/related; type="application/dicom+xml"')
    assert response.status == 200, response
    ctype = response.header("Content-Type")
    assert ctype.startswith("multipart/related") and "application/dicom+xml" in ctype, ctype
    by_uid = {}
    for headers, payload in multipart_parts(ctype, response.body):
        assert headers["content-type"].startswith("application/dicom+xml"), headers
        root = ElementTree.fromstring(payload)
        assert root.tag.endswith("NativeDicomModel"), root.tag
        attributes = {a.get("tag").upper(): a for a in root if a.tag.endswith("DicomAttribute")}
        uid = attributes["0020000D"].find("{*}Value").text
        by_uid[uid] = attributes
    assert sorted(by_uid) == sorted(s.uid for s in dw.data.studies.values())
    for match in dw.json("bridge", path):
        attributes = by_uid[_value(match, "0020000D")]
        assert attributes["00100020"].find("{*}Value").text == dw.data.patient
        assert attributes["00100020"].get("vr") == "LO"
        assert attributes["00080020"].find("{*}Value").text == _value(match, "00080020")
        name = attributes["00100010"].find("{*}PersonName/{*}Alphabetic")
        assert name.find("{*}FamilyName").text == dw.data.patient_name.split("^")[0]
        assert name.find("{*}GivenName").text == "ALPHA"


def test_frame_numbers_out_of_range(dw):
    path = dw.instance_path("dose", "dose")
    assert dw.get("bridge", path + "/frames/16", MULTIPART_OCTETS).status == 404
    assert dw.get("bridge", path + "/frames/0", MULTIPART_OCTETS).status == 400
    assert dw.get("bridge", path + "/frames/1,x", MULTIPART_OCTETS).status == 400


def test_head_search(dw):
    response = dw.request("bridge", "HEAD", f"studies?PatientID={dw.data.patient}",
                          headers=[("Accept", "application/dicom+json")])
    assert response.status == 200, response
    assert response.header("Content-Type").startswith("application/dicom+json")
    assert response.body == b""


def test_metadata_urls_follow_each_request(dw):
    """
    The bridge keeps a study's metadata for a while (metadata_cache_secs)
    and answers later requests from it: the URLs in each answer must still
    be built from that request's own base (its Host), not from the one
    that filled the cache.
    """
    study = dw.study("dose")
    paths = [f"studies/{study}/metadata", f"studies/{study}/series/{dw.series('dose', 'dose')}/metadata",
             dw.instance_path("dose", "dose") + "/metadata"]
    for host in ("gw-a.example:8080", f"127.0.0.1:{dw.gateway.port}", "gw-b.example", "gw-a.example:8080"):
        for path in paths:
            response = dw.get("bridge", path, "application/dicom+json", [("Host", host)])
            assert response.status == 200, response
            (item,) = response.json()
            uri = item[PIXEL_DATA]["BulkDataURI"]
            assert uri.startswith(f"http://{host}/bridge/studies/{study}/"), (host, path, uri)
