"""Run ``python -m s3prl_laser.finetune`` (alone or under torchrun) with faults set by environment variables
(used by test_cluster_ranks.py).

    python tests/cluster_faults.py FINETUNE_ARGS...

``SIGNAL_TWICE=INT|TERM``: every rank sends itself that signal as step ``SIGNAL_AT`` begins (default 2) and
again when that step's checkpoint is being agreed (in the ranks' weight check that opens every save).
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
    at, steps, real_step, real_check = int(os.environ.get("SIGNAL_AT", "2")), [], loop.train_step, None

    def signalling_step(*args, **kwargs):
        steps.append(1)
        result = real_step(*args, **kwargs)
        if len(steps) == at - 1:  # the first one, as step ``at`` begins (the trainer reads it then)
            os.kill(os.getpid(), signum)
        return result

    real_check = loop.check_ranks_in_sync

    def signalling_check(parts, env):
        if len(steps) == at:
            os.kill(os.getpid(), signum)  # the second one, while the checkpoint is agreed
        return real_check(parts, env)

    loop.train_step, loop.check_ranks_in_sync = signalling_step, signalling_check

if os.environ.get("FAIL_SAVE") == "1":

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    checkpoints.save_checkpoint = full_disk

raise SystemExit(main(sys.argv[1:]))
