"""Ctrl-C: "interrupted", exit status 130, no traceback, no hang, nothing half-written on disk.

Each test starts ``hawqc`` in a session of its own, waits for a known point (a line in the tuning
log, worker processes, TVM loaded), then sends SIGINT: to the process, or to its whole process group
as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from hawqc import interrupts

ROOT = Path(__file__).resolve().parents[1]
STEADY = ["--max-spread", "1e9", "--max-load", "1e9"]  # no re-measuring on a busy test machine


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hawqc.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for(process: subprocess.Popen, reached: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not reached():
        assert process.poll() is None, f"the command ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _interrupt(process: subprocess.Popen, group: bool = False) -> tuple[str, str]:
    """SIGINT to the process (or its process group); its stdout and stderr once it has ended."""
    if group:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the command hung after SIGINT")
    return out, err


def _assert_interrupted(process: subprocess.Popen, err: str, command: str) -> None:
    assert process.returncode == interrupts.EXIT_STATUS, err
    assert err.strip().splitlines()[-1] == f"hawqc {command}: interrupted", err
    assert "Traceback" not in err and "Segmentation" not in err, err
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(process.pid), "worker processes were left behind"


def _group_alive(group: int) -> list[int]:
    """Processes of the process group ``group`` that still run (zombies awaiting their reaper excepted)."""
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == group and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def _log_has(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text()


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writers."""
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def _rows(table: Path) -> list[dict]:
    return json.loads(table.read_text())["rows"] if table.exists() else []


def test_ctrl_c_while_tune_measures(tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    process = _start(["tune", "--layers", "tiny_resnet", "--bits", "4,8", "--trials", "0", "--repeat", "200",
                      "--min-repeat-ms", "50", *STEADY, "-o", str(table)], tmp_path)
    _wait_for(process, _log_has(tmp_path / "table.tuning" / "tune.log", "measuring"), "measurement")
    time.sleep(1.0)  # inside the 200 timed repeats (10 s at least)
    _, err = _interrupt(process)
    _assert_interrupted(process, err, "tune")
    assert _rows(table) == [] and not _leftovers(tmp_path)  # the workload being measured is not recorded


def test_ctrl_c_while_tune_searches(tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    process = _start(["tune", "--layers", "tiny_resnet", "--bits", "8", "--trials", "4", "--repeat", "2",
                      "--min-repeat-ms", "5", *STEADY, "-o", str(table)], tmp_path)
    parent, searching = psutil.Process(process.pid), _log_has(tmp_path / "table.tuning" / "tune.log", "searching")

    def workers_started() -> bool:  # MetaSchedule's pool of Python build workers, not a linker
        return searching() and any(c.name().startswith("python") for c in parent.children())

    _wait_for(process, workers_started, "search with its worker processes")
    time.sleep(0.5)
    _, err = _interrupt(process, group=True)  # as a terminal's Ctrl-C: the workers get it too
    _assert_interrupted(process, err, "tune")
    databases = tmp_path / "table.tuning" / "databases"
    assert not list(databases.glob("*/done"))  # the interrupted search is not marked finished
    assert _rows(table) == [] and not _leftovers(tmp_path)


def test_ctrl_c_while_compiling_leaves_no_artifact(tmp_path: Path) -> None:
    import torch

    from hawqc import models, quantize
    from hawqc.quant.export import to_onnx

    torch.manual_seed(0)
    to_onnx(quantize(models.get("tiny_resnet"), "uniform8", [torch.randn(2, 1, 28, 28)]), tmp_path / "tiny.onnx")
    out = tmp_path / "artifact"
    process = _start(["compile", "tiny.onnx", "--input-shape", "1,1,28,28", "-o", str(out)], tmp_path)
    tvm_loaded = lambda: "libtvm" in Path(f"/proc/{process.pid}/maps").read_text()  # noqa: E731
    _wait_for(process, tvm_loaded, "TVM loaded")
    time.sleep(0.5)
    _, err = _interrupt(process)
    _assert_interrupted(process, err, "compile")
    assert not out.exists() and not _leftovers(tmp_path)


def test_an_interrupt_inside_a_command_is_one_line(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hawqc import cli
    from hawqc.commands import compile as compile_command

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_command, "run", interrupted)
    assert cli.main(["compile", "model.onnx"]) == interrupts.EXIT_STATUS
    assert capsys.readouterr().err == "hawqc compile: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is not interrupts._on_sigint  # the handler is put back


def test_staged_outputs_appear_together_or_not_at_all(tmp_path: Path) -> None:
    from hawqc.fileio import staged_outputs

    with pytest.raises(KeyboardInterrupt), staged_outputs(tmp_path / "out") as stage:
        (stage / "model.onnx").write_text("a")
        raise KeyboardInterrupt  # Ctrl-C between quantize's writes
    assert list((tmp_path / "out").iterdir()) == []
    with staged_outputs(tmp_path / "out") as stage:
        (stage / "model.onnx").write_text("a")
        (stage / "bit_config.json").write_text("b")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bit_config.json", "model.onnx"]
