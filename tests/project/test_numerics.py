"""The derived tolerances of tests/support/numerics.py hold for real reorderings and catch a wrong term."""

import pytest
import torch

from tests.support.numerics import (
    assert_as_accurate,
    assert_ulps,
    assert_within,
    gamma,
    matmul_error_bound,
    sum_reorder_bound,
)


def test_gamma_is_n_u_over_1_minus_n_u():
    assert gamma(1) == pytest.approx(2.0**-24 / (1 - 2.0**-24), rel=1e-15)
    assert gamma(1000, torch.float64) == pytest.approx(1000 * 2.0**-53, rel=1e-12)
    with pytest.raises(AssertionError):
        gamma(2**23)  # n u >= 0.5: no bound


@pytest.mark.parametrize("seed", range(4))
def test_sum_orders_stay_within_the_bound_and_a_dropped_term_does_not(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(4097, 3, generator=g) * torch.logspace(-3, 3, 4097).unsqueeze(1)  # wide dynamic range
    bound = sum_reorder_bound(t, 0)
    sums = [t.sum(0), t.flip(0).sum(0), t[torch.randperm(4097, generator=g)].sum(0),
            t.view(17, 241, 3).sum(1).sum(0), t.cumsum(0)[-1]]  # torch's blocked, reversed, shuffled, 2-level, serial
    for s in sums[1:]:
        assert_within(s, sums[0], bound, "two orders")
    exact = t.double().sum(0)
    assert_within(sums[0], exact, bound / 2, "one order against float64")
    with pytest.raises(AssertionError, match="outside the derived bound"):
        assert_within(t[:-1].sum(0), sums[0], bound)  # the largest term (~1e3 x N(0,1)) left out
    small = t[:300] / torch.logspace(-3, 3, 4097)[:300].unsqueeze(1)  # 300 terms of one size, N(0,1)
    with pytest.raises(AssertionError, match="outside the derived bound"):  # n^2 u << 1: any term shows
        assert_within(small[1:].sum(0), small.sum(0), sum_reorder_bound(small, 0))


def test_matmul_bound_holds_against_float64():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(33, 300, generator=g), torch.randn(300, 21, generator=g) * 100
    assert_within(a @ b, a.double() @ b.double(), matmul_error_bound(a, b), "GEMM against float64")


def test_ulps():
    one = torch.tensor([1.0, -3.0, 1e-40])
    assert_ulps(one + torch.tensor([2.0**-23, 0.0, 0.0]), one, 1)  # one ulp of 1.0; subnormals floored
    with pytest.raises(AssertionError):
        assert_ulps(one + torch.tensor([0.0, 3 * 2.0**-22, 0.0]), one, 2)  # 3 ulps of 3.0 (spacing 2^-22)


def test_as_accurate_accepts_another_rounding_and_rejects_a_wrong_value():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 512, generator=g)
    exact = x.double().softmax(-1).sum(0)
    ref = x.softmax(-1).sum(0)
    other = x.flip(-1).softmax(-1).flip(-1).flip(0).sum(0)  # same function, other orders of sums
    assert_as_accurate(other, ref, exact, what="softmax column sums")
    with pytest.raises(AssertionError, match="float32 reference"):
        assert_as_accurate(other * (1 + 1e-4), ref, exact)
