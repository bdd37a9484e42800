"""Outbound deltas: what the controller sends a stream instead of the whole table, and how a
sidecar applies one (sidemesh/mesh/compile.py, controller/state.py)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from controller.state import MeshState
from sidemesh.api import config_pb2 as pb
from sidemesh.mesh import wire
from sidemesh.mesh.compile import (
    CompileError,
    OutboundTable,
    apply_outbound_delta,
    chain_deltas,
    compile_outbound,
    outbound_delta,
)
from sidemesh.mesh.resources import Snapshot, build_snapshot
from sidemesh.policy.model import DefaultPolicy
from sidemesh.spiffe import WorkloadId


def cluster(pods: dict[int, str], services: dict[str, tuple[str, int]]) -> Snapshot:
    """Pods by number (value: their app label) and Services (name -> (app selected, port))."""
    docs: list[dict[str, Any]] = []
    for n, app in pods.items():
        docs.append(
            {
                "apiVersion": "sidemesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": f"{app}-{n}", "namespace": "shop", "labels": {"app": app}},
                "spec": {
                    "serviceAccount": app,
                    "address": f"10.0.{n // 250}.{n % 250 + 1}",
                    "ports": [{"port": 8080}],
                },
            }
        )
    for i, (name, (app, port)) in enumerate(sorted(services.items())):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                    "selector": {"app": app},
                    "ports": [{"port": port, "targetPort": 8080}],
                },
            }
        )
    snap = build_snapshot([(f"doc{i}", d) for i, d in enumerate(docs)])
    assert not snap.errors, snap.errors
    return snap


def random_cluster(rng: random.Random, pods: dict[int, str], services: dict[str, tuple[str, int]]) -> None:
    """Change the cluster a little, as a rollout or an edit does (in place)."""
    apps = ["cart", "web", "db", "auth"]
    for _ in range(rng.randint(1, 4)):
        what = rng.random()
        if what < 0.4 and pods:
            del pods[rng.choice(sorted(pods))]
        elif what < 0.8:
            pods[rng.randint(0, 999)] = rng.choice(apps)
        elif what < 0.9 and services:
            del services[rng.choice(sorted(services))]
        else:
            services[f"svc{rng.randint(0, 20)}"] = (rng.choice(apps), rng.choice([80, 81, 9090]))


def test_a_delta_applied_to_its_base_gives_the_new_table_exactly() -> None:
    rng = random.Random(7)
    pods = {n: rng.choice(["cart", "web", "db"]) for n in rng.sample(range(1000), 60)}
    services = {"cart": ("cart", 80), "web": ("web", 80), "db": ("db", 5432)}
    held = compile_outbound(cluster(pods, services), "cluster.local")
    for _ in range(40):
        random_cluster(rng, pods, services)
        new = compile_outbound(cluster(pods, services), "cluster.local")
        delta = wire.outbound_delta_from_pb(wire.outbound_delta_to_pb(outbound_delta(held, new)))
        applied = apply_outbound_delta(held, delta)
        # The same destinations in the same order: the same addresses win where two share one.
        assert applied.destinations == new.destinations and applied.hash == new.hash
        assert applied._by_address == new._by_address and applied._by_name == new._by_name
        assert len(delta.upserted) + len(delta.removed) < len(new.destinations)
        held = applied


def test_chained_deltas_do_what_the_steps_do() -> None:
    rng = random.Random(11)
    pods = {n: rng.choice(["cart", "web"]) for n in rng.sample(range(1000), 30)}
    services = {"cart": ("cart", 80), "web": ("web", 80)}
    tables = [compile_outbound(cluster(pods, services), "cluster.local")]
    steps = []
    for _ in range(12):
        random_cluster(rng, pods, services)
        tables.append(compile_outbound(cluster(pods, services), "cluster.local"))
        steps.append(outbound_delta(tables[-2], tables[-1]))
    for start in range(len(steps)):
        applied = apply_outbound_delta(tables[start], chain_deltas(steps[start:]))
        assert applied.destinations == tables[-1].destinations and applied.hash == tables[-1].hash


def test_a_delta_on_another_table_or_one_that_does_not_add_up_is_refused() -> None:
    pods, services = {1: "cart", 2: "cart", 3: "web"}, {"cart": ("cart", 80)}
    old = compile_outbound(cluster(pods, services), "cluster.local")
    new = compile_outbound(cluster({**pods, 4: "cart"}, services), "cluster.local")
    delta = outbound_delta(old, new)
    with pytest.raises(CompileError, match="holds none"):
        apply_outbound_delta(None, delta)
    with pytest.raises(CompileError, match=f"holds {new.hash}"):
        apply_outbound_delta(new, delta)
    # A change left out (here: the new pod's own destination) shows in the hash.
    short = dataclasses.replace(
        delta, upserted=tuple(d for d in delta.upserted if not d.name.startswith("pod "))
    )
    assert short.upserted != delta.upserted
    with pytest.raises(CompileError, match="hashes to"):
        apply_outbound_delta(old, short)
    with pytest.raises(CompileError, match="twice"):
        apply_outbound_delta(old, dataclasses.replace(delta, upserted=delta.upserted * 2))
    bad = OutboundTable(old.destinations, "not-hex")
    with pytest.raises(CompileError, match="not hexadecimal"):
        apply_outbound_delta(bad, dataclasses.replace(delta, base="not-hex"))


def test_the_controller_sends_deltas_to_streams_behind_and_whole_tables_otherwise() -> None:
    state = MeshState("cluster.local", DefaultPolicy.ALLOW_AUTHENTICATED)
    apps = ["cart", "web", "db", "auth"]
    pods = {n: apps[n % 4] for n in range(40)}
    services = {app: (app, 80) for app in apps}
    state.update(cluster(pods, services))
    first = state.outbound_hash()
    seen = [first]
    for n in range(40, 43):  # three pods come, one at a time
        pods[n] = "cart"
        state.update(cluster(pods, services))
        seen.append(state.outbound_hash())
    whole = state.outbound()
    assert state.outbound_for(whole.hash) is None
    assert state.outbound_for("") is whole  # a new stream, or one that NACKed
    assert state.outbound_for("0123456789abcdef") is whole  # a table the controller no longer knows
    table = state.outbound_table()
    assert table is not None
    for behind, held_hash in enumerate(reversed(seen[:-1]), start=1):
        part = state.outbound_for(held_hash)
        # (a Service's destination goes whole, all its endpoints: Istio's EDS sends a cluster's too)
        assert part is not None and part is not whole and len(part.wire) < len(whole.wire) // 3
        update = pb.Update.FromString(part.wire)
        assert update.HasField("outbound_delta") and not update.HasField("outbound")
        assert update.outbound_delta.base == held_hash and update.outbound_delta.hash == whole.hash
        # each pod: its own destination, and the Service's endpoints changed
        assert len(update.outbound_delta.upserted) == behind + 1
        assert state.outbound_for(held_hash) is part  # built once, shared by every stream behind as far
    data, parts, kind = state.message(WorkloadId("shop", "cart"), ("", seen[-2]))
    update = pb.Update.FromString(data)
    assert update.HasField("inbound") and update.HasField("outbound_delta") and parts[1] == whole.hash
    assert (
        kind == "delta"
        and state.message(WorkloadId("shop", "cart"), ("", seen[-2]), deltas=False)[2] == "whole"
    )
    # When the delta would be no smaller than the table (everything changed), the table goes whole.
    state.update(cluster({n: "cart" for n in range(500, 503)}, {"other": ("cart", 81)}))
    assert state.outbound_for(whole.hash) is state.outbound()


def test_one_destination_per_name_so_deltas_apply_with_duplicates_in_the_sources() -> None:
    """A Service listing port 80 twice (the Kubernetes API refuses it, a directory of YAML does
    not) made two destinations of one name: every delta then failed its hash check at every
    sidecar, and each change cost a refusal and the whole table."""

    def snap(pods: int) -> Snapshot:
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "cart", "namespace": "shop"},
                "spec": {
                    "clusterIP": "10.96.0.1",
                    "selector": {"app": "cart"},
                    "ports": [
                        {"port": 80, "targetPort": 8080, "name": "a"},
                        {"port": 80, "targetPort": 9090, "name": "b"},
                    ],
                },
            }
        ]
        docs += [
            {
                "apiVersion": "sidemesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": f"cart-{n}", "namespace": "shop", "labels": {"app": "cart"}},
                "spec": {
                    "serviceAccount": "cart",
                    "address": f"10.0.0.{n + 1}",
                    "ports": [{"port": 8080}, {"port": 9090}],
                },
            }
            for n in range(pods)
        ]
        return build_snapshot([(f"doc{i}", d) for i, d in enumerate(docs)])

    held = compile_outbound(snap(3), "cluster.local")
    names = [d.name for d in held.destinations]
    assert len(names) == len(set(names))
    # the later port entry, as the address index always took
    assert {e.port for e in held._by_name["cart.shop:80"].endpoints} == {9090}
    new = compile_outbound(snap(4), "cluster.local")
    assert apply_outbound_delta(held, outbound_delta(held, new)).destinations == new.destinations
    twice = OutboundTable((*held.destinations, held.destinations[0]), held.hash)
    with pytest.raises(CompileError, match="twice"):
        apply_outbound_delta(twice, outbound_delta(held, new))


def test_every_base_a_stream_holds_gets_one_delta_shared_by_its_streams() -> None:
    """Only the first 16 bases asked for were kept: a stream on any other built its own delta, twice
    per send, during a rollout (versions every 100 ms, streams spread over many)."""
    state = MeshState("cluster.local", DefaultPolicy.ALLOW_AUTHENTICATED)
    apps = [f"app{i}" for i in range(10)]
    pods = {n: apps[n % 10] for n in range(100)}
    services = {app: (app, 80) for app in apps}
    state.update(cluster(pods, services))
    bases = [state.outbound_hash()]
    for n in range(100, 130):
        pods[n] = apps[n % 10]
        state.update(cluster(pods, services))
        bases.append(state.outbound_hash())
    parts = [state.outbound_for(b) for b in bases[:-1]]
    assert all(p is not None and p.delta for p in parts)
    assert all(state.outbound_for(b) is p for b, p in zip(bases[:-1], parts, strict=True))
