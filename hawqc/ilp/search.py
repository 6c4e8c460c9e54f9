"""One call from a model and its sensitivity to a bit configuration (and a Pareto front)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hawqc.autotune.table import LatencyTable
from hawqc.bitconfig import LayerBits
from hawqc.ilp.solver import (
    DEFAULT_OPTIONS,
    EIGHT_BIT,
    Budget,
    Problem,
    Solution,
    build_problem,
    pareto,
    solve,
)


@dataclass(frozen=True)
class SearchResult:
    """The solution at the requested budgets, the Pareto front (if swept) and the problem solved."""

    solution: Solution | None
    front: list[Solution]
    front_metric: str | None
    problem: Problem


def search(model: Any, input_shape: Sequence[int], omega: Mapping[str, Mapping[int, float]], *,
           size: float | str | None = None, bops: float | str | None = None, latency: float | str | None = None,
           table: str | os.PathLike[str] | Mapping[tuple[str, int, int], float] | None = None,
           options: Sequence[LayerBits] = DEFAULT_OPTIONS, ties: Sequence[Sequence[str]] = (),
           pin_first_last: LayerBits | None = EIGHT_BIT, transition_ms: float = 0.0,
           pareto_points: int = 0, pareto_metric: str | None = None,
           activation_omega: Mapping[str, Mapping[int, float]] | None = None,
           any_machine: bool = False) -> SearchResult:
    """Solve the bit-allocation ILP of ``model`` (see :mod:`hawqc.ilp.solver`) for the budgets given
    (fractions in [0, 1] or absolute values, see :meth:`Budget.parse`), and sweep ``pareto_points``
    budgets of ``pareto_metric`` (default: the first budget's metric, else size) with the others held.
    ``omega`` (per weight width) and ``activation_omega`` (per activation width) are a
    :class:`~hawqc.ilp.sensitivity.Sensitivity`'s. A ``table`` file measured at other layer input
    shapes is refused, and one measured on another machine unless ``any_machine``."""

    budgets = [Budget.parse(m, v) for m, v in (("size", size), ("bops", bops), ("latency", latency)) if v is not None]
    if not budgets and not pareto_points:
        raise ValueError("give at least one budget (size, bops or latency) or a Pareto sweep")
    if latency is not None and table is None:
        raise ValueError("a latency budget needs a latency table (hawqc tune)")
    latencies = fitting_latencies(table, model, input_shape, any_machine) if isinstance(table, (str, os.PathLike)) \
        else table
    problem = build_problem(model, tuple(input_shape), omega, options=options, latency=latencies, ties=ties,
                            pin_first_last=pin_first_last, transition_ms=transition_ms,
                            activation_omega=activation_omega)
    solution = solve(problem, budgets) if budgets else None
    metric = pareto_metric or (budgets[0].metric if budgets else "size")
    front = pareto(problem, metric, pareto_points, [b for b in budgets if b.metric != metric]) if pareto_points else []
    return SearchResult(solution, front, metric if front else None, problem)


def fitting_latencies(path: str | os.PathLike[str], model: Any, input_shape: Sequence[int],
                      any_machine: bool = False) -> dict[tuple[str, int, int], float]:
    """The latencies of the table at ``path``, after checking it was measured at the input shapes
    ``model``'s layers see at ``input_shape`` (no batch dim) and, unless ``any_machine``, here."""
    from hawqc.autotune.measure import this_machine
    from hawqc.ilp.costs import layer_costs

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such latency table")
    table = LatencyTable.open(path)
    layer_inputs = {name: cost.input_shape for name, cost in layer_costs(model, tuple(input_shape)).items()}
    table.check_fits(layer_inputs, None if any_machine else this_machine())
    return table.latencies()
