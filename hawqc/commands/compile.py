"""``hawqc compile``: an ONNX QDQ model (or integer graph) to an integer-only TVM artifact."""

from __future__ import annotations

import argparse

from hawqc.commands._common import add_int4_argument, add_model_arguments, integer_graph_from_args
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
    parser.add_argument("-arch", "--arch", help="CUDA architecture for --target cuda: sm_75 (default), sm_80, sm_86, "
                        "sm_89 or sm_90")
    add_int4_argument(parser)
    parser.add_argument("--emit-source", action="store_true", help="also write the generated CUDA source (model.cu)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from hawqc.fileio import write_atomic
    from hawqc.relax_passes.float_ops import float_ops
    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target
    from hawqc.topi_int4.cuda.pipeline import check_arch, check_int4

    if Path(args.out).exists() and not args.force:
        raise ValueError(f"{args.out} exists: choose another output folder or pass --force")
    console = Console()
    spec = args.target
    if spec.split()[:1] == ["cuda"] and "-arch" not in spec:  # TVM warns about a cuda target without an arch
        spec = f"{spec} -arch={args.arch or 'sm_75'}"
    target = parse_target(spec)
    if target.get("kind") == "cuda":
        check_arch(target)
    if args.arch and target.get("arch") != args.arch:
        raise ValueError(f"-arch={args.arch} needs --target cuda (or agrees with the target's arch)")
    check_int4(args.int4, target)
    if args.emit_source and target.get("kind") != "cuda":
        raise ValueError("--emit-source writes CUDA source: it needs --target cuda")
    graph, shape, _ = integer_graph_from_args(args, args.input_shape)
    start = time.perf_counter()
    module = compile_graph(graph, shape, target, kernels=args.kernels, int4=args.int4)
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
    if target.get("kind") == "cuda":
        source = module.source()
        console.print(tensor_core_summary(source, target["arch"], args.int4))
        if args.emit_source:
            write_atomic(Path(args.out) / "model.cu", source)
    fused, kernels = module.fused
    source_file = ", model.cu" if args.emit_source else ""
    console.print(f"requantization fused into {fused} of {kernels} distinct conv/dense kernels (one ending in the "
                  f"output dequantize has none); compiled in {seconds:.1f} s; "
                  f"wrote {args.out}/ (model.so, graph.int.npz, manifest.json{source_file})")
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
