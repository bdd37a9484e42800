"""A proxy Pipe on one end of a socket pair, for tests that drive the HTTP proxies with bytes."""

from __future__ import annotations

import asyncio
import socket

from proxy.pipe import Pipe


async def pipe_and_peer(name: str = "downstream", framed: bool = False) -> tuple[Pipe, socket.socket]:
    """A :class:`Pipe` with its transport made on one end of a socket pair, and the other end
    (non-blocking: for ``asyncio.open_connection(sock=...)``)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    pipe = Pipe(framed=framed, name=name)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, a)
    return pipe, b
