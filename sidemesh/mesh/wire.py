"""Compiled configuration <-> the config stream's protobuf messages (no I/O)."""

from __future__ import annotations

import math

from sidemesh.api import config_pb2 as pb
from sidemesh.mesh.compile import (
    Destination,
    Endpoint,
    InboundConfig,
    InboundWorkload,
    OutboundDelta,
    OutboundTable,
)
from sidemesh.mesh.delivery import MAX_RETRIES
from sidemesh.policy.model import Authorization, DefaultPolicy, HTTPMatch, Mode, Rule, Source
from sidemesh.spiffe import SpiffeId


class WireError(ValueError):
    pass


def _policy_to_pb(p: Authorization) -> pb.Policy:
    rules = []
    for r in p.rules:
        rule = pb.Rule(
            sources=[
                pb.Source(
                    namespace=s.namespace or "",
                    service_account=s.service_account or "",
                    unauthenticated=s.unauthenticated,
                )
                for s in r.sources
            ],
            ports=list(r.ports),
        )
        if r.http is not None:
            rule.http.CopyFrom(pb.HTTPMatch(methods=list(r.http.methods), paths=list(r.http.paths)))
        rules.append(rule)
    return pb.Policy(name=p.name, namespace=p.namespace, mode=p.mode.value, rules=rules, invalid=p.invalid)


def _policy_from_pb(m: pb.Policy) -> Authorization:
    rules = tuple(
        Rule(
            sources=tuple(
                Source(s.namespace or None, s.service_account or None, s.unauthenticated) for s in r.sources
            ),
            ports=tuple(r.ports),
            http=HTTPMatch(tuple(r.http.methods), tuple(r.http.paths)) if r.HasField("http") else None,
        )
        for r in m.rules
    )
    return Authorization(m.name, m.namespace, (), rules, Mode(m.mode), m.invalid)


def inbound_to_pb(c: InboundConfig) -> pb.Inbound:
    return pb.Inbound(
        hash=c.hash,
        identity=str(c.identity),
        workloads=[
            pb.Workload(
                ref=w.ref,
                addresses=list(w.addresses),
                default_policy=w.default_policy.value,
                policies=list(w.policies),
                ports=list(w.ports),
                opaque_ports=list(w.opaque_ports),
                node=w.node,
            )
            for w in c.workloads
        ],
        policies=[_policy_to_pb(p) for p in c.policies],
    )


def inbound_from_pb(m: pb.Inbound) -> InboundConfig:
    try:
        return InboundConfig(
            SpiffeId.parse(m.identity),
            tuple(
                InboundWorkload(
                    w.ref,
                    tuple(w.addresses),
                    DefaultPolicy(w.default_policy),
                    tuple(w.policies),
                    tuple(w.ports),
                    tuple(w.opaque_ports),
                    w.node,
                )
                for w in m.workloads
            ),
            tuple(_policy_from_pb(p) for p in m.policies),
            m.hash,
        )
    except ValueError as exc:
        raise WireError(f"invalid inbound configuration: {exc}") from exc


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _destination_to_pb(d: Destination) -> pb.Destination:
    return pb.Destination(
        name=d.name,
        names=list(d.names),
        addresses=[f"{h}:{p}" for h, p in d.addresses],
        endpoints=[
            pb.Endpoint(
                address=e.address,
                port=e.port,
                identity=str(e.identity) if e.identity else "",
                workload=e.workload,
                node=e.node,
            )
            for e in d.endpoints
        ],
        timeout_seconds=d.timeout_s or 0.0,
        retries=d.retries,
        retry_non_idempotent=d.retry_non_idempotent,
        opaque=d.opaque,
        node_local=d.node_local,
        client_ip_affinity=d.client_ip_affinity,
    )


def outbound_to_pb(t: OutboundTable) -> pb.Outbound:
    return pb.Outbound(hash=t.hash, destinations=[_destination_to_pb(d) for d in t.destinations])


def outbound_delta_to_pb(delta: OutboundDelta) -> pb.OutboundDelta:
    return pb.OutboundDelta(
        base=delta.base,
        hash=delta.hash,
        upserted=[_destination_to_pb(d) for d in delta.upserted],
        removed=list(delta.removed),
    )


def _destination_from_pb(d: pb.Destination) -> Destination:
    if not math.isfinite(d.timeout_seconds) or d.timeout_seconds < 0:
        raise ValueError(f"{d.name}: timeout {d.timeout_seconds} is not a duration")
    if d.retries > MAX_RETRIES:
        raise ValueError(f"{d.name}: {d.retries} retries (at most {MAX_RETRIES})")
    return Destination(
        d.name,
        tuple(
            Endpoint(
                e.address, e.port, SpiffeId.parse(e.identity) if e.identity else None, e.workload, e.node
            )
            for e in d.endpoints
        ),
        tuple(d.names),
        tuple(_split(a) for a in d.addresses),
        d.timeout_seconds or None,
        d.retries,
        d.retry_non_idempotent,
        d.opaque,
        d.node_local,
        d.client_ip_affinity,
    )


def outbound_from_pb(m: pb.Outbound) -> OutboundTable:
    try:
        return OutboundTable(tuple(_destination_from_pb(d) for d in m.destinations), m.hash)
    except ValueError as exc:
        raise WireError(f"invalid outbound configuration: {exc}") from exc


def outbound_delta_from_pb(m: pb.OutboundDelta) -> OutboundDelta:
    try:
        upserted = tuple(_destination_from_pb(d) for d in m.upserted)
    except ValueError as exc:
        raise WireError(f"invalid outbound configuration: {exc}") from exc
    return OutboundDelta(m.base, m.hash, upserted, tuple(m.removed))
