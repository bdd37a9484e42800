"""The injector stopped while the API server holds keep-alive connections to it.

The API server (Go's net/http transport) keeps its connections to a webhook open and reuses them
(injector/server.py says so: `timeout_keep_alive=120` is there for that reason), and it does not
send a POST again when a reused connection dies after the request went out (Go's
`Request.isReplayable`: POST without an Idempotency-Key is not replayable). An admission lost
that way is a refused pod (`failurePolicy: Fail`).

The existing restart test (test_injector.py `test_injector_restarted_under_admissions_never_half_injects`)
opens a new connection for every call, so it never sees this.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import StartCA
from tests.integration.test_http_delivery import _delaying_relay
from tests.integration.test_injector import (
    Client,
    _injector_process,
    _read_until,
    ready_to_serve,
    review,
)


@dataclass
class Call:
    at: float
    kind: str  # "ok" | "lost" (written on a reused connection, no answer) | "refused" (no connection)
    close: bool = False  # the answer said Connection: close
    detail: str = ""


def _go_like_caller(client: Client, stop: threading.Event, calls: list[Call]) -> None:
    """One pooled keep-alive connection, as Go's transport keeps it: a connection the server has
    closed (EOF readable) is dropped before it is reused (Go's background readLoop does that), so
    only a close that crosses the request in flight counts as lost."""
    conn = client.connect()
    conn.timeout = 5
    while not stop.is_set():
        at = time.monotonic()
        reused = conn.sock is not None
        if reused:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:  # the server closed it while idle: Go would not reuse it
                conn.close()
                reused = False
        try:
            if conn.sock is None:
                conn.connect()
        except OSError as exc:
            calls.append(Call(at, "refused", detail=type(exc).__name__))
            conn.close()
            time.sleep(0.005)
            continue
        try:
            body = json.dumps(review(uid=f"uid-{at}")).encode()
            conn.request(
                "POST", "/mutate?timeout=5s", body=body, headers={"Content-Type": "application/json"}
            )
            with conn.getresponse() as resp:
                resp.read()
                close = (resp.getheader("Connection") or "").lower() == "close"
            calls.append(Call(at, "ok" if resp.status == 200 else f"status {resp.status}", close))
        except (OSError, http.client.HTTPException) as exc:
            calls.append(Call(at, "lost" if reused else "refused", detail=type(exc).__name__))
            conn.close()
        time.sleep(0.002)


async def test_injector_sigterm_tells_keepalive_clients_to_go_and_loses_no_admission(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca, port = await ready_to_serve(start_ca, tmp_path)
    proc = await _injector_process(
        tmp_path, tmp_path / "config.yaml", "--shutdown-delay", "1s", listen=f"127.0.0.1:{port}"
    )
    assert proc.stderr is not None
    await _read_until(proc.stderr, "injector serving", [])
    reader = asyncio.create_task(proc.stderr.read())
    # 5 ms of network each way between the API server and the webhook's pod (another node): a
    # close takes that long to reach the caller, as a request takes to reach the injector.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        relay_port = probe.getsockname()[1]
    opened: list[asyncio.StreamWriter] = []
    relay = await _delaying_relay(("127.0.0.1", relay_port), ("127.0.0.1", port), 0.005, opened)
    client = Client(relay_port, ca.bundle)
    stop = threading.Event()
    calls: list[list[Call]] = [[] for _ in range(8)]
    threads = [asyncio.create_task(asyncio.to_thread(_go_like_caller, client, stop, c)) for c in calls]
    try:
        await asyncio.sleep(1.0)
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        gone_at = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*threads)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        relay.close()
        for w in opened:
            w.close()
    every = sorted((c for cs in calls for c in cs), key=lambda c: c.at)
    during_delay = [c for c in every if term_at + 0.1 <= c.at <= gone_at - 0.1 and c.kind == "ok"]
    lost = [c for c in every if c.kind == "lost"]
    assert during_delay, "the injector answered nothing during its shutdown delay"
    # What lets the keep-alive callers go before the listener closes (as Envoy's drain does):
    assert all(c.close for c in during_delay), (
        "answers during --shutdown-delay do not say Connection: close: the API server keeps "
        "sending on its pooled connections until uvicorn closes them under it"
    )
    assert not lost, f"{len(lost)} admissions written on a reused connection got no answer"
