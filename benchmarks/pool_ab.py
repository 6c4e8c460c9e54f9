"""hawqc's thread pool against TVM's on the same loaded artifact, with and without a job taking part of a core.

    python benchmarks/pool_ab.py [--cases efficientnet_b0:1,mobilenet_v2:8,resnext50_32x4d:1] [--rounds 10]

Reads the artifacts `benchmarks/cpu_latency.py` compiled from ONNX Runtime's files (its cache). Per case, one
process loads the artifact at 2 threads and alternates, round by round, between TVM's parallel launch and
hawqc's pool (the library's launch pointer switched in place; every call checked against the first), timing
``--calls`` calls each: once on its own, once beside a job that busy-waits 2 ms of every 10 on one core (another
process). Prints and saves median/p25/min ms per pool and condition to benchmarks/results/pool_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402  (beside this file)

INTERFERER = ("import time\nend = time.perf_counter() + float(__import__('sys').argv[1])\n"
              "while time.perf_counter() < end:\n    t = time.perf_counter()\n"
              "    while time.perf_counter() - t < 0.002: pass\n    time.sleep(0.008)\n")


def launchers(folder: Path) -> tuple[list[Any], int, int]:
    """The launch pointers of the artifact's libraries, TVM's launch and hawqc's pool's (both as addresses)."""
    from hawqc.runtime import threads

    pointers = [ctypes.c_void_p.in_dll(ctypes.CDLL(str(so)), "__TVMBackendParallelLaunch") for so in folder.glob("*.so")]
    runtime = next(line.split()[-1] for line in open("/proc/self/maps") if "libtvm_runtime" in line)
    tvm_launch = ctypes.cast(ctypes.CDLL(runtime).TVMBackendParallelLaunch, ctypes.c_void_p).value
    if threads._pool is None:
        raise SystemExit(f"{folder}: no hawqc pool in this artifact (compiled by an older hawqc?)")
    return pointers, tvm_launch, ctypes.cast(threads._pool.hawqc_pool_launch, ctypes.c_void_p).value


def ab(folder: Path, batch: int, rounds: int, calls: int) -> dict[str, list[float]]:
    """Call times (s) of the artifact per pool, the pools alternating round by round."""
    import hawqc

    module = hawqc.load(folder, threads=2)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    expected = module(x)
    pointers, tvm_launch, ours = launchers(folder)
    times: dict[str, list[float]] = {"tvm": [], "hawqc": []}
    for _ in range(rounds):
        for pool, address in (("tvm", tvm_launch), ("hawqc", ours)):
            for pointer in pointers:
                pointer.value = address
            if not np.array_equal(module(x), expected):
                raise SystemExit(f"{folder}: the output changed with {pool}'s pool")
            for _ in range(calls):
                start = time.perf_counter()
                module(x)
                times[pool].append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"median_ms": float(statistics.median(ms)), "p25_ms": float(np.percentile(ms, 25)), "min_ms": float(ms.min())}


def markdown(rows: list[dict[str, Any]], how: str) -> str:
    lines = ["# hawqc's thread pool against TVM's (2 threads, ms per call)", "", how, "",
             "| model | batch | condition | TVM median | hawqc median | TVM p25 | hawqc p25 | TVM min | hawqc min |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, h = r["tvm"], r["hawqc"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['condition']} | {t['median_ms']:.2f} | {h['median_ms']:.2f} | "
                     f"{t['p25_ms']:.2f} | {h['p25_ms']:.2f} | {t['min_ms']:.2f} | {h['min_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="efficientnet_b0:1,mobilenet_v2:8,resnext50_32x4d:1")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        model, batch = case.split(":")
        folder = args.cache / model / f"b{batch}" / "hawqc-ort"
        if not folder.exists():
            raise SystemExit(f"{folder} missing: run benchmarks/cpu_latency.py --models {model} --batches {batch} first")
        for condition in ("alone", "beside a 20% job"):
            job = (subprocess.Popen([sys.executable, "-c", INTERFERER, "3600"]) if condition != "alone" else None)
            try:
                times = ab(folder, int(batch), args.rounds, args.calls)
            finally:
                if job is not None:
                    job.kill()
                    job.wait()
            row = {"model": model, "batch": int(batch), "condition": condition,
                   "load_1min": os.getloadavg()[0], **{pool: summary(t) for pool, t in times.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    how = (f"One process per case at 2 threads, the two pools alternating every {args.calls} calls for {args.rounds} "
           "rounds; 'beside a 20% job': another process busy-waits 2 ms of every 10 ms meanwhile. "
           f"Machine: {os.cpu_count()} CPUs; load 1-min at the end of each row in the JSON.")
    report.save(args.out, "pool_ab", {"how": how, "rows": rows}, markdown(rows, how))


if __name__ == "__main__":
    report.run(main)
