"""Dyadic requantization: the one rescaling rule of hawqc.

HAWQ-V3 replaces every floating-point rescale of an integer accumulator by a
dyadic number b / 2^c, so that a deployed graph only multiplies, shifts and
clips integers. This module is the single implementation of that rule; the
PyTorch integer simulation, the numpy reference executor and the Relax lowering
all call it.

Scale ratio
    For an accumulator with scale ``S_in * S_w`` requantized to scale ``S_out`` the ratio is
    what a QDQ file means (its float64 oracle, :mod:`hawqc.frontend.oracle`)::

        ratio = float64(S_in) * float64(S_w) / float64(S_out)

    with the scales as the float32 numbers the file stores. The product of two float32 numbers is
    exact in float64, so the ratio carries one float64 rounding (relative error 2^-53), far below
    the 2^-31 of its dyadic form.

Dyadic approximation ``dyadic(ratio) -> (b, c)``
    With ``ratio = m * 2^e`` and ``m`` in [0.5, 1) (``frexp``), ``c = 31 - e`` and
    ``b = round(m * 2^31)`` (round half to even on the exact float), so ``b`` is an
    int32 in [2^30, 2^31). If ``m * 2^31`` rounds up to 2^31 then ``b = 2^30`` and
    ``c`` is one smaller, which is the same number. The error is at most half a
    unit of ``b``: ``|b / 2^c - ratio| <= ratio * 2^-31``. ``c`` must lie in
    [1, 62], i.e. ``2^-32 <= ratio < 2^30``.

Requantization ``requantize(acc, b, c, qmin, qmax)``
    ``clip(round_shift(acc * b, c), qmin, qmax)`` with an int64 product, where
    ``round_shift(x, c) = (x + 2^(c-1) - 1 + ((x >> c) & 1)) >> c`` (arithmetic, flooring
    shifts) is ``x / 2^c`` rounded **half to even** (2.5 -> 2, 3.5 -> 4, -2.5 -> -2): the rule of
    ONNX ``QuantizeLinear``, of ``torch.round`` and ``numpy.rint``, so hawqc's float quantizers,
    its integer graph and its QDQ exports all round alike. (HAWQ's released code rounds half to
    even in PyTorch but half up in TVM.) :func:`round_shift` is written once, with the
    operators passed in, for numpy arrays, torch tensors, TIR and Relax expressions; every
    kernel epilogue calls it. The same :func:`requantize` serves numpy arrays and torch tensors,
    bit for bit. Asymmetric
    tensors (zero points, as other tools produce) subtract the input zero point from
    ``acc`` first and add the output zero point after the shift, before the clip.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import torch

    Array = Union[np.ndarray, torch.Tensor]
else:
    Array = Any

B_BITS = 31
"""b is an int32 in [2^(B_BITS-1), 2^B_BITS)."""
C_MIN, C_MAX = 1, 62
"""Allowed range of the shift c."""
INT64_MAX = 2**63 - 1


def scale_ratio(s_in: Any, s_w: Any, s_out: Any, exact_w: bool = False) -> np.ndarray:
    """The requantization ratio ``S_in*S_w / S_out`` of float32 scales, formed in float64.

    ``float64(S_in) * float64(S_w) / float64(S_out)`` (the product is exact); broadcasts, so a
    per-channel ``s_w`` gives per-channel ratios. With ``exact_w``, ``s_w`` is taken in float64 as
    given, not rounded to float32: the exact gain of a per-channel affine map (a BatchNormalization
    that no conv absorbs) or a resize's weight denominator.
    """
    f64 = [np.asarray(np.asarray(s, dtype=np.float32), dtype=np.float64) for s in (s_in, s_w, s_out)]
    if exact_w:
        f64[1] = np.asarray(s_w, dtype=np.float64)
    return f64[0] * f64[1] / f64[2]


@dataclass(frozen=True)
class ShiftOps:
    """The operators :func:`round_shift` is written with, for one kind of expression."""

    add: Callable[[Any, Any], Any] = operator.add
    right_shift: Callable[[Any, Any], Any] = operator.rshift
    bit_and: Callable[[Any, Any], Any] = operator.and_
    one: Any = 1
    multiply: Callable[[Any, Any], Any] = operator.mul


def rounding_bias(c: Any, tie_window: int = 0) -> np.ndarray:
    """``2^(c-1) - 1 - tie_window``, int64: the constant :func:`round_shift` adds before its shift."""
    return np.left_shift(np.int64(1), np.asarray(c, dtype=np.int64) - 1) - 1 - tie_window


def round_shift(x: Any, c: Any, bias: Any, ops: ShiftOps = ShiftOps(), tie_window: int = 0) -> Any:
    """``x / 2^c`` rounded half to even, for integers ``x`` (int64) and shifts ``c >= 1``:
    ``(x + bias + ((x >> c) & 1)) >> c`` with ``bias = rounding_bias(c)``.

    With ``x = q*2^c + r`` (``0 <= r < 2^c``) the sum reaches ``(q+1)*2^c`` exactly when
    ``r > 2^(c-1)``, or ``r = 2^(c-1)`` and ``q`` is odd. The default ``ops`` serve numpy
    arrays, torch tensors and TIR expressions; Relax passes its own.

    With a ``tie_window`` ``w`` (and ``bias = rounding_bias(c, w)``) every ``r`` within ``w`` of ``2^(c-1)``
    counts as the tie (the parity is weighted ``2w + 1``): ``x`` is then an approximation, within ``w``, of a
    value that lies exactly on the tie or at least ``2w`` from it (:func:`tie_window`).
    """
    parity = ops.bit_and(ops.right_shift(x, c), ops.one)
    if tie_window:
        parity = ops.multiply(parity, 2 * tie_window + 1)
    return ops.right_shift(ops.add(ops.add(x, bias), parity), c)


def dyadic_per_channel(ratios: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`dyadic`: int32 arrays ``(b, c)`` of the shape of ``ratios``."""
    r = np.asarray(ratios, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"dyadic: scale ratio must be finite, got {_first_bad(r, ~np.isfinite(r))}")
    if np.any(r <= 0):
        raise ValueError(f"dyadic: scale ratio must be > 0, got {_first_bad(r, r <= 0)}")
    mantissa, exponent = np.frexp(r)
    b = np.rint(np.ldexp(mantissa, B_BITS)).astype(np.int64)
    c = (B_BITS - exponent).astype(np.int64)
    carry = b == 2**B_BITS
    b = np.where(carry, 2 ** (B_BITS - 1), b)
    c = np.where(carry, c - 1, c)
    out_of_range = (c < C_MIN) | (c > C_MAX)
    if np.any(out_of_range):
        raise ValueError(
            f"dyadic: scale ratio {_first_bad(r, out_of_range)} needs a shift c={_first_bad(c, out_of_range)} "
            f"outside [{C_MIN}, {C_MAX}]; representable ratios lie in about [2^-32, 2^30)"
        )
    return b.astype(np.int32), c.astype(np.int32)


def dyadic(ratio: float) -> tuple[int, int]:
    """Dyadic approximation ``b / 2^c`` of a positive ratio (see module docstring)."""
    b, c = dyadic_per_channel(np.float64(ratio))
    return int(b), int(c)


def aligned_multipliers(scales: list[Any], s_out: Any, magnitudes: list[int]) -> tuple[list[np.ndarray], int]:
    """Integers ``m_i`` (int64, shaped like ``scales[i]``) and one shift ``c`` such that
    ``sum_i x_i * m_i`` is ``sum_i x_i * scales[i] / s_out`` on a grid ``2^c`` times finer than the
    output's, for inputs with ``|x_i| <= magnitudes[i]``: an Add of tensors of different scales,
    rounded once by :func:`requantize` (``b = 1``).

    ``scales`` are exact in float64 (a float32 scale, or the product of two) or exact rationals
    (``Fraction``, alone or in an object array); ``m_i`` is the exact rational ``scales[i] / s_out * 2^c``
    rounded half to even, so each term is off by at most ``|x_i| * 2^-(c+1)`` output steps. ``c`` is the
    largest shift (at most 62) for which the int64 sum and its rounding cannot overflow: about 53 for two
    8-bit inputs of similar scales.
    """
    ratios = _exact_ratios(scales, s_out)
    c = _largest_shift(ratios, magnitudes)
    return _multipliers(ratios, scales, c), c


def _largest_shift(ratios: list[list[Any]], magnitudes: list[int]) -> int:
    """The largest ``c`` (at most ``C_MAX``) for which ``sum_i magnitudes[i] * ratios[i] * 2^c`` and its rounding fit int64."""
    c = C_MAX
    while c > C_MIN:
        worst = sum(mag * math.ceil(max(abs(v) for v in r) * 2**c) for mag, r in zip(magnitudes, ratios))
        if worst + (1 << (c - 1)) <= INT64_MAX:
            break
        c -= 1
    return c


def exact_product(a: Any, b: Any) -> np.ndarray:
    """``a * b`` elementwise (broadcast) as exact rationals (``Fraction``, an object array) of float64 numbers:
    the real value of a constant ``a`` in units of a scale ``b``, for :func:`aligned_multipliers`."""
    from fractions import Fraction

    x, y = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    out = np.empty(x.shape, dtype=object)
    for index in np.ndindex(x.shape):
        out[index] = Fraction(float(x[index])) * Fraction(float(y[index]))
    return out


def _multipliers(ratios: list[list[Any]], scales: list[Any], c: int) -> list[np.ndarray]:
    """Each exact ratio times ``2^c``, rounded half to even, int64, shaped like its scale."""
    return [np.array([round(v * 2**c) for v in r], dtype=np.int64).reshape(np.shape(s)) for r, s in zip(ratios, scales)]


def tie_window(scales: list[Any], s_out: Any, magnitudes: list[int], multipliers: list[np.ndarray], c: int) -> int:
    """The ``tie_window`` of :func:`round_shift` that makes the aligned sum of :func:`aligned_multipliers` round
    exactly half to even, or 0 where no real sum can lie on a tie or the grid is too coarse to tell.

    The real sum is ``S / D`` (``D`` the common denominator of the exact ratios ``scales[i] / s_out``, per
    channel): on a tie exactly when ``2S = D (mod 2D)``, which needs ``D`` even, else at least ``1/(2D)``
    steps from one. The integer sum is off by at most ``E = sum_i magnitudes[i] * |m_i - ratio_i * 2^c|``
    units of ``2^-c``; with ``2^c > 4 * D * E`` a window of ``E`` holds every tie and nothing else."""
    ratios = _exact_ratios(scales, s_out)
    channels = max(np.size(m) for m in multipliers)
    window, denominators = 0, []
    for k in range(channels):
        rs = [r[k % len(r)] for r in ratios]
        error = sum(mag * abs(int(np.ravel(m)[k % np.size(m)]) - r * 2**c)
                    for mag, m, r in zip(magnitudes, multipliers, rs))
        denominators.append(math.lcm(*(r.denominator for r in rs)))
        window = max(window, math.ceil(error) if denominators[-1] % 2 == 0 else 0)
    if window == 0 or any(4 * d * window >= 2**c for d in denominators):
        return 0
    return window


def pool_multipliers(s_in: Any, s_out: Any, divisors: Any, magnitude: int) -> tuple[np.ndarray, int, int]:
    """An average pool's rescale, exact: ``(m, c, window)`` with which ``requantize(sum * m, 1, c,
    tie_window=window)`` is the window sum times ``s_in / (s_out * divisor)`` rounded once, half to even, for
    every ``|sum| <= magnitude``. ``m`` (int64) has the shape of ``divisors`` (one per output position where
    they differ); ``s_in / s_out`` is the exact ratio of the file's float32 scales, or an exact float64 ratio
    with ``s_out = 1``.

    The Add's rule with one input (:func:`tie_window`): the exact rational ratio ``A / D`` on a grid ``2^c``
    times finer than the output's, ``c`` the smallest with ``2^c > 2 * D * magnitude`` (then every sum rounds
    exactly: off by at most ``magnitude / 2`` units, a tie held by the window, any other sum ``2^c / (2D)``
    units from one) but at least 32 (where the cheaper :func:`high_word_form` may apply), or the largest
    that fits int64 where that is less. A sum on a tie is ``D/2`` modulo ``D`` (``D`` even): the window is 0
    where no sum reaches one. A 31-bit dyadic ratio instead rounds a sum that lies exactly on a tie (``1/36``
    of a 6x6 window's sums, for one scale in and out) by the sign of its own error."""
    from fractions import Fraction

    ratio = Fraction(float(np.float64(s_in)))
    scale = np.empty(np.shape(divisors), dtype=object)
    for index, d in np.ndenumerate(np.asarray(divisors)):
        scale[index] = ratio / int(d)
    ratios = _exact_ratios([scale], s_out)
    denominators = [r.denominator for r in ratios[0]]
    exact = (2 * math.lcm(*denominators) * magnitude).bit_length()
    c = min(max(exact, 32), _largest_shift(ratios, [magnitude]))
    (m,) = _multipliers(ratios, [scale], c)
    if all(d % 2 or d // 2 > magnitude for d in denominators):  # a tie needs a sum of D/2 (mod D): none here
        return m, c, 0
    return m, c, tie_window([scale], s_out, [magnitude], [m], c)


def _exact_ratios(scales: list[Any], s_out: Any) -> list[list[Any]]:
    """``scales[i] / s_out`` as exact rationals (``s_out`` a float32 scale), flattened per input."""
    from fractions import Fraction

    out = Fraction(float(np.float32(s_out)))

    def exact(v: Any) -> Fraction:
        return v if isinstance(v, Fraction) else Fraction(float(v))

    return [[exact(v) / out for v in np.asarray(s, dtype=object).ravel()] for s in scales]


def requantize(
    acc: Array, b: Any, c: Any, qmin: int, qmax: int, axis: int | None = None,
    input_zero_point: int = 0, zero_point: int = 0, offset: Any = 0, tie_window: int = 0,
) -> Array:
    """``clip(round_shift((acc - z_in)*b + offset, c) + z_out, qmin, qmax)`` on a numpy array or torch tensor.

    ``acc`` is an integer accumulator; ``b``, ``c`` and ``offset`` are scalars or arrays
    broadcastable to it, or 1-D per-channel arrays along ``axis``. The zero points
    are for asymmetric tensors (HAWQ-V3 itself uses none). ``offset`` (int64, in units of
    ``2^-c`` output steps) carries what an accumulator holds below its integer grid: the fraction of
    a bias whose scale is not the accumulator's (:func:`bias_in_accumulator`). ``tie_window``: see
    :func:`round_shift` (an aligned Add's, :func:`tie_window`). Returns int32 of the same
    kind (numpy or torch) as ``acc``. Raises ``ValueError`` if ``b``/``c`` are not a
    valid dyadic pair or ``acc`` could overflow the int64 product.
    """
    b64, c64 = _check_dyadic_pair(b, c)
    offset64 = np.asarray(offset, dtype=np.int64)
    if not -(2**31) <= qmin <= qmax <= 2**31 - 1:
        raise ValueError(f"requantize: need int32 bounds with qmin <= qmax, got [{qmin}, {qmax}]")
    torch_mod = _torch_if_tensor(acc)
    if torch_mod is None:
        acc = np.asarray(acc)
        _check_integer(acc.dtype.kind in "iu", acc.dtype)
        x, consts = acc.astype(np.int64), [b64, c64, rounding_bias(c64, tie_window), offset64]
    else:
        _check_integer(not acc.dtype.is_floating_point and not acc.dtype.is_complex, acc.dtype)
        x = acc.to(torch_mod.int64)
        consts = [torch_mod.as_tensor(v, device=acc.device) for v in (b64, c64, rounding_bias(c64, tie_window), offset64)]
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        consts = [v.reshape(shape) for v in consts]
    b_, c_, bias, offset_ = consts
    x = x - input_zero_point
    _check_no_overflow(_abs_max(x), int(b64.max()), int(c64.max()), int(np.abs(offset64).max(initial=0)) + tie_window)
    y = (round_shift(x * b_ + offset_, c_, bias, tie_window=tie_window) + zero_point).clip(qmin, qmax)
    return y.astype(np.int32) if torch_mod is None else y.to(torch_mod.int32)


def exact_requantization(ratios: list[Any], fraction: Any, b: np.ndarray, c: np.ndarray, offset: np.ndarray,
                         lo: int, hi: int, max_levels: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """``(b, offset)`` (per channel, int64) with which :func:`requantize` rounds every accumulator exactly as its
    real value ``(acc + fraction) * ratio`` (``ratios``: exact rationals per channel), half to even, wherever
    the output lies in ``[lo, hi]`` (before the zero point).

    A 31-bit ``b`` is off by up to ``|acc| * 2^-(c+1)`` units of ``2^-c``: about 1e-8 output steps at 100
    steps, so a real value that close to a rounding boundary, or exactly on a tie, may round the other way.
    The output changes only at the boundaries ``y - 1/2``, ``y`` in ``(lo, hi]``: the accumulators next to
    one within a margin of twice the error ``b`` within 2 of its ideal could make (found in float64, checked
    in exact arithmetic) are the only ones that can differ; where one does, ``offset`` (then ``b``, by one
    or two) moves to the nearest value that puts all of them on their exact side while the error bound stays
    below the margin of every other accumulator. Output ranges wider than ``max_levels`` are left as they are."""
    from fractions import Fraction

    shape = np.shape(b)
    b, c = np.array(np.broadcast_to(b, shape), np.int64).ravel(), np.broadcast_to(c, shape).astype(np.int64).ravel()
    offset = np.array(np.broadcast_to(offset, shape), np.int64).ravel()
    if hi - lo > max_levels or hi <= lo:
        return b.reshape(shape), offset.reshape(shape)
    exact = [ratios[k % len(ratios)] for k in range(b.size)]
    r = np.array([float(v) for v in exact])
    f = np.broadcast_to(np.asarray(np.zeros(1) if fraction is None else fraction, np.float64), b.shape)
    reach = (max(abs(lo), abs(hi)) + 1) / r + 2

    def error_steps(bb: np.ndarray, oo: np.ndarray) -> np.ndarray:  # a bound on |computed - real| for |acc| <= reach
        scale = np.ldexp(1.0, c)
        return (reach * np.abs(bb - r * scale) + np.abs(oo - f * r * scale) + 2) / scale

    margin = 2 * (3 * reach + np.abs(offset - f * r * np.ldexp(1.0, c)) + 8) / np.ldexp(1.0, c) + 1e-12  # room for b +- 2
    boundaries = np.arange(lo + 1, hi + 1) - 0.5
    x = boundaries[None, :] / r[:, None] - f[:, None]
    near = np.abs(x - np.rint(x)) * r[:, None] < margin[:, None]
    for k in np.unique(np.nonzero(near)[0]):
        accs = sorted({int(np.floor(v)) + d for v in x[k][near[k]] for d in (0, 1)})
        real = [round((acc + Fraction(float(f[k]))) * exact[k]) for acc in accs]  # round(): half to even
        fixed = _exact_constants(accs, real, int(b[k]), int(offset[k]), int(c[k]))
        if fixed is not None and error_steps(np.array(fixed[0]), np.array(fixed[1]))[k] < margin[k]:
            b[k], offset[k] = fixed
    return b.reshape(shape), offset.reshape(shape)


def _exact_constants(accs: list[int], real: list[int], b: int, offset: int, c: int) -> tuple[int, int] | None:
    """``(b', offset')`` nearest ``(b, offset)`` with ``round_shift(acc * b' + offset', c) == real`` for every
    ``acc``, or None; ``b'`` within 2 of ``b`` and a valid multiplier."""
    half = 1 << (c - 1)
    for db in (0, -1, 1, -2, 2):
        bb = b + db
        if not 2 ** (B_BITS - 1) <= bb < 2**B_BITS:
            continue
        low = max((y << c) - half - acc * bb + 1 for acc, y in zip(accs, real))
        high = min((y << c) + half - acc * bb - 1 for acc, y in zip(accs, real))
        if low <= high:
            return bb, min(max(offset, low), high)
    return None


def high_word_form(b: Any, c: Any, offset: Any, zero_point: int, lo: Any, hi: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Constants ``(d, s)`` of a cheaper form of :func:`requantize` for accumulators known to lie in
    ``[lo, hi]`` (per channel, like ``b``, ``c`` and ``offset``), or None where it would differ.

    The form is :func:`high_word_shift` ``(acc * b + d, s)`` then the clip: ``d = offset + 2^(c-1) +
    zero_point * 2^c`` rounds half up and adds the zero point before one flooring shift by ``c``,
    taken as the high 32 bits of the int64 sum shifted by ``s = c - 32`` in int32. It equals
    ``requantize`` exactly when, for every channel, ``c >= 32``, the int64 sum cannot overflow,
    and no ``acc`` in ``[lo, hi]`` puts ``acc * b + offset`` exactly halfway between two steps (there
    half up and half to even differ). Ties are rare: with ``b = b' * 2^k`` (``b'`` odd) they occur
    at most once every ``2^(c-k)`` accumulator values, ``2^c`` being far wider than any
    accumulator's range; found exactly (modular inverse of ``b'``), not sampled.
    """
    b, c, offset, lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.int64), np.shape(b)).ravel()
                            for v in (b, c, offset, lo, hi))
    d = [int(o) + (1 << (int(k) - 1)) + zero_point * (1 << int(k)) for o, k in zip(offset, c)]
    for bb, k, o, dd, a, z in zip(b.tolist(), c.tolist(), offset.tolist(), d, lo.tolist(), hi.tolist()):
        if k < 32 or max(abs(a), abs(z)) * bb + abs(dd) > INT64_MAX or _tie_in_range(bb, k, o, a, z):
            return None
    return np.array(d, dtype=np.int64), (c - 32).astype(np.int32)


def _tie_in_range(b: int, c: int, offset: int, lo: int, hi: int) -> bool:
    """Whether some integer ``x`` in ``[lo, hi]`` has ``x*b + offset == 2^(c-1) (mod 2^c)``."""
    if b == 0:
        return (offset - (1 << (c - 1))) % (1 << c) == 0 and lo <= hi
    k = (b & -b).bit_length() - 1
    target = ((1 << (c - 1)) - offset) % (1 << c)
    if target % (1 << k):
        return False
    modulus = 1 << max(c - k, 0)
    if modulus == 1:
        return lo <= hi
    x0 = (target >> k) * pow(b >> k, -1, modulus) % modulus
    first = lo + (x0 - lo) % modulus
    return first <= hi


def high_word_sum_form(multipliers: list[int], zero_points: list[int], c: int, zero_point: int,
                       ranges: list[tuple[int, int]], tie_window: int = 0, max_combinations: int = 1 << 17) -> int | None:
    """The constant ``d`` for which :func:`high_word_shift` ``(sum_i x_i * m_i + d, c - 32)`` then the clip
    equals :func:`requantize` ``(sum_i (x_i - z_i) * m_i, 1, c, tie_window=tie_window)`` with output
    ``zero_point``, for every ``x_i`` in ``ranges[i]`` (an Add on a common grid, per-tensor multipliers), or None
    where it may differ: ``c < 32``, an int64 overflow, or a combination of inputs within ``tie_window`` of a
    rounding tie (every combination checked, at most ``max_combinations``: two 8-bit inputs)."""
    d = (1 << (c - 1)) + zero_point * (1 << c) - sum(z * m for z, m in zip(zero_points, multipliers))
    reach = sum(max(abs(lo), abs(hi)) * abs(m) for (lo, hi), m in zip(ranges, multipliers)) + abs(d)
    combinations = math.prod(hi - lo + 1 for lo, hi in ranges)
    if c < 32 or reach > INT64_MAX or combinations > max_combinations:
        return None
    sums = np.array([d], dtype=np.int64)  # the sums plus 2^(c-1): a tie is a multiple of 2^c
    for (lo, hi), m in zip(ranges, multipliers):
        sums = (sums[:, None] + np.arange(lo, hi + 1, dtype=np.int64)[None, :] * np.int64(m)).ravel()
    if np.any(((sums + tie_window) & ((1 << c) - 1)) <= 2 * tie_window):
        return None
    return d


@dataclass(frozen=True)
class Int32Sum:
    """An aligned Add computed in int32: ``clip((sum_i x_i * multipliers[i] + d) >> shift)``, every partial
    sum within int32 (see :func:`int32_sum_form`)."""

    multipliers: tuple[int, ...]
    d: int
    shift: int


def int32_sum_form(multipliers: list[int], zero_points: list[int], c: int, zero_point: int,
                   ranges: list[tuple[int, int]], qmin: int, qmax: int, tie_window: int = 0,
                   max_combinations: int = 1 << 17) -> Int32Sum | None:
    """The aligned Add of :func:`requantize` ``(sum_i (x_i - z_i) * m_i, 1, c, tie_window=tie_window)`` (output
    ``zero_point``, clipped to ``[qmin, qmax]``) as an :class:`Int32Sum`, found by enumeration: every combination
    of inputs in ``ranges`` (at most ``max_combinations``: two 8-bit inputs) gives the same number, ties and
    clipping included. For the largest shifts whose terms fit int32 it tries each multiplier rounded down and up
    to that grid; the offsets ``d`` that make every combination land in its output step form an interval, and
    one in it is taken. None where no shift within 4 of the largest works (then the int64 forms serve). Cached:
    the x86 lowering asks again for an Add its uint8-storage pass already checked."""
    if math.prod(hi - lo + 1 for lo, hi in ranges) > max_combinations:
        return None
    return _int32_sum_form(tuple(int(m) for m in multipliers), tuple(int(z) for z in zero_points), int(c),
                           int(zero_point), tuple((int(lo), int(hi)) for lo, hi in ranges), int(qmin), int(qmax),
                           int(tie_window))


@functools.lru_cache(maxsize=256)
def _int32_sum_form(multipliers: tuple[int, ...], zero_points: tuple[int, ...], c: int, zero_point: int,
                    ranges: tuple[tuple[int, int], ...], qmin: int, qmax: int, tie_window: int) -> Int32Sum | None:
    grids = np.meshgrid(*(np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in ranges), indexing="ij")
    xs = [g.ravel() for g in grids]
    total = sum((x.astype(object) - z) * int(m) for x, z, m in zip(xs, zero_points, multipliers))  # exact integers
    rounded = round_shift(total, c, int(rounding_bias(c, tie_window)), tie_window=tie_window)
    y = np.clip(rounded + zero_point, qmin, qmax).astype(np.int64)
    reach = [max(abs(lo), abs(hi)) for lo, hi in ranges]

    def bound(k: int) -> int:  # of every partial sum, with the offset the zero points and rounding need
        return (abs(zero_point) + 1 << k) + sum((r + abs(z)) * ((m >> (c - k)) + 1)
                                                for r, z, m in zip(reach, zero_points, multipliers))
    k_top = max((k for k in range(1, min(c, 30) + 1) if bound(k) < 2**31), default=0)
    for k in range(k_top, max(k_top - 4, 0), -1):
        choices = [(m >> (c - k), (m >> (c - k)) + 1) for m in multipliers]
        for ms in itertools.product(*choices):
            s = sum(x * np.int64(m) for x, m in zip(xs, ms))
            low = np.where(y > qmin, (y << k) - s, np.iinfo(np.int64).min).max()
            high = np.where(y < qmax, ((y + 1) << k) - 1 - s, np.iinfo(np.int64).max).min()
            if low > high:
                continue
            d = int(np.clip(-(int(s.min()) + int(s.max())) // 2, low, high))
            if abs(d) + sum(r * abs(m) for r, m in zip(reach, ms)) < 2**31:
                return Int32Sum(tuple(int(m) for m in ms), d, k)
    return None


def high_word_shift(v: Any, s: Any, to_int32: Callable[[Any], Any],
                    right_shift: Callable[[Any, Any], Any] = operator.rshift, word: Any = 32) -> Any:
    """``v >> (32 + s)`` for an int64 ``v`` and ``s >= 0``: the high 32 bits of ``v`` (``to_int32``
    narrows them) shifted by ``s`` in int32, the flooring shift of :func:`high_word_form`. The defaults
    serve numpy arrays and TIR expressions; Relax passes its ``right_shift`` and an int64 ``word`` of 32."""
    return right_shift(to_int32(right_shift(v, word)), s)


def bias_in_accumulator(bias: Any, bias_scale: Any, s_in: Any, s_w: Any) -> tuple[np.ndarray, np.ndarray]:
    """An int32 bias of scale ``bias_scale`` (a file's float32 ``S_in * S_w``, or the exact product) on the
    grid of the accumulator ``S_in * S_w`` (exact, float64): ``(integer part, fraction)``, per channel. The
    fraction, a few 1e-8 of the bias, becomes a requantization ``offset`` (:func:`fraction_offset`)."""
    s_in64, s_w64 = (np.asarray(np.asarray(v, dtype=np.float32), dtype=np.float64) for v in (s_in, s_w))
    units = np.asarray(bias, dtype=np.int64).astype(np.float64) * np.asarray(bias_scale, np.float64) / (s_in64 * s_w64)
    whole = np.rint(units)
    return whole.astype(np.int64), units - whole


def function_table(fn: Callable[[np.ndarray], np.ndarray], in_qmin: int, in_qmax: int, in_scale: Any,
                   in_zero_point: int, out_scale: Any, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """An element-wise function of an integer tensor quantized: for every input integer in [in_qmin,
    in_qmax], ``clip(rint(fn(real) / out_scale) + zero_point, qmin, qmax)`` (int32), with ``real`` the exact
    input value ``(q - in_zero_point) * in_scale`` and ``fn`` evaluated in float64 (a ``lut`` op's table)."""
    q = np.arange(in_qmin, in_qmax + 1, dtype=np.int64)
    real = (q - in_zero_point).astype(np.float64) * np.float64(np.float32(in_scale))
    y = np.asarray(fn(real), dtype=np.float64)
    return np.clip(np.rint(y / np.float64(np.float32(out_scale))) + zero_point, qmin, qmax).astype(np.int32)


def fraction_offset(fraction: Any, b: Any) -> np.ndarray:
    """The :func:`requantize` ``offset`` of an accumulator fraction requantized by multiplier ``b``."""
    return np.rint(np.asarray(fraction, dtype=np.float64) * np.asarray(b, dtype=np.float64)).astype(np.int64)


def _check_dyadic_pair(b: Any, c: Any) -> tuple[np.ndarray, np.ndarray]:
    b64 = np.asarray(b)
    c64 = np.asarray(c)
    if b64.dtype.kind not in "iu" or c64.dtype.kind not in "iu":
        raise ValueError(f"requantize: b and c must be integers, got {b64.dtype} and {c64.dtype}")
    b64, c64 = b64.astype(np.int64), c64.astype(np.int64)
    if np.any((b64 < 0) | (b64 >= 2**B_BITS)):
        raise ValueError(f"requantize: b must be in [0, 2^{B_BITS}), got {_first_bad(b64, (b64 < 0) | (b64 >= 2**B_BITS))}")
    if np.any((c64 < C_MIN) | (c64 > C_MAX)):
        raise ValueError(f"requantize: c must be in [{C_MIN}, {C_MAX}], got {_first_bad(c64, (c64 < C_MIN) | (c64 > C_MAX))}")
    return b64, c64


def _check_no_overflow(acc_abs_max: int, b_max: int, c_max: int, offset_max: int = 0) -> None:
    room = INT64_MAX - (1 << (c_max - 1)) - offset_max
    if acc_abs_max * b_max > room:
        raise ValueError(
            f"requantize: accumulator magnitude {acc_abs_max} times b={b_max} overflows the int64 "
            f"product; |acc| must be at most {room // max(b_max, 1)}"
        )


def _check_integer(ok: bool, dtype: Any) -> None:
    if not ok:
        raise ValueError(f"requantize: accumulator must have an integer dtype, got {dtype}")


def _abs_max(x: Array) -> int:
    if math.prod(x.shape) == 0:
        return 0
    return max(abs(int(x.min())), abs(int(x.max())))


def _torch_if_tensor(x: Any) -> Any:
    """The torch module if ``x`` is a torch tensor, else None (torch is never imported here)."""
    if type(x).__module__.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            return torch
    return None


def _first_bad(values: np.ndarray, mask: np.ndarray) -> Any:
    return values[mask].ravel()[0].item()


def self_check(n_cases: int = 20_000, seed: int = 0) -> int:
    """Check :func:`requantize` on random ratios and int32 accumulators against exact rational
    arithmetic, in numpy and (if installed) torch. Returns the number of mismatching cases."""
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    ratios = np.exp2(rng.uniform(-32, 30, n_cases))
    acc = rng.integers(-(2**31), 2**31, n_cases, dtype=np.int64)
    b, c = dyadic_per_channel(ratios)
    lo, hi = -(2**31), 2**31 - 1
    got = [requantize(acc, b, c, lo, hi)]
    try:
        import torch
    except ImportError:
        pass
    else:
        got.append(requantize(torch.from_numpy(acc), b, c, lo, hi).numpy())
    exact = np.array([min(max(round(Fraction(int(a) * int(bb), 2 ** int(cc))), lo), hi)  # round(): half to even
                      for a, bb, cc in zip(acc, b, c)])
    return int(sum(np.count_nonzero(g != exact) for g in got))
