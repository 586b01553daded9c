"""A run trains on exactly the clips it started with (``OUT/clips.tsv``), and its validation share is fixed at
its start: a manifest edited between a run and its ``--resume``, a clip of the run cut short or removed,
validation turned on or off later. The runs train a few steps of the tiny model on a manifest of demo clips
(a source without ``dev-clean``, so the held-out share comes out of the training clips)."""

import shutil
from pathlib import Path

import pytest
import torch
from test_finetune import FAST, final_weights
from test_resume import no_model, one_line

from s3prl_laser.data import AudioItem
from s3prl_laser.errors import UserInputError
from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.run_clips import (
    RunClips,
    read_run_clips,
    resumed_run_clips,
    write_run_clips,
)

RUN = ("steps=4", "save_every=2", "eval_every=0")


@pytest.fixture(scope="module")
def clips(tmp_path_factory, demo_corpus) -> list[Path]:
    """The demo's 40 training clips, copied into a folder of their own (tests cut and remove some)."""
    folder = tmp_path_factory.mktemp("clips")
    found = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))
    return [Path(shutil.copy(path, folder / path.name)) for path in found]


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory, tiny_hubert_ckpt, clips) -> Path:
    """A finished 4-step run (checkpoints of steps 2 and 4) on a manifest of the first 30 clips."""
    root = tmp_path_factory.mktemp("manifest_run")
    manifest = root / "clips.txt"
    manifest.write_text("".join(f"{path}\n" for path in clips[:30]))
    out = root / "run"
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(manifest)]
    assert main([*argv, "--out", str(out), *FAST, *RUN]) == 0
    return out


def interrupted_at(run: Path, step: int) -> Path:
    """``run`` as if it had been killed right after its checkpoint of ``step``."""
    for later, path in checkpoints.list_checkpoints(run):
        if later > step:
            path.unlink()
    (run / "hubert_laser.pt").unlink()
    return run


@pytest.fixture
def run_copy(manifest_run, tmp_path) -> Path:
    """A copy of the run; the manifest (the run's own, named by its checkpoints) is restored afterwards."""
    manifest = manifest_run.parent / "clips.txt"
    text = manifest.read_text()
    yield Path(shutil.copytree(manifest_run, tmp_path / "run"))
    manifest.write_text(text)


def test_a_resume_trains_on_the_runs_own_clips_and_reports_a_changed_manifest_once(
    manifest_run, run_copy, clips, caplog
):
    """Clips appended to the manifest and one removed from it between the run and its ``--resume``: the run
    still trains on its own 30 clips (the very weights of the run that never stopped), and says so once."""
    run = interrupted_at(run_copy, 2)
    manifest = manifest_run.parent / "clips.txt"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[1:] + [str(path) for path in clips[30:35]]) + "\n")
    caplog.clear()
    assert main(["--out", str(run), "--resume"]) == 0
    line = one_line(caplog.text, "changed since the run started")
    assert "(5 clips added, 1 removed); the run trains on its own 30 clips" in line
    a, b = final_weights(manifest_run), final_weights(run)
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("damage", ["cut", "removed"])
def test_a_clip_of_the_run_cut_short_or_removed_stops_the_resume_naming_it(
    run_copy, clips, monkeypatch, caplog, capsys, damage
):
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    run = interrupted_at(run_copy, 2)
    victim = clips[7]
    data = victim.read_bytes()
    try:
        if damage == "cut":
            victim.write_bytes(data[: len(data) // 2])
        else:
            victim.unlink()
        assert main(["--out", str(run), "--resume"]) == 2
    finally:
        victim.write_bytes(data)
    cut = f"{len(data) // 2} bytes, {len(data)} when the run started"
    expected = cut if damage == "cut" else "is missing"
    line = one_line(caplog.text, "error: --resume:", victim, expected)
    assert "start a new run with another --out" in line
    assert "Traceback" not in caplog.text + capsys.readouterr().err


def test_validation_turned_on_later_never_takes_training_clips_out(run_copy, monkeypatch, caplog):
    """The run started with eval_every=0 on a source without dev-clean: it holds nothing out, so turning
    validation on would take clips out of its training data; that is refused in one line."""
    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    run = interrupted_at(run_copy, 2)
    assert main(["--out", str(run), "--resume", "eval_every=1"]) == 2
    line = one_line(caplog.text, "error: --resume: eval_every=1: this run started with validation off")
    assert "keep eval_every=0, or start a new run with another --out" in line
    assert "Traceback" not in caplog.text


def test_the_validation_share_fixed_at_the_start_stays_out_of_training_whatever_eval_every_becomes(tmp_path):
    """A run that held 3 clips out: a resume with validation off trains on the same 27 (not 30), and one with
    validation on validates on the same 3; a run that held none out and whose source has no dev-clean is
    refused validation. The list read back is the list written (the roles and lengths)."""
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"clip{i:02d}.flac")
        paths[-1].write_bytes(bytes(100 + i))
    train = [AudioItem(str(p), 16000 + i) for i, p in enumerate(paths[:27])]
    held_out = [AudioItem(str(p), None) for p in paths[27:]]  # dev-clean's are not measured
    out = tmp_path / "run"
    out.mkdir()
    write_run_clips(out, RunClips(train, held_out, "3 clips held out"))
    read, sizes = read_run_clips(out)
    assert (read.train, read.held_out) == (train, held_out) and sizes[str(paths[3])] == 103
    everything = train + held_out
    off = resolve_config("hubert", overrides=["eval_every=0", f"data={tmp_path}"])
    on = resolve_config("hubert", overrides=["eval_every=5", "eval_clips=2", f"data={tmp_path}"])
    assert resumed_run_clips(off, out, everything, off, True).train == train
    again = resumed_run_clips(on, out, everything, off, True)
    assert (again.train, again.held_out) == (train, held_out)
    write_run_clips(out, RunClips(everything, [], "off (eval_every=0)"))
    assert resumed_run_clips(off, out, everything, off, True).train == everything
    with pytest.raises(UserInputError, match="validating now would take 2 of them out of training"):
        resumed_run_clips(on, out, everything, off, True)


def test_a_damaged_clip_list_is_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    clip = tmp_path / "a.flac"
    clip.write_bytes(b"x")
    path = write_run_clips(out, RunClips([AudioItem(str(clip), 5)] * 2, [], "off"))
    text = path.read_text()
    path.write_text(text[: len(text) - 5])  # a copy stopped half-way
    with pytest.raises(UserInputError, match=f"{path} is damaged"):
        read_run_clips(out)
