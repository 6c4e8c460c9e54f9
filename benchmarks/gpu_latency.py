"""GPU latency of hawqc's Tensor Core kernels: INT4 vs INT8, per conv layer and end to end (batch 8).

    python benchmarks/gpu_latency.py [--models resnet18,resnet50] [--arch sm_75] [--out benchmarks/results]

Needs a CUDA GPU (INT4 ``mma`` exists on sm_75 to sm_89; on sm_90 the INT4 rows run as int8): it
prints why and exits 0 without one. Every timed module is checked bit-exact against the numpy
reference on the same input. Per-layer rows time ``[clip -> conv2d -> requantize]`` cut out of the
quantized ResNet-50 on its traced activations (the clip declares the input range). Besides the conv
kernel they time one elementwise kernel at each edge, for INT8 and INT4 alike: NCHW -> NHWC + clip
(+ packing 8 per int32 for INT4) before, NHWC -> NCHW after; a lone layer's output is not packed
(nothing reads it as INT4), inside the model it is. Weights are random (BatchNorm recalibrated), which
does not change the latency.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hawqc import models, quantize
from hawqc.fileio import write_atomic
from hawqc.reference.graph import IntegerGraph, IntOp, execute
from hawqc.reference.kernels import KERNELS
from hawqc.runtime.module import compile_graph

BATCH = 8


def quantized_graph(name: str, config: str) -> IntegerGraph:
    torch.manual_seed(0)
    model = models.get(name)
    calib = [torch.randn(2, *models.spec(name).input_shape)]
    models.recalibrate_bn(model, calib)
    return quantize(model, config, calib).integer_graph()


def latency_ms(module: Any, x: np.ndarray) -> float:
    """Median of 20 timed runs (after a warm-up), in milliseconds."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(module.executable, module.device)
    timer = vm.time_evaluator("main", module.device, number=10, repeat=20, min_repeat_ms=50)
    return float(np.median(timer(tvm.runtime.tensor(x, device=module.device)).results) * 1e3)


def timed(graph: IntegerGraph, x: np.ndarray, target: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    module = compile_graph(graph, x.shape, target, input_dtype=str(x.dtype))
    compile_s = time.perf_counter() - start
    exact = bool(np.array_equal(module(x), graph.run(x)))
    return {"ms": round(latency_ms(module, x), 3), "bit_exact": exact, "compile_s": round(compile_s, 1)}


def layer_graphs(graph: IntegerGraph, x: np.ndarray) -> list[tuple[str, IntegerGraph, np.ndarray]]:
    """One ``[clip -> conv2d -> requantize]`` graph per distinct conv of ``graph``, with its traced input."""
    trace: dict[str, Any] = {}
    execute(graph, x, KERNELS, trace=trace)
    producers = {op.output: op for op in graph.ops}
    consumers = {op.inputs[0]: op for op in graph.ops if op.op == "requantize"}
    layers, seen = [], set()
    for op in graph.ops:
        if op.op != "conv2d" or op.output not in consumers:
            continue
        activation = trace[op.inputs[0]]
        key = (activation.shape, op.consts["weight"].shape, str(op.attrs["stride"]))
        if key in seen:
            continue
        seen.add(key)
        source = producers.get(op.inputs[0])
        while source is not None and "qmin" not in source.attrs:  # max-pooling keeps its input's range
            source = producers.get(source.inputs[0])
        qmin, qmax = (source.attrs["qmin"], source.attrs["qmax"]) if source is not None else (-128, 127)
        clip = IntOp("clip", ["x"], op.inputs[0], {"qmin": qmin, "qmax": qmax})
        requant = consumers[op.output]
        layer = IntegerGraph(input="x", output=requant.output, ops=[clip, op, requant])
        shape = "x".join(map(str, op.consts["weight"].shape))
        name = f"{op.attrs.get('layer', op.output)} {shape} s{op.attrs['stride'][0]}"
        layers.append((name, layer, activation.astype(np.int8 if qmin >= -128 and qmax <= 127 else np.int32)))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--arch", help="sm_75 ... sm_90 (default: the GPU's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import tvm

    device = tvm.cuda()
    if not device.exist:
        print("gpu_latency: no CUDA GPU here; nothing measured")
        return
    arch = args.arch or "sm_" + device.compute_version.replace(".", "")
    target = {"kind": "cuda", "arch": arch}
    rows: list[dict[str, Any]] = []
    x = np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224)).astype(np.float32)
    graphs = {(name, config): quantized_graph(name, config) for name in args.models.split(",")
              for config in ("uniform8", "uniform4")}
    if ("resnet50", "uniform8") in graphs:
        int8_layers = layer_graphs(graphs["resnet50", "uniform8"], x)
        int4_layers = layer_graphs(graphs["resnet50", "uniform4"], x)
        for (name, g8, x8), (_, g4, x4) in zip(int8_layers, int4_layers):
            rows.append({"what": f"resnet50 {name}", "int8": timed(g8, x8, target), "int4": timed(g4, x4, target)})
            print(rows[-1], flush=True)
    for name in args.models.split(","):
        rows.append({"what": f"{name} end to end", "int8": timed(graphs[name, "uniform8"], x, target),
                     "int4": timed(graphs[name, "uniform4"], x, target)})
        print(rows[-1], flush=True)
    gpu = f"{device.device_name} ({arch})"
    lines = [f"# hawqc Tensor Core latency, batch {BATCH}, 224x224, {gpu}", "",
             "| layer / model | INT8 (ms) | INT4 (ms) | INT4 speed-up | bit-exact |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['int8']['ms']} | {r['int4']['ms']} | {r['int8']['ms'] / r['int4']['ms']:.2f}x | "
              f"{r['int8']['bit_exact'] and r['int4']['bit_exact']} |" for r in rows]
    out = Path(args.out)
    write_atomic(out / "gpu_latency.json", json.dumps({"gpu": gpu, "tvm": tvm.__version__, "batch": BATCH,
                                                       "rows": rows}, indent=2) + "\n")
    write_atomic(out / "gpu_latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
