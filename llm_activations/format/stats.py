"""Per-layer activation statistics that merge exactly: across batches, workers and hosts.

A Moments value summarises a set of token vectors x in R^H by its count, per-dimension mean,
per-dimension sum of squared deviations (M2) and the sum of the vectors' L2 norms. Merging uses
Chan et al.'s parallel update, so combining partial results in any order gives the statistics of
one pass over all tokens (up to float64 rounding) - what `merge` of host folders needs. It also
carries the tokens' norm histogram (norms.py), which merges exactly by adding counts, and from which
its JSON form derives the median norm and what the readers deliver by default (norms.policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llm_activations.format import norms as nm


@dataclass(frozen=True)
class Moments:
    count: int
    mean: np.ndarray  # [H] float64
    m2: np.ndarray  # [H] float64, sum of squared deviations from the mean
    norm_sum: float  # sum over tokens of ||x||_2
    # the tokens' norms; None for statistics written before histograms existed (then unknown, and
    # unknown after any merge with them)
    norms: nm.NormHistogram | None = None

    @staticmethod
    def empty(hidden_size: int) -> "Moments":
        z = np.zeros(hidden_size, dtype=np.float64)
        return Moments(0, z, z.copy(), 0.0, nm.NormHistogram.empty())

    @staticmethod
    def of(x: np.ndarray) -> "Moments":
        """Moments of token vectors x [n, H] (computed in float64)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return Moments.empty(x.shape[1])
        mean = x.mean(axis=0)
        n = np.linalg.norm(x, axis=1)
        return Moments(x.shape[0], mean, ((x - mean) ** 2).sum(axis=0), float(n.sum()), nm.NormHistogram.of(n))

    def merge(self, other: "Moments") -> "Moments":
        norms = None if self.norms is None or other.norms is None else self.norms.merge(other.norms)
        if other.count == 0:
            return Moments(self.count, self.mean, self.m2, self.norm_sum, norms)
        if self.count == 0:
            return Moments(other.count, other.mean, other.m2, other.norm_sum, norms)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2, self.norm_sum + other.norm_sum, norms)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.count if self.count else 0.0

    def to_json(self) -> dict:
        """metadata.json form: docs/FORMAT.md's mean norm and SAE scaling factor, plus what merge needs."""
        h = self.mean.shape[0]
        out = {
            "count": self.count,
            "mean_norm": self.mean_norm,
            "scaling_factor": math.sqrt(h) / self.mean_norm if self.mean_norm > 0 else None,
            "norm_sum": self.norm_sum,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
        }
        if self.norms is not None:
            out.update(median_norm=self.norms.median(), delivered=delivered_json(self.norms, h),
                       norms=self.norms.to_json())
        return out

    @staticmethod
    def from_json(d: dict) -> "Moments":
        mean = np.asarray(d["mean"], dtype=np.float64)
        hist = nm.NormHistogram.from_json(d["norms"]) if "norms" in d else None
        return Moments(int(d["count"]), mean, np.asarray(d["var"], dtype=np.float64) * int(d["count"]),
                       float(d["norm_sum"]), hist)


def delivered_json(hist: nm.NormHistogram, width: int,
                   max_norm_ratio: float = nm.DEFAULT_MAX_NORM_RATIO) -> dict:
    """metadata `stats[key]["delivered"]`: what a reader with the default max_norm_ratio delivers
    (norms.policy), and the scaling factor that gives those tokens a mean norm of sqrt(width)."""
    p = nm.policy(hist, max_norm_ratio)
    return {"max_norm_ratio": p.max_norm_ratio,
            "norm_threshold": p.threshold if math.isfinite(p.threshold) else None,  # JSON has no inf
            "count": p.count, "dropped": p.dropped, "mean_norm": p.mean_norm,
            "scaling_factor": p.scaling_factor(width), "energy_share_dropped": p.energy_share_dropped,
            "top1_energy_share": p.top1_energy_share}


def merge_all(parts, hidden_size: int) -> Moments:
    total = Moments.empty(hidden_size)
    for p in parts:
        total = total.merge(p)
    return total
