"""One-thread CPU time of a conv and the residual Add that reads its accumulator, in hawqc's two forms.

    nice -n 19 python benchmarks/add_cost.py [--rounds 4] [--calls 100]

A bottleneck block's tail (ResNet-50's layer1: a 1x1 conv 64 -> 256 on 56x56, added to its int8
shortcut, rounded to int8) compiled twice in one process and timed alternately (``TVM_NUM_THREADS=1``:
every kernel on the calling thread, ``time.thread_time``):

- ``fine``: the conv's epilogue requantizes its accumulator onto an int32 grid 2^21 times finer than the
  Add's output (the form kept for an accumulator clipped by a ReLU), the Add multiplies per tensor;
- ``exact``: the conv's epilogue only clips its accumulator (a requantize by exactly 1), the Add multiplies
  it per channel and adds the bias fractions per channel (:func:`hawqc.reference.graph.aligned_add_ops`).

Both are checked against the reference; prints one JSON line of microseconds per call per round.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["TVM_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

SHAPE = (1, 64, 56, 56)
OUT_CHANNELS = 256


def block(form: str) -> object:
    """The integer graph of the block in ``form`` (``fine`` or ``exact``)."""
    from hawqc.quant.dyadic import bias_in_accumulator
    from hawqc.reference.graph import (
        AddInput,
        IntegerGraph,
        IntOp,
        accumulator_bound,
        accumulator_grid_bits,
        aligned_add_op,
        aligned_add_ops,
        rescale_op,
    )

    rng = np.random.default_rng(0)
    s_x, s_short, s_out = np.float32(0.0213), np.float32(0.0371), np.float32(0.0447)
    s_w = (rng.uniform(0.5, 2.0, OUT_CHANNELS) / 2000).astype(np.float32)
    weight = rng.integers(-127, 128, (OUT_CHANNELS, SHAPE[1], 1, 1)).astype(np.int8)
    bias, fraction = bias_in_accumulator(rng.integers(-3000, 3000, OUT_CHANNELS), (s_x * s_w).astype(np.float32), s_x, s_w)
    ops = [IntOp("quantize", ["input"], "x", {"qmin": -128, "qmax": 127}, {"scale": np.array(s_x)}),
           IntOp("quantize", ["input"], "x1", {"qmin": -128, "qmax": 127}, {"scale": np.array(s_short)}),
           IntOp("conv2d", ["x1"], "x2", {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1},
                 {"weight": np.tile(np.eye(SHAPE[1], dtype=np.int8), (OUT_CHANNELS // SHAPE[1], 1))[:, :, None, None]}),
           rescale_op("x2", "shortcut", s_short, np.float32(1.0), s_short, -128, 127),
           IntOp("conv2d", ["x"], "acc", {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1},
                 {"weight": weight, "bias": bias.astype(np.int32)})]
    shortcut = AddInput("shortcut", np.float64(s_short), 0, 128)
    if form == "fine":
        fine = np.float32(s_out / np.float32(2 ** accumulator_grid_bits(-128, 127)))
        ops.append(rescale_op("acc", "acc:fine", s_x, s_w, fine, -(2**31), 2**31 - 1, fraction=fraction))
        ops.append(aligned_add_op([AddInput("acc:fine", np.float64(fine), 0, 2**31), shortcut], "sum", s_out, -128, 127))
    else:
        acc = AddInput("acc", np.float64(s_x) * s_w.astype(np.float64), 0, accumulator_bound(weight, -128, 127, bias),
                       fraction, accumulator=True)
        ops.extend(aligned_add_ops([acc, shortcut], "sum", s_out, -128, 127))
    ops.append(IntOp("dequantize", ["sum"], "output", {}, {"scale": np.array(s_out)}))
    return IntegerGraph("input", "output", ops)


def main() -> None:
    import hawqc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    modules = {}
    for form in ("fine", "exact"):
        modules[form] = hawqc.compile_integer_only(block(form), input_shape=SHAPE)
        if not np.array_equal(modules[form](x), modules[form].reference(x)):
            raise SystemExit(f"{form}: the compiled module differs from the reference")
        for _ in range(10):
            modules[form](x)
    figures: dict[str, list[float]] = {form: [] for form in modules}
    for _ in range(args.rounds):
        for form, module in modules.items():
            start = time.thread_time()
            for _ in range(args.calls):
                module(x)
            figures[form].append(round((time.thread_time() - start) / args.calls * 1e6, 1))
    print(json.dumps({"us_per_call": figures, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
