"""TLS contexts from an SVID, and the peer's SPIFFE ID from a connection.

Peers are verified against the trust bundle by OpenSSL (chain, validity, key usage), then their
leaf certificate as the X509-SVID standard asks (not a CA, one URI SAN: ``spiffe_id_from_der``);
hostnames are not checked; the caller checks the peer's SPIFFE ID instead (secure naming). TLS 1.3 only, as
between Linkerd proxies.

Python's ``ssl`` loads a certificate and key only from a path, and the key must never touch disk:
it is written to an anonymous in-memory file (memfd) that exists only while it is loaded.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

from sidemesh.identity.certificate import Certificate
from sidemesh.identity.svid import SVID, SvidError, spiffe_id_of
from sidemesh.spiffe import SpiffeId

ALPN = "sidemesh/1"


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate carries no usable SPIFFE ID."""

    label = "no_spiffe_id"  # (the TLS failures metric's reason)


class OtherTrustDomain(PeerIdentityError):
    """The peer's SPIFFE ID is of a trust domain the bundle does not vouch for."""

    label = "other_trust_domain"


def _load_chain_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("sidemesh-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class DirectSSLObject(ssl.SSLObject):
    """``ssl.SSLObject`` whose ``read``, ``write`` and ``pending`` are the C methods of the object
    it wraps. The standard class forwards each call through a Python method; uvloop calls these
    three for every TLS record it moves (it keeps them bound), so the sidecar's data path saves a
    Python frame per call. Everything else is the standard class (one difference: ``read``'s
    buffer is omitted or a writable buffer, never an explicit None; no event loop passes None)."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = obj._sslobj  # type: ignore[attr-defined]
        obj.read = inner.read  # type: ignore[method-assign]  # same signature: (len, buffer=None)
        obj.write = inner.write  # type: ignore[method-assign]
        obj.pending = inner.pending  # type: ignore[method-assign]
        return obj


def _base(purpose: ssl.Purpose, svid: SVID, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=svid.bundle_pem.decode())
    _load_chain_in_memory(ctx, svid.chain_pem, svid.key_pem)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if purpose is ssl.Purpose.CLIENT_AUTH:
        # No session tickets: a resumed session keeps the client certificate of its first handshake,
        # which OpenSSL does not check again, so a client could go on as an identity whose
        # certificate had expired (Go's crypto/tls, SPIRE's, refuses that). Sidecars never resume
        # (asyncio passes no session), so nothing is lost.
        ctx.num_tickets = 0
    return ctx


def server_context(svid: SVID, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Server side: presents the SVID and requires a client certificate from the bundle."""
    return _base(ssl.Purpose.CLIENT_AUTH, svid, [ALPN] if alpn is None else alpn)


def client_context(svid: SVID, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Client side: presents the SVID and verifies the server against the bundle."""
    return _base(ssl.Purpose.SERVER_AUTH, svid, [ALPN] if alpn is None else alpn)


@functools.lru_cache(maxsize=1024)
def _leaf_id(der: bytes) -> SpiffeId | str:
    try:
        return spiffe_id_of(Certificate.from_der(der))
    except (ValueError, SvidError) as exc:  # SpiffeIdError is a ValueError
        return str(exc)


def spiffe_id_from_der(der: bytes | None) -> SpiffeId:
    """The SPIFFE ID of a peer's leaf certificate (DER), after the leaf checks of the X509-SVID
    standard (section 5.2; OpenSSL has verified the chain): a CA certificate, one with keyCertSign
    or cRLSign, or one whose ID has no path is refused. Peers reconnect with the same certificate
    many times: the answer is cached by the certificate's bytes."""
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    got = _leaf_id(der)
    if isinstance(got, str):
        raise PeerIdentityError(f"peer certificate is not a leaf X.509-SVID: {got}")
    return got


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> SpiffeId:
    """The verified peer's SPIFFE ID (the handshake has already checked the chain), which must be
    of ``trust_domain``: the bundle holds that trust domain's roots only, and an SVID is valid
    only when its own trust domain's bundle vouches for it (SPIFFE X509-SVID 5, as go-spiffe and
    Envoy verify). A root that names no trust domain (an operator's own PKI) may sign other trust
    domains' leaves too: those are refused here, whatever the policy."""
    spiffe_id = spiffe_id_from_der(ssl_object.getpeercert(binary_form=True))
    if spiffe_id.trust_domain != trust_domain:
        raise OtherTrustDomain(
            f"peer {spiffe_id} is not of trust domain {trust_domain} (the trust bundle vouches for it alone)"
        )
    return spiffe_id
