"""Extractor: one compilation, asynchronous dispatch, storage dtype cast on device, moments,
and the persistent compilation cache."""

import os

import ml_dtypes
import numpy as np
import pytest

from llm_activations.errors import UsageError
from llm_activations.model.extractor import Extractor
from llm_activations.format.stats import Moments, merge_all
from tiny_models import cached_checkpoint, packed_batch, reference_layers, rel_error

BATCH, SEQ_LEN = 4, 32


@pytest.fixture(scope="module")
def qwen3():
    return cached_checkpoint("qwen3")


@pytest.fixture(scope="module")
def f32(qwen3):
    return Extractor(qwen3[0], layers=[2, 0], batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32",
                     storage_dtype="float32", mesh_shape=(2, 2))


def _batches(n):
    rng = np.random.default_rng(1)
    for i in range(n):
        rows = [list(rng.integers(1, 11, rng.integers(0, 4))) for _ in range(BATCH)]
        yield packed_batch(rows, SEQ_LEN, seed=i)


def test_attributes(f32):
    assert f32.layers == (0, 2) and f32.hidden_size == 64 and f32.config.model_type == "qwen3"
    assert f32.storage_dtype == np.float32 and f32.mesh.shape == {"data": 2, "model": 2}
    # block 3 is deeper than any requested layer: not loaded
    assert all(w.shape[0] == 3 for w in f32.params["layers"].values())


def test_many_batches_pipelined_dispatch(f32, qwen3):
    torch_model = qwen3[1]
    batches = list(_batches(6))
    pending = f32.dispatch(*batches[0][:3])
    outputs = []
    for nxt in batches[1:] + [None]:  # the DoFn's pattern: dispatch i+1 before result() of i
        following = f32.dispatch(*nxt[:3]) if nxt is not None else None
        outputs.append(pending.result())
        pending = following
    for (tokens, segs, pos, spans), out in zip(batches, outputs):
        np.testing.assert_array_equal(out.activations[("resid_post", 2)], f32(tokens, segs, pos).activations[("resid_post", 2)])
        row, start, n = spans[-1]
        ref = reference_layers(torch_model, tokens[row, start:start + n], [2])[2]
        assert rel_error(out.activations[("resid_post", 2)][row, start:start + n], ref) <= 1e-4
        assert out.moments[("resid_post", 0)].count == int((segs > 0).sum())
    # contents really differed between batches
    assert not np.array_equal(outputs[0].activations[("resid_post", 0)], outputs[1].activations[("resid_post", 0)])


def test_moments_over_real_tokens(f32):
    tokens, segs, pos, _ = packed_batch([[12, 9], [], [32], [5]], SEQ_LEN, seed=3)
    out = f32(tokens, segs, pos)
    real = segs > 0
    for layer in (0, 2):
        want = Moments.of(out.activations[("resid_post", layer)][real])
        got = out.moments[("resid_post", layer)]
        assert got.count == want.count == 58
        assert got.mean.dtype == np.float64
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.m2, want.m2, rtol=1e-4)
        assert got.norm_sum == pytest.approx(want.norm_sum, rel=1e-5)
        # the norm histogram holds exactly the real tokens, binned like norms.NormHistogram.of
        assert got.norms.count == 58 and got.norms.nonfinite == 0
        np.testing.assert_array_equal(got.norms.counts, want.norms.counts)
        np.testing.assert_allclose(got.norms.sumsq, want.norms.sumsq, rtol=1e-5)
    # an all-padding batch contributes nothing and merges cleanly
    empty = f32(tokens, np.zeros_like(segs), pos).moments[("resid_post", 0)]
    assert empty.count == 0 and empty.norms.count == 0
    merged = merge_all([empty, out.moments[("resid_post", 0)]], 64)
    assert merged.count == 58 and merged.norms.count == 58


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_storage_dtype_is_a_cast_of_the_compute_result(qwen3, f32, storage):
    ex = Extractor(qwen3[0], layers=[0, 2], batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype=storage, mesh_shape=(2, 2))
    want = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[storage]
    assert ex.storage_dtype == np.dtype(want)
    batch = packed_batch([[12, 9], [], [32], [5]], SEQ_LEN, seed=4)[:3]
    a, b = ex(*batch), f32(*batch)
    assert a.activations[("resid_post", 2)].dtype == want
    np.testing.assert_array_equal(a.activations[("resid_post", 2)], b.activations[("resid_post", 2)].astype(want))
    # statistics describe the stored (rounded) values, not the compute dtype's (issue 22)
    stored = a.activations[("resid_post", 2)][batch[1] > 0].astype(np.float32)
    want_m = Moments.of(stored)
    np.testing.assert_allclose(a.moments[("resid_post", 2)].mean, want_m.mean, rtol=1e-5, atol=1e-6)
    assert a.moments[("resid_post", 2)].norm_sum == pytest.approx(want_m.norm_sum, rel=1e-6)
    np.testing.assert_array_equal(a.moments[("resid_post", 2)].norms.counts, want_m.norms.counts)


def test_bad_inputs(f32):
    tokens, segs, pos, _ = packed_batch([[3]] * BATCH, SEQ_LEN)
    with pytest.raises(ValueError, match=r"tokens has shape \(4, 31\); expected \[batch_size, seq_len\] = \[4, 32\]"):
        f32(tokens[:, :31], segs, pos)
    with pytest.raises(ValueError, match=r"positions has shape \(3, 32\)"):
        f32(tokens, segs, pos[:3])
    with pytest.raises(ValueError, match="expected int32"):
        f32(tokens, segs.astype(np.float32), pos)
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        f32(tokens + 600, segs, pos)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[4]), r"^--layers 4: out of range; this model has layers 0\.\.3$"),
    (dict(layers=[]), r"^--layers needs at least one layer$"),
    (dict(layers=[1, 1]), r"^--layers 1 1: a layer is listed twice$"),
    (dict(layers=[0], compute_dtype="float16"), r"compute dtype 'float16' is not one of bfloat16, float32"),
    (dict(layers=[0], storage_dtype="int8"), r"storage dtype 'int8'"),
    (dict(layers=[0], mesh_shape=(3, 1)), r"batch size 4 is not divisible by data=3"),
])
def test_usage_errors(qwen3, kwargs, message):
    with pytest.raises(UsageError, match=message):
        Extractor(qwen3[0], batch_size=BATCH, seq_len=SEQ_LEN, **kwargs)


def test_compile_stats_without_a_cache(f32):
    # tests/conftest.py sets LLM_ACTIVATIONS_COMPILATION_CACHE=none
    assert f32.cache_folder is None
    assert f32.compile_stats.seconds > 0 and not f32.compile_stats.cache_hit


def test_second_extractor_loads_its_step_from_the_cache(qwen3, tmp_path):
    cache = tmp_path / "xla_cache"
    batch = packed_batch([[8], [3, 2]], 8)[:3]
    first = Extractor(qwen3[0], layers=[1], batch_size=2, seq_len=8, compute_dtype="float32",
                      storage_dtype="float32", mesh_shape=(1, 1), compilation_cache=str(cache))
    assert first.cache_folder == str(cache) and not first.compile_stats.cache_hit
    assert len(os.listdir(cache)) >= 1  # the step was written (small CPU programs too)
    second = Extractor(qwen3[0], layers=[1], batch_size=2, seq_len=8, compute_dtype="float32",
                       storage_dtype="float32", mesh_shape=(1, 1), compilation_cache=str(cache))
    assert second.compile_stats.cache_hit
    np.testing.assert_array_equal(second(*batch).activations[("resid_post", 1)], first(*batch).activations[("resid_post", 1)])
    # another shape is another program: compiled, not served
    other = Extractor(qwen3[0], layers=[1], batch_size=2, seq_len=16, compute_dtype="float32",
                      storage_dtype="float32", mesh_shape=(1, 1), compilation_cache=str(cache))
    assert not other.compile_stats.cache_hit
    off = Extractor(qwen3[0], layers=[1], batch_size=2, seq_len=8, compute_dtype="float32",
                    storage_dtype="float32", mesh_shape=(1, 1), compilation_cache="none")
    assert off.cache_folder is None and not off.compile_stats.cache_hit
