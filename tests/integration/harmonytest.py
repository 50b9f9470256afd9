"""
Helpers for Harmony's integration tests: free ports, subprocesses that are
waited for and stopped cleanly, generated configurations and a blocking
HTTP client.  Everything runs on 127.0.0.1.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
HARMONY_CLI = str(BIN / "harmony")

#: The /api http backend's timeout_secs in the generated proxy config (the
#: upstream's slow route sleeps longer).
BACKEND_TIMEOUT = 1

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def free_port():
    """
    A TCP port that was free on 127.0.0.1 a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port, timeout=0.2):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class Process:
    """
    A subprocess whose output goes to a file (no pipe to fill up).
    """

    def __init__(self, argv, cwd, name, env=None):
        self.argv = [str(a) for a in argv]
        self.cwd = Path(cwd)
        self.log_path = self.cwd / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.popen = subprocess.Popen(
            self.argv,
            cwd=str(self.cwd),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def output(self):
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_port(self, port, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited with {self.popen.returncode} before listening on {port}:\n{self.output()}"
                )
            if accepts(port):
                return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"{self.argv} did not listen on {port} within {timeout}s:\n{self.output()}")

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._log.close()

    def stop(self):
        """
        SIGTERM, then SIGKILL after a grace period.

        @return: C{(returncode, killed)}.
        """
        killed = False
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                killed = True
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode, killed

    def stop_cleanly(self):
        """
        Stop with SIGTERM and assert a clean exit: no SIGKILL needed, the
        reactor shut down normally and nothing failed on the way out.

        twistd re-raises the terminating signal after a clean shutdown (so
        init systems see why it ended): exit status 0 or -SIGTERM.
        """
        returncode, killed = self.stop()
        out = self.output()
        assert not killed, f"{self.argv} ignored SIGTERM:\n{out}"
        assert returncode in (0, -signal.SIGTERM), f"{self.argv} exited with {returncode} on SIGTERM:\n{out}"
        if self.argv[0] == TWISTD:
            assert "Server Shut Down." in out, out
        for bad in ("Traceback", "Unhandled"):
            assert bad not in out, f"{bad} in the output of {self.argv}:\n{out}"


def base_config(port, proxy_id="harmony-it", extra=""):
    return f"""
[proxy]
id = "{proxy_id}"
log_level = "info"
pipelines_path = "pipelines"

[network.default]
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {port}
{extra}
"""


def write_config(directory, base, pipelines):
    """
    Write C{harmony.toml} and C{pipelines/<name>.toml} files.

    @param pipelines: file name (without .toml) -> TOML text.
    @return: the path of the base file.
    """
    directory = Path(directory)
    (directory / "pipelines").mkdir(parents=True, exist_ok=True)
    path = directory / "harmony.toml"
    path.write_text(base)
    for name, text in pipelines.items():
        (directory / "pipelines" / f"{name}.toml").write_text(text)
    return path


def twistd_argv(config):
    return [TWISTD, "-n", "--pidfile=", "harmony", "-c", str(config)]


def start_harmony(directory, config, port, name="harmony", env=None):
    proc = Process(twistd_argv(config), directory, name, env=env)
    proc.wait_for_port(port)
    return proc


def run_twistd(directory, config, timeout=30):
    """
    Run twistd with a configuration expected to fail at startup.
    """
    return subprocess.run(
        twistd_argv(config),
        cwd=str(directory),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value), original case
        self.body = body

    def header(self, name):
        values = self.all(name)
        return values[0] if values else None

    def all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:200]!r}>"


def request(port, method, target, body=None, headers=(), timeout=30, connection=None):
    """
    One HTTP/1.1 request; C{target} is sent exactly as given.

    @param headers: a sequence of C{(name, value)} pairs (repeats allowed).
    @param connection: an open L{http.client.HTTPConnection} to reuse.
    """
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        names = {k.lower() for k, _ in headers}
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, resp.getheaders(), data)
    finally:
        if connection is None:
            conn.close()


class Restartable:
    """
    Named peer processes that a test kills and starts again, each on a
    port of its own that it keeps across restarts.  Subclasses give the
    command line (L{argv}) and may give an environment (L{env}).
    """

    label = "peer"

    def __init__(self, directory, names):
        self.directory = directory
        self.ports = {name: free_port() for name in names}
        self.processes = {}
        self.starts = 0

    def argv(self, name):
        raise NotImplementedError

    def env(self, name):
        return None

    def start(self, name):
        assert not self.alive(name), name
        self.starts += 1
        process = Process(self.argv(name), self.directory, f"{self.label}-{name}-{self.starts}", env=self.env(name))
        process.wait_for_port(self.ports[name])
        self.processes[name] = process

    def start_all(self):
        for name in self.ports:
            self.start(name)

    def kill(self, name):
        process = self.processes.pop(name, None)
        if process is not None:
            process.kill()

    def alive(self, name):
        process = self.processes.get(name)
        return process is not None and process.popen.poll() is None

    def stop(self):
        for name in list(self.processes):
            self.processes.pop(name).stop()


# -- processes and their connections (several worker processes) -------------------------


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _socket_inodes(pid):
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    return inodes


def connection_owners(pids, port):
    """
    Established connections to 127.0.0.1:C{port}: client port -> the pid
    (of C{pids}) holding the server side, from /proc.
    """
    by_inode = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(local.split(":")[1], 16) == port:
                by_inode[inode] = int(remote.split(":")[1], 16)
    owners = {}
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in by_inode:
                owners[by_inode[inode]] = pid
    return owners
