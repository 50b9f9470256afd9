"""
dicomweb-client (a real third-party DICOMweb client) against Harmony's
C{/bridge} (DICOMweb <-> DIMSE) and C{/proxy} (DICOMweb proxy in front of
Orthanc), on the session's data (conftest's C{dicomweb_data},
C{dicomweb_gateway}); Orthanc's own C{/dicom-web} with the same client is
the reference where the answers are compared.

dicomweb-client sends C{Host: 127.0.0.1} with no port (it rebuilds Host
from the host name of its URL).  Harmony builds its URLs (C{RetrieveURL},
C{BulkDataURI}) from C{Host}, so the URLs a dicomweb-client sees are
C{http://127.0.0.1/bridge/...}: right path, port 80 (as RFC 9110 says a
Host without a port means).  L{test_urls_follow_the_host_the_client_sent}
pins what they may be; a deployment where clients like this one matter
sets C{[proxy] public_base_url}.
"""

import uuid

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from peers import dicomweb_instance
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError

TARGETS = ("bridge", "proxy")


@pytest.fixture(scope="module")
def clients(dicomweb_gateway, orthanc):
    out = {target: DICOMwebClient(url=f"{dicomweb_gateway.url}/{target}") for target in TARGETS}
    out["orthanc"] = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    return out


@pytest.fixture(scope="module")
def data(dicomweb_data):
    return dicomweb_data


def _value(item, tag):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _study(data, key):
    return data.studies[key].uid


def _series(data, key, series):
    return data.studies[key].series[series]


def _same(got, original, label):
    """
    Every element of C{original} (trailing padding aside) has the same
    value in C{got}; pixel data compared decoded when syntaxes differ.
    """
    import numpy

    same_syntax = got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    for element in original:
        if element.tag == 0xFFFCFFFC:
            continue
        assert element.tag in got, (label, element)
        if element.tag == 0x7FE00010 and not same_syntax:
            assert numpy.array_equal(got.pixel_array, original.pixel_array), label
            continue
        assert got[element.tag].value == element.value, (label, element, got[element.tag])


def _check_url(url, target, gateway, orthanc):
    """
    A URL Harmony handed to dicomweb-client: under Harmony's prefix, with
    the host the client sent (C{127.0.0.1}, no port) or Harmony's own
    address, never Orthanc's.
    """
    assert url.startswith((f"http://127.0.0.1/{target}/", f"http://127.0.0.1:{gateway.port}/{target}/")), url
    assert f":{orthanc.http_port}" not in url, url
    assert "/dicom-web/" not in url, url


# -- QIDO-RS ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_search_for_studies(clients, data, target, dicomweb_gateway, orthanc):
    client = clients[target]
    everything = {s.uid for s in data.studies.values()}
    studies = client.search_for_studies(search_filters={"PatientID": data.patient})
    assert {_value(s, "0020000D") for s in studies} == everything
    for study in studies:
        _check_url(_value(study, "00081190"), target, dicomweb_gateway, orthanc)
    by_name = client.search_for_studies(search_filters={"PatientName": data.patient_name[:7] + "*"}, fields=["all"])
    assert {_value(s, "0020000D") for s in by_name} == everything
    dated = client.search_for_studies(search_filters={"PatientID": data.patient, "StudyDate": "20230201-20230401"})
    assert {_value(s, "0020000D") for s in dated} == {_study(data, "dose"), _study(data, "sc")}
    pages = [client.search_for_studies(search_filters={"PatientID": data.patient}, limit=2, offset=o) for o in (0, 2)]
    assert [len(p) for p in pages] == [2, 1]
    assert {_value(s, "0020000D") for p in pages for s in p} == everything
    assert client.search_for_studies(search_filters={"PatientID": data.patient + "NOSUCH"}) == []
    reference = {_value(s, "0020000D"): s for s in clients["orthanc"].search_for_studies(
        search_filters={"PatientID": data.patient})}
    for study in studies:
        theirs = reference[_value(study, "0020000D")]
        for tag in ("00100010", "00100020", "00080020", "00080061", "00201206", "00201208", "00080050"):
            assert study.get(tag, {}).get("Value") == theirs.get(tag, {}).get("Value"), (target, tag)


@pytest.mark.parametrize("target", TARGETS)
def test_search_for_series(clients, data, target):
    client = clients[target]
    series = client.search_for_series(_study(data, "ctmr"))
    assert {_value(s, "0020000E") for s in series} == set(data.studies["ctmr"].series.values())
    assert {_value(s, "00080060") for s in series} == {"CT", "MR"}
    mr = client.search_for_series(search_filters={"Modality": "MR", "PatientID": data.patient})
    assert [_value(s, "0020000E") for s in mr] == [_series(data, "ctmr", "mr")]


@pytest.mark.parametrize("target", TARGETS)
def test_search_for_instances(clients, data, target):
    client = clients[target]
    instances = client.search_for_instances(_study(data, "ctmr"), _series(data, "ctmr", "ct"))
    assert sorted(_value(i, "00080018") for i in instances) == sorted(data.sops["ctmr", "ct"])
    whole = client.search_for_instances(_study(data, "sc"))
    assert sorted(_value(i, "00080018") for i in whole) == sorted(data.sops["sc", "rle"] + data.sops["sc", "rgb"])
    one = client.search_for_instances(search_filters={"SOPInstanceUID": data.sops["dose", "dose"][0]})
    assert [_value(i, "00080018") for i in one] == data.sops["dose", "dose"]
    assert [_value(i, "00080016") for i in one] == ["1.2.840.10008.5.1.4.1.1.481.2"]  # RT Dose


# -- WADO-RS ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_study_series_instance(clients, data, target):
    client = clients[target]
    study = client.retrieve_study(_study(data, "ctmr"))
    expected = data.sops["ctmr", "ct"] + data.sops["ctmr", "mr"]
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(expected)
    for ds in study:
        _same(ds, pydicom.dcmread(data.files[ds.SOPInstanceUID]), (target, "study"))
    series = client.retrieve_series(_study(data, "sc"), _series(data, "sc", "rle"))
    assert [ds.SOPInstanceUID for ds in series] == data.sops["sc", "rle"]
    _same(series[0], pydicom.dcmread(data.files[series[0].SOPInstanceUID]), (target, "series"))
    sop = data.sops["dose", "dose"][0]
    instance = client.retrieve_instance(_study(data, "dose"), _series(data, "dose", "dose"), sop)
    assert instance.SOPInstanceUID == sop
    _same(instance, pydicom.dcmread(data.files[sop]), (target, "instance"))
    assert instance.pixel_array.shape == (15, 10, 10)


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_unknown_is_404(clients, data, target):
    with pytest.raises(HTTPError) as raised:
        clients[target].retrieve_instance(_study(data, "ctmr"), _series(data, "ctmr", "ct"), generate_uid())
    assert raised.value.response.status_code == 404


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_metadata(clients, data, target, dicomweb_gateway, orthanc):
    client = clients[target]
    study = client.retrieve_study_metadata(_study(data, "ctmr"))
    assert sorted(_value(m, "00080018") for m in study) == sorted(data.sops["ctmr", "ct"] + data.sops["ctmr", "mr"])
    series = client.retrieve_series_metadata(_study(data, "ctmr"), _series(data, "ctmr", "ct"))
    assert sorted(_value(m, "00080018") for m in series) == sorted(data.sops["ctmr", "ct"])
    sop = data.sops["ctmr", "mr"][0]
    instance = client.retrieve_instance_metadata(_study(data, "ctmr"), _series(data, "ctmr", "mr"), sop)
    assert _value(instance, "00080018") == sop
    assert _value(instance, "00100020") == data.patient
    assert _value(instance, "00280010") == 64
    for item in study + series + [instance]:
        _check_url(item["7FE00010"]["BulkDataURI"], target, dicomweb_gateway, orthanc)
    # The same as through Orthanc's own DICOMweb, attribute for attribute
    # (bulk data URIs aside).
    reference = clients["orthanc"].retrieve_instance_metadata(_study(data, "ctmr"), _series(data, "ctmr", "mr"), sop)
    for tag, element in reference.items():
        if tag == "FFFCFFFC":  # Data Set Trailing Padding: meaningless (PS3.5 7.2), Orthanc keeps it
            continue
        assert tag in instance, (target, tag)
        if "BulkDataURI" not in element:
            assert instance[tag].get("Value") == element.get("Value"), (target, tag, instance[tag], element)


def _bulkdata_here(client, uri, gateway, target):
    """
    A C{BulkDataURI} made usable for this client: dicomweb-client sent
    C{Host: 127.0.0.1} with no port, so the URI names port 80; the same
    path is asked on Harmony's port.
    """
    assert f"/{target}/studies/" in uri, f"BulkDataURI not under Harmony's /{target}: {uri}"
    path = uri.split(f"/{target}/", 1)[1]
    return f"{gateway.url}/{target}/{path}"


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_bulkdata(clients, data, target, dicomweb_gateway):
    client = clients[target]
    sop = data.sops["ctmr", "ct"][0]
    metadata = client.retrieve_instance_metadata(_study(data, "ctmr"), _series(data, "ctmr", "ct"), sop)
    uri = _bulkdata_here(client, metadata["7FE00010"]["BulkDataURI"], dicomweb_gateway, target)
    (pixels,) = client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))
    assert pixels == pydicom.dcmread(data.files[sop]).PixelData


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_instance_frames_octet_stream(clients, data, target):
    client = clients[target]
    octets = ("application/octet-stream",)
    ct = data.sops["ctmr", "ct"][0]
    (frame,) = client.retrieve_instance_frames(_study(data, "ctmr"), _series(data, "ctmr", "ct"), ct, [1],
                                               media_types=octets)
    assert frame == pydicom.dcmread(data.files[ct]).PixelData
    dose = data.sops["dose", "dose"][0]
    frames = client.retrieve_instance_frames(_study(data, "dose"), _series(data, "dose", "dose"), dose, [1, 2, 15],
                                             media_types=octets)
    original = pydicom.dcmread(data.files[dose]).PixelData
    assert frames == [original[(n - 1) * 400 : n * 400] for n in (1, 2, 15)]
    rle = data.sops["sc", "rle"][0]
    frames = client.retrieve_instance_frames(_study(data, "sc"), _series(data, "sc", "rle"), rle, [2],
                                             media_types=octets)
    assert frames == [pydicom.dcmread(data.files[rle]).pixel_array[1].tobytes()]


def test_retrieve_instance_frames_default_media_types(clients, data):
    """
    dicomweb-client's default Accept for frames is
    C{multipart/related; type="*/*"}: Orthanc 1.7 answers 400 (hence only
    /bridge here: /proxy passes Orthanc's answer through); the bridge
    answers with the frames.
    """
    ct = data.sops["ctmr", "ct"][0]
    frames = clients["bridge"].retrieve_instance_frames(_study(data, "ctmr"), _series(data, "ctmr", "ct"), ct, [1])
    assert frames == [pydicom.dcmread(data.files[ct]).PixelData]
    rle = data.sops["sc", "rle"][0]
    frames = clients["bridge"].retrieve_instance_frames(_study(data, "sc"), _series(data, "sc", "rle"), rle, [1, 2])
    assert len(frames) == 2
    # Either as stored (RLE: the client then gets what it asked for, */*),
    # or decoded; decoded frames must be the pixels.
    decoded = pydicom.dcmread(data.files[rle]).pixel_array
    for n, frame in enumerate(frames):
        assert frame == decoded[n].tobytes() or (0 < len(frame) < 30000), (n, len(frame))


@pytest.mark.parametrize("target", TARGETS)
def test_retrieve_rendered(clients, data, target):
    import io

    from PIL import Image

    ct = data.sops["ctmr", "ct"][0]
    jpeg = clients[target].retrieve_instance_rendered(_study(data, "ctmr"), _series(data, "ctmr", "ct"), ct,
                                                      media_types=("image/jpeg",))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (128, 128)


# -- STOW-RS --------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_store_instances(clients, target, tmp_path):
    patient = f"HDWC{uuid.uuid4().hex[:8].upper()}"
    study, series = generate_uid(), generate_uid()
    datasets = []
    for i, source in enumerate(("CT_small.dcm", "CT_small.dcm", "MR_small.dcm")):
        _, path = dicomweb_instance(tmp_path, source, f"c{i}", PatientID=patient, StudyInstanceUID=study,
                                    SeriesInstanceUID=series if i < 2 else generate_uid(), InstanceNumber=i + 1)
        datasets.append(pydicom.dcmread(path))
    answer = clients[target].store_instances(datasets)
    referenced = answer.get("ReferencedSOPSequence", [])
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced) == sorted(d.SOPInstanceUID for d in datasets)
    assert not answer.get("FailedSOPSequence")
    found = clients["orthanc"].search_for_instances(study)
    assert sorted(_value(i, "00080018") for i in found) == sorted(d.SOPInstanceUID for d in datasets)
    back = clients["orthanc"].retrieve_study(study)
    originals = {d.SOPInstanceUID: d for d in datasets}
    for ds in back:
        _same(ds, originals[ds.SOPInstanceUID], (target, "stored"))


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_urls_follow_the_host_the_client_sent(clients, data, target, dicomweb_gateway, orthanc):
    """
    What dicomweb-client's port-less C{Host} does to the URLs: each
    RetrieveURL and BulkDataURI keeps Harmony's prefix and the UIDs it
    names; the host is the one sent (see the module docstring).
    """
    client = clients[target]
    for study in client.search_for_studies(search_filters={"PatientID": data.patient}):
        url = _value(study, "00081190")
        _check_url(url, target, dicomweb_gateway, orthanc)
        assert url.endswith(f"/{target}/studies/{_value(study, '0020000D')}"), url
    for instance in client.search_for_instances(_study(data, "ctmr"), _series(data, "ctmr", "ct")):
        url = _value(instance, "00081190")
        _check_url(url, target, dicomweb_gateway, orthanc)
        assert url.endswith(f"/series/{_series(data, 'ctmr', 'ct')}/instances/{_value(instance, '00080018')}"), url
