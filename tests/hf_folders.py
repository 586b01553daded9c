"""Tiny transformers HuBERT/WavLM/wav2vec2/data2vec-audio folders
(Wav2Vec2Model, Data2VecAudioModel), built with transformers' own classes, for the import tests.

Layouts: ``base`` (post-LN, group-norm CNN, no conv bias: HuBERT/WavLM Base) and ``large`` (pre-LN
``do_stable_layer_norm``, layer-norm CNN with conv bias: the Large models), shrunk to 4 layers of 64 dims with
base's CNN kernels and strides (400-sample receptive field, 320-sample stride). Every weight is randomised
(layer norms included), so a weight copied to the wrong place shows in the outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
    conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
)  # fmt: skip
LAYOUTS = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


BARE_CLASSES = {"hubert": "HubertModel", "wavlm": "WavLMModel", "wav2vec2": "Wav2Vec2Model",
                "data2vec": "Data2VecAudioModel"}  # fmt: skip


def tiny_config(family: str, layout: str, **overrides):
    """A tiny ``HubertConfig``/``WavLMConfig``/``Wav2Vec2Config``/``Data2VecAudioConfig`` of ``layout``.

    data2vec-audio has one layout (layer-norm CNN, post-LN) and a positional embedding of several
    convolutions (base: 5 of kernel 19; tiny: 3 of kernel 5).
    """
    import transformers

    if family == "data2vec":
        if layout != "base":
            raise ValueError("data2vec-audio has the base layout only")
        tiny = {**TINY, "num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 5}
        return transformers.Data2VecAudioConfig(**tiny, conv_bias=False, **overrides)
    cls = getattr(transformers, BARE_CLASSES[family].replace("Model", "Config"))
    extra = {"num_buckets": 32, "max_bucket_distance": 100} if family == "wavlm" else {}
    return cls(**TINY, **LAYOUTS[layout], **extra, **overrides)


def build_hf_folder(folder: Path, family: str, layout: str, cls_name: str | None = None, seed: int = 0,
                    do_normalize: bool | None = None, **overrides) -> Path:  # fmt: skip
    """Write a tiny randomised ``cls_name`` (default: the bare model) and its feature extractor to ``folder``.

    The feature extractor follows transformers' rule for these models: ``return_attention_mask`` for the
    layer-norm CNN (large), not for the group-norm one (base); ``do_normalize`` as the Large models (True)
    and HuBERT Base (False) have it, unless given.
    """
    import transformers

    config = tiny_config(family, layout, **overrides)
    name = cls_name or BARE_CLASSES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    large = layout == "large"
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0,
        do_normalize=large if do_normalize is None else do_normalize, return_attention_mask=large,
    ).save_pretrained(folder)  # fmt: skip
    return Path(folder)
