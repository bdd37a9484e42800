"""Reading `bench/results/*.json` into the report's rows: one reader per benchmark's file format.

A file that is missing is listed as not measured yet; a file that is there but not as expected is
a `ReportError` naming the file and the field.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.figures import TARGETS, Report, ReportError, Row, Source, parse_target, ratio


def _get(data: Any, path: str, file: str) -> Any:
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ReportError(f"{file}: no {path!r} (is it a file written by the benchmark?)")
        node = node[part]
    return node


def _num(data: Any, path: str, file: str) -> float:
    value = _get(data, path, file)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{file}: {path!r} is {value!r}, not a number")
    return float(value)


def _opt(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def utc_minute(text: Any) -> str:
    """ "2026-11-26 12:21 UTC" and "2026-11-26T12:47:22Z" alike as the former."""
    found = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d)", str(text))
    return f"{found[1]} {found[2]} UTC" if found else str(text)


def _env_text(env: dict[str, Any]) -> str:
    cpu = env.get("cpu_model") or env.get("cpu") or "CPU model not recorded"
    cores = env.get("nproc") or env.get("cpus") or "?"
    parts = [str(cpu), f"{cores} cores"]
    parts += [
        f"{what} {env[key]}" for key, what in (("kernel", "kernel"), ("python", "Python")) if env.get(key)
    ]
    return ", ".join(parts)


def _row(bench: str, key: str, label: str, unit: str, sidemesh: float | None, **kw: Any) -> Row:
    return Row(bench, key, label, unit, sidemesh, target=TARGETS.get((bench, key)), **kw)


def read_ca(data: Any, file: str = "ca.json") -> tuple[list[Row], Source]:
    env = _get(data, "environment", file)
    rows = [
        _row(
            "ca",
            "signings_per_s",
            "CA signings/s, end to end (gRPC+TLS, one core); direct = OpenSSL's raw sign+verify limit",
            "/s",
            _num(data, "end_to_end.per_s", file),
            direct=_num(data, "openssl.raw_limit_per_s", file),
        ),
        _row(
            "ca",
            "p99_ms",
            f"CA latency p99, {data.get('config', {}).get('concurrency', '?')} requests in flight",
            "ms",
            _num(data, "end_to_end.p99_ms", file),
        ),
    ]
    source = Source(
        "ca", file, "CA signing", str(data.get("date", "?")), env.get("commit", "?"), _env_text(env)
    )
    return rows, source


def read_admission(data: Any, file: str = "admission.json") -> tuple[list[Row], Source]:
    env = _get(data, "machine", file)
    rows = [
        _row(
            "admission",
            "per_second",
            "injector admissions/s (one core, HTTPS keep-alive)",
            "/s",
            _num(data, "throughput.per_second", file),
        ),
        _row(
            "admission",
            "p99_ms",
            "injector latency p99 at 100 admissions/s",
            "ms",
            _num(data, "latency_at_100_per_second.p99_ms", file),
        ),
    ]
    load = env.get("load_average_at_end")
    source = Source(
        "admission",
        file,
        "injector admissions",
        str(data.get("when", "?")),
        str(data.get("commit", "not recorded")),
        _env_text(env),
        f"load average at the end {', '.join(f'{x:.2f}' for x in load)}" if isinstance(load, list) else "",
    )
    return rows, source


def read_controller(data: Any, file: str = "controller.json") -> tuple[list[Row], Source]:
    env = _get(data, "environment", file)
    cfg = data.get("config", {})
    runs = _get(data, "cluster.compile_runs", file)
    if not isinstance(runs, list) or not runs:
        raise ReportError(f"{file}: 'cluster.compile_runs' is empty")
    compile_s = statistics.median(_num(run, "total_s", file) for run in runs)
    scale = f"{cfg.get('pods', 0):,} pods, {cfg.get('streams', 0):,} sidecars"
    rows = [
        _row("controller", "compile_s", f"controller compile, median ({scale})", "s", compile_s),
        _row(
            "controller",
            "policy_p99_s",
            "controller: a policy change reaches every sidecar, p99",
            "s",
            _num(data, "change_policy.latency.p99_s", file),
        ),
        _row(
            "controller",
            "rss_peak_mb",
            "controller RSS peak",
            "MB",
            _num(data, "controller_rss_peak_mb", file),
        ),
    ]
    if isinstance(data.get("change_pod"), dict):
        rows.append(
            _row(
                "controller",
                "pod_all_s",
                "controller: a pod added, every sidecar updated",
                "s",
                _num(data, "change_pod.all_updated_s", file),
            )
        )
    source = Source(
        "controller",
        file,
        "controller at scale",
        str(data.get("date", "?")),
        env.get("commit", "?"),
        _env_text(env),
    )
    return rows, source


def read_pairs(bench: str, data: Any, file: str) -> tuple[list[Row], Source]:
    """A benchmark with a `metrics` list of direct / sidemesh / envoy figures (l4.json, http.json)."""
    metrics = _get(data, "metrics", file)
    if not isinstance(metrics, list):
        raise ReportError(f"{file}: 'metrics' is not a list")
    rows = []
    for n, m in enumerate(metrics):
        if not isinstance(m, dict) or not isinstance(m.get("metric"), str):
            raise ReportError(f"{file}: metrics[{n}] has no 'metric' name")
        label = str(m.get("label", m["metric"]))
        if label.startswith(" "):  # a breakdown of the row above: in the benchmark's own report only
            continue
        target = TARGETS.get((bench, m["metric"]))
        if target is None and isinstance(m.get("target"), str):
            target = parse_target(m["target"], str(m.get("unit", "")))
        rows.append(
            Row(
                bench,
                m["metric"],
                f"{bench.upper()} {label}",
                str(m.get("unit", "")),
                _opt(m.get("sidemesh")),
                direct=_opt(m.get("direct")),
                envoy=_opt(m.get("envoy")),
                target=target,
            )
        )
    env = data.get("environment", {})
    title = {"l4": "L4 data path", "http": "HTTP data path"}.get(bench, bench)
    others = [
        w["cpu"]["other"]
        for runs in data.get("runs", {}).values()
        if isinstance(runs, dict)
        for w in runs.values()
        if isinstance(w, dict)
        and isinstance(w.get("cpu"), dict)
        and isinstance(w["cpu"].get("other"), int | float)
    ]
    load = ""
    if others:
        share = "under 1%" if max(others) < 0.01 else f"at most {max(others):.0%}"
        load = f"other processes used {share} of a core in any window"
    source = Source(
        bench, file, title, str(data.get("date", "?")), str(env.get("commit", "?")), _env_text(env), load
    )
    return rows, source


HTTP_FIGURES = (  # key, label, where in each path's results, scale, unit
    ("rps_c1", "requests/s, 1 conn", ("c1", "rps"), 1.0, "req/s"),
    ("p50_c1", "p50 latency, 1 conn", ("c1", "p50_us"), 1e-3, "ms"),
    ("p99_c1", "p99 latency, 1 conn", ("c1", "p99_us"), 1e-3, "ms"),
    ("rps_c16", "requests/s, 16 conn", ("c16", "rps"), 1.0, "req/s"),
    ("p50_c16", "p50 latency, 16 conn", ("c16", "p50_us"), 1e-3, "ms"),
    ("p99_c16", "p99 latency, 16 conn", ("c16", "p99_us"), 1e-3, "ms"),
    ("grpc_c1", "gRPC unary calls/s, 1 conn, 1 stream", ("grpc", "c1", "calls_per_s"), 1.0, "calls/s"),
    ("grpc_c4m8", "gRPC unary calls/s, 4 conn x 8 streams", ("grpc", "c4m8", "calls_per_s"), 1.0, "calls/s"),
)


def read_http(data: Any, file: str = "http.json") -> tuple[list[Row], Source]:
    """bench.http: `results.<path>.<run>` per path (direct, sidemesh, envoy), or a `metrics` list as
    bench.l4 writes."""
    if isinstance(data, dict) and "metrics" in data:
        return read_pairs("http", data, file)
    results = _get(data, "results", file)
    if not isinstance(results, dict):
        raise ReportError(f"{file}: 'results' is not an object")

    def value(path: str, keys: tuple[str, ...], scale: float) -> float | None:
        node: Any = results.get(path)
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        number = _opt(node)
        return None if number is None else number * scale

    rows = []
    for key, label, keys, scale, unit in HTTP_FIGURES:
        direct, sidemesh, envoy = (value(p, keys, scale) for p in ("direct", "sidemesh", "envoy"))
        if sidemesh is not None:
            rows.append(_row("http", key, f"HTTP {label}", unit, sidemesh, direct=direct, envoy=envoy))
    source = Source(
        "http",
        file,
        "HTTP data path",
        str(data.get("when", "?")),
        str(data.get("commit", "not recorded")),
        str(data.get("cpu") or "CPU model not recorded"),
    )
    return rows, source


def read_tracing(data: Any, file: str = "tracing.json") -> tuple[list[Row], Source]:
    """bench.tracing: the same HTTP load through the pair with tracing off, at 1% and at 100%."""
    off = _num(data, "summary.off.rps", file)
    rows = [
        _row(
            "tracing",
            f"ratio_{key}",
            f"tracing at {mode} sampling: requests/s / tracing off (16 conn, {off:,.0f} req/s off)",
            "×",
            ratio(_num(data, f"summary.{mode}.rps", file), off),
        )
        for key, mode in (("1pct", "1%"), ("100pct", "100%"))
    ]
    rounds = f"{data.get('rounds', '?')} interleaved rounds of {data.get('seconds', '?')} s per mode"
    source = Source("tracing", file, "tracing cost", "not recorded", "not recorded", rounds)
    return rows, source


READERS: dict[str, Callable[[Any, str], tuple[list[Row], Source]]] = {
    "ca.json": read_ca,
    "admission.json": read_admission,
    "controller.json": read_controller,
    "l4.json": lambda data, file: read_pairs("l4", data, file),
    "http.json": read_http,
    "tracing.json": read_tracing,
}
HOW_TO_RUN = {
    "ca.json": ("CA signing (issue 2)", "python -m bench.ca_sign"),
    "admission.json": ("injector admissions (issue 5)", "python -m bench.admission"),
    "controller.json": ("controller at scale (issue 4)", "python -m bench.controller"),
    "l4.json": ("L4 data path (issue 3)", "python -m bench.l4"),
    "http.json": ("HTTP data path (issue 6)", "python -m bench.http"),
    "tracing.json": ("tracing cost (issue 7)", "python -m bench.tracing"),
}


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path.name}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ReportError(f"{path.name}: cannot read it ({exc.strerror})") from exc


def collect(results: Path) -> Report:
    """Every results file in `results`. One that cannot be read does not stop the others: it is
    left out of the table and named in `Report.problems`."""
    rows: list[Row] = []
    sources: list[Source] = []
    missing, problems = [], []
    for name, reader in READERS.items():
        path = results / name
        if not path.exists():
            what, command = HOW_TO_RUN[name]
            missing.append(f"{what}: no `{name}` yet (`{command}`)")
            continue
        try:
            got, source = reader(load_json(path), name)
        except ReportError as exc:
            problems.append(str(exc))
            continue
        rows += got
        sources.append(source)
    reliability: list[tuple[str, bool | None]] = []
    runs: tuple[str, ...] = ()
    try:
        reliability = _reliability(results)
        runs = _runs(results)
    except ReportError as exc:
        problems.append(str(exc))
    return Report(tuple(rows), tuple(sources), tuple(missing), tuple(reliability), runs, tuple(problems))


def _reliability(results: Path) -> list[tuple[str, bool | None]]:
    if not (results / "RELIABILITY.json").exists():
        return []
    out: list[tuple[str, bool | None]] = []
    rows = _get(load_json(results / "RELIABILITY.json"), "rows", "RELIABILITY.json")
    for n, row in enumerate(rows if isinstance(rows, list) else [None]):
        if not isinstance(row, dict) or "fault" not in row:
            raise ReportError(f"RELIABILITY.json: rows[{n}] has no 'fault'")
        met = row.get("met")
        out.append((str(row["fault"]), met if isinstance(met, bool) else None))
    return out


def _runs(results: Path) -> tuple[str, ...]:
    if not (results / "run.json").exists():
        return ()
    data = load_json(results / "run.json")
    lines = [f"last `make bench` (`python -m bench.all`) started {_get(data, 'machine.date', 'run.json')}:"]
    for run in _get(data, "runs", "run.json"):
        state = "ok" if run.get("exit") == 0 else f"FAILED (exit {run.get('exit')})"
        load = "/".join(f"{x:.2f}" for x in run.get("load_before", [])[:1] + run.get("load_after", [])[:1])
        lines.append(
            f"bench.{run.get('bench')} {state}, {run.get('seconds')} s, 1-min load average before/after {load}"
        )
    return tuple(lines)
