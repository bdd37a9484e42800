"""Outbound: the app's connection -> (mTLS to the endpoint's sidecar | plain TCP outside the mesh)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import struct
from typing import TYPE_CHECKING

from proxy import framing
from proxy.original_dst import original_dst
from proxy.relay import Half, Relay, reset
from sidemesh.identity import tls
from sidemesh.mesh.compile import Destination, Endpoint

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar

log = logging.getLogger("sidemesh.proxy.outbound")
_rr = itertools.count()


class Refused(Exception):
    """The connection cannot be made; the reason goes to the log, the app sees a reset."""


def pick(dest: Destination) -> Endpoint:
    """Round robin per connection (per-request balancing belongs to the HTTP layer)."""
    if not dest.endpoints:
        raise Refused(f"{dest.name} has no endpoints")
    return dest.endpoints[next(_rr) % len(dest.endpoints)]


async def _connect_mesh(sc: Sidecar, relay: Relay, ep: Endpoint, dial: tuple[str, int]) -> Half:
    up = relay.half(framed=True, name="upstream")
    loop = asyncio.get_running_loop()
    timeout = sc.config.connect_timeout.total_seconds()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: up,
                dial[0],
                dial[1],
                ssl=sc.identity.client_context(),
                server_hostname="",
                ssl_handshake_timeout=timeout,
            ),
            timeout,
        )
    except ssl.SSLError as exc:
        sc.metrics.tls_failures.labels("outbound", exc.reason or "ssl_error").inc()
        raise Refused(
            f"TLS handshake with {ep.workload} at {dial[0]}:{dial[1]} failed: {exc.reason or exc}"
        ) from exc
    except (OSError, TimeoutError) as exc:
        raise Refused(f"cannot connect to {ep.workload} at {dial[0]}:{dial[1]}: {exc or 'timeout'}") from exc
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        peer = tls.peer_spiffe_id(ssl_object)
    except tls.PeerIdentityError as exc:
        reset(transport)
        raise Refused(f"{dial[0]}:{dial[1]}: {exc}") from exc
    if peer != ep.identity:  # secure naming
        reset(transport)
        sc.metrics.tls_failures.labels("outbound", "wrong_identity").inc()
        raise Refused(f"{dial[0]}:{dial[1]} presented {peer}, expected {ep.identity} (secure naming)")
    if ssl_object.selected_alpn_protocol() != tls.ALPN:
        reset(transport)
        raise Refused(f"{dial[0]}:{dial[1]} does not speak {tls.ALPN}")
    relay.info["peer"] = str(peer)
    up.write_raw(framing.open_frame(ep.port))

    def on_frame(kind: int, payload: bytes) -> None:
        if kind == framing.DENY:
            reason = payload.decode(errors="replace")
            relay.info["denied"] = reason
            log.warning("connection denied by the destination", extra={**relay.info, "reason": reason})
            relay.fail("denied by destination")
        else:
            relay.fail(f"unexpected frame {kind} from server")

    up.on_frame = on_frame
    return up


async def _connect_plain(sc: Sidecar, relay: Relay, dial: tuple[str, int]) -> Half:
    up = relay.half(framed=False, name="upstream")
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: up, dial[0], dial[1]), sc.config.connect_timeout.total_seconds()
        )
    except (OSError, TimeoutError) as exc:
        raise Refused(f"cannot connect to {dial[0]}:{dial[1]}: {exc or 'timeout'}") from exc
    return up


async def handle(sc: Sidecar, conn: socket.socket, client: tuple[str, int], target: str | None) -> None:
    """``target`` is a service name (local mode listener) or None (iptables: SO_ORIGINAL_DST)."""
    relay = sc.new_relay("outbound", client)
    try:
        mesh = sc.mesh_config()
        if target is not None:
            dest = mesh.lookup_name(target)
            if dest is None:
                raise Refused(f"{target} is not a service in the mesh")
            dst = (target, 0)
        else:
            dst = original_dst(conn)
            if sc.is_own_listener(dst):
                raise Refused(f"connection to the proxy's own port {dst[1]} (loop)")
            dest = mesh.lookup_address(*dst)
        relay.info["destination"] = f"{dst[0]}:{dst[1]}" if dest is None else dest.name
        if dest is None:
            if not sc.config.passthrough:
                raise Refused(f"{dst[0]}:{dst[1]} is outside the mesh and passthrough is off")
            up = await _connect_plain(sc, relay, dst)
            relay.info["mtls"] = False
        else:
            ep = pick(dest)
            relay.info["endpoint"] = f"{ep.address}:{ep.port}"
            if ep.identity is None:
                up = await _connect_plain(sc, relay, (ep.address, ep.port))
                relay.info["mtls"] = False
            else:
                dial = (
                    (ep.address, ep.port)
                    if sc.config.capture == "iptables"
                    else (ep.address, sc.inbound_port)
                )
                up = await _connect_mesh(sc, relay, ep, dial)
                relay.info["mtls"] = True
        app = relay.half(framed=False, name="app")
        await asyncio.get_running_loop().connect_accepted_socket(lambda: app, conn)
        relay.link(app, up)
        sc.metrics.connections.labels("outbound", "allow").inc()
    except Refused as exc:
        sc.metrics.connections.labels("outbound", "refused").inc()
        log.warning("outbound connection refused", extra={**relay.info, "reason": str(exc)})
        relay.fail(str(exc))
        _reset_socket(conn)
    except Exception:
        log.exception("outbound connection failed", extra=relay.info)
        relay.fail("internal error")
        _reset_socket(conn)


def _reset_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
