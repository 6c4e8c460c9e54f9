"""Quantization-aware training with HAWQ-V3's recipe knobs.

SGD with Nesterov momentum 0.9 and weight decay 1e-4, step learning-rate decay, BatchNorm folded
with batch statistics until ``freeze_bn_step`` and with running statistics after it, optional
knowledge distillation from a float teacher (temperature 2.0, weight 0.9). Activation ranges stay
as calibrated. Checkpoints are written atomically and read with ``weights_only=True``; a run given
an existing checkpoint resumes from it, at the same place in the data. Under ``torchrun``, data-parallel
(see :func:`train`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hawqc import distributed
from hawqc.fileio import atomic_output
from hawqc.quant.batches import BatchStream
from hawqc.quant.model import QuantModel


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, weight: float) -> torch.Tensor:
    """``weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * CE(student, labels)``."""
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="batchmean") * temperature**2
    return weight * soft + (1.0 - weight) * F.cross_entropy(student, labels)


def train(qmodel: QuantModel, data: Iterable[Any], *, steps: int, lr: float = 1e-3, momentum: float = 0.9,
          weight_decay: float = 1e-4, lr_step_size: int | None = None, lr_gamma: float = 0.1,
          freeze_bn_step: int | None = None, teacher: nn.Module | None = None, kd_temperature: float = 2.0,
          kd_weight: float = 0.9, checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int = 100,
          stop_at: int | None = None, progress: bool = True) -> list[float]:
    """Fine-tune ``qmodel`` with fake quantization for ``steps`` optimizer steps over ``data``
    (an iterable of ``(inputs, labels)`` batches, cycled as needed). Returns the loss of each step
    run; the model is left in eval mode, integer simulation.

    ``stop_at`` ends this call after that step, the schedule still spanning ``steps`` (a run split over
    jobs: the next call with the same ``checkpoint`` continues where this one stopped, in the data too).

    Under ``torchrun`` the ranks train one model with DistributedDataParallel (:mod:`hawqc.distributed`):
    every rank is given the same ``data`` (a DataLoader: the same seeded generator) and takes its shard of
    each batch, BatchNorm statistics are those of the whole batch, so each step is the step one process
    takes on the whole batch. Rank 0 writes the checkpoint; any number of ranks can continue it."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be at least 1, got {stop_at}")
    world = distributed.setup()
    home = next(qmodel.parameters()).device
    teacher_home = next(teacher.parameters()).device if teacher is not None else home
    device = world.device or home
    qmodel.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_size or steps + 1, gamma=lr_gamma)
    start, position = _resume(checkpoint, qmodel, optimizer, scheduler, world)
    stream = BatchStream(data, world, position)
    net: nn.Module = qmodel
    if world.size > 1:
        net = DistributedDataParallel(qmodel, device_ids=[device.index] if device.type == "cuda" else None)
    losses: list[float] = []
    qmodel.train()
    qmodel.mode = "fake"
    for layer in qmodel.layers.values():
        layer.world = world
    try:
        with _progress(progress and world.main, steps, start) as advance:
            for step, (x, y) in zip(range(start, min(steps, stop_at or steps)), stream):
                if step == start:
                    world.check_same(stream.fingerprint, "QAT ranks drew different batches: give every rank the "
                                     "same data (a DataLoader with the same seeded generator)")
                x, y = x.to(device), y.to(device)
                for layer in qmodel.layers.values():
                    layer.freeze_bn = freeze_bn_step is not None and step >= freeze_bn_step
                batch = world.total(len(y))
                logits = net(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    loss = distillation_loss(logits, teacher_logits, y, kd_temperature, kd_weight)
                optimizer.zero_grad()
                # DDP averages the ranks' gradients: weighting each shard's mean loss by its share of the
                # batch makes that the gradient of the whole batch's mean loss, shards equal or not
                (loss * (len(y) * world.size / batch)).backward()
                optimizer.step()
                scheduler.step()
                losses.append(world.total(loss.item() * len(y)) / batch)
                advance(losses[-1])
                if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 in (steps, stop_at)):
                    _save(checkpoint, qmodel, optimizer, scheduler, step + 1, stream.state(), world)
    finally:
        for layer in qmodel.layers.values():
            layer.world = distributed.World()
        qmodel.eval()
        qmodel.mode = "int"
        qmodel.to(home)
        if teacher is not None:
            teacher.to(teacher_home)
    return losses


def train_float(model: nn.Module, data: torch.utils.data.DataLoader, epochs: int, lr: float = 0.1,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """Train a float model (the one to quantize): SGD with Nesterov momentum 0.9 and weight decay 5e-4,
    a one-cycle learning rate peaking at ``lr``; ``log`` gets a line per epoch. Returns it in eval mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(data))
    for epoch in range(epochs):
        model.train()
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` over ``(inputs, labels)`` batches."""
    correct = total = 0
    for x, y in data:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("accuracy: no data")
    return correct / total


def _save(path: str | os.PathLike[str], qmodel: QuantModel, optimizer: torch.optim.Optimizer, scheduler: Any,
          step: int, position: dict[str, Any], world: distributed.World) -> None:
    """Rank 0 writes the checkpoint (atomically) while the others wait."""
    if world.main:
        state = {"model": qmodel.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "data": position}
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
    world.barrier()


def _resume(path: str | os.PathLike[str] | None, qmodel: QuantModel, optimizer: torch.optim.Optimizer,
            scheduler: Any, world: distributed.World) -> tuple[int, dict[str, Any] | None]:
    """Load the checkpoint at ``path`` if there is one (rank 0 reads it, every rank gets it): the step to
    continue from and the position in the data."""
    if path is None:
        return 0, None
    state: Any = None
    if world.main and Path(path).exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            state = _not_a_checkpoint(path, err)
    state = world.broadcast(state)
    if state is None:
        return 0, None
    try:
        if isinstance(state, str):
            raise ValueError(state)
        qmodel.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise ValueError(_not_a_checkpoint(path, err)) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state.get("data")


def _not_a_checkpoint(path: str | os.PathLike[str], err: BaseException) -> str:
    return f"{path}: not a checkpoint of this model ({str(err).splitlines()[0]})"


class _progress:
    """A rich progress bar with the running loss (or nothing, when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("QAT"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
        self.bar.__enter__()
        task = self.bar.add_task("qat", total=self.total, completed=self.start, loss=float("nan"))
        return lambda loss: self.bar.update(task, advance=1, loss=loss)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
