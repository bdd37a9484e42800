"""The CA's hand-written DER (pure), against known encodings and against cryptography's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import der, keys
from sidemesh.identity.svid import make_csr, new_key
from sidemesh.spiffe import SpiffeId

UTC = dt.UTC


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "020100"),
        (1, "020101"),
        (127, "02017f"),
        (128, "02020080"),
        (255, "020200ff"),
        (256, "02020100"),
        (2**159 - 1, "0214" + "7f" + "ff" * 19),
        (2**159, "0215" + "0080" + "00" * 19),
    ],
)
def test_integer(value: int, encoded: str) -> None:
    assert der.integer(value).hex() == encoded


@pytest.mark.parametrize(
    ("size", "encoded"),
    [(0, "00"), (127, "7f"), (128, "8180"), (255, "81ff"), (256, "820100"), (70000, "83011170")],
)
def test_length(size: int, encoded: str) -> None:
    assert der.length(size).hex() == encoded


@pytest.mark.parametrize(
    ("dotted", "encoded"),
    [
        ("2.5.29.17", "0603551d11"),
        ("1.2.840.10045.4.3.2", "06082a8648ce3d040302"),
        ("1.2.840.113549.1.1.11", "06092a864886f70d01010b"),
        ("1.3.6.1.5.5.7.3.2", "06082b06010505070302"),
    ],
)
def test_oid(dotted: str, encoded: str) -> None:
    assert der.oid(dotted).hex() == encoded


@pytest.mark.parametrize(
    ("when", "encoded"),
    [
        (dt.datetime(2026, 11, 26, 15, 4, 5, 999_999, tzinfo=UTC), b"\x17\x0d261126150405Z"),
        (dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), b"\x17\x0d491231235959Z"),
        (dt.datetime(2050, 1, 1, tzinfo=UTC), b"\x18\x0f20500101000000Z"),
        (dt.datetime(1999, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))), b"\x17\x0d981231230000Z"),
    ],
)
def test_time_is_utc_whole_seconds_and_switches_type_in_2050(when: dt.datetime, encoded: bytes) -> None:
    assert der.time(when) == encoded


def test_negative_integers_and_bad_oids_are_refused() -> None:
    with pytest.raises(der.DERError):
        der.integer(-1)
    with pytest.raises(der.DERError):
        der.oid("7.1")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x05\x00", b"\x30\x80", b"\x30\x85\x00\x00\x00\x00\x01\x00", b"\x1f\x01\x00"],
)
def test_read_refuses_what_it_does_not_expect(data: bytes) -> None:
    with pytest.raises(der.DERError):
        der.read(data)


def test_certificate_subject_and_csr_key_info_are_the_encoded_bytes(tmp_path: Path) -> None:
    key = new_key()
    spiffe_id = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    csr = x509.load_pem_x509_csr(make_csr(key, spiffe_id).encode())
    info = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der.csr_public_key_info(csr.public_bytes(serialization.Encoding.DER)) == info

    issuer = keys.bootstrap(tmp_path, "cluster.local", dt.datetime.now(UTC)).cert
    assert der.certificate_subject(issuer.tbs_certificate_bytes) == issuer.subject.public_bytes()
    with pytest.raises(der.DERError):
        der.certificate_subject(der.sequence(der.integer(1)))
    with pytest.raises(der.DERError):
        der.csr_public_key_info(der.integer(1))
