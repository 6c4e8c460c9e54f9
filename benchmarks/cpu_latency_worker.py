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
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hawqc.runtime import timing  # the timing core: warm-up, timed calls, load and others' CPU

THREADS = 2


def hawqc_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    import hawqc

    module = hawqc.load(path)
    return lambda: module(x)


def onnxruntime_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    return timing.onnxruntime_engine(path, x, THREADS)


def openvino_engine(path: str, x: np.ndarray) -> Callable[[], Any]:
    return timing.openvino_engine(path, x, THREADS)


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


def layer_times(path: str, x: np.ndarray, runs: int) -> dict[str, Any]:
    """Per conv/dense kernel call of a hawqc artifact: median µs over ``runs`` model runs and MACs
    (output elements x the weight's input channels per group x kernel height x width, from the graph)."""
    import hawqc

    module = hawqc.load(path)
    timing.warm_up(lambda: module(x))
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
            timing.warm_up(run)
            result = timing.timed(run, args.runs)
    except Exception as err:  # any engine's failure is one line of the report
        print(timing.error_json(err))
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
