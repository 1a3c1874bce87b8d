"""Norm histograms merge exactly and give the median; the policy drops what it says it drops."""

import math

import numpy as np
import pytest

from llm_activations.format import norms


def _norms(seed=0, n=20000):
    rng = np.random.default_rng(seed)
    body = rng.lognormal(mean=3.0, sigma=0.3, size=n)  # ordinary tokens around e^3 = 20
    sinks = rng.uniform(2000, 5000, size=n // 100)  # 1% massive activations, 100-250x the median
    return np.concatenate([body, sinks])


def test_merge_is_exact_and_order_free():
    x = _norms()
    whole = norms.NormHistogram.of(x)
    parts = [norms.NormHistogram.of(p) for p in np.array_split(x, 7)]
    merged = parts[3]
    for p in parts[:3] + parts[4:]:
        merged = merged.merge(p)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12)
    np.testing.assert_allclose(merged.sumsq, whole.sumsq, rtol=1e-12)
    assert merged.count == len(x)


def test_median_within_a_bin_of_numpy():
    x = _norms(1)
    med = norms.NormHistogram.of(x).median()
    assert abs(med / np.median(x) - 1) < 10 ** (1 / norms.BINS_PER_DECADE) - 1


def test_bins_hold_what_their_edges_say():
    x = np.array([0.0, 1e-5, 1e-3, 0.5, 1.0, 10.0, 123.4, 1e7, 1e9])
    idx = norms.bin_index(x)
    assert idx[0] == 0 and idx[1] == 0 and idx[-1] == norms.NUM_BINS - 1
    for v, i in zip(x, idx):
        assert norms.lower_edge(i) <= v <= norms.upper_edge(i) * (1 + 1e-12)


def test_policy_counts_and_mean_match_a_direct_filter():
    x = _norms(2)
    hist = norms.NormHistogram.of(x)
    pol = norms.policy(hist, 10.0)
    median = np.median(x)
    assert 10 * median <= pol.threshold <= 10 * median * 1.08  # rounded up to one bin edge
    kept = x[x <= pol.threshold]
    assert pol.count == len(kept) and pol.dropped == len(x) - len(kept) > 0
    assert pol.dropped == int((x > pol.threshold).sum())
    assert pol.mean_norm == pytest.approx(kept.mean(), rel=1e-12)
    assert pol.energy_share_dropped == pytest.approx((x[x > pol.threshold] ** 2).sum() / (x ** 2).sum(), rel=1e-9)
    assert pol.scaling_factor(576) == pytest.approx(math.sqrt(576) / kept.mean(), rel=1e-12)


def test_policy_none_keeps_everything():
    x = _norms(3)
    pol = norms.policy(norms.NormHistogram.of(x), None)
    assert pol.count == len(x) and pol.dropped == 0 and pol.threshold == math.inf
    assert pol.mean_norm == pytest.approx(x.mean(), rel=1e-12)


def test_nonfinite_tokens_are_counted_not_binned():
    hist = norms.NormHistogram.of(np.array([1.0, np.inf, np.nan, 2.0]))
    assert hist.count == 2 and hist.nonfinite == 2


@pytest.mark.parametrize("bad", [1, 0.5, 0, -3, float("nan"), float("inf"), "10"])
def test_ratio_of_one_or_less_is_refused(bad):
    with pytest.raises(ValueError, match="max_norm_ratio"):
        norms.check_ratio(bad)


def test_json_round_trip_and_foreign_bins_refused():
    hist = norms.NormHistogram.of(_norms(4))
    back = norms.NormHistogram.from_json(hist.to_json())
    np.testing.assert_array_equal(back.counts, hist.counts)
    np.testing.assert_array_equal(back.sumsq, hist.sumsq)
    other = dict(hist.to_json(), bins_per_decade=16)
    with pytest.raises(ValueError, match="bins"):
        norms.NormHistogram.from_json(other)
