"""What a running `sidemesh proxy run` process holds: the sidecar reaches ready against a real CA
(grpcio serving) with its own gRPC client, run with -OO as the injector runs it, and neither
grpcio's C core nor cryptography (its key and request come from a child process:
sidemesh/identity/keygen.py) is ever loaded into it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from ca import keys
from tests.integration.conftest import StartCA

WORKLOAD = """\
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {serviceAccount: cart, address: 127.0.0.1, ports: [{port: 8080}]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


async def test_a_ready_sidecar_has_not_loaded_grpcio_or_cryptography(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca()
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "cart.yaml").write_text(WORKLOAD)
    (tmp_path / "token").write_text("cart-token")
    health = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # (tracing off)
    env["PYTHONOPTIMIZE"] = "2"  # -OO, as the injector runs it
    log = tmp_path / "sidecar.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidemesh", "proxy", "run", "--capture", "none", "--workload", "shop/cart-1",
            "--config-dir", str(tmp_path / "mesh"), "--ca-address", ca.address,
            "--token-file", str(tmp_path / "token"), "--bundle-file", str(ca.dir / keys.ROOTS),
            "--inbound-listen", f"127.0.0.1:{_free_port()}", "--admin-listen", f"127.0.0.1:{_free_port()}",
            "--health-listen", f"127.0.0.1:{health}", "--log-level", "warning",
            env=env,
            stderr=stderr,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{health}/healthz/ready"
        for _ in range(200):
            if await asyncio.to_thread(_ready, url):
                break
            assert proc.returncode is None, await asyncio.to_thread(log.read_text)
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(
                f"the sidecar did not become ready in 20 s: {await asyncio.to_thread(log.read_text)}"
            )
        maps = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
        status = await asyncio.to_thread(Path(f"/proc/{proc.pid}/status").read_text)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    # The certificate came from the CA over grpclib (ready needs it), for a key made elsewhere.
    assert "uvloop/loop" in maps  # (the check reads the maps: uvloop's library is there)
    assert "cygrpc" not in maps, [line for line in maps.splitlines() if "grpc" in line][:3]
    assert "cryptography" not in maps, [line for line in maps.splitlines() if "cryptography" in line][:3]
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    assert threads <= 6, status  # the loop and uvloop's resolver pool; grpcio added six more


def test_the_sidecar_code_imports_neither_the_sdk_with_tracing_off_nor_cryptography() -> None:
    """What a sidecar's code loads, module by module: OpenTelemetry only with tracing on
    (proxy/tracing.py), YAML only in local mode (--config-dir), cryptography never, `proxy init`'s
    iptables code never (sidemesh/cli.py passes the subcommand on), importlib.metadata (entry
    points) never, nor prometheus-client's exposition module with its
    HTTP servers, urllib.request and email parsing (sidemesh/prometheus.py), nor the HTTP/2 proxy
    before the first HTTP/2 connection (proxy.outbound, proxy.routers.serve_h2)."""
    code = """
import sys
from sidemesh.prometheus import CollectorRegistry
from sidemesh.cli import build_parser
build_parser("proxy", "run")
import proxy.sidecar
from proxy.telemetry import start_sidecar_tracing
assert start_sidecar_tracing("shop/cart-1", "spiffe://cluster.local/ns/shop/sa/cart", CollectorRegistry()) is None
heavy = ("opentelemetry", "cryptography", "importlib.metadata", "grpc", "yaml",  # (grpc: grpcio, not grpclib)
    "prometheus_client", "sidemesh._prometheus_client.exposition", "http.server", "http.client", "urllib.request",
    "email", "wsgiref", "proxy.http2", "proxy.h2route", "proxy.iptables")
print(sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + ".")}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_hpack_is_quiet_in_a_sidecar_before_any_http2_connection() -> None:
    """hpack logs every field it codes, values included (the CA call's token): its loggers are
    silenced by what the sidecar loads at start (sidemesh/grpc_client.py), not only with the
    HTTP/2 proxy, which comes with the first HTTP/2 connection. A grpclib-style encode and decode
    of an authorization field with debug logging on writes no line."""
    code = """
import logging, sys
from sidemesh.cli import build_parser
build_parser("proxy")
import proxy.sidecar
assert "proxy.http2" not in sys.modules
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
import hpack
block = hpack.Encoder().encode([(b"authorization", b"Bearer s3cr3t")])
hpack.Decoder().decode(block)
print(type(sys.modules["hpack.hpack"].log).__name__, type(sys.modules["hpack.table"].log).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "QuietLog QuietLog", out.stdout
    assert "s3cr3t" not in out.stdout + out.stderr
