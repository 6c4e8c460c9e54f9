"""hawqc and ONNX Runtime against the float64 oracle of the QDQ file they both run.

    nice -n 10 python benchmarks/oracle_agreement.py [--models resnet18,resnet50] \\
        [--styles ort-u8,ort-s8,ort-qop,nncf,hawqc-w8a8,hawqc-w4a4] [--images 4] [--work benchmarks/.cache/oracle]

For each model of the zoo (random weights, BatchNorm recalibrated: ``cpu_latency.py``'s preparation)
and each QDQ style (ONNX Runtime ``quantize_static``: its uint8 default, symmetric int8, or its operator form
(QLinearConv, QLinearAdd, ..., uint8, as ``tests/third_party_quantizers.py`` runs it; the oracle reads each
QLinear* node as its QDQ meaning, :func:`hawqc.frontend.oracle.as_qdq`); NNCF's
post-training quantization as ``tests/third_party_quantizers.py`` runs it; hawqc's own W8A8/W4A4
exports), on ``--images`` images of batch 1, compares with the oracle
(:mod:`hawqc.frontend.oracle`, the file run in float64) the output of

- hawqc (its numpy reference, which every compiled module equals bit for bit; ``--compile`` checks
  that on the first image),
- ONNX Runtime with its default optimisations and with them off,

as exact %, within one output step % and mean distance in output steps; and hawqc layer by layer
(every quantized tensor recomputed from the oracle's own inputs to it): the share of mismatching
elements, and the worst layer. For hawqc's own exports also ONNX Runtime (optimisations off) against
hawqc. Writes ``results/oracle_agreement.{json,md}``, its rows replacing those of the same model and style.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import cpu_latency  # noqa: E402  (beside this file: the zoo's preparation)
from third_party_quantizers import quantize_with  # noqa: E402  (shared with the tests: NNCF's recipe)

from hawqc.fileio import write_atomic  # noqa: E402

STYLES = ("ort-u8", "ort-s8", "ort-qop", "nncf", "hawqc-w8a8", "hawqc-w4a4")
QUANTIZE_WITH = {"ort-qop": "ort-qoperator", "nncf": "nncf"}
"""Styles made by ``tests/third_party_quantizers.py``, by its quantizer name."""
OWN = {"hawqc-w8a8": "uniform8", "hawqc-w4a4": "uniform4"}
RESULTS = Path(__file__).parent / "results"


def prepare(name: str, styles: list[str], work: Path) -> tuple[dict[str, Path | str], tuple[int, ...]]:
    """The QDQ file of each style (made once, kept under ``work``; or why it could not be made: hawqc's own
    quantizer refusing a model is one line of the table) and the input shape (batch 1)."""
    case = cpu_latency.new_case(name, 1, work)
    files: dict[str, Path | str] = {"ort-u8": case.folder / "qdq.onnx", "ort-s8": case.folder / "qdq-s8.onnx",
             **{style: case.folder / f"{QUANTIZE_WITH.get(style, style)}.onnx" for style in ("ort-qop", "nncf", *OWN)}}
    missing = [s for s in styles if not files[s].exists()]
    if missing:
        from hawqc import quantize
        from hawqc.quant.export import to_onnx

        case.folder.mkdir(parents=True, exist_ok=True)
        model, calib = cpu_latency.float_model(name)
        for style in missing:
            try:
                if style in QUANTIZE_WITH:
                    quantize_with(QUANTIZE_WITH[style], model, tuple(case.shape), case.folder)
                elif style.startswith("ort"):
                    cpu_latency.export_onnx(model, calib, case, symmetric=style == "ort-s8")
                else:
                    to_onnx(quantize(model, OWN[style], calib), files[style], example_input=calib[0][:1])
            except Exception as err:  # one quantizer's failure is one line of the table
                files[style] = cpu_latency.one_line(err)
    return {s: f for s, f in files.items() if s in styles and (isinstance(f, str) or f.exists())}, tuple(case.shape)


def ort_session(model: Any, optimized: bool) -> Any:
    """An ONNX Runtime session of ``model`` (2 threads), or the one-line reason it has none."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3  # errors only
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # e.g. its QDQ fusion on 4-bit tensors
        return cpu_latency.one_line(err)


def last_quantized(model: Any, graph: Any) -> tuple[str, str, float, int]:
    """The file's last quantized tensor that hawqc computes: (its QuantizeLinear output, the
    DequantizeLinear output that reads it, scale, zero point). End to end is measured there, in its
    integer steps (an output that is a float accumulator has no grid)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    computed = {op.output for op in graph.ops}
    for node in reversed(model.graph.node):
        if node.op_type == "DequantizeLinear" and node.input[0] in computed:
            zero_point = int(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
            return node.input[0], node.output[0], float(inits[node.input[1]]), zero_point
    raise ValueError("the file has no quantized tensor that hawqc computes")


def measure(path: Path, shape: tuple[int, ...], images: int, compile_check: bool) -> dict[str, Any]:
    """Every comparison for one QDQ file."""
    import onnx

    from hawqc.frontend import oracle
    from hawqc.frontend.onnx_qdq import from_onnx
    from hawqc.reference.graph import execute
    from hawqc.reference.kernels import KERNELS

    model = onnx.load(str(path))
    graph = from_onnx(model, shape)
    quantized, dequantized, scale, zero_point = last_quantized(model, graph)
    with_output = onnx.ModelProto.FromString(model.SerializeToString())
    with_output.graph.output.append(onnx.helper.make_tensor_value_info(dequantized, onnx.TensorProto.FLOAT, None))
    session = oracle.evaluator(model)
    engines = {label: ort_session(with_output, optimized) for label, optimized in (("ort", True), ("ort-noopt", False))}
    outputs: dict[str, list[np.ndarray]] = {"oracle": [], "hawqc": [], "ort": [], "ort-noopt": []}
    layers: dict[str, list[int]] = {}
    module = None
    rng = np.random.default_rng(0)
    for i in range(images):
        x = rng.standard_normal(shape).astype(np.float32)
        values = session.run(None, {session.input_names[0]: x.astype(np.float64)}, intermediate=True)
        outputs["oracle"].append(np.asarray(values[quantized], np.int64))
        for layer in oracle.layer_by_layer(graph, values, x):
            counts = layers.setdefault(layer.name, [0, 0])
            counts[0] += layer.mismatches
            counts[1] += layer.elements
        del values
        trace: dict[str, Any] = {}
        y = execute(graph, x, KERNELS, trace)
        outputs["hawqc"].append(np.asarray(trace[quantized], np.int64))
        if compile_check and i == 0:
            import hawqc

            module = hawqc.compile_integer_only(graph, input_shape=shape)
            if not np.array_equal(module(x), y):
                raise SystemExit(f"{path}: the compiled module differs from the reference")
        for label, engine in engines.items():
            if not isinstance(engine, str):
                y = engine.run([dequantized], {engine.get_inputs()[0].name: x})[0]
                outputs[label].append(np.rint(y.astype(np.float64) / scale).astype(np.int64) + zero_point)
    got = {k: np.concatenate(v) for k, v in outputs.items() if v}
    result: dict[str, Any] = {"compared_at": quantized}
    for k in ("hawqc", "ort", "ort-noopt"):
        result[f"{k} vs oracle"] = _agreement(got[k], got["oracle"]) if k in got else {"error": engines[k]}
    result["ort-noopt vs hawqc"] = _agreement(got["ort-noopt"], got["hawqc"]) if "ort-noopt" in got else {}
    mismatches, elements = (sum(c[j] for c in layers.values()) for j in (0, 1))
    worst = max(layers.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1), default=("-", [0, 1]))
    worst = worst if worst[1][0] else ("-", [0, 1])
    result["layers"] = {"tensors": len(layers), "elements": elements, "mismatches": mismatches,
                        "mismatch_rate": mismatches / max(elements, 1), "worst": worst[0],
                        "worst_rate": worst[1][0] / max(worst[1][1], 1)}
    result["compiled_equals_reference"] = True if module is not None else None
    return result


def _agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Integer tensors compared in their steps."""
    from hawqc.frontend.oracle import agreement

    a = agreement(got, want.reshape(got.shape), 1.0)
    return {"exact_pct": a.exact_pct, "within_one_pct": a.within_one_pct, "mean_steps": a.mean_steps,
            "elements": a.elements}


def markdown(rows: list[dict[str, Any]], images: int) -> str:
    def cell(a: dict[str, Any]) -> str:
        if "exact_pct" not in a:
            return "fails to load" if "error" in a else ""
        return f"{a['exact_pct']:.1f}% / {a['within_one_pct']:.1f}% / {a['mean_steps']:.3f}"

    lines = [f"Against the float64 oracle, {images} images of batch 1, at the file's last quantized tensor (the "
             "output of ONNX Runtime's files, the pooled features before the float fc of hawqc's), in its "
             "steps: exact / within one step / mean.",
             "", "| model | QDQ file | hawqc | ONNX Runtime | ONNX Runtime, opt. off | hawqc layer by layer: "
             "mismatching elements (worst tensor) | ONNX Runtime opt. off vs hawqc | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['style']} | {r['error']} | | | | | {r['seconds']:.0f} |")
            continue
        layer = r["layers"]
        own = cell(r["ort-noopt vs hawqc"]) if r["style"] in OWN else ""
        lines.append(f"| {r['model']} | {r['style']} | {cell(r['hawqc vs oracle'])} | {cell(r['ort vs oracle'])} | "
                     f"{cell(r['ort-noopt vs oracle'])} | {layer['mismatches']} of {layer['elements']} "
                     f"({layer['mismatch_rate']:.1e}; worst {layer['worst_rate']:.1e}) | {own} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".cache" / "oracle")
    parser.add_argument("--compile", action="store_true", help="check the compiled module on the first image")
    parser.add_argument("--out", type=Path, default=RESULTS / "oracle_agreement")
    args = parser.parse_args()
    styles = args.styles.split(",")
    if unknown := sorted(set(styles) - set(STYLES)):
        raise SystemExit(f"unknown styles {', '.join(unknown)}; choose from {', '.join(STYLES)}")
    rows = []
    for name in args.models.split(","):
        files, shape = prepare(name, styles, args.work)
        for style, path in files.items():
            start = time.time()
            try:
                row = {"model": name, "style": style,
                       **({"error": path} if isinstance(path, str) else measure(path, shape, args.images, args.compile))}
            except Exception as err:  # one file's failure is one line of the table
                row = {"model": name, "style": style, "error": cpu_latency.one_line(err)}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        save(rows, args.images, args.out)  # after each model: a long run's partial table
    print(markdown(rows, args.images))


def save(rows: list[dict[str, Any]], images: int, out: Path) -> None:
    """The table at ``out`` (JSON and markdown): these rows, and the saved table's rows of other models and
    styles taken on as many images."""
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    if saved.get("images") == images:
        fresh = {(r["model"], r["style"]): r for r in rows}
        rows = [fresh.pop((r["model"], r["style"]), r) for r in saved["rows"]]
        for key, row in fresh.items():  # a new style after its model's rows
            at = max((i + 1 for i, r in enumerate(rows) if r["model"] == key[0]), default=len(rows))
            rows.insert(at, row)
    write_atomic(out.with_suffix(".json"), json.dumps({"images": images, "rows": rows}, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(rows, images))


if __name__ == "__main__":
    main()
