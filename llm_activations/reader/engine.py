"""The engine behind every front end: one pass over one hook (or an aligned pair of hooks) of a layer.

How it runs (`run_pass`): one thread shuffles records and reads and CRC-checks them (read() releases
the GIL), a second (only when a norm policy applies) drops massive-activation tokens, a third
permutes windows and writes float32 batches into reused buffers, and the caller only takes
finished batches off a queue. Work per token: one copy out of the page cache, one scatter into the
shuffle window, one cast into the batch (plus, with a norm policy, one float32 copy and sum of
squares); nothing is allocated per batch (buffers.BufferPool).
"""

from __future__ import annotations

import functools
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype
from llm_activations.reader import shards as sh
from llm_activations.reader import shuffle as sf
from llm_activations.reader.buffers import BufferPool
from llm_activations.reader.options import ReaderOptions
from llm_activations.reader.spec import Delivery, LayerSpec, ShardInfo

TARGET = "target"  # the second hook's activations in a transcoder pair's batches
_END = object()


@dataclass
class ReaderStats:
    """Counters of a pass, updated as it runs; a training loop reads them between batches.

    stored_tokens: tokens read from the shards so far (before any filter).
    dropped_tokens: tokens the massive-activation filter dropped (a pair's token counts once).
    delivered_tokens: tokens handed out in batches (drop_remainder's last partial batch is not).
    thresholds: {hook: norm above which its tokens are dropped} (inf: none dropped).
    filtered: False when the dataset had no norm histogram, or max_norm_ratio was None.
    """

    stored_tokens: int = 0
    dropped_tokens: int = 0
    delivered_tokens: int = 0
    thresholds: dict = field(default_factory=dict)
    filtered: bool = False

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_tokens / self.stored_tokens if self.stored_tokens else 0.0


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run a producer iterator in a background thread (file reads and NumPy copies release the GIL).

    When the consumer stops early the producer stops too, closes its iterator (which stops the
    threads behind it) and drops what it queued, so no thread keeps pooled buffers alive.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in it:
                sent = put(item)
                del item  # the queue's or the consumer's reference is the one that keeps it busy
                if not sent:
                    return
            put(done)
        except BaseException as e:  # surfaced in the consumer
            put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True, name="llm_activations-reader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item  # so that the consumer's reference is the last one
    finally:
        stop.set()
        with q.mutex:  # drop what was queued (no queue-module calls: this also runs at interpreter exit)
            q.queue.clear()
            q.not_full.notify_all()
        # Wait (for the item in progress, at most) so that a pass started right after this one
        # finds this one's buffers idle instead of allocating a second set.
        thread.join(timeout=10)


def _copy_into(dst: np.ndarray, src: np.ndarray, scale: float | None) -> None:
    """dst[...] = src (cast to dst's dtype), times scale if given, in one pass over dst."""
    if scale is None:
        np.copyto(dst, src, casting="unsafe")
    else:
        np.multiply(src, np.float32(scale), out=dst, dtype=dst.dtype, casting="unsafe")


NORM_BLOCK = 256  # tokens whose float32 copy is made at once to take their norms (3.5 MiB at width 3584)


def screen_band(width: int) -> float:
    """Relative half-width of the band around threshold**2 in which keep_mask's fast sum of squares
    cannot decide and the exact one runs. Any float32 sum of `width` squares is within
    g = width * 2**-24 / (1 - width * 2**-24) of the true sum, relative (nonnegative terms, any order,
    with or without FMA), so two such sums differ by under ~2g; 4g plus 1e-5 also covers the sqrt
    and the float32 threshold's rounding (~1e-7 each)."""
    u = width * 2.0**-24
    return 4 * u / (1 - u) + 1e-5


def keep_mask(acts: np.ndarray, threshold: float, scratch: list) -> np.ndarray | None:
    """bool [n]: tokens whose L2 norm (float32, from the stored values) is <= threshold; None: all kept.

    The norm that decides is np.einsum's float32 sum of squares, as before this screen existed.
    Each token's sum of squares is first taken by np.vecdot (BLAS, ~3x faster than einsum); only a
    token within screen_band of threshold**2 (or not finite) is summed again by einsum, so the
    decisions are einsum's bit for bit (the two sums are within the band of each other).
    A token with a nan or inf component is in no histogram bin (format/norms.py) and is dropped too.
    The float32 copy is made NORM_BLOCK tokens at a time into scratch[0], kept for the pass: one
    float32 copy of every record was a fresh multi-MiB array each time, and its page faults cost
    more than the reader's own work (135k faults per GiB, 2.5x the CPU time of an unfiltered pass)."""
    if math.isinf(threshold):
        return None
    n, width = acts.shape
    if not scratch or scratch[0].shape[1] != width:
        scratch[:] = [np.empty((NORM_BLOCK, width), np.float32)]
    sq = np.empty(n, np.float32)
    for start in range(0, n, NORM_BLOCK):
        block = scratch[0][: min(NORM_BLOCK, n - start)]
        np.copyto(block, acts[start : start + len(block)], casting="unsafe")
        np.vecdot(block, block, out=sq[start : start + len(block)])
    # plus what underflow (or a BLAS flushing subnormals) can lose: under 2**-126 per square, per sum
    band = screen_band(width) * threshold * threshold + width * 2.0**-125
    keep = sq < threshold * threshold - band
    unsure = np.flatnonzero(~(keep | (sq > threshold * threshold + band)))  # nan: unsure, too
    if len(unsure):
        exact = acts[unsure].astype(np.float32)
        keep[unsure] = np.sqrt(np.einsum("nh,nh->n", exact, exact)) <= threshold
    return keep


def rebatch(chunks: Iterator[dict], batch_size: int, drop_remainder: bool, scales: dict, pool: BufferPool,
            stats: ReaderStats, widen: bool = True) -> Iterator[dict]:
    """Copy the chunks' tokens into batches of batch_size: activations (the keys of scales) cast to
    float32 and scaled (widen=False: in the stored dtype, unscaled), int64 lists as they are.

    Every token is copied as soon as its chunk arrives, so no chunk is referenced after the next
    one is asked for, and the batches come from the pool rather than from concatenate/astype.
    """
    out: dict[str, np.ndarray] | None = None
    fill = 0
    for chunk in chunks:
        n, start = len(chunk[records.ACTIVATIONS]), 0
        while start < n:
            if out is None:
                out, fill = {}, 0
                for k, v in chunk.items():
                    if k in scales:
                        out[k] = pool.take((batch_size, *v.shape[1:]), np.float32 if widen else v.dtype)
                    else:
                        out[k] = np.empty((batch_size, *v.shape[1:]), v.dtype)  # small: int64 [batch]
            take = min(n - start, batch_size - fill)
            for k, v in chunk.items():
                _copy_into(out[k][fill : fill + take], v[start : start + take], scales.get(k))
            fill += take
            start += take
            if fill == batch_size:
                stats.delivered_tokens += batch_size
                yield out
                out = None
        del chunk
    if out is not None and fill and not drop_remainder:
        stats.delivered_tokens += fill
        yield {k: v[:fill] for k, v in out.items()}


def pass_rng(seed: int | None, epoch: int | tuple[int, ...]) -> np.random.Generator:
    """The pass's generator: [seed, epoch] (a tuple epoch, e.g. (epoch, worker, workers), extends it)."""
    key = epoch if isinstance(epoch, tuple) else (epoch,)
    return np.random.default_rng(None if seed is None else [seed, *key])


def _zip_shards(iters: list[Iterator], group: tuple[ShardInfo, ...]) -> Iterator[tuple]:
    """Records of a pair's shards side by side: the hooks of a layer hold the same rows, file for file."""
    while True:
        items = [next(it, _END) for it in iters]
        ended = [x is _END for x in items]
        if all(ended):
            return
        if any(ended):
            raise ValueError(f"{group[0].path} and {group[1].path} hold different numbers of records; "
                             "they must pair up one to one")
        yield tuple(items)


def run_pass(specs: tuple[LayerSpec, ...], deliveries: tuple[Delivery, ...], opts: ReaderOptions, *,
             epoch: int | tuple[int, ...], read_records: Callable[[ShardInfo], Iterator], pool: BufferPool,
             stats: ReaderStats, widen: bool = True) -> Iterator[dict]:
    """One pass: dicts of float32 "activations" [B, W] (a pair's second hook as "target" [B, W2]) and,
    with opts.with_metadata, the int64 [B] lists. widen=False delivers the stored dtype (bfloat16:
    what export's pass 1 keeps; it would narrow float32 right back) and refuses normalize.

    Thread 1 interleaves the files, shuffles records (stage 2) and reads them; thread 2 (only with
    a threshold) applies the norm filter; thread 3 permutes windows (stage 3) and fills batches.
    Each stage has its own generator, spawned from the pass's, so the order does not depend on how
    the threads run. Local
    uncompressed shards are shuffled as RecordRefs and read when released; other shards (gzip,
    URLs) are read first, by read_records. The filter drops tokens of each record after the record
    shuffle, so the order stays a pure function of (dataset, seed, options), and a pair read in one
    pass drops the same rows of both hooks.
    """
    if not widen and any(d.scale is not None for d in deliveries):
        raise ValueError("normalize needs float32 batches (widen=True)")
    rng = pass_rng(opts.seed, epoch)
    keys = (records.ACTIVATIONS, TARGET)[: len(specs)]
    dts = [numpy_dtype(s.dtype) for s in specs]
    groups = list(zip(*(s.shards for s in specs)))
    if opts.shuffled:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    record_rng, window_rng = rng.spawn(2)
    lazy = opts.shuffled and all(sh.is_lazy(s.path) for g in groups for s in g)
    reader = functools.partial(sh.record_refs, check_crc=opts.check_crc) if lazy else read_records
    thresholds = [d.threshold for d in deliveries]
    stats.thresholds = {s.hook: d.threshold for s, d in zip(specs, deliveries)}
    stats.filtered = any(not math.isinf(t) for t in thresholds)
    scratches = [[] for _ in specs]  # keep_mask's float32 block, one per hook, for the whole pass

    def read_group(group):
        return _zip_shards([reader(s) for s in group], group)

    def chunk_of(items: tuple) -> dict:
        chunk = {}
        for key, data, dt, spec in zip(keys, items, dts, specs):
            if opts.with_metadata and key == records.ACTIVATIONS:
                ex = records.decode_example(data, copy=False)
                chunk[key] = records.decode_activations(ex, dt, spec.hidden_size)
                chunk.update({k: ex[k] for k in records.INT_FEATURES})
            else:
                chunk[key] = sh.activations_only(data, dt, spec.hidden_size)
        n = len(chunk[records.ACTIVATIONS])
        if len(specs) > 1 and len(chunk[TARGET]) != n:
            raise ValueError(f"a record of {specs[0].hook} holds {n} tokens and its {specs[1].hook} pair "
                             f"{len(chunk[TARGET])} at layer {specs[0].layer}; the hooks do not pair up")
        stats.stored_tokens += n
        keep = None
        for key, t, scratch in zip(keys, thresholds, scratches):
            m = keep_mask(chunk[key], t, scratch)
            if m is not None:
                keep = m if keep is None else keep & m
        if keep is not None and not keep.all():
            stats.dropped_tokens += int(n - keep.sum())
            chunk = {k: v[keep] for k, v in chunk.items()}  # a copy: the pooled record buffer is free again
        return chunk

    def loaded():
        stream = sf.interleaved_records(groups, opts.cycle_length, read_group)
        if opts.shuffled:
            stream = sf.shuffle_records(stream, specs[0].record_buffer(opts.shuffle_buffer), record_rng)
        fds: dict = {}
        try:
            for item in stream:
                yield tuple(sh.load(r, opts.check_crc, fds, pool) for r in item) if lazy else item
                del item
        finally:
            for fd in fds.values():
                os.close(fd)

    def chunks():
        # Reading + CRC and the norm filter run on threads of their own: on one thread they
        # were ~0.5 CPU s/GiB, the slowest stage, while the batcher needed ~0.3.
        stream = prefetched(loaded(), depth=2) if stats.filtered else loaded()
        try:
            for item in stream:
                yield chunk_of(item)
                del item
        finally:
            stream.close()  # stops the reading thread now when the consumer stopped early

    def batches():
        stream = prefetched(chunks(), depth=4)
        if opts.shuffled:
            stream = sf.permuted_windows(stream, opts.shuffle_buffer, window_rng, pool)
        scales = {k: d.scale for k, d in zip(keys, deliveries)}
        return rebatch(stream, opts.batch_size, opts.drop_remainder, scales, pool, stats, widen)

    return prefetched(batches(), depth=2)
