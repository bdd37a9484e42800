"""What every benchmark shares: progress lines and a description of the machine and the code."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent


class Progress:
    """One line per phase, with the time since the start."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.started = time.monotonic()

    def phase(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total} {time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    @staticmethod
    def detail(text: str) -> None:
        print(f"{'':16}{text}", flush=True)


def write_results(
    out: Path, name: str, report: dict[str, Any], markdown: Callable[[Path, Any], None]
) -> Path:
    """``name``.json (the report) and ``name``.md (``markdown`` writes it) into ``out``; the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown(out / f"{name}.md", report)
    return out / f"{name}.md"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, object]:
    """This machine and this checkout, as every report describes them."""
    load: list[float] = []
    with contextlib.suppress(OSError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "load_average": load,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
