"""Dyadic requantization: the one rescaling rule of hawqc.

HAWQ-V3 replaces every floating-point rescale of an integer accumulator by a
dyadic number b / 2^c, so that a deployed graph only multiplies, shifts and
clips integers. This module is the single implementation of that rule; the
PyTorch integer simulation, the numpy reference executor and the Relax lowering
all call it.

Scale ratio
    For an accumulator with scale ``S_in * S_w`` requantized to scale ``S_out``
    the ratio is computed the way the deployed graph computes it::

        ratio = float64(float32(S_in * S_w)) / float64(float32(S_out))

    (the product ``S_in * S_w`` is formed in float32).

Dyadic approximation ``dyadic(ratio) -> (b, c)``
    With ``ratio = m * 2^e`` and ``m`` in [0.5, 1) (``frexp``), ``c = 31 - e`` and
    ``b = round(m * 2^31)`` (round half to even on the exact float), so ``b`` is an
    int32 in [2^30, 2^31). If ``m * 2^31`` rounds up to 2^31 then ``b = 2^30`` and
    ``c`` is one smaller, which is the same number. The error is at most half a
    unit of ``b``: ``|b / 2^c - ratio| <= ratio * 2^-31``. ``c`` must lie in
    [1, 62], i.e. ``2^-32 <= ratio < 2^30``.

Requantization ``requantize(acc, b, c, qmin, qmax)``
    ``clip((acc * b + 2^(c-1)) >> c, qmin, qmax)`` with an int64 product and an
    arithmetic (flooring) right shift. That is ``floor(acc * b / 2^c + 1/2)``:
    round half up, toward +inf at ties (2.5 -> 3, -2.5 -> -2). HAWQ's released
    code rounds half to even in PyTorch but half up in TVM, so its ties disagree
    between simulation and deployment; hawqc uses this one rule everywhere.
    The same function serves numpy arrays and torch tensors, bit for bit. Asymmetric
    tensors (zero points, as other tools produce) subtract the input zero point from
    ``acc`` first and add the output zero point after the shift, before the clip.
"""

from __future__ import annotations

import math
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


def scale_ratio(s_in: Any, s_w: Any, s_out: Any) -> np.ndarray:
    """The requantization ratio ``S_in*S_w / S_out`` as the deployed graph forms it.

    ``float64(float32(S_in * S_w)) / float64(float32(S_out))``; broadcasts, so a
    per-channel ``s_w`` gives per-channel ratios.
    """
    acc_scale = np.float32(s_in) * np.asarray(s_w, dtype=np.float32)
    return np.asarray(acc_scale, dtype=np.float64) / np.float64(np.float32(s_out))


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


def requantize(
    acc: Array, b: Any, c: Any, qmin: int, qmax: int, axis: int | None = None,
    input_zero_point: int = 0, zero_point: int = 0,
) -> Array:
    """``clip(((acc - z_in)*b + 2^(c-1)) >> c + z_out, qmin, qmax)`` on a numpy array or torch tensor.

    ``acc`` is an integer accumulator; ``b`` and ``c`` are scalars or arrays
    broadcastable to it, or 1-D per-channel arrays along ``axis``. The zero points
    are for asymmetric tensors (HAWQ-V3 itself uses none). Returns int32 of the same
    kind (numpy or torch) as ``acc``. Raises ``ValueError`` if ``b``/``c`` are not a
    valid dyadic pair or ``acc`` could overflow the int64 product.
    """
    b64, c64 = _check_dyadic_pair(b, c)
    if not -(2**31) <= qmin <= qmax <= 2**31 - 1:
        raise ValueError(f"requantize: need int32 bounds with qmin <= qmax, got [{qmin}, {qmax}]")
    torch_mod = _torch_if_tensor(acc)
    if torch_mod is None:
        acc = np.asarray(acc)
        _check_integer(acc.dtype.kind in "iu", acc.dtype)
        x, b_, c_ = acc.astype(np.int64), b64, c64
    else:
        _check_integer(not acc.dtype.is_floating_point and not acc.dtype.is_complex, acc.dtype)
        x = acc.to(torch_mod.int64)
        b_ = torch_mod.as_tensor(b64, device=acc.device)
        c_ = torch_mod.as_tensor(c64, device=acc.device)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        b_, c_ = b_.reshape(shape), c_.reshape(shape)
    x = x - input_zero_point
    _check_no_overflow(_abs_max(x), int(b64.max()), int(c64.max()))
    y = (((x * b_ + (1 << (c_ - 1))) >> c_) + zero_point).clip(qmin, qmax)
    return y.astype(np.int32) if torch_mod is None else y.to(torch_mod.int32)


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


def _check_no_overflow(acc_abs_max: int, b_max: int, c_max: int) -> None:
    if acc_abs_max * b_max + (1 << (c_max - 1)) > INT64_MAX:
        raise ValueError(
            f"requantize: accumulator magnitude {acc_abs_max} times b={b_max} overflows the int64 "
            f"product; |acc| must be at most {(INT64_MAX - (1 << (c_max - 1))) // max(b_max, 1)}"
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
    exact = np.array([min(max(math.floor(Fraction(int(a) * int(bb), 2 ** int(cc)) + Fraction(1, 2)), lo), hi)
                      for a, bb, cc in zip(acc, b, c)])
    return int(sum(np.count_nonzero(g != exact) for g in got))
