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


def _top1_share(x):
    x = np.sort(x)[::-1]
    k = len(x) / 100
    whole = int(k)
    top = (x[:whole] ** 2).sum() + (k - whole) * x[whole] ** 2
    return top / (x ** 2).sum()


def test_top1_energy_share_is_exact_when_the_top_percent_fills_whole_bins():
    x = np.concatenate([np.full(9900, 1.0), np.full(100, 50.0)])  # 1% at 50x: 2500 / 2599 of the energy
    hist = norms.NormHistogram.of(x)
    assert norms.policy(hist, None).top1_energy_share == pytest.approx(250000 / 259900, rel=1e-12)
    pol = norms.policy(hist, 10.0)  # drops the 50s: 99 tokens of norm 1 hold 1% of what is left
    assert pol.dropped == 100 and pol.top1_energy_share == pytest.approx(0.01, rel=1e-12)


@pytest.mark.parametrize("ratio", [None, 10.0, 3.0])
def test_top1_energy_share_matches_the_tokens_within_one_bin(ratio):
    x = _norms(4)
    pol = norms.policy(norms.NormHistogram.of(x), ratio)
    kept = x[x <= pol.threshold]
    exact = _top1_share(kept)
    # only the bin where the top 1% runs out is estimated (its mean energy per token): at most
    # that bin's width, 7.5% in norm, on the part of the share it holds
    assert pol.top1_energy_share == pytest.approx(exact, rel=0.16)
    assert abs(pol.top1_energy_share - exact) < 0.02


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
