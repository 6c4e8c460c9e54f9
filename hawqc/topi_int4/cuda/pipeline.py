"""The Relax pipeline for CUDA targets: TVM's default CUDA pipeline with hawqc's Tensor Core convs.

Every conv2d + requantize is replaced by a call to the kernel of :mod:`hawqc.topi_int4.cuda.conv2d`
(already scheduled); the other operators are fused and get thread bindings from dlight. dlight's
``Matmul`` rule is left out: its int8 tensorization crashes TVM 0.27's software-pipeline pass.
"""

from __future__ import annotations

from typing import Any

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
"""CUDA architectures hawqc compiles for (INT4 ``mma`` exists on sm_75 to sm_89)."""
INT4 = ("auto", "emulated")
"""What 4-bit layers run on: ``auto`` INT4 ``mma`` where the arch has it, else the int8 kernel; ``emulated``
keeps the INT4 kernels on sm_90 too, where ptxas emulates ``mma.m8n8k32`` s4: for checking their fragment
layouts and packing on Hopper, not for speed. Both mean native INT4 on sm_75 to sm_89."""


def int4_tensor_cores(arch: str, int4: str = "auto") -> bool:
    """Whether 4-bit layers use the INT4 ``mma`` kernels on ``arch`` (sm_90: only if ``int4`` is ``emulated``)."""
    return arch in ARCHS and (int(arch[3:]) < 90 or int4 == "emulated")


def check_int4(int4: str, target: dict[str, Any]) -> str:
    """``int4`` if it is one of :data:`INT4` and fits ``target``; else ``ValueError``."""
    if int4 not in INT4:
        raise ValueError(f"unknown int4 mode {int4!r}: choose one of {', '.join(INT4)}")
    if int4 == "emulated" and target.get("kind") != "cuda":
        raise ValueError(f"int4 'emulated' keeps INT4 Tensor Core kernels on sm_90: it needs a cuda target, "
                         f"not {target.get('kind')!r}")
    return int4


def check_arch(target: dict[str, Any]) -> str:
    """The target's ``arch``; ``ValueError`` unless it is one of :data:`ARCHS`."""
    arch = target.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"cuda target needs -arch= one of {', '.join(ARCHS)}, got {arch!r}")
    return arch


def cuda_pipeline(target: Any, int4: str = "auto") -> Any:
    """A module pass lowering an integer-only Relax module for the CUDA ``target`` (a ``tvm.target.Target``);
    ``int4``: see :data:`INT4`."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    from hawqc.relax_passes.tensor_core_conv import TensorCoreConv

    schedule = dl.ApplyDefaultSchedule(_gemv_or_next(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                relax.transform.FuseOps(), relax.transform.FuseTIR(), schedule]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = [TensorCoreConv(str(target.arch), int4=int4)] + cuda.library_dispatch_passes(target) + legalize
            return tvm.transform.Sequential(passes + cuda.dataflow_lower_passes(target)
                                            + cuda.finalize_passes(target))(mod)

    return _pipeline


def _gemv_or_next() -> Any:
    """dlight's GEMV rule, leaving to the next rule a function it fails an assertion on (TVM 0.27's GEMV
    normalisation asserts on a sum over H, W of requantized values: PT2E's squeeze-excite mean of a
    conv's fine grid at batch 1)."""
    from tvm.s_tir import dlight as dl

    class GEMVOrNext(dl.gpu.GEMV):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return super().apply(func, target, tunable)
            except AssertionError:
                return None

    return GEMVOrNext()


def cuda_source(executable: Any) -> str:
    """The CUDA C source of a built module (``tvm.compile`` result), found among its imported modules."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return str(module.inspect_source())
        pending.extend(module.imports)
    raise ValueError("the module holds no CUDA code")
