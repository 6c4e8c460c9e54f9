"""The golden model (numpy reference) equals the PyTorch integer simulation on every element."""

import numpy as np
import pytest
import torch

from hawqc import BitConfig, LayerBits, models, quantize
from hawqc.quant import torch_kernels
from hawqc.reference import from_torch, kernels


def mixed_config(model: torch.nn.Module, seed: int) -> BitConfig:
    rng = np.random.default_rng(seed)
    return BitConfig(layers={n: LayerBits(int(rng.choice([4, 8])), int(rng.choice([4, 8])))
                             for n in models.quantizable_layers(model)})


def quantized(name: str, shape: tuple[int, ...], config: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.get(name)
    calib = [torch.randn(4, *shape) for _ in range(2)]
    models.recalibrate_bn(model, calib)
    return quantize(model, mixed_config(model, seed) if config == "mixed" else config, calib)


def assert_every_tensor_equal(qmodel: torch.nn.Module, x: torch.Tensor) -> None:
    graph = from_torch(qmodel)
    ref, sim = {graph.input: x.numpy()}, {graph.input: x}
    for op in graph.ops:
        ref[op.output] = kernels.KERNELS[op.op]([ref[i] for i in op.inputs], op.attrs, op.consts)
        sim[op.output] = torch_kernels.KERNELS[op.op]([sim[i] for i in op.inputs], op.attrs, op.consts)
        assert ref[op.output].dtype == sim[op.output].numpy().dtype, op.output
        np.testing.assert_array_equal(ref[op.output], sim[op.output].numpy(), err_msg=f"{op.op} {op.output}")
    np.testing.assert_array_equal(graph.run(x.numpy()), qmodel(x).numpy())


CASES = [("tiny_resnet", (1, 28, 28), seed) for seed in (0, 1, 2)] + [
    ("resnet18", (3, 64, 64), seed) for seed in (0, 1)] + [
    ("resnet50", (3, 64, 64), seed) for seed in (0, 1)] + [
    ("inceptionv3", (3, 96, 96), seed) for seed in (0, 1)] + [
    ("squeezenet1_1", (3, 61, 61), 0),  # ceil-mode max pools (at 61 their last windows overhang)
    ("shufflenet_v2_x1_0", (3, 32, 32), 0)]  # chunk, channel shuffle, mean


@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
@pytest.mark.parametrize(("name", "shape", "seed"), CASES)
def test_reference_equals_integer_simulation(name: str, shape: tuple[int, ...], seed: int, config: str) -> None:
    qmodel = quantized(name, shape, config, seed)
    torch.manual_seed(100 + seed)
    assert_every_tensor_equal(qmodel, torch.randn(2, *shape) * 1.5)


def test_full_size_resnet18() -> None:
    qmodel = quantized("resnet18", (3, 224, 224), "uniform4", 3)
    assert_every_tensor_equal(qmodel, torch.randn(2, 3, 224, 224))


class DepthwiseNet(torch.nn.Module):
    """Grouped and depthwise convolutions, avg pooling with padding, a standalone ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.grouped = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4)
        self.bn = torch.nn.BatchNorm2d(32)
        self.depthwise = torch.nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False)
        self.pool = torch.nn.AvgPool2d(3, stride=1, padding=1)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.grouped(self.stem(x))))
        x = torch.relu(self.pool(self.depthwise(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("config", ["uniform8", "uniform4"])
def test_grouped_and_depthwise_convolutions(config: str) -> None:
    torch.manual_seed(0)
    model = models.recalibrate_bn(DepthwiseNet(), [torch.randn(4, 3, 20, 20)])
    qmodel = quantize(model, BitConfig(default=LayerBits(*(4, 4) if config == "uniform4" else (8, 8))),
                      [torch.randn(4, 3, 20, 20)])
    ops = {op.op for op in from_torch(qmodel).ops}
    assert {"conv2d", "avgpool", "maxpool", "clip", "global_avgpool", "dense"} <= ops
    assert_every_tensor_equal(qmodel, torch.randn(3, 3, 20, 20))
