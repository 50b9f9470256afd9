"""
State that several worker processes share (C{[proxy] workers}): the JMIX
builder across workers.  Two workers are two L{PackageStore}s on one
directory (reached through two paths, as each worker has its own store),
each with its own clock and its own C{jmix_builder}: their build locks are
C{flock}s, which conflict between two open files even in one process.
(The store's own cross-process tests, with real second processes, are in
test_jmix_store; the shared rate-limit table's in test_rate_limit.)
"""

import os

import pytest
from test_jmix_builder import Reactor, envelope, fired, retrieved, zip_names
from test_jmix_package import make_study
from twisted.internet import defer

from harmony.config.schema import Where
from harmony.endpoints import jmix as jmix_endpoint
from harmony.envelope import DicomResult, ResponseEnvelope
from harmony.errors import UpstreamUnavailable
from harmony.jmix import store as store_module
from harmony.jmix.store import PackageStore
from harmony.middleware import jmix_builder
from harmony.registry import BuildContext
from harmony.streams import Stream


class Worker:
    """
    One worker's reactor, store (at C{root}) and C{jmix_builder}.
    """

    def __init__(self, root):
        self.reactor = Reactor()
        self.root = os.path.abspath(root)
        self.store = PackageStore(self.root, reactor=self.reactor, threadpool=self.reactor.pool, clock=self.reactor)
        self.store.ready = self.store.start()
        jmix_endpoint._STORES[self.root] = self.store
        options = jmix_builder.OPTIONS.validate({"sender_name": "Test Site"}, Where("t.toml"))
        self.mw = jmix_builder.JmixBuilder("jb", options, BuildContext(reactor=self.reactor))

    def ask(self, study):
        env = envelope(self.root, study)
        return env, self.mw.request(env)

    def wait(self):
        self.reactor.advance(store_module.BUILD_POLL_SECS)


@pytest.fixture
def workers(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (tmp_path / "same-store").symlink_to(root)
    one, two = Worker(root), Worker(tmp_path / "same-store")
    study, made = make_study(str(tmp_path / "source"))
    yield one, two, study, made, tmp_path
    for worker in (one, two):
        jmix_endpoint._STORES.pop(worker.root, None)
        worker.store.stop()


def built(worker, env, tmp_path, made):
    """
    The retrieve of C{env} (a request that builds) delivers the study.
    """
    items, _ = retrieved(tmp_path, made)
    result = DicomResult(status=None, instances=Stream.from_iterable(items), done=defer.succeed((0, None)))
    return fired(worker.mw.response(env, ResponseEnvelope(dicom=result)))


def test_one_build_across_workers(workers):
    one, two, study, made, tmp_path = workers
    leader, asked = one.ask(study)
    assert fired(asked) is None and leader.dicom is not None  # one retrieves
    follower, waiting = two.ask(study)
    for _ in range(3):
        two.wait()
    assert not waiting.called and follower.dicom is None  # two waits: no retrieve
    names = zip_names(built(one, leader, tmp_path, made))
    package_id = names[0].split("/")[0]
    two.wait()
    shared = fired(waiting)
    assert follower.dicom is None
    assert shared.headers.get("content-disposition") == f'attachment; filename="{package_id}.zip"'
    assert zip_names(shared) == names
    # One package in the index; nothing left in the work areas, no build
    # lock left (the index's open lock stays).
    assert [r.id for r in fired(two.store.list_for_study(study))] == [package_id]
    assert os.listdir(os.path.join(one.root, ".staging")) == []
    assert os.listdir(os.path.join(one.root, ".locks")) == [store_module.INDEX_LOCK]


def test_a_failed_build_in_one_worker_lets_the_other_build(workers):
    one, two, study, made, tmp_path = workers
    leader, _ = one.ask(study)
    follower, waiting = two.ask(study)
    two.wait()
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    assert one.mw.response(leader, error) is None  # one's own answer: the 502
    assert not waiting.called
    two.wait()
    # Nothing was stored: two builds now, with a retrieve of its own.
    assert fired(waiting) is None and follower.dicom is not None
    assert follower.dicom.identifier.StudyInstanceUID == study
    # A request to one meanwhile waits for two's build.
    again, later = one.ask(study)
    one.wait()
    assert not later.called and again.dicom is None
    answer = built(two, follower, tmp_path, made)
    one.wait()
    assert zip_names(fired(later)) == zip_names(answer)


def test_a_request_gone_while_waiting_for_another_worker_builds_nothing(workers):
    one, two, study, made, tmp_path = workers
    leader, _ = one.ask(study)
    follower, waiting = two.ask(study)
    two.wait()
    waiting.cancel()
    assert not two.reactor.getDelayedCalls()  # no more tries of the lock
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    one.mw.response(leader, error)
    two.reactor.advance(10)
    assert follower.dicom is None  # it never became the one that builds
    assert not two.store._building


def test_the_waiters_of_a_worker_share_its_wait(workers):
    one, two, study, made, tmp_path = workers
    leader, _ = one.ask(study)
    waits = [two.ask(study) for _ in range(3)]
    two.wait()
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    one.mw.response(leader, error)
    two.wait()
    # The first of two's requests builds; the others wait for it.
    (first_env, first), *rest = waits
    assert fired(first) is None and first_env.dicom is not None
    assert all(not d.called and env.dicom is None for env, d in rest)
    error = ResponseEnvelope(status=502)
    error.metadata["error"] = "bad_gateway"
    two.mw.response(first_env, error)
    for _, d in rest:
        with pytest.raises(UpstreamUnavailable):
            fired(d)


def test_two_uploads_of_one_package_at_once_the_second_is_a_conflict(tmp_path, monkeypatch):
    """
    Two workers (or threads) checked that the id is free, then both move
    their upload's zip in: the second gets a 409, the first's zip stays.
    """
    import json

    from harmony.errors import Conflict

    store = PackageStore(tmp_path / "store")
    os.makedirs(store.root)
    package_id = "0b0b0b0b-0000-4000-8000-000000000002"

    def upload(n):
        root = tmp_path / f"upload{n}" / package_id
        os.makedirs(root / "payload" / "dicom")
        (root / "manifest.json").write_text(json.dumps({"id": package_id, "security": {}}))
        (root / "payload" / "metadata.json").write_text(json.dumps({"studies": {"study_uid": "1.2.3"}}))
        zip_path = tmp_path / f"upload{n}" / "upload.zip"
        zip_path.write_bytes(b"zip %d" % n)
        return str(root), str(zip_path)

    first, second = upload(1), upload(2)
    info = jmix_endpoint._place(*first, store, package_id)
    assert info.id == package_id
    # The second checked before the first moved its zip in.
    real_lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if package_id in str(p) else real_lexists(p))
    with pytest.raises(Conflict):
        jmix_endpoint._place(*second, store, package_id)
    monkeypatch.undo()
    with open(store.zip_for(package_id), "rb") as f:
        assert f.read() == b"zip 1"
    assert os.path.exists(second[1])  # the loser's zip stays in its work area (removed with it)
