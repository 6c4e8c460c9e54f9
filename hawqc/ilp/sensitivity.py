"""Second-order sensitivity of each quantizable layer (HAWQ-V3's Ω), for its weights and its input.

``Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖²``, where ``W_i`` is the layer's weight with its
BatchNorm folded in (as :mod:`hawqc.quant.modules` folds it), ``Q_b`` hawqc's per-channel symmetric
weight quantizer, ``n_i`` the number of weights and ``H_i`` the Hessian of the loss with respect to
the folded weight. The same term for the layer's input activation ``A_i`` (all calibration samples,
``Q_b`` the static per-tensor activation quantizer, ``H`` w.r.t. ``A_i``, as HAWQ-V2 does for
activations) is ``activation_omega``: the ILP adds it at the option's activation width, so a W4A4
option is charged for its 4-bit input as well as its 4-bit weights.

``Tr(H)`` comes from Hutchinson's estimator ``E[vᵀHv]`` with Rademacher ``v`` and Hessian-vector
products by double back-propagation; all layers share each ``v`` (the cross terms have zero mean),
weights and activations are probed apart (their mixed terms are large), and iterations stop when every
trace's standard error is at most ``tol`` times its magnitude, or after ``max_iters``. Away from a
minimum a trace can come out negative: Ω then counts it as 0 (the layer is not sensitive), the trace
itself is kept as estimated.

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

from hawqc import distributed
from hawqc.fileio import write_atomic

CACHE_VERSION = 2


@dataclass(frozen=True)
class Sensitivity:
    """Hessian traces, weight counts and Ω per layer and weight bit width; ``activation_omega`` is
    the same second-order term for each layer's input activation, per activation bit width."""

    traces: Mapping[str, float]
    params: Mapping[str, int]
    omega: Mapping[str, Mapping[int, float]]
    iterations: int
    settings: Mapping[str, Any] = field(default_factory=dict)
    activation_traces: Mapping[str, float] = field(default_factory=dict)
    activation_omega: Mapping[str, Mapping[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cache_version": CACHE_VERSION, "traces": dict(self.traces), "params": dict(self.params),
                "omega": _keyed_by_str(self.omega), "iterations": self.iterations, "settings": dict(self.settings),
                "activation_traces": dict(self.activation_traces),
                "activation_omega": _keyed_by_str(self.activation_omega)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        if data.get("cache_version") != CACHE_VERSION:
            raise ValueError(f"sensitivity file version {data.get('cache_version')!r} is not {CACHE_VERSION}")
        return cls(data["traces"], data["params"], _keyed_by_int(data["omega"]), data["iterations"],
                   data.get("settings", {}), data["activation_traces"], _keyed_by_int(data["activation_omega"]))

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
                   max_iters: int = 100, seed: int = 0, activations: bool = False,
                   ) -> tuple[dict[str, float], int] | tuple[dict[str, float], dict[str, float], int]:
    """Hutchinson estimates of ``Tr(H_i)`` w.r.t. each folded weight in ``fold``; returns them and the
    iteration count. ``batches`` are ``(inputs, labels)``; the loss is their summed mean cross-entropy.

    With ``activations``, also the traces w.r.t. each layer's input activation (all batches' elements),
    returned between the two. Iterations stop when every trace's standard error is at most ``tol`` times
    its magnitude (after at least 10 iterations) or after ``max_iters``.

    Under ``torchrun`` the ranks share out the probe vectors (each given the same model and batches) and
    sum their samples: the same traces and iteration count as one process with the same seed."""
    if max_iters < 1 or tol <= 0:
        raise ValueError(f"need max_iters >= 1 and tol > 0, got {max_iters} and {tol}")
    modules = dict(model.named_modules())
    names = list(fold)
    params = [modules[n].weight for n in names]
    saved = [p.requires_grad for p in params]
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(names) * (2 if activations else 1), dtype=torch.float64)
    squares = torch.zeros_like(totals)
    iters = 0
    handles = []
    try:
        for p in params:
            p.requires_grad_(True)
        grads = []
        for x, y in batches:
            shifts = _input_shifts(model, names, x) if activations else []
            handles = [modules[n].register_forward_pre_hook(lambda m, a, d=d: (a[0] + d,)) for n, d in zip(names, shifts)]
            loss = F.cross_entropy(model(x), y) / len(batches)
            for handle in handles:
                handle.remove()
            grads.append((shifts, torch.autograd.grad(loss, [*params, *shifts], create_graph=True)))
        world = distributed.setup()
        done = False
        while not done and iters < max_iters:  # a round: one probe per rank, in the order one process takes them
            count = min(world.size, max_iters - iters)
            samples = torch.zeros(world.size, len(totals), dtype=torch.float64)
            for j in range(count):  # every rank draws every probe: each sees the one-process random sequence
                vs = [torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1 for p in params]
                rs = [[torch.randint(0, 2, d.shape, generator=generator).float() * 2 - 1 for d in shifts]
                      for shifts, _ in grads]
                if j == world.rank:
                    samples[j] = _sample(grads, params, [v / fold[n][1] for v, n in zip(vs, names)], rs)
            for sample in world.sum(samples.to(world.device or samples.device)).cpu()[:count]:
                iters += 1
                totals += sample
                squares += sample**2
                mean = totals / iters
                if iters >= 10:
                    stderr = ((squares / iters - mean**2).clamp_min(0) / (iters - 1)).sqrt()
                    if bool((stderr <= tol * mean.abs()).all()):
                        done = True
                        break
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    traces = [float(t) / iters for t in totals]
    weights = dict(zip(names, traces))
    if not activations:
        return weights, iters
    return weights, dict(zip(names, traces[len(names):])), iters


def _sample(grads: Sequence[tuple[list[torch.Tensor], Sequence[torch.Tensor]]], params: Sequence[torch.Tensor],
            us: Sequence[torch.Tensor], rs: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """One Hutchinson sample: ``uᵀHu`` per weight, then ``rᵀHr`` per input activation (``rs`` per batch)."""
    n = len(params)
    sample = torch.zeros(n + (n if grads[0][0] else 0), dtype=torch.float64)
    for (shifts, g), r in zip(grads, rs):
        inputs = [*params, *shifts]
        sample[:n] += _quadratic_forms(g, inputs, [*us] + [torch.zeros_like(d) for d in shifts])[:n]
        if shifts:  # probed apart from the weights: the mixed weight-activation second derivatives are
            # large (they carry the loss gradient), and as cross terms they would swamp these estimates
            sample[n:] += _quadratic_forms(g, inputs, [torch.zeros_like(p) for p in params] + [*r])[n:]
    return sample


def _quadratic_forms(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                     probes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``probe_i · (H probe)_i`` for each input, ``H`` the Hessian whose first derivatives are ``grads``."""
    products = torch.autograd.grad(grads, inputs, grad_outputs=probes, retain_graph=True)
    return torch.tensor([float((v * hv).sum()) for v, hv in zip(probes, products)], dtype=torch.float64)


def _input_shifts(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """A zero tensor, requiring grad, shaped like each layer's input on ``x`` (added to it by a pre-hook)."""
    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, a[0].shape))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.zeros(shapes[n], requires_grad=True) for n in names]


def layer_inputs(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 ) -> dict[str, torch.Tensor]:
    """Each layer's input activations over ``batches``, flattened and concatenated."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().flatten()))
               for n in names]
    try:
        with torch.no_grad():
            for x, _ in batches:
                model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def activation_error(x: torch.Tensor, bits: int) -> float:
    """``‖Q_b(x) − x‖²`` with hawqc's static per-tensor activation quantizer calibrated on ``x``
    (non-negative 4-bit inputs unsigned, as :class:`~hawqc.quant.model.QuantModel` makes them)."""
    from hawqc.quant.quantizers import ActQuantizer

    quantizer = ActQuantizer(bits, signed=not (bits == 4 and bool((x >= 0).all())), relu=False)
    quantizer.observe(x)
    try:
        quantizer.freeze("input")
    except ValueError:  # an all-zero input quantizes without error
        return 0.0
    return float(((quantizer.fake(x) - x) ** 2).sum())


def sensitivity(model: nn.Module, data: Iterable[Any], *, bits: Sequence[int] = (4, 8), tol: float = 1e-2,
                max_iters: int = 100, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Sensitivity:
    """Ω of every quantizable layer's weight and input activation for each width in ``bits``, on ``data``
    (``(inputs, labels)`` batches; unlabelled input batches use the float model's own predictions as labels).

    Results are cached in ``cache_dir`` (default ``$HAWQC_CACHE`` or ``~/.cache/hawqc``) under a hash
    of the weights, the data and these settings; a second call with the same inputs reads the file."""
    batches = _labelled(model, data)
    settings = {"bits": sorted(set(bits)), "tol": tol, "max_iters": max_iters, "seed": seed}
    path = _cache_folder(cache_dir) / f"sensitivity-{_fingerprint(model, batches, settings)}.json"
    world = distributed.setup()
    if world.total(float(not path.is_file())) == 0:  # under torchrun: computed unless every rank has it
        return Sensitivity.load(path)
    fold = folded_weights(model)
    traces, act_traces, iters = hessian_traces(model, batches, fold, tol=tol, max_iters=max_iters, seed=seed,
                                               activations=True)
    params = {n: int(w.numel()) for n, (w, _) in fold.items()}
    omega = {n: {b: max(traces[n], 0.0) / params[n] * quantization_error(w, b) for b in settings["bits"]}
             for n, (w, _) in fold.items()}
    inputs = layer_inputs(model, list(fold), batches)
    act_omega = {n: {b: max(act_traces[n], 0.0) / x.numel() * activation_error(x, b) for b in settings["bits"]}
                 for n, x in inputs.items()}
    result = Sensitivity(traces, params, omega, iters, settings, act_traces, act_omega)
    if world.main:
        result.save(path)
    return result


def _keyed_by_str(omega: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
    return {k: {str(b): v for b, v in o.items()} for k, o in omega.items()}


def _keyed_by_int(omega: Mapping[str, Mapping[str, float]]) -> dict[str, dict[int, float]]:
    return {k: {int(b): v for b, v in o.items()} for k, o in omega.items()}


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
