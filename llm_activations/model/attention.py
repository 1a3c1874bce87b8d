"""Self-attention over packed rows: causal within a segment, never across segments.

Every implementation computes the same thing from q [B, T, N, H], k, v [B, S, K, H] (after RoPE)
and segment_ids [B, T] (0 = padding), and is chosen once from the mesh's devices (`backend_for`)
and passed down explicitly; nothing here reads a global backend.

* "xla": queries in blocks, each attending to the smallest key window its segments need; plain
  XLA, runs everywhere. The reference, the CPU path and the fallback.
* "splash": Pallas splash attention (TPU) with SegmentIds and a causal mask, GQA in its
  multi-head mode, vmapped over the batch.
* "cudnn": cuDNN flash attention on packed sequences (GPU, bf16/f16): each row's segments are
  passed as lengths and offsets (cuDNN's THD layout, mask type PADDING_CAUSAL), so no [T, S] mask
  is built and tiles that cross segments are skipped. A row holds up to Backend.max_segments runs;
  a batch with a fuller row takes cuDNN's dense-mask call instead (same kernel family, exact mask;
  in-graph, per batch; said at start-up by Backend.describe).
* "tokamax": tokamax's flash attention (GPU; an optional package), whose mask takes each query's
  first key (`k_start`), which is exactly block-diagonal causal.

Einsum axes: B batch, T query position, S key position, N query heads, K kv heads, G query heads
per kv head, H head_dim.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_activations.errors import UsageError
from llm_activations.model.cost import ACCELERATOR_QUERY_BLOCK, auto_attention

IMPLEMENTATIONS = ("xla", "splash", "cudnn", "tokamax")
# Queries per block of the "xla" path. On CPU small blocks keep each [.., block, window] float32
# logits tile in cache (3-4x faster than one [B, N, T, T] tile at T=1024 on a 2-core CPU);
# accelerators prefer fewer, larger matmuls.
QUERY_BLOCK = {"cpu": 128, "tpu": ACCELERATOR_QUERY_BLOCK, "gpu": ACCELERATOR_QUERY_BLOCK}
# Splash attention tiles: its kv compute block must be a multiple of the TPU's 128 lanes.
SPLASH_BLOCK = 128
# Runs of equal segment id per row the packed cuDNN call takes (padding is one more run). Packed
# rows of a web corpus hold a handful (median document ~600 tokens at T = 2048); each slot costs
# cuDNN a few empty tiles.
MAX_SEGMENTS = 32


@dataclass(frozen=True)
class Backend:
    """How the forward step runs: the platform of the mesh's devices and the attention kernel."""

    platform: str  # "cpu" | "gpu" | "tpu"
    attention: str  # one of IMPLEMENTATIONS
    query_block: int  # "xla" path: queries per block
    interpret: bool = False  # run Pallas kernels in interpret mode (on CPU: tests only)
    max_segments: int = MAX_SEGMENTS  # "cudnn": runs per row of the packed call (0: always the dense mask)

    def describe(self) -> str:
        """One line saying which kernel runs, and when it takes another path."""
        if self.attention == "cudnn" and not self.max_segments:
            return "attention cudnn: dense [B, 1, T, S] segment mask (max_segments 0)"
        if self.attention == "cudnn":
            return (f"attention cudnn: packed segments (THD), up to {self.max_segments} per row; a batch with a "
                    "fuller row runs cuDNN's dense-mask call (exact mask, in-graph)")
        if self.attention == "xla":
            return f"attention xla: query blocks of {self.query_block}"
        return f"attention {self.attention}" + (" (Pallas interpret mode)" if self.interpret else "")

    @property
    def float32_dots(self) -> bool:
        """XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot through a slow emulated path, but a
        bfloat16 dot with a float32 result through its native kernels (avx512_bf16): 2-3x faster.
        So on CPU dots ask for float32 and round once, which is also what torch does."""
        return self.platform == "cpu"


def platform_of(devices: Sequence) -> str:
    """"cpu", "gpu" or "tpu" for a list of devices (CUDA and ROCm devices are both "gpu")."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise UsageError(f"the mesh mixes device platforms {sorted(platforms)}; use devices of one kind")
    p = platforms.pop()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def backend_for(devices: Sequence, dtype, attention: str = "auto", query_block: int | None = None) -> Backend:
    """The Backend for these devices (e.g. `mesh.devices.flat`) and compute dtype.

    attention "auto" picks cost.auto_attention (on GPU "xla" for float32, which cuDNN does not take).
    "splash" off a TPU runs in Pallas interpret mode: exact but slow, for tests on CPU. Any other
    kernel that cannot run here is a UsageError.
    """
    devices = list(devices)  # (an iterator, such as mesh.devices.flat, is read once)
    platform = platform_of(devices)
    sixteen_bit = np.dtype(dtype).itemsize == 2
    if attention == "auto":
        attention = auto_attention(platform, np.dtype(dtype).itemsize)
    if attention not in IMPLEMENTATIONS:
        raise UsageError(f"attention implementation {attention!r} is not one of auto, {', '.join(IMPLEMENTATIONS)}")
    needs = {"splash": "tpu", "cudnn": "gpu", "tokamax": "gpu"}.get(attention)
    if needs and platform != needs and attention != "splash":
        raise UsageError(f"attention implementation {attention!r} needs a {needs.upper()}; the mesh's devices are {platform}")
    if attention == "cudnn" and not sixteen_bit:
        raise UsageError("attention implementation 'cudnn' needs a 16-bit compute dtype (bfloat16); use 'xla' for float32")
    capability = getattr(devices[0], "compute_capability", None)
    if attention in ("cudnn", "tokamax") and capability and float(capability) < 8.0:
        raise UsageError(f"attention implementation {attention!r} needs compute capability >= 8.0 (this GPU has "
                         f"{capability}); use 'xla'")
    if attention == "tokamax":
        try:
            import tokamax  # noqa: F401
        except ImportError:
            raise UsageError("attention implementation 'tokamax' needs the tokamax package (Python >= 3.12, "
                             "jax >= 0.11.1); use 'cudnn'") from None
    block = query_block or QUERY_BLOCK.get(platform, 512)
    if block < 1:
        raise UsageError(f"query block {block} must be positive")
    backend = Backend(platform, attention, block, interpret=attention == "splash" and platform != "tpu")
    logging.getLogger(__name__).info(backend.describe())
    return backend


# ----------------------------------------------------------------------------- masks


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, S] bool: causal within a segment (block-diagonal), never across segments.

    Padding (segment 0) attends only to itself so its softmax stays finite; it is never stored.
    """
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    return (same & causal) | jnp.eye(t, dtype=bool)


def window_sizes(t: int, step: int) -> tuple[int, ...]:
    """Static key-window sizes a query block of `step` queries may use: every whole number of
    blocks up to the padded length (a block near the start never pays for more keys than
    causality gives it)."""
    return tuple(range(step, -(-t // step) * step + 1, step))


def key_windows(mask: jax.Array, step: int) -> jax.Array:
    """[T / step] int32: per query block, the index in window_sizes(T, step) of the key window it needs.

    Packed rows hold many short segments, and a query never sees keys before its segment's first
    token, so most blocks need far fewer keys than causality allows. The needed window is
    data-dependent (the whole batch's earliest first key in the block); shapes must be static, so
    each block picks the smallest static size that holds it. Keys left out are exactly masked ones,
    whose softmax weight is exactly 0: results are unchanged.
    """
    b, t, _ = mask.shape
    sizes = window_sizes(t, step)
    blocks = sizes[-1] // step
    # [B, T] first key each query attends to (every query attends at least to itself)
    first = jnp.argmax(mask, axis=-1).astype(jnp.int32)
    first = jnp.pad(first, ((0, 0), (0, blocks * step - t)), constant_values=blocks * step)
    # [blocks] keys back from each block's end to the earliest key any of its queries needs
    need = (jnp.arange(blocks, dtype=jnp.int32) + 1) * step - first.reshape(b, blocks, step).min(axis=(0, 2))
    return jnp.sum(jnp.asarray(sizes[:-1], jnp.int32)[None, :] < need[:, None], axis=1).astype(jnp.int32)


def runs(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: the index of each token's run of equal segment id in its row (0, 1, ...).
    Packing writes each segment as one run and padding as the last, so runs are segments."""
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1


class Packed(NamedTuple):
    """cuDNN's packed-sequence arguments for rows of up to M runs (jax's fused_attention API)."""

    seqlens: jax.Array  # [B, M] int32: tokens of run r, -1 past the row's last run
    offsets: jax.Array  # [B, M + 1] int32: first token of run r within the row, -1 past the last
    overflow: jax.Array  # [B] bool: the row holds more than M runs (its later runs are missing above)


def packed_segments(segment_ids: jax.Array, max_segments: int) -> Packed:
    """Packed (THD) arguments of segment_ids [B, T]: every run (padding's too, so every token is in
    one and its output is finite) is one cuDNN sequence, causal from its first token."""
    b, t = segment_ids.shape
    run = runs(segment_ids)
    # [B, M, T]: token t is in run r
    member = run[:, None, :] == jnp.arange(max_segments, dtype=jnp.int32)[None, :, None]
    lengths = jnp.sum(member, axis=2, dtype=jnp.int32)
    starts = jnp.argmax(member, axis=2).astype(jnp.int32)
    seqlens = jnp.where(lengths > 0, lengths, -1)
    offsets = jnp.pad(jnp.where(lengths > 0, starts, -1), ((0, 0), (0, 1)), constant_values=-1)
    return Packed(seqlens, offsets, run[:, -1] >= max_segments)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: the position of each token's segment's first token (k_start of its query)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


# ----------------------------------------------------------------------------- implementations


def dot(eq: str, a: jax.Array, b: jax.Array, float32_dots: bool) -> jax.Array:
    """jnp.einsum in the inputs' dtype; with float32_dots (Backend.float32_dots, CPU) a bfloat16 dot
    accumulates into a float32 result and rounds once."""
    if float32_dots and a.dtype == jnp.bfloat16:
        return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.einsum(eq, a, b)


def prepare(backend: Backend, segment_ids: jax.Array) -> Any:
    """What `attend` needs from segment_ids, computed once per step and shared by every layer."""
    t = segment_ids.shape[1]
    if backend.attention == "xla":
        mask = attention_mask(segment_ids)
        return mask, key_windows(mask, min(t, backend.query_block))
    if backend.attention == "cudnn":
        return segment_ids, (packed_segments(segment_ids, backend.max_segments) if backend.max_segments else None)
    if backend.attention == "tokamax":
        return segment_starts(segment_ids)
    return segment_ids


def attend(backend: Backend, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, aux: Any,
           mesh=None) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H] in q's dtype.

    aux = prepare(backend, segment_ids). With a mesh, the fused kernels run per device under
    shard_map (batch over "data", heads over "model"), since XLA cannot partition a custom call.
    """
    if backend.attention == "xla":
        return _xla(q, k, v, *aux, step=min(q.shape[1], backend.query_block), float32_dots=backend.float32_dots)
    kernel = {"splash": functools.partial(_splash, interpret=backend.interpret), "cudnn": _cudnn,
              "tokamax": _tokamax}[backend.attention]
    if mesh is None:
        return kernel(q, k, v, aux)
    from llm_activations.model.sharding import logical_to_spec

    qkv = logical_to_spec(("batch", "seq", "heads", "head_dim"))
    aux_spec = jax.tree.map(lambda a: logical_to_spec(("batch",) + (None,) * (a.ndim - 1)), aux)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, aux_spec), out_specs=qkv,
                         check_vma=False)(q, k, v, aux)


def _xla(q, k, v, mask, windows, *, step: int, float32_dots: bool) -> jax.Array:
    """Queries in blocks of `step`; block i attends to keys [e - w, e), e = (i + 1) * step, w one of
    window_sizes (causal: never a key >= e). A scan over blocks with a switch over sizes compiles
    one body whatever the length. Queries are padded on the right to whole blocks, keys on the
    left by `left` so every window starts in range; padded keys are masked."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    sizes = window_sizes(t, step)
    padded = sizes[-1]
    left = padded - step
    scale = h**-0.5
    # Heads-major layout so every einsum is a plain batched matmul.
    # [B, K, G, T', H] / [B, K, S', H] / [B, T', S']
    q = jnp.pad(q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4),
                ((0, 0), (0, 0), (0, 0), (0, padded - t), (0, 0)))
    k, v = (jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (left, padded - t), (0, 0))) for a in (k, v))
    keep = jnp.pad(mask, ((0, 0), (0, padded - t), (left, padded - t)))

    def block(w: int, s: jax.Array) -> jax.Array:
        """Queries [s, s + step) over keys [s + step - w, s + step) -> [B, K, G, step, H]."""
        start = s + step - w + left
        # [B, K, G, step, w] logits accumulated in float32
        logits = jnp.einsum("bkgth,bksh->bkgts", jax.lax.dynamic_slice_in_dim(q, s, step, axis=3),
                            jax.lax.dynamic_slice_in_dim(k, start, w, axis=2),
                            preferred_element_type=jnp.float32) * scale
        m = jax.lax.dynamic_slice(keep, (0, s, start), (b, step, w))
        logits = jnp.where(m[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        vs = jax.lax.dynamic_slice_in_dim(v, start, w, axis=2)
        return dot("bkgts,bksh->bkgth", probs, vs, float32_dots)

    def body(carry, blk):
        i, window = blk
        s = i * step
        if len(sizes) == 1:
            return carry, block(sizes[0], s)
        return carry, jax.lax.switch(window, [lambda s, w=w: block(w, s) for w in sizes], s)

    # [blocks, B, K, G, step, H]
    _, outs = jax.lax.scan(body, None, (jnp.arange(padded // step, dtype=jnp.int32), windows))
    # [B, T, N, H]
    return outs.transpose(1, 0, 4, 2, 3, 5).reshape(b, padded, n, h)[:, :t]


def _splash(q, k, v, segment_ids, *, interpret: bool) -> jax.Array:
    """Pallas splash attention, vmapped over the batch; T padded to whole SPLASH_BLOCKs with a
    segment id no real token has (-1), so padded keys are never attended to by real queries."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    # [B, N, T', H] / [B, K, S', H]; splash does not scale the logits itself
    q, k, v = (jnp.pad(a, pad).transpose(0, 2, 1, 3) for a in (q * jnp.asarray(h**-0.5, q.dtype), k, v))
    segs = jnp.pad(segment_ids, ((0, 0), (0, padded - t)), constant_values=-1)
    mask = sm.MultiHeadMask([sm.CausalMask((padded, padded)) for _ in range(n)])
    blocks = sk.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK)
    kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(q, k, v, segs)
    # [B, T, N, H]
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def _cudnn(q, k, v, aux) -> jax.Array:
    """cuDNN flash attention on packed segments; a batch with a row of more than max_segments runs
    takes the dense-mask call (lax.cond: only the branch taken runs, so the mask is built only then)."""
    segment_ids, packed = aux
    if packed is None:  # max_segments 0: the dense mask always (gpu_bench's comparison)
        return _cudnn_dense(q, k, v, segment_ids)
    return jax.lax.cond(jnp.any(packed.overflow), lambda: _cudnn_dense(q, k, v, segment_ids),
                        lambda: _cudnn_packed(q, k, v, packed))


def packed_kv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v as the packed cuDNN call needs them: jax < 0.11 scales the key offsets by the *query*
    heads (fixed in 0.11), so there grouped-query k and v are repeated to one head per query head."""
    if k.shape[2] != q.shape[2] and jax.__version_info__ < (0, 11):
        g = q.shape[2] // k.shape[2]
        return jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return k, v


def _cudnn_packed(q, k, v, packed: Packed) -> jax.Array:
    """cuDNN's THD call: each run its own causal sequence, no mask tensor (a private jax module:
    jax.nn.dot_product_attention takes no offsets)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    k, v = packed_kv(q, k, v)
    return fa.dot_product_attention(q, k, v, q_seqlen=packed.seqlens, kv_seqlen=packed.seqlens,
                                    q_offsets=packed.offsets, kv_offsets=packed.offsets, scale=q.shape[-1] ** -0.5,
                                    mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _cudnn_dense(q, k, v, segment_ids, implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention, causal mask type, segments as a [B, 1, T, S] boolean mask (made here).
    (implementation="xla" runs the same call anywhere: the tests check its arguments on CPU.)"""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=implementation)


# tokamax's GPU flash kernels, in order of preference; the first that takes the shapes is used,
# chosen once when the step is traced (at start-up) and logged.
TOKAMAX_KERNELS = ("mosaic_gpu", "triton")


def _tokamax(q, k, v, starts, kernels: Sequence[str] = TOKAMAX_KERNELS) -> jax.Array:
    """tokamax flash attention with a per-query first key (k_start): block-diagonal causal without
    any [T, S] mask. tokamax is optional (not a dependency: backend_for checks that it imports);
    its Mask is not yet public API. (kernels=("xla",) runs tokamax's reference anywhere: tests.)"""
    from tokamax._src.ops.attention import base as tokamax_base
    from tokamax._src.ops.attention.api import IMPLEMENTATIONS as TOKAMAX

    # [B, 1, T]: query t sees keys [starts[t], t]
    mask = tokamax_base.Mask(k_start=starts[:, None, :], is_causal=True)
    for name in kernels:
        if name in TOKAMAX:
            try:
                out = TOKAMAX[name](q, k, v, bias=None, mask=mask, logits_scale=q.shape[-1] ** -0.5,
                                    precision=None, logits_soft_cap=None, q_sharding=None)
            except NotImplementedError:
                continue
            logging.getLogger(__name__).info("attention tokamax: its %s kernel", name)
            return out
    raise UsageError(f"tokamax has none of the kernels {', '.join(kernels)} for these shapes; use 'cudnn'")
