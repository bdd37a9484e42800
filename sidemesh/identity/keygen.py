"""A new private key and certificate request, made in a short-lived child process.

Making a P-256 key and signing a PKCS#10 request with it takes ``cryptography``, which stays
resident in any process that imports it (10 MB of a 56 MB sidecar: it brings its own OpenSSL).
A sidecar needs it once per renewal (about every half hour), so it runs
``python -m sidemesh.identity.keygen`` for each: the child makes the key and the request, writes
them to its stdout (a pipe: the key is never written to a file) and exits, and its memory goes
with it. It costs the renewal a Python start (about 0.2 s of one core).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Sequence

from sidemesh.identity.svid import PrivateKey, new_request
from sidemesh.spiffe import SpiffeId

TIMEOUT_S = 30.0  # a child that has not answered by then is killed, and the renewal retried


class KeygenError(RuntimeError):
    """The child process did not return a key and a request."""


async def new_request_in_child(
    spiffe_id: SpiffeId, dns_names: tuple[str, ...] = (), timeout: float = TIMEOUT_S
) -> tuple[PrivateKey, str]:
    """What :func:`sidemesh.identity.svid.new_request` returns, made by a child process."""
    command = (sys.executable, "-m", __name__, str(spiffe_id), *dns_names)
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise KeygenError(f"cannot start {command[0]} -m {__name__}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise KeygenError(f"{__name__} did not answer within {timeout:g} s") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: nothing is left running
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise KeygenError(f"{__name__} failed: {why[0]}")
    try:
        doc = json.loads(out)
        key = PrivateKey(doc["key"].encode(), base64.b64decode(doc["public_key_info"], validate=True))
        csr = doc["csr"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeygenError(f"{__name__} wrote no key and request: {exc!r}") from None
    if not isinstance(csr, str):
        raise KeygenError(f"{__name__} wrote no request")
    return key, csr


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(f"usage: python -m {__name__} SPIFFE_ID [DNS_NAME ...]", file=sys.stderr)
        return 2
    key, csr = new_request(SpiffeId.parse(argv[0]), tuple(argv[1:]))
    doc = {
        "key": key.pem.decode(),
        "public_key_info": base64.b64encode(key.public_key_info).decode(),
        "csr": csr,
    }
    sys.stdout.write(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
