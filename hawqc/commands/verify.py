"""``hawqc verify``: the compiled module against the reference executor, every element."""

from __future__ import annotations

import argparse

from hawqc.commands._common import (
    Problems,
    add_calibration_argument,
    add_int4_argument,
    add_model_arguments,
    kernels_of,
    load_input,
    model_source,
    target_of,
)

HELP = "compile a quantized model and compare it with the integer reference on every element"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_calibration_argument(parser)
    parser.add_argument("--input", help="input batch (.npy); default: a float model's --data (up to 16 samples), "
                                        "else random normal inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    add_int4_argument(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hawqc import api
    from hawqc.runtime.module import compile_graph, first_divergence
    from hawqc.topi_int4.cuda.pipeline import check_int4

    problems = Problems()  # every input mistake in one message, before any work
    target = problems.check(target_of, args)
    if target is not None:
        problems.check(check_int4, args.int4, target)
    x = problems.check(load_input, args.input) if args.input else None
    given_shape = x.shape if x is not None else args.input_shape
    source = problems.check(model_source, args, given_shape)
    if source is not None and source.graph is not None and (x is not None or not args.input):  # a quantized model's shape, checked now
        problems.check(api.input_shape_of, source.graph, given_shape)
    problems.raise_any()
    graph = source.integer_graph()
    if x is None and source.data is not None and args.data != "random":  # a float model's own inputs
        x = source.data.inputs[:given_shape[0] if given_shape else 16].numpy()
        given_shape = x.shape
    shape = api.input_shape_of(graph, given_shape)
    if x is None:
        x = np.random.default_rng(args.seed).standard_normal(api.example_shape(shape)).astype(np.float32)
    kernels = kernels_of(args)
    module = compile_graph(graph, shape, target, kernels=kernels, threads=args.threads, int4=args.int4)
    compiled, reference = module(x), module.reference(x)
    if np.array_equal(compiled, reference):
        print(f"bit-exact: compiled ({target['kind']}, {module.kernels} kernels) == reference on all {compiled.size} "
              "output elements")
        return 0
    op, diff = first_divergence(graph, x, target, kernels=kernels, int4=args.int4)
    print(f"MISMATCH: {np.count_nonzero(compiled != reference)} of {compiled.size} output elements differ; "
          f"first diverging op: {op} (max |diff| {diff})")
    return 1

