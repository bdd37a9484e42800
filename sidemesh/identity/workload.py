"""A workload's identity, kept current: fetched at start, renewed at about half its life.

- The private key is generated in memory for every renewal and never written anywhere.
- While the CA is unavailable it retries with backoff and keeps serving the current certificate
  until it expires (then :attr:`state` says ``expired`` and readiness fails).
- The trust bundle file, when given, is watched; a change rebuilds the TLS contexts at once.
- A rotation only swaps the contexts handed to *new* connections; open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from sidemesh.cancel import stop_if_cancelling
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.identity import rotation, tls
from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.svid import SVID, SvidError, load_bundle, make_csr, new_key
from sidemesh.spiffe import SpiffeId

log = logging.getLogger("sidemesh.identity")

BUNDLE_POLL_SECONDS = 5.0


def token_from_file(path: Path) -> Callable[[], str]:
    """A projected ServiceAccount token is rotated by the kubelet: read it fresh every time."""
    return lambda: path.read_text().strip()


def renewal_hint(exc: Exception) -> str:
    """What to check when a renewal fails, for the log line (the retries go on regardless)."""
    if isinstance(exc, FileNotFoundError):
        return (
            f"{exc.filename} is missing: in a pod the injector mounts the ServiceAccount token there; "
            "outside a cluster give --token-file a token from `sidemesh ca local-token`"
        )
    if isinstance(exc, OSError):
        return "check that --token-file can be read"
    if isinstance(exc, CAClientError):
        if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return "the CA refused the token: check that --token-file holds this workload's token"
        if exc.code is grpc.StatusCode.INVALID_ARGUMENT:
            return "the CA refused the request: check that the token's identity is this workload's"
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "is the CA running at --ca-address, and is --bundle-file its root-cert.pem?"
    return ""


class WorkloadIdentity:
    def __init__(
        self,
        spiffe_id: SpiffeId,
        ca: CAClient,
        token: Callable[[], str],
        bundle_file: Path | None = None,
        ttl_seconds: int = 0,
        clock: Clock = SYSTEM_CLOCK,
        rand: Callable[[], float] = random.random,
        dns_names: tuple[str, ...] = (),
    ) -> None:
        self.dns_names = dns_names
        self.spiffe_id = spiffe_id
        self.ca = ca
        self.token = token
        self.bundle_file = bundle_file
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.rand = rand
        self.svid: SVID | None = None
        self.rotations = 0
        self.last_error: str | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._bundle_stamp: tuple[int, int] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._listeners: list[Callable[[SVID], None]] = []

    # -- what the proxy, controller and injector use -----------------------------------------

    @property
    def state(self) -> str:
        if self.svid is None:
            return "pending"
        return "expired" if self.clock.now() >= self.svid.not_after else "valid"

    @property
    def ready(self) -> bool:
        return self.state == "valid"

    def server_context(self) -> ssl.SSLContext:
        if self._server_ctx is None:
            raise RuntimeError("no SVID yet")
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        if self._client_ctx is None:
            raise RuntimeError("no SVID yet")
        return self._client_ctx

    def on_rotate(self, callback: Callable[[SVID], None]) -> None:
        self._listeners.append(callback)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._renew_loop(), name="svid-renewal")]
        if self.bundle_file is not None:
            self._tasks.append(asyncio.create_task(self._bundle_loop(), name="bundle-watch"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def renew(self) -> SVID:
        """Get a new SVID now (new key, new CSR) and install it."""
        key = new_key()
        resp = await self.ca.sign(
            self.token(), make_csr(key, self.spiffe_id, self.dns_names), self.ttl_seconds
        )
        svid = SVID.from_pem(key, list(resp.cert_chain), list(resp.trust_bundle), self.spiffe_id)
        if self.bundle_file is not None:
            svid = svid.with_bundle(load_bundle(self.bundle_file.read_bytes()))
        self._install(svid)
        self.rotations += 1
        log.info(
            "SVID installed",
            extra={
                "identity": str(self.spiffe_id),
                "serial": svid.serial_hex,
                "not_after": svid.not_after.isoformat(),
            },
        )
        return svid

    def _install(self, svid: SVID) -> None:
        server_ctx, client_ctx = tls.server_context(svid), tls.client_context(svid)
        self.svid, self._server_ctx, self._client_ctx = svid, server_ctx, client_ctx
        self._ready.set()
        for callback in self._listeners:
            callback(svid)

    async def _renew_loop(self) -> None:
        attempt = 0
        while True:
            try:
                svid = await self.renew()
                attempt, self.last_error = 0, None
                now = self.clock.now()
                delay = (
                    rotation.renewal_time(svid.not_before, svid.not_after, self.rand(), received=now) - now
                ).total_seconds()
            except (CAClientError, SvidError, OSError) as exc:
                stop_if_cancelling(exc)  # being stopped, whatever grpc made of the cancellation
                attempt += 1
                self.last_error = str(exc)
                # No certificate yet counts as expired: the workload cannot serve until it has one.
                until_expiry = (self.svid.not_after - self.clock.now()).total_seconds() if self.svid else 0.0
                delay = rotation.backoff(attempt, self.rand(), until_expiry)
                level = logging.ERROR if self.state == "expired" else logging.WARNING
                log.log(
                    level,
                    "SVID renewal failed; retrying",
                    extra={
                        "identity": str(self.spiffe_id),
                        "attempt": attempt,
                        "retry_in": round(delay, 2),
                        "error": str(exc),
                        "state": self.state,
                        "hint": renewal_hint(exc),
                    },
                )
            await self.clock.sleep(max(delay, 0.0))

    async def _bundle_loop(self) -> None:
        while True:
            await self.clock.sleep(BUNDLE_POLL_SECONDS)
            self.reload_bundle()

    def reload_bundle(self) -> bool:
        """Re-read the trust bundle file; rebuild the contexts if it changed."""
        assert self.bundle_file is not None
        try:
            st = os.stat(self.bundle_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._bundle_stamp:
                return False
            self._bundle_stamp = stamp
            bundle = load_bundle(self.bundle_file.read_bytes())
        except (OSError, SvidError) as exc:
            log.error("trust bundle unreadable; keeping the current one", extra={"error": str(exc)})
            return False
        self.ca.set_bundle(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle))
        if self.svid is None or bundle == self.svid.bundle:
            return False
        self._install(self.svid.with_bundle(bundle))
        log.info("trust bundle changed", extra={"roots": len(bundle)})
        return True
