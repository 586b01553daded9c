"""The probe's head and its training: SUPERB's softmax layer weights, then a linear CTC head.

``ProbeHead``: clips ``[L, F_i, C]`` (every hidden layer, as :func:`normalise_layers` left them) -> summed
with learnable softmax weights ``w [L]`` -> ``[B, F, C]`` -> a linear layer (or an MLP with ``hidden > 0``)
-> log-probabilities ``[B, F, V]`` over the vocabulary (index 0: CTC blank).

The weighted sum reads every layer of every clip of a batch, about 200 MB of float16 at base size, and the
CTC loss runs over 16 clips of about 600 frames. On the CPU both run on our C kernels (:mod:`.kernels`):
the float16 values are converted in registers, each read once per pass, so a step holds no float32 copy of
the batch; the CTC forward-backward runs in log space with vectorised log-sum-exp, the clips split over
the CPU's threads. With ``backend="torch"`` or no C compiler, torch's operations do the same on the CPU:
the sum clip by clip in float32, 32 frames at a time (converted into one reused buffer small enough to
stay in the CPU's cache, then a matrix-vector product; the backward pass converts them again), and torch's
``ctc_loss``. On a GPU the batch is padded once and summed by one einsum (:func:`padded_mix`: memory is
no concern there, kernel launches are), with torch's ``ctc_loss``, and the features are read from one
tensor on the GPU when they fit (:func:`.features.on_device`). Layer normalisation, when asked, is done
once per clip when the features are made (:func:`normalise_layers`), not at every step.

:func:`train_head` runs a fixed step budget of AdamW on seeded random batches of the training clips,
evaluates the CTC loss on a dev slice every ``eval_every`` steps and stops after ``patience`` evaluations
without improvement, keeping the best head. Same seed, same clips -> same numbers.

Example::

    >>> head, info = train_head(train_x, train_y, dev_x, dev_y, 29, HeadSettings())  # doctest: +SKIP
    >>> head.layer_weights()  # [L], sums to 1  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from s3prl_laser.probe import kernels
from s3prl_laser.probe.features import release

logger = logging.getLogger("s3prl_laser.probe")


@dataclass(frozen=True)
class HeadSettings:
    steps: int = 2000  # step budget
    batch_size: int = 16  # clips per step
    lr: float = 2e-3  # AdamW learning rate
    hidden: int = 0  # 0: linear head; > 0: one hidden layer of this width
    eval_every: int = 100  # dev-slice CTC loss every this many steps
    patience: int = 5  # stop after this many evaluations without a better dev loss
    seed: int = 0
    backend: str = "auto"  # ProbeHead's: "auto" (our C kernels on the CPU) or "torch"


def normalise_layers(clip: torch.Tensor) -> torch.Tensor:
    """``[L, F, C]`` -> each frame of each layer layer-normalised (no parameters), in float32, returned as
    ``clip``'s dtype: the per-layer normalisation, done once per clip."""
    return F.layer_norm(clip.float(), clip.shape[-1:]).to(clip.dtype)


CHUNK_FRAMES = 32  # frames converted to float32 at a time: 13 layers x 32 x 768 x 4 B = 1.3 MB, cache-sized


class _LayerMix(torch.autograd.Function):
    """``sum_l w[l] * clip[l]`` per clip, padded to ``[B, F_max, C]`` float32; gradient for ``w`` only.

    ``in_c``: the C kernels (:mod:`.kernels`, on the CPU); otherwise torch's operations on a reused float32
    chunk buffer ``scratch``."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, in_c: bool, scratch: torch.Tensor, *clips: torch.Tensor):
        ctx.clips, ctx.scratch, ctx.in_c = clips, scratch, in_c
        if in_c:
            return kernels.mix_forward(weights, clips)
        out = weights.new_zeros(len(clips), max(c.shape[1] for c in clips), clips[0].shape[2])
        with _one_cpu_thread(weights.device):
            for i, clip in enumerate(clips):
                for start, flat in _float32_chunks(clip, scratch):  # [L, n * C]
                    rows = out[i, start : start + flat.shape[1] // clip.shape[2]]
                    torch.mv(flat.t(), weights, out=rows.view(-1))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unused = [None] * (len(ctx.clips) + 2)
        if ctx.in_c:
            return kernels.mix_backward(ctx.clips, grad), *unused
        grad_w = grad.new_zeros(ctx.clips[0].shape[0])
        with _one_cpu_thread(grad.device):
            for i, clip in enumerate(ctx.clips):
                for start, flat in _float32_chunks(clip, ctx.scratch):
                    rows = grad[i, start : start + flat.shape[1] // clip.shape[2]]
                    grad_w.addmv_(flat, rows.reshape(-1))
        return grad_w, *unused


class _Ctc(torch.autograd.Function):
    """Mean over clips of each clip's CTC negative log-likelihood over its target length (at least 1), as
    torch's ``ctc_loss(reduction="mean", zero_infinity=True)``, by the C kernel (:func:`.kernels.ctc`)."""

    @staticmethod
    def forward(ctx, log_probs: torch.Tensor, frames: list[int], targets: list[list[int]]) -> torch.Tensor:
        nll, feasible, grad = kernels.ctc(log_probs, frames, targets, with_grad=ctx.needs_input_grad[0])
        scale = 1.0 / (torch.tensor([max(len(t), 1) for t in targets], dtype=torch.float64) * len(targets))
        if grad is not None:
            ctx.save_for_backward(grad, scale.float())
        return (torch.where(feasible, nll, 0.0) * scale).sum().to(log_probs.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad, scale = ctx.saved_tensors
        return grad * (scale * grad_out).view(-1, 1, 1), None, None


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the many small chunk operations on one CPU thread: each would otherwise start and join a team of
    threads, which costs more than the chunk itself, and far more when other jobs share the cores."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _float32_chunks(clip: torch.Tensor, scratch: torch.Tensor):
    """``(first frame, [L, n * C] float32)`` for chunks of ``CHUNK_FRAMES`` frames of ``clip [L, F, C]``,
    each converted into the head's reused buffer ``scratch`` (float32 clips are viewed, not copied)."""
    layers, frames, dim = clip.shape
    for start in range(0, frames, CHUNK_FRAMES):
        part = clip[:, start : start + CHUNK_FRAMES]
        if clip.dtype == torch.float32 and part.is_contiguous():
            yield start, part.reshape(layers, -1)
            continue
        flat = scratch[: part.numel()].view(layers, part.shape[1], dim)
        flat.copy_(part)
        yield start, flat.view(layers, -1)


def padded_mix(weights: torch.Tensor, clips: list[torch.Tensor]) -> torch.Tensor:
    """``sum_l w[l] * clip[l]`` of every clip at once: ``[B, L, F_max, C]`` zero-padded, in float32, one
    einsum (the head's path on a GPU; its gradient is autograd's)."""
    x = clips[0].new_zeros(len(clips), clips[0].shape[0], max(c.shape[1] for c in clips), clips[0].shape[2])
    for i, clip in enumerate(clips):
        x[i, :, : clip.shape[1]] = clip
    return torch.einsum("l,blfc->bfc", weights, x.float())


BACKENDS = ("auto", "torch")


class ProbeHead(nn.Module):
    """``backend``: ``"auto"`` runs the layer mix and the CTC loss on our C kernels on the CPU (when they
    build; torch's operations otherwise and on a GPU), ``"torch"`` on torch's operations always."""

    def __init__(
        self, layers: int, dim: int, vocab_size: int, hidden: int = 0, backend: str = "auto"
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"ProbeHead: backend={backend!r}; expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.weights = nn.Parameter(torch.zeros(layers))  # softmax -> uniform at start, as SUPERB
        self.out = (
            nn.Linear(dim, vocab_size)
            if hidden == 0
            else nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, vocab_size))
        )
        self._scratch = torch.empty(0)  # a chunk of a clip in float32, reused (not part of the state)

    def layer_weights(self) -> torch.Tensor:
        """The softmax layer weights ``[L]``."""
        return F.softmax(self.weights.detach(), dim=0)

    def forward(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``clips`` ``[L, F_i, C]`` -> (log-probabilities ``[B, F_max, V]``, frames ``[B]``)."""
        device = self.weights.device
        clips = [c.to(device, non_blocking=True) for c in clips]
        need = clips[0].shape[0] * CHUNK_FRAMES * clips[0].shape[2]
        if device.type == "cpu" and (self._scratch.numel() < need or self._scratch.device != device):
            self._scratch = torch.empty(need, device=device)
        weights = F.softmax(self.weights, dim=0)
        if device.type == "cpu":
            mixed = _LayerMix.apply(weights, self.in_c(), self._scratch, *clips)
        else:  # a GPU: the batch padded once, one einsum (memory is no concern there, kernel launches are)
            mixed = padded_mix(weights, clips)
        frames = torch.tensor([c.shape[1] for c in clips])
        return F.log_softmax(self.out(mixed), dim=-1), frames

    def in_c(self) -> bool:
        """Whether this head's steps run on the C kernels (:mod:`.kernels`)."""
        return self.backend == "auto" and self.weights.device.type == "cpu" and kernels.available()


def ctc_loss(
    head: ProbeHead, feats: list[torch.Tensor], targets: list[list[int]], device: torch.device | None = None
) -> torch.Tensor:
    """Mean CTC loss (per target symbol) of a batch of clips (``device``: unused, the head's is used)."""
    log_probs, frames = head(list(feats))
    if head.in_c():
        return _Ctc.apply(log_probs, frames.tolist(), [list(t) for t in targets])
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in targets])
    return F.ctc_loss(
        log_probs.transpose(0, 1), flat, frames, lengths, blank=0, reduction="mean", zero_infinity=True
    )


@torch.no_grad()
def dev_loss(
    head: ProbeHead,
    feats: list[torch.Tensor],
    targets: list[list[int]],
    batch_size: int,
    device: torch.device,
) -> float:
    losses = []
    for i in range(0, len(feats), batch_size):
        rows = range(i, min(i + batch_size, len(feats)))
        loss = ctc_loss(head, [feats[j] for j in rows], [targets[j] for j in rows], device)
        losses.append(float(loss) * len(rows))
        release(feats)
    return sum(losses) / len(feats)


def train_head(
    train_x: list[torch.Tensor],
    train_y: list[list[int]],
    dev_x: list[torch.Tensor],
    dev_y: list[list[int]],
    vocab_size: int,
    settings: HeadSettings,
    device: torch.device | None = None,
    desc: str = "head",
) -> tuple[ProbeHead, dict]:
    """Train a head on ``train_x`` (``[L, F, C]`` each) with targets ``train_y``; early stopping on ``dev_x``.

    Returns the head with the best dev-slice loss and ``{"steps", "best_step", "dev_loss"}``.
    """
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = ProbeHead(
            train_x[0].shape[0], train_x[0].shape[2], vocab_size, settings.hidden, settings.backend
        ).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr)
    best = (float("inf"), 0, copy.deepcopy(head.state_dict()))
    waited, step = 0, 0
    with tqdm(total=settings.steps, desc=desc, unit="step", leave=False, disable=None) as bar:
        for step in range(1, settings.steps + 1):
            pick = torch.randint(
                len(train_x), (min(settings.batch_size, len(train_x)),), generator=generator
            ).tolist()
            loss = ctc_loss(head, [train_x[i] for i in pick], [train_y[i] for i in pick], device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            del loss  # the graph, and with it the clips of this step
            release(train_x)  # a memory-mapped store: this step's pages leave the process
            bar.update(1)
            if step % settings.eval_every == 0 or step == settings.steps:
                current = dev_loss(head, dev_x, dev_y, settings.batch_size, device)
                bar.set_postfix(dev_loss=f"{current:.3f}")
                if current < best[0]:
                    best, waited = (current, step, copy.deepcopy(head.state_dict())), 0
                else:
                    waited += 1
                    if waited >= settings.patience:
                        break
    head.load_state_dict(best[2])
    return head, {"steps": step, "best_step": best[1], "dev_loss": best[0]}
