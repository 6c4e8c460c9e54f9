"""``hawqc compile``: an ONNX QDQ model (or integer graph) to an integer-only TVM artifact."""

from __future__ import annotations

import argparse

from hawqc.commands._common import add_model_arguments
from hawqc.runtime.target import KERNELS

HELP = "compile a quantized model to an integer-only TVM module (artifact folder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--out", default="hawqc-compiled", help="artifact folder (default: hawqc-compiled)")
    parser.add_argument("--force", action="store_true", help="replace the artifact folder if it exists")
    parser.add_argument("--strict", action="store_true", help="fail if any float op is left inside the graph")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="CPU kernels: auto (VNNI where the CPU has it, else AVX2), vnni, avx2, or generic "
                             "(TVM's unscheduled lowering, a baseline)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from hawqc import api
    from hawqc.relax_passes.float_ops import float_ops
    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target

    if Path(args.out).exists() and not args.force:
        raise ValueError(f"{args.out} exists: choose another output folder or pass --force")
    console = Console()
    target = parse_target(args.target)
    graph = api.integer_graph_of(args.model, args.bit_config, input_shape=args.input_shape)
    shape = api.input_shape_of(graph, args.input_shape)
    start = time.perf_counter()
    module = compile_graph(graph, shape, target, kernels=args.kernels)
    seconds = time.perf_counter() - start
    leftovers = float_ops(module.ir)
    if leftovers and args.strict:
        raise ValueError(f"{len(leftovers)} float ops remain inside the graph (--strict): {', '.join(leftovers[:5])}")
    table = Table(title=f"{args.model}: integer-only, input {shape}, target {target}, kernels {module.kernels}")
    for column in ("layer", "op", "weight", "W", "A"):
        table.add_column(column)
    for row in module.summary():
        table.add_row(row["layer"], row["op"], "x".join(map(str, row["weight"])), str(row["w_bits"]), str(row["a_bits"]))
    console.print(table)
    if leftovers:
        console.print(f"[yellow]{len(leftovers)} float ops inside the graph:[/] {', '.join(leftovers)}")
    module.export(args.out, force=args.force)
    fused, kernels = module.fused
    console.print(f"requantization fused into {fused} of {kernels} distinct conv/dense kernels (one ending in the "
                  f"output dequantize has none); compiled in {seconds:.1f} s; "
                  f"wrote {args.out}/ (model.so, graph.int.npz, manifest.json)")
    return 0
