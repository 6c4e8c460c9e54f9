"""TVM's CPU thread pool, set up the way hawqc's modules want it.

TVM sizes its pool once, when it is first used: from ``TVM_NUM_THREADS``, else half the logical
CPUs (it assumes hyper-threading: a 2-core VM gets one thread). Its idle workers then spin,
yielding, for ``TVM_THREAD_POOL_SPIN_COUNT`` rounds (300000 by default) before they sleep, which
starves any other work in the process for a long while after a call returns. :func:`configure` runs
before hawqc's first TVM call: one worker per physical core the process may use, a short spin
(long enough to bridge the gap between two kernels of one call), a user's own settings of either
variable left alone; afterwards ``threads`` picks how many of the pool's workers a call uses.
"""

from __future__ import annotations

import os

SPIN_COUNT = 100
"""Yield rounds an idle worker spins before it sleeps (TVM's default: 300000)."""

_pool_size: int | None = None
_in_use: int | None = None


def default_threads() -> int:
    """Physical cores this process may run on (logical ones where that is unknown)."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


def configure(threads: int | None = None) -> int:
    """Size TVM's pool (once per process) and make calls use ``threads`` workers (default: every
    worker of the pool). Returns the number used; ``ValueError`` for a count below 1."""
    global _pool_size, _in_use
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if _pool_size is None:
        os.environ.setdefault("TVM_NUM_THREADS", str(max(threads or 0, default_threads())))
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
        _pool_size = int(os.environ["TVM_NUM_THREADS"])
    used = min(threads or _pool_size, _pool_size)
    if used != _in_use:  # every call of a module comes here: reconfigure only on a change
        import tvm

        tvm.get_global_func("runtime.config_threadpool")(1, used)  # 1: TVM's default affinity mode ("big" cores)
        _in_use = used
    return used
