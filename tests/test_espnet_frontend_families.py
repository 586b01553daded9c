"""The wav2vec 2.0 and data2vec ``<family>_laser`` entries inside ESPnet's s3prl frontend.

(HuBERT and WavLM are held against transformers' own models in tests/test_espnet_frontend.py.) For these
families the promise is s3prl's own: the tuned file through ``<family>_laser`` gives exactly what s3prl's
stock ``<family>_local`` gives on the same file.

ESPnet builds its frontend in its own interpreter, never calling ``s3prl_laser.register()``: the names must
come from the installed start-up hook. Two tests, each in a child process:

- on every lane, the frontend's construction and forward repeated step by step, compared with s3prl's stock
  ``<family>_local`` (wav2vec2, data2vec) on the same file, which ESPnet users load the same
  way (CI's ESPnet lane, which has the same s3prl as the current lane, runs the real frontend below instead);
- on the ESPnet lane (``make LANE=espnet test``; markers ``espnet``, deselected where ESPnet is not
  installed, and ``espnet_lane``), ESPnet's real ``S3prlFrontend``, chosen by ``frontend: s3prl`` through
  ``ASRTask``'s frontend choices and built from the YAML of docs/recipes.md ("In ESPnet"), forward and
  backward on a batch.
"""

import json

import pytest
from test_espnet_frontend import FRONTEND_HELPERS, espnet_yaml, script_report

FAMILIES = ("wav2vec2", "data2vec")

FRONTEND = FRONTEND_HELPERS + r"""
torch.manual_seed(0)
wavs, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
report = {}
for laser, stock, ckpt in json.loads(sys.argv[1]):
    upstream, featurizer, switched = espnet_frontend(laser, ckpt)
    reference, _, _ = espnet_frontend(stock, ckpt)
    with torch.no_grad():
        last, last_lens = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=False)
        mixed, mixed_lens = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=True)
        stock_hs, stock_lens = reference(wavs, lens)
    upstream.train()  # ESPnet fine-tunes the frontend with feature_grad_mult = 1: the CNN gets gradients
    trained, _ = espnet_forward(upstream, featurizer, wavs, lens, multilayer_feature=True)
    trained.square().mean().backward()
    cnn_grad = upstream.upstream.model.feature_extractor.conv_layers[0][0].weight.grad
    report[laser] = {
        "switched": switched,
        "hop_length": featurizer.downsample_rate,
        "output_size": featurizer.output_size,
        "last_vs_stock": (last - stock_hs[-1]).abs().max().item(),
        "mixed_vs_mean_of_stock_layers": (mixed - torch.stack(stock_hs).mean(0)).abs().max().item(),
        "lens": [last_lens.tolist(), mixed_lens.tolist(), stock_lens[-1].tolist()],
        "cnn_grad_norm": None if cnn_grad is None else cnn_grad.norm().item(),
    }
print(json.dumps(report))
"""


def test_laser_entries_work_as_espnet_builds_and_calls_them(request, tmp_path):
    cases = [
        (f"{family}_laser", f"{family}_local", str(request.getfixturevalue(f"tiny_{family}_ckpt")))
        for family in FAMILIES
    ]
    report = script_report(FRONTEND, json.dumps(cases), cwd=tmp_path)
    expected_frames = [50, 29]  # ceil(16000 / 320), ceil(9000 / 320)
    for name, result in report.items():
        assert result["switched"], f"{name}: ESPnet's feature_grad_mult switch found no model to apply to"
        assert (result["hop_length"], result["output_size"]) == (320, 64), name
        assert result["last_vs_stock"] == 0.0, name
        assert result["mixed_vs_mean_of_stock_layers"] < 1e-5, name  # zero-init weights: a uniform mean
        assert result["lens"] == [expected_frames] * 3, name
        assert result["cnn_grad_norm"] is not None and 0 < result["cnn_grad_norm"] < float("inf"), name


REAL_FRONTEND = r"""
import copy, json, sys
import torch, yaml
from espnet2.tasks.asr import frontend_choices

config, ckpts = yaml.safe_load(sys.argv[1]), json.loads(sys.argv[2])


def build(upstream, ckpt):
    # what ASRTask.build_model does with the config's frontend and frontend_conf
    conf = copy.deepcopy(config["frontend_conf"])
    conf["frontend_conf"].update(upstream=upstream, path_or_url=ckpt)
    return frontend_choices.get_class(config["frontend"])(**conf)


torch.manual_seed(0)
wavs, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
report = {}
for upstream, ckpt in ckpts:
    frontend = build(upstream, ckpt)
    feats, feats_lens = frontend(wavs, lens)
    feats.square().mean().backward()
    report[upstream] = {
        "class": type(frontend).__module__ + "." + type(frontend).__name__,
        "feats": feats.detach().tolist(),
        "lens": feats_lens.tolist(),
        "output_size": frontend.output_size(),
        "grads": {n: p.grad.tolist() for n, p in frontend.named_parameters() if p.grad is not None},
    }
print(json.dumps(report))
"""


@pytest.mark.espnet
@pytest.mark.espnet_lane
@pytest.mark.parametrize("family", FAMILIES)
def test_espnets_own_s3prl_frontend_runs_laser_like_local(family, request, tmp_path):
    import torch

    config = espnet_yaml()
    assert "upstream: hubert_laser" in config and "frontend: s3prl" in config  # the entry is set below
    ckpt = str(request.getfixturevalue(f"tiny_{family}_ckpt"))
    pair = json.dumps([(f"{family}_laser", ckpt), (f"{family}_local", ckpt)])
    report = script_report(REAL_FRONTEND, config, pair, cwd=tmp_path)
    laser, local = report[f"{family}_laser"], report[f"{family}_local"]
    assert laser["class"] == "espnet2.asr.frontend.s3prl.S3prlFrontend"
    assert laser["lens"] == local["lens"] == [50, 29]  # ceil(16000 / 320), ceil(9000 / 320)
    assert laser["output_size"] == local["output_size"] == 64
    torch.testing.assert_close(torch.tensor(laser["feats"]), torch.tensor(local["feats"]), rtol=0, atol=0)
    assert laser["grads"].keys() == local["grads"].keys()
    cnn = [name for name in laser["grads"] if "feature_extractor.conv_layers.0" in name]
    assert cnn, "no gradient reached the CNN (ESPnet sets feature_grad_mult = 1)"
    for name, grad in laser["grads"].items():
        torch.testing.assert_close(torch.tensor(grad), torch.tensor(local["grads"][name]), rtol=1e-6, atol=0)
