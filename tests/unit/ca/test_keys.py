"""The signing authority's limits: no leaf outlives any certificate its chain ends at."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from ca import keys, templates
from tests.support import pki

NOW = dt.datetime(2026, 12, 5, 6, 0, tzinfo=dt.UTC)


def test_a_leaf_may_not_outlive_the_root_an_intermediate_chains_to() -> None:
    """An operator's own PKI: the intermediate was issued for longer than its root lives (the CA's
    own bootstrap never does that). Leaves end with the root, not with the intermediate."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=1))
    inter_key = templates.new_key()
    clamped = templates.intermediate_certificate(
        inter_key.public_key(), "cluster.local", root, root_key, NOW, dt.timedelta(days=1)
    )
    inter = pki.reissued(clamped, root_key, NOW, NOW + dt.timedelta(days=30))
    assert inter.not_valid_after_utc > root.not_valid_after_utc

    authority = keys.assemble(inter, inter_key, [inter, root], [root])
    assert authority.not_after_limit == root.not_valid_after_utc

    # A root that did not issue the chain (a newer one, kept in the bundle for rotation) does not count.
    other_key = templates.new_key()
    other = templates.root_certificate(other_key, "cluster.local", NOW, dt.timedelta(hours=1))
    authority = keys.assemble(inter, inter_key, [inter, root], [root, other])
    assert authority.not_after_limit == root.not_valid_after_utc


def test_signing_certificates_have_no_leaf_key_usage() -> None:
    """X509-SVID appendix A: digitalSignature if and only if the certificate is a leaf."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=10))
    inter = templates.intermediate_certificate(
        templates.new_key().public_key(), "cluster.local", root, root_key, NOW, dt.timedelta(days=1)
    )
    for cert in (root, inter):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
