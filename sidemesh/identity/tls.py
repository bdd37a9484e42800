"""TLS contexts from an SVID, and the peer's SPIFFE ID from a connection.

Peers are verified against the trust bundle by OpenSSL (chain, validity, key usage); hostnames are
not checked; the caller checks the peer's SPIFFE ID instead (secure naming). TLS 1.3 only, as
between Linkerd proxies.

Python's ``ssl`` loads a certificate and key only from a path, and the key must never touch disk:
it is written to an anonymous in-memory file (memfd) that exists only while it is loaded.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from sidemesh.identity.svid import SVID
from sidemesh.spiffe import SpiffeId, SpiffeIdError

ALPN = "sidemesh/1"


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate carries no usable SPIFFE ID."""


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
    return ctx


def server_context(svid: SVID, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Server side: presents the SVID and requires a client certificate from the bundle."""
    return _base(ssl.Purpose.CLIENT_AUTH, svid, [ALPN] if alpn is None else alpn)


def client_context(svid: SVID, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Client side: presents the SVID and verifies the server against the bundle."""
    return _base(ssl.Purpose.SERVER_AUTH, svid, [ALPN] if alpn is None else alpn)


def spiffe_id_from_peercert(peercert: dict[str, Any] | None) -> SpiffeId:
    if not peercert:
        raise PeerIdentityError("peer presented no certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        raise PeerIdentityError(f"peer certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise PeerIdentityError(f"peer URI SAN is not a SPIFFE ID: {exc}") from exc


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The verified peer's SPIFFE ID (the handshake has already checked the chain)."""
    return spiffe_id_from_peercert(ssl_object.getpeercert())
