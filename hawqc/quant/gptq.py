"""Weight rounding by second-order error compensation (GPTQ, Frantar et al., ICLR 2023; OBQ, NeurIPS 2022).

A layer's weights are rounded one input column at a time, on the per-channel grid the layer already has
(``s · clamp(round(w / s), -qmax, qmax)``); after each column the rounding error is spread over the
columns not yet rounded so as to minimise ``‖(W − Q) X‖²`` over the layer's calibration inputs ``X``:
with ``H = X Xᵀ`` (plus a small damping) and ``U`` the upper Cholesky factor of ``H⁻¹``, column ``i``'s
error ``e = (w_i − q_i) / U_ii`` updates ``W[:, i+1:] −= e U[i, i+1:]``. Closed form, one pass, no
learning rate or step count: seconds per layer on a CPU where a gradient fit (AdaRound) takes minutes.

Convolutions are seen as matrix products over their input patches: a grouped (e.g. depthwise) conv
has one ``H`` per group, over that group's patch dimension, and its groups are rounded together. As in
:class:`hawqc.quant.adaround._SoftRounding`, the weight of largest magnitude in each channel keeps its
nearest rounding (±qmax), so the per-channel scale is unchanged and the result is an ordinary set of
integers on the layer's own grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawqc.quant.modules import QuantConv2d, QuantLinear


def input_gram(layer: QuantConv2d | QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``H = X Xᵀ / n`` per group: ``(groups, d, d)`` with ``d`` the group's patch size (input features
    of a dense layer), over every patch of the calibration input ``x`` (``n`` patches)."""
    if isinstance(layer, QuantLinear):
        rows = x.reshape(-1, x.shape[-1]).double()
        return (rows.T @ rows / len(rows)).unsqueeze(0)
    conv = layer.layer
    top, left, bottom, right = layer.padding
    x = F.pad(x, (left, right, top, bottom))
    groups = conv.groups
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, C·k², L)
    d = patches.shape[1] // groups
    gram = torch.zeros(groups, d, d, dtype=torch.float64)
    for sample in patches:  # one image at a time: (groups, d, L)
        g = sample.reshape(groups, d, -1).double()
        gram += g @ g.transpose(1, 2)
    return gram / (patches.shape[0] * patches.shape[2])


@torch.no_grad()
def gptq_integers(w: torch.Tensor, scale: torch.Tensor, qmax: int, gram: torch.Tensor, groups: int,
                  damp: float = 0.01) -> torch.Tensor:
    """Integer weights (as floats) for the folded weight ``w`` (out channels first) on the per-channel
    grid ``scale`` (broadcastable to ``w``), rounded column by column with GPTQ's error compensation
    under the per-group input Gram matrices ``gram`` (:func:`input_gram`); ``damp``: the share of the
    mean diagonal added to it. Each channel's largest-magnitude weight keeps its nearest rounding."""
    out = w.shape[0]
    per_group = out // groups
    d = gram.shape[-1]
    # (groups, rows of the group, d): channel o of group g is row o - g·per_group
    work = w.reshape(groups, per_group, d).double().clone()
    s = scale.reshape(groups, per_group, 1).double()
    nearest = torch.clamp(torch.round(work / s), -qmax, qmax)
    peak = work.abs().argmax(dim=2, keepdim=True)
    fixed = torch.zeros_like(work, dtype=torch.bool).scatter_(2, peak, True)
    h = gram.clone()
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0
    torch.diagonal(h, dim1=1, dim2=2).add_(damp * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1, keepdim=True)
                                           + dead.double())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (groups, d, d)
    q = torch.empty_like(work)
    for i in range(d):
        column = work[:, :, i]
        qi = torch.where(fixed[:, :, i], nearest[:, :, i], torch.clamp(torch.round(column / s[:, :, 0]), -qmax, qmax))
        q[:, :, i] = qi
        error = (column - qi * s[:, :, 0]) / u[:, i, i].unsqueeze(1)  # (groups, rows)
        work[:, :, i + 1:] -= error.unsqueeze(2) * u[:, i, i + 1:].unsqueeze(1)
    return q.reshape(w.shape).to(w.dtype)
