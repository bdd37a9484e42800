"""The sidecar pair in HTTP mode, side by side with a direct connection and an Envoy pair in HTTP
mode, in one run (issue 6).

    .venv/bin/python -m bench.http [--seconds N] [--warmup N] [--grpc-seconds N] [--rounds N] [--profile]

The setup is `bench.l4`'s (same CA, SVIDs, loopback addresses, CPU layout: both proxies of the
pair under test on one core, the load and the upstream on the other), with two differences:

- Sidemesh: the same two ``sidemesh proxy run`` processes; port 8080 is not marked opaque, so the
  sidecars detect HTTP and proxy each request (HTTP/1.1 parsed on both sides, per-request policy,
  pooled mTLS connections between the sidecars).
- Envoy: ``http_connection_manager`` on both sides instead of ``tcp_proxy`` (router filter, one
  route, no timeout), ``--concurrency 1``; each upstream cluster speaks the protocol its downstream
  spoke (HTTP/1.1 for wrk, HTTP/2 for gRPC); same mTLS as in `bench.l4`.

Runs: wrk ``-c 1 -t 1`` and ``-c 16 -t 2`` against `bench.l4_upstream` (a warm-up run, then the
measured run); then the upstream is replaced by a grpcio server (`bench.http_grpc_upstream`) and
h2load sends unary calls (a 5-byte gRPC message; ``-c 1 -m 1`` and ``-c 4 -m 8``). Every window
runs ``--rounds`` times (3), the paths in a rotating order (direct, Sidemesh, Envoy; then Sidemesh,
Envoy, direct; ...), and each figure is the round with the median throughput: one run gave ratios a
few percent apart from the next, and a fixed order favoured whichever path ran on the cooler
machine. ``--profile`` then samples both proxies of each pair under one more wrk ``-c 16`` run:
perf (CPU by binary: the interpreter, the kernel, uvloop, OpenSSL; Envoy's pair too) and py-spy
(the sidecars' Python functions), when installed; not part of the figures. Writes
``bench/results/http.md`` and ``bench/results/http.json`` (py-spy's raw stacks in
``bench/results/http-py-spy-*.txt``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import random
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import l4
from bench.common import Progress, cpu_model, git_commit

RESULTS_DIR = Path(__file__).resolve().parent / "results"
Result = dict[str, Any]
# Targets of the issue, Sidemesh against Envoy (HTTP mode).
TARGET_RPS_C16 = 1.0
TARGET_P50_C1 = 1.0
TARGET_GRPC = 0.8
GRPC_RUNS = (("c1", 1, 1), ("c4m8", 4, 8))


def _hcm(stat_prefix: str, cluster: str) -> Result:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": "all",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }


_DOWNSTREAM_PROTOCOL = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
    }
}


def envoy_http_configs(setup: l4.Setup, bundle: Path) -> dict[str, Result]:
    """`bench.l4`'s Envoy pair with its tcp_proxy filters replaced by HTTP connection managers."""
    configs = l4.envoy_configs(setup, bundle)
    for role, config in configs.items():
        resources = config["static_resources"]
        for listener in resources["listeners"]:
            for chain in listener["filter_chains"]:
                chain["filters"] = [_hcm(role, resources["clusters"][0]["name"])]
        for cluster in resources["clusters"]:
            cluster["typed_extension_protocol_options"] = _DOWNSTREAM_PROTOCOL
    return configs


def start_envoy(ps: l4.Processes, setup: l4.Setup, envoy: str, bundle: Path, core: int | None) -> None:
    """As `bench.l4.start_envoy`, with the HTTP configurations."""
    for role, config in envoy_http_configs(setup, bundle).items():
        path = setup.tmp / f"envoy-{role}.json"
        path.write_text(json.dumps(config, indent=2))
        cmd = [
            envoy,
            "-c",
            str(path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ]
        setup.envoy[role] = ps.start(f"envoy-{role}", cmd, core)
    for role, host in (("server", 2), ("client", 1)):
        url = f"http://{setup.addr(host)}:{l4.ENVOY_ADMIN}/ready"
        l4._wait(setup.envoy[role], "ready", functools.partial(l4._http_ready, url, b"LIVE"))
    setup.entry["envoy"] = (setup.addr(1), l4.ENVOY_OUTBOUND)


def start_grpc_upstream(ps: l4.Processes, setup: l4.Setup, core: int | None) -> None:
    if setup.upstream is not None:
        ps.stop(setup.upstream)
    listen = f"{setup.addr(2)}:{l4.APP_PORT}"
    up = ps.start(
        "grpc-upstream", [sys.executable, "-m", "bench.http_grpc_upstream", "--listen", listen], core
    )
    l4._wait(up, "listening", lambda: True if "ready" in up.log.read_text() else None)
    setup.upstream = up


def h2load(
    runner: l4.Runner, h2load_bin: str, path: str, conns: int, streams: int, seconds: int, body: Path
) -> Result:
    host, port = runner.setup.entry[path]
    cmd = [
        h2load_bin,
        "-D",
        str(seconds),
        "--warm-up-time",
        "2",
        "-c",
        str(conns),
        "-m",
        str(streams),
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"http://{host}:{port}/bench.Echo/Unary",
    ]
    before = l4.CpuSnapshot.take(runner.pids())
    proc = runner.ps.start(f"h2load-{path}-c{conns}", cmd, runner.load_core)
    try:
        proc.popen.wait(timeout=seconds + 60)
    finally:
        runner.ps.stop(proc)
    after = l4.CpuSnapshot.take(runner.pids())
    text = proc.log.read_text(errors="replace")
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    counts = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text
    )
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m is None or counts is None:
        raise l4.BenchError(f"h2load failed:\n{text[-2000:]}")
    return {
        "calls_per_s": float(m.group(1)),
        "done": int(counts.group(2)),
        "succeeded": int(counts.group(3)),
        "failed": int(counts.group(4)),
        "errored": int(counts.group(5)),
        "latency_min_max_mean_sd": lat.groups() if lat else None,
        "cpu": after.since(before, runner.show(path)),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(report: Result) -> list[tuple[str, str, str, str, str, str]]:
    """(figure, direct, Sidemesh, Envoy, Sidemesh/Envoy, target)."""
    out = []
    r = report["results"]

    def get(path: str, *keys: str) -> float | None:
        v: Any = r.get(path)
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return float(v) if v is not None else None

    def fmt(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    for figure, keys, digits, target in (
        ("requests/s, 1 connection", ("c1", "rps"), 0, None),
        ("p50 ms, 1 connection", ("c1", "p50_us"), 3, f"<= {TARGET_P50_C1}x Envoy"),
        ("p99 ms, 1 connection", ("c1", "p99_us"), 3, None),
        ("requests/s, 16 connections", ("c16", "rps"), 0, f">= {TARGET_RPS_C16}x Envoy"),
        ("p50 ms, 16 connections", ("c16", "p50_us"), 3, None),
        ("p99 ms, 16 connections", ("c16", "p99_us"), 3, None),
        ("gRPC unary calls/s, 1 connection, 1 stream", ("grpc", "c1", "calls_per_s"), 0, None),
        (
            "gRPC unary calls/s, 4 connections x 8 streams",
            ("grpc", "c4m8", "calls_per_s"),
            0,
            f">= {TARGET_GRPC}x Envoy",
        ),
    ):
        scale = 1e-3 if keys[-1].endswith("_us") else 1.0
        values = {p: (lambda v: None if v is None else v * scale)(get(p, *keys)) for p in l4.PATHS}
        ratio = _ratio(values["sidemesh"], values["envoy"])
        out.append(
            (
                figure,
                fmt(values["direct"], digits),
                fmt(values["sidemesh"], digits),
                fmt(values["envoy"], digits),
                "-" if ratio is None else f"{ratio:.2f}x",
                target or "",
            )
        )
    return out


LOAD_BOUND = 0.9  # a proxied window at this share of the direct path's throughput or more


def load_bound_notes(results: Result, load_core: int | None) -> list[str]:
    """Windows whose figure says more about the load side (wrk or h2load, the upstream) than about the
    proxies: the load core saturated, or a proxied path as fast as the direct one, near enough. A
    ratio against such a figure is a bound (Sidemesh / Envoy is at most that when Envoy's is)."""
    notes = []
    direct = results.get("direct", {})
    for path in ("sidemesh", "envoy"):
        by = results.get(path, {})
        windows = [(f"wrk {run}", r, direct.get(run), "rps") for run, r in by.items() if run != "grpc"]
        windows += [
            (f"gRPC {run}", r, direct.get("grpc", {}).get(run), "calls_per_s")
            for run, r in by.get("grpc", {}).items()
        ]
        for name, r, base, key in windows:
            share = r[key] / base[key] if base and base.get(key) else None
            load_busy = r["cpu"]["cores"].get(str(load_core), 0.0) if load_core is not None else 0.0
            if (share is not None and share >= LOAD_BOUND) or load_busy >= l4.SATURATED:
                notes.append(
                    f"{name} {l4.LABELS[path]}: bounded by the load side (load core {load_busy:.0%} busy"
                    + (f", {share:.2f}x the direct path" if share is not None else "")
                    + "): a ratio against this figure is a bound, not a measure of the proxies."
                )
    return notes


def spread(report: Result) -> list[str]:
    """Every round's figure, where the run had more than one (older results have none)."""
    cfg = report.get("config", {})
    lines = []
    for path, by in report["results"].items():
        windows = [(f"wrk {run}", r, "req/s") for run, r in by.items() if run != "grpc"]
        windows += [(f"gRPC {run}", r, "calls/s") for run, r in by.get("grpc", {}).items()]
        for name, r, unit in windows:
            if len(r.get("rounds", ())) > 1:
                values = ", ".join(f"{v:,.0f}" for v in r["rounds"])
                lines.append(f"- {name}, {l4.LABELS[path]}: {values} {unit}")
    if not lines:
        return []
    return [
        "",
        f"## Rounds ({cfg.get('rounds', '?')}, interleaved; each figure above is the median round's)",
        "",
        *lines,
    ]


def write_markdown(path: Path, report: Result) -> None:
    lines = [
        "# HTTP data path: direct, Sidemesh pair (HTTP mode), Envoy pair (HTTP mode)",
        "",
        f"Generated by `python -m bench.http` on {report['when']} (commit {report['commit']}), "
        f"{report['cpu']}; {report['layout']}",
        "",
        "| figure | direct | Sidemesh pair | Envoy pair | Sidemesh / Envoy | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows(report)]
    lines += spread(report)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "CPU of the pair per window and error counters are in `http.json`.", ""]
    if report.get("profile"):
        lines += l4.profile_lines(report["profile"])
    path.write_text("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10, help="each measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up before each wrk run (default 3)")
    p.add_argument("--grpc-seconds", type=int, default=8, help="each h2load run (default 8)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of every window (paths in a rotating order); each figure is the round "
        "with the median requests (or calls) a second, the others kept in http.json (default 3)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where http.md and http.json go")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the wrk runs, sample both proxies of each pair under wrk -c 16 with perf (CPU by "
        "binary; needs perf) and the Sidemesh sidecars with py-spy (Python functions)",
    )
    l4.add_quiet_options(p)
    return p.parse_args(argv)


def wrk_windows(
    runner: l4.Runner,
    paths: Sequence[str],
    rounds: int,
    seconds: int,
    warmup: int,
    retries: int,
    progress: Progress,
    notes: list[str],
) -> dict[str, Result]:
    """wrk ``-c 1 -t 1`` and ``-c 16 -t 2`` through each path, ``rounds`` times with the paths in a
    rotating order: per path, the median round of each (``c1``, ``c16``); wrk's errors are noted."""
    results: dict[str, Result] = {path: {} for path in paths}
    for conns, threads in ((1, 1), (16, 2)):
        windows: dict[str, list[Result]] = {path: [] for path in paths}
        for n in range(rounds):
            for path in l4.interleaved(paths, n):
                progress.phase(f"wrk -c {conns}, round {n + 1}/{rounds}: {l4.LABELS[path]}")
                measure = functools.partial(runner.measure_wrk, path, conns, threads, seconds, warmup)
                windows[path].append(l4.undisturbed(measure, runner, retries, progress))
        for path in paths:
            results[path][f"c{conns}"] = l4.median_window(windows[path], "rps")
            if errors := {k: v for w in windows[path] for k, v in w["errors"].items() if v}:
                notes.append(f"c{conns} {l4.LABELS[path]}: wrk errors {errors}; that figure is not valid.")
    return results


def grpc_windows(
    runner: l4.Runner,
    h2load_bin: str,
    paths: Sequence[str],
    rounds: int,
    seconds: int,
    retries: int,
    tmp: Path,
    progress: Progress,
    notes: list[str],
) -> dict[str, Result]:
    """h2load's unary calls (``GRPC_RUNS``, a 5-byte message written under ``tmp``) through each
    path, ``rounds`` times with the paths in a rotating order: per path, the median round of each
    run, with every round's failed and errored calls summed (and noted)."""
    body = tmp / "call.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x05hello")  # one gRPC message frame
    results: dict[str, Result] = {path: {} for path in paths}
    for name, conns, streams in GRPC_RUNS:
        calls: dict[str, list[Result]] = {path: [] for path in paths}
        for n in range(rounds):
            for path in l4.interleaved(paths, n):
                progress.phase(f"h2load gRPC {name}, round {n + 1}/{rounds}: {l4.LABELS[path]}")
                measure = functools.partial(h2load, runner, h2load_bin, path, conns, streams, seconds, body)
                calls[path].append(l4.undisturbed(measure, runner, retries, progress))
        for path in paths:
            g = results[path][name] = l4.median_window(calls[path], "calls_per_s")
            g["failed"] = sum(w["failed"] for w in calls[path])
            g["errored"] = sum(w["errored"] for w in calls[path])
            if g["failed"] or g["errored"]:
                notes.append(
                    f"gRPC {name} {l4.LABELS[path]}: {g['failed']} failed, {g['errored']} errored calls "
                    "(h2load); that figure is not valid."
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM, SIGHUP (a `timeout`, a closed terminal): the processes are stopped as on Ctrl-C
    # (they were left running, pinned to the proxies' core, with the temporary directory).
    signal.signal(signal.SIGTERM, l4._interrupt)
    signal.signal(signal.SIGHUP, l4._interrupt)
    tools = l4.find_tools()
    h2load_bin = shutil.which("h2load")
    proxy_core, load_core, layout = l4._cores(tools.taskset)
    notes = list(tools.notes)
    if h2load_bin is None:
        notes.append("h2load not found (apt-get install nghttp2-client): the gRPC runs are skipped.")
    if args.rounds < 1:
        raise SystemExit("bench.http: error: --rounds must be at least 1")
    progress = Progress(
        1 + (2 * len(l4.PATHS) + len(GRPC_RUNS) * len(l4.PATHS)) * args.rounds + (1 if args.profile else 0)
    )
    profiled: Result | None = None
    results: Result = {p: {} for p in l4.PATHS}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp_name:
        tmp = Path(tmp_name)
        ps = l4.Processes(tmp, tools.taskset)
        setup = l4.Setup(f"127.{random.randint(2, 250)}.{random.randint(1, 250)}", tmp)
        try:
            progress.phase("CA, upstream, Sidemesh pair, Envoy pair")
            bundle = l4.start_ca(ps, setup)
            l4.start_upstream(ps, setup, load_core)
            l4.start_sidemesh(ps, setup, bundle, proxy_core, l4.sidecar_command("uvloop"), opaque=False)
            paths = ["direct", "sidemesh"]
            if tools.envoy is not None:
                l4.issue_svids(setup, bundle)
                start_envoy(ps, setup, tools.envoy, bundle, proxy_core)
                paths.append("envoy")
            for path in paths:
                l4.check_path(setup, path)
            lua = tmp / "report.lua"
            lua.write_text(l4.WRK_LUA)
            runner = l4.Runner(ps, setup, tools, load_core, lua)
            other = l4.wait_quiet(runner, args.wait_quiet, progress)
            if other > l4.OTHER_LOAD:
                notes.append(
                    f"Before the runs, {other:.0%} of a core was busy with processes not of this bench: "
                    "the figures may be low (see 'other' in each window, http.json)."
                )
            if tools.wrk is not None:
                runs = wrk_windows(
                    runner, paths, args.rounds, args.seconds, args.warmup, args.retries, progress, notes
                )
                for path, by_run in runs.items():
                    results[path].update(by_run)
            if args.profile:  # (before the gRPC upstream replaces wrk's)
                if (tools.py_spy is None and tools.perf is None) or tools.wrk is None:
                    progress.phase("profile: skipped (needs wrk, and perf or py-spy)")
                    notes.append("--profile: skipped (needs wrk, and perf or py-spy).")
                else:
                    used = " and ".join(t for t, v in (("perf", tools.perf), ("py-spy", tools.py_spy)) if v)
                    progress.phase(f"profile: {used}, wrk -c 16 for {args.seconds} s per pair")
                    args.out.mkdir(parents=True, exist_ok=True)
                    profiled = l4.profile(runner, tools, args.seconds, args.out, progress, name="http")
            if h2load_bin is not None:
                start_grpc_upstream(ps, setup, load_core)
                calls = grpc_windows(
                    runner,
                    h2load_bin,
                    paths,
                    args.rounds,
                    args.grpc_seconds,
                    args.retries,
                    tmp,
                    progress,
                    notes,
                )
                for path, by_run in calls.items():
                    results[path].setdefault("grpc", {}).update(by_run)
            rss = {
                p.name: l4._status_kb(p.pid, "VmRSS")
                for p in ps.procs
                if p.name.startswith(("sidemesh", "envoy"))
            }
        finally:
            ps.stop_all()
    for path, by in results.items():  # windows disturbed by others even after the retries
        windows = [(f"wrk {run}", r) for run, r in by.items() if run != "grpc"]
        windows += [(f"gRPC {run}", r) for run, r in by.get("grpc", {}).items()]
        for name, r in windows:
            if r["cpu"]["other"] > l4.OTHER_LOAD:
                notes.append(
                    f"{name} {l4.LABELS[path]}: {r['cpu']['other']:.0%} of a core was busy with other "
                    "processes during the window: that figure may be low."
                )
    notes += load_bound_notes(results, load_core)
    notes += [
        "Sidemesh between the sidecars: HTTP/1.1 over pooled mTLS connections (`sidemesh/1` frames); "
        "Envoy: the downstream protocol (HTTP/1.1 for wrk, HTTP/2 for gRPC).",
        "Sidemesh terminates the app's HTTP/2 (gRPC) in both sidecars: the client sidecar balances each "
        "call and sends it on an HTTP/2 connection to the chosen endpoint's sidecar, which authorizes it "
        "and forwards it over HTTP/2 to the app (h2, pure Python, twice per call).",
        "Sidemesh parses HTTP/1.1 with httptools (llhttp) in both sidecars.",
        "The machine has two cores shared with other work: figures are noisy when anything else runs.",
    ]
    report: Result = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "layout": layout,
        "seconds": args.seconds,
        "config": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "rounds": args.rounds,
            "warmup": args.warmup,
            "grpc_seconds": args.grpc_seconds,
            "retries": args.retries,
        },
        "results": results,
        "rss_kb": rss,
        "notes": notes,
        **({"profile": profiled} if profiled is not None else {}),
        "tools": {"wrk": tools.wrk_version, "envoy": tools.envoy_version, "h2load": h2load_bin},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(args.out / "http.md", report)
    print((args.out / "http.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
