"""Replace each int8/int4 conv2d (or dense) + dyadic requantize of ``main`` by one call to hawqc's Tensor
Core kernel, and keep the 4-bit activations those kernels read packed 8 per int32 between layers.

The pattern is the NHWC lowering of :mod:`hawqc.frontend.integer_graph`: ``conv2d`` (constant weights,
groups 1) or ``matmul`` (constant weights: a dense layer, run as a 1x1 conv on ``[N, 1, 1, K]``), an
optional constant bias, ``round_shift(astype(int64) * b [+ offset], c)`` (half to even, as
:func:`hawqc.quant.dyadic.round_shift` writes it), ``clip`` and ``astype``. A dense layer
without requantize (the final fc, read by the output dequantize) keeps TVM's lowering and dlight's
GEMV schedule: it has no requantization to fuse, and at batch ``N`` it is an ``N``-row GEMM that a
64-row Tensor Core tile would mostly waste.

The operand width follows the values: weights from the constant, activations from the ``clip`` that
produced them (through casts and max-pooling); 4-bit operands use the INT4 kernel where the target
has INT4 ``mma`` (or with ``int4="emulated"``), the int8 kernel otherwise. Convs that fit neither (zero
points, wider operands, grouped) keep TVM's lowering. ``tensor_cores=False`` inserts the same kernels
with plain loops in place of ``mma`` (they build for llvm: the whole rewritten graph can be checked on a CPU).

Packing: every 4-bit activation that an INT4 kernel reads is held packed (the layout of
:mod:`hawqc.topi_int4.cuda.conv2d`) instead of int8. A kernel producing it writes it packed from its
epilogue; any other producer (the residual ``add``, max-pooling) gets the packing appended: injective
ops that ``FuseOps`` fuses into an elementwise producer such as the add (after pooling they make a
kernel of their own). INT4 kernels read it as it is; any other reader (the shortcut's requantize,
pooling, an INT8 kernel) reads an unpacked copy, fused into the reader where it is elementwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from hawqc.quant.dyadic import rounding_bias
from hawqc.topi_int4.cuda.conv2d import (
    PACK,
    ConvSpec,
    conv2d_kernel,
    fits_4_bits,
    operand_bits,
    pack_weight,
    packed_channels,
)
from hawqc.topi_int4.cuda.pipeline import int4_tensor_cores

KERNEL_PREFIX = "tensor_core_conv2d_requant"
"""Name prefix of the kernels this pass adds to the module (``requant``: counted as fused by fused_requant)."""
OPAQUE = 8
"""TVM's ``kOpaque`` operator pattern: ``FuseOps`` fuses nothing into the kernels."""


@tvm.transform.module_pass(opt_level=0, name="TensorCoreConv")
class TensorCoreConv:
    """Rewrite conv2d + requantize chains of ``main`` into ``call_tir`` of Tensor Core kernels for ``arch``,
    then pack the 4-bit activations the INT4 kernels read (unless ``pack=False``); ``int4``: ``auto`` or
    ``emulated`` (INT4 kernels on sm_90 too, see :data:`hawqc.topi_int4.cuda.pipeline.INT4`)."""

    def __init__(self, arch: str, tensor_cores: bool = True, pack: bool = True, int4: str = "auto") -> None:
        self.int4, self.tensor_cores, self.pack = int4_tensor_cores(arch, int4), tensor_cores, pack
        self.input, self.weight, self.bias = wildcard(), is_const(), is_const()
        self.multiplier, self.offset, self.rounding, self.shift = is_const(), is_const(), is_const(), is_const()
        self.conv = is_op("relax.nn.conv2d")(self.input, self.weight)
        self.dense = is_op("relax.matmul")(self.input, self.weight)
        product = self.conv | self.dense
        accumulator = product | is_op("relax.add")(product, self.bias)
        product_b = is_op("relax.multiply")(is_op("relax.astype")(accumulator), self.multiplier)
        scaled = product_b | is_op("relax.add")(product_b, self.offset)
        parity = is_op("relax.bitwise_and")(is_op("relax.right_shift")(scaled, self.shift), is_const())
        shifted = is_op("relax.right_shift")(is_op("relax.add")(is_op("relax.add")(scaled, self.rounding), parity),
                                             self.shift)
        self.clip = is_op("relax.clip")(shifted, wildcard(), wildcard())
        self.pattern = is_op("relax.astype")(self.clip)

    def transform_module(self, mod: Any, _ctx: Any) -> Any:
        ranges = _value_ranges(mod["main"])
        bound = {b.value: b.var for block in mod["main"].body.blocks for b in block.bindings}
        builder = relax.BlockBuilder(mod)
        specs: dict[str, ConvSpec] = {}

        def rewrite(expr: Any, matches: dict[Any, Any]) -> Any:
            spec_and_args = self._kernel_call(expr, matches, bound, ranges)
            if spec_and_args is None:
                return expr
            spec, args = spec_and_args
            gv = builder.add_func(self._kernel(spec), f"{KERNEL_PREFIX}_s{spec.bits}")
            specs[gv.name_hint] = spec
            if len(expr.ty.shape) == 4:
                return relax.call_tir(gv, args, out_ty=expr.ty)
            batch = args[0].ty.shape[0]  # a dense layer: [N, K] as [N, 1, 1, K]
            pixels = R.reshape(args[0], relax_shape(spec.input_shape[0], batch))
            out_ty = relax.TensorType(relax_shape(spec.output_shape[0], batch), spec.output_shape[1])
            y = relax.call_tir(gv, [pixels] + args[1:], out_ty=out_ty)
            return R.reshape(y, expr.ty.shape)

        main = relax.analysis.remove_all_unused(rewrite_call(self.pattern, rewrite, mod["main"]))
        result = builder.get()
        result["main"] = main
        return _Packer(result, specs, self._kernel).transform() if self.pack else result

    def _kernel(self, spec: ConvSpec) -> Any:
        kernel = conv2d_kernel(spec, self.tensor_cores).without_attr("global_symbol")
        return kernel.with_attr("op_pattern", OPAQUE)

    def _kernel_call(self, expr: Any, matches: dict[Any, Any], bound: dict[Any, Any],
                     ranges: dict[Any, tuple[int, int]]) -> Any:
        """``(ConvSpec, call_tir arguments)`` for a matched chain, or None where the kernel does not apply.
        The pattern matches the conv's input by its value: ``bound`` gives back the variable."""
        x = bound.get(matches[self.input], matches[self.input])
        weight = matches[self.weight].value.numpy()
        if self.dense in matches:  # [N, K] x [K, O]: a 1x1 conv on [N, 1, 1, K]
            weight = weight.T.reshape(*weight.T.shape, 1, 1)
        out_channels = weight.shape[0]
        multiplier, shift = (_per_channel(matches[p], out_channels) for p in (self.multiplier, self.shift))
        rounding = _per_channel(matches[self.rounding], out_channels)
        if (multiplier is None or shift is None or rounding is None or x not in ranges
                or not np.array_equal(rounding, rounding_bias(shift))):
            return None
        bits = operand_bits((int(weight.min()), int(weight.max())), ranges[x], self.int4)
        geometry = _dense_geometry(x) if self.dense in matches else _conv_geometry(matches[self.conv], x)
        if bits is None or geometry is None:
            return None
        clip = matches[self.clip]
        spec = ConvSpec(*geometry[:4], out_channels, tuple(weight.shape[2:]), *geometry[4:], bits,
                        ranges[x][0] < 0, str(x.ty.dtype), str(expr.ty.dtype), int(clip.args[1].value),
                        int(clip.args[2].value))
        bias = matches[self.bias].value.numpy().reshape(-1) if self.bias in matches else np.zeros(1, np.int64)
        offset = _per_channel(matches[self.offset], out_channels) if self.offset in matches else 0
        if offset is None:
            return None
        scaled_bias = np.broadcast_to(bias, out_channels).astype(np.int64) * multiplier + offset
        constants = [(pack_weight(weight, spec), "int32"), (scaled_bias, "int64"), (multiplier, "int64"),
                     (shift, "int64")]
        return spec, [x] + [relax.const(np.ascontiguousarray(a).astype(dtype), dtype) for a, dtype in constants]


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    """Hold packed (int32 words) every 4-bit NHWC activation an INT4 kernel reads; see the module docstring."""

    def __init__(self, mod: Any, specs: dict[str, ConvSpec], kernel: Any) -> None:
        super().__init__(mod)
        self.mod, self.specs, self.kernel = mod, specs, kernel
        main = mod["main"]
        self.ranges = _value_ranges(main, self._kernel_range)
        readers: dict[Any, list[Any]] = {}
        for block in main.body.blocks:
            for binding in block.bindings:
                for arg in _arguments(binding.value):
                    readers.setdefault(arg, []).append(binding.value)
        self.packed = {var for var, (lo, hi) in self.ranges.items() if var in readers and fits_4_bits(lo, hi)
                       and len(var.ty.shape) == 4 and any(self._int4_reader(r, var) for r in readers[var])}
        self.unpacked_readers = {var for var in self.packed if not all(self._int4_reader(r, var) for r in readers[var])}
        self.words: dict[Any, Any] = {}
        """A packed activation (its int8 variable in the input module) -> its packed variable."""

    def transform(self) -> Any:
        main = relax.analysis.remove_all_unused(self.visit_expr(self.mod["main"]))
        self.builder_.update_func(self.mod.get_global_var("main"), main)
        return relax.transform.DeadCodeElimination(["main"])(self.builder_.get())  # kernels replaced by packed ones

    def visit_var_binding_(self, binding: Any) -> None:
        var, value = binding.var, binding.value
        spec = self._spec(value)
        if spec is not None and (var in self.packed or value.args[1].fields[0] in self.words):
            y = self._packed_call(value, spec, packed_output=var in self.packed)
            if var not in self.packed:
                self.set_var_remap(var, y)
                return
        elif var in self.packed:  # a residual add, a pooling...: packed after it (FuseOps fuses it in)
            super().visit_var_binding_(binding)
            y = self.builder_.emit(pack_activation(self.visit_expr(var)))
        else:
            super().visit_var_binding_(binding)
            return
        self.words[var] = y
        if var in self.unpacked_readers:  # they read an unpacked copy (fused into them where elementwise)
            self.set_var_remap(var, self.builder_.emit(unpack_activation(y, var, self.ranges[var][0] < 0)))

    def _packed_call(self, call: Any, spec: ConvSpec, packed_output: bool) -> Any:
        """The kernel ``call`` re-emitted with its packed variant: packed input where it is INT4."""
        x, *constants = call.args[1].fields
        packed_input = x in self.words
        spec = dataclasses.replace(spec, packed_input=packed_input, packed_output=packed_output)
        gv = self.builder_.add_func(self.kernel(spec), f"{KERNEL_PREFIX}_s{spec.bits}_packed")
        self.specs[gv.name_hint] = spec
        args = [self.words[x] if packed_input else self.visit_expr(x)] + constants
        shape, dtype = spec.output_shape
        out_ty = relax.TensorType(relax_shape(shape, x.ty.shape[0]), dtype)
        return self.builder_.emit(relax.call_tir(gv, args, out_ty=out_ty))

    def _spec(self, value: Any) -> ConvSpec | None:
        """The spec of a call to one of this pass's kernels, else None."""
        if getattr(getattr(value, "op", None), "name", "") != "relax.call_tir":
            return None
        return self.specs.get(value.args[0].name_hint)

    def _kernel_range(self, value: Any) -> tuple[int, int] | None:
        spec = self._spec(value)
        return None if spec is None else (spec.qmin, spec.qmax)

    def _int4_reader(self, value: Any, var: Any) -> bool:
        """Whether ``value`` is an INT4 kernel call whose input is ``var``."""
        spec = self._spec(value)
        return spec is not None and spec.bits == 4 and value.args[1].fields[0].same_as(var)


def relax_shape(shape: tuple[int | None, ...], batch: Any) -> list[Any]:
    """A kernel spec's shape with its open batch (``None``) replaced by the Relax ``batch``."""
    return [batch if d is None else d for d in shape]


def _batch_of(x: Any) -> int | None:
    """The batch of a kernel spec: ``x``'s if it is a number, else None (the kernel takes any batch)."""
    from hawqc.frontend.integer_graph import is_static

    return int(x.ty.shape[0]) if is_static(x.ty.shape[0]) else None


def _arguments(value: Any) -> list[Any]:
    """The variables a binding's value reads (itself, call arguments, also inside tuples)."""
    if isinstance(value, relax.Var):
        return [value]
    args = list(getattr(value, "args", []) or getattr(value, "fields", []))
    flat = [f for a in args for f in (a.fields if isinstance(a, relax.Tuple) else [a])]
    return [a for a in flat if isinstance(a, relax.Var)]


_SHIFTS = np.arange(PACK, dtype=np.int32) * 4
"""Bit offset of each channel of a packed word."""


def pack_activation(x: Any) -> Any:
    """NHWC 4-bit values -> int32 words, ``PACK`` channels per word (padding channels zero)."""
    channels = int(x.ty.shape[3])
    words = packed_channels(channels)
    y = R.bitwise_and(R.astype(x, "int32"), relax.const(15, "int32"))
    if words * PACK != channels:
        y = R.nn.pad(y, [0, 0, 0, 0, 0, 0, 0, words * PACK - channels])
    fields = [R.left_shift(R.strided_slice(y, [3], [e], [words * PACK], [PACK]), relax.const(int(s), "int32"))
              for e, s in enumerate(_SHIFTS)]  # injective ops only: FuseOps fuses them into the producer
    total = fields[0]
    for field in fields[1:]:
        total = R.add(total, field)  # the fields are disjoint: adding is or-ing
    return total


def unpack_activation(words: Any, like: Any, signed: bool) -> Any:
    """int32 words -> the NHWC tensor ``like`` (its shape and dtype), sign- or zero-extending each field."""
    n, (h, w, channels) = like.ty.shape[0], (int(d) for d in list(like.ty.shape)[1:])
    y = R.expand_dims(words, [4])
    if signed:
        y = R.right_shift(R.left_shift(y, relax.const(28 - _SHIFTS)), relax.const(28, "int32"))
    else:
        y = R.bitwise_and(R.right_shift(y, relax.const(_SHIFTS)), relax.const(15, "int32"))
    y = R.reshape(y, [n, h, w, packed_channels(channels) * PACK])
    if packed_channels(channels) * PACK != channels:
        y = R.strided_slice(y, [3], [0], [channels])
    return R.astype(y, str(like.ty.dtype))


def _conv_geometry(conv: Any, x: Any) -> tuple[Any, ...] | None:
    """``(N, C, H, W, stride, padding, dilation)`` of a conv2d the kernel runs (NHWC, groups 1), else None."""
    attrs = conv.attrs
    if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "OIHW"
            or str(attrs.out_dtype) != "int32"):
        return None
    h, w, c = (int(d) for d in list(x.ty.shape)[1:])
    return (_batch_of(x), c, h, w, tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
            tuple(int(d) for d in attrs.dilation))


def _dense_geometry(x: Any) -> tuple[Any, ...] | None:
    """The 1x1 conv geometry of a dense layer on ``[N, K]`` (None for other ranks)."""
    if len(x.ty.shape) != 2:
        return None
    return _batch_of(x), int(x.ty.shape[1]), 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)


def _per_channel(const: Any, channels: int) -> np.ndarray | None:
    """A scalar or per-channel ``(1, 1, 1, C)`` (NHWC) or ``(1, C)`` (dense) constant as int64 ``[C]``;
    None for any other shape."""
    a = const.value.numpy().astype(np.int64)
    if a.size == 1:
        return np.full(channels, a.reshape(()), dtype=np.int64)
    return a.reshape(-1) if a.shape in ((1, 1, 1, channels), (1, channels)) else None


def _value_ranges(func: Any, produced: Any = lambda value: None) -> dict[Any, tuple[int, int]]:
    """Integer bounds of the int8/uint8 tensors of ``func``: set by ``clip`` (or by ``produced(value)``
    where it is not None), kept by casts and max-pooling."""
    ranges = {p: _dtype_range(str(p.ty.dtype)) for p in func.params if str(getattr(p.ty, "dtype", "")) in _NARROW}
    for block in func.body.blocks:
        clips = _clips(block)
        for binding in block.bindings:
            dtype, value = str(getattr(binding.var.ty, "dtype", "")), binding.value
            if dtype not in _NARROW:
                continue
            bounds = _dtype_range(dtype)
            op = getattr(getattr(value, "op", None), "name", "")
            if produced(value) is not None:
                inner = produced(value)
            elif op == "relax.clip":
                inner = clips[binding.var]
            elif op in ("relax.astype", "relax.nn.max_pool2d"):
                inner = ranges.get(value.args[0], clips.get(value.args[0], bounds))
            else:
                inner = bounds
            bounds = (max(inner[0], bounds[0]), min(inner[1], bounds[1]))
            ranges[binding.var] = bounds
    return ranges


_NARROW = ("int8", "uint8")


def _dtype_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _clips(block: Any) -> dict[Any, tuple[int, int]]:
    """The ``clip`` bindings of a block and their integer bounds."""
    return {b.var: (int(b.value.args[1].value), int(b.value.args[2].value)) for b in block.bindings
            if getattr(getattr(b.value, "op", None), "name", "") == "relax.clip"}
