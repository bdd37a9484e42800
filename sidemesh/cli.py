"""The `sidemesh` command line.

Shared commands live here; each component adds its own group (`sidemesh ca ...`) through the
`sidemesh.commands` entry-point group, so this package never imports a component.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import itertools
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence

from sidemesh import __version__
from sidemesh.config import ConfigError, metavar_for


class CLIError(Exception):
    """A failure the user can act on: the message says what went wrong and what to do next."""


def listen_error(exc: Exception, addresses: dict[str, str]) -> CLIError:
    """A server that could not listen (``addresses``: option -> its value), as one line that names
    the option: grpc raises RuntimeError("Failed to bind to address ..."), asyncio an OSError."""
    text = str(exc)
    option = next((o for o, a in addresses.items() if a and a in text), None)
    if option is None and isinstance(exc, OSError):  # asyncio's errors name no address
        option = next((o for o in addresses if o != "--listen" and addresses[o]), None)
    option = option or "--listen"
    if isinstance(exc, socket.gaierror) or (isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL):
        # A name that does not resolve, an address that is not this machine's: nothing holds it.
        return CLIError(
            f"cannot listen on {option} {addresses.get(option, '')}: {exc.strerror or exc}; give an "
            "address of this machine (0.0.0.0, 127.0.0.1, or one of its IPs)"
        )
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:  # (asyncio's strerror repeats the address)
        reason = os.strerror(exc.errno)
    else:
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else "address in use or not available"
        )
    return CLIError(
        f"cannot listen on {option} {addresses.get(option, '')}: {reason.lower()}; stop the process "
        "that holds it (ss -ltnp shows which) or pick another address"
    )


Handler = Callable[[argparse.Namespace], int]

# Exit codes, as grep's: 0 success (authz check: allow), 1 a negative answer the command reports
# (authz check: deny, demo --once: a step misbehaved, proxy wait: not ready in time), 2 the command
# could not do its job, whether the usage, the input or the environment is at fault (CLIError,
# ConfigError, argparse: a CA that cannot be reached is not a deny), 130 interrupted, 141 its
# output closed, 70 (EX_SOFTWARE) an error it did not expect.
INTERNAL_ERROR = 70
EXIT_STATUS = """\
exit status:
  0    success (authz check: allowed)
  1    a negative answer the command reports (authz check: denied; proxy wait:
       not ready in time; demo --once: a step did not behave as described)
  2    the command could not do its job: bad usage or input, or something it
       needs could not be reached or used (the message says what to do next)
  70   an internal error (SIDEMESH_DEBUG=1 prints the traceback; please report it)
  130  interrupted (Ctrl-C)
  141  its output was closed (| head)
"""


def build_parser(command: str | None = None, subcommand: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``command`` (a command's name), that command's alone: a sidecar
    (``sidemesh proxy run``) then never imports the CA's, the controller's or the injector's code,
    which would stay in its memory for nothing (about 4 MB). ``subcommand`` (the next word) is
    passed on to the sidecar's group, which leaves out the parsers of the others."""
    parser = argparse.ArgumentParser(
        prog="sidemesh",
        description="Sidemesh: a sidecar service mesh for Kubernetes (SPIFFE identities, mTLS, allow rules).",
        epilog=EXIT_STATUS + "\n`sidemesh COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidemesh {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    if command == _SIDECAR[0]:
        importlib.import_module(_SIDECAR[1]).register(sub, subcommand)
        return _name_values(parser)
    from importlib.metadata import entry_points

    commands = sorted(entry_points(group="sidemesh.commands"), key=lambda e: e.name)
    if command not in {ep.name for ep in commands} | set(_OWN):
        command = None  # help, or a mistyped command: argparse lists every one
    seen: set[str] = set()
    for ep in commands:
        if ep.name in seen or command not in (None, ep.name):  # (seen: the same distribution twice)
            continue
        seen.add(ep.name)
        ep.load()(sub)
    for name, module in _OWN.items():
        if command in (None, name):
            importlib.import_module(module).register(sub)
    return _name_values(parser)


def _name_values(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of every command shows what its value looks like (``--ttl DURATION``,
    ``--out-dir DIR``, ``--ca HOST:PORT``) the same way, where the command did not say it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_values(child)
        elif action.option_strings and action.nargs != 0 and action.metavar is None and not action.choices:
            action.metavar = metavar_for(action.dest, action.type)
    return parser


_OWN = {"demo": "sidemesh.demo", "top": "sidemesh.top"}  # this package's own commands
# The sidecar's command (every meshed pod runs it), loaded without reading the installed
# distributions' entry points: importlib.metadata and what it imports (email, zipfile, csv) cost
# a sidecar 1.5 MB of RSS. tests/unit/test_cli.py checks it is the entry point pyproject declares.
_SIDECAR = ("proxy", "proxy.cli")


def _command(argv: Sequence[str]) -> str | None:
    """The command the arguments name: the first that is not an option (the top-level options,
    --help and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _subcommand(argv: Sequence[str]) -> str | None:
    """The word after the command (``run`` of ``proxy run``), if no option comes between them
    (which could be taking a value); else None."""
    words = list(itertools.dropwhile(lambda a: a.startswith("-"), argv))
    return words[1] if len(words) > 1 and not words[1].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before any command imports OpenTelemetry (FastAPI does), which reads some OTEL_* variables
    # when imported and raises on a bad value: they are warned about once tracing is on.
    from sidemesh.tracing_settings import withhold_unusable

    withhold_unusable()
    parser = build_parser(_command(argv), _subcommand(argv))
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:  # a command group without its subcommand: a usage error, on stderr
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except (CLIError, ConfigError) as exc:
        print(f"sidemesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): nothing left to say to it; quiet, as a Unix tool on
        # SIGPIPE (and the exit at shutdown must not flush into the closed pipe again).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug: one line, not a traceback for the user to read
        if os.environ.get("SIDEMESH_DEBUG"):
            traceback.print_exc()
        elif logging.getLogger().handlers:  # a server (it set up its JSON log): the traceback there
            logging.getLogger("sidemesh").critical("internal error; exiting", exc_info=exc)
        where = "" if os.environ.get("SIDEMESH_DEBUG") else "; SIDEMESH_DEBUG=1 prints the traceback"
        print(
            f"sidemesh: internal error: {type(exc).__name__}: {exc}{where} (please report it)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
