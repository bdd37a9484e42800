"""HTTP/2 (gRPC) terminated in the outbound sidecar: a real grpcio client and real grpcio servers
through real sidecars (frontend -> two cart endpoints, mTLS with our CA).

The calls of ONE client channel (one HTTP/2 connection) are balanced per stream over both
endpoints, a slow endpoint gets fewer, an endpoint whose sidecar is down costs no failed call, the
Service's timeout answers DEADLINE_EXCEEDED, and each call gives a CLIENT span in the frontend's
sidecar whose child is the SERVER span in the cart's sidecar.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import typing
from collections.abc import AsyncIterator, Sequence
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
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.frame import SettingsFrame, WindowUpdateFrame

from proxy import http2, pool
from proxy.pool import Pool
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
{cart_b}---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
  annotations: {{sidemesh.io/timeout: "{timeout}"{retries}}}
spec:
  selector: {{app: cart}}
  ports: [{{name: grpc, port: 80, targetPort: 8080}}]
"""
CART_B = """\
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cartb-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.4, meshed: {meshed}, ports: [{{port: 8080}}]}}
"""
RETRIES = ', sidemesh.io/retries: "{n}", sidemesh.io/retry-non-idempotent: "{any}"'

ALLOW_HTTP = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  rules:
  - from: [{{serviceAccount: frontend}}]
    to: {{ports: [8080], http: {{methods: [{method}], paths: ["{path}"]}}}}
"""
ALLOW = ALLOW_HTTP.format(name="cart-grpc", method="POST", path="/test.Echo/*")


class Server:
    """A grpcio server answering /test.Echo/*: counts calls, waits ``delay`` before answering, and
    answers its next ``fail`` unary calls UNAVAILABLE (an abort: a trailers-only response)."""

    def __init__(
        self,
        name: str,
        delay: float = 0.0,
        fail: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        message: str | None = None,
    ) -> None:
        self.name = name
        self.message = message or f"{name} is down"
        self.delay = delay
        self.fail = fail
        self.code = code
        self.hits = 0
        self.answered = 0  # unary calls answered (not cancelled while waiting ``delay``)
        self.sizes: list[int] = []  # of the unary requests
        self.traceparents: list[str] = []
        self.trace_metadata: list[list[tuple[str, str]]] = []  # every trace header, as received
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Echo",
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                        "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                        "Join": grpc.stream_unary_rpc_method_handler(self.join),
                    },
                ),
            )
        )

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.hits += 1
        self.sizes.append(len(request))
        meta = dict(context.invocation_metadata() or ())
        self.traceparents.append(str(meta.get("traceparent", "")))
        self.trace_metadata.append(
            [
                (k, str(v))
                for k, v in context.invocation_metadata() or ()
                if k in ("traceparent", "tracestate")
            ]
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail > 0:
            self.fail -= 1
            await context.abort(self.code, self.message)
        context.set_trailing_metadata((("x-served-by", self.name),))
        self.answered += 1
        return self.name.encode() + b":" + request

    async def join(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        """A client stream: one answer, the messages joined, once the client is done."""
        self.hits += 1
        return b"+".join([request async for request in requests])

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        self.hits += 1
        async for request in requests:
            if self.fail > 0:  # with the request still streaming
                self.fail -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
            yield self.name.encode() + b":" + request.upper()
        context.set_trailing_metadata((("x-served-by", self.name),))


def write_mesh(
    mesh: Mesh,
    timeout: str = "0s",
    meshed: bool = True,
    two: bool = True,
    retries: int | None = None,
    any_method: bool = False,
) -> None:
    """``meshed``: whether cart-b is in the mesh (else: no identity, reached in plaintext); ``two``:
    whether cart-b is there at all; ``retries`` (and ``any_method``: retry-non-idempotent)."""
    cart_b = CART_B.format(net=mesh.net, meshed=str(meshed).lower()) if two else ""
    extra = "" if retries is None else RETRIES.format(n=retries, any=str(any_method).lower())
    mesh.write("workloads.yaml", MESH.format(net=mesh.net, timeout=timeout, cart_b=cart_b, retries=extra))


class Carts:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.servers: list[Server] = []

    async def start(
        self,
        *servers: tuple[int, Server],
        timeout: str = "0s",
        sidecars: bool = True,
        meshed: bool = True,
        two: bool = True,
        retries: int | None = None,
        any_method: bool = False,
    ) -> None:
        mesh = self.mesh
        write_mesh(mesh, timeout, meshed, two, retries, any_method)
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


async def test_the_service_timeout_runs_from_the_end_of_the_request(mesh: Mesh, carts: Carts) -> None:
    """As Envoy's route timeout: a client stream longer than the timeout is not cut (it ended
    DEADLINE_EXCEEDED at the timeout); the wait for its answer after it ends still is."""
    slow = Server("slow")
    await carts.start((CART1, slow), timeout="500ms")
    async with channel(mesh) as ch:
        join = ch.stream_unary("/test.Echo/Join")  # type: ignore[call-arg]  # raw bytes

        async def messages() -> AsyncIterator[bytes]:
            for i in range(5):
                await asyncio.sleep(0.3)
                yield b"%d" % i

        began = time.monotonic()
        assert await join(messages()) == b"0+1+2+3+4"
        assert time.monotonic() - began > 1.4


async def pooled(p: Pool[Any], n: int = 1) -> None:
    """Until ``n`` connections are idle in ``p`` (an app connection's end reaches the sidecar a
    moment after the client closed it)."""
    for _ in range(200):
        if p.idle_count() >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{p.idle_count()} idle connections, not {n}")


async def test_the_next_app_connection_takes_the_last_ones_connection_to_the_endpoint(
    mesh: Mesh, carts: Carts
) -> None:
    """Three channels one after the other: one mTLS connection between the sidecars, made once."""
    await carts.start((CART1, Server("a")), two=False)
    h2_pool = pool.h2_pool_of(mesh.sidecars["frontend"])
    for i in range(3):
        async with channel(mesh) as ch:
            assert await unary(ch)(f"{i}".encode()) == f"a:{i}".encode()
        await pooled(h2_pool)
    assert (h2_pool.opened, h2_pool.reused, h2_pool.idle_count()) == (1, 2, 1)


async def test_a_pooled_connection_its_endpoint_closed_is_not_used(mesh: Mesh, carts: Carts) -> None:
    await carts.start((CART1, Server("a")), two=False)
    h2_pool = pool.h2_pool_of(mesh.sidecars["frontend"])
    async with channel(mesh) as ch:
        assert await unary(ch)(b"1") == b"a:1"
    await pooled(h2_pool)
    await mesh.sidecars["carta"].drain(timeout=0)  # the cart's sidecar restarts: its connections close
    await mesh.sidecar("carta", CART1, identity_of="cart")
    await asyncio.sleep(0.2)  # (the close reaches the frontend's sidecar)
    async with channel(mesh) as ch:
        assert await unary(ch)(b"2") == b"a:2"
    assert (h2_pool.opened, h2_pool.reused) == (2, 0)


async def test_an_app_connection_closed_during_a_call_cancels_it_and_leaves_a_usable_pool(
    mesh: Mesh, carts: Carts
) -> None:
    """The call in flight is cancelled upstream (the app's server never answers it), though the
    connection it rode may go on in the pool; the next channels' calls all succeed."""
    slow = Server("slow", delay=0.5)
    await carts.start((CART1, slow), two=False)
    h2_pool = pool.h2_pool_of(mesh.sidecars["frontend"])
    _, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = _grpc_call_head("/test.Echo/Unary")
    conn.send_headers(1, head)
    conn.send_data(1, b"\x00\x00\x00\x00\x01x", end_stream=True)
    writer.write(conn.data_to_send())
    for _ in range(500):
        if slow.hits:
            break
        await asyncio.sleep(0.01)
    writer.close()  # with the call in flight
    await pooled(h2_pool)
    await asyncio.sleep(0.7)  # past the server's delay: an answer would have come by now
    assert (slow.hits, slow.answered) == (1, 0)
    for i in range(3):
        async with channel(mesh) as ch:
            assert await unary(ch)(f"{i}".encode()) == f"slow:{i}".encode()
        await pooled(h2_pool)  # (else grpcio may carry the next channel on this one's connection)
    assert (h2_pool.opened, h2_pool.reused) == (1, 3)  # the cancelled call's connection went on


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


async def test_an_unsampled_callers_trace_metadata_reaches_the_server_as_sent(
    mesh: Mesh, carts: Carts, receiver: Receiver
) -> None:
    """The caller said "not sampled": neither sidecar records the call, and its traceparent and
    tracestate reach the server unchanged, once each."""
    a = Server("a")
    await carts.start((CART1, a))
    sent = [("traceparent", f"00-{TRACE}-{APP_SPAN}-00"), ("tracestate", "vendor=a")]
    async with channel(mesh) as ch:
        assert await unary(ch)(b"x", metadata=tuple(sent)) == b"a:x"
    assert a.trace_metadata == [sent]
    await asyncio.sleep(0.3)
    assert [s for s in receiver.spans if s.trace_id == TRACE] == []


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
    assert client.attributes["network.peer.address"] == mesh.addr(CART1)
    assert client.attributes["network.peer.port"] == APP
    assert (client.attributes["rpc.service"], client.attributes["rpc.method"]) == ("test.Echo", "Unary")


# -- retries of responses: 502-504, and gRPC's UNAVAILABLE ------------------------------------


async def test_unavailable_calls_go_to_the_other_endpoint_with_retry_non_idempotent(
    mesh: Mesh, carts: Carts
) -> None:
    """cart-b answers every call UNAVAILABLE (trailers-only): with retries and
    retry-non-idempotent (gRPC calls are POST), each call that went there is sent to cart-a."""
    ok, down = Server("ok"), Server("down", fail=10**6)
    await carts.start((CART1, ok), (CART2, down), retries=2, any_method=True)
    async with channel(mesh) as ch:
        replies = await asyncio.gather(*(unary(ch)(f"{i}".encode()) for i in range(40)))
    assert sorted(replies) == sorted(f"ok:{i}".encode() for i in range(40))
    assert down.hits >= 1  # it was tried, answered UNAVAILABLE, and the call went to cart-a
    frontend = mesh.sidecars["frontend"]
    assert all(st.outstanding == 0 for st in frontend.balancer.states.values())
    dest = frontend.mesh_config().lookup_name("cart.shop:80")
    assert dest is not None
    st = frontend.balancer.state(next(e for e in dest.endpoints if e.address == mesh.addr(CART2)))
    assert st is not None and (st.failures >= 1 or st.ejections >= 1)  # UNAVAILABLE counts as a failure


async def test_an_endpoint_failing_calls_fast_does_not_attract_them(mesh: Mesh, carts: Carts) -> None:
    """INTERNAL at once (a failure, not retried) against OK in 20 ms: a gRPC status that says the
    server failed counts against the endpoint (its response is a 200), so it is ejected instead
    of winning every choice for being fast."""
    bad, good = Server("bad", fail=10**6, code=grpc.StatusCode.INTERNAL), Server("good", delay=0.02)
    await carts.start((CART1, bad), (CART2, good))
    async with channel(mesh) as ch:
        for _ in range(5):
            await asyncio.gather(*(unary(ch)(b"x") for _ in range(40)), return_exceptions=True)
    assert bad.hits + good.hits == 200
    assert bad.hits < 30, (bad.hits, good.hits)


def _grpc_call_head(path: str) -> list[tuple[str, str]]:
    """The head of a gRPC call to cart.shop, for a hand-driven h2 client."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "cart.shop"),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def _cart1_state(mesh: Mesh) -> Any:
    frontend = mesh.sidecars["frontend"]
    dest = frontend.mesh_config().lookup_name("cart.shop:80")
    assert dest is not None
    st = frontend.balancer.state(next(e for e in dest.endpoints if e.address == mesh.addr(CART1)))
    assert st is not None
    return frontend.balancer, st


async def test_a_streams_outcome_is_its_status_and_its_latency_the_time_to_its_head(
    mesh: Mesh, carts: Carts
) -> None:
    """A gRPC call's outcome waits for its status (in the trailers), but the latency the balancer
    learns is the time to the response head, not the stream's life: a 2 s bidi stream must not make
    its endpoint look 2 s slow. A client cancelling calls it got answers on is not the endpoint
    failing: no ejection."""
    await carts.start((CART1, Server("a")), two=False)
    async with channel(mesh) as ch:
        await unary(ch)(b"warm")
        stream = ch.stream_stream("/test.Echo/Bidi")()
        await stream.write(b"m")
        await read(stream)
        await asyncio.sleep(2.0)
        await stream.done_writing()
        assert await stream.read() is EOF
        balancer, st = _cart1_state(mesh)
        assert st.estimate(balancer.clock()) < 0.5, balancer.describe()
        for _ in range(6):
            stream = ch.stream_stream("/test.Echo/Bidi")()
            await stream.write(b"m")
            await read(stream)  # answered
            stream.cancel()  # the client gives up on a healthy endpoint
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    assert (st.ejections, st.failures) == (0, 0), balancer.describe()


async def test_without_retry_non_idempotent_unavailable_reaches_the_client(mesh: Mesh, carts: Carts) -> None:
    down = Server("down", fail=10**6)
    await carts.start((CART1, down), two=False, retries=2)
    async with channel(mesh) as ch:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x")
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "down is down"  # the app's own answer, as it was
    assert down.hits == 3  # never retried


async def test_a_request_body_over_64k_is_not_retried(mesh: Mesh, carts: Carts) -> None:
    """One endpoint, always UNAVAILABLE: a small call is tried 1 + 2 times (its body was kept), a
    100 KiB one once (its body was not kept: it cannot be sent again)."""
    down = Server("down", fail=10**6)
    await carts.start((CART1, down), two=False, retries=2, any_method=True)
    small, big = b"s" * 1024, b"b" * 100 * 1024
    async with channel(mesh) as ch:
        for message, tries in ((small, 3), (big, 1), (small, 3)):
            before = down.hits
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(message)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert down.hits - before == tries
            assert down.sizes[before:] == [len(message)] * tries  # the whole body each time
        down.fail = 1
        assert await unary(ch)(small) == b"down:" + small  # failed once, then answered


async def test_a_call_still_streaming_its_request_is_not_retried(mesh: Mesh, carts: Carts) -> None:
    """UNAVAILABLE comes while the client still streams: the request is not whole, so the
    answer goes to the client (not retried)."""
    flaky = Server("flaky", fail=1)
    await carts.start((CART1, flaky), two=False, retries=2, any_method=True)
    async with channel(mesh) as ch:
        stream = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
        await stream.write(b"hi")
        assert await stream.code() is grpc.StatusCode.UNAVAILABLE
        assert flaky.hits == 1
        assert await unary(ch)(b"x") == b"flaky:x"  # the next call is fine


async def test_retries_stop_when_the_budget_is_spent(mesh: Mesh, carts: Carts) -> None:
    from proxy.routers import budget_of

    down = Server("down", fail=10**6)
    await carts.start((CART1, down), two=False, retries=2, any_method=True)
    budget = budget_of(mesh.sidecars["frontend"], "cart.shop:80")
    while budget.try_withdraw():  # an outage has used it all
        pass
    async with channel(mesh) as ch:
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x")
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    # Spent: only what the 5 new calls deposit (20% of them: one retry) may be used.
    assert down.hits == 6


async def test_the_service_timeout_bounds_the_retries(mesh: Mesh, carts: Carts) -> None:
    """Each attempt takes 50 ms and fails: 10 retries would take over 500 ms, the timeout is
    300 ms. The call ends within it (the last UNAVAILABLE, or DEADLINE_EXCEEDED)."""
    down = Server("down", delay=0.05, fail=10**6)
    await carts.start((CART1, down), two=False, timeout="300ms", retries=10, any_method=True)
    async with channel(mesh) as ch:
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"x")
        elapsed = time.monotonic() - began
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < 1.0, elapsed
    assert 1 <= down.hits <= 6, down.hits  # not 1 + 10 times (2 or more unless the machine is slow)


ALLOW_GET = ALLOW_HTTP.format(name="cart-get", method="GET", path="/h2/*")


class H2App:
    """A plain HTTP/2 app (h2, not gRPC): answers every request ``status`` with its name as body."""

    def __init__(self, name: str, status: int, extra: Sequence[Any] = ()) -> None:
        self.name = name
        self.status = status
        self.extra = list(extra)  # more response header fields, as given to h2
        self.hits = 0
        self.heads: list[list[Any]] = []  # each request's header block, as hpack's tuples

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        body = self.name.encode()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.heads.append(list(event.headers))
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self.hits += 1
                        head = [(":status", str(self.status)), ("content-length", str(len(body)))]
                        conn.send_headers(event.stream_id, head + self.extra)
                        conn.send_data(event.stream_id, body, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def h2_gets(
    host: str,
    port: int,
    paths: list[str],
    extra: Sequence[tuple[bytes, bytes]] = (),
    heads: list[list[Any]] | None = None,
) -> list[tuple[int, bytes]]:
    """GET each path, all at once on one HTTP/2 connection (``extra``: more request headers, as
    they are given to h2): (status, body) of each; ``heads`` gets each response head as hpack's
    tuples."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    statuses: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    for path in paths:
        sid = conn.get_next_available_stream_id()
        head: list[Any] = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "cart.shop"),
            (":path", path),
        ]
        conn.send_headers(sid, head + list(extra), end_stream=True)
        bodies[sid] = b""
    writer.write(conn.data_to_send())
    ended: set[int] = set()
    try:
        while len(ended) < len(paths):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                    if heads is not None:
                        heads.append(list(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream {event.stream_id} reset: {event.error_code}")
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return [(statuses[sid], bodies[sid]) for sid in sorted(bodies)]


async def test_an_http2_get_answered_503_goes_to_the_other_endpoint(mesh: Mesh) -> None:
    """Plain HTTP/2 (an h2 client and h2 apps): GET is idempotent, so a 503 (with a body) from
    cart-b is dropped and the request sent to cart-a; no client sees the 503."""
    write_mesh(mesh, retries=2)
    mesh.write("allow-get.yaml", ALLOW_GET)
    ok, unavailable = H2App("ok", 200), H2App("unavailable", 503)
    await mesh.app(CART1, ok.handle, APP)
    await mesh.app(CART2, unavailable.handle, APP)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    await mesh.sidecar("cartb", CART2, identity_of="cart")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    results = await h2_gets(mesh.addr(FRONTEND), OUT, [f"/h2/{i}" for i in range(30)])
    assert results == [(200, b"ok")] * 30
    assert unavailable.hits >= 1 and ok.hits == 30
    frontend = mesh.sidecars["frontend"]
    assert all(st.outstanding == 0 for st in frontend.balancer.states.values())


async def test_never_indexed_fields_reach_the_app_never_indexed(mesh: Mesh) -> None:
    """RFC 7541 section 7.1.3: a field the client (or the app, in its response) sent never-indexed
    goes on never-indexed through both sidecars; credentials become never-indexed even when sent plain (as h2 and nghttp2 do);
    other fields stay indexable."""
    write_mesh(mesh, two=False)
    mesh.write("allow-get.yaml", ALLOW_GET)
    app = H2App("ok", 200, [NeverIndexedHeaderTuple(b"x-token", b"t0k"), (b"x-plain", b"p")])
    await mesh.app(CART1, app.handle, APP)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    extra = [
        NeverIndexedHeaderTuple(b"x-secret", b"s3cret"),
        (b"authorization", b"Bearer abc"),
        (b"cookie", b"id=1"),
        (b"x-plain", b"p"),
    ]
    responses: list[list[Any]] = []
    assert await h2_gets(mesh.addr(FRONTEND), OUT, ["/h2/a", "/h2/b"], extra, responses) == [(200, b"ok")] * 2
    assert len(app.heads) == 2
    for head in app.heads:
        fields = {bytes(h[0]): h for h in head}
        for name in (b"x-secret", b"authorization", b"cookie"):
            assert isinstance(fields[name], NeverIndexedHeaderTuple), (name, type(fields[name]))
        assert isinstance(fields[b"x-plain"], HeaderTuple) and fields[b"x-plain"].indexable
        assert fields[b"x-secret"][1] == b"s3cret" and fields[b"authorization"][1] == b"Bearer abc"
    assert len(responses) == 2  # and the other way, the app's response through both sidecars
    for head in responses:
        fields = {bytes(h[0]): h for h in head}
        assert isinstance(fields[b"x-token"], NeverIndexedHeaderTuple) and fields[b"x-token"][1] == b"t0k"
        assert isinstance(fields[b"x-plain"], HeaderTuple) and fields[b"x-plain"].indexable


async def test_a_retried_call_gives_one_client_span_with_its_retries(
    mesh: Mesh, carts: Carts, receiver: Receiver
) -> None:
    flaky = Server("flaky", fail=1)
    await carts.start((CART1, flaky), two=False, retries=2, any_method=True)
    async with channel(mesh) as ch:
        call = unary(ch)(b"x", metadata=(("traceparent", f"00-{TRACE}-{APP_SPAN}-01"),))
        assert await call == b"flaky:x"
    assert flaky.hits == 2
    spans = await receiver.wait_for(lambda s: sum(x.trace_id == TRACE for x in s) >= 3)  # + 2 SERVER
    client = by_kind(spans, "CLIENT")  # one, for the app's one call
    assert client.attributes["http.request.resend_count"] == 1
    assert client.attributes["rpc.grpc.status_code"] == 0
    servers = [s for s in spans if s.trace_id == TRACE and s.kind == "SERVER"]
    assert len(servers) == 2 and all(s.parent_id == client.span_id for s in servers)


async def test_an_apps_channel_may_hold_more_than_100_streams(mesh: Mesh, carts: Carts) -> None:
    """The app-facing side advertised h2's default of 100 concurrent streams: a channel holding 100
    long-lived streams (watches) queued every later call for good, where the direct connection
    serves them (Envoy allows 2^31-1)."""
    app = Server("a")
    await carts.start((CART1, app), two=False)
    async with channel(mesh) as ch:
        streams = [ch.stream_stream("/test.Echo/Bidi")() for _ in range(150)]  # type: ignore[call-arg]
        try:
            for i, stream in enumerate(streams):
                await stream.write(b"w%d" % i)
            first = await asyncio.wait_for(asyncio.gather(*(read(s) for s in streams)), 10)
            assert first[149] == b"a:W149"
            assert await asyncio.wait_for(unary(ch)(b"x"), 5) == b"a:x"  # and other calls still go
        finally:
            for stream in streams:
                stream.cancel()


async def test_a_grpc_message_ending_in_a_space_arrives_as_sent(mesh: Mesh, carts: Carts) -> None:
    """gRPC servers send a grpc-message ending in a space ("failed: " with an empty cause). Refused
    as malformed (RFC 9113 8.2.1), the call ended INTERNAL through the mesh where the direct
    connection gave the server's status; it passes, as Envoy lets it."""
    app = Server("a", fail=1, code=grpc.StatusCode.INVALID_ARGUMENT, message="not found: ")
    await carts.start((CART1, app), two=False)
    async with channel(mesh) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"x")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details() == "not found: "


@pytest.mark.parametrize("answered", [True, False])
async def test_an_app_connection_that_ends_with_streams_open_is_not_the_endpoints_failure(
    mesh: Mesh, carts: Carts, answered: bool
) -> None:
    """The app's HTTP/2 connection ends (the process exits: a FIN, no RST_STREAM) with streams
    open: each was released as the endpoint's failure (6 of them ejected a healthy endpoint). An
    answered stream counts as its answer; an unanswered one is neither a failure nor a success."""
    await carts.start((CART1, Server("a")), two=False)
    async with channel(mesh) as ch:
        await unary(ch)(b"warm")
    balancer, st = _cart1_state(mesh)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = _grpc_call_head("/test.Echo/Bidi")
    for _ in range(6):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, head)
        if answered:
            conn.send_data(sid, b"\x00\x00\x00\x00\x01m")  # one message: echoed, the stream open
    writer.write(conn.data_to_send())
    heard: set[int] = set()
    while answered and len(heard) < 6:
        data = await asyncio.wait_for(reader.read(65536), 5)
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                heard.add(event.stream_id)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        writer.write(conn.data_to_send())
    for _ in range(50):
        if st.outstanding == 6:
            break
        await asyncio.sleep(0.02)
    writer.close()  # the app exits
    for _ in range(50):
        if st.outstanding == 0:
            break
        await asyncio.sleep(0.02)
    assert (st.outstanding, st.ejections, st.failures) == (0, 0, 0), balancer.describe()


class _StopsReading(asyncio.Protocol):
    """An HTTP/2 endpoint that takes large windows (as a Go server advertises), then stops reading
    its socket (hung, partitioned)."""

    def __init__(self, keep: list[asyncio.Protocol]) -> None:
        keep.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # (uvloop's are no asyncio.Transport)
        settings = SettingsFrame(
            0,
            settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20, SettingsFrame.MAX_CONCURRENT_STREAMS: 1000},
        )
        self.transport.write(
            settings.serialize() + WindowUpdateFrame(0, window_increment=1 << 30).serialize()
        )

    def data_received(self, data: bytes) -> None:
        self.transport.write(SettingsFrame(0, flags=["ACK"]).serialize())
        self.transport.pause_reading()


async def test_an_endpoint_that_stops_reading_holds_only_its_own_streams(mesh: Mesh, carts: Carts) -> None:
    """RFC 9113 5.2: streams on one connection must not block each other. Uploads balanced to an
    endpoint that stopped reading back its socket up; the app connection's reader waited for every
    upstream it wrote to, so every later call on that channel, those to the healthy endpoint
    too, waited with them until its deadline. Now only the uploads wait (unacknowledged: the
    client's windows bound what the sidecar holds)."""
    a = Server("a")
    await carts.start((CART1, a), meshed=False, sidecars=False)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    keep: list[asyncio.Protocol] = []
    hung = await asyncio.get_running_loop().create_server(lambda: _StopsReading(keep), mesh.addr(CART2), APP)
    stop = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"z" * (256 * 1024)
        await stop.wait()

    async def call() -> str:
        try:
            return (await unary(ch)(b"x", timeout=3)).split(b":")[0].decode()
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)

    try:
        async with channel(mesh) as ch:
            join = ch.stream_unary("/test.Echo/Join")  # type: ignore[call-arg]
            uploads = [join(body()) for _ in range(10)]
            await asyncio.sleep(1.5)  # half of them on the endpoint that stopped reading
            assert not [u for u in uploads if u.done()]
            before = a.hits
            results = await asyncio.gather(*(call() for _ in range(10)))
            stop.set()
            for upload in uploads:
                upload.cancel()
    finally:
        hung.close()
        for endpoint in keep:
            assert isinstance(endpoint, _StopsReading)
            endpoint.transport.abort()
    assert set(results) <= {"a", "DEADLINE_EXCEEDED"} and results.count("a") >= 3, results
    assert a.hits - before == results.count("a")


async def test_a_connection_whose_stream_ids_are_spent_takes_no_new_streams(mesh: Mesh, carts: Carts) -> None:
    """RFC 9113 5.1.1: a client out of stream ids opens a new connection. A pooled connection
    lives on across app connections (2^30 streams: days of traffic); at its last id h2 raised out
    of the app connection's reader (every call on it failed) and the pool handed the spent
    connection to the next app connection, which failed the same way."""
    await carts.start((CART1, Server("a")), two=False)
    h2_pool = pool.h2_pool_of(mesh.sidecars["frontend"])
    async with channel(mesh) as ch:
        bidi = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
        await bidi.write(b"m0")
        assert (await read(bidi)).endswith(b":M0")
        spent = [  # the frontend sidecar's connection to cart's (the other: cart's to its app)
            up
            for up in gc.get_objects()
            if isinstance(up, http2._Up) and up.streams and isinstance(up.key, tuple) and up.key[0] == "mesh"
        ]
        assert len(spent) == 1
        spent[0].conn.highest_outbound_stream_id = http2.MAX_STREAM_ID - 2  # one id left
        replies = [await unary(ch)(f"{i}".encode()) for i in range(3)]  # the last id, then new ones
        assert replies == [b"a:0", b"a:1", b"a:2"]
        assert spent[0].closing and not spent[0].reusable()
        await bidi.write(b"m1")  # the streams open on it go on
        assert (await read(bidi)).endswith(b":M1")
        await bidi.done_writing()
        assert await bidi.code() is grpc.StatusCode.OK
        del bidi, spent  # (a call object keeps its channel's connection open)
    await pooled(h2_pool)
    async with channel(mesh) as ch:
        assert await unary(ch)(b"next") == b"a:next"
    assert h2_pool.opened == 2 and h2_pool.reused == 1  # the new connection, not the spent one


async def test_one_empty_data_frame_per_request_is_not_a_flood(mesh: Mesh, carts: Carts) -> None:
    """Empty DATA frames are counted in a row, and a request's HEADERS ends the row (as Envoy and
    Netty count them): a client that sends each (empty) body as an empty frame, then the end of
    the stream in another, was cut off with GOAWAY at its 11th request on the connection."""
    await carts.start((CART1, Server("a")), two=False)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    head = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"cart.shop"),
        (b":path", b"/test.Echo/Unary"),
        (b"content-type", b"text/plain"),
    ]
    answered = 0
    try:
        for _ in range(20):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, head)
            conn.send_data(sid, b"")
            conn.send_data(sid, b"", end_stream=True)
            writer.write(conn.data_to_send())
            over = False
            while not over:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, f"the sidecar closed the connection after {answered} requests"
                for event in conn.receive_data(data):
                    assert not isinstance(event, h2.events.ConnectionTerminated), (answered, event)
                    # (the app resets a request that is not gRPC)
                    over |= isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and (
                        event.stream_id == sid
                    )
                writer.write(conn.data_to_send())
            answered += 1
    finally:
        writer.close()
    assert answered == 20


async def test_a_stream_its_only_endpoint_refused_is_sent_to_it_again(mesh: Mesh) -> None:
    """RFC 9113 8.7: a refused stream was not processed and may be sent again. It marked its
    endpoint unreachable, so a Service with one endpoint answered UNAVAILABLE "upstream connection
    failed" for an endpoint that was fine."""
    refuse = [1]  # streams still to refuse
    heads: list[int] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    heads.append(event.stream_id)
                    if refuse[0]:
                        refuse[0] -= 1
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    else:
                        bodies[event.stream_id] = b""
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id in bodies:
                        bodies[event.stream_id] += event.data
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in bodies:
                    conn.send_headers(
                        event.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    )
                    conn.send_data(event.stream_id, bodies.pop(event.stream_id))
                    conn.send_headers(event.stream_id, [(b"grpc-status", b"0")], end_stream=True)
            writer.write(conn.data_to_send())
        writer.close()

    write_mesh(mesh, "0s", True, False, None, False)
    await mesh.app(CART1, app)
    await mesh.sidecar("carta", CART1, identity_of="cart")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    async with channel(mesh) as ch:
        assert await unary(ch)(b"\x00\x00\x00\x00\x01x", timeout=5) == b"\x00\x00\x00\x00\x01x"
    assert len(heads) == 2  # refused, then taken


@pytest.mark.parametrize("until", ["reset", "backed up"])
async def test_streams_opened_toward_an_endpoint_that_stopped_reading_are_bounded(
    mesh: Mesh, until: str
) -> None:
    """With the app connection's reader no longer waiting for a backed-up upstream, HEADERS (not
    flow-controlled; so are RST_STREAM and WINDOW_UPDATE) toward an endpoint that stopped reading
    piled up in the sidecar without bound, as fast as the app opened streams. Past
    MAX_WRITTEN_BACKED_UP the connection is reset. And when the app's connection ends, one still
    backed up is let go at once (a close waited to send what it held first: for good)."""
    write_mesh(mesh, "0s", False, True, None, False)  # cart-b outside the mesh (plain); cart-a absent
    keep: list[asyncio.Protocol] = []
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (inherited: backs up at once)
    listener.bind((mesh.addr(CART2), APP))
    hung = await asyncio.get_running_loop().create_server(lambda: _StopsReading(keep), sock=listener)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    _, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    # Literals sent without Huffman coding: this client's own coding of the 8 kB field was a third
    # of the test's time (the sidecar's still codes what it sends on).
    encode = conn.encoder.encode
    conn.encoder.encode = lambda headers, huffman=True: encode(headers, huffman=False)  # type: ignore[method-assign]
    head = [
        HeaderTuple(b":method", b"POST"),
        HeaderTuple(b":scheme", b"http"),
        HeaderTuple(b":authority", b"cart.shop"),
        HeaderTuple(b":path", b"/test.Echo/Unary"),
        HeaderTuple(b"content-type", b"application/grpc"),
        HeaderTuple(b"x-blob", b"b" * 8000),  # (larger than hpack's table: sent whole each time)
    ]

    def unsent() -> int:
        ups = [o for o in gc.get_objects() if isinstance(o, http2._Up) and o.key[0] == "plain"]
        return sum(
            up.pipe.transport.get_write_buffer_size() + up.pipe._out_len
            for up in ups
            if up.pipe.transport is not None and not up.pipe.transport.is_closing()
        )

    held: list[int] = []
    try:
        for _ in range(12):
            for _ in range(100):
                conn.send_headers(conn.get_next_available_stream_id(), head, end_stream=True)
            writer.write(conn.data_to_send())
            await asyncio.sleep(0.3)
            held.append(unsent())
            if until == "backed up" and held[-1] > 300_000:
                break  # (over the high-water mark, under the reset)
        writer.close()

        def kept(ups: list[http2._Up]) -> int:
            """Bytes still waiting on sockets not yet closed (closing ones too)."""
            return sum(
                up.pipe.transport.get_write_buffer_size()
                for up in ups
                if up.pipe.transport is not None and up.pipe.transport.get_extra_info("socket").fileno() != -1
            )

        def all_ups() -> list[http2._Up]:  # (a walk of the whole heap: a quarter of a second here)
            return [o for o in gc.get_objects() if isinstance(o, http2._Up) and o.key[0] == "plain"]

        # The app's connection is over: what still waits toward the endpoint is let go (a close
        # waited to send it first, for good: the socket and its buffer were never freed).
        ups = all_ups()
        for _ in range(150):
            if not kept(ups):
                break
            await asyncio.sleep(0.02)
        assert kept(all_ups()) == 0
    finally:
        writer.close()
        hung.close()
        for endpoint in keep:
            assert isinstance(endpoint, _StopsReading)
            endpoint.transport.abort()
    # (up to 9.6 MB of HEADERS sent: 256 KiB over the high-water mark, 1 MiB of frames, then a reset)
    assert max(held) > 0 and max(held) < 1_700_000, held
    assert until == "reset" or held[-1] > 300_000, held


async def _outcomes(ch: grpc.aio.Channel, n: int, concurrent: bool) -> dict[str, int]:
    """Which server answered each of ``n`` calls (or the error), one at a time or all at once."""

    async def one() -> str:
        try:
            return (await unary(ch)(b"x", timeout=5)).split(b":")[0].decode()
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    if concurrent:
        answers = await asyncio.gather(*(one() for _ in range(n)))
    else:
        answers = [await one() for _ in range(n)]
    return {a: answers.count(a) for a in set(answers)}


@pytest.mark.parametrize("concurrent", [False, True])
async def test_calls_go_to_the_other_endpoint_when_one_app_stopped(
    mesh: Mesh, carts: Carts, concurrent: bool
) -> None:
    """One of two apps stops, its sidecar stays (the app's container restarting). A round_robin
    grpcio channel over both apps sees the server go and loses no call; through the mesh neither:
    the stopped app's sidecar refuses each call it gets (REFUSED_STREAM: no app saw it) and the
    caller's sidecar sends it to the other endpoint. It answered a trailers-only UNAVAILABLE,
    which read as the app's own answer: half of the calls failed."""
    a, b = Server("a"), Server("b")
    await carts.start((CART1, a), (CART2, b))
    direct = grpc.aio.insecure_channel(
        f"ipv4:{mesh.addr(CART1)}:{APP},{mesh.addr(CART2)}:{APP}",
        options=[("grpc.lb_policy_name", "round_robin")],
    )
    async with direct, channel(mesh) as ch:
        assert set(await _outcomes(direct, 6, False)) == {"a", "b"}
        assert set(await _outcomes(ch, 10, False)) == {"a", "b"}
        await a.server.stop(0)
        await asyncio.sleep(0.5)
        n = 40 if concurrent else 20
        assert await _outcomes(direct, n, concurrent) == {"b": n}
        assert await _outcomes(ch, n, concurrent) == {"b": n}
