"""The sidecar runs the app's original probes against real servers on 127.0.0.1 (HTTP, HTTPS, TCP,
gRPC): success -> 200, failure, refusal or timeout -> 503, as the kubelet would judge the app."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from proxy.probes import AppProbe, AppProber, parse_app_probes, wait_ready
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import StartCA

SEEN_HEADERS: list[dict[str, str]] = []
SEEN_HEADS: list[list[str]] = []  # request line and header lines, as received
REDIRECTS = {  # path -> Location (301)
    "/drain": "/ok",
    "/to-fail": "/fail",
    "/away": "http://example.invalid/x",
    "/loop": "/loop",
    "/not-modified": "/fail",  # (a 304: Go does not follow it)
}


async def _app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny HTTP app: /ok 200, /fail 500, /moved 302, /slow (3 s), /teapot 418, /header (X-Probe)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        path = lines[0].split()[1]
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        SEEN_HEADERS.append(headers)
        SEEN_HEADS.append(lines)
        if path == "/slow":
            await asyncio.sleep(3)
        status = {
            "/ok": 200,
            "/ok?full=1": 200,
            "/a%20b": 200,
            "/fail": 500,
            "/moved": 302,
            "/teapot": 418,
        }.get(path, 404)
        if path == "/header":
            status = 200 if headers.get("X-Probe") == "yes" else 400
        location = REDIRECTS.get(path)
        if location is not None:
            status = 304 if path == "/not-modified" else 301
        extra = f"location: {location}\r\n" if location is not None else ""
        writer.write(f"HTTP/1.1 {status} X\r\n{extra}content-length: 0\r\n\r\n".encode())
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_app, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(probe: AppProbe) -> tuple[int, dict[str, object]]:
    prober = AppProber({"/app-health/app/readyz": probe})
    status, ctype, body = await prober.handle("/app-health/app/readyz")
    assert ctype == "application/json"
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/ok", 200), ("/ok?full=1", 200), ("/moved", 200), ("/fail", 503), ("/teapot", 503), ("/missing", 503)],
)
async def test_http_status_decides(app_port: int, path: str, expected: int) -> None:
    status, body = await run(AppProbe("httpGet", app_port, 1.0, path))
    assert status == expected
    assert body["ok"] is (expected == 200)


async def test_http_headers_are_sent(app_port: int) -> None:
    SEEN_HEADERS.clear()
    status, _ = await run(
        AppProbe("httpGet", app_port, 1.0, "/header", headers=(("X-Probe", "yes"), ("Host", "web.local")))
    )
    assert status == 200
    assert SEEN_HEADERS[-1]["Host"] == "web.local"
    assert SEEN_HEADERS[-1]["User-Agent"].startswith("kube-probe/")


@pytest.mark.parametrize(
    ("given", "sent"),
    [((), ["*/*"]), ((("Accept", "application/json"),), ["application/json"]), ((("Accept", ""),), [])],
)
async def test_accept_is_the_kubelets(
    app_port: int, given: tuple[tuple[str, str], ...], sent: list[str]
) -> None:
    """The kubelet sends Accept: */* only when the probe names no Accept, and none when the probe's
    is empty; the sidecar sent its */* besides the probe's (an app negotiating on Accept saw two)."""
    SEEN_HEADS.clear()
    status, _ = await run(AppProbe("httpGet", app_port, 1.0, "/ok", headers=given))
    assert status == 200
    assert [
        line.split(":", 1)[1].strip() for line in SEEN_HEADS[-1][1:] if line.lower().startswith("accept:")
    ] == sent


@pytest.mark.parametrize(("path", "line"), [("ok", "GET /ok HTTP/1.1"), ("/a b", "GET /a%20b HTTP/1.1")])
async def test_a_probe_path_is_sent_as_the_kubelet_sends_it(app_port: int, path: str, line: str) -> None:
    """The API server takes an httpGet path without a leading "/" or with a space; the kubelet sends
    what Go's URL makes of it (/healthz, /a%20b). The sidecar sent it as written: `GET healthz`
    (400 from a Go server) or no request at all (503: illegal target characters)."""
    SEEN_HEADS.clear()
    entry = {"httpGet": {"port": app_port, "path": path, "host": "127.0.0.1"}, "timeoutSeconds": 1}
    probes = parse_app_probes(json.dumps({"/app-health/app/readyz": entry}))
    status, _ = await run(probes["/app-health/app/readyz"])
    assert SEEN_HEADS and SEEN_HEADS[-1][0] == line
    assert status == 200


async def test_app_down_is_503() -> None:
    status, body = await run(AppProbe("httpGet", closed_port(), 1.0, "/ok"))
    assert status == 503 and "ConnectionRefused" in str(body["detail"])


async def test_timeout_is_honoured(app_port: int) -> None:
    started = time.monotonic()
    status, body = await run(AppProbe("httpGet", app_port, 0.3, "/slow"))
    elapsed = time.monotonic() - started
    assert status == 503 and "no answer within 0.3s" in str(body["detail"])
    assert 0.25 < elapsed < 1.5


async def test_unknown_path_is_404() -> None:
    status, _, body = await AppProber({}).handle("/app-health/nope/livez")
    assert status == 404 and b"no app probe" in body


async def test_https_probe_does_not_verify(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    svid = await ca.issue("frontend-token", WorkloadId("shop", "frontend"))
    (tmp_path / "cert.pem").write_bytes(svid.chain_pem + svid.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem")
    server = await asyncio.start_server(_app, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await run(AppProbe("httpGet", port, 2.0, "/ok", "HTTPS")))[0] == 200
        assert (await run(AppProbe("httpGet", port, 2.0, "/fail", "HTTPS")))[0] == 503
        assert (await run(AppProbe("httpGet", port, 2.0, "/ok", "HTTP")))[0] == 503  # plaintext to TLS
    finally:
        server.close()


async def test_tcp_probe(app_port: int) -> None:
    assert (await run(AppProbe("tcpSocket", app_port, 1.0)))[0] == 200
    assert (await run(AppProbe("tcpSocket", closed_port(), 1.0)))[0] == 503


class _Health(grpc.GenericRpcHandler):
    """grpc.health.v1.Health/Check: "" and "cart" SERVING, "down" NOT_SERVING, others NOT_FOUND."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/grpc.health.v1.Health/Check":  # type: ignore[attr-defined]
            return None

        async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            service = request[2:].decode()
            if service == "slow":
                await asyncio.sleep(3)
            if service not in ("", "cart", "down", "slow"):
                await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            return b"\x08\x02" if service == "down" else b"\x08\x01"

        return grpc.unary_unary_rpc_method_handler(check)  # type: ignore[arg-type]


async def test_grpc_probe() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Health(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        assert (await run(AppProbe("grpc", port, 2.0)))[0] == 200
        assert (await run(AppProbe("grpc", port, 2.0, service="cart")))[0] == 200
        status, body = await run(AppProbe("grpc", port, 2.0, service="down"))
        assert status == 503 and "status 2" in str(body["detail"])
        status, body = await run(AppProbe("grpc", port, 2.0, service="other"))
        assert status == 503 and "NOT_FOUND" in str(body["detail"])
        started = time.monotonic()
        assert (await run(AppProbe("grpc", port, 0.3, service="slow")))[0] == 503
        assert time.monotonic() - started < 1.5
    finally:
        await server.stop(0)
    assert (await run(AppProbe("grpc", closed_port(), 1.0)))[0] == 503


async def test_wait_ready(app_port: int) -> None:
    assert await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{app_port}/ok", 2.0)
    started = time.monotonic()
    last: list[str] = []
    assert not await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{app_port}/fail", 0.5, 0.1, last)
    assert time.monotonic() - started < 2.0
    assert last and last[0].startswith("it answered 5"), last  # (said why, not only "not ready")
    assert not await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{closed_port()}/", 0.2, 0.1, last)
    assert last == ["no answer (Connection refused)"]


@pytest.mark.parametrize("kind", ["httpGet", "tcpSocket"])
async def test_an_app_bound_to_its_pod_address_only_passes_its_probe(kind: str) -> None:
    """Nothing listens on --app-host (127.0.0.1): the probe runs against the pod's address (here
    127.0.0.9), from the source the capture lets through (here 127.0.0.6), as the kubelet's own
    probe would reach the app. A refusal there too still fails the probe."""
    server = await asyncio.start_server(_app, "127.0.0.9", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = AppProbe(kind, port, 1.0, "/ok")
        alone = AppProber({"/p": probe})
        assert (await alone.check(probe))[0] is False  # 127.0.0.1: refused
        with_pod = AppProber({"/p": probe}, pod=("127.0.0.9", ("127.0.0.6", 0)))
        assert await with_pod.check(probe) == (True, "HTTP 200" if kind == "httpGet" else "connected")
        nobody = AppProber({"/p": probe}, pod=("127.0.0.10", ("127.0.0.6", 0)))
        assert (await nobody.check(probe))[0] is False
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("path", "expected", "detail"),
    [
        ("/drain", 200, "HTTP 200"),  # followed: the hook's handler runs (it got the 301 only)
        ("/to-fail", 503, "HTTP 500"),  # the final answer decides, as the kubelet's probe has it
        ("/away", 200, "another host"),  # not followed, a success (the kubelet's rule)
        ("/loop", 503, "redirects"),
        ("/not-modified", 200, "HTTP 304"),  # only 301, 302, 303, 307, 308 are followed
    ],
)
async def test_redirects_to_the_same_host_are_followed(
    app_port: int, path: str, expected: int, detail: str
) -> None:
    status, body = await run(AppProbe("httpGet", app_port, 1.0, path=path))
    assert status == expected and detail in str(body["detail"]), body


async def test_a_redirect_is_followed_on_an_ipv6_address() -> None:
    """The pod-address fallback and --app-host ::1 give an IPv6 host: the base URL lacked brackets,
    so a relative Location read as host "fd00" (another host: not followed) or failed outright."""
    try:
        server = await asyncio.start_server(_app, "::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        port = server.sockets[0].getsockname()[1]
        prober = AppProber(
            {"/app-health/app/prestop": AppProbe("httpGet", port, 1.0, path="/drain")}, host="::1"
        )
        SEEN_HEADERS.clear()
        status, _, body = await prober.handle("/app-health/app/prestop")
        assert status == 200 and b"HTTP 200" in body, body
        assert {h.get("Host") for h in SEEN_HEADERS} == {f"[::1]:{port}"}  # (net.JoinHostPort's form)
    finally:
        server.close()
