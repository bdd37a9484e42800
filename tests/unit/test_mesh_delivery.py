"""Delivery annotations (timeout, retries, opaque ports) -> values; invalid ones are reported and
ignored one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidemesh.mesh.delivery import (
    DEFAULT,
    DEFAULT_OPAQUE_PORTS,
    Delivery,
    opaque_ports,
    parse_bool,
    parse_ports,
    parse_retries,
    parse_timeout,
    service_delivery,
)
from sidemesh.mesh.resources import build_snapshot


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5s", 1.5), ("3", 3.0), ("0s", None), ("0", None)],
)
def test_timeouts(text: str, seconds: float | None) -> None:
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "soon", "-1s", "-2", "inf", "nan", "1e999", "2 s", "5x", "1e-9", "\u0663s", "1_000"]
)
def test_bad_timeouts(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_timeout(text)


@pytest.mark.parametrize("text", ["0.0000001", "0.5ms"])
def test_a_timeout_under_a_millisecond_is_refused_not_taken_for_none(text: str) -> None:
    with pytest.raises(ValueError, match="shorter than 1ms"):
        parse_timeout(text)


def test_a_huge_bad_value_is_quoted_short() -> None:
    with pytest.raises(ValueError, match="is not a duration") as err:
        parse_timeout("x" * 5000)
    assert len(str(err.value)) < 200 and "5000 characters" in str(err.value)


@pytest.mark.parametrize(("text", "n"), [("0", 0), ("3", 3), (" 10 ", 10)])
def test_retries(text: str, n: int) -> None:
    assert parse_retries(text) == n


@pytest.mark.parametrize("text", ["11", "-1", "two", "", "1.5", "²"])
def test_bad_retries(text: str) -> None:
    with pytest.raises(ValueError, match="from 0 to 10"):
        parse_retries(text)


def test_booleans() -> None:
    assert parse_bool("true") is True and parse_bool(" False ") is False
    with pytest.raises(ValueError, match="not true or false"):
        parse_bool("yes")


@pytest.mark.parametrize(
    ("text", "ports"),
    [("5432", {5432}), ("25, 587,,3306 ", {25, 587, 3306}), ("", set())],
)
def test_ports(text: str, ports: set[int]) -> None:
    assert parse_ports(text) == frozenset(ports)


@pytest.mark.parametrize("text", ["0", "65536", "4000-5000", "db", "80;81", "²"])
def test_bad_ports(text: str) -> None:
    with pytest.raises(ValueError, match="is not a port number"):
        parse_ports(text)


def test_a_service_without_annotations_gets_the_shared_default() -> None:
    errors: list[str] = []
    assert service_delivery((("team", "cart"),), "Service shop/cart", errors) is DEFAULT
    assert Delivery(None, 0, False, DEFAULT_OPAQUE_PORTS) == DEFAULT and errors == []
    assert {25, 587, 3306, 4444, 5432, 6379, 9300, 11211} == DEFAULT_OPAQUE_PORTS


def test_each_invalid_annotation_is_reported_by_name_and_the_others_apply() -> None:
    errors: list[str] = []
    got = service_delivery(
        (
            ("sidemesh.io/timeout", "250ms"),
            ("sidemesh.io/retries", "99"),
            ("sidemesh.io/retry-non-idempotent", "maybe"),
            ("sidemesh.io/opaque-ports", ""),
        ),
        "Service shop/cart",
        errors,
    )
    assert got == Delivery(0.25, 0, False, frozenset())  # an empty list: nothing is opaque
    assert errors == [
        "Service shop/cart: annotation sidemesh.io/retries: '99' is not a number of retries from 0 to 10; "
        "annotation ignored",
        "Service shop/cart: annotation sidemesh.io/retry-non-idempotent: 'maybe' is not true or false; "
        "annotation ignored",
    ]


def test_pod_opaque_ports_default_and_override() -> None:
    errors: list[str] = []
    assert opaque_ports((), "Pod shop/db-0", errors) == DEFAULT_OPAQUE_PORTS
    assert opaque_ports((("sidemesh.io/opaque-ports", "7000"),), "Pod shop/db-0", errors) == {7000}
    assert opaque_ports((("sidemesh.io/opaque-ports", "x"),), "Pod shop/db-0", errors) == DEFAULT_OPAQUE_PORTS
    assert len(errors) == 1 and errors[0].startswith("Pod shop/db-0: annotation sidemesh.io/opaque-ports:")


EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "delivery"


def example_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.parametrize("version", [kubernetes_validate.latest_version(), "1.29.0"])
def test_the_examples_are_valid_kubernetes(version: str) -> None:
    docs = example_docs()
    assert len(docs) >= 3
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_examples_mean_what_they_say() -> None:
    docs = example_docs()
    snap = build_snapshot([(str(i), d) for i, d in enumerate(docs)])
    assert snap.errors == ()
    by_name = {s.name: s.delivery for s in snap.services}
    assert by_name["cart"] == Delivery(2.0, 3, False, DEFAULT_OPAQUE_PORTS)
    assert by_name["orders-db"].opaque_ports == {5432, 7000}
    template = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["metadata"]
    errors: list[str] = []
    assert opaque_ports(tuple(template["annotations"].items()), "orders-db", errors) == {5432, 7000}
    assert errors == []


KEYS = [
    "sidemesh.io/timeout",
    "sidemesh.io/retries",
    "sidemesh.io/retry-non-idempotent",
    "sidemesh.io/opaque-ports",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=40)))
def test_any_annotation_value_gives_settings_or_a_named_error(annotations: dict[str, str]) -> None:
    errors: list[str] = []
    got = service_delivery(tuple(sorted(annotations.items())), "Service shop/cart", errors)
    assert got.timeout_s is None or got.timeout_s > 0
    assert 0 <= got.retries <= 10 and all(1 <= p <= 65535 for p in got.opaque_ports)
    assert len(errors) <= len(annotations)
    assert all(e.startswith("Service shop/cart: annotation sidemesh.io/") for e in errors)
