"""A local answer (504, 502, 403) whose body waits for the app's window: it still ends its stream
once the window opens, whatever else happens to the stream meanwhile (its Service timeout)."""

from __future__ import annotations

import asyncio
import contextlib

import h2.config
import h2.connection
import h2.events

from proxy.observe import RequestInfo
from proxy.pool import Pool
from tests.unit.proxy import test_http2_pool as harness

WINDOW = 65_535  # the app's connection window, spent by the first response


class Upstream(harness.Upstream):
    """/big: a body of exactly the app's window at once; anything else: never answered."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if (
                        isinstance(event, h2.events.RequestReceived)
                        and dict(event.headers)[b":path"] == b"/big"
                    ):
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        for start in range(0, WINDOW, 16_384):
                            size = min(16_384, WINDOW - start)
                            conn.send_data(event.stream_id, b"x" * size, end_stream=start + size == WINDOW)
                writer.write(conn.data_to_send())
        writer.close()


class TimedRouter(harness.Router):
    def begin(self, info: RequestInfo) -> float | None:
        return 0.3  # the Service's timeout


async def test_a_timeout_answer_waiting_for_the_window_still_ends_its_stream() -> None:
    upstream = Upstream(delay=0)
    port = await upstream.start()
    pool: Pool[object] = Pool()
    proxy, task, app_sock, _ = await harness.start_proxy(port, pool)
    proxy.router = TimedRouter(port)
    reader, writer = await asyncio.open_connection(sock=app_sock)
    app = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    app.initiate_connection()
    events: list[h2.events.Event] = []

    async def read_for(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (left := until - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), left)
                assert data, "the proxy closed the app's connection"
                events.extend(app.receive_data(data))  # DATA not acknowledged: the window stays spent
                writer.write(app.data_to_send())

    def head(path: str) -> list[tuple[str, str]]:
        return [(":method", "GET"), (":scheme", "http"), (":authority", "up"), (":path", path)]

    try:
        app.send_headers(1, head("/big"), end_stream=True)
        writer.write(app.data_to_send())
        await read_for(0.5)
        assert sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == WINDOW
        app.send_headers(3, head("/hang"), end_stream=True)
        writer.write(app.data_to_send())
        await read_for(0.8)  # the timeout answers: its head goes, its body waits for the window
        on_3 = [e for e in events if getattr(e, "stream_id", None) == 3]
        assert [type(e).__name__ for e in on_3] == ["ResponseReceived"]
        assert dict(on_3[0].headers)[b":status"] == b"504"  # type: ignore[attr-defined]
        app.increment_flow_control_window(WINDOW)  # the app reads again
        writer.write(app.data_to_send())
        await read_for(0.5)
        on_3 = [e for e in events if getattr(e, "stream_id", None) == 3]
        assert isinstance(on_3[-1], h2.events.StreamEnded), on_3  # the stream ends
        body = b"".join(e.data for e in on_3 if isinstance(e, h2.events.DataReceived))
        assert body == b"upstream timeout\n"
    finally:
        writer.close()
        await asyncio.wait_for(task, 5)  # the app's connection ended: the proxy ends too
        pool.close()  # (the upstream connection went there)
        upstream.server.close()
        await upstream.server.wait_closed()
        await asyncio.sleep(0.05)  # the transports finish closing in this loop
