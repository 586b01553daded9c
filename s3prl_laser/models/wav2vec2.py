"""wav2vec 2.0 and data2vec-audio with s3prl's own model code (``s3prl/upstream/{wav2vec2,data2vec}/``).

Both families use s3prl's "converted" checkpoint format, the one its stock ``wav2vec2_local`` /
``data2vec_local`` entries read: ``{"task_cfg": dict, "model_cfg": dict, "model_weight": state_dict}``
(HuBERT's converted format has the same three keys plus ``dictionaries_symbols``). data2vec's
``model_weight`` also holds ``"_ema"`` (the teacher's weights, which s3prl's loader deletes before loading
the student; its ``final_proj`` head is removed from the model first).

- :func:`family_of` tells the three converted families apart by content, not by keys alone.
- :func:`build_model` builds s3prl's ``Wav2Vec2Model`` / ``Data2VecAudioModel`` from such a dict, after
  :func:`check_settings` has refused what LASER's forward pass
  (:class:`s3prl_laser.models.upstream.BaseModel`, which reproduces s3prl's expert step by step) does not
  reproduce, naming the setting.
- :func:`writable_weights` turns the tuned weights back into what the stock loader reads.

Example:
    >>> state = read_checkpoint("tiny_wav2vec2.pt")  # doctest: +SKIP
    >>> model, config, normalize = build_model("wav2vec2", state, "tiny_wav2vec2.pt")  # doctest: +SKIP
"""

from __future__ import annotations

from s3prl_laser.errors import UserInputError

FAMILIES = ("wav2vec2", "data2vec")
CKPT_KEYS = ("task_cfg", "model_cfg", "model_weight")
EMA_KEY = "_ema"  # data2vec: the EMA teacher's weights in model_weight; s3prl's loader deletes the entry
# Keys only data2vec's model config has (Data2VecAudioConfig over Wav2Vec2Config).
_DATA2VEC_ONLY = ("average_top_k_layers", "ema_decay", "ema_end_decay", "instance_norm_target_layer")


def family_of(state: dict) -> str | None:
    """``"hubert"``, ``"wavlm"``, ``"wav2vec2"`` or ``"data2vec"`` for an s3prl-format dict; ``None`` if none.

    HuBERT's converted format carries ``dictionaries_symbols``; data2vec's ``model_weight`` an ``_ema`` entry
    or its model config data2vec's own keys; WavLM's format is ``cfg`` + ``model``.
    """
    if all(k in state for k in CKPT_KEYS):
        if "dictionaries_symbols" in state:
            return "hubert"
        weights, cfg = state["model_weight"], state["model_cfg"]
        if isinstance(weights, dict) and EMA_KEY in weights:
            return "data2vec"
        if isinstance(cfg, dict) and (
            str(cfg.get("_name", "")).startswith("data2vec") or any(k in cfg for k in _DATA2VEC_ONLY)
        ):
            return "data2vec"
        return "wav2vec2"
    if "cfg" in state and "model" in state:
        return "wavlm"
    return None


def _configs(upstream: str, state: dict, where: str):
    from s3prl.upstream.utils import merge_with_parent
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config

    for key in ("task_cfg", "model_cfg"):
        if not isinstance(state[key], dict) or not state[key]:
            got = type(state[key]).__name__
            raise UserInputError(f"{where}: {key!r} must be a non-empty dict, got {got}")
    if upstream == "data2vec":
        from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig as model_config_class
    else:
        model_config_class = Wav2Vec2Config
    return merge_with_parent(AudioPretrainingConfig, state["task_cfg"]), merge_with_parent(
        model_config_class, state["model_cfg"]
    )


def check_settings(upstream: str, model_cfg, where: str) -> None:
    """Refuse, by name, the settings LASER's forward pass does not reproduce exactly as s3prl's expert.

    ``layer_type`` other than "transformer" (conformer layers), ``quantize_input=True`` (the encoder would
    read quantised CNN features), ``crop_seq_to_multiple`` other than 1 (frames cropped after the CNN, so
    the frame count is not the CNN's formula).
    """

    def refuse(setting: str, why: str) -> UserInputError:
        return UserInputError(f"{where}: {setting} is not supported for {upstream}: {why}")

    layer_type = str(getattr(model_cfg, "layer_type", "transformer"))
    if layer_type != "transformer":
        raise refuse(f"layer_type={layer_type!r}", "LASER's forward pass runs transformer layers only")
    if getattr(model_cfg, "quantize_input", False):
        raise refuse("quantize_input=True", "the encoder would read quantised features, which LASER skips")
    crop = int(getattr(model_cfg, "crop_seq_to_multiple", 1))
    if crop != 1:
        raise refuse(
            f"crop_seq_to_multiple={crop}", "frames cut after the CNN break the frame count of each clip"
        )


def build_model(upstream: str, state: dict, where: str):
    """s3prl's model for ``state`` with its weights: ``(model, config_to_keep, normalize)``.

    ``config_to_keep`` is what :meth:`BaseModel.state_for_s3prl` writes back besides the weights.
    """
    task_cfg, model_cfg = _configs(upstream, state, where)
    check_settings(upstream, model_cfg, where)
    weights = dict(state["model_weight"])
    if upstream == "data2vec":
        from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioModel

        model = Data2VecAudioModel(model_cfg)
        model.remove_pretraining_modules()  # as s3prl's loader: no final_proj, no EMA teacher
        weights.pop(EMA_KEY, None)
        weights = {k: v for k, v in weights.items() if not k.startswith("final_proj.")}
    else:
        from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Model

        model = Wav2Vec2Model(model_cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UserInputError(
            f"{where}: the weights do not fit s3prl's {upstream} model ({first[-1].strip()})"
        ) from None
    config = {k: state[k] for k in ("task_cfg", "model_cfg") if k in state}
    return model, config, bool(task_cfg.normalize)


def convert_fairseq(upstream: str, state: dict, where: str) -> dict:
    """An original fairseq wav2vec 2.0 / data2vec checkpoint (read without fairseq by the restricted unpickler
    of :mod:`s3prl_laser.models.fairseq_import`) in s3prl's converted format.

    Does what ``s3prl/upstream/{wav2vec2,data2vec}/convert.py`` does with fairseq installed:
    ``task_cfg = cfg["task"]``, ``model_cfg = cfg["model"]`` (old checkpoints such as ``wav2vec_small.pt``:
    both from the flat ``args``), ``model_weight = state["model"]``. The model's ``_name`` (``arch`` in old
    checkpoints) must be the family's.
    """
    from torch import Tensor

    from s3prl_laser.models.fairseq_import import fairseq_configs

    def config_classes():
        from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig
        from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig

        return AudioPretrainingConfig, Data2VecAudioConfig

    task_cfg, model_cfg, name = fairseq_configs(state, where, config_classes)
    found = "data2vec" if name.startswith("data2vec") else "hubert" if name.startswith("hubert") else name
    if not name.startswith(upstream) and found != upstream:
        raise UserInputError(
            f"{where}: a fairseq {name or 'unnamed'} checkpoint, not {upstream}; pass its family's --upstream"
        )
    weights = state["model"]
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor) and k != EMA_KEY]
    if bad:
        raise UserInputError(f"{where}: model weights that are not tensors: {bad[:5]}")
    return {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": dict(weights)}


def writable_weights(upstream: str, weights: dict) -> dict:
    """The ``model_weight`` that s3prl's stock loader reads: data2vec's needs an ``_ema`` entry to delete."""
    if upstream == "data2vec":
        return {**weights, EMA_KEY: {}}
    return weights


# ------------------------------------------------------------------------------- transformers' classes
HF_MODEL_TYPES = {"wav2vec2": "wav2vec2", "data2vec-audio": "data2vec"}  # config.json model_type -> ours
HF_BARE_CLASSES = {"wav2vec2": "Wav2Vec2Model", "data2vec": "Data2VecAudioModel"}


def hf_settings(config, upstream: str, refuse) -> dict:
    """The s3prl model-config entries of a transformers ``Wav2Vec2Config``/``Data2VecAudioConfig`` that differ
    from HuBERT's mapping (:func:`s3prl_laser.models.hf_import.s3prl_config`), refusing what s3prl lacks.

    ``refuse(setting, why)`` builds the error. data2vec's positional embedding is ``num_conv_pos_embeddings``
    convolutions of kernel ``conv_pos_kernel_size``; s3prl builds ``pos_conv_depth`` of kernel
    ``max(3, conv_pos // pos_conv_depth)``.
    """
    if getattr(config, "adapter_attn_dim", None):
        raise refuse(f"adapter_attn_dim={config.adapter_attn_dim}", "s3prl's layers have no adapters")
    if upstream == "wav2vec2":
        return {}
    depth, kernel = int(config.num_conv_pos_embeddings), int(config.conv_pos_kernel_size)
    if kernel < 3:
        raise refuse(f"conv_pos_kernel_size={kernel}", "s3prl's positional convolutions have kernels >= 3")
    return {"conv_pos": kernel * depth, "pos_conv_depth": depth, "extractor_mode": "layer_norm",
            "layer_norm_first": False}  # fmt: skip


def empty_state(upstream: str, model_cfg: dict, normalize: bool, sample_rate: int) -> dict:
    """s3prl's converted dict for a model built from ``model_cfg`` (weights to be overwritten)."""
    import dataclasses

    import torch
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config, Wav2Vec2Model

    task_cfg = AudioPretrainingConfig(normalize=normalize, sample_rate=sample_rate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if upstream == "data2vec":
            from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig, Data2VecAudioModel

            cfg = Data2VecAudioConfig(**model_cfg)
            model = Data2VecAudioModel(cfg)
            model.remove_pretraining_modules()
        else:
            cfg = Wav2Vec2Config(**model_cfg)
            model = Wav2Vec2Model(cfg)
    weights = dict(model.state_dict())
    return {
        "task_cfg": dataclasses.asdict(task_cfg),
        "model_cfg": {k: getattr(v, "value", v) for k, v in dataclasses.asdict(cfg).items()},
        "model_weight": weights,
    }


def hf_config(upstream: str, model_cfg: dict, common: dict, where: str):
    """The transformers config of an s3prl wav2vec2/data2vec model; ``common``: the settings HuBERT's
    mapping (:func:`s3prl_laser.models.hf_export.hf_config`) gives. Refuses what transformers cannot hold."""
    from transformers import Data2VecAudioConfig, Wav2Vec2Config

    depth = int(model_cfg.get("pos_conv_depth", 1))
    if upstream == "wav2vec2":
        if depth != 1:
            raise UserInputError(
                f"{where}: pos_conv_depth={depth} is not supported: transformers' wav2vec2 has one "
                "positional convolution"
            )
        return Wav2Vec2Config(**common)
    if model_cfg["extractor_mode"] != "layer_norm" or model_cfg["layer_norm_first"]:
        raise UserInputError(
            f"{where}: extractor_mode={model_cfg['extractor_mode']!r}, layer_norm_first="
            f"{model_cfg['layer_norm_first']} is not supported: transformers' data2vec-audio has a "
            "layer-norm CNN and post-LN layers (extractor_mode='layer_norm', layer_norm_first=False)"
        )
    kernel = max(3, int(model_cfg["conv_pos"]) // depth)
    common = {k: v for k, v in common.items() if k not in ("feat_extract_norm", "do_stable_layer_norm")}
    return Data2VecAudioConfig(**{**common, "num_conv_pos_embeddings": depth, "conv_pos_kernel_size": kernel})
