"""`sidemesh demo --once`: the newcomer's walk-through, as its own processes, must behave as it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.otlp import ReceivedSpan, ReceiverThread, trace_tree

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
STRANGER = "spiffe://cluster.local/ns/shop/sa/stranger"
CART = "spiffe://cluster.local/ns/shop/sa/cart"
DENIED = "no rule of shop/cart-allow-frontend allows it"


# A user behind a corporate proxy (nothing listens there): the demo talks to its own processes on
# 127.x.y.z, which no usual no_proxy lists. Followed, the proxy took the sidecars' gRPC to the CA
# and the controller, and the demo's own readiness checks, and the demo failed at step 2.
DEAD_PROXY = {
    "http_proxy": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "grpc_proxy": "http://127.0.0.1:9",
    "no_proxy": "localhost,127.0.0.1,::1",
}


def _demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return dict(env, PYTHONIOENCODING="utf-8", **DEAD_PROXY, **extra)


def test_demo_once_behaves_as_described_and_leaves_nothing_behind() -> None:
    before = set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*"))
    out = subprocess.run(
        [sys.executable, "-m", "sidemesh", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=180,
        # A shell with the signal's own OTEL_* settings for some other collector: the demo's receiver
        # still gets the spans (the signal's variables win over the generic ones the demo sets);
        # and with a service name of its own, which the sidecars took: every trace step failed.
        env=_demo_env(
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
            OTEL_PROPAGATORS="b3",
            OTEL_SERVICE_NAME="my-laptop-app",
            OTEL_RESOURCE_ATTRIBUTES="service.name=other,team=a",
        ),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert f"cart's sidecar saw the caller as {FRONTEND}, over mTLS" in text
    assert f"the stranger's app saw HTTP 403, sidemesh-denied-reason: {DENIED}" in text
    assert f"source {STRANGER}: {DENIED}" in text
    assert "a plaintext client straight at cart's sidecar: refused" in text
    assert "the stranger's next call is allowed" in text
    # the trace trees, from the demo's own OTLP receiver: client span in the caller's sidecar, its
    # child the server span in cart's, with identities and the decision
    assert re.search(r"traces: the sidecars sent their spans to the demo's OTLP receiver \(http://127", text)
    allowed = re.search(
        r"frontend -> cart, allowed: trace [0-9a-f]{32}.*\n"
        r'      └─ CLIENT "GET cart.shop:80" in frontend.shop, [0-9.]+ ms, HTTP 200\n'
        rf"            {FRONTEND} -> {CART}, decision: allow\n"
        r'         └─ SERVER "GET" in cart.shop, [0-9.]+ ms, HTTP 200\n'
        rf"               {FRONTEND} -> {CART}, decision: allow \(allowed by shop/cart-allow-frontend rule 0\)\n",
        text,
    )
    assert allowed, text
    denied = re.search(
        r"stranger -> cart, denied: trace [0-9a-f]{32}.*\n"
        r'      └─ CLIENT "GET cart.shop:80" in stranger.shop, [0-9.]+ ms, HTTP 403\n'
        r".*\n"
        r'         └─ SERVER "GET" in cart.shop, [0-9.]+ ms, HTTP 403\n'
        rf"               {STRANGER} -> {CART}, decision: deny \({DENIED}\)\n",
        text,
    )
    assert denied, text
    # where the metrics are, with the real addresses
    assert re.search(r"cart +metrics http://127\.\d+\.\d+\.2:15020/metrics", text)
    assert re.search(r'sidemesh_proxy_requests_total\{decision="deny",.*source="shop/stranger"', text)
    assert re.search(r"sidemesh top 127\.\d+\.\d+\.2:15000", text)
    assert "all steps behaved as described" in text
    assert set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*")) == before  # every file removed
    # every process it started is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sidemesh-demo-" not in ps


# As nohup: SIGHUP ignored, then exec (an ignored signal stays ignored across exec). Not a
# preexec_fn: this process runs grpcio, and forked with a preexec_fn its child was now and then
# killed before exec (SIGABRT, "epoll_wait error: Bad file descriptor": grpcio's fork handler
# restarts its poller in the child, whose epoll fd close_fds closes; grpc/grpc#43055).
NOHUP = (
    "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _demo_at_step_2(*launcher: str, **popen: Any) -> tuple[subprocess.Popen[str], str]:
    """`sidemesh demo --once` started (through ``launcher``: python arguments before ``-m``) and read
    until its step [2] (the CA and the controller run): the process and what it printed so far."""
    import time

    proc = subprocess.Popen(
        [sys.executable, *launcher, "-m", "sidemesh", "demo", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_demo_env(),
        **popen,
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "[2]" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    return proc, seen


def test_a_demo_cut_short_says_so_and_leaves_nothing_behind() -> None:
    """The terminal closed (SIGHUP) while the demo ran: it died and left the CA, the controller and
    the sidecars running (their own sessions) with its keys on disk; Ctrl-C or a kill before the
    last step said "all steps behaved as described" and exited 0."""
    import signal

    before = set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*"))
    proc, seen = _demo_at_step_2()
    proc.send_signal(signal.SIGHUP)
    rest, _ = proc.communicate(timeout=60)
    text = seen + rest
    assert proc.returncode == 130, text
    assert "interrupted at step" in text and "all steps behaved as described" not in text
    assert set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*")) == before
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sidemesh-demo-" not in ps


def test_under_nohup_the_demo_outlives_the_terminal() -> None:
    """A SIGHUP the user chose to ignore (`nohup sidemesh demo &`) stays ignored."""
    import signal

    proc, seen = _demo_at_step_2("-c", NOHUP)
    proc.send_signal(signal.SIGHUP)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + rest
    assert "all steps behaved as described" in rest


def test_a_component_that_does_not_start_shows_why_and_its_log_is_kept() -> None:
    """It pointed at the CA's log, then deleted it: the reason was nowhere to be seen."""
    import shutil

    before = set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*"))
    out = subprocess.run(
        [sys.executable, "-m", "sidemesh", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_demo_env(SIDEMESH_CA_RATE_LIMIT="fast"),  # the CA refuses it (the demo does not set it)
    )
    kept = set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*")) - before
    said = re.search(r"kept (\S+) for the logs", out.stdout)
    ours = {Path(said.group(1))} & kept if said else kept  # (another demo running here has its own)
    try:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "'fast' is not a number" in out.stdout  # the CA's own words, from the end of its log
        assert said is not None and ours, out.stdout
        assert (next(iter(ours)) / "ca.log").exists()
    finally:
        for path in ours:
            shutil.rmtree(path, ignore_errors=True)


def test_demo_sends_traces_to_the_users_collector_when_one_is_configured() -> None:
    collector = ReceiverThread()  # stands for the user's Jaeger
    endpoint = collector.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sidemesh", "demo", "--once"],
            capture_output=True,
            text=True,
            timeout=180,
            env=_demo_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="100"),
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"traces: the sidecars send their spans to your collector at {endpoint}" in out.stdout
        assert "the demo's OTLP receiver" not in out.stdout  # no receiver of its own
        found = re.search(
            r"frontend -> cart is trace ([0-9a-f]{32}), the stranger's denied call trace ([0-9a-f]{32})",
            out.stdout,
        )
        assert found, out.stdout
        allowed, denied = found.groups()

        def arrived(spans: list[ReceivedSpan]) -> bool:
            got = {(s.trace_id, s.kind, s.service) for s in spans}
            return {
                (allowed, "CLIENT", "frontend.shop"),
                (allowed, "SERVER", "cart.shop"),
                (denied, "SERVER", "cart.shop"),
            } <= got

        spans = collector.wait_for(arrived, timeout=5.0)
        assert spans is not None, collector.spans()
        assert any(f"decision: deny ({DENIED})" in line for line in trace_tree(spans, denied))
    finally:
        collector.stop()


def test_trace_tree_nests_children_under_parents_and_treats_missing_parents_as_roots() -> None:
    def span(span_id: str, parent: str, kind: str, start: int, **attrs: str | int) -> ReceivedSpan:
        return ReceivedSpan(
            service="svc", name="GET x", kind=kind, trace_id="t", span_id=span_id, parent_id=parent,
            attributes=attrs, status="UNSET", start_ns=start, end_ns=start + 2_500_000,
        )  # fmt: skip

    spans = [
        span("b", "a", "SERVER", 2, **{"sidemesh.authz.decision": "deny", "sidemesh.authz.reason": "r"}),
        span("a", "app", "CLIENT", 1, **{"http.response.status_code": 403}),
        span("z", "", "SERVER", 9),
    ]
    spans.append(ReceivedSpan("svc", "other", "SERVER", "u", "c", "", {}, "UNSET"))  # another trace
    assert trace_tree(spans, "t", branch="- ") == [
        '- CLIENT "GET x" in svc, 2.5 ms, HTTP 403',
        "     ? -> ?, decision: ?",
        '   - SERVER "GET x" in svc, 2.5 ms',
        "        ? -> ?, decision: deny (r)",
        '- SERVER "GET x" in svc, 2.5 ms',
        "     ? -> ?, decision: ?",
    ]
    assert trace_tree(spans, "nothing") == []


def test_demo_help_names_every_option_and_what_netns_needs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidemesh", "demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for option in ("--once", "--keep", "--netns"):
        assert option in text
    assert "needs root" in text
    assert "With --netns (as root) each workload is instead a network namespace" in text
    assert "unless OTEL_EXPORTER_OTLP_ENDPOINT" in text


def test_the_commands_the_demo_prints_run_as_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """After `make demo` only .venv/bin/sidemesh exists (no activated virtualenv): the demo prints
    the command by its path then, and as `sidemesh` when that is what PATH finds."""
    from sidemesh.demo import _command

    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    printed = _command()
    assert printed != "sidemesh" and Path(printed).name == "sidemesh" and Path(printed).exists()
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert _command() == "sidemesh"
