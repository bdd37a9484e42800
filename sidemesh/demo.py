"""`sidemesh demo`: the mesh on one machine, no cluster, no root.

For now (the CA is the first component) it bootstraps a CA in a temporary directory, starts
`sidemesh ca serve` as its own process, obtains an SVID for `shop/frontend` with a local token,
and shows a CSR for someone else's identity being refused. It removes everything it made on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.svid import SVID, make_csr, new_key
from sidemesh.spiffe import WorkloadId

TRUST_DOMAIN = "cluster.local"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the mesh locally and walk through it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--once", action="store_true", help="run the walk-through once and exit non-zero if a step misbehaves"
    )
    p.set_defaults(handler=run)


class Step:
    def __init__(self) -> None:
        self.failures = 0
        self.n = 0

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}] {title}", flush=True)

    def ok(self, text: str) -> None:
        print(f"    ok: {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"    UNEXPECTED: {text}", flush=True)


def _sidemesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidemesh", *args]


def wait_for_log_event(
    log_file: Path, proc: subprocess.Popen[bytes], event: str, timeout: float
) -> dict[str, Any]:
    """Follow a process's JSON log file until a record with ``event`` appears."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        for line in lines[seen:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                return dict(record)
        seen = len(lines)
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before logging {event!r}; see {log_file}")
        time.sleep(0.05)
    raise TimeoutError(f"no {event!r} within {timeout}s")


async def _issue(address: str, bundle: bytes, token: str, ask_for: WorkloadId) -> SVID:
    client = CAClient(address, bundle)
    try:
        key = new_key()
        spiffe_id = ask_for.spiffe_id(TRUST_DOMAIN)
        resp = await client.sign(token, make_csr(key, spiffe_id))
        return SVID.from_pem(key, list(resp.cert_chain), list(resp.trust_bundle), spiffe_id)
    finally:
        await client.close()


def run(args: argparse.Namespace) -> int:
    step = Step()
    with tempfile.TemporaryDirectory(prefix="sidemesh-demo-") as tmp:
        root = Path(tmp)
        step("Bootstrap a root and an intermediate CA (files in a temporary directory)")
        subprocess.run(
            _sidemesh("ca", "bootstrap", "--dir", str(root / "ca"), "--trust-domain", TRUST_DOMAIN),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        step.ok(f"trust domain {TRUST_DOMAIN}, root in {root / 'ca' / 'root-cert.pem'}")

        step("Give the workload shop/frontend a token (local mode stands in for Kubernetes TokenReview)")
        tokens = root / "tokens.yaml"
        token = subprocess.run(
            _sidemesh("ca", "local-token", "--file", str(tokens), "--identity", "shop/frontend"),
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        step.ok("token written to the CA's token file")

        step("Start the CA: `sidemesh ca serve --authenticator local` on 127.0.0.1")
        env = dict(os.environ, SIDEMESH_LOG_LEVEL="info")
        ca_log = root / "ca.log"
        log_handle = ca_log.open("wb")
        proc = subprocess.Popen(
            _sidemesh(
                "ca",
                "serve",
                "--authenticator",
                "local",
                "--token-file",
                str(tokens),
                "--ca-dir",
                str(root / "ca"),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ),
            stderr=log_handle,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        try:
            started = wait_for_log_event(ca_log, proc, "CA serving", timeout=30)
            address = f"127.0.0.1:{started['port']}"
            step.ok(
                f"gRPC over TLS on {address}, metrics on http://127.0.0.1:{started['metrics_port']}/metrics"
            )
            bundle = (root / "ca" / "root-cert.pem").read_bytes()

            step("shop/frontend asks for its own SVID")
            svid = asyncio.run(_issue(address, bundle, token, WorkloadId("shop", "frontend")))
            step.ok(
                f"issued {svid.spiffe_id}, serial {svid.serial_hex}, valid until {svid.not_after:%H:%M:%S} UTC"
            )

            step("shop/frontend's token used to ask for shop/cart's identity")
            try:
                asyncio.run(_issue(address, bundle, token, WorkloadId("shop", "cart")))
                step.fail("the CA issued a certificate for another identity")
            except CAClientError as exc:
                step.ok(f"refused: {exc}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            log_handle.close()
        step("CA stopped; temporary files removed")
    print(
        "\nall steps behaved as described" if not step.failures else f"\n{step.failures} step(s) misbehaved"
    )
    return 1 if step.failures else 0
