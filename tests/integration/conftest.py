"""A real CA: keys bootstrapped into tmp_path, grpc.aio over TLS on 127.0.0.1:0, metrics on HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from ca import keys
from ca.authn import Authenticator, LocalTokenAuthenticator
from ca.config import CAConfig
from ca.server import CAServer
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.identity.client import CAClient
from sidemesh.identity.svid import SVID, PrivateKey, make_csr, new_key
from sidemesh.spiffe import WorkloadId

# The sidecar and the controller run on uvloop in production (`sidemesh proxy run`): their tests run
# on both loops, so that a difference between the two (uvloop's transports are not asyncio.Transport
# subclasses, for one) fails a test here rather than in a pod.
BOTH_LOOPS = ("test_proxy.py", "test_controller.py", "test_http1.py", "test_idle_close.py")
# What the sidecar's memory does depends on its loop's transports: measured on the production loop.
UVLOOP_ONLY = ("test_memory.py",)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    if item.path.name in UVLOOP_ONLY:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


TOKENS = {
    "frontend-token": ("shop", "frontend"),
    "cart-token": ("shop", "cart"),
    "stranger-token": ("shop", "stranger"),
    "controller-token": ("sidemesh-system", "sidemesh-controller"),
    "expired-token": ("shop", "frontend"),
}


def write_tokens(path: Path) -> None:
    entries: list[dict[str, Any]] = []
    for token, (ns, sa) in TOKENS.items():
        entry: dict[str, Any] = {"token": token, "namespace": ns, "serviceAccount": sa}
        if token == "expired-token":
            entry["expiresAt"] = "2020-01-01T00:00:00Z"
        entries.append(entry)
    path.write_text(yaml.safe_dump({"tokens": entries}))


@dataclass
class RunningCA:
    server: CAServer
    dir: Path
    authority: keys.SigningAuthority

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def bundle(self) -> bytes:
        return (self.dir / keys.ROOTS).read_bytes()

    clients: list[CAClient] = field(default_factory=list)  # closed with the CA (tests may not)

    def client(self, bundle: bytes | None = None) -> CAClient:
        client = CAClient(self.address, bundle or self.bundle, timeout=5.0)
        self.clients.append(client)
        return client

    async def issue(self, token: str, identity: WorkloadId, ttl: int = 0) -> SVID:
        client = self.client()
        try:
            key = new_key()
            sid = identity.spiffe_id("cluster.local")
            resp = await client.sign(token, make_csr(key, sid), ttl)
            return SVID.from_pem(PrivateKey.of(key), list(resp.cert_chain), list(resp.trust_bundle), sid)
        finally:
            await client.close()


StartCA = Callable[..., Awaitable[RunningCA]]


@pytest.fixture
async def start_ca(tmp_path: Path) -> AsyncIterator[StartCA]:
    servers: list[CAServer] = []
    ca_dir = tmp_path / "ca"
    token_file = tmp_path / "tokens.yaml"
    write_tokens(token_file)

    async def start(
        authenticator: Authenticator | None = None,
        bootstrap: bool = True,
        intermediate_lifetime: dt.timedelta = dt.timedelta(days=365),
        clock: Clock = SYSTEM_CLOCK,
        **overrides: Any,
    ) -> RunningCA:
        if bootstrap and not (ca_dir / keys.CA_KEY).exists():
            keys.bootstrap(
                ca_dir, "cluster.local", dt.datetime.now(dt.UTC), intermediate_lifetime=intermediate_lifetime
            )
        config = dataclasses.replace(
            CAConfig(
                listen="127.0.0.1:0",
                metrics_listen="127.0.0.1:0",
                ca_dir=ca_dir,
                authenticator="local",
                token_file=token_file,
            ),
            **overrides,
        )
        server = CAServer(config, authenticator or LocalTokenAuthenticator(token_file), clock)
        await server.start()
        servers.append(server)
        running.append(RunningCA(server, ca_dir, keys.load(ca_dir)))
        return running[-1]

    running: list[RunningCA] = []
    yield start
    for ca in running:
        for client in ca.clients:
            await client.close()
    for server in servers:
        await server.stop(grace=0)
