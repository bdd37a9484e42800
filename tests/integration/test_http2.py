"""HTTP/2 and gRPC through a sidecar pair (frontend -> cart), compared with the direct connection:
a real grpcio client and server (unary and bidirectional streaming, metadata and trailers, status
codes, large messages under flow control), per-stream authorization on one connection (denied:
PERMISSION_DENIED with the reason), and h2load as a second, independent HTTP/2 client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
import pytest
from grpc.aio import EOF  # type: ignore[attr-defined]
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.support.pipes import response_head

FRONTEND, CART = 1, 2
OUT = 18080
APP = 8080

ALLOW_ECHO = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-grpc, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080], http: {methods: [POST], paths: ["/test.Echo/*"]}}
"""


async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    meta = dict(context.invocation_metadata() or ())
    if request == b"fail":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    context.set_trailing_metadata((("x-trailer", "t-" + str(meta.get("x-in", ""))),))
    return request[::-1]


async def bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request.upper()
    context.set_trailing_metadata((("x-count", "done"),))


async def who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The identity headers that reached the app, as JSON."""
    meta = dict(context.invocation_metadata() or ())
    return json.dumps({k: meta.get(k) for k in ("x-forwarded-client-cert", "l5d-client-id")}).encode()


def handlers(service: str) -> grpc.GenericRpcHandler[bytes, bytes]:
    return grpc.method_handlers_generic_handler(
        service,
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, ALLOW_ECHO)
    yield m
    await m.close()


@pytest.fixture
async def pair(mesh: Mesh) -> AsyncIterator[tuple[str, int]]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
    server.add_generic_rpc_handlers((handlers("test.Echo"), handlers("test.Admin")))
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    yield mesh.addr(FRONTEND), OUT
    await server.stop(0)


def both(mesh: Mesh) -> list[tuple[str, int]]:
    return [(mesh.addr(CART), APP), (mesh.addr(FRONTEND), OUT)]


def unary_method(ch: grpc.aio.Channel, name: str) -> Any:
    return ch.unary_unary(name)  # type: ignore[call-arg]  # raw bytes: no (de)serializers


def bidi_call(ch: grpc.aio.Channel, name: str) -> Any:
    return ch.stream_stream(name)()  # type: ignore[call-arg]


def channel(addr: tuple[str, int]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"{addr[0]}:{addr[1]}", options=[("grpc.max_receive_message_length", 16 << 20)]
    )


async def test_unary_with_metadata_trailers_and_status(pair: tuple[str, int], mesh: Mesh) -> None:
    for addr in both(mesh):
        async with channel(addr) as ch:
            call = unary_method(ch, "/test.Echo/Unary")(b"hello", metadata=(("x-in", "42"),))
            assert await call == b"olleh"
            assert ("x-trailer", "t-42") in tuple(await call.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary_method(ch, "/test.Echo/Unary")(b"fail")
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing"


async def test_denied_call_is_permission_denied_and_the_connection_stays_usable(
    pair: tuple[str, int],
) -> None:
    async with channel(pair) as ch:
        assert await unary_method(ch, "/test.Echo/Unary")(b"ab") == b"ba"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary_method(ch, "/test.Admin/Unary")(b"x")
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        trailers: dict[str, Any] = dict(err.value.trailing_metadata() or ())  # type: ignore[arg-type]
        reason = trailers["sidemesh-denied-reason"]
        assert reason and reason in (err.value.details() or "")
        assert await unary_method(ch, "/test.Echo/Unary")(b"cd") == b"dc"  # same channel, same connection


async def test_bidi_streaming_both_ways_with_large_messages(pair: tuple[str, int], mesh: Mesh) -> None:
    big = bytes(range(97, 123)) * 200_000  # ~5 MB: many windows' worth, both directions
    for addr in both(mesh):
        async with channel(addr) as ch:
            call = bidi_call(ch, "/test.Echo/Bidi")
            for i in range(20):
                await call.write(f"msg{i}".encode())
                assert await call.read() == f"MSG{i}".encode()
            await call.write(big)
            assert await call.read() == big.upper()
            await call.done_writing()
            assert await call.read() is EOF
            assert ("x-count", "done") in tuple(await call.trailing_metadata())
            assert await call.code() is grpc.StatusCode.OK


async def test_many_concurrent_calls_on_one_connection(pair: tuple[str, int]) -> None:
    async with channel(pair) as ch:
        method = unary_method(ch, "/test.Echo/Unary")
        replies = await asyncio.gather(*(method(f"{i:04}".encode()) for i in range(200)))
        assert replies == [f"{i:04}".encode()[::-1] for i in range(200)]


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@pytest.fixture
def h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        pytest.skip("h2load not installed (Debian package nghttp2-client)")
    return path


async def test_h2load_as_an_independent_client(
    pair: tuple[str, int], mesh: Mesh, h2load: str, tmp_path: Path
) -> None:
    body = tmp_path / "req.bin"
    body.write_bytes(_grpc_frame(b"ping"))
    for addr in both(mesh):
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                h2load,
                "-n",
                "400",
                "-c",
                "2",
                "-m",
                "8",
                "-d",
                str(body),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                f"http://{addr[0]}:{addr[1]}/test.Echo/Unary",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "400 succeeded, 0 failed, 0 errored" in proc.stdout, proc.stdout + proc.stderr
        assert "status codes: 400 2xx" in proc.stdout, proc.stdout


async def test_h2load_denied_plain_http2_requests_get_403(pair: tuple[str, int], h2load: str) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [h2load, "-n", "20", "-c", "1", "-m", "4", f"http://{pair[0]}:{pair[1]}/admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "status codes: 0 2xx, 0 3xx, 20 4xx" in proc.stdout, proc.stdout + proc.stderr


async def test_plaintext_grpc_in_permissive_mode_is_authorized_per_call(mesh: Mesh) -> None:
    """No sidecar on the caller's side: cart's sidecar detects HTTP/2 on a plaintext connection
    and the unauthenticated caller is denied by the policy (frontend only), call by call."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers("test.Echo"),))
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    try:
        await mesh.sidecar("cart", CART, mode="permissive")
        async with channel((mesh.addr(CART), 15006)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary_method(ch, "/test.Echo/Unary")(b"x")
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            # A caller outside the mesh learns no policy names (the sidecar's log has them).
            details = err.value.details() or ""
            assert "callers outside the mesh are told no more" in details and "cart-grpc" not in details
    finally:
        await server.stop(0)


async def test_only_the_sidecar_tells_the_app_who_called(mesh: Mesh) -> None:
    """gRPC metadata is HTTP/2 headers: a caller's XFCC or l5d-client-id never reaches the app; an
    mTLS caller's identity is set in XFCC, a plaintext caller (permissive) gets none."""
    mesh.write("allow.yaml", ALLOW_ECHO + "  - from: [{unauthenticated: true}]\n    to: {ports: [8080]}\n")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers("test.Echo"),))
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    spoofed = (
        ("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/shop/sa/admin"),
        ("l5d-client-id", "admin.shop.serviceaccount.identity.linkerd.cluster.local"),
    )
    cart_id, frontend_id = (
        "spiffe://cluster.local/ns/shop/sa/cart",
        "spiffe://cluster.local/ns/shop/sa/frontend",
    )
    try:
        await mesh.sidecar("cart", CART, mode="permissive")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        for addr, expected in (
            ((mesh.addr(FRONTEND), OUT), f"By={cart_id};URI={frontend_id}"),  # through the pair: mTLS
            ((mesh.addr(CART), 15006), None),  # straight at cart's sidecar: plaintext
        ):
            async with channel(addr) as ch:
                for metadata in (spoofed, ()):
                    seen = json.loads(await unary_method(ch, "/test.Echo/Who")(b"", metadata=metadata))
                    assert seen == {"x-forwarded-client-cert": expected, "l5d-client-id": None}, (addr, seen)
    finally:
        await server.stop(0)


def _grpc_head(path: bytes = b"/test.Echo/Unary") -> list[tuple[bytes, bytes]]:
    """A gRPC request's HEADERS, written by hand (grpcio would not send the odd paths or the
    resets the tests need)."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"cart"),
        (b":path", path),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


async def _h2_client(
    addr: tuple[str, int],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, h2.connection.H2Connection]:
    reader, writer = await asyncio.open_connection(*addr)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return reader, writer, conn


async def _h2_status(addr: tuple[str, int], path: bytes) -> dict[bytes, bytes]:
    """One gRPC-shaped request with a raw ``:path`` (grpcio would not send a path like these);
    the response's headers (trailers-only answers included)."""
    reader, writer, conn = await _h2_client(addr)
    conn.send_headers(1, _grpc_head(path))
    conn.send_data(1, _grpc_frame(b"ping"), end_stream=True)
    writer.write(conn.data_to_send())
    got: dict[bytes, bytes] = {}
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    got.update((bytes(n), bytes(v)) for n, v in event.headers)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return got
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return got


@pytest.mark.parametrize(
    ("path", "grpc_status"),
    [
        (b"/test.Echo/../admin", b"7"),  # /admin for the policy: PERMISSION_DENIED
        (b"/test.Echo/%2e%2e/admin", b"7"),
        (b"/test.Echo/%zz", b"3"),  # a broken escape: INVALID_ARGUMENT
        (b"/test.Echo/x/../Unary", b"0"),  # /test.Echo/Unary for the policy and for the app
        (b"test.Echo/Unary", b"3"),  # RFC 9113 8.3.1: not starting with / (it was given one)
        (b"*", b"3"),  # asterisk form: OPTIONS only
    ],
)
async def test_stream_paths_are_normalized_before_authorization(
    pair: tuple[str, int], path: bytes, grpc_status: bytes
) -> None:
    got = await _h2_status(pair, path)
    assert got.get(b"grpc-status") == grpc_status, got


async def _terminated_by(addr: tuple[str, int], frames: bytes, reads: float = 2.0) -> list[h2.events.Event]:
    """Send the client preface (via h2) then ``frames`` written by hand; the connection's end events."""
    reader, writer, conn = await _h2_client(addr)
    ended: list[h2.events.Event] = []
    try:
        conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"cart"),
                              (b":path", b"/test.Echo/Unary"), (b"content-type", b"application/grpc")])  # fmt: skip
        writer.write(conn.data_to_send() + frames)
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + reads
        while not ended and asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), 0.2)
                if not data:
                    break
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    ended += [
                        e for e in conn.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated)
                    ]
                writer.write(conn.data_to_send())
    except ConnectionError:
        pass
    finally:
        writer.close()
    return ended


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(lambda: b"".join(DataFrame(1).serialize() for _ in range(50)), id="empty-data"),
        pytest.param(
            lambda: b"".join(
                PriorityFrame(2 * i + 3, depends_on=0, stream_weight=15).serialize() for i in range(3000)
            ),
            id="priority",
        ),
        pytest.param(
            lambda: b"".join(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(3000)),
            id="window-update",
        ),
    ],
)
async def test_a_frame_flood_gets_goaway(pair: tuple[str, int], flood: Callable[[], bytes]) -> None:
    """The CVE-2019-95xx family: frames that carry nothing (empty DATA without END_STREAM, which
    were queued without limit against a full window), PRIORITY beyond 100 per stream opened: the
    connection is closed with GOAWAY ENHANCE_YOUR_CALM (Envoy's and nghttp2's answer), and
    another connection is served as before."""
    ended = await _terminated_by(pair, flood())
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, ended
    ok = await _h2_status(pair, b"/test.Echo/Unary")
    assert ok.get(b"grpc-status") == b"0", ok


async def test_a_client_opening_its_windows_for_every_data_frame_is_not_a_flood(
    pair: tuple[str, int],
) -> None:
    """The WINDOW_UPDATE rule counts against the DATA frames sent: a client that opens both windows
    (stream and connection) for every frame it gets, on a 2 MB answer, is served to the end."""
    body = bytes(range(256)) * (8 << 10)
    message = _grpc_frame(body)
    reader, writer, conn = await _h2_client(pair)
    conn.send_headers(1, _grpc_head())
    answer, sent, updates, ended = bytearray(), 0, 0, None
    try:
        while ended is None:
            while sent < len(message) and (window := min(conn.local_flow_control_window(1), 16384)) > 0:
                chunk = message[sent : sent + window]
                sent += len(chunk)
                conn.send_data(1, chunk, end_stream=sent == len(message))
            writer.write(conn.data_to_send())
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the sidecar closed the connection"
            for event in conn.receive_data(data):
                assert not isinstance(event, (h2.events.ConnectionTerminated, h2.events.StreamReset)), event
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    answer += event.data
                    conn.increment_flow_control_window(event.flow_controlled_length)
                    with contextlib.suppress(h2.exceptions.StreamClosedError):  # ended in this read
                        conn.increment_flow_control_window(event.flow_controlled_length, 1)
                    updates += 2
                elif isinstance(event, h2.events.TrailersReceived):
                    ended = dict(event.headers)
        writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert ended.get(b"grpc-status") == b"0", ended
    assert bytes(answer) == _grpc_frame(body[::-1]) and updates > 200, updates


async def test_pings_are_answered_not_counted_as_a_flood(pair: tuple[str, int]) -> None:
    """grpc-go's bandwidth estimator sends a PING for every DATA frame it receives while none is
    outstanding: a busy stream of small messages draws thousands. They are answered; the
    connection goes on serving (a rate rule cut such clients off)."""
    pings = b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(3000))
    assert await _terminated_by(pair, pings, reads=1.0) == []
    ok = await _h2_status(pair, b"/test.Echo/Unary")
    assert ok.get(b"grpc-status") == b"0", ok


async def test_denials_wait_for_the_clients_window(mesh: Mesh) -> None:
    """A plain HTTP/2 denial's body goes as the client's window allows: a client that does not open
    its window any more left the sidecar sending past it (FlowControlError, the whole connection
    reset). Now the answers wait, and come once the window opens."""
    await mesh.sidecar("cart", CART, mode="permissive")  # the policy admits no plaintext: 403s
    reader, writer, conn = await _h2_client((mesh.addr(CART), 15006))
    ended: set[int] = set()
    received = 0
    try:
        for i in range(720):  # ~100 bytes of body each: the 65,535-byte window runs out on the way
            sid = 1 + 2 * i
            conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"cart"),
                                    (b":path", b"/denied")], end_stream=True)  # fmt: skip
            writer.write(conn.data_to_send())
            responded = False
            while not responded:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the sidecar closed the connection"
                for event in conn.receive_data(data):
                    assert not isinstance(event, h2.events.ConnectionTerminated), event
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                        responded = True
                    elif isinstance(event, h2.events.DataReceived):
                        received += event.flow_controlled_length  # never acknowledged (yet)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
        assert len(ended) < 720  # the window ran out: some answers wait
        conn.increment_flow_control_window(received)  # the client reads again
        writer.write(conn.data_to_send())
        while len(ended) < 720:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            writer.write(conn.data_to_send())
    finally:
        writer.close()


async def test_a_rapid_reset_flood_gets_goaway(pair: tuple[str, int]) -> None:
    """CVE-2023-44487: a client that opens streams and resets them at once, before any answer,
    makes the sidecar open upstream streams for nothing. After 500 streams, half of them reset
    within a second of opening, the connection is closed with GOAWAY ENHANCE_YOUR_CALM (Envoy's
    rule); a well-behaved client on another connection is not affected."""
    reader, writer, conn = await _h2_client(pair)
    head = _grpc_head()
    terminated: list[h2.events.ConnectionTerminated] = []
    try:
        for batch in range(30):
            for i in range(50):
                sid = 1 + 2 * (batch * 50 + i)
                conn.send_headers(sid, head)
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            writer.write(conn.data_to_send())
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), 0.2)
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    terminated += [
                        e for e in conn.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated)
                    ]
            if terminated:
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    assert terminated and terminated[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, terminated
    ok = await _h2_status(pair, b"/test.Echo/Unary")
    assert ok.get(b"grpc-status") == b"0", ok


async def test_calls_cancelled_late_do_not_trip_the_rapid_reset_rule(
    pair: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose calls time out (resets after the premature window, here shortened to 0.2 s
    with the stream count to 100 so the test is quick) keeps its connection."""
    from proxy import http2

    monkeypatch.setattr(http2, "PREMATURE_RESET_S", 0.2)
    monkeypatch.setattr(http2, "PREMATURE_RESET_MIN_STREAMS", 100)
    reader, writer, conn = await _h2_client(pair)
    head = _grpc_head()
    events: list[h2.events.Event] = []
    try:
        sid = 1
        for _ in range(3):
            opened = []
            for _ in range(50):
                conn.send_headers(sid, head)  # no body yet: the app waits, no answer comes
                opened.append(sid)
                sid += 2
            writer.write(conn.data_to_send())
            await asyncio.sleep(0.6)  # past the premature window (three times it: a busy machine
            # may open the streams in the sidecar a while after they were sent)
            for s in opened:
                conn.reset_stream(s, h2.errors.ErrorCodes.CANCEL)
            writer.write(conn.data_to_send())
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                events += conn.receive_data(await asyncio.wait_for(reader.read(65536), 0.1))
        conn.send_headers(sid, head)
        conn.send_data(sid, _grpc_frame(b"ping"), end_stream=True)
        writer.write(conn.data_to_send())
        while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in events):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the connection was closed"
            events += conn.receive_data(data)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert not [e for e in events if isinstance(e, h2.events.ConnectionTerminated)], events


BAD_ANSWERS: dict[bytes, list[tuple[bytes, bytes]]] = {
    b"/test.Echo/connection": [(b":status", b"200"), (b"connection", b"close")],
    b"/test.Echo/upper": [(b":status", b"200"), (b"X-Up", b"1")],
    b"/test.Echo/status": [(b":status", b"099")],
    b"/test.Echo/lf": [(b":status", b"200"), (b"x-a", b"1\r\nx-b: 2")],
    b"/test.Echo/space": [(b":status", b"200"), (b"x y", b"1")],  # not a token
}


async def _raw_h2_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/2 app that answers each bad path with its malformed head (h2 would not send it: no
    validation), /test.Echo/empty with 204 and then content, and never answers the rest."""
    config = h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers)[b":path"]
                    if path in BAD_ANSWERS:
                        conn.send_headers(event.stream_id, BAD_ANSWERS[path], end_stream=True)
                    elif path == b"/test.Echo/empty":
                        conn.send_headers(event.stream_id, [(b":status", b"204")])
                        conn.send_data(event.stream_id, b"content!", end_stream=True)
            writer.write(conn.data_to_send())


async def _malformed_answer_beside_a_long_call(
    mesh: Mesh, app: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], path: bytes
) -> None:
    """``app`` (a raw HTTP/2 server at cart) answers ``path`` malformed; the call to it, on stream
    3, gets INTERNAL naming the malformed answer (or a reset once its head went down), while a long
    call on stream 1 of the same connection goes on."""
    server = await asyncio.start_server(app, mesh.addr(CART), APP)
    try:
        await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        reader, writer, conn = await _h2_client((mesh.addr(FRONTEND), OUT))
        conn.send_headers(1, _grpc_head(b"/test.Echo/slow"))  # a long call, still open
        writer.write(conn.data_to_send())
        await asyncio.sleep(0.3)
        conn.send_headers(3, _grpc_head(path), end_stream=True)
        writer.write(conn.data_to_send())
        seen: list[h2.events.Event] = []
        with contextlib.suppress(TimeoutError):
            while not any(
                getattr(e, "stream_id", None) == 3
                and isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                for e in seen
            ):
                data = await asyncio.wait_for(reader.read(65536), 3)
                assert data, "the sidecar closed the connection"
                seen += conn.receive_data(data)
        writer.close()
    finally:
        server.close()
    mine = [e for e in seen if getattr(e, "stream_id", None) == 3]
    heads = [dict(e.headers) for e in mine if isinstance(e, h2.events.ResponseReceived)]
    answered = any(
        h.get(b"grpc-status") == b"13" and b"malformed" in h.get(b"sidemesh-denied-reason", b"")
        for h in heads
    )
    assert answered or any(isinstance(e, h2.events.StreamReset) for e in mine), mine
    assert not [
        e
        for e in seen
        if isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset))
        and getattr(e, "stream_id", 3) != 3
    ]


@pytest.mark.parametrize("path", [*BAD_ANSWERS, b"/test.Echo/empty"])
async def test_a_malformed_response_fails_its_stream_only(mesh: Mesh, path: bytes) -> None:
    """RFC 9113 8.1.1: a malformed response is a stream error. h2 checked responses per
    connection: one (a connection-specific field, an upper-case name, a status of 099, a CR LF
    in a value, content in a 204) reset every stream on the app's connection, and other
    callers' calls failed with it. Now that stream gets 502 (or a reset once its head went down)
    and the others go on."""
    await _malformed_answer_beside_a_long_call(mesh, _raw_h2_app, path)


def _raw_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


async def _empty_trailers_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/2 app that answers each request with a head, a message and trailers with no field
    (a HEADERS frame with an empty block, valid (RFC 9113 8.1), which h2 cannot send: by hand)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            answered = []
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(
                        event.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    )
                    conn.send_data(event.stream_id, _grpc_frame(b"ok"))
                    answered.append(event.stream_id)
            writer.write(conn.data_to_send() + b"".join(_raw_frame(1, 0x5, sid, b"") for sid in answered))


async def test_trailers_with_no_field_pass_through(mesh: Mesh) -> None:
    """Trailers with no field, as an app may send them, reach the caller as sent, through both
    sidecars (h2 could not send an empty header list on: an IndexError out of the stream's
    handler, and the call never ended)."""
    server = await asyncio.start_server(_empty_trailers_app, mesh.addr(CART), APP)
    try:
        await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        reader, writer, conn = await _h2_client((mesh.addr(FRONTEND), OUT))
        conn.send_headers(1, _grpc_head())
        conn.send_data(1, _grpc_frame(b"hi"), end_stream=True)
        writer.write(conn.data_to_send())
        seen: list[h2.events.Event] = []
        while not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in seen):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            seen += conn.receive_data(data)
            writer.write(conn.data_to_send())
        writer.close()
    finally:
        server.close()
    assert [type(e).__name__ for e in seen if getattr(e, "stream_id", None) == 1] == [
        "ResponseReceived",
        "DataReceived",
        "TrailersReceived",
        "StreamEnded",
    ]
    assert b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived)) == _grpc_frame(b"ok")
    assert [list(e.headers) for e in seen if isinstance(e, h2.events.TrailersReceived)] == [[]]


async def test_a_request_that_looks_informational_fails_its_stream_only(pair: tuple[str, int]) -> None:
    """A request whose first pseudo-header is :status 1xx: h2 took it for an informational
    response, which a server cannot receive, and ended the client's whole connection (GOAWAY).
    It is a malformed request (RFC 9113 8.1.1): that stream is answered INVALID_ARGUMENT, and the
    next call on the connection goes on. (Frames by hand: h2 will not send such a request.)"""
    reader, writer = await asyncio.open_connection(*pair)
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    writer.write(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _raw_frame(4, 0, 0, b"")  # SETTINGS
        + _raw_frame(1, 0x5, 1, encoder.encode([(b":status", b"100"), *_grpc_head()]))
        + _raw_frame(1, 0x4, 3, encoder.encode(_grpc_head()))
        + _raw_frame(0, 0x1, 3, _grpc_frame(b"hi"))
    )
    frames = h2.frame_buffer.FrameBuffer(server=False)
    frames.max_frame_size = 16384
    heads: dict[int, list[dict[bytes, bytes]]] = {}
    kinds: list[str] = []
    try:
        while len(heads.get(3, [])) < 2 and "GoAwayFrame" not in kinds:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            frames.add_data(data)
            for frame in frames:
                kinds.append(type(frame).__name__)
                if isinstance(frame, HeadersFrame):
                    heads.setdefault(frame.stream_id, []).append(dict(decoder.decode(frame.data, raw=True)))
                elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    writer.write(_raw_frame(4, 0x1, 0, b""))
                assert not isinstance(frame, GoAwayFrame), "the connection was ended"
    finally:
        writer.close()
    refused = heads[1][0]
    assert refused[b"grpc-status"] == b"3" and b"malformed request" in refused[b"sidemesh-denied-reason"]
    assert heads[3][0][b":status"] == b"200" and heads[3][-1][b"grpc-status"] == b"0"


def _with(head: list[tuple[bytes, bytes]], *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [*head, *extra]


BAD_REQUESTS: dict[str, list[tuple[bytes, bytes]]] = {
    "space at a value's end": _with(_grpc_head(), (b"x-note", b"hi ")),
    "tab at a value's start": _with(_grpc_head(), (b"x-note", b"\thi")),
    "NUL in a value": _with(_grpc_head(), (b"x-note", b"a\0b")),
    "upper-case name": _with(_grpc_head(), (b"X-Note", b"1")),
    "connection-specific field": _with(_grpc_head(), (b"connection", b"keep-alive")),
    "te other than trailers": [*_grpc_head()[:-1], (b"te", b"gzip")],
    "unknown pseudo-header": [(b":color", b"red"), *_grpc_head()],
    "pseudo-header after a field": [*_grpc_head()[:3], (b"x-a", b"1"), *_grpc_head()[3:]],
    "pseudo-header twice": _with(_grpc_head()[:4], (b":path", b"/test.Echo/Unary"), *_grpc_head()[4:]),
    "no :scheme": [h for h in _grpc_head() if h[0] != b":scheme"],
    "host differs from :authority": _with(_grpc_head(), (b"host", b"elsewhere")),
    "no :authority and no host": [
        (b":scheme", b"foo") if h[0] == b":scheme" else h for h in _grpc_head() if h[0] != b":authority"
    ],
    # RFC 9110 9.1: a token (it was taken as it came, up to 64 KiB, and became a route name in
    # /stats/routes and sidemesh top).
    "method that is no token": [(b":method", b"GET /x") if h[0] == b":method" else h for h in _grpc_head()],
    "method of 60,000 characters": [
        (b":method", b"M" * 60_000) if h[0] == b":method" else h for h in _grpc_head()
    ],
    # RFC 9113 8.3.1 (a URI's path: nghttp2, and so Envoy, refuses these; llhttp in HTTP/1.1): an
    # escape sequence in a path reached the terminal of whoever ran `sidemesh top`
    "escape sequence in :path": [
        (b":path", b"/x\x1b]0;title\x07\x1b[2J") if h[0] == b":path" else h for h in _grpc_head()
    ],
    "space in :path": [(b":path", b"/a b") if h[0] == b":path" else h for h in _grpc_head()],
    # RFC 9113 8.3.1: no userinfo in :authority (the credentials went into spans and access lines)
    "userinfo in :authority": [
        (b":authority", b"alice:s3cret@cart.shop:80") if h[0] == b":authority" else h for h in _grpc_head()
    ],
}


def _lenient_h2_client_config() -> h2.config.H2Configuration:
    """A client that sends what it is given (h2 would refuse to send the malformed heads)."""
    return h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


async def _one_bad_stream(
    addr: tuple[str, int], send_bad: Callable[[h2.connection.H2Connection], None]
) -> tuple[list[h2.events.Event], list[h2.events.Event]]:
    """On one connection: a long bidi call on stream 1 stays open; stream 3 is sent by
    ``send_bad``; once it is over, a good unary call on stream 5. Events of stream 3, and every
    event of the others (and of the connection)."""
    reader, writer = await asyncio.open_connection(*addr)
    conn = h2.connection.H2Connection(_lenient_h2_client_config())
    conn.initiate_connection()
    seen: list[h2.events.Event] = []

    async def until(done: Callable[[], bool]) -> None:
        while not done():
            writer.write(conn.data_to_send())
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            seen.extend(conn.receive_data(data))

    def over(sid: int) -> Callable[[], bool]:
        return lambda: any(
            getattr(e, "stream_id", None) == sid
            and isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
            for e in seen
        )

    try:
        conn.send_headers(1, _grpc_head(b"/test.Echo/Bidi"))
        conn.send_data(1, b"\x00\x00\x00\x00\x02hi")
        await until(lambda: any(isinstance(e, h2.events.DataReceived) and e.stream_id == 1 for e in seen))
        send_bad(conn)
        await until(over(3))
        conn.send_headers(5, _grpc_head(b"/test.Echo/Unary"))
        conn.send_data(5, b"\x00\x00\x00\x00\x02ok", end_stream=True)
        await until(over(5))
    finally:
        writer.close()
    return [e for e in seen if getattr(e, "stream_id", None) == 3], [
        e for e in seen if getattr(e, "stream_id", None) != 3
    ]


def _refused_as_malformed(mine: list[h2.events.Event]) -> bool:
    heads = [
        dict(e.headers)
        for e in mine
        if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived))
    ]
    return any(
        h.get(b"grpc-status") == b"3" and b"malformed request" in h.get(b"sidemesh-denied-reason", b"")
        for h in heads
    )


def _others_unharmed(others: list[h2.events.Event]) -> None:
    assert not [e for e in others if isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset))]
    on_5 = [e for e in others if getattr(e, "stream_id", None) == 5]
    assert b"ko" in b"".join(e.data for e in on_5 if isinstance(e, h2.events.DataReceived)), on_5
    assert any(
        isinstance(e, h2.events.TrailersReceived) and dict(e.headers).get(b"grpc-status") == b"0"
        for e in on_5
    ), on_5


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_a_malformed_request_fails_its_stream_only(pair: tuple[str, int], case: str) -> None:
    """RFC 9113 8.1.1: a malformed request is a stream error. h2 checked requests per connection:
    one (a metadata value ending in a space, an upper-case name, a connection-specific field, a
    stray or doubled pseudo-header...) ended the client's connection with GOAWAY, and every other
    call on it failed. Now that stream is answered INVALID_ARGUMENT (400 for plain HTTP/2), with
    the reason, and the others go on."""

    def send(conn: h2.connection.H2Connection) -> None:
        conn.send_headers(3, BAD_REQUESTS[case], end_stream=True)

    mine, others = await _one_bad_stream(pair, send)
    assert _refused_as_malformed(mine), mine
    _others_unharmed(others)


@pytest.mark.parametrize(
    "trailers",
    [[(b":path", b"/x")], [(b"X-Trailer", b"1")], [(b"x-trailer", b"1\r\nx-b: 2")], [(b"x-trailer", b"1 ")]],
    ids=["pseudo-header", "upper-case", "CR LF", "space at the end"],
)
async def test_malformed_request_trailers_fail_their_stream_only(
    pair: tuple[str, int], trailers: list[tuple[bytes, bytes]]
) -> None:
    """The same for a request's trailers, which came after the request went upstream: that stream
    is reset upstream and answered INVALID_ARGUMENT (or reset once its response began)."""

    def send(conn: h2.connection.H2Connection) -> None:
        conn.send_headers(3, _grpc_head(b"/test.Echo/Unary"))
        conn.send_data(3, b"\x00\x00\x00\x00\x02hi")
        conn.send_headers(3, trailers, end_stream=True)

    mine, others = await _one_bad_stream(pair, send)
    assert _refused_as_malformed(mine) or any(isinstance(e, h2.events.StreamReset) for e in mine), mine
    _others_unharmed(others)


async def test_malformed_trailers_after_the_sidecars_own_answer_leave_it_standing(
    pair: tuple[str, int],
) -> None:
    """A stream the sidecar answered itself (400 for a path without /) whose answer's body waits
    for the client's window, and whose request body goes on: malformed trailers then sent a
    second head on the stream (h2 refused it: an exception that aborted the client's whole
    connection). The answer stands; the connection and its other calls go on."""
    reader, writer = await asyncio.open_connection(*pair)
    conn = h2.connection.H2Connection(_lenient_h2_client_config())
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    conn.initiate_connection()
    seen: list[h2.events.Event] = []

    async def exchange(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (left := until - loop.time()) > 0:
            writer.write(conn.data_to_send())
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), left)
                assert data, "the sidecar closed the connection"
                seen.extend(conn.receive_data(data))

    try:
        conn.send_headers(1, _grpc_head(b"/test.Echo/Bidi"))  # open all along
        head = [(b":path", b"x") if h[0] == b":path" else h for h in _grpc_head()]
        conn.send_headers(3, [h for h in head if h[0] != b"content-type"])  # not gRPC: a 400 with a body
        conn.send_data(3, b"hello")
        await exchange(0.5)
        assert [dict(e.headers)[b":status"] for e in seen if isinstance(e, h2.events.ResponseReceived)] == [
            b"400"
        ]
        conn.send_headers(3, [(b"X-T", b"1")], end_stream=True)
        await exchange(0.5)
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535})
        await exchange(0.5)
    finally:
        writer.close()
    assert not [e for e in seen if isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset))], (
        seen
    )
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in seen), seen


@pytest.mark.parametrize(
    ("length", "body"),
    [(b"10", b"\x00\x00\x00\x00\x02hi"), (b"1", b"\x00\x00\x00\x00\x02hi"), (b"7", None)],
    ids=["shorter", "longer", "no content"],
)
async def test_a_request_body_that_disagrees_with_its_content_length_fails_its_stream_only(
    pair: tuple[str, int], length: bytes, body: bytes | None
) -> None:
    """RFC 9113 8.1.1: content-length other than the DATA's length makes the request malformed, a
    stream error. h2 checked it per connection: GOAWAY, every call on the connection failed."""

    def send(conn: h2.connection.H2Connection) -> None:
        head = [*_grpc_head(b"/test.Echo/Unary"), (b"content-length", length)]
        if body is None:
            conn.send_headers(3, head, end_stream=True)
        else:
            conn.send_headers(3, head)
            conn.send_data(3, body, end_stream=True)

    mine, others = await _one_bad_stream(pair, send)
    assert _refused_as_malformed(mine) or any(isinstance(e, h2.events.StreamReset) for e in mine), mine
    _others_unharmed(others)


async def _content_length_liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/2 app that answers /test.Echo/lie with content-length 100 and 5 bytes of content,
    and never answers anything else."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if (
                    isinstance(event, h2.events.RequestReceived)
                    and dict(event.headers)[b":path"] == b"/test.Echo/lie"
                ):
                    head = [
                        (b":status", b"200"),
                        (b"content-type", b"application/grpc"),
                        (b"content-length", b"100"),
                    ]
                    conn.send_headers(event.stream_id, head)
                    conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x00", end_stream=True)
            writer.write(conn.data_to_send())


async def test_a_response_body_that_disagrees_with_its_content_length_fails_its_stream_only(
    mesh: Mesh,
) -> None:
    await _malformed_answer_beside_a_long_call(mesh, _content_length_liar, b"/test.Echo/lie")


async def test_a_denied_head_gets_the_head_alone(pair: tuple[str, int]) -> None:
    """RFC 9110 9.3.2: the sidecar's own 403 to a HEAD carried its reason as content; between two
    sidecars the calling one (now checking content per stream) reset the stream as malformed."""
    reader, writer, conn = await _h2_client(pair)
    head = [(b":method", b"HEAD"), (b":scheme", b"http"), (b":authority", b"cart"), (b":path", b"/admin")]
    conn.send_headers(1, head, end_stream=True)
    writer.write(conn.data_to_send())
    seen: list[h2.events.Event] = []
    try:
        while not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in seen):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            seen += conn.receive_data(data)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert [dict(e.headers)[b":status"] for e in seen if isinstance(e, h2.events.ResponseReceived)] == [
        b"403"
    ]
    assert not [e for e in seen if isinstance(e, (h2.events.DataReceived, h2.events.StreamReset))], seen


async def test_connect_is_not_proxied(pair: tuple[str, int]) -> None:
    """As on HTTP/1.1 (405): CONNECT, extended CONNECT (RFC 8441, never offered) included, was
    forwarded to the app and authorized as the path /."""
    reader, writer, conn = await _h2_client(pair)
    conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"cart:443")])
    writer.write(conn.data_to_send())
    try:
        got = await response_head(reader, writer, conn)
    finally:
        writer.close()
    assert got[b":status"] == b"405", got


async def test_a_protocol_error_goaway_is_not_reset_away(pair: tuple[str, int]) -> None:
    """A connection error (a WINDOW_UPDATE of 0 on the connection) ends the connection with GOAWAY
    PROTOCOL_ERROR; the sidecar closed at once while the client's next frames were coming, and the
    reset took the GOAWAY with it (asyncio raises the reset before buffered bytes). It now
    half-closes and drops what comes for a moment, as HTTP/1.1 does."""
    reader, writer, conn = await _h2_client(pair)
    conn.send_headers(1, _grpc_head())
    writer.write(conn.data_to_send() + WindowUpdateFrame(0, window_increment=0).serialize())
    await writer.drain()
    ended: list[h2.events.Event] = []
    try:
        for i in range(3):
            await asyncio.sleep(0.2)
            writer.write(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())  # the client goes on
            await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            ended = [e for e in conn.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated)]
    finally:
        writer.close()
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, ended


async def test_the_sidecars_own_grpc_message_is_percent_encoded(pair: tuple[str, int]) -> None:
    """gRPC's grpc-message is percent-encoded: a reason that echoes a client's field name holding
    "%41" went out as is, and the client decoded it as "A"."""
    reader, writer, conn = await _h2_client(pair)
    conn.config.normalize_outbound_headers = conn.config.validate_outbound_headers = False  # as sent
    conn.send_headers(1, [*_grpc_head(), (b"X%41", b"1")], end_stream=True)
    writer.write(conn.data_to_send())
    trailers: dict[bytes, bytes] = {}
    try:
        while not trailers:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the sidecar closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    trailers = dict(event.headers)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert trailers[b"grpc-status"] == b"3", trailers
    assert b"'X%2541'" in trailers[b"grpc-message"], trailers
    assert b"'X%41'" in trailers[b"sidemesh-denied-reason"]  # (an HTTP header: as it is)
