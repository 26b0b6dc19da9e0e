"""The optimal learning rate of a loss-vs-lr curve on a grid, and the ratio of two optima with its uncertainty.

A grid only brackets the optimum. We take the grid point with the lowest loss and refine it with a parabola
in log(lr) through it and its two neighbours (the curve is close to a parabola in log-lr near its minimum;
LoRA Without Regret, Schulman et al. 2025, fits its optimal-LR ratio the same way). The refined optimum is
clamped to the bracket [left neighbour, right neighbour].

Uncertainty, in log(lr):
- `trusted` (interior minimum, parabola opens upward): +- half a grid step, the grid's resolution;
- interior but not trusted (flat or noisy, parabola opens downward): +- one grid step;
- minimum at the edge of the grid: the optimum may lie beyond it, so the interval is open on that side
  (`edge` = "low"/"high") and a ratio that uses it is a bound, not a measurement.
The ratio a/b of two optima takes the widest combination: [lo_a / hi_b, hi_a / lo_b].
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Optimum:
    lr: float  # refined optimal learning rate
    lo: float  # lower end of its uncertainty interval (0.0: open, the minimum is at the low edge)
    hi: float  # upper end (inf: open, the minimum is at the high edge)
    best_lr: float  # the grid point with the lowest loss
    best_loss: float  # its (measured) loss
    trusted: bool  # interior minimum with an upward parabola
    edge: str | None  # "low" / "high" when the minimum is at the grid's end


def _parabola_vertex(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(curvature a, vertex x) of the parabola through three points (x distinct)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)  # y = a x^2 + b x + c; divided differences
    b = d01 - a * (x0 + x1)
    return a, (-b / (2 * a) if a != 0 else x1)


def find_optimum(lrs: list[float], losses: list[float]) -> Optimum:
    """The optimum of one curve. Non-finite losses (diverged runs) are left out; needs >= 1 finite point."""
    pts = sorted((lr, y) for lr, y in zip(lrs, losses, strict=True) if math.isfinite(y) and lr > 0)
    if not pts:
        raise ValueError("no finite loss on this curve: every run diverged")
    xs = [math.log(lr) for lr, _ in pts]
    ys = [y for _, y in pts]
    i = min(range(len(ys)), key=ys.__getitem__)
    best_lr, best_loss = pts[i]
    if len(pts) == 1:
        return Optimum(best_lr, 0.0, math.inf, best_lr, best_loss, False, "low")
    if i == 0 or i == len(pts) - 1:
        edge = "low" if i == 0 else "high"
        step = abs(xs[1] - xs[0]) if i == 0 else abs(xs[-1] - xs[-2])
        lo = 0.0 if edge == "low" else math.exp(xs[i] - step)
        hi = math.inf if edge == "high" else math.exp(xs[i] + step)
        return Optimum(best_lr, lo, hi, best_lr, best_loss, False, edge)
    a, x = _parabola_vertex(xs[i - 1 : i + 2], ys[i - 1 : i + 2])
    trusted = a > 0
    x = min(max(x, xs[i - 1]), xs[i + 1]) if trusted else xs[i]
    step = (xs[i + 1] - xs[i - 1]) / 2
    half = step / 2 if trusted else step
    return Optimum(math.exp(x), math.exp(x - half), math.exp(x + half), best_lr, best_loss, trusted, None)


@dataclass(frozen=True)
class Ratio:
    value: float
    lo: float
    hi: float
    bound: bool  # True when one optimum is at a grid edge: the interval is open on one side

    def describe(self) -> str:
        hi = "inf" if math.isinf(self.hi) else f"{self.hi:.3g}"
        text = f"{self.value:.3g}x (range {self.lo:.3g}-{hi})"
        return text + (", a bound: an optimum is at the grid edge" if self.bound else "")


def lr_ratio(a: Optimum, b: Optimum) -> Ratio:
    """Optimal-lr ratio a/b with the widest interval from the two optima's intervals."""
    lo = a.lo / b.hi if b.hi > 0 else 0.0  # b.hi may be inf -> 0
    hi = a.hi / b.lo if b.lo > 0 else math.inf
    return Ratio(a.lr / b.lr, lo, hi, bool(a.edge or b.edge))
