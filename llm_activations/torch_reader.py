"""Activation batches for PyTorch trainers (SAELens, dictionary_learning, plain torch).

    from llm_activations.torch_reader import torch_batches
    for x in torch_batches(path, layer=3, batch_size=4096, seed=0, normalize=True):
        loss = step(x)            # x: float32 torch.Tensor [4096, width], on the CPU

The batches are the NumPy reader's (reader.iter_numpy_batches), wrapped with torch.from_numpy: no
copy, the same batches in the same order for the same seed and options, with the same filters
(max_norm_ratio) and counters (`.stats`). A tensor keeps its NumPy buffer alive, so the reader's
BufferPool reuses a batch's memory only once the tensor (and every view of it) is gone.

`TorchActivations` is an IterableDataset for `DataLoader(ds, batch_size=None, num_workers=N)`:
worker w of N reads the shard files w, w + N, ... (each token once over all workers; a worker with
no file yields nothing), shuffled with its own generator [seed, epoch, w, N]; call set_epoch(e)
for a new order each epoch. The DataLoader copies worker batches into shared memory (its own
design); torch_batches in the training process has no copy at all.

This is the only module of the package that imports torch; torch is an optional dependency.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from llm_activations import reader
from llm_activations.format import hooks as hk
from llm_activations.reader.options import ReaderOptions


class TorchBatches:
    """Iterator of float32 tensors (dicts of tensors with with_metadata; pairs of tensors for pairs),
    with the pass's counters as `.stats` (reader.ReaderStats)."""

    def __init__(self, batches: reader.Batches):
        self._batches = batches
        self.stats = batches.stats

    def __iter__(self):
        return self

    def __next__(self):
        return _to_torch(next(self._batches))

    def close(self) -> None:
        self._batches.close()


def _to_torch(batch):
    if isinstance(batch, dict):
        return {k: torch.from_numpy(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(torch.from_numpy(v) for v in batch)
    return torch.from_numpy(batch)


def torch_batches(path: str, layer: int, batch_size: int, *, hook: str = hk.DEFAULT, **options) -> TorchBatches:
    """One pass over one hook's tokens at a layer: float32 tensors [batch_size, width], zero-copy.

    options: reader.ReaderOptions' fields (seed, shuffle_buffer, normalize, drop_remainder,
    max_norm_ratio, with_metadata, ...) plus pool= and stats=, exactly as iter_numpy_batches.
    """
    return TorchBatches(reader.iter_numpy_batches(path, layer, batch_size, hook=hook, **options))


def torch_pairs(path: str, layer: int, batch_size: int, *, hooks: tuple[str, str] = reader.TRANSCODER_PAIR,
                **options) -> TorchBatches:
    """reader.iter_numpy_pairs as tensors: (source [B, W1], target [B, W2]), the same rows of both hooks."""
    return TorchBatches(reader.iter_numpy_pairs(path, layer, batch_size, hooks=hooks, **options))


class TorchActivations(torch.utils.data.IterableDataset):
    """One hook of one layer as an IterableDataset of whole batches: use DataLoader(ds, batch_size=None).

    Without workers (num_workers=0) an epoch is torch_batches' pass for (seed, epoch). With N
    workers, worker w reads files w::N. stats counts this process's pass only (workers have theirs).
    """

    def __init__(self, path: str, layer: int, batch_size: int, *, hook: str = hk.DEFAULT, **options):
        self.options = ReaderOptions.of(batch_size, hook=hook, **options)  # checked here, in the main process
        self.spec = reader.layer_spec(path, layer, hook=hook)
        self.epoch = 0
        self.stats = reader.ReaderStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        spec, key = self.spec, self.epoch
        if info is not None:
            spec = dataclasses.replace(spec, files=spec.files[info.id :: info.num_workers],
                                       shards=spec.shards[info.id :: info.num_workers])
            key = (self.epoch, info.id, info.num_workers)
            if not spec.files:
                return iter(())
        batches, _ = reader.pass_over((spec,), self.options, epoch=key, stats=self.stats)
        take = (lambda b: b) if self.options.with_metadata else (lambda b: b["activations"])
        return TorchBatches(reader.Batches(batches, self.stats, take))
