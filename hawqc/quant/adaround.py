"""Learned post-training quantization: activation ranges, weight rounding and bias, fitted on calibration data.

After the usual calibration (:meth:`QuantModel.calibrate`), three steps, each on the calibration data:

1. **Activation ranges**: every activation quantizer's clipping range is searched on a grid of fractions
   of the observed range for the least mean squared quantization error of the values it sees
   (MSE-optimal clipping; at 4 bits it usually clips well inside the min/max range).
2. **Weight ranges**: each output channel of a layer whose weights have a width in ``rounding_bits`` is
   clipped to the fraction of its max |w| (on a grid) that quantizes its weights with the least squared
   error, where that also lowers the channel's output error (nearest rounding, calibration data); the
   clipped weights are the layer's new float weights, so the per-channel scale (max |w| / qmax) shrinks
   with them and the largest weights sit at ±qmax.
3. **Weight rounding** (AdaRound, Nagel et al., ICML 2020), layer by layer in graph order, for layers
   whose weights have a width in ``rounding_bits``: each weight is ``s · clamp(⌊w/s⌋ + h(V))`` with
   ``h`` the rectified sigmoid, ``V`` fitted by Adam to reconstruct the layer's float output (its
   activation included) from its *quantized* input, i.e. the output of the layers before it as already
   quantized (BRECQ's asymmetric reconstruction), plus the regulariser ``λ Σ 1 − |2h(V) − 1|^β`` with
   ``β`` falling linearly from 20 to 2 after a warm-up, which drives every ``h`` to 0 or 1. The weight of largest
   magnitude in each channel keeps its nearest rounding (±qmax) throughout the fit, so the per-channel scale is
   unchanged. Where the learned rounding reconstructs the whole calibration set worse than nearest
   rounding (the fit sees random windows), the layer keeps nearest rounding.
4. **Bias correction**: the mean per-channel shift of the quantized layer's output (from its quantized
   input) against the float layer's (from the float input) is subtracted from its bias.

The results are written back into the quantized model's own float parameters (the folded weight becomes
exactly ``s · q`` for the learned integers ``q``; the BatchNorm shift or the bias takes the correction),
so the result is an ordinary :class:`~hawqc.quant.model.QuantModel`: symmetric, per-channel, dyadic,
exported and compiled as any other (the learned integer weights are just different integers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hawqc.quant.capture import Node
from hawqc.quant.model import QuantModel, _as_input, _relu
from hawqc.quant.modules import QuantConv2d, QuantLinear
from hawqc.quant.quantizers import quantize_weight, weight_qmax

ZETA, GAMMA = 1.1, -0.1
"""The rectified sigmoid's stretch: ``h(V) = clamp(sigmoid(V) · (ζ − γ) + γ, 0, 1)``."""


@dataclass(frozen=True)
class LearnedOptions:
    """Settings of learned PTQ; the defaults are sized for a CPU (AdaRound's paper uses 20,000 iterations)."""

    iters: int = 500
    """Adam steps per layer of the rounding fit."""
    batch_size: int = 8
    """Calibration samples per step."""
    crop: int | None = 32
    """Side of the random window of a conv input each step reconstructs (None: the whole input); keeps a
    step's cost independent of the resolution. Both sides of the loss see the same window."""
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    """Share of the steps before the regulariser starts (and ``β`` starts falling)."""
    rounding_bits: tuple[int, ...] = (4,)
    """Weight widths whose rounding is learned; wider weights keep nearest rounding (8-bit rounding
    errors are 16 times smaller)."""
    search_ranges: bool = True
    range_grid: int = 80
    clip_weights: bool = True
    """MSE-optimal per-channel clipping of the weights whose rounding is learned (step 2)."""
    weight_grid: tuple[float, int] = (0.5, 51)
    """Clipping fractions tried: ``weight_grid[1]`` steps from ``weight_grid[0]`` to 1."""
    bias_correction: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or not self.lr > 0 or self.range_grid < 2 or (
                self.crop is not None and self.crop < 1) or not 0 < self.weight_grid[0] <= 1 or self.weight_grid[1] < 1:
            raise ValueError(f"learned PTQ needs iters, batch_size, crop >= 1, lr > 0, range_grid >= 2 and a weight "
                             f"grid in (0, 1], got {self.iters}, {self.batch_size}, {self.crop}, {self.lr}, "
                             f"{self.range_grid}, {self.weight_grid}")


def learn(qmodel: QuantModel, batches: Sequence[torch.Tensor], options: LearnedOptions = LearnedOptions(),
          log: Callable[[str], None] | None = None) -> QuantModel:
    """Fit ``qmodel``'s activation ranges, weight rounding and biases on calibration ``batches`` (it must
    have been calibrated on them); see the module docstring. Returns ``qmodel`` in eval mode, integer mode."""
    if any(layer.weight_percentile is not None for layer in qmodel.layers.values()):
        raise ValueError("learned PTQ keeps each channel's max-|w| scale: quantize without weight_percentile")
    batches = [_as_input(b) for b in batches]
    qmodel.eval()
    if options.search_ranges:
        search_activation_ranges(qmodel, batches, options.range_grid)
    generator = torch.Generator().manual_seed(options.seed)
    reference = copy.deepcopy(qmodel)  # the float model as calibrated: every layer's target, untouched by the fits
    layers = [n for n in qmodel.nodes if n.kind in ("conv", "dense")]
    for i, node in enumerate(layers):
        learned = qmodel.layer(node).w_bits in options.rounding_bits
        if not learned and not options.bias_correction:
            continue
        with torch.no_grad():
            x_q = torch.cat([qmodel.node_inputs(x, node.name, fake=True)[0] for x in batches])
            x_fp = torch.cat([reference.node_inputs(x, node.name, fake=False)[0] for x in batches])
        if learned and options.clip_weights:
            clip_weight_ranges(qmodel, node, *options.weight_grid, inputs=(x_q, x_fp))
        if learned:
            error = reconstruct_rounding(qmodel, node, x_q, x_fp, options, generator, reference.layer(node))
            if log is not None:
                log(f"[{i + 1}/{len(layers)}] {node.layer}: output error {error[0]:.4g} nearest -> {error[1]:.4g} learned")
        if options.bias_correction:
            correct_bias(qmodel, node, x_q, x_fp, reference.layer(node))
    qmodel.mode = "int"
    return qmodel


# ---- activation ranges ------------------------------------------------------------------------------
@contextmanager
def _sampled_activations(qmodel: QuantModel, limit: int, seed: int = 0) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, each activation quantizer records (a random subsample of at most ``limit`` of) the
    values it observes, instead of updating its range."""
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in qmodel.acts}
    generator = torch.Generator().manual_seed(seed)

    def record(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() > limit:
            flat = flat[torch.randint(0, flat.numel(), (limit,), generator=generator)]
        samples[name].append(flat)

    for name, quantizer in qmodel.acts.items():
        quantizer.observe = lambda x, world=None, name=name: record(name, x)  # shadows the method while sampling
    try:
        yield samples
    finally:
        for quantizer in qmodel.acts.values():
            del quantizer.observe


@torch.no_grad()
def search_activation_ranges(qmodel: QuantModel, batches: Sequence[torch.Tensor], grid: int = 80,
                             samples_per_batch: int = 1 << 18) -> dict[str, float]:
    """Set each activation quantizer's scale to the fraction (on a grid of ``grid`` steps in (0, 1]) of its
    calibrated scale that quantizes the values it sees with the least squared error. Returns the fractions."""
    with _sampled_activations(qmodel, samples_per_batch) as samples:
        for x in batches:
            qmodel._float_forward(x, fake=False, observe=True)
    fractions = torch.linspace(1.0 / grid, 1.0, grid)
    chosen = {}
    for name, quantizer in qmodel.acts.items():
        values = torch.cat(samples[name])
        qmin, qmax = quantizer.qrange
        base = quantizer.scale.clone()
        errors = torch.stack([((torch.clamp(torch.round(values / (base * f)), qmin, qmax) * (base * f) - values) ** 2)
                              .mean() for f in fractions])
        best = fractions[int(torch.argmin(errors))]
        quantizer.scale.copy_(base * best)
        chosen[name] = float(best)
    return chosen


# ---- weight ranges ----------------------------------------------------------------------------------
@torch.no_grad()
def clip_weight_ranges(qmodel: QuantModel, node: Node, lowest: float = 0.5, steps: int = 51,
                       inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Clip each output channel of the layer's folded weight to the fraction of its max |w| (``steps``
    fractions from ``lowest`` to 1) whose quantization has the least squared error, and make that the
    layer's weight. With ``inputs`` (the layer's quantized and float inputs), a channel is clipped only
    where that also lowers its output's squared error with nearest rounding. Returns the fractions (1
    where the bias-overflow floor sets the scale instead, or the clip did not pay)."""
    layer = qmodel.layer(node)
    w, b = (t.detach().clone() for t in layer.folded())
    s = _scale(qmodel, node, w, b).reshape(len(w), 1)
    flat = w.reshape(len(w), -1)
    n = weight_qmax(layer.w_bits)
    amax = flat.abs().amax(dim=1, keepdim=True)
    free = (s * n <= amax * (1 + 1e-6)).reshape(-1)  # channels whose scale is max|w| / qmax
    fractions = torch.linspace(lowest, 1.0, steps)
    errors = torch.stack([((torch.clamp(torch.round(flat / (s * f)), -n, n) * s * f - flat) ** 2).sum(dim=1)
                          for f in fractions])
    best = torch.where(free, fractions[errors.argmin(dim=0)], torch.ones(len(w)))
    if inputs is not None:
        x_q, x_fp = inputs
        target = _layer_output(layer, node, x_fp, w, b)
        shape = (-1,) + (1,) * (w.dim() - 1)
        dims = [d for d in range(target.dim()) if d != 1]
        out_errors = [((_layer_output(layer, node, x_q, torch.clamp(torch.round(w / t), -n, n) * t, b) - target) ** 2)
                      .sum(dim=dims) for t in (s.reshape(shape), (s * best.reshape(-1, 1)).reshape(shape))]
        best = torch.where(out_errors[1] < out_errors[0], best, torch.ones_like(best))
    limit = (amax * best.reshape(-1, 1)).reshape((-1,) + (1,) * (w.dim() - 1))
    if bool((best < 1).any()):
        _set_folded_weight(layer, torch.maximum(torch.minimum(w, limit), -limit))
    return best


# ---- weight rounding --------------------------------------------------------------------------------
def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _layer_output(layer: QuantConv2d | QuantLinear, node: Node, x: torch.Tensor, w: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    y = layer._op(x, w, b)
    return _relu(y, node.relu_max) if node.relu else y


def _scale(qmodel: QuantModel, node: Node, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer's per-channel weight scale, broadcastable to ``w``, as its integer parameters will use it."""
    layer = qmodel.layer(node)
    input_scale = qmodel.acts[qmodel.scale_source[node.inputs[0]]].scale
    return layer.weight_scale(w, b, input_scale).reshape((-1,) + (1,) * (w.dim() - 1))


def reconstruct_rounding(qmodel: QuantModel, node: Node, x_q: torch.Tensor, x_fp: torch.Tensor,
                         options: LearnedOptions, generator: torch.Generator,
                         float_layer: QuantConv2d | QuantLinear | None = None) -> tuple[float, float]:
    """Learn the rounding of one layer's weights (AdaRound, see the module docstring) from its quantized
    input ``x_q`` against the float output on ``x_fp`` (of ``float_layer``, the layer before any fitting,
    default the layer as it is), and write it into the layer. Returns the mean squared output error
    with nearest and with learned rounding."""
    layer = qmodel.layer(node)
    x_q, x_fp = x_q.detach(), x_fp.detach()
    with torch.no_grad():
        w_fp, b_fp = (t.detach().clone() for t in (float_layer or layer).folded())
        w, b = (t.detach().clone() for t in layer.folded())
        s = _scale(qmodel, node, w, b)
        n = weight_qmax(layer.w_bits)
        floor = torch.floor(w / s)
        rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
        v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(v) == rest
        nearest = torch.clamp(torch.round(w / s), -n, n)
        peak = w.abs().reshape(len(w), -1).argmax(dim=1)  # each channel's max |w| keeps ±qmax: same scale
        fixed = torch.zeros_like(w, dtype=torch.bool)
        fixed.reshape(len(w), -1)[torch.arange(len(w)), peak] = True
    optimizer = torch.optim.Adam([v], lr=options.lr)
    warmup = int(options.warmup * options.iters)
    for step in range(options.iters):
        inputs, reference = _window(x_q, x_fp, options, generator)
        with torch.no_grad():
            target = _layer_output(layer, node, reference, w_fp, b_fp)
        h = _rectified_sigmoid(v)
        y = _layer_output(layer, node, inputs, s * torch.where(fixed, nearest, torch.clamp(floor + h, -n, n)), b)
        loss = ((y - target) ** 2).flatten(1).sum(1).mean()
        if step >= warmup:
            beta = options.beta[0] + (options.beta[1] - options.beta[0]) * (step - warmup) / max(options.iters - warmup, 1)
            loss = loss + options.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        q = torch.where(fixed, nearest, torch.clamp(floor + (v >= 0).float(), -n, n))
        target = _layer_output(layer, node, x_fp, w_fp, b_fp)
        errors = tuple(float(F.mse_loss(_layer_output(layer, node, x_q, s * r, b), target)) for r in (nearest, q))
        if errors[1] > errors[0]:  # the fit (on random windows) lost on the whole calibration set: keep nearest
            q, errors = nearest, (errors[0], errors[0])
        _set_folded_weight(layer, s * q)
        w_after, b_after = layer.folded()
        got = quantize_weight(w_after, layer.weight_scale(w_after, b_after, qmodel.acts[
            qmodel.scale_source[node.inputs[0]]].scale), layer.w_bits)
        if not torch.equal(got.float(), q):
            raise AssertionError(f"{node.layer}: learned integer weights did not survive the write-back")
    return errors


def _window(x_q: torch.Tensor, x_fp: torch.Tensor, options: LearnedOptions,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random samples (and, for images, the same random spatial window) of both inputs."""
    idx = torch.randint(0, len(x_q), (min(options.batch_size, len(x_q)),), generator=generator)
    x_q, x_fp = x_q[idx], x_fp[idx]
    if x_q.dim() == 4 and options.crop is not None:
        h, w = x_q.shape[2:]
        top = int(torch.randint(0, max(h - options.crop, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(w - options.crop, 0) + 1, (1,), generator=generator))
        window = (..., slice(top, top + options.crop), slice(left, left + options.crop))
        x_q, x_fp = x_q[window], x_fp[window]
    return x_q, x_fp


def _fold_factor(layer: QuantConv2d | QuantLinear) -> torch.Tensor | None:
    """BatchNorm's per-channel weight factor ``γ / sqrt(var + eps)``, or None without BatchNorm."""
    if layer.bn is None:
        return None
    return layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)


@torch.no_grad()
def _set_folded_weight(layer: QuantConv2d | QuantLinear, folded: torch.Tensor) -> None:
    """Make the layer's folded weight ``folded`` (channels BatchNorm zeroes stay as they are)."""
    factor = _fold_factor(layer)
    if factor is None:
        layer.layer.weight.copy_(folded)
        return
    shape = (-1,) + (1,) * (folded.dim() - 1)
    live = (factor != 0).reshape(shape)
    safe = torch.where(factor != 0, factor, torch.ones_like(factor)).reshape(shape)
    layer.layer.weight.copy_(torch.where(live, folded / safe, layer.layer.weight))


# ---- bias correction --------------------------------------------------------------------------------
@torch.no_grad()
def correct_bias(qmodel: QuantModel, node: Node, x_q: torch.Tensor, x_fp: torch.Tensor,
                 float_layer: QuantConv2d | QuantLinear) -> torch.Tensor:
    """Subtract from the layer's folded bias the mean per-channel shift between its quantized output (on
    ``x_q``, weights as they will be rounded) and the float layer's output (``float_layer``, the layer
    before any fitting, on ``x_fp``), before activation. Returns the shift."""
    layer = qmodel.layer(node)
    w, b = layer.folded()
    s = _scale(qmodel, node, w, b)
    n = weight_qmax(layer.w_bits)
    w_q = torch.clamp(torch.round(w / s), -n, n) * s
    dims = [0, 2, 3] if x_q.dim() == 4 else [0]
    shift = (layer._op(x_q, w_q, b) - float_layer._op(x_fp, *float_layer.folded())).mean(dim=dims)
    factor = _fold_factor(layer)
    if factor is None:
        if layer.layer.bias is None:
            layer.layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.layer.bias.sub_(shift)
    else:
        layer.bn.bias.sub_(shift)
    return shift
