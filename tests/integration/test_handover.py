"""A sidecar replaced in place without the capture (local mode; SO_REUSEPORT, docs/sidecar.md):
once the replacement listens, the draining one closes the listeners they share, so the kernel no
longer gives it the app's new connections, which it would cut at its drain timeout."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from proxy.sidecar import HANDOVER_POLL_S, listened_by_another
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import upper_echo
from tests.integration.test_faults import CART, FRONTEND, OUT, make_mesh


def test_a_listener_sees_another_on_its_address_only() -> None:
    """Another socket listening on the same address and port is seen; one bound but not
    listening, or listening on another address or port, is not (IPv4 and IPv6)."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        socks = []
        try:
            for _ in range(2):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, 0 if not socks else socks[0].getsockname()[1]))
                socks.append(sock)
            first, second = socks
            first.listen()
            assert not listened_by_another(first)  # (the other one is bound, not listening)
            second.listen()
            assert listened_by_another(first) and listened_by_another(second)
            second.close()
            assert not listened_by_another(first)
            elsewhere = socket.socket(family, socket.SOCK_STREAM)
            socks.append(elsewhere)
            elsewhere.bind((host, 0))
            elsewhere.listen()
            assert not listened_by_another(first)
        finally:
            for sock in socks:
                sock.close()


async def test_connections_opened_after_the_replacement_listens_are_not_cut_by_the_old_drain(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """The frontend (caller) sidecar replaced in place. Once the replacement listens, the old one
    still holds its outbound listener (its connections are open, or the grace): the kernel's
    SO_REUSEPORT group gives it about half of the app's *new* connections, and it cuts them at its
    drain timeout. A connection the app opens after the replacement is serving should not be lost
    to the old process's timeout."""
    mesh = await make_mesh(start_ca, tmp_path)
    try:
        await mesh.app(CART, upper_echo)
        await mesh.sidecar("cart", CART)
        outbound = (f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
        old = await mesh.sidecar("frontend", FRONTEND, outbound=outbound)
        held = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)  # keeps the old one draining
        held[1].write(b"a\n")
        assert await held[0].readexactly(2) == b"A\n"
        draining = asyncio.create_task(old.drain(timeout=2.0, grace=0))
        await asyncio.sleep(0.05)
        mesh.sidecars.pop("frontend")
        await mesh.sidecar("frontend", FRONTEND, outbound=outbound)
        # The old one sees the replacement listen within HANDOVER_POLL_S; what the kernel gave it
        # before then it serves until its drain timeout (docs/sidecar.md).
        await asyncio.sleep(10 * HANDOVER_POLL_S)
        conns = [await asyncio.open_connection(mesh.addr(FRONTEND), OUT) for _ in range(20)]
        for reader, writer in conns:
            writer.write(b"hi\n")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"HI\n"
        await draining  # the old one's drain timeout
        await old.identity.ca.close()
        await asyncio.sleep(0.2)
        cut = 0
        for reader, writer in conns:
            try:
                writer.write(b"again\n")
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(6), 2)
                cut += got != b"AGAIN\n"
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                cut += 1
            writer.close()
        held[1].close()
    finally:
        await mesh.close()
    assert cut == 0, f"{cut} of {len(conns)} connections opened after the replacement listened were cut"
