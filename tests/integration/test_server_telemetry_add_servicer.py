"""GrpcTelemetry.add_servicer: handlers registered by name and generic handlers are both counted,
timed and answered as before, over a real grpc.aio server."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from sidemesh.server_telemetry import GrpcTelemetry

SERVICE = "test.Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"refuse":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    return request


def _add_echo(servicer: Any, server: Any) -> None:
    """What a generated add_*Servicer_to_server does: one method registered by name, one only
    through a generic handler."""
    handlers = {"Named": grpc.unary_unary_rpc_method_handler(servicer)}
    generic = {"Generic": grpc.unary_unary_rpc_method_handler(servicer)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, generic),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def test_named_and_generic_methods_are_counted_and_timed() -> None:
    registry = CollectorRegistry()
    telemetry = GrpcTelemetry(registry)
    server = grpc.aio.server()
    telemetry.add_servicer(_add_echo, _echo, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("Named", "Generic"):
                call = channel.unary_unary(f"/{SERVICE}/{method}", None, None)
                assert await call(b"hello") == b"hello"
                try:
                    await call(b"refuse")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
                else:
                    raise AssertionError("the call was not refused")
        # abort() sends the status before the handler's own end, where the call is counted: on a
        # busy machine the client could be done first (and the server stopped under the handler)
        denied = {"method": f"/{SERVICE}/Generic", "code": "PERMISSION_DENIED"}
        for _ in range(100):
            if registry.get_sample_value("sidemesh_grpc_server_handled_total", denied) == 1:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop(None)
    get = registry.get_sample_value
    for method in ("Named", "Generic"):
        name = f"/{SERVICE}/{method}"
        assert get("sidemesh_grpc_server_handled_total", {"method": name, "code": "OK"}) == 1
        assert get("sidemesh_grpc_server_handled_total", {"method": name, "code": "PERMISSION_DENIED"}) == 1
        assert get("sidemesh_grpc_server_handling_seconds_count", {"method": name}) == 2
