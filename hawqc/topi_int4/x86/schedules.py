"""Schedules for every x86 kernel that is not a conv/dense: element-wise ops, requantize, pooling.

TVM 0.27 lowers these without any schedule on CPU (one thread, scalar loops). :class:`Parallel` is a
dlight rule: inline what can be inlined, then per remaining block put the spatial loops outside
the reduction loops, run the outer ones on all cores and vectorize the innermost spatial loop (in NHWC the
channels) by 16 lanes when it divides.
"""

from __future__ import annotations

from typing import Any

from tvm.s_tir.dlight.base import ScheduleRule

LANES = 16
PARALLEL_TASKS = 64
"""Parallel iterations enough to share among the cores. The loops inside them stay serial: fused into
the parallel loop as well, every 16-lane iteration recomputed its indices with 64-bit divisions (the
input quantize and transpose of MobileNet-V2 at batch 8 took 3.3x as long)."""


class Parallel(ScheduleRule):
    """Parallel outer loops, vectorized channels, for any PrimFunc not scheduled yet."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if "llvm" != target.kind.name:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in try_inline(sch, infos):
            _schedule_block(sch, info.block_rv, info.dom_kind())
        return sch


def _schedule_block(sch: Any, block: Any, kinds: str) -> None:
    loops = sch.get_loops(block)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    if not spatial or len(spatial) + len(reduce) != len(loops):
        return
    if _extent(sch, spatial[-1]) % LANES and not reduce:
        # a few channels innermost (an NCHW input transposed to NHWC): vectorize the innermost loop that
        # has whole vectors instead, reading it contiguously
        whole = [loop for loop in spatial if _extent(sch, loop) % LANES == 0]
        if whole:
            spatial.remove(whole[-1])
            spatial.append(whole[-1])
    *outer, last = spatial
    sch.reorder(*outer, *reduce, last)  # channels innermost, reductions around them
    lanes = None
    if _extent(sch, last) % LANES == 0:
        last, lanes = sch.split(last, [None, LANES])
    if not reduce:
        outer.append(last)
    if outer:
        tasks, parallel = 1, []
        for loop in outer:  # the outer loops up to enough tasks run in parallel, those inside serially
            parallel.append(loop)
            tasks *= _extent(sch, loop)
            if tasks >= PARALLEL_TASKS:
                break
        sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    if lanes is not None:
        try:
            sch.vectorize(lanes)
        except Exception:  # noqa: BLE001 - TVM refuses some vectorizations under reductions: keep it scalar
            pass


def _extent(sch: Any, loop: Any) -> int:
    """A loop's extent, 1 where it is symbolic (it holds the open batch: never vectorized)."""
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else 1
