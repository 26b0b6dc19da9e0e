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
BASELINE_SEED, BASELINE_ITEMS = 999, 200  # the draw that picks each family's constant answer
BASELINE_NOTE = (f"Constant-answer baseline: every item of a family gets the family's most common canonical "
                 f"answer in {BASELINE_ITEMS} other items of it (seed {BASELINE_SEED}; for user data, in its own "
                 "items): the majority class of a label family such as parity.")


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
    """Percentile bootstrap interval of the mean of `scores` (resampled_interval with the mean)."""
    n = len(scores)
    if n == 0:
        raise ValueError("bootstrap_interval needs at least one score")
    return resampled_interval(scores, lambda pick: sum(pick) / n, resamples, seed, level)


def resampled_interval(units: list, stat, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(units)`: resample the units with replacement `resamples` times
    (seeded, so a report is reproducible) and take the (1-level)/2 and (1+level)/2 quantiles of the statistic."""
    rng = random.Random(seed)
    values = sorted(stat(rng.choices(units, k=len(units))) for _ in range(resamples))
    return (values[math.floor((1 - level) / 2 * (resamples - 1))],
            values[math.ceil((1 + level) / 2 * (resamples - 1))])


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

    For a built-in family the constant is the most common canonical answer of a separate draw of
    BASELINE_ITEMS items of that family (seed BASELINE_SEED), so it is chosen without looking at the
    evaluated items: the majority class of a label family (parity, sentiment), one fixed number or list for
    the others. A family that is not built in (user data) takes the most common answer of its own items.
    Returns {"answers": {family: constant}, "scores": per-item scores of the constants (aligned with
    items)}; `mean(scores)` is the baseline score and `mean(exact(scores))` its exact match.
    """
    import collections

    from tunelab.eval.tasks import all_families, generate_items, score

    answers = {}
    for fam in dict.fromkeys(it.family for it in items):
        ref = generate_items([fam], BASELINE_ITEMS, BASELINE_SEED) if fam in all_families() else \
            [it for it in items if it.family == fam]
        counts = collections.Counter(it.answer for it in ref)
        answers[fam] = min(counts, key=lambda a: (-counts[a], a))  # the most common; ties: the first in order
    return {"answers": answers,
            "scores": [score(answers[it.family], it) for it in items]}
