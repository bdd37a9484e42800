"""What a sidecar on the config stream says when the controller cannot be reached."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from proxy import config_client
from proxy.config_client import ConfigClient


class _Identity:
    def on_rotate(self, callback: Any) -> None:
        pass

    async def wait_ready(self) -> None:
        pass


async def _messages(
    version: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception | None = None,
) -> list[str]:
    client = ConfigClient("127.0.0.1:1", "controller", _Identity(), lambda *a: None)  # type: ignore[arg-type]
    client.version = version

    async def refused() -> None:
        raise error or ConnectionRefusedError("connection refused")

    monkeypatch.setattr(client, "_session", refused)
    monkeypatch.setattr(config_client.rotation, "backoff", lambda *a, **k: 0.01)
    with caplog.at_level(logging.WARNING, logger="sidemesh"):
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return [r.getMessage() for r in caplog.records]


async def test_a_sidecar_that_never_had_a_configuration_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It said "controller stream lost; keeping the last configuration" (version "") of a stream it
    never had, for a configuration it never had, with no hint that --controller may be wrong."""
    messages = await _messages("", monkeypatch, caplog)
    assert messages and all("no configuration from the controller yet" in m for m in messages), messages
    assert "is --controller its address" in messages[0]


async def test_a_sidecar_with_a_configuration_keeps_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    messages = await _messages("v7", monkeypatch, caplog)
    assert messages and all(m == "controller stream lost; keeping the last configuration" for m in messages)


async def test_a_controller_that_answered_is_not_asked_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal (here PERMISSION_DENIED) came from a controller that is there: no hint that the
    address may be wrong."""
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    denied = GRPCError(Status.PERMISSION_DENIED, "not this trust domain")
    messages = await _messages("", monkeypatch, caplog, denied)
    assert messages and all(m == "no configuration from the controller yet" for m in messages), messages
