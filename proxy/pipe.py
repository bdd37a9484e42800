"""A connection as awaitable reads and writes, for the HTTP layer: raw TCP, or `sidemesh/1` DATA
frames inside mTLS. Reading pauses the transport when unread bytes pass a limit, and ``drain``
waits while the transport's write buffer is above its high-water mark: a slow reader never makes
the proxy buffer a body without bound."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
import typing

from proxy import framing
from proxy.relay import WRITE_HIGH_WATER, FlushToken, close, flush_state, flushed, reset

READ_LIMIT = 256 * 1024


class PipeClosed(ConnectionError):
    pass


# Closing with unread bytes resets the connection, and a peer that has not read what was sent last
# (an answer, a GOAWAY) loses it (RFC 9112 9.6). So: half-close, read and drop what comes for up to
# this long (Envoy's delayed_close_timeout, 1 s) and LINGER_MAX bytes, then close. After an answer
# to a request whose body is still coming (a denial, the app's early 413), the body is given
# longer: until the client is silent for LINGER_S, up to LINGER_UPLOAD_MAX and LINGER_UPLOAD_S
# (a client writes its whole body before it reads, as most do: with 1 MiB, an answer before the
# end of a larger upload was reset away). Not for refused heads, timeouts or HTTP/2 errors: a
# client the sidecar has just cut off gets no more of its time.
LINGER_S = 1.0
LINGER_MAX = 1 << 20
LINGER_UPLOAD_S = 30.0
LINGER_UPLOAD_MAX = 64 << 20


async def linger_close(pipe: Pipe, idle: bool = False, upload: bool = False) -> None:
    """Close after the last thing sent without resetting it away: see ``LINGER_S``. With ``idle``
    (an idle `sidemesh/1` connection: the idle timeout, a drain), the EOF says so and what comes
    meanwhile is answered UNREAD, once: the client sidecar sends that request again on another
    connection (a POST too: the app never saw it). With ``upload``, the rest of a request body the
    answer came before is dropped as long as it keeps coming (``LINGER_UPLOAD_S``)."""
    pipe.write_eof(idle)
    deadline = time.monotonic() + (LINGER_UPLOAD_S if upload else LINGER_S)
    most = LINGER_UPLOAD_MAX if upload else LINGER_MAX
    dropped = 0
    try:
        with contextlib.suppress(PipeClosed, ConnectionError):
            while dropped < most and (remaining := deadline - time.monotonic()) > 0:
                if not await pipe.wait_input(min(LINGER_S, remaining)) or not (data := await pipe.read()):
                    break
                if idle and not dropped:
                    pipe.write_frame(framing.UNREAD_FRAME)
                dropped += len(data)
    finally:  # (cancelled too: a drain's end)
        pipe.close()


class Pipe(asyncio.Protocol):
    def __init__(self, framed: bool, name: str = "", direction: str | None = None) -> None:
        self.framed = framed
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.decoder: framing.Decoder | None = framing.Decoder() if framed else None
        self._buf: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._reader: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self._out: list[bytes] = []  # written in this turn of the loop, not yet flushed
        self._out_len = 0
        self._flush_scheduled = False
        self.denied: bytes | None = None  # a client's pipe: the DENY frame's reason, if one came
        self.idle_closed = False  # the other side's EOF said it closes an idle connection
        self.left_unread = False  # ... and then that it dropped what we sent unread (UNREAD frame)
        self.on_control: typing.Callable[[int, bytes], None] | None = None
        # Called once when the other side ends (EOF or loss), e.g. to give up what was done for it.
        self.on_end: typing.Callable[[], None] | None = None
        # Given the bytes as they arrive, when nothing is buffered, instead of buffering them for
        # ``read`` (HTTP/1.1's plain exchanges in callbacks: ``proxy.http1._Lane``), which gives
        # the reader what it does not finish itself with ``hand_back``.
        self.on_data: typing.Callable[[bytes], None] | None = None
        self.handed: object = None  # what ``hand_back`` gave the reader, until it takes it
        # Python 3.11's get_running_loop() costs a getpid() system call: once per pipe, not per read.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_period = 1.0
        self._ticked = False
        self.bytes_in = 0  # as received (framing included), for the metrics and /connections
        # Given the bytes received since the last report (``report_bytes``: every few seconds while
        # the connection is open, and when it ends): a pooled upstream's, in its pool's direction.
        self.count_bytes: typing.Callable[[int], None] | None = None
        self._bytes_reported = 0
        self.open_first = False  # an accepted mesh connection: nothing but OPEN may come first
        self.flushing: FlushToken | None = None  # closed, what it holds still going out (``close``)
        self.flush_direction = direction  # what it counts in while it flushes (``relay.close``)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        on_data = self.on_data
        if self.decoder is None:
            if on_data is not None and not self._buf:
                on_data(data)
                return
            self._push(data)
            self._wake()
            return
        if on_data is not None and not self._buf and not self._eof and not self.open_first:
            whole = self.decoder.whole_data(data)  # (one whole DATA frame: no frame list to make)
            if whole is not None:
                on_data(whole)
                return
        try:
            for kind, payload in self.decoder.feed(data):
                if kind == framing.DATA:
                    if self._eof and payload:  # (as a relay's half: the peer said it was done)
                        raise framing.FramingError("DATA after EOF")
                    if self.open_first:
                        raise framing.FramingError("DATA before OPEN")
                    if self.on_data is not None and not self._buf and payload:
                        self.on_data(bytes(payload))
                    else:
                        self._push(bytes(payload))
                elif kind == framing.EOF:
                    if self.open_first:
                        raise framing.FramingError("EOF before OPEN")
                    self._eof = True
                    self.idle_closed = payload == framing.IDLE
                    self._ended()
                elif kind == framing.UNREAD:
                    # Once, after an idle EOF, as the frame means (taken anywhere, between 1-byte
                    # DATA frames they kept a buffered object per byte: a read's DATA is one piece
                    # only between control frames).
                    if not self.idle_closed or self.left_unread:
                        raise framing.FramingError("UNREAD not once after an idle EOF")
                    self.left_unread = True
                elif self.on_control is not None:
                    self.on_control(kind, bytes(payload))
                elif kind == framing.DENY and self.denied is None:
                    self.denied = bytes(payload)
                else:  # (every one was kept: a peer could grow the caller's memory without bound)
                    raise framing.FramingError(f"unexpected frame {kind}")
        except framing.FramingError as exc:
            self._lost = exc
            self.abort()
        if on_data is None or self._buf or self._eof:  # (else what came went to on_data: nothing new
            self._wake()  # for a reader; what on_data hands back wakes it itself)

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > READ_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.framed and not self._eof:
            self._lost = PipeClosed(f"{self.name}: stream ended without EOF")
        self._eof = True
        self._wake()
        self._ended()
        if self.framed:  # (TLS has no half-close: it would close itself, unwatched)
            close(self.transport)
        return not self.framed  # raw: keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flushing is not None:
            flushed(self)
        self._closed = True
        self.stop_ticks()
        self.report_bytes()
        self.count_bytes = None
        self.on_control = None  # a closure that holds this pipe: no cycle outlives the connection
        if exc is not None and self._lost is None:
            self._lost = exc
        self._eof = True
        self._wake()
        self._ended()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._get_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _ended(self) -> None:
        hook, self.on_end = self.on_end, None
        if hook is not None:
            hook()

    @property
    def lost(self) -> bool:
        """The connection is gone (or going: its transport is closing)."""
        return self._closed or (self.transport is not None and self.transport.is_closing())

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- what the HTTP layer calls -----------------------------------------------------------

    def unread(self, data: bytes) -> None:
        """Put bytes back in front (what a parser read past the end of its message)."""
        if data:
            self._buf.appendleft(data)
            self._buffered += len(data)

    def take_buffered(self) -> bytes:
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The next bytes; b"" at the end of the stream. Raises on a reset or a cut stream."""
        while not self._buf:
            if self._eof:
                if self._lost is not None:
                    raise PipeClosed(str(self._lost)) from self._lost
                return b""
            self._reader = self._get_loop().create_future()
            await self._reader
        data = self._buf.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered <= READ_LIMIT // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait_readable(self, more_than: int = 0) -> None:
        """Until more than ``more_than`` bytes are buffered, or the stream ended."""
        while self._buffered <= more_than and not self._eof:
            self._reader = self._get_loop().create_future()
            await self._reader

    async def wait_input(self, timeout: float) -> bool:
        """Until there is input (bytes or the end of the stream), at most ``timeout`` seconds;
        False on timeout. (A timer, not ``wait_for``: no task per wait on the request path.)
        Wake-ups without input (a tick, a control frame) do not end the wait early."""
        if self.has_input:
            return True
        loop = self._get_loop()
        expired = loop.create_future()
        timer = loop.call_later(timeout, self._expire, expired)
        try:
            while not self.has_input and not expired.done():
                self._reader = loop.create_future()
                await self._reader
        finally:
            timer.cancel()
        return self.has_input

    async def wait_unread(self, timeout: float) -> bool:
        """After the other side's idle EOF: until it says what we sent went unread (True), or
        closes, or ``timeout`` passes (False)."""
        loop = self._get_loop()
        deadline = loop.time() + timeout
        while not self.left_unread and not self._closed and (remaining := deadline - loop.time()) > 0:
            self._reader = loop.create_future()
            timer = loop.call_later(remaining, self._wake)
            try:
                await self._reader
            finally:
                timer.cancel()
        return self.left_unread

    def _expire(self, expired: asyncio.Future[None]) -> None:
        expired.set_result(None)
        self._wake()

    def start_ticks(self, period: float) -> None:
        """Wake a waiting reader every ``period`` seconds while the connection lives, so that
        ``wait_tick_or_input`` needs no timer of its own: one timer per connection and period,
        not one per request (an idle keep-alive connection waits between every two requests)."""
        self._tick_period = period
        self._tick_handle = self._get_loop().call_later(period, self._tick)

    def stop_ticks(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _tick(self) -> None:
        self._tick_handle = None
        if self._closed:
            return
        self._ticked = True
        self._wake()
        self._tick_handle = self._get_loop().call_later(self._tick_period, self._tick)

    async def wait_tick_or_input(self) -> bool:
        """Until there is input or something handed back (True) or the next tick of
        ``start_ticks`` (False)."""
        self._ticked = False
        while not self.has_input and not self._ticked and self.handed is None:
            self._reader = self._get_loop().create_future()
            await self._reader
        return self.has_input or self.handed is not None

    async def wait_tick_or_handed(self, busy: typing.Callable[[], bool]) -> bool:
        """Until something is handed back (True) or the next tick (False); while ``busy``, input
        (bytes, the end of the stream) waits, after it ends the wait (False)."""
        self._ticked = False
        while not self._ticked and self.handed is None and (busy() or not self.has_input):
            self._reader = self._get_loop().create_future()
            await self._reader
        return self.handed is not None

    def call_later(self, delay: float, callback: typing.Callable[[], None]) -> asyncio.TimerHandle:
        return self._get_loop().call_later(delay, callback)

    def hand_back(self, what: object) -> None:
        """From an ``on_data`` callback: give the reader ``what`` (``wait_tick_or_input`` returns);
        ``on_data`` is unset, so what arrives next is buffered for ``read``."""
        self.on_data = None
        self.handed = what
        self._wake()

    def take_handed(self) -> object:
        what, self.handed = self.handed, None
        return what

    def peek(self) -> bytes:
        if len(self._buf) > 1:
            joined = b"".join(self._buf)
            self._buf.clear()
            self._buf.append(joined)
        return self._buf[0] if self._buf else b""

    @property
    def ended(self) -> bool:
        """The other side sent its end of stream (EOF frame, or FIN)."""
        return self._eof

    @property
    def has_input(self) -> bool:
        """Bytes are waiting to be read, or the end of the stream is."""
        return bool(self._buf) or self._eof

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def usable(self) -> bool:
        """Idle in a pool and still fit to reuse: nothing unread, not closed by the other side."""
        return (
            not self._eof and not self._buf and self.transport is not None and not self.transport.is_closing()
        )

    @property
    def failure(self) -> Exception | None:
        """Why the stream ended early (a reset, a framing error), or None."""
        return self._lost

    def report_bytes(self) -> None:
        """Give ``count_bytes`` what was received since the last report."""
        if self.count_bytes is not None and self.bytes_in > self._bytes_reported:
            self.count_bytes(self.bytes_in - self._bytes_reported)
            self._bytes_reported = self.bytes_in

    def write(self, data: bytes | bytearray) -> None:
        """Queue bytes; what is written in one turn of the event loop goes out as one write (one
        syscall, one TLS record, one DATA frame), not one per h11 event."""
        if self._closed or self.transport is None or self.transport.is_closing():
            raise PipeClosed(f"{self.name}: connection closed")
        if not data:
            return
        self._out.append(bytes(data))
        self._out_len += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._get_loop().call_soon(self.flush)
        elif self._out_len >= framing.MAX_DATA:
            self.flush()

    def write_now(self, data: bytes) -> None:
        """``write`` then ``flush``: what was queued and ``data`` go out now, as one write (the
        end of a message: nothing is scheduled for a turn of the loop later)."""
        if self._out:
            self.write(data)
            self.flush()
            return
        transport = self.transport
        if self._closed or transport is None or transport.is_closing():
            raise PipeClosed(f"{self.name}: connection closed")
        if not data:
            return
        if not self.framed:
            transport.write(data)
        else:
            self._write_framed(transport, data)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.framed:
            transport.write(data)
            return
        self._write_framed(transport, data)

    @staticmethod
    def _write_framed(transport: asyncio.Transport, data: bytes) -> None:
        if 0 < len(data) <= framing.MAX_DATA:  # (most writes: one frame; none for no bytes, as the loop)
            transport.write(framing.data_header(len(data)) + data)
            return
        view = memoryview(data)
        for start in range(0, len(view), framing.MAX_DATA):
            chunk = view[start : start + framing.MAX_DATA]
            transport.write(framing.data_header(len(chunk)) + chunk)

    def write_frame(self, frame: bytes) -> None:
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    @property
    def backpressured(self) -> bool:
        """The transport's write buffer is over its high-water mark: ``drain`` would wait."""
        return self._writable is not None and not self._writable.done()

    async def wait_writable(self, timeout: float) -> bool:
        """As ``drain``, for at most ``timeout`` seconds: False when the transport is still above
        its high-water mark then. The future other writers wait on is not cancelled."""
        self.flush()
        writable = self._writable
        if writable is not None and not writable.done():
            await asyncio.wait((writable,), timeout=timeout)
            if not writable.done():
                return False
        if self._closed:
            raise PipeClosed(f"{self.name}: connection closed")
        return True

    def taken(self) -> int:
        """A count that grows while the other side takes what was written: the bytes its TCP
        acknowledged, less what waits in the transport (where TCP_INFO says nothing, or leaves the
        acknowledged count at 0, the transport's backlog alone: coarser, it moves when the
        socket's buffer has room again)."""
        transport = self.transport
        if transport is None:
            return 0
        waiting = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            state = flush_state(sock)
            if state is not None:
                return state[0] - waiting
        return -waiting

    async def drain(self) -> None:
        self.flush()
        if self._writable is not None and not self._writable.done():
            await self._writable
        if self._closed:
            raise PipeClosed(f"{self.name}: connection closed")

    def write_eof(self, idle: bool = False) -> None:
        self.flush()
        if self.transport is None or self.transport.is_closing():
            return
        if self.framed:
            self.transport.write(framing.EOF_IDLE_FRAME if idle else framing.EOF_FRAME)
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        close(self.transport)

    def abort(self) -> None:
        self._out.clear()
        self._out_len = 0
        reset(self.transport)
