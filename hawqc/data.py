"""Data for calibration, Hessians and evaluation, from "a data spec": one loader for every command.

``load_data(spec, ...)`` reads:

- a named source from :data:`SOURCES`: ``digits`` (scikit-learn's 8x8 handwritten digits, shipped in
  its wheel), ``fashion-mnist`` (28x28, from the Debian package ``dataset-fashion-mnist``) and
  ``random`` (standard-normal inputs of the model's shape, unlabelled), ``distilled`` (inputs synthesised
  from the model's BatchNorm statistics, unlabelled: data-free calibration); :func:`register_source` adds one;
- a folder of images (PNG, JPEG, BMP, ...): one sub-folder per class gives the labels (classes in
  sorted order); images directly in the folder are unlabelled. Each image is converted to grayscale
  or RGB by the model's input channels, resized to ``Preprocess.size`` (default: the model's input),
  scaled to [0, 1], then normalised by ``mean`` / ``std`` per channel;
- a ``.npy`` array: float arrays are model inputs ``(N, C, H, W)`` taken as they are; ``uint8``
  arrays are pixels ``(N, H, W)`` or ``(N, H, W, C)`` preprocessed like images. Labels come from
  another ``.npy`` (``labels=``), one integer per sample.

A folder or array serves both splits (it is the user's data set); ``size`` bounds only the
generated sources. Every source returns a :class:`Data`: a ``TensorDataset`` of ``(inputs, labels)``
with ``labelled`` saying whether the labels are real.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_ROOT = Path(os.environ.get("HAWQC_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class Data(TensorDataset):
    """``(inputs, labels)`` tensors; ``labelled`` is False where the labels are placeholders (zeros)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.labelled = labels is not None
        super().__init__(inputs, labels if labels is not None else torch.zeros(len(inputs), dtype=torch.long))

    @property
    def inputs(self) -> torch.Tensor:
        return self.tensors[0]


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: resized to ``size`` (H, W; default: the model's input), scaled to
    [0, 1], then ``(x - mean) / std`` per channel (one value, or one per channel)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` floats in [0, 1] -> normalised."""
        channels = x.shape[1]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(f"--{name} has {len(values)} values; the model's input has {channels} channels")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"--std must be positive, got {','.join(map(str, self.std))}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class DataRequest:
    """What a command asks a source for. ``input_shape`` is the model's ``(C, H, W)`` (None: unknown);
    ``size`` the number of samples a generated source makes; ``model`` the float model, for sources that
    derive data from it; ``distill`` keyword arguments of :func:`hawqc.quant.distill.distill` (steps, priors,
    class targets) for distilled data."""

    split: str = "train"
    input_shape: tuple[int, ...] | None = None
    size: int = 256
    preprocess: Preprocess = field(default_factory=Preprocess)
    model: Any = None
    seed: int = 0
    distill: Mapping[str, Any] = field(default_factory=dict)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train or test")


DIGITS_MEAN_STD = (4.884, 6.017)
FASHION_MNIST_MEAN_STD = (72.94, 90.02)


def _normalised(images: np.ndarray, labels: np.ndarray, mean_std: tuple[float, float]) -> Data:
    x = (images.astype(np.float32) - mean_std[0]) / mean_std[1]
    return Data(torch.from_numpy(x[:, None]), torch.from_numpy(labels.astype(np.int64)))


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> Data:
    """scikit-learn's digits, split reproducibly into train and test."""
    from sklearn.datasets import load_digits

    _check_split(split)
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    n_test = int(round(len(order) * test_fraction))
    chosen = order[n_test:] if split == "train" else order[:n_test]
    return _normalised(data.images[chosen], data.target[chosen], DIGITS_MEAN_STD)


def fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> Data:
    """Fashion-MNIST (60,000 train / 10,000 test images of 10 clothing classes)."""
    _check_split(split)
    folder = Path(root) if root is not None else FASHION_MNIST_ROOT
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}: install the Debian package "
                                "dataset-fashion-mnist or set HAWQC_FASHION_MNIST")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return _normalised(images, labels, FASHION_MNIST_MEAN_STD)


def random_inputs(request: DataRequest) -> Data:
    """``request.size`` standard-normal inputs of the model's shape, unlabelled (test: another seed)."""
    if request.input_shape is None:
        raise ValueError("random data needs the model's input shape: give --input-shape C,H,W")
    generator = torch.Generator().manual_seed(request.seed + (request.split == "test"))
    return Data(torch.randn(request.size, *request.input_shape, generator=generator))


def distilled_inputs(request: DataRequest) -> Data:
    """``request.size`` inputs synthesised from the model's BatchNorm statistics (ZeroQ, see
    :mod:`hawqc.quant.distill`; cached), unlabelled; both splits alike."""
    if request.model is None or request.input_shape is None:
        raise ValueError("distilled data is synthesised from the model: it needs the model and its input shape")
    from hawqc.quant.distill import distill

    return Data(distill(request.model, request.input_shape, samples=request.size, seed=request.seed, **request.distill))


SOURCES: dict[str, Callable[[DataRequest], Data]] = {
    "digits": lambda r: digits(r.split),
    "fashion-mnist": lambda r: fashion_mnist(r.split),
    "random": random_inputs,
    "distilled": distilled_inputs,
}


def register_source(name: str, source: Callable[[DataRequest], Data]) -> None:
    """Add a named data source (``source(request) -> Data``) that every command's ``--data`` accepts."""
    SOURCES[name] = source


def load_data(spec: str | os.PathLike[str], split: str = "train", *, input_shape: Sequence[int] | None = None,
              size: int = 256, preprocess: Preprocess | None = None, model: Any = None,
              labels: str | os.PathLike[str] | None = None, seed: int = 0, distill: Mapping[str, Any] | None = None) -> Data:
    """The data a spec names: a source of :data:`SOURCES`, a folder of images or a ``.npy`` array (see the
    module docstring). ``input_shape`` is the model's ``(C, H, W)``; ``labels`` a ``.npy`` of labels for an
    array spec; ``distill`` options of distilled data (see :class:`DataRequest`). Errors (unknown spec, unreadable file, shape or channel mismatch) are ``ValueError``."""
    _check_split(split)
    request = DataRequest(split, tuple(input_shape) if input_shape is not None else None, size,
                          preprocess or Preprocess(), model, seed, dict(distill or {}))
    text = str(spec)
    if text in SOURCES and not Path(text).exists():
        if labels is not None:
            raise ValueError(f"--labels goes with a .npy array, not with {text!r}")
        return SOURCES[text](request)
    path = Path(text)
    if path.is_dir():
        if labels is not None:
            raise ValueError("--labels goes with a .npy array; a folder's labels are its class sub-folders")
        return image_folder(path, request)
    if path.suffix == ".npy":
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        return array_data(path, request, labels)
    raise ValueError(f"unknown data {text!r}: give {', '.join(SOURCES)}, a folder of images or a .npy array")


def image_folder(folder: Path, request: DataRequest) -> Data:
    """Images of ``folder`` (one sub-folder per class, or unlabelled images directly in it), preprocessed."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and _images(p))
    files = [(f, i) for i, c in enumerate(classes) for f in _images(c)] if classes else [(f, 0) for f in _images(folder)]
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its class sub-folders")
    pixels = np.stack([_read_image(f, request) for f, _ in files])
    x = torch.from_numpy(request.preprocess.normalise(pixels.astype(np.float32) / 255.0))
    return Data(x, torch.tensor([i for _, i in files], dtype=torch.long) if classes else None)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _target(request: DataRequest) -> tuple[int, tuple[int, int]]:
    """Channels and (H, W) that images are converted to."""
    if request.input_shape is None or len(request.input_shape) != 3:
        raise ValueError("images need the model's input shape: give --input-shape C,H,W")
    channels = request.input_shape[0]
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} input channels; images are read as grayscale (1) or RGB (3)")
    return channels, tuple(request.preprocess.size or request.input_shape[1:])  # type: ignore[return-value]


def _read_image(path: Path, request: DataRequest) -> np.ndarray:
    """One image file as uint8 ``(C, H, W)`` (see :func:`_converted`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _converted(image, request)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def _converted(image: Any, request: DataRequest) -> np.ndarray:
    """A PIL image as uint8 ``(C, H, W)``: grayscale or RGB by the model's channels, resized bilinearly."""
    from PIL import Image

    channels, (height, width) = _target(request)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def array_data(path: Path, request: DataRequest, labels: str | os.PathLike[str] | None) -> Data:
    """A ``.npy`` of float model inputs or uint8 pixels, with optional labels from another ``.npy``."""
    try:
        array = np.load(path, allow_pickle=False)
        y = np.load(labels, allow_pickle=False) if labels is not None else None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {labels if labels is not None and path.is_file() else path}: {err}") from None
    if array.dtype == np.uint8:
        array = _pixels(array, request)
    elif array.dtype.kind != "f" or array.ndim != 4:
        raise ValueError(f"{path}: float model inputs (N, C, H, W) or uint8 pixels, got {array.dtype} {array.shape}")
    shape = request.input_shape
    if shape is not None and tuple(array.shape[1:]) != tuple(shape):
        raise ValueError(f"{path}: samples of shape {tuple(array.shape[1:])}; the model takes {tuple(shape)}")
    if y is not None and (y.ndim != 1 or len(y) != len(array) or y.dtype.kind not in "iu"):
        raise ValueError(f"{labels}: need one integer label per sample ({len(array)}), got {y.dtype} {y.shape}")
    return Data(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                torch.from_numpy(y.astype(np.int64)) if y is not None else None)


def _pixels(array: np.ndarray, request: DataRequest) -> np.ndarray:
    """uint8 ``(N, H, W)`` / ``(N, H, W, C)`` -> preprocessed ``(N, C, H, W)`` floats."""
    from PIL import Image

    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
        raise ValueError(f"uint8 pixels must be (N, H, W) or (N, H, W, C) with 1 or 3 channels, got {array.shape}")
    images = np.stack([_converted(Image.fromarray(pixels), request) for pixels in array])
    return request.preprocess.normalise(images.astype(np.float32) / 255.0)
