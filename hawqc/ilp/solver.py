"""HAWQ-V3's bit-allocation ILP, solved with PuLP's bundled CBC.

One binary ``x[i, k]`` per layer ``i`` and bit option ``k`` (one option per layer); minimise
``Σ Ω_i(w_bits_k)`` subject to any of

- ``size``: weight bytes ``Σ params_i · w_bits / 8``;
- ``bops``: ``Σ MACs_i · w_bits · a_bits``;
- ``latency``: ``Σ latency_i(w_bits, a_bits)`` from a ``hawqc tune`` table, plus, optionally, a
  transition cost on every producer -> consumer edge whose two layers run different options
  (one pairwise variable ``z_e >= x[i, k] - x[j, k]`` per edge, i.e. the linearised ``1 - Σ_k x[i,k]·x[j,k]``).

Tied layers share one option (a ResNet's downsample conv and its block's first conv read the same
activation); pinned layers (first and last, by default) are fixed. A budget is absolute or a fraction
``f`` of the way from the cheapest configuration (every free layer at the cheapest option) to the
dearest (every layer at the dearest): ``size=0.5`` is halfway between uniform 4- and 8-bit.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawqc.bitconfig import BitConfig, LayerBits

METRICS = ("size", "bops", "latency")
UNITS = {"size": "bytes", "bops": "BOPS", "latency": "ms"}
_COUNT = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SUFFIX = {"size": {**_COUNT, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2.0**10, "mib": 2.0**20,
                    "gib": 2.0**30},
           "bops": {**_COUNT, "bops": 1.0, "kbops": 1e3, "mbops": 1e6, "gbops": 1e9, "tbops": 1e12},
           "latency": {"ms": 1.0, "us": 1e-3, "s": 1e3}}
"""Units of absolute budgets per metric (case-insensitive); a bare number is a fraction in [0, 1]."""
_EXAMPLE = {"size": "4MB", "bops": "3G", "latency": "1.5ms"}
DEFAULT_OPTIONS = (LayerBits(4, 4), LayerBits(4, 8), LayerBits(8, 8))
"""W4A4, W4A8 (4-bit weights on int8 kernels: most 4-bit deployments) and W8A8."""
EIGHT_BIT = LayerBits(8, 8)


@dataclass(frozen=True)
class Budget:
    """A limit on one metric: ``fraction`` of the way from the cheapest to the dearest config, or ``absolute``."""

    metric: str
    value: float
    fraction: bool

    @classmethod
    def parse(cls, metric: str, spec: float | str) -> Budget:
        """Text: ``0.5`` (a bare number, in [0, 1]) is a fraction; a value with its unit (``4MB``,
        ``2.5MiB``, ``1500000B``, ``3.1G``, ``1.2ms``) is absolute, in bytes, BOPS or milliseconds; a bare
        number above 1 is refused (``--size 1.5`` would be 1.5 bytes). A Python number above 1 is
        absolute, in the metric's unit (:data:`UNITS`)."""
        if metric not in METRICS:
            raise ValueError(f"unknown budget {metric!r}; choose one of {', '.join(METRICS)}")
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            if spec < 0:
                raise ValueError(f"{metric} budget must not be negative, got {spec!r}")
            return cls(metric, float(spec), spec <= 1.0)
        match = re.fullmatch(r"\s*(\d+\.?\d*(?:e[+-]?\d+)?|\.\d+)\s*([a-zA-Z]*)\s*", str(spec))
        unit = match.group(2).lower() if match else ""
        if not match or (unit and unit not in _SUFFIX[metric]):
            raise ValueError(f"{metric} budget {spec!r}: give a fraction in [0, 1] or a value with its unit, "
                             f"such as {_EXAMPLE[metric]}")
        number = float(match.group(1))
        if unit:
            return cls(metric, number * _SUFFIX[metric][unit], False)
        if number > 1.0:
            raise ValueError(f"{metric} budget {spec!r}: a bare number is a fraction in [0, 1]; give an "
                             f"absolute budget with its unit, such as {_EXAMPLE[metric]}")
        return cls(metric, number, True)


@dataclass
class Problem:
    """Everything the ILP needs; ``cost[metric][layer][k]`` is option ``k``'s cost of a layer."""

    layers: list[str]
    options: list[LayerBits]
    omega: dict[str, list[float]]
    cost: dict[str, dict[str, list[float]]]
    ties: list[list[str]] = field(default_factory=list)
    pins: dict[str, LayerBits] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    transition_ms: float = 0.0

    def __post_init__(self) -> None:
        known = set(self.layers)
        for group in self.ties:
            if set(group) - known:
                raise ValueError(f"tied layers not in the model: {', '.join(sorted(set(group) - known))}")
        for name, bits in self.pins.items():
            if name not in known:
                raise ValueError(f"pinned layer {name!r} is not in the model")
            if bits not in self.options:
                raise ValueError(f"pinned layer {name} asks for W{bits.w_bits}A{bits.a_bits}, not a search option")

    def total(self, metric: str, choice: Mapping[str, int]) -> float:
        """A metric's value for ``choice`` (layer -> option index), transitions included for latency."""
        value = sum(self.cost[metric][n][choice[n]] for n in self.layers)
        if metric == "latency":
            value += self.transition_ms * sum(choice[a] != choice[b] for a, b in self.edges)
        return value

    def extremes(self, metric: str) -> tuple[float, float]:
        """The metric at the cheapest (free layers at their cheapest option) and dearest config."""
        costs = self.cost[metric]
        low = {n: self.options.index(self.pins[n]) if n in self.pins else
               min(range(len(self.options)), key=lambda k: costs[n][k]) for n in self.layers}
        high = {n: max(range(len(self.options)), key=lambda k: costs[n][k]) for n in self.layers}
        return self.total(metric, low), self.total(metric, high)

    def limit(self, budget: Budget) -> float:
        if budget.metric not in self.cost:
            raise ValueError(f"a {budget.metric} budget needs {budget.metric} costs "
                             f"({'give a latency table' if budget.metric == 'latency' else 'none were given'})")
        if not budget.fraction:
            return budget.value
        low, high = self.extremes(budget.metric)
        return low + budget.value * (high - low)


@dataclass(frozen=True)
class Solution:
    """The chosen bits and the objective and metrics they reach."""

    bits: dict[str, LayerBits]
    omega: float
    metrics: dict[str, float]
    limits: dict[str, float]

    def bit_config(self) -> BitConfig:
        return BitConfig(layers=self.bits)


def solve(problem: Problem, budgets: Sequence[Budget]) -> Solution:
    """The configuration of least summed Ω within ``budgets``; ``ValueError`` when a budget cannot be met,
    naming the smallest value it could take."""
    limits = {b.metric: problem.limit(b) for b in budgets}
    status, choice = _run(problem, limits, objective="omega")
    if status != 1:
        raise ValueError(_infeasible_message(problem, limits))
    return Solution({n: problem.options[choice[n]] for n in problem.layers},
                    sum(problem.omega[n][choice[n]] for n in problem.layers),
                    {m: problem.total(m, choice) for m in problem.cost}, limits)


def pareto(problem: Problem, metric: str, points: int, others: Sequence[Budget] = ()) -> list[Solution]:
    """The distinct solutions at ``points`` budgets evenly spaced from the cheapest to the dearest
    config of ``metric`` (other budgets held); budgets that cannot be met, and budgets whose solution
    repeats an earlier one's bits, are left out."""
    if points < 2:
        raise ValueError(f"a Pareto sweep needs at least 2 points, got {points}")
    front: list[Solution] = []
    for i in range(points):
        try:
            solution = solve(problem, [*others, Budget(metric, i / (points - 1), True)])
        except ValueError:
            continue
        if all(solution.bits != earlier.bits for earlier in front):
            front.append(solution)
    if not front:
        raise ValueError(f"no {metric} budget of the sweep can be met with the other budgets")
    return front


def _run(problem: Problem, limits: Mapping[str, float], objective: str) -> tuple[int, dict[str, int]]:
    """Build and solve the ILP; ``objective`` is ``"omega"`` or a metric to minimise."""
    import pulp

    layers, options = problem.layers, range(len(problem.options))
    ilp = pulp.LpProblem("hawqc_bits", pulp.LpMinimize)
    x = {(n, k): ilp.add_variable(f"x_{i}_{k}", cat="Binary") for i, n in enumerate(layers) for k in options}
    index = {n: i for i, n in enumerate(layers)}
    z = {e: ilp.add_variable(f"z_{index[e[0]]}_{index[e[1]]}", lowBound=0, upBound=1) for e in problem.edges} \
        if problem.transition_ms else {}

    def expression(metric: str) -> Any:
        terms = pulp.lpSum(problem.cost[metric][n][k] * x[n, k] for n in layers for k in options)
        return terms + problem.transition_ms * pulp.lpSum(z.values()) if metric == "latency" else terms

    if objective == "omega":
        ilp += pulp.lpSum(problem.omega[n][k] * x[n, k] for n in layers for k in options)
    else:
        ilp += expression(objective)
    for n in layers:
        ilp += pulp.lpSum(x[n, k] for k in options) == 1
    for group in problem.ties:
        for other in group[1:]:
            for k in options:
                ilp += x[group[0], k] == x[other, k]
    for n, bits in problem.pins.items():
        ilp += x[n, problem.options.index(bits)] == 1
    for (a, b), var in z.items():
        for k in options:
            ilp += var >= x[a, k] - x[b, k]
    for metric, limit in limits.items():
        ilp += expression(metric) <= limit * (1 + 1e-9) + 1e-9
    with warnings.catch_warnings():  # PuLP 3 deprecates its bundled CBC (still the one without a binary to install)
        warnings.simplefilter("ignore", DeprecationWarning)
        status = ilp.solve(pulp.PULP_CBC_CMD(msg=False))
    if status != 1:
        return status, {}
    return status, {n: next(k for k in options if x[n, k].value() > 0.5) for n in layers}


def _infeasible_message(problem: Problem, limits: Mapping[str, float]) -> str:
    for metric, limit in limits.items():
        _, choice = _run(problem, {}, objective=metric)
        smallest = problem.total(metric, choice)
        if smallest > limit * (1 + 1e-9) + 1e-9:
            low, high = problem.extremes(metric)
            fraction = (smallest - low) / (high - low) if high > low else 0.0
            return (f"{metric} budget {_shown(metric, limit)} cannot be met: the smallest achievable is "
                    f"{_shown(metric, smallest)} (fraction {fraction:.3f}) with the pinned and tied layers")
    return "the budgets " + ", ".join(f"{m} {_shown(m, v)}" for m, v in limits.items()) + " cannot be met together"


def _shown(metric: str, value: float) -> str:
    if metric == "size":
        return f"{value:,.0f} bytes"
    if metric == "bops":
        return f"{value:.4g} BOPS"
    return f"{value:.4g} ms"


# ---- problem inputs from a model --------------------------------------------------------------------
def resnet_ties(model: Any) -> list[list[str]]:
    """``[block.conv1, block.downsample.0]`` for every residual block with a downsample conv."""
    from torch import nn

    ties = []
    for name, module in model.named_modules():
        downsample = getattr(module, "downsample", None)
        if isinstance(downsample, nn.Sequential) and isinstance(getattr(module, "conv1", None), nn.Conv2d) \
                and len(downsample) and isinstance(downsample[0], nn.Conv2d):
            prefix = f"{name}." if name else ""
            ties.append([f"{prefix}conv1", f"{prefix}downsample.0"])
    return ties


def layer_edges(model: Any) -> list[tuple[str, str]]:
    """Producer -> consumer pairs of quantizable layers (through pools, adds, ReLUs and concats)."""
    from hawqc.quant.capture import capture

    nodes = capture(model.eval())
    sources: dict[str, set[str]] = {}
    edges = []
    for node in nodes:
        upstream = set().union(*(sources[i] for i in node.inputs)) if node.inputs else set()
        if node.kind in ("conv", "dense"):
            edges += [(u, node.layer) for u in sorted(upstream)]
            sources[node.name] = {node.layer}
        else:
            sources[node.name] = upstream
    return edges


def read_latency_table(path: str | os.PathLike[str]) -> dict[tuple[str, int, int], float]:
    """``(layer, w_bits, a_bits) -> latency_ms`` from a ``hawqc tune`` table."""
    from hawqc.autotune.table import LatencyTable

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such latency table")
    return LatencyTable.open(path).latencies()


def build_problem(model: Any, input_shape: tuple[int, ...], omega: Mapping[str, Mapping[int, float]], *,
                  options: Sequence[LayerBits] = DEFAULT_OPTIONS,
                  latency: Mapping[tuple[str, int, int], float] | None = None,
                  ties: Sequence[Sequence[str]] = (), pin_first_last: LayerBits | None = EIGHT_BIT,
                  transition_ms: float = 0.0, activation_omega: Mapping[str, Mapping[int, float]] | None = None,
                  ) -> Problem:
    """The ILP of a model: costs measured at ``input_shape`` (no batch dim), ResNet ties found from
    the structure plus ``ties``, first and last layer pinned to ``pin_first_last`` (``None``: free).
    An option's Ω is ``omega[layer][w_bits]``, plus ``activation_omega[layer][a_bits]`` when given."""
    from hawqc.ilp.costs import layer_costs

    costs = layer_costs(model, input_shape)
    layers = list(costs)
    options = list(options)
    missing = [n for n in layers if n not in omega]
    if missing:
        raise ValueError(f"no sensitivity for {len(missing)} layers (first: {missing[0]}): recompute it for this model")
    try:
        omega_k = {n: [float(omega[n][o.w_bits]) + (float(activation_omega[n][o.a_bits]) if activation_omega else 0.0)
                       for o in options] for n in layers}
    except KeyError as err:
        raise ValueError(f"the sensitivity has no Ω for {err.args[0]}-bit weights or activations: compute it "
                         "with those bits") from None
    cost = {"size": {n: [c.params * o.w_bits / 8 for o in options] for n, c in costs.items()},
            "bops": {n: [c.macs * o.w_bits * o.a_bits for o in options] for n, c in costs.items()}}
    if latency is not None:
        rows = {(n, o): _latency_row(latency, n, o) for n in layers for o in options}
        absent = [f"{n} W{o.w_bits}A{o.a_bits}" for (n, o), ms in rows.items() if ms is None]
        if absent:
            raise ValueError(f"the latency table lacks {len(absent)} layer/bit pairs (first: {absent[0]}): "
                             "tune those layers with hawqc tune")
        cost["latency"] = {n: [rows[n, o] for o in options] for n in layers}
    pins = {layers[0]: pin_first_last, layers[-1]: pin_first_last} if pin_first_last is not None and layers else {}
    groups = _merge_groups([*resnet_ties(model), *(list(g) for g in ties)])
    return Problem(layers, options, omega_k, cost, groups, pins,
                   layer_edges(model) if transition_ms else [], transition_ms)


def _latency_row(latency: Mapping[tuple[str, int, int], float], layer: str, bits: LayerBits) -> float | None:
    """A layer's latency at ``bits``; 4-bit weights with 8-bit activations run the int8 kernels, so
    without a row of their own they take the W8A8 row."""
    own = latency.get((layer, bits.w_bits, bits.a_bits))
    if own is None and bits.w_bits < bits.a_bits == 8:
        return latency.get((layer, 8, 8))
    return own


def _merge_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Union overlapping tie groups."""
    merged: list[set[str]] = []
    for group in groups:
        current = set(group)
        for other in [m for m in merged if m & current]:
            current |= other
            merged.remove(other)
        merged.append(current)
    return [sorted(g) for g in merged if len(g) > 1]
