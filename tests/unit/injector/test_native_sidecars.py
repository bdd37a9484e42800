"""nativeSidecar auto kept current (injector/cli.py NativeSidecars): a start that got no answer in
time (a large cluster's nodes, page by page) is put right soon after, and later changes (the last
node upgraded, an old node added) are followed without a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from injector import cabundle, cli


async def test_the_answer_is_read_again_and_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[Any] = [TimeoutError(), (True, "v1.31.0"), (False, "v1.31.0, kubelet 1.28 on node x")]
    asked: list[object] = []

    def supported(api: object) -> tuple[bool, str]:
        asked.append(api)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    monkeypatch.setattr(cabundle, "native_sidecars_supported", supported)
    monkeypatch.setattr(cli, "VERSION_WAIT_S", 0.01)
    monkeypatch.setattr(cli, "NATIVE_RECHECK_S", 0.05)
    api = object()
    native = cli.NativeSidecars(False, api, known=False)  # the start got no answer: classic meanwhile
    auto = [True]
    task = asyncio.create_task(native.watch(lambda: auto[0]))
    try:
        for _ in range(200):  # the failed read keeps classic; the next one (soon) says native
            await asyncio.sleep(0.01)
            if native.supported:
                break
        assert native.supported and native.known and len(asked) == 2
        for _ in range(200):  # an old node joined
            await asyncio.sleep(0.01)
            if not native.supported:
                break
        assert not native.supported and asked == [api] * 3
        auto[0] = False  # nativeSidecar set in the settings: nothing more is asked
        await asyncio.sleep(0.2)
        assert len(asked) == 3
    finally:
        task.cancel()


async def test_without_a_cluster_nothing_is_asked() -> None:
    native = cli.NativeSidecars(True)
    await asyncio.wait_for(native.watch(lambda: True), 1)  # returns at once
    assert native.supported


async def test_settings_switched_back_to_auto_ask_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the settings said true or false nothing was asked; back to auto, the answer in hand
    (hours old, or never read) decided pods until the next 10-minute tick."""
    asked: list[object] = []

    def supported(api: object) -> tuple[bool, str]:
        asked.append(api)
        return True, "v1.31.0"

    monkeypatch.setattr(cabundle, "native_sidecars_supported", supported)
    monkeypatch.setattr(cli, "VERSION_WAIT_S", 0.01)
    monkeypatch.setattr(cli, "NATIVE_RECHECK_S", 100.0)  # the tick does not come during the test
    native = cli.NativeSidecars(False, object(), known=True)
    auto = [False]
    task = asyncio.create_task(native.watch(lambda: auto[0]))
    try:
        await asyncio.sleep(0.1)
        assert asked == []
        auto[0] = True
        for _ in range(100):
            await asyncio.sleep(0.01)
            if native.supported:
                break
        assert native.supported and len(asked) == 1
    finally:
        task.cancel()
