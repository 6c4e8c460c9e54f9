"""User-level entry points (re-exported by :mod:`hawqc`): models and data by name, quantization."""

from __future__ import annotations

import os
from typing import Any

DATASETS = ("digits", "fashion-mnist", "random", "distilled")


def load_model(name: str, checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """A built-in model, with weights from a ``state_dict`` checkpoint (read with ``weights_only=True``,
    loaded strictly; torchvision checkpoints fit ResNet-18/50 and Inception-V3)."""
    import torch

    from hawqc import models

    model = models.get(name, **kwargs)
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {checkpoint} does not exist") from None
        except Exception as err:  # torch raises pickle, zip and runtime errors alike
            raise ValueError(f"{checkpoint}: not a loadable weights file ({str(err).splitlines()[0]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{checkpoint} does not fit {name}: {str(err).splitlines()[0]}") from None
    return model.eval()


def dataset(name: str, split: str, input_shape: tuple[int, ...], size: int = 256, seed: int = 0, *,
            model: Any = None, distill_steps: int = 200, log: Any = None) -> Any:
    """A dataset by name; ``random`` is ``size`` standard-normal images of ``input_shape`` with label 0;
    ``distilled`` is ``size`` inputs synthesised from ``model``'s BatchNorm statistics
    (:func:`hawqc.quant.distill.distill`, ``distill_steps`` Adam steps; both splits alike), labelled
    with the model's own predictions."""
    import torch
    from torch.utils.data import TensorDataset

    from hawqc import data

    if name == "digits":
        return data.digits(split)
    if name == "fashion-mnist":
        return data.fashion_mnist(split)
    if name == "random":
        generator = torch.Generator().manual_seed(seed + (split == "test"))
        return TensorDataset(torch.randn(size, *input_shape, generator=generator), torch.zeros(size, dtype=torch.long))
    if name == "distilled":
        from hawqc.quant.distill import distill

        if model is None:
            raise ValueError("distilled data is synthesised from a model: give model=")
        x = distill(model, input_shape, samples=size, steps=distill_steps, seed=seed, log=log)
        with torch.no_grad():
            return TensorDataset(x, model.eval()(x).argmax(dim=1))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def integer_graph_of(graph: Any, bit_config: Any = None, calib_data: Any = None, input_shape: Any = None) -> Any:
    """The :class:`~hawqc.reference.IntegerGraph` of an ONNX QDQ model (path or ``ModelProto``), a
    saved integer graph (``.int.npz``), a quantized model, or a float ``nn.Module`` (quantized here
    with ``bit_config`` on ``calib_data``). A ``bit_config`` given with an already quantized graph
    must match the bits it was quantized with; ``input_shape`` fixes an ONNX model's dynamic dims."""
    from pathlib import Path

    from hawqc.bitconfig import BitConfig
    from hawqc.reference.graph import IntegerGraph

    if isinstance(graph, IntegerGraph):
        result = graph
    elif isinstance(graph, (str, os.PathLike)) and str(graph).endswith(".npz"):
        result = IntegerGraph.load(graph)
    elif isinstance(graph, (str, os.PathLike)) or type(graph).__name__ == "ModelProto":
        from hawqc.frontend.onnx_qdq import from_onnx

        if isinstance(graph, (str, os.PathLike)) and not Path(graph).is_file():
            raise ValueError(f"{graph}: no such file")
        result = from_onnx(graph, tuple(input_shape) if input_shape is not None else None)
    elif hasattr(graph, "integer_graph"):
        result = graph.integer_graph()
    elif hasattr(graph, "named_modules"):
        from hawqc.quant.model import quantize

        if calib_data is None:
            raise ValueError("a float model needs calib_data (input batches) to be quantized")
        return quantize(graph, bit_config or "uniform8", calib_data).integer_graph()
    else:
        raise ValueError(f"cannot compile a {type(graph).__name__}: give an ONNX QDQ model, a .int.npz integer "
                         "graph, a quantized model or a float torch model")
    if bit_config is not None:
        found = result.metadata.get("bit_config")
        if found is None:
            raise ValueError("this graph records no bit config to check --bit-config against")
        wanted = {k: v.to_dict() for k, v in BitConfig.from_any(bit_config).resolve(list(found)).items()}
        differ = [k for k in found if found[k] != wanted[k]]
        if differ:
            raise ValueError(f"the graph is quantized with other bits than the bit config asks for at {len(differ)} "
                             f"layers (first: {differ[0]} {found[differ[0]]} vs {wanted[differ[0]]}); "
                             "quantize the model again with this config")
    return result


def input_shape_of(graph: Any, input_shape: Any = None) -> tuple[int, ...]:
    """The static input shape to compile for: ``input_shape`` if given, else the graph's own; a
    dynamic dimension (a batch size left open, as exporters do) without ``input_shape`` is an error."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"input shape must be positive dimensions, got {input_shape}")
        return shape
    recorded = graph.metadata.get("input_shape") or []
    if not recorded or any(d is None for d in recorded):
        shown = "x".join("?" if d is None else str(d) for d in recorded) or "unknown"
        raise ValueError(f"the model's input shape is {shown}: give a static input shape "
                         "(e.g. --input-shape 1,3,224,224)")
    return tuple(recorded)


def compile_integer_only(graph: Any, bit_config: Any = None, target: Any = "llvm", *,
                         input_shape: Any = None, calib_data: Any = None, kernels: str = "auto",
                         threads: int | None = None, int4: str = "auto") -> Any:
    """Compile a quantized graph to an integer-only TVM module.

    ``graph``: path to a QDQ ``.onnx`` | ``onnx.ModelProto`` | ``.int.npz`` | quantized or float
    ``nn.Module`` (see :func:`integer_graph_of`). ``target``: ``"llvm"`` (host CPU), a string such as
    ``"llvm -mcpu=znver4"`` or a TVM target dict. ``kernels`` (CPU): ``auto`` (VNNI where the target has
    it, else AVX2), ``vnni``, ``avx2`` or ``generic`` (TVM's lowering, unscheduled). ``threads``: CPU
    worker threads a call uses (default: one per physical core; idle workers soon sleep after a call, so
    other work in the process is not slowed down). ``int4`` (cuda):
    ``auto`` (INT4 Tensor Cores where the arch has them, else int8 kernels for 4-bit layers) or ``emulated``
    (INT4 kernels on sm_90 too, emulated by ptxas: for checking on Hopper, not for speed). Returns a
    :class:`~hawqc.runtime.module.CompiledModule`: ``cm(x)``, ``cm.ir``, ``cm.reference(x)``,
    ``cm.export(dir)``.
    """
    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target

    config = parse_target(target)
    integer_graph = integer_graph_of(graph, bit_config, calib_data, input_shape)
    return compile_graph(integer_graph, input_shape_of(integer_graph, input_shape), config, kernels=kernels,
                         threads=threads, int4=int4)


def load(folder: str | os.PathLike[str], threads: int | None = None) -> Any:
    """Load a compiled artifact folder (written by ``CompiledModule.export`` or ``hawqc compile``);
    ``threads`` as for :func:`compile_integer_only`."""
    from hawqc.runtime.module import load as load_module

    return load_module(folder, threads)


def search_bit_config(model: Any, data: Any = None, *, sensitivity: Any = None, input_shape: Any = None,
                      size: float | str | None = None, bops: float | str | None = None,
                      latency: float | str | None = None, table: Any = None, **options: Any) -> Any:
    """Per-layer bits by HAWQ-V3's ILP: least summed second-order perturbation Ω within the budgets.

    ``model``: a float ``nn.Module``. ``data``: ``(inputs, labels)`` batches for the Hessian (or give
    ``sensitivity``, a :class:`~hawqc.ilp.sensitivity.Sensitivity` or its JSON path). Budgets are
    fractions in [0, 1] between uniform 4- and 8-bit or absolute values (``"4MB"``, ``"3G"``,
    ``"1.5ms"``); a latency budget needs ``table`` (a ``hawqc tune`` JSON). ``input_shape`` (no batch
    dim) defaults to the data's. Further ``options`` go to :func:`hawqc.ilp.search.search`
    (``ties``, ``pin_first_last``, ``transition_ms``, ``options``). Returns a :class:`~hawqc.BitConfig`.
    """
    from hawqc.ilp.search import search
    from hawqc.ilp.sensitivity import Sensitivity
    from hawqc.ilp.sensitivity import sensitivity as compute_sensitivity

    if size is None and bops is None and latency is None:
        raise ValueError("give at least one budget: size, bops or latency")
    batches = list(data) if data is not None else None
    if sensitivity is None:
        if batches is None:
            raise ValueError("give data (for the Hessian) or a precomputed sensitivity")
        sensitivity = compute_sensitivity(model, batches)
    elif not isinstance(sensitivity, Sensitivity):
        sensitivity = Sensitivity.load(sensitivity)
    if input_shape is None:
        if not batches:
            raise ValueError("give input_shape (without the batch dimension) or data")
        first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
        input_shape = tuple(first.shape[1:])
    result = search(model, input_shape, sensitivity.omega, size=size, bops=bops, latency=latency, table=table,
                    activation_omega=sensitivity.activation_omega, **options)
    return result.solution.bit_config()
