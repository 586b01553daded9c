"""Soft-DTW reference and public API: values against a brute-force loop, gradcheck, properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_softdtw_support import soft_dtw_loop, sq_dist

from s3prl_laser.softdtw import (
    SoftDTW,
    SoftDTWDivergence,
    soft_dtw,
    soft_dtw_divergence,
    soft_dtw_from_cost,
)

F64 = torch.float64


def _pair(seed, n, m, d=3, batch=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, d, generator=g, dtype=dtype),
            torch.randn(batch, m, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (7, 1), (5, 5), (63, 17), (9, 13)])
@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_reference_matches_loop(n, m, gamma):
    x, y = _pair(n * 100 + m, n, m)
    got = soft_dtw(x, y, gamma=gamma, backend="reference")
    want = soft_dtw_loop(sq_dist(x[0].numpy(), y[0].numpy()), gamma)
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,m,bandwidth", [(12, 12, 0), (12, 12, 2), (9, 20, 1.5), (20, 9, 3), (1, 6, 0),
                                           (30, 11, 0.5)])
def test_reference_band_matches_loop(n, m, bandwidth):
    x, y = _pair(7, n, m)
    got = soft_dtw(x, y, gamma=0.1, bandwidth=bandwidth, backend="reference")
    want = soft_dtw_loop(sq_dist(x[0].numpy(), y[0].numpy()), 0.1, bandwidth)
    assert np.isfinite(want)
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64), rtol=1e-10, atol=1e-10)


def test_band_end_cell_reachable_for_all_small_shapes():
    for n in range(1, 13):
        for m in range(1, 13):
            cost = np.ones((n, m))
            assert np.isfinite(soft_dtw_loop(cost, 0.1, bandwidth=0.0)), (n, m)


def test_mixed_lengths_equal_separate_pairs_and_padding_gets_zero_grad():
    x, y = _pair(3, 11, 14, batch=3)
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    n, m = [11, 4, 1], [9, 14, 6]
    got = soft_dtw(x, y, gamma=0.3, x_lengths=n, y_lengths=torch.tensor(m), backend="reference")
    for b in range(3):
        want = soft_dtw_loop(sq_dist(x[b, : n[b]].detach().numpy(), y[b, : m[b]].detach().numpy()), 0.3)
        assert abs(got[b].item() - want) < 1e-9
    got.sum().backward()
    for b in range(3):
        assert torch.count_nonzero(x.grad[b, n[b]:]) == 0
        assert torch.count_nonzero(y.grad[b, m[b]:]) == 0
        assert torch.count_nonzero(x.grad[b, : n[b]]) > 0


def test_padding_content_never_matters():
    x, y = _pair(4, 8, 10, batch=2)
    x2, y2 = x.clone(), y.clone()
    x2[0, 5:] = float("nan")
    y2[1, 3:] = 1e6
    kw = dict(gamma=0.1, x_lengths=[5, 8], y_lengths=[10, 3], backend="reference")
    torch.testing.assert_close(soft_dtw_divergence(x, y, **kw), soft_dtw_divergence(x2, y2, **kw))


def test_gradcheck_reference_sequences():
    x, y = _pair(5, 6, 4, d=2, batch=2)
    x.requires_grad_()
    y.requires_grad_()

    def fn(a, b):
        return soft_dtw(a, b, gamma=0.5, x_lengths=[6, 3], y_lengths=[2, 4], bandwidth=1, backend="reference")

    assert torch.autograd.gradcheck(fn, (x, y))


def test_gradcheck_reference_cost_and_divergence():
    cost = torch.rand(2, 5, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: soft_dtw_from_cost(c, gamma=0.2, x_lengths=[5, 2], y_lengths=[7, 6], backend="reference"),
        (cost,))
    x, y = _pair(6, 4, 5, d=2, batch=2)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: soft_dtw_divergence(a, b, gamma=0.3, y_lengths=[5, 3], backend="reference"), (x, y))


def test_divergence_properties():
    x, y = _pair(8, 9, 12, d=4, batch=3)
    kw = dict(gamma=0.1, backend="reference")
    d_xx = soft_dtw_divergence(x, x, **kw)
    torch.testing.assert_close(d_xx, torch.zeros_like(d_xx), atol=1e-12, rtol=0)
    d_xy = soft_dtw_divergence(x, y, **kw)
    d_yx = soft_dtw_divergence(y, x, **kw)
    torch.testing.assert_close(d_xy, d_yx)
    assert (d_xy >= 0).all()
    # the divergence terms use each sequence's own length
    d = soft_dtw_divergence(x, y, x_lengths=[9, 5, 2], y_lengths=[12, 12, 3], **kw)
    want = soft_dtw(x[1:2, :5], y[1:2], **kw) - 0.5 * (soft_dtw(x[1:2, :5], x[1:2, :5], **kw)
                                                       + soft_dtw(y[1:2], y[1:2], **kw))
    torch.testing.assert_close(d[1:2], want)


def test_half_precision_inputs_and_modules():
    x, y = _pair(9, 10, 12, d=8, batch=2, dtype=torch.float32)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = SoftDTWDivergence(gamma=0.1, backend="reference")(xb, y.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    want = soft_dtw_divergence(xb.detach().double(), y.to(torch.bfloat16).double(), backend="reference")
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert SoftDTW(backend="reference")(x.double(), y.double()).dtype == F64


@pytest.mark.parametrize("gamma", [0.01, 10.0])
def test_extreme_gamma_finite(gamma):
    x, y = _pair(10, 40, 50, d=16, batch=2, dtype=torch.float32)
    x.requires_grad_()
    out = soft_dtw_divergence(x, y, gamma=gamma, y_lengths=[50, 7], backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("call", [
    lambda x, y: soft_dtw(x, y, backend="nope"),
    lambda x, y: soft_dtw(x, y, gamma=0),
    lambda x, y: soft_dtw(x, y, gamma=float("nan")),
    lambda x, y: soft_dtw(x, y, bandwidth=-1),
    lambda x, y: soft_dtw(x, y, x_lengths=[0, 3]),
    lambda x, y: soft_dtw(x, y, x_lengths=[4, 99]),
    lambda x, y: soft_dtw(x, y, y_lengths=[2]),
    lambda x, y: soft_dtw(x, y, x_lengths=torch.tensor([1.0, 2.0])),
    lambda x, y: soft_dtw(x[0], y[0]),
    lambda x, y: soft_dtw(x, y[:, :, :2]),
    lambda x, y: soft_dtw(x.long(), y.long()),
    lambda x, y: soft_dtw_from_cost(torch.rand(2, 3)),
    lambda x, y: soft_dtw(x, y, backend="triton"),
    lambda x, y: SoftDTWDivergence(backend="gpu"),
])
def test_value_errors(call, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = _pair(11, 4, 5, batch=2)
    with pytest.raises(ValueError):
        call(x, y)
