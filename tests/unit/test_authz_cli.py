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
