"""``hubert_laser`` / ``wavlm_laser`` inside ESPnet's s3prl frontend (``espnet2/asr/frontend/s3prl.py``).

ESPnet builds its frontend in its own interpreter, never calling ``s3prl_laser.register()``: the names must
come from the installed start-up hook. Two tests, each in a child process:

- on every lane, the frontend's construction and forward repeated step by step, compared with an independent
  implementation: transformers' ``HubertModel`` / ``WavLMModel`` holding the same weights
  (:mod:`s3prl_laser.models.hf_export`), each clip alone; the same file with one weight moved must differ
  from it (CI's ESPnet lane, which has the same s3prl as the current lane, runs the real frontend below
  instead);
- on the ESPnet lane (``make LANE=espnet test``; markers ``espnet``, deselected where ESPnet is not
  installed, and ``espnet_lane``), ESPnet's real ``S3prlFrontend``, chosen by ``frontend: s3prl`` through
  ``ASRTask``'s frontend choices and built from the YAML of docs/recipes.md ("In ESPnet"), forward and
  backward on a batch, its features compared with transformers' model on the same weights.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import warm_processes

REPO = Path(__file__).resolve().parents[1]

# ESPnet's S3prlFrontend, step by step (tests/test_espnet_frontend_families.py runs it too)
FRONTEND_HELPERS = r"""
import json, sys
import torch
import s3prl
from s3prl.nn import Featurizer, S3PRLUpstream


def espnet_frontend(name, path_or_url):
    # S3prlFrontend.__init__ with frontend_conf = {"upstream": name, "path_or_url": path_or_url}
    assert name in S3PRLUpstream.available_names(), name
    upstream = S3PRLUpstream(name, path_or_url=path_or_url, normalize=False, extra_conf=None)
    switched = False
    if getattr(upstream.upstream, "model", None):
        if getattr(upstream.upstream.model, "feature_grad_mult", None) is not None:
            upstream.upstream.model.feature_grad_mult = 1.0
            switched = True
    upstream.eval()
    return upstream, Featurizer(upstream, layer_selections=None), switched


def espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature):
    # S3prlFrontend.forward with layer = -1 and tile_factor = 1
    feats, feats_lens = upstream(wavs, lens)
    if multilayer_feature:
        return featurizer(feats, feats_lens)
    return featurizer(feats[-1:], feats_lens[-1:])


"""

FRONTEND = FRONTEND_HELPERS + r"""
def transformers_reference(ckpt, wav):
    # transformers' HubertModel / WavLMModel on the same weights (models/hf_export): another implementation
    import torch.nn.functional as F
    from s3prl_laser.models.hf_export import load_s3prl_checkpoint, to_hf_model

    checkpoint = load_s3prl_checkpoint(ckpt)
    values = F.layer_norm(wav, wav.shape) if checkpoint.normalize else wav
    with torch.no_grad():
        return to_hf_model(checkpoint)(values[None], output_hidden_states=True).hidden_states


def gap(ours, reference):
    # the largest difference over the frames both have (s3prl counts a frame more at the end of a clip)
    frames = reference.shape[1]
    return (ours[:, :frames] - reference).abs().max().item()


def perturbed(ckpt, out):
    # the same file with one weight of the last encoder layer moved: a reference must tell it apart
    state = torch.load(ckpt, weights_only=True)
    weights = state["model_weight" if "model_weight" in state else "model"]
    name = sorted(n for n in weights if n.endswith("fc2.weight"))[-1]
    noise = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(1))
    weights[name] = weights[name] + 0.05 * noise
    torch.save(state, out)
    return out


torch.manual_seed(0)
wavs, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
report = {}
for laser, stock, ckpt in json.loads(sys.argv[1]):
    upstream, featurizer, switched = espnet_frontend(laser, ckpt)
    reference, _, _ = espnet_frontend(stock, ckpt)
    moved, moved_featurizer, _ = espnet_frontend(laser, perturbed(ckpt, f"moved_{laser}.pt"))
    gaps = {"last": [], "mixed": [], "moved_last": []}
    with torch.no_grad():
        last, last_lens = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=False)
        mixed, mixed_lens = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=True)
        _, stock_lens = reference(wavs, lens)
        for length in lens.tolist():  # each clip alone: no padding in either implementation
            wav, one = wavs[:1, :length], torch.tensor([length])
            hidden = transformers_reference(ckpt, wav[0])
            ours_last, _ = espnet_forward(upstream, featurizer, wav, one, multilayer_feature=False)
            ours_mixed, _ = espnet_forward(upstream, featurizer, wav, one, multilayer_feature=True)
            moved_last, _ = espnet_forward(moved, moved_featurizer, wav, one, multilayer_feature=False)
            gaps["last"].append(gap(ours_last, hidden[-1]))
            gaps["mixed"].append(gap(ours_mixed, torch.stack(hidden).mean(0)))  # zero-init weights: a mean
            gaps["moved_last"].append(gap(moved_last, hidden[-1]))
    upstream.train()  # ESPnet fine-tunes the frontend with feature_grad_mult = 1: the CNN gets gradients
    trained, _ = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=True)
    trained.square().mean().backward()
    cnn_grad = upstream.upstream.model.feature_extractor.conv_layers[0][0].weight.grad
    report[laser] = {
        "switched": switched,
        "hop_length": featurizer.downsample_rate,
        "output_size": featurizer.output_size,
        "gaps": gaps,
        "lens": [last_lens.tolist(), mixed_lens.tolist(), stock_lens[-1].tolist()],
        "cnn_grad_norm": None if cnn_grad is None else cnn_grad.norm().item(),
    }
print(json.dumps(report))
"""


def script_report(script: str, *args: str, cwd: Path) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter in ``cwd``; the JSON object of its last line."""
    done = warm_processes.run(
        [sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_laser_entries_work_as_espnet_builds_and_calls_them(tiny_hubert_ckpt, tiny_wavlm_ckpt, tmp_path):
    cases = [
        ("hubert_laser", "hubert_local", str(tiny_hubert_ckpt)),
        ("wavlm_laser", "wavlm_local", str(tiny_wavlm_ckpt)),
    ]
    report = script_report(FRONTEND, json.dumps(cases), cwd=tmp_path)
    expected_frames = [50, 29]  # ceil(16000 / 320), ceil(9000 / 320)
    for name, result in report.items():
        assert result["switched"], f"{name}: ESPnet's feature_grad_mult switch found no model to apply to"
        assert (result["hop_length"], result["output_size"]) == (320, 64), name
        gaps = result["gaps"]  # against transformers' model on the same weights, each clip alone
        assert max(gaps["last"]) < 1e-4 and max(gaps["mixed"]) < 1e-4, (name, gaps)
        assert min(gaps["moved_last"]) > 1e-3, (name, gaps)  # the reference tells a moved weight apart
        assert result["lens"] == [expected_frames] * 3, name
        assert result["cnn_grad_norm"] is not None and 0 < result["cnn_grad_norm"] < float("inf"), name


REAL_FRONTEND = r"""
import copy, json, sys
import torch, yaml
import torch.nn.functional as F
from espnet2.tasks.asr import frontend_choices
from s3prl_laser.models.hf_export import load_s3prl_checkpoint, to_hf_model

config, ckpt = yaml.safe_load(sys.argv[1]), sys.argv[2]


def build(upstream, path):
    # what ASRTask.build_model does with the config's frontend and frontend_conf
    conf = copy.deepcopy(config["frontend_conf"])
    conf["frontend_conf"].update(upstream=upstream, path_or_url=path)
    return frontend_choices.get_class(config["frontend"])(**conf)


def layer_mean(path, wav):
    # transformers' model on the same weights, an independent implementation: the mean of its layers (the
    # frontend's featurizer weighs them uniformly at initialisation)
    checkpoint = load_s3prl_checkpoint(path)
    values = F.layer_norm(wav, wav.shape) if checkpoint.normalize else wav
    with torch.no_grad():
        hidden = to_hf_model(checkpoint)(values[None], output_hidden_states=True).hidden_states
    return torch.stack(hidden).mean(0)


state = torch.load(ckpt, weights_only=True)  # the same file with one weight of the last layer moved
name = sorted(n for n in state["model_weight"] if n.endswith("fc2.weight"))[-1]
noise = torch.randn(state["model_weight"][name].shape, generator=torch.Generator().manual_seed(1))
state["model_weight"][name] = state["model_weight"][name] + 0.05 * noise
torch.save(state, "moved.pt")

torch.manual_seed(0)
wavs, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
frontend, moved = build("hubert_laser", ckpt), build("hubert_laser", "moved.pt")
feats, feats_lens = frontend(wavs, lens)
feats.square().mean().backward()
gaps, moved_gaps = [], []
frontend.eval()
moved.eval()
with torch.no_grad():
    for length in lens.tolist():  # each clip alone: no padding in either implementation
        wav, one = wavs[:1, :length], torch.tensor([length])
        reference = layer_mean(ckpt, wav[0])
        frames = reference.shape[1]  # s3prl counts a frame more at the end of a clip
        gaps.append((frontend(wav, one)[0][:, :frames] - reference).abs().max().item())
        moved_gaps.append((moved(wav, one)[0][:, :frames] - reference).abs().max().item())
grads = {n: p.grad for n, p in frontend.named_parameters() if p.grad is not None}
report = {
    "class": type(frontend).__module__ + "." + type(frontend).__name__,
    "lens": feats_lens.tolist(),
    "output_size": frontend.output_size(),
    "gaps": gaps,
    "moved_gaps": moved_gaps,
    "cnn_grads": [g.norm().item() for n, g in grads.items() if "feature_extractor.conv_layers.0" in n],
}
print(json.dumps(report))
"""


def espnet_yaml() -> str:
    """The first ``yaml`` block of docs/recipes.md's "In ESPnet" section."""
    section = (REPO / "docs" / "recipes.md").read_text().split("## In ESPnet", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.espnet
@pytest.mark.espnet_lane
def test_espnets_own_s3prl_frontend_runs_hubert_laser_like_transformers_on_the_same_weights(
    tiny_hubert_ckpt, tmp_path
):
    config = espnet_yaml()
    assert "upstream: hubert_laser" in config and "frontend: s3prl" in config
    report = script_report(REAL_FRONTEND, config, str(tiny_hubert_ckpt), cwd=tmp_path)
    assert report["class"] == "espnet2.asr.frontend.s3prl.S3prlFrontend"
    assert report["lens"] == [50, 29]  # ceil(16000 / 320), ceil(9000 / 320)
    assert report["output_size"] == 64
    assert max(report["gaps"]) < 1e-4, report  # against transformers' model on the same weights
    assert min(report["moved_gaps"]) > 1e-3, report  # ... which tells a moved weight apart
    assert report["cnn_grads"], "no gradient reached the CNN (ESPnet sets feature_grad_mult = 1)"
    assert all(0 < norm < float("inf") for norm in report["cnn_grads"]), report
