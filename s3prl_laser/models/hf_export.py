"""Convert s3prl HuBERT/WavLM/wav2vec2/data2vec checkpoints into Hugging Face ``transformers`` models.

wav2vec 2.0 and data2vec (s3prl's converted format) become ``Wav2Vec2Model`` / ``Data2VecAudioModel``; their
config mapping is :func:`s3prl_laser.models.wav2vec2.hf_config`. The rest of this text describes HuBERT and
WavLM, whose options these families share.

Inputs are the two checkpoint formats s3prl reads (and that ``s3prl_laser.finetune`` writes):

- HuBERT "converted": ``{"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}``
  (``s3prl/upstream/hubert/convert.py``);
- WavLM: ``{"cfg", "model"}`` (``s3prl/upstream/wavlm/expert.py``).

Outputs are ``transformers.HubertModel`` / ``WavLMModel`` instances holding exactly the encoder s3prl
runs: CNN feature extractor, feature layer norm + projection, positional convolution, transformer
layers (WavLM: with its gated relative position bias), encoder layer norm. HuBERT's pre-training heads
(``final_proj``, ``label_embs_concat``, ``target_glu``) are not part of ``HubertModel`` and are dropped.

Option correspondence (s3prl/fairseq -> transformers config):

- ``extractor_mode``: "default" -> ``feat_extract_norm="group"``, "layer_norm" -> ``"layer"``;
- ``conv_feature_layers`` -> ``conv_dim``, ``conv_kernel``, ``conv_stride``; ``conv_bias`` -> ``conv_bias``;
- ``layer_norm_first`` -> ``do_stable_layer_norm``;
- s3prl's last hidden state is the encoder output (after the final encoder layer norm when
  ``layer_norm_first``) -> ``tie_last_hidden_states=True``. transformers 4 always returned that;
  transformers 5 returns the last layer's output before that norm unless the config sets this flag
  (4 ignores it);
- ``conv_pos``, ``conv_pos_groups`` -> ``num_conv_pos_embeddings``, ``num_conv_pos_embedding_groups``;
- ``activation_fn`` -> ``hidden_act`` (gelu -> gelu, gelu_accurate/gelu_fast -> gelu_new, relu -> relu);
- WavLM ``num_buckets``, ``max_distance`` -> ``num_buckets``, ``max_bucket_distance``;
- dropouts and ``encoder_layerdrop`` by name; ``mask_emb`` -> ``masked_spec_embed``. The training-time
  masking settings (``mask_prob``, ...) keep transformers' defaults, as in transformers' own conversions.

What transformers cannot express raises ``UserInputError`` (a ``ValueError``) naming the option:
``layer_type="conformer"``, other activations (e.g. WavLM's "glu"), WavLM with
``relative_position_embedding=False`` or ``gru_rel_pos=False`` (transformers' WavLM always applies the
gated relative position bias), ``encoder_embed_dim`` not divisible by the heads or ``conv_pos_groups``,
and any weight whose name or shape has no place in the transformers model.

Example::

    >>> ckpt = load_s3prl_checkpoint("runs/demo/hubert_laser.pt")   # doctest: +SKIP
    >>> model = to_hf_model(ckpt).eval()                             # doctest: +SKIP
    >>> model(torch.randn(1, 16000), output_hidden_states=True).hidden_states  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from s3prl_laser.errors import UserInputError
from s3prl_laser.models import wav2vec2
from s3prl_laser.models.s3prl_format import CKPT_KEYS, read_checkpoint
from s3prl_laser.names import UPSTREAMS

HF_ORIGIN_KEY = "hf_origin"  # in a checkpoint imported from transformers: see s3prl_laser.models.hf_import
HUBERT_KEYS = CKPT_KEYS["hubert"]
WAVLM_KEYS = CKPT_KEYS["wavlm"]

# s3prl activation name -> transformers ACT2FN name; each pair computes the same function.
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu"}

EXTRACTOR_MODES = {"default": "group", "layer_norm": "layer"}

MAX_REPEAT = 64  # largest "* n" accepted in conv_feature_layers (fairseq uses <= 4)

# s3prl state-dict keys that HubertModel has no place for (pre-training heads).
# wav2vec2's quantizer and target projection are not part of Wav2Vec2Model either (of ...ForPreTraining).
DROPPED_PREFIXES = ("final_proj.", "label_embs_concat", "target_glu.", "quantizer.", "project_q.")

# (s3prl key pattern, transformers key template); applied to the first match. The "weight_norm"
# placeholder is resolved against the key names the transformers model actually uses.
_CONV = r"feature_extractor\.conv_layers\.(\d+)\."
_LAYER = r"encoder\.layers\.(\d+)\."
_HF_CONV = r"feature_extractor.conv_layers.\1."
_HF_LAYER = r"encoder.layers.\1."
_KEY_RULES = (
    (_CONV + r"0\.(weight|bias)", _HF_CONV + r"conv.\2"),
    (_CONV + r"2\.1\.(weight|bias)", _HF_CONV + r"layer_norm.\2"),  # extractor_mode="layer_norm"
    (_CONV + r"2\.(weight|bias)", _HF_CONV + r"layer_norm.\2"),  # extractor_mode="default" (group norm)
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.(\d+)\.0\.(weight|bias)", r"encoder.pos_conv_embed.layers.\1.conv.\2"),  # data2vec
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.pos_conv_embed.conv.weight_norm.g"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.pos_conv_embed.conv.weight_norm.v"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (_LAYER + r"self_attn\.(q|k|v|out)_proj\.(weight|bias)", _HF_LAYER + r"attention.\2_proj.\3"),
    (_LAYER + r"self_attn\.relative_attention_bias\.weight", _HF_LAYER + r"attention.rel_attn_embed.weight"),
    (_LAYER + r"self_attn\.grep_linear\.(weight|bias)", _HF_LAYER + r"attention.gru_rel_pos_linear.\2"),
    (_LAYER + r"self_attn\.grep_a", _HF_LAYER + r"attention.gru_rel_pos_const"),
    (_LAYER + r"self_attn_layer_norm\.(weight|bias)", _HF_LAYER + r"layer_norm.\2"),
    (_LAYER + r"fc1\.(weight|bias)", _HF_LAYER + r"feed_forward.intermediate_dense.\2"),
    (_LAYER + r"fc2\.(weight|bias)", _HF_LAYER + r"feed_forward.output_dense.\2"),
    (_LAYER + r"final_layer_norm\.(weight|bias)", _HF_LAYER + r"final_layer_norm.\2"),
)


@dataclass(frozen=True)
class S3prlCheckpoint:
    """An s3prl HuBERT/WavLM checkpoint, read and resolved.

    Attributes:
        upstream: ``"hubert"`` or ``"wavlm"``.
        model_cfg: the model config s3prl builds from (its dataclass defaults updated by the file's keys).
        state_dict: parameter name -> tensor, s3prl's names.
        normalize: whether s3prl's expert layer-normalises each waveform before the model.
        sample_rate: expected input sample rate in Hz.
        path: the file it came from (for messages).
        hf_origin: for a model imported from a transformers folder (:mod:`s3prl_laser.models.hf_import`): its
            class, ``config.json``, ``preprocessor_config.json`` and head weights; ``None`` otherwise.
    """

    upstream: str
    model_cfg: dict
    state_dict: dict
    normalize: bool
    sample_rate: int
    path: str
    hf_origin: dict | None = None


def detect_upstream(state: dict, path: str | Path = "<checkpoint>") -> str:
    """Tell a HuBERT "converted" checkpoint from a WavLM one by its top-level keys.

    Example::

        >>> detect_upstream({"cfg": {}, "model": {}})
        'wavlm'
    """
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    found = wav2vec2.family_of(state)
    if found is not None:
        return found
    raise UserInputError(
        f"{path}: not an s3prl HuBERT/WavLM/wav2vec2/data2vec checkpoint; top-level keys are "
        f"{sorted(state)}. HuBERT needs {list(HUBERT_KEYS)}, WavLM needs {list(WAVLM_KEYS)}, wav2vec2 and "
        f"data2vec need {list(wav2vec2.CKPT_KEYS)}."
    )


def load_s3prl_checkpoint(path: str | Path, upstream: str | None = None) -> S3prlCheckpoint:
    """Read an s3prl HuBERT/WavLM checkpoint with ``torch.load(weights_only=True)`` (``read_checkpoint``).

    Args:
        path: the ``.pt`` file.
        upstream: ``"hubert"``/``"wavlm"`` to insist on a format; ``None`` detects it from the keys.
    """
    if upstream is not None and upstream not in UPSTREAMS:
        raise UserInputError(f"upstream must be one of {UPSTREAMS}, got {upstream!r}")
    state = read_checkpoint(path, allow_fairseq=False)
    found = detect_upstream(state, path)
    if upstream is not None and found != upstream:
        raise UserInputError(f"{path}: --upstream {upstream} given, but the checkpoint keys say {found}")
    if found != "wavlm":
        from s3prl.upstream.data2vec.data2vec_model import Data2VecAudioConfig
        from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertPretrainingConfig
        from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config

        model_class, task_class = {
            "hubert": (HubertConfig, HubertPretrainingConfig),
            "wav2vec2": (Wav2Vec2Config, AudioPretrainingConfig),
            "data2vec": (Data2VecAudioConfig, AudioPretrainingConfig),
        }[found]
        model_cfg = _merge_dataclass(model_class, state["model_cfg"], path, "model_cfg")
        task_cfg = _merge_dataclass(task_class, state["task_cfg"], path, "task_cfg")
        weights = {k: v for k, v in state["model_weight"].items() if k != wav2vec2.EMA_KEY}
        return S3prlCheckpoint(
            found,
            model_cfg,
            weights,
            bool(task_cfg["normalize"]),
            int(task_cfg["sample_rate"]),
            str(path),
            state.get(HF_ORIGIN_KEY),
        )
    from s3prl.upstream.wavlm.WavLM import WavLMConfig

    if not isinstance(state["cfg"], dict):
        raise UserInputError(f"{path}: 'cfg' must be a dict, got {type(state['cfg']).__name__}")
    model_cfg = {**WavLMConfig().__dict__, **state["cfg"]}
    return S3prlCheckpoint(
        "wavlm", model_cfg, dict(state["model"]), bool(model_cfg["normalize"]), 16000, str(path),
        state.get(HF_ORIGIN_KEY),
    )


def _merge_dataclass(cls, cfg: dict, path, key: str) -> dict:
    """s3prl's ``merge_with_parent``: dataclass defaults, updated by the known keys of ``cfg``."""
    if not isinstance(cfg, dict):
        raise UserInputError(f"{path}: {key!r} must be a dict, got {type(cfg).__name__}")
    defaults = {name: f.default for name, f in cls.__dataclass_fields__.items()}
    known = {k: v for k, v in cfg.items() if k in defaults}
    merged = {**defaults, **known}
    # s3prl's configs hold str-enums; keep plain values.
    return {k: (str(v) if hasattr(v, "value") else v) for k, v in merged.items()}


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``conv_feature_layers`` string without ``eval``.

    Accepts list/tuple literals of integers combined with ``+`` and ``*`` (the only forms fairseq uses).

    Example::

        >>> parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 2")
        [(512, 10, 5), (512, 3, 2), (512, 3, 2)]
    """

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and not (isinstance(right, int) and 0 <= right <= MAX_REPEAT):
                raise UserInputError(
                    f"conv_feature_layers: repeat count must be an int in [0, {MAX_REPEAT}] in {spec!r}"
                )
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise UserInputError(f"conv_feature_layers: unsupported expression {ast.dump(node)} in {spec!r}")

    try:
        tree = ast.parse(spec, mode="eval")
    except SyntaxError as err:
        raise UserInputError(f"conv_feature_layers: cannot parse {spec!r}: {err}") from err
    layers = value(tree.body)
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise UserInputError(
            f"conv_feature_layers: expected a list of (dim, kernel, stride) tuples, got {spec!r}"
        )
    return layers


def hf_config(ckpt: S3prlCheckpoint):
    """Build the ``transformers`` config for ``ckpt``, refusing options transformers cannot express.

    Returns a ``HubertConfig`` or ``WavLMConfig`` (training-time masking keeps transformers' defaults).
    """
    from transformers import HubertConfig, WavLMConfig

    cfg = ckpt.model_cfg
    where = f"{ckpt.path} ({ckpt.upstream} model config)"
    layer_type = str(cfg.get("layer_type", "transformer"))
    if layer_type != "transformer":
        raise UserInputError(
            f"{where}: layer_type={layer_type!r} is not supported (transformers' "
            f"{ckpt.upstream} has transformer layers only)"
        )
    mode = str(cfg["extractor_mode"])
    if mode not in EXTRACTOR_MODES:
        raise UserInputError(
            f"{where}: extractor_mode={mode!r} is not supported; expected one of "
            f"{sorted(EXTRACTOR_MODES)} (-> feat_extract_norm 'group'/'layer')"
        )
    act = str(cfg["activation_fn"])
    if act not in ACTIVATIONS:
        raise UserInputError(
            f"{where}: activation_fn={act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    dim, heads, groups = (
        int(cfg["encoder_embed_dim"]),
        int(cfg["encoder_attention_heads"]),
        int(cfg["conv_pos_groups"]),
    )
    if dim % heads or dim % groups:
        raise UserInputError(
            f"{where}: encoder_embed_dim={dim} must be divisible by encoder_attention_heads={heads} "
            f"and conv_pos_groups={groups}"
        )
    layers = parse_conv_layers(str(cfg["conv_feature_layers"]))
    common = dict(
        hidden_size=dim,
        num_hidden_layers=int(cfg["encoder_layers"]),
        num_attention_heads=heads,
        intermediate_size=int(cfg["encoder_ffn_embed_dim"]),
        hidden_act=ACTIVATIONS[act],
        hidden_dropout=float(cfg["dropout"]),
        attention_dropout=float(cfg["attention_dropout"]),
        activation_dropout=float(cfg["activation_dropout"]),
        feat_proj_dropout=float(cfg["dropout_input"]),
        layerdrop=float(cfg["encoder_layerdrop"]),
        layer_norm_eps=1e-5,
        feat_extract_norm=EXTRACTOR_MODES[mode],
        feat_extract_activation="gelu",
        conv_dim=[d for d, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        conv_bias=bool(cfg["conv_bias"]),
        num_conv_pos_embeddings=int(cfg["conv_pos"]),
        num_conv_pos_embedding_groups=groups,
        do_stable_layer_norm=bool(cfg["layer_norm_first"]),
        # hidden_states[-1] = last_hidden_state (after the final encoder layer norm), as in s3prl.
        tie_last_hidden_states=True,
    )
    if ckpt.upstream == "hubert":
        return HubertConfig(**common, feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    if ckpt.upstream in wav2vec2.FAMILIES:
        return wav2vec2.hf_config(ckpt.upstream, cfg, common, where)
    for option in ("relative_position_embedding", "gru_rel_pos"):
        if not cfg.get(option, False):
            raise UserInputError(
                f"{where}: {option}=False is not supported; transformers' WavLM always applies "
                "the gated relative position bias (relative_position_embedding=True, gru_rel_pos=True)"
            )
    return WavLMConfig(
        **common, num_buckets=int(cfg["num_buckets"]), max_bucket_distance=int(cfg["max_distance"])
    )


def map_key(key: str) -> str | None:
    """The transformers name for an s3prl parameter name; ``None`` for a dropped pre-training head.

    Example::

        >>> map_key("encoder.layers.3.fc1.weight")
        'encoder.layers.3.feed_forward.intermediate_dense.weight'
    """
    if key.startswith(DROPPED_PREFIXES):
        return None
    for pattern, template in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    raise UserInputError(f"s3prl parameter {key!r} has no transformers counterpart (unknown module)")


def convert_state_dict(ckpt: S3prlCheckpoint, target_keys) -> tuple[dict, list[str]]:
    """Rename ``ckpt.state_dict`` into transformers names.

    Args:
        ckpt: the s3prl checkpoint.
        target_keys: the state-dict keys of the freshly built transformers model; decides the names of the
            positional convolution's weight norm (``weight_g``/``weight_v`` or ``parametrizations.weight``).

    Returns:
        ``(state_dict, dropped)``: the renamed tensors (a missing ``post_extract_proj`` becomes the identity
        projection, as s3prl skips it when CNN and encoder widths agree) and the s3prl keys left out.
    """
    target_keys = set(target_keys)
    prefix = "encoder.pos_conv_embed.conv."
    if prefix + "parametrizations.weight.original0" in target_keys:
        norm_names = {"g": "parametrizations.weight.original0", "v": "parametrizations.weight.original1"}
    else:
        norm_names = {"g": "weight_g", "v": "weight_v"}
    out, dropped = {}, []
    for key, tensor in ckpt.state_dict.items():
        name = map_key(key)
        if name is None:
            dropped.append(key)
            continue
        if ".weight_norm." in name:
            name = prefix + norm_names[name.rsplit(".", 1)[1]]
        out[name] = tensor
    proj = "feature_projection.projection."
    if proj + "weight" not in out:
        dim = int(ckpt.model_cfg["encoder_embed_dim"])
        width = parse_conv_layers(str(ckpt.model_cfg["conv_feature_layers"]))[-1][0]
        if width != dim:
            raise UserInputError(
                f"{ckpt.path}: post_extract_proj is missing but the CNN width {width} differs from "
                f"encoder_embed_dim {dim}"
            )
        out[proj + "weight"] = torch.eye(dim)
        out[proj + "bias"] = torch.zeros(dim)
    return out, dropped


def to_hf_model(ckpt: S3prlCheckpoint):
    """Build the transformers model for ``ckpt`` and load every encoder weight into it (strictly).

    Returns a ``HubertModel``/``WavLMModel`` in eval mode; ``model.s3prl_dropped_keys`` lists the
    s3prl keys that were left out (HuBERT's pre-training heads). A model imported from a transformers folder
    (``ckpt.hf_origin``) becomes that folder's class with its config and head weights again.
    """
    import transformers

    if ckpt.hf_origin is not None:
        return _origin_model(ckpt)
    config = hf_config(ckpt)
    classes = {"hubert": "HubertModel", "wavlm": "WavLMModel", **wav2vec2.HF_BARE_CLASSES}
    model = getattr(transformers, classes[ckpt.upstream])(config)
    model.s3prl_dropped_keys = _load_encoder(ckpt, model)
    return model.eval()


def _origin_model(ckpt: S3prlCheckpoint):
    """The model class and config ``ckpt`` was imported from, with its encoder and the stored head weights."""
    import transformers

    origin = ckpt.hf_origin
    cls = getattr(transformers, origin["class"])
    model = cls(cls.config_class.from_dict(json.loads(origin["config_json"])))
    dropped = _load_encoder(ckpt, model.base_model)
    unknown = sorted(set(origin["head"]) - set(model.state_dict()))
    if unknown:
        raise UserInputError(f"{ckpt.path}: hf_origin head weights {unknown} have no place in {cls.__name__}")
    model.load_state_dict(origin["head"], strict=False)  # the encoder's weights are loaded already
    model.s3prl_dropped_keys = dropped
    return model.eval()


def _load_encoder(ckpt: S3prlCheckpoint, model) -> list[str]:
    """Load ``ckpt``'s weights into a bare ``HubertModel``/``WavLMModel`` strictly; return keys dropped."""
    target = model.state_dict()
    state, dropped = convert_state_dict(ckpt, target)
    if "masked_spec_embed" not in target and "masked_spec_embed" in state:  # transformers builds it only
        state.pop("masked_spec_embed")  # when the config masks (mask_time_prob or mask_feature_prob > 0)
        dropped.append("mask_emb")
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise UserInputError(
            f"{ckpt.path}: the converted weights do not match transformers' {type(model).__name__}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise UserInputError(
                f"{ckpt.path}: {name} has shape {tuple(tensor.shape)}, transformers expects "
                f"{tuple(target[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return dropped


def feature_extractor(ckpt: S3prlCheckpoint, config):
    """The ``Wav2Vec2FeatureExtractor`` matching the checkpoint.

    ``do_normalize`` follows the checkpoint's ``normalize`` flag; ``return_attention_mask`` follows
    transformers' rule for these models: only models with ``feat_extract_norm == "layer"`` were trained
    with padding masks, group-norm models expect zero-padded input without a mask. A model imported from a
    transformers folder gets that folder's feature extractor back.
    """
    from transformers import Wav2Vec2FeatureExtractor

    if ckpt.hf_origin is not None:
        return Wav2Vec2FeatureExtractor.from_dict(json.loads(ckpt.hf_origin["preprocessor_json"]))

    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=ckpt.sample_rate,
        padding_value=0.0,
        do_normalize=ckpt.normalize,
        return_attention_mask=config.feat_extract_norm == "layer",
    )


def hf_model(hf_dir: str | Path):
    """An exported model read back, ``AutoModel.from_pretrained(hf_dir)``, in eval mode."""
    from transformers import AutoModel

    from s3prl_laser.models.hf_import import quiet_loading

    with quiet_loading():  # a wrapper's head (e.g. a CTC head) is not part of AutoModel: not a warning
        return AutoModel.from_pretrained(hf_dir).eval()
