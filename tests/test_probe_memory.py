"""The probe's resident memory does not grow with the features: a store larger than the bound, trained on
and decoded whole, scaled down (tiny clips, a bound of 40 MB against 128 MB of features).

The head runs in a child process that reports its peak resident set size (``VmHWM``) after a
warm-up step and at the end; the same child then holds every clip in memory at once, to show the
measurement sees features that are resident.
"""

import json
import subprocess
import sys

import torch

from s3prl_laser.probe.features import FeatureWriter

CLIPS, LAYERS, FRAMES, DIM = 320, 5, 400, 100  # 400 kB of float16 per clip, 128 MB in all
BOUND_MB = 40

CHILD = r"""
import json, sys
import torch
from s3prl_laser.probe.decode import decode_all
from s3prl_laser.probe.features import Rows, open_store
from s3prl_laser.probe.head import HeadSettings, train_head

def peak_mb():
    # VmHWM: this process' own peak. getrusage's ru_maxrss is carried over fork and exec, so a child of a
    # large pytest process would report its parent's size from the start.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

torch.set_num_threads(1)
store = open_store(__import__("pathlib").Path(sys.argv[1]), int(sys.argv[2]))
g = torch.Generator().manual_seed(0)
targets = [torch.randint(1, 12, (40,), generator=g).tolist() for _ in range(len(store))]
rows = list(range(len(store)))
settings = HeadSettings(steps=1, batch_size=8, lr=1e-2, eval_every=1, patience=1)
train_head(Rows(store, rows[:16]), targets[:16], Rows(store, rows[16:24]), targets[16:24], 12, settings)
start = peak_mb()  # imports, the first step's allocations
settings = HeadSettings(steps=40, batch_size=8, lr=1e-2, eval_every=20, patience=2)
head, _ = train_head(Rows(store, rows), targets, Rows(store, rows[:40]), targets[:40], 12, settings)
hypotheses = decode_all(head, Rows(store, rows), 8, torch.device("cpu"))  # every clip read
assert len(hypotheses) == len(store)
trained = peak_mb()
held = [store[i].clone() for i in rows]  # what the probe did before: every clip in memory
print(json.dumps({"start": start, "trained": trained, "held": peak_mb()}))
"""


def test_resident_memory_stays_bounded_with_features_larger_than_the_bound(tmp_path):
    path = tmp_path / "store.f16"
    writer = FeatureWriter(path, CLIPS, {"version": 2})
    g = torch.Generator().manual_seed(0)
    for i in range(CLIPS):
        writer.write(i, torch.randn(LAYERS, FRAMES, DIM, generator=g))
    writer.finish()
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 3 * BOUND_MB
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(CLIPS)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"features {size_mb:.0f} MB; peak resident MB: {peaks}")
    assert peaks["trained"] - peaks["start"] < BOUND_MB
    assert peaks["held"] - peaks["trained"] > 0.8 * size_mb  # the measurement sees resident features
