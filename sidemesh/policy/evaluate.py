"""Evaluation: may this peer make this request of this workload? Every decision has a reason."""

from __future__ import annotations

from collections.abc import Sequence

from sidemesh.policy.model import (
    Authorization,
    Decision,
    DefaultPolicy,
    HTTPMatch,
    Mode,
    Peer,
    Request,
    Rule,
    Source,
)


def _name_matches(pattern: str, value: str) -> bool:
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern


def source_matches(source: Source, peer: Peer, policy_namespace: str, trust_domain: str) -> bool:
    if source.unauthenticated:
        return not peer.authenticated
    if not peer.authenticated or peer.trust_domain != trust_domain:
        return False
    if peer.namespace is None or peer.service_account is None:
        return False  # authenticated, but not a workload a rule can name
    if source.service_account is not None:
        namespace = source.namespace or policy_namespace
        return _name_matches(namespace, peer.namespace) and _name_matches(
            source.service_account, peer.service_account
        )
    return source.namespace is not None and _name_matches(source.namespace, peer.namespace)


def path_matches(pattern: str, path: str) -> bool:
    path = path.split("?", 1)[0]
    if pattern.endswith("/*"):
        prefix = pattern[:-1]  # "/cart/*" matches "/cart" and everything under "/cart/"
        return path == prefix[:-1] or path.startswith(prefix)
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


def http_matches(match: HTTPMatch | None, request: Request) -> bool:
    if match is None:
        return True
    if request.method is None:  # an opaque connection cannot satisfy an HTTP condition
        return False
    # Methods are case-sensitive (RFC 9110 9.1): `get` is not GET, and an app may treat it as a write.
    if match.methods and request.method not in match.methods:
        return False
    return not match.paths or any(path_matches(p, request.path or "/") for p in match.paths)


def rule_matches(rule: Rule, policy: Authorization, request: Request, trust_domain: str) -> bool:
    if rule.ports and request.port not in rule.ports:
        return False
    if not any(source_matches(s, request.peer, policy.namespace, trust_domain) for s in rule.sources):
        return False
    return http_matches(rule.http, request)


def _first_allowing(
    policies: Sequence[Authorization], request: Request, trust_domain: str
) -> tuple[Authorization, int] | None:
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            if rule_matches(rule, policy, request, trust_domain):
                return policy, index
    return None


def _default(default: DefaultPolicy, peer: Peer, trust_domain: str) -> Decision:
    if default is DefaultPolicy.ALLOW_ALL:
        return Decision(True, "default allow-all")
    if default is DefaultPolicy.ALLOW_AUTHENTICATED:
        if not peer.authenticated:
            return Decision(False, "default allow-authenticated: client is not authenticated")
        if peer.trust_domain != trust_domain:
            return Decision(
                False,
                f"default allow-authenticated: client is in trust domain {peer.trust_domain}, not {trust_domain}",
            )
        return Decision(True, "default allow-authenticated")
    return Decision(False, "default deny: no ServiceAuthorization selects this workload")


def evaluate(
    policies: Sequence[Authorization], default: DefaultPolicy, request: Request, trust_domain: str
) -> Decision:
    """Decide ``request`` against the policies that select the workload.

    The policies in ``enforce`` mode decide when there is at least one: allowed iff some rule
    allows. With none, the default decides. Policies in ``audit`` mode never change the decision:
    when what they would deny (were they enforced) is allowed, the decision is marked ``audit`` and
    its reason names them, so it is logged and counted while rolling a policy out.
    """
    ordered = sorted(policies, key=lambda p: p.ref)
    enforced = [p for p in ordered if p.mode is Mode.ENFORCE]
    audited = [p for p in ordered if p.mode is Mode.AUDIT]
    if enforced:
        hit = _first_allowing(enforced, request, trust_domain)
        if hit is None:
            names = ", ".join(p.ref for p in enforced)
            broken = [p.ref for p in enforced if p.invalid]
            why = f" ({', '.join(broken)}: invalid, allows nothing until fixed)" if broken else ""
            return Decision(False, f"no rule of {names} allows it{why}", names)
        decision = Decision(True, f"allowed by {hit[0].ref} rule {hit[1]}", hit[0].ref, hit[1])
    else:
        decision = _default(default, request.peer, trust_domain)
        if not decision.allowed and audited:  # (they select it, but never decide)
            names = ", ".join(p.ref for p in audited)
            why = decision.reason.replace("no ServiceAuthorization", "no enforce-mode ServiceAuthorization")
            decision = Decision(False, f"{why} (audit-mode: {names})")
    if decision.allowed and audited and _first_allowing(audited, request, trust_domain) is None:
        names = ", ".join(p.ref for p in audited)
        return Decision(
            True,
            f"{decision.reason}; audit: {names} would deny it",
            decision.policy,
            decision.rule,
            audit=True,
        )
    return decision
