"""``python -m s3prl_laser.probe`` end to end on the bundled demo corpus with tiny upstreams; user errors.

The tiny base (``hubert_local``) and a second tiny model standing for the tuned one (``hubert_laser``: the
entry LASER exports load through) are probed on the same clips, with characters and with the corpus' phone
lexicon (``phonemes/lexicon.txt``, made by espeak-ng with the corpus). User mistakes are made for real.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest
import warm_processes

from s3prl_laser.fixtures import build_tiny_hubert
from s3prl_laser.probe.cli import main


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


FAST = ["--steps", "60", "--eval-every", "20", "--patience", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory):
    return build_tiny_hubert(tmp_path_factory.mktemp("tuned") / "tiny_tuned.pt", seed=1)


@pytest.mark.slow
def test_demo_corpus_end_to_end_chars_and_lexicon_then_cache(
    demo_corpus, tiny_hubert_ckpt, tuned_ckpt, tmp_path, caplog
):
    lexicon = demo_corpus / "phonemes" / "lexicon.txt"
    argv = ["--data", str(demo_corpus.parent), "--upstream", f"hubert_laser:{tuned_ckpt}",
            "--upstream", f"hubert_local:{tiny_hubert_ckpt}", "--lexicon", str(lexicon),
            "--out", str(tmp_path), *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    results = report["upstreams"]
    assert [r["name"] for r in results] == ["hubert_laser", "hubert_local"]
    assert results[1]["ckpt"] == str(tiny_hubert_ckpt)
    # the CER again, from the transcripts of dev-clean and the hypotheses kept in probe.json, by a
    # Levenshtein distance written here: pooled edits over pooled length of exactly the evaluation clips
    transcripts = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1].strip()
        for trans in (demo_corpus / "dev-clean").glob("*/*/*.trans.txt")
        for line in trans.read_text().splitlines() if line.strip()
    }  # fmt: skip
    references = ["|".join(transcripts[u].split()) for u in report["settings"]["eval_clips"]]
    for r in results:
        scores = r["utterances"]["cer"]
        hypotheses = [h.replace(" ", "|") for h in scores["hypotheses"]]
        edits = [levenshtein(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
        assert scores["ref_lengths"] == [len(ref) for ref in references] and scores["edits"] == edits
        assert r["cer"] == pytest.approx(sum(edits) / sum(len(ref) for ref in references), abs=1e-12)
        per = r["utterances"]["per"]
        assert r["per"] == pytest.approx(sum(per["edits"]) / sum(per["ref_lengths"]), abs=1e-12)
        for kind in ("cer", "per"):
            assert len(r["layer_weights"][kind]) == 5  # 4 layers + the CNN output
            assert sum(r["layer_weights"][kind]) == pytest.approx(1.0, abs=1e-5)
    # the demo corpus is smaller than asked: used whole (40 training clips, 10 of dev-clean), never test-clean
    assert len(report["settings"]["train_clips"]) == 40 and len(report["settings"]["eval_clips"]) == 10
    assert all(
        u.startswith(("1", "2")) for u in report["settings"]["train_clips"] + report["settings"]["eval_clips"]
    )
    assert "less than the" in caplog.text
    for kind in ("cer", "per"):  # the interval of the second row holds its own relative difference
        entry = results[1]["vs_first"][kind]
        assert entry["relative"] == pytest.approx((results[1][kind] - results[0][kind]) / results[0][kind])
        assert entry["interval95"][0] <= entry["relative"] <= entry["interval95"][1]
        assert entry["within_noise"] == (entry["interval95"][0] <= 0 <= entry["interval95"][1])
    assert (tmp_path / "probe_layers.png").stat().st_size > 0
    table = (tmp_path / "probe_table.txt").read_text()
    assert "CER" in table and "PER" in table and "hubert_local" in table and "95 % interval" in table
    # a second probe of the same upstreams on the same clips reads the features back from the cache
    caplog.clear()
    assert main(argv) == 0
    assert caplog.text.count("read from the cache") == 2
    assert (
        json.loads((tmp_path / "probe.json").read_text())["upstreams"] == results
    )  # same seed, same numbers


def test_unreadable_cache_is_computed_again(demo_corpus, tiny_hubert_ckpt, tmp_path, caplog, capsys):
    argv = ["--data", str(demo_corpus), "--upstream", f"hubert_local:{tiny_hubert_ckpt}",
            "--out", str(tmp_path), "--train-hours", "0.01", "--dev-minutes", "0.1", *FAST]  # fmt: skip
    assert main(argv) == 0
    assert "one upstream: add the model to compare with, e.g. its base, as a second --upstream" in (
        capsys.readouterr().out
    )  # a one-row table says how to add the base
    (cached,) = (tmp_path / "cache").glob("*.f16")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    caplog.clear()
    assert main(argv) == 0
    assert "is unreadable" in caplog.text and "computing the features again" in caplog.text


def test_missing_dev_clean_is_one_line_exit_2(demo_corpus, tiny_hubert_ckpt, tmp_path):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(demo_corpus / "train-clean-100", root / "train-clean-100")
    command = [sys.executable, "-m", "s3prl_laser.probe", "--data", str(tmp_path),
               "--upstream", f"hubert_local:{tiny_hubert_ckpt}", "--out", str(tmp_path / "out")]  # fmt: skip
    result = warm_processes.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "no dev-clean/ folder" in result.stderr and str(root) in result.stderr


@pytest.mark.parametrize(
    ("upstream", "message"),
    [("hubert_lokal", "s3prl has no upstream named 'hubert_lokal' (did you mean hubert_local"),
     ("hubert_local:{missing}", "no such file or folder"), ("hubert_laser:{missing}", "does not exist")],
)  # fmt: skip
def test_unknown_upstream_or_missing_checkpoint_exit_2(demo_corpus, tmp_path, caplog, upstream, message):
    spec = upstream.format(missing=tmp_path / "nope.pt")
    assert main(["--data", str(demo_corpus), "--upstream", spec, "--out", str(tmp_path)]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "probe.json").exists()


def test_lexicon_without_a_word_of_the_transcripts_exit_2(demo_corpus, tiny_hubert_ckpt, tmp_path, caplog):
    lexicon = tmp_path / "lexicon.txt"
    full = (demo_corpus / "phonemes" / "lexicon.txt").read_text().splitlines()
    lexicon.write_text("\n".join(line for line in full if not line.startswith("THE\t")) + "\n")
    argv = ["--data", str(demo_corpus), "--upstream", f"hubert_local:{tiny_hubert_ckpt}",
            "--lexicon", str(lexicon), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert f"--lexicon {lexicon}: 1 word(s) of the transcripts have no entry (THE)" in caplog.text


def test_demo_lexicon_covers_every_word_of_the_corpus(demo_corpus):
    from s3prl_laser.probe.clips import read_split
    from s3prl_laser.probe.targets import read_lexicons

    lexicon = read_lexicons([demo_corpus / "phonemes" / "lexicon.txt"])
    inventory = set((demo_corpus / "phonemes" / "inventory.txt").read_text().split())
    splits = [read_split(demo_corpus / s) for s in ("train-clean-100", "dev-clean", "test-clean")]
    words = {w for split in splits for items in split.values() for _, _, text in items for w in text.split()}
    assert words == set(lexicon)
    assert {ph for phones in lexicon.values() for ph in phones} <= inventory


def test_help_is_quick_and_imports_no_torch():
    code = "import sys, time; t = time.time(); from s3prl_laser.probe.cli import get_args_parser"
    code += "; get_args_parser()"
    code += "; print(time.time() - t, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    seconds, torch_loaded = result.stdout.split()
    assert torch_loaded == "False" and float(seconds) < 1.0
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "s3prl_laser.probe", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--upstream" in result.stdout
    assert time.perf_counter() - start < 5.0  # interpreter start-up included, on a busy machine


def test_probe_key_of_finetune_is_off_by_default_and_on_in_the_demo():
    from s3prl_laser.training.config import resolve_config

    assert resolve_config("hubert").probe is False
    assert resolve_config("hubert", demo=True).probe is True
    assert resolve_config("hubert", overrides=["probe=true"]).probe is True


@pytest.mark.slow
def test_demo_report_shows_the_probe_of_tuned_and_base(tmp_path, capsys):
    """probe: true runs the probe on the written upstream and its base after training; the report shows it."""
    import s3prl_laser.finetune as finetune

    out = tmp_path / "demo"
    argv = ["--upstream", "hubert", "--demo", "--out", str(out), "steps=2", "eval_every=0", "report_clips=2",
            "probe_steps=3"]  # fmt: skip
    assert finetune.main(argv) == 0
    shown = capsys.readouterr().out
    results = json.loads((out / "probe" / "probe.json").read_text())["upstreams"]
    assert [entry["name"] for entry in results] == ["hubert_local", "hubert_laser"]  # the base: reference
    lines = shown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("LASER demo: did tuning help?"))
    low, high = (100 * x for x in results[1]["vs_first"]["cer"]["interval95"])
    answer = lines[first + 2]  # the answer leads: the probe's CER, base then tuned, with its interval
    assert answer.startswith("CTC probe CER (10 dev-clean clips)") and "lower is better" in answer
    assert f"{100 * results[0]['cer']:.2f} %" in answer and f"{100 * results[1]['cer']:.2f} %" in answer
    assert f"[{low:+.1f}, {high:+.1f}] %" in answer
    ratio = lines[first + 3]
    assert ratio.startswith("same / other clip (upstream last layer)") and "lower is better" in ratio
    assert "raw: grows" in shown  # the raw divergence says why it grows
    assert lines[-1].startswith("next, on your own data: python -m s3prl_laser.finetune --upstream hubert")
    assert json.loads((out / "demo_report.json").read_text())["probe"][1]["vs_first"]["cer"]["interval95"]


def test_probe_true_without_the_probe_splits_stops_before_training(demo_corpus, tmp_path):
    """A finetune run with probe=true on data the probe cannot use stops at start: exit 2, one line."""
    clips = tmp_path / "clips"
    shutil.copytree(demo_corpus / "train-clean-100", clips)  # a folder of audio, no LibriSpeech splits
    command = [sys.executable, "-m", "s3prl_laser.finetune", "--upstream", "hubert", "--demo",
               "--data", str(clips), "--out", str(tmp_path / "run"), "probe=true"]  # fmt: skip
    result = warm_processes.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "probe=true: data" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()



def test_seeds_report_the_spread_of_the_first_seeds_figure(demo_corpus, tiny_hubert_ckpt, tmp_path, capsys):
    argv = ["--data", str(demo_corpus), "--upstream", f"hubert:{tiny_hubert_ckpt}", "--out", str(tmp_path),
            "--train-hours", "0.01", "--dev-minutes", "0.1", "--seeds", "2", *FAST]  # fmt: skip
    assert main(argv) == 0
    (result,) = json.loads((tmp_path / "probe.json").read_text())["upstreams"]
    rates = result["seeds"]["cer"]
    assert len(rates) == 2 and rates[0] == result["cer"]  # the table's figure is the first seed's
    scores = result["utterances"]["cer"]
    assert result["cer"] == sum(scores["edits"]) / sum(scores["ref_lengths"])
    assert f"CER over 2 seeds {100 * min(rates):.2f}-{100 * max(rates):.2f} %" in capsys.readouterr().out
