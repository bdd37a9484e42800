"""Evaluation cases: who may call, on which port, with which request, and why."""

from __future__ import annotations

import pytest

from sidemesh.policy.evaluate import evaluate, path_matches
from sidemesh.policy.model import Authorization, DefaultPolicy, HTTPMatch, Mode, Peer, Request, Rule, Source

TD = "cluster.local"
FRONTEND = Peer(TD, "shop", "frontend")
STRANGER = Peer(TD, "shop", "stranger")
PROMETHEUS = Peer(TD, "monitoring", "prometheus")
BATCH_7 = Peer(TD, "shop", "batch-7")
OTHER_TD = Peer("evil.example", "shop", "frontend")
NOT_A_WORKLOAD = Peer(TD)
PLAIN = Peer()


def policy(name: str, *rules: Rule, mode: Mode = Mode.ENFORCE) -> Authorization:
    return Authorization(name, "shop", (("app", "cart"),), rules, mode)


ALLOW_FRONTEND = policy("allow-frontend", Rule((Source(service_account="frontend"),), (8080,)))
ALLOW_MONITORING = policy("allow-monitoring", Rule((Source(namespace="monitoring"),), (9090,)))
ALLOW_BATCH = policy("allow-batch", Rule((Source(service_account="batch-*"),)))
ALLOW_HTTP = policy(
    "allow-http",
    Rule((Source(service_account="frontend"),), (8080,), HTTPMatch(("GET", "POST"), ("/cart/*", "/health"))),
)
ALLOW_PLAIN = policy("allow-plain", Rule((Source(unauthenticated=True),), (8080,)))
AUDIT = policy("audit-frontend", Rule((Source(service_account="frontend"),)), mode=Mode.AUDIT)
NO_RULES = policy("deny-all")

CASES = [
    # (policies, default, peer, port, method, path, allowed, reason contains)
    ([], DefaultPolicy.DENY, FRONTEND, 8080, None, None, False, "default deny"),
    ([], DefaultPolicy.ALLOW_AUTHENTICATED, FRONTEND, 8080, None, None, True, "default allow-authenticated"),
    ([], DefaultPolicy.ALLOW_AUTHENTICATED, PLAIN, 8080, None, None, False, "not authenticated"),
    # Authenticated by a certificate some other CA in the bundle signed, for another trust domain.
    (
        [],
        DefaultPolicy.ALLOW_AUTHENTICATED,
        OTHER_TD,
        8080,
        None,
        None,
        False,
        "in trust domain evil.example",
    ),
    # Authenticated, but no workload (an ID outside /ns/<ns>/sa/<sa>): no rule naming workloads matches.
    ([ALLOW_FRONTEND], DefaultPolicy.ALLOW_ALL, NOT_A_WORKLOAD, 8080, None, None, False, "no rule"),
    ([ALLOW_MONITORING], DefaultPolicy.ALLOW_ALL, NOT_A_WORKLOAD, 9090, None, None, False, "no rule"),
    ([], DefaultPolicy.ALLOW_ALL, PLAIN, 8080, None, None, True, "default allow-all"),
    (
        [ALLOW_FRONTEND],
        DefaultPolicy.ALLOW_ALL,
        FRONTEND,
        8080,
        None,
        None,
        True,
        "shop/allow-frontend rule 0",
    ),
    (
        [ALLOW_FRONTEND],
        DefaultPolicy.ALLOW_ALL,
        STRANGER,
        8080,
        None,
        None,
        False,
        "no rule of shop/allow-frontend",
    ),
    ([ALLOW_FRONTEND], DefaultPolicy.ALLOW_ALL, FRONTEND, 9090, None, None, False, "no rule"),
    ([ALLOW_FRONTEND], DefaultPolicy.ALLOW_ALL, OTHER_TD, 8080, None, None, False, "no rule"),
    ([ALLOW_FRONTEND], DefaultPolicy.ALLOW_ALL, PLAIN, 8080, None, None, False, "no rule"),
    (
        [ALLOW_FRONTEND, ALLOW_MONITORING],
        DefaultPolicy.DENY,
        PROMETHEUS,
        9090,
        None,
        None,
        True,
        "shop/allow-monitoring rule 0",
    ),
    ([ALLOW_FRONTEND, ALLOW_MONITORING], DefaultPolicy.DENY, PROMETHEUS, 8080, None, None, False, "no rule"),
    ([ALLOW_BATCH], DefaultPolicy.DENY, BATCH_7, 1234, None, None, True, "allow-batch"),
    ([ALLOW_BATCH], DefaultPolicy.DENY, FRONTEND, 1234, None, None, False, "no rule"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "GET", "/cart/1", True, "allow-http"),
    # Methods are case-sensitive (RFC 9110 9.1): HTTP/2 passes `get` as sent, and it is not GET.
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "get", "/cart/1", False, "no rule"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "Post", "/cart/1", False, "no rule"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "GET", "/cart", True, "allow-http"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "GET", "/cartography", False, "no rule"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "DELETE", "/cart/1", False, "no rule"),
    ([ALLOW_HTTP], DefaultPolicy.DENY, FRONTEND, 8080, "GET", "/health?x=1", True, "allow-http"),
    (
        [ALLOW_HTTP],
        DefaultPolicy.DENY,
        FRONTEND,
        8080,
        None,
        None,
        False,
        "no rule",
    ),  # opaque TCP never meets HTTP rules
    ([ALLOW_PLAIN], DefaultPolicy.DENY, PLAIN, 8080, None, None, True, "allow-plain"),
    ([ALLOW_PLAIN], DefaultPolicy.DENY, FRONTEND, 8080, None, None, False, "no rule"),
    ([NO_RULES], DefaultPolicy.ALLOW_ALL, FRONTEND, 8080, None, None, False, "no rule of shop/deny-all"),
    # Audit-mode policies never change a decision; they mark what they would deny.
    ([AUDIT], DefaultPolicy.DENY, FRONTEND, 8080, None, None, False, "default deny"),  # opens nothing
    (
        [AUDIT],
        DefaultPolicy.ALLOW_AUTHENTICATED,
        STRANGER,
        8080,
        None,
        None,
        True,
        "audit: shop/audit-frontend would deny it",
    ),
    (
        [AUDIT],
        DefaultPolicy.ALLOW_AUTHENTICATED,
        FRONTEND,
        8080,
        None,
        None,
        True,
        "default allow-authenticated",
    ),
    (
        [AUDIT, ALLOW_BATCH],
        DefaultPolicy.DENY,
        BATCH_7,
        80,
        None,
        None,
        True,
        "allowed by shop/allow-batch rule 0; audit",
    ),
    (
        [AUDIT, ALLOW_FRONTEND],
        DefaultPolicy.DENY,
        STRANGER,
        8080,
        None,
        None,
        False,
        "no rule of shop/allow-frontend",
    ),
]


@pytest.mark.parametrize(
    ("policies", "default", "peer", "port", "method", "path", "allowed", "reason"), CASES
)
def test_evaluation(
    policies: list[Authorization],
    default: DefaultPolicy,
    peer: Peer,
    port: int,
    method: str | None,
    path: str | None,
    allowed: bool,
    reason: str,
) -> None:
    decision = evaluate(policies, default, Request(peer, port, method, path), TD)
    assert decision.allowed is allowed
    assert reason in decision.reason


def test_audit_decisions_are_marked() -> None:
    decision = evaluate([AUDIT], DefaultPolicy.ALLOW_ALL, Request(STRANGER, 8080), TD)
    assert decision.audit and decision.label == "audit_deny"
    assert not evaluate([AUDIT], DefaultPolicy.ALLOW_ALL, Request(FRONTEND, 8080), TD).audit
    denied = evaluate([ALLOW_FRONTEND, ALLOW_MONITORING], DefaultPolicy.DENY, Request(STRANGER, 8080), TD)
    assert denied.policy == "shop/allow-frontend, shop/allow-monitoring"  # the denials metric's label
    assert evaluate([ALLOW_FRONTEND], DefaultPolicy.DENY, Request(FRONTEND, 8080), TD).label == "allow"
    assert evaluate([ALLOW_FRONTEND], DefaultPolicy.DENY, Request(STRANGER, 8080), TD).label == "deny"


def test_a_default_denial_under_audit_policies_does_not_say_nothing_selects_the_workload() -> None:
    """It said "no ServiceAuthorization selects this workload" while an audit-mode one did."""
    decision = evaluate([AUDIT], DefaultPolicy.DENY, Request(FRONTEND, 8080), TD)
    assert not decision.allowed
    assert decision.reason == (
        "default deny: no enforce-mode ServiceAuthorization selects this workload (audit-mode: shop/audit-frontend)"
    )


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/cart/*", "/cart/1", True),
        ("/cart/*", "/cart", True),
        ("/cart/*", "/cart/", True),
        ("/cart/*", "/carts", False),
        ("/exact", "/exact", True),
        ("/exact", "/exact/", False),
        ("/pre*", "/prefix", True),
        ("/", "/", True),
        ("/*", "/x/y", True),
    ],
)
def test_paths(pattern: str, path: str, matches: bool) -> None:
    assert path_matches(pattern, path) is matches
