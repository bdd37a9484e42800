"""Streams on one HTTP/2 connection through a sidecar pair do not get in each other's way, and the
sidecars keep what the peers said: a slow reader on one stream does not hold up the others (RFC
9113 5.2), a burst of calls beyond the peer's MAX_CONCURRENT_STREAMS waits for room instead of
failing, a complete response followed by RST_STREAM(NO_ERROR) arrives whole (RFC 9113 8.1), and a
call whose app went away before answering is UNAVAILABLE, as without the mesh. Each against the
direct connection first."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.integration.test_http2 import (
    ALLOW_ECHO,
    APP,
    CART,
    FRONTEND,
    OUT,
    _grpc_frame,
    _grpc_head,
    _h2_client,
    both,
    unary_method,
)

GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, ALLOW_ECHO)
    yield m
    await m.close()


async def _start_pair(mesh: Mesh) -> None:
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))


def _server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


async def _app_that_reads_one_stream_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """As grpc-go and nghttp2 servers: the connection's window is given back as data arrives, a
    stream's only when its handler reads. /test.Echo/Stuck's handler never reads; /test.Echo/Unary
    answers once its request has ended."""
    conn = _server()
    writer.write(conn.data_to_send())
    paths: dict[int, bytes] = {}
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    paths[event.stream_id] = dict(event.headers)[b":path"]
                elif isinstance(event, h2.events.DataReceived):
                    if paths.get(event.stream_id) == b"/test.Echo/Stuck":
                        conn.increment_flow_control_window(event.flow_controlled_length)  # the connection's
                    else:
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif (
                    isinstance(event, h2.events.StreamEnded)
                    and paths.get(event.stream_id) == b"/test.Echo/Unary"
                ):
                    conn.send_headers(event.stream_id, GRPC_HEAD)
                    conn.send_data(event.stream_id, _grpc_frame(b"pong"))
                    conn.send_headers(event.stream_id, [(b"grpc-status", b"0")], end_stream=True)
            writer.write(conn.data_to_send())


async def _unary_beside_a_stuck_upload(addr: tuple[str, int]) -> str:
    async with grpc.aio.insecure_channel(f"{addr[0]}:{addr[1]}") as channel:
        stuck = channel.stream_stream("/test.Echo/Stuck")()  # type: ignore[call-arg]

        async def feed() -> None:
            with contextlib.suppress(Exception):
                for _ in range(64):  # 1 MiB: far more than a stream's window
                    await stuck.write(b"x" * 16384)

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(1.0)  # every window on the way that it can fill, filled
        try:
            reply = await unary_method(channel, "/test.Echo/Unary")(b"y" * 2000, timeout=3)
            return f"ok {reply!r}"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        finally:
            stuck.cancel()
            feeder.cancel()


async def test_an_upload_the_app_does_not_read_holds_up_no_other_call(mesh: Mesh) -> None:
    """Data was acknowledged to the sender only once passed on, for the stream and the connection
    at once, and a connection's window was a stream's: one upload the app's handler did not read
    yet filled it, and every other call on that connection waited (DEADLINE_EXCEEDED after 3 s)."""
    server = await asyncio.start_server(_app_that_reads_one_stream_late, mesh.addr(CART), APP)
    try:
        await _start_pair(mesh)
        results = [await _unary_beside_a_stuck_upload(addr) for addr in both(mesh)]
    finally:
        server.close()
    assert results == ["ok b'pong'", "ok b'pong'"], results


async def _watch(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    for _ in range(20):
        yield b"w" * 65536


async def _pong(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b"pong"


async def _unary_beside_an_unread_watch(addr: tuple[str, int]) -> dict[bytes, bytes] | None:
    """Stream 1 a watch whose messages the client does not take yet (its stream's window stays
    shut; the connection's is given back, as grpc-go and C-core do), then stream 3 a unary call:
    its trailers, or None."""
    reader, writer, conn = await _h2_client(addr)
    conn.send_headers(1, _grpc_head(b"/test.Echo/Watch"))
    conn.send_data(1, _grpc_frame(b"w"), end_stream=True)
    writer.write(conn.data_to_send())
    await asyncio.sleep(1.0)
    conn.send_headers(3, _grpc_head(b"/test.Echo/Unary"))
    conn.send_data(3, _grpc_frame(b"u"), end_stream=True)
    writer.write(conn.data_to_send())
    try:
        deadline = time.monotonic() + 3
        while (remaining := deadline - time.monotonic()) > 0:
            data = await asyncio.wait_for(reader.read(65536), remaining)
            if not data:
                return None
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.increment_flow_control_window(event.flow_controlled_length)
                    if event.stream_id == 3:
                        conn.acknowledge_received_data(event.flow_controlled_length, 3)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == 3:
                    return dict(event.headers)
            writer.write(conn.data_to_send())
    except TimeoutError:
        pass
    finally:
        writer.close()
    return None


async def test_a_watch_the_client_does_not_read_holds_up_no_other_call(mesh: Mesh) -> None:
    """The same in the response direction: an unread server-streaming call took the connection's
    window and the unary call beside it got no answer."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Watch": grpc.unary_stream_rpc_method_handler(_watch),
                    "Unary": grpc.unary_unary_rpc_method_handler(_pong),
                },
            ),
        )
    )
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    try:
        await _start_pair(mesh)
        results = [await _unary_beside_an_unread_watch(addr) for addr in both(mesh)]
    finally:
        await server.stop(0)
    assert [r and r.get(b"grpc-status") for r in results] == [b"0", b"0"], results


async def _send_as_window_allows(
    conn: h2.connection.H2Connection,
    sid: int,
    body: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Send ``body`` on stream ``sid`` as the sidecar's window allows, reading (and acknowledging)
    what comes meanwhile; False when the sidecar closed the connection first."""
    while body:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window <= 0:
            writer.write(conn.data_to_send())
            if not (more := await reader.read(65536)):
                return False
            for event in conn.receive_data(more):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            continue
        conn.send_data(sid, body[:window])
        body = body[window:]
    return True


async def _read_late(
    addr: tuple[str, int], path: bytes, end_request: bool, wait: float
) -> tuple[int, dict[bytes, bytes], list[int]]:
    """One call (its request ended or not), its response read only after ``wait`` seconds (so it
    waits in the sidecars meanwhile), until a reset, or its trailers when the request ended: bytes
    received, trailers, reset codes."""
    reader, writer, conn = await _h2_client(addr)
    conn.send_headers(1, _grpc_head(path))
    conn.send_data(1, _grpc_frame(b"a"), end_stream=end_request)
    writer.write(conn.data_to_send())
    await asyncio.sleep(wait)
    received, trailers, resets = 0, {}, []
    with contextlib.suppress(TimeoutError, ConnectionError):
        while not resets and not (end_request and trailers):
            data = await asyncio.wait_for(reader.read(65536), 3)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    resets.append(event.error_code)
            writer.write(conn.data_to_send())
    writer.close()
    return received, trailers, resets


async def _answer_early_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server answering a client-streaming call before the request ended (100 KB, then
    grpc-status 3), then RST_STREAM(NO_ERROR), as grpc-go and C-core servers do (RFC 9113 8.1)."""
    conn = _server()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            events = conn.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            for event in events:
                if not isinstance(event, h2.events.RequestReceived):
                    continue
                sid = event.stream_id
                conn.send_headers(sid, GRPC_HEAD)
                if not await _send_as_window_allows(conn, sid, _grpc_frame(b"z" * 100_000), reader, writer):
                    return
                conn.send_headers(
                    sid, [(b"grpc-status", b"3"), (b"grpc-message", b"bad input")], end_stream=True
                )
                conn.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
            writer.write(conn.data_to_send())


async def test_a_complete_response_then_a_reset_no_error_arrives_whole(mesh: Mesh) -> None:
    """RFC 9113 8.1: a client must not discard a response for an RST_STREAM(NO_ERROR) after it.
    The sidecar did: what of the response still waited for the caller's window was dropped with
    the trailers (65,535 of 100,005 bytes, no grpc-status: the caller saw INTERNAL)."""
    server = await asyncio.start_server(_answer_early_then_reset, mesh.addr(CART), APP)
    try:
        await _start_pair(mesh)
        results = [
            await _read_late(addr, b"/test.Echo/Up", end_request=False, wait=1.0) for addr in both(mesh)
        ]
    finally:
        server.close()
    expected = (
        100_005,
        {b"grpc-status": b"3", b"grpc-message": b"bad input"},
        [h2.errors.ErrorCodes.NO_ERROR],
    )
    assert results == [expected, expected], results


BURST = 700  # calls at once on one connection: 7 of the peer's 100 streams per connection


async def _slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(1.0)
    return request


async def _slow_calls(
    mesh: Mesh, calls: int, options: tuple[tuple[str, int], ...] = ()
) -> collections.Counter[str]:
    """``calls`` unary calls at once on one grpcio channel through the pair, to a grpcio app (server
    ``options``) whose handler takes a second: the outcomes, counted."""
    server = grpc.aio.server(options=list(options), maximum_concurrent_rpcs=None)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Slow": grpc.unary_unary_rpc_method_handler(_slow)}
            ),
        )
    )
    server.add_insecure_port(f"{mesh.addr(CART)}:{APP}")
    await server.start()
    try:
        await _start_pair(mesh)
        async with grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}") as channel:
            method = unary_method(channel, "/test.Echo/Slow")

            async def one() -> str:
                try:
                    await method(b"x", timeout=20)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"

            return collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))
    finally:
        await server.stop(0)


async def test_a_burst_beyond_the_peers_stream_limit_waits_for_room(mesh: Mesh) -> None:
    """A stream that found no room on 3 connections in a row (the ones the streams waiting with it
    filled) counted as not connected: with 700 calls at once 160 got UNAVAILABLE, from a healthy
    endpoint, and spent the retry budget and the endpoint's standing with the balancer."""
    results = await _slow_calls(mesh, BURST)
    assert results == {"OK": BURST}, results


async def _app_that_dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes the call, then goes away (its connection aborted) before answering."""
    conn = _server()
    writer.write(conn.data_to_send())
    with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    writer.write(conn.data_to_send())
                    await asyncio.sleep(0.2)
                    writer.transport.abort()
                    return
            writer.write(conn.data_to_send())


async def test_a_call_whose_app_goes_away_before_answering_is_unavailable(mesh: Mesh) -> None:
    """Without the mesh a lost transport is UNAVAILABLE; the sidecar reset the stream with
    INTERNAL_ERROR, which grpcio reports as INTERNAL (a server bug, not retried by retry policies)."""
    server = await asyncio.start_server(_app_that_dies, mesh.addr(CART), APP)
    try:
        await _start_pair(mesh)
        codes = []
        for host, port in both(mesh):
            async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                try:
                    await unary_method(channel, "/test.Echo/Unary")(b"x", timeout=5)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
    finally:
        server.close()
    assert codes == ["UNAVAILABLE", "UNAVAILABLE"], codes


async def _answer_then_shut_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers its one call whole (150 KB and trailers, as the sidecar's window allows), then shuts
    down gracefully: GOAWAY NO_ERROR and close, as a server stopping after its last stream."""
    conn = _server()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if not isinstance(event, h2.events.StreamEnded):
                    continue
                sid = event.stream_id
                conn.send_headers(sid, GRPC_HEAD)
                if not await _send_as_window_allows(conn, sid, _grpc_frame(b"z" * 150_000), reader, writer):
                    return
                conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                conn.close_connection()
                writer.write(conn.data_to_send())
                await writer.drain()
                return
            writer.write(conn.data_to_send())


async def test_a_complete_response_outlives_the_apps_graceful_close(mesh: Mesh) -> None:
    """RFC 9113 6.8: streams up to a GOAWAY's last one complete. The app's whole response was in
    the sidecars, waiting for a caller that reads slowly, when the app closed: the sidecar took
    the connection's end as a failure and reset the caller's stream (65,535 of 150,005 bytes,
    INTERNAL_ERROR), which it would not see without the mesh."""
    server = await asyncio.start_server(_answer_then_shut_down, mesh.addr(CART), APP)
    try:
        await _start_pair(mesh)
        results = [
            await _read_late(addr, b"/test.Echo/Down", end_request=True, wait=1.5) for addr in both(mesh)
        ]
    finally:
        server.close()
    expected = (150_005, {b"grpc-status": b"0"}, [])
    assert results == [expected, expected], results


async def test_an_app_with_a_low_stream_limit_gets_no_more_streams_than_it_allows(mesh: Mesh) -> None:
    """A new connection took up to 100 streams before the app's SETTINGS said how many it takes: a
    grpcio server limited to 1 (grpc.max_concurrent_streams) reset the others (ENHANCE_YOUR_CALM)
    and 19 of 20 calls failed RESOURCE_EXHAUSTED. Now one stream goes before the SETTINGS, the rest
    wait for them (and for room), as gRPC clients do."""
    results = await _slow_calls(mesh, 20, (("grpc.max_concurrent_streams", 1),))
    assert results == {"OK": 20}, results


async def test_calls_before_the_apps_settings_share_one_connection(mesh: Mesh) -> None:
    """A connection takes one stream until the peer's SETTINGS: calls arriving meanwhile (an app
    slow to send its preface) each opened a connection of their own (8 calls, 8 connections to the
    app; RFC 9113 9.1: one per host and port). They wait for that connection's SETTINGS instead."""
    accepted: list[float] = []

    async def slow_preface(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        conn = _server()
        await asyncio.sleep(0.4)  # a busy app: its SETTINGS come late
        writer.write(conn.data_to_send())
        with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        conn.send_headers(event.stream_id, GRPC_HEAD)
                        conn.send_data(event.stream_id, _grpc_frame(b"pong"))
                        conn.send_headers(event.stream_id, [(b"grpc-status", b"0")], end_stream=True)
                writer.write(conn.data_to_send())

    async def calls(addr: tuple[str, int], n: int = 8) -> int:
        reader, writer, conn = await _h2_client(addr)
        writer.write(conn.data_to_send())

        async def send() -> None:
            for i in range(n):
                conn.send_headers(1 + 2 * i, _grpc_head(b"/test.Echo/Unary"))
                conn.send_data(1 + 2 * i, _grpc_frame(b"a"), end_stream=True)
                writer.write(conn.data_to_send())
                await asyncio.sleep(0.04)

        sender = asyncio.create_task(send())
        done = 0
        with contextlib.suppress(TimeoutError):
            while done < n:
                data = await asyncio.wait_for(reader.read(65536), 5)
                if not data:
                    break
                done += sum(isinstance(e, h2.events.StreamEnded) for e in conn.receive_data(data))
                writer.write(conn.data_to_send())
        await sender
        writer.close()
        return done

    server = await asyncio.start_server(slow_preface, mesh.addr(CART), APP)
    results = []
    try:
        await _start_pair(mesh)
        for addr in both(mesh):
            accepted.clear()
            results.append((await calls(addr), len(accepted)))
    finally:
        server.close()
    assert results == [(8, 1), (8, 1)], results  # (calls answered, connections the app accepted)


async def _app_that_logs_frames(
    seen: list[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Logs each request DATA event as ``data <n> end|open``; answers a body whose last DATA
    carries END_STREAM (a plain HTTP/2 response, no trailers)."""
    conn = _server()
    writer.write(conn.data_to_send())
    with contextlib.closing(writer), contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    seen.append(f"data {len(event.data)} {'end' if event.stream_ended else 'open'}")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-length", b"2")])
                    conn.send_data(event.stream_id, b"ok", end_stream=True)
            writer.write(conn.data_to_send())


async def _post_ending_on_data(addr: tuple[str, int], body: bytes) -> list[str]:
    """A request whose body's last DATA frame carries END_STREAM (frames of at most 16 KiB); the
    response's DATA events, logged as the app logs the request's."""
    reader, writer, conn = await _h2_client(addr)
    conn.send_headers(1, _grpc_head())
    for start in range(0, len(body), 16384):
        conn.send_data(1, body[start : start + 16384], end_stream=start + 16384 >= len(body))
    writer.write(conn.data_to_send())
    got: list[str] = []
    with contextlib.closing(writer):
        while data := await asyncio.wait_for(reader.read(65536), 10):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got.append(f"data {len(event.data)} {'end' if event.stream_ended else 'open'}")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return got
            writer.write(conn.data_to_send())
    return got


def _ends_once_at_the_last(frames: list[str], size: int) -> bool:
    ends = [f.endswith(" end") for f in frames]
    return ends.count(True) == 1 and ends[-1] and sum(int(f.split()[1]) for f in frames) == size


async def test_data_that_ends_its_stream_stays_one_frame_both_ways(mesh: Mesh) -> None:
    """A body's last DATA with END_STREAM reaches the other side so, as directly: the sidecars
    sent the data, then an empty DATA to end the stream (one frame more to make, send and parse on
    each hop, twice per call: ~5% of a unary call's Python). A body the sidecar sends in pieces
    (over the 16 KiB frame size) ends on its last piece only."""
    seen: list[str] = []
    server = await asyncio.start_server(lambda r, w: _app_that_logs_frames(seen, r, w), mesh.addr(CART), APP)
    try:
        await _start_pair(mesh)
        answers = [await _post_ending_on_data(addr, _grpc_frame(b"ping")) for addr in both(mesh)]
        assert answers == [["data 2 end"], ["data 2 end"]]
        assert seen == ["data 9 end", "data 9 end"]  # direct, then through the pair
        seen.clear()
        large = _grpc_frame(b"x" * 40_000)
        for addr in both(mesh):
            assert await _post_ending_on_data(addr, large) == ["data 2 end"]
            assert _ends_once_at_the_last(seen, len(large)), seen
            seen.clear()
    finally:
        server.close()
