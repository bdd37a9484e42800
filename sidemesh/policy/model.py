"""The policy domain: who may call a workload, on which port, with which HTTP requests."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DefaultPolicy(enum.StrEnum):
    """What a workload selected by no ServiceAuthorization accepts."""

    DENY = "deny"
    ALLOW_AUTHENTICATED = "allow-authenticated"
    ALLOW_ALL = "allow-all"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"


@dataclass(frozen=True, slots=True)
class Source:
    """One entry of ``from``: a service account (in a namespace), any identity of a namespace, or
    plaintext clients. Names may end in ``*`` (prefix match)."""

    namespace: str | None = None
    service_account: str | None = None
    unauthenticated: bool = False


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # "/exact" or "/prefix/*"; empty: any path


@dataclass(frozen=True, slots=True)
class Rule:
    sources: tuple[Source, ...]
    ports: tuple[int, ...] = ()  # empty: any port
    http: HTTPMatch | None = None


@dataclass(frozen=True, slots=True)
class LabelExpression:
    """One of a selector's matchExpressions, as Kubernetes reads a LabelSelectorRequirement: In
    (the label is there, with one of the values), NotIn (absent, or none of them), Exists,
    DoesNotExist."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]  # matchLabels, sorted
    rules: tuple[Rule, ...]
    mode: Mode = Mode.ENFORCE
    # Non-empty: the resource could not be read (why). It stands in allowing nothing (crd.stand_in).
    invalid: str = ""
    expressions: tuple[LabelExpression, ...] = ()  # matchExpressions: all must hold, and matchLabels

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: dict[str, str]) -> bool:
        return (
            namespace == self.namespace
            and all(labels.get(k) == v for k, v in self.selector)
            and all(e.matches(labels) for e in self.expressions)
        )


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is calling: a verified SPIFFE identity's namespace and service account, or nobody."""

    trust_domain: str | None = None
    namespace: str | None = None
    service_account: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.trust_domain is not None


@dataclass(frozen=True, slots=True)
class Request:
    peer: Peer
    port: int
    method: str | None = None  # None: an opaque TCP connection
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # e.g. "policy shop/cart-allow-frontend rule 0", "default deny"
    policy: str | None = None
    rule: int | None = None
    audit: bool = False  # allowed only because the deciding policies are in audit mode

    @property
    def label(self) -> str:
        """A bounded-cardinality label for metrics."""
        return "allow" if self.allowed and not self.audit else ("audit_deny" if self.audit else "deny")
