"""Extractor: a checkpoint on a device mesh with its forward step compiled once for (batch, seq_len).

The step returns, per requested (hook, layer), the activations already cast to the storage dtype on
device (only stored bytes cross to the host), float32 moments over real tokens and each token's
norm ([B, T] float32, -1 at padding), all computed from the stored values: the statistics describe
what readers get, rounding and overflow included. The host turns them into float64 `stats.Moments`
with a norm histogram (norms.py). A token the cast made non-finite (float16 overflows above 65504)
is refused with a DataFault naming the hook and layer: such data is never stored silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm_activations.model import checkpoint, compile_cache, source
from llm_activations.model import transformer as model
from llm_activations.model import sharding
from llm_activations.model.attention import Backend, backend_for
from llm_activations.model.config import ModelConfig, check_layers, load_model_config
from llm_activations.errors import DataFault, UsageError
from llm_activations.format import dtypes
from llm_activations.format import hooks as hk
from llm_activations.format.norms import NormHistogram
from llm_activations.format.stats import Moments


@dataclass(frozen=True)
class StepOutput:
    activations: dict[tuple[str, int], np.ndarray]  # (hook, layer) -> [B, T, width] in the storage dtype
    moments: dict[tuple[str, int], Moments]  # (hook, layer) -> moments over real tokens (segment_ids > 0)


class Pending:
    """A dispatched step; result() blocks until its outputs are on the host."""

    def __init__(self, keys: Sequence[tuple[str, int]], outputs: dict, storage_dtype: str = ""):
        self._keys = keys
        self._outputs = outputs
        self._storage_dtype = storage_dtype

    def result(self) -> StepOutput:
        host = jax.device_get(self._outputs)
        acts, moments = {}, {}
        for key in self._keys:
            a, count, mean, m2, norm_sum, norms = host[key]
            acts[key] = a
            # Binned on the host by norms.py itself (one place for the bin rule); a [B, T] float32
            # array per output is ~1/width of the activations' bytes (BENCHMARKS.md, issue 21).
            hist = NormHistogram.of(norms[~(norms < 0)])  # padding is -1; nan (non-finite) is kept
            if hist.nonfinite:
                raise DataFault(nonfinite_message(key, hist.nonfinite, hist.count + hist.nonfinite, self._storage_dtype))
            moments[key] = Moments(int(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64),
                                   float(norm_sum), hist)
        return StepOutput(acts, moments)


def nonfinite_message(key: tuple[str, int], bad: int, total: int, storage_dtype: str) -> str:
    hook, layer = key
    why = (f"beyond float16's range (|x| > 65504); extract with --dtype bfloat16 (or float32)"
           if storage_dtype == "float16" else "the model's activations are not finite (check the checkpoint and --compute-dtype)")
    return (f"{DataFault.MARK} {bad} of {total} tokens of {hook} at layer {layer} hold inf or nan once stored as "
            f"{storage_dtype or 'the storage dtype'}: {why}")


def layer_moments(x: jax.Array, real: jax.Array):
    """count, mean [D], m2 [D], norm_sum and norms [B, T] (-1 at padding) of x [B, T, D] over
    positions where real [B, T], in float32."""
    xf = x.astype(jnp.float32)
    w = real[..., None]
    count = jnp.sum(real, dtype=jnp.int32)
    mean = jnp.sum(jnp.where(w, xf, 0.0), axis=(0, 1)) / jnp.maximum(count, 1).astype(jnp.float32)
    m2 = jnp.sum(jnp.where(w, jnp.square(xf - mean), 0.0), axis=(0, 1))
    norms = jnp.linalg.norm(xf, axis=-1)  # [B, T]
    norm_sum = jnp.sum(jnp.where(real, norms, 0.0))
    return count, mean, m2, norm_sum, jnp.where(real, norms, -1.0)


def stored_tokens(segment_ids: jax.Array, positions: jax.Array, prepend: bool):
    """(real [B, T], order [B, T]): the tokens that are stored, and the column permutation that
    moves them, in order, to the front of each row. With prepend, position 0 of every segment is
    the prepended context token (packing.py), computed but not stored."""
    real = segment_ids > 0
    if not prepend:
        return real, None
    real = real & (positions > 0)
    return real, jnp.argsort(~real, axis=1, stable=True)


def make_step(config: ModelConfig, layers: Sequence[int], mesh, storage_dtype, backend: Backend,
              hooks: Sequence[str] = hk.DEFAULT_HOOKS, prepend: bool = False):
    """step(params, tokens, segment_ids, positions) -> {(hook, layer): (acts, count, mean, m2, norm_sum, norms)},
    the statistics of the stored (cast) values; with prepend, acts hold each row's stored tokens
    as a prefix (the layout of packing.Batch's own arrays)."""

    def step(params, tokens, segment_ids, positions):
        acts = model.forward(params, config, tokens, segment_ids, positions, layers, backend, mesh=mesh, hooks=hooks)
        real, order = stored_tokens(segment_ids, positions, prepend)
        stored = {key: x.astype(storage_dtype) for key, x in acts.items()}
        out = {key: (s,) + layer_moments(s, real) for key, s in stored.items()}
        if order is not None:
            out = {key: (jnp.take_along_axis(o[0], order[..., None], axis=1),) + o[1:] for key, o in out.items()}
        return out

    return step


def jit_step(config: ModelConfig, layers: Sequence[int], hooks: Sequence[str], mesh, storage_dtype, backend: Backend,
             params, batch_size: int, seq_len: int, prepend: bool = False):
    """(jitted step, its three abstract int32 [batch_size, seq_len] inputs): the one program extract
    runs, with its shardings. params: the params pytree or its abstract (ShapeDtypeStruct) twin, each
    leaf carrying its sharding. `plan --topology` compiles the same program for a TPU slice (aot.py)."""
    step = make_step(config, layers, mesh, storage_dtype, backend, hooks, prepend)
    inputs = sharding.named_sharding(mesh, ("batch", "seq"))
    acts = sharding.named_sharding(mesh, ("batch", "seq", "embed"))
    scalar = NamedSharding(mesh, PartitionSpec())
    # per (hook, layer): stored activations, the moments' count, mean, m2 and norm sum, per-token norms
    out_shardings = {(h, l): (acts, scalar, scalar, scalar, scalar, inputs) for h in hooks for l in layers}
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    jitted = jax.jit(step, in_shardings=(param_shardings,) + (inputs,) * 3, out_shardings=out_shardings)
    shape = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=inputs)
    return jitted, (shape, shape, shape)


class Extractor:
    """A model loaded onto a ("data", "model") mesh with its step compiled once.

    model: checkpoint folder or hub id. layers: 0-based block indices; hooks: hook points taken at
    each of them (format/hooks.py; outputs are keyed (hook, layer)). attention: "auto" (the mesh's
    platform decides) or one of attention.IMPLEMENTATIONS. compilation_cache: the persistent XLA
    cache folder (None: compile_cache.default_folder(); "none": off); the step's compile_stats say
    how long setup compiled and whether the cache served it. prepend: position 0 of every segment
    is a context token (--prepend): left out of the outputs, which hold each row's other real
    tokens first (packing.Batch.inputs is what to dispatch). Inputs of
    dispatch / __call__ are int32 numpy [batch_size, seq_len]: token ids, segment ids (0 = padding)
    and position ids.
    """

    def __init__(self, model: str, *, layers: Sequence[int], batch_size: int, seq_len: int,
                 compute_dtype: str = "bfloat16", storage_dtype: str = "bfloat16",
                 mesh_shape: tuple[int, int] | None = None, hooks: Sequence[str] = hk.DEFAULT_HOOKS,
                 attention: str = "auto", compilation_cache: str | None = None, prepend: bool = False):
        if compute_dtype not in dtypes.COMPUTE:
            raise UsageError(f"compute dtype {compute_dtype!r} is not one of {', '.join(dtypes.COMPUTE)}")
        if storage_dtype not in dtypes.STORAGE:
            raise UsageError(f"storage dtype {storage_dtype!r} is not one of {', '.join(dtypes.STORAGE)}")
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"batch size ({batch_size}) and sequence length ({seq_len}) must be positive")
        self.cache_folder = compile_cache.configure(compilation_cache)
        folder = source.resolve(model)
        self.config, _ = load_model_config(folder)
        self.layers = check_layers(self.config, layers)
        self.hooks = hk.check_hooks(hooks, option="hooks")
        self.keys = tuple((h, l) for h in self.hooks for l in self.layers)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.prepend = prepend
        # NumPy dtypes (bfloat16 from ml_dtypes), which JAX takes as they are
        self.compute_dtype, self.storage_dtype = dtypes.COMPUTE[compute_dtype], dtypes.STORAGE[storage_dtype]
        self.storage_dtype_name = storage_dtype
        num_blocks = self.layers[-1] + 1
        self.mesh = sharding.make_mesh(mesh_shape, self.config, batch_size, self.compute_dtype, num_blocks)
        self.backend = backend_for(self.mesh.devices.flat, self.compute_dtype, attention)
        self.params = checkpoint.load_params(folder, self.config, num_blocks,
                                             self.mesh, self.compute_dtype)
        self._compile()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def width(self, hook: str) -> int:
        """Values per token of a hook's activations."""
        return hk.width(hook, self.config.hidden_size, self.config.num_heads, self.config.head_dim)

    def _compile(self) -> None:
        """Compile the step once, ahead of time, for the fixed input shapes: the Compiled object
        runs only those shapes, so no later call can compile again."""
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params)
        jitted, inputs = jit_step(self.config, self.layers, self.hooks, self.mesh, self.storage_dtype, self.backend,
                                  params, self.batch_size, self.seq_len, self.prepend)
        self._input_sharding = inputs[0].sharding
        self._step, self.compile_stats = compile_cache.compile_step(jitted, params, *inputs)

    def _put(self, name: str, x) -> jax.Array:
        x = np.asarray(x)
        expected = (self.batch_size, self.seq_len)
        if x.shape != expected:
            raise ValueError(f"{name} has shape {x.shape}; expected [batch_size, seq_len] = {list(expected)}")
        if x.dtype != np.int32:
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{name} has dtype {x.dtype}; expected int32")
            x = x.astype(np.int32)
        if name == "tokens" and x.size and (x.min() < 0 or x.max() >= self.config.vocab_size):
            raise ValueError(f"tokens hold ids outside [0, {self.config.vocab_size}) (vocab_size)")
        return jax.device_put(x, self._input_sharding)

    def dispatch(self, tokens, segment_ids, positions) -> Pending:
        """Start the step on device and return at once; Pending.result() collects the outputs."""
        args = (self._put("tokens", tokens), self._put("segment_ids", segment_ids), self._put("positions", positions))
        outputs = self._step(self.params, *args)
        for leaf in jax.tree.leaves(outputs):
            leaf.copy_to_host_async()
        return Pending(self.keys, outputs, self.storage_dtype_name)

    def __call__(self, tokens, segment_ids, positions) -> StepOutput:
        return self.dispatch(tokens, segment_ids, positions).result()
