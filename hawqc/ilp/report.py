"""The search report: a markdown page with two figures (Pareto front; per-layer bits, Ω and latency)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hawqc.fileio import atomic_output, write_atomic
from hawqc.ilp.search import SearchResult
from hawqc.ilp.solver import UNITS


def write_report(result: SearchResult, folder: str | os.PathLike[str], title: str = "hawqc search") -> Path:
    """Write ``report.md``, ``pareto.png`` (when the sweep found two configurations or more) and
    ``layers.png`` into ``folder``; returns the page."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(folder)
    lines = [f"# {title}", ""]
    if result.solution is not None:
        s = result.solution
        lines += ["## Chosen configuration", "", "| metric | value | budget |", "|---|---:|---:|"]
        lines += [f"| {m} ({UNITS[m]}) | {v:.6g} | {s.limits[m]:.6g} |" if m in s.limits else
                  f"| {m} ({UNITS[m]}) | {v:.6g} | - |" for m, v in s.metrics.items()]
        four = sum(b.w_bits == 4 for b in s.bits.values())
        lines += ["", f"Σ Ω = {s.omega:.6g}; {four} of {len(s.bits)} layers at 4-bit weights.", "", "![per-layer bits, Ω and latency](layers.png)", ""]
        _save_figure(_layer_figure(result), out / "layers.png")
    if result.front:
        metric = result.front_metric
        lines += [f"## Pareto front (Σ Ω vs {metric})", "", f"| {metric} ({UNITS[metric]}) | Σ Ω | 4-bit layers |",
                  "|---:|---:|---:|"]
        lines += [f"| {p.metrics[metric]:.6g} | {p.omega:.6g} | {sum(b.w_bits == 4 for b in p.bits.values())} |"
                  for p in result.front]
        if len(result.front) > 1:
            lines += ["", "![Pareto front](pareto.png)", ""]
            _save_figure(_pareto_figure(result), out / "pareto.png")
        else:
            lines += ["", f"Every {metric} budget of the sweep gives this one configuration: no trade-off to plot.", ""]
    page = out / "report.md"
    write_atomic(page, "\n".join(lines))
    return page


def _pareto_figure(result: SearchResult) -> Any:
    import matplotlib.pyplot as plt

    metric = result.front_metric
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.metrics[metric] for p in result.front], [p.omega for p in result.front], "o-", label="ILP")
    if result.solution is not None:
        ax.plot([result.solution.metrics[metric]], [result.solution.omega], "r*", markersize=14, label="chosen")
    ax.set_xlabel(f"{metric} ({UNITS[metric]})")
    ax.set_ylabel("Σ Ω (second-order perturbation)")
    omegas = [p.omega for p in result.front]
    if max(omegas) > 100 * max(min(omegas), 1e-12):  # a log scale only where Ω spans decades
        ax.set_yscale("symlog", linthresh=max(min(omegas), 1e-12))
    ax.margins(x=0.08, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _layer_figure(result: SearchResult) -> Any:
    import matplotlib.pyplot as plt

    problem, solution = result.problem, result.solution
    layers = problem.layers
    index = {n: problem.options.index(solution.bits[n]) for n in layers}
    panels = [("weight bits", [solution.bits[n].w_bits for n in layers]),
              ("Ω at chosen bits", [problem.omega[n][index[n]] for n in layers])]
    if "latency" in problem.cost:
        panels.append(("latency (ms)", [problem.cost["latency"][n][index[n]] for n in layers]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.22 * len(layers)), 2.2 * len(panels)), sharex=True)
    for ax, (label, values) in zip(axes, panels):
        ax.bar(range(len(layers)), values, color=["tab:orange" if solution.bits[n].w_bits == 4 else "tab:blue"
                                                  for n in layers])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[-1].set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    fig.tight_layout()
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
