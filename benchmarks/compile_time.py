"""How long `hawqc compile` takes (no tuning): ONNX QDQ in, integer-only llvm module out.

    python benchmarks/compile_time.py [--models resnet18,resnet50] [--out benchmarks/results]

Prints a markdown table and saves it with a JSON file beside it. Weights are random (BatchNorm
statistics recalibrated), which does not change compile time.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hawqc
from hawqc import models, quantize
from hawqc.fileio import write_atomic
from hawqc.quant.export import to_onnx


def measure(name: str, config: str, folder: Path) -> dict[str, object]:
    torch.manual_seed(0)
    spec = models.spec(name)
    model = models.get(name)
    calib = [torch.randn(2, *spec.input_shape)]
    models.recalibrate_bn(model, calib)
    path = folder / f"{name}_{config}.onnx"
    to_onnx(quantize(model, config, calib), path)
    start = time.perf_counter()
    module = hawqc.compile_integer_only(path, input_shape=(1, *spec.input_shape))
    seconds = time.perf_counter() - start
    x = np.random.default_rng(0).standard_normal((1, *spec.input_shape)).astype(np.float32)
    start = time.perf_counter()
    module(x)
    run_seconds = time.perf_counter() - start
    exact = bool(np.array_equal(module(x), module.reference(x)))
    return {"model": name, "bits": config, "compile_s": round(seconds, 1), "first_run_s": round(run_seconds, 2),
            "bit_exact": exact, "layers": len(module.summary())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--configs", default="uniform8,uniform4")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            for config in args.configs.split(","):
                rows.append(measure(name, config, Path(folder)))
                print(rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"# hawqc compile time (no tuning), batch 1, llvm host CPU ({machine})", "",
             "| model | bits | compile (s) | first run (s) | bit-exact | conv/dense layers |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['bits']} | {r['compile_s']} | {r['first_run_s']} | {r['bit_exact']} | {r['layers']} |"
              for r in rows]
    out = Path(args.out)
    write_atomic(out / "compile_time.json", json.dumps({"machine": machine, "tvm": __import__("tvm").__version__,
                                                        "rows": rows}, indent=2) + "\n")
    write_atomic(out / "compile_time.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
