"""HTTP/2 (gRPC) terminated in the outbound sidecar: a real grpcio client and real grpcio servers
through real sidecars (frontend -> two cart endpoints, mTLS with our CA).

The calls of ONE client channel (one HTTP/2 connection) are balanced per stream over both
endpoints, a slow endpoint gets fewer, an endpoint whose sidecar is down costs no failed call, the
Service's timeout answers DEADLINE_EXCEEDED, and each call gives a CLIENT span in the frontend's
sidecar whose child is the SERVER span in the cart's sidecar.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from grpc.aio import EOF  # type: ignore[attr-defined]

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, free_net
from tests.support.otlp import ReceivedSpan, Receiver

FRONTEND, CART1, CART2 = 1, 2, 4
OUT = 18080
APP = 8080
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"

MESH = """\
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: frontend-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{serviceAccount: frontend, address: {net}.1, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: carta-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cartb-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.4, meshed: {meshed}, ports: [{{port: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
  annotations: {{sidemesh.io/timeout: "{timeout}"}}
spec:
  selector: {{app: cart}}
  ports: [{{name: grpc, port: 80, targetPort: 8080}}]
"""

ALLOW = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-grpc, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080], http: {methods: [POST], paths: ["/test.Echo/*"]}}
"""


class Server:
    """A grpcio server answering /test.Echo/*: counts calls, waits ``delay`` before answering."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.hits = 0
        self.traceparents: list[str] = []
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Echo",
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                        "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                    },
                ),
            )
        )

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.hits += 1
        meta = dict(context.invocation_metadata() or ())
        self.traceparents.append(str(meta.get("traceparent", "")))
        if self.delay:
            await asyncio.sleep(self.delay)
        context.set_trailing_metadata((("x-served-by", self.name),))
        return self.name.encode() + b":" + request

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        self.hits += 1
        async for request in requests:
            yield self.name.encode() + b":" + request.upper()
        context.set_trailing_metadata((("x-served-by", self.name),))


def write_mesh(mesh: Mesh, timeout: str = "0s", meshed: bool = True) -> None:
    """``meshed``: whether cart-b is in the mesh (else: no identity, reached in plaintext)."""
    mesh.write("workloads.yaml", MESH.format(net=mesh.net, timeout=timeout, meshed=str(meshed).lower()))


class Carts:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.servers: list[Server] = []

    async def start(
        self, *servers: tuple[int, Server], timeout: str = "0s", sidecars: bool = True, meshed: bool = True
    ) -> None:
        mesh = self.mesh
        write_mesh(mesh, timeout, meshed)
        for host, server in servers:
            server.server.add_insecure_port(f"{mesh.addr(host)}:{APP}")
            await server.server.start()
            self.servers.append(server)
            if sidecars:
                await mesh.sidecar("carta" if host == CART1 else "cartb", host, identity_of="cart")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))

    async def stop(self) -> None:
        for server in self.servers:
            await server.server.stop(0)


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    m = Mesh(await start_ca(), config_dir, free_net())
    m.write("allow.yaml", ALLOW)
    yield m
    await m.close()


@pytest.fixture
async def carts(mesh: Mesh) -> AsyncIterator[Carts]:
    c = Carts(mesh)
    yield c
    await c.stop()


def unary(ch: grpc.aio.Channel) -> Any:
    return ch.unary_unary("/test.Echo/Unary")  # type: ignore[call-arg]  # raw bytes


async def read(stream: Any) -> bytes:
    message = await stream.read()
    assert isinstance(message, bytes), message
    return message


def channel(mesh: Mesh) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}")


async def test_the_streams_of_one_channel_are_spread_over_both_endpoints(mesh: Mesh, carts: Carts) -> None:
    a, b = Server("a"), Server("b")
    await carts.start((CART1, a), (CART2, b))
    async with channel(mesh) as ch:
        replies = await asyncio.gather(*(unary(ch)(f"{i}".encode()) for i in range(100)))
        assert sorted(r.split(b":", 1)[1] for r in replies) == sorted(f"{i}".encode() for i in range(100))
        assert {r.split(b":", 1)[0] for r in replies} == {b"a", b"b"}
        call = unary(ch)(b"x")
        await call
        assert "x-served-by" in {k for k, _ in tuple(await call.trailing_metadata())}  # trailers
        stream = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
        for i in range(5):
            await stream.write(f"m{i}".encode())
            assert (await read(stream)).endswith(f":M{i}".encode())
        await stream.done_writing()
        assert await stream.read() is EOF
        assert await stream.code() is grpc.StatusCode.OK
    assert a.hits + b.hits == 102
    assert min(a.hits, b.hits) >= 10, (a.hits, b.hits)
    frontend = mesh.sidecars["frontend"]
    assert all(st.outstanding == 0 for st in frontend.balancer.states.values())  # every lease released


async def test_a_slow_endpoint_gets_fewer_calls(mesh: Mesh, carts: Carts) -> None:
    fast, slow = Server("fast"), Server("slow", delay=0.05)
    await carts.start((CART1, fast), (CART2, slow))
    async with channel(mesh) as ch:
        method = unary(ch)

        async def client() -> None:
            for _ in range(40):
                await method(b"x")

        await asyncio.gather(*(client() for _ in range(4)))  # 4 concurrent streams at a time
    assert fast.hits + slow.hits == 160
    assert fast.hits > 3 * slow.hits, (fast.hits, slow.hits)


async def test_an_endpoint_without_its_sidecar_costs_no_failed_call(mesh: Mesh, carts: Carts) -> None:
    """cart-b's app runs but its sidecar does not: every connection to it fails, and each stream
    that tried it goes to cart-a (nothing was sent). The balancer counts the failures."""
    a, b = Server("a"), Server("b")
    await carts.start((CART1, a), (CART2, b), sidecars=False)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    async with channel(mesh) as ch:
        for _ in range(30):
            assert (await unary(ch)(b"x")).startswith(b"a:")
    assert b.hits == 0
    frontend = mesh.sidecars["frontend"]
    dest = frontend.mesh_config().lookup_name("cart.shop:80")
    assert dest is not None
    down = next(e for e in dest.endpoints if e.address == mesh.addr(CART2))
    st = frontend.balancer.state(down)
    assert st is not None and st.picks >= 1  # tried, and failed each time (or ejected)
    assert st.failures == st.picks or frontend.balancer.ejected(down)


async def test_an_endpoint_outside_the_mesh_gets_its_streams_in_plaintext(mesh: Mesh, carts: Carts) -> None:
    """cart-b is not meshed (no sidecar, no identity): its share of the streams goes to it as
    HTTP/2 in plaintext, the rest to cart-a's sidecar over mTLS."""
    a, b = Server("a"), Server("b")
    await carts.start((CART1, a), (CART2, b), sidecars=False, meshed=False)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    async with channel(mesh) as ch:
        replies = await asyncio.gather(*(unary(ch)(b"x") for _ in range(60)))
    assert {r.split(b":")[0] for r in replies} == {b"a", b"b"}
    assert a.hits + b.hits == 60


async def test_the_service_timeout_answers_deadline_exceeded(mesh: Mesh, carts: Carts) -> None:
    slow = Server("slow", delay=2.0)
    await carts.start((CART1, slow), timeout="200ms")
    async with channel(mesh) as ch:
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"x")
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 1.5
        slow.delay = 0.0
        assert await unary(ch)(b"y") == b"slow:y"  # the same connection goes on


async def test_losing_one_endpoint_fails_only_its_streams(mesh: Mesh, carts: Carts) -> None:
    """Long-lived streams on both endpoints; cart-b's sidecar stops (its connections are cut): the
    streams on cart-b fail, those on cart-a go on, and new calls go to cart-a."""
    a, b = Server("a"), Server("b")
    await carts.start((CART1, a), (CART2, b))
    async with channel(mesh) as ch:
        streams: dict[bytes, list[Any]] = {b"a": [], b"b": []}
        for _ in range(60):
            if all(len(v) >= 2 for v in streams.values()):
                break
            stream = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
            await stream.write(b"hi")
            streams[(await read(stream)).split(b":")[0]].append(stream)
        assert all(streams.values()), {k: len(v) for k, v in streams.items()}
        await mesh.sidecars["cartb"].drain(timeout=0, grace=0)
        for stream in streams[b"b"]:
            assert await stream.code() is not grpc.StatusCode.OK
        for stream in streams[b"a"]:
            await stream.write(b"still")
            assert await stream.read() == b"a:STILL"
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK
        for _ in range(10):
            assert (await unary(ch)(b"x")).startswith(b"a:")


class Refusing:
    """An HTTP/2 app that processes no stream: it refuses each (RST_STREAM REFUSED_STREAM), or
    with ``goaway`` answers the first with GOAWAY(last stream 0) and closes."""

    def __init__(self, goaway: bool = False) -> None:
        self.goaway = goaway
        self.refused = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.refused += 1
                        if self.goaway:
                            conn.close_connection(last_stream_id=0)
                            writer.write(conn.data_to_send())
                            return
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                writer.write(conn.data_to_send())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("goaway", [False, True], ids=["refused-stream", "goaway"])
async def test_unprocessed_streams_are_sent_again_to_the_other_endpoint(
    mesh: Mesh, carts: Carts, goaway: bool
) -> None:
    a, refusing = Server("a"), Refusing(goaway)
    write_mesh(mesh)
    await mesh.app(CART2, refusing.handle, APP)
    await mesh.sidecar("cartb", CART2, identity_of="cart")
    await carts.start((CART1, a))
    async with channel(mesh) as ch:
        replies = await asyncio.gather(*(unary(ch)(f"{i}".encode()) for i in range(40)))
    assert sorted(replies) == sorted(f"a:{i}".encode() for i in range(40))
    assert refusing.refused >= 1  # it was tried, refused, and the call went to cart-a
    frontend = mesh.sidecars["frontend"]
    assert all(st.outstanding == 0 for st in frontend.balancer.states.values())


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    yield r
    await r.stop()


def by_kind(spans: list[ReceivedSpan], kind: str) -> ReceivedSpan:
    found = [s for s in spans if s.trace_id == TRACE and s.kind == kind]
    assert len(found) == 1, spans
    return found[0]


async def test_a_call_gives_a_client_span_whose_child_is_the_server_span(
    mesh: Mesh, carts: Carts, receiver: Receiver
) -> None:
    a = Server("a")
    await carts.start((CART1, a))
    async with channel(mesh) as ch:
        call = unary(ch)(b"x", metadata=(("traceparent", f"00-{TRACE}-{APP_SPAN}-01"),))
        assert await call == b"a:x"
    spans = await receiver.wait_for(lambda s: sum(x.trace_id == TRACE for x in s) >= 2)
    client, server = by_kind(spans, "CLIENT"), by_kind(spans, "SERVER")
    assert client.service == "frontend.shop" and server.service == "cart.shop"
    assert client.parent_id == APP_SPAN  # the app's own trace, continued
    assert server.parent_id == client.span_id
    assert a.traceparents[-1].startswith(f"00-{TRACE}-{server.span_id}-")
    assert client.name == server.name == "test.Echo/Unary"
    assert client.attributes["rpc.system"] == "grpc"
    assert client.attributes["rpc.grpc.status_code"] == 0
    assert client.attributes["sidemesh.destination.id"] == "spiffe://cluster.local/ns/shop/sa/cart"
    assert client.attributes["sidemesh.destination.service"] == "cart.shop:80"
    assert client.attributes["network.peer.address"] == f"{mesh.addr(CART1)}:{APP}"
