"""The tuning run: every workload x bit width, default schedule first, then MetaSchedule's.

A workload is measured at all its bit widths back to back, so its INT4 and INT8 rows see the same
machine, and its rows enter the table together: a rerun of the same command skips workloads whose
rows are all there (and not marked noisy) and measures the others at every width again. A
measurement that is noisy (spread or load above :class:`~hawqc.autotune.measure.Timing`'s limits)
is taken again, up to three times (the fastest kept if none is steady). The tuned schedule
replaces the default only if it is bit-exact and faster. Failures and rejected candidates are
logged to ``<table>.tuning/tune.log`` and reported at the end; they do not stop the run. Ctrl-C does (:mod:`hawqc.interrupts`): the
workload being measured is left out of the table.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawqc import interrupts
from hawqc.autotune.measure import (
    Device,
    DeviceError,
    Measurement,
    MismatchError,
    Timing,
    error_line,
    measure,
)
from hawqc.autotune.table import LatencyTable
from hawqc.autotune.tuning import Tuner
from hawqc.autotune.workloads import LayerGroup, Workload, layer_graph, random_input


@dataclass
class RunOptions:
    target: dict[str, Any]
    bits: list[int] = field(default_factory=lambda: [4, 8])
    trials: int = 8
    timing: Timing = field(default_factory=Timing)
    device: Device = field(default_factory=Device)
    limit: int | None = None
    """Measure only the first ``limit`` workloads (the others can be predicted)."""
    seed: int = 0
    kernels: str = "auto"
    """The conv/dense kernels of the default schedule (as ``hawqc compile --kernels``)."""
    threads: int | None = None
    """CPU worker threads of a local measurement (default: one per physical core)."""


@dataclass
class RunResult:
    table: LatencyTable
    done: int
    """Entries (workload x bit width) finished by this run."""
    skipped: int
    """Entries already in the table."""
    noisy: int = 0
    """Entries whose measurement stayed noisy after every attempt (marked in the table)."""
    failed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def target_text(target: dict[str, Any]) -> str:
    """``llvm -mcpu=znver4``: the familiar form of a target dict."""
    options = " ".join(f"-{k}={','.join(v) if isinstance(v, list) else v}" for k, v in target.items() if k != "kind")
    return f"{target['kind']} {options}".strip()


def tuning_folder(table_path: Path) -> Path:
    """Where the tuning databases and the log of a table live: ``table.json`` -> ``table.tuning/``."""
    return table_path.with_suffix(".tuning")


def run(groups: list[LayerGroup], table: LatencyTable, options: RunOptions,
        progress: Callable[[str, int, int], None] | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Measure (and tune) every unfinished workload at every bit width, saving the table after each
    workload; ``progress(what, finished, total)`` is called as entries start."""
    import tvm

    target = target_text(options.target)
    table.check_same_place(options.device.machine(target), list(groups[0].workload.input_shape))
    root = tuning_folder(table.path)
    root.mkdir(parents=True, exist_ok=True)
    logger = _file_logger(root / "tune.log", log)
    chosen = groups[:options.limit]
    todo = [g for g in chosen if not all(table.measured(name, b, b) for name in g.layers for b in options.bits)]
    result = RunResult(table, 0, (len(chosen) - len(todo)) * len(options.bits))
    tuner = Tuner(options.target, options.trials, options.device)
    total = len(todo) * len(options.bits)
    for index, group in enumerate(todo):
        rows = []
        for offset, bits in enumerate(options.bits):  # back to back: the widths of a workload see one machine
            what = f"{group.workload.key} w{bits}a{bits}"
            if progress:
                progress(what, index * len(options.bits) + offset, total)
            try:
                best, schedule = _best_schedule(group.workload, bits, options, tuner, root, logger, result)
            except (DeviceError, MismatchError) as err:
                result.failed.append(f"{what}: {err}")
                logger(f"FAILED {what}: {err}")
                break
            noisy = options.timing.noisy(best)
            result.noisy += noisy
            rows.append((bits, best, schedule, noisy))
            logger(f"{what}: {best.latency_ms:.4f} ms ({schedule}; spread {best.spread:.2f}, load "
                   f"{_load(best)}{', noisy' if noisy else ''})")
        else:
            date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for bits, best, schedule, noisy in rows:
                for layer in group.layers:
                    table.put({"layer": layer, "workload": group.workload.key, "w_bits": bits, "a_bits": bits,
                               "latency_ms": round(best.latency_ms, 6), "stdev_ms": round(best.stdev_ms, 6),
                               "n_runs": best.n_runs, "schedule": schedule, "target": target,
                               "device": options.device.name, "tvm_version": tvm.__version__, "date": date,
                               "load_1min": best.load_1min, "spread": round(best.spread, 4), "noisy": noisy})
            interrupts.check()  # a Ctrl-C that TVM swallowed leaves this workload out of the table
            table.save()
            result.done += len(rows)
    if progress:
        progress("done", total, total)
    return result


def _load(measurement: Measurement) -> str:
    return "n/a" if measurement.load_1min is None else f"{measurement.load_1min:.2f}"


def _best_schedule(workload: Workload, bits: int, options: RunOptions, tuner: Tuner, root: Path,
                   logger: Callable[..., None], result: RunResult) -> tuple[Measurement, str]:
    """The default schedule's measurement, or the tuned one's when it is exact and faster."""
    from hawqc.runtime.module import compile_graph

    what = f"{workload.key} w{bits}a{bits}"
    graph = layer_graph(workload, bits, bits, options.seed)
    inputs = [random_input(workload, bits, options.seed + i) for i in range(2)]
    reference = (inputs, [graph.run(x) for x in inputs])
    default = compile_graph(graph, workload.input_shape, options.target, input_dtype="int8", kernels=options.kernels,
                            threads=options.threads)
    best = _measured(default, reference, options, f"{what} default", logger, result)
    if options.trials <= 0:
        return best, "default"
    try:
        candidate = tuned_module(default, tuner, root / "databases", lambda: logger(f"searching {what}", echo=False))
    except Exception as err:  # noqa: BLE001 - a search that breaks (TVMError...) must not end a long run
        interrupts.check()  # a Ctrl-C that TVM turned into an error (RuntimeError) is no failed search
        logger(f"{what}: tuning failed ({error_line(err)}); keeping the default")
        return best, "default"
    try:
        tuned = _measured(candidate, reference, options, f"{what} tuned", logger, result)
    except DeviceError as err:
        logger(f"{what}: the tuned schedule could not be measured ({err}); keeping the default")
        return best, "default"
    if tuned is None:
        return best, "default"
    logger(f"{what}: default {best.latency_ms:.4f} ms, tuned {tuned.latency_ms:.4f} ms")
    return (tuned, "tuned") if tuned.latency_ms < best.latency_ms else (best, "default")


def _measured(module: Any, reference: tuple[list[Any], list[Any]], options: RunOptions, what: str,
              logger: Callable[..., None], result: RunResult) -> Measurement | None:
    """The module's measurement, taken again while noisy (up to ``options.timing.attempts`` times;
    the first steady one, else the fastest); ``None`` (logged as rejected) when it is not bit-exact on the reference
    ``(inputs, outputs)``."""
    timing, best = options.timing, None
    for attempt in range(1, timing.attempts + 1):
        logger(f"measuring {what}", echo=False)
        try:
            found = options.device.run(what, lambda session: measure(module, *reference, session, timing), logger)
        except MismatchError as err:
            result.rejected.append(f"{what}: {err}")
            logger(f"REJECTED {what}: {err}")
            if what.endswith("default"):
                raise
            return None
        interrupts.check()
        if not timing.noisy(found):
            return found
        best = found if best is None or found.latency_ms < best.latency_ms else best
        if attempt < timing.attempts:
            logger(f"{what}: noisy (spread {found.spread:.2f}, load {_load(found)}): measuring again")
    return best


def tuned_module(default: Any, tuner: Tuner, databases: Path, starting: Callable[[], None] | None = None) -> Any:
    """``default``'s graph through TVM's generic lowering, compiled with MetaSchedule's best
    schedules for its kernels (hawqc's own kernels are scheduled by hand: the search starts from
    TVM's unscheduled ones)."""
    from hawqc.runtime.module import compile_graph

    def build(**kwargs: Any) -> Any:
        return compile_graph(default.graph, default.input_shape, default.target, input_dtype=default.input_dtype,
                             kernels="generic", **kwargs)

    return build(database=tuner.database(build(), databases, starting))


def _file_logger(path: Path, show: Callable[[str], None]) -> Callable[..., None]:
    """Append each line, with a time stamp, to ``path`` and echo it (``write(line, echo=False)``: the
    log file only, e.g. what starts now)."""
    logger = logging.getLogger(f"hawqc.tune.{path}")
    if not logger.handlers:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    def write(line: str, echo: bool = True) -> None:
        logger.info(line)
        if echo:
            show(line)
    return write
