"""``QuantConv2d`` (BatchNorm folded) and ``QuantLinear``: per-channel weights, int32 bias.

Three ways to run one layer:

- ``float_forward``: the folded float layer (calibration);
- ``fake_forward``: QAT. Folded weights and the bias are fake-quantized (straight-through). While
  training with BatchNorm not yet frozen, the fold uses the batch statistics (and updates the
  running ones), as in HAWQ-V3's recipe; after ``freeze_bn`` it uses the running statistics. Under
  data-parallel QAT (``world`` set to more than one rank) the batch statistics are those of the
  global batch, all ranks' shards together (SyncBatchNorm's rule, differentiable), so every rank
  folds the same weights and updates the same running statistics as one process would;
- ``integer_params``: the integer weights, int32 bias (scale ``S_in * S_w``, formed in float32)
  and scales that the integer graph runs with.

A channel whose weights are (nearly) zero but whose folded bias is not (dead channels of pretrained
nets) would get a weight scale so small that its bias overflows int32: its scale is raised until the
bias fits in 2^30 (TFLite's rule), leaving the weights at 0 and the bias exact.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawqc.distributed import World
from hawqc.quant.quantizers import fake_quant, quantize_weight, weight_qmax, weight_scale

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
BIAS_LIMIT = 2**30
"""The largest integer bias a weight scale is chosen to allow (half the int32 range: room for the sum)."""


class _QuantLayer(nn.Module):
    def __init__(self, layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, w_bits: int,
                 weight_percentile: float | None) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.bn = copy.deepcopy(bn)
        self.w_bits = w_bits
        self.weight_percentile = weight_percentile
        self.freeze_bn = False
        self.world = World()

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _channel_shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (w.dim() - 1)

    def folded(self, batch_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded (weight, bias); with ``batch_input``, BatchNorm uses (and updates) batch statistics."""
        w = self.layer.weight
        b = self.layer.bias if self.layer.bias is not None else w.new_zeros(w.shape[0])
        if self.bn is None:
            return w, b
        if batch_input is not None:
            y = self._op(batch_input, w, b)
            mean, var, n = _channel_moments(y, self.world)
            with torch.no_grad():
                m = self.bn.momentum if self.bn.momentum is not None else 0.1
                self.bn.running_mean.mul_(1 - m).add_(m * mean)
                self.bn.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
                self.bn.num_batches_tracked += 1
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        inv_std = self.bn.weight / torch.sqrt(var + self.bn.eps)
        return w * inv_std.reshape(self._channel_shape(w)), self.bn.bias + (b - mean) * inv_std

    def weight_scale(self, w: torch.Tensor, b: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        """Per-channel float32 weight scale: the quantizer's, raised so that ``|b| / (S_in * S_w)`` stays
        within :data:`BIAS_LIMIT`."""
        s_w = weight_scale(w, self.w_bits, self.weight_percentile)
        floor = b.detach().abs().to(torch.float32) / (input_scale.to(torch.float32) * BIAS_LIMIT)
        return torch.maximum(s_w, floor)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, *self.folded())

    def fake_forward(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training and self.bn is not None and not self.freeze_bn
        w, b = self.folded(x if use_batch_stats else None)
        s_w = self.weight_scale(w, b, input_scale)
        n = weight_qmax(self.w_bits)
        w_q = fake_quant(w, s_w.reshape(self._channel_shape(w)), -n, n)
        b_q = fake_quant(b, input_scale.to(torch.float32) * s_w, INT32_MIN, INT32_MAX)
        return self._op(x, w_q, b_q)

    @torch.no_grad()
    def integer_params(self, input_scale: np.float32) -> dict[str, np.ndarray]:
        """``weight`` (int8 storage), ``bias`` (int32), ``w_scale`` and ``acc_scale`` (float32, per channel)."""
        w, b = self.folded()
        s_w = self.weight_scale(w, b, torch.tensor(input_scale, dtype=torch.float32))
        acc_scale = np.float32(input_scale) * s_w.numpy()  # float32 product, as the deployed graph forms it
        bias = np.clip(np.rint(b.double().numpy() / acc_scale.astype(np.float64)), INT32_MIN, INT32_MAX)
        return {"weight": quantize_weight(w, s_w, self.w_bits).numpy(), "bias": bias.astype(np.int32),
                "w_scale": s_w.numpy(), "acc_scale": acc_scale}


def _channel_moments(y: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and (biased) variance of an NCHW batch over all ranks, and the sample count."""
    n = y.numel() / y.shape[1]
    if world.size == 1:
        return y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False), n
    n = world.total(n)
    mean = world.sum(y.sum(dim=(0, 2, 3))) / n
    var = world.sum(((y - mean.reshape(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))) / n
    return mean, var, n


class QuantConv2d(_QuantLayer):
    """A Conv2d with its BatchNorm folded in, quantized per output channel. ``padding`` ([top, left,
    bottom, right], zeros) replaces the conv's own, e.g. to take in a ZeroPad2d before it."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, w_bits: int,
                 weight_percentile: float | None = None, padding: list[int] | None = None) -> None:
        super().__init__(conv, bn, w_bits, weight_percentile)
        ph, pw = conv.padding
        self.padding = list(padding) if padding is not None else [ph, pw, ph, pw]

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = self.layer
        top, left, bottom, right = self.padding
        if (top, left) != (bottom, right):
            x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
        return F.conv2d(x, w, b, c.stride, (top, left), c.dilation, c.groups)


class QuantLinear(_QuantLayer):
    """A Linear layer quantized per output channel."""

    def __init__(self, linear: nn.Linear, w_bits: int, weight_percentile: float | None = None) -> None:
        super().__init__(linear, None, w_bits, weight_percentile)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)
