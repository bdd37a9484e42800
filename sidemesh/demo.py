"""`sidemesh demo`: the whole mesh on one machine, no cluster, no root (what it does: DESCRIPTION)."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
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

from sidemesh.localnet import DIRECT, without_proxies
from sidemesh.otlp_receiver import ReceivedSpan, ReceiverThread, trace_tree

# The command's --help description: a string of its own, not the module docstring, which -OO
# drops (PYTHONOPTIMIZE=2 is set in a sidecar's container, where any sidemesh command may run).
DESCRIPTION = """`sidemesh demo`: the whole mesh on one machine, no cluster, no root.

It starts the CA, the controller (reading a directory of example manifests), and three workloads
- frontend, cart and a stranger - each behind its own sidecar, every one a separate process on its
own loopback address, then walks through what the mesh does, printing each step and its result:
frontend -> cart allowed over mTLS (and the identity cart's sidecar saw), the stranger refused with
the reason (HTTP 403, sidemesh-denied-reason), plaintext refused, a new ServiceAuthorization taking
effect within a second, then the trace trees of the allowed and the denied request and where the
metrics are. Ctrl-C (or the end of `--once`) stops everything and removes every file it made.

Traces (not with --netns): unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set,
the demo runs its own OTLP/gRPC receiver on a free loopback port, has the sidecars send it every
span, and prints the trees. When it is set (e.g. a local Jaeger on http://127.0.0.1:4317), the
sidecars send their spans there with your OTEL_* settings and the demo prints the trace IDs.

With --netns (as root) each workload is instead a network namespace on a bridge with its own IP:
`sidemesh proxy init` writes real iptables rules, the sidecars run as UID 1337, and the apps call
each other by pod IP with plain connections the sidecars capture; an outsider namespace with no
sidecar shows plaintext refused. The namespaces, bridge and rules are deleted at the end.
"""

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
        description=DESCRIPTION,
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

    def last_lines(self, count: int = 6) -> list[str]:
        """The end of its log (where a process that would not start says why), each line cut short."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return []
        return [line if len(line) <= 300 else line[:297] + "..." for line in lines[-count:]]

    def wait_event(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record.get("event") == event:
                    return record
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.returncode}); the end of its log ({self.log}):\n"
                    + "\n".join(f"      | {line}" for line in self.last_lines())
                )
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {event!r} within {timeout}s; its log: {self.log}")


@dataclass
class Demo:
    root: Path
    net: str
    procs: list[Proc] = field(default_factory=list)
    sidecar_env: dict[str, str] = field(default_factory=dict)  # the OTEL_* variables of the sidecars
    failures: int = 0
    step_no: int = 0
    interrupted: bool = False  # stopped (Ctrl-C, kill, the terminal closed) before the last step

    def addr(self, host: int) -> str:
        return f"{self.net}.{host}"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "sidemesh", *args],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=dict(without_proxies(os.environ), SIDEMESH_LOG_LEVEL="info", **(env or {})),
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


def say(text: str) -> None:
    """``print``, except that a terminal gone (closed: SIGHUP) does not stop the clean-up."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def outcome(demo: Demo, root: Path, keep: bool) -> int:
    """The last lines and the exit status: 0 all steps as described, 1 some did not, 130 stopped
    before the end (a run that was cut short has not shown that the mesh works)."""
    if demo.failures and not keep:
        say(f"kept {root} for the logs of what went wrong (delete it when done)")
    if demo.interrupted:
        say(f"\ninterrupted at step {demo.step_no}: the steps after it did not run")
        return 130
    say(
        "\nall steps behaved as described"
        if not demo.failures
        else f"\n{demo.failures} step(s) did not behave as described"
    )
    return 1 if demo.failures else 0


def _free_net() -> str:
    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"


def _sidemesh(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "sidemesh", *args], check=True, capture_output=True, text=True
    ).stdout


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with DIRECT.open(url, timeout=timeout) as resp:
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
    """The cart app: plain HTTP, answering with what it was asked and the trace context it got."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = {"service": "cart", "items": 3, "path": self.path}
            if traceparent := self.headers.get("traceparent"):
                answer["traceparent"] = traceparent  # its parent: the SERVER span of cart's sidecar
            body = json.dumps(answer).encode()
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


def _call(address: str, port: int, trace_id: str | None = None) -> tuple[int, dict[str, str], str]:
    """An HTTP GET as the app would make it, through its sidecar's outbound port: (status, headers,
    body). With ``trace_id`` the app starts that trace (a W3C traceparent, sampled)."""
    headers = {"Host": "cart.shop"}
    if trace_id:
        headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("GET", "/cart/42", headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _refused(address: str, port: int, trace_id: str | None = None) -> str | None:
    """How the call was refused (a reset, or an error status from the sidecar), or None if it got through."""
    try:
        status, headers, body = _call(address, port, trace_id)
    except (ConnectionError, http.client.HTTPException) as exc:
        return exc.__class__.__name__
    if status == 200:
        return None
    reason = headers.get("sidemesh-denied-reason")
    return (
        f"HTTP {status}, sidemesh-denied-reason: {reason}" if reason else f"HTTP {status} {body.strip()[:80]}"
    )


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
    hangup = signal.getsignal(signal.SIGHUP)  # (ignored under nohup: the demo is to outlive the terminal)
    for signo in (signal.SIGTERM, signal.SIGHUP):  # `kill`, or the terminal closed: as Ctrl-C
        if not (signo == signal.SIGHUP and hangup == signal.SIG_IGN):
            signal.signal(signo, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="sidemesh-demo-"))
    demo = Demo(root, _free_net())
    cart_app: ThreadingHTTPServer | None = None
    receiver: ReceiverThread | None = None
    finished = False
    try:
        collector = _user_collector()
        if collector is None:
            receiver = ReceiverThread()
            demo.sidecar_env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.start(),
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                # The signal's own variables win over the generic ones: the user's shell may set them.
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
                "OTEL_PROPAGATORS": "tracecontext",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_SDK_DISABLED": "false",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on",  # every request: it is a demo
                "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
                # Each sidecar's service name is its workload's (the walk checks it): not a name
                # the shell gives (empty is unset)
                "OTEL_SERVICE_NAME": "",
                "OTEL_RESOURCE_ATTRIBUTES": ",".join(
                    item
                    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
                    if item.partition("=")[0].strip() != "service.name"
                ),
            }
        cart_app = _walk(demo, receiver, collector)
        finished = True
        if not args.once and not demo.failures:
            print("\nThe mesh keeps running; press Ctrl-C to stop it and remove everything.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        demo.interrupted = not finished
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        demo.fail(f"{exc}")
    finally:
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # nothing stops the clean-up
            signal.signal(signo, signal.SIG_IGN)
        say("\nstopping: sidecars, controller, CA ...")
        demo.stop_all()
        if receiver is not None:  # after the sidecars: they flush their last spans when stopping
            receiver.stop()
        if cart_app is not None:
            cart_app.shutdown()
            cart_app.server_close()
        if args.keep:
            say(f"kept {root}")
        elif not demo.failures:
            shutil.rmtree(root, ignore_errors=True)
            say("stopped; temporary files removed")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, hangup)
    return outcome(demo, root, args.keep)


def _user_collector() -> str | None:
    """The collector the user configured for traces, if any (then the demo starts no receiver)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if value := os.environ.get(name, "").strip():
            return value
    return None


def _has_trace(trace_id: str, *wanted: tuple[str, str]) -> Callable[[list[ReceivedSpan]], bool]:
    """True once the trace holds a span of each (kind, service)."""

    def check(spans: list[ReceivedSpan]) -> bool:
        got = {(s.kind, s.service) for s in spans if s.trace_id == trace_id}
        return all(w in got for w in wanted)

    return check


def _branch() -> str:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return "└─ " if encoding.startswith("utf") else "`- "


def _walk(demo: Demo, receiver: ReceiverThread | None, collector: str | None) -> ThreadingHTTPServer:
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
            "--access-log",
            "true",
            env={**demo.sidecar_env, "PYTHONOPTIMIZE": "2"},  # (-OO, as the injector runs a sidecar)
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
    allowed_trace, denied_trace = secrets.token_hex(16), secrets.token_hex(16)
    try:
        status, _, body = _call(frontend, 18080, allowed_trace)
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
    how = _refused(stranger, 18080, denied_trace)
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

    _traces(demo, receiver, collector, allowed_trace, denied_trace)

    demo.step("metrics: every sidecar's Prometheus endpoint, and `sidemesh top` on its admin port")
    for name, host in WORKLOADS.items():
        a = demo.addr(host)
        print(
            f"      {name:9} metrics http://{a}:15020/metrics   admin http://{a}:15000/config /certs /connections"
        )
    try:
        metrics = _get(f"http://{cart}:15020/metrics")[1].decode()
    except OSError as exc:
        metrics = ""
        demo.fail(f"cart's sidecar metrics: {exc}")
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("sidemesh_proxy_requests_total{") and 'direction="inbound"' in line
    ]
    if counted:
        demo.ok("cart's sidecar counted the requests it carried, by caller and decision:")
        for line in counted[:4]:
            print(f"      {line}")
    else:
        demo.fail("cart's sidecar metrics have no sidemesh_proxy_requests_total")
    print(f"      live table of cart's routes: {_command()} top {cart}:15000")
    print(f"      controller status http://{control}:{started['status_port']}/status   logs: {root}/*.log")
    return cart_app


def _command() -> str:
    """How to run `sidemesh` from here: the command itself when it is on PATH (an activated
    virtualenv), else the virtualenv's script by its path (after `make demo`: .venv/bin/sidemesh)."""
    script = Path(sys.executable).parent / "sidemesh"
    found = shutil.which("sidemesh")
    if found and Path(found).resolve() == script.resolve():
        return "sidemesh"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _traces(
    demo: Demo, receiver: ReceiverThread | None, collector: str | None, allowed: str, denied: str
) -> None:
    if receiver is None:
        demo.step(f"traces: the sidecars send their spans to your collector at {collector}")
        demo.ok(f"frontend -> cart is trace {allowed}, the stranger's denied call trace {denied}")
        print(
            "      search by trace ID, or for the services frontend.shop, cart.shop and stranger.shop"
            " (a local Jaeger's UI: http://localhost:16686)"
        )
        return
    demo.step(
        f"traces: the sidecars sent their spans to the demo's OTLP receiver ({receiver.receiver.endpoint})"
    )
    branch = _branch()
    for what, trace_id, wanted in (
        ("frontend -> cart, allowed", allowed, (("CLIENT", "frontend.shop"), ("SERVER", "cart.shop"))),
        ("stranger -> cart, denied", denied, (("CLIENT", "stranger.shop"), ("SERVER", "cart.shop"))),
    ):
        spans = receiver.wait_for(_has_trace(trace_id, *wanted), timeout=5.0)
        if spans is None:
            got = [f"{s.kind} {s.service}" for s in receiver.spans() if s.trace_id == trace_id]
            demo.fail(f"trace {trace_id} ({what}): expected {wanted}, received {got or 'nothing'} in 5 s")
            continue
        demo.ok(f"{what}: trace {trace_id} (the app sent a traceparent; the sidecars' spans follow)")
        for line in trace_tree(spans, trace_id, branch):
            print(f"      {line}")
