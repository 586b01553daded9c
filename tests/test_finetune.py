"""End to end: python -m s3prl_laser.finetune on the tiny models and the bundled corpus.

Every run uses short crops, 2 pairs per step and a few steps, so that the file stays well under a minute.
"""

import functools
import importlib.util
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import warm_processes

from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints
from s3prl_laser.training.heldout import BEST_METRIC, METRICS
from s3prl_laser.training.parts import linear_warmup_decay

REPO = Path(__file__).resolve().parents[1]
FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-3", "log_every=1"]


def finetune(out, ckpt, data, *overrides, upstream="hubert", extra=()):
    argv = ["--upstream", upstream, "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *extra]
    return main([*argv, *FAST, *overrides])


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` read back from the TFRecord event files that tensorboardX wrote."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # record: length (u64), its CRC (u32), payload, payload CRC (u32)
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def final_weights(out, upstream="hubert", suffix=""):
    state = torch.load(out / f"{upstream}_laser{suffix}.pt", weights_only=True)
    return state["model_weight" if upstream == "hubert" else "model"]


def base_weights(ckpt, upstream="hubert"):
    return torch.load(ckpt, weights_only=True)["model_weight" if upstream == "hubert" else "model"]


def test_schedule_warms_up_linearly_then_decays_to_the_end():
    factors = [linear_warmup_decay(step, 4, 10) for step in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[3:] == sorted(factors[3:], reverse=True) and min(factors) > 0
    assert factors[-1] == pytest.approx(1 / 6)
    assert linear_warmup_decay(0, 0, 5) == 1.0


def test_data_errors_come_before_any_model_is_loaded(tmp_path, monkeypatch, caplog, tiny_hubert_ckpt):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    missing = tmp_path / "no_such_corpus"
    assert finetune(tmp_path / "run", tiny_hubert_ckpt, missing) == 2
    assert str(missing) in caplog.text
    (tmp_path / "empty").mkdir()
    assert finetune(tmp_path / "run", tiny_hubert_ckpt, tmp_path / "empty") == 2
    assert "no audio found" in caplog.text
    assert finetune(tmp_path / "run", tiny_hubert_ckpt, tmp_path / "empty", "stpes=3") == 2
    assert "stpes" in caplog.text
    assert not (tmp_path / "run").exists()


def test_held_out_audio_stops_the_command_before_any_model(tmp_path, tiny_hubert_ckpt, demo_corpus):
    dev = sorted((demo_corpus / "dev-clean").rglob("*.flac"))
    train = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))
    (tmp_path / "clips.txt").write_text("\n".join(map(str, [*train, *dev])) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "s3prl_laser.finetune", "--upstream", "hubert"]
    cmd += ["--ckpt", str(tiny_hubert_ckpt), "--data", str(tmp_path / "clips.txt"), "--out", str(out), *FAST]
    result = warm_processes.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert str(dev[0]) in result.stderr and "allow_held_out_splits" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not out.exists()


def test_parent_of_librispeech_trains_on_train_splits_only(tmp_path, tiny_hubert_ckpt, demo_corpus, caplog):
    caplog.set_level("INFO", logger="s3prl_laser")
    assert finetune(tmp_path / "run", tiny_hubert_ckpt, demo_corpus.parent, "steps=1") == 0
    (by_split,) = [line for line in caplog.messages if line.startswith("data by split:")]
    assert by_split.startswith("data by split: train-clean-100: 40 clips")
    assert "dev-clean" not in by_split and "test-clean" not in by_split
    # validation reads dev-clean of the LibriSpeech folder found below --data; training never does
    (validation,) = [line for line in caplog.messages if line.startswith("validation:")]
    assert validation.endswith(f"clips of {demo_corpus / 'dev-clean'}")


@pytest.mark.parametrize("upstream", ["hubert", "wavlm"])
def test_run_trains_only_the_top_layers_and_writes_an_s3prl_checkpoint(
    upstream, tmp_path, tiny_hubert_ckpt, tiny_wavlm_ckpt, demo_corpus
):
    ckpt = tiny_hubert_ckpt if upstream == "hubert" else tiny_wavlm_ckpt
    out = tmp_path / "run"
    assert finetune(out, ckpt, demo_corpus, "steps=3", "save_every=2", upstream=upstream) == 0
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [2, 3]
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert {"model", "head", "optimizer", "scheduler", "step", "config", "rng", "data_position"} <= set(state)
    assert state["step"] == 3 and state["config"]["upstream"] == upstream

    before, after = base_weights(ckpt, upstream), final_weights(out, upstream)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = ("encoder.layers.2.", "encoder.layers.3.", "encoder.layer_norm.")  # 4 layers, top 2
    assert changed and all(name.startswith(trainable) for name in changed)
    assert any(name.startswith("encoder.layers.3.") for name in changed)
    assert set(state["model"]) == {f"model.{name}" for name in before if name.startswith(trainable)}

    import s3prl.hub

    expert = getattr(s3prl.hub, f"{upstream}_local")(ckpt=str(out / f"{upstream}_laser.pt"))
    hidden = expert([torch.randn(4000)])["hidden_states"]
    assert len(hidden) == 5 and torch.isfinite(hidden[-1]).all()


def test_resume_continues_exactly_from_the_runs_own_config(tmp_path, tiny_hubert_ckpt, demo_corpus, caplog):
    """6 steps straight == 3 steps, then a new process that resumes with nothing but ``--out --resume``.

    The resumed command forgets ``--upstream``, ``--data``, ``--ckpt`` and every ``key=value`` of the
    original command (lr, batch size, crop, schedule...): they come from the run's own config.yaml.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("steps=6", "save_every=3", "num_workers=1", "eval_every=2", "eval_clips=3")
    assert finetune(straight, tiny_hubert_ckpt, demo_corpus, *args) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints.checkpoint_path(straight, 3), checkpoints.checkpoint_path(resumed, 3))
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    # the interrupted run's best.pt may be from after step 3: the resumed run must redo it, not trust it
    shutil.copy(checkpoints.best_path(straight), checkpoints.best_path(resumed))
    caplog.clear()
    assert main(["--out", str(resumed), "--resume"]) == 0
    assert "--resume:" not in caplog.text  # nothing was changed

    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    last_a = checkpoints.load_checkpoint(checkpoints.checkpoint_path(straight, 6))
    last_b = checkpoints.load_checkpoint(checkpoints.checkpoint_path(resumed, 6))
    assert all(torch.equal(last_a["head"][k], last_b["head"][k]) for k in last_a["head"])
    assert last_a["data_position"] == last_b["data_position"] and last_a["pairs"] == last_b["pairs"]
    assert torch.equal(last_a["rng"][0]["torch"], last_b["rng"][0]["torch"])
    assert last_b["config"] == last_a["config"] and last_b["config"]["lr"] == 1e-3  # not the preset lr
    assert last_a["validation"] == last_b["validation"] and last_a["validation"]["best_step"] is not None
    best_a = checkpoints.load_checkpoint(checkpoints.best_path(straight))
    best_b = checkpoints.load_checkpoint(checkpoints.best_path(resumed))
    assert best_a["step"] == best_b["step"] and best_a["metrics"] == best_b["metrics"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    # Without restoring the step-3 state the run would differ: the base model was changed by training.
    assert not all(torch.equal(a[name], base_weights(tiny_hubert_ckpt)[name]) for name in a)

    # Resuming the finished run says so, exits 0 and trains nothing.
    written = checkpoints.checkpoint_path(resumed, 6).stat().st_mtime_ns
    caplog.clear()
    assert main(["--out", str(resumed), "--resume"]) == 0
    assert "already finished (step 6 of 6)" in caplog.text
    assert checkpoints.checkpoint_path(resumed, 6).stat().st_mtime_ns == written

    # A key given on the command line wins, and its change is logged as one line "key: old -> new".
    caplog.clear()
    assert main(["--out", str(resumed), "--resume", "steps=7", "save_every=7"]) == 0
    changes = [line for line in caplog.messages if line.startswith("--resume:")]
    assert changes == ["--resume: steps: 6 -> 7", "--resume: save_every: 3 -> 7"]
    assert [step for step, _ in checkpoints.list_checkpoints(resumed)] == [6, 7]
    assert "steps: 7" in (resumed / "config.yaml").read_text()


def test_resume_mistakes_are_reported_before_any_model_is_loaded(tmp_path, monkeypatch, caplog, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the run's config was checked")

    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    empty = tmp_path / "never_ran"
    assert main(["--out", str(empty), "--resume"]) == 2
    assert str(empty / "config.yaml") in caplog.text
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("upstream: hubert\nsteps: [3\n")  # a truncated YAML list
    assert main(["--out", str(run), "--resume"]) == 2
    assert str(run / "config.yaml") in caplog.text
    (run / "config.yaml").write_text("upstream: hubert\nsteps: 3\n")
    assert main(["--upstream", "wavlm", "--out", str(run), "--resume"]) == 2
    assert "is a hubert run" in caplog.text
    assert main(["--resume"]) == 2 and "--out" in caplog.text
    assert "Traceback" not in capsys.readouterr().err + caplog.text


def write_clip(path: Path, wav: np.ndarray) -> Path:
    soundfile.write(path, wav.astype("float32"), 16000, subtype="FLOAT")
    return path


def test_bad_inputs_are_skipped_counted_and_do_not_crash(tmp_path, tiny_hubert_ckpt, demo_corpus):
    good = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))[:4]
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(200))
    short = write_clip(tmp_path / "short.wav", np.zeros(300))
    nan = write_clip(tmp_path / "nan.wav", np.full(16000, np.nan))
    lines = [str(p) for p in good] + [f"{corrupt} 16000", str(short), str(nan)]
    (tmp_path / "clips.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert finetune(out, tiny_hubert_ckpt, tmp_path / "clips.txt", "steps=4", "bucket_batches=1") == 0
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["step"] == 4
    assert state["counters"]["unreadable"] >= 1 and state["counters"]["too_short"] >= 1
    assert state["counters"]["nonfinite"] >= 1
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path, tiny_hubert_ckpt, demo_corpus):
    out = tmp_path / "run"
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    argv += ["--out", str(out), *FAST, "steps=100000", "save_every=100000"]
    cmd = [sys.executable, "-m", "s3prl_laser.finetune", *argv]
    process = warm_processes.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "tb").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the TensorBoard folder appears when the training loop starts
    process.send_signal(signal.SIGTERM)
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, log
    path = checkpoints.latest_checkpoint(out)
    assert path is not None, log
    step = checkpoints.load_checkpoint(path)["step"]  # 0 when the signal came before step 1 ended
    assert f"stopped by signal 15 at step {step}" in log and not list((out / "checkpoints").glob("*.tmp"))
    assert main([*argv[:-2], f"steps={step + 1}", "--resume"]) == 0
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))["step"] == step + 1


def test_torchrun_two_cpu_processes_stay_in_sync(tmp_path, tiny_hubert_ckpt, demo_corpus):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "s3prl_laser.finetune", "--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt)]
    cmd += [
        "--data",
        str(demo_corpus),
        "--out",
        str(out),
        "--device",
        "cpu",
        *FAST,
        "steps=3",
        "save_every=2",
        "grad_accum_steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 2 ranks hold identical trainable weights" in result.stderr
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # dropout differs per rank
    assert state["step"] == 3 and state["pairs"] == 3 * 2 * 2 * 2  # each step: 2 x 2 pairs on each of 2 ranks
    changed = [
        n for n, w in final_weights(out).items() if not torch.equal(w, base_weights(tiny_hubert_ckpt)[n])
    ]
    assert changed


OOM_WRAPPER = """
import os, sys, torch
import s3prl_laser.training.loop as trainer
from s3prl_laser.finetune import main

real_step = trainer.local_step
failing = {int(rank) for rank in os.environ["OOM_RANKS"].split(",")}


def out_of_memory_on_the_second_batch(parts, batch, cfg, env, perturb):
    out = real_step(parts, batch, cfg, env, perturb)  # the step's graph and gradients exist, as in a real OOM
    if batch.position == (0, 1) and env.rank in failing:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return out


trainer.local_step = out_of_memory_on_the_second_batch
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.fault_injection
def test_out_of_memory_on_one_rank_is_a_step_skipped_by_both(tmp_path, tiny_hubert_ckpt, demo_corpus):
    """Rank 1 runs out of memory on batch (0, 1): both ranks skip that step, free it, and go on in sync."""
    wrapper = tmp_path / "oom_finetune.py"
    wrapper.write_text(OOM_WRAPPER)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(wrapper),
    ]
    cmd += ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    cmd += ["--out", str(out), "--device", "cpu", *FAST, "steps=3", "save_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OOM_RANKS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "[rank 1]" in log and "out of memory in the step on batch (0, 1)" in log
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING s3prl_laser.finetune: step 2 skipped (oom batch)" in log, log
    assert "all 2 ranks hold identical trainable weights" in log
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["step"] == 3 and state["counters"]["oom"] == 1
    assert state["data_position"] == {"epoch": 0, "batch": 4}  # 4 batches: 3 steps + the skipped one
    assert state["pairs"] == 3 * 2 * 2  # the skipped step trained on nothing


def test_a_resumed_run_goes_past_a_batch_that_always_runs_out_of_memory(
    tmp_path, tiny_hubert_ckpt, demo_corpus, monkeypatch
):
    import s3prl_laser.training.loop as trainer

    real_step = trainer.local_step

    def always_out_of_memory_on_batch_1(parts, batch, cfg, env, perturb):
        if batch.position == (0, 1):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(parts, batch, cfg, env, perturb)

    monkeypatch.setattr(trainer, "local_step", always_out_of_memory_on_batch_1)
    out = tmp_path / "run"
    assert finetune(out, tiny_hubert_ckpt, demo_corpus, "steps=1") == 0  # stops before the failing batch
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))["data_position"]["batch"] == 1
    assert finetune(out, tiny_hubert_ckpt, demo_corpus, "steps=3", extra=["--resume"]) == 0
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["step"] == 3 and state["counters"]["oom"] == 1 and state["data_position"]["batch"] == 4


def test_demo_writes_report_table_and_picture(wavlm_demo_run):
    out, printed = wavlm_demo_run  # python -m s3prl_laser.finetune --upstream wavlm --demo steps=3 ...
    assert "divergence, same clip" in printed and "far-frame distance" in printed
    report = __import__("json").loads((out / "demo_report.json").read_text())
    assert report["clips"] == 2 and all("/dev-clean/" in p or "/test-clean/" in p for p in report["paths"])
    assert report["before"] != report["after"]
    assert all(value > 0 for side in ("before", "after") for value in report[side].values())
    assert (out / "demo_alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tiny_wavlm.pt").is_file() and (out / "wavlm_laser.pt").is_file()
    # both rows measured through s3prl: the stock loader on the base, our entry on the written file
    loaded = report["through_s3prl"]
    assert loaded["before"] == {"upstream": "wavlm_local", "ckpt": str(out / "tiny_wavlm.pt")}
    assert loaded["after"] == {"upstream": "wavlm_laser", "ckpt": str(out / "wavlm_laser.pt")}
    assert loaded["after_vs_tuned_in_memory_max_abs_diff"] < 1e-5
    assert "loaded through s3prl" in printed
    # the run validated at its last step: TensorBoard holds every held-out metric
    scalars = tensorboard_scalars(out / "tb")
    for key in METRICS:
        assert list(scalars[f"val/{key}"]) == [3] and math.isfinite(scalars[f"val/{key}"][3]), key
    assert scalars["val/seconds"][3] > 0 and scalars["val/share_of_training"][3] > 0


def test_validation_keeps_the_best_checkpoint_and_warns_once_of_collapse(
    tmp_path, tiny_hubert_ckpt, demo_corpus, caplog, capsys
):
    out = tmp_path / "run"
    args = ("steps=6", "save_every=6", "eval_every=2", "eval_clips=3", "lr=3e-3")
    assert finetune(out, tiny_hubert_ckpt, demo_corpus, *args) == 0
    ratios = tensorboard_scalars(out / "tb")[f"val/{BEST_METRIC}"]
    assert sorted(ratios) == [2, 4, 6]
    assert "val=" in capsys.readouterr().err  # the progress bar shows the newest validation
    best = checkpoints.load_checkpoint(checkpoints.best_path(out))
    assert best["step"] == min(ratios, key=ratios.get)
    assert best["metrics"][BEST_METRIC] == pytest.approx(ratios[best["step"]], rel=1e-6)
    # <upstream>_laser_best.pt: the trainable weights of best.pt, everything else as in the last export
    best_export, base = final_weights(out, "hubert", "_best"), base_weights(tiny_hubert_ckpt)
    for name, tensor in best_export.items():
        expected = best["model"].get(f"model.{name}", base[name])
        assert torch.equal(tensor, expected), name
    assert best_export.keys() == final_weights(out).keys()
    assert "collapse guard" not in caplog.text

    caplog.clear()
    guarded = tmp_path / "guarded"  # a threshold no far-frame distance reaches: warned once, no best kept
    assert finetune(guarded, tiny_hubert_ckpt, demo_corpus, *args, "collapse_threshold=3.0") == 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "collapse guard" in r.message]
    assert len(warnings) == 1 and "collapse_threshold=3.0 at step 2" in warnings[0].message
    assert not checkpoints.best_path(guarded).exists() and not (guarded / "hubert_laser_best.pt").exists()


def test_throughput_benchmark_runs(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "finetune_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--tiny",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--max-seconds",
        "1",
        "--workers",
        "0",
        "--eval-clips",
        "2",
    ]
    assert bench.main([*argv, "--device", "cpu"]) == 0
    rows = [
        line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.split()[:1] in (["hubert"], ["wavlm"])
    ]
    assert [row[0] for row in rows] == ["hubert", "wavlm"]
    assert all(float(row[1]) == 2.0 and float(row[2]) > 0 and float(row[-1]) > 0 for row in rows)


def record_steps(monkeypatch):
    """Record, per optimizer step, its micro-batches' ``(position, part, pairs, padded samples)`` (the
    padded samples of the ``[2b, T]`` tensor that goes through the model)."""
    import s3prl_laser.training.loop as trainer

    real_step, real_complete = trainer.train_step, trainer.complete_pairs
    steps, shapes = [], []

    def complete(batch, perturb, device):
        done = real_complete(batch, perturb, device)
        shapes.append(done.wavs.numel())
        return done

    def step(parts, batches, *args, **kwargs):
        shapes.clear()
        result = real_step(parts, batches, *args, **kwargs)
        steps.append([(b.position, b.part, b.num_pairs, n) for b, n in zip(batches, shapes, strict=True)])
        return result

    monkeypatch.setattr(trainer, "complete_pairs", complete)
    monkeypatch.setattr(trainer, "train_step", step)
    return steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_batch_budget_splits_steps_into_micro_batches_with_the_unsplit_gradient(
    tmp_path, demo_corpus, monkeypatch, caplog, accumulate
):
    """A budget of 2 pairs of 1 s clips runs each step of 4 pairs as 2 micro-batches: the same pairs per
    step, the same training (fp32, CPU) as the unsplit steps, within float tolerance.

    A pair's loss must not depend on the batch it is in for the unsplit step to be the reference: the tiny
    model has no dropout and a per-frame normalised feature extractor, and every view is 1 s long (clips
    cropped to 1 s, no speed change), so that no batch pads (padding changes features near a clip's end
    through the convolutional position embedding, and through the first CNN layer's norm in base models).
    AdamW normalises each gradient entry, so float noise in an entry whose exact gradient is 0 (the
    attention's key bias) would become a whole +-lr step; a large ``eps`` makes its update linear in it.
    """
    from s3prl_laser.fixtures import build_tiny_hubert

    ckpt = build_tiny_hubert(
        tmp_path / "plain.pt", seed=0, extractor_mode="layer_norm", dropout=0.0, attention_dropout=0.0,
        encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
    )  # fmt: skip
    monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, eps=1e3))
    budget = 2 * 2 * 1.0 + 0.01  # seconds: 2 pairs of 1 s views
    common = ("steps=3", "save_every=3", "batch_size=4", f"grad_accum_steps={accumulate}",
              "perturb_on=device", "speed_factors=[1.0]", "lr=30.0", "weight_decay=0.0")  # fmt: skip
    steps = record_steps(monkeypatch)
    assert finetune(tmp_path / "free", ckpt, demo_corpus, *common, "max_batch_seconds=null") == 0
    free = list(steps)
    steps.clear()
    caplog.clear()
    assert finetune(tmp_path / "split", ckpt, demo_corpus, *common, f"max_batch_seconds={budget}") == 0
    split = list(steps)
    assert f"runs as {2 * accumulate:.2f} micro-batches on average" in caplog.text

    assert all(part == (0, 1) for step in free for _, part, _, _ in step)
    assert len(split) == len(free) == 3
    for whole, cut in zip(free, split, strict=True):
        assert len(cut) == 2 * len(whole)  # every batch of 4 pairs in 2 micro-batches ...
        assert all(n <= budget * 16000 for _, _, _, n in cut)  # ... that fit the budget
        assert sum(p for _, _, p, _ in cut) == sum(p for _, _, p, _ in whole) == 4 * accumulate
        assert [(pos, part) for pos, part, _, _ in cut] == [
            (pos, (i, 2)) for pos, _, _, _ in whole for i in range(2)
        ]
    base = base_weights(ckpt)
    a, b = final_weights(tmp_path / "free"), final_weights(tmp_path / "split")
    moved = {n: a[n] - base[n] for n in a if not torch.equal(a[n], base[n])}
    largest = max(float(d.abs().max()) for d in moved.values())
    assert len(moved) > 10 and largest > 1e-5  # training moved the top layers
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-3 * largest
    state_a = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path / "free"))
    state_b = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path / "split"))
    assert state_a["data_position"] == state_b["data_position"] and state_a["pairs"] == state_b["pairs"]


def test_resume_after_budget_split_steps_is_exact(tmp_path, tiny_hubert_ckpt, demo_corpus):
    budget = f"max_batch_seconds={2 * 2 * math.ceil(16000 / 0.9) / 16000 + 0.01}"  # 2 pairs of 4 per part
    args = ("steps=4", "save_every=2", "batch_size=4", budget)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert finetune(straight, tiny_hubert_ckpt, demo_corpus, *args) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints.checkpoint_path(straight, 2), checkpoints.checkpoint_path(resumed, 2))
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    assert checkpoints.load_checkpoint(checkpoints.checkpoint_path(resumed, 2))["data_position"] == {
        "epoch": 0, "batch": 2,
    }  # fmt: skip
    assert main(["--out", str(resumed), "--resume"]) == 0
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    last_a = checkpoints.load_checkpoint(checkpoints.checkpoint_path(straight, 4))
    last_b = checkpoints.load_checkpoint(checkpoints.checkpoint_path(resumed, 4))
    assert last_a["data_position"] == last_b["data_position"] and last_a["pairs"] == last_b["pairs"] == 16


@pytest.mark.fault_injection
def test_torchrun_ranks_that_cut_their_batches_differently_stay_in_sync(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    """A 9 s budget cuts a batch of 4 clips of 1.8-2.7 s (views up to 3 s) into 2 to 4 micro-batches: the two
    ranks run different numbers of passes in some steps, and still take the same steps, in sync."""
    from s3prl_laser.training.config import resolve_config
    from s3prl_laser.training.length_index import scan
    from s3prl_laser.training.loop import build_data
    from s3prl_laser.training.ranks import DistEnv

    keys = [*FAST, "max_seconds=3.0", "batch_size=4", "max_batch_seconds=9.0", "steps=5", "save_every=5"]
    cfg = resolve_config("hubert", overrides=[*keys, f"data={demo_corpus}"])
    items = scan(cfg, 1)
    passes = []  # per rank: micro-batches of each of its 5 steps (its whole epoch 0: 40 clips, 2 x 5 x 4)
    for rank in (0, 1):
        _, sampler = build_data(cfg, items, DistEnv(rank=rank, world_size=2), (0, 0))
        passes.append([len(sampler.micro_batches(batch)) for batch in sampler.epoch_batches(0)])
    assert passes[0] != passes[1] and min(passes[0] + passes[1]) >= 2

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "s3prl_laser.finetune", "--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt)]
    cmd += ["--data", str(demo_corpus), "--out", str(out), "--device", "cpu", *keys]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    average = sum(passes[0]) / len(passes[0])
    assert f"runs as {average:.2f} micro-batches on average in epoch 0" in log  # rank 0's start-up line
    assert "all 2 ranks hold identical trainable weights" in log and "skipped" not in log
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))
    assert state["step"] == 5 and state["pairs"] == 5 * 4 * 2
    assert state["data_position"] == {"epoch": 1, "batch": 0}


def test_a_run_that_fails_mid_training_leaves_no_dataloader_worker(
    tmp_path, tiny_hubert_ckpt, demo_corpus, monkeypatch
):
    import multiprocessing

    from s3prl_laser.training import loop

    real_step, calls = loop.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted failure in step 2")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="planted failure in step 2") as failure:
        finetune(tmp_path / "run", tiny_hubert_ckpt, demo_corpus, "steps=3", "num_workers=1")
    # The traceback, still held here as by an uncaught exception, keeps train()'s frame alive. Its DataLoader
    # workers ignore SIGTERM (the main process stops them), so if they outlived the failure, the interpreter's
    # exit would wait on them forever instead of ending the job.
    assert failure.value.__traceback__ is not None
    assert multiprocessing.active_children() == []
