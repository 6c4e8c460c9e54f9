"""Built-in models: torchvision-compatible state dicts, forward shapes, the registry."""

import json
from pathlib import Path

import pytest
import torch

from hawqc import models

TORCHVISION = json.loads((Path(__file__).parent / "data" / "torchvision_state_dicts.json").read_text())["models"]
"""Keys and shapes of torchvision's resnet18/resnet50/inception_v3 state dicts, written down once."""


@pytest.mark.parametrize(("ours", "theirs"), [("resnet18", "resnet18"), ("resnet50", "resnet50"),
                                              ("inceptionv3", "inception_v3")])
def test_torchvision_checkpoints_load_strictly(ours: str, theirs: str) -> None:
    model = models.get(ours)
    ours_table = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours_table == TORCHVISION[theirs]
    checkpoint = {k: torch.full(shape, 0.5) if shape else torch.tensor(7) for k, shape in TORCHVISION[theirs].items()}
    model.load_state_dict(checkpoint, strict=True)
    assert torch.all(model.state_dict()["fc.weight"] == 0.5)


ZOO = {
    "resnext50_32x4d": (25_028_904, 320, {"layer1.0.conv1.weight": [128, 64, 1, 1],
                                          "layer1.0.conv2.weight": [128, 4, 3, 3],
                                          "layer4.2.conv3.weight": [2048, 1024, 1, 1]}),
    "wide_resnet50_2": (68_883_240, 320, {"layer1.0.conv2.weight": [128, 128, 3, 3],
                                          "layer4.0.conv1.weight": [1024, 1024, 1, 1],
                                          "layer4.2.conv3.weight": [2048, 1024, 1, 1]}),
    "mobilenet_v2": (3_504_872, 314, {"features.0.0.weight": [32, 3, 3, 3],
                                      "features.1.conv.0.0.weight": [32, 1, 3, 3],
                                      "features.1.conv.1.weight": [16, 32, 1, 1],
                                      "features.2.conv.0.0.weight": [96, 16, 1, 1],
                                      "features.2.conv.3.running_var": [24],
                                      "features.18.0.weight": [1280, 320, 1, 1],
                                      "classifier.1.weight": [1000, 1280]}),
    "mobilenet_v3_large": (5_483_032, 312, {"features.0.0.weight": [16, 3, 3, 3],
                                            "features.1.block.0.0.weight": [16, 1, 3, 3],
                                            "features.1.block.1.0.weight": [16, 16, 1, 1],
                                            "features.4.block.1.0.weight": [72, 1, 5, 5],
                                            "features.4.block.2.fc1.weight": [24, 72, 1, 1],
                                            "features.4.block.3.1.num_batches_tracked": [],
                                            "features.16.0.weight": [960, 160, 1, 1],
                                            "classifier.0.weight": [1280, 960],
                                            "classifier.3.weight": [1000, 1280]}),
    "efficientnet_b0": (5_288_548, 360, {"features.0.0.weight": [32, 3, 3, 3],
                                         "features.1.0.block.0.0.weight": [32, 1, 3, 3],
                                         "features.1.0.block.1.fc1.weight": [8, 32, 1, 1],
                                         "features.1.0.block.2.0.weight": [16, 32, 1, 1],
                                         "features.2.0.block.2.fc1.weight": [4, 96, 1, 1],
                                         "features.6.3.block.3.1.running_mean": [192],
                                         "features.8.0.weight": [1280, 320, 1, 1],
                                         "classifier.1.weight": [1000, 1280]}),
    "regnet_y_400mf": (4_344_144, 384, {"stem.0.weight": [32, 3, 3, 3],
                                        "trunk_output.block1.block1-0.proj.0.weight": [48, 32, 1, 1],
                                        "trunk_output.block1.block1-0.f.a.0.weight": [48, 32, 1, 1],
                                        "trunk_output.block1.block1-0.f.b.0.weight": [48, 8, 3, 3],
                                        "trunk_output.block1.block1-0.f.se.fc1.weight": [8, 48, 1, 1],
                                        "trunk_output.block4.block4-5.f.c.1.running_var": [440],
                                        "fc.weight": [1000, 440]}),
    "vgg16": (138_357_544, 32, {"features.0.weight": [64, 3, 3, 3],
                                "features.28.weight": [512, 512, 3, 3],
                                "features.28.bias": [512],
                                "classifier.0.weight": [4096, 25088],
                                "classifier.6.weight": [1000, 4096]}),
    "shufflenet_v2_x1_0": (2_278_604, 338, {"conv1.0.weight": [24, 3, 3, 3],
                                            "stage2.0.branch1.0.weight": [24, 1, 3, 3],
                                            "stage2.0.branch1.2.weight": [58, 24, 1, 1],
                                            "stage2.1.branch2.0.weight": [58, 58, 1, 1],
                                            "stage4.3.branch2.6.running_var": [232],
                                            "conv5.0.weight": [1024, 464, 1, 1], "fc.weight": [1000, 1024]}),
    "densenet121": (7_978_856, 727, {"features.conv0.weight": [64, 3, 7, 7],
                                     "features.denseblock1.denselayer1.norm1.weight": [64],
                                     "features.denseblock1.denselayer1.conv1.weight": [128, 64, 1, 1],
                                     "features.denseblock1.denselayer6.conv2.weight": [32, 128, 3, 3],
                                     "features.transition1.conv.weight": [128, 256, 1, 1],
                                     "features.denseblock4.denselayer16.norm1.running_mean": [992],
                                     "features.norm5.weight": [1024], "classifier.weight": [1000, 1024]}),
    "squeezenet1_1": (1_235_496, 52, {"features.0.weight": [64, 3, 3, 3], "features.3.squeeze.weight": [16, 64, 1, 1],
                                      "features.3.expand3x3.weight": [64, 16, 3, 3],
                                      "features.12.expand1x1.bias": [256], "classifier.1.weight": [1000, 512, 1, 1]}),
    "googlenet": (6_624_904, 344, {"conv1.conv.weight": [64, 3, 7, 7], "conv3.bn.running_var": [192],
                                   "inception3a.branch1.conv.weight": [64, 192, 1, 1],
                                   "inception3a.branch3.1.conv.weight": [32, 16, 3, 3],
                                   "inception4e.branch4.1.conv.weight": [128, 528, 1, 1],
                                   "inception5b.branch2.1.conv.weight": [384, 192, 3, 3], "fc.weight": [1000, 1024]}),
    "mnasnet1_0": (4_383_312, 314, {"layers.0.weight": [32, 3, 3, 3], "layers.3.weight": [32, 1, 3, 3],
                                    "layers.6.weight": [16, 32, 1, 1], "layers.8.0.layers.0.weight": [48, 16, 1, 1],
                                    "layers.9.2.layers.3.weight": [120, 1, 5, 5], "layers.13.0.layers.6.weight": [320, 1152, 1, 1],
                                    "layers.14.weight": [1280, 320, 1, 1], "classifier.1.weight": [1000, 1280]}),
}
"""torchvision's published parameter count (ImageNet), state-dict size and some of its keys with their shapes."""


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    """Each zoo model built once (VGG-16 takes seconds) and shared by the tests below."""
    return request.param, models.get(request.param).eval()


def test_zoo_matches_torchvision(zoo_model: tuple[str, torch.nn.Module]) -> None:
    name, model = zoo_model
    params, num_keys, keys = ZOO[name]
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(state) == num_keys
    assert {k: state.get(k) for k in keys} == keys
    if name in ("resnext50_32x4d", "wide_resnet50_2"):  # torchvision's ResNet-50 keys, other widths
        assert state.keys() == TORCHVISION["resnet50"].keys()


def test_zoo_classifies_a_small_image_and_traces(zoo_model: tuple[str, torch.nn.Module]) -> None:
    _, model = zoo_model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 1000)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), y)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                                  "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121", "googlenet", "mnasnet1_0"])
def test_zoo_takes_num_classes(name: str) -> None:
    model = models.get(name, num_classes=7)
    assert model.get_submodule(models.quantizable_layers(model)[-1]).out_features == 7


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("resnet50", 64), ("tiny_resnet", 28)])
def test_resnets_classify_a_batch(name: str, size: int) -> None:
    model = models.get(name, num_classes=7).eval()
    channels = models.spec(name).input_shape[0]
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_inception_returns_aux_logits_only_in_training() -> None:
    model = models.get("inceptionv3", num_classes=5)
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        logits, aux = model.train()(x)
        assert logits.shape == aux.shape == (2, 5)
        assert model.eval()(x[:1]).shape == (1, 5)
    assert "AuxLogits.fc.weight" not in models.get("inceptionv3", aux_logits=False).state_dict()


def test_googlenet_aux_heads_take_torchvision_checkpoints_and_train() -> None:
    """torchvision's GoogLeNet checkpoint holds the auxiliary heads ``aux1``/``aux2``."""
    model = models.get("googlenet", aux_logits=True, num_classes=5)
    assert model.state_dict()["aux1.fc1.weight"].shape == (1024, 2048)
    assert model.state_dict()["aux2.conv.conv.weight"].shape == (128, 528, 1, 1)
    with torch.no_grad():
        assert [t.shape for t in model.train()(torch.randn(2, 3, 96, 96))] == [(2, 5)] * 3
        assert model.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_tiny_resnet_learns() -> None:
    torch.manual_seed(0)
    model = models.get("tiny_resnet", num_classes=2)
    x = torch.randn(32, 1, 28, 28)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_quantizable_layers_run_from_first_conv_to_classifier() -> None:
    layers = models.quantizable_layers(models.get("resnet18"))
    assert layers[0] == "conv1" and layers[-1] == "fc" and len(layers) == 21
    assert "layer2.0.downsample.0" in layers


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet19'; built-in models: resnet18, resnet50"):
        models.get("resnet19")


def test_fashion_mnist_loads_when_installed() -> None:
    from hawqc import data

    if not data.FASHION_MNIST_ROOT.is_dir():
        pytest.skip("Fashion-MNIST absent: install the Debian package dataset-fashion-mnist")
    test = data.fashion_mnist("test")
    assert len(test) == 10_000 and test[0][0].shape == (1, 28, 28)
    assert set(test.tensors[1].unique().tolist()) == set(range(10))


def test_missing_fashion_mnist_is_one_clear_error(tmp_path: Path) -> None:
    from hawqc import data

    with pytest.raises(FileNotFoundError, match="install the Debian package dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.digits("val")


def test_lraspp_matches_torchvision_and_segments() -> None:
    """torchvision's lraspp_mobilenet_v3_large: 3,221,538 parameters, its keys; logits at the input size."""
    model = models.get("lraspp_mobilenet_v3_large").eval()
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 3_221_538
    assert {k: state.get(k) for k in ("backbone.13.block.1.0.weight", "backbone.16.0.weight",
                                       "classifier.cbr.0.weight", "classifier.scale.1.weight",
                                       "classifier.low_classifier.weight", "classifier.high_classifier.bias")} == {
        "backbone.13.block.1.0.weight": [672, 1, 5, 5], "backbone.16.0.weight": [960, 160, 1, 1],
        "classifier.cbr.0.weight": [128, 960, 1, 1], "classifier.scale.1.weight": [128, 960, 1, 1],
        "classifier.low_classifier.weight": [21, 40, 1, 1], "classifier.high_classifier.bias": [21]}
    assert model.backbone[13].block[1][0].dilation == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 21, 48, 40)
