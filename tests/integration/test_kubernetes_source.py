"""The Kubernetes source against an API server that speaks the real list/watch wire format (the
real `kubernetes` client code paths run): resourceVersion bookkeeping, bookmarks, 410 Gone,
dropped connections, and ServiceAuthorization status write-back."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.sources.kubernetes import KubernetesSource, api_client_from
from sidemesh.mesh.resources import EndpointAddress, Snapshot
from tests.support.clock import FakeClock
from tests.support.kube_api import api_client
from tests.support.kube_watch_api import (
    FakeWatchAPI,
    authorization,
    endpoint_slice,
    namespace,
    pod,
    service,
    service_account,
)

BACKOFF = 0.1

SEED = [
    namespace("shop", {"sidemesh.io/default-policy": "deny"}),
    namespace("other"),
    service_account("frontend"),
    service_account("cart"),
    pod("frontend-1", ip="10.0.0.1", labels={"app": "frontend"}, sa="frontend"),
    pod("cart-1", ip="10.0.0.2", labels={"app": "cart"}, sa="cart"),
    pod("cart-plain", ip="10.0.0.3", labels={"app": "cart"}, meshed=False),  # selected, but not meshed
    pod("cart-1", "other", ip="10.0.1.2", labels={"app": "cart"}),  # meshed, but another namespace
    pod("job", ip="10.0.0.9", phase="Succeeded"),  # terminated: not a workload
    pod("pending", ip=None),  # no IP yet: not a workload
    service("cart"),
    service("frontend"),
    endpoint_slice(
        "cart-a1b2c", "cart", pods=(("cart-1", "10.0.0.2", True), ("cart-plain", "10.0.0.3", False))
    ),
    endpoint_slice("frontend-x9y8z", "frontend", pods=(("frontend-1", "10.0.0.1", None),)),
    authorization("cart-allow-frontend"),
]
INVALID = authorization("broken", spec={"selector": {"matchLabels": {"app": "cart"}}, "rules": [{"to": {}}]})


class Snapshots:
    def __init__(self) -> None:
        self.all: list[Snapshot] = []
        self._changed = asyncio.Event()

    def __call__(self, snapshot: Snapshot) -> None:
        assert threading.current_thread() is threading.main_thread()  # the event loop's thread
        self.all.append(snapshot)
        self._changed.set()

    async def until(self, predicate: Callable[[Snapshot], bool], timeout: float = 5.0) -> Snapshot:
        async with asyncio.timeout(timeout):
            while True:
                if self.all and predicate(self.all[-1]):
                    return self.all[-1]
                self._changed.clear()
                await self._changed.wait()


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := condition()):  # noqa: ASYNC110 (the fake API server's threads: poll)
            await asyncio.sleep(0.02)
        return result


@dataclass
class Running:
    api: FakeWatchAPI
    source: KubernetesSource
    snapshots: Snapshots
    task: asyncio.Task[None]

    def watcher(self, kind: str) -> Any:
        return next(w for w in self.source.watchers if w.kind == kind)

    async def synced(self) -> Snapshot:
        return await self.snapshots.until(lambda s: True)

    async def stop(self) -> float:
        started = time.monotonic()
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        return time.monotonic() - started


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[tuple[Running, Any]] = []

    async def start(api: FakeWatchAPI | None = None, **settings: Any) -> Running:
        api = api or FakeWatchAPI(SEED)
        client = api_client(api.url)
        options: dict[str, Any] = {
            "backoff_initial": BACKOFF,
            "watch_timeout_seconds": 1,
            "request_timeout": 5.0,
            "status_retry_seconds": 0.2,
        }
        options.update(settings)
        source = KubernetesSource(client, options.pop("resync_backoff_max", 1.0), **options)
        snapshots = Snapshots()
        running = Running(api, source, snapshots, asyncio.create_task(source.run(snapshots)))
        started.append((running, client))
        return running

    yield start
    for running, _ in started:
        if not running.task.done():
            await running.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("sidemesh-watch")]
    for running, client in started:
        client.close()
        running.api.close()


def refs(snapshot: Snapshot) -> list[str]:
    return [w.ref for w in snapshot.workloads]


def accepted(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Accepted")


# -- list and watch -------------------------------------------------------------------------------


async def test_nothing_is_served_before_every_kind_is_listed_then_one_whole_snapshot(start: Start) -> None:
    api = FakeWatchAPI(SEED)
    api.fail_lists["serviceauthorizations"] = 2  # the others are listed long before
    kube = await start(api)
    first = await kube.synced()
    assert len(api.lists("serviceauthorizations")) == 3
    assert kube.snapshots.all == [first]
    assert refs(first) == ["other/cart-1", "shop/cart-1", "shop/cart-plain", "shop/frontend-1"]
    by_ref = {w.ref: w for w in first.workloads}
    assert by_ref["shop/cart-1"].service_account == "cart" and by_ref["shop/cart-1"].meshed
    assert not by_ref["shop/cart-plain"].meshed
    assert [(s.namespace, s.name, s.cluster_ip) for s in first.services] == [
        ("shop", "cart", "10.96.0.10"),
        ("shop", "frontend", "10.96.0.10"),
    ]
    assert {(e.namespace, e.service): e.endpoints for e in first.endpoints} == {
        ("shop", "cart"): (EndpointAddress("10.0.0.2", "http", 8080, "shop/cart-1"),),  # not the unready one
        ("shop", "frontend"): (EndpointAddress("10.0.0.1", "http", 8080, "shop/frontend-1"),),
    }
    assert [n.name for n in first.namespaces] == ["other", "shop"]
    assert first.namespaces[1].annotations == (("sidemesh.io/default-policy", "deny"),)
    assert [p.ref for p in first.policies] == ["shop/cart-allow-frontend"]
    assert first.errors == ()


async def test_changes_during_the_watch_arrive_as_events_without_relisting(start: Start) -> None:
    kube = await start()
    await kube.synced()
    kube.api.put(pod("cart-2", ip="10.0.0.4", labels={"app": "cart"}))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))
    kube.api.put(pod("pending", ip="10.0.0.5"))  # MODIFIED: got its IP
    await kube.snapshots.until(lambda s: "shop/pending" in refs(s))
    kube.api.put(pod("cart-1", ip="10.0.0.2", labels={"app": "cart"}, phase="Failed"))
    await kube.snapshots.until(lambda s: "shop/cart-1" not in refs(s))
    assert len(kube.api.lists("pods")) == 1


async def test_a_deleted_service_and_its_endpoints_disappear(start: Start) -> None:
    kube = await start()
    await kube.synced()
    kube.api.delete("Service", "shop", "frontend")
    kube.api.delete("EndpointSlice", "shop", "frontend-x9y8z")
    last = await kube.snapshots.until(lambda s: len(s.services) == 1 and len(s.endpoints) == 1)
    assert [s.name for s in last.services] == ["cart"] and last.endpoints[0].service == "cart"


async def test_a_watch_ended_by_the_server_resumes_from_the_last_resource_version(start: Start) -> None:
    kube = await start()
    await kube.synced()
    added = kube.api.put(pod("cart-2", ip="10.0.0.4"))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))
    version = added["metadata"]["resourceVersion"]
    await eventually(
        lambda: any(w.query["resourceVersion"] == version for w in kube.api.watches("pods")), 4.0
    )
    assert len(kube.api.lists("pods")) == 1


async def test_a_bookmark_moves_the_resource_version_the_next_watch_resumes_from(start: Start) -> None:
    kube = await start()
    await kube.synced()
    kube.api.put(service("payments"))  # the store moves on; the pod watch sees nothing of it
    await kube.snapshots.until(lambda s: len(s.services) == 3)
    listed = kube.watcher("pods").resource_version
    bookmark = kube.api.bookmark("pods")
    assert int(bookmark) > int(listed)
    await eventually(
        lambda: any(w.query["resourceVersion"] == bookmark for w in kube.api.watches("pods")), 4.0
    )
    assert all(w.query["allowWatchBookmarks"] == "true" for w in kube.api.watches("pods"))
    assert len(kube.api.lists("pods")) == 1


@pytest.mark.parametrize("http_410", [False, True], ids=["error-event", "http-410"])
async def test_an_expired_resource_version_makes_the_source_relist(start: Start, http_410: bool) -> None:
    kube = await start(FakeWatchAPI(SEED, expire_with_http_410=http_410), watch_timeout_seconds=30)
    await kube.synced()
    kube.api.put(pod("missed", ip="10.0.0.7"), notify=False)  # its event is lost to compaction
    kube.api.delete("Pod", "shop", "cart-plain", notify=False)  # and so is this one's
    compacted = kube.api.compact()
    kube.api.drop_watches("pods")
    last = await kube.snapshots.until(lambda s: "shop/missed" in refs(s))
    assert len(kube.api.lists("pods")) == 2
    assert refs(last) == ["other/cart-1", "shop/cart-1", "shop/frontend-1", "shop/missed"]
    assert [p.ref for p in last.policies] == ["shop/cart-allow-frontend"] and len(last.services) == 2
    resumed = await eventually(
        lambda: [w for w in kube.api.watches("pods") if int(w.query["resourceVersion"]) >= compacted]
    )
    assert resumed
    kube.api.put(pod("after", ip="10.0.0.8"))
    await kube.snapshots.until(lambda s: "shop/after" in refs(s))


async def test_a_dropped_connection_is_resumed_after_a_backoff_without_relisting(start: Start) -> None:
    kube = await start(watch_timeout_seconds=30)
    await kube.synced()
    await eventually(lambda: kube.api.watches("pods"))
    version = kube.watcher("pods").resource_version
    dropped_at = time.monotonic()
    kube.api.drop_watches("pods")
    again = await eventually(lambda: kube.api.watches("pods")[1:])
    assert again[0].query["resourceVersion"] == version
    assert again[0].at - dropped_at >= BACKOFF * 0.9
    assert len(kube.api.lists("pods")) == 1
    kube.api.put(pod("cart-2", ip="10.0.0.4"))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))


@pytest.mark.parametrize("failure", ["refuse_watches", "end_watches_at_once"])
async def test_failures_in_a_row_back_off_exponentially_then_reset(start: Start, failure: str) -> None:
    kube = await start(watch_timeout_seconds=30, backoff_initial=0.05, resync_backoff_max=10.0)
    await kube.synced()
    await eventually(lambda: kube.api.watches("pods"))
    getattr(kube.api, failure)["pods"] = 3  # die right after the headers, or end without an event
    kube.api.drop_watches("pods")
    watches = await eventually(lambda: len(kube.api.watches("pods")) >= 5 and kube.api.watches("pods"), 6.0)
    gaps = [b.at - a.at for a, b in itertools.pairwise(watches[1:])]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):  # after the 2nd, 3rd, 4th failure
        assert gap >= expected * 0.9, gaps
    assert {w.query["resourceVersion"] for w in watches} == {watches[0].query["resourceVersion"]}
    kube.api.put(pod("cart-2", ip="10.0.0.4"))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))
    assert kube.watcher("pods").failures == 0


async def test_a_paged_list_is_one_consistent_list(start: Start) -> None:
    kube = await start(list_page_size=2)
    first = await kube.synced()
    assert len(refs(first)) == 4
    pages = kube.api.lists("pods")
    assert [p.query.get("continue") for p in pages] == [None, "2", "4"]


async def test_an_expired_continue_token_gives_one_unpaged_list(start: Start) -> None:
    """A list longer than etcd keeps its compaction window: its continue token expires (410).
    Paging again from the start expired again, for good, and nothing was ever served; client-go's
    pager then lists in one page, and so does the source."""
    api = FakeWatchAPI(SEED)
    api.expire_continue_tokens = True
    kube = await start(api, list_page_size=2)
    first = await kube.synced()
    assert len(refs(first)) == 4
    pages = kube.api.lists("pods")
    assert [(p.query.get("continue"), p.query.get("limit")) for p in pages] == [
        (None, "2"),
        ("2", "2"),
        (None, None),
    ]


async def test_a_silent_watch_is_given_up_and_resumed(start: Start) -> None:
    """A half-open watch connection (a node or a load balancer gone) sends nothing; it was noticed
    after timeoutSeconds plus the request timeout (330 s by default). The API server sends a
    BOOKMARK about every minute: a watch silent for longer is reconnected from its
    resourceVersion, without a relist."""
    api = FakeWatchAPI(SEED)
    api.silent_watches["pods"] = 1
    kube = await start(api, watch_timeout_seconds=30, watch_idle_seconds=0.5)
    await kube.synced()
    await eventually(lambda: len(kube.api.watches("pods")) >= 2, 3.0)
    kube.api.put(pod("cart-2", ip="10.0.0.4"))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))
    assert len(kube.api.lists("pods")) == 1 and kube.watcher("pods").failures == 0


async def test_cancel_stops_every_watch_thread_at_once(start: Start) -> None:
    kube = await start(watch_timeout_seconds=60)
    await kube.synced()
    await eventually(lambda: all(kube.api.watches(w.kind) for w in kube.source.watchers))
    assert await kube.stop() < 2.0
    assert not [t for t in threading.enumerate() if t.name.startswith("sidemesh-watch")]


# -- ServiceAuthorization status -------------------------------------------------------------------


async def test_an_invalid_authorization_is_reported_and_everything_else_applies(start: Start) -> None:
    kube = await start(FakeWatchAPI([*SEED, INVALID]))
    first = await kube.synced()
    # The broken policy stands in allowing nothing to what it selects (fail closed), not skipped.
    assert [(p.ref, len(p.rules), bool(p.invalid)) for p in first.policies] == [
        ("shop/broken", 0, True),
        ("shop/cart-allow-frontend", 1, False),
    ]
    assert len(first.errors) == 1 and first.errors[0].startswith("ServiceAuthorization shop/broken: ")
    assert "needs 'from'" in first.errors[0] and len(first.workloads) == 4
    broken = await eventually(
        lambda: "status" in (o := kube.api.get("ServiceAuthorization", "shop", "broken")) and o
    )
    condition = accepted(broken)
    assert (condition["status"], condition["reason"]) == ("False", "Invalid")
    assert "rules[0]: a rule needs 'from'" in condition["message"]
    assert condition["message"].endswith("until it is fixed it allows nothing to the workloads it selects")
    # The meshed cart pod it blocks (app: cart in shop), as for a valid policy.
    assert condition["observedGeneration"] == 1 and broken["status"]["selectedWorkloads"] == 1
    assert {p.content_type for p in kube.api.status_patches()} == {"application/merge-patch+json"}


async def test_a_valid_authorization_is_accepted_with_the_meshed_workloads_it_selects(start: Start) -> None:
    clock = FakeClock()
    kube = await start(clock=clock)
    await kube.synced()

    def written() -> dict[str, Any]:
        status: dict[str, Any] = kube.api.get("ServiceAuthorization", "shop", "cart-allow-frontend").get(
            "status", {}
        )
        return status

    status = await eventually(written)
    condition = status["conditions"][0]
    assert (condition["type"], condition["status"], condition["reason"]) == ("Accepted", "True", "Accepted")
    assert status["selectedWorkloads"] == 1  # not the unmeshed pod, not the other namespace's
    since = condition["lastTransitionTime"]

    clock.offset += dt.timedelta(hours=1)
    kube.api.put(pod("cart-2", ip="10.0.0.4", labels={"app": "cart"}))
    status = await eventually(lambda: written()["selectedWorkloads"] == 2 and written())
    assert status["conditions"][0]["lastTransitionTime"] == since  # the condition did not change

    kube.api.put(
        authorization(
            "cart-allow-frontend", spec={"selector": {"matchLabels": {"app": "cart"}}, "rules": "all"}
        )
    )
    status = await eventually(lambda: written()["conditions"][0]["status"] == "False" and written())
    assert status["conditions"][0]["observedGeneration"] == 2
    assert status["conditions"][0]["lastTransitionTime"] != since


async def test_other_writers_conditions_are_kept_in_what_is_written(start: Start) -> None:
    """A merge patch replaces the whole conditions list: another controller's condition was lost at
    our next write."""
    kube = await start()
    await kube.synced()

    def conditions() -> dict[str, str]:
        obj = kube.api.get("ServiceAuthorization", "shop", "cart-allow-frontend")
        return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}

    await eventually(lambda: conditions().get("Accepted") == "True")
    other = {"type": "Programmed", "status": "True", "reason": "Other", "message": "",
             "lastTransitionTime": "2025-01-01T00:00:00Z"}  # fmt: skip
    accepted_now = kube.api.get("ServiceAuthorization", "shop", "cart-allow-frontend")["status"]["conditions"]
    kube.api._patch_status("shop", "cart-allow-frontend", {"status": {"conditions": [other, *accepted_now]}})
    entries = kube.source.entries["serviceauthorizations"]
    await eventually(lambda: entries["shop/cart-allow-frontend"].value.other_conditions)  # its event is in
    kube.api.put(pod("cart-2", ip="10.0.0.4", labels={"app": "cart"}))  # selectedWorkloads: 2, written
    await eventually(
        lambda: (
            kube.api.get("ServiceAuthorization", "shop", "cart-allow-frontend")["status"]["selectedWorkloads"]
            == 2
        )
    )
    assert conditions() == {"Programmed": "True", "Accepted": "True"}


async def test_two_controller_replicas_do_not_fight_over_the_status(start: Start) -> None:
    """manifests run two replicas: each compared its status with what the object had, took the
    other's write (stamped a second, or an hour, apart) for an overwrite and wrote its own back,
    hundreds of times a second."""
    api = FakeWatchAPI(SEED)
    late = FakeClock()
    late.offset += dt.timedelta(hours=1)
    one, two = await start(api), await start(api, clock=late)
    await one.synced()
    await two.synced()
    api.put(
        authorization(
            "cart-allow-frontend", spec={"selector": {"matchLabels": {"app": "cart"}}, "rules": "all"}
        )
    )
    await asyncio.sleep(1.5)
    assert len(api.status_patches()) <= 6, len(api.status_patches())


async def test_no_status_write_when_nothing_changed(start: Start) -> None:
    api = FakeWatchAPI([*SEED, INVALID])
    kube = await start(api)
    await kube.synced()
    await eventually(lambda: len(api.status_patches()) == 2)
    kube.api.put(pod("unrelated", "other", ip="10.0.1.9", labels={"app": "web"}))
    await kube.snapshots.until(lambda s: "other/unrelated" in refs(s))
    kube.api.put(pod("cart-1", ip="10.0.0.2", labels={"app": "cart", "version": "v2"}, sa="cart"))
    await kube.snapshots.until(
        lambda s: ("version", "v2") in dict((w.ref, w) for w in s.workloads)["shop/cart-1"].labels
    )
    await asyncio.sleep(0.3)
    assert len(api.status_patches()) == 2  # our own MODIFIED events did not cause writes either
    await kube.stop()

    restarted = await start(api)  # a new controller reads what is there and agrees with it
    await restarted.synced()
    await asyncio.sleep(0.3)
    assert len(api.status_patches()) == 2


async def test_failed_status_writes_never_break_the_watch_and_are_retried(start: Start) -> None:
    api = FakeWatchAPI(SEED)
    api.fail_status_patches = True
    kube = await start(api)
    await kube.synced()
    await eventually(lambda: api.status_patches())
    kube.api.put(pod("cart-2", ip="10.0.0.4", labels={"app": "cart"}))
    await kube.snapshots.until(lambda s: "shop/cart-2" in refs(s))
    await eventually(lambda: [p for p in api.status_patches() if p.body["status"]["selectedWorkloads"] == 2])
    await asyncio.sleep(0.05)  # that write failed; nothing changes from now on but the API server
    api.fail_status_patches = False
    status = await eventually(
        lambda: api.get("ServiceAuthorization", "shop", "cart-allow-frontend").get("status")
    )
    assert status["selectedWorkloads"] == 2


async def test_api_client_from_a_kubeconfig(start: Start, tmp_path: Path) -> None:
    api = FakeWatchAPI(SEED)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": api.url}}],
                "users": [{"name": "controller", "user": {"token": "controller-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "controller"}}],
                "current-context": "test",
            }
        )
    )
    client = api_client_from(kubeconfig)
    try:
        source = KubernetesSource(client)
        snapshots = Snapshots()
        task = asyncio.create_task(source.run(snapshots))
        first = await snapshots.until(lambda s: True)
        assert len(first.workloads) == 4
        assert {r.authorization for r in api.requests} == {"Bearer controller-token"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        client.close()
        api.close()


def test_authz_check_against_a_cluster_reads_once_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sidemesh authz check --kubeconfig` ran the controller's source: watches in daemon threads
    (left blocked at exit, they aborted the interpreter now and then: exit code 134) and its status
    writer, which patched ServiceAuthorization status with the user's credentials. Now: one list of
    each kind, nothing else."""
    import yaml

    from sidemesh.cli import main

    api = FakeWatchAPI([*SEED, INVALID])
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        argv = ["authz", "check", "--kubeconfig", str(kubeconfig), "--port", "8080", "--to", "shop/cart"]
        assert main([*argv, "--from", "shop/stranger"]) == 1
        out = capsys.readouterr().out
        assert "DENY shop/stranger -> shop/cart-1:8080" in out and "broken" in out  # the invalid one said
        requests = list(api.requests)
        # RBAC that does not allow a list: one line naming the kind and what to check (it was the
        # API client's five lines of headers and body, and "check --kubeconfig").
        api.forbid_lists.add("endpointslices")
        assert main([*argv, "--from", "shop/stranger"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "403 Forbidden" in err and "may not list endpointslices" in err, err
    finally:
        api.close()
    assert requests and all(r.method == "GET" and "watch" not in r.query for r in requests), [
        (r.method, r.path, r.query) for r in requests
    ]
