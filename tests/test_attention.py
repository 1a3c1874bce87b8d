"""Attention implementations against a dense NumPy reference, and the choice of kernel per platform."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_activations.errors import UsageError
from llm_activations.model import attention as attn

PLATFORM = jax.devices()[0].platform
ON_GPU = PLATFORM in ("gpu", "cuda")


def _devices(platform, n=1):
    return [SimpleNamespace(platform=platform)] * n


@pytest.mark.parametrize("platform, dtype, want, block", [
    ("cpu", np.float32, "xla", 128),
    ("cpu", jnp.bfloat16, "xla", 128),
    ("cuda", jnp.bfloat16, "cudnn", 512),
    ("cuda", np.float32, "xla", 512),  # cuDNN's flash kernel takes only 16-bit inputs
    ("rocm", jnp.float16, "cudnn", 512),
    ("tpu", jnp.bfloat16, "splash", 512),
])
def test_auto_picks_the_platforms_kernel(platform, dtype, want, block):
    b = attn.backend_for(_devices(platform, 4), dtype)
    assert (b.attention, b.query_block, b.interpret) == (want, block, False)
    assert b.float32_dots == (platform == "cpu")


def test_named_kernels_and_their_errors():
    assert attn.backend_for(_devices("cpu"), np.float32, "splash").interpret  # Pallas interpret mode off a TPU
    assert not attn.backend_for(_devices("tpu"), np.float32, "splash").interpret
    assert attn.backend_for(_devices("cuda"), np.float32, "xla", query_block=2048).query_block == 2048
    with pytest.raises(UsageError, match=r"'cudnn' needs a GPU; the mesh's devices are cpu"):
        attn.backend_for(_devices("cpu"), jnp.bfloat16, "cudnn")
    with pytest.raises(UsageError, match=r"'cudnn' needs a 16-bit compute dtype"):
        attn.backend_for(_devices("cuda"), np.float32, "cudnn")
    with pytest.raises(UsageError, match=r"'flash' is not one of auto, xla, splash, cudnn, tokamax"):
        attn.backend_for(_devices("cpu"), np.float32, "flash")
    with pytest.raises(UsageError, match=r"mixes device platforms \['cpu', 'tpu'\]"):
        attn.backend_for(_devices("cpu") + _devices("tpu"), np.float32)


def _segments(rng, b, t):
    """[B, T] packed rows: random segment lengths, then padding (0) at the end of some rows."""
    rows = []
    for _ in range(b):
        ids, seg = [], 1
        while len(ids) < t:
            n = int(rng.integers(1, t // 2))
            ids += [seg] * n
            seg += 1
        row = np.array(ids[:t])
        row[t - int(rng.integers(0, t // 4)):] = 0
        rows.append(row)
    return np.stack(rows).astype(np.int32)


def _reference(q, k, v, segs):
    """Dense float64 attention with the block-diagonal causal mask: [B, T, N, H]."""
    n, kv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    mask = np.asarray(attn.attention_mask(jnp.asarray(segs)))[:, None]
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("name", ["xla", "splash"] + (["cudnn", "tokamax"] if ON_GPU else []))
@pytest.mark.parametrize("t", [64, 200])
def test_kernel_equals_dense_reference(name, t):
    rng = np.random.default_rng(t)
    b, n, kv, h = 3, 4, 2, 32
    q, k, v = (rng.standard_normal((b, t, heads, h)) for heads in (n, kv, kv))
    segs = _segments(rng, b, t)
    dtype = jnp.bfloat16 if name == "cudnn" else jnp.float32
    backend = attn.backend_for(jax.devices()[:1], dtype, name, query_block=64)
    aux = attn.prepare(backend, jnp.asarray(segs))
    got = jax.jit(lambda q, k, v, s, a: attn.attend(backend, q, k, v, s, a))(
        *(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(segs), aux)
    want = _reference(q, k, v, segs)
    real = segs > 0  # padding queries may differ by implementation; they are never stored
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], want[real], rtol=tol, atol=tol)


def test_cudnn_dense_fallback_arguments_through_jax_nn_xla_implementation():
    """The cuDNN kernel cannot run here; the same jax.nn.dot_product_attention call (mask, causal
    flag, layout, GQA) with implementation="xla" can, and must equal the reference."""
    rng = np.random.default_rng(5)
    b, t, n, kv, h = 2, 96, 4, 2, 32
    q, k, v = (rng.standard_normal((b, t, heads, h)) for heads in (n, kv, kv))
    segs = _segments(rng, b, t)
    got = attn._cudnn_dense(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(segs), implementation="xla")
    real = segs > 0
    np.testing.assert_allclose(np.asarray(got)[real], _reference(q, k, v, segs)[real], rtol=1e-5, atol=1e-5)


def test_segment_starts_are_each_querys_first_key():
    segs = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]], np.int32)
    np.testing.assert_array_equal(attn.segment_starts(jnp.asarray(segs)),
                                  [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8])


def _packed_mask(packed, t):
    """[B, T, S] bool: what cuDNN's packed (THD) PADDING_CAUSAL call attends to - within each listed
    run, causal from its first token - from the arguments alone; plus each token's run count."""
    seqlens, offsets = np.asarray(packed.seqlens), np.asarray(packed.offsets)
    b = seqlens.shape[0]
    mask, covered = np.zeros((b, t, t), bool), np.zeros((b, t), int)
    for i in range(b):
        for length, start in zip(seqlens[i], offsets[i]):
            if length < 0:
                assert start < 0  # lengths and offsets end together
                continue
            end = start + length
            mask[i, start:end, start:end] = np.tril(np.ones((length, length), bool))
            covered[i, start:end] += 1
        assert offsets[i, -1] == -1  # cuDNN's extra offset slot stays empty
    return mask, covered


@pytest.mark.parametrize("seed", range(4))
def test_packed_segments_give_exactly_the_dense_mask(seed):
    rng = np.random.default_rng(seed)
    segs = _segments(rng, 4, 97)
    packed = attn.packed_segments(jnp.asarray(segs), max_segments=97)
    mask, covered = _packed_mask(packed, 97)
    assert (covered == 1).all()  # every token, padding too, is in exactly one sequence: outputs stay finite
    real = segs > 0
    dense = np.asarray(attn.attention_mask(jnp.asarray(segs)))
    np.testing.assert_array_equal(mask[real], dense[real])  # real queries: exactly the XLA path's mask
    assert not np.asarray(packed.overflow).any()


def test_packed_segments_flag_rows_past_the_bound():
    # 3, 6, 1 and 4 runs (padding is a run too)
    segs = np.array([[1, 1, 2, 3, 3, 3], [1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1], [1, 1, 2, 3, 3, 0]], np.int32)
    packed = attn.packed_segments(jnp.asarray(segs), max_segments=3)
    np.testing.assert_array_equal(packed.overflow, [False, True, False, True])
    np.testing.assert_array_equal(packed.seqlens, [[2, 1, 3], [1, 1, 1], [6, -1, -1], [2, 1, 2]])
    np.testing.assert_array_equal(packed.offsets, [[0, 2, 3, -1], [0, 1, 2, -1], [0, -1, -1, -1], [0, 2, 3, -1]])
    mask, _ = _packed_mask(attn.packed_segments(jnp.asarray(segs[3:]), 4), 6)
    np.testing.assert_array_equal(mask[0, 5], [False] * 5 + [True])  # padding: its own run


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_packed_offsets_in_cudnn_layout_cover_each_run(kv):
    """jax's own conversion of our arguments to cuDNN's global layout (the last step before the
    kernel, run here on CPU): each sequence starts at row * T + first token, in units of each
    tensor's token stride, for query and key alike (jax < 0.11 scales key offsets by the query
    heads: packed_kv repeats k and v there)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    segs = np.array([[1, 1, 2, 3, 3, 3, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
    b, t, n, h = 2, 8, 4, 16
    q = jnp.zeros((b, t, n, h), jnp.bfloat16)
    k, _ = attn.packed_kv(q, jnp.zeros((b, t, kv, h), jnp.bfloat16), jnp.zeros((b, t, kv, h), jnp.bfloat16))
    p = attn.packed_segments(jnp.asarray(segs), 4)
    q_len, kv_len, q_off, kv_off = (np.asarray(a) for a in fa._fix_seqlen_offsets(p.seqlens, p.seqlens, p.offsets,
                                                                                  p.offsets, q, k))
    starts, lengths = [0, 2, 3, 6, 8, 11], [2, 1, 3, 2, 3, 5]
    np.testing.assert_array_equal(q_len.ravel()[:6], lengths)
    np.testing.assert_array_equal(kv_len.ravel()[:6], lengths)
    np.testing.assert_array_equal(q_off.ravel()[:6], np.array(starts) * n * h)
    np.testing.assert_array_equal(kv_off.ravel()[:6], np.array(starts) * k.shape[2] * h)


def test_tokamax_k_start_mask_is_exactly_the_dense_mask():
    # tokamax's mask: query t sees keys [k_start[t], t]
    rng = np.random.default_rng(9)
    segs = _segments(rng, 3, 80)
    starts = np.asarray(attn.segment_starts(jnp.asarray(segs)))
    idx = np.arange(80)
    mask = (idx[None, None, :] >= starts[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
    real = segs > 0
    np.testing.assert_array_equal(mask[real], np.asarray(attn.attention_mask(jnp.asarray(segs)))[real])


def test_tokamax_call_through_its_xla_reference():
    """tokamax's GPU kernels cannot run here; its "xla" reference takes the same call (the k_start
    mask, scale, GQA) and must equal the dense reference. Runs where tokamax imports (Python 3.12)."""
    pytest.importorskip("tokamax")
    rng = np.random.default_rng(6)
    b, t, n, kv, h = 2, 96, 4, 2, 32
    q, k, v = (rng.standard_normal((b, t, heads, h)) for heads in (n, kv, kv))
    segs = _segments(rng, b, t)
    backend = attn.Backend("gpu", "tokamax", 512)
    got = attn._tokamax(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), attn.prepare(backend, jnp.asarray(segs)),
                        kernels=("xla",))
    real = segs > 0
    np.testing.assert_allclose(np.asarray(got)[real], _reference(q, k, v, segs)[real], rtol=1e-5, atol=1e-5)


def test_kernels_that_cannot_run_are_refused_naming_the_one_that_will():
    gpu = [SimpleNamespace(platform="cuda", compute_capability="7.5")]
    with pytest.raises(UsageError, match=r"'cudnn' needs compute capability >= 8.0 .*; use 'xla'"):
        attn.backend_for(gpu, jnp.bfloat16, "cudnn")
    try:
        import tokamax  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match=r"'tokamax' needs the tokamax package .*; use 'cudnn'"):
            attn.backend_for(_devices("cuda"), jnp.bfloat16, "tokamax")
    assert "up to 32 per row" in attn.backend_for(_devices("cuda"), jnp.bfloat16).describe()
