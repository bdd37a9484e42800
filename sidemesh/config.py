"""One config object per component, loaded in one place from flags and environment.

A component declares a frozen dataclass whose fields use :func:`option`; :func:`add_arguments`
turns it into command-line flags (help text shows default and environment variable) and
:func:`load` builds the object, flag over environment over default. A bad value fails at start
with :class:`ConfigError`, which names the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# ASCII digits only (\d and float() take any script's digits, and float() takes "1_000" and "inf").
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION_RE = re.compile(r"^(?:([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d))+$")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"--{option.replace('_', '-')}: {message}")
        self.option = option


def option(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A command's option (``metavar``: what its value looks like in --help, when the option's
    name and type do not say it; see :func:`_metavar`)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "env": env, "choices": choices, "metavar": metavar}
    )


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level_option() -> Any:
    """The log level every component takes, the same way."""
    return option("info", "log level", env="SIDEMESH_LOG_LEVEL", choices=LOG_LEVELS)


# The end of every server's --help: the tracing variables (not options: the OpenTelemetry SDK's own
# names, as every OTLP-instrumented program reads them; docs/observability.md has them all).
TRACING_EPILOG = """\
tracing (environment, as the OpenTelemetry SDK reads it; unset: off):
  OTEL_EXPORTER_OTLP_ENDPOINT      collector, e.g. http://jaeger.sidemesh-system.svc:4318 (the addon)
  OTEL_EXPORTER_OTLP_PROTOCOL      http/protobuf (port 4318) or grpc (4317)
  OTEL_TRACES_SAMPLER(_ARG)        e.g. parentbased_traceidratio and 0.01
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
"""


def trust_domain_option() -> Any:
    """The SPIFFE trust domain every component takes, the same way."""
    return option("cluster.local", "SPIFFE trust domain", env="SIDEMESH_TRUST_DOMAIN")


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``5m``, ``1h30m``, ``250ms``, ``2d``; a bare number means seconds."""
    text = text.strip(" \t")
    try:
        if _NUMBER_RE.fullmatch(text):
            return dt.timedelta(seconds=float(text))
        if _DURATION_RE.match(text):
            return dt.timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION_PART_RE.findall(text)))
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None
    raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 1h30m, 250ms)")


def duration_arg(minimum: dt.timedelta | None = None) -> Callable[[str], dt.timedelta]:
    """An argparse ``type`` for a duration: argparse shows the reason (``'1y' is not a duration
    ...``) instead of ``invalid parse_duration value``; ``minimum`` refuses values below it."""

    def parse(text: str) -> dt.timedelta:
        try:
            value = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; units: ms, s, m, h, d") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is shorter than {format_duration(minimum)} (a bare number is seconds)"
            )
        return value

    parse.__name__ = "duration"
    return parse


def format_duration(value: dt.timedelta) -> str:
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"  # (not "0.0s")
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds}s"


def _convert(kind: Any, text: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if text == "" else _convert(inner[0], text)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_convert(item, part.strip()) for part in text.split(",") if part.strip())
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if kind is dt.timedelta:
        return parse_duration(text)
    if kind is Path:
        return Path(text)
    if kind is str:
        return text
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{text!r} is not {what}") from None
    raise TypeError(f"unsupported option type {kind}")


def _show(value: Any) -> str:
    if isinstance(value, dt.timedelta):
        return format_duration(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        extra = f" [env {meta['env']}]" if meta.get("env") else ""
        default = _show(f.default) if f.default is not dataclasses.MISSING else ""
        help_text = f"{meta.get('help', '')} (default: {default or 'unset'}){extra}"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            choices=meta.get("choices"),
            metavar=None
            if meta.get("choices")
            else meta.get("metavar") or metavar_for(f.name, hints[f.name]),
            help=help_text.replace("%", "%%"),
        )


# What a value looks like, by the option's name where its type cannot say (every address option
# ends in _listen or _address; the identities are NAMESPACE/SERVICEACCOUNT). The same names in
# every command: the servers' options (add_arguments) and the others' (sidemesh.cli fills them in).
_METAVARS = {
    "ca": "HOST:PORT",
    "token": "TOKEN",
    "sequence": "N",
    "port": "PORT",
    "interval": "DURATION",
    "timeout": "DURATION",
    "trust_domain": "DOMAIN",
    "identity": "NAMESPACE/SERVICEACCOUNT",
    "workload": "NAMESPACE/NAME",
    "service_account": "NAME",
    "kubeconfig": "FILE",
    "controller": "HOST:PORT",
    "listen": "HOST:PORT",
    "server_name": "DNS_NAME",
    "controller_name": "DNS_NAME",
    "app_host": "HOST",
    "outbound": "LISTEN=SERVICE:PORT,...",
    "dns_names": "DNS_NAME,...",
    "control_plane_dns": "NAMESPACE/SERVICEACCOUNT=DNS_NAME,...",
    "status_from": "CIDR,...",
    "app_probes": "JSON",
    "app_metrics": "JSON",
    "webhook_configuration": "NAME",
}


def metavar_for(name: str, kind: Any) -> str | None:
    """``--max-connections N``, ``--config-dir DIR``, ``--access-log {true,false}``: what an option
    takes, by its name and its type (a dataclass field's, or an argparse ``type``); None: argparse's
    own, the name in capitals."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if name in _METAVARS:
        return _METAVARS[name]
    if kind is dt.timedelta or getattr(kind, "__name__", "") == "duration":  # (duration_arg)
        return "DURATION"
    if kind is bool:
        return "{true,false}"  # (yes/no, on/off and 1/0 too)
    if kind is int:
        return "N"
    if kind is float:
        return "NUMBER"
    if name.endswith(("_listen", "_address")):
        return "HOST:PORT"
    if name == "dir" or name.endswith("_dir"):
        return "DIR"
    if kind is Path or name.endswith(("_file", "_cert", "_key")):
        return "FILE"
    if typing.get_origin(kind) is tuple:
        return "VALUE,..."
    return None


def load(
    cls: type[T], args: argparse.Namespace | None = None, environ: typing.Mapping[str, str] | None = None
) -> T:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, f.name, None) if args is not None else None
        env = f.metadata.get("env")
        source = ""
        if raw is None and env and env in environ:
            raw, source = environ[env], f" (from {env})"  # the user set a variable, not the flag
        if raw is None:
            continue
        choices = f.metadata.get("choices")
        if choices and raw not in choices:
            raise ConfigError(f.name, f"{raw!r}{source} is not one of {', '.join(choices)}")
        try:
            values[f.name] = _convert(hints[f.name], raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f.name, f"{exc}{source}") from exc
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError("config", str(exc)) from exc


def parse_hostport(option_name: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(option_name, f"{text!r} is not HOST:PORT")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(option_name, f"{text!r}: port {port} is not 0-65535")
    return host.strip("[]") or "0.0.0.0", int(port)


_WILDCARDS = ("0.0.0.0", "::", "")


def check_distinct_listens(listens: list[tuple[str, str]]) -> None:
    """A command's own listen addresses (option name, HOST:PORT; empty: off) must not overlap: the
    same port on the same address, or on a wildcard address and another (else the second bind
    failed as if another process held the port, or both took the same connections)."""
    seen: list[tuple[str, str, int]] = []
    for name, text in listens:
        if not text:
            continue
        host, port = parse_hostport(name, text)
        if port == 0:
            continue
        for other, other_host, other_port in seen:
            if port == other_port and (host == other_host or host in _WILDCARDS or other_host in _WILDCARDS):
                shown = f"[{other_host}]" if ":" in other_host else other_host
                raise ConfigError(
                    name,
                    f"{text!r} overlaps --{other.replace('_', '-')} ({shown}:{other_port}): give each its own port",
                )
        seen.append((name, host, port))


def parse_dial_address(option_name: str, text: str) -> tuple[str, int]:
    """HOST:PORT of a server to connect to: a port of 0 is for listening only (the dial would
    fail, and be retried, for good)."""
    host, port = parse_hostport(option_name, text)
    if port == 0:
        raise ConfigError(option_name, f"{text!r}: port 0 cannot be connected to (give the server's port)")
    return host, port


def check_trust_domain(trust_domain: str) -> None:
    """A SPIFFE trust domain (``cluster.local``), as every component takes it."""
    from sidemesh.spiffe import SpiffeIdError, validate_trust_domain

    try:
        validate_trust_domain(trust_domain)
    except SpiffeIdError as exc:
        hint = " (give it without spiffe://, e.g. cluster.local)" if "://" in trust_domain else ""
        raise ConfigError("trust_domain", f"{exc}{hint}") from exc


def url_port(url: str) -> int | None:
    """The port a URL names, or None (none given, or not a port: ``otlp_endpoint_problem`` says so)."""
    try:
        return urllib.parse.urlsplit(url).port
    except ValueError:
        return None


def otlp_endpoint_problem(url: str, *, path_appended: bool) -> str | None:
    """Why ``url`` cannot be an OTLP endpoint (the exporters' specification: a URL with a scheme and
    a host), or None. ``path_appended``: the generic variable, to which ``/v1/traces`` is appended,
    so a query or fragment would end up before it. Such endpoints passed and every span was lost."""
    if any(c.isspace() for c in url):
        return "has whitespace in it"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # (an unbalanced bracket: "Invalid IPv6 URL")
        return "is not a URL (an IPv6 address goes in brackets: http://[fd00::1]:4318)"
    if parts.scheme not in ("http", "https") or not url.partition("://")[1]:
        return "needs a scheme: http://HOST:PORT or https://HOST:PORT"
    if not parts.hostname:
        return "has no host: http://HOST:PORT"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has no valid port after the host (1-65535; an IPv6 address goes in brackets: http://[fd00::1]:4318)"
    if path_appended and (parts.query or parts.fragment):
        return (
            "has a query or fragment, and /v1/traces is appended to its path: give the collector's base URL"
        )
    return None


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An excluded network as iptables can match it (host bits cleared). Refused, with the fix: an
    IPv6 address with a zone (``fe80::1%eth0``: no rule can name it), and an IPv4-mapped IPv6
    network (``::ffff:10.0.0.0/104``: such traffic leaves as IPv4, an ip6tables rule never matches
    it). Both passed and were silently of no effect, or failed proxy init with iptables' error."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a CIDR (examples: 10.0.0.0/8, 169.254.169.254/32, fd00::/8)"
        ) from None
    if isinstance(net, ipaddress.IPv6Network):
        if "%" in text:
            raise ValueError(f"{text!r}: an address with a zone (%...) cannot be matched; leave the zone out")
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            v4 = ipaddress.IPv4Network((mapped, max(net.prefixlen - 96, 0)), strict=False)
            raise ValueError(f"{text!r} is an IPv4-mapped IPv6 network, which leaves as IPv4: write {v4}")
    return net
