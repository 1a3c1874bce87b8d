"""Downstream reading: activation shards -> shuffled [batch, hidden] float32 token batches.

One engine, three front ends with one meaning:

* `activation_dataset(...)` -> tf.data.Dataset, for trainers fed by tf.data. TensorFlow is imported
  inside the function only, so importing this module never loads it.
* `iter_numpy_batches(...)` -> iterator of NumPy arrays, for processes that must not import
  TensorFlow (JAX on TPU: TF can grab the accelerator).
* `llm_activations.jax_reader.device_batches(...)` -> jax.Arrays already on the device (or sharded
  over a mesh), transferred one batch ahead of the trainer.

Both take the schema (dtype, width, files, scaling factor) from metadata.json and refuse a
folder without one, or with an unknown format_version, in one line (errors.DatasetError). Both read
one hook point (`hook=`, default "resid_post") of one layer.

How it runs (`_pass`): one thread shuffles records and reads and CRC-checks them (read() releases
the GIL), a second permutes windows and writes float32 batches into reused buffers, and the caller
only takes finished batches off a queue. The activation_dataset wraps the same batches with Dataset.from_generator
(TF wraps 64-byte-aligned arrays without copying them), so for one seed both readers deliver the
same batches in the same order. Work per token: one copy out of the page cache, one scatter into
the shuffle window, one cast into the batch; nothing is allocated per batch (see BufferPool).
The reason: fresh multi-MiB arrays are fresh zero-filled pages from the kernel, and when every
batch and window was a new allocation, page faults took most of the run (system time 53 of 76 s),
and how much depended on glibc's malloc thresholds.

What the shuffle guarantees (both readers)
------------------------------------------
With `shuffle_buffer = W > 1` (tokens) the shuffle has three stages, none of them per-token:

1. Shard files are visited in a random order (a new one on each pass of a repeated tf.data
   dataset), `cycle_length` files at a time, their records interleaved round-robin.
2. Records (whole rows) pass through a record-level shuffle buffer holding about W tokens'
   worth of records (W / mean tokens per record, at least 2): each record leaves it uniformly at
   random from the buffer (tf.data shuffle semantics).
3. That record stream is cut into consecutive windows of exactly W tokens (the last one shorter)
   and each window's tokens are delivered in a uniformly random permutation, then batched.

So: every token of the layer is delivered exactly once per pass (except that
`drop_remainder=True` drops the final `< batch_size` tokens); with W >= batch_size a batch holds
tokens of one or two windows, i.e. drawn from about W tokens of ~W / tokens-per-record records
that come from several files; a record's tokens are scattered over its whole window, not kept
adjacent. There is no mixing across windows beyond stage 2, so pick W large (2**16 to 2**20
tokens; memory is about W x hidden x dtype size bytes for the window, plus a few records and
batches; twice that for gzip or URL shards, whose record buffer holds the records themselves:
local uncompressed ones are shuffled as file offsets and read when they leave the buffer).
With `seed` set the order is a pure function of (dataset, seed, arguments): the same call gives
the same pass, and the passes of a repeated tf.data dataset follow one reproducible sequence of
different orders (the first is iter_numpy_batches' order for the same seed). With seed=None the
order is fresh each time. Permuting whole windows with array operations
instead of passing single tokens through a buffer is what keeps the reader fast: a per-token
tf.data shuffle makes each 7 KiB token vector its own element (measured 0.47 GiB/s).

Hooks of one layer hold the same rows in the same order, and the reader's order depends on the
records' token counts only (never on their values or width): two hooks of one layer read with the
same seed and arguments come out aligned token for token (the transcoder example reads mlp_in and
mlp_out this way and checks doc_index/token_index).

`shuffle_buffer <= 1` disables shuffling: files in metadata order, records round-robin across
`cycle_length` files, tokens in record order.

Batches and reused buffers
--------------------------
The float32 batches come from a process-wide BufferPool: a batch's memory is written again only
once nothing refers to it any more (no array, view, slice, tf.Tensor or jax.Array made from it),
so keeping batches (`list(reader)`) is safe, merely slower. `release_buffers()` frees the idle
buffers the pool keeps for the next pass.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llm_activations.format import fileio
from llm_activations.format.dtypes import numpy_dtype  # noqa: F401 (re-exported: reader.numpy_dtype)
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import records
from llm_activations.errors import DatasetError, UsageError

DEFAULT_SHUFFLE_BUFFER = 1 << 16
DEFAULT_CYCLE_LENGTH = 8


@dataclass(frozen=True)
class LayerSpec:
    """What a reader needs to know about one hook of one layer of a dataset, taken from metadata.json."""

    root: str
    layer: int
    files: tuple[str, ...]  # full paths, metadata order
    dtype: str
    hidden_size: int  # values per token of this hook (heads x head_dim for z)
    compression: str
    scaling_factor: float | None
    tokens: int
    records: int
    hook: str = hk.DEFAULT

    def record_buffer(self, shuffle_buffer: int) -> int:
        """Records in the record-level shuffle buffer: about shuffle_buffer tokens' worth, >= 2."""
        per_record = self.tokens / self.records if self.records and self.tokens else 1
        return max(2, round(shuffle_buffer / per_record))

    @property
    def bytes_per_token(self) -> int:
        return self.hidden_size * numpy_dtype(self.dtype).itemsize


def _check_args(batch_size: int, shuffle_buffer: int) -> None:
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_buffer < 0:
        raise UsageError(f"shuffle_buffer must be >= 0 tokens (0 or 1: no shuffle), got {shuffle_buffer}")


def layer_spec(path: str, layer: int, *, hook: str = hk.DEFAULT, read_text=None) -> LayerSpec:
    """Read and check metadata.json of the dataset at path and describe `hook` at `layer`."""
    meta = md.read_metadata(path, read_text=read_text)
    files = tuple(md.shard_path(path, rel) for rel in md.layer_files(meta, layer, hook))
    if not files:
        raise DatasetError(f"{path}: hook {hook} at layer {layer} has no shard files")
    numpy_dtype(meta["dtype"])  # refuse unknown dtypes here, in one line
    stats = meta.get("stats", {}).get(hk.key(hook, layer), {})
    return LayerSpec(
        root=path,
        layer=layer,
        hook=hook,
        files=files,
        dtype=meta["dtype"],
        hidden_size=md.hook_width(meta, hook),
        compression=meta.get("compression") or records.compression_of(files[0]),
        scaling_factor=stats.get("scaling_factor"),
        tokens=int(meta.get("counts", {}).get("tokens", 0)),
        records=int(meta.get("counts", {}).get("sequences", 0)),
    )


def _scale(spec: LayerSpec, normalize: bool) -> float | None:
    if not normalize:
        return None
    if not spec.scaling_factor:
        raise DatasetError(f"{spec.root}: metadata has no scaling_factor for {spec.hook} at layer {spec.layer}; cannot normalize")
    return float(spec.scaling_factor)


def _gfile_read_text(path: str) -> str | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


# ----------------------------------------------------------------------------- reused buffers


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


# Process-wide, so that the next pass (a new iterator, a .repeat()) reuses this one's buffers.
# The default shuffled pass holds one window (448 MiB at hidden 3584 bf16) and a few batches.
_POOL = BufferPool(max_bytes=4 << 30)


def release_buffers() -> None:
    """Free the buffers the readers keep for their next pass (those still in use stay alive)."""
    _POOL.clear()


# ----------------------------------------------------------------------------- the engine


def _prefetched(it: Iterator, depth: int) -> Iterator:
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
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        # Wait (for the item in progress, at most) so that a pass started right after this one
        # finds this one's buffers idle instead of allocating a second set.
        thread.join(timeout=10)


def _framed_records(stream, check_crc: bool) -> Iterator[np.ndarray]:
    """records.iter_records, reading each record into a pooled buffer instead of a new bytes object.

    Why: read() returns a new bytes object per record (7 MiB at hidden 3584), and with records
    held in the queue and, for gzip or URL shards, in the record shuffle buffer, they churned the
    heap (tens of thousands of page faults per GiB). Buffers are sized in powers of two so that
    records of different lengths share them.
    """
    while True:
        header = stream.read(12)
        if not header:
            return
        length = records.record_length(header, check_crc)
        buf = _record_buffer(length)
        if _read_into(stream, buf) < len(buf):
            raise ValueError("truncated record")
        yield _checked(buf, check_crc)


# The TFRecord framing (records.frame_record): [length u64][masked crc32c of length u32][data][masked crc32c of data u32]


def _record_buffer(length: int) -> np.ndarray:
    """A pooled buffer for a record's data and its CRC (capacity a power of two, shared by similar lengths)."""
    return _POOL.take((1 << (length + 3).bit_length(),), np.uint8)[: length + 4]


def _checked(buf: np.ndarray, check_crc: bool) -> np.ndarray:
    """The data of a record read into buf (data + CRC), after checking the CRC."""
    data = buf[:-4]
    records.check_data_crc(data, buf[-4:], check_crc)
    return data


def _read_into(stream, buf: np.ndarray) -> int:
    """Fill buf from stream (readinto where the stream has it); the number of bytes read."""
    if not hasattr(stream, "readinto"):  # tf.io.gfile.GFile
        data = stream.read(len(buf))
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        return len(data)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_shard(path: str, check_crc: bool) -> Iterator[np.ndarray]:
    with records.open_shard(path) as stream:
        try:
            yield from _framed_records(stream, check_crc)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class _RecordRef:
    """Where a record of a local, uncompressed shard lies; read only when the shuffle releases it."""

    path: str
    offset: int  # of the record's data, after its 12-byte header
    length: int


def _record_refs(path: str, check_crc: bool = True) -> Iterator[_RecordRef]:
    """Walk a local, uncompressed shard's record headers, reading no data.

    Why: the record shuffle buffer then holds ~W tokens of (path, offset, length) instead of ~W
    tokens of record bytes (448 MiB at the defaults), and each record is read once, when it
    leaves the buffer, into a buffer the pool has just recycled (still in cache).
    """
    with open(path, "rb", buffering=0) as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        try:
            while pos < size:
                length = records.record_length(os.pread(f.fileno(), 12, pos), check_crc)
                if pos + 16 + length > size:
                    raise ValueError("truncated record")
                yield _RecordRef(path, pos + 12, length)
                pos += 16 + length
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _load(ref: _RecordRef, check_crc: bool, fds: dict) -> np.ndarray:
    """Read a released record into a pooled buffer; fds keeps one descriptor per file for the pass
    (opening the file for every record cost an open and a close per ~7 MiB)."""
    buf = _record_buffer(ref.length)
    fd = fds.get(ref.path)
    if fd is None:
        fd = fds[ref.path] = os.open(ref.path, os.O_RDONLY)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], ref.offset + got)
        if not n:
            raise ValueError(f"{ref.path}: truncated record")
        got += n
    try:
        return _checked(buf, check_crc)
    except ValueError as e:
        raise ValueError(f"{ref.path}: {e}") from None


def _activations_only(data: np.ndarray, dtype: np.dtype, hidden_size: int) -> np.ndarray:
    """[n, hidden] zero-copy view of a record's activations (its int64 lists are not decoded)."""
    acts = np.frombuffer(records.activation_bytes(data), dtype=dtype)
    if acts.size % hidden_size:
        raise ValueError(f"activations hold {acts.size} values, not a multiple of hidden size {hidden_size}")
    return acts.reshape(-1, hidden_size)


def _interleaved_records(files: list[str], cycle_length: int, read_records) -> Iterator:
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


def _shuffle_records(chunks: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Record-level shuffle buffer (module doc, stage 2): each record leaves uniformly at random."""
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


def _permuted_windows(chunks: Iterator[dict], window: int, rng: np.random.Generator) -> Iterator[dict]:
    """Cut the token stream into windows of `window` tokens, each in a uniformly random order.

    Each incoming token is scattered straight to its random slot of the window (one copy, no
    concatenate-then-gather). One window buffer serves the whole pass: _rebatch has copied every
    token of a window into its own batches before it asks for the next one. A last, partial
    window of m tokens keeps the slots perm[:m]; reading them in increasing slot order is again a
    uniform random order.
    """
    buf: dict[str, np.ndarray] | None = None
    perm = rng.permutation(window)
    fill = 0
    for chunk in chunks:
        if buf is None:
            buf = {k: _POOL.take((window, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
            rows = {k: _rows(v) for k, v in buf.items()}
        n, start = len(chunk[records.ACTIVATIONS]), 0
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


def _copy_into(dst: np.ndarray, src: np.ndarray, scale: float | None) -> None:
    """dst[...] = src (cast to dst's dtype), times scale if given, in one pass over dst."""
    if scale is None:
        np.copyto(dst, src, casting="unsafe")
    else:
        np.multiply(src, np.float32(scale), out=dst, dtype=dst.dtype, casting="unsafe")


def _rebatch(chunks: Iterator[dict], batch_size: int, drop_remainder: bool, scale: float | None) -> Iterator[dict]:
    """Copy the chunks' tokens into batches of batch_size: activations cast to float32 (and scaled).

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
                    if k == records.ACTIVATIONS:
                        out[k] = _POOL.take((batch_size, *v.shape[1:]), np.float32)
                    else:
                        out[k] = np.empty((batch_size, *v.shape[1:]), v.dtype)  # small: int64 [batch]
            take = min(n - start, batch_size - fill)
            for k, v in chunk.items():
                _copy_into(out[k][fill : fill + take], v[start : start + take], scale if k == records.ACTIVATIONS else None)
            fill += take
            start += take
            if fill == batch_size:
                yield out
                out = None
        del chunk
    if out is not None and fill and not drop_remainder:
        yield {k: v[:fill] for k, v in out.items()}


def _pass_rng(seed: int | None, epoch: int) -> np.random.Generator:
    return np.random.default_rng(None if seed is None else [seed, epoch])


def _pass(
    spec: LayerSpec,
    batch_size: int,
    *,
    shuffle_buffer: int,
    rng: np.random.Generator,
    drop_remainder: bool,
    scale: float | None,
    with_metadata: bool,
    cycle_length: int,
    read_records,
    check_crc: bool = True,
) -> Iterator[dict]:
    """One pass over a layer: dicts of float32 "activations" [B, H] (and int64 [B] lists if with_metadata).

    Thread 1 interleaves the files, shuffles records (stage 2) and reads them; thread 2 permutes
    windows (stage 3) and fills batches. Each stage has its own generator, spawned from rng, so
    the order does not depend on how the threads run. Local uncompressed shards are shuffled as
    _RecordRefs and read when released; other shards (gzip, URLs) are read first, by read_records.
    """
    dt, h = numpy_dtype(spec.dtype), spec.hidden_size
    shuffle = shuffle_buffer > 1
    files = list(spec.files)
    if shuffle:
        files = [files[i] for i in rng.permutation(len(files))]
    record_rng, window_rng = rng.spawn(2)
    lazy = shuffle and all(not fileio.is_url(f) and records.compression_of(f) == "none" for f in files)

    def chunk_of(data: np.ndarray) -> dict:
        if with_metadata:
            ex = records.decode_example(data)
            chunk = {records.ACTIVATIONS: records.decode_activations(ex, dt, h)}
            chunk.update({k: ex[k] for k in records.INT_FEATURES})
            return chunk
        return {records.ACTIVATIONS: _activations_only(data, dt, h)}

    def chunks():
        stream = _interleaved_records(files, max(1, cycle_length), functools.partial(_record_refs, check_crc=check_crc) if lazy else read_records)
        if shuffle:
            stream = _shuffle_records(stream, spec.record_buffer(shuffle_buffer), record_rng)
        fds: dict = {}
        try:
            for item in stream:
                yield chunk_of(_load(item, check_crc, fds) if lazy else item)
                del item
        finally:
            for fd in fds.values():
                os.close(fd)

    def batches():
        stream = _prefetched(chunks(), depth=4)
        if shuffle:
            stream = _permuted_windows(stream, shuffle_buffer, window_rng)
        return _rebatch(stream, batch_size, drop_remainder, scale)

    return _prefetched(batches(), depth=2)


# ----------------------------------------------------------------------------- NumPy


def iter_numpy_batches(
    path: str,
    layer: int,
    batch_size: int,
    *,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
    drop_remainder: bool = True,
    normalize: bool = False,
    with_metadata: bool = False,
    cycle_length: int = DEFAULT_CYCLE_LENGTH,
    check_crc: bool = True,
    hook: str = hk.DEFAULT,
) -> Iterator:
    """One pass over one hook's tokens at a layer as NumPy, never importing TensorFlow.

    Yields float32 [batch_size, width] arrays (width: hidden_size, or heads x head_dim for z) (with_metadata: dicts as activation_dataset's).
    Same shuffle guarantees as activation_dataset (module doc); seed=None draws a fresh order.
    Reading, CRC checks, shuffling and the float32 cast run in two background threads. A batch's
    memory is reused once nothing refers to it (module doc): drop batches you are done with.
    """
    _check_args(batch_size, shuffle_buffer)
    return numpy_batches(layer_spec(path, layer, hook=hook), batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                         drop_remainder=drop_remainder, normalize=normalize, with_metadata=with_metadata,
                         cycle_length=cycle_length, check_crc=check_crc)


def numpy_batches(spec: LayerSpec, batch_size: int, *, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  seed: int | None = None, drop_remainder: bool = True, normalize: bool = False,
                  with_metadata: bool = False, cycle_length: int = DEFAULT_CYCLE_LENGTH, check_crc: bool = True) -> Iterator:
    """iter_numpy_batches for a LayerSpec already read (callers that needed the spec first, such
    as jax_reader, do not read metadata.json twice)."""
    _check_args(batch_size, shuffle_buffer)
    batches = _pass(
        spec, batch_size, shuffle_buffer=shuffle_buffer, rng=_pass_rng(seed, 0), drop_remainder=drop_remainder,
        scale=_scale(spec, normalize), with_metadata=with_metadata, cycle_length=cycle_length,
        read_records=lambda f: _read_shard(f, check_crc), check_crc=check_crc,
    )
    return batches if with_metadata else _activations_of(batches)


def _activations_of(batches: Iterator[dict]) -> Iterator[np.ndarray]:
    for batch in batches:
        acts = batch[records.ACTIVATIONS]
        del batch
        yield acts


# ----------------------------------------------------------------------------- tf.data


def _gfile_records(path: str) -> Iterator[bytes]:
    """Records of a shard at any tf.io.gfile location (gs://, ram://, ...), CRC-checked."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if records.compression_of(path) == "gzip" else raw
        yield from _framed_records(stream, check_crc=True)


def activation_dataset(
    path: str,
    layer: int,
    batch_size: int,
    *,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
    drop_remainder: bool = True,
    normalize: bool = False,
    with_metadata: bool = False,
    cycle_length: int = DEFAULT_CYCLE_LENGTH,
    hook: str = hk.DEFAULT,
):
    """A tf.data.Dataset of one pass over one hook's tokens at a layer (module doc: the shuffle).

    Elements: float32 [batch_size, width] activations (width: hidden_size, or heads x head_dim for z); with_metadata: a dict with
    "activations" and int64 [batch_size] "token_ids", "doc_index", "token_index", "position".
    normalize multiplies activations by the layer's stored scaling_factor (sqrt(H) / mean norm).
    path may be any tf.io.gfile location (local, gs://...). Call .repeat() for more passes, each in
    a new order; the first pass is iter_numpy_batches' pass for the same seed, batch for batch.

    Speed: the batches are made by the NumPy engine in background threads and handed to TF
    without a copy (Dataset.from_generator). A tf.data graph of parse / decode_raw / rebatch /
    gather / cast allocated a new tensor at every stage for every record, window and batch and
    ran at 0.2-1 GiB/s shuffled; this runs at the NumPy reader's speed. The price: the dataset
    runs Python in this process, so it cannot be serialised to tf.data service workers.
    """
    _check_args(batch_size, shuffle_buffer)
    import tensorflow as tf

    spec = layer_spec(path, layer, hook=hook, read_text=_gfile_read_text if fileio.is_url(path) else None)
    scale = _scale(spec, normalize)
    read_records = _gfile_records if fileio.is_url(path) else functools.partial(_read_shard, check_crc=True)
    passes = itertools.count()  # each iteration of the dataset (each .repeat() pass) draws the next order

    def generate():
        batches = _pass(
            spec, batch_size, shuffle_buffer=shuffle_buffer, rng=_pass_rng(seed, next(passes)),
            drop_remainder=drop_remainder, scale=scale, with_metadata=with_metadata, cycle_length=cycle_length,
            read_records=read_records,
        )
        return batches if with_metadata else _activations_of(batches)

    rows = batch_size if drop_remainder else None
    signature = {records.ACTIVATIONS: tf.TensorSpec((rows, spec.hidden_size), tf.float32)}
    signature.update({k: tf.TensorSpec((rows,), tf.int64) for k in records.INT_FEATURES})
    return tf.data.Dataset.from_generator(
        generate, output_signature=signature if with_metadata else signature[records.ACTIVATIONS]
    )
