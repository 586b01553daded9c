"""LASER loss against independent float64 brute-force loops written from the formulas of docs/method.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from s3prl_laser.objective.loss import LaserLoss, ProjectionHead, temporal_regularizer


def brute_idm(z, sigma, margin):
    """IDM of one utterance z [n, D] (float64), double loop over frame pairs, differentiable."""
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        for j in range(n):
            d = (z[i] - z[j]).pow(2).sum().sqrt() if i != j else z.new_zeros(())
            w_bar = (i - j) ** 2 + 1
            if abs(i - j) <= sigma:
                total = total + d / w_bar
            else:
                total = total + w_bar * torch.clamp(margin - d, min=0)
    return total / n**2


def brute_sdtw(x, y, gamma):
    """Soft-DTW value R[n, m] of x [n, D], y [m, D] (float64) by the recursion, differentiable."""
    n, m = x.shape[0], y.shape[0]
    inf = torch.tensor(math.inf, dtype=x.dtype)
    R = [[inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = x.new_zeros(())
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = (x[i - 1] - y[j - 1]).pow(2).sum()
            prev = torch.stack([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]])
            R[i][j] = cost - gamma * torch.logsumexp(-prev / gamma, dim=0)
    return R[n][m]


def brute_divergence(x, y, gamma):
    return brute_sdtw(x, y, gamma) - 0.5 * (brute_sdtw(x, x, gamma) + brute_sdtw(y, y, gamma))


def unit_frames(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# dtype -> (rtol, atol) of values and of gradients against the float64 brute-force oracle
TOLERANCES = {torch.float32: ((1e-5, 1e-6), (1e-4, 1e-5)), torch.float64: ((1e-9, 1e-9), (1e-9, 1e-9))}
LOSS_TOLERANCES = {torch.float32: ((1e-4, 1e-5), (1e-3, 1e-4)), torch.float64: ((1e-9, 1e-9), (1e-9, 1e-9))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma,margin", [(0, 1.1), (0, 1.0), (2, 1.3)])
def test_regularizer_matches_brute_force_values_and_gradients(sigma, margin, dtype):
    lengths = torch.tensor([9, 1, 5])
    z = unit_frames(3, 9, 4, seed=sigma).to(dtype).requires_grad_()
    ours = temporal_regularizer(z, lengths, sigma=sigma, margin=margin)
    assert ours.dtype == dtype and ours.shape == (3,)
    upstream = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    (grad_ours,) = torch.autograd.grad((ours.double() * upstream).sum(), z)
    assert grad_ours.dtype == dtype

    z_ref = z.detach().double().requires_grad_()
    ref = torch.stack([brute_idm(z_ref[b, : int(n)], sigma, margin) for b, n in enumerate(lengths)])
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), z_ref)
    (value_rtol, value_atol), (grad_rtol, grad_atol) = TOLERANCES[dtype]
    torch.testing.assert_close(ours.double(), ref, rtol=value_rtol, atol=value_atol)
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=grad_rtol, atol=grad_atol)


def test_regularizer_ignores_padding_and_has_finite_gradients_on_repeated_frames():
    z = unit_frames(2, 8, 6, seed=1)
    z[0, 3] = z[0, 2]  # a repeated frame: distance exactly 0 off the diagonal
    lengths = torch.tensor([6, 4])
    padded_a, padded_b = z.clone(), z.clone()
    padded_b[0, 6:] = 5.0
    padded_b[1, 4:] = -3.0
    values = []
    for padded in (padded_a, padded_b):
        padded = padded.float().requires_grad_()
        value = temporal_regularizer(padded, lengths)
        value.sum().backward()
        assert torch.isfinite(padded.grad).all()
        assert padded.grad[0, 6:].abs().max() == 0 and padded.grad[1, 4:].abs().max() == 0
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1])


def test_regularizer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="B, T, D"):
        temporal_regularizer(torch.randn(5, 4))
    with pytest.raises(ValueError, match="lengths"):
        temporal_regularizer(torch.randn(2, 5, 4), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="sigma"):
        temporal_regularizer(torch.randn(2, 5, 4), sigma=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["softdtw_lav", "softdtw"])
def test_laser_loss_matches_brute_force_values_and_gradients(loss_type, dtype):
    gamma, alpha, margin = 0.1, 0.4, 1.1
    z1 = unit_frames(3, 7, 5, seed=2).to(dtype).requires_grad_()
    z2 = unit_frames(3, 6, 5, seed=3).to(dtype).requires_grad_()
    lengths1, lengths2 = torch.tensor([7, 1, 4]), torch.tensor([6, 5, 1])
    out = LaserLoss(gamma=gamma, alpha=alpha, margin=margin, loss_type=loss_type)(z1, z2, lengths1, lengths2)
    assert out.loss.shape == () and out.alignment.shape == (3,) and out.regularizer.shape == (3,)
    grads = torch.autograd.grad(out.loss, (z1, z2))

    assert out.alignment.dtype == out.regularizer.dtype == out.loss.dtype == dtype
    r1, r2 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    alignment, regularizer = [], []
    for b in range(3):
        x, y = r1[b, : int(lengths1[b])], r2[b, : int(lengths2[b])]
        alignment.append(brute_divergence(x, y, gamma))
        regularizer.append(brute_idm(x, 0, margin) + brute_idm(y, 0, margin))
    alignment, regularizer = torch.stack(alignment), torch.stack(regularizer)
    ref_loss = (alignment + alpha * regularizer).mean() if loss_type == "softdtw_lav" else alignment.mean()
    ref_grads = torch.autograd.grad(ref_loss, (r1, r2))

    (value_rtol, value_atol), (grad_rtol, grad_atol) = LOSS_TOLERANCES[dtype]
    for ours, ref in ((out.alignment, alignment), (out.regularizer, regularizer), (out.loss, ref_loss)):
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=value_rtol, atol=value_atol)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=grad_rtol, atol=grad_atol)


def test_laser_loss_padding_contributes_nothing_and_gets_zero_gradient():
    z1, z2 = unit_frames(2, 9, 4, seed=4), unit_frames(2, 8, 4, seed=5)
    lengths1, lengths2 = torch.tensor([9, 5]), torch.tensor([6, 8])
    loss_fn = LaserLoss()
    results = []
    for fill in (0.0, 7.0):
        a, b = z1.clone().float(), z2.clone().float()
        a[1, 5:], b[0, 6:] = fill, -fill
        a.requires_grad_(), b.requires_grad_()
        out = loss_fn(a, b, lengths1, lengths2)
        out.loss.backward()
        assert a.grad[1, 5:].abs().max() == 0 and b.grad[0, 6:].abs().max() == 0
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        results.append(out.loss.detach())
    torch.testing.assert_close(results[0], results[1])


def test_collapse_is_penalised_only_by_the_regularizer():
    frames, dim = 6, 8
    collapsed = F.normalize(torch.ones(1, frames, dim), dim=-1)
    spread = torch.eye(frames, dim)[None]  # orthogonal unit frames: all distances sqrt(2) > margin
    lav, alignment_only = LaserLoss(alpha=0.4, margin=1.1), LaserLoss(loss_type="softdtw")
    for z in (collapsed, spread):
        assert alignment_only(z, z.clone()).loss.abs() < 1e-5  # the alignment term cannot tell them apart
    expected = 0.4 * 2 * 1.1 * sum((i - j) ** 2 + 1 for i in range(frames) for j in range(frames) if i != j)
    torch.testing.assert_close(lav(collapsed, collapsed.clone()).loss, torch.tensor(expected / frames**2))
    assert lav(spread, spread.clone()).loss.abs() < 1e-5


def test_softdtw_ablation_leaves_the_regularizer_out_of_the_graph():
    z1 = unit_frames(2, 5, 4, seed=6).float().requires_grad_()
    z2 = unit_frames(2, 5, 4, seed=7).float()
    out = LaserLoss(loss_type="softdtw")(z1, z2)
    assert not out.regularizer.requires_grad and out.regularizer.min() > 0
    torch.testing.assert_close(out.loss, out.alignment.mean())


def test_laser_loss_runs_in_float32_under_bf16_autocast():
    head = ProjectionHead(12, 8)
    g = torch.Generator().manual_seed(8)
    h1, h2 = torch.randn(2, 10, 12, generator=g), torch.randn(2, 9, 12, generator=g)
    loss_fn = LaserLoss()
    reference = loss_fn(head(h1), head(h2))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z1, z2 = head(h1), head(h2)
        assert z1.dtype == torch.bfloat16
        out = loss_fn(z1, z2)
    assert out.alignment.dtype == torch.float32 and out.regularizer.dtype == torch.float32
    torch.testing.assert_close(out.loss, reference.loss, rtol=5e-2, atol=5e-2)


def test_laser_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        LaserLoss(loss_type="dtw")
    with pytest.raises(ValueError, match="gamma"):
        LaserLoss(gamma=0)
    with pytest.raises(ValueError, match="feature size"):
        LaserLoss()(torch.randn(2, 5, 4), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="lengths2"):
        LaserLoss()(torch.randn(2, 5, 4), torch.randn(2, 5, 4), None, torch.tensor([0, 5]))


def test_projection_head_is_linear_then_unit_norm():
    head = ProjectionHead(6, 3)
    h = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(9))
    out = head(h)
    linear = h @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 4))
    torch.testing.assert_close(out, linear / linear.norm(dim=-1, keepdim=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_laser_loss_on_cuda_under_bf16_autocast_matches_cpu_float32():
    z1, z2 = unit_frames(2, 30, 16, seed=10).float(), unit_frames(2, 25, 16, seed=11).float()
    lengths1, lengths2 = torch.tensor([30, 17]), torch.tensor([25, 20])
    loss_fn = LaserLoss()
    reference = loss_fn(z1, z2, lengths1, lengths2)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        out = loss_fn(z1.cuda(), z2.cuda(), lengths1.cuda(), lengths2.cuda())
    assert out.alignment.dtype == torch.float32
    torch.testing.assert_close(out.alignment.cpu(), reference.alignment, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out.regularizer.cpu(), reference.regularizer, rtol=1e-3, atol=1e-4)
