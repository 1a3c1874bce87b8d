"""Tiny random `transformers` decoders saved with save_pretrained, and their reference activations.

torch is only used here, in tests: transformers' own forward is the reference implementation.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)

_PLATFORM = jax.devices()[0].platform
_NO_GPU = pytest.mark.skipif(_PLATFORM not in ("gpu", "cuda"), reason=f"a GPU kernel; the default device here is {_PLATFORM}")
# Attention implementations every parity test runs ("splash" in Pallas interpret mode off a TPU):
# those that compute float32 (cuDNN's flash kernel takes only 16-bit inputs), and the bfloat16 ones.
FLOAT32_ATTENTION = ["xla", "splash", pytest.param("tokamax", marks=_NO_GPU)]
BFLOAT16_ATTENTION = FLOAT32_ATTENTION + [pytest.param("cudnn", marks=_NO_GPU)]

VARIANTS = {
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, num_key_value_heads=2, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False, rope_theta=1e6)),
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_theta=500000.0)),
}


def build_model(variant: str = "qwen2", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 random model; weights drawn at ~1/sqrt(fan_in) (not HF's 0.02) so every op matters."""
    config_cls, extra = VARIANTS[variant]
    kwargs = {**BASE, **extra, **overrides}
    rope_theta = kwargs.pop("rope_theta", 10000.0)
    config = config_cls(**kwargs)
    config.rope_parameters = {"rope_theta": rope_theta, "rope_type": "default"}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))
    return model.eval()


def save_model(model, folder: str, sharded: bool = False, dtype: torch.dtype | None = None) -> str:
    """save_pretrained (safetensors) into folder; sharded=True splits it into several files."""
    os.makedirs(folder, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "10GB")
    return folder


def tiny_checkpoint(folder: str, variant: str = "qwen2", *, sharded: bool = False, seed: int = 0,
                    dtype: torch.dtype | None = None, **overrides):
    """(folder, float32 torch model) for a tiny random model saved under folder."""
    model = build_model(variant, seed, **overrides)
    save_model(build_model(variant, seed, **overrides) if dtype is not None else model, folder, sharded, dtype)
    return folder, model


@torch.no_grad()
def reference_layers(torch_model, token_ids, layers) -> dict[int, np.ndarray]:
    """transformers' residual stream after each block in layers for ONE segment: {layer: [n, H]} float32."""
    captured = {}
    hooks = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            out = output[0] if isinstance(output, tuple) else output
            captured[layer] = out[0].float().numpy().copy()

        hooks.append(torch_model.model.layers[layer].register_forward_hook(hook))
    try:
        torch_model.model(input_ids=torch.as_tensor(np.asarray(token_ids, np.int64))[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def reference_hooks(torch_model, token_ids, layers, hooks) -> dict[tuple[str, int], np.ndarray]:
    """transformers' hook points for ONE segment, through forward hooks on the matching modules:
    {(hook, layer): [n, width]} float32 (hook names: llm_activations/format/hooks.py).

    resid_pre: the block's input; attn_out: self_attn's output; z: o_proj's input
    (forward_pre_hook); mlp_in: post_attention_layernorm's output; mlp_out: mlp's output;
    resid_post: the block's output; resid_mid = resid_pre + attn_out (HF has no module there).
    """
    captured, handles = {}, []

    def keep(hook, layer, value):
        value = value[0] if isinstance(value, tuple) else value
        captured[(hook, layer)] = value[0].float().numpy().copy()

    for layer in layers:
        block = torch_model.model.layers[layer]
        attn = block.self_attn
        wanted = set(hooks) | ({"resid_pre", "attn_out"} if "resid_mid" in hooks else set())
        sites = {
            "resid_pre": (block, "pre", lambda m, args, kwargs: args[0] if args else kwargs["hidden_states"]),
            "attn_out": (attn, "post", lambda m, args, kwargs, out: out),
            "z": (attn.o_proj, "pre", lambda m, args, kwargs: args[0]),
            "mlp_in": (block.post_attention_layernorm, "post", lambda m, args, kwargs, out: out),
            "mlp_out": (block.mlp, "post", lambda m, args, kwargs, out: out),
            "resid_post": (block, "post", lambda m, args, kwargs, out: out),
        }
        for hook, (module, when, get) in sites.items():
            if hook not in wanted:
                continue
            if when == "pre":
                fn = lambda m, a, k, hook=hook, layer=layer, get=get: keep(hook, layer, get(m, a, k))
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                fn = lambda m, a, k, o, hook=hook, layer=layer, get=get: keep(hook, layer, get(m, a, k, o))
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
    try:
        torch_model.model(input_ids=torch.as_tensor(np.asarray(token_ids, np.int64))[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        if "resid_mid" in hooks:
            captured[("resid_mid", layer)] = captured[("resid_pre", layer)] + captured[("attn_out", layer)]
    return {(h, layer): captured[(h, layer)] for h in hooks for layer in layers}


_CACHE: dict = {}
_CACHE_DIR: list[str] = []


def cached_checkpoint(variant: str = "qwen2", *, sharded: bool = False, dtype: torch.dtype | None = None, **overrides):
    """tiny_checkpoint built once per test process (folders live in one temp dir until exit)."""
    import atexit
    import shutil
    import tempfile

    key = (variant, sharded, str(dtype), tuple(sorted(overrides.items())))
    if key not in _CACHE:
        if not _CACHE_DIR:
            _CACHE_DIR.append(tempfile.mkdtemp(prefix="tiny_models_"))
            atexit.register(shutil.rmtree, _CACHE_DIR[0], True)
        folder = os.path.join(_CACHE_DIR[0], f"{variant}_{len(_CACHE)}")
        _CACHE[key] = tiny_checkpoint(folder, variant, sharded=sharded, dtype=dtype, **overrides)
    return _CACHE[key]


def packed_batch(rows: list[list[int]], seq_len: int, vocab_size: int = 512, seed: int = 0):
    """(tokens, segment_ids, positions) int32 [len(rows), seq_len] from per-row segment lengths.

    Segments get ids 1, 2, ... within their row; positions restart at 0 per segment; the rest of
    each row is padding (segment 0, token 0, position 0). Also returns [(row, start, length), ...].
    """
    rng = np.random.default_rng(seed)
    b = len(rows)
    tokens = np.zeros((b, seq_len), np.int32)
    segs = np.zeros((b, seq_len), np.int32)
    pos = np.zeros((b, seq_len), np.int32)
    spans = []
    for r, lengths in enumerate(rows):
        start = 0
        for s, n in enumerate(lengths, 1):
            tokens[r, start:start + n] = rng.integers(1, vocab_size, n)
            segs[r, start:start + n] = s
            pos[r, start:start + n] = np.arange(n)
            spans.append((r, start, n))
            start += n
        assert start <= seq_len
    return tokens, segs, pos, spans


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the worst error relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
