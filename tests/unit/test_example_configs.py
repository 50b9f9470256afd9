"""
The disabled examples in etc/pipelines are valid once enabled, and disabled
they change nothing in the default configuration.
"""

import os
import shutil

import pytest

from harmony.config import load_config
from harmony.gateway import build_gateway
from harmony.registry import BuildContext, default_registry

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc")
EXAMPLES = ["http-to-dicom.toml", "dicom-proxy.toml", "transform-example.toml", "dicomweb.toml", "jmix.toml",
            "load-balancing.toml", "fhir-imaging.toml"]


def _enable(text):
    lines = []
    for line in text.splitlines():
        if line.startswith("# [") or line.startswith("# ") and "=" in line and not line.startswith("#   "):
            lines.append(line[2:])
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def test_default_config_has_only_the_echo_pipeline():
    config = load_config(os.path.join(ETC, "harmony.toml"))
    assert set(config.pipelines) == {"echo"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_valid_when_enabled(tmp_path, name):
    shutil.copy(os.path.join(ETC, "harmony.toml"), tmp_path / "harmony.toml")
    shutil.copytree(os.path.join(ETC, "transforms"), tmp_path / "transforms")
    (tmp_path / "pipelines").mkdir()
    with open(os.path.join(ETC, "pipelines", name)) as f:
        enabled = _enable(f.read())
    assert "[pipelines." in enabled and "\n# [pipelines." not in enabled
    (tmp_path / "pipelines" / name).write_text(enabled)
    registry = default_registry()
    config = load_config(str(tmp_path / "harmony.toml"), registry)
    assert config.pipelines
    for pipeline in config.pipelines.values():
        assert pipeline.backends
    gateway = build_gateway(config, registry, BuildContext(config=config))
    assert gateway.executors
