"""Where the controller reads the mesh from. Every source calls ``on_change(snapshot)`` with the
whole current state whenever something changes; the controller coalesces and compiles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sidemesh.mesh.resources import Snapshot

OnChange = Callable[[Snapshot], None]


class Source(Protocol):
    async def run(self, on_change: OnChange) -> None:
        """Run until cancelled, calling ``on_change`` with each new state."""
        ...
