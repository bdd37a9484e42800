"""Floods and slow clients on the outbound side (reliability findings 5 and 6), on a real sidecar
pair: idle connections are dialed a few a second (the others never) and all closed at
--undecided-timeout while a well-behaved client is served; a slowloris that never gets an answer is cut; server-speaks-first
protocols keep working, on opaque ports at once and on detected ports after the detect timeout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.limits import Pacer
from proxy.sidecar import Sidecar
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import MESH_YAML, Mesh, new_mesh, talk, upper_echo

FRONTEND, CART = 1, 2
OUT = 18080  # cart.shop:80, protocol detected
OPAQUE_OUT = 18081  # greeter.shop:25, opaque (no detection)
DETECT_S, UNDECIDED_S = 0.2, 1.0
DIAL_RATE, DIAL_BURST = 10.0, 2  # in the 0.8 s between detection and the deadline: about 10 dials

GREETER = """\
---
apiVersion: v1
kind: Service
metadata: {{name: greeter, namespace: shop, annotations: {{sidemesh.io/opaque-ports: "25"}}}}
spec:
  selector: {{app: cart}}
  ports: [{{name: tcp, port: 25, targetPort: 8080}}]
"""


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, workloads=MESH_YAML + GREETER)
    yield m
    await m.close()


async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The reliability bench's cart: answers whole lines only (a trickle without one gets nothing)."""
    try:
        while line := await reader.readline():
            writer.write(b"OK " + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that speaks first (as SMTP or MySQL do), then upper-cases what it gets."""
    try:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def pair(mesh: Mesh, app: object = line_echo) -> Sidecar:
    await mesh.app(CART, app)  # type: ignore[arg-type]
    await mesh.sidecar("cart", CART)
    a = mesh.addr(FRONTEND)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{a}:{OUT}=cart.shop:80", f"{a}:{OPAQUE_OUT}=greeter.shop:25")
    )
    frontend.config = dataclasses.replace(
        frontend.config,
        detect_timeout=dt.timedelta(seconds=DETECT_S),
        undecided_timeout=dt.timedelta(seconds=UNDECIDED_S),
    )
    frontend.undecided_dials = Pacer(DIAL_RATE, DIAL_BURST)
    return frontend


async def closed_after(reader: asyncio.StreamReader, began: float, timeout: float = 10) -> float:
    """Seconds from ``began`` until the sidecar closed the connection (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - began


async def test_an_idle_flood_is_paced_closed_by_the_timeout_and_others_are_served(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidemesh.proxy")
    frontend = await pair(mesh)
    cart = mesh.sidecars["cart"]
    a = mesh.addr(FRONTEND)
    began = time.monotonic()
    flood = [await asyncio.open_connection(a, OUT) for _ in range(60)]
    closes = [asyncio.create_task(closed_after(r, began)) for r, _ in flood]
    await asyncio.sleep(DETECT_S + 0.1)  # the flood is undecided now
    served = 0
    for i in range(5):  # a well-behaved client is served meanwhile, without waiting for a turn
        t0 = time.monotonic()
        assert await talk(a, OUT, b"order %d\n" % i) == b"OK order %d\n" % i
        assert time.monotonic() - t0 < 0.5
        served += 1
    after = sorted(await asyncio.gather(*closes))
    for _, w in flood:
        w.close()
    dialed = cart.metrics.connections.labels("inbound", "allow")._value.get() - served
    # About 10 got a turn (the burst, then 10 a second until the deadline), the others none; all
    # were closed at the undecided timeout, the destination having said nothing.
    assert 6 <= dialed <= 14, dialed
    assert all(UNDECIDED_S - 0.05 <= s < UNDECIDED_S + 1.0 for s in after), after
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 60
    logged = [r for r in caplog.records if r.getMessage() == "connection closed by timeout"]
    assert len(logged) == 1 and logged[0].__dict__["timeout"] == "undecided"  # once, not 60 times
    assert logged[0].__dict__["protocol"] == "silent"
    assert await talk(a, OUT, b"after\n") == b"OK after\n"


async def test_a_slow_client_that_never_gets_an_answer_is_cut(mesh: Mesh) -> None:
    frontend = await pair(mesh)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    began = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:  # a byte every 0.2 s and never a line: the app never answers
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)

    sender = asyncio.create_task(trickle())
    seconds = await closed_after(reader, began)
    sender.cancel()
    writer.close()
    assert UNDECIDED_S - 0.05 <= seconds < UNDECIDED_S + 1.0
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 1


async def test_a_slow_client_that_gets_answers_is_kept(mesh: Mesh) -> None:
    """The same trickle where the app answers every byte: the connection outlives the timeout."""
    frontend = await pair(mesh, app=upper_echo)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    for _ in range(int(UNDECIDED_S / 0.2) + 3):
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"X"
        await asyncio.sleep(0.2)
    writer.close()
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 0


async def test_server_speaks_first_on_an_opaque_port_at_once(mesh: Mesh) -> None:
    frontend = await pair(mesh, app=greeter)
    frontend.config = dataclasses.replace(frontend.config, detect_timeout=dt.timedelta(seconds=5))
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OPAQUE_OUT)
    assert await asyncio.wait_for(reader.readline(), 5) == b"220 hello\r\n"
    assert time.monotonic() - t0 < 1.0  # no detection: dialed at once, not after the 5 s
    await asyncio.sleep(UNDECIDED_S + 0.3)  # no undecided timeout either
    writer.write(b"ehlo\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"EHLO\r\n"
    writer.close()
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 0


async def test_server_speaks_first_on_a_detected_port_after_the_detect_timeout(mesh: Mesh) -> None:
    frontend = await pair(mesh, app=greeter)
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    assert await asyncio.wait_for(reader.readline(), 5) == b"220 hello\r\n"
    assert DETECT_S - 0.05 <= time.monotonic() - t0 < DETECT_S + 1.0
    await asyncio.sleep(UNDECIDED_S + 0.3)  # the server answered: kept past the undecided timeout
    writer.write(b"ehlo\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"EHLO\r\n"
    writer.close()
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 0


async def test_a_connection_that_said_what_it_speaks_is_not_timed(mesh: Mesh) -> None:
    """Decisive first bytes (not HTTP: opaque at once) are dialed at once and never timed."""
    frontend = await pair(mesh)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"\x00hello")  # no HTTP method starts so: opaque, decided, no line: no answer
    await asyncio.sleep(UNDECIDED_S + 0.5)
    writer.write(b"\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"OK \x00hello\n"
    writer.close()
    assert frontend.metrics.timed_out.labels("outbound", "undecided")._value.get() == 0
