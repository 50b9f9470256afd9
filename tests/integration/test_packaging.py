"""
Packaging: a wheel (non-editable) install of Harmony makes twistd list the
plugin, and the wheel ships twisted/plugins/harmony_plugin.py without any
__init__.py that would shadow Twisted.  (The editable install is what the
test venv uses: test_twistd checks `twistd --help` there.)
"""

import os
import site
import subprocess
import sys
import zipfile

from harmonytest import REPO


def _run(argv, cwd, env=None):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_contents_and_twistd_plugin(tmp_path):
    wheels = tmp_path / "wheels"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = list(wheels.glob("harmony_gateway-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/harmony_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "harmony/tap.py" in names
    assert not any(n.startswith(("tests/", "bench/", "etc/")) for n in names)

    # A fresh environment: the wheel installed by pip into its own
    # directory, the dependencies from this venv (but not this venv's
    # editable install of the source tree, whose .pth is not processed).
    target = tmp_path / "site"
    installed = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + deps))
    probe = _run(
        [sys.executable, "-S", "-c", "import harmony, sys; print(harmony.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
    listing = _run(
        [sys.executable, "-S", "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=tmp_path,
        env=env,
    )
    assert listing.returncode == 0, listing.stderr
    assert "harmony" in listing.stdout
    assert "Healthcare protocol gateway" in listing.stdout
