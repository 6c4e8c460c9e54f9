"""Distilled data (ZeroQ, Cai et al., CVPR 2020): synthetic inputs for data-free calibration.

Inputs start as standard-normal noise and are optimised with Adam so that, at every BatchNorm layer,
the per-channel mean and standard deviation of the layer's input over the batch match the layer's
running statistics: the loss is ``Σ_bn ‖μ_batch − μ_bn‖₂ + ‖σ_batch − σ_bn‖₂``. The model stays in eval
mode and its weights are not touched. With ``jitter`` / ``flip`` (DeepInversion, Yin et al., CVPR 2020),
each step sees the batch shifted by a random offset of up to ``jitter`` pixels (circularly) and mirrored
with probability 1/2, so the inputs match the statistics under the augmentations real images tolerate
instead of over-fitting one pixel grid. Optional terms make the inputs more image-like (DeepInversion's
priors): ``tv_weight`` × the total variation of the batch (L2 norms of the differences between neighbouring
pixels, along each axis and diagonal), ``l2_weight`` × its L2 norm, ``first_bn_weight`` on the first BatchNorm
layer's term (the one nearest to the pixels); and ``class_weight`` × the cross-entropy of the model's
outputs towards a class drawn for each input (GDFQ / DeepInversion), so that the batch covers classes
the way real inputs do and the later layers see confident, class-like features. ``schedule`` ``"cosine"``
anneals the learning rate to zero over the steps instead of halving it on plateaus. Such inputs stand
in for real data wherever hawqc asks for data: activation ranges, Hessian traces, learned rounding,
distillation.

Results are cached (like :func:`hawqc.ilp.sensitivity.sensitivity`) under a hash of the weights and
the settings, in ``cache_dir`` (default ``$HAWQC_CACHE`` or ``~/.cache/hawqc``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawqc.fileio import atomic_output

CACHE_VERSION = 1


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss of ``x``: summed L2 distances between every BatchNorm input's batch mean and
    standard deviation per channel and the layer's running mean and standard deviation."""
    return _synthesis_terms(model, x)[0]


def _synthesis_terms(model: nn.Module, x: torch.Tensor, first_bn_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroQ's BatchNorm statistics loss of ``x`` (the first BatchNorm layer's term times
    ``first_bn_weight``) and the model's outputs on ``x``."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError("distilled data needs a model with BatchNorm layers (their statistics are the target)")
    terms: list[torch.Tensor] = []

    def record(bn: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        y = args[0]
        mean, std = y.mean(dim=(0, 2, 3)), (y.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt()
        term = (torch.linalg.vector_norm(mean - bn.running_mean)
                + torch.linalg.vector_norm(std - (bn.running_var + bn.eps).sqrt()))
        terms.append(term * first_bn_weight if not terms else term)

    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        out = model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(terms).sum(), out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's image prior: the sum of the L2 norms of the differences between each pixel and its
    right, lower and two diagonal neighbours, over the batch."""
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    return sum((torch.linalg.vector_norm(d) for d in diffs), torch.zeros(()))


def distill(model: nn.Module, input_shape: Sequence[int], *, samples: int = 32, batch_size: int = 32,
            steps: int = 200, lr: float = 0.5, seed: int = 0, input_range: tuple[float, float] | None = None,
            jitter: int = 0, flip: bool = False, tv_weight: float = 0.0, l2_weight: float = 0.0,
            first_bn_weight: float = 1.0, class_weight: float = 0.0, schedule: str = "plateau",
            cache_dir: str | os.PathLike[str] | None = None, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """``samples`` synthetic inputs of ``input_shape`` (no batch dim) whose BatchNorm input statistics
    match ``model``'s running statistics, optimised in batches of ``batch_size`` for ``steps`` Adam steps
    each (learning rate ``lr``, reduced on plateaus). ``input_range`` ``(lo, hi)``: the domain the model's
    preprocessing gives its inputs (e.g. ``(-1, 1)``), kept after every step; without it the inputs may
    spread wider than real ones, and the input's calibrated range with them. ``jitter``, ``flip``: the
    random shift (pixels) and mirroring of each step; ``tv_weight``, ``l2_weight``, ``first_bn_weight``,
    ``class_weight``, ``schedule``: the image priors, class targets and learning-rate schedule (module
    docstring). Deterministic for a ``seed``; cached."""
    if samples < 1 or batch_size < 1 or steps < 1 or not lr > 0 or jitter < 0:
        raise ValueError(f"distilled data needs samples, batch_size, steps >= 1, lr > 0 and jitter >= 0, got "
                         f"{samples}, {batch_size}, {steps}, {lr}, {jitter}")
    if min(tv_weight, l2_weight, first_bn_weight, class_weight) < 0 or schedule not in ("plateau", "cosine"):
        raise ValueError(f"distilled data needs weights >= 0 and schedule plateau or cosine, got tv {tv_weight}, "
                         f"l2 {l2_weight}, first BatchNorm {first_bn_weight}, class {class_weight}, {schedule!r}")
    shape = tuple(int(d) for d in input_shape)
    settings = {"shape": shape, "samples": samples, "batch_size": batch_size, "steps": steps, "lr": lr, "seed": seed,
                "input_range": list(input_range) if input_range is not None else None}
    if jitter or flip:  # absent by default: caches written before these options stay valid
        settings |= {"jitter": jitter, "flip": flip}
    extras = {"tv_weight": float(tv_weight), "l2_weight": float(l2_weight), "first_bn_weight": float(first_bn_weight),
              "class_weight": float(class_weight), "schedule": schedule}  # floats: 10 and 10.0 share a cache
    defaults = inspect.signature(distill).parameters  # absent at their defaults: older caches stay valid
    settings |= {k: v for k, v in extras.items() if v != defaults[k].default}
    path = _cache_folder(cache_dir) / f"distilled-{_fingerprint(model, settings)}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    saved = [p.requires_grad for p in model.parameters()]
    generator = torch.Generator().manual_seed(seed)
    batches = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for start in range(0, samples, batch_size):
            x = torch.randn(min(batch_size, samples - start), *shape, generator=generator)
            if input_range is not None:
                x.clamp_(*input_range)
            x.requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            scheduler: Any = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else
                              torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5,
                                                                         patience=max(steps // 10, 5), min_lr=1e-4))
            targets: torch.Tensor | None = None
            for step in range(steps):
                optimizer.zero_grad()
                bn_loss, out = _synthesis_terms(model, _augmented(x, jitter, flip, generator), first_bn_weight)
                loss = bn_loss + tv_weight * total_variation(x) + l2_weight * torch.linalg.vector_norm(x)
                if class_weight:
                    if targets is None:  # one class per input, drawn from the outputs' classes
                        targets = _class_targets(start, len(x), out.shape[1], seed)
                    loss = loss + class_weight * nn.functional.cross_entropy(out, targets)
                loss.backward()
                optimizer.step()
                if input_range is not None:
                    with torch.no_grad():
                        x.clamp_(*input_range)
                value = float(loss.detach())
                if schedule == "plateau":
                    scheduler.step(value)
                else:
                    scheduler.step()
                if log is not None and (step + 1) % max(steps // 5, 1) == 0:
                    log(f"distilling inputs {start}-{start + len(x) - 1}: step {step + 1}/{steps}, "
                        f"BatchNorm statistics loss {float(bn_loss.detach()):.4g}, total {value:.4g}")
            batches.append(x.detach())
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
    data = torch.cat(batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(data, tmp)
    return data


def _class_targets(start: int, count: int, classes: int, seed: int) -> torch.Tensor:
    """The target classes of inputs ``start`` .. ``start + count - 1``: a seeded permutation of the
    ``classes`` (repeated when there are more inputs than classes), so a batch covers distinct classes."""
    order = torch.randperm(classes, generator=torch.Generator().manual_seed(seed))
    return order[torch.arange(start, start + count) % classes]


def _augmented(x: torch.Tensor, jitter: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """``x`` rolled by a random offset of up to ``jitter`` pixels on each spatial axis, mirrored with
    probability 1/2 if ``flip`` (one draw for the batch)."""
    if jitter:
        dy, dx = (int(d) for d in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        x = torch.flip(x, dims=(-1,))
    return x


def _fingerprint(model: nn.Module, settings: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("HAWQC_CACHE", Path.home() / ".cache" / "hawqc"))
