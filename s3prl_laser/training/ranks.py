"""The process a fine-tuning run lives in: its rank and device under torchrun, logging, stop signals.

``setup_distributed`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``join_process_group`` joins
the process group (NCCL on GPU, gloo on CPU) with the config's ``dist_timeout_s``; a plain ``python -m``
run is rank 0 of 1 and every collective here is then a no-op. Work that one rank does while the others
wait (writing a checkpoint, validating, building the length index) runs through :func:`run_together`, so
that its failure reaches every rank at once instead of leaving them in the next collective.
``StopSignals`` turns SIGINT/SIGTERM into "stop at the next micro-batch or the end of this step" so that a
checkpoint is written before exiting, without training one more step.

Example::

    >>> env = setup_distributed("cpu")
    >>> env.is_main, env.distributed, agree(env, [1.0, 2.0])
    (True, False, [1.0, 2.0])
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch

from s3prl_laser.console import setup_console
from s3prl_laser.errors import UserInputError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class PeerFailure(RuntimeError):
    """Another process of the run failed (it prints its own traceback); this one stops at the same step."""


def setup_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and pick the device; the process group is
    joined once the config is known (:func:`join_process_group`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, world_size, local_rank, resolve_device(device, local_rank))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    return env


def join_process_group(env: DistEnv, timeout_s: float) -> None:
    """Join the run's process group (NCCL on GPU, gloo on CPU; nothing on one process).

    ``timeout_s`` (config ``dist_timeout_s``) bounds every collective: a rank that waits longer for the
    others (one hangs, or died where it could not tell them) fails instead of waiting for ever. NCCL's
    asynchronous error handling is switched on (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` unless set), so
    that a timed-out or failed NCCL collective ends the process rather than leaving it in the watchdog.
    """
    if not env.distributed or torch.distributed.is_initialized():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` as a ``torch.device``: cuda when available if None; ``cuda`` is ``cuda:LOCAL_RANK``.

    Raises ``UserInputError`` naming ``--device`` for a name torch does not know or a GPU that is not there.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        device = f"cuda:{local_rank}"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        raise UserInputError(
            f"--device {device}: {torch.cuda.device_count()} CUDA GPU(s) visible to this process; "
            "use --device cpu, or one process per GPU under torchrun"
        )
    return resolved


def teardown_distributed(env: DistEnv, wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (every rank finished normally): first wait until all ranks
    are here, so that no rank tears its connections down while another still uses them (rank 0 writing the
    last files): a rank that left early could otherwise abort in gloo's teardown ("terminate called without an
    active exception") and fail a run whose work was done. After a failure no rank waits."""
    if env.distributed and torch.distributed.is_initialized():
        if wait_for_peers:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def setup_logging(env: DistEnv) -> None:
    """INFO on rank 0, warnings only on the other ranks (skipped files are reported by every rank).

    Other libraries' chatter goes to DEBUG (see :mod:`s3prl_laser.console`; ``S3PRL_LASER_LOG=debug``).
    """
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = f"[rank {env.rank}] " if env.distributed else ""
    setup_console(level, fmt=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop: the step in progress drops its remaining micro-batches
    (and then the step) or, if its last micro-batch is running, ends with its update; a checkpoint follows.

    ``signum`` is the signal received by this process (None until one comes); the training loop reads it
    before each micro-batch, and the ranks agree on it in the step's all-reduce (see :func:`stop_flags`).
    Repeated signals (torchrun and SLURM signal every process, often twice; an impatient Ctrl-C) are logged
    and change nothing: the checkpoint is still agreed and written by every rank, then the process exits
    ``128 + signum`` (a SIGTERM among them wins). SIGKILL (or SIGQUIT) is the way to end a process at once.
    Handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # never raise here: it would abort the save that the first one asked for
            self.signum = max(self.signum, signum)
            logger.warning("received signal %d again: still saving this step's checkpoint, then exit", signum)
            return
        self.signum = signum
        logger.warning("received signal %d: saving a checkpoint at the next micro-batch, then exit", signum)

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def stop_flags(signum: int | None) -> list[float]:
    """One flag per signal of ``STOP_SIGNALS``: 1.0 for the one received; summed over ranks by ``agree``."""
    return [float(signum == candidate) for candidate in STOP_SIGNALS]


def agreed_stop(flags: list[float]) -> int | None:
    """The signal the run stops for, from ``stop_flags`` summed over ranks (SIGTERM wins over SIGINT)."""
    received = [int(candidate) for candidate, count in zip(STOP_SIGNALS, flags, strict=True) if count > 0]
    return max(received) if received else None


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops them cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def agree(env: DistEnv, values: list[float]) -> list[float]:
    """Sum ``values`` over all ranks (identity on one process)."""
    if not env.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    try:
        torch.distributed.all_reduce(tensor)
    except RuntimeError as error:  # the backend lost a peer: it failed (and printed why) or was killed
        raise _lost_peer(error) from None
    return tensor.tolist()


def run_together(env: DistEnv, what: str, work: Callable[[], T]) -> T:
    """Run ``work()`` on this rank (it may do nothing on some ranks), then agree with every rank whether it
    failed anywhere, so that no rank is left waiting in a later collective for one that failed.

    The rank whose ``work`` raised re-raises its exception (traceback kept); the others raise
    :class:`PeerFailure` naming ``what``. On one process this is ``work()``.
    """
    if not env.distributed:
        return work()
    result, error = None, None
    try:
        result = work()
    except Exception as exc:  # reported to the others before it is raised here
        error = exc
    (failed,) = agree(env, [float(error is not None)])
    if error is not None:
        raise error
    if failed:
        raise PeerFailure(f"{int(failed)} other process(es) failed while {what}; see their message")
    return result


def decided_by_rank0(
    env: DistEnv, what: str, work: Callable[[], T], refusal: type[Exception] = UserInputError
) -> T | None:
    """Run ``work()`` on rank 0 alone and return its result there (None on the other ranks).

    A ``refusal`` it raises (a user's mistake, one line) is raised with the same message on every rank; any
    other failure keeps its traceback on rank 0 and reaches the others as :class:`PeerFailure` naming
    ``what``, so that no rank waits in a later collective for one that failed. On one process a refusal is
    raised the same way, anything else as it is.
    """
    result, message, failed = None, None, None
    if env.is_main:
        try:
            result = work()
        except refusal as raised:
            message = str(raised)
        except Exception as raised:  # a bug or a storage fault: its traceback here, a one-liner elsewhere
            if not env.distributed:
                raise
            failed = raised
    message, crashed = broadcast_object(env, (message, failed is not None))
    if failed is not None:
        raise failed
    if crashed:
        raise PeerFailure(f"rank 0 failed while {what}; see its traceback")
    if message is not None:
        raise refusal(message)
    return result


def barrier(env: DistEnv) -> None:
    if env.distributed:
        try:
            torch.distributed.barrier()
        except RuntimeError as error:
            raise _lost_peer(error) from None


def broadcast_object(env: DistEnv, value):
    """Rank 0's ``value`` (any picklable object) on every rank (identity on one process)."""
    if not env.distributed:
        return value
    box = [value]
    try:
        torch.distributed.broadcast_object_list(box, src=0)
    except RuntimeError as error:
        raise _lost_peer(error) from None
    return box[0]


def flat_gradients(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Every gradient (zeros where there is none) in one flat tensor, for :func:`average_gradients`."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def average_gradients(
    env: DistEnv, params: list[torch.nn.Parameter], flat: torch.Tensor, total: float
) -> None:
    """Sum ``flat`` (from :func:`flat_gradients`) over all ranks in one all-reduce and divide it by ``total``
    (the step's pairs on all ranks: gradients hold per-rank loss SUMS); each gradient becomes a view of it."""
    try:
        torch.distributed.all_reduce(flat)
    except RuntimeError as error:
        raise _lost_peer(error) from None
    flat /= total
    for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = chunk.view_as(p)


def _lost_peer(error: RuntimeError) -> PeerFailure:
    return PeerFailure(f"lost contact with another process, which failed or was killed ({error})")
