"""An activation of a conv's real output, quantized: a step function of its integer accumulator.

NNCF applies Sigmoid, SiLU (``x * sigmoid(x)``), HardSwish, HardSigmoid... to a convolution's float
output and quantizes only after it. What the file means, for each output channel, is

    q(acc) = clip(rint(f(y) / S_out) + zero_point, qmin, qmax),   y = clip((acc + fraction) * S_acc, lo, hi)

(``rint`` half to even, float64 as the oracle computes it), with ``acc`` the int32 accumulator,
``S_acc = S_in * S_w`` and ``fraction`` the bias below its integer grid. For an ``f`` that falls then
rises (one minimum, or none: monotone) ``q`` falls then rises with ``acc``, so it is a count of integer
thresholds crossed, found once at compile time by bisection on ``q`` itself (no second rounding):

    q = base + #{k : acc > up[k]} + #{j : acc < down[j]}

``up`` ascending (the accumulators just below each step up, right of the minimum), ``down`` descending
(just above each step up, left of it), each row padded to a power of two with thresholds never crossed.
:func:`count_thresholds` evaluates it with a branchless binary search (``log2`` of the row length
gathers and compares per element), written once for numpy arrays and Relax expressions (``let`` for
expressions that must bind the index once).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHAPE_RANGE, SHAPE_POINTS = 64.0, 2**16 + 1
"""Where ``f`` is checked to fall then rise, and how densely (real units, after the clip)."""


@dataclass(frozen=True)
class Thresholds:
    """Per output channel: ``base`` (C,), ``up`` (C, Lu) and ``down`` (C, Ld), int32."""

    base: np.ndarray
    up: np.ndarray
    down: np.ndarray


def output_codes(acc: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], s_acc: np.ndarray, fraction: np.ndarray,
                 s_out: Any, zero_point: int, qmin: int, qmax: int, lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    """``q(acc)`` (module docstring) in float64; ``acc`` (C, ...) against per-channel ``s_acc``, ``fraction`` and
    ``s_out`` (float32, or one for all)."""
    shape = (-1,) + (1,) * (np.ndim(acc) - 1)
    y = (np.asarray(acc, np.float64) + np.reshape(fraction, shape)) * np.reshape(s_acc, shape)
    step = np.asarray(np.asarray(s_out, np.float32), np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.asarray(fn(np.clip(y, lo, hi)), np.float64) / (np.reshape(step, shape) if step.size > 1 else step)
    return np.clip(np.rint(np.nan_to_num(v, posinf=2.0**40, neginf=-(2.0**40))) + zero_point, qmin, qmax).astype(np.int64)


def activation_thresholds(fn: Callable[[np.ndarray], np.ndarray], s_acc: Any, fraction: Any, s_out: Any,
                          zero_point: int, qmin: int, qmax: int, lo: float = -np.inf, hi: float = np.inf) -> Thresholds:
    """The thresholds of ``q`` (module docstring) for per-channel ``s_acc`` (float64, exact: a product of
    float32 scales), ``fraction`` (or None) and ``s_out`` (or one for all). Raises ``ValueError`` if ``f`` does
    not fall then rise."""
    s_acc = np.atleast_1d(np.asarray(s_acc, np.float64))
    fraction = np.zeros_like(s_acc) if fraction is None else np.broadcast_to(np.asarray(fraction, np.float64), s_acc.shape)
    s_out = np.broadcast_to(np.asarray(s_out, np.float32), s_acc.shape)
    code = lambda a, rows=slice(None): output_codes(a, fn, s_acc[rows], fraction[rows], s_out[rows], zero_point,  # noqa: E731
                                                    qmin, qmax, lo, hi)
    y_min = _minimum(fn, lo, hi)
    split = np.clip(np.ceil(y_min / s_acc - fraction), INT32_MIN, INT32_MAX).astype(np.int64)  # first acc of the rise
    at_split, left_of = code(split), code(np.maximum(split - 1, INT32_MIN))
    base = np.where(split > INT32_MIN, np.minimum(at_split, left_of), at_split)
    rise = code(np.full_like(split, INT32_MAX)) - base
    fall = np.where(split > INT32_MIN, code(np.full_like(split, INT32_MIN)) - base, 0)
    levels = base[:, None] + 1 + np.arange(max(int(rise.max()), int(fall.max()), 0))[None, :]
    up = _bisect(code, levels, split[:, None] - 1, np.int64(INT32_MAX) + 1, rising=True) - 1
    down = _bisect(code, levels, np.int64(INT32_MIN) - 1, split[:, None], rising=False) + 1
    up = np.where(np.arange(levels.shape[1]) < rise[:, None], up, INT32_MAX)[:, :int(rise.max(initial=0))]
    down = np.where(np.arange(levels.shape[1]) < fall[:, None], down, INT32_MIN)[:, :int(fall.max(initial=0))]
    return Thresholds(base.astype(np.int32), _padded(up, INT32_MAX), _padded(down, INT32_MIN))


def _minimum(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """Where ``f`` (clipped to [lo, hi]) is smallest, checked to fall before and rise after on a dense grid;
    ``-inf`` where it only rises."""
    y = np.clip(np.linspace(-SHAPE_RANGE, SHAPE_RANGE, SHAPE_POINTS), lo, hi)
    with np.errstate(over="ignore"):
        v = np.asarray(fn(y), np.float64)
    i = int(np.argmin(v))
    if np.any(np.diff(v[:i + 1]) > 0) or np.any(np.diff(v[i:]) < 0):
        raise ValueError("the activation does not fall then rise: it has no threshold form")
    if i == 0:
        return -np.inf
    a, b = y[max(i - 1, 0)], y[min(i + 1, len(y) - 1)]
    for _ in range(100):  # golden section, to float64 resolution
        m1, m2 = a + (b - a) * 0.381966, b - (b - a) * 0.381966
        a, b = (a, m2) if fn(np.float64(m1)) <= fn(np.float64(m2)) else (m1, b)
    return float((a + b) / 2)


def _bisect(code: Callable[..., np.ndarray], levels: np.ndarray, below: Any, above: Any, rising: bool) -> np.ndarray:
    """Per channel and level, on the side of the minimum where ``code`` rises (falls) with ``acc``: the first
    (last) ``acc`` in ``(below, above)`` with ``code >= level``; ``above`` (``below``) where none is."""
    lo, hi = np.broadcast_to(below, levels.shape).astype(np.int64), np.broadcast_to(above, levels.shape).astype(np.int64)
    rows = np.arange(levels.shape[0])[:, None]
    while np.any(hi - lo > 1):
        mid = lo + (hi - lo) // 2
        inside = hi - lo > 1
        reached = code(mid, rows) >= levels
        toward_hi = ~reached if rising else reached  # the answer lies above mid
        lo, hi = np.where(inside & toward_hi, mid, lo), np.where(inside & ~toward_hi, mid, hi)
    return hi if rising else lo


def _padded(rows: np.ndarray, never: int) -> np.ndarray:
    """Rows padded with ``never`` to a power-of-two length with at least one ``never`` (or 0 columns if empty)."""
    if rows.shape[1] == 0:
        return rows.astype(np.int32)
    length = 1 << rows.shape[1].bit_length()
    return np.pad(rows, ((0, 0), (0, length - rows.shape[1])), constant_values=never).astype(np.int32)


@dataclass(frozen=True)
class CountOps:
    """The operators :func:`count_thresholds` is written with, for one kind of expression: ``take`` gathers
    from a flat table, ``crossed(cond, step)`` is ``step`` where ``cond`` holds and 0 elsewhere, ``let(value,
    body)`` is ``body(value)`` with ``value`` computed once (a TIR ``Let``; plain arrays need nothing)."""

    take: Callable[[Any, Any], Any] = lambda table, index: table[index]
    greater: Callable[[Any, Any], Any] = operator.gt
    less: Callable[[Any, Any], Any] = operator.lt
    crossed: Callable[[Any, int], Any] = lambda cond, step: cond * np.int32(step)
    add: Callable[[Any, Any], Any] = operator.add
    subtract: Callable[[Any, Any], Any] = operator.sub
    let: Callable[[Any, Callable[[Any], Any]], Any] = lambda value, body: body(value)


def count_thresholds(acc: Any, base: Any, up: tuple[Any, Any, int], down: tuple[Any, Any, int],
                     ops: CountOps = CountOps()) -> Any:
    """``base + #{acc > up} + #{acc < down}`` per element: ``up``/``down`` are ``(flat table, row start of each
    element's channel, row length)``, each row sorted (ascending/descending) and ending in a threshold never
    crossed; a branchless binary search (``index += step`` where the threshold at ``index + step - 1`` is
    crossed, for ``step`` = length/2, ..., 1), then ``index - row start`` is the count."""

    def search(index: Any, step: int, table: Any, compare: Callable[[Any, Any], Any], then: Callable[[Any], Any]) -> Any:
        if not step:
            return then(index)
        crossed = ops.crossed(compare(acc, ops.take(table, ops.add(index, step - 1))), step)
        return ops.let(ops.add(index, crossed), lambda i: search(i, step // 2, table, compare, then))

    def count(total: Any, side: tuple[Any, Any, int], compare: Callable[[Any, Any], Any],
              then: Callable[[Any], Any]) -> Any:
        table, start, length = side
        if not length:
            return then(total)
        return search(start, length // 2, table, compare, lambda index: then(ops.add(total, ops.subtract(index, start))))

    return count(base, up, ops.greater, lambda total: count(total, down, ops.less, lambda result: result))
