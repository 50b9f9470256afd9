"""
Helpers for configuration tests: write a base file (and pipelines files)
into a temporary directory and load it.
"""

import textwrap

import pytest

from harmony.config import ConfigError, load_config
from harmony.registry import builtin_registry

#: The smallest valid base file.
PROXY = """
[proxy]
id = "test-gw"
"""

#: A network with an HTTP listener called "main".
NETWORK = """
[network.main.http]
bind_address = "127.0.0.1"
bind_port = 0
"""


def pipeline(name, prefix="/api", networks=("main",), backend="echo", middleware=None):
    """
    TOML for pipeline C{name} with endpoint C{<name>_in} (an http endpoint
    on C{prefix}) and backend C{<name>_out} (an echo backend, or an http
    backend to C{backend} when it is a URL).
    """
    nets = ", ".join(f'"{n}"' for n in networks)
    lines = [
        f"[pipelines.{name}]",
        f"networks = [{nets}]",
        f'endpoints = ["{name}_in"]',
        f'backends = ["{name}_out"]',
    ]
    if middleware is not None:
        lines.append("middleware = [" + ", ".join(f'"{m}"' for m in middleware) + "]")
    lines += [
        "",
        f"[endpoints.{name}_in]",
        'service = "http"',
        f"[endpoints.{name}_in.options]",
        f'path_prefix = "{prefix}"',
        "",
        f"[backends.{name}_out]",
    ]
    if backend == "echo":
        lines.append('service = "echo"')
    else:
        lines += ['service = "http"', f"[backends.{name}_out.options]", f'base_url = "{backend}"']
    return "\n".join(lines) + "\n"


def write_config(tmp_path, base, pipelines=None, name="harmony.toml", pipelines_dir="pipelines"):
    """
    Write C{base} as C{tmp_path/name} and each C{pipelines} item
    (file name -> text) into C{tmp_path/pipelines_dir}.

    @return: the base file's path (a string).
    """
    path = tmp_path / name
    path.write_text(textwrap.dedent(base))
    if pipelines:
        directory = tmp_path / pipelines_dir
        directory.mkdir(exist_ok=True)
        for fname, text in pipelines.items():
            (directory / fname).write_text(textwrap.dedent(text))
    return str(path)


def load(tmp_path, base, pipelines=None, environ=None, registry=None, **kw):
    """
    Write and load a configuration (built-in types only, empty
    environment unless given).
    """
    path = write_config(tmp_path, base, pipelines, **kw)
    return load_config(
        path,
        registry=builtin_registry() if registry is None else registry,
        environ={} if environ is None else environ,
    )


def load_error(tmp_path, base, pipelines=None, environ=None, registry=None, **kw):
    """
    Write and load a configuration that must fail.

    @return: the L{ConfigError}.
    """
    with pytest.raises(ConfigError) as info:
        load(tmp_path, base, pipelines, environ, registry, **kw)
    return info.value
