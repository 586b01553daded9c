"""Export to transformers, checked against s3prl's stock experts (``s3prl.hub.hubert_local``/``wavlm_local``).

Every float tensor of the tiny fixtures is perturbed first, so that layer norms are not identities, biases
are not zero and WavLM's gate constant is not one: a swapped or dropped weight then shows in the outputs.
Four variants cover both layer-norm placements and both CNN norms for each model:
"base" (extractor_mode="default" -> group norm, post-LN) and "large" (extractor_mode="layer_norm",
layer_norm_first=True -> do_stable_layer_norm, conv_bias, normalize=True, CNN width = encoder width so
s3prl has no post_extract_proj; WavLM with few relative-position buckets so the log-spaced ones are hit).
"""

import json
import os
import pickle
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.nn.utils.rnn import pad_sequence

from s3prl_laser.export import export_to_hf, main, verify_export
from s3prl_laser.fixtures import tiny_hubert_state, tiny_wavlm_state
from s3prl_laser.models.hf_export import ACTIVATIONS, parse_conv_layers

# float32 on the CPU; measured: at most 3e-6 on the same model input. The feature extractor's do_normalize
# differs more (eps 1e-7 in transformers vs 1e-5 in s3prl's F.layer_norm), see its own test.
TOL = dict(rtol=1e-5, atol=1e-5)
LARGE = dict(
    extractor_mode="layer_norm",
    layer_norm_first=True,
    conv_bias=True,
    normalize=True,
    conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
)
VARIANTS = {
    "hubert-base": ("hubert", {}),
    "hubert-large": ("hubert", LARGE),
    "wavlm-base": ("wavlm", {}),
    "wavlm-large": ("wavlm", {**LARGE, "num_buckets": 16, "max_distance": 40}),
}
# 16000 and 10000 samples: s3prl's frame padding mask (ceil(L / (N // T))) and transformers' (CNN output
# length of L) agree, 49 and 31 frames; test_padding_masks_agree checks it.
LENGTHS = (16000, 10000)


def _perturbed_state(upstream: str, overrides: dict, seed: int = 0) -> dict:
    build = tiny_hubert_state if upstream == "hubert" else tiny_wavlm_state
    state = build(seed, **overrides)
    weights = state["model_weight" if upstream == "hubert" else "model"]
    gen = torch.Generator().manual_seed(seed + 1)
    for tensor in weights.values():
        if tensor.is_floating_point():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
    return state


def _waveforms(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(n, generator=gen) for n in lengths]


@torch.no_grad()
def _s3prl(ckpt, upstream, wavs):
    import s3prl.hub

    expert = getattr(s3prl.hub, f"{upstream}_local")(ckpt=str(ckpt)).eval()
    return expert(wavs)["hidden_states"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    """(upstream, overrides, s3prl checkpoint path, exported directory) for one variant."""
    upstream, overrides = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = root / f"{upstream}_laser.pt"
    torch.save(_perturbed_state(upstream, overrides), ckpt)
    out = root / "hf"
    dropped = export_to_hf(ckpt, out)
    return upstream, overrides, ckpt, out, dropped


def _load(out):
    from transformers import AutoFeatureExtractor, AutoModel

    return AutoFeatureExtractor.from_pretrained(out), AutoModel.from_pretrained(out).eval()


def _model_input(overrides, wav):
    """What s3prl's model sees: the expert layer-normalises each waveform when ``normalize`` is set."""
    return F.layer_norm(wav, wav.shape) if overrides.get("normalize") else wav


def test_hidden_states_match_s3prl_expert(exported):
    """Every hidden state of AutoModel, one waveform at a time, equals s3prl's expert on the same audio."""
    upstream, overrides, ckpt, out, _ = exported
    _, model = _load(out)
    assert type(model).__name__ == {"hubert": "HubertModel", "wavlm": "WavLMModel"}[upstream]
    for wav in _waveforms():
        ref = _s3prl(ckpt, upstream, [wav])
        with torch.no_grad():
            output = model(_model_input(overrides, wav)[None], output_hidden_states=True)
        hidden = output.hidden_states
        assert len(hidden) == len(ref) == model.config.num_hidden_layers + 1
        # The last entry is the encoder output (after the final layer norm of pre-LN models), as in s3prl.
        torch.testing.assert_close(hidden[-1], output.last_hidden_state, rtol=0, atol=0)
        for i, (h, r) in enumerate(zip(hidden, ref, strict=True)):
            torch.testing.assert_close(h, r, **TOL, msg=lambda m, i=i: f"hidden_states[{i}]: {m}")


def test_feature_extractor_normalizes_like_s3prl(exported):
    """do_normalize follows the checkpoint; it differs from s3prl's F.layer_norm only by its eps (1e-7 vs
    1e-5): relative scale error sqrt((var + 1e-5) / (var + 1e-7)) - 1, about 5.5e-5 for var = 0.09."""
    _, overrides, _, out, _ = exported
    extractor, _ = _load(out)
    for wav in _waveforms():
        got = torch.as_tensor(
            extractor(wav.numpy(), sampling_rate=16000, return_tensors="pt").input_values[0]
        )
        torch.testing.assert_close(got, _model_input(overrides, wav), rtol=2e-4, atol=1e-6)


def test_padding_masks_agree(exported):
    """Precondition of the batch test: both libraries mark the same frames as padding for LENGTHS."""
    from s3prl_laser.models.hf_export import load_s3prl_checkpoint, to_hf_model

    upstream, _, ckpt, out, _ = exported
    model = to_hf_model(load_s3prl_checkpoint(ckpt))
    n, lengths = max(LENGTHS), torch.tensor(LENGTHS)
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(n)))
    hf_mask = model._get_feature_vector_attention_mask(frames, torch.arange(n)[None] < lengths[:, None])
    import s3prl.hub

    s3prl_model = getattr(s3prl.hub, f"{upstream}_local")(ckpt=str(ckpt)).model
    s3prl_pad = s3prl_model.forward_padding_mask(
        torch.zeros(2, frames, 1), torch.arange(n)[None] >= lengths[:, None]
    )
    assert torch.equal(hf_mask, ~s3prl_pad)


def _padded(overrides, wavs):
    """Zero-padded model input ``[B, N]`` (each waveform normalised first, as s3prl does) and its mask."""
    values = pad_sequence([_model_input(overrides, w) for w in wavs], batch_first=True)
    mask = (torch.arange(values.shape[1])[None] < torch.tensor([len(w) for w in wavs])[:, None]).long()
    return values, mask


def test_padded_batch_matches_s3prl_batch(exported):
    """A zero-padded batch with attention_mask: valid frames equal s3prl's batched expert (padding mask)."""
    upstream, overrides, ckpt, out, _ = exported
    _, model = _load(out)
    wavs = _waveforms()
    ref = _s3prl(ckpt, upstream, wavs)
    values, mask = _padded(overrides, wavs)
    with torch.no_grad():
        hidden = model(values, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = model._get_feat_extract_output_lengths(torch.tensor(LENGTHS))
    for i, (h, r) in enumerate(zip(hidden, ref, strict=True)):
        for b, t in enumerate(valid.tolist()):
            torch.testing.assert_close(h[b, :t], r[b, :t], **TOL, msg=lambda m, i=i, b=b: f"[{i}][{b}]: {m}")


@pytest.mark.parametrize("exported", ["hubert-large", "wavlm-large"], indirect=True)
def test_layer_norm_cnn_batch_equals_single(exported):
    """feat_extract_norm="layer": the feature extractor returns the mask, and a padded batch gives each
    waveform's unpadded s3prl outputs on its valid frames. (Not for group-norm CNNs: their statistics
    span the padding, in s3prl and transformers alike.)"""
    upstream, overrides, ckpt, out, _ = exported
    assert overrides["extractor_mode"] == "layer_norm"
    extractor, model = _load(out)
    wavs = _waveforms()
    values, mask = _padded(overrides, wavs)
    inputs = extractor([w.numpy() for w in wavs], sampling_rate=16000, padding=True, return_tensors="pt")
    assert torch.equal(inputs["attention_mask"].long(), mask)
    with torch.no_grad():
        hidden = model(values, attention_mask=mask, output_hidden_states=True).hidden_states
    for b, wav in enumerate(wavs):
        ref = _s3prl(ckpt, upstream, [wav])
        t = ref[0].shape[1]
        for i, (h, r) in enumerate(zip(hidden, ref, strict=True)):
            torch.testing.assert_close(h[b : b + 1, :t], r, **TOL, msg=lambda m, i=i, b=b: f"[{i}][{b}]: {m}")


def test_directory_layout_and_feature_extractor(exported):
    upstream, overrides, ckpt, out, dropped = exported
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    pre = json.loads((out / "preprocessor_config.json").read_text())
    layer_cnn = overrides.get("extractor_mode") == "layer_norm"
    assert pre["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    assert pre["do_normalize"] is bool(overrides.get("normalize", False))
    assert pre["return_attention_mask"] is layer_cnn
    assert pre["sampling_rate"] == 16000
    config = json.loads((out / "config.json").read_text())
    assert config["feat_extract_norm"] == ("layer" if layer_cnn else "group")
    assert config["do_stable_layer_norm"] is bool(overrides.get("layer_norm_first", False))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any("final_proj" in k or "label_embs" in k for k in names)
    if upstream == "hubert":
        assert sorted(dropped) == ["final_proj.bias", "final_proj.weight", "label_embs_concat"]
    else:
        assert dropped == []


def test_cli_verify_passes_and_catches_a_corrupted_export(tmp_path, tiny_wavlm_ckpt, capsys):
    out = tmp_path / "hf"
    assert main(["--ckpt", str(tiny_wavlm_ckpt), "--to", "hf", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["--ckpt", str(tiny_wavlm_ckpt), "--to", "hf", str(out)]) == 2
    assert f"output directory {out} is not empty; pass --overwrite" in capsys.readouterr().err
    # Break one weight of layer 1: hidden states 0 and 1 still agree, 2 and later must not.
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights["encoder.layers.1.final_layer_norm.weight"] += 0.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    errors = verify_export(tiny_wavlm_ckpt, out)
    assert max(errors[:2]) <= TOL["atol"] < min(errors[2:])


def _tamper(path, tmp_path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    return bad


@pytest.mark.parametrize(
    ("which", "edit", "message"),
    [
        ("hubert", lambda s: s["model_cfg"].update(layer_type="conformer"), "layer_type"),
        ("hubert", lambda s: s["model_cfg"].update(extractor_mode="conv2d"), "extractor_mode"),
        ("hubert", lambda s: s["model_cfg"].update(activation_fn="tanh"), "activation_fn"),
        ("wavlm", lambda s: s["cfg"].update(activation_fn="glu"), "activation_fn"),
        (
            "wavlm",
            lambda s: s["cfg"].update(relative_position_embedding=False),
            "relative_position_embedding",
        ),
        ("wavlm", lambda s: s["cfg"].update(gru_rel_pos=False), "gru_rel_pos"),
        ("wavlm", lambda s: s["cfg"].update(encoder_attention_heads=3), "encoder_attention_heads"),
        ("wavlm", lambda s: s["model"].update(extra=torch.zeros(1)), "'extra'"),
        ("wavlm", lambda s: s.pop("cfg"), "not an s3prl HuBERT/WavLM/wav2vec2/data2vec checkpoint"),
        ("hubert", lambda s: s.update(args=Namespace(x=1)), "weights_only"),
    ],
)
def test_refuses_unsupported_checkpoints(which, edit, message, tmp_path, tiny_hubert_ckpt, tiny_wavlm_ckpt):
    bad = _tamper(tiny_hubert_ckpt if which == "hubert" else tiny_wavlm_ckpt, tmp_path, edit)
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=message):
        export_to_hf(bad, out)
    assert not out.exists()


def test_upstream_flag_must_match_the_checkpoint(tmp_path, tiny_hubert_ckpt):
    with pytest.raises(ValueError, match="--upstream wavlm"):
        export_to_hf(tiny_hubert_ckpt, tmp_path / "hf", upstream="wavlm")


def test_activation_names_compute_the_same_function():
    from s3prl.upstream.wav2vec2.wav2vec2_model import get_activation_fn
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001)
    for s3prl_name, hf_name in ACTIVATIONS.items():
        torch.testing.assert_close(ACT2FN[hf_name](x), get_activation_fn(s3prl_name)(x), rtol=1e-6, atol=1e-6)


def test_parse_conv_layers_without_eval():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 2 + [(512,2,2)]") == [
        (512, 10, 5),
        (512, 3, 2),
        (512, 3, 2),
        (512, 2, 2),
    ]
    for bad in (
        "__import__('os').system('true')",
        "[(1, 2)]",
        "[(1, 2, 3)] -",
        "[(1.5, 2, 3)]",
        "[(1, 2, 3)] * 10**6",
    ):
        with pytest.raises(ValueError, match="conv_feature_layers"):
            parse_conv_layers(bad)


class _RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unpicklable_is_a_value_error_not_code_execution(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))  # a raw pickle, not torch.save's zip
    with pytest.raises(ValueError, match=r"evil\.pt"):
        export_to_hf(path, tmp_path / "hf")
    torch.save({"cfg": _RunsCode(f"touch {marker}"), "model": {}}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*(posix|os)\.system"):
        export_to_hf(path, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
