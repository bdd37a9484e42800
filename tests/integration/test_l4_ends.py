"""How an opaque TCP stream through a sidecar pair ends, in the cases where it went wrong: the other
sidecar gone after its own direction had ended, a client that half-closes before sending anything,
and a peer that sends data after its EOF frame."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import framing
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import INBOUND, Mesh, new_mesh

FRONTEND, CART = 1, 2
OUT = 18080


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


async def _pair(mesh: Mesh) -> None:
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))


async def test_the_other_sidecar_gone_after_its_direction_ended_resets_the_app(mesh: Mesh) -> None:
    """The client sent its request and half-closed; the server streams its answer (a log tail);
    then the client pod's sidecar dies (its kernel closes the connection with a FIN, no frame).
    The server's sidecar had the client's EOF already and took the close as clean: it dropped
    everything the server wrote from then on, and the server streamed into nothing for good."""
    failed: list[BaseException] = []

    async def tail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the request, then the client's FIN
        try:
            while True:
                writer.write(b"log line\n" * 100)
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError as exc:
            failed.append(exc)
        finally:
            writer.close()

    await mesh.app(CART, tail)
    await _pair(mesh)
    frontend = mesh.sidecars["frontend"]
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"tail -f\n")
    writer.write_eof()
    await reader.readexactly(900)
    dead = [h.transport for r in frontend.relays for h in r.halves if h.transport is not None]
    for relay in list(frontend.relays):  # the frontend sidecar "dies": a FIN on its mTLS side
        for half in relay.halves:
            if half.framed and half.transport is not None:
                fd = half.transport.get_extra_info("socket").fileno()
                with socket.socket(fileno=socket.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            if half.transport is not None:
                half.transport.pause_reading()  # (a dead process reads nothing)
    frontend.relays.clear()
    try:
        for _ in range(300):
            if failed:
                break
            await asyncio.sleep(0.01)
    finally:
        writer.close()
        for transport in dead:
            transport.abort()
    assert failed, "the server app kept writing into a stream nobody reads"
    assert isinstance(failed[0], ConnectionResetError), failed


async def test_a_client_that_half_closes_before_sending_hears_a_server_that_speaks_first(mesh: Mesh) -> None:
    """`nc -N host port </dev/null`: connect, half-close at once, read the banner. A FIN before any
    byte was taken for a closed connection and the client got a reset; it is a half-close, carried
    on as opaque TCP (as when bytes came before it)."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 cart ready\r\n")
        await writer.drain()
        writer.close()

    await mesh.app(CART, banner)
    await _pair(mesh)
    got = []
    for addr in ((mesh.addr(CART), 8080), (mesh.addr(FRONTEND), OUT)):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write_eof()
        got.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()
    assert got == [b"220 cart ready\r\n"] * 2, got


async def test_data_after_an_eof_frame_resets_the_stream_quietly(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """An authenticated peer sending DATA after its EOF frame made the sidecar write to a transport
    it had half-closed: a RuntimeError out of the protocol callback, logged by asyncio at ERROR with
    a traceback once per connection (a peer could fill the log), and the peer saw a clean close."""
    caplog.set_level(logging.WARNING)

    async def holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            await asyncio.sleep(3)
        finally:
            writer.close()

    await mesh.app(CART, holder)
    await _pair(mesh)
    frontend = mesh.sidecars["frontend"]
    reader, writer = await asyncio.open_connection(
        mesh.addr(CART),
        INBOUND,
        ssl=frontend.identity.client_context(),
        server_hostname="",
        local_addr=(mesh.addr(FRONTEND), 0),
    )
    data = framing.data_header(1) + b"a"
    writer.write(framing.open_frame(8080, framing.HINT_OPAQUE) + data + framing.EOF_FRAME)
    await writer.drain()
    await asyncio.sleep(0.3)
    late = b"after-eof"
    writer.write(framing.data_header(len(late)) + late)
    await writer.drain()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
