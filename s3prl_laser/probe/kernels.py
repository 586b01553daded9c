"""The probe head's CPU kernels (``head_cpu.c``): the layer mix and the CTC loss, on CPU threads.

On the CPU, a head step is two passes over about 200 MB of float16 features (the weighted sum of the layers
and its gradient) and a CTC loss over 16 clips of about 600 frames. ``head_cpu.c`` does both in C:

- :func:`mix_forward` / :func:`mix_backward`: ``sum_l w[l] * clip[l]`` and the gradient of ``w``, reading
  each float16 value once per pass and converting it in registers (no float32 copy of the batch);
- :func:`ctc`: the CTC negative log-likelihood per clip and its gradient with respect to the
  log-probabilities, by the forward-backward recursions in log space (the formulas are in ``head_cpu.c``),
  with the log-sum-exp vectorised.

The clips of a call are split into contiguous groups of about equal frames, one per
``torch.get_num_threads()`` thread; each clip's arithmetic is sequential and the groups' results are put
together in a fixed order, so the same inputs give the same bits whatever the thread count.

Compiled on first use by :mod:`s3prl_laser.cbuild`. Without a C compiler, :func:`available` is false, and
the head runs on torch's CPU operations instead (the same numbers to float rounding, about three times
slower); it says so once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from s3prl_laser import cbuild
from s3prl_laser.cbuild import address

logger = logging.getLogger("s3prl_laser.probe")

SOURCE = Path(__file__).with_name("head_cpu.c")
_FUNCTIONS = ("mix_forward_f16", "mix_forward_f32", "mix_backward_f16", "mix_backward_f32", "ctc_batch")
_SUFFIX = {torch.float16: "f16", torch.float32: "f32"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def load_library() -> ctypes.CDLL:
    """Compile (once per source and CPU) and load the kernels; raises :class:`cbuild.KernelBuildError`."""
    global _library
    with _lock:
        if _library is None:
            path = cbuild.build(
                SOURCE,
                [[]],
                "the probe head's CPU kernels",
                "the probe head then runs on torch's CPU operations",
            )
            _library = cbuild.load(path, _FUNCTIONS)
    return _library


def available() -> bool:
    """Whether the kernels can run here; the first failure is logged once (a warning), then remembered."""
    global _failure
    if _library is not None:
        return True
    if _failure is not None:
        return False
    try:
        load_library()
        return True
    except cbuild.KernelBuildError as err:
        _failure = str(err)
        logger.warning(
            "probe: the head's C kernels are unavailable (%s); its steps are about three times slower",
            _failure,
        )
        return False


def _groups(sizes: list[int]) -> list[range]:
    """Contiguous ranges of ``sizes``' indices, one per thread, of about equal total size."""
    count = max(1, min(torch.get_num_threads(), len(sizes)))
    total, bounds, running = sum(sizes), [0], 0
    for i, size in enumerate(sizes):
        running += size
        if len(bounds) < count and running >= total * len(bounds) / count:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _checked(clips: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out = []
    for clip in clips:
        if clip.dtype not in _SUFFIX or clip.device.type != "cpu":
            raise ValueError(
                f"probe kernels: a clip of {clip.dtype} on {clip.device}; float16 or float32 "
                "on the CPU expected"
            )
        out.append(clip if clip.is_contiguous() else clip.contiguous())
    return out


def _each_clip(function: str, clips: list[torch.Tensor], operand, out) -> None:
    """``<function>_<dtype>(clip, L, F, C, operand(i), out(i))`` for every clip ``i``, the clips split over
    the threads."""
    library = load_library()
    layers, dim = clips[0].shape[0], clips[0].shape[2]

    def work(group: range) -> None:
        for i in group:
            clip = clips[i]
            getattr(library, f"{function}_{_SUFFIX[clip.dtype]}")(
                address(clip), ctypes.c_int64(layers), ctypes.c_int64(clip.shape[1]), ctypes.c_int64(dim),
                address(operand(i)), address(out(i)),
            )  # fmt: skip

    cbuild.run_parallel([(work, group) for group in _groups([c.shape[1] for c in clips])])


def mix_forward(weights: torch.Tensor, clips: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[B, F_max, C]`` float32: clip ``i``'s ``sum_l weights[l] * clip[l]`` in rows ``:F_i``, then zeros."""
    clips = _checked(clips)
    w = weights.detach().float().contiguous()
    out = torch.empty(len(clips), max(c.shape[1] for c in clips), clips[0].shape[2])  # rows written once
    for i, clip in enumerate(clips):
        out[i, clip.shape[1] :] = 0.0  # padding rows
    _each_clip("mix_forward", clips, lambda i: w, lambda i: out[i])
    return out


def mix_backward(clips: tuple[torch.Tensor, ...], grad: torch.Tensor) -> torch.Tensor:
    """``[L]`` float32: ``sum_i sum_{f < F_i, c} clip_i[l, f, c] * grad[i, f, c]``."""
    clips = _checked(clips)
    grad = grad.float().contiguous()
    per_clip = torch.zeros(len(clips), clips[0].shape[0])
    _each_clip("mix_backward", clips, lambda i: grad[i], lambda i: per_clip[i])
    return per_clip.sum(0)


def ctc(
    log_probs: torch.Tensor,
    frames: list[int],
    targets: list[list[int]],
    blank: int = 0,
    with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CTC of each clip of ``log_probs [B, T_max, V]`` (float32, on the CPU; clip ``b``'s first ``frames[b]``
    rows) against ``targets[b]``: (negative log-likelihood ``[B]`` float64, whether an alignment exists
    ``[B]`` bool, gradient of each clip's negative log-likelihood with respect to ``log_probs``; zero where
    no alignment exists and in the padding rows; None without ``with_grad``, which skips the backward
    recursion). A clip whose log-probabilities are not all finite gets NaN in both, as with torch's
    ``ctc_loss``: a diverged head shows as a NaN loss, never as a plausible number."""
    library = load_library()
    lp = log_probs.detach().float().contiguous()
    batch, t_max, vocab = lp.shape
    if len(frames) != batch or len(targets) != batch or max(frames) > t_max:
        raise ValueError(
            f"probe ctc: {batch} clips of {t_max} frames, {len(frames)} frame counts (max "
            f"{max(frames)}) and {len(targets)} target sequences"
        )
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.int64)
    if len(flat) and not (int(flat.min()) >= 0 and int(flat.max()) < vocab):
        raise ValueError(f"probe ctc: target labels must lie in [0, {vocab})")
    offsets = torch.tensor(
        [0, *torch.tensor([len(s) for s in targets]).cumsum(0).tolist()], dtype=torch.int64
    )
    count = torch.tensor(frames, dtype=torch.int64)
    grad = torch.zeros_like(lp) if with_grad else None
    nll = torch.zeros(batch, dtype=torch.float64)
    feasible = torch.zeros(batch, dtype=torch.int64)
    stride = t_max * vocab
    calls = []
    for group in _groups(frames):
        a = group.start
        calls.append(
            (
                library.ctc_batch,
                ctypes.c_int64(len(group)),
                address(lp, a * stride),
                ctypes.c_int64(stride),
                ctypes.c_int64(vocab),
                address(count, a),
                address(flat) if len(flat) else ctypes.c_void_p(0),
                address(offsets, a),
                ctypes.c_int64(blank),
                address(grad, a * stride) if with_grad else ctypes.c_void_p(0),
                address(nll, a),
                address(feasible, a),
            )
        )
    cbuild.run_parallel(calls)
    if (feasible < 0).any():
        raise MemoryError(f"probe ctc: no memory for the work space of a clip of {t_max} frames")
    finite = torch.stack([lp[b, : frames[b]].isfinite().all() for b in range(batch)])
    if not finite.all():
        nll[~finite] = float("nan")
        if grad is not None:
            grad[~finite] = float("nan")
    return nll, feasible.bool(), grad
