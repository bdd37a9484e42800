"""gc_paused: the collector is off inside, back on after (errors too), left off if it was."""

from __future__ import annotations

import gc

import pytest

from sidemesh.gc_pause import gc_paused


def test_the_collector_is_paused_inside_and_running_again_after() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="compile"), gc_paused():
        raise ValueError("a compile that failed")
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_stays_paused() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_compile_leaves_the_collector_running() -> None:
    from controller.state import MeshState
    from sidemesh.mesh.resources import Snapshot
    from sidemesh.policy.model import DefaultPolicy

    MeshState("cluster.local", DefaultPolicy.ALLOW_AUTHENTICATED).update(Snapshot())
    assert gc.isenabled()
