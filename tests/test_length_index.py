"""The length index (built once per run directory, then read) and the manifest command."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import warm_processes

from s3prl_laser import data
from s3prl_laser.data import AudioItem, find_audio, measure_lengths
from s3prl_laser.manifest import main as manifest_main
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.length_index import INDEX_NAME, load_or_build_index
from s3prl_laser.training.ranks import DistEnv


def write_tree(root: Path, lengths: list[int], rate: int = 16000) -> list[Path]:
    paths = []
    for number, samples in enumerate(lengths):
        path = root / f"spk{number % 3}" / f"clip{number:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.zeros(samples, dtype="float32"), rate)
        paths.append(path)
    return paths


def header_lengths(paths) -> dict[str, int]:
    """Lengths straight from libsndfile, one file at a time: the reference."""
    return {str(p): soundfile.info(str(p)).frames for p in paths}


def no_headers(monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path}: a header was read although the lengths were known")

    monkeypatch.setattr(data, "_header_frames", refuse)


def test_parallel_header_reads_match_one_at_a_time(tmp_path):
    paths = write_tree(tmp_path, [800 + 37 * n for n in range(40)])
    (tmp_path / "spk0" / "broken.flac").write_bytes(b"fLaC" + bytes(64))
    items = find_audio(tmp_path)
    serial, dropped_serial = measure_lengths(items, jobs=1)
    parallel, dropped_parallel = measure_lengths(items, jobs=8)
    assert serial == parallel and dropped_serial == dropped_parallel == 1
    assert {i.path: i.num_samples for i in parallel} == header_lengths(paths)


def test_index_is_written_once_then_read_without_touching_the_audio(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="s3prl_laser")
    corpus = tmp_path / "corpus"
    paths = write_tree(corpus, [1600 + 100 * n for n in range(12)])
    cfg = dataclasses.replace(resolve_config("hubert"), data=str(corpus))
    out = tmp_path / "run"
    first = load_or_build_index(cfg, out, DistEnv())
    assert {i.path: i.num_samples for i in first} == header_lengths(paths)
    assert (out / INDEX_NAME).is_file() and "length index written" in caplog.text

    no_headers(monkeypatch)
    monkeypatch.setattr(
        "s3prl_laser.training.length_index.find_audio", lambda *a: pytest.fail("the tree was listed")
    )
    assert load_or_build_index(cfg, out, DistEnv()) == first  # a warm start, e.g. --resume
    assert "lengths read from" in caplog.text
    # the index is itself a manifest: --data reads it without opening any audio
    assert find_audio(out / INDEX_NAME) == first


def test_index_is_rebuilt_when_the_data_changes(tmp_path):
    corpus = tmp_path / "corpus"
    write_tree(corpus, [1600] * 4)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"corpus/spk{n % 3}/clip{n:03d}.flac\n" for n in range(3)))
    cfg = dataclasses.replace(resolve_config("hubert"), data=str(manifest))
    out = tmp_path / "run"
    assert len(load_or_build_index(cfg, out, DistEnv())) == 3
    manifest.write_text(manifest.read_text() + "corpus/spk0/clip003.flac\n")
    assert len(load_or_build_index(cfg, out, DistEnv())) == 4  # the manifest changed: rebuilt
    other = dataclasses.replace(cfg, data=str(corpus))
    assert len(load_or_build_index(other, out, DistEnv())) == 4
    assert f'"data": "{corpus.resolve()}"' in (out / INDEX_NAME).read_text().splitlines()[0]


def test_a_data_error_leaves_no_run_directory(tmp_path, demo_corpus):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{next((demo_corpus / 'test-clean').rglob('*.flac'))}\n")
    cfg = dataclasses.replace(resolve_config("hubert"), data=str(manifest))
    with pytest.raises(ValueError, match="allow_held_out_splits"):
        load_or_build_index(cfg, tmp_path / "run", DistEnv())
    assert not (tmp_path / "run").exists()
    allowed = dataclasses.replace(cfg, allow_held_out_splits=True)
    assert len(load_or_build_index(allowed, tmp_path / "run", DistEnv())) == 1


def test_manifest_command_writes_lengths_that_training_reads_as_is(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    paths = write_tree(corpus, [1000 + 999 * n for n in range(9)], rate=8000)
    out = tmp_path / "lists" / "all.tsv"
    assert manifest_main([str(corpus), "-o", str(out), "--jobs", "4"]) == 0
    assert "9 clips" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[0].startswith("#") and len(lines) == 10
    inside = tmp_path / "corpus" / "all.tsv"
    assert manifest_main([str(corpus), "-o", str(inside)]) == 0
    assert inside.read_text().splitlines()[1].startswith("spk")  # below the manifest: relative paths
    no_headers(monkeypatch)
    items = find_audio(out)
    # lengths are counted at 16 kHz: twice the 8 kHz frames
    assert {i.path: i.num_samples for i in items} == {p: 2 * n for p, n in header_lengths(paths).items()}
    assert find_audio(inside) == items


def test_manifest_command_reports_a_missing_corpus_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "s3prl_laser.manifest", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m")]
    result = warm_processes.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m").exists()


def test_items_keep_their_order(tmp_path):
    paths = write_tree(tmp_path, [2000, 1000, 3000])
    items = [AudioItem(str(paths[2])), AudioItem(str(paths[0]), 5), AudioItem(str(paths[1]))]
    kept, _ = measure_lengths(items, jobs=3)
    assert [i.path for i in kept] == [i.path for i in items] and kept[1].num_samples == 5


@pytest.mark.parametrize("cut", ["at a line end", "after a tab", "inside a path"])
def test_an_index_cut_short_is_found_damaged_and_built_again(tmp_path, caplog, cut):
    """A copy of the run folder stopped half-way: an index cut at a line end silently held fewer clips, one
    cut after a tab gave a clip without a length (a TypeError traceback later)."""
    corpus = tmp_path / "corpus"
    paths = write_tree(corpus, [1600 + 100 * n for n in range(12)])
    cfg = dataclasses.replace(resolve_config("hubert"), data=str(corpus))
    out = tmp_path / "run"
    whole = load_or_build_index(cfg, out, DistEnv())
    index = out / INDEX_NAME
    text = index.read_text()
    sixth = text.splitlines(keepends=True)[6]
    end = text.index(sixth) + {"at a line end": len(sixth), "after a tab": sixth.index("\t") + 1,
                               "inside a path": 10}[cut]  # fmt: skip
    index.write_text(text[:end])
    caplog.set_level("INFO", logger="s3prl_laser")
    again = load_or_build_index(cfg, out, DistEnv())
    assert {i.path: i.num_samples for i in again} == header_lengths(paths) and again == whole
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"data: the length index {index} is damaged (cut short: it lacks its closing line); "
                        "reading the lengths again"]  # fmt: skip
    assert index.read_text() == text  # built again, whole


def test_an_edited_index_is_found_damaged(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    write_tree(corpus, [1600] * 3)
    cfg = dataclasses.replace(resolve_config("hubert"), data=str(corpus))
    out = tmp_path / "run"
    whole = load_or_build_index(cfg, out, DistEnv())
    index = out / INDEX_NAME
    index.write_text(index.read_text().replace("\t1600\n", "\t16000\n", 1))
    assert load_or_build_index(cfg, out, DistEnv()) == whole
    assert "checksum other than its closing line's" in caplog.text
