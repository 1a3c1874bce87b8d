"""The compiled CPU step holds no copy of the stacked weights (issue 24): the scan slices one block
at a time, and nothing outside the loop converts or copies a whole [L, ...] stack."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_activations.model import transformer as model
from llm_activations.model.attention import backend_for
from llm_activations.model.config import ModelConfig
from llm_activations.model.hf_weights import init_params

CONFIG = ModelConfig(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=64, hidden_size=64,
                     intermediate_size=96, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                     rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=True,
                     o_bias=False, qk_norm=False)


def compiled_hlo(dtype, layers=(4,), hooks=("resid_post",)) -> str:
    params = init_params(CONFIG, CONFIG.num_layers, dtype=dtype)
    params["layers"] = jax.tree.map(model.to_bits, params["layers"])  # as checkpoint.load_params holds them on CPU
    backend = backend_for(jax.devices("cpu")[:1], dtype)
    ids = jnp.ones((2, 32), jnp.int32)
    step = jax.jit(lambda p, t, s, pos: model.forward(p, CONFIG, t, s, pos, layers, backend, hooks=hooks))
    return step.lower(params, ids, ids, ids).compile().as_text()


def stack_shapes(dtype) -> set[str]:
    """"[5,64,2,4,16]"-style dims of every stacked block weight."""
    specs = model.param_specs(CONFIG, CONFIG.num_layers)["layers"]
    return {"[" + ",".join(map(str, s.shape)) + "]" for s in specs.values()}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_no_whole_stack_copy_in_the_step(dtype):
    hlo = compiled_hlo(dtype)
    entry = hlo[hlo.index("\nENTRY"):]
    # Outside the loop, a stack may only be a parameter (or its free bitcast): never an op's new buffer.
    made = [line.strip() for line in entry.splitlines()
            if "=" in line and any(re.search(rf"\b(f32|bf16|u16){re.escape(d)}", line.split("=", 1)[1].split("(")[0])
                                   for d in stack_shapes(dtype))
            and not re.search(r"= \S+ (parameter|bitcast|bitcast-convert|get-tuple-element|tuple|while)\(", line)]
    assert not made, made
    # The loop's state carries the stacks in their own 16-bit (or float32) width: no float32 shadow.
    if dtype == jnp.bfloat16:
        assert not re.search(r"f32\[5,64,2,4,16\]", hlo)
        assert re.search(r"u16\[5,64,2,4,16\]", hlo)
    assert re.search(r"while\(", entry)


def test_deepest_layer_needs_no_buffer():
    # resid_post of the deepest layer is the final carry: no [R, B, T, D] buffer at all
    assert not re.search(r"bf16\[1,2,32,64\]", compiled_hlo(jnp.bfloat16))
    assert re.search(r"bf16\[1,2,32,64\]", compiled_hlo(jnp.bfloat16, layers=(1, 4)))


def batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 32)), jnp.int32)
    segs = jnp.asarray(np.repeat([[1] * 20 + [2] * 8 + [0] * 4], 2, 0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(20)) + list(range(8)) + [0] * 4], 2, 0), jnp.int32)
    return tokens, segs, pos


def test_bits_stacks_give_the_same_numbers_as_bf16_stacks():
    params = init_params(CONFIG, CONFIG.num_layers, seed=1, dtype=jnp.bfloat16)
    bits = dict(params, layers=jax.tree.map(model.to_bits, params["layers"]))
    backend = backend_for(jax.devices("cpu")[:1], jnp.bfloat16)
    run = jax.jit(lambda p, t, s, pos: model.forward(p, CONFIG, t, s, pos, (1, 4), backend, hooks=("resid_post", "z")))
    a, b = run(params, *batch()), run(bits, *batch())
    assert set(a) == {("resid_post", 1), ("resid_post", 4), ("z", 1), ("z", 4)}
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key], np.float32), np.asarray(b[key], np.float32), err_msg=str(key))


def test_results_match_a_layer_by_layer_loop():
    # The fused scan (RoPE tables and attention data once, deepest layer from the carry) against
    # blocks applied one by one with plain indexing, in float32.
    params = init_params(CONFIG, CONFIG.num_layers, seed=1, dtype=jnp.float32)
    backend = backend_for(jax.devices("cpu")[:1], jnp.float32)
    tokens, segs, pos = batch()
    out = model.forward(params, CONFIG, tokens, segs, pos, (1, 4), backend, hooks=("resid_post", "mlp_out"))
    x = params["embed"][tokens]
    tables = model.rope_tables(pos, CONFIG.head_dim, CONFIG.rope_theta)
    from llm_activations.model import attention as attn
    aux = attn.prepare(backend, segs)
    for i in range(5):
        p = {k: v[i] for k, v in params["layers"].items()}
        x, hooks = model.block(p, CONFIG, x, tables, segs, aux, backend)
        if i in (1, 4):
            np.testing.assert_allclose(out[("resid_post", i)], x, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out[("mlp_out", i)], hooks["mlp_out"], rtol=1e-5, atol=1e-5)
