"""Paths a run stores are absolute (any working directory, any rank), and held-out audio is refused by
what it is, not by how it is spelled or linked."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.length_index import INDEX_NAME

FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-3", "eval_every=0"]


def index_paths(out: Path) -> list[str]:
    lines = [line for line in (out / INDEX_NAME).read_text().splitlines() if not line.startswith("#")]
    return [line.split("\t")[0] for line in lines]


def test_relative_data_is_stored_absolute_and_resumes_from_another_folder(
    tmp_path, tiny_hubert_ckpt, demo_corpus, monkeypatch
):
    """``data=corpus`` (relative) from one folder; ``--resume`` from another with a relative ``--out``."""
    (tmp_path / "corpus").symlink_to(demo_corpus, target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--out", "run", *FAST]
    assert main([*argv, "data=corpus", "steps=1"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "corpus")  # absolute, the link kept as the user named it
    paths = index_paths(tmp_path / "run")
    assert paths and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["--out", "../run", "--resume", "steps=2"]) == 0
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 2 and state["pairs"] == 2 * 2 and not state["counters"].get("unreadable")


def test_paths_in_a_config_yaml_are_read_against_its_folder_and_urls_are_kept(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("data: ../corpus/train.tsv\nckpt: https://x.org/m.pt\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = resolve_config("hubert", "../configs/run.yaml")
    assert cfg.data == str(tmp_path / "corpus" / "train.tsv") and cfg.ckpt == "https://x.org/m.pt"
    cfg = resolve_config("hubert", "../configs/run.yaml", ["data=clips.tsv", "ckpt=~/base.pt"])
    assert cfg.data == str(tmp_path / "cwd" / "clips.tsv")  # key=value: against the working directory
    assert cfg.ckpt == os.path.join(os.path.expanduser("~"), "base.pt")


def test_a_ckpt_folder_named_in_a_config_yaml_is_read_against_its_folder_not_taken_for_a_hub_id(
    tmp_path, monkeypatch
):
    """``ckpt: models/wavlm`` (an owner/name shape) beside the YAML was kept as a hub id and downloaded."""
    from hf_folders import build_hf_folder

    from s3prl_laser.models.sources import check_source
    from s3prl_laser.training.paths import absolute_paths

    (tmp_path / "configs").mkdir()
    folder = build_hf_folder(tmp_path / "configs" / "models" / "wavlm", "wavlm", "base")
    (tmp_path / "configs" / "run.yaml").write_text("ckpt: models/wavlm\ndata: corpus\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = resolve_config("wavlm", "../configs/run.yaml")
    assert cfg.ckpt == str(folder) and cfg.data == str(tmp_path / "configs" / "corpus")
    check_source(cfg.ckpt)  # a transformers folder: config.json found
    base = tmp_path / "configs"  # an id with no such folder there stays an id, and so does an s3prl name
    for name in ("microsoft/wavlm-base-plus", "wavlm_base_plus", "https://x.org/m.pt"):
        assert absolute_paths({"ckpt": name}, base) == {"ckpt": name}
    (base / "wavlm_base_plus").mkdir()  # a folder of that name beside the YAML is what it names
    assert absolute_paths({"ckpt": "wavlm_base_plus"}, base) == {"ckpt": str(base / "wavlm_base_plus")}


def test_a_relative_manifest_from_another_folder_lists_absolute_clips(tmp_path, demo_corpus, monkeypatch):
    from s3prl_laser.data import find_audio

    clips = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))[:3]
    (tmp_path / "lists").mkdir()
    for clip in clips:
        shutil.copy(clip, tmp_path / "lists" / clip.name)
    (tmp_path / "lists" / "train.tsv").write_text("\n".join(clip.name for clip in clips) + "\n")
    monkeypatch.chdir(tmp_path)
    items = find_audio("lists/train.tsv")
    assert [item.path for item in items] == sorted(str(tmp_path / "lists" / clip.name) for clip in clips)


@pytest.mark.fault_injection
@pytest.mark.slow
def test_torchrun_rank_1_reads_the_index_of_relative_data(tmp_path, tiny_hubert_ckpt, demo_corpus):
    """Two gloo ranks started in one folder with ``data`` and ``--out`` relative: rank 1 reads rank 0's
    index and finds every clip (it used to read them against ``--out`` and find none)."""
    (tmp_path / "corpus").symlink_to(demo_corpus, target_is_directory=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "s3prl_laser.finetune", "--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt)]
    cmd += ["--out", "run", "--device", "cpu", "data=corpus", *FAST, "steps=2", "save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "unreadable" not in log and "skipped" not in log
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 2 and state["pairs"] == 2 * 2 * 2


# ----------------------------------------------------------------------------------------------------------
# held-out audio, whichever road it takes


def copy_split(demo_corpus: Path, split: str, target: Path, clips: int = 2) -> list[Path]:
    """Copy ``clips`` files of the demo corpus' ``split`` into ``target`` (speaker/chapter folders kept)."""
    copied = []
    for clip in sorted((demo_corpus / split).rglob("*.flac"))[:clips]:
        dest = target / clip.relative_to(demo_corpus / split)
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy(clip, dest)))
    return copied


def refused(tmp_path: Path, ckpt: Path, data: Path, caplog) -> str:
    """Run the command on ``data``; assert the one-line refusal before any model; return stderr."""
    out = tmp_path / "run"
    argv = ["--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *FAST]
    assert main([*argv, "steps=1"]) == 2  # (a run that trains on it ends with 0 after one step)
    err = caplog.text
    assert "are LibriSpeech dev/test audio" in err and "allow_held_out_splits" in err
    assert "Traceback" not in err
    assert not out.exists()
    return err


def test_a_folder_linked_to_test_clean_is_refused(tmp_path, tiny_hubert_ckpt, demo_corpus, caplog):
    (tmp_path / "mine").symlink_to(demo_corpus / "test-clean", target_is_directory=True)
    err = refused(tmp_path, tiny_hubert_ckpt, tmp_path / "mine", caplog)
    assert str(demo_corpus / "test-clean") in err  # the message says what the link really is


def test_a_manifest_of_links_to_dev_clean_files_is_refused(tmp_path, tiny_hubert_ckpt, demo_corpus, caplog):
    train = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))[:4]
    dev = sorted((demo_corpus / "dev-clean").rglob("*.flac"))[:1]
    (tmp_path / "links").mkdir()
    for i, clip in enumerate([*train, *dev]):
        (tmp_path / "links" / f"clip{i}.flac").symlink_to(clip)
    (tmp_path / "clips.txt").write_text("\n".join(f"links/clip{i}.flac" for i in range(5)) + "\n")
    err = refused(tmp_path, tiny_hubert_ckpt, tmp_path / "clips.txt", caplog)
    assert "1 of 5 clips" in err and "clip4.flac" in err


@pytest.mark.parametrize("spelling", ["Test-Clean", "test_clean", "dev_other", "DEV-CLEAN"])
def test_split_folders_spelled_otherwise_are_refused(
    tmp_path, tiny_hubert_ckpt, demo_corpus, caplog, spelling
):
    copy_split(demo_corpus, "train-clean-100", tmp_path / "corpus" / "train", clips=4)
    copy_split(demo_corpus, "test-clean", tmp_path / "corpus" / spelling)
    err = refused(tmp_path, tiny_hubert_ckpt, tmp_path / "corpus", caplog)
    assert f"/{spelling}/" in err and "2 of 6 clips" in err


def test_train_folders_with_odd_spellings_still_train(tmp_path, demo_corpus):
    from s3prl_laser.data import find_audio, refuse_held_out

    copy_split(demo_corpus, "train-clean-100", tmp_path / "corpus" / "Train_Clean_100", clips=3)
    (tmp_path / "corpus" / "latest").symlink_to(tmp_path / "corpus" / "Train_Clean_100")
    items = find_audio(tmp_path / "corpus")
    assert len(items) == 3
    refuse_held_out(items, tmp_path / "corpus")  # no error: nothing held out


def test_under_umask_002_every_file_of_a_run_and_an_export_is_group_readable(
    tmp_path, tiny_hubert_ckpt, demo_corpus
):
    """A group-shared folder: under ``umask 002`` what a run and an export write is 664 (folders 775), as a
    plain ``open()`` gives; files written as a temporary file and renamed were 600 (teammates could not read
    the model)."""
    from s3prl_laser.export import main as export

    previous = os.umask(0o002)
    try:
        out = tmp_path / "run"
        argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
        keys = [*FAST[:-1], "steps=2", "eval_every=1", "eval_clips=2", "save_every=1"]
        assert main([*argv, "--out", str(out), *keys]) == 0
        assert export(["--ckpt", str(out / "hubert_laser.pt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    written = [p for folder in (out, tmp_path / "hf") for p in [folder, *folder.rglob("*")]]
    names = {p.name for p in written}
    assert {"hubert_laser.pt", "hubert_laser_best.pt", "best.pt", "config.yaml", "model.safetensors"} <= names
    assert any(name.startswith("step_") for name in names)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    expected = {p: "0o775" if (tmp_path / p).is_dir() else "0o664" for p in modes}
    wrong = {p: mode for p, mode in modes.items() if mode != expected[p]}
    assert not wrong, wrong


def corpus_copy(demo_corpus: Path, root: Path) -> Path:
    """A LibriSpeech root of real files (not links) in ``root``: the demo's train-clean-100 and test-clean."""
    for split in ("train-clean-100", "test-clean"):
        shutil.copytree(demo_corpus / split, root / split)
    return root


def test_a_test_clean_file_hard_linked_into_train_is_refused_naming_its_split(
    tmp_path, tiny_hubert_ckpt, demo_corpus, caplog
):
    """A test-clean file hard-linked into train-clean-100 under a training clip's name: no folder and no
    link says test-clean, only its identity (device and inode)."""
    root = corpus_copy(demo_corpus, tmp_path / "LibriSpeech")
    source = sorted((root / "test-clean").rglob("*.flac"))[0]
    linked = root / "train-clean-100" / "1001" / "10010" / "1001-10010-9000.flac"
    os.link(source, linked)
    clips = sorted((root / "train-clean-100").rglob("*.flac"))
    (tmp_path / "list.txt").write_text("\n".join(map(str, clips)) + "\n")
    out = tmp_path / "run"
    for data in (root, tmp_path / "list.txt"):  # the root, and a manifest of its training clips
        caplog.clear()
        argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(data)]
        assert main([*argv, "--out", str(out), *FAST, "steps=1"]) == 2
        [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert f"(first: {linked}: it is the same file as {source} of test-clean (a hard link))" in line, line
        assert "allow_held_out_splits=true" in line and not out.exists()


def test_a_copy_named_as_a_test_clean_utterance_is_refused_wherever_it_lies(
    tmp_path, tiny_hubert_ckpt, demo_corpus, caplog
):
    """A test-clean file copied into a training folder keeps its LibriSpeech id: speaker 1089 is a
    test-clean speaker (the shipped list), and so is one that the corpus' own SPEAKERS.TXT names."""
    root = corpus_copy(demo_corpus, tmp_path / "LibriSpeech")
    clip = sorted((root / "train-clean-100").rglob("*.flac"))[0]
    copy = tmp_path / "elsewhere" / "1089-134686-0000.flac"  # outside any split folder
    copy.parent.mkdir()
    shutil.copy(clip, copy)
    (tmp_path / "list.txt").write_text(f"{clip}\n{copy}\n")
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--out", str(tmp_path / "run")]
    assert main([*argv, "--data", str(tmp_path / "list.txt"), *FAST, "steps=1"]) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"1 of 2 clips are LibriSpeech dev/test audio (first: {copy}: its name is utterance " in line
    assert "1089-134686-0000 of test-clean speaker 1089)" in line, line
    # a speaker that only the corpus' own SPEAKERS.TXT lists as dev-other
    (root / "SPEAKERS.TXT").write_text(";ID |SEX| SUBSET |MINUTES| NAME\n1001 | F | dev-other | 25 | A\n")
    caplog.clear()
    assert main([*argv, "--data", str(root), *FAST, "steps=1"]) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "of dev-other speaker 1001)" in line, line
    from s3prl_laser.data import held_out_speakers  # the shipped lists: LibriSpeech's dev/test speakers

    speakers = held_out_speakers()  # LibriSpeech paper, table 1: 40, 33, 40 and 33 speakers
    assert [sum(split == name for split in speakers.values()) for name in
            ("dev-clean", "dev-other", "test-clean", "test-other")] == [40, 33, 40, 33]  # fmt: skip
