"""The strict checker: float operations left inside an integer-only Relax module.

An integer-only ``main`` may compute in float only on its edges: from the float input up to the
input quantize, and from the output dequantize to the result. This analysis lists every float-typed
binding in between; ``hawqc compile --strict`` fails when the list is not empty.
"""

from __future__ import annotations

from typing import Any


def float_ops(ir: Any) -> list[str]:
    """Float operations of ``main`` strictly between the input quantize and the output dequantize."""
    from tvm import relax

    func = ir["main"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    is_float = {b.var: _is_float(b.var) for b in bindings}
    params = set(func.params)
    uses: dict[Any, list[Any]] = {b.var: [] for b in bindings}
    inputs: dict[Any, list[Any]] = {}
    for b in bindings:
        args = [b.value] if isinstance(b.value, relax.Var) else [
            a for a in getattr(b.value, "args", []) if isinstance(a, relax.Var)]
        inputs[b.var] = args
        for a in args:
            if a in uses:
                uses[a].append(b.var)
    from_input: set[Any] = set()
    for b in bindings:
        if is_float[b.var] and all(a in params or a in from_input for a in inputs[b.var]):
            from_input.add(b.var)
    outputs = {v for v in relax.analysis.free_vars(func.body.body)} | {func.body.body}
    to_output: set[Any] = set()
    for b in reversed(bindings):
        if is_float[b.var] and (b.var in outputs or (uses[b.var] and all(u in to_output for u in uses[b.var]))):
            to_output.add(b.var)
    interior = [b for b in bindings if is_float[b.var] and b.var not in from_input and b.var not in to_output]
    return [f"{b.var} = {b.value.op.name if hasattr(b.value, 'op') else type(b.value).__name__}" for b in interior]


def _is_float(var: Any) -> bool:
    ty = getattr(var, "ty", None)
    return "float" in str(getattr(ty, "dtype", ""))
