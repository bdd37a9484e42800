"""JSON Patch (RFC 6902) from an original and a desired document (no I/O).

Like `jsonpatch.make_patch`, with two differences that matter for a pod:
- Lists of named objects (containers, initContainers, volumes) are aligned by name. Inserting the
  sidecar in front of the app container becomes one `add` at index 0 instead of rewriting the app
  container into the sidecar field by field and re-adding the app after it: the same result, but a
  patch a person can review (the golden files) and no accident of alignment.
- Values are not deep-copied or re-encoded: it is about 20 times faster on a pod, which matters in
  an admission webhook on the API server's request path.

`tests/unit/injector/test_patch.py` checks `jsonpatch.apply_patch(original, diff(original, desired))
== desired` for every golden case.
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def escape(key: str) -> str:
    """A key as a JSON Pointer token (RFC 6901): `~` -> `~0`, `/` -> `~1`."""
    return key.replace("~", "~0").replace("/", "~1") if "~" in key or "/" in key else key


def diff(original: Any, desired: Any, path: str = "") -> list[Op]:
    if original is desired:  # the desired pod shares every unchanged sub-object with the original
        return []
    if isinstance(original, dict) and isinstance(desired, dict):
        return _dicts(original, desired, path)
    if isinstance(original, list) and isinstance(desired, list):
        if same(original, desired):
            return []
        if _named(original) and _named(desired):
            aligned = _named_lists(original, desired, path)
            if aligned is not None:
                return aligned
    elif same(original, desired):
        return []
    return [{"op": "replace", "path": path, "value": desired}]


def same(a: Any, b: Any) -> bool:
    """Equal as JSON: unlike ==, true is not 1 (Python's True == 1)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _dicts(original: dict[str, Any], desired: dict[str, Any], path: str) -> list[Op]:
    ops: list[Op] = []
    for key, value in desired.items():
        child = f"{path}/{escape(key)}"
        if key not in original:
            ops.append({"op": "add", "path": child, "value": value})
        else:
            ops.extend(diff(original[key], value, child))
    ops.extend({"op": "remove", "path": f"{path}/{escape(key)}"} for key in original if key not in desired)
    return ops


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in items)


def _named_lists(original: list[Any], desired: list[Any], path: str) -> list[Op] | None:
    """Ops that insert desired's new items and patch the common ones in place, when the original's
    names appear in desired in the same order (only insertions); None otherwise."""
    ops: list[Op] = []
    j = 0
    for i, item in enumerate(desired):
        if j < len(original) and original[j]["name"] == item["name"]:
            ops.extend(diff(original[j], item, f"{path}/{i}"))
            j += 1
        else:
            ops.append({"op": "add", "path": f"{path}/{i}", "value": item})
    return ops if j == len(original) else None
