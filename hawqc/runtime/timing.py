"""Timing one engine on one model, alone in its interpreter; ``hawqc bench`` runs this module once per figure.

    python -m hawqc.runtime.timing ENGINE PATH SHAPE [--runs N] [--threads T] [--target T] [--kernels K]

ENGINE: ``hawqc`` (an artifact folder, recompiled from its integer graph when SHAPE differs from
the one it was compiled for, or a model file compiled with ``--target``/``--kernels``),
``onnxruntime`` or ``openvino`` (an ONNX file). Why a process per figure: TVM's worker threads keep
spinning after a call, starving whatever the same process runs next (``/work/shared`` notes,
README "Threads"). Warms up for :data:`WARM_UP_S`, then times ``--runs`` calls; prints one JSON line
with median/min/max ms, the 1-minute load average before and after, and ``other_cores``: CPU time
the rest of the machine used during the timed calls, in cores. A failure prints
``{"error": "..."}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

WARM_UP_S = 1.0
TIMED_S = 1.0
"""Calls go on past ``runs`` until this long has been timed (at most 20x ``runs``): a short call's median
then rests on hundreds of calls, not on a few that a moment of other work on the machine can move."""
WORKER_TIMEOUT_S = 900
PEERS = ("onnxruntime", "openvino")
"""Engines that run the same ONNX file beside hawqc."""


def hawqc_engine(path: str, x: np.ndarray, threads: int | None, target: str | None = None,
                 kernels: str | None = None) -> Callable[[], Any]:
    """A hawqc module for ``x``'s shape: the artifact at ``path`` as it is (if it runs this shape),
    or recompiled for it (same target and kernels); or the model file at ``path`` compiled for it."""
    from pathlib import Path

    from hawqc import api
    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target

    if Path(path).is_dir():
        module = api.load(path, threads=threads)
        if len(module.input_shape) != x.ndim or any(d not in (None, n) for d, n in zip(module.input_shape, x.shape)):
            module = compile_graph(module.graph, x.shape, module.target, kernels=module.kernels, threads=threads,
                                   int4=module.int4)
    else:
        graph = api.integer_graph_of(path, input_shape=x.shape)
        module = compile_graph(graph, x.shape, parse_target(target), kernels=kernels or "auto", threads=threads)
    return lambda: module(x)


def onnxruntime_engine(path: str, x: np.ndarray, threads: int | None, **_: Any) -> Callable[[], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def openvino_engine(path: str, x: np.ndarray, threads: int | None, **_: Any) -> Callable[[], Any]:
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads or physical_cores(), "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda: request.infer({0: x})


ENGINES: dict[str, Callable[..., Callable[[], Any]]] = {
    "hawqc": hawqc_engine, "onnxruntime": onnxruntime_engine, "openvino": openvino_engine}


def physical_cores() -> int:
    """Physical cores this process may use (what hawqc's thread pool takes by default)."""
    from hawqc.runtime.threads import default_threads

    return default_threads()


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process), since boot / start."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def warm_up(run: Callable[[], Any]) -> None:
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < WARM_UP_S:
        run()


def timed(run: Callable[[], Any], runs: int) -> dict[str, Any]:
    """Median/min/max ms of at least ``runs`` calls (see :data:`TIMED_S`), with the load around them."""
    load_before = os.getloadavg()[0]
    busy, own = busy_seconds()
    start = time.perf_counter()
    times: list[float] = []
    while len(times) < runs or (time.perf_counter() - start < TIMED_S and len(times) < 20 * runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - start
    busy_after, own_after = busy_seconds()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": len(times),
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "other_cores": max(0.0, (busy_after - busy) - (own_after - own)) / wall}


def run_worker(command: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run a timing worker in a fresh process: its last stdout line (one JSON object), or
    ``{"error": ...}`` with the last unindented stderr line (a traceback's exception) when it has none."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        errors = [line for line in done.stderr.splitlines() if line.strip() and not line[0].isspace()]
        return {"error": f"worker exited {done.returncode}: {errors[-1] if errors else 'no output'}"}


def error_json(err: BaseException) -> str:
    """``{"error": ...}``: the exception's type and its first line, or its last where the first only says where
    (ends with a colon, as OpenVINO's nested exceptions do)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    return json.dumps({"error": f"{type(err).__name__}: {lines[-1] if lines[0].endswith(':') else lines[0]}"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("path")
    parser.add_argument("shape")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--target")
    parser.add_argument("--kernels")
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal([int(d) for d in args.shape.split(",")]).astype(np.float32)
    try:
        options = {"target": args.target, "kernels": args.kernels} if args.engine == "hawqc" else {}
        run = ENGINES[args.engine](args.path, x, args.threads, **options)
        warm_up(run)
        result = timed(run, args.runs)
    except Exception as err:  # noqa: BLE001 - any engine's failure is one line of the report
        print(error_json(err), flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
