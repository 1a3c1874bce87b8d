"""Parity with transformers: every requested layer of each segment equals the reference model
run on that segment alone (docs/FORMAT.md: every segment is an independent context).

Every attention implementation passes the same tests: "xla" everywhere, "splash" (the TPU kernel)
in Pallas interpret mode off a TPU, and the GPU kernels where a GPU is the default device.
"""

import numpy as np
import pytest

from llm_activations.model.extractor import Extractor
from tiny_models import (BFLOAT16_ATTENTION, FLOAT32_ATTENTION, cached_checkpoint, packed_batch, reference_layers,
                         rel_error)

SEQ_LEN = 64
LAYERS = [0, 1, 2, 3]
# Row 0: three packed segments filling the row; row 1: one full-length segment (positions up to
# 63); row 2: two segments then padding; row 3: all padding.
ROWS = [[20, 30, 14], [64], [7, 25], []]

# float32 is the same math as transformers' eager float32 path, up to summation order.
F32_BOUND = 1e-4
# bfloat16 keeps 8 significand bits (relative rounding 2^-9 ~ 0.2% per op). Each block rounds
# ~10 times (norms, projections, attention, MLP, residual adds) and errors compound across the
# 4 blocks, so a few percent of the stream's scale is expected against the float32 reference;
# 5% still catches any real bug (a wrong mask, position or weight gives O(1) errors).
BF16_BOUND = 5e-2


def _run(variant, compute_dtype, attention="xla"):
    folder, torch_model = cached_checkpoint(variant)
    ex = Extractor(folder, layers=LAYERS, batch_size=len(ROWS), seq_len=SEQ_LEN, compute_dtype=compute_dtype,
                   storage_dtype="float32", mesh_shape=(1, 1), attention=attention)
    assert ex.backend.attention == attention
    tokens, segs, pos, spans = packed_batch(ROWS, SEQ_LEN)
    out = ex(tokens, segs, pos)
    errors = []
    for row, start, n in spans:
        ref = reference_layers(torch_model, tokens[row, start:start + n], LAYERS)
        for layer in LAYERS:
            errors.append(rel_error(out.activations[("resid_post", layer)][row, start:start + n], ref[layer]))
    return np.array(errors), out, segs


@pytest.mark.parametrize("attention", FLOAT32_ATTENTION)
@pytest.mark.parametrize("variant", ["qwen2", "qwen2_tied", "qwen3", "llama"])
def test_float32_matches_transformers_per_segment(variant, attention):
    errors, out, segs = _run(variant, "float32", attention)
    assert len(errors) == 6 * len(LAYERS)
    assert errors.max() <= F32_BOUND, errors
    for layer in LAYERS:
        assert np.isfinite(out.activations[("resid_post", layer)]).all()
        assert out.moments[("resid_post", layer)].count == int((segs > 0).sum())


@pytest.mark.parametrize("attention", BFLOAT16_ATTENTION)
@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_bfloat16_within_bound(variant, attention):
    errors, _, _ = _run(variant, "bfloat16", attention)
    print(f"{variant} {attention} bfloat16 max rel error {errors.max():.4f}")
    assert errors.max() <= BF16_BOUND, errors
    # Not trivially equal to float32 either: the comparison would not notice a float32 fallback.
    assert errors.max() > 1e-4


def test_attention_mask_is_block_diagonal_causal():
    import jax.numpy as jnp

    from llm_activations.model.attention import attention_mask

    mask = np.asarray(attention_mask(jnp.array([[1, 1, 2, 2, 2, 0]])))[0]
    want = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # a new segment never sees the previous one
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself (finite softmax; never stored)
    ], bool)
    np.testing.assert_array_equal(mask, want)


def test_forward_runs_only_the_blocks_it_needs():
    import jax
    import jax.numpy as jnp

    from llm_activations.model.attention import backend_for
    from llm_activations.model.config import load_model_config
    from llm_activations.model.hf_weights import init_params
    from llm_activations.model.transformer import forward

    config, _ = load_model_config(cached_checkpoint("qwen2")[0])
    params = init_params(config, 2, seed=0)  # blocks 0 and 1 only
    tokens, segs, pos, _ = packed_batch([[5, 3]], 8)
    run = jax.jit(forward, static_argnums=(1, 5, 6))
    backend = backend_for(jax.devices()[:1], np.float32)
    out = run(params, config, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos), (1,), backend)
    assert list(out) == [("resid_post", 1)] and out[("resid_post", 1)].shape == (1, 8, 64)
    assert np.isfinite(np.asarray(out[("resid_post", 1)])).all()
    with pytest.raises(ValueError, match="layer 2 requested but params hold 2 blocks"):
        run(params, config, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos), (2,), backend)


@pytest.mark.parametrize("attention", FLOAT32_ATTENTION)
def test_float32_parity_across_query_blocks_and_key_windows(attention):
    """seq_len 400 spans several query blocks (and splash's 128-wide tiles, padded to 512), so the
    blocked attention and its per-block key windows (short packed segments need few keys, a
    full-length segment needs all) are exercised."""
    rows, t = [[100, 200, 90], [400], [130, 129, 7], []], 400
    folder, torch_model = cached_checkpoint("qwen2", max_position_embeddings=512)
    ex = Extractor(folder, layers=[0, 3], batch_size=4, seq_len=t, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=(1, 1), attention=attention)
    tokens, segs, pos, spans = packed_batch(rows, t)
    out = ex(tokens, segs, pos)
    for row, start, n in spans:
        ref = reference_layers(torch_model, tokens[row, start:start + n], [0, 3])
        for layer in (0, 3):
            assert rel_error(out.activations[("resid_post", layer)][row, start:start + n], ref[layer]) <= F32_BOUND
