"""User-level entry points (re-exported by :mod:`hawqc`): models and data by name, quantization."""

from __future__ import annotations

import os
from typing import Any

DATASETS = ("digits", "fashion-mnist", "random")


def load_model(name: str, checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """A built-in model, with weights from a ``state_dict`` checkpoint (read with ``weights_only=True``,
    loaded strictly; torchvision checkpoints fit ResNet-18/50 and Inception-V3)."""
    import torch

    from hawqc import models

    model = models.get(name, **kwargs)
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"checkpoint {checkpoint} does not exist") from None
        except Exception as err:  # torch raises pickle, zip and runtime errors alike
            raise ValueError(f"{checkpoint}: not a loadable weights file ({str(err).splitlines()[0]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{checkpoint} does not fit {name}: {str(err).splitlines()[0]}") from None
    return model.eval()


def dataset(name: str, split: str, input_shape: tuple[int, ...], size: int = 256, seed: int = 0) -> Any:
    """A dataset by name; ``random`` is ``size`` standard-normal images of ``input_shape`` with label 0."""
    import torch
    from torch.utils.data import TensorDataset

    from hawqc import data

    if name == "digits":
        return data.digits(split)
    if name == "fashion-mnist":
        return data.fashion_mnist(split)
    if name == "random":
        generator = torch.Generator().manual_seed(seed + (split == "test"))
        return TensorDataset(torch.randn(size, *input_shape, generator=generator), torch.zeros(size, dtype=torch.long))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
