"""Stand-ins for names that s3prl's unchanged code imports from libraries that have since moved on.

s3prl's ``run_downstream.py`` and ``downstream/runner.py`` (PyPI's 0.4.18 and ESPnet's fork alike) do
``from huggingface_hub import HfApi, HfFolder, Repository``, and its ASR/CTC datasets read audio with
``torchaudio.load``. huggingface_hub 1.0 removed ``HfFolder`` and ``Repository``; torchaudio 2.9 moved
``load`` onto torchcodec, which needs FFmpeg's shared libraries and is not a dependency of s3prl.
s3prl 0.4.18's own tree (PR runs from it) also calls ``torchaudio.set_audio_backend`` and imports
``torchaudio.sox_effects`` when ``s3prl.hub`` is imported; torchaudio 2.9 removed both.

The start-up hook (:mod:`s3prl_laser._startup`) calls ``patch_huggingface_hub`` / ``patch_torchaudio``
right after each library is first imported, whoever imports it. Each patch only fills a gap: it adds a
name that is missing (``HfFolder``, ``Repository``, ``set_audio_backend``, ``sox_effects``), or replaces
``torchaudio.load`` only where it cannot decode anything (torchaudio >= 2.9 without a working torchcodec).
A name that exists and works is never shadowed, so on the classic lane (huggingface_hub < 1, torchaudio
2.8) nothing changes.

Example::

    >>> import huggingface_hub, torchaudio   # the hook has run both patches
    >>> hasattr(huggingface_hub, "HfFolder")
    True
    >>> wav, rate = torchaudio.load("clip.flac")   # [C, T] float32, 16000
"""

import importlib.metadata
import importlib.util
import io
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

# torchaudio releases whose ``load`` goes through torchcodec only.
TORCHCODEC_ONLY_TORCHAUDIO = (2, 9)


class HfFolder:
    """Stand-in for ``huggingface_hub.HfFolder`` (removed in huggingface_hub 1.0).

    s3prl's runner calls ``get_token()`` and ``save_token(token)``; both act on the token file that
    huggingface_hub >= 1 itself reads (``huggingface_hub.constants.HF_TOKEN_PATH``), as the original did.
    """

    @staticmethod
    def _token_path() -> Path:
        from huggingface_hub import constants

        return Path(constants.HF_TOKEN_PATH)

    @classmethod
    def save_token(cls, token: str) -> None:
        path = cls._token_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)

    @classmethod
    def get_token(cls) -> str | None:
        from huggingface_hub import get_token

        return get_token()

    @classmethod
    def delete_token(cls) -> None:
        cls._token_path().unlink(missing_ok=True)


class Repository:
    """Stand-in for ``huggingface_hub.Repository`` (the git-based helper, removed in huggingface_hub 1.0).

    It exists so that s3prl's runner imports; only its ``--push_to_hf_hub`` path constructs one, and there
    is no git-based equivalent to hand it: constructing one raises an error that says what to use instead.
    """

    def __init__(self, local_dir: str | os.PathLike, *args, **kwargs):
        raise RuntimeError(
            f"huggingface_hub >= 1.0 has no git-based Repository, so {local_dir} cannot be cloned or pushed "
            "that way (s3prl's --push_to_hf_hub). Upload the experiment folder with "
            "`huggingface_hub.HfApi().upload_folder(repo_id=..., folder_path=...)` or `hf upload`, or run "
            "s3prl on the classic lane (huggingface_hub < 1)."
        )


def patch_huggingface_hub(hub: ModuleType) -> list[str]:
    """Add ``HfFolder`` / ``Repository`` where huggingface_hub lacks them; returns the names added."""
    added = []
    for name, stand_in in (("HfFolder", HfFolder), ("Repository", Repository)):
        if not hasattr(hub, name):
            setattr(hub, name, stand_in)
            added.append(name)
    if added:
        logger.debug("huggingface_hub %s lacks %s: stand-ins added", hub.__version__, added)
    return added


def load_with_soundfile(
    uri,
    frame_offset: int = 0,
    num_frames: int = -1,
    normalize: bool = True,
    channels_first: bool = True,
    format: str | None = None,
    buffer_size: int = 4096,
    backend: str | None = None,
):
    """Stand-in for ``torchaudio.load`` (torchaudio >= 2.9 without a working torchcodec), read by soundfile.

    Same contract as torchaudio 2.9's torchcodec-based ``load``: returns ``(waveform, sample_rate)`` with
    ``waveform`` float32 ``[C, T]`` (``[T, C]`` if ``channels_first=False``) in [-1, 1]; ``frame_offset`` and
    ``num_frames`` select samples; ``normalize``, ``format``, ``buffer_size`` and ``backend`` are accepted
    for compatibility and ignored, as torchaudio 2.9 ignores them. Reads what libsndfile reads (WAV, FLAC,
    OGG, MP3, ...); ``uri`` is a path or a binary file object.
    """
    import soundfile
    import torch

    data, sample_rate = soundfile.read(
        uri, start=frame_offset, frames=num_frames, dtype="float32", always_2d=True
    )  # [T, C]
    waveform = torch.from_numpy(data)
    return (waveform.T.contiguous() if channels_first else waveform), sample_rate


def set_audio_backend(backend: str | None) -> None:
    """Stand-in for ``torchaudio.set_audio_backend`` (removed in torchaudio 2.9): does nothing.

    s3prl 0.4.18 calls it at import time (``set_audio_backend("sox_io")`` in ``upstream/byol_s``,
    ``dataio``) and in ``run_downstream.py``. From torchaudio 2.9 there is one way to read audio, so there
    is nothing to choose; the stand-in accepts any backend name and leaves ``torchaudio.load`` as it is.
    """


def _sox_effects_removed(*args, **kwargs):
    raise RuntimeError(
        "torchaudio >= 2.9 has no sox_effects (SoX effect chains were removed), and this s3prl code applies "
        "them; resample or trim with torchaudio.functional, or run it on the classic lane (torchaudio 2.8)"
    )


def sox_effects_module() -> ModuleType:
    """Stand-in for ``torchaudio.sox_effects`` (removed in torchaudio 2.9): importable, its functions refuse.

    s3prl 0.4.18's ``upstream/mos_prediction/expert.py`` does ``from torchaudio.sox_effects import
    apply_effects_tensor`` at the top, and ``s3prl.hub`` imports that module, so without the name no
    upstream at all can be looked up. Only a call (MOS prediction, and the downstreams that read audio
    through SoX effects) needs SoX; that call raises ``RuntimeError`` saying so.
    """
    module = ModuleType("torchaudio.sox_effects")
    module.__doc__ = "s3prl_laser stand-in: torchaudio >= 2.9 removed sox_effects; every function raises."
    for name in ("apply_effects_tensor", "apply_effects_file", "effect_names", "init_sox_effects",
                 "shutdown_sox_effects"):  # fmt: skip
        setattr(module, name, _sox_effects_removed)
    return module


def patch_torchaudio(torchaudio: ModuleType) -> bool:
    """Fill what s3prl 0.4.18 imports from torchaudio where it is missing (``set_audio_backend``,
    ``sox_effects``), and point ``torchaudio.load`` at ``load_with_soundfile`` where it cannot decode;
    returns True if ``load`` was replaced."""
    added = []
    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = set_audio_backend
        added.append("set_audio_backend")
    sox_effects = "torchaudio.sox_effects"
    if sox_effects not in sys.modules and importlib.util.find_spec(sox_effects) is None:
        torchaudio.sox_effects = sys.modules[sox_effects] = sox_effects_module()
        added.append("sox_effects")
    if added:
        logger.debug("torchaudio lacks %s: stand-ins added", added)
    version = getattr(torchaudio, "__version__", None) or importlib.metadata.version("torchaudio")
    if _release(version) < TORCHCODEC_ONLY_TORCHAUDIO:
        return False  # torchaudio's own backends (soundfile, sox, ffmpeg) are still there
    reason = _torchcodec_unusable()
    if reason is None:
        return False
    torchaudio.load = load_with_soundfile
    logger.debug("torchaudio %s: %s, so torchaudio.load reads with soundfile", version, reason)
    return True


def _release(version: str) -> tuple[int, int]:
    """``"2.11.1+cu130"`` -> ``(2, 11)``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _torchcodec_unusable() -> str | None:
    """Why torchcodec cannot decode audio here, or None if it can (probed on a 4-sample in-memory WAV)."""
    if importlib.util.find_spec("torchcodec") is None:
        return "torchcodec is not installed"
    import numpy as np
    import soundfile

    probe = io.BytesIO()
    soundfile.write(probe, np.zeros(4, dtype=np.float32), 16000, format="WAV")
    try:
        from torchcodec.decoders import AudioDecoder

        AudioDecoder(probe.getvalue()).get_all_samples()
    except (ImportError, OSError, RuntimeError) as error:  # FFmpeg's shared libraries missing or unusable
        return f"torchcodec cannot decode ({type(error).__name__})"
    return None
