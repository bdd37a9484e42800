"""The trust bundle publisher against an API server that speaks the real wire format (the real
`kubernetes` client code paths run): the ConfigMap sidemesh-trust-bundle in every labelled
namespace, kept equal to the bundle file, never deleted, one namespace's failure isolated."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ca import keys
from controller.bundle import BUNDLE_KEY, CONFIGMAP_NAME, BundlePublisher
from tests.support.kube_api import api_client
from tests.support.kube_watch_api import FakeWatchAPI, config_map, namespace
from tests.support.pki import make_authority

MESHED = {"sidemesh.io/inject": "enabled"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two trust bundles (the root of two CAs), as the file holds them."""
    out = []
    for name in ("a", "b"):
        directory = tmp_path_factory.mktemp(name)
        make_authority(directory)
        out.append((directory / keys.ROOTS).read_text())
    return out[0], out[1]


def write_atomically(path: Path, text: str | bytes) -> None:
    """As the kubelet updates a mounted ConfigMap: a new file swapped in."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := condition()):  # noqa: ASYNC110 (the fake API server's threads: poll)
            await asyncio.sleep(0.02)
        return result


def bundle_in(api: FakeWatchAPI, ns: str) -> str | None:
    """The bundle the ConfigMap of ``ns`` holds (None: no ConfigMap)."""
    obj = api.store["configmaps"].get(f"{ns}/{CONFIGMAP_NAME}")
    return None if obj is None else (obj.get("data") or {}).get(BUNDLE_KEY)


@dataclass
class Publishing:
    api: FakeWatchAPI
    publisher: BundlePublisher
    task: asyncio.Task[None]
    file: Path

    def rounds(self) -> int:
        """Rounds started: the namespace lists (the watch's requests are not counted)."""
        return len(self.api.lists("namespaces"))

    async def after_rounds(self, n: int) -> None:
        """Until ``n`` more rounds have been completed."""
        target = self.rounds() + n + 1  # the round under way, if any, then n whole ones
        await eventually(lambda: self.rounds() >= target)

    async def stop(self) -> float:
        started = time.monotonic()
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        return time.monotonic() - started


Start = Callable[..., Awaitable[Publishing]]


@pytest.fixture
async def publish(tmp_path: Path, roots: tuple[str, str]) -> AsyncIterator[Start]:
    started: list[tuple[Publishing, Any]] = []

    async def start(
        api: FakeWatchAPI, *, bundle: str | None = None, watch: bool = False, interval: float = 0.1
    ) -> Publishing:
        file = tmp_path / f"root-cert-{len(started)}.pem"
        if bundle != "":
            write_atomically(file, roots[0] if bundle is None else bundle)
        client = api_client(api.url)
        publisher = BundlePublisher(
            client,
            file,
            interval=interval,
            watch_namespaces=watch,
            bundle_poll=0.05,
            request_timeout=5.0,
            watch_timeout_seconds=1,
            backoff_max=0.2,
        )
        running = Publishing(api, publisher, asyncio.create_task(publisher.run()), file)
        started.append((running, client))
        return running

    yield start
    for running, _ in started:
        if not running.task.done():
            await running.stop()
    assert not [t for t in threading.enumerate() if t.name == "sidemesh-bundle-watch"]
    for _, client in started:
        client.close()
    for api in {id(r.api): r.api for r, _ in started}.values():
        api.close()


async def test_a_labelled_namespace_gets_the_configmap_and_an_unlabelled_one_does_not(
    publish: Start, roots: tuple[str, str]
) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED), namespace("other"), namespace("kube-system")])
    run = await publish(api)
    await eventually(lambda: bundle_in(api, "shop"))
    cm = api.get("ConfigMap", "shop", CONFIGMAP_NAME)
    assert cm["data"] == {BUNDLE_KEY: roots[0]}
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "sidemesh"}
    await run.after_rounds(2)
    assert api.store["configmaps"].keys() == {f"shop/{CONFIGMAP_NAME}"}
    assert api.configmap_requests(namespace="other") == [] == api.configmap_requests(namespace="kube-system")
    assert {r.query.get("labelSelector") for r in api.lists("namespaces")} == {"sidemesh.io/inject=enabled"}
    assert len(api.configmap_requests("POST")) == 1 and api.configmap_requests("PUT") == []


async def test_a_namespace_labelled_later_gets_it_within_the_interval(publish: Start) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED), namespace("other")])
    run = await publish(api, interval=0.3)
    await eventually(lambda: bundle_in(api, "shop"))
    api.put(namespace("other", labels=MESHED))
    labelled = time.monotonic()
    await eventually(lambda: bundle_in(api, "other"), timeout=2.0)
    assert time.monotonic() - labelled < 0.3 + 0.5
    assert not run.task.done()


async def test_the_namespace_watch_brings_it_without_waiting_for_the_interval(publish: Start) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED), namespace("other")])
    run = await publish(api, watch=True, interval=60.0)
    await eventually(lambda: bundle_in(api, "shop"))
    await eventually(lambda: api.watches("namespaces"))
    api.put(namespace("other", labels=MESHED))  # labelled: the selector's watch sees it ADDED
    api.put(namespace("new", labels=MESHED))  # created labelled
    await eventually(lambda: bundle_in(api, "other") and bundle_in(api, "new"), timeout=2.0)
    assert run.rounds() == 1
    assert {r.query.get("labelSelector") for r in api.watches("namespaces")} == {"sidemesh.io/inject=enabled"}
    # The watch restarts every second (watch_timeout_seconds=1) and sees every namespace again:
    # ConfigMaps already seen current are not read again.
    reads = len(api.configmap_requests("GET"))
    await eventually(lambda: len(api.watches("namespaces")) >= 3, timeout=4.0)
    assert len(api.configmap_requests("GET")) == reads


async def test_a_changed_bundle_file_updates_every_configmap(publish: Start, roots: tuple[str, str]) -> None:
    meshed = ["a", "b", "c"]
    api = FakeWatchAPI([namespace(n, labels=MESHED) for n in meshed])
    run = await publish(api, interval=30.0)  # the file change alone must start a round
    await eventually(lambda: all(bundle_in(api, n) == roots[0] for n in meshed))
    versions = {n: api.get("ConfigMap", n, CONFIGMAP_NAME)["metadata"]["resourceVersion"] for n in meshed}
    write_atomically(run.file, roots[0] + roots[1])  # a rotation: old and new root
    await eventually(lambda: all(bundle_in(api, n) == roots[0] + roots[1] for n in meshed), timeout=3.0)
    puts = api.configmap_requests("PUT")
    assert sorted(r.path.split("/")[4] for r in puts) == meshed
    # Each replacement was conditional on the version it read, and moved it on.
    assert [r.body["metadata"]["resourceVersion"] for r in sorted(puts, key=lambda r: r.path)] == [
        versions[n] for n in meshed
    ]
    for n in meshed:
        cm = api.get("ConfigMap", n, CONFIGMAP_NAME)
        assert cm["metadata"]["resourceVersion"] != versions[n]
        assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "sidemesh"}


async def test_an_up_to_date_configmap_is_not_rewritten(publish: Start, roots: tuple[str, str]) -> None:
    by_hand = config_map(CONFIGMAP_NAME, "shop", {BUNDLE_KEY: roots[0]}, labels={"owner": "ops"})
    stale = config_map(CONFIGMAP_NAME, "cart", {BUNDLE_KEY: roots[1], "old.pem": roots[1]})
    api = FakeWatchAPI([namespace("shop", labels=MESHED), namespace("cart", labels=MESHED), by_hand, stale])
    version = api.get("ConfigMap", "shop", CONFIGMAP_NAME)["metadata"]["resourceVersion"]
    run = await publish(api)
    await run.after_rounds(3)
    assert [r.path.split("/")[4] for r in api.configmap_requests("PUT")] == ["cart"]
    assert api.configmap_requests("POST") == []
    assert len(api.configmap_requests("GET", "shop")) >= 3  # looked at every round, written never
    assert api.get("ConfigMap", "cart", CONFIGMAP_NAME)["data"] == {BUNDLE_KEY: roots[0]}
    shop = api.get("ConfigMap", "shop", CONFIGMAP_NAME)
    assert shop["metadata"]["labels"] == {"owner": "ops"} and shop["metadata"]["resourceVersion"] == version


async def test_a_failing_namespace_does_not_stop_the_others(publish: Start, roots: tuple[str, str]) -> None:
    api = FakeWatchAPI([namespace(n, labels=MESHED) for n in ("a", "broken", "c")])
    api.fail_namespaces.add("broken")
    run = await publish(api)
    await eventually(lambda: bundle_in(api, "a") and bundle_in(api, "c"))
    await run.after_rounds(2)
    assert len(api.configmap_requests("GET", "broken")) >= 2  # tried again every round
    assert bundle_in(api, "broken") is None and not run.task.done()
    api.fail_namespaces.clear()  # the API server recovers
    await eventually(lambda: bundle_in(api, "broken") == roots[0])
    assert len(api.configmap_requests("POST")) == 3


async def test_an_immutable_configmap_is_reported_with_the_way_out(
    publish: Start, roots: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The API server refuses any change to an immutable ConfigMap's data (422): it was replaced
    every round for good, logged with the hint for a missing permission. Now nothing is sent; the
    log says how to let the controller write it (delete it), and once deleted it comes back."""
    stale = config_map(CONFIGMAP_NAME, "shop", {BUNDLE_KEY: roots[1]}, immutable=True)
    api = FakeWatchAPI([namespace("shop", labels=MESHED), stale])
    with caplog.at_level(logging.WARNING, logger="sidemesh"):
        run = await publish(api)
        await run.after_rounds(2)
    assert api.configmap_requests("PUT") == [] and bundle_in(api, "shop") == roots[1]
    told = [r for r in caplog.records if "its ConfigMap is immutable" in r.getMessage()]
    assert told and f"delete configmap {CONFIGMAP_NAME}" in told[0].hint  # type: ignore[attr-defined]
    api.delete("ConfigMap", "shop", CONFIGMAP_NAME)
    await eventually(lambda: bundle_in(api, "shop") == roots[0])
    assert "immutable" not in api.get("ConfigMap", "shop", CONFIGMAP_NAME)


async def test_a_failing_namespace_list_is_retried_next_round(publish: Start) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED)])
    api.fail_lists["namespaces"] = 2
    await publish(api)
    await eventually(lambda: bundle_in(api, "shop"))
    assert len(api.lists("namespaces")) >= 3


async def test_a_deleted_configmap_is_restored_and_none_is_ever_deleted(publish: Start) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED)])
    run = await publish(api)
    await eventually(lambda: bundle_in(api, "shop"))
    api.delete("ConfigMap", "shop", CONFIGMAP_NAME)
    await eventually(lambda: bundle_in(api, "shop"))
    api.put(namespace("shop"))  # leaves the mesh: its pods may still mount the ConfigMap
    await run.after_rounds(2)
    assert bundle_in(api, "shop") and {r.method for r in api.configmap_requests()} <= {"GET", "POST", "PUT"}


async def test_a_broken_bundle_file_is_never_published(publish: Start, roots: tuple[str, str]) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED)])
    run = await publish(api, bundle="")  # no file yet: nothing to publish, nothing written
    await asyncio.sleep(0.3)
    assert api.requests == []
    write_atomically(run.file, roots[0])
    await eventually(lambda: bundle_in(api, "shop") == roots[0])
    write_atomically(run.file, b"")  # half-written, or emptied by mistake
    await asyncio.sleep(0.1)
    write_atomically(run.file, b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    await run.after_rounds(2)
    assert bundle_in(api, "shop") == roots[0] and api.configmap_requests("PUT") == []
    write_atomically(run.file, roots[1])
    await eventually(lambda: bundle_in(api, "shop") == roots[1])


async def test_two_replicas_converge_without_a_fight(publish: Start, roots: tuple[str, str]) -> None:
    meshed = [f"ns-{i}" for i in range(5)]
    api = FakeWatchAPI([namespace(n, labels=MESHED) for n in meshed])
    first, second = await publish(api, interval=0.05), await publish(api, interval=0.05)
    await eventually(lambda: all(bundle_in(api, n) == roots[0] for n in meshed))
    await first.after_rounds(3)
    await second.after_rounds(3)
    assert len(api.store["configmaps"]) == len(meshed) and api.configmap_requests("PUT") == []
    assert not first.task.done() and not second.task.done()


async def test_cancel_stops_it_promptly(publish: Start) -> None:
    api = FakeWatchAPI([namespace("shop", labels=MESHED)])
    run = await publish(api, watch=True, interval=60.0)
    await eventually(lambda: bundle_in(api, "shop"))
    await eventually(lambda: api.watches("namespaces"))
    assert await run.stop() < 1.0
    assert run.publisher.watcher is not None and not run.publisher.watcher.thread.is_alive()


async def test_cancel_stops_it_while_watch_events_pour_in(publish: Start) -> None:
    """A cancel that arrives as a watch event wakes the loop is not lost."""
    api = FakeWatchAPI([namespace("shop", labels=MESHED)])
    stop = threading.Event()

    def churn() -> None:  # a namespace whose annotations change all the time
        i = 0
        while not stop.wait(0.001):
            i += 1
            api.put(namespace("shop", {"n": str(i)}, labels=MESHED))

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        for _ in range(5):
            run = await publish(api, watch=True, interval=60.0)
            await eventually(lambda: api.watches("namespaces"))
            await asyncio.sleep(0.1)
            assert await run.stop() < 2.0
    finally:
        stop.set()
        churner.join()


async def test_a_meshed_namespace_that_enforces_pod_security_is_reported_once(
    publish: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Pod Security baseline or restricted refuses the injected init container (NET_ADMIN,
    NET_RAW): every pod there would be refused, with only the ReplicaSets' events to say why."""
    caplog.set_level(logging.WARNING, logger="sidemesh.controller")
    api = FakeWatchAPI(
        [
            namespace("shop", labels={**MESHED, "pod-security.kubernetes.io/enforce": "baseline"}),
            namespace("ok", labels={**MESHED, "pod-security.kubernetes.io/enforce": "privileged"}),
            namespace("warned", labels={**MESHED, "pod-security.kubernetes.io/warn": "restricted"}),
        ]
    )
    run = await publish(api)
    await eventually(lambda: bundle_in(api, "shop"))
    await run.after_rounds(2)
    lines = [r for r in caplog.records if r.getMessage().startswith("meshed namespace enforces Pod Security")]
    assert [(r.namespace, r.level) for r in lines] == [("shop", "baseline")]  # type: ignore[attr-defined]
    assert "pod-security.kubernetes.io/enforce=privileged" in lines[0].getMessage()
