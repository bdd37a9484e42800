"""Kubernetes objects (wire JSON) -> the controller's domain values, and the status it writes back.

Pure functions, no I/O: the Kubernetes source (``kubernetes.py``) feeds them what its watches saw.
A malformed object becomes an error line, never an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

from sidemesh.mesh.delivery import opaque_ports
from sidemesh.mesh.resources import (
    EndpointAddress,
    Namespace,
    ResourceError,
    Service,
    ServiceEndpoints,
    Snapshot,
    Workload,
    WorkloadPort,
    check_default_policy,
    parse_namespace,
    parse_service,
)
from sidemesh.policy import crd
from sidemesh.policy.model import Authorization, Mode

GROUP, VERSION, PLURAL = "sidemesh.io", "v1alpha1", "serviceauthorizations"
MESHED_ANNOTATION = "sidemesh.io/status"  # the injector records what it injected here
PROXY_CONTAINER = "sidemesh-proxy"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KINDS = ("namespaces", "pods", "services", "endpointslices", PLURAL)  # (identities come from pods)
ACCEPTED_MESSAGE = "valid; sent to the sidecars of the workloads it selects"

Obj = dict[str, Any]  # an object as the API server sends it (JSON)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Converted(Generic[T]):
    value: T | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    namespace: str
    service: str
    endpoints: tuple[EndpointAddress, ...]


class Condition(TypedDict):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


class AuthorizationStatus(TypedDict):
    conditions: list[Condition]
    selectedWorkloads: int


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A ServiceAuthorization as stored: what status write-back needs, and the parse outcome."""

    namespace: str
    name: str
    uid: str
    generation: int
    observed: AuthorizationStatus | None  # its status as last seen from the API server
    policy: Authorization | None
    error: str | None = None
    stand_in: Authorization | None = None  # invalid: what is enforced instead (crd.stand_in)
    # Conditions of other types, other writers': kept in what we write (a merge patch replaces
    # the whole list).
    other_conditions: tuple[Obj, ...] = ()

    @property
    def key(self) -> str:
        return self.uid or f"{self.namespace}/{self.name}"


def metadata_of(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def object_key(obj: Obj) -> str:
    meta = metadata_of(obj)
    return (
        f"{meta['namespace']}/{meta.get('name', '')}" if meta.get("namespace") else str(meta.get("name", ""))
    )


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in value.items())) if isinstance(value, dict) else ()


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _tcp(port: Obj) -> bool:
    return port.get("protocol") in (None, "TCP")


def workload_from_pod(pod: Obj) -> Converted[Workload]:
    """A running pod with an IP -> Workload; an invalid default-policy annotation is reported and
    enforced as deny (fail closed; the pod keeps its identity)."""
    meta, spec, status = metadata_of(pod), pod.get("spec") or {}, pod.get("status") or {}
    ref = f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
    if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
        return Converted(None)
    try:
        address = str(ipaddress.ip_address(status["podIP"]))
    except ValueError:
        return Converted(None, (f"Pod {ref}: status.podIP {status['podIP']!r} is not an IP address",))
    errors: list[str] = []
    others: list[str] = []  # dual stack: status.podIPs lists podIP first, then the other family's
    for entry in status.get("podIPs") or []:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            ip = str(ipaddress.ip_address(entry.get("ip")))
            if ip != address and ip not in others:
                others.append(ip)
    annotations = _pairs(meta.get("annotations"))
    check_default_policy(annotations, f"Pod {ref}", errors)
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    init = [c for c in spec.get("initContainers") or [] if isinstance(c, dict)]
    meshed = MESHED_ANNOTATION in dict(annotations) or any(
        c.get("name") == PROXY_CONTAINER for c in containers + init
    )
    # Native sidecars (init containers that keep running) serve too.
    serving = containers + [c for c in init if c.get("restartPolicy") == "Always"]
    ports: dict[int, WorkloadPort] = {}
    for c in serving:
        if c.get("name") == PROXY_CONTAINER:
            continue  # the sidecar's own ports are not the application's
        for p in c.get("ports") or []:
            if isinstance(p, dict) and isinstance(p.get("containerPort"), int) and _tcp(p):
                ports.setdefault(
                    p["containerPort"], WorkloadPort(p["containerPort"], str(p.get("name") or ""))
                )
    workload = Workload(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        service_account=str(spec.get("serviceAccountName") or "default"),
        address=address,
        labels=_pairs(meta.get("labels")),
        annotations=annotations,
        ports=tuple(sorted(ports.values(), key=lambda wp: wp.port)),
        meshed=meshed,
        opaque_ports=opaque_ports(annotations, f"Pod {ref}", errors),
        other_addresses=tuple(others),
        node=str(spec.get("nodeName") or ""),
    )
    return Converted(workload, tuple(errors))


def service_from(obj: Obj) -> Converted[Service]:
    """The same parser as local mode: TCP ports, named or numbered targetPort, headless -> no IP.
    An invalid delivery annotation (timeout, retries, ...) is ignored and reported; the Service
    stays."""
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if isinstance(labels, dict) and SERVICE_PROXY_NAME in labels:  # (any value, as kube-proxy's selector)
        return Converted(None)  # another service proxy implements it: kube-proxy leaves it too
    warnings: list[str] = []
    try:
        return Converted(parse_service(obj, warnings), tuple(warnings))
    except ResourceError as exc:
        return Converted(None, (str(exc),))


# A Service another service proxy implements (kube-proxy and the mesh pass its addresses on as
# they are, for that proxy to handle).
SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"


def namespace_from(obj: Obj) -> Converted[Namespace]:
    warnings: list[str] = []
    try:
        return Converted(parse_namespace(obj, warnings), tuple(warnings))
    except ResourceError as exc:
        return Converted(None, (str(exc),))


def slice_from(obj: Obj) -> Converted[SliceEndpoints]:
    """Ready endpoints of one EndpointSlice: each endpoint's address x each port, with the pod
    behind it. Only an endpoint's first address: the API defines no meaning for more, and
    kube-proxy reads only the first (the EndpointSlice controller writes exactly one)."""
    meta = metadata_of(obj)
    ns, service = str(meta.get("namespace", "default")), (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return Converted(None)  # not a service's slice, or FQDN addresses (not ours to route)
    ports = [
        (str(p.get("name") or ""), p["port"])
        for p in obj.get("ports") or []
        if isinstance(p, dict) and isinstance(p.get("port"), int) and _tcp(p)
    ]
    found: list[EndpointAddress] = []
    errors: list[str] = []
    family = 4 if obj.get("addressType") == "IPv4" else 6
    for ep in obj.get("endpoints") or []:
        if not isinstance(ep, dict):
            continue
        conditions = ep.get("conditions") or {}
        ready = conditions.get("ready") is not False  # ready: true or unknown (absent) counts as ready
        # (serving: absent means true, as the API says and kube-proxy reads it; terminating: absent
        # means false)
        if not ready and not (
            conditions.get("serving") is not False and conditions.get("terminating") is True
        ):
            continue  # not ready, and not a terminating endpoint still serving (the fallback)
        ref = ep.get("targetRef") or {}
        if ref.get("kind") == "Pod" and ref.get("namespace") not in (None, "", ns):
            # Another namespace's pod: Kubernetes' controllers never write one; by hand it would
            # claim that pod for this Service (its opaque ports, its traffic), the confused deputy
            # of CVE-2021-25740. Left out.
            errors.append(
                f"EndpointSlice {ns}/{meta.get('name', '')}: an endpoint's targetRef names a pod of "
                f"namespace {ref.get('namespace')!r}; left out"
            )
            continue
        workload = f"{ns}/{ref['name']}" if ref.get("kind") == "Pod" and ref.get("name") else None
        for address in (ep.get("addresses") or [])[:1]:
            # As a connection's original destination reads it (compressed IPv6); one Python cannot
            # read (10.1.2.03, stored before Kubernetes refused leading zeros) is left out.
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or ip.version != family:
                errors.append(
                    f"EndpointSlice {ns}/{meta.get('name', '')}: {address!r} is not an "
                    f"{obj.get('addressType')} address; left out"
                )
                continue
            node = str(ep.get("nodeName") or "")
            found.extend(EndpointAddress(str(ip), name, port, workload, ready, node) for name, port in ports)
    return Converted(SliceEndpoints(ns, str(service), tuple(found)), tuple(errors))


def observed_status(obj: Obj) -> AuthorizationStatus | None:
    """Our part of a ServiceAuthorization's status, in the shape we write it."""
    status = obj.get("status")
    if not isinstance(status, dict):
        return None
    conditions = [
        Condition(
            type="Accepted",
            status=str(c.get("status", "")),
            reason=str(c.get("reason", "")),
            message=str(c.get("message", "")),
            lastTransitionTime=str(c.get("lastTransitionTime", "")),
            observedGeneration=_int(c.get("observedGeneration"), -1),
        )
        for c in status.get("conditions") or []
        if isinstance(c, dict) and c.get("type") == "Accepted"
    ]
    selected = status.get("selectedWorkloads")
    return AuthorizationStatus(
        conditions=conditions, selectedWorkloads=selected if isinstance(selected, int) else -1
    )


def authorization_from(obj: Obj) -> Converted[PolicyObject]:
    """Parse with the shared CRD parser; an invalid policy is kept (its status says why) and
    reported, never fatal."""
    meta = metadata_of(obj)
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    generation = _int(meta.get("generation"), 0)
    raw_status = obj.get("status")
    status: Obj = raw_status if isinstance(raw_status, dict) else {}
    others = tuple(
        c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") != "Accepted"
    )
    base = PolicyObject(
        ns, name, str(meta.get("uid", "")), generation, observed_status(obj), None, other_conditions=others
    )
    try:
        doc = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, **obj}  # list items may omit them
        return Converted(dataclasses.replace(base, policy=crd.parse(doc)))
    except (crd.PolicyError, TypeError, AttributeError, ValueError) as exc:  # the last: shapes unforeseen
        where = (
            f"{crd.KIND} {exc}" if str(exc).startswith(f"{ns}/{name}:") else f"{crd.KIND} {ns}/{name}: {exc}"
        )
        stand_in = crd.stand_in(doc, str(exc))
        return Converted(dataclasses.replace(base, error=str(exc), stand_in=stand_in), (where,))


CONVERTERS: dict[str, Callable[[Obj], Converted[Any]]] = {
    "namespaces": namespace_from,
    "pods": workload_from_pod,
    "services": service_from,
    "endpointslices": slice_from,
    PLURAL: authorization_from,
}


def convert(kind: str, obj: Obj) -> Converted[Any]:
    """Never raises: an object we cannot read becomes an error line."""
    try:
        return CONVERTERS[kind](obj)
    except Exception as exc:  # a malformed object must not stop the others
        return Converted(None, (f"{kind} {object_key(obj)}: cannot be read: {exc!r}",))


def group_endpoints(slices: Iterable[SliceEndpoints]) -> tuple[ServiceEndpoints, ...]:
    """Merge the slices of each service (a service with only unready endpoints still appears,
    empty, so that nobody falls back to selector matching for it)."""
    merged: dict[tuple[str, str], set[EndpointAddress]] = defaultdict(set)
    for s in slices:
        merged[(s.namespace, s.service)].update(s.endpoints)
    return tuple(
        ServiceEndpoints(ns, svc, tuple(sorted(eps, key=lambda e: (e.address, e.port, e.port_name))))
        for (ns, svc), eps in sorted(merged.items())
    )


def assemble(entries: Mapping[str, Mapping[str, Converted[Any]]]) -> Snapshot:
    """Converted objects of every kind -> the Snapshot the controller compiles."""

    def values(kind: str, cls: type[T]) -> list[T]:
        return [e.value for e in entries.get(kind, {}).values() if isinstance(e.value, cls)]

    # An invalid policy is enforced as its stand-in: it allows nothing (fail closed).
    enforced = (p.policy or p.stand_in for p in values(PLURAL, PolicyObject))
    policies = [p for p in enforced if p is not None]
    return Snapshot(
        services=tuple(sorted(values("services", Service), key=lambda s: (s.namespace, s.name))),
        workloads=tuple(sorted(values("pods", Workload), key=lambda w: (w.namespace, w.name))),
        namespaces=tuple(sorted(values("namespaces", Namespace), key=lambda n: n.name)),
        policies=tuple(sorted(policies, key=lambda p: (p.namespace, p.name))),
        errors=tuple(sorted(err for by_key in entries.values() for e in by_key.values() for err in e.errors)),
        endpoints=group_endpoints(values("endpointslices", SliceEndpoints)),
    )


def selected_workloads(policy: Authorization, workloads: Iterable[Workload]) -> int:
    return sum(1 for w in workloads if w.meshed and policy.selects(w.namespace, w.label_map))


def desired_status(
    p: PolicyObject, selected: int, previous: AuthorizationStatus | None, now: dt.datetime
) -> AuthorizationStatus:
    """The status to write; lastTransitionTime moves only when the condition's status does."""
    status = "True" if p.policy is not None else "False"
    before = next((c for c in previous["conditions"] if c["type"] == "Accepted"), None) if previous else None
    since = (
        before["lastTransitionTime"]
        if before and before["status"] == status and before["lastTransitionTime"]
        else now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    condition = Condition(
        type="Accepted",
        status=status,
        reason="Accepted" if p.policy is not None else "Invalid",
        message=ACCEPTED_MESSAGE if p.policy is not None else _invalid_message(p),
        lastTransitionTime=since,
        observedGeneration=p.generation,
    )
    return AuthorizationStatus(conditions=[condition], selectedWorkloads=selected)


def _invalid_message(p: PolicyObject) -> str:
    tail = (
        "; until it is fixed it allows nothing to the workloads it selects"
        if p.stand_in is not None and p.stand_in.mode is Mode.ENFORCE
        else ""
    )
    return (p.error or "invalid")[: 32768 - len(tail)] + tail


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...): doubling, capped."""
    return 0.0 if failures <= 0 else min(maximum, initial * 2 ** min(failures - 1, 30))
