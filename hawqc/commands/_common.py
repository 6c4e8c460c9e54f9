"""Arguments and checks shared by the commands: one grammar for targets, kernels and threads.

``--target`` (``llvm``, ``"llvm -mcpu=znver4"``, ``cuda``, ``cuda -arch=sm_75`` — the shell splits
the last into ``--target cuda`` and ``-arch=sm_75``, both read here), ``--kernels`` and ``--threads``
mean the same on compile, verify, run, bench and tune. Input checks are collected with
:class:`Problems` so that every mistake is reported in one message before any work starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hawqc.runtime.target import KERNELS

DEFAULT_ARCH = "sm_75"
"""The CUDA architecture of a ``cuda`` target that names none (Turing: INT4 Tensor Cores)."""


def input_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` -> (1, 3, 224, 224), for argparse."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,224,224, got {text!r}") from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive, got {text!r}")
    return shape


def positive_list(text: str) -> list[int]:
    """``1,8`` -> [1, 8] (sorted, distinct, each at least 1), for argparse."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got {text!r}")
    return values


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX QDQ model (.onnx) or hawqc integer graph (.int.npz)")
    parser.add_argument("--bit-config", help="check the model's bits against this bit config (JSON or preset)")
    parser.add_argument("--input-shape", type=input_shape, help="static input shape, e.g. 1,3,224,224")
    add_target_arguments(parser)


def add_target_arguments(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--target``, ``-arch``, ``--kernels`` and (unless ``threads=False``) ``--threads``; read them
    back with :func:`target_of`. Defaults are ``None`` so a command can tell what the user gave."""
    parser.add_argument("--target", help='TVM target: llvm (host CPU, the default), "llvm -mcpu=znver4", '
                        "cuda (sm_75), cuda -arch=sm_80, or a TVM JSON target")
    parser.add_argument("-arch", "--arch", help=f"CUDA architecture of a cuda target: {DEFAULT_ARCH} (default), "
                        "sm_80, sm_86, sm_89 or sm_90")
    parser.add_argument("--kernels", choices=KERNELS,
                        help="CPU kernels: auto (the default: VNNI where the CPU has it, else AVX2), vnni, vnni-w4, "
                             "avx2, or generic (TVM's unscheduled lowering, a baseline)")
    if threads:
        add_threads_argument(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU worker threads (default: one per physical core)")


def target_of(args: argparse.Namespace) -> dict[str, Any]:
    """The TVM target dict of ``--target`` / ``-arch`` (``ValueError`` for one TVM or hawqc refuses)."""
    from hawqc.runtime.target import parse_target
    from hawqc.topi_int4.cuda.pipeline import check_arch

    spec = args.target or "llvm"
    if spec.split()[:1] == ["cuda"] and "-arch" not in spec:  # TVM warns about a cuda target without an arch
        spec = f"{spec} -arch={args.arch or DEFAULT_ARCH}"
    target = parse_target(spec)
    if target.get("kind") == "cuda":
        check_arch(target)
    if args.arch and target.get("arch") != args.arch:
        raise ValueError(f"-arch={args.arch} needs --target cuda (or agrees with the target's arch)")
    if args.kernels not in (None, "auto") and target.get("kind") == "cuda":
        raise ValueError(f"--kernels {args.kernels} is for CPUs: a cuda target uses Tensor Core kernels")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return target


def kernels_of(args: argparse.Namespace) -> str:
    return args.kernels or "auto"


def load_input(path: str | Path) -> Any:
    """A float32 input batch from a ``.npy`` file (``ValueError`` for anything else)."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such input file") from None
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a .npy array ({err})") from None


def is_artifact(args: argparse.Namespace) -> bool:
    """Whether ``args.artifact`` (of run, bench) is an artifact folder (``True``) or a model file to
    compile first (``False``); ``ValueError`` when it is neither, or a folder given compiler options."""
    path = Path(args.artifact)
    if path.is_dir():
        given = [f"--{name}" for name in ("target", "arch", "kernels") if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"{args.artifact} is compiled already: {', '.join(given)} only apply to a model file "
                             "(ARTIFACT .onnx or .int.npz) that is compiled first")
        return True
    if not path.is_file():
        raise ValueError(f"{args.artifact}: no such artifact folder or model file")
    return False


def free_output(path: str | Path, force: bool = False) -> None:
    """``ValueError`` when the output ``path`` exists and ``force`` is not given."""
    if Path(path).exists() and not force:
        raise ValueError(f"{path} exists: choose another output folder or pass --force")


class Problems:
    """Runs input checks and collects their ``ValueError`` / ``OSError`` messages, so that the user
    hears of every mistake at once: ``problems.check(fn, *args)`` returns ``fn``'s value (``None`` if
    it failed); ``problems.raise_any()`` raises one ``ValueError`` naming them all."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as err:
            self.messages.append(str(err))
            return None

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_any(self) -> None:
        if len(self.messages) == 1:
            raise ValueError(self.messages[0])
        if self.messages:
            raise ValueError(f"{len(self.messages)} problems: " + "; ".join(self.messages))


def add_int4_argument(parser: argparse.ArgumentParser) -> None:
    from hawqc.topi_int4.cuda.pipeline import INT4

    parser.add_argument("--int4", choices=INT4, default="auto",
                        help="4-bit layers on cuda: auto (INT4 Tensor Cores where the arch has them, int8 kernels "
                             "on sm_90) or emulated (INT4 kernels on sm_90 too, emulated by ptxas: for checking "
                             "their layouts on Hopper, not for speed)")
