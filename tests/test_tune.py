"""hawqc tune: workloads, the latency table, bit-exact rejection, resume after SIGKILL, RPC, report, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hawqc import cli, models
from hawqc.autotune import measure as measure_module
from hawqc.autotune import runner, workloads
from hawqc.autotune.measure import Device, Timing
from hawqc.autotune.predict import predict_missing
from hawqc.autotune.report import layer_ratios, markdown
from hawqc.autotune.table import COLUMNS, LatencyTable
from hawqc.autotune.workloads import Workload

FAST = Timing(repeat=2, min_repeat_ms=5, max_spread=float("inf"), max_load=float("inf"))  # never re-measured
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_groups() -> list[workloads.LayerGroup]:
    return workloads.extract("tiny_resnet")


@pytest.fixture(scope="module")
def host_target() -> dict:
    from hawqc.runtime.target import parse_target

    return parse_target("llvm")


def test_workloads_are_deduplicated_keeping_every_layer(tiny_groups: list[workloads.LayerGroup]) -> None:
    layers = [name for g in tiny_groups for name in g.layers]
    assert sorted(layers) == sorted(models.quantizable_layers(models.get("tiny_resnet")))
    keys = [g.workload.key for g in tiny_groups]
    assert len(set(keys)) == len(keys) < len(layers)
    shared = next(g for g in tiny_groups if "layer1.0.conv1" in g.layers)
    assert shared.layers == ["layer1.0.conv1", "layer1.0.conv2"]
    assert shared.workload == Workload("conv2d", (1, 16, 28, 28), (16, 16, 3, 3), (1, 1), (1, 1, 1, 1))
    assert all(Workload.from_key(k) == g.workload for k, g in zip(keys, tiny_groups))


def test_workloads_of_an_integer_graph_file_match_the_model(tmp_path: Path,
                                                            tiny_groups: list[workloads.LayerGroup]) -> None:
    import torch

    from hawqc import api

    torch.manual_seed(0)
    graph = api.integer_graph_of(models.get("tiny_resnet"), "uniform8", calib_data=[torch.randn(8, 1, 28, 28)])
    graph.save(tmp_path / "tiny.int.npz")
    from_file = workloads.extract(tmp_path / "tiny.int.npz", (1, 1, 28, 28))
    assert [(g.workload.key, g.layers) for g in from_file] == [(g.workload.key, g.layers) for g in tiny_groups]


def test_workloads_of_a_torch_model_match_the_built_in_name(tiny_groups: list[workloads.LayerGroup]) -> None:
    model = models.get("tiny_resnet")
    from_module = workloads.extract(model, (1, 1, 28, 28))
    assert [(g.workload.key, g.layers) for g in from_module] == [(g.workload.key, g.layers) for g in tiny_groups]
    with pytest.raises(ValueError, match="input shape"):
        workloads.extract(model)


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_graph_has_informative_outputs_in_the_bit_range(tiny_groups: list[workloads.LayerGroup],
                                                              bits: int) -> None:
    workload = tiny_groups[1].workload
    graph, x = workloads.layer_graph(workload, bits, bits), workloads.random_input(workload, bits)
    low, high = workloads.activation_range(bits)
    assert x.min() >= low and x.max() <= high and x.max() > x.min()
    assert np.abs(graph.ops[0].consts["weight"]).max() <= 2 ** (bits - 1)
    y = graph.run(x)
    assert y.std() > 10 and np.mean(np.abs(y) == 128) < 0.05  # neither all zero nor saturated


def _run(groups: list, path: Path, target: dict, **kwargs) -> runner.RunResult:
    options = runner.RunOptions(target, kwargs.pop("bits", [8]), kwargs.pop("trials", 0), FAST, **kwargs)
    return runner.run(groups, LatencyTable.open(path), options, log=lambda line: None)


def test_table_has_the_schema_the_ilp_reads(tmp_path: Path, tiny_groups: list, host_target: dict) -> None:
    path = tmp_path / "table.json"
    result = _run(tiny_groups, path, host_target, bits=[4, 8], limit=2)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and result.done == 4 and not result.failed
    assert data["input_shape"] == list(tiny_groups[0].workload.input_shape)
    assert data["machine"] == Device().machine(runner.target_text(host_target)) and data["machine"]["cores"] >= 1
    rows = data["rows"]
    assert len(rows) == 2 * sum(len(g.layers) for g in tiny_groups[:2])
    for row in rows:
        assert set(COLUMNS) <= set(row) and row["schedule"] == "default" and "predicted" not in row
        assert row["latency_ms"] > 0 and row["n_runs"] == FAST.repeat and row["target"].startswith("llvm")
        assert row["spread"] >= 1 and row["load_1min"] >= 0 and row["noisy"] is False
    csv_lines = path.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith(",".join(COLUMNS)) and len(csv_lines) == len(rows) + 1
    again = _run(tiny_groups, path, host_target, bits=[4, 8], limit=2)
    assert (again.done, again.skipped) == (0, 4)


def test_a_wrong_candidate_is_rejected_and_logged(tmp_path: Path, tiny_groups: list, host_target: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from hawqc.runtime.module import compile_graph

    def wrong_but_fast(default, tuner, databases, starting=None):  # one weight changed: a schedule that computes nonsense
        graph = workloads.layer_graph(tiny_groups[0].workload, 8, 8)
        graph.ops[0].consts["weight"] = graph.ops[0].consts["weight"].copy()
        graph.ops[0].consts["weight"].flat[0] += 1
        return compile_graph(graph, default.input_shape, default.target, input_dtype="int8")

    monkeypatch.setattr(runner, "tuned_module", wrong_but_fast)
    path = tmp_path / "table.json"
    result = _run(tiny_groups, path, host_target, trials=1, limit=1)
    assert len(result.rejected) == 1 and "tuned" in result.rejected[0] and "differ" in result.rejected[0]
    assert [r["schedule"] for r in LatencyTable.open(path).rows] == ["default"]
    assert "REJECTED" in (runner.tuning_folder(path) / "tune.log").read_text()


@pytest.mark.parametrize("default_ms, tuned_ms, kept", [(1.0, 2.0, "default"), (2.0, 1.0, "tuned")])
def test_the_tuned_schedule_replaces_the_default_only_if_faster(tmp_path: Path, tiny_groups: list,
                                                                host_target: dict, monkeypatch: pytest.MonkeyPatch,
                                                                default_ms: float, tuned_ms: float, kept: str) -> None:
    timings = iter([default_ms, tuned_ms])
    monkeypatch.setattr(runner, "tuned_module", lambda default, tuner, databases, starting=None: default)
    monkeypatch.setattr(runner, "measure", lambda *args: measure_module.Measurement(next(timings), 0.0, 2))
    path = tmp_path / "table.json"
    _run(tiny_groups, path, host_target, trials=1, limit=1)
    (row,) = LatencyTable.open(path).rows
    assert (row["schedule"], row["latency_ms"]) == (kept, min(default_ms, tuned_ms))


def _tune_command(out: Path, *extra: str, trials: int = 0) -> list[str]:
    return [sys.executable, "-m", "hawqc.cli", "tune", "--layers", "tiny_resnet", "--bits", "8", "--trials",
            str(trials), "--repeat", "2", "--min-repeat-ms", "5", "--max-spread", "1e9", "--max-load", "1e9", "-o", str(out),
            *extra]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError):
        return []


def _searches(out: Path) -> tuple[int, int]:
    """(MetaSchedule searches started, searches finished) in the table's tuning folder."""
    folders = [p for p in (out.with_suffix(".tuning") / "databases").glob("*") if p.is_dir()]
    return len(folders), sum((p / "done").exists() for p in folders)


@pytest.mark.parametrize("trials", [0, 1], ids=["measuring", "mid-search"])
def test_resume_after_sigkill_keeps_finished_entries(tmp_path: Path, tiny_groups: list, trials: int) -> None:
    out, limit = tmp_path / "table.json", 5 if trials == 0 else 2
    command = _tune_command(out, "--limit", str(limit), trials=trials)

    def killable() -> bool:  # a row finished, and (when tuning) the next entry's search under way
        started, finished = _searches(out)
        return bool(_rows(out)) and (trials == 0 or started > finished)

    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not killable() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    assert killable(), "no row was finished in 15 minutes"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _rows(out)
    layers = sum(len(g.layers) for g in tiny_groups[:limit])
    assert 0 < len(before) < layers  # killed mid-run, the table on disk is whole
    finished = subprocess.run(command, check=False, env=_environment(), capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr
    after = _rows(out)
    assert len(after) == layers
    assert all(row in after for row in before)  # finished entries kept as they were, not measured again
    entries_before = len({r["workload"] for r in before})
    assert f"{limit - entries_before} entries measured" in finished.stdout
    assert f"{entries_before} already in the table" in finished.stdout
    if trials:  # the interrupted search was started again and finished; the finished one was reused
        assert _searches(out) == (limit, limit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=_environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_rpc_measures_on_servers_and_survives_a_killed_server(tmp_path: Path, tiny_groups: list,
                                                               host_target: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil
    from tvm import rpc

    tracker_port, ports = _free_port(), [_free_port(), _free_port()]
    processes = [_rpc_process("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                              "--port-end", str(tracker_port + 1))]
    try:
        time.sleep(1)
        for port in ports:
            processes.append(_rpc_process("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tracker_port}",
                                          "--key", "hawqc-test", "--host", "127.0.0.1", "--port", str(port),
                                          "--port-end", str(port + 1)))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                queue = rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"]
                if queue.get("hawqc-test", {}).get("free") == 2:
                    break
            except (OSError, RuntimeError):
                pass
            time.sleep(1)
        else:
            pytest.fail("the RPC servers did not register with the tracker")

        calls, killed = [], []
        original = measure_module.measure

        def measure_then_lose_the_server(module, inputs, expected, session, timing):
            calls.append(1)
            if len(calls) == 2:  # kill the server this session talks to, mid-run
                held = {c.raddr.port for c in psutil.Process().net_connections("tcp") if c.raddr}
                victim = 1 if ports[0] in held else 2
                os.killpg(processes[victim].pid, signal.SIGKILL)
                killed.append(victim)
            return original(module, inputs, expected, session, timing)

        monkeypatch.setattr(runner, "measure", measure_then_lose_the_server)
        device = Device(f"127.0.0.1:{tracker_port}", "hawqc-test", session_timeout_s=60)
        result = _run(tiny_groups, tmp_path / "rpc.json", host_target, limit=2, trials=1, device=device)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert killed and device.failures, "the killed server's session should have failed and been retried"
    assert result.done == 2 and not result.failed
    rows = LatencyTable.open(tmp_path / "rpc.json").rows
    assert {r["device"] for r in rows} == {f"rpc:hawqc-test@127.0.0.1:{tracker_port}"}
    searches = list((tmp_path / "rpc.tuning" / "databases").glob("*/database_tuning_record.json"))
    assert len(searches) == 2 and all(_measured_candidates(p) for p in searches), "tuned through the RPC servers"


def _measured_candidates(database: Path) -> int:
    """Tuning records of a MetaSchedule database with a real run time (failed runs record 1e10 s)."""
    records = [json.loads(line) for line in database.read_text().splitlines() if line.strip()]
    return sum(1 for _, (_, run_secs, *_) in records if run_secs and max(run_secs) < 1.0)


def _row(layer: str, workload: Workload, bits: int, latency: float) -> dict:
    return {"layer": layer, "workload": workload.key, "w_bits": bits, "a_bits": bits, "latency_ms": latency,
            "stdev_ms": 0.01, "n_runs": 5, "schedule": "default", "target": "llvm -mcpu=znver4", "device": "cpu",
            "tvm_version": "0.27", "date": "2026-11-27T00:00:00+00:00"}


def test_report_flags_layers_where_int4_is_not_faster(tmp_path: Path, tiny_groups: list,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tiny_groups[0].workload, tiny_groups[2].workload
    table = LatencyTable(tmp_path / "t.json", [_row("conv1", a, 8, 1.0), _row("conv1", a, 4, 0.5),
                                               _row("down", b, 8, 0.2), _row("down", b, 4, 0.25)])
    ratios = {r.layer: r for r in layer_ratios(table)}
    assert ratios["conv1"].ratio == pytest.approx(0.5) and not ratios["conv1"].int4_not_faster
    assert ratios["down"].ratio == pytest.approx(1.25) and ratios["down"].int4_not_faster
    text = markdown(table)
    assert "| down |" in text and "**yes**" in text and "INT4 is not faster at 1 of them" in text
    table.save()
    assert cli.main(["tune", "--report", "markdown", "-o", str(table.path)]) == 0
    assert "| conv1 | " in capsys.readouterr().out


def test_predict_missing_marks_rows_and_reports_heldout_error(tmp_path: Path, tiny_groups: list) -> None:
    rows = [_row(layer, g.workload, bits, 1e-6 * g.workload.macs * (bits / 8 + 1))
            for g in tiny_groups[:5] for layer in g.layers for bits in (4, 8)]
    table = LatencyTable(tmp_path / "t.json", rows)
    prediction = predict_missing(table, tiny_groups, [4, 8])
    predicted = [r for r in table.rows if r.get("predicted")]
    assert prediction.rows == len(predicted) == 2 * sum(len(g.layers) for g in tiny_groups[5:])
    assert prediction.heldout_error is not None and prediction.heldout_error >= 0
    assert all(r["latency_ms"] > 0 and r["schedule"] == "predicted" for r in predicted)
    saved = LatencyTable.open(table.path)
    assert sum(bool(r.get("predicted")) for r in saved.rows) == len(predicted)
    with pytest.raises(ValueError, match="at least 3 workloads"):
        predict_missing(LatencyTable(tmp_path / "u.json", rows[:2]), tiny_groups, [4, 8])


@pytest.mark.parametrize("argv, message", [
    (["tune"], "give --layers MODEL"),
    (["tune", "--layers", "nosuchmodel"], "neither a built-in model"),
    (["tune", "--layers", "tiny_resnet", "--rpc-tracker", "127.0.0.1:9190"], "go together"),
    (["tune", "--layers", "tiny_resnet", "--rpc-tracker", "nowhere", "--rpc-key", "k"], "HOST:PORT"),
    (["tune", "--report", "-o", "missing.json"], "no such latency table"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_bad_bits_and_corrupt_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--layers", "tiny_resnet", "--bits", "4,x"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["tune", "--report", "-o", str(tmp_path / "bad.json")]) == 1
    assert "not a latency table" in capsys.readouterr().err


# ---- tables you can trust ----------------------------------------------------------------------------
def _fake_measurements(monkeypatch: pytest.MonkeyPatch, spreads: list[float]) -> list[float]:
    """``runner.measure`` returning 1 ms with the given spreads in turn (the last one repeated);
    returns the list of spreads handed out."""
    handed: list[float] = []

    def fake(*args: object) -> measure_module.Measurement:
        handed.append(spreads[min(len(handed), len(spreads) - 1)])
        return measure_module.Measurement(1.0 + 0.1 * len(handed), 0.0, 2, handed[-1], 0.5)

    monkeypatch.setattr(runner, "measure", fake)
    return handed


def test_a_noisy_measurement_is_taken_again_and_a_still_noisy_row_is_marked(
        tmp_path: Path, tiny_groups: list, host_target: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    timing = Timing(repeat=2, min_repeat_ms=5, max_spread=1.2, max_load=100.0, attempts=3)
    path = tmp_path / "table.json"
    handed = _fake_measurements(monkeypatch, [2.0, 1.05])
    runner.run(tiny_groups[:1], LatencyTable.open(path), runner.RunOptions(host_target, [8], 0, timing),
               log=lambda line: None)
    assert handed == [2.0, 1.05]  # measured again once, then steady
    (row,) = LatencyTable.open(path).rows
    assert row["noisy"] is False and row["latency_ms"] == pytest.approx(1.2)  # the steady attempt
    handed = _fake_measurements(monkeypatch, [3.0])
    path = tmp_path / "noisy.json"
    result = runner.run(tiny_groups[:1], LatencyTable.open(path), runner.RunOptions(host_target, [8], 0, timing),
                        log=lambda line: None)
    assert len(handed) == 3 and result.noisy == 1
    (row,) = LatencyTable.open(path).rows
    assert row["noisy"] is True and row["latency_ms"] == pytest.approx(1.1)  # none steady: the fastest
    handed = _fake_measurements(monkeypatch, [1.0])  # the next run measures the noisy row again
    again = runner.run(tiny_groups[:1], LatencyTable.open(path), runner.RunOptions(host_target, [8], 0, timing),
                       log=lambda line: None)
    assert (again.done, again.skipped, handed) == (1, 0, [1.0])
    assert LatencyTable.open(path).rows[0]["noisy"] is False


def test_a_load_above_the_limit_counts_as_noise(host_target: dict) -> None:
    timing = Timing(max_spread=1.2, max_load=1.5)
    assert timing.noisy(measure_module.Measurement(1.0, 0.0, 2, 1.0, 1.6))
    assert not timing.noisy(measure_module.Measurement(1.0, 0.0, 2, 1.0, 1.4))
    assert not timing.noisy(measure_module.Measurement(1.0, 0.0, 2, 1.0, None))  # RPC: load unknown


def test_widths_of_a_workload_are_measured_back_to_back_and_again_together(
        tmp_path: Path, tiny_groups: list, host_target: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "table.json"
    _run(tiny_groups[:2], path, host_target, bits=[8])  # an earlier run at 8 bits only
    order: list[str] = []
    real = runner._best_schedule

    def recorded(workload, bits, *args):  # type: ignore[no-untyped-def]
        order.append(f"{workload.key} {bits}")
        return real(workload, bits, *args)

    monkeypatch.setattr(runner, "_best_schedule", recorded)
    result = _run(tiny_groups[:2], path, host_target, bits=[4, 8])
    keys = [g.workload.key for g in tiny_groups[:2]]
    assert order == [f"{keys[0]} 4", f"{keys[0]} 8", f"{keys[1]} 4", f"{keys[1]} 8"]  # 8 measured again beside 4
    assert (result.done, result.skipped) == (4, 0)
    dates = {(r["workload"], r["w_bits"]): r["date"] for r in LatencyTable.open(path).rows}
    assert all(dates[k, 4] == dates[k, 8] for k in keys)


def test_a_table_of_another_machine_or_input_shape_is_refused(tmp_path: Path, tiny_groups: list,
                                                              host_target: dict) -> None:
    from hawqc.autotune.measure import this_machine
    from hawqc.ilp.search import fitting_latencies

    path = tmp_path / "table.json"
    _run(tiny_groups, path, host_target, bits=[8])
    model = models.get("tiny_resnet")
    assert len(fitting_latencies(path, model, (1, 28, 28))) == sum(len(g.layers) for g in tiny_groups)
    with pytest.raises(ValueError, match=r"another input shape: layer conv1 sees 1x28x28 there, 1x8x8 here"):
        fitting_latencies(path, model, (1, 8, 8))
    data = json.loads(path.read_text())
    data["machine"]["cores"] = this_machine()["cores"] + 7
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"measured on .* \(\d+ cores\).*pass --any-machine"):
        fitting_latencies(path, model, (1, 28, 28))
    assert fitting_latencies(path, model, (1, 28, 28), any_machine=True)
    with pytest.raises(ValueError, match="holds measurements of"):  # nor does tune mix machines in one table
        _run(tiny_groups, path, host_target, bits=[4])
    with pytest.raises(ValueError, match="at input 1x1x28x28, this run measures 1x1x8x8"):
        _run(workloads.extract("tiny_resnet", (1, 1, 8, 8)), _copy_shape(path), host_target, bits=[8])


def _copy_shape(path: Path) -> Path:
    """A copy of the table at ``path`` with this machine's fingerprint (only its input shape differs)."""
    from hawqc.autotune.measure import this_machine

    data = json.loads(path.read_text())
    data["machine"] = {**data["machine"], "cores": this_machine()["cores"]}
    copy = path.with_name("copy.json")
    copy.write_text(json.dumps(data))
    return copy


def test_tune_refuses_bits_the_compiler_does_not_build(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--layers", "tiny_resnet", "--bits", "3,8"])
    assert exit_info.value.code == 2 and "bit widths must be among 4,8" in capsys.readouterr().err
