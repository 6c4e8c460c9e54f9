"""How fast the bit-allocation ILP solves: ResNet-50 (54 layers, options W4A4/W8A8), one solve and a Pareto sweep.

    python benchmarks/ilp_speed.py [--points 20] [--out benchmarks/results]

Ω is random (the solve time does not depend on where it comes from); costs are ResNet-50's at 224x224.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from hawqc import models
from hawqc.fileio import write_atomic
from hawqc.ilp.solver import Budget, build_problem, pareto, solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    model = models.get("resnet50")
    rng = random.Random(0)
    omega = {n: {4: rng.random(), 8: rng.random() * 1e-2} for n in models.quantizable_layers(model)}
    problem = build_problem(model, (3, 224, 224), omega)
    rows = []
    for metric in ("size", "bops"):
        times = []
        for fraction in (0.25, 0.5, 0.75):
            start = time.perf_counter()
            solve(problem, [Budget(metric, fraction, True)])
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        front = pareto(problem, metric, args.points)
        sweep = time.perf_counter() - start
        rows.append({"metric": metric, "layers": len(problem.layers), "solve_s_max": round(max(times), 3),
                     "sweep_points": len(front), "sweep_s": round(sweep, 2)})
        print(rows[-1], flush=True)
    lines = [f"# ILP speed: ResNet-50, 2 options per layer ({platform.machine()})", "",
             "| budget | layers | one solve, max of 3 (s) | sweep points | sweep (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {r['layers']} | {r['solve_s_max']} | {r['sweep_points']} | {r['sweep_s']} |"
              for r in rows]
    out = Path(args.out)
    write_atomic(out / "ilp_speed.json", json.dumps(rows, indent=1) + "\n")
    write_atomic(out / "ilp_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
