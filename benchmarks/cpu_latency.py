"""CPU latency side by side: hawqc (W8A8, W4A4, mixed) vs ONNX Runtime INT8/FP32, PyTorch FP32, TVM FP32.

    python benchmarks/cpu_latency.py [--models resnet18,resnet50] [--batches 1,8] [--runs 20] [--quick]

One process, one machine, the same FP32 model everywhere (random weights, BatchNorm statistics
recalibrated on random images: latency does not depend on the values). ONNX Runtime INT8 is the FP32
ONNX model quantized by ``quantize_static`` with its defaults (QDQ, uint8 activations, int8 weights),
2 intra-op threads like every other row. TVM FP32 is ``from_exported_program`` + ``tvm.compile`` with
the default pipeline (no tuning), measured at the first batch size only (it takes seconds a run). Each
figure is the median of ``--runs`` runs after a warm-up, the engines of one model and batch size taken
in interleaved rounds so that the machine's drift hits all alike (rows slower than 2 s a run take 3
runs, said in the table). Writes ``cpu_latency.{json,md}`` and
``cpu_latency_layers.md``: every conv/dense kernel of hawqc W8A8 ResNet-50 at batch 8 with its
achieved GMAC/s against the machine's VNNI peak (cores x clock x 64 MACs a cycle: one 512-bit
``vpdpbusd`` a cycle per Zen 4 core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hawqc
from hawqc import BitConfig, LayerBits, models, quantize
from hawqc.fileio import write_atomic

THREADS = 2
SLOW_RUN_S = 2.0
WARM_UP_S = 1.0
ROUNDS = 4
MIXED = "mixed: uniform4, layer1+layer2 and first/last at 8"
PROFILED = ("hawqc W8A8", "hawqc W4A4", "hawqc W4A4, int4 weights packed")


@dataclass
class Engine:
    """One row of the table: a label, a call that runs the model once, and what the row reports besides time."""

    label: str
    run: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)
    module: Any = None
    """The hawqc CompiledModule, for the per-layer profile."""


def timed_side_by_side(engines: list[Engine], runs: int) -> list[dict[str, Any]]:
    """Median and spread (ms) of ``runs`` calls of each engine, taken in ``ROUNDS`` interleaved rounds
    (engine A, B, C, A, B, C...) so that drift of the machine's speed hits every engine alike. Each
    engine is warmed up for ``WARM_UP_S`` first; engines slower than ``SLOW_RUN_S`` a call get 3 runs
    after one warm-up call, outside the rounds."""
    times: dict[str, list[float]] = {e.label: [] for e in engines}
    fast = []
    for engine in engines:
        start = time.perf_counter()
        engine.run()
        if time.perf_counter() - start > SLOW_RUN_S:
            times[engine.label] = [_ms(engine.run) for _ in range(3)]
            continue
        while time.perf_counter() - start < WARM_UP_S:
            engine.run()
        fast.append(engine)
    for round_ in range(ROUNDS):
        for engine in fast:
            times[engine.label] += [_ms(engine.run) for _ in range(runs * (round_ + 1) // ROUNDS
                                                                 - runs * round_ // ROUNDS)]
    return [{"engine": e.label, "ms": statistics.median(times[e.label]), "stdev_ms": statistics.pstdev(times[e.label]),
             "runs": len(times[e.label]), **e.extra} for e in engines]


def _ms(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def mixed_config(model: torch.nn.Module) -> BitConfig:
    eight = {n: LayerBits(8, 8) for n in models.quantizable_layers(model) if n.startswith(("layer1", "layer2"))}
    return BitConfig(default=LayerBits(4, 4), first_last=LayerBits(8, 8), layers=eight)


def float_model(name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = models.get(name).eval()
    calib = [torch.randn(4, *models.spec(name).input_shape)]
    models.recalibrate_bn(model, calib)
    return model, calib


def hawqc_engines(model: torch.nn.Module, calib: list[torch.Tensor], x: np.ndarray) -> list[Engine]:
    engines = []
    for label, config, kernels in (("hawqc W8A8", "uniform8", "auto"), ("hawqc W4A4", "uniform4", "auto"),
                                   ("hawqc W4A4, int4 weights packed", "uniform4", "vnni-w4"),
                                   ("hawqc mixed", mixed_config(model), "auto")):
        module = hawqc.compile_integer_only(quantize(model, config, calib).integer_graph(), input_shape=x.shape,
                                            kernels=kernels)
        exact = bool(np.array_equal(module(x), module.reference(x)))
        engines.append(Engine(label, lambda module=module: module(x), {"bit_exact": exact}, module))
    return engines


def layer_profiles(engines: list[Engine], x: np.ndarray, runs: int) -> dict[str, list[dict[str, Any]]]:
    """Per conv/dense kernel of each engine's module: median time over ``runs`` model runs (taken in
    interleaved rounds, as the end-to-end times are), MACs from the call's tensor shapes."""
    calls: dict[str, list[tuple[str, float, int]]] = {e.label: [] for e in engines}
    started: dict[str, float] = {}

    def instrument(label: str) -> Callable[..., int]:
        def record(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
            if "conv2d" in symbol or "dense" in symbol:
                if before:
                    started[symbol] = time.perf_counter()
                else:
                    calls[label].append((symbol, time.perf_counter() - started[symbol], _macs(args)))
            return 0
        return record

    for round_ in range(ROUNDS):
        for engine in engines:
            engine.module._vm.set_instrument(instrument(engine.label))
            try:
                for _ in range(runs * (round_ + 1) // ROUNDS - runs * round_ // ROUNDS):
                    engine.module(x)
            finally:
                engine.module._vm.set_instrument(None)
    return {e.label: _per_layer(e.module, calls[e.label], runs) for e in engines}


def _per_layer(module: Any, calls: list[tuple[str, float, int]], runs: int) -> list[dict[str, Any]]:
    per_run = len(calls) // runs
    layers = list(module.summary())
    out = []
    for i in range(per_run):
        symbol, _, macs = calls[i]
        seconds = statistics.median(calls[i + k * per_run][1] for k in range(runs))
        out.append({"layer": layers[i]["layer"] if i < len(layers) else symbol, "kernel": symbol,
                    "gmac": macs / 1e9, "us": seconds * 1e6, "gmac_per_s": macs / seconds / 1e9})
    return out


def _macs(args: tuple[Any, ...]) -> int:
    """MACs of a hawqc x86 conv kernel call: output elements x KH x KW x input channels (the packed
    weights are ``[OC/16, KH, KW, IC/4, ...]``)."""
    weight, out = args[1].shape, args[-1].shape
    return int(np.prod(out)) * int(np.prod(weight[1:4])) * 4


def onnx_engines(name: str, model: torch.nn.Module, calib: list[torch.Tensor], x: np.ndarray,
                 folder: Path) -> list[Engine]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    fp32 = folder / f"{name}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(fp32), input_names=["input"], dynamo=False)

    class Reader(CalibrationDataReader):  # the calibration images, each repeated to the model's batch size
        def __init__(self) -> None:
            self.batches = iter([{"input": np.repeat(b.numpy(), len(x), axis=0)} for b in calib[0].split(1)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    int8 = folder / f"{name}.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader())
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    engines = []
    for label, path in (("ONNX Runtime INT8", int8), ("ONNX Runtime FP32", fp32)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        engines.append(Engine(label, lambda session=session: session.run(None, {"input": x})))
    return engines


def torch_engine(model: torch.nn.Module, x: np.ndarray) -> Engine:
    inputs = torch.from_numpy(x)

    def run() -> Any:
        with torch.inference_mode():
            return model(inputs)
    return Engine("PyTorch FP32", run)


def tvm_fp32_engine(model: torch.nn.Module, x: np.ndarray) -> Engine:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from hawqc.runtime.target import parse_target

    exported = torch.export.export(model, (torch.from_numpy(x),))
    target = tvm.target.Target(parse_target("llvm"))
    mod = from_exported_program(exported, keep_params_as_input=False)
    executable = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    inputs = tvm.runtime.tensor(x)
    return Engine("TVM FP32 (default pipeline)", lambda: vm["main"](inputs))


def peak_gmac_per_s() -> tuple[float, str]:
    """The VNNI int8 peak: cores x clock x 64 MACs a cycle (one 512-bit vpdpbusd a cycle per core)."""
    mhz = max(float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("cpu MHz"))
    return THREADS * mhz * 1e6 * 64 / 1e9, f"{THREADS} cores x {mhz / 1e3:.2f} GHz x 64 MAC/cycle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 1, 5 runs, no TVM FP32")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    names, batches, runs = args.models.split(","), [int(b) for b in args.batches.split(",")], args.runs
    if args.quick:
        names, batches, runs = ["resnet18"], [1], 5
    torch.set_num_threads(THREADS)
    results: list[dict[str, Any]] = []
    profiles: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model, calib = float_model(name)
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                engines = hawqc_engines(model, calib, x) + onnx_engines(name, model, calib, x, Path(tmp))
                engines.append(torch_engine(model, x))
                if not args.quick and batch == batches[0]:  # untuned TVM takes seconds a run: one batch size
                    engines.append(tvm_fp32_engine(model, x))
                rows = timed_side_by_side(engines, runs)
                if (name, batch) == (names[-1], batches[-1]):
                    profiles = layer_profiles([e for e in engines if e.label in PROFILED], x, runs)
                ort_int8 = next(r["ms"] for r in rows if r["engine"] == "ONNX Runtime INT8")
                for row in rows:
                    row.update(model=name, batch=batch, vs_ort_int8=row["ms"] / ort_int8)
                    print(json.dumps(row), flush=True)
                results += rows
    peak, how = peak_gmac_per_s()
    layers = profiles["hawqc W8A8"]
    for row, w4, packed in zip(layers, profiles["hawqc W4A4"], profiles["hawqc W4A4, int4 weights packed"]):
        row.update(peak_fraction=row["gmac_per_s"] / peak, w4a4_us=w4["us"], w4a4_packed_us=packed["us"])
    write_report(Path(args.out), results, layers, peak, how, f"{names[-1]} batch {batches[-1]}")


def write_report(out: Path, results: list[dict[str, Any]], layers: list[dict[str, Any]], peak: float, how: str,
                 profiled: str) -> None:
    machine = f"{platform.processor() or platform.machine()}, {THREADS} threads, torch {torch.__version__}"
    lines = [f"# CPU latency, ms (median; {machine})", "",
             "| model | batch | engine | ms | x ORT INT8 | runs | bit-exact |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['engine']} | {r['ms']:.2f} | {r['vs_ort_int8']:.2f} | "
              f"{r['runs']} | {'' if 'bit_exact' not in r else ('yes' if r['bit_exact'] else 'NO')} |"
              for r in results]
    lines += ["", f"hawqc mixed = {MIXED}. VNNI int8 peak {peak:.0f} GMAC/s ({how})."]
    table = [f"# hawqc kernels, {profiled}: achieved GMAC/s vs the VNNI peak ({peak:.0f} GMAC/s, {how})", "",
             "W8A8 columns: the int8 kernel; W4A4: the same kernel on 4-bit values, and with the 4-bit weights "
             "packed two per byte (unpacked in registers). packed/int8 < 1 is where packing pays.", "",
             "| layer | GMAC | W8A8 us | GMAC/s | % peak | W4A4 us | W4A4 packed us | packed/int8 |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['layer']} | {r['gmac']:.3f} | {r['us']:.0f} | {r['gmac_per_s']:.0f} | "
              f"{100 * r['peak_fraction']:.0f} | {r['w4a4_us']:.0f} | {r['w4a4_packed_us']:.0f} | "
              f"{r['w4a4_packed_us'] / r['w4a4_us']:.2f} |" for r in layers]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "cpu_latency.json", json.dumps({"machine": machine, "peak_gmac_per_s": peak, "peak": how,
                                                      "rows": results, "layers": layers}, indent=2) + "\n")
    write_atomic(out / "cpu_latency.md", "\n".join(lines) + "\n")
    write_atomic(out / "cpu_latency_layers.md", "\n".join(table) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
