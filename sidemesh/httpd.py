"""A small HTTP/1.1 server (h11) for admin, status, readiness and metrics pages. Not on any data path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11

log = logging.getLogger("sidemesh.httpd")

Route = Callable[[], tuple[int, str, bytes]]
# (path, the client's IP address) -> why it may not read that path, or None when it may.
Guard = Callable[[str, str], str | None]
# GET/HEAD of any path under a prefix: gets the path (without the query) and may await (app probes).
PrefixRoute = Callable[[str], Awaitable[tuple[int, str, bytes]]]


def json_response(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, indent=2, default=str).encode() + b"\n"


class HTTPServer:
    def __init__(
        self,
        routes: dict[str, Route],
        prefixes: dict[str, PrefixRoute] | None = None,
        guard: Guard | None = None,
        posts: dict[str, Route] | None = None,
    ) -> None:
        self.routes = routes
        self.posts = posts or {}  # POST-only paths (actions, such as the sidecar's quitquitquit)
        self.prefixes = prefixes or {}
        self.guard = guard
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_port=reuse_port or None)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    status, ctype, body = await self._dispatch(event, client)
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    if status == 405:
                        headers.append(("allow", "POST" if self._path(event) in self.posts else "GET, HEAD"))
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                    if event.method != b"HEAD":  # HEAD: GET's headers, no body (RFC 9110 9.3.2)
                        writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    break
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: h11.Request, client: str = "") -> tuple[int, str, bytes]:
        path = request.target.decode("latin-1").split("?", 1)[0]
        if self.guard is not None and (why := self.guard(path, client)) is not None:
            return json_response(403, {"error": why})
        if request.method in (b"GET", b"HEAD"):
            for prefix, handler in self.prefixes.items():
                if path.startswith(prefix):
                    try:
                        return await handler(path)
                    except Exception as exc:  # a probe must never take the proxy down
                        log.exception("route failed", extra={"path": path})
                        return json_response(500, {"error": str(exc)})
        return self._route(request)

    @staticmethod
    def _path(request: h11.Request) -> str:
        return request.target.decode("latin-1").split("?", 1)[0]

    def _route(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = self._path(request)
        route: Route | None
        if path in self.posts:
            if request.method != b"POST":
                return json_response(405, {"error": "only POST"})
            route = self.posts[path]
        elif request.method not in (b"GET", b"HEAD"):
            return json_response(405, {"error": "only GET and HEAD"})
        else:
            route = self.routes.get(path)
        if route is None:
            return json_response(404, {"error": f"no {path}", "paths": sorted(self.routes)})
        try:
            return route()
        except Exception as exc:  # an admin page must never take the proxy down
            log.exception("admin route failed", extra={"path": path})
            return json_response(500, {"error": str(exc)})
