"""Compilation of a snapshot into the outbound table and per-identity inbound config, and the wire
format's round trip."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml

from sidemesh.mesh import wire
from sidemesh.mesh.compile import (
    OutboundTable,
    compile_inbound,
    compile_outbound,
    compile_sidecar,
    for_node,
    identities,
    sidecar_view,
)
from sidemesh.mesh.resources import (
    EndpointAddress,
    Service,
    ServiceEndpoints,
    Snapshot,
    Workload,
    build_snapshot,
)
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


def with_endpoints(*endpoints: EndpointAddress, workloads: tuple[Workload, ...] | None = None) -> Snapshot:
    snap = snapshot()
    return dataclasses.replace(
        snap,
        workloads=snap.workloads if workloads is None else workloads,
        endpoints=(ServiceEndpoints("shop", "cart", endpoints),),
    )


def test_a_pod_is_reached_by_address_on_the_ports_its_services_give_it() -> None:
    """Declaring containerPort is optional: a headless Service's DNS (a StatefulSet's peers, gRPC
    client-side balancing) sends the app to podIP:targetPort, which had no destination and went
    out in plaintext (refused by the meshed pod in strict mode). Istio derives these from the
    endpoints too."""
    snap = snapshot()
    bare = tuple(dataclasses.replace(w, ports=()) for w in snap.workloads)  # no containerPort
    table = compile_outbound(
        with_endpoints(EndpointAddress("10.0.0.2", "web", 5432, "shop/cart-1"), workloads=bare),
        "cluster.local",
    )
    direct = table._by_address[("10.0.0.2", 5432)]
    assert direct.name == "pod shop/cart-1:5432"
    assert [(e.workload, str(e.identity)) for e in direct.endpoints] == [
        ("shop/cart-1", "spiffe://cluster.local/ns/shop/sa/cart")
    ]


def test_an_endpoint_whose_pod_is_not_known_yet_is_left_out() -> None:
    """The Pod and EndpointSlice watches are not ordered: a new pod can be in a slice before its
    Pod event. Its endpoint had no identity, so it was reached in plaintext (refused in strict
    mode); until its pod is known it is not used. Endpoints of no pod (a Node) stay plain."""
    table = compile_outbound(
        with_endpoints(
            EndpointAddress("10.0.0.2", "web", 8080, "shop/cart-1"),
            EndpointAddress("10.0.0.7", "web", 8080, "shop/cart-new"),
            EndpointAddress("10.0.0.8", "web", 8080, None),
        ),
        "cluster.local",
    )
    cart = table._by_name["cart.shop:80"]
    assert [(e.address, e.identity is None) for e in cart.endpoints] == [
        ("10.0.0.2", False),
        ("10.0.0.8", True),
    ]


def test_terminating_endpoints_serve_only_when_none_is_ready() -> None:
    """kube-proxy's ProxyTerminatingEndpoints: a one-replica rollout with a long preStop has only a
    terminating (still serving) endpoint for a while; it had none, and connections failed."""
    old = EndpointAddress("10.0.0.2", "web", 8080, "shop/cart-1", ready=False)
    new = EndpointAddress("10.0.0.3", "web", 8080, "shop/cart-2")
    only_old = compile_outbound(with_endpoints(old), "cluster.local")._by_name["cart.shop:80"]
    assert [e.address for e in only_old.endpoints] == ["10.0.0.2"]
    both = compile_outbound(with_endpoints(old, new), "cluster.local")._by_name["cart.shop:80"]
    assert [e.address for e in both.endpoints] == ["10.0.0.3"]


def test_a_dual_stack_pod_is_reached_and_enforced_at_both_addresses() -> None:
    snap = snapshot()
    dual = tuple(
        dataclasses.replace(w, other_addresses=("fd00::2",)) if w.ref == "shop/cart-1" else w
        for w in snap.workloads
    )
    snap = dataclasses.replace(snap, workloads=dual)
    table = compile_outbound(snap, "cluster.local")
    assert table._by_address[("fd00::2", 8080)] is not None
    assert table._by_address[("fd00::2", 8080)].endpoints[0].address == "fd00::2"
    # Each address is a destination of its own, found by its name too (the sidecar looks a
    # destination up by name for every request: one name for both sent IPv4 calls to IPv6).
    for address in ("10.0.0.2", "fd00::2"):
        dest = table._by_address[(address, 8080)]
        assert table._by_name[dest.name] is dest and [e.address for e in dest.endpoints] == [address]
    inbound = compile_inbound(snap, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy.DENY)
    assert next(w for w in inbound.workloads if w.ref == "shop/cart-1").addresses == ("10.0.0.2", "fd00::2")


def test_inbound_per_identity_with_defaults_from_annotations() -> None:
    snap = snapshot()
    assert identities(snap) == {WorkloadId("shop", "cart")}  # the unmeshed workload has no sidecar
    inbound = compile_inbound(
        snap, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy.ALLOW_AUTHENTICATED
    )
    by_ref = {w.ref: w for w in inbound.workloads}
    # shop/broken cannot be read: it stands in allowing nothing to what it selects (no selector:
    # every workload of shop), never falling back to the default (fail closed).
    assert by_ref["shop/cart-1"].policies == ("shop/broken", "shop/stable-only")
    assert by_ref["shop/cart-2"].policies == ("shop/broken",)
    assert by_ref["shop/cart-1"].default_policy is DefaultPolicy.DENY  # namespace annotation
    assert by_ref["shop/cart-2"].default_policy is DefaultPolicy.ALLOW_ALL  # pod annotation wins
    assert [(p.ref, len(p.rules), bool(p.invalid)) for p in inbound.policies] == [
        ("shop/broken", 0, True),
        ("shop/stable-only", 1, False),
    ]
    canary = compile_sidecar(snap, "shop/cart-2", "cluster.local", DefaultPolicy.DENY)
    assert [p.ref for p in canary.policies] == [
        "shop/broken"
    ] and canary.default_policy is DefaultPolicy.ALLOW_ALL


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
    assert [p.invalid for p in back_in.policies] == [p.invalid for p in inbound.policies] != ["", ""]
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


def _dual_stack_cart() -> tuple[Service, ...]:
    """Service shop/cart with an IPv4 and an IPv6 ClusterIP (IPv4 primary), selecting app=cart."""
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
    return build_snapshot([("svc", doc)]).services


def test_dual_stack_services_are_reached_at_each_cluster_ip() -> None:
    snap = snapshot()
    services = _dual_stack_cart()
    table = compile_outbound(Snapshot(services, snap.workloads), "cluster.local")
    v4, v6 = table._by_address[("10.96.0.10", 80)], table._by_address[("fd00::a", 80)]
    # Single-stack pods: both ClusterIPs lead to their IPv4 addresses.
    assert (
        [e.address for e in v4.endpoints]
        == [e.address for e in v6.endpoints]
        == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    )
    assert table._by_name["cart.shop.svc:80"] is v4

    # Dual-stack pods: each ClusterIP leads to the endpoints of its own family (as kube-proxy: the
    # callee's sidecar delivers to the address the caller's sidecar dialled, and an app listening
    # on 0.0.0.0 only is not reached at its IPv6 address), primary family first.
    dual = tuple(
        dataclasses.replace(w, other_addresses=(f"fd00::{i + 2}",)) for i, w in enumerate(snap.workloads)
    )
    table = compile_outbound(Snapshot(services, dual), "cluster.local")
    v4, v6 = table._by_address[("10.96.0.10", 80)], table._by_address[("fd00::a", 80)]
    assert [e.address for e in v4.endpoints] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert [e.address for e in v6.endpoints] == ["fd00::2", "fd00::3", "fd00::4"]
    assert (v4.name, v6.name) == ("cart.shop:80", "cart.shop:80 (IPv6)")
    assert table._by_name["cart.shop:80"] is v4 and table._by_name["cart.shop:80 (IPv6)"] is v6
    # So do EndpointSlices of both families (a cluster's dual-stack Service).
    slices = (
        EndpointAddress("10.0.0.2", "", 8080, "shop/cart-1"),
        EndpointAddress("fd00::2", "", 8080, "shop/cart-1"),
    )
    table = compile_outbound(
        Snapshot(services, dual, endpoints=(ServiceEndpoints("shop", "cart", slices),)), "cluster.local"
    )
    assert [e.address for e in table._by_address[("fd00::a", 80)].endpoints] == ["fd00::2"]
    assert [e.address for e in table._by_address[("10.96.0.10", 80)].endpoints] == ["10.0.0.2"]


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
    assert inbound.workloads[0].default_policy is DefaultPolicy.DENY  # fail closed
    in_open_namespace = compile_inbound(
        Snapshot(snap.services, (odd,), ()),
        WorkloadId("shop", "cart"),
        "cluster.local",
        DefaultPolicy.ALLOW_ALL,
    )
    assert in_open_namespace.workloads[0].default_policy is DefaultPolicy.DENY  # not the mesh's allow-all


DELIVERY_DOCS = textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata:
      name: cart
      namespace: shop
      annotations:
        sidemesh.io/timeout: 2s
        sidemesh.io/retries: "3"
        sidemesh.io/retry-non-idempotent: "true"
        sidemesh.io/opaque-ports: "9000"
    spec:
      clusterIP: 10.96.0.10
      selector: {app: cart}
      ports: [{port: 80, targetPort: 8080, name: web}, {port: 9000, targetPort: 8080, name: raw}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: db, namespace: shop, annotations: {sidemesh.io/retries: lots}}
    spec:
      clusterIP: 10.96.0.11
      selector: {app: db}
      ports: [{port: 5432}, {port: 8080}]
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: cart-1, namespace: shop, labels: {app: cart}, annotations: {sidemesh.io/opaque-ports: "8080"}}
    spec: {serviceAccount: cart, address: 10.0.0.2, ports: [{port: 8080}, {port: 5432}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: db-1, namespace: shop, labels: {app: db}, annotations: {sidemesh.io/opaque-ports: "a,b"}}
    spec: {serviceAccount: db, address: 10.0.0.5, ports: [{port: 5432}, {port: 8080}]}
    """)


def delivery_snapshot() -> Snapshot:
    return build_snapshot([(f"doc{i}", d) for i, d in enumerate(yaml.safe_load_all(DELIVERY_DOCS))])


def test_service_annotations_reach_its_destinations() -> None:
    snap = delivery_snapshot()
    table = compile_outbound(snap, "cluster.local")
    web, raw = table._by_name["cart.shop:80"], table._by_name["cart.shop:9000"]
    assert (web.timeout_s, web.retries, web.retry_non_idempotent, web.opaque) == (2.0, 3, True, False)
    assert (raw.timeout_s, raw.retries, raw.opaque) == (2.0, 3, True)  # the annotation lists 9000
    db, db_http = table._by_name["db.shop:5432"], table._by_name["db.shop:8080"]
    assert (db.retries, db.opaque, db_http.opaque) == (0, True, False)  # the default list: 5432
    # Pods addressed directly: their own annotation, or the default list when it is invalid.
    assert table._by_address[("10.0.0.2", 8080)].opaque
    assert not table._by_address[("10.0.0.2", 5432)].opaque  # the annotation replaces the defaults
    assert table._by_address[("10.0.0.5", 5432)].opaque
    assert sorted(e.split(": ", 1)[1] for e in snap.errors) == [
        "Service shop/db: annotation sidemesh.io/retries: 'lots' is not a number of retries from 0 to 10; "
        "annotation ignored",
        "Workload shop/db-1: annotation sidemesh.io/opaque-ports: 'a' is not a port number "
        "(1-65535; ranges are not supported); annotation ignored",
    ]
    assert [s.name for s in snap.services] == ["cart", "db"]  # nothing dropped


def test_inbound_opaque_ports_reach_the_sidecar_view() -> None:
    snap = delivery_snapshot()
    cart = compile_sidecar(snap, "shop/cart-1", "cluster.local", DefaultPolicy.DENY)
    assert cart.opaque_ports == frozenset({8080})
    db = compile_sidecar(snap, "shop/db-1", "cluster.local", DefaultPolicy.DENY)
    assert db.opaque_ports == frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})


def test_delivery_changes_change_the_hash() -> None:
    import dataclasses

    snap = delivery_snapshot()
    before = compile_outbound(snap, "cluster.local")
    cart = snap.services[0]
    slower = dataclasses.replace(cart, delivery=dataclasses.replace(cart.delivery, timeout_s=5.0))
    after = compile_outbound(Snapshot((slower, *snap.services[1:]), snap.workloads), "cluster.local")
    assert after.hash != before.hash


def test_wire_round_trip_of_delivery_settings() -> None:
    snap = delivery_snapshot()
    outbound = compile_outbound(snap, "cluster.local")
    back = wire.outbound_from_pb(wire.outbound_to_pb(outbound))
    assert back.destinations == outbound.destinations
    assert back._by_name["cart.shop:80"].timeout_s == 2.0 and back._by_name["db.shop:8080"].timeout_s is None
    inbound = compile_inbound(snap, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy.DENY)
    assert wire.inbound_from_pb(wire.inbound_to_pb(inbound)).workloads[0].opaque_ports == (8080,)


def test_wire_rejects_impossible_delivery_settings() -> None:
    import pytest

    from sidemesh.api import config_pb2 as pb

    for bad in (pb.Destination(name="x", retries=11), pb.Destination(name="x", timeout_seconds=-1.0)):
        with pytest.raises(wire.WireError, match="x: "):
            wire.outbound_from_pb(pb.Outbound(destinations=[bad]))


def test_a_file_that_stops_being_yaml_keeps_its_last_good_contents(tmp_path: Path) -> None:
    """Local mode and the directory source: a policy file saved half-written (or broken) is not
    YAML; dropping it dropped its ServiceAuthorization, and the workload fell back to the default
    (allow-authenticated: every caller). Its last good documents stay, as a failed `kubectl apply`
    leaves the stored object; the error says so."""
    from sidemesh.mesh.directory import Reader

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\n"
        "metadata: {name: cart-only-frontend, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: cart}}, rules: [{from: [{serviceAccount: frontend}]}]}\n"
    )
    reader = Reader(tmp_path)
    assert [p.name for p in reader.load().policies] == ["cart-only-frontend"]
    policy.write_text(
        policy.read_text().replace("[{serviceAccount: frontend}]", "[{serviceAccount: frontend}")
    )
    snapshot = reader.load()
    assert [p.name for p in snapshot.policies] == ["cart-only-frontend"]
    assert len(snapshot.errors) == 1 and "its last good contents stay in force" in snapshot.errors[0]
    fresh = Reader(tmp_path).load()  # a process started on the broken file has nothing to keep
    assert fresh.policies == () and "cannot read" in fresh.errors[0]


def test_a_port_annotation_in_other_digits_does_not_stop_the_compile() -> None:
    """`sidemesh.io/exclude-inbound-ports: "²"`: "²".isdigit() is true and int() refuses it; the
    ValueError stopped the controller's compile, and with it every later version of the mesh."""
    snap = snapshot()
    odd = dataclasses.replace(
        snap.workloads[0], annotations=(("sidemesh.io/exclude-inbound-ports", "²,8080"),)
    )
    table = compile_outbound(
        Snapshot(snap.services, (odd, *snap.workloads[1:]), snap.namespaces, snap.policies), "cluster.local"
    )
    endpoints = {e.workload: e for e in table._by_name["cart.shop:80"].endpoints}
    assert endpoints["shop/cart-1"].identity is None  # 8080 still excluded; "²" ignored


def test_a_local_mode_workload_is_dual_stack_with_addresses() -> None:
    """A Workload's `addresses` are a Pod's podIPs: one or two, one of each family, primary first."""

    def parse(spec: str) -> Snapshot:
        doc = f"""
            apiVersion: sidemesh.io/v1alpha1
            kind: Workload
            metadata: {{name: cart-1, namespace: shop}}
            spec: {spec}
        """
        return build_snapshot([("w.yaml", yaml.safe_load(textwrap.dedent(doc)))])

    dual = parse('{addresses: [10.0.0.2, "fd00::2"]}').workloads[0]
    assert (dual.address, dual.other_addresses) == ("10.0.0.2", ("fd00::2",))
    assert parse('{address: "fd00::2", addresses: ["fd00::2", 10.0.0.2]}').workloads[0].addresses == (
        "fd00::2",
        "10.0.0.2",
    )
    assert parse("{address: 10.0.0.2}").workloads[0].addresses == ("10.0.0.2",)
    for spec, says in (
        ("{addresses: [10.0.0.2, 10.0.0.3]}", "at most one IPv4 and one IPv6"),
        ('{addresses: [10.0.0.2, "fd00::2", "fd00::3"]}', "one or two addresses"),
        ("{addresses: []}", "one or two addresses"),
        ('{addresses: [10.0.0.2, "fd00::x"]}', "spec.addresses[1]: 'fd00::x' is not an IP address"),
        ('{address: 10.0.0.9, addresses: [10.0.0.2, "fd00::2"]}', "must be the first of spec.addresses"),
        ("{addresses: 10.0.0.2}", "spec.addresses must be a list"),
    ):
        snap = parse(spec)
        assert not snap.workloads and len(snap.errors) == 1 and says in snap.errors[0], (spec, snap.errors)


def test_terminating_endpoints_are_the_fallback_per_family() -> None:
    """kube-proxy's proxier for each family sees only that family's slices: an IPv4 endpoint still
    serving while it terminates is the IPv4 ClusterIP's, even when the IPv6 slice has a ready one
    (the fallback was decided over both families first, and IPv4 callers went to IPv6 addresses)."""
    snap = snapshot()
    services = _dual_stack_cart()
    slices = (
        EndpointAddress("10.0.0.2", "", 8080, "shop/cart-1", ready=False),  # terminating, serving
        EndpointAddress("fd00::3", "", 8080, "shop/cart-2"),
    )
    table = compile_outbound(
        Snapshot(services, snap.workloads, endpoints=(ServiceEndpoints("shop", "cart", slices),)),
        "cluster.local",
    )
    assert [e.address for e in table._by_address[("10.96.0.10", 80)].endpoints] == ["10.0.0.2"]
    assert [e.address for e in table._by_address[("fd00::a", 80)].endpoints] == ["fd00::3"]
    # An address no parser takes does not stop the compile (it is left out at the conversion).
    odd = (EndpointAddress("10.1.2.03", "", 8080, "shop/cart-1"),)
    compile_outbound(
        Snapshot(services, snap.workloads, endpoints=(ServiceEndpoints("shop", "cart", odd),)),
        "cluster.local",
    )


NODE_LOCAL_DOCS = textwrap.dedent("""\
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: agent-a, namespace: mon, labels: {app: agent}}
    spec: {serviceAccount: agent, address: 10.1.0.5, node: node-a, ports: [{port: 8126}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: agent-b, namespace: mon, labels: {app: agent}}
    spec: {serviceAccount: agent, address: 10.2.0.5, node: node-b, ports: [{port: 8126}]}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: app-a, namespace: mon, labels: {app: app}}
    spec: {serviceAccount: app, address: 10.1.0.9, node: node-a}
    ---
    apiVersion: sidemesh.io/v1alpha1
    kind: Workload
    metadata: {name: app-c, namespace: mon, labels: {app: app}}
    spec: {serviceAccount: app, address: 10.3.0.9, node: node-c}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: agent, namespace: mon}
    spec: {clusterIP: 10.96.0.50, internalTrafficPolicy: Local, selector: {app: agent}, ports: [{port: 8126}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: agent-all, namespace: mon}
    spec: {clusterIP: 10.96.0.51, selector: {app: agent}, ports: [{port: 8126}]}
    """)


def snapshot_of(text: str) -> Snapshot:
    """The snapshot of a directory holding ``text`` (YAML documents, indented as written)."""
    docs = yaml.safe_load_all(textwrap.dedent(text))
    return build_snapshot([(f"doc{i}", d) for i, d in enumerate(docs) if d])


def _node_local_snapshot() -> Snapshot:
    return build_snapshot([(f"doc{i}", d) for i, d in enumerate(yaml.safe_load_all(NODE_LOCAL_DOCS))])


def _view_of(snap: Snapshot, workload: str, through_wire: bool = False) -> dict[str, list[str]]:
    inbound = compile_inbound(snap, WorkloadId("mon", "app"), "cluster.local", DefaultPolicy.DENY)
    outbound = compile_outbound(snap, "cluster.local")
    if through_wire:  # (the controller's stream)
        inbound = wire.inbound_from_pb(wire.inbound_to_pb(inbound))
        outbound = wire.outbound_from_pb(wire.outbound_to_pb(outbound))
    view = sidecar_view(inbound, outbound, workload, "v")
    return {
        name: [e.address for e in view.lookup_name(name).endpoints]  # type: ignore[union-attr]
        for name in ("agent.mon:8126", "agent-all.mon:8126")
    }


def test_a_node_local_service_reaches_only_the_callers_node() -> None:
    """internalTrafficPolicy: Local (per-node agents: metrics, logs, a DNS cache): the sidecar
    dialled a pod IP itself, so kube-proxy's rule never applied and a caller on node-a reached
    node-b's agent. Now each sidecar keeps its node's endpoints, and none when its node has none
    (kube-proxy does not fall back to other nodes); a Cluster Service beside it reaches all."""
    snap = _node_local_snapshot()
    for through_wire in (False, True):
        assert _view_of(snap, "mon/app-a", through_wire) == {
            "agent.mon:8126": ["10.1.0.5"],
            "agent-all.mon:8126": ["10.1.0.5", "10.2.0.5"],
        }
        assert _view_of(snap, "mon/app-c", through_wire) == {
            "agent.mon:8126": [],
            "agent-all.mon:8126": ["10.1.0.5", "10.2.0.5"],
        }
    table = compile_outbound(snap, "cluster.local")
    assert for_node(table, "") is table  # node not known: every endpoint, as before
    assert compile_outbound(dataclasses.replace(snap, services=()), "cluster.local") == for_node(
        compile_outbound(dataclasses.replace(snap, services=()), "cluster.local"), "node-a"
    )


def test_node_local_endpoints_from_slices_and_the_terminating_fallback_per_node() -> None:
    """With EndpointSlices, the endpoint's nodeName; a node whose agent terminates (and still
    serves) keeps it while the other node has a ready one, as kube-proxy chooses per node."""
    snap = _node_local_snapshot()
    slices = (
        ServiceEndpoints(
            "mon",
            "agent",
            (
                EndpointAddress("10.1.0.5", "", 8126, "mon/agent-a", ready=False, node="node-a"),
                EndpointAddress("10.2.0.5", "", 8126, "mon/agent-b", node="node-b"),
            ),
        ),
    )
    snap = dataclasses.replace(snap, endpoints=slices)
    assert _view_of(snap, "mon/app-a")["agent.mon:8126"] == ["10.1.0.5"]
    plain = compile_outbound(snap, "cluster.local")._by_name.get("agent.mon:8126")
    assert (
        plain is not None and plain.node_local and {e.node for e in plain.endpoints} == {"node-a", "node-b"}
    )


def test_the_node_of_an_endpoint_is_in_the_tables_hash() -> None:
    snap = _node_local_snapshot()
    moved = dataclasses.replace(
        snap,
        workloads=tuple(
            dataclasses.replace(w, node="node-c") if w.name == "agent-a" else w for w in snap.workloads
        ),
    )
    assert compile_outbound(snap, "cluster.local").hash != compile_outbound(moved, "cluster.local").hash


def test_an_unknown_internal_traffic_policy_is_an_error() -> None:
    doc = yaml.safe_load(NODE_LOCAL_DOCS.split("---")[4])
    doc["spec"]["internalTrafficPolicy"] = "Nearby"
    snap = build_snapshot([("svc", doc)])
    assert snap.services == () and "internalTrafficPolicy 'Nearby' is not Cluster or Local" in snap.errors[0]


def test_a_headless_service_is_never_node_local() -> None:
    """kube-proxy does not handle headless Services (DNS gives every pod, whatever the policy):
    reached by name, one with internalTrafficPolicy Local kept only the caller's node's pods."""
    snap = _node_local_snapshot()
    headless = tuple(
        dataclasses.replace(s, cluster_ip=None, cluster_ips=()) if s.name == "agent" else s
        for s in snap.services
    )
    view = _view_of(dataclasses.replace(snap, services=headless), "mon/app-c")
    assert view["agent.mon:8126"] == ["10.1.0.5", "10.2.0.5"]


def _headless_db(pod_ports: str, service_ports: str) -> OutboundTable:
    """A pod behind a headless Service declaring 9000 opaque, not ready (its EndpointSlice lists
    no endpoint for it: a replica catching up), compiled."""
    docs = yaml.safe_load_all(
        "apiVersion: sidemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: db-0, namespace: shop, labels: {app: db}}\n"
        f"spec: {{serviceAccount: db, address: 10.0.0.7, ports: {pod_ports}}}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop, annotations: {sidemesh.io/opaque-ports: '9000'}}\n"
        f"spec: {{selector: {{app: db}}, clusterIP: None, ports: {service_ports}}}\n"
    )
    snapshot = build_snapshot([(f"d{i}", d) for i, d in enumerate(docs)])
    return compile_outbound(
        dataclasses.replace(snapshot, endpoints=(ServiceEndpoints("shop", "db", ()),)), "cluster.local"
    )


def test_a_port_a_service_declares_opaque_is_opaque_addressed_directly_too() -> None:
    """A headless Service's DNS answers with pod IPs: its callers looked up the pod destination,
    which knew only the pod's own annotation, and detected (a server-speaks-first protocol
    waited for the detection timeout)."""
    table = _headless_db("[{port: 9000}, {port: 8080}]", "[{name: a, port: 9000}, {name: b, port: 8080}]")
    direct = table._by_address[("10.0.0.7", 9000)]
    assert direct is not None and direct.name == "pod shop/db-0:9000" and direct.opaque
    assert not table._by_address[("10.0.0.7", 8080)].opaque
    # The port not declared as a containerPort (it is optional): no destination at all was made
    # for it (the caller sent it out as plain passthrough).
    undeclared = _headless_db("[]", "[{name: a, port: 9000}]")._by_address.get(("10.0.0.7", 9000))
    assert undeclared is not None and undeclared.opaque


POLICY_DOC = """\
apiVersion: sidemesh.io/v1alpha1
kind: {kind}
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  rules:
  - from: [{{serviceAccount: {caller}}}]
"""


def _policy(
    kind: str = "ServiceAuthorization", name: str = "p", app: str = "cart", caller: str = "frontend"
) -> object:
    return yaml.safe_load(POLICY_DOC.format(kind=kind, name=name, app=app, caller=caller))


def test_a_directory_policy_without_a_readable_name_fails_closed() -> None:
    """A name that is no string (a YAML int) or none at all: the policy vanished and its workloads
    fell back to the default, while the warning said it allowed nothing until fixed."""
    snap = build_snapshot(
        [
            ("pol.yaml#0", _policy(name="2024")),
            ("pol.yaml#1", {**_policy(), "metadata": {"namespace": "shop"}}),
        ]
    )
    assert [(p.name, p.invalid != "", p.rules) for p in snap.policies] == [
        ("pol.yaml#0", True, ()),
        ("pol.yaml#1", True, ()),
    ]
    assert all(p.selector == (("app", "cart"),) for p in snap.policies)


def test_a_misspelt_kind_of_ours_is_reported() -> None:
    snap = build_snapshot(
        [
            ("pol.yaml#0", _policy(kind="ServiceAuthorisation")),
            ("x#0", {"apiVersion": "v1", "kind": "ConfigMap"}),
        ]
    )
    assert snap.policies == ()
    assert snap.errors == (
        "pol.yaml#0: kind 'ServiceAuthorisation' of sidemesh.io/v1alpha1 is not one Sidemesh reads "
        "(Workload, ServiceAuthorization): ignored",
    )


def test_a_policy_defined_twice_is_the_last_one_whole() -> None:
    """Two documents of one name were both kept, one's selector enforced with the other's rules."""
    snap = build_snapshot(
        [("a.yaml#0", _policy(app="cart")), ("b.yaml#0", _policy(app="pay", caller="checkout"))]
    )
    assert [(p.selector, p.rules[0].sources[0].service_account) for p in snap.policies] == [
        ((("app", "pay"),), "checkout")
    ]
    assert snap.errors == (
        "ServiceAuthorization shop/p is defined 2 times: the last valid one is used (an invalid copy "
        "allows nothing to the workloads it selects)",
    )


def test_an_invalid_later_copy_of_a_policy_replaces_nothing() -> None:
    """A later copy the API server would refuse (a typo) replaced the valid one, and the workloads
    only the valid one selected fell to the default policy (fail open). The valid one stays; the
    invalid copy's stand-in stays too, under a name of its own, allowing nothing."""
    broken = _policy(app="ledger")
    broken["spec"]["rules"][0]["from"][0] = {"serviceAcount": "web"}  # type: ignore[index]
    snap = build_snapshot([("a.yaml#0", _policy(app="payments", caller="checkout")), ("b.yaml#0", broken)])
    assert [(p.name, p.selector, bool(p.invalid)) for p in snap.policies] == [
        ("p", (("app", "payments"),), False),
        ("p (invalid copy 1)", (("app", "ledger"),), True),
    ]


def test_session_affinity_client_ip_reaches_the_sidecars_through_the_wire_and_the_node_view() -> None:
    """spec.sessionAffinity: ClientIP was read by no one: the sidecar balanced a sticky Service's
    connections over every endpoint (proxy/balance.py keeps each caller on one now)."""
    docs = list(yaml.safe_load_all(NODE_LOCAL_DOCS))
    sticky = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "agent-all")
    sticky["spec"]["sessionAffinity"] = "ClientIP"
    local = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "agent")
    local["spec"]["sessionAffinity"] = "ClientIP"
    snap = build_snapshot([(f"doc{i}", d) for i, d in enumerate(docs)])
    assert snap.errors == ()
    table = compile_outbound(snap, "cluster.local")
    back = wire.outbound_from_pb(wire.outbound_to_pb(table))
    for t in (table, back, for_node(back, "node-a")):
        assert t._by_name["agent-all.mon:8126"].client_ip_affinity
        assert t._by_name["agent.mon:8126"].client_ip_affinity
    plain = compile_outbound(_node_local_snapshot(), "cluster.local")
    assert not plain._by_name["agent-all.mon:8126"].client_ip_affinity and plain.hash != table.hash
    sticky["spec"]["sessionAffinity"] = "Cookie"
    snap = build_snapshot([(f"doc{i}", d) for i, d in enumerate(docs)])
    assert any("sessionAffinity 'Cookie' is not None or ClientIP" in e for e in snap.errors), snap.errors


def test_a_port_that_says_its_protocol_is_not_http_is_opaque() -> None:
    """Kubernetes' appProtocol and Istio's port names (`tcp-mysql`) say a port is no HTTP: it was
    detected anyway, so a server-speaks-first protocol there (MySQL, NATS) waited out the detection
    timeout on each side. The default server-speaks-first list now also reads the target port
    (a Service on 3307 in front of MySQL's 3306)."""
    snap = snapshot_of("""\
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: db-1, namespace: shop, labels: {app: db}}
        spec: {serviceAccount: db, address: 10.1.0.9, ports: [{port: 3306}, {port: 4222}, {port: 8080}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: db, namespace: shop}
        spec:
          clusterIP: 10.96.0.9
          selector: {app: db}
          ports:
          - {name: tcp-mysql, port: 3307, targetPort: 3306}
          - {name: nats, port: 4222, appProtocol: tcp}
          - {name: http-web, port: 80, targetPort: 8080, appProtocol: http}
          - {name: mysql-again, port: 13306, targetPort: 3306, appProtocol: kubernetes.io/h2c}
                """)
    assert snap.errors == ()
    table = compile_outbound(snap, "cluster.local")
    opaque = {name: table._by_name[name].opaque for name in ("db.shop:3307", "db.shop:4222", "db.shop:80")}
    assert opaque == {"db.shop:3307": True, "db.shop:4222": True, "db.shop:80": False}
    assert not table._by_name["db.shop:13306"].opaque  # (appProtocol says HTTP/2: it wins)
    inbound = compile_inbound(snap, WorkloadId("shop", "db"), "cluster.local", DefaultPolicy.DENY)
    view = sidecar_view(inbound, table, "shop/db-1", "v")
    assert 4222 in view.service_opaque_ports and 8080 not in view.service_opaque_ports


def test_a_services_external_and_load_balancer_ips_reach_its_endpoints_over_the_mesh() -> None:
    """kube-proxy sends a pod's connection to a Service's externalIPs or its load balancer's IP
    straight to the endpoints. The sidecar knew the ClusterIP only: such a connection went out as
    plaintext, and a strict callee refused it once meshed."""
    snap = snapshot_of("""\
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: db-1, namespace: shop, labels: {app: db}}
        spec: {serviceAccount: db, address: 10.1.0.9, ports: [{port: 8080}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: db, namespace: shop}
        spec:
          clusterIP: 10.96.0.9
          externalIPs: [203.0.113.7]
          selector: {app: db}
          ports: [{port: 80, targetPort: 8080}]
        status:
          loadBalancer:
            ingress: [{ip: 198.51.100.9}, {hostname: lb.example.com}, {ip: 198.51.100.10, ipMode: Proxy}]
                """)
    assert snap.errors == ()
    table = compile_outbound(snap, "cluster.local")
    db = table._by_name["db.shop:80"]
    assert set(db.addresses) == {("10.96.0.9", 80), ("203.0.113.7", 80), ("198.51.100.9", 80)}
    for address in db.addresses:
        assert table._by_address[address] is db
    assert ("198.51.100.10", 80) not in table._by_address  # (ipMode Proxy: a proxy is in between)


def test_a_pod_not_ready_yet_is_reached_over_the_mesh_on_the_ports_its_services_target() -> None:
    """StatefulSet peers dial each other by pod address before they are ready (a cluster forming:
    readiness waits on it), on ports the pods need not declare. Only ready endpoints were pod
    destinations: the not-ready peer's connection went out as plaintext and its strict sidecar
    refused it."""
    snap = snapshot_of("""\
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: etcd-0, namespace: db, labels: {app: etcd}}
        spec: {serviceAccount: etcd, address: 10.1.0.5}
        ---
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: etcd-1, namespace: db, labels: {app: etcd}}
        spec: {serviceAccount: etcd, address: 10.1.0.6}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: etcd, namespace: db}
        spec: {clusterIP: None, selector: {app: etcd}, ports: [{name: peer, port: 2380}]}
                """)
    ready = (EndpointAddress("10.1.0.5", "peer", 2380, "db/etcd-0"),)  # etcd-1 is not ready yet
    snap = dataclasses.replace(snap, endpoints=(ServiceEndpoints("db", "etcd", ready),))
    table = compile_outbound(snap, "cluster.local")
    for address, pod in (("10.1.0.5", "etcd-0"), ("10.1.0.6", "etcd-1")):
        d = table._by_address[(address, 2380)]
        assert d.name == f"pod db/{pod}:2380" and str(d.endpoints[0].identity).endswith("/ns/db/sa/etcd")
    assert [e.address for e in table._by_name["etcd.db:2380"].endpoints] == [
        "10.1.0.5"
    ]  # (the Service: ready ones)


def test_an_external_ip_cannot_take_a_pods_or_another_services_traffic() -> None:
    """Anyone who may write a Service set externalIPs to a pod's address or another Service's
    ClusterIP and took that traffic, over mTLS to an identity of their choosing (CVE-2020-8554's
    pattern); two Services claiming one address and port: one won silently. Such addresses are
    left out; an address that cannot be read leaves the Service as it was, with a warning."""
    snap = snapshot_of("""\
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: ledger-0, namespace: bank, labels: {app: ledger}}
        spec: {serviceAccount: ledger, address: 10.244.1.7, ports: [{port: 8080}]}
        ---
        apiVersion: sidemesh.io/v1alpha1
        kind: Workload
        metadata: {name: thief-0, namespace: evil, labels: {app: thief}}
        spec: {serviceAccount: thief, address: 10.244.9.9, ports: [{port: 8080}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: ledger, namespace: bank}
        spec: {clusterIP: 10.96.0.50, selector: {app: ledger}, ports: [{port: 8080}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: grab, namespace: evil}
        spec:
          clusterIP: 10.96.0.66
          externalIPs: [10.244.1.7, 10.96.0.50, 203.0.113.5, 203.0.113.6, 010.1.2.3]
          selector: {app: thief}
          ports: [{port: 8080}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: other, namespace: evil}
        spec: {clusterIP: 10.96.0.67, externalIPs: [203.0.113.6], selector: {app: thief}, ports: [{port: 8080}]}
                """)
    assert any("010.1.2.3" in e and "left out" in e for e in snap.errors), snap.errors
    table = compile_outbound(snap, "cluster.local")
    assert table._by_address[("10.244.1.7", 8080)].name == "pod bank/ledger-0:8080"
    assert table._by_address[("10.96.0.50", 8080)].name == "ledger.bank:8080"
    assert table._by_address[("203.0.113.5", 8080)].name == "grab.evil:8080"  # (its own: kept)
    assert ("203.0.113.6", 8080) not in table._by_address  # (claimed twice: nobody's)


def test_what_a_ports_name_or_app_protocol_says_as_istio_reads_it() -> None:
    from sidemesh.mesh.resources import parse_service

    def opaque(**port: Any) -> bool:
        doc = {
            "kind": "Service",
            "metadata": {"name": "s", "namespace": "n"},
            "spec": {"ports": [{"port": 4444, **port}]},
        }
        return port.get("port", 4444) in parse_service(doc).delivery.opaque_ports

    assert opaque() and opaque(name="db")  # the default list: 4444 (Galera)
    assert not opaque(name="http") and not opaque(name="grpc-web") and not opaque(appProtocol="HTTP")
    assert not opaque(name="tcp", appProtocol="kubernetes.io/h2c")  # (appProtocol first)
    assert opaque(name="http", appProtocol="tcp") and opaque(name="mysql-primary", port=3307, targetPort=4444)
    assert not opaque(appProtocol="http", targetPort=4444)
    # A protocol Istio does not know says nothing: the default list decides
    assert opaque(appProtocol="postgresql") and not opaque(
        appProtocol="postgresql", port=4445, targetPort=5000
    )
