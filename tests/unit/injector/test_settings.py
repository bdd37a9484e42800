"""Injection settings: the YAML file, its validation, and the reload that keeps the last good one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from injector.errors import SettingsError
from injector.settings import InjectionSettings, Resources, SettingsFile, parse_settings

MANIFEST = Path(__file__).resolve().parents[3] / "manifests" / "mesh-config.yaml"


def test_the_shipped_configmap_holds_the_defaults() -> None:
    assert parse_settings(MANIFEST.read_text()) == InjectionSettings()


def test_values_and_defaults() -> None:
    settings = parse_settings(
        "image: r/s:2\nnativeSidecar: false\nproxyUID: 2000\nproxyResources: {requests: {cpu: 1}}\n"
    )
    assert settings.image == "r/s:2" and settings.native_sidecar is False and settings.proxy_uid == 2000
    assert settings.proxy_resources == Resources(requests={"cpu": "1"}, limits={})
    assert settings.ca_address == InjectionSettings().ca_address
    assert parse_settings("") == InjectionSettings()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("imagePullPolicy: Sometimes", "imagePullPolicy"),
        ("image: ''", "image"),
        ("logLevel: loud", "logLevel"),
        ("defaultPolicy: open", "defaultPolicy"),
        ("mode: lax", "mode"),
        ("trustDomain: 'Bad Domain'", "trustDomain"),
        ("caAddress: nowhere", "caAddress"),
        ("proxyUID: 0", "proxyUID"),
        ("proxyUID: true", "proxyUID"),
        ("nativeSidecar: 'yes'", "nativeSidecar"),
        ("accessLog: 1", "accessLog"),
        ("iptablesMode: xtables", "iptablesMode"),
        ("proxyResources: {requests: {cpu: lots}}", "proxyResources.requests"),
        ("proxyResources: {request: {}}", "proxyResources"),
        # What the API server refuses in every pod (after the webhook said yes):
        ("proxyResources: {requests: {cpu: '3'}, limits: {cpu: '2'}}", "proxyResources.requests"),
        ("proxyResources: {requests: {cpu: '-1'}}", "proxyResources.requests"),
        ("initResources: {requests: {memory: 1Gi}, limits: {memory: 128Mi}}", "initResources.requests"),
        ("initResources: {limits: {memory: 1e999}}", "initResources.limits"),
        ("proxyResources: {requests: {storage: 1Gi}}", "proxyResources.requests"),  # not a container's
        ("proxyResources: {limits: {pods: '1'}}", "proxyResources.limits"),
        ("proxyResources: {requests: {example.com/dev: '1'}}", "proxyResources.requests"),  # no limit
        (
            "proxyResources: {requests: {example.com/dev: '1'}, limits: {example.com/dev: '2'}}",
            "proxyResources.requests",
        ),
        (
            "proxyResources: {requests: {example.com/dev: 500m}, limits: {example.com/dev: 500m}}",
            "proxyResources.requests",
        ),
        (
            "proxyResources: {requests: {hugepages-2Mi: 2Mi}, limits: {memory: 1Gi, hugepages-2Mi: 4Mi}}",
            "proxyResources.requests",
        ),
        ("proxyResources: {limits: {hugepages-2Mi: 4Mi}}", "proxyResources"),  # no cpu or memory
        ("proxyResources: {limits: {memory: 1Gi, hugepages-2Mi: 3Mi}}", "proxyResources.limits"),  # 1.5 pages
        ("proxyResources: {limits: {requests.example.com/dev: '1'}}", "proxyResources.limits"),
        ("proxyResources: {limits: {example..com/dev: '1'}}", "proxyResources.limits"),
        ("proxyResources: {limits: {example.-com/dev: '1'}}", "proxyResources.limits"),
        ("proxyResources: {limits: {example.com/" + "a" * 64 + ": '1'}}", "proxyResources.limits"),
        (
            "proxyResources: {limits: {notkubernetes.io/x: '1'}}",
            "proxyResources.limits",
        ),  # native, not standard
        ("imag: x", "imag"),
        ("- a list", "config.yaml"),
        ("a: [", "config.yaml"),
        ("kind: ConfigMap\ndata: {}", "config.yaml"),
        ("kind: ConfigMap\ndata: [1]", "config.yaml"),  # (an AttributeError: exit 70, not 2)
        ("kind: ConfigMap\ndata: x", "config.yaml"),
    ],
)
def test_bad_settings_name_the_key(text: str, key: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings(text)
    assert info.value.key == key


def test_resources_the_api_server_takes_are_taken() -> None:
    """Hugepages (a page size in the name, upper case included) and extended resources, set as
    the API server wants them; the name check refused hugepages-2Mi, blaming its quantity."""
    text = (
        "proxyResources:\n"
        "  requests: {cpu: 100m, memory: 64Mi, hugepages-2Mi: 4Mi, example.com/dev: '1', ephemeral-storage: 1Gi}\n"
        "  limits: {memory: 128Mi, hugepages-2Mi: 4Mi, example.com/dev: '1'}\n"
    )
    assert parse_settings(text).proxy_resources.requests["hugepages-2Mi"] == "4Mi"


def test_reload_applies_good_changes_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("image: one:1\n")
    watched = SettingsFile(path)
    assert watched.current.image == "one:1"
    assert watched.reload() is False  # unchanged
    path.write_text("image: two:2\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within the clock's resolution
    assert watched.reload() is True and watched.current.image == "two:2"
    path.write_text("image: [broken\n")
    assert watched.reload() is False
    assert watched.current.image == "two:2" and watched.last_error is not None
    path.unlink()
    assert watched.reload() is False and watched.current.image == "two:2"


def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    """The kubelet updates a ConfigMap volume by swapping the ..data symlink to a new directory."""
    first, second = tmp_path / "..2024_01", tmp_path / "..2024_02"
    first.mkdir()
    second.mkdir()
    (first / "config.yaml").write_text("logLevel: info\n")
    (second / "config.yaml").write_text("logLevel: debug\n")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    watched = SettingsFile(tmp_path / "config.yaml")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watched.reload() is True and watched.current.log_level == "debug"


def test_native_sidecar_auto_follows_the_cluster() -> None:
    """On 1.28 the SidecarContainers gate is off by default: the API server drops restartPolicy and
    refuses the pod (probes on an init container), so "auto" (the default) makes classic sidecars
    there; an explicit true or false is kept."""
    auto = parse_settings("nativeSidecar: auto\n")
    assert auto.native_sidecar is None and auto == InjectionSettings()
    assert auto.resolved(native_supported=False).native_sidecar is False
    assert auto.resolved(native_supported=True).native_sidecar is True
    assert parse_settings("nativeSidecar: true\n").resolved(native_supported=False).native_sidecar is True
    with pytest.raises(SettingsError, match="nativeSidecar"):
        parse_settings("nativeSidecar: sometimes\n")


@pytest.mark.parametrize(
    ("major", "minor", "supported"),
    [("1", "28", False), ("1", "28+", False), ("1", "29", True), ("1", "31+", True), ("2", "0", True)],
)
def test_the_api_servers_version_decides(major: str, minor: str, supported: bool) -> None:
    """`/version` as Kubernetes answers it (EKS and GKE write minor "28+")."""
    from types import SimpleNamespace
    from unittest import mock

    from injector import cabundle

    body = {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}"}  # (a real one has more)
    nodes = {"items": [{"metadata": {"name": "n1"}, "status": {"nodeInfo": {"kubeletVersion": "v1.31.2"}}}]}
    with mock.patch("kubernetes.client.VersionApi") as api, mock.patch("kubernetes.client.CoreV1Api") as core:
        api.return_value.get_code.return_value = SimpleNamespace(data=json.dumps(body).encode())
        core.return_value.list_node.return_value = SimpleNamespace(data=json.dumps(nodes).encode())
        assert cabundle.native_sidecars_supported(object()) == (supported, f"v{major}.{minor}")


def test_an_older_kubelet_means_classic_sidecars() -> None:
    """Kubelets may be three minor versions behind the API server (an upgrade does the control plane
    first): an old kubelet runs a native sidecar as an init container that never exits, so its
    pods stayed in Init for good. Nodes are read page by page."""
    from types import SimpleNamespace
    from unittest import mock

    from injector import cabundle

    def node(name: str, version: str) -> dict[str, object]:
        return {"metadata": {"name": name}, "status": {"nodeInfo": {"kubeletVersion": version}}}

    pages = [
        {"items": [node("a", "v1.30.1"), node("b", "v1.31.0-eks-5e0fdde")], "metadata": {"continue": "next"}},
        {"items": [node("c", "v1.28.9-gke.100"), node("d", "weird")], "metadata": {}},
    ]
    version = {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
    with mock.patch("kubernetes.client.VersionApi") as api, mock.patch("kubernetes.client.CoreV1Api") as core:
        api.return_value.get_code.return_value = SimpleNamespace(data=json.dumps(version).encode())
        core.return_value.list_node.side_effect = [
            SimpleNamespace(data=json.dumps(p).encode()) for p in pages
        ]
        assert cabundle.native_sidecars_supported(object()) == (False, "v1.31.0, kubelet 1.28 on node c")
        calls = core.return_value.list_node.call_args_list
        assert [c.kwargs.get("_continue") for c in calls] == [None, "next"]


def test_the_iptables_backend_reaches_the_init_container() -> None:
    from injector.containers import PodOptions, init_container

    options = PodOptions(native=True, default_policy="deny")
    assert "--iptables-mode" not in init_container(InjectionSettings(), options)["args"]  # auto: init decides
    legacy = init_container(parse_settings("iptablesMode: legacy"), options)["args"]
    assert legacy[-2:] == ["--iptables-mode", "legacy"]


def test_a_default_policy_set_for_controller_streamed_sidecars_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The controller computes each workload's default and sends it: `defaultPolicy` here only sets
    the environment of sidecars reading a directory. manifests/mesh-config.yaml invited setting it
    (`deny`) and the sidecars kept allow-authenticated, silently. The shipped file no longer has it,
    the controller's Deployment has SIDEMESH_DEFAULT_POLICY, and setting it here is warned about."""
    import logging

    assert "defaultPolicy:" not in MANIFEST.read_text().replace("# ", "")
    controller = (MANIFEST.parent / "controller.yaml").read_text()
    assert "{name: SIDEMESH_DEFAULT_POLICY, value: allow-authenticated}" in controller
    with caplog.at_level(logging.WARNING):
        parse_settings(MANIFEST.read_text())
        assert not caplog.records
        parse_settings("defaultPolicy: deny\n")
        assert "not in force" in caplog.text and "SIDEMESH_DEFAULT_POLICY" in caplog.text
