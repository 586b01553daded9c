"""The ``<family>_laser`` entries: s3prl's upstream contract and equality with stock loaders.

References are independent of our code: s3prl's own ``<family>_local`` entries (hubert, wavlm, wav2vec2,
data2vec) on the same file, and the frame count of the base CNN stack computed from its (kernel, stride) list.
"""

import argparse
import shutil

import pytest
import torch

from s3prl_laser.plugin import hubconf

pytestmark = pytest.mark.espnet_lane

SAMPLE_RATE = 16000
# (kernel, stride) of the base HuBERT/WavLM CNN, which the tiny fixtures keep.
BASE_CNN = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2
TINY_LAYERS = 4  # tiny fixtures: 4 transformer layers -> 5 hidden states
ENTRIES = {  # our entry -> (s3prl's stock entry, the tiny checkpoint's fixture, family)
    "hubert_laser": ("hubert_local", "tiny_hubert_ckpt", "hubert"),
    "wavlm_laser": ("wavlm_local", "tiny_wavlm_ckpt", "wavlm"),
    "wav2vec2_laser": ("wav2vec2_local", "tiny_wav2vec2_ckpt", "wav2vec2"),
    "data2vec_laser": ("data2vec_local", "tiny_data2vec_ckpt", "data2vec"),
}


def cnn_frames(samples: int) -> int:
    for kernel, stride in BASE_CNN:
        samples = (samples - kernel) // stride + 1
    return samples


def mixed_batch(seed: int = 0) -> list[torch.Tensor]:
    """0.05 s, 0.3 s and 1 s clips: one batch of mixed lengths, the shortest as in s3prl's own tests."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) for n in (int(0.05 * SAMPLE_RATE), 4800, SAMPLE_RATE)]


@pytest.fixture(params=sorted(ENTRIES))
def entry(request):
    """(entry name, our entry function, s3prl's stock entry function, tiny checkpoint path)."""
    import s3prl.hub

    name = request.param
    stock, ckpt_fixture, _ = ENTRIES[name]
    return name, getattr(hubconf, name), getattr(s3prl.hub, stock), request.getfixturevalue(ckpt_fixture)


def test_hidden_states_of_every_layer_at_stride_320(entry):
    _, laser, _, ckpt = entry
    upstream = laser(ckpt=ckpt).eval()
    wavs = mixed_batch()
    with torch.no_grad():
        hidden = upstream(wavs)["hidden_states"]
    assert upstream.get_downsample_rates("hidden_states") == 320
    assert len(hidden) == TINY_LAYERS + 1
    expected = (len(wavs), cnn_frames(max(len(w) for w in wavs)), 64)
    assert all(tuple(h.shape) == expected for h in hidden)
    assert all(torch.isfinite(h).all() for h in hidden)


def test_forward_backward_on_short_clips(entry):
    _, laser, _, ckpt = entry
    upstream = laser(ckpt=ckpt).train()
    wavs = [torch.randn(int(0.05 * SAMPLE_RATE)) for _ in range(2)]
    hidden = upstream(wavs)["hidden_states"]
    assert hidden[-1].shape[:2] == (2, cnn_frames(len(wavs[0])))
    sum(h.pow(2).sum() for h in hidden).backward()
    grads = {n: p.grad for n, p in upstream.named_parameters() if n.startswith("model.encoder.layers.")}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_deterministic_in_eval_mode(entry):
    _, laser, _, ckpt = entry
    upstream = laser(ckpt=ckpt).eval()
    wavs = mixed_batch()
    with torch.no_grad():
        first, second = upstream(wavs)["hidden_states"], upstream(wavs)["hidden_states"]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_equals_stock_loader_on_the_same_file(entry):
    _, laser, stock, ckpt = entry
    ours, theirs = laser(ckpt=ckpt).eval(), stock(ckpt=str(ckpt)).eval()
    wavs = mixed_batch(seed=1)
    with torch.no_grad():
        ours_hidden, theirs_hidden = ours(wavs)["hidden_states"], theirs(wavs)["hidden_states"]
    assert len(ours_hidden) == len(theirs_hidden)
    for a, b in zip(ours_hidden, theirs_hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ckpt_picks_the_file(entry, tmp_path):
    """Another seed's file gives other hidden states: the entry really loads the file it is given."""
    from s3prl_laser import fixtures

    name, laser, stock, ckpt = entry
    other = fixtures.build_tiny(ENTRIES[name][2], tmp_path / "other.pt", seed=1)
    wavs = mixed_batch()
    with torch.no_grad():
        ours = laser(ckpt=other).eval()(wavs)["hidden_states"][-1]
        seed0 = stock(ckpt=str(ckpt)).eval()(wavs)["hidden_states"][-1]
        seed1 = stock(ckpt=str(other)).eval()(wavs)["hidden_states"][-1]
    torch.testing.assert_close(ours, seed1, rtol=0, atol=0)
    assert not torch.allclose(ours, seed0)


def test_default_location_is_laser_home(entry, tmp_path, monkeypatch):
    name, laser, _, ckpt = entry
    monkeypatch.setenv("S3PRL_LASER_HOME", str(tmp_path))
    shutil.copy(ckpt, tmp_path / f"{name}.pt")
    wavs = mixed_batch()
    with torch.no_grad():
        from_home = laser().eval()(wavs)["hidden_states"][-1]
        explicit = laser(ckpt=ckpt).eval()(wavs)["hidden_states"][-1]
    torch.testing.assert_close(from_home, explicit, rtol=0, atol=0)


def test_default_home_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("S3PRL_LASER_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hubconf.default_ckpt_path("wavlm_laser") == tmp_path / ".cache" / "s3prl_laser" / "wavlm_laser.pt"


@pytest.mark.parametrize(("name", "upstream"), [(name, family) for name, (_, _, family) in ENTRIES.items()])
def test_missing_file_names_the_path_and_the_finetune_command(name, upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("S3PRL_LASER_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as default_error:
        getattr(hubconf, name)()
    message = str(default_error.value)
    assert str(tmp_path / "home" / f"{name}.pt") in message
    home = tmp_path / "home"
    command = f"python -m s3prl_laser.finetune --upstream {upstream} --data LIBRISPEECH_ROOT --out {home}"
    assert command in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere.pt")):
        getattr(hubconf, name)(ckpt=tmp_path / "nowhere.pt")


def test_wrong_format_is_refused(tiny_hubert_ckpt):
    with pytest.raises(ValueError, match=r"tiny_hubert\.pt is not a checkpoint in s3prl WavLM format"):
        hubconf.wavlm_laser(ckpt=tiny_hubert_ckpt)


@pytest.mark.parametrize(
    ("name", "ckpt", "found"),
    [("wav2vec2_laser", "tiny_hubert_ckpt", "hubert"), ("data2vec_laser", "tiny_wav2vec2_ckpt", "wav2vec2"),
     ("wav2vec2_laser", "tiny_data2vec_ckpt", "data2vec")],  # fmt: skip
)
def test_converted_formats_sharing_keys_are_told_apart(name, ckpt, found, request):
    """HuBERT, wav2vec2 and data2vec files all hold task_cfg/model_cfg/model_weight: the family decides."""
    with pytest.raises(ValueError, match=rf"is not a checkpoint in .* format \(a {found} checkpoint"):
        getattr(hubconf, name)(ckpt=request.getfixturevalue(ckpt))


def test_pickles_are_refused_even_under_force_no_weights_only(tiny_hubert_ckpt, tmp_path, monkeypatch):
    state = torch.load(tiny_hubert_ckpt, weights_only=True)
    state["task_cfg"] = argparse.Namespace(**state["task_cfg"])  # what s3prl's runner checkpoints hold
    torch.save(state, tmp_path / "pickled.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match=r"pickled\.pt holds objects other than tensors"):
        hubconf.hubert_laser(ckpt=tmp_path / "pickled.pt")


def test_s3prl_upstream_sees_the_entries(tiny_wavlm_ckpt):
    import s3prl.hub
    from s3prl.nn import S3PRLUpstream

    import s3prl_laser

    assert s3prl_laser.register() == ("hubert_laser", "wavlm_laser", "wav2vec2_laser", "data2vec_laser")
    assert {"hubert_laser", "wavlm_laser"} <= set(s3prl.hub.options())
    upstream = S3PRLUpstream("wavlm_laser", path_or_url=str(tiny_wavlm_ckpt)).eval()
    assert upstream.num_layers == TINY_LAYERS + 1
    assert upstream.downsample_rates == [320] * (TINY_LAYERS + 1)
    wavs = torch.randn(2, SAMPLE_RATE)
    with torch.no_grad():
        hidden, lengths = upstream(wavs, torch.tensor([SAMPLE_RATE, SAMPLE_RATE // 2]))
    assert [h.shape[1] for h in hidden] == [50] * (TINY_LAYERS + 1)
    assert lengths[0].tolist() == [50, 25]
