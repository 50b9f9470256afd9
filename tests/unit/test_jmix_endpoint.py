"""
The jmix endpoint's routes and request checks (the store and builds are
tested with real files in tests/unit/test_jmix_store.py and the
integration tests).
"""

import json
import os

import pytest

from harmony.config.schema import Where
from harmony.endpoints import jmix
from harmony.envelope import RequestDetails, RequestEnvelope
from harmony.errors import BadRequest, MethodNotAllowed, NotFound
from harmony.http.routing import RouteTable

PID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def endpoint(tmp_path, **options):
    options.setdefault("path_prefix", "/jmix")
    options.setdefault("store_dir", str(tmp_path / "store"))
    return jmix.JmixEndpoint("j", jmix.OPTIONS.validate(options, Where("t.toml")))


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("GET", "api/jmix", ("query", None)),
        ("HEAD", "api/jmix/", ("query", None)),
        ("POST", "api/jmix", ("upload", None)),
        ("GET", f"api/jmix/{PID}", ("package", PID)),
        ("GET", f"api/jmix/{PID.upper()}", ("package", PID)),
        ("HEAD", f"api/jmix/{PID}/manifest", ("manifest", PID)),
    ],
)
def test_routes(method, path, expected):
    assert jmix.classify(method, path, {}) == expected


@pytest.mark.parametrize("path", ["", "api", "api/other", f"api/jmix/{PID}/other", f"api/jmix/{PID}/manifest/x"])
def test_other_paths_are_not_ours(path):
    assert jmix.classify("GET", path, {}) is None
    assert not jmix._matches("GET", path)


@pytest.mark.parametrize("bad", ["../../etc", "x", "0f8fad5b-d9cb-469f-a165-70867728950", "%2e%2e"])
def test_ids_are_uuids(bad):
    with pytest.raises(BadRequest):
        jmix.classify("GET", f"api/jmix/{bad}", {})


def test_route_table(tmp_path):
    table = RouteTable("default")
    for route in endpoint(tmp_path).http_routes():
        table.add(route)
    assert table.resolve("POST", "/jmix/api/jmix")[1] == "api/jmix"
    assert table.resolve("GET", f"/jmix/api/jmix/{PID}/manifest")[1] == f"api/jmix/{PID}/manifest"
    with pytest.raises(MethodNotAllowed):
        table.resolve("POST", f"/jmix/api/jmix/{PID}")
    with pytest.raises(NotFound):
        table.resolve("GET", "/jmix/api/other")


def query(ep, params, headers=()):
    env = RequestEnvelope(details=RequestDetails(method="GET", path="api/jmix", query=params, headers=headers))
    return env, ep.incoming(env)


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "studyInstanceUid is required"),
        ({"studyInstanceUid": [""]}, "studyInstanceUid is required"),
        ({"studyInstanceUid": ["1.2.x"]}, "not a valid DICOM UID"),
        ({"studyInstanceUid": ["1.2.3"], "skip_hashing": ["maybe"]}, "skip_hashing must be true or false"),
    ],
)
def test_bad_queries_are_400(tmp_path, params, message):
    _, response = query(endpoint(tmp_path), params)
    assert response.status == 400
    assert message in json.loads(response.body)["message"]


def test_store_dir_defaults_under_storage(tmp_path):
    ep = jmix.JmixEndpoint("j", jmix.OPTIONS.validate({"path_prefix": "/jmix"}, Where("t.toml")))
    assert ep.store_root.endswith("jmix")


def test_the_store_is_opened_when_harmony_starts(tmp_path):
    """
    The endpoint's one service opens its store at startup (the first
    request does not pay for it), and reports a store that cannot be
    opened; requests waiting for it see the error too.
    """
    from twisted.internet import defer
    from twisted.logger import formatEvent, globalLogPublisher

    ep = endpoint(tmp_path)

    class Unopenable:
        ready = defer.fail(PermissionError(13, "Permission denied"))

    store = jmix._STORES[ep.store_root] = Unopenable()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        (service,) = ep.services(None, None)
        assert ep._store is None
        service.startService()
        assert ep._store is store
    finally:
        globalLogPublisher.removeObserver(events.append)
        jmix._STORES.pop(ep.store_root, None)
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "harmony.endpoints.jmix"]
    assert texts == [f"JMIX endpoint j: the package store {ep.store_root} cannot be opened: [Errno 13] Permission denied"]
    waited = []
    store.ready.addErrback(waited.append)
    assert waited[0].check(PermissionError)


def test_upload_needs_a_zip(tmp_path):
    from twisted.internet import task

    ep = endpoint(tmp_path)
    ep._reactor = task.Clock()
    env = RequestEnvelope(details=RequestDetails(method="POST", path="api/jmix",
                                                 headers=[("Content-Type", "application/json")]), body=b"{}")
    out = []
    ep._serve(ep._upload(env)).addBoth(out.append)
    assert out[0].status == 415


def test_work_areas_left_by_a_crash_are_cleared(tmp_path):
    from _deferreds import result_of
    from test_jmix_store import FakeReactor

    from _fakes import FakeThreadPool
    from harmony.jmix.store import PackageStore

    root = tmp_path / "store"
    for area in (".staging/abc", ".upload/def/x"):
        (root / area).mkdir(parents=True)
        (root / area / "part.dcm").write_bytes(b"left behind")
    (root / "keep.txt").write_text("not a work area")
    # Another worker's upload under way: locked, so left alone.
    other = PackageStore(root).open_work_area("upload")
    store = PackageStore(root, reactor=FakeReactor(), threadpool=FakeThreadPool())
    result_of(store.start())
    assert sorted(os.listdir(root / ".staging")) == []
    assert sorted(os.listdir(root / ".upload")) == sorted([os.path.basename(other.path),
                                                           os.path.basename(other.path) + ".lock"])
    assert (root / "keep.txt").exists()
    other.remove()
    assert os.listdir(root / ".upload") == []
    result_of(store.stop())


def test_an_upload_is_stored_as_its_zip_and_its_manifest_read_from_it(tmp_path):
    """
    The store keeps zips only: an upload is extracted and validated in a
    work area, then only its zip moves into the store; the manifest route
    reads the zip.
    """
    from test_jmix_builder import Reactor, fired
    from test_jmix_package import NOW, make_study

    from harmony.jmix.package import build_package
    from harmony.jmix.store import PackageStore

    reactor = Reactor()
    ep = endpoint(tmp_path)
    ep._reactor = reactor
    store = PackageStore(ep.store_root, reactor=reactor, threadpool=reactor.pool, clock=reactor)
    store.ready = store.start()
    jmix._STORES[ep.store_root] = store
    try:
        _, made = make_study(str(tmp_path / "spool"), series=(("CT_small.dcm", 2, None),))
        info = build_package([p for _, _, p in made], str(tmp_path / "built"), now=NOW)
        with open(info.zip_path, "rb") as f:
            body = f.read()
        env = RequestEnvelope(details=RequestDetails(method="POST", path="api/jmix",
                                                     headers=[("Content-Type", "application/zip")]), body=body)
        response = fired(ep._serve(ep._upload(env)))
        assert (response.status, json.loads(response.body)) == (201, {"id": info.id, "status": "stored"})
        assert sorted(os.listdir(ep.store_root)) == sorted(
            [info.id + ".zip", ".locks", ".upload"] + [n for n in os.listdir(ep.store_root) if n.startswith("index")]
        )
        assert os.listdir(os.path.join(ep.store_root, ".upload")) == []
        with open(os.path.join(ep.store_root, info.id + ".zip"), "rb") as f:
            assert f.read() == body
        record = fired(store.get(info.id))
        assert (record.study_uid, record.payload_hash, record.size) == (info.study_uid, info.payload_hash, len(body))
        manifest = fired(ep._serve(ep._manifest(info.id)))
        assert manifest.status == 200
        assert json.loads(manifest.body)["security"]["payload_hash"] == info.payload_hash
        again = RequestEnvelope(details=RequestDetails(method="POST", path="api/jmix",
                                                       headers=[("Content-Type", "application/zip")]), body=body)
        assert fired(ep._serve(ep._upload(again))).status == 409
    finally:
        jmix._STORES.pop(ep.store_root, None)
        store.stop()
