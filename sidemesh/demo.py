"""`sidemesh demo`: the whole mesh on one machine, no cluster, no root.

It starts the CA, the controller (reading a directory of example manifests), and three workloads
- frontend, cart and a stranger - each behind its own sidecar, every one a separate process on its
own loopback address, then walks through what the mesh does, printing each step and its result:
frontend -> cart allowed over mTLS (and the identity cart's sidecar saw), the stranger refused with
the reason, plaintext refused, and a new ServiceAuthorization taking effect within a second.
Ctrl-C (or the end of `--once`) stops everything and removes every file it made.

With --netns (as root) each workload is instead a network namespace on a bridge with its own IP:
`sidemesh proxy init` writes real iptables rules, the sidecars run as UID 1337, and the apps call
each other by pod IP with plain connections the sidecars capture; an outsider namespace with no
sidecar shows plaintext refused. The namespaces, bridge and rules are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TD = "cluster.local"
WORKLOADS = {"frontend": 1, "cart": 2, "stranger": 3}
CONTROL = 100  # the CA and the controller share this address

MANIFESTS = """\
# The mesh of the demo. In a cluster the controller builds the same from Pods; here each
# Workload stands for a pod, with its own loopback address.
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: frontend-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{serviceAccount: frontend, address: {net}.1, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cart-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: stranger-1, namespace: shop, labels: {{app: stranger}}}}
spec: {{serviceAccount: stranger, address: {net}.3, ports: [{{port: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: cart, namespace: shop}}
spec:
  selector: {{app: cart}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""

ALLOW = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {{name: cart-allow-{who}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  rules:
  - from: [{{serviceAccount: {who}}}]
    to: {{ports: [8080]}}
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole mesh locally and walk through it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="walk through once and exit: status 1 if any step did not behave as described (used by the tests)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, keys, manifests) for inspection",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="pods as network namespaces with real iptables rules and sidecars as UID 1337 (needs root, "
        "iproute2, iptables, util-linux); nothing is left behind on exit",
    )
    p.set_defaults(handler=run)


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_event(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record.get("event") == event:
                    return record
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}); its log: {self.log}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {event!r} within {timeout}s; its log: {self.log}")


@dataclass
class Demo:
    root: Path
    net: str
    procs: list[Proc] = field(default_factory=list)
    failures: int = 0
    step_no: int = 0

    def addr(self, host: int) -> str:
        return f"{self.net}.{host}"

    def start(self, name: str, *args: str) -> Proc:
        log = self.root / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "sidemesh", *args],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=dict(os.environ, SIDEMESH_LOG_LEVEL="info"),
            start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    # -- narration ---------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n[{self.step_no}] {title}", flush=True)

    def ok(self, text: str) -> None:
        print(f"    ok: {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"    UNEXPECTED: {text}", flush=True)


def _free_net() -> str:
    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"


def _sidemesh(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "sidemesh", *args], check=True, capture_output=True, text=True
    ).stdout


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout}s")


def _cart_app(address: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"service": "cart", "items": 3, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, 8080), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _call(address: str, port: int) -> tuple[int | None, str]:
    """An HTTP GET as the app would make it, through its sidecar's outbound port: (status, body)."""
    with socket.create_connection((address, port), timeout=5) as s:
        s.sendall(b"GET /cart/42 HTTP/1.1\r\nHost: cart.shop\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        raise ConnectionResetError("connection closed without a response")
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    return status, body.decode(errors="replace")


def _refused(address: str, port: int) -> str | None:
    """How the call was refused (a reset, or an error status from the sidecar), or None if it got through."""
    try:
        status, body = _call(address, port)
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError) as exc:
        return exc.__class__.__name__
    return None if status == 200 else f"HTTP {status} {body.strip()[:80]}"


def identity_seen(records: Callable[[], list[dict[str, Any]]], timeout: float = 5.0) -> str | None:
    """The caller a sidecar logged for its newest inbound connection (opaque TCP) or request (HTTP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in reversed(records()):
            if (
                r.get("event") in ("connection", "request")
                and r.get("direction") == "inbound"
                and r.get("source")
            ):
                return str(r["source"])
        time.sleep(0.05)
    return None


def denial_of(records: Callable[[], list[dict[str, Any]]], source: str) -> dict[str, Any] | None:
    """The newest denial of `source` a sidecar logged (a connection, or an HTTP request)."""
    found = [
        r
        for r in records()
        if r.get("event") in ("connection denied", "request denied") and r.get("source") == source
    ]
    return found[-1] if found else None


def _interrupt(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if args.netns:
        from sidemesh import demo_netns

        return demo_netns.run(once=args.once, keep=args.keep)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo as cleanly as Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="sidemesh-demo-"))
    demo = Demo(root, _free_net())
    cart_app: ThreadingHTTPServer | None = None
    try:
        cart_app = _walk(demo)
        if not args.once and not demo.failures:
            print("\nThe mesh keeps running; press Ctrl-C to stop it and remove everything.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        demo.fail(f"{exc}")
    finally:
        print("\nstopping: sidecars, controller, CA ...", flush=True)
        demo.stop_all()
        if cart_app is not None:
            cart_app.shutdown()
            cart_app.server_close()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            print("stopped; temporary files removed")
    print(
        "\nall steps behaved as described"
        if not demo.failures
        else f"\n{demo.failures} step(s) did not behave as described"
    )
    return 1 if demo.failures else 0


def _walk(demo: Demo) -> ThreadingHTTPServer:
    root, control = demo.root, demo.addr(CONTROL)
    demo.step("Start the identity service: a CA with a fresh root, issuing SPIFFE certificates")
    _sidemesh("ca", "bootstrap", "--dir", str(root / "ca"), "--trust-domain", TD)
    tokens = root / "tokens.yaml"
    for name in [*WORKLOADS, "controller"]:
        identity = "sidemesh-system/sidemesh-controller" if name == "controller" else f"shop/{name}"
        (root / f"{name}.token").write_text(
            _sidemesh("ca", "local-token", "--file", str(tokens), "--identity", identity)
        )
    bundle = root / "ca" / "root-cert.pem"
    ca = demo.start(
        "ca",
        "ca",
        "serve",
        "--authenticator",
        "local",
        "--token-file",
        str(tokens),
        "--ca-dir",
        str(root / "ca"),
        "--listen",
        f"{control}:0",
        "--metrics-listen",
        "",
    )
    ca_port = ca.wait_event("CA serving")["port"]
    demo.ok(f"CA on {control}:{ca_port}; workloads prove who they are with tokens (TokenReview in a cluster)")

    demo.step("Start the controller on a directory of manifests (the cluster's stand-in)")
    mesh = root / "mesh"
    mesh.mkdir()
    (mesh / "workloads.yaml").write_text(MANIFESTS.format(net=demo.net))
    (mesh / "cart-allow-frontend.yaml").write_text(ALLOW.format(who="frontend"))
    controller = demo.start(
        "controller",
        "controller",
        "serve",
        "--source",
        "directory",
        "--config-dir",
        str(mesh),
        "--listen",
        f"{control}:0",
        "--metrics-listen",
        f"{control}:0",
        "--ca-address",
        f"{control}:{ca_port}",
        "--token-file",
        str(root / "controller.token"),
        "--bundle-file",
        str(bundle),
        "--default-policy",
        "deny",
    )
    started = controller.wait_event("controller serving")
    ctl = f"{control}:{started['port']}"
    demo.ok(
        f"controller on {ctl}; policy: only shop/frontend may call cart (mesh default: deny); manifests in {mesh}"
    )

    demo.step("Start frontend, cart and a stranger, each behind its own sidecar")
    cart_app = _cart_app(demo.addr(WORKLOADS["cart"]))
    for name, host in WORKLOADS.items():
        a = demo.addr(host)
        demo.start(
            f"{name}-sidecar",
            "proxy",
            "run",
            "--capture",
            "none",
            "--controller",
            ctl,
            "--workload",
            f"shop/{name}-1",
            "--service-account",
            name,
            "--ca-address",
            f"{control}:{ca_port}",
            "--token-file",
            str(root / f"{name}.token"),
            "--bundle-file",
            str(bundle),
            "--inbound-listen",
            f"{a}:15006",
            "--admin-listen",
            f"{a}:15000",
            "--health-listen",
            f"{a}:15020",
            "--app-host",
            a,
            "--outbound",
            f"{a}:18080=cart.shop:80",
            "--default-policy",
            "deny",
            "--log-level",
            "info",
        )
    for host in WORKLOADS.values():
        _wait_ready(f"http://{demo.addr(host)}:15020/healthz/ready")
    demo.ok("three sidecars ready: each holds an SVID and its configuration from the controller")
    for name, host in WORKLOADS.items():
        certs = json.loads(_get(f"http://{demo.addr(host)}:15000/certs")[1])
        print(
            f"      {name:9} {certs['identity']}  (certificate valid until {certs['not_after'][11:19]} UTC)"
        )

    frontend, stranger, cart = (demo.addr(WORKLOADS[n]) for n in ("frontend", "stranger", "cart"))
    demo.step("frontend -> cart: the app speaks plain HTTP; the sidecars add mTLS and check the policy")
    cart_sidecar = next(p for p in demo.procs if p.name == "cart-sidecar")
    try:
        status, body = _call(frontend, 18080)
        if status == 200:
            demo.ok(f"cart answered {body}")
            source = identity_seen(cart_sidecar.events)
            if source == f"spiffe://{TD}/ns/shop/sa/frontend":
                demo.ok(f"cart's sidecar saw the caller as {source}, over mTLS")
            else:
                demo.fail(f"the cart's sidecar logged the caller as {source}")
        else:
            demo.fail(f"frontend got HTTP {status}: {body.strip()[:80]}")
    except OSError as exc:
        demo.fail(f"frontend could not reach cart: {exc}")

    demo.step("stranger -> cart: refused, and the reason is logged")
    how = _refused(stranger, 18080)
    if how is None:
        demo.fail("the stranger got through")
    else:
        stranger_id = f"spiffe://{TD}/ns/shop/sa/stranger"
        deadline = time.monotonic() + 5
        while (denied := denial_of(cart_sidecar.events, stranger_id)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        demo.ok(f"the stranger's app saw {how}")
        if denied:
            demo.ok(f"cart's sidecar log: source {denied['source']}: {denied['reason']}")
        else:
            demo.fail("no denial in the cart sidecar's log")

    demo.step("a plaintext client straight at cart's sidecar: refused (strict mTLS)")
    how = _refused(cart, 15006)
    demo.ok(f"refused ({how})") if how else demo.fail("plaintext was accepted")

    demo.step("allow the stranger: write a ServiceAuthorization into the manifests directory")
    (mesh / "cart-allow-stranger.yaml").write_text(ALLOW.format(who="stranger"))
    began = time.monotonic()
    while time.monotonic() - began < 10:
        if _refused(stranger, 18080) is None:
            demo.ok(
                f"the stranger's next call is allowed, {time.monotonic() - began:.2f} s after the file was written"
            )
            break
        time.sleep(0.05)
    else:
        demo.fail("the new policy never took effect")
    if time.monotonic() - began > 2.0:
        demo.fail("the policy took more than two seconds")

    demo.step("where to look")
    for name, host in WORKLOADS.items():
        a = demo.addr(host)
        print(
            f"      {name:9} metrics http://{a}:15020/metrics   admin http://{a}:15000/config /certs /connections"
        )
    print(f"      controller status http://{control}:{started['status_port']}/status   logs: {root}/*.log")
    return cart_app
