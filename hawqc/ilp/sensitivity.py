"""Second-order sensitivity of each quantizable layer (HAWQ-V3's Ω).

``Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖²``, where ``W_i`` is the layer's weight with its
BatchNorm folded in (as :mod:`hawqc.quant.modules` folds it), ``Q_b`` hawqc's per-channel symmetric
weight quantizer, ``n_i`` the number of weights and ``H_i`` the Hessian of the loss with respect to
the folded weight. ``Tr(H_i)`` comes from Hutchinson's estimator ``E[vᵀHv]`` with Rademacher ``v``
and Hessian-vector products by double back-propagation; all layers share each ``v`` (the cross
terms have zero mean), and iterations stop when every layer's running mean moves by less than
``tol`` (relative) or after ``max_iters``. Away from a minimum a trace can come out negative: Ω
then counts it as 0 (the layer is not sensitive), the trace itself is kept as estimated.

The Hessian is taken through the float model with BatchNorm in eval mode. For a folded weight
``W_f = d ⊙ W`` (``d`` the per-channel fold factor), ``vᵀH_f v = uᵀH_W u`` with ``u = v / d``, so
the products run on the model's own weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hawqc.fileio import write_atomic

CACHE_VERSION = 1


@dataclass(frozen=True)
class Sensitivity:
    """Hessian traces, weight counts and Ω per layer and weight bit width."""

    traces: Mapping[str, float]
    params: Mapping[str, int]
    omega: Mapping[str, Mapping[int, float]]
    iterations: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cache_version": CACHE_VERSION, "traces": dict(self.traces), "params": dict(self.params),
                "omega": {k: {str(b): v for b, v in o.items()} for k, o in self.omega.items()},
                "iterations": self.iterations, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        if data.get("cache_version") != CACHE_VERSION:
            raise ValueError(f"sensitivity file version {data.get('cache_version')!r} is not {CACHE_VERSION}")
        return cls(data["traces"], data["params"], {k: {int(b): v for b, v in o.items()} for k, o in data["omega"].items()},
                   data["iterations"], data.get("settings", {}))

    def save(self, path: str | os.PathLike[str]) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sensitivity:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: not a sensitivity file ({err})") from None


def folded_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantizable layer: the BatchNorm-folded weight and the per-channel fold factor ``d``
    (broadcast to the weight's shape), folded by :class:`~hawqc.quant.modules.QuantConv2d` itself."""
    from hawqc.quant.capture import capture
    from hawqc.quant.modules import QuantConv2d

    modules = dict(model.named_modules())
    result = {}
    with torch.no_grad():
        for node in capture(model.eval()):
            if node.kind == "dense":
                w = modules[node.layer].weight.detach().clone()
                result[node.layer] = (w, torch.ones_like(w))
            elif node.kind == "conv":
                probe = QuantConv2d(modules[node.layer], modules.get(node.bn), 8)
                w = probe.folded()[0].clone()
                probe.layer.weight.fill_(1.0)
                result[node.layer] = (w, probe.folded()[0].clone())
    return result


def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """``‖Q_b(W) − W‖²`` with hawqc's per-channel symmetric weight quantizer."""
    from hawqc.quant.quantizers import quantize_weight, weight_scale

    scale = weight_scale(weight, bits)
    q = quantize_weight(weight, scale, bits).float() * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    return float(((q - weight) ** 2).sum())


def hessian_traces(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   fold: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, tol: float = 1e-2,
                   max_iters: int = 100, seed: int = 0) -> tuple[dict[str, float], int]:
    """Hutchinson estimates of ``Tr(H_i)`` w.r.t. each folded weight in ``fold``; returns them and the
    iteration count. ``batches`` are ``(inputs, labels)``; the loss is their summed mean cross-entropy."""
    if max_iters < 1 or tol <= 0:
        raise ValueError(f"need max_iters >= 1 and tol > 0, got {max_iters} and {tol}")
    modules = dict(model.named_modules())
    names = list(fold)
    params = [modules[n].weight for n in names]
    saved = [p.requires_grad for p in params]
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(names), dtype=torch.float64)
    previous: torch.Tensor | None = None
    iters = 0
    try:
        for p in params:
            p.requires_grad_(True)
        grads = []
        for x, y in batches:
            loss = F.cross_entropy(model(x), y) / len(batches)
            grads.append(torch.autograd.grad(loss, params, create_graph=True))
        for iters in range(1, max_iters + 1):
            vs = [torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1 for p in params]
            us = [v / fold[n][1] for v, n in zip(vs, names)]
            hus = [torch.zeros_like(p) for p in params]
            for g in grads:
                for acc, hu in zip(hus, torch.autograd.grad(g, params, grad_outputs=us, retain_graph=True)):
                    acc += hu
            totals += torch.tensor([float((u * hu).sum()) for u, hu in zip(us, hus)], dtype=torch.float64)
            mean = totals / iters
            if previous is not None and bool(((mean - previous).abs() <= tol * (previous.abs() + 1e-12)).all()):
                break
            previous = mean
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return {n: float(t) / iters for n, t in zip(names, totals)}, iters


def sensitivity(model: nn.Module, data: Iterable[Any], *, bits: Sequence[int] = (4, 8), tol: float = 1e-2,
                max_iters: int = 100, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Sensitivity:
    """Ω of every quantizable layer for each weight width in ``bits``, on ``data`` (``(inputs, labels)``
    batches; unlabelled input batches use the float model's own predictions as labels).

    Results are cached in ``cache_dir`` (default ``$HAWQC_CACHE`` or ``~/.cache/hawqc``) under a hash
    of the weights, the data and these settings; a second call with the same inputs reads the file."""
    batches = _labelled(model, data)
    settings = {"bits": sorted(set(bits)), "tol": tol, "max_iters": max_iters, "seed": seed}
    path = _cache_folder(cache_dir) / f"sensitivity-{_fingerprint(model, batches, settings)}.json"
    if path.is_file():
        return Sensitivity.load(path)
    fold = folded_weights(model)
    traces, iters = hessian_traces(model, batches, fold, tol=tol, max_iters=max_iters, seed=seed)
    params = {n: int(w.numel()) for n, (w, _) in fold.items()}
    omega = {n: {b: max(traces[n], 0.0) / params[n] * quantization_error(w, b) for b in settings["bits"]}
             for n, (w, _) in fold.items()}
    result = Sensitivity(traces, params, omega, iters, settings)
    result.save(path)
    return result


def _labelled(model: nn.Module, data: Iterable[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for batch in data:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            with torch.no_grad():
                y = model.eval()(x).argmax(dim=1)
        batches.append((x.float(), y.long()))
    if not batches:
        raise ValueError("sensitivity needs at least one batch of data")
    return batches


def _fingerprint(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for x, y in batches:
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("HAWQC_CACHE", Path.home() / ".cache" / "hawqc"))
