"""Arguments shared by the compile, verify and run commands."""

from __future__ import annotations

import argparse


def input_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` -> (1, 3, 224, 224), for argparse."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,224,224, got {text!r}") from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive, got {text!r}")
    return shape


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX QDQ model (.onnx) or hawqc integer graph (.int.npz)")
    parser.add_argument("--target", default="llvm", help='TVM target, e.g. "llvm -mcpu=znver4" (default: host CPU)')
    parser.add_argument("--bit-config", help="check the model's bits against this bit config (JSON or preset)")
    parser.add_argument("--input-shape", type=input_shape,
                        help="static input shape, e.g. 1,3,224,224 (default: the model's; an open batch stays open)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU worker threads (default: one per physical core)")


def add_int4_argument(parser: argparse.ArgumentParser) -> None:
    from hawqc.topi_int4.cuda.pipeline import INT4

    parser.add_argument("--int4", choices=INT4, default="auto",
                        help="4-bit layers on cuda: auto (INT4 Tensor Cores where the arch has them, int8 kernels "
                             "on sm_90) or emulated (INT4 kernels on sm_90 too, emulated by ptxas: for checking "
                             "their layouts on Hopper, not for speed)")
