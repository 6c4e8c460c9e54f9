"""Are 4-bit weights faster packed two per byte on this CPU? One conv/dense layer with 4-bit weights,
compiled with the int8-stored VNNI kernel (``--kernels vnni``, what ``auto`` picks) and with the packed
one (``--kernels vnni-w4``), timed alternately in one process.

    python benchmarks/int4_packing.py [--batches 1,8] [--threads 1] [--rounds 7] [--out benchmarks/results]

The layers are ResNet-50's (and its classifier): the weight-heavy late ones at batch 1 are where packing
could pay, if any layer is bound by weight traffic. Each figure is the minimum over ``--rounds``
alternating rounds of 20 calls: with one thread (the default) the calling thread's CPU time, which other
jobs on a shared machine do not inflate; with more, wall time (the 1-minute load average is recorded).
Both kernels' outputs are checked equal. Saves ``int4_packing.json`` and ``int4_packing.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.fileio import write_atomic
from hawqc.quant.dyadic import dyadic_per_channel
from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.runtime.module import compile_graph
from hawqc.runtime.target import parse_target

LAYERS = {  # name: (input size, in channels, out channels, kernel, stride, padding); None: the classifier
    "layer1 3x3 64": (56, 64, 64, 3, 1, 1), "layer2 1x1 512-128": (28, 512, 128, 1, 1, 0),
    "layer3 3x3 256": (14, 256, 256, 3, 1, 1), "layer3 1x1 1024-256": (14, 1024, 256, 1, 1, 0),
    "layer4 3x3 512": (7, 512, 512, 3, 1, 1), "layer4 1x1 2048-512": (7, 2048, 512, 1, 1, 0),
    "layer4 1x1 512-2048": (7, 512, 2048, 1, 1, 0), "fc 2048-1000": None}
KERNELS = ("vnni", "vnni-w4")
CALLS = 20


def layer(spec: tuple[int, ...] | None, batch: int) -> tuple[IntegerGraph, np.ndarray]:
    """A conv (or dense) + requantize with random 4-bit weights, and a uint8 input of 4-bit values."""
    rng = np.random.default_rng(0)
    if spec is None:
        shape, weight, attrs, op = (batch, 2048), (1000, 2048), {}, "dense"
    else:
        size, cin, cout, k, stride, pad = spec
        shape, weight, op = (batch, cin, size, size), (cout, cin, k, k), "conv2d"
        attrs = {"stride": [stride] * 2, "padding": [pad] * 4, "dilation": [1, 1], "groups": 1}
    b, c = dyadic_per_channel(rng.uniform(2e-5, 2e-4, weight[0]))
    ops = [IntOp(op, ["x"], "acc", attrs, {"weight": rng.integers(-8, 8, weight).astype(np.int8),
                                            "bias": rng.integers(-5000, 5000, weight[0]).astype(np.int32)}),
           IntOp("requantize", ["acc"], "y", {"qmin": 0, "qmax": 15}, {"b": b, "c": c})]
    return IntegerGraph("x", "y", ops), rng.integers(0, 16, shape).astype(np.uint8)


def compare(spec: tuple[int, ...] | None, batch: int, threads: int | None, rounds: int) -> dict[str, float]:
    """Minimum ms a call of each kernel, alternating."""
    graph, x = layer(spec, batch)
    target = parse_target("llvm")
    modules = {k: compile_graph(graph, x.shape, target, input_dtype="uint8", kernels=k, threads=threads)
               for k in KERNELS}
    outputs = [modules[k](x) for k in KERNELS]
    if not np.array_equal(*outputs):
        raise RuntimeError("the packed and int8-stored kernels disagree")
    clock = time.thread_time if threads == 1 else time.perf_counter  # one thread: the kernel runs in this one
    best = dict.fromkeys(KERNELS, float("inf"))
    for _ in range(rounds):
        for k in KERNELS:
            for _ in range(CALLS):
                start = clock()
                modules[k](x)
                best[k] = min(best[k], (clock() - start) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    for name, spec in LAYERS.items():
        for batch in map(int, args.batches.split(",")):
            best = compare(spec, batch, args.threads, args.rounds)
            loads.append(os.getloadavg()[0])
            rows.append({"layer": name, "batch": batch, "int8_stored_ms": round(best["vnni"], 4),
                         "packed_ms": round(best["vnni-w4"], 4), "ratio": round(best["vnni-w4"] / best["vnni"], 2)})
            print(rows[-1], flush=True)
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    lines = [f"# 4-bit weights: packed two per byte vs one per byte (ResNet-50 layers, VNNI, "
             f"{args.threads} thread{'s' if args.threads > 1 else ''})", "",
             f"Minimum {clock} over {args.rounds} alternating rounds of {CALLS} calls, one process; 1-minute load "
             f"average {min(loads):.2f}-{max(loads):.2f} (a shared machine if above ~0.5). Ratio above 1: packed "
             "is slower.",
             "", "| layer | batch | int8-stored ms | packed ms | packed / int8-stored |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['batch']} | {r['int8_stored_ms']} | {r['packed_ms']} | {r['ratio']} |" for r in rows]
    out = Path(args.out)
    write_atomic(out / "int4_packing.json", json.dumps({"threads": args.threads, "rounds": args.rounds,
                                                        "load_1min": [min(loads), max(loads)], "rows": rows},
                                                       indent=2) + "\n")
    write_atomic(out / "int4_packing.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
