"""benchmarks/gpu_check.py's dry run (no GPU): every module built for sm_90, nvcc where installed, the same
graphs on llvm against the reference, the JSON and markdown written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_its_report(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run",
                           "--models", "tiny_resnet"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["latency"] == [] and "needs the GPU" in report["latency_skipped"]
    checks = {row["config"]: row for row in report["checks"]}
    assert set(checks) == {"W8A8", "W4A4", "mixed", "ONNX Runtime QDQ"}
    assert all(row["bit_exact"] and row["mismatches"] == 0 for row in checks.values())
    assert checks["W4A4"]["int4_mma_kernels"] > 0 and checks["W8A8"]["int4_mma_kernels"] == 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny_resnet | 1x28x28 | W4A4 |" in markdown and "Latency: dry run" in markdown
