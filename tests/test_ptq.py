"""Data-free calibration (distilled data), learned PTQ (AdaRound, ranges, bias correction) and W4A8."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hawqc
from hawqc import BitConfig, LayerBits, models, quantize
from hawqc.cli import main
from hawqc.ilp.solver import Budget, build_problem, solve
from hawqc.quant.adaround import (
    Block,
    LearnedOptions,
    blocks,
    _mean_output,
    _scale,
    clip_weight_ranges,
    correct_bias_expected,
    expected_inputs,
    reconstruct_block,
    reconstruct_rounding,
    search_activation_ranges,
)
from hawqc.quant.distill import _class_targets, bn_statistics_loss, distill, total_variation
from hawqc.quant.model import QuantModel

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net() -> nn.Module:
    """Conv-BN-ReLU x2, GAP, Linear, with BatchNorm statistics of inputs unlike standard noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    models.recalibrate_bn(model, [torch.randn(16, 3, 8, 8) * 3 + torch.tensor([2.0, -1.0, 0.5]).reshape(1, 3, 1, 1)])
    return model.eval()


def test_distilled_data_matches_batchnorm_statistics_and_is_cached(tmp_path: Path) -> None:
    model = bn_net()
    x = distill(model, (3, 8, 8), samples=16, batch_size=16, steps=60, lr=0.2, cache_dir=tmp_path)
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(bn_statistics_loss(model, x)) < 0.3 * float(bn_statistics_loss(model, noise))
    assert len(list(tmp_path.glob("distilled-*.pt"))) == 1
    assert torch.equal(distill(model, (3, 8, 8), samples=16, batch_size=16, steps=60, lr=0.2, cache_dir=tmp_path), x)
    bounded = distill(model, (3, 8, 8), samples=4, steps=5, input_range=(-0.5, 0.5), cache_dir=tmp_path)
    assert float(bounded.abs().max()) <= 0.5
    with pytest.raises(ValueError, match="needs a model with BatchNorm"):
        distill(nn.Sequential(nn.Conv2d(3, 4, 1)), (3, 4, 4), steps=1, cache_dir=tmp_path)


def test_distilled_data_with_jitter_and_flips_matches_statistics_shifted_and_mirrored(tmp_path: Path) -> None:
    model = bn_net()
    plain = distill(model, (3, 8, 8), samples=16, batch_size=16, steps=60, lr=0.2, cache_dir=tmp_path)
    x = distill(model, (3, 8, 8), samples=16, batch_size=16, steps=60, lr=0.2, jitter=2, flip=True, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("distilled-*.pt"))) == 2 and not torch.equal(x, plain)
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for view in (x, torch.flip(x, dims=(-1,)), torch.roll(x, shifts=(2, -1), dims=(-2, -1))):
            assert float(bn_statistics_loss(model, view)) < 0.3 * float(bn_statistics_loss(model, noise))
    with pytest.raises(ValueError, match="jitter >= 0"):
        distill(model, (3, 8, 8), jitter=-1, cache_dir=tmp_path)


def test_distilled_data_image_prior_lowers_total_variation_and_class_targets_set_the_argmax(tmp_path: Path) -> None:
    model = bn_net()
    kwargs = {"samples": 10, "batch_size": 5, "steps": 60, "lr": 0.2, "cache_dir": tmp_path}
    plain = distill(model, (3, 8, 8), **kwargs)
    smooth = distill(model, (3, 8, 8), tv_weight=0.5, l2_weight=0.1, first_bn_weight=5.0, **kwargs)
    assert float(total_variation(smooth)) < 0.7 * float(total_variation(plain))
    assert float(smooth.norm()) < float(plain.norm())
    labelled = distill(model, (3, 8, 8), class_weight=50.0, schedule="cosine", **kwargs)
    targets = torch.cat([_class_targets(0, 5, 5, seed=0), _class_targets(5, 5, 5, seed=0)])
    assert sorted(targets[:5].tolist()) == list(range(5))  # a batch covers distinct classes
    with torch.no_grad():
        assert int((model(labelled).argmax(1) == targets).sum()) >= 8  # of 10
        assert int((model(plain).argmax(1) == targets).sum()) <= 3
        noise = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        assert float(bn_statistics_loss(model, labelled)) < float(bn_statistics_loss(model, noise))
    assert len(list(tmp_path.glob("distilled-*.pt"))) == 3
    with pytest.raises(ValueError, match="weights >= 0 and schedule plateau or cosine"):
        distill(model, (3, 8, 8), schedule="linear", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="weights >= 0"):
        distill(model, (3, 8, 8), tv_weight=-1.0, cache_dir=tmp_path)


def test_learned_rounding_lowers_the_layer_reconstruction_error() -> None:
    model = bn_net()
    calib = [torch.randn(16, 3, 8, 8) * 3 + 1]
    qmodel = QuantModel(model, BitConfig(default=LayerBits(4, 4)).resolve(model))
    qmodel.calibrate(calib)
    node = [n for n in qmodel.nodes if n.kind == "conv"][1]
    layer = qmodel.layer(node)
    s_in = qmodel.input_scale(node)
    before = layer.integer_params(s_in)
    with torch.no_grad():
        x_q, x_fp = (qmodel.node_inputs(calib[0], node.name, fake=f)[0] for f in (True, False))
    nearest, learned = reconstruct_rounding(qmodel, node, x_q, x_fp, LearnedOptions(iters=300),
                                            torch.Generator().manual_seed(0))
    assert learned < 0.95 * nearest
    after = layer.integer_params(s_in)
    diff = after["weight"].astype(int) - before["weight"].astype(int)
    assert np.abs(diff).max() == 1 and (diff != 0).any()  # each weight rounded down or up, some not to nearest
    np.testing.assert_allclose(after["w_scale"], before["w_scale"], rtol=1e-6)  # the scales stay


def test_blocks_are_residual_blocks() -> None:
    model = models.get("tiny_resnet")
    found = blocks(QuantModel(model, BitConfig(default=LayerBits(4, 4)).resolve(model)))
    assert [[n.layer for n in b.layers] for b in found] == [
        ["conv1"], ["layer1.0.conv1", "layer1.0.conv2"], ["layer2.0.downsample.0", "layer2.0.conv1", "layer2.0.conv2"],
        ["layer3.0.downsample.0", "layer3.0.conv1", "layer3.0.conv2"], ["fc"]]
    assert [(b.after, b.last) for b in found][1:3] == [("conv1", "add"), ("add", "add_1")]


def test_block_reconstruction_lowers_the_block_error_of_nearest_rounding() -> None:
    model = bn_net()
    calib = [torch.randn(16, 3, 8, 8) * 3 + 1]
    bits = BitConfig(default=LayerBits(4, 8)).resolve(model)
    qmodel = QuantModel(model, bits).eval()
    qmodel.calibrate(calib)
    reference = copy.deepcopy(qmodel)
    convs = [n for n in qmodel.nodes if n.kind == "conv"]
    block = Block(convs[0].inputs[0], convs[1].name, convs)  # both convs: one block, fitted jointly
    before = [qmodel.layer(n).integer_params(qmodel.input_scale(n))["weight"] for n in convs]
    nearest, learned = reconstruct_block(qmodel, block, convs, calib[0], calib[0], LearnedOptions(iters=300, drop=0.5),
                                         torch.Generator().manual_seed(0), reference)
    assert learned < 0.9 * nearest
    with torch.no_grad():
        got = qmodel.segment_forward(calib[0], block.after, block.last, fake=True)
        target = reference.segment_forward(calib[0], block.after, block.last, fake=False)
    # the written weights give it, up to the bias's own rounding (the fit keeps the folded bias in float)
    assert float(((got - target) ** 2).mean()) == pytest.approx(learned, rel=1e-2)
    for node, old in zip(convs, before):
        diff = qmodel.layer(node).integer_params(qmodel.input_scale(node))["weight"].astype(int) - old
        assert np.abs(diff).max() == 1


def test_weight_range_search_clips_heavy_tailed_channels_and_lowers_the_weight_error() -> None:
    model = bn_net()
    qmodel = QuantModel(model, BitConfig(default=LayerBits(4, 4)).resolve(model))
    qmodel.calibrate([torch.randn(16, 3, 8, 8) * 3 + 1])
    node = [n for n in qmodel.nodes if n.kind == "conv"][1]
    layer = qmodel.layer(node)
    with torch.no_grad():  # channel 0: heavy-tailed weights, whose best 4-bit range clips the largest
        layer.layer.weight[0] = torch.distributions.StudentT(1.5).sample(layer.layer.weight[0].shape) * 0.1
    w = layer.folded()[0].detach().clone()
    s_in = qmodel.input_scale(node)

    def weight_error() -> float:
        p = layer.integer_params(s_in)
        return float(((torch.from_numpy(p["weight"].astype(np.float32)) * torch.from_numpy(p["w_scale"]).reshape(-1, 1, 1, 1)
                       - w) ** 2).sum())

    before = weight_error()
    fractions = clip_weight_ranges(qmodel, node)
    assert float(fractions[0]) < 1.0 and bool(((fractions > 0) & (fractions <= 1)).all())
    assert weight_error() < 0.9 * before
    clipped = layer.folded()[0].detach().reshape(len(w), -1).abs().amax(dim=1)
    torch.testing.assert_close(clipped, fractions * w.reshape(len(w), -1).abs().amax(dim=1))
    assert np.abs(layer.integer_params(s_in)["weight"]).reshape(len(w), -1).max(axis=1).tolist() == [7] * len(w)


def test_activation_range_search_clips_4_bit_ranges() -> None:
    model = bn_net()
    qmodel = QuantModel(model, BitConfig(default=LayerBits(4, 4)).resolve(model))
    calib = [torch.randn(16, 3, 8, 8) * 3 + 1]
    qmodel.calibrate(calib)
    fractions = search_activation_ranges(qmodel, calib)
    assert set(fractions) == set(qmodel.acts) and min(fractions.values()) < 1.0
    assert all(0 < f <= 1 for f in fractions.values())


def test_expected_inputs_follow_the_batchnorm_statistics() -> None:
    model = bn_net()
    torch.manual_seed(1)  # a fresh draw from the distribution the BatchNorm statistics were taken on
    x = torch.randn(64, 3, 8, 8) * 3 + torch.tensor([2.0, -1.0, 0.5]).reshape(1, 3, 1, 1)
    qmodel = QuantModel(model, BitConfig(default=LayerBits(4, 8)).resolve(model))
    qmodel.calibrate([x])
    expected = expected_inputs(qmodel, [torch.zeros(2, 3, 8, 8)])  # the data is only the input's mean here
    trace: dict[str, torch.Tensor] = {}
    qmodel._float_forward(x, fake=False, observe=False, trace=trace)
    relu_outputs = [n.name for n in qmodel.nodes if n.kind == "conv"]
    for name in relu_outputs + [n.name for n in qmodel.nodes if n.kind in ("gap", "flatten")]:
        measured = trace[name].transpose(0, 1).flatten(1).mean(dim=1)
        torch.testing.assert_close(expected[name][1], measured, atol=0.08, rtol=0.1)  # clipped Gaussians
    assert torch.equal(expected["input_1"][0], torch.zeros(3))
    quantizer = qmodel.acts[relu_outputs[0]]
    quantizer.scale.mul_(0.25)  # a range clipping the ReLU's output: its quantized mean falls below the float one
    clipped = expected_inputs(qmodel, [x[:2]])[relu_outputs[0]]
    assert bool((clipped[0] <= clipped[1] + 1e-6).all()) and bool((clipped[0] < clipped[1] - 1e-3).any())


def test_data_free_bias_correction_cancels_the_expected_output_shift() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
                          nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6)).eval()
    models.recalibrate_bn(model, [torch.randn(8, 4, 8, 8)])
    qmodel = QuantModel(model, BitConfig(default=LayerBits(4, 8)).resolve(model))
    qmodel.calibrate([torch.randn(8, 4, 8, 8)])
    node = [n for n in qmodel.nodes if n.kind == "conv"][1]
    layer, reference = qmodel.layer(node), copy.deepcopy(qmodel.layer(node))
    mean_q, mean_fp = torch.rand(4), torch.rand(4)
    constant = mean_fp.reshape(1, 4, 1, 1).expand(1, 4, 5, 5)  # its interior output: _mean_output + bias
    w, b = reference.folded()
    interior = (reference._op(constant, w, b) - b.reshape(1, -1, 1, 1))[0, :, 2, 2]
    torch.testing.assert_close(_mean_output(reference, w, mean_fp), interior)
    shift = correct_bias_expected(qmodel, node, mean_q, mean_fp, reference)
    assert float(shift.abs().max()) > 0
    integers = torch.from_numpy(layer.integer_params(qmodel.input_scale(node))["weight"]).float()
    w_q = integers * _scale(qmodel, node, *layer.folded())  # the weights the integer graph runs
    torch.testing.assert_close(_mean_output(layer, w_q, mean_q) + layer.folded()[1],
                               _mean_output(reference, w, mean_fp) + b)


def test_w4a8_preset_and_ilp_option() -> None:
    model = models.get("tiny_resnet")
    bits = BitConfig.from_any("w4a8").resolve(model)
    names = list(bits)
    assert bits[names[0]] == bits[names[-1]] == LayerBits(8, 8)
    assert {bits[n] for n in names[1:-1]} == {LayerBits(4, 8)}
    omega = {n: {4: 1.0, 8: 0.0} for n in names}
    costly_4bit_inputs = {n: {4: 10.0, 8: 0.0} for n in names}
    problem = build_problem(model, (1, 28, 28), omega, activation_omega=costly_4bit_inputs)
    solution = solve(problem, [Budget.parse("size", 0.0)])  # smallest weights: 4-bit, inputs kept at 8 bits
    assert {solution.bits[n] for n in names[1:-1]} == {LayerBits(4, 8)}


@pytest.mark.parametrize(("blocks", "bias_statistics"), [(False, "data"), (True, "data"), (False, "batchnorm")])
def test_learned_ptq_on_distilled_data_compiles_bit_exact(tmp_path: Path, blocks: bool, bias_statistics: str) -> None:
    torch.manual_seed(0)
    model = models.get("tiny_resnet")
    models.recalibrate_bn(model, [torch.randn(16, 1, 28, 28)])
    calib = list(distill(model, (1, 28, 28), samples=8, batch_size=8, steps=5, cache_dir=tmp_path).split(4))
    qmodel = quantize(model, "w4a8", calib, ptq="learned", learned=LearnedOptions(iters=10, blocks=blocks, drop=0.5,
                                                                               bias_statistics=bias_statistics))
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    module = hawqc.compile_integer_only(qmodel, input_shape=x.shape)
    expected = qmodel.integer_graph().run(x)
    np.testing.assert_array_equal(module(x), expected)
    np.testing.assert_array_equal(qmodel(torch.from_numpy(x)).numpy(), expected)
    assert {b.w_bits for b in qmodel.bits.values()} == {4, 8}


def test_quantize_rejects_unknown_ptq() -> None:
    with pytest.raises(ValueError, match="unknown PTQ method 'fancy'"):
        quantize(bn_net(), "uniform8", [torch.randn(2, 3, 8, 8)], ptq="fancy")
    with pytest.raises(ValueError, match="iters, batch_size, crop >= 1"):
        LearnedOptions(iters=0)
    with pytest.raises(ValueError, match="bias_statistics in"):
        LearnedOptions(bias_statistics="mean")


@pytest.mark.parametrize(("model", "args", "message"), [
    ("tiny_resnet", ["--ptq", "fancy"], "invalid choice: 'fancy'"),
    ("tiny_resnet", ["--ptq", "learned", "--ptq-iters", "0"], "hawqc quantize: error: --ptq-iters must be at least 1"),
    ("no_bn.pt2", ["--data", "distilled"], "hawqc quantize: error: distilled data needs a model with BatchNorm layers"),
    ("tiny_resnet", ["--data", "distilled", "--distill", "speed=3"], "--distill takes KEY=VALUE pairs with keys steps"),
    ("tiny_resnet", ["--data", "distilled", "--distill", "steps=many"], "--distill steps takes a number, got 'many'"),
    ("tiny_resnet", ["--data", "distilled", "--distill", "tv=-1"], "hawqc quantize: error: distilled data needs weights >= 0"),
])
def test_cli_flags_fail_cleanly(model: str, args: list[str], message: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    if model.endswith(".pt2"):  # a user's exported model without BatchNorm
        no_bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        model = str(tmp_path / model)
        torch.export.save(torch.export.export(no_bn.eval(), (torch.randn(1, 3, 8, 8),)), model)
    try:
        code = main(["quantize", model, *args, "-o", str(tmp_path / "out")])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_data_free_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HAWQC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["quantize", "tiny_resnet", "--data", "distilled", "--ptq", "learned", "--bit-config", "w4a8",
                 "--distill", "steps=20,lr=0.2,schedule=cosine,jitter=1,flip=1,tv=0.01,l2=0.01,first-bn=2,classes=1",
                 "--ptq-iters", "5", "--calib-batches", "1", "--batch-size", "8",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    text = " ".join(capsys.readouterr().out.split())
    assert "bit-exact" in text and "learned" in text
    assert set(BitConfig.load(out / "bit_config.json").layers.values()) == {LayerBits(8, 8), LayerBits(4, 8)}
    assert len(list((tmp_path / "cache").glob("distilled-*.pt"))) == 1


def test_distilled_data_takes_the_batchnorm_bias_correction_by_default() -> None:
    """Distilled inputs' own channel means mislead bias correction: the data-free path derives it from BatchNorm
    unless told otherwise; real data keeps the measured one."""
    from argparse import Namespace

    from hawqc.commands.quantize import bias_statistics

    assert bias_statistics(Namespace(ptq_bias_statistics=None, data="distilled")) == "batchnorm"
    assert bias_statistics(Namespace(ptq_bias_statistics=None, data="digits")) == "data"
    assert bias_statistics(Namespace(ptq_bias_statistics="data", data="distilled")) == "data"
