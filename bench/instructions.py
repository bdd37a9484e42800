"""Machine instructions each sidecar of the HTTP pair runs per request (user space): a figure for
comparing two versions of the data path that does not move with the machine's speed, and that
counts what bytecodes do not.

    .venv/bin/python -m bench.instructions [--requests N] [--out DIR]

``bench.bytecodes`` counts the interpreter's opcodes; what an opcode costs varies a hundredfold.
Building an object (a dataclass called by keyword costs about three times one called by position),
formatting a string, a C library's callback into Python: these move CPU per request without
moving the bytecodes (on 2026-12-08 a sidecar's instructions per request fell 16-20% while its
bytecodes fell 4-5%). Time-based figures move by a third between runs on this shared machine.

The setup is ``bench.http``'s (CA, upstream, the Sidemesh pair in HTTP mode); one sidecar at a time
runs under valgrind's callgrind with instrumentation off, switched on (``callgrind_control``) for
``--requests`` requests over 16 keep-alive connections after a warm-up, then off: the figure is
that window's instructions over its requests (the kernel's work is not counted, nor are other
processes'; a sidecar's timers and background tasks in the window are, a few percent). Under
callgrind a sidecar runs about fifty times slower. Also reported, inclusive per request: llhttp's
parsing with its callbacks into Python (``feed_data``), objects built by calling a class
(``type_call``), and OpenSSL's reads and writes. Needs valgrind (``apt-get install valgrind``).
Writes ``instructions.md`` and ``instructions.json`` into ``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
Result = dict[str, Any]
CONNECTIONS = 16
WARM_REQUESTS = 320
# Inclusive costs reported beside the total: (label, a pattern callgrind_annotate's line matches)
PARTS = (
    ("llhttp parsing and its callbacks into Python (feed_data)", r"HttpParser_\d+feed_data \["),
    ("objects built by calling a class (type_call)", r"typeobject\.c:type_call \["),
    ("OpenSSL writes (SSLObject.write)", r"_ssl__SSLSocket_write \["),
    ("OpenSSL reads (SSLObject.read)", r"_ssl__SSLSocket_read \["),
)
_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$")


def program_total(annotated: str) -> int:
    """The ``PROGRAM TOTALS`` of ``callgrind_annotate``'s output."""
    for line in annotated.splitlines():
        m = _LINE.match(line)
        if m and m.group(2).startswith("PROGRAM TOTALS"):
            return int(m.group(1).replace(",", ""))
    raise ValueError("callgrind_annotate printed no PROGRAM TOTALS")


def inclusive(annotated: str, pattern: str) -> int:
    """The largest inclusive count of a function whose line matches ``pattern`` (0: none)."""
    found = 0
    for line in annotated.splitlines():
        m = _LINE.match(line)
        if m and re.search(pattern, m.group(2)):
            found = max(found, int(m.group(1).replace(",", "")))
    return found


async def drive(host: str, port: int, requests: int, connections: int = CONNECTIONS) -> None:
    """``requests`` GETs over ``connections`` keep-alive connections, one at a time on each; every
    response must be a 200 with a two-byte body (``bench.l4_upstream``'s)."""
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(count):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 ") or b"\r\ncontent-length: 2\r\n" not in head.lower():
                    raise RuntimeError(f"unexpected response head {head[:200]!r}")
                await reader.readexactly(2)
        finally:
            writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.gather(*(one(share + (i < extra)) for i in range(connections)))


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def measure(role: str, requests: int, tmp: Path, progress: Any) -> Result:
    """Instructions per request of the ``role`` sidecar (``client`` or ``server``)."""
    from bench import l4

    out = tmp / f"callgrind-{role}.out"
    python = [*l4.SIDECAR_PYTHON, "-m", "sidemesh"]
    wrapped = [*python[:-3], "valgrind", "--tool=callgrind", "--instr-atstart=no"]
    wrapped += [f"--callgrind-out-file={out}", *python[-3:]]

    class Processes(l4.Processes):
        def start(self, name: str, cmd: Sequence[str], core: int | None) -> l4.Proc:
            if name == f"sidemesh-{role}" and list(cmd[: len(python)]) == python:
                cmd = [*wrapped, *cmd[len(python) :]]
            return super().start(name, cmd, core)

    ps = Processes(tmp / role, None)
    (tmp / role).mkdir()
    setup = l4.Setup(f"127.{random.randint(2, 250)}.{random.randint(1, 250)}", tmp / role)
    try:
        progress.phase(f"{role} sidecar under callgrind: CA, upstream, the pair (a minute or two)")
        bundle = l4.start_ca(ps, setup)
        l4.start_upstream(ps, setup, None)
        l4.start_sidemesh(ps, setup, bundle, None, python, opaque=False, ready_timeout=600.0)
        host, port = setup.entry["sidemesh"]
        asyncio.run(drive(host, port, WARM_REQUESTS))
        pid = str(setup.sidemesh[role].pid)
        progress.phase(f"{role} sidecar: {requests:,} requests counted, {CONNECTIONS} connections")
        _control("-z", pid)
        _control("-i", "on", pid)
        asyncio.run(drive(host, port, requests))
        _control("-i", "off", pid)
        _control("-d", pid)
    finally:
        ps.stop_all()
    dumps = sorted(tmp.glob(f"callgrind-{role}.out.*"))
    if not dumps:
        raise SystemExit(f"bench.instructions: callgrind wrote no dump for the {role} sidecar")
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dumps[-1])],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    total = program_total(annotated)
    return {
        "requests": requests,
        "instructions_per_request": total / requests,
        "parts": {label: inclusive(annotated, pattern) / requests for label, pattern in PARTS},
    }


def write_markdown(path: Path, report: Result) -> None:
    roles = report["sidecars"]
    lines = [
        "# Machine instructions per request, each sidecar of the HTTP pair",
        "",
        f"Generated by `python -m bench.instructions` on {report['generated']} (commit {report['commit']}), "
        f"{report['cpu']}; one sidecar at a time under valgrind's callgrind, counted over "
        f"{report['requests']:,} requests at {CONNECTIONS} keep-alive connections after {WARM_REQUESTS} "
        "uncounted (user space only: the kernel's work is not counted).",
        "",
        "| | client sidecar | server sidecar |",
        "|---|---:|---:|",
        "| instructions per request | "
        + " | ".join(f"{roles[r]['instructions_per_request']:,.0f}" for r in ("client", "server"))
        + " |",
    ]
    for label, _ in PARTS:
        lines.append(
            f"| of which (inclusive) {label} | "
            + " | ".join(f"{roles[r]['parts'][label]:,.0f}" for r in ("client", "server"))
            + " |"
        )
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Machine instructions each sidecar of the HTTP pair runs per request (callgrind): "
        "a figure for comparing two versions of the data path that does not move with the machine's speed.",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=3200,
        help="requests counted per sidecar (default 3200, about 20 s each)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where instructions.md and .json go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.requests < CONNECTIONS:
        raise SystemExit(f"bench.instructions: error: --requests must be at least {CONNECTIONS}")
    missing = [t for t in ("valgrind", "callgrind_control", "callgrind_annotate") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench.instructions: {', '.join(missing)} not found (apt-get install valgrind)")
    from bench.common import Progress, cpu_model, git_commit, write_results

    progress = Progress(5)
    report: Result = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "requests": args.requests,
        "sidecars": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp_name:
        for role in ("client", "server"):
            report["sidecars"][role] = measure(role, args.requests, Path(tmp_name), progress)
    progress.phase(f"written: {write_results(args.out, 'instructions', report, write_markdown)}")
    for role, figures in report["sidecars"].items():
        Progress.detail(
            f"{role} sidecar: {figures['instructions_per_request']:,.0f} instructions per request"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
