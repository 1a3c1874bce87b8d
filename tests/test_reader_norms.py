"""The readers' massive-activation filter (issue 21 item 3): metadata's norm histogram -> a threshold;
the tokens above it are dropped, counted, and normalize scales what is delivered to sqrt(width)."""

import json
import logging
import math

import numpy as np
import pytest
from synthetic import make_dataset

from llm_activations import reader
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import norms, records
from llm_activations.format.dtypes import numpy_dtype

HOOKS = ("mlp_in", "mlp_out", "resid_post")
LAYER = 1
WIDTH = 16
# (doc_index, token_index) of the tokens made massive (x 60) in each hook; mlp_in and mlp_out differ
MASSIVE = {"resid_post": {(0, 0), (7, 3), (21, 5)}, "mlp_in": {(3, 1), (9, 0)}, "mlp_out": {(9, 0), (15, 2)}}


def _rewrite(root: str, meta: dict, hook: str, scale_tokens: set, *, histogram: bool) -> None:
    """Scale the listed tokens of one hook by 60 in its shards; update shard sizes and, if asked, write
    stats[key]["norms"] from the stored values (what extraction will write)."""
    dt, h = numpy_dtype(meta["dtype"]), md.hook_width(meta, hook)
    all_norms = []
    entries = {s["path"]: s for s in meta["shards"]}
    for rel in md.layer_files(meta, LAYER, hook):
        path = md.shard_path(root, rel)
        examples = [records.decode_example(bytes(d)) for d in records.read_shard(path)]
        writer = records.ShardWriter(path, meta["compression"])
        for ex in examples:
            acts = records.decode_activations(ex, dt, h).astype(np.float32)
            for i, key in enumerate(zip(ex["doc_index"], ex["token_index"])):
                if (int(key[0]), int(key[1])) in scale_tokens:
                    acts[i] *= 60
            stored = acts.astype(dt)
            all_norms.append(np.linalg.norm(stored.astype(np.float32), axis=1))
            writer.write(records.encode_example(stored, **{k: ex[k] for k in records.INT_FEATURES}), len(stored))
        entries[rel].update(writer.close())
    entry = meta["stats"][hk.key(hook, LAYER)]
    if histogram:
        entry["norms"] = norms.NormHistogram.of(np.concatenate(all_norms)).to_json()
    else:  # a dataset written before the histogram existed
        for field in ("norms", "median_norm", "delivered"):
            entry.pop(field, None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("massive"))
    meta = make_dataset(root, layers=(LAYER,), hidden_size=WIDTH, num_docs=40, seq_len=32, num_shards=3, hooks=HOOKS, seed=3)
    for hook in HOOKS:
        _rewrite(root, meta, hook, MASSIVE[hook], histogram=True)
    md.write_metadata(root, meta)
    return root, meta


def _all(root, hook=hk.DEFAULT, **kw):
    it = reader.iter_numpy_batches(root, LAYER, 32, hook=hook, with_metadata=True, drop_remainder=False, **kw)
    batches = list(it)
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return out, it.stats


def _tokens(d) -> set:
    return set(zip(d["doc_index"].tolist(), d["token_index"].tolist()))


@pytest.mark.parametrize("shuffle_buffer", [0, 200])
def test_drops_exactly_the_massive_tokens_and_counts_them(dataset, shuffle_buffer):
    root, meta = dataset
    everything, stats_all = _all(root, max_norm_ratio=None, shuffle_buffer=shuffle_buffer, seed=1)
    got, stats = _all(root, shuffle_buffer=shuffle_buffer, seed=1)
    assert len(everything["token_ids"]) == meta["counts"]["tokens"] and stats_all.dropped_tokens == 0
    assert _tokens(everything) - _tokens(got) == MASSIVE["resid_post"]
    assert len(got["token_ids"]) == meta["counts"]["tokens"] - 3
    assert (stats.stored_tokens, stats.dropped_tokens, stats.delivered_tokens) == (meta["counts"]["tokens"], 3, len(got["token_ids"]))
    assert stats.filtered and not stats_all.filtered
    # the threshold is the policy's, and the reader agrees with the histogram's count exactly
    policy = norms.policy(norms.NormHistogram.from_json(meta["stats"]["1"]["norms"]), norms.DEFAULT_MAX_NORM_RATIO)
    assert stats.thresholds == {"resid_post": policy.threshold} and policy.dropped == 3
    kept_norms = np.linalg.norm(got["activations"], axis=1)
    assert kept_norms.max() <= policy.threshold
    assert np.linalg.norm(everything["activations"], axis=1).max() > 30 * policy.threshold / norms.DEFAULT_MAX_NORM_RATIO


def test_normalize_scales_delivered_tokens_to_sqrt_width(dataset):
    root, meta = dataset
    got, _ = _all(root, normalize=True, shuffle_buffer=200, seed=2)
    assert np.linalg.norm(got["activations"], axis=1).mean() == pytest.approx(math.sqrt(WIDTH), rel=1e-5)
    raw, _ = _all(root, shuffle_buffer=200, seed=2)
    policy = norms.policy(norms.NormHistogram.from_json(meta["stats"]["1"]["norms"]), 10.0)
    np.testing.assert_allclose(got["activations"], raw["activations"] * np.float32(policy.scaling_factor(WIDTH)), rtol=1e-6)
    # the all-token factor would leave ordinary tokens far below sqrt(width): 3 tokens of 926 hold 96% of the energy
    every = norms.policy(norms.NormHistogram.from_json(meta["stats"]["1"]["norms"]), None)
    assert every.scaling_factor(WIDTH) < 0.8 * policy.scaling_factor(WIDTH)


def test_pairs_drop_the_same_rows(dataset):
    root, meta = dataset
    kw = dict(shuffle_buffer=200, seed=4, drop_remainder=False)
    it = reader.iter_numpy_pairs(root, LAYER, 32, with_metadata=True, **kw)
    batches = list(it)
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert len(got["token_ids"]) == meta["counts"]["tokens"] - 3  # (3,1), (9,0), (15,2): either side drops
    everything, _ = _all(root, "mlp_in", max_norm_ratio=None)
    assert _tokens(everything) - _tokens(got) == MASSIVE["mlp_in"] | MASSIVE["mlp_out"]
    assert it.stats.dropped_tokens == 3
    # row for row, each side is that hook's stored token (looked up by identity)
    for hook, key in (("mlp_in", "activations"), ("mlp_out", "target")):
        ref, _ = _all(root, hook, max_norm_ratio=None, shuffle_buffer=0)
        index = {t: i for i, t in enumerate(zip(ref["doc_index"].tolist(), ref["token_index"].tolist()))}
        rows = [index[t] for t in zip(got["doc_index"].tolist(), got["token_index"].tolist())]
        np.testing.assert_array_equal(got[key], ref["activations"][rows])
    # plain pairs: tuples of the same arrays, in the same order
    plain = list(reader.iter_numpy_pairs(root, LAYER, 32, **kw))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in plain]), got["activations"])
    np.testing.assert_array_equal(np.concatenate([y for _, y in plain]), got["target"])


@pytest.mark.parametrize("ratio", [1, 0.5, -3, float("nan"), "10"])
def test_ratio_of_one_or_less_is_a_one_line_error(dataset, ratio):
    root, _ = dataset
    with pytest.raises(UsageError, match="max_norm_ratio must be a number above 1") as e:
        reader.iter_numpy_batches(root, LAYER, 32, max_norm_ratio=ratio)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="max_norm_ratio"):
        reader.activation_dataset(root, LAYER, 32, max_norm_ratio=ratio)


def test_old_metadata_without_norms_keeps_every_token_and_says_so_once(tmp_path, caplog):
    meta = make_dataset(str(tmp_path), layers=(LAYER,), hidden_size=WIDTH, num_docs=40, seq_len=32, seed=3)
    _rewrite(str(tmp_path), meta, "resid_post", MASSIVE["resid_post"], histogram=False)
    md.write_metadata(str(tmp_path), meta)
    with caplog.at_level(logging.WARNING, logger="llm_activations.reader"):
        got, stats = _all(str(tmp_path), shuffle_buffer=100, seed=0)
        _all(str(tmp_path), shuffle_buffer=100, seed=1)
    assert len(got["token_ids"]) == meta["counts"]["tokens"] and stats.dropped_tokens == 0 and not stats.filtered
    said = [r for r in caplog.records if "no norm histogram" in r.getMessage()]
    assert len(said) == 1
    # normalize falls back to the all-token scaling factor
    norm, _ = _all(str(tmp_path), shuffle_buffer=100, seed=0, normalize=True)
    np.testing.assert_allclose(norm["activations"], got["activations"] * np.float32(meta["stats"]["1"]["scaling_factor"]), rtol=1e-6)


def test_tf_and_jax_front_ends_inherit_the_filter(dataset):
    root, _ = dataset
    kw = dict(shuffle_buffer=200, seed=6, drop_remainder=False, normalize=True)
    ref = list(reader.iter_numpy_batches(root, LAYER, 32, **kw))
    stats = reader.ReaderStats()
    tf_batches = list(reader.activation_dataset(root, LAYER, 32, stats=stats, **kw).as_numpy_iterator())
    assert len(tf_batches) == len(ref)
    for a, b in zip(tf_batches, ref):
        np.testing.assert_array_equal(a, b)
    assert stats.dropped_tokens == 3
    from llm_activations import jax_reader

    for a, b in zip(jax_reader.device_batches(root, LAYER, 32, **kw), ref):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_metadata_json_written_by_the_fixture_is_the_contract(dataset):
    root, _ = dataset
    entry = json.loads((__import__("pathlib").Path(root) / "metadata.json").read_text())["stats"]["mlp_in/1"]
    assert norms.NormHistogram.from_json(entry["norms"]).count == entry["count"]


def test_keep_mask_over_several_blocks_matches_float32_norms():
    import ml_dtypes

    from llm_activations.reader import engine

    rng = np.random.default_rng(0)
    x = rng.standard_normal((engine.NORM_BLOCK * 2 + 37, 24)).astype(ml_dtypes.bfloat16)
    x[[5, 300, 540]] *= 100
    x[7, 3] = np.nan
    norm = np.sqrt(np.einsum("nh,nh->n", x.astype(np.float32), x.astype(np.float32)))
    scratch = []
    keep = engine.keep_mask(x, 20.0, scratch)
    np.testing.assert_array_equal(keep, norm <= 20.0)
    assert set(np.flatnonzero(~keep)) == {5, 7, 300, 540}
    assert engine.keep_mask(x, math.inf, scratch) is None


def test_keep_mask_screen_decides_as_einsum_at_the_threshold():
    """keep_mask screens with a fast sum of squares and lets einsum decide within screen_band of the
    threshold: thresholds equal to tokens' own norms, and one float32 step either side, must give
    einsum's decisions exactly (the ties take the exact path)."""
    import ml_dtypes

    from llm_activations.reader import engine

    rng = np.random.default_rng(1)
    for width in (24, 3584):
        x = (rng.standard_normal((300, width)) * rng.lognormal(0, 1.5, (300, 1))).astype(ml_dtypes.bfloat16)
        x[3, 1], x[4, 2], x[5] = np.nan, np.inf, 0
        wide = x.astype(np.float32)
        norm = np.sqrt(np.einsum("nh,nh->n", wide, wide))
        finite = norm[np.isfinite(norm)][:40]
        for t in [*finite, *np.nextafter(finite, np.inf), *np.nextafter(finite, -np.inf)]:
            np.testing.assert_array_equal(engine.keep_mask(x, float(t), []), norm <= t)
    assert 0 < engine.screen_band(3584) < 1e-3
