"""Idle pooled connections are closed after a while (a burst's connections held RSS up)."""

from __future__ import annotations

import asyncio
import socket
import time

from proxy.pipe import Pipe
from proxy.pool import Pool


class _Conn:
    released = 0

    def release(self) -> None:
        _Conn.released += 1


async def _pipe() -> tuple[Pipe, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    pipe = Pipe(framed=False)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, ours)
    return pipe, theirs


async def test_connections_idle_for_longer_than_the_limit_are_closed() -> None:
    pool: Pool[_Conn] = Pool(max_idle_s=30.0)
    old, old_peer = await _pipe()
    new, new_peer = await _pipe()
    pool.put("a", old, _Conn())
    pool.put("a", new, _Conn())
    now = time.monotonic()
    assert pool.expire(now) == 0 and pool.idle_count() == 2
    pool._idle["a"][0] = (*pool._idle["a"][0][:2], now - 31)  # put 31 s ago
    assert pool.expire(now) == 1 and pool.idle_count() == 1
    await asyncio.sleep(0)
    assert old.transport is not None and old.transport.is_closing()
    taken = pool.take("a")
    assert taken is not None and taken[0] is new  # the fresh one stays usable
    assert pool.expire(now + 60) == 0 and pool._idle == {}
    new.close()
    for sock in (old_peer, new_peer):
        sock.close()


async def test_a_connection_the_other_side_ends_while_idle_is_closed_and_let_go_at_once() -> None:
    """It stayed in the pool, closed or not, until taken or expired: a draining sidecar, which
    waits for the caller's close to answer UNREAD meanwhile, waited its whole second."""
    pool: Pool[_Conn] = Pool(max_idle_s=30.0)
    ended, ended_peer = await _pipe()
    kept, kept_peer = await _pipe()
    pool.put("a", ended, _Conn())
    pool.put("a", kept, _Conn())
    released = _Conn.released
    try:
        ended_peer.shutdown(socket.SHUT_WR)  # the other side ends it
        for _ in range(100):
            if pool.idle_count() == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.idle_count() == 1 and _Conn.released == released + 1
        assert ended.transport is not None and ended.transport.is_closing()
        taken = pool.take("a")
        assert taken is not None and taken[0] is kept and kept.on_end is None  # (in use: not the pool's)
    finally:
        pool.close()
        kept.close()
        await asyncio.sleep(0)
        ended_peer.close()
        kept_peer.close()


async def test_an_unread_frame_counts_only_after_an_idle_eof_and_within_the_deadline() -> None:
    """The caller sends a POST again only when the other sidecar's EOF said it was closing an
    idle connection and an UNREAD followed, and the request's time is not up (a retry after its
    deadline could be acted on by an app while the client is told 504)."""
    import dataclasses

    from proxy import framing
    from proxy.http1 import _Clock, _left_unread

    async def told(frames: bytes, clock: _Clock | None) -> bool:
        pipe, peer = await _pipe()
        pipe.framed = True
        pipe.decoder = framing.Decoder()
        try:
            peer.sendall(frames)
            for _ in range(100):
                if pipe.ended:
                    break
                await asyncio.sleep(0.01)
            return await _left_unread(pipe, clock)
        finally:
            pipe.close()
            await asyncio.sleep(0)
            peer.close()

    now = time.monotonic()
    clock = _Clock(5.0, now + 5.0)
    assert await told(framing.EOF_IDLE_FRAME + framing.UNREAD_FRAME, None)
    assert await told(framing.EOF_IDLE_FRAME + framing.UNREAD_FRAME, clock)
    assert not await told(framing.EOF_FRAME + framing.UNREAD_FRAME, None)  # not an idle close
    assert not await told(
        framing.EOF_IDLE_FRAME + framing.UNREAD_FRAME, dataclasses.replace(clock, at=now - 1)
    )


async def test_a_post_on_a_fresh_connection_the_peer_closed_unread_goes_again_once() -> None:
    """A draining sidecar takes the connections queued at its closing listener and closes them
    idle (EOF 0x01, then UNREAD for what came): a POST sent on such a fresh connection was never
    read, but only requests on reused connections were sent again, so the client got 502."""
    from proxy import framing, h1, http1
    from proxy.observe import NullObserver, RequestInfo

    async def framed() -> tuple[Pipe, socket.socket]:
        pipe, peer = await _pipe()
        pipe.framed, pipe.decoder = True, framing.Decoder()
        return pipe, peer

    closing, closing_peer = await framed()
    serving, serving_peer = await framed()
    fresh_calls: list[http1.Upstream] = []

    class Router:
        def begin(self, info: RequestInfo) -> float | None:
            return None

        async def route(self, request: h1.Request, info: RequestInfo, avoid: object = ()) -> http1.Upstream:
            return http1.Upstream(closing, h1.Connection(h1.CLIENT), reused=False, endpoint="a")

        def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
            return False  # (the route's own retries: none)

        async def fresh(self, up: http1.Upstream) -> http1.Upstream:
            fresh_calls.append(up)
            return http1.Upstream(serving, h1.Connection(h1.CLIENT), reused=False, endpoint="a")

        def release(self, up: http1.Upstream, reusable: bool, ok: bool) -> None:
            pass

    loop = asyncio.get_running_loop()
    for peer in (closing_peer, serving_peer):
        peer.settimeout(5)  # (the threads below never hang the run)

    def close_unread() -> None:  # the draining peer: its idle EOF, then UNREAD for what came
        assert b"POST /orders" in closing_peer.recv(65536)  # (in DATA frames)
        closing_peer.sendall(framing.EOF_IDLE_FRAME + framing.UNREAD_FRAME)
        # ... and it lingers as linger_close does, reading what still comes (the body's frame)
        # until the proxy lets go: closing at once could refuse that write, and a refused write
        # ends the connection before the proxy reads the frames above (no sidecar does that).
        while closing_peer.recv(65536):
            pass
        closing_peer.close()

    def answer() -> None:
        got = b""
        while b"order" not in got:
            got += serving_peer.recv(65536)
        reply = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
        serving_peer.sendall(framing.data_header(len(reply)) + reply)

    down, client = await _pipe()
    ctx = http1.Context("outbound", NullObserver(), idle_timeout=30, draining=lambda: False)
    task = asyncio.create_task(http1.serve(down, Router(), ctx))
    client.setblocking(False)
    try:
        await loop.sock_sendall(
            client, b"POST /orders HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\n\r\norder"
        )
        await asyncio.wait_for(asyncio.gather(asyncio.to_thread(close_unread), asyncio.to_thread(answer)), 5)
        got = b""
        while b"\r\n\r\nok" not in got and not got.startswith(b"HTTP/1.1 502"):
            got += await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
        assert got.startswith(b"HTTP/1.1 201"), got
        assert len(fresh_calls) == 1
    finally:
        client.close()
        await asyncio.wait_for(task, 5)
        for pipe in (down, closing, serving):
            pipe.close()
        await asyncio.sleep(0)
        serving_peer.close()


async def test_a_reconnect_past_the_deadline_gives_its_lease_back() -> None:
    """With the request's time already up, wait_for cancelled ``fresh`` before it ran: the lease it
    would have taken over stayed counted as outstanding on its endpoint for good."""
    from proxy import http1

    class Router:
        def __init__(self) -> None:
            self.leases = {"up": "lease"}
            self.released: list[object] = []

        async def fresh(self, up: object) -> object:
            lease = self.leases.pop("up")
            try:
                await asyncio.sleep(1)
            except BaseException:
                self.released.append(lease)
                raise
            return up

        def release(self, up: object, reusable: bool, ok: bool) -> None:
            self.released.append(self.leases.pop("up"))

    for offset in (-0.001, 0.0005):
        router = Router()
        answer = await http1._fresh(router, "up", time.monotonic() + offset)  # type: ignore[arg-type]
        assert isinstance(answer, http1.Local) and answer.status == 504
        assert router.released == ["lease"] and not router.leases, offset
