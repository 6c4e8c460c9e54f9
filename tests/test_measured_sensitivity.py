"""Measured (KL) sensitivity: ZeroQ's per-layer divergence on top of W8A8, for the ILP."""

import json

import pytest
import torch
from torch import nn

from hawqc import quantize
from hawqc.bitconfig import BitConfig, LayerBits
from hawqc.ilp.measured import kl_divergence, measured_sensitivity
from hawqc.ilp.search import search


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.bn3(self.conv3(x))).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(20)  # confident outputs: quantization moves the softmax visibly
        model.conv2.weight[:, 0, 0, 0] = 8 * model.conv2.weight.abs().amax()  # one outlier per channel: coarse 4-bit grid
    return model.eval()


def test_measured_omega_is_the_divergence_one_layer_adds() -> None:
    model, x = _model(), torch.randn(16, 2, 6, 6)
    sens = measured_sensitivity(model, [x[:8], x[8:]], bits=(4, 8), activation_bits=(4, 8))
    assert set(sens.omega) == {"conv1", "conv2", "conv3", "fc"} and sens.settings["method"] == "measured-kl"
    with torch.no_grad():
        reference = model(x)

    def added(config: BitConfig) -> float:
        q = quantize(model, config, [x[:8], x[8:]])
        q.mode = "fake"
        with torch.no_grad():
            return kl_divergence(reference, q(x))

    eight = LayerBits(8, 8)
    base = added(BitConfig(default=eight))
    for name in ("conv2", "fc"):
        assert sens.omega[name][8] == 0.0 and sens.activation_omega[name][8] == 0.0
        assert sens.omega[name][4] == pytest.approx(
            max(added(BitConfig(layers={name: LayerBits(4, 8)}, default=eight)) - base, 0.0), rel=1e-5, abs=1e-9)
        assert sens.activation_omega[name][4] == pytest.approx(
            max(added(BitConfig(layers={name: LayerBits(8, 4)}, default=eight)) - base, 0.0), rel=1e-5, abs=1e-9)
    assert any(o[4] > 0 for o in sens.omega.values()) and any(o[4] > 0 for o in sens.activation_omega.values())


def test_ilp_keeps_the_measured_sensitive_layer_at_eight_bits() -> None:
    """conv2 and conv3 cost the same; conv2's outlier weights make its 4-bit grid coarse: it adds more
    divergence, and the ILP (budget for one of the two at 8 bits) keeps it at 8 bits."""
    model, x = _model(), torch.randn(16, 2, 6, 6)
    sens = measured_sensitivity(model, [x], activation_bits=(8,))
    assert all(set(o) == {8} for o in sens.activation_omega.values())
    assert sens.omega["conv2"][4] > 2 * sens.omega["conv3"][4]
    config = search(model, (2, 6, 6), sens.omega, options=[LayerBits(4, 8), LayerBits(8, 8)],
                    bops=0.6).solution.bit_config()
    assert (config.layers["conv2"].w_bits, config.layers["conv3"].w_bits) == (8, 4)


def test_cli_sensitivity_and_search_measured(tmp_path, capsys) -> None:
    from hawqc.cli import main

    common = ["tiny_resnet", "--batch-size", "4", "--measured"]
    assert main(["sensitivity", *common, "-o", str(tmp_path / "s.json")]) == 0
    assert "measured Ω" in capsys.readouterr().out
    sens = json.loads((tmp_path / "s.json").read_text())
    assert sens["settings"]["method"] == "measured-kl" and sens["traces"] == {}
    assert all(o["8"] == 0.0 and o["4"] >= 0.0 for o in sens["omega"].values())
    assert main(["search", "tiny_resnet", "--sensitivity", str(tmp_path / "s.json"), "--bops", "0.5",
                 "-o", str(tmp_path / "cfg.json")]) == 0
    assert any(b.w_bits == 4 for b in BitConfig.load(tmp_path / "cfg.json").layers.values())
