"""95% intervals and the constant-answer baseline, against float64 formulas and hand-counted items."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tunelab.eval.stats import (
    BASELINE_ITEMS,
    BASELINE_SEED,
    Z95,
    bootstrap_interval,
    constant_baseline,
    exact,
    interval,
    mean,
    wilson_interval,
)
from tunelab.eval.tasks import Item, generate_items


def _wilson_roots(k: int, n: int) -> tuple[float, float]:
    """Independent float64 reference: the Wilson bounds are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n,
    i.e. (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0."""
    z2, ph = np.float64(Z95) ** 2, np.float64(k) / n
    a, b, c = 1 + z2 / n, -(2 * ph + z2 / n), ph * ph
    disc = np.sqrt(b * b - 4 * a * c)
    return float((-b - disc) / (2 * a)), float((-b + disc) / (2 * a))


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (2, 50), (13, 50), (26, 54), (0, 1), (1, 1)])
def test_wilson_matches_the_quadratic_roots_in_float64(k, n):
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = _wilson_roots(k, n)
    assert lo == pytest.approx(max(0.0, ref_lo), abs=1e-12) and hi == pytest.approx(min(1.0, ref_hi), abs=1e-12)
    assert lo <= k / n <= hi


def test_wilson_published_values():
    # Brown, Cai & DasGupta (2001) / any Wilson table: 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=5e-5)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_bootstrap_interval():
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)  # no spread, no width
    scores = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75, 0.0, 0.5]
    lo, hi = bootstrap_interval(scores)
    assert lo < mean(scores) < hi and (lo, hi) == bootstrap_interval(scores)  # seeded: reproducible
    # for 0/1 scores and a large n it agrees with Wilson (both near the normal approximation)
    ones = [1.0] * 60 + [0.0] * 140
    assert bootstrap_interval(ones) == pytest.approx(wilson_interval(60, 200), abs=0.015)


def test_interval_picks_wilson_for_0_1_scores_and_bootstrap_for_partial_credit():
    assert interval([1.0, 0.0, 0.0, 1.0, 0.0]) == wilson_interval(2, 5)
    partial = [1.0, 0.5, 0.0, 0.25]
    assert interval(partial) == bootstrap_interval(partial)
    assert interval([]) is None
    assert exact([1.0, 0.99, 0.0, 1.0]) == [1.0, 0.0, 0.0, 1.0]


def test_constant_baseline_is_the_majority_class_of_a_separate_draw():
    items = generate_items(["parity", "sentiment", "km_to_m"], 25, seed=3)
    b = constant_baseline(items)
    for fam in ("parity", "sentiment", "km_to_m"):
        # chosen on 200 other items of the family (never on the evaluated ones), then scored on these
        ref = collections.Counter(it.answer for it in generate_items([fam], BASELINE_ITEMS, seed=BASELINE_SEED))
        top = max(ref.values())
        assert b["answers"][fam] == min(a for a, c in ref.items() if c == top)
        got = [s for s, it in zip(b["scores"], items) if it.family == fam]
        assert mean(got) == pytest.approx(sum(it.answer == b["answers"][fam] for it in items) / 25)
    assert b["answers"]["parity"] in ("even", "odd") and 0.3 < mean(b["scores"][:25]) < 0.8


def test_constant_baseline_of_user_items_counts_partial_credit():
    # a user family (not built in) takes its own most common answer; "words" gives credit by position
    answers = ["a b c", "a b c", "a b d", "x y z"]
    items = [Item(str(i), "mine", "p", a, {"check": "words"}) for i, a in enumerate(answers)]
    b = constant_baseline(items)
    assert b["answers"] == {"mine": "a b c"}
    assert b["scores"] == pytest.approx([1, 1, 2 / 3, 0])
    assert exact(b["scores"]) == [1.0, 1.0, 0.0, 0.0]
