"""What one sidecar needs to know, compiled from a snapshot (no I/O)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sidemesh.mesh.resources import Service, Snapshot, Workload
from sidemesh.policy.model import Authorization, DefaultPolicy
from sidemesh.spiffe import SpiffeId, WorkloadId


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    identity: SpiffeId | None  # None: not in the mesh (plain TCP)
    workload: str = ""


@dataclass(frozen=True, slots=True)
class Destination:
    """A service port (or one pod's port) and the endpoints behind it."""

    name: str  # "cart.shop:80", or "pod shop/cart-1:8080"
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    workload: str
    identity: SpiffeId
    default_policy: DefaultPolicy
    policies: tuple[Authorization, ...]  # those that select this workload
    by_address: tuple[tuple[tuple[str, int], Destination], ...]  # (ip, port) -> destination
    by_name: tuple[tuple[str, Destination], ...]  # "cart.shop:80" -> destination
    version: str = ""

    def lookup_address(self, ip: str, port: int) -> Destination | None:
        return dict(self.by_address).get((ip, port))

    def lookup_name(self, name: str) -> Destination | None:
        return dict(self.by_name).get(name)


class CompileError(ValueError):
    pass


def _target_port(service: Service, target: int | str, workload: Workload) -> int | None:
    if isinstance(target, int):
        return target
    return next((p.port for p in workload.ports if p.name == target), None)


def _endpoint(workload: Workload, port: int, trust_domain: str) -> Endpoint:
    identity = (
        WorkloadId(workload.namespace, workload.service_account).spiffe_id(trust_domain)
        if workload.meshed
        else None
    )
    return Endpoint(workload.address, port, identity, workload.ref)


def compile_sidecar(
    snapshot: Snapshot, workload_ref: str, trust_domain: str, mesh_default: DefaultPolicy
) -> SidecarConfig:
    me = next((w for w in snapshot.workloads if w.ref == workload_ref), None)
    if me is None:
        raise CompileError(f"no workload {workload_ref} in the mesh configuration")
    namespace = next((n for n in snapshot.namespaces if n.name == me.namespace), None)
    default = me.default_policy() or (namespace.default_policy() if namespace else None) or mesh_default
    policies = tuple(
        sorted((p for p in snapshot.policies if p.selects(me.namespace, me.label_map)), key=lambda p: p.ref)
    )

    by_address: dict[tuple[str, int], Destination] = {}
    by_name: dict[str, Destination] = {}
    for w in snapshot.workloads:  # direct pod addressing
        for p in w.ports:
            by_address[(w.address, p.port)] = Destination(
                f"pod {w.ref}:{p.port}", (_endpoint(w, p.port, trust_domain),)
            )
    for svc in snapshot.services:
        members = [
            w
            for w in snapshot.workloads
            if w.namespace == svc.namespace
            and svc.selector
            and all(w.label_map.get(k) == v for k, v in svc.selector)
        ]
        for sp in svc.ports:
            endpoints = []
            for w in sorted(members, key=lambda w: w.ref):
                port = _target_port(svc, sp.target_port, w)
                if port is not None:
                    endpoints.append(_endpoint(w, port, trust_domain))
            dest = Destination(f"{svc.host}:{sp.port}", tuple(endpoints))
            by_name[f"{svc.host}:{sp.port}"] = dest
            by_name[f"{svc.host}.svc.cluster.local:{sp.port}"] = dest
            if svc.cluster_ip:
                by_address[(svc.cluster_ip, sp.port)] = dest
    config = SidecarConfig(
        me.ref,
        WorkloadId(me.namespace, me.service_account).spiffe_id(trust_domain),
        default,
        policies,
        tuple(sorted(by_address.items())),
        tuple(sorted(by_name.items())),
    )
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:12]
    return SidecarConfig(
        config.workload,
        config.identity,
        config.default_policy,
        config.policies,
        config.by_address,
        config.by_name,
        digest,
    )
