"""Per-layer activation statistics that merge exactly: across batches, workers and hosts.

A Moments value summarises a set of token vectors x in R^H by its count, per-dimension mean,
per-dimension sum of squared deviations (M2) and the sum of the vectors' L2 norms. Merging uses
Chan et al.'s parallel update, so combining partial results in any order gives the statistics of
one pass over all tokens (up to float64 rounding) - what `merge` of host folders needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    count: int
    mean: np.ndarray  # [H] float64
    m2: np.ndarray  # [H] float64, sum of squared deviations from the mean
    norm_sum: float  # sum over tokens of ||x||_2

    @staticmethod
    def empty(hidden_size: int) -> "Moments":
        z = np.zeros(hidden_size, dtype=np.float64)
        return Moments(0, z, z.copy(), 0.0)

    @staticmethod
    def of(x: np.ndarray) -> "Moments":
        """Moments of token vectors x [n, H] (computed in float64)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return Moments.empty(x.shape[1])
        mean = x.mean(axis=0)
        return Moments(x.shape[0], mean, ((x - mean) ** 2).sum(axis=0), float(np.linalg.norm(x, axis=1).sum()))

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2, self.norm_sum + other.norm_sum)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.count if self.count else 0.0

    def to_json(self) -> dict:
        """metadata.json form: docs/FORMAT.md's mean norm and SAE scaling factor, plus what merge needs."""
        h = self.mean.shape[0]
        return {
            "count": self.count,
            "mean_norm": self.mean_norm,
            "scaling_factor": math.sqrt(h) / self.mean_norm if self.mean_norm > 0 else None,
            "norm_sum": self.norm_sum,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
        }

    @staticmethod
    def from_json(d: dict) -> "Moments":
        mean = np.asarray(d["mean"], dtype=np.float64)
        return Moments(int(d["count"]), mean, np.asarray(d["var"], dtype=np.float64) * int(d["count"]), float(d["norm_sum"]))


def merge_all(parts, hidden_size: int) -> Moments:
    total = Moments.empty(hidden_size)
    for p in parts:
        total = total.merge(p)
    return total
