"""A workload's identity, kept current: fetched at start, renewed at about half its life.

- The private key is generated in memory for every renewal and never written anywhere (by a
  short-lived child process in a sidecar: ``keygen``).
- While the CA is unavailable it retries with backoff and keeps serving the current certificate
  until it expires (then :attr:`state` says ``expired`` and readiness fails).
- The trust bundle file, when given, is watched; a change rebuilds the TLS contexts at once.
- A rotation only swaps the contexts handed to *new* connections; open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from sidemesh.cancel import stop_if_cancelling
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.grpc_client import Status
from sidemesh.identity import rotation, tls
from sidemesh.identity.certificate import Certificate
from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.keygen import KeygenError
from sidemesh.identity.svid import (
    SVID,
    PrivateKey,
    SvidError,
    foreign_roots,
    load_bundle,
    new_request,
    own_roots,
    pem_of,
)
from sidemesh.spiffe import SpiffeId

log = logging.getLogger("sidemesh.identity")

BUNDLE_POLL_SECONDS = 5.0

# Makes a new key and the request (PEM) for an identity and its DNS names.
Keygen = Callable[[SpiffeId, tuple[str, ...]], Awaitable[tuple[PrivateKey, str]]]


async def keygen_in_process(spiffe_id: SpiffeId, dns_names: tuple[str, ...]) -> tuple[PrivateKey, str]:
    return new_request(spiffe_id, dns_names)


class TokenFileError(ValueError):
    """The token file holds something that cannot be a bearer token."""


def token_from_file(path: Path) -> Callable[[], str]:
    """A projected ServiceAccount token is rotated by the kubelet: read it fresh every time. A
    token is one word of visible ASCII (a JWT, or `sidemesh ca local-token`'s); anything else
    (another encoding, a byte-order mark, two lines) is told as such, not sent."""

    def read() -> str:
        token = path.read_bytes().strip()
        if not token or not all(0x21 <= b <= 0x7E for b in token):
            raise TokenFileError(
                f"{path} does not hold a token (one word of visible ASCII characters; "
                f"{'it is empty' if not token else 'it has other bytes: a byte-order mark, spaces or lines?'})"
            )
        return token.decode("ascii")

    return read


def renewal_hint(exc: Exception, bundle_file: Path | None = None) -> str:
    """What to check when a renewal fails, for the log line (the retries go on regardless)."""
    if isinstance(exc, OSError) and bundle_file is not None and exc.filename == str(bundle_file):
        return (
            "the trust bundle file cannot be read: check --bundle-file (in a pod, the trust bundle "
            "ConfigMap's volume)"
        )
    if isinstance(exc, FileNotFoundError):
        return (
            f"{exc.filename} is missing: in a pod the injector mounts the ServiceAccount token there; "
            "outside a cluster give --token-file a token from `sidemesh ca local-token`"
        )
    if isinstance(exc, OSError):
        return "check that --token-file can be read"
    if isinstance(exc, KeygenError):
        return "the key could not be made: check that this container's python can run sidemesh"
    if isinstance(exc, TokenFileError):
        return "write only the token into --token-file (as the kubelet's projected token file holds it)"
    if isinstance(exc, CAClientError):
        if exc.code in (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED):
            return "the CA refused the token: check that --token-file holds this workload's token"
        if exc.code is Status.INVALID_ARGUMENT and "--control-plane-dns" in exc.message:
            return (
                "run as an identity the CA's --control-plane-dns lists with this DNS name (--identity, "
                "--server-name), or add it there"
            )
        if exc.code is Status.INVALID_ARGUMENT:
            return "the CA refused the request: check that the token's identity is this workload's"
        if exc.code in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED):
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
        keygen: Keygen = keygen_in_process,
    ) -> None:
        self.dns_names = dns_names
        self.keygen = keygen
        self.spiffe_id = spiffe_id
        self.ca = ca
        self.token = token
        self.bundle_file = bundle_file
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.rand = rand
        self.svid: SVID | None = None
        # Counts trust bundles: connections pooled under an older one are not reused (proxy pool
        # keys carry it), so a removed root is trusted by no new request. (Not a renewal: that
        # replaced every pooled connection of every sidecar each half hour, and an app's HTTP/2
        # connection kept the old upstreams open; Envoy too keeps its pools across a rotation.)
        self.generation = 0
        self.rotations = 0
        self.last_error: str | None = None
        self.next_attempt: dt.datetime | None = None  # when the renewal loop asks the CA next
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
        if self.bundle_file is not None:
            # The first Sign carries the token: the channel to the CA trusts this trust domain's
            # roots only from the start (another's could vouch for the CA's name). A file with
            # none of ours: nothing is trusted (it kept the file as read, the foreign roots in it).
            with contextlib.suppress(OSError):  # the renewal says what is wrong with it
                try:
                    self.ca.set_bundle(pem_of(self._file_bundle()))
                except SvidError:
                    self.ca.set_bundle(b"")
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
        bundle = self._bundle_for_renewal()  # (before the CA is asked: none of its work is thrown away)
        generation = self.generation
        key, csr = await self.keygen(self.spiffe_id, self.dns_names)
        resp = await self.ca.sign(self.token(), csr, self.ttl_seconds)
        if self.generation != generation and self.svid is not None:
            # The bundle watch installed a newer bundle while the CA answered: it stands (the one
            # read before would undo it until the next renewal, its file no longer looked at).
            bundle = self.svid.bundle
        elif self.svid is None and bundle is not None:
            # The first certificate: a change the watch saw meanwhile had nothing to go into (and
            # its file is not looked at again): read the file again now.
            with contextlib.suppress(OSError, SvidError):
                bundle = self._file_bundle()
        svid = SVID.from_pem(key, list(resp.cert_chain), list(resp.trust_bundle), self.spiffe_id)
        now = self.clock.now()
        if svid.not_after <= now:
            # Renewing it at once would only get another one like it, in a loop without pause.
            raise SvidError(
                f"the CA's certificate expired at {svid.not_after.isoformat()}, before it arrived "
                f"(this clock says {now.isoformat()}): is this node's clock ahead of the CA's?"
            )
        if bundle is not None:
            svid = svid.with_bundle(bundle)
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
        if self.svid is None or set(svid.bundle) != set(self.svid.bundle):  # (order is no change)
            self.generation += 1
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
            except Exception as exc:  # whatever it is, the loop goes on: it is the workload's identity
                stop_if_cancelling(exc)  # being stopped, whatever grpc made of the cancellation
                attempt += 1
                self.last_error = str(exc) or type(exc).__name__
                # No certificate yet counts as expired: the workload cannot serve until it has one,
                # so it asks again within 2 s, when asking again can help (the CA unreachable or
                # busy, the token not mounted yet). A refusal (the wrong token or identity) or an
                # answer that cannot be used needs a change somewhere first: backoff up to 60 s.
                until_expiry = (self.svid.not_after - self.clock.now()).total_seconds() if self.svid else 0.0
                heals = isinstance(exc, OSError) or (isinstance(exc, CAClientError) and exc.retryable)
                delay = rotation.backoff(
                    attempt, self.rand(), until_expiry if heals or until_expiry > 0 else None
                )
                expected = isinstance(exc, (CAClientError, SvidError, OSError, TokenFileError, KeygenError))
                level = logging.ERROR if self.state == "expired" or not expected else logging.WARNING
                log.log(
                    level,
                    "SVID renewal failed; retrying",
                    exc_info=None if expected else exc,
                    extra={
                        "identity": str(self.spiffe_id),
                        "attempt": attempt,
                        "retry_in": round(delay, 2),
                        "error": str(exc),
                        "state": self.state,
                        "hint": renewal_hint(exc, self.bundle_file),
                    },
                )
            self.next_attempt = self.clock.now() + dt.timedelta(seconds=max(delay, 0.0))
            await self.clock.sleep(max(delay, 0.0))

    async def _bundle_loop(self) -> None:
        while True:
            await self.clock.sleep(BUNDLE_POLL_SECONDS)
            self.reload_bundle()

    def _file_bundle(self) -> tuple[Certificate, ...]:
        """The bundle file's roots for our trust domain; roots of other trust domains are left
        out, with a warning (the mesh does not federate: see ``own_roots``)."""
        assert self.bundle_file is not None
        bundle = load_bundle(self.bundle_file.read_bytes())
        td = self.spiffe_id.trust_domain
        if foreign := foreign_roots(bundle, td):
            log.warning(
                "trust bundle roots of other trust domains left out: they would vouch for this one's IDs",
                extra={
                    "bundle_file": str(self.bundle_file),
                    "trust_domain": td,
                    "left_out": [c.subject for c in foreign],
                },
            )
        return own_roots(bundle, td)

    def _bundle_for_renewal(self) -> Sequence[Certificate] | None:
        """The bundle file's roots; when the file cannot be read (a truncated write, a bad edit of
        the ConfigMap), the roots in use, as reload_bundle keeps them (it logs why). Renewals read
        the file again and failed on it: the certificate expired with the CA answering. None
        without a file; before a first certificate there is nothing to keep, and the error stands."""
        if self.bundle_file is None:
            return None
        try:
            return self._file_bundle()
        except (OSError, SvidError):
            if self.svid is None:
                raise
            return self.svid.bundle

    def reload_bundle(self) -> bool:
        """Re-read the trust bundle file; rebuild the contexts if it changed."""
        assert self.bundle_file is not None
        try:
            st = os.stat(self.bundle_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._bundle_stamp:
                return False
            self._bundle_stamp = stamp
            bundle = self._file_bundle()
        except (OSError, SvidError) as exc:
            log.error("trust bundle unreadable; keeping the current one", extra={"error": str(exc)})
            return False
        self.ca.set_bundle(pem_of(bundle))
        if self.svid is None or bundle == self.svid.bundle:
            return False
        try:
            self._install(self.svid.with_bundle(bundle))
        except ssl.SSLError as exc:  # (load_bundle had OpenSSL read each root: not expected)
            log.error("trust bundle refused by OpenSSL; keeping the current one", extra={"error": str(exc)})
            return False
        log.info("trust bundle changed", extra={"roots": len(bundle)})
        return True
