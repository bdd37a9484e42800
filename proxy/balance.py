"""Load balancing across a destination's endpoints: power of two choices on peak-EWMA load, with
outlier ejection (no I/O: time comes from ``clock``, randomness from ``rng``).

The HTTP layer takes a :class:`Lease` per request, the opaque TCP path one per connection::

    lease = balancer.acquire(dest)      # NoEndpoint when the destination has none
    ... talk to lease.endpoint ...      # (a retry: acquire(dest, avoid=[endpoints tried]))
    lease.release(ok)                   # latency (by the clock) and outcome

(The opaque TCP path calls ``lease.report(ok)`` once connected and ``release`` when the connection
closes, so that an open connection counts as load.)

Load of an endpoint, as Linkerd's (tower's ``PeakEwma``): ``rtt_estimate x (outstanding + 1)``.
The estimate jumps to a slower observation at once (peak) and moves toward faster ones as an
exponentially weighted average whose weight decays with time (``DECAY_S``); an idle endpoint's
estimate decays toward zero, so it is tried again. A failed attempt does not feed its (often tiny)
latency into the average: it doubles the estimate (from at least ``DEFAULT_RTT_S``, at most
``MAX_PENALTY_S``), so an endpoint that fails fast does not look fast, and one that keeps failing
gets less traffic until it is ejected.

Outlier ejection: ``max_failures`` consecutive failures take an endpoint out for a backoff that
doubles with each ejection in a row (``ejection_s`` .. ``max_ejection_s``). When it ends, the
endpoint is on probation: one lease at a time; a success returns it fully (and resets the
backoff), a failure ejects it again at once with the next backoff. An outcome of a lease taken
before the current ejection began does not end it. When *every* endpoint of a
destination is ejected the balancer ignores ejection (as Linkerd does; Envoy's panic threshold
is at 50% healthy): trying a maybe-broken endpoint beats failing every request.

State is keyed by ``(address, port)`` and shared by every destination naming that endpoint, so it
survives configuration updates; an endpoint the current configuration no longer lists is never
picked (callers pass the current :class:`Destination`), and its leases still release normally.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sidemesh.mesh.compile import Destination, Endpoint

DECAY_S = 10.0  # the EWMA's time constant (Linkerd: 10 s)
DEFAULT_RTT_S = 0.030  # a new endpoint's estimate when no peer has one (Linkerd: 30 ms)
MAX_PENALTY_S = 10.0
MAX_FAILURES = 5
EJECTION_S = 30.0
MAX_EJECTION_S = 300.0
MAX_RANKS = 256  # sticky destinations whose ranking is kept (a config change makes new ones)
SWEEP_EVERY = 4096  # acquisitions between sweeps of forgotten endpoints
FORGET_AFTER_S = 600.0  # idle this long (and not ejected): its state is dropped

Key = tuple[str, int]


class NoEndpoint(Exception):
    """The destination lists no endpoint."""


@dataclass(slots=True)
class EndpointState:
    rtt: float  # seconds, as of ``updated``
    updated: float
    outstanding: int = 0
    failures: int = 0  # consecutive
    ejections: int = 0  # consecutive ejections (reset by a success)
    ejected_until: float | None = None  # None: never ejected since the last success
    ejected_at: float | None = None
    probing: bool = False  # the one lease allowed on probation is out
    rejoined: bool = True  # False from an ejection until its estimate is reset for probation
    last_used: float = 0.0
    picks: int = 0  # total, for the admin page and tests

    def estimate(self, now: float) -> float:
        return self.rtt * math.exp(-max(0.0, now - self.updated) / DECAY_S)

    def load(self, now: float) -> float:
        return self.estimate(now) * (self.outstanding + 1)

    def observe(self, rtt: float, now: float) -> None:
        if rtt > self.rtt:
            self.rtt = rtt  # peak: a slow response counts at once
        else:
            decay = math.exp(-max(0.0, now - self.updated) / DECAY_S)
            self.rtt = self.rtt * decay + rtt * (1.0 - decay)
        self.updated = now

    def available(self, now: float) -> bool:
        """Not ejected; on probation (ejection over, no success since) only for one lease at a time."""
        if self.ejected_until is None:
            return True
        return now >= self.ejected_until and not self.probing


class Lease:
    """One request (or connection) on one endpoint. ``report`` its outcome once it is known,
    ``release`` it when it is over (which reports too, if that was not done); later calls are
    ignored."""

    __slots__ = ("_balancer", "_state", "endpoint", "head", "probe", "released", "reported", "started")

    def __init__(
        self, balancer: Balancer, endpoint: Endpoint, state: EndpointState, started: float, probe: bool
    ) -> None:
        self._balancer = balancer
        self._state = state
        self.endpoint = endpoint
        self.started = started
        self.probe = probe  # the probation lease of an endpoint whose ejection just ended
        self.reported = False
        self.released = False
        self.head: float | None = None  # seconds to the response head, when marked

    def elapsed(self) -> float:
        return self._balancer.clock() - self.started

    def mark_head(self) -> None:
        """The response head came: its latency is the time to here, not to the response's end
        (Linkerd's peak EWMA measures to the head): a long download, a watch or a WebSocket made
        its endpoint look as slow as the whole exchange, and starved it for minutes."""
        if self.head is None:
            self.head = self.elapsed()

    def report(self, ok: bool, latency: float | None = None) -> None:
        """The outcome, without ending the lease: the opaque TCP path reports when the connection
        is made (``latency``: the connect time) and releases when it closes."""
        if self.reported:
            return
        self.reported = True
        self._balancer._record(self, self._state, ok, self.elapsed() if latency is None else latency)

    def cancel(self) -> None:
        """Not used after all (a retry that found no other endpoint): released, nothing reported."""
        if self.released:
            return
        self.reported = self.released = True
        self._state.outstanding = max(0, self._state.outstanding - 1)
        if self.probe:
            self._state.probing = False

    def abandon(self, observe: bool) -> None:
        """The caller gave up (left, reset its request, sent a body that cannot be read): not the
        endpoint's outcome, so neither a failure (five of them ejected a healthy endpoint) nor a
        success (one ended an ejection's probation). With ``observe`` (the endpoint had the whole
        request and had not answered) the time so far is its latency, as tower's peak EWMA records
        a request dropped unanswered: a slow endpoint's callers giving up still show it slow."""
        if self.released:
            return
        if not self.reported and observe:
            self._state.observe(self.elapsed(), self._balancer.clock())
        self.reported = self.released = True
        self._state.outstanding = max(0, self._state.outstanding - 1)
        if self.probe:
            self._state.probing = False

    def release(self, ok: bool, latency: float | None = None) -> None:
        """``latency`` defaults to the time to the head (``mark_head``), else since acquire."""
        if self.released:
            return
        self.report(ok, self.head if latency is None else latency)
        self.released = True
        self._state.outstanding = max(0, self._state.outstanding - 1)


class Balancer:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        *,
        max_failures: int = MAX_FAILURES,
        ejection_s: float = EJECTION_S,
        max_ejection_s: float = MAX_EJECTION_S,
        client: str = "",
    ) -> None:
        if max_failures < 1 or ejection_s <= 0 or max_ejection_s < ejection_s:
            raise ValueError("max_failures >= 1 and 0 < ejection_s <= max_ejection_s are required")
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.max_failures = max_failures
        self.ejection_s = ejection_s
        self.max_ejection_s = max_ejection_s
        self.states: dict[Key, EndpointState] = {}
        self._acquired = 0
        self.client = client  # who calls (the pod's IP): sessionAffinity ClientIP hashes it
        # Sticky destinations' endpoints ranked by weight, per endpoints tuple (the same object
        # until a configuration changes it): hashing them all per pick cost 1 ms at 1,000.
        self._ranks: dict[int, tuple[tuple[Endpoint, ...], list[int]]] = {}

    def state(self, endpoint: Endpoint) -> EndpointState | None:
        return self.states.get((endpoint.address, endpoint.port))

    def _peer_rtt(self, dest: Destination, now: float) -> float:
        """What a newcomer starts with: the mean estimate of the destination's other endpoints, so
        that it gets traffic without being flooded (DEFAULT_RTT_S when none is known)."""
        known = [
            s.estimate(now)
            for e in dest.endpoints
            if (s := self.states.get((e.address, e.port))) is not None and s.ejected_until is None
        ]
        return (sum(known) / len(known) if known else 0.0) or DEFAULT_RTT_S

    def _state_of(self, endpoint: Endpoint, dest: Destination, now: float) -> EndpointState:
        key = (endpoint.address, endpoint.port)
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = EndpointState(rtt=self._peer_rtt(dest, now), updated=now)
        elif not st.rejoined and st.ejected_until is not None and now >= st.ejected_until:
            # Back from ejection: it competes as a newcomer, not with its failure penalty.
            st.rtt, st.updated, st.rejoined = self._peer_rtt(dest, now), now, True
        return st

    def acquire(self, dest: Destination, avoid: Collection[Endpoint] = ()) -> Lease:
        """An endpoint of ``dest`` for one request or connection. ``avoid``: endpoints to skip if
        any other can be used (a retry goes elsewhere, as Envoy's previous-hosts predicate)."""
        endpoints = dest.endpoints
        if not endpoints:
            raise NoEndpoint(f"{dest.name} has no endpoints")
        now = self.clock()
        self._acquired += 1
        if self._acquired % SWEEP_EVERY == 0:
            self._sweep(now)
        if len(endpoints) == 1:
            ep = endpoints[0]
            st = self._state_of(ep, dest, now)
        elif dest.client_ip_affinity:
            ep, st = self._sticky(dest, now, avoid)
        else:
            ep, st = self._choose(dest, now, avoid)
        probe = st.ejected_until is not None and now >= st.ejected_until and not st.probing
        st.probing = st.probing or probe
        st.outstanding += 1
        st.picks += 1
        st.last_used = now
        return Lease(self, ep, st, now, probe)

    def _choose(
        self, dest: Destination, now: float, avoid: Collection[Endpoint]
    ) -> tuple[Endpoint, EndpointState]:
        """Two draws, the lighter wins: O(1) however many endpoints there are, unless a draw is
        ejected or avoided (then the usable ones are listed)."""
        eps = dest.endpoints
        a, b = self.rng.sample(range(len(eps)), 2)
        sa, sb = self._state_of(eps[a], dest, now), self._state_of(eps[b], dest, now)
        if sa.available(now) and sb.available(now) and eps[a] not in avoid and eps[b] not in avoid:
            return (eps[a], sa) if sa.load(now) <= sb.load(now) else (eps[b], sb)
        states = [self._state_of(e, dest, now) for e in eps]
        usable = [i for i, s in enumerate(states) if s.available(now)]
        candidates = [i for i in usable if eps[i] not in avoid] or usable or list(range(len(eps)))
        if len(candidates) == 1:  # (none usable: every endpoint is ejected, so ignore ejection)
            i = candidates[0]
        else:
            x, y = self.rng.sample(candidates, 2)
            i = x if states[x].load(now) <= states[y].load(now) else y
        return eps[i], states[i]

    def _sticky(
        self, dest: Destination, now: float, avoid: Collection[Endpoint]
    ) -> tuple[Endpoint, EndpointState]:
        """sessionAffinity ClientIP: the same endpoint for every connection and request of this
        caller, as Istio configures Envoy (a consistent hash of the source IP): the usable endpoint
        of highest rendezvous weight for (caller, endpoint). Ejected, avoided (a retry) or gone,
        the next one takes over, and only this endpoint's callers move. kube-proxy's timeoutSeconds
        does not apply (nor in Istio): the choice lasts as long as the endpoint does."""
        eps = dest.endpoints
        cached = self._ranks.get(id(eps))
        if cached is None or cached[0] is not eps:
            if len(self._ranks) >= MAX_RANKS:
                self._ranks.clear()
            order = sorted(range(len(eps)), key=lambda i: _weight(self.client, eps[i]), reverse=True)
            cached = self._ranks[id(eps)] = (eps, order)
        fallback = None
        for i in cached[1]:  # the first usable one not avoided; else the first usable; else the first
            st = self._state_of(eps[i], dest, now)
            if st.available(now):
                if eps[i] not in avoid:
                    return eps[i], st
                if fallback is None:
                    fallback = i
        i = cached[1][0] if fallback is None else fallback
        return eps[i], self._state_of(eps[i], dest, now)

    def _record(self, lease: Lease, st: EndpointState, ok: bool, latency: float) -> None:
        now = self.clock()
        if lease.probe:
            st.probing = False
        if ok:
            st.observe(max(0.0, latency), now)
            st.failures = 0
            if st.ejected_at is None or lease.started >= st.ejected_at:  # not news from before it
                st.ejections = 0
                st.ejected_until = st.ejected_at = None
            return
        st.observe(min(MAX_PENALTY_S, 2 * max(latency, DEFAULT_RTT_S, st.estimate(now))), now)
        if st.ejected_at is not None and lease.started < st.ejected_at:
            return  # a request from before the ejection: old news, not another run of failures
        st.failures += 1
        if st.failures >= self.max_failures or lease.probe:
            st.ejected_until = now + min(self.max_ejection_s, self.ejection_s * 2 ** min(st.ejections, 30))
            st.ejected_at = now
            st.ejections += 1
            st.failures = 0
            st.rejoined = False

    def ejected(self, endpoint: Endpoint) -> bool:
        st = self.state(endpoint)
        return st is not None and st.ejected_until is not None and self.clock() < st.ejected_until

    def describe(self) -> dict[str, dict[str, float | int]]:
        """Per endpoint, for an admin page: estimate, open leases, failures in a row, seconds of
        ejection left, picks."""
        now = self.clock()
        return {
            f"{address}:{port}": {
                "estimate_ms": round(st.estimate(now) * 1000, 3),
                "outstanding": st.outstanding,
                "failures": st.failures,
                "ejected_for_s": round(max(0.0, (st.ejected_until or now) - now), 3),
                "picks": st.picks,
            }
            for (address, port), st in sorted(self.states.items())
        }

    def _sweep(self, now: float) -> None:
        """Forget endpoints nobody has asked for in a while (their estimate has decayed to nothing
        anyway); keep those with leases out or an ejection to serve."""
        for key, st in list(self.states.items()):
            if (
                st.outstanding == 0
                and now - st.last_used > FORGET_AFTER_S
                and (st.ejected_until is None or now >= st.ejected_until)
            ):
                del self.states[key]


def _weight(client: str, endpoint: Endpoint) -> int:
    """Rendezvous (highest random weight) hashing: stable across restarts, unlike hash()."""
    key = f"{client}|{endpoint.address}|{endpoint.port}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
