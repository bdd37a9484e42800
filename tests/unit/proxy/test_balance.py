"""The balancer with a clock the test moves and a seeded RNG: P2C on peak-EWMA, ejection, updates."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from proxy.balance import DEFAULT_RTT_S, Balancer, Lease, NoEndpoint
from sidemesh.mesh.compile import Destination, Endpoint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dest(*hosts: int, name: str = "cart.shop:80") -> Destination:
    return Destination(name, tuple(Endpoint(f"10.0.0.{h}", 8080, None, f"shop/cart-{h}") for h in hosts))


def host(lease: Lease) -> int:
    return int(lease.endpoint.address.rsplit(".", 1)[1])


def make(**kw: float) -> tuple[Balancer, Clock]:
    clock = Clock()
    return Balancer(clock, random.Random(7), **kw), clock  # type: ignore[arg-type]


def test_no_endpoints_is_an_error_naming_the_destination() -> None:
    b, _ = make()
    with pytest.raises(NoEndpoint, match=r"cart\.shop:80 has no endpoints"):
        b.acquire(dest())


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        Balancer(max_failures=0)


def test_slow_endpoint_gets_fewer_requests_one_at_a_time() -> None:
    """Sequential requests: .1 answers in 100 ms, .2 and .3 in 5 ms."""
    b, clock = make()
    latency = {1: 0.100, 2: 0.005, 3: 0.005}
    d = dest(1, 2, 3)
    picks: Counter[int] = Counter()
    for _ in range(3000):
        lease = b.acquire(d)
        picks[host(lease)] += 1
        clock.now += latency[host(lease)]
        lease.release(True)
        clock.now += 0.001
    assert picks[1] < 0.1 * picks[2], picks  # round robin would give each a third
    assert picks[2] > 0 and picks[3] > 0


def test_slow_endpoint_gets_fewer_requests_under_concurrency() -> None:
    """Requests overlap (20 in flight): outstanding counts, and latency still dominates."""
    b, clock = make()
    latency = {1: 0.200, 2: 0.010, 3: 0.010, 4: 0.010}
    d = dest(1, 2, 3, 4)
    inflight: list[tuple[float, Lease]] = []
    picks: Counter[int] = Counter()
    for _ in range(5000):
        lease = b.acquire(d)
        picks[host(lease)] += 1
        inflight.append((clock.now + latency[host(lease)], lease))
        if len(inflight) >= 20:
            inflight.sort(key=lambda x: x[0])
            done, first = inflight.pop(0)
            clock.now = max(clock.now, done)
            first.release(True)
        clock.now += 0.0005
    fast = min(picks[2], picks[3], picks[4])
    assert picks[1] < 0.25 * fast, picks
    assert max(picks[2], picks[3], picks[4]) < 1.5 * fast  # the fast ones share evenly


def test_a_failing_endpoint_is_ejected_for_its_backoff_then_comes_back() -> None:
    b, clock = make(max_failures=5, ejection_s=30.0)
    d = dest(1, 2, 3)
    bad = d.endpoints[0]
    failures = picks = 0
    held: list[Lease] = []
    while failures < 5 and picks < 1000:  # .1 fails every time; the others hold 40 requests
        lease = b.acquire(d)
        picks += 1
        clock.now += 0.001
        if lease.endpoint == bad:
            failures += 1
            lease.release(False)
            continue
        held.append(lease)
        if len(held) > 40:
            held.pop(0).release(True)
    assert b.ejected(bad) and picks < 200, picks
    for lease in held:
        lease.release(True)
    ejected_at = clock.now
    while clock.now < ejected_at + 29.9:  # none for the whole backoff
        lease = b.acquire(d)
        assert lease.endpoint != bad
        clock.now += 0.01
        lease.release(True)
    clock.now = ejected_at + 30.0  # backoff over: probation, .1 is picked again
    seen = set()
    for _ in range(50):
        lease = b.acquire(d)
        seen.add(host(lease))
        lease.release(True)  # .1 has recovered
        clock.now += 0.01
    assert 1 in seen and not b.ejected(bad)


def test_probation_allows_one_request_and_a_failure_doubles_the_backoff() -> None:
    b, clock = make(max_failures=1, ejection_s=30.0, max_ejection_s=100.0)
    d = dest(1, 2)
    bad = d.endpoints[0]

    def fail_on_bad() -> Lease:
        while True:
            lease = b.acquire(d)
            if lease.endpoint == bad:
                return lease
            lease.release(True)

    start = clock.now
    fail_on_bad().release(False)
    assert b.ejected(bad)
    clock.now = start + 30.0
    probe = fail_on_bad()
    assert probe.probe
    for _ in range(30):  # while the probe is out nothing else goes to .1
        other = b.acquire(d)
        assert other.endpoint != bad
        other.release(True)
    probe.release(False)
    assert b.ejected(bad)
    clock.now = start + 30.0 + 59.0
    assert b.ejected(bad)  # 60 s this time
    clock.now = start + 30.0 + 60.0
    fail_on_bad().release(False)
    clock.now += 99.0
    assert b.ejected(bad)  # capped at 100 s, not 120
    clock.now += 1.0
    assert not b.ejected(bad)
    fail_on_bad().release(True)  # success: the backoff starts over at 30 s
    fail_on_bad().release(False)
    clock.now += 30.0
    assert not b.ejected(bad)


def test_when_every_endpoint_is_ejected_they_are_all_tried() -> None:
    b, _ = make(max_failures=1)
    d = dest(1, 2)
    for ep in d.endpoints:
        while True:
            lease = b.acquire(d)
            if lease.endpoint == ep:
                lease.release(False)
                break
            lease.release(True)
    assert all(b.ejected(e) for e in d.endpoints)
    got = {host(b.acquire(d)) for _ in range(40)}
    assert got == {1, 2}  # panic mode: ejection ignored, nothing refused


def test_removed_endpoints_are_never_picked_and_leases_in_flight_still_release() -> None:
    b, clock = make()
    before = dest(1, 2, 3)
    leases = [b.acquire(before) for _ in range(30)]
    after = dest(2, 3, 4)  # .1 removed, .4 added
    picks = Counter(host(b.acquire(after)) for _ in range(300))
    assert 1 not in picks and set(picks) == {2, 3, 4}
    for lease in leases:
        clock.now += 0.001
        lease.release(True)
    assert all(s.outstanding >= 0 for s in b.states.values())


def test_state_survives_a_configuration_update() -> None:
    b, clock = make()
    lease = b.acquire(dest(1, 2))
    clock.now += 0.5
    lease.release(True)
    slow = lease.endpoint
    state = b.state(slow)
    assert state is not None and state.rtt == pytest.approx(0.5)
    b.acquire(dest(1, 2, 3, name="other"))  # a new table: the same endpoint keeps its estimate
    assert b.state(slow) is state


def test_a_new_endpoint_starts_like_its_peers_and_gets_traffic() -> None:
    b, clock = make()
    d = dest(1, 2)
    for _ in range(200):
        lease = b.acquire(d)
        clock.now += 0.002
        lease.release(True)
    grown = dest(1, 2, 3)
    picks: Counter[int] = Counter()
    for _ in range(300):
        lease = b.acquire(grown)
        picks[host(lease)] += 1
        clock.now += 0.002
        lease.release(True)
    assert picks[3] > 50, picks
    fresh, _ = make()
    first = fresh.acquire(dest(9))
    st = fresh.state(first.endpoint)
    assert st is not None and st.rtt == DEFAULT_RTT_S


def test_fast_failures_do_not_attract_traffic() -> None:
    """An endpoint that fails in 1 ms must not look faster than one that answers in 20 ms."""
    b, clock = make(max_failures=1000)
    d = dest(1, 2)
    picks: Counter[int] = Counter()
    for _ in range(1000):
        lease = b.acquire(d)
        picks[host(lease)] += 1
        bad = host(lease) == 1
        clock.now += 0.001 if bad else 0.020
        lease.release(not bad)
    assert picks[1] < picks[2] / 5, picks


def test_release_twice_counts_once() -> None:
    b, _ = make()
    d = dest(1)
    lease = b.acquire(d)
    lease.release(False)
    lease.release(False)
    st = b.state(d.endpoints[0])
    assert st is not None and st.outstanding == 0 and st.failures == 1


def test_idle_estimates_decay_so_a_once_slow_endpoint_is_tried_again() -> None:
    b, clock = make()
    d = dest(1, 2)
    slow = None
    for _ in range(50):
        lease = b.acquire(d)
        clock.now += 2.0 if host(lease) == 1 else 0.01
        if host(lease) == 1:
            slow = lease.endpoint
        lease.release(True)
    assert slow is not None
    clock.now += 120.0  # quiet for two minutes
    st = b.state(slow)
    assert st is not None and st.estimate(clock.now) < 0.01


def test_a_retry_avoids_the_endpoints_already_tried_while_others_remain() -> None:
    b, _ = make()
    d = dest(1, 2, 3)
    for _ in range(50):
        assert host(b.acquire(d, avoid=d.endpoints[:2])) == 3
    assert host(b.acquire(dest(1), avoid=dest(1).endpoints)) == 1  # nothing else: the same one


def test_many_endpoints_picks_spread_and_cost_no_scan() -> None:
    b, clock = make()
    d = dest(*range(1, 201))
    picks: Counter[int] = Counter()
    for _ in range(4000):
        lease = b.acquire(d)
        picks[host(lease)] += 1
        clock.now += 0.001
        lease.release(True)
    assert len(picks) > 190 and max(picks.values()) < 80


def test_news_from_before_an_ejection_does_not_end_it() -> None:
    """A connection made before the endpoint went bad closes fine, a request sent before it went
    bad succeeds late: it stays ejected."""
    b, clock = make(max_failures=1)
    d = dest(1, 2)
    bad = d.endpoints[0]

    def on_bad() -> Lease:
        return next(lease for lease in iter(lambda: b.acquire(d), None) if lease.endpoint == bad)

    connection, request = on_bad(), on_bad()
    connection.report(True)  # connected, and stays open
    clock.now += 1.0
    on_bad().release(False)
    assert b.ejected(bad)
    clock.now += 1.0
    connection.release(True)  # its outcome was reported already
    request.release(True)  # older news than the ejection
    assert b.ejected(bad)
    st = b.state(bad)
    assert st is not None and st.outstanding == 0


def test_requests_in_flight_when_it_was_ejected_do_not_eject_it_again() -> None:
    """An endpoint crashes with 20 requests in flight: the first 5 failures eject it for 30 s; the
    other 15 failures are of requests sent before that, not a new run (Envoy skips a host already
    ejected). The backoff stays at its first step."""
    b, clock = make(max_failures=5, ejection_s=30.0)
    d = dest(1, 2)
    bad = d.endpoints[0]
    in_flight = [lease for lease in (b.acquire(d) for _ in range(80)) if lease.endpoint == bad][:20]
    assert len(in_flight) == 20
    clock.now += 0.5
    for lease in in_flight:
        lease.release(False)
    st = b.state(bad)
    assert st is not None and st.ejections == 1
    assert st.ejected_until == pytest.approx(clock.now + 30.0)


def test_report_then_release_counts_once() -> None:
    b, _ = make()
    d = dest(1)
    lease = b.acquire(d)
    lease.report(False)
    lease.release(True)  # the outcome stays the reported one
    st = b.state(d.endpoints[0])
    assert st is not None and st.failures == 1 and st.outstanding == 0


def test_describe_for_the_admin_page() -> None:
    b, clock = make(max_failures=1)
    d = dest(1)
    lease = b.acquire(d)
    clock.now += 0.002
    lease.release(False)
    assert b.describe() == {
        "10.0.0.1:8080": {
            "estimate_ms": 60.0,  # a failure doubles the (default 30 ms) estimate
            "outstanding": 0,
            "failures": 0,  # reset by the ejection it caused
            "ejected_for_s": 30.0,
            "picks": 1,
        }
    }


def test_an_abandoned_lease_is_neither_a_failure_nor_a_success() -> None:
    """A caller that gave up is not the endpoint's outcome: it neither counts toward an ejection
    (impatient clients ejected healthy endpoints) nor ends one's probation; with ``observe`` its
    time so far is the endpoint's latency (a slow endpoint whose callers give up stays slow)."""
    now = [0.0]
    balancer = Balancer(clock=lambda: now[0], rng=random.Random(1))
    one = dest(1)
    ep = one.endpoints[0]
    for _ in range(10):
        balancer.acquire(one).abandon(observe=False)
    st = balancer.state(ep)
    assert st is not None and (st.failures, st.outstanding) == (0, 0) and not balancer.ejected(ep)
    before = st.estimate(now[0])
    lease = balancer.acquire(one)
    now[0] += 3.0
    lease.abandon(observe=True)
    assert st.estimate(now[0]) > before  # the 3 s it waited unanswered


def sticky(*hosts: int) -> Destination:
    return dataclasses.replace(dest(*hosts), client_ip_affinity=True)


def test_client_ip_affinity_keeps_a_caller_on_one_endpoint_and_spreads_callers() -> None:
    """sessionAffinity: ClientIP. kube-proxy keeps a client IP on one endpoint; once meshed, the
    sidecar picks per connection and request, so without this the Service's stickiness was lost."""
    d = sticky(1, 2, 3, 4)
    chosen = {}
    for n in range(40):
        b = Balancer(Clock(), random.Random(n), client=f"10.1.0.{n}")
        leases = [b.acquire(d) for _ in range(30)]  # load does not move it (P2C would)
        assert len({host(lease) for lease in leases}) == 1
        chosen[n] = host(leases[0])
        again = Balancer(Clock(), random.Random(n + 100), client=f"10.1.0.{n}")  # a restarted sidecar
        assert host(again.acquire(d)) == chosen[n]
    assert set(chosen.values()) == {1, 2, 3, 4}  # callers spread over the endpoints
    # An endpoint that goes away moves only its own callers.
    gone = chosen[0]
    rest = sticky(*(h for h in (1, 2, 3, 4) if h != gone))
    for n, was in chosen.items():
        now = host(Balancer(Clock(), random.Random(0), client=f"10.1.0.{n}").acquire(rest))
        assert now != gone and (now == was or was == gone), (n, was, now)
    assert host(Balancer(Clock(), client="x").acquire(dest(1, 2, 3, 4))) in {1, 2, 3, 4}  # (not sticky)


def test_client_ip_affinity_leaves_an_ejected_endpoint_and_a_retry_goes_elsewhere() -> None:
    clock = Clock()
    b = Balancer(clock, random.Random(1), client="10.1.0.7", max_failures=2, ejection_s=30.0)
    d = sticky(1, 2, 3)
    first = b.acquire(d)
    home = first.endpoint
    retry = b.acquire(d, avoid=[home])
    assert retry.endpoint != home
    first.release(False)
    retry.release(True)
    b.acquire(d).release(False)  # two failures in a row: ejected
    assert b.ejected(home)
    away = b.acquire(d)
    assert away.endpoint != home and all(b.acquire(d).endpoint == away.endpoint for _ in range(10))
    clock.now += 31.0  # back after the backoff: the caller returns to it
    assert b.acquire(d).endpoint == home
