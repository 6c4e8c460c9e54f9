"""Compiled integer-only modules: build, run, check, save, load.

An artifact folder holds ``model.so`` (the TVM executable), ``graph.int.npz`` (the integer graph it
was compiled from: the reference and every scale) and ``manifest.json`` (shapes, bits, target,
versions). It is written to a temporary folder and renamed into place, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.reference.graph import IntegerGraph

FORMAT_VERSION = 1
LIBRARY, GRAPH, MANIFEST = "model.so", "graph.int.npz", "manifest.json"


class CompiledModule:
    """An integer-only TVM module with float input and output (quantize/dequantize at the edges)."""

    def __init__(self, graph: IntegerGraph, input_shape: tuple[int, ...], target: dict[str, Any],
                 executable: Any, ir: Any = None, input_dtype: str = "float32") -> None:
        import tvm
        from tvm import relax

        self.graph, self.input_shape, self.target = graph, tuple(input_shape), target
        self.input_dtype = input_dtype
        self.ir = ir
        """The integer-only Relax IRModule (before TVM's lowering), when compiled in this process."""
        self.lowered: Any = None
        """The module after TVM's pipeline (its fused kernels are what MetaSchedule tunes), idem."""
        self.fused: tuple[int, int] | None = None
        """(conv/dense kernels with the requantization fused in, all conv/dense kernels)."""
        self._executable = executable
        self._vm = relax.VirtualMachine(executable, tvm.cpu())

    def __call__(self, x: Any) -> np.ndarray:
        import tvm

        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.shape != self.input_shape:
            raise ValueError(f"input has shape {x.shape}, the module was compiled for {self.input_shape}")
        return self._vm["main"](tvm.runtime.tensor(x)).numpy()

    def reference(self, x: Any) -> np.ndarray:
        """The numpy reference executor on the same integer graph."""
        return self.graph.run(np.asarray(x, dtype=np.float32))

    def summary(self) -> list[dict[str, Any]]:
        """One row per conv/dense: name, op, weight shape, weight and input bits."""
        return [{"layer": op.attrs.get("layer", op.output), "op": op.op, "weight": list(op.consts["weight"].shape),
                 "w_bits": op.attrs.get("w_bits"), "a_bits": op.attrs.get("a_bits")}
                for op in self.graph.ops if op.op in ("conv2d", "dense")]

    def export(self, out: str | os.PathLike[str], force: bool = False) -> Path:
        """Write the artifact folder ``out`` (refused if it exists, unless ``force``)."""
        import tvm

        import hawqc

        out = Path(out)
        if out.exists() and not force:
            raise ValueError(f"{out} exists: choose another output folder or pass --force")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            with _native_stderr_silenced():  # TVM logs an empty "Scope Saving" warning per function
                self._executable.export_library(str(tmp / LIBRARY))
            self.graph.save(tmp / GRAPH)
            manifest = {"format_version": FORMAT_VERSION, "input_shape": list(self.input_shape),
                        "target": self.target, "tvm_version": tvm.__version__, "hawqc_version": hawqc.__version__,
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "layers": self.summary(), "metadata": self.graph.metadata}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def compile_graph(graph: IntegerGraph, input_shape: tuple[int, ...], target: dict[str, Any],
                  input_dtype: str = "float32", database: Any = None) -> CompiledModule:
    """Lower ``graph`` to Relax and build it for ``target`` (TVM's default pipeline: fusion included).
    ``input_dtype`` is float32 for models; an integer type for a graph without quantize (one layer).
    ``database``: a MetaSchedule database whose tuned schedules replace those of the kernels it knows."""
    from hawqc.frontend.integer_graph import to_relax
    from hawqc.relax_passes.fused_requant import fused_requant

    if target.get("kind") != "llvm":
        raise ValueError(f"target kind {target.get('kind')!r} is not supported yet: hawqc compiles for llvm (CPU)")
    ir = to_relax(graph, input_shape, input_dtype=input_dtype)
    executable, lowered = _build(ir, target, database)
    module = CompiledModule(graph, input_shape, target, executable, ir, input_dtype)
    module.fused, module.lowered = fused_requant(lowered), lowered
    return module


def _build(ir: Any, target: dict[str, Any], database: Any = None) -> tuple[Any, Any]:
    """TVM's default pipeline (fusion included) run once, then the build: (executable, lowered module)."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        lowered = relax.get_default_pipeline(tvm_target)(ir)
        if database is not None:
            with database:
                lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
    return tvm.compile(lowered, target=tvm_target, relax_pipeline=tvm.transform.Sequential([])), lowered


def load(folder: str | os.PathLike[str]) -> CompiledModule:
    """Load an artifact folder written by :meth:`CompiledModule.export`."""
    import tvm

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: not a hawqc artifact ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: artifact format {manifest.get('format_version')} is not supported")
    with _native_stderr_silenced():
        executable = tvm.runtime.load_module(str(folder / LIBRARY))
    graph = IntegerGraph.load(folder / GRAPH)
    return CompiledModule(graph, tuple(manifest["input_shape"]), manifest["target"], executable)


def first_divergence(graph: IntegerGraph, x: np.ndarray, target: dict[str, Any]) -> tuple[str, int]:
    """The first operation whose compiled output differs from the reference, and its max |diff|."""
    import tvm
    from tvm import relax

    from hawqc.frontend.integer_graph import to_relax
    from hawqc.reference.graph import execute
    from hawqc.reference.kernels import KERNELS

    integer_ops = [op for op in graph.ops if op.op != "dequantize"]
    executable, _ = _build(to_relax(graph, x.shape, [op.output for op in integer_ops]), target)
    compiled = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    reference: dict[str, Any] = {}
    execute(graph, x, KERNELS, trace=reference)
    for op, got in zip(integer_ops, compiled):
        diff = np.abs(got.numpy().astype(np.int64) - reference[op.output].astype(np.int64))
        if diff.any():
            return f"{op.op} -> {op.output}", int(diff.max())
    return "none", 0


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
