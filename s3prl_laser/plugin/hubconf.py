"""The ``hubert_laser``, ``wavlm_laser``, ``wav2vec2_laser`` and ``data2vec_laser`` upstream entries, in
s3prl's hubconf style.

Each entry is a plain public function returning s3prl's own upstream expert for a LASER-tuned
checkpoint in s3prl's format (HuBERT "converted": ``task_cfg``, ``model_cfg``, ``model_weight``,
``dictionaries_symbols``; WavLM: ``cfg``, ``model``; wav2vec 2.0 and data2vec "converted": ``task_cfg``,
``model_cfg``, ``model_weight``), which is what ``python -m s3prl_laser.finetune``
writes. The expert returns ``{"hidden_states": [x_0, ..., x_L]}`` (each ``[B, T, D]``, CNN output
after projection plus one state per transformer layer, ``T = ceil(samples / 320)``) and reports a
downsample rate of 320, exactly like s3prl's stock ``hubert_local`` / ``wavlm_local`` / ``wav2vec2_local`` /
``data2vec_local``.

Checkpoint lookup: ``ckpt`` (``run_downstream.py -k FILE``) when given, else
``$S3PRL_LASER_HOME/<entry>.pt`` with ``S3PRL_LASER_HOME`` defaulting to ``~/.cache/s3prl_laser``.
The file is first read by :func:`s3prl_laser.models.s3prl_format.read_checkpoint` with
``torch.load(weights_only=True)``, so a checkpoint holding anything but tensors and plain containers is
refused before s3prl's expert (which calls ``torch.load`` without ``weights_only``) reads it, even under
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``; a damaged file is reported as damaged, naming it.

These entries run inside other programs (ESPnet, s3prl's runner, a user's script), which own the screen: the
warnings that torch raises under s3prl's model code while the expert is built and run (``weight_norm`` is
deprecated, "Support for mismatched key_padding_mask and attn_mask is deprecated") are logged at DEBUG
(logger ``py.warnings``) instead of printed; see :func:`s3prl_laser.console.foreign_warnings_at_debug`.

Example::

    >>> import torch
    >>> from s3prl_laser.plugin.hubconf import hubert_laser
    >>> upstream = hubert_laser(ckpt="runs/demo/hubert_laser.pt").eval()
    >>> hidden = upstream([torch.randn(16000)])["hidden_states"]  # list of [1, 50, D]
"""

import os
from pathlib import Path

from s3prl.upstream.data2vec.expert import UpstreamExpert as _Data2VecExpert
from s3prl.upstream.hubert.expert import UpstreamExpert as _HubertExpert
from s3prl.upstream.wav2vec2.expert import UpstreamExpert as _Wav2Vec2Expert
from s3prl.upstream.wavlm.expert import UpstreamExpert as _WavLMExpert

from s3prl_laser.console import foreign_warnings_at_debug
from s3prl_laser.errors import MissingFileError, UserInputError
from s3prl_laser.models.s3prl_format import CKPT_KEYS, read_checkpoint
from s3prl_laser.models.wav2vec2 import family_of

HOME_ENV = "S3PRL_LASER_HOME"
DEFAULT_HOME = "~/.cache/s3prl_laser"

# entry name -> (finetune --upstream value, keys of the checkpoint format, s3prl format name)
_FORMATS = {
    "hubert_laser": ("hubert", CKPT_KEYS["hubert"], "s3prl HuBERT (converted)"),
    "wavlm_laser": ("wavlm", CKPT_KEYS["wavlm"], "s3prl WavLM"),
    "wav2vec2_laser": ("wav2vec2", CKPT_KEYS["wav2vec2"], "s3prl wav2vec 2.0 (converted)"),
    "data2vec_laser": ("data2vec", CKPT_KEYS["data2vec"], "s3prl data2vec (converted)"),
}


def laser_home() -> Path:
    """The folder searched when no checkpoint is given: ``$S3PRL_LASER_HOME`` or ``~/.cache/s3prl_laser``."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def default_ckpt_path(name: str) -> Path:
    """Where entry ``name`` (``hubert_laser`` or ``wavlm_laser``) looks without ``ckpt``."""
    if name not in _FORMATS:
        raise ValueError(f"unknown LASER entry {name!r}; expected one of {sorted(_FORMATS)}")
    return laser_home() / f"{name}.pt"


def checked_ckpt(name: str, ckpt: str | os.PathLike | None) -> str:
    """Resolve the checkpoint path of entry ``name`` and check its format with a weights-only load."""
    upstream, keys, format_name = _FORMATS[name]
    path = Path(ckpt).expanduser() if ckpt else default_ckpt_path(name)
    if not path.is_file():
        how = "the file given as ckpt (run_downstream -k)" if ckpt else f"the default location (${HOME_ENV})"
        raise MissingFileError(
            f"{name}: no checkpoint at {path} ({how}). Make one with "
            f"`python -m s3prl_laser.finetune --upstream {upstream} --data LIBRISPEECH_ROOT "
            f"--out {path.parent}` "
            f"(it writes {path.parent / f'{name}.pt'}), or pass another file with ckpt=... / -k FILE."
        )
    state = read_checkpoint(path, allow_fairseq=False)
    missing = [key for key in keys if key not in state]
    found = family_of(state)
    if missing or found != upstream:
        what = f"missing keys {missing}" if missing else f"a {found} checkpoint"
        raise UserInputError(
            f"{name}: {path} is not a checkpoint in {format_name} format ({what}; "
            f"expected {list(keys)}). Pass the file that "
            f"`python -m s3prl_laser.finetune --upstream {upstream}` writes."
        )
    return str(path)


class _QuietExpert:
    """Mixin for s3prl's experts: other libraries' warnings while building and running are logged at DEBUG."""

    def __init__(self, ckpt: str, **kwds):
        with foreign_warnings_at_debug():
            super().__init__(ckpt, **kwds)

    def forward(self, wavs):
        with foreign_warnings_at_debug():
            return super().forward(wavs)


class HubertLaserExpert(_QuietExpert, _HubertExpert):
    """s3prl's HuBERT expert (``hidden_states``: L + 1 tensors ``[B, T, D]``), quiet as above."""


class WavLMLaserExpert(_QuietExpert, _WavLMExpert):
    """s3prl's WavLM expert (``hidden_states``: L + 1 tensors ``[B, T, D]``), quiet as above."""


class Wav2Vec2LaserExpert(_QuietExpert, _Wav2Vec2Expert):
    """s3prl's wav2vec 2.0 expert (``hidden_states``: L + 1 tensors ``[B, T, D]``), quiet as above."""


class Data2VecLaserExpert(_QuietExpert, _Data2VecExpert):
    """s3prl's data2vec expert (``hidden_states``: L + 1 tensors ``[B, T, D]``), quiet as above."""


def hubert_laser(ckpt: str | os.PathLike | None = None, **kwds) -> HubertLaserExpert:
    """LASER-tuned HuBERT as an s3prl upstream: s3prl's HuBERT expert on ``ckpt`` (see module doc).

    ``kwds`` go to the expert like in ``hubert_local`` (s3prl's runner passes ``model_config`` and
    ``refresh``, which it ignores).
    """
    return HubertLaserExpert(checked_ckpt("hubert_laser", ckpt), **kwds)


def wavlm_laser(ckpt: str | os.PathLike | None = None, **kwds) -> WavLMLaserExpert:
    """LASER-tuned WavLM as an s3prl upstream: s3prl's WavLM expert on ``ckpt`` (see module doc)."""
    return WavLMLaserExpert(checked_ckpt("wavlm_laser", ckpt), **kwds)


def wav2vec2_laser(ckpt: str | os.PathLike | None = None, **kwds) -> Wav2Vec2LaserExpert:
    """LASER-tuned wav2vec 2.0 (XLS-R, MMS, ...) as an s3prl upstream: s3prl's wav2vec2 expert on ``ckpt``."""
    return Wav2Vec2LaserExpert(checked_ckpt("wav2vec2_laser", ckpt), **kwds)


def data2vec_laser(ckpt: str | os.PathLike | None = None, **kwds) -> Data2VecLaserExpert:
    """LASER-tuned data2vec-audio as an s3prl upstream: s3prl's data2vec expert on ``ckpt``."""
    return Data2VecLaserExpert(checked_ckpt("data2vec_laser", ckpt), **kwds)
