"""Service annotations -> the controller -> the config stream (real gRPC, mTLS) -> a sidecar's
destinations; an invalid annotation is reported by name and ignored alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, MESH_YAML, Mesh, free_net
from tests.integration.test_controller import Controller

FRONTEND = 1

ANNOTATED = """\
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
  annotations:
    sidemesh.io/timeout: 1500ms
    sidemesh.io/retries: "{retries}"
    sidemesh.io/retry-non-idempotent: "true"
spec:
  selector: {{app: cart}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: pg, port: 5432, targetPort: 8080}}]
"""


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = await start_ca()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    m = Mesh(ca, config_dir, free_net())
    # The demo's mesh without its cart Service: this test's annotated one replaces it.
    m.write("workloads.yaml", MESH_YAML.format(net=m.net).split("---\napiVersion: v1\nkind: Service")[0])
    m.write("cart.yaml", ANNOTATED.format(retries=2))
    m.write("allow.yaml", ALLOW_FRONTEND)
    yield m
    await m.close()


async def test_service_annotations_reach_the_sidecar_and_bad_ones_are_reported(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    controller = Controller(mesh)
    await controller.server.start()
    try:
        frontend = await mesh.sidecar("frontend", FRONTEND, controller=controller.address)
        cart = frontend.mesh_config().lookup_name("cart.shop:80")
        assert cart is not None
        assert (cart.timeout_s, cart.retries, cart.retry_non_idempotent, cart.opaque) == (1.5, 2, True, False)
        pg = frontend.mesh_config().lookup_name("cart.shop:5432")
        assert pg is not None and pg.opaque  # the default opaque list

        caplog.set_level(logging.ERROR, "sidemesh.controller")
        mesh.write("cart.yaml", ANNOTATED.format(retries="lots"))
        for _ in range(200):
            cart = frontend.mesh_config().lookup_name("cart.shop:80")
            if cart is not None and cart.retries == 0:
                break
            await asyncio.sleep(0.025)
        assert cart is not None and (cart.timeout_s, cart.retries, cart.retry_non_idempotent) == (
            1.5,
            0,
            True,
        )
        assert len(cart.endpoints) == 1  # the Service is still there, with its endpoints
        status = await controller.status()
        expected = "Service shop/cart: annotation sidemesh.io/retries: 'lots' is not a number of retries"
        assert any(expected in e for e in status["invalid_resources"]), status["invalid_resources"]
        assert any(expected in str(getattr(r, "error", "")) for r in caplog.records)
    finally:
        await controller.stop()
