"""Reused 64-byte-aligned buffers for records, shuffle windows and batches (an explicit pool object).

Why reuse at all: fresh multi-MiB arrays are fresh zero-filled pages from the kernel; when every
batch and window was a new allocation, page faults took most of the run (system time 53 of 76 s),
and how much depended on glibc's malloc thresholds.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

# The default shuffled pass holds one window (448 MiB at hidden 3584 bf16) and a few batches.
DEFAULT_MAX_BYTES = 4 << 30


class BufferPool:
    """Large 64-byte-aligned arrays, handed out again once nothing outside the pool refers to them.

    Why: a fresh array of several MiB is a fresh mmap that the kernel zero-fills page by page, and
    freeing it unmaps it again (glibc serves allocations above its mmap threshold, at most 32 MiB,
    that way). One float32 batch of 4096 x 3584 is 56 MiB, so one new array per batch cost more
    system time than the reader's own work, and how much depended on malloc's tuning.

    Reuse is decided by CPython reference counts, as NumPy's own ndarray.resize(refcheck=True)
    decides: each array handed out is a view whose .base is a pooled owner, and so is every
    slice or view made from it, while a tf.Tensor or jax.Array that wraps it without copying holds
    a reference to it. An owner referred to by the pool alone is unused, and is handed out again.
    A consumer that keeps its batches just makes the pool allocate, up to max_bytes, then plain
    arrays. 64-byte alignment is what TF needs to wrap an array instead of copying it.
    """

    ALIGN = 64

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._owners: list[np.ndarray] = []
        self._lock = threading.Lock()
        probe = [np.empty(0)]
        self._idle_refs = sys.getrefcount(probe[0])  # the list's reference + getrefcount's argument

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self._owners[i]) <= self._idle_refs

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self._owners)

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of shape and dtype, recycled if an idle buffer of a fitting size exists."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            for i in range(len(self._owners)):
                # capacity within 2x: a large window buffer is not spent on a small batch
                if n <= self._owners[i].nbytes - self.ALIGN <= 2 * n and self._idle(i):
                    return self._view(self._owners[i], shape, dtype, n)
            if self.nbytes + n > self.max_bytes:  # make room by dropping idle buffers of other sizes
                self._owners = [self._owners[i] for i in range(len(self._owners)) if not self._idle(i)]
            owner = np.empty(n + self.ALIGN, np.uint8)
            if self.nbytes + owner.nbytes <= self.max_bytes:
                self._owners.append(owner)
            return self._view(owner, shape, dtype, n)

    def _view(self, owner: np.ndarray, shape, dtype: np.dtype, n: int) -> np.ndarray:
        start = -owner.ctypes.data % self.ALIGN
        return owner[start : start + n].view(dtype).reshape(shape)

    def clear(self) -> None:
        with self._lock:
            self._owners = []


_shared: BufferPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> BufferPool:
    """The pool front ends use when the caller passes none: shared so that the next pass (a new
    iterator, a tf.data .repeat()) reuses this one's buffers. Pass pool= to keep a pass's memory apart."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = BufferPool(max_bytes=DEFAULT_MAX_BYTES)
        return _shared


def release_buffers() -> None:
    """Free the idle buffers the shared pool keeps for the next pass (those still in use stay alive)."""
    shared_pool().clear()
