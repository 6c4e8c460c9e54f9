"""``hawqc run``: run a compiled artifact (or a model, compiled first) on a saved input."""

from __future__ import annotations

import argparse
from typing import Any

from hawqc.commands._common import (
    Problems,
    add_target_arguments,
    is_artifact,
    kernels_of,
    load_input,
    target_of,
)

HELP = "run a compiled artifact folder (or a model, compiled first) on an input .npy; prints output and latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT",
                        help="folder written by hawqc compile, or a quantized model (.onnx, .int.npz) to compile first")
    parser.add_argument("--input", required=True, help="input batch (.npy, float32)")
    parser.add_argument("-o", "--out", help="where to save the output (.npy); default: print a summary only")
    parser.add_argument("--runs", type=int, default=10,
                        help="timed calls after the first, for the latency (default 10; 0: time the first only)")
    add_target_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from hawqc.fileio import atomic_output

    problems = Problems()  # every input mistake in one message, before any work
    x = problems.check(load_input, args.input)
    if args.runs < 0:
        problems.add(f"--runs must be at least 0, got {args.runs}")
    # compiling a model file needs the input's shape: without one, check the rest only
    module = problems.check(runnable, args, x.shape) if x is not None else problems.check(is_artifact, args)
    problems.raise_any()
    start = time.perf_counter()
    y = module(x)
    first_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        module(x)
        times.append((time.perf_counter() - start) * 1e3)
    if args.out:
        with atomic_output(args.out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, y)
    top1 = y.reshape(len(y), -1).argmax(axis=1)
    print(f"output {y.shape} {y.dtype}; top-1 per input: {top1.tolist()}" + (f"; saved {args.out}" if args.out else ""))
    timed = f"median of {len(times)} calls {np.median(times):.3f} ms, " if times else ""
    print(f"latency at batch {x.shape[0]}: {timed}first call {first_ms:.3f} ms")
    return 0


def runnable(args: argparse.Namespace, shape: tuple[int, ...] | None) -> Any:
    """The module ``hawqc run`` calls: the artifact folder loaded, or the model file compiled for
    the input's ``shape`` with the command's target options."""
    from hawqc import api
    from hawqc.runtime.module import compile_graph

    if is_artifact(args):
        return api.load(args.artifact, threads=args.threads)
    target = target_of(args)
    graph = api.integer_graph_of(args.artifact, input_shape=shape)
    return compile_graph(graph, api.input_shape_of(graph, shape), target, kernels=kernels_of(args),
                         threads=args.threads)
