"""``hawqc quantize``: PTQ (and optional QAT) of a float model; writes QDQ ONNX + integer graph."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "quantize a float model (HAWQ-V3 PTQ, optional QAT) and write its QDQ ONNX and integer graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hawqc.commands._common import add_data_arguments, add_float_model_arguments, input_shape

    add_float_model_arguments(parser)
    parser.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                        help="input shape without batch (default: the model's, or the data's)")
    parser.add_argument("--bit-config", default="uniform4", help="preset or bit-config JSON (default: uniform4)")
    add_data_arguments(parser, "calibration data (also the evaluation data, where labelled: digits and "
                               "fashion-mnist use their test split)")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches (default: 4)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="batch size, the global one under torchrun (default: 16)")
    parser.add_argument("--observer", default="minmax", choices=("minmax", "ema", "percentile"))
    parser.add_argument("--ptq", default="nearest", choices=("nearest", "learned"),
                        help="weight rounding: nearest, or learned on the calibration data (AdaRound per layer, "
                             "MSE activation ranges, bias correction; minutes on a CPU) (default: nearest)")
    parser.add_argument("--ptq-iters", type=int, default=500,
                        help="learned PTQ: fit steps per layer, or per block with --ptq-blocks (default: 500)")
    parser.add_argument("--ptq-blocks", action="store_true",
                        help="learned PTQ: fit the rounding of each residual/inverted-residual block jointly (BRECQ)")
    parser.add_argument("--ptq-rounding", default="adaround", choices=("adaround", "gptq"),
                        help="learned PTQ, per layer: AdaRound's gradient fit, or GPTQ's closed-form error "
                             "compensation (seconds per layer; without bias correction) (default: adaround)")
    parser.add_argument("--ptq-bias-statistics", choices=("data", "batchnorm"),
                        help="learned PTQ's bias correction: mean output shifts measured on the calibration data, or "
                             "derived from the BatchNorm statistics without data (DFQ) (default: batchnorm with "
                             "--data distilled, whose own means mislead it, else data)")
    parser.add_argument("--qat-steps", type=int, default=0, help="QAT steps after PTQ (needs labelled data)")
    parser.add_argument("--qat-checkpoint", type=Path,
                        help="QAT checkpoint: continued if it exists, written every 100 steps (by rank 0 under torchrun)")
    parser.add_argument("--lr", type=float, default=0.005, help="QAT learning rate (default: 0.005)")
    parser.add_argument("-o", "--out", default="hawqc-out", help="output folder (default: hawqc-out)")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from hawqc import distributed
    from hawqc.commands._common import load_data_for, load_float_model
    from hawqc.quant.adaround import LearnedOptions

    if args.calib_batches < 1 or args.batch_size < 1:
        raise ValueError("--calib-batches and --batch-size must be at least 1")
    if args.ptq_iters < 1:
        raise ValueError("--ptq-iters must be at least 1")
    console = Console(quiet=not distributed.setup().main)  # under torchrun, rank 0 reports
    torch.manual_seed(0)  # random weights (no checkpoint) are the same model on every rank and every run
    loaded = load_float_model(args, args.input_shape)
    train = load_data_for(args, loaded, "train", size=args.batch_size * args.calib_batches)
    test = train if args.data == "distilled" else load_data_for(args, loaded, "test", size=args.batch_size)
    if loaded.random_weights:
        console.print("no --checkpoint: random weights, BatchNorm statistics recalibrated on the calibration data")
    report = quantize_and_export(loaded.module, loaded.name, args.bit_config, train, test, Path(args.out),
                                 args.batch_size, args.calib_batches, args.observer, args.qat_steps, args.lr,
                                 recalibrate_bn=loaded.random_weights, labelled=train.labelled, console=console,
                                 ptq=args.ptq, learned=LearnedOptions.for_rounding(args.ptq_rounding, iters=args.ptq_iters,
                                                                     blocks=args.ptq_blocks,
                                                                     bias_statistics=bias_statistics(args)),
                                 qat_checkpoint=args.qat_checkpoint)
    return 0 if report is None or report["bit_exact"] else 1


def bias_statistics(args: argparse.Namespace) -> str:
    """``--ptq-bias-statistics``, or its default: derived from BatchNorm for distilled data (W4A8 EfficientNet-Lite0,
    ``benchmarks/results/fidelity.md``: 78.0% -> 85.5% agreement at 100 steps), else measured on the data."""
    return args.ptq_bias_statistics or ("batchnorm" if args.data == "distilled" else "data")


def quantize_and_export(model: Any, name: str, bit_config: str, train: Any, test: Any, out: Path, batch_size: int,
                        calib_batches: int, observer: str, qat_steps: int, lr: float, *, recalibrate_bn: bool,
                        labelled: bool, console: Any, ptq: str = "nearest", learned: Any = None,
                        qat_checkpoint: Path | None = None) -> dict[str, Any] | None:
    """Quantize, optionally fine-tune, check reference == simulation, write the artifacts; print a report.
    Under ``torchrun`` every rank quantizes and trains (data-parallel), then rank 0 checks and writes
    the artifacts and the others return None."""
    import numpy as np
    import onnxruntime
    import torch
    from torch.utils.data import DataLoader

    from hawqc import BitConfig, distributed, models, quantize
    from hawqc.fileio import staged_outputs
    from hawqc.quant.export import to_onnx
    from hawqc.quant.qat import accuracy
    from hawqc.quant.qat import train as qat_train
    from hawqc.reference import from_torch

    if qat_steps and not labelled:
        raise ValueError("QAT needs labelled data: --data digits, fashion-mnist, a folder of class sub-folders "
                         "or a .npy with --labels")
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    calib = [x for x, _ in zip((b[0] for b in loader), range(calib_batches))]
    if recalibrate_bn:
        models.recalibrate_bn(model, calib)
    qmodel = quantize(model, bit_config, calib, observer=observer, ptq=ptq, learned=learned, log=console.print)
    if qat_steps:
        qat_train(qmodel, loader, steps=qat_steps, lr=lr, freeze_bn_step=qat_steps // 2, checkpoint=qat_checkpoint)
    if not distributed.setup().main:
        return None
    console.print(bits_table(model, qmodel.bits, f"{name}: per-layer bits ({bit_config})"))

    test_loader = DataLoader(test, batch_size=max(batch_size, 256))
    x = next(iter(test_loader))[0][:batch_size]
    graph = from_torch(qmodel)
    with torch.no_grad():
        bit_exact = bool(np.array_equal(graph.run(x.numpy()), qmodel(x).numpy()))
    report: dict[str, Any] = {"bit_exact": bit_exact, "graph": graph, "sample": x.numpy()}
    if labelled:
        report["float_accuracy"] = accuracy(model, test_loader)
        report["quantized_accuracy"] = accuracy(qmodel, test_loader)
        console.print(f"top-1 on the test split: float {report['float_accuracy']:.2%}, "
                      f"integer {report['quantized_accuracy']:.2%}")
    with staged_outputs(out) as stage:  # the three files appear together or not at all
        to_onnx(qmodel, stage / f"{name}.onnx", x)
        graph.save(stage / f"{name}.int.npz")
        BitConfig(layers=qmodel.bits).save(stage / "bit_config.json")
    stem = out / name
    options = onnxruntime.SessionOptions()
    four_bit = any(q.bits == 4 for q in qmodel.acts.values()) or any(b.w_bits == 4 for b in qmodel.bits.values())
    if four_bit:  # ONNX Runtime's QDQ fusions mis-type int4 activations (e.g. MaxPool on uint4)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(stem.with_suffix(".onnx")), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ort_top1 = session.run(None, {"input": x.numpy()})[0].argmax(axis=1)
        report["onnxruntime_top1_agreement"] = float((ort_top1 == qmodel(x).argmax(dim=1).numpy()).mean())
    console.print(f"integer reference vs PyTorch integer simulation on {len(x)} inputs: "
                  f"{'bit-exact' if bit_exact else 'MISMATCH'}; ONNX Runtime on the exported QDQ model "
                  f"agrees on top-1 for {report['onnxruntime_top1_agreement']:.0%}")
    console.print(f"wrote {stem}.onnx (QDQ), {stem}.int.npz (integer graph), {out / 'bit_config.json'}")
    return report


def bits_table(model: Any, bits: dict[str, Any], title: str) -> Any:
    """A rich table: layer, operation, parameters, weight and activation bits, with a size summary."""
    from rich.table import Table
    from torch import nn

    modules = dict(model.named_modules())
    table = Table(title=title)
    for column in ("layer", "op", "params", "W", "A"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    fp32_bytes = quant_bytes = 0.0
    for name, layer_bits in bits.items():
        module = modules[name]
        params = module.weight.numel()
        fp32_bytes += 4 * params
        quant_bytes += params * layer_bits.w_bits / 8
        if isinstance(module, nn.Conv2d):
            k, s = module.kernel_size, module.stride
            op = f"conv {k[0]}x{k[1]}/{s[0]} {module.in_channels}->{module.out_channels}"
            op += f" g{module.groups}" if module.groups > 1 else ""
        else:
            op = f"dense {module.in_features}->{module.out_features}"
        table.add_row(name, op, f"{params:,}", str(layer_bits.w_bits), str(layer_bits.a_bits))
    table.caption = (f"weights {fp32_bytes / 2**20:.2f} MiB fp32 -> {quant_bytes / 2**20:.2f} MiB "
                     f"({fp32_bytes / max(quant_bytes, 1):.1f}x smaller)")
    return table
