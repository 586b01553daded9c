"""The fast soft-DTW engine is checked against the reference once per (device, dtype) before it is used
(``backend="auto"``): a wrong or broken engine gives one warning and the reference's results, never its own.
(The real Triton kernels pass the same check under ``TRITON_INTERPRET=1``: ``test_softdtw_triton.py``.)"""

import logging
import types

import pytest
import torch

from s3prl_laser.softdtw import cpu_backend, reference, selfcheck, soft_dtw_divergence


def engine(name: str, forward=None, backward=None) -> types.ModuleType:
    """A fake engine module: the reference, with ``forward``/``backward`` replaced where given."""
    module = types.ModuleType(f"s3prl_laser.softdtw.{name}")
    module.forward = forward or reference.forward
    module.backward = backward or reference.backward
    return module


def wrong_gradient(costs, saved, n, m, W, gamma, grad):
    grads = reference.backward(costs, saved, n, m, W, gamma, grad)
    grads[0][1, 0, 0] += 1e-3  # one cell of one pair: a plausible indexing bug
    return grads


def shifted_values(costs, n, m, W, gamma):
    values, saved = reference.forward(costs, n, m, W, gamma)
    return values * (1 + 1e-3), saved


def failing_compile(costs, n, m, W, gamma):
    raise RuntimeError("PTX assembly aborted (simulated compile failure)")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})


@pytest.mark.parametrize(
    ("fake", "said"),
    [
        (engine("bad_grad", backward=wrong_gradient), "disagrees with the reference on gradients"),
        (engine("bad_value", forward=shifted_values), "disagrees with the reference on values"),
        (engine("no_compile", forward=failing_compile), "failed to run (RuntimeError: PTX assembly"),
    ],
)
def test_a_wrong_or_broken_engine_warns_once_and_the_reference_is_used(fake, said, caplog):
    caplog.set_level(logging.WARNING, logger="s3prl_laser.softdtw")
    cpu = torch.device("cpu")
    assert selfcheck.checked(fake, cpu, torch.float32) is reference
    assert selfcheck.checked(fake, cpu, torch.float32) is reference  # the verdict is kept ...
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and said in warnings[0] and "using the reference engine" in warnings[0]
    assert selfcheck.checked(fake, cpu, torch.float64) is reference  # ... per dtype
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_auto_on_a_gpu_never_trains_with_a_wrong_engine(monkeypatch, caplog):
    """``backend="auto"`` on a CUDA device resolves through the check: with the Triton module replaced by
    a wrong engine, the gradients are the reference's."""
    import s3prl_laser.softdtw as package
    from s3prl_laser.softdtw import function

    caplog.set_level(logging.WARNING, logger="s3prl_laser.softdtw")
    fake = engine("triton_backend", backward=wrong_gradient)
    monkeypatch.setattr(package, "triton_backend", fake, raising=False)
    on_cpu = selfcheck._compare  # no GPU here: the check's random case runs on the CPU instead
    cpu = torch.device("cpu")
    monkeypatch.setattr(selfcheck, "_compare", lambda impl, device, *rest: on_cpu(impl, cpu, *rest))
    cuda = torch.device("cuda")
    assert function.resolve_backend("auto", cuda, torch.float32) is reference
    assert function.resolve_backend("triton", cuda, torch.float32) is fake  # named explicitly: as asked
    assert "disagrees with the reference on gradients" in caplog.text


def test_a_correct_engine_passes_silently(caplog):
    caplog.set_level(logging.WARNING, logger="s3prl_laser.softdtw")
    assert selfcheck.checked(cpu_backend, torch.device("cpu"), torch.float32) is cpu_backend
    x, y = torch.randn(2, 6, 3), torch.randn(2, 5, 3)
    fast, slow = soft_dtw_divergence(x, y, backend="cpu"), soft_dtw_divergence(x, y, backend="reference")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert not caplog.records


def banded(W, n, m) -> bool:
    return any(w < a * b for w, a, b in zip(W, n, m, strict=True))


def wrong_in_the_band(what: str) -> types.ModuleType:
    """An engine right without a band and wrong with one (a plausible bug: the band test off by one)."""

    def forward(costs, n, m, W, gamma):
        values, saved = reference.forward(costs, n, m, W, gamma)
        return (values * (1 + 1e-3) if what == "values" and banded(W, n, m) else values), saved

    def backward(costs, saved, n, m, W, gamma, grad):
        return (wrong_gradient if what == "gradients" and banded(W, n, m) else reference.backward)(
            costs, saved, n, m, W, gamma, grad
        )

    return engine(f"band_{what}", forward, backward)


def wrong_across_tiles(what: str) -> types.ModuleType:
    """An engine right while an anti-diagonal fits one tile and wrong once it takes several (a plausible
    bug: the carry between tiles), as the Triton kernels take ``max_block``."""

    def several(costs, max_block):
        return min(costs[0].shape[1:]) > max_block

    def forward(costs, n, m, W, gamma, max_block=1024):
        values, saved = reference.forward(costs, n, m, W, gamma)
        return (values * (1 + 1e-3) if what == "values" and several(costs, max_block) else values), saved

    def backward(costs, saved, n, m, W, gamma, grad, max_block=1024):
        return (wrong_gradient if what == "gradients" and several(costs, max_block) else reference.backward)(
            costs, saved, n, m, W, gamma, grad
        )

    return engine(f"tiles_{what}", forward, backward)


@pytest.mark.parametrize("what", ["values", "gradients"])
def test_an_engine_wrong_only_with_a_band_is_caught_where_a_band_is_used(what, caplog):
    """The check ran one case without a band: an engine wrong only in the Sakoe-Chiba band passed it."""
    caplog.set_level(logging.WARNING, logger="s3prl_laser.softdtw")
    fake, cpu = wrong_in_the_band(what), torch.device("cpu")
    assert selfcheck.checked(fake, cpu, torch.float32) is fake  # no band: right, so kept
    assert selfcheck.checked(fake, cpu, torch.float32, banded=True) is reference
    assert selfcheck.checked(fake, cpu, torch.float32) is fake  # one verdict per (device, dtype, band)
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"(torch.float32, with a band) disagrees with the reference on {what}" in warning
    assert warning.endswith("in the small case; using the reference engine instead (slower, same results)")


@pytest.mark.parametrize("band", [False, True])
@pytest.mark.parametrize("what", ["values", "gradients"])
def test_an_engine_wrong_only_across_tiles_is_caught(what, band, caplog):
    """The check's 7x6 case fits one tile: an engine wrong only where a diagonal spans several passed it."""
    caplog.set_level(logging.WARNING, logger="s3prl_laser.softdtw")
    fake = wrong_across_tiles(what)
    band_kwarg = {"banded": True} if band else {}
    assert selfcheck.checked(fake, torch.device("cpu"), torch.float32, **band_kwarg) is reference
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"disagrees with the reference on {what}" in warning
    assert f"in the multi-tile ({selfcheck.TILE}-cell tiles) case" in warning  # the small case passed
    n, m = selfcheck.CASES[1][1:3]
    assert min(max(n), max(m)) > 2 * selfcheck.TILE  # its longest diagonal takes three tiles
