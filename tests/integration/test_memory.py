"""Closed connections free their memory at once (reference counting), not at the next full GC.

Every TLS connection holds a 256 KiB read buffer in uvloop. If a connection's objects form a
reference cycle, they wait for a full collection of the oldest GC generation, which comes rarely in
a busy sidecar: under steady traffic, dead connections pile up by the hundred and RSS saw-tooths
(the soak in bench/results/RELIABILITY.md). So nothing of a closed connection may be cyclic garbage.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh, talk
from tests.integration.test_http2 import handlers, unary_method

FRONTEND, CART, STRANGER = 1, 2, 3
OUT = 18080


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def ours(garbage: list[object]) -> collections.Counter[str]:
    """The sidecar's objects (and the TLS state they hold) among the cyclic garbage. Not
    proxy.http2._Connection: an h2 H2Connection with methods overridden, whose cycle is h2's own
    (its frame dispatch table holds its bound methods), as for every H2Connection; nor the parts
    of h2's it holds, made the proxy's own: the hpack decoder, encoder and tables
    (proxy.http2._Decoder and _Encoder, hpack's with blocks kept; proxy.http2._CountingTable and
    _IndexedTable, hpack's table counting its changes and searched by dictionaries), its frame
    buffer, streams and state machines (_FrameBuffer, _H2Stream, _StreamMachine,
    _ConnectionMachine: h2's with per-frame work cut)."""
    h2_parts = (
        "_Connection",
        "_Decoder",
        "_Encoder",
        "_CountingTable",
        "_IndexedTable",
        "_FrameBuffer",
        "_H2Stream",
        "_StreamMachine",
        "_ConnectionMachine",
    )
    names = (
        f"{type(o).__module__}.{type(o).__qualname__}"
        for o in garbage
        if (type(o).__module__.startswith("proxy.") and type(o).__qualname__ not in h2_parts)
        or type(o).__qualname__ in ("SSLProtocol", "SSLObject")
    )
    return collections.Counter(names)


async def cyclic_garbage_after() -> collections.Counter[str]:
    await asyncio.sleep(0.2)  # the closes complete
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = ours(gc.garbage)
    gc.set_debug(0)
    gc.garbage.clear()
    return found


async def test_opaque_connections_leave_no_cyclic_garbage(mesh: Mesh, no_gc: None) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    await talk(mesh.addr(FRONTEND), OUT, b"warm up")
    await cyclic_garbage_after()  # what starting up left
    for i in range(20):
        assert await talk(mesh.addr(FRONTEND), OUT, b"hello %d" % i) == b"HELLO %dBYE" % i
    assert await cyclic_garbage_after() == collections.Counter()


async def test_refused_connections_leave_no_cyclic_garbage(mesh: Mesh, no_gc: None) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("stranger", STRANGER, outbound=(f"{mesh.addr(STRANGER)}:{OUT}=cart.shop:80",))
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"let me in")
    await cyclic_garbage_after()
    for _ in range(10):  # the policy lets only the frontend in: each is reset
        with pytest.raises(ConnectionResetError):
            await talk(mesh.addr(STRANGER), OUT, b"let me in")
    assert await cyclic_garbage_after() == collections.Counter()


HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def http_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive HTTP/1.1 app: 'ok' to every request head."""
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(HTTP_REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def http_get(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /items HTTP/1.1\r\nHost: cart.shop\r\nConnection: close\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


async def test_http1_connections_leave_no_cyclic_garbage(mesh: Mesh, no_gc: None) -> None:
    await mesh.app(CART, http_app)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    assert (await http_get(mesh.addr(FRONTEND), OUT)).endswith(b"\r\n\r\nok")
    await cyclic_garbage_after()
    for _ in range(20):
        reply = await http_get(mesh.addr(FRONTEND), OUT)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok")
    assert await cyclic_garbage_after() == collections.Counter()


async def websocket_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a WebSocket handshake (the RFC 6455 example key), then echoes upper-cased bytes."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def websocket_once(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: cart.shop\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
    writer.close()


async def test_websockets_leave_no_cyclic_garbage(mesh: Mesh, no_gc: None) -> None:
    """A spliced WebSocket's relay kept its policy re-check, which held the router, which held
    the relay: every closed WebSocket (uvloop's 256 KiB TLS buffer with it) waited for a full GC."""
    await mesh.app(CART, websocket_app)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    await websocket_once(mesh.addr(FRONTEND), OUT)
    await cyclic_garbage_after()
    for _ in range(10):
        await websocket_once(mesh.addr(FRONTEND), OUT)
    assert await cyclic_garbage_after() == collections.Counter()


async def test_grpc_connections_leave_no_cyclic_garbage(mesh: Mesh, no_gc: None) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers("test.Echo"),))
    server.add_insecure_port(f"{mesh.addr(CART)}:8080")
    await server.start()
    try:
        await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))

        async def one_call() -> bytes:
            async with grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}") as ch:
                return bytes(await unary_method(ch, "/test.Echo/Unary")(b"abc", timeout=5))

        assert await one_call() == b"cba"
        await cyclic_garbage_after()
        for _ in range(10):
            assert await one_call() == b"cba"
        assert await cyclic_garbage_after() == collections.Counter()
    finally:
        await server.stop(0)
