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
   With ``blocks`` (BRECQ, Li et al., ICLR 2021) the unit of reconstruction is a block instead of a
   layer (:func:`blocks`: a residual or inverted-residual block): the rounding of all its learned
   layers is fitted jointly to reconstruct the block's float output from its quantized input, through
   the block's fake-quantized activations (optionally with a random share of them left unquantized in
   each step, QDrop); nearest rounding is kept where the fit loses on the whole calibration set.
4. **Bias correction**: the mean per-channel shift of the quantized layer's output (from its quantized
   input) against the float layer's (from the float input) is subtracted from its bias (after the
   layer's, or its block's, rounding fit). The shift is measured on the calibration data, or with
   ``bias_statistics="batchnorm"`` derived without data (DFQ, Nagel et al., ICCV 2019): the weights'
   error times the layer's expected input, which follows from the statistics of the BatchNorm before it
   (:func:`expected_inputs`): the real data's, which distilled inputs only approximate (on
   EfficientNet-Lite0 W4A8 calibrated on distilled inputs it raises the top-1 agreement with FP32 by 6-9
   points after AdaRound, 23 after nearest rounding: ``benchmarks/results/fidelity.md``).

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
from hawqc.quant.gptq import gptq_integers, input_gram
from hawqc.quant.model import QuantModel, _as_input, _relu
from hawqc.quant.modules import QuantConv2d, QuantLinear
from hawqc.quant.quantizers import quantize_weight, weight_qmax

ROUNDINGS = ("adaround", "gptq")
BIAS_STATISTICS = ("data", "batchnorm")
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
    bias_statistics: str = "data"
    """What bias correction takes a layer's mean output shift from: ``"data"`` (measured on the calibration
    data: the quantized layer on its quantized input against the float layer on the float input) or
    ``"batchnorm"`` (data-free, DFQ: the weights' error times the layer's expected input, derived from the
    BatchNorm statistics before it, :func:`expected_inputs`)."""
    blocks: bool = False
    """Reconstruct each block's output (BRECQ, Li et al., ICLR 2021; blocks from :func:`blocks`), the
    rounding of all its learned layers fitted jointly, instead of each layer's output alone (bias
    correction follows the fit, layer by layer)."""
    drop: float = 0.0
    """With ``blocks``: the share of activation elements left unquantized in each step of a block's fit,
    its input included (QDrop, Wei et al., ICLR 2022): rounding fitted to tolerate activation error."""
    rounding: str = "adaround"
    """How the rounding of each layer is chosen (per layer; blocks always use AdaRound): ``"adaround"``
    (a gradient fit, ``iters`` steps) or ``"gptq"`` (closed-form error compensation, :mod:`hawqc.quant.gptq`)."""
    gptq_damp: float = 0.01
    """GPTQ's damping: the share of the mean diagonal of each input Gram matrix added to it."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or not self.lr > 0 or self.range_grid < 2 or (
                self.crop is not None and self.crop < 1) or not 0 < self.weight_grid[0] <= 1 or self.weight_grid[1] < 1 \
                or not 0 <= self.drop < 1 or self.rounding not in ROUNDINGS or not self.gptq_damp > 0 \
                or self.bias_statistics not in BIAS_STATISTICS:
            raise ValueError(f"learned PTQ needs iters, batch_size, crop >= 1, lr > 0, range_grid >= 2, a weight "
                             f"grid in (0, 1], drop in [0, 1), rounding in {ROUNDINGS}, gptq_damp > 0 and "
                             f"bias_statistics in {BIAS_STATISTICS}, got {self.iters}, {self.batch_size}, {self.crop}, "
                             f"{self.lr}, {self.range_grid}, {self.weight_grid}, {self.drop}, {self.rounding!r}, "
                             f"{self.gptq_damp}, {self.bias_statistics!r}")
        if self.blocks and self.rounding != "adaround":
            raise ValueError("block reconstruction fits AdaRound per block: it does not combine with GPTQ rounding")

    @classmethod
    def for_rounding(cls, rounding: str, **settings: object) -> LearnedOptions:
        """Options for ``rounding`` with the companion steps its measurements chose: GPTQ without bias
        correction and weight clipping (on EfficientNet-Lite0's distilled data both raised the KL:
        ``benchmarks/results/fidelity.md``), AdaRound with both."""
        defaults = {"bias_correction": False, "clip_weights": False} if rounding == "gptq" else {}
        return cls(**{"rounding": rounding, **defaults, **settings})  # type: ignore[arg-type]


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
    data_free = options.bias_correction and options.bias_statistics == "batchnorm"
    expected = expected_inputs(reference, batches) if data_free else None
    groups = blocks(qmodel) if options.blocks else [Block(n.inputs[0], n.name, [n]) for n in qmodel.nodes
                                                    if n.kind in ("conv", "dense")]
    for i, block in enumerate(groups):
        learned = [n for n in block.layers if qmodel.layer(n).w_bits in options.rounding_bits]
        if not learned and not options.bias_correction:
            continue
        first: list[tuple[torch.Tensor, torch.Tensor]] = []  # computed once, when needed: the block's fits leave it

        def inputs(node: Node) -> tuple[torch.Tensor, torch.Tensor]:
            if node is not block.layers[0]:
                return _layer_inputs(qmodel, reference, node, batches)
            if not first:
                first.append(_layer_inputs(qmodel, reference, node, batches))
            return first[0]

        for node in learned if options.clip_weights else ():
            clip_weight_ranges(qmodel, node, *options.weight_grid, inputs=inputs(node))
        if learned:
            if options.blocks:
                error = reconstruct_block(qmodel, block, learned, *inputs(block.layers[0]), options, generator,
                                          reference)
            elif options.rounding == "gptq":
                error = gptq_rounding(qmodel, learned[0], *inputs(learned[0]), reference.layer(learned[0]),
                                      options.gptq_damp)
            else:
                error = reconstruct_rounding(qmodel, learned[0], *inputs(learned[0]), options, generator,
                                             reference.layer(learned[0]))
            if log is not None:
                names = block.layers[0].layer + (f"..{block.layers[-1].layer}" if len(block.layers) > 1 else "")
                log(f"[{i + 1}/{len(groups)}] {names}: output error {error[0]:.4g} nearest -> {error[1]:.4g} learned")
        for node in block.layers if options.bias_correction else ():  # after the fit: in order, each on its new input
            if expected is not None:
                correct_bias_expected(qmodel, node, *expected[node.inputs[0]], reference.layer(node))
            else:
                correct_bias(qmodel, node, *inputs(node), reference.layer(node))
    qmodel.mode = "int"
    return qmodel


@torch.no_grad()
def _layer_inputs(qmodel: QuantModel, reference: QuantModel, node: Node,
                  batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input on every batch: through the model as quantized so far, and through the float model."""
    return (torch.cat([qmodel.node_inputs(x, node.name, fake=True)[0] for x in batches]),
            torch.cat([reference.node_inputs(x, node.name, fake=False)[0] for x in batches]))


# ---- blocks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """A run of graph nodes that reads one tensor (node ``after``'s value) and ends at node ``last``,
    whose value is the only one read after it; ``layers``: its conv/dense nodes."""

    after: str
    last: str
    layers: list[Node]


def blocks(qmodel: QuantModel) -> list[Block]:
    """The model cut wherever a single tensor is live, the pieces merged while their layers share a
    module (a layer ``a.b.conv1`` belongs to module ``a.b``; a piece without layers joins the one
    before): for torchvision's ResNets a residual block each, for EfficientNets an inverted-residual
    block each."""
    nodes = qmodel.nodes
    last_use = {n.name: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for name in node.reads():
            last_use[name] = i
    cuts = [i for i, node in enumerate(nodes)
            if node.kind != "output" and all(last_use[n.name] <= i or n is node for n in nodes[:i + 1])]
    found: list[Block] = []
    for start, stop in zip(cuts, cuts[1:]):
        layers = [n for n in nodes[start + 1:stop + 1] if n.kind in ("conv", "dense")]
        modules = {n.layer.rpartition(".")[0] for n in layers}
        if found and (not layers or modules & {n.layer.rpartition(".")[0] for n in found[-1].layers}):
            found[-1] = Block(found[-1].after, nodes[stop].name, found[-1].layers + layers)
        else:
            found.append(Block(nodes[start].name, nodes[stop].name, layers))
    return [b for b in found if b.layers]


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


class _SoftRounding:
    """One layer's weights as ``s · clamp(⌊w/s⌋ + h(V))`` (AdaRound) with ``V`` the parameters to fit,
    started where ``h(V)`` is the fractional part; each channel's weight of largest magnitude keeps its
    nearest rounding (±qmax), so the per-channel scale stays."""

    def __init__(self, qmodel: QuantModel, node: Node) -> None:
        self.layer = layer = qmodel.layer(node)
        self.qmodel, self.node = qmodel, node
        with torch.no_grad():
            w, self.bias = (t.detach().clone() for t in layer.folded())
            self.s = _scale(qmodel, node, w, self.bias)
            self.n = weight_qmax(layer.w_bits)
            self.floor = torch.floor(w / self.s)
            rest = (w / self.s - self.floor).clamp(1e-4, 1 - 1e-4)
            self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(v) == rest
            self.nearest = torch.clamp(torch.round(w / self.s), -self.n, self.n)
            peak = w.abs().reshape(len(w), -1).argmax(dim=1)
            self.fixed = torch.zeros_like(w, dtype=torch.bool)
            self.fixed.reshape(len(w), -1)[torch.arange(len(w)), peak] = True

    def soft(self) -> torch.Tensor:
        """The relaxed rounding ``h(V)``."""
        return _rectified_sigmoid(self.v)

    def integers(self, kind: str = "learned") -> torch.Tensor:
        """The integer weights: ``"soft"`` (relaxed, differentiable), ``"learned"`` (V rounded) or ``"nearest"``."""
        if kind == "nearest":
            return self.nearest
        up = self.soft() if kind == "soft" else (self.v >= 0).float()
        return torch.where(self.fixed, self.nearest, torch.clamp(self.floor + up, -self.n, self.n))

    def output(self, x: torch.Tensor, kind: str = "soft") -> torch.Tensor:
        return _layer_output(self.layer, self.node, x, self.s * self.integers(kind), self.bias)

    @torch.no_grad()
    def write(self, q: torch.Tensor) -> None:
        """Make ``s · q`` the layer's folded weight; checks that its integers come back as ``q``."""
        layer, qmodel = self.layer, self.qmodel
        _set_folded_weight(layer, self.s * q)
        w_after, b_after = layer.folded()
        got = quantize_weight(w_after, layer.weight_scale(w_after, b_after, qmodel.acts[
            qmodel.scale_source[self.node.inputs[0]]].scale), layer.w_bits)
        if not torch.equal(got.float(), q):
            raise AssertionError(f"{self.node.layer}: learned integer weights did not survive the write-back")


def _regulariser(roundings: Sequence[_SoftRounding], step: int, options: LearnedOptions) -> torch.Tensor | float:
    """AdaRound's ``λ Σ 1 − |2h(V) − 1|^β`` after the warm-up (``β`` falling linearly), 0 before."""
    warmup = int(options.warmup * options.iters)
    if step < warmup:
        return 0.0
    beta = options.beta[0] + (options.beta[1] - options.beta[0]) * (step - warmup) / max(options.iters - warmup, 1)
    return options.reg_weight * sum((1 - (2 * r.soft() - 1).abs().pow(beta)).sum() for r in roundings)


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
    rounding = _SoftRounding(qmodel, node)
    optimizer = torch.optim.Adam([rounding.v], lr=options.lr)
    for step in range(options.iters):
        inputs, reference = _window(x_q, x_fp, options, generator)
        with torch.no_grad():
            target = _layer_output(layer, node, reference, w_fp, b_fp)
        loss = ((rounding.output(inputs) - target) ** 2).flatten(1).sum(1).mean() + _regulariser([rounding], step, options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        target = _layer_output(layer, node, x_fp, w_fp, b_fp)
        errors = tuple(float(F.mse_loss(rounding.output(x_q, kind), target)) for kind in ("nearest", "learned"))
        kind = "learned" if errors[1] <= errors[0] else "nearest"  # the fit saw random windows: keep the better
        rounding.write(rounding.integers(kind))
    return errors[0], min(errors)


@torch.no_grad()
def gptq_rounding(qmodel: QuantModel, node: Node, x_q: torch.Tensor, x_fp: torch.Tensor,
                  float_layer: QuantConv2d | QuantLinear, damp: float = 0.01) -> tuple[float, float]:
    """Round one layer's weights with GPTQ (:mod:`hawqc.quant.gptq`) under the Gram matrix of its
    quantized input ``x_q``, and write them into the layer unless nearest rounding reconstructs the float
    layer's output on ``x_fp`` better. Returns the mean squared output error with nearest and with the
    rounding kept."""
    layer = qmodel.layer(node)
    rounding = _SoftRounding(qmodel, node)
    groups = layer.layer.groups if isinstance(layer, QuantConv2d) else 1
    learned = gptq_integers(layer.folded()[0], rounding.s, rounding.n, input_gram(layer, x_q), groups, damp)
    learned = torch.where(rounding.fixed, rounding.nearest, learned)
    target = _layer_output(float_layer, node, x_fp, *float_layer.folded())
    errors = [float(F.mse_loss(_layer_output(layer, node, x_q, rounding.s * q, rounding.bias), target))
              for q in (rounding.nearest, learned)]
    rounding.write(learned if errors[1] <= errors[0] else rounding.nearest)
    return errors[0], min(errors)


@contextmanager
def _block_weights(qmodel: QuantModel, roundings: Sequence[_SoftRounding], kind: list[str], block: Block,
                   drop: float, generator: torch.Generator) -> Iterator[None]:
    """While active, the fake-quantized forward runs the learned layers with ``kind[0]`` rounding, and
    (``drop`` > 0) leaves that share of the block's activation elements unquantized."""
    for r in roundings:
        r.layer.fake_forward = lambda x, input_scale, r=r: r.layer._op(x, r.s * r.integers(kind[0]), r.bias)
    quantizers = [qmodel.acts[n] for n in _block_nodes(qmodel, block) if n in qmodel.acts] if drop > 0 else []
    for quantizer in quantizers:
        quantizer.fake = lambda x, q=quantizer: _dropped(x, type(q).fake(q, x), drop, generator)
    try:
        yield
    finally:
        for module in [r.layer for r in roundings] + quantizers:
            del module.__dict__["fake_forward" if isinstance(module, (QuantConv2d, QuantLinear)) else "fake"]


def _block_nodes(qmodel: QuantModel, block: Block) -> list[str]:
    names = [n.name for n in qmodel.nodes]
    return names[names.index(block.after) + 1:names.index(block.last) + 1]


def _dropped(x: torch.Tensor, quantized: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """``quantized`` with a random ``drop`` share of its elements replaced by the unquantized ``x``."""
    return torch.where(torch.rand(x.shape, generator=generator) < drop, x, quantized)


def reconstruct_block(qmodel: QuantModel, block: Block, learned: Sequence[Node], x_q: torch.Tensor,
                      x_fp: torch.Tensor, options: LearnedOptions, generator: torch.Generator,
                      reference: QuantModel) -> tuple[float, float]:
    """Learn the rounding of the ``learned`` layers of ``block`` jointly (BRECQ): the fake-quantized
    block's output from its quantized input ``x_q`` against the float model ``reference``'s block output
    from the float input ``x_fp``; written into the layers. Returns the mean squared block output error
    with nearest and with learned rounding (nearest is kept where it is lower)."""
    x_q, x_fp = x_q.detach(), x_fp.detach()
    roundings = [_SoftRounding(qmodel, node) for node in learned]
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=options.lr)
    kind = ["soft"]
    with _block_weights(qmodel, roundings, kind, block, options.drop, generator):
        for step in range(options.iters):
            inputs, fp_inputs = _window(x_q, x_fp, options, generator)
            if options.drop > 0:
                inputs = _dropped(fp_inputs, inputs, options.drop, generator)
            with torch.no_grad():
                target = reference.segment_forward(fp_inputs, block.after, block.last, fake=False)
            y = qmodel.segment_forward(inputs, block.after, block.last, fake=True)
            loss = ((y - target) ** 2).flatten(1).sum(1).mean() + _regulariser(roundings, step, options)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    errors = []
    with torch.no_grad():
        for kind[0] in ("nearest", "learned"):
            with _block_weights(qmodel, roundings, kind, block, 0.0, generator):
                errors.append(sum(float(((qmodel.segment_forward(q, block.after, block.last, fake=True)
                                          - reference.segment_forward(f, block.after, block.last, fake=False)) ** 2)
                                         .sum()) for q, f in zip(x_q.split(8), x_fp.split(8))))
        best = "learned" if errors[1] <= errors[0] else "nearest"
        for r in roundings:
            r.write(r.integers(best))
    size = x_q.shape[0] * reference.segment_forward(x_fp[:1], block.after, block.last, fake=False).numel()
    return errors[0] / size, min(errors) / size


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
    w_q, b = _nearest_weights(qmodel, node)
    dims = [0, 2, 3] if x_q.dim() == 4 else [0]
    shift = (layer._op(x_q, w_q, b) - float_layer._op(x_fp, *float_layer.folded())).mean(dim=dims)
    _shift_bias(layer, shift)
    return shift


@torch.no_grad()
def correct_bias_expected(qmodel: QuantModel, node: Node, mean_q: torch.Tensor, mean_fp: torch.Tensor,
                          float_layer: QuantConv2d | QuantLinear) -> torch.Tensor:
    """Data-free bias correction (DFQ, Nagel et al., ICCV 2019): subtract from the layer's folded bias
    the shift ``W_q · E[x_q] − W · E[x]`` of its expected output, with ``W_q`` its weights as they will be
    rounded, ``W`` the float layer's (``float_layer``, before any fitting) and ``mean_q``, ``mean_fp`` the
    per-channel expectations of its quantized and float input (:func:`expected_inputs`); padding is
    ignored (an interior output). Returns the shift."""
    layer = qmodel.layer(node)
    w_q, _ = _nearest_weights(qmodel, node)
    shift = _mean_output(layer, w_q, mean_q) - _mean_output(layer, float_layer.folded()[0], mean_fp)
    _shift_bias(layer, shift)
    return shift


def _nearest_weights(qmodel: QuantModel, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's folded weights as they will be rounded (``s`` times their integers) and its folded bias."""
    layer = qmodel.layer(node)
    w, b = layer.folded()
    s = _scale(qmodel, node, w, b)
    n = weight_qmax(layer.w_bits)
    return torch.clamp(torch.round(w / s), -n, n) * s, b


def _mean_output(layer: QuantConv2d | QuantLinear, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``W · x`` (without bias) per output channel for an input constant per channel at ``mean``."""
    if w.dim() == 2:
        return w @ mean
    groups = layer.layer.groups
    taps = w.sum(dim=(2, 3)).reshape(groups, -1, w.shape[1])  # (groups, outputs per group, inputs per group)
    return (taps * mean.reshape(groups, 1, -1)).sum(dim=2).reshape(-1)


def _gaussian_clipped_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``E[clamp(Y, lo, hi)]`` for ``Y ~ N(mu, sigma²)`` (elementwise; ``hi`` may be infinite)."""
    normal = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    sigma = sigma.clamp_min(1e-12)
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf_a, pdf_b = (torch.exp(normal.log_prob(t)) for t in (a, b))
    upper = torch.where(torch.isinf(hi), torch.zeros_like(mu), hi * (1 - cdf_b))
    return lo * cdf_a + upper + mu * (cdf_b - cdf_a) + sigma * (pdf_a - pdf_b)


@torch.no_grad()
def expected_inputs(qmodel: QuantModel,
                    batches: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The per-channel expectation of every node's value on real data, quantized and float, as DFQ
    derives it from the BatchNorm statistics: a conv with BatchNorm folded in has the Gaussian
    pre-activation ``N(β, γ²)`` per channel (its BatchNorm's shift and scale), and through its (bounded)
    ReLU the mean of that Gaussian clipped to ``[0, bound]`` (quantized: also to the range of its
    activation quantizer); adds sum, global pools and flatten keep the means of their inputs; any other
    value (the model's input, layers without BatchNorm, ...) takes its per-channel mean over ``batches``
    in the float model, the same quantized and float."""
    totals: dict[str, torch.Tensor] = {}
    for x in batches:
        trace: dict[str, torch.Tensor] = {}
        qmodel._float_forward(x, fake=False, observe=False, trace=trace)
        for name, value in trace.items():
            mean = value.transpose(0, 1).flatten(1).mean(dim=1) if value.dim() > 1 else value
            totals[name] = totals.get(name, 0) + mean / len(batches)
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in qmodel.nodes:
        if node.kind == "output":
            continue
        layer = qmodel.layer(node) if node.kind in ("conv", "dense") else None
        if layer is not None and layer.bn is not None:
            mu, sigma = layer.bn.bias.detach(), layer.bn.weight.detach().abs()
            if not node.relu:
                means[node.name] = (mu, mu)
                continue
            top = torch.tensor(node.relu_max if node.relu_max is not None else float("inf"))
            quantizer = qmodel.acts[node.name] if node.name in qmodel.acts else None
            q_top = torch.minimum(top, quantizer.scale * quantizer.qrange[1]) if quantizer is not None else top
            zero = torch.zeros(())
            means[node.name] = (_gaussian_clipped_mean(mu, sigma, zero, q_top),
                                _gaussian_clipped_mean(mu, sigma, zero, top))
        elif node.kind == "add":
            a, b = (means[i] for i in node.inputs)
            means[node.name] = (a[0] + b[0], a[1] + b[1])
        elif node.kind in ("gap", "flatten"):
            means[node.name] = means[node.inputs[0]]
        else:
            means[node.name] = (totals[node.name], totals[node.name])
    return means


def _shift_bias(layer: QuantConv2d | QuantLinear, shift: torch.Tensor) -> None:
    """Subtract ``shift`` from the layer's folded bias (its BatchNorm's shift, or its own bias)."""
    factor = _fold_factor(layer)
    if factor is None:
        if layer.layer.bias is None:
            layer.layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.layer.bias.sub_(shift)
    else:
        layer.bn.bias.sub_(shift)
