"""Activation batches for JAX trainers: already on the device, or sharded over a mesh.

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from llm_activations.jax_reader import device_batches

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    for x in device_batches(path, layer=3, batch_size=4096, sharding=NamedSharding(mesh, P("data")),
                            seed=0, normalize=True):
        params, opt_state = step(params, opt_state, x)   # x: float32 [4096, hidden], split over "data"

The host side is reader.iter_numpy_batches (two background threads: read + CRC, shuffle + cast).
On top of it `prefetch_to_device` keeps the next batch's transfer in flight: before batch i is
handed to the trainer, batch i+1 has been given to jax.device_put, which returns at once while
the copy proceeds, so a trainer whose step takes longer than one transfer never waits on the host.

Host buffers are safe to reuse: jax.device_put either copies the batch or (on CPU, and while an
asynchronous transfer is in flight) keeps a reference to the NumPy array, and the reader's
BufferPool writes a buffer again only once nothing refers to it.

This is the only module of the package's readers that imports JAX; the reader package never does.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator

import jax

from llm_activations import reader
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk


def prefetch_to_device(batches: Iterable, sharding=None, size: int = 2) -> Iterator:
    """Yield each host batch (an array or a pytree of arrays) as jax.Arrays, `size` - 1 batches ahead.

    sharding: None (the default device), a jax.Device, or a jax.sharding.Sharding such as
    NamedSharding(mesh, P("data")) to split the batch dimension over a mesh axis. size=2 is double
    buffering: the transfer of batch i+1 is started before batch i is returned.
    """
    if size < 1:
        raise UsageError(f"prefetch size must be >= 1, got {size}")
    it = iter(batches)
    ahead: collections.deque = collections.deque()

    def put(n: int) -> None:
        for batch in itertools.islice(it, n):
            ahead.append(jax.device_put(batch, sharding))

    put(size)
    while ahead:
        batch = ahead.popleft()
        put(1)
        yield batch
        del batch  # let the trainer's copy be the last reference, so its host buffer can be reused


def _check_sharding(sharding, batch_size: int, hidden_size: int, drop_remainder: bool) -> None:
    if not isinstance(sharding, jax.sharding.Sharding):
        return
    if not drop_remainder:
        raise UsageError("drop_remainder=False cannot be used with a sharding: the last, shorter batch would not split evenly")
    try:
        sharding.shard_shape((batch_size, hidden_size))
    except ValueError as e:
        raise UsageError(f"batch_size {batch_size} does not split over the sharding {sharding}: {e}") from None


def device_batches(
    path: str,
    layer: int,
    batch_size: int,
    *,
    sharding=None,
    prefetch: int = 2,
    **reader_kwargs,
) -> Iterator:
    """One pass over one hook's tokens at a layer as jax.Arrays on the device (float32 [batch_size, width]).

    reader_kwargs are iter_numpy_batches' (ReaderOptions fields, pool=, stats= for the counters);
    the batches and their order are exactly that reader's for the same arguments. With
    with_metadata the elements are dicts of jax.Arrays. sharding: see prefetch_to_device; with a
    Sharding the batch must split evenly over it (checked here, in one line).
    Multi-process meshes: every process would read the whole dataset; not supported yet.
    """
    spec = reader.layer_spec(path, layer, hook=reader_kwargs.pop("hook", hk.DEFAULT))
    _check_sharding(sharding, batch_size, spec.hidden_size, reader_kwargs.get("drop_remainder", True))
    if jax.process_count() > 1:
        raise UsageError("device_batches reads on one process only; with several, give each its own files")
    return prefetch_to_device(reader.numpy_batches(spec, batch_size, **reader_kwargs), sharding, prefetch)
