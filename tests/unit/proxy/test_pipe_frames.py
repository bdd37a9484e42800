"""proxy.pipe on a client's pooled connection to another sidecar: the frames a server may send."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy import framing
from proxy.pipe import Pipe, PipeClosed


async def _client_pipe() -> tuple[Pipe, socket.socket]:
    ours, theirs = socket.socketpair()
    pipe = Pipe(framed=True, name="upstream")
    await asyncio.get_running_loop().create_connection(lambda: pipe, sock=ours)
    return pipe, theirs


async def test_a_deny_is_kept_and_any_other_control_frame_ends_the_connection() -> None:
    """Every control frame a server sent was appended to a list kept as long as the pooled
    connection lived: a million OPEN frames (7 MB on the wire) held about 100 MB of the caller's
    memory. A client's pipe takes one DENY (its reason); anything else is a framing error."""
    pipe, theirs = await _client_pipe()
    try:
        pipe.data_received(framing.HEADER.pack(framing.DENY, 6) + b"no way")
        assert pipe.denied == b"no way" and pipe.failure is None
        pipe.data_received(framing.open_frame(8080))
        assert isinstance(pipe.failure, framing.FramingError)
        assert "unexpected frame" in str(pipe.failure)
    finally:
        theirs.close()


async def test_empty_data_frames_in_a_row_end_the_connection() -> None:
    pipe, theirs = await _client_pipe()
    try:
        pipe.data_received(framing.data_header(0) * 10 + framing.data_header(2) + b"ok")
        assert pipe.failure is None and await pipe.read() == b"ok"
        pipe.data_received(framing.data_header(0) * 11)
        assert isinstance(pipe.failure, framing.FramingError)
    finally:
        theirs.close()


def test_the_data_frames_of_one_read_come_out_as_one_piece_between_control_frames() -> None:
    frames = b"".join(framing.data_header(1) + bytes([c]) for c in b"abc")
    frames += framing.deny_frame("x") + framing.data_header(2) + b"de" + framing.data_header(1) + b"f"
    got = [(kind, bytes(payload)) for kind, payload in framing.Decoder().feed(frames)]
    # (two pieces stay two, uncopied: a bulk transfer's read holds the end of a frame and the
    # start of the next)
    assert got == [(framing.DATA, b"abc"), (framing.DENY, b"x"), (framing.DATA, b"de"), (framing.DATA, b"f")]
    # A frame split across reads still comes out in its pieces, one per read (no reassembly).
    decoder = framing.Decoder()
    whole = framing.data_header(4) + b"wxyz"
    assert [bytes(p) for _, p in decoder.feed(whole[:7])] == [b"wx"]
    tiny = b"".join(framing.data_header(1) + bytes([c]) for c in b"!?")
    assert [bytes(p) for _, p in decoder.feed(whole[7:] + tiny)] == [b"yz!?"]


async def test_a_read_of_tiny_data_frames_is_one_buffered_piece() -> None:
    """A peer sending 1-byte DATA frames made the pipe keep a bytes object per frame (about 40
    bytes of memory per byte of payload, uncounted by the read limit): about 11 MB held on one
    HTTP/2 connection whose reader had stopped. Now one piece per read."""
    pipe, theirs = await _client_pipe()
    try:
        pipe.data_received(b"".join(framing.data_header(1) + b"x" for _ in range(100_000)))
        assert len(pipe._buf) == 1 and pipe.failure is None
        assert await pipe.read() == b"x" * 100_000
    finally:
        theirs.close()


async def test_unread_is_taken_once_and_only_after_an_idle_eof() -> None:
    """UNREAD between DATA frames was taken (and ignored): a peer alternating 1-byte DATA and
    UNREAD frames got a buffered object per byte again, past the join of a read's DATA."""
    pipe, theirs = await _client_pipe()
    try:
        pipe.data_received((framing.data_header(1) + b"x" + framing.UNREAD_FRAME) * 3)
        assert isinstance(pipe.failure, framing.FramingError) and len(pipe._buf) <= 1
    finally:
        theirs.close()
    pipe, theirs = await _client_pipe()
    try:
        pipe.data_received(framing.data_header(2) + b"ok" + framing.EOF_IDLE_FRAME + framing.UNREAD_FRAME)
        assert pipe.failure is None and pipe.idle_closed and pipe.left_unread
        pipe.data_received(framing.UNREAD_FRAME)
        assert isinstance(pipe.failure, framing.FramingError)
    finally:
        theirs.close()


async def test_write_now_sends_what_was_queued_then_its_bytes_at_once_framed_or_not() -> None:
    """``write_now``: queued bytes first, then its own, out without waiting for a turn of the
    loop; on a connection to another sidecar as DATA frames; on a closed one, PipeClosed."""
    for framed in (False, True):
        ours, theirs = socket.socketpair()
        pipe = Pipe(framed=framed, name="down")
        await asyncio.get_running_loop().create_connection(lambda p=pipe: p, sock=ours)
        try:
            pipe.write(b"queued ")
            pipe.write_now(b"now")
            pipe.write_now(b"!")  # (nothing queued: straight to the transport)
            assert pipe.transport is not None and pipe.transport.get_write_buffer_size() == 0
            theirs.setblocking(False)
            got = theirs.recv(1024)
            if framed:
                frames = [(k, bytes(p)) for k, p in framing.Decoder().feed(got)]
                assert frames == [(framing.DATA, b"queued now"), (framing.DATA, b"!")]  # (one per write)
            else:
                assert got == b"queued now!"
            pipe.close()
            await asyncio.sleep(0)
            with pytest.raises(PipeClosed):
                pipe.write_now(b"late")
        finally:
            theirs.close()


def test_a_framed_write_is_one_frame_up_to_the_limit_and_split_past_it() -> None:
    """What goes to another sidecar is cut into DATA frames of at most ``MAX_DATA``: one frame for
    most writes, two for one byte more, none for no bytes (an empty frame is a peer's warning sign:
    too many in a row end the connection)."""

    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(bytes(data))

    for size, pieces in (
        (0, []),
        (5, [5]),
        (framing.MAX_DATA, [framing.MAX_DATA]),
        (framing.MAX_DATA + 1, [framing.MAX_DATA, 1]),
    ):
        transport = Transport()
        Pipe._write_framed(transport, b"x" * size)  # type: ignore[arg-type]
        frames = [
            (kind, len(payload)) for w in transport.writes for kind, payload in framing.Decoder().feed(w)
        ]
        assert frames == [(framing.DATA, n) for n in pieces], (size, frames)
        assert len(transport.writes) == len(pieces)  # (no empty frame, which decodes to nothing)


def test_a_read_of_one_whole_data_frame_is_its_payload_and_anything_else_is_decoded() -> None:
    decoder = framing.Decoder()
    frame = framing.data_header(5) + b"hello"
    assert decoder.whole_data(frame) == b"hello"
    assert decoder.whole_data(frame + b"x") is None  # (more than the frame)
    assert decoder.whole_data(frame[:-1]) is None  # (less)
    assert decoder.whole_data(framing.data_header(0)) is None  # (empty: counted by feed)
    assert decoder.whole_data(framing.deny_frame("x")) is None
    big = b"x" * (framing.MAX_DATA + 1)
    assert decoder.whole_data(framing.HEADER.pack(framing.DATA, len(big)) + big) is None  # (over the limit)
    assert [bytes(p) for _, p in decoder.feed(frame[:3])] == []  # (a header begun: not at a boundary)
    assert decoder.whole_data(frame) is None
    assert [bytes(p) for _, p in decoder.feed(frame[3:])] == [b"hello"]
    assert decoder.whole_data(frame) == b"hello"


async def test_a_whole_data_frame_goes_to_on_data_only_when_the_pipe_takes_it_there() -> None:
    pipe, theirs = await _client_pipe()
    got: list[bytes] = []
    try:
        pipe.on_data = got.append
        frame = framing.data_header(2) + b"ok"
        pipe.data_received(frame)
        assert got == [b"ok"] and pipe.failure is None and not pipe.has_input
        pipe.on_data = None
        pipe.data_received(frame)  # (no on_data: buffered for read)
        pipe.on_data = got.append
        pipe.data_received(frame)  # (bytes before it wait: after them, in order)
        assert got == [b"ok"] and pipe.peek() == b"okok" and await pipe.read() == b"okok"
        assert not pipe.has_input
        pipe.data_received(framing.EOF_FRAME)
        pipe.on_data = got.append
        pipe.data_received(frame)  # DATA after EOF: a framing error, not a callback
        assert got == [b"ok"] and isinstance(pipe.failure, framing.FramingError)
    finally:
        theirs.close()
    server = Pipe(framed=True, name="inbound")
    server.open_first = True
    ours, theirs = socket.socketpair()
    await asyncio.get_running_loop().create_connection(lambda: server, sock=ours)
    try:
        server.on_data = got.append
        server.data_received(framing.data_header(2) + b"no")  # DATA before OPEN
        assert got == [b"ok"] and isinstance(server.failure, framing.FramingError)
    finally:
        theirs.close()
