"""bench.l4's RSS peak: sampled through the runs, as VmHWM alone has read below an earlier VmRSS."""

from __future__ import annotations

import subprocess
import sys

from bench.l4 import RssSampler

# Touches 64 MB for half a second, frees it, then lives on: the peak is only seen while it lasts.
CHILD = "import time; time.sleep(0.3); b = b'x' * (64 << 20); time.sleep(0.5); del b; time.sleep(0.5)"


def test_the_sampler_sees_a_peak_that_was_given_back_and_survives_the_process_ending() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    sampler = RssSampler({"child": child.pid}, every=0.02).start()
    child.wait(timeout=30)  # (read after it ended: no error, the peak kept)
    peak = sampler.stop()["child"]
    assert peak > 64, peak  # the 64 MB buffer on top of the interpreter's own
