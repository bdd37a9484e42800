"""bench.http_floor's proxy pairs: what they measure must be working HTTP/1.1 and HTTP/2 pairs over
mTLS."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from bench import http_floor, l4
from sidemesh.spiffe import SpiffeId
from tests.support import pki


def _svids(tmp_path: Path, foreign: str | None = None) -> Path:
    """The floor proxies' SVIDs from one CA, in ``client/`` and ``server/`` as `sidemesh ca issue`
    writes them (the ``foreign`` role's from another CA); the trust bundle's path."""
    authority = pki.make_authority(tmp_path / "ca")
    other = pki.make_authority(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/a/sa/x")).bundle_pem
    )
    for role, sa in (("client", "frontend"), ("server", "cart")):
        svid = pki.make_svid(
            other if role == foreign else authority, SpiffeId.parse(f"spiffe://cluster.local/ns/shop/sa/{sa}")
        )
        (tmp_path / role).mkdir()
        (tmp_path / role / "cert-chain.pem").write_bytes(svid.chain_pem)
        (tmp_path / role / "key.pem").write_bytes(svid.key_pem)
    return bundle


async def _floor_pair(
    tmp_path: Path, bundle: Path, app_port: int, protocol: str = "http1", decisions: bool = False
) -> tuple[http_floor.Floor, http_floor.Floor]:
    """The floor's server proxy in front of the app at ``app_port``, and its client proxy."""
    server = await http_floor.serve_floor(
        "server", ("127.0.0.1", 0), ("127.0.0.1", app_port), tmp_path / "server", bundle, protocol, decisions
    )
    client = await http_floor.serve_floor(
        "client",
        ("127.0.0.1", 0),
        ("127.0.0.1", server.port),
        tmp_path / "client",
        bundle,
        protocol,
        decisions,
    )
    return server, client


class _Upstream:
    """An HTTP/1.1 server that answers /chunked in chunks, /silent never, and anything else with
    a length."""

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
            if head.startswith(b"GET /silent"):
                continue
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


async def test_the_floor_pair_with_decisions_relays_as_the_floor(tmp_path: Path) -> None:
    await _relay_over_mtls(tmp_path, decisions=True)


async def test_the_floor_pair_with_decisions_decides_and_records_each_request(tmp_path: Path) -> None:
    """Each request through the floor with decisions is recorded as the sidecar records it: by
    the client proxy, an outbound request of its route with the status that came (the
    balancer's lease on the endpoint taken and given back, a deposit in the retry budget); by the
    server proxy, an inbound one, its target normalized as the policy decided it."""
    bundle = _svids(tmp_path)
    upstream = _Upstream()
    server, client = await _floor_pair(tmp_path, bundle, await upstream.start(), decisions=True)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        for _ in range(3):
            writer.write(b"GET /a/../b HTTP/1.1\r\nHost: cart\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 201 ")
        writer.close()
        await writer.wait_closed()
        out, inn = client.decisions, server.decisions
        assert out is not None and inn is not None
        routes = {k: v.requests for k, v in out.observer.routes.routes.items()}
        assert routes == {("outbound", "GET /a/../b"): 3}
        assert {k: v.requests for k, v in inn.observer.routes.routes.items()} == {("inbound", "GET /b"): 3}
        series = out.observer.metrics.requests.series
        assert {labels[3]: s.count for labels, s in series.items()} == {"2xx": 3}
        assert out.observer.in_flight == {"inbound": 0, "outbound": 0} == inn.observer.in_flight
        state = out.balancer.state(out.destination.endpoints[0])
        assert state is not None and (state.picks, state.outstanding) == (3, 0)
        assert out.budget.remaining() - inn.budget.remaining() == pytest.approx(3 * out.budget.ratio)
        assert list(inn.decisions) == [("GET", "/b")] and inn.decisions["GET", "/b"].allowed
    finally:
        for s in (client, server, upstream):
            await s.close()


async def test_the_floor_pair_with_decisions_keeps_each_request_to_its_own_fields(tmp_path: Path) -> None:
    """A request's trailer section is not taken for the next request's head (pipelined after it)."""
    bundle = _svids(tmp_path)
    upstream = _Upstream()
    server, client = await _floor_pair(tmp_path, bundle, await upstream.start(), decisions=True)
    assert client.decisions is not None
    made = client.decisions.info
    infos: list[Any] = []
    client.decisions.info = lambda **kw: infos.append(made(**kw)) or infos[-1]  # type: ignore[method-assign]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            b"POST /one HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
            b"Host: evil\r\n\r\nGET /two HTTP/1.1\r\nHost: cart\r\n\r\n"
        )
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        writer.close()
        await writer.wait_closed()
        assert [(i.path, i.authority, list(i.headers)) for i in infos] == [
            ("/one", "cart", [(b"host", b"cart"), (b"transfer-encoding", b"chunked")]),
            ("/two", "cart", [(b"host", b"cart")]),
        ]
    finally:
        for s in (client, server, upstream):
            await s.close()


async def test_the_floor_pair_with_decisions_ends_the_requests_a_close_cuts(tmp_path: Path) -> None:
    """A request whose response never comes, its client gone: ended unanswered in both proxies
    (nothing left in flight, the lease given back), as the sidecar ends it."""
    bundle = _svids(tmp_path)
    upstream = _Upstream()
    server, client = await _floor_pair(tmp_path, bundle, await upstream.start(), decisions=True)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"GET /silent HTTP/1.1\r\nHost: cart\r\n\r\n")
        await writer.drain()
        for _ in range(100):  # (until the app has it)
            if upstream.heads:
                break
            await asyncio.sleep(0.01)
        assert client.decisions is not None and server.decisions is not None
        assert client.decisions.observer.in_flight["outbound"] == 1
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if (
                client.decisions.observer.in_flight["outbound"]
                == 0
                == server.decisions.observer.in_flight["inbound"]
            ):
                break
            await asyncio.sleep(0.01)
        assert client.decisions.observer.in_flight == {"inbound": 0, "outbound": 0}
        assert server.decisions.observer.in_flight == {"inbound": 0, "outbound": 0}
        state = client.decisions.balancer.state(client.decisions.destination.endpoints[0])
        assert state is not None and state.outstanding == 0
        series = client.decisions.observer.metrics.requests.series
        assert {labels[3]: s.count for labels, s in series.items()} == {"reset": 1}
    finally:
        for s in (client, server, upstream):
            await s.close()


def test_the_decisions_loop_times_the_work_of_each_request(capsys: pytest.CaptureFixture[str]) -> None:
    """`decisions` times what the floor with decisions does per request, in both directions."""
    assert http_floor.main(["decisions", "--requests", "50", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["outbound", "inbound"]
    assert all(float(line.split()[1].replace(",", "")) > 0 for line in lines)
    with pytest.raises(SystemExit):
        http_floor.main(["decisions", "--rounds", "0"])
    d = http_floor.Decisions("client")
    for _ in range(3):
        request = d.begin(b"GET", b"/x", [(b"host", b"cart")])
        d.head(request, 503)
        d.end(request)
    state = d.balancer.state(d.destination.endpoints[0])
    assert state is not None and (state.picks, state.outstanding, state.failures) == (3, 0, 3)
    assert {labels[3]: s.count for labels, s in d.observer.metrics.requests.series.items()} == {"5xx": 3}


async def _relay_over_mtls(tmp_path: Path, decisions: bool = False) -> None:
    """Keep-alive requests through the HTTP/1.1 pair: a body with a length, a chunked answer with a
    trailer (passed on, and not into the next message), then a third request."""
    bundle = _svids(tmp_path)
    upstream = _Upstream()
    heads = upstream.heads
    server, client = await _floor_pair(tmp_path, bundle, await upstream.start(), decisions=decisions)
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
    bundle = _svids(tmp_path, foreign=foreign)
    upstream = _Upstream()
    heads = upstream.heads
    server, client = await _floor_pair(tmp_path, bundle, await upstream.start())
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

    bundle = _svids(tmp_path)

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
    server, client = await _floor_pair(tmp_path, bundle, app_port, "h2")
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
            "floor_decisions": {"c1": run(2250)},
            "floor_h2": {"grpc": {"c1": call(800)}},
        },
    }
    out = tmp_path / "floor.md"
    http_floor.write_markdown(out, report)
    text = out.read_text()
    assert "| requests/s, 1 connection | 2,000 | 2,500 | 3,000 | 2,250 | 0.80x | 1.20x | 0.90x |" in text
    assert "- wrk c1, Python floor pair with the sidecar's decisions: 2,250 req/s" in text
    assert "| calls/s, 1 connection(s) x 1 stream(s) | 700 | 1,400 | 800 | 0.50x | 0.57x |" in text
    assert "- gRPC c1, Python HTTP/2 floor pair: 800 calls/s" in text


class _Transport:
    """Records what a floor side writes; no socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def take(self) -> bytes:
        data = b"".join(self.writes)
        self.writes.clear()
        return data

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    abort = close


class _H2Proxy:
    """One HTTP/2 floor proxy (both of its sides) between an h2 client and an h2 server, driven
    by hand: what each writes is fed to the other until nothing moves."""

    def __init__(self, client_window: int | None = None, server_window: int | None = None) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        sides: set[object] = set()
        self.down = http_floor.H2Side(client_side=False, sides=sides)
        self.up = http_floor.H2Side(client_side=True, sides=sides)
        self.down.other, self.up.other = self.up, self.down
        self.t_down, self.t_up = _Transport(), _Transport()
        self.down.connection_made(self.t_down)  # type: ignore[arg-type]
        self.up.connection_made(self.t_up)  # type: ignore[arg-type]
        peers = []
        for client, window in ((True, client_window), (False, server_window)):
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=client, header_encoding=None)
            )
            if window is not None:
                conn.local_settings = h2.settings.Settings(
                    client=client, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
                )
            conn.initiate_connection()
            peers.append(conn)
        self.client, self.server = peers
        self.at_client: list[object] = []
        self.at_server: list[object] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            if data := self.client.data_to_send():
                self.down.data_received(data)
                moved = True
            if data := self.server.data_to_send():
                self.up.data_received(data)
                moved = True
            if data := self.t_down.take():
                self.at_client += self.client.receive_data(data)
                moved = True
            if data := self.t_up.take():
                self.at_server += self.server.receive_data(data)
                moved = True
            if not moved:
                return
        raise AssertionError("the proxy never went quiet")

    @staticmethod
    def send(conn: Any, stream_id: int, data: bytes, end: bool = False) -> None:
        """``data`` on ``stream_id`` in frames of the largest size (the windows are the caller's)."""
        size = conn.max_outbound_frame_size
        for at in range(0, len(data), size):
            conn.send_data(stream_id, data[at : at + size], end_stream=end and at + size >= len(data))

    def request(self, stream_id: int, end: bool = True) -> int:
        """A request from the client (no body); its stream id at the server."""
        import h2.events

        head = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/t.Echo/Unary"),
            (b":authority", b"a"),
        ]
        self.client.send_headers(stream_id, head, end_stream=end)
        self.pump()
        received = [e for e in self.at_server if isinstance(e, h2.events.RequestReceived)]
        return int(received[-1].stream_id)  # type: ignore[attr-defined]

    @staticmethod
    def data_at(events: list[object], stream_id: int) -> bytes:
        import h2.events

        return b"".join(
            e.data  # type: ignore[attr-defined]
            for e in events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id  # type: ignore[attr-defined]
        )


def test_the_http2_floor_is_set_up_as_the_sidecar_sets_up_its_connections() -> None:
    from proxy import http2

    side = http_floor.H2Side(client_side=False, sides=set(), max_streams=http2.APP_MAX_STREAMS)
    assert isinstance(side.conn, http2._Connection)  # (its header-block caches)
    assert side.conn.inbound_flow_control_window == http2.CONNECTION_WINDOW
    assert side.conn.local_settings.max_concurrent_streams == http2.APP_MAX_STREAMS


def test_a_response_waiting_for_the_clients_window_goes_when_it_opens() -> None:
    proxy = _H2Proxy(client_window=10_000)
    at_server = proxy.request(1)
    proxy.server.send_headers(at_server, [(b":status", b"200")])
    proxy.send(proxy.server, at_server, b"x" * 40_000)
    proxy.pump()
    assert len(proxy.data_at(proxy.at_client, 1)) == 10_000
    assert proxy.down.waiting  # the rest waits for the client, and holds the server's window:
    assert proxy.server.local_flow_control_window(at_server) == 65_535 - 40_000  # (acknowledged once sent)
    proxy.client.increment_flow_control_window(100_000, stream_id=1)
    proxy.pump()
    assert proxy.server.local_flow_control_window(at_server) > 65_535 - 40_000
    proxy.server.send_data(at_server, b"", end_stream=True)
    proxy.pump()
    assert proxy.data_at(proxy.at_client, 1) == b"x" * 40_000
    assert not proxy.down.waiting and not proxy.down.streams and not proxy.up.streams


def test_reset_streams_leave_nothing_waiting_and_give_their_windows_back() -> None:
    """The client resets streams whose responses wait for its window, over and over: the proxy drops
    what waits and gives the server its window back (kept, 40 x 29 KB of it would have closed the
    server's 1 MiB connection window for good), and the next stream still gets its whole answer."""
    proxy = _H2Proxy(client_window=1_000)
    for n in range(40):
        stream_id = 1 + 2 * n
        at_server = proxy.request(stream_id)
        proxy.server.send_headers(at_server, [(b":status", b"200")])
        proxy.send(proxy.server, at_server, b"x" * 30_000)
        proxy.pump()
        assert proxy.down.waiting
        proxy.client.reset_stream(stream_id)
        proxy.pump()
        assert not proxy.down.waiting and not proxy.up.waiting
    at_server = proxy.request(81)
    proxy.client.increment_flow_control_window(100_000, stream_id=81)
    proxy.client.increment_flow_control_window(100_000)  # (a connection WINDOW_UPDATE as well)
    proxy.server.send_headers(at_server, [(b":status", b"200")])
    proxy.send(proxy.server, at_server, b"y" * 30_000, end=True)
    proxy.pump()
    assert not proxy.t_down.closed and not proxy.t_up.closed
    assert proxy.data_at(proxy.at_client, 81) == b"y" * 30_000


def test_a_larger_initial_window_sends_what_waited_for_it() -> None:
    """The app's server starts with a 1,000-byte stream window, then raises it: what waited goes on
    that SETTINGS alone (no WINDOW_UPDATE comes)."""
    import h2.settings

    proxy = _H2Proxy(server_window=1_000)
    proxy.request(1, end=False)
    proxy.send(proxy.client, 1, b"y" * 30_000, end=True)
    proxy.pump()
    assert len(proxy.data_at(proxy.at_server, 1)) == 1_000
    proxy.server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    proxy.pump()
    assert proxy.data_at(proxy.at_server, 1) == b"y" * 30_000
    assert not proxy.up.waiting


def test_request_data_after_the_response_ended_is_dropped_with_its_window_given_back() -> None:
    """The server answers before the request's body (trailers-only, END_STREAM): what the client
    still sends on the stream goes nowhere, and its window reopens, or the client stalls."""
    proxy = _H2Proxy()
    at_server = proxy.request(1, end=False)
    proxy.server.send_headers(at_server, [(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True)
    proxy.pump()
    assert not proxy.down.streams
    sent = 0
    while sent < 200_000:  # three stream windows of it
        room = min(proxy.client.local_flow_control_window(1), proxy.client.max_outbound_frame_size)
        assert room > 0, f"the client stalled after {sent} bytes"
        proxy.client.send_data(1, b"z" * room)
        proxy.pump()
        sent += room
    assert proxy.data_at(proxy.at_server, at_server) == b""


def test_pair_cpu_per_call_counts_the_whole_run_against_the_measured_rate() -> None:
    # 5 s of CPU over a 10 s run (its warm-up included) at 100 calls/s: half a core, 5 ms a call
    assert http_floor.pair_cpu_us_per_call(5.0, 10.0, 100.0) == pytest.approx(5_000.0)
    assert http_floor.pair_cpu_us_per_call(None, 10.0, 100.0) is None
    assert http_floor.pair_cpu_us_per_call(5.0, 10.0, 0.0) is None


def _http1_side_pair() -> tuple[http_floor.Side, http_floor.Side, _Transport, _Transport]:
    import httptools

    sides: set[object] = set()
    down = http_floor.Side(httptools.HttpRequestParser, request=True, sides=sides)
    up = http_floor.Side(httptools.HttpResponseParser, request=False, sides=sides)
    down.other, up.other = up, down
    t_down, t_up = _Transport(), _Transport()
    down.connection_made(t_down)  # type: ignore[arg-type]
    up.connection_made(t_up)  # type: ignore[arg-type]
    return down, up, t_down, t_up


def test_the_http1_floor_writes_what_one_read_brought_in_one_write_and_keeps_the_version() -> None:
    down, up, t_down, t_up = _http1_side_pair()
    down.data_received(b"POST /a HTTP/1.0\r\nHost: cart\r\nContent-Length: 2\r\n\r\nhi")
    assert t_up.writes == [b"POST /a HTTP/1.0\r\nHost: cart\r\nContent-Length: 2\r\n\r\nhi"]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert t_down.writes == [b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok"]


def test_an_upstream_connection_made_after_its_client_left_is_closed() -> None:
    import httptools

    sides: set[object] = set()
    down = http_floor.Side(httptools.HttpRequestParser, request=True, sides=sides)
    up = http_floor.Side(httptools.HttpResponseParser, request=False, sides=sides)
    down.other, up.other = up, down
    down.connection_made(_Transport())  # type: ignore[arg-type]
    down.connection_lost(None)  # the client leaves while the upstream connects
    late = _Transport()
    up.connection_made(late)  # type: ignore[arg-type]
    assert late.closed and up not in sides
