"""bench.http_floor's proxy pair: what it measures must be a working HTTP/1.1 pair over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from bench import http_floor, l4
from sidemesh.spiffe import SpiffeId
from tests.support import pki


def _write(svid_dir: Path, svid: object) -> None:
    svid_dir.mkdir()
    (svid_dir / "cert-chain.pem").write_bytes(svid.chain_pem)  # type: ignore[attr-defined]
    (svid_dir / "key.pem").write_bytes(svid.key_pem)  # type: ignore[attr-defined]


class _Upstream:
    """An HTTP/1.1 server that answers /chunked in chunks and anything else with a length."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        heads = self.heads
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await self.serve(reader, writer, heads)
        writer.close()

    @staticmethod
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            heads.append(head)
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            body = await reader.readexactly(length)
            if head.startswith(b"GET /chunked"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n"
                    b"0\r\nX-Trailer: t\r\n\r\n"
                )
            else:
                writer.write(
                    b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + 2, b"ok" + body)
                )
            await writer.drain()


async def test_the_floor_pair_relays_requests_and_responses_over_mtls(tmp_path: Path) -> None:
    await _relay_over_mtls(tmp_path)


def test_the_floor_pair_relays_under_uvloop_as_the_bench_runs_it(tmp_path: Path) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_relay_over_mtls(tmp_path))


async def _relay_over_mtls(tmp_path: Path) -> None:
    """Keep-alive requests through the HTTP/1.1 pair: a body with a length, a chunked answer with a
    trailer (passed on, and not into the next message), then a third request."""
    authority = pki.make_authority(tmp_path / "ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/a/sa/x")).bundle_pem
    )
    _write(
        tmp_path / "client",
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")),
    )
    _write(
        tmp_path / "server",
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")),
    )
    upstream = _Upstream()
    heads = upstream.heads
    up_port = await upstream.start()
    server = await http_floor.serve_floor(
        "server", ("127.0.0.1", 0), ("127.0.0.1", up_port), tmp_path / "server", bundle
    )
    client = await http_floor.serve_floor(
        "client", ("127.0.0.1", 0), ("127.0.0.1", server.port), tmp_path / "client", bundle
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: cart\r\nContent-Length: 3\r\n\r\nabc")
        answer = await asyncio.wait_for(reader.readuntil(b"okabc"), 5)
        assert answer.startswith(b"HTTP/1.1 201 ") and b"Content-Length: 5\r\n" in answer
        writer.write(b"GET /chunked HTTP/1.1\r\nHost: cart\r\n\r\n")  # the same connection: kept alive
        answer = await asyncio.wait_for(reader.readuntil(b"0\r\nX-Trailer: t\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
        writer.write(b"POST /y")  # a target in two reads
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"y HTTP/1.1\r\nHost: cart\r\nContent-Length: 1\r\n\r\nz")
        answer = await asyncio.wait_for(reader.readuntil(b"okz"), 5)
        assert answer.startswith(b"HTTP/1.1 201 ") and b"X-Trailer" not in answer
        assert [h.split(b"\r\n")[0] for h in heads] == [
            b"POST /x HTTP/1.1",
            b"GET /chunked HTTP/1.1",
            b"POST /yy HTTP/1.1",
        ]
        writer.close()
        await writer.wait_closed()
    finally:
        for s in (client, server, upstream):
            await s.close()


@pytest.mark.parametrize("foreign", ["client", "server"])
async def test_the_floor_pair_refuses_a_peer_without_a_certificate_of_the_bundle(
    tmp_path: Path, foreign: str
) -> None:
    """Either proxy presenting another CA's SVID: the handshake fails, nothing is relayed."""
    authority = pki.make_authority(tmp_path / "ca")
    other = pki.make_authority(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/a/sa/x")).bundle_pem
    )
    for role, sa in (("client", "frontend"), ("server", "cart")):
        signer = other if role == foreign else authority
        _write(
            tmp_path / role, pki.make_svid(signer, SpiffeId.parse(f"spiffe://cluster.local/ns/shop/sa/{sa}"))
        )
    upstream = _Upstream()
    heads = upstream.heads
    up_port = await upstream.start()
    server = await http_floor.serve_floor(
        "server", ("127.0.0.1", 0), ("127.0.0.1", up_port), tmp_path / "server", bundle
    )
    client = await http_floor.serve_floor(
        "client", ("127.0.0.1", 0), ("127.0.0.1", server.port), tmp_path / "client", bundle
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing relayed
        assert heads == []
        writer.close()
        await writer.wait_closed()
    finally:
        for s in (client, server, upstream):
            await s.close()


def test_the_floor_proxy_command_says_what_is_wrong_with_an_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        http_floor.main(
            [
                "proxy",
                "--role",
                "client",
                "--listen",
                "nope",
                "--target",
                "h:1",
                "--svid",
                "d",
                "--bundle",
                "b",
            ]
        )
    assert exc.value.code == 2
    assert "expected HOST:PORT, got 'nope'" in capsys.readouterr().err


def test_the_floor_pair_is_a_pair_of_the_bench_setup(tmp_path: Path) -> None:
    setup = l4.Setup("127.9.9", tmp_path)
    assert setup.pair("floor") == {}
    setup.extra["floor"] = {"client": "c", "server": "s"}  # type: ignore[dict-item]
    assert setup.pair("floor") == {"client": "c", "server": "s"}
    assert l4.LABELS["floor"] == "Python floor pair"


async def test_the_http2_floor_pair_carries_grpc_calls_over_mtls(tmp_path: Path) -> None:
    """grpcio's client and server through the HTTP/2 floor pair: unary calls, one after another and
    eight at once on the one connection, each answered with its own bytes and status OK."""
    import grpc
    import grpc.aio

    authority = pki.make_authority(tmp_path / "ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/a/sa/x")).bundle_pem
    )
    _write(
        tmp_path / "client",
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")),
    )
    _write(
        tmp_path / "server",
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")),
    )

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo:" + request

    app = grpc.aio.server()
    app.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    app_port = app.add_insecure_port("127.0.0.1:0")
    await app.start()
    server = await http_floor.serve_floor(
        "server", ("127.0.0.1", 0), ("127.0.0.1", app_port), tmp_path / "server", bundle, "h2"
    )
    client = await http_floor.serve_floor(
        "client", ("127.0.0.1", 0), ("127.0.0.1", server.port), tmp_path / "client", bundle, "h2"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{client.port}") as channel:
            call = channel.unary_unary("/t.Echo/Unary")
            assert await asyncio.wait_for(call(b"one"), 5) == b"echo:one"
            answers = await asyncio.wait_for(asyncio.gather(*(call(b"%d" % i) for i in range(8))), 5)
            assert answers == [b"echo:%d" % i for i in range(8)]
            big = bytes(range(256)) * 1024  # 256 KiB: beyond a stream's 64 KiB window on every hop
            assert await asyncio.wait_for(call(big), 10) == b"echo:" + big
            pieces = await asyncio.wait_for(asyncio.gather(*(call(big[: 40000 + i]) for i in range(6))), 10)
            assert pieces == [
                b"echo:" + big[: 40000 + i] for i in range(6)
            ]  # 240 KB at once on one connection
    finally:
        for s in (client, server):
            await s.close()
        await app.stop(0)


def test_the_report_keeps_the_wrk_and_grpc_figures_of_a_pair_apart(tmp_path: Path) -> None:
    """wrk's runs and h2load's share names (c1): each table reads its own."""

    def run(value: float) -> dict[str, object]:
        return {"rps": value, "p50_us": 1000.0, "pair_cpu_us_per_request": 100.0, "rounds": [value]}

    def call(value: float) -> dict[str, object]:
        return {"calls_per_s": value, "pair_cpu_us_per_call": 500.0, "rounds": [value]}

    report = {
        "when": "now",
        "commit": "abc",
        "cpu": "cpu",
        "layout": "layout",
        "notes": [],
        "results": {
            "sidemesh": {"c1": run(2000), "grpc": {"c1": call(700)}},
            "envoy": {"c1": run(2500), "grpc": {"c1": call(1400)}},
            "floor": {"c1": run(3000)},
            "floor_h2": {"grpc": {"c1": call(800)}},
        },
    }
    out = tmp_path / "floor.md"
    http_floor.write_markdown(out, report)
    text = out.read_text()
    assert "| requests/s, 1 connection | 2,000 | 2,500 | 3,000 | 0.80x | 1.20x |" in text
    assert "| calls/s, 1 connection(s) x 1 stream(s) | 700 | 1,400 | 800 | 0.50x | 0.57x |" in text
    assert "- gRPC c1, Python HTTP/2 floor pair: 800 calls/s" in text
