"""The sidecar's end of the controller's config stream.

It authenticates with the workload's SVID, applies each update (acknowledging it, or reporting
why it could not), and keeps the last good configuration while the controller is away,
reconnecting with backoff. After a certificate rotation it reconnects with the new certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc

from sidemesh.api import config_pb2 as pb
from sidemesh.cancel import stop_if_cancelling
from sidemesh.gc_pause import gc_paused
from sidemesh.identity import rotation
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.mesh import wire
from sidemesh.mesh.compile import CompileError, InboundConfig, OutboundTable, apply_outbound_delta

# The stream's keepalive ping: a partition without a FIN is noticed within about a minute. The
# controller permits pings this often (controller/server.py SERVER_OPTIONS).
KEEPALIVE_MS = 30_000
log = logging.getLogger("sidemesh.proxy.config")
METHOD = "/sidemesh.config.v1.ConfigDiscovery/Stream"

Apply = Callable[[InboundConfig | None, OutboundTable | None, str], None]


# Reconnecting is cheap and every second away keeps a stale policy: retry at least every 5 s
# (the CA's 60 s ceiling would leave sidecars up to a minute behind a restarted controller).
RECONNECT_BACKOFF_MAX = 5.0


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
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                stop_if_cancelling(exc)  # being stopped, whatever grpc made of the cancellation
                if self.connected:  # the stream had delivered configuration: a new outage starts here
                    attempt = 0
                self.connected = False
                attempt += 1
                self.last_error = str(exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc)
                delay = rotation.backoff(attempt, random.random(), ceiling=RECONNECT_BACKOFF_MAX)
                log.warning(
                    "controller stream lost; keeping the last configuration",
                    extra={
                        "controller": self.address,
                        "error": self.last_error,
                        "retry_in": round(delay, 2),
                        "version": self.version,
                    },
                )
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        svid = self.identity.svid
        assert svid is not None
        creds = grpc.ssl_channel_credentials(
            root_certificates=svid.bundle_pem, private_key=svid.key_pem, certificate_chain=svid.chain_pem
        )
        options = [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            # (grpc's default of 2 pings without data, then one a minute: an idle stream's dead
            # controller took over 80 s to notice; the controller permits these, SERVER_OPTIONS)
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        async with grpc.aio.secure_channel(self.address, creds, options=options) as channel:
            outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
            outbox.put_nowait(pb.StreamRequest(outbound_deltas=True))

            async def requests() -> AsyncIterator[pb.StreamRequest]:
                # Ends with the call (None, below): left waiting on the queue of a lost stream,
                # grpc's task consuming it was destroyed pending, and asyncio logged ERROR lines
                # ("Task exception was never retrieved") in every sidecar at each controller restart.
                while (request := await outbox.get()) is not None:
                    yield request

            method = channel.stream_stream(
                METHOD,
                request_serializer=pb.StreamRequest.SerializeToString,
                response_deserializer=pb.Update.FromString,
            )
            call = method(requests())
            watcher = asyncio.create_task(self._cancel_on_rotation(call))
            try:
                async for update in call:
                    outbox.put_nowait(self._handle(update))
            except asyncio.CancelledError:
                if not self._rotated.is_set():
                    raise
                log.info("certificate rotated; reconnecting to the controller with it")
            finally:
                outbox.put_nowait(None)
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if not self._rotated.is_set():
                raise ConnectionError("the controller ended the stream")

    async def _cancel_on_rotation(self, call: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.Update]) -> None:
        await self._rotated.wait()
        call.cancel()

    def _handle(self, update: pb.Update) -> pb.StreamRequest:
        try:
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
