"""End to end from a transformers folder: fine-tune, load through s3prl's hub, export as the same class."""

from __future__ import annotations

import json

import pytest
import torch
from hf_folders import build_hf_folder

from s3prl_laser import export
from s3prl_laser.finetune import main

FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-2", "steps=2",
        "save_every=2", "eval_every=0", "log_every=1"]  # fmt: skip


@pytest.mark.parametrize(
    ("family", "layout", "cls_name"),
    [("hubert", "base", "HubertModel"), ("hubert", "large", "HubertForCTC"),
     ("wavlm", "base", "WavLMModel"), ("wavlm", "large", "WavLMForCTC"),
     ("wav2vec2", "large", "Wav2Vec2ForCTC")],  # pre-LN, as XLS-R, MMS and large-lv60
)  # fmt: skip
def test_finetune_from_a_folder_loads_in_s3prl_and_exports_as_the_same_class(
    tmp_path, demo_corpus, family, layout, cls_name
):
    import s3prl.hub
    import transformers

    folder = build_hf_folder(tmp_path / "base", family, layout, cls_name=cls_name)
    out = tmp_path / "run"
    argv = ["--upstream", family, "--ckpt", str(folder), "--data", str(demo_corpus), "--out", str(out)]
    assert main([*argv, *FAST]) == 0
    tuned = out / f"{family}_laser.pt"
    expert = getattr(s3prl.hub, f"{family}_laser")(ckpt=str(tuned)).eval()
    with torch.no_grad():
        hidden = expert([torch.randn(8000)])["hidden_states"]
    assert len(hidden) == 5 and torch.isfinite(hidden[-1]).all()

    exported = tmp_path / "hf"
    assert export.main(["--ckpt", str(tuned), "--to", "hf", str(exported), "--verify"]) == 0
    assert json.loads((exported / "config.json").read_text())["architectures"] == [cls_name]
    cls = getattr(transformers, cls_name)
    before, after = cls.from_pretrained(folder).state_dict(), cls.from_pretrained(exported).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = "" if cls_name.endswith("Model") else f"{family}."
    trained = tuple(f"{prefix}encoder.{name}" for name in ("layers.2.", "layers.3.", "layer_norm."))
    assert changed and all(k.startswith(trained) for k in changed), sorted(changed)
