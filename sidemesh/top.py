"""`sidemesh top`: a live table of what a workload's sidecars see (what it does: DESCRIPTION)."""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from sidemesh.config import parse_duration, parse_hostport
from sidemesh.localnet import DIRECT

# The command's --help description: a string of its own, not the module docstring, which -OO
# drops (a sidecar's container runs with PYTHONOPTIMIZE=2, and `sidemesh top` is run there).
DESCRIPTION = """`sidemesh top`: a live table of what a workload's sidecars see, busiest routes first.

Reads each sidecar's admin page ``/stats/routes`` (cumulative counters and latency buckets per
route) twice, ``--interval`` apart, and shows per route: requests per second, success rate, p50 and
p99 latency and denials over that interval. Several sidecars (the replicas of one workload) are
summed. The admin port listens on 127.0.0.1:15000 inside the pod; reach it with
``kubectl port-forward pod/NAME 15000`` (one local port per pod: ``15001:15000`` ...).

Example: sidemesh top 127.0.0.1:15000 127.0.0.1:15001 --interval 2s
"""

Snapshot = dict[str, Any]
Key = tuple[str, str]  # (direction, route)


class TopError(Exception):
    """A sidecar cannot be read; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Row:
    direction: str
    route: str
    rps: float
    success: float | None  # None: no request in the interval
    p50: float | None
    p99: float | None
    denials: int
    requests: int


def fetch(address: str, timeout: float = 3.0) -> Snapshot:
    host, port = parse_hostport("address", address)
    url = f"http://{host}:{port}/stats/routes"
    try:
        with DIRECT.open(url, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        hint = "is this a sidecar of this version's admin port?" if exc.code == 404 else ""
        raise TopError(f"{url} answered {exc.code} {exc.reason}; {hint}".rstrip("; ")) from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:  # (not HTTP: BadStatusLine)
        raise TopError(
            f"cannot read {url} ({getattr(exc, 'reason', exc)}). The sidecar's admin port listens on "
            "127.0.0.1:15000 inside the pod: run `kubectl port-forward pod/POD 15000` and pass "
            "127.0.0.1:15000 (another local port per pod, e.g. 15001:15000, for several replicas)"
        ) from exc
    if not isinstance(body, dict) or not isinstance(body.get("routes"), list):
        raise TopError(f"{url} did not answer route stats (is it a sidecar's admin port?)")
    return body


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of a histogram (``counts[i]`` at or below ``bounds[i]``, the last one +Inf),
    interpolated linearly inside its bucket, as Prometheus' histogram_quantile does."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):  # above the last bound
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _routes(snap: Snapshot) -> dict[Key, dict[str, Any]]:
    return {(str(r["direction"]), str(r["route"])): r for r in snap["routes"]}


def rows(before: Sequence[Snapshot], after: Sequence[Snapshot], seconds: float) -> list[Row]:
    """Per route, what happened between two readings of the same sidecars (in the same order),
    the replicas' differences added up. Each sidecar's difference is its own: a restarted one
    (another ``started``, or a counter that went down) counts from zero, a route that was evicted
    and came back too. (The replicas were summed before the difference was taken: one restart
    during a rollout showed negative denials and success rates above 100 %.)"""
    bounds = after[0]["buckets"] if after else []
    acc: dict[Key, dict[str, Any]] = {}
    for i, snap in enumerate(after):
        prior = before[i] if i < len(before) else None
        same = prior is not None and prior.get("started") == snap.get("started")
        old = _routes(prior) if prior is not None and same else {}
        for key, cur in _routes(snap).items():
            buckets = [int(b) for b in cur["latency_buckets"]]
            prev = old.get(key)
            # (another ``since``: evicted and recorded again since, its counters started over; a
            # count that came back as high as before hid that, and gave success rates below 0 %)
            if (
                prev is None
                or prev.get("since") != cur.get("since")
                or int(prev["requests"]) > int(cur["requests"])
            ):
                prev = {"requests": 0, "successes": 0, "denials": 0, "latency_buckets": [0] * len(buckets)}
            row = acc.setdefault(
                key, {"n": 0, "ok": 0, "denials": 0, "total": 0, "delta": [0] * len(buckets)}
            )
            row["n"] += int(cur["requests"]) - int(prev["requests"])
            row["ok"] += int(cur["successes"]) - int(prev["successes"])
            row["denials"] += max(0, int(cur["denials"]) - int(prev["denials"]))
            row["total"] += int(cur["requests"])
            row["delta"] = [
                d + max(0, a - int(b))
                for d, a, b in zip(row["delta"], buckets, prev["latency_buckets"], strict=False)
            ]
    out = [
        Row(
            direction=key[0],
            route=key[1],
            rps=row["n"] / seconds if seconds > 0 else 0.0,
            success=row["ok"] / row["n"] if row["n"] else None,
            p50=quantile(bounds, row["delta"], 0.5),
            p99=quantile(bounds, row["delta"], 0.99),
            denials=row["denials"],
            requests=row["total"],
        )
        for key, row in acc.items()
    ]
    out.sort(key=lambda r: (-r.rps, -r.requests, r.route))
    return out


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.0f}ms" if ms >= 10 else f"{ms:.1f}ms"


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (control characters, escape sequences) shown
    escaped: a route is what a caller sent."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(table: Sequence[Row], limit: int, width: int, header: str = "") -> str:
    cols = ("DIR", "RPS", "SUCCESS", "P50", "P99", "DENIED", "TOTAL")
    fixed = 4 + 9 + 8 + 8 + 8 + 7 + 9 + len(cols)
    route_w = max(20, width - fixed)
    lines = [header] if header else []
    lines.append(
        f"{'DIR':<4} {'ROUTE':<{route_w}} {'RPS':>9} {'SUCCESS':>8} {'P50':>8} {'P99':>8} {'DENIED':>7} {'TOTAL':>9}"
    )
    for r in table[:limit]:
        route = _printable(r.route)
        route = route if len(route) <= route_w else route[: route_w - 1] + "…"
        success = "-" if r.success is None else f"{r.success * 100:.1f}%"
        lines.append(
            f"{'in' if r.direction == 'inbound' else 'out':<4} {route:<{route_w}} {r.rps:>9.1f} {success:>8} "
            f"{_ms(r.p50):>8} {_ms(r.p99):>8} {r.denials:>7} {r.requests:>9}"
        )
    if not table:
        lines.append("(no requests or connections seen yet)")
    elif len(table) > limit:
        lines.append(f"... {len(table) - limit} more routes (--limit)")
    return "\n".join(lines)


def _title(snapshots: Sequence[Snapshot], addresses: Sequence[str]) -> str:
    who = sorted({str(s.get("workload", "?")) for s in snapshots})
    return f"sidemesh top: {', '.join(who)} ({len(addresses)} sidecar{'s' * (len(addresses) > 1)})"


def run_top(
    addresses: Sequence[str],
    interval: float,
    once: bool,
    limit: int,
    direction: str,
    out: TextIO = sys.stdout,
    fetcher: Callable[[str], Snapshot] = fetch,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    before = [fetcher(a) for a in addresses]
    started = time.monotonic()
    while True:
        sleep(interval)
        after = [fetcher(a) for a in addresses]
        now = time.monotonic()
        table = [r for r in rows(before, after, now - started) if direction in ("all", r.direction)]
        width = shutil.get_terminal_size((120, 24)).columns
        text = render(table, limit, width, _title(after, addresses))
        if once:
            print(text, file=out)
            return 0
        # A terminal is redrawn in place; a pipe or a file gets each reading after the last, with
        # no escape codes in it (they were written there too).
        home = "\x1b[H\x1b[2J" if out.isatty() else "\n"
        out.write(home + text + f"\n\nevery {interval:g}s; Ctrl-C to stop\n")
        out.flush()
        before, started = after, now


def _main(args: argparse.Namespace) -> int:
    from sidemesh.cli import CLIError

    try:
        interval = parse_duration(args.interval).total_seconds()
    except ValueError as exc:
        raise CLIError(f"--interval: {exc}") from exc
    if interval <= 0:
        raise CLIError("--interval: must be above 0 (e.g. 1s)")
    if args.limit < 1:
        raise CLIError("--limit: must be at least 1")
    if any("://" in a for a in args.addresses):
        raise CLIError("ADMIN_ADDRESS is HOST:PORT, without http:// (e.g. 127.0.0.1:15000)")
    args.addresses = list(dict.fromkeys(args.addresses))  # (one sidecar named twice counted twice)
    for address in args.addresses:
        try:
            parse_hostport("address", address)
        except ValueError as exc:
            why = str(exc).split(": ", 1)[1]  # without the option's name: ADMIN_ADDRESS is positional
            raise CLIError(
                f"ADMIN_ADDRESS {why}: give sidecar admin addresses as HOST:PORT, e.g. 127.0.0.1:15000"
            ) from exc
    try:
        return run_top(args.addresses, interval, args.once, args.limit, args.direction)
    except TopError as exc:
        raise CLIError(str(exc)) from exc
    except ValueError as exc:  # parse_hostport's ConfigError
        raise CLIError(f"{exc}: give sidecar admin addresses as HOST:PORT, e.g. 127.0.0.1:15000") from exc


def register(sub: Any) -> None:
    p = sub.add_parser(
        "top",
        help="live table of a workload's busiest routes (requests/s, success rate, p50/p99, denials)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "addresses",
        nargs="*",
        default=["127.0.0.1:15000"],
        metavar="ADMIN_ADDRESS",
        help="sidecar admin addresses HOST:PORT, one per replica, summed (default: 127.0.0.1:15000)",
    )
    p.add_argument("--interval", default="2s", help="refresh interval, e.g. 1s, 500ms (default: 2s)")
    p.add_argument("--once", action="store_true", help="print one table over one interval and exit")
    p.add_argument("--limit", type=int, default=20, help="rows shown, busiest first (default: 20)")
    p.add_argument(
        "--direction",
        choices=("all", "inbound", "outbound"),
        default="all",
        help="inbound: requests the workload served; outbound: requests it made (default: all)",
    )
    p.set_defaults(handler=_main)
