"""Header lists over the 64 KiB a sidecar takes (SETTINGS_MAX_HEADER_LIST_SIZE) fail their own
call, as without the mesh, not every call on the connection (RFC 9113 8.1.1: a stream error).
Real grpcio clients and server, direct and through a pair (frontend -> cart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.integration.test_http2 import ALLOW_ECHO, APP, CART, FRONTEND, OUT, both

# (grpcio's own limits raised, so that only the sidecars' count)
LARGE_METADATA = (("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20))


async def _slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"ok"


async def _meta(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return str(len(context.invocation_metadata() or ())).encode()


async def _big_trailers(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    context.set_trailing_metadata((("x-big", "v" * int(request.decode())),))
    return b"ok"


@pytest.fixture
async def rig(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = new_mesh(await start_ca(), tmp_path, ALLOW_ECHO)
    server = grpc.aio.server(options=list(LARGE_METADATA))
    handlers = {
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Meta": grpc.unary_unary_rpc_method_handler(_meta),
        "BigTrailers": grpc.unary_unary_rpc_method_handler(_big_trailers),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    yield mesh
    await server.stop(0)
    await mesh.close()


async def _outcome(call: Any) -> str:
    try:
        return f"OK {await call!r}"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def _alongside(addr: tuple[str, int], big: Any) -> tuple[str, str]:
    """The outcome of ``big(channel)`` and of a call in flight on the same channel meanwhile."""
    async with grpc.aio.insecure_channel(f"{addr[0]}:{addr[1]}", options=list(LARGE_METADATA)) as ch:
        slow = ch.unary_unary("/test.Echo/Slow")  # type: ignore[call-arg]
        await slow(b"0")
        other = asyncio.ensure_future(_outcome(slow(b"1", timeout=5)))
        await asyncio.sleep(0.2)
        return await _outcome(big(ch)), await other


async def test_trailers_over_the_limit_fail_only_their_call(rig: Mesh) -> None:
    """70 KB of trailing metadata: without the mesh the call succeeds (limits raised); through it
    the call fails (over the 64 KiB the sidecar takes, as Envoy's 60 KiB default) and the call
    beside it on the same channel succeeds: it failed UNAVAILABLE too, with the whole connection
    from the app (h2's connection error)."""

    def big(ch: grpc.aio.Channel) -> Any:
        return ch.unary_unary("/test.Echo/BigTrailers")(b"70000", timeout=5)  # type: ignore[call-arg]

    direct, meshed = [await _alongside(addr, big) for addr in both(rig)]
    assert direct == ("OK b'ok'", "OK b'ok'")
    assert meshed[1] == "OK b'ok'" and meshed[0] != "OK b'ok'", meshed


async def test_request_metadata_over_the_limit_fails_only_its_call(rig: Mesh) -> None:
    """About 90 KB of request metadata: through the mesh RESOURCE_EXHAUSTED for that call (a
    grpcio server with its default limits answers so too; this one's are raised) and the call
    beside it succeeds (the sidecar ended the client's connection with GOAWAY)."""
    metadata = tuple((f"x-h{i}", "v" * 120) for i in range(700))

    def big(ch: grpc.aio.Channel) -> Any:
        return ch.unary_unary("/test.Echo/Meta")(b"", metadata=metadata, timeout=5)  # type: ignore[call-arg]

    direct, meshed = [await _alongside(addr, big) for addr in both(rig)]
    assert direct == ("OK b'701'", "OK b'ok'")
    assert meshed == ("RESOURCE_EXHAUSTED", "OK b'ok'")
