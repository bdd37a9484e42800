"""`sidemesh ca serve`: the gRPC shell around the issuer.

Authenticate (bearer token) -> rate limit -> validate and sign -> audit. Errors are translated to
gRPC status codes here and only here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import typing
from pathlib import Path

import grpc

from ca import issuer, keys, templates
from ca.authn import Authenticator, bearer_token
from ca.batch import IssueBatch
from ca.config import CAConfig
from ca.errors import CAError, KeyMaterialError, RateLimited
from ca.metrics import CAMetrics
from ca.ratelimit import RateLimiter
from sidemesh.api import ca_pb2, ca_pb2_grpc
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.config import parse_hostport
from sidemesh.httpd import HTTPServer, check_free, json_response
from sidemesh.prometheus import CONTENT_TYPE, exposition
from sidemesh.server_telemetry import GrpcTelemetry
from sidemesh.spiffe import SpiffeId, WorkloadId
from sidemesh.telemetry import start_tracing

log = logging.getLogger("sidemesh.ca")
audit = logging.getLogger("sidemesh.ca.audit")

SERVING_CERT_TTL = dt.timedelta(hours=24)
MATERIAL_CHECK_INTERVAL = 10.0
MAX_CACHED_IDS = 100_000
NO_NAMES: frozenset[str] = frozenset()


def _audit_line(issued: issuer.Issued, peer: str) -> None:
    """One structured line per issuance: identity, serial, notAfter, the caller; never a key or a token."""
    audit.info(
        "certificate issued",
        extra={
            "identity": str(issued.spiffe_id),
            "serial": issued.serial_hex,
            "not_after": issued.not_after.isoformat(),
            "peer": peer,
        },
    )


class CertificateAuthorityService(ca_pb2_grpc.CertificateAuthorityServicer):
    def __init__(
        self,
        config: CAConfig,
        authority: keys.SigningAuthority,
        authenticator: Authenticator,
        clock: Clock = SYSTEM_CLOCK,
        metrics: CAMetrics | None = None,
    ) -> None:
        self.config = config
        self.authority = authority
        self.authenticator = authenticator
        self.clock = clock
        self.metrics = metrics or CAMetrics()
        self.ttl = issuer.TTLPolicy(config.default_ttl, config.min_ttl, config.max_ttl)
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self._allowed_dns = config.allowed_dns_by_identity()
        self._spiffe_ids: dict[WorkloadId, SpiffeId] = {}  # the same few thousand identities, again and again
        # Signings run a few milliseconds' worth at a time, each audit line written in the batch.
        self.batch = IssueBatch(clock, on_issued=_audit_line)

    def _spiffe_id(self, identity: WorkloadId) -> SpiffeId:
        spiffe_id = self._spiffe_ids.get(identity)
        if spiffe_id is None:
            if len(self._spiffe_ids) >= MAX_CACHED_IDS:
                self._spiffe_ids.clear()
            spiffe_id = self._spiffe_ids[identity] = identity.spiffe_id(self.config.trust_domain)
        return spiffe_id

    async def Sign(
        self,
        request: ca_pb2.SignRequest,
        context: grpc.aio.ServicerContext[ca_pb2.SignRequest, ca_pb2.SignResponse],
    ) -> ca_pb2.SignResponse:
        started = time.perf_counter()
        identity: WorkloadId | None = None
        try:
            token = bearer_token(context.invocation_metadata())  # type: ignore[arg-type]
            identity = await self.authenticator.authenticate(token, context.peer())
            if not self.limiter.allow(str(identity), time.monotonic()):
                raise RateLimited(f"too many signing requests for {identity}; retry later")
            ttl = self.ttl.resolve(request.ttl_seconds)
            issued = await self.batch.issue(
                self.authority,
                self._spiffe_id(identity),
                request.csr,
                ttl,
                self._allowed_dns.get(identity, NO_NAMES),
                context.peer(),
            )
        except CAError as exc:
            self.metrics.refused.labels(exc.reason).inc()
            log.warning(
                "signing refused",
                extra={
                    "reason": exc.reason,
                    "detail": exc.detail,
                    "identity": str(identity) if identity else None,
                    "peer": context.peer(),
                },
            )
            await context.abort(exc.code, exc.public)
            raise  # unreachable: abort raises
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.issued.inc()
        spiffe_id, serial = str(issued.spiffe_id), issued.serial_hex
        return ca_pb2.SignResponse(
            cert_chain=issued.chain_pem,
            trust_bundle=issued.bundle_pem,
            spiffe_id=spiffe_id,
            not_after_unix=int(issued.not_after.timestamp()),
            serial=serial,
        )


class ServingCertificate:
    """The CA's own TLS certificate, issued by itself and renewed at half its life.

    grpc calls :meth:`fetch` (from its own threads) on new handshakes; it answers ``None`` while the
    current certificate is fresh, so connections keep their certificate and new ones get the new one.
    """

    def __init__(self, service: CertificateAuthorityService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.current = self._make()

    def _make(self) -> grpc.ServerCertificateConfiguration:
        cfg = self.service.config
        now = self.service.clock.now()
        key = templates.new_key()
        spiffe_id = WorkloadId.parse(cfg.identity).spiffe_id(cfg.trust_domain)
        params = templates.LeafParams(spiffe_id, key.public_key(), SERVING_CERT_TTL, now, cfg.dns_names)
        issued = issuer.sign(self.service.authority, params)
        lifetime = issued.not_after - now
        self._renew_at = now + lifetime / 2
        chain = "".join(issued.chain_pem).encode()
        return grpc.ssl_server_certificate_configuration([(keys.key_pem(key), chain)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self.service.clock.now() < self._renew_at:
                return None
            self.current = self._make()
            log.info("serving certificate renewed")
            return self.current

    def force_renewal(self) -> None:
        with self._lock:
            self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)


class CAServer:
    """A running CA: gRPC server, metrics endpoint, and a watcher of the key material."""

    def __init__(
        self,
        config: CAConfig,
        authenticator: Authenticator,
        clock: Clock = SYSTEM_CLOCK,
        metrics: CAMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or CAMetrics()
        authority = keys.load(config.ca_dir)
        keys.check_trust_domain(authority, config.trust_domain)
        issuer.probe(authority, config.trust_domain, clock.now())
        self.service = CertificateAuthorityService(config, authority, authenticator, clock, self.metrics)
        self.serving = ServingCertificate(self.service)
        spiffe_id = WorkloadId.parse(config.identity).spiffe_id(config.trust_domain)
        self.tracing = start_tracing(
            "sidemesh-ca", self.metrics.registry, {"sidemesh.identity": str(spiffe_id)}
        )
        self._material_stamp: tuple[int, ...] | None = self._stamp()
        self._waiting_for: dt.datetime | None = None  # the start of new material not valid yet
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http: HTTPServer | None = None
        self._stopping = False
        self.port = 0
        self.metrics_port = 0
        self._record_expiry()

    def _stamp(self) -> tuple[int, ...]:
        d: Path = self.config.ca_dir
        return tuple(
            (d / n).stat().st_mtime_ns if (d / n).exists() else 0
            for n in (keys.CA_CERT, keys.CA_KEY, keys.CHAIN, keys.ROOTS)
        )

    def _record_expiry(self) -> None:
        self.metrics.signing_cert_expiry.set(self.service.authority.cert.not_valid_after_utc.timestamp())

    async def start(self) -> None:
        host, port = parse_hostport("listen", self.config.listen)
        # grpc documents a fetcher answering None ("keep the current one"); grpc-stubs omit it.
        fetch = typing.cast(typing.Callable[[], grpc.ServerCertificateConfiguration], self.serving.fetch)
        creds = grpc.dynamic_ssl_server_credentials(self.serving.current, fetch)
        # SO_REUSEPORT off (grpc's default is on): a second CA started on a port in use shared it
        # and took half the calls with its own keys; now it says the port is taken.
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 64 * 1024), ("grpc.so_reuseport", 0)]
        )
        # Telemetry wraps the handler once, at registration, rather than as an interceptor that
        # grpc.aio would run on every call.
        telemetry = GrpcTelemetry(self.metrics.registry, self.tracing)
        telemetry.add_servicer(ca_pb2_grpc.add_CertificateAuthorityServicer_to_server, self.service, server)
        check_free(host, port)
        self.port = server.add_secure_port(f"{host}:{port}", creds)
        await server.start()
        self._server = server
        if self.config.metrics_listen:
            mhost, mport = parse_hostport("metrics_listen", self.config.metrics_listen)
            # Served by the event loop that serves the gRPC calls: a loop that no longer runs
            # fails the liveness probe instead of answering it from a thread of its own.
            self._http = HTTPServer(
                {
                    "/metrics": self._page_metrics,
                    "/healthz/ready": self._page_ready,
                    "/healthz/live": self._page_live,
                }
            )
            self.metrics_port = await self._http.start(mhost, mport)
        self._tasks.append(asyncio.create_task(self._watch_material()))
        log.info(
            "CA serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "trust_domain": self.config.trust_domain,
                "signing_cert_not_after": self.service.authority.cert.not_valid_after_utc.isoformat(),
            },
        )

    # -- pages -----------------------------------------------------------------------------------

    def _page_metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, exposition(self.metrics.registry)

    def _page_live(self) -> tuple[int, str, bytes]:
        """Answered by the CA's event loop: it runs, and its gRPC server was not stopped."""
        live = self._server is not None and not self._stopping
        return json_response(200 if live else 503, {"live": live})

    def _page_ready(self) -> tuple[int, str, bytes]:
        """Ready while the gRPC server serves and the signing certificate is valid: with an expired
        one every certificate it signed would be refused, so other CA replicas should take the calls."""
        cert = self.service.authority.cert
        now = self.service.clock.now()
        reasons = []
        if self._server is None or self._stopping:
            reasons.append("the gRPC server is not serving")
        if now < cert.not_valid_before_utc:
            reasons.append(
                f"the signing certificate is not valid before {cert.not_valid_before_utc.isoformat()}"
            )
        if now >= cert.not_valid_after_utc:
            reasons.append(
                f"the signing certificate expired at {cert.not_valid_after_utc.isoformat()}: "
                "put a new intermediate into --ca-dir (docs/ca.md, Keys and rotation)"
            )
        body = {
            "ready": not reasons,
            "signing_cert_not_after": cert.not_valid_after_utc.isoformat(),
            "reasons": reasons,
        }
        return json_response(503 if reasons else 200, body)

    async def _watch_material(self) -> None:
        """Pick up a new intermediate or trust bundle written into the CA directory."""
        while True:
            await asyncio.sleep(MATERIAL_CHECK_INTERVAL)
            try:
                self.reload_if_changed()
            except Exception:  # the watch goes on: a later write may put it right
                log.exception("checking the CA material failed; still signing with the current one")

    def reload_if_changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._material_stamp:
            return False
        self._material_stamp = stamp
        try:
            authority = keys.load(self.config.ca_dir)
            keys.check_trust_domain(authority, self.config.trust_domain)
        except KeyMaterialError as exc:
            log.error(
                "new CA material rejected; still signing with the previous one", extra={"error": str(exc)}
            )
            return False
        starts = authority.not_before_limit
        # Staged early: taken once valid, not before (the working one goes on meanwhile; taken
        # early, even by seconds, it serves the CA a certificate its clients refuse as not valid yet).
        if starts > self.service.clock.now():
            self._material_stamp = None  # (looked at again at the next check)
            if self._waiting_for != starts:
                self._waiting_for = starts
                log.warning(
                    "new CA material is not valid yet; still signing with the previous one until then",
                    extra={"not_before": starts.isoformat()},
                )
            return False
        self._waiting_for = None
        try:
            issuer.probe(authority, self.config.trust_domain, self.service.clock.now())
        except KeyMaterialError as exc:
            log.error(
                "new CA material rejected; still signing with the previous one", extra={"error": str(exc)}
            )
            return False
        self.service.authority = authority
        self.serving.force_renewal()
        self._record_expiry()
        log.info(
            "CA material reloaded",
            extra={"signing_cert_not_after": self.service.authority.cert.not_valid_after_utc.isoformat()},
        )
        return True

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        if self._http is not None:
            await self._http.stop()
        if self.tracing is not None:
            await self.tracing.close()
        close = getattr(self.service.authenticator, "close", None)
        if close is not None:
            close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
