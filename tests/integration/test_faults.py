"""Faults under load, the cheap subset of `bench/reliability.py`: real CA, controller and sidecars in
this test's event loop (as in test_controller.py), real sockets and mTLS, steady traffic all along.

- the controller goes away and comes back: no request fails, the policy is enforced throughout;
- three certificate rotations (short lifetime): no request fails;
- a sidecar restarted: traffic resumes within five seconds, and no request hangs.

The figures (and the slower faults: the CA down, expiry, floods, a soak) are in
bench/results/RELIABILITY.md, produced by `python -m bench.reliability`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from controller.config import ControllerConfig
from controller.server import ConfigServer
from controller.sources.directory import DirectorySource
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, MESH_YAML, Mesh, free_net, talk

FRONTEND, CART, STRANGER = 1, 2, 3
OUT = 18080
CONTROLLER_NAME = "sidemesh-controller.sidemesh-system.svc"
CLIENT_TIMEOUT = 5.0


@dataclass
class Traffic:
    """Short exchanges over new connections at ``rate`` per second, and ``long_lived`` connections
    exchanging a line every 50 ms, from frontend's app to cart's, until the block ends."""

    host: str
    port: int
    rate: float = 50.0
    long_lived: int = 2
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, what)
    successes: list[float] = field(default_factory=list)  # when each short exchange started
    max_latency: float = 0.0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _running: bool = True

    async def __aenter__(self) -> Traffic:
        self._spawn(self._shorts())
        for i in range(self.long_lived):
            self._spawn(self._long(i))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._running = False
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), CLIENT_TIMEOUT + 2)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, started: float, error: BaseException | None, short: bool) -> None:
        self.max_latency = max(self.max_latency, time.monotonic() - started)
        if error is None:
            self.ok += 1
            if short:
                self.successes.append(started)
        else:
            self.failures.append((started, f"{'short' if short else 'long'}: {error!r}"))

    async def _shorts(self) -> None:
        while self._running:
            self._spawn(self._short())
            await asyncio.sleep(1 / self.rate)

    async def _short(self) -> None:
        started = time.monotonic()
        try:
            answer = await talk(self.host, self.port, b"hello", timeout=CLIENT_TIMEOUT)
            self._record(started, None if answer == b"HELLOBYE" else ValueError(answer), short=True)
        except (OSError, TimeoutError) as exc:
            self._record(started, exc, short=True)

    async def _long(self, index: int) -> None:
        while self._running:
            started = time.monotonic()
            writer: asyncio.StreamWriter | None = None
            try:
                reader, stream = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CLIENT_TIMEOUT
                )
                writer = stream
                n = 0
                while self._running:
                    started = time.monotonic()
                    line = b"ping %d %d\n" % (index, n)
                    stream.write(line)
                    answer = await asyncio.wait_for(reader.readexactly(len(line)), CLIENT_TIMEOUT)
                    self._record(started, None if answer == line.upper() else ValueError(answer), short=False)
                    n += 1
                    await asyncio.sleep(0.05)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._record(started, exc, short=False)
                await asyncio.sleep(0.05)
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()


class Controller:
    def __init__(self, mesh: Mesh, port: int = 0) -> None:
        config = ControllerConfig(
            listen=f"127.0.0.1:{port}",
            metrics_listen="",
            source="directory",
            config_dir=mesh.config_dir,
            coalesce=dt.timedelta(milliseconds=50),
        )
        identity = WorkloadIdentity(
            WorkloadId("sidemesh-system", "sidemesh-controller").spiffe_id("cluster.local"),
            mesh.ca.client(),
            lambda: "controller-token",
            dns_names=(CONTROLLER_NAME,),
        )
        self.server = ConfigServer(config, identity, DirectorySource(mesh.config_dir, poll_seconds=0.05))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        await self.server.stop(grace=0)  # its streams are cut, as when the process dies
        await self.server.identity.ca.close()


async def make_mesh(ca_start: StartCA, tmp_path: Path, **ca_overrides: object) -> Mesh:
    ca = await ca_start(**ca_overrides)
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    net = free_net()
    m = Mesh(ca, config_dir, net)
    m.write("workloads.yaml", MESH_YAML.format(net=net))
    m.write("allow.yaml", ALLOW_FRONTEND)
    return m


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = await make_mesh(start_ca, tmp_path)
    yield m
    await m.close()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"{what} within {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def refused(mesh: Mesh, host: int) -> bool:
    try:
        await talk(mesh.addr(host), OUT, b"let me in", timeout=CLIENT_TIMEOUT)
    except ConnectionResetError:
        return True
    return False


async def test_controller_killed_under_load_no_request_fails_and_policy_holds(mesh: Mesh) -> None:
    # (and no asyncio error from the lost streams: their request generators waited for good, and
    # grpc's tasks consuming them were destroyed pending, an ERROR line in every sidecar's log)
    import gc

    loop_errors: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _, context: loop_errors.append(context["message"])
    )
    controller = Controller(mesh)
    await controller.server.start()
    port = controller.server.port
    await mesh.app(CART)
    for name, host in (("cart", CART), ("frontend", FRONTEND), ("stranger", STRANGER)):
        outbound = () if name == "cart" else (f"{mesh.addr(host)}:{OUT}=cart.shop:80",)
        await mesh.sidecar(name, host, controller=controller.address, outbound=outbound)
    sidecars = list(mesh.sidecars.values())
    assert await refused(mesh, STRANGER)
    back: Controller | None = None
    try:
        async with Traffic(mesh.addr(FRONTEND), OUT) as traffic:
            await asyncio.sleep(0.5)
            await controller.stop()
            await wait_for(
                lambda: not any(s.controller is not None and s.controller.connected for s in sidecars),
                5,
                "the sidecars notice the controller is gone",
            )
            for _ in range(3):  # while it is down: the last good policy, nothing more, nothing less
                assert await refused(mesh, STRANGER)
                await asyncio.sleep(0.3)
            back = Controller(mesh, port)
            await back.server.start()
            await wait_for(
                lambda: all(s.controller is not None and s.controller.connected for s in sidecars),
                20,
                "every sidecar reconnects to the restarted controller",
            )
            assert await refused(mesh, STRANGER)
            await asyncio.sleep(0.3)
        gc.collect()
        await asyncio.sleep(0.1)
    finally:
        if back is not None:
            await back.stop()
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 100
    assert loop_errors == [], loop_errors


async def test_three_certificate_rotations_under_load_no_request_fails(
    start_ca: StartCA, tmp_path: Path
) -> None:
    m = await make_mesh(
        start_ca, tmp_path, default_ttl=dt.timedelta(seconds=4), min_ttl=dt.timedelta(seconds=1)
    )
    try:
        await m.app(CART)
        cart = await m.sidecar("cart", CART)
        frontend = await m.sidecar("frontend", FRONTEND, outbound=(f"{m.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        async with Traffic(m.addr(FRONTEND), OUT) as traffic:
            await asyncio.sleep(0.3)
            before = {s: s.identity.rotations for s in (cart, frontend)}
            serials = {s: s.identity.svid.serial_hex if s.identity.svid else "" for s in (cart, frontend)}
            began = time.monotonic()
            await wait_for(
                lambda: all(s.identity.rotations - n >= 3 for s, n in before.items()),
                20,
                "three rotations of each sidecar",
            )
            await asyncio.sleep(max(0.3, 2.0 - (time.monotonic() - began)))  # and traffic on either side
        assert all(s.identity.svid and s.identity.svid.serial_hex != serials[s] for s in serials)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.ok > 50
    finally:
        await m.close()


async def test_sidecar_restart_traffic_resumes_within_five_seconds_and_nothing_hangs(mesh: Mesh) -> None:
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    # Short connections only: a long-lived one would hold the drain for --drain-timeout (20 s; see
    # bench/results/RELIABILITY.md).
    async with Traffic(mesh.addr(FRONTEND), OUT, long_lived=0) as traffic:
        await asyncio.sleep(0.5)
        stopped = time.monotonic()
        await cart.drain()  # what SIGTERM does
        await cart.identity.ca.close()
        await mesh.sidecar("cart", CART)  # started again, same ports
        await wait_for(
            lambda: any(t > stopped for t in traffic.successes), 5, "traffic resumes after the restart"
        )
        resumed = min(t for t in traffic.successes if t > stopped) - stopped
        await asyncio.sleep(0.5)
    assert resumed < 5.0
    assert traffic.max_latency < CLIENT_TIMEOUT, "a request hung"
    assert not [f for f in traffic.failures if "TimeoutError" in f[1]]
    assert not [f for f in traffic.failures if f[0] > stopped + resumed], "failures after traffic resumed"
