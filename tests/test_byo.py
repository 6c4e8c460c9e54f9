"""A user's own model and images through the CLI: quantize -> sensitivity -> search -> compile -> verify.

The model is none of the built-ins: a small residual CNN defined here, saved as a ``torch.export``
program (``.pt2``) and as float ONNX; the data is a folder of PNG images in two class sub-folders.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqc import BitConfig
from hawqc.cli import main
from hawqc.reference import IntegerGraph

pytestmark = pytest.mark.xdist_group("byo")


class UserNet(nn.Module):
    """3x16x16 input: a stem, one residual block, a strided conv, pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.block_bn = nn.BatchNorm2d(8)
        self.block_b = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.block_b(F.relu(self.block_bn(self.block_a(x))))
        x = F.relu(x + y)
        x = F.max_pool2d(F.relu(self.down(x)), 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    model = UserNet()
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for bn in (model.stem[1], model.block_bn):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    example = (torch.randn(2, 3, 16, 16),)
    torch.export.save(torch.export.export(model, example), root / "usernet.pt2")
    torch.onnx.export(model, example, root / "usernet.onnx", input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    rng = np.random.default_rng(0)
    for label, tint in (("cats", (200, 80, 40)), ("dogs", (40, 80, 200))):
        (root / "images" / label).mkdir(parents=True)
        for i in range(8):  # 20x20: resized to the model's 16x16
            pixels = np.clip(rng.normal(tint, 40, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    return {"root": root, "pt2": root / "usernet.pt2", "onnx": root / "usernet.onnx", "images": root / "images"}


def test_user_model_and_images_through_every_command(user_files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    pt2, onnx, images = (str(user_files[k]) for k in ("pt2", "onnx", "images"))
    data = ["--data", images, "--mean", "0.5", "--std", "0.25"]

    assert main(["quantize", pt2, *data, "--bit-config", "uniform8", "--batch-size", "8", "-o", str(tmp_path / "q")]) == 0
    graph = IntegerGraph.load(tmp_path / "q" / "usernet.int.npz")
    assert graph.run(np.zeros((3, 3, 16, 16), np.float32)).shape == (3, 2)
    assert (tmp_path / "q" / "usernet.onnx").is_file()
    layers = {"stem.0", "block_a", "block_b", "down", "head"}
    assert set(BitConfig.load(tmp_path / "q" / "bit_config.json").layers) == layers

    hessian = [*data, "--batch-size", "16", "--micro-batch", "6", "--max-iters", "3", "--cache-dir", str(tmp_path)]
    assert main(["sensitivity", pt2, *hessian, "-o", str(tmp_path / "sens.json")]) == 0
    assert main(["search", pt2, *hessian, "--sensitivity", str(tmp_path / "sens.json"), "--bops", "0.5",
                 "--free-first-last", "-o", str(tmp_path / "bits.json")]) == 0
    bits = BitConfig.load(tmp_path / "bits.json")
    assert set(bits.layers) == layers and {b.w_bits for b in bits.layers.values()} == {4, 8}
    capsys.readouterr()

    artifact = tmp_path / "compiled"
    assert main(["compile", pt2, "--bit-config", str(tmp_path / "bits.json"), *data, "-o", str(artifact)]) == 0
    assert {"model.so", "graph.int.npz", "manifest.json"} <= {p.name for p in artifact.iterdir()}
    capsys.readouterr()
    # the same bits fit the ONNX copy: its layers carry the same names
    for model in (pt2, onnx):
        assert main(["verify", model, "--bit-config", str(tmp_path / "bits.json"), *data]) == 0
        out = capsys.readouterr().out
        assert out.startswith("bit-exact: compiled (llvm") and "== reference on all 32 output elements" in out, out


def test_float_onnx_and_pt2_are_rebuilt_faithfully(user_files: dict[str, Path]) -> None:
    from hawqc.models.loading import load

    x = torch.randn(5, 3, 16, 16)
    outputs = []
    for key in ("pt2", "onnx"):
        loaded = load(user_files[key])
        assert loaded.input_shape == (3, 16, 16) and not loaded.random_weights
        with torch.no_grad():
            outputs.append(loaded.module(x))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["quantize", "nope.pt2"], "nope.pt2: no such file"),
    (["quantize", "mypkg.nowhere:net"], "cannot import mypkg.nowhere:net"),
    (["sensitivity", "{pt2}", "--data", "{root}"], "no images"),
    (["quantize", "{pt2}", "--data", "{images}", "--mean", "0.5,0.5"], "--mean has 2 values; the model's input has 3"),
    (["quantize", "{pt2}", "--checkpoint", "w.pt"], "carries its weights"),
])
def test_bad_model_or_data_is_one_line(args: list[str], message: str, user_files: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(pt2=user_files["pt2"], images=user_files["images"], root=empty) for a in args]
    assert main([*args, "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_factory_spec_with_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hawqc.models.loading import load

    (tmp_path / "usermodels.py").write_text("from test_byo import UserNet\n\ndef build():\n    return UserNet()\n")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    trained = UserNet().eval()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    loaded = load("usermodels:build", tmp_path / "w.pt")
    assert loaded.name == "build" and loaded.input_shape is None and not loaded.random_weights
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), trained(x))
    assert load("usermodels:build").random_weights
    other = UserNet()
    other.head = nn.Linear(16, 3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt does not fit usermodels:build"):
        load("usermodels:build", tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unexpected keyword argument 'num_classes'"):
        load("usermodels:build", num_classes=3)


def test_data_specs_read_images_and_arrays(tmp_path: Path) -> None:
    from PIL import Image

    from hawqc.data import Preprocess, load_data

    Image.fromarray(np.full((4, 6, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    Image.fromarray(np.full((4, 6, 3), (0, 0, 255), np.uint8)).save(tmp_path / "blue.png")
    rgb = load_data(tmp_path, input_shape=(3, 2, 3), preprocess=Preprocess(mean=(0.5,), std=(0.5,)))
    assert not rgb.labelled and rgb.inputs.shape == (2, 3, 2, 3)
    assert torch.equal(rgb.inputs[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue.png, sorted first
    gray = load_data(tmp_path, input_shape=(1, 4, 6))
    assert gray.inputs.shape == (2, 1, 4, 6) and 0 < float(gray.inputs.max()) < 1  # luminance of pure red/blue

    pixels = np.zeros((5, 4, 6), np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "labels.npy", np.arange(5))
    arr = load_data(tmp_path / "pixels.npy", input_shape=(3, 4, 6), labels=tmp_path / "labels.npy")
    assert arr.labelled and arr.inputs.shape == (5, 3, 4, 6) and arr.tensors[1].tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "inputs.npy", np.ones((2, 1, 3, 3), np.float32))
    assert torch.equal(load_data(tmp_path / "inputs.npy").inputs, torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"samples of shape \(1, 3, 3\); the model takes \(3, 3, 3\)"):
        load_data(tmp_path / "inputs.npy", input_shape=(3, 3, 3))
    with pytest.raises(ValueError, match="one integer label per sample"):
        load_data(tmp_path / "inputs.npy", labels=tmp_path / "labels.npy")
    with pytest.raises(ValueError, match="unknown data 'nowhere'"):
        load_data("nowhere")
