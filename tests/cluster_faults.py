"""Run ``python -m s3prl_laser.finetune`` (alone or under torchrun) with faults set by environment variables
(used by test_cluster_ranks.py).

    python tests/cluster_faults.py FINETUNE_ARGS...

``SIGNAL_TWICE=INT|TERM``: every rank sends itself that signal in the middle of step ``SIGNAL_AT`` (default
2), inside the loss of its micro-batch ``SIGNAL_PART`` (default 1), and again when the checkpoint is being
agreed (in the ranks' weight check that opens every save).
``FAIL_SAVE=1``: writing a checkpoint fails as on a full disk (``OSError``).
``LINEAR_ADAMW=1``: AdamW with ``eps=1e3`` (its update linear in the gradient).
"""

import functools
import os
import signal
import sys

import torch

from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints, loop

if os.environ.get("LINEAR_ADAMW") == "1":
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, eps=1e3)

if "SIGNAL_TWICE" in os.environ:
    signum = getattr(signal, "SIG" + os.environ["SIGNAL_TWICE"])
    at, part = int(os.environ.get("SIGNAL_AT", "2")), int(os.environ.get("SIGNAL_PART", "1"))
    steps, losses = [], []
    real_step, real_loss, real_check = loop.train_step, loop.pair_loss, loop.check_ranks_in_sync

    def counting_step(*args, **kwargs):
        steps.append(1)
        losses.clear()
        return real_step(*args, **kwargs)

    def signalling_loss(*args, **kwargs):
        losses.append(1)
        if len(steps) == at and len(losses) == part:
            os.kill(os.getpid(), signum)  # the first one, inside micro-batch ``part`` of step ``at``
        return real_loss(*args, **kwargs)

    def signalling_check(parts, env):
        if len(steps) >= at:
            os.kill(os.getpid(), signum)  # the second one, while the checkpoint is agreed
        return real_check(parts, env)

    loop.train_step, loop.pair_loss, loop.check_ranks_in_sync = (
        counting_step, signalling_loss, signalling_check
    )

if os.environ.get("FAIL_SAVE") == "1":

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    checkpoints.save_checkpoint = full_disk

raise SystemExit(main(sys.argv[1:]))
