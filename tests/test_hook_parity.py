"""Parity per hook point with transformers, through forward hooks on the matching HF modules
(tiny_models.reference_hooks): every hook of every requested layer of each packed segment equals
the reference model run on that segment alone, whichever attention kernel ran (each returns the
per-head output that z is, before our o_proj)."""

import numpy as np
import pytest

from llm_activations.format import hooks as hk
from llm_activations.model.extractor import Extractor
from tiny_models import (BFLOAT16_ATTENTION, FLOAT32_ATTENTION, cached_checkpoint, packed_batch, reference_hooks,
                         rel_error)

SEQ_LEN = 64
LAYERS = [0, 2, 3]
ROWS = [[20, 30, 14], [64], [7, 25], []]
F32_BOUND = 1e-4
# bfloat16 compute against the float32 reference: the same bound as the residual-stream parity
# (test_model_parity.BF16_BOUND, ~10 roundings per block compounding over 4 blocks); the measured
# worst case per hook is printed. A wrong mask, head order or norm gives O(1) errors.
BF16_BOUND = 5e-2


def _errors(variant, compute_dtype, attention="xla", hooks=hk.HOOKS):
    folder, torch_model = cached_checkpoint(variant)
    ex = Extractor(folder, layers=LAYERS, batch_size=len(ROWS), seq_len=SEQ_LEN, compute_dtype=compute_dtype,
                   storage_dtype="float32", mesh_shape=(1, 1), hooks=hooks, attention=attention)
    assert ex.backend.attention == attention
    tokens, segs, pos, spans = packed_batch(ROWS, SEQ_LEN)
    out = ex(tokens, segs, pos)
    worst = {h: 0.0 for h in hooks}
    for row, start, n in spans:
        ref = reference_hooks(torch_model, tokens[row, start:start + n], LAYERS, hooks)
        for (h, layer), want in ref.items():
            got = out.activations[(h, layer)][row, start:start + n]
            assert got.shape == want.shape == (n, ex.width(h)), (h, got.shape, want.shape)
            worst[h] = max(worst[h], rel_error(got, want))
    return worst, out, ex


@pytest.mark.parametrize("attention", FLOAT32_ATTENTION)
@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_every_hook_float32_matches_transformers(variant, attention):
    worst, out, ex = _errors(variant, "float32", attention)
    print(f"{variant} {attention} float32 max rel error per hook: " + ", ".join(f"{h} {e:.1e}" for h, e in worst.items()))
    assert max(worst.values()) <= F32_BOUND, worst
    assert sorted(out.activations) == sorted((h, l) for h in hk.HOOKS for l in LAYERS)
    # Qwen3's heads x head_dim (8 x 32) is not its hidden size (64): z has its own width.
    assert ex.width("z") == (256 if variant == "qwen3" else 64)
    for key, m in out.moments.items():
        assert m.mean.shape == (ex.width(key[0]),)


@pytest.mark.parametrize("attention", BFLOAT16_ATTENTION)
@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_every_hook_bfloat16_within_bound(variant, attention):
    worst, _, _ = _errors(variant, "bfloat16", attention)
    print(f"{variant} {attention} bfloat16 max rel error per hook: " + ", ".join(f"{h} {e:.1e}" for h, e in worst.items()))
    assert max(worst.values()) <= BF16_BOUND, worst
    assert min(worst.values()) > 1e-4  # really computed in bfloat16


def test_hooks_are_consistent_with_each_other():
    """The block's algebra, on our side alone: resid_mid = resid_pre + attn_out, resid_post =
    resid_mid + mlp_out, the next block's resid_pre is this block's resid_post, and attn_out is z
    through o_proj."""
    folder, _ = cached_checkpoint("qwen2")
    ex = Extractor(folder, layers=[1, 2], batch_size=len(ROWS), seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=(1, 1), hooks=hk.HOOKS)
    a = ex(*packed_batch(ROWS, SEQ_LEN)[:3]).activations
    np.testing.assert_allclose(a[("resid_mid", 1)], a[("resid_pre", 1)] + a[("attn_out", 1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[("resid_post", 1)], a[("resid_mid", 1)] + a[("mlp_out", 1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a[("resid_pre", 2)], a[("resid_post", 1)])
    o = np.asarray(ex.params["layers"]["o"][1], np.float32)  # [N, H, D]
    b, t = a[("z", 1)].shape[:2]
    z = a[("z", 1)].reshape(b, t, *o.shape[:2])
    np.testing.assert_allclose(np.einsum("btnh,nhd->btd", z, o), a[("attn_out", 1)], rtol=1e-4, atol=1e-4)


def test_extra_hooks_do_not_change_resid_post():
    folder, _ = cached_checkpoint("qwen2")
    batch = packed_batch(ROWS, SEQ_LEN)[:3]
    kw = dict(layers=[2], batch_size=len(ROWS), seq_len=SEQ_LEN, compute_dtype="float32", storage_dtype="float32",
              mesh_shape=(1, 1))
    alone = Extractor(folder, **kw)(*batch).activations
    every = Extractor(folder, hooks=hk.HOOKS, **kw)(*batch).activations
    assert list(alone) == [("resid_post", 2)]
    np.testing.assert_array_equal(every[("resid_post", 2)], alone[("resid_post", 2)])


def test_hooks_ride_one_layer_scan_that_stops_at_the_deepest_layer():
    """forward is one lax.scan over blocks 0..deepest whatever the hooks: the program does not grow
    with depth (compile time stays flat), and each requested hook is one [R, B, T, width] carry of
    the scan (R requested layers), never a per-block stack."""
    import jax
    import jax.numpy as jnp

    from llm_activations.model.attention import backend_for
    from llm_activations.model.config import load_model_config
    from llm_activations.model.hf_weights import init_params
    from llm_activations.model.transformer import forward

    config, _ = load_model_config(cached_checkpoint("qwen3")[0])
    params = init_params(config, 4, seed=0)
    tokens, segs, pos = (jnp.asarray(a) for a in packed_batch([[5, 3]], 8)[:3])
    backend = backend_for(jax.devices()[:1], np.float32)

    def program(layers, hooks):
        jaxpr = jax.make_jaxpr(lambda p, t, s, q: forward(p, config, t, s, q, layers, backend, hooks=hooks))(
            params, tokens, segs, pos).jaxpr
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1  # the layer scan (attention's own scan over query blocks is inside its body)
        return len(jaxpr.eqns), scans[0]

    for hooks in (hk.DEFAULT_HOOKS, hk.HOOKS):
        size_shallow, shallow = program((0,), hooks)
        size_deep, deep = program((3,), hooks)
        assert shallow.params["length"] == 1 and deep.params["length"] == 4
        assert size_shallow == size_deep
        assert len(deep.params["jaxpr"].jaxpr.eqns) == len(shallow.params["jaxpr"].jaxpr.eqns)
    _, scan = program((1, 2), hk.HOOKS)
    assert scan.params["length"] == 3  # blocks 0..2 only; block 3 never runs
    # carries: the residual stream [B, T, D], then one [R, B, T, width] per hook (a dict: JAX
    # orders its leaves by key); z is Qwen3's 8 heads x 32 wide; the deepest block's resid_post is
    # the residual stream itself, so resid_post keeps block 1 only
    carries = [v.aval.shape for v in scan.outvars[:1 + len(hk.HOOKS)]]
    assert carries[0] == (1, 8, 64)
    assert carries[1:] == [(1 if h == "resid_post" else 2, 1, 8, 256 if h == "z" else 64) for h in sorted(hk.HOOKS)]
