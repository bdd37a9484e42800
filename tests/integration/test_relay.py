"""The relay on real sockets, for orderings the sidecar tests cannot force."""

from __future__ import annotations

import asyncio
import socket

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
