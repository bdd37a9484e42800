"""`sidemesh top --once` against real sidecars' admin endpoints while traffic flows."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.observe import RequestInfo, RequestResult
from sidemesh.top import run_top
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh, talk

FRONTEND, CART = 1, 2
OUT = 18080


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


async def test_top_shows_the_routes_a_sidecar_saw(mesh: Mesh) -> None:
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    admin = [f"{mesh.addr(FRONTEND)}:{frontend.ports['admin']}", f"{mesh.addr(CART)}:{cart.ports['admin']}"]
    out = io.StringIO()
    first_taken, traffic_sent = threading.Event(), threading.Event()

    def wait_for_traffic(seconds: float) -> None:  # run_top's sleep: until the traffic was sent
        first_taken.set()
        assert traffic_sent.wait(30)

    top = asyncio.create_task(
        asyncio.to_thread(run_top, admin, 1.0, True, 10, "all", out, sleep=wait_for_traffic)
    )
    assert await asyncio.to_thread(first_taken.wait, 10)
    for _ in range(4):
        assert await talk(mesh.addr(FRONTEND), OUT, b"\x01hello") == b"\x01HELLOBYE"
    source = "spiffe://cluster.local/ns/shop/sa/frontend"
    for i in range(6):  # HTTP requests, as the HTTP path reports them
        info = RequestInfo("inbound", "http/1.1", "GET", f"/cart/items?page={i}", "cart", [], source=source)
        cart.observer.start(info).finish(RequestResult(500 if i == 0 else 200))
    traffic_sent.set()
    assert await top == 0
    lines = out.getvalue().splitlines()
    assert "shop/cart-1" in lines[0] and "shop/frontend-1" in lines[0] and "2 sidecars" in lines[0]
    by_route = {line.split()[1] + " " + line.split()[2]: line.split() for line in lines[2:]}
    get = by_route["GET /cart/items"]
    assert get[0] == "in" and float(get[3]) > 0 and get[4] == "83.3%" and get[-1] == "6"
    tcp = by_route["TCP cart.shop:80"]
    assert tcp[0] == "out" and tcp[4] == "100.0%" and tcp[-1] == "4"


async def test_route_stats_page_is_json_with_the_sidecars_identity(mesh: Mesh) -> None:
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    url = f"http://{mesh.addr(CART)}:{cart.ports['admin']}/stats/routes"
    body = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read()))
    assert body["identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
    assert body["routes"] == [] and body["capacity"] > 0 and len(body["buckets"]) > 10


async def test_top_goes_straight_to_the_admin_port_whatever_http_proxy_says(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With http_proxy set (for the internet), top sent even 127.0.0.1 through it and blamed the
    sidecar for the proxy's error."""
    from sidemesh.top import fetch

    cart = await mesh.sidecar("cart", CART)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    snapshot = await asyncio.to_thread(fetch, f"{mesh.addr(CART)}:{cart.ports['admin']}")
    assert snapshot["workload"] == "shop/cart-1"


async def test_a_refused_plaintext_connection_is_a_denial_on_its_port(mesh: Mesh) -> None:
    """Strict mode refuses plaintext before any policy: `top` showed it as a failed route named
    `TCP :?` (no port known yet, no denial counted). It is the app port's route now, as a denial."""
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    assert cart.config.mode == "strict"
    reader, writer = await asyncio.open_connection(mesh.addr(CART), cart.ports["inbound"])
    writer.write(b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    url = f"http://{mesh.addr(CART)}:{cart.ports['admin']}/stats/routes"
    for _ in range(50):
        body = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read()))
        if body["routes"]:
            break
        await asyncio.sleep(0.05)
    [route] = body["routes"]
    assert (route["direction"], route["route"], route["requests"]) == ("inbound", "TCP :8080", 1)
    assert (route["successes"], route["denials"]) == (0, 1)
