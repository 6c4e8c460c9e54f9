"""User-level entry points (re-exported by :mod:`hawqc`): models and data by name, quantization."""

from __future__ import annotations

import os
from typing import Any


def load_model(spec: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """The float ``nn.Module`` a model spec names: a built-in name, a ``.pt2`` ``torch.export`` program, a
    float ``.onnx`` model or ``package.module:factory`` (see :mod:`hawqc.models.loading`). ``checkpoint``
    (built-ins and factories): a ``state_dict``, read with ``weights_only=True`` and loaded strictly
    (torchvision checkpoints fit the built-in torchvision-layout models)."""
    from hawqc.models.loading import load

    return load(spec, checkpoint, **kwargs).module


def dataset(spec: str | os.PathLike[str], split: str = "train", input_shape: Any = None, size: int = 256,
            seed: int = 0, **options: Any) -> Any:
    """The data a spec names (see :mod:`hawqc.data`): ``digits``, ``fashion-mnist``, ``random`` (``size``
    standard-normal inputs of ``input_shape``, unlabelled), a folder of images or a ``.npy`` array.
    ``options``: ``preprocess`` (:class:`hawqc.data.Preprocess`), ``labels`` (a ``.npy``), ``model``."""
    from hawqc.data import load_data

    return load_data(spec, split, input_shape=input_shape, size=size, seed=seed, **options)


def integer_graph_of(graph: Any, bit_config: Any = None, calib_data: Any = None, input_shape: Any = None) -> Any:
    """The :class:`~hawqc.reference.IntegerGraph` of an ONNX QDQ model (path or ``ModelProto``), a
    saved integer graph (``.int.npz``), a quantized model, or a float ``nn.Module`` (quantized here
    with ``bit_config`` on ``calib_data``). A ``bit_config`` given with an already quantized graph
    must match the bits it was quantized with; ``input_shape`` fixes an ONNX model's dynamic dims
    (without it a dynamic batch stays open). For an ONNX model, ``calib_data`` (an array of inputs, a
    ``.npy`` path or a list of batches) quantizes the float regions its quantizer left
    (:mod:`hawqc.frontend.float_islands`; without it they are computed in float and reported)."""
    from pathlib import Path

    from hawqc.bitconfig import BitConfig
    from hawqc.reference.graph import IntegerGraph

    if isinstance(graph, IntegerGraph):
        result = graph
    elif isinstance(graph, (str, os.PathLike)) and str(graph).endswith(".npz"):
        result = IntegerGraph.load(graph)
    elif isinstance(graph, (str, os.PathLike)) or type(graph).__name__ == "ModelProto":
        from hawqc.frontend.onnx_model import load_onnx
        from hawqc.frontend.onnx_qdq import from_onnx

        if isinstance(graph, (str, os.PathLike)) and not Path(graph).is_file():
            raise ValueError(f"{graph}: no such file")
        model = load_onnx(graph)
        folded_at = _batch_one_for_shape_arithmetic(model) if input_shape is None else None
        shape = tuple(input_shape) if input_shape is not None else folded_at
        if calib_data is None:
            result = from_onnx(model, shape)
        else:
            from hawqc.frontend.float_islands import quantize_float_islands

            _, result, _ = quantize_float_islands(model, calib_data, lambda m: from_onnx(m, shape, float_regions=False))
        if folded_at is not None:
            result.metadata["batch_note"] = (
                "the model's shape arithmetic reads the batch, so it is compiled for batch 1; choose another batch "
                f"with --input-shape N,{','.join(map(str, folded_at[1:]))} (input_shape= in Python)")
    elif hasattr(graph, "integer_graph"):
        result = graph.integer_graph()
    elif hasattr(graph, "named_modules"):
        from hawqc.quant.model import quantize

        if calib_data is None:
            raise ValueError("a float model needs calib_data to be quantized: pass calib_data=[a few input batches], "
                             "e.g. [torch.randn(8, 3, 224, 224)], or give a quantized model")
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


def _batch_one_for_shape_arithmetic(model: Any) -> tuple[int, ...] | None:
    """``(1, C, H, W)`` for an ONNX model whose batch is open, other dimensions static, and whose shape
    arithmetic (``Shape`` nodes) reads the input's shape: it folds to constants only at a fixed batch."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not any(node.op_type == "Shape" for node in model.graph.node):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if not dims or dims[0] is not None or None in dims[1:]:
        return None
    return (1, *dims[1:])


def input_shape_of(graph: Any, input_shape: Any = None) -> tuple[int | None, ...]:
    """The input shape to compile for: ``input_shape`` if given, else the graph's own, whose batch (first
    dimension) may be ``None``: any batch, one module serving every batch size. Another dynamic
    dimension without ``input_shape`` is an error."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"input shape must be positive dimensions, got {input_shape}")
        return shape
    recorded = graph.metadata.get("input_shape") or []
    if not recorded or any(d is None for d in recorded[1:]):
        shown = "x".join("?" if d is None else str(d) for d in recorded) or "unknown"
        raise ValueError(f"the model's input shape is {shown}: give a static input shape "
                         "(e.g. --input-shape 1,3,224,224 or input_shape=(1, 3, 224, 224))")
    return tuple(recorded)


def example_shape(shape: tuple[int | None, ...], batch: int = 1) -> tuple[int, ...]:
    """``shape`` with an open batch (``None``) set to ``batch``: the shape of an example input."""
    return tuple(batch if d is None else d for d in shape)


def compile_integer_only(graph: Any, bit_config: Any = None, target: Any = "llvm", *,
                         input_shape: Any = None, calib_data: Any = None, kernels: str = "auto",
                         threads: int | None = None, int4: str = "auto") -> Any:
    """Compile a quantized graph to an integer-only TVM module.

    ``graph``: path to a QDQ ``.onnx`` | ``onnx.ModelProto`` | ``.int.npz`` | quantized or float
    ``nn.Module`` (see :func:`integer_graph_of`). ``input_shape``: default the model's own, an open batch
    left open (the module runs any batch size; see :func:`input_shape_of`; on the CPU also compiled for
    batch 1, which batch-1 calls run and other batches a sample at a time). ``target``: ``"llvm"`` (host
    CPU), a string such as ``"llvm -mcpu=znver4"`` or a TVM target dict. ``kernels`` (CPU): ``auto`` (VNNI where the target has
    it, else AVX2), ``vnni``, ``vnni-w4`` (4-bit weights packed two per byte: smaller, slower), ``avx2`` or
    ``generic`` (TVM's lowering, unscheduled). ``threads``: CPU
    worker threads a call uses (default: one per physical core; idle workers soon sleep after a call, so
    other work in the process is not slowed down). ``int4`` (cuda):
    ``auto`` (INT4 Tensor Cores where the arch has them, else int8 kernels for 4-bit layers) or ``emulated``
    (INT4 kernels on sm_90 too, emulated by ptxas: for checking on Hopper, not for speed). Returns a
    :class:`~hawqc.runtime.module.CompiledModule`: ``cm(x)``, ``cm.ir``, ``cm.reference(x)``,
    ``cm.export(dir)``.
    """
    import warnings

    from hawqc.runtime.module import compile_graph
    from hawqc.runtime.target import parse_target

    config = parse_target(target)
    integer_graph = integer_graph_of(graph, bit_config, calib_data, input_shape)
    module = compile_graph(integer_graph, input_shape_of(integer_graph, input_shape), config, kernels=kernels,
                           threads=threads, int4=int4)
    if module.note:
        warnings.warn(module.note, stacklevel=2)
    return module


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
