"""
The malloc thresholds Harmony sets at startup (harmony.allocator) against
this system's real glibc, in a child process (the settings are per process).
"""

import subprocess
import sys


def run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", **env}).stdout.strip()


def test_glibc_takes_them():
    assert run("from harmony import allocator; print(allocator.tune())") == "True"


def test_an_operators_environment_wins():
    code = "from harmony import allocator; print(allocator.tune())"
    assert run(code, MALLOC_MMAP_THRESHOLD_="131072") == "False"
