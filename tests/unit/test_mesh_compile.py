"""Compilation of a snapshot into the outbound table and per-identity inbound config, and the wire
format's round trip."""

from __future__ import annotations

import textwrap

import yaml

from sidemesh.mesh import wire
from sidemesh.mesh.compile import compile_inbound, compile_outbound, compile_sidecar, identities
from sidemesh.mesh.resources import EndpointAddress, ServiceEndpoints, Snapshot, build_snapshot
from sidemesh.policy.model import DefaultPolicy
from sidemesh.spiffe import WorkloadId

DOCS = textwrap.dedent("""\
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop, annotations: {sidemesh.io/default-policy: deny}}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: cart-1, namespace: shop, labels: {app: cart, track: stable}}
    spec: {serviceAccount: cart, address: 10.0.0.2, ports: [{port: 8080, name: http}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: cart-2, namespace: shop, labels: {app: cart, track: canary}, annotations: {sidemesh.io/default-policy: allow-all}}
    spec: {serviceAccount: cart, address: 10.0.0.3, ports: [{port: 8080, name: http}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: legacy-1, namespace: shop, labels: {app: cart}}
    spec: {serviceAccount: legacy, address: 10.0.0.4, meshed: false, ports: [{port: 8080, name: http}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: cart, namespace: shop}
    spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{port: 80, targetPort: http, name: web}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: ServiceAuthorization
    metadata: {name: stable-only, namespace: shop}
    spec:
      selector: {matchLabels: {track: stable}}
      rules: [{from: [{serviceAccount: frontend}]}]
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: ServiceAuthorization
    metadata: {name: broken, namespace: shop}
    spec: {rules: [{from: []}]}
    """)


def snapshot() -> Snapshot:
    return build_snapshot([(f"doc{i}", d) for i, d in enumerate(yaml.safe_load_all(DOCS))])


def test_outbound_resolves_named_ports_and_marks_unmeshed_endpoints() -> None:
    snap = snapshot()
    assert len(snap.errors) == 1 and "broken" in snap.errors[0] and "must not be empty" in snap.errors[0]
    table = compile_outbound(snap, "cluster.local")
    cart = table._by_address[("10.96.0.10", 80)]
    assert cart is table._by_name["cart.shop:80"] is table._by_name["cart.shop.svc.cluster.local:80"]
    assert [(e.address, e.port, str(e.identity) if e.identity else None) for e in cart.endpoints] == [
        ("10.0.0.2", 8080, "spiffe://cluster.local/ns/shop/sa/cart"),
        ("10.0.0.3", 8080, "spiffe://cluster.local/ns/shop/sa/cart"),
        ("10.0.0.4", 8080, None),
    ]
    assert (
        table._by_address[("10.0.0.2", 8080)].endpoints[0].workload == "shop/cart-1"
    )  # direct pod addressing


def test_endpoint_slices_take_precedence_over_selectors() -> None:
    snap = snapshot()
    listed = Snapshot(
        snap.services,
        snap.workloads,
        snap.namespaces,
        snap.policies,
        (),
        (ServiceEndpoints("shop", "cart", (EndpointAddress("10.0.0.3", "web", 8080, "shop/cart-2"),)),),
    )
    cart = compile_outbound(listed, "cluster.local")._by_name["cart.shop:80"]
    assert [(e.address, e.workload) for e in cart.endpoints] == [
        ("10.0.0.3", "shop/cart-2")
    ]  # only the ready one


def test_inbound_per_identity_with_defaults_from_annotations() -> None:
    snap = snapshot()
    assert identities(snap) == {WorkloadId("shop", "cart")}  # the unmeshed workload has no sidecar
    inbound = compile_inbound(
        snap, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy.ALLOW_AUTHENTICATED
    )
    by_ref = {w.ref: w for w in inbound.workloads}
    assert by_ref["shop/cart-1"].policies == ("shop/stable-only",)
    assert by_ref["shop/cart-2"].policies == ()
    assert by_ref["shop/cart-1"].default_policy is DefaultPolicy.DENY  # namespace annotation
    assert by_ref["shop/cart-2"].default_policy is DefaultPolicy.ALLOW_ALL  # pod annotation wins
    assert [p.ref for p in inbound.policies] == ["shop/stable-only"]
    canary = compile_sidecar(snap, "shop/cart-2", "cluster.local", DefaultPolicy.DENY)
    assert canary.policies == () and canary.default_policy is DefaultPolicy.ALLOW_ALL


def test_hashes_change_only_with_content() -> None:
    snap = snapshot()
    a = compile_outbound(snap, "cluster.local")
    b = compile_outbound(snapshot(), "cluster.local")
    assert a.hash == b.hash
    fewer = Snapshot(snap.services, snap.workloads[:1], snap.namespaces, snap.policies)
    assert compile_outbound(fewer, "cluster.local").hash != a.hash


def test_wire_round_trip() -> None:
    snap = snapshot()
    inbound = compile_inbound(snap, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy.DENY)
    outbound = compile_outbound(snap, "cluster.local")
    back_in = wire.inbound_from_pb(wire.inbound_to_pb(inbound))
    back_out = wire.outbound_from_pb(wire.outbound_to_pb(outbound))
    assert back_in.workloads == inbound.workloads and back_in.hash == inbound.hash
    assert [p.rules for p in back_in.policies] == [p.rules for p in inbound.policies]
    assert back_out.destinations == outbound.destinations


def test_wire_rejects_garbage() -> None:
    import pytest

    from sidemesh.api import config_pb2 as pb

    with pytest.raises(wire.WireError):
        wire.inbound_from_pb(pb.Inbound(identity="not-a-spiffe-id"))
    with pytest.raises(wire.WireError):
        wire.outbound_from_pb(
            pb.Outbound(destinations=[pb.Destination(name="x", endpoints=[pb.Endpoint(identity="http://x")])])
        )


def test_ports_excluded_from_inbound_capture_are_reached_in_plaintext() -> None:
    snap = snapshot()
    cart1 = snap.workloads[0]
    import dataclasses

    excluded = dataclasses.replace(cart1, annotations=(("sidemesh.io/exclude-inbound-ports", "8080,9090"),))
    table = compile_outbound(
        Snapshot(snap.services, (excluded, *snap.workloads[1:]), snap.namespaces, snap.policies),
        "cluster.local",
    )
    endpoints = {e.workload: e for e in table._by_name["cart.shop:80"].endpoints}
    assert endpoints["shop/cart-1"].identity is None  # its sidecar would not terminate mTLS on 8080
    assert endpoints["shop/cart-2"].identity is not None
    everything = dataclasses.replace(cart1, annotations=(("sidemesh.io/exclude-inbound-ports", "*"),))
    table = compile_outbound(
        Snapshot(snap.services, (everything,), snap.namespaces, snap.policies), "cluster.local"
    )
    assert table._by_address[("10.0.0.2", 8080)].endpoints[0].identity is None


def test_dual_stack_services_are_reached_at_each_cluster_ip() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00::a"],
            "selector": {"app": "cart"},
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }
    snap = snapshot()
    services = build_snapshot([("svc", doc)]).services
    table = compile_outbound(Snapshot(services, snap.workloads), "cluster.local")
    assert table._by_address[("10.96.0.10", 80)] is table._by_address[("fd00::a", 80)]


def test_an_invalid_default_policy_annotation_never_breaks_compilation() -> None:
    import dataclasses

    snap = snapshot()
    odd = dataclasses.replace(snap.workloads[0], annotations=(("sidemesh.io/default-policy", "maybe"),))
    inbound = compile_inbound(
        Snapshot(snap.services, (odd,), snap.namespaces),
        WorkloadId("shop", "cart"),
        "cluster.local",
        DefaultPolicy.ALLOW_ALL,
    )
    assert inbound.workloads[0].default_policy is DefaultPolicy.DENY  # the namespace's, as if absent
