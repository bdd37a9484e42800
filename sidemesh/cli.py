"""The `sidemesh` command line.

Shared commands live here; each component adds its own group (`sidemesh ca ...`) through the
`sidemesh.commands` entry-point group, so this package never imports a component.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from sidemesh import __version__
from sidemesh.config import ConfigError


class CLIError(Exception):
    """A failure the user can act on: the message says what went wrong and what to do next."""


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidemesh",
        description="Sidemesh: a sidecar service mesh for Kubernetes (SPIFFE identities, mTLS, allow rules).",
    )
    parser.add_argument("--version", action="version", version=f"sidemesh {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    seen: set[str] = set()
    for ep in sorted(entry_points(group="sidemesh.commands"), key=lambda e: e.name):
        if ep.name in seen:  # the same distribution seen twice (e.g. during a reinstall)
            continue
        seen.add(ep.name)
        ep.load()(sub)
    from sidemesh import demo, top

    demo.register(sub)
    top.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (CLIError, ConfigError) as exc:
        print(f"sidemesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
