"""Per-route counters for `sidemesh top`, served on the admin port as ``/stats/routes``.

A route is ``METHOD /path`` (the query dropped) for HTTP and gRPC, ``TCP destination`` for opaque
connections. Counters are cumulative (requests, successes, denials and a latency histogram with
fixed buckets): `sidemesh top` takes two snapshots and computes rates and quantiles from the
difference, so the sidecar keeps no time windows. At most ``capacity`` routes are kept: a new
route past that replaces the least requested one, so memory stays bounded whatever the paths.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds (log spaced, about x1.6): 0.25 ms .. 50.7 s, then +Inf.
BUCKETS: tuple[float, ...] = tuple(round(0.00025 * 1.6**i, 6) for i in range(27))
MAX_ROUTE_CHARS = 120
DEFAULT_CAPACITY = 200


@dataclass(slots=True)
class RouteCounters:
    since: int = 0  # which route this is: a route evicted and recorded again is a new one
    requests: int = 0
    successes: int = 0
    denials: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))


def route_of(method: str, path: str) -> str:
    if not method:  # an HTTP/1.1 head refused before it was parsed (proxy/http1.py: _refuse_head)
        return "(bad request head)"
    path = path.split("?", 1)[0]
    if len(path) > MAX_ROUTE_CHARS:
        path = path[:MAX_ROUTE_CHARS] + "..."
    return f"{method} {path}"


class RouteStats:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.routes: dict[tuple[str, str], RouteCounters] = {}
        self.evicted = 0
        self.made = 0  # routes made so far (each one's ``since``)
        self.started = time.time()

    def record(self, direction: str, route: str, seconds: float, ok: bool, denied: bool) -> None:
        key = (direction, route)
        counters = self.routes.get(key)
        if counters is None:
            if len(self.routes) >= self.capacity:
                coldest = min(self.routes, key=lambda k: self.routes[k].requests)
                del self.routes[coldest]
                self.evicted += 1
            self.made += 1
            counters = self.routes[key] = RouteCounters(since=self.made)
        counters.requests += 1
        counters.successes += ok
        counters.denials += denied
        counters.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1

    def snapshot(self, **about: Any) -> dict[str, Any]:
        return {
            **about,
            "time": time.time(),
            "started": self.started,
            "capacity": self.capacity,
            "evicted": self.evicted,
            "buckets": list(BUCKETS),
            "routes": [
                {
                    "direction": direction,
                    "route": route,
                    "since": c.since,
                    "requests": c.requests,
                    "successes": c.successes,
                    "denials": c.denials,
                    "latency_buckets": list(c.buckets),
                }
                for (direction, route), c in self.routes.items()
            ],
        }
