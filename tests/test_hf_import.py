"""Transformers folders as the base model: equality with transformers, round trip, refusals, presets.

The folders are tiny HuBERT/WavLM models built and saved by transformers' own classes (tests/hf_folders.py),
base layout (post-LN, group-norm CNN) and large layout (pre-LN, layer-norm CNN). The reference is always
transformers' model on the same input, never our own output.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import warm_processes
from hf_folders import build_hf_folder

from s3prl_laser.errors import UserInputError
from s3prl_laser.models.hf_import import hf_folder_to_s3prl
from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint

CASES = [(family, layout) for family in ("hubert", "wavlm", "wav2vec2") for layout in ("base", "large")]
CASES.append(("data2vec", "base"))  # data2vec-audio has one layout
TOLERANCE = 1e-5  # float32, max abs difference of any hidden state


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: build_hf_folder(root / "_".join(case), *case) for case in CASES}


def waveforms(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(n, generator=gen) for n in lengths]


def agreeing_length(longest: int, near: int) -> int:
    """A length whose valid frames s3prl and transformers count alike in a batch padded to ``longest``.

    transformers: the CNN's output length, ``floor((L - 400) / 320) + 1`` for these CNNs; s3prl: frames whose
    ``longest // frames`` chunk of samples holds a real one (``ceil(L / chunk)``). They differ by one frame at
    some lengths, and then the attention over a batch differs too (docs/export.md).
    """
    frames = (longest - 400) // 320 + 1
    chunk = longest // frames
    for length in range(near, longest):
        if (length - 400) // 320 + 1 == -(-length // chunk):
            return length
    raise AssertionError("no agreeing length")


def transformers_states(folder, wavs, normalize: bool):
    """Hidden states of transformers' own model: ``[x_0 .. x_{L-1}, last_hidden_state]``, zero-padded batch
    with ``attention_mask`` (waveforms layer-normalised first when the folder's feature extractor says so)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    wavs = [F.layer_norm(w, w.shape) if normalize else w for w in wavs]
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(w)) for w in wavs], batch_first=True).long()
    with torch.no_grad():
        out = model(batch, attention_mask=mask, output_hidden_states=True)
    frames = model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in wavs]))
    return [*out.hidden_states[:-1], out.last_hidden_state], frames


def max_diff(ours, theirs, frames) -> float:
    assert len(ours) == len(theirs)
    return max(
        (a[i, :n] - b[i, :n]).abs().max().item()
        for a, b in zip(ours, theirs, strict=True)
        for i, n in enumerate(frames.tolist())
    )


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_every_hidden_state_equals_transformers(folders, family, layout, tmp_path):
    """Through s3prl's hub (``<family>_laser``) and through our trainer's model, one waveform and a padded
    batch: every hidden state within 1e-5 of transformers' model on the same input."""
    import s3prl.hub

    from s3prl_laser.models.upstream import load_base_model

    folder = folders[family, layout]
    state = hf_folder_to_s3prl(folder)
    normalize = (state.get("task_cfg") or state.get("cfg"))["normalize"]
    assert normalize == json.loads((folder / "preprocessor_config.json").read_text())["do_normalize"]
    ckpt = save_s3prl_checkpoint(state, tmp_path / "base.pt")
    expert = getattr(s3prl.hub, f"{family}_laser")(ckpt=str(ckpt)).eval()
    ours = load_base_model(family, folder).eval()
    diffs = {}
    for name, lengths in (("one", [16000]), ("batch", [16000, agreeing_length(16000, 9000)])):
        wavs = waveforms(lengths)
        theirs, frames = transformers_states(folder, wavs, normalize)
        with torch.no_grad():
            hub = expert(wavs)["hidden_states"]
            trainer = ours.hidden_states(
                torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), torch.tensor(lengths)
            )
        diffs[name] = (max_diff(hub, theirs, frames), max_diff(trainer, theirs, frames))
    scale = max(h.abs().max().item() for h in theirs)
    print(f"{family} {layout}: max |ours - transformers| (hub, trainer): {diffs}; max |h| {scale:.3g}")
    assert max(max(d) for d in diffs.values()) <= TOLERANCE, diffs


def test_feature_extractor_pipeline_matches_the_hub_entry(folders, tmp_path):
    """do_normalize is honoured: s3prl's expert on the raw waveform gives what transformers' pipeline
    (feature extractor, then model) gives. The normalisations differ only in eps (s3prl 1e-5, transformers
    1e-7): about 1e-4 here, far below what skipping the normalisation would give."""
    import s3prl.hub
    from transformers import AutoFeatureExtractor, AutoModel

    folder = folders["wavlm", "large"]  # do_normalize=True
    ckpt = save_s3prl_checkpoint(hf_folder_to_s3prl(folder), tmp_path / "w.pt")
    expert = s3prl.hub.wavlm_laser(ckpt=str(ckpt)).eval()
    extractor, model = AutoFeatureExtractor.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    wav = waveforms([16000])[0]
    with torch.no_grad():
        ref = model(**extractor(wav.numpy(), sampling_rate=16000, return_tensors="pt")).last_hidden_state
        raw = model(wav[None]).last_hidden_state
        hub = expert([wav])["hidden_states"][-1]
    assert (hub - ref).abs().max().item() <= 1e-3 < (raw - ref).abs().max().item()


@pytest.mark.parametrize(
    ("family", "layout", "cls_name"),
    [("hubert", "base", "HubertModel"), ("wavlm", "large", "WavLMForCTC"),
     ("hubert", "large", "HubertForCTC"), ("wav2vec2", "base", "Wav2Vec2ForPreTraining"),
     ("wav2vec2", "large", "Wav2Vec2ForCTC"), ("data2vec", "base", "Data2VecAudioModel")],
)  # fmt: skip
def test_round_trip_to_ours_and_back_keeps_every_tensor(tmp_path, family, layout, cls_name):
    """transformers folder -> s3prl checkpoint -> export: same class, same config, every tensor identical."""
    import transformers
    from transformers import AutoConfig

    from s3prl_laser.export import export_to_hf

    folder = build_hf_folder(tmp_path / "in", family, layout, cls_name=cls_name, vocab_size=12)
    ckpt = save_s3prl_checkpoint(hf_folder_to_s3prl(folder), tmp_path / "ours.pt")
    export_to_hf(ckpt, tmp_path / "out")
    cls = getattr(transformers, cls_name)
    before, after = cls.from_pretrained(folder), cls.from_pretrained(tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").architectures == [cls_name]
    skip = {"transformers_version", "_name_or_path"}
    config_before = {k: v for k, v in before.config.to_dict().items() if k not in skip}
    assert config_before == {k: v for k, v in after.config.to_dict().items() if k not in skip}
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pre = "preprocessor_config.json"
    assert json.loads((folder / pre).read_text()) == json.loads((tmp_path / "out" / pre).read_text())


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"feat_extract_activation": "relu"}, "feat_extract_activation='relu'"),
        ({"conv_pos_batch_norm": True}, "conv_pos_batch_norm=True"),
        ({"layer_norm_eps": 1e-6}, "layer_norm_eps=1e-06"),
        ({"hidden_act": "silu"}, "hidden_act='silu'"),
    ],
)
def test_settings_s3prl_cannot_reproduce_are_refused_by_name(tmp_path, overrides, setting):
    folder = build_hf_folder(tmp_path / "m", "hubert", "base", **overrides)
    with pytest.raises(UserInputError, match=r"config\.json: " + setting.replace("(", r"\(")):
        hf_folder_to_s3prl(folder)


def test_family_and_feature_extractor_mistakes_are_refused(tmp_path):
    folder = build_hf_folder(tmp_path / "m", "wavlm", "base")
    with pytest.raises(UserInputError, match="is a wavlm model .*pass --upstream wavlm"):
        hf_folder_to_s3prl(folder, "hubert")
    pre = folder / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "sampling_rate": 8000}))
    with pytest.raises(UserInputError, match="sampling_rate=8000 is not supported"):
        hf_folder_to_s3prl(folder)
    pre.unlink()
    with pytest.raises(UserInputError, match="no preprocessor_config.json"):
        hf_folder_to_s3prl(folder)
    from s3prl_laser.models.sources import check_source

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="is a folder without config.json"):
        check_source(str(tmp_path / "empty"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserInputError, match="no weights; expected one of model.safetensors"):
        hf_folder_to_s3prl(folder)


def run_finetune(*argv, env=None):
    import os

    return warm_processes.run(
        [sys.executable, "-m", "s3prl_laser.finetune", *argv],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_command_line_refusal_and_offline_hub_id_are_one_line_errors(tmp_path, demo_corpus):
    folder = build_hf_folder(tmp_path / "m", "hubert", "base", conv_pos_batch_norm=True)
    done = run_finetune("--upstream", "hubert", "--ckpt", str(folder), "--data", str(demo_corpus),
                        "--out", str(tmp_path / "run"), "steps=1")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "conv_pos_batch_norm=True is not supported" in done.stderr
    done = run_finetune("--upstream", "wavlm", "--ckpt", "nobody/no-such-model", "--data", str(demo_corpus),
                        "--out", str(tmp_path / "run2"), env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stderr and "--ckpt FOLDER" in done.stderr


def test_weights_the_chosen_class_does_not_use_are_refused_naming_them_and_their_class(tmp_path, demo_corpus):
    """A HubertForCTC folder whose config.json names the bare HubertModel: its CTC head (``lm_head.*``) was
    dropped without a word (transformers' own notice is kept off the screen). A tensor that no class of the
    config has (an adapter) is refused too. Named as the weights say, the folder loads with its head."""
    from safetensors.torch import load_file, save_file

    folder = build_hf_folder(tmp_path / "ctc", "hubert", "base", cls_name="HubertForCTC", vocab_size=12)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["HubertModel"]}))
    done = run_finetune("--upstream", "hubert", "--ckpt", str(folder), "--data", str(demo_corpus),
                        "--out", str(tmp_path / "run"), "steps=1")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error:" in line]
    assert f"{folder}: 2 weight(s) that HubertModel (config.json architectures) does not use" in line
    assert 'be dropped: lm_head.bias, lm_head.weight; HubertForCTC uses them: set "architectures"' in line
    (folder / "config.json").write_text(json.dumps(config))  # HubertForCTC again: the head comes along
    assert {"lm_head.weight", "lm_head.bias"} <= set(hf_folder_to_s3prl(folder)["hf_origin"]["head"])

    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "adapter.proj.weight": torch.zeros(2, 2)}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(UserInputError, match=r"adapter\.proj\.weight; no model class of this config uses"):
        hf_folder_to_s3prl(folder)


def test_presets_follow_the_checkpoint_size(tmp_path):
    """Large (24 layers, 1024 dims) takes the family's large preset: the same recipe, its own budget."""
    from s3prl_laser.models.sources import model_size
    from s3prl_laser.training.config import read_preset, resolve_config

    large = tmp_path / "large"
    large.mkdir()
    (large / "config.json").write_text(json.dumps({"model_type": "wavlm", "num_hidden_layers": 24,
                                                   "hidden_size": 1024}))  # fmt: skip
    assert model_size("wavlm", str(large)) == "large"
    assert model_size("wavlm", "wavlm_base_plus") == "base"
    assert model_size("hubert", "hubert_large_ll60k") == "large"
    for family in ("hubert", "wavlm"):
        base, big = resolve_config(family), resolve_config(family, overrides=[f"ckpt={large}"])
        budget = read_preset(f"{family}_large_laser")["max_batch_seconds"]
        assert big.max_batch_seconds == budget != base.max_batch_seconds
        assert (big.trainable_layers, big.train_final_layer_norm, big.lr) == (2, True, base.lr)
        given = resolve_config(family, overrides=[f"ckpt={large}", "max_batch_seconds=77"])
        assert given.max_batch_seconds == 77


def test_large_layout_freezes_all_but_the_top_two_layers_and_final_norm(folders):
    from s3prl_laser.models.upstream import load_base_model

    model = load_base_model("wavlm", folders["wavlm", "large"])
    model.freeze(2)
    assert model.trainable_module_names == ["encoder.layers.2", "encoder.layers.3", "encoder.layer_norm"]


def test_s3prl_names_download_what_s3prl_entries_download_and_fail_clearly(monkeypatch):
    """Each s3prl name fetches the address s3prl's own hub entry fetches; a failed download is one line."""
    import s3prl.hub
    import s3prl.upstream.data2vec.hubconf as data2vec_hubconf
    import s3prl.upstream.hubert.hubconf as hubert_hubconf
    import s3prl.upstream.wav2vec2.hubconf as wav2vec2_hubconf
    import s3prl.upstream.wavlm.hubconf as wavlm_hubconf
    from s3prl.util import download

    from s3prl_laser.models.sources import S3PRL_NAMES, read_source

    asked = []

    class Stop(Exception):
        pass

    def fetch(url, refresh=False):
        asked.append(url)
        raise Stop

    def offline(url, refresh=False):
        asked.append(url)
        raise OSError("Name or service not known")

    for module in (hubert_hubconf, wavlm_hubconf, wav2vec2_hubconf, data2vec_hubconf):
        monkeypatch.setattr(module, "_urls_to_filepaths", fetch)
    monkeypatch.setattr(download, "_urls_to_filepaths", offline)
    for name, (family, _, _) in S3PRL_NAMES.items():
        with pytest.raises(Stop):
            getattr(s3prl.hub, name)()
        with pytest.raises(UserInputError, match=f"cannot download s3prl's {name} .*--ckpt FILE"):
            read_source(family, name)
        assert asked[-1] == asked[-2]
    with pytest.raises(UserInputError, match="wavlm_large is a wavlm model; pass --upstream wavlm"):
        read_source("hubert", "wavlm_large")
