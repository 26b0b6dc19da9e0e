"""Uncertainty and baselines for evaluation scores: 95% intervals and what a constant answer would score.

Two kinds of score come out of the suites: 0/1 outcomes (exact match, attack success, abstention), whose
mean is a proportion and gets a Wilson score interval, and partial-credit scores in [0, 1] (word lists by
position, JSON fields), whose mean gets a percentile bootstrap interval over items. `interval(scores)`
picks between them, so every headline number can carry one.
"""

from __future__ import annotations

import math
import random

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927; Brown, Cai & DasGupta 2001).

    Unlike the Wald interval p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 the exact lower bound is 0 and at k = n the upper is 1: do not leave them to rounding
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def bootstrap_interval(scores: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores`: resample the items with replacement
    `resamples` times (seeded, so a report is reproducible) and take the (1-level)/2 and (1+level)/2
    quantiles of the resampled means."""
    n = len(scores)
    if n == 0:
        raise ValueError("bootstrap_interval needs at least one score")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(resamples))
    lo_i = int(math.floor((1 - level) / 2 * (resamples - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (resamples - 1)))
    return means[lo_i], means[hi_i]


def interval(scores: list[float]) -> tuple[float, float] | None:
    """95% interval of the mean score: Wilson when every score is 0 or 1, else a bootstrap over items.
    None for no scores."""
    if not scores:
        return None
    if all(s in (0.0, 1.0) for s in scores):
        return wilson_interval(int(sum(scores)), len(scores))
    return bootstrap_interval(scores)


def exact(scores: list[float]) -> list[float]:
    """Partial-credit scores as 0/1 exact-match outcomes (a checker gives 1.0 only for a fully right output)."""
    return [float(s == 1.0) for s in scores]


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def constant_baseline(items) -> dict:
    """What a model that always gives one answer per family would score on `items` (task Items).

    For each family the constant is the canonical answer that scores best on that family's items (the
    majority class for a label family such as parity; a lucky list for a word family), so this is an
    upper bound on any constant answer taken from the items. Returns {"answers": {family: constant},
    "scores": per-item scores of the constants (aligned with items)}; `mean(scores)` is the baseline score
    and `mean(exact(scores))` its exact match.
    """
    from tunelab.eval.tasks import score

    by_family: dict[str, list] = {}
    for it in items:
        by_family.setdefault(it.family, []).append(it)
    answers = {}
    for fam, its in by_family.items():
        candidates = sorted({it.answer for it in its})  # sorted: ties go to the same answer on every run
        answers[fam] = max(candidates, key=lambda a: sum(score(a, it) for it in its))
    return {"answers": answers, "scores": [score(answers[it.family], it) for it in items]}
