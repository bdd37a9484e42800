"""Opaque TCP through a sidecar: the balancer per connection over real sockets and real mTLS. Three
cart endpoints, one of which refuses connections (no sidecar there): it is ejected, and the app
sees no failed connection, before or after (a refused connect is tried on another endpoint). The
Service and its pods mark the port opaque (``sidemesh.io/opaque-ports``), so no protocol detection
runs on either side (the Service's annotation alone is the caller's: the callee's sidecar would
still detect, as Linkerd's asks for the pods' annotation too)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.balance import Balancer
from sidemesh.mesh.compile import Endpoint
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import MESH_YAML, Mesh, new_mesh

FRONTEND, CART, CART2, CART3 = 1, 2, 4, 5
OUT = 18080

MORE_CARTS = """\
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cart-2-1, namespace: shop, labels: {{app: cart}}, annotations: {{sidemesh.io/opaque-ports: "8080"}}}}
spec: {{serviceAccount: cart, address: {net}.4, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cart-3-1, namespace: shop, labels: {{app: cart}}, annotations: {{sidemesh.io/opaque-ports: "8080"}}}}
spec: {{serviceAccount: cart, address: {net}.5, ports: [{{port: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: carts, namespace: shop, annotations: {{sidemesh.io/opaque-ports: "80"}}}}
spec:
  selector: {{app: cart}}
  ports: [{{name: tcp, port: 80, targetPort: 8080}}]
"""

# The demo's cart-1 with its port opaque too (the pods' annotation: see the module's docstring).
OPAQUE_CART = MESH_YAML.replace(
    "metadata: {{name: cart-1, namespace: shop, labels: {{app: cart}}}}",
    'metadata: {{name: cart-1, namespace: shop, labels: {{app: cart}}, annotations: {{sidemesh.io/opaque-ports: "8080"}}}}',
)
assert OPAQUE_CART != MESH_YAML


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = await start_ca()
    m = new_mesh(ca, tmp_path, workloads=OPAQUE_CART + MORE_CARTS)
    yield m
    await m.close()


async def open_held(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the frontend's sidecar that has been answered (so it reached an app)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(mesh.addr(FRONTEND), OUT), 5)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
    return reader, writer


def picks(balancer: Balancer, ep: Endpoint) -> int:
    st = balancer.state(ep)
    return 0 if st is None else st.picks


async def test_an_endpoint_refusing_connections_is_ejected_and_no_connection_fails(mesh: Mesh) -> None:
    for host, name in ((CART, "cart"), (CART2, "cart-2")):
        await mesh.app(host)
        await mesh.sidecar(name, host, identity_of="cart")
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=carts.shop:80",)
    )
    dest = frontend.mesh_config().lookup_name("carts.shop:80")
    assert dest is not None and dest.opaque and len(dest.endpoints) == 3
    refusing = next(e for e in dest.endpoints if e.address == mesh.addr(CART3))
    balancer = frontend.balancer
    held = []
    try:
        for _ in range(80):  # held open: the reachable endpoints' load grows
            held.append(await open_held(mesh))  # raises if any connection failed
            if balancer.ejected(refusing):
                break
        assert balancer.ejected(refusing), f"never ejected after {len(held)} connections"
        st = balancer.state(refusing)
        assert st is not None and st.picks >= 5  # it was tried, and failed 5 times in a row
        tried = picks(balancer, refusing)
        for _ in range(40):  # after the ejection: not one attempt goes to it
            held.append(await open_held(mesh))
        assert picks(balancer, refusing) == tried
        reachable = [e for e in dest.endpoints if e is not refusing]
        # Every held connection went to a reachable endpoint, and both took a share (how large a
        # share follows the latency estimates: under a busy machine one got 10 of 45).
        assert sum(picks(balancer, e) for e in reachable) == len(held)
        assert all(picks(balancer, e) >= 5 for e in reachable)
        assert frontend.metrics.connections.labels("outbound", "refused")._value.get() == 0
    finally:
        for _, writer in held:
            writer.close()
    for _ in range(100):  # the leases are released when the connections close
        if all(s.outstanding == 0 for s in balancer.states.values()):
            break
        await asyncio.sleep(0.02)
    assert all(s.outstanding == 0 for s in balancer.states.values())


async def test_a_sticky_service_keeps_the_caller_on_one_endpoint(start_ca: StartCA, tmp_path: Path) -> None:
    """sessionAffinity: ClientIP, as kube-proxy keeps a client on one endpoint: every connection of
    the frontend reaches the same cart (the balancer spread them before)."""
    sticky = MORE_CARTS.replace(
        "spec:\n  selector: {{app: cart}}", "spec:\n  sessionAffinity: ClientIP\n  selector: {{app: cart}}"
    )
    assert sticky != MORE_CARTS
    mesh = new_mesh(await start_ca(), tmp_path, workloads=OPAQUE_CART + sticky)
    try:
        for host, name in ((CART, "cart"), (CART2, "cart-2"), (CART3, "cart-3")):
            await mesh.app(host)
            await mesh.sidecar(name, host, identity_of="cart")
        frontend = await mesh.sidecar(
            "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=carts.shop:80",)
        )
        dest = frontend.mesh_config().lookup_name("carts.shop:80")
        assert dest is not None and dest.client_ip_affinity and len(dest.endpoints) == 3
        held = [await open_held(mesh) for _ in range(12)]  # held open: load would spread them
        for _, writer in held:
            writer.close()
        counts = sorted(picks(frontend.balancer, e) for e in dest.endpoints)
        assert counts == [0, 0, 12], counts
    finally:
        await mesh.close()


async def test_a_destination_with_no_endpoints_is_refused(mesh: Mesh) -> None:
    mesh.write(
        "empty.yaml",
        """\
        apiVersion: v1
        kind: Service
        metadata: {name: nobody, namespace: shop}
        spec: {selector: {app: nobody}, ports: [{port: 80}]}
        """,
    )
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=nobody.shop:80",)
    )
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"\x00")  # not HTTP: no wait for detection
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert frontend.metrics.connections.labels("outbound", "refused")._value.get() == 1


async def test_an_endpoint_presenting_another_identity_is_tried_elsewhere(mesh: Mesh) -> None:
    """An endpoint whose sidecar is not the identity the controller listed (a pod IP reused before
    the endpoints caught up) is refused by secure naming; the connection was then lost with a reset
    (the relay took the refused connection for its own), instead of going to another endpoint as a
    connection that cannot be made does."""
    for host, name, who in ((CART, "cart", "cart"), (CART2, "cart-2", "cart"), (CART3, "cart-3", "stranger")):
        await mesh.app(host)
        await mesh.sidecar(name, host, identity_of=who)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=carts.shop:80",)
    )
    held = []
    try:
        for _ in range(30):
            held.append(await open_held(mesh))  # raises if any connection failed
    finally:
        for _, writer in held:
            writer.close()
    assert frontend.metrics.tls_failures.labels("outbound", "wrong_identity")._value.get() >= 1
    assert frontend.metrics.connections.labels("outbound", "refused")._value.get() == 0
