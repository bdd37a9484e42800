"""Inbound: terminate mTLS (or accept plaintext in permissive mode), authorize, deliver to the app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING

from proxy import framing
from proxy.detect import Kind, classify, detect, undecided_kind
from proxy.dial import why as _why
from proxy.original_dst import NoOriginalDestination, original_dst
from proxy.outbound import Refused
from proxy.pipe import Pipe
from proxy.relay import TLS_SHUTDOWN_TIMEOUT_S, Half, Relay, reset_socket
from proxy.routers import InboundRouter, context, serve_connection, serve_h2, told
from sidemesh.identity import tls
from sidemesh.policy.evaluate import evaluate
from sidemesh.policy.model import Decision, Peer, Request
from sidemesh.spiffe import SpiffeId, SpiffeIdError, WorkloadId

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar

log = logging.getLogger("sidemesh.proxy.inbound")
OPEN_TIMEOUT = 10.0


def peer_of(spiffe_id: SpiffeId) -> Peer:
    try:
        wid = WorkloadId.from_spiffe_id(spiffe_id)
    except SpiffeIdError:
        return Peer(spiffe_id.trust_domain)  # authenticated, but not a workload we can name
    return Peer(spiffe_id.trust_domain, wid.namespace, wid.service_account)


async def _accept_mesh(sc: Sidecar, relay: Relay, conn: socket.socket) -> tuple[Pipe, Peer, int, int]:
    """The TLS handshake and the OPEN frame (port, protocol hint); what follows OPEN stays
    buffered in the pipe."""
    down = Pipe(framed=True, name="downstream", direction="inbound")
    opened: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    def on_control(kind: int, payload: bytes) -> None:
        if kind != framing.OPEN or opened.done():
            down.abort()
            if not opened.done():
                opened.set_exception(Refused(f"unexpected frame {kind}"))
            return
        down.open_first = False
        down.on_end = None  # (a closure holding the pipe: no cycle once OPEN is here)
        try:
            opened.set_result(framing.parse_open_hint(payload))
        except framing.FramingError as exc:
            opened.set_exception(Refused(str(exc)))

    def ended() -> None:  # (closed, or a framing error, before OPEN: refused now, not at the timeout)
        if not opened.done():
            opened.set_exception(Refused(f"the connection ended before OPEN: {down.failure or 'closed'}"))

    down.on_control = on_control
    down.on_end = ended
    down.open_first = True  # (DATA before OPEN was taken, and buffered before any policy)
    relay.on_fail = down.abort
    try:
        return await _handshake_and_open(sc, relay, conn, down, opened)
    finally:  # refused before OPEN was awaited: an end that comes later sets nothing unread
        if not opened.done():
            opened.cancel()
        elif not opened.cancelled():
            opened.exception()  # (retrieved: asyncio logs an exception nobody read)


async def _handshake_and_open(
    sc: Sidecar, relay: Relay, conn: socket.socket, down: Pipe, opened: asyncio.Future[tuple[int, int]]
) -> tuple[Pipe, Peer, int, int]:
    timeout = sc.config.connect_timeout.total_seconds()
    try:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: down,
            conn,
            ssl=sc.identity.server_context(),
            ssl_handshake_timeout=timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S,
        )
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        sc.metrics.tls_failures.labels("inbound", str(reason)).inc()
        raise Refused(f"TLS handshake failed: {reason}") from exc
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object.selected_alpn_protocol() != tls.ALPN:
        # Detection saw the ALPN bytes somewhere in the ClientHello (an SNI, say): only a sidecar
        # that negotiated the mesh's protocol speaks it (Envoy picks the filter chain by it too).
        sc.metrics.tls_failures.labels("inbound", "wrong_alpn").inc()
        raise Refused(f"TLS without ALPN {tls.ALPN} (negotiated: {ssl_object.selected_alpn_protocol()})")
    try:
        spiffe_id = tls.peer_spiffe_id(ssl_object, sc.config.trust_domain)
    except tls.PeerIdentityError as exc:
        sc.metrics.tls_failures.labels("inbound", exc.label).inc()
        raise
    relay.info["source"] = str(spiffe_id)
    try:
        port, hint = await asyncio.wait_for(opened, OPEN_TIMEOUT)
    except TimeoutError:
        raise Refused("peer sent no OPEN frame") from None
    return down, peer_of(spiffe_id), port, hint


async def detect_inner(pipe: Pipe, timeout: float) -> Kind:
    """Detection on the decrypted stream after OPEN (the bytes stay in the pipe)."""
    deadline = time.monotonic() + timeout
    while True:
        peeked = pipe.peek()
        kind = classify(peeked) if peeked or pipe.ended else None
        if kind is not None:
            return Kind.OPAQUE if kind is Kind.CLOSED else kind
        if pipe.ended:  # no more bytes will come: undecided now (waiting spun a core until the
            return undecided_kind(peeked)  # timeout); the relay judges a first line cut short
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return undecided_kind(peeked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipe.wait_readable(len(peeked)), remaining)


def _to_half(relay: Relay, pipe: Pipe, checked: bool = False) -> Half:
    """Hand a mesh connection over to the opaque relay, with the bytes read so far; ``checked``:
    its first bytes are refused if they are HTTP (``Half.check_opaque``)."""
    half = relay.half(framed=True, name="downstream")
    transport = pipe.transport
    assert transport is not None
    half.transport = transport
    half.decoder = pipe.decoder
    if checked:
        half.check_opaque()
    buffered = pipe.take_buffered()
    if buffered and (not half.checking or half._checked(buffered)):
        half._early.append(buffered)
        half.bytes_in += len(buffered)
    half.eof_in = pipe.ended and half.ended_line_ok()
    transport.pause_reading()  # until the app side is linked
    half.flushing = pipe.flushing  # (closing already: one token, given back by whichever ends)
    transport.set_protocol(half)
    pipe.on_control = None  # the pipe is done with (and its OPEN closure would hold it in a cycle)
    relay.on_fail = None
    if pipe.lost:
        # Lost in the same turn as its OPEN: the loss was told (or is on its way) to the pipe, not
        # to the half, and the app's side would wait for it until the idle timeout.
        relay.lost(half, ConnectionResetError("the caller's connection was lost before the relay"))
    return half


def _declared_opaque(sc: Sidecar, port: int, parsed: bool = False) -> bool:
    """Whether this port is carried unchanged, as configured: the pod's opaque ports, and a
    Service's for callers through it (``parsed``: the caller's sidecar parsed HTTP, so it came
    through another: served as HTTP). Anywhere else what is relayed as opaque is checked as it
    goes on (``Half.check_opaque``): HTTP there is refused."""
    mesh = sc.mesh_config()
    return port in mesh.opaque_ports or (port in mesh.service_opaque_ports and not parsed)


async def handle(sc: Sidecar, conn: socket.socket, relay: Relay) -> None:
    down: Half | None = None
    mesh_pipe: Pipe | None = None
    try:
        redirected_port: int | None = None
        original_ip: str | None = None
        if sc.config.capture == "iptables":
            # A connection made straight to this listener (not redirected) names the listener's
            # own port here, which no policy can allow (it was taken as local mode when the
            # listener is bound to the pod IP: OPEN's port unchecked, delivered to loopback).
            try:
                original_ip, redirected_port = original_dst(conn)
            except NoOriginalDestination as exc:  # IPv6 not captured, straight to [::]:15006
                raise Refused(str(exc)) from None
        app_host, app_source = sc.app_address(original_ip)
        kind = await detect(conn, sc.config.detect_timeout.total_seconds())
        relay.info["protocol"] = kind.value
        if kind is Kind.CLOSED:
            raise Refused("client closed before sending anything")
        if kind is Kind.MESH:
            mesh_pipe, peer, port, hint = await _accept_mesh(sc, relay, conn)
            if redirected_port is not None and port != redirected_port:
                raise Refused(f"OPEN names port {port} but the connection was for port {redirected_port}")
            relay.info["port"] = port
            declared = _declared_opaque(sc, port, parsed=hint in (framing.HINT_HTTP1, framing.HINT_H2))
            checked = not declared
            if declared or hint == framing.HINT_OPAQUE:
                kind = Kind.OPAQUE
            elif hint == framing.HINT_HTTP1:
                kind = Kind.HTTP1
            elif hint == framing.HINT_H2:
                kind = Kind.H2
            else:
                kind = await detect_inner(mesh_pipe, sc.config.detect_timeout.total_seconds())
            relay.info["protocol"] = kind.value
            if kind.http:
                await _serve_http(sc, relay, mesh_pipe, peer, port, kind, original_ip)
                return
            down = _to_half(relay, mesh_pipe, checked)
            if relay.closed:  # (HTTP where it is not: refused)
                return
        else:
            port_or_none = redirected_port if redirected_port is not None else sc.default_app_port()
            if sc.config.mode == "strict":
                if port_or_none is not None:  # (named in the log and in `top`'s route)
                    relay.info["port"] = port_or_none
                raise Refused("plaintext connection refused (strict mTLS)")
            if port_or_none is None:
                raise Refused("plaintext connection: no destination port known")
            port, peer = port_or_none, Peer()
            relay.info["source"] = "unauthenticated"
            relay.info["port"] = port
            if kind.http and not _declared_opaque(sc, port):
                plain = Pipe(framed=False, name="downstream", direction="inbound")
                relay.on_fail = plain.abort
                await asyncio.get_running_loop().connect_accepted_socket(lambda: plain, conn)
                await _serve_http(sc, relay, plain, peer, port, kind, original_ip)
                return
        relay.info["port"] = port
        decision = authorize(sc, peer, port)
        relay.info["decision"] = decision.reason
        if not decision.allowed:
            sc.metrics.denials.labels(decision.policy or "default").inc()
            sc.metrics.connections.labels("inbound", "deny").inc()
            log.warning("connection denied", extra={**relay.info, "reason": decision.reason})
            relay.info["denied"] = decision.reason  # (counted as a denial however the relay ends)
            if down is not None:
                down.write_raw(framing.deny_frame(told(peer, sc.config.trust_domain) or decision.reason))
                relay.close_gracefully()
            else:
                relay.fail("denied")
                reset_socket(conn)
            return
        if decision.audit:
            log.warning("connection allowed in audit mode", extra={**relay.info, "reason": decision.reason})
        app = relay.half(framed=False, name="app")
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: app, app_host, port, local_addr=app_source
                ),
                sc.config.connect_timeout.total_seconds(),
            )
        except (OSError, TimeoutError) as exc:
            raise Refused(f"app not reachable at {app_host}:{port}: {_why(exc)}") from exc
        if down is None:
            down = relay.half(framed=False, name="downstream")
            if not _declared_opaque(sc, port):
                down.check_opaque()  # (a plaintext request that came after the detection)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: down, conn)
        relay.link(down, app)
        relay.recheck = functools.partial(authorize, sc, peer, port)
        sc.metrics.connections.labels("inbound", decision.label).inc()
    except (Refused, tls.PeerIdentityError) as exc:
        sc.metrics.connections.labels("inbound", "refused").inc()
        log.warning("inbound connection refused", extra={**relay.info, "reason": str(exc)})
        relay.info.setdefault("denied", str(exc))  # (`top` counts it a denial, not a failure)
        relay.fail(str(exc))
        if down is None and mesh_pipe is None:
            reset_socket(conn)
    except Exception:
        log.exception("inbound connection failed", extra=relay.info)
        relay.fail("internal error")
        if down is None and mesh_pipe is None:
            reset_socket(conn)


async def _serve_http(
    sc: Sidecar, relay: Relay, pipe: Pipe, peer: Peer, port: int, kind: Kind, original_ip: str | None
) -> None:
    router = InboundRouter(sc, peer, port, relay.info, sc.app_address(original_ip), relay)
    if kind is Kind.H2:
        await serve_h2(sc, relay, pipe, router)
        return
    ctx = context(sc, "inbound", relay, source=str(relay.info.get("source")))
    ctx.xfcc = router.xfcc
    await serve_connection(sc, relay, pipe, router, ctx)


def authorize(sc: Sidecar, peer: Peer, port: int) -> Decision:
    if port in sc.proxy_ports:
        return Decision(False, f"port {port} is the proxy's own")
    mesh = sc.mesh_config()
    return evaluate(mesh.policies, mesh.default_policy, Request(peer, port), sc.config.trust_domain)
