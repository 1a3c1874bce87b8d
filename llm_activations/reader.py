"""Downstream reading: activation shards -> shuffled [batch, hidden] float32 token batches.

Two readers with one meaning:

* `activation_dataset(...)` -> tf.data.Dataset, for trainers fed by tf.data. TensorFlow is imported
  inside the function only, so importing this module never loads it.
* `iter_numpy_batches(...)` -> iterator of NumPy arrays, for processes that must not import
  TensorFlow (JAX on TPU: TF can grab the accelerator). It reads shards with records.read_shard.

Both take the schema (dtype, width, files, scaling factor) from metadata.json and refuse a
folder without one, or with an unknown format_version, in one line (errors.DatasetError). Both read
one hook point (`hook=`, default "resid_post") of one layer.

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
tokens; memory is about 3 x W x hidden x dtype size bytes). With `seed` set the order is a pure
function of (dataset, seed, arguments): the same call gives the same pass, and the passes of a
repeated tf.data dataset follow one reproducible sequence of different orders. With seed=None
the order is fresh each time, and the tf.data reader also lets parallel reads finish out of
order (faster). Permuting whole windows with array ops instead of passing single tokens through
a buffer is what keeps the reader near or above 1 GiB/s: a per-token tf.data shuffle makes each
7 KiB token vector its own element and measured 0.47 GiB/s against ~1.5 GiB/s on 2 CPU cores.

Hooks of one layer hold the same rows in the same order, and the NumPy reader's order depends on
the records' token counts only (never on their values or width): two hooks of one layer read by
iter_numpy_batches with the same seed and arguments come out aligned token for token (the
transcoder example reads mlp_in and mlp_out this way and checks doc_index/token_index).

`shuffle_buffer <= 1` disables shuffling: files in metadata order, records round-robin across
`cycle_length` files, tokens in record order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import records
from llm_activations.errors import DatasetError, UsageError

DEFAULT_SHUFFLE_BUFFER = 1 << 16
DEFAULT_CYCLE_LENGTH = 8
DTYPES = ("bfloat16", "float16", "float32")


def numpy_dtype(name: str) -> np.dtype:
    """Storage dtype name from metadata.json -> little-endian NumPy dtype (bfloat16 via ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise DatasetError(f"metadata dtype {name!r} is not one of {', '.join(DTYPES)}")
    return np.dtype(name).newbyteorder("<")


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


# ----------------------------------------------------------------------------- tf.data


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
    path may be any tf.io.gfile location (local, gs://...). Call .repeat() for more passes.

    Speed: each record is one parse_single_example + decode_raw into [n, hidden]; windows and
    batches are cut with Dataset.rebatch and permuted with one gather: no per-token elements.
    """
    _check_args(batch_size, shuffle_buffer)
    import tensorflow as tf

    spec = layer_spec(path, layer, hook=hook, read_text=_gfile_read_text if "://" in path else None)
    scale = _scale(spec, normalize)
    h = spec.hidden_size
    tf_dtype = tf.dtypes.as_dtype(spec.dtype)
    shuffle = shuffle_buffer > 1
    deterministic = seed is not None or not shuffle
    autotune = tf.data.AUTOTUNE

    int_keys = records.INT_FEATURES if with_metadata else ()
    features = {records.ACTIVATIONS: tf.io.FixedLenFeature([], tf.string)}
    features.update({k: tf.io.VarLenFeature(tf.int64) for k in int_keys})

    def decode(serialized):  # one Example -> {key: [n, ...]}; parse + one decode_raw, no per-token work
        parsed = tf.io.parse_single_example(serialized, features)
        out = {records.ACTIVATIONS: tf.reshape(tf.io.decode_raw(parsed[records.ACTIVATIONS], tf_dtype), [-1, h])}
        out.update({k: parsed[k].values for k in int_keys})
        return out

    def permute(window, pair):  # a uniform permutation of one window's tokens, stateless-seeded
        n = tf.shape(window[records.ACTIVATIONS])[0]
        perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed=pair)
        return {k: tf.gather(v, perm) for k, v in window.items()}

    def finish(batch):  # storage dtype -> float32 (and scale) once per batch, not per token
        acts = tf.cast(batch[records.ACTIVATIONS], tf.float32)
        if scale is not None:
            acts = acts * scale
        if not with_metadata:
            return acts
        return {**batch, records.ACTIVATIONS: acts}

    files = tf.data.Dataset.from_tensor_slices(list(spec.files))
    if shuffle:
        files = files.shuffle(len(spec.files), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP" if spec.compression == "gzip" else "", buffer_size=8 << 20),
        cycle_length=max(1, min(cycle_length, len(spec.files))),
        block_length=1,
        num_parallel_calls=autotune,
        deterministic=deterministic,
    )
    if shuffle:
        ds = ds.shuffle(spec.record_buffer(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=autotune, deterministic=deterministic)
    if shuffle:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds.rebatch(shuffle_buffer), seeds)
        ds = ds.map(permute, num_parallel_calls=autotune, deterministic=True)
    ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(finish, num_parallel_calls=autotune, deterministic=True)
    return ds.prefetch(autotune)


# ----------------------------------------------------------------------------- NumPy


def _to_float32(x: np.ndarray) -> np.ndarray:
    # ml_dtypes' bfloat16 -> float32 cast is vectorised (measured faster than a uint16 shift trick).
    return x.astype(np.float32)


def _activations_only(data: bytes, dtype: np.dtype, hidden_size: int) -> np.ndarray:
    """[n, hidden] zero-copy view of a record's activations (its int64 lists are not decoded)."""
    acts = np.frombuffer(records.activation_bytes(data), dtype=dtype)
    if acts.size % hidden_size:
        raise ValueError(f"activations hold {acts.size} values, not a multiple of hidden size {hidden_size}")
    return acts.reshape(-1, hidden_size)


def _interleaved_records(files: list[str], cycle_length: int, check_crc: bool) -> Iterator[bytes]:
    """Records of files, cycle_length files open at a time, taken round-robin (tf.data interleave)."""
    pending = list(files)
    active = []
    while pending or active:
        while pending and len(active) < cycle_length:
            active.append(records.read_shard(pending.pop(0), check_crc))
        for it in list(active):
            data = next(it, None)
            if data is None:
                active.remove(it)
            else:
                yield data


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """Run a producer iterator in a background thread (file reads and memcpy release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
            return
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _shuffle_records(chunks: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Record-level shuffle buffer (module doc, stage 2): each record leaves uniformly at random."""
    buf: list[dict] = []
    for chunk in chunks:
        if len(buf) < buffer_size:
            buf.append(chunk)
            continue
        i = int(rng.integers(buffer_size))
        buf[i], chunk = chunk, buf[i]
        yield chunk
    for i in rng.permutation(len(buf)):
        yield buf[i]


def _permuted_windows(chunks: Iterator[dict], window: int, rng: np.random.Generator, reuse: bool) -> Iterator[dict]:
    """Cut the token stream into windows of `window` tokens, each in a uniformly random order.

    Each incoming token is scattered straight to its random slot of a preallocated window (one
    copy, no concatenate-then-gather). A last, partial window of m tokens keeps the slots
    perm[:m]; reading them in increasing slot order is again a uniform random order.
    """
    buf: dict[str, np.ndarray] | None = None
    spare: dict[str, np.ndarray] | None = None
    perm = rng.permutation(window)
    fill = 0
    for chunk in chunks:
        if buf is None:
            buf = {k: np.empty((window, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
        n, start = len(chunk[records.ACTIVATIONS]), 0
        while start < n:
            take = min(n - start, window - fill)
            slots = perm[fill : fill + take]
            for k, v in chunk.items():
                buf[k][slots] = v[start : start + take]
            fill += take
            start += take
            if fill == window:
                yield buf
                # reuse: two buffers in turn, which avoids page-faulting a fresh window-sized
                # allocation each time. Safe when window >= batch_size: _rebatch then copies out
                # every token of a window (its leftover joined with the next window) before it
                # asks for the window after next.
                if reuse:
                    spare = spare or {k: np.empty_like(v) for k, v in buf.items()}
                    buf, spare = spare, buf
                else:
                    buf = {k: np.empty_like(v) for k, v in buf.items()}
                perm, fill = rng.permutation(window), 0
    if buf is not None and fill:
        slots = np.sort(perm[:fill])
        yield {k: v[slots] for k, v in buf.items()}


def _rebatch(chunks: Iterator[dict], batch_size: int, drop_remainder: bool, finish) -> Iterator:
    pending: list[dict] = []
    have = 0
    for chunk in chunks:
        pending.append(chunk)
        have += len(chunk[records.ACTIVATIONS])
        if have < batch_size:
            continue
        joined = {k: np.concatenate([c[k] for c in pending]) if len(pending) > 1 else pending[0][k] for k in chunk}
        full = (have // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield finish({k: v[start : start + batch_size] for k, v in joined.items()})
        rest = {k: v[full:] for k, v in joined.items()}
        pending, have = ([rest], have - full) if have > full else ([], 0)
    if have and not drop_remainder:
        yield finish({k: np.concatenate([c[k] for c in pending]) for k in pending[0]})


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

    Yields float32 [batch_size, width] arrays (with_metadata: dicts as activation_dataset's).
    Same shuffle guarantees as activation_dataset (module doc); seed=None draws a fresh order.
    Reading, CRC checks and decoding run in a background thread.
    """
    _check_args(batch_size, shuffle_buffer)
    spec = layer_spec(path, layer, hook=hook)
    scale = _scale(spec, normalize)
    dt, h = numpy_dtype(spec.dtype), spec.hidden_size
    rng = np.random.default_rng(seed)
    shuffle = shuffle_buffer > 1
    files = list(spec.files)
    if shuffle:
        files = [files[i] for i in rng.permutation(len(files))]

    def chunks():
        for data in _interleaved_records(files, max(1, cycle_length), check_crc):
            if with_metadata:
                ex = records.decode_example(data)
                chunk = {records.ACTIVATIONS: records.decode_activations(ex, dt, h)}
                chunk.update({k: ex[k] for k in records.INT_FEATURES})
            else:
                chunk = {records.ACTIVATIONS: _activations_only(data, dt, h)}
            yield chunk

    def finish(batch):  # copies everything: batches never alias the reader's reused buffers
        acts = _to_float32(batch[records.ACTIVATIONS])
        if scale is not None:
            acts *= np.float32(scale)
        if not with_metadata:
            return acts
        return {**{k: np.array(v) for k, v in batch.items()}, records.ACTIVATIONS: acts}

    stream = _prefetched(chunks(), depth=16)
    if shuffle:
        stream = _shuffle_records(stream, spec.record_buffer(shuffle_buffer), rng)
        stream = _permuted_windows(stream, shuffle_buffer, rng, reuse=shuffle_buffer >= batch_size)
    return _rebatch(stream, batch_size, drop_remainder, finish)
