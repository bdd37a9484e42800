"""`make bench`: every component's benchmark, one after the other, then the report.

    .venv/bin/python -m bench.all [--only NAME ...] [--skip NAME ...] [--dry-run]

Runs ``bench.ca_sign``, ``bench.admission``, ``bench.controller``, ``bench.l4``, ``bench.http`` and
``bench.tracing`` (each of the last two when its module exists), each as its own process with its
own progress lines, then ``bench.report``. A benchmark that fails does not stop the others; the report is written from
whatever results are in ``bench/results/`` (older files stay until replaced), and the exit status
is 1 if any benchmark failed. ``bench/results/run.json`` records what ran, for how long, and the
load average before and after each (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO_DIR, Progress, machine

BENCH_DIR = REPO_DIR / "bench"
# name, what it measures, roughly how long it takes on a quiet 2-core machine
BENCHMARKS = (
    ("ca_sign", "CA signings/s end to end (issue 2)", "1 min"),
    ("admission", "injector admissions/s and p99 (issue 5)", "1 min"),
    (
        "controller",
        "controller at 10,000 pods / 1,000 sidecars (issue 4)",
        "3-10 min, waits for a quiet machine",
    ),
    ("l4", "L4 data path: direct, Sidemesh pair, Envoy pair (issue 3)", "3-6 min, waits for a quiet machine"),
    ("http", "HTTP data path: direct, Sidemesh pair, Envoy pair (issue 6)", "a few min"),
    ("tracing", "tracing cost: the pair with tracing off, at 1% and at 100% (issue 7)", "2 min"),
)


def available(bench_dir: Path = BENCH_DIR) -> list[str]:
    """The benchmarks whose module exists here (bench/http.py comes with issue 6)."""
    return [name for name, _, _ in BENCHMARKS if (bench_dir / f"{name}.py").exists()]


def plan(names: Sequence[str], only: Sequence[str], skip: Sequence[str]) -> list[str]:
    known = {name for name, _, _ in BENCHMARKS}
    for name in [*only, *skip]:
        if name not in known:
            raise SystemExit(f"bench.all: unknown benchmark {name!r} (known: {', '.join(sorted(known))})")
    return [n for n in names if (not only or n in only) and n not in skip]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this benchmark (repeatable)"
    )
    p.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="leave this benchmark out (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    args = p.parse_args(argv)
    names = plan(available(), args.only, args.skip)
    missing = [n for n, _, _ in BENCHMARKS if n not in available()]
    about = {name: (what, how_long) for name, what, how_long in BENCHMARKS}
    progress = Progress(len(names) + 1)
    if missing:
        progress.detail(f"not here yet, skipped: {', '.join(f'bench/{n}.py' for n in missing)}")
    if args.dry_run:
        for name in names:
            print(f"would run: python -m bench.{name}  ({about[name][0]}; about {about[name][1]})")
        print("would run: python -m bench.report")
        return 0
    runs: list[dict[str, Any]] = []
    here = machine()  # at the start: its date is when the run began
    for name in names:
        progress.phase(f"bench.{name}: {about[name][0]} (about {about[name][1]})")
        start, load = time.monotonic(), _load()
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=REPO_DIR, check=False).returncode
        runs.append(
            {
                "bench": name,
                "exit": rc,
                "seconds": round(time.monotonic() - start, 1),
                "load_before": load,
                "load_after": _load(),
            }
        )
        progress.detail(
            f"bench.{name} {'done' if rc == 0 else f'FAILED (exit {rc})'} in {runs[-1]['seconds']:.0f} s"
        )
    (BENCH_DIR / "results" / "run.json").write_text(
        json.dumps({"machine": here, "runs": runs}, indent=2) + "\n"
    )
    progress.phase("bench.report: REPORT.md, plots, the README's table")
    report = subprocess.run([sys.executable, "-m", "bench.report"], cwd=REPO_DIR, check=False).returncode
    failed = [r["bench"] for r in runs if r["exit"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (their previous results, if any, are still in the report)")
    return 1 if failed or report != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
