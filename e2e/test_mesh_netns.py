"""A small shop as network namespaces: the real `proxy init`, real sidecars as UID 1337, a real CA.

1. A node namespace holds a bridge (10.77.0.1/24, and fd77::1/64: the cluster is dual stack) and
   the CA, a process serving on 10.77.0.1:15012. The CA is not meshed: the sidecars' own traffic (UID 1337) is never captured,
   so they reach it directly.
2. One namespace per pod, wired to the bridge: frontend (.10, fd77::10), cart (.11, fd77::11) and
   stranger (.12, fd77::12) are meshed (`sidemesh proxy init`, then `sidemesh proxy run` as UID 1337 and ready); outsider (.13)
   has neither. cart serves HTTP on 8080 (captured) and on 9090 (--exclude-inbound-ports 9090).
   A ServiceAuthorization allows frontend -> cart on 8080; stranger has its own service account.
3. The scenarios, one test each, in this order; a test that changes the mesh puts it back.

The module fixture builds the mesh once. Its teardown always runs: every process is stopped and
every namespace deleted (with it the veths, the bridge and the iptables rules); nothing is
created in the host's network namespace. SIDEMESH_E2E_KEEP=1 keeps the work directory (every
process's log) for a look afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e.netns import (
    CLEAN_ENV,
    REPO,
    Cluster,
    Netns,
    Process,
    as_user,
    capture,
    process_ids,
    tcp_segments,
    why_skip,
)

SKIP = why_skip(
    "ip", "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore",
    "curl", "unshare", "setpriv", "mount",
)  # fmt: skip
pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

SIDEMESH = [sys.executable, "-m", "sidemesh"]
SUBNET = "10.77.0"
SUBNET6 = "fd77::"  # pod `host` is also fd77::<host>, so `proxy init` captures IPv6 as well
HOSTS = {"frontend": 10, "cart": 11, "stranger": 12, "outsider": 13}
MESHED = ("frontend", "cart", "stranger")
PROXY_UID = 1337
CA_PORT = 15012
READY_TIMEOUT = 20.0
STRANGER_ID = "spiffe://cluster.local/ns/shop/sa/stranger"

WORKLOAD = """\
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: {name}-1, namespace: shop, labels: {{app: {name}}}}}
spec: {{serviceAccount: {name}, addresses: [{address}, "{address6}"], ports: [{ports}], meshed: {meshed}}}
"""

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{port: 80, targetPort: 8080}]
"""

ALLOW_FRONTEND = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080, 6060, 7070]}
"""

ALLOW_PLAINTEXT = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-allow-plaintext, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{unauthenticated: true}]
    to: {ports: [8080]}
"""

# cart's app: answers every GET with "cart:<port>:<path> from <client address>", on each
# [address:]port it is given (a port alone: 0.0.0.0 and [::]).
APP = """
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"cart:{self.server.server_port}:{self.path}\\n".encode()
        if self.path.startswith("/who"):
            body = f"cart:{self.server.server_port}:{self.path} from {self.client_address[0]}\\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

servers = []
for arg in sys.argv[1:]:
    host, _, port = arg.rpartition(":")
    servers.append(ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler))
    if not host:
        servers.append(Server6(("::", int(port)), Handler))
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
threading.Event().wait()
"""


@dataclass(frozen=True)
class Curl:
    rc: int
    body: str
    error: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Shop:
    cluster: Cluster
    workdir: Path
    ca: Process | None = None
    app: Process | None = None
    sidecars: dict[str, Process] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.workdir / "mesh"

    def addr(self, pod: str) -> str:
        return f"{SUBNET}.{HOSTS[pod]}"

    def addr6(self, pod: str) -> str:
        return f"{SUBNET6}{HOSTS[pod]}"

    def url(self, port: int, path: str) -> str:
        return f"http://{self.addr('cart')}:{port}{path}"

    def url6(self, port: int, path: str) -> str:
        return f"http://[{self.addr6('cart')}]:{port}{path}"

    def pod(self, name: str) -> Netns:
        return self.cluster.pods[name]

    # -- step 1: the node, the CA, the mesh configuration ------------------------------------

    def build(self) -> None:
        ca_dir, tokens = self.workdir / "ca", self.workdir / "tokens.yaml"
        sidemesh("ca", "bootstrap", "--dir", str(ca_dir))
        shutil.copy(ca_dir / "root-cert.pem", self.workdir / "bundle.pem")  # public, as a ConfigMap
        (self.workdir / "bundle.pem").chmod(0o644)
        for name in MESHED:  # a token only its sidecar can read, as a projected token
            token = self.workdir / f"{name}.token"
            token.write_text(
                sidemesh("ca", "local-token", "--file", str(tokens), "--identity", f"shop/{name}")
            )
            token.chmod(0o400)
            os.chown(token, PROXY_UID, PROXY_UID)
        self.config_dir.mkdir(mode=0o755)
        docs = [
            WORKLOAD.format(
                name=name,
                address=self.addr(name),
                address6=self.addr6(name),
                meshed=str(name in MESHED).lower(),
                ports=", ".join(
                    f"{{port: {p}}}" for p in ((8080, 6060, 7070) if name == "cart" else (8080,))
                ),
            )
            for name in HOSTS
        ]
        (self.config_dir / "workloads.yaml").write_text("---\n".join([*docs, SERVICE]))
        (self.config_dir / "cart-allow-frontend.yaml").write_text(ALLOW_FRONTEND)
        self.ca = self.cluster.node.start(
            "ca",
            *SIDEMESH,
            "ca",
            "serve",
            "--authenticator",
            "local",
            "--token-file",
            str(tokens),
            "--ca-dir",
            str(ca_dir),
            "--listen",
            f"{self.cluster.gateway}:{CA_PORT}",
            "--metrics-listen",
            "",
        )

        # 2. the pods: init in each meshed one, cart's app, then the sidecars (all at once).
        for name, host in HOSTS.items():
            self.cluster.add_pod(name, host)
        # Also a port on loopback only (a debug endpoint) and one on the pod's address only.
        ports = ["8080", "9090", "127.0.0.1:6060", f"{self.addr('cart')}:7070"]
        app = self.app = self.pod("cart").start("cart-app", sys.executable, "-c", APP, *ports)
        for name in MESHED:
            exclude = ["--exclude-inbound-ports", "9090"] if name == "cart" else []
            self.pod(name).run(*SIDEMESH, "proxy", "init", *exclude)
        app.wait_until(lambda: "serving" in app.text(), "cart's app serving", 10)
        self.ca.wait_for_record("CA serving", 20)
        for name in MESHED:
            self.start_sidecar(name)
        for name in MESHED:
            self.wait_ready(name)

    # -- sidecars ----------------------------------------------------------------------------

    def start_sidecar(self, name: str, *extra: str) -> Process:
        """`sidemesh proxy run` in the pod as UID/GID 1337 (see `as_user` for how it reaches the
        interpreter when that lives under a directory closed to other users)."""
        cmd = [
            *SIDEMESH,
            "proxy",
            "run",
            "--workload",
            f"shop/{name}-1",
            "--config-dir",
            str(self.config_dir),
            "--ca-address",
            f"{self.cluster.gateway}:{CA_PORT}",
            "--token-file",
            str(self.workdir / f"{name}.token"),
            "--bundle-file",
            str(self.workdir / "bundle.pem"),
            "--drain-timeout",
            "2s",
            *extra,
        ]
        stage = self.workdir / "stage"
        stage.mkdir(mode=0o755, exist_ok=True)
        # PYTHONOPTIMIZE=2: as the injector runs it (-OO)
        env = {**CLEAN_ENV, "HOME": str(self.workdir), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONOPTIMIZE": "2"}
        proc = self.pod(name).start(f"{name}-sidecar", *as_user(PROXY_UID, PROXY_UID, cmd, stage), env=env)
        self.sidecars[name] = proc
        return proc

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT) -> float:
        """Seconds until the sidecar's /healthz/ready answers 200 (asked from inside the pod)."""
        start = time.monotonic()
        proc = self.sidecars[name]
        proc.wait_until(lambda: self.ready_status(name) == "200", f"{name}'s sidecar ready", timeout)
        return time.monotonic() - start

    def ready_status(self, name: str) -> str:
        return self.http_get(name, "http://127.0.0.1:15020/healthz/ready", status_only=True)

    def http_get(self, pod: str, url: str, status_only: bool = False) -> str:
        fmt = ["-o", "/dev/null", "-w", "%{http_code}"] if status_only else []
        return self.pod(pod).run("curl", "-s", "--max-time", "2", *fmt, url, check=False).stdout

    def restart_sidecar(self, name: str, *extra: str) -> float:
        assert self.sidecars[name].stop() == 0, self.sidecars[name].tail()
        self.start_sidecar(name, *extra)
        return self.wait_ready(name)

    # -- traffic -----------------------------------------------------------------------------

    def curl(self, pod: str, url: str, *, as_proxy: bool = False, max_time: float = 5.0) -> Curl:
        """An HTTP GET from inside `pod`: as root (an app, captured), or as the proxy's UID."""
        cmd = ["curl", "-sS", "--max-time", str(max_time), url]
        if as_proxy:
            cmd = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--", *cmd]
        start = time.monotonic()
        done = self.pod(pod).run(*cmd, check=False, timeout=max_time + 10)
        return Curl(done.returncode, done.stdout, done.stderr.strip(), time.monotonic() - start)

    def explain(self, reply: Curl) -> str:
        """A failed request, with the errors the sidecars logged (the last lines of each traceback)."""
        lines = [repr(reply)]
        for name, proc in self.sidecars.items():
            for r in proc.records():
                if r.get("level") == "error":
                    where = " | ".join(str(r.get("exception", "")).strip().splitlines()[-3:])
                    lines.append(f"  {name}'s sidecar: {r.get('event')}: {where}")
        return "\n".join(lines[:12])

    def metric(self, pod: str, name: str, **labels: str) -> float:
        """A sample from the sidecar's /metrics (0 when absent)."""
        text = self.http_get(pod, "http://127.0.0.1:15020/metrics")
        for line in text.splitlines():
            found = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if found and found[1] == name:
                have = dict(re.findall(r'(\w+)="([^"]*)"', found[2] or ""))
                if all(have.get(k) == v for k, v in labels.items()):
                    return float(found[3])
        return 0.0


def sidemesh(*args: str) -> str:
    done = subprocess.run(
        [*SIDEMESH, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=CLEAN_ENV, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"`sidemesh {' '.join(args)}` exited {done.returncode}:\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def shop() -> Iterator[Shop]:
    workdir = Path(tempfile.mkdtemp(prefix="sidemesh-e2e-mesh-"))
    workdir.chmod(0o755)  # the sidecars (UID 1337) read their configuration, token and bundle here
    cluster: Cluster | None = None
    try:
        cluster = Cluster.create(workdir, SUBNET, subnet6=SUBNET6)
        shop = Shop(cluster, workdir)
        started = time.monotonic()
        shop.build()
        print(f"\nmesh built in {time.monotonic() - started:.2f}s (CA, 4 pods, 3 sidecars ready)")
        yield shop
    finally:
        problems = cluster.close() if cluster is not None else []
        if os.environ.get("SIDEMESH_E2E_KEEP"):
            print(f"\nkept the logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, problems


# -- 3. the scenarios --------------------------------------------------------------------------


def test_1_frontend_reaches_cart_through_both_sidecars(shop: Shop) -> None:
    before = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="allow")
    reply = shop.curl("frontend", shop.url(8080, "/hello"))
    assert reply.ok, shop.explain(reply)
    assert reply.body == "cart:8080:/hello\n"
    assert (
        shop.metric("frontend", "sidemesh_proxy_connections_total", direction="outbound", decision="allow")
        >= 1
    )
    after = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="allow")
    assert after == before + 1, "the connection did not arrive through cart's sidecar"


def test_2_bytes_between_the_pods_are_tls(shop: Shop) -> None:
    secret, plain = f"/secret-{secrets.token_hex(8)}", f"/plain-{secrets.token_hex(8)}"
    with capture(shop.cluster.node, Cluster.BRIDGE) as frames:
        meshed = shop.curl("frontend", shop.url(8080, secret))
        direct = shop.curl("outsider", shop.url(9090, plain))  # excluded port: plaintext on the wire
    assert meshed.ok and secret in meshed.body, shop.explain(meshed)
    assert direct.ok and plain in direct.body, direct
    wire = b"".join(frames)
    assert plain.encode() in wire, "the capture does not see plaintext where there is plaintext"
    assert secret.encode() not in wire, "frontend -> cart crossed the bridge in plaintext"
    front, cart = shop.addr("frontend"), shop.addr("cart")
    between = [
        s for s in tcp_segments(frames) if {s.src, s.dst} == {front, cart} and 8080 in (s.sport, s.dport)
    ]
    # HTTP requests ride a pooled mTLS connection (opened by test 1, so no handshake here): what
    # crosses are TLS application-data records, both ways.
    records = {(s.src, s.payload[:3]) for s in between if s.payload[:3] == b"\x17\x03\x03"}
    assert records == {(front, b"\x17\x03\x03"), (cart, b"\x17\x03\x03")}, "no TLS records both ways"
    assert sum(len(s.payload) for s in between) > 200, "too little traffic captured to be the exchange"


def test_3_outsider_without_sidecar_is_refused_in_strict_mode(shop: Shop) -> None:
    reply = shop.curl("outsider", shop.url(8080, "/strict"))
    assert not reply.ok and "cart:" not in reply.body, reply
    assert reply.rc in (52, 56), f"expected a reset or an empty reply, got {reply}"  # not a timeout
    outsider = shop.addr("outsider") + ":"
    shop.sidecars["cart"].wait_for_record(
        "inbound connection refused",
        5,
        where=lambda r: str(r.get("client")).startswith(outsider) and "strict" in str(r.get("reason")),
    )


def test_4_permissive_mode_lets_plaintext_in_only_when_policy_allows(shop: Shop) -> None:
    extra = shop.config_dir / "cart-allow-plaintext.yaml"
    try:
        ready = shop.restart_sidecar("cart", "--mode", "permissive")
        print(f"\ncart's sidecar restarted in permissive mode, ready in {ready:.2f}s")
        denied = shop.curl("outsider", shop.url(8080, "/permissive-denied"))
        # HTTP: a 403; a caller outside the mesh learns no policy names (the log has them); the
        # app never sees the request.
        assert "cart:" not in denied.body and "callers outside the mesh are told no more" in denied.body, (
            denied
        )
        assert "cart-allow-frontend" not in denied.body, denied
        record = shop.sidecars["cart"].wait_for_record(
            "request denied", 5, where=lambda r: r.get("source") == "unauthenticated"
        )
        assert "shop/cart-allow-frontend" in record["reason"]

        extra.write_text(ALLOW_PLAINTEXT)
        shop.sidecars["cart"].wait_for_record(
            "configuration applied",
            5,
            where=lambda r: "shop/cart-allow-plaintext" in r.get("policies", []),
        )
        allowed = shop.curl("outsider", shop.url(8080, "/permissive-allowed"))
        assert allowed.ok and allowed.body == "cart:8080:/permissive-allowed\n", shop.explain(allowed)
        meshed = shop.curl("frontend", shop.url(8080, "/still-mtls"))
        assert meshed.ok and meshed.body == "cart:8080:/still-mtls\n", shop.explain(meshed)
    finally:
        extra.unlink(missing_ok=True)
        shop.restart_sidecar("cart")  # strict again, for the tests that follow
    assert not shop.curl("outsider", shop.url(8080, "/strict-again")).ok


def test_5_stranger_is_denied_and_the_reason_is_logged(shop: Shop) -> None:
    done = shop.pod("stranger").run(
        "curl", "-sS", "--max-time", "5", "-D", "-", shop.url(8080, "/stranger"), check=False, timeout=15
    )
    assert "cart:" not in done.stdout, done.stdout
    head = done.stdout.split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("http/1.1 403"), done.stdout
    record = shop.sidecars["cart"].wait_for_record(
        "request denied", 5, where=lambda r: r.get("source") == STRANGER_ID
    )
    assert "shop/cart-allow-frontend" in record["reason"], record
    assert record["port"] == 8080 and record["path"] == "/stranger"
    # The caller learns the reason too, in a response header.
    assert f"sidemesh-denied-reason: {record['reason'].lower()}" in head, head


def test_6_excluded_inbound_port_bypasses_the_proxy(shop: Shop) -> None:
    before = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="refused")
    reply = shop.curl("outsider", shop.url(9090, "/direct"))
    assert reply.ok and reply.body == "cart:9090:/direct\n", reply
    refused = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="refused")
    assert refused == before, "cart's sidecar saw a connection to the excluded port"


def test_7_the_proxys_own_traffic_is_not_captured(shop: Shop) -> None:
    for name in MESHED:
        assert process_ids(shop.sidecars[name].pid) == (PROXY_UID, PROXY_UID), f"{name}'s sidecar"
        # It reached the CA from inside its captured pod: no loop through its own listeners.
        certs = json.loads(shop.http_get(name, "http://127.0.0.1:15000/certs"))
        assert certs["identity"] == f"spiffe://cluster.local/ns/shop/sa/{name}"
        assert certs["state"] == "valid"
    # The same request from the frontend pod: as the app it goes through the sidecar (mTLS); as
    # UID 1337 it is not redirected, leaves in plaintext, and cart's sidecar refuses it (strict).
    as_app = shop.curl("frontend", shop.url(8080, "/as-app"))
    assert as_app.ok, shop.explain(as_app)
    as_proxy = shop.curl("frontend", shop.url(8080, "/as-proxy"), as_proxy=True)
    assert not as_proxy.ok and "cart:" not in as_proxy.body, as_proxy
    frontend = shop.addr("frontend") + ":"
    shop.sidecars["cart"].wait_for_record(
        "inbound connection refused",
        5,
        where=lambda r: (
            str(r.get("client")).startswith(frontend) and r.get("protocol") in ("plaintext", "http/1")
        ),
    )


def test_8_frontend_sidecar_restart(shop: Shop) -> None:
    assert shop.sidecars["frontend"].stop() == 0, "SIGTERM should drain and exit 0"
    down = shop.curl("frontend", shop.url(8080, "/while-down"), max_time=5)
    assert not down.ok and down.seconds < 4, f"while the sidecar is down: {down}"  # refused, no hang

    started = time.monotonic()
    shop.start_sidecar("frontend")
    ready = shop.wait_ready("frontend")
    while not (reply := shop.curl("frontend", shop.url(8080, "/after-restart"), max_time=2)).ok:
        assert time.monotonic() - started < ready + 5, shop.explain(reply)
        time.sleep(0.1)
    works = time.monotonic() - started
    print(
        f"\nfrontend's sidecar: down -> {down.error!r} in {down.seconds:.2f}s; restarted, ready in "
        f"{ready:.2f}s, frontend -> cart works {works:.2f}s after the start"
    )
    assert reply.body == "cart:8080:/after-restart\n"
    assert works < ready + 5


def test_9_a_pod_cannot_reach_another_pods_admin_or_bypass_its_sidecar(shop: Shop) -> None:
    cart = shop.addr("cart")
    # The admin port (config, certificates, connections) listens on the pod's loopback only.
    admin = shop.curl("outsider", f"http://{cart}:15000/config", max_time=3)
    assert not admin.ok and admin.rc == 7, f"cart's admin port answered another pod: {admin}"  # refused
    # From a meshed pod the attempt goes through its own sidecar, and cart's refuses the port.
    admin = shop.curl("stranger", f"http://{cart}:15000/config", max_time=3)
    assert not admin.ok and "policies" not in admin.body, f"cart's admin port answered another pod: {admin}"
    # The inbound port itself, reached directly in plaintext (it is exempt from capture): refused.
    direct = shop.curl("outsider", f"http://{cart}:15006/", max_time=3)
    assert not direct.ok and "cart:" not in direct.body, direct
    # From inside a meshed pod, the app talking straight to its own sidecar's listeners.
    own_inbound = shop.curl("frontend", "http://127.0.0.1:15006/", max_time=3)
    assert not own_inbound.ok and "cart:" not in own_inbound.body, own_inbound
    # A non-root app cannot become the proxy's UID to escape capture (no CAP_SETUID).
    trick = shop.pod("frontend").run(
        "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--",
        "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--",
        "curl", "-sS", "--max-time", "3", shop.url(8080, "/uid-trick"),
        check=False, timeout=15,
    )  # fmt: skip
    assert trick.returncode != 0 and "cart:" not in trick.stdout, trick
    assert "not permitted" in trick.stderr.lower(), trick.stderr


def test_10_inbound_goes_to_the_address_the_caller_asked_for(shop: Shop) -> None:
    """As Istio (1.10) and Linkerd (2.11) deliver: a port the app binds to its pod's address only
    is reached, one it binds to 127.0.0.1 only (a debug endpoint) is not reachable from other
    pods, as without the mesh; the app sees the sidecar's 127.0.0.6, and the proxy's connection
    to its own pod's address does not loop back into its inbound listener."""
    pod_only = shop.curl("frontend", shop.url(7070, "/who"))
    assert pod_only.ok and pod_only.body == "cart:7070:/who from 127.0.0.6\n", shop.explain(pod_only)
    loopback_only = shop.curl("frontend", shop.url(6060, "/who"))
    assert "cart:6060" not in loopback_only.body, loopback_only
    # Without the mesh the same two ports answer the same way (from cart's own pod, uncaptured).
    assert shop.http_get("cart", f"http://{shop.addr('cart')}:7070/direct").startswith("cart:7070:")
    assert shop.http_get("cart", "http://127.0.0.1:6060/direct").startswith("cart:6060:")
    assert "cart:6060" not in shop.curl("outsider", shop.url(6060, "/who"), max_time=3).body


def test_11_ipv6_the_same_mesh_over_the_pods_ipv6_addresses(shop: Shop) -> None:
    """The pods are dual stack, so `proxy init` captured IPv6 too (ip6tables, ::6 on lo) and the
    sidecars listen on both families: an app calling cart's IPv6 address gets the same mesh as
    over IPv4 (mTLS on the wire, policy, strict mode, the excluded port), and cart's app sees the
    sidecar's ::6."""
    before = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="allow")
    secret, plain = f"/secret6-{secrets.token_hex(8)}", f"/plain6-{secrets.token_hex(8)}"
    with capture(shop.cluster.node, Cluster.BRIDGE) as frames:
        meshed = shop.curl("frontend", shop.url6(8080, "/who" + secret))
        direct = shop.curl("outsider", shop.url6(9090, plain))  # excluded port: plaintext on the wire
    assert meshed.ok and meshed.body == f"cart:8080:/who{secret} from ::6\n", shop.explain(meshed)
    assert direct.ok and direct.body == f"cart:9090:{plain}\n", direct
    after = shop.metric("cart", "sidemesh_proxy_connections_total", direction="inbound", decision="allow")
    assert after >= before + 1, "the IPv6 connection did not arrive through cart's sidecar"
    wire = b"".join(frames)
    assert plain.encode() in wire, "the capture does not see plaintext where there is plaintext"
    assert secret.encode() not in wire, "frontend -> cart crossed the bridge in plaintext over IPv6"
    front, cart = shop.addr6("frontend"), shop.addr6("cart")
    between = [
        s for s in tcp_segments(frames) if {s.src, s.dst} == {front, cart} and 8080 in (s.sport, s.dport)
    ]
    assert {s.src for s in between if s.payload[:3] == b"\x17\x03\x03"} == {front, cart}, (
        "no TLS records both ways between the pods' IPv6 addresses"
    )

    stranger = shop.pod("stranger").run(
        "curl", "-sS", "--max-time", "5", "-D", "-", shop.url6(8080, "/stranger6"), check=False, timeout=15
    )
    assert stranger.stdout.lower().startswith("http/1.1 403"), stranger.stdout
    shop.sidecars["cart"].wait_for_record(
        "request denied", 5, where=lambda r: r.get("source") == STRANGER_ID and r.get("path") == "/stranger6"
    )
    outsider = shop.curl("outsider", shop.url6(8080, "/strict6"))
    assert not outsider.ok and "cart:" not in outsider.body and outsider.rc in (52, 56), outsider


ALLOW_PLAINTEXT_ALL_PORTS = ALLOW_PLAINTEXT.replace("ports: [8080]", "ports: [8080, 6060]")


def test_12_a_link_local_destination_reaches_no_loopback_only_port(shop: Shop) -> None:
    """A caller the policy admits (here: plaintext in permissive mode) that connects to the pod's
    link-local address was delivered to the app's loopback, so a port the app binds to 127.0.0.1
    or ::1 only (a debug endpoint) was reachable from the pod's neighbours. IPv4 link-local is now
    delivered to the address the caller asked for; IPv6 link-local is refused."""
    cart, outsider = shop.pod("cart"), shop.pod("outsider")
    cart.run("ip", "addr", "add", "169.254.77.11/16", "dev", "eth0")
    outsider.run("ip", "addr", "add", "169.254.77.13/16", "dev", "eth0")
    found = re.search(
        r"inet6 (fe80::[0-9a-f:]+)/64", cart.run("ip", "-6", "addr", "show", "dev", "eth0").stdout
    )
    assert found, cart.run("ip", "-6", "addr").stdout
    extra = shop.config_dir / "cart-allow-plaintext.yaml"
    extra.write_text(ALLOW_PLAINTEXT_ALL_PORTS)
    try:
        shop.restart_sidecar("cart", "--mode", "permissive")
        assert shop.curl("outsider", shop.url(8080, "/plain")).ok  # the policy lets plaintext in
        v4 = shop.curl("outsider", "http://169.254.77.11:6060/who", max_time=3)
        assert "cart:6060" not in v4.body, f"a loopback-only port answered at a link-local address: {v4}"
        assert v4.body == "app not reachable\n", v4  # the sidecar's 502: nothing there, as without the mesh
        # A port the app binds on every address is reached there, from the sidecar's 127.0.0.6.
        every = shop.curl("outsider", "http://169.254.77.11:8080/who", max_time=3)
        assert every.body == "cart:8080:/who from 127.0.0.6\n", shop.explain(every)
        v6 = shop.curl("outsider", f"http://[{found[1]}%25eth0]:8080/who", max_time=3)
        assert not v6.ok and "cart:" not in v6.body, f"delivered from an IPv6 link-local address: {v6}"
        shop.sidecars["cart"].wait_for_record(
            "inbound connection refused",
            5,
            where=lambda r: "link-local address fe80::" in str(r.get("reason")),
        )
    finally:
        extra.unlink(missing_ok=True)
        cart.run("ip", "addr", "del", "169.254.77.11/16", "dev", "eth0", check=False)
        outsider.run("ip", "addr", "del", "169.254.77.13/16", "dev", "eth0", check=False)
        shop.restart_sidecar("cart")
