"""Fidelity of quantized models to their float originals, without labels; and Fashion-MNIST accuracy.

    python benchmarks/fidelity.py [--quick] [--only efficientnet|fashion-mnist] [--ptq nearest learned]
                                  [--ptq-iters 300] [--distill-steps 150] [--out benchmarks/results]

1. EfficientNet-Lite0 with its ImageNet weights, calibrated on **distilled data only** (ZeroQ inputs
   synthesised from the model's BatchNorm statistics: no real image is seen before evaluation); rows
   W8A8, W4A8, the ILP at a BOPS budget of 0.5 (options W4A4 / W4A8 / W8A8, Hessian on the same
   distilled data, or with ``--sensitivity measured`` the KL each layer adds on it) and W4A4, each with
   nearest and/or learned PTQ. Per row: top-1 agreement with FP32 and mean KL(FP32 ‖ quantized) of the
   softmax outputs over 400 inputs (each of foolbox's 20 ImageNet
   images resized to 256 and 288, cropped to 224 at the centre and the four corners, and mirrored),
   computed by the compiled integer-only module (llvm); and whether it is bit-exact with the numpy
   reference on the first 4 of those inputs.
2. Fashion-MNIST: the ResNet of ``benchmarks/reproduce.py`` (trained here, cached): W4A4 and W4A8 with
   nearest and learned PTQ calibrated on 512 training images (no QAT), then W4A4 with ``--qat-steps`` QAT
   steps after the last PTQ method (batches of 128 training images, distilled from the FP32 model);
   accuracy on the full 10,000-image test set (compiled integer-only module), bit-exactness against the
   reference on 500 of them.

Writes ``fidelity.{md,json}`` (``fidelity_quick`` with ``--quick``, ``_<only>`` with ``--only``) under
``--out``, rewritten after every row. The learned rows are sized for a shared CPU (``--ptq-iters``, ``--distill-steps``): scale them up
for better figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import hawqc
from hawqc import BitConfig, LayerBits, data, quantize
from hawqc.fileio import atomic_output, write_atomic
from hawqc.ilp.measured import measured_sensitivity
from hawqc.ilp.sensitivity import sensitivity
from hawqc.models.resnet import BasicBlock, ResNet
from hawqc.quant.adaround import LearnedOptions
from hawqc.quant.distill import distill
from hawqc.quant.qat import train as qat_train
from hawqc.quant.qat import train_float

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import foolbox_files, pretrained_efficientnet_lite0  # noqa: E402  (beside this file)

SCALES = (256, 288)
CROP = 224


def imagenet_variants() -> torch.Tensor | str:
    """foolbox's 20 ImageNet images, each resized to every size in ``SCALES``, cropped to 224 at the
    centre and four corners, and mirrored: 20 x 2 x 5 x 2 = 400 inputs at EfficientNet-Lite's scaling."""
    from PIL import Image

    files = foolbox_files()
    if isinstance(files, str):
        return files
    out = []
    for f in files:
        image = Image.open(f).convert("RGB")
        for size in SCALES:
            a = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
            m, c = size - CROP, (size - CROP) // 2
            for top, left in ((c, c), (0, 0), (0, m), (m, 0), (m, m)):
                crop = a[top:top + CROP, left:left + CROP]
                out += [crop, crop[:, ::-1]]
    x = (np.stack(out) - 127.0) / 128.0  # EfficientNet-Lite's input scaling
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def outputs(model: Any, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference ‖ quantized) of the softmax outputs."""
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(reference, dim=1), log_target=True, reduction="batchmean")
    return {"agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()), "kl": float(kl)}


def compiled_outputs(qmodel: Any, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, bool]:
    """The outputs of the compiled integer-only module (llvm, batches of ``batch``) on ``x``, and whether
    it equals the numpy reference on the first batch."""
    module = hawqc.compile_integer_only(qmodel, input_shape=(batch, *x.shape[1:]))
    chunks = [x[i:i + batch].numpy() for i in range(0, len(x), batch)]
    out = [module(c) for c in chunks]
    return torch.from_numpy(np.concatenate(out)), bool(np.array_equal(out[0], module.reference(chunks[0])))


def quantized_row(name: str, ptq: str, model: Any, config: Any, calib: list[torch.Tensor], args: argparse.Namespace,
                  score: Callable[[torch.Tensor], dict[str, float]], x: torch.Tensor, batch: int,
                  qat: DataLoader | None = None) -> dict[str, Any]:
    """Quantize with ``ptq`` (then, given ``qat`` data, fine-tune ``args.qat_steps`` QAT steps distilled from
    the float ``model``), compile, run ``x`` through the compiled module and ``score`` its outputs."""
    start = time.perf_counter()
    switches = {"bias_correction": False} if args.ptq_no_bias_correction else {}
    learned = LearnedOptions.for_rounding(args.ptq_rounding, iters=args.ptq_iters, batch_size=args.ptq_batch,
                                          blocks=args.ptq_blocks, drop=args.ptq_drop,
                                          bias_statistics=args.ptq_bias_statistics,
                                          search_ranges=not args.ptq_no_range_search, **switches)
    qmodel = quantize(model, config, calib, ptq=ptq, learned=learned,
                      log=(lambda line: print(f"  {line}", flush=True)) if args.verbose else None)
    ptq_s = time.perf_counter() - start
    extra: dict[str, Any] = {}
    if qat is not None:
        qat_start = time.perf_counter()
        # BatchNorm frozen from the start: the fold the PTQ fitted its rounding and biases to stays
        qat_train(qmodel, qat, steps=args.qat_steps, lr=args.qat_lr, lr_step_size=args.qat_steps // 2,
                  freeze_bn_step=0, teacher=model, progress=False)
        extra = {"qat_steps": args.qat_steps, "qat_lr": args.qat_lr, "qat_s": round(time.perf_counter() - qat_start, 1)}
    logits, exact = compiled_outputs(qmodel, x, batch)
    row = {"model": name, "ptq": ptq, **extra, **score(logits),
           "four_bit_weights": sum(b.w_bits == 4 for b in qmodel.bits.values()),
           "four_bit_inputs": sum(b.a_bits == 4 for b in qmodel.bits.values()),
           "bit_exact": exact, "ptq_s": round(ptq_s, 1), "seconds": round(time.perf_counter() - start, 1)}
    print(row, flush=True)
    return row


def efficientnet_table(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    model, x = pretrained_efficientnet_lite0(), imagenet_variants()
    for missing in (model, x):
        if isinstance(missing, str):
            return {"skipped": missing}
    x = x[:args.inputs]
    reference = outputs(model, x)
    table: dict[str, Any] = {"inputs": len(x), "rows": []}
    start = time.perf_counter()
    synthetic = distill(model, (3, CROP, CROP), samples=args.distill_samples, batch_size=16, steps=args.distill_steps,
                        input_range=(-1.0, 1.0),  # EfficientNet-Lite's preprocessing: (pixel - 127) / 128
                        jitter=args.distill_jitter, flip=args.distill_jitter > 0, lr=args.distill_lr,
                        schedule=args.distill_schedule, tv_weight=args.distill_tv, first_bn_weight=args.distill_first_bn,
                        class_weight=args.distill_classes,
                        log=lambda line: print(line, flush=True))
    table["distill_s"] = round(time.perf_counter() - start, 1)
    calib = list(synthetic.split(8))
    configs = {"W8A8": BitConfig(default=LayerBits(8, 8)), "W4A8": "w4a8", "ILP": None, "W4A4": "uniform4"}
    if args.depthwise_8bit:  # the presets with every depthwise conv at W8A8
        depthwise = {n: LayerBits(8, 8) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
        configs.update({k: BitConfig(layers=depthwise, default=BitConfig.preset(configs[k]).default,
                                     first_last=LayerBits(8, 8)) for k in ("W4A8", "W4A4")})
    for key in [r for r in args.rows if r in configs]:
        config = configs[key]
        if key == "ILP":  # Hessian on (some of) the same distilled inputs
            start = time.perf_counter()
            options = [LayerBits(int(o[1]), int(o[3])) for o in args.ilp_options]
            if args.sensitivity == "measured":  # ZeroQ's KL per layer, on the calibration inputs
                sens = measured_sensitivity(model, calib, bits=sorted({o.w_bits for o in options}),
                                            activation_bits=sorted({o.a_bits for o in options}))
            else:
                sens = sensitivity(model, [synthetic[:args.hessian_samples]], max_iters=args.hessian_iters)
            table.update(sensitivity=args.sensitivity, sensitivity_s=round(time.perf_counter() - start, 1),
                         hessian_iterations=sens.iterations)
            config = hawqc.search_bit_config(model, sensitivity=sens, input_shape=(3, CROP, CROP), bops=0.5,
                                             options=options)
        for ptq in args.ptq:
            label = "ILP bops 0.5" if key == "ILP" else key + (" (depthwise W8A8)" if args.depthwise_8bit and key != "W8A8" else "")
            table["rows"].append(quantized_row(label, ptq, model, config, calib,
                                               args, lambda logits: fidelity(reference, logits), x, 4))
            record(table)
    return table


def fashion_model(args: argparse.Namespace, train: DataLoader) -> torch.nn.Module:
    """``benchmarks/reproduce.py``'s Fashion-MNIST ResNet, trained the same way (cached by settings)."""
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], 10, 1, widths=(8, 16, 32, 64), small_input=True)
    key = hashlib.sha256(json.dumps([args.train_images, args.epochs, "fidelity-v1"]).encode()).hexdigest()[:16]
    path = Path(os.environ.get("HAWQC_CACHE", Path.home() / ".cache" / "hawqc")) / f"fashion-resnet-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train_float(model, train, args.epochs, log=lambda line: print(line, flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def fashion_table(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    try:
        train_set, test_set = data.fashion_mnist("train"), data.fashion_mnist("test")
    except FileNotFoundError as err:
        return {"skipped": str(err)}
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(Subset(train_set, range(min(args.train_images, len(train_set)))), batch_size=128, shuffle=True,
                       generator=generator)
    test = DataLoader(Subset(test_set, range(min(args.test_images, len(test_set)))), batch_size=1000)
    model = fashion_model(args, train)
    calib = [x for x, _ in DataLoader(Subset(train_set, range(512)), batch_size=128)]

    images, labels = (torch.cat(t) for t in zip(*test))

    def accuracy(logits: torch.Tensor) -> dict[str, float]:
        return {"accuracy": float((logits.argmax(1) == labels).float().mean())}

    table: dict[str, Any] = {"test_images": len(labels), "rows": [{"model": "FP32", "ptq": None,
                                                                   **accuracy(outputs(model, images, 1000))}]}
    for name, config in (("W4A4", "uniform4"), ("W4A8", "w4a8")):
        for ptq in args.ptq if name in args.rows else ():
            table["rows"].append(quantized_row(name, ptq, model, config, calib, args, accuracy, images, 500))
            record(table)
    if "QAT" in args.rows and args.qat_steps:  # QAT from the last PTQ method given, distilled from the FP32 model
        table["rows"].append(quantized_row("W4A4 + QAT", args.ptq[-1], model, "uniform4", calib, args, accuracy,
                                           images, 500, qat=train))
        record(table)
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Fidelity: quantized vs float, no labels (and Fashion-MNIST accuracy)", "",
             f"`{report['command']}` on {report['machine']} ({report['settings']}); the machine was shared with "
             "other jobs, so the times are loose.", ""]
    eff = report.get("efficientnet_lite0", {"skipped": "not run"})
    lines += ["## EfficientNet-Lite0 (ImageNet weights), calibrated on distilled data only", ""]
    if "skipped" in eff:
        lines.append(f"Skipped: {eff['skipped']}")
    else:
        lines += ["| model | PTQ | top-1 agreement with FP32 (%) | mean KL | 4-bit weights / inputs | bit-exact | "
                  "PTQ time (s) |", "|---|---|---:|---:|---:|---|---:|"]
        for r in eff["rows"]:
            lines.append(f"| {r['model']} | {r['ptq']} | {100 * r['agreement']:.1f} | {r['kl']:.4f} | "
                         f"{r['four_bit_weights']} / {r['four_bit_inputs']} | {'yes' if r['bit_exact'] else 'NO'} | "
                         f"{r['ptq_s']} |")
        lines += ["", (f"{eff['inputs']} inputs: foolbox's 20 ImageNet images at scales {SCALES}, five 224 crops, "
                       "mirrored. Outputs of the compiled integer-only module (llvm); bit-exact: equal to the "
                       "numpy reference on the first 4 inputs. Calibration, learned rounding and the "
                       + (f"ILP's measured sensitivity (KL per layer, {eff.get('sensitivity_s')} s)"
                          if eff.get("sensitivity") == "measured" else
                          f"ILP's Hessian ({eff.get('hessian_iterations')} Hutchinson iterations on "
                          f"{report['settings_dict']['hessian_samples']} of them, {eff.get('sensitivity_s')} s)")
                       + " use only "
                       f"{report['settings_dict']['distill_samples']} distilled inputs ({eff.get('distill_s')} s to "
                       "synthesise, or read from the cache).")]
    fm = report.get("fashion_mnist", {"skipped": "not run"})
    lines += ["", "## Fashion-MNIST ResNet (PTQ, and QAT after it)", ""]
    if "skipped" in fm:
        lines.append(f"Skipped: {fm['skipped']}")
    else:
        lines += ["| model | PTQ | test accuracy (%) | bit-exact | PTQ time (s) |", "|---|---|---:|---|---:|"]
        for r in fm["rows"]:
            exact = "-" if r["ptq"] is None else ("yes" if r["bit_exact"] else "NO")
            model = r["model"] + (f" ({r['qat_steps']} steps, lr {r['qat_lr']}, {r['qat_s']} s)" if "qat_steps" in r else "")
            lines.append(f"| {model} | {r['ptq'] or '-'} | {100 * r['accuracy']:.2f} | {exact} | "
                         f"{r.get('ptq_s', '-')} |")
        lines += ["", f"Accuracy of the compiled integer-only module on {fm['test_images']} test images; calibration on 512 "
                  "training images; first and last layer 8-bit."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--only", choices=["efficientnet", "fashion-mnist"])
    parser.add_argument("--ptq", nargs="+", choices=["nearest", "learned"], default=["nearest", "learned"])
    parser.add_argument("--ptq-iters", type=int, help="learned PTQ steps per layer (default 300, quick 20)")
    parser.add_argument("--ptq-batch", type=int, default=8, help="learned PTQ samples per step (default 8)")
    parser.add_argument("--ptq-blocks", action="store_true", help="learned PTQ: block reconstruction (BRECQ)")
    parser.add_argument("--ptq-rounding", choices=["adaround", "gptq"], default="adaround",
                        help="learned PTQ per layer: AdaRound (default) or GPTQ (no bias correction, no weight clipping)")
    parser.add_argument("--ptq-no-bias-correction", action="store_true",
                        help="learned PTQ without bias correction (on 8 distilled inputs it can move biases the wrong way)")
    parser.add_argument("--ptq-bias-statistics", choices=["data", "batchnorm"], default="data",
                        help="learned PTQ's bias correction: mean shifts measured on the calibration data (default), "
                             "or data-free from the BatchNorm statistics (DFQ)")
    parser.add_argument("--ptq-no-range-search", action="store_true",
                        help="learned PTQ keeps the calibrated activation ranges (no MSE clipping search)")
    parser.add_argument("--ptq-drop", type=float, default=0.0, help="learned PTQ with --ptq-blocks: QDrop share")
    parser.add_argument("--ilp-options", nargs="+", choices=["W4A4", "W4A8", "W8A8"], default=["W4A4", "W4A8", "W8A8"],
                        help="the ILP's per-layer choices (default: all three)")
    parser.add_argument("--sensitivity", choices=["hessian", "measured"], default="hessian",
                        help="the ILP's Ω: HAWQ-V3's Hessian traces, or ZeroQ's measured KL per layer (hawqc.ilp.measured)")
    parser.add_argument("--depthwise-8bit", action="store_true", help="EfficientNet-Lite0's W4A8 and W4A4 rows with "
                        "every depthwise conv at W8A8")
    parser.add_argument("--tag", help="suffix of the result files (runs in parallel write apart)")
    parser.add_argument("--qat-steps", type=int, help="Fashion-MNIST W4A4 QAT steps after PTQ, 0: none (default 1000, quick 10)")
    parser.add_argument("--qat-lr", type=float, default=5e-3, help="QAT learning rate (default 5e-3, a tenth after half)")
    parser.add_argument("--distill-steps", type=int, help="Adam steps of the distilled inputs (default 150, quick 5)")
    parser.add_argument("--distill-jitter", type=int, default=0, help="distillation with random shifts of up to "
                        "this many pixels and random flips (DeepInversion; default 0: none)")
    parser.add_argument("--distill-samples", type=int, help="distilled inputs, in batches of 16 (default 16, quick 8)")
    parser.add_argument("--distill-lr", type=float, default=0.5, help="distillation's Adam learning rate (default 0.5)")
    parser.add_argument("--distill-schedule", choices=["plateau", "cosine"], default="plateau",
                        help="distillation's learning-rate schedule (default: halved on plateaus)")
    parser.add_argument("--distill-tv", type=float, default=0.0, help="distillation's total-variation prior weight "
                        "(DeepInversion; default 0)")
    parser.add_argument("--distill-first-bn", type=float, default=1.0,
                        help="weight of the first BatchNorm layer's statistics term (DeepInversion uses 10; default 1)")
    parser.add_argument("--distill-classes", type=float, default=0.0, help="weight of a cross-entropy towards a "
                        "class drawn for each distilled input (GDFQ / DeepInversion; default 0: none)")
    parser.add_argument("--hessian-iters", type=int, help="Hutchinson iterations (default 20, quick 2)")
    rows = ["W8A8", "W4A8", "ILP", "W4A4", "QAT"]
    parser.add_argument("--rows", nargs="+", choices=rows, default=rows,
                        help="rows to run (default: all); EfficientNet-Lite0 has W8A8, W4A8, ILP, W4A4, "
                             "Fashion-MNIST W4A4, W4A8, QAT")
    parser.add_argument("--hessian-samples", type=int,
                        help="distilled inputs the Hessian is taken on, in one batch (default 6: ~3 GB of memory)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--verbose", action="store_true", help="print learned PTQ's per-layer errors")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = {"ptq_iters": 300, "distill_steps": 150, "distill_samples": 16, "hessian_samples": 6,
            "hessian_iters": 20, "inputs": 400, "train_images": 60000, "test_images": 10000, "epochs": 3, "qat_steps": 1000}
    quick = {"ptq_iters": 20, "distill_steps": 5, "distill_samples": 8, "hessian_samples": 2, "hessian_iters": 2,
             "inputs": 40, "train_images": 2048, "test_images": 1000, "epochs": 1, "qat_steps": 10}
    settings = quick if args.quick else full
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    settings = {k: getattr(args, k) for k in settings} | {"ptq_batch": args.ptq_batch, "ptq_blocks": args.ptq_blocks,
                                                          "ptq_drop": args.ptq_drop, "ptq_rounding": args.ptq_rounding, "qat_lr": args.qat_lr,
                                                          "ptq_bias_correction": not args.ptq_no_bias_correction and LearnedOptions.for_rounding(
                                                              args.ptq_rounding).bias_correction,
                                                          "ptq_bias_statistics": args.ptq_bias_statistics,
                                                          "ptq_range_search": not args.ptq_no_range_search,
                                                          "distill_jitter": args.distill_jitter,
                                                          "distill_lr": args.distill_lr,
                                                          "distill_schedule": args.distill_schedule,
                                                          "distill_tv": args.distill_tv,
                                                          "distill_first_bn": args.distill_first_bn,
                                                          "distill_classes": args.distill_classes,
                                                          "ilp_options": "/".join(args.ilp_options),
                                                          "depthwise_8bit": args.depthwise_8bit,
                                                          "sensitivity": args.sensitivity}
    started = time.perf_counter()
    out = Path(args.out)
    stem = ("fidelity_quick" if args.quick else "fidelity") + (f"_{args.only}" if args.only else "") + (
        f"_{args.tag}" if args.tag else "")
    report: dict[str, Any] = {"command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:]),
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
                              "settings": ", ".join(f"{k}={v}" for k, v in settings.items()), "settings_dict": settings}

    def write(final: bool) -> None:
        report["total_s"] = round(time.perf_counter() - started, 1)
        write_atomic(out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
        note = "" if final else "\n**Partial results: the run is still going (or was interrupted).**\n"
        write_atomic(out / f"{stem}.md", markdown(report) + f"{note}\nTotal {report['total_s']} s.\n")

    def recorder(key: str) -> Callable[[dict[str, Any]], None]:
        def record(table: dict[str, Any]) -> None:
            report[key] = table
            write(final=False)
        return record

    if args.only != "efficientnet":
        report["fashion_mnist"] = fashion_table(args, recorder("fashion_mnist"))
    if args.only != "fashion-mnist":
        report["efficientnet_lite0"] = efficientnet_table(args, recorder("efficientnet_lite0"))
    write(final=True)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
