"""A small HTTP/1.1 server (h11) for admin, status, readiness and metrics pages. Not on any data path.

Its ports can be open to every pod (the sidecar's 15020 is the kubelet's), so it holds at most
``MAX_CONNECTIONS`` connections (they would spend file descriptors the data path needs): a new one
beyond that closes the oldest with nothing of an answer left to send, or else the oldest whose
answer has not gone out for ``STALLED`` (its client does not read: pipelined requests, a page it
never takes), so connections held open by anyone cannot keep the kubelet's probes or a scrape
out. A request, body included, must arrive whole within ``REQUEST_TIMEOUT`` of its first byte (a
trickling client no longer holds a connection for ever), an answer must go out within it too, and
a connection idle for ``IDLE_TIMEOUT`` between requests is closed. A request h11 cannot read gets
the status it hints (400, 431 for an oversized head) before the close; empty lines before a
request line are ignored (RFC 9112 2.2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import h11

log = logging.getLogger("sidemesh.httpd")

MAX_CONNECTIONS = 128  # scrapers, probes and operators: a handful at a time
REQUEST_TIMEOUT = 10.0
STALLED = 2.0  # a probe or a scrape is answered in milliseconds
IDLE_TIMEOUT = 30.0

Route = Callable[[], tuple[int, str, bytes]]

WILDCARDS = ("0.0.0.0", "::", "")


def check_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when a TCP port is held, before grpcio binds it: grpc core logs
    its own error line to stderr (``add_port.cc ... Failed to add port``) ahead of the one-line
    error the CLI prints. Port 0 is always free."""
    if port == 0:
        return
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as grpc: TIME_WAIT is no holder)
        try:
            sock.bind((host, port))
        except OSError as exc:  # (the address in the text: the CLI names the option by it)
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, f"{exc.strerror} ({shown})") from None


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket for an HTTP listener. The wildcard (``0.0.0.0``, the defaults) takes
    both address families, as grpcio does for the gRPC ports and Go's ``:port`` (Istio's 15020)
    does: a probe without a host goes to the pod IP, IPv6 on IPv6-only and IPv6-first clusters,
    where an IPv4-only listener made every probe and the webhook fail. Without IPv6 in the kernel:
    IPv4 only."""
    sock: socket.socket | None = None
    if host in WILDCARDS:
        with contextlib.suppress(OSError):  # (no IPv6: EAFNOSUPPORT)
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = "::"
    if sock is None:
        host = "0.0.0.0" if host in WILDCARDS else host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    return bind_socket(sock, host, port, reuse_port)


def bind_socket(sock: socket.socket, host: str, port: int, reuse_port: bool) -> socket.socket:
    """``sock`` bound (SO_REUSEADDR; SO_REUSEPORT when asked), non-blocking; closed if it fails."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


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
        self.max_connections = MAX_CONNECTIONS
        # Oldest first -> since when its answer is on its way out (None: nothing of an answer left
        # to send: waiting for a request, or for a body whose answer went out already).
        self._writers: dict[asyncio.StreamWriter, float | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        sock = listening_socket(host, port, reuse_port)
        try:
            self.server = await asyncio.start_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):  # a scraper's keep-alive connection too
                if writer.transport.get_write_buffer_size():
                    writer.transport.abort()  # a client that does not read: close() would wait on it
                else:
                    writer.close()
            for task in list(self._tasks):  # one awaiting an app probe, say: ended, not left to the loop
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    def _make_room(self) -> bool:
        """At the cap, close the oldest connection with nothing of an answer left to send, or else
        the oldest whose answer is stalled (False: every one is sending an answer, and recently)."""
        if len(self._writers) < self.max_connections:
            return True
        stalled = asyncio.get_running_loop().time() - STALLED
        oldest = next((w for w, since in self._writers.items() if since is None), None)
        if oldest is None:
            oldest = next(
                (w for w, since in self._writers.items() if since is not None and since < stalled), None
            )
        if oldest is None:
            return False
        del self._writers[oldest]
        oldest.transport.abort()
        return True

    def _sent(self, writer: asyncio.StreamWriter) -> None:
        """Nothing of an answer left to send (so far): the connection may be made room with."""
        if writer in self._writers and not writer.transport.get_write_buffer_size():
            self._writers[writer] = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers[writer] = None
        conn = h11.Connection(h11.SERVER)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if client.startswith("::ffff:") and "." in client:  # IPv4 on a listener of both families
            client = client[7:]
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # from the first byte of a request to its end
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    self._refuse(conn, writer, exc)
                    break
                if event is h11.NEED_DATA:
                    self._sent(writer)  # waiting for bytes: for a request, or a body already answered
                    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        deadline, wait = None, IDLE_TIMEOUT
                    else:
                        deadline = deadline or loop.time() + REQUEST_TIMEOUT
                        wait = deadline - loop.time()
                    data = await asyncio.wait_for(reader.read(65536), max(wait, 0.0))
                    if data and conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        # RFC 9112 2.2: empty lines before a request line are ignored (a CRLF
                        # some clients send after a POST body); h11 answers them 400.
                        data = data.lstrip(b"\r\n")
                        if not data:
                            continue  # (b"" would be the end of the stream to h11)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    deadline = deadline or loop.time() + REQUEST_TIMEOUT  # the body is held to it too
                    if writer not in self._writers or writer.is_closing():  # closed (made room, stop)
                        break  # (pipelined requests still buffered are not answered into the void)
                    if self._writers[writer] is None:  # (one still going out keeps its time)
                        self._writers[writer] = loop.time()
                    status, ctype, body = await self._dispatch(event, client)
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    if status == 405:
                        headers.append(("allow", "POST" if self._path(event) in self.posts else "GET, HEAD"))
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                    if event.method != b"HEAD":  # HEAD: GET's headers, no body (RFC 9110 9.3.2)
                        writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    # A client that does not read (pipelined requests, a big page) is not waited
                    # for past REQUEST_TIMEOUT: answering, it could not be made room for.
                    try:
                        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
                    except TimeoutError:
                        writer.transport.abort()  # (close() would wait for a reader that does not read)
                        break
                    self._sent(writer)
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    break
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    deadline = None  # a pipelined request has its own
                    rest, closed = conn.trailing_data
                    if rest[:1] in (b"\r", b"\n"):  # empty lines after a body, in the same read
                        conn = h11.Connection(h11.SERVER)  # (h11 keeps them: "no request line")
                        if stripped := rest.lstrip(b"\r\n"):
                            conn.receive_data(stripped)
                        if closed:
                            conn.receive_data(b"")
        except (h11.ProtocolError, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # stop(), or the loop's end: the connection's task ends here, as a task of its own (a
            # cancelled one is logged as an error by Python 3.11's stream callback).
            writer.transport.abort()
        finally:
            self._writers.pop(writer, None)
            self._tasks.discard(task)
            writer.close()
            if writer.transport.get_write_buffer_size():  # the last answer still going out: a bound on it
                loop.call_later(REQUEST_TIMEOUT, writer.transport.abort)

    @staticmethod
    def _refuse(conn: h11.Connection, writer: asyncio.StreamWriter, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 cannot read with the status it hints (400, 431), then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": str(exc)}).encode() + b"\n"
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError):
            writer.write(conn.send(h11.Response(status_code=exc.error_status_hint, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")

    async def _dispatch(self, request: h11.Request, client: str = "") -> tuple[int, str, bytes]:
        path = self._path(request)
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
        target = request.target.decode("latin-1")
        if not target.startswith("/") and "://" in target:  # absolute-form (RFC 9112 3.2.2)
            target = urllib.parse.urlsplit(target).path or "/"
        return target.split("?", 1)[0]

    def _route(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = self._path(request)
        route: Route | None
        if not (path in self.posts or path in self.routes or any(map(path.startswith, self.prefixes))):
            return json_response(404, {"error": f"no {path}", "paths": sorted(self.routes)})
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
