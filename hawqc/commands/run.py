"""``hawqc run``: run a compiled artifact on a saved input."""

from __future__ import annotations

import argparse

from hawqc.commands._common import add_threads_argument

HELP = "run a compiled artifact folder on an input .npy and save the output"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="folder written by hawqc compile")
    parser.add_argument("--input", required=True, help="input batch (.npy, float32)")
    parser.add_argument("-o", "--out", help="where to save the output (.npy); default: print a summary only")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hawqc import api
    from hawqc.fileio import atomic_output

    module = api.load(args.artifact, threads=args.threads)
    try:
        x = np.load(args.input, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{args.input}: not a .npy array ({err})") from None
    y = module(x)
    if args.out:
        with atomic_output(args.out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, y)
    top1 = y.reshape(len(y), -1).argmax(axis=1)
    print(f"output {y.shape} {y.dtype}; top-1 per input: {top1.tolist()}" + (f"; saved {args.out}" if args.out else ""))
    return 0
