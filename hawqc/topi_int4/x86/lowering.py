"""hawqc's x86 conv/dense lowering: each layer (with the requantize after it) becomes one call to
the scheduled kernel of :mod:`.conv2d`, its weights packed and its bias compensated at compile time.

Plugged into :func:`hawqc.frontend.integer_graph.to_relax` as its ``kernels`` (NHWC layout).
Depthwise convolutions run the kernel of :mod:`.depthwise`, other grouped ones the conv kernel with
block-diagonal weights; int32 inputs keep the generic lowering.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.frontend.integer_graph import Context, add_in_int32, is_static
from hawqc.quant.dyadic import high_word_form, rounding_bias
from hawqc.reference.graph import IntOp
from hawqc.topi_int4.x86 import amx, depthwise, lookup, quantize
from hawqc.topi_int4.x86.conv2d import (
    AddStage,
    Conv2dWorkload,
    Requant,
    conv2d,
    conv2d_amx,
    offset_of,
    pack_weight,
    runs_on_amx,
)
from hawqc.topi_int4.x86.intrin import LANES


@dataclass(frozen=True)
class X86Kernels:
    """Conv/dense kernels for x86: ``vnni`` picks ``vpdpbusd``, else plain 16-lane vector code (AVX2).
    With ``packed_int4`` (VNNI only), layers whose weights fit in 4 bits keep them two per byte; with ``amx``
    (VNNI too), the layers :func:`.conv2d.runs_on_amx` takes run on AMX tiles."""

    vnni: bool
    packed_int4: bool = False
    amx: bool = False

    def __call__(self, ctx: Context, x: Any, op: IntOp, requant: IntOp | None, residual: Any = None,
                 clip: IntOp | None = None, then: IntOp | None = None) -> Any:
        from tvm import relax
        from tvm.relax import op as R

        dtype = str(x.ty.dtype)
        if ctx.layout != "NHWC" or dtype not in ("int8", "uint8") or (residual is not None and op.op != "conv2d"):
            return None
        batch = x.ty.shape[0]
        shape = [int(batch) if is_static(batch) else None, *(int(d) for d in list(x.ty.shape)[1:])]
        if op.op == "dense":  # a 1x1 conv over a row of the batch's samples (one over each, for an open batch)
            weight = op.consts["weight"][:, :, None, None]
            samples = shape[0] or 1
            x = ctx.bb.emit(R.reshape(x, [batch, 1, 1, shape[1]] if shape[0] is None else [1, 1, batch, shape[1]]))
            wl = Conv2dWorkload(None if shape[0] is None else 1, 1, samples, shape[1], weight.shape[0], (1, 1), (1, 1),
                                (0, 0, 0, 0), (1, 1), dtype)
        else:
            a, weight = op.attrs, op.consts["weight"]
            wl = Conv2dWorkload(*shape, weight.shape[0], tuple(weight.shape[2:]), tuple(a["stride"]),
                                tuple(a["padding"]), tuple(a["dilation"]), dtype, a.get("pad_value", 0),
                                groups=a.get("groups", 1))
        if self.vnni and self.packed_int4 and -8 <= weight.min() and weight.max() <= 7:
            wl = dataclasses.replace(wl, weight_bits=4)
        if self.amx and runs_on_amx(wl):
            wl = dataclasses.replace(wl, channel_align=amx.CHUNK)
        oh, ow = wl.out_size
        if residual is not None and (depthwise.is_depthwise(wl) or str(residual.ty.dtype) not in ("int8", "uint8", "int32")
                                     or list(residual.ty.shape)[1:] != [oh, ow, wl.out_channels]):
            return None
        pointwise = op.op == "conv2d" and wl.kernel == wl.stride == (1, 1) and not any(wl.padding)
        regrid = wl.channel_align == amx.CHUNK and pointwise and wl.batch is not None and amx.Tiling(ow).efficiency < 0.5
        if regrid:
            # all the batch's pixels in rows of the width that fills the tiles best (7x7 maps, tiles of 4 pixels:
            # rows of 56 at batch 8, 49 at batch 1; ResNet-50's batch 8 layers 2.3x faster), where the tiles would
            # be less than half full (14x14 maps' tiles of 7: rows of 32 ran 1.4x slower, their 64 KB of inputs
            # and weights a step outgrowing the first-level cache)
            rows, width = amx.pixel_grid(wl.batch * oh * ow)
            x = ctx.bb.emit(R.reshape(x, [1, rows, width, wl.in_channels]))
            if residual is not None:
                residual = ctx.bb.emit(R.reshape(residual, [1, rows, width, wl.out_channels]))
            wl = dataclasses.replace(wl, batch=1, height=rows, width=width)
        consts, high_word = _constants(wl, weight, op, requant, self.vnni, clip)
        if then is not None:  # only on whole 16-channel vectors: elsewhere measured no faster than the Add alone
            epilogue = _requant(ctx, requant, high_word)
            if wl.out_channels % LANES or (stage := _add_stage(ctx, requant, then, residual)) is None:
                return None
            epilogue = dataclasses.replace(epilogue, then=stage)
        else:
            epilogue = _requant(ctx, requant, high_word, residual, clip)
        if depthwise.is_depthwise(wl):
            func, name = depthwise.depthwise(wl, epilogue, self.vnni), "depthwise_conv2d"
        elif wl.channel_align == amx.CHUNK:
            func, name = conv2d_amx(wl, epilogue), f"{op.op}_amx"
        else:
            isa = ("vnni_w4" if wl.weight_bits == 4 else "vnni") if self.vnni else "avx2"
            func, name = conv2d(wl, epilogue, self.vnni), f"{op.op}_{isa}"
        name += ("_requant_add" if residual is not None else "_requant") if requant else ""
        gv = ctx.bb.add_func(func, name)
        out = relax.TensorType((x.ty.shape[0], *wl.out_size, wl.out_channels), epilogue.out_dtype if epilogue else "int32")
        y = R.call_tir(gv, [x, *consts, *([] if residual is None else [residual])], out)
        if op.op == "dense":
            y = R.reshape(ctx.bb.emit(y), [batch, wl.out_channels])
        elif regrid:
            y = R.reshape(ctx.bb.emit(y), [batch, oh, ow, wl.out_channels])
        return y


def table_lookup(ctx: Context, x: Any, table: np.ndarray, offset: int, out_dtype: str) -> Any:
    """``table[x - offset]`` for an 8-bit ``x`` with the VBMI kernel of :mod:`.lookup` (the tensor read
    flat), or None for wider inputs. For targets with AVX-512 VBMI."""
    from tvm import relax
    from tvm.relax import op as R

    dtype = str(x.ty.dtype)
    if dtype not in ("int8", "uint8") or out_dtype not in ("int8", "uint8"):
        return None
    shape = list(x.ty.shape)
    gv = ctx.bb.add_func(lookup.byte_lookup(dtype, out_dtype), "byte_lookup")
    flat = ctx.bb.emit(R.reshape(x, [math.prod(shape)]))
    full = relax.const(lookup.byte_table(table, offset, dtype).astype(out_dtype), out_dtype)
    out = ctx.bb.emit(R.call_tir(gv, [flat, full], relax.TensorType(flat.ty.shape, out_dtype)))
    return R.reshape(out, shape)


def input_quantize(ctx: Context, x: Any, scale: float, zero_point: int, qmin: int, qmax: int, out_dtype: str) -> Any:
    """The NCHW float32 input quantized into NHWC by the kernel of :mod:`.quantize` (both tensors read flat),
    or None where it is not an image of at most :data:`.quantize.MAX_CHANNELS` channels."""
    from tvm import relax
    from tvm.relax import op as R

    shape = list(x.ty.shape)
    if (ctx.layout != "NHWC" or str(x.ty.dtype) != "float32" or len(shape) != 4
            or not all(is_static(d) for d in shape[1:]) or int(shape[1]) > quantize.MAX_CHANNELS):
        return None
    n, c, h, w = shape[0], *(int(d) for d in shape[1:])
    gv = ctx.bb.add_func(quantize.quantize_nhwc(c, h, w, scale, zero_point, qmin, qmax, out_dtype), quantize.NAME)
    flat = ctx.bb.emit(R.reshape(x, [n * c * h * w]))
    out = ctx.bb.emit(R.call_tir(gv, [flat], relax.TensorType(flat.ty.shape, out_dtype)))
    return R.reshape(out, [n, h, w, c])


def _requant(ctx: Context, op: IntOp | None, high_word: bool, residual: Any = None,
             clip: IntOp | None = None) -> Requant | None:
    if op is None:
        return None
    a = op.attrs
    return Requant(a["qmin"], a["qmax"], a.get("zero_point", 0), ctx.storage(a["qmin"], a["qmax"]), high_word,
                   a.get("tie_window", 0), None if residual is None else str(residual.ty.dtype),
                   None if clip is None else (clip.attrs["qmin"], clip.attrs["qmax"]))


def _add_stage(ctx: Context, requant: IntOp, add: IntOp, residual: Any) -> AddStage | None:
    """The Add of the requantized output and ``residual`` in int32 (:func:`hawqc.frontend.integer_graph.add_in_int32`,
    as it runs alone), or None where it has no int32 form."""
    mine = add.inputs.index(requant.output)
    dtypes = [ctx.storage(requant.attrs["qmin"], requant.attrs["qmax"]), str(residual.ty.dtype)]
    if (form := add_in_int32(add, dtypes if mine == 0 else dtypes[::-1])) is None:
        return None
    a = add.attrs
    return AddStage(form.multipliers[mine], form.multipliers[1 - mine], form.d, form.shift, a["qmin"], a["qmax"],
                    ctx.storage(a["qmin"], a["qmax"]), dtypes[1])


def _constants(wl: Conv2dWorkload, weight: np.ndarray, op: IntOp, requant: IntOp | None,
               vnni: bool, clip: IntOp | None = None) -> tuple[list[Any], bool]:
    """Packed weights, the bias with the VNNI activation offset (and input zero point of the requantize)
    folded in (with a requantize: times ``b``, plus its offset), then per-channel ``b``, ``2^(c-1) - 1`` (the
    rounding bias) and ``c``, all padded to whole 16-channel blocks; or, where the accumulator's range
    allows (:func:`hawqc.quant.dyadic.high_word_form`) and ``b < 2^31``, ``d``, ``b`` and ``s`` of the cheaper
    form, which the second value says. For an aligned Add (``requant`` an ``add`` reading the layer's output): ``b`` is
    the layer's multiplier, the bias also holds the Add's offset and the other input's zero point times its
    multiplier, and that multiplier follows ``c``; with a ``clip`` of the layer's output, the bias holds
    only those and the layer's own bias (int32) comes last."""
    from tvm import relax

    oc, ocp = wl.out_channels, wl.packed_out

    def padded(values: Any, fill: int = 0, dtype: str = "int64") -> Any:
        v = np.broadcast_to(np.asarray(values, dtype=np.int64), (oc,))
        return relax.const(np.concatenate([v, np.full(ocp - oc, fill, np.int64)]).astype(dtype), dtype)

    bias = np.asarray(op.consts.get("bias", 0), dtype=np.int64)
    if depthwise.is_depthwise(wl):
        packed = depthwise.pack_weight(weight, depthwise.uses_dot(wl, vnni))
        offset, consts = 0, [relax.const(packed, str(packed.dtype))]
    else:
        offset = offset_of(wl.in_dtype, vnni)
        bias = bias - offset * weight.astype(np.int64).sum(axis=(1, 2, 3))
        consts = [relax.const(pack_weight(weight, vnni, wl.weight_bits, wl.groups, wl.channel_align), "int8")]
    if requant is None:
        return [*consts, padded(bias)], False
    if requant.op == "add":
        mine = requant.inputs.index(op.output if clip is None else clip.output)
        other, zero_points = 1 - mine, requant.attrs.get("input_zero_points", [0, 0])
        b, m = (np.asarray(requant.consts["m"][i], dtype=np.int64) for i in (mine, other))
        c, tie = np.asarray(requant.consts["c"], dtype=np.int64), requant.attrs.get("tie_window", 0)
        rest = np.asarray(requant.consts.get("offset", 0), np.int64) - zero_points[mine] * b - zero_points[other] * m
        tail = [padded(rounding_bias(c, tie)), padded(c, 1), padded(m)]
        if clip is None:
            return [*consts, padded(bias * b + rest), padded(b, 1), *tail], False
        if np.abs(bias).max(initial=0) >= 2**31:
            raise ValueError("a conv bias beyond int32")
        return [*consts, padded(rest), padded(b, 1), *tail, padded(bias, 0, "int32")], False
    b, c = (np.asarray(requant.consts[k], dtype=np.int64) for k in ("b", "c"))
    bias = (bias - requant.attrs.get("input_zero_point", 0)) * b + np.asarray(requant.consts.get("offset", 0), np.int64)
    tie = requant.attrs.get("tie_window", 0)
    # the form's intrinsic multiplies 32-bit lanes (vpmuldq): an average pool's multiplier may reach 2^32
    cheaper = None if tie or np.max(b) >= 2**31 else high_word_form(
        np.broadcast_to(b, (oc,)), np.broadcast_to(c, (oc,)), np.broadcast_to(bias, (oc,)),
        requant.attrs.get("zero_point", 0), *_accumulator_range(weight, wl.in_dtype, offset))
    if cheaper is not None:
        d, s = cheaper
        return [*consts, padded(d), padded(b, 1), padded(s, 0, "int32")], True
    return [*consts, padded(bias), padded(b, 1), padded(rounding_bias(c, tie)), padded(c, 1)], False


def _accumulator_range(weight: np.ndarray, in_dtype: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the least and greatest accumulator of the kernel: every input (its storage
    type's range plus ``offset``) against the OIHW ``weight``."""
    info = np.iinfo(in_dtype)
    w = weight.astype(np.int64).reshape(weight.shape[0], -1)
    low, high = int(info.min) + offset, int(info.max) + offset
    ends = np.stack([w * low, w * high])
    return ends.min(axis=0).sum(axis=1), ends.max(axis=0).sum(axis=1)
