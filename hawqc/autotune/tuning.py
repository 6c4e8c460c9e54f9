"""MetaSchedule (XGBoost cost model) on the kernels of a compiled layer, with an on-disk database.

Each distinct set of kernels gets its own folder, named by their structural hash, under the
tuning folder; a ``done`` file marks a finished search, so a killed run re-tunes only the kernels
it was tuning. Layers that compile to the same kernels (INT4 and INT8 do, while the lowering
treats both as int8) share one search.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hawqc import interrupts

BUILD_TIMEOUT_S = 120
"""Each MetaSchedule build worker spends ~30 s importing TVM's intrinsics before its first build."""
DONE = "done"


class Tuner:
    """MetaSchedule's builder and runner, started once per process (their workers take ~30 s to start)."""

    def __init__(self, target: dict[str, Any], trials: int, device: Any, workers: int | None = None) -> None:
        self.target, self.trials, self.device = target, trials, device
        self.workers = workers or os.cpu_count() or 1
        """Build processes, and the core count MetaSchedule assumes for the target."""
        self._builder: Any = None
        self._runner: Any = None

    def database(self, module: Any, root: Path, starting: Callable[[], None] | None = None) -> Any:
        """A database of tuned schedules for ``module``'s kernels (tuned now if not done before;
        ``starting()`` is called when a search starts)."""
        import tvm
        import tvm_ffi
        from tvm.s_tir import meta_schedule as ms

        kernels = {gv.name_hint: f for gv, f in module.lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        if not kernels:
            raise ValueError("the compiled layer has no kernel to tune")
        work_dir = root / f"{tvm_ffi.structural_hash(tvm.IRModule(kernels)) & 0xFFFFFFFFFFFF:012x}"
        if not (work_dir / DONE).exists():
            shutil.rmtree(work_dir, ignore_errors=True)  # a search that was killed midway starts again
            work_dir.mkdir(parents=True)
            if starting:
                starting()
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the log stays in work_dir
                ms.tune_tir(tvm.IRModule(kernels), tvm.target.Target({**self.target, "num-cores": self.workers}),
                            str(work_dir), max_trials_global=self.trials * len(kernels),
                            num_trials_per_iter=min(self.trials, 32), builder=self._started_builder(),
                            runner=self._started_runner(), strategy=_search(self.trials),
                            num_tuning_cores=self.workers, seed=0)
            interrupts.check()  # MetaSchedule logs a Ctrl-C in a builder as failed candidates and goes on
            (work_dir / DONE).write_text("")
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)

    def _started_builder(self) -> Any:
        if self._builder is None:
            self._builder = pooled_builder(self.workers)
        return self._builder

    def _started_runner(self) -> Any:
        from tvm.s_tir import meta_schedule as ms

        if self._runner is None:
            if self.device.key is None:
                self._runner = ms.runner.LocalRunner(timeout_sec=60)
            else:
                config = ms.runner.RPCConfig(tracker_host=self.device.host, tracker_port=self.device.port,
                                             tracker_key=self.device.key, session_timeout_sec=120)
                self._runner = ms.runner.RPCRunner(config, max_workers=1)
        return self._runner


def _search(trials: int) -> Any:
    """Evolutionary search with a population sized for small budgets (the default 512 costs minutes)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=min(trials, 50))


def pooled_builder(workers: int) -> Any:
    """MetaSchedule's local builder, with worker processes kept between searches and a light build
    function: the stock builder starts new workers for every batch, each importing all of TVM's
    tensor intrinsics first (30 s on an idle machine, minutes on a busy one)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=BUILD_TIMEOUT_S)

        def build(self, build_inputs: list[Any]) -> list[Any]:
            interrupts.check()
            jobs = [(b.mod, b.target) for b in build_inputs]
            results = []
            for result in self.pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
                if result.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(result.value, None))
                else:
                    results.append(BuilderResult(None, f"build failed ({result.status.name}): {result.value}"))
            return results

    return PooledBuilder()


def build_candidate(mod: Any, target: Any) -> str:
    """Build one candidate schedule in a worker process; returns the path of its exported library
    (MetaSchedule's default build and export, without importing MetaSchedule)."""
    import os
    import tempfile

    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    library = tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="hawqc-candidate-"), f"candidate.{tar.output_format}")
    library.export_library(path, fcompile=tar)
    return path
