"""The upstream of `bench.l4`: a tiny HTTP/1.1 keep-alive server on uvloop, one process, one core.

    .venv/bin/python -m bench.l4_upstream --listen HOST:PORT

- ``GET <anything>``: ``200`` with the 2-byte body ``ok``.
- ``GET /bulk/<N>``: ``200`` with an N-byte body, streamed from one preallocated buffer with
  backpressure (the write side pauses at 4 MiB buffered), for the bulk-transfer figure.

Requests are expected to carry no body (wrk sends plain GETs). It prints ``ready <port>`` on stdout
once listening and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import typing

SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
BULK_PREFIX = b"GET /bulk/"
CHUNK = bytes(1 << 20)  # one MiB of zeros, sent again and again
HIGH_WATER = 4 << 20


class Http(asyncio.Protocol):
    __slots__ = ("_buf", "_bulk_left", "_paused", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._bulk_left = 0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = typing.cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._buf = buf
            return
        replies = 0
        start = 0
        while end >= 0:
            if buf.startswith(BULK_PREFIX, start):
                line_end = buf.find(b" ", start + len(BULK_PREFIX))
                size = int(buf[start + len(BULK_PREFIX) : line_end])
                if replies:
                    transport.write(SMALL * replies)
                    replies = 0
                transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                self._bulk_left = size
                self._pump()
            else:
                replies += 1
            start = end + 4
            end = buf.find(b"\r\n\r\n", start)
        if replies:
            transport.write(SMALL if replies == 1 else SMALL * replies)
        self._buf = buf[start:]

    def _pump(self) -> None:
        transport = self._transport
        assert transport is not None
        view = memoryview(CHUNK)
        while self._bulk_left > 0 and not self._paused and not transport.is_closing():
            n = min(self._bulk_left, len(CHUNK))
            transport.write(view[:n])
            self._bulk_left -= n

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._bulk_left = 0


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of sidemesh
        asyncio.run(serve(host, int(port)))
    else:
        uvloop.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
