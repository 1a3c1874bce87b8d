"""The NumPy front end: batches as NumPy arrays, never importing TensorFlow, JAX or torch."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from llm_activations.format import hooks as hk
from llm_activations.format import records
from llm_activations.reader import engine
from llm_activations.reader import shards as sh
from llm_activations.reader.buffers import BufferPool, shared_pool
from llm_activations.reader.engine import ReaderStats
from llm_activations.reader.options import ReaderOptions
from llm_activations.reader.spec import LayerSpec, delivery, layer_spec

TRANSCODER_PAIR = ("mlp_in", "mlp_out")


class Batches:
    """An iterator of batches with the pass's counters beside it: `.stats` (engine.ReaderStats).

    close() (or dropping the iterator) stops the reader's threads."""

    def __init__(self, batches: Iterator[dict], stats: ReaderStats, take: Callable[[dict], object]):
        self._batches = batches
        self._take = take
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        out = self._take(batch)
        del batch  # the caller's reference must be the last one (buffer reuse)
        return out

    def close(self) -> None:
        self._batches.close()


def _activations(batch: dict) -> np.ndarray:
    return batch[records.ACTIVATIONS]


def _pair(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    return batch[records.ACTIVATIONS], batch[engine.TARGET]


def _whole(batch: dict) -> dict:
    return batch


def pass_over(specs: tuple[LayerSpec, ...], opts: ReaderOptions, *, epoch: int | tuple[int, ...] = 0, pool: BufferPool | None = None,
              stats: ReaderStats | None = None, read_records=None, widen: bool = True) -> tuple[Iterator[dict], ReaderStats]:
    """One pass of the engine over specs (one hook, or an aligned pair) with opts: (dict batches, stats).
    widen=False: activations in the stored dtype (engine.run_pass)."""
    pool = pool or shared_pool()
    stats = stats if stats is not None else ReaderStats()
    deliveries = tuple(delivery(s, opts.max_norm_ratio, opts.normalize) for s in specs)
    read_records = read_records or (lambda shard: sh.read_shard(shard, opts.check_crc, pool))
    return engine.run_pass(specs, deliveries, opts, epoch=epoch, read_records=read_records, pool=pool, stats=stats,
                           widen=widen), stats


def numpy_batches(spec: LayerSpec, batch_size: int, *, pool: BufferPool | None = None,
                  stats: ReaderStats | None = None, **options) -> Batches:
    """iter_numpy_batches for a LayerSpec already read (callers that needed the spec first, such
    as jax_reader, do not read metadata.json twice). options: ReaderOptions' fields."""
    options.pop("hook", None)  # the spec names its hook
    opts = ReaderOptions.of(batch_size, hook=spec.hook, **options)
    batches, stats = pass_over((spec,), opts, pool=pool, stats=stats)
    return Batches(batches, stats, _whole if opts.with_metadata else _activations)


def iter_numpy_batches(path: str, layer: int, batch_size: int, *, hook: str = hk.DEFAULT, pool: BufferPool | None = None,
                       stats: ReaderStats | None = None, **options) -> Batches:
    """One pass over one hook's tokens at a layer as NumPy, never importing TensorFlow.

    Yields float32 [batch_size, width] arrays (width: hidden_size, or heads x head_dim for z);
    with_metadata: dicts as activation_dataset's. options are ReaderOptions' fields (shuffle_buffer,
    seed, drop_remainder, normalize, with_metadata, cycle_length, check_crc, max_norm_ratio).
    Same shuffle guarantees as activation_dataset (package doc); seed=None draws a fresh order.
    The returned iterator's `.stats` counts stored, dropped and delivered tokens as the pass runs.
    A batch's memory is reused once nothing refers to it (package doc): drop batches you are done with.
    """
    opts = ReaderOptions.of(batch_size, hook=hook, **options)
    return numpy_batches(layer_spec(path, layer, hook=hook), batch_size, pool=pool, stats=stats,
                         **{k: v for k, v in vars(opts).items() if k not in ("batch_size", "hook")})


def iter_numpy_pairs(path: str, layer: int, batch_size: int, *, hooks: tuple[str, str] = TRANSCODER_PAIR,
                     pool: BufferPool | None = None, stats: ReaderStats | None = None, **options) -> Batches:
    """One pass over two hooks of a layer read together, token for token (a transcoder's input and target).

    Yields (source [B, W1], target [B, W2]) float32 pairs; with_metadata: dicts with "activations"
    (source), "target" and the int64 lists. A token is dropped from both when either hook's norm
    is above its own threshold (max_norm_ratio x that hook's median); normalize scales each hook
    by its own factor. options: as iter_numpy_batches.
    """
    source, target = hooks
    opts = ReaderOptions.of(batch_size, hook=source, **options)
    specs = (layer_spec(path, layer, hook=source), layer_spec(path, layer, hook=target))
    batches, stats = pass_over(specs, opts, pool=pool, stats=stats)
    return Batches(batches, stats, _whole if opts.with_metadata else _pair)
