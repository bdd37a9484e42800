"""The report's figures: a row per measured quantity (Sidemesh, direct, Envoy), its ratios, and the
issue's target it is judged against. Pure values, no I/O; `bench.readers` builds them from the
results files and `bench.report` writes them out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
SHOWN_OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}
NEAR = 0.05  # a target met by less than this (relative) is marked so: runs of the same code differ by about as much


class ReportError(Exception):
    """A results file that cannot be read as expected; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Target:
    """`sidemesh <op> value` (against="value"), or `sidemesh / envoy <op> value` (against="envoy"),
    or the same against the direct path."""

    against: str
    op: str
    value: float
    issue: int | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if self.against not in ("value", "envoy", "direct") or self.op not in OPS:
            raise ValueError(f"bad target: {self.against} {self.op} {self.value}")

    def text(self) -> str:
        op = SHOWN_OPS[self.op]
        if self.against == "value":
            sep = "" if self.unit.startswith(("/", "×")) else " "
            what = f"{op} {number(self.value)}{sep + self.unit if self.unit else ''}"
        else:
            what = f"{op} {number(self.value)}× {'Envoy' if self.against == 'envoy' else 'direct'}"
        return f"{what} (#{self.issue})" if self.issue else what


@dataclass(frozen=True, slots=True)
class Row:
    bench: str
    key: str
    label: str
    unit: str
    sidemesh: float | None
    direct: float | None = None
    envoy: float | None = None
    target: Target | None = None

    @property
    def over_direct(self) -> float | None:
        return ratio(self.sidemesh, self.direct)

    @property
    def over_envoy(self) -> float | None:
        return ratio(self.sidemesh, self.envoy)

    @property
    def judged(self) -> float | None:
        """The figure the target is about (the value or its ratio); None without either."""
        t = self.target
        if t is None:
            return None
        return {"value": self.sidemesh, "envoy": self.over_envoy, "direct": self.over_direct}[t.against]

    @property
    def met(self) -> bool | None:
        """True / False against the target; None without a target or without the figure."""
        t, value = self.target, self.judged
        return None if t is None or value is None else OPS[t.op](value, t.value)

    @property
    def near(self) -> bool:
        """Met by less than ``NEAR`` of the target: inside what two runs of the same code differ by
        on this machine (a few percent), so one run does not settle it."""
        t, value = self.target, self.judged
        return (
            bool(self.met) and t is not None and value is not None and abs(value - t.value) < NEAR * t.value
        )


@dataclass(frozen=True, slots=True)
class Source:
    """One benchmark's results file: when and on what it was measured."""

    bench: str
    file: str
    title: str
    date: str
    commit: str
    machine: str
    load: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    rows: tuple[Row, ...]
    sources: tuple[Source, ...]
    missing: tuple[str, ...]
    reliability: tuple[tuple[str, bool | None], ...] = ()
    runs: tuple[str, ...] = ()  # the last `make bench`, from run.json
    problems: tuple[str, ...] = ()  # results files that are there but could not be read


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    v = abs(value)
    if v >= 100:
        return f"{value:,.0f}"
    if v >= 10:
        return f"{value:.1f}"
    if v >= 1 or v == 0:
        return f"{value:.2f}"
    return f"{value:.3f}"


def number(value: float) -> str:
    """A target's number as the issue writes it: 2,000, 0.8, 40."""
    return f"{int(value):,}" if value == int(value) else f"{value:g}"


# -- targets, from the issues ------------------------------------------------------------------

TARGETS: dict[tuple[str, str], Target] = {
    ("ca", "signings_per_s"): Target("value", ">=", 2000, 2, "/s"),
    ("admission", "per_second"): Target("value", ">=", 500, 5, "/s"),
    ("admission", "p99_ms"): Target("value", "<", 10, 5, "ms"),
    ("controller", "compile_s"): Target("value", "<", 2, 4, "s"),
    ("controller", "policy_p99_s"): Target("value", "<=", 1, 4, "s"),
    ("controller", "rss_peak_mb"): Target("value", "<", 1000, 4, "MB"),
    ("l4", "p50_c1"): Target("envoy", "<=", 1.3, 3),
    ("l4", "rps_c16"): Target("envoy", ">=", 0.8, 3),
    ("l4", "bulk_mb_s"): Target("envoy", ">=", 0.6, 3),
    ("l4", "rss_client_mb"): Target("value", "<", 40, 3, "MB"),
    ("l4", "rss_server_mb"): Target("value", "<", 40, 3, "MB"),
    ("http", "rps_c16"): Target("envoy", ">=", 1.0, 6),
    ("http", "p50_c1"): Target("envoy", "<=", 1.0, 6),
    ("http", "grpc_c4m8"): Target("envoy", ">=", 0.8, 6),
    ("tracing", "ratio_1pct"): Target("value", ">=", 0.95, 7, "×"),
}

_TARGET_TEXT = re.compile(
    r"^\s*(≥|>=|≤|<=|<|>)\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*(?:(×|x)\s*(envoy|direct)|([^\s(]*))", re.I
)


def parse_target(text: str, unit: str = "") -> Target | None:
    """A target as the benchmarks write it ("≥ 0.8× Envoy", "< 40 MB"); None if it is not one."""
    found = _TARGET_TEXT.match(text)
    if not found:
        return None
    op = {"≥": ">=", "≤": "<="}.get(found[1], found[1])
    value = float(found[2].replace(",", ""))
    if found[3]:
        return Target(found[4].lower(), op, value)
    return Target("value", op, value, unit=found[5] or unit)
