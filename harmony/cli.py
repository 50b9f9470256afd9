# -*- test-case-name: tests.unit.test_cli -*-
"""
The C{harmony} command: C{harmony check-config PATH}.
"""

import argparse
import sys

from harmony import __version__
from harmony.config import ConfigError, load_config
from harmony.gateway import build_gateway, describe
from harmony.registry import BuildContext, default_registry
from harmony.systemd import DEFAULT_CONFIG, DEFAULT_USER, DEFAULT_VENV, render_unit
from harmony.tls import check_listeners
from harmony.workers import validate as validate_workers


def check_config(path, out=None, err=None):
    """
    Validate a configuration and print a summary of its networks,
    pipelines and routes.

    @param out: where the summary goes (default: the current C{sys.stdout}).
    @param err: where errors go (default: the current C{sys.stderr}).
    @return: the exit status (0 valid, 1 invalid).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    registry = default_registry()
    try:
        config = load_config(path, registry)
        gateway = build_gateway(config, registry, BuildContext(config=config))
        check_listeners(config)
        validate_workers(config)
    except ConfigError as e:
        print(f"harmony: configuration error: {e}", file=err)
        return 1
    print(describe(gateway), file=out)
    print("\nConfiguration OK", file=out)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="harmony",
        description="Harmony healthcare protocol gateway. Run it with: twistd -n harmony -c CONFIG",
    )
    parser.add_argument("--version", action="version", version=f"harmony {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration and print a summary")
    check.add_argument("path", help="the base configuration file (.toml)")
    unit = sub.add_parser(
        "systemd-unit", help="print the systemd unit for a venv, configuration and user"
    )
    unit.add_argument("--venv", default=DEFAULT_VENV, help=f"the venv Harmony is installed in ({DEFAULT_VENV})")
    unit.add_argument("--config", default=DEFAULT_CONFIG, help=f"the configuration file ({DEFAULT_CONFIG})")
    unit.add_argument("--user", default=DEFAULT_USER, help=f"the service user and group ({DEFAULT_USER})")
    args = parser.parse_args(argv)
    if args.command == "systemd-unit":
        print(render_unit(args.venv, args.config, args.user), end="")
        return 0
    return check_config(args.path)


if __name__ == "__main__":
    sys.exit(main())
