"""Offline datasets for tests and demos, as ``torch.utils.data.TensorDataset`` of (N, 1, H, W) floats.

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped in its wheel): fast tests.
- ``fashion_mnist``: Fashion-MNIST 28x28 from the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_ROOT = Path(os.environ.get("HAWQC_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train or test")


DIGITS_MEAN_STD = (4.884, 6.017)
FASHION_MNIST_MEAN_STD = (72.94, 90.02)


def _normalised(images: np.ndarray, labels: np.ndarray, mean_std: tuple[float, float]) -> TensorDataset:
    x = (images.astype(np.float32) - mean_std[0]) / mean_std[1]
    return TensorDataset(torch.from_numpy(x[:, None]), torch.from_numpy(labels.astype(np.int64)))


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn's digits, split reproducibly into train and test."""
    from sklearn.datasets import load_digits

    _check_split(split)
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    n_test = int(round(len(order) * test_fraction))
    chosen = order[n_test:] if split == "train" else order[:n_test]
    return _normalised(data.images[chosen], data.target[chosen], DIGITS_MEAN_STD)


def fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> TensorDataset:
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
