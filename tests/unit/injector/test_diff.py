"""diff(): the patch, applied with jsonpatch, gives the desired document; named lists align by name."""

from __future__ import annotations

from typing import Any

import jsonpatch
import pytest

from injector.diff import diff

CASES: list[tuple[str, Any, Any]] = [
    ("equal", {"a": 1}, {"a": 1}),
    ("add key", {"a": 1}, {"a": 1, "b": {"c": [1]}}),
    ("remove key", {"a": 1, "b": 2}, {"a": 1}),
    ("replace scalar", {"a": 1}, {"a": "1"}),
    ("escaped keys", {"m": {"x/y": "1"}}, {"m": {"x/y": "2", "a~b": "3"}}),
    ("root replaced", [1], {"a": 1}),
    ("plain list", {"l": [1, 2]}, {"l": [0, 1, 2]}),
    (
        "named insert front and middle",
        {"c": [{"name": "a", "v": 1}, {"name": "b"}]},
        {"c": [{"name": "x"}, {"name": "a", "v": 2}, {"name": "y"}, {"name": "b"}, {"name": "z"}]},
    ),
    (
        "named reorder falls back",
        {"c": [{"name": "a"}, {"name": "b"}]},
        {"c": [{"name": "b"}, {"name": "a"}]},
    ),
    ("named removal falls back", {"c": [{"name": "a"}, {"name": "b"}]}, {"c": [{"name": "a"}]}),
    ("bool vs int", {"a": 1}, {"a": True}),
]


@pytest.mark.parametrize(("name", "original", "desired"), CASES, ids=[c[0] for c in CASES])
def test_patch_applies_to_desired(name: str, original: Any, desired: Any) -> None:
    ops = diff(original, desired)
    assert jsonpatch.apply_patch(original, ops) == desired
    if name == "equal":
        assert ops == []


def test_named_insert_is_one_add_per_new_item() -> None:
    ops = diff(
        {"c": [{"name": "app", "image": "a"}]}, {"c": [{"name": "proxy"}, {"name": "app", "image": "a"}]}
    )
    assert ops == [{"op": "add", "path": "/c/0", "value": {"name": "proxy"}}]


def test_bool_is_not_equal_to_int() -> None:
    assert diff({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]
    assert diff({"l": [1, 0]}, {"l": [True, False]}) == [
        {"op": "replace", "path": "/l", "value": [True, False]}
    ]
    assert diff({"a": 1.0}, {"a": 1}) == [{"op": "replace", "path": "/a", "value": 1}]
