"""
Tests for L{harmony.workers}: the configurations several processes cannot
run, the command line of a worker, and worker 0's supervision of the
others (started with their sockets, started again when they die, replaced
on reload, stopped with Harmony) over a fake process reactor.
"""

import os
import signal

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from _configfiles import NETWORK, PROXY, load
from harmony import workers


class FakeTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signum)


class ProcessReactor(Clock):
    """
    A clock that records spawnProcess calls (L{IReactorProcess}).
    """

    def __init__(self):
        super().__init__()
        self.spawned = []
        self._pids = iter(range(1000, 2000))

    def spawnProcess(self, process, executable, args, env=None, childFDs=None):
        transport = FakeTransport(next(self._pids))
        process.transport = transport
        self.spawned.append((process, executable, list(args), env, dict(childFDs)))
        process.makeConnection(transport)
        return transport


def end(process, code=1):
    process.processEnded(Failure(error.ProcessTerminated(exitCode=code)))


@pytest.fixture
def sockets(monkeypatch):
    """
    Sockets are replaced by descriptors of /dev/null (no network in unit
    tests); returns the (address, port) each was asked for.
    """
    asked = []

    def fake(address, port, backlog=50):
        asked.append((address, port))
        return os.open(os.devnull, os.O_RDONLY)

    monkeypatch.setattr(workers, "reuseport_socket", fake)
    return asked


def supervisor(reactor, count=1, environ=None):
    s = workers.WorkerSupervisor(reactor, "/etc/harmony/harmony.toml", count, executable="/venv/bin/python",
                                 environ=environ if environ is not None else {"PATH": "/bin", "NOTIFY_SOCKET": "@x"})
    s.startService()
    return s


def test_workers_get_their_own_sockets_and_the_command_line(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor, count=2)
    s.start_workers({"main": ("127.0.0.1", 8080), "v6": ("::1", 8443)})
    assert len(reactor.spawned) == 2
    process, executable, args, env, fds = reactor.spawned[0]
    assert executable == "/venv/bin/python"
    assert args == ["/venv/bin/python", "-m", "harmony.workers", "--config", "/etc/harmony/harmony.toml",
                    "--index", "1", "--listen", "main=3:inet", "--listen", "v6=4:inet6"]
    assert reactor.spawned[1][2][6] == "2"
    # stdin a pipe, the logs go where worker 0's go, one socket per network.
    assert fds[0] == "w" and fds[1] == 1 and fds[2] == 2 and set(fds) == {0, 1, 2, 3, 4}
    # Fresh sockets for each worker, on worker 0's addresses.
    assert sockets == [("127.0.0.1", 8080), ("::1", 8443)] * 2
    # Only worker 0 talks to systemd.
    assert "NOTIFY_SOCKET" not in env and env["PATH"] == "/bin"
    # Worker 0 closed its copies of the sockets.
    for fd in (fds[3], fds[4]):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_parse_args():
    args, adopted = workers._parse_args(["--config", "c.toml", "--index", "3", "--listen", "main=3:inet",
                                         "--listen", "v6=4:inet6"])
    assert args.config == "c.toml" and args.index == 3
    assert adopted == {"main": (3, "inet"), "v6": (4, "inet6")}


def test_a_dead_worker_is_started_again_with_growing_delays(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor)
    s.start_workers({"main": ("127.0.0.1", 8080)})
    delays = []
    for _ in range(4):
        end(reactor.spawned[-1][0])
        assert s.processes == {}
        call = reactor.getDelayedCalls()[0]
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        assert set(s.processes) == {1}
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert len(reactor.spawned) == 5
    # A worker that ran a long time before dying starts from the short delay again.
    reactor.advance(workers.STABLE_SECS)
    end(reactor.spawned[-1][0])
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 0.5


def test_delay_is_capped(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor)
    s.start_workers({})
    for _ in range(10):
        end(reactor.spawned[-1][0])
        call = reactor.getDelayedCalls()[0]
        delay = call.getTime() - reactor.seconds()
        reactor.advance(delay)
    assert delay == workers.MAX_RESTART_DELAY


def test_stop_sigterm_then_sigkill_after_the_grace(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor, count=2)
    s.start_workers({"main": ("127.0.0.1", 8080)})
    first, second = (p for p, *_ in reactor.spawned)
    d = s.stop_workers(10)
    assert first.transport.signals == [signal.SIGTERM] and second.transport.signals == [signal.SIGTERM]
    end(first, 0)
    reactor.advance(14.9)
    assert second.transport.signals == [signal.SIGTERM]
    assert not d.called
    reactor.advance(0.2)
    assert second.transport.signals == [signal.SIGTERM, signal.SIGKILL]
    end(second, None)
    assert d.called
    # Stopped workers are not started again.
    assert reactor.getDelayedCalls() == [] and len(reactor.spawned) == 2


def test_stop_cancels_a_pending_restart(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor)
    s.start_workers({})
    end(reactor.spawned[0][0])
    assert len(reactor.getDelayedCalls()) == 1
    d = s.stop_workers(5)
    assert d.called and reactor.getDelayedCalls() == []


def test_replace_starts_new_workers_then_stops_the_old(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor, count=1)
    s.start_workers({"main": ("127.0.0.1", 8080)})
    old = reactor.spawned[0][0]
    d = s.replace({"main": ("0.0.0.0", 8080), "other": ("127.0.0.1", 9090)}, 2, 5)
    new = [p for p, *_ in reactor.spawned[1:]]
    assert len(new) == 2 and old.transport.signals == [signal.SIGTERM]
    assert all(p.transport.signals == [] for p in new)
    assert sockets[-4:] == [("0.0.0.0", 8080), ("127.0.0.1", 9090)] * 2
    assert s.generation == 1 and {i: p for i, p in s.processes.items()} == {1: new[0], 2: new[1]}
    # The old worker ending is expected: it is not started again.
    end(old, 0)
    assert d.called and reactor.getDelayedCalls() == [] and len(reactor.spawned) == 3


def test_replace_with_no_workers_left(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor, count=1)
    s.start_workers({})
    old = reactor.spawned[0][0]
    s.replace({}, 0, 5)
    assert len(reactor.spawned) == 1 and s.processes == {}
    assert old.transport.signals == [signal.SIGTERM]


def test_worker_already_gone_when_signalled(sockets):
    reactor = ProcessReactor()
    s = supervisor(reactor)
    s.start_workers({})
    process = reactor.spawned[0][0]
    process.transport.pid = None
    d = s.stop_workers(1)
    end(process, 0)
    assert d.called


def test_dead_worker_marked_dead_for_prometheus(sockets, monkeypatch, tmp_path):
    marked = []
    monkeypatch.setenv(workers.PROMETHEUS_ENV, str(tmp_path))
    from prometheus_client import multiprocess

    monkeypatch.setattr(multiprocess, "mark_process_dead", lambda pid, path: marked.append((pid, path)))
    reactor = ProcessReactor()
    s = supervisor(reactor)
    s.start_workers({})
    pid = reactor.spawned[0][0].transport.pid
    end(reactor.spawned[0][0])
    assert marked == [(pid, str(tmp_path))]


MOVE_PIPELINE = """
[pipelines.retrieve]
networks = ["main"]
endpoints = ["retrieve_in"]
backends = ["pacs"]
[endpoints.retrieve_in]
service = "http"
[endpoints.retrieve_in.options]
path_prefix = "/dicom"
[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "PACS"
host = "127.0.0.1"
port = 11112
dimse_retrieve_mode = "{mode}"
"""


@pytest.mark.parametrize("count, mode, problems", [(1, "move", 0), (2, "get", 0), (2, "move", 1)])
def test_move_retrieves_in_http_pipelines_need_one_process(tmp_path, count, mode, problems):
    base = PROXY + f"workers = {count}\n" + NETWORK
    config = load(tmp_path, base, {"retrieve.toml": MOVE_PIPELINE.format(mode=mode)})
    found = workers.check_config(config)
    assert len(found) == problems
    if problems:
        message, file, path = found[0]
        assert path == ("pipelines", "retrieve", "backends", 0) and file.endswith("retrieve.toml")
        assert "'pacs' retrieves with C-MOVE" in message and 'dimse_retrieve_mode = "get" or workers = 1' in message


def test_dicom_only_pipelines_may_move_with_workers(tmp_path):
    pipeline = """
[pipelines.scp]
endpoints = ["scp"]
backends = ["pacs"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
port = 11113
enable_move = true
[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "PACS"
host = "127.0.0.1"
port = 11112
dimse_retrieve_mode = "move"
"""
    config = load(tmp_path, PROXY + "workers = 2\n", {"scp.toml": pipeline})
    assert workers.check_config(config) == []


def test_workers_option_is_bounded(tmp_path):
    from _configfiles import load_error

    error = load_error(tmp_path, PROXY + "workers = 0\n" + NETWORK)
    assert "proxy.workers" in str(error)


def test_setup_shared_dir(tmp_path, monkeypatch):
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    environ = {"RUNTIME_DIRECTORY": str(tmp_path)}
    path = workers.setup_shared_dir(environ)
    try:
        assert os.path.dirname(path) == str(tmp_path)
        assert environ[workers.SHARED_DIR_ENV] == path
        assert environ[workers.PROMETHEUS_ENV] == os.path.join(path, "metrics")
        assert os.path.isdir(os.path.join(path, "metrics"))
    finally:
        workers.remove_shared_dir(path)
    assert not os.path.exists(path)


def test_shared_dir(monkeypatch):
    monkeypatch.delenv(workers.SHARED_DIR_ENV, raising=False)
    assert workers.shared_dir() is None
    monkeypatch.setenv(workers.SHARED_DIR_ENV, "/run/harmony/x")
    assert workers.shared_dir() == "/run/harmony/x"


def test_check_config_command_refuses_move_with_workers(tmp_path):
    import io

    from harmony.cli import check_config

    (tmp_path / "pipelines").mkdir()
    (tmp_path / "harmony.toml").write_text(PROXY + "workers = 3\n" + NETWORK)
    (tmp_path / "pipelines" / "retrieve.toml").write_text(MOVE_PIPELINE.format(mode="move"))
    out, err = io.StringIO(), io.StringIO()
    assert check_config(str(tmp_path / "harmony.toml"), out, err) == 1
    assert "retrieves with C-MOVE" in err.getvalue() and "workers = 3" in err.getvalue()
