"""YAML read as kubectl reads it, for the Kubernetes-style files the mesh takes.

kubectl (sigs.k8s.io/yaml, go-yaml v2) reads YAML 1.1 but without base-60 numbers, the `=` value
tag, and timestamps (kept as strings when read into plain values, for compatibility). PyYAML's
SafeLoader has all three: `22:30` became the integer 1350, `1:30` 90, `2030-01-01` a date, and a
plain `=` failed the whole file, where kubectl keeps each a string. ``Loader`` is PyYAML's safe
loader (libyaml's when PyYAML has it) without those three; everything else (`yes`, octal, hex,
`1_000`, `.inf`) is read as before. Where go-yaml reads a number or a boolean that PyYAML keeps a
string (`y`, `n`, `1e3`, `0o17`), the string stays: a value kubectl would refuse in a string field
is taken as the string it looks like (and written back quoted), nothing is lost.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BASE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_DROPPED = frozenset({"tag:yaml.org,2002:value", "tag:yaml.org,2002:timestamp"})
# PyYAML's YAML 1.1 patterns, without their base-60 alternatives
_PATTERNS = {
    _INT: re.compile(
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    _FLOAT: re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
}


class Loader(_BASE):  # type: ignore[misc]
    """PyYAML's safe loader, resolving plain scalars as kubectl does (see the module)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, _PATTERNS.get(tag, pattern)) for tag, pattern in resolvers if tag not in _DROPPED]
    for first, resolvers in _BASE.yaml_implicit_resolvers.items()
}


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=Loader))
