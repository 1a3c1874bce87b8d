"""The Qwen2/Qwen3/Llama decoder as pure functions over a params pytree.

params = {"embed": [V, D], "layers": {name: [L, ...]}}: each block weight stacked over the
blocks up to the deepest requested layer. `forward` returns the requested hook points
(format/hooks.py: resid_post, attn_out, z, ...) of each requested block; no later block, final
norm or lm_head ever runs.

Einsum axes: B batch, T query position, S key position, D hidden, N query heads, K kv heads,
G query heads per kv head, H head_dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llm_activations.format import hooks as hk
from llm_activations.model import attention as attn
from llm_activations.model.attention import Backend
from llm_activations.model.config import ModelConfig
from llm_activations.model.sharding import named_sharding
from llm_activations.model.specs import ParamSpec, layer_specs, param_specs  # noqa: F401  (model.param_specs, ...)


def param_shardings(c: ModelConfig, num_layers: int, mesh: Mesh) -> dict:
    return jax.tree.map(lambda s: named_sharding(mesh, s.axes), param_specs(c, num_layers),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, accumulated in float32, cast back before the weight (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class Rope(NamedTuple):
    """cos and sin [B, T, 1, H/2] float32 of every position: computed once per step, shared by every block."""

    cos: jax.Array
    sin: jax.Array


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> Rope:
    """The rotary tables at positions [B, T] (HF's inv_freq, in float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    # [B, T, H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return Rope(jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


def rope(x: jax.Array, tables: Rope) -> jax.Array:
    """Rotary embedding (HF "rotate_half" layout) of x [B, T, N, H], in float32."""
    cos, sin = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_heads(p: dict, c: ModelConfig, x: jax.Array, tables: Rope, segment_ids: jax.Array, aux,
                    backend: Backend, mesh: Mesh | None = None) -> jax.Array:
    """Per-head attention outputs before o_proj (the "z" hook): normed x [B, T, D] -> [B, T, N, H].

    Every attention backend (attention.attend) returns this per-head layout; o_proj is ours, so z
    is the same tensor whichever kernel ran.
    """
    b, t, _ = x.shape
    g = c.group_size
    # [B, T, K, G + 2, H]: one GEMM for q, k and v
    qkv = attn.dot("btd,dkph->btkph", x, p["qkv"], backend.float32_dots)
    if c.qkv_bias:  # Qwen2: q/k/v projections have a bias (o_proj does not)
        qkv = qkv + p["qkv_bias"]
    # [B, T, N, H] (query head n = kv head n // G, as HF's repeat_kv) / [B, T, K, H]
    q, k, v = qkv[:, :, :, :g].reshape(b, t, c.num_heads, c.head_dim), qkv[:, :, :, g], qkv[:, :, :, g + 1]
    if c.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
        q, k = rms_norm(q, p["q_norm"], c.rms_norm_eps), rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q, k = rope(q, tables), rope(k, tables)
    # [B, T, N, H]
    return attn.attend(backend, q, k, v, segment_ids, aux, mesh)


def o_proj(p: dict, c: ModelConfig, heads: jax.Array, float32_dots: bool) -> jax.Array:
    """The attention output projection: per-head outputs [B, T, N, H] -> [B, T, D]."""
    # [B, T, D]
    out = attn.dot("btnh,nhd->btd", heads, p["o"], float32_dots)
    return out + p["o_bias"] if c.o_bias else out


def mlp(p: dict, x: jax.Array, float32_dots: bool) -> jax.Array:
    """SwiGLU MLP of normed x [B, T, D] -> [B, T, D]."""
    # [B, T, F] each: two GEMMs on the fused weight's halves (gate_up [2, D, F], or its two parts in
    # the scan: parts_of). One GEMM to [B, T, 2, F] keeps the whole product alive next to
    # silu(gate) * up: plan --topology measured 154 MiB of temporaries per row at 7B on TPU v4 with
    # it, ~96 MiB like this.
    gate = attn.dot("btd,df->btf", x, p["gate_up"][0], float32_dots)
    up = attn.dot("btd,df->btf", x, p["gate_up"][1], float32_dots)
    # [B, T, D]
    return attn.dot("btf,fd->btd", jax.nn.silu(gate) * up, p["down"], float32_dots)


def block(p: dict, c: ModelConfig, x: jax.Array, tables: Rope, segment_ids: jax.Array, aux,
          backend: Backend, mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One pre-norm decoder block: x [B, T, D] -> (residual stream after the block [B, T, D],
    {hook: [B, T, width]} of every hook point in it, format/hooks.py).

    The dict costs nothing by itself: under jit, XLA drops the hooks nobody keeps.
    """
    b, t, _ = x.shape
    f32 = backend.float32_dots
    # [B, T, N, H]
    heads = attention_heads(p, c, rms_norm(x, p["attn_norm"], c.rms_norm_eps), tables, segment_ids, aux,
                            backend, mesh)
    attn_out = o_proj(p, c, heads, f32)
    mid = x + attn_out
    mlp_in = rms_norm(mid, p["mlp_norm"], c.rms_norm_eps)
    mlp_out = mlp(p, mlp_in, f32)
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


# Block stacks of a 16-bit float model may be held as their uint16 bits (checkpoint.load_params
# does so on CPU): XLA:CPU's float normalisation turns a bfloat16 dynamic-slice into a float32 one,
# and loop-invariant code motion then hoists the conversion of the *whole stack* out of the scan:
# a float32 copy of every weight, every step. Integers are never normalised, so the scan slices one
# block of bits and views it as bfloat16 (a free bitcast). tests/test_step_hlo.py checks the HLO.
BITS = np.uint16


def to_bits(w):
    """A 16-bit float weight (NumPy or JAX) as its uint16 bits; other dtypes unchanged."""
    if w.dtype.itemsize != 2 or w.dtype == BITS:
        return w
    return w.view(BITS) if isinstance(w, np.ndarray) else jax.lax.bitcast_convert_type(w, BITS)


def from_bits(w: jax.Array, dtype) -> jax.Array:
    """to_bits' inverse (one block's slice, inside the scan): w viewed as dtype."""
    return jax.lax.bitcast_convert_type(w, dtype) if w.dtype == BITS and dtype != BITS else w


def parts_of(stack: jax.Array, i: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """Block i of a [L, P, ...] stack as its P parts, each sliced straight from the stack: XLA (TPU)
    materialises a block sliced whole before its parts are taken, a copy of 259 MiB per chip for
    7B's gate_up (plan --topology, four deep layers on v4:2x2x1: 418 MiB of temporaries at batch 4
    that way, 159 MiB this way)."""
    rest = stack.shape[2:]
    return tuple(from_bits(jax.lax.dynamic_slice(stack, (i, j) + (0,) * len(rest), (1, 1) + rest)[0, 0], dtype)
                 for j in range(stack.shape[1]))


def num_blocks(params: dict) -> int:
    """Blocks held by params (the leading axis of every stacked weight)."""
    return jax.tree.leaves(params["layers"])[0].shape[0]


def forward(params: dict, config: ModelConfig, tokens: jax.Array, segment_ids: jax.Array,
            positions: jax.Array, layers: Sequence[int], backend: Backend, mesh: Mesh | None = None,
            hooks: Sequence[str] = hk.DEFAULT_HOOKS) -> dict[tuple[str, int], jax.Array]:
    """The requested hook points of the requested blocks, in one pass that stops at the deepest layer.

    tokens, segment_ids (0 = padding), positions: int [B, T]. Returns {(hook, layer): [B, T, width]}
    in the params' dtype (width: hidden, or heads x head_dim for z). Blocks 0 .. max(layers) run as
    one lax.scan over the stacked weights, so the program (and its compile time) does not grow with
    depth. Each requested hook has one [R, B, T, width] carry (R = len(layers); one fewer for
    resid_post, whose deepest layer is the residual stream the scan ends with) that the scan writes
    as it passes a requested block; no other block's or hook's activations are kept. The RoPE
    tables and the attention kernel's segment data are computed once, before the scan. Block
    stacks may hold 16-bit floats as their bits (BITS). With a mesh, the residual stream is
    constrained to batch-over-"data" at block edges.
    """
    wanted = sorted(set(layers))
    deepest = wanted[-1]
    if deepest >= num_blocks(params):
        raise ValueError(f"layer {deepest} requested but params hold {num_blocks(params)} blocks")
    hooks = tuple(hooks)

    def constrain(x, axes=("batch", "seq", "embed")):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes))

    # Once per step, shared by every block: the attention kernel's segment data and the RoPE tables.
    aux = attn.prepare(backend, segment_ids)
    tables = rope_tables(positions, config.head_dim, config.rope_theta)
    # The deepest block's resid_post is the scan's final carry: no buffer slot for it.
    stored = {h: [layer for layer in wanted if not (h == "resid_post" and layer == deepest)] for h in hooks}
    stored = {h: ls for h, ls in stored.items() if ls}
    # hook -> [deepest + 1]: the slot of block i's activations in that hook's buffer, -1 if not stored
    slots = {}
    for h, ls in stored.items():
        slots[h] = np.full(deepest + 1, -1, np.int32)
        slots[h][ls] = np.arange(len(ls))
    # [B, T, D]
    x = constrain(jnp.take(params["embed"], tokens, axis=0))
    b, t, _ = x.shape
    # hook -> [R, B, T, width]
    kept = {h: constrain(jnp.zeros((len(ls), b, t, hk.width(h, config.hidden_size, config.num_heads, config.head_dim)),
                                   x.dtype), (None, "batch", "seq", "embed"))
            for h, ls in stored.items()}

    dtype = params["embed"].dtype  # the compute dtype (block stacks may hold its bits: BITS)

    # Bits only on CPU, where they save a float32 copy of each stack. On TPU a bfloat16 and a uint16
    # array can have different tiled layouts, so bitcasting a whole stack is a full copy of the
    # weights: plan --topology measured 6.86 GiB of temporaries per chip at 7B, batch 4, with it.
    stacks = jax.tree.map(to_bits, params["layers"]) if backend.platform == "cpu" else params["layers"]

    by_parts = {name for name, spec in layer_specs(config).items() if spec.axes[0] == "parts"}

    def body(carry, i):
        x, kept = carry
        # Block i's weights: one slice of each stack (of bits, for 16-bit floats: BITS)
        p = {name: parts_of(w, i, dtype) if name in by_parts else
             from_bits(jax.lax.dynamic_index_in_dim(w, i, keepdims=False), dtype) for name, w in stacks.items()}
        x, hook_dict = block(p, config, x, tables, segment_ids, aux, backend, mesh)
        x = constrain(x)
        picked = {**hook_dict, "resid_post": x}

        def keep(h, buf):
            # Blocks not stored rewrite slot 0 with what it already holds (an in-place select).
            s = jnp.asarray(slots[h])[i]
            r = jnp.maximum(s, 0)
            old = jax.lax.dynamic_index_in_dim(buf, r, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(s >= 0, picked[h], old), r, 0)

        return (x, {h: keep(h, buf) for h, buf in kept.items()}), None

    (x, kept), _ = jax.lax.scan(body, (x, kept), jnp.arange(deepest + 1, dtype=jnp.int32))
    return {(h, layer): x if (h == "resid_post" and layer == deepest) else kept[h][stored[h].index(layer)]
            for h in hooks for layer in wanted}
