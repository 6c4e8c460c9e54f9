"""``hawqc sensitivity``: per-layer Hessian traces and Ω of a built-in model (cached)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "per-layer Hessian trace (Hutchinson) and HAWQ-V3 sensitivity Ω of a model, for hawqc search"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, weights and the data the Hessian is taken on (shared with ``hawqc search``)."""
    from hawqc import models
    from hawqc.api import DATASETS
    from hawqc.commands._common import input_shape

    parser.add_argument("model", help=f"built-in model: {', '.join(models.MODELS)}")
    parser.add_argument("--checkpoint", help="float weights (a state_dict); default: random")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's own)")
    parser.add_argument("--data", default="random", choices=DATASETS, help="data for the Hessian (default: random)")
    parser.add_argument("--batches", type=int, default=1, help="batches for the Hessian (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--input-shape", type=input_shape,
                        help="input shape without batch, e.g. 3,224,224 (default: the data's, or the model's)")
    parser.add_argument("--max-iters", type=int, default=100, help="Hutchinson iterations at most (default: 100)")
    parser.add_argument("--tol", type=float, default=1e-2, help="stop when every trace's standard error is below this fraction of it (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Rademacher vectors (default: 0)")
    parser.add_argument("--cache-dir", help="sensitivity cache (default: $HAWQC_CACHE or ~/.cache/hawqc)")


def model_and_data(args: argparse.Namespace) -> tuple[Any, list[Any], tuple[int, ...]]:
    """The model (BatchNorm recalibrated when it has random weights), Hessian batches and input shape."""
    import torch
    from torch.utils.data import DataLoader

    from hawqc import api, models

    if args.batches < 1 or args.batch_size < 1:
        raise ValueError("--batches and --batch-size must be at least 1")
    spec = models.spec(args.model)
    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    torch.manual_seed(args.seed)  # random weights (no checkpoint) are the same model on every run
    model = api.load_model(args.model, args.checkpoint, **kwargs)
    shape = tuple(args.input_shape or spec.input_shape)
    dataset = api.dataset(args.data, "train", shape, size=args.batch_size * args.batches)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [b for b, _ in zip(loader, range(args.batches))]
    if args.data == "random":  # no labels: the model's own predictions stand in
        batches = [x for x, _ in batches]
    if args.checkpoint is None:
        models.recalibrate_bn(model, [b[0] if isinstance(b, list) else b for b in batches])
    first = batches[0][0] if isinstance(batches[0], list) else batches[0]
    return model, batches, tuple(first.shape[1:])


def compute(args: argparse.Namespace) -> tuple[Any, Any, tuple[int, ...]]:
    from hawqc.ilp.sensitivity import sensitivity

    model, batches, shape = model_and_data(args)
    result = sensitivity(model, batches, tol=args.tol, max_iters=args.max_iters, seed=args.seed,
                         cache_dir=args.cache_dir)
    return model, result, shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--out", default="sensitivity.json", help="output JSON (default: sensitivity.json)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hawqc import distributed

    console = Console()
    _, result, _ = compute(args)
    if not distributed.setup().main:  # under torchrun, rank 0 reports and writes
        return 0
    table = Table(title=f"{args.model}: Hessian trace and Ω ({result.iterations} Hutchinson iterations)")
    bits = result.settings["bits"]
    for column in ("layer", "params", "Tr(H)", *(f"Ω(W{b})" for b in bits), *(f"Ω(A{b})" for b in bits)):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, trace in result.traces.items():
        table.add_row(name, f"{result.params[name]:,}", f"{trace:.4g}", *(f"{result.omega[name][b]:.3g}" for b in bits),
                      *(f"{result.activation_omega[name][b]:.3g}" for b in bits))
    console.print(table)
    result.save(args.out)
    console.print(f"wrote {args.out}")
    return 0
