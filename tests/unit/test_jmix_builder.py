"""
The jmix_builder middleware: a stored package answers at once; else one
request builds it from the backend's retrieve while the others wait for
that build (synchronous thread pool, no sockets).
"""

import gc
import io
import os
import shutil
import zipfile

import pytest
from test_jmix_package import make_study
from test_jmix_store import FakeReactor
from twisted.internet import defer

from _fakes import FakeThreadPool
from harmony.config.schema import Where
from harmony.dimse.scu import read_part10_header
from harmony.endpoints import jmix as jmix_endpoint
from harmony.envelope import DicomInstance, DicomResult, RequestDetails, RequestEnvelope, ResponseEnvelope
from harmony.errors import NotFound, UpstreamUnavailable
from harmony.jmix.store import PackageStore
from harmony.middleware import jmix_builder
from harmony.registry import BuildContext
from harmony.streams import Stream, collect


class Reactor(FakeReactor):
    def __init__(self):
        super().__init__()
        self.pool = FakeThreadPool()

    def getThreadPool(self):
        return self.pool


@pytest.fixture
def setup(tmp_path):
    reactor = Reactor()
    root = str(tmp_path / "store")
    store = PackageStore(root, reactor=reactor, threadpool=reactor.pool, clock=reactor)
    store.ready = store.start()
    jmix_endpoint._STORES[os.path.abspath(root)] = store
    options = jmix_builder.OPTIONS.validate({"sender_name": "Test Site"}, Where("t.toml"))
    mw = jmix_builder.JmixBuilder("jb", options, BuildContext(reactor=reactor))
    study, made = make_study(str(tmp_path / "source"))
    yield mw, os.path.abspath(root), study, made, tmp_path
    jmix_endpoint._STORES.pop(os.path.abspath(root), None)
    store.stop()


def envelope(root, study):
    env = RequestEnvelope(details=RequestDetails(method="GET", path="api/jmix", client=("10.0.0.7", 5000)))
    env.metadata.update({"jmix_action": "build", "jmix_study_uid": study, "jmix_store": root,
                         "jmix_skip_hashing": "false", "jmix_skip_listing": "false"})
    return env


def fired(d):
    out = []
    d.addBoth(out.append)
    assert out, "did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def retrieved(tmp_path, made):
    """
    The study as a retrieve delivers it: spooled copies with disposers.
    """
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    disposed, items = [], []
    for n, (_, _, path) in enumerate(made):
        copy = spool / f"{n}.dcm"
        shutil.copy(path, copy)
        header = read_part10_header(str(copy))
        items.append(DicomInstance(header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax, None,
                                   path=str(copy), dispose=lambda copy=copy: (disposed.append(1), os.remove(copy))))
    return items, disposed


def zip_names(response):
    data = fired(collect(response.body))
    return sorted(zipfile.ZipFile(io.BytesIO(data)).namelist())


def test_build_once_then_served_from_the_store(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    assert fired(mw.request(leader)) is None
    assert (leader.dicom.operation, leader.dicom.level) == ("get", "STUDY")
    assert leader.dicom.identifier.StudyInstanceUID == study
    follower = envelope(root, study)
    waiting = mw.request(follower)
    assert not waiting.called  # the build is under way: it waits
    items, disposed = retrieved(tmp_path, made)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    answer = fired(mw.response(leader, ResponseEnvelope(dicom=result)))
    assert answer.headers.get("content-type") == "application/zip"
    assert len(disposed) == len(made)
    names = zip_names(answer)
    package_id = names[0].split("/")[0]
    assert sum(n.endswith(".dcm") for n in names) == len(made)
    # The follower gets the same package, without a retrieve of its own.
    shared = fired(waiting)
    assert follower.dicom is None
    assert zip_names(shared)[0].startswith(package_id)
    # Later requests: from the store.
    later = envelope(root, study)
    stored = fired(mw.request(later))
    assert later.dicom is None
    assert stored.headers.get("content-disposition") == f'attachment; filename="{package_id}.zip"'
    manifest = jmix_endpoint.store_for(root, None)
    record = fired(manifest.get(package_id))
    import json

    with open(os.path.join(record.directory, "manifest.json")) as f:
        doc = json.load(f)
    assert doc["sender"]["name"] == "Test Site"
    assert doc["requester"]["id"] == "10.0.0.7"


def test_study_missing_on_the_pacs_is_404_for_everyone(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    empty = DicomResult(status=None, instances=Stream.from_iterable([]), done=defer.succeed((0xC000, None)))
    with pytest.raises(NotFound):
        fired(mw.response(leader, ResponseEnvelope(dicom=empty)))
    with pytest.raises(NotFound):
        fired(waiting)


def test_pacs_error_reaches_the_waiters(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    assert mw.response(leader, error) is None  # the leader's own answer is the 502
    with pytest.raises(UpstreamUnavailable):
        fired(waiting)
    # Nothing stuck: the next request builds again.
    again = envelope(root, study)
    assert fired(mw.request(again)) is None
    assert again.dicom is not None


def test_an_abandoned_build_releases_its_waiters(setup):
    mw, root, study, made, tmp_path = setup
    leader = envelope(root, study)
    fired(mw.request(leader))
    waiting = mw.request(envelope(root, study))
    del leader  # its pipeline was cancelled: the response hook never runs
    gc.collect()
    with pytest.raises(UpstreamUnavailable):
        fired(waiting)


def test_other_requests_pass(setup):
    mw = setup[0]
    env = RequestEnvelope(details=RequestDetails(method="GET", path="x"))
    assert mw.request(env) is None
    assert mw.response(env, ResponseEnvelope(status=200)) is None
