"""Kubernetes-style documents -> frozen domain values (no I/O).

Local mode describes pods with a small `Workload` kind (sidemesh.io/v1alpha1): its labels, service
account, address and ports. In a cluster the controller builds the same values from Pods.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from sidemesh.mesh.delivery import DEFAULT, DEFAULT_OPAQUE_PORTS, Delivery, opaque_ports, service_delivery
from sidemesh.policy import crd
from sidemesh.policy.model import Authorization, DefaultPolicy
from sidemesh.spiffe import SpiffeIdError, WorkloadId

DEFAULT_POLICY_ANNOTATION = "sidemesh.io/default-policy"


class ResourceError(ValueError):
    pass


def _default_policy(annotations: tuple[tuple[str, str], ...]) -> DefaultPolicy | None:
    """The annotation's value; an invalid one is deny (fail closed, as an invalid
    ServiceAuthorization: a typo must not open what it meant to close; parsers report it)."""
    value = dict(annotations).get(DEFAULT_POLICY_ANNOTATION)
    try:
        return DefaultPolicy(value) if value else None
    except ValueError:
        return DefaultPolicy.DENY


def check_default_policy(annotations: tuple[tuple[str, str], ...], where: str, warnings: list[str]) -> None:
    """Report an invalid default-policy annotation (the object stays, enforced as deny)."""
    value = dict(annotations).get(DEFAULT_POLICY_ANNOTATION)
    if value and value not in {d.value for d in DefaultPolicy}:  # (empty: as if absent)
        warnings.append(
            f"{where}: annotation {DEFAULT_POLICY_ANNOTATION}={value!r} is not one of deny, "
            "allow-authenticated, allow-all; enforced as deny until fixed"
        )


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    app_protocol: str = ""  # ports[].appProtocol


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    cluster_ips: tuple[str, ...] = ()  # all of them (dual stack); cluster_ip is the first
    delivery: Delivery = DEFAULT  # timeout, retries, opaque ports (from the annotations)
    # spec.internalTrafficPolicy: Local: a caller reaches the endpoints on its own node only
    node_local: bool = False
    # spec.sessionAffinity: ClientIP: a caller's connections and requests go to one endpoint
    client_ip_affinity: bool = False
    # spec.externalIPs and status.loadBalancer.ingress IPs: kube-proxy sends a pod's connections
    # to them straight to the endpoints, as to the ClusterIP
    external_ips: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return f"{self.name}.{self.namespace}"


@dataclass(frozen=True, slots=True)
class WorkloadPort:
    port: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    address: str
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    ports: tuple[WorkloadPort, ...] = ()
    meshed: bool = True
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS  # from sidemesh.io/opaque-ports
    other_addresses: tuple[str, ...] = ()  # a dual-stack pod's address of the other family
    node: str = ""  # the node it runs on (a Pod's spec.nodeName), "" when not known

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.other_addresses)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def default_policy(self) -> DefaultPolicy | None:
        return _default_policy(self.annotations)


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    annotations: tuple[tuple[str, str], ...] = ()

    def default_policy(self) -> DefaultPolicy | None:
        return _default_policy(self.annotations)


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """One endpoint of a service port, as an EndpointSlice lists it: ready, or (``ready`` False)
    still serving while it terminates, used only when a port has no ready endpoint (kube-proxy's
    ProxyTerminatingEndpoints)."""

    address: str
    port_name: str
    port: int
    workload: str | None  # namespace/name of the pod behind it, when known
    ready: bool = True
    node: str = ""  # the slice's nodeName for it, "" when not given


@dataclass(frozen=True, slots=True)
class ServiceEndpoints:
    namespace: str
    service: str
    endpoints: tuple[EndpointAddress, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the mesh knows at one moment. ``endpoints`` (from EndpointSlices) takes
    precedence over selector matching for the services it covers."""

    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    policies: tuple[Authorization, ...] = ()
    errors: tuple[str, ...] = field(default=())
    endpoints: tuple[ServiceEndpoints, ...] = ()


def _meta(doc: dict[str, Any], kind: str, namespaced: bool = True) -> tuple[str, str, dict[str, Any]]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ResourceError(f"{kind}: metadata.name is required")
    ns = meta.get("namespace", "default") if namespaced else ""
    if not isinstance(ns, str):
        raise ResourceError(f"{kind} {meta['name']}: metadata.namespace must be a string")
    return meta["name"], ns, meta


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ResourceError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _items(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ResourceError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _pairs(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ResourceError(f"{where} must map strings to strings")
    return tuple(sorted(value.items()))


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ResourceError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def _ip(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ResourceError(f"{where}: {value!r} is not an IP address") from None


def parse_service(doc: dict[str, Any], warnings: list[str] | None = None) -> Service:
    """Raises ResourceError for a Service that cannot be used; an invalid delivery annotation is
    only ignored, and reported in ``warnings``."""
    name, ns, meta = _meta(doc, "Service")
    spec = _obj(doc.get("spec"), f"Service {ns}/{name}: spec")
    ports = []
    for i, p in enumerate(_items(spec.get("ports"), f"Service {ns}/{name}: spec.ports")):
        where = f"Service {ns}/{name}: spec.ports[{i}]"
        if not isinstance(p, dict):
            raise ResourceError(f"{where} must be an object")
        if p.get("protocol", "TCP") != "TCP":
            continue
        port = _port(p.get("port"), where)
        target = p.get("targetPort", port)
        if not isinstance(target, str):
            target = _port(target, f"{where}.targetPort")
        ports.append(ServicePort(port, target, str(p.get("name", "")), str(p.get("appProtocol") or "")))
    raw = [spec.get("clusterIP"), *_items(spec.get("clusterIPs"), f"Service {ns}/{name}: spec.clusterIPs")]
    ips: list[str] = []
    for value in raw:
        if value not in (None, "", "None"):
            ip = _ip(value, f"Service {ns}/{name}: spec.clusterIP(s)")
            if ip not in ips:
                ips.append(ip)
    annotations = _pairs(meta.get("annotations"), f"Service {ns}/{name}: metadata.annotations")
    delivery = service_delivery(annotations, f"Service {ns}/{name}", [] if warnings is None else warnings)
    if (opaque := _opaque_ports(ports, delivery)) != delivery.opaque_ports:
        delivery = dataclasses.replace(delivery, opaque_ports=opaque)
    return Service(
        name,
        ns,
        _pairs(spec.get("selector"), f"Service {ns}/{name}: spec.selector"),
        tuple(ports),
        ips[0] if ips else None,
        annotations,
        tuple(ips),
        delivery,
        _traffic_policy(spec.get("internalTrafficPolicy"), f"Service {ns}/{name}"),
        _session_affinity(spec.get("sessionAffinity"), f"Service {ns}/{name}"),
        _external_ips(doc, spec, f"Service {ns}/{name}", ips, [] if warnings is None else warnings),
    )


def _external_ips(
    doc: dict[str, Any], spec: dict[str, Any], where: str, cluster: list[str], warnings: list[str]
) -> tuple[str, ...]:
    """spec.externalIPs and the load balancer's ingress IPs (not those with ipMode Proxy: a proxy
    between them keeps kube-proxy out, as it keeps the mesh out), each once; one that cannot be
    read is left out with a warning (the Service stays: an old object may hold an address an
    older API server took)."""
    raw = spec.get("externalIPs")
    found = list(raw) if isinstance(raw, list) else []
    status = doc.get("status")
    balancer = status.get("loadBalancer") if isinstance(status, dict) else None
    ingress = balancer.get("ingress") if isinstance(balancer, dict) else None
    for entry in ingress if isinstance(ingress, list) else ():
        if isinstance(entry, dict) and entry.get("ip") and entry.get("ipMode") != "Proxy":
            found.append(entry["ip"])
    out: list[str] = []
    for value in found:
        try:
            ip = _ip(value, f"{where}: an external or load balancer IP")
        except ResourceError as exc:
            warnings.append(f"{exc}; left out")
            continue
        if ip not in out and ip not in cluster:
            out.append(ip)
    return tuple(out)


# What a port's appProtocol or name says, as Istio's explicit protocol selection reads them (the
# value, or its part before the first "-": `tcp-mysql`, `grpc-web`): Istio's protocols that are
# not HTTP make the port opaque; HTTP's keep detection, also on a port of the default list; any
# other value says nothing (detection, as Istio's "auto").
_OPAQUE_PROTOCOLS = frozenset({"tcp", "tls", "mysql", "mongo", "redis"})
_HTTP_PROTOCOLS = frozenset({"http", "http2", "https", "grpc", "h2c", "ws", "wss"})


def _protocol(text: str) -> str:
    return text.lower().removeprefix("kubernetes.io/").split("-", 1)[0]


def _declared(sp: ServicePort) -> bool | None:
    """What the port says of its protocol: True not HTTP (opaque), False HTTP (detected), None
    nothing. ``appProtocol`` first, then the name."""
    for said in (sp.app_protocol, sp.name):
        protocol = _protocol(said) if said else ""
        if protocol in _OPAQUE_PROTOCOLS:
            return True
        if protocol in _HTTP_PROTOCOLS:
            return False
    return None


def _opaque_ports(ports: list[ServicePort], delivery: Delivery) -> frozenset[int]:
    """The Service's opaque ports: its annotation (else the default list), and what each port says
    of itself (a port that says HTTP is detected even on the default list, unless the annotation
    names it); with no annotation, a port whose numeric target is on the default list, as the
    pod's own port is (a Service on 3307 in front of MySQL's 3306 waited out the detection
    timeout on the caller's side)."""
    default = delivery.opaque_ports is DEFAULT_OPAQUE_PORTS
    opaque = set(delivery.opaque_ports)
    for sp in ports:
        said = _declared(sp)
        if said:
            opaque.add(sp.port)
        elif said is False and default:
            opaque.discard(sp.port)
        elif said is None and default and sp.target_port in DEFAULT_OPAQUE_PORTS:
            opaque.add(sp.port)
    return frozenset(opaque)


def _session_affinity(value: Any, where: str) -> bool:
    """spec.sessionAffinity: True for ClientIP (absent: None, as the API server defaults it)."""
    if value in (None, "None"):
        return False
    if value == "ClientIP":
        return True
    raise ResourceError(f"{where}: spec.sessionAffinity {value!r} is not None or ClientIP")


def _traffic_policy(value: Any, where: str) -> bool:
    """spec.internalTrafficPolicy: True for Local (absent: Cluster, as the API server defaults it)."""
    if value in (None, "Cluster"):
        return False
    if value == "Local":
        return True
    raise ResourceError(f"{where}: spec.internalTrafficPolicy {value!r} is not Cluster or Local")


def parse_workload(doc: dict[str, Any], warnings: list[str] | None = None) -> Workload:
    name, ns, meta = _meta(doc, "Workload")
    where = f"Workload {ns}/{name}"
    spec = _obj(doc.get("spec"), f"{where}: spec")
    ports = tuple(
        WorkloadPort(
            _port(p.get("port") if isinstance(p, dict) else p, f"{where}: spec.ports[{i}]"),
            str(p.get("name", "")) if isinstance(p, dict) else "",
        )
        for i, p in enumerate(_items(spec.get("ports"), f"{where}: spec.ports"))
    )
    annotations = _pairs(meta.get("annotations"), f"{where}: metadata.annotations")
    check_default_policy(annotations, where, [] if warnings is None else warnings)
    address, *others = _workload_addresses(spec, where)
    account = spec.get("serviceAccount") or "default"
    if not isinstance(account, str):
        raise ResourceError(f"{where}: spec.serviceAccount {account!r} is not a name")
    try:  # (a name that cannot be a SPIFFE ID's took the whole compile down, in every sidecar)
        WorkloadId(ns, account)
    except SpiffeIdError as exc:
        raise ResourceError(f"{where}: {exc}") from None
    meshed = spec.get("meshed")
    meshed = True if meshed is None else meshed  # (null is unset, as Kubernetes reads it)
    if not isinstance(meshed, bool):  # ("false" as a string was read as meshed)
        raise ResourceError(f"{where}: spec.meshed {meshed!r} is not true or false")
    return Workload(
        name,
        ns,
        account,
        address,
        _pairs(meta.get("labels"), f"{where}: metadata.labels"),
        annotations,
        ports,
        meshed,
        opaque_ports(annotations, where, [] if warnings is None else warnings),
        tuple(others),
        str(spec.get("node") or ""),
    )


def _workload_addresses(spec: dict[str, Any], where: str) -> list[str]:
    """A Workload's pod IPs, primary first: ``address``, or ``addresses`` for a dual-stack pod
    (as a Pod's ``podIP`` and ``podIPs``: at most one of each family, the first being ``address``
    when both are given)."""
    if spec.get("addresses") is None:
        return [_ip(spec.get("address"), f"{where}: spec.address")]
    listed = _items(spec.get("addresses"), f"{where}: spec.addresses")
    ips = [_ip(value, f"{where}: spec.addresses[{i}]") for i, value in enumerate(listed)]
    families = [ipaddress.ip_address(ip).version for ip in ips]
    if not ips or len(ips) > 2 or len(set(families)) != len(families):
        raise ResourceError(
            f"{where}: spec.addresses must hold one or two addresses, at most one IPv4 and one IPv6 "
            f"(got {ips})"
        )
    if spec.get("address") is not None and _ip(spec.get("address"), f"{where}: spec.address") != ips[0]:
        raise ResourceError(
            f"{where}: spec.address {spec.get('address')!r} must be the first of spec.addresses {ips}, "
            "as a Pod's podIP is the first of its podIPs (or leave spec.address out)"
        )
    return ips


def parse_namespace(doc: dict[str, Any], warnings: list[str] | None = None) -> Namespace:
    name, _, meta = _meta(doc, "Namespace", namespaced=False)
    where = f"Namespace {name}"
    warnings = [] if warnings is None else warnings
    raw = meta.get("annotations")
    try:
        annotations = _pairs(raw, f"{where}: metadata.annotations")
    except ResourceError as exc:
        # The namespace stays, closed where it cannot be read: dropping it dropped its
        # default-policy (deny became the mesh default) for one unrelated annotation's number.
        readable = (
            {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(raw, dict)
            else {}
        )
        unknown = not isinstance(raw, dict) or (
            DEFAULT_POLICY_ANNOTATION in raw and DEFAULT_POLICY_ANNOTATION not in readable
        )
        if unknown:
            readable[DEFAULT_POLICY_ANNOTATION] = DefaultPolicy.DENY.value
        warnings.append(
            f"{exc}; "
            + (
                f"its {DEFAULT_POLICY_ANNOTATION} cannot be read: enforced as deny until fixed"
                if unknown
                else "the readable ones apply"
            )
        )
        annotations = tuple(sorted(readable.items()))
    check_default_policy(annotations, where, warnings)
    return Namespace(name, annotations)


def _one_per_name(policies: list[Authorization], errors: list[str]) -> list[Authorization]:
    """One valid object per name, the last, as `kubectl apply` of the files would leave (two of one
    name were both kept: one's selector enforced with the other's rules). An invalid copy, which
    the API server would refuse, replaces nothing: its stand-in stays too, under a name of its own,
    allowing nothing to the workloads it selects (fail closed)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(policies):
        groups.setdefault((p.namespace, p.name), []).append(i)
    keep: dict[int, Authorization] = {}
    for (namespace, name), members in groups.items():
        if len(members) == 1:
            keep[members[0]] = policies[members[0]]
            continue
        valid = [i for i in members if not policies[i].invalid]
        if valid:
            keep[valid[-1]] = policies[valid[-1]]
        invalid = [i for i in members if policies[i].invalid]
        for k, i in enumerate(invalid):
            renamed = name if not valid and k == len(invalid) - 1 else f"{name} (invalid copy {k + 1})"
            keep[i] = dataclasses.replace(policies[i], name=renamed)
        errors.append(
            f"ServiceAuthorization {namespace}/{name} is defined {len(members)} times: the last valid one "
            "is used (an invalid copy allows nothing to the workloads it selects)"
        )
    return [keep[i] for i in sorted(keep)]


def build_snapshot(docs: list[tuple[str, Any]]) -> Snapshot:
    """Parse documents (source, doc); a bad document becomes an error line, never an exception."""
    services: list[Service] = []
    workloads: list[Workload] = []
    namespaces: list[Namespace] = []
    policies: list[Authorization] = []
    errors: list[str] = []
    for source, doc in docs:
        if doc is None:
            continue
        try:
            if not isinstance(doc, dict):
                raise ResourceError("a document must be an object")
            kind, api = doc.get("kind"), doc.get("apiVersion")
            warnings: list[str] = []
            if kind == "Service" and api == "v1":
                services.append(parse_service(doc, warnings))
            elif kind == "Workload" and api == crd.API_VERSION:
                workloads.append(parse_workload(doc, warnings))
            elif kind == "Namespace" and api == "v1":
                namespaces.append(parse_namespace(doc, warnings))
            elif kind == crd.KIND:
                try:
                    # (no namespace: "default", as for the other kinds and as kubectl applies it)
                    policies.append(crd.parse(doc, default_namespace="default"))
                except crd.PolicyError as exc:
                    stand_in = crd.stand_in(doc, str(exc), default_namespace="default", unnamed=source)
                    if stand_in is not None:
                        policies.append(stand_in)  # it allows nothing until fixed (fail closed)
                    raise
            elif isinstance(api, str) and api.split("/")[0] == crd.API_VERSION.split("/")[0]:
                # (a misspelt kind of ours was ignored without a word, and a misspelt
                # ServiceAuthorization let the default policy decide)
                warnings.append(
                    f"kind {kind!r} of {api} is not one Sidemesh reads (Workload, {crd.KIND}): ignored"
                )
            # Other kinds are not ours: ignored.
            errors.extend(f"{source}: {w}" for w in warnings)
        except (ResourceError, crd.PolicyError) as exc:
            errors.append(f"{source}: {exc}")
        except (TypeError, AttributeError, ValueError) as exc:  # a shape no check above anticipated
            stand_in = (
                crd.stand_in(doc, str(exc), default_namespace="default", unnamed=source)
                if isinstance(doc, dict) and doc.get("kind") == crd.KIND
                else None
            )
            if stand_in is not None:
                policies.append(stand_in)
            errors.append(
                f"{source}: malformed {doc.get('kind') if isinstance(doc, dict) else 'document'}: {exc}"
            )
    policies = _one_per_name(policies, errors)
    return Snapshot(tuple(services), tuple(workloads), tuple(namespaces), tuple(policies), tuple(errors))
