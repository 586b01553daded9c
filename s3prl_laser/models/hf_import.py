"""Read a Hugging Face ``transformers`` HuBERT/WavLM/wav2vec2/data2vec-audio folder into s3prl's own format.

wav2vec 2.0 (``Wav2Vec2Model``, its wrappers, base and pre-LN large layouts) and data2vec-audio
(``Data2VecAudioModel``) become s3prl's converted format (``task_cfg``, ``model_cfg``, ``model_weight``);
their family-specific settings are mapped and refused in :mod:`s3prl_laser.models.wav2vec2`.

The reverse of :mod:`s3prl_laser.models.hf_export`. A folder written by ``save_pretrained`` (``config.json``,
the weights as ``model.safetensors`` or ``pytorch_model.bin``, sharded or not, and
``preprocessor_config.json``) holding a ``HubertModel``/``WavLMModel`` or a wrapper whose encoder is one
(``HubertForCTC``, ``WavLMForCTC``, ``...ForSequenceClassification``, ...) becomes the dict that s3prl's stock
loaders read: HuBERT "converted" (``task_cfg``, ``model_cfg``, ``model_weight``, ``dictionaries_symbols``) or
WavLM (``cfg``, ``model``). transformers itself reads the folder (``from_pretrained``: every naming of the
weights it accepts is accepted here, and a weight the folder lacks is an error, never a random
initialisation).

The result also carries ``hf_origin`` (:data:`HF_ORIGIN_KEY`): the model class, its ``config.json`` and
``preprocessor_config.json`` as JSON text, and the weights outside the encoder (e.g. a CTC head). s3prl's
loaders ignore that key; :func:`s3prl_laser.export.export_to_hf` uses it to write the tuned model back as a
folder of the same class and config.

Settings mapped (transformers -> s3prl): ``feat_extract_norm`` "group"/"layer" -> ``extractor_mode``
"default"/"layer_norm"; ``conv_dim``/``conv_kernel``/``conv_stride`` -> ``conv_feature_layers``;
``do_stable_layer_norm`` -> ``layer_norm_first``; ``hidden_act`` gelu/gelu_new/relu -> ``activation_fn``
gelu/gelu_accurate/relu; the dropouts and ``layerdrop`` by meaning; WavLM's ``num_buckets``,
``max_bucket_distance``; ``do_normalize`` of the feature extractor -> ``normalize``. Settings s3prl's model
cannot reproduce exactly are refused with a :class:`~s3prl_laser.errors.UserInputError` naming them (see
:func:`s3prl_config`).

Example:
    >>> state = hf_folder_to_s3prl("hf/hubert-base-ls960")  # doctest: +SKIP
    >>> sorted(state)  # doctest: +SKIP
    ['dictionaries_symbols', 'hf_origin', 'model_cfg', 'model_weight', 'task_cfg']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import torch

from s3prl_laser.errors import MissingFileError, UserInputError
from s3prl_laser.models import wav2vec2
from s3prl_laser.models.hf_export import HF_ORIGIN_KEY, map_key

logger = logging.getLogger(__name__)

# config.json model_type -> our upstream name
MODEL_TYPES = {"hubert": "hubert", "wavlm": "wavlm", **wav2vec2.HF_MODEL_TYPES}
BARE_CLASSES = {"hubert": "HubertModel", "wavlm": "WavLMModel", **wav2vec2.HF_BARE_CLASSES}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_accurate", "relu": "relu"}  # inverse of hf_export's
FEATURE_NORMS = {"group": "default", "layer": "layer_norm"}
S3PRL_SAMPLE_RATE = 16000


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a transformers model folder)."""
    return (Path(path).expanduser() / "config.json").is_file()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def folder_upstream(folder: str | Path) -> str:
    """``"hubert"`` or ``"wavlm"`` from the folder's ``config.json`` (``model_type``); refuses others."""
    config_file = Path(folder).expanduser() / "config.json"
    if not config_file.is_file():
        raise MissingFileError(
            f"{folder}: no config.json; a transformers model folder holds config.json and the weights "
            "(save_pretrained's layout)"
        )
    model_type = read_json(config_file).get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserInputError(
            f"{config_file}: model_type={model_type!r} is not supported; "
            f"expected one of {sorted(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def load_hf_model(folder: str | Path):
    """The folder's model class (``config.architectures[0]``, else the bare model), loaded by transformers.

    Returns ``(model, encoder_prefix)``: the model in eval mode, float32, and the state-dict prefix of its
    encoder (``""`` for a bare ``HubertModel``/``WavLMModel``, ``"hubert."``/``"wavlm."`` for a wrapper).
    """
    import transformers

    folder = Path(folder).expanduser()
    upstream = folder_upstream(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise MissingFileError(f"{folder}: no weights; expected one of {', '.join(WEIGHT_FILES)}")
    config = transformers.AutoConfig.from_pretrained(folder)
    name = (config.architectures or [BARE_CLASSES[upstream]])[0]
    cls = getattr(transformers, name, None)
    if cls is None or cls.config_class is not type(config):
        raise UserInputError(
            f"{folder / 'config.json'}: architectures={config.architectures!r}: {name} is not a transformers "
            f"{type(config).__name__} model class"
        )
    with quiet_loading():
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("masked_spec_embed")]
    if missing or info.get("mismatched_keys"):
        raise UserInputError(
            f"{folder}: the weights do not fill {name}: missing {missing}, "
            f"mismatched {info.get('mismatched_keys') or []}; it would run with random weights there"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:  # weights the class has no place for: never dropped without a word
        owner = class_using(config, unexpected, other_than=name)
        keep = "no model class of this config uses them"
        if owner:
            keep = f'{owner} uses them: set "architectures": ["{owner}"] in config.json to load them with it'
        more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        raise UserInputError(
            f"{folder}: {len(unexpected)} weight(s) that {name} (config.json architectures) does not use "
            f"would be dropped: {', '.join(unexpected[:4])}{more}; {keep}, or save the model without them"
        )
    prefix = "" if model is model.base_model else f"{model.base_model_prefix}."
    return model.float().eval(), prefix  # s3prl's models are float32, whatever the file holds


def class_using(config, keys: list[str], other_than: str) -> str | None:
    """The first transformers model class of ``config``'s type (other than ``other_than``) whose weights
    include every one of ``keys``, as named in the folder or under the encoder's prefix; None if none does.
    The candidates are built on the ``meta`` device: no memory, no weights."""
    import transformers

    family = type(config).__name__.removesuffix("Config")  # Hubert, WavLM: their classes share the name
    for name in sorted(n for n in dir(transformers) if n.startswith(family) and n != other_than):
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            continue
        if name.endswith("PreTrainedModel") or cls.config_class is not type(config):
            continue
        try:
            with torch.device("meta"):
                names = set(cls(config).state_dict())
        except Exception:  # noqa: BLE001 - a class that cannot be built from this config does not use them
            continue
        prefix = f"{cls.base_model_prefix}."
        if all(key in names or prefix + key in names for key in keys):
            return name
    return None


def s3prl_config(config, upstream: str, where: str) -> dict:
    """The s3prl model config for a transformers ``HubertConfig``/``WavLMConfig``; refuses what differs.

    Refused, each by name: ``feat_extract_activation`` other than gelu; ``hidden_act`` other than gelu,
    gelu_new, relu; ``layer_norm_eps`` other than 1e-5 (s3prl's layer norms); ``feat_proj_layer_norm=False``
    and ``conv_pos_batch_norm=True`` (HuBERT); ``add_adapter=True``; ``conv_dim[-1] == hidden_size`` (s3prl
    then has no feature projection, transformers always has one).
    """

    def refuse(setting: str, why: str):
        return UserInputError(f"{where}: {setting} is not supported: {why}")

    feat_extract_norm = getattr(config, "feat_extract_norm", "layer")  # data2vec-audio: always "layer"
    if feat_extract_norm not in FEATURE_NORMS:
        raise refuse(f"feat_extract_norm={feat_extract_norm!r}", f"expected one of {sorted(FEATURE_NORMS)}")
    if config.feat_extract_activation != "gelu":
        raise refuse(f"feat_extract_activation={config.feat_extract_activation!r}", "s3prl's CNN uses gelu")
    if config.hidden_act not in ACTIVATIONS:
        raise refuse(f"hidden_act={config.hidden_act!r}", f"s3prl has {sorted(ACTIVATIONS)} of these")
    if config.layer_norm_eps != 1e-5:
        raise refuse(f"layer_norm_eps={config.layer_norm_eps!r}", "s3prl's layer norms use 1e-5")
    if not getattr(config, "feat_proj_layer_norm", True):
        raise refuse("feat_proj_layer_norm=False", "s3prl always normalises the CNN features")
    if getattr(config, "conv_pos_batch_norm", False):
        raise refuse("conv_pos_batch_norm=True", "s3prl's positional convolution has no batch norm")
    if getattr(config, "add_adapter", False):
        raise refuse("add_adapter=True", "s3prl's model has no adapter layers")
    if config.conv_dim[-1] == config.hidden_size:
        raise refuse(
            f"conv_dim[-1] == hidden_size == {config.hidden_size}",
            "s3prl then has no feature projection, transformers always has one",
        )
    layers = list(zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True))
    cfg = {
        "extractor_mode": FEATURE_NORMS[feat_extract_norm],
        "conv_feature_layers": repr([tuple(int(v) for v in layer) for layer in layers]),
        "conv_bias": bool(config.conv_bias),
        "encoder_layers": int(config.num_hidden_layers),
        "encoder_embed_dim": int(config.hidden_size),
        "encoder_ffn_embed_dim": int(config.intermediate_size),
        "encoder_attention_heads": int(config.num_attention_heads),
        "activation_fn": ACTIVATIONS[config.hidden_act],
        "layer_norm_first": bool(getattr(config, "do_stable_layer_norm", False)),
        "conv_pos": int(config.num_conv_pos_embeddings),
        "conv_pos_groups": int(config.num_conv_pos_embedding_groups),
        "dropout": float(config.hidden_dropout),
        "attention_dropout": float(config.attention_dropout),
        "activation_dropout": float(config.activation_dropout),
        "dropout_input": float(config.feat_proj_dropout),
        "encoder_layerdrop": float(config.layerdrop),
    }
    if upstream in wav2vec2.FAMILIES:
        cfg |= wav2vec2.hf_settings(config, upstream, refuse)
    if upstream == "wavlm":
        cfg |= {"relative_position_embedding": True, "gru_rel_pos": True,
                "num_buckets": int(config.num_buckets), "max_distance": int(config.max_bucket_distance)}
    return cfg


def preprocessor(folder: Path) -> tuple[dict, bool]:
    """The folder's ``preprocessor_config.json`` and its ``do_normalize``; refuses what s3prl cannot follow.

    s3prl's experts take 16 kHz mono waveforms, pad a batch with zeros and layer-normalise each waveform
    when the checkpoint says ``normalize``: ``sampling_rate`` must be 16000, ``feature_size`` 1 and
    ``padding_value`` 0.0. Without the file it is not known whether the model expects normalised input.
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise MissingFileError(
            f"{folder}: no preprocessor_config.json, so whether the model expects normalised waveforms "
            "(do_normalize) is unknown; add the feature extractor's file "
            "(AutoFeatureExtractor.save_pretrained)"
        )
    data = read_json(path)
    for key, expected in (("sampling_rate", S3PRL_SAMPLE_RATE), ("feature_size", 1), ("padding_value", 0.0)):
        if key in data and data[key] != expected:
            raise UserInputError(
                f"{path}: {key}={data[key]!r} is not supported; s3prl's upstreams need {expected}"
            )
    return data, bool(data.get("do_normalize", True))


def hf_folder_to_s3prl(folder: str | Path, upstream: str | None = None) -> dict:
    """Convert a transformers HuBERT/WavLM folder into s3prl's checkpoint dict (plus ``hf_origin``).

    ``upstream``: ``"hubert"``/``"wavlm"`` to insist on a family (``--upstream``). Every encoder weight is
    copied unchanged; s3prl's HuBERT pre-training head (``final_proj``), which transformers does not hold,
    is zero, and so is ``mask_emb`` when the folder has no ``masked_spec_embed`` (neither is used by
    s3prl's expert nor by LASER).
    """
    folder = Path(folder).expanduser()
    found = folder_upstream(folder)
    if upstream is not None and upstream != found:
        raise UserInputError(
            f"--ckpt {folder} is a {found} model (config.json model_type); pass --upstream {found}"
        )
    model, prefix = load_hf_model(folder)
    where = str(folder / "config.json")
    model_cfg = s3prl_config(model.config, found, where)
    pre, normalize = preprocessor(folder)
    hf_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoder = {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}
    head = {k: v for k, v in hf_state.items() if not k.startswith(prefix)}
    state = _s3prl_state(found, model_cfg, normalize)
    weights = state["model" if found == "wavlm" else "model_weight"]
    _fill_weights(weights, encoder, where)
    if found in wav2vec2.FAMILIES:
        state["model_weight"] = wav2vec2.writable_weights(found, weights)
    state[HF_ORIGIN_KEY] = {
        "class": type(model).__name__,
        "config_json": model.config.to_json_string(use_diff=False),
        "preprocessor_json": json.dumps(pre, indent=2, sort_keys=True),
        "head": head,
    }
    return state


def _s3prl_state(upstream: str, model_cfg: dict, normalize: bool) -> dict:
    """A checkpoint dict of s3prl's model built from ``model_cfg`` (weights to be overwritten)."""
    if upstream in wav2vec2.FAMILIES:
        return wav2vec2.empty_state(upstream, model_cfg, normalize, S3PRL_SAMPLE_RATE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if upstream == "hubert":
            from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

            task_cfg = HubertPretrainingConfig(
                label_rate=50.0, normalize=normalize, sample_rate=S3PRL_SAMPLE_RATE
            )
            cfg = HubertConfig(label_rate=50.0, **model_cfg)
            model = HubertModel(cfg, task_cfg, [None])  # no k-means dictionary: no label embeddings
            return {"task_cfg": dataclasses.asdict(task_cfg), "model_cfg": dataclasses.asdict(cfg),
                    "model_weight": dict(model.state_dict()), "dictionaries_symbols": [None]}  # fmt: skip
        from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

        cfg = WavLMConfig({**model_cfg, "normalize": normalize})
        return {"cfg": dict(vars(cfg)), "model": dict(WavLM(cfg).state_dict())}


def _fill_weights(weights: dict, encoder: dict, where: str) -> None:
    """Overwrite s3prl's ``weights`` with the transformers ``encoder`` tensors, by hf_export's names."""
    norm = {
        "g": ("weight_g", "parametrizations.weight.original0"),
        "v": ("weight_v", "parametrizations.weight.original1"),
    }
    used = set()
    for key in list(weights):
        name = map_key(key)
        if name is None or name == "masked_spec_embed" and name not in encoder:
            weights[key] = torch.zeros_like(weights[key])  # final_proj, mask_emb: not in transformers' model
            continue
        if ".weight_norm." in name:
            stem = name.split(".weight_norm.")[0]
            name = next((f"{stem}.{n}" for n in norm[name[-1]] if f"{stem}.{n}" in encoder), name)
        if name not in encoder or encoder[name].shape != weights[key].shape:
            got = tuple(encoder[name].shape) if name in encoder else "nothing"
            raise UserInputError(f"{where}: s3prl's {key} {tuple(weights[key].shape)} has {got} at {name}")
        weights[key] = encoder[name]
        used.add(name)
    left = sorted(set(encoder) - used - {"masked_spec_embed"})
    if left:
        raise UserInputError(f"{where}: weights with no place in s3prl's model: {left}")


@contextlib.contextmanager
def quiet_loading():
    """transformers' own loading messages, bars and warnings stay off our screen (our screen shows ours).

    With ``S3PRL_LASER_LOG=debug`` nothing is held back: transformers logs and shows its bars as configured,
    and other code's warnings go through logging at DEBUG (``console.foreign_warnings_at_debug``).
    """
    from transformers.utils import logging as hf_logging

    from s3prl_laser.console import debug_requested, foreign_warnings_at_debug

    if debug_requested():
        with foreign_warnings_at_debug():
            yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
