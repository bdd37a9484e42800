"""Reliability: faults survived, a soak, and connection floods, under steady load through a sidecar pair.

    .venv/bin/python -m bench.reliability [--minutes-soak N] [--quick] [--keep]

The whole mesh runs as processes on this machine, the way `sidemesh demo` runs it (its `Demo` and
`Proc` do the process bookkeeping): a CA, the controller on a directory of manifests, and three
workloads (frontend, cart, a stranger), each behind its own sidecar (`--capture none`) on its own
loopback address. The cart application is a separate process (`python -m bench.reliability app`),
so it can be killed and started again.

Load, for the whole run, from a thread of this process: short request/response exchanges over new
connections at a fixed rate (200/s: connect to the frontend sidecar's outbound port, send a line,
read the cart's answer, close) and a few long-lived connections exchanging a line every 100 ms. Every
exchange has a client timeout (10 s): one that runs out is counted as hung. Then each fault in turn,
with the requests that failed while it lasted, the longest latency seen, and how long traffic took
to recover. Results: ``bench/results/RELIABILITY.md`` and ``.json``.

Two internal commands serve the bench itself: ``app`` (the cart: answers every line with ``OK``
and the line) and ``flood`` (connection floods and slow clients, from a process of their own so
that their CPU does not slow this process's well-behaved clients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidemesh.demo import ALLOW, MANIFESTS, TD, Demo, Proc, _free_net, _get, _interrupt, _sidemesh

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

HOSTS = {"frontend": 1, "cart": 2, "stranger": 3}
CONTROL = 100  # the CA and the controller
CA_PORT, CA_METRICS = 15012, 15014
CTL_PORT, CTL_STATUS = 15010, 15015
INBOUND, ADMIN, HEALTH = 15006, 15000, 15020
OUT = 18080  # the frontend's (and the stranger's) outbound listener: cart.shop:80
APP_PORT = 8080

CLIENT_TIMEOUT = 10.0  # every exchange; one that runs out counts as hung
LONG_INTERVAL = 0.1
RESUME_TARGET = 5.0  # "traffic resumes within seconds"
FLOOD_P99_TARGET_MS = 250.0
DEFAULT_TTL = 100
STORM_TTL = 20

# start (monotonic), latency (s), kind ("short"/"long"), error ("": ok)
Record = tuple[float, float, str, str]
Result = dict[str, Any]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(exc, RuntimeError) and "closed" in str(exc):  # uvloop: write on a closed transport
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.__class__.__name__}({os.strerror(exc.errno)})"
    return exc.__class__.__name__


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Window:
    """The requests that started in a time window, and how they ended."""

    requests: int
    failed: int
    hung: int
    errors: dict[str, int]
    failed_by_kind: dict[str, int]
    max_latency_ms: float
    p50_ms: float | None
    p99_ms: float | None
    seconds_with_failures: int
    worst_second_failures: int
    first_failure_s: float | None  # relative to the fault
    last_failure_s: float | None
    recovery_s: float | None  # first success after the last failure, relative to the fault
    recovered: bool
    new_connections_recovery_s: float | None = None  # the same, counting short exchanges only


class Load:
    """Short exchanges over new connections at ``rate`` per second, plus ``long_conns`` connections
    exchanging a line every 100 ms; in a thread of its own, on its own event loop."""

    def __init__(self, host: str, port: int, rate: float, long_conns: int, timeout: float = CLIENT_TIMEOUT):
        self.host, self.port, self.rate, self.long_conns, self.timeout = host, port, rate, long_conns, timeout
        self.records: list[Record] = []
        self.inflight: dict[int, float] = {}
        self.skipped: list[tuple[float, int]] = []  # exchanges not started because the generator fell behind
        self.started = 0.0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._shorts: set[asyncio.Task[None]] = set()

    # -- lifecycle (called from the main thread) ---------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = _new_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._main(ready))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="load", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the load generator did not start")
        self.started = time.monotonic()

    def stop(self) -> None:
        if self._loop is None or self._stop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.timeout + 5)

    def settle(self, until: float) -> None:
        """Wait until every exchange that started before ``until`` has ended."""
        deadline = time.monotonic() + self.timeout + 2
        while time.monotonic() < deadline and any(t < until for t in list(self.inflight.values())):
            time.sleep(0.05)

    # -- the clients ---------------------------------------------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._long(i)) for i in range(self.long_conns)]
        tasks.append(asyncio.create_task(self._generate()))
        ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._shorts:
            await asyncio.wait(list(self._shorts), timeout=self.timeout + 1)

    async def _generate(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while True:
            next_at += interval
            task = asyncio.create_task(self._short())
            self._shorts.add(task)
            task.add_done_callback(self._shorts.discard)
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # fell behind by a second (starved of CPU): do not burst to catch up
                self.skipped.append((time.monotonic(), int(-delay * self.rate)))
                next_at = time.monotonic()

    async def _short(self) -> None:
        key = next(self._ids)
        t0 = time.monotonic()
        self.inflight[key] = t0
        err = ""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                request = b"REQ %d\n" % key
                writer.write(request)
                line = await reader.readline()
            if line != b"OK " + request:
                err = "eof" if not line else "bad answer"
        except Exception as exc:
            err = _error_name(exc)
        finally:
            if writer is not None:
                writer.close()
            self.records.append((t0, time.monotonic() - t0, "short", err))
            del self.inflight[key]

    async def _long(self, index: int) -> None:
        while True:
            key = next(self._ids)
            t0 = time.monotonic()
            self.inflight[key] = t0
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                for n in itertools.count():
                    t0 = time.monotonic()
                    self.inflight[key] = t0
                    message = b"PING %d %d\n" % (index, n)
                    async with asyncio.timeout(self.timeout):
                        writer.write(message)
                        line = await reader.readline()
                    if line != b"OK " + message:
                        raise ConnectionError("eof" if not line else "bad answer")
                    self.records.append((t0, time.monotonic() - t0, "long", ""))
                    self.inflight.pop(key, None)
                    await asyncio.sleep(max(0.0, LONG_INTERVAL - (time.monotonic() - t0)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                name = str(exc) if type(exc) is ConnectionError else _error_name(exc)
                self.records.append((t0, time.monotonic() - t0, "long", name))
            finally:
                self.inflight.pop(key, None)
                if writer is not None:
                    writer.close()
            await asyncio.sleep(LONG_INTERVAL)

    # -- figures (main thread) -----------------------------------------------------------------

    def window(self, t0: float, t1: float, fault: float | None = None) -> Window:
        recs = [r for r in list(self.records) if t0 <= r[0] < t1]
        ok = [r for r in recs if not r[3]]
        bad = [r for r in recs if r[3]]
        lat = sorted(r[1] for r in ok)
        per_second = Counter(int(r[0] - self.started) for r in bad)
        ref = t0 if fault is None else fault
        recovery: float | None = None
        recovered = True
        if bad:
            last = max(r[0] for r in bad)
            after = [r[0] for r in ok if r[2] == "short" and r[0] > last]
            recovered = bool(after)
            recovery = (min(after) - ref) if after else None
        short_recovery: float | None = None
        if short_bad := [r[0] for r in bad if r[2] == "short"]:
            after_short = [r[0] for r in ok if r[2] == "short" and r[0] > max(short_bad)]
            short_recovery = (min(after_short) - ref) if after_short else None
        return Window(
            requests=len(recs),
            failed=len(bad),
            hung=sum(1 for r in bad if r[3] == "timeout"),
            errors=dict(Counter(r[3] for r in bad).most_common()),
            failed_by_kind=dict(Counter(r[2] for r in bad)),
            max_latency_ms=round(max((r[1] for r in recs), default=0.0) * 1000, 1),
            p50_ms=round(_pct(lat, 50) * 1000, 2) if lat else None,
            p99_ms=round(_pct(lat, 99) * 1000, 2) if lat else None,
            seconds_with_failures=len(per_second),
            worst_second_failures=max(per_second.values(), default=0),
            first_failure_s=round(min(r[0] for r in bad) - ref, 2) if bad else None,
            last_failure_s=round(max(r[0] for r in bad) - ref, 2) if bad else None,
            recovery_s=round(recovery, 2) if recovery is not None else None,
            recovered=recovered,
            new_connections_recovery_s=round(short_recovery, 2) if short_recovery is not None else None,
        )

    def series(self) -> list[list[int]]:
        """[second, ok, failed] for every second of the run."""
        ok: Counter[int] = Counter()
        bad: Counter[int] = Counter()
        for start, _lat, _kind, err in list(self.records):
            (bad if err else ok)[int(start - self.started)] += 1
        last = max([*ok, *bad], default=-1)
        return [[s, ok[s], bad[s]] for s in range(last + 1)]


def _pct(values: Sequence[float], pct: float) -> float:
    if not values:
        return 0.0
    k = (len(values) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def probe(host: str, port: int, timeout: float = 5.0) -> str:
    """One exchange as the app would make it: ``ok`` or how it failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"REQ probe\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return _error_name(exc)
    if data == b"OK REQ probe\n":
        return "ok"
    return "eof" if not data else "bad answer"


# -- the mesh ------------------------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (kB), open file descriptors and CPU seconds of a process."""
    found = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    rss = int(found.group(1)) if found else 0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": cpu}


def fd_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft} (hard {hard})"
    return "?"


def _machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick, values[7] / tick


class Stalls:
    """A thread that sleeps 50 ms at a time and notes when it woke up late: the machine (or this
    process) was not running it. A stall seen here is not the sidecar's doing."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.seen: list[tuple[float, float]] = []  # (when it began, how long)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalls", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            if now - last > self.threshold:
                self.seen.append((last, now - last))
            last = now

    def worst(self, t0: float, t1: float) -> float:
        return round(max((d for t, d in list(self.seen) if t0 <= t < t1), default=0.0), 2)

    def stop(self) -> None:
        self._stop.set()


class CpuMeter:
    """How busy the machine was during a window, and how much of that was not this run's processes."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self.pids = pids
        self.busy0, self.total0, self.steal0 = _machine_busy()
        self.ours0 = self._ours()

    def _ours(self) -> dict[int, float]:
        # 0: this process; -1: children already reaped (their whole life); then each live child
        out = {
            0: sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            -1: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]),
        }
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[pid] = proc_stats(pid)["cpu_s"]
        return out

    def read(self) -> dict[str, float]:
        busy, total, steal = _machine_busy()
        ours1 = self._ours()
        ours = sum(v - self.ours0.get(pid, 0.0) for pid, v in ours1.items())
        ours -= sum(v for pid, v in self.ours0.items() if pid not in ours1)  # reaped: counted in -1 whole
        span = max(total - self.total0, 1e-9)
        cores = os.cpu_count() or 1
        return {
            "machine_busy_pct": round((busy - self.busy0) / span * 100, 1),
            "this_run_pct_of_machine": round(min(ours, busy - self.busy0) / span * 100, 1),
            "others_pct_of_machine": round(max(0.0, busy - self.busy0 - ours) / span * 100, 1),
            "steal_pct": round((steal - self.steal0) / span * 100, 1),
            "cores": cores,
        }


class Mesh:
    """The processes of the run, started (and started again) by name."""

    def __init__(self, root: Path, ttl: int) -> None:
        self.demo = Demo(root, _free_net())
        self.root = root
        self.ttl = ttl
        self.control = self.demo.addr(CONTROL)
        self.procs: dict[str, Proc] = {}
        self.starts: Counter[str] = Counter()
        self.mesh_dir = root / "mesh"
        self.bundle = root / "ca" / "root-cert.pem"

    def addr(self, name: str) -> str:
        return self.demo.addr(HOSTS[name])

    def _log_name(self, name: str) -> str:
        self.starts[name] += 1
        n = self.starts[name]
        return name if n == 1 else f"{name}-{n}"

    # -- starting --------------------------------------------------------------------------------

    def bootstrap(self) -> None:
        _sidemesh("ca", "bootstrap", "--dir", str(self.root / "ca"), "--trust-domain", TD)
        tokens = self.root / "tokens.yaml"
        for name in [*HOSTS, "controller"]:
            identity = "sidemesh-system/sidemesh-controller" if name == "controller" else f"shop/{name}"
            (self.root / f"{name}.token").write_text(
                _sidemesh("ca", "local-token", "--file", str(tokens), "--identity", identity)
            )
        self.mesh_dir.mkdir()
        (self.mesh_dir / "workloads.yaml").write_text(MANIFESTS.format(net=self.demo.net))
        (self.mesh_dir / "cart-allow-frontend.yaml").write_text(ALLOW.format(who="frontend"))

    def start_ca(self, ttl: int) -> Proc:
        proc = self.demo.start(
            self._log_name("ca"),
            *("ca", "serve", "--authenticator", "local", "--token-file", str(self.root / "tokens.yaml")),
            *("--ca-dir", str(self.root / "ca"), "--listen", f"{self.control}:{CA_PORT}"),
            *("--metrics-listen", f"{self.control}:{CA_METRICS}"),
            *("--default-ttl", f"{ttl}s", "--min-ttl", f"{min(ttl, 10)}s"),
        )
        self.procs["ca"] = proc
        proc.wait_event("CA serving")
        return proc

    def start_controller(self) -> Proc:
        proc = self.demo.start(
            self._log_name("controller"),
            *("controller", "serve", "--source", "directory", "--config-dir", str(self.mesh_dir)),
            *("--listen", f"{self.control}:{CTL_PORT}", "--metrics-listen", f"{self.control}:{CTL_STATUS}"),
            *(
                "--ca-address",
                f"{self.control}:{CA_PORT}",
                "--token-file",
                str(self.root / "controller.token"),
            ),
            *("--bundle-file", str(self.bundle), "--default-policy", "deny"),
        )
        self.procs["controller"] = proc
        proc.wait_event("controller serving")
        return proc

    def sidecar_args(self, name: str) -> list[str]:
        a = self.addr(name)
        args = [
            *("proxy", "run", "--capture", "none", "--controller", f"{self.control}:{CTL_PORT}"),
            *("--workload", f"shop/{name}-1", "--service-account", name),
            *("--ca-address", f"{self.control}:{CA_PORT}", "--token-file", str(self.root / f"{name}.token")),
            *("--bundle-file", str(self.bundle), "--inbound-listen", f"{a}:{INBOUND}"),
            *("--admin-listen", f"{a}:{ADMIN}", "--health-listen", f"{a}:{HEALTH}", "--app-host", a),
            *("--default-policy", "deny", "--log-level", "info", "--access-log", "false"),
        ]
        if name != "cart":
            args += ["--outbound", f"{a}:{OUT}=cart.shop:80"]
        return args

    def start_sidecar(self, name: str, wait: bool = True) -> Proc:
        proc = self.demo.start(self._log_name(f"{name}-sidecar"), *self.sidecar_args(name))
        self.procs[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def wait_ready(self, name: str, timeout: float = 30.0) -> float:
        began = time.monotonic()
        proc = self.procs[name]
        while time.monotonic() - began < timeout:
            if self.ready_status(name) == 200:
                return time.monotonic() - began
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); its log: {proc.log}")
            time.sleep(0.05)
        raise TimeoutError(f"{proc.name} not ready within {timeout}s; its log: {proc.log}")

    def _spawn(self, log_name: str, args: Sequence[str], stdout: int = subprocess.DEVNULL) -> Proc:
        log = self.root / f"{log_name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                [sys.executable, "-m", "bench.reliability", *args],
                stdout=stdout,
                stderr=handle,
                cwd=REPO,
                start_new_session=True,
            )
        proc = Proc(log_name, popen, log)
        self.demo.procs.append(proc)
        return proc

    def start_app(self) -> Proc:
        proc = self._spawn(self._log_name("cart-app"), ["app", "--listen", f"{self.addr('cart')}:{APP_PORT}"])
        self.procs["app"] = proc
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.addr("cart"), APP_PORT), 0.5):
                return proc
            if proc.popen.poll() is not None:
                raise RuntimeError(f"the cart app exited; its log: {proc.log}")
            time.sleep(0.02)
        raise TimeoutError("the cart app did not listen within 15 s")

    def start_flood(self, args: Sequence[str]) -> Proc:
        return self._spawn(self._log_name("flood"), ["flood", *args], stdout=subprocess.PIPE)

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 40.0) -> float:
        """Signal a process and wait for it to exit; returns the seconds that took."""
        proc = self.procs[name]
        began = time.monotonic()
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        return time.monotonic() - began

    # -- looking at the sidecars -----------------------------------------------------------------

    def admin(self, name: str, path: str, timeout: float = 2.0) -> Any:
        try:
            status, body = _get(f"http://{self.addr(name)}:{ADMIN}{path}", timeout)
            return json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None

    def ready_status(self, name: str) -> int | None:
        try:
            return _get(f"http://{self.addr(name)}:{HEALTH}/healthz/ready", 2.0)[0]
        except OSError:
            return None

    def metrics(self, name: str) -> dict[str, float]:
        url = (
            f"http://{self.control}:{CA_METRICS}/metrics"
            if name == "ca"
            else f"http://{self.addr(name)}:{HEALTH}/metrics"
        )
        try:
            body = _get(url, 2.0)[1].decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def certs(self, name: str) -> Result:
        return self.admin(name, "/certs") or {}

    def controller_connected(self, name: str) -> bool:
        config = self.admin(name, "/config") or {}
        return bool(config.get("source", {}).get("connected"))

    def connections(self, name: str) -> int | None:
        conns = self.admin(name, "/connections", timeout=5.0)
        return len(conns) if isinstance(conns, list) else None

    def stats(self, name: str) -> dict[str, float]:
        return proc_stats(self.procs[name].popen.pid)

    def healthy(self, timeout: float = 150.0) -> float:
        """Wait until every sidecar is ready and connected to the controller and frontend -> cart works."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if (
                all(self.ready_status(n) == 200 and self.controller_connected(n) for n in HOSTS)
                and probe(self.addr("frontend"), OUT) == "ok"
            ):
                return time.monotonic() - began
            time.sleep(0.25)
        raise TimeoutError(f"the mesh did not become healthy within {timeout:.0f}s")


# -- phases --------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    fault: str
    target: str
    verdict: str
    met: bool | None
    window: Window | None = None
    recovery_s: float | None = None
    details: Result = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.began = time.monotonic()

    def phase(self, title: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {title} (t+{time.monotonic() - self.began:.0f}s)", flush=True)

    def info(self, text: str) -> None:
        print(f"      {text}", flush=True)


def _fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def _zero_failures(w: Window) -> tuple[bool, str]:
    if w.failed == 0:
        return True, "met: 0 failed"
    return False, f"MISSED: {w.failed} failed ({_errors_text(w)})"


def _errors_text(w: Window) -> str:
    return ", ".join(f"{k} {v}" for k, v in w.errors.items()) or "none"


def _injector_restart() -> Result:
    """Run the injector-restart scenario (an integration test that plays the API server's part)
    and take its figures from the line it prints."""
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
        "tests/integration/test_injector.py::test_injector_restarted_under_admissions_never_half_injects",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "the scenario did not finish within 300 s"}
    m = re.search(
        r"injector restart: (\d+) calls, (\d+) injected, (\d+) unanswered, (\d+) bad, down ([\d.]+) s",
        proc.stdout,
    )
    if m is None:
        return {"error": f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}"}
    calls, injected, unanswered, bad, down = (float(g) for g in m.groups())
    return {
        "calls": int(calls),
        "injected": int(injected),
        "unanswered": int(unanswered),
        "bad": int(bad),
        "down_s": down,
        "test_passed": proc.returncode == 0,
    }


class Bench:
    def __init__(self, mesh: Mesh, load: Load, progress: Progress) -> None:
        self.mesh = mesh
        self.load = load
        self.progress = progress
        self.rows: list[Row] = []
        self.marks: list[tuple[str, float, float]] = []
        self.meter: CpuMeter | None = None
        self.stalls = Stalls()

    def _meter(self) -> CpuMeter:
        self.meter = CpuMeter(lambda: [p.popen.pid for p in self.mesh.demo.procs if p.popen.poll() is None])
        return self.meter

    def _close(self, row: Row, began: float, fault: float | None = None) -> Row:
        ended = time.monotonic()
        cpu = self.meter.read() if self.meter is not None else None
        self.load.settle(ended)
        row.window = self.load.window(began, ended, fault)
        lag = sum(n for t, n in list(self.load.skipped) if began <= t < ended)
        if cpu is not None:
            row.details["cpu"] = cpu
        row.details["longest_stall_of_the_bench_process_s"] = self.stalls.worst(began, ended)
        if lag:
            row.details["exchanges_not_started_generator_behind"] = lag
        if row.recovery_s is None and row.window.failed:
            row.recovery_s = row.window.recovery_s
        self.marks.append((row.key, round(began - self.load.started, 1), round(ended - self.load.started, 1)))
        self.rows.append(row)
        return row

    def _done(self, row: Row) -> Row:
        w = row.window
        if w is not None:
            self.progress.info(
                f"{w.requests} requests, {w.failed} failed ({_errors_text(w)}), max latency {w.max_latency_ms:.0f} ms"
            )
        self.progress.info(f"verdict: {row.verdict}")
        return row

    def _rotations(self) -> dict[str, int]:
        return {n: int(self.mesh.certs(n).get("rotations", 0)) for n in ("frontend", "cart")}

    # -- certificates ----------------------------------------------------------------------------

    def short_ttl(self) -> Row:
        """At the start the CA issues 20 s certificates: how often do the sidecars renew?"""
        m = self.mesh
        self.progress.phase(f"renewal schedule with {STORM_TTL} s certificates (the CA's --default-ttl)")
        began = time.monotonic()
        self._meter()
        r0, refused0 = self._rotations(), _sum(m.metrics("ca"), "sidemesh_ca_requests_refused_total")
        observe = 15.0
        time.sleep(observe)
        r1, refused1 = self._rotations(), _sum(m.metrics("ca"), "sidemesh_ca_requests_refused_total")
        cert = m.certs("frontend")
        per = {n: r1[n] - r0[n] for n in r0}
        expected = observe / (STORM_TTL * 0.45)
        self.progress.info(f"rotations in {observe:.0f} s: {per} (expected about {expected:.1f} each)")
        # Back to a lifetime the sidecar renews sensibly (see the notes), for the rest of the run.
        m.stop("ca")
        m.start_ca(m.ttl)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            lifetimes = [_lifetime(m.certs(n)) for n in ("frontend", "cart")]
            if all(lt is not None and lt > STORM_TTL + 65 for lt in lifetimes):
                break
            time.sleep(0.5)
        m.healthy()
        storm = max(per.values()) > 2 * expected + 1
        row = Row(
            "ttl20",
            f"renewal schedule at a {STORM_TTL} s certificate lifetime",
            f"about {expected:.1f} renewals per sidecar in {observe:.0f} s (renew at ~50% of life); 0 failed",
            "",
            None,
            details={
                "observed_s": observe,
                "rotations": per,
                "expected_rotations": round(expected, 1),
                "ca_refusals": refused1 - refused0,
                "certificate": {k: cert.get(k) for k in ("not_before", "not_after", "last_error")},
            },
        )
        self._close(row, began)
        assert row.window is not None
        ok, text = _zero_failures(row.window)
        row.met = ok and not storm
        row.verdict = (
            f"MISSED: {max(per.values())} renewals in {observe:.0f} s (renewal storm; CA refused "
            f"{refused1 - refused0:.0f} as rate limited); traffic {text}"
            if storm
            else text
        )
        return self._done(row)

    def rotations(self, count: int = 10) -> Row:
        m = self.mesh
        self.progress.phase(
            f"{count} certificate rotations of each sidecar under load ({m.ttl} s certificates)"
        )
        began = time.monotonic()
        self._meter()
        start = self._rotations()
        serials: dict[str, list[tuple[float, str]]] = {n: [] for n in start}
        deadline = began + count * m.ttl * 0.6 + 60
        done: dict[str, int] = dict.fromkeys(start, 0)
        while time.monotonic() < deadline:
            for n in start:
                cert = m.certs(n)
                if cert and (not serials[n] or serials[n][-1][1] != cert.get("serial")):
                    serials[n].append((time.monotonic(), str(cert.get("serial"))))
                done[n] = int(cert.get("rotations", 0)) - start[n] if cert else done[n]
            if all(v >= count for v in done.values()):
                break
            time.sleep(0.25)
        intervals = [b[0] - a[0] for s in serials.values() for a, b in itertools.pairwise(s[1:])]
        mean = statistics.mean(intervals) if intervals else None
        row = Row(
            "rotations",
            f"{count} certificate rotations per sidecar ({m.ttl} s certificates)",
            "0 failed",
            "",
            None,
            details={
                "rotations": done,
                "mean_interval_s": round(mean, 1) if mean else None,
                "renewal_at_fraction_of_ttl": round(mean / m.ttl, 2) if mean else None,
            },
        )
        self._close(row, began)
        assert row.window is not None
        ok, text = _zero_failures(row.window)
        row.met = ok and all(v >= count for v in done.values())
        row.verdict = text if row.met or not ok else f"MISSED: only {done} rotations"
        if mean:
            row.notes.append(
                f"A rotation every {mean:.1f} s on average, i.e. at {mean / m.ttl:.0%} of the {m.ttl} s lifetime "
                "(the sidecar aims at 40-50%; see the renewal finding)."
            )
        return self._done(row)

    def ca_down(self) -> Row:
        m = self.mesh
        outage = round(m.ttl * 0.6)
        self.progress.phase(f"CA stopped for {outage} s (> half the {m.ttl} s lifetime), then started again")
        began = time.monotonic()
        self._meter()
        # Stop it when both certificates have enough life left to outlast the outage (right after a
        # renewal, with the sidecar renewing at half life): the point is to see renewals resume.
        need = outage + 0.1 * m.ttl
        waited = time.monotonic()
        while time.monotonic() - waited < 2 * m.ttl:
            remaining = {n: _remaining(m.certs(n)) for n in ("frontend", "cart")}
            if all(v is not None and v >= need for v in remaining.values()):
                break
            time.sleep(0.2)
        waited_s = round(time.monotonic() - waited, 1)
        fault = time.monotonic()
        m.stop("ca")
        not_ready: Counter[str] = Counter()
        errors: set[str] = set()
        while time.monotonic() - fault < outage:
            for n in ("frontend", "cart"):
                status = m.ready_status(n)
                if status != 200:
                    not_ready[f"{n} {status or 'no answer within 2 s'}"] += 1
                err = m.certs(n).get("last_error")
                if err:
                    errors.add(str(err)[:120])
            time.sleep(1.0)
        serials = {n: m.certs(n).get("serial") for n in ("frontend", "cart")}
        back = time.monotonic()
        m.start_ca(m.ttl)
        ca_up = time.monotonic()
        renewed: dict[str, float | None] = dict.fromkeys(serials)
        while time.monotonic() - ca_up < m.ttl and None in renewed.values():
            for n in serials:
                if renewed[n] is None and m.certs(n).get("serial") not in (None, serials[n]):
                    renewed[n] = round(time.monotonic() - ca_up, 2)
            time.sleep(0.25)
        expired = [n for n in ("frontend", "cart") if m.certs(n).get("state") == "expired"]
        row = Row(
            "ca",
            f"CA down {outage} s (certificate lifetime {m.ttl} s)",
            "0 failed; readiness stays 200; renewals resume (serial changes) after the CA is back",
            "",
            None,
            details={
                "outage_s": round(back - fault, 1),
                "ca_restart_s": round(ca_up - back, 2),
                "waited_for_fresh_certificates_s": waited_s,
                "remaining_life_at_stop_s": remaining,
                "renewed_after_ca_back_s": renewed,
                "not_ready_samples": dict(not_ready),
                "last_errors_seen": sorted(errors)[:3],
                "expired": expired,
            },
        )
        self._close(row, began)
        assert row.window is not None
        ok, text = _zero_failures(row.window)
        resumed = all(v is not None for v in renewed.values())
        row.met = ok and resumed and not not_ready and not expired
        parts = [text]
        parts.append(
            "renewed "
            + ", ".join(f"{n} {v:.1f} s" if v is not None else f"{n} NOT" for n, v in renewed.items())
            + " after the CA was back"
        )
        if not_ready:
            parts.append(f"readiness 503 in {sum(not_ready.values())} samples")
        row.verdict = "; ".join(parts)
        row.recovery_s = max((v for v in renewed.values() if v is not None), default=None)
        return self._done(row)

    def ca_expiry(self) -> Row:
        m = self.mesh
        self.progress.phase("CA stopped until the certificates expire, then started again")
        began = time.monotonic()
        self._meter()
        names = ("frontend", "cart")
        before = {n: m.certs(n) for n in names}
        remaining = {n: _remaining(c) for n, c in before.items()}
        self.progress.info(f"remaining lifetimes {remaining}: waiting for them to run out")
        log_marks = {n: len(m.procs[n].events()) for n in names}
        fault = time.monotonic()
        m.stop("ca")
        expired_at: dict[str, float | None] = dict.fromkeys(names)
        deadline = fault + max(v or 0 for v in remaining.values()) + 30
        while time.monotonic() < deadline and None in expired_at.values():
            for n in names:
                if expired_at[n] is None and m.certs(n).get("state") == "expired":
                    expired_at[n] = time.monotonic()
            time.sleep(0.25)
        all_expired = time.monotonic()
        time.sleep(10)  # expired, CA still down: what does the sidecar show?
        seen: Result = {}
        now = time.time()
        for n in names:
            gauge = m.metrics(n).get("sidemesh_proxy_certificate_expiry_timestamp_seconds")
            records = m.procs[n].events()[log_marks[n] :]
            loud = [r for r in records if r.get("level") == "error" and "SVID" in str(r.get("event", ""))]
            seen[n] = {
                "readiness": m.ready_status(n),
                "ready_body": _ready_body(m, n),
                "certs_state": m.certs(n).get("state"),
                "expiry_metric_minus_now_s": round(gauge - now, 1) if gauge is not None else None,
                "error_log_lines_after_expiry": len(loud),
                "first_error_log": {k: loud[0].get(k) for k in ("ts", "level", "event", "state", "retry_in")}
                if loud
                else None,
                "renewal_attempts_logged": sum(
                    1 for r in records if r.get("event") == "SVID renewal failed; retrying"
                ),
            }
        long_ok_while_expired = sum(
            1
            for r in list(self.load.records)
            if all_expired <= r[0] < time.monotonic() and r[2] == "long" and not r[3]
        )
        short_ok_while_expired = sum(
            1
            for r in list(self.load.records)
            if all_expired <= r[0] < time.monotonic() and r[2] == "short" and not r[3]
        )
        back = time.monotonic()
        m.start_ca(m.ttl)
        ca_up = time.monotonic()
        renewed: dict[str, float | None] = dict.fromkeys(names)
        while time.monotonic() - ca_up < 120 and None in renewed.values():
            for n in names:
                if renewed[n] is None and m.certs(n).get("state") == "valid":
                    renewed[n] = round(time.monotonic() - ca_up, 2)
            time.sleep(0.25)
        self.progress.info(f"renewed after the CA came back: {renewed}")
        first_ok = self._first_success_after(ca_up, timeout=60)
        try:
            healthy_after = round(m.healthy(), 1)
        except TimeoutError:
            healthy_after = None
        row = Row(
            "expiry",
            "CA down until the certificates expire",
            "expiry reported loudly (readiness 503, error log, expiry metric in the past); traffic recovers after the CA is back",
            "",
            None,
            details={
                "remaining_life_at_stop_s": remaining,
                "expired_after_stop_s": {
                    n: round(v - fault, 1) if v is not None else None for n, v in expired_at.items()
                },
                "down_after_expiry_s": round(back - all_expired, 1),
                "sidecars_while_expired": seen,
                "long_lived_exchanges_ok_while_expired": long_ok_while_expired,
                "short_exchanges_ok_while_expired": short_ok_while_expired,
                "renewed_after_ca_back_s": renewed,
                "first_success_after_ca_back_s": first_ok,
                "mesh_healthy_again_after_s": healthy_after,
            },
        )
        self._close(row, began, fault=ca_up)
        loud_all = all(
            s["readiness"] == 503
            and s["error_log_lines_after_expiry"] > 0
            and (s["expiry_metric_minus_now_s"] or 0) < 0
            for s in seen.values()
        )
        row.met = loud_all and first_ok is not None
        signals = []
        for n, s in seen.items():
            signals.append(
                f"{n}: readiness {s['readiness']}, {s['error_log_lines_after_expiry']} error log line(s), "
                f"metric {s['expiry_metric_minus_now_s']} s from now"
            )
        row.verdict = ("loud" if loud_all else "NOT LOUD ENOUGH") + " (" + "; ".join(signals) + ")"
        row.verdict += (
            f"; traffic back {first_ok:.1f} s after the CA"
            if first_ok is not None
            else "; traffic NOT back within 60 s of the CA"
        )
        row.recovery_s = first_ok
        return self._done(row)

    def _first_success_after(self, t: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            oks = [r[0] for r in list(self.load.records) if r[0] >= t and r[2] == "short" and not r[3]]
            if oks:
                return round(min(oks) - t, 2)
            time.sleep(0.2)
        return None

    # -- control plane ---------------------------------------------------------------------------

    def controller(self, down_for: float = 10.0) -> Row:
        m = self.mesh
        self.progress.phase(
            f"controller SIGKILLed, {down_for:.0f} s down (policy change meanwhile), restarted"
        )
        began = time.monotonic()
        self._meter()
        stranger, frontend = m.addr("stranger"), m.addr("frontend")
        before = probe(stranger, OUT)
        log_marks = {n: len(m.procs[n].events()) for n in HOSTS}
        fault = time.monotonic()
        m.stop("controller", signal.SIGKILL)
        noticed: float | None = None
        probes: Counter[str] = Counter()
        wrote: float | None = None
        while time.monotonic() - fault < down_for:
            if noticed is None and not m.controller_connected("cart"):
                noticed = round(time.monotonic() - fault, 2)
            if wrote is None and time.monotonic() - fault > 3:
                (m.mesh_dir / "cart-allow-stranger.yaml").write_text(ALLOW.format(who="stranger"))
                wrote = time.monotonic()
            probes[probe(stranger, OUT)] += 1
            time.sleep(0.5)
        frontend_probe = probe(frontend, OUT)
        restart = time.monotonic()
        m.start_controller()
        serving = round(time.monotonic() - restart, 2)
        allowed: float | None = None
        while time.monotonic() - restart < 60:
            if probe(stranger, OUT, timeout=2) == "ok":
                allowed = round(time.monotonic() - restart, 2)
                break
            time.sleep(0.1)
        policies = (m.admin("cart", "/config") or {}).get("policies")
        retries = {
            n: [
                r.get("retry_in")
                for r in m.procs[n].events()[log_marks[n] :]
                if str(r.get("event", "")).startswith("controller stream lost")
            ]
            for n in HOSTS
        }
        (m.mesh_dir / "cart-allow-stranger.yaml").unlink()
        removed = time.monotonic()
        refused_again: float | None = None
        while time.monotonic() - removed < 30:
            if probe(stranger, OUT, timeout=2) != "ok":
                refused_again = round(time.monotonic() - removed, 2)
                break
            time.sleep(0.1)
        row = Row(
            "controller",
            f"controller SIGKILL, {down_for:.0f} s down, restarted",
            "0 failed; stranger refused and frontend allowed while it is down; a change made meanwhile applies after",
            "",
            None,
            details={
                "down_s": down_for,
                "stranger_before": before,
                "sidecar_noticed_after_s": noticed,
                "stranger_probes_while_down": dict(probes),
                "frontend_probe_while_down": frontend_probe,
                "controller_serving_after_s": serving,
                "change_applied_after_restart_s": allowed,
                "cart_policies_after": policies,
                "reconnect_delays_logged_s": retries,
                "removal_applied_after_s": refused_again,
            },
        )
        self._close(row, began, fault)
        assert row.window is not None
        ok, text = _zero_failures(row.window)
        enforced = before != "ok" and "ok" not in probes and frontend_probe == "ok"
        row.met = ok and enforced and allowed is not None and refused_again is not None
        row.verdict = (
            f"{text}; stranger refused in {sum(probes.values())}/{sum(probes.values())} probes while down"
            if enforced
            else f"{text}; ENFORCEMENT CHANGED while down: stranger {dict(probes)}, frontend {frontend_probe}"
        )
        row.verdict += (
            f"; resync: the change applied {allowed:.2f} s after the restart"
            if allowed is not None
            else "; the change made while down NEVER applied"
        )
        row.recovery_s = allowed
        return self._done(row)

    # -- data plane ------------------------------------------------------------------------------

    def app_restart(self) -> Row:
        m = self.mesh
        self.progress.phase("cart application killed (SIGKILL) and started again")
        began = time.monotonic()
        self._meter()
        time.sleep(2)
        fault = time.monotonic()
        m.stop("app", signal.SIGKILL)
        m.start_app()
        up = time.monotonic()
        time.sleep(3)
        row = Row(
            "app",
            "upstream app killed and restarted",
            "requests in flight fail cleanly (reset/EOF, none hung); new ones succeed once it listens",
            "",
            None,
            details={"app_down_s": round(up - fault, 2)},
        )
        self._close(row, began, fault)
        w = row.window
        assert w is not None
        recs = [r for r in list(self.load.records) if began <= r[0] < time.monotonic() and r[3]]
        in_flight = [r for r in recs if r[0] < fault]
        during = [r for r in recs if fault <= r[0] <= up]
        after = [r for r in recs if r[0] > up + 0.2]
        row.details.update(
            failed_in_flight=len(in_flight),
            failed_while_down=len(during),
            failed_after_app_back=len(after),
            failed_by_kind=w.failed_by_kind,
        )
        row.met = w.hung == 0 and not after
        row.verdict = (
            f"{'met' if row.met else 'MISSED'}: {w.failed} failed cleanly ({_errors_text(w)}): "
            f"{len(in_flight)} in flight, {len(during)} while the app was down ({up - fault:.2f} s), "
            f"{len(after)} after; {w.hung} hung"
        )
        return self._done(row)

    def sidecar_restart(self, name: str, sig: signal.Signals) -> Row:
        m = self.mesh
        how = (
            "SIGTERM (drain), then started again"
            if sig == signal.SIGTERM
            else "SIGKILL, started again at once"
        )
        self.progress.phase(f"{name} sidecar: {how}")
        began = time.monotonic()
        self._meter()
        time.sleep(2)
        old = m.procs[name]
        fault = time.monotonic()
        old.popen.send_signal(sig)
        early: str | None = None
        replacement: Proc | None = None
        if sig == signal.SIGTERM:
            # A replacement started while the old one drains (what a naive supervisor would do).
            attempt = m.start_sidecar(name, wait=False)
            started = time.monotonic()
            try:
                m.wait_ready(name, timeout=10)
                replacement, early = attempt, "started while the old one drained"
            except (RuntimeError, TimeoutError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    attempt.popen.wait(5)
                if attempt.popen.poll() is None:
                    attempt.popen.kill()
                    attempt.popen.wait()
                tail = attempt.log.read_text(errors="replace").strip().splitlines()
                early = f"exited {attempt.popen.returncode}: {tail[-1][:200] if tail else ''}"
        try:
            old.popen.wait(60)
        except subprocess.TimeoutExpired:
            old.popen.kill()
            old.popen.wait()
        exited = time.monotonic()
        if replacement is None:
            m.start_sidecar(name, wait=False)
            started = time.monotonic()
        ready_after = m.wait_ready(name) + (time.monotonic() - started if replacement else 0.0)
        ready = time.monotonic()
        first_ok = self._first_success_after(started, timeout=30)
        time.sleep(3)
        row = Row(
            f"sidecar-{name}-{sig.name.lower()}",
            f"{name} sidecar {sig.name} + restart",
            f"traffic resumes within {RESUME_TARGET:.0f} s; no request hangs",
            "",
            None,
            details={
                "old_process_exited_after_s": round(exited - fault, 2),
                "new_process_ready_after_start_s": round(ready_after, 2),
                "ready_after_signal_s": round(ready - fault, 2),
                "replacement_started_during_drain": early,
                "first_success_after_new_process_start_s": first_ok,
            },
        )
        self._close(row, began, fault)
        w = row.window
        assert w is not None
        # New connections are what "traffic resumes" is about; long-lived connections still open
        # when the drain timeout ends are reset by design, and are reported on their own.
        short_failed = w.failed_by_kind.get("short", 0)
        resumed = (w.new_connections_recovery_s if short_failed else 0.0) if w.failed else 0.0
        long_failed = w.failed - short_failed
        row.met = w.hung == 0 and resumed is not None and resumed <= RESUME_TARGET
        row.verdict = (
            f"{'met' if row.met else 'MISSED'}: new connections back {_fmt_s(resumed)} after the signal "
            f"(old process gone after {exited - fault:.1f} s, new one ready {ready_after:.1f} s after its start); "
            f"{w.failed} failed ({_errors_text(w)}: {short_failed} new connections, {long_failed} on long-lived "
            f"connections still open when the old process stopped: ended by the drain timeout or the kill), "
            f"{w.hung} hung"
        )
        row.recovery_s = resumed
        return self._done(row)

    # -- soak --------------------------------------------------------------------------------------

    def _sample(self, names: Sequence[str]) -> Result:
        out: Result = {}
        for n in names:
            rows = []
            for _ in range(5):
                s = self.mesh.stats(n)
                s["connections"] = self.mesh.connections(n) or 0
                rows.append(s)
                time.sleep(0.3)
            out[n] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        return out

    def soak(self, minutes: float) -> Row:
        m = self.mesh
        names = ("frontend", "cart")
        warm = 15.0 if minutes < 5 else 30.0
        self.progress.phase(f"soak: {minutes:g} min at a steady rate (after {warm:.0f} s of warm-up)")
        time.sleep(warm)
        began = time.monotonic()
        self._meter()
        rot0 = self._rotations()
        start = self._sample(names)
        trend: list[Result] = []
        end_at = began + minutes * 60
        next_report = began + 60
        while time.monotonic() < end_at - 3:
            sample = {n: m.stats(n) | {"connections": m.connections(n) or 0} for n in names}
            trend.append({"t": round(time.monotonic() - began, 1), **sample})
            if time.monotonic() >= next_report:
                next_report += 60
                self.progress.info(
                    f"{(time.monotonic() - began) / 60:.0f} min: "
                    + ", ".join(
                        f"{n} RSS {sample[n]['rss_kb'] / 1024:.1f} MB fds {sample[n]['fds']:.0f}"
                        for n in names
                    )
                )
            time.sleep(min(10.0, max(0.0, end_at - 3 - time.monotonic())))
        end = self._sample(names)
        rot1 = self._rotations()
        flat: dict[str, dict[str, Any]] = {}
        for n in names:
            flat[n] = {}
            for k, slack in (("rss_kb", 0), ("fds", 2), ("connections", 1)):
                a, b = start[n][k], end[n][k]
                growth = (b - a) / a if a else 0.0
                flat[n][k] = {
                    "start": a,
                    "end": b,
                    "growth_pct": round(growth * 100, 1),
                    "flat": b <= a * 1.05 + slack and b >= a * 0.95 - slack,
                }
            xs = [t["t"] / 60 for t in trend]
            ys = [t[n]["rss_kb"] / 1024 for t in trend]
            flat[n]["rss_slope_mb_per_min"] = round(_slope(xs, ys), 3) if len(xs) > 2 else None
            if len(ys) > 3:
                mid = ys[len(ys) // 2]
                flat[n]["rss_second_half_growth_pct"] = round((ys[-1] - mid) / mid * 100, 1)
                flat[n]["rss_largest_step_mb"] = round(max(b - a for a, b in itertools.pairwise(ys)), 1)
            flat[n]["cpu_pct"] = round((end[n]["cpu_s"] - start[n]["cpu_s"]) / (minutes * 60) * 100, 1)
        row = Row(
            "soak",
            f"soak {minutes:g} min",
            "0 failed; RSS, fds and open connections of each sidecar flat within 5%",
            "",
            None,
            details={
                "minutes": minutes,
                "warm_up_s": warm,
                "sidecars": flat,
                "rotations": {n: rot1[n] - rot0[n] for n in names},
                "rss_steps_over_1mb_in_both_sidecars_at_once": sum(
                    1
                    for a, b in itertools.pairwise(trend)
                    if all(b[n]["rss_kb"] - a[n]["rss_kb"] > 1024 for n in names)
                ),
                "trend": trend,
            },
        )
        self._close(row, began)
        w = row.window
        assert w is not None
        is_flat = all(v["flat"] for n in names for k, v in flat[n].items() if isinstance(v, dict))
        row.met = w.failed == 0 and is_flat
        row.verdict = f"{'met' if row.met else 'MISSED'}: {w.failed} failed; " + "; ".join(
            f"{n} RSS {flat[n]['rss_kb']['start'] / 1024:.1f}→{flat[n]['rss_kb']['end'] / 1024:.1f} MB "
            f"({flat[n]['rss_kb']['growth_pct']:+.1f}%"
            + (
                f", second half {flat[n]['rss_second_half_growth_pct']:+.1f}%"
                if "rss_second_half_growth_pct" in flat[n]
                else ""
            )
            + f"), fds {flat[n]['fds']['start']:.0f}→{flat[n]['fds']['end']:.0f}, "
            f"connections {flat[n]['connections']['start']:.0f}→{flat[n]['connections']['end']:.0f}"
            for n in names
        )
        return self._done(row)

    # -- floods ------------------------------------------------------------------------------------

    def flood(
        self, key: str, title: str, target: str, style: str, count: int, hold: float, reconnect: bool
    ) -> Row:
        m = self.mesh
        victim = "cart" if target == "cart" else "frontend"
        address = f"{m.addr('cart')}:{INBOUND}" if target == "cart" else f"{m.addr('frontend')}:{OUT}"
        self.progress.phase(f"{title} -> {address}")
        quiet0, cpu_b = time.monotonic(), {n: m.stats(n)["cpu_s"] for n in ("frontend", "cart")}
        time.sleep(5)
        cpu_before = {
            n: round((m.stats(n)["cpu_s"] - cpu_b[n]) / (time.monotonic() - quiet0) * 100, 1) for n in cpu_b
        }
        baseline = self.load.window(time.monotonic() - 10, time.monotonic() - 0.5)
        cpu0 = {n: m.stats(n)["cpu_s"] for n in ("frontend", "cart")}
        conns0 = {n: m.connections(n) for n in ("frontend", "cart")}
        rss0 = {n: round(m.stats(n)["rss_kb"] / 1024, 1) for n in ("frontend", "cart")}
        began = time.monotonic()
        self._meter()
        args = ["--target", address, "--count", str(count), "--hold", str(hold), "--style", style]
        proc = m.start_flood([*args, "--reconnect"] if reconnect else args)
        peak: dict[str, float] = {"connections": 0, "fds": 0, "rss_kb": 0}
        while proc.popen.poll() is None and time.monotonic() - began < hold + 60:
            with contextlib.suppress(OSError):
                s = m.stats(victim)
                c = m.connections(victim) or 0
                peak = {
                    "connections": max(peak["connections"], c),
                    "fds": max(peak["fds"], s["fds"]),
                    "rss_kb": max(peak["rss_kb"], s["rss_kb"]),
                }
            time.sleep(1.0)
        out, _ = proc.popen.communicate(timeout=30)
        ended = time.monotonic()
        flood_report: Result = json.loads(out or b"{}")
        cpu = {n: round((m.stats(n)["cpu_s"] - cpu0[n]) / (ended - began) * 100, 1) for n in cpu0}
        time.sleep(3)
        conns_after = {n: m.connections(n) for n in ("frontend", "cart")}
        rss_after = {n: round(m.stats(n)["rss_kb"] / 1024, 1) for n in ("frontend", "cart")}
        row = Row(
            key,
            title,
            f"well-behaved clients keep being served: 0 failed, p99 < {FLOOD_P99_TARGET_MS:.0f} ms",
            "",
            None,
            details={
                "target": address,
                "flood": flood_report,
                "victim_peak": peak,
                "sidecar_cpu_pct_before": cpu_before,
                "sidecar_cpu_pct_during": cpu,
                "connections_before": conns0,
                "connections_3s_after": conns_after,
                "sidecar_rss_mb_before": rss0,
                "sidecar_rss_mb_3s_after": rss_after,
                "baseline_p50_ms": baseline.p50_ms,
                "baseline_p99_ms": baseline.p99_ms,
                "baseline_max_ms": baseline.max_latency_ms,
            },
        )
        self._close(row, began)
        w = row.window
        assert w is not None
        held = self.load.window(began + 6, began + hold)  # after the opening burst, while the flood is held
        row.details["held_p50_ms"], row.details["held_p99_ms"] = held.p50_ms, held.p99_ms
        row.details["held_max_ms"], row.details["held_failed"] = held.max_latency_ms, held.failed
        row.met = w.failed == 0 and (w.p99_ms or 0) < FLOOD_P99_TARGET_MS
        row.verdict = (
            f"{'met' if row.met else 'MISSED'}: {w.failed} failed, p50 {w.p50_ms} ms / p99 {w.p99_ms} ms "
            f"(baseline {baseline.p50_ms} / {baseline.p99_ms} ms; while held, after the opening burst: "
            f"{held.p50_ms} / {held.p99_ms} ms); flood: {flood_report.get('opened', 0)} opened, "
            f"peak {flood_report.get('peak_open', 0)} open, {flood_report.get('closed_by_peer', 0)} closed by the sidecar"
            + (
                f" after a median {flood_report['close_after_median_s']} s"
                if flood_report.get("close_after_median_s") is not None
                else ""
            )
        )
        return self._done(row)

    # -- the injector ------------------------------------------------------------------------------

    def injector(self) -> Row:
        self.progress.phase("injector down: restarted under admissions; what the manifests say")
        import yaml

        doc = yaml.safe_load((REPO / "manifests" / "webhook.yaml").read_text())
        hook = doc["webhooks"][0]
        injector = [
            d
            for d in yaml.safe_load_all((REPO / "manifests" / "injector.yaml").read_text())
            if d and d.get("kind") in ("Deployment", "PodDisruptionBudget")
        ]
        replicas = next((d["spec"].get("replicas") for d in injector if d["kind"] == "Deployment"), None)
        pdb = next(
            (d["spec"].get("minAvailable") for d in injector if d["kind"] == "PodDisruptionBudget"), None
        )
        excluded = [
            v
            for e in hook.get("namespaceSelector", {}).get("matchExpressions", [])
            if e.get("key") == "kubernetes.io/metadata.name"
            for v in e.get("values", [])
        ]
        details = {
            "failurePolicy": hook.get("failurePolicy"),
            "timeoutSeconds": hook.get("timeoutSeconds"),
            "reinvocationPolicy": hook.get("reinvocationPolicy"),
            "sideEffects": hook.get("sideEffects"),
            "excluded_namespaces": excluded,
            "replicas": replicas,
            "pdb_min_available": pdb,
        }
        restart = _injector_restart()
        details["restart"] = restart
        if restart.get("test_passed") and restart.get("bad") == 0 and restart.get("injected", 0) > 0:
            verdict = (
                f"met: injector restarted (SIGTERM, then a new process on its port) under calls made as the API "
                f"server makes them: {restart['calls']} calls, {restart['injected']} whole patches, "
                f"{restart['unanswered']} unanswered while it was down ({restart['down_s']:.2f} s; "
                f"failurePolicy: {details['failurePolicy']} refuses those pods), 0 partial or wrong answers"
            )
            met: bool | None = True
        else:
            verdict = f"MISSED or not run: {restart.get('error') or restart}"
            met = False if "error" not in restart else None
        row = Row(
            "injector",
            "injector down",
            "pod creation follows failurePolicy as documented; nothing half-injected",
            verdict,
            met,
            details=details,
        )
        row.notes.append(
            "No API server can run here: the calls come from tests/integration/test_injector.py::"
            "test_injector_restarted_under_admissions_never_half_injects (the API server's part: HTTPS verified "
            "against the caBundle by the Service's DNS name, 5 s timeout, each patch applied with jsonpatch and "
            "compared with the reference injected pod). What the API server does with no answer is its "
            "failurePolicy, below."
        )
        row.notes.append(
            f"With `failurePolicy: {details['failurePolicy']}` the API server refuses the CREATE of every pod in a "
            f"namespace labelled `sidemesh.io/inject=enabled` while no injector answers within "
            f'{details["timeoutSeconds"]} s (`failed calling webhook "inject.sidemesh.io"`); ReplicaSets retry '
            "with backoff, so the pods appear once an injector is back. Running pods are untouched. The patch is "
            "one JSONPatch the API server applies whole or not at all, so a pod is never half-injected. "
            f"Namespaces {', '.join(excluded)} are excluded whatever their labels (the injector never waits for "
            f"itself); the injector runs {replicas} replicas with a PodDisruptionBudget (minAvailable {pdb}). "
            'Documented in docs/injection.md ("When the injector is down").'
        )
        self.rows.append(row)
        return self._done(row)


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _when(text: object) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _lifetime(cert: Result) -> float | None:
    a, b = _when(cert.get("not_before")), _when(cert.get("not_after"))
    return (b - a).total_seconds() if a and b else None


def _remaining(cert: Result) -> float | None:
    b = _when(cert.get("not_after"))
    return round((b - dt.datetime.now(dt.UTC)).total_seconds(), 1) if b else None


def _ready_body(m: Mesh, name: str) -> Any:
    try:
        return json.loads(_get(f"http://{m.addr(name)}:{HEALTH}/healthz/ready", 2.0)[1])
    except (OSError, ValueError):
        return None


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# -- the report ----------------------------------------------------------------------------------


def machine() -> Result:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    somaxconn = ""
    with contextlib.suppress(OSError):
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "ulimit_n": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "somaxconn": somaxconn,
        "commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def _cell(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:,.0f}{unit}" if unit == "" else f"{value:,.2f}{unit}"


def write_report(out_dir: Path, report: Result, rows: Sequence[Row]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "RELIABILITY.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    mach, setup = report["machine"], report["setup"]
    lines = [
        "# Reliability: faults, soak and floods under steady load",
        "",
        f"`{report['command']}`, {report['date']} (commit {mach['commit'] or '?'}). "
        f"Figures also in `RELIABILITY.json` (with failures per second for the whole run).",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, nproc {mach['nproc']}; kernel {mach['kernel']}; Python {mach['python']}, {mach['openssl']}",
        f"- open files limit (`ulimit -n`): {mach['ulimit_n']} for the bench, {setup.get('sidecar_fd_limit', '?')} for the "
        f"sidecars; `net.core.somaxconn` {mach['somaxconn']}; the sidecar listens with a backlog of 1024",
        f"- load average at start {_loadavg(mach['loadavg_start'])}, at end {_loadavg(report.get('loadavg_end'))} "
        "(the machine is shared: other jobs may have run at the same time)",
        "",
        "## Setup",
        "",
        f"- `sidemesh ca serve`, `sidemesh controller serve --source directory` and three `sidemesh proxy run --capture none "
        f"--access-log false` (frontend, cart, stranger), each a process on its own loopback address ({setup['net']}.x), "
        "as in `sidemesh demo`; ServiceAuthorization: only shop/frontend may reach cart:8080, mesh default deny.",
        f"- Certificates: {setup['ttl']} s lifetime (`--default-ttl {setup['ttl']}s`) after the first phase, so that "
        "rotations and expiry happen within the run (why not 20 s: see the first row and the findings).",
        f"- Load: {setup['rate']:.0f} short exchanges/s, each over a new connection to the frontend sidecar's outbound "
        f"port (connect, send a line, read the cart's answer, close), and {setup['long']} long-lived connections "
        f"exchanging a line every {LONG_INTERVAL * 1000:.0f} ms; the cart application is its own process (an asyncio "
        f"line echo). Client timeout {CLIENT_TIMEOUT:.0f} s for every exchange: one that runs out counts as hung. A "
        "failed exchange on a long-lived connection, or a failed attempt to reconnect one (every 100 ms), counts as one "
        "failed request.",
        "- Each row counts the exchanges that *started* during its phase. Recovery: from the fault to the first "
        "successful short exchange after the last failure; for the CA rows, from the CA's restart to the last "
        "sidecar's renewal (CA down) or to traffic flowing again (expiry); for the controller, to the change made "
        "while it was down taking effect.",
        "",
        "## Results",
        "",
        "| fault | requests | failed | max latency | recovery | verdict (target) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        w = row.window
        lines.append(
            f"| {row.fault} | {_cell(w.requests) if w else '—'} | {_cell(w.failed) if w else '—'} | "
            f"{f'{w.max_latency_ms:,.0f} ms' if w else '—'} | {_fmt_s(row.recovery_s)} | "
            f"{row.verdict} *(target: {row.target})* |"
        )
    lines += ["", "## Notes", ""]
    for row in rows:
        lines.append(f"### {row.fault}")
        lines.append("")
        if row.window is not None:
            w = row.window
            lines.append(
                f"- requests {w.requests:,}, failed {w.failed:,} ({_errors_text(w)}; by kind {w.failed_by_kind or '—'}), "
                f"hung {w.hung}; latency of successes p50 {w.p50_ms} ms, p99 {w.p99_ms} ms; max of all {w.max_latency_ms} ms; "
                f"seconds with failures {w.seconds_with_failures} (worst {w.worst_second_failures}/s)"
            )
        for key, value in row.details.items():
            if key == "trend":
                continue
            lines.append(f"- {key.replace('_', ' ')}: {_plain(value)}")
        lines += [f"- {n}" for n in row.notes]
        lines.append("")
    if report.get("findings"):
        lines += ["## Findings", ""]
        lines += [f"{i}. {f}" for i, f in enumerate(report["findings"], 1)]
        lines.append("")
    path = out_dir / "RELIABILITY.md"
    path.write_text("\n".join(lines))
    return path


def _loadavg(value: Any) -> str:
    return " ".join(f"{v:.2f}" for v in value) if value else "?"


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return "—" if value is None else str(value)


def findings(rows: Sequence[Row], ttl: int, logs: Result) -> list[str]:
    """What the figures say about the product, in words (only what this run showed)."""
    by = {r.key: r for r in rows}
    out: list[str] = []
    storm = by.get("ttl20")
    if storm is not None and storm.met is False and "renewal storm" in storm.verdict:
        d = storm.details
        out.append(
            f"**Renewal storm with short lifetimes.** With `--default-ttl {STORM_TTL}s` each sidecar renewed "
            f"{max(d['rotations'].values())} times in {d['observed_s']:.0f} s instead of about {d['expected_rotations']}, "
            f"and the CA refused {d['ca_refusals']:.0f} requests as rate limited. The CA backdates notBefore by a "
            "minute (`ca/templates.py`, `BACKDATE`, used in `leaf_builder`), and `sidemesh/identity/rotation.py:"
            "renewal_time` takes 40-50% of notAfter - notBefore *from notBefore*: for a lifetime under about 90 s "
            "that instant is already past when the certificate arrives, so `sidemesh/identity/workload.py:_renew_loop` "
            "renews at once, again and again, until the CA's rate limit pushes it into backoff. Longer lifetimes renew "
            f"early too (5 min: at 28-40% of the life; {ttl} s, this run: see the rotations row). Fix: measure the "
            "lifetime from when the certificate was received, i.e. `renewal_time(max(not_before, received_at), "
            "not_after, rand)`, not from the backdated notBefore."
        )
    rot = by.get("rotations")
    if rot is not None and rot.details.get("renewal_at_fraction_of_ttl"):
        frac = rot.details["renewal_at_fraction_of_ttl"]
        if frac < 0.35:
            out.append(
                f"**Renewal earlier than designed.** With {ttl} s certificates a rotation came every "
                f"{rot.details['mean_interval_s']} s, at {frac:.0%} of the lifetime instead of 40-50% (same cause as "
                "the renewal storm: the backdated notBefore counts as lifetime)."
            )
    ca = by.get("ca")
    if ca is not None and ca.window is not None and ca.window.failed:
        d = ca.details
        out.append(
            f"**Failures while the CA was down ({ca.window.failed}, {_errors_text(ca.window)}).** No certificate "
            f"expired (remaining lifetimes at the stop: {_plain(d['remaining_life_at_stop_s'])} s, outage "
            f"{d['outage_s']} s), yet for a few seconds connections from frontend to cart timed out "
            f"(max latency {ca.window.max_latency_ms:.0f} ms; readiness samples not 200: {_plain(d['not_ready_samples'])}). "
            f"The bench's own longest stall in that phase was {d.get('longest_stall_of_the_bench_process_s')} s and "
            f"other processes used {d.get('cpu', {}).get('others_pct_of_machine')}% of the machine: "
            "not explained by this run; worth a look with the CA down on a quiet machine."
        )
    exp = by.get("expiry")
    if exp is not None:
        renewed = exp.details.get("renewed_after_ca_back_s", {})
        if any(v is None or v > 10 for v in renewed.values()):
            out.append(
                "**Slow recovery after expiry.** Once the certificate has expired, `sidemesh/identity/rotation.py:"
                "backoff` no longer caps the retry delay by the time left (`until_expiry > 0` is false), so the delay "
                "grows to a random value up to 60 s: after the CA came back the sidecars renewed after "
                f"{_plain(renewed)} s, while every new connection failed and readiness said 503. Fix: when the SVID "
                "is expired (or missing), retry with a small ceiling (e.g. 2 s): the workload is down until it renews."
            )
        seen = exp.details.get("sidecars_while_expired", {})
        if any(s.get("error_log_lines_after_expiry", 0) == 0 for s in seen.values()):
            out.append(
                "**No log line when the certificate expires.** The only error-level line is the next failed renewal "
                "attempt, which the uncapped backoff can put up to a minute after the expiry. Fix: log an error when "
                "the state turns to expired."
            )
        if exp.details.get("long_lived_exchanges_ok_while_expired"):
            out.append(
                "**Connections outlive the certificate.** Long-lived connections opened before the expiry kept "
                f"working after it ({exp.details['long_lived_exchanges_ok_while_expired']} exchanges while both "
                "certificates had expired): TLS checks validity at the handshake only. Envoy and Linkerd behave the "
                "same; a `--max-connection-age` (or closing connections whose peer certificate has expired) would "
                "bound it, if wanted."
            )
    ctl = by.get("controller")
    resync = ctl.details.get("change_applied_after_restart_s") if ctl is not None else None
    if ctl is not None and (resync is None or resync > 5):
        delays = ctl.details.get("reconnect_delays_logged_s", {})
        first = [v[0] for v in delays.values() if v]
        carried = [d for d in first if d is not None and d > 1.0]
        out.append(
            f"**Slow resync after a controller restart.** A change made while the controller was down applied "
            f"{_fmt_s(resync)} after it came back (it was down {ctl.details.get('down_s')} s; reconnect delays the "
            f"sidecars logged: {_plain(delays)}). `proxy/config_client.py:ConfigClient.run` reconnects with "
            "full-jitter backoff capped at `RECONNECT_BACKOFF_MAX` (5 s) and reset once a stream has delivered "
            "configuration, so after the controller is back a sidecar may still wait up to that cap"
            + (
                f"; the first retry after this kill waited {_plain(carried)} s, more than a fresh schedule's 1 s: "
                "the attempt counter was not reset by the last healthy stream"
                if carried
                else ""
            )
            + ". A lower cap trades a faster resync for more reconnect attempts against a controller that is down."
        )
    gaps = [
        by[k] for k in ("sidecar-cart-sigterm", "sidecar-frontend-sigterm") if k in by and by[k].met is False
    ]
    if gaps:
        lived = ", ".join(f"{r.fault.split()[0]} {r.details['old_process_exited_after_s']} s" for r in gaps)
        out.append(
            "**New connections failed for too long around a SIGTERM restart.** `proxy/sidecar.py:Sidecar.drain` "
            "closes the inbound listener at once, keeps the app's outbound listeners while connections remain, and "
            f"exits when the last one ends or at `--drain-timeout` (the old process lived {lived}); a replacement binds "
            "with SO_REUSEPORT and listens once it has its certificate and configuration "
            f"(`{gaps[0].details['replacement_started_during_drain']}`). See the rows for where the failures fell."
        )
    soak = by.get("soak")
    if soak is not None and soak.met is False:
        sc = soak.details["sidecars"]
        rss = {n: v["rss_kb"]["growth_pct"] for n, v in sc.items()}
        if not all(v["rss_kb"]["flat"] for v in sc.values()) and all(
            v["fds"]["flat"] and v["connections"]["flat"] for v in sc.values()
        ):
            second = {n: v.get("rss_second_half_growth_pct") for n, v in sc.items()}
            both = soak.details.get("rss_steps_over_1mb_in_both_sidecars_at_once") or 0
            steps = {n: v.get("rss_largest_step_mb") for n, v in sc.items()}
            out.append(
                f"**RSS not flat in the soak**: {_plain(rss)} % over {soak.details['minutes']:g} min, of which "
                f"{_plain(second)} % in the second half, in steps (largest {_plain(steps)} MB"
                + (f"; {both} of them in both sidecars at once" if both else "")
                + "), while file descriptors and open connections stayed flat. That looks like the heap's "
                "high-water mark rather than a per-connection leak: uvloop gives every TLS connection a 256 KiB "
                "read buffer (`uvloop/sslproto.pyx`: `PyMem_RawMalloc(SSL_READ_MAX_SIZE)`), `proxy/heap.py:tune` keeps "
                "such blocks on the heap (M_MMAP_THRESHOLD 4 MiB, M_TRIM_THRESHOLD 64 MiB), and `heap.Trimmer` gives "
                "freed heap back after bursts and once a minute, which cannot release pages that still hold live "
                "objects (fragmentation). Not proven by this run (a longer soak would show whether it levels off)."
            )
    flood = by.get("flood-outbound")
    if flood is not None:
        d = flood.details
        before, after = d.get("sidecar_rss_mb_before", {}), d.get("sidecar_rss_mb_3s_after", {})
        count = d.get("flood", {}).get("peak_open") or 0
        peak_mb = (d.get("victim_peak", {}).get("rss_kb") or 0) / 1024
        if before and after and count and after.get("frontend", 0) > before.get("frontend", 0) * 1.5:
            peak_mb = max(peak_mb, after["frontend"])  # sampled once a second: the peak may fall between
            per_conn_kb = (peak_mb - before["frontend"]) * 1024 / count
            limit_mb = 512 * 1.048576
            fits = int((limit_mb - before["frontend"]) * 1024 / per_conn_kb) if per_conn_kb > 0 else None
            out.append(
                f"**Memory is kept after a burst of connections.** {count:,} idle connections held on the frontend's "
                f"outbound port took its RSS from {before['frontend']} MB to {peak_mb:.0f} MB (about "
                f"{per_conn_kb:.0f} KB per relayed connection), and 3 s after they were all closed it was still "
                f"{after['frontend']} MB (cart: {before.get('cart')} → {after.get('cart')} MB); at the end of the run "
                f"{_plain(logs.get('rss_end_mb'))} MB. The injected proxy is limited to 512Mi "
                "(`manifests/mesh-config.yaml`, `proxyResources`): at this rate about "
                f"{fits:,} open connections through one sidecar would get it OOM-killed (an extrapolation); "
                "`--max-connections` (per direction) must stay below that, and `proxy/heap.py` trims after the burst "
                "(pages still holding live objects stay)."
            )
    app = by.get("app")
    if app is not None and app.window is not None and app.window.hung:
        out.append("**Requests hung when the upstream app was killed** (see its row).")
    if flood is not None and flood.met is False:
        out.append(
            f"**A connection flood on the outbound side slows everyone.** Each connection to the outbound port is "
            f"relayed at once: an mTLS handshake to the destination and a connection to its app "
            f"(`proxy/outbound.py:handle`), bounded only by `--max-connections`, with no limit on handshakes in "
            f"progress (`proxy/sidecar.py:Sidecar._accept` spawns a task per accepted connection). The opening burst took "
            f"well-behaved p99 to {flood.window.p99_ms if flood.window else '?'} ms; held idle, the connections cost "
            f"memory and file descriptors in both sidecars and the app (peak {_plain(flood.details.get('victim_peak'))}) "
            "and are kept for `--idle-timeout` (1 h). Next: a limit on handshakes in progress, and a shorter idle "
            "timeout for connections that never sent a byte."
        )
    slow_in = by.get("slow-inbound")
    if slow_in is not None:
        d = slow_in.details
        before = d.get("sidecar_cpu_pct_before", {}).get("cart")
        during = d.get("sidecar_cpu_pct_during", {}).get("cart")
        if before is not None and during is not None and during > before + 10:
            out.append(
                f"**Slow TLS clients cost the inbound side CPU.** While 500 clients sent a partial ClientHello a byte at a "
                f"time, the cart sidecar's CPU went from {before}% to {during}%: `proxy/detect.py:detect` polls a "
                "socket holding a partial ClientHello every 5 ms (`asyncio.sleep(min(0.005, remaining))`) until the "
                "detect timeout (1 s), about 200 wake-ups per connection. They are cut off after the timeout, which "
                "protects the app. Fix: wait for readability (`add_reader`) after a partial peek too, instead of "
                "polling."
            )
    slow_out = by.get("slow-outbound")
    if slow_out is not None and slow_out.details.get("flood", {}).get("closed_by_peer", 0) == 0:
        out.append(
            "**Slow clients on the outbound side are never cut off.** A connection that sends a byte every few "
            "seconds is relayed for as long as it likes (the only timer is `--idle-timeout`, 1 h, reset by every "
            "byte); the bytes reach the app, which must protect itself. For opaque TCP the sidecar cannot tell a "
            "slow client from a slow protocol; for HTTP, a request-header timeout would apply once requests are parsed."
        )
    if logs.get("empty_timeout_reasons"):
        out.append(
            f"**Empty reason in the log on a connect timeout** ({logs['empty_timeout_reasons']} lines such as "
            f"`{logs.get('empty_timeout_example', '')}`): `proxy/outbound.py` lines 60 and 98 and "
            "`proxy/inbound.py` line 119 format `{exc or 'timeout'}`, but an exception is always true, and "
            "`str(TimeoutError())` is empty. Fix: `{str(exc) or 'timed out'}`."
        )
    return out


def scan_logs(root: Path) -> Result:
    """Things worth reporting from the sidecars' logs (before the temporary directory goes)."""
    empty = 0
    example = ""
    for log in sorted(root.glob("*-sidecar*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"reason":"cannot connect' in line and line.rstrip().endswith(': "}'):
                empty += 1
                if not example:
                    with contextlib.suppress(ValueError):
                        example = json.loads(line).get("reason", "")
    return {"empty_timeout_reasons": empty, "empty_timeout_example": example}


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes-soak", type=float, default=10.0, help="length of the soak (default 10)")
    p.add_argument("--quick", action="store_true", help="a 1-minute soak (and 1,000-connection floods)")
    p.add_argument("--rate", type=float, default=100.0, help="short exchanges per second (default 100)")
    p.add_argument("--long", type=int, default=4, help="long-lived connections (default 4)")
    p.add_argument(
        "--ttl", type=int, default=DEFAULT_TTL, help=f"certificate lifetime, s (default {DEFAULT_TTL})"
    )
    p.add_argument("--flood", type=int, default=2000, help="connections per flood (default 2000)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where RELIABILITY.md and .json go")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument(
        "--phases",
        default="",
        help="comma-separated subset: ttl20,rotations,ca,expiry,controller,app,sidecar,soak,flood,injector",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.minutes_soak = 1.0
        args.flood = min(args.flood, 1000)
    return args


PHASES = ("ttl20", "rotations", "ca", "expiry", "controller", "app", "sidecar", "soak", "flood", "injector")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "app":
        return app_main(argv[1:])
    if argv and argv[0] == "flood":
        return flood_main(argv[1:])
    args = parse_args(argv)
    phases = [p for p in (args.phases.split(",") if args.phases else PHASES) if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"unknown phases: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="sidemesh-reliability-"))
    mesh = Mesh(root, args.ttl)
    steps = len(phases) + (2 if "sidecar" in phases else 0) + (3 if "flood" in phases else 0)
    progress = Progress(steps)
    load = Load(mesh.addr("frontend"), OUT, args.rate, args.long)
    bench = Bench(mesh, load, progress)
    report: Result = {
        "command": " ".join(["python -m bench.reliability", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "setup": {"net": mesh.demo.net, "ttl": args.ttl, "rate": args.rate, "long": args.long},
    }
    status = 0
    try:
        print(f"starting the mesh on {mesh.demo.net}.x (logs in {root})", flush=True)
        mesh.bootstrap()
        mesh.start_ca(STORM_TTL if "ttl20" in phases else args.ttl)
        mesh.start_controller()
        mesh.start_app()
        for name in HOSTS:
            mesh.start_sidecar(name, wait=False)
        for name in HOSTS:
            mesh.wait_ready(name)
        mesh.healthy()
        report["setup"]["sidecar_fd_limit"] = fd_limit(mesh.procs["cart"].popen.pid)
        load.start()
        time.sleep(3)
        plan: dict[str, Callable[[], Any]] = {
            "ttl20": bench.short_ttl,
            "rotations": bench.rotations,
            "ca": bench.ca_down,
            "expiry": bench.ca_expiry,
            "controller": bench.controller,
            "app": bench.app_restart,
            "sidecar": lambda: [
                bench.sidecar_restart("cart", signal.SIGTERM),
                bench.sidecar_restart("frontend", signal.SIGTERM),
                bench.sidecar_restart("cart", signal.SIGKILL),
            ],
            "soak": lambda: bench.soak(args.minutes_soak),
            "flood": lambda: [
                bench.flood(
                    "flood-inbound",
                    f"{args.flood:,} idle connections held against the cart sidecar's inbound port",
                    "cart",
                    "idle",
                    args.flood,
                    20,
                    False,
                ),
                bench.flood(
                    "flood-outbound",
                    f"{args.flood:,} idle connections held against the frontend sidecar's outbound port",
                    "frontend",
                    "idle",
                    args.flood,
                    20,
                    False,
                ),
                bench.flood(
                    "slow-inbound",
                    "500 slowloris clients (a TLS record header, then a byte every 2 s) against cart's inbound port",
                    "cart",
                    "slow-tls",
                    500,
                    20,
                    True,
                ),
                bench.flood(
                    "slow-outbound",
                    "500 slowloris clients (a byte every 2 s) against frontend's outbound port",
                    "frontend",
                    "slow-plain",
                    500,
                    20,
                    True,
                ),
            ],
            "injector": bench.injector,
        }
        for phase in phases:
            try:
                plan[phase]()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                status = 1
                progress.info(f"phase {phase} could not complete: {exc}")
                bench.rows.append(Row(phase, phase, "complete", f"NOT COMPLETED: {str(exc)[:200]}", False))
                with contextlib.suppress(TimeoutError, RuntimeError, OSError):
                    mesh.healthy(60)
    except KeyboardInterrupt:
        status = 130
        print("interrupted", flush=True)
    finally:
        rss_end: Result = {}
        for name in ("frontend", "cart"):
            with contextlib.suppress(OSError, KeyError):
                rss_end[name] = round(mesh.stats(name)["rss_kb"] / 1024, 1)
        load.stop()
        bench.stalls.stop()
        print("stopping every process ...", flush=True)
        mesh.demo.stop_all()
        logs = scan_logs(root) | {"rss_end_mb": rss_end}
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    report["rows"] = [asdict(r) for r in bench.rows]
    report["phase_marks"] = bench.marks
    report["failures_per_second"] = load.series()
    report["log_scan"] = logs
    report["findings"] = findings(bench.rows, args.ttl, logs)
    if bench.rows:
        path = write_report(args.out, report, bench.rows)
        print(f"wrote {path} and {path.with_suffix('.json')}", flush=True)
    return status


# -- the cart application ---------------------------------------------------------------------


def app_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability app")
    p.add_argument("--listen", required=True, help="HOST:PORT")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(b"OK " + line)
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, host, int(port), backlog=4096)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    _run(serve())
    return 0


def _run(coro: Coroutine[Any, Any, None]) -> None:
    loop = _new_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


# -- floods and slow clients ----------------------------------------------------------------------


@dataclass
class FloodStats:
    opened: int = 0
    open_now: int = 0
    peak_open: int = 0
    open_failed: Counter[str] = field(default_factory=Counter)
    closed_by_peer: int = 0
    close_after: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    open_at_end: int = 0


TLS_PREFIX = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's first bytes, then zeros


async def _hold(
    host: str, port: int, style: str, interval: float, deadline: float, reconnect: bool, st: FloodStats
) -> None:
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            st.open_failed[_error_name(exc)] += 1
            if not reconnect:
                return
            await asyncio.sleep(1.0)
            continue
        st.opened += 1
        st.open_now += 1
        st.peak_open = max(st.peak_open, st.open_now)
        closed = False
        sent = 0
        try:
            while time.monotonic() < deadline:
                if style != "idle":
                    byte = TLS_PREFIX[sent : sent + 1] if style == "slow-tls" else b"x"
                    writer.write(byte or b"\x00")
                    sent += 1
                    st.bytes_sent += 1
                wait = interval if style != "idle" else deadline - time.monotonic()
                try:
                    data = await asyncio.wait_for(
                        reader.read(4096), max(0.01, min(wait, deadline - time.monotonic()))
                    )
                except TimeoutError:
                    continue
                if not data:
                    closed = True
                    break
        except OSError:
            closed = True
        finally:
            st.open_now -= 1
            writer.transport.abort()
        if closed:
            st.closed_by_peer += 1
            st.close_after.append(time.monotonic() - t0)
            if not reconnect:
                return
            await asyncio.sleep(1.0)


def flood_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability flood")
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--hold", type=float, default=20.0)
    p.add_argument("--style", choices=("idle", "slow-tls", "slow-plain"), default="idle")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between bytes (slow styles)")
    p.add_argument("--reconnect", action="store_true", help="open a new connection when one is closed")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    st = FloodStats()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.count + 256)), hard))

    async def run() -> None:
        deadline = time.monotonic() + args.hold
        tasks = []
        for _ in range(args.count):
            tasks.append(
                asyncio.create_task(
                    _hold(host, int(port), args.style, args.interval, deadline, args.reconnect, st)
                )
            )
            await asyncio.sleep(random.uniform(0, 0.0005))  # open them within about half a second
        await asyncio.sleep(max(0.0, deadline - time.monotonic() - 0.2))
        st.open_at_end = st.open_now
        await asyncio.gather(*tasks, return_exceptions=True)

    _run(run())
    closes = sorted(st.close_after)
    print(
        json.dumps(
            {
                "style": args.style,
                "count": args.count,
                "hold_s": args.hold,
                "opened": st.opened,
                "open_failed": dict(st.open_failed),
                "peak_open": st.peak_open,
                "open_at_end": st.open_at_end,
                "closed_by_peer": st.closed_by_peer,
                "close_after_median_s": round(statistics.median(closes), 2) if closes else None,
                "close_after_max_s": round(closes[-1], 2) if closes else None,
                "bytes_sent": st.bytes_sent,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
