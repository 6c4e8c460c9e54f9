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
