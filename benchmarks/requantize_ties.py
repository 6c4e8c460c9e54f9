"""Can a requantization of a QDQ file meet an exact rounding tie, and does hawqc round each one half to even?
(not in CI)

    nice -n 19 python benchmarks/requantize_ties.py [--work benchmarks/.cache/oracle] [FILE.onnx ...]

Reads each file (default: every QDQ file ``oracle_agreement.py`` made under ``--work``) with hawqc's reader,
recording each conv/dense/affine requantization as :func:`hawqc.quant.dyadic.exact_requantization` receives it
(the exact rational ratio and bias fraction per channel). A tie is an accumulator whose exact real value
``(acc + fraction) * ratio`` is ``y - 1/2`` for an output ``y`` in range: solved exactly in integers (:func:`ties`).
For each tie (up to 4096 per channel, evenly spread), hawqc's constants (after ``exact_requantization``) must
round it half to even. Writes ``results/requantize_ties.{json,md}``: per file, channels, channels with a tie,
ties, ties checked, ties rounded otherwise; the saved rows of other files are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.fileio import write_atomic
from hawqc.quant import dyadic

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
"""Files inside the repository are named from its root, however ``--work`` or a file was given."""
INT32 = (-(2**31), 2**31 - 1)
"""An accumulator's range: ties beyond it are never met."""


def ties(ratio: Fraction, fraction: Fraction, lo: int, hi: int, most: int = 1 << 12) -> tuple[int, list[tuple[int, int]]]:
    """How many ``(acc, y)`` have ``(acc + fraction) * ratio == y - 1/2`` exactly, ``y`` in ``(lo, hi]``, ``acc`` an
    int32, and up to
    ``most`` of them evenly spread, the first and last among them. They solve the linear Diophantine equation
    ``a * acc + b * y = c`` (the tie scaled to integers): none, or an arithmetic progression, counted without a
    search (an int32 range of outputs, as a requantization onto a fine grid has, is 2^32 candidates)."""
    twice, rhs = 2 * ratio, -1 - 2 * ratio * fraction
    den = twice.denominator * rhs.denominator // gcd(twice.denominator, rhs.denominator)
    a, b, c = int(twice * den), -2 * den, int(rhs * den)
    g, u, v = _extended_gcd(a, b)
    if c % g:
        return 0, []
    acc0, y0, d_acc, d_y = u * (c // g), v * (c // g), b // g, -(a // g)
    (y_first, y_last), (acc_first, acc_last) = _steps_within(y0, d_y, lo + 1, hi), _steps_within(acc0, d_acc, *INT32)
    first, last = max(y_first, acc_first), min(y_last, acc_last)
    if last < first:
        return 0, []
    ks = sorted({int(k) for k in np.linspace(first, last, min(last - first + 1, most)).round()} | {first, last})
    return last - first + 1, [(acc0 + k * d_acc, y0 + k * d_y) for k in ks]


def _steps_within(start: int, step: int, lo: int, hi: int) -> tuple[int, int]:
    """The first and last ``k`` with ``lo <= start + k * step <= hi`` (``step`` not 0)."""
    if step > 0:
        return -((start - lo) // step), (hi - start) // step
    return -((hi - start) // -step), (start - lo) // -step


def _extended_gcd(a: int, b: int) -> tuple[int, int, int]:
    """``(g, u, v)`` with ``a * u + b * v == g``, ``g > 0`` the greatest common divisor."""
    r0, r1, u0, u1, v0, v1 = a, b, 1, 0, 0, 1
    while r1:
        q = r0 // r1
        r0, r1, u0, u1, v0, v1 = r1, r0 - q * r1, u1, u0 - q * u1, v1, v0 - q * v1
    return (r0, u0, v0) if r0 > 0 else (-r0, -u0, -v0)


def count(path: Path) -> dict[str, Any]:
    """Read ``path`` with every requantization's ties counted."""
    import onnx

    from hawqc.frontend.onnx_qdq import from_onnx

    counts = {"channels": 0, "tie_channels": 0, "ties": 0, "checked": 0, "wrong": 0}
    original = dyadic.exact_requantization

    def recording(ratios: list[Any], fraction: Any, b: np.ndarray, c: np.ndarray, offset: np.ndarray, lo: int, hi: int,
                  max_levels: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        new_b, new_offset = original(ratios, fraction, b, c, offset, lo, hi, max_levels)
        size = np.size(new_b)
        flat = [np.broadcast_to(np.ravel(v), (size,)) for v in (new_b, c, new_offset)]
        fractions = np.broadcast_to(np.ravel(np.zeros(1) if fraction is None else np.asarray(fraction, np.float64)),
                                    (size,))
        for k in range(size):
            counts["channels"] += 1
            number, found = ties(ratios[k % len(ratios)], Fraction(float(fractions[k])), lo, hi)
            counts["tie_channels"] += bool(number)
            counts["ties"] += number
            counts["checked"] += len(found)
            for acc, y in found:
                want = round((acc + Fraction(float(fractions[k]))) * ratios[k % len(ratios)])  # half to even
                got = dyadic.requantize(np.array([acc]), flat[0][k], flat[1][k], -(2**31), 2**31 - 1, offset=flat[2][k])
                counts["wrong"] += int(got[0]) != want
        return new_b, new_offset

    model = onnx.load(str(path))
    shape = tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)
    dyadic.exact_requantization = recording  # rescale_op imports it from the module at each call
    try:
        from_onnx(model, shape)
    finally:
        dyadic.exact_requantization = original
    return {"file": _name(path), **counts}


def _name(path: Path) -> str:
    """``path`` from the repository root (the key of its saved row), or as given if outside it."""
    full = path.resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".cache" / "oracle")
    parser.add_argument("--out", type=Path, default=RESULTS / "requantize_ties")
    args = parser.parse_args()
    files = args.files or sorted(p for p in args.work.glob("*/b1/*.onnx") if p.stem not in ("fp32", "float"))
    if not files:
        sys.exit(f"no QDQ files under {args.work}: run benchmarks/oracle_agreement.py first")
    saved = json.loads(args.out.with_suffix(".json").read_text())["rows"] if args.out.with_suffix(".json").exists() else []
    fresh = []
    for path in files:
        fresh.append(count(path))
        print(json.dumps(fresh[-1]), flush=True)
    checked = {r["file"] for r in fresh}
    rows = sorted([r for r in saved if r["file"] not in checked] + fresh, key=lambda r: r["file"])
    lines = ["Conv/dense/affine requantizations whose exact real value can lie on a rounding tie, and ties hawqc's "
             "constants round otherwise than half to even.", "",
             "| file | channels | channels with a tie | ties | ties checked | rounded otherwise |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['channels']} | {r['tie_channels']} | {r['ties']} | {r.get('checked', r['ties'])} | "
              f"{r['wrong']} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps({"rows": rows}, indent=1) + "\n")
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
