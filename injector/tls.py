"""The webhook's serving certificate, replaced without a restart.

uvicorn builds its listener with one `ssl.SSLContext` for the life of the server. OpenSSL copies the
context's certificate and key into each connection when the connection is created (SSL_new), so
calling `load_cert_chain` again on that same context object changes what *new* handshakes present
and leaves open connections alone. tests/integration/test_injector.py checks exactly that.

A new certificate is first loaded into a scratch context: a half-written pair of files (certificate
already replaced, key not yet) fails there and the current certificate stays in place, because
OpenSSL would otherwise drop the old key when it meets a certificate that does not match it.

The API server verifies the webhook by DNS name against the caBundle, so this is an ordinary server
context: TLS 1.2 or 1.3, no client certificate, HTTP/1.1 (uvicorn speaks no HTTP/2).
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from cryptography import x509

log = logging.getLogger("sidemesh.injector.tls")


def _context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the API server's client may be TLS 1.2
    # TLS 1.2 with forward secrecy and AEAD only, as the API server and istiod offer (Python's
    # default list also has CBC suites); TLS 1.3's suites are all AEAD.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`ssl` loads keys from paths only; an anonymous memory file keeps the key off the disk."""
    fd = os.memfd_create("sidemesh-injector-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class ServingCertificate:
    def __init__(self) -> None:
        self.context = _context()
        self.loaded = False
        self.serial: str | None = None

    def load_pem(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Install a certificate chain and its key (raises ssl.SSLError/ValueError, keeping the old)."""
        _load_in_memory(_context(), chain_pem, key_pem)  # refuse a bad pair before touching ours
        _load_in_memory(self.context, chain_pem, key_pem)
        self.loaded = True
        self.serial = format(x509.load_pem_x509_certificate(chain_pem).serial_number, "x")
        log.info("serving certificate installed", extra={"serial": self.serial})


class CertificateFiles:
    """`--tls-cert` and `--tls-key`, re-read when either file changes."""

    def __init__(self, serving: ServingCertificate, cert: Path, key: Path) -> None:
        self.serving = serving
        self.cert = cert
        self.key = key
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self.last_error: str | None = None

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert, self.key):
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def load(self) -> None:
        """Load now; raises OSError or ssl.SSLError (at start: the caller reports it)."""
        stamp = self._stat()
        self.serving.load_pem(self.cert.read_bytes(), self.key.read_bytes())
        self._stamp = stamp

    def reload(self) -> bool:
        """Load when the files changed; a failure is logged and the current certificate kept."""
        try:
            if self._stat() == self._stamp:
                return False
            self.load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            if str(exc) != self.last_error:
                log.error(
                    "serving certificate not reloaded; keeping the current one", extra={"error": str(exc)}
                )
            self.last_error = str(exc)
            return False
        self.last_error = None
        return True
