"""`sidemesh inject`: the webhook's patcher applied to YAML files (no I/O here but the caller's).

Every pod template is injected where its kind keeps it; `List` documents are walked; objects of other
kinds pass through unchanged; what is not a Kubernetes object is refused (``NotAnObject``). Comments and key order of the input are not preserved (PyYAML).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from injector import patch
from injector.errors import PodError
from injector.settings import InjectionSettings
from sidemesh import kubeyaml

Json = dict[str, Any]

# kind -> where its pod template is
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


# kubectl reads YAML with go-yaml v2 (YAML 1.1 and Go's number parsing), which takes more plain
# scalars for booleans and numbers than PyYAML does: y/n/Y/N, 1e3, 0o17, 1_000. A string that
# could be read as anything but a string is written quoted (over-quoting is harmless).
_NOT_STRINGS = frozenset(
    ["y", "yes", "n", "no", "true", "false", "on", "off", "null", "~", "", ".inf", "-.inf", "+.inf", ".nan"]
)  # compared in lower case: a few more are quoted than need be
_NUMBER_LIKE = re.compile(r"[-+]?\.?[0-9]")


class _Dumper(yaml.SafeDumper):
    """No &anchors/*aliases for objects the patcher shares between places: plain YAML for kubectl."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    quoted = data.lower() in _NOT_STRINGS or _NUMBER_LIKE.match(data) is not None
    # Line breaks YAML 1.1 readers (go-yaml, so kubectl) fold in other styles: NEL, LS, PS are
    # escaped only in double quotes (\N, \L, \P) once non-ASCII is written as it is.
    quoted = quoted or any(ch in data for ch in "\x85\u2028\u2029")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if quoted else None)


_Dumper.add_representer(str, _represent_str)


@dataclass(frozen=True, slots=True)
class Report:
    """What happened to one document, for the summary on stderr."""

    ref: str  # kind/name
    outcome: str  # injected, skipped, unchanged
    reason: str

    def __str__(self) -> str:
        return f"{self.ref} {self.outcome}" + (
            f" ({self.reason})" if self.reason and self.outcome != "unchanged" else ""
        )


def _ref(doc: Json) -> str:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return f"{str(doc.get('kind', '?')).lower()}/{meta.get('name') or meta.get('generateName') or '?'}"


class NotAnObject(PodError):
    """A document that is not a Kubernetes object at all (kubectl would refuse it too)."""


def _shape(value: Any) -> str:
    return {
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        list: "list",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _template(doc: Json, path: tuple[str, ...]) -> Json | None:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _with_template(doc: Json, path: tuple[str, ...], template: Json) -> Json:
    if not path:
        return template
    head, rest = path[0], path[1:]
    return {**doc, head: _with_template(doc[head], rest, template)}


def inject_document(doc: Any, settings: InjectionSettings) -> tuple[Any, list[Report]]:
    """The document with its pod template injected, and a report per workload it holds. What is not
    a Kubernetes object is refused, as kubectl refuses it ("Object 'Kind' is missing"): passed on
    unchanged, a file that was not a manifest at all (a typo'd path) came out as if injected."""
    if not isinstance(doc, dict):
        raise NotAnObject(f"not a Kubernetes object (a mapping with apiVersion and kind) but a {_shape(doc)}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise NotAnObject(f"an object without a kind (keys: {', '.join(map(str, list(doc)[:5])) or 'none'})")
    if doc.get("metadata") is not None and not isinstance(doc["metadata"], dict):
        raise NotAnObject(f"{kind}: metadata is a {_shape(doc['metadata'])}, not a mapping")
    if kind == "List":
        if doc.get("items") is None:  # (`items:` left empty: kubectl takes it for none)
            return doc, []
        if not isinstance(doc.get("items"), list):
            raise NotAnObject(f"List: items is a {_shape(doc.get('items'))}, not a list")
        items, reports = [], []
        for item in doc["items"]:
            new, found = inject_document(item, settings)
            items.append(new)
            reports.extend(found)
        return {**doc, "items": items}, reports
    ref = _ref(doc)
    path = TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return doc, [Report(ref, "unchanged", f"kind {kind} has no pod template")]
    template = _template(doc, path)
    if template is None:
        raise PodError(f"{ref}: no pod template at {'.'.join(path)}")
    try:
        result = patch.inject(template, settings)
    except PodError as exc:
        raise PodError(f"{ref}: {exc}") from None
    if not result.injected:
        return doc, [Report(ref, "skipped", result.reason)]
    return _with_template(doc, path, result.pod), [Report(ref, "injected", "; ".join(result.warnings))]


def inject_yaml(texts: Iterable[str], settings: InjectionSettings) -> tuple[str, list[Report]]:
    """Multi-document YAML in, multi-document YAML out; raises PodError or yaml.YAMLError."""
    out: list[Any] = []
    reports: list[Report] = []
    for text in texts:
        for doc in kubeyaml.load_all(text):  # as kubectl reads it: `22:30` stays a string
            if doc is None:
                continue
            new, found = inject_document(doc, settings)
            out.append(new)
            reports.extend(found)
    text = yaml.dump_all(
        out, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000, allow_unicode=True
    )  # (allow_unicode: "café" stays café, not "caf\xE9", as kubectl writes it)
    return text, reports
