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


def check_config(path, out=sys.stdout, err=sys.stderr):
    """
    Validate a configuration and print a summary of its networks,
    pipelines and routes.

    @return: the exit status (0 valid, 1 invalid).
    """
    registry = default_registry()
    try:
        config = load_config(path, registry)
        gateway = build_gateway(config, registry, BuildContext(config=config))
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
    args = parser.parse_args(argv)
    return check_config(args.path)


if __name__ == "__main__":
    sys.exit(main())
