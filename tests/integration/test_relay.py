"""The relay on real sockets, for orderings the sidecar tests cannot force."""

from __future__ import annotations

import asyncio
import socket

from proxy.relay import Relay
from tests.support import fds


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


async def test_a_listener_out_of_descriptors_backs_off_without_spinning() -> None:
    """Accepting waits for the listener to be readable. Registered for the accept task's whole
    life, that wait woke the loop on every turn while the accept backed off out of descriptors (a
    connection queued that cannot be taken): a core at 100% for as long as the shortage lasted."""
    import contextlib
    import time
    import types

    from proxy.sidecar import Sidecar

    class Count:
        n = 0

        def labels(self, *_: str) -> Count:
            return self

        def inc(self) -> None:
            self.n += 1

    served: list[socket.socket] = []
    fake = types.SimpleNamespace(
        _can_serve=asyncio.Event(),
        metrics=types.SimpleNamespace(connections=Count()),
        _serve=lambda conn, *_: served.append(conn),
    )
    fake._can_serve.set()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    task = asyncio.create_task(Sidecar._accept(fake, listener, "outbound"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    client = socket.socket()
    client.setblocking(False)
    with fds.none_left(spare=2):
        with contextlib.suppress(BlockingIOError):
            client.connect(listener.getsockname())
        await asyncio.sleep(0.1)
        cpu = time.process_time()
        await asyncio.sleep(0.6)
        cpu = time.process_time() - cpu
    try:
        for _ in range(300):  # then it is taken
            if served:
                break
            await asyncio.sleep(0.01)
        assert fake.metrics.connections.n >= 1 and len(served) == 1
        assert cpu < 0.3, cpu
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for conn in served:
            conn.close()
        listener.close()
        client.close()
