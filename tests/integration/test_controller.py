"""The controller streaming to real sidecars: policy changes, outages, refusals, bad resources."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc.experimental import session_cache

from controller.config import ControllerConfig
from controller.server import SERVER_OPTIONS, ConfigServer
from controller.sources.directory import DirectorySource
from proxy.config_client import METHOD
from sidemesh.api import config_pb2 as pb
from sidemesh.config import ConfigError
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.mesh.compile import OutboundTable
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, INBOUND, Mesh, new_mesh, talk
from tests.support import pki
from tests.support.tcp_relay import TcpRelay

FRONTEND, CART, STRANGER = 1, 2, 3
OUT = 18080
NAME = "sidemesh-controller.sidemesh-system.svc"


class Controller:
    def __init__(self, mesh: Mesh, port: int = 0, status_from: str = "127.0.0.0/8,::1/128") -> None:
        config = ControllerConfig(
            listen=f"127.0.0.1:{port}",
            metrics_listen="127.0.0.1:0",
            source="directory",
            config_dir=mesh.config_dir,
            coalesce=__import__("datetime").timedelta(milliseconds=50),
            status_from=status_from,
        )
        identity = WorkloadIdentity(
            WorkloadId("sidemesh-system", "sidemesh-controller").spiffe_id("cluster.local"),
            mesh.ca.client(),
            lambda: "controller-token",
            dns_names=(NAME,),
        )
        self.server = ConfigServer(config, identity, DirectorySource(mesh.config_dir, poll_seconds=0.05))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def status(self) -> Any:
        url = f"http://127.0.0.1:{self.server.status_port}/status"
        return await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(url, timeout=5).read()))

    async def stop(self) -> None:
        await self.server.stop(grace=0)
        await self.server.identity.ca.close()


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


@pytest.fixture
async def controller(mesh: Mesh) -> AsyncIterator[Controller]:
    c = Controller(mesh)
    await c.server.start()
    yield c
    await c.stop()


async def start_pair(mesh: Mesh, controller: Controller) -> None:
    await mesh.app(CART)
    await mesh.sidecar("cart", CART, controller=controller.address)
    await mesh.sidecar(
        "frontend",
        FRONTEND,
        controller=controller.address,
        outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",),
    )
    await mesh.sidecar(
        "stranger",
        STRANGER,
        controller=controller.address,
        outbound=(f"{mesh.addr(STRANGER)}:{OUT}=cart.shop:80",),
    )


async def test_sidecars_enforce_what_the_controller_streams(mesh: Mesh, controller: Controller) -> None:
    await start_pair(mesh, controller)
    assert await talk(mesh.addr(FRONTEND), OUT, b"hi") == b"HIBYE"
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"hi")
    status = await controller.status()
    assert sorted(s["identity"] for s in status["streams"]) == ["shop/cart", "shop/frontend", "shop/stranger"]
    assert all(s["acked"] == status["version"] for s in status["streams"])  # every sidecar acknowledged


async def test_a_policy_change_reaches_running_sidecars_quickly(mesh: Mesh, controller: Controller) -> None:
    await start_pair(mesh, controller)
    cart = mesh.sidecars["cart"]
    before = cart.mesh_config().version
    started = time.monotonic()
    mesh.write("allow-stranger.yaml", ALLOW_FRONTEND.replace("frontend", "stranger"))
    while cart.mesh_config().version == before:
        assert time.monotonic() - started < 5, "the change never arrived"
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert await talk(mesh.addr(STRANGER), OUT, b"now") == b"NOWBYE"


async def test_controller_down_keeps_last_known_good_then_resyncs(mesh: Mesh, controller: Controller) -> None:
    await start_pair(mesh, controller)
    port = controller.server.port
    await controller.stop()
    cart = mesh.sidecars["cart"]
    for _ in range(100):
        if cart.controller is not None and not cart.controller.connected:
            break
        await asyncio.sleep(0.05)
    assert cart.controller is not None and not cart.controller.connected
    # Nothing allowed that was denied, nothing denied that was allowed.
    assert await talk(mesh.addr(FRONTEND), OUT, b"still") == b"STILLBYE"
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"still")
    url = f"http://{mesh.addr(CART)}:{cart.ports['admin']}/config"
    config = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(url, timeout=5).read()))
    assert config["source"]["stale"] is True and config["source"]["connected"] is False
    # A change made while the controller is away is applied once it is back.
    mesh.write("allow-stranger.yaml", ALLOW_FRONTEND.replace("frontend", "stranger"))
    back = Controller(mesh, port)
    await back.server.start()
    try:
        for _ in range(200):
            if cart.controller.connected and any(
                p.ref == "shop/cart-allow-stranger" for p in cart.mesh_config().policies
            ):
                break
            await asyncio.sleep(0.05)
        assert await talk(mesh.addr(STRANGER), OUT, b"back") == b"BACKBYE"
    finally:
        await back.stop()


@contextlib.asynccontextmanager
async def _frontend_stream(
    mesh: Mesh, controller: Controller, first: pb.StreamRequest
) -> AsyncIterator[tuple[Any, asyncio.Queue[pb.StreamRequest]]]:
    """A config stream as the frontend's sidecar (its SVID), opened with ``first``; requests go out
    through the queue."""
    svid = pki.make_svid(mesh.ca.authority, WorkloadId("shop", "frontend").spiffe_id("cluster.local"))
    creds = grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem)
    async with grpc.aio.secure_channel(
        controller.address, creds, options=[("grpc.ssl_target_name_override", NAME)]
    ) as channel:
        outbox: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
        outbox.put_nowait(first)

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            while True:
                yield await outbox.get()

        yield (
            channel.stream_stream(METHOD, pb.StreamRequest.SerializeToString, pb.Update.FromString)(
                requests()
            ),
            outbox,
        )


@pytest.mark.parametrize("deltas", [True, False], ids=["sidecar", "older-sidecar"])
async def test_only_changed_parts_are_sent(mesh: Mesh, controller: Controller, deltas: bool) -> None:
    """Only the parts that changed; of the outbound table only what changed, to a sidecar that
    says it applies deltas. An older one (it would ignore the delta field and acknowledge a table
    it does not hold) gets the whole table."""
    async with _frontend_stream(mesh, controller, pb.StreamRequest(outbound_deltas=deltas)) as (call, outbox):
        first = await asyncio.wait_for(call.read(), 5)
        assert first.HasField("inbound") and first.HasField("outbound")
        assert first.inbound.identity == "spiffe://cluster.local/ns/shop/sa/frontend"
        assert [w.ref for w in first.inbound.workloads] == ["shop/frontend-1"]
        outbox.put_nowait(pb.StreamRequest(ack_version=first.version))
        # A policy for cart changes neither the frontend's inbound rules nor the outbound table.
        mesh.write("allow-stranger.yaml", ALLOW_FRONTEND.replace("frontend", "stranger"))
        second = await asyncio.wait_for(call.read(), 5)
        assert second.version != first.version
        assert not second.HasField("inbound") and not second.HasField("outbound")
        # A new service changes the outbound table only.
        mesh.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\n"
            "spec: {selector: {app: cart}, ports: [{port: 81, targetPort: 8080}]}\n",
        )
        third = await asyncio.wait_for(call.read(), 5)
        assert not third.HasField("inbound")
        if not deltas:
            assert third.HasField("outbound") and not third.HasField("outbound_delta")
            assert any(d.name == "extra.shop:81" for d in third.outbound.destinations)
            call.cancel()
            return
        # ... and of it only what changed: the new destinations, on the table the stream holds.
        assert third.HasField("outbound_delta") and not third.HasField("outbound")
        delta = third.outbound_delta
        assert delta.base == first.outbound.hash and delta.hash != first.outbound.hash
        assert [d.name for d in delta.upserted] == ["extra.shop:81"] and not delta.removed
        # The delta refused (say, a table the sidecar does not hold): at once, nothing having
        # changed, the same version again, whole, as the controller cannot know what it holds.
        outbox.put_nowait(pb.StreamRequest(ack_version=third.version, error="holds another table"))
        fourth = await asyncio.wait_for(call.read(), 5)
        assert fourth.version == third.version
        assert fourth.HasField("inbound") and fourth.HasField("outbound")
        assert not fourth.HasField("outbound_delta") and fourth.outbound.hash == delta.hash
        # That refused too (not a delta now): no more at once; the next change goes whole.
        outbox.put_nowait(pb.StreamRequest(ack_version=fourth.version, error="still cannot"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(read := asyncio.ensure_future(call.read())), 0.5)
        mesh.write("allow-other.yaml", ALLOW_FRONTEND.replace("frontend", "other"))
        fifth = await asyncio.wait_for(read, 5)
        assert fifth.version != fourth.version and fifth.HasField("inbound") and fifth.HasField("outbound")
        call.cancel()


FEATURES = {
    # StreamRequest field: (the Service's spec, the Destination field, the controller's warning)
    "node_local": ("internalTrafficPolicy: Local", "node_local", "internalTrafficPolicy: Local"),
    "client_ip_affinity": ("sessionAffinity: ClientIP", "client_ip_affinity", "sessionAffinity: ClientIP"),
}


@pytest.mark.parametrize("applies", [True, False], ids=["sidecar", "older-sidecar"])
@pytest.mark.parametrize("feature", FEATURES)
async def test_a_sidecar_that_does_not_apply_a_service_feature_gets_whole_tables_and_a_warning(
    mesh: Mesh, controller: Controller, feature: str, applies: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar from before node-local Services (internalTrafficPolicy: Local) or sticky ones
    (sessionAffinity: ClientIP) drops the field: it reached every endpoint without a word, and
    refused every delta touching such a Service (its table hashed to another), a NACK and a whole
    table per change. It does not say it applies them (StreamRequest.node_local,
    .client_ip_affinity): while the table has one, it gets the table whole and the controller
    warns once."""
    import logging

    spec, field, warning = FEATURES[feature]
    caplog.set_level(logging.WARNING)
    mesh.write(
        "agent.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: agent, namespace: shop}\n"
        f"spec: {{clusterIP: 10.96.0.82, {spec}, selector: {{app: cart}}, ports: [{{port: 82, targetPort: 8080}}]}}\n",
    )
    has = (
        controller.server.state.has_node_local
        if feature == "node_local"
        else controller.server.state.has_affinity
    )
    for _ in range(100):  # (the directory source's poll and the coalescing window)
        if has():
            break
        await asyncio.sleep(0.05)
    assert has()
    said = {"node_local": True, "client_ip_affinity": True, feature: applies}  # (the other one: applied)
    first_request = pb.StreamRequest(outbound_deltas=True, **said)
    async with _frontend_stream(mesh, controller, first_request) as (call, outbox):
        first = await asyncio.wait_for(call.read(), 5)
        assert any(getattr(d, field) for d in first.outbound.destinations)
        outbox.put_nowait(pb.StreamRequest(ack_version=first.version))
        mesh.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\n"
            "spec: {selector: {app: cart}, ports: [{port: 81, targetPort: 8080}]}\n",
        )
        while True:  # (an update changing nothing of this sidecar's may come first)
            second = await asyncio.wait_for(call.read(), 5)
            if second.HasField("outbound") or second.HasField("outbound_delta"):
                break
            outbox.put_nowait(pb.StreamRequest(ack_version=second.version))
        call.cancel()
    warned = [r for r in caplog.records if warning in r.getMessage()]
    if applies:
        assert second.HasField("outbound_delta") and not warned
    else:
        assert second.HasField("outbound") and not second.HasField("outbound_delta")
        assert len(warned) == 1 and warned[0].identity == "shop/frontend"


async def test_sidecars_apply_outbound_deltas_to_the_controllers_table(
    mesh: Mesh, controller: Controller
) -> None:
    """A Service added, then removed: each change reaches the running sidecars as a delta, and what
    each holds after applying it is the controller's table, destination for destination."""
    await start_pair(mesh, controller)
    sent = controller.server.metrics.outbound

    def extra(table: OutboundTable | None) -> bool:
        return table is not None and any(d.name == "extra.shop:81" for d in table.destinations)

    async def settled(with_extra: bool) -> None:
        """Until the controller's table has (or lacks) the new Service and every sidecar holds it."""
        for _ in range(200):
            table = controller.server.state.outbound_table()
            if extra(table) == with_extra and all(
                s.controller is not None and s.controller.outbound == table for s in mesh.sidecars.values()
            ):
                return
            await asyncio.sleep(0.05)
        table = controller.server.state.outbound_table()
        assert extra(table) == with_extra
        for s in mesh.sidecars.values():
            assert s.controller is not None and s.controller.outbound == table, s.controller.last_error

    await settled(with_extra=False)
    wholes, deltas = sent.labels("whole")._value.get(), sent.labels("delta")._value.get()
    mesh.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\n"
        "spec: {selector: {app: cart}, ports: [{port: 81, targetPort: 8080}]}\n",
    )
    await settled(with_extra=True)
    (mesh.config_dir / "svc.yaml").unlink()
    await settled(with_extra=False)
    assert sent.labels("whole")._value.get() == wholes  # no sidecar was sent the whole table again
    assert sent.labels("delta")._value.get() >= deltas + 2 * len(mesh.sidecars)
    assert all(s.controller is not None and s.controller.last_error is None for s in mesh.sidecars.values())
    # The sidecars route by what they hold: the frontend still reaches cart.
    assert await talk(mesh.addr(FRONTEND), OUT, b"delta") == b"DELTABYE"


async def test_stream_refuses_clients_without_a_mesh_certificate(
    mesh: Mesh, controller: Controller, tmp_path: Path
) -> None:
    bundle = mesh.ca.bundle
    foreign = pki.make_authority(tmp_path / "foreign")
    foreign_svid = pki.make_svid(foreign, WorkloadId("shop", "frontend").spiffe_id("cluster.local"))
    for creds in (
        grpc.ssl_channel_credentials(bundle),  # no client certificate
        grpc.ssl_channel_credentials(bundle, foreign_svid.key_pem, foreign_svid.chain_pem),
    ):  # another CA
        async with grpc.aio.secure_channel(
            controller.address, creds, options=[("grpc.ssl_target_name_override", NAME)]
        ) as ch:
            call = ch.stream_stream(
                METHOD,
                pb.StreamRequest.SerializeToString,
                pb.Update.FromString,
            )(iter([pb.StreamRequest()]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_invalid_and_half_written_files_do_not_take_the_controller_down(
    mesh: Mesh, controller: Controller
) -> None:
    await start_pair(mesh, controller)
    mesh.write(
        "broken.yaml",
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\nmetadata: {name: bad, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: cart}}, rules: [{from: [{}]}]}\n",
    )
    mesh.write("half.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x\n  ports: [")
    for _ in range(100):
        status = await controller.status()
        if len(status["invalid_resources"]) == 2:
            break
        await asyncio.sleep(0.05)
    errors = " ".join(status["invalid_resources"])
    assert "names nobody" in errors and "half.yaml" in errors
    # Everything else is still served and enforced.
    assert await talk(mesh.addr(FRONTEND), OUT, b"ok") == b"OKBYE"
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"no")


async def test_status_names_sidecars_only_to_the_networks_allowed(mesh: Mesh) -> None:
    """/status lists every connected sidecar's identity and address: by default only the
    controller's own pod may read it; /metrics and readiness stay open (Prometheus, kubelet)."""
    c = Controller(mesh, status_from="10.0.0.0/8")
    await c.server.start()
    try:
        base = f"http://127.0.0.1:{c.server.status_port}"
        with pytest.raises(urllib.error.HTTPError) as denied:
            await asyncio.to_thread(urllib.request.urlopen, f"{base}/status", timeout=5)
        assert denied.value.code == 403
        why = json.loads(denied.value.read())["error"]
        denied.value.close()
        assert "--status-from 10.0.0.0/8" in why and "port-forward" in why
        with await asyncio.to_thread(urllib.request.urlopen, f"{base}/metrics", timeout=5) as metrics:
            assert metrics.status == 200
        with await asyncio.to_thread(urllib.request.urlopen, f"{base}/healthz/live", timeout=5) as live:
            assert live.status == 200 and json.loads(live.read()) == {"live": True}
    finally:
        await c.stop()
    with pytest.raises(ConfigError, match="--status-from"):
        ControllerConfig(status_from="not-a-network")


async def test_a_resumed_session_does_not_outlive_the_client_certificate(
    mesh: Mesh, controller: Controller
) -> None:
    """grpc's TLS (BoringSSL) issues session tickets and grpcio cannot turn them off: a client that
    resumes a session is not asked for its certificate again, and the one from the first handshake
    may have expired since. The controller checks its validity on every stream."""
    expires = dt.timedelta(seconds=3)
    svid = pki.make_svid(
        mesh.ca.authority, WorkloadId("shop", "frontend").spiffe_id("cluster.local"), expires
    )
    creds = grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem)
    cache = session_cache.ssl_session_cache_lru(4)
    options = [("grpc.ssl_target_name_override", NAME), ("grpc.ssl_session_cache", cache)]

    async def first_update() -> pb.Update:
        async with grpc.aio.secure_channel(controller.address, creds, options=options) as channel:
            call = channel.stream_stream(
                METHOD,
                pb.StreamRequest.SerializeToString,
                pb.Update.FromString,
            )(iter([pb.StreamRequest()]))
            try:
                return await asyncio.wait_for(call.read(), 5)
            finally:
                call.cancel()

    assert (await first_update()).inbound.identity == "spiffe://cluster.local/ns/shop/sa/frontend"
    await asyncio.sleep(max(0.0, (svid.not_after - dt.datetime.now(dt.UTC)).total_seconds()) + 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first_update()  # resumes the first session: no handshake checks the certificate
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value


_NEW_POD = """
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {name: cart2-1, namespace: shop, labels: {app: batch}}
spec: {serviceAccount: cart, address: NET.4}
"""


async def test_a_sidecar_whose_first_update_was_refused_gets_a_whole_one(
    mesh: Mesh, controller: Controller
) -> None:
    """A sidecar that connected before the controller knew its pod refused its first update (no
    workload runs as it); the controller took it as held, so the next update, carrying only the
    changed inbound part, was refused too ("the first must carry both") and the pod stayed NotReady
    until something unrelated changed the outbound table. A NACK now resets what the sidecar is
    taken to hold: the next update is whole."""
    from proxy.config import ProxyConfig
    from proxy.sidecar import Sidecar

    await mesh.app(4)
    config = ProxyConfig(
        workload="shop/cart2-1",
        controller=controller.address,
        service_account="cart",
        capture="none",
        inbound_listen=f"{mesh.addr(4)}:{INBOUND}",
        admin_listen=f"{mesh.addr(4)}:0",
        health_listen=f"{mesh.addr(4)}:0",
        app_host=mesh.addr(4),
        trust_domain="cluster.local",
    )
    identity = WorkloadIdentity(
        WorkloadId("shop", "cart").spiffe_id("cluster.local"), mesh.ca.client(), lambda: "cart-token"
    )
    sidecar = Sidecar(config, identity)
    await sidecar.start()
    mesh.sidecars["cart2"] = sidecar
    assert sidecar.controller is not None
    for _ in range(100):  # connected; its first update refused
        if sidecar.controller.last_error:
            break
        await asyncio.sleep(0.05)
    assert not sidecar.ready and "no workload" in (sidecar.controller.last_error or "")
    outbound = controller.server.state.outbound_hash()
    mesh.write("newpod.yaml", _NEW_POD.replace("NET", mesh.net))  # the controller catches up
    for _ in range(100):
        if sidecar.ready:
            break
        await asyncio.sleep(0.05)
    assert controller.server.state.outbound_hash() == outbound  # (only the inbound part changed)
    assert sidecar.ready and sidecar.controller.last_error is None
    for _ in range(100):  # (its acknowledgement is on its way to the controller)
        streams = [s for s in (await controller.status())["streams"] if s["identity"] == "shop/cart"]
        if streams and all(s["error"] == "" for s in streams):
            break
        await asyncio.sleep(0.05)
    assert streams and all(s["error"] == "" for s in streams), streams


async def _open_stream(
    mesh: Mesh, controller: Controller, wid: WorkloadId, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> tuple[Any, Any, asyncio.Queue[pb.StreamRequest]]:
    """A raw config stream with an SVID of ``wid`` lasting ``ttl``: (channel, call, outbox)."""
    svid = pki.make_svid(mesh.ca.authority, wid.spiffe_id("cluster.local"), ttl)
    creds = grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem)
    channel = grpc.aio.secure_channel(
        controller.address, creds, options=[("grpc.ssl_target_name_override", NAME)]
    )
    outbox: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
    outbox.put_nowait(pb.StreamRequest())

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        while True:
            yield await outbox.get()

    method = channel.stream_stream(METHOD, pb.StreamRequest.SerializeToString, pb.Update.FromString)
    return channel, method(requests()), outbox


async def test_a_stream_ends_with_its_certificate(mesh: Mesh, controller: Controller) -> None:
    """A stream went on receiving policy and topology after the certificate it was opened with
    expired (checked only at the start). A sidecar renews at half-life and reconnects first."""
    channel, call, _ = await _open_stream(
        mesh, controller, WorkloadId("shop", "frontend"), dt.timedelta(seconds=2)
    )
    try:
        await asyncio.wait_for(call.read(), 5)  # the first update

        async def read_to_the_end() -> None:
            while True:
                await asyncio.wait_for(call.read(), 10)

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_to_the_end()
        assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "certificate expired" in (ended.value.details() or "")
    finally:
        await channel.close()


async def test_refusals_are_kept_short_and_logged_now_and_then(
    mesh: Mesh, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    """Any SVID of the trust domain could send NACKs of megabytes, each logged whole: 50 of them
    logged 157 MB in 0.4 s."""
    import logging

    caplog.set_level(logging.ERROR, "sidemesh.controller")
    channel, call, outbox = await _open_stream(mesh, controller, WorkloadId("shop", "frontend"))
    try:
        await asyncio.wait_for(call.read(), 5)
        for _ in range(50):
            outbox.put_nowait(pb.StreamRequest(ack_version="x", error="E" * 100_000))
        for _ in range(100):
            streams = (await controller.status())["streams"]
            if any(s["error"] for s in streams):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        call.cancel()
        await channel.close()
    assert [len(s["error"]) for s in streams if s["error"]] == [1024]
    logged = [r for r in caplog.records if r.getMessage() == "sidecar could not apply an update"]
    assert len(logged) == 1 and len(logged[0].__dict__["error"]) == 1024


async def test_nacks_of_versions_never_sent_do_not_bring_whole_tables(
    mesh: Mesh, controller: Controller
) -> None:
    """A NACK of an older version sends the current one again, whole; a client answering every
    update with a NACK of a made-up version had whole tables sent nonstop (6,100 in 2 s)."""
    await start_pair(mesh, controller)
    channel, call, outbox = await _open_stream(mesh, controller, WorkloadId("shop", "frontend"))
    try:
        await asyncio.wait_for(call.read(), 5)
        for _ in range(20):
            outbox.put_nowait(pb.StreamRequest(ack_version="0", error="x"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call.read(), 1.0)  # nothing new: nothing sent
    finally:
        call.cancel()
        await channel.close()


async def test_a_long_port_annotation_does_not_freeze_the_mesh(mesh: Mesh, controller: Controller) -> None:
    """5,000 digits are ASCII digits that int() refuses (Python's limit): the compile failed for
    every later snapshot, and no change reached the sidecars."""
    await start_pair(mesh, controller)
    before = controller.server.state.version
    pod = _NEW_POD.replace("NET", mesh.net).replace(
        "labels: {app: batch}",
        "labels: {app: cart}, annotations: {sidemesh.io/exclude-inbound-ports: '" + "9" * 5000 + "'}",
    )
    mesh.write("evil.yaml", pod)
    for _ in range(100):
        if controller.server.state.version != before:
            break
        await asyncio.sleep(0.05)
    assert controller.server.state.version != before


async def test_a_silent_partition_is_noticed_by_the_keepalive_and_the_stream_comes_back(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pings on the stream (every KEEPALIVE while it is quiet): one unanswered for KEEPALIVE_TIMEOUT
    drops the connection, so a sidecar behind a partition reports itself disconnected (stale) and
    reconnects once the network is back, not hours later when TCP gives up."""
    monkeypatch.setattr("proxy.config_client.KEEPALIVE", 0.2)
    monkeypatch.setattr("proxy.config_client.KEEPALIVE_TIMEOUT", 0.5)
    # The controller permits pings as often as the sidecars send them (as SERVER_OPTIONS does for
    # the real 30 s: more often, grpcio answers GOAWAY too_many_pings).
    options = dict(SERVER_OPTIONS, **{"grpc.http2.min_ping_interval_without_data_ms": 100})
    monkeypatch.setattr("controller.server.SERVER_OPTIONS", list(options.items()))
    controller = Controller(mesh)
    await controller.server.start()
    partition = TcpRelay(controller.server.port)
    address = await partition.start()
    try:
        await mesh.app(CART)
        cart = await mesh.sidecar("cart", CART, controller=address)
        assert cart.controller is not None and cart.controller.connected
        await asyncio.sleep(1.0)  # quiet, and the pings are answered: the stream stays
        assert cart.controller.connected, cart.controller.last_error
        partition.dropping = True
        started = time.monotonic()
        while cart.controller.connected:
            assert time.monotonic() - started < 5, "the partition was never noticed"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started < 2.0
        partition.dropping = False
        for _ in range(200):
            if cart.controller.connected:
                break
            await asyncio.sleep(0.05)
        assert cart.controller.connected, cart.controller.last_error
    finally:
        await partition.close()
        await controller.stop()
