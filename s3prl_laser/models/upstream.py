"""The base model: s3prl's own HuBERT/WavLM classes built from any source, frozen by name, written back.

- :func:`load_base_model` builds a base HuBERT or WavLM with s3prl's own model classes from an s3prl-format
  checkpoint (HuBERT "converted" / WavLM ``cfg`` + ``model``), from an original fairseq HuBERT checkpoint
  (read without fairseq by a restricted unpickler, then converted like ``s3prl/upstream/hubert/convert.py``),
  from a Hugging Face transformers folder or hub id, or from s3prl's downloads (``hubert_base``,
  ``wavlm_base_plus``, ...). What ``--ckpt`` may name, and turning each into one s3prl-format dict, is
  :mod:`s3prl_laser.models.sources`' job (reading the files: :mod:`s3prl_laser.models.s3prl_format`,
  :mod:`s3prl_laser.models.fairseq_import`, :mod:`s3prl_laser.models.hf_import`); this module sees only
  that dict.
- :class:`BaseModel` freezes it by module name, runs it with the frozen prefix under ``torch.no_grad()``,
  and writes it back in s3prl's own format (:meth:`BaseModel.state_for_s3prl`).

Example:
    >>> model = load_base_model("hubert", "tiny_hubert.pt")  # doctest: +SKIP
    >>> n_trainable = model.freeze(trainable_layers=2)  # doctest: +SKIP
    >>> hidden, frames = model(torch.randn(2, 16000), torch.tensor([16000, 12000]))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s3prl_laser.errors import UserInputError
from s3prl_laser.models import wav2vec2
from s3prl_laser.models.hf_import import HF_ORIGIN_KEY
from s3prl_laser.models.s3prl_format import check_keys
from s3prl_laser.models.sources import read_source
from s3prl_laser.names import UPSTREAMS


def load_base_model(upstream: str, ckpt: str | os.PathLike | None = None) -> BaseModel:
    """Build the base HuBERT/WavLM of ``upstream`` ("hubert" or "wavlm") with s3prl's model classes.

    ``ckpt``: an s3prl-format checkpoint (HuBERT converted: ``task_cfg``, ``model_cfg``, ``model_weight``,
    ``dictionaries_symbols``; WavLM: ``cfg``, ``model``), an original fairseq HuBERT checkpoint (read
    without fairseq, converted in memory), a transformers model folder or hub id (converted in memory by
    :mod:`s3prl_laser.models.hf_import`; its ``hf_origin`` is kept in :attr:`BaseModel.config`, so the tuned
    checkpoint can be exported as the same transformers class), one of s3prl's names
    (``wavlm_base_plus``, ...), or ``None`` for s3prl's default ``hubert_base`` / ``wavlm_base`` (downloaded
    by s3prl's own helper into its cache); see :mod:`s3prl_laser.models.sources`.

    Raises :class:`~s3prl_laser.errors.UserInputError` subclasses naming the file: ``MissingFileError``,
    ``DamagedCheckpointError`` (truncated or corrupted), ``UnsafeCheckpointError`` (a pickle naming a
    non-whitelisted global), and ``UserInputError`` itself for a wrong format (naming the keys found and
    expected).

    Example:
        >>> model = load_base_model("wavlm", "tiny_wavlm.pt")  # doctest: +SKIP
    """
    if upstream not in UPSTREAMS:
        raise UserInputError(f"upstream must be one of {UPSTREAMS}, got {upstream!r}")
    where = str(ckpt)
    state = read_source(upstream, ckpt)  # s3prl's format whatever the source
    check_keys(upstream, state, where)
    if upstream == "hubert":
        from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
        from s3prl.upstream.utils import merge_with_parent

        task_cfg = merge_with_parent(HubertPretrainingConfig, state["task_cfg"])
        model = HubertModel(
            merge_with_parent(HubertConfig, state["model_cfg"]), task_cfg, state["dictionaries_symbols"]
        )
        model.load_state_dict(state["model_weight"])
        keys = ("task_cfg", "model_cfg", "dictionaries_symbols", HF_ORIGIN_KEY)
        config = {k: state[k] for k in keys if k in state}
        normalize = bool(task_cfg.normalize)
    elif upstream in wav2vec2.FAMILIES:
        model, config, normalize = wav2vec2.build_model(upstream, state, where)
        config.update({k: state[k] for k in (HF_ORIGIN_KEY,) if k in state})
    else:
        from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

        model = WavLM(WavLMConfig(state["cfg"]))
        model.load_state_dict(state["model"])
        config = {k: state[k] for k in ("cfg", HF_ORIGIN_KEY) if k in state}
        normalize = bool(model.cfg.normalize)
    return BaseModel(upstream, model, copy.deepcopy(config), normalize=normalize)


# ---------------------------------------------------------------------------------------------- the model
def cnn_frame_lengths(wav_lengths: Tensor, conv_layers: list[tuple[int, int, int]]) -> Tensor:
    """Frames the CNN makes of each waveform alone: ``L <- floor((L - kernel) / stride) + 1`` per layer.

    ``wav_lengths: [B]`` -> ``[B]`` (0 for inputs shorter than the receptive field, 400 samples for base).
    """
    frames = wav_lengths.long()
    for _, kernel, stride in conv_layers:
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
    return frames.clamp(min=0)


class _Stage:
    """One step of the forward pass: a function of the running state and the modules whose weights it uses."""

    def __init__(self, name: str, modules: list[nn.Module], fn: Callable[[dict], None]):
        self.name, self.modules, self.fn = name, modules, fn

    def trainable(self) -> bool:
        return any(p.requires_grad for m in self.modules for p in m.parameters())


class BaseModel(nn.Module):
    """A base HuBERT/WavLM (s3prl's model class in ``.model``) with LASER's freezing and forward pass.

    Hidden switches of s3prl's experts, made explicit here:
    - ``model.feature_grad_mult = 0.0``: the CNN feature extractor always runs under ``torch.no_grad()``;
    - ``model.encoder.layerdrop = 0.0``: every transformer layer runs at every step;
    - no time masking (s3prl's experts pass ``mask=None``/``False``);
    - dropout as in the checkpoint config (``dropout``, ``attention_dropout``, ``dropout_input``, ...)
      when the module is in train mode, none in eval mode.

    ``hidden_size``: channels C of the hidden states; ``num_layers``: transformer layers N;
    ``downsample_rate``: samples per frame (320 for base).
    """

    def __init__(self, upstream: str, model: nn.Module, config: dict, normalize: bool):
        super().__init__()
        if upstream not in UPSTREAMS:
            raise ValueError(f"upstream must be one of {UPSTREAMS}, got {upstream!r}")
        self.upstream = upstream
        self.model = model
        self.config = config  # the checkpoint's config entries, written back by state_for_s3prl()
        self.normalize = normalize  # task_cfg.normalize (HuBERT) / cfg.normalize (WavLM)
        self.model.feature_grad_mult = 0.0
        self.model.encoder.layerdrop = 0.0
        self.conv_layers = [(conv[0].out_channels, conv[0].kernel_size[0], conv[0].stride[0])
                            for conv in model.feature_extractor.conv_layers]  # fmt: skip
        self.trainable_module_names: list[str] = []

    @property
    def hidden_size(self) -> int:
        return self.model.encoder.embedding_dim

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layers)

    @property
    def downsample_rate(self) -> int:
        rate = 1
        for _, _, stride in self.conv_layers:
            rate *= stride
        return rate

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame of the CNN (400 for base)."""
        field, jump = 1, 1
        for _, kernel, stride in self.conv_layers:
            field, jump = field + (kernel - 1) * jump, jump * stride
        return field

    # --------------------------------------------------------------------------------------- freezing
    def freeze(self, trainable_layers: int = 2, train_final_layer_norm: bool = True) -> int:
        """Freeze everything but the top ``trainable_layers`` transformer layers and ``encoder.layer_norm``.

        By module name (``docs/method.md``, "Freezing"): trainable are ``encoder.layers.{N-K}`` ..
        ``encoder.layers.{N-1}`` and, with ``train_final_layer_norm``, ``encoder.layer_norm``; frozen are the
        CNN (``feature_extractor``), ``layer_norm``, ``post_extract_proj``, ``encoder.pos_conv``, the lower
        layers, ``mask_emb`` and HuBERT's ``final_proj`` / ``label_embs_concat``. The names are kept in
        ``trainable_module_names``.

        What it implies for training: in base models (``layer_norm_first=False``, post-LN) the encoder's
        ``layer_norm`` normalises the encoder INPUT (after the positional convolution, before layer 0);
        there is no norm after the last layer. Training it, as the paper does, makes the gradient flow
        back through all N layers: the lower layers are frozen (no weight gradient) but build a graph,
        and only the CNN, ``layer_norm``, ``post_extract_proj`` and ``pos_conv`` run under ``no_grad``.
        With ``train_final_layer_norm=False`` the layers below N-K run under ``no_grad`` too (less memory).
        In pre-LN models (``layer_norm_first=True``) it is the norm after the last layer.

        Returns the number of trainable parameters.
        """
        if not 0 <= trainable_layers <= self.num_layers:
            raise UserInputError(
                f"trainable_layers must be in [0, {self.num_layers}], got {trainable_layers}"
            )
        names = [f"encoder.layers.{i}" for i in range(self.num_layers - trainable_layers, self.num_layers)]
        if train_final_layer_norm:
            names.append("encoder.layer_norm")
        self.model.requires_grad_(False)
        for name in names:
            self.model.get_submodule(name).requires_grad_(True)
        self.trainable_module_names = names
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ---------------------------------------------------------------------------------------- forward
    def frame_lengths(self, wav_lengths: Tensor) -> Tensor:
        """Frames of each waveform (CNN formula), ``[B]`` -> ``[B]``; 49 for 16000 samples on base."""
        return cnn_frame_lengths(wav_lengths, self.conv_layers)

    def _check_inputs(self, wavs: Tensor, wav_lengths: Tensor) -> None:
        if wavs.dim() != 2 or not wavs.is_floating_point():
            raise ValueError(f"wavs must be a float tensor [B, T], got {tuple(wavs.shape)} {wavs.dtype}")
        if wav_lengths.shape != (wavs.size(0),):
            raise ValueError(f"wav_lengths must be [B]={wavs.size(0)}, got {tuple(wav_lengths.shape)}")
        if int(wav_lengths.min()) < 1 or int(wav_lengths.max()) > wavs.size(1):
            raise ValueError(f"wav_lengths must be in [1, {wavs.size(1)}], got {wav_lengths.tolist()}")
        if int(wav_lengths.max()) < self.receptive_field:
            raise ValueError(
                f"the longest input must have >= {self.receptive_field} samples, got {wav_lengths.tolist()}"
            )

    def _stages(self) -> list[_Stage]:
        """The forward pass as stages; each reads and updates the running state ``s`` (a dict)."""
        m, enc = self.model, self.model.encoder
        is_w2v = self.upstream in wav2vec2.FAMILIES
        is_hubert = self.upstream != "wavlm"  # HuBERT, wav2vec2, data2vec: wav2vec2's encoder and layers

        def cnn(s):
            wavs, lengths = s["wavs"], s["wav_lengths"]
            length = int(lengths.max())
            padded = wavs.new_zeros(wavs.size(0), length)
            for i, n in enumerate(lengths.tolist()):  # s3prl's experts: normalise each utterance, pad with 0
                padded[i, :n] = F.layer_norm(wavs[i, :n], (n,)) if self.normalize else wavs[i, :n]
            s["wav_padding_mask"] = torch.arange(length, device=wavs.device)[None, :] >= lengths[:, None]
            s["x"] = m.feature_extractor(padded)  # [B, C, F]

        def features(s):
            x = m.layer_norm(s.pop("x").transpose(1, 2))
            wav_padding_mask = s.pop("wav_padding_mask")
            if is_w2v:  # wav2vec2/data2vec: frames at or past the CNN formula's count of each clip
                frames = self.frame_lengths(s["wav_lengths"])
                s["padding_mask"] = torch.arange(x.size(1), device=x.device)[None, :] >= frames[:, None]
            else:
                s["padding_mask"] = m.forward_padding_mask(x, wav_padding_mask)
            if m.post_extract_proj is not None:
                x = m.post_extract_proj(x)
            s["x"] = m.dropout_input(x)  # [B, F, D]

        def pos_conv(s):
            x = s["x"].masked_fill(s["padding_mask"][..., None], 0.0)
            s["x"] = x + enc.pos_conv(x.transpose(1, 2)).transpose(1, 2)

        def encoder_input(s):
            x = s["x"] if enc.layer_norm_first else enc.layer_norm(s["x"])
            s["num_frames"] = x.size(1)
            if is_hubert:  # wav2vec2's encoder pads the time axis to a multiple (undone at the output)
                from s3prl.upstream.wav2vec2.wav2vec2_model import pad_to_multiple

                x, _ = pad_to_multiple(x, enc.required_seq_len_multiple, dim=-2, value=0)
                s["padding_mask"], _ = pad_to_multiple(
                    s["padding_mask"], enc.required_seq_len_multiple, dim=-1, value=True
                )
            x = F.dropout(x, p=enc.dropout, training=enc.training)
            s["x"], s["pos_bias"] = x.transpose(0, 1), None  # [F, B, D]

        def layer_fn(layer):
            def run(s):
                s["hidden_states"].append(s["x"].transpose(0, 1)[:, : s["num_frames"]])
                if is_hubert:
                    s["x"], _ = layer(s["x"], self_attn_padding_mask=s["padding_mask"], need_weights=False)
                else:
                    s["x"], _, s["pos_bias"] = layer(
                        s["x"],
                        self_attn_padding_mask=s["padding_mask"],
                        need_weights=False,
                        pos_bias=s["pos_bias"],
                    )

            return run

        def encoder_output(s):
            x = s["x"].transpose(0, 1)[:, : s["num_frames"]]
            s["x"] = enc.layer_norm(x) if enc.layer_norm_first else x
            s["hidden_states"].append(s["x"])

        stages = [
            _Stage("feature_extractor", [], cnn),  # feature_grad_mult = 0: never builds a graph
            _Stage(
                "layer_norm",
                [m.layer_norm] + ([m.post_extract_proj] if m.post_extract_proj else []),
                features,
            ),
            _Stage("encoder.pos_conv", [enc.pos_conv], pos_conv),
            _Stage("encoder.layer_norm", [] if enc.layer_norm_first else [enc.layer_norm], encoder_input),
        ]
        stages += [
            _Stage(f"encoder.layers.{i}", [layer], layer_fn(layer)) for i, layer in enumerate(enc.layers)
        ]
        stages.append(
            _Stage("encoder.output", [enc.layer_norm] if enc.layer_norm_first else [], encoder_output)
        )
        return stages

    @staticmethod
    def _first_trainable(stages: list[_Stage]) -> int:
        return next((i for i, stage in enumerate(stages) if stage.trainable()), len(stages))

    def no_grad_prefix(self) -> list[str]:
        """Names of the stages that run under ``torch.no_grad()``: all before the first trainable module.

        After ``freeze(2)`` on base: ``["feature_extractor", "layer_norm", "encoder.pos_conv"]``.
        """
        stages = self._stages()
        return [stage.name for stage in stages[: self._first_trainable(stages)]]

    def _run(self, wavs: Tensor, wav_lengths: Tensor) -> dict:
        self._check_inputs(wavs, wav_lengths)
        stages = self._stages()
        first_trainable = self._first_trainable(stages)
        state = {"wavs": wavs, "wav_lengths": wav_lengths.to(wavs.device), "hidden_states": []}
        for i, stage in enumerate(stages):
            with torch.no_grad() if i < first_trainable else contextlib.nullcontext():
                stage.fn(state)
        return state

    def forward(self, wavs: Tensor, wav_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Last transformer layer output and frame lengths.

        ``wavs: [B, T]`` float (16 kHz; samples past each length are ignored), ``wav_lengths: [B]`` ->
        ``hidden: [B, F, C]`` with ``F`` the frames of the longest input (the same tensor as the last entry
        of s3prl's ``hidden_states`` for this model), ``frame_lengths: [B]`` from the CNN formula
        (frames past an utterance's length see padding). Everything before the first trainable module
        runs under ``torch.no_grad()`` (call :meth:`freeze` first).

        Example:
            >>> hidden, frames = model(torch.randn(2, 16000), torch.tensor([16000, 8000]))  # doctest: +SKIP
            >>> hidden.shape, frames.tolist()  # doctest: +SKIP
            (torch.Size([2, 49, 768]), [49, 24])
        """
        state = self._run(wavs, wav_lengths)
        return state["x"], self.frame_lengths(state["wav_lengths"])

    def hidden_states(self, wavs: Tensor, wav_lengths: Tensor) -> list[Tensor]:
        """All N+1 hidden states ``[B, F, C]`` like s3prl's expert: each layer's input, then the output."""
        return self._run(wavs, wav_lengths)["hidden_states"]

    # ------------------------------------------------------------------------------------- write back
    def state_for_s3prl(self, replace: dict[str, Tensor] | None = None) -> dict:
        """The checkpoint dict in s3prl's own format with the current weights (CPU tensors, plain config).

        HuBERT: ``{"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}``; WavLM:
        ``{"cfg", "model"}``. Loadable by s3prl's stock ``hubert_local`` / ``wavlm_local`` and by
        ``torch.load(weights_only=True)``; write it with :func:`save_s3prl_checkpoint`. ``replace`` maps
        names of :meth:`named_parameters` (``model.encoder.layers.11.…``) to tensors written instead of the
        current ones (e.g. the trainable weights of an earlier step); the model itself is left unchanged.
        """
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        for name, tensor in (replace or {}).items():
            key = name.removeprefix("model.")
            if key not in weights or weights[key].shape != tensor.shape:
                raise ValueError(f"replace: {name!r} is not a parameter of shape {tuple(tensor.shape)} here")
            weights[key] = tensor.detach().to("cpu", copy=True)
        state = copy.deepcopy(self.config)
        if self.upstream in wav2vec2.FAMILIES:
            weights = wav2vec2.writable_weights(self.upstream, weights)
        state["model" if self.upstream == "wavlm" else "model_weight"] = weights
        return state
