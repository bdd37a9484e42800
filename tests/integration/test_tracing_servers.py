"""The CA and the injector trace and count their own requests (the controller uses the same
interceptor as the CA): spans reach a real OTLP receiver, metrics are read back."""

from __future__ import annotations

import asyncio
import http.client
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from injector.server import WebhookServer, create_app
from injector.settings import InjectionSettings
from injector.tls import ServingCertificate
from sidemesh.api import ca_pb2
from sidemesh.grpc_client import Status
from sidemesh.identity.client import CAClientError
from sidemesh.identity.svid import make_csr, new_key
from sidemesh.spiffe import WorkloadId
from sidemesh.telemetry import start_tracing
from tests.integration.conftest import StartCA
from tests.support import pki
from tests.support.otlp import Receiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SIGN = "/sidemesh.ca.v1.CertificateAuthority/Sign"


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    yield r
    await r.stop()


async def test_ca_signing_is_traced_and_counted(receiver: Receiver, start_ca: StartCA) -> None:
    ca = await start_ca()
    client = ca.client()
    sid = WorkloadId("shop", "cart").spiffe_id("cluster.local")
    try:
        request = ca_pb2.SignRequest(csr=make_csr(new_key(), sid))
        traceparent = f"00-{TRACE}-{PARENT}-01"
        # A caller's tracestate as long as the SDK takes (32 entries, about 7.9 KiB): recorded cut
        # to 512 characters, the short entries kept (any pod can call the CA; 512 such spans made
        # an export batch over the collectors' 4 MiB and every span of it was lost)
        state = ",".join(["s=1"] + [f"l{i}=" + "v" * 240 for i in range(31)])
        await client.call(
            request, {"authorization": "Bearer cart-token", "traceparent": traceparent, "tracestate": state}
        )
        with pytest.raises(CAClientError) as refused_call:
            await client.call(request, {"authorization": "Bearer wrong"})
        assert refused_call.value.code is Status.UNAUTHENTICATED
        # B3's "deny": the caller asks that nobody record the call.
        await client.call(request, {"authorization": "Bearer cart-token", "b3": "0"})
    finally:
        await client.close()
    spans = await receiver.wait_for(lambda s: len(s) >= 2)
    await asyncio.sleep(0.2)
    assert len(spans) == 2, spans
    ok = next(s for s in spans if s.trace_id == TRACE)
    assert ok.kind == "SERVER" and ok.parent_id == PARENT and ok.service == "sidemesh-ca"
    assert ok.trace_state == "s=1"
    assert ok.name == SIGN.lstrip("/") and ok.attributes["rpc.grpc.status_code"] == 0
    assert ok.resource["sidemesh.identity"].startswith("spiffe://cluster.local/ns/sidemesh-system/")
    assert ok.attributes["network.peer.address"] == "127.0.0.1"  # not gRPC's "ipv4:127.0.0.1:port"
    assert isinstance(ok.attributes["network.peer.port"], int)
    refused = next(s for s in spans if s.trace_id != TRACE)
    assert refused.parent_id == ""
    # RPC semantic conventions: UNAUTHENTICATED answers the call correctly; not a server error.
    assert refused.status == "UNSET" and refused.attributes["rpc.grpc.status_code"] == 16
    handled = ca.server.metrics.registry.get_sample_value
    assert handled("sidemesh_grpc_server_handled_total", {"method": SIGN, "code": "OK"}) == 2
    assert handled("sidemesh_grpc_server_handled_total", {"method": SIGN, "code": "UNAUTHENTICATED"}) == 1
    registry = ca.server.metrics.registry
    assert registry.get_sample_value("sidemesh_grpc_server_handling_seconds_count", {"method": SIGN}) == 3


async def test_a_b3_caller_that_left_the_decision_to_the_ca_is_sampled_by_its_sampler(
    receiver: Receiver, start_ca: StartCA
) -> None:
    """B3 without a sampling flag: the receiver decides (the default sampler: yes). It was read as
    "not sampled", so no span."""
    ca = await start_ca()
    client = ca.client()
    sid = WorkloadId("shop", "cart").spiffe_id("cluster.local")
    try:
        request = ca_pb2.SignRequest(csr=make_csr(new_key(), sid))
        await client.call(request, {"authorization": "Bearer cart-token", "b3": f"{TRACE}-{PARENT}"})
    finally:
        await client.close()
    spans = await receiver.wait_for(lambda s: len(s) >= 1)
    assert spans[0].trace_id == TRACE and spans[0].parent_id == PARENT


async def test_ca_without_an_endpoint_traces_nothing(
    start_ca: StartCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    ca = await start_ca()
    assert ca.server.tracing is None
    await ca.issue("cart-token", WorkloadId("shop", "cart"))  # counted without tracing:
    value = ca.server.metrics.registry.get_sample_value(
        "sidemesh_grpc_server_handled_total", {"method": SIGN, "code": "OK"}
    )
    assert value == 1


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str | list[str]] | None = None,
) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.putrequest(method, path)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        for name, value in (headers or {}).items():
            for one in value if isinstance(value, list) else [value]:
                conn.putheader(name, one)  # a list: the header once per value
        conn.endheaders(body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


async def test_injector_requests_are_traced_and_counted(receiver: Receiver, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    tracing = start_tracing("sidemesh-injector", registry)
    assert tracing is not None
    svid = pki.make_svid(
        pki.make_authority(tmp_path),
        WorkloadId("sidemesh-system", "sidemesh-injector").spiffe_id("cluster.local"),
    )
    serving = ServingCertificate()
    serving.load_pem(svid.chain_pem, svid.key_pem)
    server = WebhookServer(
        create_app(InjectionSettings, registry=registry, tracing=tracing), serving, "127.0.0.1", 0
    )
    port = await server.start()
    try:
        headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "content-type": "application/json"}
        assert await asyncio.to_thread(_request, port, "POST", "/mutate", b"not json", headers) == 400
        assert await asyncio.to_thread(_request, port, "GET", "/healthz") == 200
        # Two traceparent headers are no trace context (W3C): a new trace, not the last one's.
        twice = {"traceparent": [f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{'1' * 16}-01"]}
        assert await asyncio.to_thread(_request, port, "GET", "/nope", None, twice) == 404
    finally:
        await server.stop()
    spans = await receiver.wait_for(lambda s: len(s) >= 3)
    await tracing.close()
    mutate = next(s for s in spans if s.trace_id == TRACE)
    assert mutate.name == "POST /mutate" and mutate.parent_id == PARENT and mutate.kind == "SERVER"
    assert mutate.attributes["sidemesh.injector.outcome"] == "bad request"
    assert mutate.attributes["http.response.status_code"] == 400
    # No route matched: the span is named by the method alone and has no http.route (semconv).
    assert {s.name for s in spans} == {"POST /mutate", "GET /healthz", "GET"}
    unmatched = next(s for s in spans if s.name == "GET")
    assert unmatched.parent_id == "" and "http.route" not in unmatched.attributes
    assert mutate.attributes["http.route"] == "/mutate"
    assert (
        mutate.attributes["network.peer.address"] == "127.0.0.1"
        and mutate.attributes["url.scheme"] == "https"
    )
    get = registry.get_sample_value
    assert (
        get("sidemesh_http_server_requests_total", {"path": "/mutate", "method": "POST", "code": "400"}) == 1
    )
    assert get("sidemesh_http_server_requests_total", {"path": "other", "method": "GET", "code": "404"}) == 1
    assert get("sidemesh_injector_admissions_total", {"outcome": "bad request"}) == 1


async def test_controller_streams_are_traced_and_counted(
    receiver: Receiver, start_ca: StartCA, tmp_path: Path
) -> None:
    from tests.integration.mesh_fixture import ALLOW_FRONTEND, MESH_YAML, Mesh, free_net
    from tests.integration.test_controller import Controller

    ca = await start_ca()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    mesh = Mesh(ca, config_dir, free_net())
    mesh.write("workloads.yaml", MESH_YAML.format(net=mesh.net))
    mesh.write("allow.yaml", ALLOW_FRONTEND)
    controller = Controller(mesh)
    await controller.server.start()
    try:
        cart = await mesh.sidecar("cart", 2, controller=controller.address)
        await mesh.sidecars.pop("cart").drain(timeout=0)  # its stream ends
        await cart.identity.ca.close()
        stream = "/sidemesh.config.v1.ConfigDiscovery/Stream"
        get = controller.server.metrics.registry.get_sample_value
        for _ in range(100):
            if get("sidemesh_grpc_server_handling_seconds_count", {"method": stream}):
                break
            await asyncio.sleep(0.05)
        assert get("sidemesh_grpc_server_handling_seconds_count", {"method": stream}) == 1
        spans = await receiver.wait_for(lambda s: any(x.service == "sidemesh-controller" for x in s))
        span = next(s for s in spans if s.service == "sidemesh-controller")
        assert span.kind == "SERVER" and span.name == stream.lstrip("/")
        assert span.attributes["rpc.service"] == "sidemesh.config.v1.ConfigDiscovery"
    finally:
        await controller.stop()
        await mesh.close()
