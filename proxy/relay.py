"""Relaying bytes between two transports: backpressure, half-close, resets, idle timeout.

A :class:`Relay` joins two :class:`Half` protocols. A *raw* half speaks plain TCP to an app (or a
destination outside the mesh); a *framed* half speaks `sidemesh/1` frames inside mTLS. Data read
from one half is written to the other; when a writer's buffer passes its high-water mark, the
reading half is paused (so a slow reader never makes the proxy buffer without bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
import typing
import weakref
from collections.abc import Callable

from proxy import detect, framing

log = logging.getLogger("sidemesh.proxy.relay")
_LINGER_RST = struct.pack("ii", 1, 0)
WRITE_HIGH_WATER = 256 * 1024
COPY_BELOW = 16 * 1024  # smaller DATA frames are joined with their header (one write, one record)
IDLE_TIMEOUT = "idle timeout"
PEER_IDLE_TIMEOUT = "idle timeout of the other sidecar"
# How long a relay that sent IDLE_CLOSE waits for the other sidecar's; without one, a reset (a
# sidecar that does not know the frame resets at once: this is for one that stopped answering).
IDLE_ANSWER_S = 5.0
STALLED = "bytes held for a reader that stopped reading (stalled, not idle): reset"
UNANSWERED = "no answer from the destination after an undecided detection"


def reset_socket(conn: socket.socket) -> None:
    """Close a socket no transport owns yet with a TCP RST."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    conn.close()


# A transport closed with data still to send waits to send it, and toward a peer that takes none
# of it (hung, partitioned, or one that sent its request, closed and never reads) it kept its socket
# and buffers for good: plain TCP ones always, TLS ones once the peer's close_notify had come.
# Progress is what the peer acknowledges (TCP_INFO), which a slow reader makes whichever layer holds
# the bytes (the SSL layer's buffer, the TCP transport's, the kernel's; the transports' own sizes
# move in steps between high-water marks, and a TLS transport's says nothing of the TCP one under
# it). A closed connection whose peer acknowledged nothing for FLUSH_STALL_S is cut: with a reset
# while bytes are still to be sent (the peer must not take what it got for the whole stream), with
# a FIN when only the close_notify exchange is left. 60 s: about what the kernel gives its own
# orphaned sockets that a peer keeps at a zero window (tcp_orphan_retries), far past Envoy's 1 s
# delayed close for HTTP; a reader paused longer than that after the end loses the end, and knows.
FLUSH_STALL_S = 60.0
# The TLS layer's own close timeout (asyncio's and uvloop's ssl_shutdown_timeout, 30 s by default,
# from the close whatever the progress) is set past the watch on every mesh connection, so the watch
# decides (a reset, logged and counted); it stays as a backstop for a peer that keeps taking a
# little (a cut there ends the stream without its EOF frame: the other sidecar resets its app).
TLS_SHUTDOWN_TIMEOUT_S = 2 * FLUSH_STALL_S
on_flush_cut: Callable[[], None] | None = None  # (the sidecar counts the cuts that lost bytes)
# Closed connections whose transports still hold something to send (under the watch above; a TLS
# one until its close_notify exchange ends): each keeps its socket and buffers, so they count
# against --max-connections (``Sidecar._serve``), or a client that closes and never reads could
# pile them up for 60 s each without bound. Counted per event loop (a test process runs many) and
# direction (the protocol's ``flush_direction``: the accepted connection's, or the pool's), with a
# token on the protocol (its ``flushing``) that its ``connection_lost`` gives back, once.


class FlushCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class FlushToken:
    """One closing connection's place in a count: given back once, by whichever protocol the
    transport ends with (``inbound._to_half`` hands a counted pipe's transport to a half)."""

    __slots__ = ("count", "given_back")

    def __init__(self, count: FlushCount) -> None:
        self.count = count
        self.given_back = False
        count.value += 1

    def give_back(self) -> None:
        if not self.given_back:
            self.given_back = True
            self.count.value -= 1


_flush_counts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, FlushCount]] = (
    weakref.WeakKeyDictionary()
)


def flushing(loop: asyncio.AbstractEventLoop, direction: str) -> FlushCount:
    """The closed connections of ``loop`` and ``direction`` still sending what they hold."""
    counts = _flush_counts.get(loop)
    if counts is None:
        counts = _flush_counts[loop] = {}
    count = counts.get(direction)
    if count is None:
        count = counts[direction] = FlushCount()
    return count


_TCP_INFO_LEN = 148
# tcpi_state (offset 0), tcpi_unacked (24), tcpi_bytes_acked (120, Linux 4.1), tcpi_notsent_bytes (144, 4.6)
_TCPI = struct.Struct("=B23xI92xQ16xI")
_TCPI_4_1 = struct.Struct("=B23xI92xQ")  # (before 4.6: no tcpi_notsent_bytes)
# tcpi_state, tcpi_retransmits (2), tcpi_probes (3), tcpi_backoff (4), tcpi_unacked, tcpi_notsent_bytes
_TCPI_STALL = struct.Struct("=BxBBB19xI116xI")


def close(transport: asyncio.BaseTransport | None) -> None:
    """Close after what is buffered is sent, unless the peer stops taking it (``FLUSH_STALL_S``)."""
    if transport is None or transport.is_closing():
        return
    transport.close()
    if not typing.cast(asyncio.WriteTransport, transport).get_write_buffer_size() and (
        transport.get_extra_info("ssl_object") is None
    ):
        return  # plain TCP with nothing held closes at once (the kernel sends the rest)
    loop = asyncio.get_running_loop()
    protocol = transport.get_protocol()
    direction = getattr(protocol, "flush_direction", None)  # (the proxy's own protocols: Half, Pipe)
    if direction is not None and protocol.flushing is None:  # type: ignore[attr-defined]
        protocol.flushing = FlushToken(flushing(loop, direction))  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    state = None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        state = flush_state(sock)
    if state is not None:
        # The socket only (on both loops its descriptor reads -1 once closed: never another
        # connection's), not the transport: a connection closed at once is not held meanwhile.
        loop.call_later(FLUSH_STALL_S, _check_flush, sock, state[0])
    elif sock is not None and sock.fileno() >= 0:  # no progress to watch (no TCP_INFO): a deadline
        loop.call_later(FLUSH_STALL_S, _cut_unwatched, transport, sock)


def _cut_unwatched(transport: asyncio.BaseTransport, sock: typing.Any) -> None:
    if sock.fileno() >= 0:  # (still open FLUSH_STALL_S after its close: reset, as a stall is)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        transport.abort()  # type: ignore[attr-defined]
        if on_flush_cut is not None:
            on_flush_cut()


def flushed(protocol: Half | typing.Any) -> None:
    """``protocol``'s transport is gone (``connection_lost``): no longer counted as flushing."""
    token = protocol.flushing
    if token is not None:
        protocol.flushing = None
        token.give_back()


def _tcp_info(sock: typing.Any) -> bytes | None:
    """The socket's TCP_INFO, or None once it is closed (or where it cannot be read)."""
    if sock.fileno() < 0:
        return None
    try:
        return bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN))
    except (OSError, ValueError):
        return None


def flush_state(sock: typing.Any) -> tuple[int, bool] | None:
    """(bytes the peer acknowledged, whether bytes are still unsent or unacknowledged in the
    kernel), or None once the socket is closed or where TCP_INFO says nothing (a state of 0: a
    sandbox's zeroed struct)."""
    info = _tcp_info(sock)
    if info is None:
        return None
    if len(info) >= _TCPI.size:
        state, unacked, acked, notsent = _TCPI.unpack_from(info)
    elif len(info) >= _TCPI_4_1.size:
        (state, unacked, acked), notsent = _TCPI_4_1.unpack_from(info), 1  # (unknown: taken as pending)
    else:
        return None
    return None if state == 0 else (acked, bool(unacked or notsent))


def _stuck(sock: typing.Any) -> bool:
    """Bytes in the socket that cannot go out, not merely in flight: held back by the peer's
    closed window (a reader that stopped reading), or sent and being retransmitted or probed for
    (a peer that stopped acknowledging). Unacknowledged bytes alone are in flight (the last round
    trip, a delayed ACK). Unknown (no TCP_INFO, a kernel before 4.6): not stuck."""
    info = _tcp_info(sock)
    if info is None or len(info) < _TCPI_STALL.size:
        return False
    state, retransmits, probes, backoff, unacked, notsent = _TCPI_STALL.unpack_from(info)
    return bool(state != 0 and (notsent > 0 or (unacked > 0 and (retransmits or probes or backoff) > 0)))


def _check_flush(sock: typing.Any, before: int) -> None:
    state = flush_state(sock)
    if state is None:
        return  # closed
    acked, pending = state
    if acked != before:
        asyncio.get_running_loop().call_later(FLUSH_STALL_S, _check_flush, sock, acked)
        return
    try:
        host, port = sock.getpeername()[:2]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except OSError:
        peer = "?"
    # Bytes still unsent or unacknowledged: they are lost, and the peer is told by a reset. None:
    # only the TLS close_notify exchange was left, the peer has everything (a FIN).
    (log.warning if pending else log.debug)(
        "closed connection cut: the peer took nothing for %.0f s",
        FLUSH_STALL_S,
        extra={"peer": peer, "unsent": pending},
    )
    with contextlib.suppress(OSError), sock.dup() as borrowed:  # (uvloop's own refuses shutdown)
        if pending:  # (a reset when the transport closes the socket: the peer is told)
            borrowed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        borrowed.shutdown(socket.SHUT_RDWR)  # its next write or read fails: it closes
    if pending and on_flush_cut is not None:
        on_flush_cut()


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with a TCP RST, so the other end sees a reset, not an orderly end of stream."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()  # type: ignore[attr-defined]


class Half(asyncio.Protocol):
    def __init__(self, relay: Relay, framed: bool, name: str) -> None:
        self.relay = relay
        self.framed = framed
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.decoder = framing.Decoder() if framed else None
        self.eof_in = False  # this side will send no more
        self.eof_out = False  # we told this side there is no more
        self.closing_idle = False  # (an app's half) the idle close began: nothing more goes on
        self.flushing: FlushToken | None = None  # closed, what it holds still going out (``close``)
        self.bytes_in = 0
        self._pending: list[bytes | memoryview] = []
        self._early: list[bytes | memoryview] = []  # data read before the other half exists
        self.on_frame: Callable[[int, bytes], None] | None = None  # control frames (OPEN, DENY)
        self.unchecked: bytes | None = None  # see ``check_opaque``
        self._first_line: detect.FirstLine | None = None  # ... and its first line, judged apart

    def check_opaque(self) -> None:
        """Refuse HTTP in what is relayed as opaque on a port not configured opaque: its first
        bytes are classified as detection would, as they go on (no request is whole before its
        request line is, and that decides). HTTP gets here from a sidecar that lies (its OPEN said
        opaque), or after every detection timed out (a client whose request comes late): relayed,
        it reached the app unparsed, with identity headers (x-forwarded-client-cert) of the
        caller's choosing."""
        self.unchecked = b""
        self._first_line = detect.FirstLine()

    @property
    def checking(self) -> bool:
        return self.unchecked is not None or self._first_line is not None

    def _checked(self, data: bytes | memoryview) -> bool:
        """Two judges, each until it decides: detection's (the first bytes, as ``classify``) and
        Python's servers' (the first line, however it began: ` GET`, `\\x16\\x03` are methods to
        them, and a TLS-looking record left detection undecided while its bytes went on). HTTP by
        either: refused, before the chunk that decides goes on."""
        before = self.unchecked
        if before is not None:
            seen = before + bytes(data[: detect.PEEK_BYTES - len(before)])  # (not a bulk chunk's copy)
            kind = detect.classify(seen) if seen else None
            if kind is not None and kind.http:
                self._refuse(kind.value)
                return False
            self.unchecked = seen if kind is None else None
        line = self._first_line
        if line is not None:
            verdict = line.feed(data)
            if verdict:
                self._refuse("http/1")
                return False
            if verdict is not None:
                self._first_line = None
        return True

    def ended_line_ok(self) -> bool:
        """At the end of the stream, with its first line still being judged: that line as it is
        decides (Python's servers serve a request line the end of the stream cut short)."""
        line = self._first_line
        if line is None or self.relay.closed:
            return True
        self._first_line = None
        if line.at_end():
            self._refuse("http/1")
            return False
        return True

    def _refuse(self, protocol: str) -> None:
        """HTTP where opaque bytes were announced: reset, logged and counted a denial (the reset
        alone was all an older client sidecar, whose detection missed a request, had to go by)."""
        reason = f"{protocol} sent on a connection relayed as opaque"
        self.unchecked = self._first_line = None  # (judged: once)
        self.relay.info.setdefault("denied", reason)
        self.relay.info["refused"] = reason  # (counted as refused when the relay closes)
        log.warning("connection refused", extra={**self.relay.info, "reason": reason, "side": self.name})
        self.relay.fail(f"{self.name}: {reason}")

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport but do not subclass it.
        self.transport = typing.cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        for chunk in self._pending:
            transport.write(chunk)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)  # also what the idle check watches: no clock read per chunk
        if self.decoder is None:
            # (the two attributes, not ``checking``: no call per chunk on the relay's path)
            if (self.unchecked is not None or self._first_line is not None) and not self._checked(data):
                return
            if self.closing_idle:  # sent as the connection closes: it cannot reach the other app
                self.relay.fail(f"{IDLE_TIMEOUT}: {self.name} sent data as the connection closed")
                return
            if self.peer is not None:
                self.peer.send(data)
            elif not self.relay.closed:
                self._early.append(data)
            return
        try:
            for kind, payload in self.decoder.feed(data):
                if kind == framing.DATA:
                    if self.eof_in and payload:  # (its end was passed on: the write would raise)
                        raise framing.FramingError("DATA after EOF")
                    if (self.unchecked is not None or self._first_line is not None) and not self._checked(
                        payload
                    ):
                        return
                    if self.peer is not None:
                        self.peer.send(payload)
                    elif not self.relay.closed:
                        self._early.append(payload)
                elif kind == framing.EOF:
                    self._got_eof()
                    if self.relay.closed:  # (refused: a request line the end cut short)
                        return
                elif kind == framing.IDLE_CLOSE:
                    self.relay.idle_close_received(self)
                    if self.relay.closed:
                        return
                elif self.on_frame is not None:
                    self.on_frame(kind, bytes(payload))
                else:
                    raise framing.FramingError(f"unexpected frame {kind}")
        except framing.FramingError as exc:
            self.relay.fail(f"{self.name}: {exc}")

    def eof_received(self) -> bool | None:
        if self.framed:
            if self.relay.closed:  # (e.g. after an idle close in order: the other side's close)
                pass
            elif not self.eof_in:  # TLS ended without an EOF frame: the stream was cut
                self.relay.fail(f"{self.name}: stream ended without EOF")
            close(self.transport)  # (TLS has no half-close: it would close itself, unwatched)
            return False
        self._got_eof()
        return True  # keep our write side open: TCP half-close

    @property
    def flush_direction(self) -> str | None:
        direction = self.relay.info.get("direction")
        return direction if isinstance(direction, str) else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flushing is not None:
            flushed(self)
        self.relay.lost(self, exc)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    # -- what the other half calls -----------------------------------------------------------

    def _got_eof(self) -> None:
        if not self.ended_line_ok():
            return
        self.eof_in = True
        if self.peer is not None:
            self.peer.send_eof()
        else:
            return
        self.relay.maybe_done()

    def write_raw(self, data: bytes | memoryview) -> None:
        if self.transport is None:
            self._pending.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def send(self, data: bytes | memoryview) -> None:
        if not self.framed:
            self.write_raw(data)
            return
        if len(data) < COPY_BELOW:  # the usual case (a request, a small response): one write
            self.write_raw(framing.data_header(len(data)) + data)
            return
        view = memoryview(data)
        for start in range(0, len(view), framing.MAX_DATA):
            chunk = view[start : start + framing.MAX_DATA]
            if len(chunk) < COPY_BELOW:
                self.write_raw(framing.data_header(len(chunk)) + chunk)  # one small TLS record
            else:  # large: no copy of the payload, the header goes in a record of its own
                self.write_raw(framing.data_header(len(chunk)))
                self.write_raw(chunk)

    def send_eof(self) -> None:
        if self.eof_out:
            return
        self.eof_out = True
        if self.framed:
            self.write_raw(framing.EOF_FRAME)
        elif (
            self.transport is not None and self.transport.can_write_eof() and not self.transport.is_closing()
        ):
            self.transport.write_eof()


class Relay:
    """Two halves and their shared fate. ``on_close`` is told once, with how it ended."""

    def __init__(
        self, on_close: Callable[[Relay, str], None] | None = None, idle_timeout: float = 3600.0
    ) -> None:
        self.on_close = on_close
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.started = time.monotonic()
        self.halves: list[Half] = []
        self.closed = False
        self.outcome = ""
        self._idle_handle: asyncio.TimerHandle | None = None
        self._answer_handle: asyncio.TimerHandle | None = None
        self._seen = 0
        self.info: dict[str, object] = {}
        self.on_fail: Callable[[], None] | None = None  # an HTTP connection has no halves: reset it
        self.pipes: list[typing.Any] = []  # an HTTP connection's downstream (proxy.pipe.Pipe): its bytes
        self.bytes_reported = 0  # of its halves' and pipes' bytes_in, counted in the metrics so far
        # An inbound connection a policy let through as a whole (opaque TCP, a WebSocket after its
        # 101): decides again under the configuration in force (Sidecar._recheck_connections).
        self.recheck: Callable[[], typing.Any] | None = None

    def half(self, framed: bool, name: str) -> Half:
        h = Half(self, framed, name)
        self.halves.append(h)
        return h

    def link(self, a: Half, b: Half) -> None:
        if self.closed:  # one side already failed (e.g. DENY arrived before the app was attached)
            for h in (a, b):
                reset(h.transport)
            return
        a.peer, b.peer = b, a
        self.info["linked"] = True
        for src, dst in ((a, b), (b, a)):
            for chunk in src._early:
                dst.send(chunk)
            src._early.clear()
            if src.eof_in:
                dst.send_eof()
            if src.transport is not None and not src.transport.is_closing():
                src.transport.resume_reading()
        self._arm_idle()
        self.maybe_done()

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        if self._idle_handle is not None:  # (one chain of checks, whoever calls)
            self._idle_handle.cancel()
        self._idle_handle = loop.call_later(min(self.idle_timeout / 2, 60.0), self._check_idle)

    def _check_idle(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        seen = sum(h.bytes_in for h in self.halves)
        if seen != self._seen:  # traffic since the last check
            self._seen, self.last_activity = seen, now
        elif now - self.last_activity >= self.idle_timeout:
            self.close_idle()
            return
        self._arm_idle()

    def _stalled(self) -> bool:
        """Bytes held for a reader (an app, or the other sidecar) that stopped taking them: not an
        idle connection, and not one to end in order (its end would pass for the whole stream).
        Held by the transport, or stuck in a socket (``_stuck``: a reader whose receive buffer is
        full can leave everything there). Bytes in flight are not held: they arrive before the
        end, which TCP sends after them."""
        for h in self.halves:
            t = h.transport
            if t is None or t.is_closing() or t.get_write_buffer_size():
                return True
            sock = t.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and _stuck(sock):
                return True
        return False

    def _unread(self) -> bool:
        """An app sent bytes that are still in the kernel, not yet read: the end must not pass them
        by (closing the socket would reset its sender, and the other app would get a clean end)."""
        for h in self.halves:
            t = h.transport
            sock = None if h.framed or t is None else t.get_extra_info("socket")
            if sock is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]:
                    return True
        return False

    def close_idle(self) -> None:
        """The idle timeout: an orderly end both ways, as Envoy's TCP proxy closes at its idle
        timeout (the apps see the end of the stream, not a reset). Between two sidecars it takes
        both (``framing.IDLE_CLOSE``): this one stops forwarding from its app and asks; the other
        answers and ends its app's side (``idle_close_received``), or resets when it holds bytes;
        on the answer, everything the other app sent before it has been passed on, and this app's
        side ends too. A stalled connection is reset, as is one whose app sends meanwhile (what it
        sent cannot arrive: the reset tells it)."""
        if self._stalled():
            self.fail(f"{IDLE_TIMEOUT}: {STALLED}")
            return
        if self._unread():  # an app sent in this very moment: not idle after all
            self.last_activity = time.monotonic()
            self._arm_idle()
            return
        framed = [h for h in self.halves if h.framed]
        if not framed:  # (plaintext both ways: no other sidecar to ask)
            self._end_in_order(IDLE_TIMEOUT)
            return
        for h in self.halves:
            h.closing_idle = not h.framed
        framed[0].write_raw(framing.IDLE_CLOSE_FRAME)
        self._idle_handle = asyncio.get_running_loop().call_later(IDLE_ANSWER_S, self._no_idle_answer)

    def _no_idle_answer(self) -> None:
        if not self.closed:
            self.fail(f"{IDLE_TIMEOUT}: no answer from the other sidecar")

    def idle_close_received(self, half: Half) -> None:
        """The other sidecar's IDLE_CLOSE: the answer to ours, or its own idle timeout (then
        answered, after everything our app sent before it, unless bytes are held here)."""
        if self.closed:
            return
        if any(h.closing_idle for h in self.halves):  # ours went first (or both at once)
            self._end_in_order(IDLE_TIMEOUT)
            return
        if self._stalled():
            self.fail(f"{PEER_IDLE_TIMEOUT}: {STALLED}")
            return
        if self._unread():  # (the app sent in this very moment: it was not idle after all)
            self.fail(f"{PEER_IDLE_TIMEOUT}: the app sent data as the connection closed: reset")
            return
        half.write_raw(framing.IDLE_CLOSE_FRAME)
        self._end_in_order(PEER_IDLE_TIMEOUT)

    def _end_in_order(self, outcome: str) -> None:
        """Close every side after what it holds: a FIN to an app (bytes it sends from now on are
        answered with a reset by its kernel), TLS's close_notify to the other sidecar."""
        self._finish(outcome)
        for h in self.halves:
            close(h.transport)

    def require_answer(self, half: Half, within: float) -> None:
        """Close (``UNANSWERED``) unless ``half`` has sent a byte ``within`` seconds from now: a
        connection that gave no sign of its protocol is kept only once the other end speaks."""
        self._answer_handle = asyncio.get_running_loop().call_later(
            max(within, 0.0), self._check_answer, half
        )

    def _check_answer(self, half: Half) -> None:
        if not self.closed and half.bytes_in == 0:
            self.fail(UNANSWERED)

    def maybe_done(self) -> None:
        if all(h.eof_in for h in self.halves) and len(self.halves) == 2:
            self._finish("closed")
            for h in self.halves:
                close(h.transport)

    def fail(self, why: str) -> None:
        """Reset both sides (the apps see a connection reset)."""
        if not why.startswith(IDLE_TIMEOUT) and any(h.closing_idle for h in self.halves):
            why = f"{IDLE_TIMEOUT}: {why}"  # (e.g. reset by the other sidecar: the close it asked for)
        self._finish(why)
        for h in self.halves:
            reset(h.transport)
        if self.on_fail is not None:
            self.on_fail()

    def lost(self, half: Half, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None:
            self.fail(f"{half.name}: {exc.__class__.__name__}")
            return
        if not half.eof_in:  # closed without sending all it meant to: pass the close on
            half.eof_in = True
            if half.framed:
                self.fail(f"{half.name}: closed without EOF")
                return
            if half.peer is not None:
                half.peer.send_eof()
        elif half.framed and not half.eof_out:
            # The other sidecar is gone (it died: its kernel closed the connection) after its own
            # direction ended but before ours did: what our app sends next would be dropped and
            # its close look clean. Both apps get a reset, as Envoy closes both sides.
            self.fail(f"{half.name}: closed before the stream's end")
            return
        peer = half.peer
        if peer is not None and peer.transport is not None and peer.eof_in:
            self._finish("closed")
            close(peer.transport)

    def end(self, outcome: str) -> None:
        """The connection is over (an HTTP connection, which ends without halves)."""
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.outcome = outcome
        for handle in (self._idle_handle, self._answer_handle):
            if handle is not None:
                handle.cancel()
        self._idle_handle = self._answer_handle = None
        if self.on_close is not None:
            self.on_close(self, outcome)
        try:
            asyncio.get_running_loop().call_soon(self._release)  # after the closes this turn makes
        except RuntimeError:  # no loop (a unit test driving the relay by hand)
            self._release()

    def _release(self) -> None:
        """Unlink the halves, the relay and the callbacks of a finished connection. Without this they
        form reference cycles that only a full GC collection frees: in a busy sidecar that comes
        rarely, and dead connections (each with uvloop's 256 KiB TLS read buffer) pile up by the
        hundred. Unlinked, a connection is freed as soon as its transports let go of it."""
        for h in self.halves:
            h.peer = None
            h.on_frame = None
        self.halves = []
        self.on_close = self.on_fail = None
        self.recheck = None  # (a WebSocket's holds its router, which holds this relay)

    def close_gracefully(self) -> None:
        for h in self.halves:
            close(h.transport)
