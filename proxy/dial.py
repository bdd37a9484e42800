"""mTLS to another sidecar, with secure naming: the one place that decides whether a server is the
endpoint the controller listed. Used by opaque TCP (`outbound.py`) and by the HTTP pools
(`pool.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.relay import TLS_SHUTDOWN_TIMEOUT_S, reset
from sidemesh.identity import tls
from sidemesh.mesh.compile import Endpoint
from sidemesh.spiffe import SpiffeId


def why(exc: BaseException) -> str:
    """An error's text for a message: a timeout's own text is empty."""
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


if TYPE_CHECKING:
    from proxy.sidecar import Sidecar


class DialError(Exception):
    """No usable connection to the endpoint's sidecar; the message says why."""


# TCP keepalive on the connections between sidecars, as Linkerd's proxy sets by default (10 s): a
# peer that vanished without a FIN (a node gone, a partition) is noticed in about 40 s, not when the
# next write times out, and an idle pooled connection to it is not handed out as usable.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 10, 3


def set_keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # (AttributeError: no TCP_KEEPIDLE off Linux)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


class _Held(asyncio.Protocol):
    """A new connection's protocol until its peer is checked: the caller's protocol never sees a
    connection that fails the checks (its loss would end the caller's relay, with no endpoint
    tried instead); what arrives meanwhile is kept and handed on."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # (the caller's protocol decides, once it has the connection)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for data in self.received:
            protocol.data_received(data)  # type: ignore[attr-defined]
        if self.eof and not protocol.eof_received() and self.lost is None:  # type: ignore[attr-defined]
            transport.close()
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])


async def dial_sidecar(
    sc: Sidecar, protocol: Callable[[], asyncio.BaseProtocol], ep: Endpoint, dial: tuple[str, int]
) -> tuple[asyncio.BaseTransport, SpiffeId]:
    """Connect to ``dial`` over mTLS with our SVID; the server must present ``ep.identity`` and speak
    the mesh ALPN, or the connection is reset. Handshake failures are counted by reason. The
    ``protocol`` is made and given the connection only once it passed (a failed one, another
    endpoint may be tried for)."""
    where = f"{dial[0]}:{dial[1]}"
    timeout = sc.config.connect_timeout.total_seconds()
    held = _Held()
    try:
        transport, _ = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(
                lambda: held,
                dial[0],
                dial[1],
                ssl=sc.identity.client_context(),
                server_hostname="",
                ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S,
            ),
            timeout,
        )
    except ssl.SSLError as exc:
        sc.metrics.tls_failures.labels("outbound", exc.reason or "ssl_error").inc()
        raise DialError(f"TLS handshake with {ep.workload} at {where} failed: {exc.reason or exc}") from exc
    except (OSError, TimeoutError) as exc:  # not a TLS failure: nothing answered
        raise DialError(f"cannot connect to {ep.workload} at {where}: {why(exc)}") from exc
    set_keepalive(transport.get_extra_info("socket"))
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        peer = tls.peer_spiffe_id(ssl_object, sc.config.trust_domain)
    except tls.PeerIdentityError as exc:
        reset(transport)
        sc.metrics.tls_failures.labels("outbound", exc.label).inc()
        raise DialError(f"{where}: {exc}") from exc
    if peer != ep.identity:  # secure naming
        reset(transport)
        sc.metrics.tls_failures.labels("outbound", "wrong_identity").inc()
        raise DialError(f"{where} presented {peer}, expected {ep.identity} (secure naming)")
    if ssl_object.selected_alpn_protocol() != tls.ALPN:
        reset(transport)
        sc.metrics.tls_failures.labels("outbound", "wrong_alpn").inc()
        raise DialError(f"{where} does not speak {tls.ALPN}")
    held.hand_over(transport, protocol())
    return transport, peer
