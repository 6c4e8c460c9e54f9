"""Does every common CNN, quantized by every tool, compile integer-only and bit-exact? (not in CI)

    python benchmarks/zoo_compile.py [--models resnet18,mobilenet_v2] [--quantizers ort-qdq-s8,nncf]
                                     [--out benchmarks/results] [--resume] [--calib | --cuda]

For each built-in model (random weights, BatchNorm statistics from a few random batches) and each
quantizer of ``tests/third_party_quantizers.py`` (ONNX Runtime QDQ s8 / QDQ u8 / operator form /
weights as float + Q/DQ pairs, Intel NNCF, hawqc's own export): quantize at the model's input size,
``hawqc.compile_integer_only`` for llvm, run one input, and record whether the compiled module equals
the numpy reference on every element, which operations stayed float, and the largest difference from
ONNX Runtime running the same file (in output steps where the output is quantized). With ``--calib``
the quantizer's calibration inputs go to ``calib_data`` (hawqc quantizes the float regions the
quantizer left) and both the module with those regions in float and the calibrated one are compared
with the file's float64 meaning (rows kept apart, in their own table). With ``--cuda`` the graph is
built for ``cuda -arch=sm_75`` instead: its CUDA source compiled by nvcc, and the graph after the Tensor
Core rewrite (each ``mma`` as plain loops) built for llvm and compared with the reference on every
element (its own table). A failure records hawqc's one-line error. Rows are saved after each model (``zoo_compile.json`` and ``.md``), so
``--resume`` continues an interrupted run; ``--replace`` runs the asked rows again, keeping the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from third_party_quantizers import QUANTIZERS, calibration, quantize_with  # noqa: E402  (shared with the tests)

import hawqc  # noqa: E402
from hawqc import models  # noqa: E402
from hawqc.fileio import write_atomic  # noqa: E402
from hawqc.relax_passes.float_ops import float_ops  # noqa: E402

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
                  "resnext50_32x4d", "wide_resnet50_2", "vgg16", "inceptionv3", "shufflenet_v2_x1_0", "densenet121",
                  "squeezenet1_1", "googlenet", "mnasnet1_0", "lraspp_mobilenet_v3_large")


def output_step(path: Path) -> float | None:
    """The scale of the DequantizeLinear producing the output, None where the output is computed in float."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    producer = next((n for n in model.graph.node if model.graph.output[0].name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = inits.get(producer.input[1])
    return float(scale) if scale is not None and scale.size == 1 else None


def oracle_agreement(path: Path, graphs: dict[str, object], shape: tuple[int, ...],
                     count: int = 2) -> dict[str, object]:
    """Each integer graph (run by the reference, which its compiled module equals) against the file's float64
    meaning (:mod:`hawqc.frontend.oracle`) on ``count`` inputs: the largest difference (in output steps where
    the output is quantized; and as a share of the oracle's largest output) and the share of argmax that agree."""
    from hawqc.frontend.oracle import evaluator, oracle_run

    session, step = evaluator(path), output_step(path)
    diffs: dict[str, list[float]] = {k: [] for k in graphs}
    agree: dict[str, list[bool]] = {k: [] for k in graphs}
    peak = 0.0
    for seed in range(count):
        x = np.random.default_rng(100 + seed).standard_normal(shape).astype(np.float32)
        want = oracle_run(session, x)
        peak = max(peak, float(np.abs(want).max()))
        for key, graph in graphs.items():
            got = graph.run(x)
            diffs[key].append(float(np.abs(got - want).max()))
            agree[key].append(bool(got.argmax() == want.argmax()))
    return {key: {"vs_oracle": (f"{max(diffs[key]) / step:.1f} steps" if step else f"{max(diffs[key]):.3g} abs")
                  + f" ({100 * max(diffs[key]) / max(peak, 1e-12):.1f}% of max)",
                  "argmax_oracle": round(float(np.mean(agree[key])), 2)} for key in graphs}


SM75 = "sm_75"


def mode(row: dict[str, object]) -> str:
    """The table a row belongs to: ``calib`` (``--calib``), ``cuda`` (``--cuda``) or ``""`` (llvm)."""
    return "calib" if row.get("calib") else "cuda" if row.get("cuda") else ""


def cuda_check(graph: object, shape: tuple[int, ...]) -> dict[str, object]:
    """``graph`` built for ``cuda -arch=sm_75``: its CUDA source through nvcc, and the graph after the Tensor
    Core rewrite (each ``mma`` as loops) built for llvm against the reference on every element."""
    from gpu_check import cubin_bytes, mma_counts, on_llvm

    from hawqc.runtime.module import compile_graph

    start = time.perf_counter()
    source = compile_graph(graph, shape, {"kind": "cuda", "arch": SM75}).source()
    row: dict[str, object] = {"compile_s": round(time.perf_counter() - start, 1), **mma_counts(source),
                              "cubin_bytes": cubin_bytes(source, SM75)}
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    expected = graph.run(x)
    row["bit_exact"] = bool(np.array_equal(on_llvm(graph, x, SM75, "auto"), expected))
    row["distinct_outputs"] = int(len(np.unique(expected)))
    return row


def check(name: str, quantizer: str, folder: Path, calibrate: bool = False, cuda: bool = False) -> dict[str, object]:
    row: dict[str, object] = {"model": name, "quantizer": quantizer, **({"calib": True} if calibrate else {}),
                              **({"cuda": True} if cuda else {})}
    torch.manual_seed(0)
    spec = models.spec(name)
    shape = (1, *spec.input_shape)
    model = models.recalibrate_bn(models.get(name), [torch.randn(4, *spec.input_shape)])
    try:
        path = quantize_with(quantizer, model, shape, folder)
    except Exception as err:  # the quantizer itself failed: not hawqc's to judge
        row.update(compiled="quantizer failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return row
    start = time.perf_counter()
    calib = {"calib_data": np.concatenate(calibration(shape))} if calibrate else {}  # the quantizer's own inputs
    try:
        if cuda:
            from hawqc.api import integer_graph_of

            graph = integer_graph_of(path, input_shape=shape)
            left = [f.split(" (")[1][:-1] for f in graph.metadata.get("float_ops", [])]
            row.update(cuda_check(graph, shape), compiled="yes",
                       float_ops=[f"{op} x{left.count(op)}" for op in sorted(set(left))])
            return row
        module = hawqc.compile_integer_only(path, input_shape=shape, **calib)
    except ValueError as err:
        row.update(compiled="no", error=str(err)[:300])
        return row
    except Exception as err:  # a traceback a user would see: recorded as such
        row.update(compiled="no (traceback)", error=f"{type(err).__name__}: {err}"[:300],
                   traceback=traceback.format_exc()[-2000:])
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    y = module(x)
    left = [f.split(" (")[1][:-1] for f in module.graph.metadata.get("float_ops", [])]  # ONNX op types
    row.update(compiled="yes", bit_exact=bool(np.array_equal(y, module.reference(x))),
               float_ops=[f"{op} x{left.count(op)}" for op in sorted(set(left))],
               float_inside=bool(float_ops(module.ir)))
    import onnxruntime as ort

    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    step = output_step(path)
    diff = float(np.abs(y - theirs).max())
    row["vs_onnxruntime"] = f"{diff / step:.1f} steps" if step else f"{diff:.3g} abs"
    row["argmax_agree"] = round(float((y.argmax(axis=1) == theirs.argmax(axis=1)).mean()), 4)
    if calibrate:
        from hawqc.api import integer_graph_of

        calibrated = module.graph.metadata.get("calibrated", {})
        row["calibrated_nodes"] = calibrated.get("nodes", [])
        graphs: dict[str, object] = {"calibrated": module.graph}
        try:
            graphs["float_islands"] = integer_graph_of(path, input_shape=shape)
        except ValueError as err:  # a region the reader cannot compute in float either
            row["float_islands_error"] = str(err)[:200]
        row["oracle"] = oracle_agreement(path, graphs, shape)
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["# Common CNNs x quantizers: compiled by hawqc for llvm, checked against the reference", "",
             "Random weights (BatchNorm statistics from random batches), batch 1, the model's input size; run on a "
             "2-core VM shared with other jobs. `bit-exact`: compiled module == numpy reference on every element. "
             "`float ops`: ONNX operators the quantizer left in float, which hawqc computes in float32 "
             "(`--strict` refuses them). `vs ORT`: largest difference from ONNX Runtime running the same file, and the share of argmax "
             "(per image, or per pixel for segmentation) that agree with it; random weights make deep nets amplify "
             "one-step rounding differences.", "",
             matrix(rows), "",
             "| model | quantizer | compiled | bit-exact | float ops | vs ORT | argmax = ORT | compile s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if not mode(r)):
        floats = ", ".join(r.get("float_ops", [])) or ("none" if r.get("compiled") == "yes" else "")
        lines.append(f"| {r['model']} | {r['quantizer']} | {r['compiled']} | {r.get('bit_exact', '')} | {floats} | "
                     f"{r.get('vs_onnxruntime', '')} | {r.get('argmax_agree', '')} | {r.get('compile_s', '')} | "
                     f"{str(r.get('error', '')).replace('|', '/')[:140]} |")
    earlier = [f"{r['model']}/{r['quantizer']} ({r['note']})" for r in rows if r.get("note")]
    if earlier:
        lines += ["", f"Rows from earlier runs: {', '.join(earlier)}."]
    lines += cuda_table([r for r in rows if mode(r) == "cuda"])
    calibrated = [r for r in rows if r.get("calib")]
    if calibrated:
        lines += ["", "## Float regions quantized by hawqc from calibration inputs (`--calib-data`)", "",
                  "The quantizer's own 4 random calibration batches given as `calib_data`. `float ops`: ONNX ops left "
                  "in float with calibration (without it: the row above). `vs oracle`: largest difference from the "
                  "file's float64 meaning (`hawqc.frontend.oracle`, float regions in float64) on 2 inputs, and the "
                  "share of argmax that agree, for the module with the regions in float (where the reader computes "
                  "them in float) and the calibrated one.", "",
                  "| model | quantizer | compiled | bit-exact | float ops | quantized by calibration | vs oracle, "
                  "float regions | vs oracle, calibrated | argmax = oracle (float / calibrated) | compile s | error |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in calibrated:
            floats = ", ".join(r.get("float_ops", [])) or ("none" if r.get("compiled") == "yes" else "")
            oracle = r.get("oracle", {})
            island, calib = oracle.get("float_islands", {}), oracle.get("calibrated", {})
            nodes = r.get("calibrated_nodes", [])
            ops = sorted({n.rsplit(" (", 1)[1][:-1] for n in nodes})
            lines.append(f"| {r['model']} | {r['quantizer']} | {r['compiled']} | {r.get('bit_exact', '')} | {floats} | "
                         f"{len(nodes)} ops ({', '.join(ops)}) | {island.get('vs_oracle', 'fails' if oracle else '')} | "
                         f"{calib.get('vs_oracle', '')} | {island.get('argmax_oracle', '-')} / "
                         f"{calib.get('argmax_oracle', '')} | {r.get('compile_s', '')} | "
                         f"{str(r.get('error', '')).replace('|', '/')[:140]} |")
    return "\n".join(lines) + "\n"


def matrix(rows: list[dict[str, object]]) -> str:
    """One line per model, one column per quantizer: ``exact`` (compiled, bit-exact, integer-only),
    ``exact, N float`` (N ONNX ops left in float by the quantizer), ``NOT exact``, ``fails``, ``quantizer
    fails``, blank where not run; ``; calibrated: ...`` the same with ``calib_data`` (``--calib``)."""
    names = list(dict.fromkeys(str(r["model"]) for r in rows))
    styles = [q for q in QUANTIZERS if any(r["quantizer"] == q for r in rows)]
    cells: dict[tuple[str, str], str] = {}
    for r in sorted((r for r in rows if mode(r) != "cuda"), key=lambda r: bool(r.get("calib"))):
        floats = sum(int(f.rsplit(" x", 1)[1]) if " x" in f else 1 for f in r.get("float_ops", []))
        cell = ("quantizer fails" if r["compiled"] == "quantizer failed" else "fails" if r["compiled"] != "yes"
                else "NOT exact" if not r["bit_exact"] else f"exact, {floats} float" if floats else "exact")
        key = (r["model"], r["quantizer"])
        cells[key] = f"{cells.get(key, '')}; calibrated: {cell}" if r.get("calib") else cell
    lines = ["| model | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(cells.get((n, q), "") for q in styles) + " |" for n in names]
    return "\n".join(lines) + "\n"


def cuda_table(rows: list[dict[str, object]]) -> list[str]:
    """The ``--cuda`` rows: built for sm_75, nvcc, the rewritten graph on llvm against the reference."""
    if not rows:
        return []
    lines = ["", f"## Built for `cuda -arch={SM75}` (`--cuda`)", "",
             f"The same files built for `cuda -arch={SM75}` (no GPU run): `cubin bytes`: nvcc's cubin of the module's "
             "CUDA source; `INT8 mma kernels`: conv/dense kernels on Tensor Cores (the others keep TVM's GPU "
             "lowering); `bit-exact`: the graph after the Tensor Core rewrite, each `mma` as plain loops over the "
             "same fragments, built for llvm == the numpy reference on every element.", "",
             "| model | quantizer | compiled | cubin bytes | INT8 mma kernels | bit-exact | float ops | compile s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floats = ", ".join(r.get("float_ops", [])) or ("none" if r.get("compiled") == "yes" else "")
        lines.append(f"| {r['model']} | {r['quantizer']} | {r['compiled']} | {r.get('cubin_bytes', '')} | "
                     f"{r.get('int8_mma_kernels', '')} | {r.get('bit_exact', '')} | {floats} | {r.get('compile_s', '')} | "
                     f"{str(r.get('error', '')).replace('|', '/')[:140]} |")
    return lines


def order(row: dict[str, object]) -> tuple[int, int]:
    """Rows in the order of the built-in model list and of the quantizers."""
    models = list(DEFAULT_MODELS)
    model = models.index(row["model"]) if row["model"] in models else len(models)
    return model, list(QUANTIZERS).index(row["quantizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already saved, run the others")
    parser.add_argument("--replace", action="store_true",
                        help="keep the rows already saved except those asked for, which run again")
    parser.add_argument("--calib", action="store_true",
                        help="compile with the quantizer's calibration inputs as calib_data (float regions quantized "
                             "by hawqc) and compare with the file's float64 meaning; rows kept apart from the others")
    parser.add_argument("--cuda", action="store_true",
                        help=f"build for cuda -arch={SM75}: nvcc on the CUDA source, the Tensor Core rewrite built for "
                             "llvm against the reference; rows kept apart from the others")
    args = parser.parse_args()
    if args.calib and args.cuda:
        parser.error("--calib and --cuda are separate runs")
    wanted = "calib" if args.calib else "cuda" if args.cuda else ""
    out = Path(args.out)
    saved = out / "zoo_compile.json"
    rows = json.loads(saved.read_text())["rows"] if (args.resume or args.replace) and saved.exists() else []
    asked = {(m, q, wanted) for m in args.models.split(",") for q in args.quantizers.split(",")}
    if args.replace:
        rows = [r for r in rows if (r["model"], r["quantizer"], mode(r)) not in asked]
    done = {(r["model"], r["quantizer"], mode(r)) for r in rows}
    for name in args.models.split(","):
        for quantizer in args.quantizers.split(","):
            if (name, quantizer, wanted) in done:
                continue
            with tempfile.TemporaryDirectory() as folder:
                row = check(name, quantizer, Path(folder), args.calib, args.cuda)
            print({k: v for k, v in row.items() if k != "traceback"}, flush=True)
            rows = sorted([*rows, row], key=order)
            write_atomic(saved, json.dumps({"torch": torch.__version__, "rows": rows}, indent=1).encode())
            write_atomic(out / "zoo_compile.md", markdown(rows).encode())
    print(markdown(rows))


if __name__ == "__main__":
    main()
