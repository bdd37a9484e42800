"""Delivery settings from annotations: timeouts, retries, opaque ports (no I/O).

On a Service: ``sidemesh.io/timeout`` (``2s``, ``500ms``, ``1m30s``; ``0s`` = none),
``sidemesh.io/retries`` (0..10), ``sidemesh.io/retry-non-idempotent`` (``true``/``false``),
``sidemesh.io/opaque-ports`` (service ports, comma-separated). On a pod (or local-mode Workload):
``sidemesh.io/opaque-ports`` (its container ports, for its own sidecar's inbound side and for
clients addressing the pod directly). Without the annotation, ``DEFAULT_OPAQUE_PORTS`` apply (the
server-speaks-first protocols of Linkerd's default list); an empty value means none.

An invalid value is reported (naming the object and the annotation) and that annotation alone is
ignored: the object keeps everything else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sidemesh.config import parse_duration

TIMEOUT = "sidemesh.io/timeout"
RETRIES = "sidemesh.io/retries"
RETRY_NON_IDEMPOTENT = "sidemesh.io/retry-non-idempotent"
OPAQUE_PORTS = "sidemesh.io/opaque-ports"
MAX_RETRIES = 10

# SMTP 25 and 587, MySQL 3306, Galera 4444, PostgreSQL 5432, Redis 6379, Elasticsearch 9300,
# Memcached 11211: the server speaks first, or detection would only add a delay (Linkerd's list).
DEFAULT_OPAQUE_PORTS: frozenset[int] = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a Service's annotations ask of the sidecars sending to it."""

    timeout_s: float | None = None
    retries: int = 0
    retry_non_idempotent: bool = False
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS


DEFAULT = Delivery()


def _shown(value: str) -> str:
    """A value as an error message quotes it: at most 64 characters (annotations may be huge)."""
    return repr(value) if len(value) <= 64 else f"{value[:64]!r}... ({len(value)} characters)"


def parse_timeout(value: str) -> float | None:
    try:
        seconds = parse_duration(value).total_seconds()
    except (ValueError, OverflowError):
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{_shown(value)} is not a duration (examples: 2s, 500ms, 1m30s; 0s for none)")
    if seconds < 0.001 and re.search(r"[1-9]", value):  # not a zero: it must not mean "no timeout"
        raise ValueError(f"{_shown(value)} is shorter than 1ms (0s: no timeout)")
    return seconds or None


def parse_retries(value: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_RETRIES:
        raise ValueError(f"{_shown(value)} is not a number of retries from 0 to {MAX_RETRIES}")
    return int(text)


def parse_bool(value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"{_shown(value)} is not true or false")
    return text == "true"


def parse_ports(value: str) -> frozenset[int]:
    ports = set()
    for part in value.split(","):
        text = part.strip()
        if not text:
            continue
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
            raise ValueError(f"{text!r} is not a port number (1-65535; ranges are not supported)")
        ports.add(int(text))
    return frozenset(ports)


def _field(
    annotations: dict[str, str],
    key: str,
    parse: Callable[[str], T],
    default: T,
    where: str,
    errors: list[str],
) -> T:
    if key not in annotations:
        return default
    try:
        return parse(annotations[key])
    except ValueError as exc:
        errors.append(f"{where}: annotation {key}: {exc}; annotation ignored")
        return default


def service_delivery(annotations: tuple[tuple[str, str], ...], where: str, errors: list[str]) -> Delivery:
    """The Service's delivery settings; each invalid annotation adds a line to ``errors``."""
    found = dict(annotations)
    if not any(k in found for k in (TIMEOUT, RETRIES, RETRY_NON_IDEMPOTENT, OPAQUE_PORTS)):
        return DEFAULT  # the common case: shared, no work
    return Delivery(
        _field(found, TIMEOUT, parse_timeout, DEFAULT.timeout_s, where, errors),
        _field(found, RETRIES, parse_retries, DEFAULT.retries, where, errors),
        _field(found, RETRY_NON_IDEMPOTENT, parse_bool, DEFAULT.retry_non_idempotent, where, errors),
        _field(found, OPAQUE_PORTS, parse_ports, DEFAULT.opaque_ports, where, errors),
    )


def opaque_ports(annotations: tuple[tuple[str, str], ...], where: str, errors: list[str]) -> frozenset[int]:
    """A pod's opaque ports (the default list without the annotation, or when it is invalid)."""
    return _field(dict(annotations), OPAQUE_PORTS, parse_ports, DEFAULT_OPAQUE_PORTS, where, errors)
