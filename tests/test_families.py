"""wav2vec 2.0 and data2vec-audio end to end: fine-tune, load through s3prl, compare with the references.

The references are independent of our code: s3prl's stock ``wav2vec2_local`` / ``data2vec_local`` entries on
the same file (through ``s3prl.nn.S3PRLUpstream``, as ESPnet and users build upstreams), and transformers' own
``Wav2Vec2Model`` / ``Data2VecAudioModel`` on the folder a run started from.
"""

from __future__ import annotations

import sys

import pytest
import torch
import warm_processes
from hf_folders import build_hf_folder
from test_hf_import import transformers_states, waveforms
from test_upstream import fake_fairseq  # noqa: F401 (a fixture, used through request.getfixturevalue)

from s3prl_laser import export, fixtures
from s3prl_laser.finetune import main

FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "steps=2", "save_every=2",
        "eval_every=0", "log_every=1"]  # fmt: skip
TOLERANCE = 1e-5  # float32, max abs difference of any hidden state
LENGTHS = [16000, 9001, 800]  # one batch of mixed lengths, the shortest two receptive fields


def finetune(family: str, ckpt, data, out, *overrides) -> int:
    argv = ["--upstream", family, "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]
    return main([*argv, *FAST, *overrides])


def s3prl_upstream_states(name: str, path) -> list[torch.Tensor]:
    """Hidden states of ``S3PRLUpstream(name, path_or_url=path)`` on a padded batch, trimmed per clip."""
    from s3prl.nn import S3PRLUpstream

    wavs = waveforms(LENGTHS, seed=3)
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    upstream = S3PRLUpstream(name, path_or_url=str(path)).eval()
    with torch.no_grad():
        states, lengths = upstream(batch, torch.tensor(LENGTHS))
    return [
        h[i, :n] for h, frames in zip(states, lengths, strict=True) for i, n in enumerate(frames.tolist())
    ]


@pytest.mark.parametrize("family", ["wav2vec2", "data2vec"])
def test_tuned_file_equals_the_stock_s3prl_entry(family, tmp_path, demo_corpus, request):
    """Fine-tuned from a tiny s3prl-format file: ``<family>_laser`` gives what s3prl's ``<family>_local``
    gives on the tuned file, and the tuned file differs from the base in the trained modules only."""
    import s3prl_laser

    s3prl_laser.register()
    base = request.getfixturevalue(f"tiny_{family}_ckpt")
    assert finetune(family, base, demo_corpus, tmp_path / "run", "lr=1e-2") == 0
    tuned = tmp_path / "run" / f"{family}_laser.pt"
    ours = s3prl_upstream_states(f"{family}_laser", tuned)
    stock = s3prl_upstream_states(f"{family}_local", tuned)
    assert len(ours) == len(stock) == 5 * len(LENGTHS)
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(ours[-1], s3prl_upstream_states(f"{family}_local", base)[-1])
    before, after = (torch.load(path, weights_only=True)["model_weight"] for path in (base, tuned))
    assert before.keys() == after.keys()  # data2vec's "_ema" entry too, which s3prl's loader deletes
    changed = {name for name in before if name != "_ema" and not torch.equal(before[name], after[name])}
    trained = ("encoder.layers.2.", "encoder.layers.3.", "encoder.layer_norm.")  # 4 layers, top 2
    assert changed and all(name.startswith(trained) for name in changed), sorted(changed)


@pytest.mark.parametrize("family", ["wav2vec2", "data2vec"])
def test_vanishing_lr_keeps_transformers_hidden_states_and_export_verifies(family, tmp_path, demo_corpus):
    """From a tiny transformers base folder with lr 1e-12: every hidden state of the tuned file, through
    s3prl's hub, within 1e-5 of transformers' own model on the base folder; the export verifies."""
    import s3prl.hub
    import transformers

    folder = build_hf_folder(tmp_path / "base", family, "base")
    assert finetune(family, folder, demo_corpus, tmp_path / "run", "lr=1e-12") == 0
    tuned = tmp_path / "run" / f"{family}_laser.pt"
    expert = getattr(s3prl.hub, f"{family}_laser")(ckpt=str(tuned)).eval()
    wavs = waveforms([16000, 9001])
    theirs, frames = transformers_states(folder, wavs, normalize=False)
    with torch.no_grad():
        ours = expert(wavs)["hidden_states"]
    diff = max(
        (a[i, :n] - b[i, :n]).abs().max().item()
        for a, b in zip(ours, theirs, strict=True)
        for i, n in enumerate(frames.tolist())
    )
    print(f"{family}: max |tuned (lr 1e-12) - transformers| over {len(ours)} hidden states: {diff:.3g}")
    assert len(ours) == len(theirs) == 5 and diff <= TOLERANCE

    exported = tmp_path / "hf"
    assert export.main(["--ckpt", str(tuned), "--to", "hf", str(exported), "--verify"]) == 0
    cls = getattr(transformers, type(transformers.AutoModel.from_pretrained(folder)).__name__)
    assert type(transformers.AutoModel.from_pretrained(exported)) is cls


def run_finetune(*argv: str):
    command = [sys.executable, "-m", "s3prl_laser.finetune", *argv, *FAST]
    return warm_processes.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("family", "overrides", "setting"),
    [("wav2vec2", {"layer_type": "conformer"}, "layer_type='conformer'"),
     ("wav2vec2", {"crop_seq_to_multiple": 2}, "crop_seq_to_multiple=2")],
)  # fmt: skip
def test_settings_the_forward_pass_cannot_reproduce_are_one_line_errors(
    family, overrides, setting, tmp_path, demo_corpus
):
    state = fixtures.tiny_wav2vec2_state(seed=0)
    state["model_cfg"].update(overrides)  # as a checkpoint of that setting holds it
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint

    ckpt = save_s3prl_checkpoint(state, tmp_path / "odd.pt")
    done = run_finetune("--upstream", family, "--ckpt", str(ckpt), "--data", str(demo_corpus),
                        "--out", str(tmp_path / "run"))  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    assert any(str(ckpt) in line and setting in line for line in output.splitlines()), output


def test_a_checkpoint_of_another_converted_family_is_named(tmp_path, demo_corpus, tiny_wav2vec2_ckpt):
    done = run_finetune("--upstream", "data2vec", "--ckpt", str(tiny_wav2vec2_ckpt),
                        "--data", str(demo_corpus), "--out", str(tmp_path / "run"))  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    assert "looks like a wav2vec2 checkpoint; pass --upstream wav2vec2" in output, output


@pytest.mark.parametrize(("family", "cfg_kind"), [("wav2vec2", "dictconfig"), ("wav2vec2", "args"),
                                                  ("data2vec", "container")])  # fmt: skip
def test_fairseq_checkpoint_is_read_without_fairseq(family, cfg_kind, tmp_path, request):
    """An original fairseq checkpoint (cfg as a DictConfig or a container, or legacy args) gives the model
    that s3prl's stock entry builds from the converted file of the same weights."""
    import argparse

    import s3prl.hub
    from omegaconf import OmegaConf

    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint
    from s3prl_laser.models.upstream import load_base_model

    converted = torch.load(request.getfixturevalue(f"tiny_{family}_ckpt"), weights_only=True)
    _, choices, save = request.getfixturevalue("fake_fairseq")
    name = {"wav2vec2": "wav2vec2", "data2vec": "data2vec_audio"}[family]
    model_cfg = {**converted["model_cfg"], "_name": name}
    if family == "wav2vec2":
        model_cfg["extractor_mode"] = choices.DEFAULT  # a ChoiceEnum member, as fairseq pickles it
    task_cfg = {**converted["task_cfg"], "_name": "audio_pretraining", "data": "/data"}
    args, cfg = None, None
    if cfg_kind == "args":
        args = argparse.Namespace(**{**task_cfg, **model_cfg, "arch": name, "seed": 1})
    elif cfg_kind == "dictconfig":
        cfg = OmegaConf.create({"common": {"seed": 1}, "model": model_cfg, "task": task_cfg})
    else:
        cfg = {"common": {"seed": 1, "legacy": argparse.Namespace(x=1)}, "model": model_cfg, "task": task_cfg}
    fairseq_state = {"args": args, "cfg": cfg, "model": converted["model_weight"], "criterion": None,
                     "optimizer_history": [{"num_updates": 400000}], "task_state": {}, "extra_state": {},
                     "last_optimizer_state": {"state": {}}}  # fmt: skip
    path = save(fairseq_state, tmp_path / f"{family}_fairseq.pt")
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        torch.load(path, weights_only=True)  # the file really needs more than weights_only allows

    model = load_base_model(family, path).eval()
    assert "fairseq" not in sys.modules
    out = save_s3prl_checkpoint(model.state_for_s3prl(), tmp_path / "converted.pt")
    wavs = waveforms(LENGTHS)
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        base = request.getfixturevalue(f"tiny_{family}_ckpt")
        reference = getattr(s3prl.hub, f"{family}_local")(ckpt=str(base)).eval()(wavs)["hidden_states"]
        ours = model.hidden_states(batch, torch.tensor(LENGTHS))
        reloaded = getattr(s3prl.hub, f"{family}_local")(ckpt=str(out)).eval()(wavs)["hidden_states"]
    for a, b, c in zip(ours, reference, reloaded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    other = {"wav2vec2": "data2vec", "data2vec": "wav2vec2"}[family]
    with pytest.raises(ValueError, match=f"a fairseq {name} checkpoint, not {other}"):
        load_base_model(other, path)
