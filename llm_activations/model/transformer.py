"""The Qwen2/Qwen3/Llama decoder as pure functions over a params pytree.

params = {"embed": [V, D], "layers": [block params, ...]} holding only the blocks up to the
deepest requested layer. `forward` returns the requested hook points (format/hooks.py: resid_post,
attn_out, z, ...) of each requested block; no later block, final norm or lm_head ever runs.

Einsum axes: B batch, T query position, S key position, D hidden, N query heads, K kv heads,
G query heads per kv head, H head_dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llm_activations.model.config import ModelConfig
from llm_activations.model.sharding import named_sharding


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, mapped to mesh axes by sharding.RULES


def layer_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    """Every weight of one decoder block, declared once with its shape and logical axes."""
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ParamSpec((d,), ("embed",)),
        "q": ParamSpec((d, n, h), ("embed", "heads", "head_dim")),
        "k": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "v": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "o": ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((d,), ("embed",)),
        "gate": ParamSpec((d, f), ("embed", "mlp")),
        "up": ParamSpec((d, f), ("embed", "mlp")),
        "down": ParamSpec((f, d), ("mlp", "embed")),
    }
    if c.qkv_bias:
        specs["q_bias"] = ParamSpec((n, h), ("heads", "head_dim"))
        specs["k_bias"] = ParamSpec((k, h), ("kv_heads", "head_dim"))
        specs["v_bias"] = ParamSpec((k, h), ("kv_heads", "head_dim"))
    if c.o_bias:
        specs["o_bias"] = ParamSpec((d,), ("embed",))
    if c.qk_norm:
        specs["q_norm"] = ParamSpec((h,), ("head_dim",))
        specs["k_norm"] = ParamSpec((h,), ("head_dim",))
    return specs


def param_specs(c: ModelConfig, num_layers: int) -> dict:
    """Specs pytree of the params forward needs to run blocks 0 .. num_layers-1."""
    return {
        "embed": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed")),
        "layers": [layer_specs(c) for _ in range(num_layers)],
    }


def param_shardings(c: ModelConfig, num_layers: int, mesh: Mesh) -> dict:
    return jax.tree.map(lambda s: named_sharding(mesh, s.axes), param_specs(c, num_layers),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def init_params(c: ModelConfig, num_layers: int, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params (tests, benchmarks); norms near 1, others ~1/sqrt(fan_in). Drawn with NumPy on
    the host: jax.random compiles one program per shape, which is slower than the draw itself."""
    rng = np.random.default_rng(seed)

    def draw(s: ParamSpec):
        x = rng.standard_normal(s.shape, dtype=np.float32)
        return jnp.asarray(1.0 + 0.1 * x if len(s.shape) == 1 else x / np.sqrt(s.shape[0]), dtype=dtype)

    return jax.tree.map(draw, param_specs(c, num_layers), is_leaf=lambda x: isinstance(x, ParamSpec))


def _dot(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum in the inputs' dtype.

    XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot through a slow emulated path, but a
    bfloat16 dot with a float32 result through its native kernels (avx512_bf16): 2-3x faster on
    this project's CPU. So on CPU ask for float32 and round once to bfloat16, which is also what
    torch does (float32 accumulation, one rounding of the output).
    """
    if a.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.einsum(eq, a, b)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, accumulated in float32, cast back before the weight (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (HF "rotate_half" layout) of x [B, T, N, H] at positions [B, T], in float32."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    # [B, T, H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, S] bool: causal within a segment (block-diagonal), never across segments.

    Padding (segment 0) attends only to itself so its softmax stays finite; it is never stored.
    """
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    return (same & causal) | jnp.eye(t, dtype=bool)


def query_block(t: int) -> int:
    """Queries per attention block for sequence length t.

    Causal attention lets query block [s, e) skip keys >= e, so blocking saves up to half the
    attention work; small blocks also keep each [.., block, window] float32 logits tile in cache on
    CPU (3-4x faster than one [B, N, T, T] tile at T=1024 on a 2-core CPU). Accelerators prefer
    fewer, larger matmuls.
    """
    return min(t, 128 if jax.default_backend() == "cpu" else 512)


def window_sizes(t: int) -> tuple[int, ...]:
    """Static key-window sizes a query block may use: every whole number of blocks up to the
    padded length (a block near the start never pays for more keys than causality gives it)."""
    step = query_block(t)
    return tuple(range(step, -(-t // step) * step + 1, step))


def key_windows(mask: jax.Array) -> jax.Array:
    """[T / block] int32: per query block, the index in window_sizes(T) of the key window it needs.

    Packed rows hold many short segments, and a query never sees keys before its segment's first
    token, so most blocks need far fewer keys than causality allows. The needed window is
    data-dependent (the whole batch's earliest first key in the block); shapes must be static, so
    each block picks the smallest static size that holds it. Keys left out are exactly masked ones,
    whose softmax weight is exactly 0: results are unchanged.
    """
    b, t, _ = mask.shape
    step, sizes = query_block(t), window_sizes(t)
    blocks = sizes[-1] // step
    # [B, T] first key each query attends to (every query attends at least to itself)
    first = jnp.argmax(mask, axis=-1).astype(jnp.int32)
    first = jnp.pad(first, ((0, 0), (0, blocks * step - t)), constant_values=blocks * step)
    # [blocks] keys back from each block's end to the earliest key any of its queries needs
    need = (jnp.arange(blocks, dtype=jnp.int32) + 1) * step - first.reshape(b, blocks, step).min(axis=(0, 2))
    return jnp.sum(jnp.asarray(sizes[:-1], jnp.int32)[None, :] < need[:, None], axis=1).astype(jnp.int32)


def attention(p: dict, c: ModelConfig, x: jax.Array, positions: jax.Array, mask: jax.Array,
              windows: jax.Array | None = None) -> jax.Array:
    """Grouped-query self-attention of normed x [B, T, D] -> [B, T, D]; mask [B, T, S] bool.

    windows: key_windows(mask), computed once per step and shared by every layer.
    """
    return o_proj(p, c, attention_heads(p, c, x, positions, mask, windows))


def o_proj(p: dict, c: ModelConfig, heads: jax.Array) -> jax.Array:
    """The attention output projection: per-head outputs [B, T, N, H] -> [B, T, D]."""
    # [B, T, D]
    out = _dot("btnh,nhd->btd", heads, p["o"])
    return out + p["o_bias"] if c.o_bias else out


def attention_heads(p: dict, c: ModelConfig, x: jax.Array, positions: jax.Array, mask: jax.Array,
                    windows: jax.Array | None = None) -> jax.Array:
    """Per-head attention outputs before o_proj (the "z" hook): normed x [B, T, D] -> [B, T, N, H]."""
    b, t, _ = x.shape
    # [B, T, N, H] / [B, T, K, H]
    q = _dot("btd,dnh->btnh", x, p["q"])
    k = _dot("btd,dkh->btkh", x, p["k"])
    v = _dot("btd,dkh->btkh", x, p["v"])
    if c.qkv_bias:  # Qwen2: q/k/v projections have a bias (o_proj does not)
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if c.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
        q, k = rms_norm(q, p["q_norm"], c.rms_norm_eps), rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)

    # Queries in blocks of `step`; block i attends to keys [e - w, e), e = (i + 1) * step, w one of
    # `sizes` (causal: never a key >= e). A scan over blocks with a switch over sizes compiles one
    # body per layer whatever the length. Queries are padded on the right to whole blocks, keys
    # on the left by `left` so every window starts in range; padded keys are masked.
    step, sizes = query_block(t), window_sizes(t)
    padded = sizes[-1]
    left = padded - step
    # Heads-major layout so every attention einsum is a plain batched matmul.
    # [B, K, G, T', H] / [B, K, S', H] / [B, T', S']
    q = jnp.pad(q.reshape(b, t, c.num_kv_heads, c.group_size, c.head_dim).transpose(0, 2, 3, 1, 4),
                ((0, 0), (0, 0), (0, 0), (0, padded - t), (0, 0)))
    k, v = (jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (left, padded - t), (0, 0))) for a in (k, v))
    keep = jnp.pad(mask, ((0, 0), (0, padded - t), (left, padded - t)))

    def attend(w: int, s: jax.Array) -> jax.Array:
        """Queries [s, s + step) over keys [s + step - w, s + step) -> [B, K, G, step, H]."""
        start = s + step - w + left
        # [B, K, G, step, w] logits accumulated in float32
        logits = jnp.einsum("bkgth,bksh->bkgts", jax.lax.dynamic_slice_in_dim(q, s, step, axis=3),
                            jax.lax.dynamic_slice_in_dim(k, start, w, axis=2),
                            preferred_element_type=jnp.float32) * c.head_dim**-0.5
        m = jax.lax.dynamic_slice(keep, (0, s, start), (b, step, w))
        logits = jnp.where(m[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        return _dot("bkgts,bksh->bkgth", probs, jax.lax.dynamic_slice_in_dim(v, start, w, axis=2))

    def body(carry, block):
        i, window = block
        s = i * step
        if len(sizes) == 1:
            return carry, attend(sizes[0], s)
        return carry, jax.lax.switch(window, [lambda s, w=w: attend(w, s) for w in sizes], s)

    blocks = padded // step
    windows = key_windows(mask) if windows is None else windows
    # [blocks, B, K, G, step, H]
    _, outs = jax.lax.scan(body, None, (jnp.arange(blocks, dtype=jnp.int32), windows))
    # [B, T, N, H]
    return outs.transpose(1, 0, 4, 2, 3, 5).reshape(b, padded, c.num_heads, c.head_dim)[:, :t]


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU MLP of normed x [B, T, D] -> [B, T, D]."""
    # [B, T, F]
    gate = _dot("btd,df->btf", x, p["gate"])
    up = _dot("btd,df->btf", x, p["up"])
    # [B, T, D]
    return _dot("btf,fd->btd", jax.nn.silu(gate) * up, p["down"])


def block(p: dict, c: ModelConfig, x: jax.Array, positions: jax.Array, mask: jax.Array,
          windows: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One pre-norm decoder block: x [B, T, D] -> (residual stream after the block [B, T, D],
    {hook: [B, T, width]} of every hook point in it, format/hooks.py).

    The dict costs nothing by itself: under jit, XLA drops the hooks nobody selects (select_hooks).
    """
    b, t, _ = x.shape
    # [B, T, N, H]
    heads = attention_heads(p, c, rms_norm(x, p["attn_norm"], c.rms_norm_eps), positions, mask, windows)
    attn_out = o_proj(p, c, heads)
    mid = x + attn_out
    mlp_in = rms_norm(mid, p["mlp_norm"], c.rms_norm_eps)
    mlp_out = mlp(p, mlp_in)
    post = mid + mlp_out
    return post, {
        "resid_pre": x,
        "attn_out": attn_out,
        # [B, T, N * H], head-major: exactly the input of HF's o_proj
        "z": heads.reshape(b, t, c.num_heads * c.head_dim),
        "resid_mid": mid,
        "mlp_in": mlp_in,
        "mlp_out": mlp_out,
        "resid_post": post,
    }


def select_hooks(hook_dict: dict[str, jax.Array], hooks: Sequence[str], layer: int) -> dict[tuple[str, int], jax.Array]:
    """The requested hooks of one block's hook dict, keyed (hook, layer); the rest are dropped."""
    return {(h, layer): hook_dict[h] for h in hooks}


def forward(params: dict, config: ModelConfig, tokens: jax.Array, segment_ids: jax.Array,
            positions: jax.Array, layers: Sequence[int], mesh: Mesh | None = None,
            hooks: Sequence[str] = ("resid_post",)) -> dict[tuple[str, int], jax.Array]:
    """The requested hook points of the requested blocks, in one pass that stops at the deepest layer.

    tokens, segment_ids (0 = padding), positions: int [B, T]. Returns {(hook, layer): [B, T, width]}
    in the params' dtype (width: hidden, or heads x head_dim for z). With a mesh, the residual
    stream is constrained to batch-over-"data" at block edges.
    """
    wanted = set(layers)
    deepest = max(wanted)
    if deepest >= len(params["layers"]):
        raise ValueError(f"layer {deepest} requested but params hold {len(params['layers'])} blocks")

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, named_sharding(mesh, ("batch", "seq", "embed")))

    mask = attention_mask(segment_ids)
    windows = key_windows(mask)
    # [B, T, D]
    x = constrain(jnp.take(params["embed"], tokens, axis=0))
    out = {}
    for i in range(deepest + 1):
        x, hook_dict = block(params["layers"][i], config, x, positions, mask, windows)
        x = constrain(x)
        if i in wanted:
            out.update(select_hooks({**hook_dict, "resid_post": x}, hooks, i))
    return out
