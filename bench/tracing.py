"""What tracing costs the sidecar pair: the HTTP benchmark with tracing off, at 1% and at 100%.

    .venv/bin/python -m bench.tracing [--seconds N] [--warmup N] [--rounds N]

The same setup as ``bench.l4`` (one CA, the uvloop upstream, a Sidemesh pair in local mode, both
sidecars pinned to one core, wrk and the upstream on the other), with the sidecars started three
ways: no ``OTEL_*`` (tracing off), ``parentbased_traceidratio`` at 0.01, and at 1.0, exporting to a
collector in this process that counts spans: over OTLP/HTTP by default (``POST /v1/traces``,
protobuf), as injected sidecars do (the injector's default endpoint is port 4318), or over OTLP/gRPC
with ``--protocol grpc`` (opentelemetry-proto's TraceService on grpcio; the sidecar then loads
grpcio's exporter too). wrk sends no trace headers, so the client sidecar starts each trace and the server
sidecar follows its decision. Each mode runs ``--rounds`` times, interleaved (off, 1%, 100%, off,
...), so a drift of the machine touches every mode alike; requests/s is the mean over rounds.
Target (issue 7): at 1% sampling, no more than 5% fewer requests/s than tracing off.

Writes ``bench/results/tracing.md`` and ``bench/results/tracing.json``.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

from bench import l4
from bench.common import Progress

MODES = {"off": None, "1%": "0.01", "100%": "1.0"}
TARGET_RATIO_1PCT = 0.95
Result = dict[str, Any]


PROTOCOLS = ("http/protobuf", "grpc")


def _span_count(request: pb.ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


class Collector(pb_grpc.TraceServiceServicer):
    """OTLP/gRPC: accepts every export and counts the spans."""

    protocol = "grpc"

    def __init__(self) -> None:
        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: pb.ExportTraceServiceRequest, context: Any) -> pb.ExportTraceServiceResponse:
        self.spans += _span_count(request)
        return pb.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.server.stop(0)


class HttpCollector:
    """OTLP/HTTP (binary protobuf, ``POST /v1/traces``): accepts every export and counts the spans."""

    protocol = "http/protobuf"

    def __init__(self) -> None:
        self.spans = 0
        collector, lock = self, threading.Lock()  # (a thread per request: two sidecars may export at once)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = pb.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    collector.spans += _span_count(request)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dropped(setup: l4.Setup) -> float:
    total = 0.0
    for host in (1, 2):
        url = f"http://{setup.addr(host)}:{l4.SM_HEALTH}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("sidemesh_tracing_spans_dropped_total"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def start_pair(
    ps: l4.Processes,
    base: l4.Setup,
    bundle: Path,
    mode: str,
    n: int,
    core: int | None,
    collector: Collector | HttpCollector,
) -> l4.Setup:
    tmp = base.tmp / f"{mode.strip('%')}-{n}"
    tmp.mkdir()
    for sa in ("frontend", "cart"):
        shutil.copy(base.tmp / f"{sa}.token", tmp / f"{sa}.token")
    setup = l4.Setup(base.net, tmp, ca_port=base.ca_port, upstream=base.upstream)
    setup.entry = dict(base.entry)
    saved = {
        k: os.environ.get(k)
        for k in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
        )
    }
    ratio = MODES[mode]
    try:
        for k in saved:
            os.environ.pop(k, None)
        if ratio is not None:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{collector.port}"
            os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = collector.protocol
            os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            os.environ["OTEL_TRACES_SAMPLER_ARG"] = ratio
        l4.start_sidemesh(ps, setup, bundle, core, l4.sidecar_command("uvloop"), opaque=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    l4.check_path(setup, "sidemesh")
    return setup


def _run(args: argparse.Namespace, ps: l4.Processes, tmp: Path, progress: Progress) -> Result:
    tools = l4.find_tools()
    if tools.wrk is None:
        raise l4.BenchError("wrk is needed (apt-get install wrk)")
    proxy_core, load_core, layout = l4._cores(tools.taskset)
    base = l4.Setup(f"127.{random.randint(2, 250)}.{random.randint(1, 250)}", tmp)
    progress.phase(f"CA and upstream ({layout})")
    bundle = l4.start_ca(ps, base)
    l4.start_upstream(ps, base, load_core)
    collector = Collector() if args.protocol == "grpc" else HttpCollector()
    progress.detail(f"collector ({args.protocol}) on 127.0.0.1:{collector.port}")
    runs: dict[str, list[Result]] = {m: [] for m in MODES}
    for n in range(args.rounds):
        for mode in MODES:
            progress.phase(
                f"round {n + 1}/{args.rounds}, tracing {mode}: wrk -c 16 -t 2, {args.warmup} s + {args.seconds} s"
            )
            setup = start_pair(ps, base, bundle, mode, n, proxy_core, collector)
            runner = l4.Runner(ps, setup, tools, load_core, tmp / "report.lua")
            runner.lua.write_text(l4.WRK_LUA)
            spans_before = collector.spans
            r = runner.measure_wrk("sidemesh", 16, 2, args.seconds, args.warmup)
            r["dropped_spans"] = _dropped(setup)
            r["spans_received"] = collector.spans - spans_before
            runs[mode].append(r)
            progress.detail(
                f"{r['rps']:.0f} requests/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                f"pair CPU {r['pair_cpu_us_per_request']:.0f} us/request, other {r['cpu']['other']:.0%}, "
                f"spans {r['spans_received']}, dropped {r['dropped_spans']:.0f}"
            )
            for proc in setup.sidemesh.values():
                ps.stop(proc)
    collector.stop()
    summary = {}
    off = statistics.mean(r["rps"] for r in runs["off"])
    for mode, rs in runs.items():
        rps = statistics.mean(r["rps"] for r in rs)
        summary[mode] = {
            "rps": rps,
            "rps_runs": [r["rps"] for r in rs],
            "ratio_to_off": rps / off,
            "p50_ms": statistics.mean(r["p50_us"] for r in rs) / 1000,
            "p99_ms": statistics.mean(r["p99_us"] for r in rs) / 1000,
            "pair_cpu_us_per_request": statistics.mean(r["pair_cpu_us_per_request"] for r in rs),
            "other_cpu": max(r["cpu"]["other"] for r in rs),
            "spans_received": sum(r["spans_received"] for r in rs),
            "dropped_spans": sum(r["dropped_spans"] for r in rs),
        }
    return {
        "layout": layout,
        "summary": summary,
        "runs": runs,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "protocol": args.protocol,
    }


def write(report: Result, results_dir: Path) -> list[str]:
    s = report["summary"]
    one = s["1%"]["ratio_to_off"]
    lines = [
        "# Tracing cost: the sidecar pair with tracing off, at 1% and at 100%",
        "",
        f"Commit {l4._git_commit()}, {l4._cpu_model()}; generated by `python -m bench.tracing` "
        f"({report['rounds']} interleaved rounds of {report['seconds']} s per mode, wrk -c 16 -t 2, "
        "HTTP/1.1 keep-alive, 2-byte body; spans exported over "
        f"{'OTLP/gRPC' if report.get('protocol') == 'grpc' else 'OTLP/HTTP'} to a collector in the bench process).",
        f"Layout: {report['layout']}",
        "",
        "| tracing | requests/s | ratio to off | p50 ms | p99 ms | pair CPU µs/request | spans received | spans dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in s.items():
        lines.append(
            f"| {mode} | {m['rps']:.0f} | {m['ratio_to_off']:.3f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['pair_cpu_us_per_request']:.0f} | {m['spans_received']} | {m['dropped_spans']:.0f} |"
        )
    verdict = "met" if one >= TARGET_RATIO_1PCT else "missed"
    lines += [
        "",
        f"Target: at 1% sampling at least {TARGET_RATIO_1PCT:.2f}x the requests/s of tracing off: "
        f"**{one:.3f}x, {verdict}**.",
        f"Busiest share of a core used by other processes in any window: "
        f"{max(m['other_cpu'] for m in s.values()):.0%} (a shared machine: small differences are noise).",
        "",
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "tracing.md").write_text("\n".join(lines))
    (results_dir / "tracing.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per run (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per run (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per mode (default: 2)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="http/protobuf",
        help="how the sidecars export spans (default: http/protobuf, as injected sidecars do)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=l4.RESULTS_DIR, help="where to write (default: bench/results)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, l4._interrupt)
    progress = Progress(total=1 + len(MODES) * args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="sidemesh-bench-tracing-"))
    ps = l4.Processes(tmp, l4.find_tools().taskset)
    try:
        report = _run(args, ps, tmp, progress)
    except KeyboardInterrupt:
        return 130
    except l4.BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        ps.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(write(report, args.results_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
