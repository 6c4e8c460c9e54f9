"""``hawqc demo``: the default job, end to end, on a built-in model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a small ResNet on digits, quantize it (HAWQ-V3), check it bit-exact and export it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny_resnet",
                        help="built-in model (default: tiny_resnet, trained here on digits; others use random weights)")
    parser.add_argument("--bit-config", default="uniform4",
                        help="preset (uniform4, uniform8) or bit-config JSON path (default: uniform4)")
    parser.add_argument("--cases", type=int, default=20_000, help="random cases for the arithmetic check")
    parser.add_argument("-o", "--out", default="hawqc-demo", help="output folder (default: hawqc-demo)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hawqc import BitConfig, api, models
    from hawqc.commands.quantize import quantize_and_export
    from hawqc.quant.dyadic import dyadic, self_check

    console = Console()
    spec = models.spec(args.model)
    BitConfig.from_any(args.bit_config)  # fail early on a bad config
    mismatches = self_check(args.cases)
    b, c = dyadic(0.1)
    console.print(f"dyadic requantization: 0.1 ~ {b} / 2^{c}; {args.cases} random cases, numpy and torch "
                  f"against exact rationals: {'OK' if mismatches == 0 else f'{mismatches} MISMATCHES'}")
    trained = args.model == "tiny_resnet"
    data = "digits" if trained else "random"
    train = api.dataset(data, "train", spec.input_shape, size=64)
    test = api.dataset(data, "test", spec.input_shape, size=16)
    model = models.get(args.model, num_classes=10) if trained else models.get(args.model)
    if trained:
        _train_float(model, train)
    else:
        console.print(f"{args.model}: random weights, BatchNorm statistics recalibrated on random inputs")
    report = quantize_and_export(model, args.model, args.bit_config, train, test, Path(args.out),
                                 batch_size=64 if trained else 4, calib_batches=4 if trained else 2,
                                 observer="minmax", qat_steps=0, lr=0.0, recalibrate_bn=not trained,
                                 labelled=trained, console=console)
    compiled_ok = _compile_and_verify(report["graph"], report["sample"], Path(args.out) / "compiled", console)
    return 0 if mismatches == 0 and report["bit_exact"] and compiled_ok else 1


def _compile_and_verify(graph: object, x: object, out: Path, console: object) -> bool:
    """Compile the integer graph for the host CPU, compare it with the reference, save the artifact."""
    import time

    import numpy as np

    from hawqc.relax_passes.float_ops import float_ops
    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target

    target = parse_target("llvm")
    start = time.perf_counter()
    module = compile_graph(graph, x.shape, target)
    seconds = time.perf_counter() - start
    exact = bool(np.array_equal(module(x), module.reference(x)))
    module.export(out, force=True)
    console.print(f"compiled for {target} in {seconds:.1f} s ({len(float_ops(module.ir))} float ops inside the "
                  f"graph); compiled vs reference on {len(x)} inputs: {'bit-exact' if exact else 'MISMATCH'}; "
                  f"wrote {out}/")
    return exact


def _train_float(model: object, train: object, epochs: int = 6) -> None:
    """A few epochs of SGD: enough for about 98% on digits."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
