"""`sidemesh demo --netns`: the same walk-through with real network namespaces and iptables (root).

Each workload is a network namespace on a bridge, with its own IP address, as a pod on a node:
`sidemesh proxy init` writes real iptables rules in it, the sidecar runs as UID 1337, and the apps
call each other by pod IP with plain connections that the kernel hands to the sidecars. The CA and
the controller run in the node's namespace (which holds the bridge); an outsider namespace has no
sidecar. Nothing is created in the host's own network namespace: deleting the namespaces at the
end removes the bridge, the veths and every rule with them.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidemesh.cli import CLIError
from sidemesh.demo import ALLOW, TD, Demo, denial_of, identity_seen, outcome, say
from sidemesh.netns import (
    CLEAN_ENV,
    Cluster,
    Netns,
    NetnsError,
    Process,
    as_user,
    list_netns,
    process_ids,
    why_unavailable,
)

TOOLS = ("ip", "iptables", "iptables-save", "iptables-restore", "setpriv", "unshare", "mount")
PODS = {"frontend": 10, "cart": 11, "stranger": 12, "outsider": 13}
MESHED = ("frontend", "cart", "stranger")
PROXY_UID = 1337
CA_PORT, CONTROLLER_PORT, STATUS_PORT = 15012, 15010, 15015
APP_PORT = 8080
PREFIX = "smdemo"
SIDEMESH = [sys.executable, "-m", "sidemesh"]

WORKLOAD = """\
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: {name}-1, namespace: shop, labels: {{app: {name}}}}}
spec: {{serviceAccount: {name}, address: {address}, ports: [{{port: 8080}}]}}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

# The cart's app, in the cart's namespace: answers every GET with a little JSON.
APP = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"service": "cart", "items": 3, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
print("serving", flush=True)
server.serve_forever()
"""

# An app's call, run inside a pod's namespace: a plain TCP connection to HOST:PORT and an HTTP GET.
CALL = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /cart/42 HTTP/1.1\\r\\nHost: cart.shop\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
except OSError as exc:
    print(json.dumps({"error": exc.__class__.__name__}))
else:
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    print(json.dumps({"status": status, "body": body.decode(errors="replace"), "error": None if data else "EOF"}))
"""


def check_can_run() -> None:
    """A CLIError the user can act on if this machine or user cannot build the pods."""
    why = why_unavailable(*TOOLS)
    if why is not None:
        raise CLIError(f"--netns {why}; or run `sidemesh demo` without --netns (no root needed)")


def run(once: bool, keep: bool) -> int:
    check_can_run()
    hangup = signal.getsignal(signal.SIGHUP)  # (ignored under nohup: the demo is to outlive the terminal)
    for signo in (signal.SIGTERM, signal.SIGHUP):  # `kill`, or the terminal closed: as Ctrl-C
        if not (signo == signal.SIGHUP and hangup == signal.SIG_IGN):
            signal.signal(signo, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="sidemesh-netns-demo-"))
    root.chmod(0o755)  # the sidecars (UID 1337) read their token, the bundle and the manifests here
    subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
    demo = Demo(root, subnet)
    cluster: Cluster | None = None
    finished = False
    try:
        demo.step("Build the pods: network namespaces on a bridge, each with its own IP")
        cluster = Cluster.create(root, subnet, prefix=PREFIX)
        for name, host in PODS.items():
            cluster.add_pod(name, host)
        demo.ok(
            f"a node namespace {cluster.node.name} holds the bridge {cluster.BRIDGE} ({cluster.gateway}/24)"
        )
        for name, host in PODS.items():
            role = "no sidecar" if name not in MESHED else "meshed"
            print(f"      {name:9} {subnet}.{host:<4} namespace {cluster.pods[name].name}  ({role})")
        _walk(demo, cluster)
        finished = True
        if not once and not demo.failures:
            print("\nThe mesh keeps running; press Ctrl-C to stop it and remove everything.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        demo.interrupted = not finished
    except (NetnsError, RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        demo.fail(f"{exc}")
    finally:
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # nothing stops the clean-up
            signal.signal(signo, signal.SIG_IGN)
        say("\nstopping: sidecars, apps, controller, CA; deleting the namespaces ...")
        problems = cluster.close() if cluster is not None else []
        left = [
            n for n in list_netns() if cluster is not None and n.startswith(f"{PREFIX}-{cluster.run_id}-")
        ]
        for problem in [*problems, *(f"namespace {n} is still there" for n in left)]:
            demo.fail(problem)
        if keep:
            say(f"kept {root} (logs, keys, manifests)")
        elif not demo.failures:
            shutil.rmtree(root, ignore_errors=True)
        if cluster is not None and not left:
            say(
                f"stopped; {len(cluster.namespaces())} namespaces deleted (with the bridge, the veths and the iptables rules)"
            )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, hangup)
    return outcome(demo, root, keep)


def _interrupt(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt


class Shop:
    """What `_walk` starts, and the calls it makes."""

    def __init__(self, demo: Demo, cluster: Cluster) -> None:
        self.demo, self.cluster, self.root = demo, cluster, demo.root
        self.mesh = self.root / "mesh"
        self.sidecars: dict[str, Process] = {}

    def addr(self, pod: str) -> str:
        return f"{self.cluster.subnet}.{PODS[pod]}"

    def pod(self, name: str) -> Netns:
        return self.cluster.pods[name]

    def call(self, source: str, port: int = APP_PORT) -> dict[str, Any]:
        """The source pod's app connects to cart's pod IP, as any program would."""
        done = self.pod(source).run(sys.executable, "-c", CALL, self.addr("cart"), str(port), timeout=20)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def start_sidecar(self, name: str) -> Process:
        cmd = [
            *SIDEMESH,
            "proxy",
            "run",
            "--workload",
            f"shop/{name}-1",
            "--service-account",
            name,
            "--controller",
            f"{self.cluster.gateway}:{CONTROLLER_PORT}",
            "--ca-address",
            f"{self.cluster.gateway}:{CA_PORT}",
            "--token-file",
            str(self.root / f"{name}.token"),
            "--bundle-file",
            str(self.root / "bundle.pem"),
            "--default-policy",
            "deny",
            "--drain-timeout",
            "2s",
            "--log-level",
            "info",
            "--access-log",
            "true",
        ]
        stage = self.root / "stage"
        stage.mkdir(mode=0o755, exist_ok=True)
        # PYTHONOPTIMIZE=2: -OO, as the injector runs a sidecar
        env = {**CLEAN_ENV, "HOME": str(self.root), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONOPTIMIZE": "2"}
        self.sidecars[name] = self.pod(name).start(
            f"{name}-sidecar", *as_user(PROXY_UID, PROXY_UID, cmd, stage), env=env
        )
        return self.sidecars[name]

    def ready(self, name: str) -> bool:
        done = self.pod(name).run(
            sys.executable,
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:15020/healthz/ready', timeout=2).status)",
            check=False,
        )
        return done.stdout.strip() == "200"


def _walk(demo: Demo, cluster: Cluster) -> None:
    shop = Shop(demo, cluster)
    for step in (_control_plane, _init, _workloads, _calls, _new_policy, _where):
        step(shop)


def _control_plane(shop: Shop) -> None:
    demo, root, node, gateway = shop.demo, shop.root, shop.cluster.node, shop.cluster.gateway
    demo.step("Start the CA and the controller in the node's namespace")
    _sidemesh(node, "ca", "bootstrap", "--dir", str(root / "ca"), "--trust-domain", TD)
    shutil.copy(root / "ca" / "root-cert.pem", root / "bundle.pem")  # public, as a ConfigMap
    (root / "bundle.pem").chmod(0o644)
    tokens = root / "tokens.yaml"
    for name in [*MESHED, "controller"]:
        identity = "sidemesh-system/sidemesh-controller" if name == "controller" else f"shop/{name}"
        token = root / f"{name}.token"
        token.write_text(_sidemesh(node, "ca", "local-token", "--file", str(tokens), "--identity", identity))
        token.chmod(0o400)
        if name != "controller":  # a token only its sidecar can read, as a projected token
            shutil.chown(token, PROXY_UID, PROXY_UID)
    shop.mesh.mkdir(mode=0o755)
    docs = [WORKLOAD.format(name=n, address=shop.addr(n)) for n in MESHED]
    (shop.mesh / "workloads.yaml").write_text("---\n".join([*docs, SERVICE]))
    (shop.mesh / "cart-allow-frontend.yaml").write_text(ALLOW.format(who="frontend"))
    ca = node.start(
        "ca",
        *SIDEMESH,
        "ca",
        "serve",
        "--authenticator",
        "local",
        "--token-file",
        str(tokens),
        "--ca-dir",
        str(root / "ca"),
        "--listen",
        f"{gateway}:{CA_PORT}",
        "--metrics-listen",
        "",
    )
    ca.wait_for_record("CA serving", 30)
    controller = node.start(
        "controller",
        *SIDEMESH,
        "controller",
        "serve",
        "--source",
        "directory",
        "--config-dir",
        str(shop.mesh),
        "--listen",
        f"{gateway}:{CONTROLLER_PORT}",
        "--metrics-listen",
        f"{gateway}:{STATUS_PORT}",
        "--status-from",
        f"{gateway}/32",  # the demo's node reads /status (below); pods may not
        "--ca-address",
        f"{gateway}:{CA_PORT}",
        "--token-file",
        str(root / "controller.token"),
        "--bundle-file",
        str(root / "bundle.pem"),
        "--default-policy",
        "deny",
    )
    controller.wait_for_record("controller serving", 30)
    demo.ok(f"CA on {gateway}:{CA_PORT}, controller on {gateway}:{CONTROLLER_PORT}; manifests in {shop.mesh}")
    demo.ok("policy: only shop/frontend may call cart (mesh default: deny)")


def _init(shop: Shop) -> None:
    demo = shop.demo
    demo.step(
        "`sidemesh proxy init` in each meshed pod: real iptables rules, as the init container writes them"
    )
    for name in MESHED:
        shop.pod(name).run(*SIDEMESH, "proxy", "init")
    rules = shop.pod("cart").run("iptables-save", "-t", "nat").stdout.splitlines()
    ours = [r for r in rules if "SIDEMESH" in r and r.startswith("-A")]
    if not ours:
        demo.fail("no SIDEMESH rules in the cart pod's nat table")
    else:
        demo.ok(f"{len(ours)} rules in each pod's nat table; the ones that matter (cart):")
        shown = ("REDIRECT", "--uid-owner 1337 -j RETURN", "-A PREROUTING", "-A OUTPUT")
        for rule in [r for r in ours if any(key in r for key in shown)]:
            print(f"      {rule}")


def _workloads(shop: Shop) -> None:
    demo = shop.demo
    demo.step("Start cart's app, then a sidecar in each meshed pod, as UID 1337")
    app = shop.pod("cart").start("cart-app", sys.executable, "-c", APP, str(APP_PORT))
    app.wait_until(lambda: "serving" in app.text(), "cart's app serving", 15)
    for name in MESHED:
        shop.start_sidecar(name)
    for name in MESHED:
        shop.sidecars[name].wait_until(functools.partial(shop.ready, name), f"{name}'s sidecar ready", 30)
    for name in MESHED:
        uid, _gid = process_ids(shop.sidecars[name].pid)  # exec'd all the way down: the sidecar itself
        (demo.ok if uid == PROXY_UID else demo.fail)(f"{name}'s sidecar ready, running as UID {uid}")


def _calls(shop: Shop) -> None:
    demo = shop.demo
    demo.step(
        f"frontend -> cart: the app connects to {shop.addr('cart')}:{APP_PORT}, plain HTTP; iptables hands it to the sidecars"
    )
    reply = shop.call("frontend")
    if reply.get("status") == 200:
        demo.ok(f"cart answered {reply['body']}")
        source = identity_seen(shop.sidecars["cart"].records)
        if source == f"spiffe://{TD}/ns/shop/sa/frontend":
            demo.ok(f"cart's sidecar saw the caller as {source}, over mTLS")
        else:
            demo.fail(f"the cart's sidecar logged the caller as {source}")
    else:
        demo.fail(f"frontend could not reach cart: {reply}")

    demo.step("stranger -> cart: refused, and the reason is logged")
    _expect_refused(demo, shop.call("stranger"), "the stranger's app")
    denied = _await(lambda: denial_of(shop.sidecars["cart"].records, f"spiffe://{TD}/ns/shop/sa/stranger"))
    if denied:
        demo.ok(f"cart's sidecar log: source {denied['source']}: {denied['reason']}")
    else:
        demo.fail("no denial in the cart sidecar's log")

    demo.step("outsider (a pod with no sidecar) -> cart in plaintext: refused (strict mTLS)")
    _expect_refused(demo, shop.call("outsider"), "the outsider")
    refused = _await(lambda: _refusal(shop.sidecars["cart"].records, shop.addr("outsider")))
    if refused:
        demo.ok(f"cart's sidecar log: {refused['reason']}")
    else:
        demo.fail("no refusal of the outsider in the cart sidecar's log")


def _new_policy(shop: Shop) -> None:
    demo = shop.demo
    demo.step("allow the stranger: write a ServiceAuthorization into the manifests directory")
    (shop.mesh / "cart-allow-stranger.yaml").write_text(ALLOW.format(who="stranger"))
    began = time.monotonic()
    while time.monotonic() - began < 10:
        if shop.call("stranger").get("status") == 200:
            demo.ok(
                f"the stranger's next call is allowed, {time.monotonic() - began:.2f} s after the file was written"
            )
            break
        time.sleep(0.05)
    else:
        demo.fail("the new policy never took effect")
    if time.monotonic() - began > 2.0:
        demo.fail("the policy took more than two seconds")


def _where(shop: Shop) -> None:
    root, node, gateway = shop.root, shop.cluster.node, shop.cluster.gateway
    shop.demo.step("where to look (while it runs)")
    front, cart = shop.pod("frontend").name, shop.pod("cart").name
    print(
        f"      ip netns exec {front} curl http://{shop.addr('cart')}:{APP_PORT}/   (as the frontend's app)"
    )
    print(f"      ip netns exec {cart} iptables-save -t nat                  (the rules init wrote)")
    print(f"      ip netns exec {cart} curl -s 127.0.0.1:15000/certs          (the sidecar's identity)")
    print(f"      ip netns exec {cart} curl -s 127.0.0.1:15020/metrics        (its metrics)")
    print(
        f"      controller status http://{gateway}:{STATUS_PORT}/status (in {node.name})   logs: {root}/*.log"
    )


def _sidemesh(ns: Netns, *args: str) -> str:
    return ns.run(*SIDEMESH, *args, timeout=60).stdout


def _expect_refused(demo: Demo, reply: dict[str, Any], who: str) -> None:
    if reply.get("status") == 200:
        demo.fail(f"{who} got through: {reply.get('body')}")
    elif reply.get("status") is not None:
        demo.ok(f"{who} got HTTP {reply['status']} from its sidecar: {reply.get('body', '').strip()[:80]}")
    else:
        demo.ok(f"{who} saw {reply.get('error')}")


def _refusal(records: Callable[[], list[dict[str, Any]]], client_ip: str) -> dict[str, Any] | None:
    found = [
        r
        for r in records()
        if r.get("event") == "inbound connection refused"
        and str(r.get("client", "")).startswith(f"{client_ip}:")
    ]
    return found[-1] if found else None


def _await(find: Callable[[], dict[str, Any] | None], timeout: float = 5.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.05)
    return None
