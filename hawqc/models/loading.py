"""One loader for "a model spec", used by every command and by :func:`hawqc.api.load_model`.

A spec is a built-in model name (``resnet50``), a ``torch.export`` program (``model.pt2``), a float
ONNX model (``model.onnx``) or a ``package.module:factory`` that returns an ``nn.Module`` (importable
from the current folder or ``PYTHONPATH``). ``checkpoint`` (a ``state_dict``, read with
``weights_only=True`` and loaded strictly) goes with built-in names and factories; ``.pt2`` and ONNX
files carry their weights.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hawqc import models


@dataclass
class LoadedModel:
    """A float model and what the commands need to know about it."""

    module: Any
    """The ``nn.Module`` in eval mode."""
    name: str
    """A short name for titles and output files (``resnet50``, ``mynet`` for ``mynet.pt2``)."""
    input_shape: tuple[int, ...] | None
    """``(C, H, W)`` the model takes, None where the spec does not say (a factory, a dynamic ONNX input)."""
    random_weights: bool
    """A built-in model or a factory loaded without a checkpoint."""


def load(spec: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any) -> LoadedModel:
    """The model a spec names (see the module docstring); ``kwargs`` (e.g. ``num_classes``) go to a built-in
    model's or a factory's constructor."""
    text = str(spec)
    suffix = Path(text).suffix.lower()
    if suffix in (".pt2", ".onnx"):
        if checkpoint is not None or kwargs:
            raise ValueError(f"{text} carries its weights and classifier: --checkpoint and --num-classes do not apply")
        if suffix == ".pt2":
            from hawqc.models import exported

            module, shape = exported.load(text)
        else:
            from hawqc.models import onnx_float

            module, shape = onnx_float.load(text)
        chw = tuple(shape[1:]) if len(shape) == 4 and all(d is not None for d in shape[1:]) else None
        return LoadedModel(module.eval(), Path(text).stem, chw, False)  # type: ignore[arg-type]
    if text in models.MODELS:
        module = models.get(text, **kwargs)
        shape = models.spec(text).input_shape
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        module, shape = _factory(text, **kwargs), None
    elif Path(text).exists():
        raise ValueError(f"{text}: not a model file hawqc reads: give a .onnx or .pt2 file (or a .int.npz to a "
                         "command that compiles), a built-in name or package.module:factory")
    else:
        raise ValueError(f"unknown model {text!r}: give a built-in name ({', '.join(models.MODELS)}), a .pt2 "
                         "torch.export program, a float .onnx model or package.module:factory")
    if checkpoint is not None:
        load_checkpoint(module, checkpoint, text)
    return LoadedModel(module.eval(), text.rpartition(":")[2] if ":" in text else text, shape, checkpoint is None)


def _factory(spec: str, **kwargs: Any) -> Any:
    """``package.module:factory`` called with ``kwargs``; the current folder is searched first."""
    from torch import nn

    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {spec}: {err}") from None
    finally:
        sys.path.remove(os.getcwd())
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"{spec}(): {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(module: Any, checkpoint: str | os.PathLike[str], name: str) -> None:
    """Load a ``state_dict`` (or ``{"state_dict": ...}``) strictly, read with ``weights_only=True``."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {checkpoint} does not exist") from None
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise ValueError(f"{checkpoint}: not a loadable weights file ({str(err).splitlines()[0]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{checkpoint} does not fit {name}: {str(err).splitlines()[0]}") from None
