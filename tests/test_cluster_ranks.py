"""Every rank stops together and trains alike: repeated stop signals, two torchrun "nodes" against one,
a world-size factor, a checkpoint that cannot be written. Processes are started for real (gloo on CPU)."""

import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_processes

from s3prl_laser.training import checkpoints

HERE = Path(__file__).resolve().parent
FAULTS = str(HERE / "cluster_faults.py")
FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-3", "eval_every=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def args(out, ckpt, data, *overrides) -> list[str]:
    return ["--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--device",
            "cpu", *FAST, *overrides]  # fmt: skip


def weights(out) -> dict:
    return torch.load(out / "hubert_laser.pt", weights_only=True)["model_weight"]


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, FAULTS]


@pytest.mark.fault_injection
@pytest.mark.slow
def test_a_signal_sent_twice_in_the_middle_of_a_step_saves_no_further_step_and_resumes_bit_identically(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    """SIGINT inside step 3's loss (steps of 2 micro-batches), and again while the checkpoint is agreed. In
    micro-batch 1 of 2: step 3 is dropped unfinished and step 2 is saved; in micro-batch 2 of 2: step 3 is
    agreed before its update and saved. Either way the exit is 130, no step 4 is trained, and ``--resume``
    ends with the weights of a run that was never stopped (dropout and all: the dropped step's RNG draws are
    undone)."""
    straight = tmp_path / "straight"
    run = functools.partial(warm_processes.run, capture_output=True, text=True, timeout=240)  # same threads
    keys = ("steps=5", "save_every=5", "grad_accum_steps=2")
    done = run([sys.executable, FAULTS, *args(straight, tiny_hubert_ckpt, demo_corpus, *keys)], env=ENV)
    assert done.returncode == 0, done.stderr
    for part, saved in ((1, 2), (2, 3)):
        stopped = tmp_path / f"stopped_in_{part}"
        cmd = [sys.executable, FAULTS, *args(stopped, tiny_hubert_ckpt, demo_corpus, *keys)]
        result = run(cmd, env={**ENV, "SIGNAL_TWICE": "INT", "SIGNAL_AT": "3", "SIGNAL_PART": str(part)})
        log = result.stdout + result.stderr
        assert result.returncode == 128 + signal.SIGINT, log
        assert "received signal 2 again" in log and "Traceback" not in log and "KeyboardInterrupt" not in log
        assert f"stopped by signal 2 at step {saved}; resume with --resume" in log, log
        assert ("the step is dropped unfinished" in log) == (part == 1), log
        assert [step for step, _ in checkpoints.list_checkpoints(stopped)] == [saved]
        resumed = run([sys.executable, FAULTS, "--out", str(stopped), "--resume"], env=ENV)
        assert resumed.returncode == 0, resumed.stderr
        a, b = weights(straight), weights(stopped)
        assert all(torch.equal(a[name], b[name]) for name in a), part


@pytest.mark.slow
def test_torchrun_sigterm_twice_on_every_rank_saves_then_exits_143(tmp_path, tiny_hubert_ckpt, demo_corpus):
    out = tmp_path / "ddp"
    cmd = torchrun("--standalone", "--nproc_per_node", "2")
    cmd += args(out, tiny_hubert_ckpt, demo_corpus, "steps=5", "save_every=5")
    env = {**ENV, "SIGNAL_TWICE": "TERM"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode: 143" in log, log  # torchrun calls 143 a failure
    assert "KeyboardInterrupt" not in log and 'training/loop.py", line' not in log, log  # no rank died
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING s3prl_laser.training.ranks: received signal 15 again" in log, log
    assert log.count("stopped by signal 15 at step 2") == 1  # rank 0's INFO line; rank 1 exits alike
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["step"] == 2 and len(state["rng"]) == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.fault_injection
@pytest.mark.slow
def test_two_nodes_train_like_one_node_and_like_one_process(tmp_path, demo_corpus):
    """Two torchrun "nodes" (one process each, rendezvous on 127.0.0.1) end with the very weights of one node
    of two processes; and 2 ranks x 2 pairs train like 1 process x 2 batches of the same 2 pairs (a gradient
    that forgot to divide by the world size would move the weights twice as far)."""
    from s3prl_laser.fixtures import build_tiny_hubert

    ckpt = build_tiny_hubert(
        tmp_path / "plain.pt", seed=0, extractor_mode="layer_norm", dropout=0.0, attention_dropout=0.0,
        encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
    )  # fmt: skip
    keys = ("steps=3", "save_every=3", "perturb_on=device", "speed_factors=[1.0]", "lr=30.0",
            "weight_decay=0.0")  # fmt: skip
    env = {**ENV, "LINEAR_ADAMW": "1"}
    one_node = subprocess.run(
        torchrun("--standalone", "--nproc_per_node", "2") + args(tmp_path / "one", ckpt, demo_corpus, *keys),
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert one_node.returncode == 0, one_node.stdout + one_node.stderr
    port = free_port()
    nodes = [
        subprocess.Popen(
            torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "laser",
                     "--rdzv_endpoint", f"127.0.0.1:{port}")
            + args(tmp_path / "two", ckpt, demo_corpus, *keys),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.equal(a[name], b[name]) for name in a)

    from s3prl_laser.finetune import main as finetune_main

    real_adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda *a, **k: real_adamw(*a, **{**k, "eps": 1e3})
    try:
        assert finetune_main(args(tmp_path / "alone", ckpt, demo_corpus, *keys, "grad_accum_steps=2")) == 0
    finally:
        torch.optim.AdamW = real_adamw
    c, base = weights(tmp_path / "alone"), torch.load(ckpt, weights_only=True)["model_weight"]
    moved = {n: a[n] - base[n] for n in a if not torch.equal(a[n], base[n])}
    largest = max(float(d.abs().max()) for d in moved.values())
    assert len(moved) > 10 and largest > 1e-5
    assert max(float((a[n] - c[n]).abs().max()) for n in a) <= 1e-3 * largest


@pytest.mark.fault_injection
@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_every_rank_at_once(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    out = tmp_path / "ddp"
    cmd = torchrun("--standalone", "--nproc_per_node", "2")
    cmd += args(out, tiny_hubert_ckpt, demo_corpus, "steps=3", "save_every=2", "dist_timeout_s=60")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**ENV, "FAIL_SAVE": "1"})
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "No space left on device (simulated)" in log  # rank 0: its traceback
    assert "[rank 1] ERROR s3prl_laser.finetune: error: 1 other process(es) failed while writing the " \
           "checkpoint of step 2" in log, log
