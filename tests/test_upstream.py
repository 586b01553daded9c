"""The upstream layer against s3prl's stock experts: forward, freezing, no-grad prefix, write-back, loads."""

import argparse
import collections
import enum
import io
import os
import pickle
import sys
import types

import pytest
import torch

from s3prl_laser import fixtures
from s3prl_laser.errors import UserInputError
from s3prl_laser.models import fairseq_import
from s3prl_laser.models.fairseq_import import RestrictedUnpickler, UnsafeCheckpointError
from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint
from s3prl_laser.models.upstream import BaseModel, load_base_model

LENGTHS = [8111, 6161, 3521, 400]  # 25, 19, 10, 1 frames: odd and even, down to one receptive field
ENTRIES = {family: f"{family}_local" for family in ("hubert", "wavlm", "wav2vec2", "data2vec")}  # s3prl's


@pytest.fixture(scope="module")
def hub():
    import s3prl.hub

    return s3prl.hub


@pytest.fixture(params=sorted(ENTRIES))
def case(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_ckpt")


def batch(lengths=LENGTHS, seed=0, fill=0.0):
    """Waveforms of mixed lengths as a list and as a padded [B, T] tensor (padding set to ``fill``)."""
    gen = torch.Generator().manual_seed(seed)
    wavs = [0.1 * torch.randn(n, generator=gen) for n in lengths]
    padded = torch.full((len(lengths), max(lengths) + 37), fill)
    for i, w in enumerate(wavs):
        padded[i, : len(w)] = w
    return wavs, padded, torch.tensor(lengths)


def stock_hidden_states(hub, upstream_name, ckpt, wavs):
    expert = getattr(hub, ENTRIES[upstream_name])(ckpt=str(ckpt)).eval()
    with torch.no_grad():
        return list(expert(wavs)["hidden_states"])


def trainable_names(model: BaseModel) -> set[str]:
    return {name for name, p in model.model.named_parameters() if p.requires_grad}


def params_under(model: BaseModel, prefixes) -> set[str]:
    return {
        name
        for name, _ in model.model.named_parameters()
        if name.startswith(tuple(p + "." for p in prefixes))
    }


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("normalize", [False, True])
def test_forward_equals_stock_expert(case, normalize, hub, tmp_path):
    name, ckpt = case
    if normalize:
        ckpt = fixtures.build_tiny(name, tmp_path / f"{name}_norm.pt", normalize=True)
    wavs, padded, lengths = batch(fill=0.5)  # junk past each length must be ignored
    expected = stock_hidden_states(hub, name, ckpt, wavs)
    model = load_base_model(name, ckpt).eval()
    assert model.normalize is normalize
    with torch.no_grad():
        hidden, frames = model(padded, lengths)
        states = model.hidden_states(padded, lengths)
    assert len(states) == len(expected) == model.num_layers + 1
    for ours, ref in zip(states, expected, strict=True):
        torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(hidden, expected[-1])
    assert hidden.shape == (len(LENGTHS), expected[-1].size(1), model.hidden_size)


def test_frame_lengths_are_the_frames_of_each_utterance_alone(case, hub):
    name, ckpt = case
    wavs, padded, lengths = batch()
    _, frames = load_base_model(name, ckpt).eval()(padded, lengths)
    alone = [stock_hidden_states(hub, name, ckpt, [w])[-1].size(1) for w in wavs]
    assert frames.tolist() == alone
    assert load_base_model(name, ckpt).downsample_rate == 320


def test_forward_rejects_bad_inputs(tiny_hubert_ckpt):
    model = load_base_model("hubert", tiny_hubert_ckpt)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(16000), torch.tensor([16000]))
    with pytest.raises(ValueError, match="wav_lengths"):
        model(torch.zeros(2, 16000), torch.tensor([16000]))
    with pytest.raises(ValueError, match="wav_lengths"):
        model(torch.zeros(1, 16000), torch.tensor([16001]))
    with pytest.raises(ValueError, match="400 samples"):
        model(torch.zeros(1, 399), torch.tensor([399]))


# ----------------------------------------------------------------------------------------------- freezing
def test_freeze_trains_exactly_the_named_modules(case):
    name, ckpt = case
    model = load_base_model(name, ckpt)
    count = model.freeze(trainable_layers=2)
    expected = ["encoder.layers.2", "encoder.layers.3", "encoder.layer_norm"]
    assert model.trainable_module_names == expected
    assert trainable_names(model) == params_under(model, expected)
    assert count == sum(
        p.numel() for n, p in model.model.named_parameters() if n in params_under(model, expected)
    )
    frozen = {n for n, _ in model.model.named_parameters()} - trainable_names(model)
    for prefix in [
        "feature_extractor.",
        "layer_norm.",
        "post_extract_proj.",
        "encoder.pos_conv.",
        "encoder.layers.0.",
    ]:
        assert any(n.startswith(prefix) for n in frozen), prefix
    assert "mask_emb" in frozen
    if name == "hubert":
        assert {"final_proj.weight", "label_embs_concat"} <= frozen

    model.freeze(trainable_layers=1, train_final_layer_norm=False)
    assert trainable_names(model) == params_under(model, ["encoder.layers.3"])
    assert model.freeze(trainable_layers=0, train_final_layer_norm=False) == 0
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="trainable_layers"):
            model.freeze(trainable_layers=bad)


def test_backward_reaches_only_trainable_params(case):
    name, ckpt = case
    model = load_base_model(name, ckpt).train()
    model.freeze(trainable_layers=2)
    _, padded, lengths = batch()
    hidden, frames = model(padded, lengths)
    valid = torch.arange(hidden.size(1))[None, :] < frames[:, None]
    hidden[valid].pow(2).mean().backward()
    for pname, p in model.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize(
    ("train_final_layer_norm", "no_grad_modules", "graph_modules"),
    [
        # post-LN: encoder.layer_norm normalises the encoder input, so every layer is in the graph
        (True, ["feature_extractor", "encoder.pos_conv"], ["encoder.layers.0", "encoder.layers.3"]),
        (
            False,
            ["feature_extractor", "encoder.pos_conv", "encoder.layers.0", "encoder.layers.1"],
            ["encoder.layers.2"],
        ),
    ],
)
def test_frozen_prefix_builds_no_graph(case, train_final_layer_norm, no_grad_modules, graph_modules):
    name, ckpt = case
    model = load_base_model(name, ckpt).train()
    model.freeze(trainable_layers=2, train_final_layer_norm=train_final_layer_norm)
    seen = {}

    def hook(module_name):
        def record(module, args, output):
            seen[module_name] = (output[0] if isinstance(output, tuple) else output).requires_grad

        return record

    for module_name in no_grad_modules + graph_modules:
        model.model.get_submodule(module_name).register_forward_hook(hook(module_name))
    _, padded, lengths = batch()
    hidden, _ = model(padded, lengths)
    assert hidden.requires_grad
    assert seen == {**dict.fromkeys(no_grad_modules, False), **dict.fromkeys(graph_modules, True)}
    assert model.no_grad_prefix()[-1] == (
        "encoder.pos_conv" if train_final_layer_norm else "encoder.layers.1"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_forward_and_backward_match_cpu(case, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    name, ckpt = case
    _, padded, lengths = batch()
    results = {}
    for device in ("cpu", "cuda"):
        model = load_base_model(name, ckpt).to(device).eval()  # eval: no dropout, comparable runs
        model.freeze(trainable_layers=2)
        hidden, frames = model(padded.to(device), lengths.to(device))
        hidden.pow(2).mean().backward()
        grads = {n: p.grad.cpu() for n, p in model.model.named_parameters() if p.grad is not None}
        results[device] = (hidden.detach().cpu(), frames.cpu(), grads)
    assert results["cuda"][1].tolist() == results["cpu"][1].tolist()
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-4, atol=1e-4)
    assert results["cuda"][2].keys() == results["cpu"][2].keys()
    for n, g in results["cpu"][2].items():
        torch.testing.assert_close(results["cuda"][2][n], g, rtol=1e-3, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------- write back
def test_state_for_s3prl_round_trips_through_stock_loader(case, hub, tmp_path):
    name, ckpt = case
    model = load_base_model(name, ckpt).train()
    model.freeze(trainable_layers=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    _, padded, lengths = batch()
    model(padded, lengths)[0].pow(2).mean().backward()
    opt.step()

    path = save_s3prl_checkpoint(model.state_for_s3prl(), tmp_path / "out" / "tuned.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == set(torch.load(ckpt, weights_only=True))
    wavs, padded, lengths = batch(seed=1)
    reloaded = stock_hidden_states(hub, name, path, wavs)
    original = stock_hidden_states(hub, name, ckpt, wavs)
    with torch.no_grad():
        ours = model.eval().hidden_states(padded, lengths)
    for a, b in zip(ours, reloaded, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(reloaded[-1], original[-1])  # the tuned weights were written, not the old ones
    torch.testing.assert_close(reloaded[0], original[0])  # the frozen part below the encoder is unchanged


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_s3prl_checkpoint({"cfg": {"a": 1}, "model": {}}, tmp_path / "c.pt")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_s3prl_checkpoint({"cfg": {"a": 2}, "model": {}}, path)
    assert torch.load(path, weights_only=True)["cfg"] == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


# ------------------------------------------------------------------------------------------------- loading
def test_missing_and_wrong_files(tiny_hubert_ckpt, tiny_wavlm_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_base_model("hubert", tmp_path / "nowhere.pt")
    with pytest.raises(
        ValueError, match=r"like a hubert checkpoint.*expected keys \['cfg', 'model'\].*model_weight"
    ):
        load_base_model("wavlm", tiny_hubert_ckpt)
    with pytest.raises(ValueError, match="model_cfg.*found.*cfg"):
        load_base_model("hubert", tiny_wavlm_ckpt)
    with pytest.raises(ValueError, match="upstream must be one of"):
        load_base_model("conformer", tiny_hubert_ckpt)
    with pytest.raises(ValueError, match="like a hubert checkpoint; pass --upstream hubert"):
        load_base_model("wav2vec2", tiny_hubert_ckpt)  # the same three keys: told apart by content
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="found \\['something'\\]"):
        load_base_model("hubert", tmp_path / "other.pt")


def test_default_checkpoint_uses_s3prls_download_helper(hub, monkeypatch, tiny_hubert_ckpt, tiny_wavlm_ckpt):
    """load_base_model(name, None) asks s3prl's helper for the URL that s3prl's own *_base entry asks for."""
    import s3prl.upstream.hubert.hubconf as hubert_hubconf
    import s3prl.upstream.wavlm.hubconf as wavlm_hubconf
    from s3prl.util import download

    local = {"hubert": str(tiny_hubert_ckpt), "wavlm": str(tiny_wavlm_ckpt)}
    asked = []

    def fake_download(name):
        def fetch(url, refresh=False):
            asked.append(url)
            return local[name]

        return fetch

    for name, module, entry in [
        ("hubert", hubert_hubconf, "hubert_base"),
        ("wavlm", wavlm_hubconf, "wavlm_base"),
    ]:
        monkeypatch.setattr(module, "_urls_to_filepaths", fake_download(name))
        getattr(hub, entry)()  # s3prl's own default entry: records the URL it downloads
        monkeypatch.setattr(download, "_urls_to_filepaths", fake_download(name))
        model = load_base_model(name, None)
        assert asked[-1] == asked[-2] and asked[-1].startswith("https://")
        torch.testing.assert_close(
            model.state_for_s3prl()["model_weight" if name == "hubert" else "model"],
            load_base_model(name, local[name]).state_for_s3prl()[
                "model_weight" if name == "hubert" else "model"
            ],
        )


# ------------------------------------------------------------------------------------------ fairseq reader
class _Dictionary:
    """Like fairseq.data.dictionary.Dictionary: a plain object pickled through its __dict__."""

    def __init__(self, symbols):
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        self.symbols = list(symbols)
        self.count = [1] * len(symbols)
        self.indices = {s: i for i, s in enumerate(symbols)}
        self.nspecial = 4


@pytest.fixture
def fake_fairseq(monkeypatch):
    """Pretend fairseq is importable while a test pickles a checkpoint; it is gone again before loading.

    Gives ``(Dictionary, Choices, save)``: classes pickled as ``fairseq.data.dictionary.Dictionary`` and
    ``fairseq.dataclass.constants.Choices`` (a ChoiceEnum), and ``save(obj, path)``.
    """
    dictionary = type("Dictionary", (_Dictionary,), {"__module__": "fairseq.data.dictionary"})
    choices = enum.Enum("Choices", {"DEFAULT": "default"}, module="fairseq.dataclass.constants", type=str)
    names = [
        "fairseq",
        "fairseq.data",
        "fairseq.data.dictionary",
        "fairseq.dataclass",
        "fairseq.dataclass.constants",
    ]
    modules = {n: types.ModuleType(n) for n in names}
    modules["fairseq.data.dictionary"].Dictionary = dictionary
    modules["fairseq.dataclass.constants"].Choices = choices
    for n, m in modules.items():
        monkeypatch.setitem(sys.modules, n, m)

    def save(obj, path):
        torch.save(obj, path)
        for n in modules:
            monkeypatch.delitem(sys.modules, n)
        return path

    return dictionary, choices, save


def fairseq_style_checkpoint(converted: dict, cfg_kind: str, dictionary, choices) -> dict:
    """What fairseq's trainer writes for HuBERT pre-training: ``cfg`` as a DictConfig or as a plain
    container (``OmegaConf.to_container``), or legacy ``args`` (an ``argparse.Namespace``)."""
    from omegaconf import OmegaConf

    model_cfg = {**converted["model_cfg"], "_name": "hubert", "extractor_mode": choices.DEFAULT}
    task_cfg = {**converted["task_cfg"], "_name": "hubert_pretraining", "labels": ["km"], "data": "/data"}
    args, cfg = None, None
    if cfg_kind == "args":
        args = argparse.Namespace(**{**task_cfg, **model_cfg, "arch": "hubert", "seed": 1})
    elif cfg_kind == "dictconfig":
        cfg = OmegaConf.create({"common": {"seed": 1, "fp16": True}, "model": model_cfg, "task": task_cfg})
    else:
        common = {"seed": 1, "fp16": True, "legacy": argparse.Namespace(x=1)}  # anything, outside model/task
        cfg = {"common": common, "model": model_cfg, "task": task_cfg}
    return {
        "args": args,
        "cfg": cfg,
        "model": converted["model_weight"],
        "criterion": None,
        "optimizer_history": [{"criterion_name": "HubertCriterion", "num_updates": 400000}],
        "task_state": {"dictionaries": [dictionary(s) for s in converted["dictionaries_symbols"]]},
        "extra_state": {"metrics": {}, "previous_training_time": 12.5, "train_iterator": {"epoch": 3}},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98)}]},
    }


@pytest.mark.parametrize("cfg_kind", ["dictconfig", "container", "args"])
def test_fairseq_hubert_checkpoint_is_read_without_fairseq(
    cfg_kind, fake_fairseq, tiny_hubert_ckpt, tmp_path, hub
):
    converted = torch.load(tiny_hubert_ckpt, weights_only=True)
    dictionary, choices, save = fake_fairseq
    path = save(fairseq_style_checkpoint(converted, cfg_kind, dictionary, choices), tmp_path / "hubert.pt")
    with pytest.raises(pickle.UnpicklingError):  # the file really needs more than weights_only allows
        torch.load(path, weights_only=True)

    model = load_base_model("hubert", path)
    assert "fairseq" not in sys.modules
    state = model.state_for_s3prl()
    assert state["dictionaries_symbols"] == converted["dictionaries_symbols"]
    assert state["model_cfg"]["extractor_mode"] == "default"
    assert state["task_cfg"]["label_rate"] == converted["task_cfg"]["label_rate"]

    out = save_s3prl_checkpoint(state, tmp_path / "converted.pt")
    torch.load(out, weights_only=True)
    wavs, padded, lengths = batch()
    for a, b in zip(
        stock_hidden_states(hub, "hubert", out, wavs),
        stock_hidden_states(hub, "hubert", tiny_hubert_ckpt, wavs),
        strict=True,
    ):
        torch.testing.assert_close(a, b)



def test_read_source_gives_s3prl_format_for_a_fairseq_file(fake_fairseq, tiny_hubert_ckpt, tmp_path):
    """models/ returns one s3prl-format dict whatever the source: the fairseq conversion is the loader's."""
    from s3prl_laser.models.s3prl_format import CKPT_KEYS
    from s3prl_laser.models.sources import read_source

    converted = torch.load(tiny_hubert_ckpt, weights_only=True)
    dictionary, choices, save = fake_fairseq
    path = save(fairseq_style_checkpoint(converted, "container", dictionary, choices), tmp_path / "hubert.pt")
    state = read_source("hubert", path)
    assert sorted(state) == sorted(CKPT_KEYS["hubert"])
    assert state["dictionaries_symbols"] == converted["dictionaries_symbols"]
    assert state["model_weight"].keys() == converted["model_weight"].keys()
    with pytest.raises(UserInputError, match=f"{path} is a fairseq checkpoint; WavLM is not read in that"):
        read_source("wavlm", path)

class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, exec], ids=["os.system", "builtins.exec"])
def test_pickle_naming_other_globals_is_refused_without_running_it(func, tmp_path, tiny_hubert_ckpt):
    marker = tmp_path / "ran"
    code = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    weights = torch.load(tiny_hubert_ckpt, weights_only=True)["model_weight"]
    torch.save({"cfg": _RunsCode(func, code), "model": weights, "task_state": {}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|builtins|__builtin__)\.(system|exec)"):
        load_base_model("hubert", tmp_path / "evil.pt")
    assert not marker.exists()


def test_restricted_unpickler_whitelist():
    plain = collections.OrderedDict(a=1, b=[2.0, "x"], c={3, 4}, d=argparse.Namespace(lr=0.1))
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(plain))).load()
    assert loaded == {"a": 1, "b": [2.0, "x"], "c": {3, 4}, "d": {"lr": 0.1}}  # Namespace -> dict
    with pytest.raises(UnsafeCheckpointError, match="subprocess.Popen"):
        RestrictedUnpickler(io.BytesIO(b"csubprocess\nPopen\n.")).load()
    inert = RestrictedUnpickler(io.BytesIO(b"cfairseq.tasks\nSomeTask\n.")).load()
    assert issubclass(inert, fairseq_import._Inert) and inert.origin == "fairseq.tasks.SomeTask"
