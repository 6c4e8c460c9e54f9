"""``hawqc verify``: the compiled module against the reference executor, every element."""

from __future__ import annotations

import argparse

from hawqc.commands._common import (
    add_int4_argument,
    add_model_arguments,
    add_threads_argument,
    integer_graph_from_args,
)

HELP = "compile a quantized model and compare it with the integer reference on every element"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--input", help="input batch (.npy); default: a float model's --data (up to 16 samples), "
                                        "else random normal inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    add_threads_argument(parser)
    add_int4_argument(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hawqc.runtime.module import compile_graph, first_divergence
    from hawqc.runtime.target import parse_target

    target = parse_target(args.target)
    x = np.load(args.input, allow_pickle=False).astype(np.float32) if args.input else None
    given_shape = x.shape if x is not None else args.input_shape
    graph, shape, data = integer_graph_from_args(args, given_shape)
    if x is None and data is not None and args.data != "random":  # the user's own inputs
        x = data.inputs[:shape[0] if args.input_shape else 16].numpy()
        shape = x.shape
    if x is None:
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    module = compile_graph(graph, shape, target, threads=args.threads, int4=args.int4)
    compiled, reference = module(x), module.reference(x)
    if np.array_equal(compiled, reference):
        print(f"bit-exact: compiled ({target['kind']}) == reference on all {compiled.size} output elements")
        return 0
    op, diff = first_divergence(graph, x, target, int4=args.int4)
    print(f"MISMATCH: {np.count_nonzero(compiled != reference)} of {compiled.size} output elements differ; "
          f"first diverging op: {op} (max |diff| {diff})")
    return 1
