"""Issuing an SVID for an authenticated identity: validate -> template -> sign (no I/O)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca import templates
from ca.csr import validate_csr
from ca.errors import InvalidRequest, SigningUnavailable
from ca.keys import SigningAuthority
from sidemesh.spiffe import SpiffeId

MAX_REQUESTABLE_TTL = dt.timedelta(days=366)


@dataclass(frozen=True, slots=True)
class TTLPolicy:
    default: dt.timedelta = dt.timedelta(hours=1)
    minimum: dt.timedelta = dt.timedelta(minutes=5)
    maximum: dt.timedelta = dt.timedelta(hours=24)

    def resolve(self, requested_seconds: int) -> dt.timedelta:
        """0 -> default; otherwise clamped to [minimum, maximum]. Negative or absurd -> error."""
        if requested_seconds < 0:
            raise InvalidRequest(f"ttl_seconds must not be negative, got {requested_seconds}")
        if requested_seconds > MAX_REQUESTABLE_TTL.total_seconds():
            raise InvalidRequest(
                f"ttl_seconds {requested_seconds} is out of range (at most {int(MAX_REQUESTABLE_TTL.total_seconds())}; "
                f"certificates live {self.minimum} .. {self.maximum})"
            )
        if requested_seconds == 0:
            return self.default
        return min(max(dt.timedelta(seconds=requested_seconds), self.minimum), self.maximum)


@dataclass(frozen=True, slots=True)
class Issued:
    certificate: x509.Certificate
    chain_pem: list[str]  # leaf first
    bundle_pem: list[str]
    spiffe_id: SpiffeId

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")


def issue(
    authority: SigningAuthority,
    identity: SpiffeId,
    csr_pem: str,
    ttl: dt.timedelta,
    now: dt.datetime,
    allowed_dns: frozenset[str] = frozenset(),
) -> Issued:
    valid = validate_csr(csr_pem, identity, allowed_dns)
    return sign(authority, templates.LeafParams(valid.spiffe_id, valid.public_key, ttl, now, valid.dns_names))


def sign(authority: SigningAuthority, params: templates.LeafParams) -> Issued:
    if templates.leaf_not_after(params.now, params.ttl, authority.chain) <= params.now:
        raise SigningUnavailable("the CA cannot issue now", "the CA's signing certificate has expired")
    cert = templates.leaf_builder(params, authority.cert, authority.chain).sign(
        authority.key, hashes.SHA256()
    )
    leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Issued(cert, [leaf, *authority.chain_pem], list(authority.bundle_pem), params.spiffe_id)
