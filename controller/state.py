"""The compiled mesh, versioned, with each part serialized once and shared by every stream."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sidemesh.api import config_pb2 as pb
from sidemesh.mesh import compile as mc
from sidemesh.mesh import wire
from sidemesh.mesh.resources import Snapshot, Workload
from sidemesh.policy.model import Authorization, DefaultPolicy
from sidemesh.spiffe import WorkloadId

log = logging.getLogger("sidemesh.controller")


@dataclass(frozen=True, slots=True)
class Part:
    hash: str
    wire: bytes  # a serialized Update holding only this part: concatenated into any Update


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
    when nothing in its namespace changed."""

    def __init__(self, trust_domain: str, mesh_default: DefaultPolicy) -> None:
        self.trust_domain = trust_domain
        self.mesh_default = mesh_default
        self.snapshot = Snapshot()
        self.generation = 0
        self.compile_seconds = 0.0
        self._outbound = Part("", b"")
        self._inbound: dict[WorkloadId, Part] = {}
        self._index = mc.InboundIndex(self.snapshot)
        self._namespaces: dict[str, tuple[object, ...]] = {}

    @property
    def version(self) -> str:
        return str(self.generation)

    def update(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        old = self.snapshot
        if (snapshot.workloads, snapshot.services, snapshot.endpoints) != (
            old.workloads,
            old.services,
            old.endpoints,
        ) or not self._outbound.hash:
            outbound = mc.compile_outbound(snapshot, self.trust_domain)
            if outbound.hash != self._outbound.hash:
                self._outbound = Part(
                    outbound.hash, pb.Update(outbound=wire.outbound_to_pb(outbound)).SerializeToString()
                )
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
        return self._outbound

    def inbound(self, identity: WorkloadId) -> Part:
        part = self._inbound.get(identity)
        if part is None:
            compiled = mc.compile_inbound(
                self.snapshot, identity, self.trust_domain, self.mesh_default, self._index
            )
            part = Part(compiled.hash, pb.Update(inbound=wire.inbound_to_pb(compiled)).SerializeToString())
            self._inbound[identity] = part
        return part

    def message(self, identity: WorkloadId, sent: tuple[str, str]) -> tuple[bytes, tuple[str, str]]:
        """The update for a stream that last got parts with hashes ``sent`` (inbound, outbound)."""
        inbound, outbound = self.inbound(identity), self.outbound()
        data = pb.Update(version=self.version).SerializeToString()
        if inbound.hash != sent[0]:
            data += inbound.wire
        if outbound.hash != sent[1]:
            data += outbound.wire
        return data, (inbound.hash, outbound.hash)
