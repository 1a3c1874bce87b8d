"""Random weights, and Hugging Face checkpoints written from our params: the demo's model and the
tests' and benchmarks' checkpoints.

One NumPy initialiser (`random_tensors`) draws every weight of a config, one tensor at a time, in
its HF shape, and maps it to our layout with checkpoint.KEY_TABLE's to_ours; one writer
(`save_hf_checkpoint`) maps our params back to HF keys through the same table's inverse
(checkpoint.to_hf). So the same seed gives the same model whether it is used as params or read
back from the checkpoint, and HF key names are written only in KEY_TABLE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llm_activations.model.checkpoint import RULE_OF, hf_key, part_index, split_block, to_hf
from llm_activations.model.source import INDEX_FILE, SINGLE_FILE
from llm_activations.model.config import ModelConfig
from llm_activations.model.specs import param_specs

# The two HF keys our params never hold (checkpoint.IGNORED_KEYS skips them on load) but that
# transformers needs to load a checkpoint as a *ForCausalLM. Same layout as HF.
HEAD_KEYS = {"lm_head": "lm_head.weight", "norm": "model.norm.weight"}

# The order block weights are drawn in. It is the demo checkpoint's, whose bytes
# demo.DEMO_VERSION names: changing it (or _draw) changes the demo's weights and output.
DRAW_ORDER = ("attn_norm", "mlp_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "o_bias", "q_norm", "k_norm",
              "gate", "up", "down")
NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")

# (KEY_TABLE short name or HEAD_KEYS name, block or None, value in our layout: a fused param's part)
Tensor = tuple[str, "int | None", np.ndarray]


def draw(rng: np.random.Generator, param: str, hf_shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """One random weight in its HF shape ([out, in] for a Linear), float32: norms 1 + 0.1 N(0, 1),
    biases and the lm_head 0.02 N, the embedding N, other matrices N / sqrt(fan_in).

    dtype is the normal draw's: float64 is the demo's (and random_tensors'); float32 draws twice as
    fast with other numbers, for benchmarks that only need the shapes and scales.
    """
    x = rng.standard_normal(hf_shape, dtype=dtype)
    if param in NORMS:
        return 1 + (x * 0.1).astype(np.float32)
    scale = 1.0 if param == "embed" else 0.02 if param == "lm_head" or param.endswith("_bias") else hf_shape[-1] ** -0.5
    return (x * scale).astype(np.float32)


def random_tensors(c: ModelConfig, num_layers: int | None = None, seed: int = 0) -> Iterator[Tensor]:
    """Deterministic random weights of model c: (param, block, value in our layout, float32) for the
    embedding, the lm_head (unless tied) and the final norm (ones), then blocks 0 .. num_layers-1
    (default: all), in DRAW_ORDER. One tensor at a time: a large model never sits in host memory whole.
    """
    rng = np.random.default_rng(seed)
    yield "embed", None, draw(rng, "embed", RULE_OF["embed"].hf_shape(c))
    if not c.tie_word_embeddings:
        yield "lm_head", None, draw(rng, "lm_head", (c.vocab_size, c.hidden_size))
    yield "norm", None, np.ones(c.hidden_size, np.float32)
    specs = param_specs(c, 1)["layers"]
    for layer in range(c.num_layers if num_layers is None else num_layers):
        for name in DRAW_ORDER:
            if RULE_OF[name].param in specs:
                yield name, layer, RULE_OF[name].to_ours(draw(rng, name, RULE_OF[name].hf_shape(c)), c)


def random_params(c: ModelConfig, num_layers: int, seed: int = 0) -> dict:
    """random_tensors as the params pytree forward takes, in NumPy: {"embed": [V, D], "layers":
    {param: [num_layers, ...]}} (the blocks stacked, q|k|v and gate|up fused as the loader fuses
    them; no lm_head or final norm)."""
    specs = param_specs(c, num_layers)["layers"]
    params: dict = {"embed": None, "layers": {name: np.zeros(s.shape, np.float32) for name, s in specs.items()}}
    for name, layer, value in random_tensors(c, num_layers, seed):
        if name == "embed":
            params["embed"] = value
        elif layer is not None:
            rule = RULE_OF[name]
            params["layers"][rule.param][layer][part_index(rule, c)] = value
    return params


def init_params(c: ModelConfig, num_layers: int, seed: int = 0, dtype=np.float32) -> dict:
    """random_params as JAX arrays of dtype on the default device (tests)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), random_params(c, num_layers, seed))


def hf_tensors(c: ModelConfig, tensors: Iterable[Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, HF tensor) for each (param, block, value in our layout), through KEY_TABLE's inverse."""
    for name, layer, value in tensors:
        if name in HEAD_KEYS:
            yield HEAD_KEYS[name], np.ascontiguousarray(value)
        else:
            yield hf_key(RULE_OF[name], layer), to_hf(name, value, c)


def params_tensors(params: dict, c: ModelConfig) -> Iterator[Tensor]:
    """Our params pytree (stacked blocks, fused params split into their HF tensors) as the
    (name, block, value) stream save_hf_checkpoint takes."""
    yield "embed", None, np.asarray(params["embed"])
    for param, stack in params["layers"].items():
        for layer in range(stack.shape[0]):
            for name, value in split_block(param, np.asarray(stack[layer]), c):
                yield name, layer, value


def save_hf_checkpoint(folder: str | os.PathLike, c: ModelConfig, tensors: Iterable[Tensor], hf_config: dict,
                       dtype=np.float32, shard_bytes: int | None = None) -> int:
    """Write an HF safetensors checkpoint into folder: config.json (hf_config, as given) and the
    tensors in dtype, in one model.safetensors or, with shard_bytes, in files of about that size
    named by model.safetensors.index.json (each file written as soon as it is full). Returns the
    bytes of the weight files."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=1))
    shards: list[list[str]] = []  # the keys of each file written
    current: dict = {}
    size = 0

    def flush():
        shards.append(list(current))
        save_file(current, str(folder / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        current.clear()

    for key, value in hf_tensors(c, tensors):
        current[key] = np.ascontiguousarray(value, dtype=dtype)
        size += current[key].nbytes
        if shard_bytes and size >= shard_bytes:
            flush()
            size = 0
    if current or not shards:
        flush()
    if not shard_bytes:
        os.replace(folder / "shard-1.tmp", folder / SINGLE_FILE)
        return (folder / SINGLE_FILE).stat().st_size
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{i + 1}.tmp", folder / name)
        weight_map.update({k: name for k in keys})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum((folder / n).stat().st_size for n in set(weight_map.values()))
