"""The local-mode sidecar's watch of its configuration directory."""

from __future__ import annotations

import asyncio
import types

import pytest

import proxy.sidecar as sidecar_module
from proxy.sidecar import Sidecar


async def test_a_configuration_it_cannot_apply_does_not_end_the_watch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only OSError was caught: any other error from one reload (a Workload whose service account
    cannot be a SPIFFE ID did it) ended the watch task, silently, and no later change applied."""
    monkeypatch.setattr(sidecar_module, "CONFIG_POLL_SECONDS", 0.01)
    outcomes: list[BaseException | None] = [ValueError("a bad document"), None]
    applied = asyncio.Event()

    def reload_config() -> bool:
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        applied.set()
        return True

    stub = types.SimpleNamespace(reload_config=reload_config)
    task = asyncio.create_task(Sidecar._watch_config(stub))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(applied.wait(), 5)
        assert not task.done()
        assert "cannot apply the configuration; keeping the last good one" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
