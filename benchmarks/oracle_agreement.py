"""hawqc and ONNX Runtime against the float64 oracle of the QDQ file they both run.

    nice -n 10 python benchmarks/oracle_agreement.py [--models resnet18,resnet50] \\
        [--styles ort-u8,ort-s8,hawqc-w8a8,hawqc-w4a4] [--images 4] [--work benchmarks/.cache/oracle]

For each model of the zoo (random weights, BatchNorm recalibrated: ``cpu_latency.py``'s preparation)
and each QDQ style (ONNX Runtime ``quantize_static``: its uint8 default or symmetric int8; hawqc's own
W8A8/W4A4 exports), on ``--images`` images of batch 1, compares with the oracle
(:mod:`hawqc.reference.oracle`, the file run in float64) the output of

- hawqc (its numpy reference, which every compiled module equals bit for bit; ``--compile`` checks
  that on the first image),
- ONNX Runtime with its default optimisations and with them off,

as exact %, within one output step % and mean distance in output steps; and hawqc layer by layer
(every quantized tensor recomputed from the oracle's own inputs to it): the share of mismatching
elements, and the worst layer. For hawqc's own exports also ONNX Runtime (optimisations off) against
hawqc. Writes ``results/oracle_agreement.{json,md}``.
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
import cpu_latency  # noqa: E402  (beside this file: the zoo's preparation)

from hawqc.fileio import write_atomic  # noqa: E402

STYLES = ("ort-u8", "ort-s8", "hawqc-w8a8", "hawqc-w4a4")
OWN = {"hawqc-w8a8": "uniform8", "hawqc-w4a4": "uniform4"}
RESULTS = Path(__file__).parent / "results"


def prepare(name: str, styles: list[str], work: Path) -> tuple[dict[str, Path], tuple[int, ...]]:
    """The QDQ file of each style (made once, kept under ``work``) and the input shape (batch 1)."""
    case = cpu_latency.new_case(name, 1, work)
    files = {"ort-u8": case.folder / "qdq.onnx", "ort-s8": case.folder / "qdq-s8.onnx",
             **{style: case.folder / f"{style}.onnx" for style in OWN}}
    missing = [s for s in styles if not files[s].exists()]
    if missing:
        from hawqc import quantize
        from hawqc.quant.export import to_onnx

        case.folder.mkdir(parents=True, exist_ok=True)
        model, calib = cpu_latency.float_model(name)
        for style in missing:
            if style.startswith("ort"):
                cpu_latency.export_onnx(model, calib, case, symmetric=style == "ort-s8")
            else:
                to_onnx(quantize(model, OWN[style], calib), files[style], example_input=calib[0][:1])
    return {s: files[s] for s in styles}, tuple(case.shape)


def ort_session(path: Path, optimized: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(path: Path, shape: tuple[int, ...], images: int, compile_check: bool) -> dict[str, Any]:
    """Every comparison for one QDQ file."""
    import onnx

    from hawqc.frontend.onnx_qdq import from_onnx
    from hawqc.reference import oracle

    model = onnx.load(str(path))
    graph = from_onnx(model, shape)
    step = np.asarray(graph.ops[-1].consts["scale"], dtype=np.float64)  # the output dequantize's grid
    session = oracle.evaluator(model)
    engines = {"ort": ort_session(path, True), "ort-noopt": ort_session(path, False)}
    outputs: dict[str, list[np.ndarray]] = {"oracle": [], "hawqc": [], "ort": [], "ort-noopt": []}
    layers: dict[str, list[int]] = {}
    module = None
    rng = np.random.default_rng(0)
    for i in range(images):
        x = rng.standard_normal(shape).astype(np.float32)
        values = session.run(None, {session.input_names[0]: x.astype(np.float64)}, intermediate=True)
        outputs["oracle"].append(np.asarray(values[model.graph.output[0].name]))
        for layer in oracle.layer_by_layer(graph, values, x):
            counts = layers.setdefault(layer.name, [0, 0])
            counts[0] += layer.mismatches
            counts[1] += layer.elements
        del values
        outputs["hawqc"].append(graph.run(x))
        if compile_check and i == 0:
            import hawqc

            module = hawqc.compile_integer_only(graph, input_shape=shape)
            if not np.array_equal(module(x), outputs["hawqc"][0]):
                raise SystemExit(f"{path}: the compiled module differs from the reference")
        for label, engine in engines.items():
            outputs[label].append(engine.run(None, {engine.get_inputs()[0].name: x})[0])
    got = {k: np.concatenate(v) for k, v in outputs.items()}
    result: dict[str, Any] = {f"{k} vs oracle": _agreement(got[k], got["oracle"], step)
                              for k in ("hawqc", "ort", "ort-noopt")}
    result["ort-noopt vs hawqc"] = _agreement(got["ort-noopt"], got["hawqc"], step)
    mismatches, elements = (sum(c[j] for c in layers.values()) for j in (0, 1))
    worst = max(layers.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1), default=("-", [0, 1]))
    worst = worst if worst[1][0] else ("-", [0, 1])
    result["layers"] = {"tensors": len(layers), "elements": elements, "mismatches": mismatches,
                        "mismatch_rate": mismatches / max(elements, 1), "worst": worst[0],
                        "worst_rate": worst[1][0] / max(worst[1][1], 1)}
    result["compiled_equals_reference"] = True if module is not None else None
    return result


def _agreement(got: np.ndarray, want: np.ndarray, step: np.ndarray) -> dict[str, float]:
    from hawqc.reference.oracle import agreement

    a = agreement(got, want, step)
    return {"exact_pct": a.exact_pct, "within_one_pct": a.within_one_pct, "mean_steps": a.mean_steps,
            "elements": a.elements}


def markdown(rows: list[dict[str, Any]], images: int) -> str:
    def cell(a: dict[str, float]) -> str:
        return f"{a['exact_pct']:.1f}% / {a['within_one_pct']:.1f}% / {a['mean_steps']:.3f}"

    lines = [f"Against the float64 oracle, {images} images of batch 1, output steps: exact / within one step / mean.",
             "", "| model | QDQ file | hawqc | ONNX Runtime | ONNX Runtime, opt. off | hawqc layer by layer: "
             "mismatching elements (worst tensor) | ONNX Runtime opt. off vs hawqc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['style']} | {r['error']} | | | | |")
            continue
        layer = r["layers"]
        own = cell(r["ort-noopt vs hawqc"]) if r["style"] in OWN else ""
        lines.append(f"| {r['model']} | {r['style']} | {cell(r['hawqc vs oracle'])} | {cell(r['ort vs oracle'])} | "
                     f"{cell(r['ort-noopt vs oracle'])} | {layer['mismatches']} of {layer['elements']} "
                     f"({layer['mismatch_rate']:.1e}; worst {layer['worst_rate']:.1e}) | {own} |")
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
                row = {"model": name, "style": style, **measure(path, shape, args.images, args.compile)}
            except Exception as err:  # one file's failure is one line of the table
                row = {"model": name, "style": style, "error": cpu_latency.one_line(err)}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = markdown(rows, args.images)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps({"images": args.images, "rows": rows}, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), report)


if __name__ == "__main__":
    main()
