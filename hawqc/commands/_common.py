"""Arguments and loaders shared by the commands: model and data specs, shapes, targets, threads."""

from __future__ import annotations

import argparse
from typing import Any


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
    parser.add_argument("model", help="quantized model: ONNX QDQ (.onnx) or hawqc integer graph (.int.npz); or a "
                                      "float model (.pt2, float .onnx, built-in name, package.module:factory), "
                                      "quantized here first")
    parser.add_argument("--target", default="llvm", help='TVM target, e.g. "llvm -mcpu=znver4" (default: host CPU)')
    parser.add_argument("--bit-config", help="check a quantized model's bits against this bit config (JSON or "
                                             "preset); quantize a float model with it (default: uniform8)")
    parser.add_argument("--input-shape", type=input_shape, help="static input shape, e.g. 1,3,224,224")
    add_float_source_arguments(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU worker threads (default: one per physical core)")


def add_int4_argument(parser: argparse.ArgumentParser) -> None:
    from hawqc.topi_int4.cuda.pipeline import INT4

    parser.add_argument("--int4", choices=INT4, default="auto",
                        help="4-bit layers on cuda: auto (INT4 Tensor Cores where the arch has them, int8 kernels "
                             "on sm_90) or emulated (INT4 kernels on sm_90 too, emulated by ptxas: for checking "
                             "their layouts on Hopper, not for speed)")


MODEL_SPEC_HELP = ("float model: a built-in name (hawqc quantize --help lists them), a torch.export program "
                   "(.pt2), a float ONNX model (.onnx) or package.module:factory")


def add_float_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model spec and its weights (quantize, sensitivity, search)."""
    parser.add_argument("model", help=MODEL_SPEC_HELP)
    parser.add_argument("--checkpoint", help="float weights (a state_dict) for a built-in model or a factory; "
                                             "default: random")
    parser.add_argument("--num-classes", type=int, help="classifier outputs of a built-in model or a factory")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``224,192`` -> (H, W), for argparse."""
    size = input_shape(text)
    if len(size) not in (1, 2):
        raise argparse.ArgumentTypeError(f"image size must be H or H,W, got {text!r}")
    return (size[0], size[-1])


def add_data_arguments(parser: argparse.ArgumentParser, purpose: str, default: str = "random") -> None:
    """``--data`` (a data spec, see :mod:`hawqc.data`) and the preprocessing of images."""
    parser.add_argument("--data", default=default,
                        help=f"{purpose}: digits, fashion-mnist, random, a folder of images (one sub-folder per "
                             f"class gives labels) or a .npy array (default: {default})")
    parser.add_argument("--labels", help="labels for a .npy --data: a .npy of one integer per sample")
    parser.add_argument("--image-size", type=image_size, metavar="H[,W]",
                        help="resize images to this size (default: the model's input size)")
    parser.add_argument("--mean", type=_floats, default=(0.0,), metavar="M[,M,M]",
                        help="subtracted from pixels scaled to [0, 1], per channel (default: 0)")
    parser.add_argument("--std", type=_floats, default=(1.0,), metavar="S[,S,S]",
                        help="divides pixels after the mean, per channel (default: 1); images are read as "
                             "grayscale or RGB by the model's input channels")


def load_float_model(args: argparse.Namespace, input_shape: tuple[int, ...] | None = None) -> Any:
    """The :class:`~hawqc.models.loading.LoadedModel` of ``args.model`` / ``--checkpoint`` / ``--num-classes``;
    ``input_shape`` ``(C, H, W)`` overrides the model's own."""
    from hawqc.models.loading import load

    kwargs = {"num_classes": args.num_classes} if getattr(args, "num_classes", None) else {}
    loaded = load(args.model, getattr(args, "checkpoint", None), **kwargs)
    if input_shape is not None:
        loaded.input_shape = tuple(input_shape)
    return loaded


def load_data_for(args: argparse.Namespace, model: Any, split: str, size: int, seed: int = 0) -> Any:
    """The :class:`~hawqc.data.Data` of ``--data`` for ``model`` (a LoadedModel), preprocessed as the flags
    say; a model of unknown input shape takes the data's."""
    from hawqc.data import Preprocess, load_data

    data = load_data(args.data, split, input_shape=model.input_shape, size=size,
                     preprocess=Preprocess(args.image_size, args.mean, args.std), model=model.module,
                     labels=args.labels, seed=seed)
    model.input_shape = tuple(data.inputs.shape[1:])
    return data


CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 4, 16


def add_float_source_arguments(parser: argparse.ArgumentParser) -> None:
    """compile / verify: what a float model (rather than a quantized one) is quantized with first."""
    parser.add_argument("--checkpoint", help="float weights (a state_dict) for a built-in model or a factory")
    add_data_arguments(parser, "for a float model: calibration data (it is quantized first with --bit-config, "
                               "default uniform8)")


def is_quantized_file(model: str) -> bool:
    """A hawqc integer graph (``.int.npz``) or a quantized ONNX model: compiled as it is."""
    from pathlib import Path

    if model.endswith(".npz"):
        return True
    if Path(model).suffix.lower() == ".onnx":
        if not Path(model).is_file():
            raise ValueError(f"{model}: no such file")
        from hawqc.models import onnx_float

        return onnx_float.is_quantized(onnx_float.read(model))
    return False


def integer_graph_from_args(args: argparse.Namespace, input_shape: tuple[int, ...] | None = None,
                            ) -> tuple[Any, tuple[int, ...], Any]:
    """compile / verify: the integer graph of ``args.model``, its static input shape, and the float model's
    data (None for a quantized model). A quantized model is read as it is (``--bit-config`` checks its
    bits); a float model spec is quantized with ``--bit-config`` (default uniform8), calibrated on
    ``--data`` (:data:`CALIBRATION_BATCHES` batches of :data:`CALIBRATION_BATCH_SIZE`); its default input
    shape is one sample of the model's."""
    import torch
    from torch.utils.data import DataLoader

    from hawqc import api, models, quantize

    if is_quantized_file(args.model):
        if getattr(args, "checkpoint", None):
            raise ValueError("--checkpoint goes with a float model; this one is quantized")
        graph = api.integer_graph_of(args.model, args.bit_config, input_shape=input_shape)
        return graph, api.input_shape_of(graph, input_shape), None
    loaded = load_float_model(args, tuple(input_shape[1:]) if input_shape else None)
    data = load_data_for(args, loaded, "train", size=CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE)
    loader = DataLoader(data, batch_size=CALIBRATION_BATCH_SIZE, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    calib = [x for (x, _), _ in zip(loader, range(CALIBRATION_BATCHES))]
    if loaded.random_weights:
        print(f"note: {loaded.name} has random weights (no --checkpoint); BatchNorm statistics recalibrated")
        models.recalibrate_bn(loaded.module, calib)
    graph = quantize(loaded.module, args.bit_config or "uniform8", calib).integer_graph()
    return graph, tuple(input_shape or (1, *loaded.input_shape)), data
