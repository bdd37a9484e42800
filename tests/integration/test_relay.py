"""The relay on real sockets, for orderings the sidecar tests cannot force."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy import relay as relay_module
from proxy.relay import Relay
from sidemesh.identity import tls
from sidemesh.spiffe import WorkloadId
from tests.support import fds, pki


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


def _tcp_pair(sndbuf: int) -> tuple[socket.socket, socket.socket]:
    """A TCP connection on loopback: (ours, with a small send buffer; theirs, with a small window)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(listener.getsockname())
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


class _Watched(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _closed_toward_a_peer_that_takes_nothing() -> float:
    loop = asyncio.get_running_loop()
    ours, theirs = _tcp_pair(sndbuf=4096)
    protocol = _Watched()
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, ours)
    transport.write(b"x" * (1 << 20))  # far more than the kernel's buffers: most stays in the transport
    assert transport.get_write_buffer_size() > 0
    started = loop.time()
    relay_module.close(transport)
    try:
        await asyncio.wait_for(asyncio.shield(protocol.lost), 6)
        took = loop.time() - started
        # Told: what it reads now ends in a reset, not in an end of stream that passes for the whole.
        got = 0
        with pytest.raises(ConnectionResetError):  # noqa: PT012
            while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 65536), 3):
                got += len(chunk)
        assert got < 1 << 20
        return took
    finally:
        theirs.close()


async def _a_reader_paused_past_the_limit() -> tuple[int, str]:
    """A reader that stops reading for longer than the limit, then reads on: (bytes, how it ended)."""
    loop = asyncio.get_running_loop()
    ours, theirs = _tcp_pair(sndbuf=4096)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    size = 1 << 20
    transport.write(b"p" * size)
    relay_module.close(transport)
    await asyncio.sleep(4 * relay_module.FLUSH_STALL_S)
    got = 0
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 65536), 3):
            got += len(chunk)
        return got, "end of stream"
    except ConnectionResetError:
        return got, "reset"
    finally:
        theirs.close()


async def _a_slow_reader_after_the_close() -> int:
    loop = asyncio.get_running_loop()
    ours, theirs = _tcp_pair(sndbuf=4096)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    size = 256 * 1024
    transport.write(b"z" * size)
    relay_module.close(transport)
    got = 0
    try:
        started = loop.time()
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 32 * 1024), 3):
            got += len(chunk)
            await asyncio.sleep(0.02)  # (several reads per period: never idle for a whole one)
        assert loop.time() - started > 3 * relay_module.FLUSH_STALL_S  # slower in total than a period
    except ConnectionError:
        pass  # (cut: the assertion below says how far it got)
    finally:
        theirs.close()
    return got


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_connection_closed_toward_a_peer_that_takes_nothing_is_let_go(
    run: Callable[[Coroutine[Any, Any, float]], float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport closed with data left waits to send it: toward a peer that takes none of it
    (hung, or one that closed and never reads) it kept its socket and its buffer for good."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 0.3)
    took = run(_closed_toward_a_peer_that_takes_nothing())
    assert 0.25 < took < 5  # (a few periods: the first may see the window still filling)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_reader_paused_past_the_limit_is_told_it_was_cut(
    run: Callable[[Coroutine[Any, Any, tuple[int, str]]], tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut while bytes were still to be sent: the peer gets a reset after what had reached it, never
    an orderly end (a shutdown's FIN made the first part pass for the whole stream)."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 0.2)
    got, ending = run(_a_reader_paused_past_the_limit())
    assert ending == "reset" and got < 1 << 20, (got, ending)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_slow_reader_gets_everything_a_closed_connection_had_to_send(
    run: Callable[[Coroutine[Any, Any, int]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is for a peer that takes nothing: one that reads slowly gets every byte."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 0.2)
    assert run(_a_slow_reader_after_the_close()) == 256 * 1024


class _Framed(_Watched):
    """As the sidecar's framed halves and pipes take the end of a TLS stream."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def eof_received(self) -> bool:
        relay_module.close(self.transport)
        return False


async def _tls_closed_after_the_peers_close_notify(tmp: Path) -> float:
    """Our side of an mTLS connection (certificates from our CA) writes, then closes after the peer
    sent its close_notify and stopped reading: the TLS layer's shutdown is then done at once, and
    the TCP transport under it waited to send what it holds for good."""
    authority = pki.make_authority(tmp)
    svid = pki.make_svid(authority, WorkloadId("shop", "cart").spiffe_id("cluster.local"))
    loop = asyncio.get_running_loop()
    ours, theirs = _tcp_pair(sndbuf=4096)
    peer = tls.client_context(svid).wrap_socket(theirs, do_handshake_on_connect=False, server_hostname=None)
    protocol = _Framed()
    handshake = loop.create_task(
        loop.connect_accepted_socket(lambda: protocol, ours, ssl=tls.server_context(svid))
    )
    while True:  # the peer's handshake, by hand (non-blocking), alongside ours
        try:
            peer.do_handshake()
            break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            await asyncio.sleep(0.01)
    transport, _ = await handshake
    transport.write(b"x" * (1 << 20))  # (the TLS layer passes it on to the TCP transport at once)
    started = loop.time()
    with contextlib.suppress(ssl.SSLWantReadError):
        peer.unwrap()  # its close_notify goes; it reads nothing more
    try:
        await asyncio.wait_for(asyncio.shield(protocol.lost), 6)
        return loop.time() - started
    finally:
        peer.close()  # (theirs, wrapped)


def test_a_tls_connection_closed_toward_a_peer_that_takes_nothing_is_let_go(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On uvloop, the sidecar's loop (its TLS shutdown timeout bounds only the close_notify
    exchange, not what the TCP transport under it still holds)."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 0.3)
    took = uvloop.run(_tls_closed_after_the_peers_close_notify(tmp_path))
    assert 0.25 < took < 5  # (a few periods: the first may see the window still filling)
