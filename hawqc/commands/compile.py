"""``hawqc compile``: an ONNX QDQ model (or integer graph) to an integer-only TVM artifact."""

from __future__ import annotations

import argparse

from hawqc.commands._common import (
    Problems,
    add_calibration_argument,
    add_int4_argument,
    add_model_arguments,
    free_output,
    kernels_of,
    model_source,
    target_of,
)

HELP = "compile a quantized model (or a float one, quantized first) to an integer-only TVM module (artifact folder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_calibration_argument(parser)
    parser.add_argument("-o", "--out", default="hawqc-compiled", help="artifact folder (default: hawqc-compiled)")
    parser.add_argument("--force", action="store_true", help="replace the artifact folder if it exists")
    parser.add_argument("--strict", action="store_true", help="fail if any float op is left inside the graph")
    add_int4_argument(parser)
    parser.add_argument("--emit-source", action="store_true", help="also write the generated CUDA source (model.cu)")


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from hawqc import api
    from hawqc.frontend.float_islands import Calibrated
    from hawqc.relax_passes.float_ops import float_ops
    from hawqc.runtime.module import compile_graph, shape_text
    from hawqc.topi_int4.cuda.pipeline import check_int4

    problems = Problems()  # every input mistake in one message, before any work
    problems.check(free_output, args.out, args.force)
    target = problems.check(target_of, args)
    if target is not None:
        problems.check(check_int4, args.int4, target)
        if args.emit_source and target.get("kind") != "cuda":
            problems.add("--emit-source writes CUDA source: it needs --target cuda")
    source = problems.check(model_source, args, args.input_shape)
    if source is not None and source.graph is not None:  # a quantized model's shape, checked now
        problems.check(api.input_shape_of, source.graph, args.input_shape)
    problems.raise_any()
    graph = source.integer_graph()
    shape = api.input_shape_of(graph, args.input_shape)
    console = Console()
    start = time.perf_counter()
    module = compile_graph(graph, shape, target, kernels=kernels_of(args), threads=args.threads, int4=args.int4)
    seconds = time.perf_counter() - start
    leftovers = module.graph.metadata.get("float_ops") or float_ops(module.ir)  # ONNX nodes left in float
    if leftovers and args.strict:
        raise ValueError(f"{len(leftovers)} float ops remain inside the graph (--strict): {', '.join(leftovers[:5])}")
    table = Table(title=f"{args.model}: integer-only, input {shape_text(module.input_shape)}, target {target}, "
                        f"kernels {module.kernels}")
    for column in ("layer", "op", "weight", "W", "A"):
        table.add_column(column)
    for row in module.summary():
        table.add_row(row["layer"], row["op"], "x".join(map(str, row["weight"])), str(row["w_bits"]), str(row["a_bits"]))
    console.print(table)
    if module.note:
        console.print(f"[yellow]note:[/] {module.note}")
    calibrated = module.graph.metadata.get("calibrated")
    if calibrated:
        console.print(Calibrated(**calibrated).summary())
    elif getattr(args, "calib_data", None):
        console.print("note: the model has no float regions; --calib-data was not needed")
    if leftovers:
        console.print(f"[yellow]{len(leftovers)} float ops inside the graph:[/] {', '.join(leftovers)}")
    source = module.source() if target.get("kind") == "cuda" else None
    out = module.export(args.out, force=args.force, extra={"model.cu": source} if args.emit_source else None)
    if source is not None:
        console.print(tensor_core_summary(source, target["arch"], args.int4))
    fused, kernels = module.fused
    console.print(f"requantization fused into {fused} of {kernels} distinct conv/dense kernels (one ending in the "
                  f"output dequantize has none); compiled in {seconds:.1f} s; "
                  f"wrote {args.out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def tensor_core_summary(source: str, arch: str, mode: str = "auto") -> str:
    """One line: how many conv kernels of the CUDA ``source`` use INT4 and INT8 Tensor Core ``mma``
    (``mode``: the ``--int4`` choice)."""
    from hawqc.topi_int4.cuda.pipeline import int4_tensor_cores

    kernels = source.split("__global__")[1:]
    int4, int8 = (sum(shape in k for k in kernels) for shape in ("m8n8k32", "m8n8k16"))
    line = f"Tensor Core conv kernels for {arch}: {int4} INT4 (mma m8n8k32), {int8} INT8 (mma m8n8k16)"
    if not int4_tensor_cores(arch, mode):
        line += f"; {arch} has no INT4 mma, so INT4 layers run as int8 (INT8 Tensor Core kernels)"
    elif not int4_tensor_cores(arch):
        line += f"; {arch} has no INT4 mma: ptxas emulates it (--int4 emulated: for checking, not speed)"
    return line
