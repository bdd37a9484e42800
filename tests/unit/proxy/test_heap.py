from __future__ import annotations

from proxy.heap import Trimmer, tune


def test_trims_once_connections_fall_to_half_the_peak() -> None:
    calls: list[int] = []
    t = Trimmer(trim=lambda: calls.append(1), min_peak=64, every=1000)
    assert not t.tick(10)  # a small peak is not worth a trim
    assert not t.tick(2000)
    assert not t.tick(1500)  # still above half the peak
    assert t.tick(900) and calls == [1]
    assert not t.tick(900)  # the peak restarts from what is open now
    assert t.tick(100) and len(calls) == 2


def test_real_malloc_trim_runs_on_glibc() -> None:
    # The default trimmer calls glibc's malloc_trim (a no-op elsewhere); it must not raise.
    t = Trimmer(min_peak=1)
    assert t.tick(5) is False
    assert t.tick(0) is True and t.trims == 1
    assert isinstance(tune(), bool)


def test_trims_periodically_without_a_burst() -> None:
    calls: list[int] = []
    t = Trimmer(trim=lambda: calls.append(1), min_peak=64, every=3)
    assert [t.tick(5) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert len(calls) == 2


def test_trims_once_idle_after_traffic() -> None:
    calls: list[int] = []
    t = Trimmer(trim=lambda: calls.append(1), min_peak=64, every=1000)
    assert not t.tick(0)  # idle from the start: nothing to give back
    assert not t.tick(3)  # a few connections: no burst
    assert t.tick(0) and calls == [1]  # the last one closed: the buffers they held go back
    assert not t.tick(0) and not t.tick(0)  # still idle: once is enough
    t.peak = 1  # (the sidecar raises the peak as each connection opens)
    assert t.tick(0) and len(calls) == 2  # a connection came and went between two ticks
