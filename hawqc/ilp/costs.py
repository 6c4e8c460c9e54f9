"""Per-layer hardware costs of a model: parameter count and multiply-accumulates at an input shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerCost:
    """Weights, MACs and input shape (per input sample, no batch dim) of one Conv2d or Linear layer."""

    params: int
    macs: int
    input_shape: tuple[int, ...]


def layer_costs(model: Any, input_shape: tuple[int, ...]) -> dict[str, LayerCost]:
    """Params and MACs of every quantizable layer (``hawqc.models.quantizable_layers`` order), measured
    with forward hooks on one zero input of ``input_shape`` (without the batch dimension)."""
    import torch
    from torch import nn

    from hawqc.models import quantizable_layers

    macs: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            per_output = module.weight[0].numel()  # in_channels/groups * kh * kw, or in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_output
            shapes[name] = tuple(inputs[0].shape[1:])

        return record

    names = quantizable_layers(model)
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise ValueError(f"input shape {tuple(input_shape)} does not fit the model: {str(err).splitlines()[0]}") from None
    finally:
        for handle in handles:
            handle.remove()
    return {n: LayerCost(modules[n].weight.numel(), macs.get(n, 0), shapes.get(n, ())) for n in names}
