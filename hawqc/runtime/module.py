"""Compiled integer-only modules: build, run, check, save, load.

An artifact folder holds ``model.so`` (the TVM executable), ``graph.int.npz`` (the integer graph it
was compiled from: the reference and every scale) and ``manifest.json`` (shapes, bits, target,
versions). An open-batch CPU module also holds ``model.b1.so``: the same model compiled for batch 1,
which runs batch-1 calls and, a sample at a time, other batches (listed under ``specialised_batches``;
artifacts without it load as before, and readers that ignore it still run every batch on
``model.so``). It is written to a temporary folder and renamed into place, so a failed export leaves
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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.reference.graph import IntegerGraph
from hawqc.runtime import threads as thread_pool
from hawqc.runtime.target import KERNELS

FORMAT_VERSION = 1
LIBRARY, GRAPH, MANIFEST = "model.so", "graph.int.npz", "manifest.json"
SPECIALISED_BATCHES = (1,)
"""Batch sizes an open-batch CPU module is also compiled for with a static batch. With the batch open,
hawqc's kernels keep the batch loop serial outside their parallel rows and TIR loses static extents:
measured ~3x slower per sample on ResNet-18 than a module compiled for batch 1, whose calls one sample
at a time match a module compiled for batch 8 (hawqc's kernels parallelise rows within a sample)."""


def specialised_library(batch: int) -> str:
    """The file name of the executable compiled for ``batch`` beside an open-batch ``model.so``."""
    return f"model.b{batch}.so"


class CompiledModule:
    """An integer-only TVM module with float input and output (quantize/dequantize at the edges)."""

    def __init__(self, graph: IntegerGraph, input_shape: tuple[int | None, ...], target: dict[str, Any],
                 executable: Any, ir: Any = None, input_dtype: str = "float32", threads: int | None = None) -> None:
        self.graph, self.input_shape, self.target = graph, tuple(input_shape), target
        """``input_shape``: its batch (first dimension) is ``None`` where the module runs any batch size."""
        self.input_dtype = input_dtype
        self.threads = threads
        """CPU worker threads a call uses (None: one per physical core; see :mod:`hawqc.runtime.threads`)."""
        self.ir = ir
        """The integer-only Relax IRModule (before TVM's lowering), when compiled in this process."""
        self.kernels = "generic"
        """The conv/dense kernels it runs: amx, vnni, vnni-w4, avx2 or generic."""
        self.int4 = "auto"
        """What 4-bit layers run on (CUDA): see :data:`hawqc.topi_int4.cuda.pipeline.INT4`."""
        self.lowered: Any = None
        """The module after TVM's pipeline (its fused kernels are what MetaSchedule tunes), idem."""
        self.fused: tuple[int, int] | None = None
        """(conv/dense kernels with the requantization fused in, all conv/dense kernels)."""
        self.input_in_place = False
        """Whether a call hands the caller's array to the module as it is (its one reader, the input quantize of
        :mod:`hawqc.topi_int4.x86.quantize`, assumes no alignment) instead of copying it into an aligned tensor:
        MobileNet-V2 batch 8 5% faster, paired calls (the copy of its 4.8 MB took 0.36 ms)."""
        self.note = ""
        """Why the module was compiled for a fixed batch although the model's is open (else empty)."""
        self.specialised: dict[int, Any] = {}
        """Executables compiled for a static batch beside an open-batch one, {batch: executable}: a call
        at that batch runs its executable, other batches run batch 1's a sample at a time (see
        :meth:`executable_for`; bit-exact like the open one, faster on the CPU)."""
        self._executable = executable
        self._vm: Any = None
        """Created on the first call: a CUDA module needs a GPU to load, not to be exported."""
        self._specialised_vms: dict[int, Any] = {}
        self._input: Any = None
        """The device tensor calls refill (reallocated when the shape changes): a fresh tensor per call
        costs its page faults (measured 150 against 55 us for a 224x224 image, MobileNet-V2 batch 1 ~2.5%)."""
        self._lock = threading.Lock()

    def __call__(self, x: Any) -> np.ndarray:
        import tvm
        import tvm_ffi
        from tvm import relax

        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if len(x.shape) != len(self.input_shape) or any(d not in (None, n) for d, n in zip(self.input_shape, x.shape)):
            raise ValueError(f"input has shape {x.shape}, the module was compiled for {shape_text(self.input_shape)}")
        executable, size = self.executable_for(x.shape[0])
        vm = self._vm if executable is self._executable else self._specialised_vms.get(size)
        if vm is None:
            if not self.device.exist:
                raise ValueError(f"this module was compiled for {self.target.get('kind')}: running it needs that device")
            if self.kernels == "amx" and not thread_pool.request_amx():
                raise ValueError("this module runs AMX tiles: this CPU or Linux does not grant them to the process "
                                 "(compile it with kernels='vnni')")
            vm = relax.VirtualMachine(executable, self.device)
            if executable is self._executable:
                self._vm = vm
            else:
                self._specialised_vms[size] = vm
        if self.target.get("kind") != "cuda":
            thread_pool.configure(self.threads)

        def run(part: np.ndarray) -> np.ndarray:
            if self.input_in_place and part.flags.aligned:
                return vm["main"](tvm_ffi.from_dlpack(part, require_alignment=part.itemsize)).numpy()
            if self._input is None or tuple(self._input.shape) != part.shape:
                self._input = tvm.runtime.empty(part.shape, self.input_dtype, self.device)
            return vm["main"](self._input.copyfrom(part)).numpy()

        with self._lock:  # the input tensor and the VM serve one call at a time
            return run(x) if size == len(x) else np.concatenate([run(x[i:i + size]) for i in range(0, len(x), size)])

    @property
    def batch(self) -> int | str:
        """The batch size the module runs: ``"any"`` or a number."""
        return "any" if self.input_shape[0] is None else self.input_shape[0]

    def executable_for(self, batch: int) -> tuple[Any, int]:
        """The executable a call at ``batch`` runs and how many samples each of its runs takes: the one
        compiled for ``batch``; else the one compiled for batch 1, a sample at a time; else the module's
        own, the whole batch at once."""
        for size in (batch, 1) if batch > 0 else ():
            if size in self.specialised:
                return self.specialised[size], size
        return self._executable, batch

    @property
    def executable(self) -> Any:
        """The built TVM executable (e.g. to time it with ``relax.VirtualMachine(...).time_evaluator``)."""
        return self._executable

    @property
    def device(self) -> Any:
        """The TVM device the module runs on: ``cuda(0)`` for CUDA targets, else the CPU."""
        import tvm

        return tvm.cuda() if self.target.get("kind") == "cuda" else tvm.cpu()

    def source(self) -> str:
        """The CUDA C source of a module compiled for a CUDA target."""
        from hawqc.topi_int4.cuda.pipeline import cuda_source

        return cuda_source(self._executable)

    def reference(self, x: Any) -> np.ndarray:
        """The numpy reference executor on the same integer graph."""
        return self.graph.run(np.asarray(x, dtype=np.float32))

    def summary(self) -> list[dict[str, Any]]:
        """One row per conv/dense: name, op, weight shape, weight and input bits."""
        return [{"layer": op.attrs.get("layer", op.output), "op": op.op, "weight": list(op.consts["weight"].shape),
                 "w_bits": op.attrs.get("w_bits"), "a_bits": op.attrs.get("a_bits")}
                for op in self.graph.ops if op.op in ("conv2d", "dense")]

    def export(self, out: str | os.PathLike[str], force: bool = False, extra: dict[str, str] | None = None) -> Path:
        """Write the artifact folder ``out`` (refused if it exists, unless ``force``), with the text
        files ``extra`` ({name: text}) beside the module; the folder appears only complete."""
        import tvm

        import hawqc

        out = Path(out)
        if out.exists() and not force:
            raise ValueError(f"{out} exists: choose another output folder or pass --force")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            with native_stderr_silenced():  # TVM logs an empty "Scope Saving" warning per function
                self._executable.export_library(str(tmp / LIBRARY), **thread_pool.export_options(self.target))
                for batch, executable in self.specialised.items():
                    executable.export_library(str(tmp / specialised_library(batch)), **thread_pool.export_options(self.target))
            self.graph.save(tmp / GRAPH)
            manifest = {"format_version": FORMAT_VERSION, "input_shape": list(self.input_shape), "batch": self.batch,
                        "target": self.target, "tvm_version": tvm.__version__, "hawqc_version": hawqc.__version__,
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "kernels": self.kernels, "int4": self.int4, "input_dtype": self.input_dtype,
                        "input_in_place": self.input_in_place, "specialised_batches": sorted(self.specialised),
                        "layers": self.summary(), "metadata": self.graph.metadata}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
            os.chmod(tmp, 0o755)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def compile_graph(graph: IntegerGraph, input_shape: tuple[int | None, ...], target: dict[str, Any],
                  input_dtype: str = "float32", kernels: str = "auto", database: Any = None,
                  threads: int | None = None, int4: str = "auto",
                  specialise: tuple[int, ...] = SPECIALISED_BATCHES) -> CompiledModule:
    """Lower ``graph`` to Relax and build it for ``target`` (TVM's default pipeline: fusion included).
    A ``None`` batch (first dimension of ``input_shape``) stays symbolic: the module runs any batch size;
    where the graph cannot keep it open (a reshape mixing the batch into other dimensions), the module is
    compiled for batch 1 and :attr:`CompiledModule.note` says so. An open batch on the CPU (hawqc's
    kernels) is also compiled for each batch of ``specialise``, which calls at that batch run
    (:attr:`CompiledModule.specialised`; ``()``: none), other batches a sample at a time on batch 1's.
    ``input_dtype`` is float32 for models; an integer type for a graph without quantize (one layer).
    ``database``: a MetaSchedule database whose tuned schedules replace those of the kernels it knows.
    ``threads``: CPU worker threads a call uses (default: one per physical core).
    ``int4`` (CUDA): ``emulated`` keeps the INT4 kernels on sm_90 (see :data:`~hawqc.topi_int4.cuda.pipeline.INT4`)."""
    from hawqc.relax_passes.fused_requant import fused_requant
    from hawqc.topi_int4.cuda.pipeline import check_int4

    if target.get("kind") not in ("llvm", "cuda"):
        raise ValueError(f"target kind {target.get('kind')!r} is not supported: hawqc compiles for llvm and cuda")
    thread_pool.configure(threads)
    from hawqc.frontend.integer_graph import FixedBatch

    kernels, int4 = resolve_kernels(kernels, target), check_int4(int4, target)
    note = graph.metadata.get("batch_note", "") if input_shape[0] == 1 else ""
    try:
        ir = _lower(graph, input_shape, target, kernels, input_dtype=input_dtype)
    except FixedBatch as err:
        input_shape = (1, *input_shape[1:])
        note = (f"compiled for batch 1 ({err}); choose another batch with --input-shape "
                f"N,{','.join(map(str, input_shape[1:]))} (input_shape= in Python)")
        ir = _lower(graph, input_shape, target, kernels, input_dtype=input_dtype)
    executable, lowered = _build(ir, target, kernels, database, int4)
    module = CompiledModule(graph, input_shape, target, executable, ir, input_dtype, threads)
    module.kernels, module.int4, module.fused, module.lowered = kernels, int4, fused_requant(lowered), lowered
    module.note = note
    module.input_in_place = target["kind"] == "llvm" and _read_by_input_quantize(ir)
    if input_shape[0] is None and target["kind"] == "llvm" and kernels != "generic" and _batch_leads(ir):
        for batch in specialise:
            static = _lower(graph, (batch, *input_shape[1:]), target, kernels, input_dtype=input_dtype)
            module.specialised[batch] = _build(static, target, kernels, database, int4)[0]
    return module


def _read_by_input_quantize(ir: Any) -> bool:
    """Whether ``ir``'s main reads its input only in :mod:`hawqc.topi_int4.x86.quantize`'s kernel (through the
    reshape flattening it): see :attr:`CompiledModule.input_in_place`."""
    from tvm import relax

    from hawqc.topi_int4.x86 import quantize

    main = ir["main"]
    views, readers = {main.params[0]}, 0
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not views & set(relax.analysis.free_vars(value)):
                continue
            op = getattr(value, "op", None)
            if getattr(op, "name", None) == "relax.reshape":
                views.add(binding.var)
            elif getattr(op, "name", None) == "relax.call_tir" and value.args[0].name_hint.startswith(quantize.NAME):
                readers += 1
            else:
                return False
    return readers > 0 and not views & set(relax.analysis.free_vars(main.body.body))


def _batch_leads(ir: Any) -> bool:
    """Whether the output of ``ir``'s main is one tensor whose first dimension is the input's batch: then
    a batch runs as slices (integer graph ops act per sample; one mixing the batch fixes it at 1)."""
    from tvm import relax

    main = ir["main"]
    out, batch = main.ret_ty, main.params[0].ty.shape[0]
    return isinstance(out, relax.TensorType) and out.shape is not None and out.shape[0].same_as(batch)


def shape_text(shape: tuple[int | None, ...]) -> str:
    """``(N, 3, 224, 224)`` for an open batch, else the tuple."""
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")" if None in shape else str(tuple(shape))


def _lower(graph: IntegerGraph, input_shape: tuple[int | None, ...], target: dict[str, Any], kernels: str,
           **kwargs: Any) -> Any:
    """The integer-only Relax module, with the target's conv/dense kernels and layout."""
    from hawqc.frontend.integer_graph import to_relax
    from hawqc.frontend.unsigned import unsigned_activations
    from hawqc.topi_int4.x86.lowering import X86Kernels, input_quantize, table_lookup

    kernels = resolve_kernels(kernels, target)
    if kernels == "generic":
        return to_relax(graph, input_shape, **kwargs)
    if kernels == "tensor_core":  # NHWC; the CUDA pipeline swaps the convs for its own kernels
        return to_relax(graph, input_shape, layout="NHWC", **kwargs)
    x86 = X86Kernels(vnni=kernels != "avx2", packed_int4=kernels == "vnni-w4", amx=kernels == "amx")
    lookup = table_lookup if has_feature(target, "avx512vbmi") else None
    if x86.vnni:
        graph = unsigned_activations(graph, keep=kwargs.get("outputs") or ())
    return to_relax(graph, input_shape, layout="NHWC", kernels=x86, unsigned_first=x86.vnni, lookup=lookup,
                    quantize=input_quantize, **kwargs)


def resolve_kernels(kernels: str, target: dict[str, Any]) -> str:
    """``auto`` made concrete for ``target``: ``amx`` where it has AMX int8 and AVX-512 VNNI and this process may
    run tiles (a module then runs here; ``kernels="amx"`` compiles them for another machine), else ``vnni`` where it
    has VNNI, else ``avx2``; ``tensor_core`` (the only choice) for CUDA."""
    if target.get("kind") == "cuda":
        if kernels not in ("auto", "tensor_core"):
            raise ValueError(f"kernels {kernels!r} are for CPUs: a cuda target uses Tensor Core kernels (auto)")
        return "tensor_core"
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if kernels != "auto":
        return kernels
    if has_vnni(target):
        return "amx" if has_feature(target, "amx-int8") and thread_pool.request_amx() else "vnni"
    return "avx2"


def has_vnni(target: dict[str, Any]) -> bool:
    """Whether the llvm target has AVX-512 VNNI (``vpdpbusd``)."""
    return has_feature(target, "avx512vnni")


def has_feature(target: dict[str, Any], feature: str) -> bool:
    """Whether the llvm target has an LLVM CPU feature such as ``avx512vbmi``."""
    import tvm

    return bool(tvm.target.codegen.target_has_features(feature, tvm.target.Target(target)))


def _build(ir: Any, target: dict[str, Any], kernels: str = "auto", database: Any = None,
           int4: str = "auto") -> tuple[Any, Any]:
    """TVM's default pipeline (fusion included) run once, the tuned schedules of ``database``,
    hawqc's CPU schedules on every kernel not scheduled yet (unless ``generic``), then the build:
    (executable, lowered module). CUDA: hawqc's pipeline, ``int4`` choosing the 4-bit layers' kernels."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight

    from hawqc.topi_int4.x86.schedules import Parallel

    if target.get("kind") == "cuda":  # Tensor Core convs, dlight schedules for the rest
        from hawqc.topi_int4.cuda.pipeline import check_arch, cuda_pipeline

        check_arch(target)
        tvm_target = tvm.target.Target(target, host={"kind": "llvm"})
        with tvm_target:
            lowered = cuda_pipeline(tvm_target, int4)(ir)
        return tvm.compile(lowered, target=tvm_target, relax_pipeline=tvm.transform.Sequential([])), lowered
    tvm_target = tvm.target.Target(target)
    with tvm_target:
        lowered = relax.get_default_pipeline(tvm_target)(ir)
        if database is not None:
            with database:
                lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
        if kernels != "generic":
            lowered = dlight.ApplyDefaultSchedule(Parallel())(lowered)
    return tvm.compile(lowered, target=tvm_target, relax_pipeline=tvm.transform.Sequential([])), lowered


def load(folder: str | os.PathLike[str], threads: int | None = None) -> CompiledModule:
    """Load an artifact folder written by :meth:`CompiledModule.export`; ``threads``: CPU worker threads
    a call uses (default: one per physical core)."""
    import tvm

    thread_pool.configure(threads)
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: not a hawqc artifact ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: artifact format {manifest.get('format_version')} is not supported")
    if manifest["target"].get("kind") == "cuda" and not tvm.cuda().exist:
        raise ValueError(f"{folder} was compiled for CUDA: loading it needs a CUDA GPU")
    with native_stderr_silenced():
        executable = tvm.runtime.load_module(str(folder / LIBRARY))
    thread_pool.install(folder / LIBRARY)
    graph = IntegerGraph.load(folder / GRAPH)
    module = CompiledModule(graph, tuple(manifest["input_shape"]), manifest["target"], executable,
                            input_dtype=manifest.get("input_dtype", "float32"), threads=threads)
    module.kernels, module.int4 = manifest.get("kernels", "generic"), manifest.get("int4", "auto")
    module.input_in_place = manifest.get("input_in_place", False)
    with native_stderr_silenced():
        module.specialised = {batch: tvm.runtime.load_module(str(folder / specialised_library(batch)))
                              for batch in manifest.get("specialised_batches", [])}
    for batch in module.specialised:
        thread_pool.install(folder / specialised_library(batch))
    return module


def first_divergence(graph: IntegerGraph, x: np.ndarray, target: dict[str, Any],
                     kernels: str = "auto", int4: str = "auto") -> tuple[str, int]:
    """The first operation whose compiled output differs from the reference, and its max |diff|."""
    import tvm
    from tvm import relax

    from hawqc.reference.graph import execute
    from hawqc.reference.kernels import KERNELS as REFERENCE

    thread_pool.configure()
    integer_ops = [op for op in graph.ops if op.op != "dequantize"]
    ir = _lower(graph, x.shape, target, kernels, outputs=[op.output for op in integer_ops])
    executable, _ = _build(ir, target, kernels, int4=int4)
    compiled = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    reference: dict[str, Any] = {}
    execute(graph, x, REFERENCE, trace=reference)
    for op, got in zip(integer_ops, compiled):
        diff = np.abs(got.numpy().astype(np.int64) - reference[op.output].astype(np.int64))
        if diff.any():
            return f"{op.op} -> {op.output}", int(diff.max())
    return "none", 0


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
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
