"""gRPC's helper threads, scheduled so that they stop interrupting the interpreter thread.

grpc.aio runs the Python code of every call on the event-loop thread, and moves bytes and completion
events on threads of its own (the event engine's I/O threads, the thread that polls the completion
queue and wakes the event loop). When they share a core, each wake-up of a helper thread preempts
the event-loop thread: about twenty context switches per signing, measured with
``/proc/<pid>/task/*/status`` under the bench's load, and the dearest part of a call after the
cryptography. Linux's ``SCHED_BATCH`` policy (sched(7)) keeps the fair share of those threads but
disables wakeup preemption by them: they run when the event loop waits for I/O or its time slice
ends, and then deliver what piled up in one go. Nothing changes on an idle core, where a woken
thread runs at once whatever its policy.

The policy is process-local, needs no privilege, and is only ever applied to the CA's own threads.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("sidemesh.ca")


def batch_helper_threads() -> int:
    """Put every thread of this process but the calling one under ``SCHED_BATCH``.

    Threads they start later inherit the policy. Returns how many threads were changed; 0 where
    the platform has no ``SCHED_BATCH`` (the CA then runs as before).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return 0
    me = threading.get_native_id()
    changed = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return 0
    for tid in tids:
        if tid == me:
            continue
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                changed += 1
        except OSError as exc:  # the thread ended meanwhile, or a sandbox forbids it
            log.debug(
                "cannot change the scheduling policy of a thread", extra={"tid": tid, "error": str(exc)}
            )
    return changed
