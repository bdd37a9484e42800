"""Pooled upstream connections for the HTTP layer: keep-alive connections to the app (inbound), and
mTLS connections to other sidecars (outbound), so a request pays no connect and no handshake.

A connection goes back to the pool only between requests (HTTP/1.1: both messages complete,
keep-alive; HTTP/2: no stream open, see ``proxy.http2``) and is dropped when the other side has
closed it or sent anything meanwhile, when the pool for its key is full, or when the sidecar
drains. HTTP/1.1 connections (`pool_of`) and HTTP/2 ones (`h2_pool_of`) have a pool each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from proxy import framing, h1
from proxy.dial import DialError, dial_sidecar
from proxy.dial import why as _why
from proxy.pipe import Pipe
from sidemesh.mesh.compile import Endpoint

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar

MAX_IDLE_PER_KEY = 64
# An idle connection is closed after this long: each holds a TLS read buffer (256 KiB with
# uvloop), so a burst's connections would otherwise keep RSS up until the peer's idle timeout.
MAX_IDLE_S = 30.0


class ConnectError(Exception):
    """No connection could be made (the reason is the message)."""


class Reusable(Protocol):
    def release(self) -> None:
        """Dropped from the pool (its pipe is closed): let go of what it holds."""
        ...


C = TypeVar("C", bound=Reusable)


class Pool(Generic[C]):
    """Idle connections by key: each a pipe and its protocol state (``C``)."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_KEY, max_idle_s: float = MAX_IDLE_S) -> None:
        self.max_idle = max_idle
        self.max_idle_s = max_idle_s
        self._idle: dict[object, deque[tuple[Pipe, C, float]]] = {}
        self.closed = False
        self.opened = 0  # connections made (tests and the admin page)
        self.reused = 0

    def take(self, key: object) -> tuple[Pipe, C] | None:
        idle = self._idle.get(key)
        while idle:
            pipe, conn, _ = idle.pop()  # the most recently used: warmest, least likely closed
            pipe.on_end = None
            if pipe.usable:
                self.reused += 1
                return pipe, conn
            pipe.close()
            conn.release()
        return None

    def put(self, key: object, pipe: Pipe, conn: C) -> None:
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        if self.closed or not pipe.usable or len(idle) >= self.max_idle:
            pipe.close()
            conn.release()
            return
        idle.append((pipe, conn, time.monotonic()))
        # Closed and let go as soon as the other side ends it (a draining sidecar waits for
        # that, a second at most, to answer UNREAD to a request sent meanwhile: linger_close).
        pipe.on_end = functools.partial(self._ended, key, pipe)

    def _ended(self, key: object, pipe: Pipe) -> None:
        for entry in self._idle.get(key, deque()):
            if entry[0] is pipe:
                self._idle[key].remove(entry)
                pipe.close()
                entry[1].release()
                return

    def expire(self, now: float | None = None) -> int:
        """Close the connections idle for longer than ``max_idle_s`` (the oldest are at the
        left of each queue); how many."""
        limit = (time.monotonic() if now is None else now) - self.max_idle_s
        closed = 0
        for key, idle in list(self._idle.items()):
            while idle and idle[0][2] < limit:
                pipe, conn, _ = idle.popleft()
                pipe.close()
                conn.release()
                closed += 1
            if not idle:
                del self._idle[key]
        return closed

    def idle_count(self) -> int:
        return sum(len(q) for q in self._idle.values())

    def close(self) -> None:
        """Close every idle connection; later ``put``s close theirs."""
        self.closed = True
        for idle in self._idle.values():
            for pipe, conn, _ in idle:
                pipe.close()
                conn.release()
        self._idle.clear()


_pools: weakref.WeakKeyDictionary[Sidecar, Pool[h1.Connection]] = weakref.WeakKeyDictionary()
_h2_pools: weakref.WeakKeyDictionary[Sidecar, Pool[Any]] = weakref.WeakKeyDictionary()


def pool_of(sc: Sidecar) -> Pool[h1.Connection]:
    """The sidecar's idle HTTP/1.1 connections (to the app, and to other sidecars)."""
    pool = _pools.get(sc)
    if pool is None:
        pool = _pools[sc] = Pool()
    return pool


def h2_pool_of(sc: Sidecar) -> Pool[Any]:
    """The sidecar's idle upstream HTTP/2 connections (``proxy.http2._Up``; to other sidecars, or
    plain to endpoints outside the mesh): those an app connection no longer needs, for the next
    one, so its first stream pays no connect and no handshake."""
    pool = _h2_pools.get(sc)
    if pool is None:
        pool = _h2_pools[sc] = Pool()
    return pool


def expire_pools(sc: Sidecar) -> None:
    pool_of(sc).expire()
    h2_pool_of(sc).expire()


def close_pools(sc: Sidecar) -> None:
    pool_of(sc).close()
    h2_pool_of(sc).close()


async def connect_app(
    sc: Sidecar, port: int, host: str | None = None, local: tuple[str, int] | None = None
) -> Pipe:
    """A new connection to the app's ``port`` at ``host`` (default ``--app-host``), from ``local``."""
    pipe = Pipe(framed=False, name="app", direction="inbound")  # (the inbound side's app connections)
    timeout = sc.config.connect_timeout.total_seconds()
    host = sc.config.app_host if host is None else host
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(lambda: pipe, host, port, local_addr=local), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise ConnectError(f"app not reachable at {host}:{port}: {_why(exc)}") from exc
    _nodelay(pipe)
    sc.count_bytes(pipe, "inbound")  # (the connection it serves is counted)
    return pipe


async def connect_plain(sc: Sidecar, host: str, port: int) -> Pipe:
    pipe = Pipe(framed=False, name="upstream", direction="outbound")
    timeout = sc.config.connect_timeout.total_seconds()
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(lambda: pipe, host, port), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise ConnectError(f"cannot connect to {host}:{port}: {_why(exc)}") from exc
    _nodelay(pipe)
    sc.count_bytes(pipe, "outbound")
    return pipe


async def connect_sidecar(
    sc: Sidecar, ep: Endpoint, dial: tuple[str, int], hint: int = framing.HINT_HTTP1
) -> Pipe:
    """mTLS to the endpoint's sidecar, its identity checked (secure naming), OPEN(port, hint) sent
    (what the connection will carry: HTTP/1.1 from the pool, HTTP/2 from ``proxy.h2route``)."""
    pipe = Pipe(framed=True, name="upstream", direction="outbound")
    try:
        await dial_sidecar(sc, lambda: pipe, ep, dial)
    except DialError as exc:
        raise ConnectError(str(exc)) from exc
    _nodelay(pipe)
    pipe.write_frame(framing.open_frame(ep.port, hint))
    sc.count_bytes(pipe, "outbound")
    return pipe


def _nodelay(pipe: Pipe) -> None:
    sock = pipe.transport.get_extra_info("socket") if pipe.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
