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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


MICRO_BATCH_ELEMENTS = 2**19
"""Default micro-batch: this many input elements (e.g. 3 images of 3x224x224, 668 of 1x28x28)."""
BLOCK = 4
"""Hutchinson iterations run on one micro-batch's graph before the next micro-batch is built."""

Progress = Callable[[int, int, "torch.Tensor", "torch.Tensor"], None]
"""``progress(iteration, max_iters, running trace estimates, their standard errors)``."""


def hessian_traces(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   fold: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, tol: float = 1e-2,
                   max_iters: int = 100, seed: int = 0, activations: bool = False, micro_batch: int | None = None,
                   progress: Progress | None = None,
                   ) -> tuple[dict[str, float], int] | tuple[dict[str, float], dict[str, float], int]:
    """Hutchinson estimates of ``Tr(H_i)`` w.r.t. each folded weight in ``fold``; returns them and the
    iteration count. ``batches`` are ``(inputs, labels)``; the loss is their summed mean cross-entropy.

    With ``activations``, also the traces w.r.t. each layer's input activation (all batches' elements),
    returned between the two. Iterations stop when every trace's standard error is at most ``tol`` times
    its magnitude (after at least 10 iterations) or after ``max_iters``.

    Hessian-vector products run on micro-batches of at most ``micro_batch`` samples (default: about
    :data:`MICRO_BATCH_ELEMENTS` input elements) and are summed, so memory is bounded by one micro-batch's
    double-backward graph whatever the batch size. With one micro-batch its graph serves every iteration;
    with more, each is rebuilt for every :data:`BLOCK` iterations. A weight probe depends only on ``seed`` and
    the iteration, so the weight traces do not depend on ``micro_batch``.

    Under ``torchrun`` the ranks (each given the same model and batches) share out the iterations and sum
    their samples: the same traces and iteration count as one process with the same seed."""
    if max_iters < 1 or tol <= 0:
        raise ValueError(f"need max_iters >= 1 and tol > 0, got {max_iters} and {tol}")
    modules = dict(model.named_modules())
    names = list(fold)
    params = [modules[n].weight for n in names]
    saved = [p.requires_grad for p in params]
    model.eval()
    chunks = _micro_batches(batches, micro_batch)
    totals = torch.zeros(len(names) * (2 if activations else 1), dtype=torch.float64)
    squares = torch.zeros_like(totals)
    iters = 0
    try:
        for p in params:
            p.requires_grad_(True)
        kept = _probe_graph(model, names, params, chunks[0], activations) if len(chunks) == 1 else None
        world = distributed.setup()
        done = False
        while not done and iters < max_iters:
            block = range(iters + 1, min(iters + (1 if kept else BLOCK) * world.size, max_iters) + 1)
            mine = [(row, k) for row, k in enumerate(block) if row % world.size == world.rank]
            samples = torch.zeros(len(block), len(totals), dtype=torch.float64)
            for c, chunk in enumerate(chunks if mine else []):
                graph = kept or _probe_graph(model, names, params, chunk, activations)
                for row, k in mine:
                    samples[row] += _sample(graph, params, [fold[n][1] for n in names], seed, k, c)
                del graph
            for sample in world.sum(samples):
                iters += 1
                totals += sample
                squares += sample**2
                mean = totals / iters
                stderr = ((squares / iters - mean**2).clamp_min(0) / max(iters - 1, 1)).sqrt()
                if iters >= 10 and bool((stderr <= tol * mean.abs()).all()):
                    done = True
                    break
            if progress is not None:  # once per block: its iterations finish together
                progress(iters, max_iters, mean, stderr)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    traces = [float(t) / iters for t in totals]
    weights = dict(zip(names, traces))
    if not activations:
        return weights, iters
    return weights, dict(zip(names, traces[len(names):])), iters


def _micro_batches(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int | None,
                   ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(inputs, labels, loss weight)`` slices of at most ``size`` samples; a slice's summed cross-entropy
    times its weight adds up to the batches' summed mean cross-entropy divided by their count."""
    if size is None:
        size = max(1, MICRO_BATCH_ELEMENTS // max(1, batches[0][0][0].numel()))
    if size < 1:
        raise ValueError(f"micro-batch size must be at least 1, got {size}")
    return [(x[i:i + size], y[i:i + size], 1.0 / (len(x) * len(batches)))
            for x, y in batches for i in range(0, len(x), size)]


def _probe_graph(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                 chunk: tuple[torch.Tensor, torch.Tensor, float], activations: bool,
                 ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The first derivatives of one micro-batch's loss w.r.t. the weights (and each layer's input, through a
    zero shift added by a pre-hook), with their graph kept for Hessian-vector products."""
    modules = dict(model.named_modules())
    shifts: list[torch.Tensor] = []

    def shift(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        shifts.append(torch.zeros_like(args[0], requires_grad=True))
        return (args[0] + shifts[-1], *args[1:])

    handles = [modules[n].register_forward_pre_hook(shift) for n in names] if activations else []
    try:
        x, y, weight = chunk
        loss = F.cross_entropy(model(x), y, reduction="sum") * weight
    finally:
        for handle in handles:
            handle.remove()
    if activations and len(shifts) != len(names):
        raise ValueError("a quantizable layer is called more than once per forward: activation traces need one call")
    return shifts, torch.autograd.grad(loss, [*params, *shifts], create_graph=True)


def _sample(graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]], params: Sequence[torch.Tensor],
            factors: Sequence[torch.Tensor], seed: int, iteration: int, chunk: int) -> torch.Tensor:
    """One micro-batch's ``vᵀHv`` per weight (and per activation), for the probes of ``iteration``."""
    shifts, grads = graph
    n = len(params)
    weights = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    us = [_rademacher(p.shape, weights) / d for p, d in zip(params, factors)]
    sample = torch.zeros(n + len(shifts), dtype=torch.float64)
    sample[:n] = _quadratic_forms(grads[:n], params, us)
    if shifts:  # probed apart from the weights: the mixed weight-activation second derivatives are
        # large (they carry the loss gradient), and as cross terms they would swamp these estimates
        acts = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 65_537 + chunk + 1)
        sample[n:] = _quadratic_forms(grads[n:], shifts, [_rademacher(d.shape, acts) for d in shifts])
    return sample


def _rademacher(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def _quadratic_forms(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                     probes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``probe_i · (H probe)_i`` for each input, ``H`` the Hessian block of ``inputs`` whose first derivatives
    are ``grads`` (one per input; the other inputs' probes are zero, so their products are not computed)."""
    products = torch.autograd.grad(grads, inputs, grad_outputs=probes, retain_graph=True)
    return torch.tensor([float((v * hv).sum()) for v, hv in zip(probes, products)], dtype=torch.float64)


def activation_errors(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      bits: Sequence[int], micro_batch: int | None = None,
                      ) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """``‖Q_b(A) − A‖²`` of each layer's input ``A`` over all batches, with hawqc's static per-tensor activation
    quantizer calibrated on ``A`` (non-negative 4-bit inputs unsigned, as
    :class:`~hawqc.quant.model.QuantModel` makes them; an all-zero input has no error), and the element
    counts. Two forward passes over micro-batches (the range, then the error) hold no more than one
    micro-batch's activations."""
    from hawqc.quant.quantizers import ActQuantizer

    quantizers = {n: {b: ActQuantizer(b, signed=True, relu=False) for b in bits} for n in names}
    def observe(name: str, a: torch.Tensor) -> None:
        for quantizer in quantizers[name].values():
            quantizer.observe(a)

    _each_layer_input(model, names, batches, micro_batch, observe)
    frozen: dict[str, dict[int, ActQuantizer]] = {n: {} for n in names}
    for n, by_bits in quantizers.items():
        for b, quantizer in by_bits.items():
            quantizer.signed = not (b == 4 and float(quantizer.lo) >= 0)
            try:
                quantizer.freeze(n)
                frozen[n][b] = quantizer
            except ValueError:  # an all-zero input quantizes without error
                pass
    errors = {n: {b: 0.0 for b in bits} for n in names}
    counts = dict.fromkeys(names, 0)

    def measure(name: str, a: torch.Tensor) -> None:
        counts[name] += a.numel()
        for b, quantizer in frozen[name].items():
            errors[name][b] += float(((quantizer.fake(a) - a) ** 2).sum())

    _each_layer_input(model, names, batches, micro_batch, measure)
    return errors, counts


def _each_layer_input(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      micro_batch: int | None, visit: Callable[[str, torch.Tensor], Any]) -> None:
    """Call ``visit(layer, input)`` for each layer's input on every micro-batch (no gradients)."""
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        return lambda module, args: visit(name, args[0].detach()) and None  # None: the input stays as it is

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x, _, _ in _micro_batches(batches, micro_batch):
                model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()


def sensitivity(model: nn.Module, data: Iterable[Any], *, bits: Sequence[int] = (4, 8), tol: float = 1e-2,
                max_iters: int = 100, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None,
                micro_batch: int | None = None, progress: Progress | None = None) -> Sensitivity:
    """Ω of every quantizable layer's weight and input activation for each width in ``bits``, on ``data``
    (``(inputs, labels)`` batches, labels as class indices or probabilities).

    Unlabelled input batches are labelled with the float model's own softmax outputs (soft labels): the
    loss is then the cross-entropy to the float model, whose gradient vanishes at the float weights, so the
    Hessian there is the Gauss-Newton matrix, positive semi-definite, on any inputs. (With the model's
    argmax as a hard label, inputs it is unsure of, such as distilled ones, give indefinite Hessians and
    negative traces, which Ω would read as insensitive.)

    Results are cached in ``cache_dir`` (default ``$HAWQC_CACHE`` or ``~/.cache/hawqc``) under a hash
    of the weights, the data and these settings; a second call with the same inputs reads the file.
    ``micro_batch`` and ``progress``: see :func:`hessian_traces`."""
    batches = _labelled(model, data)
    settings = {"bits": sorted(set(bits)), "tol": tol, "max_iters": max_iters, "seed": seed,
                "micro_batch": micro_batch}
    path = _cache_folder(cache_dir) / f"sensitivity-{_fingerprint(model, batches, settings)}.json"
    world = distributed.setup()
    if world.total(float(not path.is_file())) == 0:  # under torchrun: computed unless every rank has it
        return Sensitivity.load(path)
    fold = folded_weights(model)
    traces, act_traces, iters = hessian_traces(model, batches, fold, tol=tol, max_iters=max_iters, seed=seed,
                                               activations=True, micro_batch=micro_batch, progress=progress)
    params = {n: int(w.numel()) for n, (w, _) in fold.items()}
    omega = {n: {b: max(traces[n], 0.0) / params[n] * quantization_error(w, b) for b in settings["bits"]}
             for n, (w, _) in fold.items()}
    errors, counts = activation_errors(model, list(fold), batches, settings["bits"], micro_batch)
    act_omega = {n: {b: max(act_traces[n], 0.0) / counts[n] * errors[n][b] for b in settings["bits"]} for n in fold}
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
            with torch.no_grad():  # soft labels: see sensitivity()
                y = torch.softmax(model.eval()(x.float()), dim=1)
        batches.append((x.float(), y.long() if not torch.is_floating_point(y) else y.float()))
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
