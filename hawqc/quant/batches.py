"""The QAT data stream: global batches cycled over epochs, cut to this rank's shard, resumable.

The stream is the sequence of batches one process iterating ``data`` pass after pass would see. Each
rank takes its contiguous shard of every batch (:meth:`hawqc.distributed.World.shard`). A
``DataLoader`` is re-iterated with its own sampler, collate function and workers but a batch sampler
that hands each rank only its shard's indices, so ranks load only their own samples; any other
iterable of ``(inputs, labels)`` batches is sliced after loading.

:meth:`BatchStream.state` is the position at which to continue, the same for every world size: the
batches consumed in the current pass, and the state of the sampler's random generator when the pass
began. Continuing replays the pass's permutation and skips those batches (a ``DataLoader`` skips
indices, loading nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from hawqc.distributed import World


class _ShardSampler(Sampler[list[int]]):
    """One pass of ``batches`` (index lists), after the first ``skip``, each cut to the rank's shard."""

    def __init__(self, batches: Iterable[list[int]], world: World, skip: int) -> None:
        self.batches, self.world, self.skip = batches, world, skip
        self.fingerprint: float | None = None

    def __iter__(self) -> Iterator[list[int]]:
        for i, indices in enumerate(self.batches):
            if i < self.skip:
                continue
            indices = list(indices)
            if self.fingerprint is None:
                positions = torch.arange(1, len(indices) + 1, dtype=torch.float64)
                self.fingerprint = float((torch.tensor(indices, dtype=torch.float64) * positions).sum())
            yield indices[self.world.shard(len(indices))]


class BatchStream:
    """Endless ``(inputs, labels)`` shards of ``data``'s global batches, from position ``state`` on.

    ``fingerprint`` identifies the first global batch drawn (its position-weighted indices, or its
    inputs' sum), for checking that all ranks draw the same batches."""

    def __init__(self, data: Iterable[Any], world: World, state: Mapping[str, Any] | None = None) -> None:
        self.data, self.world = data, world
        self.sampled = isinstance(data, DataLoader) and data.batch_sampler is not None
        self.generator = (data.generator or torch.default_generator) if self.sampled else None
        self.pass_step = int(state["pass_step"]) if state else 0
        self.pass_rng = state.get("rng") if state else None
        self.fingerprint: float | None = None

    def state(self) -> dict[str, Any]:
        """Where to continue: batches consumed in this pass and the generator state the pass began with."""
        return {"pass_step": self.pass_step, "rng": self.pass_rng}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = self.pass_step
        if self.generator is not None and self.pass_rng is not None:
            self.generator.set_state(self.pass_rng)
        while True:
            if self.generator is not None:
                self.pass_rng = self.generator.get_state()
            self.pass_step = skip
            empty = True
            for x, y in self._one_pass(skip):
                empty = False
                self.pass_step += 1
                yield x, y
            if empty and skip == 0:
                raise ValueError("training data is empty")
            skip = 0

    def _one_pass(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampled:
            sampler = _ShardSampler(self.data.batch_sampler, self.world, skip)
            for batch in _reloader(self.data, sampler):
                if self.fingerprint is None:
                    self.fingerprint = sampler.fingerprint
                yield batch[0], batch[1]
            return
        for i, (x, y) in enumerate(self.data):
            if i < skip:
                continue
            if self.fingerprint is None:
                self.fingerprint = float(x.detach().double().sum())
            part = self.world.shard(len(x))
            yield x[part], y[part]


def _reloader(loader: DataLoader, batch_sampler: Sampler[list[int]]) -> DataLoader:
    """``loader`` with another batch sampler (the same generator, so the same random draws)."""
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                      generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None)

