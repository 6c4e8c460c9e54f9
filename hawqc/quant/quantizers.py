"""HAWQ-V3 quantizers: symmetric per-channel weights, static per-tensor activation ranges.

Weights: ``scale = max|w| / (2^(b-1) - 1)`` per output channel (or a percentile of |w|), integers
in [-(2^(b-1) - 1), 2^(b-1) - 1]. Activations: a static range observed on calibration data (min/max,
EMA of batch min/max, or a percentile; under data-parallel calibration each batch's range is taken
over all ranks' shards: min of minima and max of maxima, the mean of the percentiles); signed symmetric ``[-2^(b-1), 2^(b-1) - 1]`` with
``scale = max|x| / (2^(b-1) - 1)``, except 4-bit activations that follow a ReLU, which are unsigned
[0, 15] with ``scale = max x / 15``. No zero points anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from hawqc.distributed import World

OBSERVERS = ("minmax", "ema", "percentile")
_MAX_PERCENTILE_SAMPLES = 1 << 20


def activation_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of an activation: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale)) * scale`` forward, identity gradient (straight-through estimator)."""
    q = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    return x + (q - x).detach()


def weight_scale(w: torch.Tensor, bits: int, percentile: float | None = None) -> torch.Tensor:
    """Per-output-channel float32 scale of a weight tensor (output channels on axis 0)."""
    flat = w.detach().abs().reshape(w.shape[0], -1).float()
    amax = flat.amax(dim=1) if percentile is None else torch.quantile(flat, percentile / 100.0, dim=1)
    return (amax.clamp_min(1e-8) / weight_qmax(bits)).to(torch.float32)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights (int8 storage) for a per-channel ``scale``."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    n = weight_qmax(bits)
    return torch.clamp(torch.round(w.detach() / scale.reshape(shape)), -n, n).to(torch.int8)


class ActQuantizer(nn.Module):
    """Static per-tensor activation quantizer with a calibration observer.

    ``relu`` narrows the range to non-negative integers (a fused ReLU); ``signed=False`` makes a
    4-bit post-ReLU activation unsigned. ``observe`` accumulates the range, ``freeze`` turns it into
    the scale.
    """

    def __init__(self, bits: int, signed: bool, relu: bool, observer: str = "minmax",
                 momentum: float = 0.9, percentile: float = 99.99) -> None:
        super().__init__()
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.bits, self.signed, self.relu = bits, signed, relu
        self.observer, self.momentum, self.percentile = observer, momentum, percentile
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))

    @property
    def qrange(self) -> tuple[int, int]:
        qmin, qmax = activation_range(self.bits, self.signed)
        return (max(qmin, 0), qmax) if self.relu else (qmin, qmax)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, world: World | None = None) -> None:
        """Accumulate the range of batch ``x``; with ``world``, of the batch all its ranks observe
        together (a collective: every rank calls it). Min/max and EMA ranges are then those of one
        process on the combined batch; percentile bounds are the mean of the ranks' (exact when the
        ranks observe the same batch)."""
        x = x.detach().float()
        if self.observer == "percentile":
            flat = x.reshape(-1)
            if flat.numel() > _MAX_PERCENTILE_SAMPLES:
                flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:_MAX_PERCENTILE_SAMPLES]]
            q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100.0, self.percentile / 100.0]))
            lo, hi = q[0], q[1]
        else:
            lo, hi = x.min(), x.max()
        if world is not None and world.size > 1:
            if self.observer == "percentile":
                lo, hi = world.sum(torch.stack([lo, hi])) / world.size
            else:
                neg_lo, hi = world.reduce(torch.stack([-lo, hi]), "max")
                lo = -neg_lo
        n = int(self.batches)
        if n == 0:
            self.lo.copy_(lo), self.hi.copy_(hi)
        elif self.observer == "minmax":
            self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
        elif self.observer == "ema":
            m = self.momentum
            self.lo.copy_(m * self.lo + (1 - m) * lo), self.hi.copy_(m * self.hi + (1 - m) * hi)
        else:  # percentile: mean over batches
            self.lo.copy_((self.lo * n + lo) / (n + 1)), self.hi.copy_((self.hi * n + hi) / (n + 1))
        self.batches += 1

    @torch.no_grad()
    def freeze(self, name: str) -> None:
        """Set the scale from the observed range; ``ValueError`` for an unseen or zero range."""
        if int(self.batches) == 0:
            raise ValueError(f"activation {name!r} saw no calibration data")
        amax = float(torch.maximum(self.lo.abs(), self.hi.abs())) if self.signed else float(self.hi)
        if not amax > 0.0 or amax == float("inf"):
            raise ValueError(f"activation {name!r} has a zero range after calibration (all values 0): "
                             "calibrate with real inputs")
        self.scale.fill_(amax / activation_range(self.bits, self.signed)[1])

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        return fake_quant(x, self.scale, qmin, qmax)

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        return f"{kind}{self.bits}{', relu' if self.relu else ''}, observer={self.observer}, scale={float(self.scale):.6g}"
