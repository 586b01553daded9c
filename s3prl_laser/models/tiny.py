"""Tiny random-init HuBERT/WavLM/wav2vec 2.0/data2vec checkpoints in s3prl's formats, built with s3prl's own
classes.

The base models' architecture shrunk (4 transformer layers, 64-dim embeddings, 4 heads, FFN 128, 32-channel
CNN) but the same CNN kernels and strides as base: receptive field 400 samples, stride 320 samples (50
frames/s at 16 kHz), ``layer_norm_first=False`` (post-LN), and the base dropouts. They are saved exactly as
s3prl's stock loaders read them, so ``s3prl.hub.hubert_local(ckpt=path)`` / ``wavlm_local(ckpt=path)`` load
them unchanged, and every file loads with ``torch.load(path, weights_only=True)``:

- HuBERT "converted" format (``s3prl/upstream/hubert/convert.py``):
  ``{"task_cfg": dict, "model_cfg": dict, "model_weight": state_dict, "dictionaries_symbols": [[str]]}``
- WavLM format (``s3prl/upstream/wavlm/expert.py``): ``{"cfg": dict, "model": state_dict}``
- wav2vec 2.0 / data2vec "converted" format (``s3prl/upstream/{wav2vec2,data2vec}/convert.py``):
  ``{"task_cfg": dict, "model_cfg": dict, "model_weight": state_dict}`` (data2vec's with an ``_ema`` entry)

They live in ``models/`` because they build s3prl's model classes; the command that writes them is
``python -m s3prl_laser.fixtures``, which also gives these names.

Example:
    >>> from s3prl_laser.models.tiny import build_tiny_hubert
    >>> path = build_tiny_hubert("/tmp/tiny_hubert.pt", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# The tiny architecture, shared by both models. The CNN keeps base's (kernel, stride) list with fewer
# channels, so the frame rate (stride 320) and the receptive field (400 samples) are those of base.
TINY_CONV_FEATURE_LAYERS = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
TINY_ARCH = {
    "conv_feature_layers": TINY_CONV_FEATURE_LAYERS,
    "encoder_layers": 4,  # base: 12
    "encoder_embed_dim": 64,  # base: 768
    "encoder_ffn_embed_dim": 128,  # base: 3072
    "encoder_attention_heads": 4,  # base: 12
    "conv_pos": 16,  # base: 128 (kernel of the convolutional positional embedding)
    "conv_pos_groups": 4,  # base: 16
}
# Settings the base checkpoints carry (fairseq's hubert_base_librispeech.yaml / WavLM Base's cfg).
BASE_TRAINING = {
    "extractor_mode": "default",
    "layer_norm_first": False,
    "conv_bias": False,
    "feature_grad_mult": 0.1,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05,
    "dropout_input": 0.1,
    "dropout_features": 0.1,
    "mask_prob": 0.8,
}
TINY_HUBERT_CLUSTERS = 8  # base: 500 k-means units
TINY_HUBERT_FINAL_DIM = 16  # base: 256
# WavLM Base's gated relative position bias.
WAVLM_BASE_RELATIVE_POSITION = {
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
}


def _seeded_build(seed: int, build):
    """Run ``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _split_overrides(overrides: dict, targets: dict[str, set[str]]) -> dict[str, dict]:
    """Route each override key to the config(s) whose field set names it; unknown keys raise."""
    routed: dict[str, dict] = {name: {} for name in targets}
    for key, value in overrides.items():
        owners = [name for name, fields in targets.items() if key in fields]
        if not owners:
            known = sorted(set().union(*targets.values()))
            raise ValueError(f"unknown config override {key!r}; known keys: {', '.join(known)}")
        for name in owners:
            routed[name][key] = value
    return routed


def tiny_hubert_state(seed: int = 0, **overrides) -> dict:
    """Build a tiny random-init HuBERT and return its s3prl "converted" checkpoint dict.

    ``overrides`` are ``HubertConfig`` / ``HubertPretrainingConfig`` fields (e.g. ``normalize=True``,
    ``encoder_layers=2``); a key both configs have (``label_rate``) goes to both.
    """
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    fields = {
        "model": {f.name for f in dataclasses.fields(HubertConfig)},
        "task": {f.name for f in dataclasses.fields(HubertPretrainingConfig)},
    }
    routed = _split_overrides(overrides, fields)
    task_cfg = HubertPretrainingConfig(**{"label_rate": 50.0, "normalize": False, **routed["task"]})
    model_cfg = HubertConfig(
        **{
            "label_rate": 50.0,
            **BASE_TRAINING,
            **TINY_ARCH,
            "final_dim": TINY_HUBERT_FINAL_DIM,
            **routed["model"],
        }
    )
    # fairseq's Dictionary layout: 4 special symbols, then one symbol per k-means cluster.
    symbols = [["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(TINY_HUBERT_CLUSTERS)]]
    model = _seeded_build(seed, lambda: HubertModel(model_cfg, task_cfg, symbols))
    return {
        "task_cfg": dataclasses.asdict(task_cfg),
        "model_cfg": dataclasses.asdict(model_cfg),
        "model_weight": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dictionaries_symbols": symbols,
    }


def tiny_wavlm_state(seed: int = 0, **overrides) -> dict:
    """Build a tiny random-init WavLM and return its s3prl checkpoint dict ``{"cfg", "model"}``.

    ``overrides`` are ``WavLMConfig`` attributes (e.g. ``normalize=True``, ``encoder_layers=2``).
    """
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    routed = _split_overrides(overrides, {"cfg": set(vars(WavLMConfig()))})
    cfg = WavLMConfig({**BASE_TRAINING, **TINY_ARCH, **WAVLM_BASE_RELATIVE_POSITION, **routed["cfg"]})
    model = _seeded_build(seed, lambda: WavLM(cfg))
    return {
        "cfg": dict(vars(cfg)),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


TINY_W2V_QUANTIZER = {"latent_vars": 8, "latent_groups": 2, "final_dim": 16}  # base: 320 x 2, 256
TINY_DATA2VEC_POS = {"conv_pos": 15, "pos_conv_depth": 3}  # base: 95, 5 (kernel 95 // 5 = 19; tiny: 5)


def _converted_state(task_cfg, model_cfg, model) -> dict:
    """s3prl's converted format of wav2vec2/data2vec: ``{"task_cfg", "model_cfg", "model_weight"}``."""
    return {
        "task_cfg": dataclasses.asdict(task_cfg),
        "model_cfg": {k: getattr(v, "value", v) for k, v in dataclasses.asdict(model_cfg).items()},
        "model_weight": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def _audio_configs(model_config, defaults: dict, overrides: dict):
    """wav2vec 2.0 / data2vec's ``AudioPretrainingConfig`` (not normalised unless overridden) and
    ``model_config`` built from ``defaults``, each override routed to the config that has the field."""
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig

    fields = {
        "model": {f.name for f in dataclasses.fields(model_config)},
        "task": {f.name for f in dataclasses.fields(AudioPretrainingConfig)},
    }
    routed = _split_overrides(overrides, fields)
    task_cfg = AudioPretrainingConfig(**{"normalize": False, **routed["task"]})
    return task_cfg, model_config(**{**defaults, **routed["model"]})


def tiny_wav2vec2_state(seed: int = 0, **overrides) -> dict:
    """Build a tiny random-init wav2vec 2.0 (with its quantizer, as base) in s3prl's converted format.

    ``overrides`` are ``Wav2Vec2Config`` / ``AudioPretrainingConfig`` fields (``normalize=True``,
    ``layer_norm_first=True`` for the pre-LN large layout, ...).
    """
    from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

    defaults = {**BASE_TRAINING, "mask_prob": 0.65, "quantize_targets": True, **TINY_W2V_QUANTIZER,
                **TINY_ARCH}  # fmt: skip
    task_cfg, model_cfg = _audio_configs(Wav2Vec2Config, defaults, overrides)
    return _converted_state(task_cfg, model_cfg, _seeded_build(seed, lambda: Wav2Vec2Model(model_cfg)))


def tiny_data2vec_state(seed: int = 0, **overrides) -> dict:
    """Build a tiny random-init data2vec-audio student in s3prl's converted format (``_ema`` included).

    Like data2vec base: layer-norm CNN (``extractor_mode="layer_norm"``), a positional convolution of
    several layers. ``overrides`` are ``Data2VecAudioConfig`` / ``AudioPretrainingConfig`` fields.
    """
    from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig, Data2VecAudioModel

    defaults = {**BASE_TRAINING, "extractor_mode": "layer_norm", "average_top_k_layers": 2, **TINY_ARCH,
                **TINY_DATA2VEC_POS}  # fmt: skip
    task_cfg, model_cfg = _audio_configs(Data2VecAudioConfig, defaults, overrides)

    def build():
        model = Data2VecAudioModel(model_cfg)
        model.remove_pretraining_modules()
        return model

    state = _converted_state(task_cfg, model_cfg, _seeded_build(seed, build))
    state["model_weight"]["_ema"] = {}  # s3prl's loader deletes this entry (the EMA teacher) before loading
    return state


def build_tiny_hubert(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random-init HuBERT checkpoint (s3prl converted format) to ``path``; return the path.

    Example:
        >>> import s3prl.hub
        >>> expert = s3prl.hub.hubert_local(ckpt=str(build_tiny_hubert("/tmp/h.pt")))  # doctest: +SKIP
    """
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint  # torch: not before --help

    return save_s3prl_checkpoint(tiny_hubert_state(seed, **overrides), path)


def build_tiny_wavlm(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random-init WavLM checkpoint (s3prl ``{"cfg", "model"}`` format) to ``path``.

    Example:
        >>> import s3prl.hub
        >>> expert = s3prl.hub.wavlm_local(ckpt=str(build_tiny_wavlm("/tmp/w.pt")))  # doctest: +SKIP
    """
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint  # torch: not before --help

    return save_s3prl_checkpoint(tiny_wavlm_state(seed, **overrides), path)


def build_tiny(upstream: str, path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny random-init checkpoint of ``upstream`` (hubert, wavlm, wav2vec2, data2vec) in s3prl's format."""
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint  # torch: not before --help

    states = {"hubert": tiny_hubert_state, "wavlm": tiny_wavlm_state, "wav2vec2": tiny_wav2vec2_state,
              "data2vec": tiny_data2vec_state}  # fmt: skip
    if upstream not in states:
        raise ValueError(f"upstream must be one of {sorted(states)}, got {upstream!r}")
    return save_s3prl_checkpoint(states[upstream](seed, **overrides), path)
