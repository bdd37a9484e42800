"""Certificate and trust rotations with HTTP/2 (gRPC) calls and streams open
between two sidecars (frontend -> cart), following docs/operations.md "Rotating the root" step by
step, with renewals of both sidecars in between. Real CA, real sidecars, grpcio apps."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ca import keys
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import new_mesh
from tests.integration.test_http2_outbound import Server
from tests.support import pki

FRONTEND, CART = 1, 2
OUT = 18080


async def test_root_rotation_and_renewals_lose_no_grpc_call_or_stream(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca()
    mesh = new_mesh(ca, tmp_path)
    app = Server("a")
    app.server.add_insecure_port(f"{mesh.addr(CART)}:8080")
    await app.server.start()
    errors: list[str] = []
    ok = [0]
    stop = asyncio.Event()
    try:
        cart = await mesh.sidecar("cart", CART)
        frontend = await mesh.sidecar(
            "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
        )
        bundle_files = {}
        for name, sc in (("cart", cart), ("frontend", frontend)):
            bundle_files[name] = tmp_path / f"{name}-bundle.pem"
            bundle_files[name].write_bytes(ca.bundle)
            sc.identity.bundle_file = bundle_files[name]
            sc.identity.reload_bundle()
        async with grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}") as ch:
            unary = ch.unary_unary("/test.Echo/Unary")  # type: ignore[call-arg]
            stream: Any = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
            await stream.write(b"s")
            assert await stream.read() == b"a:S"

            async def load() -> None:
                while not stop.is_set():
                    try:
                        assert await unary(b"x", timeout=5) == b"a:x"
                        ok[0] += 1
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{time.monotonic():.3f} {exc.code().name}: {exc.details()}")
                    await asyncio.sleep(0.005)

            async def stream_says(word: bytes) -> None:
                await stream.write(word)
                assert await asyncio.wait_for(stream.read(), 5) == b"a:" + word.upper()

            loaders = [asyncio.create_task(load()) for _ in range(4)]
            await asyncio.sleep(0.3)
            # Renewals under the same root: nothing changes for open calls.
            await cart.identity.renew()
            await frontend.identity.renew()
            await asyncio.sleep(0.3)
            await stream_says(b"renewed")
            # Step 2: both roots published; every sidecar trusts both.
            new = tmp_path / "new-root"
            pki.make_authority(new)
            both = ca.bundle + (new / keys.ROOTS).read_bytes()
            for name, sc in (("cart", cart), ("frontend", frontend)):
                bundle_files[name].write_bytes(both)
                assert sc.identity.reload_bundle()
            await asyncio.sleep(0.3)
            await stream_says(b"both")
            # Step 4: the CA signs under the new root; cart renews first (frontend still old).
            for name in (keys.CA_CERT, keys.CA_KEY, keys.CHAIN):
                shutil.copy(new / name, ca.dir / name)
            (ca.dir / keys.ROOTS).write_bytes(both)
            assert ca.server.reload_if_changed()
            await cart.identity.renew()
            await asyncio.sleep(0.3)
            await stream_says(b"cartnew")
            await frontend.identity.renew()
            await asyncio.sleep(0.3)
            await stream_says(b"bothnew")
            # Step 5: the old root removed everywhere. The stream made under the old root goes on
            # (documented); new calls work (new connections under the new root).
            only_new = (new / keys.ROOTS).read_bytes()
            for name, sc in (("cart", cart), ("frontend", frontend)):
                bundle_files[name].write_bytes(only_new)
                assert sc.identity.reload_bundle()
            await asyncio.sleep(0.5)
            await stream_says(b"oldgone")
            stop.set()
            await asyncio.gather(*loaders)
            await stream.done_writing()
            await stream.code()
    finally:
        stop.set()
        await mesh.close()
        await app.server.stop(0)
    assert errors == [], errors[:5]
    assert ok[0] > 20  # (the calls ran all along)
    assert ok[0] > 50
