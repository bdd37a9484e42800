"""Admissions per second of `sidemesh injector serve` on one core, and its latency at 100/s.

    .venv/bin/python -m bench.admission [--seconds N] [--connections C]

The injector runs as deployed: `sidemesh injector serve` over HTTPS (a serving certificate from a
CA bootstrapped for the run: an SVID with the Service's DNS name, ECDSA P-256), the info log level
(one JSON line per admission, to a file), uvloop. Pinned to core 0 with `taskset` when there is one.
The load generator runs in this process, on core 1, speaking HTTP/1.1 over TLS on keep-alive
connections, as the API server does, and sends the AdmissionReview of a typical Deployment pod
(an HTTP readiness probe on a named port, a TCP liveness probe, resources, two volumes) that gets
injected: the whole patch path runs.

1. Throughput: C connections each with one request in flight, for N seconds: admissions/s, and
   the injector's CPU use (a share near 100% of one core says the figure is the injector's limit).
2. Latency at 100 admissions/s: requests sent on a fixed schedule, one every 10 ms, each on an
   idle connection; latency counted from the scheduled send time, so a stall is not hidden
   (coordinated omission). p50, p99, max.

Targets: >= 500 admissions/s, p99 < 10 ms. Writes bench/results/admission.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVER_NAME = "sidemesh-injector.sidemesh-system.svc"
TARGET_RATE, TARGET_P99_MS, PACED_RATE = 500.0, 10.0, 100.0

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "web-7d9c6b5f4-",
        "namespace": "shop",
        "labels": {"app": "web", "pod-template-hash": "7d9c6b5f4"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d9c6b5f4",
                "uid": "0c8b",
                "controller": True,
            }
        ],
    },
    "spec": {
        "serviceAccountName": "web",
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirst",
        "containers": [
            {
                "name": "web",
                "image": "ghcr.io/example/web:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/web"}],
                "terminationMessagePath": "/dev/termination-log",
                "imagePullPolicy": "IfNotPresent",
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": "web"}},
            {
                "name": "kube-api-access",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
            },
        ],
    },
}


def review_body(i: int) -> bytes:
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"00000000-0000-4000-8000-{i:012d}",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": POD,
            "dryRun": False,
        },
    }
    return json.dumps(review).encode()


def make_certificate(directory: Path) -> Path:
    """A CA for the run and the injector's serving SVID from it; returns the trust bundle's path."""
    from ca import issuer, keys
    from sidemesh.identity.svid import make_csr, new_key
    from sidemesh.spiffe import WorkloadId

    now = dt.datetime.now(dt.UTC)
    authority = keys.bootstrap(directory / "ca", "cluster.local", now)
    key = new_key()
    spiffe_id = WorkloadId("sidemesh-system", "sidemesh-injector").spiffe_id("cluster.local")
    issued = issuer.issue(
        authority,
        spiffe_id,
        make_csr(key, spiffe_id, (SERVER_NAME,)),
        dt.timedelta(hours=1),
        now,
        frozenset({SERVER_NAME}),
    )
    (directory / "tls.crt").write_text("".join(issued.chain_pem))
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "tls.key").write_bytes(key_pem)
    return directory / "ca" / keys.ROOTS


class Connection:
    """One keep-alive HTTP/1.1 connection over TLS; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=SERVER_NAME
        )
        return cls(reader, writer)

    async def admit(self, body: bytes) -> None:
        head = (
            f"POST /mutate?timeout=5s HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        headers = await self.reader.readuntil(b"\r\n\r\n")
        if not headers.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"injector answered {headers.splitlines()[0]!r}")
        length = next(
            int(line.split(b":")[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        answer = await self.reader.readexactly(length)
        if b'"patchType":"JSONPatch"' not in answer:  # a full parse would cost the client more than the check
            raise RuntimeError(f"no patch: {answer[:500]!r}")

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(
    port: int, ctx: ssl.SSLContext, pid: int, seconds: float, connections: int
) -> dict[str, Any]:
    conns = [await Connection.open(port, ctx) for _ in range(connections)]
    body = review_body(0)
    for conn in conns:  # warm up: handshakes done, code paths hot
        for _ in range(20):
            await conn.admit(body)
    done = 0
    stop = time.monotonic() + seconds

    async def loop(conn: Connection) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await conn.admit(body)
            done += 1

    cpu0, own0, t0 = cpu_seconds(pid), cpu_seconds(os.getpid()), time.monotonic()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
    client_cpu = cpu_seconds(os.getpid()) - own0
    for conn in conns:
        conn.close()
    return {
        "admissions": done,
        "seconds": round(elapsed, 3),
        "per_second": round(done / elapsed, 1),
        "injector_cpu_share": round(cpu / elapsed, 3),
        "client_cpu_share": round(client_cpu / elapsed, 3),
        "injector_cpu_ms_per_admission": round(cpu / done * 1000, 3),
        "connections": connections,
    }


async def paced(port: int, ctx: ssl.SSLContext, seconds: float, rate: float) -> dict[str, Any]:
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(8):
        conn = await Connection.open(port, ctx)
        await conn.admit(review_body(0))
        idle.put_nowait(conn)
    latencies: list[float] = []
    count = int(seconds * rate)
    bodies = [review_body(i) for i in range(count)]  # built before the clock starts
    start = time.monotonic() + 0.05

    async def one(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        conn = await idle.get()
        await conn.admit(bodies[i])
        latencies.append((time.monotonic() - scheduled) * 1000)
        idle.put_nowait(conn)

    await asyncio.gather(*(one(i) for i in range(count)))
    while not idle.empty():
        idle.get_nowait().close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 3)

    return {
        "rate": rate,
        "admissions": len(latencies),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(latencies[-1], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


def start_injector(tmp: Path, pin: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / "injector.log"
    args = [
        "injector", "serve", "--listen", "127.0.0.1:0",
        "--tls-cert", str(tmp / "tls.crt"), "--tls-key", str(tmp / "tls.key"),
        "--settings-file", str(tmp / "config.yaml"), "--webhook-configuration", "",
        "--shutdown-delay", "0s",  # no API server routes to it: stop at once
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen([*pin, str(Path(sys.executable).parent / "sidemesh"), *args], stderr=out)
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"the injector exited: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            if '"injector serving"' in line:
                return proc, int(json.loads(line)["address"].rsplit(":", 1)[1])
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("the injector did not start")


def pure_admit_us(n: int = 2000) -> float:
    """review.admit alone, in this process: the part of an admission that is Sidemesh's own code."""
    from injector import review
    from injector.settings import InjectionSettings

    settings, body = InjectionSettings(), review_body(0)
    for _ in range(100):
        review.admit(body, settings)
    started = time.perf_counter()
    for _ in range(n):
        review.admit(body, settings)
    return round((time.perf_counter() - started) / n * 1e6, 1)


async def load(port: int, bundle: Path, pid: int, seconds: float, connections: int) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(bundle))
    return {
        "throughput": await throughput(port, ctx, pid, seconds, connections),
        "latency_at_100_per_second": await paced(port, ctx, seconds, PACED_RATE),
    }


def run(seconds: float, connections: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sidemesh-bench-admission-"))
    bundle = make_certificate(tmp)
    (tmp / "config.yaml").write_text("")
    pure = pure_admit_us()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    if pin:
        os.sched_setaffinity(0, {1})
    proc, port = start_injector(tmp, pin)
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        measured = asyncio.run(load(port, bundle, proc.pid, seconds, connections))
    finally:
        proc.terminate()
        proc.wait(10)
    tput, lat = measured["throughput"], measured["latency_at_100_per_second"]
    log = (tmp / "injector.log").read_text()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "pinned": bool(pin),
            "load_average_at_end": os.getloadavg(),
        },
        "pure_admit_us": pure,
        **measured,
        "admission_log_lines": log.count('"event":"admission"'),
        "targets": {"per_second": TARGET_RATE, "p99_ms": TARGET_P99_MS},
        "meets": {"per_second": tput["per_second"] >= TARGET_RATE, "p99_ms": lat["p99_ms"] < TARGET_P99_MS},
    }


def markdown(r: dict[str, Any]) -> str:
    t, lat = r["throughput"], r["latency_at_100_per_second"]
    ok = {True: "meets", False: "misses"}
    return f"""# Injector admissions

`.venv/bin/python -m bench.admission` on {r["when"]}: Python {r["machine"]["python"]}, {r["machine"]["cpus"]} CPUs,
injector pinned to one core: {r["machine"]["pinned"]}. HTTPS with keep-alive, as the API server calls it; the
AdmissionReview of a Deployment's pod that gets injected (probes rewritten); one JSON log line per admission.

| measure | value | target |
|---|---|---|
| admissions/s on one core ({t["connections"]} connections, {t["seconds"]} s) | **{t["per_second"]}** ({ok[r["meets"]["per_second"]]}) | >= {r["targets"]["per_second"]:g} |
| CPU share of one core during that run: injector / load generator | {t["injector_cpu_share"]} / {t["client_cpu_share"]} | |
| injector CPU per admission (so, one saturated core: 1000 / this) | {t["injector_cpu_ms_per_admission"]} ms | |
| latency at {lat["rate"]:g}/s, p50 / p90 | {lat["p50_ms"]} ms / {lat["p90_ms"]} ms | |
| latency at {lat["rate"]:g}/s, p99 | **{lat["p99_ms"]} ms** ({ok[r["meets"]["p99_ms"]]}) | < {r["targets"]["p99_ms"]:g} ms |
| latency at {lat["rate"]:g}/s, max | {lat["max_ms"]} ms | |
| `review.admit` alone (parse, patch, encode), in process | {r["pure_admit_us"]} µs | |

Load average at the end: {", ".join(f"{x:.2f}" for x in r["machine"]["load_average_at_end"])} (the machine may be shared: a load well over
the two busy processes means the figures are pessimistic). Latency is counted from each request's scheduled send time (one every 10 ms), so a stall delays
every request behind it in the figures, as it would for the API server.
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default: 10)")
    parser.add_argument(
        "--connections", type=int, default=8, help="connections in the throughput phase (default: 8)"
    )
    args = parser.parse_args()
    result = run(args.seconds, args.connections)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "admission.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / "admission.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
