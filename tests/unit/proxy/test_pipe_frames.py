"""proxy.pipe on a client's pooled connection to another sidecar: the frames a server may send."""

from __future__ import annotations

import asyncio
import socket

from proxy import framing
from proxy.pipe import Pipe


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
