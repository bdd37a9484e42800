"""A proxy Pipe on one end of a socket pair, for tests that drive the HTTP proxies with bytes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

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


async def denying_h2_proxy(
    idle_timeout: float, denial: Any = None
) -> tuple[asyncio.Task[None], asyncio.StreamReader, asyncio.StreamWriter]:
    """An HTTP/2 proxy (inbound side) that answers every stream with ``denial`` (403 "denied" by
    default) and has no app, serving one connection, and a client's reader and writer on it."""
    from proxy import http2  # (only the tests of the HTTP/2 proxy load it)
    from proxy.observe import NullObserver

    pipe, peer = await pipe_and_peer("down")

    async def no_app() -> Pipe:
        raise AssertionError("a denied stream never reaches the app")

    answer = http2.Denial(403, "denied") if denial is None else denial
    proxy = http2.H2Proxy(pipe, lambda m, p: answer, no_app, NullObserver().start, {})
    server = asyncio.create_task(proxy.run(idle_timeout=idle_timeout))
    reader, writer = await asyncio.open_connection(sock=peer)
    return server, reader, writer


async def response_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Any, timeout: float = 5.0
) -> dict[bytes, bytes]:
    """The fields of the first response head ``conn`` (an h2 client connection, its bytes on
    ``reader``/``writer``) receives; what it answers meanwhile (SETTINGS acks) goes out."""
    import h2.events

    while True:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        assert data, "the connection closed before a response head"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                return dict(event.headers)
        writer.write(conn.data_to_send())
