"""The probe head's C kernels (s3prl_laser/probe/head_cpu.c) against independent references.

CTC: a brute-force sum over every alignment of a tiny problem (float64 autograd gives the gradient with
respect to the log-probabilities themselves), and torch's ``ctc_loss`` in float64 on realistic sizes. The
layer mix: a float64 einsum and its autograd gradient. Then the head as a whole against its torch path,
the thread count, and the fallback without a C compiler.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from s3prl_laser.probe import kernels
from s3prl_laser.probe.head import HeadSettings, ProbeHead, train_head


def collapse(path: tuple[int, ...], blank: int = 0) -> list[int]:
    out, previous = [], None
    for k in path:
        if k != previous and k != blank:
            out.append(k)
        previous = k
    return out


def brute_force_nll(lp: torch.Tensor, target: list[int]) -> torch.Tensor:
    """-log of the sum, over every frame-by-frame path that collapses to ``target``, of its probability."""
    T, V = lp.shape
    terms = [
        lp[torch.arange(T), torch.tensor(path)].sum()
        for path in itertools.product(range(V), repeat=T)
        if collapse(path) == target
    ]
    return -torch.logsumexp(torch.stack(terms), 0) if terms else torch.tensor(float("inf"), dtype=lp.dtype)


@pytest.mark.parametrize("target", [[1, 2], [2, 2], [1], [], [3, 1, 3], [1, 1, 1]])
def test_ctc_equals_the_sum_over_every_alignment(target):
    T, V = 6, 4
    lp = torch.randn(T, V, generator=torch.Generator().manual_seed(len(target)), dtype=torch.float64)
    lp = lp.mul(2).log_softmax(-1).requires_grad_()
    want = brute_force_nll(lp, target)
    nll, feasible, grad = kernels.ctc(lp.detach().float()[None], [T], [target])
    assert bool(feasible[0])
    assert abs(float(nll[0]) - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    (want_grad,) = torch.autograd.grad(want, lp)  # with respect to the log-probabilities as free inputs
    assert (grad[0].double() - want_grad).abs().max() < 1e-5


def test_ctc_without_any_alignment_is_marked_and_has_no_gradient():
    # [1, 1] needs a blank between the two: 3 frames; 2 frames cannot give it, nor 2 frames 3 labels
    lp = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    nll, feasible, grad = kernels.ctc(lp, [2, 3, 2], [[1, 1], [1, 1], [1, 2, 3]])
    assert feasible.tolist() == [False, True, False]
    assert float(brute_force_nll(lp[0, :2].double(), [1, 1])) == float("inf")
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0 and grad[1].abs().sum() > 0
    assert abs(float(nll[1]) - float(brute_force_nll(lp[1].double(), [1, 1]))) < 1e-5


def test_a_diverged_head_gives_nan_as_torch_does():
    lp = torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    lp[1, 3, 2] = float("nan")
    nll, _, grad = kernels.ctc(lp, [10, 10], [[1, 2], [1, 2]])
    want = F.ctc_loss(lp[1:].transpose(0, 1), torch.tensor([[1, 2]]), torch.tensor([10]), torch.tensor([2]))
    assert want.isnan() and nll[1].isnan() and grad[1].isnan().all()
    assert nll[0].isfinite() and grad[0].isfinite().all()


def torch_ctc(logits: torch.Tensor, frames: list[int], targets: list[list[int]]) -> torch.Tensor:
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long)
    return F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        flat,
        torch.tensor(frames),
        torch.tensor([len(t) for t in targets]),
        reduction="mean",
        zero_infinity=True,
    )


def realistic_batch(seed: int, batch: int = 6, t_max: int = 300, vocab: int = 29):
    g = torch.Generator().manual_seed(seed)
    frames = [t_max - 37 * i for i in range(batch)]
    lengths = [0, *[int(f * 0.3) for f in frames[1:]]]  # one empty target
    targets = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    targets[1][5:9] = [7, 7, 7, 7]  # repeats, which need blanks between them
    targets[-1] = list(range(1, vocab)) * 20  # far longer than its frames allow: no alignment
    logits = 3 * torch.randn(batch, t_max, vocab, generator=g, dtype=torch.float64)
    return logits, frames, targets


def test_ctc_batch_equals_torch_ctc_loss_value_and_gradient():
    logits, frames, targets = realistic_batch(0)
    want = torch_ctc(logits.requires_grad_(), frames, targets)
    (want_grad,) = torch.autograd.grad(want, logits)
    want = want.detach()
    head = ProbeHead(1, 1, logits.shape[-1])
    assert head.in_c()
    ours_logits = logits.detach().float().requires_grad_()
    from s3prl_laser.probe.head import _Ctc

    got = _Ctc.apply(ours_logits.log_softmax(-1), frames, targets)
    (got_grad,) = torch.autograd.grad(got, ours_logits)
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    # float32 log-space arithmetic, as torch's own float32 ctc_loss: no further from float64 than torch is
    torch32 = logits.detach().float().requires_grad_()
    (torch32_grad,) = torch.autograd.grad(torch_ctc(torch32, frames, targets), torch32)
    torch32_error = (torch32_grad.double() - want_grad).abs().max().item()
    error = (got_grad.double() - want_grad).abs().max().item()
    assert error < max(2 * torch32_error, 1e-6), (error, torch32_error)
    assert got_grad[-1].abs().sum() == 0  # the clip with no alignment adds nothing (zero_infinity)
    for b, f in enumerate(frames):
        assert got_grad[b, f:].abs().sum() == 0  # padding frames


def test_ctc_of_a_confident_head_far_from_its_targets_equals_torch_in_float64():
    # log-probabilities down to about -300: the log-space sums must neither underflow nor lose the paths
    g = torch.Generator().manual_seed(5)
    lp = (40 * torch.randn(3, 700, 29, generator=g, dtype=torch.float64)).log_softmax(-1)
    frames, targets = (
        [700, 650, 690],
        [torch.randint(1, 29, (n,), generator=g).tolist() for n in (200, 300, 340)],
    )
    nll, feasible, _ = kernels.ctc(lp.float(), frames, targets)
    assert lp.min() < -250 and feasible.all()
    for b in range(3):
        want = F.ctc_loss(
            lp[b : b + 1, : frames[b]].transpose(0, 1),
            torch.tensor([targets[b]]),
            torch.tensor([frames[b]]),
            torch.tensor([len(targets[b])]),
            reduction="sum",
        )
        assert abs(nll[b].item() - want.item()) < 1e-5 * want.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_layer_mix_equals_an_einsum_and_its_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    # 13 channels: the 8-wide vector loop and the scalar tail; float16 subnormals and large values in both
    clips = [torch.randn(5, f, 13, generator=g) for f in (17, 9, 30)]
    clips[0][:, :, 10] = 3e-6  # a float16 subnormal, in the tail
    clips[1][:, :, 2] = -4e-7  # a float16 subnormal, in the vector part
    clips[2][:, :, 12] = 60000.0
    clips = [c.to(dtype) for c in clips]
    w = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0).requires_grad_()
    out = kernels.mix_forward(w.detach().float(), tuple(clips))
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = torch.zeros(out.shape, dtype=torch.float64)
    for i, c in enumerate(clips):
        want[i, : c.shape[1]] = torch.einsum("l,lfc->fc", w, c.double())
    (want_grad,) = torch.autograd.grad((want * up).sum(), w)
    assert torch.allclose(out.double(), want.detach(), rtol=1e-6, atol=1e-6 * want.abs().max().item())
    grad = kernels.mix_backward(tuple(clips), up.float())
    assert torch.allclose(grad.double(), want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


def test_the_same_bits_on_one_thread_and_on_two():
    logits, frames, targets = realistic_batch(1, batch=5)
    lp = logits.float().log_softmax(-1)
    clips = tuple(torch.randn(4, f, 24, generator=torch.Generator().manual_seed(f)).half() for f in frames)
    w, up = torch.rand(4), torch.randn(5, max(frames), 24)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                (
                    *kernels.ctc(lp, frames, targets),
                    kernels.mix_forward(w, clips),
                    kernels.mix_backward(clips, up),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def synthetic_task(seed: int, clips: int = 24):
    g = torch.Generator().manual_seed(seed)
    feats, targets = [], []
    for i in range(clips):
        labels = torch.randint(1, 6, (8 + i % 5,), generator=g)
        frames = labels.repeat_interleave(4)  # 4 frames per label
        x = torch.randn(3, len(frames), 16, generator=g)
        x[1, torch.arange(len(frames)), frames] += 3.0  # layer 1 carries the label
        feats.append(x.half())
        targets.append(labels.tolist())
    return feats, targets


def test_head_training_on_the_c_kernels_follows_the_torch_path():
    feats, targets = synthetic_task(0)
    runs = {}
    for backend in ("auto", "torch"):
        settings = HeadSettings(steps=30, batch_size=8, eval_every=10, lr=1e-2, backend=backend)
        head, info = train_head(feats[:20], targets[:20], feats[20:], targets[20:], 6, settings)
        assert head.in_c() == (backend == "auto")
        runs[backend] = (info["dev_loss"], head.layer_weights(), head.out.weight.detach())
    (c_dev, c_weights, c_out), (t_dev, t_weights, t_out) = runs["auto"], runs["torch"]
    assert c_weights.argmax() == 1  # it found the layer that carries the labels
    # 30 AdamW steps apart only by float rounding (float32 sums in another order)
    assert abs(c_dev - t_dev) < 1e-4 * abs(t_dev)
    assert (c_weights - t_weights).abs().max() < 1e-4
    assert (c_out - t_out).abs().max() < 1e-3 * t_out.abs().max()


_FALLBACK = """
import logging, torch
from s3prl_laser.console import setup_console
setup_console(logging.INFO, "%(message)s")
from s3prl_laser.probe.head import ProbeHead, ctc_loss
torch.manual_seed(0)
feats = [torch.randn(3, 20, 8).half() for _ in range(3)]
head = ProbeHead(3, 8, 5)
print("in_c", head.in_c(), head.in_c())
print("loss", float(ctc_loss(head, feats, [[1, 2], [3], [4, 4]])))
"""


def test_without_a_compiler_the_head_runs_on_torch_and_says_so_once(tmp_path):
    env = {**os.environ, "S3PRL_LASER_HOME": str(tmp_path), "PATH": str(tmp_path), "CC": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "in_c False False" in proc.stdout
    warning = "probe: the head's C kernels are unavailable (no C compiler found (set $CC or install gcc)"
    assert (proc.stdout + proc.stderr).count(warning) == 1
    assert "Traceback" not in proc.stderr
    with_c = subprocess.run(
        [sys.executable, "-c", _FALLBACK],
        env={**os.environ, "S3PRL_LASER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "in_c True True" in with_c.stdout
    loss = {p.stdout.split("loss ")[1].split()[0] for p in (proc, with_c)}
    a, b = (float(x) for x in sorted(loss)) if len(loss) == 2 else (float(loss.pop()),) * 2
    assert abs(a - b) < 1e-5 * abs(a)


def test_an_unwritable_kernel_folder_falls_back_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "S3PRL_LASER_HOME": str(blocker / "kernels")}
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "in_c False False" in proc.stdout
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "C kernels are unavailable" in line]
    assert len(lines) == 1 and f"cannot write compiled kernels into {blocker / 'kernels'}" in lines[0], lines
    assert "set $S3PRL_LASER_HOME to a writable folder" in lines[0]


def test_the_gpu_path_s_padded_mix_equals_the_c_kernel_and_its_gradient():
    from s3prl_laser.probe.head import padded_mix

    g = torch.Generator().manual_seed(4)
    clips = [torch.randn(6, f, 40, generator=g).half() for f in (33, 20, 51)]
    w = torch.softmax(torch.randn(6, generator=g), 0).requires_grad_()
    mixed = padded_mix(w, clips)
    assert torch.allclose(mixed.detach(), kernels.mix_forward(w.detach(), tuple(clips)), rtol=1e-5, atol=1e-5)
    up = torch.randn(mixed.shape, generator=g)
    (grad,) = torch.autograd.grad((mixed * up).sum(), w)
    assert torch.allclose(grad, kernels.mix_backward(tuple(clips), up), rtol=1e-4, atol=1e-4)


def test_features_copied_into_one_device_tensor_read_back_the_same(tmp_path):
    from s3prl_laser.probe.features import CACHE_VERSION, DeviceStore, FeatureWriter, Rows, on_device, release

    g = torch.Generator().manual_seed(6)
    clips = [torch.randn(3, f, 8, generator=g) for f in (5, 9, 2, 7)]
    writer = FeatureWriter(tmp_path / "f.f16", len(clips), {"version": CACHE_VERSION})
    for i, clip in enumerate(clips):
        writer.write(i, clip)
    store = writer.finish()
    assert on_device(store, torch.device("cpu")) is store  # the CPU reads the memory-mapped file
    DeviceStore.CHUNK = 50  # several chunks, one ending inside a clip
    try:
        copied = DeviceStore(store, torch.device("cpu"))
    finally:
        DeviceStore.CHUNK = 1 << 27
    assert len(copied) == len(store)
    for i, clip in enumerate(clips):
        assert torch.equal(copied[i], clip.half()) and torch.equal(copied[i], store[i])
    release(Rows(copied, [0, 1]))  # nothing to give back: no error
    with pytest.raises(IndexError):
        copied[4]
