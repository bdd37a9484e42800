"""An opaque TCP connection at its idle timeout ends in order both ways, as behind Envoy's TCP proxy:
both apps read the end of the stream, not a reset (``Relay.close_idle``, the IDLE_CLOSE frame).
A reset is kept for what an orderly end would hide: bytes held for a reader that stopped (a
stalled connection), bytes an app sends as the close begins, a sidecar that does not answer.

Each app here is a raw non-blocking socket, read to its end: "eof" or "reset", and after an end
of stream ``SO_ERROR`` again a moment later (a FIN followed by a reset is a reset)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from proxy import framing
from proxy import relay as relay_module
from proxy.relay import Half, Relay
from proxy.sidecar import Sidecar
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, INBOUND, Mesh, new_mesh

FRONTEND, CART = 1, 2
OUT = 18080
IDLE_S = 0.4


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


class Apps:
    """The cart app's listening socket (what it accepts, handed to the test) and the frontend app's
    connections, both raw."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.listener = socket.create_server((mesh.addr(CART), 8080))
        self.listener.setblocking(False)
        self.sockets = [self.listener]

    async def connect(self, to: tuple[str, int] | None = None) -> tuple[socket.socket, socket.socket]:
        """(the frontend app's socket, the cart app's), after one line each way; ``to``: where the
        client connects (the frontend sidecar's outbound listener)."""
        loop = asyncio.get_running_loop()
        client = socket.socket()
        self.sockets.append(client)
        client.setblocking(False)
        await loop.sock_connect(client, to or (self.mesh.addr(FRONTEND), OUT))
        await loop.sock_sendall(client, b"hello\n")  # (decisive: not HTTP, no detection wait)
        server, _ = await asyncio.wait_for(loop.sock_accept(self.listener), 5)
        self.sockets.append(server)
        server.setblocking(False)
        assert await _read_exactly(server, 6) == b"hello\n"
        await loop.sock_sendall(server, b"HELLO\n")
        assert await _read_exactly(client, 6) == b"HELLO\n"
        return client, server

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def apps(mesh: Mesh) -> Iterator[Apps]:
    a = Apps(mesh)
    yield a
    a.close()


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, n - len(out)), 5)
        assert chunk, f"end of stream after {out!r}"
        out += chunk
    return out


async def how_it_ends(sock: socket.socket, within: float = 10.0) -> tuple[str, bytes]:
    """("eof" | "reset" | "open", what was read first)."""
    got = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        except ConnectionResetError:
            return "reset", got
        if not chunk:
            await asyncio.sleep(0.2)  # a reset right after the FIN would show now
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return ("reset" if error == errno.ECONNRESET else "eof"), got
        got += chunk
    return "open", got


async def sidecars(mesh: Mesh, short: str, idle: float = IDLE_S) -> dict[str, Sidecar]:
    cart = await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    both = {"frontend": frontend, "cart": cart}
    both[short].config = dataclasses.replace(both[short].config, idle_timeout=dt.timedelta(seconds=idle))
    return both


async def no_relays(*scs: Sidecar) -> None:
    for _ in range(200):
        if not any(sc.relays for sc in scs):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("a relay is still open")


def idle_closes(sc: Sidecar, direction: str) -> float:
    return float(sc.metrics.timed_out.labels(direction, "idle")._value.get())


@pytest.mark.parametrize("short", ["frontend", "cart"])
async def test_both_apps_read_the_end_of_the_stream(mesh: Mesh, apps: Apps, short: str) -> None:
    scs = await sidecars(mesh, short)
    client, server = await apps.connect()
    started = time.monotonic()
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert ends == [("eof", b""), ("eof", b"")]
    assert 0.3 < time.monotonic() - started < 3  # (checked every half of the timeout)
    await no_relays(*scs.values())
    # Counted as an idle close by both sidecars (the other one's timer, the same idleness).
    assert idle_closes(scs["frontend"], "outbound") == 1
    assert idle_closes(scs["cart"], "inbound") == 1


@pytest.mark.parametrize("short", ["frontend", "cart"])
@pytest.mark.parametrize("shut", ["client", "server"])
async def test_a_half_closed_connection_ends_in_order(mesh: Mesh, apps: Apps, short: str, shut: str) -> None:
    """One app ended its side earlier (the other read that end); the other direction went idle:
    both ends still end in order (the one that shut reads the end of the stream)."""
    scs = await sidecars(mesh, short)
    client, server = await apps.connect()
    quiet, other = (client, server) if shut == "client" else (server, client)
    quiet.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    assert await how_it_ends(other) == ("eof", b"")  # the half-close, passed on at once
    assert time.monotonic() - started < 0.3 + 0.1
    assert await how_it_ends(quiet) == ("eof", b"")  # the idle close: the rest of the stream
    assert time.monotonic() - started > 0.3
    await no_relays(*scs.values())
    await asyncio.sleep(0.2)
    assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # (no reset after it either)


@pytest.mark.parametrize("short", ["frontend", "cart"])
@pytest.mark.parametrize("stalled", ["client", "server"])
async def test_a_stalled_connection_is_reset(mesh: Mesh, apps: Apps, short: str, stalled: str) -> None:
    """A reader that stopped reading with bytes held for it: stalled, not idle, whichever app
    stopped and whichever sidecar's timeout it is (the one asking finds it, or the one asked).
    An orderly end would pass for the whole stream: a reset, both ways. (With the reader's kernel
    taking a lot, the bytes can all be held in a sidecar's socket, none in its transport.)"""
    await sidecars(mesh, short, idle=0.5)
    client, server = await apps.connect()
    reader, sender = (client, server) if stalled == "client" else (server, client)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    with contextlib.suppress(BlockingIOError, ConnectionError):
        while sent < 64 << 20:  # far more than the sockets and the sidecars buffer
            sent += sender.send(b"x" * 65536)
    assert sent < 64 << 20, "nothing held anywhere: the test does not stall the connection"
    await asyncio.sleep(2)  # idle (nothing moves) for several timeouts, bytes held
    ends = await asyncio.gather(how_it_ends(sender), how_it_ends(reader, within=20))
    assert [end for end, _ in ends] == ["reset", "reset"]


async def test_both_sidecars_at_once(mesh: Mesh, apps: Apps) -> None:
    """Both timeouts in the same turn: the IDLE_CLOSE frames cross, each is the other's answer."""
    scs = await sidecars(mesh, "frontend", idle=3600)
    client, server = await apps.connect()
    relays = [next(iter(sc.relays)) for sc in scs.values()]
    for relay in relays:
        relay.close_idle()
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert ends == [("eof", b""), ("eof", b"")]
    await no_relays(*scs.values())
    assert [r.outcome for r in relays] == ["idle timeout", "idle timeout"]
    assert idle_closes(scs["frontend"], "outbound") == idle_closes(scs["cart"], "inbound") == 1


async def test_bytes_arriving_at_the_timeout_keep_the_connection_open(mesh: Mesh, apps: Apps) -> None:
    """The app's bytes are in the kernel, not read yet, as the timeout fires: not idle after all.
    The connection stays open (and the timeout waits another period)."""
    scs = await sidecars(mesh, "frontend", idle=3600)
    client, server = await apps.connect()
    relay = next(iter(scs["frontend"].relays))
    client.send(b"more\n")  # (on loopback, in the sidecar's receive queue when send returns)
    relay.close_idle()
    assert not relay.closed and not any(h.closing_idle for h in relay.halves)
    assert await _read_exactly(server, 5) == b"more\n"
    server.send(b"MORE\n")
    assert await _read_exactly(client, 5) == b"MORE\n"
    assert not relay.closed


async def test_bytes_in_flight_as_the_close_crosses_them_arrive_first(mesh: Mesh, apps: Apps) -> None:
    """The caller's last bytes are still in flight (sent, not yet acknowledged: a delayed ACK) when
    the cart's sidecar asks: not held for a reader that stopped, so the close is in order and
    they arrive before the end (TCP delivers them ahead of the answer)."""
    scs = await sidecars(mesh, "frontend", idle=3600)
    client, server = await apps.connect()
    relay = next(iter(scs["cart"].relays))
    client.send(b"late\n")
    await asyncio.sleep(0.005)  # (passed on by the frontend's sidecar; the ACK for it is delayed)
    relay.close_idle()
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert ends == [("eof", b""), ("eof", b"late\n")]
    await no_relays(*scs.values())


def _deferred(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[Relay], None], delay: float = 0.3
) -> list[Relay]:
    """The answering relay handles IDLE_CLOSE ``delay`` late, after ``before(relay)``."""
    original = Relay.idle_close_received
    seen: list[Relay] = []

    def deferred(self: Relay, half: Half) -> None:
        if any(h.closing_idle for h in self.halves):  # (the asking side: its answer, at once)
            original(self, half)
            return
        seen.append(self)
        before(self)
        if delay:
            asyncio.get_running_loop().call_later(delay, original, self, half)
        else:
            original(self, half)

    monkeypatch.setattr(Relay, "idle_close_received", deferred)
    return seen


@pytest.mark.parametrize("short", ["frontend", "cart"])
async def test_what_the_other_app_sent_before_the_answer_arrives_first(
    mesh: Mesh, apps: Apps, short: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answering side passes on what its app sent until it answers; the asking side delivers
    it before the end of the stream."""
    scs = await sidecars(mesh, short)
    client, server = await apps.connect()
    other = server if short == "frontend" else client  # the app behind the answering sidecar
    seen = _deferred(monkeypatch, lambda relay: other.send(b"late\n"))
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert len(seen) == 1
    late = ("eof", b"late\n")
    assert ends == ([late, ("eof", b"")] if short == "frontend" else [("eof", b""), late])
    await no_relays(*scs.values())


@pytest.mark.parametrize("short", ["frontend", "cart"])
async def test_what_the_other_app_sends_in_the_same_moment_is_not_passed_by(
    mesh: Mesh, apps: Apps, short: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other app's bytes arrive in the turn the IDLE_CLOSE is handled, still unread: closing
    then would reset their sender and give the asking app a clean end without them. Both reset."""
    scs = await sidecars(mesh, short)
    client, server = await apps.connect()
    other = server if short == "frontend" else client  # the app behind the answering sidecar

    def send_now(relay: Relay) -> None:
        other.send(b"late\n")
        time.sleep(0.05)  # (in the kernel, not read yet: one busy turn of the loop)

    seen = _deferred(monkeypatch, send_now, delay=0)
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert len(seen) == 1
    assert [end for end, _ in ends] == ["reset", "reset"]
    await no_relays(*scs.values())


@pytest.mark.parametrize("short", ["frontend", "cart"])
async def test_an_app_that_sends_as_the_close_begins_is_reset(
    mesh: Mesh, apps: Apps, short: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the asking side's app sends after the ask cannot arrive (the other side may have
    ended its app's stream already): that app is told by a reset, never a clean end."""
    scs = await sidecars(mesh, short)
    client, server = await apps.connect()
    asking = client if short == "frontend" else server
    seen = _deferred(monkeypatch, lambda relay: asking.send(b"too late\n"), delay=0.5)
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert len(seen) == 1
    assert ends[0 if short == "frontend" else 1][0] == "reset"
    # (the reset reaches the other sidecar before its delayed answer: its app is reset too)
    assert ends[1 if short == "frontend" else 0] == ("reset", b"")
    await no_relays(*scs.values())
    assert idle_closes(scs[short], "outbound" if short == "frontend" else "inbound") == 1


@pytest.mark.parametrize("answer", ["never", "unknown frame"])
async def test_without_an_answer_both_apps_are_reset(
    mesh: Mesh, apps: Apps, answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other sidecar stopped answering, or is an older one that does not know IDLE_CLOSE (it
    resets, as both did before): the apps are reset, never left open or told a clean end."""
    original = Relay.idle_close_received

    def other(self: Relay, half: Half) -> None:
        if any(h.closing_idle for h in self.halves):
            original(self, half)

    if answer == "never":
        monkeypatch.setattr(Relay, "idle_close_received", other)
    else:  # an older sidecar's decoder (the asking one never decodes the frame here)
        monkeypatch.setattr(framing, "_KNOWN", framing._KNOWN - {framing.IDLE_CLOSE})
    monkeypatch.setattr(relay_module, "IDLE_ANSWER_S", 0.5)
    scs = await sidecars(mesh, "frontend")
    client, server = await apps.connect()
    started = time.monotonic()
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert ends == [("reset", b""), ("reset", b"")]
    if answer == "never":
        assert time.monotonic() - started > 0.5 + IDLE_S
    await no_relays(*scs.values())
    assert idle_closes(scs["frontend"], "outbound") == 1  # (the asking side counts its timeout)


async def test_without_another_sidecar_both_apps_get_a_fin(mesh: Mesh, apps: Apps) -> None:
    """A plaintext caller of a permissive sidecar (allowed as the unauthenticated principal): no
    other sidecar to ask, both sides end at once."""
    mesh.write(
        "allow-plain.yaml",
        ALLOW_FRONTEND.replace("cart-allow-frontend", "cart-allow-plain").replace(
            "serviceAccount: frontend", "unauthenticated: true"
        ),
    )
    cart = await mesh.sidecar("cart", CART, mode="permissive")
    cart.config = dataclasses.replace(cart.config, idle_timeout=dt.timedelta(seconds=IDLE_S))
    client, server = await apps.connect((mesh.addr(CART), INBOUND))
    started = time.monotonic()
    ends = await asyncio.gather(how_it_ends(client), how_it_ends(server))
    assert ends == [("eof", b""), ("eof", b"")]
    assert 0.3 < time.monotonic() - started < 3
    await no_relays(cart)
    assert idle_closes(cart, "inbound") == 1


def test_the_frame_is_known_and_empty() -> None:
    decoder = framing.Decoder()
    assert decoder.feed(framing.EOF_FRAME + framing.IDLE_CLOSE_FRAME) == [
        (framing.EOF, b""),
        (framing.IDLE_CLOSE, b""),
    ]
    assert framing.IDLE_CLOSE_FRAME == b"\x06\x00\x00\x00\x00"
