"""Sidecar pairs in local mode: mTLS, secure naming, allow rules, TCP semantics, readiness, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy import relay as relay_module
from proxy.sidecar import Sidecar
from sidemesh.identity.workload import WorkloadIdentity
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import (
    ALLOW_FRONTEND,
    INBOUND,
    Mesh,
    linger_reset,
    new_mesh,
    talk,
)

FRONTEND, CART, STRANGER = 1, 2, 3
OUT = 18080  # the frontend's local outbound port for cart.shop:80


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


async def frontend_and_cart(mesh: Mesh, **cart_kw: Any) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART, **cart_kw)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))


async def get(url: str) -> tuple[int, Any]:
    """GET from a thread: the server answering runs in this test's event loop."""
    return await asyncio.to_thread(_get, url)


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_frontend_to_cart_over_mtls_with_half_close(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    reply = await talk(mesh.addr(FRONTEND), OUT, b"hello cart")
    assert reply == b"HELLO CARTBYE"  # BYE comes only after the server saw our EOF (half-close)
    cart = mesh.sidecars["cart"]
    assert cart.metrics.connections.labels("inbound", "allow")._value.get() == 1


async def test_large_transfer_both_ways(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    payload = bytes(range(256)) * 40_000  # ~10 MB
    reply = await talk(mesh.addr(FRONTEND), OUT, payload, timeout=60)
    assert reply == payload.upper() + b"BYE"


async def test_identity_not_allowed_is_refused_and_logged(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("stranger", STRANGER, outbound=(f"{mesh.addr(STRANGER)}:{OUT}=cart.shop:80",))
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"let me in")
    await asyncio.sleep(0.1)
    denied = [r for r in caplog.records if r.getMessage() == "connection denied"]
    assert denied
    assert denied[0].__dict__["source"] == "spiffe://cluster.local/ns/shop/sa/stranger"
    assert "no rule of shop/cart-allow-frontend allows it" in denied[0].__dict__["reason"]
    client_side = [r for r in caplog.records if r.getMessage() == "connection denied by the destination"]
    assert client_side and "cart-allow-frontend" in client_side[0].__dict__["reason"]
    assert mesh.sidecars["cart"].metrics.denials.labels("shop/cart-allow-frontend")._value.get() == 1
    # Counted as a denial in the route stats (`sidemesh top`), not as an error: the caller's
    # sidecar resets after the DENY frame, and the relay ended as "downstream: SSLError".
    await asyncio.sleep(0.2)
    routes = mesh.sidecars["cart"].routes.snapshot()["routes"]
    tcp = [r for r in routes if r["direction"] == "inbound" and r["route"].startswith("TCP")]
    assert [(r["requests"], r["denials"]) for r in tcp] == [(1, 1)], routes


def test_a_timeouts_reason_is_not_empty() -> None:
    """`str(TimeoutError())` is "": connect timeouts were logged as "cannot connect to ...: "."""
    from proxy.dial import why

    assert why(TimeoutError()) == "timed out"
    assert why(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection refused"


async def test_policy_change_reaches_the_running_sidecar(mesh: Mesh) -> None:
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    await mesh.sidecar("stranger", STRANGER, outbound=(f"{mesh.addr(STRANGER)}:{OUT}=cart.shop:80",))
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"x")
    mesh.write("allow-stranger.yaml", ALLOW_FRONTEND.replace("frontend", "stranger"))
    for _ in range(50):  # the sidecar polls its directory twice a second
        await asyncio.sleep(0.1)
        if any(p.ref == "shop/cart-allow-stranger" for p in cart.mesh_config().policies):
            break
    assert await talk(mesh.addr(STRANGER), OUT, b"now?") == b"NOW?BYE"


async def test_plaintext_inbound_strict_and_permissive(mesh: Mesh) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(CART), INBOUND, b"GET / HTTP/1.0\r\n\r\n")
    await mesh.sidecars.pop("cart").drain(timeout=0)
    # Permissive: plaintext is the unauthenticated principal; allowed only if a rule says so.
    cart = await mesh.sidecar("cart", CART, mode="permissive")
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(CART), INBOUND, b"plain")
    mesh.write(
        "allow-plain.yaml",
        ALLOW_FRONTEND.replace("cart-allow-frontend", "cart-allow-plain").replace(
            "serviceAccount: frontend", "unauthenticated: true"
        ),
    )
    cart.reload_config()
    assert await talk(mesh.addr(CART), INBOUND, b"plain") == b"PLAINBYE"


async def test_secure_naming_refuses_an_impostor(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    # The sidecar at cart's address holds the stranger's identity: the frontend must refuse it.
    await mesh.app(CART)
    await mesh.sidecar("cart", CART, identity_of="stranger")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(FRONTEND), OUT, b"secret")
    refused = [r for r in caplog.records if r.getMessage() == "outbound connection refused"]
    assert (
        refused
        and "expected spiffe://cluster.local/ns/shop/sa/cart (secure naming)" in refused[0].__dict__["reason"]
    )


async def test_secure_naming_on_the_http_path(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    # The same impostor, reached by an HTTP request (pooled connections): 502 and nothing sent.
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        writer.close()

    await mesh.app(CART, app)
    cart = await mesh.sidecar("cart", CART, identity_of="stranger")
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"GET /secret HTTP/1.1\r\nHost: cart\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 502"), head
    failed = [r.__dict__ for r in caplog.records if r.getMessage() == "upstream connection failed"]
    assert failed and "expected spiffe://cluster.local/ns/shop/sa/cart (secure naming)" in str(failed[0])
    assert not seen, "the request reached the impostor's app"
    assert frontend.metrics.tls_failures.labels("outbound", "wrong_identity")._value.get() >= 1
    assert cart.metrics.connections.labels("inbound", "allow")._value.get() == 0


async def test_reset_from_the_app_reaches_the_client(mesh: Mesh) -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        linger_reset(writer)

    await mesh.app(CART, resetter)
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"trigger")
    await writer.drain()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()


async def test_app_down_gives_a_prompt_reset(mesh: Mesh) -> None:
    await mesh.sidecar("cart", CART)  # no app listening
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(FRONTEND), OUT, b"anyone?")


async def test_slow_reader_does_not_make_the_proxy_buffer_without_bound(mesh: Mesh) -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    await mesh.app(CART, slow)
    await frontend_and_cart_sidecars(mesh)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    chunk = (b"x" * 1023 + b"\n") * 64  # (lines: not HTTP; 8 KiB of token characters would be a method)
    sent = 0
    with pytest.raises(TimeoutError):  # noqa: PT012
        async with asyncio.timeout(1.5):
            while True:  # until drain() blocks for good: everyone's buffers are full
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
    buffered = sum(
        h.transport.get_write_buffer_size()
        for sc in mesh.sidecars.values()
        for r in sc.relays
        for h in r.halves
        if h.transport is not None
    )
    assert buffered < 4 * 1024 * 1024, buffered  # bounded by the high-water marks, not by what was sent
    release.set()
    writer.write_eof()
    assert int(await asyncio.wait_for(reader.read(), 30)) == sent
    writer.close()


def _owned_sockets(local: tuple[str, int], remote: tuple[str, int]) -> int:
    """How many sockets of this process (an inode in /proc/net/tcp: the kernel's orphans have none)
    join ``local`` and ``remote`` (IPv4)."""

    def hexed(addr: tuple[str, int]) -> str:
        return f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"

    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if r[1] == hexed(local) and r[2] == hexed(remote) and r[9] != "0")


async def _relay_ended(sidecar: Sidecar) -> None:
    """Wait for the sidecar's one connection to start, then to end."""
    for want in (True, False):
        for _ in range(100):
            if bool(sidecar.relays) == want:
                break
            await asyncio.sleep(0.05)
        assert bool(sidecar.relays) == want


ANSWER = b"a" * (200 * 1024)  # under the high-water mark: the end reaches the client's sidecar


async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The cart app: reads the request to its end, answers ``ANSWER`` and closes."""
    await reader.read()
    writer.write(ANSWER)
    await writer.drain()
    writer.close()


def slow_reader() -> socket.socket:
    """A non-blocking client socket that takes little at a time: a small window and small segments
    (set before connecting), so the kernel holds little of an answer it never reads."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    client.setblocking(False)
    return client


async def test_a_connection_closed_toward_a_client_that_never_reads_is_let_go(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sends its request, closes its side and never reads the answer: when the app's
    answer and end reached the client's sidecar, that sidecar closed the client's connection with
    the answer still buffered, and kept its socket and buffer for good (the idle timeout no longer
    runs for a finished relay). Now it lets go once the client took nothing for FLUSH_STALL_S."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 1.0)  # (the check below comes well before)
    await mesh.app(CART, answer_then_close)
    await frontend_and_cart_sidecars(mesh)
    frontend = mesh.sidecars["frontend"]
    client = slow_reader()
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (mesh.addr(FRONTEND), OUT))
    try:
        await loop.sock_sendall(client, b"the request")
        client.shutdown(socket.SHUT_WR)
        ends = ((mesh.addr(FRONTEND), OUT), client.getsockname())
        await _relay_ended(frontend)  # both directions closed, the answer not yet taken
        assert _owned_sockets(*ends) == 1  # closed, still sending
        for _ in range(100):
            if _owned_sockets(*ends) == 0:
                break
            await asyncio.sleep(0.1)
        assert _owned_sockets(*ends) == 0  # let go
        # (counted by the sidecar started last: one per process in production)
        assert sum(sc.metrics.flush_cuts._value.get() for sc in mesh.sidecars.values()) == 1
    finally:
        client.close()


async def test_closed_connections_still_sending_count_against_the_connection_limit(mesh: Mesh) -> None:
    """A closed connection whose answer is still going out to a client that reads slowly (or never)
    keeps its socket and buffers: it counts against --max-connections until its transport is gone,
    or clients that close and never read could pile them up (up to FLUSH_STALL_S each)."""
    await mesh.app(CART, answer_then_close)
    await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",), max_connections=2
    )
    loop = asyncio.get_running_loop()
    slow = slow_reader()
    held: list[asyncio.StreamWriter] = []
    try:
        await loop.sock_connect(slow, (mesh.addr(FRONTEND), OUT))
        await loop.sock_sendall(slow, b"the request")
        slow.shutdown(socket.SHUT_WR)
        await _relay_ended(frontend)  # closed, its answer still going out
        for _ in range(100):
            if (
                relay_module.flushing(loop, "outbound").value == 1
            ):  # (the cart's TLS closes are over within a moment)
                break
            await asyncio.sleep(0.02)
        assert relay_module.flushing(loop, "outbound").value == 1
        _, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)  # 1 open + 1 closing
        held.append(writer)
        writer.write(b"held")
        await writer.drain()
        await asyncio.sleep(0.2)
        assert len(frontend.relays) == 1
        refused_r, refused_w = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)  # over the limit
        held.append(refused_w)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(refused_r.read(), 5)
        assert frontend.metrics.connections.labels("outbound", "overflow")._value.get() == 1
        got = 0
        while got < len(ANSWER):  # the slow client reads its answer: its connection is gone
            chunk = await asyncio.wait_for(loop.sock_recv(slow, 65536), 5)
            assert chunk, f"end of stream after {got} bytes"
            got += len(chunk)
        for _ in range(100):
            if relay_module.flushing(loop, "outbound").value == 0:
                break
            await asyncio.sleep(0.02)
        assert relay_module.flushing(loop, "outbound").value == 0
        _, again = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)  # room again
        held.append(again)
        again.write(b"more")
        await again.drain()
        await asyncio.sleep(0.2)
        assert len(frontend.relays) == 2
        assert frontend.metrics.connections.labels("outbound", "overflow")._value.get() == 1
    finally:
        slow.close()
        for w in held:
            w.close()


async def test_a_closing_connection_is_cut_where_its_progress_cannot_be_watched(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TCP_INFO (a sandbox's zeroed struct) there is no progress to watch: such a closed
    connection was kept for as long as its client kept its socket, and now held a place under
    --max-connections all that time. A deadline cuts it instead."""
    monkeypatch.setattr(relay_module, "FLUSH_STALL_S", 1.0)
    monkeypatch.setattr(relay_module, "flush_state", lambda sock: None)
    await mesh.app(CART, answer_then_close)
    await frontend_and_cart_sidecars(mesh)
    frontend = mesh.sidecars["frontend"]
    loop = asyncio.get_running_loop()
    client = slow_reader()
    try:
        await loop.sock_connect(client, (mesh.addr(FRONTEND), OUT))
        await loop.sock_sendall(client, b"the request")
        client.shutdown(socket.SHUT_WR)
        await _relay_ended(frontend)
        count = relay_module.flushing(loop, "outbound")
        assert count.value == 1  # closed, still sending (never read)
        for _ in range(100):
            if count.value == 0:
                break
            await asyncio.sleep(0.05)
        assert count.value == 0  # cut at the deadline
        ends = ((mesh.addr(FRONTEND), OUT), client.getsockname())
        assert _owned_sockets(*ends) == 0
    finally:
        client.close()


async def test_mesh_connections_leave_their_close_to_the_stall_watch(mesh: Mesh) -> None:
    """The TLS layer's own close timeout (30 s by default, from the close whatever the progress) cut
    a slow reader's mTLS stream with a FIN before the 60 s watch could judge it: both sidecars' mesh
    connections set it past the watch. (Read where asyncio keeps it; uvloop does not expose it.)"""
    if not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        pytest.skip("uvloop does not expose a TLS transport's shutdown timeout")
    await frontend_and_cart(mesh)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        writer.write(b"hold")
        assert await reader.readexactly(4) == b"HOLD"
        timeouts = [
            h.transport._ssl_protocol._ssl_shutdown_timeout  # type: ignore[attr-defined]
            for sc in mesh.sidecars.values()
            for r in sc.relays
            for h in r.halves
            if h.framed and h.transport is not None
        ]
        assert timeouts == [relay_module.TLS_SHUTDOWN_TIMEOUT_S] * 2  # the caller's end and the callee's
        assert relay_module.TLS_SHUTDOWN_TIMEOUT_S > relay_module.FLUSH_STALL_S
    finally:
        writer.close()


async def frontend_and_cart_sidecars(mesh: Mesh) -> None:
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))


async def test_readiness_admin_and_live_connections(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    cart = mesh.sidecars["cart"]
    status, body = await get(f"http://{mesh.addr(CART)}:{cart.ports['health']}/healthz/ready")
    assert status == 200 and body["ready"] is True
    status, certs = await get(f"http://{mesh.addr(CART)}:{cart.ports['admin']}/certs")
    assert certs["identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
    # When the next renewal is due (as Envoy's /certs says how long each certificate has left),
    # within the certificate's life, and which roots are trusted.
    assert certs["not_before"] < certs["next_attempt"] < certs["not_after"], certs
    assert [r["subject"] for r in certs["bundle"]] == [
        c.subject.rfc4514_string() for c in mesh.ca.authority.roots
    ] and certs["bundle_roots"] == len(mesh.ca.authority.roots)
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"hold")
    assert await reader.readexactly(4) == b"HOLD"
    _, conns = await get(f"http://{mesh.addr(CART)}:{cart.ports['admin']}/connections")
    assert isinstance(conns, list) and len(conns) == 1
    assert conns[0]["source"] == "spiffe://cluster.local/ns/shop/sa/frontend" and conns[0]["port"] == 8080
    _, config = await get(f"http://{mesh.addr(CART)}:{cart.ports['admin']}/config")
    assert config["policies"] == ["shop/cart-allow-frontend"]
    writer.close()
    url = f"http://{mesh.addr(CART)}:{cart.ports['health']}/metrics"
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'sidemesh_proxy_connections_total{decision="allow",direction="inbound"} 1.0' in metrics


def _cart_sidecar(mesh: Mesh, **options: str) -> Sidecar:
    """cart's sidecar as `proxy run` makes it (local mode, ports of its own), not yet started."""
    from proxy.config import ProxyConfig
    from sidemesh.identity.workload import WorkloadIdentity
    from sidemesh.spiffe import WorkloadId

    host = mesh.addr(CART)
    config = ProxyConfig(
        workload="shop/cart-1",
        config_dir=mesh.config_dir,
        capture="none",
        inbound_listen=f"{host}:{INBOUND}",
        admin_listen=f"{host}:0",
        health_listen=f"{host}:0",
        **options,  # type: ignore[arg-type]
    )
    cart = WorkloadId("shop", "cart").spiffe_id("cluster.local")
    return Sidecar(config, WorkloadIdentity(cart, mesh.ca.client(), lambda: "cart-token"))


async def test_not_ready_without_an_identity(mesh: Mesh, start_ca: StartCA) -> None:
    await mesh.ca.server.stop(grace=0)  # no CA: the sidecar starts but never becomes ready
    sidecar = _cart_sidecar(mesh)
    client = sidecar.identity.ca
    await sidecar.start()
    try:
        status, body = await get(f"http://{mesh.addr(CART)}:{sidecar.ports['health']}/healthz/ready")
        assert status == 503 and body["identity"] == "pending"
        # The data port is bound but does not listen until the sidecar can serve: a connection is
        # refused at once (a peer tries another endpoint) instead of accepted and then failed.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(mesh.addr(CART), INBOUND)
    finally:
        await sidecar.drain(timeout=0)
        await client.close()


async def test_drain_lets_open_connections_finish_and_refuses_new_ones(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    cart = mesh.sidecars["cart"]
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"one")
    assert await reader.readexactly(3) == b"ONE"
    drain = asyncio.create_task(cart.drain(timeout=10))
    await asyncio.sleep(0.2)
    assert not drain.done()
    with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
        await talk(mesh.addr(FRONTEND), OUT, b"new")
    writer.write(b"two")  # the open connection still works while draining
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"TWOBYE"
    writer.close()
    await asyncio.wait_for(drain, 5)
    del mesh.sidecars["cart"]


async def test_draining_keeps_the_apps_outbound_listener_and_stops_when_the_last_connection_ends(
    mesh: Mesh,
) -> None:
    await frontend_and_cart(mesh)
    frontend = mesh.sidecars.pop("frontend")
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"one")
    assert await reader.readexactly(3) == b"ONE"
    started = asyncio.get_running_loop().time()
    drain = asyncio.create_task(frontend.drain(timeout=30))
    await asyncio.sleep(0.2)
    assert not frontend.ready  # readiness says 503 at once
    # The app may still call out while it shuts down: its outbound listener keeps accepting.
    assert await talk(mesh.addr(FRONTEND), OUT, b"late call") == b"LATE CALLBYE"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"BYE"
    writer.close()
    await asyncio.wait_for(drain, 5)  # over when the last connection ended, not at the 30 s timeout
    assert asyncio.get_running_loop().time() - started < 5
    with pytest.raises(ConnectionRefusedError):
        await talk(mesh.addr(FRONTEND), OUT, b"after")
    await frontend.identity.ca.close()


async def test_drain_grace_keeps_the_outbound_listener_with_no_connection_open(mesh: Mesh) -> None:
    # --drain-grace (classic sidecars): the app may still call out while it shuts down.
    await frontend_and_cart(mesh)
    frontend = mesh.sidecars.pop("frontend")
    loop = asyncio.get_running_loop()
    started = loop.time()
    drain = asyncio.create_task(frontend.drain(timeout=30, grace=1.0))
    await asyncio.sleep(0.5)
    assert not drain.done()
    assert await talk(mesh.addr(FRONTEND), OUT, b"during grace") == b"DURING GRACEBYE"
    await asyncio.wait_for(drain, 5)
    assert 1.0 <= loop.time() - started < 5
    with pytest.raises(ConnectionRefusedError):
        await talk(mesh.addr(FRONTEND), OUT, b"after")
    await frontend.identity.ca.close()


async def test_a_replacement_sidecar_takes_over_while_the_old_one_drains(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    old = mesh.sidecars["cart"]
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"one")
    assert await reader.readexactly(3) == b"ONE"
    drain = asyncio.create_task(old.drain(timeout=30))
    await asyncio.sleep(0.1)
    # Same inbound port while the old process still holds its connection (SO_REUSEPORT). (Not a
    # hot restart: between the old one's inbound listener closing and the new one listening, new
    # inbound connections are refused; docs/sidecar.md.)
    await mesh.sidecar("cart", CART)
    assert await talk(mesh.addr(FRONTEND), OUT, b"new") == b"NEWBYE"
    writer.write(b"two")  # the old sidecar still carries the connection it had
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"TWOBYE"
    writer.close()
    await asyncio.wait_for(drain, 5)
    await old.identity.ca.close()
    assert await talk(mesh.addr(FRONTEND), OUT, b"still") == b"STILLBYE"


async def test_connections_queued_when_a_listener_closes_are_served_not_reset(mesh: Mesh) -> None:
    # A restart hands the port over with SO_REUSEPORT: the kernel may queue a new connection at the
    # old process's listener a moment before that closes it. Closing resets what is queued, so the
    # sidecar takes its accept queue first and serves those connections.
    await frontend_and_cart(mesh)
    frontend = mesh.sidecars["frontend"]
    queued = socket.create_connection((mesh.addr(FRONTEND), OUT))  # the loop has not run: queued
    late = await frontend._close_listeners(("outbound",))
    assert len(late) == 1
    reader, writer = await asyncio.open_connection(sock=queued)
    writer.write(b"queued")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"QUEUEDBYE"
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await talk(mesh.addr(FRONTEND), OUT, b"after")


async def test_a_burst_of_connections_is_held_to_the_limit(mesh: Mesh) -> None:
    """Connections were counted when their task first ran, not at the accept: a burst taken in
    one turn of the loop went past the limit by up to a batch (40 at once, limit 4: 15 served)."""
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",), max_connections=4
    )
    socks = []
    try:
        for _ in range(40):  # all queued before the sidecar's loop runs again
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((mesh.addr(FRONTEND), OUT))
            socks.append(s)
        await asyncio.sleep(0.5)
        assert frontend.open_connections.get("outbound") == 4
        assert frontend.metrics.connections.labels("outbound", "overflow")._value.get() == 36
    finally:
        for s in socks:
            s.close()


async def test_connections_over_the_limit_are_reset_and_the_others_keep_working(mesh: Mesh) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",), max_connections=2
    )
    held = []
    for i in range(2):
        reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
        writer.write(b"held%d" % i)
        assert await reader.readexactly(5) == b"HELD%d" % i
        held.append((reader, writer))
    reader3, writer3 = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    # Reset at once (a served connection would stay open and this read would time out).
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader3.read(), 5) == b""
    writer3.close()
    assert frontend.metrics.connections.labels("outbound", "overflow")._value.get() == 1
    reader, writer = held[0]  # the held connections are unaffected
    writer.write(b"still")
    assert await reader.readexactly(5) == b"STILL"
    for _, w in held:
        w.close()
    for _ in range(100):  # once they are closed, there is room again
        if frontend.open_connections.get("outbound") == 0:
            break
        await asyncio.sleep(0.02)
    assert await talk(mesh.addr(FRONTEND), OUT, b"room") == b"ROOMBYE"


async def test_rotation_under_traffic_breaks_nothing(mesh: Mesh) -> None:
    await frontend_and_cart(mesh)
    cart, frontend = mesh.sidecars["cart"], mesh.sidecars["frontend"]
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    for i in range(5):
        writer.write(b"ping%d" % i)
        assert await reader.readexactly(5) == b"PING%d" % i
        await cart.identity.renew()
        await frontend.identity.renew()
        assert await talk(mesh.addr(FRONTEND), OUT, b"fresh") == b"FRESHBYE"
    assert cart.identity.rotations == 6
    writer.close()


async def test_access_log_names_both_identities(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidemesh.proxy.access")
    await frontend_and_cart(mesh)
    assert await talk(mesh.addr(FRONTEND), OUT, b"log me") == b"LOG MEBYE"
    for _ in range(50):
        lines = [r.__dict__ for r in caplog.records if r.name == "sidemesh.proxy.access"]
        if len(lines) == 2:
            break
        await asyncio.sleep(0.02)
    inbound = next(line for line in lines if line["direction"] == "inbound")
    outbound = next(line for line in lines if line["direction"] == "outbound")
    assert inbound["source"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert inbound["decision"] == "allowed by shop/cart-allow-frontend rule 0"
    assert inbound["bytes_received"]["downstream"] > 0 and inbound["outcome"] == "closed"
    assert outbound["peer"] == "spiffe://cluster.local/ns/shop/sa/cart" and outbound["mtls"] is True


async def test_connect_timeout_to_an_unresponsive_endpoint(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import datetime as dt
    import socket

    # Something at cart's inbound address that accepts TCP but never answers the TLS handshake.
    silent = socket.socket()
    try:
        silent.bind((mesh.addr(CART), INBOUND))
        silent.listen(8)
        frontend = await mesh.sidecar(
            "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
        )
        frontend.config = dataclasses.replace(frontend.config, connect_timeout=dt.timedelta(seconds=0.5))
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionResetError):
            await talk(mesh.addr(FRONTEND), OUT, b"hello?")
        assert asyncio.get_running_loop().time() - started < 3
        refused = [r for r in caplog.records if r.getMessage() == "outbound connection refused"]
        assert refused and "cannot connect" in refused[-1].__dict__["reason"]
    finally:
        silent.close()


async def test_app_probes_through_the_sidecar_health_port(mesh: Mesh) -> None:
    """The injector rewrites the app's probes to /app-health/...; the sidecar probes the app."""
    import json as _json

    probes = _json.dumps(
        {
            "/app-health/cart/readyz": {"httpGet": {"path": "/", "port": 8080}, "timeoutSeconds": 1},
            "/app-health/cart/livez": {"tcpSocket": {"port": 8080}},
        }
    )
    cart = await mesh.sidecar("cart", CART, app_probes=probes)
    health = f"http://{mesh.addr(CART)}:{cart.ports['health']}/app-health"

    async def http_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    assert (await get(f"{health}/cart/readyz"))[0] == 503  # no app yet
    assert (await get(f"{health}/cart/livez"))[0] == 503
    server = await mesh.app(CART, http_app)
    assert (await get(f"{health}/cart/readyz"))[0] == 200
    assert (await get(f"{health}/cart/livez"))[0] == 200
    assert (await get(f"{health}/other/readyz"))[0] == 404
    server.close()


async def test_the_apps_metrics_are_served_with_the_sidecars_on_the_health_port(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus.io annotations on a meshed pod: a Prometheus outside the mesh is refused by the
    app's port (strict mTLS), so the injector points them at the sidecar, which serves its own
    metrics and the app's (fetched in the text format) on /stats/prometheus, as Istio merges them.
    The app not answering, or answering something else than the text format (an HTML page), leaves
    the sidecar's, with sidemesh_proxy_app_metrics_up 0. Scrapes at the same time share one fetch
    (the health port answers any pod: each scrape held the app's whole page anew)."""
    from prometheus_client.parser import text_string_to_metric_families

    import proxy.sidecar

    monkeypatch.setattr(proxy.sidecar, "MERGED_FOR_S", 0.2)
    asked: list[bytes] = []
    answer = {"type": b"text/plain; version=0.0.4"}

    async def metrics_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        asked.append(head)
        body = b"# HELP app_orders_total Orders.\n# TYPE app_orders_total counter\napp_orders_total 7\n"
        if answer["type"].startswith(b"text/html"):
            body = b"<html><body>the shop</body></html>"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n" % answer["type"])
        writer.write(b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    cart = await mesh.sidecar("cart", CART, app_metrics='{"port": 8080, "path": "/custom/metrics"}')
    url = f"http://{mesh.addr(CART)}:{cart.ports['health']}/stats/prometheus"

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
            text = resp.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    samples = await asyncio.to_thread(scrape)  # no app yet: the sidecar's alone
    assert samples["sidemesh_proxy_app_metrics_up"] == 0 and "app_orders_total" not in samples
    server = await mesh.app(CART, metrics_app)
    try:
        await asyncio.sleep(0.25)
        samples = await asyncio.to_thread(scrape)
        assert samples["app_orders_total"] == 7 and samples["sidemesh_proxy_app_metrics_up"] == 1
        assert len([n for n in samples if n.startswith("sidemesh_proxy_")]) > 3  # (the sidecar's own)
        assert asked[-1].startswith(b"GET /custom/metrics HTTP/1.1") and b"version=0.0.4" in asked[-1]
        await asyncio.sleep(0.25)
        fetched = len(asked)
        together = await asyncio.gather(*(asyncio.to_thread(scrape) for _ in range(6)))
        assert all(s["app_orders_total"] == 7 for s in together) and len(asked) == fetched + 1
        answer["type"] = b"text/html; charset=utf-8"  # (a web app answering any path)
        await asyncio.sleep(0.25)
        samples = await asyncio.to_thread(scrape)  # (parses: the page is left out)
        assert samples["sidemesh_proxy_app_metrics_up"] == 0 and "app_orders_total" not in samples
    finally:
        server.close()


async def test_a_classic_sidecars_drain_answers_the_apps_pre_stop_hook(mesh: Mesh) -> None:
    """Classic mode: the kubelet runs the app's preStop hook (rewritten to the health port) and
    stops the sidecar at the same moment. With no connection open the drain ended at once and took
    the health port with it: the hook's request got no answer and the app never drained. Now the
    drain waits (up to its timeout) until each recorded preStop hook has been answered."""
    import json as _json

    drained: list[float] = []

    async def http_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # the app's own drain
        drained.append(time.monotonic())
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    hook = {"httpGet": {"path": "/drain", "port": 8080}, "timeoutSeconds": 30}
    native = await mesh.sidecar(
        "frontend",
        FRONTEND,
        app_probes=_json.dumps({"/app-health/cart/prestop": {**hook, "drainWaits": False}}),
    )
    started = time.monotonic()
    await native.drain(timeout=10)  # native: the hooks ran before its SIGTERM, or never will: no wait
    assert time.monotonic() - started < 2
    probes = {"/app-health/cart/prestop": {**hook, "drainWaits": True}}  # (classic, as the injector says)
    cart = await mesh.sidecar("cart", CART, app_probes=_json.dumps(probes))
    server = await mesh.app(CART, http_app)
    try:
        drain = asyncio.create_task(cart.drain(timeout=10))
        await asyncio.sleep(0.1)  # (the hook's request comes as the drain has begun)
        status, body = await get(f"http://{mesh.addr(CART)}:{cart.ports['health']}/app-health/cart/prestop")
        assert (status, body["ok"]) == (200, True), body
        await asyncio.wait_for(drain, 5)
        assert drained and time.monotonic() - drained[0] < 2  # and then the drain went on at once
    finally:
        server.close()


async def test_quitquitquit_from_the_pod_asks_the_sidecar_to_stop(mesh: Mesh) -> None:
    """A Job's app, done, stops its classic sidecar (which would keep the pod running): Istio's
    POST /quitquitquit on 15020. GET is a 405 that names POST; only the pod's own containers
    (a loopback address) may ask."""
    from proxy.sidecar import _own_pod_only

    await frontend_and_cart(mesh)
    cart = mesh.sidecars["cart"]
    url = f"http://{mesh.addr(CART)}:{cart.ports['health']}/quitquitquit"

    def call(method: str) -> tuple[int, str]:
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.headers.get("allow", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("allow", "")

    assert await asyncio.to_thread(call, "GET") == (405, "POST")
    assert not cart.quit_requested.is_set()
    assert (await asyncio.to_thread(call, "POST"))[0] == 200
    assert cart.quit_requested.is_set()
    assert _own_pod_only("/quitquitquit", "10.0.0.7") is not None  # another pod: refused
    assert _own_pod_only("/quitquitquit", "::1") is None and _own_pod_only("/metrics", "10.0.0.7") is None


def _frontend_sidecar(mesh: Mesh, **listen: object) -> tuple[Sidecar, WorkloadIdentity]:
    """An unstarted frontend sidecar reading the mesh's directory, on the listen addresses given."""
    from proxy.config import ProxyConfig
    from sidemesh.spiffe import WorkloadId

    config = ProxyConfig(
        workload="shop/frontend-1",
        config_dir=mesh.config_dir,
        capture="none",
        app_host=mesh.addr(FRONTEND),
        trust_domain="cluster.local",
        **listen,  # type: ignore[arg-type]
    )
    identity = WorkloadIdentity(
        WorkloadId("shop", "frontend").spiffe_id("cluster.local"), mesh.ca.client(), lambda: "frontend-token"
    )
    return Sidecar(config, identity), identity


@pytest.mark.parametrize("option", ["--inbound-listen", "--health-listen", "--outbound"])
async def test_a_port_held_by_another_process_is_named_with_its_option(mesh: Mesh, option: str) -> None:
    """`proxy run` said "cannot listen: [Errno 98] Address already in use" without saying which of
    its five addresses it was."""
    from proxy.sidecar import ListenError

    host = mesh.addr(FRONTEND)
    with socket.socket() as held:  # a plain socket (no SO_REUSEPORT): the port is not shared
        held.bind((host, 0))
        held.listen()
        taken = f"{host}:{held.getsockname()[1]}"
        free = f"{host}:0"
        sidecar, identity = _frontend_sidecar(
            mesh,
            inbound_listen=taken if option == "--inbound-listen" else free,
            admin_listen=free,
            health_listen=taken if option == "--health-listen" else free,
            outbound=(f"{taken}=cart.shop:80",) if option == "--outbound" else (),
        )
        with pytest.raises(ListenError) as failed:
            await sidecar.start()
        await sidecar.drain(timeout=0)
        await identity.ca.close()
    assert (failed.value.option, failed.value.address) == (option, taken)


@pytest.mark.parametrize("shared", ["admin", "health", "inbound", "admin=health"])
async def test_a_second_sidecar_on_a_serving_sidecars_address_fails_to_start(mesh: Mesh, shared: str) -> None:
    """Every listener is bound with SO_REUSEPORT (a replacement starts during a drain), so a second
    sidecar started on an address another one serves (two local sidecars with the default admin and
    health addresses) shared its ports silently: /certs, readiness and metrics answered from either
    at random, an inbound port split callers between two identities. It fails to start now, naming
    the option; once the first one's drain has begun, a replacement starts (hand-over)."""
    from proxy.sidecar import ListenError

    host = mesh.addr(FRONTEND)
    with socket.socket() as probe:  # a port free now, for the first sidecar's listener
        probe.bind((host, 0))
        fixed = f"{host}:{probe.getsockname()[1]}"
    free = f"{host}:0"

    def sidecar() -> tuple[Sidecar, WorkloadIdentity]:
        return _frontend_sidecar(
            mesh,
            inbound_listen=fixed if shared == "inbound" else free,
            admin_listen=fixed if shared.startswith("admin") else free,
            health_listen=fixed if shared in ("health", "admin=health") else free,
        )

    if shared == "admin=health":  # one sidecar given one address twice: refused with its options
        from sidemesh.config import ConfigError

        with pytest.raises(ConfigError, match=f"--health-listen: '{fixed}' overlaps --admin-listen"):
            sidecar()
        return
    first, first_identity = sidecar()
    option = {"admin": "--admin-listen", "health": "--health-listen", "inbound": "--inbound-listen"}
    try:
        await first.start()
        second, second_identity = sidecar()
        with pytest.raises(ListenError) as failed:
            await second.start()
        await second.drain(timeout=0)
        await second_identity.ca.close()
        assert (failed.value.option, failed.value.address) == (option[shared], fixed)
        drain = asyncio.create_task(first.drain(timeout=5))
        await asyncio.sleep(0.1)
        replacement, replacement_identity = sidecar()
        await replacement.start()  # the first one drains: the hand-over goes on as before
        await replacement.drain(timeout=0)
        await replacement_identity.ca.close()
        await drain
    finally:
        await first.drain(timeout=0)
        await first_identity.ca.close()


async def _connect_with_no_descriptor_left(mesh: Mesh) -> float:
    """A connection to the frontend's outbound listener while this process (the sidecar's) has no
    file descriptor left: its accept fails (EMFILE); then the descriptors are free again. The
    process's CPU seconds meanwhile (0.4 s of wall time)."""
    from tests.support import fds

    client = socket.socket()
    client.setblocking(False)
    try:
        with fds.none_left(spare=8):
            with contextlib.suppress(BlockingIOError):
                client.connect((mesh.addr(FRONTEND), OUT))
            cpu = time.process_time()
            await asyncio.sleep(0.4)  # the sidecar's accept fails: no descriptor left
            return time.process_time() - cpu
    finally:
        client.close()


async def test_a_listener_goes_on_accepting_after_running_out_of_file_descriptors(mesh: Mesh) -> None:
    """One failed accept (EMFILE) ended the listener's accept loop for good, silently: the backlog
    filled and nothing was accepted again, though readiness said ready. Envoy backs off and goes on."""

    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    assert await talk(mesh.addr(FRONTEND), OUT, b"before") == b"BEFOREBYE"
    cpu = await _connect_with_no_descriptor_left(mesh)
    # backing off, not spinning (a listener readable all along woke the loop on every turn)
    assert cpu < 0.2, cpu
    assert all(not task.done() for _, task, _, _ in frontend._listeners)
    assert await talk(mesh.addr(FRONTEND), OUT, b"after") == b"AFTERBYE"
    errors = frontend.metrics.registry.get_sample_value(
        "sidemesh_proxy_connections_total", {"direction": "outbound", "decision": "accept_error"}
    )
    assert errors and errors >= 1


async def test_the_only_endpoint_is_not_dialled_again(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """A connection that could not reach cart's only endpoint tried it twice more (a black-holed
    address cost three connect timeouts, each logged "trying another")."""
    caplog.set_level(logging.INFO, "sidemesh.proxy.outbound")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)  # cart's sidecar: not running
    writer.write(b"hello")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    tries = [r for r in caplog.records if r.getMessage() == "endpoint unreachable; trying another"]
    refused = [r for r in caplog.records if r.getMessage() == "outbound connection refused"]
    assert tries == [] and len(refused) == 1, [r.getMessage() for r in caplog.records]


async def test_a_draining_listener_goes_on_accepting_after_a_failed_accept(mesh: Mesh) -> None:
    """During the drain's grace the app's outbound listeners still accept; one failed accept
    there ended the listener (the first fix returned on any failure while draining)."""

    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    drain = asyncio.create_task(frontend.drain(timeout=30, grace=2))
    await asyncio.sleep(0.2)
    await _connect_with_no_descriptor_left(mesh)
    try:
        assert await talk(mesh.addr(FRONTEND), OUT, b"grace") == b"GRACEBYE"
    finally:
        await drain
        mesh.sidecars.pop("frontend", None)


async def test_ready_means_listening(start_ca: StartCA, tmp_path: Path) -> None:
    """/healthz/ready said 200 one turn of the loop before the data listeners listened: a caller
    acting on it at once (a supervisor, a test harness) had its connection refused."""
    m = new_mesh(await start_ca(), tmp_path)
    (m.config_dir / "workloads.yaml").rename(tmp_path / "workloads.yaml")  # no configuration yet
    host = m.addr(CART)
    sidecar = _cart_sidecar(m, app_host=host, trust_domain="cluster.local")
    identity = sidecar.identity
    try:
        await sidecar.start()
        await identity.wait_ready()
        assert not sidecar.ready
        (tmp_path / "workloads.yaml").rename(m.config_dir / "workloads.yaml")
        sidecar.reload_config()  # what the config watch does (the controller's update alike)
        assert sidecar.ready
        socket.create_connection((host, INBOUND), timeout=2).close()  # no turn of the loop between
    finally:
        await sidecar.drain(timeout=0)
        await identity.ca.close()
        await m.close()


def test_claims_see_a_wildcard_and_a_specific_address_on_one_port_and_any_spelling() -> None:
    """The kernel lets a specific address and the wildcard on one port both bind (SO_REUSEPORT, one
    UID; the specific socket then takes that address's connections), and `0:0:0:0:0:0:0:0` or
    `localhost` are other spellings of claimed addresses: each started a second sidecar silently."""
    from proxy.sidecar import ListenError, _Claims

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first, second, third = _Claims(), _Claims(), _Claims()
    try:
        first.take("--health-listen", f"0.0.0.0:{port}", "0.0.0.0", port)
        for host in ("127.0.0.1", "0:0:0:0:0:0:0:0", "::"):
            with pytest.raises(ListenError):
                second.take("--health-listen", f"{host}:{port}", host, port)
        first.release()
        second.take("--health-listen", f"127.0.0.1:{port}", "127.0.0.1", port)
        for host in ("localhost", "0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1"):
            with pytest.raises(ListenError):
                third.take("--health-listen", f"{host}:{port}", host, port)
        # One sidecar given the wildcard and a specific address on one port (two options)
        second.release()
        third.take("--admin-listen", f"0.0.0.0:{port}", "0.0.0.0", port)
        with pytest.raises(ListenError):
            third.take("--health-listen", f"127.0.0.1:{port}", "127.0.0.1", port)
    finally:
        for claims in (first, second, third):
            claims.release()


WITHDRAWN = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
"""


async def test_a_connection_the_new_policy_no_longer_allows_is_closed(mesh: Mesh) -> None:
    """A rule withdrawn (to cut off a compromised caller) refused its new connections, and its open
    opaque TCP connection went on carrying data for as long as it stayed open; as Linkerd's inbound
    policy, the connection is closed when the configuration no longer allows it."""
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        writer.write(b"\x01before")  # not HTTP: carried as TCP
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"\x01BEFORE"
        mesh.write("allow.yaml", WITHDRAWN)
        assert cart.reload_config()
        with contextlib.suppress(ConnectionError):
            writer.write(b"after")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not echoed
    finally:
        writer.close()
    assert cart.metrics.denials.labels("shop/cart-allow-frontend")._value.get() == 1


async def test_a_connection_accepted_as_the_drain_starts_is_served(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain cancels the accept task and takes what is left in the queue. A connection the
    loop had accepted for that task in the same turn (``loop.sock_accept`` accepts in a callback)
    was lost: neither served nor in the queue any more (a reset, or a client waiting for good)."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    await mesh.app(CART, handler=app)
    cart = await mesh.sidecar("cart", CART, mode="permissive")
    served: list[int] = []
    serve = Sidecar._serve

    def spy(self: Sidecar, conn: socket.socket, addr: tuple[str, int], kind: str, target: str | None) -> Any:
        served.append(addr[1])
        return serve(self, conn, addr, kind, target)

    monkeypatch.setattr(Sidecar, "_serve", spy)
    await asyncio.sleep(0.1)
    client = socket.create_connection((mesh.addr(CART), INBOUND))
    port = client.getsockname()[1]
    client.sendall(b"POST /order HTTP/1.1\r\nHost: cart\r\ncontent-length: 0\r\n\r\n")
    drain = asyncio.create_task(cart.drain(timeout=3))  # in the turn that has the connection ready
    client.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=client)
    try:
        status = (await asyncio.wait_for(reader.read(), 8)).split(b"\r\n")[0]
    finally:
        writer.close()
        await drain
        del mesh.sidecars["cart"]
    assert status.startswith(b"HTTP/1.1 "), (status, served, port)  # answered (a denial: no policy allows it)
    assert port in served


async def test_connections_accepted_as_the_drain_ends_have_the_rest_of_its_timeout(mesh: Mesh) -> None:
    """Once the last connection ended, the drain closed the listeners and at once reset every
    connection still open as "drain timeout": those accepted since (the app's outbound listener
    is open until then) were cut a moment old, with most of the timeout left."""
    await frontend_and_cart(mesh)
    frontend = mesh.sidecars.pop("frontend")
    results: list[tuple[float, str]] = []
    stop = False

    async def caller() -> None:
        while not stop:
            started = time.monotonic()
            try:
                answer = await talk(mesh.addr(FRONTEND), OUT, b"x", timeout=3)
                results.append((started, "ok" if answer == b"XBYE" else repr(answer)))
            except Exception as exc:  # what the app saw
                results.append((started, repr(exc)))
            # Apart by a random pause: the listeners close once no connection is open, and callers
            # 2 ms apart kept one open for the whole 10-s timeout on a loaded machine (the drain
            # then ended at its timeout and reset the open ones, as it should).
            await asyncio.sleep(random.uniform(0.001, 0.015))

    # The case itself, every time: a connection accepted after the last one ended, just before
    # the listeners close (the callers above reach it only now and then).
    close_listeners = frontend._close_listeners
    late: list[asyncio.Task[bytes]] = []

    async def closing(kinds: tuple[str, ...]) -> list[asyncio.Task[None]]:
        if "outbound" in kinds:
            late.append(asyncio.create_task(talk(mesh.addr(FRONTEND), OUT, b"x", timeout=5)))
            for _ in range(2000):  # until it is accepted (a relay is open)
                if frontend.relays or late[0].done():
                    break
                await asyncio.sleep(0.001)
        return await close_listeners(kinds)

    frontend._close_listeners = closing  # type: ignore[method-assign]
    callers = [asyncio.create_task(caller()) for _ in range(3)]
    await asyncio.sleep(0.3)
    began = time.monotonic()
    await frontend.drain(timeout=30, grace=0.5)
    ended = time.monotonic()
    stop = True
    await asyncio.gather(*callers)
    assert late and await late[0] == b"XBYE"
    during = [r for t, r in results if began <= t < ended]
    assert during and not [r for r in during if r != "ok" and "Refused" not in r], during


@pytest.mark.parametrize(("hook_s", "grace_s", "call_after_s"), [(0.8, 0.4, 0.05), (0.3, 0.5, 0.4)])
async def test_a_classic_sidecars_grace_runs_again_once_the_apps_pre_stop_hook_is_answered(
    mesh: Mesh, hook_s: float, grace_s: float, call_after_s: float
) -> None:
    """The kubelet sends the app its SIGTERM when its preStop hook is answered: the app's calls
    while it shuts down come after that. The grace (5 s injected for classic sidecars) ran from the
    drain's start only: it had run out while a longer hook ran, or almost (a shorter one), and
    those calls were refused."""
    import json as _json

    async def pre_stop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(hook_s)  # the app's preStop (deregistering)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    await mesh.app(CART)
    await mesh.sidecar("cart", CART)
    hook = {"httpGet": {"path": "/drain", "port": 8080}, "timeoutSeconds": 30, "drainWaits": True}
    frontend = await mesh.sidecar(
        "frontend",
        FRONTEND,
        outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",),
        app_probes=_json.dumps({"/app-health/frontend/prestop": hook}),
    )
    server = await mesh.app(FRONTEND, pre_stop)
    mesh.sidecars.pop("frontend")
    try:
        drain = asyncio.create_task(frontend.drain(timeout=10, grace=grace_s))
        await asyncio.sleep(0.05)
        status, _ = await get(
            f"http://{mesh.addr(FRONTEND)}:{frontend.ports['health']}/app-health/frontend/prestop"
        )
        assert status == 200
        await asyncio.sleep(call_after_s)  # the app, SIGTERMed now, makes its last call
        assert await talk(mesh.addr(FRONTEND), OUT, b"flush", timeout=3) == b"FLUSHBYE"
        await asyncio.wait_for(drain, 5)
    finally:
        server.close()


async def test_quitquitquit_stops_without_the_grace() -> None:
    """/quitquitquit: the app is done, so no grace (Istio skips its drain there); SIGTERM drains whole."""
    from proxy.cli import stop_sidecar

    calls: list[dict[str, object]] = []

    class Drains:
        async def drain(self, **kwargs: object) -> None:
            calls.append(kwargs)

    await stop_sidecar(Drains(), quit_only=True)  # type: ignore[arg-type]
    await stop_sidecar(Drains(), quit_only=False)  # type: ignore[arg-type]
    assert calls == [{"grace": 0, "pre_stop": False}, {"grace": None, "pre_stop": True}]
