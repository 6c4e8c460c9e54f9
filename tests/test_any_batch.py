"""An open batch stays open: one compiled module (and artifact) runs any batch size, and ``input_shape`` is
optional wherever the model states its other dimensions (Python API and CLI, llvm and cuda)."""

import json
from pathlib import Path

import numpy as np
import pytest
from quantized_models import quantized

import hawqc
from hawqc.api import input_shape_of
from hawqc.cli import main as cli_main
from hawqc.quant.export import to_onnx
from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.runtime.module import compile_graph
from hawqc.runtime.target import parse_target


@pytest.fixture(scope="module")
def qmodel() -> object:
    return quantized("tiny_resnet", (1, 28, 28), "uniform8")


@pytest.fixture(scope="module")
def module(qmodel: object) -> object:
    return hawqc.compile_integer_only(qmodel)  # no input_shape: the model's (N, 1, 28, 28)


def test_a_quantized_torch_model_compiles_for_any_batch(module: object) -> None:
    import tvm

    assert module.input_shape == (None, 1, 28, 28) and module.batch == "any" and module.note == ""
    assert isinstance(module.ir["main"].params[0].ty.shape[0], tvm.tirx.Var)
    for batch in (1, 3, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        np.testing.assert_array_equal(module(x), module.reference(x))
    with pytest.raises(ValueError, match=r"compiled for \(N, 1, 28, 28\)"):
        module(np.zeros((2, 3, 28, 28), np.float32))


def test_calls_refill_one_input_tensor_and_each_returns_its_own_result(module: object) -> None:
    from concurrent.futures import ThreadPoolExecutor

    inputs = [np.random.default_rng(seed).standard_normal((3, 1, 28, 28)).astype(np.float32) for seed in range(6)]
    expected = [module.reference(x) for x in inputs]
    for x, y in zip(inputs + inputs[::-1], expected + expected[::-1]):
        np.testing.assert_array_equal(module(x), y)
    with ThreadPoolExecutor(3) as pool:  # calls from several threads take turns on the buffer
        for y, got in zip(expected * 3, pool.map(module, inputs * 3)):
            np.testing.assert_array_equal(got, y)


def test_the_artifact_says_and_runs_any_batch(module: object, tmp_path: Path) -> None:
    module.export(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["batch"] == "any" and manifest["input_shape"] == [None, 1, 28, 28]
    loaded = hawqc.load(tmp_path / "art")
    x = np.random.default_rng(7).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), module.reference(x))


def reshape_graph(shape: list[int]) -> IntegerGraph:
    """quantize -> reshape to ``shape`` -> dequantize, on a (N, 4, 2, 2) input."""
    ops = [IntOp("quantize", ["x"], "q", {"qmin": -128, "qmax": 127}, {"scale": np.float32(0.05)}),
           IntOp("reshape", ["q"], "r", {"shape": shape}),
           IntOp("dequantize", ["r"], "y", {}, {"scale": np.float32(0.05)})]
    return IntegerGraph("x", "y", ops, {"input_shape": [None, 4, 2, 2]})


def test_a_reshape_keeping_the_batch_keeps_it_open() -> None:
    graph = reshape_graph([-1, 16])
    module = compile_graph(graph, input_shape_of(graph), parse_target("llvm"), kernels="generic")
    assert module.batch == "any"
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_a_reshape_mixing_the_batch_compiles_for_batch_1_with_a_note() -> None:
    graph = reshape_graph([2, 8])
    module = compile_graph(graph, input_shape_of(graph), parse_target("llvm"), kernels="generic")
    assert module.input_shape == (1, 4, 2, 2)
    assert "compiled for batch 1" in module.note and "--input-shape N,4,2,2" in module.note
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_missing_shapes_get_one_line_saying_what_to_pass() -> None:
    graph = IntegerGraph("x", "x", [], {"input_shape": [None, 3, None, None]})
    with pytest.raises(ValueError, match=r"\?x3x\?x\?: give a static input shape .*input_shape=") as err:
        input_shape_of(graph)
    assert "\n" not in str(err.value)
    assert input_shape_of(graph, (2, 3, 8, 8)) == (2, 3, 8, 8)
    from hawqc import models

    with pytest.raises(ValueError, match=r"calib_data=\[") as err:
        hawqc.compile_integer_only(models.get("tiny_resnet"), "uniform8")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def exported(qmodel: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh hawqc W8A8 export: its ONNX input has a symbolic batch."""
    path = tmp_path_factory.mktemp("export") / "tiny_w8a8.onnx"
    to_onnx(qmodel, path)
    return path


def test_cli_compiles_a_hawqc_export_for_cuda_without_input_shape(exported: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cuda"
    assert cli_main(["compile", str(exported), "--target", "cuda", "-arch=sm_75", "-o", str(out)]) == 0
    assert "input (N, 1, 28, 28)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch"] == "any" and manifest["target"] == {"kind": "cuda", "arch": "sm_75"}


def test_cli_compiles_verifies_and_runs_any_batch_without_input_shape(exported: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", str(exported)]) == 0
    assert "bit-exact" in capsys.readouterr().out
    out = tmp_path / "llvm"
    assert cli_main(["compile", str(exported), "-o", str(out)]) == 0
    capsys.readouterr()
    for batch in (2, 3):
        np.save(tmp_path / "x.npy", np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32))
        assert cli_main(["run", str(out), "--input", str(tmp_path / "x.npy")]) == 0
        assert f"output ({batch}, 10)" in capsys.readouterr().out


def test_an_open_batch_runs_batch_1_on_its_static_specialisation(module: object, tmp_path: Path) -> None:
    assert set(module.specialised) == {1} and module.executable_for(1) == (module.specialised[1], 1)
    assert module.executable_for(3) == (module.specialised[1], 1)  # three runs of one sample each
    module.export(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["specialised_batches"] == [1]
    loaded = hawqc.load(tmp_path / "art")
    assert set(loaded.specialised) == {1}
    for batch in (1, 2, 3):
        x = np.random.default_rng(10 + batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        expected = module.reference(x)
        np.testing.assert_array_equal(module(x), expected)
        np.testing.assert_array_equal(loaded(x), expected)
    assert set(loaded._specialised_vms) == {1} and loaded._vm is None  # every batch ran on batch 1's executable
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())  # an artifact from before: no model.b1.so
    del manifest["specialised_batches"]
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "art" / "model.b1.so").unlink()
    older = hawqc.load(tmp_path / "art")
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    assert older.specialised == {} and older.executable_for(1) == (older.executable, 1)
    np.testing.assert_array_equal(older(x), module.reference(x))
