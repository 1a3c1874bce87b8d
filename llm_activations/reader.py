"""Downstream reading: activation shards -> shuffled [batch, hidden] float32 token batches.

Two readers with one meaning:

* `activation_dataset(...)` -> tf.data.Dataset, for trainers fed by tf.data. TensorFlow is imported
  inside the function only, so importing this module never loads it.
* `iter_numpy_batches(...)` -> iterator of NumPy arrays, for processes that must not import
  TensorFlow (JAX on TPU: TF can grab the accelerator). It reads shards with records.read_shard.

Both take the schema (dtype, hidden size, files, scaling factor) from metadata.json and refuse a
folder without one, or with an unknown format_version, in one line (errors.DatasetError).

What the shuffle guarantees (both readers)
------------------------------------------
With `shuffle_buffer = B > 1`:

1. Every token of the layer is delivered exactly once per pass (one epoch), except that
   `drop_remainder=True` drops the final `< batch_size` tokens.
2. Shard files are visited in a random order (a new one on every pass of a repeated tf.data
   dataset), `cycle_length` files at a time, their records interleaved round-robin.
3. Each delivered token is drawn uniformly at random from a buffer holding the next B not yet
   delivered tokens of that interleaved stream (tf.data's shuffle semantics; the NumPy reader
   draws a record's worth of tokens at a time from the buffer plus that record). So the token at
   stream position i is never delivered before output position i - B, and tokens further apart
   than B in the stream are not mixed. A record holds up to seq_len consecutive tokens of a few
   documents, so choose B to be many records (>= 100 x seq_len) for batches that look i.i.d.;
   memory is B x hidden x 2-4 bytes.
4. With `seed` set, the order is a pure function of (dataset, seed, arguments): the interleave
   is deterministic and repeated passes replay the same sequence of orders. With seed=None the
   tf.data reader also lets parallel reads finish out of order (faster, not reproducible).

`shuffle_buffer <= 1` disables shuffling: files in metadata order, records round-robin across
`cycle_length` files, tokens in record order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import metadata as md
from . import records

DEFAULT_SHUFFLE_BUFFER = 1 << 16
DEFAULT_CYCLE_LENGTH = 8
DTYPES = ("bfloat16", "float16", "float32")


def numpy_dtype(name: str) -> np.dtype:
    """Storage dtype name from metadata.json -> little-endian NumPy dtype (bfloat16 via ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise md.DatasetError(f"metadata dtype {name!r} is not one of {', '.join(DTYPES)}")
    return np.dtype(name).newbyteorder("<")


@dataclass(frozen=True)
class LayerSpec:
    """What a reader needs to know about one layer of a dataset, taken from metadata.json."""

    root: str
    layer: int
    files: tuple[str, ...]  # full paths, metadata order
    dtype: str
    hidden_size: int
    compression: str
    scaling_factor: float | None
    tokens: int

    @property
    def bytes_per_token(self) -> int:
        return self.hidden_size * numpy_dtype(self.dtype).itemsize


def layer_spec(path: str, layer: int, *, read_text=None) -> LayerSpec:
    """Read and check metadata.json of the dataset at path and describe `layer`."""
    meta = md.read_metadata(path, read_text=read_text)
    files = tuple(md.shard_path(path, rel) for rel in md.layer_files(meta, layer))
    if not files:
        raise md.DatasetError(f"{path}: layer {layer} has no shard files")
    numpy_dtype(meta["dtype"])  # refuse unknown dtypes here, in one line
    stats = meta.get("stats", {}).get(str(layer), {})
    return LayerSpec(
        root=path,
        layer=layer,
        files=files,
        dtype=meta["dtype"],
        hidden_size=int(meta["hidden_size"]),
        compression=meta.get("compression") or records.compression_of(files[0]),
        scaling_factor=stats.get("scaling_factor"),
        tokens=int(meta.get("counts", {}).get("tokens", 0)),
    )


def _scale(spec: LayerSpec, normalize: bool) -> float | None:
    if not normalize:
        return None
    if not spec.scaling_factor:
        raise md.DatasetError(f"{spec.root}: metadata has no scaling_factor for layer {spec.layer}; cannot normalize")
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
    records_per_decode: int = 8,
):
    """A tf.data.Dataset of one pass over a layer's tokens (see the module doc for the shuffle).

    Elements: float32 [batch_size, hidden_size] activations; with_metadata: a dict with
    "activations" and int64 [batch_size] "token_ids", "doc_index", "token_index", "position".
    normalize multiplies activations by the layer's stored scaling_factor (sqrt(H) / mean norm).
    path may be any tf.io.gfile location (local, gs://...). Call .repeat() for more passes.

    Speed: records are decoded records_per_decode at a time with one parse_example + decode_raw
    (no per-token Python); only the token-level shuffle handles single tokens, inside tf.data.
    """
    import tensorflow as tf

    spec = layer_spec(path, layer, read_text=_gfile_read_text if "://" in path else None)
    scale = _scale(spec, normalize)
    h = spec.hidden_size
    tf_dtype = tf.dtypes.as_dtype(spec.dtype)
    shuffle = shuffle_buffer > 1
    deterministic = seed is not None or not shuffle
    autotune = tf.data.AUTOTUNE

    int_keys = records.INT_FEATURES if with_metadata else ()
    features = {records.ACTIVATIONS: tf.io.FixedLenFeature([], tf.string)}
    features.update({k: tf.io.RaggedFeature(tf.int64) for k in int_keys})

    def decode(serialized):  # [R] Example bytes -> {key: [tokens in these R records, ...]}
        parsed = tf.io.parse_example(serialized, features)
        # decode_raw needs equal-length strings per row; joining the R payloads makes one string.
        flat = tf.io.decode_raw(tf.strings.reduce_join(parsed[records.ACTIVATIONS]), tf_dtype)
        out = {records.ACTIVATIONS: tf.reshape(flat, [-1, h])}
        out.update({k: parsed[k].flat_values for k in int_keys})
        return out

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
    ds = ds.batch(records_per_decode).map(decode, num_parallel_calls=autotune, deterministic=deterministic)
    ds = ds.unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune, deterministic=True)
    ds = ds.map(finish, num_parallel_calls=autotune, deterministic=True)
    return ds.prefetch(autotune)


# ----------------------------------------------------------------------------- NumPy


def _to_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype.itemsize == 2 and x.dtype.name == "bfloat16":
        # bfloat16 is the top half of a float32: a shift is several times faster than ml_dtypes' cast.
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


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


def _shuffle_chunks(chunks: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Token-level shuffle buffer, a record at a time (see the module doc, point 3).

    Once full, the buffer and an incoming chunk of m tokens give m tokens drawn uniformly without
    replacement from both; the chunk's undrawn tokens take the drawn tokens' buffer slots.
    """
    buf: dict[str, np.ndarray] | None = None
    size = 0
    for chunk in chunks:
        m = len(chunk[records.ACTIVATIONS])
        if buf is None:
            buf = {k: np.empty((buffer_size, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
        if size < buffer_size:  # filling
            take = min(m, buffer_size - size)
            for k, v in chunk.items():
                buf[k][size : size + take] = v[:take]
            size += take
            if take == m:
                continue
            chunk = {k: v[take:] for k, v in chunk.items()}
            m -= take
        sel = rng.choice(buffer_size + m, size=m, replace=False)  # random order
        in_buf = sel < buffer_size
        from_buf, from_new = sel[in_buf], sel[~in_buf] - buffer_size
        keep_new = np.ones(m, bool)
        keep_new[from_new] = False
        out = {}
        for k, v in chunk.items():
            o = np.empty_like(v)
            o[in_buf] = buf[k][from_buf]
            o[~in_buf] = v[from_new]
            buf[k][from_buf] = v[keep_new]
            out[k] = o
        yield out
    if buf is not None and size:
        perm = rng.permutation(size)
        yield {k: v[:size][perm] for k, v in buf.items()}


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
) -> Iterator:
    """One pass over a layer's tokens as NumPy, never importing TensorFlow.

    Yields float32 [batch_size, hidden_size] arrays (with_metadata: dicts as activation_dataset's).
    Same shuffle guarantees as activation_dataset (module doc); seed=None draws a fresh order.
    Reading, CRC checks and decoding run in a background thread.
    """
    spec = layer_spec(path, layer)
    scale = _scale(spec, normalize)
    dt, h = numpy_dtype(spec.dtype), spec.hidden_size
    rng = np.random.default_rng(seed)
    shuffle = shuffle_buffer > 1
    files = list(spec.files)
    if shuffle:
        files = [files[i] for i in rng.permutation(len(files))]

    def chunks():
        for data in _interleaved_records(files, max(1, cycle_length), check_crc):
            ex = records.decode_example(data)
            chunk = {records.ACTIVATIONS: records.decode_activations(ex, dt, h)}
            if with_metadata:
                chunk.update({k: ex[k] for k in records.INT_FEATURES})
            yield chunk

    def finish(batch):
        acts = _to_float32(batch[records.ACTIVATIONS])
        if scale is not None:
            acts *= np.float32(scale)
        return {**batch, records.ACTIVATIONS: acts} if with_metadata else acts

    stream = _prefetched(chunks(), depth=16)
    if shuffle:
        stream = _shuffle_chunks(stream, shuffle_buffer, rng)
    return _rebatch(stream, batch_size, drop_remainder, finish)
