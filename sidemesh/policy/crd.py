"""ServiceAuthorization documents (the CRD's JSON) -> domain values, with errors a person reads.

The CRD schema refuses most of these in a cluster; this check is for what reaches us anyway (the
directory source, `sidemesh authz check` on files) and must never be less strict than the schema.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from sidemesh.policy.model import Authorization, HTTPMatch, LabelExpression, Mode, Rule, Source
from sidemesh.policy.paths import normalize_path

API_VERSION = "sidemesh.io/v1alpha1"
KIND = "ServiceAuthorization"
# Namespaces are DNS-1123 labels; ServiceAccount names are DNS-1123 subdomains (dots allowed).
_NAME_RE = {
    "namespace": re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\*?|\*"),
    "serviceAccount": re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\*?|\*"),
}
# Visible ASCII but * ? # \ and %, which comes as an escape (%C3): manifests/crds has the same.
_PATH_RE = re.compile(r"/([\x21\x22\x24\x26-\x29\x2B-\x3E\x40-\x5B\x5D-\x7E]|%[0-9A-Fa-f]{2})*\*?")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# The CRD schema's limits (manifests/crds/serviceauthorization.yaml), enforced here too.
MAX_RULES = MAX_SOURCES = MAX_PORTS = MAX_PATHS = MAX_LABELS = 64
MAX_METHODS = 16
MAX_PATH_LENGTH = 1024
MAX_LABEL_VALUE = 63
MAX_LABEL_KEY = 317  # a DNS subdomain prefix (253), a slash, a name (63)
MAX_EXPRESSIONS = 16
MAX_NAME = {"serviceAccount": 254, "namespace": 64}


class PolicyError(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


_NULL = "is null (an empty value in a template?): give a value, or leave the field out"


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        raise PolicyError(where, _NULL)
    if not isinstance(value, dict):
        raise PolicyError(where, f"must be an object, got {type(value).__name__}")
    for key, item in value.items():  # a null would read as "not given": a wider policy
        if not isinstance(key, str):  # (YAML's 8080: x; JSON keys are always strings)
            raise PolicyError(where, f"field name {key!r} is not a string")
        if item is None:
            raise PolicyError(f"{where}.{key}", _NULL)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PolicyError(
            where, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _list(value: Any, where: str, *, nonempty: bool = False, limit: int = 64) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(where, f"must be a list, got {type(value).__name__}")
    if nonempty and not value:
        raise PolicyError(where, "must not be empty")
    if len(value) > limit:
        raise PolicyError(where, f"has {len(value)} items, at most {limit} are allowed")
    return value


def _name(value: Any, where: str) -> str:
    field = where.rsplit(".", 1)[-1]
    if not isinstance(value, str) or not _NAME_RE[field].fullmatch(value):
        raise PolicyError(where, f"{value!r} is not a Kubernetes name (a trailing * matches a prefix)")
    limit = MAX_NAME[field]
    if len(value) > limit:
        raise PolicyError(where, f"is {len(value)} characters long, at most {limit} are allowed")
    return value


def _source(doc: Any, where: str) -> Source:
    doc = _mapping(doc, where, {"serviceAccount", "namespace", "unauthenticated"})
    unauthenticated = doc.get("unauthenticated", False)
    if not isinstance(unauthenticated, bool):
        raise PolicyError(f"{where}.unauthenticated", "must be true or false")
    sa = _name(doc["serviceAccount"], f"{where}.serviceAccount") if "serviceAccount" in doc else None
    ns = _name(doc["namespace"], f"{where}.namespace") if "namespace" in doc else None
    if unauthenticated and (sa or ns):
        raise PolicyError(where, "unauthenticated: true cannot be combined with serviceAccount or namespace")
    if not unauthenticated and sa is None and ns is None:
        raise PolicyError(where, "names nobody: give serviceAccount, namespace, or unauthenticated: true")
    return Source(namespace=ns, service_account=sa, unauthenticated=unauthenticated)


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PolicyError(where, f"{value!r} is not a port number (1-65535)")
    return value


def _http(doc: Any, where: str) -> HTTPMatch:
    doc = _mapping(doc, where, {"methods", "paths"})
    methods = tuple(_list(doc.get("methods", []), f"{where}.methods", limit=MAX_METHODS))
    for i, m in enumerate(methods):
        if not isinstance(m, str) or m not in METHODS:
            raise PolicyError(
                f"{where}.methods[{i}]",
                f"{m!r} is not an HTTP method in upper case ({', '.join(sorted(METHODS))})",
            )
    paths = tuple(_list(doc.get("paths", []), f"{where}.paths", limit=MAX_PATHS))
    for i, p in enumerate(paths):
        if isinstance(p, str) and len(p) > MAX_PATH_LENGTH:
            raise PolicyError(
                f"{where}.paths[{i}]", f"is {len(p)} characters long, at most {MAX_PATH_LENGTH} are allowed"
            )
        if isinstance(p, str) and p.startswith("/") and not p.isascii() and not any(c.isspace() for c in p):
            raise PolicyError(
                f"{where}.paths[{i}]",
                f"{p!r} can never match: write it in ASCII, other characters percent-encoded in upper "
                "case, as the sidecar sees requests' paths (/caf%C3%A9, not /café)",
            )
        if not isinstance(p, str) or not _PATH_RE.fullmatch(p):
            raise PolicyError(
                f"{where}.paths[{i}]", f"{p!r} is not a path: it starts with / and may end in * (prefix)"
            )
        if (normal := _as_the_sidecar_sees(p)) != p:
            raise PolicyError(
                f"{where}.paths[{i}]",
                f"{p!r} can never match: the sidecar compares requests' normalized paths (write {normal!r})",
            )
    return HTTPMatch(methods=methods, paths=paths)


def _as_the_sidecar_sees(path: str) -> str:
    """A policy path (``*`` for a prefix; ASCII with whole %XX escapes, as ``_PATH_RE`` made sure)
    written as the sidecar sees requests' paths (dot segments removed, unreserved characters
    decoded, other escapes in upper case: ``paths.normalize_path``)."""
    prefix = path.endswith("*")
    base = path[:-1] if prefix else path
    # (a prefix may end inside a segment: "/cart/." is a prefix of "/cart/.well-known")
    normal = normalize_path(base.encode("ascii") + (b"x" if prefix else b"")).decode("ascii")
    return (normal[:-1] + "*") if prefix else normal


def _rule(doc: Any, where: str) -> Rule:
    doc = _mapping(doc, where, {"from", "to"})
    if "from" not in doc:
        raise PolicyError(where, "a rule needs 'from' (who is allowed)")
    sources = tuple(
        _source(s, f"{where}.from[{i}]")
        for i, s in enumerate(_list(doc["from"], f"{where}.from", nonempty=True))
    )
    to = _mapping(doc.get("to", {}), f"{where}.to", {"ports", "http"})
    ports = tuple(
        _port(p, f"{where}.to.ports[{i}]")
        for i, p in enumerate(_list(to.get("ports", []), f"{where}.to.ports"))
    )
    http = _http(to["http"], f"{where}.to.http") if "http" in to else None
    return Rule(sources=sources, ports=ports, http=http)


def stand_in(
    doc: Any, error: str, default_namespace: str | None = None, unnamed: str | None = None
) -> Authorization | None:
    """What a ServiceAuthorization that cannot be read enforces until it is fixed: nothing is allowed
    to the workloads it selects (fail closed; Istio, too, drops the ALLOW rules it cannot read,
    never the policy). Its selector as written when that can be read, else every workload of its
    namespace; audit mode if it says so. None when it names no policy (no name or namespace),
    unless ``unnamed`` is given: the name it stands in under (a directory's file and document;
    the API server never keeps an object without a name, a directory of YAML does).

    Without this, an invalid policy was skipped and its workloads fell back to the default policy:
    a typo (or a null the API server pruned into something else) opened them to every caller."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        meta = {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        if unnamed is None:
            return None
        name = unnamed
    namespace = meta.get("namespace") or default_namespace
    if not isinstance(namespace, str) or not namespace:
        return None
    spec = doc.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    selector = spec.get("selector", {})
    labels = selector.get("matchLabels", {}) if isinstance(selector, dict) else None
    readable = isinstance(labels, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    )
    expressions: tuple[LabelExpression, ...] = ()
    if readable and isinstance(selector, dict) and "matchExpressions" in selector:
        # (unreadable: the labels alone, which select more: still allowing nothing)
        with contextlib.suppress(PolicyError):
            expressions = _expressions(selector["matchExpressions"], "matchExpressions")
    return Authorization(
        name=name,
        namespace=namespace,
        selector=tuple(sorted(labels.items())) if readable and isinstance(labels, dict) else (),
        rules=(),
        mode=Mode.AUDIT if spec.get("mode") == Mode.AUDIT.value else Mode.ENFORCE,
        invalid=error or "invalid",
        expressions=expressions,
    )


OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _expressions(raw: Any, where: str) -> tuple[LabelExpression, ...]:
    """A selector's matchExpressions, checked as Kubernetes checks a LabelSelector: In and NotIn
    with at least one value, Exists and DoesNotExist with none."""
    out = []
    for i, item in enumerate(_list(raw, where, limit=MAX_EXPRESSIONS)):
        at = f"{where}[{i}]"
        doc = _mapping(item, at, {"key", "operator", "values"})
        key, operator = doc.get("key"), doc.get("operator")
        if not isinstance(key, str) or not key:
            raise PolicyError(f"{at}.key", "needs a label key (a non-empty string)")
        if len(key) > MAX_LABEL_KEY:
            raise PolicyError(
                f"{at}.key", f"is {len(key)} characters long, at most {MAX_LABEL_KEY} are allowed"
            )
        if operator not in OPERATORS:
            raise PolicyError(f"{at}.operator", f"{operator!r} is not one of {', '.join(OPERATORS)}")
        values = _list(doc.get("values", []), f"{at}.values", limit=MAX_LABELS)
        if not all(isinstance(v, str) for v in values):
            raise PolicyError(f"{at}.values", "must be strings")
        if any(len(v) > MAX_LABEL_VALUE for v in values):
            raise PolicyError(f"{at}.values", f"values of at most {MAX_LABEL_VALUE} characters")
        if operator in ("In", "NotIn") and not values:
            raise PolicyError(at, f"{operator} needs values; Exists and DoesNotExist take none")
        if operator in ("Exists", "DoesNotExist") and values:
            raise PolicyError(at, f"{operator} takes no values; In and NotIn need them")
        out.append(LabelExpression(key, operator, tuple(values)))
    return tuple(out)


def parse(doc: Any, default_namespace: str | None = None) -> Authorization:
    """Convert one ServiceAuthorization document; raise :class:`PolicyError` saying where and why."""
    top = _mapping(doc, KIND, {"apiVersion", "kind", "metadata", "spec", "status"})
    if top.get("apiVersion") != API_VERSION or top.get("kind") != KIND:
        raise PolicyError(KIND, f"expected apiVersion {API_VERSION} and kind {KIND}")
    meta = top.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise PolicyError("metadata", "needs a name")
    name = meta["name"]
    namespace = meta.get("namespace") or default_namespace
    if not isinstance(namespace, str) or not namespace:
        raise PolicyError("metadata", "needs a namespace (ServiceAuthorization is namespaced)")
    where = f"{namespace}/{name}: spec"
    if "spec" not in top:
        raise PolicyError(where, "must be an object (it is missing)")
    spec = _mapping(top["spec"], where, {"selector", "rules", "mode"})
    selector = _mapping(spec.get("selector", {}), f"{where}.selector", {"matchLabels", "matchExpressions"})
    raw_labels = selector.get("matchLabels", {})
    labels = _mapping(  # any key is allowed; _mapping refuses what is not a mapping
        raw_labels,
        f"{where}.selector.matchLabels",
        set(raw_labels) if isinstance(raw_labels, dict) else set(),
    )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PolicyError(f"{where}.selector.matchLabels", "keys and values must be strings")
    if len(labels) > MAX_LABELS or any(len(v) > MAX_LABEL_VALUE for v in labels.values()):
        raise PolicyError(
            f"{where}.selector.matchLabels",
            f"at most {MAX_LABELS} labels, values of at most {MAX_LABEL_VALUE} characters",
        )
    expressions = _expressions(selector.get("matchExpressions", []), f"{where}.selector.matchExpressions")
    rules = tuple(
        _rule(r, f"{where}.rules[{i}]") for i, r in enumerate(_list(spec.get("rules", []), f"{where}.rules"))
    )
    try:
        mode = Mode(spec.get("mode", "enforce"))
    except ValueError:
        raise PolicyError(f"{where}.mode", f"{spec.get('mode')!r} is not enforce or audit") from None
    return Authorization(
        name=name,
        namespace=namespace,
        selector=tuple(sorted(labels.items())),
        rules=rules,
        mode=mode,
        expressions=expressions,
    )
