"""
The systemd unit: the shipped file is the rendered template, and
systemd-analyze accepts the unit rendered for this venv.
"""

import os
import shutil
import subprocess
import sys

from harmony.cli import main
from harmony.systemd import render_unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.dirname(os.path.dirname(sys.executable))
ANALYZE = shutil.which("systemd-analyze")


def _verify(path):
    assert ANALYZE, "systemd-analyze is missing: install the Debian package systemd"
    return subprocess.run([ANALYZE, "verify", path], capture_output=True, text=True, timeout=60)


def test_shipped_unit_is_the_default_rendering():
    with open(os.path.join(ROOT, "etc", "systemd", "harmony.service")) as f:
        shipped = f.read()
    assert shipped == render_unit()
    assert "ExecStart=/opt/harmony/venv/bin/twistd --nodaemon --pidfile= harmony -c /etc/harmony/harmony.toml" in shipped
    for option in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                   "Restart=on-failure", "User=harmony", "NoNewPrivileges=true", "ProtectSystem=strict",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE"):
        assert option in shipped


def test_systemd_unit_command_prints_the_rendering(capsys):
    assert main(["systemd-unit", "--venv", "/srv/h/venv", "--config", "/srv/h/h.toml", "--user", "svc"]) == 0
    out = capsys.readouterr().out
    assert out == render_unit("/srv/h/venv", "/srv/h/h.toml", "svc")
    assert "ExecStart=/srv/h/venv/bin/twistd --nodaemon --pidfile= harmony -c /srv/h/h.toml" in out
    assert "User=svc" in out


def test_systemd_analyze_verifies_unit_for_this_venv(tmp_path):
    unit = tmp_path / "harmony.service"
    unit.write_text(render_unit(VENV, os.path.join(ROOT, "etc", "harmony.toml"), "root"))
    result = _verify(str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ""


def test_systemd_analyze_rejects_missing_binary(tmp_path):
    # Proves the check above can fail: a venv without twistd is refused.
    unit = tmp_path / "harmony.service"
    unit.write_text(render_unit(str(tmp_path / "no-venv"), "/etc/harmony/harmony.toml", "root"))
    result = _verify(str(unit))
    assert result.returncode != 0
    assert "no-venv" in result.stderr


def test_sd_notify_ready_and_stopping(tmp_path):
    """
    Under Type=notify, twistd harmony says READY=1 once it listens and
    STOPPING=1 when SIGTERM arrives (systemd's NOTIFY_SOCKET protocol).
    """
    import socket

    from harmonytest import Process, base_config, free_port, twistd_argv, write_config

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        port = free_port()
        echo = """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo_in"]
backends = ["echo_out"]
[endpoints.echo_in]
service = "echo"
[endpoints.echo_in.options]
path_prefix = "/echo"
[backends.echo_out]
service = "echo"
"""
        config = write_config(tmp_path, base_config(port), {"echo": echo})
        proc = Process(twistd_argv(config), tmp_path, "notify", env={"NOTIFY_SOCKET": address})
        try:
            ready = sock.recv(4096).decode()
            assert ready.splitlines()[0] == "READY=1", ready
            assert "STATUS=Serving 1 pipelines" in ready.splitlines()
            proc.wait_for_port(port, timeout=1)  # READY=1 came after the listener was up
        finally:
            proc.stop_cleanly()
        stopping = sock.recv(4096).decode()
        assert stopping.splitlines()[0] == "STOPPING=1", stopping


def test_sd_notify_is_quiet_outside_systemd():
    from harmony.systemd import notify

    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/harmony.sock"}) is False
