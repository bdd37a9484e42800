from __future__ import annotations

import pytest

from sidemesh.spiffe import SpiffeId, SpiffeIdError, WorkloadId, validate_trust_domain


@pytest.mark.parametrize(
    ("uri", "td", "path"),
    [
        ("spiffe://cluster.local/ns/shop/sa/cart", "cluster.local", "/ns/shop/sa/cart"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://a_b-c.d/x.y/Z-9_", "a_b-c.d", "/x.y/Z-9_"),
    ],
)
def test_valid_ids(uri: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == uri


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://cluster.local/ns/a/sa/b", "does not start with"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe://Cluster.Local/ns/a", "lowercase"),
        ("spiffe://td/ns//sa", "empty"),
        ("spiffe://td/ns/./sa", "'.'"),
        ("spiffe://td/ns/../sa", "'..'"),
        ("spiffe://td/ns/a?x=1", "query"),
        ("spiffe://td/ns/a#frag", "fragment"),
        ("spiffe://td:443/ns/a", "port"),
        ("spiffe://user@td/ns/a", "user info"),
        ("spiffe://td/ns/a b", "forbidden character"),
        ("spiffe://td/ns/a/", "empty"),
        ("spiffe://td/" + "a" * 2100, "longer than 2048"),
        # "$" in a regular expression also matches before a final newline: every part is checked whole.
        ("spiffe://example.org\n", "lowercase"),
        ("spiffe://example.org\n/ns/a/sa/b", "lowercase"),
        ("spiffe://example.org/ns/a/sa/b\n", "forbidden character"),
    ],
)
def test_invalid_ids(uri: str, why: str) -> None:
    with pytest.raises(SpiffeIdError, match=why):
        SpiffeId.parse(uri)


def test_workload_id_round_trip() -> None:
    wid = WorkloadId.parse("shop/cart")
    sid = wid.spiffe_id("cluster.local")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/cart"
    assert WorkloadId.from_spiffe_id(sid) == wid
    assert str(wid) == "shop/cart"


@pytest.mark.parametrize(
    "text", ["shop", "Shop/cart", "shop/", "/cart", "shop/cart_1", "shop/-cart", "shop\n/cart", "shop/cart\n"]
)
def test_invalid_workload_ids(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        WorkloadId.parse(text)


def test_a_spiffe_id_where_namespace_and_account_go_says_what_to_give() -> None:
    """It said "namespace 'spiffe:' is not a valid Kubernetes name"."""
    with pytest.raises(
        SpiffeIdError, match=r"is a SPIFFE ID: give shop/cart \(the trust domain is its own option\)"
    ):
        WorkloadId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    with pytest.raises(SpiffeIdError, match=r"is a SPIFFE ID: give <namespace>/<serviceaccount>"):
        WorkloadId.parse("spiffe://cluster.local/shop/cart")


def test_non_workload_spiffe_id() -> None:
    with pytest.raises(SpiffeIdError, match="not of the form"):
        WorkloadId.from_spiffe_id(SpiffeId.parse("spiffe://td/ns/shop/pod/x"))


def test_a_trust_domain_with_a_trailing_newline_is_refused() -> None:
    # The case: SIDEMESH_TRUST_DOMAIN from a ConfigMap's "|" block ends in a newline; the CA would
    # otherwise issue a URI SAN no other SPIFFE implementation can parse.
    with pytest.raises(SpiffeIdError, match="lowercase"):
        validate_trust_domain("cluster.local\n")
