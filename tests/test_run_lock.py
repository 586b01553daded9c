"""One writer per run folder: real processes racing for one ``--out`` (an ``sbatch`` typed twice, a requeued
``--resume`` beside the live job), and a holder killed with SIGKILL whose lock must not block the next run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import warm_processes

from s3prl_laser.training import checkpoints
from s3prl_laser.training.runlock import LOCK_NAME

FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-3"]
REFUSED = re.compile(
    r"(?m)error: --out (\S+) is in use by another run \(host [^,]+, pid (\d+), SLURM job (\S+), since "
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; lock file \S+\): wait for it to end, or choose another --out$"
)


def command(out, ckpt, data, *keys):
    args = ["-m", "s3prl_laser.finetune", "--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(data)]
    return [sys.executable, *args, "--out", str(out), *FAST, *keys]


def start(cmd, job):
    env = {**os.environ, "SLURM_JOB_ID": job}
    return warm_processes.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert condition(), process.communicate(timeout=60)[0] if process.poll() is not None else "timed out"


def refusal(log: str) -> re.Match:
    lines = [line for line in log.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in log, log
    match = REFUSED.search(lines[0])
    assert match is not None, lines[0]
    return match


def test_two_new_runs_started_at_once_into_one_out_one_trains_the_other_exits_2(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    """Both start with an empty ``--out``: the folder check alone let both train and write. Each would train
    for ever, so the one that stops stopped because of the other, which still holds the lock."""
    out = tmp_path / "run"
    cmd = command(out, tiny_hubert_ckpt, demo_corpus, "steps=100000", "save_every=100000", "eval_every=0")
    processes = [start(cmd, "1001"), start(cmd, "1002")]
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        stopped = [p for p in processes if p.poll() is not None]
        assert len(stopped) == 1, "after 240 s both runs still train in one --out"
        [loser], [winner] = stopped, [p for p in processes if p is not stopped[0]]
        log = loser.communicate(timeout=60)[0]
        assert loser.returncode == 2, log
        match = refusal(log)
        assert int(match.group(2)) == winner.pid, log
        assert match.group(3) == ("1001" if winner is processes[0] else "1002")
        assert winner.poll() is None  # the run that holds the folder goes on
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        logs = [process.communicate(timeout=120)[0] for process in processes]
    assert winner.returncode == 128 + signal.SIGTERM, logs
    assert checkpoints.latest_checkpoint(out) is not None  # the winner's, saved on SIGTERM
    assert not (out / LOCK_NAME).exists()  # a run that ends removes its lock file


def test_resume_beside_a_live_run_exits_2_naming_it_and_leaves_its_checkpoints(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    out = tmp_path / "run"
    live = start(command(out, tiny_hubert_ckpt, demo_corpus, "steps=100000", "save_every=1"), "2001")
    try:
        wait_for(lambda: len(checkpoints.list_checkpoints(out)) >= 1, live)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == live.pid and holder["slurm_job"] == "2001"
        second = warm_processes.run(
            [sys.executable, "-m", "s3prl_laser.finetune", "--out", str(out), "--resume"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "SLURM_JOB_ID": "2002"},
        )  # fmt: skip
        assert second.returncode == 2, second.stdout + second.stderr
        match = refusal(second.stdout + second.stderr)
        assert int(match.group(2)) == live.pid and match.group(3) == "2001"
        assert live.poll() is None  # the live run goes on
    finally:
        live.send_signal(signal.SIGTERM)
        log = live.communicate(timeout=120)[0]
    assert live.returncode == 128 + signal.SIGTERM, log
    steps = [step for step, _ in checkpoints.list_checkpoints(out)]
    assert steps and all(checkpoints.load_checkpoint(path)["step"] == step
                         for step, path in checkpoints.list_checkpoints(out))  # fmt: skip


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, tiny_hubert_ckpt, demo_corpus):
    out = tmp_path / "run"
    dead = start(command(out, tiny_hubert_ckpt, demo_corpus, "steps=100000", "save_every=1"), "3001")
    wait_for(lambda: len(checkpoints.list_checkpoints(out)) >= 1, dead)
    dead.kill()  # SIGKILL: no handler runs, the lock file stays behind naming the dead process
    dead.communicate(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead.pid
    step = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))["step"]
    result = warm_processes.run(
        [sys.executable, "-m", "s3prl_laser.finetune", "--out", str(out), "--resume", f"steps={step + 1}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert f"taking over the lock of a run that ended (host {socket.gethostname()}, pid {dead.pid}, " in log
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))["step"] == step + 1
    assert not (out / LOCK_NAME).exists()


@pytest.mark.fault_injection
def test_torchrun_refused_by_a_held_lock_exits_2_on_every_rank(tmp_path, tiny_hubert_ckpt, demo_corpus):
    out = tmp_path / "run"
    live = start(command(out, tiny_hubert_ckpt, demo_corpus, "steps=100000", "save_every=100000"), "4001")
    try:
        wait_for(lambda: (out / LOCK_NAME).is_file() and (out / "config.yaml").is_file(), live)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "s3prl_laser.finetune", "--out", str(out), "--resume", "--device", "cpu"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and not re.search(r'File "[^"]*s3prl_laser/', log), log  # none of ours
    for rank in (0, 1):
        assert f"[rank {rank}] ERROR s3prl_laser.finetune: error: --out {out} is in use by another" in log
    assert len(REFUSED.findall("\n".join(line.split(": ", 1)[-1] for line in log.splitlines()))) == 2, log
    exits = re.findall(r"exitcode\s*:\s*(-?\d+)", log)
    # every rank refused (its own line above) and exits 2, unless torchrun, which ends the other workers as
    # soon as one fails, sent it SIGTERM after the first rank's exit 2: never another failure
    assert "2" in exits and set(exits) <= {"2", str(-signal.SIGTERM)}, log
