"""`sidemesh demo --once`: the newcomer's walk-through, as its own processes, must behave as it says."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def test_demo_once_behaves_as_described_and_leaves_nothing_behind() -> None:
    before = set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*"))
    out = subprocess.run(
        [sys.executable, "-m", "sidemesh", "demo", "--once"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "cart's sidecar saw the caller as spiffe://cluster.local/ns/shop/sa/frontend, over mTLS" in text
    assert (
        "source spiffe://cluster.local/ns/shop/sa/stranger: no rule of shop/cart-allow-frontend allows it"
        in text
    )
    assert "a plaintext client straight at cart's sidecar: refused" in text
    assert "the stranger's next call is allowed" in text
    assert "all steps behaved as described" in text
    assert set(Path(tempfile.gettempdir()).glob("sidemesh-demo-*")) == before  # every file removed
    # every process it started is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sidemesh-demo-" not in ps


def test_demo_help_names_every_option_and_what_netns_needs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidemesh", "demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for option in ("--once", "--keep", "--netns"):
        assert option in text
    assert "needs root" in text
    assert "With --netns (as root) each workload is instead a network namespace" in text
