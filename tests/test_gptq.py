"""GPTQ rounding (hawqc.quant.gptq) and its use in learned PTQ."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hawqc
from hawqc import BitConfig, LayerBits, models, quantize
from hawqc.cli import main
from hawqc.quant.adaround import LearnedOptions, gptq_rounding
from hawqc.quant.distill import distill
from hawqc.quant.gptq import gptq_integers, input_gram
from hawqc.quant.model import QuantModel
from hawqc.quant.modules import QuantConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` samples of ``d`` features sharing a common component (GPTQ gains only on correlated inputs)."""
    z = torch.randn(n, d, generator=generator)
    return z + 0.9 * z[:, :1]


def one_column_at_a_time(w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, qmax: int) -> torch.Tensor:
    """The textbook GPTQ loop on one weight matrix (rows: channels), peaks kept at nearest: the oracle."""
    work = w.double().clone()
    h = gram.clone()
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    peak = w.abs().argmax(dim=1)
    q = torch.zeros_like(work)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(work[:, i] / s.double()), -qmax, qmax)
        keep = peak == i
        q[keep, i] = torch.clamp(torch.round(w[keep, i].double() / s[keep].double()), -qmax, qmax)
        error = (work[:, i] - q[:, i] * s.double()) / u[i, i]
        work[:, i:] -= error[:, None] * u[i, i:][None]
    return q


def test_gptq_lowers_the_output_error_of_nearest_rounding_on_correlated_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 48, generator=generator), correlated(2000, 48, generator)
    s = w.abs().amax(dim=1) / 7
    q = gptq_integers(w, s.reshape(-1, 1), 7, (x.T.double() @ x.double() / len(x)).unsqueeze(0), groups=1)
    nearest = torch.clamp(torch.round(w / s[:, None]), -7, 7)

    def error(ints: torch.Tensor) -> float:
        return float((((w - ints * s[:, None]) @ x.T) ** 2).sum())

    assert error(q) < 0.85 * error(nearest)  # measured 0.75; no compensation: >= 1
    assert torch.equal(q, q.round()) and q.abs().max() == 7
    peaks = w.abs().argmax(dim=1)
    assert torch.equal(q[torch.arange(32), peaks], nearest[torch.arange(32), peaks])  # the scales stay


def test_grouped_conv_rounds_each_group_as_its_own_matrix() -> None:
    """A depthwise-style conv (groups of 2 input channels, 3x3): the batched rounding of all groups equals
    the textbook loop run on each group alone, under that group's own patch Gram matrix."""
    generator = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    layer = QuantConv2d(conv, None, 4)
    x = torch.randn(4, 8, 10, 10, generator=generator)
    x = x + 0.8 * x.mean(dim=1, keepdim=True)
    gram = input_gram(layer, x)
    assert gram.shape == (4, 18, 18)
    patches = F.unfold(x, 3, padding=1)  # (N, 72, L): group g's rows are g·18 ... g·18 + 17
    rows = patches[:, 18:36].permute(1, 0, 2).reshape(18, -1).double()
    torch.testing.assert_close(gram[1], rows @ rows.T / rows.shape[1])
    w = conv.weight.detach()
    s = w.abs().flatten(1).amax(dim=1) / 7
    q = gptq_integers(w, s.reshape(-1, 1, 1, 1), 7, gram, groups=4)
    for g in range(4):
        rows_g = slice(2 * g, 2 * g + 2)
        expected = one_column_at_a_time(w[rows_g].flatten(1), s[rows_g], gram[g], 7)
        torch.testing.assert_close(q[rows_g].flatten(1).double(), expected)


def test_gptq_rounding_writes_integers_on_the_layer_grid_and_lowers_its_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    calib = [correlated(16 * 36, 3, torch.Generator().manual_seed(2)).reshape(16, 6, 6, 3).permute(0, 3, 1, 2)]
    models.recalibrate_bn(model, calib)
    qmodel = QuantModel(model.eval(), BitConfig(default=LayerBits(4, 8)).resolve(model))
    qmodel.calibrate(calib)
    node = [n for n in qmodel.nodes if n.kind == "conv"][1]
    s_in = qmodel.input_scale(node)
    before = qmodel.layer(node).integer_params(s_in)
    reference = QuantModel(model, BitConfig(default=LayerBits(4, 8)).resolve(model))
    reference.layer(node).load_state_dict(qmodel.layer(node).state_dict())
    with torch.no_grad():
        x_q, x_fp = (qmodel.node_inputs(calib[0], node.name, fake=f)[0] for f in (True, False))
    nearest, kept = gptq_rounding(qmodel, node, x_q, x_fp, reference.layer(node))
    after = qmodel.layer(node).integer_params(s_in)
    assert kept < nearest
    assert (after["weight"] != before["weight"]).any()
    np.testing.assert_allclose(after["w_scale"], before["w_scale"], rtol=1e-6)


def test_learned_ptq_with_gptq_compiles_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.get("tiny_resnet")
    models.recalibrate_bn(model, [torch.randn(16, 1, 28, 28)])
    calib = list(distill(model, (1, 28, 28), samples=8, batch_size=8, steps=5, cache_dir=tmp_path).split(4))
    qmodel = quantize(model, "w4a8", calib, ptq="learned", learned=LearnedOptions.for_rounding("gptq"))
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    module = hawqc.compile_integer_only(qmodel, input_shape=x.shape)
    expected = qmodel.integer_graph().run(x)
    np.testing.assert_array_equal(module(x), expected)
    np.testing.assert_array_equal(qmodel(torch.from_numpy(x)).numpy(), expected)


def test_gptq_options_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    options = LearnedOptions.for_rounding("gptq", iters=3)
    assert (options.rounding, options.bias_correction, options.clip_weights, options.iters) == ("gptq", False, False, 3)
    with pytest.raises(ValueError, match="does not combine with GPTQ"):
        LearnedOptions(rounding="gptq", blocks=True)
    with pytest.raises(ValueError, match="rounding in"):
        LearnedOptions(rounding="fancy")
    monkeypatch.setenv("HAWQC_CACHE", str(tmp_path / "cache"))
    code = main(["quantize", "tiny_resnet", "--data", "distilled", "--ptq", "learned", "--ptq-rounding", "gptq",
                 "--bit-config", "w4a8", "--calib-batches", "1", "--batch-size", "8", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert "bit-exact" in " ".join(capsys.readouterr().out.split())
    code = main(["quantize", "tiny_resnet", "--data", "distilled", "--ptq", "learned", "--ptq-rounding", "gptq",
                 "--ptq-blocks", "-o", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code != 0 and "does not combine with GPTQ" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()
