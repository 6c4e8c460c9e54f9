"""One conv layer on each of hawqc's x86 kernels (AMX tiles, VNNI), timed in one process, outputs compared.

    python benchmarks/conv_kernels.py N,H,W,CIN,COUT,K,STRIDE [...] [--runs 20] [--threads 2] [--out DIR]

Each layer: uint8 NHWC input, random int8 weights, "same" padding, the high-word requantize into uint8; the
kernels' scheduled PrimFuncs (``conv2d.conv2d_amx`` and ``conv2d.conv2d``) built for this CPU, called through
hawqc's thread pool, the median of ``--runs`` calls after 3 warm-up calls, the kernels alternating per layer.
Prints and saves ms and GMAC/s per layer and kernel to ``DIR/conv_kernels.{json,md}`` (default:
benchmarks/results). AMX needs a CPU with AMX int8 and Linux's permission (asked for here); without it only
VNNI runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402  (beside this file)

RESULTS = Path(__file__).parent / "results"


def build(func: Any, target: dict[str, Any], folder: str) -> Any:
    import tvm

    from hawqc.runtime import threads

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(target))
    path = os.path.join(folder, f"k{len(os.listdir(folder))}.so")
    lib.export_library(path, **threads.export_options(target))
    loaded = tvm.runtime.load_module(path)
    threads.install(path)
    return loaded["main"]


def time_layer(layer: list[int], kernels: list[str], runs: int, target: dict[str, Any], folder: str) -> list[dict]:
    import tvm

    from hawqc.topi_int4.x86 import amx
    from hawqc.topi_int4.x86.conv2d import Conv2dWorkload, Requant, conv2d, conv2d_amx, pack_weight, runs_on_amx

    n, h, w, cin, cout, k, stride = layer
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, h, w, cin)).astype(np.uint8)
    weight = rng.integers(-50, 50, (cout, cin, k, k)).astype(np.int8)
    rows, outputs = [], []
    for kernel in kernels:
        wl = Conv2dWorkload(n, h, w, cin, cout, (k, k), (stride, stride), (k // 2,) * 4, (1, 1), "uint8",
                            channel_align=amx.CHUNK if kernel == "amx" else 4)
        requant = Requant(0, 255, 0, "uint8", high_word=True)
        f = build(conv2d_amx(wl, requant) if kernel == "amx" else conv2d(wl, requant, True), target, folder)
        oh, ow = wl.out_size
        ocp = wl.packed_out
        args = [tvm.runtime.tensor(a) for a in (x, pack_weight(weight, True, 8, 1, wl.channel_align),
                                                np.zeros(ocp, np.int64), np.full(ocp, 1 << 20, np.int64),
                                                np.full(ocp, 4, np.int32), np.zeros((n, oh, ow, cout), np.uint8))]
        for _ in range(3):
            f(*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            f(*args)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        outputs.append(args[-1].numpy())
        macs = n * oh * ow * cout * cin * k * k
        rows.append({"layer": "x".join(map(str, layer)), "kernel": kernel, "ms": ms, "gmac_per_s": macs / ms / 1e6,
                     "auto_takes_amx": runs_on_amx(wl)})
    equal = all(np.array_equal(outputs[0], o) for o in outputs[1:])
    for row in rows:
        row["outputs_equal"] = equal
    return rows


def markdown(rows: list[dict], how: str) -> str:
    lines = ["# One conv layer per x86 kernel", "", how, "",
             "| layer NxHxWxCINxCOUTxKxSTRIDE | kernel | ms | GMAC/s | `auto` picks AMX | outputs equal |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['kernel']} | {r['ms']:.3f} | {r['gmac_per_s']:.0f} | "
              f"{'yes' if r['auto_takes_amx'] else 'no'} | {'yes' if r['outputs_equal'] else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layers", nargs="+", help="N,H,W,CIN,COUT,K,STRIDE")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        layers = [[int(v) for v in spec.split(",")] for spec in args.layers]
        if any(len(layer) != 7 or min(layer) < 1 for layer in layers):
            raise ValueError
    except ValueError:
        raise SystemExit("conv_kernels: each layer is seven positive integers N,H,W,CIN,COUT,K,STRIDE") from None
    from hawqc.runtime import threads
    from hawqc.runtime.module import has_feature
    from hawqc.runtime.target import parse_target

    threads.configure(args.threads)
    target = parse_target("llvm")
    kernels = ["amx", "vnni"] if has_feature(target, "amx-int8") and threads.request_amx() else ["vnni"]
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for layer in layers for row in time_layer(layer, kernels, args.runs, target, folder)]
    how = (f"`python benchmarks/{' '.join([Path(__file__).name, *sys.argv[1:]])}`: {args.threads} threads, median of "
           f"{args.runs} calls, load 1-min {os.getloadavg()[0]:.2f}.")
    report.save(args.out, "conv_kernels", {"how": how, "rows": rows}, markdown(rows, how))


if __name__ == "__main__":
    report.run(main)
