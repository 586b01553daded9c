"""SUPERB downstream recipes: data preparation, config resolution, end to end through s3prl, comparison.

Independent references: the audio decoded with soundfile, the chapter transcript files, s3prl's own ASR
dataset reading our bucket CSVs, and WER recomputed from the hypothesis/reference files s3prl writes.
"""

import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile
import yaml
from foreign_lines import foreign_lines

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "downstream_recipes"
SPLITS = ["train-clean-100", "dev-clean", "test-clean"]


@pytest.fixture
def recipes(monkeypatch):
    """The recipe modules, imported from downstream_recipes/ as the scripts import each other."""
    monkeypatch.syspath_prepend(str(RECIPES))
    import compare
    import prepare_librispeech
    import superb

    return SimpleNamespace(compare=compare, prepare=prepare_librispeech, superb=superb)


def transcripts_of(root: Path, split: str) -> dict[str, str]:
    lines = [line for f in (root / split).rglob("*.trans.txt") for line in f.read_text().splitlines()]
    return dict(line.split(" ", 1) for line in lines if line.strip())


def run_recipe(task: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(RECIPES / f"superb_{task}.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bucket_csvs_match_the_corpus(recipes, demo_corpus, tmp_path):
    recipes.prepare.write_bucket_csvs(demo_corpus, SPLITS, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.csv" for s in SPLITS)
    for split in SPLITS:
        with open(tmp_path / f"{split}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        assert list(rows[0]) == ["file_path", "length", "label"]
        audio = sorted(p.relative_to(demo_corpus).as_posix() for p in (demo_corpus / split).rglob("*.flac"))
        assert sorted(row["file_path"] for row in rows) == audio
        transcripts = transcripts_of(demo_corpus, split)
        for row in rows:
            samples, rate = soundfile.read(demo_corpus / row["file_path"])
            assert (int(row["length"]), rate) == (len(samples), 16000)
            assert row["label"] == transcripts[Path(row["file_path"]).stem]


def test_s3prl_asr_dataset_reads_the_bucket_csvs(recipes, demo_corpus, tmp_path):
    from s3prl.downstream.asr.dataset import SequenceDataset
    from s3prl.downstream.asr.dictionary import Dictionary

    recipes.prepare.write_bucket_csvs(demo_corpus, ["test-clean"], tmp_path)
    dictionary = Dictionary.load(str(RECIPES / "configs" / "char.dict"))
    dataset = SequenceDataset(
        "test-clean", 1, dictionary, str(demo_corpus), str(tmp_path), **{"test-clean": ["test-clean"]}
    )
    transcripts = transcripts_of(demo_corpus, "test-clean")
    assert len(dataset) == len(transcripts)
    for index in range(len(dataset)):
        (wav,), (label,), (name,) = dataset.collate_fn([dataset[index]])
        words = (
            dictionary.string(label[label != dictionary.eos()].tolist()).replace(" ", "").replace("|", " ")
        )
        assert words.strip() == transcripts[name]
        assert wav.ndim == 1 and len(wav) > 0


def test_characters_outside_the_dictionary_are_refused(recipes, demo_corpus, tmp_path):
    chapter = next((demo_corpus / "test-clean").glob("*/*"))
    copy = tmp_path / "test-clean" / chapter.parent.name / chapter.name
    shutil.copytree(chapter, copy)
    trans = next(copy.glob("*.trans.txt"))
    trans.write_text(trans.read_text().replace("THE", "THÉ", 1))
    with pytest.raises(ValueError, match=r"characters \['É'\] are not in"):
        recipes.prepare.check_characters(tmp_path, ["test-clean"], RECIPES / "configs" / "char.dict")


def test_steps_scale_every_interval(recipes):
    superb_runner = yaml.safe_load((RECIPES / "configs" / "asr.yaml").read_text())["runner"]
    assert recipes.superb.scale_runner(superb_runner, None) == superb_runner
    assert recipes.superb.scale_runner(superb_runner, 200000) == superb_runner
    tenth = recipes.superb.scale_runner(superb_runner, 20000)
    assert (tenth["total_steps"], tenth["log_step"], tenth["eval_step"], tenth["save_step"]) == (
        20000,
        10,
        200,
        50,
    )
    tiny = recipes.superb.scale_runner(superb_runner, 4)
    assert (tiny["total_steps"], tiny["log_step"], tiny["eval_step"], tiny["save_step"]) == (4, 1, 1, 1)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        recipes.superb.scale_runner(superb_runner, 0)


def test_overrides_set_existing_keys_only(recipes):
    config = {"runner": {"log_step": 100}, "model": {"dim": [1024, 1024]}}
    recipes.superb.apply_overrides(config, ["runner.log_step=5", "model.dim=[8, 8]"])
    assert config == {"runner": {"log_step": 5}, "model": {"dim": [8, 8]}}
    with pytest.raises(ValueError, match="no key 'runner.log_stp'"):
        recipes.superb.apply_overrides(config, ["runner.log_stp=5"])


def fake_s3prl_checkout(root: Path, corpus: dict) -> Path:
    """A checkout with the files PR needs; libriphone.yaml keeps SUPERB's structure with ``corpus``."""
    tree = root / "s3prl"
    code = ["run_downstream.py", "downstream/runner.py", "downstream/ctc/corpus/libriphone.py",
            *(f"downstream/ctc/{name}.py" for name in ("expert", "data", "metric", "text"))]  # fmt: skip
    for path in [*code, "downstream/ctc/lexicon/lex.txt", "downstream/ctc/vocab/phoneme.txt"]:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("")
    config = {
        "runner": {
            "total_steps": 100000,
            "log_step": 100,
            "eval_step": 1000,
            "save_step": 100,
            "eval_dataloaders": ["dev"],
        },  # fmt: skip
        "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-2},
        "downstream_expert": {
            "corpus": {"name": "libriphone", "lexicon": ["downstream/ctc/lexicon/lex.txt"], **corpus},
            "text": {"mode": "word", "vocab_file": "downstream/ctc/vocab/phoneme.txt"},
        },
    }
    (tree / "downstream/ctc/libriphone.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.mark.parametrize("layout", ["csv_dir", "path"])
def test_pr_config_resolves_a_checkout(recipes, demo_corpus, tmp_path, layout):
    corpus = (
        {"csv_dir": "data/superb_pr", "train": "train.csv", "dev": "dev.csv", "test": "test.csv"}
        if layout == "csv_dir"
        else {"path": "/path/to/LibriSpeech", "train": ["train-clean-100"], "dev": ["dev-clean"]}
    )
    src = fake_s3prl_checkout(tmp_path / "src", corpus)
    args = recipes.superb.get_args_parser("pr").parse_args(
        [
            "--upstream",
            "wavlm_laser",
            "--librispeech",
            str(demo_corpus),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "10",
            "--s3prl-src",
            str(src),
        ]  # fmt: skip
    )
    (tmp_path / "out").mkdir()
    tree = recipes.superb.s3prl_tree(src)
    recipe = recipes.superb.pr_recipe(args, tree)
    config = yaml.safe_load(recipes.superb.pr_config(args, tmp_path / "out", tree, recipe).read_text())
    assert config["optimizer"]["lr"] == 5.0e-4
    assert config["runner"]["total_steps"] == 10
    expert = config["downstream_expert"]
    assert expert["corpus"]["lexicon"] == [str(tree / "downstream/ctc/lexicon/lex.txt")]
    assert expert["text"]["vocab_file"] == str(tree / "downstream/ctc/vocab/phoneme.txt")
    if layout == "path":
        assert expert["corpus"]["path"] == str(demo_corpus.resolve())
        return
    csv_dir = Path(expert["corpus"]["csv_dir"])
    for key, split in zip(["train", "dev", "test"], SPLITS, strict=True):
        with open(csv_dir / f"{key}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        transcripts = transcripts_of(demo_corpus, split)
        assert {Path(row["wav_path"]).stem: row["transcription"] for row in rows} == transcripts
        assert all(Path(row["wav_path"]).is_absolute() and Path(row["wav_path"]).is_file() for row in rows)


def test_pr_recipe_names_what_the_pypi_package_lacks(demo_corpus, tiny_hubert_ckpt, tmp_path):
    done = run_recipe("pr", "--upstream", "hubert_laser", "--ckpt", str(tiny_hubert_ckpt), "--librispeech",
                      str(demo_corpus), "--out", str(tmp_path / "out"), "--steps", "4")  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    for needed in ["downstream/ctc/libriphone.yaml", "downstream/ctc/corpus/libriphone.py", "--s3prl-src"]:
        assert needed in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr  # one line
    # the tree the recipe is tested with, on every lane
    assert "git clone https://github.com/s3prl/s3prl.git s3prl-src && git -C s3prl-src checkout v0.4.18" in (
        done.stderr
    )
    assert not (tmp_path / "out" / "result.json").exists()

    src = tmp_path / "src"
    (src / "s3prl").mkdir(parents=True)
    (src / "s3prl" / "run_downstream.py").write_text("")
    done = run_recipe("pr", "--upstream", "hubert_laser", "--ckpt", str(tiny_hubert_ckpt), "--librispeech",
                      str(demo_corpus), "--out", str(tmp_path / "out"), "--s3prl-src", str(src))  # fmt: skip
    assert done.returncode == 2
    assert str(src.resolve() / "s3prl" / "downstream" / "ctc" / "libriphone.yaml") in done.stderr


def check_result(out: Path, task: str, upstream: str, metric: str) -> float:
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"task", "upstream", "metric", "value"}
    assert (result["task"], result["upstream"], result["metric"]) == (task, upstream, metric)
    assert math.isfinite(result["value"]) and result["value"] >= 0
    return result["value"]


def word_error_rate(hyp_file: Path, ref_file: Path) -> float:
    import editdistance

    def read(path):
        return dict((line.split(" ", 1) + [""])[:2] for line in path.read_text().splitlines() if line.strip())

    hyps, refs = read(hyp_file), read(ref_file)
    errors = sum(editdistance.eval(hyps[utt].split(), ref.split()) for utt, ref in refs.items())
    return 100.0 * errors / sum(len(ref.split()) for ref in refs.values())


@pytest.mark.slow
@pytest.mark.espnet_lane
def test_asr_recipe_end_to_end(wavlm_demo_run, demo_corpus, tmp_path):
    """The demo fine-tune (as a user runs it, shortened: the session's WavLM demo), then SUPERB ASR on the
    LASER-tuned upstream."""
    import torch

    run, _ = wavlm_demo_run  # its screen: test_quiet_screen.py::test_finetune_demo_shows_only_ours
    base = torch.load(run / "tiny_wavlm.pt", weights_only=True)["model"]  # WavLM's own format: cfg + model
    laser = torch.load(run / "wavlm_laser.pt", weights_only=True)["model"]
    assert any(not torch.equal(base[k], laser[k]) for k in base), "the demo fine-tune changed no weight"

    out = tmp_path / "asr"
    done = run_recipe("asr", "--upstream", "wavlm_laser", "--ckpt", str(run / "wavlm_laser.pt"),
                      "--librispeech", str(demo_corpus), "--out", str(out), "--steps", "4", "--device", "cpu",
                      "--smoke")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert foreign_lines(done.stdout + done.stderr) == []  # s3prl's runner's warnings stay in its log
    value = check_result(out, "ASR", "wavlm_laser", "WER")
    recomputed = word_error_rate(
        out / "exp" / "test-clean-noLM-hyp.ark", out / "exp" / "test-clean-noLM-ref.ark"
    )
    assert value == pytest.approx(recomputed)
    config = yaml.safe_load((out / "asr.yaml").read_text())
    assert (config["runner"]["total_steps"], config["optimizer"]["lr"]) == (4, 1.0e-4)
    assert config["runner"]["eval_step"] == 4  # --smoke: dev once, at the end
    assert config["downstream_expert"]["modelrc"]["RNNs"]["dim"] == [16]


def s3prl_source_tree() -> Path | None:
    """s3prl's v0.4.18 source tree: ``$S3PRL_SRC`` if set, else ``shared/s3prl-src`` beside this checkout
    (or beside its parent folder, for a worktree one level deeper); None if there is none."""
    if os.environ.get("S3PRL_SRC"):
        return Path(os.environ["S3PRL_SRC"])
    for parent in REPO.parents[:2]:
        if (parent / "shared" / "s3prl-src" / "s3prl" / "run_downstream.py").is_file():
            return parent / "shared" / "s3prl-src"
    return None


S3PRL_SRC = s3prl_source_tree()
needs_s3prl_src = pytest.mark.skipif(
    S3PRL_SRC is None,
    reason=f"needs s3prl's v0.4.18 source tree: $S3PRL_SRC, or {REPO.parent / 'shared' / 's3prl-src'}",
)
DEMO_PHONES = ["--lexicon", "phonemes/lexicon.txt", "--vocab", "phonemes/inventory.txt"]  # in demo_corpus


def demo_phones(demo_corpus: Path) -> list[str]:
    """``--lexicon``/``--vocab`` of the demo corpus: the tree lacks the 200k lexicon, the corpus has one."""
    return [str(demo_corpus / arg) if arg.startswith("phonemes/") else arg for arg in DEMO_PHONES]


def read_ark(path: Path) -> dict[str, list[str]]:
    """``{utterance id: tokens}`` of an s3prl ``<split>-{hyp,ref}.ark`` (first field: the audio path)."""
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {Path(row[0]).name.split(".")[0]: row[1:] for row in rows}


@pytest.mark.slow
@pytest.mark.espnet_lane
@needs_s3prl_src
@pytest.mark.parametrize("upstream", ["hubert_laser", "wavlm_laser"])
def test_pr_recipe_end_to_end(upstream, request, demo_corpus, tmp_path):
    """SUPERB PR through s3prl's unchanged run_downstream from the v0.4.18 tree (used in place: the recipe
    writes nothing into it), a few steps on the demo corpus, on the LASER-tuned WavLM of the session's demo
    and a tiny HuBERT; PER recomputed from the hypothesis/reference files s3prl writes, references checked
    against the transcripts spelled with the corpus's lexicon."""
    if upstream == "wavlm_laser":
        ckpt = request.getfixturevalue("wavlm_demo_run")[0] / "wavlm_laser.pt"
    else:
        ckpt = request.getfixturevalue("tiny_hubert_ckpt")
    out = tmp_path / "pr"
    done = run_recipe("pr", "--upstream", upstream, "--ckpt", str(ckpt), "--librispeech", str(demo_corpus),
                      "--out", str(out), "--steps", "2", "--device", "cpu", "--s3prl-src", str(S3PRL_SRC),
                      *demo_phones(demo_corpus), "--smoke")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert foreign_lines(done.stdout + done.stderr) == []  # s3prl's runner's warnings stay in its log
    value = check_result(out, "PR", upstream, "PER")
    hyps, refs = read_ark(out / "exp" / "test-hyp.ark"), read_ark(out / "exp" / "test-ref.ark")
    lexicon = {}
    for line in (demo_corpus / "phonemes" / "lexicon.txt").read_text().splitlines():
        word, *phones = line.split()
        lexicon.setdefault(word, phones)  # SUPERB PR's rule: the first pronunciation of a word
    expected = {utt: [phone for word in words.split() for phone in lexicon[word]]
                for utt, words in transcripts_of(demo_corpus, "test-clean").items()}  # fmt: skip
    assert refs == expected
    import editdistance

    errors = sum(editdistance.eval(hyps[utt], ref) for utt, ref in refs.items())
    assert value == pytest.approx(100.0 * errors / sum(len(ref) for ref in refs.values()))
    config = yaml.safe_load((out / "pr.yaml").read_text())
    assert (config["runner"]["total_steps"], config["optimizer"]["lr"]) == (2, 5.0e-4)
    assert config["downstream_expert"]["corpus"]["lexicon"] == [str(demo_corpus / "phonemes" / "lexicon.txt")]


def copy_s3prl_tree(src: Path, dst: Path) -> Path:
    """A writable copy of ``src``'s ``s3prl/`` with what PR imports and reads: code, small files, all of
    ``downstream/ctc`` (about 4 MB of the tree's 22)."""

    def large_outside_ctc(folder, names):
        if "downstream/ctc" in Path(folder).as_posix():
            return []
        return [name for name in names if (Path(folder) / name).is_file()
                and not name.endswith(".py") and (Path(folder) / name).stat().st_size > 100_000]  # fmt: skip

    shutil.copytree(src / "s3prl", dst / "s3prl", ignore=large_outside_ctc)
    return dst


def check_refusal(done: subprocess.CompletedProcess, out: Path) -> str:
    """The recipe's refusal: exit 2, a one-line error, no traceback, no training started."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (out / "exp").exists() and not (out / "result.json").exists()
    return done.stderr


@pytest.mark.slow
@pytest.mark.espnet_lane
@needs_s3prl_src
def test_pr_recipe_refuses_a_tree_that_cannot_run_before_training(demo_corpus, tiny_hubert_ckpt, tmp_path):
    """Two real broken copies of the tree: one without the ctc corpus module, one whose corpus module needs a
    package this environment lacks (a tree of another s3prl version); then a lexicon without a corpus word."""
    out = tmp_path / "out"
    common = ["--upstream", "hubert_laser", "--ckpt", str(tiny_hubert_ckpt), "--librispeech",
              str(demo_corpus), "--out", str(out), "--steps", "2", "--device", "cpu", "--smoke"]  # fmt: skip
    phones = demo_phones(demo_corpus)
    tree = copy_s3prl_tree(S3PRL_SRC, tmp_path / "src")
    corpus_module = tree / "s3prl" / "downstream" / "ctc" / "corpus" / "libriphone.py"
    code = corpus_module.read_text()
    corpus_module.unlink()
    stderr = check_refusal(run_recipe("pr", *common, *phones, "--s3prl-src", str(tree)), out)
    assert stderr.count("\n") == 1, stderr
    assert str(corpus_module.resolve()) in stderr and "checkout v0.4.18" in stderr

    missing = "s3prl_laser_absent_g2p"
    assert importlib.util.find_spec(missing) is None
    corpus_module.write_text(code.replace("from joblib import Parallel, delayed", f"import {missing}"))
    stderr = check_refusal(run_recipe("pr", *common, *phones, "--s3prl-src", str(tree)), out)
    assert stderr.count("\n") == 1, stderr
    assert "importing s3prl.downstream.ctc.corpus.libriphone fails with ModuleNotFoundError" in stderr
    assert f"pip install {missing}" in stderr and str(tree) in stderr

    lexicon = tmp_path / "lexicon.txt"
    lines = (demo_corpus / "phonemes" / "lexicon.txt").read_text().splitlines()
    lexicon.write_text("\n".join(line for line in lines if not line.startswith("ABOVE\t")) + "\n")
    vocab = str(demo_corpus / "phonemes" / "inventory.txt")
    done = run_recipe("pr", *common, "--s3prl-src", str(S3PRL_SRC), "--lexicon", str(lexicon), "--vocab",
                      vocab)  # fmt: skip
    stderr = check_refusal(done, out)
    assert stderr.count("\n") == 1 and "'ABOVE' is in no lexicon" in stderr, stderr

    # the demo lexicon (no stress marks) with the tree's phone list (stressed vowels): --vocab forgotten
    done = run_recipe("pr", *common, "--s3prl-src", str(S3PRL_SRC), "--lexicon", phones[1])
    stderr = check_refusal(done, out)
    assert stderr.count("\n") == 1 and "is not in the vocabulary" in stderr, stderr
    assert "pass --vocab" in stderr

    # the tree as it is, without --lexicon: its libriphone.yaml names the 200k lexicon the tree lacks
    stderr = check_refusal(run_recipe("pr", *common, "--s3prl-src", str(S3PRL_SRC)), out)
    assert "librispeech-lexicon-200k-g2p.txt" in stderr and "pass --lexicon FILE" in stderr, stderr


def test_compare_tabulates_and_plots_against_the_paper(recipes, tmp_path):
    results = {"hubert_local": 10.0, "hubert_laser": 9.0, "wavlm_laser": 5.0, "xls_r_300m": 8.0,
               "wav2vec2_laser": 7.0}  # fmt: skip
    for upstream, value in results.items():
        (tmp_path / "runs" / upstream).mkdir(parents=True)
        result = {"task": "ASR", "upstream": upstream, "metric": "WER", "value": value}
        (tmp_path / "runs" / upstream / "result.json").write_text(json.dumps(result))
    assert recipes.compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    hubert = next(line for line in table if line.startswith("| HuBERT | ASR"))
    assert [c.strip() for c in hubert.strip("|").split("|")][3:] == [
        "10.00", "9.00", "-10.0 %", "6.42", "6.18", f"{100 * (6.18 - 6.42) / 6.42:+.1f} %"
    ]  # fmt: skip
    wavlm = next(line for line in table if line.startswith("| WavLM | ASR"))
    assert [c.strip() for c in wavlm.strip("|").split("|")][3:6] == ["–", "5.00", "–"]
    wav2vec2 = next(line for line in table if line.startswith("| wav2vec 2.0 | ASR"))  # no paper row
    cells = [c.strip() for c in wav2vec2.strip("|").split("|")][3:]
    assert cells == ["8.00", "7.00", "-12.5 %", "–", "–", "–"]
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_two_results_for_one_cell(recipes, tmp_path):
    for name in ("a", "b"):
        result = {"task": "PR", "upstream": "wavlm_laser", "metric": "PER", "value": 4.0}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="two LASER results for WavLM PR"):
        recipes.compare.collect(recipes.compare.read_results([tmp_path / "a.json", tmp_path / "b.json"]))
