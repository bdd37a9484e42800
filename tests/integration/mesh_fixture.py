"""A small local-mode mesh inside the test's event loop: real CA, real sidecars, real sockets.

Each workload gets its own loopback address (127.A.B.x, random per test), so every sidecar uses
the standard inbound port, as in a pod.
"""

from __future__ import annotations

import asyncio
import random
import socket
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import ProxyConfig
from proxy.sidecar import Sidecar
from sidemesh import demo
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import RunningCA

INBOUND = 15006

# The demo's manifests: the tests exercise exactly the mesh a newcomer sees.
MESH_YAML = demo.MANIFESTS
ALLOW_FRONTEND = demo.ALLOW.format(who="frontend")


def free_net() -> str:
    return f"127.{random.randint(2, 250)}.{random.randint(1, 250)}"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes upper-cased until EOF, then says 'BYE' and closes (exercises half-close)."""
    try:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.write(b"BYE")
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@dataclass
class Mesh:
    ca: RunningCA
    config_dir: Path
    net: str
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    apps: list[asyncio.Server] = field(default_factory=list)

    def addr(self, host: int) -> str:
        return f"{self.net}.{host}"

    async def app(self, host: int, handler: Handler = upper_echo, port: int = 8080) -> asyncio.Server:
        server = await asyncio.start_server(handler, self.addr(host), port)
        self.apps.append(server)
        return server

    async def sidecar(
        self,
        name: str,
        host: int,
        *,
        token: str | None = None,
        identity_of: str | None = None,
        outbound: tuple[str, ...] = (),
        mode: str = "strict",
        default_policy: str = "deny",
        controller: str = "",
        app_probes: str = "",
        app_metrics: str = "",
        max_connections: int = 10_000,
        access_log: bool = True,  # off by default in the product; the tests read it
        capture: str = "none",  # "iptables": every inbound connection must have been redirected
    ) -> Sidecar:
        who = identity_of or name
        config = ProxyConfig(
            workload=f"shop/{name}-1",
            config_dir=None if controller else self.config_dir,
            controller=controller,
            service_account=who if controller else "",
            capture=capture,
            outbound_listen=f"{self.addr(host)}:0",
            mode=mode,
            default_policy=default_policy,
            inbound_listen=f"{self.addr(host)}:{INBOUND}",
            admin_listen=f"{self.addr(host)}:0",
            health_listen=f"{self.addr(host)}:0",
            outbound=outbound,
            app_host=self.addr(host),
            trust_domain="cluster.local",
            app_probes=app_probes,
            app_metrics=app_metrics,
            max_connections=max_connections,
            access_log=access_log,
        )
        identity = WorkloadIdentity(
            WorkloadId("shop", who).spiffe_id("cluster.local"),
            self.ca.client(),
            lambda: token or f"{who}-token",
        )
        sidecar = Sidecar(config, identity)
        await sidecar.start()
        await asyncio.wait_for(identity.wait_ready(), 10)
        for _ in range(200):  # its configuration arrives (from files, or from the controller's stream)
            if sidecar.ready:
                break
            await asyncio.sleep(0.025)
        assert sidecar.ready, "the sidecar never got its configuration"
        self.sidecars[name] = sidecar
        return sidecar

    def write(self, name: str, text: str) -> None:
        (self.config_dir / name).write_text(textwrap.dedent(text))

    async def close(self) -> None:
        for sidecar in self.sidecars.values():
            await sidecar.drain(timeout=0)
            await sidecar.identity.ca.close()
        for server in self.apps:
            server.close()


def new_mesh(ca: RunningCA, tmp_path: Path, allow: str = ALLOW_FRONTEND, workloads: str = MESH_YAML) -> Mesh:
    """The demo's mesh (frontend, cart, stranger; by default only the frontend may call the cart) on
    a fresh loopback network, configured from a directory under ``tmp_path``. ``workloads`` is
    formatted with the network (``{net}``)."""
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    m = Mesh(ca, config_dir, free_net())
    m.write("workloads.yaml", workloads.format(net=m.net))
    m.write("allow.yaml", allow)
    return m


async def talk(host: str, port: int, payload: bytes, timeout: float = 5) -> bytes:
    """Connect, send, half-close, read everything until EOF."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def linger_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()
