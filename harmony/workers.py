# -*- test-case-name: tests.unit.test_workers -*-
"""
Several worker processes (C{[proxy] workers = N}).

The process C{twistd} started ("worker 0") starts N-1 more
(C{python -m harmony.workers}, L{WorkerSupervisor}); every one builds the
whole gateway from the same configuration and serves the HTTP listeners,
each on its own C{SO_REUSEPORT} socket bound to the listener's address and
port (the kernel spreads new connections evenly; one shared socket would
let the first process awake accept a whole burst).

State model:
  - worker 0 alone runs what listens for DICOM (C{dicom_scp} endpoints,
    persistent C-MOVE store SCPs) and the management API;
  - C-MOVE retrieves from HTTP pipelines are refused at startup
    (L{check_config}): the PACS sends to one store SCP, worker 0's;
  - health checks, outlier ejection, circuit breakers and retry budgets
    are per worker (each routes on its own view);
  - what must not split lives in the shared directory (L{shared_dir}):
    rate-limit buckets and prometheus-client's multiprocess files (the
    management API sums them); JMIX builds are one per study through file
    locks in the package store.
"""
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from harmony import logs

#: Environment variable naming the directory worker processes share
#: (set by worker 0 for itself and its children; absent: one process).
SHARED_DIR_ENV = "HARMONY_SHARED_DIR"


def shared_dir():
    """
    @return: the directory shared by the worker processes, or C{None} when
        Harmony runs as one process.
    """
    return os.environ.get(SHARED_DIR_ENV) or None

log = logs.logger("harmony.workers")

#: Environment variable of prometheus-client's multiprocess mode.
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: A worker that dies is started again after this many seconds, doubled
#: for each death in a row (up to L{MAX_RESTART_DELAY}).
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0

#: A worker that ran this long before dying resets the delay.
STABLE_SECS = 60.0


def setup_shared_dir(environ=None):
    """
    Worker 0, before anything is built: create the shared directory (under
    systemd's C{$RUNTIME_DIRECTORY} when set, else the temporary
    directory), name it in the environment (inherited by the workers), and
    switch prometheus-client to its multiprocess mode in that directory.

    @return: the directory.
    """
    environ = os.environ if environ is None else environ
    base = (environ.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
    path = tempfile.mkdtemp(prefix="harmony-workers-", dir=base)
    os.mkdir(os.path.join(path, "metrics"), 0o700)
    environ[SHARED_DIR_ENV] = path
    environ[PROMETHEUS_ENV] = os.path.join(path, "metrics")
    # prometheus-client chose its value class when it was imported (before
    # the configuration was read): choose again, now in multiprocess mode.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return path


def remove_shared_dir(path):
    shutil.rmtree(path, ignore_errors=True)


def check_config(config):
    """
    Configurations that cannot run as several processes.

    A C-MOVE retrieve needs the C-MOVE store SCP of the process that asked
    for it (the PACS connects to one address), and only worker 0 listens
    for DICOM: HTTP pipelines (served by every worker) may not retrieve
    with C-MOVE when C{workers > 1}.

    @return: a list of (message, file, key path) problems.
    """
    if config.proxy.workers <= 1:
        return []
    problems = []
    for pname, pipeline in sorted(config.pipelines.items()):
        http = [e for e in pipeline.endpoints if config.endpoints[e].service != "dicom_scp"]
        if not http:
            continue
        for i, bname in enumerate(pipeline.backends):
            backend = config.backends[bname]
            mode = getattr(backend.options, "dimse_retrieve_mode", None)
            if backend.service == "dicom_scu" and mode == "move":
                problems.append((
                    f"backend {bname!r} retrieves with C-MOVE, which needs the one C-MOVE store SCP of worker 0, "
                    f"but pipeline {pname!r} has HTTP endpoints served by every worker ([proxy] workers = "
                    f"{config.proxy.workers}): use dimse_retrieve_mode = \"get\" or workers = 1",
                    pipeline.file,
                    ("pipelines", pname, "backends", i),
                ))
    return problems


def validate(config):
    """
    @raise ConfigError: the configuration cannot run as C{[proxy] workers}
        processes (the first problem L{check_config} finds).
    """
    from harmony.config import ConfigError

    problems = check_config(config)
    if problems:
        raise ConfigError(*problems[0])


# -- worker 0: starting and watching the other workers -------------------------


def reuseport_socket(address, port, backlog=50):
    """
    A listening TCP socket with C{SO_REUSEPORT}: every worker has its own
    on the same address and port, and the kernel spreads new connections
    evenly over them (one shared socket would let the first process awake
    accept a whole burst of connections).

    @return: the socket's file descriptor (the caller owns it).
    @raise OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return sock.detach()
    except BaseException:
        sock.close()
        raise


def family_name(address):
    return "inet6" if ":" in address else "inet"


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    Worker 0's listener on C{address:port} with C{SO_REUSEPORT}, so the
    other workers can listen on the same address and port.
    """

    def __init__(self, reactor, address, port, backlog=50):
        self._reactor = reactor
        self.address = address
        self.port = port
        self.backlog = backlog

    def listen(self, factory):
        try:
            fd = reuseport_socket(self.address, self.port, self.backlog)
        except OSError as e:
            return defer.fail(error.CannotListenError(self.address, self.port, e))
        return AdoptedEndpoint(self._reactor, fd, family_name(self.address)).listen(factory)


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor, index, generation):
        self.supervisor = supervisor
        self.index = index
        self.generation = generation
        self.started = None
        self.pid = None
        self.ended = defer.Deferred()
        self.stopping = False

    def connectionMade(self):
        self.started = self.supervisor.reactor.seconds()

    def processEnded(self, reason):
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Worker 0's view of the other workers (1 to N-1): starts them with the
    listening sockets of the HTTP networks, starts one again when it dies,
    replaces them all on reload (new ones first, then the old ones drain),
    and stops them (they drain) with Harmony.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param config_path: the configuration file the workers load.
    @param count: the number of workers besides worker 0.
    @param executable: the Python interpreter.
    """

    def __init__(self, reactor, config_path, count, executable=sys.executable, environ=None):
        self.reactor = reactor
        self.config_path = os.path.abspath(config_path)
        self.count = count
        self.executable = executable
        self.environ = environ
        self.addresses = {}
        self.generation = 0
        self.processes = {}
        self._delays = {}
        self._pending = {}

    # -- starting -----------------------------------------------------------------

    def start_workers(self, addresses):
        """
        Start workers 1..count serving the HTTP networks.

        @param addresses: network name -> (address, port) that worker 0
            listens on (with C{SO_REUSEPORT}).
        """
        self.addresses = dict(addresses)
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index):
        self._pending.pop(index, None)
        child_fds = {0: "w", 1: 1, 2: 2}
        args = [self.executable, "-m", "harmony.workers", "--config", self.config_path, "--index", str(index)]
        # Each worker gets its own sockets (the kernel balances between
        # them); worker 0 closes its copies once the worker has them, so
        # a dead worker's socket goes away with it.
        fds = []
        try:
            for n, (network, (address, port)) in enumerate(sorted(self.addresses.items())):
                fds.append(reuseport_socket(address, port))
                child_fds[3 + n] = fds[-1]
                args += ["--listen", f"{network}={3 + n}:{family_name(address)}"]
            env = dict(os.environ if self.environ is None else self.environ)
            # Only worker 0 talks to systemd (NotifyAccess=main).
            env.pop("NOTIFY_SOCKET", None)
            process = _WorkerProcess(self, index, self.generation)
            self.reactor.spawnProcess(process, self.executable, args, env=env, childFDs=child_fds)
        finally:
            for fd in fds:
                os.close(fd)
        # (The transport forgets its pid once the process ended.)
        process.pid = process.transport.pid
        self.processes[index] = process
        log.info("Worker {index} started (pid {pid})", index=index, pid=process.pid)
        return process

    def _ended(self, process, reason):
        pid = process.pid
        _mark_dead(pid)
        if self.processes.get(process.index) is not process:
            return
        del self.processes[process.index]
        if process.stopping or not self.running:
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        ran = self.reactor.seconds() - (process.started or self.reactor.seconds())
        delay = RESTART_DELAY if ran >= STABLE_SECS else min(self._delays.get(process.index, 0) * 2 or RESTART_DELAY,
                                                              MAX_RESTART_DELAY)
        self._delays[process.index] = delay
        log.error(
            "Worker {index} (pid {pid}) exited unexpectedly (exit code {code}, signal {signal}); "
            "starting it again in {delay}s",
            index=process.index, pid=pid, code=code, signal=sig, delay=delay,
        )
        self._pending[process.index] = self.reactor.callLater(delay, self._spawn, process.index)

    # -- reload and stop -------------------------------------------------------------

    def replace(self, addresses, count, grace):
        """
        After a reload: start a new set of workers with the new
        configuration and listening sockets, then stop the old ones
        (they finish their in-flight requests, up to C{grace} seconds).
        """
        old = list(self.processes.values())
        self.processes = {}
        self._cancel_pending()
        self.generation += 1
        self.count = count
        self.start_workers(addresses)
        return self._stop(old, grace)

    def stop_workers(self, grace):
        """
        Stop every worker: C{SIGTERM} (each drains for up to C{grace}
        seconds), C{SIGKILL} for one still there a little later.

        @return: Deferred firing when all have exited.
        """
        self._cancel_pending()
        old = list(self.processes.values())
        self.processes = {}
        return self._stop(old, grace)

    def _cancel_pending(self):
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()

    def _stop(self, processes, grace):
        for process in processes:
            process.stopping = True
            _signal(process, signal.SIGTERM)

        def kill():
            for process in processes:
                if not process.ended.called:
                    log.warn("Worker {index} did not stop in time: killing it", index=process.index)
                    _signal(process, signal.SIGKILL)

        call = self.reactor.callLater(grace + 5, kill)
        d = defer.gatherResults([p.ended for p in processes])

        def done(result):
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)

    def stopService(self):
        super().stopService()
        return self.stop_workers(0)


def _signal(process, signum):
    try:
        process.transport.signalProcess(signum)
    except error.ProcessExitedAlready:
        pass
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def _mark_dead(pid):
    """
    prometheus-client's multiprocess mode: a dead worker's live gauges
    (requests in flight) no longer count.
    """
    directory = os.environ.get(PROMETHEUS_ENV)
    if pid is None or not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)


# -- workers 1..N-1 ------------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A server endpoint over a listening socket inherited from worker 0.
    """

    def __init__(self, reactor, fd, family):
        self._reactor = reactor
        self.fd = fd
        self.family = socket.AF_INET6 if family == "inet6" else socket.AF_INET

    def listen(self, factory):
        try:
            port = self._reactor.adoptStreamPort(self.fd, self.family, factory)
        except Exception:
            return defer.fail()
        # adoptStreamPort works on its own duplicate.
        os.close(self.fd)
        return defer.succeed(port)


def _parse_args(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="harmony-worker", description="A Harmony worker process (started by worker 0).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], metavar="NETWORK=FD:FAMILY")
    args = parser.parse_args(argv)
    adopted = {}
    for item in args.listen:
        network, _, rest = item.partition("=")
        fd, _, family = rest.partition(":")
        adopted[network] = (int(fd), family or "inet")
    return args, adopted


def _watch_parent(reactor, parent, stop):
    """
    Worker 0 gone (killed): stop too.
    """
    from twisted.internet.task import LoopingCall

    def check():
        if os.getppid() != parent:
            log.warn("Worker 0 is gone: stopping")
            loop.stop()
            stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(1.0, now=False)
    return loop


def main(argv=None):
    """
    C{python -m harmony.workers --config PATH --index K --listen NET=FD:FAMILY ...}:
    serve the HTTP networks on the inherited sockets until C{SIGTERM}
    (then drain, as worker 0 does).
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from harmony.tap import build_worker

    args, adopted = _parse_args(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    root, observers = build_worker(reactor, args.config, args.index, adopted)
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    # SIGHUP: worker 0 starts new workers with the new configuration.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    root.privilegedStartService()
    reactor.callWhenRunning(root.startService)
    # Ctrl-C in a terminal reaches the whole process group: worker 0 stops
    # the workers (SIGTERM, after its own listeners), not the keyboard.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    _watch_parent(reactor, parent, reactor.stop)
    reactor.run()


if __name__ == "__main__":
    main()
