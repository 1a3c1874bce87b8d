"""The tf.data front end. TensorFlow is imported inside activation_dataset only."""

from __future__ import annotations

import itertools

from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import records
from llm_activations.reader import shards as sh
from llm_activations.reader.buffers import BufferPool, shared_pool
from llm_activations.reader.engine import ReaderStats
from llm_activations.reader.numpy_reader import pass_over
from llm_activations.reader.options import ReaderOptions
from llm_activations.reader.spec import layer_spec


def activation_dataset(path: str, layer: int, batch_size: int, *, hook: str = hk.DEFAULT, pool: BufferPool | None = None,
                       stats: ReaderStats | None = None, **options):
    """A tf.data.Dataset of one pass over one hook's tokens at a layer (package doc: the shuffle).

    Elements: float32 [batch_size, width] activations (width: hidden_size, or heads x head_dim for z); with_metadata: a dict with
    "activations" and int64 [batch_size] "token_ids", "doc_index", "token_index", "position".
    options: ReaderOptions' fields, as iter_numpy_batches. normalize multiplies activations by the
    scaling factor of the delivered tokens (sqrt(W) / their mean norm). stats (a ReaderStats you
    pass in) counts each pass's stored, dropped and delivered tokens, summed over .repeat() passes.
    path may be any tf.io.gfile location (local, gs://...). Call .repeat() for more passes, each in
    a new order; the first pass is iter_numpy_batches' pass for the same seed, batch for batch.

    Speed: the batches are made by the NumPy engine in background threads and handed to TF
    without a copy (Dataset.from_generator). A tf.data graph of parse / decode_raw / rebatch /
    gather / cast allocated a new tensor at every stage for every record, window and batch and
    ran at 0.2-1 GiB/s shuffled; this runs at the NumPy reader's speed. The price: the dataset
    runs Python in this process, so it cannot be serialised to tf.data service workers.
    """
    opts = ReaderOptions.of(batch_size, hook=hook, **options)
    import tensorflow as tf

    url = fileio.is_url(path)
    spec = layer_spec(path, layer, hook=hook, read_text=sh.gfile_read_text if url else None)
    pool = pool or shared_pool()
    stats = stats if stats is not None else ReaderStats()
    read_records = (lambda shard: sh.gfile_records(shard, pool)) if url else None
    pass_over((spec,), opts, pool=pool, stats=ReaderStats())  # refuse a bad policy or scale now, not in TF's thread
    passes = itertools.count()  # each iteration of the dataset (each .repeat() pass) draws the next order

    def generate():
        batches, _ = pass_over((spec,), opts, epoch=next(passes), pool=pool, stats=stats, read_records=read_records)
        for batch in batches:
            out = batch if opts.with_metadata else batch[records.ACTIVATIONS]
            del batch
            yield out

    rows = batch_size if opts.drop_remainder else None
    signature = {records.ACTIVATIONS: tf.TensorSpec((rows, spec.hidden_size), tf.float32)}
    signature.update({k: tf.TensorSpec((rows,), tf.int64) for k in records.INT_FEATURES})
    return tf.data.Dataset.from_generator(
        generate, output_signature=signature if opts.with_metadata else signature[records.ACTIVATIONS]
    )
