"""The hawqc command: discovery of subcommands, lazy imports, errors, the demo."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hawqc
import hawqc.commands
from hawqc import LayerBits
from hawqc.cli import build_parser, main


def run_hawqc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hawqc.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_and_parser_import_neither_torch_nor_tvm() -> None:
    code = "import sys, hawqc.cli; hawqc.cli.build_parser(); print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tvm', 'numpy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dir_lists_the_lazy_entry_points() -> None:
    assert set(hawqc.__all__) <= set(dir(hawqc))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hawqc {hawqc.__version__}"


def test_a_new_command_module_is_a_new_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "say_hello.py").write_text(
        "HELP = 'greet'\n"
        "def add_arguments(parser):\n    parser.add_argument('name')\n"
        "def run(args):\n    print('hello', args.name)\n    return 3\n"
    )
    monkeypatch.setattr(hawqc.commands, "__path__", [*hawqc.commands.__path__, str(tmp_path)])
    try:
        assert "say-hello" in build_parser().format_help()
        assert main(["say-hello", "you"]) == 3
        assert capsys.readouterr().out == "hello you\n"
    finally:
        sys.modules.pop("hawqc.commands.say_hello", None)


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = run_hawqc("demo", "--cases", "500", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "500 random cases" in result.stdout and "OK" in result.stdout
    assert "layer2.0.downsample.0" in result.stdout and "bit-exact" in result.stdout
    assert "compiled vs reference on 64 inputs: bit-exact" in " ".join(result.stdout.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bit_config.json", "compiled", "tiny_resnet.int.npz",
                                                          "tiny_resnet.onnx"]


def test_quantize_writes_artifacts_that_reload(tmp_path: Path) -> None:
    import torch

    from hawqc import BitConfig, models
    from hawqc.reference import IntegerGraph

    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(models.get("tiny_resnet", num_classes=4).state_dict(), checkpoint)
    out = tmp_path / "out"
    result = run_hawqc("quantize", "tiny_resnet", "--checkpoint", str(checkpoint), "--num-classes", "4",
                       "--bit-config", "uniform8", "--data", "digits", "-o", str(out))
    assert result.returncode == 0, result.stderr
    graph = IntegerGraph.load(out / "tiny_resnet.int.npz")
    assert graph.run(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 4)
    assert set(BitConfig.load(out / "bit_config.json").layers.values()) == {LayerBits(8, 8)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--model", "vgg"], "hawqc demo: error: unknown model 'vgg'"),
        (["demo", "--bit-config", "nope.json"], "hawqc demo: error: nope.json is neither a bit-config file"),
        (["quantize", "resnet18", "--checkpoint", "missing.pt"], "hawqc quantize: error: checkpoint missing.pt does not exist"),
        (["quantize", "tiny_resnet", "--qat-steps", "5"], "hawqc quantize: error: QAT needs labelled data"),
        (["quantize", "tiny_resnet", "--calib-batches", "0"], "hawqc quantize: error: --calib-batches and --batch-size"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_hawqc(*args, "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    import torch

    from hawqc import models

    checkpoint = tmp_path / "r18.pt"
    torch.save(models.get("tiny_resnet").state_dict(), checkpoint)
    result = run_hawqc("quantize", "resnet18", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"hawqc quantize: error: {checkpoint} does not fit resnet18: ")
    assert len(result.stderr.strip().splitlines()) == 1


# ---- compile / run / verify ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from hawqc import models, quantize
    from hawqc.quant.export import to_onnx

    torch.manual_seed(0)
    qmodel = quantize(models.get("tiny_resnet"), "uniform4", [torch.randn(4, 1, 28, 28)])
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    to_onnx(qmodel, path)
    return path


def test_compile_run_verify(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    result = run_hawqc("compile", str(tiny_onnx), "--input-shape", "2,1,28,28", "-o", str(out), "--strict")
    assert result.returncode == 0, result.stderr
    assert "layer1.0.conv1" in result.stdout and (out / "model.so").is_file()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run_hawqc("run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                       "--threads", "1")
    assert result.returncode == 0, result.stderr
    from hawqc.reference import IntegerGraph

    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), IntegerGraph.load(out / "graph.int.npz").run(x))
    result = run_hawqc("verify", str(tiny_onnx), "--input", str(tmp_path / "x.npy"))
    assert result.returncode == 0 and "bit-exact" in result.stdout
    result = run_hawqc("run", str(out), "--input", str(tmp_path / "x.npy"), "--threads", "0")
    assert result.returncode == 1 and result.stderr.strip() == "hawqc run: error: threads must be at least 1, got 0"


def _opset11(path: Path) -> Path:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return path


def _unsupported(path: Path) -> Path:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="erf")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _resnet18_bits(path: Path) -> Path:
    from hawqc import BitConfig, models

    BitConfig(layers=BitConfig.preset("uniform4").resolve(models.get("resnet18"))).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d, m: d / "missing.onnx", [], "no such file"),
        (lambda d, m: (d / "garbage.onnx").write_bytes(b"\x00garbage" * 10) and d / "garbage.onnx", [],
         "not a valid ONNX model"),
        (lambda d, m: (d / "cut.onnx").write_bytes(m.read_bytes()[:2000]) and d / "cut.onnx", [], "not a valid ONNX model"),
        (lambda d, m: (d / "cut.int.npz").write_bytes(m.read_bytes()[:2000]) and d / "cut.int.npz", [],
         "cut.int.npz: not an integer graph file"),
        (lambda d, m: (d / "model.txt").write_bytes(m.read_bytes()) and d / "model.txt", [],
         "model.txt: not a model file hawqc reads: give a .onnx"),
        (lambda d, m: _opset11(d / "old.onnx"), [], "opset 11 is too old"),
        (lambda d, m: m, ["--input-shape", "2,1,28,28", "--bit-config", "uniform8"], "other bits than the bit config"),
        (lambda d, m: m, ["--input-shape", "2,1,28,28", "--target", "tpu -x=1"], "unknown target 'tpu -x=1'"),
        (lambda d, m: m, ["--input-shape", "0,1,28,28"], "input shape must be positive"),
        (lambda d, m: _unsupported(d / "erf.onnx"), ["--strict"],
         "'erf' \\(Erf\\): operator has no integer lowering in hawqc, nor a float one"),
        (lambda d, m: _resnet18_bits(d / "r18.json") and m, ["--input-shape", "2,1,28,28", "--bit-config", "{tmp}/r18.json"],
         "bit config does not fit the model: unknown layers"),
    ],
)
def test_compile_bad_input_is_one_line_and_leaves_nothing(make, extra, message, tiny_onnx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make(tmp_path, tiny_onnx)
    out = tmp_path / "artifact"
    result = run_hawqc("compile", str(model), "-o", str(out), *(a.replace("{tmp}", str(tmp_path)) for a in extra))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")]


def test_compile_refuses_an_existing_folder_unless_forced(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_hawqc("compile", str(tiny_onnx), "--input-shape", "1,1,28,28", "-o", str(out))
    assert result.returncode == 1 and "exists: choose another output folder or pass --force" in result.stderr
    assert (out / "keep.txt").exists()
    result = run_hawqc("compile", str(tiny_onnx), "--input-shape", "1,1,28,28", "-o", str(out), "--force")
    assert result.returncode == 0 and not (out / "keep.txt").exists() and (out / "model.so").exists()


# ---- one grammar: target options, errors together, run latency, bench --------------------------------
def test_all_input_errors_come_in_one_message(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    result = run_hawqc("compile", str(tiny_onnx), "-o", str(out), "--target", "cuda", "-arch=sm_12",
                       "--bit-config", str(tmp_path / "nope.json"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    message = result.stderr
    assert message.startswith("hawqc compile: error: 3 problems: ")
    assert "exists: choose another output folder" in message and "nope.json" in message
    assert "sm_12" in message
    result = run_hawqc("verify", str(tiny_onnx), "--input", str(tmp_path / "nope.npy"), "--kernels", "vnni",
                       "--target", "cuda")
    assert result.returncode == 1 and "2 problems" in result.stderr and "no such input file" in result.stderr
    assert "--kernels vnni is for CPUs" in result.stderr


@pytest.mark.parametrize("command", ["compile", "verify", "run", "bench", "tune"])
def test_every_compiling_command_takes_the_same_target_options(command: str) -> None:
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    options = {o for action in sub._actions for o in action.option_strings}
    assert {"--target", "-arch", "--kernels", "--threads"} <= options


def test_run_prints_latency_and_compiles_a_model_file(tiny_onnx: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run_hawqc("run", str(tiny_onnx), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                       "--runs", "3", "--kernels", "generic")
    assert result.returncode == 0, result.stderr
    assert re.search(r"latency at batch 3: median of 3 calls [0-9.]+ ms, first call [0-9.]+ ms", result.stdout)
    from hawqc.api import integer_graph_of

    expected = integer_graph_of(str(tiny_onnx), input_shape=x.shape).run(x)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_bench_times_each_batch_size_and_the_onnx_peers(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    assert run_hawqc("compile", str(tiny_onnx), "--input-shape", "1,1,28,28", "-o", str(out)).returncode == 0
    result = run_hawqc("bench", str(out), "--batch", "1,2", "--onnx", str(tiny_onnx), "--runs", "2",
                       "-o", str(tmp_path / "bench.json"), "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "bench.json").read_text())["figures"]
    from hawqc.commands.bench import installed_peers

    engines = {"hawqc", *installed_peers()}
    assert {(f["engine"], f["batch"]) for f in figures} == {(e, b) for e in engines for b in (1, 2)}
    assert all(f["median_ms"] > 0 and f["min_ms"] <= f["median_ms"] <= f["max_ms"] for f in figures)
    result = run_hawqc("bench", str(out), "--target", "llvm", "--onnx", "x.txt")
    assert result.returncode == 1 and "2 problems" in result.stderr and "is compiled already" in result.stderr
