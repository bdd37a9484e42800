"""The sidecar process: identity, configuration, listeners, admin, drain. The data path is in
`outbound.py`, `inbound.py` and `relay.py`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import socket
import sys
import time
import weakref
from pathlib import Path

from proxy import heap, inbound, outbound, pool
from proxy import relay as relays
from proxy.balance import Balancer
from proxy.config import ProxyConfig
from proxy.config_client import ConfigClient
from proxy.dial import set_keepalive
from proxy.limits import Pacer, Throttle
from proxy.metrics import ProxyMetrics
from proxy.observe import Observer
from proxy.pipe import Pipe
from proxy.probes import APP_HEALTH_PREFIX, AppProber, parse_app_metrics, parse_app_probes
from proxy.relay import Relay, reset_socket
from proxy.routes import RouteStats
from proxy.telemetry import ProxyObserver, start_sidecar_tracing
from sidemesh.config import parse_hostport
from sidemesh.httpd import HTTPServer, bind_socket, json_response
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.logging import BufferedLines
from sidemesh.mesh.compile import (
    CompileError,
    InboundConfig,
    OutboundTable,
    SidecarConfig,
    compile_sidecar,
    sidecar_view,
)
from sidemesh.policy.model import DefaultPolicy
from sidemesh.prometheus import CONTENT_TYPE, Gauge, exposition

log = logging.getLogger("sidemesh.proxy")
access = logging.getLogger("sidemesh.proxy.access")
CONFIG_POLL_SECONDS = 0.5
HEAP_TRIM_SECONDS = 5.0
LATE_GRACE_S = 2.0  # for connections taken from the accept queues when the listeners close
TASKS_STOP_S = 5.0  # for the background tasks (config stream, accept loops) to end once cancelled
# Without the capture (local mode), how often a draining sidecar looks whether a replacement
# claims one of its ports, and then whether it listens there (it then closes its own listener).
HANDOVER_POLL_S = 0.02
ACCEPT_BATCH = 16  # connections accepted from a backlog before the loop runs other work
# The health port's page of the sidecar's metrics and the app's (Istio's path); scrapes within
# MERGED_FOR_S of one another get the same page.
MERGED_METRICS = "/stats/prometheus"
MERGED_FOR_S = 1.0
ACCEPT_BACKOFF, ACCEPT_BACKOFF_MAX = 0.01, 1.0  # after a failed accept (out of file descriptors)
# Relay outcomes the sidecar chose by a timer: counted and logged by reason (bounded labels).
TIMED_OUT = {
    relays.UNANSWERED: "undecided",
    relays.IDLE_TIMEOUT: "idle",
    relays.PEER_IDLE_TIMEOUT: "idle",  # (the other sidecar's timer: the connection was idle here too)
}


# The inbound sidecar connects to the app at the address the client asked for (the pod's), from
# this source: the capture lets it through (`proxy.iptables.rules`), where any other connection
# of the proxy to its own pod's address goes to the inbound listener (Istio's 127.0.0.6 and ::6).
INBOUND_SOURCE = {4: "127.0.0.6", 6: "::6"}


class ListenError(OSError):
    """A listener that could not bind, with the option it comes from (for the one-line error)."""

    def __init__(self, option: str, address: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.option, self.address = option, address


def _bind(host: str, port: int) -> socket.socket:
    """Bound now (a port in use fails the start), listening only once the sidecar can serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if host == "::":  # every address of both families (IPv4 as ::ffff:a.b.c.d)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # SO_REUSEPORT: a replacement sidecar (same UID: the kernel refuses other users) can bind while
    # this one drains, so a restart in place has no window of refused connections (as Envoy).
    return bind_socket(sock, host, port, reuse_port=True)


def _proc_address(host: str, family: int) -> str:
    """An address as /proc/net/tcp and tcp6 write it: each 32-bit word in the machine's order."""
    packed = socket.inet_pton(family, host)
    if sys.byteorder == "little":
        packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    return packed.hex().upper()


def listened_by_another(sock: socket.socket) -> bool:
    """Whether a socket other than ``sock`` listens on its address and port (SO_REUSEPORT: a
    replacement sidecar, in this network namespace)."""
    try:
        host, port = sock.getsockname()[:2]
        inode = str(os.fstat(sock.fileno()).st_ino)
        table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
        with open(table, encoding="latin-1") as rows:
            lines = rows.read().splitlines()[1:]
    except OSError:
        return False
    local = f"{_proc_address(host.split('%')[0], sock.family)}:{port:04X}"
    for line in lines:
        fields = line.split()
        # sl, local_address, rem_address, st (0A: LISTEN), tx:rx, tr:when, retrnsmt, uid, timeout, inode
        if len(fields) > 9 and fields[1] == local and fields[3] == "0A" and fields[9] != inode:
            return True
    return False


class _Claims:
    """Which listen addresses this sidecar holds, as abstract Unix sockets named after them (one
    network namespace: the pod's, or the machine's in local mode). Every listener is bound with
    SO_REUSEPORT so a replacement can start during a drain, and so a second sidecar started on an
    address another one serves (two local sidecars with the default admin and health addresses)
    shared its ports silently: admin pages, readiness and metrics answered from either, and an
    inbound port split peers between two identities. A claim is released when the drain begins
    (or when the process ends); a port of 0 (the kernel picks one) needs none."""

    PREFIX = "sidemesh/listen/"

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    @staticmethod
    def _key(host: str) -> str:
        """One spelling per address: ``*`` for the wildcard, an IP address as ``ipaddress`` writes
        it (``0:0::0`` is ``::``, a name is what it resolves to first)."""
        text = host.strip("[]")
        if not text:
            return "*"
        address: ipaddress.IPv4Address | ipaddress.IPv6Address
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            try:  # (a name: IPv4, as the listener binds it; a local name, /etc/hosts)
                family = socket.AF_INET6 if ":" in text else socket.AF_INET
                found = socket.getaddrinfo(text, None, family=family, type=socket.SOCK_STREAM)
                address = ipaddress.ip_address(found[0][4][0])
            except (OSError, ValueError, IndexError):
                return text
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # (::ffff:127.0.0.1 is 127.0.0.1 to the kernel)
        return "*" if address.is_unspecified else address.compressed

    @classmethod
    def _others(cls, port: int) -> set[str]:
        """The claims on ``port`` in this network namespace (abstract names in /proc/net/unix)."""
        return {n for n in cls._all() if n.endswith(f":{port}")}

    @classmethod
    def _all(cls) -> set[str]:
        try:
            with open("/proc/net/unix", encoding="latin-1") as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            return set()
        marker = "@" + cls.PREFIX  # (a draining sidecar reads this every 20 ms: one split a claim)
        return {
            line.split()[-1][1:] for line in lines if marker in line and line.split()[-1].startswith(marker)
        }

    @classmethod
    def claimed_ports(cls) -> set[int]:
        """The ports some sidecar of this network namespace claims."""
        return {int(n.rpartition(":")[2]) for n in cls._all() if n.rpartition(":")[2].isdigit()}

    def take(self, option: str, address: str, host: str, port: int) -> None:
        if port == 0:
            return
        key = self._key(host)
        name = f"{self.PREFIX}{key}:{port}"
        # A wildcard and a specific address on one port overlap: the kernel lets both bind (the
        # specific one then takes that address's connections)
        overlapping = self._others(port) - {name}  # (this sidecar's own too: it would share)
        overlapping = {n for n in overlapping if key == "*" or n == f"{self.PREFIX}*:{port}"}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if overlapping:
                raise OSError(errno.EADDRINUSE, "claimed")
            sock.bind(f"\0{name}")
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                return  # (no abstract sockets: nothing to check with)
            raise ListenError(
                option,
                address,
                OSError(
                    errno.EADDRINUSE,
                    "a sidecar that is not draining serves it (this one's own other listener, or "
                    "another process): give this one another address, or stop that one first (a "
                    "replacement may start once its drain has begun)",
                ),
            ) from None
        self._held.append(sock)

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


def _listen_addresses(name: str, address: str, capture: str) -> list[str]:
    """Under the iptables capture, the default listeners take IPv6 too when the pod has it
    (ip6tables redirects to the same ports): the inbound one on every address of both families,
    the outbound one on ::1 beside 127.0.0.1. An address set explicitly is taken as it is."""
    host, port = parse_hostport(name, address)
    if capture != "iptables" or not _can_bind("::1"):
        return [address]
    if name == "inbound_listen" and host == "0.0.0.0":
        return [f"[::]:{port}"]
    if name == "outbound_listen" and host == "127.0.0.1":
        return [address, f"[::1]:{port}"]
    return [address]


def _own_pod_only(path: str, client: str) -> str | None:
    """/quitquitquit answers the pod's own containers only (a loopback address): the health port
    is open to the kubelet and so to every pod, which must not stop this sidecar."""
    if path != "/quitquitquit":
        return None
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(client)
        # 127.0.0.6 and ::6 are where the sidecar delivers other pods' connections from.
        if address.is_loopback and str(address) not in INBOUND_SOURCE.values():
            return None
    return "/quitquitquit is for the pod's own containers: POST http://127.0.0.1:15020/quitquitquit"


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` is readable. Registered only while waiting: a listener with a connection
    queued that cannot be accepted (out of descriptors, backing off) would wake the loop on every
    turn, a core at 100%."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class Sidecar:
    def __init__(
        self, config: ProxyConfig, identity: WorkloadIdentity, access_lines: BufferedLines | None = None
    ) -> None:
        """``access_lines``: write the access log in batches (the CLI does); None: through the
        logging module, a line at a time (tests capture it there)."""
        self.config = config
        self.identity = identity
        self.access_lines = access_lines
        self.metrics = ProxyMetrics()
        self.routes = RouteStats()  # for `sidemesh top` (admin /stats/routes)
        self.tracing = start_sidecar_tracing(config.workload, str(identity.spiffe_id), self.metrics.registry)
        self.observer: Observer = ProxyObserver(  # per-request telemetry (proxy/observe.py)
            self.metrics,
            self.routes,
            str(identity.spiffe_id),
            self.tracing,
            config.access_log,
            config.access_log_sample,
            access_lines=access_lines,
        )
        self.relays: set[Relay] = set()
        self._counted_pipes: weakref.WeakSet[Pipe] = weakref.WeakSet()  # pooled and app connections
        self.heap_trimmer = heap.Trimmer()
        # Endpoint choice and outlier ejection (proxy/balance.py); the caller's key for sessionAffinity
        # ClientIP is the pod's IP (local mode: the workload's name).
        self.balancer = Balancer(
            client=os.environ.get("POD_IP", "") or config.workload or str(identity.spiffe_id)
        )
        self.open_connections: dict[str, int] = {}  # by direction
        self._overflow_logged = 0.0
        # Closed connections still sending what they hold, by direction (the running loop's, from start).
        self._flushing: dict[str, relays.FlushCount] = {}
        self._timeout_logs: dict[tuple[str, str], Throttle] = {}
        # Outbound connections whose protocol detection timed out dial a few a second (outbound.py).
        rate = config.undecided_dial_rate
        self.undecided_dials = Pacer(rate, max(1, round(rate)))
        self._mesh: SidecarConfig | None = None
        self._config_stamp: object = None
        self.config_updated = 0.0
        self.config_errors: tuple[str, ...] = ()
        self._listeners: list[tuple[socket.socket, asyncio.Task[None], str, str | None]] = []
        self._closing_listeners = asyncio.Lock()  # (the drain's and a hand-over's, one at a time)
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[HTTPServer] = []
        self.ports: dict[str, int] = {}
        self.draining = False
        self.quit_requested = asyncio.Event()  # POST /quitquitquit from the pod (`proxy run` drains)
        self.drain_started = asyncio.Event()  # set when draining begins (HTTP/2 connections GOAWAY)
        self._no_relays = asyncio.Event()
        # Set once there is an SVID and a configuration: only then do the data listeners listen,
        # so that a replacement sidecar (SO_REUSEPORT) takes no connection it cannot serve yet.
        self._can_serve = asyncio.Event()
        self.inbound_port = parse_hostport("inbound_listen", config.inbound_listen)[1]
        # The proxy's own ports, never a destination for a peer: the defaults and the configured
        # ones (a health port moved off 15020 must not become reachable from other pods).
        self.proxy_ports = {15000, 15001, 15006, 15020, self.inbound_port}
        for option in ("admin_listen", "health_listen", "outbound_listen"):
            if value := getattr(config, option):
                self.proxy_ports.add(parse_hostport(option, value)[1])
        self._own: set[tuple[str, int]] = set()
        self._claims = _Claims()
        self._inbound: InboundConfig | None = None
        self._outbound: OutboundTable | None = None
        self._v6_source = config.capture == "iptables" and _can_bind(INBOUND_SOURCE[6])
        pod_ip = os.environ.get("POD_IP", "") if config.capture == "iptables" else ""
        self.app_prober = AppProber(
            parse_app_probes(config.app_probes), config.app_host, self.app_address(pod_ip) if pod_ip else None
        )
        self.app_metrics = parse_app_metrics(config.app_metrics)
        self._app_metrics_up: Gauge | None = None
        if self.app_metrics is not None:
            self._app_metrics_up = Gauge(
                "sidemesh_proxy_app_metrics_up",
                "1 when the app's own metrics page answered the last scrape of /stats/prometheus",
                registry=self.metrics.registry,
            )
        self._app_metrics_log = Throttle(60.0)
        # The merged page, made once for every scrape within a second (and one fetch of the app's
        # at a time): the health port answers any pod, and each scrape held the app's page anew.
        self._merged: tuple[float, bytes] | None = None
        self._merging: asyncio.Future[bytes] | None = None
        self.controller: ConfigClient | None = None
        if config.controller:
            self.controller = ConfigClient(
                config.controller, config.controller_name, identity, self.apply_stream
            )
        else:  # configuration from files: no stream to be up or down (0 read as "lost the controller")
            self.metrics.registry.unregister(self.metrics.controller_connected)

    # -- state the handlers read -------------------------------------------------------------

    def mesh_config(self) -> SidecarConfig:
        if self._mesh is None:
            raise outbound.Refused("no configuration yet")
        return self._mesh

    @property
    def ready(self) -> bool:
        return self.identity.ready and self._mesh is not None and not self.draining

    def app_address(self, original_ip: str | None) -> tuple[str, tuple[str, int] | None]:
        """Where an inbound connection goes, and the local address to connect from.

        Redirected by iptables: to the address the client connected to (the pod's own), as Istio
        (1.10) and Linkerd (2.11) deliver: an app port bound to 127.0.0.1 only stays unreachable
        from other pods, one bound to the pod IP only is reachable, as without the mesh. So is an
        IPv4 link-local address (169.254/16); an IPv6 one is refused (Linux does not connect
        from ::6 to it): delivered to ``--app-host``, both made loopback-only ports reachable
        from the pod's neighbours. Not redirected (local mode, or a loopback address):
        ``--app-host``."""
        if original_ip is None:
            return self.config.app_host, None
        ip = ipaddress.ip_address(original_ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.version == 6 and ip.is_link_local:
            raise outbound.Refused(
                f"connection to the link-local address {original_ip}: not delivered (reach the pod at its pod IP)"
            )
        if ip.is_loopback or ip.is_unspecified:
            return self.config.app_host if ip.version == 4 else "::1", None
        if ip.version == 6 and not self._v6_source:
            return "::1", None  # ::6 is not on lo (`proxy init` adds it): the old way, not a loop
        return str(ip), (INBOUND_SOURCE[ip.version], 0)

    def default_app_port(self) -> int | None:
        """Plaintext in local mode carries no port: deliver to the workload's first port."""
        ports = self._mesh.ports if self._mesh is not None else ()
        return ports[0] if ports else None

    def is_own_listener(self, addr: tuple[str, int]) -> bool:
        return addr in self._own or (addr[1] in self.ports.values() and addr[0] in ("127.0.0.1", "::1"))

    def new_relay(self, direction: str, client: tuple[str, int]) -> Relay:
        relay = Relay(on_close=self._closed, idle_timeout=self.config.idle_timeout.total_seconds())
        host = client[0]
        if host.startswith("::ffff:") and "." in host:  # IPv4, accepted on a dual-stack listener
            host = host[7:]
        relay.info.update(direction=direction, client=f"{host}:{client[1]}", workload=self.config.workload)
        self.relays.add(relay)
        if len(self.relays) > self.heap_trimmer.peak:
            self.heap_trimmer.peak = len(self.relays)
        self._no_relays.clear()
        self.metrics.open.labels(direction).inc()
        self.open_connections[direction] = self.open_connections.get(direction, 0) + 1
        return relay

    def _closed(self, relay: Relay, outcome: str) -> None:
        self.relays.discard(relay)
        if not self.relays:
            self._no_relays.set()
        direction = str(relay.info.get("direction"))
        self.metrics.open.labels(direction).dec()
        self.open_connections[direction] -= 1
        received = self._report_relay_bytes(relay)
        seconds = time.monotonic() - relay.started
        ok = outcome == "closed" and bool(relay.info.get("linked"))
        self.metrics.closed.labels(direction, "ok" if ok else "error").inc()
        if "refused" in relay.info:  # HTTP on a relay said to be opaque (``Half._refuse``)
            self.metrics.connections.labels(direction, "refused").inc()
        self.metrics.connection_duration.labels(direction).observe(seconds)
        reason = TIMED_OUT.get(outcome.partition(":")[0])  # ("idle timeout: <how it was reset>")
        if reason is not None:
            self._timed_out(direction, reason, relay, seconds)
        if not relay.pipes:  # (served as HTTP: counted per request; HTTP relayed as opaque bytes: here)
            target = relay.info.get("destination") or f":{relay.info.get('port', '?')}"
            denied = outcome == "denied" or "denied" in relay.info
            self.routes.record(direction, f"TCP {target}", seconds, ok, denied)
        sample = self.config.access_log_sample
        if self.config.access_log and relay.info.get("linked") and (not ok or random.random() < sample):
            fields = {
                **relay.info,
                "outcome": outcome,
                "bytes_received": received,
                "duration_ms": round(seconds * 1000, 3),
            }
            if self.access_lines is None:
                access.info("connection", extra=fields)
            elif access.isEnabledFor(logging.INFO):
                self.access_lines.info("connection", fields)

    def _timed_out(self, direction: str, reason: str, relay: Relay, seconds: float) -> None:
        """Counted every time, logged once (then at most every 10 s per reason, with how many were
        not logged): a flood of idle connections must not become a flood of log lines. The idle
        timeout is routine (info); the undecided one means a client that never spoke (warning)."""
        self.metrics.timed_out.labels(direction, reason).inc()
        throttle = self._timeout_logs.setdefault((direction, reason), Throttle())
        held_back = throttle.due()
        if held_back is None:
            return
        log.log(
            logging.INFO if reason == "idle" else logging.WARNING,
            "connection closed by timeout",
            extra={
                **relay.info,
                "reason": relay.outcome,
                "timeout": reason,
                "after_s": round(seconds, 3),
                "not_logged_since_last": held_back,
            },
        )

    # -- configuration -----------------------------------------------------------------------

    def apply_stream(
        self, inbound: InboundConfig | None, outbound: OutboundTable | None, version: str
    ) -> None:
        """An update from the controller (raises CompileError if it does not describe this workload)."""
        inbound = inbound or self._inbound
        outbound = outbound or self._outbound
        if inbound is None or outbound is None:
            raise CompileError("the first update must carry both inbound and outbound configuration")
        view = sidecar_view(inbound, outbound, self.config.workload, version)
        self._inbound, self._outbound = inbound, outbound
        self._set(view)

    def _set(self, compiled: SidecarConfig) -> None:
        self._mesh = compiled
        self._check_can_serve()
        self._recheck_connections()
        self.config_updated = time.time()
        self.metrics.config_version.clear()
        self.metrics.config_version.labels(compiled.version).set(1)
        self.metrics.config_age.set(self.config_updated)
        log.info(
            "configuration applied",
            extra={
                "version": compiled.version,
                "policies": [p.ref for p in compiled.policies],
                "default_policy": compiled.default_policy.value,
            },
        )

    def _recheck_connections(self) -> None:
        """Open connections a policy let through as a whole (opaque TCP, a WebSocket after its 101)
        are decided again under the new configuration, and closed when it no longer allows them,
        as Linkerd's inbound policy does ("connection terminated due to policy change"): a rule
        withdrawn from a compromised caller left its open tunnel running. (HTTP requests are
        decided one by one anyway.)"""
        for relay in list(self.relays):
            if relay.recheck is None or relay.closed:
                continue
            decision = relay.recheck()
            if decision.allowed:
                continue
            self.metrics.denials.labels(decision.policy or "default").inc()
            relay.info["denied"] = decision.reason
            log.warning(
                "connection closed: the configuration no longer allows it",
                extra={**relay.info, "reason": decision.reason},
            )
            relay.fail("denied by a policy change")

    def reload_config(self) -> bool:
        if self.config.config_dir is None:
            return False
        from sidemesh.mesh import directory  # (local mode only: a sidecar in a cluster loads no YAML)

        stamp = directory.stamp(self.config.config_dir)
        if stamp == self._config_stamp:
            return False
        self._config_stamp = stamp
        snapshot = directory.load_directory(self.config.config_dir)
        self.config_errors = snapshot.errors
        for error in snapshot.errors:
            log.error("configuration error (other resources still apply)", extra={"error": error})
        try:
            compiled = compile_sidecar(
                snapshot,
                self.config.workload,
                self.config.trust_domain,
                DefaultPolicy(self.config.default_policy),
            )
        except CompileError as exc:
            log.error("cannot compile configuration; keeping the last good one", extra={"error": str(exc)})
            return False
        if self._mesh is not None and compiled.version == self._mesh.version:
            return False
        self._set(compiled)
        return True

    def count_bytes(self, pipe: Pipe, direction: str) -> None:
        """Count what ``pipe`` (a connection the sidecar dialled: pooled, or to the app) receives in
        ``sidemesh_proxy_bytes_total{direction}``, every few seconds and when it closes."""
        pipe.count_bytes = self.metrics.bytes.labels(direction).inc
        self._counted_pipes.add(pipe)

    def _report_relay_bytes(self, relay: Relay) -> dict[str, int]:
        """Count what ``relay`` received since the last report; what each side received so far."""
        received = {h.name: h.bytes_in for h in (*relay.halves, *relay.pipes)}
        seen = sum(received.values())
        if seen > relay.bytes_reported:
            self.metrics.bytes.labels(str(relay.info.get("direction"))).inc(seen - relay.bytes_reported)
            relay.bytes_reported = seen
        return received

    def report_bytes(self) -> None:
        """Bytes of open connections into ``sidemesh_proxy_bytes_total`` as they flow, not only when
        they close (a WebSocket, a gRPC stream, a pooled connection can stay open for hours), as
        Istio reports TCP bytes every 5 s (``tcp_reporting_duration``)."""
        for relay in self.relays:
            self._report_relay_bytes(relay)
        for pipe in list(self._counted_pipes):
            pipe.report_bytes()

    async def _trim_heap(self) -> None:
        while True:
            await asyncio.sleep(HEAP_TRIM_SECONDS)
            self.report_bytes()
            pool.expire_pools(self)  # before the trim: what they free is given back
            self.heap_trimmer.tick(len(self.relays))

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            try:
                self.reload_config()
            except OSError as exc:
                log.error("configuration directory unreadable", extra={"error": str(exc)})
            except Exception as exc:  # (a config it cannot use must not end the watch for good)
                log.exception(
                    "cannot apply the configuration; keeping the last good one", extra={"error": str(exc)}
                )

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_can_serve(self) -> None:
        if self.identity.ready and self._mesh is not None and not self._can_serve.is_set():
            # Listening before ready says so: the accept tasks listen only on their next turn of
            # the loop, and a connection made at once on a 200 from /healthz/ready was refused.
            for sock, *_ in self._listeners:
                if sock.fileno() != -1:
                    sock.listen(1024)
            self._can_serve.set()

    async def _accept(self, sock: socket.socket, kind: str, target: str | None = None) -> None:
        """Accept and serve, until cancelled. Connections are accepted here, in this task, when the
        loop says the socket is readable: a cancellation (the drain closing the listener) only
        ever interrupts the wait, never an accept (``loop.sock_accept`` accepted in a callback,
        and a connection accepted just as the drain cancelled the task was lost: never served,
        not left in the queue for ``_close_listeners`` either)."""
        await self._can_serve.wait()
        sock.listen(1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        accepted = 0
        failures = 0
        while True:
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
                continue
            except OSError as exc:
                if sock.fileno() == -1:
                    return  # listener closed (a drain's grace goes on accepting: not on draining)
                # Out of file descriptors (EMFILE, ENFILE), of buffers, a connection aborted while
                # queued: passing. Giving up ended this listener for good, silently (the backlog
                # filled, nothing was accepted again); Envoy and Linkerd back off and go on.
                failures += 1
                delay = min(ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF * 2 ** min(failures - 1, 10))
                if failures == 1 or failures % 100 == 0:
                    log.error(
                        "cannot accept connections; retrying",
                        extra={"direction": kind, "error": str(exc), "failures": failures, "retry_in": delay},
                    )
                self.metrics.connections.labels(kind, "accept_error").inc()
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("accepting connections again", extra={"direction": kind, "failures": failures})
                failures = 0
            self._serve(conn, addr, kind, target)  # (before any await: it is ours to serve now)
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                # An accept that finds a connection waiting does not yield: without this, a backlog
                # of a thousand (a flood's opening burst) is taken, and its tasks started, in one
                # long turn of the loop that every other connection waits behind.
                await asyncio.sleep(0)

    def _serve(
        self, conn: socket.socket, addr: tuple[str, int], kind: str, target: str | None
    ) -> asyncio.Task[None] | None:
        # (closed connections still sending what they hold count too, whichever direction: each
        # keeps its socket and buffers)
        flushing = self._flushing.get(kind)
        if (
            self.open_connections.get(kind, 0) + (flushing.value if flushing else 0)
            >= self.config.max_connections
        ):
            self._overflow(kind, conn)
            return None
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Counted now, not when its task first runs: a burst accepted in one turn of the loop went
        # past the limit by up to a batch (Envoy counts at the accept too).
        relay = self.new_relay(kind, addr)
        if kind == "inbound":
            set_keepalive(conn)  # callers are other pods (the app's side is this pod's own)
            return self._spawn(inbound.handle(self, conn, relay))
        return self._spawn(outbound.handle(self, conn, relay, target))

    def _overflow(self, kind: str, conn: socket.socket) -> None:
        """Over --max-connections: reset at once (fail fast; Envoy's listener limit does the same)."""
        self.metrics.connections.labels(kind, "overflow").inc()
        reset_socket(conn)
        now = time.monotonic()
        if now - self._overflow_logged >= 10:  # a flood must not flood the log too
            self._overflow_logged = now
            log.warning(
                "connection limit reached; new connections are reset",
                extra={"direction": kind, "max_connections": self.config.max_connections},
            )

    def _add_listener(
        self, name: str, address: str, kind: str, target: str | None = None, option: str = ""
    ) -> None:
        host, port = parse_hostport(name, address)
        self._claims.take(option or f"--{kind}-listen", address, host, port)
        try:
            sock = _bind(host, port)
        except OSError as exc:
            raise ListenError(option or f"--{kind}-listen", address, exc) from exc
        bound = sock.getsockname()[:2]
        self.ports[name] = bound[1]
        self._own.add((bound[0], bound[1]))
        self._listeners.append((sock, asyncio.create_task(self._accept(sock, kind, target)), kind, target))

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            self._claims.release()  # (the process goes on in tests: no claim left behind)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flushing = {kind: relays.flushing(loop, kind) for kind in ("inbound", "outbound")}
        self.reload_config()
        await self.identity.start()
        self.identity.on_rotate(lambda svid: self.metrics.cert_expiry.set(svid.not_after.timestamp()))
        self.identity.on_rotate(lambda _svid: self._check_can_serve())
        if self.controller is not None:
            self._spawn(self.controller.run())
        else:
            self._spawn(self._watch_config())
        self._spawn(self._trim_heap())
        relays.on_flush_cut = self.metrics.flush_cuts.inc  # (one sidecar per process; in tests the latest)
        capture = self.config.capture
        for i, address in enumerate(_listen_addresses("inbound_listen", self.config.inbound_listen, capture)):
            self._add_listener("inbound" if i == 0 else f"inbound-{i}", address, "inbound")
        if capture == "iptables":
            addresses = _listen_addresses("outbound_listen", self.config.outbound_listen, capture)
            for i, address in enumerate(addresses):
                self._add_listener("outbound" if i == 0 else f"outbound-v6-{i}", address, "outbound")
        for i, ((host, port), target) in enumerate(self.config.outbound_maps()):
            self._add_listener(f"outbound-{i}", f"{host}:{port}", "outbound", target, option="--outbound")
        admin = HTTPServer(
            {
                "/config": self._page_config,
                "/certs": self._page_certs,
                "/connections": self._page_connections,
                "/stats/routes": self._page_routes,
                "/healthz/ready": self._page_ready,
            }
        )
        health = HTTPServer(
            {
                "/healthz/ready": self._page_ready,
                "/healthz/live": lambda: json_response(200, {"live": True}),
                "/metrics": self._page_metrics,
            },
            prefixes={
                APP_HEALTH_PREFIX: self.app_prober.handle,  # the app's probes, rewritten by the injector
                MERGED_METRICS: self._page_merged_metrics,
            },
            posts={"/quitquitquit": self._page_quit},
            guard=_own_pod_only,
        )
        self._servers = [admin, health]
        for name, server, address in (
            ("admin", admin, self.config.admin_listen),
            ("health", health, self.config.health_listen),
        ):
            host, port = parse_hostport(f"{name}_listen", address)
            self._claims.take(f"--{name}-listen", address, host, port)
            try:
                self.ports[name] = await server.start(host, port, reuse_port=True)
            except OSError as exc:
                raise ListenError(f"--{name}-listen", address, exc) from exc
        self.proxy_ports.update((self.ports["admin"], self.ports["health"]))  # (port 0: as bound)
        log.info(
            "sidecar started",
            extra={
                "workload": self.config.workload,
                "ports": self.ports,
                "capture": self.config.capture,
                "mode": self.config.mode,
            },
        )

    async def _close_listeners(
        self, kinds: tuple[str, ...], only: list[socket.socket] | None = None
    ) -> list[asyncio.Task[None]]:
        """Close the listeners of ``kinds`` (those in ``only``, if given); the connections already
        in their accept queues are taken and served (their tasks returned), not reset: closing a
        listening socket resets what it had queued, and with a successor on the same port
        (SO_REUSEPORT, a restart) the kernel may have queued a new connection there a moment
        before."""
        async with self._closing_listeners:
            return await self._close_listeners_now(kinds, only)

    async def _close_listeners_now(
        self, kinds: tuple[str, ...], only: list[socket.socket] | None
    ) -> list[asyncio.Task[None]]:
        keep, late = [], []
        for sock, task, kind, target in self._listeners:
            if kind not in kinds or (only is not None and sock not in only):
                keep.append((sock, task, kind, target))
                continue
            task.cancel()  # first: unregisters the socket from the loop
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.setblocking(False)
            while True:
                try:
                    conn, addr = sock.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                served = self._serve(conn, addr, kind, target)
                if served is not None:
                    late.append(served)
            sock.close()
        self._listeners = keep
        return late

    async def _hand_over(self, handed: list[asyncio.Task[None]]) -> None:
        """While draining without the capture: a listener that a replacement sidecar now listens
        on too is closed (its queue served). Kept, it took about half of the app's new connections
        for the rest of the drain (the kernel spreads them over both) and cut those still open at
        its drain timeout."""
        while self._listeners:
            await asyncio.sleep(HANDOVER_POLL_S)
            claimed = _Claims.claimed_ports()  # (cheap; /proc/net/tcp only for a port claimed)
            taken = [
                sock
                for sock, *_ in self._listeners
                if sock.fileno() != -1 and sock.getsockname()[1] in claimed and listened_by_another(sock)
            ]
            if taken:
                log.info(
                    "draining: a replacement listens; closing the listeners it shares",
                    extra={"count": len(taken)},
                )
                handed += await self._close_listeners(("inbound", "outbound"), only=taken)

    async def drain(
        self, timeout: float | None = None, grace: float | None = None, pre_stop: bool = True
    ) -> None:
        """Drain, then stop: what SIGTERM does.

        Readiness turns 503 and the inbound listener closes at once (peers take another endpoint).
        The app's outbound listeners keep accepting while connections are open (the app may be
        finishing its own work) and for at least ``grace``. Open connections may finish until the
        drain timeout; the sidecar stops as soon as none is left.
        """
        self.draining = True
        self._claims.release()  # a replacement may start now
        self.drain_started.set()
        await self._close_listeners(("inbound",))
        handed: list[asyncio.Task[None]] = []  # connections taken from a queue at a hand-over
        if self.config.capture != "iptables":  # (in a pod the kubelet starts none before the end)
            self._spawn(self._hand_over(handed))
        limit = self.config.drain_timeout.total_seconds() if timeout is None else timeout
        grace = self.config.drain_grace.total_seconds() if grace is None else grace
        log.info("draining", extra={"open": len(self.relays), "timeout_s": limit, "grace_s": grace})
        started = time.monotonic()
        deadline = started + limit
        if pre_stop and not self.app_prober.pre_stop_done.is_set():
            # The app's preStop hook goes through the health port (rewritten by the injector): a
            # classic sidecar is stopped as it starts; the health port stays until it is answered.
            log.info("draining: waiting for the app's preStop hook")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.app_prober.pre_stop_done.wait(), max(0.0, deadline - time.monotonic())
                )
        # The outbound listeners stay for the grace from the drain's start, and from the answer to
        # the app's preStop hook when there was one: the kubelet sends the app its SIGTERM then,
        # and the grace is for what the app calls while it shuts down (from the start only, it
        # had run out, or almost, by then, and the app's calls were refused).
        until = started + grace
        answered = self.app_prober.pre_stop_answered_at
        if pre_stop and answered is not None and answered >= started:
            until = max(until, answered + grace)
        if grace > 0:
            await asyncio.sleep(max(0.0, min(until, deadline) - time.monotonic()))
        remaining = deadline - time.monotonic()
        if self.relays and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_relays.wait(), remaining)
        late = await self._close_listeners(("inbound", "outbound")) + handed
        # What is open now (connections accepted since the last one ended, and those taken from
        # the accept queues) has the rest of the drain timeout, and those taken from the queues at
        # least LATE_GRACE_S: a connection accepted a moment before was reset at once as "drain
        # timeout", with most of the timeout left.
        remaining = deadline - time.monotonic()
        if late:
            remaining = max(remaining, LATE_GRACE_S)
        if self.relays and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_relays.wait(), remaining)
        for relay in list(self.relays):
            relay.fail("drain timeout")
        pool.close_pools(self)  # idle HTTP connections to the app and to other sidecars
        for server in self._servers:
            await server.stop()
        await self.identity.stop()
        if relays.on_flush_cut == self.metrics.flush_cuts.inc:
            relays.on_flush_cut = None
        if self.tracing is not None:
            await self.tracing.close()
        if self.access_lines is not None:
            self.access_lines.flush()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task that swallows its cancellation must not hold the exit forever
            _, stuck = await asyncio.wait(tasks, timeout=TASKS_STOP_S)
            for task in stuck:
                log.error("a background task did not stop; exiting without it", extra={"task": repr(task)})
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning at exit
        log.info("sidecar stopped")

    # -- admin pages -------------------------------------------------------------------------

    def _page_quit(self) -> tuple[int, str, bytes]:
        """Istio's /quitquitquit: the pod's app, done (a Job), stops its classic sidecar, which
        would otherwise keep the pod running for ever (a native sidecar stops by itself)."""
        log.info("quit requested by the pod: draining")
        self.quit_requested.set()
        return json_response(200, {"quitting": True})

    def _page_ready(self) -> tuple[int, str, bytes]:
        body = {
            "ready": self.ready,
            "identity": self.identity.state,
            "config": self._mesh.version if self._mesh else None,
            "draining": self.draining,
        }
        return json_response(200 if self.ready else 503, body)

    def _page_metrics(self) -> tuple[int, str, bytes]:
        if self.controller is not None:
            self.metrics.controller_connected.set(1 if self.controller.connected else 0)
        return 200, CONTENT_TYPE, exposition(self.metrics.registry)

    async def _page_merged_metrics(self, path: str) -> tuple[int, str, bytes]:
        """The sidecar's metrics and the app's own (its prometheus.io annotations, moved here by
        the injector: a Prometheus outside the mesh is refused by the app's port under strict
        mTLS), as Istio merges them. The app's page failing leaves the sidecar's, with
        sidemesh_proxy_app_metrics_up 0 and a warning at most once a minute."""
        if path != MERGED_METRICS:
            return json_response(404, {"error": f"no page at {path}"})
        if self._merged is not None and time.monotonic() - self._merged[0] < MERGED_FOR_S:
            return 200, CONTENT_TYPE, self._merged[1]
        if self._merging is None:
            self._merging = asyncio.ensure_future(self._merge())
            self._merging.add_done_callback(self._merged_done)
        return 200, CONTENT_TYPE, await asyncio.shield(self._merging)

    def _merged_done(self, _: asyncio.Future[bytes]) -> None:
        self._merging = None

    async def _merge(self) -> bytes:
        app: bytes | None = b""
        if self.app_metrics is not None:
            app, why = await self.app_prober.metrics(self.app_metrics)
            assert self._app_metrics_up is not None
            self._app_metrics_up.set(0 if app is None else 1)
            if app is None and self._app_metrics_log.due() is not None:
                log.warning(
                    "the app's metrics page did not answer; serving the sidecar's alone",
                    extra={"port": self.app_metrics.port, "path": self.app_metrics.path, "reason": why},
                )
        page = self._page_metrics()[2] + (app or b"")
        self._merged = (time.monotonic(), page)
        return page

    def _page_config(self) -> tuple[int, str, bytes]:
        m = self._mesh
        if m is None:
            return json_response(503, {"error": "no configuration yet"})
        return json_response(
            200,
            {
                "version": m.version,
                "workload": m.workload,
                "identity": str(m.identity),
                "default_policy": m.default_policy.value,
                "policies": [p.ref for p in m.policies],
                "errors": list(self.config_errors),
                "updated": self.config_updated,
                "source": self._source_status(),
                "destinations": {
                    d.name: [f"{e.address}:{e.port} {e.identity or 'plaintext'}" for e in d.endpoints]
                    for d in m.outbound.destinations
                },
            },
        )

    def _source_status(self) -> dict[str, object]:
        if self.controller is None:
            return {"directory": str(self.config.config_dir)}
        c = self.controller
        return {
            "controller": c.address,
            "connected": c.connected,
            "version": c.version,
            "last_update": c.last_update,
            "last_error": c.last_error,
            "stale": not c.connected,
        }

    def _page_certs(self) -> tuple[int, str, bytes]:
        svid = self.identity.svid
        if svid is None:
            return json_response(
                503,
                {
                    "state": self.identity.state,
                    "error": self.identity.last_error,
                    "next_attempt": self.identity.next_attempt,
                },
            )
        return json_response(
            200,
            {
                "identity": str(svid.spiffe_id),
                "serial": svid.serial_hex,
                "not_before": svid.not_before,
                "not_after": svid.not_after,
                "state": self.identity.state,
                "rotations": self.identity.rotations,
                "last_error": self.identity.last_error,
                "next_attempt": self.identity.next_attempt,  # the renewal, or the retry after an error
                "bundle_roots": len(svid.bundle),
                "bundle": [{"subject": c.subject, "not_after": c.not_valid_after_utc} for c in svid.bundle],
            },
        )

    def _page_routes(self) -> tuple[int, str, bytes]:
        return json_response(
            200, self.routes.snapshot(workload=self.config.workload, identity=str(self.identity.spiffe_id))
        )

    def _page_connections(self) -> tuple[int, str, bytes]:
        now = time.monotonic()
        return json_response(
            200,
            [
                {
                    **r.info,
                    "age_seconds": round(now - r.started, 3),
                    "bytes": {h.name: h.bytes_in for h in (*r.halves, *r.pipes)},
                }
                for r in list(self.relays)
            ],
        )


def config_path(p: Path | None) -> Path:
    assert p is not None
    return p
