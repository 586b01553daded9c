"""What ``--resume`` does with a changed key, one run per ``--out``, warnings for runs that train nothing.

The table of :data:`s3prl_laser.training.config.RESUME_RULES` classifies every key (applied, or refused); the
tests check that an applied key really reaches the optimizer and the schedule (whose state a checkpoint brings
back), that a longer ``steps`` continues the schedule without a jump, that refused keys and another number
of processes stop the command before any model is loaded, that a damaged ``best.pt`` never stops a run, and
that a new run never writes over an earlier one. Most tests copy one finished tiny run (4 steps, module
fixture) and resume it for a few steps.
"""

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_finetune import FAST, final_weights, tensorboard_scalars

from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints, loop
from s3prl_laser.training import parts as training_parts
from s3prl_laser.training.config import (
    APPLIED,
    REFUSED,
    RESUME_RULES,
    config_keys,
    no_op_warnings,
    resolve_config,
    resume_table,
)
from s3prl_laser.training.parts import WarmupDecay, linear_warmup_decay

REPO = Path(__file__).resolve().parents[1]
RUN = ("steps=4", "save_every=2", "eval_every=2", "eval_clips=3")  # FAST sets lr=1e-3, warmup_steps=1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_hubert_ckpt, demo_corpus) -> Path:
    """A finished 4-step tiny run (checkpoints of steps 2 and 4, a best.pt, both exports); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    assert main([*argv, "--out", str(out), *FAST, *RUN]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def interrupted_at(run: Path, step: int) -> Path:
    """``run`` as if it had been killed right after its checkpoint of ``step``."""
    for later, path in checkpoints.list_checkpoints(run):
        if later > step:
            path.unlink()
    for name in ("hubert_laser.pt", "hubert_laser_best.pt"):
        (run / name).unlink()
    return run


def logged_lr(run: Path) -> dict[int, float]:
    """``{step: lr}`` from TensorBoard: at step k, the lr that the scheduler set for step k + 1."""
    return tensorboard_scalars(run / "tb")["train/lr"]


def one_line(text: str, *names) -> str:
    lines = [line for line in text.splitlines() if all(str(name) in line for name in names)]
    assert len(lines) == 1, f"expected one line naming {names}:\n{text}"
    return lines[0]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the command refused its input")


# ----------------------------------------------------------------------------------------------------------
# the table


def test_every_config_key_has_one_resume_class_and_a_reason():
    assert list(RESUME_RULES) == config_keys()  # every key, in the dataclass' order, none extra
    assert all(rule in (APPLIED, REFUSED) and len(why) > 10 for rule, why in RESUME_RULES.values())
    refused = {key for key, (rule, _) in RESUME_RULES.items() if rule == REFUSED}
    shape = {"trainable_layers", "train_final_layer_norm", "proj_dim", "upstream", "ckpt"}
    data = {"batch_size", "seed", "bucket_batches", "max_seconds", "grad_accum_steps", "eval_clips", "data"}
    assert shape | data <= refused
    applied = {"steps", "lr", "weight_decay", "warmup_steps", "log_every", "save_every", "eval_every",
               "num_workers"}  # fmt: skip
    assert applied <= set(RESUME_RULES) - refused


def test_docs_table_is_the_code_table():
    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## Resume: what a changed key does", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == resume_table(), "docs/training.md: paste s3prl_laser.training.config.resume_table() there"


# ----------------------------------------------------------------------------------------------------------
# the schedule


def test_schedule_follows_its_formula_until_retargeted_and_survives_a_checkpoint(tmp_path):
    """The plain schedule against its formula written out by hand (warm-up to 1, linear to 0), a no-op
    retarget, and a retargeted schedule written by LambdaLR and read back into one built with other
    targets: it must give the retargeted values (a state_dict that dropped the schedule's fields would give
    the fresh one's)."""
    from_zero = WarmupDecay(warmup_steps=3, total_steps=10, from_zero=True)
    plain = WarmupDecay(warmup_steps=3, total_steps=10)
    expected_from_zero = [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0]
    expected_plain = [1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0]
    assert [from_zero(s) for s in range(11)] == pytest.approx(expected_from_zero, abs=1e-12)
    assert [plain(s) for s in range(11)] == pytest.approx(expected_plain, abs=1e-12)
    from_zero.retarget(5, 3, 10, True)  # the same targets: nothing changes
    assert [from_zero(s) for s in range(11)] == pytest.approx(expected_from_zero, abs=1e-12)
    from_zero.retarget(5, 3, 20, True)  # from 5/7 at step 5 in a line to 0 at step 20
    retargeted = [5 / 7 * (20 - s) / 15 for s in range(5, 21)]
    assert [from_zero(s) for s in range(5, 21)] == pytest.approx(retargeted, abs=1e-12)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    torch.save(torch.optim.lr_scheduler.LambdaLR(optimizer, from_zero).state_dict(), tmp_path / "s.pt")
    fresh = WarmupDecay(warmup_steps=1, total_steps=2)
    torch.optim.lr_scheduler.LambdaLR(optimizer, fresh).load_state_dict(
        torch.load(tmp_path / "s.pt", weights_only=True)
    )
    assert [fresh(s) for s in range(5, 21)] == pytest.approx(retargeted, abs=1e-12)


@pytest.mark.parametrize(
    ("step", "warmup", "total", "new_warmup", "new_total"),
    [(6, 2, 10, 2, 30), (1, 4, 10, 4, 30), (10, 2, 10, 2, 15), (10, 2, 10, 14, 20), (2, 4, 10, 8, 10),
     (6, 2, 10, 2, 7)],  # fmt: skip
)
def test_a_retargeted_schedule_goes_on_from_the_current_lr_to_its_new_targets(
    step, warmup, total, new_warmup, new_total
):
    schedule = WarmupDecay(warmup, total)
    before = schedule(step)
    schedule.retarget(step, new_warmup, new_total)
    factors = [schedule(s) for s in range(step, new_total + 1)]
    if step >= total and step >= new_warmup:  # a finished schedule extended: a new decay from the peak
        before = 1.0
    assert factors[0] == pytest.approx(before, abs=1e-12)  # else no jump where the change happens
    assert factors[-1] == pytest.approx(0.0, abs=1e-12) and min(factors) >= 0  # decayed to 0 at the end
    if step < new_warmup:  # up to the peak at the end of the new warm-up, then down
        peak = new_warmup - step
        assert factors[peak] == pytest.approx(1.0) and factors[: peak + 1] == sorted(factors[: peak + 1])
        assert factors[peak:] == sorted(factors[peak:], reverse=True)
    else:  # straight down, by equal steps (linear)
        gaps = [a - b for a, b in zip(factors, factors[1:], strict=False)]
        assert gaps == pytest.approx([gaps[0]] * len(gaps), abs=1e-12) and gaps[0] >= 0
    if step < warmup == new_warmup:  # only `steps` changed during the warm-up: the same warm-up
        plain = [linear_warmup_decay(s, warmup, total) for s in range(step, warmup)]
        assert factors[: warmup - step] == plain


def test_a_finished_schedule_extended_starts_anew_from_the_peak_or_warms_up_from_zero():
    ended = WarmupDecay(2, 10)
    assert ended(10) == 0.0
    ended.retarget(10, 2, 20)  # no warm-up after step 10: a decay from 1 at step 10 to 0 at step 20
    decay = [(20 - s) / 10 for s in range(10, 21)]
    assert [ended(s) for s in range(10, 21)] == pytest.approx(decay, abs=1e-12)
    rewarmed = WarmupDecay(2, 10)
    rewarmed.retarget(10, 14, 20)  # a warm-up that ends at step 14: from 0 up to 1 there, then down
    assert [rewarmed(s) for s in (10, 12, 14, 17, 20)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    unfinished = WarmupDecay(2, 10)  # not over: goes on from its current multiplier (0.5 at step 6)
    unfinished.retarget(6, 2, 14)
    assert [unfinished(s) for s in (6, 10, 14)] == pytest.approx([0.5, 0.25, 0.0])


# ----------------------------------------------------------------------------------------------------------
# applied keys reach the optimizer and the schedule


def test_resume_applies_lr_weight_decay_and_a_longer_schedule_for_real(run_copy, caplog):
    run = interrupted_at(run_copy, 2)  # 4-step run, warm-up 1, lr 1e-3: the lr for step 3 is 1e-3 * 2/3
    assert logged_lr(run)[2] == pytest.approx(1e-3 * 2 / 3)
    changed = ["steps=6", "lr=5e-4", "weight_decay=0.1", "save_every=1", "eval_every=0"]
    assert main(["--out", str(run), "--resume", *changed]) == 0
    assert "--resume: lr: 0.001 -> 0.0005" in caplog.messages
    # from step 3 on: 2/3 of the new lr, then linearly down to 0 at the new last step (6), without a jump
    lr = logged_lr(run)
    for step in (3, 4, 5, 6):
        assert lr[step] == pytest.approx(5e-4 * (2 / 3) * (6 - step) / 4), step
    for step in (5, 6):  # the two kept checkpoints
        state = checkpoints.load_checkpoint(checkpoints.checkpoint_path(run, step))
        (group,) = state["optimizer"]["param_groups"]
        assert group["initial_lr"] == 5e-4 and group["weight_decay"] == 0.1
        assert state["scheduler"]["base_lrs"] == [5e-4]
        assert group["lr"] == pytest.approx(5e-4 * (2 / 3) * (6 - step) / 4)
        assert state["scheduler"]["lr_lambdas"][0]["total_steps"] == 6


def test_more_steps_on_a_finished_run_are_trained_on_a_new_schedule_that_the_log_names(
    finished_run, run_copy, caplog
):
    """The README's ``--resume steps=N lr=X`` on a finished run: the new steps decay from the given lr (or
    the run's own peak) to 0 at N, and the weights move; a warm-up given ends where it says."""
    assert logged_lr(run_copy)[4] == 0.0  # the finished 4-step run ended at lr 0
    assert main(["--out", str(run_copy), "--resume", "steps=6", "lr=5e-4", "eval_every=0"]) == 0
    lr = logged_lr(run_copy)  # at step k: the lr set for step k + 1 (steps 5, 6: 5e-4, 2.5e-4)
    assert [lr[5], lr[6]] == pytest.approx([2.5e-4, 0.0])
    line = one_line(caplog.text, "INFO", "new schedule")
    assert line.endswith("the run had finished at step 4 (lr 0); its 2 new steps follow a new schedule: lr "
                         "0.0005 at step 5, down to 0 at step 6")  # fmt: skip
    finished, extended = final_weights(finished_run), final_weights(run_copy)
    assert not all(torch.equal(finished[name], extended[name]) for name in finished)
    caplog.clear()  # without lr=: the run's own peak lr (5e-4 since the resume above)
    assert main(["--out", str(run_copy), "--resume", "steps=8"]) == 0
    assert [logged_lr(run_copy)[s] for s in (7, 8)] == pytest.approx([5e-4 * 1 / 2, 0.0])
    one_line(caplog.text, "new schedule: lr 0.0005 at step 7, down to 0 at step 8")
    caplog.clear()  # a warm-up that ends at step 11: from 0 at step 9 up to lr there, then down to 0 at 12
    assert main(["--out", str(run_copy), "--resume", "steps=12", "warmup_steps=11"]) == 0
    lr = logged_lr(run_copy)
    assert [lr[s] for s in (9, 10, 11, 12)] == pytest.approx([5e-4 / 3, 1e-3 / 3, 5e-4, 0.0])
    one_line(caplog.text, "new schedule: lr 0 at step 9, warming up to lr 0.0005 (warmup_steps=11)")
    assert "WARNING" not in caplog.text


def test_a_warm_up_that_ends_before_a_finished_runs_step_is_refused_before_any_model_loads(
    run_copy, monkeypatch, caplog
):
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    assert main(["--out", str(run_copy), "--resume", "steps=20", "warmup_steps=2"]) == 2
    line = one_line(caplog.text, "error: --resume: warmup_steps=2: the run finished at step 4")
    assert "give one between 5 and 19" in line and "Traceback" not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# refused keys, another world size


def test_resume_refuses_keys_that_change_the_model_or_the_data_before_any_model_loads(
    run_copy, monkeypatch, caplog, capsys, tmp_path
):
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    saved = (run_copy / "config.yaml").read_text()
    other_data = tmp_path / "other"
    other_data.mkdir()
    changes = ["trainable_layers=1", "train_final_layer_norm=false", "proj_dim=128", "batch_size=4", "seed=1",
               "bucket_batches=10", "max_seconds=2.0", "grad_accum_steps=2", "eval_clips=4",
               "speed_factors=[1.0]"]  # fmt: skip
    for change in changes:
        key = change.split("=")[0]
        caplog.clear()
        assert main(["--out", str(run_copy), "--resume", "steps=6", change]) == 2, change
        line = one_line(caplog.text, "error: --resume:", f"{key} ")
        assert "start a new run with another --out" in line
    caplog.clear()
    assert main(["--out", str(run_copy), "--resume", "--data", str(other_data)]) == 2
    one_line(caplog.text, "error: --resume:", "data ", "another --out")
    assert (run_copy / "config.yaml").read_text() == saved  # nothing written
    assert "Traceback" not in caplog.text + capsys.readouterr().err


def test_resume_refuses_a_config_yaml_edited_away_from_its_checkpoint(run_copy, monkeypatch, caplog):
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "proj_dim": 128}))
    assert main(["--out", str(run_copy), "--resume", "steps=6"]) == 2
    line = one_line(caplog.text, "error: --resume:", "step_0000004.pt", "proj_dim 256 -> 128")
    assert "another --out" in line and "Traceback" not in caplog.text


def test_resume_refuses_another_number_of_processes(run_copy, monkeypatch, caplog):
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    newest = checkpoints.latest_checkpoint(run_copy)
    state = checkpoints.load_checkpoint(newest)
    torch.save({**state, "world_size": 2, "rng": state["rng"] * 2}, newest)  # as 2 processes wrote it
    assert main(["--out", str(run_copy), "--resume", "steps=6"]) == 2
    line = one_line(caplog.text, "error: --resume:", newest, "2 process(es)", "this run has 1")
    assert "another --out" in line and "Traceback" not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# a damaged best.pt


def test_a_damaged_best_checkpoint_is_set_aside_and_the_run_goes_on(run_copy, monkeypatch, caplog):
    best = checkpoints.best_path(run_copy)
    data = best.read_bytes()
    best.write_bytes(data[: len(data) // 2])  # cut short by a disk fault
    assert main(["--out", str(run_copy), "--resume", "steps=5", "eval_every=1"]) == 0
    one_line(caplog.text, "WARNING", best, "is damaged", "renamed to best.pt.damaged")
    assert best.with_name("best.pt.damaged").read_bytes() == data[: len(data) // 2]
    kept = checkpoints.load_checkpoint(best)  # best tracking started afresh: step 5 is the best so far
    assert kept["step"] == 5 and "best validation (step 5)" in caplog.text

    # damaged again by the time of the final export: the last export is written, the best one skipped
    real_export = training_parts.export_upstream

    def export_then_damage(parts, cfg, out):
        path = real_export(parts, cfg, out)
        best.write_bytes(b"PK\x03\x04" + bytes(100))
        return path

    monkeypatch.setattr(training_parts, "export_upstream", export_then_damage)
    caplog.clear()
    assert main(["--out", str(run_copy), "--resume", "steps=6", "eval_every=0"]) == 0
    one_line(caplog.text, "WARNING", best, "is damaged", "renamed to best.pt.damaged")
    assert "best validation" not in caplog.text and "tuned upstream written" in caplog.text
    assert "Traceback" not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# one run per --out


def test_a_new_run_never_writes_over_an_earlier_one(run_copy, monkeypatch, caplog, tiny_hubert_ckpt,
                                                      demo_corpus):  # fmt: skip
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    argv += ["--out", str(run_copy), *FAST]
    (run_copy / "notes.txt").write_text("mine\n")
    before = {path: path.stat().st_mtime_ns for path in run_copy.rglob("*")}
    with monkeypatch.context() as patched:
        patched.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
        assert main([*argv, "steps=2"]) == 2
        line = one_line(caplog.text, "error: --out", run_copy, "holds a run")
        assert "--resume" in line and "another --out" in line and "--overwrite" in line
        caplog.clear()
        assert main(["--resume", "--overwrite", *argv]) == 2
        one_line(caplog.text, "error: --overwrite starts a new run and --resume continues one")
    assert {path: path.stat().st_mtime_ns for path in run_copy.rglob("*")} == before  # nothing written

    caplog.clear()  # --overwrite: the earlier run's files go, the user's own stay; the new run starts at 0
    assert main(["--overwrite", *argv, "steps=2", "save_every=1", "warmup_steps=3", "eval_every=0"]) == 0
    one_line(caplog.text, "--overwrite: removed the earlier run in", run_copy, "checkpoints")
    assert [step for step, _ in checkpoints.list_checkpoints(run_copy)] == [1, 2]
    assert not checkpoints.best_path(run_copy).exists() and not (run_copy / "hubert_laser_best.pt").exists()
    assert (run_copy / "notes.txt").read_text() == "mine\n"
    assert re.search(r"steps: 2\n", (run_copy / "config.yaml").read_text())
    # the config of this run cannot leave its warm-up: one warning at the start, from our logger
    warning = one_line(caplog.text, "WARNING", "steps=2 <= warmup_steps=3")
    assert "s3prl_laser" in warning and "never leaves its warm-up" in warning


@pytest.mark.slow
def test_the_demo_replaces_its_own_earlier_run_only(run_copy, tmp_path, caplog):
    # run_copy trained on the bundled demo corpus: a demo run, which --demo replaces (make demo, twice)
    assert main(["--upstream", "hubert", "--demo", "--out", str(run_copy), "steps=2", "report_clips=2",
                 "eval_every=0"]) == 0  # fmt: skip
    one_line(caplog.text, "--demo: removed the earlier run in", run_copy)
    assert [step for step, _ in checkpoints.list_checkpoints(run_copy)] == [2]
    assert (run_copy / "demo_report.json").is_file()
    other = tmp_path / "mine"  # a run on other data is not the demo's to replace
    other.mkdir()
    (other / "config.yaml").write_text(f"upstream: hubert\ndata: {tmp_path}\n")
    caplog.clear()
    assert main(["--upstream", "hubert", "--demo", "--out", str(other)]) == 2
    one_line(caplog.text, "error: --out", other, "holds a run")


# ----------------------------------------------------------------------------------------------------------
# configs that train nothing


def test_configs_that_train_nothing_are_warned_about():
    assert no_op_warnings(resolve_config("hubert")) == []  # the paper's recipe
    (short,) = no_op_warnings(resolve_config("hubert", overrides=["steps=10"]))
    assert "steps=10 <= warmup_steps=1000" in short and "at most 1% of lr=2e-05" in short
    (frozen,) = no_op_warnings(resolve_config("hubert", overrides=["trainable_layers=0",
                                                                    "train_final_layer_norm=false"]))
    assert "only the projection head trains" in frozen
    (clip,) = no_op_warnings(resolve_config("hubert", overrides=["grad_clip=0"]))
    assert "every gradient to 0" in clip


# ----------------------------------------------------------------------------------------------------------
# a stop signal in the middle of a step


def test_a_signal_in_the_middle_of_a_step_saves_no_further_step_and_the_resume_is_bit_identical(
    tmp_path, tiny_hubert_ckpt, demo_corpus, monkeypatch, caplog
):
    """SIGINT from inside the loss of step 3's first micro-batch of 2: micro-batch 2 never runs, step 3 is
    dropped (no update) and the checkpoint is step 2's; the resume then ends with the weights of a run never
    stopped (with dropout: the dropped step's RNG draws must be undone, its data not passed)."""
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus), *FAST,
            "steps=4", "save_every=4", "grad_accum_steps=2", "eval_every=0"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    real, calls = loop.pair_loss, []

    def signalling(*args):
        calls.append(1)
        if len(calls) == 5:  # step 3, micro-batch 1 of 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(loop, "pair_loss", signalling)
    caplog.clear()
    assert main([*argv, "--out", str(tmp_path / "stopped")]) == 128 + signal.SIGINT
    assert len(calls) == 5  # nothing after the micro-batch the signal came in
    assert [step for step, _ in checkpoints.list_checkpoints(tmp_path / "stopped")] == [2]
    one_line(caplog.text, "INFO", "signal 2 during step 3: the step is dropped unfinished; saving step 2")
    one_line(caplog.text, "INFO", "stopped by signal 2 at step 2; resume with --resume")
    monkeypatch.setattr(loop, "pair_loss", real)
    assert main(["--out", str(tmp_path / "stopped"), "--resume"]) == 0
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[name], b[name]) for name in a)


# ----------------------------------------------------------------------------------------------------------
# the resume examples of README.md and docs/


def resume_examples() -> list[tuple[str, str, str]]:
    """``(where, overrides, comment)`` of every ``--resume`` command line in README.md and docs/ (not the
    quoted output, whose lines start with ``$``). Lines without a comment stand in prose about a finished
    run."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = re.match(r"python -m s3prl_laser\.finetune --out runs/\w+ --resume(.*?)(?:#\s*(.*))?$",
                             line)  # fmt: skip
            if match:
                found.append((f"{path.name}:{number}", match.group(1).strip(), match.group(2) or "finished"))
    return found


def test_the_resume_examples_of_the_docs_are_all_found():
    examples = resume_examples()
    assert len(examples) >= 6 and {overrides for _, overrides, _ in examples} >= {
        "", "steps=5000 lr=1e-5", "steps=5000 warmup_steps=3700", "steps=5000 warmup_steps=3800"
    }  # fmt: skip


@pytest.mark.slow
def test_every_resume_example_in_the_docs_does_what_its_comment_says(finished_run, tmp_path, caplog):
    """Each example on the tiny 4-step run, its step numbers moved onto it (the examples' runs finished at
    3600: step N becomes 4 + (N - 3600) / 100, so steps=5000 is 18 and warmup_steps=3700 is 5). On a run
    stopped at step 2 (comments about a crash or a continued run) it reaches its last step, the very weights
    of the run never stopped when nothing changes; on a finished run (comments that say so) the new steps
    are trained, at the lr given (or the run's own), after the warm-up given."""
    finished = final_weights(finished_run)
    runs = 0
    for where, overrides, comment in {(o, c): (w, o, c) for w, o, c in resume_examples()}.values():
        keys = dict(item.split("=", 1) for item in overrides.split())
        moved = {k: str(4 + (int(v) - 3600) // 100) if k in ("steps", "warmup_steps") else v
                 for k, v in keys.items()}  # fmt: skip
        argv = [f"{k}={v}" for k, v in moved.items()]
        starts = [s for s, words in ((2, ("crash", "continue", "changed")), (4, ("finished",)))
                  if any(word in comment for word in words)]  # fmt: skip
        assert starts, f"{where}: a comment that says neither what run it continues nor that it finished"
        for start in starts:
            run = Path(shutil.copytree(finished_run, tmp_path / f"run{runs}"))
            runs += 1
            if start == 2:
                interrupted_at(run, 2)
            caplog.clear()
            assert main(["--out", str(run), "--resume", *argv, "eval_every=0"]) == 0, (where, start)
            last = checkpoints.list_checkpoints(run)[-1][0]
            assert last == int(moved.get("steps", 4)), (where, start)
            for key in moved:
                assert f"--resume: {key}: " in caplog.text, (where, key)
            weights = final_weights(run)
            same = all(torch.equal(finished[name], weights[name]) for name in finished)
            assert same == (not moved), (where, start)  # nothing changed: bit-identical; else trained on
            if start == 4:  # new steps trained: from the peak down to 0, or up to it where the warm-up ends
                lr, peak = logged_lr(run), float(moved.get("lr", 1e-3))
                if "warmup_steps" in moved:
                    assert lr[int(moved["warmup_steps"])] == pytest.approx(peak), where
                else:  # at step k, the lr for step k + 1: a line from the peak at step 5 to 0 at the last
                    expected = [peak * (last - s) / (last - 4) for s in range(5, last + 1)]
                    assert [lr[s] for s in range(5, last + 1)] == pytest.approx(expected), where
                one_line(caplog.text, "the run had finished at step 4 (lr 0)", "new schedule")
