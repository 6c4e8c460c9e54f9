"""The CPU thread pools that run hawqc's kernels: hawqc's own (``pool.c``) and TVM's.

hawqc's pool is linked into every CPU artifact it exports (:func:`export_options`); :func:`install`
points a loaded library's parallel loops at it: tasks claimed one at a time by the threads, so a core
taken by other work slows a call by its share, not to the speed of one core (see ``pool.c``).
``HAWQC_THREAD_POOL=tvm`` keeps TVM's pool, which also runs modules compiled in this process.

TVM sizes its pool once, when it is first used: from ``TVM_NUM_THREADS``, else half the logical
CPUs (it assumes hyper-threading: a 2-core VM gets one thread). Its idle workers then spin,
yielding, for ``TVM_THREAD_POOL_SPIN_COUNT`` rounds (300000 by default) before they sleep, which
starves any other work in the process for a long while after a call returns. :func:`configure` runs
before hawqc's first TVM call: one worker per physical core the process may use, a short spin
(long enough to bridge the gap between two kernels of one call), a user's own settings of either
variable left alone; afterwards ``threads`` picks how many of the pool's workers a call uses.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any

POOL_SOURCE = Path(__file__).with_name("pool.c")
TASKS_PER_THREAD = 2
"""Tasks a parallel loop is cut into per thread of hawqc's pool."""
POOL_SPIN_MICROSECONDS = 100
"""How long an idle worker of hawqc's pool spins (bridging the gap between two kernels) before it sleeps."""
SPIN_COUNT = 100
"""Yield rounds an idle worker spins before it sleeps (TVM's default: 300000)."""

_pool_size: int | None = None
_in_use: int | None = None
_pool: Any = None
"""The first loaded library carrying hawqc's pool: its pool serves every library installed."""


def export_options(target: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``export_library`` for a module of ``target``: hawqc's pool linked in (CPU, Linux).
    Fresh lists per call: ``export_library`` appends its own object files to ``addons``."""
    if target.get("kind") != "llvm" or not sys.platform.startswith("linux"):
        return {}
    return {"addons": [str(POOL_SOURCE)], "options": ["-O2"]}


def install(library: str | os.PathLike[str]) -> bool:
    """Run the parallel loops of the TVM library at ``library`` (loaded by TVM) on hawqc's pool, if one is
    loaded and the library's kernels use no barrier; whether they now do."""
    global _pool
    if os.environ.get("HAWQC_THREAD_POOL") == "tvm" or not sys.platform.startswith("linux"):
        return False
    handle = ctypes.CDLL(str(library))
    try:
        launch = ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch")
    except ValueError:  # no parallel loop in the library
        return False
    if hasattr(handle, "__TVMBackendParallelBarrier"):
        return False
    if _pool is None and hasattr(handle, "hawqc_pool_launch"):
        _pool = handle
        _configure_pool(_in_use or default_threads())
    if _pool is None:
        return False
    launch.value = ctypes.cast(_pool.hawqc_pool_launch, ctypes.c_void_p).value
    return True


@functools.cache
def request_amx() -> bool:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``), which a process needs
    before its first tile instruction; whether it is granted (False off Linux x86-64 or without AMX)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def _configure_pool(threads: int) -> None:
    _pool.hawqc_pool_configure(ctypes.c_int(threads), ctypes.c_int(TASKS_PER_THREAD),
                               ctypes.c_int64(POOL_SPIN_MICROSECONDS))


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
        if _pool is not None:
            _configure_pool(used)
        _in_use = used
    return used
