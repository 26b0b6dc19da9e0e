"""Tolerances derived from floating-point arithmetic, for assertions whose two sides compute the same
mathematics in another order: rows split across threads, chunked sums, a fused kernel against its
reference formula. A tolerance read off one machine's result fails on the next machine, whose SIMD width,
BLAS kernels or thread count sum the same terms in another order; these bounds hold on every machine.

Notation (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. 2002): u = eps / 2 is the unit
roundoff (2**-24 for float32) and gamma_n = n u / (1 - n u).
- A sum of n terms, in any order and any blocking (pairwise, SIMD lanes, per-thread partial sums), is
  within gamma_(n-1) * sum|t_i| of the exact sum of those terms (Higham eq. 4.4 and sec. 4.3); two orders
  are therefore within 2 gamma_(n-1) * sum|t_i| of each other.
- A dot product of length n, each product rounding once more, is within gamma_n * sum|a_i b_i| of the exact
  one (Higham eq. 3.5): each element of a matrix product within gamma_k * (|A| @ |B|), k the inner size.
These are worst cases; typical errors are about sqrt(n) u * sum|t|. A bug that drops, repeats or
misweights a term moves the result by about one |t_i|: outside the bound when |t_i| > 2 gamma_n sum|t|, for
n terms of one size when n^2 u << 1 (n up to a few hundred in float32, as in the tests that use it).

For a whole model's loss and gradients (many sums composed with non-linear functions) no a-priori bound
is practical; `assert_as_accurate` then asks that the fast path's float32 result be no further from a
float64 evaluation of the same function than a few times the float32 reference's own distance from it.
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    nu = n * unit_roundoff(dtype)
    assert nu < 0.5, f"gamma_{n} is meaningless in {dtype}: n u = {nu}"
    return nu / (1 - nu)


def sum_reorder_bound(terms: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Largest difference between two `dtype` sums of `terms` along `dim` taken in different orders,
    2 gamma_n sum|t| (n = terms.shape[dim]; gamma_n rather than gamma_(n-1): the terms themselves may be
    products that each path rounds once, in another order of its factors). float64, `dim` reduced."""
    n = terms.shape[dim]
    return 2 * gamma(n, dtype) * terms.detach().double().abs().sum(dim)


def matmul_error_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound on |fl(a @ b) - a @ b| elementwise: gamma_k (|a| @ |b|), k = a.shape[-1] (float64)."""
    return gamma(a.shape[-1], dtype) * (a.detach().double().abs() @ b.detach().double().abs())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound a tensor broadcastable to them, or a number)."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    bad = ~(diff <= bound)  # NaN counts as outside
    if bad.any():
        ratio = torch.where(bound > 0, diff / bound, torch.full_like(diff, float("inf")))
        worst = int(ratio.view(-1).nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements outside the derived bound; worst at flat "
            f"index {worst}: |diff| {float(diff.view(-1)[worst]):.3g} > bound {float(bound.reshape(-1)[worst]):.3g}"
        )


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float, what: str = "") -> None:
    """|actual - expected| <= `ulps` units in the last place of max(|actual|, |expected|), elementwise, in
    actual's dtype (values below the smallest normal count as the smallest normal)."""
    info = torch.finfo(actual.dtype)
    mag = torch.maximum(actual.detach().double().abs(), expected.detach().double().abs()).clamp_min(info.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * info.eps  # spacing of floats in [2^e, 2^(e+1))
    assert_within(actual, expected, ulps * ulp, what or f"more than {ulps} ulps apart")


def assert_as_accurate(fast: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, factor: float = 4.0,
                       floor_ulps: float = 8.0, what: str = "") -> None:
    """`fast` and `ref`, two float32 evaluations of one function, `exact` its float64 evaluation:
    max|fast - exact| <= factor * max|ref - exact| + floor_ulps * eps * max|exact|.

    Both float32 results carry rounding errors of the same kind (sums of the same length, in other orders),
    so the fast path may be a little less lucky than the reference but not by an order of magnitude; `factor`
    4 leaves room for that, `floor_ulps` for a tensor that the reference happens to get nearly exact. A
    wrong term or a missing gradient is off by the size of the values, far outside.
    """
    exact = exact.detach().double()
    err_fast = float((fast.detach().double() - exact).abs().max())
    err_ref = float((ref.detach().double() - exact).abs().max())
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    allowed = factor * err_ref + floor_ulps * torch.finfo(fast.dtype).eps * scale
    assert err_fast <= allowed, (
        f"{what}: max |fast - float64| = {err_fast:.3g} > {factor} x the float32 reference's {err_ref:.3g} "
        f"+ {floor_ulps} ulps of {scale:.3g} (= {allowed:.3g})"
    )


def lora_forward_bound(x, W, b, A, B, scale: float, dora_factor=None) -> torch.Tensor:
    """Rounding bound of a float32 LoRA layer's output x W^T + b + s (x A^T) B^T against float64 (inputs
    as float64 tensors): each output sums k products of x W and r of s B (A x), depth k + r + 3 (the scale
    and two adds), gamma_depth (|x| (|W| + s |B| |A|)^T + |b|). DoRA's row factor m / ||V||_row multiplies
    the terms and adds a k-term sum of squares, a square root, a divide and a multiply to the depth."""
    k, r = W.shape[1], A.shape[0]
    depth, terms = k + r + 3, x.double().abs() @ (W.abs() + scale * B.abs() @ A.abs()).T
    if dora_factor is not None:
        depth, terms = depth + k + 4, terms * dora_factor.abs()
    return gamma(depth) * (terms + b.abs())
