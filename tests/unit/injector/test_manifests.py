"""manifests/: the kustomize base and the Jaeger addon render, and every object is valid Kubernetes.

Rendering: a small renderer here (resources, nested kustomizations, the namespace transformer),
and, when kubectl is installed, `kubectl kustomize` must produce the same objects. Validation:
kubernetes-validate, strict (unknown fields fail), for the newest Kubernetes it ships and 1.29.
Then the properties the install depends on: the webhook's selectors and policies, least-privilege
RBAC, non-root pods with probes and resources, and names that agree with the code's defaults.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from injector.config import INJECTOR_SERVER_NAME, InjectorConfig

ROOT = Path(__file__).resolve().parents[3]
BASES = [ROOT / "manifests", ROOT / "manifests" / "addons" / "jaeger"]
VERSIONS = [kubernetes_validate.latest_version(), "1.29.0"]
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
}

Json = dict[str, Any]


def render(base: Path) -> list[Json]:
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs: list[Json] = []
    for entry in kustomization.get("resources", []):
        path = base / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
    return docs


@functools.cache
def rendered(base: Path) -> tuple[Json, ...]:
    return tuple(render(base))


def key(doc: Json) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def objects(kind: str, base: Path = BASES[0]) -> dict[str, Json]:
    return {d["metadata"]["name"]: d for d in rendered(base) if d["kind"] == kind}


@pytest.mark.parametrize("base", BASES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kubectl_kustomize_renders_the_same_objects(base: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: only the renderer in this test was checked")
    proc = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    theirs = sorted(key(d) for d in yaml.safe_load_all(proc.stdout) if d)
    assert theirs == sorted(key(d) for d in rendered(base))


@pytest.mark.parametrize(
    ("base", "doc"),
    [(b, d) for b in BASES for d in render(b)],
    ids=[f"{b.name}:{d['kind']}/{d['metadata']['name']}" for b in BASES for d in render(b)],
)
def test_every_object_validates_strictly(base: Path, doc: Json) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{key(doc)} is not valid for Kubernetes {version}: {where}: {exc.message}")


def test_the_base_installs_everything() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered(BASES[0])}
    for component in ("sidemesh-ca", "sidemesh-controller", "sidemesh-injector"):
        for kind in (
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        ):
            assert (kind, component) in kinds
    assert ("Namespace", "sidemesh-system") in kinds
    assert ("CustomResourceDefinition", "serviceauthorizations.sidemesh.io") in kinds
    assert ("MutatingWebhookConfiguration", "sidemesh-injector") in kinds
    assert ("ConfigMap", "sidemesh-mesh") in kinds
    assert all(d["metadata"].get("namespace") in (None, "sidemesh-system") for d in rendered(BASES[0]))


def test_webhook_configuration() -> None:
    (hook,) = objects("MutatingWebhookConfiguration")["sidemesh-injector"]["webhooks"]
    assert hook["namespaceSelector"]["matchLabels"] == {"sidemesh.io/inject": "enabled"}
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "sidemesh.io/inject", "operator": "NotIn", "values": ["false", "disabled"]}
    ]
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] == "Fail" and hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert "caBundle" not in hook["clientConfig"]  # the injector owns it; apply must not reset it
    service = hook["clientConfig"]["service"]
    assert (
        f"{service['name']}.{service['namespace']}.svc"
        == INJECTOR_SERVER_NAME
        == InjectorConfig().server_name
    )
    assert service["path"] == "/mutate"
    svc = objects("Service")[service["name"]]
    assert svc["spec"]["ports"][0]["port"] == service["port"] == 443
    assert InjectorConfig().webhook_configuration == "sidemesh-injector"


def rules_of(name: str) -> list[Json]:
    rules: list[Json] = objects("ClusterRole")[name]["rules"]
    return rules


def test_rbac_is_least_privilege() -> None:
    for role in objects("ClusterRole").values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            assert "secrets" not in rule["resources"]
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
            # create only where nothing narrower works: the CA's TokenReviews, and the controller's
            # trust bundle ConfigMaps (a create cannot be limited by name; controller/bundle.py)
            assert "create" not in rule["verbs"] or (rule["resources"], rule["verbs"]) in (
                (["tokenreviews"], ["create"]),
                (["configmaps"], ["create"]),
            )
    assert rules_of("sidemesh-ca") == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    assert rules_of("sidemesh-injector") == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["sidemesh-injector"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},  # kubelet versions (nativeSidecar)
    ]
    controller = {
        (g, r): set(rule["verbs"])
        for rule in rules_of("sidemesh-controller")
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    # What controller/sources/kubernetes.py calls, no more (list+watch; the status by merge patch).
    for resource in ("pods", "services", "namespaces"):
        assert controller[("", resource)] == {"list", "watch"}
    assert ("", "serviceaccounts") not in controller  # identities come from pods: not watched
    assert controller[("discovery.k8s.io", "endpointslices")] == {"list", "watch"}
    assert controller[("sidemesh.io", "serviceauthorizations")] == {"list", "watch"}
    assert controller[("sidemesh.io", "serviceauthorizations/status")] == {"patch"}
    configmaps = [r for r in rules_of("sidemesh-controller") if "configmaps" in r["resources"]]
    assert configmaps == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["sidemesh-trust-bundle"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]
    for binding in objects("ClusterRoleBinding").values():
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": binding["metadata"]["name"], "namespace": "sidemesh-system"}
        ]


@pytest.mark.parametrize("base", BASES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pods_are_restricted_with_probes_and_resources(base: Path) -> None:
    for name, deploy in objects("Deployment", base).items():
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert c["resources"]["requests"] and c["resources"]["limits"], name
            assert c["readinessProbe"] and c["livenessProbe"], name
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_one_image_and_every_deployment_has_a_pdb() -> None:
    deployments = objects("Deployment")
    images = {c["image"] for d in deployments.values() for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"ghcr.io/sidemesh/sidemesh:latest"}
    pdbs = objects("PodDisruptionBudget")
    for name, deploy in deployments.items():
        assert pdbs[name]["spec"]["selector"] == deploy["spec"]["selector"]
        assert deploy["spec"]["replicas"] > pdbs[name]["spec"]["minAvailable"]  # a drain can proceed


def test_injector_mounts_match_its_defaults() -> None:
    pod = objects("Deployment")["sidemesh-injector"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = InjectorConfig()
    assert mounts["settings"] == str(config.settings_file.parent)
    assert volumes["settings"]["configMap"]["name"] == "sidemesh-mesh"
    assert "config.yaml" in objects("ConfigMap")["sidemesh-mesh"]["data"]
    assert mounts["sidemesh-token"] == str(config.token_file.parent)
    assert mounts["sidemesh-trust-bundle"] == str(config.bundle_file.parent)
    token = volumes["sidemesh-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "sidemesh-ca"
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert f":{ports['https-webhook']}" in config.listen


def test_ca_allows_the_injector_its_dns_name() -> None:
    pod = objects("Deployment")["sidemesh-ca"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    entries = env["SIDEMESH_CA_CONTROL_PLANE_DNS"].split(",")
    assert f"sidemesh-system/sidemesh-injector={INJECTOR_SERVER_NAME}" in entries
    assert "sidemesh-system/sidemesh-controller=sidemesh-controller.sidemesh-system.svc" in entries


def test_jaeger_addon_receives_otlp() -> None:
    (deploy,) = objects("Deployment", BASES[1]).values()
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["COLLECTOR_OTLP_ENABLED"] == "true"
    (svc,) = objects("Service", BASES[1]).values()
    assert {p["port"] for p in svc["spec"]["ports"]} == {4317, 4318, 16686}
