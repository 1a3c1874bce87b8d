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
        yield from _gathered(buf, np.sort(perm[:fill]), pool)


TAIL_PIECE = 4096  # tokens of the last window gathered at a time (28 MiB at hidden 3584 bf16)


def _gathered(buf: dict[str, np.ndarray], slots: np.ndarray, pool: BufferPool) -> Iterator[dict]:
    """buf's rows at slots, in that order, as pieces in one reused pooled buffer per key.

    Why pieces: gathering the whole last window (up to a window minus one token, 186 MiB in the
    bench) was a new array every pass, and zero-filling its fresh pages was ~15% of a shuffled
    pass's CPU. mode="clip" because take(out=, mode="raise") buffers a whole extra copy; slots are
    in range."""
    pieces = {k: pool.take((min(TAIL_PIECE, len(slots)), *v.shape[1:]), v.dtype) for k, v in buf.items()}
    for start in range(0, len(slots), TAIL_PIECE):
        part = slots[start : start + TAIL_PIECE]
        out = {k: p[: len(part)] for k, p in pieces.items()}
        for k, v in buf.items():
            np.take(_rows(v), part, axis=0, out=_rows(out[k]), mode="clip")
        yield out
