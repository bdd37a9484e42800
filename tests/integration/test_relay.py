"""The relay on real sockets, for orderings the sidecar tests cannot force."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy import relay as relay_module
from proxy.relay import Relay


async def _pair(relay: Relay, name: str) -> tuple[socket.socket, object]:
    """A half on one end of a real socket pair; returns the other end (the 'app')."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    half = relay.half(framed=False, name=name)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: half, ours)
    return theirs, half


async def test_a_half_linked_after_the_relay_failed_is_reset_not_left_open() -> None:
    """The destination's DENY can arrive before the app's half is attached (outbound.handle)."""
    relay = Relay()
    upstream_app, up = await _pair(relay, "upstream")
    relay.fail("denied by destination")  # before the app half exists
    app_peer, app = await _pair(relay, "app")
    relay.link(app, up)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(app_peer, 10), 2)  # a hang fails the test here
    except (ConnectionResetError, ConnectionAbortedError):
        data = b""
    assert data == b""  # reset (or at least closed): the app is told, not left waiting
    app_peer.close()
    upstream_app.close()


async def test_a_connection_lost_in_the_turn_of_its_open_fails_the_relay() -> None:
    """The caller's mTLS connection was lost in the same turn of the loop as its OPEN: the loss
    went to the pipe (the protocol at that moment), the half that took over was never told, and
    the app's connection waited for it until the idle timeout (1 h)."""
    from proxy.inbound import _to_half
    from proxy.pipe import Pipe

    relay = Relay()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    pipe = Pipe(framed=True, name="downstream")
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, ours)
    transport.abort()  # lost; its connection_lost is scheduled for the pipe
    down = _to_half(relay, pipe)
    assert relay.closed
    app_peer, app = await _pair(relay, "app")
    relay.link(app, down)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(app_peer, 10), 2)
    except (ConnectionResetError, ConnectionAbortedError):
        data = b""
    assert data == b""  # the app's side is reset, not left open
    app_peer.close()
    theirs.close()


async def test_a_connection_closed_toward_a_peer_that_does_not_read_is_aborted_after_its_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transport closed with a write buffer waits to send it: toward a peer that no longer reads
    (hung, partitioned) it kept its socket and its buffer for good. Now it has FLUSH_ON_CLOSE_S,
    then it is aborted; what a reading peer is sent before the close still arrives whole."""
    monkeypatch.setattr(relay_module, "FLUSH_ON_CLOSE_S", 0.3)
    loop = asyncio.get_running_loop()
    lost = loop.create_future()

    class Writer(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(exc)

    stalled, other = socket.socketpair()
    stalled.setblocking(False)
    transport, _ = await loop.create_connection(Writer, sock=stalled)
    transport.write(b"x" * (8 << 20))  # far more than the kernel's buffers: most stays in ours
    assert transport.get_write_buffer_size() > 0
    started = loop.time()
    relay_module.close(transport)
    await asyncio.wait_for(lost, 3)
    assert 0.25 < loop.time() - started < 2
    other.close()

    reading, peer = socket.socketpair()
    reading.setblocking(False)
    peer.setblocking(False)
    lost = loop.create_future()
    transport, _ = await loop.create_connection(Writer, sock=reading)
    transport.write(b"y" * (1 << 20))
    relay_module.close(transport)
    got = b""
    while len(got) < 1 << 20:
        got += await loop.sock_recv(peer, 1 << 16)
    assert got == b"y" * (1 << 20)
    await asyncio.wait_for(lost, 3)
    peer.close()


async def test_a_slow_reader_gets_all_a_closed_connection_had_to_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grace is for a peer that takes nothing: one that reads slowly gets everything."""
    monkeypatch.setattr(relay_module, "FLUSH_ON_CLOSE_S", 0.2)
    loop = asyncio.get_running_loop()
    sending, peer = socket.socketpair()
    sending.setblocking(False)
    peer.setblocking(False)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=sending)
    size = 8 << 20
    transport.write(b"z" * size)
    relay_module.close(transport)
    got = 0
    while got < size:
        chunk = await loop.sock_recv(peer, 1 << 20)
        assert chunk, f"cut after {got} bytes"
        got += len(chunk)
        await asyncio.sleep(0.02)  # slower than the grace in total, never idle for a whole one
    assert got == size
    peer.close()
