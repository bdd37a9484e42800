"""Compile a snapshot into what sidecars need (no I/O).

Two parts, so that the controller scales: the *outbound table* (every service port and pod port
-> endpoints with the identity each must present) is the same for every sidecar and is compiled
once per snapshot; the *inbound config* (the workloads running as one identity and the policies
selecting them) is compiled per identity. A sidecar's own view is derived from both.
"""

from __future__ import annotations

import hashlib
import operator
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from sidemesh.mesh.resources import EndpointAddress, Service, Snapshot, Workload
from sidemesh.policy.model import Authorization, DefaultPolicy
from sidemesh.spiffe import SpiffeId, WorkloadId


class CompileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    identity: SpiffeId | None  # None: not in the mesh (plain TCP)
    workload: str = ""
    node: str = ""  # the node it runs on ("" not known): for node-local Services


@dataclass(frozen=True, slots=True)
class Destination:
    name: str  # "cart.shop:80", or "pod shop/cart-1:8080"
    endpoints: tuple[Endpoint, ...]
    names: tuple[str, ...] = ()  # other names
    addresses: tuple[tuple[str, int], ...] = ()  # (ip, port) keys
    timeout_s: float | None = None  # until response headers, retries included (HTTP)
    retries: int = 0  # HTTP retries (see proxy/retry.py for which)
    retry_non_idempotent: bool = False
    opaque: bool = False  # no protocol detection: carried as opaque TCP
    # A Service with internalTrafficPolicy Local: each sidecar keeps the endpoints on its own node
    # (``for_node``), none when there are none, as kube-proxy does.
    node_local: bool = False
    # A Service with sessionAffinity ClientIP: each caller keeps to one endpoint (proxy/balance.py)
    client_ip_affinity: bool = False


@dataclass(frozen=True)
class OutboundTable:
    destinations: tuple[Destination, ...]
    hash: str = ""
    _by_address: dict[tuple[str, int], Destination] = field(default_factory=dict, compare=False, repr=False)
    _by_name: dict[str, Destination] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for d in self.destinations:
            self._by_name[d.name] = d
            for n in d.names:
                self._by_name[n] = d
            for a in d.addresses:
                self._by_address[a] = d


@dataclass(frozen=True, slots=True)
class InboundWorkload:
    ref: str
    addresses: tuple[str, ...]
    default_policy: DefaultPolicy
    policies: tuple[str, ...]  # refs
    ports: tuple[int, ...]
    opaque_ports: tuple[int, ...] = ()  # inbound ports that skip protocol detection
    node: str = ""  # the node it runs on: what node-local Services it reaches


@dataclass(frozen=True, slots=True)
class InboundConfig:
    identity: SpiffeId
    workloads: tuple[InboundWorkload, ...]
    policies: tuple[Authorization, ...]
    hash: str = ""


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _destination_digest(d: Destination) -> int:
    """64 bits of SHA-256 of one destination's content (no dataclass reprs: ~10^5 of them)."""
    text = f"{d.name}|{','.join(d.names)}|{d.addresses}|"
    if d.timeout_s or d.retries or d.retry_non_idempotent or d.opaque:  # most have none: no cost
        text += f"~{d.timeout_s}|{d.retries}|{d.retry_non_idempotent}|{d.opaque}|"
    if d.node_local:
        text += "local|"
    if d.client_ip_affinity:
        text += "affinity|"
    text += "".join(
        f"{e.address}:{e.port}:{e.identity}:{e.workload}{'@' + e.node if e.node else ''};"
        for e in d.endpoints
    )
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


_MOD = 1 << 64


def _outbound_digest(destinations: tuple[Destination, ...]) -> str:
    """The table's content hash: the sum of its destinations' digests (names are unique), so that a
    sidecar applying a delta checks the result by digesting only what the delta changed."""
    return f"{sum(map(_destination_digest, destinations)) % _MOD:016x}"


_by_name = operator.attrgetter("name")


def _canonical(destinations: Iterable[Destination]) -> tuple[Destination, ...]:
    """The table's order, the same in the controller and in a sidecar that applied deltas: pod
    destinations, then Services, each by name (where two share an address, the later one wins)."""
    pods: list[Destination] = []
    services: list[Destination] = []
    for d in destinations:
        (pods if d.name.startswith("pod ") else services).append(d)
    pods.sort(key=_by_name)
    services.sort(key=_by_name)
    return (*pods, *services)


@dataclass(frozen=True, slots=True)
class OutboundDelta:
    """What changed from the outbound table with hash ``base`` to the one with hash ``hash``."""

    base: str
    hash: str
    upserted: tuple[Destination, ...]  # new or changed, whole; by name
    removed: tuple[str, ...]  # names


def outbound_delta(old: OutboundTable, new: OutboundTable) -> OutboundDelta:
    before = {d.name: d for d in old.destinations}
    upserted = tuple(d for d in new.destinations if before.pop(d.name, None) != d)
    return OutboundDelta(old.hash, new.hash, upserted, tuple(before))


def chain_deltas(steps: list[OutboundDelta]) -> OutboundDelta:
    """One delta doing what ``steps`` (each based on the one before) do in turn."""
    upserted: dict[str, Destination] = {}
    removed: dict[str, None] = {}
    for step in steps:
        for name in step.removed:
            upserted.pop(name, None)
            removed[name] = None
        for d in step.upserted:
            upserted[d.name] = d
            removed.pop(d.name, None)
    # A name added and then removed again is in ``removed`` though ``base`` lacks it: removing a
    # name that is not there changes nothing, and the hash check holds either way.
    return OutboundDelta(steps[0].base, steps[-1].hash, tuple(upserted.values()), tuple(removed))


def apply_outbound_delta(table: OutboundTable | None, delta: OutboundDelta) -> OutboundTable:
    """The table ``delta`` leads to from ``table``; CompileError when ``table`` is not its base or
    the result does not hash to what the delta says (the sender then sends the whole table)."""
    held = table.hash if table is not None else ""
    if table is None or held != delta.base:
        raise CompileError(
            f"the update changes outbound table {delta.base or '(none)'} but this sidecar holds "
            f"{held or 'none'}; waiting for the whole table"
        )
    try:
        total = int(table.hash, 16)
    except ValueError:
        raise CompileError(f"outbound table hash {table.hash!r} is not hexadecimal") from None
    by_name = {d.name: d for d in table.destinations}
    if len(by_name) != len(table.destinations):
        raise CompileError("the outbound table held names a destination twice; waiting for the whole table")
    upserted = {d.name for d in delta.upserted}
    if len(upserted) != len(delta.upserted) or not upserted.isdisjoint(delta.removed):
        raise CompileError("the update's outbound delta names a destination twice")
    for name in delta.removed:
        if (gone := by_name.pop(name, None)) is not None:
            total -= _destination_digest(gone)
    for d in delta.upserted:
        if (replaced := by_name.get(d.name)) is not None:
            total -= _destination_digest(replaced)
        by_name[d.name] = d
        total += _destination_digest(d)
    if f"{total % _MOD:016x}" != delta.hash:
        raise CompileError(
            f"the outbound table after the update's delta hashes to {total % _MOD:016x}, not {delta.hash} "
            "as the controller's; waiting for the whole table"
        )
    return OutboundTable(_canonical(by_name.values()), delta.hash)


EXCLUDE_INBOUND = "sidemesh.io/exclude-inbound-ports"


def excluded_inbound_ports(workload: Workload) -> set[int] | None:
    """Ports the pod's sidecar does not capture (None: all of them, ``*``)."""
    value = dict(workload.annotations).get(EXCLUDE_INBOUND, "")
    if "*" in (part.strip() for part in value.split(",")):  # as the init container reads it ("*,")
        return None
    # Port numbers only: "²".isdigit() is true and int() refuses it, as it refuses 5,000 digits;
    # either took the whole controller's compile down with one pod annotation.
    parts = (p.strip() for p in value.split(","))
    return {int(p) for p in parts if len(p) <= 5 and p.isascii() and p.isdigit() and 0 < int(p) < 65536}


class _Identities:
    """SPIFFE IDs and excluded ports, computed once per workload (not once per endpoint)."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._ids: dict[tuple[str, str], SpiffeId] = {}
        # By the workload object (the snapshot holds them all while a compile runs): its excluded
        # ports and its ID, found once (52,500 endpoints of 10,000 pods took 0.25 s by ref).
        self._of: dict[int, tuple[set[int] | None, SpiffeId]] = {}

    def of(self, workload: Workload | None, port: int | None = None) -> SpiffeId | None:
        """The identity a client sidecar must see, or None to send plain TCP: the destination is not
        meshed, or its sidecar does not capture that port (nothing there would terminate mTLS)."""
        if workload is None or not workload.meshed:
            return None
        found = self._of.get(id(workload))
        if found is None:
            key = (workload.namespace, workload.service_account)
            sid = self._ids.get(key)
            if sid is None:
                sid = self._ids[key] = WorkloadId(*key).spiffe_id(self.trust_domain)
            found = self._of[id(workload)] = (excluded_inbound_ports(workload), sid)
        excluded, sid = found
        if port is not None and (excluded is None or port in excluded):
            return None
        return sid


class _Index:
    """Workloads by reference and by (namespace, label, value), for selector matching."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.by_ref = {w.ref: w for w in snapshot.workloads}
        self.by_ns: dict[str, list[Workload]] = defaultdict(list)
        self.by_label: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        # (namespace, address) -> the pods there with that address (hostNetwork pods share one)
        self.by_address: dict[tuple[str, str], list[Workload]] = defaultdict(list)
        for w in snapshot.workloads:
            self.by_ns[w.namespace].append(w)
            for address in w.addresses:
                self.by_address[(w.namespace, address)].append(w)
            for k, v in w.labels:
                self.by_label[(w.namespace, k, v)].add(w.ref)

    def at_address(self, namespace: str, address: str) -> Workload | None:
        """The one pod of ``namespace`` with ``address`` (None: none, or several: hostNetwork)."""
        found = self.by_address.get((namespace, address), ())
        return found[0] if len(found) == 1 else None

    def select(self, namespace: str, selector: tuple[tuple[str, str], ...]) -> list[Workload]:
        if not selector:
            return []
        sets = sorted((self.by_label.get((namespace, k, v), set()) for k, v in selector), key=len)
        refs = set(sets[0]).intersection(*sets[1:])
        return sorted((self.by_ref[r] for r in refs), key=lambda w: w.ref)


def target_port(target: int | str, workload: Workload) -> int | None:
    """A Service port's target on ``workload`` (a named one: its port of that name), or None."""
    return _target_port(target, workload)


def _target_port(target: int | str, workload: Workload) -> int | None:
    if isinstance(target, int):
        return target
    return next((p.port for p in workload.ports if p.name == target), None)


def _service_destinations(
    svc: Service,
    index: _Index,
    snapshot_endpoints: dict[tuple[str, str], list[EndpointAddress]],
    ids: _Identities,
    refused: Collection[tuple[str, int]] = frozenset(),
) -> list[Destination]:
    """``refused``: external or load balancer (address, port)s not to take (see compile_outbound)."""
    out = []
    listed = snapshot_endpoints.get((svc.namespace, svc.name))
    # (endpoints carry their node only where it is used: fewer bytes). A headless Service is not
    # kube-proxy's: DNS gives every pod, whatever its traffic policy.
    local = svc.node_local and bool(svc.cluster_ips or svc.cluster_ip)
    for sp in svc.ports:
        endpoints: list[Endpoint] = []
        terminating: list[Endpoint] = []
        if listed is not None:  # EndpointSlices: ready endpoints, ports resolved by Kubernetes
            for e in listed:
                if e.port_name == sp.name or (not sp.name and len(svc.ports) == 1):
                    if e.workload:
                        w = index.by_ref.get(e.workload)
                        if w is None:
                            # Its pod is not known yet (the watches are not ordered): no identity to
                            # check, and plaintext would be refused by a meshed pod. Left out until then.
                            continue
                    else:
                        # No targetRef (a hand-written Endpoints, mirrored; a selectorless Service's
                        # own slice): the pod of this namespace at that address, as Istio looks one
                        # up by IP for "manually controlled" endpoints; a meshed one is called with
                        # mTLS (plaintext would be refused by it). Only this namespace's pods.
                        w = index.at_address(svc.namespace, e.address)
                    node = (e.node or (w.node if w is not None else "")) if local else ""
                    ep = Endpoint(e.address, e.port, ids.of(w, e.port), w.ref if w is not None else "", node)
                    (endpoints if e.ready else terminating).append(ep)
        else:
            for w in index.select(svc.namespace, svc.selector):
                port_or_none = _target_port(sp.target_port, w)
                if port_or_none is not None:
                    endpoints.extend(
                        Endpoint(a, port_or_none, ids.of(w, port_or_none), w.ref, w.node if local else "")
                        for a in w.addresses
                    )
        ips = svc.cluster_ips or ((svc.cluster_ip,) if svc.cluster_ip else ())
        families = list(dict.fromkeys(_family(ip) for ip in ips))  # the Service's primary family first
        if not families:  # headless: reached by name only; the pods' primary addresses (kube: all listed)
            if listed is None:
                endpoints = [e for e in endpoints if e.address == index.by_ref[e.workload].address]
            families = [0]

        d = svc.delivery
        for i, family in enumerate(families):
            # Dual stack: one destination per family, so that a connection to the IPv4 ClusterIP
            # reaches an IPv4 endpoint, as kube-proxy does (the callee's sidecar delivers to the
            # address the caller chose: an app listening on 0.0.0.0 only is not reached over IPv6).
            name = f"{svc.host}:{sp.port}" + (f" (IPv{family})" if i else "")
            names = (f"{svc.host}.svc:{sp.port}", f"{svc.host}.svc.cluster.local:{sp.port}") if i == 0 else ()
            # A family without endpoints of its own (single-stack pods) uses the others. Node-local:
            # kube-proxy's choices per node (a node whose endpoints all terminate uses those).
            chosen = [
                e
                for ready, ending in (
                    _by_node(endpoints, terminating) if svc.node_local else [(endpoints, terminating)]
                )
                for e in (_serving(ready, ending, family) or _serving(ready, ending, 0))
            ]
            out.append(
                Destination(
                    name,
                    tuple(sorted(chosen, key=lambda e: (e.address, e.port))),
                    names,
                    tuple(
                        (ip, sp.port)
                        for ip in (*ips, *(e for e in svc.external_ips if (e, sp.port) not in refused))
                        if _family(ip) == family
                    ),
                    d.timeout_s,
                    d.retries,
                    d.retry_non_idempotent,
                    sp.port in d.opaque_ports,
                    local,
                    svc.client_ip_affinity,
                )
            )
    return out


def _by_node(
    ready: list[Endpoint], terminating: list[Endpoint]
) -> list[tuple[list[Endpoint], list[Endpoint]]]:
    nodes: dict[str, tuple[list[Endpoint], list[Endpoint]]] = {}
    for e in ready:
        nodes.setdefault(e.node, ([], []))[0].append(e)
    for e in terminating:
        nodes.setdefault(e.node, ([], []))[1].append(e)
    return list(nodes.values())


def for_node(table: OutboundTable, node: str) -> OutboundTable:
    """What a sidecar on ``node`` reaches: a node-local Service's endpoints on that node only (none
    when it has none there: kube-proxy does not fall back to other nodes). ``table`` itself when it
    has no node-local Service, or the node is not known ("": every endpoint, as before)."""
    if not node or not any(d.node_local for d in table.destinations):
        return table
    destinations = tuple(
        Destination(
            d.name,
            tuple(e for e in d.endpoints if e.node == node),
            d.names,
            d.addresses,
            d.timeout_s,
            d.retries,
            d.retry_non_idempotent,
            d.opaque,
            d.node_local,
            d.client_ip_affinity,
        )
        if d.node_local
        else d
        for d in table.destinations
    )
    return OutboundTable(destinations, table.hash)


def _serving(ready: list[Endpoint], terminating: list[Endpoint], family: int) -> list[Endpoint]:
    """The family's ready endpoints (0: any family), or else its terminating ones still serving:
    kube-proxy's fallback, per family, as each of its proxiers sees only its own family's slices."""
    return [e for e in ready if family in (0, _family(e.address))] or [
        e for e in terminating if family in (0, _family(e.address))
    ]


def _family(ip: str) -> int:
    """4 or 6 (by its form: an address Python would not parse, such as an old EndpointSlice's
    10.1.2.03, must not stop the compile; the conversion canonicalizes what it can)."""
    return 6 if ":" in ip else 4


def compile_outbound(snapshot: Snapshot, trust_domain: str) -> OutboundTable:
    index = _Index(snapshot)
    ids = _Identities(trust_domain)
    listed = {(se.namespace, se.service): list(se.endpoints) for se in snapshot.endpoints}
    destinations: list[Destination] = []
    direct: set[tuple[str, int]] = set()  # (pod address, port): a pod destination of its own

    # A Service's externalIPs and load balancer IPs are its addresses too, unless another
    # Service's ClusterIP or a pod's address is there, or another Service claims the same
    # address and port: anyone who may write a Service would take that traffic, over mTLS to an
    # identity of their choosing (CVE-2020-8554's pattern; EndpointSlices get the same check).
    taken = {
        ip for s in snapshot.services for ip in (*s.cluster_ips, *((s.cluster_ip,) if s.cluster_ip else ()))
    }
    taken.update(a for w in snapshot.workloads for a in w.addresses)
    claims = Counter((ip, sp.port) for s in snapshot.services for ip in s.external_ips for sp in s.ports)
    refused = {key for key, n in claims.items() if n > 1 or key[0] in taken}
    services: list[Destination] = []
    for svc in sorted(snapshot.services, key=lambda s: (s.namespace, s.name)):
        services.extend(_service_destinations(svc, index, listed, ids, refused))
    # A pod's port a Service declares opaque is opaque addressed directly too: a headless
    # Service's DNS answers with pod IPs (the callee carries it as declared either way). Ready or
    # not (a StatefulSet's peers dial a replica that is catching up): by the selector, as Istio
    # takes a port's protocol from the Services selecting the pod; and the endpoints listed.
    declared = {(e.workload, e.port) for d in services if d.opaque for e in d.endpoints if e.workload}
    for svc in snapshot.services:
        marked = [sp for sp in svc.ports if sp.port in svc.delivery.opaque_ports]
        if marked and svc.selector:
            for w in index.select(svc.namespace, svc.selector):
                for sp in marked:
                    if (target := _target_port(sp.target_port, w)) is not None:
                        declared.add((w.ref, target))

    def pod_destination(w: Workload, address: str, port: int) -> None:
        if (address, port) not in direct:
            direct.add((address, port))
            ref = w.ref
            ep = Endpoint(address, port, ids.of(w, port), ref)
            opaque = port in w.opaque_ports or (ref, port) in declared
            # Names are keys: a dual-stack pod's other address is a destination of its own.
            name = f"pod {ref}:{port}" + ("" if address == w.address else f" ({address})")
            destinations.append(Destination(name, (ep,), (), ((address, port),), opaque=opaque))

    for w in snapshot.workloads:  # a pod addressed directly, by its IP
        for p in w.ports:
            for address in w.addresses:
                pod_destination(w, address, p.port)
    # Pods also reached by address on a port they do not declare (declaring containerPort is
    # optional): a headless Service's DNS names its endpoints' addresses, and so do StatefulSet
    # peers. Each endpoint of a Service is a pod destination too, as Istio derives them; and a
    # port a Service declares opaque, ready or not (a replica catching up is no endpoint yet).
    for d in services:
        for e in d.endpoints:
            # Only at one of the pod's own addresses: an EndpointSlice can name its own pod with
            # another namespace's pod IP (the API server does not check), and a pod destination
            # there would take that pod's traffic from every caller (the first claim wins).
            if (pod := index.by_ref.get(e.workload)) is not None and e.address in pod.addresses:
                pod_destination(pod, e.address, e.port)
    for ref, port in sorted(declared):
        if (pod := index.by_ref.get(ref)) is not None:
            for address in pod.addresses:
                pod_destination(pod, address, port)
    # ... and every port a Service selecting it targets, ready or not: a StatefulSet's peers dial
    # each other by pod address before they are ready (a cluster forming, its readiness waiting
    # on it), on ports the pods need not declare; not in the endpoints yet, such a connection went
    # out as plaintext and a strict peer refused it (Linkerd resolves any pod IP to its identity).
    for svc in sorted(snapshot.services, key=lambda s: (s.namespace, s.name)):
        if svc.selector:
            for w in index.select(svc.namespace, svc.selector):
                for sp in svc.ports:
                    if (target := _target_port(sp.target_port, w)) is not None:
                        for address in w.addresses:
                            pod_destination(w, address, target)
    # Names are keys (deltas, hashes): one destination per name, the later one as the table's
    # address index always took (a Service listing port 80 twice, two files of one Workload; the
    # Kubernetes API refuses both, a directory of YAML does not).
    table = _canonical({d.name: d for d in destinations + services}.values())
    return OutboundTable(table, _outbound_digest(table))


def identities(snapshot: Snapshot) -> set[WorkloadId]:
    return {WorkloadId(w.namespace, w.service_account) for w in snapshot.workloads if w.meshed}


class InboundIndex:
    """What every identity's inbound compile looks up, indexed once per snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.namespaces = {n.name: n for n in snapshot.namespaces}
        self.workloads: dict[tuple[str, str], list[Workload]] = defaultdict(list)
        for w in sorted(snapshot.workloads, key=lambda w: w.ref):
            self.workloads[(w.namespace, w.service_account)].append(w)
        self.policies: dict[str, list[Authorization]] = defaultdict(list)
        for p in sorted(snapshot.policies, key=lambda p: p.ref):
            self.policies[p.namespace].append(p)


def compile_inbound(
    snapshot: Snapshot,
    identity: WorkloadId,
    trust_domain: str,
    mesh_default: DefaultPolicy,
    index: InboundIndex | None = None,
) -> InboundConfig:
    index = index or InboundIndex(snapshot)
    in_ns = index.policies.get(identity.namespace, [])
    workloads = []
    used: dict[str, Authorization] = {}
    for w in index.workloads.get((identity.namespace, identity.service_account), []):
        ns = index.namespaces.get(w.namespace)
        default = w.default_policy() or (ns.default_policy() if ns else None) or mesh_default
        labels = w.label_map
        selecting = [p for p in in_ns if p.selects(w.namespace, labels)]
        used.update((p.ref, p) for p in selecting)
        workloads.append(
            InboundWorkload(
                w.ref,
                w.addresses,
                default,
                tuple(p.ref for p in selecting),
                tuple(p.port for p in w.ports),
                tuple(sorted(w.opaque_ports)),
                w.node,
            )
        )
    config = InboundConfig(
        identity.spiffe_id(trust_domain), tuple(workloads), tuple(used[r] for r in sorted(used))
    )
    return InboundConfig(config.identity, config.workloads, config.policies, _digest(config))


@dataclass(frozen=True)
class SidecarConfig:
    """One sidecar's view: its own workload's inbound rules and the shared outbound table."""

    workload: str
    identity: SpiffeId
    default_policy: DefaultPolicy
    policies: tuple[Authorization, ...]
    ports: tuple[int, ...]
    outbound: OutboundTable
    version: str = ""
    opaque_ports: frozenset[int] = frozenset()  # inbound ports that skip protocol detection
    # Inbound ports a Service marks opaque (its ports' targets on this workload): what callers
    # through it send as opaque is carried so, as on the pod's own opaque ports; a caller that
    # parsed HTTP (through another Service) is still served HTTP (see proxy/inbound.py).
    service_opaque_ports: frozenset[int] = frozenset()

    def lookup_address(self, ip: str, port: int) -> Destination | None:
        return self.outbound._by_address.get((ip, port))

    def lookup_name(self, name: str) -> Destination | None:
        return self.outbound._by_name.get(name)


def sidecar_view(
    inbound: InboundConfig, outbound: OutboundTable, workload_ref: str, version: str
) -> SidecarConfig:
    me = next((w for w in inbound.workloads if w.ref == workload_ref), None)
    if me is None:
        raise CompileError(f"no workload {workload_ref} runs as {inbound.identity}")
    by_ref = {p.ref: p for p in inbound.policies}
    service_opaque = {  # (its pod destinations too: a not-ready pod is in no Service's endpoints)
        e.port for d in outbound.destinations if d.opaque for e in d.endpoints if e.workload == workload_ref
    }
    return SidecarConfig(
        workload_ref,
        inbound.identity,
        me.default_policy,
        tuple(by_ref[r] for r in me.policies if r in by_ref),
        me.ports,
        for_node(outbound, me.node),
        version,
        frozenset(me.opaque_ports),
        frozenset(service_opaque) - frozenset(me.opaque_ports),
    )


def compile_sidecar(
    snapshot: Snapshot, workload_ref: str, trust_domain: str, mesh_default: DefaultPolicy
) -> SidecarConfig:
    """Local mode: a sidecar compiling its own view from a directory."""
    me = next((w for w in snapshot.workloads if w.ref == workload_ref), None)
    if me is None:
        raise CompileError(f"no workload {workload_ref} in the mesh configuration")
    inbound = compile_inbound(
        snapshot, WorkloadId(me.namespace, me.service_account), trust_domain, mesh_default
    )
    outbound = compile_outbound(snapshot, trust_domain)
    return sidecar_view(inbound, outbound, workload_ref, f"{inbound.hash[:8]}.{outbound.hash[:8]}")
