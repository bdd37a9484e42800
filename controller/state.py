"""The compiled mesh, versioned, with each part serialized once and shared by every stream."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from sidemesh.api import config_pb2 as pb
from sidemesh.gc_pause import gc_paused
from sidemesh.mesh import compile as mc
from sidemesh.mesh import wire
from sidemesh.mesh.resources import Snapshot, Workload
from sidemesh.policy.model import Authorization, DefaultPolicy
from sidemesh.spiffe import WorkloadId

log = logging.getLogger("sidemesh.controller")
# Outbound deltas kept: a stream up to this many outbound changes behind (a slow sidecar during a
# rollout) still gets only what changed; one further behind, or new, gets the whole table. Fewer
# when together they change more destinations than the table holds (a delta that large is no use).
DELTA_STEPS = 64
# The deltas kept for the bases streams hold name at most this many destinations, or twice the
# table's when that is more (one destination as sent: ~150 bytes, plus its endpoints).
DELTA_CACHE_MIN = 20_000


@dataclass(frozen=True, slots=True)
class Part:
    hash: str
    wire: bytes  # a serialized Update holding only this part: concatenated into any Update
    delta: bool = False  # an outbound delta, not the whole table


def _by_namespace(snapshot: Snapshot) -> dict[str, tuple[object, ...]]:
    """What an identity's inbound part depends on, grouped by namespace: its workloads, its
    namespace's policies, its Namespace object (a policy only selects workloads of its own)."""
    workloads: dict[str, list[Workload]] = {}
    policies: dict[str, list[Authorization]] = {}
    for w in snapshot.workloads:
        workloads.setdefault(w.namespace, []).append(w)
    for p in snapshot.policies:
        policies.setdefault(p.namespace, []).append(p)
    namespaces = {n.name: n for n in snapshot.namespaces}
    return {
        ns: (
            tuple(sorted(workloads.get(ns, ()), key=lambda w: w.ref)),
            tuple(sorted(policies.get(ns, ()), key=lambda p: p.ref)),
            namespaces.get(ns),
        )
        for ns in workloads.keys() | policies.keys() | namespaces.keys()
    }


class MeshState:
    """Compiles each snapshot. Parts whose inputs did not change are reused, not recompiled: the
    outbound table when services, workloads and endpoints are the same; an identity's inbound part
    when nothing in its namespace changed. The outbound table goes to a stream as a delta from the
    one it was sent last when that is known and smaller (a pod change: a few destinations of tens
    of thousands), else whole."""

    def __init__(self, trust_domain: str, mesh_default: DefaultPolicy) -> None:
        self.trust_domain = trust_domain
        self.mesh_default = mesh_default
        self.snapshot = Snapshot()
        self.generation = 0
        self.compile_seconds = 0.0
        self._table: mc.OutboundTable | None = None
        self._whole: Part | None = None  # _table serialized, when a stream first needs it whole
        self._node_local: bool | None = None  # has_node_local() of _table, once asked
        self._affinity: bool | None = None  # has_affinity() of _table, once asked
        self._steps: deque[mc.OutboundDelta] = deque(maxlen=DELTA_STEPS)  # the last changes, in order
        self._deltas: dict[str, Part] = {}  # from a held hash (a base in _steps) to the current table
        self._cached = 0  # destinations in the deltas of _deltas
        self._inbound: dict[WorkloadId, Part] = {}
        self._index = mc.InboundIndex(self.snapshot)
        self._namespaces: dict[str, tuple[object, ...]] = {}

    @property
    def version(self) -> str:
        return str(self.generation)

    def update(self, snapshot: Snapshot) -> None:
        with gc_paused():  # (10^5 new objects: the collector walked the whole heap, 0.2-0.5 s)
            self._update(snapshot)

    def _update(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        old = self.snapshot
        if (snapshot.workloads, snapshot.services, snapshot.endpoints) != (
            old.workloads,
            old.services,
            old.endpoints,
        ) or self._table is None:
            outbound = mc.compile_outbound(snapshot, self.trust_domain)
            if outbound.hash != self.outbound_hash():
                if self._table is not None:
                    self._steps.append(mc.outbound_delta(self._table, outbound))
                    changes = [len(s.upserted) + len(s.removed) for s in self._steps]
                    while self._steps and sum(changes) > len(outbound.destinations):
                        self._steps.popleft()
                        changes.pop(0)
                self._table, self._whole, self._deltas, self._cached = outbound, None, {}, 0
                self._node_local = self._affinity = None
        namespaces = _by_namespace(snapshot)
        changed = {
            ns
            for ns in namespaces.keys() | self._namespaces.keys()
            if namespaces.get(ns) != self._namespaces.get(ns)
        }
        for identity in [i for i in self._inbound if i.namespace in changed]:
            del self._inbound[identity]  # compiled again on demand
        self.snapshot, self._namespaces = snapshot, namespaces
        self._index = mc.InboundIndex(snapshot)
        self.generation += 1
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "snapshot compiled",
            extra={
                "version": self.version,
                "workloads": len(snapshot.workloads),
                "services": len(snapshot.services),
                "policies": len(snapshot.policies),
                "errors": len(snapshot.errors),
                "changed_namespaces": len(changed),
                "seconds": round(self.compile_seconds, 4),
            },
        )

    def outbound(self) -> Part:
        """The whole outbound table, serialized once per table when a stream first needs it (a new
        stream, one after a NACK): a pod change that every stream gets as a delta costs none."""
        if self._whole is None:
            if self._table is None:
                return Part("", b"")
            update = pb.Update(outbound=wire.outbound_to_pb(self._table))
            self._whole = Part(self._table.hash, update.SerializeToString())
        return self._whole

    def outbound_hash(self) -> str:
        return self._table.hash if self._table is not None else ""

    def has_node_local(self) -> bool:
        """Whether the table has a node-local Service (internalTrafficPolicy: Local)."""
        if self._node_local is None:
            self._node_local = self._table is not None and any(d.node_local for d in self._table.destinations)
        return self._node_local

    def has_affinity(self) -> bool:
        """Whether the table has a Service with sessionAffinity: ClientIP."""
        if self._affinity is None:
            self._affinity = self._table is not None and any(
                d.client_ip_affinity for d in self._table.destinations
            )
        return self._affinity

    def outbound_table(self) -> mc.OutboundTable | None:
        """The compiled outbound table being served (None before the first snapshot)."""
        return self._table

    def outbound_for(self, held: str, deltas: bool = True) -> Part | None:
        """What brings a stream that holds the outbound table with hash ``held`` to the current
        one: nothing when it holds it, else a delta when the stream takes them (once per held
        hash and version, shared by every stream) or the whole table (``outbound()``)."""
        if held == self.outbound_hash():
            return None
        if not deltas:
            return self.outbound()
        if (part := self._deltas.get(held)) is not None:
            return part
        found = self._delta_from(held)
        if found is None:
            return self.outbound()
        part, size = found
        # Every base a stream may hold is kept (at most DELTA_STEPS of them), within a budget of
        # destinations in all: past that (many bases, each far behind) each is built anew.
        budget = max(2 * len(self._table.destinations), DELTA_CACHE_MIN) if self._table is not None else 0
        if self._cached + size <= budget:
            self._deltas[held] = part
            self._cached += size
        return part

    def _delta_from(self, held: str) -> tuple[Part, int] | None:
        """The delta from ``held`` to the current table, and how many destinations it names."""
        steps = list(self._steps)
        start = (
            next((i for i in reversed(range(len(steps))) if steps[i].base == held), None) if held else None
        )
        if start is None or self._table is None or steps[-1].hash != self._table.hash:
            return None
        delta = mc.chain_deltas(steps[start:])
        # (upserted destinations are the new table's: a delta changing no more than it holds is
        # smaller than it; the steps kept change no more than that together)
        if len(delta.upserted) + len(delta.removed) > len(self._table.destinations):
            return None
        data = pb.Update(outbound_delta=wire.outbound_delta_to_pb(delta)).SerializeToString()
        return Part(delta.hash, data, delta=True), len(delta.upserted) + len(delta.removed)

    def inbound(self, identity: WorkloadId) -> Part:
        part = self._inbound.get(identity)
        if part is None:
            compiled = mc.compile_inbound(
                self.snapshot, identity, self.trust_domain, self.mesh_default, self._index
            )
            part = Part(compiled.hash, pb.Update(inbound=wire.inbound_to_pb(compiled)).SerializeToString())
            self._inbound[identity] = part
        return part

    def message(
        self, identity: WorkloadId, sent: tuple[str, str], deltas: bool = True
    ) -> tuple[bytes, tuple[str, str], str]:
        """The update for a stream that last got parts with hashes ``sent`` (inbound, outbound)
        and takes outbound deltas or not; the hashes it then holds; what it got of the outbound
        table: "whole", "delta" or "none"."""
        inbound, outbound = self.inbound(identity), self.outbound_for(sent[1], deltas)
        data = pb.Update(version=self.version).SerializeToString()
        if inbound.hash != sent[0]:
            data += inbound.wire
        if outbound is not None:
            data += outbound.wire
        kind = "none" if outbound is None else "delta" if outbound.delta else "whole"
        return data, (inbound.hash, self.outbound_hash()), kind
