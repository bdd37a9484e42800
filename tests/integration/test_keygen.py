"""A sidecar's key and request come from a short-lived child process (sidemesh/identity/keygen.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidemesh.identity.keygen import KeygenError, new_request_in_child
from sidemesh.spiffe import SpiffeId

CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def test_the_child_returns_a_key_and_a_request_signed_with_it() -> None:
    key, csr_pem = asyncio.run(new_request_in_child(CART, ("cart.shop.svc",)))
    private = serialization.load_pem_private_key(key.pem, password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert (
        public
        == key.public_key_info
        == csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(CART)]
    assert san.get_values_for_type(x509.DNSName) == ["cart.shop.svc"]
    again, _ = asyncio.run(new_request_in_child(CART))
    assert again.public_key_info != key.public_key_info  # a new key every time


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            "echo 'Traceback (most recent call last):' >&2; echo 'MemoryError' >&2; exit 1",
            "failed: MemoryError",
        ),
        ("exit 3", "failed: exit status 3"),
        ("echo '{}'", "wrote no key and request"),
        ("echo 'not json'", "wrote no key and request"),
        ('echo \'{"key": "k", "public_key_info": "!!", "csr": "c"}\'', "wrote no key and request"),
    ],
)
def test_a_child_that_fails_is_an_error_that_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, error: str
) -> None:
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, body))
    with pytest.raises(KeygenError, match=error):
        asyncio.run(new_request_in_child(CART))


def test_a_child_that_does_not_answer_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, f"echo $$ > {pid_file}; exec sleep 30"))
    with pytest.raises(KeygenError, match=r"did not answer within 0\.5 s"):
        asyncio.run(new_request_in_child(CART, timeout=0.5))
    assert not os.path.exists(f"/proc/{pid_file.read_text().strip()}")  # killed and reaped


def test_a_child_that_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(KeygenError, match="cannot start /nonexistent/python"):
        asyncio.run(new_request_in_child(CART))


def test_a_cancelled_renewal_leaves_no_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, f"echo $$ > {pid_file}; exec sleep 30"))

    async def cancel_it() -> None:
        task = asyncio.create_task(new_request_in_child(CART))
        for _ in range(500):  # the child has started (it wrote its pid)
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert not os.path.exists(f"/proc/{pid_file.read_text().strip()}")
