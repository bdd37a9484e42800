"""The sidecar's end of the controller's config stream.

It authenticates with the workload's SVID, applies each update (acknowledging it, or reporting
why it could not), and keeps the last good configuration while the controller is away,
reconnecting with backoff. After a certificate rotation it reconnects with the new certificate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from grpclib.const import Cardinality

from sidemesh import grpc_client
from sidemesh.api import config_pb2 as pb
from sidemesh.cancel import stop_if_cancelling
from sidemesh.gc_pause import gc_paused
from sidemesh.identity import rotation, tls
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.mesh import wire
from sidemesh.mesh.compile import CompileError, InboundConfig, OutboundTable, apply_outbound_delta

# The stream's keepalive ping: a partition without a FIN is noticed within about a minute. The
# controller permits pings this often (controller/server.py SERVER_OPTIONS).
KEEPALIVE = 30.0
KEEPALIVE_TIMEOUT = 20.0  # a ping unanswered this long: the connection is given up
# Dialling, the TLS handshake and the stream's first request: a controller address that swallows
# packets (no RST) is given up on after this, not after the kernel's two minutes of SYNs.
CONNECT_TIMEOUT = 10.0
log = logging.getLogger("sidemesh.proxy.config")
METHOD = "/sidemesh.config.v1.ConfigDiscovery/Stream"

Apply = Callable[[InboundConfig | None, OutboundTable | None, str], None]


# Reconnecting is cheap and every second away keeps a stale policy: retry at least every 5 s
# (the CA's 60 s ceiling would leave sidecars up to a minute behind a restarted controller).
RECONNECT_BACKOFF_MAX = 5.0


class StreamEnded(ConnectionError):
    """The controller closed the stream with status OK (it is stopping): dialled again."""


class ConfigClient:
    def __init__(self, address: str, server_name: str, identity: WorkloadIdentity, apply: Apply) -> None:
        self.address = address
        self.server_name = server_name
        self.identity = identity
        self.apply = apply
        self.connected = False
        self.version = ""
        self.last_update = 0.0
        self.last_error: str | None = None
        self._rotated = asyncio.Event()
        self._need_whole = False  # an update was refused: only a whole one (both parts) is applied
        self.outbound: OutboundTable | None = None  # the outbound table applied last (deltas apply to it)
        identity.on_rotate(lambda _svid: self._rotated.set())

    async def run(self) -> None:
        attempt = 0
        while True:
            await self.identity.wait_ready()
            self._rotated.clear()
            try:
                await self._session()
                attempt = 0  # a rotation ended a healthy session: reconnect at once
            except Exception as exc:  # (whatever ends a session, the stream is dialled again)
                stop_if_cancelling(exc)  # being stopped, whatever the library made of the cancellation
                if self.connected:  # the stream had delivered configuration: a new outage starts here
                    attempt = 0
                self.connected = False
                attempt += 1
                if isinstance(exc, StreamEnded) or not isinstance(exc, grpc_client.CALL_ERRORS):
                    self.last_error = str(exc) or type(exc).__name__
                    if not isinstance(exc, ConnectionError):  # (a client bug, or a peer nobody foresaw)
                        log.error("unexpected error on the controller stream", exc_info=exc)
                else:
                    code, message = grpc_client.status_of(exc)
                    self.last_error = f"{code.name}: {message}"
                delay = rotation.backoff(attempt, random.random(), ceiling=RECONNECT_BACKOFF_MAX)
                unreached = isinstance(exc, OSError) or (self.last_error or "").startswith(
                    ("UNAVAILABLE", "DEADLINE_EXCEEDED")
                )
                log.warning(
                    "controller stream lost; keeping the last configuration"
                    if self.version
                    # (none yet: nothing to keep, and not ready until one comes)
                    else "no configuration from the controller yet; is --controller its address, and is it running?"
                    if unreached
                    else "no configuration from the controller yet",
                    extra={
                        "controller": self.address,
                        "error": self.last_error,
                        "retry_in": round(delay, 2),
                        "version": self.version,
                    },
                )
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One stream, until it fails (raises) or the certificate rotates (returns)."""
        svid = self.identity.svid
        assert svid is not None
        context = tls.client_context(svid, alpn=["h2"])
        context.check_hostname = True  # the controller's DNS name, as the CA's is checked
        channel = grpc_client.channel(
            self.address, context, self.server_name, keepalive=KEEPALIVE, keepalive_timeout=KEEPALIVE_TIMEOUT
        )
        stream = asyncio.create_task(self._stream(channel))
        rotated = asyncio.create_task(self._rotated.wait())
        try:
            await asyncio.wait((stream, rotated), return_when=asyncio.FIRST_COMPLETED)
        finally:  # (also when the sidecar stops: neither task outlives the session)
            stream.cancel()
            rotated.cancel()
            await asyncio.gather(stream, rotated, return_exceptions=True)
            await grpc_client.close(channel)
        if not stream.cancelled():  # it ended first: with the stream's error, or the stream ended
            stream.result()
            raise StreamEnded("the controller ended the stream")
        log.info("certificate rotated; reconnecting to the controller with it")

    async def _stream(self, channel: grpc_client.Channel) -> None:
        async with channel.request(METHOD, Cardinality.STREAM_STREAM, pb.StreamRequest, pb.Update) as call:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await call.send_message(
                    pb.StreamRequest(outbound_deltas=True, node_local=True, client_ip_affinity=True)
                )
            while (update := await call.recv_message()) is not None:
                await call.send_message(self._handle(update))
            await call.recv_trailing_metadata()  # a status other than OK raises GRPCError

    def _handle(self, update: pb.Update) -> pb.StreamRequest:
        try:
            if not update.version:
                # The controller versions every update. An empty message is also what grpclib
                # returns for one cut short after its length prefix when asserts are off (-OO, as a
                # sidecar runs): its only check of the length is an assert.
                raise CompileError("an update without a version (a message cut short?)")
            if self._need_whole and not (update.HasField("inbound") and update.HasField("outbound")):
                # A part it left out is one of the update we refused, which we do not hold: applied
                # on what we hold, the result would be neither (a stale policy, acknowledged).
                raise CompileError("after a refused update the next must carry both parts; waiting for it")
            with gc_paused():  # (a whole table: 10^5 objects; the collector's passes cost a fifth)
                inbound = wire.inbound_from_pb(update.inbound) if update.HasField("inbound") else None
                outbound = wire.outbound_from_pb(update.outbound) if update.HasField("outbound") else None
                if update.HasField("outbound_delta"):
                    if outbound is not None:
                        raise CompileError("the update carries both the outbound table and a delta of it")
                    delta = wire.outbound_delta_from_pb(update.outbound_delta)
                    outbound = apply_outbound_delta(self.outbound, delta)
                self.apply(inbound, outbound, update.version)
            if outbound is not None:
                self.outbound = outbound
        except (wire.WireError, CompileError) as exc:
            log.error(
                "configuration update not applied; keeping the last one",
                extra={"version": update.version, "error": str(exc)},
            )
            self._need_whole, self.last_error = True, str(exc)
            return pb.StreamRequest(ack_version=update.version, error=str(exc))
        self._need_whole = False
        if not self.connected:
            log.info(
                "controller stream established", extra={"controller": self.address, "version": update.version}
            )
        self.connected, self.version, self.last_update, self.last_error = (
            True,
            update.version,
            time.time(),
            None,
        )
        return pb.StreamRequest(ack_version=update.version)
