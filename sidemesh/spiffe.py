"""SPIFFE IDs, parsed and validated as the SPIFFE ID specification says (no I/O).

Sidemesh names a workload ``spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
DEFAULT_TRUST_DOMAIN = "cluster.local"

# fullmatch, never match with "$": "$" also matches before a final newline.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
# Kubernetes names: namespaces and service accounts are DNS-1123 labels / subdomains.
_K8S_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


class SpiffeIdError(ValueError):
    """A string that is not a valid SPIFFE ID (or not a Sidemesh workload ID)."""


def validate_trust_domain(name: str) -> str:
    if not name:
        raise SpiffeIdError("trust domain is empty")
    if len(name) > 255:
        raise SpiffeIdError("trust domain is longer than 255 characters")
    if not _TRUST_DOMAIN_RE.fullmatch(name):
        raise SpiffeIdError(
            f"trust domain {name!r} may contain only lowercase letters, digits, '.', '-' and '_'"
        )
    return name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg..."

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if len(uri.encode()) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
        if not uri.startswith(SCHEME):
            raise SpiffeIdError(f"{uri!r} does not start with {SCHEME}")
        rest = uri[len(SCHEME) :]
        if any(c in rest for c in "?#"):
            raise SpiffeIdError(f"{uri!r}: a SPIFFE ID has no query or fragment")
        td, slash, path = rest.partition("/")
        if "@" in td or ":" in td:
            raise SpiffeIdError(f"{uri!r}: a trust domain has no user info or port")
        validate_trust_domain(td)
        path = slash + path
        if path:
            for segment in path[1:].split("/"):
                if segment in ("", ".", ".."):
                    raise SpiffeIdError(f"{uri!r}: empty, '.' or '..' path segment")
                if not _SEGMENT_RE.fullmatch(segment):
                    raise SpiffeIdError(f"{uri!r}: path segment {segment!r} has a forbidden character")
        return cls(td, path)

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


@dataclass(frozen=True, slots=True, order=True)
class WorkloadId:
    """A Kubernetes workload identity: a ServiceAccount in a namespace."""

    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), ("service account", self.service_account)):
            if not value or len(value) > 253 or not _K8S_NAME_RE.fullmatch(value):
                raise SpiffeIdError(f"{what} {value!r} is not a valid Kubernetes name")

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(
            validate_trust_domain(trust_domain), f"/ns/{self.namespace}/sa/{self.service_account}"
        )

    @classmethod
    def from_spiffe_id(cls, sid: SpiffeId) -> WorkloadId:
        parts = sid.path.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise SpiffeIdError(f"{sid} is not of the form spiffe://<td>/ns/<namespace>/sa/<sa>")
        return cls(parts[2], parts[4])

    @classmethod
    def parse(cls, text: str) -> WorkloadId:
        """Parse ``<namespace>/<serviceaccount>`` as written on the command line."""
        if text.startswith(SCHEME):  # (a SPIFFE ID: "namespace 'spiffe:' is not a valid name" before)
            try:
                short = str(cls.from_spiffe_id(SpiffeId.parse(text)))
            except SpiffeIdError:
                short = "<namespace>/<serviceaccount>"
            raise SpiffeIdError(f"{text!r} is a SPIFFE ID: give {short} (the trust domain is its own option)")
        ns, slash, sa = text.partition("/")
        if not slash:
            raise SpiffeIdError(f"{text!r}: expected <namespace>/<serviceaccount>")
        return cls(ns, sa)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"
