"""Lower an :class:`~hawqc.reference.IntegerGraph` to an integer-only Relax module.

One Relax expression per integer operation, with the reference kernels' exact semantics:
convolutions and dense layers multiply int8 (or uint8) operands into int32; ``requantize`` is the
dyadic rule of :mod:`hawqc.quant.dyadic` (int64 product with per-channel ``b``, a shift by ``c``
rounding half to even, zero points where a tensor has them, clip) so that TVM's ``FuseOps`` fuses it into the producing kernel;
average pooling is a depthwise convolution with a ones kernel (an integer window sum) followed by a
requantize. Float appears only in the input ``quantize`` and the output ``dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.quant.dyadic import (Int32Sum, ShiftOps, high_word_shift, high_word_sum_form, int32_sum_form, round_shift,
                                rounding_bias)
from hawqc.reference.graph import IntegerGraph, IntOp, pool_padding, pool_rescale


def storage_dtype(qmin: int, qmax: int) -> str:
    """The narrowest integer type holding [qmin, qmax]: int8, uint8 or int32."""
    if -128 <= qmin and qmax <= 127:
        return "int8"
    if 0 <= qmin and qmax <= 255:
        return "uint8"
    return "int32"


@dataclass(frozen=True)
class Context:
    """What every lowering sees: the block builder, the layout of 4-d tensors inside the module
    (``NCHW`` or ``NHWC``; inputs and outputs stay NCHW), the target's conv/dense kernels and whether
    a tensor whose range fits both int8 and uint8 (e.g. [0, 127] after a ReLU) is stored unsigned
    (what VNNI's ``vpdpbusd`` reads without an offset)."""

    bb: Any
    layout: str = "NCHW"
    kernels: ConvKernels | None = None
    unsigned_first: bool = False
    lookup: TableKernel | None = None
    quantize: QuantizeKernel | None = None

    def storage(self, qmin: int, qmax: int) -> str:
        """The type a tensor with values in [qmin, qmax] is stored in."""
        return "uint8" if self.unsigned_first and 0 <= qmin and qmax <= 255 else storage_dtype(qmin, qmax)

    def channel_axis(self, ndim: int) -> int:
        return ndim - 1 if self.layout == "NHWC" else 1

    def spatial_axes(self, ndim: int) -> list[int]:
        return [1, 2] if self.layout == "NHWC" else [2, 3]

    def internal_axis(self, axis: int, ndim: int) -> int:
        """Where axis ``axis`` of an NCHW tensor lies in the module's layout."""
        return [0, 3, 1, 2][axis] if self.layout == "NHWC" and ndim == 4 else axis

    def to_internal(self, x: Any) -> Any:
        """An NCHW tensor in the module's layout (other ranks unchanged)."""
        from tvm.relax import op as R

        return R.permute_dims(x, [0, 2, 3, 1]) if self.layout == "NHWC" and _ndim(x) == 4 else x

    def to_external(self, x: Any) -> Any:
        """A tensor of the module's layout back in NCHW."""
        from tvm.relax import op as R

        return R.permute_dims(x, [0, 3, 1, 2]) if self.layout == "NHWC" and _ndim(x) == 4 else x


def relax_shift_ops() -> ShiftOps:
    """The operators :func:`hawqc.quant.dyadic.round_shift` is written with, on int64 Relax expressions."""
    from tvm import relax
    from tvm.relax import op as R

    return ShiftOps(R.add, R.right_shift, R.bitwise_and, relax.const(1, "int64"),
                    lambda x, k: R.multiply(x, relax.const(k, "int64")))


ConvKernels = Callable[..., Any]
"""A target's conv/dense lowering: ``(ctx, x, conv_or_dense, requantize_or_None, residual=None, clip=None,
then=None) -> expr``, with the requantization fused in when given: a ``requantize``, or an aligned ``add`` of
the layer's output (clipped by ``clip``, a requantize by 1, where given) and ``residual`` (the Add's other
input); with ``then``, an aligned Add of the requantized output and ``residual`` follows the requantize;
``None`` where it has no kernel for that (the generic lowering is used)."""

TableKernel = Callable[[Context, Any, np.ndarray, int, str], Any]
"""A target's table lookup: ``(ctx, x, table, offset, out_dtype) -> expr`` computing ``table[x - offset]``
(clipped to the table) into ``out_dtype``; ``None`` where it has no kernel for ``x`` (``take`` is used)."""


QuantizeKernel = Callable[..., Any]
"""A target's quantize of the NCHW float32 model input into the module's layout: ``(ctx, x, scale, zero_point,
qmin, qmax, out_dtype) -> expr``; ``None`` where it has no kernel for ``x``."""


def to_relax(graph: IntegerGraph, input_shape: tuple[int | None, ...], outputs: list[str] | None = None,
             input_dtype: str = "float32", layout: str = "NCHW", kernels: ConvKernels | None = None,
             unsigned_first: bool = False, lookup: TableKernel | None = None,
             quantize: QuantizeKernel | None = None) -> Any:
    """An ``IRModule`` whose ``main`` maps an input of ``input_shape`` to the graph's output (or, for
    debugging, to the tuple of the named intermediate tensors). A batch (first dimension) given as ``None``
    stays symbolic (a ``tirx.Var``): the module runs any batch size. Whole models take and give float32;
    a graph without quantize/dequantize (one layer, for measuring) takes ``input_dtype`` integers.

    ``layout`` is the layout of 4-d tensors inside the module: the input is transposed once after its
    quantize, the outputs once at the end. ``kernels`` lowers conv/dense layers, each fused with the
    requantize (or aligned Add: :func:`_fusable_add`) that follows it when nothing else reads the
    accumulator. ``unsigned_first``: see
    :class:`Context`. ``lookup`` applies the lookup tables of activation functions; ``quantize`` quantizes
    the input.
    """
    from tvm import relax

    bb = relax.BlockBuilder()
    ctx = Context(bb, layout, kernels, unsigned_first, lookup, quantize)
    x = relax.Var("input", relax.TensorType(symbolic_batch(input_shape), input_dtype))
    keep = outputs or [graph.output]
    graph = _pads_folded(graph, keep)
    fused = _fusable_requantize(graph, keep) if kernels else {}
    adds = _fusable_add(graph, keep) if kernels else {}
    graph = _moved_to_their_adds(graph, adds)
    later_adds = _fusable_later_add(graph, keep, fused, adds) if kernels else {}
    with bb.function("main", [x]):
        with bb.dataflow():
            values: dict[str, Any] = {graph.input: x if "float" in input_dtype else bb.emit(ctx.to_internal(x))}
            inside: set[str] = set()  # the clips and requantizes of Adds fused into their conv
            for op in graph.ops:
                if op.output in values or op.output in inside:  # fused into its conv
                    continue
                ins = [values[i] for i in op.inputs]
                requant = fused.get(op.output)
                expr = None
                if kernels and op.op in ("conv2d", "dense"):
                    if (add := later_adds.get(op.output)) is not None:
                        other = values[next(name for name in add.inputs if name != requant.output)]
                        if (expr := kernels(ctx, ins[0], op, requant, other, then=add)) is not None:
                            values[add.output] = bb.emit(expr)
                            inside.add(requant.output)
                            continue
                    if (fusion := adds.get(op.output)) is not None:
                        requant, clip = fusion
                        mine = op.output if clip is None else clip.output
                        residual = values[next(name for name in requant.inputs if name != mine)]
                        expr = kernels(ctx, ins[0], op, requant, residual, clip)
                        requant = fused.get(op.output) if expr is None else requant
                        inside |= {clip.output} if expr is not None and clip is not None else set()
                    expr = kernels(ctx, ins[0], op, requant) if expr is None else expr
                if expr is None:
                    values[op.output] = bb.emit(_LOWERINGS[op.op](ctx, ins, op))
                else:
                    values[(requant or op).output] = bb.emit(expr)
            names = [graph.output] if outputs is None else outputs
            results = [_emitted(bb, ctx.to_external(values[n])) for n in names]
            out = bb.emit_output(results[0] if outputs is None else relax.Tuple(results))
        bb.emit_func_output(out)
    return bb.get()


class FixedBatch(ValueError):
    """Raised where a lowering cannot keep the batch symbolic (the caller compiles for a fixed batch)."""


def symbolic_batch(shape: tuple[int | None, ...]) -> list[Any]:
    """``shape`` with a ``None`` batch (the first dimension) replaced by the symbolic ``batch``."""
    from tvm import tirx

    if any(d is None for d in shape[1:]):
        raise ValueError(f"only the batch dimension may be left open, got input shape {shape}")
    return [tirx.Var("batch", "int64") if i == 0 and d is None else d for i, d in enumerate(shape)]


def is_static(dim: Any) -> bool:
    """Whether a shape dimension is a known integer (not the symbolic batch)."""
    from tvm import tirx

    return isinstance(dim, (int, tirx.IntImm))


def _emitted(bb: Any, expr: Any) -> Any:
    from tvm import relax

    return expr if isinstance(expr, relax.Var) else bb.emit(expr)


def _readers(graph: IntegerGraph) -> dict[str, list[IntOp]]:
    """Tensor name -> the ops that read it."""
    readers: dict[str, list[IntOp]] = {}
    for op in graph.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    return readers


def _pads_folded(graph: IntegerGraph, keep: list[str]) -> IntegerGraph:
    """``graph`` with each spatial ``pad`` whose only reader is a conv folded into that conv's padding
    (where the conv pads with the same value or not at all): the same numbers, no padded copy."""
    readers = _readers(graph)
    folded: dict[str, IntOp] = {}  # conv output -> the pad it absorbs
    for op in graph.ops:
        if op.op != "pad" or op.output in keep or len(readers.get(op.output, [])) != 1:
            continue
        conv, pads, value = readers[op.output][0], op.attrs["pads"], op.attrs.get("pad_value", 0)
        if (conv.op == "conv2d" and len(pads) == 4 and min(pads) >= 0
                and (not any(conv.attrs["padding"]) or conv.attrs.get("pad_value", 0) == value)):
            folded[conv.output] = op
    if not folded:
        return graph
    absorbed = {id(pad) for pad in folded.values()}
    ops = []
    for op in graph.ops:
        if id(op) in absorbed:
            continue
        if (pad := folded.get(op.output)) is not None:
            attrs = {**op.attrs, "padding": [a + b for a, b in zip(op.attrs["padding"], pad.attrs["pads"])],
                     "pad_value": pad.attrs.get("pad_value", 0)}
            op = IntOp(op.op, pad.inputs, op.output, attrs, op.consts)
        ops.append(op)
    return IntegerGraph(graph.input, graph.output, ops, graph.metadata)


def _fusable_requantize(graph: IntegerGraph, keep: list[str]) -> dict[str, IntOp]:
    """conv/dense output name -> the requantize that is its only reader (when it is not an output)."""
    readers = _readers(graph)
    return {op.output: readers[op.output][0] for op in graph.ops
            if op.op in ("conv2d", "dense") and op.output not in keep and len(readers.get(op.output, [])) == 1
            and readers[op.output][0].op == "requantize"}


def _fusable_add(graph: IntegerGraph, keep: list[str]) -> dict[str, tuple[IntOp, IntOp | None]]:
    """conv output name -> (the aligned Add of two inputs, on exact grids: per-input multipliers, that alone
    reads it, and the requantize by exactly 1 between them or None): hawqc's own residual Adds read conv
    accumulators, clipped. Where both inputs are such, the conv written later: the other input must exist
    when the fused kernel runs."""
    readers, writer = _readers(graph), {op.output: op for op in graph.ops}
    order = {op.output: i for i, op in enumerate(graph.ops)}

    def accumulator(name: str) -> tuple[str, IntOp | None] | None:
        op = writer.get(name)
        if op is not None and op.op == "requantize" and _is_clip(op) and len(readers[name]) == 1:
            op, clip = writer.get(op.inputs[0]), op
        else:
            clip = None
        if op is None or op.op != "conv2d" or op.output in keep or len(readers[op.output]) != 1:
            return None
        return op.output, clip

    fusable: dict[str, tuple[IntOp, IntOp | None]] = {}
    for op in graph.ops:
        if op.op == "add" and "m" in op.consts and len(set(op.inputs)) == len(op.inputs) == 2:
            found = [a for name in op.inputs if name not in keep and (a := accumulator(name)) is not None]
            if found:
                conv, clip = max(found, key=lambda a: order[a[0]])
                fusable[conv] = (op, clip)
    return fusable


def _fusable_later_add(graph: IntegerGraph, keep: list[str], fused: dict[str, IntOp],
                       adds: dict[str, tuple[IntOp, IntOp | None]]) -> dict[str, IntOp]:
    """conv output name -> the aligned Add (per-tensor multipliers, two inputs) that alone reads the conv's
    fused requantize, unless ``adds`` fuses it already: ONNX Runtime's residual Adds. The conv written later
    of two such, and only where the Add's other input is written before it."""
    readers, taken = _readers(graph), {id(add) for add, _ in adds.values()}
    order = {op.output: i for i, op in enumerate(graph.ops)}
    conv_of = {requant.output: conv for conv, requant in fused.items()
               if requant.output not in keep and len(readers.get(requant.output, [])) == 1}
    fusable: dict[str, IntOp] = {}
    for op in graph.ops:
        if (op.op != "add" or id(op) in taken or np.ndim(op.consts.get("m")) != 1 or "offset" in op.consts
                or len(op.inputs) != 2 or len(set(op.inputs)) != 2 or not any(name in conv_of for name in op.inputs)):
            continue
        mine = max((name for name in op.inputs if name in conv_of), key=lambda name: order[conv_of[name]])
        other = next(name for name in op.inputs if name != mine)
        if order.get(other, -1) < order[conv_of[mine]]:
            fusable[conv_of[mine]] = op
    return fusable


def _is_clip(op: IntOp) -> bool:
    """Whether a requantize only clips (``b = 2^c``, no zero points or offset)."""
    b, c, a = np.asarray(op.consts["b"]), np.asarray(op.consts["c"]), op.attrs
    return (b.size == 1 and c.size == 1 and int(b) == 1 << int(c) and not a.get("input_zero_point")
            and not a.get("zero_point") and not a.get("tie_window") and "offset" not in op.consts)


def _moved_to_their_adds(graph: IntegerGraph, adds: dict[str, tuple[IntOp, IntOp | None]]) -> IntegerGraph:
    """``graph`` with each conv of ``adds`` (and its clip) right before its Add, after the Add's other input."""
    if not adds:
        return graph
    moved: dict[int, list[IntOp]] = {}
    for op in graph.ops:
        if (fusion := adds.get(op.output)) is not None:
            add, clip = fusion
            moved[id(add)] = [op, *([clip] if clip else [])]
    clips = {id(clip) for _, clip in adds.values() if clip is not None}
    ops = []
    for op in graph.ops:
        if op.output not in adds and id(op) not in clips:
            ops += [*moved[id(op)], op] if id(op) in moved else [op]
    return IntegerGraph(graph.input, graph.output, ops, graph.metadata)


def _const(array: Any, dtype: str) -> Any:
    from tvm import relax

    return relax.const(np.asarray(array).astype(dtype), dtype)  # dtype given: int64 would become int32


def _channel(ctx: Context, array: np.ndarray, ndim: int, dtype: str) -> Any:
    """A per-channel constant shaped to broadcast along the channel axis (or a scalar)."""
    a = np.asarray(array)
    if a.ndim != 1:
        return _const(a, dtype)
    shape = [1] * ndim
    shape[ctx.channel_axis(ndim)] = -1
    return _const(a.reshape(shape), dtype)


def _ndim(expr: Any) -> int:
    return len(expr.ty.shape)


def _requantize(ctx: Context, x: Any, b: np.ndarray, c: np.ndarray, qmin: int, qmax: int, input_zero_point: int = 0,
                zero_point: int = 0, offset: np.ndarray | None = None, tie_window: int = 0) -> Any:
    """``clip(round_shift((x - z_in)*b + offset, c) + z_out, qmin, qmax)`` in int64 (the rule of
    :func:`hawqc.quant.dyadic.requantize`, its ``tie_window`` included), stored in the narrowest type."""
    from tvm import relax
    from tvm.relax import op as R

    ndim = _ndim(x)
    c = np.asarray(c, dtype=np.int64)
    y = R.astype(x, "int64")
    if input_zero_point:
        y = R.subtract(y, _const(input_zero_point, "int64"))
    y = R.multiply(y, _channel(ctx, b, ndim, "int64"))
    y = ctx.bb.emit(y if offset is None else R.add(y, _channel(ctx, offset, ndim, "int64")))
    y = round_shift(y, _channel(ctx, c, ndim, "int64"), _channel(ctx, rounding_bias(c, tie_window), ndim, "int64"),
                    relax_shift_ops(), tie_window)
    if zero_point:
        y = R.add(y, _const(zero_point, "int64"))
    y = R.clip(y, relax.prim_value(int(qmin)), relax.prim_value(int(qmax)))
    return R.astype(y, ctx.storage(qmin, qmax))


def _quantize(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm import relax
    from tvm.relax import op as R

    a, scale, dtype = op.attrs, op.consts["scale"], ctx.storage(op.attrs["qmin"], op.attrs["qmax"])
    if (ctx.quantize is not None and not a.get("internal") and np.size(scale) == 1
            and (expr := ctx.quantize(ctx, ins[0], float(np.float32(scale)), a.get("zero_point", 0), a["qmin"],
                                      a["qmax"], dtype)) is not None):
        return expr
    x = ins[0] if a.get("internal") else R.astype(ins[0], "float32")  # an island's value is float64
    x = R.astype(x, "float64")  # x / scale in float64, as QuantizeLinear means it
    q = R.round(R.divide(x, _const(np.float32(scale), "float64")))
    if a.get("zero_point", 0):
        q = R.add(q, _const(a["zero_point"], "float64"))
    q = R.clip(q, relax.prim_value(float(a["qmin"])), relax.prim_value(float(a["qmax"])))
    q = R.astype(q, dtype)
    return q if a.get("internal") else ctx.to_internal(ctx.bb.emit(q))


def _dequantize(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    dtype = "float64" if op.attrs.get("float64") else "float32"
    q = R.astype(ins[0], "int32")
    if op.attrs.get("zero_point", 0):
        q = R.subtract(q, _const(op.attrs["zero_point"], "int32"))
    return R.multiply(R.astype(q, dtype), _channel(ctx, op.consts["scale"], _ndim(ins[0]), dtype))


def _conv2d(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    a = op.attrs
    x, padding = _padded(ctx, ins[0], a["padding"], a.get("pad_value", 0))
    acc = R.nn.conv2d(x, _const(op.consts["weight"], "int8"), strides=a["stride"], padding=padding,
                      dilation=a["dilation"], groups=a["groups"], data_layout=ctx.layout, kernel_layout="OIHW",
                      out_dtype="int32")
    return R.add(acc, _channel(ctx, op.consts["bias"], 4, "int32")) if "bias" in op.consts else acc


def _dense(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    acc = R.matmul(ins[0], _const(op.consts["weight"].T, "int8"), out_dtype="int32")
    return R.add(acc, _const(op.consts["bias"], "int32")) if "bias" in op.consts else acc


def _padded(ctx: Context, x: Any, padding: list[int], value: int) -> tuple[Any, list[int]]:
    """Explicit padding with a zero point (an op's own padding only pads with 0)."""
    if not value or not any(padding):
        return x, padding
    return ctx.bb.emit(_pad_expr(ctx, x, padding, value)), [0, 0, 0, 0]


def _pad_expr(ctx: Context, x: Any, pads: list[int], value: int) -> Any:
    from tvm.relax import op as R

    top, left, bottom, right = pads
    widths = [0] * 8
    (h, w) = ctx.spatial_axes(4)
    widths[2 * h: 2 * h + 2], widths[2 * w: 2 * w + 2] = [top, bottom], [left, right]
    return R.nn.pad(x, widths, pad_value=float(value))


def _requantize_op(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    a = op.attrs
    return _requantize(ctx, ins[0], op.consts["b"], op.consts["c"], a["qmin"], a["qmax"],
                       a.get("input_zero_point", 0), a.get("zero_point", 0), op.consts.get("offset"))


def _add(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm import relax
    from tvm.relax import op as R

    a = op.attrs
    if "m" in op.consts and (cheaper := _cheaper_add(ctx, ins, op)) is not None:
        return cheaper
    if "m" in op.consts:  # inputs of different scales on a common fine grid, rounded once
        zero_points = a.get("input_zero_points", [0] * len(ins))
        terms = []
        for x, z, m in zip(ins, zero_points, op.consts["m"]):
            y = R.astype(x, "int64")
            y = R.subtract(y, _const(z, "int64")) if z else y
            terms.append(R.multiply(y, _channel(ctx, m, _ndim(x), "int64")))
        total = ctx.bb.emit(terms[0] if len(terms) == 1 else R.add(terms[0], terms[1]))
        for term in terms[2:]:
            total = ctx.bb.emit(R.add(total, term))
        if "offset" in op.consts:  # the inputs' bias fractions, on the common grid
            total = ctx.bb.emit(R.add(total, _channel(ctx, op.consts["offset"], _ndim(ins[0]), "int64")))
        return _requantize(ctx, total, np.array(1), op.consts["c"], a["qmin"], a["qmax"], 0, a.get("zero_point", 0),
                           tie_window=a.get("tie_window", 0))
    total = R.astype(ins[0], "int64")
    for x in ins[1:]:
        total = R.add(total, R.astype(x, "int64"))
    if a.get("zero_point", 0):
        total = R.add(total, _const(a["zero_point"], "int64"))
    total = R.clip(total, relax.prim_value(a["qmin"]), relax.prim_value(a["qmax"]))
    return R.astype(total, ctx.storage(a["qmin"], a["qmax"]))


def add_in_int32(op: IntOp, dtypes: list[str]) -> Int32Sum | None:
    """An aligned Add of 8-bit inputs stored as ``dtypes`` (per-tensor multipliers, no offset) as
    :func:`hawqc.quant.dyadic.int32_sum_form` computes it, or None where it has no such form."""
    a, ranges = op.attrs, _eight_bit_ranges(op, dtypes)
    if ranges is None:
        return None
    return int32_sum_form([int(v) for v in op.consts["m"]], a.get("input_zero_points", [0] * len(dtypes)),
                          int(op.consts["c"]), a.get("zero_point", 0), ranges, a["qmin"], a["qmax"], a.get("tie_window", 0))


def _eight_bit_ranges(op: IntOp, dtypes: list[str]) -> list[tuple[int, int]] | None:
    """The inputs' storage ranges where an aligned Add has the cheaper forms' shape (8-bit inputs, per-tensor
    multipliers, no offset), else None."""
    if op.consts["m"].ndim != 1 or "offset" in op.consts or any(d not in ("int8", "uint8") for d in dtypes):
        return None
    return [(int(np.iinfo(d).min), int(np.iinfo(d).max)) for d in dtypes]


def _cheaper_add(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    """The aligned Add of 8-bit inputs (per-tensor multipliers) in int32 (:func:`hawqc.quant.dyadic.int32_sum_form`:
    half the work of int64 lanes) or else in the high-word form (:func:`hawqc.quant.dyadic.high_word_sum_form`),
    each equal to the exact rule on every combination of inputs; None where neither is."""
    from tvm import relax
    from tvm.relax import op as R

    a, c, dtypes = op.attrs, int(op.consts["c"]), [str(x.ty.dtype) for x in ins]
    if (ranges := _eight_bit_ranges(op, dtypes)) is None:
        return None
    multipliers = [int(v) for v in op.consts["m"]]
    zero_points, zero_point, window = a.get("input_zero_points", [0] * len(ins)), a.get("zero_point", 0), a.get("tie_window", 0)
    if (form := add_in_int32(op, dtypes)) is not None:
        total = _const(form.d, "int32")
        for x, mult in zip(ins, form.multipliers):
            total = R.add(total, R.multiply(R.astype(x, "int32"), _const(mult, "int32")))
        high = R.right_shift(total, _const(form.shift, "int32"))
    elif (d := high_word_sum_form(multipliers, zero_points, c, zero_point, ranges, window)) is not None:
        total = _const(d, "int64")
        for x, mult in zip(ins, multipliers):
            total = R.add(total, R.multiply(R.astype(x, "int64"), _const(mult, "int64")))
        high = high_word_shift(total, _const(c - 32, "int32"), lambda v: R.astype(v, "int32"), R.right_shift,
                               _const(32, "int64"))
    else:
        return None
    clipped = R.clip(high, relax.prim_value(a["qmin"]), relax.prim_value(a["qmax"]))
    return R.astype(clipped, ctx.storage(a["qmin"], a["qmax"]))


def _concat(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    dtypes = {str(x.ty.dtype) for x in ins}
    common = dtypes.pop() if len(dtypes) == 1 else "int32"
    return R.concat([x if str(x.ty.dtype) == common else R.astype(x, common) for x in ins],
                    axis=ctx.internal_axis(op.attrs.get("axis", 1), _ndim(ins[0])))


def _clip(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm import relax
    from tvm.relax import op as R

    y = R.clip(ins[0], relax.prim_value(op.attrs["qmin"]), relax.prim_value(op.attrs["qmax"]))
    return R.astype(y, ctx.storage(op.attrs["qmin"], op.attrs["qmax"]))


def _maxpool(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    a = op.attrs
    size = [ins[0].ty.shape[axis] for axis in ctx.spatial_axes(4)]
    return R.nn.max_pool2d(ins[0], pool_size=a["kernel"], strides=a["stride"], padding=pool_padding(a, size),
                           layout=ctx.layout)


def _window_sum(ctx: Context, x: Any, kernel: list[int], stride: list[int], padding: list[int]) -> Any:
    from tvm.relax import op as R

    channels = int(x.ty.shape[ctx.channel_axis(4)])
    wide = str(x.ty.dtype) == "int32"  # an int32 tensor (a fine grid) sums in int64
    x = R.astype(x, "int64") if wide else x
    ones = _const(np.ones((channels, 1, *kernel)), "int64" if wide else str(x.ty.dtype))
    return R.nn.conv2d(x, ones, strides=stride, padding=padding, groups=channels, data_layout=ctx.layout,
                       kernel_layout="OIHW", out_dtype="int64" if wide else "int32")


def _window_sum_ops(ctx: Context, x: Any, op: IntOp, rescale: tuple[Any, Any, int, int, int]) -> tuple[IntOp, IntOp]:
    """An average pool of one divisor as a depthwise conv with a ones kernel (padding with the input zero
    point) and the requantize of its ``rescale`` (:func:`~hawqc.reference.graph.pool_rescale`: the
    multiplier as ``b``, the tie window as an attribute): what the target's depthwise kernel computes."""
    a, (m, c, offset, zp, tie) = op.attrs, rescale
    channels = int(x.ty.shape[ctx.channel_axis(4)])
    conv = IntOp("conv2d", op.inputs, f"{op.output}:sum",
                 {"stride": a["stride"], "padding": a["padding"], "dilation": [1, 1], "groups": channels,
                  "pad_value": a.get("input_zero_point", 0)},
                 {"weight": np.ones((channels, 1, *a["kernel"]), np.int8)})
    requant = IntOp("requantize", [conv.output], op.output,
                    {"qmin": a["qmin"], "qmax": a["qmax"], "input_zero_point": offset, "zero_point": zp,
                     **({"tie_window": tie} if tie else {})},
                    {"b": np.asarray(m), "c": np.asarray(c)})
    return conv, requant


def _avgpool(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    a = op.attrs
    m, c, offset, zp, tie = pool_rescale(a, op.consts, a["kernel"][0] * a["kernel"][1])
    if np.ndim(m) == 2:  # a divisor per output position: broadcast over N and C
        m = np.reshape(m, (1, *np.shape(m), 1) if ctx.layout == "NHWC" else (1, 1, *np.shape(m)))
    elif ctx.kernels is not None and str(ins[0].ty.dtype) != "int32":
        conv, requant = _window_sum_ops(ctx, ins[0], op, (m, c, offset, zp, tie))
        if (expr := ctx.kernels(ctx, ins[0], conv, requant)) is not None:
            return expr
    x, padding = _padded(ctx, ins[0], a["padding"], a.get("input_zero_point", 0))
    sums = ctx.bb.emit(_window_sum(ctx, x, a["kernel"], a["stride"], padding))
    return _requantize(ctx, sums, np.asarray(m), np.asarray(c), a["qmin"], a["qmax"], offset, zp, tie_window=tie)


def _global_avgpool(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    axes = ctx.spatial_axes(4)
    m, c, offset, zp, tie = pool_rescale(op.attrs, op.consts,
                                         int(ins[0].ty.shape[axes[0]]) * int(ins[0].ty.shape[axes[1]]))
    wide = "int64" if str(ins[0].ty.dtype) == "int32" else "int32"  # an int32 tensor (a fine grid) sums in int64
    sums = ctx.bb.emit(R.sum(R.astype(ins[0], wide), axis=axes, keepdims=True))
    return _requantize(ctx, sums, np.asarray(m), np.asarray(c), op.attrs["qmin"], op.attrs["qmax"], offset, zp,
                       tie_window=tie)


def _lut(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    table, offset = op.consts["table"], op.attrs["offset"]
    out_dtype = ctx.storage(int(table.min()), int(table.max()))
    if ctx.lookup is not None and (expr := ctx.lookup(ctx, ins[0], table, offset, out_dtype)) is not None:
        return expr
    index = R.subtract(R.astype(ins[0], "int32"), _const(offset, "int32"))
    return R.take(_const(table, out_dtype), index, axis=0, mode="clip")


def _threshold(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    """:func:`hawqc.quant.thresholds.count_thresholds` on Relax expressions: per step one ``take`` from the
    channel's row of the flat table and one compare. The indices stay in their row by construction; ``clip``
    mode states that without TVM's "fast mode" warning, one per take at every build."""
    from tvm.relax import op as R

    from hawqc.quant.thresholds import CountOps, count_thresholds

    base, up, down = (op.consts[k] for k in ("base", "up", "down"))
    ndim = _ndim(ins[0])
    rows = np.arange(base.shape[0], dtype=np.int32)
    ops = CountOps(take=lambda table, index: R.take(table, index, axis=0, mode="clip"), greater=R.greater,
                   less=R.less, crossed=lambda cond, step: R.multiply(R.astype(cond, "int32"), _const(step, "int32")),
                   add=R.add, subtract=R.subtract)
    tables = [(_const(t.ravel(), "int32"), _channel(ctx, rows * t.shape[1], ndim, "int32"), t.shape[1])
              for t in (up, down)]
    counted = count_thresholds(R.astype(ins[0], "int32"), _channel(ctx, base, ndim, "int32"), *tables, ops=ops)
    return R.astype(counted, ctx.storage(op.attrs["qmin"], op.attrs["qmax"]))


def _mul(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    a, b = (R.astype(x, "int64") for x in ins)
    if op.attrs.get("a_zero_point", 0):
        a = R.subtract(a, _const(op.attrs["a_zero_point"], "int64"))
    if op.attrs.get("b_zero_point", 0):
        b = R.subtract(b, _const(op.attrs["b_zero_point"], "int64"))
    product = ctx.bb.emit(R.multiply(a, b))
    return _requantize(ctx, product, op.consts["b"], op.consts["c"], op.attrs["qmin"], op.attrs["qmax"], 0,
                       op.attrs.get("zero_point", 0))


def _pad(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    return _pad_expr(ctx, ins[0], op.attrs["pads"], op.attrs.get("pad_value", 0))


def _flatten(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    x = ins[0]
    if sum(int(d) > 1 for d in list(x.ty.shape)[1:]) > 1:  # the element order depends on the layout
        x = ctx.bb.emit(ctx.to_external(x))
    return R.reshape(x, [x.ty.shape[0], int(np.prod([int(d) for d in list(x.ty.shape)[1:]]))])


def _reshape(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    x = ctx.bb.emit(ctx.to_external(ins[0]))
    shape = list(op.attrs["shape"])
    if not is_static(x.ty.shape[0]):  # an open batch stays open where the reshape keeps it: [-1 | 0, rest]
        rest = int(np.prod([int(d) for d in list(x.ty.shape)[1:]]))
        if shape[0] not in (-1, 0) or -1 in shape[1:] or int(np.prod(shape[1:])) != rest:
            raise FixedBatch(f"reshape {op.output} to {shape} does not keep the batch dimension")
        shape = [x.ty.shape[0], *shape[1:]]
    return ctx.to_internal(ctx.bb.emit(R.reshape(x, shape)))


def _transpose(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    y = ctx.bb.emit(R.permute_dims(ctx.bb.emit(ctx.to_external(ins[0])), op.attrs["perm"]))
    return ctx.to_internal(y)


def _slice(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    a, ndim = op.attrs, _ndim(ins[0])
    axes = [ctx.internal_axis(i, ndim) for i in a.get("axes", range(ndim))]
    return R.strided_slice(ins[0], axes, a["begin"], a["end"], a["strides"], assume_inbound=True)


def _affine(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    from tvm.relax import op as R

    ndim = _ndim(ins[0])
    x = R.astype(ins[0], "int32")
    if op.attrs.get("input_zero_point", 0):
        x = R.subtract(x, _const(op.attrs["input_zero_point"], "int32"))
    return R.add(R.multiply(x, _channel(ctx, op.consts["multiplier"], ndim, "int32")),
                 _channel(ctx, op.consts["bias"], ndim, "int32"))


def _resize(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    """Separable: rows, then columns; each a gather per tap, weighted and summed in int32 (linear)."""
    from tvm.relax import op as R

    x = ins[0]
    if "wy" in op.consts:
        x = R.astype(x, "int32")
        if op.attrs.get("input_zero_point", 0):
            x = R.subtract(x, _const(op.attrs["input_zero_point"], "int32"))
        x = ctx.bb.emit(x)
    return _taps(ctx, x, op.consts, ctx.spatial_axes(4))


def _taps(ctx: Context, x: Any, consts: Mapping[str, np.ndarray], axes: tuple[int, int]) -> Any:
    """``x`` resized along ``axes`` (H, W) by the taps of :mod:`hawqc.quant.resize`: per axis a gather per
    tap (``iy``, ``ix``), weighted (``wy``, ``wx`` in ``x``'s dtype, for linear) and summed."""
    from tvm.relax import op as R

    dtype = str(x.ty.dtype)
    for axis, name in zip(axes, "yx"):
        index, weights, total = consts[f"i{name}"], consts.get(f"w{name}"), None
        for k, idx in enumerate(index):
            tap = R.take(x, _const(idx, "int32"), axis=axis, mode="clip")
            if weights is not None:
                shape = [1, 1, 1, 1]
                shape[axis] = -1
                tap = R.multiply(tap, _const(weights[k].reshape(shape), dtype))
            total = tap if total is None else R.add(total, tap)
        x = ctx.bb.emit(total)
    return x


def _float_op(ctx: Context, ins: list[Any], op: IntOp) -> Any:
    """One ONNX operator in float32, computed in NCHW (its operands transposed out of and back into the
    module's layout)."""
    from tvm.relax import op as R

    from hawqc.reference.float_kernels import node_inputs

    a, kind = op.attrs["onnx_attrs"], op.attrs["onnx_op"]
    consts = {k: _const(v, str(v.dtype)) for k, v in op.consts.items() if k.startswith("input")}
    x, *rest = node_inputs([ctx.bb.emit(ctx.to_external(i)) for i in ins], op.attrs, consts)
    if kind == "Conv":
        pads = a.get("pads", [0, 0, 0, 0])
        y = R.nn.conv2d(x, rest[0], strides=a.get("strides", [1, 1]), padding=[pads[0], pads[1], pads[2], pads[3]],
                        dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
        y = R.add(y, R.reshape(rest[1], [1, -1, 1, 1])) if len(rest) > 1 else y
    elif kind in ("Gemm", "MatMul"):
        w = R.permute_dims(rest[0]) if a.get("transB", 0) else rest[0]
        y = R.multiply(R.matmul(x, w), _const(a.get("alpha", 1.0), str(x.ty.dtype)))
        y = R.add(y, R.multiply(rest[1], _const(a.get("beta", 1.0), str(x.ty.dtype)))) if len(rest) > 1 else y
    elif kind in ("Mul", "Add", "Sub", "Div"):
        y = {"Mul": R.multiply, "Add": R.add, "Sub": R.subtract, "Div": R.divide}[kind](x, rest[0])
    elif kind in ("GlobalAveragePool", "ReduceMean"):
        axes = [int(v) for v in (a.get("axes") or (rest[0].data.numpy() if rest else [2, 3]))]
        y = R.mean(x, axis=axes, keepdims=bool(a.get("keepdims", 1)))
    elif kind == "Flatten":
        y = R.reshape(x, [int(np.prod([int(d) for d in list(x.ty.shape)[:a.get("axis", 1)]])), -1])
    elif kind == "Softmax":
        y = R.nn.softmax(x, axis=a.get("axis", -1))
    elif kind == "ArgMax":
        y = R.argmax(x, axis=a.get("axis", 0), keepdims=bool(a.get("keepdims", 1)))
    elif kind == "Resize":
        y = _taps(ctx, x, op.consts, (2, 3))
    else:  # element-wise
        y = _float_elementwise(x, kind, a, rest)
    if op.attrs.get("float32_output") and "float" in str(ctx.bb.normalize(y).ty.dtype):
        y = R.astype(y, "float32")
    return ctx.to_internal(ctx.bb.emit(y))


def _float_elementwise(x: Any, kind: str, a: Mapping[str, Any], rest: list[Any]) -> Any:
    from tvm import relax
    from tvm.relax import op as R

    def clip(v: Any, lo: float, hi: float) -> Any:
        return R.clip(v, relax.prim_value(float(lo)), relax.prim_value(float(hi)))

    if kind == "Relu":
        return R.nn.relu(x)
    if kind == "Clip":
        bounds = [float(r.data.numpy()) for r in rest] + [-np.inf, np.inf][len(rest):]
        return clip(x, *bounds)
    if kind == "Sigmoid":
        return R.sigmoid(x)
    if kind == "Tanh":
        return R.tanh(x)
    dtype = str(x.ty.dtype)
    gate = clip(R.add(R.multiply(x, _const(a.get("alpha", 0.2 if kind == "HardSigmoid" else 1 / 6), dtype)),
                      _const(a.get("beta", 0.5), dtype)), 0, 1)
    return gate if kind == "HardSigmoid" else R.multiply(x, gate)  # HardSwish


_LOWERINGS: Mapping[str, Callable[[Any, list[Any], IntOp], Any]] = {
    "quantize": _quantize, "conv2d": _conv2d, "dense": _dense, "requantize": _requantize_op, "add": _add,
    "concat": _concat, "clip": _clip, "maxpool": _maxpool, "avgpool": _avgpool,
    "global_avgpool": _global_avgpool, "lut": _lut, "threshold": _threshold, "mul": _mul, "pad": _pad,
    "flatten": _flatten, "reshape": _reshape, "transpose": _transpose, "slice": _slice, "affine": _affine, "resize": _resize, "float_op": _float_op,
    "dequantize": _dequantize}
