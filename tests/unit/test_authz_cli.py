"""`sidemesh authz check` on a directory of manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidemesh.cli import main
from tests.integration.mesh_fixture import ALLOW_FRONTEND, MESH_YAML


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(MESH_YAML.format(net="127.0.9"))
    (tmp_path / "allow.yaml").write_text(ALLOW_FRONTEND)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "code", "out"),
    [
        (
            ["--from", "shop/frontend", "--to", "shop/cart", "--port", "8080"],
            0,
            "ALLOW shop/frontend -> shop/cart-1:8080: allowed by shop/cart-allow-frontend rule 0",
        ),
        (
            ["--from", "shop/stranger", "--to", "shop/cart", "--port", "8080"],
            1,
            "DENY shop/stranger -> shop/cart-1:8080: no rule of shop/cart-allow-frontend",
        ),
        (["--from", "shop/frontend", "--to", "shop/cart-1", "--port", "9999"], 1, "DENY"),
        (
            ["--from", "unauthenticated", "--to", "shop/frontend", "--port", "8080"],
            1,
            "default allow-authenticated: client is not authenticated",
        ),
        (
            [
                "--from",
                "shop/stranger",
                "--to",
                "shop/frontend",
                "--port",
                "8080",
                "--default-policy",
                "deny",
            ],
            1,
            "default deny",
        ),
        (
            [
                "--from",
                "shop/frontend",
                "--to",
                "shop/cart",
                "--port",
                "8080",
                "--method",
                "GET",
                "--path",
                "/cart/1",
            ],
            0,
            "ALLOW",
        ),
    ],
)
def test_check(
    manifests: Path, argv: list[str], code: int, out: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["authz", "check", "--dir", str(manifests), *argv]) == code
    assert out in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["--from", "frontend", "--to", "shop/cart", "--port", "8080"], "NAMESPACE/NAME"),
        (
            ["--from", "shop/frontend", "--to", "shop/nothing", "--port", "8080"],
            "no workload, Service or service account shop/nothing",
        ),
        (["--from", "shop/frontend", "--to", "shop/cart", "--port", "0"], "not a port"),
        (
            ["--from", "shop/frontend", "--to", "shop/cart", "--port", "80", "--path", "/x"],
            "--path needs --method",
        ),
    ],
)
def test_errors_say_what_to_do(
    manifests: Path, argv: list[str], err: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["authz", "check", "--dir", str(manifests), *argv]) == 2
    assert err in capsys.readouterr().err


ROUTES = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-routes, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080], http: {methods: [GET], paths: ["/cart/*"]}}
"""


@pytest.mark.parametrize(
    ("path", "code", "seen"),
    [
        ("/cart/../debug/x", 1, "/debug/x"),  # the sidecar removes dot segments: not under /cart
        ("/c%61rt/1", 0, "/cart/1"),  # and decodes unreserved characters
    ],
)
def test_the_path_is_checked_as_the_sidecar_sees_it(
    tmp_path: Path, path: str, code: int, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check took --path as given: /cart/../debug/x was ALLOW (the sidecar denies it) and
    /c%61rt/1 DENY (the sidecar allows it)."""
    (tmp_path / "mesh.yaml").write_text(MESH_YAML.format(net="127.0.9"))
    (tmp_path / "routes.yaml").write_text(ROUTES)
    argv = ["authz", "check", "--dir", str(tmp_path), "--from", "shop/frontend", "--to", "shop/cart"]
    assert main([*argv, "--port", "8080", "--method", "GET", "--path", path]) == code
    told = capsys.readouterr()
    assert f"the sidecar sees the path as {seen}" in told.err and "sees" not in told.out  # (stdout: verdicts)
    assert main([*argv, "--port", "8080", "--method", "GET", "--path", "/c%zzrt"]) == 2
    assert "invalid percent-encoding" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mistake", "who"),
    [
        ("  - from: [{serviceAccount: stranger}]\n    to: {http: {methods: [get]}}\n", "shop/stranger"),
        ("  - from: [{namespace: monitoring, serviceAccount: null}]\n", "monitoring/grafana"),
        ("  selector: {matchLabels: {app: cart, tier: null}}\n", "shop/stranger"),
    ],
)
def test_an_invalid_policy_allows_nothing_until_fixed(
    manifests: Path, mistake: str, who: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy that cannot be read stands in allowing nothing to the workloads it would select
    (fail closed): before, it was skipped and the workload fell back to the default policy, which
    let every authenticated caller in (allow-authenticated, the mesh's default)."""
    policy = (
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\n"
        "metadata: {name: cart-broken, namespace: shop}\nspec:\n"
    )
    body = "  selector: {matchLabels: {app: cart}}\n  rules:\n"
    if mistake.startswith("  selector"):
        body = mistake + "  rules:\n  - from: [{serviceAccount: stranger}]\n"
    else:
        body += mistake
    (manifests / "allow.yaml").write_text(policy + body)
    argv = ["authz", "check", "--dir", str(manifests), "--from", who, "--to", "shop/cart", "--port", "8080"]
    assert main([*argv, "--default-policy", "allow-authenticated"]) == 1
    told = capsys.readouterr()
    out = told.out
    assert "warning: invalid resource" in told.err and "allows nothing until it is fixed" in told.err
    assert "warning" not in out  # stdout holds the verdicts only
    assert (
        f"DENY {who} -> shop/cart-1:8080: no rule of shop/cart-broken allows it (shop/cart-broken: invalid"
        in out
    )


def test_methods_are_checked_as_the_sidecars_compare_them(
    manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case-sensitive (RFC 9110 9.1): `--method get` was upper-cased and said ALLOW for a request
    the sidecars deny."""
    (manifests / "allow.yaml").write_text(
        ALLOW_FRONTEND.replace("to: {ports: [8080]}", "to: {ports: [8080], http: {methods: [GET]}}")
    )
    argv = ["authz", "check", "--dir", str(manifests), "--from", "shop/frontend", "--to", "shop/cart"]
    assert main([*argv, "--port", "8080", "--method", "GET"]) == 0
    assert main([*argv, "--port", "8080", "--method", "get"]) == 1
    assert (
        "DENY shop/frontend -> shop/cart-1:8080: no rule of shop/cart-allow-frontend"
        in capsys.readouterr().out
    )


VAULT = """\
apiVersion: v1
kind: Namespace
metadata:
  name: vault
  annotations: {{sidemesh.io/default-policy: deny{extra}}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: vault-1, namespace: vault, labels: {{app: vault}}}}
spec: {{serviceAccount: vault, address: 10.0.0.2, ports: [8200], meshed: false}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata:
  name: db-1
  namespace: vault
  labels: {{app: db}}
  annotations: {{sidemesh.io/exclude-inbound-ports: "5432", sidemesh.io/opaque-ports: "7000"}}
spec: {{serviceAccount: db, address: 10.0.0.3, ports: [5432, 7000, 8080, 9000]}}
---
apiVersion: v1
kind: Service
metadata: {{name: db-raw, namespace: vault}}
spec: {{selector: {{app: db}}, ports: [{{name: tcp-raw, port: 90, targetPort: 9000}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {{name: db-http, namespace: vault}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  rules:
  - from: [{{namespace: shop}}]
    to: {{http: {{paths: ["/q/*"]}}}}
"""


@pytest.mark.parametrize(
    ("to", "port", "request_", "code", "out"),
    [
        ("vault/vault-1", 8200, [], 0, "ALLOW shop/anyone -> vault/vault-1:8200: no sidecar enforces"),
        ("vault/db-1", 5432, [], 0, "excluded from inbound capture by sidemesh.io/exclude-inbound-ports"),
        (
            "vault/db-1",
            8080,
            ["--method", "GET", "--path", "/q/1"],
            0,
            "ALLOW shop/anyone -> vault/db-1:8080",
        ),
        (
            "vault/db-1",
            7000,
            ["--method", "GET", "--path", "/q/1"],
            1,
            "(port 7000 is opaque: checked as a TCP",
        ),
        (  # (a Service's port named tcp-*: its callers' bytes are not parsed either)
            "vault/db-1",
            9000,
            ["--method", "GET", "--path", "/q/1"],
            1,
            "(port 9000 is opaque through Service vault/db-raw, which declares it so: checked as a TCP",
        ),
    ],
)
def test_the_check_answers_for_what_the_sidecar_sees(
    tmp_path: Path,
    to: str,
    port: int,
    request_: list[str],
    code: int,
    out: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A pod without a sidecar, or a port its sidecar does not capture, is reachable by anyone: the
    check said DENY (exit 1: the auditor thought it closed). On an opaque port the sidecar sees no
    request, so no HTTP rule can match: the check said ALLOW for what the sidecar refuses."""
    (tmp_path / "vault.yaml").write_text(VAULT.format(extra=""))
    argv = [
        "authz",
        "check",
        "--dir",
        str(tmp_path),
        "--from",
        "shop/anyone",
        "--to",
        to,
        "--port",
        str(port),
    ]
    assert main([*argv, *request_]) == code
    assert out in capsys.readouterr().out


def test_directory_mode_mistakes_fail_closed_and_name_the_resource(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three documents kubectl would refuse, read from a directory: an unrelated annotation that is a
    number dropped the whole Namespace and its default-policy deny with it; a ServiceAuthorization
    without a namespace was dropped (its workloads fell back to allow-authenticated); a Workload whose
    service account cannot be a SPIFFE ID made every compile fail (exit 70 here; in a sidecar's
    config watch, no later change was applied)."""
    (tmp_path / "vault.yaml").write_text(VAULT.format(extra=", example.com/replicas: 3"))
    (tmp_path / "mesh.yaml").write_text(MESH_YAML.format(net="127.0.9"))
    (tmp_path / "allow.yaml").write_text(
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\nmetadata: {name: only-frontend}\n"
        "spec:\n  rules:\n  - from: [{namespace: shop, serviceAccount: frontend}]\n"
        "---\napiVersion: sidemesh.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: job-1, namespace: default, labels: {app: job}}\n"
        "spec: {serviceAccount: Nightly_Job, address: 10.0.0.9, ports: [8080]}\n"
        "---\napiVersion: sidemesh.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: web-1, namespace: default, labels: {app: web}}\n"
        "spec: {serviceAccount: web, address: 10.0.0.8, ports: [8080], meshed: 'false'}\n"
        "---\napiVersion: sidemesh.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: api-1, namespace: default, labels: {app: api}}\n"
        "spec: {serviceAccount: api, address: 10.0.0.7, ports: [8080]}\n"
    )
    argv = ["authz", "check", "--dir", str(tmp_path), "--from", "shop/anyone"]
    assert main([*argv, "--to", "vault/vault", "--port", "8200"]) == 0  # (not meshed: anyone)
    assert main([*argv, "--to", "shop/cart", "--port", "8080", "--default-policy", "allow-all"]) == 0
    told = capsys.readouterr()
    assert "Namespace vault: metadata.annotations must map strings to strings" in told.err
    assert "service account 'Nightly_Job' is not a valid Kubernetes name" in told.err
    assert "Workload default/web-1: spec.meshed 'false' is not true or false" in told.err
    # The Namespace stays, with its deny; the namespace-less policy is default's.
    (tmp_path / "vault.yaml").write_text(
        VAULT.format(extra=", example.com/replicas: 3").replace("meshed: false", "")
    )
    assert main([*argv, "--to", "vault/vault", "--port", "8200"]) == 1
    assert "DENY shop/anyone -> vault/vault-1:8200: default deny" in capsys.readouterr().out
    assert main([*argv, "--to", "default/api", "--port", "8080"]) == 1
    assert (
        "DENY shop/anyone -> default/api-1:8080: no rule of default/only-frontend" in capsys.readouterr().out
    )
    assert (
        main(
            [
                "authz",
                "check",
                "--dir",
                str(tmp_path),
                "--from",
                "shop/frontend",
                "--to",
                "default/api",
                "--port",
                "8080",
            ]
        )
        == 0
    )


def test_an_unreadable_namespace_annotations_map_is_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "vault.yaml").write_text(
        VAULT.format(extra="")
        .replace("annotations: {sidemesh.io/default-policy: deny}", "annotations: [x]")
        .replace("meshed: false", "")
    )
    argv = ["authz", "check", "--dir", str(tmp_path), "--from", "shop/anyone", "--to", "vault/vault"]
    assert main([*argv, "--port", "8200", "--default-policy", "allow-all"]) == 1
    told = capsys.readouterr()
    assert "DENY shop/anyone -> vault/vault-1:8200: default deny" in told.out
    assert "sidemesh.io/default-policy cannot be read: enforced as deny until fixed" in told.err


def test_star_among_the_excluded_ports_and_a_null_meshed_read_as_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`"*,"` is every port to the injector and the init container (nothing captured): the check
    said DENY for a port nothing guards. `meshed:` left empty (null) is unset, so meshed, as the
    API server reads it: the Workload was refused."""
    (tmp_path / "vault.yaml").write_text(
        VAULT.format(extra="")
        .replace('sidemesh.io/exclude-inbound-ports: "5432"', 'sidemesh.io/exclude-inbound-ports: "*,"')
        .replace("meshed: false", "meshed: null")
    )
    argv = ["authz", "check", "--dir", str(tmp_path), "--from", "shop/anyone"]
    assert main([*argv, "--to", "vault/db-1", "--port", "8080"]) == 0
    assert "excluded from inbound capture" in capsys.readouterr().out
    assert main([*argv, "--to", "vault/vault-1", "--port", "8200"]) == 1  # meshed, default deny
    told = capsys.readouterr()
    assert "DENY shop/anyone -> vault/vault-1:8200: default deny" in told.out and "meshed" not in told.err


def test_a_caller_whose_pods_have_no_sidecar_is_checked_as_unauthenticated(
    manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pods without a sidecar call in plaintext: a policy allowing their service account does not
    let them in (a strict workload refuses them, a permissive one sees the unauthenticated
    principal). The check answered ALLOW for them."""
    (manifests / "legacy.yaml").write_text(
        "apiVersion: sidemesh.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: legacy-1, namespace: shop, labels: {app: legacy}}\n"
        "spec: {serviceAccount: legacy, address: 127.0.9.9, ports: [8080], meshed: false}\n"
    )
    (manifests / "allow.yaml").write_text(
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\n"
        "metadata: {name: cart-allow, namespace: shop}\nspec:\n  selector: {matchLabels: {app: cart}}\n"
        "  rules:\n  - from: [{serviceAccount: legacy}]\n"
    )
    argv = [
        "authz",
        "check",
        "--dir",
        str(manifests),
        "--from",
        "shop/legacy",
        "--to",
        "shop/cart",
        "--port",
        "8080",
    ]
    assert main(argv) == 1
    told = capsys.readouterr()
    assert "have no sidecar" in told.err
    assert told.out.startswith("DENY shop/legacy -> shop/cart-1:8080"), told.out
