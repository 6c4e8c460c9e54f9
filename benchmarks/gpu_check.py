"""The prepared GPU check of hawqc on an H200 (sm_90): one run, at most 8 minutes, no network.

    python3 benchmarks/gpu_check.py OUT [--dry-run] [--quick] [--models resnet18,resnet50] [--image 224]
                                        [--batches 1,8,64]

1. The GPU tests: ``pytest tests/test_cuda_codegen.py`` (its GPU tests skip elsewhere).
2. Every output element against hawqc's numpy reference, batch 8: ResNet-18 and ResNet-50 (built-ins,
   random weights, BatchNorm recalibrated on random images) at W8A8, W4A4 and mixed, all built with
   ``int4="emulated"`` (the 4-bit layers on the INT4 ``mma`` kernels, which ptxas emulates on sm_90: their
   fragment layouts and packing checked bit-exact), and each model quantized by ONNX Runtime's
   ``quantize_static`` (defaults: QDQ, uint8 activations, int8 weights).
3. Latency at batch 1, 8 and 64: hawqc W8A8 (INT8 Tensor Cores) beside PyTorch FP16 on the same GPU and,
   where ``tensorrt`` imports, TensorRT INT8 on the ONNX Runtime QDQ file. Each hawqc module timed is
   checked on every element (batch 1: the first image of the batch-8 input; batch 64: that input 8 times).

``--dry-run`` does on a CPU what needs no GPU: it builds every module for sm_90, compiles its CUDA source
to a cubin with nvcc (where nvcc is installed) and runs the same graph, with the Tensor Core kernels
built for llvm (each ``mma`` as plain loops over the same fragments), against the reference; it runs no
GPU test and times nothing. ``--quick`` is ResNet-18 at 64x64 (ONNX Runtime model included); ``--image``
sets the image size (default: each model's own).
Writes ``gpu_check.json`` and ``gpu_check.md`` into OUT (for ``benchmarks/results/``).

On the GPU machine, ``benchmarks/gpu_check.sh`` installs the wheels of ``.whl/`` (made here by
``benchmarks/gpu_wheels.sh``: apache-tvm and apache-tvm-ffi, the rest is in that machine's image) and
runs this script. Size: apache-tvm 0.27.0.post1's wheel is 96 MiB (its ``libtvm_compiler.so``, 247 MiB
unpacked, 87 MiB deflated, still 57 MiB under ``xz -9e``), over the 64 MiB a call may carry, so
``gpu_wheels.sh`` splits the set into ``.whl/`` and ``.whl-b/``: carry ``.whl`` in a first call
(``true``) and ``.whl-b`` in a second, within the machine's 30 s warm window; see ``gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cpu_latency import float_model, own_configs
from gpu_latency import latency_ms

import hawqc
from hawqc import api, models, quantize
from hawqc.fileio import write_atomic
from hawqc.reference.graph import IntegerGraph
from hawqc.runtime.module import CompiledModule, compile_graph

ARCH = "sm_90"
TARGET = {"kind": "cuda", "arch": ARCH}
CHECK_BATCH = 8
CONFIGS = ("W8A8", "W4A4", "mixed")
ROOT = Path(__file__).resolve().parent.parent


def hawqc_graphs(model: torch.nn.Module, calib: list[torch.Tensor]) -> dict[str, IntegerGraph]:
    own = own_configs(model)
    bits = {"W8A8": own["hawqc-w8a8"], "W4A4": own["hawqc-w4a4"], "mixed": own["hawqc-mixed"]}
    return {label: quantize(model, bits[label], calib).integer_graph() for label in CONFIGS}


def ort_file(model: torch.nn.Module, calib: list[torch.Tensor], folder: Path, name: str) -> Path:
    """``model`` exported to ONNX (batch and image size dynamic) and quantized by ``quantize_static`` (defaults)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.ort-int8.onnx"
    torch.onnx.export(model, (calib[0][:1],), str(fp32), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b.numpy()} for b in calib[0].split(1)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader())
    return int8


def mma_counts(source: str) -> dict[str, int]:
    """Conv kernels of the CUDA ``source`` on INT4 (m8n8k32) and INT8 (m8n8k16) ``mma``."""
    kernels = source.split("__global__")[1:]
    return {"int4_mma_kernels": sum("m8n8k32" in k for k in kernels),
            "int8_mma_kernels": sum("m8n8k16" in k for k in kernels)}


def compared(got: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    return {"elements": int(expected.size), "mismatches": int(np.count_nonzero(got != expected)),
            "bit_exact": bool(np.array_equal(got, expected))}


def cubin_bytes(source: str, arch: str = ARCH) -> int | None:
    """Size of the cubin nvcc makes of ``source`` for ``arch`` (None without nvcc)."""
    import tvm
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        return None
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return len(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc"))


def on_llvm(graph: IntegerGraph, x: np.ndarray, arch: str = ARCH, int4: str = "emulated") -> np.ndarray:
    """``graph`` lowered as the ``arch`` build lowers it (on sm_90 with emulated INT4), each ``mma`` as loops,
    run on the CPU."""
    import tvm
    from tvm import relax

    from hawqc.frontend.integer_graph import to_relax
    from hawqc.relax_passes.tensor_core_conv import TensorCoreConv

    ir = TensorCoreConv(arch, tensor_cores=False, int4=int4)(to_relax(graph, x.shape, layout="NHWC"))
    target = tvm.target.Target({"kind": "llvm"})
    executable = tvm.compile(ir, target=target, relax_pipeline=relax.get_default_pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``, or ``{"error": ...}`` if it raises: one failing build or engine is a result, not the end."""
    try:
        return run()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}


def check(graph: IntegerGraph, x: np.ndarray, expected: np.ndarray, dry_run: bool, modules: dict[str, Any],
          label: str) -> dict[str, Any]:
    """One model at one config: built for sm_90 (into ``modules[label]``) and compared with ``expected`` on
    every element (on the GPU, or on llvm in a dry run)."""
    start = time.perf_counter()
    module = modules[label] = compile_graph(graph, x.shape, TARGET, int4="emulated")
    row: dict[str, Any] = {"compile_s": round(time.perf_counter() - start, 1), **mma_counts(module.source())}
    if dry_run:
        row["cubin_bytes"] = cubin_bytes(module.source())
        row.update(compared(on_llvm(graph, x), expected), ran_on="llvm (mma as loops)")
    else:
        row.update(compared(module(x), expected), ran_on=ARCH)
    return row


def hawqc_latency(module: CompiledModule, graph: IntegerGraph, x8: np.ndarray, expected8: np.ndarray,
                  batch: int) -> dict[str, Any]:
    """The W8A8 module at ``batch`` (``module`` itself at the check batch), checked on every element, timed."""
    x, expected = (batched(a, batch) for a in (x8, expected8))
    if batch != CHECK_BATCH:
        module = compile_graph(graph, x.shape, TARGET)
    return {"ms": round(latency_ms(module, x), 3), **compared(module(x), expected)}


def batched(a: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` rows of ``a`` repeated as often as needed."""
    return np.tile(a, (-(-batch // len(a)),) + (1,) * (a.ndim - 1))[:batch]


def torch_fp16_ms(model: torch.nn.Module, x: np.ndarray) -> float:
    """Median of 20 timed runs (CUDA events over 10 calls each, after a warm-up), in milliseconds."""
    model = model.half().cuda()
    inputs = torch.from_numpy(x).half().cuda()
    times = []
    with torch.inference_mode():
        for _ in range(10):
            model(inputs)
        for _ in range(20):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(10):
                model(inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 10)
    model.float().cpu()
    return round(float(np.median(times)), 3)


def tensorrt_int8_ms(onnx_path: Path, x: np.ndarray) -> float:
    """TensorRT on the QDQ file (explicit INT8 quantization, FP16 allowed elsewhere): median of 20 timed runs."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise ValueError(f"TensorRT cannot parse {onnx_path.name}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    for flag in ("INT8", "FP16"):
        if hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape("input", x.shape, x.shape, x.shape)
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    context.set_input_shape("input", x.shape)
    inputs = torch.from_numpy(x).cuda()
    output = engine.get_tensor_name(engine.num_io_tensors - 1)
    outputs = torch.empty(tuple(context.get_tensor_shape(output)), device="cuda")
    context.set_tensor_address("input", inputs.data_ptr())
    context.set_tensor_address(output, outputs.data_ptr())
    stream = torch.cuda.current_stream()
    times = []
    for i in range(30):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        torch.cuda.synchronize()
        if i >= 10:
            times.append(begin.elapsed_time(end))
    return round(float(np.median(times)), 3)


def gpu_tests(seconds: int = 240) -> dict[str, Any]:
    """``pytest tests/test_cuda_codegen.py`` on the GPU: exit status and its summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", "8", "-p", "no:cacheprovider", "tests/test_cuda_codegen.py"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {seconds} s"}
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"passed": done.returncode == 0, "summary": lines[-1] if lines else "", "tail": lines[-30:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build for sm_90, nvcc, check on llvm")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64x64, batch 1 (a few minutes on a CPU)")
    parser.add_argument("--models", default="resnet18,resnet50", help="built-in models (any of hawqc's)")
    parser.add_argument("--image", type=int, help="image height and width (default: the model's)")
    parser.add_argument("--batches", default="1,8,64", help="latency batch sizes")
    args = parser.parse_args()
    import tvm

    names, image, batches = args.models.split(","), args.image, [int(b) for b in args.batches.split(",")]
    if args.quick:
        names, image = ["resnet18"], 64
    if not args.dry_run and not tvm.cuda().exist:
        raise SystemExit("gpu_check: no CUDA GPU here; pass --dry-run to do what a CPU can")
    started = time.perf_counter()
    check_batch = 1 if args.dry_run else CHECK_BATCH  # the llvm build runs each mma as loops: one image
    report: dict[str, Any] = {
        "machine": tvm.cuda().device_name if not args.dry_run else f"{platform.machine()} CPU (dry run)",
        "arch": ARCH, "dry_run": args.dry_run, "check_batch": check_batch,
        "versions": {"hawqc": hawqc.__version__, "tvm": tvm.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "gpu_tests": (gpu_tests() if not args.dry_run else {"skipped": "dry run: the GPU tests need a GPU"}),
        "checks": [], "latency": [], "wall_s": None}
    if args.dry_run:
        report["latency_skipped"] = "dry run: latency needs the GPU"
    out = Path(args.out)
    print(json.dumps(report["gpu_tests"].get("summary", report["gpu_tests"])), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            channels, *size = models.spec(name).input_shape
            shape = (check_batch, channels, *([image, image] if image else size))
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            model, calib = float_model(name)
            graphs = hawqc_graphs(model, calib)
            onnx_path = ort_file(model, calib, Path(tmp), name)
            graphs["ONNX Runtime QDQ"] = api.integer_graph_of(onnx_path, input_shape=x.shape)
            modules, expected = {}, {}
            for label, graph in graphs.items():
                expected[label] = graph.run(x)
                row = guarded(lambda: check(graph, x, expected[label], args.dry_run, modules, label))
                report["checks"].append({"model": name, "input": list(shape[1:]), "config": label, **row})
                print(json.dumps(report["checks"][-1]), flush=True)
                write_report(out, report)  # a run cut short still leaves what it found
            if args.dry_run or "W8A8" not in modules:
                continue
            for batch in batches:
                xb = batched(x, batch)
                row = {"model": name, "input": list(shape[1:]), "batch": batch,
                       "hawqc W8A8": guarded(lambda: hawqc_latency(modules["W8A8"], graphs["W8A8"], x,
                                                                   expected["W8A8"], batch)),
                       "PyTorch FP16": guarded(lambda: {"ms": torch_fp16_ms(model, xb)})}
                if importlib.util.find_spec("tensorrt") is not None:
                    row["TensorRT INT8"] = guarded(lambda: {"ms": tensorrt_int8_ms(onnx_path, xb)})
                report["latency"].append(row)
                print(json.dumps(row), flush=True)
                write_report(out, report)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(out, report)
    print((out / "gpu_check.md").read_text())


def write_report(out: Path, report: dict[str, Any]) -> None:
    where = "llvm, each mma as loops (dry run)" if report["dry_run"] else report["machine"]
    lines = [f"# hawqc GPU check, {report['arch']} ({report['machine']})", "",
             f"GPU tests: {report['gpu_tests'].get('summary', report['gpu_tests'].get('skipped'))}", "",
             f"## Every element against the reference, batch {report['check_batch']}, run on {where}", "",
             "| model | input | config | INT4 mma kernels | INT8 mma kernels | cubin (bytes) | mismatches "
             "| bit-exact |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['config']} | " + (
              f"{r['int4_mma_kernels']} | {r['int8_mma_kernels']} | {r.get('cubin_bytes', '')} | "
              f"{r['mismatches']} of {r['elements']} | {'yes' if r['bit_exact'] else 'NO'} |" if "error" not in r
              else f"error: {r['error']} | | | | |") for r in report["checks"]]
    lines += ["", "W4A4 and mixed run their 4-bit layers on the INT4 kernels (`--int4 emulated`: ptxas emulates "
              "mma.m8n8k32 s4 on sm_90). ONNX Runtime QDQ: `quantize_static` defaults; convs that read uint8 "
              "activations with a nonzero zero point keep TVM's lowering (no Tensor Core kernel).", ""]
    if report["latency"]:
        engines = [e for e in ("hawqc W8A8", "PyTorch FP16", "TensorRT INT8") if e in report["latency"][0]]
        lines += ["## Latency, ms (median)", "", f"| model | batch | {' | '.join(engines)} | hawqc bit-exact |",
                  "|---|---|" + "---|" * len(engines) + "---|"]
        lines += [f"| {r['model']} | {r['batch']} | " + " | ".join(str(r[e].get("ms", r[e].get("error")))
                                                                   for e in engines)
                  + f" | {'yes' if r['hawqc W8A8'].get('bit_exact') else 'NO'} |" for r in report["latency"]]
    elif "latency_skipped" in report:
        lines.append(f"Latency: {report['latency_skipped']}.")
    wall = f"wall {report['wall_s']} s" if report["wall_s"] is not None else "unfinished"
    lines += ["", f"tvm {report['versions']['tvm']}, torch {report['versions']['torch']}; {wall}."]
    write_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "gpu_check.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
