"""
The dicomweb_bridge middleware: DICOMweb requests become DIMSE operations
and DIMSE results become DICOMweb answers (no sockets: the backend's
results are built here).
"""

import email
import json
import os
import shutil

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from twisted.internet import defer, task

from harmony.config.schema import Where
from harmony.envelope import DicomInstance, DicomResult, Headers, RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, NotAcceptable, NotFound, UnsupportedMediaType, UpstreamUnavailable
from harmony.middleware import dicomweb_bridge
from harmony.registry import BuildContext
from harmony.storage.filesystem import FilesystemStorage
from harmony.streams import Stream, collect

ROOT = "http://gw.example:8080/dicomweb"
CT = get_testdata_file("CT_small.dcm", download=False)
MR = get_testdata_file("MR_small.dcm", download=False)
RTDOSE = get_testdata_file("rtdose.dcm", download=False)


class SyncStorage(FilesystemStorage):
    """
    Filesystem storage whose tree removal runs inline (no thread pool in
    unit tests).
    """

    def delete_tree(self, relpath):
        shutil.rmtree(self.root + "/" + relpath, ignore_errors=True)
        return defer.succeed(None)

    def list(self, prefix=""):
        found = []
        for top, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d != ".tmp"]
            found += [os.path.relpath(os.path.join(top, f), self.root) for f in files]
        return defer.succeed(sorted(found))


@pytest.fixture
def bridge(tmp_path):
    clock = task.Clock()
    options = dicomweb_bridge.OPTIONS.validate({}, Where("t.toml"))
    mw = dicomweb_bridge.DicomwebBridge("dwb", options, BuildContext(reactor=clock))
    mw._spool = SyncStorage(str(tmp_path / "spool"), reactor=clock)
    mw._spool.startService()
    mw.clock = clock
    yield mw
    mw._spool.stopService()


def request(path, method="GET", headers=(), query=None, body=b"", base_url="http://gw.example:8080"):
    from harmony.endpoints.dicomweb import classify

    details = RequestDetails(method=method, path=path, headers=Headers(headers), query=query or {},
                             prefix="/dicomweb", base_url=base_url)
    env = RequestEnvelope(details=details, body=body)
    env.metadata.update(classify(method, path).metadata())
    return env


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def finished(status=0x0000, comment=None):
    return defer.succeed((status, comment))


def body_of(response):
    return result_of(collect(response.body)) if isinstance(response.body, Stream) else response.body


def parts_of(response):
    data = body_of(response)
    message = email.message_from_bytes(
        b"Content-Type: " + response.headers.get("content-type").encode("latin-1") + b"\r\n\r\n" + data
    )
    assert message.is_multipart()
    return [(p.get_content_type(), p.get("Content-Type"), p.get_payload(decode=True)) for p in message.get_payload()]


# -- QIDO-RS -----------------------------------------------------------------------


def match(study, patient="PID1"):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    ds.PatientID = patient
    ds.StudyDate = "20200101"
    return ds


def test_search_becomes_a_find_and_matches_become_dicom_json(bridge):
    env = request("studies", query={"PatientID": ["PID1"], "StudyDate": ["20200101-20201231"]})
    assert bridge.request(env) is None
    dicom = env.dicom
    assert (dicom.operation, dicom.level, dicom.query_model) == ("find", "STUDY", "study")
    assert dicom.identifier.PatientID == "PID1"
    assert dicom.identifier.StudyDate == "20200101-20201231"
    assert "ModalitiesInStudy" in dicom.identifier  # a required return key
    matches = Stream.from_iterable([match("1.2.1"), match("1.2.2")])
    response = result_of(bridge.response(env, ResponseEnvelope(dicom=DicomResult(status=None, matches=matches,
                                                                                   done=finished()))))
    assert response.status == 200
    assert response.headers.get("content-type") == "application/dicom+json"
    value = json.loads(body_of(response))
    assert [v["0020000D"]["Value"][0] for v in value] == ["1.2.1", "1.2.2"]
    assert value[0]["00081190"] == {"vr": "UR", "Value": [f"{ROOT}/studies/1.2.1"]}
    assert "00080052" not in value[0]  # QueryRetrieveLevel is not an attribute of the study


def test_required_return_attributes_are_always_present(bridge):
    env = request("studies", query={"PatientID": ["PID1"]})
    bridge.request(env)
    sparse = Dataset()  # a PACS that answers with fewer attributes than asked
    sparse.StudyInstanceUID = "1.2.1"
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([sparse]), done=finished()))))
    [value] = json.loads(body_of(response))
    assert value["00080061"] == {"vr": "CS"}  # ModalitiesInStudy
    assert value["00100010"] == {"vr": "PN"}  # PatientName
    assert value["00201208"] == {"vr": "IS"}  # NumberOfStudyRelatedInstances
    assert value["0020000D"]["Value"] == ["1.2.1"]


def test_search_offset_and_limit_cancel_the_find(bridge):
    env = request("studies", query={"offset": ["1"], "limit": ["2"]})
    bridge.request(env)
    matches = Stream.from_iterable([match(f"1.2.{i}") for i in range(1, 6)])
    cancelled = []
    matches._on_cancel = lambda: cancelled.append(True)
    response = result_of(bridge.response(env, ResponseEnvelope(dicom=DicomResult(status=None, matches=matches,
                                                                                   done=defer.Deferred()))))
    value = json.loads(body_of(response))
    assert [v["0020000D"]["Value"][0] for v in value] == ["1.2.2", "1.2.3"]
    assert cancelled == [True]


def test_small_answers_are_sent_whole_large_ones_stream(bridge, monkeypatch):
    env = request("studies")
    bridge.request(env)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([match("1.2.1"), match("1.2.2")]),
                          done=finished()))))
    assert isinstance(response.body, bytes)  # one write, with a Content-Length
    monkeypatch.setattr(dicomweb_bridge, "SMALL_ANSWER", 300)  # about one match
    env = request("studies")
    bridge.request(env)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([match(f"1.2.{i}") for i in range(5)]),
                          done=finished()))))
    assert isinstance(response.body, Stream)
    value = json.loads(body_of(response))
    assert [v["0020000D"]["Value"][0] for v in value] == [f"1.2.{i}" for i in range(5)]
    assert all(v["00081190"]["Value"] for v in value)


def test_search_failing_after_the_first_match_is_a_502_when_small(bridge):
    env = request("studies")
    bridge.request(env)
    d = bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([match("1.2.1")]), done=finished(0xA700))))
    with pytest.raises(UpstreamUnavailable):
        result_of(d)


def test_search_without_matches_is_an_empty_array(bridge):
    env = request("studies")
    bridge.request(env)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([]), done=finished()))))
    assert (response.status, body_of(response)) == (200, b"[]")


def test_search_failed_by_the_pacs_is_a_502(bridge):
    env = request("studies")
    bridge.request(env)
    d = bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([]), done=finished(0xC000, "no"))))
    with pytest.raises(UpstreamUnavailable):
        result_of(d)


def test_series_search_with_study_in_path(bridge):
    env = request("studies/1.2.3/series", query={"Modality": ["MR"]})
    bridge.request(env)
    ident = env.dicom.identifier
    assert (env.dicom.level, ident.StudyInstanceUID, ident.Modality) == ("SERIES", "1.2.3", "MR")
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "MR"
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([ds]), done=finished()))))
    [value] = json.loads(body_of(response))
    assert value["00081190"]["Value"] == [f"{ROOT}/studies/1.2.3/series/1.2.3.4"]


def test_search_as_xml(bridge):
    env = request("studies", headers=[("Accept", 'multipart/related; type="application/dicom+xml"')])
    bridge.request(env)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, matches=Stream.from_iterable([match("1.2.1")]), done=finished()))))
    [(ctype, _, payload)] = parts_of(response)
    assert ctype == "application/dicom+xml"
    assert b'tag="0020000D"' in payload and b"1.2.1" in payload


def test_bad_query_is_a_400(bridge):
    with pytest.raises(BadRequest):
        bridge.request(request("studies", query={"StudyDate": ["yesterday"]}))
    with pytest.raises(BadRequest):
        bridge.request(request("studies", query={"NoSuchKeyword": ["x"]}))


# -- WADO-RS ---------------------------------------------------------------------


def retrieved(tmp_path, *sources):
    """
    Spooled copies of C{sources} as a retrieve result would give them, and
    the list their disposers append to.
    """
    from harmony.dimse.scu import read_part10_header

    disposed, items = [], []
    for n, source in enumerate(sources):
        path = tmp_path / f"spooled-{n}.dcm"
        shutil.copy(source, path)
        header = read_part10_header(str(path))
        items.append(DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, data=None,
                                   size=path.stat().st_size, path=str(path),
                                   dispose=lambda n=n: disposed.append(n)))
    return items, disposed


def test_retrieve_instance_becomes_an_image_level_get(bridge, tmp_path):
    env = request("studies/1.2/series/1.2.3/instances/1.2.3.4")
    bridge.request(env)
    dicom = env.dicom
    assert (dicom.operation, dicom.level) == ("get", "IMAGE")
    assert (dicom.identifier.StudyInstanceUID, dicom.identifier.SeriesInstanceUID,
            dicom.identifier.SOPInstanceUID) == ("1.2", "1.2.3", "1.2.3.4")
    items, disposed = retrieved(tmp_path, CT)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))
    assert response.status == 200
    assert 'type="application/dicom"' in response.headers.get("content-type")
    [(ctype, header, payload)] = parts_of(response)
    assert ctype == "application/dicom"
    assert "transfer-syntax=1.2.840.10008.1.2.1" in header
    with open(CT, "rb") as f:
        assert payload == f.read()
    assert disposed == [0]


def test_retrieve_study_streams_every_instance(bridge, tmp_path):
    env = request("studies/1.2")
    bridge.request(env)
    assert (env.dicom.level, "SeriesInstanceUID" in env.dicom.identifier) == ("STUDY", False)
    items, disposed = retrieved(tmp_path, CT, MR, RTDOSE)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))
    assert len(parts_of(response)) == 3
    assert disposed == [0, 1, 2]


def test_retrieve_nothing_is_a_404(bridge):
    env = request("studies/1.2")
    bridge.request(env)
    with pytest.raises(NotFound):
        result_of(bridge.response(env, ResponseEnvelope(
            dicom=DicomResult(status=None, instances=Stream.from_iterable([]), done=finished(0xC000)))))


def test_retrieve_converts_between_uncompressed_syntaxes(bridge, tmp_path):
    explicit = "1.2.840.10008.1.2.1"
    env = request("studies/1.2", headers=[("Accept", f'multipart/related; type="application/dicom"; '
                                                     f'transfer-syntax={explicit}')])
    bridge.request(env)
    items, disposed = retrieved(tmp_path, RTDOSE)  # implicit VR little endian
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))
    [(_, header, payload)] = parts_of(response)
    assert f"transfer-syntax={explicit}" in header
    import io

    converted = dcmread(io.BytesIO(payload))
    assert converted.file_meta.TransferSyntaxUID == explicit
    assert converted.PixelData == dcmread(RTDOSE).PixelData
    assert disposed == [0]


def test_retrieve_in_a_compressed_syntax_is_406(bridge, tmp_path):
    env = request("studies/1.2", headers=[("Accept", 'multipart/related; type="application/dicom"; '
                                                     'transfer-syntax=1.2.840.10008.1.2.4.50')])
    bridge.request(env)
    items, _ = retrieved(tmp_path, CT)
    with pytest.raises(NotAcceptable):
        result_of(bridge.response(env, ResponseEnvelope(
            dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))


def test_metadata_has_bulk_data_uris_and_is_cached(bridge, tmp_path):
    ct = dcmread(CT)
    study, series, sop = ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    env = request(f"studies/{study}/metadata")
    bridge.request(env)
    assert env.dicom.level == "STUDY"
    items, disposed = retrieved(tmp_path, CT)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))
    [value] = json.loads(body_of(response))
    assert value["00080018"]["Value"] == [sop]
    assert value["7FE00010"]["BulkDataURI"] == f"{ROOT}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    assert disposed == [0]
    # Again, and at instance level: from the cache, without the PACS.
    again = request(f"studies/{study}/series/{series}/instances/{sop}/metadata")
    cached = bridge.request(again)
    assert again.dicom is None
    assert json.loads(body_of(cached)) == [value]
    # The cached metadata's URLs follow each request's public base.
    elsewhere = request(f"studies/{study}/metadata", base_url="https://other.example")
    [moved] = json.loads(body_of(bridge.request(elsewhere)))
    assert moved["7FE00010"]["BulkDataURI"] == (
        f"https://other.example/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    )
    xml = request(f"studies/{study}/metadata", headers=[("Accept", "multipart/related; type=application/dicom+xml")])
    [(_, _, payload)] = parts_of(bridge.request(xml))
    assert f'uri="{ROOT}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"'.encode() in payload
    # Expired: asked again.
    bridge.clock.advance(301)
    later = request(f"studies/{study}/metadata")
    assert bridge.request(later) is None
    assert later.dicom is not None


def test_frames_of_an_instance(bridge, tmp_path):
    ct = dcmread(CT)
    env = request("studies/1.2/series/1.2.3/instances/1.2.3.4/frames/1",
                  headers=[("Accept", 'multipart/related; type="application/octet-stream"')])
    bridge.request(env)
    assert env.dicom.level == "IMAGE"
    items, disposed = retrieved(tmp_path, CT)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.Deferred()))))
    [(ctype, _, payload)] = parts_of(response)
    assert ctype == "application/octet-stream"
    assert payload == ct.PixelData
    assert disposed == [0]


def test_rendered_instance_as_png(bridge, tmp_path):
    import io

    from PIL import Image

    env = request("studies/1.2/series/1.2.3/instances/1.2.3.4/rendered", headers=[("Accept", "image/png")])
    bridge.request(env)
    items, _ = retrieved(tmp_path, CT)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.Deferred()))))
    assert response.headers.get("content-type") == "image/png"
    image = Image.open(io.BytesIO(body_of(response)))
    assert image.format == "PNG" and image.size == (128, 128)


def test_rendered_series_is_every_instance_rendered(bridge, tmp_path):
    import io

    from PIL import Image

    env = request("studies/1.2/series/1.2.3/rendered")
    bridge.request(env)
    assert env.dicom.level == "SERIES"
    items, disposed = retrieved(tmp_path, CT, MR)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=finished()))))
    assert 'type="image/jpeg"' in response.headers.get("content-type")
    parts = parts_of(response)
    assert [ctype for ctype, _, _ in parts] == ["image/jpeg", "image/jpeg"]
    assert [Image.open(io.BytesIO(p)).size for _, _, p in parts] == [(128, 128), (64, 64)]
    assert disposed == [0, 1]


def test_thumbnail_of_a_study_is_its_first_instance(bridge, tmp_path):
    import io

    from PIL import Image

    env = request("studies/1.2/thumbnail")
    bridge.request(env)
    items, disposed = retrieved(tmp_path, CT, MR)
    stream = Stream.from_iterable(items)
    cancelled = []

    def cancel():
        # As a real retrieve: cancelling removes its spool area.
        cancelled.append(True)
        for item in items:
            os.remove(item.path)

    stream._on_cancel = cancel
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=stream, done=defer.Deferred()))))
    assert response.headers.get("content-type") == "image/jpeg"
    assert max(Image.open(io.BytesIO(body_of(response))).size) <= 128
    assert cancelled == [True]  # the rest of the study is not retrieved
    assert disposed == [0]


def test_bulkdata_of_an_instance(bridge, tmp_path):
    env = request("studies/1.2/series/1.2.3/instances/1.2.3.4/bulkdata/7FE00010",
                  headers=[("Accept", "application/octet-stream")])
    bridge.request(env)
    items, _ = retrieved(tmp_path, CT)
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.Deferred()))))
    assert body_of(response) == dcmread(CT).PixelData


# -- STOW-RS ---------------------------------------------------------------------


def stow_body(*parts):
    boundary = "XbOuNdArY"
    out = b""
    for data in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    return f'multipart/related; type="application/dicom"; boundary={boundary}', out


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_store_spools_checks_and_reports(bridge):
    ct, mr = dcmread(CT), dcmread(MR)
    ctype, body = stow_body(read(CT), b"not dicom at all", read(MR))
    env = request("studies", method="POST", headers=[("Content-Type", ctype)], body=body)
    assert result_of(bridge.request(env)) is None
    dicom = env.dicom
    assert dicom.operation == "store"
    sent = result_of(collect_items(dicom.instances))
    assert [i.sop_instance_uid for i in sent] == [ct.SOPInstanceUID, mr.SOPInstanceUID]
    assert read(sent[0].path) == read(CT)
    statuses = [(ct.SOPClassUID, ct.SOPInstanceUID, 0x0000, None), (mr.SOPClassUID, mr.SOPInstanceUID, 0xA700, "full")]
    response = result_of(bridge.response(env, ResponseEnvelope(
        dicom=DicomResult(status=0xA700, instance_statuses=statuses))))
    assert response.status == 202  # some stored, some failed
    value = json.loads(response.body)
    [stored] = value["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [ct.SOPInstanceUID]
    assert stored["00081190"]["Value"] == [f"{ROOT}/studies/{ct.StudyInstanceUID}/series/"
                                           f"{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"]
    failed = value["00081198"]["Value"]
    assert sorted(f["00081197"]["Value"][0] for f in failed) == [0xA700, 0xC000]
    # The spooled parts are gone.
    assert result_of(bridge.spool().list()) == []


def collect_items(stream):
    async def run():
        return [item async for item in stream]

    return defer.Deferred.fromCoroutine(run())


def test_store_to_another_study_fails_that_instance(bridge):
    ctype, body = stow_body(read(CT))
    env = request("studies/9.9.9", method="POST", headers=[("Content-Type", ctype)], body=body)
    response = result_of(bridge.request(env))
    assert env.dicom is None  # nothing to send
    assert response.status == 409
    [failed] = json.loads(response.body)["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [dicomweb_bridge.STUDY_MISMATCH]


def test_store_needs_multipart_dicom(bridge):
    env = request("studies", method="POST", headers=[("Content-Type", "application/json")], body=b"{}")
    with pytest.raises(UnsupportedMediaType):
        result_of(bridge.request(env))


def test_store_with_pacs_error_cleans_up(bridge):
    ctype, body = stow_body(read(CT))
    env = request("studies", method="POST", headers=[("Content-Type", ctype)], body=body)
    result_of(bridge.request(env))
    assert result_of(bridge.spool().list()) != []
    assert bridge.response(env, ResponseEnvelope(status=502)) is None
    assert result_of(bridge.spool().list()) == []


def test_requests_of_other_endpoints_pass(bridge):
    env = RequestEnvelope(details=RequestDetails(method="GET", path="x"))
    assert bridge.request(env) is None
    assert bridge.response(env, ResponseEnvelope(status=200)) is None
