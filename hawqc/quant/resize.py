"""ONNX Resize along one axis as integer taps: source indices and exact integer weights.

Source coordinates are computed in exact rational arithmetic from ONNX's coordinate transformation
(``half_pixel``, ``pytorch_half_pixel``, ``align_corners``, ``asymmetric``, ``tf_half_pixel_for_nn``);
the scale is ``out / in`` when the model gives sizes, the float32 value it gives otherwise. Nearest
picks one index by ``nearest_mode``; linear takes the two neighbours (clamped at the edges, as ONNX
Runtime does) with weights ``(D - k, k) / D`` for the common denominator ``D`` of the axis, so the
weighted sum of integers is exact and one dyadic rescale later divides by ``D``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_DENOMINATOR = 2**11
"""Linear weights whose exact denominator exceeds this are rounded to multiples of 1/2^11 (an
accumulator of 8-bit values times D_h * D_w then stays within int32)."""


TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
"""The coordinate transformation modes supported."""
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def source_coordinate(x: int, size: int, new: int, scale: Fraction, transform: str) -> Fraction:
    """The input coordinate ONNX maps output index ``x`` to."""
    if transform == "half_pixel" or (transform == "pytorch_half_pixel" and new > 1):
        return (x + Fraction(1, 2)) / scale - Fraction(1, 2)
    if transform == "pytorch_half_pixel":
        return Fraction(0)
    if transform == "align_corners":
        return Fraction(x * (size - 1), new - 1) if new > 1 else Fraction(0)
    if transform == "asymmetric":
        return x / scale
    if transform == "tf_half_pixel_for_nn":
        return (x + Fraction(1, 2)) / scale
    raise ValueError(f"coordinate_transformation_mode {transform!r} is not supported")


def _nearest(coord: Fraction, mode: str) -> int:
    floor = math.floor(coord)
    frac = coord - floor
    if mode == "floor":
        return floor
    if mode == "ceil":
        return math.ceil(coord)
    if mode in ("round_prefer_floor", "round_prefer_ceil"):
        if frac == Fraction(1, 2):
            return floor if mode == "round_prefer_floor" else floor + 1
        return floor + (frac > Fraction(1, 2))
    raise ValueError(f"nearest_mode {mode!r} is not supported")


def exact_taps(size: int, new: int, scale: float | None, mode: str, transform: str,
               nearest_mode: str) -> tuple[np.ndarray, list[Fraction] | None]:
    """``(indices (k, new), the exact weight of the upper index (linear) or None)`` for one axis."""
    exact_scale = Fraction(new, size) if scale is None else Fraction(float(np.float32(scale)))
    coords = [source_coordinate(x, size, new, exact_scale, transform) for x in range(new)]
    if mode == "nearest":
        index = [min(max(_nearest(c, nearest_mode), 0), size - 1) for c in coords]
        return np.array([index], dtype=np.int32), None
    clamped = [min(max(c, Fraction(0)), Fraction(size - 1)) for c in coords]
    low = [math.floor(c) for c in clamped]
    index = np.array([low, [min(lo + 1, size - 1) for lo in low]], dtype=np.int32)
    return index, [c - lo for c, lo in zip(clamped, low)]


def resize_taps(size: int, new: int, scale: float | None, mode: str, transform: str,
                nearest_mode: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``(indices (k, new), integer weights (2, new) or None, denominator)`` for one axis."""
    index, fracs = exact_taps(size, new, scale, mode, transform, nearest_mode)
    if fracs is None:
        return index, None, 1
    denominator = min(math.lcm(*(f.denominator for f in fracs)), MAX_DENOMINATOR)
    upper = [round(f * denominator) for f in fracs]
    return index, np.array([[denominator - u for u in upper], upper], dtype=np.int32), denominator


def resize_consts(size: tuple[int, int], new: tuple[int, int], scales: tuple[float, float] | None, mode: str,
                  transform: str, nearest_mode: str = "round_prefer_floor") -> tuple[dict[str, np.ndarray], int]:
    """The consts of a ``resize`` op of H, W from ``size`` to ``new`` (``scales``: the float32 factors a model
    gives, None where it gives sizes): ``iy``, ``ix`` and for linear ``wy``, ``wx``; and the denominator
    ``D_h * D_w`` its weighted sums carry (1 for nearest)."""
    (iy, wy, dy), (ix, wx, dx) = (resize_taps(n, m, None if scales is None else scales[k], mode, transform, nearest_mode)
                                  for k, (n, m) in enumerate(zip(size, new)))
    consts = {"iy": iy, "ix": ix} if mode == "nearest" else {"iy": iy, "ix": ix, "wy": wy, "wx": wx}
    return consts, dy * dx


def float_resize_consts(size: tuple[int, int], new: tuple[int, int], scales: tuple[float, float] | None, mode: str,
                        transform: str, nearest_mode: str = "round_prefer_floor") -> dict[str, np.ndarray]:
    """The consts of a Resize of H, W computed in float (a region the quantizer left unquantized): ``iy``,
    ``ix`` and for linear float64 weights ``wy``, ``wx`` (the exact weights, each rounded once)."""
    consts: dict[str, np.ndarray] = {}
    for k, axis in enumerate("yx"):
        index, fracs = exact_taps(size[k], new[k], None if scales is None else scales[k], mode, transform,
                                  nearest_mode)
        consts[f"i{axis}"] = index
        if fracs is not None:
            consts[f"w{axis}"] = np.array([[float(1 - f) for f in fracs], [float(f) for f in fracs]], np.float64)
    return consts
