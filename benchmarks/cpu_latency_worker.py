"""Times one engine on one prepared file, alone in this interpreter; prints one JSON line.

    python benchmarks/cpu_latency_worker.py ENGINE PATH SHAPE [--runs N] [--layers]

ENGINE: ``hawqc`` (an artifact folder), ``onnxruntime`` or ``openvino`` (a QDQ ONNX file), ``pytorch``
(a pickled FP32 ``nn.Module``); SHAPE like ``1,3,224,224``. Warms up for ``WARM_UP_S``, then times
``--runs`` calls. The line holds median/min/max ms, the 1-minute load average before and after, and
``other_cores``: CPU time the rest of the machine used during the timed calls, in cores. ``--layers``
(hawqc only) times every conv/dense kernel call instead (``relax.VirtualMachine.set_instrument``).
A failure prints ``{"error": "..."}`` and exits 1. Run by ``cpu_latency.py``, one process per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

THREADS = 2
WARM_UP_S = 1.0


def hawqc_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    import hawqc

    module = hawqc.load(path)
    return lambda: module(x)


def onnxruntime_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"input": x})


def openvino_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda: request.infer({0: x})


def pytorch_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(THREADS)
    model = torch.load(path, weights_only=False).eval()
    inputs = torch.from_numpy(x)

    def run() -> Any:
        with torch.inference_mode():
            return model(inputs)
    return run


ENGINES = {"hawqc": hawqc_engine, "onnxruntime": onnxruntime_engine, "openvino": openvino_engine,
           "pytorch": pytorch_engine}


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process), since boot / start."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def warm_up(run: Callable[[], Any]) -> None:
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < WARM_UP_S:
        run()


def timed(run: Callable[[], Any], runs: int) -> dict[str, Any]:
    """Median/min/max ms of ``runs`` calls, with the load around them."""
    load_before = os.getloadavg()[0]
    busy, own = busy_seconds()
    start = time.perf_counter()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - start
    busy_after, own_after = busy_seconds()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "other_cores": max(0.0, (busy_after - busy) - (own_after - own)) / wall}


def layer_times(path: str, x: np.ndarray, runs: int) -> dict[str, Any]:
    """Per conv/dense kernel call of a hawqc artifact: median µs over ``runs`` model runs and MACs
    (output elements x the weight's input channels per group x kernel height x width, from the graph)."""
    import hawqc

    module = hawqc.load(path)
    warm_up(lambda: module(x))
    calls: list[tuple[str, float]] = []
    started: dict[str, float] = {}

    def record(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if "conv2d" in symbol or "dense" in symbol:
            if before:
                started[symbol] = time.perf_counter()
            else:
                calls.append((symbol, time.perf_counter() - started[symbol], int(np.prod(args[-1].shape))))
        return 0

    module._vm.set_instrument(record)
    for _ in range(runs):
        module(x)
    module._vm.set_instrument(None)
    ops = [op for op in module.graph.ops if op.op in ("conv2d", "dense")]
    per_run = len(calls) // runs
    if per_run != len(ops):
        raise RuntimeError(f"{per_run} conv/dense kernel calls a run, {len(ops)} conv/dense ops in the graph")
    layers = []
    for i, op in enumerate(ops):
        symbol, _, outputs = calls[i]
        seconds = statistics.median(calls[i + k * per_run][1] for k in range(runs))
        macs = outputs * int(np.prod(op.consts["weight"].shape[1:]))
        layers.append({"layer": op.attrs.get("layer", op.output), "kernel": symbol, "gmac": macs / 1e9,
                       "us": seconds * 1e6, "gmac_per_s": macs / seconds / 1e9})
    return {"layers": layers, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("path")
    parser.add_argument("shape")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layers", action="store_true")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal([int(d) for d in args.shape.split(",")]).astype(np.float32)
    try:
        if args.layers:
            result = layer_times(args.path, x, args.runs)
        else:
            run = ENGINES[args.engine](args.path, x)
            warm_up(run)
            result = timed(run, args.runs)
    except Exception as err:  # any engine's failure is one line of the report
        print(json.dumps({"error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"}))
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
