"""Measured sensitivity (ZeroQ's, Cai et al., CVPR 2020): the KL divergence one layer's quantization adds.

``Ω_i(b) = KL(f(x) ‖ f̃_{i,b}(x)) − KL(f(x) ‖ f̃(x))``, clipped at 0, where ``f`` is the float model,
``f̃`` the model quantized to W8A8 (calibrated on the same data, nearest rounding) and ``f̃_{i,b}`` the
same with layer ``i``'s weights at ``b`` bits; the activation term is the same with layer ``i``'s input
at ``b`` bits (the model re-calibrated with that layer at ``W8A<b>``). Both are measured on ``data`` (e.g.
distilled inputs): the 8-bit terms are 0 by construction, so the ILP charges each option the output
divergence it was seen to add, with no Hessian and no Hutchinson noise. The cost is one forward pass
over ``data`` per layer and width (plus a calibration per layer for activation widths below 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hawqc.bitconfig import BitConfig, LayerBits
from hawqc.ilp.sensitivity import Sensitivity, folded_weights

EIGHT = LayerBits(8, 8)


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(softmax(reference) ‖ softmax(logits)) over the batch."""
    return float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), log_target=True,
                          reduction="batchmean"))


def measured_sensitivity(model: nn.Module, data: Iterable[Any], *, bits: Sequence[int] = (4, 8),
                         activation_bits: Sequence[int] | None = None) -> Sensitivity:
    """Ω of every quantizable layer's weights (per width in ``bits``) and input (per width in
    ``activation_bits``, default ``bits``), measured as the KL divergence from the float model's outputs
    on ``data`` (input batches) that quantizing that layer alone adds to W8A8; see the module docstring."""
    from hawqc.quant.model import _as_input, quantize

    batches = [_as_input(b) for b in data]
    if not batches:
        raise ValueError("measured sensitivity needs at least one batch of data")
    act_bits = sorted(set(activation_bits if activation_bits is not None else bits))
    model.eval()
    with torch.no_grad():
        references = [model(x) for x in batches]
    samples = sum(len(x) for x in batches)
    params = {n: int(w.numel()) for n, (w, _) in folded_weights(model).items()}

    def divergence(qmodel: nn.Module) -> float:
        qmodel.mode = "fake"
        with torch.no_grad():
            return sum(kl_divergence(r, qmodel(x)) * len(x) for x, r in zip(batches, references)) / samples

    base_model = quantize(model, BitConfig(default=EIGHT), batches)
    base = divergence(base_model)
    layers = {n: base_model.layer(node) for node in base_model.nodes if (n := node.layer) in params}
    omega: dict[str, dict[int, float]] = {}
    for name, layer in layers.items():  # weight width changes nothing in calibration: one model serves all
        omega[name] = {}
        for b in sorted(set(bits)):
            layer.w_bits = b
            omega[name][b] = max(divergence(base_model) - base, 0.0)
            layer.w_bits = 8
    act_omega = {name: {b: 0.0 if b >= 8 else max(divergence(quantize(
        model, BitConfig(layers={name: LayerBits(8, b)}, default=EIGHT), batches)) - base, 0.0) for b in act_bits}
        for name in layers}
    settings = {"method": "measured-kl", "bits": sorted(set(bits)), "activation_bits": act_bits, "samples": samples}
    return Sensitivity({}, params, omega, 0, settings, {}, act_omega)
