"""The probe loads every base a fine-tuning run can start from (``--upstream FAMILY:CKPT``).

Each kind of ``--ckpt`` is made for real (a transformers folder, an original fairseq file, an s3prl name whose
checkpoint sits in s3prl's download cache with the network cut) and the upstream the probe resolves is loaded
through s3prl's hub; its hidden states are compared with a reference computed another way (transformers'
own model, or s3prl's stock entry on the s3prl-format original).
"""

import hashlib
import sys
from pathlib import Path

import pytest
import torch
import warm_processes
from hf_folders import build_hf_folder
from test_hf_import import max_diff, transformers_states
from test_upstream import batch, fairseq_style_checkpoint, fake_fairseq, stock_hidden_states  # noqa: F401

from s3prl_laser.errors import UserInputError
from s3prl_laser.probe.bases import resolve_upstream


@pytest.fixture(scope="module")
def hub():
    import s3prl.hub

    from s3prl_laser.plugin.registration import register

    register()
    return s3prl.hub


def hidden_states(hub, spec, wavs):
    expert = getattr(hub, spec.name)(**({"ckpt": spec.ckpt} if spec.ckpt else {})).eval()
    with torch.no_grad():
        return list(expert(wavs)["hidden_states"])


@pytest.mark.parametrize("family", ["hubert", "wavlm"])
def test_transformers_folder_is_converted_once_and_loads_like_transformers(family, hub, tmp_path, caplog):
    folder = build_hf_folder(tmp_path / "hf", family, "base", do_normalize=False)
    cache = tmp_path / "cache"
    spec = resolve_upstream(f"{family}:{folder}", cache)
    assert spec.name == f"{family}_local" and Path(spec.ckpt).parent == cache / "bases"
    wavs = [0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(0))]
    theirs, frames = transformers_states(folder, wavs, normalize=False)
    assert max_diff(hidden_states(hub, spec, wavs), theirs, frames) <= 1e-5
    written = Path(spec.ckpt).stat().st_mtime_ns
    caplog.clear()
    assert resolve_upstream(f"{family}_local:{folder}", cache) == spec  # the same content: the same copy
    assert Path(spec.ckpt).stat().st_mtime_ns == written and "converted" not in caplog.text
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    assert resolve_upstream(f"{family}:{folder}", cache) != spec  # other content: another copy


def test_fairseq_file_is_converted_and_loads_like_the_original(
    fake_fairseq, tiny_hubert_ckpt, hub, tmp_path  # noqa: F811
):
    dictionary, choices, save = fake_fairseq
    converted = torch.load(tiny_hubert_ckpt, weights_only=True)
    path = save(fairseq_style_checkpoint(converted, "dictconfig", dictionary, choices), tmp_path / "fs.pt")
    spec = resolve_upstream(f"hubert_local:{path}", tmp_path / "cache")
    assert spec.name == "hubert_local" and spec.ckpt != str(path) and "fairseq" not in sys.modules
    wavs, _, _ = batch()
    expected = stock_hidden_states(hub, "hubert", tiny_hubert_ckpt, wavs)
    for a, b in zip(hidden_states(hub, spec, wavs), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_s3prl_format_file_is_used_as_it_is(tiny_wavlm_ckpt, tmp_path):
    spec = resolve_upstream(f"wavlm:{tiny_wavlm_ckpt}", tmp_path / "cache")
    assert (spec.name, spec.ckpt) == ("wavlm_local", str(tiny_wavlm_ckpt))
    assert not (tmp_path / "cache").exists()


def test_s3prl_name_resolves_offline_from_s3prls_download_cache(hub, tiny_hubert_ckpt, tmp_path, monkeypatch):
    """``hubert:hubert_base`` with no network: found where s3prl's download helper keeps it, or one line."""
    from s3prl.util import download

    from s3prl_laser.models.sources import S3PRL_NAMES

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(download, "_download_url_to_file", no_network)
    monkeypatch.setattr(download, "_download_url_to_file_requests", no_network)
    monkeypatch.setattr(download, "_download_dir", tmp_path / "s3prl-cache")
    with pytest.raises(UserInputError, match="--upstream hubert:hubert_base: cannot download s3prl's hub"):
        resolve_upstream("hubert:hubert_base", tmp_path / "cache")
    url = S3PRL_NAMES["hubert_base"][2]
    cached = tmp_path / "s3prl-cache" / f"{hashlib.sha256(url.encode()).hexdigest()}.{Path(url).name}"
    cached.write_bytes(tiny_hubert_ckpt.read_bytes())  # what an earlier download left there
    spec = resolve_upstream("hubert:hubert_base", tmp_path / "cache")
    assert (spec.name, spec.ckpt) == ("hubert_base", None)
    wavs, _, _ = batch()
    expected = stock_hidden_states(hub, "hubert", tiny_hubert_ckpt, wavs)
    for a, b in zip(hidden_states(hub, spec, wavs), expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(UserInputError, match="wavlm_large is a wavlm model"):
        resolve_upstream("hubert:wavlm_large", tmp_path / "cache")


@pytest.mark.parametrize(
    ("upstream", "message"),
    [("hubert_laser:{folder}", "is a folder, not a checkpoint file"),
     ("hubert:{folder}", "is a folder without config.json"),
     ("wavlm:{hubert}", "is not an s3prl wavlm checkpoint (it looks like a hubert checkpoint")],
)  # fmt: skip
def test_a_folder_or_another_family_is_named_exit_2(demo_corpus, tiny_hubert_ckpt, tmp_path, caplog, upstream,
                                                   message):  # fmt: skip
    from s3prl_laser.probe.cli import main

    (tmp_path / "folder").mkdir()
    spec = upstream.format(folder=tmp_path / "folder", hubert=tiny_hubert_ckpt)
    assert main(["--data", str(demo_corpus), "--upstream", spec, "--out", str(tmp_path / "out")]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    assert "does not exist" not in caplog.text and "no such file" not in caplog.text


def test_probe_true_with_a_base_the_probe_cannot_load_stops_before_training(tiny_wavlm_ckpt, tmp_path):
    """A finetune run with probe=true checks the base the probe will load at start: exit 2, one line."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "s3prl_laser.finetune", "--upstream", "hubert", "--demo",
               "--ckpt", str(tiny_wavlm_ckpt), "--out", str(out), "probe=true"]  # fmt: skip
    result = warm_processes.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "error:" in x]
    assert "probe=true: base hubert:" in line and "it looks like a wavlm checkpoint" in line
    assert not (out / "checkpoints").exists()
