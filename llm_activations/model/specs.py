"""What the model's weights are and how they are split over the mesh, in plain Python.

The param specs (shape and logical axes of every weight), the one table mapping logical axes to
mesh axes, and the mesh checks. No JAX here: `plan` walks these specs for its instant answer on
hosts where JAX cannot be imported; transformer.py and sharding.py build on them.
"""

from __future__ import annotations

from typing import NamedTuple

from llm_activations.errors import UsageError
from llm_activations.model.config import ModelConfig

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None = replicated). The embedding table stays replicated: its lookup
# is a gather, and vocab sizes need not divide the "model" axis.
RULES: dict[str, str | None] = {
    "layers": None,  # the stacked-blocks axis lax.scan walks: every device holds all its blocks
    "batch": "data",
    "seq": None,
    "vocab": None,
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "parts": None,  # the pieces of a fused weight (q|k|v of a kv head, gate|up): never split
}

class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, mapped to mesh axes by RULES


def qkv_parts(c: ModelConfig) -> int:
    """Size of the fused q|k|v weight's "parts" axis: per kv head, its G query heads, then k, then v."""
    return c.group_size + 2


def layer_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    """Every weight of one decoder block, declared once with its shape and logical axes.

    q, k and v are one weight "qkv" [D, K, G + 2, H], and gate and up one weight "gate_up"
    [2, D, F] (fused at load time, checkpoint.KEY_TABLE's `part`): one GEMM for q|k|v instead of
    three, and a kv head's query heads, key and value stay on the same device under tensor
    parallelism (the "parts" axis is never split). gate and up stay two GEMMs on the halves (mlp).
    """
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ParamSpec((d,), ("embed",)),
        "qkv": ParamSpec((d, k, qkv_parts(c), h), ("embed", "kv_heads", "parts", "head_dim")),
        "o": ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((d,), ("embed",)),
        "gate_up": ParamSpec((2, d, f), ("parts", "embed", "mlp")),
        "down": ParamSpec((f, d), ("mlp", "embed")),
    }
    if c.qkv_bias:
        specs["qkv_bias"] = ParamSpec((k, qkv_parts(c), h), ("kv_heads", "parts", "head_dim"))
    if c.o_bias:
        specs["o_bias"] = ParamSpec((d,), ("embed",))
    if c.qk_norm:
        specs["q_norm"] = ParamSpec((h,), ("head_dim",))
        specs["k_norm"] = ParamSpec((h,), ("head_dim",))
    return specs


def param_specs(c: ModelConfig, num_layers: int) -> dict:
    """Specs pytree of the params forward needs to run blocks 0 .. num_layers-1: each block weight
    stacked over blocks into one [L, ...] array (logical axis "layers"), which lax.scan walks."""
    return {
        "embed": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed")),
        "layers": {name: ParamSpec((num_layers,) + s.shape, ("layers",) + s.axes) for name, s in layer_specs(c).items()},
    }


def model_splits_ok(config: ModelConfig, model: int) -> str | None:
    """None if `model` ways of tensor parallelism divide every sharded dimension, else why not."""
    for name, size in (("num_attention_heads", config.num_heads), ("num_key_value_heads", config.num_kv_heads),
                       ("intermediate_size", config.intermediate_size)):
        if size % model:
            return f"{name}={size} is not divisible by model={model}"
    return None


def check_mesh_shape(shape: tuple[int, int], config: ModelConfig, batch_size: int, num_devices: int) -> None:
    """Raise UsageError (one line) if (data, model) cannot run this model and batch size."""
    if len(shape) != 2 or any(int(s) < 1 for s in shape):
        raise UsageError(f"mesh shape {tuple(shape)} must be two positive integers (data, model)")
    data, model = (int(s) for s in shape)
    if data * model > num_devices:
        raise UsageError(f"mesh shape (data={data}, model={model}) needs {data * model} devices but only {num_devices} are available")
    why = model_splits_ok(config, model)
    if why:
        raise UsageError(f"mesh shape (data={data}, model={model}) is invalid: {why}")
    if batch_size % data:
        raise UsageError(f"mesh shape (data={data}, model={model}) is invalid: batch size {batch_size} is not divisible by data={data}")
