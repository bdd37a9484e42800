"""End-to-end CA signings per second, next to the raw crypto limits measured in the same run.

    .venv/bin/python -m bench.ca_sign [--seconds N] [--concurrency C]

What runs where (needs two cores to be meaningful):

- core 0: the raw limits: ``openssl speed ecdsap256`` (one signing costs one ECDSA verify, of the
  CSR, plus one ECDSA sign, of the certificate) and a loop of ``ca.issuer.issue`` in
  ``cryptography`` (CSR checks and certificate template included); then ``sidemesh ca serve``,
  pinned with ``taskset -c 0``; then the raw limits again once the CA has stopped (shared hosts
  drift: the ratios use the mean of before and after).
- core 1: the load generator, a process of its own: CSRs made before timing, then C signing RPCs
  kept in flight over a few grpc.aio channels (each its own TCP + TLS connection).

The CA runs as it is deployed: TLS, bearer-token authentication (local token file), the default
``info`` log level so that every issuance writes its JSON audit line. Its stderr goes to a file in
the temporary directory: the audit line is part of the real cost of a signing, a terminal is not.
Only the per-identity rate limit is off (``--rate-limit 0``), or it would be what is measured, and
the metrics listener (``--metrics-listen ''``), which nothing scrapes here.

Writes ``bench/results/ca.md`` and ``bench/results/ca.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import Progress
from bench.common import cpu_model as _cpu_model
from bench.common import git_commit as _git_commit

TRUST_DOMAIN = "cluster.local"
TARGET_PER_SECOND = 2000.0
IDENTITIES = ("shop/frontend", "shop/cart", "shop/checkout", "payments/api")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 30.0
# A process using at least this share of its one core is taken to be CPU-bound.
SATURATED = 0.90
# Raw figures measured before and after the load that differ by more than this get a note.
DRIFT_NOTE = 0.15

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def _rate(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call ``fn`` for about ``seconds``; return (calls, elapsed)."""
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(20):
            fn()
        n += 20
        now = time.perf_counter()
        if now >= deadline:
            return n, now - started


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _core_times(cores: Sequence[int]) -> dict[int, tuple[float, float]]:
    """(busy, total) jiffies per core from /proc/stat; busy excludes idle and iowait."""
    out: dict[int, tuple[float, float]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if m and int(m.group(1)) in cores:
            values = [float(v) for v in m.group(2).split()[:8]]
            total = sum(values)
            out[int(m.group(1))] = (total - values[3] - values[4], total)
    return out


def _context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the threads of a process so far (threads that
    already ended are not counted: the CA's threads live as long as it does)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        total += sum(int(m) for m in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", text, re.M))
    return total


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    wall: float
    client: float
    server: float
    cores: dict[int, tuple[float, float]]
    server_switches: int

    @classmethod
    def take(cls, server_pid: int, cores: Sequence[int]) -> CpuSnapshot:
        return cls(
            time.perf_counter(),
            _self_cpu_seconds(),
            _proc_cpu_seconds(server_pid),
            _core_times(cores),
            _context_switches(server_pid),
        )


def _run_child(target: Callable[..., None], args: tuple[Any, ...], timeout: float) -> Result:
    """Run ``target(*args, conn)`` in a spawned process and return the dict it sends back."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send), daemon=True)
    proc.start()
    send.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if recv.poll(0.2):
                try:
                    result: Result = recv.recv()
                except EOFError:
                    proc.join(5)
                    raise RuntimeError(
                        f"{target.__name__} exited ({proc.exitcode}) without a result"
                    ) from None
                if "error" in result:
                    raise RuntimeError(f"{target.__name__} failed:\n{result['error']}")
                return result
            if not proc.is_alive() and not recv.poll(0):
                raise RuntimeError(f"{target.__name__} exited ({proc.exitcode}) without a result")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target.__name__} gave no result within {timeout:.0f}s")
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        recv.close()


def _child_setup(core: int | None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pin(core)


# ---------------------------------------------------------------------------------------------
# Raw limits (core 0, before the CA starts and after it stops)


def openssl_speed(seconds: int, core: int | None) -> Result:
    """``openssl speed ecdsap256``: P-256 sign/s and verify/s, and the limit for sign + verify."""
    exe = shutil.which("openssl")
    if exe is None:
        return {"available": False, "note": "openssl not found"}
    version = subprocess.run([exe, "version"], capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run(
        [exe, "speed", "-seconds", str(seconds), "ecdsap256"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=(lambda: _pin(core)) if core is not None else None,
    ).stdout
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse `openssl speed` output:\n{out}")
    sign, verify = float(m.group(1)), float(m.group(2))
    return {
        "available": True,
        "version": version,
        "sign_per_s": sign,
        "verify_per_s": verify,
        # one signing = verify the CSR's self-signature + sign the certificate
        "raw_limit_per_s": 1 / (1 / sign + 1 / verify),
    }


def _crypto_child(ca_dir: str, seconds: float, core: int | None, conn: Connection) -> None:
    """``ca.issuer.issue`` in a loop, in this process only: the CA's own work without gRPC."""
    try:
        _child_setup(core)
        from cryptography.hazmat.backends.openssl.backend import backend
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        from ca import issuer, keys
        from ca.csr import validate_csr
        from sidemesh.identity.svid import make_csr, new_key
        from sidemesh.spiffe import WorkloadId

        authority = keys.load(Path(ca_dir))
        ids = [WorkloadId.parse(name).spiffe_id(TRUST_DOMAIN) for name in IDENTITIES]
        work = [(ids[i % len(ids)], make_csr(new_key(), ids[i % len(ids)])) for i in range(64)]
        ttl = dt.timedelta(hours=1)
        i = 0

        def one_issue() -> None:
            nonlocal i
            spiffe_id, csr = work[i % len(work)]
            i += 1
            issuer.issue(authority, spiffe_id, csr, ttl, dt.datetime.now(dt.UTC))

        spiffe_id, csr = work[0]
        valid = validate_csr(csr, spiffe_id)

        def one_validate() -> None:
            validate_csr(csr, spiffe_id)

        def one_sign() -> None:
            issuer.sign_key_info(authority, valid.public_key_info, spiffe_id, ttl, dt.datetime.now(dt.UTC))

        # The same primitives through cryptography's own OpenSSL: one signing = one verify + one sign.
        tbs = b"\x30" * 400  # about the size of a leaf's TBSCertificate
        sig_alg = ec.ECDSA(hashes.SHA256())
        ca_key = typing.cast(ec.EllipticCurvePrivateKey, authority.key)
        ca_public = ca_key.public_key()
        signature = ca_key.sign(tbs, sig_alg)
        nsig, esig = _rate(lambda: ca_key.sign(tbs, sig_alg), min(1.0, seconds))
        nver, ever = _rate(lambda: ca_public.verify(signature, tbs, sig_alg), min(1.0, seconds))

        _rate(one_issue, 0.3)  # warm-up
        n, elapsed = _rate(one_issue, seconds)
        nv, ev = _rate(one_validate, min(1.0, seconds))
        ns, es = _rate(one_sign, min(1.0, seconds))
        conn.send(
            {
                "openssl_version": backend.openssl_version_text(),
                "issues": n,
                "seconds": elapsed,
                "issue_per_s": n / elapsed,
                "issue_us": elapsed / n * 1e6,
                "validate_csr_us": ev / nv * 1e6,
                "sign_us": es / ns * 1e6,
                "ecdsa_sign_per_s": nsig / esig,
                "ecdsa_verify_per_s": nver / ever,
                "ecdsa_raw_limit_per_s": 1 / (esig / nsig + ever / nver),
            }
        )
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def _raw_description(args: argparse.Namespace) -> str:
    return f"openssl speed -seconds {args.raw_seconds} ecdsap256; ca.issuer.issue loop {args.raw_seconds} s"


def raw_limits(
    args: argparse.Namespace, ca_dir: Path, core: int | None, progress: Progress
) -> tuple[Result, Result]:
    openssl = openssl_speed(args.raw_seconds, core)
    if openssl.get("available"):
        progress.detail(
            f"openssl: sign {_fmt(openssl['sign_per_s'])}/s, verify {_fmt(openssl['verify_per_s'])}/s "
            f"-> raw limit {_fmt(openssl['raw_limit_per_s'])} signings/s"
        )
    else:
        progress.detail(f"openssl: {openssl['note']}")
    crypto = _run_child(_crypto_child, (str(ca_dir), float(args.raw_seconds), core), timeout=120)
    progress.detail(
        f"cryptography: {_fmt(crypto['issue_per_s'])} issues/s ({crypto['issue_us']:.0f} µs: validate_csr "
        f"{crypto['validate_csr_us']:.0f} µs, sign {crypto['sign_us']:.0f} µs); P-256 raw limit "
        f"{_fmt(crypto['ecdsa_raw_limit_per_s'])}/s"
    )
    return openssl, crypto


def _combine(before: Result, after: Result) -> Result:
    """Means of the numbers measured before and after the load; both kept, with their drift."""
    out: Result = dict(before)
    drift: dict[str, float] = {}
    for key, value in before.items():
        other = after.get(key)
        if isinstance(value, float) and isinstance(other, float):
            out[key] = (value + other) / 2
            drift[key] = abs(value - other) / max(out[key], 1e-12)
    out["before"], out["after"], out["drift"] = before, after, drift
    return out


# ---------------------------------------------------------------------------------------------
# The CA under test (core 0)


@dataclass(slots=True)
class CAProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    pin_note: str | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sidemesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidemesh", *args]


def start_ca(ca_dir: Path, tokens: Path, log_path: Path, core: int | None) -> CAProcess:
    cmd = _sidemesh(
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
        "--rate-limit",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
        "--log-level",
        "info",
    )
    note = None
    taskset = shutil.which("taskset")
    if core is None:
        note = "the CA is not pinned (fewer than two usable cores)"
    elif taskset is None:
        note = "taskset not found: the CA is not pinned to a core"
    else:
        cmd = [taskset, "-c", str(core), *cmd]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            cwd=REPO_DIR,
            start_new_session=True,  # Ctrl-C stops the bench; the bench stops the CA
        )
    ca = CAProcess(proc, log_path, pin_note=note)
    try:
        ca.port = _wait_for_serving(ca, timeout=30.0)
    except BaseException:
        ca.stop()
        raise
    return ca


def _wait_for_serving(ca: CAProcess, timeout: float) -> int:
    """The port from the CA's ``{"event": "CA serving", "port": ...}`` log line."""
    deadline = time.monotonic() + timeout
    pending = ""
    with ca.log_path.open() as log:
        while time.monotonic() < deadline:
            chunk = log.readline()
            if not chunk.endswith("\n"):
                pending += chunk
                if ca.proc.poll() is not None:
                    tail = ca.log_path.read_text()[-3000:]
                    raise RuntimeError(f"the CA exited ({ca.proc.returncode}) before serving:\n{tail}")
                time.sleep(0.05)
                continue
            line, pending = pending + chunk, ""
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == "CA serving":
                return int(record["port"])
    raise TimeoutError(f"the CA did not log 'CA serving' within {timeout:.0f}s; see {ca.log_path}")


def _count_audit_lines(log_path: Path) -> tuple[int, int]:
    """(audit lines, bytes of log) written by the CA."""
    lines = 0
    with log_path.open("rb") as log:
        for line in log:
            if b'"event":"certificate issued"' in line:
                lines += 1
    return lines, log_path.stat().st_size


# ---------------------------------------------------------------------------------------------
# The load generator (core 1)


@dataclass(frozen=True, slots=True)
class LoadParams:
    address: str
    bundle_pem: bytes
    tokens: dict[str, str]  # identity "ns/sa" -> token
    concurrency: int
    channels: int
    seconds: float
    warmup: float
    csrs: int
    core: int | None
    server_pid: int
    server_core: int | None


@dataclass(slots=True)
class _LoadState:
    measuring: bool = False
    stop: bool = False
    window_start: float = 0.0
    per_second: Counter[int] = field(default_factory=Counter)
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    outside_errors: Counter[str] = field(default_factory=Counter)
    outside_ok: int = 0


def _load_child(params: LoadParams, conn: Connection) -> None:
    try:
        _child_setup(params.core)
        conn.send(asyncio.run(_drive(params)))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


async def _caller(
    index: int,
    stub: Any,
    work: Sequence[tuple[str, tuple[tuple[str, str], ...]]],
    stride: int,
    state: _LoadState,
) -> None:
    import grpc

    from sidemesh.api import ca_pb2

    j = index
    while not state.stop:
        csr, metadata = work[j % len(work)]
        j += stride
        started = time.perf_counter()
        code: str | None = None
        try:
            await stub.Sign(
                ca_pb2.SignRequest(csr=csr, ttl_seconds=0), metadata=metadata, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        if state.measuring:
            if code is None:
                ended = time.perf_counter()
                state.ok += 1
                state.latencies.append(ended - started)
                state.per_second[int(ended - state.window_start)] += 1
            else:
                state.errors[code] += 1
        elif code is None:
            state.outside_ok += 1
        else:
            state.outside_errors[code] += 1


async def _drive(p: LoadParams) -> Result:
    import grpc

    from sidemesh.api import ca_pb2, ca_pb2_grpc
    from sidemesh.identity.client import CA_SERVER_NAME
    from sidemesh.identity.svid import SVID, PrivateKey, make_csr, new_key
    from sidemesh.spiffe import WorkloadId

    # CSRs (and their keys) are made before any timing: a workload makes one per rotation.
    t = time.perf_counter()
    names = list(p.tokens)
    work: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for i in range(p.csrs):
        name = names[i % len(names)]
        spiffe_id = WorkloadId.parse(name).spiffe_id(TRUST_DOMAIN)
        work.append((make_csr(new_key(), spiffe_id), (("authorization", f"Bearer {p.tokens[name]}"),)))
    csr_seconds = time.perf_counter() - t

    creds = grpc.ssl_channel_credentials(root_certificates=p.bundle_pem)
    options = [
        ("grpc.ssl_target_name_override", CA_SERVER_NAME),
        # one TCP + TLS connection per channel, as from distinct workloads
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.aio.secure_channel(p.address, creds, options=options) for _ in range(p.channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        stubs = [ca_pb2_grpc.CertificateAuthorityStub(c) for c in channels]

        # One signing checked the way a workload checks it, so we measure real issuances.
        key = new_key()
        first = WorkloadId.parse(names[0]).spiffe_id(TRUST_DOMAIN)
        resp = await stubs[0].Sign(
            ca_pb2.SignRequest(csr=make_csr(key, first), ttl_seconds=0),
            metadata=(("authorization", f"Bearer {p.tokens[names[0]]}"),),
            timeout=CALL_TIMEOUT,
        )
        svid = SVID.from_pem(PrivateKey.of(key), list(resp.cert_chain), list(resp.trust_bundle), first)
        check = f"{svid.spiffe_id}, chain of {len(svid.chain)}, valid {svid.not_after - svid.not_before}"

        state = _LoadState()
        tasks = [
            asyncio.create_task(_caller(i, stubs[i % len(stubs)], work, p.concurrency, state))
            for i in range(p.concurrency)
        ]
        cores = [c for c in (p.server_core, p.core) if c is not None]
        await asyncio.sleep(p.warmup)
        before = CpuSnapshot.take(p.server_pid, cores)
        state.window_start = before.wall
        state.measuring = True
        await asyncio.sleep(p.seconds)
        state.measuring = False
        after = CpuSnapshot.take(p.server_pid, cores)
        state.stop = True
        _done, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT + 5)
        for task in pending:
            task.cancel()
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))

    window = after.wall - before.wall
    lat = sorted(state.latencies)

    def busy(core: int | None) -> float | None:
        if core is None or core not in after.cores:
            return None
        (busy1, total1), (busy0, total0) = after.cores[core], before.cores[core]
        return (busy1 - busy0) / max(1.0, total1 - total0)

    full_seconds = [state.per_second[i] for i in range(int(window))]
    return {
        "csr_seconds": csr_seconds,
        "check": check,
        "window_s": window,
        "ok": state.ok,
        "errors": dict(state.errors),
        "outside_window_ok": state.outside_ok,
        "outside_window_errors": dict(state.outside_errors),
        "per_s": state.ok / window,
        "p50_ms": _percentile(lat, 50) * 1e3,
        "p90_ms": _percentile(lat, 90) * 1e3,
        "p99_ms": _percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] if lat else float("nan")) * 1e3,
        "client_cpu": (after.client - before.client) / window,
        "server_cpu": (after.server - before.server) / window,
        "server_cpu_us_per_call": (after.server - before.server) / max(1, state.ok) * 1e6,
        "server_context_switches_per_call": (after.server_switches - before.server_switches)
        / max(1, state.ok),
        "server_core_busy": busy(p.server_core),
        "client_core_busy": busy(p.core),
        "per_second": full_seconds,
    }


# ---------------------------------------------------------------------------------------------
# Environment, report


def _source_digest() -> str:
    """SHA-256 of the CA's and the shared package's sources as measured (the tree may be uncommitted)."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_DIR.glob("ca/**/*.py"), *REPO_DIR.glob("sidemesh/**/*.py")]):
        digest.update(str(path.relative_to(REPO_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> Result:
    import cryptography
    import grpc
    from google import protobuf

    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "cryptography": cryptography.__version__,
        "commit": _git_commit(),
        "source_sha256": _source_digest(),
    }


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def analyse(load: Result, openssl: Result, crypto: Result, notes: list[str]) -> Result:
    e2e = float(load["per_s"])
    ratios: Result = {"e2e_over_cryptography": e2e / crypto["issue_per_s"]}
    if openssl.get("available"):
        ratios["e2e_over_openssl_raw"] = e2e / openssl["raw_limit_per_s"]
    client, server = float(load["client_cpu"]), float(load["server_cpu"])
    if server >= SATURATED:
        verdict = "server-bound"
        notes.append(
            f"The CA used {server:.0%} of its core and the load generator {client:.0%} of its own: "
            "the figure is the CA's capacity on one core."
        )
    elif client >= SATURATED:
        verdict = "client-bound"
        notes.append(
            f"CLIENT-BOUND: the load generator used {client:.0%} of core 1 while the CA used only "
            f"{server:.0%} of core 0. One Python client process cannot saturate this server; the "
            "end-to-end figure is a lower bound of the CA's capacity."
        )
    else:
        verdict = "latency-bound"
        notes.append(
            f"Neither side is saturated (CA {server:.0%}, load generator {client:.0%} of a core): "
            "raise --concurrency."
        )
    for who, own, core_busy in (
        ("the CA", server, load["server_core_busy"]),
        ("the load generator", client, load["client_core_busy"]),
    ):
        if core_busy is not None and core_busy - own > 0.10:
            notes.append(
                f"The core of {who} was {core_busy:.0%} busy but {who} used {own:.0%} of it: something "
                "else ran there during the window."
            )
    if load["per_second"]:
        lo, hi = min(load["per_second"]), max(load["per_second"])
        if hi > 1.25 * max(lo, 1):
            notes.append(
                f"Signings per second within the window ranged from {lo:,} to {hi:,}: an unsteady host."
            )
    errors = sum(load["errors"].values())
    if errors:
        notes.append(f"{errors} calls failed in the window: {load['errors']}; the figure is not valid.")
    met = e2e >= TARGET_PER_SECOND and not errors
    return {"ratios": ratios, "verdict": verdict, "target_met": met}


def _span(values: Result, key: str) -> str:
    if "before" not in values:
        return ""
    return f" (before {_fmt(values['before'][key])}, after {_fmt(values['after'][key])})"


def table_rows(
    config: Result, load: Result, openssl: Result, crypto: Result, summary: Result
) -> list[tuple[str, str]]:
    e2e = load["per_s"]
    rows = [
        (
            f"end-to-end signings/s (C={config['concurrency']}, {config['channels']} channels, "
            f"{load['window_s']:.1f} s)",
            _fmt(e2e),
        ),
        (
            "latency p50 / p90 / p99 (ms)",
            f"{load['p50_ms']:.1f} / {load['p90_ms']:.1f} / {load['p99_ms']:.1f}",
        ),
        ("calls ok / failed in the window", f"{load['ok']:,} / {sum(load['errors'].values()):,}"),
        (
            "slowest / fastest whole second in the window",
            f"{min(load['per_second'], default=0):,} / {max(load['per_second'], default=0):,}",
        ),
        (
            "CPU: CA (core 0) / load generator (core 1)",
            f"{load['server_cpu']:.0%} / {load['client_cpu']:.0%} ({summary['verdict']})",
        ),
        (
            "CA per signing: CPU µs / context switches (all its threads)",
            f"{load['server_cpu_us_per_call']:.0f} / {load['server_context_switches_per_call']:.1f}",
        ),
        (
            "`cryptography` ca.issuer.issue/s (one core)",
            _fmt(crypto["issue_per_s"]) + _span(crypto, "issue_per_s"),
        ),
        (
            "  of which: validate_csr / issuer.sign (µs)",
            f"{crypto['validate_csr_us']:.0f} / {crypto['sign_us']:.0f} (issue: {crypto['issue_us']:.0f})",
        ),
    ]
    if openssl.get("available"):
        rows += [
            (
                "OpenSSL P-256 sign/s / verify/s",
                f"{_fmt(openssl['sign_per_s'])} / {_fmt(openssl['verify_per_s'])}",
            ),
            (
                "OpenSSL raw limit/s: 1 / (1/sign + 1/verify)",
                _fmt(openssl["raw_limit_per_s"]) + _span(openssl, "raw_limit_per_s"),
            ),
            ("end-to-end / raw OpenSSL", f"{summary['ratios']['e2e_over_openssl_raw']:.1%}"),
        ]
    rows += [
        (
            "`cryptography` P-256 sign/s / verify/s (its bundled OpenSSL)",
            f"{_fmt(crypto['ecdsa_sign_per_s'])} / {_fmt(crypto['ecdsa_verify_per_s'])}",
        ),
        ("  raw limit/s with that OpenSSL", _fmt(crypto["ecdsa_raw_limit_per_s"])),
        ("end-to-end / `cryptography` issue", f"{summary['ratios']['e2e_over_cryptography']:.1%}"),
        (
            f"target ≥ {_fmt(TARGET_PER_SECOND)}/s end-to-end",
            "met" if summary["target_met"] else f"MISSED ({e2e / TARGET_PER_SECOND:.0%} of it)",
        ),
    ]
    return rows


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print()


def write_markdown(path: Path, report: Result, rows: Sequence[tuple[str, str]]) -> None:
    env, cfg, openssl, crypto = (
        report["environment"],
        report["config"],
        report["openssl"],
        report["cryptography"],
    )
    lines = [
        "# CA signing throughput",
        "",
        f"`python -m bench.ca_sign --seconds {cfg['seconds']:g} --concurrency {cfg['concurrency']}`, "
        f"{report['date']} (commit {env['commit']}; sources of ca/ and sidemesh/ as measured: "
        f"sha256 {env['source_sha256']}, the working tree may hold uncommitted changes).",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']}, nproc {env['nproc']}; kernel {env['kernel']}",
        f"- Python {env['python']}, grpcio {env['grpcio']}, protobuf {env['protobuf']}, "
        f"cryptography {env['cryptography']} (bundles {crypto['openssl_version']})",
        f"- `openssl` command: {openssl.get('version', 'not found')}",
        "",
        "## Setup",
        "",
        "- CA: `sidemesh ca serve --authenticator local --rate-limit 0 --listen 127.0.0.1:0 "
        f"--metrics-listen ''`, {cfg['ca_pinning']}, its other options at their defaults (gRPC helper "
        f"threads under SCHED_BATCH: {cfg.get('batch_helper_threads', 'yes')}). Log level `info`: one JSON "
        "audit line per issuance, stderr redirected to a file (the audit line is part of the cost of a "
        f"signing; a terminal is not). Audit lines written: {report['audit_lines']:,}.",
        f"- Load generator: one process, {cfg['client_pinning']}; {cfg['csrs']:,} CSRs for "
        f"{len(IDENTITIES)} identities made before timing; {cfg['concurrency']} RPCs in flight over "
        f"{cfg['channels']} grpc.aio channels (one TLS connection each); {cfg['warmup']:g} s warm-up, "
        f"then {cfg['seconds']:g} s measured. Only calls completed inside the window count.",
        f"- Raw limits, on the CA's core, once before the CA starts and once after it stops (the table "
        f"shows the mean, ca.json both): `openssl speed -seconds {cfg['raw_seconds']} ecdsap256`; a "
        f"{cfg['raw_seconds']} s loop of `ca.issuer.issue(authority, spiffe_id, csr_pem, 1h, now)` (CSR "
        "parse + checks + signature verify, template, sign, PEM) in one process.",
        "- One signing needs one ECDSA P-256 verify (the CSR's proof of possession) and one sign (the "
        "certificate): raw limit = 1 / (1/sign + 1/verify).",
        "",
        "## Results",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k.strip()} | {v} |" for k, v in rows),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in report["notes"]),
        "",
    ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.ca_sign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64, help="RPCs in flight (default: %(default)s)")
    p.add_argument("--channels", type=int, default=4, help="grpc.aio channels (default: %(default)s)")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds before measuring (default: %(default)s)"
    )
    p.add_argument("--csrs", type=int, default=2000, help="CSRs made before timing (default: %(default)s)")
    p.add_argument(
        "--raw-seconds", type=int, default=3, help="seconds per raw crypto measurement (default: %(default)s)"
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where ca.md and ca.json go (default: bench/results)",
    )
    args = p.parse_args(argv)
    if (
        args.seconds <= 0
        or args.concurrency < 1
        or args.channels < 1
        or args.csrs < 1
        or args.raw_seconds < 1
    ):
        p.error("--seconds, --concurrency, --channels, --csrs and --raw-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress(total=7)
    notes: list[str] = []

    usable = sorted(os.sched_getaffinity(0))
    server_core: int | None = usable[0] if len(usable) >= 2 else None
    client_core: int | None = usable[1] if len(usable) >= 2 else None
    if server_core is None:
        notes.append("Fewer than two usable cores: nothing is pinned; CA and load generator share the CPU.")

    env = environment()
    progress.phase(
        f"{env['cpu_model']}, {env['nproc']} cores; Python {env['python']}, grpcio {env['grpcio']}, "
        f"cryptography {env['cryptography']}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="sidemesh-bench-ca-") as tmp:
            report = _run(args, Path(tmp), env, server_core, client_core, notes, progress)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; the processes it started are stopped and its temporary directory removed",
            file=sys.stderr,
        )
        return 130

    rows = table_rows(
        report["config"], report["end_to_end"], report["openssl"], report["cryptography"], report
    )
    print_table(rows)
    for note in notes:
        print(f"  note: {note}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(args.results_dir / "ca.md", report, rows)
    (args.results_dir / "ca.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {args.results_dir / 'ca.md'} and {args.results_dir / 'ca.json'}")
    return 0


def _run(
    args: argparse.Namespace,
    tmp: Path,
    env: Result,
    server_core: int | None,
    client_core: int | None,
    notes: list[str],
    progress: Progress,
) -> Result:
    ca_dir, tokens_path = tmp / "ca", tmp / "tokens.yaml"
    progress.phase(f"bootstrap a CA and tokens for {len(IDENTITIES)} identities in {tmp}")
    subprocess.run(
        _sidemesh("ca", "bootstrap", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN),
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=REPO_DIR,
    )
    tokens: dict[str, str] = {}
    for name in IDENTITIES:
        tokens[name] = subprocess.run(
            _sidemesh("ca", "local-token", "--file", str(tokens_path), "--identity", name),
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO_DIR,
        ).stdout.strip()

    progress.phase(f"raw limits on core {server_core}, before the load ({_raw_description(args)})")
    openssl_before, crypto_before = raw_limits(args, ca_dir, server_core, progress)

    progress.phase("start `sidemesh ca serve` (log level info, stderr to a file)")
    ca = start_ca(ca_dir, tokens_path, tmp / "ca.log", server_core)
    try:
        if ca.pin_note:
            notes.append(ca.pin_note)
            progress.detail(f"note: {ca.pin_note}")
        progress.detail(
            f"pid {ca.proc.pid}, 127.0.0.1:{ca.port}, core {server_core if not ca.pin_note else '-'}"
        )
        params = LoadParams(
            address=f"127.0.0.1:{ca.port}",
            bundle_pem=(ca_dir / "root-cert.pem").read_bytes(),
            tokens=tokens,
            concurrency=args.concurrency,
            channels=args.channels,
            seconds=args.seconds,
            warmup=args.warmup,
            csrs=args.csrs,
            core=client_core,
            server_pid=ca.proc.pid,
            server_core=server_core if not ca.pin_note else None,
        )
        progress.phase(
            f"load on core {client_core}: {args.csrs:,} CSRs, then {args.concurrency} in flight over "
            f"{args.channels} channels, {args.warmup:g} s warm-up + {args.seconds:g} s"
        )
        load = _run_child(_load_child, (params,), timeout=args.csrs / 50 + args.warmup + args.seconds + 120)
    finally:
        ca.stop()
    audit_lines, log_bytes = _count_audit_lines(ca.log_path)
    progress.detail(
        f"{_fmt(load['per_s'])} signings/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms; "
        f"CPU CA {load['server_cpu']:.0%}, client {load['client_cpu']:.0%}; first issuance: {load['check']}"
    )

    progress.phase(f"raw limits on core {server_core} again, after the load (the CA is stopped)")
    openssl_after, crypto_after = raw_limits(args, ca_dir, server_core, progress)
    openssl = _combine(openssl_before, openssl_after)
    crypto = _combine(crypto_before, crypto_after)
    if not openssl.get("available"):
        notes.append(f"OpenSSL raw limit not measured: {openssl['note']}.")
    for label, values, key in (
        ("OpenSSL raw limit", openssl, "raw_limit_per_s"),
        ("`cryptography` issue/s", crypto, "issue_per_s"),
    ):
        if key in values and values["drift"][key] > DRIFT_NOTE:
            notes.append(
                f"{label} moved by {values['drift'][key]:.0%} between before and after the load "
                f"({_fmt(values['before'][key])} -> {_fmt(values['after'][key])}/s): this host's speed "
                "drifts; ratios use the mean of the two."
            )
    issued = load["ok"] + load["outside_window_ok"] + 1
    if audit_lines != issued:
        notes.append(f"The CA wrote {audit_lines:,} audit lines for {issued:,} successful calls.")
    notes.append(
        f"Audit log: {audit_lines:,} lines, {log_bytes / max(1, audit_lines):.0f} bytes per line, "
        f"written to a file (stderr of the CA)."
    )
    notes.append(
        f"`openssl speed` uses the system OpenSSL ({openssl.get('version', '-')}); `cryptography` and the "
        f"CA use the one bundled with cryptography ({crypto['openssl_version']})."
    )

    summary = analyse(load, openssl, crypto, notes)
    config = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "warmup": args.warmup,
        "csrs": args.csrs,
        "raw_seconds": args.raw_seconds,
        "ca_pinning": ca.pin_note or f"pinned to core {server_core} with `taskset -c {server_core}`",
        "client_pinning": f"pinned to core {client_core}" if client_core is not None else "not pinned",
        "batch_helper_threads": os.environ.get("SIDEMESH_CA_BATCH_HELPER_THREADS", "yes (default)"),
    }
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "config": config,
        "end_to_end": load,
        "cryptography": crypto,
        "openssl": openssl,
        "audit_lines": audit_lines,
        "audit_log_bytes": log_bytes,
        "target_per_second": TARGET_PER_SECOND,
        **summary,
        "notes": notes,
    }


if __name__ == "__main__":
    sys.exit(main())
