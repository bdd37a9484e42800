"""The dial pacer (a burst, then turns spaced out; no turn past the deadline), the log throttle,
``detect_outcome`` (decided by the bytes or by the timeout) and the new options' validation."""

from __future__ import annotations

import datetime as dt
import socket
import time
from typing import Any

import pytest

from proxy.config import ProxyConfig
from proxy.detect import Kind, detect_outcome
from proxy.limits import Pacer, Throttle
from sidemesh.config import ConfigError


def test_pacer_lets_a_burst_through_then_spaces_turns_out() -> None:
    pacer = Pacer(rate=10, burst=3)
    now = 100.0
    assert [pacer.reserve(deadline=now + 5, now=now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.reserve(deadline=now + 5, now=now) == pytest.approx(0.1)
    assert pacer.reserve(deadline=now + 5, now=now) == pytest.approx(0.2)
    # Idle for a while: the burst is available again, and no more than the burst.
    later = now + 10
    assert [pacer.reserve(deadline=later + 5, now=later) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.reserve(deadline=later + 5, now=later) == pytest.approx(0.1)


def test_no_turn_before_the_deadline_takes_none() -> None:
    pacer = Pacer(rate=10, burst=1)
    now = 0.0
    assert pacer.reserve(deadline=1.0, now=now) == 0.0
    waits = [pacer.reserve(deadline=1.0, now=now) for _ in range(20)]
    granted = [w for w in waits if w is not None]
    assert granted == pytest.approx([0.1 * i for i in range(1, 11)])  # turns up to the deadline
    assert waits[10:] == [None] * 10
    # Refused callers took nothing: one with a later deadline gets the next turn, 1.1 s.
    assert pacer.reserve(deadline=5.0, now=now) == pytest.approx(1.1)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_pacer_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Pacer(rate, burst)


def test_throttle_logs_once_then_every_period_with_what_it_held_back() -> None:
    t = Throttle(every=10.0)
    assert t.due(100.0) == 0
    assert [t.due(100.0 + i) for i in range(1, 6)] == [None] * 5
    assert t.due(110.0) == 5
    assert t.due(115.0) is None
    assert t.due(121.0) == 1


async def test_detect_outcome_says_whether_the_bytes_decided() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    with a, b:
        assert await detect_outcome(a, 0.05) == (Kind.SILENT, False)
        b.send(b"x")  # could still be an HTTP method: undecided at the timeout
        assert await detect_outcome(a, 0.05) == (Kind.OPAQUE, False)
        b.send(b"\x00")  # no HTTP method has that: decided
        assert await detect_outcome(a, 0.05) == (Kind.OPAQUE, True)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


@pytest.mark.parametrize("family", ["tcp", "unix"])
async def test_a_half_close_after_undecided_bytes_decides_at_once(family: str) -> None:
    """``hello`` then EOF (a client that sent everything and waits for the answer): waiting for the
    timeout could not decide more, and used to spin on the ended socket until then."""
    a, b = _tcp_pair() if family == "tcp" else socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    with a, b:
        b.send(b"hello")
        b.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert await detect_outcome(a, 2.0) == (Kind.OPAQUE, True)
        assert time.monotonic() - t0 < 0.5
        assert a.recv(100, socket.MSG_PEEK) == b"hello"  # nothing consumed


def _config(**kw: Any) -> ProxyConfig:
    return ProxyConfig(workload="shop/frontend-1", controller="c:1", service_account="sa", **kw)


def test_undecided_options_are_validated() -> None:
    assert _config().undecided_timeout == dt.timedelta(seconds=10)
    assert _config().undecided_dial_rate == 20.0
    with pytest.raises(ConfigError, match="--undecided-dial-rate"):
        _config(undecided_dial_rate=0.0)
    with pytest.raises(ConfigError, match="--undecided-timeout"):
        _config(undecided_timeout=dt.timedelta(seconds=-1))
    with pytest.raises(ConfigError, match="--idle-timeout"):
        _config(idle_timeout=dt.timedelta(0))
    assert _config().access_log is False  # off by default, as Istio's and Linkerd's
