"""`sidemesh top`: quantiles, rates from two snapshots, the table, and its errors."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pytest

from proxy.routes import BUCKETS, RouteStats
from sidemesh import cli
from sidemesh.top import quantile, render, rows, run_top


def test_quantile_interpolates_inside_the_bucket() -> None:
    bounds = [0.01, 0.1, 1.0]
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.005)
    assert quantile(bounds, [50, 50, 0, 0], 0.99) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert quantile(bounds, [0, 0, 0, 5], 0.5) == 1.0  # above the last bound: the last bound


def _stats() -> RouteStats:
    return RouteStats(capacity=10)


def test_rates_success_latency_and_denials_come_from_the_difference() -> None:
    stats = _stats()
    stats.record("inbound", "GET /old", 0.001, True, False)
    before = [stats.snapshot(workload="shop/cart-1")]
    for _ in range(90):
        stats.record("inbound", "GET /cart", 0.004, True, False)
    for _ in range(10):
        stats.record("inbound", "GET /cart", 0.9, False, True)
    stats.record("outbound", "TCP db.shop:5432", 2.0, True, False)
    after = [stats.snapshot(workload="shop/cart-1")]
    table = rows(before, after, seconds=2.0)
    assert [r.route for r in table] == ["GET /cart", "TCP db.shop:5432", "GET /old"]
    cart = table[0]
    assert cart.rps == 50.0 and cart.success == 0.9 and cart.denials == 10 and cart.requests == 100
    assert cart.p50 is not None and 0.0025 < cart.p50 <= 0.005
    assert cart.p99 is not None and 0.5 < cart.p99 <= 1.2  # within the 0.9 s bucket (x1.6 wide)
    assert table[2].rps == 0 and table[2].success is None and table[2].p50 is None


def test_replicas_are_summed_and_a_restarted_sidecar_counts_from_zero() -> None:
    a, b = _stats(), _stats()
    for _ in range(5):
        a.record("inbound", "GET /", 0.01, True, False)
    before = [a.snapshot(), b.snapshot()]
    for _ in range(3):
        a.record("inbound", "GET /", 0.01, True, False)
        b.record("inbound", "GET /", 0.01, True, False)
    restarted = _stats()
    restarted.record("inbound", "GET /", 0.01, True, False)
    (row,) = rows(before, [a.snapshot(), b.snapshot()], 1.0)
    assert row.rps == 6 and row.requests == 11
    (row,) = rows([a.snapshot()], [restarted.snapshot()], 1.0)
    assert row.rps == 1  # 1 - 8 would be negative: the counters restarted


def test_a_route_evicted_and_back_with_as_many_requests_counts_from_zero() -> None:
    """Its new count was not below the old, so it read as the same counters: -166.7 % success and
    too few requests per second (review of session 16, reproduced with the real RouteStats)."""
    stats = RouteStats(capacity=3)
    for _ in range(5):
        stats.record("inbound", "GET /a", 0.001, True, False)
    for route in ("GET /b", "GET /c"):
        for _ in range(6):
            stats.record("inbound", route, 0.001, True, False)
    before = [stats.snapshot()]
    for _ in range(6):
        stats.record("inbound", "GET /d", 0.001, True, False)  # evicts /a, the least requested
    for _ in range(8):
        stats.record("inbound", "GET /a", 0.001, False, False)  # back: 8 failures, counted anew
    a = next(r for r in rows(before, [stats.snapshot()], 2.0) if r.route == "GET /a")
    assert (a.rps, a.success, a.requests) == (4.0, 0.0, 8)


def test_render_fits_the_width_and_says_when_there_is_nothing() -> None:
    stats = _stats()
    stats.record("inbound", "GET /" + "x" * 300, 0.01, True, False)
    text = render(rows([], [stats.snapshot()], 1.0), limit=5, width=100, header="title")
    assert text.splitlines()[0] == "title"
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "100.0%" in text and "…" in text
    assert "no requests" in render([], 5, 100)


def test_run_once_reads_twice_and_prints_one_table() -> None:
    stats = _stats()
    calls: list[str] = []

    def fetcher(address: str) -> dict[str, object]:
        calls.append(address)
        return stats.snapshot(workload="shop/cart-1")

    def sleep(seconds: float) -> None:
        stats.record("inbound", "POST /checkout", 0.02, True, False)

    out = io.StringIO()
    assert run_top(["h:1"], 0.5, True, 10, "all", out, fetcher, sleep) == 0
    assert calls == ["h:1", "h:1"]
    text = out.getvalue()
    assert "shop/cart-1" in text and "POST /checkout" in text and "\x1b" not in text
    assert len(BUCKETS) + 1 == len(stats.snapshot()["routes"][0]["latency_buckets"])


def test_an_unreachable_sidecar_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert cli.main(["top", f"127.0.0.1:{port}", "--once", "--interval", "10ms"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read http://127.0.0.1:{port}/stats/routes" in err
    assert "kubectl port-forward" in err


def test_a_port_that_does_not_speak_http_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A port-forward to the wrong port (SSH, Redis): BadStatusLine was a traceback."""
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def garbage() -> None:  # one answer: the first read fails
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"garbage\r\n")

        thread = threading.Thread(target=garbage, daemon=True)
        thread.start()
        assert cli.main(["top", f"127.0.0.1:{port}", "--once", "--interval", "10ms"]) == 2
        thread.join(5)
    err = capsys.readouterr().err
    assert f"cannot read http://127.0.0.1:{port}/stats/routes" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["top", "nonsense", "--once"], "ADMIN_ADDRESS 'nonsense' is not HOST:PORT"),  # no --address flag
        (["top", "1.2.3.4:99999", "--once"], "ADMIN_ADDRESS '1.2.3.4:99999': port 99999 is not 0-65535"),
        (["top", "--interval", "0s", "--once"], "--interval"),
        (["top", "--interval", "soon", "--once"], "--interval"),
        (["top", "--limit", "0", "--once"], "--limit"),
        (["top", "http://127.0.0.1:15000", "--once"], "ADMIN_ADDRESS is HOST:PORT, without http://"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_live_mode_writes_escape_codes_to_a_terminal_only() -> None:
    """Piped to a file (`sidemesh top ... > log`), each reading came with the terminal's
    clear-screen codes in it."""
    stats = _stats()
    readings: Iterator[int] = iter(())

    def sleep(seconds: float) -> None:
        if next(readings) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C after two readings

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for out, codes in ((io.StringIO(), False), (Terminal(), True)):
        readings = iter(range(3))
        with pytest.raises(KeyboardInterrupt):
            run_top(
                ["h:1"], 0.5, False, 10, "all", out, lambda _a: stats.snapshot(workload="shop/cart-1"), sleep
            )
        text = out.getvalue()
        assert text.count("shop/cart-1") == 2 and ("\x1b[2J" in text) is codes, text


def test_a_replica_restarting_between_readings_counts_on_its_own() -> None:
    """The replicas were added up before the difference was taken: one restart during a rollout
    gave a rate of 115 req/s for 1,115 requests, and could give negative denials and success rates
    above 100 %."""
    a, b = _stats(), _stats()
    for _ in range(10):
        a.record("inbound", "GET /", 0.01, True, False)
    for _ in range(1000):
        b.record("inbound", "GET /", 0.01, True, True)
    before = [a.snapshot(), b.snapshot()]
    for _ in range(15):
        a.record("inbound", "GET /", 0.01, True, False)
    restarted = _stats()
    restarted.started = b.started + 60
    for _ in range(1100):
        restarted.record("inbound", "GET /", 0.01, True, False)
    (row,) = rows(before, [a.snapshot(), restarted.snapshot()], 1.0)
    assert row.rps == 1115 and row.success == 1.0 and row.denials == 0 and row.requests == 1125


def test_a_route_cannot_drive_the_terminal() -> None:
    """A route is what a caller sent: an escape sequence in it (an HTTP/2 :path, before those were
    refused) cleared the screen of whoever ran `sidemesh top`."""
    stats = _stats()
    stats.record("inbound", "GET /x\x1b]0;pwned\x07\x1b[2J\x9b", 0.001, True, False)
    stats.record("inbound", "GET /café", 0.001, True, False)
    table = rows([], [stats.snapshot(workload="shop/cart-1")], seconds=1.0)
    out = render(table, limit=10, width=120)
    assert not any(c in out for c in "\x1b\x07\x9b"), repr(out)
    assert "GET /x\\x1b]0;pwned\\x07\\x1b[2J\\x9b" in out and "GET /café" in out


def test_a_sidecar_named_twice_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was counted twice ("2 sidecars") and its requests with it."""
    import sidemesh.top

    seen: list[list[str]] = []
    monkeypatch.setattr(sidemesh.top, "run_top", lambda addresses, *rest: seen.append(list(addresses)) or 0)
    assert cli.main(["top", "127.0.0.1:15000", "127.0.0.1:15000", "127.0.0.2:15000", "--once"]) == 0
    assert seen == [["127.0.0.1:15000", "127.0.0.2:15000"]]
