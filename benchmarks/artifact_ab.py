"""Two or more hawqc artifacts of the same model, timed against each other in one process, calls alternating.

    python benchmarks/artifact_ab.py SHAPE ARTIFACT_A ARTIFACT_B [...] [--calls 30] [--threads 2] [--out DIR]

For a kernel change: export the artifact before and after it (``hawqc.compile_integer_only(...).export``, e.g.
from a ``git worktree`` of the commit before), then time them here. Each round calls every artifact once, the
order reversed every other round, so a slow episode of the machine falls on all of them alike; every output
is checked equal to the first artifact's. Prints and saves, per artifact, median and minimum ms and the median
of its per-round time over the first artifact's to ``DIR/artifact_ab.{json,md}`` (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402  (beside this file)

RESULTS = Path(__file__).parent / "results"


def alternate(paths: list[str], shape: list[int], calls: int, threads: int) -> list[dict[str, Any]]:
    import hawqc

    modules = [hawqc.load(path, threads=threads) for path in paths]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = modules[0](x)
    for path, module in zip(paths, modules):
        for _ in range(3):  # warm-up, each call checked
            if not np.array_equal(module(x), expected):
                raise SystemExit(f"error: {path} computes other numbers than {paths[0]}")
    times: list[list[float]] = [[] for _ in modules]
    for i in range(calls):
        for k in (range(len(modules)) if i % 2 == 0 else reversed(range(len(modules)))):
            start = time.perf_counter()
            modules[k](x)
            times[k].append(time.perf_counter() - start)
    return [{"artifact": path, "median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
             "paired_ratio": statistics.median(b / a for a, b in zip(times[0], t))} for path, t in zip(paths, times)]


def markdown(rows: list[dict[str, Any]], how: str) -> str:
    lines = [f"# hawqc artifacts against each other ({how})", "",
             "| artifact | median ms | min ms | paired time / first's |", "|---|---|---|---|"]
    lines += [f"| {r['artifact']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['paired_ratio']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="input shape, e.g. 8,3,224,224")
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if len(args.artifacts) < 2:
        parser.error("give two artifacts or more")
    missing = [a for a in args.artifacts if not Path(a).is_dir()]
    if missing:
        parser.error(f"no artifact folder {missing[0]}")
    rows = alternate(args.artifacts, [int(d) for d in args.shape.split(",")], args.calls, args.threads)
    how = (f"input {args.shape}, {args.calls} alternating calls each, {args.threads} threads, "
           f"load 1-min {os.getloadavg()[0]:.2f}")
    report.save(args.out, "artifact_ab", {"how": how, "rows": rows}, markdown(rows, how))


if __name__ == "__main__":
    report.run(main)
