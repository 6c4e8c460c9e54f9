"""benchmarks/cpu_latency.py without timing any engine: the report's arithmetic, its errors, the worker's failure line;
the int8 peak loops of benchmarks/vnni_peak.py."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("cpu_latency", BENCHMARKS / "cpu_latency.py")
cpu_latency = sys.modules.setdefault("cpu_latency", importlib.util.module_from_spec(_spec))  # dataclasses need it
_spec.loader.exec_module(cpu_latency)


def figure(model: str, engine: str, ms: float, load: float = 0.1) -> dict:
    return {"model": model, "batch": 1, "engine": engine, "ms": ms, "load": load, "other_cores": 0.0}


def test_each_kernel_is_rated_against_the_peak_of_its_own_instructions() -> None:
    profile = {"case": "m batch 8", "artifact": "hawqc-ort", "runs": 3, "load": 0.1,
               "layers": [{"layer": "conv1", "kernel": "conv2d_amx_requant", "gmac": 2.0, "us": 1000, "gmac_per_s": 2000.0},
                          {"layer": "conv2", "kernel": "conv2d_vnni_requant", "gmac": 0.4, "us": 1000, "gmac_per_s": 400.0}]}
    table = cpu_latency.layers_markdown(profile, {"vnni": (800.0, "vnni loop"), "amx": (8000.0, "amx loop")})
    assert "| conv1 | conv2d_amx_requant | 2.000 | 1000 | 2000 | 25 |" in table
    assert "| conv2 | conv2d_vnni_requant | 0.400 | 1000 | 400 | 50 |" in table
    assert "| all | | 2.400 | 2000 | 1200 | 150 of VNNI, 15 of AMX |" in table
    vnni_only = cpu_latency.layers_markdown(profile, {"vnni": (800.0, "vnni loop")})
    assert "| conv1 | conv2d_amx_requant | 2.000 | 1000 | 2000 | 250 |" in vnni_only


def test_report_ratio_geomean_and_errors(tmp_path: Path) -> None:
    cases = [cpu_latency.Case("a", 1, [1, 3, 8, 8], tmp_path, bit_exact={"hawqc-ort": True}),
             cpu_latency.Case("b", 1, [1, 3, 8, 8], tmp_path, bit_exact={"hawqc-ort": True, "hawqc-w4a4": False})]
    figures = [figure("a", "hawqc", 10.0), figure("a", "onnxruntime", 20.0), figure("a", "openvino", 12.5),
               figure("b", "hawqc", 30.0, load=0.9), figure("b", "onnxruntime", 15.0),
               {"model": "b", "batch": 1, "engine": "openvino", "error": "RuntimeError: cannot read"}]
    rows = cpu_latency.rows_by_case(figures, cases)
    assert [r["vs_best_peer"] for r in rows] == [0.8, 2.0]
    assert math.isclose(cpu_latency.geomean([0.8, 2.0]), math.sqrt(1.6))
    report = {"machine": "test", "rounds": 2, "runs": 5, "peak_gmac_per_s": 400.0, "peak": "measured", "notes": [],
              "figures": figures, "rows": rows, "standalone": []}
    text = cpu_latency.latency_markdown(report)
    assert "| geometric mean | | | | | 1.26 |" in text
    assert "NO: hawqc-w4a4" in text and "0.90 loaded" in text
    assert "| b | 1 | openvino | RuntimeError: cannot read |" in text


def test_worker_failure_is_one_json_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_latency_worker.py"), "onnxruntime",
                           str(tmp_path / "missing.onnx"), "1,3,8,8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error" in json.loads(done.stdout.strip().splitlines()[-1])


def test_unknown_model_is_a_one_line_error() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_latency.py"), "--models", "resnet18,nosuch"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown model nosuch" in done.stderr.strip().splitlines()[-1]


def test_a_peer_failing_by_default_is_timed_under_its_fallback(tmp_path: Path, monkeypatch) -> None:
    """OpenVINO's default CPU configuration fails on some machines (its AMX int8 path): the harness times it
    under its fallback environment instead, from then on, and the table marks the figure and says why."""
    calls = []

    def run_worker(engine, case, runs, layers=False, env=()):
        calls.append((engine.label, env))
        if engine.label == "openvino" and not env:
            return {"error": "RuntimeError: No suitable implementations."}
        return {"median_ms": 10.0 if engine.label == "hawqc" else 8.0, "min_ms": 1.0, "max_ms": 20.0, "runs": 5,
                "load_before": 0.1, "load_after": 0.1, "other_cores": 0.0}

    monkeypatch.setattr(cpu_latency, "run_worker", run_worker)
    case = cpu_latency.Case("a", 1, [1, 3, 8, 8], tmp_path, bit_exact={"hawqc-ort": True})
    engines = [e for e in cpu_latency.ENGINES if e.label in ("hawqc", "openvino")]
    figures = cpu_latency.time_case(case, engines, rounds=2, runs=5)
    fallback = dict(next(e for e in engines if e.label == "openvino").fallback)
    assert calls == [("hawqc", ()), ("openvino", ()), ("openvino", tuple(fallback.items())), ("hawqc", ()),
                     ("openvino", tuple(fallback.items()))]
    ov = next(f for f in figures if f["engine"] == "openvino")
    assert ov["ms"] == 8.0 and ov["fallback"]["default_error"].endswith("No suitable implementations.")
    report = {"machine": "test", "rounds": 2, "runs": 5, "peak_gmac_per_s": 400.0, "peak": "measured", "notes": [],
              "figures": figures, "rows": cpu_latency.rows_by_case(figures, [case]), "standalone": []}
    text = cpu_latency.latency_markdown(report)
    assert "| a | 1 | 10.00 | - | 8.00† | 1.25 |" in text
    assert "† openvino fails in its default configuration on this machine (RuntimeError: No suitable" in text


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def _peak_script():
    spec = importlib.util.spec_from_file_location("vnni_peak", BENCHMARKS / "vnni_peak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("gcc") is None or "avx512_vnni" not in _cpu_flags(), reason="needs gcc and AVX-512 VNNI")
def test_the_int8_peak_loops_count_their_macs(tmp_path: Path) -> None:
    """The VNNI loop (and, where the CPU has it, the AMX one) gives a positive peak and says how it was
    measured; AMX's tiles do far more per core than 512-bit ``vpdpbusd``."""
    peak = _peak_script()
    vnni, how = peak.measure(1, 0.05, tmp_path)
    assert vnni > 10 and "vpdpbusd" in how
    if "amx_int8" in _cpu_flags():
        amx, how = peak.measure(1, 0.05, tmp_path, isa="amx")
        assert amx > 2 * vnni and "tdpbusd" in how


def test_conv_kernels_script_times_each_kernel_and_compares_outputs(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(BENCHMARKS / "conv_kernels.py"), "2,8,8,64,64,3,1", "--runs", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "conv_kernels.json").read_text())["rows"]
    assert "vnni" in [r["kernel"] for r in rows] and all(r["outputs_equal"] and r["ms"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "conv_kernels.py"), "2,8,8"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "seven positive integers" in bad.stderr
