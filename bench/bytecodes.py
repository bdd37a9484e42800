"""Python bytecodes each sidecar of the HTTP pair executes per request: a figure for comparing two
versions of the data path that does not move with the machine's speed.

    .venv/bin/python -m bench.bytecodes [--seconds N] [--top N] [--out DIR]

Requests per second and CPU per request move by a third between runs on a shared machine (the
evening of 2026-12-06: tracing off measured 198-361 us per request within one run), so a change of
a few percent to the data path cannot be seen in them. The number of bytecodes the interpreter
runs per request hardly moves: in the HTTP pair most of a sidecar's CPU is the interpreter's
(perf, 16 connections: 57-60% of the samples in libpython, 23-25% in the kernel, the rest in
uvloop, OpenSSL and llhttp).

The setup is `bench.http`'s (CA, upstream, the Sidemesh pair in HTTP mode, same cores); each
sidecar runs under this module (``--sidecar``), which counts, between SIGUSR1 and SIGUSR2, every
opcode the interpreter runs (``sys.settrace`` with ``f_trace_opcodes``) by code object, and writes
the counts as JSON. Runs: wrk at 16 connections (HTTP/1.1), then, when h2load is installed,
gRPC unary calls one at a time (1 connection, 1 stream: with several streams at once, how many
frames a read brings moves the count per call by several percent from run to run); each a
warm-up, then the counted window. Counting slows a sidecar about fifteen times, so a window sees
hundreds to a few thousand requests. Each run has two counted windows, a short and a long one,
and the figure per request is the difference of their counts over the difference of their
requests: what both spent once (wrk's and h2load's new connections, their first requests) drops
out, where one window spread it over however many requests it happened to see (3-8% of a gRPC
call's count from run to run). C code (llhttp, OpenSSL, uvloop, the kernel) is not counted: a change that
moves work into C shows as fewer bytecodes. Writes ``bytecodes.md`` and ``bytecodes.json`` into
``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUT_ENV = "SIDEMESH_BYTECODES_DIR"  # where a counting sidecar writes its counts, as <pid>.json
Result = dict[str, Any]


class Counter:
    """Opcodes executed, by code object (``file:qualified name``), while started."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._keys: dict[object, str] = {}

    def _local(self, key: str) -> Any:
        counts = self.counts

        def local(frame: FrameType, event: str, arg: object) -> Any:
            if event == "opcode":
                counts[key] += 1
            return local

        return local

    def _global(self, frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = self._keys.get(code)
        if key is None:
            key = self._keys[code] = _label(frame)
        return self._local(key)

    def start(self) -> None:
        self.counts.clear()
        sys.settrace(self._global)  # (new frames, and generators and coroutines as they resume)

    def stop(self) -> dict[str, int]:
        sys.settrace(None)
        return dict(self.counts)


def _label(frame: FrameType) -> str:
    """``file:qualified name``; code made by exec (a dataclass's ``__init__``, a named tuple's
    ``__new__``: every one of them is ``<string>:__create_fn__.<locals>.__init__`` or
    ``<string>:<lambda>``) is named by the class it was made for, seen in its first call."""
    code = frame.f_code
    if code.co_filename.startswith("<"):
        owner = frame.f_locals.get("self", frame.f_locals.get("_cls"))
        if owner is not None:
            cls = owner if isinstance(owner, type) else type(owner)
            return f"{code.co_filename}:{cls.__module__}.{cls.__qualname__}.{code.co_name}"
    return f"{Path(code.co_filename).name}:{code.co_qualname}"


def sidecar_main(argv: Sequence[str]) -> int:
    """``sidemesh`` with ``argv``, counting between SIGUSR1 and SIGUSR2 (written to
    $SIDEMESH_BYTECODES_DIR/<pid>.json)."""
    counter = Counter()
    out = Path(os.environ[OUT_ENV]) / f"{os.getpid()}.json"

    def start(signum: int, frame: FrameType | None) -> None:
        counter.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        counts = counter.stop()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from sidemesh.cli import main

    sys.argv = ["sidemesh", *argv]
    return main()


def per_request(short: tuple[dict[str, int], int], long: tuple[dict[str, int], int], top: int) -> Result:
    """Bytecodes per request between a short and a long window (counts, requests): what each
    further request cost, without what both windows spent once (wrk's or h2load's new
    connections, the first request on them), which a single window spreads over however many
    requests it happened to see."""
    (a, n_a), (b, n_b) = short, long
    n = n_b - n_a
    if n <= 0:
        raise RuntimeError(f"the long window saw no more requests than the short one ({n_b} vs {n_a})")
    marginal = {name: (b.get(name, 0) - a.get(name, 0)) / n for name in set(a) | set(b)}
    ranked = sorted(marginal.items(), key=lambda kv: -kv[1])[:top]
    return {
        "requests": [n_a, n_b],
        "bytecodes_per_request": round(sum(marginal.values()), 1),
        "top": [[name, round(c, 1)] for name, c in ranked],
    }


def _counted(setup: Any, out_dir: Path, run: Any) -> tuple[dict[str, dict[str, int]], Result]:
    outs = {role: out_dir / f"{proc.pid}.json" for role, proc in setup.sidemesh.items()}
    for path in outs.values():
        path.unlink(missing_ok=True)
    for proc in setup.sidemesh.values():
        os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    try:
        result = run()
    finally:
        for proc in setup.sidemesh.values():
            os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in outs.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("a counting sidecar wrote no counts within 30 s")
        time.sleep(0.1)
    return {role: json.loads(p.read_text()) for role, p in outs.items()}, result


def _report(windows: list[tuple[dict[str, dict[str, int]], int]], top: int) -> Result:
    (short, n_short), (long, n_long) = windows
    return {role: per_request((short[role], n_short), (long[role], n_long), top) for role in long}


def write_markdown(path: Path, report: Result) -> None:
    lines = [
        "# Python bytecodes per request, each sidecar of the HTTP pair",
        "",
        f"Generated by `python -m bench.bytecodes` on {report['generated']} (commit {report['commit']}), "
        f"{report['cpu']}; two counted windows per run, of {report['seconds'][0]} s and {report['seconds'][1]} s, "
        "under `sys.settrace` (a sidecar runs about fifteen times slower while counted: the figures are counts, "
        "not speeds); per request: the difference between the windows' counts over the difference between "
        "their requests.",
        "",
        "| run | requests in the windows | client sidecar | server sidecar |",
        "|---|---:|---:|---:|",
    ]
    for name, run in report["runs"].items():
        c, s = run["client"], run["server"]
        lines.append(
            f"| {name} | {c['requests'][0]:,} / {c['requests'][1]:,} | {c['bytecodes_per_request']:,.0f} | "
            f"{s['bytecodes_per_request']:,.0f} |"
        )
    for name, run in report["runs"].items():
        for role in ("client", "server"):
            lines += ["", f"## {name}, {role} sidecar: the code objects that ran the most", ""]
            lines += ["| bytecodes per request | code |", "|---:|---|"]
            lines += [f"| {n:,.1f} | `{code}` |" for code, n in run[role]["top"]]
    lines.append("")
    path.write_text("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bytecodes",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument(
        "--seconds",
        type=int,
        default=9,
        help="the long counted window; the short one is a third of it (default 9)",
    )
    p.add_argument("--warmup", type=int, default=2, help="uncounted run before each window (default 2)")
    p.add_argument("--top", type=int, default=25, help="code objects listed per sidecar (default 25)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where bytecodes.md and .json go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--sidecar"]:
        return sidecar_main(args_list[1:])
    args = parse_args(args_list)
    if args.seconds < 2:
        raise SystemExit("bench.bytecodes: error: --seconds must be at least 2")
    short = args.seconds // 3 or 1
    # (here, not at the top: a counting sidecar imports none of the bench's modules)
    from bench import http as bhttp
    from bench import l4
    from bench.common import Progress, cpu_model, git_commit, write_results

    signal.signal(signal.SIGTERM, l4._interrupt)
    tools = l4.find_tools()
    if tools.wrk is None:
        raise SystemExit("bench.bytecodes: wrk not found (apt-get install wrk)")
    h2load = shutil.which("h2load")
    proxy_core, load_core, _layout = l4._cores(tools.taskset)
    progress = Progress(3 + (h2load is not None))
    report: Result = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "seconds": [short, args.seconds],
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-bytecodes-") as tmp_name:
        tmp = Path(tmp_name)
        ps = l4.Processes(tmp, tools.taskset)
        setup = l4.Setup(f"127.{random.randint(2, 250)}.{random.randint(1, 250)}", tmp)
        out_dir = tmp / "bytecodes"
        out_dir.mkdir()
        try:
            progress.phase("CA, upstream, the Sidemesh pair (counting sidecars)")
            bundle = l4.start_ca(ps, setup)
            l4.start_upstream(ps, setup, load_core)
            prefix = [sys.executable, "-m", "bench.bytecodes", "--sidecar"]
            os.environ[OUT_ENV] = str(out_dir)  # (the sidecars inherit it)
            try:
                l4.start_sidemesh(ps, setup, bundle, proxy_core, prefix, opaque=False)
            finally:
                os.environ.pop(OUT_ENV, None)
            l4.check_path(setup, "sidemesh")
            lua = tmp / "report.lua"
            lua.write_text(l4.WRK_LUA)
            runner = l4.Runner(ps, setup, tools, load_core, lua)
            progress.phase(
                f"wrk -c 16: {args.warmup} s warm-up, windows of {short} s and {args.seconds} s counted"
            )
            runner.wrk("sidemesh", 16, 2, args.warmup)
            windows = []
            for seconds in (short, args.seconds):
                counts, wrk = _counted(
                    setup, out_dir, functools.partial(runner.wrk, "sidemesh", 16, 2, seconds)
                )
                windows.append((counts, int(wrk["requests"])))
            report["runs"]["HTTP/1.1, wrk -c 16"] = _report(windows, args.top)
            if h2load is not None:
                progress.phase(
                    f"h2load gRPC -c 1 -m 1: {args.warmup} s warm-up, windows of {short} s and {args.seconds} s counted"
                )
                bhttp.start_grpc_upstream(ps, setup, load_core)
                body = tmp / "call.bin"
                body.write_bytes(b"\x00\x00\x00\x00\x05hello")
                bhttp.h2load(runner, h2load, "sidemesh", 1, 1, args.warmup, body)
                windows = []
                for seconds in (short, args.seconds):
                    run = functools.partial(bhttp.h2load, runner, h2load, "sidemesh", 1, 1, seconds, body)
                    counts, calls = _counted(setup, out_dir, run)
                    windows.append((counts, int(calls["done"])))
                report["runs"]["gRPC unary, h2load -c 1 -m 1"] = _report(windows, args.top)
            else:
                progress.detail("h2load not found (apt-get install nghttp2-client): no gRPC run")
        finally:
            ps.stop_all()
    progress.phase(f"written: {write_results(args.out, 'bytecodes', report, write_markdown)}")
    for name, run in report["runs"].items():
        Progress.detail(
            f"{name}: client {run['client']['bytecodes_per_request']:,.0f}, "
            f"server {run['server']['bytecodes_per_request']:,.0f} bytecodes per request"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
