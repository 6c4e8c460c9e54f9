"""One rank of tests/test_qat_ddp.py, started by ``python -m torch.distributed.run``: ``ddp_worker.py OUT``.

Calibrates on its shards of the calibration batches, runs QAT (distillation, BatchNorm frozen half-way)
uninterrupted, continues a checkpoint one process stopped, stops a run of its own half-way, and
estimates Hessian traces; rank 0 saves the results in OUT for the test to compare with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ddp_setup import CALIB_BATCHES, QAT, STEPS, STOP, TRACE_ITERS, float_model, hessian_batches, loader, quant_model

from hawqc import distributed
from hawqc.ilp.sensitivity import folded_weights, hessian_traces
from hawqc.quant.qat import train


def main(out: Path) -> None:
    world = distributed.setup()
    model = float_model()
    part = world.shard(len(CALIB_BATCHES[0]))
    sharded = quant_model(model, [x[part] for x in CALIB_BATCHES])
    results = {"scales": {k: q.scale.clone() for k, q in sharded.acts.items()}}
    # QAT starts from the scales one process has: the shards' are equal only to float precision, and a
    # scale one ulp off moves rounding boundaries, which fake-quantized training amplifies
    qmodel = quant_model(model, CALIB_BATCHES)
    initial = _state(qmodel)

    train(qmodel, loader(), steps=STEPS, teacher=model, progress=False, **QAT)
    results["uninterrupted"] = _state(qmodel)

    qmodel.load_state_dict(initial)  # continue the checkpoint one process stopped at STOP
    train(qmodel, loader(), steps=STEPS, teacher=model, checkpoint=out / "from1.pt", progress=False, **QAT)
    results["resumed"] = _state(qmodel)

    qmodel.load_state_dict(initial)  # stop at STOP for one process to continue
    losses = train(qmodel, loader(), steps=STEPS, teacher=model, checkpoint=out / "from2.pt", stop_at=STOP,
                   progress=False, **QAT)
    results["stopped_losses"] = losses

    fold = folded_weights(model)
    results["traces"] = hessian_traces(model, hessian_batches(), fold, max_iters=TRACE_ITERS, activations=True)
    if world.main:
        torch.save(results, out / "ddp.pt")
    distributed.shutdown()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state (``state_dict`` shares the tensors the next run overwrites)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
