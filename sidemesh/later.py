"""Work done a little later, in one go: the batching timer of the access log and of deferred spans."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Later:
    """Runs ``run`` ``delay`` seconds after the first ``due()`` since it last ran, on the event loop
    that was running then; at once when none runs in this thread. A timer left by a closed loop never
    fires, so it counts as none. ``cancel()`` when the work was done some other way."""

    def __init__(self, delay: float, run: Callable[[], None]) -> None:
        self.delay = delay
        self._run = run
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def due(self) -> None:
        if self._timer is not None and self._loop is not None and not self._loop.is_closed():
            return  # already due (the common case: no system call to find the loop)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: at once
            self._run()
            return
        self._timer, self._loop = loop.call_later(self.delay, self._run), loop

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
