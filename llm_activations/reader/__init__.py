"""Downstream reading: activation shards -> shuffled [batch, hidden] float32 token batches.

One engine, four front ends with one meaning and one options object (options.ReaderOptions):

* `activation_dataset(...)` -> tf.data.Dataset, for trainers fed by tf.data. TensorFlow is imported
  inside the function only, so importing this module never loads it.
* `iter_numpy_batches(...)` -> iterator of NumPy arrays, for processes that must not import
  TensorFlow (JAX on TPU: TF can grab the accelerator).
* `llm_activations.jax_reader.device_batches(...)` -> jax.Arrays already on the device (or sharded
  over a mesh), transferred one batch ahead of the trainer.
* `llm_activations.torch_reader.torch_batches(...)` -> float32 torch tensors (zero-copy), and
  `TorchActivations`, an IterableDataset for DataLoader workers.
* `iter_numpy_pairs(...)` -> a transcoder's (mlp_in, mlp_out) batches, read together token for token.

The package, one file per concept: spec (metadata -> LayerSpec, norm policy and scale), options,
buffers (BufferPool), shards (file I/O and the per-shard checks), shuffle (the three stages),
engine (the pass: threads, filter, batches), numpy_reader and tf_reader (front ends).
Both take the schema (dtype, width, files, scaling factor) from metadata.json and refuse a
folder without one, or with an unknown format_version, in one line (errors.DatasetError). Both read
one hook point (`hook=`, default "resid_post") of one layer.

How it runs (`engine.run_pass`): one thread shuffles records and reads and CRC-checks them (read() releases
the GIL), a second applies the norm filter (when there is one), a third permutes windows and writes
float32 batches into reused buffers, and the caller only takes finished batches off a queue. The
activation_dataset wraps the same batches with Dataset.from_generator (TF wraps 64-byte-aligned
arrays without copying them), so for one seed both readers deliver the same batches in the same
order. Work per token: one copy out of the page cache, one scatter into
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

Massive activations (format/norms.py)
-------------------------------------
By default (`max_norm_ratio=10`) a token whose L2 norm, computed in float32 from the stored values,
is above the threshold of metadata's norm histogram (10 x the median norm, rounded up to a bin
edge) is dropped; a pair drops a token when either hook is above its own threshold. `None` keeps
every token; a ratio of 1 or less is a one-line UsageError. A dataset written before the histogram
existed keeps every token (logged once). `normalize=True` scales by sqrt(width) / the delivered
tokens' mean norm. The iterator's `.stats` (ReaderStats) counts stored, dropped and delivered tokens.

Shards against metadata
-----------------------
Every shard is checked against metadata's `shards` entry: its size in bytes when it is opened, and
its record count when its pass ends. A file emptied, cut at a record boundary or appended to raises
ValueError naming it, so a reader never delivers fewer or more stored tokens than metadata says.

Batches and reused buffers
--------------------------
The float32 batches come from a BufferPool (`pool=`; by default one shared by every pass of the
process, buffers.shared_pool): a batch's memory is written again only once nothing refers to it
any more (no array, view, slice, tf.Tensor, jax.Array or torch.Tensor made from it), so keeping
batches (`list(reader)`) is safe, merely slower. `release_buffers()` frees the idle buffers the
shared pool keeps for the next pass.
"""

from llm_activations.format.dtypes import numpy_dtype  # noqa: F401 (re-exported: reader.numpy_dtype)
from llm_activations.reader.buffers import BufferPool, release_buffers, shared_pool  # noqa: F401
from llm_activations.reader.engine import ReaderStats  # noqa: F401
from llm_activations.reader.numpy_reader import (  # noqa: F401
    TRANSCODER_PAIR, Batches, iter_numpy_batches, iter_numpy_pairs, numpy_batches, pass_over,
)
from llm_activations.reader.options import DEFAULT_CYCLE_LENGTH, DEFAULT_SHUFFLE_BUFFER, ReaderOptions  # noqa: F401
from llm_activations.reader.spec import LayerSpec, ShardInfo, layer_spec  # noqa: F401
from llm_activations.reader.tf_reader import activation_dataset  # noqa: F401
