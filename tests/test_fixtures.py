"""Tiny checkpoints load in s3prl's stock loaders; the bundled demo corpus is a sound LibriSpeech tree."""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from s3prl_laser import fixtures
from s3prl_laser.models.wav2vec2 import family_of

REPO = Path(__file__).resolve().parent.parent
SPLITS = {"train-clean-100": (4, 10), "dev-clean": (2, 5), "test-clean": (2, 5)}  # speakers, utts/speaker
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def assert_plain(obj, where="checkpoint"):
    """Only containers, strings, numbers and tensors: what torch.load(weights_only=True) reads back."""
    assert isinstance(obj, PLAIN_TYPES), f"{where}: {type(obj).__name__}"
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), f"{where}: key {key!r}"
            assert_plain(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            assert_plain(value, f"{where}[{i}]")


def cnn_frames(num_samples: int) -> int:
    """Frames of base's CNN, (kernel, stride) = (10,5), (3,2)x4, (2,2)x2, no padding."""
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


@pytest.fixture(scope="module")
def hub():
    import s3prl.hub

    return s3prl.hub


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    ("ckpt_fixture", "keys"),
    [
        ("tiny_hubert_ckpt", {"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}),
        ("tiny_wavlm_ckpt", {"cfg", "model"}),
        ("tiny_wav2vec2_ckpt", {"task_cfg", "model_cfg", "model_weight"}),
        ("tiny_data2vec_ckpt", {"task_cfg", "model_cfg", "model_weight"}),
    ],
)
def test_checkpoint_is_plain_and_in_s3prl_format(ckpt_fixture, keys, request):
    state = torch.load(request.getfixturevalue(ckpt_fixture), map_location="cpu", weights_only=True)
    assert set(state) == keys
    assert_plain(state)


@pytest.mark.parametrize(
    ("entry", "ckpt_fixture"),
    [(f"{family}_local", f"tiny_{family}_ckpt") for family in ("hubert", "wavlm", "wav2vec2", "data2vec")],
)
def test_stock_s3prl_loader_reads_tiny_model(entry, ckpt_fixture, request, hub):
    expert = getattr(hub, entry)(ckpt=str(request.getfixturevalue(ckpt_fixture))).eval()
    lengths = [16000, 12345]
    with torch.no_grad():
        hidden = expert([torch.randn(n) for n in lengths])["hidden_states"]
    assert len(hidden) == 4 + 1  # input of each of the 4 layers + the encoder output
    for h in hidden:
        assert h.shape == (2, cnn_frames(max(lengths)), 64)
        assert torch.isfinite(h).all()
    assert expert.get_downsample_rates("hidden_states") == 320
    # 320-sample frames with a 400-sample receptive field, like base
    assert [cnn_frames(n) for n in (400, 719, 720, 16000)] == [1, 1, 2, 49]


def test_base_like_configs(tiny_hubert_ckpt, tiny_wavlm_ckpt):
    hubert = torch.load(tiny_hubert_ckpt, weights_only=True)
    wavlm = torch.load(tiny_wavlm_ckpt, weights_only=True)
    for cfg in (hubert["model_cfg"], wavlm["cfg"]):
        assert cfg["layer_norm_first"] is False
        assert cfg["conv_feature_layers"] == "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
        assert (cfg["encoder_layers"], cfg["encoder_embed_dim"], cfg["encoder_attention_heads"]) == (4, 64, 4)
    assert hubert["task_cfg"]["normalize"] is False and wavlm["cfg"]["normalize"] is False
    assert wavlm["cfg"]["relative_position_embedding"] and wavlm["cfg"]["gru_rel_pos"]


@pytest.mark.parametrize(
    "state_fn",
    [fixtures.tiny_hubert_state, fixtures.tiny_wavlm_state, fixtures.tiny_wav2vec2_state,
     fixtures.tiny_data2vec_state],
)  # fmt: skip
def test_seed_reproduces_weights_and_leaves_global_rng_alone(state_fn):
    weights_key = "model" if state_fn is fixtures.tiny_wavlm_state else "model_weight"
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (
        {k: v for k, v in state_fn(seed=seed)[weights_key].items() if k != "_ema"} for seed in (0, 0, 1)
    )
    torch.testing.assert_close(torch.rand(3), expected_next)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_overrides_are_routed_and_checked(tmp_path, hub):
    path = fixtures.build_tiny_hubert(tmp_path / "h.pt", encoder_layers=2, normalize=True)
    state = torch.load(path, weights_only=True)
    assert state["model_cfg"]["encoder_layers"] == 2 and state["task_cfg"]["normalize"] is True
    expert = hub.hubert_local(ckpt=str(path)).eval()
    assert expert.task_cfg.normalize is True
    with torch.no_grad():
        assert len(expert([torch.randn(4000)])["hidden_states"]) == 3
    wavlm = fixtures.tiny_wavlm_state(normalize=True, encoder_layers=3)["cfg"]
    assert wavlm["normalize"] is True and wavlm["encoder_layers"] == 3
    with pytest.raises(ValueError, match="encoder_layerz"):
        fixtures.tiny_hubert_state(encoder_layerz=2)
    with pytest.raises(ValueError, match="encoder_layerz"):
        fixtures.tiny_wavlm_state(encoder_layerz=2)


def test_cli_writes_both_checkpoints(tmp_path):
    assert fixtures.main(["--hubert", str(tmp_path / "a" / "h.pt"), "--wavlm", str(tmp_path / "w.pt")]) == 0
    assert fixtures.main(["--wav2vec2", str(tmp_path / "v.pt"), "--data2vec", str(tmp_path / "d.pt")]) == 0
    for name, family in (("v.pt", "wav2vec2"), ("d.pt", "data2vec")):
        assert family_of(torch.load(tmp_path / name, weights_only=True)) == family
    assert set(torch.load(tmp_path / "a" / "h.pt", weights_only=True)) >= {"model_cfg", "model_weight"}
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == {"cfg", "model"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "d.pt", "h.pt", "v.pt", "w.pt"]  # no temps
    with pytest.raises(SystemExit):
        fixtures.main([])


# -------------------------------------------------------------------------------------------- demo corpus
def read_trans(split_dir: Path) -> dict[str, str]:
    out = {}
    for trans in split_dir.glob("*/*/*.trans.txt"):
        spk, chap = trans.name.removesuffix(".trans.txt").split("-")
        assert trans.parent == split_dir / spk / chap
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            assert utt_id.startswith(f"{spk}-{chap}-")
            out[utt_id] = text
    return out


def test_demo_corpus_root_is_the_bundled_librispeech(demo_corpus):
    assert demo_corpus.name == "LibriSpeech"
    assert demo_corpus == REPO / "s3prl_laser" / "assets" / "demo_corpus" / "LibriSpeech"
    size = sum(f.stat().st_size for f in demo_corpus.rglob("*") if f.is_file())
    assert size <= 4_000_000


def test_demo_corpus_layout_and_transcripts(demo_corpus):
    speakers_seen = {}
    for split, (n_spk, n_utt) in SPLITS.items():
        split_dir = demo_corpus / split
        flacs = sorted(split_dir.rglob("*.flac"))
        speakers = {f.parent.parent.name for f in flacs}
        assert len(speakers) == n_spk and len(flacs) == n_spk * n_utt
        for f in flacs:
            spk, chap, utt = f.stem.split("-")
            assert f.parent == split_dir / spk / chap and re.fullmatch(r"\d{4}", utt)
        trans = read_trans(split_dir)
        assert set(trans) == {f.stem for f in flacs}
        for text in trans.values():
            assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", text), text
        assert not speakers & set(speakers_seen), f"speakers shared between {split} and another split"
        speakers_seen.update(dict.fromkeys(speakers, split))
    all_text = [t for split in SPLITS for t in read_trans(demo_corpus / split).values()]
    assert len(set(all_text)) == len(all_text)  # every sentence used once


def test_demo_corpus_audio_format_and_durations(demo_corpus):
    for flac in demo_corpus.rglob("*.flac"):
        info = sf.info(flac)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert 1.5 <= info.duration <= 5.0, (flac.name, info.duration)
        audio, _ = sf.read(flac, dtype="float32")
        assert 0.05 < abs(audio).max() <= 1.0  # not silent, not clipped garbage
        assert abs(audio[-1200:]).max() < 1e-3  # ends in the 0.1 s pause the script pads, not mid-word


def test_demo_corpus_phonemes_cover_every_utterance(demo_corpus):
    inventory = (demo_corpus / "phonemes" / "inventory.txt").read_text().split()
    assert len(inventory) == len(set(inventory)) == 39
    used = set()
    for split in SPLITS:
        lines = (demo_corpus / "phonemes" / f"{split}.txt").read_text().splitlines()
        phones = {line.split()[0]: line.split()[1:] for line in lines}
        trans = read_trans(demo_corpus / split)
        assert set(phones) == set(trans) and len(lines) == len(trans)
        for utt_id, seq in phones.items():
            assert set(seq) <= set(inventory), utt_id
            # short English words: 2 to 6 phonemes per word on average
            assert 2 <= len(seq) / len(trans[utt_id].split()) <= 6, utt_id
        used.update(p for seq in phones.values() for p in seq)
    assert len(used) >= 30


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_demo_corpus", REPO / "tools" / "make_demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_transcript_rules():
    tool = _load_tool()
    assert tool.transcript("The queen's horse, at noon.") == "THE QUEEN'S HORSE AT NOON"
    assert len(tool.SENTENCES) == sum(n * u for n, u in SPLITS.values())


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng and sox"
)
@pytest.mark.one_lane  # espeak-ng and sox, no lane package
def test_make_demo_corpus_reproduces_the_bundled_corpus(tmp_path, demo_corpus):
    assert _load_tool().main(["--out", str(tmp_path)]) == 0
    rebuilt = tmp_path / "LibriSpeech"
    files = sorted(p.relative_to(demo_corpus) for p in demo_corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    for rel in files:
        assert (demo_corpus / rel).read_bytes() == (rebuilt / rel).read_bytes(), rel
