"""The report's two plots, from its rows: latency percentiles and throughput, direct / Sidemesh / Envoy.

matplotlib with the Agg backend (no display needed). One panel per data-path benchmark that has
the figures (L4, and HTTP once ``bench/results/http.json`` exists); a figure missing from a run is
left out of its panel rather than drawn as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bench.report import Row

PATHS = (("direct", "#9e9e9e"), ("Sidemesh", "#1f77b4"), ("Envoy", "#ff7f0e"))
LATENCY = (
    ("p50_c1", "p50\n1 conn"),
    ("p99_c1", "p99\n1 conn"),
    ("p50_c16", "p50\n16 conn"),
    ("p99_c16", "p99\n16 conn"),
)
Keys = tuple[tuple[str, str], ...]
REQUESTS: Keys = (
    ("rps_c1", "1 conn"),
    ("rps_c16", "16 conn"),
    ("grpc_c1", "gRPC unary\n1 conn"),
    ("grpc_c4m8", "gRPC unary\n4 conn x 8"),
)
BULK: Keys = (("bulk_mb_s", "one connection"),)


def _values(row: Row) -> tuple[float | None, float | None, float | None]:
    return row.direct, row.sidemesh, row.envoy


def _bars(
    ax: Axes, rows: dict[str, Row], keys: Sequence[tuple[str, str]], title: str, unit: str, log: bool
) -> None:
    present = [(key, label) for key, label in keys if key in rows]
    width = 0.8 / len(PATHS)
    for i, (name, colour) in enumerate(PATHS):
        xs, ys = [], []
        for x, (key, _label) in enumerate(present):
            value = _values(rows[key])[i]
            if value is not None and value > 0:
                xs.append(x + (i - 1) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=name, color=colour)
        ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(present)), [label for _key, label in present])
    ax.set_title(title)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)


def _short(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _suites(rows: Sequence[Row]) -> dict[str, dict[str, Row]]:
    suites: dict[str, dict[str, Row]] = {}
    for row in rows:
        if row.bench in ("l4", "http"):
            suites.setdefault(row.bench, {})[row.key] = row
    return suites


def draw(rows: Sequence[Row], out: Path) -> list[Path]:
    """Write latency.png and throughput.png into `out` (those it has figures for); their paths."""
    suites = _suites(rows)
    written = []
    with_latency = {b: r for b, r in suites.items() if any(k in r for k, _ in LATENCY)}
    if with_latency:
        fig, axes = plt.subplots(1, len(with_latency), figsize=(6 * len(with_latency), 4), squeeze=False)
        for ax, (bench, r) in zip(axes[0], with_latency.items(), strict=True):
            _bars(ax, r, LATENCY, f"{bench.upper()} latency (lower is better)", "ms (log scale)", log=True)
        written.append(_save(fig, out / "latency.png"))
    panels = [
        (b, REQUESTS, "requests/s", "requests (gRPC: calls)/s")
        for b, r in suites.items()
        if any(k in r for k, _ in REQUESTS)
    ]
    panels += [(b, BULK, "bulk transfer", "MB/s") for b, r in suites.items() if any(k in r for k, _ in BULK)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
        for ax, (bench, keys, what, unit) in zip(axes[0], panels, strict=True):
            _bars(ax, suites[bench], keys, f"{bench.upper()} {what} (higher is better)", unit, log=False)
        written.append(_save(fig, out / "throughput.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
