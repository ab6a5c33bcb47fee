"""The statistics behind every reported number: pass@k, majority voting, and 95% intervals.

- `pass_at_k`: the unbiased estimator of Chen et al. (2021) from n samples with c correct.
- `majority_correct`: maj@k for one problem; a tie between the most frequent answers counts as the
  expected result of breaking it at random (the share of tied answers that are correct).
- `wilson`: the Wilson score interval for a proportion (pass@1 over n distinct problems). With several
  samples per problem the problem stays the unit (n = problems), which makes the interval conservative:
  a problem's mean over k samples varies less than one Bernoulli draw.
- `paired_bootstrap`: the interval of a difference between two checkpoints evaluated on the same problems,
  resampling problems (pairs stay together), seeded.

A finding is "reproduced" only when its interval excludes zero (`excludes_zero`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(votes: Sequence[tuple[Hashable, bool]]) -> float:
    """maj@k of one problem from its (answer key, correct) pairs (unparseable answers left out): 1 or 0 when
    one answer is the most frequent; with a tie, the share of the tied answers that are correct."""
    if not votes:
        return 0.0
    counts = Counter(key for key, _ in votes)
    top = max(counts.values())
    tied = [key for key, c in counts.items() if c == top]
    correct = {key for key, ok in votes if ok}
    return sum(key in correct for key in tied) / len(tied)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval [low, high] for `successes` out of `n` (successes may be fractional: a mean
    of per-problem rates times n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    if p in (0.0, 1.0):  # the bound at 0 or 1 is exact (centre - half is only 1e-19 away by rounding)
        return (0.0, centre + half) if p == 0.0 else (centre - half, 1.0)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """mean(a) - mean(b) and its percentile bootstrap interval, resampling the problems (a[i] and b[i] are
    the same problem's scores under the two checkpoints)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired bootstrap needs two equal, non-empty lists of per-problem scores "
                         f"(got {len(a)} and {len(b)})")
    import torch
    n = len(a)
    diffs = torch.tensor([float(x) - float(y) for x, y in zip(a, b)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = diffs[torch.randint(n, (resamples, n), generator=g)].mean(1).sort().values
    lo = float(means[int(math.floor((1 - level) / 2 * (resamples - 1)))])
    hi = float(means[int(math.ceil((1 + level) / 2 * (resamples - 1)))])
    return float(diffs.mean()), (lo, hi)


def excludes_zero(interval: Sequence[float]) -> bool:
    return interval[0] > 0 or interval[1] < 0
