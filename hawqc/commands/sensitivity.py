"""``hawqc sensitivity``: per-layer Hessian traces and Ω of a float model (cached)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "per-layer Hessian trace (Hutchinson) and HAWQ-V3 sensitivity Ω of a model, for hawqc search"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, weights and the data the Hessian is taken on (shared with ``hawqc search``)."""
    from hawqc.commands._common import add_data_arguments, add_float_model_arguments, input_shape

    add_float_model_arguments(parser)
    add_data_arguments(parser, "data for the Hessian (unlabelled data: the model's own softmax outputs are soft labels)")
    parser.add_argument("--batches", type=int, default=1, help="batches for the Hessian (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    parser.add_argument("--input-shape", type=input_shape,
                        help="input shape without batch, e.g. 3,224,224 (default: the data's, or the model's)")
    parser.add_argument("--max-iters", type=int, default=20,
                        help="Hutchinson iterations at most (default: 20; more for tighter traces: each costs about "
                             "17 forward passes per sample)")
    parser.add_argument("--tol", type=float, default=1e-2, help="stop when every trace's standard error is below this fraction of it (default: 0.01)")
    parser.add_argument("--micro-batch", type=int,
                        help="samples per Hessian-vector product; bounds memory whatever --batch-size (default: "
                             "about 0.5M input elements, e.g. 3 images of 3x224x224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Rademacher vectors (default: 0)")
    parser.add_argument("--cache-dir", help="sensitivity cache (default: $HAWQC_CACHE or ~/.cache/hawqc)")
    parser.add_argument("--measured", action="store_true",
                        help="Ω measured instead: the KL divergence from the float outputs that each layer's 4-bit "
                             "weights (or input) alone add to W8A8 on the data (ZeroQ); no Hessian")


def model_and_data(args: argparse.Namespace) -> tuple[Any, list[Any], tuple[int, ...]]:
    """The model (BatchNorm recalibrated when it has random weights), Hessian batches and input shape."""
    import torch
    from torch.utils.data import DataLoader

    from hawqc import models
    from hawqc.commands._common import load_data_for, load_float_model

    if args.batches < 1 or args.batch_size < 1:
        raise ValueError("--batches and --batch-size must be at least 1")
    torch.manual_seed(args.seed)  # random weights (no checkpoint) are the same model on every run
    loaded = load_float_model(args, args.input_shape)
    dataset = load_data_for(args, loaded, "train", size=args.batch_size * args.batches)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [b if dataset.labelled else b[0] for b, _ in zip(loader, range(args.batches))]
    if loaded.random_weights:
        print(f"note: {loaded.name} has random weights (no --checkpoint): its Hessian traces say little about a "
              "trained model; BatchNorm statistics recalibrated on the data")
        models.recalibrate_bn(loaded.module, [b[0] if isinstance(b, list) else b for b in batches])
    return loaded.module, batches, loaded.input_shape


def compute(args: argparse.Namespace) -> tuple[Any, Any, tuple[int, ...]]:
    from hawqc import distributed
    from hawqc.ilp.sensitivity import sensitivity

    model, batches, shape = model_and_data(args)
    if args.measured:
        from hawqc.ilp.measured import measured_sensitivity

        return model, measured_sensitivity(model, [b[0] if isinstance(b, (list, tuple)) else b for b in batches]), shape
    progress = ProgressLine(args.tol) if distributed.setup().main else None  # under torchrun, rank 0's
    try:
        result = sensitivity(model, batches, tol=args.tol, max_iters=args.max_iters, seed=args.seed,
                             cache_dir=args.cache_dir, micro_batch=args.micro_batch, progress=progress)
    finally:
        if progress is not None:
            progress.finish()
    return model, result, shape


class ProgressLine:
    """Hutchinson progress on stderr: rewritten in place on a terminal; elsewhere (logs) a line every
    ``interval`` seconds once a run has taken that long."""

    def __init__(self, tol: float, interval: float = 10.0) -> None:
        import sys
        import time

        self.tol, self.interval, self.stream = tol, interval, sys.stderr
        self.start = self.last = time.monotonic()
        self.open = False

    def __call__(self, iteration: int, total: int, mean: Any, stderr: Any) -> None:
        import time

        now = time.monotonic()
        tty = self.stream.isatty()
        if not tty and now - self.last < self.interval and iteration < total:
            return
        self.last = now
        half = len(mean) // 2
        worst = float((stderr / mean.abs().clamp_min(1e-30)).max())
        eta = (now - self.start) / iteration * (total - iteration)
        line = (f"Hessian traces: iteration {iteration}/{total}, Σ Tr(H) weights {float(mean[:half].sum()):.4g} "
                f"activations {float(mean[half:].sum()):.4g}, worst relative error {worst:.1%} (stops at "
                f"{self.tol:.1%}), {now - self.start:.0f} s, at most {eta:.0f} s left")
        self.stream.write(f"\r{line}\x1b[K" if tty else line + "\n")
        self.stream.flush()
        self.open = tty

    def finish(self) -> None:
        """End a line left open on a terminal."""
        if self.open:
            self.stream.write("\n")
            self.open = False


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
    table = Table(title=f"{args.model}: measured Ω (KL added to W8A8)" if args.measured else
                  f"{args.model}: Hessian trace and Ω ({result.iterations} Hutchinson iterations)")
    bits = result.settings["bits"]
    for column in ("layer", "params", "Tr(H)", *(f"Ω(W{b})" for b in bits), *(f"Ω(A{b})" for b in bits)):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name in result.omega:
        trace = result.traces.get(name)
        table.add_row(name, f"{result.params[name]:,}", "-" if trace is None else f"{trace:.4g}", *(f"{result.omega[name][b]:.3g}" for b in bits),
                      *(f"{result.activation_omega[name][b]:.3g}" for b in bits))
    console.print(table)
    result.save(args.out)
    console.print(f"wrote {args.out}")
    return 0
