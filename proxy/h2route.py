"""The outbound side of HTTP/2 (gRPC): the app's connection is terminated here and each stream is
routed on its own (:class:`proxy.http2.H2Proxy` with :class:`OutboundStreams` as its router).

Per stream, as the HTTP/1.1 path does per request: the destination is looked up again (endpoint
changes apply to the next stream), the balancer picks an endpoint (P2C on peak EWMA, ejection),
and the stream rides an HTTP/2 connection to that endpoint's sidecar inside `sidemesh/1` mTLS
(OPEN with the HTTP/2 hint: the inbound side's ``H2Proxy`` serves it). The balancer hears of each
stream twice: its latency and outcome when the response head comes (time to first byte, as
Linkerd's peak EWMA for HTTP), and its end (so a long stream counts as load while it lasts).
Retries (``may_retry``) follow ``proxy.retry`` with the Service's policy and the destination's
budget: a stream not processed, a broken connection, a 502-504 head, a trailers-only gRPC
UNAVAILABLE.

The upstream connections belong to one app connection at a time (``H2Proxy.ups``): when it ends,
those with no stream open and nothing unread go to the sidecar's pool (``pool.h2_pool_of``), and
the next app connection to the same endpoint takes one instead of paying a handshake. Streams of
app connections open at the same time do not share a connection yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Literal

from proxy import framing, pool
from proxy.balance import Lease, NoEndpoint
from proxy.http2 import GRPC_UNAVAILABLE, Denial, H2Proxy, Target
from proxy.observe import RequestInfo
from proxy.pipe import Pipe
from proxy.relay import Relay
from proxy.retry import Failure, RoutePolicy, retryable
from proxy.routers import budget_of, tracked
from sidemesh.mesh.compile import Destination

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar

log = logging.getLogger("sidemesh.proxy.http2")


def terminates(dest: Destination | None) -> bool:
    """Whether HTTP/2 to ``dest`` is proxied per stream: some endpoint is in the mesh. (Outside the
    mesh, or no destination: the connection is carried as opaque bytes to one endpoint.)"""
    return dest is not None and any(ep.identity is not None for ep in dest.endpoints)


class OutboundStreams:
    """Routes the streams of one app connection to ``name``'s endpoints."""

    direction: Literal["inbound", "outbound"] = "outbound"
    retries: bool = True

    def __init__(self, sc: Sidecar, name: str, log_extra: dict[str, object]) -> None:
        self.sc = sc
        self.name = name  # looked up again for every stream
        self.service: str | None = name
        self.source: str | None = str(sc.identity.spiffe_id)
        self.budget = budget_of(sc, name)
        self.log_extra = log_extra
        self.policy = RoutePolicy()

    def begin(self, info: RequestInfo) -> float | None:
        dest = self.sc.mesh_config().lookup_name(self.name)
        self.policy = RoutePolicy.of(dest) if dest is not None else RoutePolicy()
        self.budget.deposit()
        return self.policy.timeout

    def route(self, info: RequestInfo, tried: list[Target]) -> Denial | Target:
        dest = self.sc.mesh_config().lookup_name(self.name)
        if dest is None:
            reason = f"{self.name} is no longer in the mesh"
            return Denial(503, reason, None, GRPC_UNAVAILABLE, "allow", "no endpoints")
        avoid = [t.ticket.endpoint for t in tried if isinstance(t.ticket, Lease)]
        try:
            lease = self.sc.balancer.acquire(dest, avoid=avoid)
        except NoEndpoint as exc:
            return Denial(503, str(exc), None, GRPC_UNAVAILABLE, "allow", "no endpoints")
        refused = [t.ticket.endpoint for t in tried if t.refused and isinstance(t.ticket, Lease)]
        if lease.endpoint in refused:
            # Every endpoint avoided: one that only answered (a 503) is tried before giving up.
            # None left: dialled again, an unreachable one cost another connect timeout for the
            # answer already in hand (as the opaque path and HTTP/1.1).
            lease.cancel()
            if not all(e in refused for e in dest.endpoints):
                with contextlib.suppress(NoEndpoint):
                    lease = self.sc.balancer.acquire(dest, avoid=refused)
                    if lease.endpoint not in refused:
                        return self._target(lease)
                    lease.cancel()
            return Denial(502, "upstream connection failed", None, GRPC_UNAVAILABLE, "allow")
        return self._target(lease)

    def _target(self, lease: Lease) -> Target:
        sc, ep = self.sc, lease.endpoint
        where = f"{ep.address}:{ep.port}"
        if ep.identity is None:  # a destination partly outside the mesh: HTTP/2 straight to it
            return Target(  # (by position, once per call: a dataclass call by keyword costs about three times as much)
                ("plain", ep.address, ep.port),
                lambda: pool.connect_plain(sc, ep.address, ep.port),
                "",  # reason
                None,  # policy
                False,  # audit
                where,  # endpoint
                None,  # destination
                "upstream connection failed",  # unreachable
                lease,  # ticket
            )
        dial = (ep.address, ep.port) if sc.config.capture == "iptables" else (ep.address, sc.inbound_port)
        identity = str(ep.identity)
        return Target(
            ("mesh", dial, identity, ep.port, sc.identity.generation),  # (see routers)
            lambda: pool.connect_sidecar(sc, ep, dial, framing.HINT_H2),
            "",  # reason
            None,  # policy
            False,  # audit
            where,  # endpoint
            identity,  # destination
            "upstream connection failed",  # unreachable
            lease,  # ticket
        )

    def report(self, target: Target, ok: bool, latency: float | None = None) -> None:
        if isinstance(target.ticket, Lease):
            target.ticket.report(ok, latency)

    def release(self, target: Target, ok: bool) -> None:
        if isinstance(target.ticket, Lease):
            target.ticket.release(ok)

    def abandon(self, target: Target, observe: bool) -> None:
        if isinstance(target.ticket, Lease):
            target.ticket.abandon(observe)

    def may_retry(
        self,
        method: str,
        failure: Failure | None,
        attempt: int,
        status: int | None = None,
        grpc_status: int | None = None,
    ) -> bool:
        return (
            attempt < self.policy.retries_for(failure)
            and retryable(method, status, failure, self.policy, grpc_status)
            and self.budget.try_withdraw()
        )


async def serve(sc: Sidecar, relay: Relay, conn: socket.socket, dest: Destination) -> None:
    """Serve the app's HTTP/2 connection to ``dest``, stream by stream."""
    down = Pipe(framed=False, name="app", direction="outbound")
    relay.on_fail = down.abort
    await asyncio.get_running_loop().connect_accepted_socket(lambda: down, conn)
    router = OutboundStreams(sc, dest.name, relay.info)
    proxy = H2Proxy(down, None, None, sc.observer.start, relay.info, router=router, pool=pool.h2_pool_of(sc))
    # The app's connections stay usable while the sidecar drains (it finishes its work).
    await tracked(sc, relay, down, "HTTP/2", proxy.run(sc.config.idle_timeout.total_seconds()))
