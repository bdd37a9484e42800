"""A TCP relay in front of a server, as a network in between: it can be pointed at another
server for new connections (a Service's next replica), or stop passing bytes without closing
anything (a silent partition: no FIN, no RST)."""

from __future__ import annotations

import asyncio


class TcpRelay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port  # where new connections go
        self.dropping = False  # read and thrown away, as a black hole does
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.dropping:
                    dst.write(data)
            if not self.dropping:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()
