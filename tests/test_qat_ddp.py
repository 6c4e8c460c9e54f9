"""Data-parallel QAT and Hessian traces under torchrun (2 CPU processes, gloo) against one process.

The ranks (tests/ddp_worker.py) calibrate on their shards of each batch, train with distillation and
BatchNorm folded with batch statistics then frozen, continue a one-process checkpoint, stop half-way
for one process to continue, and estimate Hessian traces with the probes shared out. Each must match
one process on the whole batches (tests/ddp_setup.py) within float tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_setup import CALIB_BATCHES, QAT, STEPS, STOP, TRACE_ITERS, float_model, hessian_batches, loader, quant_model

from hawqc.distributed import World
from hawqc.ilp.sensitivity import folded_weights, hessian_traces
from hawqc.quant.qat import train

pytestmark = pytest.mark.xdist_group("torchrun")
ROOT = Path(__file__).parents[1]


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _train(qmodel: torch.nn.Module, model: torch.nn.Module, **kwargs) -> list[float]:  # type: ignore[no-untyped-def]
    return train(qmodel, loader(), steps=STEPS, teacher=model, progress=False, **QAT, **kwargs)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Runs the workers once; a one-process checkpoint stopped at STOP is there for them to continue."""
    out = tmp_path_factory.mktemp("ddp")
    model = float_model()
    _train(quant_model(model, CALIB_BATCHES), model, checkpoint=out / "from1.pt", stop_at=STOP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(ROOT / "tests" / "ddp_worker.py"), str(out)], env=env, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, torch.load(out / "ddp.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process() -> tuple[dict, list[float]]:
    """The uninterrupted one-process run: final state and losses."""
    model = float_model()
    qmodel = quant_model(model, CALIB_BATCHES)
    losses = _train(qmodel, model)
    return qmodel.state_dict(), losses


def test_two_ranks_train_as_one_process_on_the_whole_batch(two_ranks, one_process) -> None:  # type: ignore[no-untyped-def]
    ddp, (state, losses) = two_ranks[1], one_process
    calibrated = quant_model(float_model(), CALIB_BATCHES)
    for name, scale in ddp["scales"].items():  # calibrated on shards: the whole batches' ranges
        torch.testing.assert_close(scale, calibrated.acts[name].scale, rtol=1e-6, atol=0)
    weight = "layers.conv1.layer.weight"
    assert not torch.allclose(calibrated.state_dict()[weight], state[weight], rtol=1e-3, atol=1e-4)  # it trained
    _close(ddp["uninterrupted"], state)
    torch.testing.assert_close(torch.tensor(ddp["stopped_losses"]), torch.tensor(losses[:STOP]), rtol=1e-4, atol=1e-5)


def test_a_stopped_run_resumes_across_world_sizes(two_ranks, one_process) -> None:  # type: ignore[no-untyped-def]
    (out, ddp), (state, _) = two_ranks, one_process
    _close(ddp["resumed"], state)  # 1 process stopped, 2 ranks continued
    assert torch.load(out / "from2.pt", weights_only=True)["step"] == STOP
    model = float_model()
    resumed = quant_model(model, CALIB_BATCHES)
    losses = _train(resumed, model, checkpoint=out / "from2.pt")  # 2 ranks stopped, 1 process continues
    assert len(losses) == STEPS - STOP
    _close(resumed.state_dict(), state)


def test_one_process_resumes_where_it_stopped_bit_for_bit(one_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state, losses = one_process
    model = float_model()
    stopped = quant_model(model, CALIB_BATCHES)
    assert _train(stopped, model, checkpoint=tmp_path / "qat.pt", stop_at=STOP) == losses[:STOP]
    resumed = quant_model(model, CALIB_BATCHES)
    assert _train(resumed, model, checkpoint=tmp_path / "qat.pt") == losses[STOP:]
    for name, tensor in state.items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_hutchinson_probes_shared_out_give_the_one_process_traces(two_ranks: tuple[Path, dict]) -> None:
    model = float_model()
    weights, acts, iters = hessian_traces(model, hessian_batches(), folded_weights(model), max_iters=TRACE_ITERS,
                                          activations=True)
    got_weights, got_acts, got_iters = two_ranks[1]["traces"]
    assert got_iters == iters == TRACE_ITERS
    for got, want in ((got_weights, weights), (got_acts, acts)):
        assert got.keys() == want.keys()
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())),
                                   rtol=1e-5, atol=0)


def test_shards_cover_a_batch_in_order() -> None:
    for n, size in ((33, 2), (10, 3), (4, 4)):
        parts = [World(rank, size).shard(n) for rank in range(size)]
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        World(0, 4).shard(3)
