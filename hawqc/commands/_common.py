"""Arguments, checks and loaders shared by the commands: one grammar for targets, kernels and threads;
model and data specs.

``--target`` (``llvm``, ``"llvm -mcpu=znver4"``, ``cuda``, ``cuda -arch=sm_75`` — the shell splits
the last into ``--target cuda`` and ``-arch=sm_75``, both read here), ``--kernels`` and ``--threads``
mean the same on compile, verify, run, bench and tune. Input checks are collected with
:class:`Problems` so that every mistake is reported in one message before any work starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
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
    parser.add_argument("model", help="quantized model: ONNX QDQ (.onnx) or hawqc integer graph (.int.npz); or a "
                                      "float model (.pt2, float .onnx, built-in name, package.module:factory), "
                                      "quantized here first")
    parser.add_argument("--bit-config", help="check a quantized model's bits against this bit config (JSON or "
                                             "preset); quantize a float model with it (default: uniform8)")
    parser.add_argument("--input-shape", type=input_shape,
                        help="static input shape, e.g. 1,3,224,224 (default: the model's; an open batch stays open)")
    add_target_arguments(parser)
    add_float_source_arguments(parser)


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    """``--calib-data``: inputs that quantize the float regions a quantized ONNX model was left with."""
    parser.add_argument("--calib-data", metavar="X.npy",
                        help="for a quantized ONNX model with float regions (NNCF's squeeze-excite, PT2E's "
                             "unquantized means and gates): calibration inputs (.npy, N x input shape) from which "
                             "hawqc quantizes them, int8 per tensor (default: computed in float and reported)")


def add_target_arguments(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--target``, ``-arch``, ``--kernels`` and (unless ``threads=False``) ``--threads``; read them
    back with :func:`target_of`. Defaults are ``None`` so a command can tell what the user gave."""
    parser.add_argument("--target", help='TVM target: llvm (host CPU, the default), "llvm -mcpu=znver4", '
                        "cuda (sm_75), cuda -arch=sm_80, or a TVM JSON target")
    parser.add_argument("-arch", "--arch", help=f"CUDA architecture of a cuda target: {DEFAULT_ARCH} (default), "
                        "sm_80, sm_86, sm_89 or sm_90")
    parser.add_argument("--kernels", choices=KERNELS,
                        help="CPU kernels: auto (the default: AMX tiles where the CPU has AMX int8, VNNI where it has "
                             "that, else AVX2), amx, vnni, vnni-w4, avx2, or generic (TVM's unscheduled lowering, "
                             "a baseline)")
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


_DISTILL_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "steps": ("steps", int), "lr": ("lr", float), "schedule": ("schedule", str), "jitter": ("jitter", int),
    "flip": ("flip", lambda v: bool(int(v))), "tv": ("tv_weight", float), "l2": ("l2_weight", float),
    "first-bn": ("first_bn_weight", float), "classes": ("class_weight", float)}


def distill_options(text: str) -> dict[str, Any]:
    """``steps=100,classes=10`` -> keyword arguments of :func:`hawqc.quant.distill.distill`, for argparse."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in _DISTILL_KEYS or not value:
            raise argparse.ArgumentTypeError(f"--distill takes KEY=VALUE pairs with keys {', '.join(_DISTILL_KEYS)}, "
                                             f"got {item!r}")
        name, parse = _DISTILL_KEYS[key]
        try:
            options[name] = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--distill {key} takes a number, got {value!r}") from None
    return options


def add_data_arguments(parser: argparse.ArgumentParser, purpose: str, default: str = "random") -> None:
    """``--data`` (a data spec, see :mod:`hawqc.data`) and the preprocessing of images."""
    parser.add_argument("--data", default=default,
                        help=f"{purpose}: digits, fashion-mnist, random, distilled (synthesised from the model's "
                             "BatchNorm statistics: no data needed), a folder of images (one sub-folder per "
                             f"class gives labels) or a .npy array (default: {default})")
    parser.add_argument("--distill", type=distill_options, default={}, metavar="KEY=VALUE,...",
                        help="options of --data distilled: steps, lr, schedule (plateau or cosine), jitter, flip (0/1), "
                             "tv, l2, first-bn (image priors), classes (weight of per-input class targets); e.g. "
                             "steps=100,classes=10,tv=0.01,first-bn=10,jitter=30,flip=1,schedule=cosine,lr=0.25")
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
                     labels=args.labels, seed=seed, distill=args.distill)
    model.input_shape = tuple(data.inputs.shape[1:])
    return data


CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 4, 16


def add_float_source_arguments(parser: argparse.ArgumentParser) -> None:
    """compile / verify: what a float model (rather than a quantized one) is quantized with first."""
    parser.add_argument("--checkpoint", help="float weights (a state_dict) for a built-in model or a factory")
    add_data_arguments(parser, "for a float model: calibration data (it is quantized first with --bit-config, "
                               "default uniform8)")


def is_quantized_file(model: str) -> bool:
    """A hawqc integer graph (``.int.npz``) or an ONNX model that is no float network (a quantized one, or
    one the QDQ reader explains): compiled as it is."""
    from pathlib import Path

    if model.endswith(".npz"):
        return True
    if Path(model).suffix.lower() == ".onnx":
        from hawqc.models import onnx_float

        try:
            return not onnx_float.is_float_model(onnx_float.read(model))
        except ValueError:  # missing or unreadable: the QDQ reader says what is wrong
            return True
    return False


@dataclass
class ModelSource:
    """compile / verify: a quantized model's integer graph, or a float model and its calibration data."""

    graph: Any = None
    float_model: Any = None
    """A :class:`~hawqc.models.loading.LoadedModel`, quantized by :meth:`integer_graph`."""
    data: Any = None
    bit_config: Any = None

    def integer_graph(self) -> Any:
        """The graph; a float model is quantized here (``--bit-config`` on :data:`CALIBRATION_BATCHES`
        batches of :data:`CALIBRATION_BATCH_SIZE` of ``--data``; random weights get BatchNorm statistics
        recalibrated on them)."""
        if self.graph is not None:
            return self.graph
        import torch
        from torch.utils.data import DataLoader

        from hawqc import models, quantize

        loader = DataLoader(self.data, batch_size=CALIBRATION_BATCH_SIZE, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        calib = [x for (x, _), _ in zip(loader, range(CALIBRATION_BATCHES))]
        model = self.float_model
        if model.random_weights:
            print(f"note: {model.name} has random weights (no --checkpoint); BatchNorm statistics recalibrated")
            models.recalibrate_bn(model.module, calib)
        self.graph = quantize(model.module, self.bit_config, calib).integer_graph()
        return self.graph


def model_source(args: argparse.Namespace, input_shape: tuple[int, ...] | None = None) -> ModelSource:
    """compile / verify: ``args.model`` read and checked without quantizing anything yet. A quantized model
    (QDQ ``.onnx``, ``.int.npz``) is read as it is (``--bit-config`` checks its bits); a float model spec is
    loaded with ``--data`` and ``--bit-config`` (default uniform8), checked against each other."""
    from hawqc import BitConfig, api

    calib_data = getattr(args, "calib_data", None)
    if is_quantized_file(args.model):
        if getattr(args, "checkpoint", None) or args.data != "random":
            raise ValueError("--checkpoint and --data go with a float model; this one is quantized (verify takes "
                             "its inputs from --input)")
        if calib_data is not None and args.model.endswith(".npz"):
            raise ValueError("--calib-data quantizes the float regions of an ONNX model; an integer graph has none")
        return ModelSource(graph=api.integer_graph_of(args.model, args.bit_config, calib_data=calib_data,
                                                      input_shape=input_shape))
    if calib_data is not None:
        raise ValueError("--calib-data goes with a quantized ONNX model; a float model is calibrated on --data")
    loaded = load_float_model(args, tuple(input_shape[1:]) if input_shape else None)
    config = BitConfig.from_any(args.bit_config or "uniform8")
    config.resolve(loaded.module)
    data = load_data_for(args, loaded, "train", size=CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE)
    return ModelSource(float_model=loaded, data=data, bit_config=config)
