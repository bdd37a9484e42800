"""`sidemesh demo --netns` as root: the walk-through on real namespaces and iptables, leaving nothing.

1. `sidemesh demo --netns --once` runs every step as described and exits 0.
2. Without --once it keeps running until Ctrl-C (SIGINT), then stops and exits 0.
After each: no network namespace, host interface, host iptables rule, process or temporary file of
the demo is left (the host's `ip netns list`, `ip link`, `iptables-save`, `ps` and /tmp as before).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.netns import CLEAN_ENV, REPO, as_user, why_skip

SKIP = why_skip("ip", "iptables", "iptables-save", "iptables-restore", "setpriv", "unshare", "mount")
pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

DEMO = [sys.executable, "-m", "sidemesh", "demo", "--netns"]


def host_state() -> dict[str, object]:
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout

    return {
        "namespaces": sorted(  # the demo's own: other suites may make theirs meanwhile
            line.split()[0] for line in out("ip", "netns", "list").splitlines() if line.startswith("smdemo-")
        ),
        "links": sorted(line.split()[0] for line in out("ip", "-br", "link").splitlines() if line.strip()),
        "iptables": sorted(line for line in out("iptables-save").splitlines() if line.startswith("-A")),
        "files": sorted(p.name for p in Path(tempfile.gettempdir()).glob("sidemesh-netns-demo-*")),
    }


def demo_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if "sidemesh-netns-demo-" in line or "smdemo-" in line]


@pytest.fixture
def leaves_nothing() -> Iterator[None]:
    before = host_state()
    yield
    after = host_state()
    assert after == before, "the demo left something behind on the host"
    assert demo_processes() == []


def test_1_once_behaves_as_described(leaves_nothing: None) -> None:
    done = subprocess.run(
        [*DEMO, "--once"], capture_output=True, text=True, timeout=240, cwd=REPO, env=CLEAN_ENV
    )
    text = done.stdout
    assert done.returncode == 0, text + done.stderr
    assert "sidecar ready, running as UID 1337" in text
    assert text.count("running as UID 1337") == 3
    assert "REDIRECT --to-ports 15006" in text  # rules read back from the pod's nat table
    assert "cart's sidecar saw the caller as spiffe://cluster.local/ns/shop/sa/frontend, over mTLS" in text
    assert (
        "source spiffe://cluster.local/ns/shop/sa/stranger: no rule of shop/cart-allow-frontend allows it"
        in text
    )
    assert "cart's sidecar log: plaintext connection refused (strict mTLS)" in text
    assert "the stranger's next call is allowed" in text
    assert "5 namespaces deleted" in text
    assert "all steps behaved as described" in text


def test_2_ctrl_c_stops_it_cleanly(leaves_nothing: None) -> None:
    # A shell started in the background ignores SIGINT and its children inherit that: restore it,
    # then exec (not a preexec_fn: forked with one, a process running grpcio can lose the child to
    # SIGABRT before exec, grpc/grpc#43055).
    restore = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", restore, *DEMO],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=CLEAN_ENV,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line or time.monotonic() > deadline:
                break
        assert any("press Ctrl-C" in line for line in lines), "".join(lines)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "5 namespaces deleted" in text and "all steps behaved as described" in text
    print(f"\nstopped {time.monotonic() - started:.1f} s after Ctrl-C")


def test_3_without_root_says_what_to_do(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    tmp_path.chmod(0o755)
    done = subprocess.run(
        as_user(65534, 65534, [*DEMO, "--once"], stage),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**CLEAN_ENV, "HOME": "/"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--netns needs root" in done.stderr
    assert "or run `sidemesh demo` without --netns (no root needed)" in done.stderr
    assert "Traceback" not in done.stderr
