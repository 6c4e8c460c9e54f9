"""int8 activations stored 128 higher, as uint8: what VNNI's ``vpdpbusd`` reads without a copy.

A conv kernel on an int8 input first copies it with 128 added (``vpdpbusd`` multiplies unsigned bytes);
where the conv needs no padded copy (a 1x1 layer) that copy is a whole extra pass over its input. ONNX
Runtime's default QDQ files quantize activations to int8 (a zero point of -128 after a ReLU), so every
such layer paid it. :func:`unsigned_activations` rewrites the integer graph so that such a tensor is
produced 128 higher instead: its producers' clip bounds and zero point move up by 128, its readers'
input zero points too, and a conv or dense reading it carries ``-128 * sum(w)`` more in its bias (and pads
with its zero point, now 128 higher). Every value a reader computes is unchanged, so the module stays
bit-exact against the reference of the original graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from hawqc.quant.dyadic import int32_sum_form
from hawqc.reference.graph import IntegerGraph, IntOp

SHIFT = 128
PRODUCERS = {"requantize", "add", "quantize", "mul", "avgpool", "global_avgpool"}
"""Ops whose output moves up with their clip bounds and zero point."""
PASS_THROUGH = {"maxpool", "pad"}
"""Ops that commute with the shift (a pad's value moves with it): their output moves with their input."""
TIED = PASS_THROUGH | {"concat"}
"""Ops whose output moves with their inputs, all of them or none (a concat's)."""
READERS = {"conv2d", "dense", "requantize", "dequantize", "add", "avgpool", "global_avgpool"}
"""Ops that read such a tensor through an input zero point (conv2d and dense: through their bias; a pool
rescales its window sums minus the zero point's, which the move leaves as they were)."""


def unsigned_activations(graph: IntegerGraph, keep: Iterable[str] = ()) -> IntegerGraph:
    """The same graph with int8 activations (clip bounds within [-128, 127], some below 0) stored 128 higher
    where that is exact and saves a copy: a group of tensors that move together (:data:`TIED` ops tie their
    output to their inputs) moves when every tensor of it that a non-tied op writes is written by one of
    :data:`PRODUCERS`, a conv or dense layer reads it, and only :data:`READERS` do. The graph's output and
    the tensors in ``keep`` (outputs the caller reads) stay as they are."""
    keep = {graph.output, *keep}
    readers: dict[str, list[IntOp]] = {}
    for op in graph.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    writer = {op.output: op for op in graph.ops}
    shifted: set[str] = set()
    for group in _tied_groups(graph):
        sources = [writer.get(name) for name in group if name not in writer or writer[name].op not in TIED]
        if keep & group or not all(op is not None and op.op in PRODUCERS and _is_int8(op) for op in sources):
            continue
        reads = [r for name in group for r in readers.get(name, []) if r.op not in TIED]
        after = shifted | group
        if (any(r.op in ("conv2d", "dense") for r in reads) and all(r.op in READERS and _fits(r, after) for r in reads)
                and all(_fits(op, after) for op in sources)):
            shifted |= group
    ops = [_shifted(op, shifted) for op in graph.ops]
    return dataclasses.replace(graph, ops=ops)


def _tied_groups(graph: IntegerGraph) -> list[set[str]]:
    """The tensors :data:`TIED` ops join (each op output alone otherwise), in the order they are first written."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for op in graph.ops:
        root(op.output)
        if op.op in TIED:
            for name in op.inputs:
                parent[root(name)] = root(op.output)
    groups: dict[str, set[str]] = {}
    for op in graph.ops:
        for name in (op.output, *op.inputs):
            groups.setdefault(root(name), set()).add(name)
    return list(groups.values())


def _is_int8(op: IntOp) -> bool:
    return op.attrs.get("qmin", 0) < 0 and -SHIFT <= op.attrs.get("qmin", 0) and op.attrs.get("qmax", 0) < SHIFT


def _fits(op: IntOp, shifted: set[str]) -> bool:
    """Whether ``op`` still computes exactly in its integer types with the tensors in ``shifted`` (inputs or
    output) 128 higher: a conv's bias in int32; an Add of different scales in int32
    (:func:`hawqc.quant.dyadic.int32_sum_form`, as the x86 lowering computes it) or with its int64 terms
    ``(|x| + |zero point|) * m`` in range."""
    if op.op in ("conv2d", "dense"):
        return bool(np.all(np.abs(_moved_bias(op)) < 2**31))
    if op.op != "add":
        return True
    if "m" not in op.consts:
        return False
    moved = [name in shifted for name in op.inputs]
    zero_points = [z + SHIFT * m for z, m in zip(op.attrs.get("input_zero_points", [0] * len(op.inputs)), moved)]
    ranges = [(0, 2 * SHIFT - 1) if m else (-SHIFT, SHIFT - 1) for m in moved]
    m, c, a = op.consts["m"], int(op.consts["c"]), op.attrs
    up = SHIFT if op.output in shifted else 0
    if "input_bounds" in a:  # accumulator inputs: their own bounds, 2 * 128 more for a moved one
        reach = sum((bound + 2 * SHIFT * moving) * int(np.abs(v).max())
                    for bound, moving, v in zip(a["input_bounds"], moved, m))
        return reach + int(np.abs(op.consts.get("offset", 0)).max(initial=0)) + (1 << c) < 2**63
    if m.ndim == 1 and int32_sum_form([int(v) for v in m], zero_points, c, a.get("zero_point", 0) + up, ranges,
                                      a["qmin"] + up, a["qmax"] + up, a.get("tie_window", 0)) is not None:
        return True
    reach = sum((max(abs(lo - z), abs(hi - z)) + abs(z)) * int(np.abs(v).max())
                for (lo, hi), z, v in zip(ranges, zero_points, m))
    return reach + (1 << c) < 2**63


def _moved_bias(op: IntOp) -> np.ndarray:
    weight = op.consts["weight"].astype(np.int64)
    bias = np.asarray(op.consts.get("bias", 0), dtype=np.int64)
    return bias - SHIFT * weight.reshape(weight.shape[0], -1).sum(axis=1)


def _shifted(op: IntOp, shifted: set[str]) -> IntOp:
    attrs, consts = dict(op.attrs), dict(op.consts)
    if op.output in shifted and op.op not in TIED:
        for key in ("qmin", "qmax", "zero_point"):
            attrs[key] = attrs.get(key, 0) + SHIFT
    moved = [name in shifted for name in op.inputs]
    if any(moved) and op.op not in ("maxpool", "concat"):  # the other tied op, pad, pads with the moved value
        if op.op == "pad":
            attrs["pad_value"] = attrs.get("pad_value", 0) + SHIFT
        elif op.op in ("conv2d", "dense"):
            consts["bias"] = _moved_bias(op).astype(np.int32)
            if op.op == "conv2d":
                attrs["pad_value"] = attrs.get("pad_value", 0) + SHIFT
        elif op.op == "add":
            zero_points = attrs.get("input_zero_points", [0] * len(op.inputs))
            attrs["input_zero_points"] = [z + SHIFT * m for z, m in zip(zero_points, moved)]
        else:  # requantize, the pools, dequantize
            key = "zero_point" if op.op == "dequantize" else "input_zero_point"
            attrs[key] = attrs.get(key, 0) + SHIFT
    return dataclasses.replace(op, attrs=attrs, consts=consts)
