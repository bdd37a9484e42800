"""Outbound: the app's connection -> (mTLS to the endpoint's sidecar | plain TCP outside the mesh)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from proxy import framing
from proxy.balance import Lease, NoEndpoint
from proxy.detect import Kind, detect_outcome
from proxy.dial import DialError, dial_sidecar
from proxy.dial import why as _why
from proxy.original_dst import original_dst
from proxy.pipe import Pipe
from proxy.relay import UNANSWERED, Half, Relay, reset_socket
from proxy.retry import CONNECT_RETRIES
from proxy.routers import OutboundRouter, context, serve_connection
from sidemesh.mesh.compile import Destination, Endpoint

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar

log = logging.getLogger("sidemesh.proxy.outbound")


class Refused(Exception):
    """The connection cannot be made; the reason goes to the log, the app sees a reset."""


class Unanswered(Refused):
    """An undecided connection's deadline passed before it could even dial (counted, logged
    sparingly by the sidecar: a flood must not flood the log)."""


async def _connect_balanced(sc: Sidecar, relay: Relay, dest: Destination) -> Half:
    """Opaque TCP: an endpoint per connection from the balancer (P2C, ejection). One that cannot be
    reached is tried elsewhere (nothing was sent yet) and counts toward its ejection. The outcome is
    reported once connected (latency: the connect time); the lease is held while the connection
    lives, so the endpoint's load counts its open connections."""
    tried: list[Endpoint] = []
    failed: Refused | None = None
    for attempt in range(CONNECT_RETRIES + 1):
        try:
            lease = sc.balancer.acquire(dest, avoid=tried)
        except NoEndpoint as exc:
            raise Refused(str(exc)) from None
        if failed is not None:
            if lease.endpoint in tried:  # no other endpoint (the rest ejected, or none): not again
                lease.cancel()  # (a black-holed address cost three connect timeouts)
                raise failed
            log.info("endpoint unreachable; trying another", extra={**relay.info, "reason": str(failed)})
        ep, halves = lease.endpoint, len(relay.halves)
        relay.info["endpoint"] = f"{ep.address}:{ep.port}"
        relay.info["mtls"] = ep.identity is not None
        try:
            if ep.identity is None:
                up = await _connect_plain(sc, relay, (ep.address, ep.port))
            else:
                dial = (
                    (ep.address, ep.port)
                    if sc.config.capture == "iptables"
                    else (ep.address, sc.inbound_port)
                )
                # What this side's detection decided from the bytes: the other side need not
                # detect again. (HTTP/2 to the mesh is proxied per stream by h2route: it gets here
                # only when that is not possible.) Nothing when the bytes did not decide (a
                # destination marked opaque here is not looked at; a timeout decides nothing):
                # the other side goes by its own configuration and detection, and a request that
                # comes late is still parsed there. It refuses HTTP said to be opaque.
                protocol = relay.info.get("protocol")
                hint = (
                    framing.HINT_H2
                    if protocol == "h2"
                    else framing.HINT_OPAQUE
                    if protocol is not None and not relay.info.get("undecided")
                    else framing.HINT_DETECT
                )
                up = await _connect_mesh(sc, relay, ep, dial, hint)
        except Refused as exc:
            lease.release(False)
            tried.append(ep)
            if attempt == CONNECT_RETRIES or any(h.transport is not None for h in relay.halves[halves:]):
                raise  # out of attempts, or the failed half is attached to the relay: no retry
            del relay.halves[halves:]
            failed = exc
            continue
        lease.report(True)  # connected: its latency is the connect time
        _release_on_close(relay, lease)
        return up
    raise AssertionError("unreachable")


def _release_on_close(relay: Relay, lease: Lease) -> None:
    if relay.closed:
        lease.release(True)
        return
    previous = relay.on_close

    def closed(r: Relay, outcome: str) -> None:
        lease.release(True)
        if previous is not None:
            previous(r, outcome)

    relay.on_close = closed


async def _connect_mesh(
    sc: Sidecar, relay: Relay, ep: Endpoint, dial: tuple[str, int], hint: int = framing.HINT_DETECT
) -> Half:
    up = relay.half(framed=True, name="upstream")
    try:
        _, peer = await dial_sidecar(sc, lambda: up, ep, dial)
    except DialError as exc:
        raise Refused(str(exc)) from exc
    relay.info["peer"] = str(peer)
    up.write_raw(framing.open_frame(ep.port, hint))

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
        raise Refused(f"cannot connect to {dial[0]}:{dial[1]}: {_why(exc)}") from exc
    return up


async def handle(sc: Sidecar, conn: socket.socket, relay: Relay, target: str | None) -> None:
    """``target`` is a service name (local mode listener) or None (iptables: SO_ORIGINAL_DST).
    ``relay`` was made at the accept (the connection counts toward the limit from there)."""
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
        decided = True
        if dest is not None and not dest.opaque:
            kind, decided = await detect_outcome(conn, sc.config.detect_timeout.total_seconds())
            relay.info["protocol"] = kind.value
            if not decided:
                relay.info["undecided"] = True  # (the timeout decided: see _connect_balanced's hint)
            if kind is Kind.CLOSED:
                raise Refused("the app closed before sending anything")
            if kind is Kind.HTTP1:
                await _serve_http(sc, relay, conn, dest)
                return
            if kind is Kind.H2:
                # (imported with the first HTTP/2 connection: a sidecar that never carries one
                # keeps the HTTP/2 proxy's code out of its memory: 0.57 MB of Python heap, 0.2 MB
                # of RSS at ready in bench.l4's pair)
                from proxy import h2route

                if h2route.terminates(dest):
                    await h2route.serve(sc, relay, conn, dest)  # per stream: balancing, timeout, spans
                    return
        deadline = _answer_deadline(sc, relay, decided)
        if dest is None:
            if not sc.config.passthrough:
                raise Refused(f"{dst[0]}:{dst[1]} is outside the mesh and passthrough is off")
            up = await _connect_plain(sc, relay, dst)
            relay.info["mtls"] = False
        elif deadline is not None:
            up = await _connect_in_turn(sc, relay, dest, deadline)
        else:
            up = await _connect_balanced(sc, relay, dest)
        app = relay.half(framed=False, name="app")
        await asyncio.get_running_loop().connect_accepted_socket(lambda: app, conn)
        relay.link(app, up)
        if deadline is not None:
            relay.require_answer(up, deadline - time.monotonic())
        sc.metrics.connections.labels("outbound", "allow").inc()
    except Unanswered:
        relay.fail(UNANSWERED)  # counted and logged (sparingly) by the sidecar, with the others so closed
        reset_socket(conn)
    except Refused as exc:
        sc.metrics.connections.labels("outbound", "refused").inc()
        log.warning("outbound connection refused", extra={**relay.info, "reason": str(exc)})
        relay.fail(str(exc))
        reset_socket(conn)
    except Exception:
        log.exception("outbound connection failed", extra=relay.info)
        relay.fail("internal error")
        reset_socket(conn)


def _answer_deadline(sc: Sidecar, relay: Relay, decided: bool) -> float | None:
    """When an undecided connection must have heard from its destination (monotonic), or None.

    Nothing decisive within the detect timeout: either a server-speaks-first protocol (its server
    answers as soon as it is connected) or a client that is idle or trickling bytes (a flood, a
    slowloris). Both are carried as opaque TCP, as before; the second kind never gets an answer,
    so an answer is what keeps the connection (Envoy closes on its listener-filter timeout,
    Linkerd carries on as opaque TCP: this sits between)."""
    limit = sc.config.undecided_timeout.total_seconds()
    if decided or limit <= 0:
        return None
    return relay.started + limit


async def _connect_in_turn(sc: Sidecar, relay: Relay, dest: Destination, deadline: float) -> Half:
    """Dial for an undecided connection when its turn comes (``--undecided-dial-rate``): a flood of
    them costs a few handshakes a second, never thousands in the same second, and connections that
    showed what they speak (which dial at once) keep most of the CPU. No turn before its deadline:
    held, never dialed, until the deadline (as detection holds a connection in Envoy and Linkerd);
    closing it at once would only bring a flood that reconnects back at once, each time costing an
    accept and a detection."""
    wait = sc.undecided_dials.reserve(deadline)
    if wait is None:
        await asyncio.sleep(max(deadline - time.monotonic(), 0.0))
        raise Unanswered("no turn to dial before the undecided timeout")
    if wait > 0:
        await asyncio.sleep(wait)
    return await _connect_balanced(sc, relay, dest)


async def _serve_http(sc: Sidecar, relay: Relay, conn: socket.socket, dest: Destination) -> None:
    app = Pipe(framed=False, name="app", direction="outbound")
    relay.on_fail = app.abort
    await asyncio.get_running_loop().connect_accepted_socket(lambda: app, conn)
    router = OutboundRouter(sc, dest.name, relay.info)
    ctx = context(sc, "outbound", relay, source=str(sc.identity.spiffe_id), service=dest.name)
    await serve_connection(sc, relay, app, router, ctx)
