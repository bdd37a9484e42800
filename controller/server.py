"""`sidemesh controller serve`: the config stream (gRPC over mTLS) and its bookkeeping.

Each sidecar is identified by its client certificate alone. It gets the current state as soon as
it connects, then an update after every change (changes within the coalescing window go out as
one). Parts that did not change for a stream are not sent again: every update carries the new
version, and only the parts whose hash changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import itertools
import logging
import time
import typing
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from controller.config import ControllerConfig
from controller.sources import Source
from controller.state import MeshState
from sidemesh.api import config_pb2 as pb
from sidemesh.config import parse_hostport
from sidemesh.httpd import HTTPServer, check_free, json_response
from sidemesh.identity.certificate import load_pem_certificates
from sidemesh.identity.svid import SvidError, spiffe_id_of
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.mesh.resources import Snapshot
from sidemesh.policy.model import DefaultPolicy
from sidemesh.prometheus import CONTENT_TYPE, CollectorRegistry, Counter, Gauge, Histogram, exposition
from sidemesh.server_telemetry import GrpcTelemetry
from sidemesh.spiffe import SpiffeIdError, WorkloadId
from sidemesh.telemetry import start_tracing

log = logging.getLogger("sidemesh.controller")
SERVICE = "sidemesh.config.v1.ConfigDiscovery"
_ids = itertools.count(1)
FULL_SENDS = 16  # streams that may be sent a full outbound table at the same moment
FULL_SEND_TIMEOUT = 10.0  # seconds a stream may take to accept a full table
LARGE_SEND = 256 * 1024  # a delta this large is bounded as a full table is


@dataclass
class StreamInfo:
    identity: WorkloadId
    peer: str
    connected: float = field(default_factory=time.time)
    sent_version: str = ""
    acked_version: str = ""
    last_error: str = ""
    # hashes of the (inbound, outbound) parts the sidecar holds, as far as we know: what an update
    # leaves out; reset by a NACK (the sidecar dropped that update's parts)
    parts: tuple[str, str] = ("", "")
    resend: bool = False  # a NACK of an older version: the current one goes again, whole
    deltas: bool = False  # it said it applies outbound deltas (an older sidecar gets whole tables)
    node_local: bool = False  # it said it applies node-local Services (StreamRequest.node_local)
    affinity: bool = False  # ... and sticky ones (StreamRequest.client_ip_affinity)
    asked: bool = False  # its first request was read (what it said it applies is known)
    warned_node_local: bool = False  # ... and, if not, was warned about once
    warned_affinity: bool = False
    delta_version: str = ""  # the version last sent, when it carried an outbound delta
    versions: deque[str] = field(default_factory=lambda: deque(maxlen=8))  # the last ones sent
    resent: str = ""  # the version last sent again after a NACK (once per version)
    nacks_logged: float = 0.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams = Gauge("sidemesh_controller_streams", "Sidecar streams connected.", registry=r)
        self.updates = Counter("sidemesh_controller_updates_sent", "Updates sent to sidecars.", registry=r)
        self.outbound = Counter(
            "sidemesh_controller_outbound_updates",
            "Updates sent to sidecars, by what they carried of the outbound table: whole, delta "
            "(only what changed since the stream's last), none (unchanged).",
            ["kind"],
            registry=r,
        )
        self.nacks = Counter("sidemesh_controller_nacks", "Updates sidecars could not apply.", registry=r)
        self.refused = Counter(
            "sidemesh_controller_streams_refused", "Streams refused, by reason.", ["reason"], registry=r
        )
        self.compile = Histogram(
            "sidemesh_controller_compile_seconds", "Time to compile a snapshot.", registry=r
        )
        self.resource_errors = Gauge(
            "sidemesh_controller_invalid_resources", "Resources ignored because they are invalid.", registry=r
        )
        self.version = Gauge(
            "sidemesh_controller_snapshot_generation", "The snapshot generation being served.", registry=r
        )


# gRPC servers refuse client pings more often than every 5 minutes by default (GOAWAY
# "too_many_pings" after two): the sidecars ping their idle config stream every 30 s
# (proxy/config_client.py KEEPALIVE_MS), and each refusal cost a reconnect and a full resend of the
# configuration. Pings are permitted every 10 s, and the server pings its side every 30 s too.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
    # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: on a server, the least time between
    # the client's pings it accepts (5 minutes by default).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),  # a second controller on a port in use is told so, not let share it
]


MAX_NACK_TEXT = 1024  # of a sidecar's error, kept and logged (a sidecar may send megabytes)
NACK_LOG_INTERVAL = 10.0  # a stream's NACKs are logged at most this often (its last one is in /status)


def peer_identity(
    context: grpc.aio.ServicerContext[typing.Any, typing.Any], trust_domain: str
) -> tuple[WorkloadId, dt.datetime]:
    """The sidecar's identity, and until when its certificate vouches for it."""
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    if not pems:
        raise PermissionError("no client certificate")
    try:
        cert = load_pem_certificates(pems[0])[0]
        # A resumed TLS session (gRPC's BoringSSL issues tickets, and grpcio has no switch for them)
        # carries the certificate of its first handshake, checked then, not now.
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise PermissionError(
                f"client certificate not valid now (until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        spiffe_id = spiffe_id_of(cert)
        if spiffe_id.trust_domain != trust_domain:
            raise PermissionError(f"{spiffe_id} is not in trust domain {trust_domain}")
        return WorkloadId.from_spiffe_id(spiffe_id), cert.not_valid_after_utc
    except (ValueError, SvidError, SpiffeIdError) as exc:
        raise PermissionError(str(exc)) from exc


class ConfigServer:
    def __init__(self, config: ControllerConfig, identity: WorkloadIdentity, source: Source) -> None:
        self.config = config
        self._status_networks = config.status_networks()
        self.identity = identity
        self.source = source
        self.state = MeshState(config.trust_domain, DefaultPolicy(config.default_policy))
        self.metrics = Metrics()
        self.tracing = start_tracing(
            "sidemesh-controller", self.metrics.registry, {"sidemesh.identity": str(identity.spiffe_id)}
        )
        self.streams: dict[int, StreamInfo] = {}
        self._changed = asyncio.Condition()
        self._full_sends = asyncio.Semaphore(FULL_SENDS)
        self._pending: Snapshot | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._server: grpc.aio.Server | None = None
        self._status: HTTPServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: tuple[str, bytes] = ("", b"")
        self.port = 0
        self.status_port = 0
        self.ready = asyncio.Event()

    # -- snapshots in --------------------------------------------------------------------------

    def on_change(self, snapshot: Snapshot) -> None:
        """Called by the source; applied after the coalescing window."""
        self._pending = snapshot
        if self._flush is None:
            delay = self.config.coalesce.total_seconds() if self.ready.is_set() else 0.0
            self._flush = asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.ensure_future(self._apply())
            )

    async def _apply(self) -> None:
        self._flush = None
        snapshot, self._pending = self._pending, None
        if snapshot is None:
            return
        try:
            self.state.update(snapshot)
        except Exception:  # a bug must not freeze the mesh's configuration for good: said, and the
            log.exception("compiling the mesh failed; the sidecars keep the last configuration")
            self.metrics.resource_errors.set(len(snapshot.errors) + 1)  # next change tries again
            return
        self.metrics.compile.observe(self.state.compile_seconds)
        self.metrics.resource_errors.set(len(snapshot.errors))
        self.metrics.version.set(self.state.generation)
        self.ready.set()
        async with self._changed:
            self._changed.notify_all()

    # -- the stream ------------------------------------------------------------------------------

    async def stream(
        self,
        requests: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[typing.Any, typing.Any],
    ) -> None:
        """Writes with ``context.write`` rather than yielding: a generator (and grpc's loop over
        it) would keep each stream's last message alive, 1,000 copies of a multi-megabyte table."""
        try:
            identity, expires = peer_identity(context, self.config.trust_domain)
        except PermissionError as exc:
            self.metrics.refused.labels("identity").inc()
            log.warning("config stream refused", extra={"peer": context.peer(), "reason": str(exc)})
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "a sidecar SVID from this trust domain is required"
            )
            return
        sid = next(_ids)
        info = self.streams[sid] = StreamInfo(identity, context.peer())
        self.metrics.streams.inc()
        reader = asyncio.create_task(self._read_acks(requests, info))
        log.info("sidecar connected", extra={"identity": str(identity), "peer": info.peer})
        # The stream lasts as long as the certificate it was opened with: a sidecar renews at half
        # its life and reconnects, so only one whose identity ended is cut off (it kept getting
        # policy and topology after its certificate expired).
        task = asyncio.current_task()
        assert task is not None
        ended: list[bool] = []  # the certificate's end came (not the stream's or the server's)

        def certificate_ended() -> None:
            ended.append(True)
            task.cancel()

        expiry = asyncio.get_running_loop().call_later(
            max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()), certificate_ended
        )
        try:
            await self.ready.wait()
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: info.sent_version != self.state.version or info.resend
                    )
                info.resend = False
                # A sidecar that does not apply node-local Services (an older version) keeps every
                # endpoint of one and hashes a delta touching it to another table: it gets the
                # table whole while one is in it (as a sidecar that takes no deltas), and a warning
                # says the Service's locality is not applied by it.
                legacy = self._legacy(info)
                if legacy and info.asked:
                    self._warn_legacy(info)
                deltas = info.deltas and not legacy
                outbound = self.state.outbound_for(info.parts[1], deltas)
                # A full table (or a delta as large) goes out: bound how many are built and in
                # flight at once, so that memory stays near FULL_SENDS tables, not one per stream.
                large = outbound is not None and (not outbound.delta or len(outbound.wire) >= LARGE_SEND)
                del outbound  # (not held while waiting for a permit: message() builds what goes)
                async with self._full_sends if large else contextlib.nullcontext():
                    # (the table may have changed while a permit was awaited: as it is now)
                    deltas = info.deltas and not self._legacy(info)
                    data, info.parts, kind = self.state.message(identity, info.parts, deltas)
                    info.sent_version = self.state.version
                    info.versions.append(info.sent_version)
                    info.delta_version = info.sent_version if kind == "delta" else ""
                    self.metrics.outbound.labels(kind).inc()
                    try:
                        # A sidecar that stops reading (a frozen pod, a dead node) must not keep
                        # its permit: 16 of them would stall every full send in the mesh.
                        async with asyncio.timeout(FULL_SEND_TIMEOUT if large else None):
                            await context.write(data)
                    except TimeoutError:
                        self.metrics.refused.labels("slow_reader").inc()
                        log.warning(
                            "sidecar not reading its configuration; stream ended",
                            extra={"identity": str(identity), "peer": info.peer},
                        )
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE, "configuration not read in time; reconnect"
                        )
                del data
                self.metrics.updates.inc()
        except asyncio.CancelledError:
            # (a flag, not the timer's when() against the loop's time: uvloop's timers fire with
            # when() a rounding error above time(), and the stream hung instead of ending)
            if not ended:
                raise  # not the certificate's end: the stream or the server is going away
            log.info("sidecar's certificate expired; stream ended", extra={"identity": str(identity)})
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "certificate expired; reconnect with a current one"
            )
        finally:
            expiry.cancel()
            reader.cancel()
            del self.streams[sid]
            self.metrics.streams.dec()
            log.info("sidecar disconnected", extra={"identity": str(identity), "peer": info.peer})

    def _legacy(self, info: StreamInfo) -> bool:
        """The table has a Service the sidecar does not apply (an older version): it drops the
        fields, so a delta touching one hashes to another table."""
        return (not info.node_local and self.state.has_node_local()) or (
            not info.affinity and self.state.has_affinity()
        )

    def _warn_legacy(self, info: StreamInfo) -> None:
        if not info.node_local and self.state.has_node_local():
            self._warn_node_local(info)
        if not info.affinity and self.state.has_affinity() and not info.warned_affinity:
            info.warned_affinity = True  # (once per stream)
            log.warning(
                "sidecar does not apply sessionAffinity: ClientIP (an older version): its calls to "
                "such Services are balanced over every endpoint until its pod is recreated; it gets "
                "the outbound table whole on every change meanwhile",
                extra={"identity": str(info.identity), "peer": info.peer},
            )

    @staticmethod
    def _warn_node_local(info: StreamInfo) -> None:
        if not info.warned_node_local:  # (once per stream)
            info.warned_node_local = True
            log.warning(
                "sidecar does not apply internalTrafficPolicy: Local (an older version): its calls to "
                "node-local Services reach every node's endpoints until its pod is recreated; it gets "
                "the outbound table whole on every change meanwhile",
                extra={"identity": str(info.identity), "peer": info.peer},
            )

    async def _read_acks(self, requests: AsyncIterator[pb.StreamRequest], info: StreamInfo) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for request in requests:
                if request.outbound_deltas:
                    info.deltas = True
                if request.node_local:
                    info.node_local = True
                if request.client_ip_affinity:
                    info.affinity = True
                if not info.asked:
                    info.asked = True
                    self._warn_legacy(info)
                if request.error:
                    info.last_error = request.error[:MAX_NACK_TEXT]
                    self.metrics.nacks.inc()
                    # It dropped that update's parts: what it holds is not what we sent. The next
                    # update carries both parts; at once when the NACK is of an older version (the
                    # current one went out as a delta on what it does not have). Envoy's xDS
                    # server tracks what the client ACKed, not what it sent, the same way.
                    info.parts = ("", "")
                    # Sent again at once only for a NACK of a version this stream was sent before
                    # its latest, and once per latest (a client NACKing made-up versions had
                    # whole tables sent nonstop: 6,100 in 2 s).
                    older = request.ack_version in info.versions and request.ack_version != info.sent_version
                    # A refused delta (a table the sidecar does not hold, a hash that does not add
                    # up) is no fault of the configuration: the whole table goes at once, too.
                    delta = request.ack_version == info.delta_version != ""
                    if (older or delta) and info.resent != info.sent_version:
                        info.resent, info.resend = info.sent_version, True
                        async with self._changed:
                            self._changed.notify_all()
                    now = time.monotonic()
                    if now - info.nacks_logged >= NACK_LOG_INTERVAL:
                        info.nacks_logged = now
                        log.error(
                            "sidecar could not apply an update",
                            extra={
                                "identity": str(info.identity),
                                "version": request.ack_version,
                                "error": info.last_error,
                            },
                        )
                elif request.ack_version:
                    info.acked_version = request.ack_version
                    info.last_error = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def _tls(self) -> grpc.ServerCredentials:
        def current() -> grpc.ServerCertificateConfiguration:
            svid = self.identity.svid
            assert svid is not None
            self._serving = (svid.serial_hex, svid.bundle_pem)  # a new bundle alone is a change too
            return grpc.ssl_server_certificate_configuration(
                [(svid.key_pem, svid.chain_pem)], root_certificates=svid.bundle_pem
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            svid = self.identity.svid
            changed = svid is not None and (svid.serial_hex, svid.bundle_pem) != self._serving
            return current() if changed else None

        fetcher = typing.cast(typing.Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(current(), fetcher, require_client_authentication=True)

    async def start(self) -> None:
        await self.identity.start()
        await self.identity.wait_ready()
        self._tasks.append(asyncio.create_task(self.source.run(self.on_change)))
        server = grpc.aio.server(
            interceptors=[GrpcTelemetry(self.metrics.registry, self.tracing)], options=SERVER_OPTIONS
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.stream, request_deserializer=pb.StreamRequest.FromString
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        host, port = parse_hostport("listen", self.config.listen)
        check_free(host, port)
        self.port = server.add_secure_port(f"{host}:{port}", self._tls())
        await server.start()
        self._server = server
        if self.config.metrics_listen:
            self._status = HTTPServer(
                {
                    "/metrics": self._page_metrics,
                    "/status": self._page_status,
                    "/healthz/ready": self._page_ready,
                    "/healthz/live": self._page_live,
                },
                guard=self._status_guard,
            )
            self.status_port = await self._status.start(
                *parse_hostport("metrics_listen", self.config.metrics_listen)
            )
        log.info(
            "controller serving",
            extra={"port": self.port, "status_port": self.status_port, "source": self.config.source},
        )

    async def stop(self, grace: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        if self._status is not None:
            await self._status.stop()
        await self.identity.stop()
        if self.tracing is not None:
            await self.tracing.close()

    # -- pages -----------------------------------------------------------------------------------

    def _page_metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, exposition(self.metrics.registry)

    def _page_live(self) -> tuple[int, str, bytes]:
        """Answered by the event loop that serves the config streams: it runs (a tcpSocket probe on
        15010 passes as long as grpc's own threads accept connections, whatever the loop does)."""
        return json_response(200, {"live": True})

    def _page_ready(self) -> tuple[int, str, bytes]:
        ready = self.ready.is_set() and self.identity.ready
        return json_response(200 if ready else 503, {"ready": ready, "version": self.state.version})

    def _status_guard(self, path: str, client: str) -> str | None:
        """/status names every connected sidecar: only ``--status-from`` networks may read it."""
        if path != "/status":
            return None
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(client)
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if any(address in net for net in self._status_networks):
                return None
        return (
            f"/status is not served to {client or 'this client'} (--status-from {self.config.status_from}); "
            "read it from the controller's pod: kubectl -n sidemesh-system port-forward "
            "deploy/sidemesh-controller 15015, then http://127.0.0.1:15015/status"
        )

    def _page_status(self) -> tuple[int, str, bytes]:
        snap = self.state.snapshot
        return json_response(
            200,
            {
                "version": self.state.version,
                "compile_seconds": self.state.compile_seconds,
                "resources": {
                    "workloads": len(snap.workloads),
                    "services": len(snap.services),
                    "policies": len(snap.policies),
                },
                "invalid_resources": list(snap.errors),
                "streams": [
                    {
                        "identity": str(s.identity),
                        "peer": s.peer,
                        "sent": s.sent_version,
                        "acked": s.acked_version,
                        "error": s.last_error,
                    }
                    for s in self.streams.values()
                ],
            },
        )
