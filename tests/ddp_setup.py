"""The small QAT problem that tests/test_qat_ddp.py solves in one process and under torchrun
(tests/ddp_worker.py): tiny_resnet on 99 digits, batches of 33 (shards of 17 and 16 on two ranks)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from hawqc import data, models, quantize

STEPS, STOP, TRACE_ITERS = 6, 4, 5
# 8-bit, distillation, batch statistics for the first step only: fake-quantized training with batch statistics
# amplifies float rounding (a 1e-7 relative nudge after one step moves one process's weights by 1e-3 five steps
# on), so the comparison with one process is made where rounding noise stays at float level
QAT = {"lr": 0.05, "freeze_bn_step": 1, "checkpoint_every": 2}
_TRAIN = data.digits("train")
X, Y = _TRAIN.tensors[0][:99], _TRAIN.tensors[1][:99]
CALIB_BATCHES = [X[:33], X[33:66]]


def float_model() -> torch.nn.Module:
    """The same random tiny_resnet in every process, BatchNorm statistics set on the data."""
    torch.manual_seed(0)
    return models.recalibrate_bn(models.get("tiny_resnet", num_classes=10), [X])


def quant_model(model: torch.nn.Module, calib: list[torch.Tensor]) -> torch.nn.Module:
    return quantize(model, "uniform8", calib, observer="ema")


def loader() -> DataLoader:
    """Three shuffled batches of 33 per pass: six steps are two passes."""
    return DataLoader(TensorDataset(X, Y), batch_size=33, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def hessian_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[:16], Y[:16]), (X[16:32], Y[16:32])]
