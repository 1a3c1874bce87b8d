"""Token-norm histograms and the massive-activation policy that readers apply by default.

Trained models put most of a layer's energy on a few tokens: attention sinks at the first position
and mid-sequence "massive activations" with norms of 10-1000x the median. An SAE trained on them
learns those few directions, and a scaling factor computed over them shrinks every ordinary token.
So each (hook, layer) keeps a histogram of token norms over fixed log-spaced bins. Because the bins
are the same for every unit, host and model, histograms merge exactly by adding counts, like the
moments in stats.py, and give the median norm. Readers drop tokens whose norm exceeds
`max_norm_ratio` x median (dictionary_learning filters Qwen3 tokens above 10x the median the same
way); the threshold is rounded up to a bin edge so that the metadata can say exactly how many
tokens, and how much norm, the readers deliver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG10_MIN = -3.0  # norms below 1e-3 share the underflow bin (0 included)
BINS_PER_DECADE = 32  # bin edges 10^(1/32) = 7.5% apart
DECADES = 10  # up to 1e7; larger finite norms share the overflow bin
NUM_BINS = BINS_PER_DECADE * DECADES + 2  # [underflow, 320 log bins, overflow]
DEFAULT_MAX_NORM_RATIO = 10.0


def bin_index(norms: np.ndarray) -> np.ndarray:
    """Bin of each finite norm [n] -> int64 [n] in [0, NUM_BINS); callers drop non-finite norms first."""
    with np.errstate(divide="ignore"):
        pos = np.floor((np.log10(np.asarray(norms, np.float64)) - LOG10_MIN) * BINS_PER_DECADE)
    return (np.clip(np.nan_to_num(pos, neginf=-1.0), -1, NUM_BINS - 2) + 1).astype(np.int64)


def upper_edge(i: int) -> float:
    """The largest norm bin i holds (inf for the overflow bin)."""
    if i >= NUM_BINS - 1:
        return math.inf
    return 10.0 ** (LOG10_MIN + i / BINS_PER_DECADE)


def lower_edge(i: int) -> float:
    return 0.0 if i == 0 else 10.0 ** (LOG10_MIN + (i - 1) / BINS_PER_DECADE)


@dataclass(frozen=True)
class NormHistogram:
    """Counts, sum of norms and sum of squared norms per bin, plus the count of non-finite tokens."""

    counts: np.ndarray  # int64 [NUM_BINS]
    sums: np.ndarray  # float64 [NUM_BINS], sum of ||x|| of the bin's tokens
    sumsq: np.ndarray  # float64 [NUM_BINS], sum of ||x||^2 (the energy) of the bin's tokens
    nonfinite: int = 0  # tokens with a nan or inf component: in no bin

    @staticmethod
    def empty() -> "NormHistogram":
        return NormHistogram(np.zeros(NUM_BINS, np.int64), np.zeros(NUM_BINS), np.zeros(NUM_BINS), 0)

    @staticmethod
    def of(norms: np.ndarray) -> "NormHistogram":
        """Histogram of token norms [n] (float; nan or inf marks a non-finite token)."""
        norms = np.asarray(norms, np.float64).reshape(-1)
        finite = np.isfinite(norms)
        n, idx = norms[finite], bin_index(norms[finite])
        return NormHistogram(np.bincount(idx, minlength=NUM_BINS).astype(np.int64),
                             np.bincount(idx, weights=n, minlength=NUM_BINS),
                             np.bincount(idx, weights=n * n, minlength=NUM_BINS),
                             int((~finite).sum()))

    def merge(self, other: "NormHistogram") -> "NormHistogram":
        return NormHistogram(self.counts + other.counts, self.sums + other.sums, self.sumsq + other.sumsq,
                             self.nonfinite + other.nonfinite)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def median(self) -> float:
        """Median norm, interpolated geometrically inside its bin (exact to the bin's 7.5% width)."""
        total = self.count
        if total == 0:
            return 0.0
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, total / 2.0))
        lo, hi = lower_edge(i), upper_edge(i)
        if i == 0 or not math.isfinite(hi):  # no geometric interpolation at the open ends
            return float(self.sums[i] / self.counts[i])
        before = cum[i - 1] if i else 0
        frac = (total / 2.0 - before) / self.counts[i]
        return float(lo * (hi / lo) ** frac)

    def to_json(self) -> dict:
        return {"log10_min": LOG10_MIN, "bins_per_decade": BINS_PER_DECADE, "counts": self.counts.tolist(),
                "sums": self.sums.tolist(), "sumsq": self.sumsq.tolist(), "nonfinite": self.nonfinite}

    @staticmethod
    def from_json(d: dict) -> "NormHistogram":
        if d.get("log10_min") != LOG10_MIN or d.get("bins_per_decade") != BINS_PER_DECADE or \
                len(d.get("counts", ())) != NUM_BINS:
            raise ValueError("norm histogram with other bins than this version's "
                             f"(log10_min {LOG10_MIN}, {BINS_PER_DECADE} bins per decade, {NUM_BINS} bins)")
        return NormHistogram(np.asarray(d["counts"], np.int64), np.asarray(d["sums"], np.float64),
                             np.asarray(d["sumsq"], np.float64), int(d.get("nonfinite", 0)))


@dataclass(frozen=True)
class NormPolicy:
    """What a reader with a given max_norm_ratio delivers of one (hook, layer), from its histogram."""

    max_norm_ratio: float | None
    threshold: float  # tokens with norm > threshold are dropped (inf: none)
    count: int  # tokens delivered
    dropped: int  # finite tokens dropped
    mean_norm: float  # mean norm of the delivered tokens
    energy_share_dropped: float  # share of sum ||x||^2 held by the dropped tokens
    top1_energy_share: float  # share of the delivered energy held by the 1% of delivered tokens with the largest norms

    def scaling_factor(self, width: int) -> float | None:
        """SAE input scale over the delivered tokens: their mean norm becomes sqrt(width)."""
        return math.sqrt(width) / self.mean_norm if self.mean_norm > 0 else None


def check_ratio(max_norm_ratio: float | None) -> None:
    """A ratio of 1 or less would drop about half the tokens or more: a mistake, not a policy."""
    if max_norm_ratio is not None and not (isinstance(max_norm_ratio, (int, float))
                                           and math.isfinite(max_norm_ratio) and max_norm_ratio > 1):
        raise ValueError(f"max_norm_ratio must be a number above 1 (tokens above ratio x median norm are "
                         f"dropped) or None to keep every token; got {max_norm_ratio!r}")


def top_energy_share(hist: NormHistogram, keep: int, fraction: float = 0.01) -> float:
    """Share of the energy of the tokens in bins [0, keep) held by the `fraction` of them with the
    largest norms: how much a few tokens dominate what an SAE trains on (attention sinks and massive
    activations make it 30-99%; tokens of similar norm, about `fraction`). Whole bins are taken from the
    top down; the bin where the count runs out contributes its mean energy per token, so the figure
    is exact to that one bin's 7.5% norm width."""
    counts, sumsq = hist.counts[:keep], hist.sumsq[:keep]
    total, energy = float(counts.sum()), float(sumsq.sum())
    if total == 0 or energy <= 0:
        return 0.0
    want, got, top = fraction * total, 0.0, 0.0
    for i in np.nonzero(counts)[0][::-1]:
        take = min(float(counts[i]), want - got)
        top += float(sumsq[i]) * take / float(counts[i])
        got += take
        if got >= want:
            break
    return top / energy


def policy(hist: NormHistogram, max_norm_ratio: float | None) -> NormPolicy:
    """Threshold = max_norm_ratio x median, rounded up to the edge of its bin; None keeps every token."""
    check_ratio(max_norm_ratio)
    total_energy = float(hist.sumsq.sum())
    if max_norm_ratio is None or hist.count == 0:
        keep = NUM_BINS
        threshold = math.inf
    else:
        keep = int(bin_index(np.array([max_norm_ratio * hist.median()]))[0]) + 1
        threshold = upper_edge(keep - 1)
    count = int(hist.counts[:keep].sum())
    norm_sum = float(hist.sums[:keep].sum())
    dropped_energy = float(hist.sumsq[keep:].sum())
    return NormPolicy(max_norm_ratio, threshold, count, hist.count - count,
                      norm_sum / count if count else 0.0,
                      dropped_energy / total_energy if total_energy > 0 else 0.0,
                      top_energy_share(hist, keep))
