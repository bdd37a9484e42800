"""Issuing an SVID for an authenticated identity: validate -> template -> sign (no I/O)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import leaf, templates
from ca.csr import validate_csr
from ca.errors import InvalidRequest, KeyMaterialError, SigningUnavailable
from ca.keys import SigningAuthority
from sidemesh.config import format_duration
from sidemesh.spiffe import SpiffeId, WorkloadId

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
                f"certificates live {format_duration(self.minimum)} .. {format_duration(self.maximum)})"
            )
        if requested_seconds == 0:
            return self.default
        return min(max(dt.timedelta(seconds=requested_seconds), self.minimum), self.maximum)


@dataclass(frozen=True, slots=True)
class Issued:
    der: bytes  # the leaf certificate
    serial: int
    not_after: dt.datetime  # whole seconds, as in the certificate
    chain_pem: list[str]  # leaf first
    bundle_pem: list[str]
    spiffe_id: SpiffeId

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


def issue(
    authority: SigningAuthority,
    identity: SpiffeId,
    csr_pem: str,
    ttl: dt.timedelta,
    now: dt.datetime,
    allowed_dns: frozenset[str] = frozenset(),
) -> Issued:
    valid = validate_csr(csr_pem, identity, allowed_dns)
    return sign_key_info(authority, valid.public_key_info, valid.spiffe_id, ttl, now, valid.dns_names)


def sign(authority: SigningAuthority, params: templates.LeafParams) -> Issued:
    """A leaf for a key object (the CA's own serving certificate)."""
    info = params.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return sign_key_info(authority, info, params.spiffe_id, params.ttl, params.now, params.dns_names)


# A signing chain that starts at most this far in the future still signs (its leaves start with it,
# as before): an intermediate made without backdating (cert-manager's) on a clock seconds ahead.
CLOCK_SKEW = dt.timedelta(minutes=5)


def sign_key_info(
    authority: SigningAuthority,
    public_key_info: bytes,
    spiffe_id: SpiffeId,
    ttl: dt.timedelta,
    now: dt.datetime,
    dns_names: tuple[str, ...] = (),
) -> Issued:
    """Certify ``public_key_info`` (an ECDSA P-256 SubjectPublicKeyInfo, DER) as ``spiffe_id``."""
    not_after = min(now + ttl, authority.not_after_limit)
    if not_after <= now:
        raise SigningUnavailable("the CA cannot issue now", "the CA's signing certificate has expired")
    if now + CLOCK_SKEW < authority.not_before_limit:  # its leaves would not be valid for a while
        raise SigningUnavailable(
            "the CA cannot issue now",
            f"the CA's signing chain is not valid before {authority.not_before_limit.isoformat()}",
        )
    if not_after <= max(now - templates.BACKDATE, authority.not_before_limit):
        raise SigningUnavailable(
            "the CA cannot issue now", "a leaf would never be valid (its chain starts too late)"
        )
    not_after = not_after.replace(microsecond=0)
    serial = x509.random_serial_number()
    template = authority.leaf_template
    if template is not None:
        not_before = max(now - templates.BACKDATE, authority.cert.not_valid_before_utc)
        san = leaf.san_value(spiffe_id, dns_names)
        certificate = template.certificate(template.tbs(serial, not_before, not_after, public_key_info, san))
    else:  # the reference builder: an issuer the template could not reproduce (see keys.py)
        key = serialization.load_der_public_key(public_key_info)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidRequest("only ECDSA P-256 keys are certified")
        params = templates.LeafParams(spiffe_id, key, ttl, now, dns_names)
        builder = templates.leaf_builder(params, authority.cert, authority.chain, serial, not_after)
        certificate = builder.sign(authority.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return Issued(
        certificate,
        serial,
        not_after,
        [leaf.pem(certificate), *authority.chain_pem],
        list(authority.bundle_pem),
        spiffe_id,
    )


PROBE_WORKLOAD = ("sidemesh-system", "sidemesh-ca-probe")
_NOT_NOW = (9, 10)  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


def probe(authority: SigningAuthority, trust_domain: str, now: dt.datetime) -> None:
    """A TLS handshake between two SVIDs this material signs, in memory, as two sidecars verify each
    other (OpenSSL's chain check for client and server, then the leaf checks and the trust
    domain): material that passes the loading checks but whose SVIDs every peer would refuse (an
    intermediate whose extendedKeyUsage leaves out clientAuth, name constraints that exclude the
    trust domain, a path length too short) is refused at load with OpenSSL's reason, not found
    out by every workload. KeyMaterialError when the handshake fails."""
    import ssl

    from sidemesh.identity import tls
    from sidemesh.identity.svid import SVID, SvidError, certificate_of, own_roots

    spiffe_id = WorkloadId(*PROBE_WORKLOAD).spiffe_id(trust_domain)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        issued = sign(
            authority, templates.LeafParams(spiffe_id, key.public_key(), dt.timedelta(minutes=5), now)
        )
    except SigningUnavailable:
        return  # not valid now (expired, or staged for later): when it can sign is the CA's to say
    try:
        roots = own_roots(tuple(map(certificate_of, authority.roots)), trust_domain)
        svid = SVID.of(spiffe_id, key, (issued.certificate, *authority.chain), ())
        svid = svid.with_bundle(roots)
        bios = {name: (ssl.MemoryBIO(), ssl.MemoryBIO()) for name in ("client", "server")}  # (in, out)
        server = tls.server_context(svid).wrap_bio(*bios["server"], server_side=True)
        client = tls.client_context(svid).wrap_bio(*bios["client"])
    except (SvidError, ssl.SSLError, ValueError) as exc:
        raise KeyMaterialError(f"cannot use a test SVID it signed: {exc}") from exc
    done = {"client": False, "server": False}
    verifying = "client"  # the side whose handshake step runs (a refusal is its verdict on the other)
    try:
        for _ in range(10):
            for name, side, other in (("client", client, "server"), ("server", server, "client")):
                if not done[name]:
                    verifying = name
                    try:
                        side.do_handshake()
                        done[name] = True
                    except ssl.SSLWantReadError:
                        pass
                bios[other][0].write(bios[name][1].read())
            if all(done.values()):
                break
        for side in (client, server):
            tls.peer_spiffe_id(side, trust_domain)
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NOT_NOW:  # (OpenSSL's clock: when material is valid is the CA's to say)
            return
        presented = "server" if verifying == "client" else "client"  # (the certificate refused)
        raise KeyMaterialError(
            f"every peer would refuse the SVIDs it signs: OpenSSL refused a test SVID as a TLS "
            f"{presented} ({exc.verify_message}); reissue the "
            "signing chain for both client and server use, without constraints excluding "
            f"spiffe://{trust_domain}"
        ) from exc
    except ssl.SSLError as exc:
        raise KeyMaterialError(f"a TLS handshake between two test SVIDs failed: {exc}") from exc
    if not all(done.values()):
        raise KeyMaterialError("a TLS handshake between two test SVIDs did not finish")
