"""``hawqc demo``: the built-in default job on a built-in model."""

from __future__ import annotations

import argparse

HELP = "check the dyadic arithmetic and show a built-in model's per-layer bit plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18", help="built-in model (default: resnet18)")
    parser.add_argument("--bit-config", default="uniform4",
                        help="preset (uniform4, uniform8) or bit-config JSON path (default: uniform4)")
    parser.add_argument("--cases", type=int, default=20_000, help="random cases for the arithmetic check")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hawqc import models
    from hawqc.bitconfig import BitConfig
    from hawqc.quant.dyadic import dyadic, self_check

    console = Console()
    spec = models.spec(args.model)
    config = BitConfig.from_any(args.bit_config)

    mismatches = self_check(args.cases)
    b, c = dyadic(0.1)
    console.print(f"dyadic requantization: 0.1 ~ {b} / 2^{c}; {args.cases} random cases, numpy and torch "
                  f"against exact rationals: {'OK' if mismatches == 0 else f'{mismatches} MISMATCHES'}")

    import torch

    model = spec.build()
    modules = dict(model.named_modules())
    bits = config.resolve(model)
    table = Table(title=f"{spec.name}: {spec.description}, input {spec.input_shape}, bits {args.bit_config}")
    for column in ("layer", "op", "params", "W bits", "A bits"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    fp32_bytes = quant_bytes = 0
    for name, layer_bits in bits.items():
        module = modules[name]
        params = module.weight.numel()
        fp32_bytes += 4 * params
        quant_bytes += params * layer_bits.w_bits / 8
        if isinstance(module, torch.nn.Conv2d):
            op = f"conv {module.kernel_size[0]}x{module.kernel_size[1]}/{module.stride[0]} {module.in_channels}->{module.out_channels}"
        else:
            op = f"dense {module.in_features}->{module.out_features}"
        table.add_row(name, op, f"{params:,}", str(layer_bits.w_bits), str(layer_bits.a_bits))
    console.print(table)
    console.print(f"weights: {fp32_bytes / 2**20:.2f} MiB fp32 -> {quant_bytes / 2**20:.2f} MiB quantized "
                  f"({fp32_bytes / quant_bytes:.1f}x smaller); built-in models: {', '.join(models.MODELS)}")
    return 0 if mismatches == 0 else 1
