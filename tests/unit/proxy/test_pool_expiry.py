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
