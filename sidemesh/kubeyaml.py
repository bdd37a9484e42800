"""YAML read as kubectl reads it, for the Kubernetes-style files the mesh takes.

kubectl (sigs.k8s.io/yaml, go-yaml v2) reads YAML 1.1 in its own way, and PyYAML's SafeLoader
differed where it mattered: it read `22:30` as 1350 and `1:30` as 90 (YAML 1.1's base 60, which
go-yaml does not have), `2030-01-01` as a date (go-yaml keeps a string in plain values), failed
a whole file on a plain `=` (the value tag), and kept as strings what go-yaml reads as booleans and
numbers: `y`/`n`, `0o440`, `0X1F`, `1e3`, `+.5`, `08` (so `defaultMode: 0o440` came back out of
`sidemesh inject` as a string, which kubectl refuses). ``Loader`` is PyYAML's safe loader
(libyaml's when PyYAML has it) resolving plain scalars as go-yaml v2's resolve.go does: null and
booleans from its tables, then an integer as Go's ``ParseInt(s, 0, 64)`` reads it (underscores
removed: `0x`, `0o`, `0b`, a leading 0 for octal), then a float of its ``yamlStyleFloat`` form.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_BASE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_DROPPED = frozenset({_INT, _FLOAT, "tag:yaml.org,2002:value", "tag:yaml.org,2002:timestamp"})
# (A digit somewhere in a run of digits and underscores: a lookahead, then the run possessively.
# Written `[01_]*[01][01_]*` they backtracked in quadratic time: 0.9 s for 16,000 digits.)
_INT_RE = re.compile(
    r"""^[-+]?(?:0[bB](?=_*[01])[01_]++
    |0[oO](?=_*[0-7])[0-7_]++
    |0[xX](?=_*[0-9a-fA-F])[0-9a-fA-F_]++
    |0[0-7_]*+
    |[1-9][0-9_]*+)$""",
    re.X,
)
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:\.(?=_*[0-9])[0-9_]++|[0-9][0-9_]*+(?:\.[0-9_]*+)?)(?:[eE][-+]?(?=_*[0-9])[0-9_]++)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_OCTAL = re.compile(r"0[0-7]+")


class Loader(_BASE):  # type: ignore[misc]
    """PyYAML's safe loader, resolving plain scalars as kubectl does (see the module)."""

    bool_values = {**_BASE.bool_values, "y": True, "n": False}  # noqa: RUF012

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | float | str:
        raw = str(self.construct_scalar(node))
        text = raw.replace("_", "")
        sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
        try:  # (Go: a leading 0 is octal, which Python's base 0 refuses)
            value = sign * int(digits, 8 if _OCTAL.fullmatch(digits) else 0)
        except ValueError:  # more digits than Python converts (4,300): out of every range anyway
            value = 1 << 64
        if -(1 << 63) <= value < (1 << 64):  # Go's ParseInt, else ParseUint
            return value
        # Wider: go-yaml takes what its float form reads (decimal digits, within a float's range),
        # else keeps the text
        wide = float(text) if digits.isdigit() else math.inf
        return raw if math.isinf(wide) else wide


Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _DROPPED]
    for first, resolvers in _BASE.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))  # (before floats: 8 is an int)
Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
Loader.add_constructor(_INT, Loader.construct_yaml_int)


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=Loader))
