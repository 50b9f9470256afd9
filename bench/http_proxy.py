#!/usr/bin/env python3
"""
HTTP reverse-proxy benchmark: Harmony's C{http} backend against a direct
connection and against Twisted's own C{twisted.web.proxy.ReverseProxyResource}.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/http_proxy.py [--duration 10] [--connections 32] [--body-size 1024]

Everything runs on 127.0.0.1 with free ports, in one go:

 1. a local backend (a minimal HTTP/1.1 server written on a raw Twisted
    C{Protocol}, one process) answering GET and POST with a fixed body of
    C{--body-size} bytes;
 2. three targets measured with wrk, GET then POST (POST sends a
    C{--body-size} request body), each after a short warm-up:
    direct (client -> backend), Harmony (client -> twistd harmony ->
    backend) and ReverseProxyResource (client -> twisted.web.proxy ->
    backend);
 2b. two more Harmony pipelines in the same process, for the overhead of
    middleware against plain passthrough: C{/jwt} (C{jwt_auth}, HS256, a
    valid token on every request) and C{/transform} (a JOLT C{transform}
    of the origin's JSON response);
 2c. Harmony again with C{[proxy] workers = N} (C{--workers}, default 2;
    not pinned: its processes share the HTTP socket and use every core),
    plain passthrough GET and POST: the multi-core ratio against one process;
 3. peak RSS (VmHWM) of the proxy processes (a multi-worker Harmony: the
    sum over its processes), and CPU use of every process during each
    measurement;
 4. a table, ratios and whether Harmony reaches the target rate.

See bench/README.md for the pinning and how to read the output.  This is a
benchmark, not a test: it exits 0 whatever the numbers are, and non-zero
only when a process fails to start, a sanity request fails, or wrk reports
socket errors or non-2xx responses (all printed).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
TARGET_RPS = 3300
TARGET_BODY = 1024
OTHER_CPU_WARN = 20  # % of one core busy outside our processes -> warn (see README)
PATH = "/bench/item"  # requested path (Harmony's endpoint prefix is /bench)

# ---------------------------------------------------------------------------
# Child process sources
# ---------------------------------------------------------------------------

BACKEND_SRC = r'''
"""
A minimal, fast HTTP/1.1 origin: fixed body for every request, keep-alive,
pipelining, Content-Length and chunked request bodies (discarded).
"""
import sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

SIZE = int(sys.argv[1])
# A JSON document of exactly SIZE bytes (the transform row rewrites it).
_HEAD = b'{"resourceType":"Patient","id":"bench","name":[{"family":"Doe","given":["Jane"]}],"note":"'
_FILL = max(0, SIZE - len(_HEAD) - 2)
BODY = (_HEAD + b"x" * _FILL + b'"}')[:SIZE] if SIZE >= len(_HEAD) + 2 else (b"0123456789abcdef" * (SIZE // 16 + 1))[:SIZE]
HEAD = (b"HTTP/1.1 200 OK\r\nServer: bench-origin\r\n"
        b"Content-Type: " + (b"application/json" if BODY.startswith(b"{") else b"application/octet-stream") + b"\r\n"
        b"Content-Length: " + str(SIZE).encode() + b"\r\n")
KEEP = HEAD + b"\r\n" + BODY
CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY


class Origin(Protocol):
    def connectionMade(self):
        self.buf = b""
        self.skip = 0          # body bytes still to discard
        self.chunked = False   # inside a chunked body
        self.close = False     # answer pending, then close
        self.transport.setTcpNoDelay(True)

    def _chunks(self, buf):
        """Discard chunked body data; return (rest, done)."""
        while True:
            if self.skip:
                n = min(self.skip, len(buf))
                buf = buf[n:]
                self.skip -= n
                if self.skip:
                    return buf, False
            i = buf.find(b"\r\n")
            if i < 0:
                return buf, False
            line = buf[:i].split(b";")[0].strip()
            if line == b"":          # CRLF after a chunk's data
                buf = buf[i + 2:]
                continue
            size = int(line, 16)
            buf = buf[i + 2:]
            if size == 0:            # last chunk: skip trailers up to CRLF CRLF
                if buf.startswith(b"\r\n"):
                    return buf[2:], True
                j = buf.find(b"\r\n\r\n")
                if j < 0:
                    return b"0\r\n" + buf, False   # wait for the rest
                return buf[j + 4:], True
            self.skip = size

    def dataReceived(self, data):
        buf = self.buf + data
        out = []
        while True:
            if self.chunked:
                buf, done = self._chunks(buf)
                if not done:
                    break
                self.chunked = False
                out.append(CLOSE if self.close else KEEP)
                if self.close:
                    break
                continue
            if self.skip:
                n = min(self.skip, len(buf))
                buf = buf[n:]
                self.skip -= n
                if self.skip:
                    break
                out.append(CLOSE if self.close else KEEP)
                if self.close:
                    break
                continue
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            head = buf[:i]
            buf = buf[i + 4:]
            lines = head.split(b"\r\n")
            length = 0
            chunked = False
            close = lines[0].endswith(b"HTTP/1.0")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    v = value.strip().lower()
                    close = v == b"close" or (close and v != b"keep-alive")
            self.close = close
            if chunked:
                self.chunked = True
                continue
            if length:
                self.skip = length
                continue
            out.append(CLOSE if close else KEEP)
            if close:
                break
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))
        if self.close and out and not self.skip and not self.chunked:
            self.transport.loseConnection()


f = Factory.forProtocol(Origin)
port = reactor.listenTCP(int(sys.argv[2]), f, backlog=1024, interface="127.0.0.1")
print("listening on", port.getHost().port, flush=True)
reactor.run()
'''

REVPROXY_SRC = r'''
"""
twisted.web.proxy.ReverseProxyResource in front of the backend; access log
disabled (like Harmony's HarmonySite) so both proxies do the same work.
"""
import sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from twisted.web import server
from twisted.web.proxy import ReverseProxyResource


class QuietSite(server.Site):
    noisy = False

    def log(self, request):
        pass


backend_port, port = int(sys.argv[1]), int(sys.argv[2])
# /bench/item -> backend /item, like Harmony's /bench prefix
root = ReverseProxyResource("127.0.0.1", backend_port, b"")
site = QuietSite(root)
p = reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
print("listening on", p.getHost().port, flush=True)
reactor.run()
'''

HARMONY_CONFIG = """\
# Generated by bench/http_proxy.py
[proxy]
id = "bench"
log_level = "info"

[network.default]
[network.default.http]
bind_address = "127.0.0.1"
bind_port = {port}

[logging]
log_to_file = false

[pipelines.bench]
description = "Benchmark: plain reverse proxy"
networks = ["default"]
endpoints = ["bench"]
middleware = []
backends = ["origin"]

[endpoints.bench]
service = "http"
[endpoints.bench.options]
path_prefix = "/bench"

[backends.origin]
service = "http"
[backends.origin.options]
base_url = "http://127.0.0.1:{backend_port}"
timeout_secs = 30

[pipelines.bench_jwt]
description = "Benchmark: reverse proxy behind jwt_auth (HS256)"
networks = ["default"]
endpoints = ["bench_jwt"]
middleware = ["auth"]
backends = ["origin"]

[endpoints.bench_jwt]
service = "http"
[endpoints.bench_jwt.options]
path_prefix = "/jwt"

[middleware.auth]
type = "jwt_auth"
[middleware.auth.options]
algorithm = "HS256"
secret = "{jwt_secret}"
audience = "harmony-bench"

[pipelines.bench_transform]
description = "Benchmark: reverse proxy with a JOLT transform of the JSON response"
networks = ["default"]
endpoints = ["bench_transform"]
middleware = ["reshape"]
backends = ["origin"]

[endpoints.bench_transform]
service = "http"
[endpoints.bench_transform.options]
path_prefix = "/transform"

[middleware.reshape]
type = "transform"
[middleware.reshape.options]
spec_path = "{spec_path}"
apply = "right"
"""

#: The transform row's JOLT spec: reshape the origin's Patient document.
TRANSFORM_SPEC = """[
  {"operation": "shift", "spec": {"id": "patient", "name": {"0": {"family": "family", "given": "given"}},
                                  "note": "note", "resourceType": "type"}},
  {"operation": "default", "spec": {"source": "harmony-bench"}}
]
"""

WRK_LUA = r'''
-- Generated by bench/http_proxy.py
wrk.method = "{method}"
{body}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d bytes=%d\n",
    summary.requests, summary.duration, summary.bytes))
  io.write(string.format("BENCH errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d\n",
    e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format("BENCH lat_mean_us=%.1f lat_max_us=%d p50_us=%d p90_us=%d p99_us=%d\n",
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
'''

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def die(msg, *logs):
    print(f"\n*** BENCHMARK FAILED: {msg}", flush=True)
    for title, path in logs:
        print(f"--- {title} ({path}) ---")
        try:
            with open(path, errors="replace") as f:
                print(f.read()[-4000:])
        except OSError as e:
            print(f"(cannot read: {e})")
    raise SystemExit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pin(cores):
    """Command prefix pinning a child to C{cores} (None: no pinning)."""
    if cores is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cores]


class Child:
    """A child process with its output in a log file."""

    def __init__(self, name, argv, workdir, env, cwd=None):
        self.name = name
        self.log = os.path.join(workdir, f"{name}.log")
        self.argv = argv
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=cwd or workdir,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # taskset execs: same pid as the server

    def alive(self):
        return self.proc.poll() is None

    def pids(self):
        """The process and its children (a multi-worker Harmony's workers)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [self.pid] + [int(p) for p in f.read().split()]
        except OSError:
            return [self.pid]

    def status(self, key):
        total = None
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(key + ":"):
                            total = (total or 0) + int(line.split()[1])  # kB
            except OSError:
                pass
        return total

    def cpu_ticks(self):
        total = None
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total = (total or 0) + int(fields[11]) + int(fields[12])  # utime + stime (after pid, comm)
            except OSError:
                if pid == self.pid:
                    return None
        return total

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def wait_http(child, url, timeout=20.0):
    """Wait until C{url} answers (any HTTP status) or the child dies."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not child.alive():
            die(f"{child.name} exited with status {child.proc.returncode} during startup "
                f"({' '.join(child.argv)})", (child.name, child.log))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
                return
        except urllib.error.HTTPError:
            return
        except OSError as e:
            last = e
        time.sleep(0.1)
    die(f"{child.name} did not answer {url} within {timeout:.0f}s (last error: {last})",
        (child.name, child.log))


def kind(target):
    """Which wrk scripts a target uses (the JWT one sends a token)."""
    return "jwt" if target == "jwt" else "plain"


def refused(name, url, child_logs):
    """Without a token the JWT target answers 401."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            die(f"{name}: GET {url} without a token answered {r.status}, expected 401", *child_logs)
    except urllib.error.HTTPError as e:
        if e.code != 401:
            die(f"{name}: GET {url} without a token answered {e.code}, expected 401", *child_logs)


def sanity(name, url, size, child_logs, headers=None, expect_json=None):
    """
    One GET and one POST through a target: 200 and the full body (or, with
    C{expect_json}, a JSON body containing those members).
    """
    payload = b"p" * (size or 1024)
    for method, data in (("GET", None), ("POST", payload)):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            die(f"{name}: {method} {url} answered HTTP {e.code}: {e.read()[:300]!r}", *child_logs)
        except OSError as e:
            die(f"{name}: {method} {url} failed: {e}", *child_logs)
        if expect_json is not None:
            import json

            got = json.loads(body) if status == 200 else None
            if not isinstance(got, dict) or any(got.get(k) != v for k, v in expect_json.items()):
                die(f"{name}: {method} {url} answered {status} with {body[:200]!r} (expected {expect_json})",
                    *child_logs)
        elif status != 200 or len(body) != size:
            die(f"{name}: {method} {url} answered {status} with {len(body)} body bytes "
                f"(expected 200 with {size})", *child_logs)


def run_wrk(url, script, duration, connections, cores, env, timeout_s=5):
    argv = pin(cores) + [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={timeout_s}s",
        "-s", script, url,
    ]
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("BENCH "):
            for kv in line.split()[1:]:
                k, v = kv.split("=")
                out[k] = float(v)
    if p.returncode != 0 or "requests" not in out:
        print(p.stdout)
        print(p.stderr)
        raise SystemExit(f"*** BENCHMARK FAILED: wrk failed ({' '.join(argv)})")
    out["raw"] = p.stdout
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    return out


def sys_busy_ticks():
    """Machine-wide busy CPU ticks (all cores): user, nice, system, irq, softirq, steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def children_ticks(tick):
    """CPU ticks of the waited-for children (here: the wrk runs)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * tick


def fmt_ms(us):
    return f"{us / 1000:.2f}"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds before each measurement (default 2)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--body-size", type=int, default=1024, help="response and POST body bytes (default 1024)")
    ap.add_argument("--workers", type=int, default=2,
                    help="also measure Harmony with [proxy] workers = N (default 2; 1: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args()

    if not shutil.which("wrk"):
        raise SystemExit("*** BENCHMARK FAILED: wrk not found (Debian package `wrk`)")
    twistd = os.path.join(os.path.dirname(PYTHON), "twistd")
    if not os.path.exists(twistd):
        raise SystemExit(f"*** BENCHMARK FAILED: {twistd} not found; run with the project venv's python")

    ncpu = os.cpu_count() or 1
    if ncpu >= 3:
        proxy_core, backend_core, wrk_core = "0", "1", "2"
    elif ncpu == 2:
        proxy_core, backend_core, wrk_core = "0", "1", "1"
    else:
        proxy_core = backend_core = wrk_core = None

    env = dict(os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    workdir = tempfile.mkdtemp(prefix="harmony-bench-")
    duration = max(1, int(round(args.duration)))
    warmup = max(0, int(round(args.warmup)))
    size = args.body_size

    import jwt  # PyJWT, a Harmony dependency

    jwt_secret = os.urandom(24).hex()
    token = jwt.encode({"sub": "bench", "aud": "harmony-bench", "exp": int(time.time()) + 3600},
                       jwt_secret, algorithm="HS256")
    spec_path = os.path.join(workdir, "reshape.json")
    with open(spec_path, "w") as f:
        f.write(TRANSFORM_SPEC)

    scripts = {}
    for flavour, extra in (("plain", ""), ("jwt", f'wrk.headers["Authorization"] = "Bearer {token}"')):
        for method in ("GET", "POST"):
            body = ""
            if method == "POST":
                body = (f'wrk.body = string.rep("b", {size})\n'
                        'wrk.headers["Content-Type"] = "application/octet-stream"')
            path = os.path.join(workdir, f"{flavour}-{method.lower()}.lua")
            with open(path, "w") as f:
                f.write(WRK_LUA.replace("{method}", method).replace("{body}", body + "\n" + extra))
            scripts[(flavour, method)] = path

    children = []
    tick = os.sysconf("SC_CLK_TCK")

    def start(name, argv, cores, url, cwd=None):
        c = Child(name, pin(cores) + argv, workdir, env, cwd)
        children.append(c)
        wait_http(c, url)
        return c

    try:
        print("Harmony HTTP proxy benchmark")
        print(f"  python      {PYTHON} ({sys.version.split()[0]})")
        print(f"  wrk         {shutil.which('wrk')}  -t1 -c{args.connections} "
              f"-d{duration}s (+{warmup}s warm-up per run)")
        print(f"  body        {size} bytes (GET response; POST request and response)")
        print(f"  cores       {ncpu}: proxy under test on {proxy_core}, backend on {backend_core}, "
              f"wrk on {wrk_core}" + ("" if shutil.which("taskset") else " (taskset missing: no pinning)"))
        print("  env         TCP_NODELAY=1 for every child")
        print(f"  workdir     {workdir}")

        # 1. backend
        backend_port = free_port()
        src = os.path.join(workdir, "origin.py")
        with open(src, "w") as f:
            f.write(BACKEND_SRC)
        backend = start("backend", [PYTHON, src, str(size), str(backend_port)], backend_core,
                        f"http://127.0.0.1:{backend_port}/")
        print(f"  backend     raw Twisted Protocol HTTP/1.1 origin (epoll, one process, "
              f"not twisted.web) pid {backend.pid} on 127.0.0.1:{backend_port}")

        # 2. Harmony
        harmony_port = free_port()
        cfg = os.path.join(workdir, "harmony.toml")
        with open(cfg, "w") as f:
            f.write(HARMONY_CONFIG.format(port=harmony_port, backend_port=backend_port, jwt_secret=jwt_secret,
                                          spec_path=spec_path))
        harmony = start("harmony", [twistd, "-n", "--pidfile=", "--reactor=epoll", "harmony", "-c", cfg],
                        proxy_core, f"http://127.0.0.1:{harmony_port}{PATH}", cwd=workdir)
        print(f"  harmony     twistd harmony (http endpoint /bench -> http backend) pid {harmony.pid} "
              f"on 127.0.0.1:{harmony_port}")

        # 3. ReverseProxyResource
        rp_port = free_port()
        src = os.path.join(workdir, "revproxy.py")
        with open(src, "w") as f:
            f.write(REVPROXY_SRC)
        revproxy = start("revproxy", [PYTHON, src, str(backend_port), str(rp_port)], proxy_core,
                         f"http://127.0.0.1:{rp_port}{PATH}")
        print(f"  revproxy    twisted.web.proxy.ReverseProxyResource pid {revproxy.pid} "
              f"on 127.0.0.1:{rp_port}")

        # 3b. Harmony with several worker processes
        multi = None
        if args.workers > 1:
            multi_port = free_port()
            cfg = os.path.join(workdir, "harmony-workers.toml")
            with open(cfg, "w") as f:
                f.write(HARMONY_CONFIG.format(port=multi_port, backend_port=backend_port, jwt_secret=jwt_secret,
                                              spec_path=spec_path)
                        .replace('id = "bench"\n', f'id = "bench"\nworkers = {args.workers}\n', 1))
            multi = start("workers", [twistd, "-n", "--pidfile=", "--reactor=epoll", "harmony", "-c", cfg],
                          None, f"http://127.0.0.1:{multi_port}{PATH}", cwd=workdir)
            deadline = time.monotonic() + 20
            while len(multi.pids()) < args.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            if len(multi.pids()) < args.workers:
                die(f"harmony with workers = {args.workers} started {len(multi.pids())} processes",
                    (multi.name, multi.log))
            time.sleep(1.0)  # the workers adopt the socket
            print(f"  workers     twistd harmony, [proxy] workers = {args.workers} (pids {multi.pids()}, "
                  f"not pinned) on 127.0.0.1:{multi_port}")

        targets = [
            ("direct", f"http://127.0.0.1:{backend_port}{PATH}", None),
            ("harmony", f"http://127.0.0.1:{harmony_port}{PATH}", harmony),
            ("revproxy", f"http://127.0.0.1:{rp_port}{PATH}", revproxy),
            ("jwt", f"http://127.0.0.1:{harmony_port}/jwt/item", harmony),
            ("transform", f"http://127.0.0.1:{harmony_port}/transform/item", harmony),
        ]
        if multi is not None:
            targets.append(("workers", f"http://127.0.0.1:{multi_port}{PATH}", multi))
        logs = [(c.name, c.log) for c in children]
        for name, url, _ in targets:
            if name == "jwt":
                sanity(name, url, size, logs, headers={"Authorization": f"Bearer {token}"})
                refused(name, url, logs)
            elif name == "transform":
                sanity(name, url, None, logs, expect_json={"patient": "bench", "family": "Doe"})
            else:
                sanity(name, url, size, logs)
        print("  sanity      GET and POST through every target: 200 with the full body\n", flush=True)

        results = {}
        failures = []
        for name, url, proc in targets:
            for method in ("GET", "POST"):
                if warmup:
                    run_wrk(url, scripts[(kind(name), method)], warmup, args.connections, wrk_core, env)
                before = {c.name: c.cpu_ticks() for c in children}
                sys0, wrk0, t0 = sys_busy_ticks(), children_ticks(tick), time.monotonic()
                r = run_wrk(url, scripts[(kind(name), method)], duration, args.connections, wrk_core, env)
                after = {c.name: c.cpu_ticks() for c in children}
                sys1, wrk1, t1 = sys_busy_ticks(), children_ticks(tick), time.monotonic()
                secs = r["duration_us"] / 1e6
                cpu = {}
                for k in before:
                    if before[k] is not None and after[k] is not None:
                        cpu[k] = 100.0 * (after[k] - before[k]) / tick / secs
                wrk_cpu = 100.0 * (wrk1 - wrk0) / tick / (t1 - t0)
                ours = sum(cpu.values()) * secs / (t1 - t0) + wrk_cpu
                # Busy CPU not used by our processes: other load on the machine, plus
                # interrupt/softirq time (loopback networking) not charged to any process.
                other = max(0.0, 100.0 * (sys1 - sys0) / tick / (t1 - t0) - ours)
                r["other_cpu"] = other
                r["wrk_cpu"] = wrk_cpu
                cpu = {k: v for k, v in cpu.items() if k in ("backend", getattr(proc, "name", None))}
                r["cpu"] = cpu
                results[(name, method)] = r
                errs = {k[7:]: int(v) for k, v in r.items() if k.startswith("errors_") and v}
                line = (f"  {name:<9} {method:<4} {r['rps']:9.0f} req/s  p50 {fmt_ms(r['p50_us'])} ms  "
                        f"p99 {fmt_ms(r['p99_us'])} ms  cpu: " +
                        ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items()) +
                        f", wrk {r['wrk_cpu']:.0f}%, other {r['other_cpu']:.0f}%")
                print(line, flush=True)
                if errs:
                    msg = f"{name} {method}: wrk reported errors {errs} in {int(r['requests'])} requests"
                    print(f"  *** {msg}\n{r['raw']}", flush=True)
                    failures.append(msg)
                for c in children:
                    if not c.alive():
                        die(f"{c.name} exited (status {c.proc.returncode}) during the {name} {method} run",
                            (c.name, c.log))

        rss = {c.name: c.status("VmHWM") for c in children}

        # 4. report
        print()
        label = {"direct": "direct (wrk -> backend)", "harmony": "harmony (twistd harmony)",
                 "revproxy": "ReverseProxyResource", "jwt": "harmony + jwt_auth HS256",
                 "transform": "harmony + JOLT transform",
                 "workers": f"harmony, {args.workers} workers"}
        hdr = f"{'target':<26} {'method':<6} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
              f"{'proxy cpu':>9} {'backend cpu':>11} {'other cpu':>9} {'peak RSS':>10}"
        print(hdr)
        print("-" * len(hdr))
        for name, _, proc in targets:
            for method in ("GET", "POST"):
                r = results[(name, method)]
                pcpu = f"{r['cpu'].get(proc.name, 0):.0f}%" if proc else "-"
                bcpu = f"{r['cpu'].get('backend', 0):.0f}%"
                mem = f"{rss[proc.name] / 1024:.1f} MiB" if proc and rss.get(proc.name) else "-"
                print(f"{label[name]:<26} {method:<6} {r['rps']:9.0f} {fmt_ms(r['p50_us']):>8} "
                      f"{fmt_ms(r['p90_us']):>8} {fmt_ms(r['p99_us']):>8} {pcpu:>9} {bcpu:>11} "
                      f"{r['other_cpu']:8.0f}% {mem:>10}")
        if rss.get("backend"):
            print(f"(backend peak RSS {rss['backend'] / 1024:.1f} MiB; peak RSS = VmHWM at the end of the run)")

        print()
        for method in ("GET", "POST"):
            h = results[("harmony", method)]["rps"]
            d = results[("direct", method)]["rps"]
            p = results[("revproxy", method)]["rps"]
            print(f"{method:<4}  harmony/direct = {h / d:.2f}   harmony/ReverseProxyResource = {h / p:.2f}")
        for name in ("jwt", "transform"):
            for method in ("GET", "POST"):
                h = results[("harmony", method)]
                r = results[(name, method)]
                extra_us = 1e6 / r["rps"] - 1e6 / h["rps"]
                print(f"{method:<4}  {label[name]}: {r['rps']:.0f} req/s = {r['rps'] / h['rps']:.2f}x plain "
                      f"passthrough ({extra_us:+.0f} us per request at {args.connections} connections; "
                      f"p50 {fmt_ms(r['p50_us'])} vs {fmt_ms(h['p50_us'])} ms)")
        if multi is not None:
            for method in ("GET", "POST"):
                h = results[("harmony", method)]["rps"]
                w = results[("workers", method)]["rps"]
                print(f"{method:<4}  harmony with {args.workers} workers / one process = {w / h:.2f} "
                      f"({w:.0f} vs {h:.0f} req/s; on {ncpu} cores shared with the backend and wrk)")
        fastest_proxy = max(results[(n, m)]["rps"] for n in ("harmony", "revproxy") for m in ("GET", "POST"))
        slowest_direct = min(results[("direct", m)]["rps"] for m in ("GET", "POST"))
        if slowest_direct < 2 * fastest_proxy:
            print(f"WARNING: the backend ({slowest_direct:.0f} req/s direct) is less than 2x the fastest "
                  f"proxy ({fastest_proxy:.0f} req/s): it may be limiting the proxy numbers.")
        else:
            print(f"Backend headroom: direct {slowest_direct:.0f} req/s >= 2x the fastest proxy "
                  f"({fastest_proxy:.0f} req/s): the backend is not the bottleneck.")

        noisy = max(r["other_cpu"] for r in results.values())
        if noisy > OTHER_CPU_WARN:
            print(f"WARNING: up to {noisy:.0f}% of a core was busy outside the benchmark's processes during a "
                  f"measurement (other load on the machine, or interrupt time): numbers may be low and noisy; "
                  f"re-run on a quiet machine.")
        print()
        verdicts = []
        for method in ("GET", "POST"):
            h = results[("harmony", method)]["rps"]
            ok = h >= TARGET_RPS
            verdicts.append(ok)
            print(f"Target {TARGET_RPS} req/s, {method}: harmony {h:.0f} req/s -> "
                  f"{'REACHED' if ok else 'NOT REACHED'}")
        note = "" if size == TARGET_BODY else f" (note: the target is defined for {TARGET_BODY}-byte bodies; this run used {size})"
        print(f"Harmony target {TARGET_RPS} req/s with {size}-byte bodies: "
              f"{'REACHED' if all(verdicts) else 'NOT REACHED'}{note}")

        if failures:
            print("\n*** BENCHMARK FAILED: wrk reported socket errors or non-2xx responses:")
            for msg in failures:
                print(f"  {msg}")
            return 1
        return 0
    finally:
        for c in reversed(children):
            c.stop()
        if args.keep:
            print(f"(work directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
