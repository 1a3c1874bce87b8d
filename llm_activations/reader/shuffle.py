"""The three shuffle stages (reader package doc): file order and interleave, the record shuffle
buffer, and window permutation. Pure functions of their input stream and generator."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from llm_activations.reader.buffers import BufferPool


def interleaved_records(files: list, cycle_length: int, read_records: Callable[[object], Iterator]) -> Iterator:
    """Records of files, cycle_length files open at a time, taken round-robin (tf.data interleave)."""
    pending = list(files)
    active = []
    while pending or active:
        while pending and len(active) < cycle_length:
            active.append(read_records(pending.pop(0)))
        for it in list(active):
            data = next(it, None)
            if data is None:
                active.remove(it)
            else:
                yield data


def shuffle_records(chunks: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Record-level shuffle buffer (stage 2): each record leaves uniformly at random."""
    buf: list = []
    for chunk in chunks:
        if len(buf) < buffer_size:
            buf.append(chunk)
            continue
        i = int(rng.integers(buffer_size))
        buf[i], chunk = chunk, buf[i]
        yield chunk
    for i in rng.permutation(len(buf)):
        yield buf[i]


def _rows(a: np.ndarray) -> np.ndarray:
    """[n, ...] -> [n, bytes per row] uint8 view: the scatter below copies rows of any dtype as bytes."""
    return a.reshape(len(a), -1).view(np.uint8)


def permuted_windows(chunks: Iterator[dict], window: int, rng: np.random.Generator, pool: BufferPool) -> Iterator[dict]:
    """Cut the token stream into windows of `window` tokens, each in a uniformly random order (stage 3).

    Each incoming token is scattered straight to its random slot of the window (one copy, no
    concatenate-then-gather). One window buffer serves the whole pass: the batcher has copied every
    token of a window into its own batches before it asks for the next one. A last, partial
    window of m tokens keeps the slots perm[:m]; reading them in increasing slot order is again a
    uniform random order. Every key of a chunk is permuted alike (token ids, a transcoder's pair).
    """
    buf: dict[str, np.ndarray] | None = None
    perm = rng.permutation(window)
    fill = 0
    for chunk in chunks:
        if buf is None:
            buf = {k: pool.take((window, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
            rows = {k: _rows(v) for k, v in buf.items()}
        n, start = len(next(iter(chunk.values()))), 0
        while start < n:
            take = min(n - start, window - fill)
            slots = perm[fill : fill + take]
            for k, v in chunk.items():
                rows[k][slots] = _rows(v[start : start + take])
            fill += take
            start += take
            if fill == window:
                yield buf
                perm, fill = rng.permutation(window), 0
    if buf is not None and fill:
        slots = np.sort(perm[:fill])
        yield {k: v[slots] for k, v in buf.items()}
