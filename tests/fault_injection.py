"""Run ``python -m s3prl_laser.finetune`` with a fault injected into rank 1 (used by test_user_errors.py).

    python tests/fault_injection.py WHERE WHAT CALL -- FINETUNE_ARGS...

WHERE: ``loss`` (inside ``LaserLoss.forward``, during the step's forward pass) or ``clip`` (in gradient
clipping, after the step's all-reduce); WHAT: ``error`` (raise ``RuntimeError``) or ``sigterm`` (the
process sends itself SIGTERM); CALL: which call on rank 1 (1-based) the fault hits. Other ranks run as is.
"""

import os
import signal
import sys

import torch

from s3prl_laser.finetune import main
from s3prl_laser.training import loop

where, what, at_call = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0


def fault() -> None:
    global calls
    calls += 1
    if os.environ.get("RANK") != "1" or calls != at_call:
        return
    if what == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise RuntimeError(f"injected fault in {where} on rank 1")


def wrap(owner, name: str) -> None:
    original = getattr(owner, name)

    def faulty(*args, **kwargs):
        fault()
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


if where == "loss":
    wrap(loop.LaserLoss, "forward")
else:
    wrap(torch.nn.utils, "clip_grad_norm_")
raise SystemExit(main(sys.argv[5:]))
