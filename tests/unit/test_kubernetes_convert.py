"""Kubernetes objects (wire JSON) -> mesh values, and the status the controller writes back."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any

import pytest

from controller.sources.kube_convert import (
    ACCEPTED_MESSAGE,
    AuthorizationStatus,
    Condition,
    Converted,
    PolicyObject,
    SliceEndpoints,
    assemble,
    authorization_from,
    backoff_delay,
    convert,
    desired_status,
    group_endpoints,
    namespace_from,
    observed_status,
    selected_workloads,
    service_from,
    slice_from,
    workload_from_pod,
)
from sidemesh.mesh.delivery import DEFAULT_OPAQUE_PORTS, Delivery
from sidemesh.mesh.resources import (
    EndpointAddress,
    Namespace,
    Service,
    ServiceEndpoints,
    ServicePort,
    Workload,
    WorkloadPort,
)
from sidemesh.policy.model import Authorization, DefaultPolicy, Rule, Source
from tests.support.kube_watch_api import authorization, endpoint_slice, pod, service

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
STATUS = {"sidemesh.io/status": '{"version":"0.1.0"}'}


def with_(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``obj`` with ``value`` at the dotted ``path`` (None removes it)."""
    out: dict[str, Any] = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def proxy(name: str = "sidemesh-proxy", **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": "sidemesh:0.1",
        "ports": [{"name": "admin", "containerPort": 15020}],
        **more,
    }


CART = pod("cart-1", ip="10.0.0.2", labels={"app": "cart"}, sa="cart")
CART_WORKLOAD = Workload(
    "cart-1",
    "shop",
    "cart",
    "10.0.0.2",
    (("app", "cart"),),
    tuple(STATUS.items()),
    (WorkloadPort(8080, "http"),),
    True,
)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(CART, CART_WORKLOAD, id="meshed-by-annotation"),
        pytest.param(
            with_(CART, "metadata.annotations", {}),
            Workload(
                "cart-1",
                "shop",
                "cart",
                "10.0.0.2",
                (("app", "cart"),),
                (),
                (WorkloadPort(8080, "http"),),
                False,
            ),
            id="not-meshed",
        ),
        pytest.param(
            with_(
                with_(CART, "metadata.annotations", {}),
                "spec.containers",
                [*CART["spec"]["containers"], proxy()],
            ),
            Workload(
                "cart-1",
                "shop",
                "cart",
                "10.0.0.2",
                (("app", "cart"),),
                (),
                (WorkloadPort(8080, "http"),),
                True,
            ),
            id="meshed-by-sidecar-container-whose-ports-are-not-the-apps",
        ),
        pytest.param(
            with_(
                with_(CART, "metadata.annotations", {}),
                "spec.initContainers",
                [
                    proxy(restartPolicy="Always"),
                    {"name": "sidecar-log", "restartPolicy": "Always", "ports": [{"containerPort": 9000}]},
                ],
            ),
            Workload(
                "cart-1",
                "shop",
                "cart",
                "10.0.0.2",
                (("app", "cart"),),
                (),
                (WorkloadPort(8080, "http"), WorkloadPort(9000, "")),
                True,
            ),
            id="meshed-by-native-sidecar-other-native-sidecars-serve",
        ),
        pytest.param(
            with_(CART, "spec.initContainers", [{"name": "migrate", "ports": [{"containerPort": 5432}]}]),
            CART_WORKLOAD,
            id="plain-init-container-ports-are-not-served",
        ),
        pytest.param(
            with_(
                CART,
                "spec.containers",
                [
                    {
                        "name": "app",
                        "ports": [
                            {"name": "http", "containerPort": 8080},
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        ],
                    },
                    {"name": "copy", "ports": [{"name": "again", "containerPort": 8080}]},
                ],
            ),
            CART_WORKLOAD,
            id="tcp-ports-only-once-each",
        ),
        pytest.param(
            with_(CART, "spec.serviceAccountName", None),
            Workload(
                "cart-1",
                "shop",
                "default",
                "10.0.0.2",
                (("app", "cart"),),
                tuple(STATUS.items()),
                (WorkloadPort(8080, "http"),),
                True,
            ),
            id="default-service-account",
        ),
        pytest.param(
            with_(CART, "status.podIP", "fd00:0:0::0002"),
            Workload(
                "cart-1",
                "shop",
                "cart",
                "fd00::2",
                (("app", "cart"),),
                tuple(STATUS.items()),
                (WorkloadPort(8080, "http"),),
                True,
            ),
            id="ipv6-canonical",
        ),
        pytest.param(with_(CART, "status.podIP", None), None, id="no-ip-yet"),
        pytest.param(with_(CART, "status.phase", "Succeeded"), None, id="succeeded"),
        pytest.param(with_(CART, "status.phase", "Failed"), None, id="failed"),
    ],
)
def test_pod_to_workload(obj: dict[str, Any], expected: Workload | None) -> None:
    assert workload_from_pod(obj) == Converted(expected)


def test_pod_with_an_invalid_default_policy_keeps_its_identity_and_is_enforced_as_deny() -> None:
    """Fail closed, as an invalid ServiceAuthorization: the annotation was dropped, and a pod meant
    to be closed (``Deny``, a typo of ``deny``) fell back to its namespace's, often more open."""
    obj = with_(CART, "metadata.annotations", {**STATUS, "sidemesh.io/default-policy": "Deny"})
    converted = workload_from_pod(obj)
    assert converted.value is not None and converted.value.ref == CART_WORKLOAD.ref
    assert converted.value.default_policy() is DefaultPolicy.DENY
    assert converted.errors == (
        "Pod shop/cart-1: annotation sidemesh.io/default-policy='Deny' is not one of deny, "
        "allow-authenticated, allow-all; enforced as deny until fixed",
    )


def test_namespace_with_an_invalid_default_policy_is_kept_and_enforced_as_deny() -> None:
    converted = namespace_from(
        {"metadata": {"name": "shop", "annotations": {"sidemesh.io/default-policy": "Deny"}}}
    )
    assert converted.value is not None and converted.value.default_policy() is DefaultPolicy.DENY
    assert "enforced as deny until fixed" in converted.errors[0]


def test_a_dual_stack_pod_has_both_addresses() -> None:
    obj = with_(CART, "status.podIPs", [{"ip": "10.0.0.2"}, {"ip": "fd00:0::2"}, {"ip": "garbage"}, "x"])
    workload = workload_from_pod(obj).value
    assert workload is not None and workload.addresses == ("10.0.0.2", "fd00::2")


def test_pod_with_a_garbage_ip_is_an_error() -> None:
    converted = workload_from_pod(with_(CART, "status.podIP", "ten.0.0.1"))
    assert converted.value is None and "status.podIP 'ten.0.0.1' is not an IP address" in converted.errors[0]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            service("cart"),
            Service(
                "cart",
                "shop",
                (("app", "cart"),),
                (ServicePort(80, "http", "http"),),
                "10.96.0.10",
                cluster_ips=("10.96.0.10",),
            ),
            id="named-target-port",
        ),
        pytest.param(
            service("cart", target=8080, cluster_ip="None"),
            Service("cart", "shop", (("app", "cart"),), (ServicePort(80, 8080, "http"),), None),
            id="headless-numbered-target",
        ),
        pytest.param(
            with_(
                with_(
                    service("dns"),
                    "spec.ports",
                    [{"name": "udp", "port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 53}],
                ),
                "spec.selector",
                None,
            ),
            Service(  # (a port named tcp says its protocol: opaque, as Istio reads port names)
                "dns",
                "shop",
                (),
                (ServicePort(53, 53, "tcp"),),
                "10.96.0.10",
                cluster_ips=("10.96.0.10",),
                delivery=Delivery(opaque_ports=DEFAULT_OPAQUE_PORTS | {53}),
            ),
            id="tcp-only-no-selector-target-defaults-to-port",
        ),
    ],
)
def test_service(obj: dict[str, Any], expected: Service) -> None:
    assert service_from(obj) == Converted(expected)


def test_service_that_cannot_be_read_is_an_error() -> None:
    converted = service_from(with_(service("cart"), "spec.clusterIP", "not-an-ip"))
    assert converted.value is None and "spec.clusterIP" in converted.errors[0]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            endpoint_slice(
                "cart-a",
                "cart",
                pods=(
                    ("cart-1", "10.0.0.2", True),
                    ("cart-2", "10.0.0.3", None),
                    ("cart-3", "10.0.0.4", False),
                ),
            ),
            SliceEndpoints(
                "shop",
                "cart",
                (
                    EndpointAddress("10.0.0.2", "http", 8080, "shop/cart-1"),
                    EndpointAddress("10.0.0.3", "http", 8080, "shop/cart-2"),
                ),
            ),
            id="ready-or-unknown-only",
        ),
        pytest.param(
            with_(
                with_(
                    endpoint_slice("web-a", "web"),
                    "endpoints",
                    [{"addresses": ["10.0.0.5", "10.0.0.6"], "targetRef": {"kind": "Node", "name": "n1"}}],
                ),
                "ports",
                [
                    {"name": "http", "port": 80},
                    {"name": "grpc", "port": 9090, "protocol": "TCP"},
                    {"name": "q", "port": 99, "protocol": "UDP"},
                    {"name": "all", "port": None},
                ],
            ),
            SliceEndpoints(
                "shop",
                "web",
                (
                    EndpointAddress("10.0.0.5", "http", 80, None),
                    EndpointAddress("10.0.0.5", "grpc", 9090, None),
                ),
            ),
            id="the-first-address-each-tcp-port-no-pod",  # (kube-proxy reads no other address)
        ),
        pytest.param(
            endpoint_slice("cart-a", "cart", pods=()), SliceEndpoints("shop", "cart", ()), id="none-ready"
        ),
        pytest.param(
            with_(
                endpoint_slice("cart-a", "cart"),
                "endpoints",
                [
                    {
                        "addresses": ["10.0.0.2"],
                        "conditions": {"ready": False, "serving": True, "terminating": True},
                    },
                    {
                        "addresses": ["10.0.0.3"],
                        "conditions": {"ready": False, "serving": False, "terminating": True},
                    },
                    {"addresses": ["10.0.0.4"], "conditions": {"ready": False, "serving": True}},
                    # serving absent means serving (the API; a third-party slice controller's)
                    {"addresses": ["10.0.0.5"], "conditions": {"ready": False, "terminating": True}},
                ],
            ),
            SliceEndpoints(
                "shop",
                "cart",
                (
                    EndpointAddress("10.0.0.2", "http", 8080, None, ready=False),
                    EndpointAddress("10.0.0.5", "http", 8080, None, ready=False),
                ),
            ),
            id="terminating-but-serving-kept-as-not-ready",
        ),
        pytest.param(
            with_(endpoint_slice("x", "cart"), "metadata.labels", {}), None, id="not-a-services-slice"
        ),
        pytest.param(with_(endpoint_slice("x", "cart"), "addressType", "FQDN"), None, id="fqdn"),
    ],
)
def test_endpoint_slice(obj: dict[str, Any], expected: SliceEndpoints | None) -> None:
    assert slice_from(obj) == Converted(expected)


def test_slices_of_one_service_merge() -> None:
    a, b = (
        EndpointAddress("10.0.0.2", "http", 8080, "shop/a"),
        EndpointAddress("10.0.0.1", "http", 8080, "shop/b"),
    )
    grouped = group_endpoints(
        [
            SliceEndpoints("shop", "cart", (a,)),
            SliceEndpoints("shop", "web", ()),
            SliceEndpoints("shop", "cart", (b, a)),
        ]
    )
    assert grouped == (ServiceEndpoints("shop", "cart", (b, a)), ServiceEndpoints("shop", "web", ()))


@pytest.mark.parametrize(
    ("annotations", "expected", "error"),
    [
        (
            {"sidemesh.io/default-policy": "deny"},
            Namespace("shop", (("sidemesh.io/default-policy", "deny"),)),
            None,
        ),
        (None, Namespace("shop"), None),
        (  # empty: as if absent, not reported (nor enforced) as invalid
            {"sidemesh.io/default-policy": ""},
            Namespace("shop", (("sidemesh.io/default-policy", ""),)),
            None,
        ),
        (
            {"sidemesh.io/default-policy": "sometimes"},
            Namespace("shop", (("sidemesh.io/default-policy", "sometimes"),)),  # enforced as deny
            "is not one of deny",
        ),
    ],
)
def test_namespace(annotations: dict[str, str] | None, expected: Namespace | None, error: str | None) -> None:
    obj: dict[str, Any] = {
        "metadata": {"name": "shop", **({"annotations": annotations} if annotations else {})}
    }
    converted = namespace_from(obj)
    assert converted.value == expected
    assert (error in converted.errors[0]) if error else converted.errors == ()


ALLOW = Authorization("allow", "shop", (("app", "cart"),), (Rule((Source(service_account="frontend"),)),))


@pytest.mark.parametrize(
    ("obj", "policy", "error"),
    [
        pytest.param(authorization("allow"), ALLOW, None, id="valid"),
        pytest.param(
            {k: v for k, v in authorization("allow").items() if k not in ("kind", "apiVersion")},
            ALLOW,
            None,
            id="list-item-without-kind",
        ),
        pytest.param(
            authorization("allow", spec={"rules": [{"from": []}]}),
            None,
            "ServiceAuthorization shop/allow: spec.rules[0].from: must not be empty",
            id="invalid-names-the-object",
        ),
        pytest.param(
            authorization("allow", spec={"selector": {"app": "cart"}}),
            None,
            "ServiceAuthorization shop/allow: spec.selector: unknown field(s) app (allowed: matchExpressions, matchLabels)",
            id="selector-without-matchlabels",
        ),
    ],
)
def test_authorization(obj: dict[str, Any], policy: Authorization | None, error: str | None) -> None:
    obj = with_(with_(obj, "metadata.uid", "u-1"), "metadata.generation", 3)
    converted = authorization_from(obj)
    assert converted.value is not None
    assert (converted.value.policy, converted.value.uid, converted.value.generation) == (policy, "u-1", 3)
    assert converted.errors == ((error,) if error else ())
    assert converted.value.error == (error.removeprefix("ServiceAuthorization ") if error else None)


def test_an_object_that_breaks_a_converter_is_an_error_not_a_crash() -> None:
    converted = convert("pods", {"metadata": {"name": "x", "namespace": "shop"}, "status": "weird"})
    assert converted.value is None and converted.errors[0].startswith("pods shop/x: cannot be read")


def test_assemble_sorts_and_collects_errors() -> None:
    entries: dict[str, dict[str, Converted[Any]]] = {
        "pods": {
            k: workload_from_pod(pod(k, ip=ip))
            for k, ip in [("b", "10.0.0.2"), ("a", "10.0.0.1"), ("c", None)]
        },
        "services": {"s": service_from(service("cart"))},
        "endpointslices": {"e": slice_from(endpoint_slice("e", "cart"))},
        "serviceauthorizations": {
            "ok": authorization_from(authorization("allow")),
            "bad": authorization_from(authorization("bad", spec={"rules": 1})),
        },
        "namespaces": {"shop": namespace_from({"metadata": {"name": "shop"}})},
    }
    snapshot = assemble(entries)
    assert [w.name for w in snapshot.workloads] == ["a", "b"]
    # The invalid policy is enforced as its stand-in: no rules, it allows nothing (fail closed).
    assert [(p.name, bool(p.rules), p.invalid) for p in snapshot.policies] == [
        ("allow", True, ""),
        ("bad", False, "shop/bad: spec.rules: must be a list, got int"),
    ]
    assert [s.name for s in snapshot.services] == ["cart"]
    assert snapshot.endpoints == (ServiceEndpoints("shop", "cart", ()),)
    assert snapshot.errors == ("ServiceAuthorization shop/bad: spec.rules: must be a list, got int",)


def test_selected_workloads_counts_meshed_pods_of_the_policys_namespace() -> None:
    workloads = [
        workload_from_pod(pod("a", labels={"app": "cart"})).value,
        workload_from_pod(pod("b", labels={"app": "cart"}, meshed=False)).value,
        workload_from_pod(pod("c", "other", labels={"app": "cart"})).value,
        workload_from_pod(pod("d", labels={"app": "web"})).value,
    ]
    assert selected_workloads(ALLOW, [w for w in workloads if w is not None]) == 1


def condition(
    status: str, since: str, reason: str = "Accepted", message: str = ACCEPTED_MESSAGE, generation: int = 1
) -> Condition:
    return Condition(
        type="Accepted",
        status=status,
        reason=reason,
        message=message,
        lastTransitionTime=since,
        observedGeneration=generation,
    )


VALID = PolicyObject("shop", "allow", "u-1", 1, None, ALLOW)
INVALID = dataclasses.replace(authorization_from(authorization("bad", spec={"rules": 1})).value, generation=2)
EARLIER = "2025-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("policy", "selected", "previous", "expected"),
    [
        pytest.param(
            VALID,
            2,
            None,
            AuthorizationStatus(conditions=[condition("True", "2025-03-01T12:00:00Z")], selectedWorkloads=2),
            id="first",
        ),
        pytest.param(
            VALID,
            3,
            AuthorizationStatus(conditions=[condition("True", EARLIER)], selectedWorkloads=2),
            AuthorizationStatus(conditions=[condition("True", EARLIER)], selectedWorkloads=3),
            id="same-condition-keeps-its-time",
        ),
        pytest.param(
            INVALID,
            0,
            AuthorizationStatus(conditions=[condition("True", EARLIER)], selectedWorkloads=2),
            AuthorizationStatus(
                conditions=[
                    condition(
                        "False",
                        "2025-03-01T12:00:00Z",
                        "Invalid",
                        "shop/bad: spec.rules: must be a list, got int; until it is fixed it allows nothing"
                        " to the workloads it selects",
                        2,
                    )
                ],
                selectedWorkloads=0,
            ),
            id="transition",
        ),
    ],
)
def test_desired_status(
    policy: PolicyObject, selected: int, previous: AuthorizationStatus | None, expected: AuthorizationStatus
) -> None:
    assert desired_status(policy, selected, previous, NOW) == expected


def test_observed_status_reads_back_what_we_write_and_tells_apart_what_we_did_not() -> None:
    written = desired_status(VALID, 2, None, NOW)
    obj = {"status": {**written, "conditions": [*written["conditions"], {"type": "Other", "status": "True"}]}}
    assert observed_status(obj) == written
    assert observed_status({}) is None
    assert observed_status({"status": {"conditions": [{"type": "Accepted", "status": "True"}]}}) != written


@pytest.mark.parametrize(
    ("failures", "expected"), [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (1000, 30.0)]
)
def test_backoff_doubles_and_is_capped(failures: int, expected: float) -> None:
    assert backoff_delay(failures, 0.5, 30.0) == expected


def test_service_delivery_annotations_become_its_delivery_settings() -> None:
    annotations = {
        "sidemesh.io/timeout": "1500ms",
        "sidemesh.io/retries": "3",
        "sidemesh.io/retry-non-idempotent": "true",
        "sidemesh.io/opaque-ports": "80",
    }
    converted = service_from(with_(service("cart"), "metadata.annotations", annotations))
    assert converted.errors == ()
    assert converted.value is not None
    assert converted.value.delivery == Delivery(1.5, 3, True, frozenset({80}))


def test_an_invalid_delivery_annotation_is_reported_and_ignored_and_the_service_stays() -> None:
    annotations = {"sidemesh.io/timeout": "soon", "sidemesh.io/retries": "2"}
    converted = service_from(with_(service("cart"), "metadata.annotations", annotations))
    assert converted.value is not None and converted.value.delivery == Delivery(None, 2)
    assert converted.errors == (
        "Service shop/cart: annotation sidemesh.io/timeout: 'soon' is not a duration "
        "(examples: 2s, 500ms, 1m30s; 0s for none); annotation ignored",
    )


def test_pod_opaque_ports_annotation() -> None:
    obj = with_(CART, "metadata.annotations", {**STATUS, "sidemesh.io/opaque-ports": "8080, 9000"})
    converted = workload_from_pod(obj)
    assert converted.errors == ()
    assert converted.value is not None and converted.value.opaque_ports == frozenset({8080, 9000})
    bad = workload_from_pod(with_(CART, "metadata.annotations", {**STATUS, "sidemesh.io/opaque-ports": "db"}))
    assert bad.value is not None and bad.value.opaque_ports == DEFAULT_OPAQUE_PORTS
    assert bad.errors == (
        "Pod shop/cart-1: annotation sidemesh.io/opaque-ports: 'db' is not a port number "
        "(1-65535; ranges are not supported); annotation ignored",
    )


def test_slice_addresses_are_canonical_and_unreadable_ones_left_out() -> None:
    """An address Python cannot read (10.1.2.03, stored before Kubernetes refused leading zeros)
    made every later compile of the whole mesh fail; an IPv6 address as written (FD00:0:0::2)
    never matched a connection's original destination (fd00::2)."""
    v4 = endpoint_slice("e4", "cart", pods=(("cart-1", "10.1.2.03", True), ("cart-2", "10.0.0.3", True)))
    got = slice_from(v4)
    assert got.value is not None and [e.address for e in got.value.endpoints] == ["10.0.0.3"]
    assert got.errors == ("EndpointSlice shop/e4: '10.1.2.03' is not an IPv4 address; left out",)
    v6 = with_(endpoint_slice("e6", "cart", pods=(("cart-1", "FD00:0:0::2", True),)), "addressType", "IPv6")
    got = slice_from(v6)
    assert (
        got.value is not None and [e.address for e in got.value.endpoints] == ["fd00::2"] and not got.errors
    )
    mixed = with_(endpoint_slice("m", "cart", pods=(("cart-1", "10.0.0.2", True),)), "addressType", "IPv6")
    assert slice_from(mixed).errors == ("EndpointSlice shop/m: '10.0.0.2' is not an IPv6 address; left out",)


def test_nodes_and_the_internal_traffic_policy_are_read() -> None:
    """What a node-local Service needs: the Service's internalTrafficPolicy, each pod's node and
    each slice endpoint's nodeName (the API server always sets them for scheduled pods)."""
    local = service("agent")
    local["spec"]["internalTrafficPolicy"] = "Local"
    converted = service_from(local).value
    assert converted is not None and converted.node_local
    plain = service_from(service("web")).value
    assert plain is not None and not plain.node_local
    scheduled = pod("agent-a")
    scheduled["spec"]["nodeName"] = "node-a"
    workload = workload_from_pod(scheduled).value
    assert workload is not None and workload.node == "node-a"
    sliced = endpoint_slice("agent-x", "agent", pods=(("agent-a", "10.0.0.2", True),))
    sliced["endpoints"][0]["nodeName"] = "node-a"
    found = slice_from(sliced).value
    assert found is not None and [e.node for e in found.endpoints] == ["node-a"]


def test_a_slice_endpoint_naming_another_namespaces_pod_is_left_out() -> None:
    """Kubernetes' controllers only write targetRefs of the slice's own namespace. A hand-written
    one claimed another namespace's pod for this Service: its opaque ports were taken as that
    pod's (its sidecar then relayed what came to that port unchecked)."""
    obj = endpoint_slice("x", "cart", pods=(("cart-1", "10.0.0.2", True), ("cart-2", "10.0.0.3", True)))
    obj["endpoints"][0]["targetRef"]["namespace"] = "bank"
    obj["endpoints"][1]["targetRef"]["namespace"] = "shop"  # (its own: kept)
    obj["endpoints"].append(
        {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Node", "name": "n1", "namespace": "kube-system"}}
    )  # (not a pod: it claims no pod's ports, and is routed as kube-proxy routes it)
    got = slice_from(obj)
    assert got.value is not None and [e.workload for e in got.value.endpoints] == ["shop/cart-2", None]
    assert got.errors == (
        "EndpointSlice shop/x: an endpoint's targetRef names a pod of namespace 'bank'; left out",
    )


def _outbound(objs: list[dict[str, Any]]) -> Any:
    from sidemesh.mesh.compile import compile_outbound

    kinds = {"Pod": "pods", "Service": "services", "EndpointSlice": "endpointslices"}
    entries: dict[str, dict[str, Any]] = {
        k: {} for k in ("namespaces", "serviceauthorizations", *kinds.values())
    }
    for obj in objs:
        meta = obj["metadata"]
        entries[kinds[obj["kind"]]][f"{meta['namespace']}/{meta['name']}"] = convert(kinds[obj["kind"]], obj)
    return compile_outbound(assemble(entries), "cluster.local")


def _at(table: Any, ip: str, port: int) -> tuple[str, list[tuple[str, str]]] | None:
    d = table._by_address.get((ip, port))
    return d and (d.name, [(e.address, str(e.identity)) for e in d.endpoints])


@pytest.mark.parametrize("meshed", [True, False])
def test_a_slice_cannot_claim_another_namespaces_pod_address_through_its_own_pod(meshed: bool) -> None:
    """A slice naming its own pod (so no cross-namespace targetRef) with another namespace's pod IP
    made a pod destination at that IP, ahead of the victim's own (namespaces in order, the first
    claim wins): every caller of that pod IP on a port the pod does not declare then expected the
    attacker's identity (refused) or, for an unmeshed attacker pod, sent plaintext."""
    victim = pod("cart-1", "shop", ip="10.0.1.5", sa="cart", labels={"app": "cart"}, ports=())
    headless = service("cart", "shop", selector={"app": "cart"}, port=8080, target=8080, cluster_ip="None")
    own = endpoint_slice("cart-a", "cart", "shop", pods=(("cart-1", "10.0.1.5", True),))
    evil = pod("evil", "aaa", ip="10.0.9.9", sa="evil", meshed=meshed)
    svc = service("x", "aaa", port=8080, target=8080, cluster_ip="10.96.9.9")
    claim = endpoint_slice("x-1", "x", "aaa", pods=(("evil", "10.0.1.5", True),))  # own pod, victim's IP
    want = ("pod shop/cart-1:8080", [("10.0.1.5", "spiffe://cluster.local/ns/shop/sa/cart")])
    assert _at(_outbound([victim, headless, own]), "10.0.1.5", 8080) == want
    assert _at(_outbound([victim, headless, own, evil, svc, claim]), "10.0.1.5", 8080) == want


def test_an_endpoint_without_target_ref_is_the_pod_of_its_namespace_at_that_address() -> None:
    """A hand-written Endpoints (mirrored into a slice without targetRef) listing a meshed pod was
    called in plaintext, which that pod's sidecar refuses in strict mode; found by address in the
    slice's own namespace, as Istio does; another namespace's pod, or an address several pods share
    (hostNetwork), stays plain."""
    db = pod("db-0", "shop", ip="10.0.0.7", sa="db", ports=(("pg", 5432),))
    other = pod("db-9", "bank", ip="10.0.0.8", sa="db", ports=(("pg", 5432),))
    host_a = pod("agent-a", "shop", ip="10.0.5.1", sa="agent", ports=(("pg", 5432),))
    host_b = pod("agent-b", "shop", ip="10.0.5.1", sa="agent", ports=(("pg", 5432),))
    svc = service("db-primary", "shop", selector={}, port=5432, target=5432, cluster_ip="10.96.0.50")
    svc["spec"].pop("selector")
    sliced = endpoint_slice(
        "db-primary-x", "db-primary", "shop", pods=(("", "10.0.0.7", True), ("", "10.0.0.8", True)), port=5432
    )
    sliced["endpoints"].append({"addresses": ["10.0.5.1"], "conditions": {"ready": True}})
    for ep in sliced["endpoints"]:
        ep.pop("targetRef", None)
    got = _at(_outbound([db, other, host_a, host_b, svc, sliced]), "10.96.0.50", 5432)
    assert got == (
        "db-primary.shop:5432",
        [("10.0.0.7", "spiffe://cluster.local/ns/shop/sa/db"), ("10.0.0.8", "None"), ("10.0.5.1", "None")],
    )


def test_session_affinity_is_read() -> None:
    sticky = service("web")
    sticky["spec"]["sessionAffinity"] = "ClientIP"
    sticky["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    converted = service_from(sticky).value
    assert converted is not None and converted.client_ip_affinity
    none = service("web")
    none["spec"]["sessionAffinity"] = "None"  # what the API server defaults it to
    plain = service_from(none).value
    assert plain is not None and not plain.client_ip_affinity


def test_a_service_another_service_proxy_implements_is_left_to_it() -> None:
    """kube-proxy skips a Service labelled service.kubernetes.io/service-proxy-name: another proxy
    implements it. The mesh routed it anyway (to endpoints that proxy may not even use)."""
    other = service("web")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "my-proxy"}
    assert service_from(other) == Converted(None)
    assert service_from(service("web")).value is not None
