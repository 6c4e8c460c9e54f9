"""Replace each int8/int4 conv2d + dyadic requantize of ``main`` by one call to hawqc's Tensor Core kernel.

The pattern is the lowering of :mod:`hawqc.frontend.integer_graph`: ``conv2d`` (constant weights,
groups 1), an optional constant bias, ``astype(int64) * b + 2^(c-1) >> c``, ``clip`` and ``astype``.
The operand width follows the values: weights from the constant, activations from the ``clip`` that
produced them (through casts and max-pooling); 4-bit operands use the INT4 kernel where the target
has INT4 ``mma``, the int8 kernel otherwise. Convs that fit neither (zero points, wider operands,
grouped) keep TVM's lowering. ``tensor_cores=False`` inserts the same kernels with plain loops in place
of ``mma`` (they build for llvm: the whole rewritten graph can be checked on a CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from hawqc.topi_int4.cuda.conv2d import (
    ConvSpec,
    conv2d_kernel,
    operand_bits,
    pack_weight,
)
from hawqc.topi_int4.cuda.pipeline import int4_tensor_cores

KERNEL_PREFIX = "tensor_core_conv2d_requant"
"""Name prefix of the kernels this pass adds to the module (``requant``: counted as fused by fused_requant)."""
OPAQUE = 8
"""TVM's ``kOpaque`` operator pattern: ``FuseOps`` fuses nothing into the kernels."""


@tvm.transform.module_pass(opt_level=0, name="TensorCoreConv")
class TensorCoreConv:
    """Rewrite conv2d + requantize chains of ``main`` into ``call_tir`` of Tensor Core kernels for ``arch``."""

    def __init__(self, arch: str, tensor_cores: bool = True) -> None:
        self.int4, self.tensor_cores = int4_tensor_cores(arch), tensor_cores
        self.input, self.weight, self.bias = wildcard(), is_const(), is_const()
        self.multiplier, self.rounding, self.shift = is_const(), is_const(), is_const()
        self.conv = is_op("relax.nn.conv2d")(self.input, self.weight)
        accumulator = self.conv | is_op("relax.add")(self.conv, self.bias)
        scaled = is_op("relax.multiply")(is_op("relax.astype")(accumulator), self.multiplier)
        shifted = is_op("relax.right_shift")(is_op("relax.add")(scaled, self.rounding), self.shift)
        self.clip = is_op("relax.clip")(shifted, wildcard(), wildcard())
        self.pattern = is_op("relax.astype")(self.clip)

    def transform_module(self, mod: Any, _ctx: Any) -> Any:
        ranges = _value_ranges(mod["main"])
        bound = {b.value: b.var for block in mod["main"].body.blocks for b in block.bindings}
        builder = relax.BlockBuilder(mod)

        def rewrite(expr: Any, matches: dict[Any, Any]) -> Any:
            spec_and_args = self._kernel_call(expr, matches, bound, ranges)
            if spec_and_args is None:
                return expr
            spec, args = spec_and_args
            kernel = conv2d_kernel(spec, self.tensor_cores).without_attr("global_symbol")
            gv = builder.add_func(kernel.with_attr("op_pattern", OPAQUE), f"{KERNEL_PREFIX}_s{spec.bits}")
            return relax.call_tir(gv, args, out_ty=expr.ty)

        main = relax.analysis.remove_all_unused(rewrite_call(self.pattern, rewrite, mod["main"]))
        result = builder.get()
        result["main"] = main
        return result

    def _kernel_call(self, expr: Any, matches: dict[Any, Any], bound: dict[Any, Any],
                     ranges: dict[Any, tuple[int, int]]) -> Any:
        """``(ConvSpec, call_tir arguments)`` for a matched chain, or None where the kernel does not apply.
        The pattern matches the conv's input by its value: ``bound`` gives back the variable."""
        conv, x = matches[self.conv], bound.get(matches[self.input], matches[self.input])
        attrs = conv.attrs
        weight = matches[self.weight].value.numpy()
        out_channels = weight.shape[0]
        multiplier, shift = (_per_channel(matches[p], out_channels) for p in (self.multiplier, self.shift))
        rounding = _per_channel(matches[self.rounding], out_channels)
        if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                or str(attrs.out_dtype) != "int32"
                or multiplier is None or shift is None or rounding is None
                or not np.array_equal(rounding, np.left_shift(1, shift - 1)) or x not in ranges):
            return None
        bits = operand_bits((int(weight.min()), int(weight.max())), ranges[x], self.int4)
        if bits is None:
            return None
        clip = matches[self.clip]
        n, c, h, w = (int(d) for d in x.ty.shape)
        spec = ConvSpec(n, c, h, w, out_channels, tuple(weight.shape[2:]), tuple(int(s) for s in attrs.strides),
                        tuple(int(p) for p in attrs.padding), tuple(int(d) for d in attrs.dilation), bits,
                        ranges[x][0] < 0, str(x.ty.dtype), str(expr.ty.dtype), int(clip.args[1].value),
                        int(clip.args[2].value))
        bias = matches[self.bias].value.numpy().reshape(-1) if self.bias in matches else np.zeros(1, np.int32)
        constants = [(pack_weight(weight, spec), "int32"), (np.broadcast_to(bias, out_channels), "int32"),
                     (multiplier, "int64"), (shift, "int64")]
        return spec, [x] + [relax.const(np.ascontiguousarray(a).astype(dtype), dtype) for a, dtype in constants]


def _per_channel(const: Any, channels: int) -> np.ndarray | None:
    """A scalar or ``(1, C, 1, 1)`` constant as int64 ``[C]``; None for any other shape."""
    a = const.value.numpy().astype(np.int64)
    if a.size == 1:
        return np.full(channels, a.reshape(()), dtype=np.int64)
    return a.reshape(-1) if a.shape == (1, channels, 1, 1) else None


def _value_ranges(func: Any) -> dict[Any, tuple[int, int]]:
    """Integer bounds of the int8/uint8 tensors of ``func``: set by ``clip``, kept by casts and max-pooling."""
    ranges = {p: _dtype_range(str(p.ty.dtype)) for p in func.params if str(getattr(p.ty, "dtype", "")) in _NARROW}
    for block in func.body.blocks:
        clips = _clips(block)
        for binding in block.bindings:
            dtype, value = str(getattr(binding.var.ty, "dtype", "")), binding.value
            if dtype not in _NARROW:
                continue
            bounds = _dtype_range(dtype)
            op = getattr(getattr(value, "op", None), "name", "")
            if op == "relax.clip":
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
