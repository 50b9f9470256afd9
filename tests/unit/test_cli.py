"""
Tests for L{harmony.cli}: C{harmony check-config PATH}.
"""

import io
import os
import subprocess
import sys

import pytest

from _configfiles import NETWORK, PROXY, pipeline, write_config
from harmony import __version__
from harmony.cli import check_config, main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
ETC = os.path.join(ROOT, "etc", "harmony.toml")
HARMONY = os.path.join(os.path.dirname(sys.executable), "harmony")


def test_check_shipped_config(capsys):
    assert main(["check-config", ETC]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"Harmony configuration {ETC} (proxy id 'harmony-default')"
    assert "Networks:" in lines
    assert "  default: http 127.0.0.1:8080 (serving)" in lines
    assert "Pipelines:" in lines
    assert "  echo (pipelines/echo.toml): Echo: shows the request as Harmony sees it" in lines
    assert "    networks:   default" in lines
    assert "    endpoints:  echo (echo)" in lines
    assert "    middleware: request ['passthru'], response ['passthru']" in lines
    assert "    backends:   echo (echo)" in lines
    assert "Routes:" in lines
    assert (
        "  default /echo -> endpoint echo (pipeline echo, catch-all; "
        "DELETE GET HEAD OPTIONS PATCH POST PUT)"
    ) in lines
    assert "Warnings:" not in lines
    assert lines[-1] == "Configuration OK"
    # Sections in order.
    assert lines.index("Networks:") < lines.index("Pipelines:") < lines.index("Routes:")


def test_check_config_writes_to_given_streams():
    out, err = io.StringIO(), io.StringIO()
    assert check_config(ETC, out=out, err=err) == 0
    assert out.getvalue().endswith("\nConfiguration OK\n")
    assert err.getvalue() == ""


def test_check_config_relative_path(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, PROXY + NETWORK, {"api.toml": pipeline("api", "/api", backend="https://up")})
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", "harmony.toml"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "  main: http 127.0.0.1:0 (serving)" in out
    assert "    backends:   api_out (http)" in out
    assert "  main /api -> endpoint api_in (pipeline api, catch-all;" in out


def test_check_config_lists_targets(tmp_path, capsys):
    text = PROXY + NETWORK + pipeline("api") + """
[backends.balanced]
service = "http"
targets = ["a", "b"]
strategy = "failover"
[backends.balanced.options]
max_retries = 1
[backends.balanced.health_check]
[targets.a]
url = "http://127.0.0.1:9001"
weight = 2
[targets.b]
url = "http://127.0.0.1:9002"
"""
    text = text.replace('backends = ["api_out"]', 'backends = ["balanced"]')
    path = write_config(tmp_path, text)
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert "    backends:   balanced (http)" in lines
    assert (
        "      balanced: failover over a (http://127.0.0.1:9001, weight 2), b (http://127.0.0.1:9002, weight 1), "
        "health checks, 1 retries"
    ) in lines


def test_check_config_shows_warnings_and_idle_networks(tmp_path, capsys):
    text = (
        '[proxy]\nid = "x"\nstore_dir = "/old"\n'
        + NETWORK
        + "[network.idle.http]\nbind_port = 9999\n[network.nohttp]\n"
        + pipeline("api")
    )
    path = write_config(tmp_path, text)
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert "  idle: http 0.0.0.0:9999 (no routes, not listening)" in lines
    assert "  nohttp: no HTTP listener" in lines
    assert lines[lines.index("Warnings:") + 1] == (
        "  harmony.toml: proxy.store_dir: deprecated legacy key, ignored (use [storage.options] path)"
    )


def test_check_bad_config(tmp_path, capsys):
    files = {"b.toml": pipeline("pacs", backend="http://pacs") + 'timeout_secs = "abc"\n'}
    path = write_config(tmp_path, PROXY + NETWORK, files)
    assert main(["check-config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "harmony: configuration error: pipelines/b.toml: "
        'backends.pacs_out.options.timeout_secs: expected number, got "abc"\n'
    )


def test_check_missing_file(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "harmony: configuration error: absent.toml: file not found\n"


def test_check_route_conflict(tmp_path, capsys):
    files = {"a.toml": pipeline("alpha", "/api"), "b.toml": pipeline("bravo", "/api/")}
    path = write_config(tmp_path, PROXY + NETWORK, files)
    assert main(["check-config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        "harmony: configuration error: pipelines/b.toml: pipelines.bravo.endpoints.0: "
        "route conflict on network 'main': "
    )
    assert "(pipeline 'alpha')" in err
    assert "(pipeline 'bravo')" in err


def test_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_check_config_needs_path(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check-config"])
    assert info.value.code == 2
    assert "path" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"harmony {__version__}\n"


def _run(*args, cwd=None):
    return subprocess.run(
        [HARMONY, *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.mark.skipif(not os.path.exists(HARMONY), reason="harmony script not installed")
def test_script_check_config():
    result = _run("check-config", ETC)
    assert result.returncode == 0, result.stderr
    assert "  default /echo -> endpoint echo (pipeline echo" in result.stdout
    assert result.stdout.endswith("\nConfiguration OK\n")


@pytest.mark.skipif(not os.path.exists(HARMONY), reason="harmony script not installed")
def test_script_check_bad_config(tmp_path):
    path = write_config(tmp_path, '[proxy]\nid = "x"\nlog_level = "loud"\n')
    result = _run("check-config", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "harmony: configuration error: harmony.toml: proxy.log_level: "
        'expected one of trace, debug, info, warn, error, got "loud"\n'
    )
