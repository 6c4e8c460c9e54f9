"""Can a requantization of a QDQ file meet an exact rounding tie, and does hawqc round each one half to even?
(not in CI)

    nice -n 19 python benchmarks/requantize_ties.py [--work benchmarks/.cache/oracle] [FILE.onnx ...]

Reads each file (default: every QDQ file ``oracle_agreement.py`` made under ``--work``) with hawqc's reader,
recording each conv/dense/affine requantization as :func:`hawqc.quant.dyadic.exact_requantization` receives it
(the exact rational ratio and bias fraction per channel). A tie is an accumulator whose exact real value
``(acc + fraction) * ratio`` is ``y - 1/2`` for an output ``y`` in range: found by float64 search, confirmed
with fractions. For each tie, hawqc's constants (after ``exact_requantization``) must round it half to even.
Writes ``results/requantize_ties.{json,md}``: per file, channels, channels with a tie, ties, ties rounded
otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.fileio import write_atomic
from hawqc.quant import dyadic

RESULTS = Path(__file__).parent / "results"


def ties(ratio: Fraction, fraction: Fraction, lo: int, hi: int) -> list[tuple[int, int]]:
    """``(acc, y)`` with ``(acc + fraction) * ratio == y - 1/2`` exactly, ``y`` in ``(lo, hi]``."""
    ys = np.arange(lo + 1, hi + 1)
    accs = (ys - 0.5) / float(ratio) - float(fraction)
    near = np.abs(accs - np.rint(accs)) < 1e-6 * np.maximum(1.0, np.abs(accs))
    found = []
    for y in ys[near].tolist():
        acc = Fraction(2 * y - 1, 2) / ratio - fraction
        if acc.denominator == 1:
            found.append((int(acc), y))
    return found


def count(path: Path) -> dict[str, Any]:
    """Read ``path`` with every requantization's ties counted."""
    import onnx

    from hawqc.frontend.onnx_qdq import from_onnx

    counts = {"channels": 0, "tie_channels": 0, "ties": 0, "wrong": 0}
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
            found = ties(ratios[k % len(ratios)], Fraction(float(fractions[k])), lo, hi)
            counts["tie_channels"] += bool(found)
            counts["ties"] += len(found)
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
    return {"file": str(path), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".cache" / "oracle")
    parser.add_argument("--out", type=Path, default=RESULTS / "requantize_ties")
    args = parser.parse_args()
    files = args.files or sorted(p for p in args.work.glob("*/b1/*.onnx") if p.stem not in ("fp32", "float"))
    if not files:
        sys.exit(f"no QDQ files under {args.work}: run benchmarks/oracle_agreement.py first")
    rows = []
    for path in files:
        rows.append(count(path))
        print(json.dumps(rows[-1]), flush=True)
    lines = ["Conv/dense/affine requantizations whose exact real value can lie on a rounding tie, and ties hawqc's "
             "constants round otherwise than half to even.", "",
             "| file | channels | channels with a tie | ties | rounded otherwise |", "|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['channels']} | {r['tie_channels']} | {r['ties']} | {r['wrong']} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps({"rows": rows}, indent=1) + "\n")
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
