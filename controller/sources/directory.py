"""The directory source: the same kinds as YAML files, reloaded when they change (local mode, VMs,
tests). A malformed or half-written file never takes the controller down: its documents become
errors and every other resource still applies."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from controller.sources import OnChange
from sidemesh.mesh import directory

log = logging.getLogger("sidemesh.controller.directory")


class DirectorySource:
    def __init__(self, path: Path, poll_seconds: float = 0.25) -> None:
        self.path = path
        self.poll_seconds = poll_seconds

    async def run(self, on_change: OnChange) -> None:
        stamp: object = None
        reader = directory.Reader(self.path)  # re-parses only the files that changed
        while True:
            try:
                current = directory.stamp(self.path)
                if current != stamp:
                    stamp = current
                    snapshot = await asyncio.to_thread(reader.load)
                    for error in snapshot.errors:
                        log.error(
                            "invalid resource: an invalid ServiceAuthorization allows nothing until fixed, an invalid default-policy annotation counts as deny, anything else is ignored; everything else still applies",
                            extra={"error": error},
                        )
                    on_change(snapshot)
            except OSError as exc:
                log.error(
                    "cannot read the configuration directory",
                    extra={"path": str(self.path), "error": str(exc)},
                )
            await asyncio.sleep(self.poll_seconds)
