"""Load Hugging Face safetensors checkpoints straight into their target sharding.

One explicit table maps HF keys to our param paths, with each key's HF shape and the transform
beside it. Tensors are read one at a time, converted on the host to the compute dtype, and put
on the mesh (block weights written into their [L, ...] stack in place) before the next is read,
so the host never holds a second copy of the model.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from llm_activations.model import source
from llm_activations.model.config import ModelConfig
from llm_activations.errors import UsageError
from llm_activations.model.sharding import named_sharding
from llm_activations.model.attention import platform_of
from llm_activations.model.specs import layer_specs, param_specs
from llm_activations.model.transformer import BITS, param_shardings, to_bits



class KeyRule(NamedTuple):
    pattern: str  # regex over the HF key; (\d+) is the layer index
    name: str  # the HF tensor's short name: "embed", "q", "gate", ... (RULE_OF's key)
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]  # HF tensor -> its part of `param`, our layout
    param: str = ""  # the param it lands in ("" = name); fused params (qkv, gate_up) hold several
    part: Callable[[ModelConfig], slice] | None = None  # where along the param's "parts" axis (None: whole)


def _same(w, c):
    return w


def _fused(pattern, name, param, hf_shape, to_ours, part) -> KeyRule:
    return KeyRule(pattern, name, hf_shape, to_ours, param, part)


# HF Linear weights are [out, in]; ours are [in, ...] with heads split out. q, k and v are fused
# into qkv [D, K, G + 2, H] (per kv head: its G query heads - HF's query head n belongs to kv head
# n // G - then k, then v), and gate and up into gate_up [2, D, F]: specs.layer_specs.
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"model\.embed_tokens\.weight", "embed", lambda c: (c.vocab_size, c.hidden_size), _same),
    KeyRule(r"model\.layers\.(\d+)\.input_layernorm\.weight", "attn_norm", lambda c: (c.hidden_size,), _same),
    _fused(r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "q", "qkv", lambda c: (c.q_size, c.hidden_size),
           lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.group_size, c.head_dim),
           lambda c: slice(0, c.group_size)),
    _fused(r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "k", "qkv", lambda c: (c.kv_size, c.hidden_size),
           lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, 1, c.head_dim),
           lambda c: slice(c.group_size, c.group_size + 1)),
    _fused(r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "v", "qkv", lambda c: (c.kv_size, c.hidden_size),
           lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, 1, c.head_dim),
           lambda c: slice(c.group_size + 1, c.group_size + 2)),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "o", lambda c: (c.hidden_size, c.q_size),
            lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),
    _fused(r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "q_bias", "qkv_bias", lambda c: (c.q_size,),
           lambda w, c: w.reshape(c.num_kv_heads, c.group_size, c.head_dim), lambda c: slice(0, c.group_size)),
    _fused(r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "k_bias", "qkv_bias", lambda c: (c.kv_size,),
           lambda w, c: w.reshape(c.num_kv_heads, 1, c.head_dim), lambda c: slice(c.group_size, c.group_size + 1)),
    _fused(r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "v_bias", "qkv_bias", lambda c: (c.kv_size,),
           lambda w, c: w.reshape(c.num_kv_heads, 1, c.head_dim), lambda c: slice(c.group_size + 1, c.group_size + 2)),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", "o_bias", lambda c: (c.hidden_size,), _same),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "q_norm", lambda c: (c.head_dim,), _same),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "k_norm", lambda c: (c.head_dim,), _same),
    KeyRule(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "mlp_norm", lambda c: (c.hidden_size,), _same),
    _fused(r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "gate", "gate_up",
           lambda c: (c.intermediate_size, c.hidden_size), lambda w, c: w.T[None], lambda c: slice(0, 1)),
    _fused(r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "up", "gate_up",
           lambda c: (c.intermediate_size, c.hidden_size), lambda w, c: w.T[None], lambda c: slice(1, 2)),
    KeyRule(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "down", lambda c: (c.hidden_size, c.intermediate_size),
            lambda w, c: w.T),
)
KEY_TABLE = tuple(r._replace(param=r.param or r.name) for r in KEY_TABLE)
_COMPILED = tuple((re.compile(r.pattern + r"\Z"), r) for r in KEY_TABLE)
RULE_OF = {r.name: r for r in KEY_TABLE}  # HF tensor short name -> its row


def part_index(rule: KeyRule, c: ModelConfig) -> tuple:
    """Where rule's tensor (in our layout) sits in one block of its param: the whole of it, or a
    slice along the fused param's "parts" axis."""
    if rule.part is None:
        return (...,)
    axis = layer_specs(c)[rule.param].axes.index("parts")
    return (slice(None),) * axis + (rule.part(c),)


def block_rules(c: ModelConfig) -> list[KeyRule]:
    """The rows of one block's HF tensors that config c has (q/k/v biases, qk norms and the o bias
    only where its architecture has them)."""
    specs = layer_specs(c)
    return [r for r in KEY_TABLE if r.name != "embed" and r.param in specs]

# Present in checkpoints, never needed for the residual stream.
IGNORED_KEYS = re.compile(r"(lm_head\.weight|model\.norm\.weight|model\.rotary_emb\.inv_freq|"
                          r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)\Z")


def hf_key(rule: KeyRule | str, layer: int | None) -> str:
    """The HF key a rule (or its short name) stands for at one layer (None for the embedding)."""
    if isinstance(rule, str):
        rule = RULE_OF[rule]
    return rule.pattern.replace(r"(\d+)", str(layer)).replace("\\", "")


def check_complete(folder: str, config: ModelConfig, num_blocks: int) -> None:
    """Every weight blocks 0..num_blocks-1 need is in the checkpoint with its shape, and every file
    is as long as its header says (a truncated download), from the safetensors headers alone: the
    launcher runs this before it touches the output folder, so the workers never find out late."""
    from safetensors import safe_open

    shapes = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(path, "np") as f:  # the library checks the header covers the file exactly
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as e:
            raise UsageError(f"--model {folder}: {os.path.basename(path)} is unreadable or truncated ({e})") from None
    needed = [(RULE_OF["embed"], None)] + [(rule, i) for i in range(num_blocks) for rule in block_rules(config)]
    for rule, layer in needed:
        key = hf_key(rule, layer)
        if key not in shapes:
            raise UsageError(f"--model {folder}: the checkpoint has no {key}, needed for layers up to {num_blocks - 1} "
                             "(an incomplete download, or config.json names more layers than the weights hold)")
        if shapes[key] != rule.hf_shape(config):
            raise UsageError(f"--model {folder}: checkpoint key {key} has shape {list(shapes[key])}, "
                             f"expected {list(rule.hf_shape(config))} from config.json")


# The weight files of a checkpoint folder: model/source.py holds the rule (index or model.safetensors).
safetensors_files = source.weight_files


# safetensors dtype names -> numpy dtypes (ml_dtypes supplies bfloat16).
_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def _read_tensors(path: str) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """(key, read(), shape) for each tensor of one safetensors file; read() loads just that tensor.

    Read by hand from the (tiny, stable) safetensors layout - an 8-byte header length, a JSON
    header of dtype / shape / byte offsets, then raw little-endian data - because the library's
    numpy backend has no bfloat16 and its flax backend stages each tensor through about 3 extra
    host copies (measured: +224 MB peak for a 62 MB tensor). Here each tensor is one read into one
    numpy buffer, with no mmap keeping pages of a 15 GB file resident.
    """
    name = os.path.basename(path)
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{name} is not a safetensors file (unreadable header)") from None
        header.pop("__metadata__", None)
        base = 8 + n
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]

            def read(key=key, info=info, shape=shape, begin=begin, end=end) -> np.ndarray:
                if info["dtype"] not in _DTYPES:
                    raise UsageError(f"checkpoint key {key} has dtype {info['dtype']}; supported: {', '.join(_DTYPES)}")
                out = np.empty(shape, _DTYPES[info["dtype"]])
                if out.nbytes != end - begin:
                    raise UsageError(f"checkpoint key {key} in {name}: {end - begin} bytes do not hold {info['dtype']}{list(shape)}")
                f.seek(base + begin)
                if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                    raise UsageError(f"checkpoint key {key}: {name} is truncated")
                return out

            yield key, read, shape


def _match(key: str) -> tuple[KeyRule, int | None] | None:
    for regex, rule in _COMPILED:
        m = regex.match(key)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None


def load_params(folder: str, config: ModelConfig, num_layers: int, mesh: Mesh, dtype) -> dict:
    """Params for blocks 0 .. num_layers-1 (plus the embedding), each placed in its sharding on mesh.

    Block weights are stacked into [num_layers, ...] arrays (what forward's lax.scan walks). Each
    stack is allocated once on the mesh and every block's tensor is written into it in place as it
    is read, so the host holds one tensor at a time and the device never a second copy.
    On CPU, the block stacks of a 16-bit dtype hold its uint16 bits (transformer.BITS: the scan
    then slices no float32 copy of them); the embedding is always in dtype.
    Raises UsageError naming the key for a missing, unknown, duplicate or wrongly shaped weight.
    """
    dtype = np.dtype(dtype)
    bits = platform_of(list(mesh.devices.flat)) == "cpu" and dtype.itemsize == 2
    shardings = param_shardings(config, num_layers, mesh)
    specs = param_specs(config, num_layers)
    params: dict = {"embed": None, "layers": {}}
    filled: set[tuple[str, int]] = set()
    seen: set[str] = set()
    for path in safetensors_files(folder):
        for key, read, shape in _read_tensors(path):
            if key in seen:
                raise UsageError(f"checkpoint key {key} appears twice ({os.path.basename(path)})")
            seen.add(key)
            if IGNORED_KEYS.match(key):
                continue
            found = _match(key)
            if found is None:
                raise UsageError(f"unexpected checkpoint key {key} in {os.path.basename(path)} for a {config.architecture}")
            rule, layer = found
            if layer is not None and layer >= config.num_layers:
                raise UsageError(f"unexpected checkpoint key {key}: config.json has only {config.num_layers} layers")
            if layer is not None and layer >= num_layers:
                continue  # deeper than any requested layer: never read
            if layer is not None and rule.param not in specs["layers"]:
                raise UsageError(f"unexpected checkpoint key {key}: a {config.architecture} with this config.json has no such weight")
            if shape != rule.hf_shape(config):
                raise UsageError(f"checkpoint key {key} has shape {list(shape)}, expected {list(rule.hf_shape(config))} from config.json")
            value = np.ascontiguousarray(rule.to_ours(read(), config), dtype=dtype)
            if layer is None:
                params[rule.param] = jax.device_put(value, shardings[rule.param])
                jax.block_until_ready(params[rule.param])
            else:
                spec = specs["layers"][rule.param]
                stack = params["layers"].pop(rule.param, None)
                if stack is None:
                    stack = _zeros(spec.shape, BITS if bits else dtype, shardings["layers"][rule.param])
                block = jax.device_put(to_bits(value) if bits else value, named_sharding(mesh, spec.axes[1:]))
                # [L, ...] start of this tensor in the stack: its block, and its part of a fused param
                at = [layer] + [0] * (len(spec.shape) - 1)
                if rule.part is not None:
                    at[1 + spec.axes[1:].index("parts")] = rule.part(config).start
                params["layers"][rule.param] = jax.block_until_ready(_write_block(stack, block, np.asarray(at, np.int32)))
                filled.add((rule.name, layer))
                del stack, block  # the stack was donated; the block is written
            # The transfer is done: at most one tensor's host and device copies are alive at any time.
            del value
    _check_complete(params, filled, config, num_layers)
    return params


def _zeros(shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    return _zeros_program(shape, np.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=None)
def _zeros_program(shape: tuple[int, ...], dtype, sharding):
    # One program per (shape, dtype, sharding), reused by every later load in the process.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


# Writes one block's tensor (a fused param's part) into its stack in place at `at` [L, ...] (the
# stack's buffer is donated): one small program per tensor shape, whatever the number of blocks.
@functools.partial(jax.jit, donate_argnums=0)
def _write_block(stack: jax.Array, value: jax.Array, at: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(stack, value[None], tuple(at))


def _check_complete(params: dict, filled: set, config: ModelConfig, num_layers: int) -> None:
    if params["embed"] is None:
        raise UsageError(f"checkpoint is missing {hf_key('embed', None)}")
    rules = block_rules(config)
    for i in range(num_layers):
        missing = [r.name for r in rules if (r.name, i) not in filled]
        if missing:
            raise UsageError(f"checkpoint is missing {hf_key(missing[0], i)}"
                             + (f" (and {len(missing) - 1} more weights of layer {i})" if len(missing) > 1 else ""))


def to_hf(name: str, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One HF tensor in our layout (one block's, for a block weight; its part, for a fused param:
    `split_block`) -> the HF tensor: the exact inverse of that KEY_TABLE row's to_ours, so keys and
    layouts are written where they are read.

    Every to_ours is a rearrangement (transposes and reshapes, which NumPy makes as views), so
    to_ours applied to an empty HF-shaped tensor is a view of it in our layout: writing `value`
    through that view fills the HF tensor, and no transform is written twice.
    """
    rule = RULE_OF[name]
    out = np.empty(rule.hf_shape(config), value.dtype)
    view = rule.to_ours(out, config)
    if not (view is out or view.base is out) or view.shape != value.shape:
        raise ValueError(f"{name}: KEY_TABLE's to_ours is not a view of shape {value.shape}; it has no inverse here")
    view[...] = value
    return out


def split_block(param: str, value: np.ndarray, config: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """One block of our param -> (HF short name, tensor in our layout) for each HF tensor it holds
    (three for qkv, two for gate_up, else one): what to_hf takes."""
    return [(r.name, value[part_index(r, config)]) for r in KEY_TABLE if r.param == param]
