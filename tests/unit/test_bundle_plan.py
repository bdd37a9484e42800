"""What the trust bundle publisher writes, given namespaces, their ConfigMaps and the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ca import keys
from controller.bundle import BUNDLE_KEY, CONFIGMAP_NAME, Write, bundle_text, plan
from tests.support.pki import make_authority

Obj = dict[str, Any]
B = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n"
OLD = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n"


def ns(name: str, *, phase: str = "Active", deleting: bool = False) -> Obj:
    meta: Obj = {"name": name, "uid": f"uid-{name}", "labels": {"sidemesh.io/inject": "enabled"}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def cm(namespace: str, data: Obj | None, **more: Any) -> Obj:
    out: Obj = {
        "metadata": {
            "name": CONFIGMAP_NAME,
            "namespace": namespace,
            "resourceVersion": "42",
            "uid": "cm-uid",
            "labels": {"team": "shop"},
            "managedFields": [{"manager": "kubectl"}],
        },
        **more,
    }
    if data is not None:
        out["data"] = data
    return out


def created(namespace: str) -> Write:
    return Write(
        namespace,
        "create",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIGMAP_NAME,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "sidemesh"},
            },
            "data": {BUNDLE_KEY: B},
        },
    )


def replaced(namespace: str, **more: Any) -> Write:
    """The existing object with exactly the bundle as data; its metadata kept, managedFields left
    to the server."""
    meta = {k: v for k, v in cm(namespace, None)["metadata"].items() if k != "managedFields"}
    return Write(
        namespace,
        "replace",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {BUNDLE_KEY: B}, **more},
    )


@pytest.mark.parametrize(
    ("namespaces", "existing", "expected"),
    [
        pytest.param([ns("shop")], {"shop": None}, [created("shop")], id="missing-created-and-labelled"),
        pytest.param([ns("shop")], {"shop": cm("shop", {BUNDLE_KEY: B})}, [], id="equal-left-alone"),
        pytest.param(
            [ns("shop")],
            {"shop": cm("shop", {BUNDLE_KEY: OLD})},
            [replaced("shop")],
            id="other-bundle-replaced",
        ),
        pytest.param(
            [ns("shop")],
            {"shop": cm("shop", {BUNDLE_KEY: B, "extra.pem": OLD})},
            [replaced("shop")],
            id="extra-key-dropped",
        ),
        pytest.param(
            [ns("shop")],
            {"shop": cm("shop", {BUNDLE_KEY: B}, binaryData={"x": "AAAA"})},
            [replaced("shop")],
            id="binary-data-dropped",
        ),
        pytest.param([ns("shop")], {"shop": cm("shop", None)}, [replaced("shop")], id="no-data-filled"),
        pytest.param(
            [ns("shop")],
            {"shop": cm("shop", {BUNDLE_KEY: B.strip()})},
            [replaced("shop")],
            id="exactly-the-bytes-trailing-newline-counts",
        ),
        pytest.param(
            [ns("shop")],
            {"shop": cm("shop", {BUNDLE_KEY: OLD}, immutable=False)},
            [replaced("shop", immutable=False)],
            id="other-fields-kept",
        ),
        pytest.param([ns("shop")], {}, [], id="unreadable-skipped-until-next-round"),
        pytest.param([ns("shop", phase="Terminating")], {"shop": None}, [], id="terminating-skipped"),
        pytest.param(
            [ns("shop", deleting=True)],
            {"shop": None},
            [],
            id="being-deleted-skipped",
        ),
        pytest.param(
            [ns("a"), ns("b"), ns("c"), ns("d")],
            {"a": cm("a", {BUNDLE_KEY: OLD}), "b": None, "c": cm("c", {BUNDLE_KEY: B})},
            [replaced("a"), created("b")],
            id="each-namespace-on-its-own",
        ),
        pytest.param([], {"shop": None}, [], id="only-the-listed-namespaces"),
    ],
)
def test_plan(namespaces: list[Obj], existing: dict[str, Obj | None], expected: list[Write]) -> None:
    assert plan(namespaces, existing, B) == expected


def test_plan_does_not_change_its_inputs() -> None:
    existing = cm("shop", {BUNDLE_KEY: OLD}, binaryData={"x": "AAAA"})
    before = repr(existing)
    plan([ns("shop")], {"shop": existing}, B)
    assert repr(existing) == before


def test_bundle_text_is_the_file_as_is(tmp_path: Path) -> None:
    make_authority(tmp_path)
    pem = (tmp_path / keys.ROOTS).read_bytes()
    assert bundle_text(pem) == pem.decode()
    assert bundle_text(pem + pem) == (pem + pem).decode()


@pytest.mark.parametrize(
    "pem",
    [b"", b"\n", OLD.encode(), b"not a certificate", b"\xff\xfe"],
    ids=["empty", "blank", "not-base64-der", "text", "binary"],
)
def test_bundle_text_refuses_what_would_break_every_sidecar(pem: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (SvidError or UnicodeDecodeError, both ValueErrors)
        bundle_text(pem)
